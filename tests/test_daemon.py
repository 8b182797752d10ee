"""ovs-ipfix-exporter end to end, as an operator runs it.

Every test runs real processes: a private ovsdb-server (configured with
ovs-vsctl), the daemon started by its console script with ``--db
--channel --unixctl --pidfile --log-file`` in a short directory under
/tmp, ``ovs-ipfix-replay`` as a subprocess (or datagrams sent straight to
the channel socket), and loopback UDP collectors.  What arrives is judged
by tshark (with our parser and ipfixDump beside it) against the traffic
generator's truth (``tests/traffic.py``).  Every process is stopped by pid
in a fixture's finally.

The harness the ``test_daemon_*`` modules share (``ExporterProcess``,
``Env``, the ``ipfix/show`` parser, records against the truth) is in
tests/support/daemon.py; this module holds the main job: a traffic mix
replayed with bridge and with flow sampling, per-flow totals exact.
Beside it: ``test_daemon_channel`` (malformed datagrams, samples nobody
exports), ``test_daemon_control`` (shutdown, socket, ipfix/show and
ipfix/flush, active timeout) and ``test_daemon_replay`` (the replay
tool, the demo).
"""

import pytest
from support.daemon import (
    REASON_FORCED_END,
    Env,
    assert_flows_exact,
    bridge_ipfix,
    flow_ipfix,
    flush_and_collect,
    replay_ok,
)
from support.decoders import judge_collector
from traffic import traffic_mix, truth_of


@pytest.fixture
def env(ovsdb):
    """An Env on a private ovsdb-server; everything stopped after."""
    with Env(ovsdb) as e:
        yield e


# ---------------------------------------------------------------------
# Replay of the traffic mix: bridge and flow sampling, judged by tshark


def test_bridge_sampling_replay_exact(env, tmp_path):
    """Sampling 1: every flow of the mix arrives once with exact totals;
    tshark, ipfixDump and our parser find nothing wrong (no malformed
    message, no sequence warning)."""
    collector = env.collector()
    bridge_ipfix(env.ovsdb, "br0", collector, sampling=1,
                 obs_domain_id=77, obs_point_id=88)
    exporter = env.exporter()
    exporter.wait_show(lambda s: ("br0", None) in s.exporters,
                       "the br0 exporter")
    frames, _ = traffic_mix(seed=21)
    truth = truth_of(frames, skip_bfd=True)
    read, sent, datagrams = replay_ok(
        exporter, env.pcap("mix.pcap", frames), "--bridge=br0")
    assert read == sent == len(frames)
    # Every sample the replay handed over reached the daemon.
    show = exporter.wait_upcalls(len(frames))
    assert show.channel["upcalls"] == len(frames)
    assert show.channel["datagrams"] == datagrams
    assert show.channel["malformed_datagrams"] == 0

    assert "flushed %d flows" % len(truth) in flush_and_collect(
        exporter, [collector])
    judged = judge_collector(collector, tmp_path)
    assert judged.problems == []
    records = judged.tshark.records
    assert {r["obs_domain_id"] for r in records} == {77}
    assert {r["obs_point_id"] for r in records} == {88}
    assert_flows_exact(records, truth, REASON_FORCED_END)
    # Our parser reads the same records.
    assert len(judged.session.records) == len(truth)


def test_flow_sampling_replay_exact(env, tmp_path):
    """Flow samples (collector set 3, probability 65535): exact totals,
    and the observation domain and point ids come from the samples."""
    collector = env.collector()
    flow_ipfix(env.ovsdb, "br0", 3, collector)
    exporter = env.exporter()
    exporter.wait_show(lambda s: ("br0", 3) in s.exporters,
                       "the collector set 3 exporter")
    frames, _ = traffic_mix(seed=22)
    truth = truth_of(frames)
    read, sent, _ = replay_ok(
        exporter, env.pcap("mix.pcap", frames), "--bridge=br0",
        "--collector-set=3", "--obs-domain-id=4242", "--obs-point-id=99")
    assert read == sent == len(frames)
    exporter.wait_upcalls(len(frames))

    flush_and_collect(exporter, [collector])
    judged = judge_collector(collector, tmp_path)
    assert judged.problems == []
    records = judged.tshark.records
    assert {r["obs_domain_id"] for r in records} == {4242}
    assert {r["obs_point_id"] for r in records} == {99}
    assert {m["obs_domain_id"] for m in judged.tshark.messages} == {4242}
    assert_flows_exact(records, truth, REASON_FORCED_END)
