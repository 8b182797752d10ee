"""Desired exporter options vs running exporters.

``apply(desired, now)`` makes the running set match ``desired`` (a dict
from ``options.key`` to option values, as ``config.ConfigReader``
builds it):

- a key not running yet gets a new exporter;
- a running key no longer desired is flushed as forced end to its
  collectors, then closed;
- a key whose options changed (compared with ``==``) is flushed as
  forced end to its current collectors, then takes the new options
  (``Exporter.reconfigure``);
- an unchanged key is not touched: cache, sockets and sequence numbers
  stay as they are.

One exporter failing to build or to take new options (a socket that
cannot be opened: EMFILE, ENOBUFS) never affects another.  Bad targets
are not failures: the collector layer skips them.  A failed key is
kept in ``failed`` (key -> error text) and built afresh by ``retry``,
which the loop calls every turn; it acts at most every
``RETRY_INTERVAL`` s (``next_retry`` gives the loop its timer).  An
exporter that failed half-way through taking new options is in no
known state, so it is closed and built afresh too.

With ``sliced`` (the daemon's choice) nothing is sent in one piece: a
changed exporter's flush goes out over its next ``run`` calls (see
``Exporter.flush``), and a removed exporter moves to ``retiring``, where
the loop keeps running it until its last flows are sent
(``run_retiring``), and only then is it closed.  ``close`` (at exit)
sends everything at once.
"""

from __future__ import annotations

from typing import (
    Callable,
    Dict,
    Hashable,
    List,
    NamedTuple,
    Optional,
    Tuple,
)

import ovs.vlog

from ovs_ipfix_py.exporter import Exporter
from ovs_ipfix_py.ratelimit import RateLimitedLog

# Lifecycle lines are few and all worth keeping; errors are rate-limited.
vlog = ovs.vlog.Vlog("reconcile")
log = RateLimitedLog("reconcile")

#: Seconds between attempts to build an exporter that failed.
RETRY_INTERVAL = 5.0


class Changes(NamedTuple):
    created: Tuple
    changed: Tuple
    removed: Tuple

    def __bool__(self) -> bool:
        return bool(self.created or self.changed or self.removed)


class Reconciler:
    """Owns the running exporters, keyed by ``options.key``."""

    def __init__(self, factory: Callable = Exporter, sliced: bool = False):
        self.factory = factory
        self.sliced = sliced
        self.exporters: Dict[Hashable, Exporter] = {}
        #: Removed exporters still sending their flushed flows (sliced).
        self.retiring: List[Exporter] = []
        self.failed: Dict[Hashable, str] = {}
        self.desired: Dict[Hashable, object] = {}
        self._retry_at: Optional[float] = None

    def apply(self, desired: Dict[Hashable, object], now: float) -> Changes:
        created, changed, removed = [], [], []
        self.desired = dict(desired)
        self.failed = {k: v for k, v in self.failed.items() if k in desired}
        for key in [k for k in self.exporters if k not in desired]:
            exporter = self.exporters.pop(key)
            if self.sliced:
                self._retire(exporter, now)
            else:
                self._close(exporter, now)
            removed.append(key)
            vlog.info("removed exporter %s" % exporter.name)
        for key, options in desired.items():
            exporter = self.exporters.get(key)
            try:
                if exporter is None:
                    self.exporters[key] = self.factory(options, now)
                    created.append(key)
                    vlog.info("created exporter %s" % options.name)
                elif exporter.options != options:
                    if self.sliced:
                        exporter.reconfigure(options, now, sliced=True)
                    else:
                        exporter.reconfigure(options, now)
                    changed.append(key)
                    vlog.info("reconfigured exporter %s" % options.name)
                else:
                    continue
                self.failed.pop(key, None)
            except Exception as e:  # never let one exporter stop the rest
                if exporter is not None:
                    # Half reconfigured: rebuild it from scratch.
                    del self.exporters[key]
                    self._close(exporter, now)
                self.failed[key] = str(e)
                log.err("exporter %s: %s (retrying in %.0f s)",
                        options.name, e, RETRY_INTERVAL)
        self._retry_at = now + RETRY_INTERVAL if self.failed else None
        return Changes(tuple(created), tuple(changed), tuple(removed))

    def retry(self, now: float) -> Changes:
        """Build the exporters that failed, if their retry is due."""
        if self._retry_at is None or now < self._retry_at:
            return Changes((), (), ())
        return self.apply(self.desired, now)

    def next_retry(self) -> Optional[float]:
        """When ``retry`` next has work (s, the clock of ``now``)."""
        return self._retry_at

    def _retire(self, exporter, now: float) -> None:
        try:
            exporter.flush(now, sliced=True)
        except Exception as e:  # never let one exporter stop the rest
            log.err("flushing %s failed: %s", exporter.name, e)
        self.retiring.append(exporter)

    def run_retiring(self, now: float) -> None:
        """Send a slice more of each retiring exporter's flows; close
        those that have sent everything."""
        for exporter in list(self.retiring):
            try:
                exporter.run(now)
                done = exporter.idle()
            except Exception as e:  # never let one exporter stop the rest
                log.err("retiring %s failed: %s", exporter.name, e)
                done = True
            if done:
                self.retiring.remove(exporter)
                self._close(exporter, now)

    @staticmethod
    def _close(exporter, now: float) -> None:
        try:
            exporter.close(now)
        except Exception as e:  # never let one exporter stop the rest
            log.err("closing %s failed: %s", exporter.name, e)

    def close(self, now: float) -> None:
        """Flush and close every exporter, retiring ones included, each
        in one piece (at exit)."""
        sliced, self.sliced = self.sliced, False
        try:
            self.apply({}, now)
            for exporter in self.retiring:
                self._close(exporter, now)
            self.retiring = []
        finally:
            self.sliced = sliced
