"""Export targets and their sockets.

Targets are written as OVS writes them in ``IPFIX.targets``:
``IP:PORT``, ``[IPv6]:PORT``, ``host:PORT``, or an address or host with
no port (default 4739, the IPFIX port of RFC 7011 section 10.3.4).  Each
target gets one connected UDP socket.  A target that does not parse or
resolve is logged and skipped; the others work.  A send that fails
(ECONNREFUSED after an ICMP port unreachable, ENOBUFS, EAGAIN) is counted
as a transmit error and never stops the other collectors.
"""

from __future__ import annotations

import errno
import re
import socket
from types import SimpleNamespace
from typing import Dict, List, NamedTuple, Optional, Tuple

import netaddr
import tenacity

from ovs_ipfix_py.options import DEFAULT_COLLECTOR_PORT
from ovs_ipfix_py.ratelimit import RateLimitedLog

log = RateLimitedLog("collector")


#: The largest UDP payload over IPv4 (65535 - 20 - 8): no IPFIX message
#: may be larger, whatever max-message-size says.
MAX_UDP_PAYLOAD = 65507


class TargetError(ValueError):
    """A target that does not parse or resolve.

    ``transient``: worth trying again later (name resolution, socket
    set-up); a target that does not parse never is.
    """

    transient = False


class TransientTargetError(TargetError):
    transient = True


class Target(NamedTuple):
    spec: str
    host: str
    port: int


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
    """``split_target`` as a Target; TargetError names the target."""
    try:
        host, port = split_target(spec)
    except TargetError as e:
        raise TargetError("target %r: %s" % (spec, e)) from None
    return Target(spec, host, port)


class Collector:
    """One connected UDP socket to one target.

    Raises TargetError when the target does not parse or resolve.
    ``tx_packets`` / ``tx_errors`` count messages sent and failed.
    """

    def __init__(self, spec: str):
        self.target = parse_target(spec)
        try:
            infos = socket.getaddrinfo(self.target.host, self.target.port,
                                       type=socket.SOCK_DGRAM)
        except (socket.gaierror, UnicodeError) as e:
            raise TransientTargetError("target %r does not resolve: %s"
                                       % (spec, e)) from None
        if not infos:
            raise TransientTargetError("target %r does not resolve" % spec)
        family, _, proto, _, address = infos[0]
        self.address = address
        try:
            self.sock = socket.socket(family, socket.SOCK_DGRAM, proto)
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS,
                           errno.ENOMEM):
                raise   # a shortage: the reconciler retries the exporter
            # E.g. no IPv6 on this host: only this target is affected.
            raise TransientTargetError("target %r: cannot open a socket: %s"
                                       % (spec, e)) from None
        self.sock.setblocking(False)
        try:
            self.sock.connect(address)
        except OSError as e:
            self.sock.close()
            raise TransientTargetError("target %r: cannot connect: %s"
                                       % (spec, e)) from None
        self.tx_packets = 0
        self.tx_errors = 0

    @property
    def spec(self) -> str:
        return self.target.spec

    def send(self, data: bytes) -> bool:
        """Send one message; False (counted, logged) when it failed."""
        try:
            self.sock.send(data)
        except OSError as e:
            self.tx_errors += 1
            log.warn("send to %s failed: %s", self.spec,
                     errno.errorcode.get(e.errno, e))
            return False
        self.tx_packets += 1
        return True

    def close(self) -> None:
        self.sock.close()


class CollectorSet:
    """The collectors of one exporter; bad targets logged and skipped.

    A target that failed for a transient reason (it did not resolve, its
    socket could not be opened) is tried again by ``retry(now)``, backing
    off exponentially from 1 s to 60 s (tenacity's wait_exponential), so
    a collector whose name resolves later is picked up without a
    configuration change.  ``next_retry()`` gives the time (s) of the
    next attempt for a poll loop's timer.
    """

    BACKOFF = tenacity.wait_exponential(multiplier=1, min=1, max=60)

    def __init__(self, targets: Tuple[str, ...], now: float = 0.0):
        self.targets = tuple(targets)
        self.collectors: List[Collector] = []
        self.bad_targets: List[Tuple[str, str]] = []
        self._pending: Dict[str, List] = {}   # spec -> [attempts, when]
        for spec in self.targets:
            self._open(spec, now)

    def _open(self, spec: str, now: float) -> bool:
        try:
            collector = Collector(spec)
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

    def next_retry(self) -> Optional[float]:
        """When ``retry`` next has work (s), or None."""
        return min((w for _, w in self._pending.values()), default=None)

    def __len__(self) -> int:
        return len(self.collectors)

    def send(self, data: bytes) -> Tuple[int, int]:
        """Send to every collector: returns (sent, failed) counts."""
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

    def find(self, spec: str) -> Optional[Collector]:
        for c in self.collectors:
            if c.spec == spec:
                return c
        return None
