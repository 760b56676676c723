"""Latent-space exploration: collect an equal number of latents per class from a biased generator.

As in the authors' code of Jain et al. (2023), given ``classify(z) -> labels`` (the generator followed by
the attribute classifier, a label of -1 meaning "no confident class"):

1. *Seeds.* Draw latents ``z ~ N(0, I)`` in batches and keep each one under the class it lands in, up to
   ``per_class`` per class, until every requested class has a seed (or is full), or ``seed_fraction`` of
   the budget is spent. Common classes are usually filled here.
2. *Breadth-first search* for each class still short, rarest first in class order: a FIFO queue holds the
   class's latents, each the root of its own branch. The node at the front is mutated
   (``z' = z + sigma_n * eps``, ``eps ~ N(0, I)``, ``children`` at a time); a child that the classifier
   still assigns to the class is kept, and queued for expansion only when it lies farther from its root
   than its parent (the search grows outward). A node leaves the queue after ``children`` kept children or
   ``max_failures`` rejected ones (a dead branch). The class stops at ``per_class`` latents, an empty queue
   or its share of the remaining budget (the remainder split evenly over the classes still to search, so
   one hard class cannot starve the others).

   *Adaptive step* (``sigma_min < sigma``): every node starts with ``sigma_n = sigma``; after
   ``max_failures`` rejected children at its current step a node does not die but halves its step,
   ``sigma_n <- max(sigma_n / 2, sigma_min)``, and its failure count restarts; it dies only after
   ``max_failures`` rejections at ``sigma_min``. Kept children inherit their parent's step. A class whose
   region of the latent space is smaller than a ``sigma`` step (every mutation leaves it) is still
   explored, with steps that fit it, as a local search with step-size control would; with
   ``sigma_min = sigma`` (the default) this is the fixed step of the authors' code.

Every latent returned was assigned its class by ``classify``. The budget counts generator calls, i.e.
latents generated and classified; it is never exceeded. Classes left with fewer than ``per_class``
latents are listed in :attr:`ExplorationResult.unreachable` with the reason.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import islice

import numpy as np

__all__ = ["ExplorationResult", "explore"]

Classify = Callable[[np.ndarray], np.ndarray]


@dataclass(eq=False)  # nodes compare by identity (queue.remove)
class _Node:
    z: np.ndarray
    root: np.ndarray
    dist: float
    sigma: float
    kept: int = 0
    failures: int = 0


@dataclass
class ExplorationResult:
    """``latents[c]``: ``(m_c, nz)`` float32 latents assigned class ``c`` (``m_c <= per_class``);
    ``calls``: generator calls spent (``seed_calls`` of them on random seeds); ``class_calls[c]``: calls
    spent searching for class ``c``; ``unreachable``: ``{c: reason}`` for each requested class with fewer
    than ``per_class`` latents."""

    latents: dict[int, np.ndarray]
    per_class: int
    budget: int
    calls: int
    seed_calls: int
    class_calls: dict[int, int] = field(default_factory=dict)
    unreachable: dict[int, str] = field(default_factory=dict)

    @property
    def counts(self) -> dict[int, int]:
        return {c: int(len(z)) for c, z in self.latents.items()}

    def stacked(self) -> tuple[np.ndarray, np.ndarray]:
        """All latents ``(N, nz)`` float32 and their classes ``(N,)`` int64, classes in ascending order."""
        classes = sorted(self.latents)
        nz = next((z.shape[1] for z in self.latents.values() if z.ndim == 2), 0)
        zs = [self.latents[c] for c in classes if len(self.latents[c])]
        if not zs:
            return np.zeros((0, nz), np.float32), np.zeros(0, np.int64)
        labels = np.concatenate([np.full(len(self.latents[c]), c, np.int64) for c in classes])
        return np.concatenate(zs).astype(np.float32), labels

    def summary(self) -> dict:
        """JSON-ready counts, calls and unreachable classes (keys as strings)."""
        return {
            "per_class": self.per_class,
            "budget": self.budget,
            "calls": self.calls,
            "seed_calls": self.seed_calls,
            "counts": {str(c): n for c, n in sorted(self.counts.items())},
            "class_calls": {str(c): n for c, n in sorted(self.class_calls.items())},
            "unreachable": {str(c): r for c, r in sorted(self.unreachable.items())},
        }


def _check_labels(labels: np.ndarray, n: int) -> np.ndarray:
    labels = np.asarray(labels).astype(np.int64).ravel()
    if labels.shape != (n,):
        raise ValueError(f"classify returned {labels.shape[0]} labels for {n} latents")
    return labels


def explore(
    classify: Classify,
    nz: int,
    num_classes: int,
    per_class: int,
    budget: int,
    *,
    classes: Sequence[int] | None = None,
    sigma: float = 0.5,
    sigma_min: float | None = None,
    children: int = 4,
    max_failures: int = 20,
    batch_size: int = 256,
    seed_fraction: float = 0.5,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> ExplorationResult:
    """Collect up to ``per_class`` latents ``(nz,)`` of each of ``classes`` (default all ``num_classes``)
    with at most ``budget`` calls of ``classify`` on single latents (see the module docstring).

    ``classify(z)`` takes ``(n, nz)`` float32 with ``n <= batch_size`` and returns ``(n,)`` integer labels
    (-1 for none). ``sigma_min`` (default ``sigma``: a fixed step) is the floor of the adaptive step.
    ``progress`` receives one line per seed batch and per searched class."""
    if budget < 1:
        raise ValueError(f"budget must be >= 1 generator call, got {budget}")
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    if nz < 1 or num_classes < 1:
        raise ValueError(f"nz and num_classes must be >= 1, got nz={nz}, num_classes={num_classes}")
    if sigma <= 0 or children < 1 or max_failures < 1 or batch_size < 1:
        raise ValueError("sigma must be > 0 and children, max_failures, batch_size >= 1")
    sigma_min = sigma if sigma_min is None else float(sigma_min)
    if not 0 < sigma_min <= sigma:
        raise ValueError(f"sigma_min must lie in (0, sigma={sigma}], got {sigma_min}")
    if not 0 < seed_fraction <= 1:
        raise ValueError(f"seed_fraction must lie in (0, 1], got {seed_fraction}")
    wanted = sorted(set(range(num_classes) if classes is None else (int(c) for c in classes)))
    bad = [c for c in wanted if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"classes {bad} out of range for {num_classes} classes")
    say = progress or (lambda _msg: None)
    rng = np.random.default_rng(seed)
    found: dict[int, list[np.ndarray]] = {c: [] for c in wanted}
    calls = 0

    def short() -> list[int]:
        return [c for c in wanted if len(found[c]) < per_class]

    # 1. random seeds
    seed_budget = max(1, math.ceil(seed_fraction * budget))
    while calls < seed_budget and any(not found[c] for c in short()):
        n = min(batch_size, seed_budget - calls)
        z = rng.standard_normal((n, nz)).astype(np.float32)
        labels = _check_labels(classify(z), n)
        calls += n
        for zi, y in zip(z, labels, strict=True):
            if y in found and len(found[y]) < per_class:
                found[y].append(zi)
        seeded = sum(1 for c in wanted if found[c])
        say(f"seeds: {calls} calls, {seeded}/{len(wanted)} classes seeded, {len(short())} still short")
    seed_calls = calls
    result = ExplorationResult({}, per_class, budget, calls, seed_calls)

    # 2. breadth-first search per short class, rarest first
    todo = sorted(short(), key=lambda c: (len(found[c]), c))
    for i, c in enumerate(todo):
        share = (budget - calls) // (len(todo) - i)
        spent = 0
        queue = deque(_Node(z, z, 0.0, sigma) for z in found[c])
        smallest = sigma
        while len(found[c]) < per_class and queue and spent < share:
            room = share - spent
            fronts = list(islice(queue, max(1, min(room, batch_size) // children)))
            parents = [node for node in fronts for _ in range(children)][:room]
            z = np.stack([p.z for p in parents])
            steps = np.array([p.sigma for p in parents], dtype=np.float64)[:, None]
            z = (z + steps * rng.standard_normal(z.shape)).astype(np.float32)
            labels = _check_labels(classify(z), len(z))
            spent += len(z)
            for zi, y, parent in zip(z, labels, parents, strict=True):
                if y != c:
                    parent.failures += 1
                    continue
                parent.kept += 1
                if len(found[c]) < per_class:
                    found[c].append(zi)
                dist = float(np.linalg.norm(zi - parent.root))
                if dist > parent.dist:
                    queue.append(_Node(zi, parent.root, dist, parent.sigma))
            for node in fronts:
                if node.failures >= max_failures and node.sigma > sigma_min:
                    node.sigma = max(node.sigma / 2, sigma_min)  # a smaller step, not a dead branch
                    node.failures = 0
                    smallest = min(smallest, node.sigma)
                elif node.kept >= children or node.failures >= max_failures:
                    queue.remove(node)
        calls += spent
        result.class_calls[c] = spent
        step = f", step down to {smallest:g}" if smallest < sigma else ""
        say(f"class {c}: {len(found[c])}/{per_class} latents in {spent} calls ({calls}/{budget} used){step}")
        if len(found[c]) < per_class:
            if not found[c]:
                why = f"no seed in {seed_calls} random samples"
            elif spent >= share:
                why = f"budget share of {share} calls spent"
            else:
                why = f"every branch failed (all mutations rejected, down to step {sigma_min:g})"
            result.unreachable[c] = f"{len(found[c])}/{per_class} latents: {why}"
    result.calls = calls
    result.latents = {
        c: (np.stack(found[c]).astype(np.float32) if found[c] else np.zeros((0, nz), np.float32))
        for c in wanted
    }
    return result
