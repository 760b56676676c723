"""Target marginals: turn the observed counts of one categorical marginal into a target distribution.

One function per kind computes the unnormalised target r (K,) from the counts (K,) and the kind's
parameter; :func:`target_marginal` dispatches on the kind (as POT's ``sinkhorn(method=...)`` does),
checks the counts and normalises r. A new kind is a function here, its entry in :data:`TARGETS`, and its
parameter's parsing in :class:`rebalance.spec.Target`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

__all__ = ["TARGETS", "TargetLike", "UnknownValuesError", "target_marginal"]


class TargetLike(Protocol):
    """A parsed target (:class:`rebalance.spec.Target`): its kind and the keyword parameters of its kind."""

    kind: str

    @property
    def params(self) -> Mapping[str, Any]: ...


class UnknownValuesError(ValueError):
    """A ``weights`` target is positive on values the marginal does not have (missing mass)."""

    def __init__(self, values: list[str]):
        self.values = values
        super().__init__(f"positive target weight on values with no rows: {values[:20]}")


def uniform_target(counts: np.ndarray, values: Sequence[str] | None = None) -> np.ndarray:
    """1 on every value with count > 0, 0 elsewhere."""
    return (counts > 0).astype(np.float64)


def power_target(
    counts: np.ndarray, values: Sequence[str] | None = None, *, power: float | None = None
) -> np.ndarray:
    """count^power on the observed values (power 0 is uniform, 1 keeps the data's marginal)."""
    if power is None or power < 0:
        raise ValueError(f"power target needs power >= 0, got {power!r}")
    observed = counts > 0
    return np.where(observed, np.power(counts, power, where=observed, out=np.zeros_like(counts)), 0.0)


def cap_target(
    counts: np.ndarray, values: Sequence[str] | None = None, *, cap: float | None = None
) -> np.ndarray:
    """min(count, cap): MetaCLIP-style head capping."""
    if cap is None or cap <= 0:
        raise ValueError(f"cap target needs cap > 0, got {cap!r}")
    return np.minimum(counts, cap)


def weights_target(
    counts: np.ndarray, values: Sequence[str] | None = None, *, weights: Mapping[str, float] | None = None
) -> np.ndarray:
    """``weights[values[c]]``, 0 for values absent from the mapping. Raises :class:`UnknownValuesError` when
    the mapping puts positive weight on a value that is not among ``values`` (no scaling can meet it)."""
    if weights is None or values is None or len(values) != counts.size:
        raise ValueError("weights target needs a weights mapping and one value name per count")
    names = [str(v) for v in values]
    raw = np.array([float(weights.get(v, 0.0)) for v in names])
    if raw.sum() <= 0:
        raise ValueError(f"no value named in the weights mapping occurs in this marginal: {sorted(weights)}")
    unknown = sorted(set(weights) - set(names))
    if any(weights[x] > 0 for x in unknown):
        raise UnknownValuesError(unknown)
    return raw


def keep_probability_target(counts: np.ndarray, values: Sequence[str] | None = None) -> np.ndarray:
    """count * p, where each value names a keep probability p (MetaCLIP's ``concept`` marginal, whose
    labels are the rows' keep probabilities): balanced on this marginal alone, a row of probability p
    gets weight p / mean(p)."""
    if values is None or len(values) != counts.size:
        raise ValueError("keep_probability target needs one value (a probability) per count")
    p = np.array([float(v) for v in values])
    if ((p < 0) | (p > 1)).any():
        raise ValueError(f"keep_probability values must lie in [0, 1], got {p.min()} .. {p.max()}")
    if (counts * p).sum() <= 0:
        raise ValueError("every row has keep probability 0")
    return counts * p


TARGETS: dict[str, Callable[..., np.ndarray]] = {
    "uniform": uniform_target,
    "power": power_target,
    "cap": cap_target,
    "weights": weights_target,
    "keep_probability": keep_probability_target,
}
"""Each target kind's function: (counts (K,) float64, values (K,) names or None, **parameter) -> (K,) >= 0."""


def target_marginal(
    counts: np.ndarray,
    target: str | TargetLike = "uniform",
    *,
    values: Sequence[str] | None = None,
    **params: Any,
) -> np.ndarray:
    """Target distribution t (shape (K,), sums to 1) for one marginal with observed ``counts`` (shape (K,)).

    target: a parsed target (its ``kind`` and ``params``), or a kind's name with its parameter as a
    keyword (``"power", power=0.5``). values: the name of each counted value (the ``weights`` kind needs
    them). The kinds (:data:`TARGETS`): ``uniform`` (1/K' on the K' observed values), ``power``
    (count^power), ``cap`` (min(count, cap)), ``weights`` (given per value name; a positive weight on a
    value with no rows raises :class:`UnknownValuesError`), ``keep_probability`` (count * the probability
    each value names; the ``concept`` marginal's, not a user setting).
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0 or (counts < 0).any() or counts.sum() <= 0:
        raise ValueError("counts must be a non-empty 1-d array of non-negative numbers with a positive sum")
    kind = target if isinstance(target, str) else target.kind
    if not isinstance(target, str):
        params = {**target.params, **params}
    compute = TARGETS.get(kind)
    if compute is None:
        raise ValueError(f"unknown target kind {kind!r}; expected one of {', '.join(TARGETS)}")
    raw = compute(counts, values, **params)
    return raw / raw.sum()
