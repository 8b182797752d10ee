"""The C fast path (ovs_ipfix_py/_fastpath.c) against the pure-Python one.

Aggregation: the pure-Python batch path is the specification (and the
general path, packet.parse one sample at a time, a second judge); the C
one must leave the cache (keys, slots, every aggregate, the expiry order,
expired flows) and the statistics exactly as it does, for any mix of
samples: frames the fast path does not take interleaved with ones it
does, per-sample probabilities, ports whose direction is not sampled, a
cache so small that inserting expires, counters that saturate at
2^64-1, and the idle timeout (its timing wheel, which C fills for new
flows) and TCP end of flow (whose FIN/RST samples C leaves to Python)
on, with expiry between batches.

Decoding: upcall.decode with and without the C cache-hit loop gives the
same upcalls, error counts and problem reports, for intact and damaged
datagrams, with cold and warm metadata caches.

Export: C pack_records gives the bytes and per-record counts of
exporter.pack_records, timestamps truncated to the ms the same way.
"""

import contextlib
import os
import subprocess
import sys

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, event, given, settings
from support.inputs import bridge_options, frames, upcalls

from ovs_ipfix_py import fastpath, interfaces, packet, upcall
from ovs_ipfix_py.exporter import Exporter, pack_records
from ovs_ipfix_py.flowcache import U64_MAX, ExpiredFlow
from ovs_ipfix_py.options import UINT32_MAX, CacheOptions
from ovs_ipfix_py.upcall import BridgeSample

C = fastpath.C


def test_c_fast_path_is_built():
    """tools/install-deps builds the extension; a silent fallback to pure
    Python would leave the speed figures and this module's checks
    meaningless, so say so loudly (OVS_IPFIX_PY_PURE=1 opts out)."""
    if os.environ.get("OVS_IPFIX_PY_PURE"):
        pytest.skip("OVS_IPFIX_PY_PURE is set: the C fast path is off")
    assert C is not None, (
        "ovs_ipfix_py._fastpath is not built: run tools/install-deps "
        "(needs a C compiler and the Python headers)")
    assert fastpath.name() == "C"


needs_c = pytest.mark.skipif(C is None, reason="C fast path not built "
                             "(test_c_fast_path_is_built fails)")


def cache_state(exp):
    """Everything the cache holds, slot numbers included: the idle wheel
    (buckets in order, stale counts, the tail) and the end-of-flow
    queue too."""
    c = exp.cache
    used = c._next_slot
    return [dict(c.index), list(c.order), c.times[:2 * used].tolist(),
            c.counters[:4 * used].tolist(), c.small[:3 * used].tolist(),
            list(c.expired), sorted(c._free), exp.stats.as_dict(),
            sorted((b, list(k)) for b, k in c._idle_buckets.items()),
            sorted(c._idle_heap), dict(c._idle_stale), c._idle_tail_b,
            c._idle_tail is None or any(
                c._idle_tail is b for b in c._idle_buckets.values()),
            dict(c._order_stale), list(c._ending), dict(c._ending_at)]


@contextlib.contextmanager
def pure_python():
    """The pure-Python fast path for the duration (what
    OVS_IPFIX_PY_PURE=1 gives at import)."""
    saved = fastpath.C
    fastpath.C = None
    try:
        yield
    finally:
        fastpath.C = saved


#: Ports as OVSDB describes them: the interface part of the key (opaque
#: bytes from Python, in the heads the C takes) differs in length from
#: port to port: a name past OVS's 64-byte limit, a description, none;
#: port 2 is a VXLAN port (samples with tunnel metadata leave the C).
PORTS = {
    1: interfaces.Interface(1, "p" * 70, ifindex=5, if_type=6,
                            description="uplink " * 30),
    2: interfaces.Interface(2, "vx", ifindex=6, type="vxlan"),
    3: interfaces.Interface(3, "", ifindex=0xFFFFFFFF),
}
TUNNEL = upcall.Tunnel(b"\x0a\0\0\1", b"\x0a\0\0\2", 9, 4789, 77, 1)


def run_three(batches, opts, ports=None):
    """Feed the same batches to three exporters: C batch path, Python
    batch path, general path, each batch followed by the cache's
    expiry at the same time; return their cache states."""
    c_exp, py_exp, gen_exp = (Exporter(opts, 0.0) for _ in range(3))
    for e in (c_exp, py_exp, gen_exp):
        e.set_ports(PORTS if ports is None else ports)
    try:
        for now, batch in batches:
            c_exp.sample_bridge_batch(batch, now)
            c_exp.cache.expire(now)
        with pure_python():
            for now, batch in batches:
                py_exp.sample_bridge_batch(batch, now)
                py_exp.cache.expire(now)
        for now, batch in batches:
            for s in batch:
                gen_exp.sample_bridge(s.frame, s.orig_len, s.input_port,
                                      s.output_port, now, s.probability,
                                      s.tunnel)
            gen_exp.cache.expire(now)
        states = [cache_state(e) for e in (c_exp, py_exp, gen_exp)]
        # Then a flush (FlowCache.flush: C expired_flows, or Python).
        c_exp.cache.flush(1e6)
        with pure_python():
            py_exp.cache.flush(1e6)
            gen_exp.cache.flush(1e6)
        for state, e in zip(states, (c_exp, py_exp, gen_exp)):
            state.append(e.cache.take_expired())
        return states
    finally:
        for e in (c_exp, py_exp, gen_exp):
            e.close(1e7)


SAMPLE = st.tuples(
    frames(),
    st.sampled_from([0, 0, 1, 40, UINT32_MAX - 60]),   # extra orig length
    st.sampled_from([1, 2]),                           # input port
    st.sampled_from([None, None, 3, 4]),               # output port
    st.sampled_from([0, 1, 2, 400, UINT32_MAX]),       # probability
    st.sampled_from([None, None, None, TUNNEL]))       # tunnel metadata


@needs_c
@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(SAMPLE, min_size=0, max_size=30), min_size=1,
                max_size=6),
       st.sampled_from([0, 1, 3, 1000]), st.sampled_from([0, 2, 3600]),
       st.booleans(), st.booleans(), st.sampled_from([0, 0, 1, 2]),
       st.booleans(), st.lists(st.sampled_from([1.3, 0.05, 0.4, 2.5]),
                               min_size=6, max_size=6))
def test_c_equals_python_equals_general(batches, max_flows, timeout, in_s,
                                        out_s, idle, tcp_end, gaps):
    """The three paths agree with every cache rule: max_flows, active
    and idle timeouts, TCP end of flow (whose FIN/RST samples the C
    leaves to Python), batches a fraction of a second to over a second
    apart."""
    opts = bridge_options(sampling=3, domain=7, point=8,
                          input_sampling=in_s, output_sampling=out_s,
                          cache=CacheOptions(timeout, max_flows, idle,
                                             tcp_end))
    times = [1.0 + sum(gaps[:i + 1]) for i in range(len(batches))]
    fed = [(times[i], [BridgeSample("br0", i_p, o_p, p, f,
                                    min(len(f) + extra, UINT32_MAX), tun)
                       for f, extra, i_p, o_p, p, tun in batch])
           for i, batch in enumerate(batches)]
    c_state, py_state, gen_state = run_three(fed, opts)
    for reason in {f.reason for f in c_state[5]}:
        event("flow left with reason %d before the flush" % reason)
    assert c_state == py_state
    # The general path adds one sample at a time: same flows and
    # aggregates (slots may differ only by the batching, they do not).
    assert c_state == gen_state


def _few_flows_frame(idx, flags):
    """One of a few flows: TCP with the given flags, UDP, IPv6 UDP (the
    general path)."""
    import traffic as tr
    if idx < 4:
        return tr.ethernet(tr.ipv4(tr.tcp(1000 + idx, 80, flags=flags),
                                   proto=tr.IPPROTO_TCP))
    if idx == 4:
        return tr.ethernet(tr.ipv4(tr.udp(53, 53), proto=tr.IPPROTO_UDP))
    return tr.build_frame(ip_version=6, proto=tr.IPPROTO_UDP)


@needs_c
@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(st.tuples(st.integers(0, 5),
                                   st.sampled_from([0x10, 0x18, 0x11, 0x04,
                                                    0x02, 0x14, 0x01])),
                         max_size=20), min_size=2, max_size=8),
       st.lists(st.sampled_from([0.3, 1.1, 0.05, 2.5, 0.95]), min_size=8,
                max_size=8),
       st.sampled_from([1, 2, 0]), st.booleans(),
       st.sampled_from([3600, 2, 0]), st.sampled_from([1000, 3, 0]))
def test_idle_and_tcp_end_c_equals_python(batches, gaps, idle, tcp_end,
                                          timeout, max_flows):
    """A few flows sampled again and again, with gaps around the idle
    timeout and the TCP linger: the C path, the Python batch path and
    the general path leave the same cache, wheel and expired flows."""
    opts = bridge_options(cache=CacheOptions(timeout, max_flows, idle,
                                             tcp_end))
    fed = [(1.0 + sum(gaps[:i + 1]),
            [BridgeSample("br0", 1, None, 1, _few_flows_frame(i_f, fl), 60)
             for i_f, fl in batch])
           for i, batch in enumerate(batches)]
    c_state, py_state, gen_state = run_three(fed, opts)
    for reason in {f.reason for f in c_state[5]}:
        event("flow left with reason %d before the flush" % reason)
    assert c_state == py_state
    assert c_state == gen_state
    if not tcp_end:
        assert 3 not in {f.reason for f in c_state[5]}
    if not idle:
        assert 1 not in {f.reason for f in c_state[5]}


@needs_c
def test_counters_saturate_in_c():
    """Two samples of 2^32-1 packets of 2^32-1 bytes: the octet counts
    reach 2^64-1 and stay there; the packet count does not saturate."""
    import traffic as tr
    f = tr.ethernet(tr.ipv4(tr.udp(1, 2), proto=17))
    big = UINT32_MAX
    s = BridgeSample("br0", 1, None, 1, f, big)
    opts = bridge_options()
    c_state, py_state, _ = run_three([(1.0, [s, s, s])], opts)
    assert c_state == py_state
    counters = c_state[3]
    assert counters[0] == 3 * (UINT32_MAX // 1)
    assert counters[1] == U64_MAX
    assert counters[3] == U64_MAX


@needs_c
def test_growth_during_a_batch():
    """More new flows in one call than the arrays have slots: _insert
    grows them while the C loop holds none of their buffers."""
    import traffic as tr
    batch = [BridgeSample("br0", 1, None, 1,
                          tr.ethernet(tr.ipv4(tr.udp(i & 0xFFFF, i >> 16),
                                              proto=17)), 60)
             for i in range(5000)]
    batch += batch[::-7]
    opts = bridge_options()
    c_state, py_state, _ = run_three([(1.0, batch)], opts)
    assert c_state == py_state
    assert len(c_state[0]) == 5000


@needs_c
def test_c_keys_carry_the_interface_part_and_leave_tunnels_to_python():
    """The heads the C takes hold the interface part Python built once
    per port pair (names and descriptions, OVS's limits applied); a
    sample with tunnel metadata stops the C loop, Python keys it with
    its tunnel part; the three paths agree."""
    import traffic as tr
    f = tr.ethernet(tr.ipv4(tr.udp(1, 2), proto=17))
    batch = [BridgeSample("br0", 1, None, 1, f, 60),
             BridgeSample("br0", 2, None, 1, f, 60, TUNNEL),
             BridgeSample("br0", 2, None, 1, f, 60),
             BridgeSample("br0", 1, 2, 1, f, 60)]
    exp = Exporter(bridge_options(), 0.0)
    exp.set_ports(PORTS)
    try:
        stop, fast, new = C.bridge_batch(batch, 0, 1.0, 1, exp._heads_for,
                                         packet.TOS_FIELDS, exp.cache)
        assert (stop, fast, new) == (1, 1, 1)
        [key] = exp.cache.index
        name = b"p" * interfaces.MAX_NAME_LEN
        assert bytes((len(name),)) + name in key
        assert b"uplink" in key
        assert C.bridge_batch(batch, 2, 1.0, 1, exp._heads_for,
                              packet.TOS_FIELDS, exp.cache) == (4, 2, 2)
    finally:
        exp.close(2.0)
    c_state, py_state, gen_state = run_three([(1.0, batch)],
                                             bridge_options())
    assert c_state == py_state == gen_state
    keys = list(c_state[0])
    assert len(keys) == 4
    assert sum(k.endswith(interfaces.tunnel_part(PORTS[2], TUNNEL))
               for k in keys) == 1


@needs_c
def test_bad_arguments_raise_not_crash():
    exp = Exporter(bridge_options(), 0.0)
    try:
        with pytest.raises(TypeError):
            C.bridge_batch([], 0, 1.0, 1, exp._heads_for, (b"",) * 3,
                           exp.cache)
        with pytest.raises(TypeError):
            C.bridge_batch(5, 0, 1.0, 1, exp._heads_for,
                           (b"",) * 256, exp.cache)
        # Objects that are not BridgeSample tuples stop the C loop at
        # once; the exporter hands them to the general path.
        assert C.bridge_batch([object()], 0, 1.0, 1, exp._heads_for,
                              (b"",) * 256, exp.cache) == (0, 0, 0)
    finally:
        exp.close(1.0)


# -- the channel decoder ---------------------------------------------------

def decode_cold_and_warm(d):
    """decode(d) with empty metadata caches, then again with the caches
    it filled; with the problems each reported."""
    for c in upcall._meta_caches.values():
        c.clear()
    out = []
    for _ in range(2):
        problems = []
        got = upcall.decode(d, problems)
        out.append((got, [str(p) for p in problems]))
    return out


@needs_c
@settings(max_examples=400, deadline=None)
@given(st.lists(upcalls(), min_size=1, max_size=12),
       st.lists(st.tuples(st.integers(0, 10_000),
                          st.binary(min_size=1, max_size=4)), max_size=3))
def test_c_decoder_equals_python_decoder(ups, damage):
    """Same upcalls, same error count, same problems, from intact and
    damaged datagrams, with cold and warm caches."""
    d = bytearray(upcall.encode(ups))
    for where, junk in damage:
        where %= len(d)
        d[where:where + len(junk)] = junk
    d = bytes(d)
    c_out = decode_cold_and_warm(d)
    with pure_python():
        py_out = decode_cold_and_warm(d)
    assert c_out == py_out
    if not damage:
        assert c_out[1][0] == (ups, 0)


@needs_c
def test_c_decoder_takes_repeats_and_leaves_the_rest():
    """decode_hits stops at the first upcall whose metadata is not
    cached; what it decodes equals the Python decoder's output."""
    ups = [BridgeSample("br0", 1, None, 7, bytes([i]) * i, i + 3)
           for i in range(50)]
    d = upcall.encode(ups)
    for c in upcall._meta_caches.values():
        c.clear()
    out = []
    assert C.decode_hits(d, 12, len(d), upcall._meta_caches, out) == (12, 0)
    assert upcall.decode(d) == (ups, 0)        # fills the cache
    out = []
    assert C.decode_hits(d, 12, len(d), upcall._meta_caches, out) == (
        len(d), 50)
    assert out == ups
    assert all(type(u) is BridgeSample for u in out)


# -- export: records from expired flows --------------------------------

U64 = st.one_of(st.integers(0, 3), st.integers(0, U64_MAX),
                st.just(U64_MAX))
TIMES = st.one_of(
    st.floats(0, 2e9, allow_nan=False),
    # Times on and next to a ms boundary, before 1970, and so far ahead
    # that the ms count holds at 2^64-1.
    st.integers(0, 2 ** 42).map(lambda k: k / 1e3),
    st.integers(0, 2 ** 42).map(lambda k: k / 1e3 - 1e-9),
    st.floats(-1e9, 0), st.floats(1.8e16, 1e300),
    st.just(1.7e9 + 0.5e-3))


@st.composite
def expired_groups(draw):
    key_len = draw(st.sampled_from([6, 26, 48, 84]))
    keys = st.binary(min_size=key_len, max_size=key_len)
    flows = draw(st.lists(st.builds(
        ExpiredFlow, keys, TIMES, TIMES, U64, U64, U64, U64,
        st.integers(0, UINT32_MAX), st.integers(0, UINT32_MAX),
        st.integers(0, 0xFFFF), st.integers(1, 5)), max_size=20))
    return flows


@needs_c
@settings(max_examples=300, deadline=None)
@given(expired_groups(),
       st.sampled_from([b"", b"\x03abc", b"\x00"]),
       st.sampled_from([(False, False), (True, False), (True, True)]))
def test_c_pack_records_equals_python(flows, vobs, layout):
    ip, tcp = layout
    assert C.pack_records(flows, vobs, ip, tcp) == \
        pack_records(flows, vobs, ip, tcp)


@needs_c
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_pack_records_refuses_times_no_clock_gives(bad):
    f = ExpiredFlow(bytes(10), 1.0, bad, 1, 2, 3, 4, 5, 6, 7, 4)
    with pytest.raises(OverflowError):
        C.pack_records([f], b"", True, True)
    with pytest.raises(OverflowError):
        pack_records([f], b"", True, True)


@needs_c
def test_c_pack_records_refuses_mixed_key_lengths():
    f = ExpiredFlow(bytes(10), 1.0, 2.0, 1, 2, 3, 4, 5, 6, 7, 4)
    with pytest.raises(ValueError):
        C.pack_records([f, f._replace(key=bytes(11))], b"", True, True)


# -- the pure-Python path, as it runs where the extension is not built -----

def test_pure_python_path_passes_the_core_tests():
    """OVS_IPFIX_PY_PURE=1: fastpath.name() says so, and the exporter,
    flow cache and channel tests pass on the Python loops alone (they
    check the fast path against packet.parse, the cache's semantics and
    the decoder's error accounting)."""
    env = dict(os.environ, OVS_IPFIX_PY_PURE="1")
    here = os.path.dirname(os.path.abspath(__file__))
    name = subprocess.run(
        [sys.executable, "-c",
         "from ovs_ipfix_py import fastpath; print(fastpath.name())"],
        env=env, capture_output=True, text=True, check=True).stdout
    assert name.strip() == "Python"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "-x", os.path.join(here, "test_exporter.py"),
         os.path.join(here, "test_flowcache.py"),
         os.path.join(here, "test_upcall.py")],
        env=env, capture_output=True, text=True, timeout=600,
        cwd=os.path.dirname(here))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout
