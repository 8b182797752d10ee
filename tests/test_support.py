"""Tests of the test support library itself, before any exporter exists.

IPFIX messages are built here by hand with struct, straight from RFC
7011 (section 3: header, sets, template records, data records), sent
over real loopback sockets, and read back by every judge: our parser,
tshark, nfcapd+nfdump, nfacctd and ipfixDump.  Broken streams check
that the judges do complain.  OvsdbServer is run for real.
"""

import os
import signal
import socket
import struct
import subprocess
import time

import pytest
from support import (
    MissingTool,
    descendant_pids,
    pid_alive,
    read_pidfile,
    require,
    wait_gone,
)
from support.collector import TcpCollector, UdpCollector
from support.decoders import (
    NfacctdCollector,
    NfcapdCollector,
    Session,
    ipfixdump_check,
    ipfixdump_stats,
    judge_collector,
    parse_collector,
    parse_messages,
    tshark_decode,
    tshark_records,
)
from support.ovsdb import OvsdbServer, OvsError

EXPORT_TIME = 1700000000

# -- a hand-written IPFIX encoder (RFC 7011 section 3) ----------------

_MAC_KEYS = {"src_mac", "dst_mac"}
_IP_KEYS = {"src_ip", "dst_ip"}

#: (element id, length, key): an IPv4 layout in OVS's order.
IPV4_TEMPLATE = [
    (138, 4, "obs_point_id"), (61, 1, "flow_direction"),
    (56, 6, "src_mac"), (80, 6, "dst_mac"), (256, 2, "ethertype"),
    (240, 1, "eth_header_len"), (60, 1, "ip_version"), (192, 1, "ttl"),
    (4, 1, "proto"), (195, 1, "dscp"), (196, 1, "precedence"),
    (5, 1, "tos"), (8, 4, "src_ip"), (12, 4, "dst_ip"),
    (7, 2, "src_port"), (11, 2, "dst_port"), (6, 2, "tcp_flags"),
    (10, 4, "ingress_if"), (14, 4, "egress_if"),
    (158, 4, "start_delta_us"), (159, 4, "end_delta_us"),
    (2, 8, "packets"), (352, 8, "l2_octets"), (136, 1, "end_reason"),
    (198, 8, "sumsq"), (25, 8, "min_len"), (26, 8, "max_len"),
    (1, 8, "octets"),
]
#: IPv6 + VLAN + ICMPv6 layout.
IPV6_TEMPLATE = [
    (138, 4, "obs_point_id"), (56, 6, "src_mac"), (80, 6, "dst_mac"),
    (256, 2, "ethertype"), (58, 2, "vlan"), (243, 2, "dot1q_vlan"),
    (244, 1, "dot1q_priority"), (60, 1, "ip_version"), (4, 1, "proto"),
    (27, 16, "src_ip"), (28, 16, "dst_ip"), (31, 4, "flow_label"),
    (178, 1, "icmp_type"), (179, 1, "icmp_code"), (2, 8, "packets"),
    (352, 8, "l2_octets"), (136, 1, "end_reason"), (1, 8, "octets"),
]
#: Exporting process statistics (RFC 7011 section 4.3), scope 144.
STATS_TEMPLATE = [
    (144, 4, "exporting_process_id"), (166, 8, "not_sent_flows"),
    (167, 8, "not_sent_packets"), (168, 8, "not_sent_octets"),
]

FLOW_A = {
    "obs_point_id": 456, "flow_direction": 0,
    "src_mac": "02:00:00:00:00:01", "dst_mac": "02:00:00:00:00:02",
    "ethertype": 0x0800, "eth_header_len": 14, "ip_version": 4,
    "ttl": 64, "proto": 6, "dscp": 10, "precedence": 1, "tos": 40,
    "src_ip": "10.0.0.1", "dst_ip": "10.0.0.2", "src_port": 1234,
    "dst_port": 80, "tcp_flags": 0x12, "ingress_if": 1, "egress_if": 2,
    "start_delta_us": 5000, "end_delta_us": 1000, "packets": 3,
    "l2_octets": 342, "end_reason": 2, "sumsq": 30000, "min_len": 100,
    "max_len": 100, "octets": 300,
}
FLOW_B = dict(FLOW_A, src_ip="10.0.0.3", dst_ip="10.0.0.4", proto=17,
              src_port=53, dst_port=5353, tcp_flags=0, packets=1,
              l2_octets=114, sumsq=10000, octets=100, end_reason=4)
FLOW_C = {
    "obs_point_id": 456, "src_mac": "02:00:00:00:00:03",
    "dst_mac": "02:00:00:00:00:04", "ethertype": 0x86DD, "vlan": 100,
    "dot1q_vlan": 100, "dot1q_priority": 3, "ip_version": 6,
    "proto": 58, "src_ip": "2001:db8::1", "dst_ip": "2001:db8::2",
    "flow_label": 12345, "icmp_type": 128, "icmp_code": 0, "packets": 2,
    "l2_octets": 244, "end_reason": 2, "octets": 208,
}
FLOW_D = dict(FLOW_A, src_ip="192.0.2.1", dst_ip="192.0.2.2",
              src_port=40000, dst_port=443, packets=7, octets=7000,
              l2_octets=7098, obs_point_id=9)
STATS = {"exporting_process_id": 77, "not_sent_flows": 1,
         "not_sent_packets": 2, "not_sent_octets": 3}


def encode_value(key, length, value):
    if key in _MAC_KEYS:
        return bytes.fromhex(value.replace(":", ""))
    if key in _IP_KEYS:
        family = socket.AF_INET6 if ":" in value else socket.AF_INET
        return socket.inet_pton(family, value)
    return value.to_bytes(length, "big")


def template_set(templates):
    """Template Set (id 2): [(template id, [(ie, length, key)])]."""
    body = b""
    for tid, fields in templates:
        body += struct.pack("!HH", tid, len(fields))
        body += b"".join(struct.pack("!HH", ie, n) for ie, n, _ in fields)
    return struct.pack("!HH", 2, 4 + len(body)) + body


def options_template_set(tid, fields, scope_count=1):
    """Options Template Set (id 3) holding one template."""
    body = struct.pack("!HHH", tid, len(fields), scope_count)
    body += b"".join(struct.pack("!HH", ie, n) for ie, n, _ in fields)
    return struct.pack("!HH", 3, 4 + len(body)) + body


def data_set(tid, fields, flows, padding=b""):
    body = b"".join(encode_value(key, n, flow[key])
                    for flow in flows for _, n, key in fields) + padding
    return struct.pack("!HH", tid, 4 + len(body)) + body


def message(sequence, domain, *sets, export_time=EXPORT_TIME):
    body = b"".join(sets)
    return struct.pack("!HHIII", 10, 16 + len(body), export_time,
                       sequence, domain) + body


def good_stream():
    """Three messages, two observation domains, correct sequence
    numbers (RFC 7011 section 3.1: data records - options data records
    included - sent before, per domain).  Returns (messages, flows)."""
    m1 = message(0, 123,
                 template_set([(256, IPV4_TEMPLATE), (257, IPV6_TEMPLATE)]),
                 options_template_set(258, STATS_TEMPLATE),
                 data_set(256, IPV4_TEMPLATE, [FLOW_A, FLOW_B]),
                 data_set(258, STATS_TEMPLATE, [STATS]))
    m2 = message(0, 9, template_set([(256, IPV4_TEMPLATE)]),
                 data_set(256, IPV4_TEMPLATE, [FLOW_D]))
    m3 = message(3, 123, data_set(257, IPV6_TEMPLATE, [FLOW_C]))
    flows = [dict(FLOW_A, obs_domain_id=123, template_id=256),
             dict(FLOW_B, obs_domain_id=123, template_id=256),
             dict(FLOW_D, obs_domain_id=9, template_id=256),
             dict(FLOW_C, obs_domain_id=123, template_id=257)]
    return [m1, m2, m3], flows


def flow_key(record):
    return (record["obs_domain_id"], record["src_ip"], record["dst_ip"])


def by_key(records):
    return {flow_key(r): r for r in records}


def send_udp(collector, messages):
    with socket.socket(collector.family, socket.SOCK_DGRAM) as s:
        for data in messages:
            s.sendto(data, collector.address)
    assert collector.wait_for(lambda d: len(d) >= len(messages), 5.0)


FAMILIES = [pytest.param(socket.AF_INET, id="ipv4"),
            pytest.param(socket.AF_INET6, id="ipv6")]


# -- collectors and every judge on a good stream ---------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_udp_collector_and_all_file_judges_agree(family, tmp_path):
    messages, flows = good_stream()
    with UdpCollector(family) as collector:
        host = "127.0.0.1" if family == socket.AF_INET else "[::1]"
        assert collector.target == f"{host}:{collector.port}"
        send_udp(collector, messages)
        assert [data for _, data in collector.datagrams] == messages
        arrivals = [t for t, _ in collector.datagrams]
        assert arrivals == sorted(arrivals)
        assert abs(arrivals[0] - time.time()) < 5

        # Our parser: no problem, every flow, sequence state per domain.
        session = parse_collector(collector)
        assert session.problems == []
        assert len(session.messages) == 3
        assert [m.size for m in session.messages] == \
            [len(m) for m in messages]
        got = by_key(session.normalized())
        for flow in flows:
            record = got[flow_key(flow)]
            for key, value in flow.items():
                assert record[key] == value, key
        assert session.normalized(options=True) == [
            dict(STATS, template_id=258, obs_domain_id=123)]
        assert got[(123, "10.0.0.1", "10.0.0.2")]["flow_start"] == \
            EXPORT_TIME - 0.005
        assert set(session.next_sequence.values()) == {4, 1}

        # tshark reads the same flows from the pcap, without warnings.
        pcap = str(tmp_path / "capture.pcap")
        collector.write_pcap(pcap)
        decoded = tshark_decode(pcap, collector.port)
        assert decoded.warnings == []
        assert len(decoded.records) == 4
        got = by_key(decoded.records)
        for flow in flows:
            record = got[flow_key(flow)]
            for key, value in flow.items():
                if key in ("start_delta_us", "end_delta_us"):
                    continue  # tshark shows absolute times instead
                assert record[key] == value, key
        record = got[flow_key(flows[0])]
        assert record["flow_start"] == pytest.approx(EXPORT_TIME - 0.005)
        assert record["flow_end"] == pytest.approx(EXPORT_TIME - 0.001)
        assert record["raw"]["cflow.srcport"] == "1234"
        assert len(decoded.options) == 1
        assert {k: decoded.options[0][k] for k in STATS} == STATS
        assert [(m["obs_domain_id"], m["sequence"], m["records"])
                for m in decoded.messages] == [(123, 0, 3), (9, 0, 1),
                                               (123, 3, 1)]
        assert decoded.messages[0]["export_time"] == EXPORT_TIME
        assert decoded.messages[0]["arrival"] == \
            pytest.approx(collector.datagrams[0][0], abs=1e-5)
        assert tshark_records(pcap, collector.port) == \
            (decoded.records, decoded.warnings)

        # ipfixDump over the RFC 5655 file.
        ipfix = str(tmp_path / "stream.ipfix")
        collector.write_ipfix_file(ipfix)
        with open(ipfix, "rb") as f:
            assert f.read() == b"".join(messages)
        ok, output = ipfixdump_check(ipfix)
        assert ok, output
        stats = ipfixdump_stats(ipfix)
        assert (stats["messages"], stats["data_records"],
                stats["template_records"]) == (3, 5, 4)
        assert stats["per_template"] == {256: 3, 257: 1, 258: 1}
        assert "sourceIPv4Address" in output

        judged = judge_collector(collector, tmp_path)
        assert judged.problems == []
        assert judged.session.normalized() == session.normalized()
        assert judged.tshark.records == decoded.records


def test_pcap_frames_have_valid_checksums(tmp_path):
    messages, _ = good_stream()
    for family in (socket.AF_INET, socket.AF_INET6):
        with UdpCollector(family) as collector:
            send_udp(collector, messages)
            pcap = str(tmp_path / f"c{family}.pcap")
            collector.write_pcap(pcap)
        fields = ["udp.checksum.status", "udp.dstport", "cflow.version"]
        if family == socket.AF_INET:
            fields.append("ip.checksum.status")
        out = subprocess.run(
            [require("tshark", "tshark"), "-n", "-r", pcap,
             "-o", "udp.check_checksum:TRUE",
             "-o", "ip.check_checksum:TRUE",
             "-d", f"udp.port=={collector.port},cflow", "-T", "fields",
             *[a for f in fields for a in ("-e", f)]],
            capture_output=True, text=True, check=True).stdout
        rows = [line.split("\t") for line in out.splitlines()]
        assert len(rows) == 3
        for row in rows:
            # status 1 = good; the IPFIX version must be decoded.
            assert row[0] == "1" and row[1] == str(collector.port)
            assert row[2] == "10"
            assert row[3:] in ([], ["1"])


@pytest.mark.parametrize("family", FAMILIES)
def test_nfcapd_nfdump_read_flows_live(family):
    messages, flows = good_stream()
    with NfcapdCollector(family) as nf:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            for data in messages:
                s.sendto(data, (nf.host, nf.port))
        time.sleep(0.2)
        pid = nf.proc.pid
    assert not pid_alive(pid)
    assert not os.path.exists(nf.workdir)
    got = by_key(nf.records)
    assert len(nf.records) == 4
    for flow in flows:
        record = got[flow_key(flow)]
        for key in ("src_ip", "dst_ip", "proto", "packets", "octets",
                    "src_mac", "dst_mac", "obs_point_id"):
            assert record[key] == flow[key], key
        if flow["proto"] in (6, 17):
            assert (record["src_port"], record["dst_port"]) == \
                (flow["src_port"], flow["dst_port"])
    assert got[flow_key(flows[3])]["vlan"] == 100
    assert nf.stats["flows"] == 4
    assert nf.stats["packets"] == sum(f["packets"] for f in flows)
    assert nf.stats["bad_packets"] == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_nfacctd_reads_flows_live(family):
    messages, flows = good_stream()
    with NfacctdCollector(family) as nfa:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            for data in messages:
                s.sendto(data, (nfa.host, nfa.port))
        time.sleep(0.2)
        pid = nfa.proc.pid
        children = descendant_pids(pid)
        assert children  # the print plugin runs in its own process
    assert not pid_alive(pid)
    assert not any(pid_alive(child) for child in children)
    got = {(r["src_ip"], r["dst_ip"]): r for r in nfa.records}
    assert len(nfa.records) == 4
    for flow in flows:
        record = got[(flow["src_ip"], flow["dst_ip"])]
        for key in ("proto", "packets", "octets", "src_mac", "dst_mac",
                    "ethertype"):
            assert record[key] == flow[key], key
        if flow["proto"] in (6, 17):
            assert (record["src_port"], record["dst_port"]) == \
                (flow["src_port"], flow["dst_port"])
    assert got[("2001:db8::1", "2001:db8::2")]["vlan"] == 100


def test_tshark_takes_templates_of_over_60_fields(tmp_path):
    fields = [(8, 4, "src_ip"), (12, 4, "dst_ip")] + \
        [(2, 8, "packets")] * 70
    flow = {"src_ip": "10.1.1.1", "dst_ip": "10.1.1.2", "packets": 5}
    data = message(0, 1, template_set([(300, fields)]),
                   data_set(300, fields, [flow]))
    with UdpCollector() as collector:
        send_udp(collector, [data])
        pcap = str(tmp_path / "wide.pcap")
        collector.write_pcap(pcap)
    records, warnings = tshark_records(pcap, collector.port)
    assert warnings == []
    assert [(r["src_ip"], r["packets"]) for r in records] == \
        [("10.1.1.1", 5)]
    assert len(records[0]["raw"]["cflow.packets"]) == 70
    session = parse_collector(collector)
    assert session.problems == []
    assert session.normalized()[0]["packets"] == 5


# -- the judges complain about broken streams ---------------------------

def broken_stream():
    """Data before its template (domain 5), a sequence gap (domain
    123), and a message whose header claims more bytes than it has."""
    messages, _ = good_stream()
    early = message(0, 5, data_set(256, IPV4_TEMPLATE, [FLOW_A]))
    gap = message(7, 123, data_set(256, IPV4_TEMPLATE, [FLOW_B]))
    short = message(8, 123, data_set(256, IPV4_TEMPLATE, [FLOW_B]))
    short = short[:2] + struct.pack("!H", len(short) + 40) + short[4:]
    return [early] + messages + [gap, short]


def test_judges_report_broken_streams(tmp_path):
    stream = broken_stream()
    with UdpCollector() as collector:
        send_udp(collector, stream)
        pcap = str(tmp_path / "broken.pcap")
        collector.write_pcap(pcap)
        ipfix = str(tmp_path / "broken.ipfix")
        collector.write_ipfix_file(ipfix)
        session = parse_collector(collector)

    problems = "\n".join(session.problems)
    assert "domain 5 seq 0: data set 256 before its template" in problems
    assert "domain 123 seq 7: sequence 7, expected 4" in problems
    assert "only" in session.messages[-1].problems[0]
    assert len(session.problems) == 3

    decoded = tshark_decode(pcap, collector.port)
    warnings = "\n".join(decoded.warnings)
    assert "frame 1:" in warnings and "no template found" in warnings
    assert "Unexpected flow sequence for domain ID 123 (expected 4, " \
        "got 7)" in warnings
    assert f"frame 6: message length {len(stream[-1]) + 40} != UDP " \
        f"payload {len(stream[-1])}" in warnings

    ok, output = ipfixdump_check(ipfix)
    assert not ok
    assert "out of sequence" in output

    problems = judge_collector(collector, tmp_path).problems
    assert [p.split(":")[0] for p in problems] == \
        ["parser"] * 3 + ["tshark"] * len(decoded.warnings) + ["ipfixDump"]


def test_ipfixdump_check_catches_what_it_skips_silently(tmp_path):
    # ipfixDump stops without a word at a set longer than its message:
    # the check compares its message count with the file's framing.
    messages, _ = good_stream()
    bad = bytearray(messages[0])
    struct.pack_into("!H", bad, 18, 9999)
    path = str(tmp_path / "bad.ipfix")
    with open(path, "wb") as f:
        f.write(bytes(bad))
    ok, output = ipfixdump_check(path)
    assert not ok
    assert "ipfixDump read 0 messages of 1" in output
    with open(path, "wb") as f:
        f.write(messages[0][:-3])
    ok, output = ipfixdump_check(path)
    assert not ok and "truncated" in output


def test_parser_flags_padding_withdrawal_and_redefinition():
    session = Session("udp")
    fields = [(8, 4, "src_ip"), (12, 4, "dst_ip")]
    flow = {"src_ip": "10.0.0.1", "dst_ip": "10.0.0.2"}
    good = message(0, 1, template_set([(256, fields)]),
                   data_set(256, fields, [flow], padding=b"\0\0\0"))
    (msg,) = session.parse(good)
    assert msg.problems == [] and len(msg.data_records) == 1
    assert msg.sets[1].padding == b"\0\0\0"
    assert msg.data_records[0].uint(8) == 0x0A000001

    session.parse(message(1, 1, data_set(256, fields, [flow],
                                          padding=b"\1")))
    session.parse(message(2, 1, template_set([(256, fields[:1])])))
    withdrawal = struct.pack("!HHHH", 2, 8, 256, 0)
    session.parse(message(2, 1, withdrawal))
    session.parse(message(2, 1, data_set(256, fields, [flow])))
    assert session.problems == [
        "domain 1 seq 1: set 256: 1 trailing bytes are not zero padding",
        "domain 1 seq 2: template 256 redefined with another layout",
        "domain 1 seq 2: template withdrawal of 256 over UDP",
        "domain 1 seq 2: data set 256 before its template",
    ]
    # Over TCP a withdrawal is legal.
    tcp = Session("tcp")
    tcp.parse(message(0, 1, template_set([(256, fields)]), withdrawal),
              datagram=False)
    assert tcp.problems == []


def test_parse_messages_back_to_back_and_variable_length():
    fields = [(82, 65535, "if_name"), (2, 4, "packets")]
    long_name = "x" * 300
    body = (bytes([3]) + b"br0" + (1).to_bytes(4, "big")
            + b"\xff" + struct.pack("!H", 300) + long_name.encode()
            + (2).to_bytes(4, "big"))
    m1 = message(0, 1, template_set([(256, fields)]),
                 struct.pack("!HH", 256, 4 + len(body)) + body)
    m2 = message(2, 1)
    msgs = parse_messages(m1 + m2)
    assert [m.length for m in msgs] == [len(m1), 16]
    assert [(r.values[82].decode(), r.uint(2))
            for r in msgs[0].data_records] == [("br0", 1), (long_name, 2)]
    assert all(not m.problems for m in msgs)
    session = Session("file")
    assert len(session.parse(m1 + m2[:10], datagram=False)) == 1
    assert session.problems == [
        "10 trailing bytes, shorter than a message header"]
    session = Session()
    session.parse(m1 + m2, datagram=True)  # one message per datagram
    assert session.problems == [
        f"domain 1 seq 0: datagram of {len(m1) + 16} bytes holds a "
        f"message of {len(m1)} bytes"]


# -- collectors -------------------------------------------------------

def test_udp_collector_buffer_and_waits():
    with UdpCollector() as collector:
        if os.geteuid() == 0:
            assert collector.rcvbuf >= 32 * 1024 * 1024
        assert collector.receive(0.05) == 0
        assert not collector.wait_quiet(0, quiet=0.05, timeout=0.2)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            # A burst far beyond the default receive buffer.
            for i in range(3000):
                s.sendto(i.to_bytes(4, "big") * 256, collector.address)
            start = time.monotonic()
            assert collector.wait_quiet(0, quiet=0.2, timeout=5)
            assert time.monotonic() - start >= 0.2
            assert len(collector.datagrams) == 3000
            assert collector.senders[0][1] == s.getsockname()[1]
        assert not collector.wait_for(lambda d: len(d) > 3000, 0.1)


def test_tcp_collector_splits_stream_and_accepts_reconnects():
    messages, flows = good_stream()
    stream = b"".join(messages)
    with TcpCollector() as collector:
        with socket.create_connection(collector.address) as s:
            # Cut inside a header and inside a set: framing must cope.
            for piece in (stream[:10], stream[10:100], stream[100:]):
                s.sendall(piece)
                collector.receive(0.05)
            assert collector.wait_for(lambda d: len(d) == 3, 5)
        assert [d for _, d in collector.datagrams] == messages
        assert collector.wait_for(
            lambda d: collector.open_connections == 0, 5)
        with socket.create_connection(collector.address) as s:
            s.sendall(messages[0] + b"\x00\x09\x00\x10" + b"\0" * 12)
            assert collector.wait_for(lambda d: len(d) == 4, 5)
            collector.receive(0.1)
        assert collector.connections == 2
        assert len(collector.errors) == 1 and "version 9" in \
            collector.errors[0]
        session = parse_collector(collector)
        assert session.transport == "tcp"
        # Each connection is its own transport session (keyed by the
        # peer address): templates and sequence numbers start afresh.
        assert session.problems == []
        assert len({m.source for m in session.messages}) == 2
        assert len(session.records) == len(flows) + 2
        with socket.create_connection(collector.address):
            assert collector.wait_for(
                lambda d: collector.open_connections == 1, 5)
        collector.close_connections()
        assert collector.open_connections == 0


# -- ovsdb-server -------------------------------------------------------

def test_ovsdb_server_start_vsctl_restart_stop():
    server = OvsdbServer(f"/tmp/ovsdb-test-{os.getpid()}")
    try:
        assert server.start() is server
        assert len(server.sock_path) < 108
        assert server.remote == "unix:" + server.sock_path
        first = server.pid
        assert first == read_pidfile(server.pidfile) and pid_alive(first)
        server.vsctl("add-br", "br0", "--", "set", "bridge", "br0",
                     "datapath_type=dummy")
        assert server.vsctl("list-br") == "br0\n"
        assert server.vsctl("get", "Open_vSwitch", ".", "ovs_version",
                            check=False) is not None
        with pytest.raises(OvsError, match="no bridge named nope"):
            server.vsctl("del-br", "nope")

        server.restart()
        assert not pid_alive(first)
        assert server.pid != first and pid_alive(server.pid)
        assert server.vsctl("list-br") == "br0\n"  # same database
        assert "ovsdb-server" in server.appctl("ovsdb-server", "version")
        server.stop()
        assert not pid_alive(server.pid or first)
        assert server.pids() == []
        server.stop()  # idempotent
    finally:
        server.cleanup()
    assert not os.path.exists(server.workdir)


def test_ovsdb_fixture_and_vswitchd(ovsdb_factory):
    a = ovsdb_factory()
    b = ovsdb_factory()
    assert a.sock_path != b.sock_path
    a.vsctl("add-br", "br0", "--", "set", "bridge", "br0",
            "datapath_type=dummy")
    assert b.vsctl("list-br") == ""
    vswitchd = a.run_vswitchd()
    assert pid_alive(vswitchd)
    assert vswitchd == read_pidfile(a.vswitchd_pidfile)
    a.vsctl("add-port", "br0", "p1", "--", "set", "Interface", "p1",
            "type=dummy", "ofport_request=1", wait=True)
    assert "p1" in a.appctl("ovs-vswitchd", "dpif/show")
    assert sorted(a.pids()) == sorted([a.pid, vswitchd])
    pids = a.pids() + b.pids()
    a.stop()
    b.stop()
    assert not any(pid_alive(p) for p in pids)


def test_ovsdb_fixture_cleans_up_after_failure(ovsdb_factory):
    # Run the fixture's own teardown path: a server whose test fails.
    server = ovsdb_factory()
    pid = server.pid
    vswitchd = server.run_vswitchd()
    server.cleanup()  # what the fixture's finally does
    assert not pid_alive(pid) and not pid_alive(vswitchd)
    assert not os.path.exists(server.workdir)


def test_ovsdb_env_points_everything_at_workdir(ovsdb):
    for name in ("OVS_RUNDIR", "OVS_LOGDIR", "OVS_DBDIR",
                 "OVS_SYSCONFDIR"):
        assert ovsdb.env[name] == ovsdb.workdir
    assert ovsdb.workdir.startswith("/tmp/")
    assert os.path.exists(os.path.join(ovsdb.workdir, "conf.db"))
    assert ovsdb.vsctl("get", "Open_vSwitch", ".", "next_cfg").strip() \
        == "0"


def test_missing_tool_fails_loudly():
    with pytest.raises(MissingTool, match="Debian package no-such-pkg.*"
                       "tools/install-deps"):
        require("no-such-tool-here", "no-such-pkg")


def test_pid_alive_treats_zombies_as_gone():
    proc = subprocess.Popen(["sleep", "30"])
    try:
        assert pid_alive(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        # Not reaped yet: a zombie, which must count as gone.
        assert wait_gone(proc.pid, 5.0)
        assert os.path.exists(f"/proc/{proc.pid}")
    finally:
        proc.kill()
        proc.wait()
    assert not pid_alive(proc.pid)
