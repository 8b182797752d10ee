"""decap.decapsulate: VXLAN, Geneve and GRE over IPv4 and IPv6 give the
inner frame and the tunnel; everything else is "no tunnel"; garbage never
raises.  Frames are built with tests/traffic.py."""

import ipaddress

import hypothesis.strategies as st
import pytest
import traffic as tr
from hypothesis import given, settings

from ovs_ipfix_py import decap
from ovs_ipfix_py.upcall import Tunnel

INNER = tr.build_frame(src_ip="10.0.0.1", dst_ip="10.0.0.2", sport=1234,
                       dport=80, proto=tr.IPPROTO_TCP)


def a(text):
    return ipaddress.ip_address(text).packed


def outer4(payload, proto=tr.IPPROTO_UDP, **kw):
    return tr.ethernet(tr.ipv4(payload, src="198.51.100.1",
                               dst="198.51.100.2", proto=proto, **kw))


def outer6(payload, proto=tr.IPPROTO_UDP, **kw):
    return tr.ethernet(tr.ipv6(payload, src="2001:db8::a",
                               dst="2001:db8::b", proto=proto, **kw),
                       ethertype=tr.ETH_TYPE_IPV6)


V4 = (a("198.51.100.1"), a("198.51.100.2"))
V6 = (a("2001:db8::a"), a("2001:db8::b"))


@pytest.mark.parametrize("frame, tunnel", [
    (outer4(tr.udp(49152, 4789, tr.vxlan(INNER, 5001))),
     Tunnel(*V4, 49152, 4789, 5001, 1)),
    (outer6(tr.udp(50000, 4789, tr.vxlan(INNER, 0xFFFFFF))),
     Tunnel(*V6, 50000, 4789, 0xFFFFFF, 1)),
    (outer4(tr.udp(1, 6081, tr.geneve(INNER, 7001))),
     Tunnel(*V4, 1, 6081, 7001, 7)),
    (outer4(tr.udp(1, 6081, tr.geneve(INNER, 7002, options=bytes(8)))),
     Tunnel(*V4, 1, 6081, 7002, 7)),
    (outer6(tr.udp(2, 6081, tr.geneve(INNER, 3))),
     Tunnel(*V6, 2, 6081, 3, 7)),
    (outer4(tr.gre_teb(INNER, key=0xDEADBEEF), proto=tr.IPPROTO_GRE),
     Tunnel(*V4, 0, 0, 0xDEADBEEF, 2)),
    (outer4(tr.gre_teb(INNER), proto=tr.IPPROTO_GRE),
     Tunnel(*V4, 0, 0, 0, 2)),
    (outer4(tr.gre_teb(INNER, key=9, checksum=True, seq=77),
            proto=tr.IPPROTO_GRE), Tunnel(*V4, 0, 0, 9, 2)),
    (outer6(tr.gre_teb(INNER, key=10), proto=tr.IPPROTO_GRE),
     Tunnel(*V6, 0, 0, 10, 2)),
    (tr.ethernet(tr.ipv4(tr.udp(7, 4789, tr.vxlan(INNER, 42)),
                         src="198.51.100.1", dst="198.51.100.2"),
                 tags=[tr.dot1q(100)]), Tunnel(*V4, 7, 4789, 42, 1)),
    (outer6(tr.udp(3, 4789, tr.vxlan(INNER, 8)),
            ext_headers=[tr.hop_by_hop()]), Tunnel(*V6, 3, 4789, 8, 1)),
], ids=["vxlan4", "vxlan6", "geneve4", "geneve4-options", "geneve6",
        "gre4-key", "gre4-nokey", "gre4-csum-key-seq", "gre6-key",
        "vxlan4-vlan", "vxlan6-hop-by-hop"])
def test_tunnels_are_decapsulated(frame, tunnel):
    d = decap.decapsulate(frame)
    assert d is not None
    assert d.tunnel == tunnel
    assert d.frame == INNER


@pytest.mark.parametrize("frame", [
    INNER,                                                  # no tunnel
    outer4(tr.udp(1, 4790, tr.vxlan(INNER, 1))),            # other port
    outer4(tr.udp(1, 4789, tr.vxlan(INNER, 1, flags=0))),   # no I flag
    outer4(tr.udp(1, 6081, tr.geneve(INNER, 1, proto=0x0800))),
    outer4(tr.gre(tr.ipv4(tr.udp(1, 2))), proto=tr.IPPROTO_GRE),  # IP
    outer4(tr.udp(1, 4789, tr.vxlan(INNER, 1)), mf=True),   # fragment
    outer4(tr.udp(1, 4789, tr.vxlan(INNER[:10], 1))),       # inner runt
    outer4(tr.udp(1, 4789, tr.vxlan(INNER, 1)))[:60],       # truncated
    tr.ethernet(tr.arp(), ethertype=tr.ETH_TYPE_ARP),
], ids=["plain", "udp-4790", "vxlan-no-vni-flag", "geneve-ip-payload",
        "gre-ip-payload", "fragment", "inner-runt", "truncated", "arp"])
def test_other_frames_are_no_tunnel(frame):
    assert decap.decapsulate(frame) is None


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 199), st.integers(0, 255))
def test_never_raises(data, at, value):
    frame = bytearray(outer4(tr.udp(1, 4789, tr.vxlan(INNER, 1))) + data)
    frame[at % len(frame)] = value
    d = decap.decapsulate(bytes(frame))
    if d is not None:
        assert len(d.frame) >= 14 and d.tunnel.tun_type in (1, 2, 7)


def test_samples_keep_the_original_length_of_the_inner_frame():
    """A truncated capture record: the inner frame's original length is
    the outer one less the outer headers."""
    frame = outer4(tr.udp(1, 4789, tr.vxlan(INNER, 5)))
    tmpl = decap.upcall.BridgeSample("br0", 1, None, 1, b"", 0)
    [plain, tunnelled] = decap.samples([(0.0, INNER, len(INNER) + 3),
                                        (0.0, frame, len(frame) + 3)],
                                       tmpl, 9)
    assert (plain.input_port, plain.tunnel, plain.orig_len) == (
        9, None, len(INNER) + 3)
    assert tunnelled.input_port == 9 and tunnelled.tunnel.tun_id == 5
    assert tunnelled.frame == INNER
    assert tunnelled.orig_len == len(INNER) + 3
