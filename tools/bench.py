"""tools/bench: the benchmark of ovs-ipfix-py; it prints figures, it
asserts nothing about speed.

Parts (``--only N`` runs one):

1. in-process, one core (tools/bench_inprocess.py): samples/s through
   parse + cache, and with encode, at 1k, 100k and 1M distinct flows;
   through the channel decoder; bytes per cached flow at 1M flows; the
   time to expire 10k flows from caches of 10k and 1M flows;
2. end to end (tools/bench_e2e.py): a generated 1,000,000-packet pcap
   over 100,000 flows through ovs-ipfix-replay and ovs-ipfix-exporter to
   a loopback collector, then flushed;
3. beside softflowd on the same pcap in the same run (runs part 2 too);
4. reconcile latency (tools/reconcile_latency.py, daemon mode).

``--quick`` runs everything at small sizes (seconds), for the smoke
test; its figures are not judged against the targets.  Each row carries
the figure, its target (from issues 2 and 5) and whether it is met,
then the command that produced it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import List, NamedTuple, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (HERE, ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import bench_e2e  # noqa: E402
import bench_inprocess  # noqa: E402
from bench_inprocess import label  # noqa: E402

from ovs_ipfix_py import fastpath  # noqa: E402

TARGET_SAMPLES_PER_S = 1_000_000
TARGET_BYTES_PER_FLOW = 250
TARGET_EXPIRY_RATIO = 2.0
TARGET_SOFTFLOWD_RATIO = 0.5


class Row(NamedTuple):
    """One line of the table.  ``met``: True, False or None (no
    target); ``command``: how to reproduce it; ``note``: how it was
    measured."""

    id: str
    figure: str
    value: str
    target: str = "-"
    met: Optional[bool] = None
    command: str = ""
    note: str = ""


def _n(x: float) -> str:
    return f"{x:,.0f}"


class Table:
    def __init__(self, quick: bool):
        self.quick = quick
        self.rows: List[Row] = []

    def add(self, *args, **kw) -> None:
        self.rows.append(Row(*args, **kw))

    def met_text(self, row: Row) -> str:
        if row.met is None:
            return "-"
        if self.quick:
            return "not judged (--quick)"
        return "yes" if row.met else "NO"

    def render(self) -> str:
        w_fig = max([len(r.figure) for r in self.rows] + [6])
        w_val = max([len(r.value) for r in self.rows] + [5])
        w_tgt = max([len(r.target) for r in self.rows] + [6])
        fmt = "%%-5s %%-%ds  %%%ds  %%-%ds  %%s" % (w_fig, w_val, w_tgt)
        out = [fmt % ("row", "figure", "value", "target", "met")]
        out.append("-" * (len(out[0]) + 10))
        for r in self.rows:
            out.append(fmt % (r.id, r.figure, r.value, r.target,
                              self.met_text(r)))
            if r.note:
                out.append("      (%s)" % r.note)
            if r.command:
                out.append("      $ %s" % r.command)
        return "\n".join(out)


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "-C", ROOT, "describe", "--always", "--dirty"],
            capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    # Other work on the machine moves the figures: say how busy it was.
    load = "%.2f %.2f %.2f" % os.getloadavg()
    return ("%s UTC; %d cores (os.cpu_count), CPU %s; Python %s; "
            "Linux %s; load average %s; commit %s; fast path %s"
            % (datetime.datetime.now(datetime.timezone.utc)
               .strftime("%Y-%m-%d %H:%M:%S"), os.cpu_count() or 0, model,
               platform.python_version(), platform.release(), load,
               commit, fastpath.name()))


# -- part 1 ----------------------------------------------------------------


def part1(table: Table, quick: bool, say) -> None:
    sizes = bench_inprocess.QUICK if quick else bench_inprocess.FULL
    res = bench_inprocess.run(sizes, say)
    cmd = "tools/bench --only 1" + (" --quick" if quick else "")
    target_n = sizes.flows[1]
    i = 0
    for n in sizes.flows:
        t = res["throughput"][n]
        reps = t["uniform"]["reps"]
        how = "median of %d runs" % reps if reps > 1 else "one run"
        for kind, what in (("uniform", "parse+cache"),
                           ("burst", "parse+cache"),
                           ("encode", "parse+cache+encode")):
            r = t[kind]
            length = t["burst_len"] if kind == "burst" else t["uniform_len"]
            rate = length / (r["ingest_s"] + r["flush_s"])
            pattern = ("bursts of %d" % bench_inprocess.BURST
                       if kind == "burst" else "uniform")
            if kind == "burst":
                note = ("%s samples: rounds of every flow in a shuffled "
                        "order, each as %d consecutive samples; %s"
                        % (_n(length), bench_inprocess.BURST, how))
            else:
                note = ("%s samples: each flow once (shuffled), then %s "
                        "uniform random picks; %s"
                        % (_n(length), _n(length - n), how))
            if kind == "encode":
                note += ("; then flush: %s records in %s messages to "
                         "127.0.0.1 UDP in %.3f s (%s records/s)"
                         % (_n(r["records"]), _n(r["tx_pkts"]),
                            r["flush_s"], _n(r["records"] / r["flush_s"])))
            judged = n == target_n and kind != "burst"
            i += 1
            table.add(
                "1.%d" % i,
                "%s samples/s, %s flows, %s" % (what, label(n), pattern),
                _n(rate),
                ">= %s at %s" % (_n(TARGET_SAMPLES_PER_S), label(n))
                if judged else "-",
                (rate >= TARGET_SAMPLES_PER_S) if judged else None,
                cmd + "   # Exporter.sample_bridge_batch, %d per call"
                % bench_inprocess.BATCH
                + (", then Exporter.flush" if kind == "encode" else ""),
                note)
    p = res["pure"]
    i += 1
    table.add("1.%d" % i,
              "parse+cache samples/s, %s flows, uniform, pure Python"
              % label(p["flows"]),
              _n(p["stream_len"] / p["ingest_s"]), "-", None,
              cmd + "   # as 1.4, with fastpath.C off (what "
              "OVS_IPFIX_PY_PURE=1 gives)",
              "as row 1.4 with the C fast path off: what runs where "
              "ovs_ipfix_py/_fastpath.c is not built; median of %d"
              % p["reps"])
    x = res["mix"]
    i += 1
    table.add("1.%d" % i,
              "parse+cache samples/s, traffic mix, %s flows, uniform"
              % label(x["flows"]),
              _n(x["stream_len"] / x["ingest_s"]), "-", None,
              cmd + "   # tests/traffic.py:traffic_mix frames through "
              "sample_bridge_batch",
              "%s samples over %s distinct frames of every kind the "
              "exporter handles (VLAN, QinQ, IPv6 + extension headers, IP "
              "options, fragments, ARP, LLC, GRE, cut frames); %.0f %% "
              "plain IPv4, the rest on the Python path; median of %d"
              % (_n(x["stream_len"]), _n(x["frames"]),
                 100 * x["plain_ipv4"], x["reps"]))
    d = res["decode"]
    i += 1
    table.add("1.%d" % i,
              "decode+parse+cache samples/s, %s flows, uniform"
              % label(d["flows"]),
              _n(d["stream_len"] / d["ingest_s"]), "-", None,
              cmd + "   # upcall.decode of pack_batches datagrams, then "
              "sample_bridge_batch",
              "%s samples in %s datagrams of <= 65000 bytes, one "
              "handler call per datagram, as ChannelServer.run"
              % (_n(d["stream_len"]), _n(d["datagrams"])))
    m = res["memory"]
    per_tm = m["tracemalloc"] / m["flows"]
    per_rss = m["rss"] / m["flows"]
    worst = max(per_tm, per_rss)
    i += 1
    table.add("1.%d" % i,
              "bytes per cached flow at %s flows" % label(m["flows"]),
              "%.0f" % worst,
              "<= %d" % TARGET_BYTES_PER_FLOW,
              worst <= TARGET_BYTES_PER_FLOW,
              "python3 tools/bench_inprocess.py memory %d" % m["flows"],
              "the larger of: tracemalloc delta + the arrays' mapping "
              "%.0f B/flow (of which mapped %.0f), RSS delta %.0f B/flow, "
              "around filling a fresh exporter (keys, dict, deque, arrays, "
              "everything) in a child process"
              % (per_tm, m["mapped"] / m["flows"], per_rss))
    n_exp = sizes.expire_n
    for small, big, by, key, what, how in (
            (res["expiry_small"], res["expiry_big"], "active", "expire_s",
             "expire", "FlowCache.expire(now)"),
            (res["expiry_small"], res["expiry_big"], "active", "run_s",
             "expire+export", "Exporter.run(now) after "
             "FlowCache.expire: records built and sent"),
            (res["idle_small"], res["idle_big"], "idle", "expire_s",
             "idle-expire", "FlowCache.expire(now), idle timeout 100 s "
             "(idle wheel)")):
        for res_, size in ((small, n_exp), (big, sizes.expire_big)):
            i += 1
            table.add("1.%d" % i,
                      "%s %s flows from %s-flow cache, ms"
                      % (what, label(n_exp), label(size)),
                      "%.2f" % (res_[key] * 1000), "-", None,
                      cmd + "   # " + how,
                      "by %s timeout; median of %d; cache sizes %s"
                      % (by, len(res_[key.replace("_s", "_all")]),
                         ", ".join(label(s) if s % 1000 == 0 else str(s)
                                   for s in res_["cache_sizes"])))
        ratio = big[key] / small[key]
        i += 1
        table.add("1.%d" % i,
                  "%s cost ratio, %s-flow / %s-flow cache"
                  % (what, label(sizes.expire_big), label(n_exp)),
                  "%.2f" % ratio, "<= %.1f" % TARGET_EXPIRY_RATIO,
                  ratio <= TARGET_EXPIRY_RATIO, cmd)


# -- parts 2 and 3 -----------------------------------------------------------


def part23(table: Table, quick: bool, softflowd: bool, say) -> None:
    sizes = bench_e2e.QUICK if quick else bench_e2e.FULL
    res = bench_e2e.run(sizes, softflowd, say)
    o = res["ours"]
    cmds = o.commands
    pcap_note = ("pcap of %s packets over %s flows, %s bytes, generated "
                 "by tests/traffic.py:many_flows into a temp dir"
                 % (_n(sizes.packets), _n(sizes.flows),
                    _n(res["pcap_bytes"])))
    table.add("2.1", "end to end wall time, s", "%.2f" % o.wall_s, "-",
              None, cmds[2],
              pcap_note + "; replay start -> last record at the "
              "collector after ipfix/flush (replay alone %.2f s)"
              % o.replay_wall_s)
    table.add("2.2", "end to end CPU, s (daemon + replay)",
              "%.2f" % o.cpu_s, "-", None, cmds[1],
              "daemon %.2f s (/proc/PID/stat over the run), replay %.2f s "
              "(os.wait4, whole process)" % (o.daemon_cpu_s,
                                             o.replay_cpu_s))
    table.add("2.3", "end to end samples/s (wall)",
              _n(o.samples / o.wall_s), "-", None, cmds[2],
              "%s samples, sampling=1; %s samples per daemon CPU second"
              % (_n(o.samples), _n(o.samples / o.daemon_cpu_s)))
    table.add("2.4", "records/s at the collector (flush)",
              _n(o.records / o.flush_s) if o.flush_s > 0 else "-", "-",
              None, cmds[3],
              "%s of %s records received in %.3f s, ipfix/flush -> last "
              "arrival" % (_n(o.records), _n(sizes.flows), o.flush_s))
    table.add("2.5", "daemon peak RSS, MB", "%.1f" % (o.peak_rss / 1e6),
              "-", None, cmds[0], "VmHWM of ovs-ipfix-exporter after the "
              "flush; cache_max_flows=%d" % (2 * sizes.flows))
    if not softflowd:
        return
    sf = res["softflowd"]
    if sf is None:
        for rid in ("3.1", "3.2", "3.3"):
            table.add(rid, "softflowd", "n/a", "-", None, "",
                      "softflowd is not installed (tools/install-deps)")
        return
    table.add("3.1", "softflowd wall s / CPU s",
              "%.2f / %.2f" % (sf.wall_s, sf.cpu_s), "-", None, sf.command,
              "%s records received; %s packets/s (wall)"
              % (_n(sf.records), _n(sizes.packets / sf.wall_s)))
    wall_ratio = sf.wall_s / o.wall_s
    cpu_ratio = sf.cpu_s / o.cpu_s
    table.add("3.2", "packets/s ratio ours/softflowd, wall",
              "%.2f" % wall_ratio, ">= %.1f" % TARGET_SOFTFLOWD_RATIO,
              wall_ratio >= TARGET_SOFTFLOWD_RATIO,
              "tools/bench --only 3" + (" --quick" if quick else ""),
              "%s vs %s packets/s" % (_n(sizes.packets / o.wall_s),
                                      _n(sizes.packets / sf.wall_s)))
    table.add("3.3", "packets/s ratio ours/softflowd, CPU",
              "%.2f" % cpu_ratio, ">= %.1f" % TARGET_SOFTFLOWD_RATIO,
              cpu_ratio >= TARGET_SOFTFLOWD_RATIO,
              "tools/bench --only 3" + (" --quick" if quick else ""),
              "%s vs %s packets per CPU second (ours: daemon + replay)"
              % (_n(sizes.packets / o.cpu_s),
                 _n(sizes.packets / sf.cpu_s)))


# -- part 4 ------------------------------------------------------------------


def part4(table: Table, quick: bool, say) -> None:
    import reconcile_latency
    changes = 3 if quick else 20
    say("reconcile latency, %d changes" % changes)
    res = reconcile_latency.measure("daemon", changes)
    med = statistics.median(res.from_commit)
    table.add("4.1", "reconcile latency median, ms", "%.2f" % med, "-",
              None, "python3 tools/reconcile_latency.py --changes %d"
              % changes,
              "ovs-vsctl returned -> first forced-end record at the "
              "collector (kernel time), %d changes; p90 %.2f, max %.2f; "
              "measured: %s" % (changes,
                                reconcile_latency.percentile(
                                    res.from_commit, 0.9),
                                max(res.from_commit), res.command))
    table.add("4.2", "ovs-vsctl started -> records, median ms",
              "%.2f" % statistics.median(res.from_start), "-", None,
              "python3 tools/reconcile_latency.py --changes %d" % changes,
              "the same changes timed from ovs-vsctl's start: row 4.1 "
              "can be negative when the records arrive before ovs-vsctl "
              "has exited; ovs-vsctl itself takes %.2f ms (median)"
              % statistics.median(res.vsctl))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="tools/bench",
        description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--quick", action="store_true",
                        help="small sizes (seconds), figures not judged")
    parser.add_argument("--only", type=int, choices=(1, 2, 3, 4),
                        help="run one part (3 runs part 2 as well)")
    args = parser.parse_args(argv)

    def say(msg):
        print("bench: " + msg, file=sys.stderr, flush=True)

    started = time.monotonic()
    table = Table(args.quick)
    parts = [args.only] if args.only else [1, 2, 3, 4]
    print("ovs-ipfix-py benchmark%s" % (" (--quick)" if args.quick
                                        else ""))
    print(machine())
    if 1 in parts:
        part1(table, args.quick, say)
    if 2 in parts or 3 in parts:
        part23(table, args.quick, 3 in parts, say)
    if 4 in parts:
        part4(table, args.quick, say)
    print(table.render())
    print("load average at the end: %.2f %.2f %.2f; took %.0f s"
          % (os.getloadavg() + (time.monotonic() - started,)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
