"""Underlay frames -> inner frames and their tunnel metadata.

``ovs-ipfix-replay --tunnel-port=N`` replays a capture taken on the
underlay as a tunnel port would receive it: each VXLAN (UDP 4789),
Geneve (UDP 6081) or GRE (IP protocol 47, key or no key, payload type
0x6558: transparent Ethernet bridging) packet over IPv4 or IPv6 is
decapsulated, and its inner Ethernet frame goes to the exporter as
received on OpenFlow port N with tunnel metadata (upcall.Tunnel: outer
source and destination address, outer UDP ports, key or VNI, tunnel
type as OVS numbers it).  Any other frame goes as it is, without tunnel
metadata.  As the kernel's tunnel ports, the decoder takes only what it
can read whole: a truncated or fragmented outer packet, a VXLAN header
without its VNI flag, a Geneve or GRE payload that is no Ethernet, or a
GRE header of another version is "any other frame".

:func:`decapsulate` is the pure part; :func:`replay` the loop the replay
tool runs instead of its own when ``--tunnel-port`` is given.
"""

from __future__ import annotations

import random
import struct
import time
from typing import Iterable, NamedTuple, Optional, Tuple

from ovs_ipfix_py import upcall

VXLAN_PORT = 4789
GENEVE_PORT = 6081
IPPROTO_UDP = 17
IPPROTO_GRE = 47
ETH_TYPE_IP = 0x0800
ETH_TYPE_IPV6 = 0x86DD
ETH_TYPE_TEB = 0x6558          # transparent Ethernet bridging
_VLAN_TYPES = (0x8100, 0x88A8)
#: IPv6 extension headers walked to reach UDP or GRE: hop-by-hop,
#: routing, destination options (a fragment header stops the walk).
_IPV6_EXT = (0, 43, 60)

#: OVS's tunnelType numbers (upcall.TUNNEL_TYPES).
TUN_VXLAN, TUN_GRE, TUN_GENEVE = 1, 2, 7

_UDP = struct.Struct("!HHHH")


class Decapsulated(NamedTuple):
    """An inner Ethernet frame and the tunnel it came out of."""

    frame: bytes
    tunnel: upcall.Tunnel


def decapsulate(frame: bytes) -> Optional[Decapsulated]:
    """The inner frame and tunnel metadata of a VXLAN, Geneve or GRE
    (Ethernet payload) packet in Ethernet ``frame``; None for any other
    frame.  Never raises."""
    n = len(frame)
    if n < 14:
        return None
    etype = frame[12] << 8 | frame[13]
    off = 14
    for _ in range(2):
        if etype in _VLAN_TYPES and n >= off + 4:
            etype = frame[off + 2] << 8 | frame[off + 3]
            off += 4
    if etype == ETH_TYPE_IP:
        outer = _ipv4(frame, off, n)
    elif etype == ETH_TYPE_IPV6:
        outer = _ipv6(frame, off, n)
    else:
        return None
    if outer is None:
        return None
    src, dst, proto, l4, end = outer
    if proto == IPPROTO_UDP:
        return _udp(frame, l4, end, src, dst)
    if proto == IPPROTO_GRE:
        return _gre(frame, l4, end, src, dst)
    return None


def _ipv4(f: bytes, ip: int, n: int):
    if n < ip + 20 or f[ip] >> 4 != 4:
        return None
    ihl = (f[ip] & 0x0F) * 4
    total = f[ip + 2] << 8 | f[ip + 3]
    if ihl < 20 or total < ihl or ip + total > n:
        return None
    if (f[ip + 6] & 0x3F) or f[ip + 7]:
        return None             # a fragment: no tunnel port takes it whole
    return f[ip + 12:ip + 16], f[ip + 16:ip + 20], f[ip + 9], ip + ihl, \
        ip + total


def _ipv6(f: bytes, ip: int, n: int):
    if n < ip + 40 or f[ip] >> 4 != 6:
        return None
    end = ip + 40 + (f[ip + 4] << 8 | f[ip + 5])
    if end > n:
        return None
    nh = f[ip + 6]
    off = ip + 40
    while nh in _IPV6_EXT:
        if end < off + 8:
            return None
        nh, off = f[off], off + (f[off + 1] + 1) * 8
    if off > end:
        return None
    return f[ip + 8:ip + 24], f[ip + 24:ip + 40], nh, off, end


def _udp(f: bytes, off: int, end: int, src: bytes, dst: bytes):
    if end < off + 16:
        return None
    sport, dport, length, _ = _UDP.unpack_from(f, off)
    if length < 16 or off + length > end:
        return None
    end = off + length
    h = off + 8
    if dport == VXLAN_PORT:
        # RFC 7348: flags (I bit 0x08 = VNI valid), 24 reserved bits,
        # VNI, 8 reserved bits.
        if not f[h] & 0x08:
            return None
        vni = int.from_bytes(f[h + 4:h + 7], "big")
        inner, ttype = h + 8, TUN_VXLAN
    elif dport == GENEVE_PORT:
        # RFC 8926: version (2 bits) and option length (6 bits, 4-byte
        # words), flags, protocol type, VNI, reserved, options.
        if f[h] >> 6 != 0 or (f[h + 2] << 8 | f[h + 3]) != ETH_TYPE_TEB:
            return None
        vni = int.from_bytes(f[h + 4:h + 7], "big")
        inner, ttype = h + 8 + (f[h] & 0x3F) * 4, TUN_GENEVE
    else:
        return None
    if end < inner + 14:
        return None
    return Decapsulated(bytes(f[inner:end]),
                        upcall.Tunnel(bytes(src), bytes(dst), sport, dport,
                                      vni, ttype))


def _gre(f: bytes, off: int, end: int, src: bytes, dst: bytes):
    # RFC 2784/2890: C (0x80), K (0x20), S (0x10) flags, version 0,
    # protocol type; then checksum+reserved, key, sequence as flagged.
    if end < off + 4:
        return None
    flags = f[off]
    if f[off + 1] & 0x07 or flags & 0x4F:
        return None             # another version, routing or strict route
    if (f[off + 2] << 8 | f[off + 3]) != ETH_TYPE_TEB:
        return None
    h = off + 4
    if flags & 0x80:
        h += 4
    key = 0
    if flags & 0x20:
        if end < h + 4:
            return None
        key = int.from_bytes(f[h:h + 4], "big")
        h += 4
    if flags & 0x10:
        h += 4
    if end < h + 14:
        return None
    return Decapsulated(bytes(f[h:end]),
                        upcall.Tunnel(bytes(src), bytes(dst), 0, 0, key,
                                      TUN_GRE))


def samples(frames: Iterable[Tuple], template, tunnel_port: int):
    """(upcall, orig_len) per frame: ``template`` (a BridgeSample or
    FlowSample) received on ``tunnel_port``, carrying the inner frame and
    its tunnel metadata, or the frame as it is without tunnel metadata.
    The inner frame's original length is the outer one less the outer
    headers."""
    template = template._replace(input_port=tunnel_port)
    for _ts, frame, orig_len in frames:
        d = decapsulate(frame)
        if d is None:
            yield template._replace(frame=frame, orig_len=orig_len,
                                    tunnel=None)
        else:
            inner = d.frame
            yield template._replace(
                frame=inner, tunnel=d.tunnel,
                orig_len=orig_len - (len(frame) - len(inner)))


def replay(frames: Iterable, sock, template, tunnel_port: int,
           pick: float = 1.0, seed: int = 0, rate: Optional[float] = None,
           max_datagram: int = 65000):
    """replay.replay for ``--tunnel-port``: the same picking, pacing and
    summary, with upcalls built per frame (each may carry its own
    tunnel).  Raises PcapError from the file, OSError from the socket,
    ValueError on a frame the channel cannot carry."""
    from ovs_ipfix_py.replay import Summary, _max_frame, pace
    t0 = time.monotonic()
    batcher = upcall.Batcher(max_datagram)
    limit = _max_frame(template, max_datagram) - 64  # room for a tunnel
    rnd = random.Random(seed).random
    interval = 1.0 / rate if rate else 0.0
    packets = n_samples = datagrams = 0
    for u in samples(frames, template, tunnel_port):
        packets += 1
        if interval:
            datagrams += pace(t0 + (packets - 1) * interval, batcher.flush,
                              sock.send)
        if pick < 1.0 and rnd() >= pick:
            continue
        if len(u.frame) > limit:
            u = u._replace(frame=u.frame[:limit])
        d = batcher.add(u)
        n_samples += 1
        if d is not None:
            sock.send(d)
            datagrams += 1
    d = batcher.flush()
    if d is not None:
        sock.send(d)
        datagrams += 1
    return Summary(packets, n_samples, datagrams, time.monotonic() - t0)
