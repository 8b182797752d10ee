"""Test traffic: Ethernet frames, and the flows an exporter must report.

Pure Python (stdlib only).  Three parts:

1. Frame builders, small and composable: ``ethernet()`` (with ``dot1q()``
   tags and padding to the 60-octet minimum), ``ipv4()`` (options,
   fragments; header checksum always correct), ``ipv6()`` (extension
   headers from ``hop_by_hop()``, ``routing()``, ``dest_opts()``,
   ``fragment()``, ``auth_header()``), ``tcp()``, ``udp()``, ``sctp()``
   (CRC32c), ``icmp()``, ``icmpv6()``, ``gre()``, ``arp()``, ``llc()``.
   ``ipv4()``/``ipv6()`` fill in the TCP, UDP and ICMPv6 checksums over
   the pseudo-header when the segment is whole and unfragmented.
   ``build_frame()`` is a one-call shortcut for the common cases.

2. Ground truth: ``flow_id_of(frame)`` and ``truth_of(frames)``, a small
   reference parser written from /tmp/semantics.md (the team's flow-key
   rules, which follow OVS's flow_extract()), independently of
   ovs_ipfix_py.packet.  ``FlowId`` is what a decoder such as tshark can
   report back; ``FlowTruth`` holds the totals for sampling 1 (each
   frame counts once) and the flow's other key fields.

3. Traffic: ``traffic_mix()`` (every corner the exporter must get right,
   deterministic per seed, with its truth) and ``many_flows()`` (a fast
   stream of IPv4 TCP/UDP frames for benchmarks).

Rules the truth follows (see /tmp/semantics.md):

- Ethernet header 14 octets; an outer 802.1Q/802.1ad tag gives vlan (VID)
  and its PCP, header 18; an inner 802.1Q tag after it is skipped too
  (header 22).  An 802.3 length field (< 0x600) reads as ethertype
  0x05ff.  ``l2_octets`` counts whole frames; the IP length of a frame is
  its length minus the Ethernet header (padding included).
- IPv4/IPv6 header unreadable (too short, wrong version, IHL < 5): IP
  layout with every IP and L4 field 0 (addresses "0.0.0.0"/"::",
  protocol 0, no ports), counted as an error.  ``ip_version`` stays 4 or
  6, from the ethertype.
- L4 read only inside the IP packet (IPv4 total length / IPv6 payload
  length, so never from Ethernet padding) and only when its header is
  whole: TCP 20, UDP 8, SCTP 12, ICMP 8, ICMPv6 8 octets; otherwise its
  fields are 0 and the frame still counts as OK.  Non-first fragments
  (IPv4 offset != 0, IPv6 fragment header offset != 0): ports or ICMP
  type/code 0.  IPv6 extension headers 0, 43, 44, 60, 51 are walked; a
  chain cut short leaves the protocol at that header, no L4, an error.
- Status: IPv4 with TCP/UDP/SCTP/ICMP, IPv6 with TCP/UDP/SCTP/ICMPv6 are
  "ok"; any other protocol or an unreadable header is "err"; non-IP
  frames are "other".
"""

from __future__ import annotations

import ipaddress
import random
import struct
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

# --- constants -------------------------------------------------------------

ETH_TYPE_IP = 0x0800
ETH_TYPE_ARP = 0x0806
ETH_TYPE_VLAN = 0x8100
ETH_TYPE_8021AD = 0x88A8
ETH_TYPE_IPV6 = 0x86DD
ETH_TYPE_NONE = 0x05FF  # what an 802.3 length field reads as
ETH_MIN_FRAME = 60  # octets, without the FCS

IPPROTO_HOPOPTS = 0
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ROUTING = 43
IPPROTO_FRAGMENT = 44
IPPROTO_GRE = 47
IPPROTO_AH = 51
IPPROTO_ICMPV6 = 58
IPPROTO_DSTOPTS = 60
IPPROTO_SCTP = 132

TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH = 0x01, 0x02, 0x04, 0x08
TCP_ACK, TCP_URG, TCP_ECE, TCP_CWR, TCP_NS = 0x10, 0x20, 0x40, 0x80, 0x100

BFD_PORTS = (3784, 3785)  # UDP destination ports the exporter skips

SRC_MAC = "02:00:00:00:00:01"
DST_MAC = "02:00:00:00:00:02"

_IPV6_EXT = (IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPPROTO_FRAGMENT,
             IPPROTO_DSTOPTS, IPPROTO_AH)
# Whole-header lengths below which L4 fields read as 0.
_L4_HEADER_LEN = {IPPROTO_TCP: 20, IPPROTO_UDP: 8, IPPROTO_SCTP: 12}
_ICMP_HEADER_LEN = 8
_ICMPV6_HEADER_LEN = 8  # OVS reads struct icmp6_hdr, 8 octets


# --- checksums -------------------------------------------------------------

def inet_checksum(data: bytes) -> int:
    """RFC 1071 Internet checksum of ``data``."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _crc32c_table() -> Tuple[int, ...]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC32c (Castagnoli), the SCTP checksum (RFC 9260 Appendix A)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# --- builders --------------------------------------------------------------

def mac(text: str) -> bytes:
    """"aa:bb:cc:dd:ee:ff" -> 6 octets."""
    raw = bytes.fromhex(text.replace(":", ""))
    if len(raw) != 6:
        raise ValueError("bad MAC address %r" % text)
    return raw


def dot1q(vid: int, pcp: int = 0, tpid: int = ETH_TYPE_VLAN,
          dei: int = 0) -> bytes:
    """One VLAN tag (TPID, TCI): 802.1Q by default, 0x88a8 for 802.1ad."""
    return struct.pack("!HH", tpid, (pcp & 7) << 13 | (dei & 1) << 12
                       | (vid & 0xFFF))


def ethernet(payload: bytes, *, src: str = SRC_MAC, dst: str = DST_MAC,
             ethertype: Optional[int] = ETH_TYPE_IP,
             tags: Sequence[bytes] = (), pad: bool = True) -> bytes:
    """An Ethernet frame (no FCS).

    ``tags`` are ``dot1q()`` tags, outermost first.  ``ethertype=None``
    makes an 802.3 frame whose type field is the payload length.
    ``pad`` pads with zeros to the 60-octet minimum.
    """
    if ethertype is None:
        ethertype = len(payload)
    frame = (mac(dst) + mac(src) + b"".join(tags)
             + struct.pack("!H", ethertype) + payload)
    if pad and len(frame) < ETH_MIN_FRAME:
        frame += bytes(ETH_MIN_FRAME - len(frame))
    return frame


def _pseudo_checksum_fill(proto: int, segment: bytes, pseudo: bytes) -> bytes:
    """``segment`` with its TCP/UDP/ICMPv6 checksum computed over
    ``pseudo`` (the pseudo-header), if it holds the checksum field."""
    where = {IPPROTO_TCP: 16, IPPROTO_UDP: 6, IPPROTO_ICMPV6: 2}.get(proto)
    if where is None or len(segment) < where + 2:
        return segment
    seg = bytearray(segment)
    seg[where:where + 2] = b"\0\0"
    csum = inet_checksum(pseudo + bytes(seg))
    if proto == IPPROTO_UDP and csum == 0:
        csum = 0xFFFF  # RFC 768: a computed 0 is sent as all ones
    seg[where:where + 2] = struct.pack("!H", csum)
    return bytes(seg)


def ipv4(payload: bytes, *, src: str = "192.0.2.1", dst: str = "192.0.2.2",
         proto: int = IPPROTO_UDP, ttl: int = 64, tos: int = 0,
         ident: int = 1, df: bool = False, mf: bool = False,
         frag_offset: int = 0, options: bytes = b"",
         l4_checksum: bool = True) -> bytes:
    """An IPv4 packet with a correct header checksum.

    ``frag_offset`` is in 8-octet units.  ``options`` is padded with
    zeros (end of options) to a multiple of 4 octets.  When
    ``l4_checksum`` and the packet is not a fragment, a whole TCP/UDP
    segment in ``payload`` gets its checksum filled in.
    """
    if len(options) % 4:
        options += bytes(4 - len(options) % 4)
    ihl = 5 + len(options) // 4
    if ihl > 15:
        raise ValueError("IPv4 options too long")
    saddr = ipaddress.IPv4Address(src).packed
    daddr = ipaddress.IPv4Address(dst).packed
    if l4_checksum and not mf and frag_offset == 0:
        pseudo = saddr + daddr + struct.pack("!BBH", 0, proto, len(payload))
        payload = _pseudo_checksum_fill(proto, payload, pseudo)
    flags = (0x4000 if df else 0) | (0x2000 if mf else 0) | frag_offset
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, tos,
                         ihl * 4 + len(payload), ident, flags, ttl, proto,
                         0, saddr, daddr) + options
    csum = inet_checksum(header)
    return header[:10] + struct.pack("!H", csum) + header[12:] + payload


def hop_by_hop(options: bytes = b"") -> Tuple[int, bytes]:
    """Hop-by-hop options extension header body (PadN-padded)."""
    return IPPROTO_HOPOPTS, _padded_options(options)


def dest_opts(options: bytes = b"") -> Tuple[int, bytes]:
    """Destination options extension header body (PadN-padded)."""
    return IPPROTO_DSTOPTS, _padded_options(options)


def _padded_options(options: bytes) -> bytes:
    # The body follows the 2-octet (next header, length) prefix; the whole
    # header must be a multiple of 8 octets.  Pad1 for one octet, else PadN.
    pad = (8 - (2 + len(options)) % 8) % 8
    if pad == 1:
        return options + b"\x00"
    if pad:
        return options + bytes((1, pad - 2)) + bytes(pad - 2)
    return options


def routing(segments: Sequence[str] = ("2001:db8::99",),
            segments_left: int = 0) -> Tuple[int, bytes]:
    """A Segment Routing Header (routing type 4, RFC 8754)."""
    body = struct.pack("!BBBBH", 4, segments_left, len(segments) - 1, 0, 0)
    body += b"".join(ipaddress.IPv6Address(s).packed for s in segments)
    return IPPROTO_ROUTING, body


def fragment(offset: int = 0, more: bool = False,
             ident: int = 0x1234) -> Tuple[int, bytes]:
    """Fragment extension header body; ``offset`` in 8-octet units."""
    # The reserved octet after the next header is written by ipv6().
    return IPPROTO_FRAGMENT, struct.pack("!HI", offset << 3 | int(more),
                                         ident)


def auth_header(spi: int = 0x100, seq: int = 1,
                icv: bytes = bytes(12)) -> Tuple[int, bytes]:
    """Authentication header body (RFC 4302); length in 4-octet units."""
    return IPPROTO_AH, struct.pack("!HII", 0, spi, seq) + icv


def ipv6(payload: bytes, *, src: str = "2001:db8::1",
         dst: str = "2001:db8::2", proto: int = IPPROTO_UDP,
         hop_limit: int = 64, tclass: int = 0, flow_label: int = 0,
         ext_headers: Sequence[Tuple[int, bytes]] = (),
         l4_checksum: bool = True) -> bytes:
    """An IPv6 packet.

    ``ext_headers``: ``(type, body)`` pairs from ``hop_by_hop()``,
    ``routing()``, ``dest_opts()``, ``fragment()``, ``auth_header()``, in
    order; ``proto`` is the final next header.  TCP/UDP/ICMPv6 checksums
    are filled in unless a fragment header is present.
    """
    saddr = ipaddress.IPv6Address(src).packed
    daddr = ipaddress.IPv6Address(dst).packed
    fragmented = any(t == IPPROTO_FRAGMENT for t, _ in ext_headers)
    if l4_checksum and not fragmented:
        pseudo = saddr + daddr + struct.pack("!I3xB", len(payload), proto)
        payload = _pseudo_checksum_fill(proto, payload, pseudo)
    chain = b""
    types = [t for t, _ in ext_headers]
    nexts = types[1:] + [proto]
    for (kind, body), nxt in zip(ext_headers, nexts):
        whole = bytes((nxt, 0)) + body
        if kind == IPPROTO_AH:
            length = len(whole) // 4 - 2
        elif kind == IPPROTO_FRAGMENT:
            length = 0  # reserved octet
        else:
            if len(whole) % 8:
                raise ValueError("extension header not a multiple of 8")
            length = len(whole) // 8 - 1
        chain += bytes((nxt, length)) + body
    first = types[0] if types else proto
    word = 6 << 28 | (tclass & 0xFF) << 20 | (flow_label & 0xFFFFF)
    header = struct.pack("!IHBB16s16s", word, len(chain) + len(payload),
                         first, hop_limit, saddr, daddr)
    return header + chain + payload


def tcp(sport: int, dport: int, *, flags: int = TCP_PSH | TCP_ACK,
        seq: int = 1, ack: int = 1, window: int = 65535,
        payload: bytes = b"") -> bytes:
    """A TCP segment (20-octet header); ``flags`` up to 0x1ff (NS)."""
    ctl = 5 << 12 | (flags & 0x1FF)
    return struct.pack("!HHIIHHHH", sport, dport, seq,
                       ack if flags & TCP_ACK else 0, ctl, window, 0,
                       0) + payload


def udp(sport: int, dport: int, payload: bytes = b"") -> bytes:
    """A UDP datagram (checksum filled in by ipv4()/ipv6())."""
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def sctp(sport: int, dport: int, payload: bytes = b"x",
         vtag: int = 0x01020304) -> bytes:
    """An SCTP packet with one DATA chunk carrying ``payload``; CRC32c."""
    chunk = struct.pack("!BBHIHHI", 0, 0x03, 16 + len(payload), 1, 0, 0,
                        0) + payload
    chunk += bytes(-len(chunk) % 4)
    packet = struct.pack("!HHII", sport, dport, vtag, 0) + chunk
    return packet[:8] + struct.pack("<I", crc32c(packet)) + packet[12:]


def icmp(icmp_type: int, code: int = 0, rest: bytes = b"\0\x01\0\x01",
         payload: bytes = b"") -> bytes:
    """An ICMP (IPv4) message with its checksum; ``rest`` is the second
    word of the header (identifier and sequence for echo)."""
    msg = struct.pack("!BBH", icmp_type, code, 0) + rest + payload
    return msg[:2] + struct.pack("!H", inet_checksum(msg)) + msg[4:]


def icmpv6(icmp_type: int, code: int = 0, rest: bytes = b"\0\x01\0\x01",
           payload: bytes = b"") -> bytes:
    """An ICMPv6 message (checksum filled in by ipv6())."""
    return struct.pack("!BBH", icmp_type, code, 0) + rest + payload


def gre(payload: bytes, proto: int = ETH_TYPE_IP) -> bytes:
    """A plain GRE header (RFC 2784, no options) and its payload."""
    return struct.pack("!HH", 0, proto) + payload


def vxlan(inner: bytes, vni: int, flags: int = 0x08) -> bytes:
    """A VXLAN header (RFC 7348: I flag, 24-bit VNI) and its inner
    Ethernet frame: the payload of a UDP datagram to port 4789."""
    return struct.pack("!B3sI", flags, b"\0\0\0", vni << 8) + inner


def geneve(inner: bytes, vni: int, options: bytes = b"",
           proto: int = 0x6558) -> bytes:
    """A Geneve header (RFC 8926) with ``options`` (a multiple of 4
    bytes) and its inner frame: the payload of a UDP datagram to 6081."""
    assert len(options) % 4 == 0
    return struct.pack("!BBHI", len(options) // 4, 0, proto,
                       vni << 8) + options + inner


def gre_teb(inner: bytes, key: Optional[int] = None,
            checksum: bool = False, seq: Optional[int] = None) -> bytes:
    """A GRE header (RFC 2784/2890) carrying Ethernet (0x6558), with
    the checksum, key and sequence fields asked for."""
    flags = (0x80 if checksum else 0) | (0x20 if key is not None else 0) \
        | (0x10 if seq is not None else 0)
    out = struct.pack("!BBH", flags, 0, 0x6558)
    if checksum:
        out += b"\0\0\0\0"
    if key is not None:
        out += struct.pack("!I", key)
    if seq is not None:
        out += struct.pack("!I", seq)
    return out + inner


def arp(op: int = 1, *, sha: str = SRC_MAC, spa: str = "192.0.2.1",
        tha: str = "00:00:00:00:00:00", tpa: str = "192.0.2.2") -> bytes:
    """An Ethernet/IPv4 ARP packet (ethertype 0x0806)."""
    return (struct.pack("!HHBBH", 1, ETH_TYPE_IP, 6, 4, op) + mac(sha)
            + ipaddress.IPv4Address(spa).packed + mac(tha)
            + ipaddress.IPv4Address(tpa).packed)


def llc(payload: Optional[bytes] = None, dsap: int = 0x42,
        ssap: int = 0x42, control: int = 0x03) -> bytes:
    """An 802.2 LLC header and payload, for ``ethernet(ethertype=None)``.

    The default payload is an STP configuration BPDU (DSAP/SSAP 0x42).
    """
    if payload is None:
        bridge = struct.pack("!H", 0x8000) + mac(SRC_MAC)
        payload = (struct.pack("!HBBB", 0, 0, 0, 0) + bridge
                   + struct.pack("!I", 0) + bridge
                   + struct.pack("!HHHHH", 0x8001, 0, 20 * 256, 2 * 256,
                                 15 * 256))
    return bytes((dsap, ssap, control)) + payload


def build_frame(*, ip_version: int = 4, proto: int = IPPROTO_UDP,
                src_ip: Optional[str] = None, dst_ip: Optional[str] = None,
                sport: int = 1000, dport: int = 2000,
                icmp_type: int = 8, icmp_code: int = 0,
                tcp_flags: int = TCP_PSH | TCP_ACK, ttl: int = 64,
                tos: int = 0, flow_label: int = 0,
                vlan: Optional[int] = None, pcp: int = 0,
                src_mac: str = SRC_MAC, dst_mac: str = DST_MAC,
                payload_len: int = 0,
                frame_len: Optional[int] = None) -> bytes:
    """One Ethernet[/802.1Q]/IPv4|IPv6/L4 frame in a call.

    ``proto`` picks the L4 (TCP, UDP, SCTP, ICMP or ICMPv6 by version;
    any other number carries ``payload_len`` zero octets).
    ``frame_len`` (octets, without FCS) sets the payload so the frame has
    exactly that length; it must fit the headers.
    """
    tags = [dot1q(vlan, pcp)] if vlan is not None else []
    if frame_len is not None:
        head = _unpadded_len(ip_version, proto, bool(tags))
        if frame_len < head:
            raise ValueError("frame_len %d below the %d header octets"
                             % (frame_len, head))
        payload_len = frame_len - head
    body = bytes(payload_len)
    if proto == IPPROTO_TCP:
        l4 = tcp(sport, dport, flags=tcp_flags, payload=body)
    elif proto == IPPROTO_UDP:
        l4 = udp(sport, dport, body)
    elif proto == IPPROTO_SCTP:
        l4 = sctp(sport, dport, body)
    elif proto == IPPROTO_ICMP and ip_version == 4:
        l4 = icmp(icmp_type, icmp_code, payload=body)
    elif proto == IPPROTO_ICMPV6 and ip_version == 6:
        l4 = icmpv6(icmp_type, icmp_code, payload=body)
    else:
        l4 = body
    if ip_version == 4:
        packet = ipv4(l4, src=src_ip or "192.0.2.1",
                      dst=dst_ip or "192.0.2.2", proto=proto, ttl=ttl,
                      tos=tos)
        etype = ETH_TYPE_IP
    else:
        packet = ipv6(l4, src=src_ip or "2001:db8::1",
                      dst=dst_ip or "2001:db8::2", proto=proto,
                      hop_limit=ttl, tclass=tos, flow_label=flow_label)
        etype = ETH_TYPE_IPV6
    frame = ethernet(packet, src=src_mac, dst=dst_mac, ethertype=etype,
                     tags=tags)
    if frame_len is not None and len(frame) != frame_len:
        # Padding to 60 octets, or SCTP chunk padding to 4 octets.
        raise ValueError("no frame of exactly %d octets: got %d"
                         % (frame_len, len(frame)))
    return frame


def _unpadded_len(ip_version: int, proto: int, tagged: bool) -> int:
    l4 = {IPPROTO_TCP: 20, IPPROTO_UDP: 8, IPPROTO_SCTP: 28,
          IPPROTO_ICMP: 8, IPPROTO_ICMPV6: 8}.get(proto, 0)
    if proto == IPPROTO_ICMP and ip_version != 4:
        l4 = 0
    if proto == IPPROTO_ICMPV6 and ip_version != 6:
        l4 = 0
    return 14 + (4 if tagged else 0) + (20 if ip_version == 4 else 40) + l4


# --- ground truth ----------------------------------------------------------

@dataclass(frozen=True)
class FlowId:
    """A flow's identity as a decoder (tshark, nfdump) reports it back.

    MACs as "aa:bb:cc:dd:ee:ff", addresses in ipaddress's compressed
    form.  None where the field does not apply: vlan without a tag, IP
    fields for non-IP frames, ports unless TCP/UDP/SCTP, ICMP type/code
    unless ICMP (IPv4) / ICMPv6 (IPv6).
    """

    src_mac: str
    dst_mac: str
    ethertype: int
    vlan: Optional[int]
    ip_version: Optional[int]
    src_ip: Optional[str]
    dst_ip: Optional[str]
    proto: Optional[int]
    src_port: Optional[int]
    dst_port: Optional[int]
    icmp_type: Optional[int]
    icmp_code: Optional[int]


@dataclass
class FlowTruth:
    """What the exporter must report for one flow at sampling 1.

    Octet counts in octets.  ``ip_octets``/``min_ip_len``/``max_ip_len``/
    ``sumsq`` use the IP length (frame minus Ethernet header) and are 0
    for non-IP flows.  ``tcp_flags``: OR of the 12 flag bits.  ``kind``:
    "ipv4" | "ipv6" | "other"; ``status``: "ok" | "err" | "other" (the
    exporter's ipv4/ipv6 ok and error counters).  The remaining fields are
    the rest of the flow key: ``eth_header_len`` (14, 18 or 22),
    ``vlan_pcp`` (None untagged), ``ttl`` (IPv6 hop limit), ``tos`` (IPv4
    TOS / IPv6 traffic class) and ``flow_label`` (IPv6 only); None for
    non-IP.
    """

    packets: int
    l2_octets: int
    ip_octets: int
    min_ip_len: int
    max_ip_len: int
    sumsq: int
    tcp_flags: int
    kind: str
    status: str
    eth_header_len: int
    vlan_pcp: Optional[int]
    ttl: Optional[int]
    tos: Optional[int]
    flow_label: Optional[int]

    @property
    def dscp(self) -> Optional[int]:
        return None if self.tos is None else self.tos >> 2

    @property
    def precedence(self) -> Optional[int]:
        return None if self.tos is None else self.tos >> 5


@dataclass(frozen=True)
class _Frame:
    """One frame, parsed: its flow, key attributes and counters."""

    flow: FlowId
    attrs: Tuple  # eth_header_len, vlan_pcp, ttl, tos, flow_label
    kind: str
    status: str
    l2_len: int
    ip_len: int
    tcp_flags: int
    cut: bool = False  # IP header unreadable or L4 header cut short


def _mac_text(raw: bytes) -> str:
    return ":".join("%02x" % b for b in raw)


def _l4_fields(f: bytes, off: int, end: int, proto: int, later: bool,
               icmp_proto: int):
    """(src_port, dst_port, icmp_type, icmp_code, tcp_flags, known, cut)."""
    avail = end - off
    if proto in _L4_HEADER_LEN:
        if later:
            return 0, 0, None, None, 0, True, False
        if avail < _L4_HEADER_LEN[proto]:
            return 0, 0, None, None, 0, True, True
        sport, dport = struct.unpack_from("!HH", f, off)
        flags = 0
        if proto == IPPROTO_TCP:
            flags = struct.unpack_from("!H", f, off + 12)[0] & 0x0FFF
        return sport, dport, None, None, flags, True, False
    if proto == icmp_proto:
        need = (_ICMP_HEADER_LEN if proto == IPPROTO_ICMP
                else _ICMPV6_HEADER_LEN)
        if later:
            return None, None, 0, 0, 0, True, False
        if avail < need:
            return None, None, 0, 0, 0, True, True
        return None, None, f[off], f[off + 1], 0, True, False
    return None, None, None, None, 0, False, False


def _parse(frame: bytes) -> _Frame:
    f = bytes(frame)
    n = len(f)
    if n < 14:
        raise ValueError("frame of %d octets has no Ethernet header" % n)
    dst, src = _mac_text(f[0:6]), _mac_text(f[6:12])
    etype = struct.unpack_from("!H", f, 12)[0]
    off = 14
    vlan = pcp = None
    if etype in (ETH_TYPE_VLAN, ETH_TYPE_8021AD) and n >= 18:
        tci, etype = struct.unpack_from("!HH", f, 14)
        vlan, pcp = tci & 0x0FFF, tci >> 13
        off = 18
        if etype == ETH_TYPE_VLAN and n >= 22:
            etype = struct.unpack_from("!H", f, 20)[0]
            off = 22
    if etype < 0x0600:
        etype = ETH_TYPE_NONE

    def flow(ip_version=None, sip=None, dip=None, proto=None, sport=None,
             dport=None, itype=None, icode=None):
        return FlowId(src, dst, etype, vlan, ip_version, sip, dip, proto,
                      sport, dport, itype, icode)

    if etype not in (ETH_TYPE_IP, ETH_TYPE_IPV6):
        return _Frame(flow(), (off, pcp, None, None, None), "other",
                      "other", n, 0, 0)

    ip = off
    ip_len = n - off
    if etype == ETH_TYPE_IP:
        ihl = (f[ip] & 0x0F) * 4 if n > ip else 0
        if n - ip < 20 or f[ip] >> 4 != 4 or ihl < 20 or n - ip < ihl:
            return _Frame(flow(4, "0.0.0.0", "0.0.0.0", 0),
                          (off, pcp, 0, 0, None), "ipv4", "err", n, ip_len,
                          0, True)
        tos, total = f[ip + 1], struct.unpack_from("!H", f, ip + 2)[0]
        frag, ttl, proto = struct.unpack_from("!HBB", f, ip + 6)
        sip = str(ipaddress.IPv4Address(f[ip + 12:ip + 16]))
        dip = str(ipaddress.IPv4Address(f[ip + 16:ip + 20]))
        later = (frag & 0x1FFF) != 0
        end = min(n, ip + total)  # never read L4 from Ethernet padding
        sport, dport, itype, icode, flags, known, cut = _l4_fields(
            f, ip + ihl, end, proto, later, IPPROTO_ICMP)
        return _Frame(flow(4, sip, dip, proto, sport, dport, itype, icode),
                      (off, pcp, ttl, tos, None), "ipv4",
                      "ok" if known else "err", n, ip_len, flags, cut)

    if n - ip < 40 or f[ip] >> 4 != 6:
        return _Frame(flow(6, "::", "::", 0), (off, pcp, 0, 0, 0), "ipv6",
                      "err", n, ip_len, 0, True)
    word, plen, nh, hlim = struct.unpack_from("!IHBB", f, ip)
    tclass, label = (word >> 20) & 0xFF, word & 0xFFFFF
    sip = str(ipaddress.IPv6Address(f[ip + 8:ip + 24]))
    dip = str(ipaddress.IPv6Address(f[ip + 24:ip + 40]))
    end = min(n, ip + 40 + plen)
    l4 = ip + 40
    later = False
    whole = True
    while nh in _IPV6_EXT:
        if end - l4 < 8:
            whole = False
            break
        if nh == IPPROTO_FRAGMENT:
            later = (struct.unpack_from("!H", f, l4 + 2)[0] >> 3) != 0
            nh, l4 = f[l4], l4 + 8
            if later:
                break
        elif nh == IPPROTO_AH:
            nh, l4 = f[l4], l4 + (f[l4 + 1] + 2) * 4
        else:
            nh, l4 = f[l4], l4 + (f[l4 + 1] + 1) * 8
    if whole:
        sport, dport, itype, icode, flags, known, cut = _l4_fields(
            f, l4, end, nh, later, IPPROTO_ICMPV6)
    else:
        sport = dport = itype = icode = None
        flags, known, cut = 0, False, True
    return _Frame(flow(6, sip, dip, nh, sport, dport, itype, icode),
                  (off, pcp, hlim, tclass, label), "ipv6",
                  "ok" if known else "err", n, ip_len, flags, cut)


def flow_id_of(frame: bytes) -> FlowId:
    """The FlowId of one frame (see the module docstring for the rules)."""
    return _parse(frame).flow


def is_cut(frame: bytes) -> bool:
    """Whether ``frame`` is cut short on purpose: its IP header is
    unreadable or its L4 header incomplete (decoders flag these as
    malformed)."""
    return _parse(frame).cut


def is_bfd(frame: bytes) -> bool:
    """Whether the exporter skips ``frame`` in bridge sampling (UDP to a
    BFD port, RFC 5881/5883)."""
    flow = _parse(frame).flow
    return flow.proto == IPPROTO_UDP and flow.dst_port in BFD_PORTS


def truth_of(frames: Iterable[bytes],
             skip_bfd: bool = False) -> Dict[FlowId, FlowTruth]:
    """Aggregate ``frames`` into flows, each frame counting once.

    ``skip_bfd`` leaves out what bridge sampling skips (``is_bfd()``).
    Raises ValueError if two frames share a FlowId but differ in another
    flow-key field (TTL, TOS, flow label, PCP, Ethernet header length):
    the exporter would report them as two flows, which a FlowId cannot
    tell apart.
    """
    flows: Dict[FlowId, FlowTruth] = {}
    for frame in frames:
        p = _parse(frame)
        if skip_bfd and p.flow.proto == IPPROTO_UDP \
                and p.flow.dst_port in BFD_PORTS:
            continue
        is_ip = p.kind != "other"
        ip_len = p.ip_len if is_ip else 0
        t = flows.get(p.flow)
        if t is None:
            ehl, pcp, ttl, tos, label = p.attrs
            flows[p.flow] = FlowTruth(1, p.l2_len, ip_len, ip_len, ip_len,
                                      ip_len * ip_len, p.tcp_flags, p.kind,
                                      p.status, ehl, pcp, ttl, tos, label)
            continue
        attrs = (t.eth_header_len, t.vlan_pcp, t.ttl, t.tos, t.flow_label)
        if attrs != p.attrs:
            raise ValueError(
                "frames of %s differ in (eth_header_len, pcp, ttl, tos, "
                "flow_label): %s vs %s" % (p.flow, attrs, p.attrs))
        t.packets += 1
        t.l2_octets += p.l2_len
        t.ip_octets += ip_len
        t.min_ip_len = min(t.min_ip_len, ip_len)
        t.max_ip_len = max(t.max_ip_len, ip_len)
        t.sumsq += ip_len * ip_len
        t.tcp_flags |= p.tcp_flags
    return flows


# --- the traffic mix -------------------------------------------------------

def _host4(rng: random.Random) -> str:
    net = rng.choice(("192.0.2.", "198.51.100.", "203.0.113."))
    return net + str(rng.randrange(1, 255))


def _host6(rng: random.Random) -> str:
    return "2001:db8:%x::%x" % (rng.randrange(1, 0xFFFF),
                                rng.randrange(1, 0xFFFF))


def _mac(rng: random.Random) -> str:
    return "02:" + ":".join("%02x" % rng.randrange(256) for _ in range(5))


def _port(rng: random.Random) -> int:
    # From the dynamic range (RFC 6335): decoders attach no protocol to
    # these ports, so random payloads are not mistaken for one, and the
    # BFD ports never occur.
    return rng.randrange(49152, 65536)


_TCP_FLAG_CHOICES = (TCP_SYN, TCP_SYN | TCP_ACK, TCP_ACK, TCP_PSH | TCP_ACK,
                     TCP_FIN | TCP_ACK, TCP_RST, TCP_RST | TCP_ACK,
                     TCP_URG | TCP_ACK, TCP_ECE | TCP_ACK,
                     TCP_CWR | TCP_ACK, TCP_NS | TCP_ACK)


class _Mix:
    """Builds the flows of traffic_mix(); each flow is a list of frames."""

    def __init__(self, rng: random.Random, packets_per_flow):
        self.rng = rng
        self.lo, self.hi = packets_per_flow
        self.flows: List[List[bytes]] = []

    def count(self) -> int:
        return self.rng.randint(self.lo, self.hi)

    def payload(self, most: int = 1400) -> bytes:
        # Varied lengths, small ones often so minimum-size frames occur.
        # Zeros: no decoder heuristic (RTP, RTCP, STUN...) claims them.
        return bytes(self.rng.choice((0, 0, 1, 6, 18, 64, 200, 512, 1000,
                                      most)))

    def l4(self, proto: int, sport: int, dport: int,
           icmp_kind: Tuple[int, int]) -> bytes:
        rng = self.rng
        if proto == IPPROTO_TCP:
            flags = rng.choice(_TCP_FLAG_CHOICES)
            data = b"" if flags & TCP_RST else self.payload()
            return tcp(sport, dport, flags=flags, seq=rng.randrange(1 << 32),
                       payload=data)
        if proto == IPPROTO_UDP:
            return udp(sport, dport, self.payload())
        if proto == IPPROTO_SCTP:
            return sctp(sport, dport, self.payload(1200) or b"x")
        itype, icode = icmp_kind
        rest = struct.pack("!HH", sport, rng.randrange(65536))
        if proto == IPPROTO_ICMP:
            if itype == 3:  # unreachable: quote an IPv4/UDP header
                quoted = ipv4(udp(dport, sport, bytes(4)), proto=IPPROTO_UDP)
                return icmp(itype, icode, bytes(4), quoted[:28])
            return icmp(itype, icode, rest, self.payload(1000))
        if itype == 1:  # ICMPv6 unreachable: quote an IPv6/UDP packet
            quoted = ipv6(udp(dport, sport, bytes(4)), proto=IPPROTO_UDP)
            return icmpv6(itype, icode, bytes(4), quoted)
        return icmpv6(itype, icode, rest, self.payload(1000))

    def ip_flow(self, version: int, proto: int, tags_of=None,
                ext_headers=(), options: bytes = b"") -> None:
        """One flow: fixed addresses, ports, TTL, TOS, label, tags."""
        rng = self.rng
        src_mac, dst_mac = _mac(rng), _mac(rng)
        sport, dport = _port(rng), _port(rng)
        ttl = rng.choice((1, 32, 63, 64, 128, 255))
        tos = rng.randrange(64) << 2 | rng.randrange(4)  # DSCP and ECN
        label = rng.randrange(1 << 20)
        icmp_kind = rng.choice(
            ((8, 0), (0, 0), (3, 3)) if version == 4
            else ((128, 0), (129, 0), (1, 4)))
        tags = tags_of() if tags_of else []
        frames = []
        if version == 4:
            src, dst = _host4(rng), _host4(rng)
            for _ in range(self.count()):
                packet = ipv4(self.l4(proto, sport, dport, icmp_kind),
                              src=src, dst=dst, proto=proto, ttl=ttl,
                              tos=tos, ident=rng.randrange(65536),
                              df=rng.random() < 0.5, options=options)
                frames.append(ethernet(packet, src=src_mac, dst=dst_mac,
                                       ethertype=ETH_TYPE_IP, tags=tags))
        else:
            src, dst = _host6(rng), _host6(rng)
            for _ in range(self.count()):
                packet = ipv6(self.l4(proto, sport, dport, icmp_kind),
                              src=src, dst=dst, proto=proto, hop_limit=ttl,
                              tclass=tos, flow_label=label,
                              ext_headers=ext_headers)
                frames.append(ethernet(packet, src=src_mac, dst=dst_mac,
                                       ethertype=ETH_TYPE_IPV6, tags=tags))
        self.flows.append(frames)

    def vlan_tags(self) -> List[bytes]:
        return [dot1q(self.rng.randrange(1, 4095), self.rng.randrange(8))]

    def qinq_tags(self) -> List[bytes]:
        return [dot1q(self.rng.randrange(1, 4095), self.rng.randrange(8),
                      tpid=ETH_TYPE_8021AD),
                dot1q(self.rng.randrange(1, 4095), self.rng.randrange(8))]

    def single(self, frames: Sequence[bytes]) -> None:
        self.flows.append(list(frames))


def traffic_mix(seed: int = 1, flows_per_kind: int = 3,
                packets_per_flow: Tuple[int, int] = (1, 6),
                ) -> Tuple[List[bytes], Dict[FlowId, FlowTruth]]:
    """Frames covering every case the exporter handles, and their truth.

    Deterministic for a given ``seed``.  ``flows_per_kind`` flows of each
    kind, each with ``packets_per_flow`` (lo, hi) packets (inclusive),
    interleaved in a random order.  Kinds: IPv4 and IPv6 x TCP (varied
    flags incl. ECE/CWR/NS), UDP, SCTP, ICMP/ICMPv6 (echo and
    unreachable) with varied lengths, DSCP/ECN and TTL; 802.1Q with
    priority; 802.1ad + 802.1Q; ARP; 802.3/LLC (STP BPDU); IPv4 with
    options; IPv4 fragments (first and non-first); IPv6 with hop-by-hop,
    destination options, routing and fragment headers (first and
    non-first) and with an authentication header; GRE over IPv4 and IPv6
    (errors, as OVS counts them); frames cut inside the L4 header
    (counted OK, L4 fields 0), inside the IP header, or with IHL < 5
    (errors, IP fields 0); minimum-size frames padded to 60 octets.  No
    UDP traffic to the BFD ports.
    """
    rng = random.Random(seed)
    mix = _Mix(rng, packets_per_flow)
    for _ in range(flows_per_kind):
        for version in (4, 6):
            icmp_proto = IPPROTO_ICMP if version == 4 else IPPROTO_ICMPV6
            for proto in (IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP,
                          icmp_proto):
                mix.ip_flow(version, proto)
        mix.ip_flow(4, IPPROTO_UDP, tags_of=mix.vlan_tags)
        mix.ip_flow(6, IPPROTO_TCP, tags_of=mix.vlan_tags)
        mix.ip_flow(4, IPPROTO_TCP, tags_of=mix.qinq_tags)
        mix.ip_flow(6, IPPROTO_UDP, tags_of=mix.qinq_tags)
        # IPv4 options: Router Alert (RFC 2113), then record route space.
        mix.ip_flow(4, IPPROTO_UDP, options=b"\x94\x04\x00\x00")
        mix.ip_flow(4, IPPROTO_TCP,
                    options=b"\x01\x07\x07\x04" + bytes(4) + b"\x00")
        # IPv6 extension header chains ending in L4.
        mix.ip_flow(6, IPPROTO_UDP, ext_headers=(
            hop_by_hop(b"\x05\x02\x00\x00"), dest_opts(), routing()))
        mix.ip_flow(6, IPPROTO_TCP, ext_headers=(auth_header(),))
        mix.ip_flow(6, IPPROTO_ICMPV6, ext_headers=(hop_by_hop(),))
        mix.single(_arp_frames(rng))
        mix.single(_llc_frames(rng))
        mix.single(_ipv4_fragments(rng))
        mix.single(_ipv6_fragments(rng))
        mix.single(_gre_frames(rng, 4))
        mix.single(_gre_frames(rng, 6))
        mix.single(_minimum_frames(rng))
        mix.single(_truncated_frames(rng))
    frames = [frame for flow in mix.flows for frame in flow]
    rng.shuffle(frames)
    return frames, truth_of(frames)


def _arp_frames(rng: random.Random) -> List[bytes]:
    spa, tpa = _host4(rng), _host4(rng)
    # MACs follow from the addresses, so that no two ARP flows bind one
    # address to two MACs (decoders warn of a duplicate address).
    a, b = ("02:00:" + _mac_text(ipaddress.IPv4Address(ip).packed)
            for ip in (spa, tpa))
    return [ethernet(arp(1, sha=a, spa=spa, tpa=tpa), src=a,
                     dst="ff:ff:ff:ff:ff:ff", ethertype=ETH_TYPE_ARP),
            ethernet(arp(2, sha=b, spa=tpa, tha=a, tpa=spa), src=b, dst=a,
                     ethertype=ETH_TYPE_ARP)]


def _llc_frames(rng: random.Random) -> List[bytes]:
    src = _mac(rng)
    return [ethernet(llc(), src=src, dst="01:80:c2:00:00:00",
                     ethertype=None)] * rng.randint(1, 3)


def _ipv4_fragments(rng: random.Random) -> List[bytes]:
    """A UDP datagram in two fragments (offset 0 with MF, then the rest),
    and a lone later fragment of a TCP segment."""
    src, dst, smac, dmac = _host4(rng), _host4(rng), _mac(rng), _mac(rng)
    whole = ipv4(udp(_port(rng), _port(rng), bytes(range(256)) * 4),
                 src=src, dst=dst)
    datagram = whole[20:]  # UDP header and data, checksum filled in
    ident = rng.randrange(65536)
    first = ipv4(datagram[:512], src=src, dst=dst, ident=ident, mf=True,
                 l4_checksum=False)
    rest = ipv4(datagram[512:], src=src, dst=dst, ident=ident,
                frag_offset=512 // 8, l4_checksum=False)
    later_tcp = ipv4(bytes(300), src=src, dst=dst, proto=IPPROTO_TCP,
                     ident=ident + 1, frag_offset=185, l4_checksum=False)
    return [ethernet(p, src=smac, dst=dmac) for p in (first, rest,
                                                      later_tcp)]


def _ipv6_fragments(rng: random.Random) -> List[bytes]:
    """A UDP datagram behind hop-by-hop, destination options, routing and
    fragment headers, in two fragments."""
    src, dst, smac, dmac = _host6(rng), _host6(rng), _mac(rng), _mac(rng)
    whole = ipv6(udp(_port(rng), _port(rng), bytes(range(256)) * 3),
                 src=src, dst=dst)
    datagram = whole[40:]
    ident = rng.randrange(1 << 32)
    chain = (hop_by_hop(), dest_opts(b"\x1e\x02\x00\x00"), routing())
    first = ipv6(datagram[:400], src=src, dst=dst, ext_headers=chain
                 + (fragment(0, True, ident),))
    rest = ipv6(datagram[400:], src=src, dst=dst, ext_headers=chain
                + (fragment(400 // 8, False, ident),))
    return [ethernet(p, src=smac, dst=dmac, ethertype=ETH_TYPE_IPV6)
            for p in (first, rest)]


def _gre_frames(rng: random.Random, version: int) -> List[bytes]:
    inner = ipv4(udp(_port(rng), _port(rng), bytes(32)), src=_host4(rng),
                 dst=_host4(rng))
    smac, dmac = _mac(rng), _mac(rng)
    if version == 4:
        src, dst = _host4(rng), _host4(rng)
        return [ethernet(ipv4(gre(inner), src=src, dst=dst,
                              proto=IPPROTO_GRE), src=smac, dst=dmac)] * 2
    src, dst = _host6(rng), _host6(rng)
    return [ethernet(ipv6(gre(inner), src=src, dst=dst, proto=IPPROTO_GRE),
                     src=smac, dst=dmac, ethertype=ETH_TYPE_IPV6)]


def _minimum_frames(rng: random.Random) -> List[bytes]:
    """Frames with no payload, padded from 42/54/62 to 60+ octets."""
    smac, dmac = _mac(rng), _mac(rng)
    src, dst = _host4(rng), _host4(rng)
    sport, dport = _port(rng), _port(rng)
    return [
        ethernet(ipv4(udp(sport, dport), src=src, dst=dst), src=smac,
                 dst=dmac),
        ethernet(ipv4(tcp(sport, dport, flags=TCP_SYN), src=src, dst=dst,
                      proto=IPPROTO_TCP), src=smac, dst=dmac),
        ethernet(ipv6(udp(sport, dport), src=_host6(rng), dst=_host6(rng)),
                 src=smac, dst=dmac, ethertype=ETH_TYPE_IPV6),
    ]


def _truncated_frames(rng: random.Random) -> List[bytes]:
    """Frames cut short.

    - IPv4 whose total length holds only 10 octets of TCP header, padded
      to 60 (the padding must not be read as TCP): OK, ports 0.
    - IPv4/UDP with 4 octets of UDP header, not padded: OK, ports 0.
    - IPv6 with 6 octets of TCP header (padded): OK, ports 0.
    - ICMP with 7 octets and ICMPv6 with 6 octets of header: OK, type
      and code 0.
    - IPv4 header cut after 12 octets, IPv6 header after 24 (frames
      shorter than the minimum): errors, IP fields 0.
    - IPv4 with IHL 4 (invalid): error, IP fields 0.
    """
    smac, dmac = _mac(rng), _mac(rng)
    src, dst = _host4(rng), _host4(rng)
    sport, dport = _port(rng), _port(rng)
    cut_tcp = ipv4(tcp(sport, dport)[:10], src=src, dst=dst,
                   proto=IPPROTO_TCP)
    cut_udp = ipv4(udp(sport, dport)[:4], src=src, dst=dst)
    cut_tcp6 = ipv6(tcp(sport, dport)[:6], src=_host6(rng), dst=_host6(rng),
                    proto=IPPROTO_TCP)
    whole4 = ipv4(udp(sport, dport, bytes(40)), src=src, dst=dst)
    whole6 = ipv6(udp(sport, dport, bytes(40)), src=_host6(rng),
                  dst=_host6(rng))
    cut_icmp = ipv4(icmp(8)[:7], src=src, dst=dst, proto=IPPROTO_ICMP)
    cut_icmp6 = ipv6(icmpv6(128)[:6], src=_host6(rng), dst=_host6(rng),
                     proto=IPPROTO_ICMPV6)
    bad_ihl = bytearray(whole4)
    bad_ihl[0] = 0x44
    bad_ihl[10:12] = b"\0\0"
    bad_ihl[10:12] = struct.pack("!H", inet_checksum(bytes(bad_ihl[:16])))
    return [
        ethernet(cut_tcp, src=smac, dst=dmac),
        ethernet(cut_udp, src=smac, dst=dmac, pad=False),
        ethernet(cut_tcp6, src=smac, dst=dmac, ethertype=ETH_TYPE_IPV6),
        ethernet(cut_icmp, src=smac, dst=dmac),
        ethernet(cut_icmp6, src=smac, dst=dmac, ethertype=ETH_TYPE_IPV6),
        ethernet(whole4[:12], src=smac, dst=dmac, pad=False),
        ethernet(whole6[:24], src=smac, dst=dmac, ethertype=ETH_TYPE_IPV6,
                 pad=False),
        ethernet(bytes(bad_ihl), src=smac, dst=dmac),
    ]


# --- many flows, fast --------------------------------------------------------

_IP4H = struct.Struct("!BBHHHBBH4s4s")
_IP4_UDP = struct.Struct("!BBHHHBBH4s4sHHHH")
_IP4_TCP = struct.Struct("!BBHHHBBH4s4sHHIIHHHH")
_TCPH = struct.Struct("!HHIIHHHH")
_BENCH_NET = int(ipaddress.IPv4Address("198.18.0.0"))  # RFC 2544 range


def _fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _sum16(data: bytes) -> int:
    return sum(struct.unpack("!%dH" % (len(data) // 2), data))


def many_flows(n_flows: int, n_packets: int, seed: int = 1
               ) -> Iterator[bytes]:
    """``n_packets`` IPv4 frames over ``n_flows`` distinct 5-tuples.

    For benchmarks (about 2 us per frame after about 4 us per flow of
    set-up): flows alternate UDP and TCP; sources come from
    198.18.0.0/15 (RFC 2544) and source ports above 1023, so 5-tuples
    are distinct; frame lengths vary over 64..1500 octets.  The first
    ``n_flows`` frames visit every flow once in a shuffled order, later
    frames pick flows at random.  Checksums are correct (payloads are
    zeros).  Deterministic per ``seed``.
    """
    if n_flows < 1:
        raise ValueError("n_flows must be >= 1")
    rng = random.Random(seed)
    src_mac = mac(SRC_MAC)
    lengths = [rng.randint(64, 1500) for _ in range(61)] + [64, 1500]
    zeros = bytes(1500)
    eths = [mac("02:00:00:00:01:%02x" % i) + src_mac + b"\x08\x00"
            for i in range(4)]
    flows = []
    for k in range(n_flows):
        proto = IPPROTO_UDP if k % 2 == 0 else IPPROTO_TCP
        src = (_BENCH_NET + k % 131072).to_bytes(4, "big")
        dst = bytes((198, 19, rng.randrange(256), rng.randrange(1, 255)))
        sport = 1024 + (k // 131072) % 64512
        dport = rng.choice((80, 443, 5001, 8080, 9000, 12345))
        ttl, tos = rng.choice((64, 128, 255)), rng.randrange(64) << 2
        flags = rng.choice((TCP_ACK, TCP_PSH | TCP_ACK, TCP_SYN))
        eth = eths[k % 4]
        # Checksum sums without the length-dependent words.
        ip_partial = _sum16(_IP4H.pack(0x45, tos, 0, 0, 0x4000, ttl, proto,
                                       0, src, dst))
        pseudo = _sum16(src + dst) + proto
        if proto == IPPROTO_TCP:
            l4_partial = pseudo + _sum16(_TCPH.pack(
                sport, dport, 1, 1, 5 << 12 | flags, 65535, 0, 0))
        else:
            l4_partial = pseudo + sport + dport
        flows.append((eth, tos, ttl, proto, src, dst, sport, dport,
                      5 << 12 | flags, ip_partial, l4_partial))
    order = list(range(n_flows))
    rng.shuffle(order)
    n_lengths = len(lengths)
    pick = rng.random
    udp_pack, tcp_pack = _IP4_UDP.pack, _IP4_TCP.pack
    for i in range(n_packets):
        k = order[i] if i < n_flows else int(pick() * n_flows)
        (eth, tos, ttl, proto, src, dst, sport, dport, ctl, ip_partial,
         l4_partial) = flows[k]
        ip_len = lengths[(i + k) % n_lengths] - 14
        ip_csum = _fold(ip_partial + ip_len)
        l4_len = ip_len - 20
        if proto == IPPROTO_TCP:
            # The TCP length counts once, in the pseudo-header.
            csum = _fold(l4_partial + l4_len)
            yield eth + tcp_pack(0x45, tos, ip_len, 0, 0x4000, ttl, proto,
                                 ip_csum, src, dst, sport, dport, 1, 1, ctl,
                                 65535, csum, 0) + zeros[:l4_len - 20]
        else:
            # The UDP length counts twice: pseudo-header and UDP header.
            csum = _fold(l4_partial + 2 * l4_len) or 0xFFFF
            yield eth + udp_pack(0x45, tos, ip_len, 0, 0x4000, ttl, proto,
                                 ip_csum, src, dst, sport, dport, l4_len,
                                 csum) + zeros[:l4_len - 8]
