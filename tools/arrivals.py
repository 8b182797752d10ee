"""Datagrams with the kernel's arrival time (SO_TIMESTAMPNS), for the
benchmarks' collectors: time spent in the measuring process (waiting for
a child, parsing) does not count toward a measured latency."""

from __future__ import annotations

import select
import socket
import struct
import time
from typing import List, Tuple

#: The SO_TIMESTAMPNS cmsg carries a struct timespec (two native longs).
_TIMESPEC = struct.Struct("@ll")
_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)


def enable_timestamps(sock: socket.socket) -> None:
    """Have the kernel stamp each datagram ``sock`` receives."""
    sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)


def receive(sock: socket.socket, timeout: float
            ) -> List[Tuple[float, bytes]]:
    """Wait up to ``timeout`` s for a datagram on the non-blocking
    ``sock``, then read every one queued: ``[(arrival s since the epoch,
    bytes)]``, arrival from the kernel's stamp (this process's clock if
    there is none)."""
    out = []
    readable, _, _ = select.select([sock], [], [], timeout)
    if not readable:
        return out
    while True:
        try:
            data, ancdata, _, _ = sock.recvmsg(
                65535, socket.CMSG_SPACE(_TIMESPEC.size))
        except BlockingIOError:
            return out
        arrival = time.time()
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS:
                sec, nsec = _TIMESPEC.unpack(cdata[:_TIMESPEC.size])
                arrival = sec + nsec / 1e9
        out.append((arrival, data))
