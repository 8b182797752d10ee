"""Golden bytes, written by hand from RFC 7011 and the IANA registry.

Hand-built frames go through the core (Exporter, sampling 1) to a
loopback UDP collector; what arrives must be exactly the messages below,
each spelled out field by field.  Nothing here calls our encoder to make
an expectation.

RFC 7011 section 3.1 (message header): version 0x000a, length, export
time (s), sequence number (data records sent before, per domain),
observation domain id.  Section 3.3.2 (set header): set id (2 template,
3 options template, >= 256 data), length.  Section 3.4.1 (template
record header): template id, field count; 3.2 field specifier:
element id, field length.  Section 3.4.2.2: options template record
adds the scope field count.
"""

import socket

import pytest
from support.collector import UdpCollector

from ovs_ipfix_py.exporter import Exporter
from ovs_ipfix_py.interfaces import Interface
from ovs_ipfix_py.options import (
    BridgeExporterOptions,
    CacheOptions,
    ExportOptions,
)

T0 = 1700000000.0          # 0x6553f100

ETH = "020000000002" "020000000001" "0800"   # dst, src, IPv4


def frame(hexstr):
    return bytes.fromhex("".join(hexstr.split()))


# 10.0.0.1:12345 -> 10.0.0.2:80, TOS 0xb8 (DSCP 46, precedence 5), TTL 64.
SYN = frame(ETH + "45b8 0028 0001 4000 40 06 0000 0a000001 0a000002"
                  "3039 0050 00000001 00000000 5002 ffff 0000 0000")
ACK_100 = frame(ETH + "45b8 008c 0002 4000 40 06 0000 0a000001 0a000002"
                      "3039 0050 00000002 00000001 5010 ffff 0000 0000"
                + "00" * 100)
PSH_960 = frame(ETH + "45b8 03e8 0003 4000 40 06 0000 0a000001 0a000002"
                      "3039 0050 00000066 00000001 5018 ffff 0000 0000"
                + "00" * 960)
# Another flow: source port 12346.
SYN_2 = frame(ETH + "45b8 0028 0004 4000 40 06 0000 0a000001 0a000002"
                    "303a 0050 00000001 00000000 5002 ffff 0000 0000")
# ARP request in VLAN 100, priority 6 (TCI 0xc064), padded to 64.
VLAN_ARP = frame("ffffffffffff 020000000001 8100 c064 0806"
                 "0001 0800 06 04 0001 020000000001 0a000001"
                 "000000000000 0a000002" + "00" * 18)

TEMPLATE_268 = (
    "010c 001e"                                   # id 268, 30 fields
    "008a 0004"   # observationPointId (138), reduced to 4
    "003d 0001"   # flowDirection (61)
    "0038 0006"   # sourceMacAddress (56)
    "0050 0006"   # destinationMacAddress (80)
    "0100 0002"   # ethernetType (256)
    "00f0 0001"   # ethernetHeaderLength (240)
    "000a 0004"   # ingressInterface (10)
    "0170 0004"   # ingressInterfaceType (368)
    "0052 ffff"   # interfaceName (82), variable length (RFC 7011 7)
    "0053 ffff"   # interfaceDescription (83), variable length
    "003c 0001"   # ipVersion (60)
    "00c0 0001"   # ipTTL (192)
    "0004 0001"   # protocolIdentifier (4)
    "00c3 0001"   # ipDiffServCodePoint (195)
    "00c4 0001"   # ipPrecedence (196)
    "0005 0001"   # ipClassOfService (5)
    "0008 0004"   # sourceIPv4Address (8)
    "000c 0004"   # destinationIPv4Address (12)
    "0007 0002"   # sourceTransportPort (7)
    "000b 0002"   # destinationTransportPort (11)
    "0098 0008"   # flowStartMilliseconds (152)
    "0099 0008"   # flowEndMilliseconds (153)
    "0002 0008"   # packetDeltaCount (2)
    "0160 0008"   # layer2OctetDeltaCount (352)
    "0088 0001"   # flowEndReason (136)
    "0001 0008"   # octetDeltaCount (1)
    "00c6 0008"   # octetDeltaSumOfSquares (198)
    "0019 0008"   # minimumIpTotalLength (25)
    "001a 0008"   # maximumIpTotalLength (26)
    "0006 0002"   # tcpControlBits (6)
)

# Three packets of 54, 154 and 1014 bytes (IP 40, 140, 1000) at T0,
# T0+0.5, T0+0.75, flushed at T0+0.75 (export time T0+1).  Times in
# ms since 1970: T0 = 1,700,000,000,000 ms = 0x18bcfe56800.
RECORD_1 = (
    "00000007" "00"                        # observation point 7, ingress
    "020000000001" "020000000002"          # source, destination MAC
    "0800" "0e"                            # IPv4, header length 14
    "00000003" "00000000"                  # input port: ifindex 3, type 0
    "04" "65746833" "00"                   # name "eth3", no description
    "04" "40" "06" "2e" "05" "b8"          # v4, TTL 64, TCP, DSCP, prec, TOS
    "0a000001" "0a000002" "3039" "0050"    # addresses, ports
    "0000018bcfe56800"                     # start: T0
    "0000018bcfe56aee"                     # end: T0 + 750 ms
    "0000000000000003"                     # packets
    "00000000000004c6"                     # l2 octets 54 + 154 + 1014
    "04"                                   # forced end
    "000000000000049c"                     # octets 40 + 140 + 1000
    "00000000000f9510"                     # 1600 + 19600 + 1000000
    "0000000000000028" "00000000000003e8"  # min 40, max 1000
    "001a"                                 # SYN | ACK | PSH
)

MESSAGE_1 = (
    "000a 010b"            # version 10, length 267 = 16 + 128 + 123
    "6553f101"             # export time T0 + 1 (now rounded up)
    "00000000"             # no data record before
    "0000002a"             # observation domain 42
    "0002 0080" + TEMPLATE_268 +         # template set, 4 + 124
    "010c 007b" + RECORD_1               # data set 268, 4 + 119
)

# One SYN at T0+1, flushed at T0+2.
MESSAGE_2 = (
    "000a 008b" "6553f102"
    "00000001"             # one data record before, in domain 42
    "0000002a"
    "010c 007b"            # the template is not sent again
    "00000007" "00" "020000000001" "020000000002" "0800" "0e" "00000003"
    "00000000" "04" "65746833" "00"
    "04" "40" "06" "2e" "05" "b8" "0a000001" "0a000002" "303a" "0050"
    "0000018bcfe56be8" "0000018bcfe56be8"  # T0 + 1000 ms
    "0000000000000001" "0000000000000036" "04"
    "0000000000000028" "0000000000000640"
    "0000000000000028" "0000000000000028" "0002"
)


def hx(text):
    return bytes.fromhex("".join(text.split()))


@pytest.fixture
def collector():
    with UdpCollector(socket.AF_INET) as c:
        yield c


def make_exporter(collector, domain, now):
    """Bridge br0 whose OpenFlow port 3 is "eth3", ifindex 3 (OVSDB's
    Interface row); port 5 is unknown."""
    opts = BridgeExporterOptions(
        "br0", ExportOptions(targets=(collector.target,),
                             cache=CacheOptions(600, 100)),
        sampling=1, obs_domain_id=domain, obs_point_id=7)
    exp = Exporter(opts, now)
    exp.set_ports({3: Interface(3, "eth3", ifindex=3)})
    return exp


def receive(collector, n):
    assert collector.wait_for(lambda d: len(d) >= n, 5.0)
    collector.receive(0.05)
    return [data for _, data in collector.datagrams]


def test_header_template_set_and_data_record(collector):
    exp = make_exporter(collector, 42, T0)
    try:
        exp.sample_bridge(SYN, len(SYN), 3, None, T0)
        exp.sample_bridge(ACK_100, len(ACK_100), 3, None, T0 + 0.5)
        exp.sample_bridge(PSH_960, len(PSH_960), 3, None, T0 + 0.75)
        exp.flush(T0 + 0.75)
        [msg] = receive(collector, 1)
        assert msg.hex() == hx(MESSAGE_1).hex()

        exp.sample_bridge(SYN_2, len(SYN_2), 3, None, T0 + 1)
        exp.flush(T0 + 2)
        msgs = receive(collector, 2)
        assert len(msgs) == 2
        assert msgs[1].hex() == hx(MESSAGE_2).hex()

        # Statistics (due at T0 + 600, before the template refresh at
        # T0 + 600.75): the options template (set 3) first, then its
        # data in set 320; the sequence number counts the 2 flows.
        exp.run(T0 + 600.5)
        msgs = receive(collector, 3)
        pid = exp.exporting_process_id.to_bytes(4, "big").hex()
        options = (
            "000a 004a" "6553f359"            # T0 + 601
            "00000002" "0000002a"
            "0003 001a"                       # options template set
            "0140 0004 0001"                  # id 320, 4 fields, 1 scope
            "0090 0004"                       # exportingProcessId (144)
            "00a6 0008 00a7 0008 00a8 0008"   # notSent{Flow,Packet,Octet}
            "0140 0020" + pid                 # options data set
            + "0000000000000000" * 3)
        assert msgs[2].hex() == hx(options).hex()
    finally:
        exp.close(T0 + 700)


def test_vlan_non_ip_record(collector):
    exp = make_exporter(collector, 43, T0)
    try:
        exp.sample_bridge(VLAN_ARP, len(VLAN_ARP), 5, None, T0 + 0.5)
        exp.flush(T0 + 0.5)
        [msg] = receive(collector, 1)
        expected = (
            "000a 00a8" "6553f101" "00000000" "0000002b"
            "0002 0050"
            "011e 0012"                        # template 286, 18 fields
            "008a0004 003d0001 00380006 00500006 01000002 00f00001"
            "000a0004 01700004 0052ffff 0053ffff"  # interface elements
            "003a0002 00f30002 00f40001"       # vlanId, dot1qVlanId, prio
            "00980008 00990008 00020008 01600008 00880001"
            "011e 0048"                        # data set, 4 + 68
            "00000007" "00" "020000000001" "ffffffffffff" "0806" "12"
            # Port 5 is unknown: ifindex 0, type 0, two empty strings
            # (OVS's ipfix_put_iface_data_record()).
            "00000000" "00000000" "00" "00"
            "0064" "0064" "06"
            "0000018bcfe569f4" "0000018bcfe569f4"  # T0 + 500 ms
            "0000000000000001" "0000000000000040" "04")
        assert msg.hex() == hx(expected).hex()
    finally:
        exp.close(T0 + 1)


def test_frames_are_what_the_comments_say():
    """Guard the hand-built frames themselves."""
    assert (len(SYN), len(ACK_100), len(PSH_960)) == (54, 154, 1014)
    assert len(VLAN_ARP) == 64
    for f, total in ((SYN, 40), (ACK_100, 140), (PSH_960, 1000)):
        assert int.from_bytes(f[16:18], "big") == total == len(f) - 14
    assert 0x6553F100 == int(T0)
