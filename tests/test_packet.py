"""packet.parse: every frame kind, truncation at each layer, garbage.

Expectations are written from /tmp/semantics.md (the team's flow-key
rules, after OVS's flow_extract()).  Frames come from tests/traffic.py's
builders or are spelled out byte by byte; the key that ``parse`` returns
is read back through its template's field list, and the whole traffic
mix is checked against traffic.py's own reference parser.
"""

import ipaddress
import struct

import hypothesis.strategies as st
import pytest
import traffic as tr
from hypothesis import given, settings

from ovs_ipfix_py import interfaces, packet, upcall
from ovs_ipfix_py import templates as t

INTEGER_FIELDS_AS_BYTES = {"sourceMacAddress", "destinationMacAddress",
                           "sourceIPv4Address", "destinationIPv4Address",
                           "sourceIPv6Address", "destinationIPv6Address"}


def iface(in_port, out_port=None, egress=False, **kw):
    """The interface part of ports whose ifindex is their number."""
    ports = {p: interfaces.Interface(p, ifindex=p, **kw)
             for p in (in_port, out_port) if p is not None}
    return interfaces.iface_part(ports, in_port, out_port, egress)


def fields(fk):
    """The key of ``fk`` decoded through its template: {name: value}
    (addresses and strings as text, the rest as ints; interfaceName and
    interfaceDescription of an egress key as egress...)."""
    tmpl = t.get(fk.template_id)
    out = {}
    pos = 0
    seen = set()
    for name, length in tmpl.key_fields:
        if length == t.VARIABLE:
            length = fk.key[pos]
            pos += 1
        raw = fk.key[pos:pos + length]
        pos += length
        if name in seen:
            name = "egress" + name[0].upper() + name[1:]
        seen.add(name)
        if name.endswith(("interfaceName", "InterfaceName",
                          "nterfaceDescription")):
            out[name] = raw.decode()
        elif name == "tunnelKey":
            out[name] = raw
        elif name.endswith("MacAddress"):
            out[name] = ":".join("%02x" % b for b in raw)
        elif name in INTEGER_FIELDS_AS_BYTES:
            out[name] = str(ipaddress.ip_address(raw))
        else:
            out[name] = int.from_bytes(raw, "big")
    assert pos == len(fk.key)
    return out


def layout(fk):
    tmpl = t.get(fk.template_id)
    return tmpl.l2, tmpl.l3, tmpl.l4, tmpl.direction


# -- plain Ethernet, IPv4 ---------------------------------------------------

def test_ipv4_tcp_every_key_field():
    frame = tr.ethernet(
        tr.ipv4(tr.tcp(40000, 443, flags=tr.TCP_SYN | tr.TCP_ECE
                       | tr.TCP_NS), src="10.1.2.3", dst="10.9.8.7",
                proto=6, ttl=63, tos=0xB9),
        src="02:aa:bb:cc:dd:01", dst="02:aa:bb:cc:dd:02")
    fk = packet.parse(frame, obs_point_id=0x12345678, iface=iface(7))
    assert fk.template_id == 256 + ((0 * 3 + 1) * 5 + 1) * 2 == 268
    assert layout(fk) == (t.L2_ETH, t.L3_IPV4, t.L4_TCP, t.INGRESS)
    assert (fk.eth_header_len, fk.is_ip, fk.kind) == (14, True,
                                                      packet.IPV4_OK)
    assert fk.tcp_flags == 0x002 | 0x040 | 0x100
    assert fk.udp_dst_port == -1
    assert fields(fk) == {
        "observationPointId": 0x12345678, "flowDirection": 0,
        "sourceMacAddress": "02:aa:bb:cc:dd:01",
        "destinationMacAddress": "02:aa:bb:cc:dd:02",
        "ethernetType": 0x0800, "ethernetHeaderLength": 14,
        "ingressInterface": 7, "ingressInterfaceType": 0,
        "interfaceName": "", "interfaceDescription": "",
        "ipVersion": 4, "ipTTL": 63, "protocolIdentifier": 6,
        "ipDiffServCodePoint": 0xB9 >> 2, "ipPrecedence": 0xB9 >> 5,
        "ipClassOfService": 0xB9,
        "sourceIPv4Address": "10.1.2.3",
        "destinationIPv4Address": "10.9.8.7",
        "sourceTransportPort": 40000, "destinationTransportPort": 443,
    }


def test_key_bytes_spelled_out():
    """The key part of the data record, byte by byte (OVS's order)."""
    frame = bytes.fromhex(
        "0a0b0c0d0e0f" "010203040506" "0800"
        "45b80028abcd4000" "3f06" "0000" "c0000201" "c6336402"
        "1f90d431" "00000000" "00000000" "5012" "ffff" "0000" "0000")
    fk = packet.parse(frame, obs_point_id=9, iface=iface(
        0x01020304, if_type=6, name="eth0", description="NIC"))
    assert fk.key == bytes.fromhex(
        "00000009" "00"                     # observation point, ingress
        "010203040506" "0a0b0c0d0e0f"       # source MAC, destination MAC
        "0800" "0e"                         # ethertype, header length
        "01020304" "00000006"               # ingressInterface, type
        "04" "65746830" "03" "4e4943"       # interfaceName, Description
        "04" "3f" "06" "2e" "05" "b8"       # version TTL proto DSCP prec TOS
        "c0000201" "c6336402"               # addresses
        "1f90" "d431")                      # ports 8080 -> 54321
    assert fk.tcp_flags == 0x012


def test_egress_carries_the_output_port():
    frame = tr.ethernet(tr.ipv4(tr.udp(53, 5353)))
    fk = packet.parse(frame, 1, t.EGRESS, iface(3, 4, True, name="p"))
    assert fk.template_id == 271
    assert layout(fk)[3] == t.EGRESS
    f = fields(fk)
    assert (f["flowDirection"], f["ingressInterface"],
            f["egressInterface"]) == (1, 3, 4)
    assert f["interfaceName"] == f["egressInterfaceName"] == "p"
    assert fk.udp_dst_port == 5353


@pytest.mark.parametrize("payload, proto, l4, want", [
    (tr.udp(1111, 2222), 17, t.L4_UDP, (1111, 2222)),
    (tr.sctp(3868, 2905), 132, t.L4_SCTP, (3868, 2905)),
    (tr.icmp(8, 0), 1, t.L4_ICMP, (8, 0)),
    (tr.icmp(3, 3, bytes(4)), 1, t.L4_ICMP, (3, 3)),
])
def test_ipv4_l4_kinds(payload, proto, l4, want):
    fk = packet.parse(tr.ethernet(tr.ipv4(payload, proto=proto)))
    assert layout(fk)[:3] == (t.L2_ETH, t.L3_IPV4, l4)
    assert fk.kind == packet.IPV4_OK and fk.tcp_flags == 0
    f = fields(fk)
    if l4 == t.L4_ICMP:
        assert (f["icmpTypeIPv4"], f["icmpCodeIPv4"]) == want
        assert "sourceTransportPort" not in f
    else:
        assert (f["sourceTransportPort"],
                f["destinationTransportPort"]) == want
    assert f["protocolIdentifier"] == proto


def test_ipv4_other_protocol_is_an_error_with_ip_fields():
    fk = packet.parse(tr.ethernet(tr.ipv4(tr.gre(bytes(40)), proto=47,
                                          src="10.0.0.1", ttl=9)))
    assert layout(fk)[:3] == (t.L2_ETH, t.L3_IPV4, t.L4_NONE)
    assert fk.kind == packet.IPV4_ERR and fk.is_ip
    f = fields(fk)
    assert (f["protocolIdentifier"], f["ipTTL"],
            f["sourceIPv4Address"]) == (47, 9, "10.0.0.1")


@pytest.mark.parametrize("options", [
    b"\x94\x04\x00\x00",                       # router alert, IHL 6
    b"\x07\x27\x04" + bytes(37),               # record route, IHL 15
])
def test_ipv4_options_are_skipped(options):
    pkt = tr.ipv4(tr.tcp(5, 6, flags=tr.TCP_FIN), proto=6, options=options)
    assert (pkt[0] & 0x0F) * 4 == 20 + len(options) + (-len(options) % 4)
    fk = packet.parse(tr.ethernet(pkt))
    f = fields(fk)
    assert (f["sourceTransportPort"], f["destinationTransportPort"]) == \
        (5, 6)
    assert fk.tcp_flags == tr.TCP_FIN and fk.kind == packet.IPV4_OK


def test_ipv4_fragments():
    seg = tr.udp(1000, 2000, bytes(100))
    first = packet.parse(tr.ethernet(tr.ipv4(seg, mf=True)))
    f = fields(first)
    assert (f["sourceTransportPort"], f["destinationTransportPort"]) == \
        (1000, 2000)
    for offset in (1, 185, 0x1FFF):
        later = packet.parse(tr.ethernet(tr.ipv4(seg, frag_offset=offset)))
        f = fields(later)
        assert layout(later)[2] == t.L4_UDP
        assert f["protocolIdentifier"] == 17
        assert (f["sourceTransportPort"],
                f["destinationTransportPort"]) == (0, 0)
        assert later.kind == packet.IPV4_OK and later.udp_dst_port == -1
    icmp_later = packet.parse(tr.ethernet(tr.ipv4(tr.icmp(8), proto=1,
                                                  frag_offset=3)))
    f = fields(icmp_later)
    assert (f["icmpTypeIPv4"], f["icmpCodeIPv4"]) == (0, 0)


@pytest.mark.parametrize("first_byte", [0x65, 0x44, 0x40, 0x00, 0xF5])
def test_ipv4_bad_version_or_ihl_is_an_error_with_zero_fields(first_byte):
    pkt = bytearray(tr.ipv4(tr.udp(1, 2, bytes(30)), src="10.0.0.1"))
    pkt[0] = first_byte
    fk = packet.parse(tr.ethernet(bytes(pkt)))
    assert layout(fk)[:3] == (t.L2_ETH, t.L3_IPV4, t.L4_NONE)
    assert fk.kind == packet.IPV4_ERR
    f = fields(fk)
    assert f["ipVersion"] == 4
    assert f["sourceIPv4Address"] == f["destinationIPv4Address"] == \
        "0.0.0.0"
    assert f["ipTTL"] == f["protocolIdentifier"] == 0
    assert f["ipClassOfService"] == 0


def test_ipv4_ihl_beyond_frame_is_an_error():
    pkt = bytearray(tr.ipv4(b"", options=bytes(8)))   # IHL 7, 28 bytes
    fk = packet.parse(tr.ethernet(bytes(pkt[:24]), pad=False))
    assert fk.kind == packet.IPV4_ERR
    assert fields(fk)["sourceIPv4Address"] == "0.0.0.0"


def test_l4_header_is_never_read_from_ethernet_padding():
    # 10 bytes of TCP header in the IP packet, padded to 60 with bytes
    # that would make a plausible header.
    pkt = tr.ipv4(tr.tcp(7777, 8888)[:10], proto=6)
    frame = tr.ethernet(pkt, pad=False)
    frame += tr.tcp(7777, 8888)[10:]
    assert len(frame) >= 14 + 20 + 20
    fk = packet.parse(frame)
    f = fields(fk)
    assert (f["sourceTransportPort"], f["destinationTransportPort"]) == \
        (0, 0)
    assert fk.tcp_flags == 0 and fk.kind == packet.IPV4_OK


# -- VLAN -------------------------------------------------------------------

def test_dot1q_tag():
    frame = tr.ethernet(tr.ipv4(tr.udp(1, 2)), tags=[tr.dot1q(100, 5)])
    fk = packet.parse(frame)
    assert layout(fk)[:3] == (t.L2_VLAN, t.L3_IPV4, t.L4_UDP)
    assert fk.template_id == 300
    assert fk.eth_header_len == 18
    f = fields(fk)
    assert (f["vlanId"], f["dot1qVlanId"], f["dot1qPriority"]) == \
        (100, 100, 5)
    assert (f["ethernetType"], f["ethernetHeaderLength"]) == (0x0800, 18)


def test_dot1q_dei_bit_is_not_part_of_the_vid():
    frame = tr.ethernet(tr.ipv4(tr.udp(1, 2)),
                        tags=[tr.dot1q(4095, 7, dei=1)])
    f = fields(packet.parse(frame))
    assert (f["vlanId"], f["dot1qPriority"]) == (4095, 7)


@pytest.mark.parametrize("outer", [tr.ETH_TYPE_8021AD, tr.ETH_TYPE_VLAN])
def test_qinq_keys_on_the_outer_tag(outer):
    frame = tr.ethernet(tr.ipv6(tr.tcp(80, 81), proto=6),
                        ethertype=tr.ETH_TYPE_IPV6,
                        tags=[tr.dot1q(200, 3, tpid=outer), tr.dot1q(10, 1)])
    fk = packet.parse(frame)
    assert layout(fk)[:3] == (t.L2_VLAN, t.L3_IPV6, t.L4_TCP)
    assert fk.eth_header_len == 22 and fk.kind == packet.IPV6_OK
    f = fields(fk)
    assert (f["vlanId"], f["dot1qVlanId"], f["dot1qPriority"]) == \
        (200, 200, 3)
    assert (f["ethernetType"], f["ethernetHeaderLength"]) == (0x86DD, 22)
    assert f["destinationTransportPort"] == 81


def test_single_8021ad_tag():
    frame = tr.ethernet(tr.ipv4(tr.udp(1, 2)),
                        tags=[tr.dot1q(33, 0, tpid=tr.ETH_TYPE_8021AD)])
    fk = packet.parse(frame)
    assert fk.eth_header_len == 18 and fields(fk)["vlanId"] == 33
    assert fk.kind == packet.IPV4_OK


def test_third_tag_is_not_walked():
    frame = tr.ethernet(tr.ipv4(tr.udp(1, 2)), tags=[
        tr.dot1q(1, tpid=tr.ETH_TYPE_8021AD), tr.dot1q(2), tr.dot1q(3)])
    fk = packet.parse(frame)
    assert layout(fk)[:2] == (t.L2_VLAN, t.L3_NONE)
    assert fk.eth_header_len == 22 and fk.kind == packet.OTHER
    assert fields(fk)["ethernetType"] == 0x8100


def test_tag_cut_short():
    frame = tr.ethernet(b"", tags=[tr.dot1q(5)], pad=False)[:16]
    fk = packet.parse(frame)
    assert layout(fk)[:2] == (t.L2_ETH, t.L3_NONE)
    assert fk.eth_header_len == 14 and fk.kind == packet.OTHER
    assert fields(fk)["ethernetType"] == 0x8100


# -- IPv6 -------------------------------------------------------------------

def test_ipv6_udp_every_key_field():
    frame = tr.ethernet(
        tr.ipv6(tr.udp(546, 547), src="2001:db8::a", dst="ff02::1:2",
                hop_limit=1, tclass=0xB8, flow_label=0xABCDE),
        ethertype=tr.ETH_TYPE_IPV6)
    fk = packet.parse(frame, 5, iface=iface(2))
    assert fk.template_id == 280
    assert fk.kind == packet.IPV6_OK and fk.udp_dst_port == 547
    f = fields(fk)
    assert f == {
        "observationPointId": 5, "flowDirection": 0,
        "sourceMacAddress": tr.SRC_MAC, "destinationMacAddress": tr.DST_MAC,
        "ethernetType": 0x86DD, "ethernetHeaderLength": 14,
        "ingressInterface": 2, "ingressInterfaceType": 0,
        "interfaceName": "", "interfaceDescription": "",
        "ipVersion": 6, "ipTTL": 1, "protocolIdentifier": 17,
        "ipDiffServCodePoint": 46, "ipPrecedence": 5,
        "ipClassOfService": 0xB8,
        "sourceIPv6Address": "2001:db8::a",
        "destinationIPv6Address": "ff02::1:2",
        "flowLabelIPv6": 0xABCDE,
        "sourceTransportPort": 546, "destinationTransportPort": 547,
    }


@pytest.mark.parametrize("chain", [
    (tr.hop_by_hop(),),
    (tr.hop_by_hop(b"\x05\x02\x00\x00"), tr.dest_opts(), tr.routing()),
    (tr.routing(("2001:db8::1", "2001:db8::2", "2001:db8::3")),),
    (tr.auth_header(),),
    (tr.auth_header(icv=bytes(20)), tr.dest_opts(bytes(20))),
    (tr.fragment(0, True),),
    (tr.hop_by_hop(), tr.fragment(0, True), tr.dest_opts()),
])
def test_ipv6_extension_headers_are_walked(chain):
    frame = tr.ethernet(tr.ipv6(tr.tcp(1234, 22, flags=tr.TCP_RST),
                                proto=6, ext_headers=chain),
                        ethertype=tr.ETH_TYPE_IPV6)
    fk = packet.parse(frame)
    assert layout(fk)[2] == t.L4_TCP and fk.kind == packet.IPV6_OK
    f = fields(fk)
    assert f["protocolIdentifier"] == 6
    assert (f["sourceTransportPort"], f["destinationTransportPort"]) == \
        (1234, 22)
    assert fk.tcp_flags == tr.TCP_RST


def test_ipv6_later_fragment_has_no_ports():
    frame = tr.ethernet(tr.ipv6(tr.udp(1, 2, bytes(64)), proto=17,
                                ext_headers=(tr.hop_by_hop(),
                                             tr.fragment(8, True))),
                        ethertype=tr.ETH_TYPE_IPV6)
    fk = packet.parse(frame)
    f = fields(fk)
    assert layout(fk)[2] == t.L4_UDP and fk.kind == packet.IPV6_OK
    assert f["protocolIdentifier"] == 17
    assert (f["sourceTransportPort"], f["destinationTransportPort"]) == \
        (0, 0)


@pytest.mark.parametrize("itype, code", [(128, 0), (129, 0), (1, 4),
                                         (135, 0)])
def test_icmpv6(itype, code):
    frame = tr.ethernet(tr.ipv6(tr.icmpv6(itype, code), proto=58),
                        ethertype=tr.ETH_TYPE_IPV6)
    fk = packet.parse(frame)
    assert fk.template_id == 284 and fk.kind == packet.IPV6_OK
    f = fields(fk)
    assert (f["icmpTypeIPv6"], f["icmpCodeIPv6"]) == (itype, code)
    assert "icmpTypeIPv4" not in f


def test_icmp_in_ipv6_and_icmpv6_in_ipv4_are_errors():
    v6 = packet.parse(tr.ethernet(tr.ipv6(tr.icmp(8), proto=1),
                                  ethertype=tr.ETH_TYPE_IPV6))
    assert (layout(v6)[2], v6.kind) == (t.L4_NONE, packet.IPV6_ERR)
    v4 = packet.parse(tr.ethernet(tr.ipv4(tr.icmpv6(128), proto=58)))
    assert (layout(v4)[2], v4.kind) == (t.L4_NONE, packet.IPV4_ERR)


def test_ipv6_sctp_and_no_next_header():
    fk = packet.parse(tr.ethernet(tr.ipv6(tr.sctp(9, 10), proto=132),
                                  ethertype=tr.ETH_TYPE_IPV6))
    assert fk.template_id == 282 and fk.kind == packet.IPV6_OK
    none = packet.parse(tr.ethernet(tr.ipv6(b"", proto=59),
                                    ethertype=tr.ETH_TYPE_IPV6))
    assert fk.is_ip and none.kind == packet.IPV6_ERR
    assert layout(none)[1:3] == (t.L3_IPV6, t.L4_NONE)
    assert fields(none)["protocolIdentifier"] == 59


def test_ipv6_extension_chain_cut_short_is_an_error():
    pkt = tr.ipv6(tr.udp(1, 2), ext_headers=(tr.hop_by_hop(),
                                             tr.dest_opts()))
    # Keep the hop-by-hop header and 4 bytes of the next.
    fk = packet.parse(tr.ethernet(pkt[:40 + 8 + 4],
                                  ethertype=tr.ETH_TYPE_IPV6, pad=False))
    assert fk.kind == packet.IPV6_ERR and layout(fk)[2] == t.L4_NONE
    assert fields(fk)["protocolIdentifier"] == 60


def test_ipv6_payload_length_bounds_the_headers():
    # Payload length says 4 bytes of UDP; the frame carries more.
    pkt = bytearray(tr.ipv6(tr.udp(5000, 6000)))
    pkt[4:6] = struct.pack("!H", 4)
    fk = packet.parse(tr.ethernet(bytes(pkt), ethertype=tr.ETH_TYPE_IPV6))
    f = fields(fk)
    assert fk.kind == packet.IPV6_OK
    assert (f["sourceTransportPort"], f["destinationTransportPort"]) == \
        (0, 0)


# -- non-IP -----------------------------------------------------------------

def test_arp():
    fk = packet.parse(tr.ethernet(tr.arp(), ethertype=tr.ETH_TYPE_ARP,
                                  dst="ff:ff:ff:ff:ff:ff"))
    assert fk.template_id == 256
    assert (fk.is_ip, fk.kind, fk.eth_header_len) == (False, packet.OTHER,
                                                      14)
    f = fields(fk)
    assert f["ethernetType"] == 0x0806
    assert f["destinationMacAddress"] == "ff:ff:ff:ff:ff:ff"
    assert "ipVersion" not in f


def test_arp_in_vlan():
    fk = packet.parse(tr.ethernet(tr.arp(), ethertype=tr.ETH_TYPE_ARP,
                                  tags=[tr.dot1q(12, 2)]))
    assert fk.template_id == 286 and fk.eth_header_len == 18
    assert fields(fk)["vlanId"] == 12


def test_llc_reads_as_ethertype_05ff():
    fk = packet.parse(tr.ethernet(tr.llc(), ethertype=None,
                                  dst="01:80:c2:00:00:00"))
    assert fk.kind == packet.OTHER and not fk.is_ip
    assert fields(fk)["ethernetType"] == 0x05FF


@pytest.mark.parametrize("n", [0, 1, 6, 11, 12, 13])
def test_runts_keep_what_there_is(n):
    frame = bytes(range(1, 13)) + b"\x08\x00"   # IPv4 if it were whole
    frame = frame[:n]
    fk = packet.parse(frame)
    assert fk.template_id == 256 and fk.kind == packet.OTHER
    f = fields(fk)
    padded = frame + bytes(14 - n)
    assert f["destinationMacAddress"] == ":".join(
        "%02x" % b for b in padded[:6])
    assert f["sourceMacAddress"] == ":".join(
        "%02x" % b for b in padded[6:12])
    # No whole type field: no ethertype, even if a half could make one.
    assert f["ethernetType"] == 0x05FF
    assert not fk.is_ip
    assert f["ethernetHeaderLength"] == 14


# -- truncation at every byte ------------------------------------------------

L4_FIELDS = ("sourceTransportPort", "destinationTransportPort",
             "icmpTypeIPv4", "icmpCodeIPv4", "icmpTypeIPv6", "icmpCodeIPv6")

# name: (frame, Ethernet header length, IP header length, L4 header
# length as OVS needs it whole)
FULL = {
    "tcp4": (tr.ethernet(tr.ipv4(tr.tcp(1, 2, flags=tr.TCP_SYN,
                                        payload=bytes(8)), proto=6)),
             14, 20, 20),
    "udp4": (tr.ethernet(tr.ipv4(tr.udp(1, 2, bytes(30)))), 14, 20, 8),
    "sctp4": (tr.ethernet(tr.ipv4(tr.sctp(1, 2), proto=132)), 14, 20, 12),
    "icmp4": (tr.ethernet(tr.ipv4(tr.icmp(8, 0, payload=bytes(20)),
                                  proto=1)), 14, 20, 8),
    "opts-udp4": (tr.ethernet(tr.ipv4(tr.udp(1, 2, bytes(30)),
                                      options=bytes(8))), 14, 28, 8),
    "tcp6": (tr.ethernet(tr.ipv6(tr.tcp(1, 2, flags=tr.TCP_SYN), proto=6),
                         ethertype=tr.ETH_TYPE_IPV6), 14, 40, 20),
    "icmp6": (tr.ethernet(tr.ipv6(tr.icmpv6(128), proto=58),
                          ethertype=tr.ETH_TYPE_IPV6), 14, 40, 8),
    "hbh-sctp6": (tr.ethernet(tr.ipv6(tr.sctp(1, 2), proto=132,
                                      ext_headers=(tr.hop_by_hop(),)),
                              ethertype=tr.ETH_TYPE_IPV6), 14, 40, 12),
    "vlan-udp4": (tr.ethernet(tr.ipv4(tr.udp(1, 2, bytes(30))),
                              tags=[tr.dot1q(9)]), 18, 20, 8),
    "qinq-tcp4": (tr.ethernet(tr.ipv4(tr.tcp(1, 2), proto=6), tags=[
        tr.dot1q(9, tpid=tr.ETH_TYPE_8021AD), tr.dot1q(8)]), 22, 20, 20),
}


@pytest.mark.parametrize("name", sorted(FULL))
def test_truncated_at_every_length(name):
    """Cut inside Ethernet: non-IP; inside the IP header: IP layout, IP
    fields 0, an error; inside L4: L4 fields 0, OK; whole: all there.
    (The IP length fields still claim the whole packet.)"""
    frame, eth_len, ip_len, l4_len = FULL[name]
    whole = packet.parse(frame)
    assert whole.kind in (packet.IPV4_OK, packet.IPV6_OK)
    l4_off = eth_len + ip_len
    if name == "hbh-sctp6":
        l4_off += 8
    for n in range(len(frame) + 1):
        fk = packet.parse(frame[:n])
        f = fields(fk)
        if n < eth_len:
            assert fk.kind == packet.OTHER, n
            assert layout(fk)[1] == t.L3_NONE, n
            continue
        assert fk.is_ip and layout(fk)[0] == layout(whole)[0], n
        assert fk.eth_header_len == eth_len, n
        if n < eth_len + ip_len:
            assert layout(fk)[1:3] == (layout(whole)[1], t.L4_NONE), n
            assert fk.kind in (packet.IPV4_ERR, packet.IPV6_ERR), n
            assert f["protocolIdentifier"] == f["ipTTL"] == 0, n
            assert {v for k, v in f.items() if "IPv" in k} <= \
                {0, "0.0.0.0", "::"}, n
            continue
        if n < l4_off:
            # Only the IPv6 extension chain is cut: an error.
            assert fk.kind == packet.IPV6_ERR, n
            continue
        assert fk.template_id == whole.template_id, n
        assert fk.kind == whole.kind, n
        l4_values = [v for k, v in f.items() if k in L4_FIELDS]
        assert len(l4_values) == 2
        if n < l4_off + l4_len:
            assert l4_values == [0, 0], n
            assert fk.tcp_flags == 0, n
            assert fk.key[:-4] == whole.key[:-4] or \
                fk.key[:-2] == whole.key[:-2], n
        else:
            assert fk.key == whole.key, n
            assert fk.tcp_flags == whole.tcp_flags, n


# -- TCP flags --------------------------------------------------------------

@pytest.mark.parametrize("byte12, byte13, want", [
    (0x50, 0x02, 0x002), (0x50, 0xFF, 0x0FF), (0x51, 0x10, 0x110),
    (0x5F, 0xFF, 0xFFF), (0xF0, 0x01, 0x001)])
def test_tcp_flags_are_the_low_12_bits(byte12, byte13, want):
    seg = bytearray(tr.tcp(1, 2))
    seg[12], seg[13] = byte12, byte13
    fk = packet.parse(tr.ethernet(tr.ipv4(bytes(seg), proto=6)))
    assert fk.tcp_flags == want


def test_bfd_port_is_reported():
    fk = packet.parse(tr.ethernet(tr.ipv4(tr.udp(49152, 3784))))
    assert fk.udp_dst_port == 3784


def test_observation_point_and_ports_are_u32():
    fk = packet.parse(tr.ethernet(tr.arp(), ethertype=tr.ETH_TYPE_ARP),
                      obs_point_id=(1 << 32) + 5,
                      iface=iface((1 << 32) + 6))
    f = fields(fk)
    assert (f["observationPointId"], f["ingressInterface"]) == (5, 6)


# -- the traffic mix against traffic.py's reference parser -------------------

def expected_from_truth(frame):
    p = tr._parse(frame)
    flow = p.flow
    ehl, pcp, ttl, tos, label = p.attrs
    want = {"sourceMacAddress": flow.src_mac,
            "destinationMacAddress": flow.dst_mac,
            "ethernetType": flow.ethertype, "ethernetHeaderLength": ehl}
    if flow.vlan is not None:
        want.update(vlanId=flow.vlan, dot1qVlanId=flow.vlan,
                    dot1qPriority=pcp)
    if flow.ip_version is not None:
        v = flow.ip_version
        want.update(ipVersion=v, ipTTL=ttl, protocolIdentifier=flow.proto,
                    ipClassOfService=tos, ipDiffServCodePoint=tos >> 2,
                    ipPrecedence=tos >> 5)
        want["sourceIPv%dAddress" % v] = flow.src_ip
        want["destinationIPv%dAddress" % v] = flow.dst_ip
        if v == 6:
            want["flowLabelIPv6"] = label
    if flow.src_port is not None:
        want.update(sourceTransportPort=flow.src_port,
                    destinationTransportPort=flow.dst_port)
    if flow.icmp_type is not None:
        v = flow.ip_version
        want["icmpTypeIPv%d" % v] = flow.icmp_type
        want["icmpCodeIPv%d" % v] = flow.icmp_code
    kind = {("ipv4", "ok"): packet.IPV4_OK, ("ipv4", "err"): packet.IPV4_ERR,
            ("ipv6", "ok"): packet.IPV6_OK, ("ipv6", "err"): packet.IPV6_ERR,
            ("other", "other"): packet.OTHER}[p.kind, p.status]
    return want, kind, p.tcp_flags


def check_against_truth(frame):
    want, kind, flags = expected_from_truth(frame)
    fk = packet.parse(frame)
    got = fields(fk)
    for k in ("observationPointId", "flowDirection", "ingressInterface",
              "ingressInterfaceType", "interfaceName",
              "interfaceDescription"):
        got.pop(k)
    assert got == want
    assert fk.kind == kind
    assert fk.tcp_flags == flags
    assert fk.eth_header_len == want["ethernetHeaderLength"]
    assert fk.is_ip == (kind != packet.OTHER)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_traffic_mix_matches_reference(seed):
    frames, _ = tr.traffic_mix(seed)
    for frame in frames:
        check_against_truth(frame)


def test_traffic_mix_truncated_everywhere_matches_reference():
    frames, _ = tr.traffic_mix(4, flows_per_kind=1,
                               packets_per_flow=(1, 1))
    checked = 0
    for frame in frames:
        for n in range(14, min(len(frame), 130) + 1):
            check_against_truth(frame[:n])
            checked += 1
    assert checked > 2500


# -- properties -------------------------------------------------------

def check_invariants(fk, frame):
    tmpl = t.get(fk.template_id)
    fields(fk)      # the key decodes through its template, to the byte
    assert fk.eth_header_len in (14, 18, 22)
    assert fk.is_ip == (tmpl.l3 != t.L3_NONE)
    assert fk.kind in (packet.OTHER, packet.IPV4_OK, packet.IPV6_OK,
                       packet.IPV4_ERR, packet.IPV6_ERR)
    assert (fk.kind == packet.OTHER) == (not fk.is_ip)
    assert 0 <= fk.tcp_flags <= 0x0FFF
    if tmpl.l4 != t.L4_TCP:
        assert fk.tcp_flags == 0
    assert fk.udp_dst_port == -1 or tmpl.l4 == t.L4_UDP


VXLAN_PORT = interfaces.Interface(2, name="vx0", type="vxlan")


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 1), st.booleans(),
       st.integers(0, (1 << 64) - 1))
def test_parse_never_raises_on_arbitrary_bytes(data, direction, tunnelled,
                                               vni):
    tunnel = b""
    if tunnelled:
        tunnel = interfaces.tunnel_part(VXLAN_PORT, upcall.Tunnel(
            b"\x0a\0\0\1", b"\x0a\0\0\2", 1234, 4789, vni, 1))
    fk = packet.parse(data, 1, direction,
                      iface(2, 3, direction == t.EGRESS, name="p2"), tunnel)
    check_invariants(fk, data)
    tmpl = t.get(fk.template_id)
    assert tmpl.direction == direction and tmpl.tunnel == tunnelled
    f = fields(fk)
    assert f["interfaceName"] == "p2"
    if tunnelled:
        assert fk.key.endswith(tunnel)
        assert f["tunnelKey"] == (vni & 0xFFFFFF).to_bytes(3, "big")
        assert (f["tunnelType"], f["tunnelProtocolIdentifier"],
                f["tunnelDestinationTransportPort"]) == (1, 17, 4789)


HEADS = st.sampled_from([
    bytes.fromhex("020000000002020000000001" "0800"),
    bytes.fromhex("020000000002020000000001" "86dd"),
    bytes.fromhex("020000000002020000000001" "8100" "0064" "0800"),
    bytes.fromhex("020000000002020000000001" "88a8" "0064" "8100" "0005"
                  "86dd"),
])
IP_HEADS = st.sampled_from([
    b"",
    bytes.fromhex("45000000000000004006000001020304"),      # 16 of 20
    bytes.fromhex("4500003c00000000400600000102030405060708"),
    bytes.fromhex("4600003c000020004011000001020304050607080000"),
    bytes.fromhex("4f"),
    bytes.fromhex("6000000000140640") + bytes(32),            # TCP
    bytes.fromhex("6000000000ff0040") + bytes(32),            # hop-by-hop
    bytes.fromhex("6000000000ff2c40") + bytes(32),            # fragment
    bytes.fromhex("6000000000ff3340") + bytes(32),            # AH
])


@settings(max_examples=1500, deadline=None)
@given(HEADS, IP_HEADS, st.binary(max_size=120))
def test_parse_never_raises_behind_valid_headers(head, ip, rest):
    frame = head + ip + rest
    fk = packet.parse(frame)
    check_invariants(fk, frame)
    assert fk.key[5:11] == frame[6:12]    # source MAC
    assert fk.key[11:17] == frame[0:6]    # destination MAC


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from(sorted(FULL)),
       st.lists(st.tuples(st.integers(12, 80), st.integers(0, 255)),
                max_size=4),
       st.integers(14, 120))
def test_mutated_frames_match_reference(name, edits, cut):
    """Random bytes changed anywhere in the headers (ethertypes,
    versions, IHL, lengths, protocols, extension headers, ports), then
    cut: parse agrees with traffic.py's reference parser."""
    frame = bytearray(FULL[name][0])
    for pos, value in edits:
        if pos < len(frame):
            frame[pos] = value
    check_against_truth(bytes(frame[:cut]))
