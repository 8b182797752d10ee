"""The test traffic generator and its ground truth (tests/traffic.py).

The hand-built cases pin the truth rules of /tmp/semantics.md; the tshark
cases check the frames against an independent decoder: every frame that
is not cut on purpose decodes cleanly, with correct checksums, to the
identity the truth gives it.
"""

import ipaddress
import shutil
import struct
import subprocess
from collections import Counter

import pytest
import traffic as t
from traffic import FlowId

# --- determinism -------------------------------------------------------------


def test_mix_is_deterministic_per_seed():
    frames, truth = t.traffic_mix(seed=7)
    again, truth_again = t.traffic_mix(seed=7)
    assert frames == again
    assert truth == truth_again
    other, _ = t.traffic_mix(seed=8)
    assert other != frames


def test_many_flows_is_deterministic_per_seed():
    assert list(t.many_flows(50, 200, seed=3)) == list(
        t.many_flows(50, 200, seed=3))
    assert list(t.many_flows(50, 200, seed=3)) != list(
        t.many_flows(50, 200, seed=4))


def test_mix_scales_with_its_parameters():
    frames, truth = t.traffic_mix(seed=1, flows_per_kind=1,
                                  packets_per_flow=(2, 2))
    big, big_truth = t.traffic_mix(seed=1, flows_per_kind=4,
                                   packets_per_flow=(1, 6))
    assert len(big_truth) > 3 * len(truth)
    # The 17 built flows have exactly 2 packets; the fixed kinds vary.
    assert Counter(tr.packets for tr in truth.values())[2] >= 17


# --- coverage of the mix -----------------------------------------------------


@pytest.fixture(scope="module")
def mix():
    return t.traffic_mix(seed=1)


def test_mix_covers_every_kind(mix):
    frames, truth = mix
    kinds = Counter((tr.kind, tr.status) for tr in truth.values())
    assert kinds[("ipv4", "ok")] >= 12 and kinds[("ipv6", "ok")] >= 12
    assert kinds[("ipv4", "err")] and kinds[("ipv6", "err")]
    assert kinds[("other", "other")]
    ids = list(truth)
    by = {fid: truth[fid] for fid in ids}

    def has(pred):
        return any(pred(fid, by[fid]) for fid in ids)

    for version, icmp_proto in ((4, 1), (6, 58)):
        for proto in (6, 17, 132, icmp_proto):
            assert has(lambda f, _, v=version, p=proto:
                       f.ip_version == v and f.proto == p and
                       (f.src_port or f.icmp_type is not None))
    assert has(lambda f, tr: tr.eth_header_len == 18 and f.vlan
               and tr.vlan_pcp is not None)
    assert has(lambda f, tr: tr.eth_header_len == 22)  # 802.1ad + 802.1Q
    assert has(lambda f, _: f.ethertype == t.ETH_TYPE_ARP)
    assert has(lambda f, _: f.ethertype == t.ETH_TYPE_NONE)  # 802.3/LLC
    assert has(lambda f, tr: f.proto == 47 and tr.status == "err"
               and f.ip_version == 4)
    assert has(lambda f, tr: f.proto == 47 and tr.status == "err"
               and f.ip_version == 6)
    # Non-first fragments: protocol kept, ports 0, OK.
    for version in (4, 6):
        assert has(lambda f, tr, v=version: f.ip_version == v
                   and f.proto == 17 and f.src_port == 0
                   and tr.status == "ok")
    assert has(lambda f, tr: f.src_ip == "0.0.0.0" and tr.status == "err")
    assert has(lambda f, tr: f.src_ip == "::" and tr.status == "err")
    flags = 0
    for tr in truth.values():
        flags |= tr.tcp_flags
    assert flags == 0x1FF  # FIN..CWR and NS all seen
    assert {tr.ttl for tr in truth.values()} >= {1, 64, 255}
    assert len({tr.dscp for tr in truth.values()}) > 10
    lengths = [len(f) for f in frames]
    assert min(lengths) < 60 and 60 in lengths and max(lengths) > 1400
    assert not any(t.is_bfd(f) for f in frames)


def test_mix_has_options_extension_headers_and_padding(mix):
    frames, _ = mix
    ihl = set()
    ipv6_chains = set()
    padded = 0
    for f in frames:
        eth = 14
        etype = struct.unpack_from("!H", f, 12)[0]
        if etype in (t.ETH_TYPE_VLAN, t.ETH_TYPE_8021AD):
            continue
        if etype == t.ETH_TYPE_IP and len(f) >= 34 and f[14] >> 4 == 4:
            ihl.add(f[14] & 0xF)
            total = struct.unpack_from("!H", f, 16)[0]
            padded += len(f) == 60 and total < 46
        if etype == t.ETH_TYPE_IPV6 and len(f) >= 54:
            ipv6_chains.add(f[eth + 6])
    assert {4, 5, 6, 8} <= ihl
    assert {0, 51} <= ipv6_chains  # hop-by-hop first, AH first
    assert padded >= 3


def test_truth_is_truth_of_the_frames(mix):
    frames, truth = mix
    assert t.truth_of(frames) == truth
    assert sum(tr.packets for tr in truth.values()) == len(frames)
    assert sum(tr.l2_octets for tr in truth.values()) == sum(
        len(f) for f in frames)


# --- hand-built frames: the truth rules -------------------------------------


def one(frames, **kw):
    truth = t.truth_of(frames, **kw)
    assert len(truth) == 1, truth
    return next(iter(truth.items()))


def test_tcp_flow_counts():
    frames = [t.build_frame(proto=6, frame_len=100, tcp_flags=t.TCP_SYN),
              t.build_frame(proto=6, frame_len=200, tcp_flags=t.TCP_ACK),
              t.build_frame(proto=6, frame_len=64,
                            tcp_flags=t.TCP_FIN | t.TCP_NS)]
    fid, tr = one(frames)
    assert fid == FlowId("02:00:00:00:00:01", "02:00:00:00:00:02", 0x0800,
                         None, 4, "192.0.2.1", "192.0.2.2", 6, 1000, 2000,
                         None, None)
    assert [len(f) for f in frames] == [100, 200, 64]
    assert (tr.packets, tr.l2_octets, tr.ip_octets) == (3, 364, 322)
    assert (tr.min_ip_len, tr.max_ip_len) == (50, 186)
    assert tr.sumsq == 86 ** 2 + 186 ** 2 + 50 ** 2
    assert tr.tcp_flags == 0x113
    assert (tr.kind, tr.status, tr.eth_header_len) == ("ipv4", "ok", 14)
    assert (tr.ttl, tr.tos, tr.flow_label, tr.vlan_pcp) == (64, 0, None,
                                                           None)


def test_tcp_flags_take_twelve_bits():
    frame = bytearray(t.build_frame(proto=6, tcp_flags=t.TCP_ACK))
    frame[14 + 20 + 12] = 0x5F  # data offset 5, reserved bits 0xF00
    _, tr = one([bytes(frame)])
    assert tr.tcp_flags == 0xF10


def test_minimum_frame_ip_length_counts_padding():
    frame = t.build_frame(proto=17)  # 42 octets, padded
    assert len(frame) == 60
    fid, tr = one([frame])
    assert struct.unpack_from("!H", frame, 16)[0] == 28
    assert (tr.ip_octets, tr.min_ip_len, tr.l2_octets) == (46, 46, 60)
    assert (fid.src_port, fid.dst_port) == (1000, 2000)


def test_vlan_and_double_tag():
    frame = t.ethernet(t.ipv4(t.udp(5, 6)), tags=[t.dot1q(100, pcp=5)])
    fid, tr = one([frame])
    assert (fid.vlan, tr.vlan_pcp, tr.eth_header_len) == (100, 5, 18)
    assert (fid.ethertype, fid.proto, fid.src_port) == (0x0800, 17, 5)
    assert tr.ip_octets == len(frame) - 18

    qinq = t.ethernet(t.ipv6(t.tcp(7, 8), proto=6),
                      ethertype=t.ETH_TYPE_IPV6,
                      tags=[t.dot1q(200, 3, tpid=t.ETH_TYPE_8021AD),
                            t.dot1q(300, 6)])
    fid, tr = one([qinq])
    assert (fid.vlan, tr.vlan_pcp, tr.eth_header_len) == (200, 3, 22)
    assert (fid.ethertype, fid.ip_version, fid.proto) == (0x86DD, 6, 6)
    assert (fid.src_port, fid.dst_port) == (7, 8)
    assert tr.ip_octets == len(qinq) - 22

    lone_ad = t.ethernet(t.ipv4(t.udp(5, 6)),
                         tags=[t.dot1q(9, 1, tpid=t.ETH_TYPE_8021AD)])
    fid, tr = one([lone_ad])
    assert (fid.vlan, tr.eth_header_len, fid.src_port) == (9, 18, 5)


def test_ip_header_fields():
    frame = t.build_frame(proto=17, ttl=3, tos=0xB9)
    _, tr = one([frame])
    assert (tr.ttl, tr.tos, tr.dscp, tr.precedence) == (3, 0xB9, 0x2E, 5)
    frame6 = t.build_frame(ip_version=6, proto=17, ttl=9, tos=0x28,
                           flow_label=0xABCDE)
    fid, tr = one([frame6])
    assert (tr.ttl, tr.tos, tr.flow_label) == (9, 0x28, 0xABCDE)
    assert (fid.src_ip, fid.dst_ip) == ("2001:db8::1", "2001:db8::2")


def test_non_ip_frames():
    arp = t.ethernet(t.arp(), ethertype=t.ETH_TYPE_ARP)
    fid, tr = one([arp])
    assert fid == FlowId(t.SRC_MAC, t.DST_MAC, 0x0806, None, None, None,
                         None, None, None, None, None, None)
    assert (tr.kind, tr.status, tr.ip_octets, tr.min_ip_len, tr.sumsq) == (
        "other", "other", 0, 0, 0)
    assert tr.l2_octets == 60 and tr.ttl is None
    llc = t.ethernet(t.llc(), ethertype=None)
    fid, tr = one([llc])
    assert struct.unpack_from("!H", llc, 12)[0] == 38  # a length
    assert fid.ethertype == 0x05FF and tr.kind == "other"


def test_icmp_and_icmpv6():
    fid, tr = one([t.build_frame(proto=1, icmp_type=3, icmp_code=13)])
    assert (fid.icmp_type, fid.icmp_code, fid.src_port) == (3, 13, None)
    assert tr.status == "ok"
    fid, tr = one([t.build_frame(ip_version=6, proto=58, icmp_type=129)])
    assert (fid.icmp_type, fid.icmp_code, fid.proto) == (129, 0, 58)
    assert tr.status == "ok"
    # ICMP in IPv6 and ICMPv6 in IPv4 are unknown L4s: errors.
    fid, tr = one([t.build_frame(ip_version=6, proto=1, payload_len=8)])
    assert (fid.icmp_type, tr.status) == (None, "err")
    fid, tr = one([t.build_frame(proto=58, payload_len=8)])
    assert (fid.icmp_type, tr.status) == (None, "err")


def test_sctp_ports():
    fid, tr = one([t.build_frame(proto=132, sport=36412, dport=38412)])
    assert (fid.proto, fid.src_port, fid.dst_port) == (132, 36412, 38412)
    assert tr.status == "ok"


def test_unknown_l4_is_an_error_without_ports():
    gre4 = t.ethernet(t.ipv4(t.gre(t.ipv4(t.udp(1, 2))), proto=47))
    fid, tr = one([gre4])
    assert (fid.proto, fid.src_port, fid.icmp_type) == (47, None, None)
    assert (tr.kind, tr.status, tr.ip_octets) == ("ipv4", "err",
                                                  len(gre4) - 14)
    gre6 = t.ethernet(t.ipv6(t.gre(b""), proto=47),
                      ethertype=t.ETH_TYPE_IPV6)
    fid, tr = one([gre6])
    assert (fid.proto, tr.kind, tr.status) == (47, "ipv6", "err")


def test_ipv4_options_are_skipped():
    frame = t.ethernet(t.ipv4(t.udp(11, 12), options=b"\x94\x04\0\0"
                              + b"\x01" * 8))
    assert frame[14] == 0x48
    fid, tr = one([frame])
    assert (fid.src_port, fid.dst_port, tr.status) == (11, 12, "ok")


def test_ipv4_fragments():
    first = t.ethernet(t.ipv4(t.udp(21, 22, bytes(100)), mf=True))
    later = t.ethernet(t.ipv4(bytes(50), proto=17, frag_offset=14))
    later_icmp = t.ethernet(t.ipv4(bytes(50), proto=1, frag_offset=3))
    assert (t.flow_id_of(first).src_port, t.flow_id_of(first).dst_port) == (
        21, 22)
    fid, tr = one([later])
    assert (fid.proto, fid.src_port, fid.dst_port, tr.status) == (
        17, 0, 0, "ok")
    fid, tr = one([later_icmp])
    assert (fid.icmp_type, fid.icmp_code, tr.status) == (0, 0, "ok")


def test_ipv6_extension_headers_are_walked():
    chain = (t.hop_by_hop(), t.dest_opts(b"\x1e\x02\0\0"), t.routing(),
             t.fragment(0, more=True))
    first = t.ethernet(t.ipv6(t.tcp(31, 32), proto=6, ext_headers=chain),
                       ethertype=t.ETH_TYPE_IPV6)
    fid, tr = one([first])
    assert first[14 + 6] == 0  # hop-by-hop first
    assert (fid.proto, fid.src_port, fid.dst_port, tr.status) == (
        6, 31, 32, "ok")
    later = t.ethernet(t.ipv6(bytes(40), proto=17, ext_headers=(
        t.hop_by_hop(), t.fragment(5))), ethertype=t.ETH_TYPE_IPV6)
    fid, tr = one([later])
    assert (fid.proto, fid.src_port, fid.dst_port, tr.status) == (
        17, 0, 0, "ok")
    ah = t.ethernet(t.ipv6(t.udp(41, 42), ext_headers=(t.auth_header(),)),
                    ethertype=t.ETH_TYPE_IPV6)
    assert ah[14 + 40 + 1] == 4  # AH length in 4-octet units, minus 2
    fid, tr = one([ah])
    assert (fid.proto, fid.src_port, tr.status) == (17, 41, "ok")


def test_ipv6_extension_chain_cut_short():
    packet = t.ipv6(b"", proto=17, ext_headers=(t.hop_by_hop(),))
    packet = packet[:40] + packet[40:44]  # half a hop-by-hop header
    frame = t.ethernet(packet, ethertype=t.ETH_TYPE_IPV6)
    fid, tr = one([frame])
    assert (fid.proto, fid.src_port, tr.status) == (0, None, "err")
    assert t.is_cut(frame)


def test_ip_header_cut_or_invalid():
    whole = t.ipv4(t.udp(1, 2, bytes(30)), src="192.0.2.9")
    # Cut after 12 octets; IHL 15 (60 octets) in a 30-octet packet.
    for packet in (whole[:12], b"\x4f" + whole[1:30]):
        frame = t.ethernet(packet, pad=False)
        fid, tr = one([frame])
        assert fid == FlowId(t.SRC_MAC, t.DST_MAC, 0x0800, None, 4,
                             "0.0.0.0", "0.0.0.0", 0, None, None, None,
                             None)
        assert (tr.kind, tr.status, tr.ttl, tr.tos) == ("ipv4", "err", 0, 0)
        assert tr.ip_octets == len(frame) - 14
    # IPv4 ethertype carrying a version-6 header; IHL below 5.
    for first_octet in (0x65, 0x44):
        frame = t.ethernet(bytes((first_octet,)) + whole[1:])
        fid, tr = one([frame])
        assert (fid.src_ip, tr.status) == ("0.0.0.0", "err")
        assert t.is_cut(frame)
    six = t.ipv6(t.udp(1, 2), src="2001:db8::9")
    frame = t.ethernet(six[:39], ethertype=t.ETH_TYPE_IPV6, pad=False)
    fid, tr = one([frame])
    assert (fid.ip_version, fid.src_ip, fid.proto) == (6, "::", 0)
    assert (tr.status, tr.flow_label, tr.ip_octets) == ("err", 0, 39)


def test_l4_header_cut_counts_ok_with_zero_ports():
    # 10 octets of TCP header, padded to 60: the padding is not TCP.
    frame = t.ethernet(t.ipv4(t.tcp(80, 81)[:10], proto=6))
    assert len(frame) == 60
    fid, tr = one([frame])
    assert (fid.proto, fid.src_port, fid.dst_port) == (6, 0, 0)
    assert (tr.status, tr.tcp_flags, tr.ip_octets) == ("ok", 0, 46)
    assert t.is_cut(frame)
    for proto, seg in ((17, t.udp(5, 6)[:7]), (132, t.sctp(5, 6)[:11])):
        frame = t.ethernet(t.ipv6(seg, proto=proto),
                           ethertype=t.ETH_TYPE_IPV6, pad=False)
        fid, tr = one([frame])
        assert (fid.src_port, fid.dst_port, tr.status) == (0, 0, "ok")
    frame = t.ethernet(t.ipv4(t.icmp(8)[:7], proto=1))
    fid, tr = one([frame])
    assert (fid.icmp_type, fid.icmp_code, tr.status) == (0, 0, "ok")
    # ICMPv6 too needs 8 octets (OVS reads a struct icmp6_hdr).
    for size, expect in ((7, 0), (8, 128)):
        frame = t.ethernet(t.ipv6(t.icmpv6(128)[:size], proto=58),
                           ethertype=t.ETH_TYPE_IPV6)
        fid, tr = one([frame])
        assert (fid.icmp_type, tr.status) == (expect, "ok")
        assert t.is_cut(frame) == (size < 8)


def test_whole_frames_are_not_cut(mix):
    frames, _ = mix
    cut = [f for f in frames if t.is_cut(f)]
    assert 3 <= len(cut) < len(frames) // 5


def test_flows_that_differ_in_other_key_fields_are_refused():
    frames = [t.build_frame(proto=17, ttl=64), t.build_frame(proto=17,
                                                              ttl=65)]
    with pytest.raises(ValueError, match="differ"):
        t.truth_of(frames)


def test_bfd_frames_can_be_skipped():
    bfd = t.build_frame(proto=17, dport=3784)
    echo = t.build_frame(proto=17, dport=3785, sport=9)
    other = t.build_frame(proto=6, dport=3784)
    assert t.is_bfd(bfd) and t.is_bfd(echo) and not t.is_bfd(other)
    assert len(t.truth_of([bfd, echo, other])) == 3
    truth = t.truth_of([bfd, echo, other], skip_bfd=True)
    assert [fid.proto for fid in truth] == [6]


def test_short_frames_are_refused():
    with pytest.raises(ValueError, match="no Ethernet header"):
        t.truth_of([bytes(13)])


# --- builders ---------------------------------------------------------------


def test_build_frame_exact_lengths():
    for kw in ({"proto": 6}, {"proto": 17}, {"proto": 1},
               {"ip_version": 6, "proto": 58}, {"proto": 17, "vlan": 4}):
        for size in (64, 99, 1514):
            assert len(t.build_frame(frame_len=size, **kw)) == size
    assert len(t.build_frame(proto=132, frame_len=94)) == 94
    with pytest.raises(ValueError):
        t.build_frame(proto=17, frame_len=50)  # below the 60 minimum
    with pytest.raises(ValueError):
        t.build_frame(ip_version=6, proto=6, frame_len=70)


def test_checksums():
    assert t.crc32c(b"123456789") == 0xE3069283  # the CRC32c check value
    assert t.inet_checksum(bytes.fromhex(
        "450000730000400040110000c0a80001c0a800c7")) == 0xB861
    for frame in (t.build_frame(proto=6, payload_len=33),
                  t.build_frame(proto=17, payload_len=7),
                  t.build_frame(proto=1, payload_len=5)):
        ip = frame[14:]
        assert t.inet_checksum(ip[:20]) == 0
        total = struct.unpack_from("!H", ip, 2)[0]
        seg = ip[20:total]
        pseudo = ip[12:20] + struct.pack("!BBH", 0, ip[9], len(seg))
        if ip[9] == 1:
            assert t.inet_checksum(seg) == 0
        else:
            assert t.inet_checksum(pseudo + seg) == 0
    six = t.build_frame(ip_version=6, proto=58, payload_len=3)[14:]
    seg = six[40:]
    pseudo = six[8:40] + struct.pack("!I3xB", len(seg), 58)
    assert t.inet_checksum(pseudo + seg) == 0
    sctp = t.sctp(1, 2, b"abc")
    zeroed = sctp[:8] + bytes(4) + sctp[12:]
    assert struct.unpack_from("<I", sctp, 8)[0] == t.crc32c(zeroed)


def test_many_flows():
    frames = list(t.many_flows(1000, 5000, seed=2))
    assert len(frames) == 5000
    assert all(64 <= len(f) <= 1500 for f in frames)
    assert min(map(len, frames)) == 64 and max(map(len, frames)) == 1500
    truth = t.truth_of(frames)
    assert len(truth) == 1000
    assert {fid.proto for fid in truth} == {6, 17}
    assert all(tr.status == "ok" for tr in truth.values())
    assert len({(f.src_ip, f.dst_ip, f.proto, f.src_port, f.dst_port)
                for f in truth}) == 1000
    # The first n_flows frames visit every flow once.
    assert len(t.truth_of(frames[:1000])) == 1000
    for f in frames[:300]:
        ip = f[14:]
        assert t.inet_checksum(ip[:20]) == 0
        pseudo = ip[12:20] + struct.pack("!BBH", 0, ip[9], len(ip) - 20)
        assert t.inet_checksum(pseudo + ip[20:]) == 0
    assert list(t.many_flows(5, 0)) == []
    with pytest.raises(ValueError):
        next(t.many_flows(0, 1))


# --- tshark as an independent judge -----------------------------------------

TSHARK = shutil.which("tshark")
needs_tshark = pytest.mark.skipif(TSHARK is None, reason="tshark missing")

# Checksums checked; no reassembly and no TCP/SCTP sequence analysis (the
# mix is not a conversation).
TSHARK_PREFS = ("ip.check_checksum:TRUE", "tcp.check_checksum:TRUE",
                "udp.check_checksum:TRUE", "sctp.checksum:CRC-32C",
                "ip.defragment:FALSE", "ipv6.defragment:FALSE",
                "tcp.analyze_sequence_numbers:FALSE",
                "sctp.tsn_analysis:FALSE")

FIELDS = ("frame.number", "eth.src", "eth.dst", "ieee8021ad.id",
          "vlan.id", "ip.src",
          "ip.dst", "ip.proto", "ip.ttl", "ip.dsfield", "ipv6.src",
          "ipv6.dst", "ipv6.hlim", "ipv6.tclass", "ipv6.flow",
          "tcp.srcport", "tcp.dstport", "tcp.flags", "udp.srcport",
          "udp.dstport", "sctp.srcport", "sctp.dstport", "icmp.type",
          "icmp.code", "icmpv6.type", "icmpv6.code", "arp.opcode",
          "llc.dsap", "_ws.expert.severity", "_ws.expert.message",
          "_ws.malformed")

SEVERITY_ERROR = 0x00800000
SEVERITY_WARN = 0x00600000
# Warnings that describe a frame's content rather than a fault in it.
ALLOWED_WARNINGS = {"Connection reset (RST)"}


def write_pcap(path, frames):
    """A classic libpcap file (link type Ethernet), one record a frame."""
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for i, frame in enumerate(frames):
            f.write(struct.pack("<IIII", 1000 + i, 0, len(frame),
                                len(frame)))
            f.write(frame)


def tshark_fields(path):
    cmd = [TSHARK, "-n", "-r", str(path), "-T", "fields", "-E",
           "separator=|", "-E", "occurrence=f", "-E", "quote=n"]
    for pref in TSHARK_PREFS:
        cmd += ["-o", pref]
    for field in FIELDS:
        cmd += ["-e", field]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                         check=True).stdout
    rows = [dict(zip(FIELDS, line.split("|")))
            for line in out.splitlines()]
    return rows


def tshark_expert(path):
    """frame number -> list of (severity, message), every expert item."""
    cmd = [TSHARK, "-n", "-r", str(path), "-T", "fields", "-E",
           "separator=|", "-E", "occurrence=a", "-E", "aggregator=\x1f",
           "-e", "frame.number", "-e", "_ws.expert.severity", "-e",
           "_ws.expert.message"]
    for pref in TSHARK_PREFS:
        cmd += ["-o", pref]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                         check=True).stdout
    items = {}
    for line in out.splitlines():
        number, severities, messages = line.split("|")
        sev = [int(s) for s in severities.split("\x1f") if s]
        msg = messages.split("\x1f") if messages else []
        msg += [""] * (len(sev) - len(msg))
        items[int(number)] = list(zip(sev, msg))
    return items


@pytest.fixture(scope="module", params=[1, 2, 3])
def mix_pcap(request, tmp_path_factory):
    """(frames, truth, path of their pcap), for a few seeds."""
    frames, truth = t.traffic_mix(seed=request.param)
    path = tmp_path_factory.mktemp("traffic") / "mix.pcap"
    write_pcap(path, frames)
    return frames, truth, path


@needs_tshark
def test_tshark_finds_faults_only_in_frames_cut_on_purpose(mix_pcap):
    frames, _, path = mix_pcap
    expert = tshark_expert(path)
    assert len(expert) == len(frames)
    faulty = set()
    for number, items in expert.items():
        for severity, message in items:
            if severity >= SEVERITY_ERROR or (
                    severity >= SEVERITY_WARN
                    and message not in ALLOWED_WARNINGS):
                faulty.add(number)
    cut = {i + 1 for i, f in enumerate(frames) if t.is_cut(f)}
    assert cut, "the mix must hold frames cut on purpose"
    assert faulty == cut


@needs_tshark
def test_tshark_decodes_each_frame_as_the_truth_says(mix_pcap):
    frames, _, path = mix_pcap
    rows = tshark_fields(path)
    assert len(rows) == len(frames)
    checked = Counter()
    for frame, row in zip(frames, rows):
        if t.is_cut(frame):
            continue
        (fid, tr), = t.truth_of([frame]).items()
        where = "frame %s: %s" % (row["frame.number"], fid)
        assert (row["eth.src"], row["eth.dst"]) == (fid.src_mac,
                                                    fid.dst_mac), where
        # tshark names an 802.1ad tag ieee8021ad, an 802.1Q one vlan.
        outer = row["ieee8021ad.id"] or row["vlan.id"]
        assert outer == ("" if fid.vlan is None else str(fid.vlan)), where
        if fid.ip_version == 4:
            assert (row["ip.src"], row["ip.dst"]) == (fid.src_ip,
                                                      fid.dst_ip), where
            assert int(row["ip.proto"]) == fid.proto, where
            assert int(row["ip.ttl"]) == tr.ttl, where
            assert int(row["ip.dsfield"], 16) == tr.tos, where
            checked["ipv4"] += 1
        elif fid.ip_version == 6:
            assert ipaddress.ip_address(row["ipv6.src"]) == \
                ipaddress.ip_address(fid.src_ip), where
            assert ipaddress.ip_address(row["ipv6.dst"]) == \
                ipaddress.ip_address(fid.dst_ip), where
            assert int(row["ipv6.hlim"]) == tr.ttl, where
            assert int(row["ipv6.tclass"], 16) == tr.tos, where
            assert int(row["ipv6.flow"], 16) == tr.flow_label, where
            checked["ipv6"] += 1
        elif fid.ethertype == t.ETH_TYPE_ARP:
            assert row["arp.opcode"] in ("1", "2"), where
            checked["arp"] += 1
        elif fid.ethertype == t.ETH_TYPE_NONE:
            assert row["llc.dsap"] == "0x42", where
            checked["llc"] += 1
        name = {6: "tcp", 17: "udp", 132: "sctp"}.get(fid.proto)
        if name and fid.src_port:
            assert int(row[name + ".srcport"]) == fid.src_port, where
            assert int(row[name + ".dstport"]) == fid.dst_port, where
            checked[name] += 1
        if name == "tcp" and fid.src_port:
            assert int(row["tcp.flags"], 16) & 0xFFF == tr.tcp_flags, where
        if fid.icmp_type is not None:
            name = "icmp" if fid.ip_version == 4 else "icmpv6"
            assert int(row[name + ".type"]) == fid.icmp_type, where
            assert int(row[name + ".code"]) == fid.icmp_code, where
            checked[name] += 1
    for name in ("ipv4", "ipv6", "arp", "llc", "tcp", "udp", "sctp",
                 "icmp", "icmpv6"):
        assert checked[name] >= 2, (name, checked)


# --- Open vSwitch's own flow_extract() as a judge ---------------------------

OVS_OFCTL = shutil.which("ovs-ofctl")

# ovs-ofctl's protocol keywords: (ethertype, IP protocol).
OVS_KEYWORDS = {"ip": (0x0800, None), "tcp": (0x0800, 6),
                "udp": (0x0800, 17), "sctp": (0x0800, 132),
                "icmp": (0x0800, 1), "ipv6": (0x86DD, None),
                "tcp6": (0x86DD, 6), "udp6": (0x86DD, 17),
                "sctp6": (0x86DD, 132), "icmp6": (0x86DD, 58),
                "arp": (0x0806, None)}
OVS_TCP_FLAGS = {"fin": 0x01, "syn": 0x02, "rst": 0x04, "psh": 0x08,
                 "ack": 0x10, "urg": 0x20, "ece": 0x40, "cwr": 0x80,
                 "ns": 0x100}


def ovs_view(line):
    """One line of ``ovs-ofctl parse-pcap`` as the fields FlowId has."""
    fields = {}
    keyword = None
    for part in line.split(","):
        if "=" in part:
            key, value = part.split("=", 1)
            fields[key] = value
        else:
            keyword = part
    ethertype, proto = OVS_KEYWORDS.get(keyword, (None, None))
    if ethertype is None:
        ethertype = int(fields["dl_type"], 16)
    if "nw_proto" in fields:
        proto = int(fields["nw_proto"])
    view = {"src_mac": fields["dl_src"], "dst_mac": fields["dl_dst"],
            "ethertype": ethertype, "vlan": fields.get("dl_vlan"),
            "pcp": fields.get("dl_vlan_pcp")}
    if ethertype in (0x0800, 0x86DD):
        zero = "0.0.0.0" if ethertype == 0x0800 else "::"
        view.update(
            src_ip=fields.get("nw_src", fields.get("ipv6_src", zero)),
            dst_ip=fields.get("nw_dst", fields.get("ipv6_dst", zero)),
            proto=proto or 0, ttl=int(fields.get("nw_ttl", 0)),
            tos=int(fields.get("nw_tos", 0)) | int(fields.get("nw_ecn", 0)),
            ports=(int(fields.get("tp_src", 0)),
                   int(fields.get("tp_dst", 0))),
            icmp=(int(fields.get("icmp_type", 0)),
                  int(fields.get("icmp_code", 0))),
            tcp_flags=sum(OVS_TCP_FLAGS.get(name) or int(name, 0)
                          for name in fields.get("tcp_flags", "").split("|")
                          if name))
        if ethertype == 0x86DD:
            view["flow_label"] = int(fields.get("ipv6_label", "0"), 16)
    return view


def truth_view(frame):
    (fid, tr), = t.truth_of([frame]).items()
    view = {"src_mac": fid.src_mac, "dst_mac": fid.dst_mac,
            "ethertype": fid.ethertype,
            "vlan": None if fid.vlan is None else str(fid.vlan),
            "pcp": None if tr.vlan_pcp is None else str(tr.vlan_pcp)}
    if fid.ip_version:
        view.update(src_ip=fid.src_ip, dst_ip=fid.dst_ip, proto=fid.proto,
                    ttl=tr.ttl, tos=tr.tos,
                    ports=(fid.src_port or 0, fid.dst_port or 0),
                    icmp=(fid.icmp_type or 0, fid.icmp_code or 0),
                    tcp_flags=tr.tcp_flags)
        if fid.ip_version == 6:
            view["flow_label"] = tr.flow_label
    return view


@pytest.mark.skipif(OVS_OFCTL is None, reason="ovs-ofctl missing")
def test_ovs_flow_extract_agrees_with_the_truth(mix_pcap):
    """OVS's parser (ovs-ofctl parse-pcap runs flow_extract()) sees every
    frame as the truth does, cut frames included, with one known
    exception: for an IPv6 non-first fragment OVS reports protocol 44
    (the fragment header) where /tmp/semantics.md asks for the next
    header it names."""
    frames, _, path = mix_pcap
    out = subprocess.run([OVS_OFCTL, "parse-pcap", str(path)],
                         capture_output=True, text=True, timeout=60,
                         check=True).stdout.splitlines()
    assert len(out) == len(frames)
    ipv6_later = 0
    for number, (frame, line) in enumerate(zip(frames, out), 1):
        ours, theirs = truth_view(frame), ovs_view(line)
        if theirs.get("proto") == 44 and "nw_frag=later" in line:
            assert ours["ethertype"] == 0x86DD and ours["ports"] == (0, 0)
            assert ours["proto"] != 44
            ours["proto"] = 44
            ipv6_later += 1
        assert ours == theirs, "frame %d: %s" % (number, line)
    assert ipv6_later >= 1
