"""Balance step 1: survey the parts' labels, choose the IPF path, build the targets.

The pool reads every part's marginal columns and returns its label counts per marginal and, when small,
its table of distinct label tuples (cells). The driver merges the labels of each marginal (sorted values;
a label's code is its position), chooses the path (``balance.path``; ``auto``: the cell path while the
parts hold at most ``balance.max_cells`` cells in all, a bound on the merged table) and computes each
marginal's target from its counts (:func:`rebalance.kernels.targets.target_marginal`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rebalance.data.fs import join
from rebalance.data.parts import read_part
from rebalance.kernels.targets import UnknownValuesError, target_marginal
from rebalance.runtime.pool import ActorPool, ShardWorker
from rebalance.spec import CONCEPT_MARGINALS, DUP_GROUP, BalanceSpec, Target, cluster_marginal
from rebalance.stages.concept_labels import concept_keep, concept_label

__all__ = [
    "BalanceError",
    "CellTable",
    "Survey",
    "count_cells",
    "dup_base",
    "encode_labels",
    "group_mass",
    "marginal_order",
    "load_labels",
    "survey",
    "survey_part",
    "targets_for",
]

MISSING_LABEL = "<missing>"
COUNT = "count_all"


class BalanceError(RuntimeError):
    """The targets cannot be met (missing mass, or no convergence within max_iter)."""


def load_labels(run_root: str, index: int, marginals: list[str]) -> pa.Table:
    """The marginal columns of part ``index``: cluster labels from ``assignments/``, concept labels from
    ``concepts/`` (``zero_shot``; ``concept``: the row's keep probability, :func:`concept_label`), carried
    columns (as strings, nulls as ``<missing>``) from ``embeddings/``, plus ``key``. ``dup_group``'s label is
    the size of the row's near-duplicate group (``dup_size``, as a string): its weight factor depends on that
    alone."""
    clusters = [m for m in marginals if cluster_marginal(m) is not None]
    carried = [
        m for m in marginals if cluster_marginal(m) is None and m != DUP_GROUP and m not in CONCEPT_MARGINALS
    ]
    table = read_part(join(run_root, "assignments"), index, columns=["key", *clusters])
    if DUP_GROUP in marginals:
        sizes = read_part(join(run_root, "assignments"), index, columns=["dup_size"]).column("dup_size")
        table = table.append_column(DUP_GROUP, pc.cast(sizes, pa.string()))
    if "zero_shot" in marginals:
        zero_shot = read_part(join(run_root, "concepts"), index, columns=["zero_shot"]).column("zero_shot")
        table = table.append_column("zero_shot", zero_shot)
    if "concept" in marginals:
        table = table.append_column("concept", concept_label(concept_keep(run_root, index)))
    if carried:
        emb = read_part(join(run_root, "embeddings"), index, columns=carried)
        for name in carried:
            values = pc.fill_null(pc.cast(emb.column(name), pa.string()), MISSING_LABEL)
            table = table.append_column(name, values)
    return table


def count_cells(run_root: str, index: int, marginals: list[str]) -> pa.Table:
    """Rows per distinct label tuple in one part: the marginal columns plus ``count_all``."""
    return load_labels(run_root, index, marginals).group_by(marginals).aggregate([([], COUNT)])


def survey_part(run_root: str, index: int, marginals: list[str], max_cells: int) -> dict[str, Any]:
    """One part's label counts per marginal (``values``: one table of value, ``count_all`` per marginal),
    its number of distinct cells, and its cell table (:func:`count_cells`) when that has at most
    ``max_cells`` rows (else None)."""
    labels = load_labels(run_root, index, marginals)
    cells = labels.group_by(marginals).aggregate([([], COUNT)])
    return {
        "values": [labels.group_by(m).aggregate([([], COUNT)]) for m in marginals],
        "n_cells": cells.num_rows,
        "cells": cells if cells.num_rows <= max_cells else None,
    }


def encode_labels(table: pa.Table, marginals: list[str], values: list[pa.Array]) -> np.ndarray:
    """Codes (n, M) int64 of the marginal columns of ``table``: each label's position in its marginal's
    sorted ``values`` (every label must be among them)."""
    columns = [
        pc.index_in(table.column(m), value_set=v).to_numpy(zero_copy_only=False)
        for m, v in zip(marginals, values, strict=True)
    ]
    return np.stack(columns, axis=1).astype(np.int64) if columns else np.zeros((table.num_rows, 0), np.int64)


class CellTable:
    """The distinct cells of the whole dataset: codes (C, M) int64 label codes, counts (C,) rows per cell."""

    def __init__(self, counts: pa.Table, marginals: list[str], values: list[pa.Array]):
        merged = counts.group_by(marginals).aggregate([(COUNT, "sum")])
        self.codes = encode_labels(merged, marginals, values)
        self.counts = merged.column(f"{COUNT}_sum").to_numpy().astype(np.float64)


@dataclass
class Survey:
    """What the survey found: the path and why, each marginal's sorted ``values`` and rows per value
    (``counts``), and on the cell path every part's cell table (``cell_counts``; None on the row path)."""

    path: str
    reason: str
    values: list[pa.Array]
    counts: list[np.ndarray]
    cell_counts: list[pa.Table] | None

    @property
    def rows(self) -> float:
        return float(self.counts[0].sum())

    def cells(self, marginals: list[str]) -> CellTable:
        """The merged cell table (cell path only)."""
        return CellTable(pa.concat_tables(self.cell_counts), marginals, self.values)


def survey(root: str, indices: list[int], spec: BalanceSpec, workers: int) -> Survey:
    """Survey every part's labels on a pool of ``workers`` actors, choose the path and, on the cell path,
    gather every part's cell table (counting again the parts whose table was too large to return).

    The parts' label counts are folded as they come, so the driver holds each marginal's values once,
    plus the cell tables (at most ``balance.max_cells`` rows in all)."""
    marginals = marginal_order(spec)
    with ActorPool(ShardWorker, workers) as pool:
        per_part = max(1, spec.max_cells // len(indices))
        values: list[pa.Table] | None = None
        cell_counts: list[pa.Table | None] = []
        n_cells = 0
        jobs = [(survey_part, root, i, marginals, per_part) for i in indices]
        for found in pool.imap("call", jobs, "survey labels"):
            values = found["values"] if values is None else [
                _sum_counts(pa.concat_tables([a, b]), m)
                for a, b, m in zip(values, found["values"], marginals, strict=True)
            ]  # fmt: skip
            n_cells += found["n_cells"]
            cell_counts.append(found["cells"] if n_cells <= spec.max_cells else None)
        path, reason = choose_path(spec, n_cells)
        if path == "cell" and any(c is None for c in cell_counts):
            cell_counts = pool.map(
                "call", [(count_cells, root, i, marginals) for i in indices], "count cells"
            )
    merged = [_sum_counts(v, m).sort_by(m) for v, m in zip(values, marginals, strict=True)]
    counts = [v.column(COUNT).to_numpy().astype(np.float64) for v in merged]
    return Survey(path, reason, [v.column(m).combine_chunks() for v, m in zip(merged, marginals, strict=True)],
                  counts, cell_counts if path == "cell" else None)  # fmt: skip


def _sum_counts(table: pa.Table, marginal: str) -> pa.Table:
    """Rows per value of ``marginal`` in a table of (value, ``count_all``) rows, values repeated."""
    summed = table.group_by(marginal).aggregate([(COUNT, "sum")])
    return pa.table({marginal: summed[marginal], COUNT: summed[f"{COUNT}_sum"]})


def choose_path(spec: BalanceSpec, bound: int) -> tuple[str, str]:
    """The IPF path (``cell`` or ``rows``) and the reason, from ``balance.path`` and the number of cells
    the parts hold in all (``bound``: each part's distinct label tuples, summed)."""
    if spec.path != "auto":
        return spec.path, f"balance.path: {spec.path}"
    if bound <= spec.max_cells:
        return "cell", f"the parts hold {bound} cells in all <= balance.max_cells = {spec.max_cells}"
    return "rows", f"the parts hold {bound} cells in all > balance.max_cells = {spec.max_cells}"


def targets_for(
    values: list[pa.Array], counts: list[np.ndarray], marginals: list[str], spec: BalanceSpec
) -> list[np.ndarray]:
    """The target distribution of each marginal, from its observed counts and its target spec; the
    ``concept`` marginal's (labels: keep probabilities p) is ``keep_probability``, count_p * p normalised,
    so that balanced on its own a row's weight is p / mean(p)."""
    out = []
    for name, v, c in zip(marginals, values, counts, strict=True):
        names = [str(x) for x in v.to_pylist()]
        if name == "concept":
            if not (c * np.array([float(x) for x in names])).sum() > 0:
                raise BalanceError(
                    "balance marginal 'concept': every row has keep probability 0 (the vocabulary matches "
                    "no row and concepts.unmatched is drop)"
                )
            out.append(target_marginal(c, "keep_probability", values=names))
            continue
        if name == DUP_GROUP:
            out.append(
                dup_target(np.array([int(x) for x in v.to_pylist()], np.float64), c, spec.target_for(name))
            )
            continue
        try:
            out.append(target_marginal(c, spec.target_for(name), values=names))
        except UnknownValuesError as err:
            raise BalanceError(
                f"balance target of marginal {name!r} puts positive weight on values with no rows "
                f"(missing mass): {err.values[:20]}"
            ) from None
    return out


def marginal_order(spec: BalanceSpec) -> list[str]:
    """The marginals as the stage holds them: ``dup_group`` (a fixed factor, not fitted) last."""
    return [m for m in spec.marginals if m != DUP_GROUP] + [m for m in spec.marginals if m == DUP_GROUP]


def group_mass(sizes: np.ndarray, target: Target) -> np.ndarray:
    """The mass g(s) a near-duplicate group of s rows gets under ``target``, up to a common factor: the
    target applied to the group sizes, 1 for uniform (one unit per group), s^a for {power: a} (a = 1
    ignores the groups), min(s, t) for {cap: t}."""
    return target_marginal(sizes, target)


def dup_target(sizes: np.ndarray, rows: np.ndarray, target: Target) -> np.ndarray:
    """The share of the mass that goes to the groups of each size: (K,) for group sizes ``sizes`` (K,) with
    ``rows`` (K,) rows in all, n_s = rows / s groups of g(s) each (:func:`group_mass`), normalised."""
    mass = rows / sizes * group_mass(sizes, target)
    return mass / mass.sum()


def dup_base(spec: BalanceSpec, values: list[pa.Array], marginals: list[str]) -> np.ndarray | None:
    """The fixed log factor log(g(s) / s) of every group size s of ``dup_group`` (the last marginal), or
    None without it: a group's rows then start with g(s) in all (:func:`group_mass`)."""
    if DUP_GROUP not in marginals:
        return None
    group_sizes = np.array([int(x) for x in values[-1].to_pylist()], np.float64)
    return np.log(group_mass(group_sizes, spec.target_for(DUP_GROUP)) / group_sizes)
