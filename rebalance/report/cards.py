"""Pure building blocks of the concept cards: per-group selection of rows, caption words, purity and the
2-D projection of the embedding map. Arrays in, arrays out; nothing here reads files or knows Ray."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = [
    "STOPWORDS",
    "caption_words",
    "group_sums",
    "pca_2d",
    "purity",
    "smallest_per_group",
    "weight_percentiles",
]

#: Words too common in captions to describe a concept (articles, prepositions, photo boilerplate).
STOPWORDS = frozenset((
    "a", "an", "the", "of", "on", "in", "at", "to", "and", "or", "with", "without", "for", "from", "by",
    "is", "are", "was", "were", "be", "been", "it", "its", "this", "that", "these", "those", "there",
    "here", "as", "into", "onto", "over", "under", "up", "down", "out", "off", "some", "any", "very",
    "small", "large", "big", "image", "photo", "picture", "drawing", "close", "close-up", "showing",
    "shows", "show", "painted", "coloured", "colored", "plain", "background", "simple",
))  # fmt: skip
_WORD = re.compile(r"[^\W\d_][\w'-]*", re.UNICODE)


def smallest_per_group(score: np.ndarray, group: np.ndarray, n_groups: int, k: int) -> np.ndarray:
    """Indices of the ``k`` rows of smallest ``score`` within each group, grouped by group id and in
    increasing score within a group (ties by index); rows with a group outside [0, n_groups) or a NaN
    score are skipped. score, group: (n,). Returns (m,) int64, m <= n_groups * k."""
    score = np.asarray(score, np.float64)
    group = np.asarray(group, np.int64)
    ok = (group >= 0) & (group < n_groups) & ~np.isnan(score)
    idx = np.flatnonzero(ok)
    if idx.size == 0 or k <= 0:
        return np.zeros(0, np.int64)
    order = idx[np.lexsort((idx, score[idx], group[idx]))]
    g = group[order]
    starts = np.searchsorted(g, g, side="left")
    rank = np.arange(order.size) - starts
    return order[rank < k]


def group_sums(x: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """Per-group sums of the rows of ``x``: (n, d) and (n,) -> (n_groups, d) float64."""
    out = np.zeros((n_groups, x.shape[1]), np.float64)
    np.add.at(out, np.asarray(group, np.int64), np.asarray(x, np.float64))
    return out


def caption_words(captions: Iterable[str | None], top: int = 6) -> list[tuple[str, int]]:
    """The ``top`` most frequent words (lower-cased, stopwords and numbers dropped) of ``captions``, each
    counted once per caption, as (word, captions containing it), most frequent first (ties by word)."""
    counts: Counter[str] = Counter()
    for caption in captions:
        if caption:
            counts.update({w for w in _WORD.findall(caption.lower()) if w not in STOPWORDS and len(w) > 1})
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]


def purity(contingency: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Majority truth value and purity of each group: contingency (G, V) counts of (group, truth value) ->
    (argmax over V, max / row sum); purity is NaN for an empty group."""
    contingency = np.asarray(contingency, np.float64)
    totals = contingency.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return contingency.argmax(axis=1), np.where(totals > 0, contingency.max(axis=1) / totals, np.nan)


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project the rows of x (n, d) on their first two principal axes: returns ((n, 2) coordinates, (2,)
    fraction of the total variance each axis explains). Axis signs are fixed so that the largest-magnitude
    loading of each axis is positive, which makes the map deterministic."""
    x = np.asarray(x, np.float64)
    centred = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    axes = vt[:2]
    signs = np.sign(axes[np.arange(axes.shape[0]), np.abs(axes).argmax(axis=1)])
    axes = axes * signs[:, None]
    coords = centred @ axes.T
    if coords.shape[1] < 2:
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    total = float((s**2).sum())
    explained = np.array([(s[i] ** 2) / total if total > 0 and i < s.size else 0.0 for i in range(2)])
    return coords, explained


def weight_percentiles(weights: np.ndarray, qs: Sequence[float] = (0, 1, 5, 25, 50, 75, 95, 99, 100)) -> dict:
    """{"p<q>": the q-th percentile of ``weights``} for each q (linear interpolation)."""
    values = np.percentile(np.asarray(weights, np.float64), list(qs)) if len(weights) else [np.nan] * len(qs)
    return {f"p{q:g}": float(v) for q, v in zip(qs, values, strict=True)}
