"""Imbalance statistics of a categorical distribution given by its (possibly weighted) counts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "WeightMoments",
    "gini",
    "imbalance_stats",
    "normalized_entropy",
    "normalized_mutual_info",
    "weight_moments",
]


def gini(counts: np.ndarray) -> float:
    """Gini coefficient of the values' counts: 0 when all equal, -> 1 when one value holds everything.

    G = sum_i (2i - K - 1) x_(i) / (K sum x), x sorted ascending, i = 1..K.
    """
    x = np.sort(np.asarray(counts, dtype=np.float64))
    k = x.size
    if k == 0 or x.sum() <= 0:
        return 0.0
    i = np.arange(1, k + 1)
    return float(((2 * i - k - 1) * x).sum() / (k * x.sum()))


def normalized_entropy(counts: np.ndarray) -> float:
    """Shannon entropy of counts / sum, divided by log K (1 for a uniform distribution; 1 when K = 1)."""
    x = np.asarray(counts, dtype=np.float64)
    k = x.size
    if k <= 1:
        return 1.0
    p = x[x > 0] / x.sum()
    return float(-(p * np.log(p)).sum() / np.log(k))


def imbalance_stats(counts: np.ndarray) -> dict[str, float]:
    """Summary of one marginal: values, total, imbalance ratio (largest / smallest non-zero), Gini and
    normalised entropy over the values with non-zero count."""
    x = np.asarray(counts, dtype=np.float64)
    nonzero = x[x > 0]
    return {
        "values": int(nonzero.size),
        "total": float(x.sum()),
        "imbalance_ratio": float(nonzero.max() / nonzero.min()) if nonzero.size else 0.0,
        "gini": gini(nonzero),
        "normalized_entropy": normalized_entropy(nonzero),
    }


def normalized_mutual_info(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised mutual information of two labelings (n,): I(A; B) / mean(H(A), H(B)) (arithmetic mean,
    as scikit-learn's default); 1 when both are constant."""
    _, a = np.unique(np.asarray(a), return_inverse=True)
    _, b = np.unique(np.asarray(b), return_inverse=True)
    joint = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(joint, (a, b), 1.0)
    p = joint / joint.sum()
    pa, pb = p.sum(1), p.sum(0)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz])).sum())
    ha, hb = (float(-(x[x > 0] * np.log(x[x > 0])).sum()) for x in (pa, pb))
    if ha == 0 and hb == 0:
        return 1.0
    return max(0.0, mi / ((ha + hb) / 2))


@dataclass
class WeightMoments:
    """Additive summaries of weighted labelled rows; the sum (``+``) of two parts' is the whole's.

    rows: N; weighted: sum w; squares: sum w^2; largest, smallest: max and min weight (over rows);
    counts[m], balanced[m]: (K_m,) rows and weighted rows per label of marginal m; pairs[(a, b)]: (K_a, K_b)
    rows per label pair of marginals a < b (the joint count table).
    """

    rows: float
    weighted: float
    squares: float
    largest: float
    smallest: float
    counts: list[np.ndarray]
    balanced: list[np.ndarray]
    pairs: dict[tuple[int, int], np.ndarray]

    def __add__(self, other: WeightMoments) -> WeightMoments:
        return WeightMoments(
            self.rows + other.rows,
            self.weighted + other.weighted,
            self.squares + other.squares,
            max(self.largest, other.largest),
            min(self.smallest, other.smallest),
            [a + b for a, b in zip(self.counts, other.counts, strict=True)],
            [a + b for a, b in zip(self.balanced, other.balanced, strict=True)],
            {k: v + other.pairs[k] for k, v in self.pairs.items()},
        )

    @property
    def ess(self) -> float:
        """Effective sample size (sum w)^2 / sum w^2."""
        return self.weighted**2 / self.squares


def weight_moments(
    codes: np.ndarray,
    weights: np.ndarray,
    sizes: Sequence[int],
    *,
    counts: np.ndarray | None = None,
    pairs: Sequence[tuple[int, int]] = (),
) -> WeightMoments:
    """:class:`WeightMoments` of rows with labels codes (n, M), codes[:, m] in [0, sizes[m]), and weights
    (n,); ``counts`` (n,) repeats each row that often (a table of cells). pairs: the marginal pairs (a, b)
    whose joint count table to build."""
    codes = np.asarray(codes)
    w = np.asarray(weights, dtype=np.float64)
    c = np.ones_like(w) if counts is None else np.asarray(counts, dtype=np.float64)
    cw = c * w
    seen = c > 0
    joint = {}
    for a, b in pairs:
        flat = codes[:, a].astype(np.int64) * sizes[b] + codes[:, b]
        joint[(a, b)] = np.bincount(flat, weights=c, minlength=sizes[a] * sizes[b]).reshape(
            sizes[a], sizes[b]
        )
    return WeightMoments(
        float(c.sum()),
        float(cw.sum()),
        float((cw * w).sum()),
        float(w[seen].max()) if seen.any() else -np.inf,
        float(w[seen].min()) if seen.any() else np.inf,
        [np.bincount(codes[:, m], weights=c, minlength=k) for m, k in enumerate(sizes)],
        [np.bincount(codes[:, m], weights=cw, minlength=k) for m, k in enumerate(sizes)],
        joint,
    )
