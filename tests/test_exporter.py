"""The exporter: fast path against the general one, the encoder's round
trip, the counters OVS prints, and collectors (targets, bad targets, an
unreachable collector beside a working one).

Real sockets on loopback, no mocks; messages are read back with
tests/support/decoders.py.
"""

import collections
import socket
import time

import hypothesis.strategies as st
import pytest
import traffic as tr
from hypothesis import HealthCheck, example, given, settings
from support import free_port
from support.collector import UdpCollector
from support.decoders import Session, judge_collector, parse_collector
from support.inputs import bridge_options, frames

from ovs_ipfix_py import collector as col
from ovs_ipfix_py import elements, interfaces, packet
from ovs_ipfix_py import templates as t
from ovs_ipfix_py.exporter import KEY_PREFIX, Exporter
from ovs_ipfix_py.flowcache import FORCED_END
from ovs_ipfix_py.options import (
    UINT32_MAX,
    CacheOptions,
)
from ovs_ipfix_py.upcall import BridgeSample, Tunnel


def cached(exp, now=1e6):
    exp.cache.flush(now)
    return exp.cache.take_expired()


#: The bridge's ports (OVSDB): names of different lengths, so records of
#: one template differ in length; port 2 is a VXLAN tunnel port, 3 a GRE
#: one; 0xFFFFFFFF and 0 are unknown to OVSDB.
PORTS = {
    1: interfaces.Interface(1, "p1", ifindex=11),
    2: interfaces.Interface(2, "vxlan-to-host-b", ifindex=12,
                            if_type=6, description="VXLAN tunnel",
                            type="vxlan"),
    3: interfaces.Interface(3, "gre0", type="gre"),
}
TUNNELS = st.one_of(st.none(), st.builds(
    Tunnel, st.sampled_from([b"\x0a\0\0\1", bytes(16)]),
    st.sampled_from([b"\x0a\0\0\2", bytes(16)]),
    st.sampled_from([0, 49152]), st.sampled_from([4789, 6081, 0]),
    st.sampled_from([0, 5001, 5002, (1 << 40) + 7]),
    st.sampled_from([0, 1, 2, 7])).filter(
        lambda x: len(x.src) == len(x.dst)))
SAMPLES = st.lists(st.tuples(
    frames(),
    st.integers(0, 40),                             # extra original length
    st.sampled_from([1, 2, 0xFFFFFFFF]),            # input port
    st.sampled_from([None, None, 3, 0]),            # output port
    TUNNELS),
    min_size=1, max_size=40)


# -- the fast path ---------------------------------------------------

def run_both(samples, sampling, input_sampling, output_sampling, split):
    opts = bridge_options(sampling=sampling, domain=5, point=6,
                          input_sampling=input_sampling,
                          output_sampling=output_sampling)
    fast, slow = Exporter(opts, 0.0), Exporter(opts, 0.0)
    fast.set_ports(PORTS)
    slow.set_ports(PORTS)
    batch = [BridgeSample("br0", in_port, out_port,
                          UINT32_MAX // sampling, f, len(f) + extra,
                          rest[0] if rest else None)
             for f, extra, in_port, out_port, *rest in samples]
    try:
        fast.sample_bridge_batch(batch[:split], 1.0)
        fast.sample_bridge_batch(batch[split:], 1.0)
        for s in batch:
            slow.sample_bridge(s.frame, s.orig_len, s.input_port,
                               s.output_port, 1.0, tunnel=s.tunnel)
        assert fast.stats.as_dict() == slow.stats.as_dict()
        assert cached(fast) == cached(slow)
    finally:
        fast.close(2.0)
        slow.close(2.0)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(frames(damaged=False), st.integers(0, 40),
                          st.sampled_from([1, 2, 0xFFFFFFFF]),
                          st.sampled_from([None, None, 3, 0]), TUNNELS),
                min_size=1, max_size=40),
       st.sampled_from([1, 400]), st.booleans(), st.booleans(),
       st.integers(0, 40))
def test_fast_path_equals_general_path_on_whole_frames(
        samples, sampling, in_s, out_s, split):
    run_both(samples, sampling, in_s, out_s, split)


# Frames the fast path once read differently from packet.parse: an IPv4
# packet whose total length (or the frame) ends inside the L4 header.
# sample_bridge_batch must check the total length and the whole L4
# header before taking the fast path.
SHORT_L4 = [
    # TCP cut to 48..53 bytes (a truncated sample): ports need 20 bytes.
    tr.ethernet(tr.ipv4(tr.tcp(5, 6), proto=6), pad=False)[:50],
    # TCP with 10 bytes in the packet, padded to 60 with a "header".
    tr.ethernet(tr.ipv4(tr.tcp(5, 6)[:10], proto=6), pad=False)
    + tr.tcp(5, 6)[10:],
    # UDP header claimed 4 bytes long by the IP total length.
    tr.ethernet(tr.ipv4(tr.udp(5, 6)[:4]), pad=False) + bytes(30),
    # ICMP with 4 of its 8 header bytes inside the packet.
    tr.ethernet(tr.ipv4(tr.icmp(8)[:4], proto=1), pad=False) + bytes(30),
]


@pytest.mark.parametrize("frame", SHORT_L4, ids=[
    "tcp-frame-cut-at-50", "tcp-10-bytes-in-packet", "udp-4-bytes-in-packet",
    "icmp-4-bytes-in-packet"])
def test_fast_path_on_partial_l4_headers(frame):
    assert len(frame) >= 48
    run_both([(frame, 0, 1, None)], 1, True, True, 0)


@example([(SHORT_L4[0], 0, 1, None)], 1, True, True, 0)
@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(SAMPLES, st.sampled_from([1, 400]), st.booleans(), st.booleans(),
       st.integers(0, 40))
def test_fast_path_equals_general_path_on_damaged_frames(
        samples, sampling, in_s, out_s, split):
    run_both(samples, sampling, in_s, out_s, split)


# -- the encoder round trip ------------------------------------------

@pytest.fixture(scope="module")
def shared_collector():
    with UdpCollector(socket.AF_INET) as c:
        yield c


def decode_record(record):
    """{element name: int or bytes} of a decoded data record (the second
    interfaceName/Description, an egress port's, as egressInterface...)."""
    out = {}
    for spec, raw in record.fields:
        name = elements.by_id(spec.ie, spec.pen).name
        if name in out:
            name = "egress" + name[0].upper() + name[1:]
        out[name] = int.from_bytes(raw, "big") if elements.by_id(
            spec.ie, spec.pen).data_type.startswith("unsigned") else raw
    return out


def expected_flows(samples, count, domain, point):
    """Aggregate the samples by hand: {(template id, key): values}."""
    flows = {}
    for f, extra, in_port, out_port, tunnel in samples:
        direction = t.INGRESS if out_port is None else t.EGRESS
        fk = packet.parse(
            f, point, direction,
            interfaces.iface_part(PORTS, in_port, out_port,
                                  direction == t.EGRESS),
            interfaces.tunnel_part(
                PORTS.get(in_port if out_port is None else out_port),
                tunnel))
        if fk.udp_dst_port in (3784, 3785):
            continue
        frame_len = len(f) + extra
        ip_len = frame_len - fk.eth_header_len if fk.is_ip else 0
        v = flows.setdefault((fk.template_id, fk.key), {
            "packetDeltaCount": 0, "layer2OctetDeltaCount": 0,
            "octetDeltaCount": 0, "octetDeltaSumOfSquares": 0,
            "minimumIpTotalLength": ip_len, "maximumIpTotalLength": ip_len,
            "tcpControlBits": 0, "flowEndReason": FORCED_END})
        v["packetDeltaCount"] += count
        v["layer2OctetDeltaCount"] += count * frame_len
        v["octetDeltaCount"] += count * ip_len
        v["octetDeltaSumOfSquares"] += count * ip_len * ip_len
        v["minimumIpTotalLength"] = min(v["minimumIpTotalLength"], ip_len)
        v["maximumIpTotalLength"] = max(v["maximumIpTotalLength"], ip_len)
        v["tcpControlBits"] |= fk.tcp_flags
    return flows


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(SAMPLES, st.sampled_from([1, 3, 400]), st.integers(0, 2 ** 32 - 1),
       st.integers(0, 2 ** 32 - 1), st.sampled_from([512, 1400]))
def test_records_decode_back_to_the_flows(shared_collector, samples,
                                          sampling, domain, point,
                                          max_size):
    c = shared_collector
    c.datagrams.clear()
    c.senders.clear()
    opts = bridge_options([c.target], sampling=sampling, domain=domain,
                          point=point, max_message_size=max_size)
    exp = Exporter(opts, 100.0)
    exp.set_ports(PORTS)
    try:
        for f, extra, in_port, out_port, tunnel in samples:
            exp.sample_bridge(f, len(f) + extra, in_port, out_port, 100.0,
                              tunnel=tunnel)
        exp.flush(100.0)
        sent = exp.stats.tx_pkts
        assert c.wait_for(lambda d: len(d) >= sent, 5.0)
    finally:
        exp.collectors.close()
    session = parse_collector(c)
    assert session.problems == []
    count = UINT32_MAX // (UINT32_MAX // sampling)
    want = expected_flows(samples, count, domain, point)
    got = {}
    for m in session.messages:
        assert m.domain == domain
        for r in m.data_records:
            tmpl = t.get(r.template_id)
            # Variable-length fields take their length prefix back.
            key = b"".join(bytes((len(raw),)) + raw
                           if spec.length == t.VARIABLE else raw
                           for spec, raw in r.fields[:len(
                               tmpl.key_fields)])
            values = decode_record(r)
            assert len(tmpl.fields) == len(values)
            # Sampled at 100.0 s: 100,000 ms since 1970 (unsigned64).
            ms = (100_000).to_bytes(8, "big")
            assert values.pop("flowStartMilliseconds") == ms
            assert values.pop("flowEndMilliseconds") == ms
            got[r.template_id, key] = {n: values[n]
                                       for n, _ in tmpl.agg_fields
                                       if n in values}
    assert set(got) == set(want)
    for k, values in got.items():
        tmpl = t.get(k[0])
        assert values == {n: want[k][n] for n, _ in tmpl.agg_fields
                          if n in want[k]}
        assert len(values) == len(tmpl.agg_fields) - 2


# -- counters --------------------------------------------------------

def test_counters_as_ovs_counts_them():
    frames, truth = tr.traffic_mix(7)
    bfd = tr.build_frame(proto=tr.IPPROTO_UDP, dport=3784)
    exp = Exporter(bridge_options(), 0.0)
    try:
        for f in frames + [bfd, bfd]:
            exp.sample_bridge(f, len(f), 1, None, 1.0)
        exp.run(2.0)
        s = exp.stats
        status = collections.Counter()
        for v in truth.values():
            status[v.kind, v.status] += v.packets
        assert s.pkts == len(frames)             # BFD is skipped
        assert s.ipv4_ok == status["ipv4", "ok"]
        assert s.ipv6_ok == status["ipv6", "ok"]
        assert s.ipv4_errs == status["ipv4", "err"] > 0
        assert s.ipv6_errs == status["ipv6", "err"] > 0
        assert s.errs == s.ipv4_errs + s.ipv6_errs
        assert s.flows == s.current_flows == len(truth)
        text = exp.show()
        assert ("flows=%d, current flows=%d, sampled pkts=%d, ipv4 ok=%d, "
                "ipv6 ok=%d, tx pkts=0" % (len(truth), len(truth), s.pkts,
                                           s.ipv4_ok, s.ipv6_ok)) in text
        assert ("pkts errs=%d, ipv4 errs=%d, ipv6 errs=%d, tx errs=0"
                % (s.errs, s.ipv4_errs, s.ipv6_errs)) in text
        exp.flush(3.0)
        assert exp.stats.current_flows == 0
        assert exp.stats.flows == len(truth)
    finally:
        exp.close(4.0)


def test_direction_switches():
    f = tr.build_frame()
    exp = Exporter(bridge_options(input_sampling=False), 0.0)
    try:
        exp.sample_bridge(f, len(f), 1, None, 1.0)
        exp.sample_bridge_batch([BridgeSample("br0", 1, None, 1, f,
                                              len(f))], 1.0)
        assert exp.stats.pkts == 0 and len(exp.cache) == 0
        exp.sample_bridge(f, len(f), 1, 2, 1.0)
        [flow] = cached(exp)
        domain, tid = KEY_PREFIX.unpack_from(flow.key)
        assert t.get(tid).direction == t.EGRESS
    finally:
        exp.close(2.0)


# -- collectors ------------------------------------------------------

@pytest.mark.parametrize("spec, host, port", [
    ("127.0.0.1:5000", "127.0.0.1", 5000),
    ("[::1]:5001", "::1", 5001),
    ("localhost:5002", "localhost", 5002),
    ("127.0.0.1", "127.0.0.1", 4739),
    ("[::1]", "::1", 4739),
    ("::1", "::1", 4739),
    ("collector.example.org", "collector.example.org", 4739),
    (" 10.0.0.1:65535 ", "10.0.0.1", 65535),
])
def test_target_syntax(spec, host, port):
    target = col.parse_target(spec)
    assert (target.host, target.port) == (host, port)


@pytest.mark.parametrize("spec", [
    "xyzzy:abc", "[::1", "1.2.3.4:99999", "1.2.3.4:0", "", "[::1]x",
    "[1.2.3.4]:5", "[::1]:", "host:-1", "a..b:1", "-bad:1", "1.2.3:4",
    "1.2.3.4:5:6:7",
])
def test_bad_target_syntax(spec):
    with pytest.raises(col.TargetError):
        col.parse_target(spec)


BAD_TARGETS = ("xyzzy:abc", "[::1", "1.2.3.4:99999",
               "no.such.host.invalid:4739")


def flush_one(exp, now):
    f = tr.build_frame(sport=int(now) % 60000 + 1)
    exp.sample_bridge(f, len(f), 1, None, now)
    exp.flush(now)


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_bad_targets_are_skipped_the_good_one_works(family):
    with UdpCollector(family) as good:
        exp = Exporter(bridge_options(BAD_TARGETS + (good.target,)), 0.0)
        try:
            assert len(exp.collectors) == 1
            assert [s for s, _ in exp.collectors.bad_targets] == \
                list(BAD_TARGETS)
            assert all(spec in why or repr(spec) in why
                       for spec, why in exp.collectors.bad_targets)
            text = exp.show()
            for spec in BAD_TARGETS:
                assert "bad target %s" % spec in text
            for i in range(5):
                flush_one(exp, 10.0 + i)
            assert good.wait_for(lambda d: len(d) >= 5, 5.0)
            session = parse_collector(good)
            assert session.problems == []
            assert len(session.records) == 5
            assert exp.stats.tx_pkts == 5 and exp.stats.tx_errs == 0
        finally:
            exp.close(100.0)


def test_host_name_target():
    """"localhost:PORT" resolves; listen on both loopbacks, as the name
    may map to either."""
    for _ in range(20):
        v4 = UdpCollector(socket.AF_INET)
        try:
            v6 = UdpCollector(socket.AF_INET6, port=v4.port)
        except OSError:
            v4.close()
            continue
        break
    try:
        exp = Exporter(bridge_options(["localhost:%d" % v4.port]), 0.0)
        try:
            assert len(exp.collectors) == 1
            flush_one(exp, 5.0)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not (
                    v4.datagrams or v6.datagrams):
                v4.receive(0.02)
                v6.receive(0.02)
            got = v4.datagrams + v6.datagrams
            assert len(got) == 1
            assert len(Session().parse(got[0][1])[0].records) == 1
        finally:
            exp.close(6.0)
    finally:
        v4.close()
        v6.close()


def test_default_port_is_4739():
    c = col.Collector("127.0.0.1")
    try:
        assert c.address == ("127.0.0.1", 4739)
    finally:
        c.close()


def test_unreachable_collector_beside_a_working_one():
    """A closed UDP port on loopback: the ICMP port unreachable turns
    later sends into ECONNREFUSED.  They are counted in tx errs; the
    working collector gets every message."""
    closed = free_port(socket.AF_INET)
    with UdpCollector(socket.AF_INET) as good:
        dead = "127.0.0.1:%d" % closed
        exp = Exporter(bridge_options([dead, good.target]), 0.0)
        try:
            assert len(exp.collectors) == 2
            n = 20
            for i in range(n):
                flush_one(exp, 10.0 + i)
                time.sleep(0.005)     # lets the ICMP error come back
            assert good.wait_for(lambda d: len(d) >= n, 5.0)
            good.receive(0.05)
            assert len(good.datagrams) == n
            st_ = exp.stats
            assert st_.tx_errs >= n // 2 - 1
            assert st_.tx_pkts + st_.tx_errs == 2 * n
            assert exp.collectors.find(dead).tx_errors == st_.tx_errs
            assert exp.collectors.find(good.target).tx_packets == n
            # What did not reach a collector is counted as not sent.
            assert st_.not_sent_flows == st_.tx_errs
            assert st_.not_sent_packets == st_.tx_errs
            session = parse_collector(good)
            assert session.problems == []
            assert "tx errs=%d" % st_.tx_errs in exp.show()
        finally:
            exp.close(100.0)


def test_reconfigure_flushes_as_forced_end_then_sends_templates_again():
    with UdpCollector(socket.AF_INET) as c:
        opts = bridge_options([c.target])
        exp = Exporter(opts, 0.0)
        try:
            f = tr.build_frame()
            exp.sample_bridge(f, len(f), 1, None, 1.0)
            new = bridge_options([c.target],
                                 cache=CacheOptions(10, 1 << 20))
            exp.reconfigure(new, 2.0)
            exp.sample_bridge(f, len(f), 1, None, 3.0)
            exp.run(13.0)
            assert c.wait_for(lambda d: len(d) >= 2, 5.0)
            session = parse_collector(c)
            assert session.problems == []
            [m1, m2] = session.messages
            assert [r.uint(136) for r in m1.data_records] == [FORCED_END]
            assert [r.uint(136) for r in m2.data_records] == [2]
            assert m2.templates, "templates start afresh"
            assert m2.sequence == 1
        finally:
            exp.close(20.0)


def test_target_that_resolves_later_joins_with_templates_first(
        monkeypatch):
    """A host name that does not resolve at first (a DNS outage) is tried
    again with backoff; once it resolves, the collector gets templates
    before any data, and nothing else is disturbed."""
    real = socket.getaddrinfo
    outage = [True]

    def getaddrinfo(host, *args, **kw):
        if outage[0] and host == "localhost":
            raise socket.gaierror(socket.EAI_AGAIN,
                                  "Temporary failure in name resolution")
        return real(host, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    with UdpCollector() as good, UdpCollector() as later:
        target = "localhost:%d" % later.port
        exp = Exporter(bridge_options((good.target, target)), 100.0)
        try:
            assert [c.spec for c in exp.collectors.collectors] == \
                [good.target]
            assert exp.collectors.next_retry() == 101.0
            assert exp.next_deadline() <= 101.0
            flush_one(exp, 100.5)              # before the name resolves
            exp.run(101.0)                     # still failing: backs off
            assert exp.collectors.next_retry() == 103.0
            outage[0] = False
            flush_one(exp, 102.0)
            exp.run(103.0)                     # resolves: joins
            assert exp.collectors.next_retry() is None
            assert [c.spec for c in exp.collectors.collectors] == \
                [good.target, target]
            flush_one(exp, 104.0)
            assert later.wait_for(lambda d: len(d) >= 1, 5.0)
            assert good.wait_for(lambda d: len(d) >= 3, 5.0)
            for c in (good, later):
                session = parse_collector(c)
                assert session.problems == []   # templates came first
            assert len(parse_collector(later).records) == 1
            assert len(parse_collector(good).records) == 3
        finally:
            exp.close(200.0)


def test_virtual_obs_id_follows_the_key(tmp_path):
    """other_config:virtual_obs_id goes after the key of every record as
    virtualObsID (PEN 6876, id 898, variable length), in templates of
    their own ids; tshark, ipfixDump and our parser accept the stream."""
    with UdpCollector() as c:
        exp = Exporter(bridge_options((c.target,),
                                      virtual_obs_id="vobs-é1"), 10.0)
        try:
            f = tr.build_frame(proto=tr.IPPROTO_TCP, sport=1, dport=2)
            exp.sample_bridge(f, len(f), 1, None, 10.0)
            exp.flush(11.0)
            assert c.wait_for(lambda d: len(d) >= 1, 5.0)
            judged = judge_collector(c, tmp_path)
            assert judged.problems == []
            [record] = judged.session.records
            base = t.template_id(t.L2_ETH, t.L3_IPV4, t.L4_TCP, t.INGRESS)
            assert record.template_id == base + t.VIRTUAL_OBS_OFFSET
            assert record.values[(6876, 898)] == "vobs-é1".encode()
            assert record.uint(2) == 1            # packetDeltaCount
            assert [r["packets"] for r in judged.tshark.records] == [1]
        finally:
            exp.close(20.0)


# -- end reasons, idle timeout and TCP end of flow --------------------------

def test_end_reasons_counted_and_shown():
    """Flows leave by idle timeout, end of flow, active timeout and
    forced end; ExporterStats counts each and show() prints them with
    the cache's options.  A change of rules flushes (forced end)."""
    opts = bridge_options(cache=CacheOptions(5, 1000, 1, True))
    exp = Exporter(opts, 0.0)
    udp = tr.ethernet(tr.ipv4(tr.udp(1, 2), proto=tr.IPPROTO_UDP))
    fin = tr.ethernet(tr.ipv4(tr.tcp(3, 4, flags=0x11),
                              proto=tr.IPPROTO_TCP))
    busy = tr.ethernet(tr.ipv4(tr.udp(5, 6), proto=tr.IPPROTO_UDP))
    try:
        text = exp.show()
        assert ("active timeout 5s, idle timeout 1s, max flows 1000, "
                "tcp end of flow on") in text
        exp.sample_bridge_batch([BridgeSample("br0", 1, None, 1, f, 60)
                                 for f in (udp, fin, busy)], 10.0)
        for i in range(1, 12):
            now = 10.0 + i * 0.5
            exp.sample_bridge_batch([BridgeSample("br0", 1, None, 1, busy,
                                                  60)], now)
            exp.run(now)
        st_ = exp.stats
        assert (st_.ended_idle, st_.ended_eof, st_.ended_active) == (1, 1, 1)
        assert "ended: idle timeout=1, active timeout=1, end of flow=1, " \
            "forced end=0, lack of resources=0" in exp.show()
        exp.reconfigure(bridge_options(cache=CacheOptions(5, 1000)), 16.0)
        assert (st_.ended_forced, len(exp.cache)) == (1, 0)
        assert (exp.cache.idle_timeout, exp.cache.tcp_end_of_flow) == (
            0, False)
        assert "idle timeout off, max flows 1000, tcp end of flow off" \
            in exp.show()
    finally:
        exp.close(20.0)
