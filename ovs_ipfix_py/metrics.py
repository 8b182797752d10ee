"""Prometheus metrics for operators: ``--metrics=[ADDR:]PORT``.

What ``ovs-appctl ... ipfix/show`` prints for a person at a shell, served
as Prometheus text exposition for a scraper: every exporter counter
(labelled by bridge and collector set), every collector's, the cache
occupancy, samples dropped and why, the channel's datagrams and errors,
the time the poll loop spends per iteration (a histogram), and whether
OVSDB is connected.  The text is produced by the ``prometheus-client``
library (a custom :class:`DaemonCollector` handed to a private
``CollectorRegistry``, encoded by ``prometheus_client.exposition``).

Why the HTTP side is served from the poll loop, not from
``prometheus_client.start_http_server``'s thread: the daemon is one
thread, and its counters are plain attributes and dicts that the loop
mutates between (and, for the cache, during) its calls.  A scrape on
another thread would read them half-way through a batch, and iterating
the exporter dict while the loop reconciles it can raise.  Copying a
snapshot for a thread to read would cost the loop on every iteration
for a scrape that comes every 15 s.  So :class:`MetricsServer` is one
more ``run()``/``wait(poller)`` part of the loop: its listening socket
and its connections are non-blocking and registered with the poller; a
request is answered in the iteration that completes it, from the state
the loop has between two iterations -- always consistent, always exact,
and costing nothing when nobody scrapes.  A slow or silent client never
blocks the loop: reads and writes are non-blocking, an exchange has
``REQUEST_TIMEOUT`` s to complete, a request at most ``MAX_REQUEST``
bytes, and at most ``MAX_CONNECTIONS`` are open at once (the oldest
goes first).

Off by default; a port alone binds 127.0.0.1 (counters describe the
network's traffic: exposing them is a choice, ``0.0.0.0:PORT`` or
``[::]:PORT``).
"""

from __future__ import annotations

import bisect
import errno
import socket
import time
from typing import Dict, List, Optional, Tuple

import ovs.poller
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.exposition import choose_encoder

from ovs_ipfix_py import __version__, fastpath
from ovs_ipfix_py.ratelimit import RateLimitedLog

log = RateLimitedLog("metrics")

DEFAULT_ADDRESS = "127.0.0.1"
#: Bytes a request (line and headers) may have.
MAX_REQUEST = 8192
#: Seconds a client has to send its whole request.
REQUEST_TIMEOUT = 10.0
#: Connections open at once; one more closes the oldest.
MAX_CONNECTIONS = 16
#: Upper bounds (s) of the loop histograms' buckets (+Inf added).
LOOP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                0.25, 0.5, 1.0, 2.5, 5.0)


class MetricsAddressError(ValueError):
    """A ``--metrics`` value that is not ``[ADDR:]PORT``."""


def parse_address(text: str) -> Tuple[str, int]:
    """``PORT``, ``ADDR:PORT`` or ``[IPv6]:PORT`` -> (address, port).

    A port alone (or an empty address) means 127.0.0.1.  Port 0 asks
    the kernel for a free one (``ipfix/show`` prints the one it got).
    """
    text = text.strip()
    addr, sep, port = text.rpartition(":")
    if not sep:
        addr, port = "", text
    if addr.startswith("[") and addr.endswith("]"):
        addr = addr[1:-1]
    elif ":" in addr:
        raise MetricsAddressError(
            "%r: write an IPv6 address in brackets, [ADDR]:PORT" % text)
    if not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise MetricsAddressError("%r: port must be a number 0..65535"
                                  % text)
    return addr or DEFAULT_ADDRESS, int(port)


class LoopHistogram:
    """Durations (s) in cumulative Prometheus buckets, with their sum,
    count and maximum.  ``observe`` is a bisect and two additions: cheap
    enough for every loop iteration."""

    __slots__ = ("bounds", "counts", "sum", "count", "max")

    def __init__(self, bounds=LOOP_BUCKETS):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)   # last one: +Inf
        self.sum = 0.0
        self.count = 0
        self.max = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds
        self.count += 1
        if seconds > self.max:
            self.max = seconds

    def buckets(self) -> List[Tuple[str, int]]:
        """Cumulative (upper bound, count) pairs, "+Inf" last."""
        out = []
        total = 0
        for bound, n in zip(self.bounds + (float("inf"),), self.counts):
            total += n
            out.append(("+Inf" if bound == float("inf") else repr(bound),
                        total))
        return out

    def over(self, seconds: float) -> int:
        """How many observations exceeded ``seconds`` (a bucket bound)."""
        i = bisect.bisect_left(self.bounds, seconds)
        return sum(self.counts[i + 1:])


class LoopStats:
    """How long the poll loop works per iteration, blocking excluded.

    ``iteration``: one whole iteration's work (configuration, channel
    reads, exporters, control, metrics).  ``read_gap``: the work between
    the end of one channel read and the start of the next, time blocked
    in poll excluded -- how long a datagram that is already queued
    waits for the loop to come back to the socket.  ``read_gap_cpu``:
    the same gaps in the thread's CPU time -- the loop's own work,
    without the time other processes held the CPU (what a test on a
    busy machine can bound).
    """

    def __init__(self):
        self.iteration = LoopHistogram()
        self.read_gap = LoopHistogram()
        self.read_gap_cpu = LoopHistogram()

    def format(self) -> str:
        """One ``ipfix/show`` line (ms)."""
        it, gap = self.iteration, self.read_gap
        return ("loop: iterations=%d, mean=%.3f ms, max=%.3f ms, "
                "max read gap=%.3f ms, read gaps over 100 ms=%d, "
                "max read gap cpu=%.3f ms"
                % (it.count, it.sum / it.count * 1e3 if it.count else 0.0,
                   it.max * 1e3, gap.max * 1e3, gap.over(0.1),
                   self.read_gap_cpu.max * 1e3))


def _exporter_labels(exp) -> List[str]:
    o = exp.options
    if exp.is_bridge:
        return [o.bridge, "bridge", ""]
    return [o.bridge, "flow", str(o.collector_set_id)]


#: Exporter counters: (metric name, ExporterStats slot, help text).
_EXPORTER_COUNTERS = (
    ("flows", "flows", "Flows created (ipfix/show flows)."),
    ("sampled_packets", "pkts",
     "Samples taken (ipfix/show sampled pkts)."),
    ("ipv4_ok", "ipv4_ok", "IPv4 samples parsed (ipfix/show ipv4 ok)."),
    ("ipv6_ok", "ipv6_ok", "IPv6 samples parsed (ipfix/show ipv6 ok)."),
    ("packet_errors", "errs",
     "Samples with a damaged IP header (ipfix/show pkts errs)."),
    ("ipv4_errors", "ipv4_errs", "Of which IPv4 (ipfix/show ipv4 errs)."),
    ("ipv6_errors", "ipv6_errs", "Of which IPv6 (ipfix/show ipv6 errs)."),
    ("tx_messages", "tx_pkts",
     "IPFIX messages sent, summed over collectors (ipfix/show tx pkts)."),
    ("tx_errors", "tx_errs",
     "IPFIX messages that failed to send (ipfix/show tx errs)."),
    ("records", "records", "Data records exported."),
    ("not_sent_flows", "not_sent_flows",
     "Flow records lost (RFC 7011 4.3 notSentFlowTotalCount)."),
    ("not_sent_packets", "not_sent_packets",
     "Packets of lost records (notSentPacketTotalCount)."),
    ("not_sent_octets", "not_sent_octets",
     "Octets of lost records (notSentOctetTotalCount)."),
)


class DaemonCollector:
    """A prometheus_client collector reading a ``daemon.Daemon``.

    ``collect()`` runs on the loop's thread (see the module docstring),
    so it reads the live objects directly.
    """

    def __init__(self, daemon):
        self.daemon = daemon

    def collect(self):
        d = self.daemon
        exporters = [e for _, e in sorted(d.reconciler.exporters.items(),
                                          key=lambda kv: repr(kv[0]))]
        names = ["bridge", "kind", "collector_set_id"]
        prefix = "ovs_ipfix_exporter_"

        info = InfoMetricFamily("ovs_ipfix", "The exporter's version and "
                                "the hot path it runs (C or Python).")
        info.add_metric([], {"version": __version__,
                             "fast_path": fastpath.name()})
        yield info

        for metric, slot, text in _EXPORTER_COUNTERS:
            fam = CounterMetricFamily(prefix + metric, text, labels=names)
            for e in exporters:
                fam.add_metric(_exporter_labels(e), getattr(e.stats, slot))
            yield fam

        drops = CounterMetricFamily(
            "ovs_ipfix_samples_dropped",
            "Samples that reached no flow, by reason: no_exporter (no "
            "exporter for the bridge or collector set), malformed (lost "
            "with a malformed channel datagram), direction_disabled "
            "(enable-input/output-sampling false), bad_probability (a "
            "flow sample with probability 0).",
            labels=names + ["reason"])
        drops.add_metric(["", "", "", "no_exporter"], d.unmatched_samples)
        drops.add_metric(["", "", "", "malformed"],
                         d.channel.stats.get("malformed_upcalls", 0))
        for e in exporters:
            labels = _exporter_labels(e)
            drops.add_metric(labels + ["direction_disabled"],
                             e.stats.dropped_disabled)
            drops.add_metric(labels + ["bad_probability"],
                             e.stats.dropped_bad_probability)
        yield drops

        cache = GaugeMetricFamily(prefix + "cache_flows",
                                  "Flows in the cache now (ipfix/show "
                                  "current flows).", labels=names)
        cache_max = GaugeMetricFamily(prefix + "cache_max_flows",
                                      "The cache_max_flows option.",
                                      labels=names)
        timeout = GaugeMetricFamily(prefix + "cache_active_timeout_seconds",
                                    "The cache_active_timeout option.",
                                    labels=names)
        pending = GaugeMetricFamily(
            prefix + "export_backlog_flows",
            "Flows that left the cache and wait to be sent (an export "
            "is sent in slices between channel reads).", labels=names)
        for e in exporters:
            labels = _exporter_labels(e)
            cache.add_metric(labels, len(e.cache))
            cache_max.add_metric(labels, e.options.export.cache.max_flows)
            timeout.add_metric(labels,
                               e.options.export.cache.active_timeout)
            pending.add_metric(labels, e.backlog())
        yield cache
        yield cache_max
        yield timeout
        yield pending

        cnames = names + ["target", "transport"]
        per_collector = (
            (CounterMetricFamily, "tx_messages", "tx_packets",
             "IPFIX messages sent (or queued, on a stream) to one "
             "collector."),
            (CounterMetricFamily, "tx_bytes", "tx_bytes",
             "Bytes sent to one collector."),
            (CounterMetricFamily, "tx_errors", "tx_errors",
             "Failed sends and failed connection attempts."),
            (CounterMetricFamily, "dropped_records", "dropped_records",
             "Data records a collector's transport lost (buffer full, "
             "connection lost in the middle of a message)."),
            (GaugeMetricFamily, "connected", "connected",
             "1 when the transport is connected (always 1 for UDP)."),
            (GaugeMetricFamily, "buffered_messages", "buffered_messages",
             "Messages waiting in a stream's buffer."),
            (GaugeMetricFamily, "buffered_records", "buffered_records",
             "Data records waiting in a stream's buffer."))
        fams = [(cls("ovs_ipfix_collector_" + metric, text,
                     labels=cnames), attr)
                for cls, metric, attr, text in per_collector]
        bad = GaugeMetricFamily(
            "ovs_ipfix_collector_bad_targets",
            "Targets that do not parse or resolve (skipped, retried when "
            "transient).", labels=names)
        for e in exporters:
            labels = _exporter_labels(e)
            for c in e.collectors.collectors:
                clabels = labels + [c.spec, getattr(c, "kind", "") or "udp"]
                for fam, attr in fams:
                    fam.add_metric(clabels, int(getattr(c, attr, 0)))
            bad.add_metric(labels, len(e.collectors.bad_targets))
        for fam, _ in fams:
            yield fam
        yield bad

        cs = d.channel.stats
        for key, metric, text in (
                ("datagrams", "datagrams", "Datagrams received."),
                ("upcalls", "upcalls", "Upcalls decoded."),
                ("malformed_datagrams", "malformed_datagrams",
                 "Datagrams with any error."),
                ("malformed_upcalls", "malformed_upcalls",
                 "Upcalls lost to malformed datagrams.")):
            yield CounterMetricFamily("ovs_ipfix_channel_" + metric,
                                      "Channel: " + text,
                                      value=cs.get(key, 0))

        yield GaugeMetricFamily("ovs_ipfix_exporters",
                                "Exporters running.",
                                value=len(exporters))
        yield GaugeMetricFamily(
            "ovs_ipfix_exporters_retiring",
            "Removed exporters still sending their last flows.",
            value=len(d.reconciler.retiring))
        yield GaugeMetricFamily("ovs_ipfix_exporters_failed",
                                "Exporters that failed to build and wait "
                                "for a retry.",
                                value=len(d.reconciler.failed))
        yield GaugeMetricFamily("ovs_ipfix_ovsdb_connected",
                                "1 when the OVSDB connection is up.",
                                value=1 if d.config.connected else 0)

        for hist, metric, text in (
                (d.loop.iteration, "ovs_ipfix_loop_iteration_seconds",
                 "Work of one poll-loop iteration (blocking excluded)."),
                (d.loop.read_gap, "ovs_ipfix_loop_read_gap_seconds",
                 "Work between two channel reads (time blocked in poll "
                 "excluded): how long a queued datagram waits."),
                (d.loop.read_gap_cpu,
                 "ovs_ipfix_loop_read_gap_cpu_seconds",
                 "The same gaps in the loop thread's CPU time.")):
            h = HistogramMetricFamily(metric, text)
            h.add_metric([], hist.buckets(), hist.sum)
            yield h
            yield GaugeMetricFamily(metric.replace("_seconds",
                                                   "_max_seconds"),
                                    "The longest since start.",
                                    value=hist.max)


class _Connection:
    __slots__ = ("sock", "inbuf", "outbuf", "deadline")

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock = sock
        self.inbuf = b""
        self.outbuf = b""
        self.deadline = deadline


class MetricsServer:
    """A minimal HTTP/1.0 server for ``GET /metrics`` inside the poll
    loop (see the module docstring): ``run()`` accepts, reads and
    writes what it can without blocking; ``wait(poller)`` registers the
    sockets and the earliest request timeout.  One request per
    connection (``Connection: close``).  Raises OSError when the address
    cannot be bound.
    """

    def __init__(self, daemon, address: str, port: int,
                 clock=time.monotonic):
        self.clock = clock
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(DaemonCollector(daemon))
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        infos = socket.getaddrinfo(address, port, family,
                                   socket.SOCK_STREAM)
        family, _, _, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(MAX_CONNECTIONS)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._listener: Optional[socket.socket] = sock
        self.address = sock.getsockname()[:2]
        self._conns: Dict[int, _Connection] = {}
        self.scrapes = 0
        self.bad_requests = 0

    @property
    def url(self) -> str:
        host, port = self.address
        if ":" in host:
            host = "[%s]" % host
        return "http://%s:%d/metrics" % (host, port)

    def run(self) -> None:
        if self._listener is None:
            return
        now = self.clock()
        self._accept(now)
        for fd, conn in list(self._conns.items()):
            if now >= conn.deadline:
                self._drop(fd)      # too slow to ask or to read
            elif conn.outbuf:
                self._write(fd, conn)
            else:
                self._read(fd, conn)

    def wait(self, poller) -> None:
        if self._listener is None:
            return
        poller.fd_wait(self._listener.fileno(), ovs.poller.POLLIN)
        if not self._conns:
            return
        for fd, conn in self._conns.items():
            poller.fd_wait(fd, ovs.poller.POLLOUT if conn.outbuf
                           else ovs.poller.POLLIN)
        deadline = min(c.deadline for c in self._conns.values())
        delay = deadline - self.clock()
        poller.timer_wait(max(0, int(delay * 1000) + 1))

    def close(self) -> None:
        for fd in list(self._conns):
            self._drop(fd)
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    # -- connections ------------------------------------------------------

    def _accept(self, now: float) -> None:
        for _ in range(MAX_CONNECTIONS):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # EMFILE and the like: the client waits in the backlog.
                log.warn("metrics: accept failed: %s",
                         errno.errorcode.get(e.errno, e))
                return
            sock.setblocking(False)
            if len(self._conns) >= MAX_CONNECTIONS:
                oldest = min(self._conns,
                             key=lambda fd: self._conns[fd].deadline)
                self._drop(oldest)
            self._conns[sock.fileno()] = _Connection(
                sock, now + REQUEST_TIMEOUT)

    def _read(self, fd: int, conn: _Connection) -> None:
        try:
            data = conn.sock.recv(MAX_REQUEST)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(fd)
            return
        if not data:
            self._drop(fd)
            return
        conn.inbuf += data
        end = conn.inbuf.find(b"\r\n\r\n")
        if end < 0:
            end = conn.inbuf.find(b"\n\n")
        if end < 0:
            if len(conn.inbuf) > MAX_REQUEST:
                self._reply(fd, conn, 431, b"request too large\n")
            return
        self._respond(fd, conn, conn.inbuf[:end])

    def _respond(self, fd: int, conn: _Connection, head: bytes) -> None:
        lines = head.decode("latin-1").split("\n")
        parts = lines[0].strip().split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            self.bad_requests += 1
            self._reply(fd, conn, 400, b"bad request\n")
            return
        method, target = parts[0], parts[1]
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            self._reply(fd, conn, 405, b"only GET\n")
            return
        if path not in ("/metrics", "/"):
            self._reply(fd, conn, 404, b"try /metrics\n")
            return
        accept = ""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "accept":
                accept = value.strip()
        encoder, content_type = choose_encoder(accept)
        body = encoder(self.registry)
        self.scrapes += 1
        self._reply(fd, conn, 200, body, content_type,
                    head_only=method == "HEAD")

    def _reply(self, fd: int, conn: _Connection, status: int, body: bytes,
               content_type: str = "text/plain; charset=utf-8",
               head_only: bool = False) -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found",
                  405: "Method Not Allowed",
                  431: "Request Header Fields Too Large"}[status]
        head = ("HTTP/1.0 %d %s\r\nContent-Type: %s\r\n"
                "Content-Length: %d\r\nConnection: close\r\n\r\n"
                % (status, reason, content_type, len(body)))
        conn.outbuf = head.encode("latin-1") + (b"" if head_only else body)
        self._write(fd, conn)

    def _write(self, fd: int, conn: _Connection) -> None:
        try:
            n = conn.sock.send(conn.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(fd)
            return
        conn.outbuf = conn.outbuf[n:]
        if not conn.outbuf:
            self._drop(fd)

    def _drop(self, fd: int) -> None:
        conn = self._conns.pop(fd, None)
        if conn is not None:
            conn.sock.close()
