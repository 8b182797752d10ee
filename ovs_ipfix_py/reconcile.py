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

One exporter failing to build (say every target is bad) never affects
another.
"""

from __future__ import annotations

from typing import Callable, Dict, Hashable, NamedTuple, Tuple

from ovs_ipfix_py.exporter import Exporter
from ovs_ipfix_py.ratelimit import RateLimitedLog

log = RateLimitedLog("reconcile")


class Changes(NamedTuple):
    created: Tuple
    changed: Tuple
    removed: Tuple

    def __bool__(self) -> bool:
        return bool(self.created or self.changed or self.removed)


class Reconciler:
    """Owns the running exporters, keyed by ``options.key``."""

    def __init__(self, factory: Callable = Exporter):
        self.factory = factory
        self.exporters: Dict[Hashable, Exporter] = {}

    def apply(self, desired: Dict[Hashable, object], now: float) -> Changes:
        created, changed, removed = [], [], []
        for key in [k for k in self.exporters if k not in desired]:
            exporter = self.exporters.pop(key)
            try:
                exporter.close(now)
            except Exception as e:  # never let one exporter stop the rest
                log.err("closing %s failed: %s", exporter.name, e)
            removed.append(key)
            log.info("removed exporter %s", exporter.name)
        for key, options in desired.items():
            exporter = self.exporters.get(key)
            try:
                if exporter is None:
                    self.exporters[key] = self.factory(options, now)
                    created.append(key)
                    log.info("created exporter %s", options.name)
                elif exporter.options != options:
                    exporter.reconfigure(options, now)
                    changed.append(key)
                    log.info("reconfigured exporter %s", options.name)
            except Exception as e:
                log.err("exporter %s: %s", options.name, e)
        return Changes(tuple(created), tuple(changed), tuple(removed))

    def close(self, now: float) -> None:
        """Flush and close every exporter (at exit)."""
        self.apply({}, now)
