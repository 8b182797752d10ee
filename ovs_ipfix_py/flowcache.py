"""The flow cache: samples aggregated into flows, and their expiry.

Flows are keyed by their encoded key bytes (observation domain and
template id first, then the data record's key part), so export writes
the key out as it is.  Aggregates live in three typed arrays, grouped
by flow and indexed by a slot number: 60 bytes a flow instead of
several hundred for a list of Python ints, which keeps a million-flow
cache under 250 bytes a flow in all.  The arrays are typed views of one
anonymous memory mapping, not heap blocks: a page is resident once a
flow has used it, and growing (a new mapping twice the size, the old
one unmapped) leaves no hole in the heap behind.

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

import mmap
from collections import deque
from typing import List, NamedTuple, Optional

from ovs_ipfix_py import fastpath

# flowEndReason values (RFC 7012, IANA registry).
IDLE_TIMEOUT = 1
ACTIVE_TIMEOUT = 2
END_OF_FLOW_DETECTED = 3
FORCED_END = 4
LACK_OF_RESOURCES = 5

#: Flows one new flow may expire (due by active timeout) beyond the
#: room it needs: a bound on the work one sample can cause.
INSERT_EXPIRE_LIMIT = 1024

U64_MAX = 0xFFFFFFFFFFFFFFFF
U32_MAX = 0xFFFFFFFF
#: Bytes of the arrays per slot: 2 doubles, 4 u64, 3 u32.
SLOT_BYTES = 2 * 8 + 4 * 8 + 3 * 4

# A typed memoryview refuses a value out of its range with ValueError
# (array.array: OverflowError); either means the counter saturates.
_OVERFLOW = (OverflowError, ValueError)


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
        # Grouped by flow so that a sample touches three cache lines,
        # not nine: times[2s:2s+2] = start, end (s);
        # counters[4s:4s+4] = packets, l2_octets, octets, sumsq;
        # small[3s:3s+3] = min_len, max_len, tcp_flags.
        # (memoryviews: indexing, slices and tolist() as arrays; growing
        # replaces them, so callers re-read them after _insert.)
        self.times = self.counters = self.small = None
        self._grow(max(1, initial_slots))

    def __len__(self) -> int:
        return len(self.index)

    def _grow(self, extra: int) -> None:
        """Room for ``extra`` more slots: a new mapping holding the three
        arrays, the used part copied over; the old one goes when its
        last view does."""
        cap = self._capacity + extra
        # Zero-filled by the kernel; pages untouched stay unallocated.
        buf = memoryview(mmap.mmap(-1, cap * SLOT_BYTES))
        t_end = cap * 16
        c_end = t_end + cap * 32
        times = buf[:t_end].cast("d")
        counters = buf[t_end:c_end].cast("Q")
        small = buf[c_end:].cast("I")
        used = self._next_slot
        if used:
            times[:2 * used] = self.times[:2 * used]
            counters[:4 * used] = self.counters[:4 * used]
            small[:3 * used] = self.small[:3 * used]
        self.times, self.counters, self.small = times, counters, small
        self._capacity = cap

    def add(self, key: bytes, now: float, count: int, frame_len: int,
            ip_len: int, tcp_flags: int) -> bool:
        """Aggregate one sample that stands for ``count`` packets.

        ``frame_len`` and ``ip_len`` (0 for non-IP) in bytes.  Returns
        True when the sample started a new flow.
        """
        return self.add_many(((key, count, frame_len, ip_len, tcp_flags),),
                             now) == 1

    def add_many(self, samples, now: float) -> int:
        """Aggregate (key, count, frame_len, ip_len, tcp_flags) samples,
        in order, all at ``now``; returns how many started a new flow.

        This loop is the exporter's hot path: the arrays and the index
        are local names here, and a sample of a cached flow costs one
        dict lookup and a few array updates.
        """
        index_get = self.index.get
        times = self.times
        counters = self.counters
        small = self.small
        new = 0
        for key, count, frame_len, ip_len, tcp_flags in samples:
            slot = index_get(key)
            if slot is None:
                self._insert(key, now, count, frame_len, ip_len, tcp_flags)
                new += 1
                # _insert may have grown the arrays (new views).
                times = self.times
                counters = self.counters
                small = self.small
                continue
            times[(slot << 1) + 1] = now
            c = slot << 2
            # Each counter saturates at 2^64-1 on its own: a sum of
            # squares that overflows must not add the sample twice to
            # the counters that did not (try costs nothing until raised).
            try:
                counters[c] += count
            except _OVERFLOW:
                counters[c] = U64_MAX
            try:
                counters[c + 1] += count * frame_len
            except _OVERFLOW:
                counters[c + 1] = U64_MAX
            if ip_len:
                octets = count * ip_len
                try:
                    counters[c + 2] += octets
                except _OVERFLOW:
                    counters[c + 2] = U64_MAX
                try:
                    counters[c + 3] += octets * ip_len
                except _OVERFLOW:
                    counters[c + 3] = U64_MAX
            m = slot * 3
            if ip_len < small[m]:
                small[m] = ip_len
            elif ip_len > small[m + 1]:
                small[m + 1] = ip_len
            if tcp_flags:
                small[m + 2] |= tcp_flags
        return new

    def _insert(self, key, now, count, frame_len, ip_len, tcp_flags):
        """A new flow (the arguments as add()); expires what no longer
        fits.  Item by item, no temporaries: a cache filling with new
        flows spends its time here."""
        free = self._free
        if free:
            slot = free[-1]
        else:
            slot = self._next_slot
            if slot == self._capacity:
                self._grow(max(1024, self._capacity))
        # What can fail (a MemoryError) first, undone if the next step
        # fails: the cache stays as it was (_fastpath.c does the same).
        order = self.order
        order.append(key)
        index = self.index
        try:
            index[key] = slot
        except BaseException:
            order.pop()
            raise
        if free:
            free.pop()
        else:
            self._next_slot = slot + 1
        times = self.times
        t = slot << 1
        times[t] = now
        times[t + 1] = now
        counters = self.counters
        c = slot << 2
        counters[c] = count if count < U64_MAX else U64_MAX
        v = count * frame_len
        counters[c + 1] = v if v < U64_MAX else U64_MAX
        octets = count * ip_len
        counters[c + 2] = octets if octets < U64_MAX else U64_MAX
        v = octets * ip_len
        counters[c + 3] = v if v < U64_MAX else U64_MAX
        small = self.small
        m = slot * 3
        small[m] = ip_len
        small[m + 1] = ip_len
        small[m + 2] = tcp_flags
        if len(index) > self.max_flows:
            # At most INSERT_EXPIRE_LIMIT flows (more only to make room):
            # a burst of flows due by their active timeout leaves on the
            # exporter's next run(), in slices, instead of holding up the
            # sample that found it.
            self.expire(now, max(INSERT_EXPIRE_LIMIT,
                                 len(index) - self.max_flows))

    def _record(self, key, slot: int, reason: int) -> ExpiredFlow:
        """The flow in ``slot`` as it leaves (the cache is unchanged)."""
        t = slot << 1
        c = slot << 2
        m = slot * 3
        times = self.times
        counters = self.counters
        small = self.small
        return ExpiredFlow(
            key, times[t], times[t + 1], counters[c], counters[c + 1],
            counters[c + 2], counters[c + 3], small[m], small[m + 1],
            small[m + 2], reason)

    def _remove_oldest(self, reason: int) -> None:
        key = self.order.popleft()
        slot = self.index.pop(key)
        self.expired.append(self._record(key, slot, reason))
        self._free.append(slot)

    def take_oldest(self, limit: int, reason: int) -> List[ExpiredFlow]:
        """Remove up to ``limit`` flows, oldest first, with ``reason``,
        and return them (``expired`` is not involved): how the exporter
        sends a cache it has detached (a flush) a slice at a time; the
        cache's memory goes with its flows, a slice at a time too.
        (Records built in one C pass, ``expired_flows``, when the
        extension is built.)"""
        order = self.order
        index = self.index
        popleft = order.popleft
        keys = [popleft() for _ in range(min(limit, len(order)))]
        slots = list(map(index.pop, keys))
        self._free.extend(slots)
        if fastpath.C is not None:
            out = fastpath.C.expired_flows(
                ExpiredFlow, keys, slots, self.times, self.counters,
                self.small, reason)
        else:
            record = self._record
            out = [record(k, s, reason) for k, s in zip(keys, slots)]
        if not order:
            self._reset_slots()
        return out

    def expire(self, now: float, limit: Optional[int] = None) -> int:
        """Expire what is due at ``now``, oldest first, at most ``limit``
        flows (None: all); returns how many flows left.  What is left
        due stays due: ``next_deadline()`` is then not after ``now``."""
        n = 0
        if limit is None:
            limit = -1
        order = self.order
        timeout = self.active_timeout
        times = self.times
        index = self.index
        while order and n != limit:
            # Same sum as next_deadline(): "now - timeout >= start" can
            # round the other way, leaving a flow unexpired at its own
            # deadline (and a poll loop spinning on it).
            if times[index[order[0]] << 1] + timeout <= now:
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
        if fastpath.C is None:
            while self.order:
                self._remove_oldest(FORCED_END)
        else:
            # _remove_oldest for every flow in one C pass; the index and
            # the order are emptied at the end, not one entry at a time.
            keys = list(self.order)
            self.expired += fastpath.C.expired_flows(
                ExpiredFlow, keys, list(map(self.index.__getitem__, keys)),
                self.times, self.counters, self.small, FORCED_END)
            self.order.clear()
            self.index.clear()
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
        return (self.times[self.index[self.order[0]] << 1]
                + self.active_timeout)

    def take_expired(self) -> List[ExpiredFlow]:
        """The flows expired so far, oldest first; clears the list."""
        out = self.expired
        self.expired = []
        return out
