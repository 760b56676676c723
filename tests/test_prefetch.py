"""The background producer that overlaps batch preparation with model compute in the embed actors."""

import threading

import pytest

from rebalance.runtime.prefetch import prefetch


def test_results_in_order_and_computed_off_the_consumer_thread():
    consumer = threading.get_ident()
    seen = []

    def square(x):
        seen.append(threading.get_ident())
        return x * x

    assert list(prefetch(range(50), square, depth=3)) == [x * x for x in range(50)]
    assert seen and all(t != consumer for t in seen)


def test_producer_runs_ahead_while_the_consumer_works():
    produced = []
    ready = threading.Event()

    def work(x):
        produced.append(x)
        if len(produced) == 3:
            ready.set()
        return x

    it = prefetch(range(10), work, depth=2)
    assert next(it) == 0
    # While the consumer holds item 0, the producer prepares items 1 and 2 (depth 2) without being asked.
    assert ready.wait(timeout=10)
    assert produced[:3] == [0, 1, 2]
    assert list(it) == list(range(1, 10))


def test_error_is_raised_at_its_position():
    def fail_on_3(x):
        if x == 3:
            raise ValueError("bad item 3")
        return x

    got = []
    with pytest.raises(ValueError, match="bad item 3"):
        for x in prefetch(range(10), fail_on_3):
            got.append(x)
    assert got == [0, 1, 2]


def test_error_in_the_source_iterator_propagates():
    def source():
        yield 1
        raise OSError("shard unreadable")

    with pytest.raises(OSError, match="shard unreadable"):
        list(prefetch(source(), lambda x: x))


def test_closing_early_stops_the_producer():
    calls = []
    it = prefetch(range(10_000), lambda x: calls.append(x) or x, depth=2)
    assert next(it) == 0
    it.close()
    n = len(calls)
    assert n <= 4  # the item in hand, the queue (2) and at most one in flight
    assert not any(t.name == "prefetch" and t.is_alive() for t in threading.enumerate())


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth"):
        list(prefetch([1], lambda x: x, depth=0))
