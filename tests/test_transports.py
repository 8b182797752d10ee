"""TCP and file targets in process: an Exporter, real sockets and files.

The exporter runs in the test's own loop (``run`` / ``wait`` / a real
``ovs.poller``) against loopback TCP collectors and files, judged by our
parser, tshark (the TCP stream written as a capture, reassembled by
tshark) and ipfixDump (each connection, and each file, as an RFC 5655
file):

- the traffic mix over TCP: no malformed message, no sequence warning,
  every flow exact, the same flows as a UDP collector of the same
  exporter gets;
- a collector that closes its connection is noticed at once (the poll
  loop wakes on the EOF), the exporter reconnects (backoff) and the new
  session starts with every template, sequence numbers from 0, and
  loses nothing exported after the drop;
- a collector down longer than the buffer holds gets the buffer's
  content; the rest is counted (dropped records, the exporting process
  statistics' notSent* totals, ipfix/show);
- partial writes: a collector that does not read stalls nothing and
  loses nothing;
- a connection that never completes is abandoned after a timeout;
- files: readable as a whole after every export, a new file (templates
  first) on reopen, an unwritable path counted and retried;
- byte for byte, what a stream does to the exporter's messages.
"""

import os
import socket
import time

import ovs.poller
import pytest
import traffic as tr
from support import free_port
from support.collector import TcpCollector, UdpCollector
from support.daemon import our_totals, totals, truth_totals
from support.decoders import (
    ipfixdump_check,
    parse_collector,
    parse_messages,
    tshark_decode,
)

from ovs_ipfix_py import collector as col
from ovs_ipfix_py.exporter import Exporter
from ovs_ipfix_py.options import (
    BridgeExporterOptions,
    CacheOptions,
    ExportOptions,
)

pytestmark = pytest.mark.timeout(120)

FORCED_END = 4
CACHED = CacheOptions(3600, 1 << 20)


def make_exporter(targets, **export):
    opts = BridgeExporterOptions(
        "br0", ExportOptions(targets=tuple(targets), cache=CACHED, **export),
        sampling=1, obs_domain_id=77, obs_point_id=5)
    return Exporter(opts, time.time())


def feed(exp, frames):
    for f in frames:
        exp.sample_bridge(f, len(f), 1, None, time.time())


def pump(exp, collectors, until, timeout=15.0):
    """Run the exporter and receive on every collector until
    ``until()``; False on timeout."""
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() >= deadline:
            return False
        exp.run(time.time())
        for c in collectors:
            c.receive(0.01)
    return True


def stream_of(exp, spec):
    return exp.collectors.find(spec)


def judge_tcp(c, tmp_path):
    """tshark over every connection as a TCP capture, ipfixDump over
    each connection as a file, our parser over all: (tshark decode,
    problems)."""
    problems = [f"parser: {p}" for p in parse_collector(c).problems]
    problems += [f"collector: {e}" for e in c.errors]
    pcap = os.path.join(tmp_path, "tcp.pcap")
    c.write_pcap(pcap)
    decoded = tshark_decode(pcap, c.port, transport="tcp")
    problems += [f"tshark: {w}" for w in decoded.warnings]
    for n, stream in enumerate(c.streams()):
        path = os.path.join(tmp_path, f"connection{n}.ipfix")
        with open(path, "wb") as f:
            f.write(b"".join(data for _, data in stream))
        ok, output = ipfixdump_check(path)
        if not ok:
            problems.append(f"ipfixDump, connection {n}: {output[:2000]}")
    return decoded, problems


def check_session_starts(stream, templates_only=True):
    """A session's first message starts with a template set, sequence
    0 (``templates_only``: it carries every template known before the
    session began, and no data); every domain's sequence numbers start
    at 0."""
    msgs = parse_messages(b"".join(d for _, d in stream))
    assert msgs[0].sequence == 0
    assert msgs[0].sets[0].set_id == 2
    if templates_only:
        assert msgs[0].templates and not msgs[0].records
    first = {}
    for m in msgs:
        first.setdefault(m.domain, m.sequence)
    assert set(first.values()) == {0}, first


# -- targets ------------------------------------------------------------------

@pytest.mark.parametrize("spec, want", [
    ("127.0.0.1:5000", ("udp", "127.0.0.1", 5000, None)),
    ("udp:127.0.0.1:5000", ("udp", "127.0.0.1", 5000, None)),
    ("tcp:127.0.0.1:5000", ("tcp", "127.0.0.1", 5000, None)),
    ("tcp:[::1]", ("tcp", "::1", 4739, None)),
    ("tls:collector.example.net", ("tls", "collector.example.net", 4739,
                                   None)),
    ("tls:[2001:db8::1]:4740", ("tls", "2001:db8::1", 4740, None)),
    ("file:/var/log/ipfix/flows.ipfix", ("file", "", 0,
                                         "/var/log/ipfix/flows.ipfix")),
    # A port alone names no host: the host "tcp" over UDP, as before.
    ("tcp:4739", ("udp", "tcp", 4739, None)),
])
def test_target_forms(spec, want):
    t = col.parse_target(spec)
    assert (t.transport, t.host, t.port, t.path) == want


@pytest.mark.parametrize("spec", [
    "file:relative/path", "tcp:[::1", "tls:1.2.3.4:0", "tcp:bad host:1",
    "file:", "tcp:",
])
def test_bad_target_forms(spec):
    with pytest.raises(col.TargetError):
        col.parse_target(spec)


def test_tls_target_needs_certificates():
    cs = col.CollectorSet(("tls:127.0.0.1:1",))
    assert len(cs) == 0
    assert "needs the daemon's -p/--private-key" in cs.bad_targets[0][1]
    assert cs.next_retry() is None   # not transient: never retried


# -- TCP ----------------------------------------------------------------------

@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6],
                         ids=["ipv4", "ipv6"])
def test_tcp_stream_is_judged_clean(tmp_path, family):
    frames, truth = tr.traffic_mix(31)
    with TcpCollector(family) as c, UdpCollector(family) as u:
        spec = "tcp:" + c.target
        exp = make_exporter([spec, u.target])
        try:
            t = stream_of(exp, spec)
            assert pump(exp, [c], lambda: t.connected)
            feed(exp, frames)
            exp.flush(time.time())
            assert pump(exp, [c, u], lambda: len(
                parse_collector(c).records) >= len(truth))
        finally:
            exp.close(time.time())
        assert c.wait_for(lambda _: c.open_connections == 0
                          and any(m.options_records for m in
                                  parse_collector(c).messages))
        u.receive(0.1)
        assert t.tx_errors == 0 and t.dropped_records == 0
        assert c.connections == 1
        # A new exporter knows no template yet: they come with the
        # first data, ahead of it.
        check_session_starts(c.streams()[0], templates_only=False)
        decoded, problems = judge_tcp(c, tmp_path)
        assert problems == []
        assert decoded.options, "final statistics missing"
        assert {r["end_reason"] for r in decoded.records} == {FORCED_END}
        assert totals(decoded.records) == truth_totals(truth)
        # The same flows as the UDP collector of the same exporter.
        assert our_totals(parse_collector(u).records) == \
            truth_totals(truth)
        # Sequence numbers are the session's own: the UDP collector's
        # stream began earlier (templates) but counts the same records.
        assert [m.sequence for m in parse_collector(c).messages
                if m.records] == [m.sequence for m in
                                  parse_collector(u).messages if m.records]


@pytest.mark.parametrize("how", ["close", "reset"])
def test_tcp_drop_noticed_at_once_and_reconnected(tmp_path, how):
    frames, truth = tr.traffic_mix(32)
    half = len(frames) // 2
    with TcpCollector() as c:
        spec = "tcp:" + c.target
        exp = make_exporter([spec])
        try:
            t = stream_of(exp, spec)
            assert pump(exp, [c], lambda: t.connected)
            feed(exp, frames[:half])
            exp.flush(time.time())
            first = truth_of(frames[:half])
            assert pump(exp, [c], lambda: len(
                parse_collector(c).records) >= len(first))
            if how == "close":
                c.close_connections()
            else:
                c.reset_connections()
            # The loop sleeps on the poller: the EOF must wake it, well
            # before the 30 s timer.
            poller = ovs.poller.Poller()
            exp.wait(poller)
            poller.timer_wait(30000)
            start = time.monotonic()
            poller.block()
            assert time.monotonic() - start < 10
            exp.run(time.time())
            assert not t.connected
            assert ("not connected (collector closed the connection)"
                    if how == "close" else "not connected (connection lost:"
                    " Connection reset by peer (ECONNRESET))") in exp.show()
            # Exported while away: buffered, then sent on the new
            # connection (backoff: 1 s).
            feed(exp, frames[half:])
            exp.flush(time.time())
            assert t.buffered_records > 0
            second = truth_of(frames[half:])
            assert pump(exp, [c], lambda: c.connections == 2 and len(
                parse_collector(c).records) >= len(first) + len(second))
        finally:
            exp.close(time.time())
        c.receive(0.2)
        assert t.sessions == 2 and t.dropped_records == 0
        assert exp.stats.not_sent_flows == 0
        streams = c.streams()
        assert len(streams) == 2
        check_session_starts(streams[0], templates_only=False)
        # The new session knows every template before any data.
        check_session_starts(streams[1])
        decoded, problems = judge_tcp(c, tmp_path)
        assert problems == []
        got = totals(decoded.records)
        want = truth_totals(first)
        for fid, v in truth_totals(second).items():
            p, l2, ip = want.get(fid, (0, 0, 0))
            want[fid] = (p + v[0], l2 + v[1], ip + v[2])
        assert got == want


def truth_of(frames):
    return tr.truth_of(frames)


def test_collector_down_longer_than_the_buffer(tmp_path):
    frames, truth = tr.traffic_mix(33, flows_per_kind=6)
    port = free_port(kind=socket.SOCK_STREAM)
    spec = f"tcp:127.0.0.1:{port}"
    exp = make_exporter([spec], collector_buffer_size=3000)
    c = None
    try:
        t = stream_of(exp, spec)
        exp.run(time.time())
        assert not t.connected and t.tx_errors >= 1   # refused
        feed(exp, frames)
        exp.flush(time.time())
        exported = exp.stats.records
        assert exported == len(truth)
        assert t.dropped_records > 0
        assert t.buffered_records + t.dropped_records == exported
        buffered = t.buffered_records
        # Every lost record counted as not sent, in ipfix/show too.
        assert exp.stats.not_sent_flows == t.dropped_records
        assert "dropped %d records" % t.dropped_records in exp.show()
        c = TcpCollector(port=port)
        assert pump(exp, [c], lambda: len(
            parse_collector(c).records) >= buffered, timeout=30)
        exp.close(time.time())
        assert c.wait_for(lambda _: c.open_connections == 0)
        session = parse_collector(c)
        assert len(session.records) == buffered
        # The statistics sent at close say what was lost.
        stats = session.options_records[-1].normalized()
        assert stats["not_sent_flows"] == t.dropped_records
        lost_packets = exp.stats.not_sent_packets
        assert stats["not_sent_packets"] == lost_packets > 0
        check_session_starts(c.streams()[0])
        decoded, problems = judge_tcp(c, tmp_path)
        assert problems == []
        got = totals(decoded.records)
        want = truth_totals(truth)
        assert all(want[fid] == v for fid, v in got.items())
        assert sum(v[0] for v in want.values()) - sum(
            v[0] for v in got.values()) == lost_packets
    finally:
        exp.close(time.time())
        if c is not None:
            c.close()


def test_partial_writes_lose_nothing(tmp_path):
    """A collector that does not read: the kernel takes part of a
    message, the rest waits for POLLOUT; nothing is lost or torn."""
    frames, truth = tr.traffic_mix(34, flows_per_kind=40)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    spec = "tcp:127.0.0.1:%d" % listener.getsockname()[1]
    exp = make_exporter([spec])   # the default buffer
    conn = None
    try:
        t = stream_of(exp, spec)
        exp.run(time.time())
        conn, _ = listener.accept()
        assert pump(exp, [], lambda: t.connected)
        t.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        feed(exp, frames)
        exp.flush(time.time())
        assert t.buffered_messages > 0   # the kernel took only part
        poller = ovs.poller.Poller()
        exp.wait(poller)
        assert t._events() & ovs.poller.POLLOUT
        received = bytearray()
        conn.setblocking(False)

        def drained():
            try:
                while True:
                    data = conn.recv(1 << 16)
                    if not data:
                        break
                    received.extend(data)
            except BlockingIOError:
                pass
            return t.buffered_messages == 0
        assert pump(exp, [], drained, timeout=60)
        exp.close(time.time())
        conn.setblocking(True)
        conn.settimeout(10)
        while True:
            data = conn.recv(1 << 16)
            if not data:
                break
            received.extend(data)
    finally:
        exp.close(time.time())
        if conn is not None:
            conn.close()
        listener.close()
    assert t.dropped_records == 0 and t.tx_errors == 0
    path = os.path.join(tmp_path, "stream.ipfix")
    with open(path, "wb") as f:
        f.write(received)
    ok, output = ipfixdump_check(path)
    assert ok, output
    msgs = parse_messages(bytes(received))
    assert sum(len(m.data_records) for m in msgs) == len(truth)
    assert our_totals([r for m in msgs for r in m.data_records]) == \
        truth_totals(truth)


# -- files --------------------------------------------------------------------

def file_records(path):
    with open(path, "rb") as f:
        msgs = parse_messages(f.read())
    return [r for m in msgs for r in m.data_records], msgs


def test_file_target_readable_after_every_export_and_reopened(tmp_path):
    frames, truth = tr.traffic_mix(35)
    half = len(frames) // 2
    path = os.path.join(tmp_path, "flows.ipfix")
    exp = make_exporter(["file:" + path])
    try:
        feed(exp, frames[:half])
        exp.flush(time.time())
        # Readable as a whole right after the export (no close).
        ok, output = ipfixdump_check(path)
        assert ok, output
        first = tr.truth_of(frames[:half])
        records, msgs = file_records(path)
        assert our_totals(records) == truth_totals(first)
        # logrotate: rename, then reopen.
        os.rename(path, path + ".1")
        exp.reopen()
        assert os.path.exists(path)
        feed(exp, frames[half:])
        exp.flush(time.time())
    finally:
        exp.close(time.time())
    for p in (path + ".1", path):
        ok, output = ipfixdump_check(p)
        assert ok, (p, output)
    second = tr.truth_of(frames[half:])
    records, msgs = file_records(path)
    assert our_totals(records) == truth_totals(second)
    assert msgs[0].templates and msgs[0].sequence == 0
    assert msgs[-1].options_records   # final statistics


def test_unwritable_file_counted_and_retried(tmp_path):
    frames, truth = tr.traffic_mix(36)
    directory = os.path.join(tmp_path, "not-yet")
    path = os.path.join(directory, "flows.ipfix")
    spec = "file:" + path
    exp = make_exporter([spec])
    try:
        t = stream_of(exp, spec)
        assert not t.connected and t.tx_errors == 1
        assert "No such file or directory" in exp.show()
        feed(exp, frames)
        exp.flush(time.time())
        assert t.buffered_records == len(truth)
        os.mkdir(directory)
        assert pump(exp, [], lambda: t.connected, timeout=10)
        assert t.buffered_records == 0
    finally:
        exp.close(time.time())
    ok, output = ipfixdump_check(path)
    assert ok, output
    records, _ = file_records(path)
    assert our_totals(records) == truth_totals(truth)
    assert exp.stats.not_sent_flows == 0


def test_stream_session_rewrites(tmp_path):
    """What a stream does to the exporter's messages, byte for byte: its
    own sequence numbers, each template once per session, a template
    redefined only after its withdrawal, a new file starting with every
    template."""
    from ovs_ipfix_py import message

    path = os.path.join(tmp_path, "s.ipfix")
    t = col.make_transport(col.parse_target("file:" + path))
    t.run(0.0)

    def msg(sets, seq, records):
        body = b"".join(message.SET_HEADER.pack(sid, 4 + len(b)) + b
                        for sid, b in sets)
        m = message.Message(message.HEADER.pack(
            10, 16 + len(body), 1, seq, 7) + body)
        m.domain, m.records = 7, records
        return m

    tmpl_a = bytes.fromhex("0100 0001 0002 0004")     # id 256: packets
    tmpl_b = bytes.fromhex("0100 0001 0001 0004")     # id 256: octets
    data = bytes.fromhex("00000005")
    sent = [msg([(2, tmpl_a), (256, data)], 40, 1),
            msg([(2, tmpl_a)], 41, 0),                # a refresh
            msg([(256, data + data)], 41, 2),
            msg([(2, tmpl_b), (256, data)], 43, 1)]
    for m in sent:
        assert t.send(m)
    t.reopen()
    assert t.send(msg([(256, data)], 44, 1))
    t.close()
    with open(path, "rb") as f:
        got = f.read()
    msgs = parse_messages(got)
    assert [m.sequence for m in msgs] == [0, 1, 3, 0, 0]
    assert len(msgs[0].templates) == 1 and len(msgs[0].records) == 1
    # The refresh is not sent; the redefinition is withdrawn first.
    assert msgs[2].sets[0].set_id == 2
    raw = got[sum(m.length for m in msgs[:2]):]
    assert raw[16:20] == message.SET_HEADER.pack(2, 4 + 4 + len(tmpl_b))
    assert raw[20:24] == bytes.fromhex("0100 0000") and \
        raw[24:32] == tmpl_b
    # The new file: the templates (the latest), then the data, from 0.
    assert msgs[3].templates and not msgs[3].records
    start = sum(m.length for m in msgs[:3])
    assert got[start + 16:start + 20] == message.SET_HEADER.pack(
        2, 4 + len(tmpl_b))
    assert got[start + 20:start + 28] == tmpl_b
    assert [m.sequence for m in msgs[3:]] == [0, 0]
    assert t.dropped_records == 0


def test_tcp_connect_times_out(tmp_path):
    """A collector whose SYN queue is full (its SYNs dropped) leaves
    the connection in progress: after CONNECT_TIMEOUT s (on the clock
    of ``now``) the attempt is abandoned, counted and retried later."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    try:
        for _ in range(4):    # never accepted: the queue fills up
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(listener.getsockname())
            fillers.append(s)
        time.sleep(0.2)
        spec = "tcp:127.0.0.1:%d" % listener.getsockname()[1]
        cs = col.CollectorSet((spec,), 1000.0)
        t = cs.find(spec)
        assert t.state == "connecting"
        assert cs.next_retry() == 1000.0 + t.CONNECT_TIMEOUT
        cs.run(1000.0 + t.CONNECT_TIMEOUT)
        assert t.state == "backoff" and t.tx_errors == 1
        assert "timed out after 10 s" in t.describe()
        assert cs.next_retry() == 1000.0 + t.CONNECT_TIMEOUT + 1
        cs.close()
    finally:
        for s in fillers:
            s.close()
        listener.close()
