"""ovs-ipfix-exporter as an operator runs it, for the end-to-end tests:
``ExporterProcess`` (the daemon by its console script, every path in a
short directory, stopped by pid), ``Env`` (what one test starts: work
directory, collectors, exporters; ``close()`` stops it all), the replay
tool (``run_replay``, ``replay_ok``), IPFIX rows made with ovs-vsctl
(``bridge_ipfix``, ``flow_ipfix``), the ``ipfix/show`` parser
(``parse_show``), records judged against the traffic generator's truth
(``assert_flows_exact``), and ``scrape`` for ``--metrics``.
"""

import collections
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request

import traffic as tr
from prometheus_client.parser import text_string_to_metric_families
from traffic import FlowId, truth_of

from ovs_ipfix_py import upcall
from ovs_ipfix_py.pcap import write_pcap

from . import pid_alive, read_pidfile, wait_until
from .collector import UdpCollector

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
UINT32_MAX = 0xFFFFFFFF
REASON_ACTIVE = 2
REASON_FORCED_END = 4

# ---------------------------------------------------------------------
# Processes


def console_script(name):
    """The console script ``name`` of the Python running the tests (the
    editable install), else the one on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    if os.access(here, os.X_OK):
        return here
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed: run tools/install-deps"
                           " (pip install -e .)")
    return found


class ExporterProcess:
    """ovs-ipfix-exporter run by its console script, as a child of the
    test (not --detach, so it is reaped), with every path in ``workdir``.

    By default every path is given on the command line (``--db
    --channel --unixctl --pidfile=PATH --log-file=PATH``).  With
    ``rundir_env`` (an environment whose OVS_RUNDIR and OVS_LOGDIR are
    ``workdir``) it runs as ``ovs-ipfix-exporter --pidfile --log-file``
    and relies on the defaults; ``ovs-appctl -t ovs-ipfix-exporter``
    then finds it through its pid file.
    """

    def __init__(self, workdir, db, rundir_env=None, args=()):
        self.workdir = workdir
        self.db = db
        self.env = rundir_env
        self.args = list(args)
        if rundir_env is None:
            self.channel = os.path.join(workdir, "ch.sock")
            self.ctl = os.path.join(workdir, "exp.ctl")
            self.pidfile = os.path.join(workdir, "exp.pid")
            self.logfile = os.path.join(workdir, "exp.log")
            self.target = self.ctl
        else:
            base = os.path.join(workdir, "ovs-ipfix-exporter")
            self.channel = base + ".sock"
            self.ctl = None  # <base>.<pid>.ctl, known once started
            self.pidfile = base + ".pid"
            self.logfile = base + ".log"
            self.target = "ovs-ipfix-exporter"
        self.stderr = os.path.join(workdir, "exp.stderr")
        self.proc = None
        self._sock = None

    @property
    def pid(self):
        return self.proc.pid

    def start(self):
        argv = [console_script("ovs-ipfix-exporter")]
        if self.env is None:
            argv += ["--db=" + self.db, "--channel=" + self.channel,
                     "--unixctl=" + self.ctl, "--pidfile=" + self.pidfile,
                     "--log-file=" + self.logfile]
        else:
            argv += ["--pidfile", "--log-file"]
        argv += self.args
        argv.append("-vconsole:off")
        with open(self.stderr, "ab") as err:
            self.proc = subprocess.Popen(argv, cwd=self.workdir,
                                         env=self.env,
                                         stdin=subprocess.DEVNULL,
                                         stdout=err, stderr=err)
        if self.ctl is None:
            self.ctl = os.path.join(
                self.workdir, f"ovs-ipfix-exporter.{self.pid}.ctl")

        def ready():
            return self.proc.poll() is not None or all(
                os.path.exists(p) for p in (self.channel, self.ctl,
                                            self.pidfile))

        wait_until(ready, 10.0, "ovs-ipfix-exporter to start")
        assert self.proc.poll() is None, self.tail()
        wait_until(lambda: read_pidfile(self.pidfile) is not None, 5.0,
                   "the pid file")
        assert read_pidfile(self.pidfile) == self.pid
        return self

    def tail(self):
        text = ""
        for path in (self.stderr, self.logfile):
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    text += f"--- {path}\n" + f.read()[-4000:]
        return text

    def log_text(self):
        with open(self.logfile, errors="replace") as f:
            return f.read()

    def alive(self):
        return self.proc.poll() is None and pid_alive(self.pid)

    def appctl(self, *args, check=True):
        """``ovs-appctl -t <target> ARGS`` (the control socket's path,
        or the program's name with ``rundir_env``); returns its stdout.
        """
        result = subprocess.run(["ovs-appctl", "-t", self.target,
                                 "--timeout=10", *args],
                                capture_output=True, text=True, timeout=20,
                                env=self.env, stdin=subprocess.DEVNULL)
        if check:
            assert result.returncode == 0, (args, result.stderr,
                                            self.tail())
        return result.stdout if check else result

    def show(self, bridge=None):
        return parse_show(self.appctl("ipfix/show",
                                      *([bridge] if bridge else [])))

    def wait_show(self, predicate, what, timeout=10.0):
        """Poll ``ipfix/show`` until ``predicate(Show)``; the Show."""
        found = []

        def check():
            found[:] = [self.show()]
            return predicate(found[0])

        try:
            wait_until(check, timeout, what)
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what}; last "
                                 f"ipfix/show:\n{found[0].text}") from None
        return found[0]

    def wait_upcalls(self, n, timeout=20.0):
        """Wait until the channel has decoded ``n`` upcalls in all."""
        return self.wait_show(lambda s: s.channel["upcalls"] >= n,
                              f"{n} upcalls", timeout)

    def send(self, datagram):
        """Send one datagram to the channel (blocking: lossless)."""
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            force = getattr(socket, "SO_SNDBUFFORCE", 32)
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, force, 4 << 20)
            except PermissionError:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                      4 << 20)
            self._sock.connect(self.channel)
        self._sock.send(datagram)

    def stop(self):
        """Stop the daemon by pid (SIGTERM, then SIGKILL); idempotent."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def run_replay(*args, timeout=60, env=None):
    """Run ovs-ipfix-replay ARGS to completion (in environment ``env``,
    default ours)."""
    return subprocess.run([console_script("ovs-ipfix-replay"), *args],
                          capture_output=True, text=True, timeout=timeout,
                          env=env, stdin=subprocess.DEVNULL)


REPLAY_SUMMARY = re.compile(r"^ovs-ipfix-replay: (\d+) packets read, "
                            r"(\d+) samples sent, (\d+) datagrams, "
                            r"[0-9.]+ s$")


def replay_ok(exporter, pcap, *args):
    """Replay ``pcap`` into ``exporter``; assert success; returns
    (packets read, samples sent, datagrams) from its summary line."""
    result = run_replay("--channel=" + exporter.channel, *args, pcap)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    m = REPLAY_SUMMARY.match(lines[0])
    assert m, lines[0]
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


class Env:
    """What one test starts: a work directory, collectors, exporters.
    ``close()`` stops and removes all of it."""

    def __init__(self, ovsdb):
        self.ovsdb = ovsdb
        self.dir = tempfile.mkdtemp(prefix="dmn-", dir="/tmp")
        self.collectors = []
        self.exporters = []

    def collector(self):
        c = UdpCollector()
        self.collectors.append(c)
        return c

    def exporter(self, rundir_defaults=False, args=()):
        """A started ExporterProcess on this ovsdb-server; with
        ``rundir_defaults``, in the server's directory (its OVS_RUNDIR)
        with default paths; ``args``: more command-line arguments."""
        if rundir_defaults:
            e = ExporterProcess(self.ovsdb.workdir, None, self.ovsdb.env,
                                args)
        else:
            e = ExporterProcess(self.dir, self.ovsdb.remote, args=args)
        self.exporters.append(e)
        return e.start()

    def pcap(self, name, frames):
        path = os.path.join(self.dir, name)
        write_pcap(path, [(1.0 + i / 1000.0, f)
                          for i, f in enumerate(frames)])
        return path

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        try:
            for e in self.exporters:
                e.stop()
        finally:
            for c in self.collectors:
                c.close()
            shutil.rmtree(self.dir, ignore_errors=True)


def ipfix_args(collector, **columns):
    """``create IPFIX`` arguments: the collector as target, then the
    columns (cache kept by default so that flush decides)."""
    cols = {"cache_active_timeout": 60, "cache_max_flows": 10000}
    cols.update(columns)
    return ["create", "IPFIX", f'targets="{collector.target}"',
            *(f"{k}={v}" for k, v in cols.items())]


def bridge_ipfix(ovsdb, bridge, collector, **columns):
    """Bridge ``bridge`` (created) with bridge sampling to ``collector``.
    """
    ovsdb.vsctl("--may-exist", "add-br", bridge, "--", "set", "Bridge",
                bridge, "datapath_type=dummy", "--",
                "--id=@i", *ipfix_args(collector, **columns), "--",
                "set", "Bridge", bridge, "ipfix=@i")


def flow_ipfix(ovsdb, bridge, set_id, collector, **columns):
    """A Flow_Sample_Collector_Set ``set_id`` on ``bridge`` (created)
    exporting to ``collector``."""
    ovsdb.vsctl("--may-exist", "add-br", bridge, "--", "set", "Bridge",
                bridge, "datapath_type=dummy", "--",
                "--id=@br", "get", "Bridge", bridge, "--",
                "--id=@i", *ipfix_args(collector, **columns), "--",
                "create", "Flow_Sample_Collector_Set", f"id={set_id}",
                "bridge=@br", "ipfix=@i")


# ---------------------------------------------------------------------
# ipfix/show

SHOW_HEAD = re.compile(
    r"^bridge (?P<bridge>\S+?)(?: id (?P<id>\d+))?: flows=(?P<flows>\d+), "
    r"current flows=(?P<current_flows>\d+), sampled pkts=(?P<pkts>\d+), "
    r"ipv4 ok=(?P<ipv4_ok>\d+), ipv6 ok=(?P<ipv6_ok>\d+), "
    r"tx pkts=(?P<tx_pkts>\d+)$")
SHOW_ERRS = re.compile(
    r"^\s+pkts errs=(?P<errs>\d+), ipv4 errs=(?P<ipv4_errs>\d+), "
    r"ipv6 errs=(?P<ipv6_errs>\d+), tx errs=(?P<tx_errs>\d+)$")
SHOW_CACHE = re.compile(r"^\s+cache: (?P<cache>\d+) flows\b")
SHOW_RULES = re.compile(
    r"^\s+cache: \d+ flows, active timeout (?P<active_timeout>\d+)s, "
    r"idle timeout (?:(?P<idle_timeout>\d+)s|off), "
    r"max flows (?P<max_flows>\d+), tcp end of flow (?P<tcp_end>on|off)$")
SHOW_ENDED = re.compile(
    r"^\s+ended: idle timeout=(?P<ended_idle>\d+), "
    r"active timeout=(?P<ended_active>\d+), "
    r"end of flow=(?P<ended_eof>\d+), forced end=(?P<ended_forced>\d+), "
    r"lack of resources=(?P<ended_lack>\d+)$")
SHOW_CHANNEL = re.compile(r"^channel: (.*)$")


class Show:
    """``ipfix/show`` parsed.  ``exporters``: (bridge, collector set id
    or None) -> counters (flows, current_flows, pkts, ipv4_ok, ipv6_ok,
    tx_pkts, errs, ipv4_errs, ipv6_errs, tx_errs, cache, active_timeout,
    idle_timeout (0: off), max_flows, tcp_end (0/1), ended_idle,
    ended_active, ended_eof, ended_forced, ended_lack); ``channel``:
    its counters, keys with underscores ("malformed_datagrams");
    ``loop``: the loop line's figures (ms, counts), keys with
    underscores ("max_read_gap"); ``metrics``: the metrics URL or None;
    ``order``: exporter keys as printed; ``text``: the output."""

    def __init__(self, text):
        self.text = text
        self.exporters = {}
        self.order = []
        self.channel = {}
        self.ovsdb = None
        self.fast_path = None
        self.loop = None
        self.metrics = None


def parse_show(text):
    show = Show(text)
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        m = SHOW_HEAD.match(line)
        if m:
            key = (m["bridge"], int(m["id"]) if m["id"] else None)
            assert key not in show.exporters, text
            counters = {k: int(v) for k, v in m.groupdict().items()
                        if k not in ("bridge", "id")}
            i += 1
            assert i < len(lines), text
            e = SHOW_ERRS.match(lines[i])
            assert e, f"second line of {key} not understood:\n{text}"
            counters.update({k: int(v) for k, v in e.groupdict().items()})
            i += 1
            # Indented lines that follow belong to this exporter.
            while i < len(lines) and lines[i][:1].isspace():
                c = SHOW_CACHE.match(lines[i])
                if c:
                    counters["cache"] = int(c["cache"])
                    r = SHOW_RULES.match(lines[i])
                    assert r, f"cache line not understood:\n{text}"
                    counters.update(
                        active_timeout=int(r["active_timeout"]),
                        idle_timeout=int(r["idle_timeout"] or 0),
                        max_flows=int(r["max_flows"]),
                        tcp_end=int(r["tcp_end"] == "on"))
                e = SHOW_ENDED.match(lines[i])
                if e:
                    counters.update({k: int(v)
                                     for k, v in e.groupdict().items()})
                i += 1
            assert "cache" in counters, f"no cache size for {key}:\n{text}"
            assert "ended_forced" in counters, \
                f"no end reasons for {key}:\n{text}"
            show.exporters[key] = counters
            show.order.append(key)
            continue
        m = SHOW_CHANNEL.match(line)
        if m:
            for part in m.group(1).split(", "):
                name, _, value = part.partition("=")
                show.channel[name.replace(" ", "_")] = int(value)
        elif line.startswith("ovsdb: "):
            show.ovsdb = line[len("ovsdb: "):]
        elif line.startswith("fast path: "):
            show.fast_path = line[len("fast path: "):]
        elif line.startswith("loop: "):
            show.loop = {}
            for part in line[len("loop: "):].split(", "):
                name, _, value = part.partition("=")
                show.loop[name.replace(" ", "_")] = float(
                    value.removesuffix(" ms"))
        elif line.startswith("metrics: "):
            show.metrics = line[len("metrics: "):]
        elif line.startswith("no IPFIX exporter on bridge "):
            pass
        else:
            raise AssertionError(f"ipfix/show line not understood: "
                                 f"{line!r}\n{text}")
        i += 1
    assert show.channel, f"no channel line:\n{text}"
    return show


def expected_counters(frames):
    """The counters one exporter shows after every frame was sampled
    once (sampling 1), before any export: from the traffic truth."""
    truth = truth_of(frames)
    c = collections.Counter()
    for t in truth.values():
        if t.kind != "other":
            c[f"{t.kind}_{'ok' if t.status == 'ok' else 'errs'}"] += \
                t.packets
    return {"flows": len(truth), "current_flows": len(truth),
            "pkts": len(frames), "ipv4_ok": c["ipv4_ok"],
            "ipv6_ok": c["ipv6_ok"], "errs": c["ipv4_errs"] + c["ipv6_errs"],
            "ipv4_errs": c["ipv4_errs"], "ipv6_errs": c["ipv6_errs"],
            "cache": len(truth), "tx_errs": 0}


def subset(counters, keys):
    return {k: counters[k] for k in keys}


# ---------------------------------------------------------------------
# Records against the truth


def record_flow_id(r):
    """A decoded record's flow identity, as traffic.FlowId spells it."""
    def ip(text):
        return None if text is None else str(ipaddress.ip_address(text))

    return FlowId(r["src_mac"].lower(), r["dst_mac"].lower(),
                  r["ethertype"], r.get("vlan"), r.get("ip_version"),
                  ip(r.get("src_ip")), ip(r.get("dst_ip")), r.get("proto"),
                  r.get("src_port"), r.get("dst_port"), r.get("icmp_type"),
                  r.get("icmp_code"))


TOTALS = ("packets", "l2_octets", "octets", "min_len", "max_len", "sumsq",
          "tcp_flags")


def by_flow(records):
    """{FlowId: record}; asserts one record per flow."""
    out = {}
    dups = []
    for r in records:
        fid = record_flow_id(r)
        if fid in out:
            dups.append(fid)
        out[fid] = r
    assert not dups, f"{len(dups)} flows in several records: {dups[:3]}"
    return out


def assert_flows_exact(records, truth, reason=None):
    """Every flow of ``truth`` in exactly one record, with its exact
    totals (packets, L2 and IP octets, min/max IP length, sum of
    squares, TCP flags) and, if given, end ``reason``."""
    got = by_flow(records)
    missing = [f for f in truth if f not in got]
    extra = [f for f in got if f not in truth]
    assert not missing and not extra, (
        f"{len(missing)} flows missing, e.g. {missing[:2]}; "
        f"{len(extra)} unexpected, e.g. {extra[:2]}")
    wrong = []
    for fid, t in truth.items():
        r = got[fid]
        want = {"packets": t.packets, "l2_octets": t.l2_octets,
                "octets": t.ip_octets, "min_len": t.min_ip_len,
                "max_len": t.max_ip_len, "sumsq": t.sumsq,
                "tcp_flags": t.tcp_flags}
        have = {k: r.get(k, 0) for k in TOTALS}
        if have != want:
            wrong.append((fid, have, want))
        if reason is not None and r.get("end_reason") != reason:
            wrong.append((fid, "end_reason", r.get("end_reason")))
    assert not wrong, f"{len(wrong)} flows wrong, e.g. {wrong[:3]}"


def flush_and_collect(exporter, collectors, bridge=None):
    """``ipfix/flush [BRIDGE]``; wait until each collector received the
    flush and went quiet.  Returns the reply."""
    before = [len(c.datagrams) for c in collectors]
    reply = exporter.appctl("ipfix/flush", *([bridge] if bridge else []))
    for c, n in zip(collectors, before):
        assert c.wait_quiet(n, quiet=0.3), "no IPFIX after the flush"
    return reply


def sample(frame, bridge="br0", probability=UINT32_MAX):
    """A bridge sample of ``frame`` (ingress on port 1; probability 1/1
    by default), for datagrams the tests build themselves."""
    return upcall.BridgeSample(bridge, 1, None, probability, frame,
                               len(frame))


# ---------------------------------------------------------------------
# Totals per flow (tshark's normalized records, our parser's, the truth)


def flow_id(rec):
    """A tshark record's identity as a traffic.FlowId."""
    def ip(key):
        value = rec.get(key)
        return None if value is None else str(ipaddress.ip_address(value))

    return tr.FlowId(rec["src_mac"], rec["dst_mac"], rec["ethertype"],
                     rec.get("vlan"), rec.get("ip_version"), ip("src_ip"),
                     ip("dst_ip"), rec.get("proto"), rec.get("src_port"),
                     rec.get("dst_port"), rec.get("icmp_type"),
                     rec.get("icmp_code"))


def totals(records):
    """{FlowId: (packets, layer-2 octets, IP octets)} of tshark records,
    summed over records of one flow."""
    out = {}
    for r in records:
        fid = flow_id(r)
        p, l2, ip = out.get(fid, (0, 0, 0))
        out[fid] = (p + r["packets"], l2 + r["l2_octets"],
                    ip + r.get("octets", 0))
    return out


def truth_totals(truth):
    return {fid: (t.packets, t.l2_octets, t.ip_octets)
            for fid, t in truth.items()}


def our_totals(records):
    return totals([r.normalized() for r in records])


# ---------------------------------------------------------------------
# --metrics


def scrape(url):
    """GET ``url`` (the daemon's /metrics) with urllib, parsed by
    prometheus_client's own parser (a malformed line fails):
    {(sample name, frozenset(labels)): value}."""
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, key
            out[key] = s.value
    return out
