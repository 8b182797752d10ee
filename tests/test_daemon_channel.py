"""The daemon's channel end to end: thousands of malformed datagrams
between valid ones (built with ``upcall.encode`` and damaged by hand, the
expected outcome read from the rules of ``schemas/channel.md``), and
samples for bridges or collector sets nobody exports.  Harness in
``test_daemon``."""

import collections
import random
import struct

import pytest
from support.daemon import (
    REASON_FORCED_END,
    UINT32_MAX,
    Env,
    assert_flows_exact,
    bridge_ipfix,
    flush_and_collect,
    replay_ok,
    sample,
)
from support.decoders import judge_collector, parse_collector
from traffic import traffic_mix, truth_of

from ovs_ipfix_py import upcall


@pytest.fixture
def env(ovsdb):
    with Env(ovsdb) as e:
        yield e


# ---------------------------------------------------------------------
# Malformed datagrams interleaved with valid traffic

HDR = struct.Struct("!IBBHI")     # magic, version, flags, count, length
UPCALL_HDR = struct.Struct("!IHH")  # length, kind, reserved
ATTR_HDR = struct.Struct("!HH")   # len, type


def split_upcalls(datagram):
    """The upcalls of a well-formed datagram, as the bytes of each
    (framing read from schemas/channel.md, not from the decoder)."""
    out = []
    off = HDR.size
    while off < len(datagram):
        (length,) = struct.unpack_from("!I", datagram, off)
        out.append(datagram[off:off + length])
        off += length
    return out


def frame_datagram(upcalls, count=None, length=None):
    """A datagram header (count and length right unless given) and the
    upcalls' bytes."""
    body = b"".join(upcalls)
    if count is None:
        count = len(upcalls)
    if length is None:
        length = HDR.size + len(body)
    return HDR.pack(upcall.MAGIC, upcall.VERSION, 0, count,
                    length) + body


def tlv(atype, value):
    return (ATTR_HDR.pack(4 + len(value), atype) + value
            + bytes(-len(value) % 4))


def raw_upcall(kind, *attrs, length=None):
    body = b"".join(attrs)
    if length is None:
        length = UPCALL_HDR.size + len(body)
    return UPCALL_HDR.pack(length, kind, 0) + body


def bridge_attrs(frame, bridge=b"br0", probability=UINT32_MAX):
    """FRAME, BRIDGE, INPUT_PORT, PROBABILITY of a bridge sample."""
    return [tlv(upcall.A_FRAME, frame), tlv(upcall.A_BRIDGE, bridge),
            tlv(upcall.A_INPUT_PORT, struct.pack("!I", 1)),
            tlv(upcall.A_PROBABILITY, struct.pack("!I", probability))]


class MalformedStream:
    """Builds datagrams from a pool of frames: valid ones, damaged ones
    and garbage.  Tracks, by the rules of schemas/channel.md, what the
    daemon must keep (``delivered`` frames) and count (``malformed``
    datagrams, ``lost`` upcalls; ``datagrams`` to send, in order)."""

    def __init__(self, frames, seed):
        self.rng = random.Random(seed)
        self.pool = collections.deque(frames)
        self.delivered = []
        self.datagrams = []
        self.malformed = 0
        self.lost = 0
        self.kinds = collections.Counter()

    def _take(self, k):
        k = min(k, len(self.pool))
        return [self.pool.popleft() for _ in range(k)]

    def _put_back(self, frames):
        self.pool.extend(frames)

    def _emit(self, kind, datagram, delivered=(), errors=0):
        self.datagrams.append(datagram)
        self.delivered.extend(delivered)
        self.kinds[kind] += 1
        if errors:
            self.malformed += 1
            self.lost += errors

    # -- datagrams that carry frames ---------------------------------

    def valid(self):
        chunk = self._take(self.rng.randint(1, 8))
        self._emit("valid", upcall.encode([sample(f) for f in chunk]),
                   chunk)

    def unknown_attributes(self):
        """Unknown attribute types before FRAME, in the metadata and
        last: skipped, the samples kept, nothing counted."""
        chunk = self._take(self.rng.randint(1, 6))
        ups = []
        for f in chunk:
            attrs = bridge_attrs(f)
            extra = tlv(self.rng.randint(100, 0xFFFF),
                        self.rng.randbytes(self.rng.randint(0, 9)))
            where = self.rng.choice((0, 2, 4))
            attrs.insert(where, extra)
            ups.append(raw_upcall(upcall.KIND_BRIDGE_SAMPLE, *attrs))
        self._emit("unknown attributes", frame_datagram(ups), chunk)

    def truncated(self):
        """A datagram cut inside upcall j (header left as sent): the
        upcalls before j are kept, the rest counted lost."""
        chunk = self._take(self.rng.randint(1, 6))
        d = upcall.encode([sample(f) for f in chunk])
        ups = split_upcalls(d)
        j = self.rng.randrange(len(ups))
        start = HDR.size + sum(len(u) for u in ups[:j])
        cut = self.rng.randrange(start, start + len(ups[j]))
        self._emit("truncated", d[:cut], chunk[:j], len(ups) - j)
        self._put_back(chunk[j:])

    def broken_framing(self):
        """Upcall j's length is past the end, below 8 or not a multiple
        of 4: decoding stops there; the rest announced are lost."""
        chunk = self._take(self.rng.randint(1, 6))
        ups = split_upcalls(upcall.encode([sample(f) for f in chunk]))
        j = self.rng.randrange(len(ups))
        bad = self.rng.choice((0x7FFFFFFC, len(ups[j]) + 1, 4, 0))
        ups[j] = struct.pack("!I", bad) + ups[j][4:]
        self._emit("broken framing", frame_datagram(ups), chunk[:j],
                   len(ups) - j)
        self._put_back(chunk[j:])

    def bad_upcall(self):
        """One upcall malformed inside (unknown kind, attribute overrun,
        required attribute missing, probability 0, bad BRIDGE, fixed
        size of the wrong length): only it is lost."""
        chunk = self._take(self.rng.randint(2, 6))
        ups = split_upcalls(upcall.encode([sample(f) for f in chunk]))
        j = self.rng.randrange(len(ups))
        attrs = bridge_attrs(chunk[j])
        how = self.rng.randrange(6)
        if how == 0:
            ups[j] = raw_upcall(77, *attrs)
        elif how == 1:
            over = ATTR_HDR.pack(200, 999) + bytes(8)
            ups[j] = raw_upcall(upcall.KIND_BRIDGE_SAMPLE, *attrs, over)
        elif how == 2:
            del attrs[self.rng.randrange(len(attrs))]
            ups[j] = raw_upcall(upcall.KIND_BRIDGE_SAMPLE, *attrs)
        elif how == 3:
            ups[j] = raw_upcall(upcall.KIND_BRIDGE_SAMPLE,
                                *bridge_attrs(chunk[j], probability=0))
        elif how == 4:
            ups[j] = raw_upcall(upcall.KIND_BRIDGE_SAMPLE,
                                *bridge_attrs(chunk[j], bridge=b"\xff\xfe"))
        else:
            attrs[2] = tlv(upcall.A_INPUT_PORT, b"\0\0\0\0\0\0")
            ups[j] = raw_upcall(upcall.KIND_BRIDGE_SAMPLE, *attrs)
        self._emit("bad upcall", frame_datagram(ups),
                   chunk[:j] + chunk[j + 1:], 1)
        self._put_back([chunk[j]])

    def inconsistent_header(self):
        """Bytes past the header's length, or a count that disagrees:
        the upcalls are kept, the datagram counted."""
        chunk = self._take(self.rng.randint(1, 6))
        ups = split_upcalls(upcall.encode([sample(f) for f in chunk]))
        how = self.rng.randrange(3)
        if how == 0:
            d = frame_datagram(ups) + self.rng.randbytes(
                self.rng.randint(1, 40))
            self._emit("trailing bytes", d, chunk, 1)
        elif how == 1:
            d = frame_datagram(ups, count=len(ups) + 3)
            self._emit("count too high", d, chunk, 3)
        else:
            d = frame_datagram(ups, count=len(ups) - 1)
            self._emit("count too low", d, chunk, 1)

    def oversized(self):
        """A datagram longer than the channel reads (MAX_DATAGRAM_SIZE):
        it arrives cut there; the upcalls wholly inside are kept."""
        ups, chunk = [], []
        size = HDR.size
        while size <= upcall.MAX_DATAGRAM_SIZE + 20000:
            if not self.pool:
                break
            f = self.pool.popleft()
            u = split_upcalls(upcall.encode([sample(f)]))[0]
            ups.append(u)
            chunk.append(f)
            size += len(u)
        kept = 0
        end = HDR.size
        for u in ups:
            if end + len(u) > upcall.MAX_DATAGRAM_SIZE:
                break
            end += len(u)
            kept += 1
        assert kept < len(ups)
        self._emit("oversized", frame_datagram(ups), chunk[:kept],
                   len(ups) - kept)
        self._put_back(chunk[kept:])

    # -- datagrams that carry nothing -------------------------------

    def garbage(self):
        rng = self.rng
        valid = upcall.encode([sample(b"\x02" * 60)])
        how = rng.randrange(6)
        if how == 0:
            d = rng.randbytes(rng.randint(0, 300))
            if d[:4] == struct.pack("!I", upcall.MAGIC):
                d = b"\0" + d
            self._emit("random bytes", d, (), 1)
        elif how == 1:
            magic = rng.choice((0, 0x4F495059, 0x58504F49, UINT32_MAX))
            self._emit("bad magic", struct.pack("!I", magic) + valid[4:],
                       (), 1)
        elif how == 2:
            self._emit("bad version", valid[:4] + bytes(
                [rng.choice((0, 2, 255))]) + valid[5:], (), 1)
        elif how == 3:
            self._emit("header length below 12", valid[:8] + struct.pack(
                "!I", rng.randrange(12)) + valid[12:], (), 1)
        elif how == 4:
            self._emit("short", valid[:rng.randrange(12)], (), 1)
        else:
            # A valid header announcing 3 upcalls, then random bytes
            # whose first upcall length cannot frame one: 3 lost.
            body = rng.randbytes(rng.randint(8, 64))
            framing = rng.choice((rng.randrange(8), 4 * len(body) + 4,
                                  rng.randrange(8, 1 << 16) | 1))
            d = frame_datagram([struct.pack("!I", framing) + body[4:]],
                               count=3)
            self._emit("random upcalls", d, (), 3)

    def build(self, rounds, garbage_per_round):
        carriers = (self.valid, self.valid, self.unknown_attributes,
                    self.truncated, self.broken_framing, self.bad_upcall,
                    self.inconsistent_header)
        for r in range(rounds):
            for _ in range(garbage_per_round):
                self.garbage()
            if r == 0:
                self.oversized()
            if self.pool:
                self.rng.choice(carriers)()
        while self.pool:
            self.valid()


def test_malformed_datagrams_interleaved_with_valid_traffic(env,
                                                           tmp_path):
    """Thousands of malformed datagrams between valid ones: the daemon
    stays up, keeps exactly the samples the channel format says it keeps
    (valid flows exact), and ipfix/show counts what was lost."""
    collector = env.collector()
    bridge_ipfix(env.ovsdb, "br0", collector, sampling=1)
    exporter = env.exporter()
    exporter.wait_show(lambda s: ("br0", None) in s.exporters,
                       "the br0 exporter")
    frames, _ = traffic_mix(seed=31)
    # Enough frames for the oversized datagram too; counts aggregate.
    stream = MalformedStream(frames * 8, seed=5)
    stream.build(rounds=600, garbage_per_round=5)
    assert stream.malformed >= 3000
    for d in stream.datagrams:
        exporter.send(d)
    show = exporter.wait_show(
        lambda s: s.channel["datagrams"] >= len(stream.datagrams),
        "every datagram", 30.0)
    assert exporter.alive()
    ch = show.channel
    assert ch["datagrams"] == len(stream.datagrams)
    assert ch["malformed_datagrams"] == stream.malformed, stream.kinds
    assert ch["malformed_upcalls"] == stream.lost, stream.kinds
    assert ch["upcalls"] == len(stream.delivered)
    br0 = show.exporters[("br0", None)]
    assert br0["pkts"] == len(stream.delivered)
    assert ch["no_exporter"] == 0

    # Logged with a rate limit, not once per datagram.
    warnings = exporter.log_text().count("malformed datagram")
    assert 1 <= warnings <= 40, warnings

    flush_and_collect(exporter, [collector])
    judged = judge_collector(collector, tmp_path)
    assert judged.problems == []
    assert_flows_exact(judged.tshark.records, truth_of(stream.delivered),
                       REASON_FORCED_END)
    assert exporter.alive()


def test_header_length_beyond_the_datagram_is_counted(env):
    """A datagram whose header claims more bytes than arrived, though
    every upcall it announces is there, contradicts its own header:
    counted as malformed (its complete upcalls are kept, as for any
    truncated datagram)."""
    collector = env.collector()
    bridge_ipfix(env.ovsdb, "br0", collector, sampling=1)
    exporter = env.exporter()
    exporter.wait_show(lambda s: ("br0", None) in s.exporters,
                       "the br0 exporter")
    frames, _ = traffic_mix(seed=32)
    ups = split_upcalls(upcall.encode([sample(f) for f in frames[:3]]))
    exact = frame_datagram(ups)
    exporter.send(frame_datagram(ups, length=len(exact) + 64))
    show = exporter.wait_show(lambda s: s.channel["datagrams"] >= 1,
                              "the datagram")
    assert show.channel["upcalls"] == 3
    assert show.channel["malformed_datagrams"] == 1, show.text


# ---------------------------------------------------------------------
# Samples nobody exports


def test_samples_without_exporter_are_counted_and_dropped(env):
    """Samples for a bridge without IPFIX, an unknown bridge, a collector
    set that does not exist, has no IPFIX row or an IPFIX row with no
    target: counted as "no exporter", dropped, and nothing reaches the
    configured exporter."""
    collector = env.collector()
    bridge_ipfix(env.ovsdb, "br0", collector, sampling=1)
    # Collector set 8 has no IPFIX row; 9's has no target (disabled).
    env.ovsdb.vsctl("add-br", "br1", "--", "--id=@br", "get", "Bridge",
                    "br0", "--", "create", "Flow_Sample_Collector_Set",
                    "id=8", "bridge=@br", "--", "--id=@i", "create",
                    "IPFIX", "cache_max_flows=10", "--", "create",
                    "Flow_Sample_Collector_Set", "id=9", "bridge=@br",
                    "ipfix=@i")
    exporter = env.exporter()
    exporter.wait_show(lambda s: list(s.exporters) == [("br0", None)],
                       "the br0 exporter only")
    frames, _ = traffic_mix(seed=51, flows_per_kind=1)
    pcap = env.pcap("mix.pcap", frames)
    replay_ok(exporter, pcap, "--bridge=br1")            # no Bridge.ipfix
    replay_ok(exporter, pcap, "--bridge=nosuch")         # no bridge at all
    replay_ok(exporter, pcap, "--bridge=br0", "--collector-set=7")
    replay_ok(exporter, pcap, "--bridge=br0", "--collector-set=8")
    replay_ok(exporter, pcap, "--bridge=br0", "--collector-set=9")
    n = 5 * len(frames)
    show = exporter.wait_show(lambda s: s.channel["no_exporter"] >= n,
                              "samples counted as no exporter")
    assert show.channel["no_exporter"] == n
    assert show.channel["upcalls"] == n
    assert show.channel["malformed_upcalls"] == 0
    br0 = show.exporters[("br0", None)]
    assert (br0["pkts"], br0["flows"], br0["cache"]) == (0, 0, 0)
    assert exporter.appctl("ipfix/flush").strip() == "flushed 0 flows"
    collector.receive(0.3)
    assert parse_collector(collector).records == []
    assert exporter.alive()
