"""The replay tool and the demo, end to end against the daemon:
one-line errors, ``--sampling=N`` statistics and scaling, and
``tools/demo.py`` printing DEMO OK.  Harness in ``test_daemon``."""

import os
import socket
import subprocess
import sys

import pytest
from support.daemon import (
    ROOT,
    Env,
    bridge_ipfix,
    flush_and_collect,
    replay_ok,
    run_replay,
)
from support.decoders import parse_collector
from traffic import many_flows, traffic_mix


@pytest.fixture
def env(ovsdb):
    with Env(ovsdb) as e:
        yield e


# ---------------------------------------------------------------------
# The replay tool


def test_replay_errors_are_one_line(env):
    """Non-zero exit and one line on stderr, no traceback: a missing
    channel, a stale socket nobody serves, a missing file, a file that
    is no capture, a capture cut in a record."""
    frames, _ = traffic_mix(seed=61, flows_per_kind=1)
    pcap = env.pcap("ok.pcap", frames)
    missing = os.path.join(env.dir, "nothing.sock")

    def one_line_error(result, *words):
        assert result.returncode not in (0, None), result.stderr
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("ovs-ipfix-replay: "), lines[0]
        assert "Traceback" not in result.stderr
        for w in words:
            assert w in lines[0], (w, lines[0])

    one_line_error(run_replay("--channel=" + missing, pcap), missing)
    stale = os.path.join(env.dir, "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(stale)
    s.close()
    one_line_error(run_replay("--channel=" + stale, pcap), stale)

    exporter = env.exporter()
    garbage = os.path.join(env.dir, "garbage.pcap")
    with open(garbage, "wb") as f:
        f.write(b"this is not a capture file at all\n" * 10)
    with open(pcap, "rb") as f:
        whole = f.read()
    cut = os.path.join(env.dir, "cut.pcap")
    with open(cut, "wb") as f:
        f.write(whole[:len(whole) - 7])
    for bad in (os.path.join(env.dir, "absent.pcap"), garbage, cut):
        one_line_error(run_replay("--channel=" + exporter.channel, bad),
                       os.path.basename(bad))
    assert exporter.alive()


@pytest.mark.parametrize("row_sampling", [4, 1],
                         ids=["row-agrees", "row-differs"])
def test_replay_sampling_statistics(env, row_sampling):
    """``--sampling=4`` over 8000 packets: about a quarter sampled (within
    4 standard deviations), every sample delivered, and the exported
    packet and octet counts scaled back by 4.  The scale comes from the
    probability each sample carries, whatever the IPFIX row says (the
    row may have changed since the datapath took the sample)."""
    n_packets, n = 8000, 4
    frames = list(many_flows(40, n_packets, seed=71))
    collector = env.collector()
    bridge_ipfix(env.ovsdb, "br0", collector, sampling=row_sampling)
    exporter = env.exporter()
    exporter.wait_show(lambda s: ("br0", None) in s.exporters,
                       "the br0 exporter")
    read, sent, _ = replay_ok(exporter, env.pcap("many.pcap", frames),
                              "--bridge=br0", f"--sampling={n}",
                              "--seed=3")
    assert read == n_packets
    sigma = (n_packets * (1 / n) * (1 - 1 / n)) ** 0.5
    assert abs(sent - n_packets / n) < 4 * sigma, sent
    show = exporter.wait_upcalls(sent)
    assert show.exporters[("br0", None)]["pkts"] == sent

    flush_and_collect(exporter, [collector])
    session = parse_collector(collector)
    assert session.problems == []
    records = session.normalized()
    assert all(r["packets"] % n == 0 for r in records)
    assert sum(r["packets"] for r in records) == n * sent
    assert all(r["l2_octets"] % n == 0 for r in records)
    estimate = sum(r["l2_octets"] for r in records)
    actual = sum(len(f) for f in frames)
    assert abs(estimate - actual) < 0.1 * actual


# ---------------------------------------------------------------------
# The demo


def test_demo_runs():
    """``tools/demo.py`` (what ``tools/demo`` runs after installing)
    completes and prints DEMO OK."""
    result = subprocess.run([sys.executable, "tools/demo.py"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert "DEMO OK" in result.stdout
