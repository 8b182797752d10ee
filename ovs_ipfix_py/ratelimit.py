"""Rate-limited logging on top of ``ovs.vlog``.

Bad input can arrive thousands of times a second.  ``RateLimiter`` is a
token bucket in the manner of OVS's ``VLOG_RATE_LIMIT_INIT(rate,
burst)``; ``RateLimitedLog`` gives each message format its own bucket,
so one noisy message does not mute the others, and the next message
that gets through says how many were suppressed.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, Optional

import ovs.vlog


class RateLimiter:
    """A token bucket in the manner of OVS's ``VLOG_RATE_LIMIT_INIT(rate,
    burst)``: up to ``burst`` events at once, refilled at ``rate`` per
    minute.  ``ovs.vlog`` in Python has no rate limiting of its own.

    ``allow(now)`` (now in seconds, monotonic) says whether to log;
    refused events are counted, and :meth:`take_suppressed` returns and
    resets that count so the next message can mention it.
    """

    def __init__(self, rate: float = 5, burst: int = 20,
                 clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._last: Optional[float] = None
        self.suppressed = 0

    def allow(self, now: Optional[float] = None) -> bool:
        if now is None:
            now = self._clock()
        if self._last is None:
            self._last = now
        elif now > self._last:
            self._tokens = min(self.burst, self._tokens
                               + (now - self._last) * self.rate / 60.0)
            self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        self.suppressed += 1
        return False

    def take_suppressed(self) -> int:
        n = self.suppressed
        self.suppressed = 0
        return n


class RateLimitedLog:
    """A ``ovs.vlog.Vlog`` whose calls are rate-limited per format string
    (``burst`` at once, refilled at ``rate`` per minute)."""

    def __init__(self, module: str, rate: float = 5, burst: int = 5):
        self.vlog = ovs.vlog.Vlog(module)
        self.rate = rate
        self.burst = burst
        self._limiters: Dict[str, RateLimiter] = {}

    def _log(self, fn, fmt, args):
        limiter = self._limiters.get(fmt)
        if limiter is None:
            limiter = self._limiters[fmt] = RateLimiter(self.rate,
                                                        self.burst)
        if not limiter.allow():
            return
        msg = fmt % args if args else fmt
        suppressed = limiter.take_suppressed()
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
