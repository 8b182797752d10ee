"""UDP: one connected socket per target, one datagram per message.

The messages go out exactly as the exporter built them (its sequence
numbers: the whole exporting process is one UDP transport session per
collector, RFC 7011 section 10.3).  A send that fails (ECONNREFUSED
after an ICMP port unreachable, ENOBUFS, EAGAIN) is counted as a
transmit error and never stops the other collectors; nothing is
buffered (UDP is unreliable by contract: the record is counted as not
sent).
"""

from __future__ import annotations

import errno
import socket

from ovs_ipfix_py.ratelimit import RateLimitedLog
from ovs_ipfix_py.transport import Target, TransientTargetError, Transport

log = RateLimitedLog("collector")


def resolve(target: Target, kind: int):
    """getaddrinfo's first answer for ``target``: (family, proto,
    address); TransientTargetError when it does not resolve.  (Host
    names are resolved synchronously: README's known limitations.)"""
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=kind)
    except (socket.gaierror, UnicodeError) as e:
        raise TransientTargetError("target %r does not resolve: %s"
                                   % (target.spec, e)) from None
    if not infos:
        raise TransientTargetError("target %r does not resolve"
                                   % target.spec)
    family, _, proto, _, address = infos[0]
    return family, proto, address


def open_socket(target: Target, family: int, kind: int, proto: int):
    """A non-blocking socket; a shortage (EMFILE...) is raised as it is
    (the reconciler retries the exporter), any other failure (no IPv6
    on this host) as TransientTargetError for this target only."""
    try:
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS,
                       errno.ENOMEM):
            raise
        raise TransientTargetError("target %r: cannot open a socket: %s"
                                   % (target.spec, e)) from None
    sock.setblocking(False)
    return sock


class UdpTransport(Transport):
    """One connected UDP socket to one target.

    Raises TargetError when the target does not resolve or its socket
    cannot be set up.
    """

    kind = "udp"

    def __init__(self, target: Target):
        super().__init__(target)
        family, proto, address = resolve(target, socket.SOCK_DGRAM)
        self.address = address
        self.sock = open_socket(target, family, socket.SOCK_DGRAM, proto)
        try:
            self.sock.connect(address)
        except OSError as e:
            self.sock.close()
            raise TransientTargetError("target %r: cannot connect: %s"
                                       % (target.spec, e)) from None

    def send(self, data) -> bool:
        """Send one message; False (counted, logged) when it failed."""
        try:
            self.sock.send(data)
        except OSError as e:
            self.tx_errors += 1
            log.warn("send to %s failed: %s", self.spec,
                     errno.errorcode.get(e.errno, e))
            return False
        self.tx_packets += 1
        self.tx_bytes += len(data)
        return True

    def close(self) -> None:
        self.sock.close()

    def describe(self) -> str:
        return "%s: udp, tx %d msgs %d bytes, errs %d" % (
            self.spec, self.tx_packets, self.tx_bytes, self.tx_errors)
