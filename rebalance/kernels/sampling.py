"""Seeded sampling kernels: uniform samples without replacement by bottom-k of key hashes, and weighted
draws with replacement by inverse-CDF lookup.

Bottom-k: each row gets a priority u = H(seed, key) in [0, 1); the m rows with the smallest priorities are a uniform
sample of size m without replacement, whatever the sharding or order, so shards select locally and a merge
keeps the m smallest (memory O(m)).

Weighted draws (:func:`draw_with_replacement`): points on [0, sum w) are looked up in the cumulative weights,
so row i is drawn for the points that fall in [w_1 + ... + w_(i-1), w_1 + ... + w_i), with probability
q_i = w_i / sum w per point; the training samplers (``rebalance.samplers``) and ``rebalance.resample`` draw
through it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

__all__ = ["bottom_k", "check_weights", "draw_with_replacement", "key_priorities"]


def key_priorities(keys: Sequence[str], seed: int) -> np.ndarray:
    """Seeded pseudo-random priority in [0, 1) for each key; shape (n,) float64."""
    salt = seed.to_bytes(8, "little", signed=True)
    digests = b"".join(hashlib.blake2b(k.encode(), digest_size=8, salt=salt).digest() for k in keys)
    return (np.frombuffer(digests, dtype="<u8") >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def bottom_k(priorities: np.ndarray, m: int) -> np.ndarray:
    """Indices of the ``m`` smallest priorities, in increasing priority order (ties broken by index)."""
    m = min(m, priorities.size)
    if m <= 0:
        return np.zeros(0, dtype=np.int64)
    idx = np.argpartition(priorities, m - 1)[:m] if m < priorities.size else np.arange(priorities.size)
    return idx[np.lexsort((idx, priorities[idx]))]


def check_weights(weights: np.ndarray) -> np.ndarray:
    """``weights`` as a float64 array, or ValueError unless it is non-empty, 1-d, finite, non-negative and
    has a positive sum."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0:
        raise ValueError(f"weights must be a non-empty 1-d array, got shape {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError("weights must be finite and non-negative")
    if w.sum() <= 0:
        raise ValueError("weights are all zero (they need a positive sum): nothing to draw")
    return w


def draw_with_replacement(
    weights: np.ndarray, size: int, rng: np.random.Generator, method: str = "multinomial"
) -> np.ndarray:
    """``size`` row indices drawn with replacement with probability q_i = w_i / sum w; shape (size,), int64.

    ``weights`` as :func:`check_weights` accepts (checked by the caller); rows with w_i = 0 are never drawn.
    ``multinomial``: ``size`` independent points u_j ~ U[0, sum w) (``rng.random(size)``), indices in draw
    order. ``systematic``: the evenly spaced points (u + j) sum w / size, j = 0..size-1, for one u ~ U[0, 1),
    so row i is drawn floor(size q_i) or ceil(size q_i) times (the least variance), returned in random order
    (``rng.shuffle``). The indices depend only on the weights, ``size``, ``method`` and the state of ``rng``.
    """
    cumulative = np.cumsum(weights)
    total = cumulative[-1]
    if method == "systematic":
        points = (rng.random() + np.arange(size)) * (total / size) if size else np.zeros(0)
    elif method == "multinomial":
        points = rng.random(size) * total
    else:
        raise ValueError(f"unknown method {method!r}; expected systematic or multinomial")
    # The first row whose cumulative weight exceeds the point: a row with w = 0 never qualifies.
    idx = np.searchsorted(cumulative, points, side="right")
    idx = np.minimum(idx, np.flatnonzero(weights)[-1])  # a point rounded up to the total
    if method == "systematic":
        rng.shuffle(idx)
    return idx.astype(np.int64)
