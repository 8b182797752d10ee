"""The flow cache: samples aggregated into flows, and their expiry.

Flows are keyed by their encoded key bytes (observation domain and
template id first, then the data record's key part), so export writes
the key out as it is.  Aggregates live in parallel typed arrays indexed
by a slot number: about 60 bytes a flow instead of several hundred for
a list of Python ints, which keeps a million-flow cache near 200 bytes
a flow in all.

Expiry follows OVS's dpif_ipfix_cache_expire(): flows leave oldest
started first, so a FIFO of keys in start order is all the index
expiry needs.  It stops at the first flow that is still young, so its
cost follows what expires, not the cache's size.  Reasons (RFC 7012
flowEndReason): active timeout when the flow started at least
``active_timeout`` s ago, lack of resources while the cache holds more
than ``max_flows`` flows, forced end on flush.  As in OVS,
``max_flows`` 0 leaves no room at all: each sample leaves at once
(reason active timeout when ``active_timeout`` is 0, else lack of
resources).

Times are seconds (float) on the caller's clock; nothing here reads a
clock.
"""

from __future__ import annotations

from array import array
from collections import deque
from typing import List, NamedTuple, Optional

# flowEndReason values (RFC 7012, IANA registry).
IDLE_TIMEOUT = 1
ACTIVE_TIMEOUT = 2
END_OF_FLOW_DETECTED = 3
FORCED_END = 4
LACK_OF_RESOURCES = 5

U64_MAX = 0xFFFFFFFFFFFFFFFF
U32_MAX = 0xFFFFFFFF


class ExpiredFlow(NamedTuple):
    """A flow leaving the cache.  Times in seconds, lengths in bytes.

    ``octets`` counts IP octets (0 for non-IP flows), ``l2_octets``
    whole frames; ``min_len``/``max_len`` are IP total lengths.
    """

    key: bytes
    start: float
    end: float
    packets: int
    l2_octets: int
    octets: int
    sumsq: int
    min_len: int
    max_len: int
    tcp_flags: int
    reason: int


class FlowCache:
    """Flows of one exporter, aggregated and expired in start order.

    ``active_timeout`` in seconds, ``max_flows`` a count (see the module
    docstring for 0).  Expired flows accumulate in ``expired`` until the
    caller takes them with ``take_expired()``.
    """

    def __init__(self, active_timeout: int = 0, max_flows: int = 0,
                 initial_slots: int = 1024):
        self.active_timeout = active_timeout
        self.max_flows = max_flows
        self.index = {}          # key -> slot
        self.order = deque()     # keys, oldest started first
        self.expired: List[ExpiredFlow] = []
        self._free: List[int] = []
        self._next_slot = 0
        self._capacity = 0
        self.start = array("d")
        self.end = array("d")
        self.packets = array("Q")
        self.l2_octets = array("Q")
        self.octets = array("Q")
        self.sumsq = array("Q")
        self.min_len = array("I")
        self.max_len = array("I")
        self.tcp_flags = array("H")
        self._grow(initial_slots)

    def __len__(self) -> int:
        return len(self.index)

    def _grow(self, extra: int) -> None:
        for a in (self.start, self.end, self.packets, self.l2_octets,
                  self.octets, self.sumsq, self.min_len, self.max_len,
                  self.tcp_flags):
            a.frombytes(bytes(extra * a.itemsize))
        self._capacity += extra

    def _new_slot(self) -> int:
        if self._free:
            return self._free.pop()
        if self._next_slot == self._capacity:
            self._grow(max(1024, self._capacity))
        slot = self._next_slot
        self._next_slot += 1
        return slot

    def add(self, key: bytes, now: float, count: int, frame_len: int,
            ip_len: int, tcp_flags: int) -> bool:
        """Aggregate one sample that stands for ``count`` packets.

        ``frame_len`` and ``ip_len`` (0 for non-IP) in bytes.  Returns
        True when the sample started a new flow.
        """
        slot = self.index.get(key)
        if slot is not None:
            self.end[slot] = now
            try:
                self.packets[slot] += count
            except OverflowError:
                self.packets[slot] = U64_MAX
            try:
                self.l2_octets[slot] += count * frame_len
            except OverflowError:
                self.l2_octets[slot] = U64_MAX
            if ip_len:
                # Each counter saturates on its own: a sum of squares
                # that overflows must not add the sample twice to the
                # counters that did not.
                octets = count * ip_len
                try:
                    self.octets[slot] += octets
                except OverflowError:
                    self.octets[slot] = U64_MAX
                try:
                    self.sumsq[slot] += octets * ip_len
                except OverflowError:
                    self.sumsq[slot] = U64_MAX
            if ip_len < self.min_len[slot]:
                self.min_len[slot] = ip_len
            if ip_len > self.max_len[slot]:
                self.max_len[slot] = ip_len
            if tcp_flags:
                self.tcp_flags[slot] |= tcp_flags
            return False
        slot = self._new_slot()
        self.index[key] = slot
        self.order.append(key)
        self.start[slot] = now
        self.end[slot] = now
        octets = count * ip_len
        self.packets[slot] = min(U64_MAX, count)
        self.l2_octets[slot] = min(U64_MAX, count * frame_len)
        self.octets[slot] = min(U64_MAX, octets)
        self.sumsq[slot] = min(U64_MAX, octets * ip_len)
        self.min_len[slot] = ip_len
        self.max_len[slot] = ip_len
        self.tcp_flags[slot] = tcp_flags
        if len(self.index) > self.max_flows:
            self.expire(now)
        return True

    def _remove_oldest(self, reason: int) -> None:
        key = self.order.popleft()
        slot = self.index.pop(key)
        self.expired.append(ExpiredFlow(
            key, self.start[slot], self.end[slot], self.packets[slot],
            self.l2_octets[slot], self.octets[slot], self.sumsq[slot],
            self.min_len[slot], self.max_len[slot], self.tcp_flags[slot],
            reason))
        self._free.append(slot)

    def expire(self, now: float) -> int:
        """Expire what is due at ``now``; returns how many flows left."""
        n = 0
        order = self.order
        timeout = self.active_timeout
        start = self.start
        index = self.index
        while order:
            # Same sum as next_deadline(): "now - timeout >= start" can
            # round the other way, leaving a flow unexpired at its own
            # deadline (and a poll loop spinning on it).
            if start[index[order[0]]] + timeout <= now:
                reason = ACTIVE_TIMEOUT
            elif len(index) > self.max_flows:
                reason = LACK_OF_RESOURCES
            else:
                break
            self._remove_oldest(reason)
            n += 1
        if not order:
            self._reset_slots()
        return n

    def flush(self, now: float) -> int:
        """Expire every flow with reason forced end."""
        n = len(self.order)
        while self.order:
            self._remove_oldest(FORCED_END)
        self._reset_slots()
        return n

    def _reset_slots(self) -> None:
        # An empty cache reuses its slots from the start, which keeps
        # the arrays' used part compact.
        self._free.clear()
        self._next_slot = 0

    def next_deadline(self) -> Optional[float]:
        """When the oldest flow reaches its active timeout (s), or None."""
        if not self.order:
            return None
        return self.start[self.index[self.order[0]]] + self.active_timeout

    def take_expired(self) -> List[ExpiredFlow]:
        """The flows expired so far, oldest first; clears the list."""
        out = self.expired
        self.expired = []
        return out

    def memory_bytes(self) -> int:
        """Bytes held by the arrays and index structures (not keys)."""
        import sys
        arrays = sum(a.itemsize * len(a) for a in (
            self.start, self.end, self.packets, self.l2_octets,
            self.octets, self.sumsq, self.min_len, self.max_len,
            self.tcp_flags))
        return (arrays + sys.getsizeof(self.index)
                + sys.getsizeof(self.order))
