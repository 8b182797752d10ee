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

import contextlib
import os
import struct
import sys

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


@contextlib.contextmanager
def pure_python():
    """The pure-Python paths for the duration (fastpath.C off)."""
    saved = fastpath.C
    fastpath.C = None
    try:
        yield
    finally:
        fastpath.C = saved


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
    with pure_python():
        py_out = _decode_runs(datagrams)
    if fastpath.C is not None:
        assert c_out == py_out, (c_out, py_out)
    for (got, problems) in py_out:
        ups, errors = got
        assert errors >= 0 and len(problems) >= (1 if errors else 0)


# -- batch --------------------------------------------------------------------

#: Frame heads the batch target can start from (the rest comes from the
#: input): plain IPv4 (the C path's shape), IPv4 with options, VLAN,
#: IPv6, or nothing.
_MAC = bytes(range(1, 13))
_HEADS = (
    b"",
    _MAC + b"\x08\x00\x45\x00",
    _MAC + b"\x08\x00\x46\x00",
    _MAC + b"\x81\x00\x00\x64\x08\x00\x45\x00",
    _MAC + b"\x86\xdd\x60\x00\x00\x00",
)
_PROBABILITIES = (0, 1, 2, 400, UINT32_MAX)
_EXTRA_LEN = (0, 0, 1, 40, UINT32_MAX - 60)


def _cache_state(exp):
    c = exp.cache
    used = c._next_slot
    return [dict(c.index), list(c.order), c.times[:2 * used].tolist(),
            c.counters[:4 * used].tolist(), c.small[:3 * used].tolist(),
            list(c.expired), sorted(c._free), exp.stats.as_dict()]


def _batch_input(r: Reader):
    """(options, [(now, [BridgeSample])]) from the input."""
    flags = r.u8()
    opts = BridgeExporterOptions(
        "br0", ExportOptions(cache=CacheOptions(
            r.choice((0, 2, 3600)), r.choice((0, 1, 3, 1000)))),
        sampling=r.choice((1, 400, UINT32_MAX)),
        enable_input_sampling=not flags & 1,
        enable_output_sampling=not flags & 2)
    batches = []
    batch = []
    now = 1.0
    n = 0
    # Few samples per input: coverage, not volume, finds bugs (and each
    # input runs three exporters).
    while r.left() > 0 and len(batches) < 4 and n < 48:
        n += 1
        ctl = r.u8()
        if ctl & 0x80:
            batches.append((now, batch))
            batch = []
            now += r.u8() / 4.0
            continue
        head = _HEADS[ctl % len(_HEADS)]
        frame = head + r.take(r.u8())
        in_port = 1 + (ctl >> 3 & 1)
        out_port = (None, 3, UINT32_MAX, None)[(ctl >> 4) & 3]
        probability = r.choice(_PROBABILITIES)
        if probability == 2:
            probability = r.u32()
        # The channel carries orig_len as a u32.
        orig_len = min(len(frame) + r.choice(_EXTRA_LEN), UINT32_MAX)
        tunnel = None
        if ctl & 0x40:
            tunnel = upcall.Tunnel(r.take(4).ljust(4, b"\0"),
                                   r.take(4).ljust(4, b"\0"), r.u16(),
                                   r.u16(), r.u32(), r.u8())
        batch.append(BridgeSample("br0", in_port, out_port, probability,
                                  frame, orig_len, tunnel))
    batches.append((now, batch))
    ports = {}
    if flags & 4:
        # OVSDB knows ports 1 (a VXLAN port: tunnelled samples on it are
        # keyed by their tunnel) and 3.
        ports = {1: interfaces.Interface(1, "vx1", 0, 0, "", "vxlan"),
                 3: interfaces.Interface(3, "p3", 7, 6, "eth3", "")}
    return opts, batches, ports


def batch(data: bytes) -> None:
    opts, batches, ports = _batch_input(Reader(data))
    exporters = [Exporter(opts, 0.0) for _ in range(2)]
    c_exp, py_exp = exporters
    try:
        for e in exporters:
            e.set_ports(ports)
        if fastpath.C is not None:
            for now, b in batches:
                c_exp.sample_bridge_batch(b, now)
        with pure_python():
            for now, b in batches:
                py_exp.sample_bridge_batch(b, now)
        if fastpath.C is not None:
            c_state, py_state = _cache_state(c_exp), _cache_state(py_exp)
            assert c_state == py_state, (c_state, py_state)

        # Flush: C expired_flows and the Python loop; then the records
        # of each template through both pack_records.
        cached = len(py_exp.cache)
        if fastpath.C is not None:
            c_exp.cache.flush(1e6)
        with pure_python():
            py_exp.cache.flush(1e6)
        py_flows = py_exp.cache.take_expired()
        if fastpath.C is not None:
            assert c_exp.cache.take_expired() == py_flows
        flushed = py_flows[len(py_flows) - cached:]
        assert all(f.reason == FORCED_END for f in flushed)
        # (Grouped as the exporter groups them: template and key length,
        # which variable-length fields make differ within a template.)
        groups = {}
        for f in py_flows:
            groups.setdefault((f.key[:6], len(f.key)), []).append(f)
        for (prefix, _), group in groups.items():
            tid = struct.unpack("!H", prefix[4:6])[0]
            tmpl = t.get(tid)
            args = (group, b"", bool(tmpl.l3), tmpl.l4 == t.L4_TCP)
            want = pack_records(*args)
            if fastpath.C is not None:
                assert fastpath.C.pack_records(*args) == want
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
            data = bytearray((0, 2, 2, 0))     # flags, cache, sampling
            for i, f in enumerate(frames[lo:lo + 8]):
                if i == 4:
                    data += bytes((0x80, 4))   # a new batch, 1 s later
                data.append(0 if i % 2 else 0x18)   # raw; port 2 egress
                f = f[:255]
                data += bytes((len(f),)) + f
                data += bytes((1, 0))          # probability 1, orig len
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
