"""RFC 7011 on the wire: the daemon's captured stream, checked message by
message by our own parser and by tshark and ipfixDump.

The database runs a schema with the columns newer OVS releases added
(``template_interval``, ``stats_interval``), so the intervals can be set
to 1 s; ``other_config:max-message-size=512`` bounds the messages.  Flow
samples of one collector set arrive in two observation domains (7 and
8), in rounds, with a 1 s active timeout so that records leave all the
time; half-way through, a second collector is added to the row (a new
transport session for both).  On every transport session (one source
socket to one collector):

- no message exceeds 512 bytes, and each datagram holds one message;
- the sequence number of each message equals the data records (options
  data records included) sent before it in its observation domain
  (section 3.1);
- every data set's template was sent earlier on that socket, or earlier
  in the same message (section 8), and the options template comes before
  its options data;
- templates are re-sent every template_interval (section 8.4), no
  sooner and not much later;
- exporter statistics (section 4.3) arrive every stats_interval;
- tshark reports no malformed message and no sequence warning, and
  ipfixDump reads the session, as an RFC 5655 file, with no error.
"""

import os
import struct
import time

import pytest
from support import pcapfile
from support.collector import UdpCollector
from support.decoders import (
    HEADER,
    OPTIONS_TEMPLATE_SET_ID,
    SET_HEADER,
    TEMPLATE_SET_ID,
    Session,
    ipfixdump_check,
    tshark_decode,
)
from support.ovsdb import newer_schema, transact
from support.switch import ExporterDaemon
from traffic import traffic_mix

pytestmark = pytest.mark.timeout(120)

MAX_MESSAGE = 512
TEMPLATE_INTERVAL = 1.0  # s
STATS_INTERVAL = 1.0  # s
#: How late (s) a timed send may be on a loaded machine; how early: never
#: (the loop waits on the same clock), give or take clock granularity.
LATE, EARLY = 0.5, 0.1
DOMAINS = (7, 8)
#: Replay rounds, one every ROUND s; the second collector comes in after
#: the second round, so its session lives about 5 template intervals
#: (over 2 even when a busy machine delays its start by a second).
ROUNDS, ROUND = 8, 0.8
STATS_TEMPLATE_ID = 320


# ---------------------------------------------------------------------------
# Our own reading of one transport session, set by set.


class SessionLog:
    """One source socket's messages, in arrival order, with what each
    carried: [(arrival, domain, sequence, size, sets)] where sets are
    (set id, [template ids] or number of records)."""

    def __init__(self, datagrams):
        self.datagrams = datagrams
        self.session = Session()
        self.messages = []
        for arrival, data in datagrams:
            (msg,) = self.session.parse(data, "s", arrival, datagram=True)
            sets = []
            for s in msg.sets:
                if s.set_id in (TEMPLATE_SET_ID, OPTIONS_TEMPLATE_SET_ID):
                    sets.append((s.set_id,
                                 [t.template_id for t in s.templates]))
                else:
                    sets.append((s.set_id, len(s.records)))
            self.messages.append((arrival, msg.domain, msg.sequence,
                                  len(data), sets, msg))


def sessions_of(collector):
    """{source: SessionLog} of a collector's datagrams."""
    by_source = {}
    for item, source in zip(collector.datagrams, collector.senders):
        by_source.setdefault(source, []).append(item)
    return {src: SessionLog(items) for src, items in by_source.items()}


def check_sizes(log):
    for _, _, _, size, _, msg in log.messages:
        assert HEADER.size < size <= MAX_MESSAGE, size
        assert msg.length == size
    # Records are packed: most data messages are close to the bound.
    sizes = [size for _, _, _, size, sets, _ in log.messages
             if any(s >= 256 for s, _ in sets)]
    assert max(sizes) > MAX_MESSAGE - 120, sizes


def check_sequence_numbers(log):
    """Section 3.1, counted by hand per observation domain."""
    sent = {}
    for _, domain, sequence, _, sets, _ in log.messages:
        assert sequence == sent.get(domain, 0), (domain, sequence, sent)
        sent[domain] = sent.get(domain, 0) + sum(
            n for set_id, n in sets if set_id >= 256)
    return sent


def check_templates_first(log):
    """Section 8: a data set's template was sent before it, on this
    socket and in this domain; options templates (set 3) before options
    data.  Returns {domain: {template id: [times sent]}}."""
    known = {}
    for arrival, domain, _, _, sets, _ in log.messages:
        seen = known.setdefault(domain, {})
        for set_id, content in sets:
            if set_id in (TEMPLATE_SET_ID, OPTIONS_TEMPLATE_SET_ID):
                for tid in content:
                    seen.setdefault(tid, []).append(arrival)
            else:
                assert set_id in seen, (domain, set_id, "before template")
    return known


def refresh_times(known):
    """Times templates were re-sent (not first sent), grouped: a
    refresh may span a few messages sent at once."""
    times = sorted(t for sends in known.values() for t in sends[1:])
    groups = []
    for t in times:
        if not groups or t - groups[-1] > 0.2:
            groups.append(t)
    return groups


def check_refresh(log, known, end):
    """Section 8.4: templates re-sent every TEMPLATE_INTERVAL, from the
    first template sent in the domain until the session ends."""
    for domain, sends in known.items():
        first = min(min(v) for v in sends.values())
        refreshes = refresh_times(sends)
        steps = [first] + refreshes + [end]
        gaps = [b - a for a, b in zip(steps, steps[1:])]
        assert all(g <= TEMPLATE_INTERVAL + LATE for g in gaps), (domain,
                                                                  gaps)
        assert all(g >= TEMPLATE_INTERVAL - EARLY for g in gaps[1:-1]), (
            domain, gaps)
        # Each refresh re-sends every template known at the time.
        for when in refreshes:
            for tid, times in sends.items():
                if min(times) < when - 0.2:
                    assert any(abs(t - when) <= 0.2 for t in times), (
                        domain, tid, when)
        yield domain, len(refreshes)


def stats_times(log):
    """{domain: [arrival of each exporter statistics record]}."""
    out = {}
    for arrival, domain, _, _, sets, _ in log.messages:
        for set_id, n in sets:
            if set_id == STATS_TEMPLATE_ID:
                out.setdefault(domain, []).extend([arrival] * n)
    return out


def pump(collectors, seconds):
    """Read every collector for ``seconds`` (at least once each), in
    short turns, so arrival times stay within a few ms of the truth."""
    deadline = time.monotonic() + max(0.0, seconds)
    while True:
        for c in collectors:
            c.receive(0.005)
        if time.monotonic() >= deadline:
            return


def judge_session(log, port, directory, name):
    """tshark and ipfixDump over one session's messages."""
    pcap = os.path.join(directory, name + ".pcap")
    pcapfile.write_pcap(pcap, log.datagrams, port)
    decoded = tshark_decode(pcap, port)
    path = os.path.join(directory, name + ".ipfix")
    with open(path, "wb") as f:
        f.write(b"".join(data for _, data in log.datagrams))
    ok, output = ipfixdump_check(path)
    return decoded, ok, output


# ---------------------------------------------------------------------------


@pytest.fixture
def newer_server(ovsdb_factory, tmp_path):
    return ovsdb_factory(schema=newer_schema(tmp_path / "new.ovsschema"))


def test_stream_keeps_rfc7011(newer_server, tmp_path):
    """Every transport session of a flow exporter with two domains, 1 s
    intervals, 512-byte messages and a target added mid-run keeps the
    RFC 7011 rules listed in the module docstring."""
    server = newer_server
    frames, _ = traffic_mix(seed=31, flows_per_kind=1)
    a, b = UdpCollector(), UdpCollector()
    plugin = None
    try:
        server.vsctl(
            "add-br", "br0", "--", "--id=@br0", "get", "Bridge", "br0",
            "--", "--id=@i", "create", "IPFIX", f'targets="{a.target}"',
            "cache_active_timeout=1", "cache_max_flows=10000",
            f"other_config:max-message-size={MAX_MESSAGE}",
            "--", "create", "Flow_Sample_Collector_Set", "id=1",
            "bridge=@br0", "ipfix=@i")
        transact(server, {"op": "update", "table": "IPFIX", "where": [],
                          "row": {"template_interval": 1,
                                  "stats_interval": 1}})
        plugin = ExporterDaemon(server)
        plugin.start()
        plugin.wait_counter("bridge br0 id 1", "flows", 0)
        path = plugin.write_frames(frames)
        start = time.time()
        for round_ in range(ROUNDS):
            procs = [plugin.start_replay(path, "--bridge=br0",
                                         "--collector-set=1",
                                         f"--obs-domain-id={domain}",
                                         "--obs-point-id=1")
                     for domain in DOMAINS]
            # Keep reading: arrival times are when a collector reads.
            while any(p.poll() is None for p in procs):
                pump((a, b), 0.02)
            assert all(p.returncode == 0 for p in procs), [
                p.stderr.read() for p in procs]
            for p in procs:
                p.stderr.close()
            if round_ == 1:
                # A new target: a new writer and socket for both.
                server.vsctl("add", "IPFIX", ".", "targets",
                             f'"{b.target}"')
            pump((a, b), start + ROUND * (round_ + 1) - time.time())
        plugin.stop()
        end = time.time()
        pump((a, b), 0.3)
    finally:
        if plugin is not None:
            plugin.stop()
        a.close()
        b.close()

    logs = {("a", src): log for src, log in sessions_of(a).items()}
    logs.update({("b", src): log for src, log in sessions_of(b).items()})
    # a: the first socket, then the socket of the reconfigured exporter;
    # b: that second one only.
    assert sorted(name for name, _ in logs) == ["a", "a", "b"]
    refreshes = {}
    for key, log in logs.items():
        assert log.session.problems == [], (key, log.session.problems[:5])
        assert all(len(d) == m.length for (_, d), (*_, m)
                   in zip(log.datagrams, log.messages))
        check_sizes(log)
        sent = check_sequence_numbers(log)
        assert set(sent) == set(DOMAINS) and min(sent.values()) > 30
        known = check_templates_first(log)
        life_end = min(end, log.messages[-1][0] + 0.05)
        refreshes[key] = dict(check_refresh(log, known, life_end))
        for times in stats_times(log).values():
            gaps = [y - x for x, y in zip(times, times[1:])]
            assert all(g <= STATS_INTERVAL + LATE for g in gaps), gaps
        decoded, ok, output = judge_session(
            log, (a if key[0] == "a" else b).port, str(tmp_path),
            f"{key[0]}{key[1][1]}")
        assert decoded.warnings == [], (key, decoded.warnings[:5])
        assert ok, output[:3000]
        assert len(decoded.records) == sum(
            len(m.data_records) for *_, m in log.messages)
        assert len(decoded.options) == sum(
            len(m.options_records) for *_, m in log.messages)
    # The first session ended at the reconfiguration, before any timer
    # was due; the two sessions after it lived several intervals: their
    # templates were refreshed in every domain, their statistics sent
    # every interval and once more on exit.
    first, second = sorted(logs.values(), key=lambda g: g.messages[0][0])[
        :2]
    assert first.messages[-1][0] < second.messages[0][0]
    for key, log in logs.items():
        if log is first:
            continue
        life = log.messages[-1][0] - log.messages[0][0]
        assert life > 2 * TEMPLATE_INTERVAL, (key, life)
        for domain in DOMAINS:
            assert refreshes[key][domain] >= int(life / TEMPLATE_INTERVAL
                                                 ) - 1, (key, refreshes)
        stats = stats_times(log)
        assert set(stats) == set(DOMAINS)
        assert all(len(t) >= int(life / STATS_INTERVAL) for t in
                   stats.values()), (key, stats)
        # Statistics are the last word of a session (sent on exit).
        assert {sets[-1][0] for *_, sets, _ in log.messages[-2:]} == {
            STATS_TEMPLATE_ID}
    # The options template and data of the statistics travel in one
    # message the first time: template set first.
    for log in logs.values():
        for *_, sets, _ in log.messages:
            ids = [s for s, _ in sets]
            if STATS_TEMPLATE_ID in ids and OPTIONS_TEMPLATE_SET_ID in ids:
                assert ids.index(OPTIONS_TEMPLATE_SET_ID) < ids.index(
                    STATS_TEMPLATE_ID)


def test_header_and_sets_are_well_formed(newer_server):
    """Byte-level reading of a short session, independently of the
    parser: version 10, length = datagram, export time in whole seconds
    not before the send (OVS rounds it up; so do we), sets that tile the
    message exactly, set ids 2, 3 or >= 256."""
    server = newer_server
    c = UdpCollector()
    plugin = ExporterDaemon(server)
    try:
        plugin.start()
        server.vsctl(
            "add-br", "br0", "--", "--id=@i", "create", "IPFIX",
            f'targets="{c.target}"', "sampling=1",
            "cache_active_timeout=60", "cache_max_flows=10000",
            f"other_config:max-message-size={MAX_MESSAGE}",
            "--", "set", "Bridge", "br0", "ipfix=@i")
        plugin.wait_counter("bridge br0", "flows", 0)
        frames, truth = traffic_mix(seed=32, flows_per_kind=1)
        plugin.replay(frames, "--bridge=br0")
        plugin.wait_counter("bridge br0", "sampled pkts", len(frames))
        before = time.time()
        plugin.stop()
        assert c.wait_quiet(0, quiet=0.2)
    finally:
        plugin.stop()
        c.close()
    kinds = set()
    for arrival, data in c.datagrams:
        version, length, export_time, _, _ = HEADER.unpack_from(data)
        assert (version, length) == (10, len(data))
        assert before - 1 <= export_time <= arrival + 1
        pos = HEADER.size
        while pos < length:
            set_id, set_len = SET_HEADER.unpack_from(data, pos)
            assert set_id in (2, 3) or set_id >= 256, set_id
            assert set_len >= SET_HEADER.size and pos + set_len <= length
            kinds.add(min(set_id, 256))
            pos += set_len
        assert pos == length
        # No template withdrawal: every template record has fields.
        for offset in _template_records(data):
            assert struct.unpack_from("!H", data, offset + 2)[0] > 0
    assert kinds == {2, 3, 256}
    assert sum(len(d) for _, d in c.datagrams) > len(truth) * 40


def _template_records(data):
    """Offsets of the template records of a message's template sets."""
    pos = HEADER.size
    while pos < len(data):
        set_id, set_len = SET_HEADER.unpack_from(data, pos)
        if set_id == TEMPLATE_SET_ID:
            off = pos + SET_HEADER.size
            while off + 4 <= pos + set_len:
                count = struct.unpack_from("!H", data, off + 2)[0]
                yield off
                off += 4
                for _ in range(count):
                    ie = struct.unpack_from("!H", data, off)[0]
                    off += 8 if ie & 0x8000 else 4
        pos += set_len
