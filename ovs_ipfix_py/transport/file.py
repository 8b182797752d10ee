"""IPFIX files (RFC 5655): messages appended back to back.

Each message is written whole with one ``write`` on an ``O_APPEND``
descriptor (no user-space buffering), so the file is readable as a
whole after every export.  A write that fails (disk full) is cut back
to the last whole message (``ftruncate``) and the file is retried with
the stream's backoff, the messages waiting in the buffer.

Each open file is a session of its own: every template first, sequence
numbers from 0 (RFC 5655 section 8.1: a file is a self-contained
collection of messages, readable without any other).  ``reopen()``
(``ovs-appctl ipfix/reopen``, SIGHUP: logrotate's ``postrotate``) closes
the file and opens the path again, so a renamed file is left complete
and a new one starts.  An existing file is appended to: a restart's new
session starts its sequence numbers again in the same file.  A path that
cannot be opened is logged (rate limited), counted in ``tx_errors`` and
retried.
"""

from __future__ import annotations

import os

from ovs_ipfix_py.transport.stream import (
    CLOSED,
    CONNECTED,
    DEFAULT_BUFFER_SIZE,
    StreamTransport,
)

#: Mode of a new file: flows are who talked to whom, not for everyone.
FILE_MODE = 0o640


class FileTransport(StreamTransport):
    """An RFC 5655 file at ``target.path`` (absolute)."""

    kind = "file"
    CONNECT_FAILED = "cannot open"

    def __init__(self, target, buffer_size: int = DEFAULT_BUFFER_SIZE,
                 on_lost=None):
        super().__init__(target, buffer_size, on_lost)
        self.path = target.path
        self.fd = None

    def _start(self) -> bool:
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND
                          | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        return True

    def _write(self, data) -> int:
        start = os.lseek(self.fd, 0, os.SEEK_END)
        done = 0
        try:
            while done < len(data):
                done += os.write(self.fd, data[done:])
        except OSError:
            try:
                os.ftruncate(self.fd, start)
            except OSError:
                pass
            raise
        return done

    def state_name(self) -> str:
        if self.state == CONNECTED:
            return "open"
        if self.last_error:
            return "not open (%s)" % self.last_error
        return "not open"

    def _fileno(self):
        return self.fd

    def _stop(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None

    def reopen(self) -> None:
        """Close the file, open the path again: a new session."""
        if self.state == CLOSED:
            return
        if self.state == CONNECTED:
            self._stop()
            self.state = "idle"
        self._retry_at = None
        self._attempts = 0
        self._connect(self._now)
