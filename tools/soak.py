"""The soak behind ``tools/soak [SECONDS]``: the daemon under load and
faults for SECONDS (default 600), its resources measured throughout.

Set-up as ``tools/demo``: a private ovsdb-server in a temporary
directory, bridge br0 with bridge sampling and flow sampling (collector
set 1) to a local UDP collector, ``ovs-ipfix-exporter`` with
``--metrics``.  Then, until the time is up:

- load: ``ovs-ipfix-replay`` in rounds, alternately a capture of many
  plain IPv4 flows and the traffic mix (every frame kind), as bridge and
  as flow samples, paced at ``--rate`` packets per second;
- faults, one every ``--fault-every`` s, in turn: a burst of garbage
  datagrams on the channel; an option change with ovs-vsctl (the cache
  is flushed as forced end); the collector going away (its port closed:
  sends fail) and coming back; ovsdb-server killed with SIGKILL and
  started again on the same database; ``cache_max_flows`` cut to a
  tenth and restored.

Every ``--sample-every`` s it records the daemon's RSS and open file
descriptors (/proc) and its loop histograms (scraped from
``/metrics``).  The report compares the first sample after warm-up
(``--warmup`` s: the cache and the allocator reach their working size)
with the last one, and gives the loop latency (work per iteration and
between channel reads, blocking excluded: p50/p99 from the histogram
buckets, and the maximum) over the first and the last window.

Exit status 0 when the daemon survived, answered to the end, exited
cleanly, its descriptors did not grow and its RSS grew less than
``--rss-slack`` (default 20 %) between warm-up and the end.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from prometheus_client.parser import text_string_to_metric_families  # noqa

from ovs_ipfix_py.pcap import write_pcap  # noqa: E402
from tests.support.ovsdb import OvsdbServer  # noqa: E402
from tests.traffic import many_flows, traffic_mix  # noqa: E402


def say(text):
    print("[%s] %s" % (time.strftime("%H:%M:%S"), text), flush=True)


class Collector(threading.Thread):
    """UDP on 127.0.0.1: counts datagrams and bytes on a thread.
    ``away()`` closes the port (sends to it fail with ECONNREFUSED),
    ``back()`` binds the same port again."""

    def __init__(self):
        super().__init__(daemon=True)
        self.port = None
        self.datagrams = 0
        self.bytes = 0
        self._lock = threading.Lock()
        self._sock = None
        self._done = threading.Event()
        self.back()

    @property
    def target(self):
        return "127.0.0.1:%d" % self.port

    def back(self):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        s.bind(("127.0.0.1", self.port or 0))
        s.settimeout(0.1)
        self.port = s.getsockname()[1]
        with self._lock:
            self._sock = s

    def away(self):
        with self._lock:
            s, self._sock = self._sock, None
        s.close()

    def run(self):
        while not self._done.is_set():
            with self._lock:
                s = self._sock
            if s is None:
                time.sleep(0.05)
                continue
            try:
                data = s.recv(65535)
            except (socket.timeout, OSError):
                continue
            self.datagrams += 1
            self.bytes += len(data)

    def stop(self):
        self._done.set()
        self.join(5)
        if self._sock is not None:
            self._sock.close()


def proc_figures(pid):
    """(RSS bytes, open descriptors) of ``pid`` from /proc."""
    rss = 0
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    return rss, len(os.listdir("/proc/%d/fd" % pid))


def scrape(url):
    """{sample name: {le: value} or value} of the metrics we read."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.endswith("_bucket"):
                out.setdefault(s.name, {})[s.labels["le"]] = s.value
            elif not s.labels:
                out[s.name] = s.value
            else:
                out.setdefault(s.name, 0)
                out[s.name] += s.value
    return out


def quantile(buckets_a, buckets_b, q):
    """Upper bound (s) of the bucket holding quantile ``q`` of the
    observations between two scrapes (cumulative buckets by ``le``)."""
    les = sorted(buckets_b, key=float)
    total = buckets_b["+Inf"] - buckets_a.get("+Inf", 0)
    if total <= 0:
        return 0.0
    for le in les:
        if buckets_b[le] - buckets_a.get(le, 0) >= q * total:
            return float(le)
    return float("inf")


class Sample:
    def __init__(self, t, pid, metrics):
        self.t = t
        self.rss, self.fds = proc_figures(pid)
        self.metrics = metrics


def window(a, b, name):
    """(p50, p99, max-bucket bound) of histogram ``name`` between two
    samples, in ms."""
    ba = a.metrics.get(name + "_bucket", {}) if a else {}
    bb = b.metrics[name + "_bucket"]
    p50 = quantile(ba, bb, 0.5)
    p99 = quantile(ba, bb, 0.99)
    top = quantile(ba, bb, 1.0)
    return p50 * 1e3, p99 * 1e3, top * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(prog="tools/soak", description=__doc__.split(
        "\n\n")[0])
    p.add_argument("seconds", nargs="?", type=float, default=600.0)
    p.add_argument("--rate", type=int, default=40000,
                   help="replay packets per second (default 40000)")
    p.add_argument("--fault-every", type=float, default=10.0)
    p.add_argument("--sample-every", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=None,
                   help="s before the first reference sample (default: "
                   "a tenth of the run, at most 60)")
    p.add_argument("--rss-slack", type=float, default=0.20)
    args = p.parse_args(argv)
    warmup = args.warmup
    if warmup is None:
        warmup = min(60.0, args.seconds / 10)

    workdir = tempfile.mkdtemp(prefix="ovs-ipfix-soak.", dir="/tmp")
    server = daemon = None
    collector = Collector()
    collector.start()
    rng = random.Random(1)
    ok = True
    try:
        say("private ovsdb-server in %s" % workdir)
        server = OvsdbServer(workdir).start()
        server.vsctl(
            "add-br", "br0", "--", "set", "bridge", "br0",
            "datapath_type=dummy", "--", "--id=@br", "get", "Bridge", "br0",
            "--", "--id=@i", "create", "IPFIX",
            'targets="%s"' % collector.target, "sampling=1",
            "obs_domain_id=1", "obs_point_id=2", "cache_active_timeout=5",
            "cache_max_flows=50000", "--", "set", "Bridge", "br0",
            "ipfix=@i", "--", "create", "Flow_Sample_Collector_Set", "id=1",
            "bridge=@br", "ipfix=@i")
        channel = os.path.join(workdir, "channel.sock")
        ctl = os.path.join(workdir, "exporter.ctl")
        daemon = subprocess.Popen(
            ["ovs-ipfix-exporter", "--db=" + server.remote,
             "--channel=" + channel, "--unixctl=" + ctl,
             "--metrics=127.0.0.1:0",
             "--log-file=" + os.path.join(workdir, "exporter.log"),
             "-vconsole:off"], stdin=subprocess.DEVNULL)

        def appctl(*a, check=True):
            return subprocess.run(["ovs-appctl", "-t", ctl, "--timeout=20",
                                   *a], capture_output=True, text=True,
                                  check=check, timeout=30).stdout

        end = time.monotonic() + 20
        url = None
        while url is None:
            if time.monotonic() > end or daemon.poll() is not None:
                raise SystemExit("soak: the exporter did not start")
            time.sleep(0.1)
            if os.path.exists(ctl):
                out = appctl("ipfix/show", check=False)
                for line in out.splitlines():
                    if line.startswith("metrics: "):
                        url = line.split()[1]
        say("ovs-ipfix-exporter pid %d, metrics at %s" % (daemon.pid, url))

        pcaps = []
        for name, frames in (
                ("flows.pcap", list(many_flows(20000, 100000, 3))),
                ("mix.pcap", traffic_mix(seed=3, flows_per_kind=40)[0])):
            path = os.path.join(workdir, name)
            write_pcap(path, [(1.0 + i / 1e6, f)
                              for i, f in enumerate(frames)])
            pcaps.append((path, len(frames)))

        replay = None
        rounds = packets = 0
        faults = []
        garbage = 0
        samples = []
        start = time.monotonic()
        stop_at = start + args.seconds
        next_fault = start + args.fault_every
        next_sample = start
        reference = None
        fault_kinds = ["garbage", "option", "collector", "ovsdb", "cut"]
        sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        while True:
            now = time.monotonic()
            if daemon.poll() is not None:
                say("the exporter died (status %s)" % daemon.returncode)
                ok = False
                break
            if replay is None or replay.poll() is not None:
                if replay is not None:
                    if replay.returncode != 0:
                        say("replay failed: %s" % replay.stderr.read())
                        ok = False
                    rounds += 1
                if now >= stop_at:
                    break
                path, n = pcaps[rounds % 2]
                extra = [] if rounds % 4 < 2 else [
                    "--collector-set=1", "--obs-domain-id=3",
                    "--obs-point-id=4"]
                replay = subprocess.Popen(
                    ["ovs-ipfix-replay", "--channel=" + channel,
                     "--bridge=br0", "--rate=%d" % args.rate, *extra, path],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE, text=True)
                packets += n
            if now >= next_sample:
                s = Sample(now - start, daemon.pid, scrape(url))
                samples.append(s)
                if reference is None and s.t >= warmup:
                    reference = s
                say("t=%4.0fs rss=%.1f MiB fds=%d cache=%d records=%d "
                    "max iteration=%.1f ms" % (
                        s.t, s.rss / 2**20, s.fds,
                        s.metrics.get("ovs_ipfix_exporter_cache_flows", 0),
                        s.metrics.get("ovs_ipfix_exporter_records_total", 0),
                        s.metrics["ovs_ipfix_loop_iteration_max_seconds"]
                        * 1e3))
                next_sample += args.sample_every
            if now >= next_fault and now < stop_at - args.fault_every / 2:
                kind = fault_kinds[len(faults) % len(fault_kinds)]
                faults.append(kind)
                if kind == "garbage":
                    for _ in range(500):
                        sender.sendto(rng.randbytes(rng.randint(0, 2000)),
                                      channel)
                    garbage += 500
                    say("fault: 500 garbage datagrams")
                elif kind == "option":
                    timeout = 5 + len(faults) % 2
                    server.vsctl("set", "IPFIX", ".",
                                 "cache_active_timeout=%d" % timeout)
                    say("fault: cache_active_timeout=%d" % timeout)
                elif kind == "collector":
                    collector.away()
                    say("fault: collector away for 3 s")
                    time.sleep(3)
                    collector.back()
                elif kind == "ovsdb":
                    server.restart()
                    say("fault: ovsdb-server killed (SIGKILL), restarted")
                elif kind == "cut":
                    server.vsctl("set", "IPFIX", ".", "cache_max_flows=5000")
                    time.sleep(2)
                    server.vsctl("set", "IPFIX", ".",
                                 "cache_max_flows=50000")
                    say("fault: cache_max_flows 50000 -> 5000 -> 50000")
                next_fault += args.fault_every
            time.sleep(0.1)
        sender.close()
        if replay is not None and replay.poll() is None:
            replay.wait(60)
        last = Sample(time.monotonic() - start, daemon.pid, scrape(url))
        samples.append(last)
        show = appctl("ipfix/show")
        appctl("exit")
        status = daemon.wait(60)
        if status != 0:
            say("the exporter exited with status %d" % status)
            ok = False
        reference = reference or samples[0]
        report(args, reference, samples, last, rounds, packets, faults,
               garbage, collector, show)
        if last.fds > reference.fds:
            say("descriptors grew: %d -> %d" % (reference.fds, last.fds))
            ok = False
        if last.rss > reference.rss * (1 + args.rss_slack):
            say("RSS grew more than %d %%" % (args.rss_slack * 100))
            ok = False
    finally:
        # Each step on its own: one that fails must not leave the
        # others' processes running.
        try:
            if daemon is not None and daemon.poll() is None:
                daemon.kill()
                daemon.wait()
        finally:
            try:
                collector.stop()
            finally:
                try:
                    if server is not None:
                        server.cleanup()
                finally:
                    shutil.rmtree(workdir, ignore_errors=True)
    say("soak %s" % ("passed" if ok else "FAILED"))
    return 0 if ok else 1


def report(args, ref, samples, last, rounds, packets, faults, garbage,
           collector, show):
    print()
    print("soak: %.0f s, %d replay rounds (%d packets at %d/s), faults: %s"
          % (last.t, rounds, packets, args.rate, ", ".join(
              "%s x%d" % (k, faults.count(k)) for k in dict.fromkeys(
                  faults))))
    print("      %d garbage datagrams; collector received %d datagrams"
          % (garbage, collector.datagrams))
    # The first window after warm-up, and the last one.
    i = samples.index(ref)
    first = (samples[i - 1] if i else None, ref)
    final = (samples[-2], samples[-1]) if len(samples) > 1 else first
    print()
    print("| | at %.0f s (after warm-up) | at %.0f s (end) |"
          % (ref.t, last.t))
    print("|---|---|---|")
    print("| RSS | %.1f MiB | %.1f MiB |" % (ref.rss / 2**20,
                                             last.rss / 2**20))
    print("| open descriptors | %d | %d |" % (ref.fds, last.fds))
    for name, what in (("ovs_ipfix_loop_iteration_seconds",
                        "loop iteration"),
                       ("ovs_ipfix_loop_read_gap_seconds",
                        "gap between channel reads")):
        a = window(*first, name)
        b = window(*final, name)
        print("| %s p50 / p99 / max, ms (bucket bounds, last %.0f s) "
              "| %g / %g / %g | %g / %g / %g |"
              % (what, args.sample_every, *a, *b))
    print("| longest loop iteration since start | | %.1f ms |"
          % (last.metrics["ovs_ipfix_loop_iteration_max_seconds"] * 1e3))
    print("| longest gap between channel reads since start | | %.1f ms |"
          % (last.metrics["ovs_ipfix_loop_read_gap_max_seconds"] * 1e3))
    print()
    print("ipfix/show at the end:")
    print(show)


if __name__ == "__main__":
    sys.exit(main())
