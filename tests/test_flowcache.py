"""The flow cache: aggregation, scaling, each end reason, deadlines.

Expectations are worked out by hand from the issue and RFC 7012
(flowEndReason: 1 idle timeout, 2 active timeout, 3 end of flow
detected, 4 forced end, 5 lack of resources);
scaling as OVS scales: a bridge sample counts UINT32_MAX // P packets
(P = UINT32_MAX // sampling), a flow sample 65535 // P.
"""

import collections

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from ovs_ipfix_py import flowcache
from ovs_ipfix_py.exporter import Exporter
from ovs_ipfix_py.flowcache import (
    ACTIVE_TIMEOUT,
    END_OF_FLOW_DETECTED,
    FORCED_END,
    IDLE_STEP,
    IDLE_TIMEOUT,
    LACK_OF_RESOURCES,
    TCP_END_LINGER,
    U64_MAX,
    FlowCache,
)
from ovs_ipfix_py.options import (
    BridgeExporterOptions,
    CacheOptions,
    ExportOptions,
    FlowExporterOptions,
)

UINT32_MAX = 0xFFFFFFFF


def add(cache, key, now, frame_len=100, ip_len=86, count=1, flags=0):
    return cache.add(key, now, count, frame_len, ip_len, flags)


# -- aggregation ----------------------------------------------------------

def test_aggregates_one_flow():
    cache = FlowCache(active_timeout=60, max_flows=100)
    assert add(cache, b"a", 10.0, 60, 46, flags=0x002) is True
    assert add(cache, b"a", 11.5, 1514, 1500, flags=0x010) is False
    assert add(cache, b"a", 12.25, 200, 186, count=3, flags=0x018) is False
    assert len(cache) == 1
    assert cache.flush(20.0) == 1
    [f] = cache.take_expired()
    assert f.key == b"a"
    assert (f.start, f.end) == (10.0, 12.25)
    assert f.packets == 1 + 1 + 3
    assert f.l2_octets == 60 + 1514 + 3 * 200
    assert f.octets == 46 + 1500 + 3 * 186
    assert f.sumsq == 46 ** 2 + 1500 ** 2 + 3 * 186 ** 2
    assert (f.min_len, f.max_len) == (46, 1500)
    assert f.tcp_flags == 0x002 | 0x010 | 0x018
    assert f.reason == FORCED_END
    assert cache.take_expired() == []


def test_non_ip_flow_counts_only_l2_octets():
    cache = FlowCache(60, 100)
    add(cache, b"arp", 1.0, 60, 0)
    add(cache, b"arp", 2.0, 64, 0)
    cache.flush(3.0)
    [f] = cache.take_expired()
    assert (f.packets, f.l2_octets, f.octets, f.sumsq) == (2, 124, 0, 0)
    assert (f.min_len, f.max_len, f.tcp_flags) == (0, 0, 0)


def test_flows_kept_apart_by_key():
    cache = FlowCache(60, 100)
    for i in range(50):
        add(cache, b"k%d" % (i % 5), float(i), 100 + i, 86 + i)
    cache.flush(100.0)
    flows = {f.key: f for f in cache.take_expired()}
    assert sorted(flows) == [b"k%d" % i for i in range(5)]
    for i in range(5):
        f = flows[b"k%d" % i]
        lens = [86 + j for j in range(50) if j % 5 == i]
        assert f.packets == 10
        assert f.octets == sum(lens)
        assert f.sumsq == sum(x * x for x in lens)
        assert (f.min_len, f.max_len) == (min(lens), max(lens))
        assert (f.start, f.end) == (float(i), float(45 + i))


def test_slot_reuse_starts_from_zero():
    """A flow that takes a freed slot must not inherit the old values."""
    cache = FlowCache(active_timeout=10, max_flows=100)
    add(cache, b"old", 0.0, 1514, 1500, count=7, flags=0xFFF)
    assert cache.expire(10.0) == 1
    add(cache, b"new", 10.0, 60, 46)
    cache.flush(11.0)
    [old, new] = cache.take_expired()
    assert old.key == b"old" and new.key == b"new"
    assert (new.packets, new.l2_octets, new.octets, new.sumsq) == \
        (1, 60, 46, 46 * 46)
    assert (new.min_len, new.max_len, new.tcp_flags) == (46, 46, 0)


def test_counters_saturate_each_on_its_own():
    """unsigned64 counters saturate; one that overflows (the sum of
    squares first) must not make the others count the sample twice."""
    cache = FlowCache(60, 100)
    count = 1 << 40
    ip_len = 1500
    n = 0
    while count * ip_len * ip_len * (n + 1) <= U64_MAX:
        n += 1
    for i in range(n + 3):
        add(cache, b"big", float(i), ip_len + 14, ip_len, count=count)
    cache.flush(100.0)
    [f] = cache.take_expired()
    assert f.packets == (n + 3) * count
    assert f.l2_octets == (n + 3) * count * (ip_len + 14)
    assert f.octets == (n + 3) * count * ip_len
    assert f.sumsq == U64_MAX


def test_new_flow_with_huge_sample_saturates():
    cache = FlowCache(60, 100)
    add(cache, b"x", 1.0, 9014, 9000, count=1 << 50)
    cache.flush(2.0)
    [f] = cache.take_expired()
    assert f.packets == 1 << 50
    assert f.octets == 9000 << 50
    assert f.sumsq == U64_MAX


# -- scaling, through the exporter ---------------------------------------

TCP_FRAME = bytes.fromhex(
    "020000000002" "020000000001" "0800"
    "4500002800010000400600000a0000010a000002"
    "303900500000000100000000" "5010ffff00000000")


def _bridge_exporter(sampling, now=0.0):
    opts = BridgeExporterOptions(
        "br0", ExportOptions(targets=(), cache=CacheOptions(600, 1000)),
        sampling=sampling)
    return Exporter(opts, now)


def _cached(exporter):
    exporter.cache.flush(1.0)
    return exporter.cache.take_expired()


@pytest.mark.parametrize("sampling, per_sample", [
    (1, 1), (2, 2), (3, 3), (7, 7), (400, 400), (64000, 64000)])
def test_bridge_sampling_scales_as_ovs(sampling, per_sample):
    probability = UINT32_MAX // sampling
    assert UINT32_MAX // probability == per_sample
    exp = _bridge_exporter(sampling)
    try:
        for _ in range(3):
            exp.sample_bridge(TCP_FRAME, len(TCP_FRAME), 1, None, 0.5)
        [f] = _cached(exp)
        assert f.packets == 3 * per_sample
        assert f.l2_octets == 3 * per_sample * len(TCP_FRAME)
        assert f.octets == 3 * per_sample * (len(TCP_FRAME) - 14)
        assert f.sumsq == 3 * per_sample * (len(TCP_FRAME) - 14) ** 2
    finally:
        exp.close(2.0)


@pytest.mark.parametrize("probability, per_sample", [
    (65535, 1), (32768, 1), (100, 655), (7, 9362), (1, 65535)])
def test_flow_sampling_scales_as_ovs(probability, per_sample):
    opts = FlowExporterOptions(
        "br0", 5, ExportOptions(targets=(), cache=CacheOptions(600, 100)))
    exp = Exporter(opts, 0.0)
    try:
        exp.sample_flow(TCP_FRAME, len(TCP_FRAME), 1, None, probability,
                        9, 10, 1, 0.5)
        exp.sample_flow(TCP_FRAME, 200, 1, None, probability, 9, 10, 1,
                        0.6)
        [f] = _cached(exp)
        assert f.packets == 2 * per_sample
        # A truncated sample counts its original length.
        assert f.l2_octets == per_sample * (len(TCP_FRAME) + 200)
        assert f.octets == per_sample * (len(TCP_FRAME) - 14 + 186)
        assert (f.min_len, f.max_len) == (len(TCP_FRAME) - 14, 186)
    finally:
        exp.close(2.0)


# -- end reasons -----------------------------------------------------------

def test_active_timeout_at_the_deadline():
    cache = FlowCache(active_timeout=10, max_flows=100)
    add(cache, b"a", 100.0)
    add(cache, b"b", 103.0)
    add(cache, b"a", 109.0)       # later packets do not push it back
    assert cache.next_deadline() == 110.0
    assert cache.expire(109.999) == 0
    assert cache.take_expired() == []
    assert cache.expire(110.0) == 1
    [f] = cache.take_expired()
    assert (f.key, f.reason, f.packets) == (b"a", ACTIVE_TIMEOUT, 2)
    assert (f.start, f.end) == (100.0, 109.0)
    assert cache.next_deadline() == 113.0
    assert cache.expire(500.0) == 1
    assert cache.take_expired()[0].key == b"b"
    assert cache.next_deadline() is None


def test_next_deadline_expires_what_it_announces():
    """At exactly next_deadline() the flow leaves: a poll loop woken
    then must find work (start + timeout and now - timeout round
    differently in floating point for such a start)."""
    start, timeout = 31.16938925857652, 60
    assert (start + timeout) - timeout < start
    cache = FlowCache(timeout, 100)
    add(cache, b"a", start)
    deadline = cache.next_deadline()
    assert cache.expire(deadline) == 1
    assert cache.take_expired()[0].reason == ACTIVE_TIMEOUT


@settings(max_examples=300, deadline=None)
@given(st.floats(0, 4e9, allow_nan=False), st.integers(1, 86400))
def test_next_deadline_always_expires(start, timeout):
    cache = FlowCache(timeout, 100)
    add(cache, b"a", start)
    deadline = cache.next_deadline()
    assert deadline >= start
    assert cache.expire(deadline) == 1


def test_lack_of_resources_oldest_first():
    cache = FlowCache(active_timeout=1000, max_flows=3)
    for i in range(1, 6):
        add(cache, b"f%d" % i, float(i))
        assert len(cache) == min(i, 3)
    gone = cache.take_expired()
    assert [f.key for f in gone] == [b"f1", b"f2"]
    assert {f.reason for f in gone} == {LACK_OF_RESOURCES}
    # An existing flow getting packets does not evict anything.
    add(cache, b"f3", 6.0)
    assert cache.take_expired() == []
    cache.flush(7.0)
    rest = cache.take_expired()
    assert [f.key for f in rest] == [b"f3", b"f4", b"f5"]
    assert {f.reason for f in rest} == {FORCED_END}
    assert rest[0].packets == 2


def test_active_timeout_takes_precedence_when_both_apply():
    cache = FlowCache(active_timeout=5, max_flows=2)
    add(cache, b"a", 0.0)
    add(cache, b"b", 1.0)
    add(cache, b"c", 10.0)        # a and b are also past their timeout
    gone = cache.take_expired()
    assert [(f.key, f.reason) for f in gone] == \
        [(b"a", ACTIVE_TIMEOUT), (b"b", ACTIVE_TIMEOUT)]
    assert len(cache) == 1


def test_flush_forced_end_in_start_order():
    cache = FlowCache(600, 1000)
    keys = [b"k%03d" % i for i in range(100)]
    for i, k in enumerate(keys):
        add(cache, k, float(i))
    for k in keys[::-1]:
        add(cache, k, 200.0)
    assert cache.flush(300.0) == 100
    gone = cache.take_expired()
    assert [f.key for f in gone] == keys
    assert all(f.reason == FORCED_END and f.packets == 2 for f in gone)
    assert len(cache) == 0 and cache.next_deadline() is None
    assert cache.flush(301.0) == 0


def test_no_caching_exports_every_sample_at_once():
    """Both options 0: each sample leaves as it comes, reason active
    timeout (as OVS)."""
    cache = FlowCache(active_timeout=0, max_flows=0)
    for i in range(3):
        add(cache, b"same", 5.0 + i, 100, 86)
        assert len(cache) == 0
        [f] = cache.take_expired()
        assert (f.packets, f.l2_octets, f.reason) == (1, 100, ACTIVE_TIMEOUT)
        assert f.start == f.end == 5.0 + i
    assert cache.next_deadline() is None


def test_no_room_with_a_timeout_is_lack_of_resources():
    cache = FlowCache(active_timeout=30, max_flows=0)
    add(cache, b"a", 1.0)
    add(cache, b"a", 2.0)
    gone = cache.take_expired()
    assert [(f.packets, f.reason) for f in gone] == \
        [(1, LACK_OF_RESOURCES), (1, LACK_OF_RESOURCES)]
    assert len(cache) == 0


# -- expiry cost follows what expires --------------------------------------

class CountingArray:
    """Wraps the cache's times array (start, end) and counts reads."""

    def __init__(self, inner):
        self.inner = inner
        self.reads = 0

    def __getitem__(self, i):
        self.reads += 1
        return self.inner[i]

    def __setitem__(self, i, v):
        self.inner[i] = v

    def __len__(self):
        return len(self.inner)


def test_expiry_reads_only_what_expires():
    cache = FlowCache(active_timeout=60, max_flows=10 ** 6)
    for i in range(10):
        add(cache, b"old%d" % i, 0.0)
    for i in range(100_000):
        add(cache, i.to_bytes(4, "big"), 30.0)
    counter = cache.times = CountingArray(cache.times)
    assert cache.expire(59.0) == 0
    assert counter.reads == 1
    counter.reads = 0
    assert cache.expire(60.0) == 10
    # A few reads per expired flow plus the first young one, not one
    # per cached entry.
    assert counter.reads <= 3 * 10 + 1
    assert len(cache) == 100_000
    counter.reads = 0
    assert cache.next_deadline() == 90.0
    assert counter.reads == 1


# -- idle timeout -----------------------------------------------------------

def test_idle_flow_leaves_on_time_busy_flow_stays():
    cache = FlowCache(active_timeout=600, max_flows=100, idle_timeout=5)
    add(cache, b"quiet", 10.0)
    add(cache, b"busy", 10.0)
    for i in range(1, 20):
        add(cache, b"busy", 10.0 + i)
    # The quiet flow's deadline is 15.0: its bucket is due by 15.1.
    assert cache.next_deadline() <= 15.0 + IDLE_STEP + 1e-9
    assert cache.expire(14.99) == 0
    cache.expire(15.0 + IDLE_STEP + 1e-9)
    [f] = cache.take_expired()
    assert (f.key, f.reason, f.start, f.end) == (b"quiet", IDLE_TIMEOUT,
                                                 10.0, 10.0)
    for now in (20.0, 25.0, 28.9):
        cache.expire(now)
    assert cache.take_expired() == [] and len(cache) == 1
    # The busy flow's last sample was at 29.0.
    cache.expire(34.0 + IDLE_STEP + 1e-9)
    [f] = cache.take_expired()
    assert (f.key, f.reason, f.end) == (b"busy", IDLE_TIMEOUT, 29.0)
    assert cache.next_deadline() is None


def test_idle_then_a_new_flow_with_the_same_key():
    """After an idle exit the key starts afresh; the old entries in the
    start FIFO and the wheel do not touch the new flow."""
    cache = FlowCache(active_timeout=10, max_flows=100, idle_timeout=2)
    add(cache, b"a", 0.0)
    add(cache, b"b", 0.5)
    cache.expire(2.2)
    assert [f.key for f in cache.take_expired()] == [b"a"]
    add(cache, b"a", 3.0)
    for now in (3.5, 4.0, 4.5):
        add(cache, b"a", now)
    cache.expire(4.9)       # b idle since 0.5
    assert [f.key for f in cache.take_expired()] == [b"b"]
    for now in (5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 12.0, 12.9):
        add(cache, b"a", now)
        cache.expire(now)
    assert cache.take_expired() == []
    cache.expire(13.0)      # a started at 3.0: active timeout at 13.0
    [f] = cache.take_expired()
    assert (f.key, f.reason, f.start, f.packets) == (b"a", ACTIVE_TIMEOUT,
                                                     3.0, 12)
    assert len(cache) == 0 and cache.next_deadline() is not None
    cache.expire(20.0)      # stale wheel entries only: nothing leaves
    assert cache.take_expired() == [] and cache.next_deadline() is None


def test_idle_expiry_reads_only_what_expires():
    """1M idle-watched flows, 10 of them idle: expiry looks at a
    handful of entries, not at the million."""
    cache = FlowCache(active_timeout=3600, max_flows=10 ** 7,
                      idle_timeout=60)
    for i in range(10):
        add(cache, b"old%d" % i, 0.0)
    for i in range(200_000):
        add(cache, i.to_bytes(4, "big"), 30.0)
    counter = cache.times = CountingArray(cache.times)
    assert cache.expire(59.0) == 0
    assert counter.reads <= 1
    counter.reads = 0
    assert cache.expire(60.0 + IDLE_STEP) == 10
    assert counter.reads <= 3 * 10 + 1
    assert len(cache) == 200_000


def test_start_fifo_compacts_stale_entries():
    """Flows leaving by idle timeout leave entries in the start FIFO;
    it never holds more than twice the cached flows plus 1024."""
    cache = FlowCache(active_timeout=4200, max_flows=10 ** 6,
                      idle_timeout=1)
    now = 0.0
    for i in range(20_000):
        now += 0.01
        add(cache, i.to_bytes(4, "big"), now)
        add(cache, b"steady", now)
        cache.expire(now)
        assert len(cache.order) <= 2 * len(cache) + 1024
    assert sum(1 for _ in cache.take_expired()) > 19_000
    assert b"steady" in cache.index


# -- TCP end of flow --------------------------------------------------------

FIN, RST, ACK = 0x01, 0x04, 0x10


def test_fin_flow_leaves_after_the_linger():
    cache = FlowCache(active_timeout=600, max_flows=100,
                      tcp_end_of_flow=True)
    add(cache, b"closed", 1.0, flags=ACK)
    add(cache, b"closed", 2.0, flags=FIN | ACK)
    add(cache, b"reset", 2.0, flags=RST)
    add(cache, b"open", 2.0, flags=ACK)
    # The last ACK within the linger still counts.
    add(cache, b"closed", 2.5, flags=ACK)
    assert cache.next_deadline() == 2.0 + TCP_END_LINGER
    assert cache.expire(2.0 + TCP_END_LINGER - 0.01) == 0
    assert cache.expire(2.0 + TCP_END_LINGER) == 2
    got = {f.key: f for f in cache.take_expired()}
    assert {k: f.reason for k, f in got.items()} == {
        b"closed": END_OF_FLOW_DETECTED, b"reset": END_OF_FLOW_DETECTED}
    assert got[b"closed"].packets == 3
    assert got[b"closed"].tcp_flags == FIN | ACK
    assert list(cache.index) == [b"open"]
    # After it left, a sample starts a new flow.
    assert add(cache, b"closed", 4.0, flags=ACK) is True


def test_fin_ignored_when_off():
    cache = FlowCache(active_timeout=600, max_flows=100)
    add(cache, b"a", 1.0, flags=FIN)
    assert cache.expire(100.0) == 0 and len(cache) == 1


def test_rules_change_only_when_empty():
    cache = FlowCache(active_timeout=600, max_flows=100)
    add(cache, b"a", 1.0)
    with pytest.raises(ValueError):
        cache.set_rules(5, True)
    cache.flush(2.0)
    cache.set_rules(5, True)
    assert (cache.idle_timeout, cache.tcp_end_of_flow) == (5, True)


# -- a property: nothing is lost, reasons are honest ------------------------

ops = st.lists(st.tuples(
    st.sampled_from(["add", "add", "add", "expire"]),
    st.integers(0, 7),            # key
    st.floats(0, 3),              # time step (s)
    st.integers(1, 1000),         # count
    st.integers(60, 1514)),       # frame length
    max_size=80)


@settings(max_examples=300, deadline=None)
@given(ops, st.integers(0, 5), st.integers(0, 6), st.integers(0, 3),
       st.booleans(), st.lists(st.sampled_from([0, 0x10, 0x01, 0x04]),
                               min_size=8, max_size=8))
def test_conservation_and_reasons(steps, timeout, max_flows, idle, tcp_end,
                                  flags):
    """Nothing lost, nothing counted twice, every reason honest: idle
    never early and never more than IDLE_STEP late, end of flow only
    after a FIN/RST and its linger."""
    cache = FlowCache(timeout, max_flows, idle_timeout=idle,
                      tcp_end_of_flow=tcp_end)
    sent = collections.Counter()
    got = collections.Counter()
    ended = {}      # key -> time of its flow's first FIN/RST
    now = 0.0
    for op, k, dt, count, frame_len in steps:
        now += dt
        if op == "add":
            key = b"%d" % k
            cache.add(key, now, count, frame_len, frame_len - 14, flags[k])
            sent[key, "p"] += count
            sent[key, "o"] += count * (frame_len - 14)
            if flags[k] & 0x05:
                ended.setdefault(key, now)
        else:
            cache.expire(now)
        for f in cache.take_expired():
            got[f.key, "p"] += f.packets
            got[f.key, "o"] += f.octets
            assert f.start <= f.end <= now
            if f.reason == ACTIVE_TIMEOUT:
                assert f.start + timeout <= now
            elif f.reason == IDLE_TIMEOUT:
                assert idle and f.end + idle <= now
            elif f.reason == END_OF_FLOW_DETECTED:
                assert tcp_end and f.tcp_flags & 0x05
                assert ended[f.key] + TCP_END_LINGER <= now
            else:
                assert f.reason == LACK_OF_RESOURCES
            ended.pop(f.key, None)
        assert len(cache) <= max_flows
        if op == "expire" and idle:
            # On time: nothing cached has been idle over a bucket more.
            for slot in cache.index.values():
                assert cache.times[2 * slot + 1] + idle > \
                    now - IDLE_STEP - 1e-9
    cache.flush(now)
    for f in cache.take_expired():
        assert f.reason == FORCED_END
        got[f.key, "p"] += f.packets
        got[f.key, "o"] += f.octets
    assert got == sent


def test_reason_constants_are_rfc7012():
    assert (flowcache.IDLE_TIMEOUT, flowcache.ACTIVE_TIMEOUT,
            flowcache.END_OF_FLOW_DETECTED, flowcache.FORCED_END,
            flowcache.LACK_OF_RESOURCES) == (1, 2, 3, 4, 5)
