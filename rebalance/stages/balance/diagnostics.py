"""Balance step 4: diagnostics of the weights, all additive reductions over the cells or the resident rows.

ESS, smallest and largest weight, a histogram of log10 weights, the balanced marginals (and, with
``max_weight``, the marginal error clipping leaves), and for every pair of marginals small enough the
joint count table's singular values and the predicted variance factor of Liu et al.
(:class:`~rebalance.kernels.stats.WeightMoments`, :mod:`rebalance.kernels.spectra`).
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import pyarrow as pa

from rebalance.kernels.scaling import Scaling
from rebalance.kernels.spectra import balanced_variance_factor, joint_singular_values
from rebalance.kernels.stats import WeightMoments, weight_moments
from rebalance.spec import DUP_GROUP, BalanceSpec
from rebalance.stages.balance.fit import CellParts, Labelled, RowParts
from rebalance.stages.balance.survey import marginal_order

__all__ = ["diagnose"]

MAX_JOINT_TABLE = 4_000_000  # cells of a dense pair table whose SVD the driver computes
HISTOGRAM_BINS = 40


def _moments(
    state: Labelled, scaling: Scaling, sizes: list[int], pairs: list[tuple[int, int]]
) -> WeightMoments:
    return weight_moments(state.codes, scaling.weights(state.codes), sizes, counts=state.counts, pairs=pairs)


def _log_histogram(state: Labelled, scaling: Scaling, edges: np.ndarray) -> np.ndarray:
    """Rows per bin of log10(max(w, 1e-12)) over ``edges``."""
    w = np.log10(np.maximum(scaling.weights(state.codes), 1e-12))
    return np.histogram(w, bins=edges, weights=state.counts)[0].astype(np.float64)


def diagnose(
    parts: CellParts | RowParts,
    scaling: Scaling,
    spec: BalanceSpec,
    values: list[pa.Array],
    targets: list[np.ndarray],
    passes: int,
) -> dict[str, Any]:
    """The ``balance.json`` fields that describe the weights of ``scaling`` over ``parts``: ``clipping``
    (with ``max_weight``), ``ess``, ``ess_fraction``, the weight range and histogram,
    ``marginal_distributions`` and ``joint`` (after ``passes`` IPF passes); with ``dup_group``,
    ``dup_group_error``: the total-variation distance of the weighted rows per group size from its target."""
    marginals = marginal_order(spec)
    sizes = [len(v) for v in values]
    pairs = [
        (a, b)
        for a in range(len(sizes))
        for b in range(a + 1, len(sizes))
        if sizes[a] * sizes[b] <= MAX_JOINT_TABLE
    ]
    moments = parts.reduce(_moments, scaling, sizes, pairs, combine=operator.add)
    n_rows = moments.rows
    lo, hi = np.log10(max(moments.smallest, 1e-12)), np.log10(max(moments.largest, 1e-12))
    edges = np.histogram_bin_edges(np.array([lo, hi]), bins=HISTOGRAM_BINS)
    histogram = parts.reduce(_log_histogram, scaling, edges)
    out: dict[str, Any] = {}
    if spec.max_weight is not None:
        out["clipping"] = {
            "max_weight": spec.max_weight,
            "marginal_error_after_clipping": {
                m: float(0.5 * np.abs(moments.balanced[i] / n_rows - targets[i]).sum())
                for i, m in enumerate(marginals)
            },
        }
    out.update(_weight_summary(moments, histogram, edges, marginals, values, targets))
    out["joint"] = _joint_diagnostics(moments, marginals, sizes, passes)
    if DUP_GROUP in marginals:  # the last marginal: not fitted, so its error is only known from the weights
        out["dup_group_error"] = float(0.5 * np.abs(moments.balanced[-1] / n_rows - targets[-1]).sum())
    return out


def _weight_summary(
    moments: WeightMoments,
    histogram: np.ndarray,
    edges: np.ndarray,
    marginals: list[str],
    values: list[pa.Array],
    targets: list[np.ndarray],
) -> dict[str, Any]:
    n = moments.rows
    per_marginal = {
        name: {
            "values": [str(v) for v in values[m].to_pylist()],
            "counts": moments.counts[m].astype(int).tolist(),
            "target": (targets[m] * n).tolist(),
            "balanced": moments.balanced[m].tolist(),
        }
        for m, name in enumerate(marginals)
    }
    return {
        "ess": moments.ess,
        "ess_fraction": moments.ess / n,
        "max_weight_value": moments.largest,
        "min_weight_value": moments.smallest,
        "mean_weight": moments.weighted / n,
        "weight_histogram": {"log10_edges": edges.tolist(), "rows": histogram.tolist()},
        "marginal_distributions": per_marginal,
    }


def _joint_diagnostics(
    moments: WeightMoments, marginals: list[str], sizes: list[int], passes: int, top: int = 16
) -> list[dict[str, Any]]:
    """For every pair of marginals: the singular values of the normalised joint count table
    D_a^(-1/2) C D_b^(-1/2), its s2, and the predicted worst-case excess variance of a balanced estimate
    after k passes (as a fraction of Var(h), Liu et al.), for k = 0..min(passes, 50)."""
    out = []
    for a in range(len(marginals)):
        for b in range(a + 1, len(marginals)):
            entry: dict[str, Any] = {"pair": [marginals[a], marginals[b]], "shape": [sizes[a], sizes[b]]}
            if (a, b) not in moments.pairs:
                entry["skipped"] = f"table of {sizes[a]} x {sizes[b]} values is too large for a dense SVD"
                out.append(entry)
                continue
            s = joint_singular_values(moments.pairs[(a, b)])
            s2 = float(s[1]) if s.size > 1 else 0.0
            entry.update(
                singular_values=s[:top].tolist(),
                s2=s2,
                variance_factor_per_iteration=balanced_variance_factor(
                    s2, np.arange(min(passes, 50) + 1)
                ).tolist(),
            )
            out.append(entry)
    return out
