"""The upcall wire format: round trips, batching, and a decoder that
counts and skips bad input without ever raising."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.inputs import upcalls

from ovs_ipfix_py import upcall as U
from ovs_ipfix_py.upcall import (
    BridgeSample,
    FlowSample,
    MalformedUpcall,
    Tunnel,
    decode,
    encode,
    pack_batches,
)

FRAME = bytes.fromhex("00112233445566778899aabb0800"
                      "450000280000400040060000c0000201c0000202"
                      "04d2005000000000000000005002000000000000")


def bridge(**kw):
    args = dict(bridge="br0", input_port=1, output_port=None,
                probability=U.UINT32_MAX // 400, frame=FRAME,
                tunnel=None)
    args.update(kw)
    args.setdefault("orig_len", len(args["frame"]))
    return BridgeSample(**args)


def flow(**kw):
    args = dict(bridge="br-int", collector_set_id=7, obs_domain_id=123,
                obs_point_id=456, probability=100, direction=1,
                input_port=3, output_port=4, frame=FRAME, tunnel=None)
    args.update(kw)
    args.setdefault("orig_len", len(args["frame"]))
    return FlowSample(**args)


V4 = Tunnel(bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2]), 49152, 4789,
            0x123456, 1)
V6 = Tunnel(bytes(range(16)), bytes(range(16, 32)), 0, 6081,
            2**64 - 1, 7)


# Hand-made wire pieces, independent of the encoder.
def attr(atype, value):
    return struct.pack("!HH", len(value) + 4, atype) + value + \
        b"\0" * (-len(value) % 4)


def u32(atype, v):
    return attr(atype, struct.pack("!I", v))


def raw_upcall(kind, *attrs, length=None):
    body = b"".join(attrs)
    if length is None:
        length = 8 + len(body)
    return struct.pack("!IHH", length, kind, 0) + body


def raw_datagram(*upcalls, count=None, length=None, magic=U.MAGIC,
                 version=U.VERSION):
    body = b"".join(upcalls)
    if count is None:
        count = len(upcalls)
    if length is None:
        length = 12 + len(body)
    return struct.pack("!IBBHI", magic, version, 0, count, length) + body


def minimal_bridge_attrs(frame=b"\x01\x02\x03"):
    return [attr(U.A_BRIDGE, b"br0"), u32(U.A_INPUT_PORT, 5),
            u32(U.A_PROBABILITY, 1), attr(U.A_FRAME, frame)]


@pytest.fixture(autouse=True)
def cold_caches():
    """Each test starts with empty decoder/encoder caches."""
    for c in U._meta_caches.values():
        c.clear()
    U._prefixes.clear()
    U._bridge_names.clear()
    yield


# ------------------------------------------------------------ round trips

@pytest.mark.parametrize("u", [
    bridge(),
    bridge(output_port=2),
    bridge(output_port=0xFFFFFFFF, input_port=0xFFFFFFFE),
    bridge(frame=FRAME[:20], orig_len=1500),
    bridge(frame=b"", orig_len=0),
    bridge(tunnel=V4),
    bridge(tunnel=V6, probability=1),
    bridge(tunnel=Tunnel(b"\1\2\3\4", b"\5\6\7\10")),
    bridge(bridge="brü-ñ"),
    flow(),
    flow(direction=0, output_port=None),
    flow(direction=2, probability=65535, tunnel=V6),
    flow(frame=FRAME[:33], orig_len=9000, obs_point_id=2**32 - 1),
])
def test_round_trip(u):
    d = encode([u])
    assert decode(d) == ([u], 0)
    # A second decode takes the cached-metadata fast path.
    assert decode(d) == ([u], 0)
    assert decode(bytearray(d)) == ([u], 0)
    assert decode(memoryview(d)) == ([u], 0)


def test_every_padding_and_mixed_kinds():
    ups = []
    for n in range(0, 9):
        ups.append(bridge(frame=FRAME[:n], orig_len=n + (n % 2) * 100))
        ups.append(flow(frame=FRAME[:n], orig_len=n))
    d = encode(ups)
    assert len(d) % 4 == 0
    assert decode(d) == (ups, 0)
    assert decode(d) == (ups, 0)


def test_orig_len_absent_when_not_truncated():
    d = encode([bridge()])
    assert struct.pack("!HH", 8, U.A_ORIG_LEN) not in d
    d = encode([bridge(frame=FRAME[:16], orig_len=64)])
    assert struct.pack("!HHI", 8, U.A_ORIG_LEN, 64) in d


def test_encoder_puts_frame_first_then_orig_len():
    d = encode([bridge(frame=FRAME[:16], orig_len=64)])
    alen, atype = struct.unpack_from("!HH", d, 20)
    assert (alen, atype) == (20, U.A_FRAME)
    assert struct.unpack_from("!HHI", d, 40) == (8, U.A_ORIG_LEN, 64)


@settings(max_examples=200, deadline=None)
@given(st.lists(upcalls(), max_size=20))
def test_round_trip_property(ups):
    d = encode(ups)
    assert decode(d) == (ups, 0)
    assert decode(d) == (ups, 0)


# --------------------------------------------------------------- batching

def test_pack_batches_fills_datagrams_in_order():
    ups = [bridge(input_port=i, frame=FRAME[:i % 60]) for i in range(5000)]
    dgs = list(pack_batches(ups, max_size=4000))
    assert all(len(d) <= 4000 for d in dgs)
    # Full: the next upcall would not have fit.
    for d in dgs[:-1]:
        assert len(d) > 4000 - 120
    out = []
    for d in dgs:
        got, errors = decode(d)
        assert errors == 0
        out += got
    assert out == ups


def test_pack_batches_default_size():
    ups = [bridge()] * 3000
    dgs = list(pack_batches(ups))
    assert all(len(d) <= 65000 for d in dgs)
    assert sum(len(decode(d)[0]) for d in dgs) == 3000


def test_pack_batches_rejects_what_cannot_fit():
    big = bridge(frame=b"x" * 2000)
    gen = pack_batches([bridge(), big], max_size=1000)
    first = next(gen)  # what came before is delivered
    assert decode(first) == ([bridge()], 0)
    with pytest.raises(ValueError, match="does not fit"):
        next(gen)
    with pytest.raises(ValueError, match="max_size"):
        list(pack_batches([bridge()], max_size=10))
    assert list(pack_batches([])) == []


def test_encode_refuses_oversized_datagram():
    with pytest.raises(ValueError, match="one datagram"):
        encode([bridge(frame=b"x" * 60000)] * 5)


@pytest.mark.parametrize("u, message", [
    (bridge(probability=0), "probability"),
    (bridge(probability=2**32), "probability"),
    (flow(probability=65536), "probability"),
    (bridge(bridge=""), "bridge name"),
    (bridge(bridge="a\0b"), "bridge name"),
    (bridge(input_port=-1), "input_port"),
    (bridge(output_port=2**32), "output_port"),
    (bridge(orig_len=3), "orig_len"),
    (bridge(frame=b"x" * 70000, orig_len=70000), "truncate"),
    (flow(direction=3), "direction"),
    (flow(collector_set_id=None), "collector_set_id"),
    (bridge(tunnel=Tunnel(b"\1\2\3\4", bytes(16))), "tunnel addresses"),
    (bridge(tunnel=Tunnel(b"\1\2\3\4", b"\1\2\3\4", 70000)), "src_port"),
    (("br0", 1), "not a BridgeSample"),
])
def test_encode_rejects_bad_values(u, message):
    with pytest.raises(ValueError, match=message):
        encode([u])


# -------------------------------------------------- decoding bad input

def test_bad_header_drops_datagram():
    good = encode([bridge()])
    for bad in (b"", b"OIPX", good[:11],
                struct.pack("!I", 0xDEADBEEF) + good[4:],
                good[:4] + b"\x02" + good[5:],
                good[:8] + struct.pack("!I", 4) + good[12:]):
        problems = []
        assert decode(bad, problems) == ([], 1)
        assert len(problems) == 1
        assert isinstance(problems[0], MalformedUpcall)
        assert problems[0].index is None
    problems = []
    decode(struct.pack("!I", 0xDEADBEEF) + good[4:], problems)
    assert "bad magic 0xdeadbeef" in str(problems[0])
    problems = []
    decode(good[:4] + b"\x02" + good[5:], problems)
    assert "unsupported version 2" in str(problems[0])


def test_malformed_upcall_is_skipped_and_counted():
    a = raw_upcall(1, *minimal_bridge_attrs())
    no_bridge = raw_upcall(1, *minimal_bridge_attrs()[1:])
    bad_size = raw_upcall(1, attr(U.A_INPUT_PORT, b"\0\0"),
                          *minimal_bridge_attrs())
    zero_prob = raw_upcall(1, attr(U.A_BRIDGE, b"br0"),
                           u32(U.A_INPUT_PORT, 5), u32(U.A_PROBABILITY, 0),
                           attr(U.A_FRAME, b"x"))
    unknown_kind = raw_upcall(9, *minimal_bridge_attrs())
    overrun = raw_upcall(1, struct.pack("!HH", 200, U.A_FRAME) + b"abcd")
    not_utf8 = raw_upcall(1, attr(U.A_BRIDGE, b"\xff\xfe"),
                          *minimal_bridge_attrs()[1:])
    short_orig = raw_upcall(1, *minimal_bridge_attrs(),
                            u32(U.A_ORIG_LEN, 1))
    flow_big_prob = raw_upcall(
        2, attr(U.A_BRIDGE, b"br0"), u32(U.A_INPUT_PORT, 5),
        u32(U.A_PROBABILITY, 70000), attr(U.A_FRAME, b"x"),
        u32(U.A_COLLECTOR_SET_ID, 1), u32(U.A_OBS_DOMAIN_ID, 1),
        u32(U.A_OBS_POINT_ID, 1))
    bad_tunnel = raw_upcall(1, *minimal_bridge_attrs(),
                            attr(U.A_TUNNEL, attr(U.T_IPV4_SRC, b"\1\2\3\4")))
    bads = [(no_bridge, "missing BRIDGE"), (bad_size, "INPUT_PORT has "
                                            "length 6"),
            (zero_prob, "PROBABILITY is 0"),
            (unknown_kind, "unknown upcall kind 9"),
            (overrun, "overruns the upcall"),
            (not_utf8, "not UTF-8"),
            (short_orig, "ORIG_LEN 1 is less"),
            (flow_big_prob, "exceeds 65535"),
            (bad_tunnel, "TUNNEL needs")]
    for bad, message in bads:
        problems = []
        d = raw_datagram(a, bad, a)
        got, errors = decode(d, problems)
        assert errors == 1, message
        assert len(got) == 2
        assert got[0] == got[1] == BridgeSample("br0", 5, None, 1,
                                                b"\1\2\3", 3, None)
        assert [p.index for p in problems] == [1]
        assert message in str(problems[0]), (message, problems[0])
        assert str(problems[0]).startswith("upcall 1 at offset ")
        # Same verdict once the metadata cache is warm.
        assert decode(d) == (got, 1)


def test_broken_framing_stops_and_counts_the_rest():
    a = raw_upcall(1, *minimal_bridge_attrs())
    for bad_len in (4, 13, 10_000):
        broken = raw_upcall(1, *minimal_bridge_attrs(), length=bad_len)
        problems = []
        got, errors = decode(raw_datagram(a, broken, a, a), problems)
        assert len(got) == 1
        assert errors == 3  # upcalls 1, 2, 3 announced but not decoded
        assert "broken framing" in str(problems[0])


def test_truncated_datagram_keeps_complete_upcalls():
    ups = [bridge(input_port=i) for i in range(5)]
    d = encode(ups)
    sizes = [len(encode(ups[:i])) for i in range(6)]
    for cut in range(0, len(d)):
        got, errors = decode(d[:cut])
        if cut < 12:
            assert (got, errors) == ([], 1)
            continue
        complete = max(i for i in range(6) if sizes[i] <= cut)
        assert got == ups[:complete], cut
        assert errors == 5 - complete, cut


def test_trailing_bytes_and_count_mismatch():
    a = raw_upcall(1, *minimal_bridge_attrs())
    got, errors = decode(raw_datagram(a) + b"\0" * 8)
    assert (len(got), errors) == (1, 1)
    got, errors = decode(raw_datagram(a, a, count=1))
    assert (len(got), errors) == (2, 1)
    got, errors = decode(raw_datagram(a, count=3))
    assert (len(got), errors) == (1, 2)
    assert decode(raw_datagram()) == ([], 0)


def test_unknown_attributes_skipped_anywhere():
    extra = attr(999, b"future")
    attrs = minimal_bridge_attrs()
    expect = BridgeSample("br0", 5, None, 1, b"\1\2\3", 3, None)
    # Unknown first (generic path), in the metadata (fast path), last.
    for up in (raw_upcall(1, extra, *attrs),
               raw_upcall(1, attrs[3], extra, *attrs[:3]),
               raw_upcall(1, *attrs, extra),
               # A flow-only attribute in a bridge sample is unknown there.
               raw_upcall(1, *attrs, u32(U.A_COLLECTOR_SET_ID, 1)),
               # Unknown nested tunnel attribute.
               raw_upcall(1, *attrs, attr(U.A_TUNNEL, attr(
                   U.T_IPV4_SRC, b"\1\1\1\1") + attr(U.T_IPV4_DST,
                                                     b"\2\2\2\2") +
                   attr(99, b"x")))):
        for _ in range(2):
            got, errors = decode(raw_datagram(up, up))
            assert errors == 0
            assert len(got) == 2
            if got[0].tunnel is not None:
                assert got[0].tunnel == Tunnel(b"\1\1\1\1", b"\2\2\2\2")
                got = [g._replace(tunnel=None) for g in got]
            assert got == [expect, expect]


def test_any_attribute_order_and_last_duplicate_wins():
    attrs = minimal_bridge_attrs()
    rev = raw_upcall(1, *reversed(attrs))
    assert decode(raw_datagram(rev))[0] == [
        BridgeSample("br0", 5, None, 1, b"\1\2\3", 3, None)]
    # A second FRAME after the metadata wins, on the fast path too:
    # such metadata is never cached.
    dup = raw_upcall(1, attr(U.A_FRAME, b"first"), *attrs[:3],
                     attr(U.A_FRAME, b"last"))
    for _ in range(3):
        got, errors = decode(raw_datagram(dup, dup))
        assert errors == 0
        assert [g.frame for g in got] == [b"last", b"last"]
        assert [g.orig_len for g in got] == [4, 4]
    dup_orig = raw_upcall(1, attr(U.A_FRAME, b"abc"), u32(U.A_ORIG_LEN, 10),
                          *attrs[:3], u32(U.A_ORIG_LEN, 99))
    for _ in range(3):
        got, _ = decode(raw_datagram(dup_orig))
        assert got[0].orig_len == 99


def test_fast_path_matches_generic_path():
    ups = [bridge(frame=FRAME[:i], orig_len=i + (i % 3) * 10,
                  output_port=i % 2 or None, tunnel=(None, V4, V6)[i % 3])
           for i in range(40)]
    ups += [flow(frame=FRAME[:i], tunnel=(None, V6)[i % 2],
                 direction=i % 3) for i in range(40)]
    d = encode(ups)
    cold = decode(d)
    warm = decode(d)
    assert cold == warm == (ups, 0)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.booleans())
def test_decode_never_raises_on_garbage(data, with_header):
    if with_header:
        data = struct.pack("!IBBHI", U.MAGIC, 1, 0, 3, 12 + len(data)) + data
    got, errors = decode(data)
    assert isinstance(got, list)
    # Bad magic, or fewer/more upcalls than the 3 announced: counted.
    assert len(got) + errors >= 1
    for g in got:
        assert g.probability >= 1 and g.orig_len >= len(g.frame)


def test_decode_survives_non_bytes():
    problems = []
    assert decode(None, problems) == ([], 1)
    assert "decoder failure" in str(problems[0])


@settings(max_examples=300, deadline=None)
@given(st.lists(upcalls(), min_size=1, max_size=5),
       st.integers(0, 10_000), st.binary(min_size=1, max_size=4))
def test_decode_never_raises_on_corruption(ups, where, junk):
    d = bytearray(encode(ups))
    where %= len(d)
    d[where:where + len(junk)] = junk
    got, errors = decode(bytes(d))
    assert isinstance(got, list)
    assert len(got) + errors >= 1
    for g in got:
        assert isinstance(g, (BridgeSample, FlowSample))
        assert g.probability >= 1
        assert g.orig_len >= len(g.frame)


def test_malformed_upcall_is_a_value_error():
    e = MalformedUpcall("missing FRAME", 3, 40)
    assert isinstance(e, ValueError)
    assert str(e) == "upcall 3 at offset 40: missing FRAME"
    assert (e.index, e.offset) == (3, 40)


def test_batcher_and_frame_batcher_build_the_same_datagrams():
    fr = [(FRAME[:i % 55], i % 55 + (i % 4) * 7) for i in range(3000)]
    for template in (bridge(output_port=2, tunnel=V4),
                     flow(direction=2, tunnel=V6)):
        b = U.Batcher(5000)
        fb = U.FrameBatcher(template, 5000)
        assert len(b) == len(fb) == 0
        out_b, out_fb = [], []
        for frame, orig in fr:
            u = template._replace(frame=frame, orig_len=orig)
            for out, d in ((out_b, b.add(u)), (out_fb, fb.add(frame, orig))):
                if d is not None:
                    out.append(d)
        assert len(b) == len(fb) > 0
        out_b.append(b.flush())
        out_fb.append(fb.flush())
        assert b.flush() is fb.flush() is None
        assert out_b == out_fb
        assert out_b == list(pack_batches(
            [template._replace(frame=f, orig_len=o) for f, o in fr], 5000))


def test_frame_batcher_rejects_bad_frames():
    fb = U.FrameBatcher(bridge(), 1000)
    with pytest.raises(ValueError, match="orig_len"):
        fb.add(b"abc", 2)
    with pytest.raises(ValueError, match="does not fit"):
        fb.add(b"x" * 2000, 2000)
    with pytest.raises(ValueError, match="exceeds"):
        U.FrameBatcher(bridge(), U.MAX_DATAGRAM_SIZE).add(b"x" * 70000,
                                                          70000)
    with pytest.raises(ValueError, match="probability"):
        U.FrameBatcher(bridge(probability=0))
    assert len(fb) == 0
