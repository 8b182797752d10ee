#!/usr/bin/env python3
"""How long from an ``ovs-vsctl`` commit to the forced-end records?

Starts, in a fresh directory under /tmp, a private ovsdb-server, a UDP
collector on 127.0.0.1 and the exporter, configures a bridge exporter
(sampling 1, cache_active_timeout 60 s, cache_max_flows 1000) and then,
``--changes`` times (default 20):

1. feeds one bridge sample, and checks it sits in the cache;
2. runs ``ovs-vsctl --no-wait set IPFIX br0 cache_active_timeout=N``
   (a new N each time, so each is a real change);
3. measures from the moment ovs-vsctl returned (its transaction is
   committed by then) to the kernel's arrival timestamp (SO_TIMESTAMPNS)
   of the first datagram carrying a data record with flowEndReason 4
   (forced end, RFC 5102) at the collector.

Then prints the median, p90 (nearest rank) and max in milliseconds and
one of the commands measured.

Modes (``--mode``):

- ``daemon`` (the default when ``ovs_ipfix_py.channel`` exists): the
  real daemon, ``python3 -m ovs_ipfix_py.daemon --db=unix:... --channel=
  ... --unixctl=... --detach --pidfile=...``; samples go over its upcall
  channel (schemas/channel.md), the cache is checked with
  ``ovs-appctl ipfix/show``.
- ``inprocess``: the same loop (ConfigReader + Reconciler + exporters on
  an ``ovs.poller``) in this process, samples fed to the exporter
  directly.  Here the loop cannot run while ovs-vsctl runs, so the
  figure includes nothing of the IDL working in parallel.

Everything started is stopped by its pid file in a ``finally``, and the
directory removed (``--keep`` keeps it, for the logs).
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from typing import List, NamedTuple, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from ovs_ipfix_py import upcall  # noqa: E402
from tools import arrivals  # noqa: E402

SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"
FORCED_END = 4
FLOW_END_REASON = 136
UINT32_MAX = 0xFFFFFFFF


def frame(sport: int) -> bytes:
    """An Ethernet/IPv4/UDP frame of 100 bytes, UDP source ``sport``."""
    payload = bytes(58)
    udp = struct.pack("!HHHH", sport, 4000, 8 + len(payload), 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + len(payload), 0, 0,
                     64, 17, 0, socket.inet_aton("192.0.2.1"),
                     socket.inet_aton("192.0.2.2"))
    return (bytes.fromhex("0200000000020200000000010800") + ip + udp
            + payload)


# -- a collector with kernel arrival times ---------------------------------


class Collector:
    """UDP on 127.0.0.1; ``receive(timeout)`` returns [(arrival s,
    bytes)] with the kernel's receive timestamp, so time spent in this
    process (waiting for ovs-vsctl) does not count.  ``forced_end(data)``
    says whether a message carries a forced-end data record (templates
    are learnt per observation domain as they pass)."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        arrivals.enable_timestamps(self.sock)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.templates = {}  # (domain, id) -> [(ie, length)]

    @property
    def target(self) -> str:
        return "127.0.0.1:%d" % self.sock.getsockname()[1]

    def receive(self, timeout: float):
        return arrivals.receive(self.sock, timeout)

    def drain(self):
        while self.receive(0):
            pass

    def forced_end(self, data: bytes) -> bool:
        """True if ``data`` (one IPFIX message) holds a data record with
        flowEndReason 4.  A small RFC 7011 reader: templates (set 2),
        data sets through them; options sets are ignored."""
        domain = struct.unpack_from("!I", data, 12)[0]
        pos, end = 16, min(len(data), struct.unpack_from("!H", data, 2)[0])
        found = False
        while pos + 4 <= end:
            set_id, length = struct.unpack_from("!HH", data, pos)
            if length < 4:
                break
            body = data[pos + 4:pos + length]
            if set_id == 2:
                self._learn(domain, body)
            elif set_id >= 256:
                found |= self._has_forced_end(
                    self.templates.get((domain, set_id)), body)
            pos += length
        return found

    def _learn(self, domain, body):
        pos = 0
        while pos + 4 <= len(body):
            tid, count = struct.unpack_from("!HH", body, pos)
            pos += 4
            fields = []
            for _ in range(count):
                ie, length = struct.unpack_from("!HH", body, pos)
                pos += 4
                if ie & 0x8000:
                    pos += 4  # an enterprise element: not ours to read
                    ie = -1
                fields.append((ie, length))
            self.templates[(domain, tid)] = fields

    @staticmethod
    def _has_forced_end(fields, body):
        if not fields:
            return False
        pos = 0
        while pos < len(body):
            for ie, length in fields:
                if length == 0xFFFF:
                    if pos >= len(body):
                        return False
                    length = body[pos]
                    pos += 1
                    if length == 255:
                        length = struct.unpack_from("!H", body, pos)[0]
                        pos += 2
                if pos + length > len(body):
                    return False  # padding
                if ie == FLOW_END_REASON and int.from_bytes(
                        body[pos:pos + length], "big") == FORCED_END:
                    return True
                pos += length
        return False

    def close(self):
        self.sock.close()


# -- processes ---------------------------------------------------------------


class Rig:
    """The private ovsdb-server (and, in daemon mode, the exporter) in
    ``workdir``.  ``stop()`` stops both by pid file."""

    def __init__(self, workdir: str):
        self.dir = workdir
        self.db_sock = os.path.join(workdir, "db.sock")
        self.remote = "unix:" + self.db_sock
        self.env = dict(os.environ)
        for name in ("OVS_RUNDIR", "OVS_LOGDIR", "OVS_DBDIR",
                     "OVS_SYSCONFDIR"):
            self.env[name] = workdir
        self.env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
        self.pidfiles = []

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def run(self, *argv, check=True):
        return subprocess.run(argv, env=self.env, cwd=self.dir,
                              stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, check=check,
                              timeout=30)

    def vsctl_argv(self, *args):
        return ["ovs-vsctl", "--db=" + self.remote, "--timeout=10",
                "--no-wait", *args]

    def vsctl(self, *args):
        return self.run(*self.vsctl_argv(*args)).stdout

    def start_ovsdb(self):
        self.run("ovsdb-tool", "create", self.path("conf.db"), SCHEMA)
        self.pidfiles.append(self.path("ovsdb-server.pid"))
        self.run("ovsdb-server", "--remote=punix:" + self.db_sock,
                 "--pidfile=" + self.path("ovsdb-server.pid"), "--detach",
                 "--no-chdir", "--log-file=" + self.path("ovsdb-server.log"),
                 "-vconsole:off",
                 "--unixctl=" + self.path("ovsdb-server.ctl"),
                 self.path("conf.db"))
        self.vsctl("init")

    def start_daemon(self):
        self.channel = self.path("channel.sock")
        self.ctl = self.path("exporter.ctl")
        self.pidfiles.insert(0, self.path("exporter.pid"))
        # --detach returns once the daemon is up (its sockets bound).
        self.run(sys.executable, "-m", "ovs_ipfix_py.daemon",
                 "--db=" + self.remote, "--channel=" + self.channel,
                 "--unixctl=" + self.ctl, "--detach", "--no-chdir",
                 "--pidfile=" + self.path("exporter.pid"),
                 "--log-file=" + self.path("exporter.log"),
                 "-vconsole:off")

    def appctl(self, *args):
        return self.run("ovs-appctl", "-t", self.ctl, *args).stdout

    def pids(self):
        """Pids in the pid files of what was started."""
        out = []
        for pidfile in self.pidfiles:
            try:
                with open(pidfile) as f:
                    out.append(int(f.read().strip()))
            except (OSError, ValueError):
                continue
        return out

    def stop(self):
        for pid in self.pids():
            _kill(pid)


def _alive(pid: int) -> bool:
    try:
        with open("/proc/%d/stat" % pid) as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def _kill(pid: int) -> None:
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if not _alive(pid):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)


def _until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out waiting for " + what)
        time.sleep(0.005)


# -- the two ways of running the exporter ----------------------------------


class DaemonExporter:
    """The real daemon as a subprocess."""

    def __init__(self, rig: Rig):
        self.rig = rig
        rig.start_daemon()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        _until(lambda: "no IPFIX exporter" not in rig.appctl(
            "ipfix/show", "br0"), 10.0, "the bridge exporter")

    def cached_flows(self) -> int:
        text = self.rig.appctl("ipfix/show", "br0")
        head = text.split("current flows=", 1)[1]
        return int(head.split(",", 1)[0])

    def feed(self, sport: int):
        f = frame(sport)
        self.sock.sendto(upcall.encode([upcall.BridgeSample(
            "br0", 1, None, UINT32_MAX, f, len(f))]), self.rig.channel)
        _until(lambda: self.cached_flows() >= 1, 5.0, "the sample cached")

    def change(self, argv):
        """Run ``argv`` (ovs-vsctl); return the time it returned."""
        subprocess.run(argv, env=self.rig.env, check=True,
                       stdin=subprocess.DEVNULL, capture_output=True)
        return time.time()

    def wait_forced_end(self, collector, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for arrival, data in collector.receive(
                    deadline - time.monotonic()):
                if collector.forced_end(data):
                    return arrival
        raise RuntimeError("no forced-end record within %.1f s" % timeout)

    def close(self):
        self.sock.close()


class InProcessExporter:
    """ConfigReader + Reconciler + exporters in this process."""

    def __init__(self, rig: Rig):
        import ovs.poller

        from ovs_ipfix_py.config import ConfigReader
        from ovs_ipfix_py.reconcile import Reconciler
        self.poller_cls = ovs.poller.Poller
        self.config = ConfigReader(rig.remote)
        self.reconciler = Reconciler()
        self.rig = rig
        self._step_until(lambda: ("bridge", "br0")
                         in self.reconciler.exporters, 10.0)

    def _step(self, max_ms):
        self.config.run()
        if self.config.changed():
            self.reconciler.apply(self.config.desired(), time.time())
        now = time.time()
        for exp in list(self.reconciler.exporters.values()):
            exp.run(now)
        poller = self.poller_cls()
        self.config.wait(poller)
        poller.timer_wait(max_ms)
        return poller

    def _step_until(self, predicate, timeout):
        deadline = time.monotonic() + timeout
        while True:
            poller = self._step(int(max(1, (deadline - time.monotonic())
                                        * 1000)))
            if predicate():
                return
            if time.monotonic() > deadline:
                raise RuntimeError("timed out")
            poller.block()

    def feed(self, sport: int):
        exp = self.reconciler.exporters[("bridge", "br0")]
        f = frame(sport)
        exp.sample_bridge(f, len(f), 1, None, time.time())
        assert len(exp.cache) >= 1

    def change(self, argv):
        subprocess.run(argv, env=self.rig.env, check=True,
                       stdin=subprocess.DEVNULL, capture_output=True)
        return time.time()

    def wait_forced_end(self, collector, timeout):
        exp = self.reconciler.exporters[("bridge", "br0")]
        self._step_until(lambda: len(exp.cache) == 0, timeout)
        for arrival, data in collector.receive(timeout):
            if collector.forced_end(data):
                return arrival
        raise RuntimeError("no forced-end record within %.1f s" % timeout)

    def close(self):
        self.reconciler.close(time.time())
        self.config.close()


# -- main --------------------------------------------------------------------


def percentile(values, fraction):
    """Nearest-rank percentile of ``values``."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def _summary(values):
    return ("  median %.2f  p90 %.2f  max %.2f  min %.2f"
            % (statistics.median(values), percentile(values, 0.9),
               max(values), min(values)))


class Result(NamedTuple):
    """Per change, in ms: ``from_commit`` (ovs-vsctl returned -> first
    forced-end datagram's kernel arrival), ``from_start`` (ovs-vsctl
    started -> the same), ``vsctl`` (ovs-vsctl's own run time); and
    ``command``, the last ovs-vsctl command line; ``workdir`` and
    ``pids``: where it all ran and what was started (all gone by the
    time ``measure`` returns, unless kept)."""

    mode: str
    from_commit: List[float]
    from_start: List[float]
    vsctl: List[float]
    command: str = ""
    workdir: str = ""
    pids: Tuple[int, ...] = ()


def measure(mode: str, changes: int, keep: bool = False) -> Result:
    """Set everything up, make ``changes`` changes, clean up."""
    workdir = tempfile.mkdtemp(prefix="rlat-", dir="/tmp")
    rig = Rig(workdir)
    collector = Collector()
    exporter = None
    try:
        rig.start_ovsdb()
        rig.vsctl("add-br", "br0", "--", "set", "Bridge", "br0",
                  "datapath_type=dummy",
                  "--", "--id=@i", "create", "IPFIX",
                  'targets="%s"' % collector.target, "sampling=1",
                  "cache_active_timeout=60", "cache_max_flows=1000",
                  "--", "set", "Bridge", "br0", "ipfix=@i")
        exporter = (DaemonExporter if mode == "daemon"
                    else InProcessExporter)(rig)
        result = Result(mode, [], [], [], workdir=workdir)
        argv = []
        for i in range(changes):
            exporter.feed(10000 + i)
            collector.drain()
            argv = rig.vsctl_argv("set", "IPFIX", "br0",
                                  "cache_active_timeout=%d" % (100 + i))
            started = time.time()
            committed = exporter.change(argv)
            arrival = exporter.wait_forced_end(collector, 5.0)
            result.from_commit.append((arrival - committed) * 1000)
            result.from_start.append((arrival - started) * 1000)
            result.vsctl.append((committed - started) * 1000)
        return result._replace(
            command=" ".join(shlex.quote(a) for a in argv),
            pids=tuple(rig.pids()))
    finally:
        if exporter is not None:
            exporter.close()
        collector.close()
        rig.stop()
        if keep:
            print("kept %s" % workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def report(result: Result) -> str:
    return "\n".join([
        "mode: %s, %d changes" % (result.mode, len(result.from_commit)),
        "command: %s" % result.command,
        "ovs-vsctl returned (commit) -> forced-end records at the "
        "collector (kernel arrival time), ms:",
        _summary(result.from_commit),
        "  (negative: the records arrived before ovs-vsctl had exited)",
        "ovs-vsctl started -> forced-end records, ms:",
        _summary(result.from_start),
        "ovs-vsctl itself (start -> return), ms: median %.2f"
        % statistics.median(result.vsctl),
        "all (from commit), ms: "
        + " ".join("%.2f" % x for x in result.from_commit)])


def main(argv=None) -> int:
    try:
        import ovs_ipfix_py.channel  # noqa: F401
        default_mode = "daemon"
    except ImportError:
        default_mode = "inprocess"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", type=int, default=20,
                        help="number of ovs-vsctl changes (default 20)")
    parser.add_argument("--mode", choices=("daemon", "inprocess"),
                        default=default_mode,
                        help="run the exporter as the real daemon or in"
                        " this process (default: %(default)s)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the working directory (logs)")
    args = parser.parse_args(argv)
    if args.changes < 1:
        parser.error("--changes must be at least 1")
    print(report(measure(args.mode, args.changes, args.keep)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
