"""A sampled frame -> its flow key, encoded as the data record's key part.

``parse()`` reads Ethernet (one 802.1Q or 802.1ad tag, plus an inner
802.1Q tag), IPv4 (options skipped, non-first fragments without ports),
IPv6 (hop-by-hop, routing, fragment, destination options and AH headers
walked to reach L4), TCP/UDP/SCTP ports, ICMP/ICMPv6 type and code.  It
never raises on short or odd input: what cannot be read is 0, as
OVS's flow_extract() leaves it, and the sample is classified so the
exporter counts it the way OVS does (``ipv4 errs``, ``ipv6 errs``).
As in OVS, an L4 header is read only when it is whole (TCP 20, UDP 8,
SCTP 12, ICMP and ICMPv6 8 bytes) inside the IP packet: IPv4 total
length and IPv6 payload length bound it, so Ethernet padding is never
taken for a header.

The key is returned already encoded in the field order of its template
(see ``templates``), so the flow cache can use it as its dict key and the
encoder can write it out unchanged.

Where we differ from OVS (on purpose, documented in the README): a
second, inner 802.1Q tag under the outer tag is skipped so the frame is
still keyed on its IP header (ethernetHeaderLength 22); OVS with its
default vlan-limit of 1 reports such frames as non-IP with ethernetType
0x8100.
"""

from __future__ import annotations

import struct
from typing import NamedTuple, Optional

from ovs_ipfix_py import interfaces
from ovs_ipfix_py import templates as t

# Sample classification, as OVS's enum ipfix_sampled_packet_type.
OTHER, IPV4_OK, IPV6_OK, IPV4_ERR, IPV6_ERR = range(5)

ETH_TYPE_IP = 0x0800
ETH_TYPE_IPV6 = 0x86DD
ETH_TYPE_VLAN = 0x8100
ETH_TYPE_VLAN_8021AD = 0x88A8
#: OVS's FLOW_DL_TYPE_NONE: an 802.3 frame whose type field is a length.
ETH_TYPE_NONE = 0x05FF
ETH_TYPE_MIN = 0x0600

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_SCTP = 132
IPPROTO_ICMPV6 = 58
_L4_OF_PROTO_V4 = {IPPROTO_TCP: t.L4_TCP, IPPROTO_UDP: t.L4_UDP,
                   IPPROTO_SCTP: t.L4_SCTP, IPPROTO_ICMP: t.L4_ICMP}
_L4_OF_PROTO_V6 = {IPPROTO_TCP: t.L4_TCP, IPPROTO_UDP: t.L4_UDP,
                   IPPROTO_SCTP: t.L4_SCTP, IPPROTO_ICMPV6: t.L4_ICMP}
# Bytes of L4 header OVS's flow_extract() needs before it reads the
# ports (TCP, UDP, SCTP) or type and code (ICMP_HEADER_LEN and struct
# icmp6_hdr are both 8 bytes).
_L4_HEADER_LEN = {IPPROTO_TCP: 20, IPPROTO_UDP: 8, IPPROTO_SCTP: 12,
                  IPPROTO_ICMP: 8, IPPROTO_ICMPV6: 8}
# IPv6 extension headers walked to reach L4: hop-by-hop, routing,
# fragment, destination options, authentication header.
_IPV6_EXT_HOPOPTS, _IPV6_EXT_ROUTING, _IPV6_EXT_FRAGMENT = 0, 43, 44
_IPV6_EXT_DSTOPTS, _IPV6_EXT_AH = 60, 51
_IPV6_EXT = frozenset((_IPV6_EXT_HOPOPTS, _IPV6_EXT_ROUTING,
                       _IPV6_EXT_FRAGMENT, _IPV6_EXT_DSTOPTS, _IPV6_EXT_AH))

_ZERO4 = bytes(4)
_UNKNOWN_EGRESS = interfaces.UNKNOWN_IFACE * 2
_ZERO16 = bytes(16)
_U32 = struct.Struct("!I")
_HEAD = struct.Struct("!IB")          # observationPointId, flowDirection
_VLAN = struct.Struct("!HHB")         # vlanId, dot1qVlanId, dot1qPriority
_IP_COMMON = struct.Struct("!BBBBBB")  # version, TTL, proto, DSCP, prec, TOS

#: TOS byte -> ipDiffServCodePoint, ipPrecedence, ipClassOfService.
TOS_FIELDS = tuple(bytes((tos >> 2, tos >> 5, tos)) for tos in range(256))


class FlowKey(NamedTuple):
    """What ``parse`` found.

    ``template_id``: the layout's template; ``key``: the encoded key part
    of the data record; ``eth_header_len``: Ethernet header length in
    bytes (ipTotalLength = frame length - this); ``is_ip``; ``tcp_flags``
    (0 unless TCP); ``kind``: OTHER, IPV4_OK, IPV6_OK, IPV4_ERR or
    IPV6_ERR; ``udp_dst_port`` (or -1), for the BFD filter.
    """

    template_id: int
    key: bytes
    eth_header_len: int
    is_ip: bool
    tcp_flags: int
    kind: int
    udp_dst_port: int


def parse(frame: bytes, obs_point_id: int = 0, direction: int = t.INGRESS,
          iface: Optional[bytes] = None, tunnel: bytes = b"") -> FlowKey:
    """Parse ``frame`` into its encoded flow key.  Never raises.

    ``obs_point_id`` and ``direction`` (templates.INGRESS or EGRESS) are
    part of the key.  ``iface``: the interface part of the key
    (interfaces.iface_part: the input port's elements, and for egress
    the output port's), None for unknown ports.  ``tunnel``: the tunnel
    part (interfaces.tunnel_part), b"" for an untunnelled sample; a
    tunnelled one takes the tunnel layout's template and ends its key
    with these bytes.  Both are opaque here: the caller builds and
    caches them per port pair and per tunnel.
    """
    n = len(frame)
    if n < 14:
        # A runt: keep the MAC bytes there are, zero the rest.  It has
        # no type field, so it is no IP frame (OVS's flow_extract()
        # stops before the ethertype too): ethernetType "none".
        frame = bytes(frame[:12]) + bytes(12 - min(n, 12)) + b"\x05\xff"
        n = 14
    f = frame
    etype = f[12] << 8 | f[13]
    off = 14
    vlan = b""
    l2 = t.L2_ETH
    if etype in (ETH_TYPE_VLAN, ETH_TYPE_VLAN_8021AD) and n >= 18:
        tci = f[14] << 8 | f[15]
        vid = tci & 0x0FFF
        vlan = _VLAN.pack(vid, vid, tci >> 13)
        l2 = t.L2_VLAN
        etype = f[16] << 8 | f[17]
        off = 18
        if etype == ETH_TYPE_VLAN and n >= 22:
            etype = f[20] << 8 | f[21]
            off = 22
    if etype < ETH_TYPE_MIN:
        etype = ETH_TYPE_NONE

    head = _HEAD.pack(obs_point_id & 0xFFFFFFFF, direction)
    if iface is None:
        iface = (_UNKNOWN_EGRESS if direction == t.EGRESS
                 else interfaces.UNKNOWN_IFACE)
    l2part = b"".join((head, f[6:12], f[0:6], bytes((etype >> 8,
                                                     etype & 0xFF, off)),
                       iface, vlan))

    if etype == ETH_TYPE_IP:
        l3part, l4, tcp_flags, kind, dport = _ipv4(f, off, n)
        l3 = t.L3_IPV4
    elif etype == ETH_TYPE_IPV6:
        l3part, l4, tcp_flags, kind, dport = _ipv6(f, off, n)
        l3 = t.L3_IPV6
    else:
        return FlowKey(t.template_id(l2, t.L3_NONE, t.L4_NONE, direction,
                                     bool(tunnel)),
                       l2part + tunnel, off, False, 0, OTHER, -1)
    return FlowKey(t.template_id(l2, l3, l4, direction, bool(tunnel)),
                   l2part + l3part + tunnel, off, True, tcp_flags, kind,
                   dport)


def _l4(f, off, end, proto, l4, later_fragment):
    """The L4 part of the key: ports or ICMP type/code.

    As OVS's flow_extract(), the fields are read only when the whole
    L4 header is there (``_L4_HEADER_LEN``) before ``end``, the end of
    the IP packet; an incomplete header gives 0s.  Returns (bytes,
    tcp_flags, udp_dst_port or -1).
    """
    if later_fragment or end < off + _L4_HEADER_LEN[proto]:
        return (b"\0\0" if l4 == t.L4_ICMP else _ZERO4), 0, -1
    if l4 == t.L4_ICMP:
        return f[off:off + 2], 0, -1
    dport = f[off + 2] << 8 | f[off + 3] if proto == IPPROTO_UDP else -1
    flags = ((f[off + 12] & 0x0F) << 8 | f[off + 13]
             if proto == IPPROTO_TCP else 0)
    return f[off:off + 4], flags, dport


def _ipv4(f, ip, n):
    if n >= ip + 20 and f[ip] >> 4 == 4:
        ihl = (f[ip] & 0x0F) * 4
        if ihl >= 20 and n >= ip + ihl:
            tos = f[ip + 1]
            proto = f[ip + 9]
            later = bool((f[ip + 6] & 0x1F) or f[ip + 7])
            # L4 ends with the IP packet (total length), not with the
            # frame: Ethernet padding is no header (as OVS).
            end = ip + (f[ip + 2] << 8 | f[ip + 3])
            if end > n:
                end = n
            common = (bytes((4, f[ip + 8], proto)) + TOS_FIELDS[tos]
                      + f[ip + 12:ip + 20])
            l4 = _L4_OF_PROTO_V4.get(proto, t.L4_NONE)
            if l4 == t.L4_NONE:
                # OVS counts IP samples with no known L4 as errors.
                return common, l4, 0, IPV4_ERR, -1
            part, flags, dport = _l4(f, ip + ihl, end, proto, l4, later)
            return common + part, l4, flags, IPV4_OK, dport
    # Header unreadable: OVS's flow_extract() leaves every field 0.
    return (_IP_COMMON.pack(4, 0, 0, 0, 0, 0) + _ZERO4 + _ZERO4,
            t.L4_NONE, 0, IPV4_ERR, -1)


def _ipv6(f, ip, n):
    if n < ip + 40 or f[ip] >> 4 != 6:
        return (_IP_COMMON.pack(6, 0, 0, 0, 0, 0) + _ZERO16 + _ZERO16
                + _ZERO4, t.L4_NONE, 0, IPV6_ERR, -1)
    word = _U32.unpack_from(f, ip)[0]
    tclass = (word >> 20) & 0xFF
    label = word & 0xFFFFF
    nh = f[ip + 6]
    hlim = f[ip + 7]
    off = ip + 40
    # Extension headers and L4 end with the payload length, not with the
    # frame's padding.
    end = off + (f[ip + 4] << 8 | f[ip + 5])
    if end > n:
        end = n
    later = False
    ok = True
    while nh in _IPV6_EXT:
        if end < off + 8:
            ok = False
            break
        if nh == _IPV6_EXT_FRAGMENT:
            frag_offset = (f[off + 2] << 8 | f[off + 3]) >> 3
            nh = f[off]
            off += 8
            if frag_offset:
                later = True
                break
            continue
        if nh == _IPV6_EXT_AH:
            length = (f[off + 1] + 2) * 4
        else:
            length = (f[off + 1] + 1) * 8
        nh = f[off]
        off += length
    common = (bytes((6, hlim, nh)) + TOS_FIELDS[tclass] + f[ip + 8:ip + 40]
              + _U32.pack(label))
    l4 = _L4_OF_PROTO_V6.get(nh, t.L4_NONE) if ok else t.L4_NONE
    if l4 == t.L4_NONE:
        return common, l4, 0, IPV6_ERR, -1
    part, flags, dport = _l4(f, off, end, nh, l4, later)
    return common + part, l4, flags, IPV6_OK, dport
