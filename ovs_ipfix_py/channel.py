"""The exporter's end of the userspace upcall channel.

A :class:`ChannelServer` owns one ``AF_UNIX``/``SOCK_DGRAM`` socket bound
at a path (format and reasons in ``schemas/channel.md``).  It fits the OVS
poll loop: :meth:`ChannelServer.run` reads what is queued without blocking
and hands the decoded upcalls to a handler; :meth:`ChannelServer.wait`
registers the socket with an ``ovs.poller.Poller``.  Malformed input is
counted, logged with a rate limit, and never disturbs the next datagram.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import time
from typing import Callable, Optional

import ovs.poller
import ovs.vlog

from ovs_ipfix_py import upcall
from ovs_ipfix_py.ratelimit import RateLimiter

vlog = ovs.vlog.Vlog("channel")

#: Asked for as the socket's receive buffer (bytes).  For Unix datagram
#: sockets the queue is mostly bounded by net.unix.max_dgram_qlen; a big
#: buffer costs nothing and helps where the kernel does count it.
RCVBUF_SIZE = 8 << 20


class ChannelError(OSError):
    """The channel socket cannot be set up (one-line message)."""


def _remove_stale(path: str) -> None:
    """Unlink a socket file nobody is bound to; refuse to touch a live
    socket or anything that is not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ChannelError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # stale: its owner is gone
        return
    except OSError as e:
        raise ChannelError(f"{path}: cannot probe the existing socket: "
                           f"{e.strerror}") from None
    finally:
        probe.close()
    raise ChannelError(f"{path} is in use by another running process")


class ChannelServer:
    """Receives upcall datagrams on the Unix socket at ``path``.

    ``handler(upcalls, now)`` gets the list of upcalls decoded from each
    datagram that held any, in arrival order; one :meth:`run` reads up
    to ``max_batch`` datagrams, and stops early once it has spent
    ``budget`` seconds (the handler's time included), so that the loop
    gets back to its timers, exports and OVSDB; it passes the same
    ``now`` (seconds, from ``now_fn``) with each.  Per datagram, not per
    run: the samples
    are aggregated while their frames are still in the CPU cache (one
    datagram is ~64 KiB; 256 of them are not).  An exception from the
    handler propagates to the caller of run().
    Raises :class:`ChannelError` if the socket cannot be set up.
    """

    def __init__(self, path: str,
                 handler: Callable[[list, float], None],
                 max_batch: int = 256, budget: float = 0.04):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.path = path
        self.max_batch = max_batch
        self.budget = budget
        self._handler = handler
        self._datagrams = 0
        self._upcalls = 0
        self._malformed_datagrams = 0
        self._malformed_upcalls = 0
        self._ratelimit = RateLimiter()
        self._sock: Optional[socket.socket] = None
        _remove_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(path)
        except OSError as e:
            sock.close()
            raise ChannelError(f"cannot bind {path}: {e.strerror or e}"
                               ) from None
        try:
            st = os.stat(path)
            self._identity = (st.st_dev, st.st_ino)
            os.chmod(path, 0o660)
            sock.setblocking(False)
            _grow_rcvbuf(sock)
        except OSError as e:
            sock.close()
            _unlink(path)
            raise ChannelError(f"cannot set up {path}: {e.strerror or e}"
                               ) from None
        self._sock = sock
        self._view = memoryview(bytearray(upcall.MAX_DATAGRAM_SIZE))

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def stats(self) -> dict:
        """Counters since start: datagrams and upcalls received,
        datagrams with any error, and upcalls lost to errors (as
        :func:`upcall.decode` counts them: a datagram dropped for a bad
        header counts 1)."""
        return {
            "datagrams": self._datagrams,
            "upcalls": self._upcalls,
            "malformed_datagrams": self._malformed_datagrams,
            "malformed_upcalls": self._malformed_upcalls,
        }

    def run(self, now_fn: Callable[[], float] = time.time) -> int:
        """Read up to ``max_batch`` queued datagrams without blocking (at
        least one, then more while ``budget`` seconds have not passed),
        decode them and pass their upcalls to the handler.  Returns the
        number of datagrams read."""
        sock = self._sock
        if sock is None:
            return 0
        # recv_into a preallocated buffer, then one copy: recv(256 KiB)
        # would allocate and trim a fresh 256 KiB object per datagram,
        # which costs more (measured ~40 us) than copying 64 KiB.
        recv_into = sock.recv_into
        view = self._view
        decode = upcall.decode
        handler = self._handler
        problems: list = []
        n = 0
        now = None
        clock = time.monotonic
        deadline = clock() + self.budget
        while n < self.max_batch:
            # A datagram of 64 KiB holds ~1,000 samples: 256 of them at
            # full load took 380 ms in one piece (tools/soak).
            if n and clock() >= deadline:
                break
            try:
                size = recv_into(view)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self._warn(f"{self.path}: receive failed: {e.strerror}")
                break
            n += 1
            data = view[:size].tobytes()
            got, errors = decode(data, problems)
            if errors:
                self._malformed_datagrams += 1
                self._malformed_upcalls += errors
                self._warn(f"{self.path}: malformed datagram of "
                           f"{len(data)} bytes ({errors} upcalls lost): "
                           f"{problems[0]}")
                problems.clear()
            if got:
                self._upcalls += len(got)
                if now is None:
                    now = now_fn()
                handler(got, now)
        self._datagrams += n
        return n

    def wait(self, poller) -> None:
        """Wake ``poller`` when a datagram is queued."""
        if self._sock is not None:
            poller.fd_wait(self._sock.fileno(), ovs.poller.POLLIN)

    def close(self) -> None:
        """Close the socket and remove its path (if it is still ours).
        Idempotent."""
        if self._sock is None:
            return
        self._sock.close()
        self._sock = None
        try:
            st = os.lstat(self.path)
        except OSError:
            return
        if (st.st_dev, st.st_ino) == self._identity:
            _unlink(self.path)

    def _warn(self, message: str) -> None:
        if self._ratelimit.allow():
            suppressed = self._ratelimit.take_suppressed()
            if suppressed:
                message += (f" ({suppressed} similar messages suppressed "
                            "by rate limit)")
            vlog.warn(message)


def _grow_rcvbuf(sock: socket.socket) -> None:
    # SO_RCVBUFFORCE passes rmem_max when privileged; else best effort.
    force = getattr(socket, "SO_RCVBUFFORCE", None)
    if force is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, RCVBUF_SIZE)
            return
        except OSError:
            pass
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_SIZE)
    except OSError:
        pass


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as e:
        if e.errno != errno.ENOENT:
            vlog.warn(f"{path}: cannot remove: {e.strerror}")
