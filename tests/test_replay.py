"""ovs-ipfix-replay as a program: it runs as a child process
(``python -m ovs_ipfix_py.replay``, what the console script calls) and
sends into a real ChannelServer served by this test's poll loop."""

import os
import re
import socket
import subprocess
import sys
import time

import hypothesis.strategies as st
import ovs.poller
import pytest
from hypothesis import HealthCheck, given, settings

from ovs_ipfix_py import fastpath, replay, upcall
from ovs_ipfix_py.channel import ChannelServer
from ovs_ipfix_py.pcap import PcapError, write_pcap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUMMARY = re.compile(r"^ovs-ipfix-replay: (\d+) packets read, (\d+) "
                     r"samples sent, (\d+) datagrams, [0-9.]+ s$")


@pytest.fixture
def tmp(shorttmp):
    return shorttmp


@pytest.fixture
def server(tmp):
    """A ChannelServer that records (upcalls, now) batches, and the
    datagram count per run()."""
    batches = []
    s = ChannelServer(os.path.join(tmp, "ovs-ipfix-exporter.sock"),
                      lambda ups, now: batches.append(ups))
    s.batches = batches
    try:
        yield s
    finally:
        s.close()


def frames(n, start=1700000000.0):
    out = []
    for i in range(n):
        frame = (bytes.fromhex("0200000000020200000000010800")
                 + i.to_bytes(4, "big") + bytes(i % 64))
        orig = len(frame) + (1000 if i % 5 == 0 else 0)
        out.append((start + i * 0.001, frame, orig))
    return out


def run_replay(server, *args, timeout=60):
    """Run the replay against ``server`` while serving its socket.
    Returns (returncode, stderr, upcalls received)."""
    proc = subprocess.Popen([sys.executable, "-m", "ovs_ipfix_py.replay",
                             *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            poller = ovs.poller.Poller()
            if server is not None:
                server.wait(poller)
            poller.timer_wait(20)
            poller.block()
            if server is not None:
                server.run()
            if proc.poll() is not None:
                break
        if server is not None:
            while server.run():
                pass
        stderr = proc.communicate(timeout=10)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    got = [u for batch in server.batches for u in batch] if server else []
    return proc.returncode, stderr, got


def assert_one_line(stderr):
    assert stderr.endswith("\n")
    assert stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr


def test_bridge_samples_arrive_intact(tmp, server):
    fr = frames(3000)
    path = os.path.join(tmp, "in.pcap")
    write_pcap(path, fr)
    rc, err, got = run_replay(server, f"--channel={server.path}", path)
    assert rc == 0, err
    assert_one_line(err)
    packets, samples, datagrams = map(int, SUMMARY.match(err).groups())
    assert (packets, samples) == (3000, 3000)
    assert datagrams == server.stats["datagrams"] >= 2
    assert got == [upcall.BridgeSample("br0", 1, None, 0xFFFFFFFF, f, o)
                   for _, f, o in fr]
    assert server.stats["malformed_datagrams"] == 0


def test_flow_samples_arrive_intact(tmp, server):
    fr = frames(500)
    path = os.path.join(tmp, "in.pcap")
    write_pcap(path, fr)
    rc, err, got = run_replay(
        server, f"--channel={server.path}", "--bridge=br-int",
        "--collector-set=5", "--obs-domain-id=6", "--obs-point-id=7",
        "--direction=egress", "--input-port=3", "--output-port=4", path)
    assert rc == 0, err
    assert got == [upcall.FlowSample("br-int", 5, 6, 7, 65535, 2, 3, 4, f, o)
                   for _, f, o in fr]


def test_bridge_sampling_picks_one_in_n_reproducibly(tmp, server):
    fr = frames(5000)
    path = os.path.join(tmp, "in.pcap")
    write_pcap(path, fr)
    args = [f"--channel={server.path}", "--sampling=10", "--output-port=9"]
    rc, err, got = run_replay(server, *args, "--seed=1", path)
    assert rc == 0, err
    assert 380 <= len(got) <= 620  # binomial(5000, 0.1): mean 500, sd 21
    assert SUMMARY.match(err).group(2) == str(len(got))
    assert {(u.probability, u.output_port) for u in got} == \
        {(0xFFFFFFFF // 10, 9)}
    index = {f: i for i, (_, f, _) in enumerate(fr)}
    picked = [index[u.frame] for u in got]
    assert picked == sorted(picked)
    server.batches.clear()
    rc, _, again = run_replay(server, *args, "--seed=1", path)
    assert rc == 0 and again == got
    server.batches.clear()
    rc, _, other = run_replay(server, *args, "--seed=2", path)
    assert rc == 0 and other != got


def test_flow_probability_picks_packets_too(tmp, server):
    path = os.path.join(tmp, "in.pcap")
    write_pcap(path, frames(4000))
    rc, err, got = run_replay(server, f"--channel={server.path}",
                              "--collector-set=1", "--probability=16384",
                              path)
    assert rc == 0, err
    assert 850 <= len(got) <= 1150  # 4000 x 1/4, sd 27
    assert {u.probability for u in got} == {16384}


def test_default_channel_is_in_ovs_rundir(tmp, server, monkeypatch):
    path = os.path.join(tmp, "in.pcap")
    write_pcap(path, frames(10))
    monkeypatch.setenv("OVS_RUNDIR", tmp)
    rc, err, got = run_replay(server, path)
    assert rc == 0, err
    assert len(got) == 10


def test_jumbo_frames_are_truncated_to_fit_a_datagram(tmp, server):
    big = bytes(range(256)) * 40  # 10240 bytes
    path = os.path.join(tmp, "in.pcap")
    write_pcap(path, [(1.0, big), (2.0, big[:100], 9000)])
    rc, err, got = run_replay(server, f"--channel={server.path}",
                              "--max-datagram=4096", path)
    assert rc == 0, err
    assert len(got) == 2
    assert got[0].orig_len == 10240
    assert 3900 < len(got[0].frame) < 4096
    assert got[0].frame == big[:len(got[0].frame)]
    assert (got[1].frame, got[1].orig_len) == (big[:100], 9000)
    assert server.stats["datagrams"] == 2  # the first one fills one


def test_rate_paces_and_flushes_before_sleeping(tmp, server):
    path = os.path.join(tmp, "in.pcap")
    write_pcap(path, frames(100))
    t0 = time.monotonic()
    rc, err, got = run_replay(server, f"--channel={server.path}",
                              "--rate=250", path)
    elapsed = time.monotonic() - t0
    assert rc == 0, err
    assert len(got) == 100
    assert elapsed >= 0.38  # 99 intervals of 4 ms
    assert elapsed < 10
    # Paced samples travel in many small datagrams, not one at the end.
    assert server.stats["datagrams"] >= 20


def test_missing_or_dead_channel_is_one_line_error(tmp):
    path = os.path.join(tmp, "in.pcap")
    write_pcap(path, frames(5))
    missing = os.path.join(tmp, "nope.sock")
    rc, err, _ = run_replay(None, f"--channel={missing}", path)
    assert rc == 1
    assert_one_line(err)
    assert f"cannot reach the channel {missing}: No such file" in err
    dead = os.path.join(tmp, "dead.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(dead)
    s.close()  # a stale socket file: nobody reads it
    rc, err, _ = run_replay(None, f"--channel={dead}", path)
    assert rc == 1
    assert_one_line(err)
    assert "Connection refused" in err


def test_bad_file_is_one_line_error(tmp, server):
    garbage = os.path.join(tmp, "garbage.pcap")
    with open(garbage, "wb") as f:
        f.write(b"this is not a capture at all")
    cut = os.path.join(tmp, "cut.pcap")
    write_pcap(cut, frames(10))
    with open(cut, "r+b") as f:
        f.truncate(os.path.getsize(cut) - 7)
    for path, message in ((os.path.join(tmp, "missing.pcap"),
                           "cannot open"),
                          (garbage, "not a pcap or pcapng"),
                          (cut, "truncated or corrupt")):
        rc, err, _ = run_replay(server, f"--channel={server.path}", path)
        assert rc == 1, err
        assert_one_line(err)
        assert err.startswith(f"ovs-ipfix-replay: {path}: "), err
        assert message in err, err


@pytest.mark.parametrize("args, message", [
    (["--sampling=0"], "--sampling"),
    (["--obs-domain-id=3"], "--obs-domain-id needs --collector-set"),
    (["--collector-set=1", "--probability=70000"], "--probability"),
    (["--collector-set=1", "--sampling=5"], "--sampling is for bridge"),
    (["--rate=-3"], "positive"),
    (["--input-port=x"], "not an integer"),
    (["--input-port=2", "--tunnel-port=3"], "--tunnel-port is the input"),
    (["--tunnel-port=-1"], "--tunnel-port"),
    ([], "required"),
])
def test_bad_options_are_one_line_errors(tmp, args, message):
    path = [os.path.join(tmp, "in.pcap")] if args else []
    rc, err, _ = run_replay(None, *args, *path)
    assert rc == 2
    assert_one_line(err)
    assert message in err, err


# -- the C loop (fastpath.C.pcap_datagram) against the Python one -----------

class _Sink:
    """A connected socket's send(), recorded."""

    def __init__(self):
        self.sent = []

    def send(self, d):
        self.sent.append(bytes(d))
        return len(d)


def _both(path, template, max_datagram):
    """Datagrams (or the error) of replay_file with the C loop and of
    the pure-Python replay."""
    out = []
    for use_c in (True, False):
        sink = _Sink()
        with fastpath.pure_python(not use_c):
            try:
                s = replay.replay_file(path, sink, template,
                                       max_datagram=max_datagram)
                out.append((sink.sent, s[:3], None))
            except (PcapError, ValueError) as e:
                out.append((None, None, str(e)))
    return out


needs_c = pytest.mark.skipif(fastpath.C is None,
                             reason="C fast path not built")


@needs_c
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.binary(max_size=300),
                          st.sampled_from([0, 0, 1, 5000])), max_size=60),
       st.sampled_from([120, 400, 1500, 65000]), st.booleans(),
       st.sampled_from([0, 0, 3, 17]))
def test_c_loop_sends_what_the_python_loop_sends(tmp, fr, max_datagram,
                                                 flow, cut):
    """Same datagrams (frames cut to fit, ORIG_LEN where the frame is
    shorter, bridge and flow templates), same summary; on a file whose
    last record is cut, the same error."""
    path = os.path.join(tmp, "h.pcap")
    write_pcap(path, [(1.0 + i, f, len(f) + extra)
                      for i, (f, extra) in enumerate(fr)])
    if cut and fr:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - cut)
    if flow:
        template = upcall.FlowSample("br-int", 5, 6, 7, 300, 2, 1, 9,
                                     b"", 0)
    else:
        template = upcall.BridgeSample("br0", 1, None, 0xFFFFFFFF, b"", 0)
    c_out, py_out = _both(path, template, max_datagram)
    if c_out[2] is None:
        assert c_out == py_out
    else:
        # The C loop sends the datagram it had before the bad record;
        # the Python batcher still held it when the reader raised.
        assert c_out[2] == py_out[2]


def test_progress_line_on_a_terminal(tmp, server):
    """stderr a terminal, a replay paced to last over a second: the
    progress line (frames sent, rate) is drawn and erased, then the
    summary line."""
    import pty
    fr = frames(1500)
    path = os.path.join(tmp, "in.pcap")
    write_pcap(path, fr)
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "ovs_ipfix_py.replay",
                             f"--channel={server.path}", "--rate=1000",
                             path], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=slave)
    os.close(slave)
    os.set_blocking(master, False)
    out = b""
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            poller = ovs.poller.Poller()
            server.wait(poller)
            poller.fd_wait(master, ovs.poller.POLLIN)
            poller.timer_wait(20)
            poller.block()
            server.run()
            try:
                out += os.read(master, 4096)
            except (BlockingIOError, OSError):
                pass
            if proc.poll() is not None:
                break
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        os.close(master)
        while server.run():
            pass
    text = out.decode()
    assert proc.returncode == 0, text
    assert re.search(r"\rovs-ipfix-replay: \d+ frames sent, [\d,]+ "
                     r"frames/s\x1b\[K", text), text
    assert "\r\x1b[K" in text
    summary = text.rsplit("\x1b[K", 1)[1].strip()
    assert SUMMARY.match(summary), text
    assert len([u for b in server.batches for u in b]) == 1500


def test_tunnel_port_decapsulates_and_keeps_the_rest(tmp, server):
    """``--tunnel-port=7``: a VXLAN packet arrives as its inner frame with
    its tunnel, a flow sample keeps its ids; other frames go as they are,
    without tunnel metadata, on the same port; the order is kept."""
    import traffic as tr
    inner = tr.build_frame(sport=5, dport=6)
    vx = tr.ethernet(tr.ipv4(tr.udp(49152, 4789, tr.vxlan(inner, 5001)),
                             src="198.51.100.1", dst="198.51.100.2"))
    plain = tr.build_frame(sport=7, dport=8)
    path = os.path.join(tmp, "underlay.pcap")
    write_pcap(path, [(1.0, vx), (1.1, plain), (1.2, vx)])
    rc, err, got = run_replay(server, f"--channel={server.path}",
                              "--tunnel-port=7", "--collector-set=2",
                              "--obs-domain-id=3", path)
    assert rc == 0, err
    assert_one_line(err)
    assert SUMMARY.match(err).groups()[:2] == ("3", "3")
    tunnel = upcall.Tunnel(bytes([198, 51, 100, 1]), bytes([198, 51, 100,
                                                            2]),
                           49152, 4789, 5001, 1)
    assert got == [
        upcall.FlowSample("br0", 2, 3, 0, 65535, 0, 7, None, inner,
                          len(inner), tunnel),
        upcall.FlowSample("br0", 2, 3, 0, 65535, 0, 7, None, plain,
                          len(plain)),
        upcall.FlowSample("br0", 2, 3, 0, 65535, 0, 7, None, inner,
                          len(inner), tunnel)]
