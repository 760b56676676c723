"""Actors that keep per-part state in memory while the driver iterates (IPF's row path, soft Sinkhorn).

An iterative reduction reads its rows once: each actor loads its parts (``load(*item)`` per part, items
dealt round-robin), then every driver step sends one small message (a ratio, a potential) to all actors,
each applies ``fn(state, *args)`` to its parts and combines the results, and the driver combines the
actors'. The state lives only in actor memory, so an actor lost mid-iteration cannot be redone item by
item: :class:`PartsLostError` says so, and a rerun of the stage (resume) starts the iteration again.

The items are dealt once the actors are placed, to those Ray placed: a run sized from the CPUs of a node
lost moments before (Ray counts a node until its health checks have failed: 5 checks 3 s apart by
default) asks for more actors than the cluster now holds. Those the live CPUs cannot hold, and any lost
with that node before they started, are given up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from functools import reduce
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError

from rebalance.runtime.pool import DEFAULT_PLACEMENT_TIMEOUT_S

__all__ = ["PartsLostError", "ResidentParts"]

log = logging.getLogger(__name__)

Combine = Callable[[np.ndarray, np.ndarray], np.ndarray]
PLACEMENT_POLL_S = 1.0  # how often the live CPUs are read while actors wait to be placed


class PartsLostError(RuntimeError):
    """An actor holding parts died during an iterative reduction; the stage must be rerun."""


class _PartHolder:
    """One actor's parts: ``states[i]`` is ``load(*items[i])`` for the items dealt to it."""

    def __init__(self) -> None:
        self.states: list[Any] = []

    def load(self, load: Callable[..., Any], items: Sequence[tuple]) -> int:
        self.states = [load(*item) for item in items]
        return len(self.states)

    def reduce(self, fn: Callable[..., np.ndarray], args: tuple, combine: Combine) -> np.ndarray | None:
        parts = [fn(state, *args) for state in self.states]
        return reduce(combine, parts) if parts else None


class ResidentParts:
    """``n_actors`` actors holding ``load(*item)`` for every item, for repeated reductions.

    Use as a context manager (the actors are killed on exit). ``num_cpus`` per actor. Loading waits at most
    ``load_timeout_s`` (an actor Ray cannot place, or one lost with its node before it answers, would
    otherwise be waited on forever): then :class:`PartsLostError`.
    """

    def __init__(
        self,
        load: Callable[..., Any],
        items: Sequence[tuple],
        n_actors: int,
        *,
        num_cpus: float = 1,
        load_timeout_s: float = DEFAULT_PLACEMENT_TIMEOUT_S,
    ):
        if not items:
            raise ValueError("ResidentParts needs at least one item")
        n_actors = max(1, min(n_actors, len(items)))
        self._remote_cls = ray.remote(_PartHolder).options(num_cpus=num_cpus, max_restarts=0)
        self.actors = [self._remote_cls.remote() for _ in range(n_actors)]
        deadline = time.monotonic() + load_timeout_s
        try:
            self._place(num_cpus, deadline, load_timeout_s)
            n_actors = len(self.actors)
            self._dealt = [list(range(j, len(items), n_actors)) for j in range(n_actors)]
            load_ref = ray.put(load)
            loads = [
                a.load.remote(load_ref, [items[i] for i in idx])
                for a, idx in zip(self.actors, self._dealt, strict=True)
            ]
            self._get(loads, timeout=max(0.0, deadline - time.monotonic()), limit=load_timeout_s)
        except BaseException:
            self.shutdown()
            raise

    def _place(self, num_cpus: float, deadline: float, limit: float) -> None:
        """Wait until every actor of ``self.actors`` is placed and started, dropping from ``self.actors``
        (which keeps its order) those that will not be: an actor lost with its node before it started
        (it held nothing yet) is asked for again in its place, as many times in all as actors were asked
        for (Ray may place actors on a node it has not yet found dead), then dropped; and, as the
        cluster's live CPUs are read every :data:`PLACEMENT_POLL_S`, the last waiting ones when the live
        CPUs hold fewer actors than are still asked for (never fewer than have started, nor than one);
        those are killed. :class:`PartsLostError` at ``deadline`` (its message naming ``limit`` s) or when
        none is left."""
        waiting = {a.__ray_ready__.remote(): a for a in self.actors}
        asked, started = len(self.actors), 0
        replacements = asked  # actors lost before they started are replaced, at most this many in all
        while waiting:
            left = deadline - time.monotonic()
            done, _ = ray.wait(
                list(waiting), num_returns=len(waiting), timeout=max(0.0, min(PLACEMENT_POLL_S, left))
            )
            died = []
            for ref in done:
                try:
                    ray.get(ref)
                    started += 1
                except RayActorError:
                    died.append(waiting[ref])
                del waiting[ref]
            replaced = died[:replacements]  # Ray placed them on a node it had not yet found dead: ask again
            replacements -= len(replaced)
            for actor in replaced:
                fresh = self._remote_cls.remote()
                self.actors[self.actors.index(actor)] = fresh
                waiting[fresh.__ray_ready__.remote()] = fresh
                log.warning(
                    "an actor asked for to hold parts was lost with its node before it started: asked again"
                )
            self._drop(died[len(replaced) :], asked, "lost with its node before it started")
            if not waiting:
                break
            if time.monotonic() >= deadline:
                self._get(list(waiting), timeout=0, limit=limit)  # raises PartsLostError
            fit = int(ray.cluster_resources().get("CPU", 0) // num_cpus) if num_cpus else len(self.actors)
            excess = len(self.actors) - max(fit, started, 1)
            if excess > 0:
                dropped = list(waiting.values())[-excess:]
                for actor in dropped:
                    ray.kill(actor)
                waiting = {ref: a for ref, a in waiting.items() if a not in dropped}
                self._drop(dropped, asked, f"the cluster's live CPUs hold {fit}: a node was lost or left")
        if not self.actors:
            raise PartsLostError(
                "every actor asked for to hold parts was lost before it started; rerun the run with the same "
                "--out to redo this stage"
            )

    def _drop(self, actors: list[Any], asked: int, why: str) -> None:
        """Remove ``actors`` (not started, holding nothing) from ``self.actors``, with a warning."""
        if actors:
            self.actors = [a for a in self.actors if a not in actors]
            log.warning(
                "%d of the %d actors asked for to hold parts dropped (%s): %d left",
                len(actors), asked, why, len(self.actors),
            )  # fmt: skip

    def reduce(self, fn: Callable[..., np.ndarray], *args: Any, combine: Combine = np.add) -> np.ndarray:
        """combine over all parts of ``fn(state, *args)`` (``np.add`` for sums, ``np.logaddexp`` for
        log-sums; it must be associative and commutative, as the grouping of parts is the actors')."""
        results = self._get([a.reduce.remote(fn, args, combine) for a in self.actors])
        return reduce(combine, [r for r in results if r is not None])

    @staticmethod
    def _get(
        refs: list[ray.ObjectRef], timeout: float | None = None, limit: float | None = None
    ) -> list[Any]:
        """``ray.get(refs, timeout=timeout)``; a dead actor, or the timeout (``limit`` s in all, for the
        message), is a :class:`PartsLostError`."""
        try:
            return ray.get(refs, timeout=timeout)
        except RayActorError as err:
            raise PartsLostError(
                "an actor holding parts in memory died during the iteration; rerun the run with the same "
                "--out to redo this stage"
            ) from err
        except GetTimeoutError as err:
            raise PartsLostError(
                f"an actor holding parts in memory died or was not placed within {limit or timeout:g} s "
                "while loading its parts; rerun the run with the same --out to redo this stage"
            ) from err

    def shutdown(self) -> None:
        """Kill the actors."""
        for actor in self.actors:
            ray.kill(actor)

    def __enter__(self) -> ResidentParts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
