"""Part 1 of tools/bench: the exporter's core in this process, one core.

What is measured, all through the public API of ``ovs_ipfix_py``:

- samples/s through parse + cache: ``Exporter.sample_batch`` (the
  daemon's hot path) fed ``upcall.BridgeSample`` values in batches of
  :data:`BATCH`: first the realistic mix (``tests/traffic.py:
  mixed_flows``: every frame kind, heavy-tailed flow sizes, 100k flows,
  1M packets) on the C path and on the pure-Python one, then plain IPv4
  at several numbers of distinct flows;
- the same with encode: the stream, then ``Exporter.flush`` building
  IPFIX messages and sending them to a real loopback UDP socket;
- the channel's decode in front of it: ``upcall.decode`` of datagrams
  made by ``upcall.pack_batches``, then the same batch call;
- bytes of memory per cached flow (tracemalloc and RSS deltas around
  filling a fresh exporter, in a child process of its own);
- the time to expire 10k flows from a cache of 10k and of 1M flows
  (``FlowCache.expire`` alone, and ``Exporter.run`` exporting them), by
  active timeout and by idle timeout.

Frames come from ``tests/traffic.py:many_flows`` (Ethernet/IPv4, TCP and
UDP alternating, 64..1500 bytes, whole frames).  One BridgeSample value
per flow is built before the clock starts; each batch is copied afresh
(untimed) just before its call, as the channel's decoder would make it.
Making samples is the channel's work, measured in its own row.

Times: ``time.perf_counter`` (wall, s) on an otherwise idle process; the
garbage collector stays on, tuned as in the daemon (``daemon.tune_gc``).
"""

from __future__ import annotations

import gc
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
import tracemalloc
from typing import Dict, List, NamedTuple, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from ovs_ipfix_py import daemon, fastpath, flowcache, upcall  # noqa: E402
from ovs_ipfix_py.exporter import Exporter  # noqa: E402
from ovs_ipfix_py.options import (  # noqa: E402
    UINT32_MAX,
    BridgeExporterOptions,
    CacheOptions,
    ExportOptions,
)
from tests.traffic import many_flows, mixed_flows, traffic_mix  # noqa: E402,E501

#: Samples per sample_batch call (the daemon hands over what one
#: run of the channel read: up to 256 datagrams of ~80 upcalls each).
BATCH = 1024
#: Consecutive samples of one flow in the "bursts" stream.
BURST = 8
#: Active timeout (s) long enough that nothing expires while measuring.
LONG_TIMEOUT = 3600
T0 = 1_700_000_000.0
SAMPLING_ONE = UINT32_MAX  # probability of sampling=1
SEED = 1


class Sizes(NamedTuple):
    """What part 1 runs at (full or --quick)."""

    flows: Sequence[int]     # distinct flows of the throughput rows
    picks: int               # uniform picks after the first pass
    decode_flows: int        # flows of the decode row
    memory_flows: int        # cache size of the memory row
    expire_n: int            # flows expired at once
    expire_big: int          # the big cache of the expiry rows
    expire_reps: int         # expirations timed per cache size
    mix_per_kind: int        # traffic_mix flows of each kind (mix row)
    mixed: tuple             # (flows, packets) of the realistic mix


FULL = Sizes((1_000, 100_000, 1_000_000), 1_000_000, 100_000, 1_000_000,
             10_000, 1_000_000, 5, 300, (100_000, 1_000_000))
QUICK = Sizes((1_000, 5_000, 20_000), 20_000, 5_000, 20_000,
              1_000, 20_000, 3, 10, (2_000, 20_000))


def label(n: int) -> str:
    """1000 -> '1k', 1000000 -> '1M'."""
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return "%dM" % (n // 1_000_000)
    if n >= 1_000 and n % 1_000 == 0:
        return "%dk" % (n // 1_000)
    return str(n)


def make_samples(n_flows: int, seed: int = SEED) -> List:
    """One ingress BridgeSample (sampling 1) per distinct flow."""
    mk = upcall.BridgeSample
    return [mk("br0", 1, None, SAMPLING_ONE, f, len(f))
            for f in many_flows(n_flows, n_flows, seed)]


def mixed_stream(n_flows: int, n_packets: int, seed: int = SEED):
    """(one BridgeSample per flow, the stream of n_packets samples) of
    tests/traffic.py:mixed_flows; the stream repeats the flows'
    samples."""
    made: Dict[int, upcall.BridgeSample] = {}
    stream = []
    mk = upcall.BridgeSample
    for item in mixed_flows(n_flows, n_packets, seed):
        s = made.get(id(item))
        if s is None:
            s = made[id(item)] = mk("br0", 1, None, SAMPLING_ONE, item[0],
                                    item[1])
        stream.append(s)
    return list(made.values()), stream


def uniform_stream(samples: Sequence, picks: int,
                   seed: int = SEED) -> List:
    """Every flow once in a shuffled order (new flows), then ``picks``
    flows drawn uniformly at random (with replacement)."""
    rng = random.Random(seed)
    n = len(samples)
    order = list(samples)
    rng.shuffle(order)
    pick = rng.random
    order += [samples[int(pick() * n)] for _ in range(picks)]
    return order


def burst_stream(samples: Sequence, total: int, burst: int = BURST,
                 seed: int = SEED) -> List:
    """Rounds of every flow in a shuffled order, each flow as ``burst``
    consecutive samples, until at least ``total`` samples (and at least
    one round, so every flow is hit)."""
    rng = random.Random(seed + 1)
    out: List = []
    flows = list(samples)
    while True:
        rng.shuffle(flows)
        for s in flows:
            out += (s,) * burst
        if len(out) >= total:
            return out


class Loopback:
    """A UDP socket on 127.0.0.1 standing for the collector; it is read
    (drained) only between measurements."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET,
                                 getattr(socket, "SO_RCVBUFFORCE", 33),
                                 64 << 20)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF,
                                 64 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.target = "127.0.0.1:%d" % self.sock.getsockname()[1]

    def drain(self) -> int:
        n = 0
        while True:
            try:
                self.sock.recv(65535)
            except BlockingIOError:
                return n
            n += 1

    def close(self):
        self.sock.close()


def new_exporter(target: str, max_flows: int,
                 active_timeout: int = LONG_TIMEOUT,
                 now: float = T0, idle_timeout: int = 0) -> Exporter:
    opts = BridgeExporterOptions(
        "br0", ExportOptions((target,), CacheOptions(
            active_timeout, max_flows, idle_timeout=idle_timeout)),
        sampling=1)
    return Exporter(opts, now)


def fresh(samples: Sequence) -> List:
    """New copies of ``samples``, frames included, next to each other in
    memory, as upcall.decode hands them over (it slices every frame out
    of its datagram).  Reusing the pool's objects instead would make
    each sample a cache miss to a random place: a cost the daemon does
    not have."""
    mk = upcall.BridgeSample
    return [mk(s[0], s[1], s[2], s[3], bytes(memoryview(s[4])), s[5])
            for s in samples]


def feed(exp: Exporter, stream: Sequence, now: float = T0) -> float:
    """Push ``stream`` through sample_batch, BATCH samples per
    call, each batch freshly copied (untimed) before its call; returns
    the seconds spent in the calls.  ``now`` advances 1 us per sample,
    as a real clock would."""
    batch = exp.sample_batch
    clock = time.perf_counter
    took = 0.0
    for i in range(0, len(stream), BATCH):
        part = fresh(stream[i:i + BATCH])
        t = clock()
        batch(part, now + i * 1e-6)
        took += clock() - t
    return took


def _check(exp: Exporter, stream_len: int, flows: Optional[int]) -> None:
    st = exp.stats
    if st.pkts != stream_len or (flows is not None
                                 and len(exp.cache) != flows):
        raise RuntimeError(
            "exporter counted %d samples and caches %d flows; expected "
            "%d and %d" % (st.pkts, len(exp.cache), stream_len, flows))


def throughput(samples: Sequence, stream: Sequence, sink: Loopback,
               encode: bool, flows: Optional[int] = -1) -> Dict:
    """One run on a fresh exporter: seconds for the stream (and, with
    ``encode``, for the flush that follows).  ``flows``: how many the
    cache must hold after it (-1: one per sample; None: not checked)."""
    exp = new_exporter(sink.target, 2 * len(samples))
    gc.collect()
    ingest = feed(exp, stream)
    _check(exp, len(stream), len(samples) if flows == -1 else flows)
    out = {"ingest_s": ingest, "flush_s": 0.0, "records": 0}
    if encode:
        t = time.perf_counter()
        n = exp.flush(T0 + len(stream) * 1e-6 + 1)
        out["flush_s"] = time.perf_counter() - t
        out["records"] = n
        out["tx_pkts"] = exp.stats.tx_pkts
        out["tx_errs"] = exp.stats.tx_errs
        sink.drain()
    exp.collectors.close()
    return out


def median_run(fn, reps: int) -> Dict:
    runs = [fn() for _ in range(reps)]
    total = [r["ingest_s"] + r["flush_s"] for r in runs]
    mid = runs[total.index(statistics.median_low(total))]
    return dict(mid, reps=reps)


def decode_throughput(samples: Sequence, stream: Sequence,
                      sink: Loopback) -> Dict:
    """Datagrams (pack_batches, 65000 bytes each, as ovs-ipfix-replay
    sends) -> upcall.decode -> sample_batch."""
    datagrams = list(upcall.pack_batches(stream, 65000))
    exp = new_exporter(sink.target, 2 * len(samples))
    decode = upcall.decode
    batch = exp.sample_batch
    gc.collect()
    t = time.perf_counter()
    # As ChannelServer.run: one handler call per datagram.
    for i, d in enumerate(datagrams):
        ups, errors = decode(d)
        if errors:
            raise RuntimeError("decode errors: %d" % errors)
        batch(ups, T0 + i * 1e-3)
    took = time.perf_counter() - t
    _check(exp, len(stream), len(samples))
    exp.collectors.close()
    return {"ingest_s": took, "datagrams": len(datagrams)}


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def memory_child(n_flows: int) -> Dict:
    """Bytes per cached flow at ``n_flows`` flows (run in a fresh
    process: see memory_per_flow)."""
    samples = make_samples(n_flows)
    sink = Loopback()
    gc.collect()
    # 1. RSS around filling (no tracing overhead in the way).
    rss0 = rss_bytes()
    exp = new_exporter(sink.target, 2 * n_flows)
    feed(exp, samples)
    gc.collect()
    rss1 = rss_bytes()
    _check(exp, n_flows, n_flows)
    exp.collectors.close()
    del exp
    gc.collect()
    # 2. tracemalloc around filling a second, fresh exporter.
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    exp = new_exporter(sink.target, 2 * n_flows)
    feed(exp, samples)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    _check(exp, n_flows, n_flows)
    # The aggregates (and the C FlowIndex's table and key pointers) live
    # in memory mappings, which tracemalloc does not see: add the part
    # the flows use, and the index's mappings.
    mapped = len(exp.cache) * flowcache.SLOT_BYTES
    if not isinstance(exp.cache.index, dict):
        mapped += sys.getsizeof(exp.cache.index)
    exp.collectors.close()
    sink.close()
    return {"flows": n_flows, "tracemalloc": after - before + mapped,
            "mapped": mapped, "rss": rss1 - rss0}


def memory_per_flow(n_flows: int) -> Dict:
    """Run memory_child in a child process: a fresh heap, so memory
    freed by earlier measurements does not hide the cache's growth."""
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "memory",
         str(n_flows)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def expiry(samples: Sequence, n_expire: int, cache_size: int,
           reps: int, sink: Loopback, idle: bool = False) -> Dict:
    """Median seconds to expire ``n_expire`` flows from a cache of
    ``cache_size`` flows: FlowCache.expire alone, then Exporter.run
    exporting what expired (records built and sent).

    Flows start in bands: band k (``n_expire`` flows) from T0 + k s
    (feed() advances 1 us per sample, so a band spans 10 ms for 10k
    flows), the rest from T0 + 1000 s; with an active timeout of 100 s,
    expiring at T0 + 100 + k + 0.5 takes exactly band k.  With
    ``idle``, the timeout of 100 s is the idle one (active 4200 s):
    the same bands leave by idle timeout, through the idle wheel.  A
    cache of ``n_expire`` flows is refilled before each expiration.
    """
    timeout = 100
    expire_s: List[float] = []
    export_s: List[float] = []
    sizes: List[int] = []
    if cache_size == n_expire:
        plans = [(1, 0)] * reps           # (bands, rest) per fill
    else:
        plans = [(reps, cache_size - reps * n_expire)]
    for bands, rest in plans:
        if idle:
            exp = new_exporter(sink.target, 2 * cache_size, 4200,
                               idle_timeout=timeout)
        else:
            exp = new_exporter(sink.target, 2 * cache_size, timeout)
        for k in range(bands):
            feed(exp, samples[k * n_expire:(k + 1) * n_expire], T0 + k)
        if rest:
            feed(exp, samples[bands * n_expire:bands * n_expire + rest],
                 T0 + 1000)
        gc.collect()
        for k in range(bands):
            now = T0 + timeout + k + 0.5
            sizes.append(len(exp.cache))
            t = time.perf_counter()
            n = exp.cache.expire(now)
            t1 = time.perf_counter()
            exp.run(now)
            t2 = time.perf_counter()
            if n != n_expire:
                raise RuntimeError("expired %d flows, expected %d"
                                   % (n, n_expire))
            expire_s.append(t1 - t)
            export_s.append(t2 - t1)
            sink.drain()
        exp.collectors.close()
    return {"expire_s": statistics.median(expire_s),
            "run_s": statistics.median(export_s),
            "expire_all": expire_s, "run_all": export_s,
            "cache_sizes": sizes}


def run(sizes: Sizes, progress=None) -> Dict:
    """Every part 1 measurement; a dict of results for bench.py."""
    say = progress or (lambda _msg: None)
    res: Dict = {"sizes": sizes._asdict(), "throughput": {}}
    sink = Loopback()
    biggest = max(max(sizes.flows), sizes.expire_big)
    say("generating %d flows" % biggest)
    pool = make_samples(biggest)
    # The daemon's collector settings (it freezes what start-up built;
    # here that is the sample pool, which the daemon never holds).
    daemon.tune_gc()
    try:
        # The headline: the realistic mix, C path then pure Python.
        say("parse+cache, realistic mix (%d flows, %d packets)"
            % sizes.mixed)
        mixed, stream = mixed_stream(*sizes.mixed)
        res["mixed"] = dict(median_run(
            lambda m=mixed, u=stream: throughput(m, u, sink, False), 3),
            flows=len(mixed), stream_len=len(stream),
            plain_ipv4=sum(s.frame[12:15] == b"\x08\x00\x45"
                           for s in stream) / len(stream))
        say("parse+cache, realistic mix, pure Python")
        with fastpath.pure_python():
            res["mixed_pure"] = dict(median_run(
                lambda m=mixed, u=stream: throughput(m, u, sink, False),
                1),
                flows=len(mixed), stream_len=len(stream))
        del mixed, stream
        for n in sizes.flows:
            samples = pool[:n]
            uni = uniform_stream(samples, max(sizes.picks, n))
            bur = burst_stream(samples, len(uni))
            reps = 3 if n < 1_000_000 else 1
            say("parse+cache at %s flows" % label(n))
            row = {
                "flows": n,
                "uniform_len": len(uni),
                "burst_len": len(bur),
                "uniform": median_run(
                    lambda s=samples, u=uni: throughput(s, u, sink, False),
                    reps),
                "burst": median_run(
                    lambda s=samples, b=bur: throughput(s, b, sink, False),
                    reps),
                "encode": median_run(
                    lambda s=samples, u=uni: throughput(s, u, sink, True),
                    reps),
            }
            res["throughput"][n] = row
            del uni, bur
        # The pure-Python path on the same stream, for comparison (what
        # runs where the C extension is not built).
        n = sizes.flows[1]
        say("parse+cache at %s flows, pure Python" % label(n))
        samples = pool[:n]
        uni = uniform_stream(samples, max(sizes.picks, n))
        saved, fastpath.C = fastpath.C, None
        try:
            res["pure"] = dict(median_run(
                lambda s=samples, u=uni: throughput(s, u, sink, False), 3),
                flows=n, stream_len=len(uni))
        finally:
            fastpath.C = saved
        del uni
        # Every kind of frame the exporter handles (tests/traffic.py:
        # traffic_mix): VLAN, QinQ, IPv6 and its extension headers, IP
        # options, fragments, ARP, LLC, GRE, cut frames; most of them
        # take the Python path.
        say("parse+cache, traffic mix")
        frames, truth = traffic_mix(SEED, sizes.mix_per_kind)
        mix = [upcall.BridgeSample("br0", 1, None, SAMPLING_ONE, f, len(f))
               for f in frames]
        uni = uniform_stream(mix, sizes.picks // 4)
        res["mix"] = dict(median_run(
            lambda s=mix, u=uni: throughput(s, u, sink, False, None), 3),
            frames=len(mix), flows=len(truth), stream_len=len(uni),
            plain_ipv4=sum(f[12:15] == b"\x08\x00\x45" for f in frames)
            / len(frames))
        del uni, mix
        n = sizes.decode_flows
        say("decode+parse+cache at %s flows" % label(n))
        samples = pool[:n]
        uni = uniform_stream(samples, max(sizes.picks, n))
        res["decode"] = dict(decode_throughput(samples, uni, sink),
                             flows=n, stream_len=len(uni))
        del uni
        say("expiry")
        res["expiry_small"] = expiry(pool, sizes.expire_n, sizes.expire_n,
                                     sizes.expire_reps, sink)
        res["expiry_big"] = expiry(pool, sizes.expire_n, sizes.expire_big,
                                   sizes.expire_reps, sink)
        say("idle expiry")
        res["idle_small"] = expiry(pool, sizes.expire_n, sizes.expire_n,
                                   sizes.expire_reps, sink, idle=True)
        res["idle_big"] = expiry(pool, sizes.expire_n, sizes.expire_big,
                                 sizes.expire_reps, sink, idle=True)
    finally:
        sink.close()
    del pool
    gc.collect()
    say("memory at %s flows" % label(sizes.memory_flows))
    res["memory"] = memory_per_flow(sizes.memory_flows)
    return res


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "memory":
        print(json.dumps(memory_child(int(argv[1]))))
        return 0
    print("usage: bench_inprocess.py memory N_FLOWS (tools/bench runs "
          "the rest)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
