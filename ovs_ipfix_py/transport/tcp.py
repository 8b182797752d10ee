"""TCP (RFC 7011 section 10.4): one connection per target.

Connected without blocking the loop: a non-blocking ``connect`` (the
loop waits for POLLOUT, then reads SO_ERROR).  Once connected the loop
also waits for POLLIN on the socket: a collector sends nothing (RFC
7011 section 10.4.1), so readable means it closed (0 bytes read) or
reset the connection, noticed at once rather than at the next write.
Anything a collector does send is read and discarded.  Writes never
block: what the kernel does not take waits for POLLOUT.
"""

from __future__ import annotations

import errno
import os
import select
import socket

from ovs_ipfix_py.transport.stream import (
    CONNECTING,
    DEFAULT_BUFFER_SIZE,
    StreamTransport,
)
from ovs_ipfix_py.transport.udp import resolve

#: Seconds a closing transport may block to write what is queued.
FINAL_FLUSH_TIMEOUT = 1.0
_IN_PROGRESS = (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN,
                errno.EALREADY)


class TcpTransport(StreamTransport):
    """A TCP connection to one target; TransientTargetError when the
    target does not resolve."""

    kind = "tcp"

    def __init__(self, target, buffer_size: int = DEFAULT_BUFFER_SIZE,
                 on_lost=None):
        super().__init__(target, buffer_size, on_lost)
        self.family, self.proto, self.address = resolve(
            target, socket.SOCK_STREAM)
        self.sock = None

    def _start(self) -> bool:
        self.sock = socket.socket(self.family, socket.SOCK_STREAM,
                                  self.proto)
        self.sock.setblocking(False)
        err = self.sock.connect_ex(self.address)
        if err == 0:
            return self._connected()
        if err in _IN_PROGRESS:
            return False
        raise OSError(err, os.strerror(err))

    def _progress(self) -> bool:
        p = select.poll()
        p.register(self.sock, select.POLLOUT)
        if not p.poll(0):
            return False
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
        return self._connected()

    def _connected(self) -> bool:
        """The TCP connection is up: True if the session is (TLS has a
        handshake to do first)."""
        return True

    def _write(self, data) -> int:
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return 0

    def _peer_gone(self) -> bool:
        for _ in range(16):
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return False
            if not data:
                return True
        return False

    def _events(self) -> int:
        if self.state == CONNECTING:
            return select.POLLOUT
        return select.POLLIN | (select.POLLOUT if self._out else 0)

    def _fileno(self):
        return self.sock.fileno()

    def _final_flush(self) -> None:
        self.sock.settimeout(FINAL_FLUSH_TIMEOUT)
        self._flush()

    def _stop(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None
