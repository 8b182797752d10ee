"""Upcalls: sampled packets on the userspace channel, and their wire format.

An upcall is one sampled packet handed from the datapath side to the
exporter: a bridge sample (``Bridge.ipfix``, 32-bit probability) or a flow
sample (the OpenFlow ``sample`` action, 16-bit probability).  This module
turns upcalls into datagrams and back.  The format is specified in
``schemas/channel.md`` (version 1); ``tests/test_channel.py`` checks that
document against the tables below.  The layout, network byte order,
everything aligned to 4 bytes::

    datagram  := header upcall{count}
    header    := magic:u32 (0x4F495058, "OIPX") | version:u8 (1)
                 | flags:u8 (0) | count:u16 | length:u32 (whole datagram)
    upcall    := length:u32 (header + attributes + padding, multiple of 4)
                 | kind:u16 (1 bridge sample, 2 flow sample)
                 | reserved:u16 (0) | attribute*
    attribute := len:u16 (header + value, padding excluded) | type:u16
                 | value | zero padding to a multiple of 4

Attributes are TLVs in the netlink manner (``struct nlattr``): a decoder
skips types it does not know, the last of duplicated types wins, and a
``nested`` value is itself a run of attributes (the tunnel).

Decoding is the exporter's hot path.  Encoders put FRAME (and ORIG_LEN)
first, so the attributes after them repeat byte for byte from one upcall
to the next of the same source; the decoder caches those bytes -> the
decoded fields, and a typical upcall costs two ``unpack_from``, two
slices and a dict lookup (about 1 M upcalls/s in CPython 3.11).  Other
layouts take the generic path: precompiled ``struct.Struct`` objects and
a per-kind attribute table compiled from :data:`ATTRIBUTES`.
:func:`decode` never raises: a bad upcall is counted and skipped (each
upcall is length-prefixed); a bad header or broken framing stops the
datagram, counted.
"""

from __future__ import annotations

import struct
from typing import (
    Iterable,
    Iterator,
    List,
    NamedTuple,
    Optional,
    Tuple,
    Union,
)

from ovs_ipfix_py import fastpath

MAGIC = 0x4F495058  # "OIPX"
VERSION = 1
ALIGNMENT = 4
#: Receivers read datagrams of up to this many bytes; larger ones are
#: truncated by the socket, so :func:`encode` refuses to build them.
MAX_DATAGRAM_SIZE = 262144
#: Frame attribute length is a u16 that includes its 4-byte header.
MAX_FRAME_SIZE = 0xFFFF - 4
MAX_UPCALLS_PER_DATAGRAM = 0xFFFF

KIND_BRIDGE_SAMPLE = 1
KIND_FLOW_SAMPLE = 2

UINT32_MAX = 0xFFFFFFFF
UINT16_MAX = 0xFFFF

#: NX_ACTION_SAMPLE_* directions, as the OpenFlow sample action carries.
DIRECTION_DEFAULT = 0
DIRECTION_INGRESS = 1
DIRECTION_EGRESS = 2

#: OVS's tunnelType values (ofproto-dpif-ipfix.c, enum
#: dpif_ipfix_tunnel_type), carried as they are.
TUNNEL_TYPES = {
    0: "unknown",
    1: "vxlan",
    2: "gre",
    3: "lisp",
    4: "stt",
    5: "ipsec-gre",
    7: "geneve",
}

HEADER_FORMAT = "!IBBHI"  # magic, version, flags, count, length
UPCALL_HEADER_FORMAT = "!IHH"  # length, kind, reserved
ATTR_HEADER_FORMAT = "!HH"  # len, type
HEADER = struct.Struct(HEADER_FORMAT)
UPCALL_HEADER = struct.Struct(UPCALL_HEADER_FORMAT)
ATTR_HEADER = struct.Struct(ATTR_HEADER_FORMAT)

#: Value formats: fixed-size ones map to a struct, the others are raw.
FORMATS = {
    "u8": struct.Struct("!B"),
    "u16": struct.Struct("!H"),
    "u32": struct.Struct("!I"),
    "u64": struct.Struct("!Q"),
    "ipv4": struct.Struct("!4s"),
    "ipv6": struct.Struct("!16s"),
    "string": None,
    "bytes": None,
    "nested": None,
}


class AttrSpec(NamedTuple):
    """One attribute type: number, name, value format, and its presence
    in a bridge and a flow sample ("required", "optional" or "-": not
    part of that kind, skipped as unknown)."""

    type: int
    name: str
    format: str
    bridge: str
    flow: str


class TunnelAttrSpec(NamedTuple):
    """One attribute type of the nested TUNNEL attribute."""

    type: int
    name: str
    format: str
    presence: str


A_BRIDGE = 1
A_INPUT_PORT = 2
A_OUTPUT_PORT = 3
A_PROBABILITY = 4
A_FRAME = 5
A_ORIG_LEN = 6
A_TUNNEL = 7
A_COLLECTOR_SET_ID = 8
A_OBS_DOMAIN_ID = 9
A_OBS_POINT_ID = 10
A_DIRECTION = 11

ATTRIBUTES = (
    AttrSpec(A_BRIDGE, "BRIDGE", "string", "required", "required"),
    AttrSpec(A_INPUT_PORT, "INPUT_PORT", "u32", "required", "required"),
    AttrSpec(A_OUTPUT_PORT, "OUTPUT_PORT", "u32", "optional", "optional"),
    AttrSpec(A_PROBABILITY, "PROBABILITY", "u32", "required", "required"),
    AttrSpec(A_FRAME, "FRAME", "bytes", "required", "required"),
    AttrSpec(A_ORIG_LEN, "ORIG_LEN", "u32", "optional", "optional"),
    AttrSpec(A_TUNNEL, "TUNNEL", "nested", "optional", "optional"),
    AttrSpec(A_COLLECTOR_SET_ID, "COLLECTOR_SET_ID", "u32", "-", "required"),
    AttrSpec(A_OBS_DOMAIN_ID, "OBS_DOMAIN_ID", "u32", "-", "required"),
    AttrSpec(A_OBS_POINT_ID, "OBS_POINT_ID", "u32", "-", "required"),
    AttrSpec(A_DIRECTION, "DIRECTION", "u8", "-", "optional"),
)

T_IPV4_SRC = 1
T_IPV4_DST = 2
T_IPV6_SRC = 3
T_IPV6_DST = 4
T_SRC_PORT = 5
T_DST_PORT = 6
T_TUN_ID = 7
T_TUN_TYPE = 8

TUNNEL_ATTRIBUTES = (
    TunnelAttrSpec(T_IPV4_SRC, "IPV4_SRC", "ipv4", "one family"),
    TunnelAttrSpec(T_IPV4_DST, "IPV4_DST", "ipv4", "one family"),
    TunnelAttrSpec(T_IPV6_SRC, "IPV6_SRC", "ipv6", "one family"),
    TunnelAttrSpec(T_IPV6_DST, "IPV6_DST", "ipv6", "one family"),
    TunnelAttrSpec(T_SRC_PORT, "SRC_PORT", "u16", "optional"),
    TunnelAttrSpec(T_DST_PORT, "DST_PORT", "u16", "optional"),
    TunnelAttrSpec(T_TUN_ID, "TUN_ID", "u64", "optional"),
    TunnelAttrSpec(T_TUN_TYPE, "TUN_TYPE", "u8", "optional"),
)


class Tunnel(NamedTuple):
    """Tunnel metadata of a sample that arrived on (or leaves by) a
    tunnel port.  ``src``/``dst``: outer addresses, packed network order,
    both 4 bytes (IPv4) or both 16 bytes (IPv6); ``src_port``/``dst_port``:
    outer L4 ports; ``tun_id``: tunnel key (VNI, GRE key), u64;
    ``tun_type``: OVS's tunnelType value (see :data:`TUNNEL_TYPES`)."""

    src: bytes
    dst: bytes
    src_port: int = 0
    dst_port: int = 0
    tun_id: int = 0
    tun_type: int = 0

    @property
    def is_ipv6(self) -> bool:
        return len(self.src) == 16


class BridgeSample(NamedTuple):
    """A packet sampled by bridge sampling.  ``probability`` is OVS's
    32-bit value (UINT32_MAX // sampling); ``output_port`` is None for an
    ingress sample; ``orig_len`` (bytes) equals ``len(frame)`` unless the
    frame was truncated."""

    bridge: str
    input_port: int
    output_port: Optional[int]
    probability: int
    frame: bytes
    orig_len: int
    tunnel: Optional[Tunnel] = None


class FlowSample(NamedTuple):
    """A packet sampled by an OpenFlow ``sample`` action.
    ``probability`` is the action's 16-bit value (1..65535, 65535 =
    every packet); ``direction`` is NX_ACTION_SAMPLE_DEFAULT (0),
    _INGRESS (1) or _EGRESS (2)."""

    bridge: str
    collector_set_id: int
    obs_domain_id: int
    obs_point_id: int
    probability: int
    direction: int
    input_port: int
    output_port: Optional[int]
    frame: bytes
    orig_len: int
    tunnel: Optional[Tunnel] = None


#: Either kind of upcall.
Upcall = Union[BridgeSample, FlowSample]


class MalformedUpcall(ValueError):
    """A datagram or an upcall that does not follow the format.

    ``index`` is the upcall's position in its datagram (None when the
    datagram header or the framing is at fault); ``offset`` is the byte
    offset in the datagram where the problem was found."""

    def __init__(self, message: str, index: Optional[int] = None,
                 offset: int = 0):
        if index is None:
            where = "datagram"
        else:
            where = f"upcall {index}"
        super().__init__(f"{where} at offset {offset}: {message}")
        self.index = index
        self.offset = offset


# ---------------------------------------------------------------- decoding

_NAME = {spec.type: spec.name for spec in ATTRIBUTES}

# Decoding slots: one per attribute, in this order.
(_S_BRIDGE, _S_INPUT_PORT, _S_OUTPUT_PORT, _S_PROBABILITY, _S_FRAME,
 _S_ORIG_LEN, _S_TUNNEL, _S_COLLECTOR_SET_ID, _S_OBS_DOMAIN_ID,
 _S_OBS_POINT_ID, _S_DIRECTION) = range(11)
_N_SLOTS = 11
_SLOT = {
    A_BRIDGE: _S_BRIDGE, A_INPUT_PORT: _S_INPUT_PORT,
    A_OUTPUT_PORT: _S_OUTPUT_PORT, A_PROBABILITY: _S_PROBABILITY,
    A_FRAME: _S_FRAME, A_ORIG_LEN: _S_ORIG_LEN, A_TUNNEL: _S_TUNNEL,
    A_COLLECTOR_SET_ID: _S_COLLECTOR_SET_ID,
    A_OBS_DOMAIN_ID: _S_OBS_DOMAIN_ID, A_OBS_POINT_ID: _S_OBS_POINT_ID,
    A_DIRECTION: _S_DIRECTION,
}


def _kind_table(column: str) -> dict:
    """type -> (slot, value struct or None for raw, value size) for the
    attributes of one kind: compiled from ATTRIBUTES."""
    table = {}
    for spec in ATTRIBUTES:
        presence = getattr(spec, column)
        if presence == "-":
            continue
        st = FORMATS[spec.format]
        table[spec.type] = (_SLOT[spec.type], st, st.size + 4 if st else 0)
    return table


def _required(column: str) -> Tuple[Tuple[int, str], ...]:
    return tuple((_SLOT[s.type], s.name) for s in ATTRIBUTES
                 if getattr(s, column) == "required")


_TABLES = {
    KIND_BRIDGE_SAMPLE: _kind_table("bridge"),
    KIND_FLOW_SAMPLE: _kind_table("flow"),
}
_REQUIRED = {
    KIND_BRIDGE_SAMPLE: _required("bridge"),
    KIND_FLOW_SAMPLE: _required("flow"),
}
_TUNNEL_TABLE = {
    s.type: (FORMATS[s.format], FORMATS[s.format].size + 4)
    for s in TUNNEL_ATTRIBUTES
}

# Bridge names repeat in every upcall: decode each raw name once.
_bridge_names: dict = {}
_MAX_CACHED_NAMES = 4096


def _bridge_name(raw: bytes, index: int, offset: int) -> str:
    name = _bridge_names.get(raw)
    if name is None:
        if not raw:
            raise MalformedUpcall("empty BRIDGE", index, offset)
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedUpcall(f"BRIDGE is not UTF-8: {raw!r}",
                                  index, offset) from None
        if "\0" in name:
            raise MalformedUpcall(f"BRIDGE contains NUL: {raw!r}",
                                  index, offset)
        if len(_bridge_names) >= _MAX_CACHED_NAMES:
            _bridge_names.clear()
        _bridge_names[raw] = name
    return name


def _decode_tunnel(d: bytes, index: int, offset: int) -> Tunnel:
    """Parse the value of a TUNNEL attribute (a run of attributes)."""
    v = [None] * 9
    a = 0
    end = len(d)
    attr = ATTR_HEADER.unpack_from
    while a < end:
        if end - a < 4:
            raise MalformedUpcall("TUNNEL: truncated attribute header",
                                  index, offset + a)
        alen, atype = attr(d, a)
        if alen < 4 or a + alen > end:
            raise MalformedUpcall(
                f"TUNNEL: attribute {atype} length {alen} overruns",
                index, offset + a)
        spec = _TUNNEL_TABLE.get(atype)
        if spec is not None:
            st, size = spec
            if alen != size:
                raise MalformedUpcall(
                    f"TUNNEL: attribute {atype} has length {alen}, "
                    f"expected {size}", index, offset + a)
            v[atype] = st.unpack_from(d, a + 4)[0]
        a += (alen + 3) & ~3
    v4 = v[T_IPV4_SRC], v[T_IPV4_DST]
    v6 = v[T_IPV6_SRC], v[T_IPV6_DST]
    if None not in v4 and v6 == (None, None):
        src, dst = v4
    elif None not in v6 and v4 == (None, None):
        src, dst = v6
    else:
        raise MalformedUpcall("TUNNEL needs IPV4_SRC and IPV4_DST, or "
                              "IPV6_SRC and IPV6_DST", index, offset)
    return Tunnel(src, dst, v[T_SRC_PORT] or 0, v[T_DST_PORT] or 0,
                  v[T_TUN_ID] or 0, v[T_TUN_TYPE] or 0)


# Fast path.  Encoders put FRAME first and ORIG_LEN (if any) second, so
# the attributes after them -- the "metadata": bridge, ports, probability,
# ids, tunnel -- are the same bytes from one upcall to the next of the same
# source.  The decoder caches, per kind, metadata bytes -> the decoded
# fields around frame and orig_len, after one full decode and validation.
# Anything else (other orders, duplicates) takes the generic path.
_meta_caches: dict = {KIND_BRIDGE_SAMPLE: {}, KIND_FLOW_SAMPLE: {}}
_MAX_CACHED_META = 4096
_FRAME_AT = {KIND_BRIDGE_SAMPLE: 4, KIND_FLOW_SAMPLE: 8}
_CLASS = {KIND_BRIDGE_SAMPLE: BridgeSample, KIND_FLOW_SAMPLE: FlowSample}
_new = tuple.__new__
_ATTR_U32 = struct.Struct("!HHI")
# An upcall header and its first attribute header, in one unpack.
_UPCALL_FIRST = struct.Struct("!IHHHH")


def _decode_upcall(d: bytes, start: int, end: int, kind: int,
                   index: int):
    """Decode the upcall in d[start:end] (header included), filling the
    metadata cache.  (_decode inlines the cache hit.)"""
    a = start + 8
    if a < end:
        alen, atype = ATTR_HEADER.unpack_from(d, a)
        if atype == A_FRAME and a + alen <= end and alen >= 4:
            frame = d[a + 4:a + alen]
            m = a + ((alen + 3) & ~3)
            orig_len = alen - 4
            if m + 8 <= end:
                olen, otype, value = _ATTR_U32.unpack_from(d, m)
                if otype == A_ORIG_LEN and olen == 8:
                    orig_len = value
                    m += 8
            cache = _meta_caches.get(kind)
            if cache is not None and orig_len >= alen - 4:
                meta = d[m:end]
                hit = cache.get(meta)
                if hit is not None:
                    return _new(hit[0], hit[1] + (frame, orig_len) + hit[2])
                u = _decode_generic(d, start, end, kind, index)
                if _cacheable(meta):
                    if len(cache) >= _MAX_CACHED_META:
                        cache.clear()
                    i = _FRAME_AT[kind]
                    cache[meta] = (_CLASS[kind], u[:i], u[i + 2:])
                return u
    return _decode_generic(d, start, end, kind, index)


def _cacheable(meta: bytes) -> bool:
    """True if the metadata holds no FRAME or ORIG_LEN (which, as the
    last of duplicates, would override the ones in front)."""
    a = 0
    end = len(meta)
    while a + 4 <= end:
        alen, atype = ATTR_HEADER.unpack_from(meta, a)
        if atype == A_FRAME or atype == A_ORIG_LEN or alen < 4:
            return False
        a += (alen + 3) & ~3
    return True


def _decode_generic(d: bytes, start: int, end: int, kind: int,
                    index: int):
    """Decode the upcall in d[start:end] (header included), attributes
    in any order."""
    table = _TABLES.get(kind)
    if table is None:
        raise MalformedUpcall(f"unknown upcall kind {kind}", index, start)
    v = [None] * _N_SLOTS
    get = table.get
    attr = ATTR_HEADER.unpack_from
    a = start + 8
    while a < end:
        # end - a >= 4: upcalls and attributes are 4-aligned.
        alen, atype = attr(d, a)
        if alen < 4 or a + alen > end:
            raise MalformedUpcall(
                f"attribute {atype} length {alen} overruns the upcall "
                f"({end - a} bytes left)", index, a)
        spec = get(atype)
        if spec is not None:
            slot, st, size = spec
            if st is None:
                v[slot] = d[a + 4:a + alen]
            elif alen == size:
                v[slot] = st.unpack_from(d, a + 4)[0]
            else:
                raise MalformedUpcall(
                    f"{_NAME[atype]} has length {alen}, expected {size}",
                    index, a)
        a += (alen + 3) & ~3

    for slot, name in _REQUIRED[kind]:
        if v[slot] is None:
            raise MalformedUpcall(f"missing {name}", index, start)
    bridge = _bridge_name(v[_S_BRIDGE], index, start)
    frame = v[_S_FRAME]
    orig_len = v[_S_ORIG_LEN]
    if orig_len is None:
        orig_len = len(frame)
    elif orig_len < len(frame):
        raise MalformedUpcall(f"ORIG_LEN {orig_len} is less than the "
                              f"frame's {len(frame)} bytes", index, start)
    tunnel = v[_S_TUNNEL]
    if tunnel is not None:
        tunnel = _decode_tunnel(tunnel, index, start)
    probability = v[_S_PROBABILITY]
    if not probability:
        # The exporter divides by it: 0 would poison every count.
        raise MalformedUpcall("PROBABILITY is 0", index, start)
    if kind == KIND_BRIDGE_SAMPLE:
        return BridgeSample(bridge, v[_S_INPUT_PORT], v[_S_OUTPUT_PORT],
                            probability, frame, orig_len, tunnel)
    if probability > UINT16_MAX:
        raise MalformedUpcall(f"flow sample PROBABILITY {probability} "
                              "exceeds 65535", index, start)
    direction = v[_S_DIRECTION] or 0
    if direction > DIRECTION_EGRESS:
        raise MalformedUpcall(f"DIRECTION {direction} is not 0, 1 or 2",
                              index, start)
    return FlowSample(bridge, v[_S_COLLECTOR_SET_ID], v[_S_OBS_DOMAIN_ID],
                      v[_S_OBS_POINT_ID], probability, direction,
                      v[_S_INPUT_PORT], v[_S_OUTPUT_PORT], frame, orig_len,
                      tunnel)


def decode(datagram, problems: Optional[list] = None
           ) -> Tuple[list, int]:
    """Decode one datagram into ``(upcalls, errors)``.  Never raises.

    ``errors`` counts what was lost: a bad header (the whole datagram) is
    1; each malformed upcall is 1 and is skipped, the next one still
    decoded; broken framing (an upcall length that is not a multiple of 4,
    below 8, or past the end) stops the datagram and counts the upcalls
    the header announced but that were not decoded (at least 1); bytes
    past the header's length count 1.  When ``problems`` is a list, a
    :class:`MalformedUpcall` describing each error is appended to it.
    """
    try:
        if type(datagram) is not bytes:
            datagram = bytes(datagram)
        return _decode(datagram, problems)
    except Exception as e:  # noqa: BLE001 - the contract: never raise
        if problems is not None:
            problems.append(MalformedUpcall(f"decoder failure: {e!r}"))
        return [], 1


def _decode(d: bytes, problems: Optional[list]) -> Tuple[list, int]:
    size = len(d)
    if size < 12:
        return _fail(problems, MalformedUpcall(
            f"{size} bytes is shorter than the 12-byte header"))
    magic, version, _flags, count, length = HEADER.unpack_from(d, 0)
    if magic != MAGIC:
        return _fail(problems, MalformedUpcall(
            f"bad magic 0x{magic:08x} (expected 0x{MAGIC:08x})"))
    if version != VERSION:
        return _fail(problems, MalformedUpcall(
            f"unsupported version {version} (expected {VERSION})"))
    if length < 12:
        return _fail(problems, MalformedUpcall(
            f"header length {length} is shorter than the header"))
    errors = 0
    end = length
    short = length > size
    if short:
        end = size  # truncated: the missing upcalls are counted below
    elif length < size:
        errors += 1
        if problems is not None:
            problems.append(MalformedUpcall(
                f"{size - length} bytes past the header's length {length}",
                None, length))
    upcalls = []
    append = upcalls.append
    uhdr = UPCALL_HEADER.unpack_from
    first = _UPCALL_FIRST.unpack_from
    u32attr = _ATTR_U32.unpack_from
    caches = _meta_caches
    new = _new
    off = 12
    index = 0
    accel = fastpath.C
    while off < end:
        if accel is not None:
            # The cache-hit branch below, in C, for as many upcalls in a
            # row as it takes; the one it stops at is decoded here.
            off, n = accel.decode_hits(d, off, end, caches, upcalls)
            index += n
            if off >= end:
                break
        # The fast path of _decode_upcall, inlined: this loop is the
        # hottest code of the exporter.
        if end - off >= 12:
            ulen, kind, _, alen, atype = first(d, off)
            uend = off + ulen
            if ulen < 8 or ulen & 3 or uend > end:
                break
            a = off + 8
            if atype == A_FRAME and a + alen <= uend and alen >= 4:
                m = a + ((alen + 3) & ~3)
                orig_len = alen - 4
                if m + 8 <= uend:
                    olen, otype, value = u32attr(d, m)
                    if otype == A_ORIG_LEN and olen == 8:
                        orig_len = value
                        m += 8
                cache = caches.get(kind)
                if cache is not None and orig_len >= alen - 4:
                    hit = cache.get(d[m:uend])
                    if hit is not None:
                        append(new(hit[0], hit[1] + (d[a + 4:a + alen],
                                                     orig_len) + hit[2]))
                        off = uend
                        index += 1
                        continue
        elif end - off >= 8:
            ulen, kind, _ = uhdr(d, off)
            uend = off + ulen
            if ulen < 8 or ulen & 3 or uend > end:
                break
        else:
            break
        try:
            append(_decode_upcall(d, off, uend, kind, index))
        except MalformedUpcall as e:
            errors += 1
            if problems is not None:
                problems.append(e)
        off = uend
        index += 1
    lost = count - index
    if off < end:
        # Broken framing: the upcall at ``off`` and all after it are lost.
        errors += max(lost, 1)
        if problems is not None:
            problems.append(MalformedUpcall(
                f"broken framing: upcall {index} does not fit in the "
                f"{end - off} bytes left", None, off))
    elif lost > 0:
        # Truncated at an upcall boundary.
        errors += lost
        if problems is not None:
            problems.append(MalformedUpcall(
                f"{lost} of {count} upcalls missing (datagram of {size} "
                f"bytes, header says {length})", None, off))
    elif lost < 0:
        errors += 1
        if problems is not None:
            problems.append(MalformedUpcall(
                f"{index} upcalls, header says {count}", None, 0))
    elif short:
        # Every announced upcall is here, yet the header claims more
        # bytes: the header contradicts the datagram.
        errors += 1
        if problems is not None:
            problems.append(MalformedUpcall(
                f"datagram of {size} bytes, header says {length}", None,
                size))
    return upcalls, errors


def _fail(problems, error):
    if problems is not None:
        problems.append(error)
    return [], 1


# ---------------------------------------------------------------- encoding

_U32 = FORMATS["u32"]
_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")  # by len(value) & 3


def _attr(atype: int, value: bytes) -> bytes:
    """One attribute, padded to 4 bytes."""
    n = len(value)
    if n > 0xFFFF - 4:
        raise ValueError(f"attribute {atype}: value of {n} bytes is too "
                         "long")
    return ATTR_HEADER.pack(n + 4, atype) + value + _PAD[n & 3]


def _u(fmt: str, atype: int, value: int, what: str) -> bytes:
    st = FORMATS[fmt]
    try:
        return _attr(atype, st.pack(value))
    except (struct.error, TypeError):
        raise ValueError(f"{what} {value!r} is not a {fmt}") from None


def _encode_tunnel(t: Tunnel) -> bytes:
    if not isinstance(t, Tunnel):
        raise ValueError(f"tunnel {t!r} is not a Tunnel")
    src, dst = bytes(t.src), bytes(t.dst)
    if len(src) == len(dst) == 4:
        parts = [_attr(T_IPV4_SRC, src), _attr(T_IPV4_DST, dst)]
    elif len(src) == len(dst) == 16:
        parts = [_attr(T_IPV6_SRC, src), _attr(T_IPV6_DST, dst)]
    else:
        raise ValueError("tunnel addresses must both be 4 or both 16 "
                         f"bytes: {src!r}, {dst!r}")
    parts.append(_u("u16", T_SRC_PORT, t.src_port, "tunnel src_port"))
    parts.append(_u("u16", T_DST_PORT, t.dst_port, "tunnel dst_port"))
    parts.append(_u("u64", T_TUN_ID, t.tun_id, "tunnel tun_id"))
    parts.append(_u("u8", T_TUN_TYPE, t.tun_type, "tunnel tun_type"))
    return _attr(A_TUNNEL, b"".join(parts))


def _common(bridge, input_port, output_port, probability, tunnel,
            max_probability: int) -> List[bytes]:
    if not isinstance(bridge, str) or not bridge or "\0" in bridge:
        raise ValueError(f"bridge name {bridge!r}: need a non-empty "
                         "string without NUL")
    if not isinstance(probability, int) or not (
            1 <= probability <= max_probability):
        raise ValueError(f"probability {probability!r} not in "
                         f"1..{max_probability}")
    parts = [_attr(A_BRIDGE, bridge.encode("utf-8")),
             _u("u32", A_INPUT_PORT, input_port, "input_port"),
             _u("u32", A_PROBABILITY, probability, "probability")]
    if output_port is not None:
        parts.append(_u("u32", A_OUTPUT_PORT, output_port, "output_port"))
    if tunnel is not None:
        parts.append(_encode_tunnel(tunnel))
    return parts


def _prefix(u) -> Tuple[int, bytes]:
    """(kind, every attribute but FRAME and ORIG_LEN) for an upcall."""
    if isinstance(u, BridgeSample):
        parts = _common(u.bridge, u.input_port, u.output_port,
                        u.probability, u.tunnel, UINT32_MAX)
        return KIND_BRIDGE_SAMPLE, b"".join(parts)
    if isinstance(u, FlowSample):
        parts = _common(u.bridge, u.input_port, u.output_port,
                        u.probability, u.tunnel, UINT16_MAX)
        parts.append(_u("u32", A_COLLECTOR_SET_ID, u.collector_set_id,
                        "collector_set_id"))
        parts.append(_u("u32", A_OBS_DOMAIN_ID, u.obs_domain_id,
                        "obs_domain_id"))
        parts.append(_u("u32", A_OBS_POINT_ID, u.obs_point_id,
                        "obs_point_id"))
        if u.direction not in (0, 1, 2):
            raise ValueError(f"direction {u.direction!r} is not 0, 1 "
                             "or 2")
        if u.direction:
            parts.append(_u("u8", A_DIRECTION, u.direction, "direction"))
        return KIND_FLOW_SAMPLE, b"".join(parts)
    raise ValueError(f"{u!r} is not a BridgeSample or a FlowSample")


# The attributes other than the frame repeat from one upcall to the next
# (same bridge, ports, probability): encode them once per distinct value.
_prefixes: dict = {}
_MAX_CACHED_PREFIXES = 4096


def _prefix_key(u):
    if type(u) is BridgeSample:
        return (1, u[0], u[1], u[2], u[3], u[6])
    if type(u) is FlowSample:
        return (2, u[0], u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[10])
    return None


def _encode_upcall(u) -> bytes:
    """One upcall: header, FRAME, ORIG_LEN when truncated, then the
    other attributes (encoded once per distinct value)."""
    key = _prefix_key(u)
    cached = _prefixes.get(key) if key is not None else None
    if cached is None:
        cached = _prefix(u)
        if key is not None:
            if len(_prefixes) >= _MAX_CACHED_PREFIXES:
                _prefixes.clear()
            _prefixes[key] = cached
    kind, prefix = cached
    frame = u.frame
    if type(frame) is not bytes:
        frame = bytes(frame)
    n = len(frame)
    if n > MAX_FRAME_SIZE:
        raise ValueError(f"frame of {n} bytes exceeds {MAX_FRAME_SIZE}: "
                         "truncate it and give orig_len")
    orig_len = u.orig_len
    if orig_len == n:
        orig = b""
    elif isinstance(orig_len, int) and n < orig_len <= UINT32_MAX:
        orig = ATTR_HEADER.pack(8, A_ORIG_LEN) + _U32.pack(orig_len)
    else:
        raise ValueError(f"orig_len {orig_len!r} not in {n}..{UINT32_MAX} "
                         "(the frame's length or more)")
    total = 8 + len(prefix) + len(orig) + 4 + ((n + 3) & ~3)
    # FRAME first, ORIG_LEN second: the decoder's fast path relies on it.
    return b"".join((UPCALL_HEADER.pack(total, kind, 0),
                     ATTR_HEADER.pack(n + 4, A_FRAME), frame, _PAD[n & 3],
                     orig, prefix))


def _datagram(encoded: List[bytes], length: int) -> bytes:
    return HEADER.pack(MAGIC, VERSION, 0, len(encoded),
                       length) + b"".join(encoded)


def encode(upcalls: Iterable) -> bytes:
    """Encode upcalls into one datagram.  Raises ValueError on a value
    the format cannot carry, or when the datagram would exceed
    MAX_DATAGRAM_SIZE bytes or 65535 upcalls (use :func:`pack_batches`)."""
    encoded = [_encode_upcall(u) for u in upcalls]
    length = HEADER.size + sum(map(len, encoded))
    if length > MAX_DATAGRAM_SIZE or len(encoded) > MAX_UPCALLS_PER_DATAGRAM:
        raise ValueError(f"{len(encoded)} upcalls in {length} bytes do "
                         "not fit in one datagram")
    return _datagram(encoded, length)


class Batcher:
    """Packs upcalls into datagrams of at most ``max_size`` bytes, one
    upcall at a time, for senders that decide when to send (pacing).

    :meth:`add` encodes an upcall and returns the pending datagram when
    the upcall does not fit in it (the upcall then starts the next one),
    else None; :meth:`flush` returns the pending datagram, or None.
    ``len(batcher)`` is the number of upcalls pending.  ValueError: a
    value the format cannot carry, or an upcall too big for ``max_size``
    (what was pending stays pending).
    """

    def __init__(self, max_size: int = 65000):
        if not HEADER.size + 8 <= max_size <= MAX_DATAGRAM_SIZE:
            raise ValueError(f"max_size {max_size} not in "
                             f"{HEADER.size + 8}..{MAX_DATAGRAM_SIZE}")
        self.max_size = max_size
        self._room = max_size - HEADER.size
        self._batch: List[bytes] = []
        self._used = 0

    def __len__(self) -> int:
        return len(self._batch)

    def add(self, u) -> Optional[bytes]:
        b = _encode_upcall(u)
        n = len(b)
        full = None
        if self._used + n > self._room or \
                len(self._batch) == MAX_UPCALLS_PER_DATAGRAM:
            if n > self._room:
                raise ValueError(f"an upcall of {n} bytes does not fit in "
                                 f"a datagram of {self.max_size} bytes")
            full = self.flush()
        self._batch.append(b)
        self._used += n
        return full

    def flush(self) -> Optional[bytes]:
        if not self._batch:
            return None
        d = _datagram(self._batch, HEADER.size + self._used)
        self._batch = []
        self._used = 0
        return d


class FrameBatcher:
    """Batches frames that share all other fields: those of ``template``
    (a BridgeSample or FlowSample whose frame and orig_len are ignored).
    The replay tool's hot path: one struct pack per frame.

    :meth:`add` ``(frame, orig_len)`` returns the pending datagram when
    the frame's upcall does not fit in it, else None; :meth:`flush`
    returns the pending datagram, or None.  Same datagrams as
    :class:`Batcher` would build from the equivalent upcalls.
    """

    def __init__(self, template, max_size: int = 65000):
        if not HEADER.size + 8 <= max_size <= MAX_DATAGRAM_SIZE:
            raise ValueError(f"max_size {max_size} not in "
                             f"{HEADER.size + 8}..{MAX_DATAGRAM_SIZE}")
        self._kind, self._prefix = _prefix(template)  # validates it
        self._suffix = tuple(pad + self._prefix for pad in _PAD)
        self.max_size = max_size
        self._room = max_size - HEADER.size
        self._parts: List[bytes] = []
        self._count = 0
        self._used = 0

    def __len__(self) -> int:
        return self._count

    def add(self, frame: bytes, orig_len: int) -> Optional[bytes]:
        n = len(frame)
        if orig_len == n:
            suffix = self._suffix[n & 3]
        elif isinstance(orig_len, int) and n < orig_len <= UINT32_MAX:
            suffix = (_PAD[n & 3]
                      + _ATTR_U32.pack(8, A_ORIG_LEN, orig_len)
                      + self._prefix)
        else:
            raise ValueError(f"orig_len {orig_len!r} not in "
                             f"{n}..{UINT32_MAX} (the frame's length or "
                             "more)")
        if n > MAX_FRAME_SIZE:
            raise ValueError(f"frame of {n} bytes exceeds {MAX_FRAME_SIZE}:"
                             " truncate it and give orig_len")
        total = 12 + n + len(suffix)
        full = None
        if self._used + total > self._room or \
                self._count == MAX_UPCALLS_PER_DATAGRAM:
            if total > self._room:
                raise ValueError(f"an upcall of {total} bytes does not fit "
                                 f"in a datagram of {self.max_size} bytes")
            full = self.flush()
        self._parts += (_UPCALL_FIRST.pack(total, self._kind, 0, n + 4,
                                           A_FRAME), frame, suffix)
        self._count += 1
        self._used += total
        return full

    def flush(self) -> Optional[bytes]:
        if not self._count:
            return None
        d = HEADER.pack(MAGIC, VERSION, 0, self._count,
                        HEADER.size + self._used) + b"".join(self._parts)
        self._parts = []
        self._count = 0
        self._used = 0
        return d


def frame_prefix(template) -> Tuple[int, bytes]:
    """``(kind, bytes after the frame)`` of ``template``'s upcalls, as
    :class:`FrameBatcher` writes them (for the replay's C loop,
    ``fastpath.C.pcap_datagram``).  ValueError: a value the format
    cannot carry."""
    return _prefix(template)


def pack_batches(upcalls: Iterable, max_size: int = 65000
                 ) -> Iterator[bytes]:
    """Encode upcalls into datagrams of at most ``max_size`` bytes each,
    as many upcalls per datagram as fit, in order.  Raises ValueError on
    an upcall that cannot be encoded or does not fit alone, after
    yielding the datagram of the upcalls before it."""
    batcher = Batcher(max_size)
    add = batcher.add
    for u in upcalls:
        try:
            d = add(u)
        except ValueError:
            d = batcher.flush()
            if d is not None:
                yield d
            raise
        if d is not None:
            yield d
    d = batcher.flush()
    if d is not None:
        yield d
