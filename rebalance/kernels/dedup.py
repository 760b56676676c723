"""Near-duplicate groups (SemDeDup, Abbas et al. 2023) inside one cluster: pairs of rows whose cosine
similarity is at least a threshold, joined into connected components.

Two rows i, j are near-duplicates when cos(x_i, x_j) = <x_i, x_j> / (|x_i| |x_j|) >= ``threshold``; a group
is a connected component of that relation (so a chain a ~ b ~ c is one group even when cos(a, c) is below
the threshold). The similarity matrix of n rows is computed in (block x block) tiles, so memory is
O(n d + block^2) whatever n is.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

__all__ = ["similar_pairs", "component_roots", "duplicate_roots"]


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def similar_pairs(x: np.ndarray, threshold: float, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Every pair i < j of rows of ``x`` (n, d) with cosine similarity >= ``threshold``: (i (p,), j (p,))
    int64, in (i, j) order. Zero rows are similar to nothing. The Gram matrix is formed one
    (block x block) tile of its upper triangle at a time."""
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    u = _unit(x)
    n = u.shape[0]
    rows, cols = [], []
    for a in range(0, n, block):
        ua = u[a : a + block]
        for b in range(a, n, block):
            sim = ua @ u[b : b + block].T
            i, j = np.nonzero(sim >= threshold)
            i, j = i + a, j + b
            keep = i < j
            rows.append(i[keep])
            cols.append(j[keep])
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    i, j = np.concatenate(rows).astype(np.int64), np.concatenate(cols).astype(np.int64)
    order = np.lexsort((j, i))
    return i[order], j[order]


def component_roots(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """The smallest row index of each row's connected component in the graph on ``n`` nodes with edges
    (i[e], j[e]): (n,) int64 (a row with no edge is its own root)."""
    if n == 0:
        return np.zeros(0, np.int64)
    graph = coo_matrix((np.ones(i.size, np.int8), (i, j)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    smallest = np.full(component.max() + 1, n, dtype=np.int64)
    np.minimum.at(smallest, component, np.arange(n))
    return smallest[component]


def duplicate_roots(x: np.ndarray, threshold: float, block: int = 4096) -> np.ndarray:
    """Near-duplicate groups of the rows of ``x`` (n, d): for each row, the smallest row index of its group
    (components of cosine >= ``threshold``), (n,) int64. Order rows by key first and the root is the group's
    smallest key."""
    i, j = similar_pairs(x, threshold, block)
    return component_roots(x.shape[0], i, j)
