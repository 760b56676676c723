"""How a partition (clusters) spreads over a ground-truth labelling, from their contingency table.

C (K, T): C[k, t] rows in cluster k with true label t. With n = sum C, p = C / n:

- NMI = I(cluster; truth) / ((H(cluster) + H(truth)) / 2) (arithmetic normalisation, scikit-learn's
  default), 1 when both are empty of information (a single cluster and a single label);
- purity = sum_k max_t C[k, t] / n: the share of rows in their cluster's most common label;
- per true label t: the clusters holding its rows, and its effective number of clusters
  exp(H(cluster | truth = t)) (1: all its rows in one cluster; m: spread evenly over m);
- per cluster k: its most common label and that label's share of the cluster.

The true labels' shares before and after balancing (:func:`truth_shares`): with r_t rows and w_t weighted
rows (sum of the row weights) of true label t, share_before_t = r_t / sum r, share_after_t = w_t / sum w, and
each one's total-variation distance to uniform over the T labels, 0.5 sum_t |share_t - 1 / T|.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["alignment_scores", "truth_shares"]


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def alignment_scores(contingency: np.ndarray) -> dict[str, Any]:
    """Alignment of the partition with rows of ``contingency`` (K, T) to the truth of its columns: ``nmi``,
    ``purity``, ``truth_spread`` (per column: ``rows``, ``clusters``, ``effective_clusters``) and
    ``clusters`` (per row: ``rows``, ``dominant`` column index or None for an empty cluster,
    ``dominant_share``). Empty rows and columns are ignored by the scores."""
    c = np.asarray(contingency, dtype=np.float64)
    n = c.sum()
    if c.ndim != 2 or n <= 0 or (c < 0).any():
        raise ValueError("contingency must be a (K, T) table of non-negative counts with a positive sum")
    rows, cols = c.sum(axis=1), c.sum(axis=0)
    h_k, h_t = _entropy(rows / n), _entropy(cols / n)
    nz = c > 0
    mi = float((c[nz] / n * np.log(c[nz] * n / np.outer(rows, cols)[nz])).sum())
    nmi = 1.0 if h_k == 0 and h_t == 0 else (mi / ((h_k + h_t) / 2) if h_k + h_t > 0 else 0.0)
    spread = []
    for t in range(c.shape[1]):
        col = c[:, t]
        total = col.sum()
        spread.append({
            "rows": int(total),
            "clusters": int((col > 0).sum()),
            "effective_clusters": float(np.exp(_entropy(col / total))) if total > 0 else 0.0,
        })  # fmt: skip
    dominant = c.argmax(axis=1)
    clusters = [
        {
            "rows": int(rows[k]),
            "dominant": int(dominant[k]) if rows[k] > 0 else None,
            "dominant_share": float(c[k, dominant[k]] / rows[k]) if rows[k] > 0 else None,
        }
        for k in range(c.shape[0])
    ]
    return {
        "nmi": float(np.clip(nmi, 0.0, 1.0)),
        "purity": float(c.max(axis=1).sum() / n),
        "truth_spread": spread,
        "clusters": clusters,
    }


def truth_shares(rows: np.ndarray, weighted: np.ndarray) -> dict[str, Any]:
    """Shares of the T true labels before (``rows`` (T,), row counts) and after balancing (``weighted``
    (T,), summed row weights): ``share_before``, ``share_after`` (T,) and ``tv_uniform_before``,
    ``tv_uniform_after``: 0.5 sum_t |share_t - 1 / T| (0: every label equally represented; at most
    1 - 1 / T)."""
    rows, weighted = np.asarray(rows, np.float64), np.asarray(weighted, np.float64)
    if rows.ndim != 1 or rows.shape != weighted.shape or rows.sum() <= 0 or weighted.sum() <= 0:
        raise ValueError("rows and weighted must be (T,) non-negative totals with positive sums")
    if (rows < 0).any() or (weighted < 0).any():
        raise ValueError("rows and weighted must be non-negative")
    before, after = rows / rows.sum(), weighted / weighted.sum()
    uniform = 1.0 / rows.size
    return {
        "share_before": before.tolist(),
        "share_after": after.tolist(),
        "tv_uniform_before": float(0.5 * np.abs(before - uniform).sum()),
        "tv_uniform_after": float(0.5 * np.abs(after - uniform).sum()),
    }
