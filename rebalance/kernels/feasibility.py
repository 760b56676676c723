"""Can exact targets be met at all? Checks run before any IPF pass.

Exact IPF converges only when some measure q absolutely continuous with respect to the data's p (zero on
every cell p leaves empty: the structural zeros) has the target marginals (Csiszar 1975). For two
marginals that is a transportation problem on the bipartite support graph: source -> value i of marginal
0 (capacity t_0(i)), i -> j for every cell (i, j) with mass (unbounded), value j of marginal 1 -> sink
(capacity t_1(j)); the targets can be met iff the maximum flow is 1. :func:`support_flow` solves it with
``scipy.sparse.csgraph.maximum_flow`` on integer capacities (targets scaled by ``scale`` and rounded in
the direction that favours feasibility, so a shortfall found is real) and, when the flow falls short,
names a Hall violator from the minimum cut: values A of marginal 0 whose cells only reach values N(A) of
marginal 1 with t_1(N(A)) < t_0(A).

Whatever the other marginals, an exact marginal alone needs the rows of value l to carry mean weight
t(l) / p(l) (:func:`needed_weights`), a lower bound on the largest weight of any exact solution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse
from scipy.sparse.csgraph import breadth_first_order, maximum_flow

__all__ = ["Flow", "needed_weights", "support_flow"]


@dataclass(frozen=True)
class Flow:
    """The result of :func:`support_flow`.

    placed: the largest share of the target mass a measure on the support can carry with both marginals
    at most their targets (1 when feasible, up to 1 / scale). shortfall: 1 - placed. rows, cols: a Hall
    violator (codes of marginal 0 and the marginal-1 codes their cells reach), empty when feasible.
    need, reach: t_0(rows) and t_1(cols).
    """

    placed: float
    shortfall: float
    rows: np.ndarray
    cols: np.ndarray
    need: float
    reach: float

    @property
    def feasible(self) -> bool:
        return self.rows.size == 0


def support_flow(
    codes: np.ndarray, mass: np.ndarray, t0: np.ndarray, t1: np.ndarray, *, scale: int = 1 << 29
) -> Flow:
    """Maximum flow of the targets through the support of two marginals (module docstring).

    codes: (C, 2) cell labels in [0, K_0) x [0, K_1); mass: (C,) (cells with mass 0 are not support);
    t0, t1: (K_0,), (K_1,) targets summing to 1. Source capacities are rounded down, sink capacities up,
    so the check errs toward feasible by at most K_0 / scale.
    """
    codes = np.asarray(codes, dtype=np.int64)
    t0, t1 = np.asarray(t0, dtype=np.float64), np.asarray(t1, dtype=np.float64)
    k0, k1 = t0.size, t1.size
    cells = np.unique(codes[np.asarray(mass) > 0], axis=0)
    source_cap = np.floor(t0 * scale).astype(np.int64)
    sink_cap = np.ceil(t1 * scale).astype(np.int64)
    big = int(sink_cap.sum()) + 1
    if big >= np.iinfo(np.int32).max:
        raise ValueError(f"scale {scale} too large for int32 capacities")
    # nodes: 0 source, 1..k0 marginal 0, k0+1..k0+k1 marginal 1, k0+k1+1 sink
    sink = k0 + k1 + 1
    heads = np.concatenate([np.zeros(k0, np.int64), 1 + cells[:, 0], 1 + k0 + np.arange(k1)])
    tails = np.concatenate([1 + np.arange(k0), 1 + k0 + cells[:, 1], np.full(k1, sink)])
    caps = np.concatenate([source_cap, np.full(len(cells), big), sink_cap]).astype(np.int32)
    n = sink + 1
    graph = scipy.sparse.csr_array((caps, (heads, tails)), shape=(n, n))
    result = maximum_flow(graph, 0, sink)
    total = int(source_cap.sum())
    placed = result.flow_value / total if total else 1.0
    if result.flow_value >= total:
        empty = np.zeros(0, np.int64)
        return Flow(1.0, 0.0, empty, empty, 0.0, 0.0)
    # the flow is antisymmetric (f[j, i] = -f[i, j]), so capacity - flow is the residual both ways
    residual = scipy.sparse.csr_array((graph - scipy.sparse.csr_array(result.flow)) > 0)
    reached = breadth_first_order(residual, 0, directed=True, return_predecessors=False)
    rows = np.sort(reached[(reached >= 1) & (reached <= k0)] - 1)
    cols = np.sort(reached[(reached > k0) & (reached < sink)] - 1 - k0)
    return Flow(float(placed), float(1 - placed), rows, cols, float(t0[rows].sum()), float(t1[cols].sum()))


def needed_weights(counts: np.ndarray, target: np.ndarray) -> np.ndarray:
    """t(l) / p(l), the mean weight an exact marginal gives the rows of value l (inf where p(l) = 0 < t(l),
    0 where t(l) = 0); shape (K,). counts: rows per value; target: summing to 1."""
    counts = np.asarray(counts, dtype=np.float64)
    p = counts / counts.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        need = np.where(np.asarray(target) > 0, np.asarray(target) / p, 0.0)
    return need
