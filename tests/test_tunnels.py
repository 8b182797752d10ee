"""Tunnel metadata and interface identity in the records, as OVS keys and
exports them (ofproto-dpif-ipfix.c): the exporter with its bridge's
ports, over real loopback sockets, read back with our decoder and tshark.

The end-to-end tests (OVSDB ports followed live, ``ovs-ipfix-replay
--tunnel-port`` over a mixed capture) are in test_daemon_tunnels.py.
"""

import socket

import pytest
import traffic as tr
from support.collector import UdpCollector
from support.decoders import parse_collector, tshark_decode
from support.inputs import bridge_options

from ovs_ipfix_py import interfaces
from ovs_ipfix_py import templates as t
from ovs_ipfix_py.exporter import Exporter
from ovs_ipfix_py.upcall import Tunnel

A1, A2 = b"\xc6\x33\x64\x01", b"\xc6\x33\x64\x02"      # 198.51.100.1/2
PORTS = {
    1: interfaces.Interface(1, "p1", ifindex=21),
    2: interfaces.Interface(2, "vxlan0", ifindex=22, type="vxlan"),
    3: interfaces.Interface(3, "gre-to-b", type="gre"),
    4: interfaces.Interface(4, "gnv", if_type=6, description="geneve",
                            type="geneve"),
}
FRAME = tr.build_frame(src_ip="10.0.0.1", dst_ip="10.0.0.2", sport=1234,
                       dport=80)


@pytest.fixture
def collector():
    with UdpCollector(socket.AF_INET) as c:
        yield c


def export(collector, samples, ports=PORTS, **export_options):
    """Samples (input port, output port, tunnel[, frame]) through an
    exporter with ``ports``; flush; our decoder's normalized records."""
    collector.datagrams.clear()
    collector.senders.clear()
    exp = Exporter(bridge_options([collector.target], **export_options),
                   100.0)
    exp.set_ports(ports)
    try:
        for in_port, out_port, tunnel, *frame in samples:
            f = frame[0] if frame else FRAME
            exp.sample_bridge(f, len(f), in_port, out_port, 100.0,
                              tunnel=tunnel)
        exp.flush(100.0)
        sent = exp.stats.tx_pkts
        assert collector.wait_for(lambda d: len(d) >= sent, 5.0)
    finally:
        exp.close(101.0)
    session = parse_collector(collector)
    assert session.problems == []
    return [r.normalized() for r in session.records if not r.options]


def test_same_inner_flow_in_two_vnis_gives_two_records(collector):
    recs = export(collector, [
        (2, None, Tunnel(A1, A2, 49152, 4789, 5001, 1)),
        (2, None, Tunnel(A1, A2, 49152, 4789, 5002, 1)),
        (2, None, Tunnel(A1, A2, 49152, 4789, 5002, 1)),
    ])
    assert len(recs) == 2
    by_key = {r["tunnel_key"]: r for r in recs}
    assert set(by_key) == {"001389", "00138a"}      # 3-byte VNIs
    assert by_key["00138a"]["packets"] == 2
    for r in recs:
        tid = t.template_id(t.L2_ETH, t.L3_IPV4, t.L4_UDP, t.INGRESS, True)
        assert r["template_id"] == tid
        assert (r["tunnel_src"], r["tunnel_dst"], r["tunnel_proto"],
                r["tunnel_src_port"], r["tunnel_dst_port"],
                r["tunnel_type"]) == ("198.51.100.1", "198.51.100.2", 17,
                                      49152, 4789, 1)
        assert (r["ingress_if"], r["if_name"], r["if_descr"],
                r["ingress_if_type"]) == (22, "vxlan0", "", 0)


def test_gre_key_is_4_bytes_and_geneve_3(collector):
    recs = export(collector, [
        (3, None, Tunnel(A1, A2, 0, 0, 0x0102030405, 2)),
        (4, None, Tunnel(A1, A2, 7, 6081, 0x0102030405, 7)),
    ])
    got = {r["tunnel_type"]: r for r in recs}
    assert got[2]["tunnel_key"] == "02030405"
    assert got[2]["tunnel_proto"] == 47
    assert got[7]["tunnel_key"] == "030405"
    # Geneve is UDP: 17 (OVS 3.1 sends 0, a defect not copied: README).
    assert got[7]["tunnel_proto"] == 17
    assert (got[7]["if_name"], got[7]["if_descr"],
            got[7]["ingress_if_type"]) == ("gnv", "geneve", 6)


def test_the_samples_tunnel_type_wins_over_the_ports(collector):
    """A GRE-keyed sample on a port OVSDB calls vxlan: the channel says
    what the datapath decapsulated (OVS's ports only ever carry their own
    type, so this is where we have to choose)."""
    [r] = export(collector, [(2, None, Tunnel(A1, A2, 0, 0, 0xA0B0C0D0,
                                              2))])
    assert (r["tunnel_type"], r["tunnel_key"], r["tunnel_proto"]) == (
        2, "a0b0c0d0", 47)
    # Type 0 (unknown) takes the port's.
    [r] = export(collector, [(2, None, Tunnel(A1, A2, 1, 4789, 7, 0))])
    assert (r["tunnel_type"], r["tunnel_key"]) == (1, "000007")


@pytest.mark.parametrize("in_port", [1, 99], ids=["system-port",
                                                   "unknown-port"])
def test_metadata_on_a_port_that_is_no_tunnel_is_ignored(collector,
                                                         in_port):
    """OVS (dpif_ipfix_find_tunnel_port) keys by the tunnel only on a
    tunnel port: elsewhere the sample is untunnelled.  An unknown port
    exports ifindex 0, type 0, empty name and description."""
    [r] = export(collector, [
        (in_port, None, Tunnel(A1, A2, 1, 4789, 5001, 1)),
        (in_port, None, Tunnel(A1, A2, 1, 4789, 5002, 1)),
    ])
    assert r["template_id"] == t.template_id(t.L2_ETH, t.L3_IPV4,
                                             t.L4_UDP, t.INGRESS)
    assert "tunnel_key" not in r and r["packets"] == 2
    want = (21, "p1") if in_port == 1 else (0, "")
    assert (r["ingress_if"], r["if_name"], r["ingress_if_type"]) == \
        want + (0,)


def test_tunnel_sampling_disabled(collector):
    """other_config:enable-tunnel-sampling=false: OVS keys no sample by
    its tunnel (vswitch.xml: tunnel sampling off)."""
    recs = export(collector, [
        (2, None, Tunnel(A1, A2, 1, 4789, 5001, 1)),
        (2, None, Tunnel(A1, A2, 1, 4789, 5002, 1)),
    ], enable_tunnel_sampling=False)
    assert len(recs) == 1 and "tunnel_key" not in recs[0]
    assert recs[0]["if_name"] == "vxlan0"


def test_ipv6_underlay_has_zero_ipv4_addresses(collector):
    """OVS's tunnel elements are IPv4 only: an IPv6 underlay gives
    0.0.0.0 (README), the VNI still tells tenants apart."""
    v6a, v6b = bytes(15) + b"\x01", bytes(15) + b"\x02"
    recs = export(collector, [(2, None, Tunnel(v6a, v6b, 5, 4789, 1, 1)),
                              (2, None, Tunnel(v6a, v6b, 5, 4789, 2, 1))])
    assert len(recs) == 2
    assert {(r["tunnel_src"], r["tunnel_dst"]) for r in recs} == {
        ("0.0.0.0", "0.0.0.0")}


def test_egress_takes_the_output_ports_tunnel(collector):
    """As OVS: with an output port, the tunnel is the output port's
    (set by the datapath's set(tunnel) action); the input port's is not
    looked at."""
    recs = export(collector, [
        (1, 2, Tunnel(A1, A2, 1, 4789, 5001, 1)),    # out on vxlan0
        (2, 1, Tunnel(A1, A2, 1, 4789, 5001, 1)),    # out on p1
    ])
    by_out = {r["egress_if"]: r for r in recs}
    assert by_out[22]["tunnel_key"] == "001389"
    assert by_out[22]["template_id"] == t.template_id(
        t.L2_ETH, t.L3_IPV4, t.L4_UDP, t.EGRESS, True)
    assert (by_out[22]["if_name"], by_out[22]["egress_if_name"]) == (
        "p1", "vxlan0")
    assert "tunnel_key" not in by_out[21]


def test_ports_are_followed_without_a_flush(collector):
    """A renamed or renumbered port changes the key of the samples that
    follow; the flows cached stay (a port change is no option change)."""
    exp = Exporter(bridge_options([collector.target]), 100.0)
    exp.set_ports(PORTS)
    try:
        exp.sample_bridge(FRAME, len(FRAME), 1, None, 100.0)
        exp.sample_bridge_batch([tr_sample(1)], 100.0)      # C path too
        assert len(exp.cache) == 1
        renamed = dict(PORTS)
        renamed[1] = PORTS[1]._replace(name="uplink", ifindex=31)
        exp.set_ports(renamed)
        assert len(exp.cache) == 1 and exp.stats.tx_pkts == 0
        exp.sample_bridge_batch([tr_sample(1)], 100.0)
        exp.sample_bridge(FRAME, len(FRAME), 1, None, 100.0)
        exp.flush(100.0)
        sent = exp.stats.tx_pkts
        assert collector.wait_for(lambda d: len(d) >= sent, 5.0)
    finally:
        exp.close(101.0)
    recs = [r.normalized() for r in parse_collector(collector).records
            if not r.options]
    assert sorted((r["if_name"], r["ingress_if"], r["packets"])
                  for r in recs) == [("p1", 21, 2), ("uplink", 31, 2)]


def tr_sample(port):
    from ovs_ipfix_py.upcall import BridgeSample
    return BridgeSample("br0", port, None, 0xFFFFFFFF, FRAME, len(FRAME))


def record_length(r):
    return sum(len(raw) + (1 if spec.length == 65535 else 0)
               for spec, raw in r.fields)


def test_records_of_one_template_with_different_lengths(collector,
                                                        tmp_path):
    """Two ports whose names differ in length: records of one template
    differ in length (RFC 7011 section 7), all are exported, no message
    passes max-message-size, and each message is full: the record that
    opens the next one would not have fitted."""
    ports = {1: interfaces.Interface(1, "a"),
             2: interfaces.Interface(2, "b" * 60, description="d" * 100)}
    samples = [(1 + i % 2, None, None,
                tr.build_frame(sport=1000 + i, dport=53))
               for i in range(300)]
    recs = export(collector, samples, ports, max_message_size=512)
    assert len(recs) == 300
    assert {r["if_name"] for r in recs} == {"a", "b" * 60}
    session = parse_collector(collector)
    data = [m for m in session.messages if m.data_records]
    assert all(m.length <= 512 for m in session.messages)
    lengths = {record_length(r) for m in data for r in m.data_records}
    assert len(lengths) == 2
    for m, nxt in zip(data, data[1:]):
        first = nxt.data_records[0]
        same_set = m.sets[-1].set_id == first.template_id
        assert m.length + record_length(first) + (0 if same_set else 4) \
            > 512
    # tshark reads them all, names included.
    pcap = str(tmp_path / "c.pcap")
    collector.write_pcap(pcap)
    decoded = tshark_decode(pcap, collector.port)
    assert decoded.warnings == []
    assert sorted(r["if_name"] for r in decoded.records) == sorted(
        r["if_name"] for r in recs)


def test_tshark_reads_the_tunnel_elements(collector, tmp_path):
    """tshark names no VMware element: its template shows
    "893 [pen: VMware Inc.]" and its records the values in order; the
    reader pairs them, and they equal ours."""
    export(collector, [(2, None, Tunnel(A1, A2, 49152, 4789, 5001, 1)),
                       (3, None, Tunnel(A2, A1, 0, 0, 0xDEADBEEF, 2))])
    ours = sorted((r.normalized() for r in parse_collector(
        collector).records if not r.options), key=lambda r: r["tunnel_type"])
    pcap = str(tmp_path / "c.pcap")
    collector.write_pcap(pcap)
    decoded = tshark_decode(pcap, collector.port)
    assert decoded.warnings == []
    theirs = sorted(decoded.records, key=lambda r: r["tunnel_type"])
    keys = ("tunnel_src", "tunnel_dst", "tunnel_proto", "tunnel_src_port",
            "tunnel_dst_port", "tunnel_type", "tunnel_key", "ingress_if",
            "if_name", "packets")
    assert [[r[k] for k in keys] for r in theirs] == \
        [[r[k] for k in keys] for r in ours]
    assert [r["tunnel_key"] for r in theirs] == ["001389", "deadbeef"]
