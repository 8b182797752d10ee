"""Fuzz targets: one per entry point that takes outside bytes.

Each target is a plain function of one ``bytes`` input that returns
normally when the code under test behaved, and raises (AssertionError
for a disagreement, anything else for a crash of the contract) when it
did not.  ``tools/fuzz/fuzz.py`` drives them with atheris (libFuzzer,
coverage of the Python code and of the C extension built with
sanitizers); ``tests/test_fuzz_corpus.py`` replays every kept input
through the same functions in the ordinary test suite.  The byte layouts
below are this module's own, read with :class:`Reader`, so that neither
atheris nor hypothesis is needed to replay a corpus.

- ``decode``: the channel decoder, ``upcall.decode``, with the C
  cache-hit loop and without, cold and warm metadata caches; the input
  is two datagrams (the first warms the caches for the second).  Same
  upcalls, same error counts, same problem texts; never raises.
- ``batch``: the aggregation of bridge samples,
  ``Exporter.sample_bridge_batch``, C against pure Python (the
  specification; tests/test_fastpath.py also checks it against one
  ``packet.parse`` per sample), fed arbitrary frames and metadata
  (ports, probabilities, original lengths, sampling directions, cache
  sizes and timeouts): same cache (keys, slots, aggregates, order,
  expired flows) and counters; then a flush through ``expired_flows``
  (C) and the Python loop, and the records of both through
  ``pack_records`` (C and Python): same bytes.
- ``parse``: ``packet.parse`` on arbitrary frames: never raises, gives a
  known template and a key of that template's key length.
- ``config``: the OVSDB option readers (``ConfigReader._export_options``
  and the bridge columns) fed arbitrary column values: never raise, and
  every value they return is in its documented range.
"""

from __future__ import annotations

import os
import struct
import sys
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from ovs_ipfix_py import fastpath, interfaces, packet, upcall  # noqa: E402
from ovs_ipfix_py import templates as t  # noqa: E402
from ovs_ipfix_py.config import (  # noqa: E402
    IPFIX_INT_COLUMNS,
    MAX_MAX_MESSAGE_SIZE,
    VIRTUAL_OBS_ID_MAX_LEN,
    ConfigReader,
    _Reading,
)
from ovs_ipfix_py.exporter import Exporter, pack_records  # noqa: E402
from ovs_ipfix_py.flowcache import FORCED_END  # noqa: E402
from ovs_ipfix_py.options import (  # noqa: E402
    MIN_MAX_MESSAGE_SIZE,
    UINT32_MAX,
    BridgeExporterOptions,
    CacheOptions,
    ExportOptions,
    FlowExporterOptions,
)
from ovs_ipfix_py.upcall import BridgeSample  # noqa: E402


class Reader:
    """Consumes an input from the front; past the end it yields zeros
    (and ``rest()`` b""), so every input is a valid one."""

    def __init__(self, data: bytes):
        self.data = data
        self.off = 0

    def left(self) -> int:
        return len(self.data) - self.off

    def take(self, n: int) -> bytes:
        out = self.data[self.off:self.off + n]
        self.off += len(out)
        return out

    def u8(self) -> int:
        b = self.take(1)
        return b[0] if b else 0

    def u16(self) -> int:
        return int.from_bytes(self.take(2).ljust(2, b"\0"), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4).ljust(4, b"\0"), "big")

    def i64(self) -> int:
        return int.from_bytes(self.take(8).ljust(8, b"\0"), "big",
                              signed=True)

    def choice(self, seq):
        return seq[self.u8() % len(seq)]

    def rest(self) -> bytes:
        return self.take(self.left())


# -- decode -------------------------------------------------------------------

def _decode_runs(datagrams):
    for c in upcall._meta_caches.values():
        c.clear()
    out = []
    for d in datagrams:
        for _ in range(2):
            problems = []
            got = upcall.decode(d, problems)
            out.append((got, [str(p) for p in problems]))
    return out


def decode(data: bytes) -> None:
    """Input: u16 length of the first datagram, the first, the second."""
    r = Reader(data)
    first = r.take(r.u16())
    datagrams = (first, r.rest())
    c_out = _decode_runs(datagrams)
    with fastpath.pure_python():
        py_out = _decode_runs(datagrams)
    if fastpath.C is not None:
        assert c_out == py_out, (c_out, py_out)
    for (got, problems) in py_out:
        ups, errors = got
        assert errors >= 0 and len(problems) >= (1 if errors else 0)


# -- batch --------------------------------------------------------------------

#: Frame heads the batch target can start from (the rest comes from the
#: input): plain IPv4 (the C path's shape), IPv4 with options, VLAN,
#: IPv6, IPv4 carrying TCP, or nothing.
_MAC = bytes(range(1, 13))
_HEADS = (
    b"",
    _MAC + b"\x08\x00\x45\x00",
    _MAC + b"\x08\x00\x46\x00",
    _MAC + b"\x81\x00\x00\x64\x08\x00\x45\x00",
    _MAC + b"\x86\xdd\x60\x00\x00\x00",
    _MAC + b"\x08\x00\x45\x00\x00\x28\x00\x00\x00\x00\x40\x06",
    _MAC + b"\x86\xdd\x60\x00\x00\x00\x00\x14\x2c\x40",
    _MAC + b"\x88\xa8\x00\x0a\x81\x00\x00\x14\x08\x00\x45\x00",
)
#: Probability selectors: index 7 takes the sample's u32 from the input.
_PROBABILITIES = (0, 1, 2, 400, 65535, UINT32_MAX, 3, None)
_EXTRA_LEN = (0, 1, 40, UINT32_MAX - 60)
_PORTS = (None, 3, UINT32_MAX, 0)
#: One sample's fixed part: ctl, sel, frame length, observation point,
#: aux (a probability, or the observation domain).
_SAMPLE = struct.Struct("!BBBBI")
_TUNNEL = struct.Struct("!4s4sHHIB")

#: Every how many inputs (by the input's CRC-32) the batch target also
#: runs the pure-Python twin and compares whole caches; 1 = every input.
#: The ordinary test suite replays with 1; ``tools/fuzz/run`` may set
#: more (``OVS_IPFIX_FUZZ_DIFF_EVERY``) so that the sanitizer runs spend
#: their time in the C code: the twin costs four C runs.
DIFF_EVERY = max(1, int(os.environ.get("OVS_IPFIX_FUZZ_DIFF_EVERY", "1")))


def _cache_state(exp):
    c = exp.cache
    used = c._next_slot
    return [dict(c.index), list(c.order), c.times[:2 * used].tolist(),
            c.counters[:4 * used].tolist(), c.small[:3 * used].tolist(),
            list(c.expired), sorted(c._free), exp.stats.as_dict()]


def _batch_input(data: bytes):
    """(options, [(now, [sample])], ports) from the input.

    Layout: flags, active timeout, max flows, sampling selectors; then
    samples, each ``_SAMPLE`` (ctl: bit 7 starts a new batch, the next
    byte being how far the clock moves in quarter seconds; bits 0-2 the
    frame head, bit 3 the input port, bits 4-5 the output port, bit 6
    tunnel metadata follows the frame (``_TUNNEL``; a type with bit 7
    set is an IPv6 underlay, 24 more address bytes follow); sel: bit 0 a
    flow sample (always, for a flow exporter: flags bit 3), bits
    1-3 the probability, bits 4-5 what the original length adds, bits
    6-7 the flow sample's direction), the frame's tail, the tunnel.
    """
    flags, active, most, sampling = (data[:4] + b"\0\0\0\0")[:4]
    export = ExportOptions(cache=CacheOptions(
        (0, 2, 3600)[active % 3], (0, 1, 3, 1000)[most % 4]))
    if flags & 8:
        opts = FlowExporterOptions("br0", 5, export)
    else:
        opts = BridgeExporterOptions(
            "br0", export, sampling=(1, 400, UINT32_MAX)[sampling % 3],
            enable_input_sampling=not flags & 1,
            enable_output_sampling=not flags & 2)
    batches = []
    batch = []
    now = 1.0
    off = 4
    size = len(data)
    # Few samples per input: coverage, not volume, finds bugs.
    while off < size and len(batches) < 4 and len(batch) < 48:
        ctl = data[off]
        if ctl & 0x80:
            batches.append((now, batch))
            batch = []
            now += (data[off + 1] if off + 1 < size else 0) / 4.0
            off += 2
            continue
        ctl, sel, flen, point, aux = _SAMPLE.unpack_from(
            data[off:off + 8].ljust(8, b"\0"))
        off += 8
        frame = _HEADS[ctl & 7] + data[off:off + flen]
        off += flen
        in_port = 1 + (ctl >> 3 & 1)
        out_port = _PORTS[ctl >> 4 & 3]
        probability = _PROBABILITIES[sel >> 1 & 7]
        if probability is None:
            probability = aux
        # The channel carries orig_len as a u32.
        orig_len = min(len(frame) + _EXTRA_LEN[sel >> 4 & 3], UINT32_MAX)
        tunnel = None
        if ctl & 0x40:
            src, dst, sport, dport, tun_id, tun_type = _TUNNEL.unpack_from(
                data[off:off + _TUNNEL.size].ljust(_TUNNEL.size, b"\0"))
            off += _TUNNEL.size
            if tun_type & 0x80:
                # An IPv6 underlay: 24 more address bytes.
                more = data[off:off + 24].ljust(24, b"\0")
                off += 24
                src, dst = src + more[:12], dst + more[12:]
            tunnel = upcall.Tunnel(src, dst, sport, dport, tun_id,
                                   tun_type & 0x7F)
        if sel & 1 or flags & 8:
            # A flow exporter is handed flow samples only (the daemon
            # groups samples by bridge and collector set); a bridge
            # exporter any mix.  The channel carries a flow sample's
            # probability as a u16.
            batch.append(upcall.FlowSample(
                "br0", 5, aux, point, probability & 0xFFFF, sel >> 6,
                in_port, out_port, frame, orig_len, tunnel))
        else:
            batch.append(BridgeSample("br0", in_port, out_port,
                                      probability, frame, orig_len, tunnel))
    batches.append((now, batch))
    ports = {}
    if flags & 4:
        # OVSDB knows ports 1 (a VXLAN port: tunnelled samples on it are
        # keyed by their tunnel) and 3.
        ports = {1: interfaces.Interface(1, "vx1", 0, 0, "", "vxlan"),
                 3: interfaces.Interface(3, "p3", 7, 6, "eth3", "")}
    return opts, batches, ports


def _check_cache(exp, samples: int) -> None:
    """What must hold of any cache: each key once in index and order,
    every cached flow counted, and no more flows than samples."""
    c = exp.cache
    assert len(c.index) == len(c.order) == len(c), (len(c.index),
                                                    len(c.order))
    assert len(c) + len(c.expired) <= samples


def _flush_and_pack(exp, c_code: bool):
    """Flush ``exp``'s cache (C ``expired_flows`` when ``c_code``, else
    the Python loop) and pack the records of each template the way the
    exporter groups them (template and key length: variable-length
    fields make keys of one template differ); (flows, packed bytes)."""
    cached = len(exp.cache)
    if c_code:
        exp.cache.flush(1e6)
    else:
        with fastpath.pure_python():
            exp.cache.flush(1e6)
    flows = exp.cache.take_expired()
    assert len(exp.cache) == 0
    flushed = flows[len(flows) - cached:]
    assert all(f.reason == FORCED_END and f.packets >= 1 for f in flushed)
    groups = {}
    for f in flows:
        groups.setdefault((f.key[:6], len(f.key)), []).append(f)
    packed = []
    for (prefix, _), group in groups.items():
        tmpl = t.get(struct.unpack("!H", prefix[4:6])[0])
        args = (group, b"", bool(tmpl.l3), tmpl.l4 == t.L4_TCP)
        if c_code:
            packed.append(fastpath.C.pack_records(*args))
        else:
            packed.append(pack_records(*args))
    return flows, packed


def batch(data: bytes) -> None:
    """The C aggregation (``Exporter.sample_batch``: bridge and flow
    samples of every frame kind) fed arbitrary frames and metadata, then
    flushed through ``expired_flows`` and packed by ``pack_records``.
    On every ``DIFF_EVERY``-th input (all of them when replayed) the
    pure-Python twin (the specification) runs the same and must leave
    the same cache, counters, flows and bytes.  Without the C extension
    only the Python side runs."""
    opts, batches, ports = _batch_input(data)
    samples = sum(len(b) for _, b in batches)
    c_code = fastpath.C is not None
    twin = not c_code or zlib.crc32(data) % DIFF_EVERY == 0
    exporters = []
    try:
        if c_code:
            c_exp = Exporter(opts, 0.0)
            exporters.append(c_exp)
            c_exp.set_ports(ports)
            for now, b in batches:
                c_exp.sample_batch(b, now)
            _check_cache(c_exp, samples)
        if twin:
            py_exp = Exporter(opts, 0.0)
            exporters.append(py_exp)
            py_exp.set_ports(ports)
            with fastpath.pure_python():
                for now, b in batches:
                    py_exp.sample_batch(b, now)
            _check_cache(py_exp, samples)
        if c_code and twin:
            c_state, py_state = _cache_state(c_exp), _cache_state(py_exp)
            assert c_state == py_state, (c_state, py_state)
        if c_code:
            c_out = _flush_and_pack(c_exp, True)
        if twin:
            py_out = _flush_and_pack(py_exp, False)
        if c_code and twin:
            assert c_out == py_out
    finally:
        for e in exporters:
            e.collectors.close()


# -- parse --------------------------------------------------------------------

_PORT_TYPES = ("", "internal", "vxlan", "gre", "geneve", "stt")


def parse(data: bytes) -> None:
    """Input: observation point, direction, ports, which of them OVSDB
    knows (name, type), a tunnel, then the frame."""
    r = Reader(data)
    point = r.u32()
    egress = r.u8() & 1
    direction = t.EGRESS if egress else t.INGRESS
    in_port, out_port = r.u32(), r.u32()
    flags = r.u8()
    ports = {}
    for port, bit in ((in_port, 1), (out_port, 2)):
        if flags & bit:
            ports[port] = interfaces.Interface(
                port, _text(r), r.u32(), r.u32(), _text(r),
                r.choice(_PORT_TYPES))
    tunnel = None
    if flags & 4:
        v6 = flags & 8
        addr = 16 if v6 else 4
        tunnel = upcall.Tunnel(r.take(addr).ljust(addr, b"\0"),
                               r.take(addr).ljust(addr, b"\0"), r.u16(),
                               r.u16(), r.u32() << 32 | r.u32(), r.u8())
    iface = interfaces.iface_part(ports, in_port,
                                  out_port if egress else None, egress)
    tpart = interfaces.tunnel_part(
        ports.get(out_port if egress else in_port), tunnel)
    fk = packet.parse(r.rest(), point, direction, iface, tpart)
    tmpl = t.get(fk.template_id)
    assert fk.kind in (packet.OTHER, packet.IPV4_OK, packet.IPV6_OK,
                       packet.IPV4_ERR, packet.IPV6_ERR)
    assert 0 <= fk.tcp_flags <= 0xFFFF
    assert fk.key.endswith(tpart)
    # The key is exactly one record's key part of its template: walk
    # its fields (variable-length ones carry a 1-byte length).
    pos = 0
    for _, length in tmpl.key_fields:
        if length == t.VARIABLE:
            assert pos < len(fk.key) and fk.key[pos] < 255, (fk, tmpl)
            pos += 1 + fk.key[pos]
        else:
            pos += length
    assert pos == len(fk.key), (fk, tmpl)


# -- config -------------------------------------------------------------------

class _Row:
    """An IPFIX row as the IDL gives it: integer columns are lists of
    at most one int, ``targets`` a list of str, ``other_config`` a dict
    of str to str."""


def _text(r: Reader, limit: int = 64) -> str:
    raw = r.take(r.u8() % (limit + 1))
    # OVSDB strings are UTF-8 (the server refuses anything else), so
    # what the IDL hands over never holds a lone surrogate.
    return raw.decode("utf-8", "replace")


_KEYS = ("enable-input-sampling", "enable-output-sampling",
         "enable-tunnel-sampling", "max-message-size", "virtual_obs_id")


def config(data: bytes) -> None:
    r = Reader(data)
    row = _Row()
    for column in IPFIX_INT_COLUMNS:
        setattr(row, column, [r.i64()] if r.u8() & 1 else [])
    row.targets = [_text(r) for _ in range(r.u8() % 4)]
    row.other_config = {}
    for _ in range(r.u8() % 6):
        key = r.choice(_KEYS + ("x",))
        row.other_config[key if key != "x" else _text(r, 16)] = _text(r)
    reader = ConfigReader.__new__(ConfigReader)
    reader._ipfix_columns = set(IPFIX_INT_COLUMNS) if r.u8() & 1 else {
        "sampling", "obs_domain_id", "cache_max_flows"}
    reading = _Reading()
    where = "bridge br0"
    export = reader._export_options(row, where, reading)
    ints = {c: reader._int(row, c, where, reading)
            for c in IPFIX_INT_COLUMNS}
    for column, (lo, hi, _) in IPFIX_INT_COLUMNS.items():
        assert lo <= ints[column] <= hi, (column, ints[column])
    for key in _KEYS[:3]:
        assert reader._bool(row, key, True, where, reading) in (True,
                                                                False)
    assert (MIN_MAX_MESSAGE_SIZE <= export.max_message_size
            <= MAX_MAX_MESSAGE_SIZE)
    vobs = export.virtual_obs_id
    assert vobs is None or 0 < len(vobs.encode()) <= VIRTUAL_OBS_ID_MAX_LEN
    assert export.targets == tuple(sorted(row.targets))
    hash(export)
    assert all(isinstance(v, str) for v in reading.problems.values())


TARGETS = {"decode": decode, "batch": batch, "parse": parse,
           "config": config}

#: The targets that run C code (the others are pure Python: the
#: sanitizers have nothing to check there, Python coverage guides them).
RUNS_C = ("decode", "batch")


# -- seeds --------------------------------------------------------------------

def seeds(name: str):
    """Valid inputs of target ``name`` to start a corpus from: the
    traffic mix of tests/traffic.py (every frame kind) as datagrams,
    batches and frames; sane and odd IPFIX rows."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import traffic as tr

    frames, _ = tr.traffic_mix(seed=11, flows_per_kind=1)
    frames = [f for f in frames if len(f) < 1600]
    if name == "parse":
        plain = struct.pack("!IBIIB", 7, 0, 1, 2, 0)
        named = struct.pack("!IBIIB", 7, 1, 1, 2, 3) + (
            b"\x02p1" + struct.pack("!II", 5, 6) + b"\x00" + b"\x00"
            + b"\x02p2" + struct.pack("!II", 7, 6) + b"\x04eth2" + b"\x02")
        tunnelled = struct.pack("!IBIIB", 7, 0, 1, 2, 5) + (
            b"\x02t1" + struct.pack("!II", 5, 6) + b"\x00" + b"\x02"
            + bytes((10, 0, 0, 1, 10, 0, 0, 2)) + struct.pack(
                "!HHIIB", 4789, 4789, 0, 77, 4))
        return ([plain + f for f in frames] + [named + f for f in frames[:5]]
                + [tunnelled + f for f in frames[:5]])
    if name == "decode":
        out = []
        ups = [BridgeSample("br0", 1, None, UINT32_MAX, f, len(f))
               for f in frames[:40]]
        flows = [upcall.FlowSample("br0", 3, 4, 5, 65535, i % 3, 1, 2, f,
                                   len(f) + i % 2 * 100,
                                   upcall.Tunnel(b"\x0a\0\0\1",
                                                 b"\x0a\0\0\2", 1, 4789,
                                                 77, 4) if i % 2 else None)
                 for i, f in enumerate(frames[:20])]
        for first, second in ((ups[:3], ups[3:9]), (flows[:2], flows[2:6]),
                              (ups[:1] + flows[:1], flows[:1] + ups[:2])):
            a, b = upcall.encode(first), upcall.encode(second)
            out.append(struct.pack("!H", len(a)) + a + b)
        return out
    if name == "batch":
        out = []
        for lo in range(0, 40, 8):
            for flags, sel in ((0, 2), (8, 3), (4, 0x8b)):
                # flags, active timeout, max flows, sampling
                data = bytearray((flags, 2, 3, 0))
                for i, f in enumerate(frames[lo:lo + 8]):
                    if i == 4:
                        data += bytes((0x80, 4))   # a new batch, 1 s later
                    f = f[:255]
                    # raw frames; every other one egress by port 3
                    ctl = 0 if i % 2 else 0x10
                    data += _SAMPLE.pack(ctl, sel, len(f), 9, 7) + f
                out.append(bytes(data))
        return out
    if name == "config":
        def text(s):
            raw = s.encode()
            return bytes((len(raw),)) + raw
        row = bytearray()
        for _lo, _hi, default in IPFIX_INT_COLUMNS.values():
            row += b"\x01" + struct.pack("!q", default)
        row += bytes((2,)) + text("127.0.0.1:4739") + text("[::1]")
        row += bytes((3, 3)) + text("1500") + bytes((4,)) + text("vm-7")
        row += bytes((0,)) + text("false") + b"\x01"
        odd = bytearray()
        for _ in IPFIX_INT_COLUMNS:
            odd += b"\x01" + struct.pack("!q", -1 << 63)
        odd += bytes((3,)) + text("host.example:99999") + text(":") + text(
            "10.0.0.300")
        odd += bytes((2, 3)) + text(" 12x") + bytes((1,)) + text("TRUE")
        return [bytes(row), bytes(odd)]
    raise KeyError(name)
