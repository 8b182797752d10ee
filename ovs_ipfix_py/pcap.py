"""Ethernet frames from capture files: classic pcap and pcapng.

Reading: classic pcap in either byte order with microsecond or nanosecond
timestamps; pcapng (Section Header, Interface Description, Enhanced,
Simple and the obsolete Packet blocks; other blocks skipped) in either byte
order, several sections, per-interface ``if_tsresol``/``if_tsoffset``.
Writing: classic pcap, little endian, microseconds.

Only Ethernet (LINKTYPE_ETHERNET, 1) frames are returned: the exporter's
flow keys start at the Ethernet header.  Any problem with a file raises
:class:`PcapError` with a one-line message naming the file.

Layouts (all fields in the file's byte order)::

    pcap:    header  magic:u32 major:u16 minor:u16 thiszone:i32
                     sigfigs:u32 snaplen:u32 linktype:u32        (24 bytes)
             record  ts_sec:u32 ts_frac:u32 incl_len:u32 orig_len:u32
                     data[incl_len]                              (16 + n)
    pcapng:  block   type:u32 total_length:u32 body total_length:u32,
                     total_length a multiple of 4
             SHB     0x0A0D0D0A: bom:u32 (0x1A2B3C4D) major:u16 minor:u16
                     section_length:i64 options
             IDB     1: linktype:u16 reserved:u16 snaplen:u32 options
             EPB     6: iface:u32 ts_high:u32 ts_low:u32 caplen:u32
                     origlen:u32 data[caplen] pad options
             SPB     3: origlen:u32 data[...] pad (interface 0, no time)
             PB      2: iface:u16 drops:u16 ts_high:u32 ts_low:u32
                     caplen:u32 origlen:u32 data pad options
"""

from __future__ import annotations

import mmap
import struct
from typing import Iterable, Iterator, List, Optional, Tuple

LINKTYPE_ETHERNET = 1

#: Names for the link types people most often feed in by mistake.
LINKTYPE_NAMES = {
    0: "BSD loopback",
    1: "Ethernet",
    12: "raw IP",
    101: "raw IP",
    105: "IEEE 802.11",
    113: "Linux cooked (SLL)",
    127: "802.11 radiotap",
    228: "raw IPv4",
    229: "raw IPv6",
    276: "Linux cooked v2 (SLL2)",
}

#: Largest record accepted; bigger means a corrupt length field.
MAX_RECORD = 16 << 20

_PCAP_MAGICS = {
    b"\xd4\xc3\xb2\xa1": ("<", 1e-6),
    b"\xa1\xb2\xc3\xd4": (">", 1e-6),
    b"\x4d\x3c\xb2\xa1": ("<", 1e-9),
    b"\xa1\xb2\x3c\x4d": (">", 1e-9),
}
_SHB = 0x0A0D0D0A
_BOM = 0x1A2B3C4D
_IDB, _PB, _SPB, _EPB = 1, 2, 3, 6
_OPT_IF_TSRESOL = 9
_OPT_IF_TSOFFSET = 14

Frame = Tuple[float, bytes, int]


class PcapError(Exception):
    """A capture file that cannot be read (one-line message)."""


def _linktype_name(linktype: int) -> str:
    name = LINKTYPE_NAMES.get(linktype)
    return f"{linktype} ({name})" if name else str(linktype)


def _not_ethernet(path: str, linktype: int, where: str = "") -> PcapError:
    return PcapError(f"{path}: {where}link type {_linktype_name(linktype)}"
                     " is not Ethernet (1); only Ethernet captures can be "
                     "replayed")


def _load(path: str):
    """The file's bytes: an mmap when possible (big captures), else a
    bytes object (pipes, empty files)."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise PcapError(f"{path}: cannot open: {e.strerror}") from None
    with f:
        try:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (ValueError, OSError):
            pass
        try:
            return f.read()
        except OSError as e:
            raise PcapError(f"{path}: cannot read: {e.strerror}") from None


def classic_pcap(path: str) -> Optional[Tuple[object, bool]]:
    """``(buffer, little_endian)`` of a classic pcap capture of Ethernet
    frames, for a reader that walks its records itself from byte 24 (the
    replay's C loop), then hands over to :func:`read_frames_from`; None
    for any other file (read it with :func:`read_frames`, which says
    what is wrong with it)."""
    try:
        buf = _load(path)
    except PcapError:
        return None
    head = bytes(buf[:4])
    if head not in _PCAP_MAGICS or len(buf) < 24:
        return None
    endian, _ = _PCAP_MAGICS[head]
    if struct.unpack_from(endian + "I", buf, 20)[0] & 0xFFFF \
            != LINKTYPE_ETHERNET:
        return None
    return buf, endian == "<"


def read_frames_from(path: str, buf, offset: int, count: int
                     ) -> Iterator[Frame]:
    """:func:`read_frames` of a classic pcap capture (``buf`` from
    :func:`classic_pcap`) from the record at byte ``offset``, after
    ``count`` packets (for the messages)."""
    endian, scale = _PCAP_MAGICS[bytes(buf[:4])]
    return _read_pcap(path, buf, endian, scale, offset, count)


def read_frames(path: str) -> Iterator[Frame]:
    """Yield ``(timestamp_s, frame, orig_len)`` for each packet of the
    capture at ``path``, in file order.  ``timestamp_s``: seconds since
    the epoch (float); ``orig_len``: the packet's length on the wire in
    bytes, never less than ``len(frame)``.  The file type is checked
    before this returns; record errors raise :class:`PcapError` while
    iterating.  (pcapng Simple Packet Blocks carry no time: they get the
    previous packet's timestamp, or 0.0.)"""
    buf = _load(path)
    head = bytes(buf[:4])
    if head in _PCAP_MAGICS:
        endian, scale = _PCAP_MAGICS[head]
        if len(buf) < 24:
            raise PcapError(f"{path}: truncated pcap header "
                            f"({len(buf)} of 24 bytes)")
        linktype = struct.unpack_from(endian + "I", buf, 20)[0] & 0xFFFF
        if linktype != LINKTYPE_ETHERNET:
            raise _not_ethernet(path, linktype)
        return _read_pcap(path, buf, endian, scale)
    if head == b"\x0a\x0d\x0d\x0a":
        if len(buf) < 28:
            raise PcapError(f"{path}: truncated pcapng section header")
        return _read_pcapng(path, buf)
    if not head:
        raise PcapError(f"{path}: empty file, not a pcap or pcapng capture")
    if head[:2] == b"\x1f\x8b":
        raise PcapError(f"{path}: gzip-compressed; decompress it first")
    raise PcapError(f"{path}: not a pcap or pcapng capture (starts with "
                    f"{head.hex()})")


def _read_pcap(path, buf, endian: str, scale: float, off: int = 24,
               count: int = 0) -> Iterator[Frame]:
    unpack = struct.Struct(endian + "IIII").unpack_from
    size = len(buf)
    while off + 16 <= size:
        sec, frac, incl, orig = unpack(buf, off)
        start = off + 16
        off = start + incl
        if off > size or incl > MAX_RECORD:
            raise PcapError(f"{path}: packet {count + 1} at byte "
                            f"{start - 16}: {incl} bytes captured, "
                            f"{size - start} left in the file (truncated "
                            "or corrupt)")
        count += 1
        yield (sec + frac * scale, buf[start:off],
               orig if orig > incl else incl)
    if off != size:
        raise PcapError(f"{path}: truncated record header after packet "
                        f"{count} ({size - off} of 16 bytes)")


class _Interface:
    __slots__ = ("linktype", "snaplen", "divisor", "offset")

    def __init__(self, linktype, snaplen, divisor, offset):
        self.linktype = linktype
        self.snaplen = snaplen
        self.divisor = divisor
        self.offset = offset


def _parse_idb(path, buf, off, blen, e) -> _Interface:
    if blen < 20:
        raise PcapError(f"{path}: interface block at byte {off} too short")
    linktype, _, snaplen = struct.unpack_from(e + "HHI", buf, off + 8)
    divisor = 10 ** 6
    offset = 0
    opt = off + 16
    end = off + blen - 4
    while opt + 4 <= end:
        code, olen = struct.unpack_from(e + "HH", buf, opt)
        if code == 0:
            break
        value = opt + 4
        if value + olen > end:
            raise PcapError(f"{path}: interface block at byte {off}: "
                            "option overruns the block")
        if code == _OPT_IF_TSRESOL and olen >= 1:
            r = buf[value]
            divisor = 2 ** (r & 0x7F) if r & 0x80 else 10 ** r
        elif code == _OPT_IF_TSOFFSET and olen >= 8:
            offset = struct.unpack_from(e + "q", buf, value)[0]
        opt = value + ((olen + 3) & ~3)
    return _Interface(linktype, snaplen, divisor, offset)


def _read_pcapng(path, buf) -> Iterator[Frame]:
    size = len(buf)
    off = 0
    count = 0
    e = "<"
    interfaces: List[_Interface] = []
    last_ts = 0.0
    # The file starts with a section header (read_frames checked), whose
    # type reads the same in both byte orders: it sets the real ones.
    hdr = struct.Struct("<II").unpack_from
    u32 = epb = None
    while off < size:
        if size - off < 12:
            raise PcapError(f"{path}: truncated block header at byte {off}")
        btype, blen = hdr(buf, off)
        if btype == _SHB:
            # A new section: byte order and interfaces start afresh.
            bom = bytes(buf[off + 8:off + 12])
            if bom == b"\x4d\x3c\x2b\x1a":
                e = "<"
            elif bom == b"\x1a\x2b\x3c\x4d":
                e = ">"
            else:
                raise PcapError(f"{path}: section header at byte {off} has "
                                f"no valid byte-order magic ({bom.hex()})")
            hdr = struct.Struct(e + "II").unpack_from
            u32 = struct.Struct(e + "I").unpack_from
            epb = struct.Struct(e + "IIIII").unpack_from
            major = struct.unpack_from(e + "H", buf, off + 12)[0]
            if major != 1:
                raise PcapError(f"{path}: pcapng major version {major} "
                                "is not supported (1 is)")
            interfaces = []
            blen = hdr(buf, off)[1]
        if blen < 12 or blen & 3 or off + blen > size:
            raise PcapError(f"{path}: block of type {btype} at byte {off} "
                            f"has a bad length {blen} (truncated or "
                            "corrupt)")
        if btype == _EPB or btype == _PB:
            if blen < 32:
                raise PcapError(f"{path}: packet block at byte {off} too "
                                "short")
            if btype == _EPB:
                iface, tsh, tsl, caplen, origlen = epb(buf, off + 8)
            else:
                iface, tsh, tsl, caplen, origlen = struct.unpack_from(
                    e + "HxxIIII", buf, off + 8)
            start = off + 28
            if start + caplen > off + blen - 4:
                raise PcapError(f"{path}: packet {count + 1} at byte {off}:"
                                f" {caplen} bytes captured overrun the "
                                "block")
            if iface >= len(interfaces):
                raise PcapError(f"{path}: packet {count + 1} names "
                                f"interface {iface}, not described")
            i = interfaces[iface]
            if i.linktype != LINKTYPE_ETHERNET:
                raise _not_ethernet(path, i.linktype,
                                    f"interface {iface}: ")
            last_ts = ((tsh << 32 | tsl) / i.divisor) + i.offset
            count += 1
            yield (last_ts, buf[start:start + caplen],
                   origlen if origlen > caplen else caplen)
        elif btype == _SPB:
            if not interfaces:
                raise PcapError(f"{path}: simple packet block at byte "
                                f"{off} before any interface")
            i = interfaces[0]
            if i.linktype != LINKTYPE_ETHERNET:
                raise _not_ethernet(path, i.linktype, "interface 0: ")
            origlen = u32(buf, off + 8)[0]
            caplen = min(origlen, blen - 16)
            if i.snaplen:
                caplen = min(caplen, i.snaplen)
            count += 1
            yield last_ts, buf[off + 12:off + 12 + caplen], origlen
        elif btype == _IDB:
            interfaces.append(_parse_idb(path, buf, off, blen, e))
        trailer = u32(buf, off + blen - 4)[0]
        if trailer != blen:
            raise PcapError(f"{path}: block at byte {off}: trailing length "
                            f"{trailer} differs from {blen} (corrupt)")
        off += blen


def write_pcap(path: str, frames_with_ts: Iterable,
               linktype: int = LINKTYPE_ETHERNET,
               snaplen: int = 262144) -> int:
    """Write a classic pcap file (little endian, microseconds).  Items
    are ``(timestamp_s, frame)`` or ``(timestamp_s, frame, orig_len)``
    (orig_len in bytes, at least ``len(frame)``).  Returns the number of
    packets written.  Raises ValueError on a bad item, OSError on I/O."""
    rec = struct.Struct("<IIII").pack
    n = 0
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, snaplen,
                            linktype))
        chunk = []
        for item in frames_with_ts:
            if len(item) == 3:
                ts, frame, orig_len = item
            else:
                ts, frame = item
                orig_len = len(frame)
            frame = bytes(frame)
            if orig_len < len(frame):
                raise ValueError(f"packet {n + 1}: orig_len {orig_len} is "
                                 f"less than the frame's {len(frame)} "
                                 "bytes")
            if ts < 0:
                raise ValueError(f"packet {n + 1}: negative timestamp {ts}")
            usec = round(ts * 1e6)
            chunk.append(rec(usec // 1000000, usec % 1000000, len(frame),
                             orig_len))
            chunk.append(frame)
            n += 1
            if len(chunk) >= 8192:
                f.write(b"".join(chunk))
                chunk = []
        f.write(b"".join(chunk))
    return n
