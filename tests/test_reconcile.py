"""OVSDB changes drive the running exporters, end to end.

Real parts only: a private ovsdb-server changed with ``ovs-vsctl
--no-wait``, the ConfigReader and Reconciler run in the daemon's loop
shape (run, wait on an ``ovs.poller``, block), samples fed straight to
the exporters (``sample_bridge`` / ``sample_flow``), and loopback UDP
collectors whose messages are read back with our RFC 7011 parser
(``support.decoders``, which also checks sequence numbers and templates
before data) and, once, with tshark.

Counts: bridge sampling=1 makes each sample one packet and sampling=2
two (UINT32_MAX // (UINT32_MAX // 2)); a flow sample with probability
65535 is one packet.  Octets are frame lengths times that count.
"""

import errno
import importlib.util
import os
import socket
import struct
import time

import ovs.poller
import pytest
from support import kill_pid, pid_alive
from support.collector import UdpCollector
from support.decoders import parse_collector, tshark_decode

from ovs_ipfix_py.config import ConfigReader
from ovs_ipfix_py.flowcache import FORCED_END, LACK_OF_RESOURCES
from ovs_ipfix_py.options import (
    BridgeExporterOptions,
    CacheOptions,
    ExportOptions,
)
from ovs_ipfix_py.reconcile import RETRY_INTERVAL, Changes, Reconciler

BR0 = ("bridge", "br0")

# -- traffic ---------------------------------------------------------------


def udp_frame(sport, dport=4000, payload_len=50):
    """An Ethernet/IPv4/UDP frame 192.0.2.1 -> 192.0.2.2 (the checksums
    do not matter to the exporter).  Length 42 + ``payload_len``."""
    udp = struct.pack("!HHHH", sport, dport, 8 + payload_len, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + payload_len, 0, 0,
                     64, 17, 0, socket.inet_aton("192.0.2.1"),
                     socket.inet_aton("192.0.2.2"))
    eth = bytes.fromhex("0200000000020200000000010800")
    return eth + ip + udp + bytes(payload_len)


def feed_bridge(exp, frames, now=None):
    now = time.time() if now is None else now
    for f in frames:
        exp.sample_bridge(f, len(f), 1, None, now)


def feed_flow(exp, frames, now=None):
    """Flow samples, probability 65535 (each is one packet), ingress."""
    now = time.time() if now is None else now
    for f in frames:
        exp.sample_flow(f, len(f), 1, None, 65535, 5, 9, 1, now)


# -- the loop --------------------------------------------------------------


class Loop:
    """The daemon's loop, in-process: ConfigReader + Reconciler +
    exporters on one ``ovs.poller``; no channel (tests feed samples to
    the exporters directly).  ``applies`` lists each reconciliation's
    Changes, empty ones included (a resync after a reconnect)."""

    def __init__(self, remote):
        self.config = ConfigReader(remote)
        self.reconciler = Reconciler()
        self.applies = []

    @property
    def exporters(self):
        return self.reconciler.exporters

    def run_once(self):
        self.config.run()
        if self.config.changed():
            self.applies.append(self.reconciler.apply(
                self.config.desired(), time.time()))
        now = time.time()
        for exp in list(self.exporters.values()):
            exp.run(now)

    def block(self, max_ms):
        poller = ovs.poller.Poller()
        self.config.wait(poller)
        deadlines = [d for d in (e.next_deadline()
                                 for e in self.exporters.values())
                     if d is not None]
        delay_ms = max_ms
        if deadlines:
            delay_ms = min(delay_ms,
                           (min(deadlines) - time.time()) * 1000)
        if delay_ms <= 0:
            poller.immediate_wake()
        else:
            poller.timer_wait(int(delay_ms) + 1)
        poller.block()

    def pump(self, predicate, timeout=5.0, what="condition"):
        """Run the loop until ``predicate()`` holds after a run."""
        deadline = time.monotonic() + timeout
        while True:
            self.run_once()
            if predicate():
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError("timed out waiting for " + what)
            self.block(min(remaining, 0.5) * 1000)

    def spin(self, seconds):
        """Run the loop for ``seconds`` whatever happens."""
        deadline = time.monotonic() + seconds
        while True:
            self.run_once()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self.block(remaining * 1000)

    def settle(self, what="the change"):
        """After an ovs-vsctl: run until a reconciliation happened."""
        n = len(self.applies)
        self.pump(lambda: len(self.applies) > n, what=what)
        return self.applies[-1]

    def close(self):
        self.reconciler.close(time.time())
        self.config.close()


@pytest.fixture
def make_loop():
    loops = []

    def make(remote):
        loop = Loop(remote)
        loops.append(loop)
        return loop

    try:
        yield make
    finally:
        for loop in loops:
            loop.close()


@pytest.fixture
def make_collector():
    collectors = []

    def make():
        c = UdpCollector()
        collectors.append(c)
        return c

    try:
        yield make
    finally:
        for c in collectors:
            c.close()


# -- helpers ---------------------------------------------------------------


def add_bridges(ovsdb, *names):
    args = []
    for name in names:
        args += ["--", "add-br", name, "--", "set", "Bridge", name,
                 "datapath_type=dummy"]
    ovsdb.vsctl(*args[1:])


def set_bridge_ipfix(ovsdb, bridge, targets, *columns):
    """Give ``bridge`` a new IPFIX row (bridge sampling)."""
    ovsdb.vsctl("--", "--id=@i", "create", "IPFIX",
                "targets=" + quote_set(targets), *columns,
                "--", "set", "Bridge", bridge, "ipfix=@i")


def quote_set(targets):
    return "[" + ",".join('"%s"' % t for t in targets) + "]"


def fscs_ipfix(ovsdb, set_id, bridge):
    """The uuid of the IPFIX row of collector set (``set_id``,
    ``bridge``)."""
    out = ovsdb.vsctl("--bare", "--columns=_uuid", "find", "Bridge",
                      "name=" + bridge).strip()
    return ovsdb.vsctl("--bare", "--columns=ipfix", "find",
                       "Flow_Sample_Collector_Set", "id=%d" % set_id,
                       "bridge=" + out).strip()


def new_records(collector, since):
    """(session, records of the messages from index ``since`` on): the
    whole stream is parsed, so templates and sequence numbers are
    checked across it."""
    session = parse_collector(collector)
    records = [r.normalized() for m in session.messages[since:]
               for r in m.data_records]
    return session, records


def by_port(records):
    return {r["src_port"]: r for r in records}


def cache_snapshot(exp):
    """Everything a flow cache holds, per key, in start order."""
    c = exp.cache
    out = []
    for key in c.order:
        slot = c.index[key]
        out.append((key, c.times[2 * slot], c.times[2 * slot + 1],
                    c.counters[4 * slot], c.counters[4 * slot + 1],
                    c.counters[4 * slot + 2]))
    return out


def socket_names(exp):
    return [(c.spec, c.sock.fileno(), c.sock.getsockname())
            for c in exp.collectors.collectors]


def sequences(exp):
    return {d: s.sequence for d, s in exp.writer.domains.items()}


# -- bridge exporter -------------------------------------------------------


def test_bridge_exporter_created_changed_retargeted_removed(
        ovsdb, make_loop, make_collector, tmp_path):
    a, b = make_collector(), make_collector()
    add_bridges(ovsdb, "br0")
    set_bridge_ipfix(ovsdb, "br0", [a.target], "sampling=1",
                     "obs_domain_id=7", "obs_point_id=9",
                     "cache_active_timeout=60", "cache_max_flows=1000")
    loop = make_loop(ovsdb.remote)
    loop.pump(lambda: BR0 in loop.exporters, what="the bridge exporter")
    exp = loop.exporters[BR0]
    assert loop.applies[-1] == Changes((BR0,), (), ())
    assert exp.options.sampling == 1

    f1, f2 = udp_frame(1001, payload_len=58), udp_frame(1002, payload_len=158)
    feed_bridge(exp, [f1, f1, f1, f2, f2])
    loop.spin(0.1)
    # Cached, nothing due for 60 s: nothing on the wire yet.
    assert a.receive(0.05) == 0
    assert len(exp.cache) == 2

    # Options change (same targets): forced end to the collector, counts
    # as sampled with the old options.
    ovsdb.vsctl("set", "IPFIX", "br0", "sampling=2",
                "cache_active_timeout=30")
    assert loop.settle() == Changes((), (BR0,), ())
    assert loop.exporters[BR0] is exp
    assert (exp.options.sampling, exp.cache.active_timeout) == (2, 30)
    assert len(exp.cache) == 0
    assert a.wait_quiet(0, quiet=0.1)
    session, records = new_records(a, 0)
    assert session.problems == []
    got = by_port(records)
    assert set(got) == {1001, 1002}
    assert {r["end_reason"] for r in records} == {FORCED_END}
    assert (got[1001]["packets"], got[1001]["l2_octets"],
            got[1001]["octets"]) == (3, 3 * 100, 3 * 86)
    assert (got[1002]["packets"], got[1002]["l2_octets"],
            got[1002]["octets"]) == (2, 2 * 200, 2 * 186)
    assert {r["obs_domain_id"] for r in records} == {7}
    assert {r["obs_point_id"] for r in records} == {9}

    # New samples use the new sampling (2 packets each); the targets did
    # not change, so the same socket carries on: the sequence number
    # continues, and the templates are sent afresh.
    n_a = len(a.datagrams)
    sockets = socket_names(exp)
    feed_bridge(exp, [f1, f1])
    ovsdb.vsctl("set", "IPFIX", "br0", "targets=" + quote_set([b.target]))
    assert loop.settle() == Changes((), (BR0,), ())
    assert a.wait_quiet(n_a, quiet=0.1)
    session, records = new_records(a, n_a)
    assert session.problems == []
    first = session.messages[n_a]
    assert first.templates, "templates not re-sent after the change"
    assert first.sequence == 2
    assert [(r["src_port"], r["packets"], r["l2_octets"], r["end_reason"])
            for r in records] == [(1001, 4, 4 * 100, FORCED_END)]
    assert socket_names(exp) != sockets
    # The new collector hears nothing until there is something to say.
    assert b.receive(0.05) == 0

    # tshark agrees on everything collector A got, sequence included.
    pcap = str(tmp_path / "a.pcap")
    a.write_pcap(pcap)
    decoded = tshark_decode(pcap, a.port)
    assert decoded.warnings == []
    assert sorted((r["src_port"], r["packets"], r["l2_octets"],
                   r["end_reason"]) for r in decoded.records) == [
        (1001, 3, 300, 4), (1001, 4, 400, 4), (1002, 2, 400, 4)]

    # The new collector: a new session (sequence 0), templates first.
    feed_bridge(exp, [f2])
    loop.spin(0.05)
    assert b.receive(0.05) == 0
    ovsdb.vsctl("clear", "Bridge", "br0", "ipfix")
    assert loop.settle() == Changes((), (), (BR0,))
    assert BR0 not in loop.exporters
    assert b.wait_quiet(0, quiet=0.1)
    session, records = new_records(b, 0)
    assert session.problems == []
    assert session.messages[0].sequence == 0
    assert [(r["src_port"], r["packets"], r["l2_octets"], r["end_reason"])
            for r in records] == [(1002, 2, 400, FORCED_END)]
    # Then silence on both: the exporter is gone.
    n_a, n_b = len(a.datagrams), len(b.datagrams)
    loop.spin(0.3)
    assert (a.receive(0.05), b.receive(0.05)) == (0, 0)
    assert (len(a.datagrams), len(b.datagrams)) == (n_a, n_b)


# -- flow exporters --------------------------------------------------------


def test_flow_exporters_per_collector_set_are_independent(
        ovsdb, make_loop, make_collector):
    c1, c2 = make_collector(), make_collector()
    add_bridges(ovsdb, "br0", "br1")
    cache = ["cache_active_timeout=60", "cache_max_flows=1000"]
    ovsdb.vsctl(
        "--", "--id=@b0", "get", "Bridge", "br0",
        "--", "--id=@b1", "get", "Bridge", "br1",
        "--", "--id=@i1", "create", "IPFIX",
        "targets=" + quote_set([c1.target]), *cache,
        "--", "--id=@i2", "create", "IPFIX",
        "targets=" + quote_set([c2.target]), *cache,
        "--", "create", "Flow_Sample_Collector_Set", "id=1", "bridge=@b0",
        "ipfix=@i1",
        "--", "create", "Flow_Sample_Collector_Set", "id=2", "bridge=@b1",
        "ipfix=@i2")
    k1, k2 = ("flow", "br0", 1), ("flow", "br1", 2)
    loop = make_loop(ovsdb.remote)
    loop.pump(lambda: len(loop.exporters) == 2, what="two flow exporters")
    assert set(loop.exporters) == {k1, k2}
    e1, e2 = loop.exporters[k1], loop.exporters[k2]
    ipfix1, ipfix2 = fscs_ipfix(ovsdb, 1, "br0"), fscs_ipfix(ovsdb, 2, "br1")
    assert ipfix1 != ipfix2

    # Exporter 2 sends once, so that it has a running sequence number.
    feed_flow(e2, [udp_frame(2001), udp_frame(2002)])
    ovsdb.vsctl("set", "IPFIX", ipfix2, "cache_active_timeout=50")
    assert loop.settle() == Changes((), (k2,), ())
    assert c2.wait_quiet(0, quiet=0.1)
    assert sequences(e2) == {5: 2}

    # Both hold flows; then a change to collector set 1 only.
    f = udp_frame(1001, payload_len=100)
    feed_flow(e1, [f, f, f])
    feed_flow(e2, [udp_frame(2003), udp_frame(2003), udp_frame(2004)])
    loop.spin(0.05)
    before = (cache_snapshot(e2), e2.stats.as_dict(), socket_names(e2),
              sequences(e2))
    n_c2 = len(c2.datagrams)
    ovsdb.vsctl("set", "IPFIX", ipfix1, "cache_active_timeout=40")
    assert loop.settle() == Changes((), (k1,), ())
    assert c1.wait_quiet(0, quiet=0.1)
    session, records = new_records(c1, 0)
    assert session.problems == []
    assert [(r["src_port"], r["packets"], r["l2_octets"], r["end_reason"],
             r["obs_domain_id"], r["obs_point_id"]) for r in records] == [
        (1001, 3, 3 * 142, FORCED_END, 5, 9)]
    # The other exporter: same object, same cache, same sockets, same
    # sequence numbers, and nothing sent.
    assert loop.exporters[k2] is e2
    assert (cache_snapshot(e2), e2.stats.as_dict(), socket_names(e2),
            sequences(e2)) == before
    assert len(before[0]) == 2
    assert c2.receive(0.1) == 0 and len(c2.datagrams) == n_c2

    # Its next flush continues the sequence where it was (2 records
    # sent before): the parser checks every message's sequence number.
    ovsdb.vsctl("set", "IPFIX", ipfix2, "cache_active_timeout=45")
    assert loop.settle() == Changes((), (k2,), ())
    assert c2.wait_quiet(n_c2, quiet=0.1)
    session, records = new_records(c2, n_c2)
    assert session.problems == []
    assert session.messages[n_c2].sequence == 2
    assert sorted((r["src_port"], r["packets"]) for r in records) == [
        (2003, 2), (2004, 1)]


# -- OVSDB going away ------------------------------------------------------


def test_ovsdb_killed_and_restarted_keeps_exporting(
        ovsdb, make_loop, make_collector):
    a = make_collector()
    add_bridges(ovsdb, "br0")
    # max_flows 2: a third flow pushes the oldest out (lack of
    # resources), which shows the exporter working while OVSDB is away.
    set_bridge_ipfix(ovsdb, "br0", [a.target], "sampling=1",
                     "cache_active_timeout=60", "cache_max_flows=2")
    loop = make_loop(ovsdb.remote)
    loop.pump(lambda: BR0 in loop.exporters, what="the bridge exporter")
    exp = loop.exporters[BR0]
    feed_bridge(exp, [udp_frame(1001), udp_frame(1002), udp_frame(1002)])
    loop.spin(0.05)
    assert a.receive(0.05) == 0

    kill_pid(ovsdb.pid, 9)
    ovsdb.pid = None
    loop.pump(lambda: not loop.config.connected, what="the disconnect")
    # Samples fed while down are exported with the last configuration.
    feed_bridge(exp, [udp_frame(1003), udp_frame(1004), udp_frame(1004)])
    loop.spin(0.1)
    assert loop.exporters[BR0] is exp
    assert a.wait_quiet(0, quiet=0.1)
    session, records = new_records(a, 0)
    assert session.problems == []
    assert [(r["src_port"], r["packets"], r["end_reason"])
            for r in records] == [(1001, 1, LACK_OF_RESOURCES),
                                  (1002, 2, LACK_OF_RESOURCES)]
    assert [key[-4:] for key in exp.cache.order] == [
        struct.pack("!HH", 1003, 4000), struct.pack("!HH", 1004, 4000)]

    # Restart: the reader reconnects (backoff about 1 s) and resyncs;
    # nothing really changed, so nothing is flushed.
    n_applies, n_a = len(loop.applies), len(a.datagrams)
    snapshot, sockets = cache_snapshot(exp), socket_names(exp)
    ovsdb.start()
    loop.pump(lambda: loop.config.connected
              and len(loop.applies) > n_applies, timeout=10.0,
              what="the resync")
    assert not any(loop.applies[n_applies:])
    assert loop.exporters[BR0] is exp
    assert (cache_snapshot(exp), socket_names(exp)) == (snapshot, sockets)
    loop.spin(0.2)
    assert a.receive(0.05) == 0 and len(a.datagrams) == n_a

    # Only a real change flushes, and it carries the samples fed while
    # OVSDB was down.
    ovsdb.vsctl("set", "IPFIX", "br0", "cache_active_timeout=61")
    assert loop.settle() == Changes((), (BR0,), ())
    assert a.wait_quiet(n_a, quiet=0.1)
    session, records = new_records(a, n_a)
    assert session.problems == []
    assert sorted((r["src_port"], r["packets"], r["end_reason"])
                  for r in records) == [(1003, 1, FORCED_END),
                                        (1004, 2, FORCED_END)]


# -- invalid values --------------------------------------------------------


def test_invalid_targets_affect_only_their_exporter(
        ovsdb, make_loop, make_collector):
    a, b, c = make_collector(), make_collector(), make_collector()
    add_bridges(ovsdb, "br0", "br1", "br2", "br3")
    cache = ["sampling=1", "cache_active_timeout=60",
             "cache_max_flows=1000"]
    # br0: a name that does not resolve and a good collector; br1: a
    # malformed target and a good one; br2: no target at all (disabled,
    # as OVS does); br3: only good.
    set_bridge_ipfix(ovsdb, "br0", ["xyzzy", "no-such-host.invalid:4739",
                                    a.target], *cache)
    set_bridge_ipfix(ovsdb, "br1", ["127.0.0.1:notaport", b.target],
                     *cache)
    set_bridge_ipfix(ovsdb, "br2", [], *cache)
    set_bridge_ipfix(ovsdb, "br3", [c.target], *cache)
    loop = make_loop(ovsdb.remote)
    keys = {("bridge", name) for name in ("br0", "br1", "br3")}
    loop.pump(lambda: set(loop.exporters) == keys, what="three exporters")
    e0, e1, e3 = (loop.exporters[("bridge", n)] for n in ("br0", "br1",
                                                          "br3"))
    assert [c.spec for c in e0.collectors.collectors] == [a.target]
    assert sorted(spec for spec, _ in e0.collectors.bad_targets) == [
        "no-such-host.invalid:4739", "xyzzy"]
    assert [c.spec for c in e1.collectors.collectors] == [b.target]
    assert [spec for spec, _ in e1.collectors.bad_targets] == [
        "127.0.0.1:notaport"]
    assert any("notaport" in w for w in loop.config.recent_warnings)

    for port, exp in ((1000, e0), (1001, e1), (1003, e3)):
        feed_bridge(exp, [udp_frame(port)] * 2)
    # A change to br0 flushes it to its one good collector; the others
    # keep their flows.
    ovsdb.vsctl("set", "IPFIX", "br0", "cache_active_timeout=59")
    assert loop.settle() == Changes((), (("bridge", "br0"),), ())
    assert a.wait_quiet(0, quiet=0.1)
    _, records = new_records(a, 0)
    assert [(r["src_port"], r["packets"], r["end_reason"])
            for r in records] == [(1000, 2, FORCED_END)]
    assert (len(e1.cache), len(e3.cache)) == (1, 1)
    assert (b.receive(0.05), c.receive(0.05)) == (0, 0)

    # Emptying br1's target set disables its exporter: it is flushed to
    # the collector it had, then closed; br3 is untouched.
    ovsdb.vsctl("set", "IPFIX", "br1", "targets=[]")
    assert loop.settle() == Changes((), (), (("bridge", "br1"),))
    assert b.wait_quiet(0, quiet=0.1)
    _, records = new_records(b, 0)
    assert [(r["src_port"], r["packets"], r["end_reason"])
            for r in records] == [(1001, 2, FORCED_END)]
    assert loop.exporters[("bridge", "br3")] is e3
    assert len(e3.cache) == 1 and c.receive(0.05) == 0

    # An exporter whose every target is bad still runs (and counts what
    # it could not send, RFC 7011 section 4.3); fixing the target later
    # brings it back without touching anyone else.
    ovsdb.vsctl("set", "IPFIX", "br0", 'targets=["xyzzy"]')
    loop.settle()
    assert len(e0.collectors) == 0
    feed_bridge(e0, [udp_frame(1000)] * 3)
    ovsdb.vsctl("set", "IPFIX", "br0", "targets=" + quote_set([a.target]))
    loop.settle()
    assert e0.stats.not_sent_flows == 1 and e0.stats.not_sent_packets == 3
    assert loop.exporters[("bridge", "br3")] is e3
    assert len(e3.cache) == 1 and c.receive(0.05) == 0


# -- the reconciler alone, against real exporters --------------------------


@pytest.fixture
def failing_sockets(monkeypatch):
    """``fail.append(n)``: the n-th next CollectorSet built by an
    exporter raises EMFILE, as socket() does when the process is out of
    file descriptors (CollectorSet only absorbs bad targets)."""
    import ovs_ipfix_py.exporter as exporter_module
    real = exporter_module.CollectorSet
    fail = []
    calls = [0]

    def collector_set(targets, now=0.0, *args):
        calls[0] += 1
        if calls[0] in fail:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real(targets, now, *args)

    monkeypatch.setattr(exporter_module, "CollectorSet", collector_set)
    return fail


def test_failed_exporters_are_retried_and_others_untouched(
        make_collector, failing_sockets):
    a, b = make_collector(), make_collector()
    k0, k1 = ("bridge", "br0"), ("bridge", "br1")

    def opts(bridge, target):
        return BridgeExporterOptions(bridge, ExportOptions(
            targets=(target,), cache=CacheOptions(60, 100)), sampling=1)

    rec = Reconciler()
    try:
        failing_sockets.append(1)  # br0's sockets
        now = time.time()
        changes = rec.apply({k0: opts("br0", a.target),
                             k1: opts("br1", a.target)}, now)
        assert changes.created == (k1,)
        assert set(rec.exporters) == {k1} and set(rec.failed) == {k0}
        assert "Too many open files" in rec.failed[k0]
        assert rec.next_retry() == now + RETRY_INTERVAL
        assert not rec.retry(now + RETRY_INTERVAL - 0.1)
        assert rec.retry(now + RETRY_INTERVAL).created == (k0,)
        assert rec.failed == {} and rec.next_retry() is None
        e0, e1 = rec.exporters[k0], rec.exporters[k1]

        # Failing half-way through new options: the cache was flushed to
        # the old collector first, then the exporter is dropped and
        # rebuilt by the retry; the other exporter is not touched.
        feed_bridge(e0, [udp_frame(1000)] * 2)
        feed_bridge(e1, [udp_frame(1001)] * 3)
        failing_sockets.append(4)  # e0's new sockets
        now = time.time()
        changes = rec.apply({k0: opts("br0", b.target),
                             k1: opts("br1", a.target)}, now)
        assert not changes
        assert set(rec.exporters) == {k1} and set(rec.failed) == {k0}
        assert a.wait_quiet(0, quiet=0.05)
        session, records = new_records(a, 0)
        assert session.problems == []
        assert [(r["src_port"], r["packets"], r["end_reason"])
                for r in records] == [(1000, 2, FORCED_END)]
        assert rec.exporters[k1] is e1 and len(e1.cache) == 1
        assert rec.retry(now + RETRY_INTERVAL).created == (k0,)
        assert rec.exporters[k0] is not e0
        assert rec.exporters[k0].options == opts("br0", b.target)
        assert [c.spec for c in rec.exporters[k0].collectors.collectors] \
            == [b.target]
        # A key that failed and is no longer wanted is forgotten.
        rec.apply({k1: opts("br1", a.target)}, now)
        failing_sockets.append(6)  # br0 built again
        rec.apply({k0: opts("br0", a.target), k1: opts("br1", a.target)},
                  now)
        assert set(rec.failed) == {k0}
        rec.apply({k1: opts("br1", a.target)}, now)
        assert rec.failed == {} and rec.next_retry() is None
    finally:
        rec.close(time.time())


# -- the real daemon ---------------------------------------------------------


def _latency_tool():
    path = os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "tools", "reconcile_latency.py")
    spec = importlib.util.spec_from_file_location("reconcile_latency", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_daemon_follows_ovs_vsctl_end_to_end():
    """The real daemon (subprocess, samples over its channel) flushes as
    forced end on each ``ovs-vsctl set IPFIX``, via the latency tool;
    everything it started is gone afterwards.  The bound is loose (the
    tool reports the real figures): this checks the path, not speed."""
    tool = _latency_tool()
    result = tool.measure("daemon", 3)
    assert len(result.from_start) == 3
    assert max(result.from_start) < 2000
    assert len(result.pids) == 2  # the daemon and ovsdb-server
    assert not any(pid_alive(pid) for pid in result.pids)
    assert not os.path.exists(result.workdir)
