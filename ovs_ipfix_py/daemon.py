"""``ovs-ipfix-exporter``: the daemon.

One process, one thread, one ``ovs.poller`` loop in the OVS manner::

    while not exiting:
        config.run()            # OVSDB (ovs.db.idl) -> option values
        reconcile if changed    # running exporters follow the values
        channel.run()           # upcalls -> exporters' caches
        exporter.run(now)       # expire, export, refresh templates
        unixctl.run()           # ovs-appctl commands
        metrics.run()           # --metrics: Prometheus scrapes
        ...wait() on each, a timer for the earliest exporter deadline
        poller.block()

Each iteration's work (blocking excluded) is timed into a histogram
(``metrics.LoopStats``), and so is the work between one channel read and
the next (blocking excluded again): how long a queued datagram waits.

Nothing polls on a fixed tick: the IDL's socket, the channel's socket,
the unixctl socket, the signal pipe and the exporters' next deadlines
wake the loop, and so do the exporters' transports (a TCP collector
connecting or going away, a queue to write).  SIGTERM, SIGINT and
``ovs-appctl exit`` flush every cache as forced end before exiting;
SIGHUP and ``ovs-appctl ipfix/reopen`` start new IPFIX files (file:
targets, after logrotate renamed them).
"""

from __future__ import annotations

import argparse
import errno
import gc
import os
import signal
import sys
import time
from typing import Dict, List, Optional

import ovs.daemon
import ovs.dirs
import ovs.poller
import ovs.stream
import ovs.unixctl
import ovs.unixctl.server
import ovs.util
import ovs.vlog

from ovs_ipfix_py import __version__, fastpath
from ovs_ipfix_py.channel import ChannelServer
from ovs_ipfix_py.config import ConfigReader
from ovs_ipfix_py.metrics import (
    LoopStats,
    MetricsAddressError,
    MetricsServer,
    parse_address,
)
from ovs_ipfix_py.ratelimit import RateLimitedLog
from ovs_ipfix_py.reconcile import Reconciler
from ovs_ipfix_py.transport import tls
from ovs_ipfix_py.upcall import BridgeSample

PROGRAM = "ovs-ipfix-exporter"
#: Allocations between young-generation collections (Python: 700).
GC_THRESHOLD_0 = 20000
vlog = ovs.vlog.Vlog("daemon")
log = RateLimitedLog("daemon")


def default_db() -> str:
    return "unix:%s/db.sock" % ovs.dirs.RUNDIR


def default_channel() -> str:
    return "%s/%s.sock" % (ovs.dirs.RUNDIR, PROGRAM)


class Daemon:
    """The loop's state: configuration, exporters, channel, control.

    ``clock`` returns seconds (wall clock: IPFIX export times are wall
    clock, and deadlines are computed and waited on this same clock).
    """

    def __init__(self, db: str, channel_path: str,
                 clock=time.time):
        self.clock = clock
        self.config = ConfigReader(db)
        # Flushes and removed exporters are sent a slice at a time
        # (Exporter.flush): the loop goes back to the channel between.
        self.reconciler = Reconciler(sliced=True)
        self.channel = ChannelServer(channel_path, self.handle_upcalls)
        self.exiting = False
        self.exit_reason = None
        self.unmatched_samples = 0
        self.loop = LoopStats()
        #: Seconds the loop spent blocked in poll since the last channel
        #: read (the main loop adds them): not part of a read gap.
        self.blocked = 0.0
        self._read_end: Optional[float] = None
        self._read_end_cpu = 0.0
        self.metrics: Optional[MetricsServer] = None
        self._signal_r = None
        self.reopen_requested = False

    # -- samples ----------------------------------------------------------

    def handle_upcalls(self, upcalls, now: float) -> None:
        """Dispatch a batch of upcalls to their exporters.

        Samples are grouped per exporter (bridge samples per bridge,
        flow samples per bridge and collector set) and each group handed
        over in one call, in order (the exporter's hot path); a sample
        for a bridge or collector set with no exporter is counted and
        dropped.
        """
        exporters = self.reconciler.exporters
        batches: Dict[tuple, List] = {}
        # Usually one source sent them all: no grouping needed.
        key = (fastpath.C.one_source(upcalls, BridgeSample)
               if fastpath.C is not None and type(upcalls) is list
               else None)
        if key is not None:
            batches[key] = upcalls
            upcalls = ()
        for u in upcalls:
            if type(u) is BridgeSample:
                key = ("bridge", u.bridge)
            else:
                key = ("flow", u.bridge, u.collector_set_id)
            batch = batches.get(key)
            if batch is None:
                batch = batches[key] = []
            batch.append(u)
        for key, batch in batches.items():
            exp = exporters.get(key)
            if exp is None:
                self.unmatched_samples += len(batch)
                if key[0] == "bridge":
                    log.dbg("%d bridge samples for bridge %s: no exporter",
                            len(batch), key[1])
                else:
                    log.dbg("%d flow samples for bridge %s collector set "
                            "%d: no exporter", len(batch), key[1], key[2])
                continue
            exp.sample_batch(batch, now)

    # -- the loop ---------------------------------------------------------

    def run_once(self) -> None:
        self.config.run()
        if self.config.changed():
            self.reconciler.apply(self.config.desired(), self.clock())
            self.set_ports()
        elif self.reconciler.retry(self.clock()):
            # Exporters that failed to build (EMFILE, say) are retried.
            self.set_ports()
        t0 = time.perf_counter()
        cpu0 = time.thread_time()
        if self._read_end is not None:
            self.loop.read_gap.observe(t0 - self._read_end - self.blocked)
            self.loop.read_gap_cpu.observe(cpu0 - self._read_end_cpu)
        self.channel.run(self.clock)
        self._read_end = time.perf_counter()
        self._read_end_cpu = time.thread_time()
        self.blocked = 0.0
        if self.reopen_requested:
            self.reopen_requested = False
            self.reopen()
        now = self.clock()
        for exp in list(self.reconciler.exporters.values()):
            exp.run(now)
        if self.reconciler.retiring:
            self.reconciler.run_retiring(now)

    def set_ports(self) -> None:
        """Every exporter gets its bridge's ports as OVSDB has them: ports
        (Interface rows) are followed live, with no flush."""
        ports = self.config.ports()
        for exp in self.reconciler.exporters.values():
            exp.set_ports(ports.get(exp.options.bridge, {}))

    def wait(self, poller) -> None:
        self.config.wait(poller)
        self.channel.wait(poller)
        if self._signal_r is not None:
            poller.fd_wait(self._signal_r, ovs.poller.POLLIN)
        for exp in self.reconciler.exporters.values():
            exp.wait(poller)
        for exp in self.reconciler.retiring:
            exp.wait(poller)
        deadlines = [d for d in (e.next_deadline() for e in
                                 self.reconciler.exporters.values())
                     if d is not None]
        if self.reconciler.retiring:
            deadlines.append(float("-inf"))
        retry = self.reconciler.next_retry()
        if retry is not None:
            deadlines.append(retry)
        if deadlines:
            delay = min(deadlines) - self.clock()
            if delay <= 0:
                poller.immediate_wake()
            else:
                # Round up: waking a little late beats spinning early.
                poller.timer_wait(int(delay * 1000) + 1)

    def flush(self, bridge: Optional[str] = None) -> int:
        now = self.clock()
        n = 0
        for exp in self.reconciler.exporters.values():
            if bridge is None or exp.options.bridge == bridge:
                n += exp.flush(now, sliced=True)
        return n

    def reopen(self) -> int:
        """Every exporter's file targets start a new file; returns how
        many exporters."""
        vlog.info("reopening IPFIX files")
        for exp in self.reconciler.exporters.values():
            exp.reopen()
        return len(self.reconciler.exporters)

    def show(self, bridge: Optional[str] = None) -> str:
        out = []
        for key in sorted(self.reconciler.exporters, key=repr):
            exp = self.reconciler.exporters[key]
            if bridge is None or exp.options.bridge == bridge:
                out.append(exp.show())
        if bridge is not None and not out:
            return "no IPFIX exporter on bridge %s\n" % bridge
        cs = self.channel.stats
        out.append("channel: datagrams=%d, upcalls=%d, malformed datagrams=%d"
                   ", malformed upcalls=%d, no exporter=%d"
                   % (cs.get("datagrams", 0), cs.get("upcalls", 0),
                      cs.get("malformed_datagrams", 0),
                      cs.get("malformed_upcalls", 0),
                      self.unmatched_samples))
        out.append("ovsdb: %s" % ("connected" if self.config.connected
                                  else "not connected"))
        out.append("fast path: %s" % fastpath.name())
        out.append(self.loop.format())
        if self.metrics is not None:
            out.append("metrics: %s" % self.metrics.url)
        return "\n".join(out) + "\n"

    def shutdown(self) -> None:
        """Flush every cache as forced end, close everything."""
        now = self.clock()
        self.reconciler.close(now)
        self.channel.close()
        self.config.close()
        if self.metrics is not None:
            self.metrics.close()

    # -- signals ----------------------------------------------------------

    def install_signal_handlers(self) -> None:
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        self._signal_r = r
        signal.set_wakeup_fd(w)

        def handler(signr, _frame):
            self.exiting = True
            self.exit_reason = signal.Signals(signr).name

        def hangup(_signr, _frame):
            self.reopen_requested = True

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGHUP, hangup)

    def drain_signal_pipe(self) -> None:
        if self._signal_r is None:
            return
        try:
            while os.read(self._signal_r, 512):
                pass
        except OSError as e:
            if e.errno != errno.EAGAIN:
                raise


def _register_commands(d: Daemon) -> None:
    def show(conn, argv, _aux):
        conn.reply(d.show(argv[0] if argv else None))

    def flush(conn, argv, _aux):
        n = d.flush(argv[0] if argv else None)
        conn.reply("flushed %d flows\n" % n)

    def reopen(conn, _argv, _aux):
        n = d.reopen()
        conn.reply("reopened the IPFIX files of %d exporters\n" % n)

    def do_exit(conn, _argv, _aux):
        d.exiting = True
        d.exit_reason = "ovs-appctl exit"
        conn.reply(None)

    ovs.unixctl.command_register("ipfix/show", "[BRIDGE]", 0, 1, show, None)
    ovs.unixctl.command_register("ipfix/flush", "[BRIDGE]", 0, 1, flush,
                                 None)
    ovs.unixctl.command_register("ipfix/reopen", "", 0, 0, reopen, None)
    ovs.unixctl.command_register("exit", "", 0, 0, do_exit, None)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="IPFIX flow exporter for Open vSwitch: configured "
        "through OVSDB (Bridge.ipfix, IPFIX, Flow_Sample_Collector_Set), "
        "fed sampled packets on a Unix socket channel.")
    parser.add_argument("--db", default=None,
                        help="OVSDB remote (default: unix:$OVS_RUNDIR/"
                        "db.sock = %s)" % default_db())
    parser.add_argument("--channel", default=None,
                        help="upcall channel socket path (default: %s)"
                        % default_channel())
    parser.add_argument("--metrics", metavar="[ADDR:]PORT", default=None,
                        help="serve Prometheus metrics on http://ADDR:PORT/"
                        "metrics (ADDR default 127.0.0.1; off by default)")
    parser.add_argument("--unixctl", default=None,
                        help="control socket path (default: $OVS_RUNDIR/"
                        "%s.PID.ctl)" % PROGRAM)
    ssl = parser.add_argument_group(
        "SSL options (for an ssl: --db remote, as ovs-vsctl takes them, "
        "and for tls: IPFIX targets)")
    ssl.add_argument("-p", "--private-key", metavar="FILE",
                     help="private key file")
    ssl.add_argument("-c", "--certificate", metavar="FILE",
                     help="certificate file")
    ssl.add_argument("-C", "--ca-cert", metavar="FILE",
                     help="CA certificate file")
    parser.add_argument("--version", action="version",
                        version="%s %s" % (PROGRAM, __version__))
    ovs.vlog.add_args(parser)
    ovs.daemon.add_args(parser)
    return parser.parse_args(argv)


def tune_gc() -> None:
    """The loop allocates many short-lived, acyclic objects (a sample
    tuple per upcall, a record per exported flow); the flow cache itself
    holds no tracked objects but its dict and deque.  Move what start-up
    built out of the collector's reach (gc.freeze) and collect the
    young generation less often: fewer, equally bounded passes."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD_0, 10, 10)


def main(argv=None) -> int:
    ovs.util.PROGRAM_NAME = PROGRAM
    args = parse_args(argv)
    ovs.vlog.handle_args(args)
    if not args.log_file:
        # Without a log file, Python's last-resort handler would print
        # the "file" destination's lines on stderr a second time.
        ovs.vlog.Vlog.set_level("any", "file", "off")
    ovs.daemon.handle_args(args)
    db = args.db or default_db()
    if db.startswith("ssl:") or ",ssl:" in db:
        missing = [opt for opt, value in (
            ("--private-key", args.private_key),
            ("--certificate", args.certificate),
            ("--ca-cert", args.ca_cert)) if not value]
        if missing:
            ovs.util.ovs_fatal(0, "an ssl: remote needs %s"
                               % ", ".join(missing), vlog)
        ovs.stream.Stream.ssl_set_private_key_file(args.private_key)
        ovs.stream.Stream.ssl_set_certificate_file(args.certificate)
        ovs.stream.Stream.ssl_set_ca_cert_file(args.ca_cert)
    # tls: targets present our certificate and check the collector's
    # against the CA (ovs_ipfix_py.transport.tls).
    tls.configure(args.private_key, args.certificate, args.ca_cert)
    metrics_at = None
    if args.metrics is not None:
        try:
            metrics_at = parse_address(args.metrics)
        except MetricsAddressError as e:
            ovs.util.ovs_fatal(0, "--metrics: %s" % e, vlog)
    ovs.daemon.daemonize_start()

    error, unixctl = ovs.unixctl.server.UnixctlServer.create(
        args.unixctl, version=__version__)
    if error:
        ovs.util.ovs_fatal(error, "could not create unixctl server at %s"
                           % (args.unixctl or "default path"), vlog)
    try:
        d = Daemon(db, args.channel or default_channel())
    except OSError as e:
        ovs.util.ovs_fatal(e.errno or 0, "cannot start: %s" % e, vlog)
    if metrics_at is not None:
        try:
            d.metrics = MetricsServer(d, *metrics_at)
        except OSError as e:
            ovs.util.ovs_fatal(e.errno or 0, "--metrics: cannot listen on "
                               "%s port %d: %s" % (*metrics_at, e), vlog)
        vlog.info("metrics on %s" % d.metrics.url)
    _register_commands(d)
    d.install_signal_handlers()
    ovs.daemon.daemonize_complete()
    vlog.info("%s %s started (db %s, channel %s)"
              % (PROGRAM, __version__, db, args.channel or default_channel()))
    tune_gc()

    loop = d.loop
    clock = time.perf_counter
    while not d.exiting:
        t0 = clock()
        d.run_once()
        unixctl.run()
        if d.metrics is not None:
            d.metrics.run()
        loop.iteration.observe(clock() - t0)
        if d.exiting:
            break
        poller = ovs.poller.Poller()
        d.wait(poller)
        unixctl.wait(poller)
        if d.metrics is not None:
            d.metrics.wait(poller)
        t0 = clock()
        poller.block()
        d.blocked += clock() - t0
        d.drain_signal_pipe()

    vlog.info("exiting (%s): flushing every cache" % d.exit_reason)
    d.shutdown()
    # Let a pending "exit" reply reach ovs-appctl before the socket goes.
    unixctl.run()
    unixctl.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
