"""The flow cache: samples aggregated into flows, and their expiry.

Flows are keyed by their encoded key bytes (observation domain and
template id first, then the data record's key part), so export writes
the key out as it is.  Aggregates live in three typed arrays, grouped
by flow and indexed by a slot number: 60 bytes a flow instead of
several hundred for a list of Python ints.  Where the C extension is
built, the index (key -> slot) is its FlowIndex, an open-addressing
table that holds no int object per flow; with it a million-flow cache
takes under 200 bytes a flow in all (a dict index: about 240).  The
arrays are typed views of one anonymous memory mapping, not heap
blocks: a page is resident once a flow has used it, and growing (a new
mapping twice the size, the old one unmapped) leaves no hole in the
heap behind.

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

Two rules beyond OVS, off unless set:

- Idle timeout (``idle_timeout`` s, reason idle timeout): a flow with
  no sample for that long leaves.  Its index is a timing wheel of
  IDLE_STEP-wide buckets by deadline (last seen + idle timeout): a new
  flow goes into the bucket of its first deadline; when a bucket is due
  each of its flows either leaves (no sample since) or moves to the
  bucket of its real deadline.  So a flow is looked at once when it
  expires and at most once per idle period while it lives: the cost
  follows what expires, not the cache's size, and a flow leaves at
  most IDLE_STEP after its deadline.  A busy flow costs nothing on its
  samples (they only write its last-seen time).
- TCP end of flow (``tcp_end_of_flow``, reason end of flow detected):
  a TCP sample with FIN or RST marks its flow to leave TCP_END_LINGER
  s later (samples within the linger, the last ACKs, still count);
  a sample after that starts a new flow.

Flows that leave out of start order (idle, end of flow) stay in the
start-order FIFO until they reach its head, counted in a "stale" map
by key and skipped there (a key's stale entries always come before its
live one); likewise flows that leave otherwise leave stale entries in
the wheel.  The FIFO is compacted when stale entries outnumber live
flows, so it never holds more than twice the flows (plus 1024).

Times are seconds (float) on the caller's clock; nothing here reads a
clock.
"""

from __future__ import annotations

import heapq
import math
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

#: Width (s) of the idle timing wheel's buckets: a flow leaves at most
#: this long after its idle deadline.
IDLE_STEP = 0.1
#: How long (s) a TCP flow stays after a FIN or RST sample when
#: tcp_end_of_flow is on: room for the last ACKs of the close.
TCP_END_LINGER = 1.0
#: TCP flags that end a flow: FIN (0x01), RST (0x04).
TCP_END_FLAGS = 0x05
#: Flows one new flow may expire (due by a timeout) beyond the room it
#: needs: a bound on the work one sample can cause.
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

    ``active_timeout`` and ``idle_timeout`` (0: off) in seconds,
    ``max_flows`` a count (see the module docstring for 0),
    ``tcp_end_of_flow`` a bool.  Expired flows accumulate in
    ``expired`` until the caller takes them with ``take_expired()``.
    ``now`` never goes back from one call to the next (if it does,
    flows may leave late or by another timeout, never early and never
    lost).
    """

    #: (read by _fastpath.c, which must bucket new flows the same way)
    idle_step = IDLE_STEP

    def __init__(self, active_timeout: int = 0, max_flows: int = 0,
                 initial_slots: int = 1024, idle_timeout: int = 0,
                 tcp_end_of_flow: bool = False):
        self.active_timeout = active_timeout
        self.max_flows = max_flows
        # key -> slot: a dict, or where the C extension is built its
        # FlowIndex (the same mapping as an open-addressing table: no
        # int object per flow, no dict entry; see _fastpath.c).
        self.index = fastpath.C.FlowIndex() if fastpath.C else {}
        self.order = deque()     # keys, oldest started first
        self._order_stale = {}   # key -> its entries in order to skip
        self._n_order_stale = 0
        self.idle_timeout = 0
        self.tcp_end_of_flow = False
        self._reset_rules()
        self.set_rules(idle_timeout, tcp_end_of_flow)
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
        # FIN/RST end a flow only with tcp_end_of_flow on.
        end_flags = TCP_END_FLAGS if self.tcp_end_of_flow else 0
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
                if tcp_flags & end_flags:
                    self._mark_end(key, now)
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
        # fails: the index, the order and the slots stay consistent
        # (_fastpath.c does the same).
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
        if self.idle_timeout:
            # (sample_batch in _fastpath.c does the same when the
            # bucket is the tail, else calls here.)
            b = math.ceil((now + self.idle_timeout) / IDLE_STEP)
            if b == self._idle_tail_b:
                self._idle_tail.append(key)
            else:
                self._idle_tail = self._idle_schedule(key, b)
                self._idle_tail_b = b
        if tcp_flags & TCP_END_FLAGS and self.tcp_end_of_flow:
            self._mark_end(key, now)
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
            # a burst of due flows leaves on the exporter's next run(), in
            # slices, instead of holding up the sample that found it.
            self.expire(now, max(INSERT_EXPIRE_LIMIT,
                                 len(index) - self.max_flows))

    def set_rules(self, idle_timeout: int, tcp_end_of_flow: bool) -> None:
        """Switch the idle timeout (s, 0: off) and TCP end of flow.  A
        change applies to flows sampled from now on; the exporter
        flushes first (an option change is a forced end), so none are
        cached then."""
        if (idle_timeout, tcp_end_of_flow) == (
                self.idle_timeout, self.tcp_end_of_flow):
            return
        if self.index:
            raise ValueError("flush the cache before changing its rules")
        self.idle_timeout = idle_timeout
        self.tcp_end_of_flow = bool(tcp_end_of_flow)
        self._reset_rules()

    def _reset_rules(self) -> None:
        """Empty the idle wheel and the end-of-flow queue."""
        self._idle_buckets = {}   # bucket -> [key] (deadline bucket*STEP)
        self._idle_heap = []      # the buckets' numbers
        self._idle_stale = {}     # key -> its wheel entries to skip
        # The bucket new flows go to now (sample_batch appends to it).
        self._idle_tail = None
        self._idle_tail_b = None
        self._ending = deque()    # (deadline, key) in deadline order
        self._ending_at = {}      # key -> deadline of its live mark

    def _idle_schedule(self, key, b: int) -> list:
        """Put ``key`` in bucket ``b``; returns the bucket."""
        bucket = self._idle_buckets.get(b)
        if bucket is None:
            bucket = self._idle_buckets[b] = [key]
            heapq.heappush(self._idle_heap, b)
        else:
            bucket.append(key)
        return bucket

    def _mark_end(self, key, now: float) -> None:
        """A FIN or RST: the flow leaves TCP_END_LINGER s from now (its
        first such sample counts)."""
        if key not in self._ending_at:
            deadline = now + TCP_END_LINGER
            self._ending_at[key] = deadline
            self._ending.append((deadline, key))

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

    def _take(self, key, slot: int, reason: int) -> None:
        """Move the flow in ``slot`` to ``expired``; free the slot."""
        del self.index[key]
        self.expired.append(self._record(key, slot, reason))
        self._free.append(slot)

    def take_oldest(self, limit: int, reason: int) -> List[ExpiredFlow]:
        """Remove up to ``limit`` flows, oldest started first, with
        ``reason``, and return them (``expired`` is not involved): how
        the exporter sends a cache it has detached (a flush) a slice at
        a time; the cache's memory goes with its flows, a slice at a
        time too.  Only for a detached cache: the idle wheel and the
        end-of-flow queue are not kept up to date (``detach`` drops
        them).  (Records built in one C pass, ``expired_flows``, when
        the extension is built.)"""
        order = self.order
        index = self.index
        stale = self._order_stale
        popleft = order.popleft
        keys = []
        take = keys.append
        while order and len(keys) < limit:
            key = popleft()
            if stale and _skip_stale(stale, key):
                self._n_order_stale -= 1
                continue
            take(key)
        slots = list(map(index.pop, keys))
        self._free.extend(slots)
        if fastpath.C is not None:
            out = fastpath.C.expired_flows(
                ExpiredFlow, keys, slots, self.times, self.counters,
                self.small, reason)
        else:
            record = self._record
            out = [record(k, s, reason) for k, s in zip(keys, slots)]
        if not index:
            self._reset_slots()
        return out

    def detach(self) -> None:
        """Prepare to be drained by ``take_oldest`` alone: drop the idle
        wheel and the end-of-flow queue (their entries would only be
        freed all at once at the end)."""
        self.idle_timeout = 0
        self.tcp_end_of_flow = False
        self._reset_rules()

    def _remove_oldest(self, reason: int) -> None:
        if self._order_stale:
            self._clean_order_head()
        key = self.order.popleft()
        self._take(key, self.index[key], reason)
        # Its entries elsewhere are stale now.
        if self.idle_timeout:
            _bump(self._idle_stale, key)
        if self._ending_at:
            self._ending_at.pop(key, None)

    def _remove_out_of_order(self, key, slot: int, reason: int) -> None:
        """A flow leaving by idle timeout or end of flow: its entry in
        the start-order FIFO stays there, to be skipped."""
        self._take(key, slot, reason)
        _bump(self._order_stale, key)
        self._n_order_stale += 1
        if self._n_order_stale > len(self.index) + 1024:
            self._compact_order()

    def _clean_order_head(self) -> None:
        """Drop stale entries from the FIFO's head."""
        stale = self._order_stale
        if not stale:
            return
        order = self.order
        while order:
            if not _skip_stale(stale, order[0]):
                return
            order.popleft()
            self._n_order_stale -= 1

    def _compact_order(self) -> None:
        """The FIFO without its stale entries: one pass, paid for by
        the stale entries it drops (more than the flows cached)."""
        stale = self._order_stale
        kept = deque()
        keep = kept.append
        for key in self.order:
            if not _skip_stale(stale, key):
                keep(key)
        # In place: callers may hold the deque (or its append).
        self.order.clear()
        self.order.extend(kept)
        self._n_order_stale = 0

    def expire(self, now: float, limit: Optional[int] = None) -> int:
        """Expire what is due at ``now``, at most ``limit`` flows (None:
        all); returns how many flows left.  What is left due stays due:
        ``next_deadline()`` is then not after ``now``."""
        if limit is None:
            limit = -1
        n = 0
        if self._ending:
            n += self._expire_ended(now, limit)
        if self._idle_heap and n != limit:
            n += self._expire_idle(now, limit - n if limit > 0 else -1)
        order = self.order
        timeout = self.active_timeout
        times = self.times
        index = self.index
        stale = self._order_stale
        while order and n != limit:
            if stale:
                self._clean_order_head()
                if not order:
                    break
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
        if not index:
            self._reset_slots()
        return n

    def _expire_ended(self, now: float, limit: int = -1) -> int:
        """TCP flows whose linger after FIN/RST is over (at most
        ``limit``, -1: all)."""
        n = 0
        ending = self._ending
        ending_at = self._ending_at
        index = self.index
        while ending and ending[0][0] <= now and n != limit:
            deadline, key = ending.popleft()
            if ending_at.get(key) != deadline:
                continue        # left otherwise meanwhile
            del ending_at[key]
            self._remove_out_of_order(key, index[key],
                                      END_OF_FLOW_DETECTED)
            if self.idle_timeout:
                _bump(self._idle_stale, key)
            n += 1
        return n

    def _expire_idle(self, now: float, limit: int = -1) -> int:
        """The idle wheel's due buckets: each flow in them leaves, or
        moves to the bucket of its real deadline; at most ``limit``
        leave (-1: all), the rest of a bucket stays due."""
        n = 0
        heap = self._idle_heap
        buckets = self._idle_buckets
        stale = self._idle_stale
        index = self.index
        times = self.times
        idle = self.idle_timeout
        ending_at = self._ending_at
        while heap and heap[0] * IDLE_STEP <= now and n != limit:
            b = heapq.heappop(heap)
            keys = buckets.pop(b)
            if keys is self._idle_tail:
                self._idle_tail = self._idle_tail_b = None
            for i, key in enumerate(keys):
                if n == limit:
                    # The rest waits in this bucket, still due.
                    buckets[b] = keys[i:]
                    heapq.heappush(heap, b)
                    break
                if stale and _skip_stale(stale, key):
                    continue
                slot = index.get(key)
                if slot is None:
                    continue    # only if the clock went back
                last = times[(slot << 1) + 1]
                if last + idle <= now:
                    self._remove_out_of_order(key, slot, IDLE_TIMEOUT)
                    if ending_at:
                        ending_at.pop(key, None)
                    n += 1
                else:
                    # Never this bucket again (a deadline that rounds
                    # into it would be looked at in a loop).
                    self._idle_schedule(key, max(
                        b + 1, math.ceil((last + idle) / IDLE_STEP)))
        return n

    def flush(self, now: float) -> int:
        """Expire every flow with reason forced end."""
        n = len(self.index)
        if fastpath.C is None:
            while self.index:
                self._remove_oldest(FORCED_END)
        else:
            # _remove_oldest for every flow in one C pass; the index and
            # the order are emptied at the end, not one entry at a time.
            # (A dict index holds the live flows in start order; a
            # FlowIndex holds them by slot, so they come from the order.)
            keys = (list(self.index) if type(self.index) is dict
                    else self._live_order())
            self.expired += fastpath.C.expired_flows(
                ExpiredFlow, keys, list(map(self.index.__getitem__, keys)),
                self.times, self.counters, self.small, FORCED_END)
            self.index.clear()
        self.order.clear()
        self._order_stale.clear()
        self._n_order_stale = 0
        self._reset_rules()
        self._reset_slots()
        return n

    def _live_order(self) -> list:
        """The cached flows' keys in start order: the order without its
        stale entries (a key's stale entries come before its live
        one)."""
        stale = self._order_stale
        if not stale:
            return list(self.order)
        left = dict(stale)
        return [key for key in self.order if not _skip_stale(left, key)]

    def _reset_slots(self) -> None:
        # An empty cache reuses its slots from the start, which keeps
        # the arrays' used part compact.
        self._free.clear()
        self._next_slot = 0

    def next_deadline(self) -> Optional[float]:
        """When ``expire`` next has work (s), or None: the oldest flow's
        active timeout, the first idle bucket, the first linger's end
        (the last two may find nothing left to expire)."""
        out = None
        self._clean_order_head()
        if self.order:
            out = (self.times[self.index[self.order[0]] << 1]
                   + self.active_timeout)
        if self._idle_heap:
            t = self._idle_heap[0] * IDLE_STEP
            if out is None or t < out:
                out = t
        if self._ending:
            t = self._ending[0][0]
            if out is None or t < out:
                out = t
        return out

    def take_expired(self) -> List[ExpiredFlow]:
        """The flows expired so far, oldest first; clears the list."""
        out = self.expired
        self.expired = []
        return out


def _bump(counts: dict, key) -> None:
    counts[key] = counts.get(key, 0) + 1


def _skip_stale(stale: dict, key) -> bool:
    """True when ``key`` has a stale entry to skip; that one is used
    up (the count is decremented, the key dropped at 0)."""
    n = stale.get(key)
    if not n:
        return False
    if n == 1:
        del stale[key]
    else:
        stale[key] = n - 1
    return True
