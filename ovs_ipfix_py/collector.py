"""Export targets: their syntax, and the set of one exporter's transports.

Targets are written in ``IPFIX.targets`` as OVS writes them --
``IP:PORT``, ``[IPv6]:PORT``, ``host:PORT``, or an address or host with
no port (default 4739, the IPFIX port of RFC 7011 section 10.3.4): UDP
-- or with a transport in front: ``udp:IP:PORT``, ``tcp:IP:PORT``,
``tls:IP:PORT`` (the same address forms, port optional, default 4739
for all three), and ``file:/absolute/path`` (an RFC 5655 file).  Each
target gets one transport (``ovs_ipfix_py.transport``): the exporter
hands every message to the :class:`CollectorSet` and does not know
which transports it feeds.  A target that does not parse or resolve is
logged and skipped; the others work.  A send that fails is counted as
a transmit error and never stops the other collectors.
"""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Dict, List, Optional, Tuple

import netaddr
import tenacity

from ovs_ipfix_py.options import DEFAULT_COLLECTOR_PORT
from ovs_ipfix_py.ratelimit import RateLimitedLog
from ovs_ipfix_py.transport import (
    LostCallback,
    Target,
    TargetError,
    TransientTargetError,
    Transport,
)
from ovs_ipfix_py.transport.file import FileTransport
from ovs_ipfix_py.transport.stream import DEFAULT_BUFFER_SIZE
from ovs_ipfix_py.transport.tcp import TcpTransport
from ovs_ipfix_py.transport.tls import TlsTransport
from ovs_ipfix_py.transport.udp import UdpTransport

log = RateLimitedLog("collector")

__all__ = ["MAX_UDP_PAYLOAD", "TargetError", "TransientTargetError",
           "Target", "split_target", "parse_target", "make_transport",
           "Collector", "CollectorSet", "DEFAULT_BUFFER_SIZE"]

#: The largest UDP payload over IPv4 (65535 - 20 - 8): no IPFIX message
#: may be larger, whatever max-message-size says.
MAX_UDP_PAYLOAD = 65507

#: Transports written in front of a target ("tcp:10.0.0.1:4739").
SCHEMES = ("udp", "tcp", "tls", "file")


# A DNS host name (RFC 1123 section 2.1): dot-separated labels of letters,
# digits and hyphens, not starting or ending with a hyphen.
_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def _parse_port(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise TargetError(f"port {text!r} is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise TargetError(f"port {port} is out of range 1..65535")
    return port


def _check_host(host: str) -> None:
    if not host:
        raise TargetError("host is empty")
    if netaddr.valid_ipv4(host) or netaddr.valid_ipv6(host):
        return
    name = host[:-1] if host.endswith(".") else host
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL_RE.match(x) for x in labels):
        raise TargetError(f"{host!r} is neither an IP address nor a host "
                         "name")
    if labels[-1].isdigit():
        # "10.0.0.300" or "127.1": meant as an address, not a name.
        raise TargetError(f"{host!r} is not a valid IPv4 address")


def split_target(target: str) -> Tuple[str, int]:
    """Split an IPFIX target into (host, port), the way OVS reads them.

    Accepted forms: "IPv4:PORT", "[IPv6]:PORT", "HOST:PORT", and a bare
    "IPv4", "[IPv6]", "IPv6" or "HOST" (port 4739, RFC 7011 section
    10.3.4).  Addresses are checked with netaddr (strict inet_pton forms),
    host names with RFC 1123's rules; nothing is resolved here.  Raises
    ValueError saying what is wrong.
    """
    text = target.strip()
    if not text:
        raise TargetError("empty target")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise TargetError("missing ']'")
        host, rest = text[1:end], text[end + 1:]
        if not netaddr.valid_ipv6(host):
            raise TargetError(f"{host!r} is not an IPv6 address")
        if not rest:
            return host, DEFAULT_COLLECTOR_PORT
        if not rest.startswith(":"):
            raise TargetError(f"unexpected {rest!r} after ']'")
        return host, _parse_port(rest[1:])
    if text.count(":") > 1:
        # More than one colon: only a bare IPv6 address makes sense.
        if netaddr.valid_ipv6(text):
            return text, DEFAULT_COLLECTOR_PORT
        raise TargetError(f"{text!r} is not an IPv6 address (write "
                         "[IPv6]:PORT to give a port)")
    host, sep, port = text.partition(":")
    _check_host(host)
    return host, (_parse_port(port) if sep else DEFAULT_COLLECTOR_PORT)


def parse_target(spec: str) -> Target:
    """A target of any form (module docstring) as a Target; TargetError
    names the target and says what is wrong.  Nothing is resolved.

    "tcp:4739" stays what it always was, the host "tcp" at UDP port
    4739 (a port alone names no host); "tcp:HOST" is a TCP target.
    """
    text = spec.strip()
    scheme, sep, rest = text.partition(":")
    try:
        if sep and scheme in SCHEMES and rest and not rest.isdigit():
            if scheme == "file":
                if not rest.startswith("/"):
                    raise TargetError("file: needs an absolute path")
                if "\0" in rest:
                    raise TargetError("the path has a NUL byte")
                return Target(spec, "", 0, "file", rest)
            host, port = split_target(rest)
            return Target(spec, host, port, scheme)
        host, port = split_target(text)
    except TargetError as e:
        raise TargetError("target %r: %s" % (spec, e)) from None
    return Target(spec, host, port, "udp")


def make_transport(target: Target, buffer_size: int = DEFAULT_BUFFER_SIZE,
                   on_lost: Optional[LostCallback] = None) -> Transport:
    """The transport for a parsed target (TargetError: it cannot be
    set up; transient ones are worth retrying)."""
    if target.transport == "udp":
        return UdpTransport(target)
    cls = {"tcp": TcpTransport, "tls": TlsTransport,
           "file": FileTransport}[target.transport]
    return cls(target, buffer_size, on_lost)


class Collector(UdpTransport):
    """One connected UDP socket to the target ``spec`` (what every
    target was before other transports came)."""

    def __init__(self, spec: str):
        super().__init__(parse_target(spec))


class CollectorSet:
    """The transports of one exporter; bad targets logged and skipped.

    A target that failed for a transient reason (it did not resolve, its
    socket could not be opened) is tried again by ``retry(now)``, backing
    off exponentially from 1 s to 60 s (tenacity's wait_exponential), so
    a collector whose name resolves later is picked up without a
    configuration change.  ``next_retry()`` gives the time (s) of the
    next attempt, or of the next reconnection of a stream, for a poll
    loop's timer; ``run(now)`` and ``wait(poller)`` drive the streams.

    ``buffer_size`` (bytes): each stream's buffer while its peer is away;
    ``on_lost(msg)``: called for a message a stream accepted and lost
    later (the exporter counts its records as not sent).
    """

    BACKOFF = tenacity.wait_exponential(multiplier=1, min=1, max=60)

    def __init__(self, targets: Tuple[str, ...], now: float = 0.0,
                 buffer_size: int = DEFAULT_BUFFER_SIZE,
                 on_lost: Optional[LostCallback] = None):
        self.targets = tuple(targets)
        self.buffer_size = buffer_size
        self.on_lost = on_lost
        self.collectors: List[Transport] = []
        self.bad_targets: List[Tuple[str, str]] = []
        self._pending: Dict[str, List] = {}   # spec -> [attempts, when]
        for spec in self.targets:
            self._open(spec, now)

    def _open(self, spec: str, now: float) -> bool:
        try:
            collector = make_transport(parse_target(spec), self.buffer_size,
                                       self.on_lost)
        except TargetError as e:
            self.bad_targets = [b for b in self.bad_targets if b[0] != spec]
            self.bad_targets.append((spec, str(e)))
            if e.transient:
                attempts = self._pending.get(spec, [0])[0] + 1
                delay = self.BACKOFF(SimpleNamespace(attempt_number=attempts))
                self._pending[spec] = [attempts, now + delay]
                log.warn("%s; skipped, next try in %ds", e, delay)
            else:
                log.warn("%s; skipped", e)
            return False
        self._pending.pop(spec, None)
        self.bad_targets = [b for b in self.bad_targets if b[0] != spec]
        self.collectors.append(collector)
        collector.run(now)
        return True

    def retry(self, now: float) -> bool:
        """Try the due transient failures again; True if one now works
        (its session needs templates before any data)."""
        added = False
        for spec, (_, when) in list(self._pending.items()):
            if now >= when and self._open(spec, now):
                log.info("target %s now reachable", spec)
                added = True
        return added

    def run(self, now: float) -> None:
        """Let every transport progress (connect, write, notice EOF)."""
        for c in self.collectors:
            c.run(now)

    def wait(self, poller) -> None:
        for c in self.collectors:
            c.wait(poller)

    def next_retry(self) -> Optional[float]:
        """When ``retry`` or a stream's reconnection next has work (s),
        or None."""
        times = [w for _, w in self._pending.values()]
        times.extend(d for d in (c.next_deadline() for c in self.collectors)
                     if d is not None)
        return min(times, default=None)

    def set_buffer_size(self, size: int) -> None:
        self.buffer_size = size
        for c in self.collectors:
            c.set_buffer_size(size)

    def reopen(self) -> None:
        """Files start anew (log rotation); sockets are left alone."""
        for c in self.collectors:
            c.reopen()

    def __len__(self) -> int:
        return len(self.collectors)

    def send(self, data: bytes) -> Tuple[int, int]:
        """Send to every collector: returns (sent or queued, failed)."""
        ok = err = 0
        for c in self.collectors:
            if c.send(data):
                ok += 1
            else:
                err += 1
        return ok, err

    def close(self) -> None:
        for c in self.collectors:
            c.close()
        self.collectors = []

    def find(self, spec: str) -> Optional[Transport]:
        for c in self.collectors:
            if c.spec == spec:
                return c
        return None

    def describe(self) -> List[str]:
        """One line of counters per transport, for ipfix/show."""
        return [c.describe() for c in self.collectors]
