"""Write received UDP payloads as a classic libpcap file (Ethernet link).

Each payload becomes one Ethernet/IPv4 (or IPv6)/UDP frame from a fixed
source to the collector's port, with correct IP and UDP checksums, so
that tshark decodes the capture with ``-d udp.port==PORT,cflow`` exactly
as if it had been captured on the wire.

File format: the libpcap global header (magic 0xa1b2c3d4, version 2.4,
snaplen 262144, link type 1 = Ethernet) then one record per frame
(seconds, microseconds, captured length, original length).
"""

import socket
import struct

PCAP_MAGIC = 0xA1B2C3D4
LINKTYPE_ETHERNET = 1
SNAPLEN = 262144

#: Source port written into every frame (an arbitrary fixed value).
SOURCE_PORT = 40000

_GLOBAL_HEADER = struct.Struct("<IHHiIII")
_RECORD_HEADER = struct.Struct("<IIII")
_ETHERNET = struct.Struct("!6s6sH")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")
_UDP = struct.Struct("!HHHH")

_SRC_MAC = bytes.fromhex("020000000001")
_DST_MAC = bytes.fromhex("020000000002")
_ADDRESSES = {
    socket.AF_INET: ("127.0.0.2", "127.0.0.1"),
    socket.AF_INET6: ("::2", "::1"),
}


def _checksum(data):
    """RFC 1071 Internet checksum of ``data`` (bytes)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_frame(payload, dst_port, family=socket.AF_INET,
              src_port=SOURCE_PORT):
    """One Ethernet frame carrying ``payload`` in UDP to ``dst_port``."""
    src_text, dst_text = _ADDRESSES[family]
    src = socket.inet_pton(family, src_text)
    dst = socket.inet_pton(family, dst_text)
    udp_len = _UDP.size + len(payload)
    if udp_len + _IPV4.size > 0xFFFF:
        raise ValueError(f"{len(payload)} bytes do not fit one UDP frame")
    if family == socket.AF_INET:
        pseudo = src + dst + struct.pack("!BBH", 0, socket.IPPROTO_UDP,
                                         udp_len)
    else:
        pseudo = src + dst + struct.pack("!IxxxB", udp_len,
                                         socket.IPPROTO_UDP)
    udp = _UDP.pack(src_port, dst_port, udp_len, 0) + payload
    csum = _checksum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", csum) + udp[8:]
    if family == socket.AF_INET:
        ip = _IPV4.pack(0x45, 0, _IPV4.size + udp_len, 0, 0x4000, 64,
                        socket.IPPROTO_UDP, 0, src, dst)
        ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
        ethertype = 0x0800
    else:
        ip = _IPV6.pack(6 << 28, udp_len, socket.IPPROTO_UDP, 64, src, dst)
        ethertype = 0x86DD
    return _ETHERNET.pack(_DST_MAC, _SRC_MAC, ethertype) + ip + udp


def write_pcap(path, datagrams, dst_port, family=socket.AF_INET):
    """Write ``datagrams`` [(arrival time in s, payload bytes)] to ``path``.

    Frames go from a fixed source address/port to the loopback address of
    ``family`` at ``dst_port``.
    """
    with open(path, "wb") as f:
        f.write(_GLOBAL_HEADER.pack(PCAP_MAGIC, 2, 4, 0, 0, SNAPLEN,
                                    LINKTYPE_ETHERNET))
        for arrival, payload in datagrams:
            frame = udp_frame(payload, dst_port, family)
            sec = int(arrival)
            usec = min(int((arrival - sec) * 1e6), 999999)
            f.write(_RECORD_HEADER.pack(sec, usec, len(frame), len(frame)))
            f.write(frame)


_TCP = struct.Struct("!HHIIBBHHH")
_SYN, _FIN, _ACK, _PSH = 0x02, 0x01, 0x10, 0x08
#: Payload bytes per TCP segment written: messages longer than this are
#: cut across segments, so tshark has to reassemble them.
TCP_SEGMENT = 1000


def tcp_frame(payload, src_port, dst_port, seq, ack, flags,
              family=socket.AF_INET, reverse=False):
    """One Ethernet frame carrying a TCP segment (no options) from the
    fixed source to ``dst_port`` (``reverse``: the other way)."""
    src_text, dst_text = _ADDRESSES[family]
    if reverse:
        src_text, dst_text = dst_text, src_text
    src = socket.inet_pton(family, src_text)
    dst = socket.inet_pton(family, dst_text)
    tcp_len = _TCP.size + len(payload)
    if family == socket.AF_INET:
        pseudo = src + dst + struct.pack("!BBH", 0, socket.IPPROTO_TCP,
                                         tcp_len)
    else:
        pseudo = src + dst + struct.pack("!IxxxB", tcp_len,
                                         socket.IPPROTO_TCP)
    seg = _TCP.pack(src_port, dst_port, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                    5 << 4, flags, 65535, 0, 0) + payload
    csum = _checksum(pseudo + seg)
    seg = seg[:16] + struct.pack("!H", csum) + seg[18:]
    if family == socket.AF_INET:
        ip = _IPV4.pack(0x45, 0, _IPV4.size + tcp_len, 0, 0x4000, 64,
                        socket.IPPROTO_TCP, 0, src, dst)
        ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
        ethertype = 0x0800
    else:
        ip = _IPV6.pack(6 << 28, tcp_len, socket.IPPROTO_TCP, 64, src, dst)
        ethertype = 0x86DD
    macs = (_SRC_MAC, _DST_MAC) if reverse else (_DST_MAC, _SRC_MAC)
    return _ETHERNET.pack(*macs, ethertype) + ip + seg


def write_tcp_pcap(path, streams, dst_port, family=socket.AF_INET):
    """Write TCP connections to ``dst_port`` as a capture: ``streams`` is
    a list of connections, each a list of (arrival time in s, bytes) in
    the order received.  Each connection gets its own source port, a
    three-way handshake, its bytes in segments of at most TCP_SEGMENT
    bytes (each acknowledged) and a FIN exchange."""
    with open(path, "wb") as f:
        f.write(_GLOBAL_HEADER.pack(PCAP_MAGIC, 2, 4, 0, 0, SNAPLEN,
                                    LINKTYPE_ETHERNET))

        def put(when, frame):
            sec = int(when)
            usec = min(int((when - sec) * 1e6), 999999)
            f.write(_RECORD_HEADER.pack(sec, usec, len(frame), len(frame)))
            f.write(frame)

        for n, chunks in enumerate(streams):
            sport = SOURCE_PORT + n
            when = chunks[0][0] if chunks else 0.0
            cseq, sseq = 1000, 5000
            put(when, tcp_frame(b"", sport, dst_port, cseq, 0, _SYN,
                                family))
            put(when, tcp_frame(b"", dst_port, sport, sseq, cseq + 1,
                                _SYN | _ACK, family, reverse=True))
            cseq += 1
            sseq += 1
            put(when, tcp_frame(b"", sport, dst_port, cseq, sseq, _ACK,
                                family))
            for when, data in chunks:
                for i in range(0, len(data), TCP_SEGMENT):
                    piece = data[i:i + TCP_SEGMENT]
                    put(when, tcp_frame(piece, sport, dst_port, cseq, sseq,
                                        _ACK | _PSH, family))
                    cseq += len(piece)
                    put(when, tcp_frame(b"", dst_port, sport, sseq, cseq,
                                        _ACK, family, reverse=True))
            put(when, tcp_frame(b"", sport, dst_port, cseq, sseq,
                                _FIN | _ACK, family))
            put(when, tcp_frame(b"", dst_port, sport, sseq, cseq + 1,
                                _FIN | _ACK, family, reverse=True))
            put(when, tcp_frame(b"", sport, dst_port, cseq + 1, sseq + 1,
                                _ACK, family))
