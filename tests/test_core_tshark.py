"""The judge: the traffic mix through the core, decoded by tshark.

tests/traffic.py's traffic mix (IPv4/IPv6 x TCP/UDP/SCTP/ICMP, VLAN,
QinQ, ARP, LLC, IPv4 options and fragments, IPv6 extension headers, GRE,
truncated frames) goes through the core (an Exporter with sampling 1)
to a loopback UDP collector; the datagrams are written to a pcap and
decoded by tshark's cflow dissector.  It must report no malformed
message and no sequence warning, and every flow exactly as generated:
packets, octets, layer 2 octets, min/max IP length, sum of squares, TCP
flags, the rest of the key, end reason and times.  The same stream,
written as an RFC 5655 file, must read cleanly with ipfixDump.
"""

import os
import socket

import pytest
import traffic as tr
from support.collector import UdpCollector
from support.daemon import flow_id
from support.decoders import ipfixdump_check, parse_collector, tshark_decode

from ovs_ipfix_py import interfaces
from ovs_ipfix_py.exporter import Exporter
from ovs_ipfix_py.options import (
    BridgeExporterOptions,
    CacheOptions,
    ExportOptions,
)
from ovs_ipfix_py.upcall import BridgeSample

T0 = 1700000000.0
ACTIVE_TIMEOUT, FORCED_END = 2, 4


CACHED = CacheOptions(3600, 1 << 20)


def run_mix(tmp_path, family=socket.AF_INET, max_size=1400, cache=CACHED,
            batch=False, seed=11):
    """Push the mix through an exporter, flush it, close it; returns
    (tshark decode, truth, first/last sample time per flow, exporter
    stats)."""
    frames, truth = tr.traffic_mix(seed)
    times = {}
    with UdpCollector(family) as c:
        opts = BridgeExporterOptions(
            "br0", ExportOptions(targets=(c.target,), cache=cache,
                                 max_message_size=max_size),
            sampling=1, obs_domain_id=77, obs_point_id=5)
        exp = Exporter(opts, T0)
        # Port 1 as OVSDB would describe it: ifindex 1, a name.
        exp.set_ports({1: interfaces.Interface(1, "eth1", ifindex=1)})
        try:
            for i, f in enumerate(frames):
                now = T0 + 1 + i * 0.001
                fid = tr.flow_id_of(f)
                times[fid] = (times.get(fid, (now,))[0], now)
                if batch:
                    exp.sample_bridge_batch(
                        [BridgeSample("br0", 1, None, 0xFFFFFFFF, f,
                                      len(f))], now)
                else:
                    exp.sample_bridge(f, len(f), 1, None, now)
                exp.run(now)
            exp.flush(T0 + 2)
        finally:
            # Flushes (nothing left) and sends final statistics.
            exp.close(T0 + 3)
        sent = exp.stats.tx_pkts
        assert c.wait_for(lambda d: len(d) >= sent, 10.0)
        c.receive(0.05)
        assert len(c.datagrams) == sent
        stats = exp.stats.as_dict()
        stats["exporting_process_id"] = exp.exporting_process_id
        assert max(len(d) for _, d in c.datagrams) <= max_size
        session = parse_collector(c)
        assert session.problems == []
        pcap = os.path.join(tmp_path, "ipfix.pcap")
        c.write_pcap(pcap)
        decoded = tshark_decode(pcap, c.port)
        ipfix = os.path.join(tmp_path, "ipfix.ipfix")
        c.write_ipfix_file(ipfix)
        ok, output = ipfixdump_check(ipfix)
        assert ok, output
    return decoded, truth, times, stats


def check_flows(decoded, truth, times, end_reason, aggregate=False):
    assert decoded.warnings == []
    got = {}
    for rec in decoded.records:
        fid = flow_id(rec)
        if aggregate and fid in got:
            g = got[fid]
            for k in ("packets", "octets", "l2_octets", "sumsq"):
                if k in rec:
                    g[k] += rec[k]
            g["min_len"] = min(g.get("min_len", 0), rec.get("min_len", 0))
            g["max_len"] = max(g.get("max_len", 0), rec.get("max_len", 0))
            g["tcp_flags"] = g.get("tcp_flags", 0) | rec.get("tcp_flags",
                                                              0)
            g["flow_start"] = min(g["flow_start"], rec["flow_start"])
            g["flow_end"] = max(g["flow_end"], rec["flow_end"])
            continue
        assert fid not in got, "flow exported twice: %s" % (fid,)
        got[fid] = dict(rec)
    assert set(got) == set(truth)
    for fid, want in truth.items():
        rec = got[fid]
        is_ip = want.kind != "other"
        assert rec["packets"] == want.packets, fid
        assert rec["l2_octets"] == want.l2_octets, fid
        assert rec["end_reason"] == end_reason, fid
        assert rec["eth_header_len"] == want.eth_header_len, fid
        assert rec.get("dot1q_priority") == want.vlan_pcp, fid
        assert rec.get("dot1q_vlan") == fid.vlan, fid
        assert rec["obs_point_id"] == 5 and rec["ingress_if"] == 1
        assert rec["if_name"] == "eth1"
        if is_ip:
            assert rec["octets"] == want.ip_octets, fid
            assert rec["sumsq"] == want.sumsq, fid
            assert (rec["min_len"], rec["max_len"]) == \
                (want.min_ip_len, want.max_ip_len), fid
            assert (rec["ttl"], rec["tos"]) == (want.ttl, want.tos), fid
            assert (rec["dscp"], rec["precedence"]) == \
                (want.dscp, want.precedence), fid
            if fid.ip_version == 6:
                assert rec["flow_label"] == want.flow_label, fid
        else:
            assert "octets" not in rec and "ttl" not in rec, fid
        if fid.proto == tr.IPPROTO_TCP and fid.src_port is not None:
            assert rec["tcp_flags"] == want.tcp_flags, fid
        else:
            assert rec.get("tcp_flags", 0) == 0, fid
        first, last = times[fid]
        assert abs(rec["flow_start"] - first) < 2e-6, fid
        assert abs(rec["flow_end"] - last) < 2e-6, fid
    return got


@pytest.mark.parametrize("max_size", [1400, 512])
def test_traffic_mix_cached(tmp_path, max_size):
    decoded, truth, times, stats = run_mix(tmp_path, max_size=max_size)
    check_flows(decoded, truth, times, FORCED_END)
    # Many records per message, as tshark counts them.
    records = sum(m["records"] for m in decoded.messages)
    assert records == len(truth) + 1          # and one statistics record
    [opt] = decoded.options
    assert opt["exporting_process_id"] == stats["exporting_process_id"]
    assert (opt["not_sent_flows"], opt["not_sent_packets"],
            opt["not_sent_octets"]) == (0, 0, 0)
    assert len(decoded.messages) < records / 3
    assert all(m["obs_domain_id"] == 77 for m in decoded.messages)
    kinds = {(v.kind, v.status) for v in truth.values()}
    assert {("ipv4", "ok"), ("ipv4", "err"), ("ipv6", "ok"),
            ("ipv6", "err"), ("other", "other")} <= kinds
    assert stats["ipv4_errs"] > 0 and stats["ipv6_errs"] > 0
    assert stats["tx_errs"] == 0


def test_traffic_mix_not_cached(tmp_path):
    """Both cache options 0: each sample leaves at once, reason active
    timeout; records of one flow add up to the flow."""
    decoded, truth, times, stats = run_mix(tmp_path,
                                           cache=CacheOptions(0, 0))
    data = [r for r in decoded.records]
    assert len(data) == sum(v.packets for v in truth.values())
    check_flows(decoded, truth, times, ACTIVE_TIMEOUT, aggregate=True)
    assert stats["flows"] == len(data)


def test_traffic_mix_over_ipv6_loopback(tmp_path):
    decoded, truth, times, _ = run_mix(tmp_path, family=socket.AF_INET6,
                                       seed=12)
    check_flows(decoded, truth, times, FORCED_END)


def test_traffic_mix_through_the_fast_path(tmp_path):
    """sample_bridge_batch: the mix has padded frames whose IP packet
    ends inside the L4 header; the fast path must not read the
    padding."""
    decoded, truth, times, _ = run_mix(tmp_path, batch=True, seed=13)
    check_flows(decoded, truth, times, FORCED_END)
