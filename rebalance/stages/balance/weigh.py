"""Balance step 3: the weights. The IPF's scaling (:class:`~rebalance.kernels.scaling.Scaling`), capped at
``max_weight`` with the mean kept at 1 when set, and the pool that writes ``weights/part-NNNNN.parquet``
(``key``, ``weight`` float64, the marginal columns, and ``soft_clusters``/``soft_probs`` with
``balance.soft``) from it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import ray

from rebalance.data.fs import join
from rebalance.data.parts import part_summary, read_part, write_part
from rebalance.kernels.ipf import IPFResult, clip_scale
from rebalance.kernels.scaling import Scaling
from rebalance.runtime.pool import ActorPool, ShardWorker
from rebalance.spec import DUP_GROUP, BalanceSpec
from rebalance.stages.balance.fit import CellParts, Labelled, RowParts
from rebalance.stages.balance.soft import SoftLabels, soft_codes
from rebalance.stages.balance.survey import encode_labels, load_labels

__all__ = ["scaling_of", "weigh_part", "write_weights"]


def _above(state: Labelled, scaling: Scaling, threshold: float) -> np.ndarray:
    """(free mass sum_{w <= t} c w, rows with w > t) for :func:`clip_scale`."""
    w = scaling.weights(state.codes)
    c = np.ones_like(w) if state.counts is None else state.counts
    free = w <= threshold
    return np.array([(c * w)[free].sum(), c[~free].sum()])


def scaling_of(result: IPFResult, parts: CellParts | RowParts, spec: BalanceSpec, n_rows: float) -> Scaling:
    """The scaling that weighs every row: the IPF's, capped at ``balance.max_weight`` (when set) with the
    scale that keeps the mean weight of the ``n_rows`` rows at 1 (:func:`clip_scale`, one reduction over
    the parts per round)."""
    scaling = result.scaling
    if spec.max_weight is None:
        return scaling
    clip = clip_scale(lambda t: tuple(parts.reduce(_above, scaling, t)), n_rows, spec.max_weight)
    return scaling.capped(clip, spec.max_weight)


def weigh_part(
    run_root: str,
    index: int,
    marginals: list[str],
    values: list[pa.Array],
    scaling: Scaling,
    soft: SoftLabels | None = None,
) -> dict[str, Any]:
    """Write ``weights/part-<index>``: ``key``, ``weight`` from ``scaling``, the marginal columns and, with
    ``soft``, ``soft_clusters`` (list<int32>[k]) and ``soft_probs`` (list<float32>[k], by decreasing
    probability); returns the part summary. Idempotent."""
    out_dir = join(run_root, "weights")
    done = part_summary(out_dir, index)
    if done is not None:
        return done
    labels = load_labels(run_root, index, marginals)
    weights = scaling.weights(encode_labels(labels, marginals, values))
    table = pa.table({"key": labels.column("key"), "weight": pa.array(weights, pa.float64())})
    for m in marginals:
        table = table.append_column(m, labels.column(m))
    if DUP_GROUP in marginals:  # the row's group (its label in the scaling is the group's size)
        group = read_part(join(run_root, "assignments"), index, columns=["dup_group"]).column("dup_group")
        table = table.set_column(table.schema.get_field_index(DUP_GROUP), DUP_GROUP, group)
    if soft is not None:
        idx, probs = soft_codes(run_root, index, soft)
        k = soft.top_k
        table = table.append_column(
            "soft_clusters", pa.FixedSizeListArray.from_arrays(pa.array(idx.reshape(-1), pa.int32()), k)
        )
        table = table.append_column(
            "soft_probs", pa.FixedSizeListArray.from_arrays(pa.array(probs.reshape(-1), pa.float32()), k)
        )
    write_part(out_dir, index, table, {})
    return {"rows": table.num_rows}


def _weigh(run_root: str, index: int, what: tuple) -> dict[str, Any]:
    return weigh_part(run_root, index, *what)


def write_weights(
    root: str,
    indices: list[int],
    marginals: list[str],
    values: list[pa.Array],
    scaling: Scaling,
    soft: SoftLabels | None,
    workers: int,
) -> None:
    """Write every part's weights (:func:`weigh_part`) on a pool of ``workers`` actors."""
    write = ray.put((marginals, values, scaling, soft))
    with ActorPool(ShardWorker, workers) as pool:
        pool.map("call", [(_weigh, root, i, write) for i in indices], "weights")
