"""Idle timeout and TCP end of flow, end to end: a real ovsdb-server
holds the IPFIX row (``other_config:cache-idle-timeout``,
``other_config:tcp-end-of-flow``), the daemon takes bridge samples on
its channel and exports to a loopback collector, read by our parser.

- Idle: flows sampled once leave with reason idle timeout (1) between
  the timeout and the timeout + 0.7 s after their last sample; a flow
  sampled every 0.25 s never leaves as idle while it is sampled (it
  leaves by active timeout, 2, in parts), and its parts add up exactly.
- TCP end of flow: a flow that saw FIN (and its last ACK, within the
  linger) and one that saw RST leave with reason end of flow detected
  (3) within 2 s of that sample; an open TCP flow stays cached; a
  sample after the end starts a new flow; totals exact over all parts.
- Changing either option flushes the cache as forced end (4).

Every arrival is checked against the record's own flowEndMilliseconds,
i.e. against when the daemon took the last sample, and that time
against when the test sent it.  Harness in ``test_daemon``.
"""

import collections
import time

import pytest
from support.daemon import Env, bridge_ipfix, record_flow_id, sample
from support.decoders import parse_collector
from traffic import ethernet, ipv4, tcp, truth_of, udp

from ovs_ipfix_py import upcall
from ovs_ipfix_py.flowcache import TCP_END_LINGER

pytestmark = pytest.mark.timeout(120)

REASON_IDLE, REASON_ACTIVE, REASON_EOF, REASON_FORCED = 1, 2, 3, 4
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
#: ms truncation of flowEndMilliseconds, and float noise.
MS = 0.0011


@pytest.fixture
def env(ovsdb):
    with Env(ovsdb) as e:
        yield e


def udp_frame(i):
    return ethernet(ipv4(udp(41000 + i, 9000, bytes(10 + i)),
                         src=f"192.0.2.{i + 1}", dst="198.51.100.1"))


def tcp_frame(port, flags, payload=0):
    return ethernet(ipv4(tcp(port, 443, flags=flags,
                             payload=bytes(payload)),
                         src="192.0.2.200", dst="198.51.100.2", proto=6))


def send(exporter, frames):
    """One datagram of samples; the time just before it was sent."""
    t = time.time()
    exporter.send(upcall.encode([sample(f) for f in frames]))
    return t


def records_with_arrival(collector):
    """[(arrival s, normalized record)] of every data record so far."""
    return [(m.arrival, r.normalized())
            for m in parse_collector(collector).messages
            for r in m.data_records]


def wait_records(collector, n, timeout=10.0):
    assert collector.wait_for(
        lambda _: len(records_with_arrival(collector)) >= n, timeout), \
        f"fewer than {n} records"
    collector.receive(0.2)
    return records_with_arrival(collector)


def parts_by_flow(records):
    """{FlowId: [(arrival, record)]} in arrival order."""
    out = collections.defaultdict(list)
    for arrival, r in records:
        out[record_flow_id(r)].append((arrival, r))
    return out


def assert_totals_exact(parts, truth):
    """Per flow, the parts' packets, octets and TCP flags add up to the
    truth's, their min/max IP lengths to its min/max."""
    assert set(parts) == set(truth)
    for fid, t in truth.items():
        rs = [r for _, r in parts[fid]]
        assert sum(r["packets"] for r in rs) == t.packets, fid
        assert sum(r["l2_octets"] for r in rs) == t.l2_octets, fid
        assert sum(r.get("octets", 0) for r in rs) == t.ip_octets, fid
        assert sum(r.get("sumsq", 0) for r in rs) == t.sumsq, fid
        assert min(r["min_len"] for r in rs) == t.min_ip_len, fid
        assert max(r["max_len"] for r in rs) == t.max_ip_len, fid
        flags = 0
        for r in rs:
            flags |= r.get("tcp_flags", 0)
        assert flags == t.tcp_flags, fid


def test_idle_flows_leave_on_time_active_ones_never(env):
    collector = env.collector()
    bridge_ipfix(env.ovsdb, "br0", collector, sampling=1,
                 cache_active_timeout=2,
                 **{"other_config:cache-idle-timeout": 1})
    exporter = env.exporter()
    show = exporter.wait_show(lambda s: ("br0", None) in s.exporters,
                              "the br0 exporter")
    counters = show.exporters[("br0", None)]
    assert (counters["idle_timeout"], counters["active_timeout"]) == (1, 2)

    quiet = [udp_frame(i) for i in range(3)]
    busy = udp_frame(9)
    sent = {}
    sent["quiet"] = send(exporter, quiet)
    busy_sent = []
    for _ in range(10):         # every 0.25 s for 2.5 s
        busy_sent.append(send(exporter, [busy]))
        collector.receive(0.25)     # (arrival times: read as they come)
    # Every flow ends idle, the busy one 1 s after its last sample.
    exporter.wait_show(
        lambda s: s.exporters[("br0", None)]["current_flows"] == 0,
        "every flow gone", timeout=10.0)
    collector.receive(0.5)
    records = records_with_arrival(collector)
    parts = parts_by_flow(records)
    truth = truth_of(quiet + [busy] * 10)
    assert_totals_exact(parts, truth)
    busy_fid = next(f for f in truth if f.src_port == 41009)
    assert len(records) == 3 + len(parts[busy_fid])

    for fid in truth:
        if fid == busy_fid:
            continue
        [(arrival, r)] = parts[fid]
        assert r["end_reason"] == REASON_IDLE
        end = r["end_ms"] / 1e3
        assert end >= sent["quiet"] - MS
        # Between the timeout and the timeout + 0.7 s of its last
        # sample (as the daemon took it).
        assert end + 1 - MS <= arrival <= end + 1 + 0.7, (arrival, end)

    busy_parts = parts[busy_fid]
    reasons = [r["end_reason"] for _, r in busy_parts]
    assert set(reasons) <= {REASON_ACTIVE, REASON_IDLE}, reasons
    assert reasons[-1] == REASON_IDLE
    assert busy_parts[-1][1]["end_ms"] / 1e3 >= busy_sent[-1] - MS
    for i, (arrival, r) in enumerate(busy_parts):
        start, end = r["start_ms"] / 1e3, r["end_ms"] / 1e3
        if r["end_reason"] == REASON_ACTIVE:
            assert arrival >= start + 2 - MS       # never early
        else:
            assert end + 1 - MS <= arrival <= end + 1 + 0.7
            # Idle only when the daemon really saw no sample for 1 s.
            if i + 1 < len(busy_parts):
                assert busy_parts[i + 1][1]["start_ms"] / 1e3 - end \
                    >= 1 - MS
        # Each part starts after the one before ended.
        if i:
            assert busy_parts[i - 1][1]["end_ms"] <= r["start_ms"]
    if max(b - a for a, b in zip(busy_sent, busy_sent[1:])) < 0.8:
        # The pacing held (no stall of the test itself): the flow left
        # in parts by active timeout while sampled, idle only at the end.
        assert reasons[:-1] and set(reasons[:-1]) == {REASON_ACTIVE}, \
            reasons

    show = exporter.show().exporters[("br0", None)]
    assert show["ended_idle"] == 3 + reasons.count(REASON_IDLE)
    assert show["ended_active"] == reasons.count(REASON_ACTIVE)
    assert show["ended_forced"] == show["ended_eof"] == 0


def test_tcp_end_of_flow(env):
    collector = env.collector()
    bridge_ipfix(env.ovsdb, "br0", collector, sampling=1,
                 cache_active_timeout=60,
                 **{"other_config:tcp-end-of-flow": "true"})
    exporter = env.exporter()
    show = exporter.wait_show(lambda s: ("br0", None) in s.exporters,
                              "the br0 exporter")
    assert show.exporters[("br0", None)]["tcp_end"] == 1

    closed = [tcp_frame(1001, SYN), tcp_frame(1001, ACK, 100),
              tcp_frame(1001, PSH | ACK, 300)]
    fin = tcp_frame(1001, FIN | ACK)
    last_ack = tcp_frame(1001, ACK)
    reset = [tcp_frame(1002, SYN), tcp_frame(1002, RST)]
    still_open = [tcp_frame(1003, SYN), tcp_frame(1003, ACK, 50)]
    send(exporter, closed + still_open + reset[:1])
    collector.receive(0.2)
    t_end = send(exporter, [fin, reset[1]])
    collector.receive(TCP_END_LINGER / 4)
    send(exporter, [last_ack])      # within the linger: same flow

    wait_records(collector, 2, timeout=5.0)
    collector.receive(0.5)
    records = records_with_arrival(collector)
    assert len(records) == 2, records
    for arrival, r in records:
        assert r["end_reason"] == REASON_EOF
        assert r["tcp_flags"] & (FIN | RST)
        assert arrival - t_end <= 2.0
        assert arrival >= t_end + TCP_END_LINGER - MS
    # The open flow stays cached.
    show = exporter.show().exporters[("br0", None)]
    assert show["current_flows"] == 1 and show["ended_eof"] == 2

    # After it left, a sample starts a new flow.
    after = tcp_frame(1001, ACK)
    send(exporter, [after])
    exporter.wait_show(
        lambda s: s.exporters[("br0", None)]["current_flows"] == 2,
        "a new flow after the end")
    # Changing an option is a forced end for what is cached.
    env.ovsdb.vsctl("set", "IPFIX", ".",
                    "other_config:cache-idle-timeout=30")
    records = wait_records(collector, 4, timeout=10.0)
    show = exporter.wait_show(
        lambda s: s.exporters[("br0", None)]["idle_timeout"] == 30,
        "the new option")
    parts = parts_by_flow(records)
    truth = truth_of(closed + [fin, last_ack] + reset + still_open
                     + [after])
    assert_totals_exact(parts, truth)
    by_port = {fid.src_port: [r["end_reason"] for _, r in rs]
               for fid, rs in parts.items()}
    assert by_port == {1001: [REASON_EOF, REASON_FORCED],
                       1002: [REASON_EOF], 1003: [REASON_FORCED]}
    # The ACK after the FIN is in the first part, the new flow has one.
    first, second = [r for _, r in parts[next(
        f for f in parts if f.src_port == 1001)]]
    assert (first["packets"], second["packets"]) == (5, 1)
    counters = show.exporters[("br0", None)]
    assert counters["ended_forced"] == 2 and counters["ended_eof"] == 2
