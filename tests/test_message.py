"""IPFIX messages (RFC 7011): sequence numbers per observation domain,
many records per message, one set per template, the size bound,
templates before data and their refresh, the options template before
its data, delta timestamps.

Messages are read back with tests/support/decoders.py's parser (written
from RFC 7011 independently of ovs_ipfix_py), which also checks sequence
numbers and templates-before-data on its own.
"""

import socket
import struct

import pytest
import traffic as tr
from support.collector import UdpCollector
from support.decoders import Session, parse_collector

from ovs_ipfix_py import message
from ovs_ipfix_py import templates as t
from ovs_ipfix_py.exporter import Exporter
from ovs_ipfix_py.options import (
    BridgeExporterOptions,
    CacheOptions,
    ExportOptions,
    FlowExporterOptions,
)

HEADER = struct.Struct("!HHIII")
TCP4 = t.template_id(t.L2_ETH, t.L3_IPV4, t.L4_TCP, t.INGRESS)
UDP4 = t.template_id(t.L2_ETH, t.L3_IPV4, t.L4_UDP, t.INGRESS)
STATS = t.exporter_stats_template()


def records(tid, n, tag=0):
    """``n`` fake data records of template ``tid``, each distinct."""
    length = t.get(tid).data_length
    return [(tag * 100000 + i).to_bytes(4, "big") + bytes(length - 4)
            for i in range(n)]


def header(msg):
    version, length, export_time, seq, domain = HEADER.unpack_from(msg)
    assert version == 10 and length == len(msg)
    return export_time, seq, domain


def set_ids(msg):
    """Set ids of a message, in order."""
    out = []
    pos = 16
    while pos < len(msg):
        set_id, length = struct.unpack_from("!HH", msg, pos)
        assert length >= 4
        out.append(set_id)
        pos += length
    assert pos == len(msg)
    return out


def parse(msgs):
    session = Session()
    for m in msgs:
        session.parse(bytes(m), "exporter")
    assert session.problems == []
    return session


# -- the writer alone -------------------------------------------------

def test_sequence_counts_data_records_per_domain():
    w = message.MessageWriter()
    tmpl = t.get(TCP4).record
    a1 = w.data_messages(1, 10.0, [(TCP4, tmpl, records(TCP4, 3))])
    b1 = w.data_messages(2, 10.0, [(TCP4, tmpl, records(TCP4, 5))])
    a2 = w.data_messages(1, 11.0, [(TCP4, tmpl, records(TCP4, 2))])
    opts = w.data_messages(1, 12.0, [(STATS.id, STATS.record,
                                      [bytes(STATS.data_length)])],
                           options=True)
    refresh = w.template_messages(1, 13.0)
    a3 = w.data_messages(1, 14.0, [(TCP4, tmpl, records(TCP4, 1))])
    b2 = w.data_messages(2, 14.0, [(TCP4, tmpl, records(TCP4, 1))])
    seqs = [(header(m)[2], header(m)[1])
            for m in a1 + b1 + a2 + opts + refresh + a3 + b2]
    # Domain 1: 3 then 2 data records, 1 options data record; the
    # template-only refresh counts nothing.  Domain 2 counts its own.
    assert seqs == [(1, 0), (2, 0), (1, 3), (1, 5), (1, 6), (1, 6), (2, 5)]
    assert [m.records for m in a1 + b1 + a2 + opts + refresh] == \
        [3, 5, 2, 1, 0]
    parse(a1 + b1 + a2 + opts + refresh + a3 + b2)


def test_sequence_wraps_modulo_2_32():
    w = message.MessageWriter()
    w.domain(7).sequence = 0xFFFFFFFE
    tmpl = t.get(UDP4).record
    w.data_messages(7, 1.0, [(UDP4, tmpl, records(UDP4, 5))])
    [m] = w.data_messages(7, 2.0, [(UDP4, tmpl, records(UDP4, 1))])
    assert header(m)[1] == 3


def test_many_records_per_message_and_one_set_per_template():
    w = message.MessageWriter(1400)
    tmpl4, tmpl6 = t.get(TCP4), t.get(UDP4)
    msgs = w.data_messages(0, 1.0, [
        (TCP4, tmpl4.record, records(TCP4, 40)),
        (UDP4, tmpl6.record, records(UDP4, 40, tag=1))])
    assert all(len(m) <= 1400 for m in msgs)
    assert sum(m.records for m in msgs) == 80
    assert max(m.records for m in msgs) >= 12
    # Enough messages, not more: every message but the last is full.
    biggest = max(tmpl4.data_length, tmpl6.data_length) + 4
    assert all(len(m) > 1400 - biggest for m in msgs[:-1])
    for m in msgs:
        ids = [i for i in set_ids(m) if i >= 256]
        assert len(ids) == len(set(ids)), "a template split in two sets"
    session = parse(msgs)
    got = [r.fields[0][1] for m in session.messages for r in m.records]
    want = [r[:4] for r in records(TCP4, 40) + records(UDP4, 40, tag=1)]
    assert got == want


@pytest.mark.parametrize("max_size", [512, 600, 1400, 9000])
def test_no_message_over_the_bound(max_size):
    w = message.MessageWriter(max_size)
    groups = []
    for tid in sorted(t.all_templates()):
        groups.append((tid, t.get(tid).record, records(tid, 30, tid)))
    msgs = w.data_messages(3, 1.0, groups)
    msgs += w.template_messages(3, 601.0)
    assert all(len(m) <= max_size for m in msgs)
    assert sum(m.records for m in msgs) == 30 * len(groups)
    session = parse(msgs)
    assert len(session.templates) == len(groups)


def test_max_size_below_512_is_refused():
    with pytest.raises(ValueError, match="512"):
        message.MessageWriter(511)


def test_template_first_then_not_again():
    w = message.MessageWriter()
    tmpl = t.get(TCP4).record
    [m1] = w.data_messages(5, 1.0, [(TCP4, tmpl, records(TCP4, 1))])
    assert set_ids(m1) == [2, TCP4]
    assert m1[16 + 4:16 + 4 + len(tmpl)] == tmpl
    [m2] = w.data_messages(5, 2.0, [(TCP4, tmpl, records(TCP4, 1))])
    assert set_ids(m2) == [TCP4]
    # Another domain gets its own template first.
    [m3] = w.data_messages(6, 2.0, [(TCP4, tmpl, records(TCP4, 1))])
    assert set_ids(m3) == [2, TCP4]


def test_template_refresh_due_after_the_interval():
    w = message.MessageWriter(template_interval=30)
    assert w.next_refresh() is None and w.refresh_due(1e9) == []
    w.data_messages(1, 100.0, [(TCP4, t.get(TCP4).record,
                                records(TCP4, 1))])
    w.data_messages(1, 110.0, [(UDP4, t.get(UDP4).record,
                                records(UDP4, 1))])
    w.data_messages(1, 111.0, [(STATS.id, STATS.record,
                                [bytes(STATS.data_length)])], options=True)
    assert w.next_refresh() == 130.0
    assert w.refresh_due(129.9) == []
    assert w.refresh_due(130.0) == [1]
    [m] = w.template_messages(1, 130.0)
    # Every template of the domain, the late ones and the options one.
    assert set_ids(m) == [2, 3]
    assert header(m)[1] == 3 and m.records == 0
    assert w.next_refresh() == 160.0


def test_export_time_rounds_up():
    assert message.export_time(5.0) == 5
    assert message.export_time(5.000001) == 6
    assert message.export_time(float(2 ** 32 + 3)) == 3


# -- through the exporter ---------------------------------------------

@pytest.fixture
def collector():
    with UdpCollector(socket.AF_INET) as c:
        yield c


def bridge_exporter(targets, now=0.0, **export):
    cache = export.pop("cache", CacheOptions(3600, 1 << 20))
    opts = BridgeExporterOptions(
        "br0", ExportOptions(targets=tuple(targets), cache=cache, **export),
        sampling=1, obs_domain_id=9)
    return Exporter(opts, now)


def flow_exporter(targets, now=0.0, **export):
    opts = FlowExporterOptions(
        "br0", 1, ExportOptions(targets=tuple(targets),
                                cache=CacheOptions(3600, 1 << 20),
                                **export))
    return Exporter(opts, now)


def wait_all(collector, exporter, timeout=10.0):
    want = exporter.stats.tx_pkts
    assert collector.wait_for(lambda d: len(d) >= want, timeout), \
        (len(collector.datagrams), want)
    collector.receive(0.05)
    assert len(collector.datagrams) == want
    return parse_collector(collector)


def test_sequence_numbers_across_two_domains_on_the_wire(collector):
    exp = flow_exporter([collector.target])
    frames = list(tr.many_flows(300, 300, seed=3))
    try:
        now = 1000.0
        for i, f in enumerate(frames):
            exp.sample_flow(f, len(f), 1, None, 65535, 10 + i % 2, 0, 1,
                            now)
        exp.flush(now + 1)
        exp._send_stats(now + 1)
        for f in frames[:50]:
            exp.sample_flow(f, len(f), 1, None, 65535, 11, 0, 1, now + 2)
        exp.flush(now + 3)
        session = wait_all(collector, exp)
        assert session.problems == []
        by_domain = {}
        for m in session.messages:
            by_domain.setdefault(m.domain, []).append(m)
        assert sorted(by_domain) == [10, 11]
        for domain, msgs in by_domain.items():
            assert msgs[0].sequence == 0
            total = 0
            for m in msgs:
                assert m.sequence == total
                total += len(m.records)
            flows = 150 + (50 if domain == 11 else 0)
            assert total == flows + 1        # and one options record
            assert len(msgs) < total / 5     # many records per message
    finally:
        exp.close(2000.0)


@pytest.mark.parametrize("max_size", [512, 1400])
def test_thousands_of_flows_within_the_bound(collector, max_size):
    exp = bridge_exporter([collector.target],
                          max_message_size=max_size)
    frames, truth = tr.traffic_mix(5)
    frames += list(tr.many_flows(3000, 3000, seed=5))
    try:
        for f in frames:
            exp.sample_bridge(f, len(f), 1, None, 10.0)
        n_flows = len(exp.cache)
        assert n_flows > 3000
        exp.flush(11.0)
        session = wait_all(collector, exp)
        assert session.problems == []
        sizes = [len(d) for _, d in collector.datagrams]
        assert max(sizes) <= max_size
        assert len(session.records) == n_flows
        # Packed: the average message is more than 3/4 full.
        assert sum(sizes) / len(sizes) > 0.75 * max_size
        for m in session.messages:
            data_sets = [s.set_id for s in m.sets if s.set_id >= 256]
            assert len(data_sets) == len(set(data_sets))
            # Any template is in this message or an earlier one.
            for s in m.sets:
                assert s.decoded
    finally:
        exp.close(12.0)


def test_template_refresh_on_the_wire(collector):
    exp = bridge_exporter([collector.target], template_interval=10,
                          stats_interval=10 ** 6)
    tcp = tr.build_frame(proto=tr.IPPROTO_TCP)
    udp = tr.build_frame(proto=tr.IPPROTO_UDP)
    try:
        exp.sample_bridge(tcp, len(tcp), 1, None, 100.0)
        exp.flush(100.0)
        exp.run(105.0)
        exp.sample_bridge(udp, len(udp), 1, None, 105.0)
        exp.flush(105.0)
        assert exp.next_deadline() == 110.0
        exp.run(109.9)
        n_before = exp.stats.tx_pkts
        exp.run(110.0)
        assert exp.stats.tx_pkts == n_before + 1
        exp.run(115.0)
        exp.run(120.0)
        session = wait_all(collector, exp)
        msgs = session.messages
        assert [len(m.data_records) for m in msgs] == [1, 1, 0, 0]
        assert [sorted(t.template_id for t in m.templates)
                for m in msgs] == [[TCP4], [UDP4], [TCP4, UDP4],
                                   [TCP4, UDP4]]
        assert [m.sequence for m in msgs] == [0, 1, 2, 2]
    finally:
        exp.close(200.0)


def test_options_template_before_options_data(collector):
    exp = bridge_exporter([collector.target], template_interval=1000,
                          stats_interval=60)
    try:
        exp.run(30.0)
        exp.run(60.0)        # first statistics
        exp.run(120.0)       # second: the template is known by now
        exp.run(1060.0)      # template refresh (and statistics)
        session = wait_all(collector, exp)
        msgs = session.messages
        assert len(msgs) >= 3
        first = msgs[0]
        assert [s.set_id for s in first.sets] == [3, STATS.id]
        assert first.templates[0].scope_count == 1
        assert [s.set_id for s in msgs[1].sets] == [STATS.id]
        kinds = [s.set_id for m in msgs for s in m.sets]
        assert 3 in kinds[kinds.index(STATS.id) - 1:kinds.index(STATS.id)]
        assert all(r.options for m in msgs for r in m.records)
        rec = msgs[0].records[0]
        assert rec.uint(144) == exp.exporting_process_id
        assert (rec.uint(166), rec.uint(167), rec.uint(168)) == (0, 0, 0)
        # Refresh re-sends the options template too.
        assert any(3 in [s.set_id for s in m.sets] for m in msgs[2:])
    finally:
        exp.close(2000.0)


def test_timestamps_are_first_and_last_seen_in_ms(collector):
    """flowStart/EndMilliseconds: the flow's own times (ms since 1970,
    truncated), however far from the export time: a flow 2 hours old,
    one sampled after the export time (clock stepped back), and one
    whose times fall between two ms."""
    exp = bridge_exporter([collector.target])
    frames = [tr.build_frame(sport=1000 + i) for i in range(3)]
    try:
        exp.sample_bridge(frames[0], 60, 1, None, 10.0)
        exp.sample_bridge(frames[0], 60, 1, None, 7000.0)
        exp.sample_bridge(frames[1], 60, 1, None, 7300.0)
        exp.sample_bridge(frames[2], 60, 1, None, 7199.2505)
        exp.flush(7200.0)
        session = wait_all(collector, exp)
        got = {r.uint(7): (r.uint(152), r.uint(153))
               for m in session.messages for r in m.data_records}
        assert got == {1000: (10_000, 7_000_000),
                       1001: (7_300_000, 7_300_000),
                       1002: (7_199_250, 7_199_250)}
        assert session.messages[0].export_time == 7200
    finally:
        exp.close(7201.0)


# -- record blocks ----------------------------------------------------

@pytest.mark.parametrize("max_size", [512, 1400, 9000])
@pytest.mark.parametrize("counts", [(1,), (37,), (5, 200), (0, 3, 64)])
def test_record_block_makes_the_messages_records_one_by_one_make(
        max_size, counts):
    """A RecordBlock is cut into the same messages, set boundaries and
    sequence numbers as the same records added one at a time, and each
    message carries its records' packet and octet totals."""
    groups_list, groups_block = [], []
    for tag, (tid, n) in enumerate(zip((TCP4, UDP4, TCP4), counts)):
        recs = records(tid, n, tag)
        groups_list.append((tid, t.get(tid).record, recs))
        packets = [tag * 1000 + i for i in range(n)]
        octets = [7 * p + 1 for p in packets]
        groups_block.append((tid, t.get(tid).record, message.RecordBlock(
            b"".join(recs), t.get(tid).data_length, packets, octets)))
    by_list = message.MessageWriter(max_size).data_messages(
        4, 10.0, groups_list)
    by_block = message.MessageWriter(max_size).data_messages(
        4, 10.0, groups_block)
    assert [bytes(m) for m in by_block] == [bytes(m) for m in by_list]
    assert [m.records for m in by_block] == [m.records for m in by_list]
    assert all(len(m) <= max_size for m in by_block)
    # Totals per message, against the records each message holds.
    want = {}
    for _tid, _rec, block in groups_block:
        for i in range(len(block.packets)):
            rec = block.data[i * block.length:(i + 1) * block.length]
            want[rec] = (block.packets[i], block.octets[i])
    for m in by_block:
        body = bytes(m)
        held = []
        pos = 16
        while pos < len(body):
            set_id, length = struct.unpack_from("!HH", body, pos)
            if set_id >= 256:       # a data set, not a template set
                size = t.get(set_id).data_length
                for r in range(pos + 4, pos + length, size):
                    held.append(want[body[r:r + size]])
            pos += length
        assert m.flows == len(held) == m.records
        assert m.packets == sum(p for p, _ in held)
        assert m.octets == sum(o for _, o in held)


def test_record_block_too_long_for_any_message():
    w = message.MessageWriter(512)
    block = message.RecordBlock(bytes(600), 600, [1], [1])
    with pytest.raises(ValueError):
        w.data_messages(1, 1.0, [(TCP4, t.get(TCP4).record, block)])
