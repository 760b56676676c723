"""A pool of Ray actors that maps a method over work items, in order, with progress and retries.

Work items must be idempotent (they write their outputs atomically under names derived from the item),
because a restarted actor redoes the item it was running. Only crashes are retried (a dead actor process, a
lost node): an exception raised by the actor's constructor or by a work item is deterministic, so it is
raised once, from :meth:`ActorPool.map`, as the original exception wrapped by Ray (``err.cause``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ray
from ray.exceptions import ActorDiedError, RayActorError
from tqdm.auto import tqdm

__all__ = ["ActorPool", "PlacementError", "ShardWorker"]

log = logging.getLogger(__name__)

MAX_RESTARTS = 3
DEFAULT_PLACEMENT_TIMEOUT_S = 1200.0


class PlacementError(RuntimeError):
    """No actor of a pool could be placed by Ray within the placement timeout."""


class ActorPool:
    """``n`` actors of ``actor_cls``, each constructed with ``init_args``, each holding ``num_cpus`` CPUs
    and ``num_gpus`` GPUs. Actors are restarted after a crash and the lost item is resubmitted; exceptions
    (of the constructor too) are not retried.

    Items go only to actors Ray has placed and started, so the pool works at the size Ray can place: actors
    still pending (waiting for a node the autoscaler is adding, or for one that never comes) join when they
    start and are never waited for. When none has started after ``placement_timeout_s`` seconds,
    :meth:`map` raises :class:`PlacementError` naming what was asked for. Actors that ask for no GPU, on a
    cluster with GPUs, run with ``CUDA_VISIBLE_DEVICES=""`` (Ray no longer hides their node's GPUs from them;
    nodes that join later are covered by ``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1`` in cluster.yaml).
    """

    def __init__(
        self,
        actor_cls: type,
        n: int,
        *,
        init_args: Sequence[Any] = (),
        num_cpus: float = 1,
        num_gpus: float = 0,
        placement_timeout_s: float = DEFAULT_PLACEMENT_TIMEOUT_S,
    ):
        if n < 1:
            raise ValueError(f"an actor pool needs at least one actor, got {n}")
        options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus or None}
        if not num_gpus and ray.cluster_resources().get("GPU", 0) > 0:
            # only where there are GPUs to hide: a runtime_env costs each actor a fresh worker process
            options["runtime_env"] = {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}}
        # named after the hosted class, so process titles and Ray's state API say ray::EmbedWorker, not _Host
        host = type(actor_cls.__name__, (_Host,), {"__qualname__": actor_cls.__qualname__})
        remote_cls = ray.remote(host).options(
            **options, max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS
        )
        self.actors = [remote_cls.remote(actor_cls, *init_args) for _ in range(n)]
        self.asked = f"{n} {actor_cls.__name__} actor(s) of {num_cpus:g} CPU(s) and {num_gpus:g} GPU(s) each"
        self.placement_timeout_s = placement_timeout_s
        self._starting = {actor.__ray_ready__.remote(): actor for actor in self.actors}
        self._ready: list[Any] = []
        self._created = time.monotonic()

    def _started(self, refs: list[ray.ObjectRef]) -> None:
        """Move the actors whose readiness refs are in ``refs`` to the ready list (raises if one failed)."""
        for ref in refs:
            actor = self._starting.pop(ref)
            ray.get(ref)  # a constructor error does not fail the actor: its first call raises it
            self._ready.append(actor)

    def _wait_for_first(self) -> None:
        """Block until at least one actor has started; PlacementError after the placement timeout."""
        if self._ready:
            return
        left = self.placement_timeout_s - (time.monotonic() - self._created)
        done, _ = ray.wait(list(self._starting), num_returns=1, timeout=max(0.0, left))
        if not done:
            raise PlacementError(
                f"Ray placed none of {self.asked} within {self.placement_timeout_s:g} s "
                f"(ray.placement_timeout_s); cluster resources now: {ray.cluster_resources()}. The cluster "
                "has no node that fits one actor and the autoscaler added none: check the node types "
                "(docs/cluster.md), embed.device / embed.cpus_per_gpu, or raise the timeout"
            )
        self._started(done)

    def map(self, method: str, items: Sequence[tuple], desc: str = "", unit: str = "shard") -> list[Any]:
        """Call ``actor.method(*item)`` for every item, one item per idle started actor; results in item
        order."""
        return list(self.imap(method, items, desc, unit, window=max(1, len(items))))

    def imap(
        self,
        method: str,
        items: Sequence[tuple],
        desc: str = "",
        unit: str = "shard",
        window: int | None = None,
    ) -> Iterator[Any]:
        """:meth:`map`, the results yielded in item order as they come, so that the caller can fold them
        instead of holding them all: items are submitted at most ``window`` (default two per actor) ahead of
        the next one to yield, so at most that many results wait in this process.

        An item whose actor was lost while running it (its process or node died: ``RayActorError``, after
        Ray's own task retries) is submitted again, up to MAX_RESTARTS times, to the next idle actor; its
        actor takes items again once it answers after its restart, and leaves the pool when Ray reports it
        dead for good."""
        window = window or 2 * len(self.actors)
        finished: dict[int, Any] = {}
        running: dict[ray.ObjectRef, tuple[int, Any]] = {}
        again: list[int] = []  # items to submit again, lost with their actor
        restarting: dict[ray.ObjectRef, Any] = {}  # actors that lost an item, until they answer again
        lost = [0] * len(items)
        submitted = yielded = 0
        if items:
            self._wait_for_first()
        idle = list(self._ready)
        with tqdm(total=len(items), desc=desc, unit=unit, disable=not desc, leave=False) as bar:
            while yielded < len(items):
                if yielded in finished:
                    yield finished.pop(yielded)
                    yielded += 1
                    continue
                while idle and (again or submitted < min(len(items), yielded + window)):
                    actor = idle.pop()
                    i = again.pop() if again else submitted
                    submitted += i == submitted
                    running[actor.call.remote(method, *items[i])] = (i, actor)
                if not running and not self._starting and not restarting:
                    raise RuntimeError(f"every actor of the pool ({self.asked}) died for good")
                done, _ = ray.wait([*running, *self._starting, *restarting], num_returns=1)
                if done[0] in self._starting:
                    self._started(done)
                    idle.append(self._ready[-1])
                    continue
                if done[0] in restarting:  # back after a restart, or dead for good
                    actor = restarting.pop(done[0])
                    try:
                        ray.get(done[0])
                        idle.append(actor)
                    except ActorDiedError:
                        log.warning("%s: an actor of the pool died for good", desc)
                    except RayActorError:  # still unavailable: ask again
                        restarting[actor.__ray_ready__.remote()] = actor
                    continue
                i, actor = running.pop(done[0])
                try:
                    finished[i] = ray.get(done[0])
                except RayActorError as err:
                    lost[i] += 1
                    if lost[i] > MAX_RESTARTS:
                        raise
                    log.warning("%s item %d lost with its actor (%s): submitting it again", desc, i, err)
                    again.append(i)
                    if not isinstance(err, ActorDiedError):  # restarting: it takes items again once back
                        restarting[actor.__ray_ready__.remote()] = actor
                    continue
                idle.append(actor)
                bar.update(1)

    def shutdown(self) -> None:
        """Kill the pool's actors."""
        for actor in self.actors:
            ray.kill(actor)

    def __enter__(self) -> ActorPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


class _Host:
    """The actor: builds ``cls(*args)`` and calls its methods. A constructor that raises does not kill the
    actor (Ray would restart it and retry its tasks, for a failure that cannot change): the exception is
    kept and raised by every call."""

    def __init__(self, cls: type, *args: Any):
        self._obj: Any = None
        self._error: Exception | None = None
        try:
            self._obj = cls(*args)
        except Exception as err:
            self._error = err

    @ray.method(retry_exceptions=False)  # Ray's default, stated: max_task_retries covers crashes only
    def call(self, method: str, *args: Any) -> Any:
        if self._error is not None:
            raise self._error
        return getattr(self._obj, method)(*args)


class ShardWorker:
    """A stateless actor that runs plain functions on shards (the cluster, balance and report stages)."""

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)
