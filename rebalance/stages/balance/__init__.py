"""Balance stage: IPF over the joint measure of the marginals, turned into per-row weights.

One module per step, each returning what the next needs and its part of ``balance.json``:

1. :mod:`~rebalance.stages.balance.survey`: the pool counts every part's labels (and, when small, its
   table of distinct label tuples, the cells); the driver merges each marginal's labels (sorted values; a
   label's code is its position), chooses the path and builds the targets.
2. :mod:`~rebalance.stages.balance.fit`: IPF by one of two paths that compute the same iteration
   (:mod:`rebalance.kernels.ipf`): the cell path on the merged cell counts in the driver, the row path
   over rows resident on actors, one reduction of per-label sums per step. ``balance.path: auto`` takes
   the cell path while the parts hold at most ``balance.max_cells`` cells in all (a bound on the merged
   table); ``balance.json`` records the path taken and why.
3. :mod:`~rebalance.stages.balance.weigh`: both paths end in the same
   :class:`~rebalance.kernels.scaling.Scaling`: per-label log factors and a log normaliser, from which a
   row's weight (mean 1 over all rows) is exp(sum_m f_m(l_m) - L), optionally capped at ``max_weight``
   with the mean kept at 1; the pool writes ``weights/part-NNNNN.parquet`` (``key``, ``weight`` float64,
   the marginal columns, and ``soft_clusters``/``soft_probs`` with ``balance.soft``) from it.
4. :mod:`~rebalance.stages.balance.diagnostics`: ESS, histogram, balanced marginals, joint count tables,
   as additive reductions over the cells or the resident rows.
5. :mod:`~rebalance.stages.balance.soft`: optional soft labels (``balance.soft``), a distributed
   log-domain Sinkhorn on every row's scores against its side's centroids.

``dup_group`` (near-duplicate groups, ``dedup``) is held last and not fitted: a fixed factor per row gives
each group its mass before IPF fits the other marginals (:mod:`~rebalance.stages.balance.fit`).
``balance.json`` records targets, the marginal error per iteration, convergence, ESS and the largest
weight, and is written before a failure is raised, so a failed run still explains itself.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from rebalance.data.atomic import atomic_write_json
from rebalance.kernels.scaling import Scaling
from rebalance.spec import DUP_GROUP, cluster_marginal
from rebalance.stages.balance.diagnostics import diagnose
from rebalance.stages.balance.fit import CellParts, Labelled, RowParts, bounds_record, check, fit, fit_record
from rebalance.stages.balance.soft import soft_labels
from rebalance.stages.balance.survey import (
    BalanceError,
    CellTable,
    count_cells,
    dup_base,
    encode_labels,
    load_labels,
    marginal_order,
    survey,
    survey_part,
    targets_for,
)
from rebalance.stages.balance.weigh import scaling_of, weigh_part, write_weights
from rebalance.stages.context import StageContext

__all__ = [
    "BalanceError",
    "CellTable",
    "Scaling",
    "count_cells",
    "encode_labels",
    "load_labels",
    "run_balance",
    "survey_part",
    "weigh_part",
]

log = logging.getLogger(__name__)


def run_balance(ctx: StageContext) -> dict[str, Any]:
    """Balance the joint measure and write per-row weights; returns the stage summary."""
    spec = ctx.spec.balance
    marginals = marginal_order(spec)
    for name in marginals:
        cluster = cluster_marginal(name)
        if cluster is not None and cluster[0] not in ctx.cluster_sides:
            raise BalanceError(f"balance.marginals names {name!r} but the dataset has no {cluster[0]} side")
    if spec.soft is not None and spec.soft.side not in ctx.sides:
        raise BalanceError(f"balance.soft.side is {spec.soft.side!r} but the dataset has no such side")
    root = str(ctx.run.root)
    indices = [s.index for s in ctx.shards]
    workers = ctx.workers(len(indices))
    # The stateless pool and the resident actors each take every CPU: one at a time.
    found = survey(root, indices, spec, workers)
    values, counts, n_rows = found.values, found.counts, found.rows
    record: dict[str, Any] = {
        "path": found.path,
        "path_reason": found.reason,
        "marginals": marginals,
        "targets": {
            m: {"metaclip": {"cap": ctx.spec.concepts.cap}}
            if m == "concept"
            else spec.target_for(m).to_dict()
            for m in marginals
        },
        "iterations": spec.iterations,
        "tol": spec.tol,
        "max_iter": spec.max_iter,
        "cells": None,
        "rows": int(n_rows),
    }
    log.info("balance: IPF on the %s path over %s (%s)", found.path, marginals, found.reason)
    try:
        if spec.bounds is not None and found.path == "rows":
            raise BalanceError(
                f"balance.bounds needs the cell path, but {found.reason}: raise balance.max_cells (the driver "
                "then holds the cell table) or drop balance.bounds"
            )
        targets = targets_for(values, counts, marginals, spec)
        if found.path == "cell":
            cells = found.cells(marginals)
            record["cells"] = int(len(cells.counts))
            parts: CellParts | RowParts = CellParts(Labelled(cells.codes, cells.counts))
        else:
            base = dup_base(spec, values, marginals)  # dup_group: each row starts at exp(base) / their sum
            total = n_rows if base is None else float(np.exp(base) @ counts[-1])
            items = [(root, i, marginals, values, total, base) for i in indices]
            parts = RowParts(items, workers, ctx.spec.ray.placement_timeout_s)
        with parts:
            record["feasibility"] = check(parts, spec, values, counts, targets)
            flow = record["feasibility"]["flow"]
            result, search = fit(parts, spec, values, counts, targets, flow.get("feasible", True))
            bounds = bounds_record(parts, result)
            scaling = scaling_of(result, parts, spec, n_rows)
            diagnostics = diagnose(parts, scaling, spec, values, targets, result.passes)
    except BalanceError as err:
        atomic_write_json({**record, "converged": False, "error": str(err)}, ctx.run.path("balance.json"))
        raise
    labelled = scaling.labelled(marginals, [v.to_pylist() for v in values])
    record.update(fit_record(result, spec, values), bounds=bounds, scaling=labelled.to_dict(), **diagnostics)
    if DUP_GROUP in marginals:  # not fitted: its error per group size, from the weights
        record["final_marginal_error"][DUP_GROUP] = record.pop("dup_group_error")
    if search is not None:
        record["min_ess"] = search
    if not result.converged and spec.iterations == "auto":
        if not spec.allow_partial:
            atomic_write_json(record, ctx.run.path("balance.json"))
            raise BalanceError(record["error"] + ". Set balance.allow_partial: true to keep these weights.")
        log.warning("%s (allow_partial: weights kept)", record["error"])
    soft = None
    if spec.soft is not None:
        soft, record["soft"] = soft_labels(ctx, spec)
    write_weights(root, indices, marginals, values, scaling, soft, workers)
    atomic_write_json(record, ctx.run.path("balance.json"))
    return {
        "path": found.path,
        **{k: record[k] for k in ("cells", "passes", "converged", "ess", "max_weight_value")},
    }
