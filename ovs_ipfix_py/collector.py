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
import socket
from typing import List, NamedTuple, Optional, Tuple

import netaddr

from ovs_ipfix_py.options import DEFAULT_COLLECTOR_PORT
from ovs_ipfix_py.ratelimit import RateLimitedLog

log = RateLimitedLog("collector")


class TargetError(ValueError):
    """A target that does not parse or resolve."""


class Target(NamedTuple):
    spec: str
    host: str
    port: int


def parse_target(spec: str) -> Target:
    """Split a target string into host and port (netaddr checks IPs).

    Raises TargetError with a message naming the target.
    """
    s = spec.strip()
    if not s:
        raise TargetError("empty target")
    port = DEFAULT_COLLECTOR_PORT
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            raise TargetError("target %r: missing ']'" % spec)
        host = s[1:end]
        rest = s[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise TargetError("target %r: junk after ']'" % spec)
            port = _port(spec, rest[1:])
        if not netaddr.valid_ipv6(host):
            raise TargetError("target %r: %r is not an IPv6 address"
                              % (spec, host))
        return Target(spec, host, port)
    if s.count(":") > 1:
        # A bare IPv6 address, as OVS accepts.
        if not netaddr.valid_ipv6(s):
            raise TargetError("target %r: not an IPv6 address" % spec)
        return Target(spec, s, port)
    host, sep, p = s.partition(":")
    if sep:
        port = _port(spec, p)
    if not host:
        raise TargetError("target %r: no host" % spec)
    if not (netaddr.valid_ipv4(host, netaddr.INET_PTON)
            or _valid_hostname(host)):
        raise TargetError("target %r: %r is neither an IP address nor a"
                          " host name" % (spec, host))
    return Target(spec, host, port)


def _port(spec, text):
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise TargetError("target %r: bad port %r" % (spec, text))
    return int(text)


def _valid_hostname(host):
    if len(host) > 253 or host.replace(".", "").isdigit():
        return False
    labels = host.rstrip(".").split(".")
    return all(label and len(label) <= 63 and label[0] != "-"
               and all(c.isalnum() or c == "-" for c in label)
               for label in labels)


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
            raise TargetError("target %r does not resolve: %s"
                              % (spec, e)) from None
        if not infos:
            raise TargetError("target %r does not resolve" % spec)
        family, _, proto, _, address = infos[0]
        self.address = address
        self.sock = socket.socket(family, socket.SOCK_DGRAM, proto)
        self.sock.setblocking(False)
        try:
            self.sock.connect(address)
        except OSError as e:
            self.sock.close()
            raise TargetError("target %r: cannot connect: %s"
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
    """The collectors of one exporter; bad targets logged and skipped."""

    def __init__(self, targets: Tuple[str, ...]):
        self.targets = tuple(targets)
        self.collectors: List[Collector] = []
        self.bad_targets: List[Tuple[str, str]] = []
        for spec in self.targets:
            try:
                self.collectors.append(Collector(spec))
            except TargetError as e:
                self.bad_targets.append((spec, str(e)))
                log.warn("%s; skipped", e)

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
