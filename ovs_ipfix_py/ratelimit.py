"""Rate-limited logging on top of ``ovs.vlog``.

Bad input can arrive thousands of times a second; each kind of message
is logged at most ``burst`` times per ``interval`` seconds, and the
next message that gets through says how many were suppressed (as OVS's
VLOG_RATE_LIMIT does in C).
"""

from __future__ import annotations

import time

import ovs.vlog


class RateLimitedLog:
    """A ``ovs.vlog.Vlog`` whose warn/err/info calls are rate-limited.

    Limits apply per format string, so one noisy message does not mute
    the others.
    """

    def __init__(self, module: str, burst: int = 5, interval: float = 5.0):
        self.vlog = ovs.vlog.Vlog(module)
        self.burst = burst
        self.interval = interval
        self._windows = {}   # fmt -> [window start, count, suppressed]

    def _allow(self, fmt: str) -> int:
        """-1 if suppressed, else how many were suppressed before."""
        now = time.monotonic()
        w = self._windows.get(fmt)
        if w is None or now - w[0] >= self.interval:
            suppressed = w[2] if w else 0
            self._windows[fmt] = [now, 1, 0]
            return suppressed
        if w[1] < self.burst:
            w[1] += 1
            return 0
        w[2] += 1
        return -1

    def _log(self, fn, fmt, args):
        suppressed = self._allow(fmt)
        if suppressed < 0:
            return
        msg = fmt % args if args else fmt
        if suppressed:
            msg += " (%d similar messages suppressed)" % suppressed
        fn(msg)

    def warn(self, fmt: str, *args) -> None:
        self._log(self.vlog.warn, fmt, args)

    def err(self, fmt: str, *args) -> None:
        self._log(self.vlog.err, fmt, args)

    def info(self, fmt: str, *args) -> None:
        self._log(self.vlog.info, fmt, args)

    def dbg(self, fmt: str, *args) -> None:
        self._log(self.vlog.dbg, fmt, args)
