"""Error paths of the aggregation, C and pure Python alike: a failing
allocation (a MemoryError from the flow order's append, or from growing
the arrays) or a Python exception raised inside the C loop (from the
key-pieces callback) propagates, and leaves the cache consistent: index
and order hold the same keys once, every slot is used once or free, the
aggregates of the flows it holds are whole, and the cache keeps working
(more samples, a flush).  After the same failure, the C and the Python
paths leave the same cache."""

from collections import deque

import pytest
import traffic as tr
from support.inputs import bridge_options

from ovs_ipfix_py import fastpath
from ovs_ipfix_py.exporter import Exporter
from ovs_ipfix_py.options import UINT32_MAX, CacheOptions
from ovs_ipfix_py.upcall import BridgeSample

needs_c = pytest.mark.skipif(fastpath.C is None,
                             reason="C fast path not built")


def path(c):
    """The C path when ``c``, else the pure-Python one."""
    return fastpath.pure_python(not c)


class FailingOrder(deque):
    """A flow order whose ``fail_at``-th append raises MemoryError."""

    def __init__(self, items, fail_at):
        super().__init__(items)
        self.calls = 0
        self.fail_at = fail_at

    def append(self, key):
        self.calls += 1
        if self.calls == self.fail_at:
            raise MemoryError("injected")
        super().append(key)


def batch(n_flows=300, n_samples=900, seed=3):
    return [BridgeSample("br0", 1 + i % 2, None if i % 3 else 4,
                         UINT32_MAX, f, len(f))
            for i, f in enumerate(tr.many_flows(n_flows, n_samples, seed))]


def check_consistent(cache):
    keys = list(cache.order)
    assert len(keys) == len(set(keys)) == len(cache.index)
    assert set(keys) == set(cache.index)
    slots = list(cache.index.values())
    free = list(cache._free)
    assert len(set(slots)) == len(slots)
    assert not set(slots) & set(free)
    assert sorted(slots + free) == list(range(cache._next_slot))
    assert cache._next_slot <= cache._capacity
    for s in slots:
        assert cache.counters[4 * s] >= 1
        assert cache.times[2 * s] <= cache.times[2 * s + 1]


def state(cache):
    used = cache._next_slot
    return (dict(cache.index), list(cache.order),
            cache.times[:2 * used].tolist(),
            cache.counters[:4 * used].tolist(),
            cache.small[:3 * used].tolist(), sorted(cache._free))


def still_works(exp, samples):
    exp.sample_bridge_batch(samples, 5.0)
    check_consistent(exp.cache)
    n = len(exp.cache)
    exp.cache.flush(6.0)
    flows = exp.cache.take_expired()
    assert len(flows) == n and all(f.packets >= 1 for f in flows)
    check_consistent(exp.cache)


@pytest.mark.parametrize("c", [pytest.param(True, marks=needs_c), False])
@pytest.mark.parametrize("fail_at", [1, 2, 17, 150])
def test_failing_order_append_leaves_cache_consistent(c, fail_at):
    samples = batch()
    exp = Exporter(bridge_options(), 0.0)
    try:
        exp.cache.order = FailingOrder(exp.cache.order, fail_at)
        with path(c):
            with pytest.raises(MemoryError):
                exp.sample_bridge_batch(samples, 1.0)
            check_consistent(exp.cache)
            assert len(exp.cache) == fail_at - 1
            still_works(exp, samples)
    finally:
        exp.close(10.0)


@needs_c
@pytest.mark.parametrize("fail_at", [1, 9, 150])
def test_c_and_python_agree_after_a_failure(fail_at):
    samples = batch()
    states = []
    for c in (True, False):
        exp = Exporter(bridge_options(), 0.0)
        try:
            exp.cache.order = FailingOrder(exp.cache.order, fail_at)
            with path(c):
                with pytest.raises(MemoryError):
                    exp.sample_bridge_batch(samples, 1.0)
            states.append(state(exp.cache))
        finally:
            exp.close(10.0)
    assert states[0] == states[1]


@pytest.mark.parametrize("c", [pytest.param(True, marks=needs_c), False])
def test_failing_growth_leaves_cache_consistent(c):
    """The arrays cannot grow (mmap fails): the flow that needed the
    room is not inserted, the others are whole."""
    samples = batch(n_flows=3000, n_samples=3000)
    exp = Exporter(bridge_options(cache=CacheOptions(3600, 10000)), 0.0)
    try:
        cache = exp.cache
        capacity = cache._capacity

        def no_memory(extra):
            raise MemoryError("injected: mmap")

        cache._grow = no_memory
        with path(c):
            with pytest.raises(MemoryError):
                exp.sample_bridge_batch(samples, 1.0)
            check_consistent(cache)
            assert len(cache) == capacity
            del cache._grow
            still_works(exp, samples)
    finally:
        exp.close(10.0)


@needs_c
def test_exception_from_the_callback_inside_the_c_loop():
    """_iface_part (Python, called from C when the port pair changes)
    starts raising: the C loop hands that sample to the general path,
    whose own call raises, so the exception comes out of the batch;
    references and the cache are intact, and the next call works."""
    samples = batch()
    exp = Exporter(bridge_options(), 0.0)
    try:
        real = exp._iface_part
        calls = []

        def failing(in_port, out_port, direction):
            calls.append((in_port, out_port))
            if len(calls) >= 3:
                raise RuntimeError("injected")
            return real(in_port, out_port, direction)

        # The C loop takes its callbacks from the parameters the options
        # derive: rebuild them around the failing one.
        exp._iface_part = failing
        exp._derive_params()
        with pytest.raises(RuntimeError):
            exp.sample_bridge_batch(samples, 1.0)
        assert len(calls) > 3     # the C loop's call, then the general path's
        check_consistent(exp.cache)
        del exp._iface_part
        exp._derive_params()
        still_works(exp, samples)
    finally:
        exp.close(10.0)
