"""Transports: how one exporter's messages reach one target.

Every target of ``IPFIX.targets`` becomes one :class:`Transport`:

- ``udp.UdpTransport`` (``IP:PORT`` or ``udp:IP:PORT``): one connected
  UDP socket, each message one datagram, the exporter's sequence numbers
  as they are;
- ``tcp.TcpTransport`` (``tcp:IP:PORT``) and ``tls.TlsTransport``
  (``tls:IP:PORT``): one connection, opened without blocking, messages
  back to back on the stream (RFC 7011 section 10.4);
- ``file.FileTransport`` (``file:/absolute/path``): an RFC 5655 file,
  messages appended.

The last three are reliable streams and share ``stream.StreamTransport``:
a transport session of their own (sequence numbers per session and
domain, templates first in each session), a bounded buffer while the
peer is away, reconnection with backoff.

The interface, in the OVS manner (every part offers run and wait):

``send(msg) -> bool``
    Hand over one ``message.Message``.  False: it is lost (counted by
    the transport; the caller counts its records as not sent).  True:
    sent, or queued; a queued message lost later is reported through
    the ``on_lost(msg)`` callback given at construction.
``run(now)`` / ``wait(poller)`` / ``next_deadline()``
    Progress (connect, handshake, write what is queued, notice a peer
    that went away) and what the poll loop must wait for (fds, a timer,
    in seconds on the clock of ``now``).
``reopen()``
    Start a new file (log rotation); nothing for sockets.
``close()``
    Last best-effort write of what is queued, then release everything.
``describe()``
    One line of counters for ``ipfix/show``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

#: Called with a message that was accepted by ``send`` and later lost.
LostCallback = Callable[[object], None]


class TargetError(ValueError):
    """A target that does not parse or resolve.

    ``transient``: worth trying again later (name resolution, socket
    set-up); a target that does not parse never is.
    """

    transient = False


class TransientTargetError(TargetError):
    transient = True


class Target(NamedTuple):
    """A parsed target: ``transport`` is "udp", "tcp", "tls" or "file";
    ``host``/``port`` for the first three, ``path`` for a file."""

    spec: str
    host: str
    port: int
    transport: str = "udp"
    path: Optional[str] = None


class Transport:
    """What every transport offers (see the module docstring).

    Counters: ``tx_packets`` messages and ``tx_bytes`` bytes written,
    ``tx_errors`` failed sends and failed connection attempts,
    ``dropped_records`` data records lost (buffer full, connection lost
    in the middle of a message).
    """

    kind = ""

    def __init__(self, target):
        self.target = target
        self.tx_packets = 0
        self.tx_bytes = 0
        self.tx_errors = 0
        self.dropped_records = 0

    @property
    def spec(self) -> str:
        return self.target.spec

    @property
    def connected(self) -> bool:
        return True

    @property
    def buffered_messages(self) -> int:
        return 0

    @property
    def buffered_records(self) -> int:
        return 0

    def send(self, data) -> bool:
        raise NotImplementedError

    def run(self, now: float) -> None:
        pass

    def wait(self, poller) -> None:
        pass

    def next_deadline(self) -> Optional[float]:
        return None

    def set_buffer_size(self, size: int) -> None:
        pass

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return ("%s: %s, tx %d msgs %d bytes, errs %d, buffered %d msgs "
                "(%d records), dropped %d records"
                % (self.spec, self.state_name(), self.tx_packets,
                   self.tx_bytes, self.tx_errors, self.buffered_messages,
                   self.buffered_records, self.dropped_records))

    def state_name(self) -> str:
        return "connected" if self.connected else "not connected"
