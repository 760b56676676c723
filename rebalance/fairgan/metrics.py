"""Fairness discrepancy of a generator's class distribution, with confidence intervals, and a per-class
image-quality proxy. Plain numpy; nothing here knows of torch, Ray or files.

Fairness discrepancy (Choi et al. 2020; Jain et al. 2023): for class fractions ``p`` over ``K`` classes,

    FD(p) = || p - u ||_2 = sqrt( sum_k (1/K - p_k)^2 ),      u = (1/K, ..., 1/K).

It is 0 for the uniform distribution and ``sqrt((1 - 1/K)^2 + (K - 1)/K^2) = sqrt(1 - 1/K)`` when all mass
is on one class. Estimated from ``n`` samples it is biased upward: a perfectly fair generator shows
``E[FD^2] = (1 - 1/K) / n`` (:func:`uniform_floor`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = [
    "FairnessEstimate",
    "class_fractions",
    "fairness_discrepancy",
    "fairness_estimate",
    "uniform_floor",
    "per_class_feature_distance",
    "diagonal_frechet",
]


def class_fractions(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Fractions ``(K,)`` float64 of the labels in ``0 .. K-1``; labels < 0 (unassigned) are left out.

    Raises ValueError for a label >= K or when no label is assigned."""
    labels = np.asarray(labels).astype(np.int64).ravel()
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if labels.size and labels.max() >= num_classes:
        raise ValueError(f"label {int(labels.max())} out of range for {num_classes} classes")
    kept = labels[labels >= 0]
    if kept.size == 0:
        raise ValueError("no assigned labels to compute class fractions from")
    return np.bincount(kept, minlength=num_classes).astype(np.float64) / kept.size


def fairness_discrepancy(p: np.ndarray | Sequence[float]) -> float:
    """``sqrt(sum_k (1/K - p_k)^2)`` of class fractions ``p`` (K,); ``p`` is normalised to sum 1 first
    (so counts work too)."""
    p = np.asarray(p, dtype=np.float64).ravel()
    if p.size == 0 or (p < 0).any() or not np.isfinite(p).all() or p.sum() <= 0:
        raise ValueError("p must be a non-empty vector of non-negative finite numbers with a positive sum")
    p = p / p.sum()
    return float(np.sqrt(np.sum((1.0 / p.size - p) ** 2)))


def uniform_floor(num_classes: int, n: int) -> float:
    """``sqrt((1 - 1/K) / n)``: the root-mean-square FD that a perfectly uniform generator shows when
    measured on ``n`` samples (multinomial noise; ``E[FD^2] = sum_k p_k (1 - p_k) / n`` at ``p = u``)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.sqrt((1.0 - 1.0 / num_classes) / n)


@dataclass
class FairnessEstimate:
    """FD of ``n`` classified samples.

    ``fd``: on all samples; ``ci_low``/``ci_high``: percentile bootstrap interval at ``level`` (multinomial
    resampling of the class counts, ``n_boot`` draws); ``split_mean``/``split_std``: mean and standard
    deviation of FD over ``n_splits`` disjoint equal splits (the paper's protocol); ``floor``: the FD of a
    perfectly uniform generator at this ``n`` (:func:`uniform_floor`); ``counts``: per class;
    ``unassigned``: samples with label < 0, left out.
    """

    fd: float
    ci_low: float
    ci_high: float
    level: float
    split_mean: float
    split_std: float
    n_splits: int
    n: int
    floor: float
    counts: list[int]
    fractions: list[float]
    unassigned: int

    def to_dict(self) -> dict:
        return asdict(self)


def fairness_estimate(
    labels: np.ndarray,
    num_classes: int,
    *,
    level: float = 0.95,
    n_boot: int = 2000,
    n_splits: int = 10,
    seed: int = 0,
) -> FairnessEstimate:
    """FD of ``labels`` (n,) in ``0 .. K-1`` (< 0: unassigned) with a bootstrap CI and the split statistics.

    The bootstrap draws ``n_boot`` count vectors ``~ Multinomial(n, p_hat)`` and takes the
    ``(1 - level)/2`` and ``(1 + level)/2`` quantiles of their FD; its width shrinks like ``1/sqrt(n)``.
    The splits are the first ``n_splits * floor(n / n_splits)`` labels in order, cut into ``n_splits``
    equal consecutive parts (fewer parts when ``n < n_splits``).
    """
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if n_boot < 1 or n_splits < 1:
        raise ValueError("n_boot and n_splits must be >= 1")
    labels = np.asarray(labels).astype(np.int64).ravel()
    p = class_fractions(labels, num_classes)
    kept = labels[labels >= 0]
    n = int(kept.size)
    rng = np.random.default_rng(seed)
    boot = rng.multinomial(n, p, size=n_boot) / n
    fds = np.sqrt(((1.0 / num_classes - boot) ** 2).sum(axis=1))
    lo, hi = np.quantile(fds, [(1 - level) / 2, (1 + level) / 2])
    splits = min(n_splits, n)
    size = n // splits
    split_fd = [
        fairness_discrepancy(np.bincount(kept[i * size : (i + 1) * size], minlength=num_classes))
        for i in range(splits)
    ]
    counts = np.bincount(kept, minlength=num_classes)
    return FairnessEstimate(
        fd=fairness_discrepancy(p),
        ci_low=float(lo),
        ci_high=float(hi),
        level=float(level),
        split_mean=float(np.mean(split_fd)),
        split_std=float(np.std(split_fd)),
        n_splits=splits,
        n=n,
        floor=uniform_floor(num_classes, n),
        counts=[int(c) for c in counts],
        fractions=[float(v) for v in p],
        unassigned=int(labels.size - n),
    )


def diagonal_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between diagonal Gaussians fitted to feature sets ``a`` (n, d) and ``b`` (m, d):
    ``||mu_a - mu_b||^2 + sum_j (sigma_a,j - sigma_b,j)^2`` (population standard deviations).

    The diagonal form stays well defined with fewer samples than dimensions, which a full-covariance FID
    per class does not."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) == 0 or len(b) == 0:
        raise ValueError(f"need two non-empty (n, d) feature sets of equal d, got {a.shape} and {b.shape}")
    mean = np.sum((a.mean(0) - b.mean(0)) ** 2)
    spread = np.sum((a.std(0) - b.std(0)) ** 2)
    return float(mean + spread)


def per_class_feature_distance(
    gen_features: np.ndarray,
    gen_labels: np.ndarray,
    real_features: np.ndarray,
    real_labels: np.ndarray,
    num_classes: int,
    min_samples: int = 2,
) -> dict[int, float]:
    """Per-class image-quality proxy: :func:`diagonal_frechet` between the features of the generated
    samples assigned to class ``c`` and those of the real images of class ``c``.

    Global FID is confounded by class balance (a fair generator is "far" from a long-tailed real set), so
    quality is compared class by class. Returns ``{c: distance}`` for every class with at least
    ``min_samples`` generated and real samples; other classes are absent."""
    gen_labels, real_labels = np.asarray(gen_labels), np.asarray(real_labels)
    out: dict[int, float] = {}
    for c in range(num_classes):
        g, r = gen_features[gen_labels == c], real_features[real_labels == c]
        if len(g) >= min_samples and len(r) >= min_samples:
            out[c] = diagonal_frechet(g, r)
    return out
