"""Controlling the daemon end to end: shutdown with a full cache
(SIGTERM, SIGINT, ``ovs-appctl exit``), the channel socket's mode,
``ipfix/show`` and ``ipfix/flush`` per bridge, and the active timeout
firing on time.  Harness in ``test_daemon``."""

import os
import shutil
import signal
import stat
import tempfile
import time

import pytest
from support.daemon import (
    REASON_ACTIVE,
    REASON_FORCED_END,
    Env,
    assert_flows_exact,
    bridge_ipfix,
    expected_counters,
    flow_ipfix,
    flush_and_collect,
    replay_ok,
    run_replay,
    sample,
    subset,
)
from support.decoders import parse_collector
from traffic import ethernet, ipv4, many_flows, traffic_mix, truth_of, udp

from ovs_ipfix_py import fastpath, upcall
from ovs_ipfix_py.pcap import write_pcap


@pytest.fixture
def env(ovsdb):
    with Env(ovsdb) as e:
        yield e


# ---------------------------------------------------------------------
# Shutdown with a full cache: SIGTERM, SIGINT, ovs-appctl exit


@pytest.fixture(scope="module")
def many_flows_pcap():
    """5000 flows over 8000 packets, as a pcap, and their truth."""
    d = tempfile.mkdtemp(prefix="dmnf-", dir="/tmp")
    try:
        frames = list(many_flows(5000, 8000, seed=17))
        path = os.path.join(d, "many.pcap")
        write_pcap(path, [(1.0 + i / 1e4, f) for i, f in enumerate(frames)])
        yield path, frames, truth_of(frames)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "exit"])
def test_shutdown_flushes_a_full_cache(env, many_flows_pcap, how):
    """With 5000 flows cached, SIGTERM / SIGINT / ``ovs-appctl exit``:
    every flow arrives with reason forced end (4) and exact counts, the
    daemon exits 0, and its channel socket, pid file and control socket
    are gone."""
    path, frames, truth = many_flows_pcap
    collector = env.collector()
    bridge_ipfix(env.ovsdb, "br0", collector, sampling=1)
    exporter = env.exporter()
    exporter.wait_show(lambda s: ("br0", None) in s.exporters,
                       "the br0 exporter")
    replay_ok(exporter, path, "--bridge=br0")
    show = exporter.wait_show(
        lambda s: s.exporters[("br0", None)]["pkts"] == len(frames),
        "every sample")
    assert show.exporters[("br0", None)]["current_flows"] == len(truth)
    before = len(collector.datagrams)

    if how == "exit":
        exporter.appctl("exit")
    else:
        os.kill(exporter.pid, getattr(signal, how))
    assert exporter.proc.wait(15) == 0, exporter.tail()
    assert collector.wait_quiet(before, quiet=0.3)

    session = parse_collector(collector)
    assert session.problems == []
    assert_flows_exact(session.normalized(), truth, REASON_FORCED_END)
    for path_ in (exporter.channel, exporter.pidfile, exporter.ctl):
        assert not os.path.exists(path_), path_


def test_channel_socket_mode(env):
    """The channel is a socket with mode 0660, removed on exit."""
    exporter = env.exporter()
    st = os.stat(exporter.channel)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    exporter.appctl("exit")
    assert exporter.proc.wait(10) == 0
    assert not os.path.exists(exporter.channel)


def test_default_paths_under_ovs_rundir(env):
    """As README deploys it: ``ovs-ipfix-exporter --pidfile --log-file``
    with OVS_RUNDIR set uses $OVS_RUNDIR/db.sock and binds
    $OVS_RUNDIR/ovs-ipfix-exporter.sock; ``ovs-appctl -t
    ovs-ipfix-exporter`` reaches it by name; ``ovs-ipfix-replay``
    without --channel finds it; ``exit`` flushes and removes it all."""
    collector = env.collector()
    bridge_ipfix(env.ovsdb, "br0", collector, sampling=1)
    exporter = env.exporter(rundir_defaults=True)
    exporter.wait_show(lambda s: ("br0", None) in s.exporters,
                       "the br0 exporter")
    frames, _ = traffic_mix(seed=81, flows_per_kind=1)
    result = run_replay("--bridge=br0", env.pcap("mix.pcap", frames),
                        env=env.ovsdb.env)
    assert result.returncode == 0, result.stderr
    exporter.wait_upcalls(len(frames))
    assert os.path.exists(exporter.logfile)

    exporter.appctl("exit")
    assert exporter.proc.wait(10) == 0, exporter.tail()
    assert collector.wait_quiet(0)
    session = parse_collector(collector)
    assert session.problems == []
    assert_flows_exact(session.normalized(), truth_of(frames),
                       REASON_FORCED_END)
    for path_ in (exporter.channel, exporter.pidfile, exporter.ctl):
        assert not os.path.exists(path_), path_


# ---------------------------------------------------------------------
# ipfix/show and ipfix/flush, per bridge


def test_show_counters_bridge_filter_and_flush(env):
    """Three exporters (br0 bridge, br0 collector set 5, br1 bridge):
    ipfix/show prints each with the counters the traffic implies;
    ``ipfix/show BRIDGE`` keeps that bridge's; ``ipfix/flush BRIDGE``
    exports only that bridge's flows."""
    a, b, c = env.collector(), env.collector(), env.collector()
    bridge_ipfix(env.ovsdb, "br0", a, sampling=1)
    bridge_ipfix(env.ovsdb, "br1", b, sampling=1)
    flow_ipfix(env.ovsdb, "br0", 5, c)
    exporter = env.exporter()
    keys = {("br0", None), ("br1", None), ("br0", 5)}
    exporter.wait_show(lambda s: set(s.exporters) == keys,
                       "three exporters")
    f0, _ = traffic_mix(seed=41)
    f1, _ = traffic_mix(seed=42, flows_per_kind=1)
    f5, _ = traffic_mix(seed=43, flows_per_kind=2)
    datagrams = 0
    for name, frames, args in (
            ("f0", f0, ["--bridge=br0"]), ("f1", f1, ["--bridge=br1"]),
            ("f5", f5, ["--bridge=br0", "--collector-set=5",
                        "--obs-domain-id=1", "--obs-point-id=2"])):
        datagrams += replay_ok(exporter, env.pcap(name + ".pcap", frames),
                               *args)[2]
    total = len(f0) + len(f1) + len(f5)
    show = exporter.wait_upcalls(total)
    assert show.channel == {"datagrams": datagrams, "upcalls": total,
                            "malformed_datagrams": 0,
                            "malformed_upcalls": 0, "no_exporter": 0}
    assert show.ovsdb == "connected"
    # The daemon runs the hot path this test process would run.
    assert show.fast_path == fastpath.name()
    for key, frames in ((("br0", None), f0), (("br1", None), f1),
                        (("br0", 5), f5)):
        want = expected_counters(frames)
        got = show.exporters[key]
        assert subset(got, want) == want, key
    for key, coll in ((("br0", None), a), (("br1", None), b),
                      (("br0", 5), c)):
        coll.receive(0)
        assert show.exporters[key]["tx_pkts"] == len(coll.datagrams)

    only1 = exporter.show("br1")
    assert only1.order == [("br1", None)]
    assert only1.exporters[("br1", None)] == show.exporters[("br1", None)]
    only0 = exporter.show("br0")
    assert set(only0.order) == {("br0", None), ("br0", 5)}
    text = exporter.appctl("ipfix/show", "nosuch")
    assert text.startswith("no IPFIX exporter on bridge nosuch")

    # Flush br0 only: its two exporters send, br1's stays cached.
    n0, n5 = len(truth_of(f0)), len(truth_of(f5))
    reply = flush_and_collect(exporter, [a, c], "br0")
    assert reply.strip() == f"flushed {n0 + n5} flows"
    assert b.receive(0.3) == 0 and b.datagrams == []
    for coll, n in ((a, n0), (c, n5)):
        session = parse_collector(coll)
        assert session.problems == []
        assert len(session.records) == n
        assert {r.uint(136) for r in session.records} == {REASON_FORCED_END}
    show = exporter.show()
    n1 = len(truth_of(f1))
    assert show.exporters[("br1", None)]["current_flows"] == n1
    assert show.exporters[("br1", None)]["cache"] == n1
    for key, coll in ((("br0", None), a), (("br0", 5), c)):
        assert show.exporters[key]["current_flows"] == 0
        assert show.exporters[key]["cache"] == 0
        assert show.exporters[key]["tx_pkts"] == len(coll.datagrams)
        assert show.exporters[key]["tx_errs"] == 0
    assert show.exporters[("br1", None)]["tx_pkts"] == 0

    # Then everything: br1's flows go out too.
    reply = flush_and_collect(exporter, [b])
    assert reply.strip() == f"flushed {n1} flows"
    assert len(parse_collector(b).records) == n1
    assert exporter.show().exporters[("br1", None)]["tx_pkts"] == \
        len(b.datagrams)


# ---------------------------------------------------------------------
# Active timeout, on time


def udp_frame(i, net):
    return ethernet(ipv4(udp(40000 + i, 9000, bytes(20 + i)),
                         src=f"{net}.{i + 1}", dst="198.51.100.1"))


def sleep_until_fraction(fraction):
    """Sleep until the wall clock's fractional second is ``fraction``."""
    now = time.time()
    delay = (fraction - now % 1.0) % 1.0
    time.sleep(delay)
    return time.time()


def test_active_timeout_fires_on_time(env):
    """cache_active_timeout=1: flows leave with reason active timeout
    about 1 s after their first sample (the daemon sleeps until the
    cache's deadline, not on a fixed tick, and not to whole seconds):
    two batches half a second apart, sent 0.15 s past a whole second,
    each arrives 0.9-1.8 s after it was sent."""
    collector = env.collector()
    bridge_ipfix(env.ovsdb, "br0", collector, sampling=1,
                 cache_active_timeout=1)
    exporter = env.exporter()
    exporter.wait_show(lambda s: ("br0", None) in s.exporters,
                       "the br0 exporter")
    batch_a = [udp_frame(i, "192.0.2") for i in range(5)]
    batch_b = [udp_frame(i, "203.0.113") for i in range(5)]
    sent_a = sleep_until_fraction(0.15)
    exporter.send(upcall.encode([sample(f) for f in batch_a]))
    sent_b = sleep_until_fraction(0.65)
    exporter.send(upcall.encode([sample(f) for f in batch_b]))

    def arrived(datagrams):
        return sum(len(m.data_records)
                   for m in parse_collector(collector).messages) >= 10

    assert collector.wait_for(arrived, timeout=5.0)
    collector.receive(0.2)
    session = parse_collector(collector)
    assert session.problems == []
    for m in session.messages:
        for r in m.data_records:
            rec = r.normalized()
            assert rec["end_reason"] == REASON_ACTIVE
            sent = sent_a if rec["src_ip"].startswith("192.0.2.") \
                else sent_b
            late = m.arrival - sent
            assert 0.9 < late < 1.8, (rec["src_ip"], late)
    assert len(session.records) == 10
    assert_flows_exact(session.normalized(), truth_of(batch_a + batch_b),
                       REASON_ACTIVE)
