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

import os
import subprocess
import sys

import hypothesis.strategies as st
import pytest
import traffic as tr
from hypothesis import HealthCheck, event, given, settings
from support.inputs import bridge_options, frames, upcalls

from ovs_ipfix_py import fastpath, interfaces, packet, upcall
from ovs_ipfix_py.exporter import (
    _TEMPLATE_IDS,
    KEY_PREFIX,
    Exporter,
    group_expired,
    pack_records,
)
from ovs_ipfix_py.flowcache import U64_MAX, ExpiredFlow
from ovs_ipfix_py.options import (
    UINT32_MAX,
    CacheOptions,
    ExportOptions,
    FlowExporterOptions,
)
from ovs_ipfix_py.templates import EGRESS, INGRESS
from ovs_ipfix_py.upcall import BridgeSample, FlowSample

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


def feed_one_by_one(exp, batch, now):
    """The general path: sample_bridge / sample_flow, one sample at a
    time (packet.parse + FlowCache.add)."""
    for s in batch:
        if type(s) is FlowSample:
            exp.sample_flow(s.frame, s.orig_len, s.input_port,
                            s.output_port, s.probability, s.obs_domain_id,
                            s.obs_point_id, s.direction, now, s.tunnel)
        else:
            exp.sample_bridge(s.frame, s.orig_len, s.input_port,
                              s.output_port, now, s.probability, s.tunnel)


#: Ports as OVSDB describes them: the interface part of the key (opaque
#: bytes from Python) differs in length from port to port: a name past
#: OVS's 64-byte limit, a description, none; port 2 is a VXLAN port
#: (samples with tunnel metadata on it are keyed by their tunnel too);
#: port 4 is unknown.
PORTS = {
    1: interfaces.Interface(1, "p" * 70, ifindex=5, if_type=6,
                            description="uplink " * 30),
    2: interfaces.Interface(2, "vx", ifindex=6, type="vxlan"),
    3: interfaces.Interface(3, "", ifindex=0xFFFFFFFF),
}
TUNNEL = upcall.Tunnel(b"\x0a\0\0\1", b"\x0a\0\0\2", 9, 4789, 77, 1)


def run_three(batches, opts, prepare=None, ports=None):
    """Feed the same batches to three exporters: C batch path, pure
    Python batch path, general path, with ``ports`` (default PORTS) as
    their bridge's; return their cache states (and the exception each
    raised, if any).  ``prepare(exporter)`` may rig an exporter before
    it runs."""
    exps = [Exporter(opts, 0.0)]
    with fastpath.pure_python():
        # Their caches index flows with a dict (the specification), the
        # C one with a FlowIndex.
        exps += [Exporter(opts, 0.0) for _ in range(2)]
    assert type(exps[0].cache.index) is C.FlowIndex
    assert type(exps[1].cache.index) is dict
    for e in exps:
        e.set_ports(PORTS if ports is None else ports)
    try:
        if prepare:
            for e in exps:
                prepare(e)
        raised = [None, None, None]

        def run(k, fn):
            # Each batch followed by the cache's expiry at its time.
            try:
                for now, batch in batches:
                    fn(exps[k], batch, now)
                    exps[k].cache.expire(now)
            except Exception as e:          # compared below
                raised[k] = repr(e)

        run(0, lambda e, b, now: e.sample_batch(b, now))
        with fastpath.pure_python():
            run(1, lambda e, b, now: e.sample_batch(b, now))
            run(2, feed_one_by_one)
        states = [cache_state(e) + [raised[k]] for k, e in enumerate(exps)]
        # Then a flush (FlowCache.flush: C expired_flows, or Python).
        exps[0].cache.flush(1e6)
        with fastpath.pure_python():
            exps[1].cache.flush(1e6)
            exps[2].cache.flush(1e6)
        for state, e in zip(states, exps):
            state.append(e.cache.take_expired())
        return states
    finally:
        for e in exps:
            e.close(1e7)


MIX_FRAMES, _ = tr.traffic_mix(3, 2)


@st.composite
def any_frames(draw):
    """Every frame kind: frames() (IPv4/IPv6, tags, options, extension
    headers, fragments, damaged and cut), traffic_mix's frames (ARP, LLC,
    QinQ, GRE, BFD, runts, ...) maybe cut or changed, and random
    bytes."""
    which = draw(st.integers(0, 3))
    if which == 0:
        return draw(st.binary(max_size=90))
    if which == 1:
        return draw(frames())
    f = bytearray(draw(st.sampled_from(MIX_FRAMES)))
    if which == 3:
        for pos, value in draw(st.lists(st.tuples(
                st.integers(0, 90), st.integers(0, 255)), max_size=3)):
            if pos < len(f):
                f[pos] = value
        f = f[:draw(st.integers(0, len(f)))]
    return bytes(f)


EXTRA = st.sampled_from([0, 0, 1, 40, UINT32_MAX - 60])    # orig length
TUNNEL_V6 = upcall.Tunnel(bytes(15) + b"\1", bytes(15) + b"\2", 0, 6081,
                          5, 3)


@st.composite
def samples(draw):
    """A bridge sample or a flow sample (its own obs ids, 16-bit
    probability, direction rule), now and then with tunnel metadata."""
    f = draw(any_frames())
    orig = min(len(f) + draw(EXTRA), UINT32_MAX)
    tunnel = draw(st.sampled_from([None] * 3 + [TUNNEL, TUNNEL_V6]))
    in_port = draw(st.sampled_from([1, 2, 4, UINT32_MAX]))
    out_port = draw(st.sampled_from([None, None, 2, 3, 0]))
    if draw(st.integers(0, 2)):
        return BridgeSample("br0", in_port, out_port,
                            draw(st.sampled_from([0, 1, 2, 400,
                                                  UINT32_MAX])),
                            f, orig, tunnel)
    return FlowSample("br0", 5, draw(st.sampled_from([0, 7, UINT32_MAX])),
                      draw(st.sampled_from([0, 8, UINT32_MAX])),
                      draw(st.sampled_from([0, 1, 3, 65535])),
                      draw(st.sampled_from([0, 1, 2, 7])), in_port,
                      out_port, f, orig, tunnel)


@needs_c
@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(samples(), min_size=0, max_size=30), min_size=1,
                max_size=6),
       st.sampled_from([0, 1, 3, 1000]), st.sampled_from([0, 2, 3600]),
       st.booleans(), st.booleans(), st.sampled_from([0, 0, 1, 2]),
       st.booleans(), st.lists(st.sampled_from([1.3, 0.05, 0.4, 2.5]),
                               min_size=6, max_size=6))
def test_c_equals_python_equals_general(batches, max_flows, timeout, in_s,
                                        out_s, idle, tcp_end, gaps):
    """Keys, slots, aggregates, expiry order, expired flows and every
    counter (pkts, ipv4/ipv6 ok and errs, errs, flows, dropped) agree,
    bridge and flow samples of every frame kind mixed in one batch, with
    every cache rule: max_flows, active and idle timeouts, TCP end of
    flow (whose FIN/RST samples the C leaves to Python), batches a
    fraction of a second to over a second apart."""
    opts = bridge_options(sampling=3, domain=7, point=8,
                          input_sampling=in_s, output_sampling=out_s,
                          cache=CacheOptions(timeout, max_flows, idle,
                                             tcp_end))
    times = [1.0 + sum(gaps[:i + 1]) for i in range(len(batches))]
    fed = [(times[i], batch) for i, batch in enumerate(batches)]
    c_state, py_state, gen_state = run_three(fed, opts)
    for reason in {f.reason for f in c_state[5]}:
        event("flow left with reason %d before the flush" % reason)
    assert c_state == py_state
    assert c_state == gen_state


IFACES = st.sampled_from([
    interfaces.UNKNOWN_IFACE, interfaces.UNKNOWN_IFACE * 2,
    interfaces.iface_part(PORTS, 1, 3, True),
    interfaces.iface_part(PORTS, 1, None, False)])
TUNNEL_PARTS = st.sampled_from([
    b"", interfaces.tunnel_part(PORTS[2], TUNNEL),
    interfaces.tunnel_part(PORTS[2], TUNNEL_V6)])


@needs_c
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(samples().filter(
    lambda s: type(s) is FlowSample), max_size=20), min_size=1, max_size=3),
       st.sampled_from([1, 1000]))
def test_flow_exporter_c_equals_python(batches, max_flows):
    """A flow exporter (Flow_Sample_Collector_Set) takes its flow
    samples through the same C loop: the three paths agree."""
    opts = FlowExporterOptions("br0", 5, ExportOptions(
        cache=CacheOptions(3600, max_flows)))
    fed = [(1.0 + i, batch) for i, batch in enumerate(batches)]
    c_state, py_state, gen_state = run_three(fed, opts)
    assert c_state == py_state == gen_state


@needs_c
@settings(max_examples=1500, deadline=None)
@given(any_frames(), st.integers(0, UINT32_MAX), st.integers(0, UINT32_MAX),
       st.sampled_from([INGRESS, EGRESS]), IFACES, TUNNEL_PARTS)
def test_c_key_equals_packet_parse(frame, domain, point, direction, iface,
                                   tunnel):
    """The C key builder alone, on every frame kind and damaged frames:
    the key bytes (template id, interface and tunnel parts included),
    Ethernet header length, IP or not, TCP flags, classification and UDP
    port are packet.parse's."""
    fk = packet.parse(frame, point, direction, iface, tunnel)
    assert C.parse_key(frame, domain, point, direction, iface, tunnel,
                       _TEMPLATE_IDS) == (
        KEY_PREFIX.pack(domain, fk.template_id) + fk.key,
        fk.eth_header_len, fk.is_ip, fk.tcp_flags, fk.kind,
        fk.udp_dst_port)


@needs_c
def test_c_keys_carry_the_interface_and_tunnel_parts():
    """The interface part Python built once per port pair (names and
    descriptions, OVS's limits applied) and the tunnel part of a sample
    on a tunnel port are in the keys the C loop builds, without a
    sample going back to Python; the three paths agree."""
    f = tr.ethernet(tr.ipv4(tr.udp(1, 2), proto=17))
    batch = [BridgeSample("br0", 1, None, 1, f, 60),
             BridgeSample("br0", 2, None, 1, f, 60, TUNNEL),
             BridgeSample("br0", 2, None, 1, f, 60),
             BridgeSample("br0", 1, 2, 1, f, 60),
             FlowSample("br0", 5, 1, 2, 65535, 0, 2, None, f, 60, TUNNEL)]
    exp = Exporter(bridge_options(), 0.0)
    exp.set_ports(PORTS)
    try:
        def refuse(s, now):
            raise AssertionError("general path for %r" % (s,))
        exp._sample_one = refuse
        exp.sample_batch(batch, 1.0)
        keys = list(exp.cache.index)
        name = b"p" * interfaces.MAX_NAME_LEN
        assert any(bytes((len(name),)) + name in k for k in keys)
        assert any(b"uplink" in k for k in keys)
        tun = interfaces.tunnel_part(PORTS[2], TUNNEL)
        assert tun and sum(k.endswith(tun) for k in keys) == 2
    finally:
        exp.close(2.0)
    c_state, py_state, gen_state = run_three([(1.0, batch)],
                                             bridge_options())
    assert c_state == py_state == gen_state
    assert len(c_state[0]) == 5


@needs_c
def test_every_mix_frame_takes_the_c_path():
    """No frame kind of traffic_mix goes back to Python one sample at a
    time: with the general path disabled, a batch of all of them still
    aggregates (bridge and flow samples)."""
    batch = [BridgeSample("br0", 1, None, 1, f, len(f))
             for f in MIX_FRAMES]
    batch += [FlowSample("br0", 5, 9, 10, 65535, 0, 2, 3, f, len(f))
              for f in MIX_FRAMES]
    exp = Exporter(bridge_options(), 0.0)
    try:
        def refuse(s, now):
            raise AssertionError("general path for %r" % (s,))
        exp._sample_one = refuse
        exp.sample_batch(batch, 1.0)
        bfd = sum(1 for f in MIX_FRAMES if tr.is_bfd(f))
        assert exp.stats.pkts == len(batch) - bfd
        assert exp.stats.ipv6_ok and exp.stats.ipv4_errs
    finally:
        exp.close(2.0)


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
    batch = [BridgeSample("br0", 1, None, 1,
                          tr.ethernet(tr.ipv6(tr.udp(i & 0xFFFF, i >> 16),
                                              proto=17),
                                      ethertype=tr.ETH_TYPE_IPV6), 60)
             for i in range(5000)]
    batch += batch[::-7]
    opts = bridge_options()
    c_state, py_state, _ = run_three([(1.0, batch)], opts)
    assert c_state == py_state
    assert len(c_state[0]) == 5000


def _mixed_batch(n=60):
    frames_ = [MIX_FRAMES[i * 7 % len(MIX_FRAMES)] for i in range(n)]
    return [BridgeSample("br0", 1 + (i % 3), None, 1, f, len(f))
            if i % 2 else
            FlowSample("br0", 5, 9, 10, 65535, 0, 1 + (i % 3), 3, f,
                       len(f)) for i, f in enumerate(frames_)]


@needs_c
def test_exception_from_iface_part_leaves_both_paths_alike():
    """Exporter._iface_part raising in the middle of a C batch: the C
    loop leaves the sample to the general path, which raises; cache and
    counters hold every sample before it, as on the pure-Python
    paths."""
    def prepare(exp):
        real = exp._iface_part

        def iface_part(in_port, out_port, direction):
            if in_port == 3:
                raise RuntimeError("no such port")
            return real(in_port, out_port, direction)
        exp._iface_part = iface_part
        exp._c_params = exp._c_params[:8] + (iface_part,) + \
            exp._c_params[9:]
    states = run_three([(1.0, _mixed_batch())], bridge_options(),
                       prepare)
    assert states[0] == states[1] == states[2]
    assert "no such port" in states[0][-2]
    assert states[0][7]["pkts"] > 0


@needs_c
@pytest.mark.parametrize("max_flows", [0, 3])
def test_exception_from_insert_leaves_both_paths_alike(max_flows):
    """FlowCache._insert raising for one flow (called from inside the C
    loop: the fifth new flow, when the cache is full): the same cache
    and counters as the general path."""
    batch = _mixed_batch()
    probe = Exporter(bridge_options(), 0.0)
    probe.set_ports(PORTS)
    try:
        probe.sample_batch(batch, 1.0)
        victim = list(probe.cache.order)[4]
    finally:
        probe.close(2.0)

    def prepare(exp):
        real = exp.cache._insert

        def insert(key, *args):
            if key == victim:
                raise MemoryError("full")
            return real(key, *args)
        exp.cache._insert = insert
    states = run_three([(1.0, batch)], bridge_options(
        cache=CacheOptions(3600, max_flows)), prepare)
    assert states[0] == states[2]
    assert "full" in states[0][-2]
    # The pure batch path aggregates plain IPv4 in runs (add_many): it
    # may count a run it did not finish, but its cache stays whole.
    assert "full" in states[1][-2]
    assert sorted(states[1][0]) == sorted(states[1][1])


@needs_c
def test_bad_arguments_raise_not_crash():
    exp = Exporter(bridge_options(), 0.0)
    try:
        p = exp._c_params
        with pytest.raises(TypeError):
            C.sample_batch([], 0, 1.0, p[:5], exp.cache, exp.stats)
        with pytest.raises(ValueError):
            C.sample_batch([], 0, 1.0, p[:10] + (b"short",), exp.cache,
                           exp.stats)
        with pytest.raises(TypeError):
            C.sample_batch(5, 0, 1.0, p, exp.cache, exp.stats)
        # Objects that are not samples stop the C loop at once; the
        # exporter hands them to the general path.
        assert C.sample_batch([object()], 0, 1.0, p, exp.cache,
                              exp.stats) == 0
        # A flow exporter leaves bridge samples to the general path.
        f = tr.ethernet(tr.ipv4(tr.udp(1, 2), proto=17))
        s = BridgeSample("br0", 1, None, 1, f, len(f))
        assert C.sample_batch([s], 0, 1.0, (p[0], p[1], False) + p[3:],
                              exp.cache, exp.stats) == 0
        assert C.sample_batch([s, s], 0, 1.0, p, exp.cache,
                              exp.stats) == 2
        assert exp.stats.pkts == 2 and exp.stats.flows == 1
    finally:
        exp.close(1.0)


# -- the flow index --------------------------------------------------------

KEYS = st.binary(min_size=0, max_size=6)


@needs_c
@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["set", "pop", "del", "get",
                                           "in", "clear"]),
                          KEYS, st.integers(0, 300)), max_size=400))
def test_flow_index_behaves_as_the_dict_it_replaces(ops):
    """Every operation FlowCache uses, against a dict: inserts that grow
    the table, deletions that shift probe chains back (many keys share
    hash bits in a table of 64 buckets), lookups of missing keys."""
    fi, d = C.FlowIndex(), {}
    used = {}
    for op, key, slot in ops:
        if op == "set":
            if key in d or slot in used:
                continue        # slots are distinct, as in FlowCache
            fi[key] = slot
            d[key] = slot
            used[slot] = key
        elif op == "pop":
            want = d.pop(key, "none")
            assert fi.pop(key, "none") == want
            used.pop(want, None)
        elif op == "del":
            if key in d:
                del fi[key]
                used.pop(d.pop(key))
            else:
                with pytest.raises(KeyError):
                    del fi[key]
        elif op == "get":
            assert fi.get(key) == d.get(key)
            if key in d:
                assert fi[key] == d[key]
            else:
                with pytest.raises(KeyError):
                    fi[key]
        elif op == "in":
            assert (key in fi) == (key in d)
        else:
            fi.clear()
            d.clear()
            used.clear()
        assert len(fi) == len(d)
    assert dict(fi) == d
    assert sorted(fi.items()) == sorted(d.items())
    assert sorted(fi) == sorted(d)


@needs_c
def test_flow_index_refuses_what_a_flow_cache_never_does():
    fi = C.FlowIndex()
    fi[b"a"] = 1
    with pytest.raises(ValueError):
        fi[b"b"] = 1            # a slot holds one key
    with pytest.raises(TypeError):
        fi["text"] = 2
    with pytest.raises(ValueError):
        fi[b"c"] = -1
    assert fi.get("text") is None and "text" not in fi
    fi[b"a"] = 7                # a key moves to another slot
    assert dict(fi) == {b"a": 7}
    fi[b"b"] = 1
    assert dict(fi) == {b"a": 7, b"b": 1}


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
    with fastpath.pure_python():
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


@st.composite
def mixed_expired(draw):
    """Expired flows of several templates and key lengths, in runs and
    interleaved, with any end reason."""
    heads = [bytes(6), b"\0\0\0\7\1\2", b"\0\0\0\7\1\3"]
    flows = []
    for _ in range(draw(st.integers(0, 30))):
        head = draw(st.sampled_from(heads))
        key = head + bytes(draw(st.sampled_from([0, 20, 21, 60])))
        flows.append(ExpiredFlow(key, 1.0, 2.0, 1, 2, 3, 4, 5, 6, 7,
                                 draw(st.sampled_from([1, 2, 4, 5, 300]))))
    return flows


@needs_c
@settings(max_examples=300, deadline=None)
@given(mixed_expired())
def test_c_group_expired_equals_python(flows):
    """Same groups, in the same order, same flows in each in the same
    order, same counts by end reason."""
    c_groups, c_reasons = C.group_expired(flows)
    py_groups, py_reasons = group_expired(flows)
    assert list(c_groups.items()) == list(py_groups.items())
    assert c_reasons == py_reasons


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


# -- the daemon's dispatch --------------------------------------------------

class _Recorder:
    def __init__(self):
        self.got = []

    def sample_batch(self, batch, now):
        self.got.extend(batch)


SOURCES = [BridgeSample("br0", 1, None, 1, b"", 0),
           BridgeSample("br1", 1, None, 1, b"", 0),
           FlowSample("br0", 5, 1, 2, 3, 0, 1, None, b"", 0),
           FlowSample("br0", 6, 1, 2, 3, 0, 1, None, b"", 0)]


@needs_c
@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(range(len(SOURCES))),
                          st.integers(0, 9)), max_size=20))
def test_dispatch_with_c_equals_dispatch_without(picks):
    """Daemon.handle_upcalls: each exporter gets its samples in order,
    samples without an exporter are counted, with one_source (C) taking
    the one-source case or not."""
    from types import SimpleNamespace

    from ovs_ipfix_py.daemon import Daemon
    ups = [SOURCES[k]._replace(input_port=p) for k, p in picks]
    out = []
    for use_c in (True, False):
        d = Daemon.__new__(Daemon)
        recs = {("bridge", "br0"): _Recorder(),
                ("flow", "br0", 5): _Recorder()}
        d.reconciler = SimpleNamespace(exporters=recs)
        d.unmatched_samples = 0
        if use_c:
            d.handle_upcalls(list(ups), 1.0)
        else:
            with fastpath.pure_python():
                d.handle_upcalls(list(ups), 1.0)
        out.append(({k: r.got for k, r in recs.items()},
                    d.unmatched_samples))
    assert out[0] == out[1]
    want_br0 = [u for u in ups if type(u) is BridgeSample
                and u.bridge == "br0"]
    assert out[0][0][("bridge", "br0")] == want_br0
