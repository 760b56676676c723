"""From balancing weights to samples: weighted resampling and balanced subsets (pure numpy, seeded).

The weights w (one per row, mean 1 from the balance stage) define the balanced measure q_i = w_i / sum w.
- :func:`resample_indices` draws a sample from q, with replacement (systematic or multinomial) or without
  (Efraimidis-Spirakis keys: successive weighted draws).
- :func:`balanced_subset` keeps each row independently (Poisson sampling) with probability
  p_i = min(1, c w_i); with the default c = 1 / max w the kept rows, unweighted, follow q exactly in
  expectation, and the expected size sum(w) / max(w) (N / max w for mean-1 weights) is the largest that
  allows it. :func:`inclusion_probabilities` gives the p_i.
"""

from __future__ import annotations

import numpy as np

from rebalance.kernels.sampling import check_weights, draw_with_replacement

__all__ = ["balanced_subset", "inclusion_probabilities", "resample_indices"]


def resample_indices(
    weights: np.ndarray, size: int, replace: bool, seed: int, *, method: str = "systematic"
) -> np.ndarray:
    """Indices of ``size`` rows drawn from q_i = w_i / sum w; shape (size,), int64. Rows with w_i = 0 are
    never drawn. The same (weights, size, replace, seed, method) always gives the same indices.

    replace=True: ``method="systematic"`` places ``size`` evenly spaced points (one uniform offset) on the
    cumulative weights, so row i is drawn floor(size q_i) or ceil(size q_i) times (expectation size q_i,
    the least variance), returned in random order; ``"multinomial"`` draws independently.
    replace=False: Efraimidis-Spirakis: key_i = E_i / w_i with E_i ~ Exp(1) (equivalently u^(1/w) ranked
    the other way), the ``size`` smallest keys, in drawing order; this is successive sampling (each draw
    picks among the rows left with probability proportional to w), so the inclusion probability of row i
    is not size q_i once size is a sizeable fraction of the rows. ``size`` above the number of rows with
    positive weight raises ValueError.
    """
    w = check_weights(weights)
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    rng = np.random.default_rng(seed)
    if not replace:
        positive = int(np.count_nonzero(w))
        if size > positive:
            raise ValueError(
                f"cannot draw {size} rows without replacement: only {positive} of {w.size} rows have "
                "positive weight"
            )
        with np.errstate(divide="ignore"):
            keys = rng.exponential(size=w.size) / w  # inf for w = 0
        chosen = np.argpartition(keys, size - 1)[:size] if 0 < size < w.size else np.arange(size)
        return chosen[np.argsort(keys[chosen], kind="stable")].astype(np.int64)
    return draw_with_replacement(w, size, rng, method)


def inclusion_probabilities(weights: np.ndarray, size: float | None = None) -> np.ndarray:
    """Poisson-sampling inclusion probabilities p_i = min(1, c w_i), shape (n,); expected size sum p.

    size None: c = 1 / max w, so p is proportional to w (the kept rows, unweighted, follow the balanced
    measure) and the expected size is sum(w) / max(w). A larger ``size`` (at most the number of rows with
    positive weight) sets c so that sum p = size: rows with c w_i > 1 are then kept surely but
    under-represented, and the subset needs the weights w_i / p_i (up to a constant) to stay balanced.
    """
    w = check_weights(weights)
    if size is None:
        return w / w.max()
    positive = np.count_nonzero(w)
    if not 0 < size <= positive:
        raise ValueError(f"size must be in (0, {positive}] (rows with positive weight), got {size}")
    # Water-filling: cap the k heaviest rows at 1 and scale the rest by c = (size - k) / (their sum), for
    # the least k with c w_(k+1) <= 1 (w sorted decreasing).
    order = np.sort(w[w > 0])[::-1]
    rest = np.cumsum(order[::-1])[::-1]  # rest[k] = sum of order[k:]
    scale = (size - np.arange(order.size)) / rest
    k = int(np.argmax(scale * order <= 1.0 + 1e-12))
    return np.minimum(scale[k] * w, 1.0)


def balanced_subset(weights: np.ndarray, seed: int, *, size: float | None = None) -> np.ndarray:
    """Indices (ascending, int64) of a Poisson sample: row i kept independently with probability p_i from
    :func:`inclusion_probabilities` (default p_i = w_i / max w, expected size sum(w) / max(w))."""
    p = inclusion_probabilities(weights, size)
    rng = np.random.default_rng(seed)
    return np.flatnonzero(rng.random(p.size) < p).astype(np.int64)
