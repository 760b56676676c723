"""How a partition (clusters) spreads over a ground-truth labelling, from their contingency table.

C (K, T): C[k, t] rows in cluster k with true label t. With n = sum C, p = C / n:

- NMI = I(cluster; truth) / ((H(cluster) + H(truth)) / 2) (arithmetic normalisation, scikit-learn's
  default), 1 when both are empty of information (a single cluster and a single label);
- purity = sum_k max_t C[k, t] / n: the share of rows in their cluster's most common label;
- per true label t: the clusters holding its rows, and its effective number of clusters
  exp(H(cluster | truth = t)) (1: all its rows in one cluster; m: spread evenly over m);
- per cluster k: its most common label and that label's share of the cluster.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["alignment_scores"]


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
