"""Exports in slices: a flush, an expiry burst, an option change and a
removed exporter are sent a slice at a time over several ``run`` calls,
in order, nothing lost, flowEndReason unchanged (exporter.py's module
docstring).  ``EXPORT_BUDGET`` 0 makes each call send exactly one slice,
so the tests count slices instead of timing them.  Real sockets on
loopback; records read back with tests/support/decoders.py.
"""

import pytest
import traffic as tr
from support.collector import UdpCollector
from support.decoders import parse_collector
from support.inputs import bridge_options

from ovs_ipfix_py import exporter as exporter_mod
from ovs_ipfix_py.exporter import Exporter
from ovs_ipfix_py.flowcache import ACTIVE_TIMEOUT, FORCED_END, IDLE_TIMEOUT
from ovs_ipfix_py.options import UINT32_MAX, CacheOptions
from ovs_ipfix_py.reconcile import Reconciler
from ovs_ipfix_py.upcall import BridgeSample

SLICE = 500
N = 2200


@pytest.fixture
def one_slice_per_run(monkeypatch):
    monkeypatch.setattr(exporter_mod, "EXPORT_BUDGET", 0.0)
    monkeypatch.setattr(exporter_mod, "EXPORT_SLICE", SLICE)


def samples(n, seed=1):
    """Bridge samples of ``n`` distinct flows."""
    return [BridgeSample("br0", 1, None, UINT32_MAX, f, len(f))
            for f in tr.many_flows(n, n, seed)]


def other(n):
    """Bridge samples of ``n`` flows that samples() never gives."""
    frames = [tr.build_frame(sport=1, dport=i + 1) for i in range(n)]
    return [BridgeSample("br0", 1, None, UINT32_MAX, f, len(f))
            for f in frames]


def cached_keys(exp):
    """The cache's flows in start order, as (template id, addresses and
    ports): an IPv4 TCP/UDP key ends with source and destination
    address, source and destination port."""
    return [(int.from_bytes(k[4:6], "big"), k[-12:])
            for k in exp.cache.index]


def in_order(keys):
    """Per template, the keys in order: records of one template keep
    their order (a slice is grouped by template before it is packed)."""
    out = {}
    for tid, key in keys:
        out.setdefault(tid, []).append(key)
    return out


def record_keys(collector, sent):
    """((template id, addresses and ports), flowEndReason) of every data
    record received, in order, once ``sent`` messages arrived."""
    assert collector.wait_for(lambda d: len(d) >= sent, 10.0)
    session = parse_collector(collector)
    assert session.problems == []
    out = []
    for r in session.records:
        v = r.values
        out.append(((r.template_id, v[8] + v[12] + v[7] + v[11]),
                    r.uint(136)))
    return out


def run_until_idle(exp, now, limit=100):
    """run() until nothing waits; the records each call sent."""
    per_run = []
    while not exp.idle():
        before = exp.stats.records
        exp.run(now)
        per_run.append(exp.stats.records - before)
        assert len(per_run) < limit
    return per_run


def test_sliced_flush_in_order_a_slice_per_run(one_slice_per_run):
    with UdpCollector() as c:
        exp = Exporter(bridge_options([c.target]), 0.0)
        try:
            batch = samples(N)
            exp.sample_bridge_batch(batch, 1.0)
            keys = cached_keys(exp)
            assert exp.flush(2.0, sliced=True) == N
            # Nothing sent yet; the loop is told to come back at once.
            assert exp.stats.records == 0 and exp.backlog() == N
            assert exp.next_deadline() == float("-inf")
            assert len(exp.cache) == exp.stats.current_flows == 0
            # Samples during the flush go to a new cache: one of a
            # flushed flow starts a new flow.
            exp.sample_bridge_batch(batch[:3], 2.5)
            assert len(exp.cache) == 3 and exp.stats.flows == N + 3
            new_keys = cached_keys(exp)
            assert set(new_keys) <= set(keys)
            assert run_until_idle(exp, 3.0) == [SLICE] * (N // SLICE) + [
                N % SLICE]
            assert exp.backlog() == 0 and len(exp.cache) == 3
            exp.flush(4.0)
            got = record_keys(c, exp.stats.tx_pkts)
        finally:
            exp.close(5.0)
    assert in_order(k for k, _ in got[:N]) == in_order(keys)
    assert in_order(k for k, _ in got[N:]) == in_order(new_keys)
    assert {r for _, r in got} == {FORCED_END}


def test_expiry_burst_sliced_reason_kept(one_slice_per_run):
    """N flows reach their active timeout together: each run() takes
    and sends one slice; the rest stays due (next_deadline not after
    now) and leaves as active timeout too."""
    with UdpCollector() as c:
        exp = Exporter(bridge_options(
            [c.target], cache=CacheOptions(10, 1 << 20)), 0.0)
        try:
            exp.sample_bridge_batch(samples(N), 1.0)
            keys = cached_keys(exp)
            assert exp.next_deadline() == 11.0
            exp.run(11.0)
            assert exp.stats.records == SLICE
            assert len(exp.cache) == N - SLICE
            assert exp.next_deadline() <= 11.0
            per_run = []
            while len(exp.cache):
                before = exp.stats.records
                exp.run(11.0)
                per_run.append(exp.stats.records - before)
                assert len(per_run) < 100
            assert per_run == [SLICE] * (N // SLICE - 1) + [N % SLICE]
            assert exp.idle() and exp.stats.records == N
            got = record_keys(c, exp.stats.tx_pkts)
        finally:
            exp.close(12.0)
    assert in_order(k for k, _ in got) == in_order(keys)
    assert {r for _, r in got} == {ACTIVE_TIMEOUT}


def test_insert_expires_a_bounded_number(monkeypatch):
    """A new flow that finds a burst of due flows in a full cache takes
    out INSERT_EXPIRE_LIMIT of them, not all: the rest wait for run()."""
    from ovs_ipfix_py import flowcache
    monkeypatch.setattr(flowcache, "INSERT_EXPIRE_LIMIT", 100)
    exp = Exporter(bridge_options(cache=CacheOptions(10, N)), 0.0)
    try:
        exp.sample_bridge_batch(samples(N), 1.0)
        exp.sample_bridge_batch(other(1), 20.0)
        assert len(exp.cache.expired) == 100
        assert {f.reason for f in exp.cache.expired} == {ACTIVE_TIMEOUT}
        assert len(exp.cache) == N + 1 - 100
    finally:
        exp.close(30.0)


def test_reconfigure_sliced_old_flows_to_old_collector(one_slice_per_run):
    """New targets: the flushed flows still go to the old collector,
    after them its final statistics, then its socket closes; the new
    collector gets the flows that follow."""
    with UdpCollector() as old, UdpCollector() as new:
        opts = bridge_options([old.target])
        exp = Exporter(opts, 0.0)
        try:
            exp.sample_bridge_batch(samples(N), 1.0)
            keys = cached_keys(exp)
            old_set = exp.collectors
            exp.reconfigure(bridge_options([new.target]), 2.0, sliced=True)
            assert exp.backlog() == N and len(old_set) == 1
            exp.sample_bridge_batch(other(2), 2.5)
            run_until_idle(exp, 3.0)
            assert len(old_set) == 0          # closed after its last
            exp.flush(4.0)
            got_old = record_keys(old, 1)
            got_new = record_keys(new, 1)
        finally:
            exp.close(5.0)
    assert in_order(k for k, _ in got_old) == in_order(keys)
    assert len(got_new) == 2
    session = parse_collector(old)
    # The exporting process statistics came last, after every record.
    assert session.messages[-1].options_records
    assert not any(m.data_records for m in session.messages[-1:])


def test_removed_exporter_retires_in_slices(one_slice_per_run):
    with UdpCollector() as c:
        opts = bridge_options([c.target])
        rec = Reconciler(sliced=True)
        rec.apply({opts.key: opts}, 0.0)
        exp = rec.exporters[opts.key]
        exp.sample_bridge_batch(samples(N), 1.0)
        keys = cached_keys(exp)
        rec.apply({}, 2.0)
        assert rec.exporters == {} and rec.retiring == [exp]
        assert exp.stats.records == 0
        runs = 0
        while rec.retiring:
            rec.run_retiring(3.0)
            runs += 1
            assert runs < 100
        assert runs == -(-N // SLICE)
        assert len(exp.collectors) == 0       # closed
        got = record_keys(c, exp.stats.tx_pkts)
    assert in_order(k for k, _ in got) == in_order(keys)


def test_close_at_exit_sends_everything_at_once(one_slice_per_run):
    with UdpCollector() as c:
        opts = bridge_options([c.target])
        rec = Reconciler(sliced=True)
        rec.apply({opts.key: opts}, 0.0)
        exp = rec.exporters[opts.key]
        exp.sample_bridge_batch(samples(N), 1.0)
        exp.flush(2.0, sliced=True)
        exp.sample_bridge_batch(other(5), 2.0)
        rec.close(3.0)
        assert rec.retiring == [] and exp.idle()
        assert exp.stats.records == N + 5
        got = record_keys(c, exp.stats.tx_pkts)
    assert len(got) == N + 5


def test_idle_burst_sliced_reason_kept(one_slice_per_run):
    """N flows go idle together (one bucket of the idle wheel): each
    run() takes one slice of the bucket, the rest of it stays due, all
    leave as idle timeout, in order."""
    with UdpCollector() as c:
        exp = Exporter(bridge_options(
            [c.target], cache=CacheOptions(3600, 1 << 20, idle_timeout=5)),
            0.0)
        try:
            exp.sample_bridge_batch(samples(N), 1.0)
            keys = cached_keys(exp)
            per_run = []
            while len(exp.cache):
                before = exp.stats.records
                exp.run(6.5)
                per_run.append(exp.stats.records - before)
                assert len(per_run) < 100
            assert per_run == [SLICE] * (N // SLICE) + [N % SLICE]
            got = record_keys(c, exp.stats.tx_pkts)
        finally:
            exp.close(12.0)
    assert in_order(k for k, _ in got) == in_order(keys)
    assert {r for _, r in got} == {IDLE_TIMEOUT}
