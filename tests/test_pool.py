"""ActorPool.imap: results in item order, at most ``window`` items submitted ahead of the consumer."""

from pathlib import Path

import pytest

from rebalance.runtime.pool import ActorPool, ShardWorker


@pytest.mark.ray
def test_imap_yields_in_order_with_a_bounded_look_ahead(tmp_path, ray_local):
    def mark_and_square(directory: str, i: int) -> int:  # local: pickled by value for the actors
        (Path(directory) / f"started-{i}").touch()
        return i * i

    items = [(mark_and_square, str(tmp_path), i) for i in range(12)]
    window = 3
    with ActorPool(ShardWorker, 2) as pool:
        got = []
        for i, result in enumerate(pool.imap("call", items, window=window)):
            started = len(list(tmp_path.glob("started-*")))
            # result i is yielded before item i + window is submitted
            assert started <= i + window, (i, started)
            got.append(result)
        assert got == [i * i for i in range(12)]
        assert pool.map("call", items) == got


@pytest.mark.ray
def test_resident_parts_that_cannot_load_fail_instead_of_waiting_forever(ray_local):
    import ray

    from rebalance.runtime.resident import PartsLostError, ResidentParts

    def load(i: int) -> int:  # local: pickled by value for the actors
        return i

    # an actor asking for more CPUs than the local Ray has is never placed: the load gives up after 2 s
    with pytest.raises(PartsLostError, match="not placed within 2 s while loading"):
        ResidentParts(load, [(1,), (2,)], 2, num_cpus=64, load_timeout_s=2)
    # placeable actors load and reduce as before
    with ResidentParts(load, [(1,), (2,), (3,)], 2, load_timeout_s=60) as parts:
        assert parts.reduce(lambda state: state) == 6
    assert ray.is_initialized()


@pytest.mark.ray
def test_resident_parts_load_on_the_actors_the_live_cpus_hold(ray_local):
    """Asked for more one-CPU actors than the two CPUs of the local Ray (as a run sized from a lost node's
    CPUs before Ray noticed the loss): the actors that cannot be placed are given up and every item is
    loaded, once, on those placed."""
    from rebalance.runtime.resident import ResidentParts

    def load(i: int) -> list[int]:  # local: pickled by value for the actors
        return [i]

    with ResidentParts(load, [(i,) for i in range(7)], 3, load_timeout_s=60) as parts:
        assert len(parts.actors) == 2
        assert sorted(parts.reduce(lambda state: state, combine=lambda a, b: a + b)) == list(range(7))
