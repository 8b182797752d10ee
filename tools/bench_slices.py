"""How long one export holds the loop, before and after slicing:
1,000,000 cached plain-IPv4 flows in an in-process ``Exporter`` with a
loopback UDP collector; a flush in one piece (``flush(now)``), a sliced
flush (``flush(now, sliced=True)`` then ``run()`` until idle), and an
expiry burst (every flow due at once, ``run()`` until empty).  Prints the
longest and the median ``run()``.  (tools/BENCHMARKS.md, RELIABILITY.)

    python3 tools/bench_slices.py [FLOWS]
"""

from __future__ import annotations

import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import traffic as tr  # noqa: E402
from support.collector import UdpCollector  # noqa: E402
from support.inputs import bridge_options  # noqa: E402

from ovs_ipfix_py import daemon  # noqa: E402
from ovs_ipfix_py.exporter import Exporter  # noqa: E402
from ovs_ipfix_py.options import UINT32_MAX, CacheOptions  # noqa: E402
from ovs_ipfix_py.upcall import BridgeSample  # noqa: E402


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    n = int(args[0]) if args else 1_000_000
    daemon.tune_gc()
    samples = [BridgeSample("br0", 1, None, UINT32_MAX, f, len(f))
               for f in tr.many_flows(n, n, 7)]
    collector = UdpCollector()

    def exporter(timeout):
        exp = Exporter(bridge_options(
            [collector.target], cache=CacheOptions(timeout, 2 * n)), 0.0)
        for i in range(0, n, 5000):
            exp.sample_bridge_batch(samples[i:i + 5000], 1.0)
        return exp

    def runs(exp, now, done):
        times = []
        t0 = time.perf_counter()
        while not done():
            t = time.perf_counter()
            exp.run(now)
            times.append(time.perf_counter() - t)
        total = time.perf_counter() - t0
        times.sort()
        return ("%d runs, median %.1f ms, max %.1f ms, %.0f ms in all"
                % (len(times), times[len(times) // 2] * 1e3,
                   times[-1] * 1e3, total * 1e3))

    try:
        exp = exporter(3600)
        t = time.perf_counter()
        exp.flush(2.0)
        print("flush of %d flows in one piece: %.0f ms"
              % (n, (time.perf_counter() - t) * 1e3))
        exp.close(3.0)

        exp = exporter(3600)
        t = time.perf_counter()
        exp.flush(2.0, sliced=True)
        call = time.perf_counter() - t
        print("sliced flush: the call %.2f ms, then %s"
              % (call * 1e3, runs(exp, 3.0, exp.idle)))
        exp.close(4.0)

        exp = exporter(10)
        print("expiry burst (every flow due at once): %s" % runs(
            exp, 20.0, lambda: not len(exp.cache) and exp.idle()))
        exp.close(30.0)
    finally:
        collector.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
