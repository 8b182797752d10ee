"""The plugin's export, received live by collectors nobody here wrote.

``ovs-ipfix-exporter`` runs on a private ovsdb-server; one ``IPFIX``
row (set with ovs-vsctl) names three targets at once: nfcapd (nfdump),
pmacct's nfacctd and a plain loopback socket whose messages go to tshark
and ipfixDump.  The traffic mix is replayed as bridge samples
(sampling 1), flushed with ``ovs-appctl ipfix/flush``; then

- nfcapd counts every flow and packet, with no sequence error and no bad
  packet, and ``nfdump`` reads each flow back with its addresses, ports,
  protocol, TOS, VLAN, packets and octets;
- nfacctd (print plugin, CSV) reads every IP flow back the same way (it
  skips non-IP flows);
- tshark decodes every message with no malformed message and no
  sequence warning (options records of the final statistics included)
  and gives every flow's counts, and ipfixDump reads the stream written
  as an RFC 5655 file with no error;
- all three show every flow's first and last seen within the replay;

over IPv4 to 127.0.0.1 and over IPv6 to [::1].  And all three show
each flow's first and last seen time as the daemon took its samples.
"""

import ipaddress
import socket
import time

import pytest
from support.collector import UdpCollector
from support.daemon import Env, sample
from support.decoders import (
    judge_collector,
    nfacctd_records,
    nfdump_records,
    parse_collector,
)
from support.switch import ExporterDaemon
from traffic import FlowId, build_frame, traffic_mix, truth_of

from ovs_ipfix_py import upcall

pytestmark = pytest.mark.timeout(120)

FAMILIES = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}


def _ip(text):
    return None if text in (None, "") else str(ipaddress.ip_address(text))


def flow_key(src_mac, dst_mac, vlan, src_ip, dst_ip, proto, sport, dport,
             tos):
    """What every collector can give back of a flow; absent values (no
    VLAN, no ports, no IP) read as 0 or None the same way for all."""
    return (src_mac.lower(), dst_mac.lower(), vlan or 0, _ip(src_ip),
            _ip(dst_ip), proto or 0, sport or 0, dport or 0, tos or 0)


def truth_totals(truth, ip_only=False):
    """{flow_key: [packets, IP octets]} of the generated truth."""
    out = {}
    for fid, t in truth.items():
        if ip_only and t.kind == "other":
            continue
        key = flow_key(fid.src_mac, fid.dst_mac, fid.vlan, fid.src_ip,
                       fid.dst_ip, fid.proto, fid.src_port, fid.dst_port,
                       t.tos)
        entry = out.setdefault(key, [0, 0])
        entry[0] += t.packets
        entry[1] += t.ip_octets
    return out


def record_totals(records):
    """{flow_key: [packets, octets]} of normalized collector records."""
    out = {}
    for r in records:
        key = flow_key(r["src_mac"], r["dst_mac"], r.get("vlan"),
                       r.get("src_ip"), r.get("dst_ip"), r.get("proto"),
                       r.get("src_port"), r.get("dst_port"), r.get("tos"))
        entry = out.setdefault(key, [0, 0])
        entry[0] += r["packets"]
        entry[1] += r.get("octets") or 0
    return out


def tshark_flow_id(r):
    return FlowId(r["src_mac"], r["dst_mac"], r["ethertype"], r.get("vlan"),
                  r.get("ip_version"), _ip(r.get("src_ip")),
                  _ip(r.get("dst_ip")), r.get("proto"), r.get("src_port"),
                  r.get("dst_port"), r.get("icmp_type"), r.get("icmp_code"))


@pytest.mark.parametrize("family", FAMILIES)
def test_live_collectors_read_the_export(ovsdb, family, tmp_path):
    fam = FAMILIES[family]
    frames, truth = traffic_mix(seed=21, flows_per_kind=2)
    plugin = ExporterDaemon(ovsdb)
    sink = UdpCollector(fam)
    try:
        plugin.start()
        with nfdump_records(fam) as nf, nfacctd_records(fam) as nfa:
            targets = ",".join(f'"{c.target}"' for c in (sink, nf, nfa))
            ovsdb.vsctl(
                "add-br", "br0", "--", "--id=@i", "create", "IPFIX",
                f"targets=[{targets}]", "sampling=1", "obs_domain_id=9",
                "obs_point_id=3", "cache_active_timeout=60",
                "cache_max_flows=10000",
                "--", "set", "Bridge", "br0", "ipfix=@i",
                # OpenFlow port 1 (the replay's) is p1, ifindex 1: the
                # records carry its ifindex and name (variable length).
                "--", "add-port", "br0", "p1", "--", "set", "Interface",
                "p1", "ofport=1", "ifindex=1")
            plugin.wait_counter("bridge br0", "flows", 0)
            before_replay = time.time()
            plugin.replay(frames, "--bridge=br0")
            plugin.wait_counter("bridge br0", "sampled pkts", len(frames))
            all_counted = time.time()
            plugin.appctl("ipfix/flush")
            assert sink.wait_for(lambda _: len(
                parse_collector(sink).records) >= len(truth), 10.0)
            # The same datagrams went to nf and nfa: give them a moment
            # to read their sockets before they are stopped.
            sink.receive(0.3)
            shown = plugin.counters()["bridge br0"]
            assert shown["tx errs"] == 0 and shown["tx pkts"] > 0
        # Final exporter statistics (options template and data) on exit.
        before = len(sink.datagrams)
        plugin.stop()
        assert sink.wait_quiet(before, quiet=0.2)
        judged = judge_collector(sink, tmp_path)
    finally:
        plugin.stop()
        sink.close()

    want = truth_totals(truth)
    # nfcapd/nfdump: every flow, non-IP ones included (0 octets: they
    # carry layer2OctetDeltaCount only).
    assert nf.stats["flows"] == len(truth)
    assert nf.stats["packets"] == sum(t.packets for t in truth.values())
    assert nf.stats["bytes"] == sum(t.ip_octets for t in truth.values())
    assert nf.stats["sequence_errors"] == 0 and nf.stats["bad_packets"] == 0
    assert record_totals(nf.records) == want
    assert {r["obs_domain_id"] for r in nf.records} == {9}
    assert {r["obs_point_id"] for r in nf.records} == {3}
    assert {r["ingress_if"] for r in nf.records} == {1}

    # nfacctd: every IP flow (pmacct drops non-IP records).
    assert record_totals(nfa.records) == truth_totals(truth, ip_only=True)
    assert {r["ingress_if"] for r in nfa.records} == {1}

    # tshark, ipfixDump and our parser over the same stream.
    assert judged.problems == []
    assert judged.session.options_records, "no final statistics"
    got = {}
    for r in judged.tshark.records:
        fid = tshark_flow_id(r)
        assert fid not in got, fid
        got[fid] = (r["packets"], r["l2_octets"], r.get("octets", 0),
                    r["end_reason"])
    assert got == {fid: (t.packets, t.l2_octets, t.ip_octets, 4)
                   for fid, t in truth.items()}
    # Every collector shows first and last seen within the replay (the
    # daemon took every sample between these two moments).
    for name, records in (("nfdump", nf.records), ("nfacctd", nfa.records),
                          ("tshark", judged.tshark.records)):
        assert records and all(
            before_replay - 0.01 <= r["flow_start"] <= r["flow_end"]
            <= all_counted + 0.01 for r in records), name
    # Options records are sequenced too: the last message's sequence
    # number counts every data record before it.
    last = judged.tshark.messages[-1]
    assert last["sequence"] + last["records"] == len(truth) + len(
        judged.tshark.options)



def _five_tuple(r):
    return (_ip(r.get("src_ip")), _ip(r.get("dst_ip")), r.get("src_port"),
            r.get("dst_port"), r.get("proto"))


def test_collectors_show_first_and_last_seen(ovsdb, tmp_path):
    """With no option set, nfdump (nfcapd), nfacctd and tshark show
    each flow's first and last seen time, within 10 ms of when the
    daemon took its first and last sample, and so its duration.

    When the daemon took a sample is bracketed: after the test sent
    it, before ``ipfix/show`` counted it.  Three flows (IPv4 UDP and
    TCP through the C fast path, IPv6 through the general one) are
    sampled, then the first two again 0.4 s later; a flush sends
    them."""
    flows = [build_frame(proto=17, sport=5001, dport=53),
             build_frame(proto=6, sport=5002, dport=443),
             build_frame(ip_version=6, proto=17, sport=5003, dport=53)]
    with Env(ovsdb) as env:
        sink = env.collector()
        with nfdump_records() as nf, nfacctd_records(
                aggregate=("src_host", "dst_host", "src_port", "dst_port",
                           "proto", "timestamp_start", "timestamp_end",
                           "export_proto_seqno"),
                extra_config=("timestamps_utc: true",
                              "timestamps_secs: false")) as nfa:
            targets = ",".join(f'"{c.target}"' for c in (sink, nf, nfa))
            ovsdb.vsctl(
                "add-br", "br0", "--", "set", "Bridge", "br0",
                "datapath_type=dummy", "--", "--id=@i", "create", "IPFIX",
                f"targets=[{targets}]", "sampling=1",
                "cache_active_timeout=60", "cache_max_flows=10000",
                "--", "set", "Bridge", "br0", "ipfix=@i")
            exporter = env.exporter()
            exporter.wait_show(lambda s: ("br0", None) in s.exporters,
                               "the br0 exporter")

            def take(frames, total):
                """Send; (sent, counted): the daemon took them between."""
                sent = time.time()
                exporter.send(upcall.encode([sample(f) for f in frames]))
                exporter.wait_show(
                    lambda s: s.exporters[("br0", None)]["pkts"] >= total,
                    f"{total} samples")
                return sent, time.time()

            first = take(flows, 3)
            time.sleep(0.4)
            last = take(flows[:2], 5)
            exporter.appctl("ipfix/flush")
            assert sink.wait_for(
                lambda _: len(parse_collector(sink).records) >= 3, 10.0)
            sink.receive(0.3)
        judged = judge_collector(sink, tmp_path)

    want = {}
    ours = {}
    for r in parse_collector(sink).normalized():
        ours[_five_tuple(r)] = (r["flow_start"], r["flow_end"])
    for i, f in enumerate(flows):
        fid = next(iter(truth_of([f])))
        key = (fid.src_ip, fid.dst_ip, fid.src_port, fid.dst_port,
               fid.proto)
        want[key] = (first, last if i < 2 else first)
    assert set(ours) == set(want)
    tolerance = 0.010
    for name, records in (("ours", parse_collector(sink).normalized()),
                          ("nfdump", nf.records),
                          ("nfacctd", nfa.records),
                          ("tshark", judged.tshark.records)):
        got = {_five_tuple(r): (r["flow_start"], r["flow_end"])
               for r in records}
        assert set(got) == set(want), (name, got)
        for key, (start, end) in got.items():
            (s0, s1), (e0, e1) = want[key]
            assert s0 - tolerance <= start <= s1 + tolerance, (name, key)
            assert e0 - tolerance <= end <= e1 + tolerance, (name, key)
            # The same times as the records carry (ms precision).
            assert abs(start - ours[key][0]) < 0.0011, (name, key)
            assert abs(end - ours[key][1]) < 0.0011, (name, key)
            if key[2] == 5003:
                assert end == start
            else:
                assert 0.4 <= end - start < 5.0, (name, key)
