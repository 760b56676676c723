"""Balance stage: IPF over the joint measure of the marginals, turned into per-row weights.

1. Survey: the pool reads every part's marginal columns and returns its label counts per marginal and,
   when small, its table of distinct label tuples (cells). The driver merges the labels of each marginal
   (sorted values; a label's code is its position) and builds the targets.
2. IPF, by one of two paths that compute the same iteration (:mod:`rebalance.kernels.ipf`):
   - cell path: the driver merges the cell counts and runs :func:`~rebalance.kernels.ipf.ipf` on them;
   - row path: actors keep their parts' label codes and masses in memory (:class:`ResidentParts`) and the
     driver reduces the next marginal's per-label sums after every step
     (:func:`~rebalance.kernels.ipf.ipf_driver`), for more cells than one process should hold.
   ``balance.path: auto`` takes the cell path while the parts hold at most ``balance.max_cells`` cells in
   all (a bound on the merged table); ``balance.json`` records the path taken and why.
3. Both paths end in the same scaling: per-label log factors and a log normaliser, from which a row's
   weight (mean 1 over all rows) is exp(sum_m f_m(l_m) - L), optionally capped at ``max_weight`` with the
   mean kept at 1. Diagnostics (ESS, histogram, balanced marginals, joint count tables) are additive
   reductions over the cells or the resident rows (:class:`~rebalance.kernels.stats.WeightMoments`).
4. Optional soft labels (``balance.soft``): a distributed log-domain Sinkhorn on every row's scores
   against its side's centroids, the column marginal reduced each iteration; each row keeps its top-k
   balanced codes.
5. The pool writes ``weights/part-NNNNN.parquet`` (``key``, ``weight`` float64, the marginal columns, and
   ``soft_clusters``/``soft_probs`` with ``balance.soft``) from the scaling.
``balance.json`` records targets, the marginal error per iteration, convergence, ESS and the largest
weight, and is written before a failure is raised, so a failed run still explains itself.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import operator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from rebalance.data.atomic import atomic_write_json
from rebalance.data.fs import join, read_npy
from rebalance.data.parts import part_summary, read_part, write_part
from rebalance.data.readers import vector_matrix
from rebalance.kernels.ipf import (
    MissingMassError,
    apply_ratio_and_sum,
    clip_scale,
    ipf,
    ipf_driver,
    prepare_codes,
    row_weights,
)
from rebalance.kernels.sinkhorn import (
    soft_sinkhorn_codes,
    soft_sinkhorn_driver,
    soft_sinkhorn_kernel,
    soft_sinkhorn_partial,
    top_k_codes,
)
from rebalance.kernels.spectra import balanced_variance_factor, joint_singular_values
from rebalance.kernels.stats import WeightMoments, weight_moments
from rebalance.kernels.targets import target_marginal
from rebalance.runtime.pool import ActorPool, ShardWorker
from rebalance.runtime.resident import ResidentParts
from rebalance.spec import BalanceSpec, SoftSpec, cluster_marginal
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

MISSING_LABEL = "<missing>"
COUNT = "count_all"
MAX_JOINT_TABLE = 4_000_000  # cells of a dense pair table whose SVD the driver computes
HISTOGRAM_BINS = 40


class BalanceError(RuntimeError):
    """The targets cannot be met (missing mass, or no convergence within max_iter)."""


def load_labels(run_root: str, index: int, marginals: list[str]) -> pa.Table:
    """The marginal columns of part ``index``: cluster labels from ``assignments/``, carried columns (as
    strings, nulls as ``<missing>``) from ``embeddings/``, plus ``key``."""
    clusters = [m for m in marginals if cluster_marginal(m) is not None]
    carried = [m for m in marginals if cluster_marginal(m) is None]
    table = read_part(join(run_root, "assignments"), index, columns=["key", *clusters])
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


@dataclass(frozen=True)
class Scaling:
    """What turns a row's labels into its weight: exp(sum_m log_factors[m][l_m] - log_normalizer), mean 1
    over all rows (-inf factors: target 0), then min(clip * w, max_weight) when ``max_weight`` is set."""

    log_factors: list[np.ndarray]
    log_normalizer: float
    clip: float = 1.0
    max_weight: float | None = None

    def weights(self, codes: np.ndarray) -> np.ndarray:
        """Weights (n,) of rows with label codes (n, M)."""
        w = row_weights(codes, self.log_factors, self.log_normalizer)
        return w if self.max_weight is None else np.minimum(self.clip * w, self.max_weight)


class Labelled(NamedTuple):
    """Rows (or cells, each ``counts`` rows) with their label codes and, on the row path, IPF masses."""

    codes: np.ndarray
    counts: np.ndarray | None
    mass: np.ndarray | None = None


class _Local:
    """The cell table as a single part with the interface of :class:`ResidentParts`."""

    def __init__(self, state: Labelled):
        self.state = state

    def reduce(self, fn: Any, *args: Any, combine: Any = np.add) -> Any:
        return fn(self.state, *args)

    def __enter__(self) -> _Local:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _load_rows(
    run_root: str, index: int, marginals: list[str], values: list[pa.Array], n_rows: int
) -> Labelled:
    codes = prepare_codes(encode_labels(load_labels(run_root, index, marginals), marginals, values))
    return Labelled(codes, None, np.full(codes.shape[0], 1.0 / n_rows))


def _row_step(
    state: Labelled, m: int | None, ratio: np.ndarray | None, next_m: int, k_next: int
) -> np.ndarray:
    return apply_ratio_and_sum(state.codes, state.mass, m, ratio, next_m, k_next)


def _above(state: Labelled, scaling: Scaling, threshold: float) -> np.ndarray:
    """(free mass sum_{w <= t} c w, rows with w > t) for :func:`clip_scale`."""
    w = scaling.weights(state.codes)
    c = np.ones_like(w) if state.counts is None else state.counts
    free = w <= threshold
    return np.array([(c * w)[free].sum(), c[~free].sum()])


def _moments(
    state: Labelled, scaling: Scaling, sizes: list[int], pairs: list[tuple[int, int]]
) -> WeightMoments:
    return weight_moments(state.codes, scaling.weights(state.codes), sizes, counts=state.counts, pairs=pairs)


def _log_histogram(state: Labelled, scaling: Scaling, edges: np.ndarray) -> np.ndarray:
    """Rows per bin of log10(max(w, 1e-12)) over ``edges``."""
    w = np.log10(np.maximum(scaling.weights(state.codes), 1e-12))
    return np.histogram(w, bins=edges, weights=state.counts)[0].astype(np.float64)


def targets_for(
    values: list[pa.Array], counts: list[np.ndarray], marginals: list[str], spec: BalanceSpec
) -> list[np.ndarray]:
    """The target distribution of each marginal, from its observed counts and its target spec."""
    out = []
    for name, v, c in zip(marginals, values, counts, strict=True):
        t = spec.target_for(name)
        names = [str(x) for x in v.to_pylist()]
        out.append(target_marginal(c, t.kind, power=t.power, cap=t.cap, weights=t.weights, values=names))
        if t.kind == "weights":
            unknown = sorted(set(t.weights) - set(names))
            if any(t.weights[x] > 0 for x in unknown):
                raise BalanceError(
                    f"balance target of marginal {name!r} puts positive weight on values with no rows "
                    f"(missing mass): {unknown[:20]}"
                )
    return out


def _merge_values(surveys: list[dict], marginals: list[str]) -> tuple[list[pa.Array], list[np.ndarray]]:
    """Each marginal's sorted distinct values and its rows per value, merged over the parts' surveys."""
    values, counts = [], []
    for i, m in enumerate(marginals):
        merged = pa.concat_tables([s["values"][i] for s in surveys]).group_by(m).aggregate([(COUNT, "sum")])
        merged = merged.sort_by(m)
        values.append(merged.column(m).combine_chunks())
        counts.append(merged.column(f"{COUNT}_sum").to_numpy().astype(np.float64))
    return values, counts


def _choose_path(spec: BalanceSpec, surveys: list[dict]) -> tuple[str, str]:
    bound = sum(s["n_cells"] for s in surveys)
    if spec.path != "auto":
        return spec.path, f"balance.path: {spec.path}"
    if bound <= spec.max_cells:
        return "cell", f"the parts hold {bound} cells in all <= balance.max_cells = {spec.max_cells}"
    return "rows", f"the parts hold {bound} cells in all > balance.max_cells = {spec.max_cells}"


def run_balance(ctx: StageContext) -> dict[str, Any]:
    """Balance the joint measure and write per-row weights; returns the stage summary."""
    spec = ctx.spec.balance
    marginals = list(spec.marginals)
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
    with ActorPool(ShardWorker, workers) as pool:
        per_part = max(1, spec.max_cells // len(indices))
        surveys = pool.map(
            "call", [(survey_part, root, i, marginals, per_part) for i in indices], "survey labels"
        )
        path, reason = _choose_path(spec, surveys)
        cell_counts = None
        if path == "cell":
            cell_counts = [s["cells"] for s in surveys]
            if any(c is None for c in cell_counts):
                cell_counts = pool.map(
                    "call", [(count_cells, root, i, marginals) for i in indices], "count cells"
                )
    values, counts = _merge_values(surveys, marginals)
    n_rows = float(counts[0].sum())
    record: dict[str, Any] = {
        "path": path,
        "path_reason": reason,
        "marginals": marginals,
        "targets": {m: spec.target_for(m).to_dict() for m in marginals},
        "iterations": spec.iterations,
        "tol": spec.tol,
        "max_iter": spec.max_iter,
        "cells": None,
        "rows": int(n_rows),
    }
    log.info("balance: IPF on the %s path over %s (%s)", path, marginals, reason)
    try:
        targets = targets_for(values, counts, marginals, spec)
        if cell_counts is not None:
            cells = CellTable(pa.concat_tables(cell_counts), marginals, values)
            record["cells"] = int(len(cells.counts))
            with _Local(Labelled(cells.codes, cells.counts)) as parts:
                scaling = _balance(parts, spec, values, counts, targets, record)
        else:
            items = [(root, i, marginals, values, n_rows) for i in indices]
            with ResidentParts(_load_rows, items, workers) as parts:
                scaling = _balance(parts, spec, values, counts, targets, record)
    except BalanceError as err:
        atomic_write_json({**record, "converged": False, "error": str(err)}, ctx.run.path("balance.json"))
        raise
    if not record["converged"] and spec.iterations == "auto":
        if not spec.allow_partial:
            atomic_write_json(record, ctx.run.path("balance.json"))
            raise BalanceError(record["error"] + ". Set balance.allow_partial: true to keep these weights.")
        log.warning("%s (allow_partial: weights kept)", record["error"])
    soft = None
    if spec.soft is not None:
        soft, record["soft"] = _soft_labels(ctx, spec)
    write = ray.put((marginals, values, scaling, soft))
    with ActorPool(ShardWorker, workers) as pool:
        pool.map("call", [(_weigh, root, i, write) for i in indices], "weights")
    atomic_write_json(record, ctx.run.path("balance.json"))
    return {
        "path": path,
        **{k: record[k] for k in ("cells", "passes", "converged", "ess", "max_weight_value")},
    }


def _balance(
    parts: _Local | ResidentParts,
    spec: BalanceSpec,
    values: list[pa.Array],
    counts: list[np.ndarray],
    targets: list[np.ndarray],
    record: dict[str, Any],
) -> Scaling:
    """IPF on either path, then the clipping scale and the diagnostics, all added to ``record``."""
    marginals = list(spec.marginals)
    sizes = [len(v) for v in values]
    n_rows = float(counts[0].sum())
    iterations = None if spec.iterations == "auto" else spec.iterations
    try:
        if isinstance(parts, _Local):
            result = ipf(
                parts.state.codes,
                parts.state.counts,
                targets,
                iterations=iterations,
                tol=spec.tol,
                max_iter=spec.max_iter,
                omega=spec.overrelaxation,
            )
        else:

            def step(m: int | None, ratio: np.ndarray | None, next_m: int) -> np.ndarray:
                return parts.reduce(_row_step, m, ratio, next_m, sizes[next_m])

            result = ipf_driver(
                step,
                counts,
                targets,
                iterations=iterations,
                tol=spec.tol,
                max_iter=spec.max_iter,
                omega=spec.overrelaxation,
            )
    except MissingMassError as err:
        labels = values[err.marginal].take(pa.array(err.labels)).to_pylist()
        raise BalanceError(
            f"balance target of marginal {marginals[err.marginal]!r} is positive on values with "
            f"no rows (missing mass): {labels[:20]}"
        ) from None
    record.update(
        passes=result.passes,
        converged=result.converged,
        marginal_error_per_iteration=[dict(zip(marginals, e.tolist(), strict=True)) for e in result.errors],
        final_marginal_error=dict(zip(marginals, result.errors[-1].tolist(), strict=True)),
        overrelaxation=spec.overrelaxation,
        omega_per_iteration=result.omegas.tolist(),
    )
    omega = float(result.omegas.max()) if result.passes else 1.0
    log.info(
        "balance: %d passes (%s), largest marginal error %.3e, %s",
        result.passes,
        f"over-relaxed, omega up to {omega:.3f}" if omega > 1 else "plain",
        result.final_error,
        "converged" if result.converged else "not converged",
    )
    if not result.converged and iterations is None:
        worst = [
            f"{marginals[w['marginal']]}: "
            + ", ".join(
                f"{values[w['marginal']][lab].as_py()!r} ({gap:+.2e})"
                for lab, gap in zip(w["labels"], w["gap"], strict=True)
            )
            for w in result.worst
        ]
        record["error"] = (
            f"IPF did not reach tol={spec.tol} in {result.passes} iterations (largest marginal error "
            f"{result.final_error:.3e}); the targets may be incompatible with the data's structural zeros. "
            f"Farthest values per marginal: {'; '.join(worst)}"
        )
    scaling = Scaling(result.log_factors, result.log_normalizer)
    record["scaling"] = {
        "marginals": marginals,
        "values": {m: [str(v) for v in values[i].to_pylist()] for i, m in enumerate(marginals)},
        "log_factors": {
            m: [float(f) if np.isfinite(f) else None for f in result.log_factors[i]]
            for i, m in enumerate(marginals)
        },
        "log_normalizer": result.log_normalizer,
        "clip": None,
    }
    if spec.max_weight is not None:
        unclipped = scaling
        clip = clip_scale(lambda t: tuple(parts.reduce(_above, unclipped, t)), n_rows, spec.max_weight)
        scaling = dataclasses.replace(unclipped, clip=clip, max_weight=spec.max_weight)
        record["scaling"]["clip"] = {"scale": clip, "max_weight": spec.max_weight}
    pairs = [
        (a, b)
        for a in range(len(sizes))
        for b in range(a + 1, len(sizes))
        if sizes[a] * sizes[b] <= MAX_JOINT_TABLE
    ]
    moments = parts.reduce(_moments, scaling, sizes, pairs, combine=operator.add)
    lo, hi = np.log10(max(moments.smallest, 1e-12)), np.log10(max(moments.largest, 1e-12))
    edges = np.histogram_bin_edges(np.array([lo, hi]), bins=HISTOGRAM_BINS)
    histogram = parts.reduce(_log_histogram, scaling, edges)
    if spec.max_weight is not None:
        record["clipping"] = {
            "max_weight": spec.max_weight,
            "marginal_error_after_clipping": {
                m: float(0.5 * np.abs(moments.balanced[i] / n_rows - targets[i]).sum())
                for i, m in enumerate(marginals)
            },
        }
    record.update(_weight_summary(moments, histogram, edges, marginals, values, targets))
    record["joint"] = _joint_diagnostics(moments, marginals, sizes, result.passes)
    return scaling


@dataclass
class SoftLabels:
    """What a writer needs to give rows their soft labels: codes = softmax(x C^T / T + log_v), top k."""

    side: str
    centroids: np.ndarray
    temperature: float
    log_v: np.ndarray
    top_k: int


def _part_scores(run_root: str, index: int, side: str, centroids: np.ndarray) -> np.ndarray:
    """Cosine scores S = x C^T (n, K), float64, of part ``index``'s L2-normalised ``side`` embeddings x
    against the (K, d) centroids C."""
    table = read_part(join(run_root, "embeddings"), index, columns=[side])
    return vector_matrix(table.column(side).combine_chunks()).astype(np.float64) @ centroids.T


def _load_scores(run_root: str, index: int, side: str, centroids: np.ndarray, temperature: float) -> tuple:
    scores = _part_scores(run_root, index, side, centroids)
    return scores, soft_sinkhorn_kernel(scores, temperature)


def _soft_partial(state: tuple, log_v: np.ndarray | None, temperature: float) -> np.ndarray:
    scores, kernel = state
    return soft_sinkhorn_partial(scores, log_v, temperature, kernel=kernel)


def _soft_labels(ctx: StageContext, spec: BalanceSpec) -> tuple[SoftLabels, dict[str, Any]]:
    """Run the distributed soft Sinkhorn of ``balance.soft``. Its column marginal is the balance target of
    ``<side>_cluster`` (``balance.targets`` or ``balance.target``) applied to the cluster sizes."""
    soft: SoftSpec = spec.soft
    centroids = read_npy(ctx.run.path("clusters") / f"{soft.side}_centroids.npy").astype(np.float64)
    k = centroids.shape[0]
    if soft.top_k > k:
        raise BalanceError(f"balance.soft.top_k = {soft.top_k} exceeds the {k} {soft.side} clusters")
    info = json.loads(ctx.run.path("clusters", "clusters.json").read_text())
    sizes = np.asarray(info[soft.side]["sizes"], dtype=np.float64)
    t = spec.target_for(f"{soft.side}_cluster")
    pi = target_marginal(
        sizes, t.kind, power=t.power, cap=t.cap, weights=t.weights, values=[str(i) for i in range(k)]
    )
    root = str(ctx.run.root)
    items = [(root, s.index, soft.side, centroids, soft.temperature) for s in ctx.shards]
    iterations = None if soft.iterations == "auto" else soft.iterations
    with ResidentParts(_load_scores, items, ctx.workers(len(items))) as parts:
        result = soft_sinkhorn_driver(
            lambda log_v: parts.reduce(_soft_partial, log_v, soft.temperature, combine=np.logaddexp),
            int(sizes.sum()),
            pi,
            soft.temperature,
            iterations,
            tol=spec.tol,
            max_iter=spec.max_iter,
        )
    labels = SoftLabels(soft.side, centroids, soft.temperature, result.log_v, soft.top_k)
    record = {
        "side": soft.side,
        "temperature": soft.temperature,
        "iterations": soft.iterations,
        "top_k": soft.top_k,
        "passes": result.iterations,
        "converged": result.converged,
        "column_error_per_iteration": result.errors.tolist(),
        "column_marginal": pi.tolist(),
        "log_v": [float(v) if np.isfinite(v) else None for v in result.log_v],
    }
    return labels, record


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
    if soft is not None:
        scores = _part_scores(run_root, index, soft.side, soft.centroids)
        idx, probs = top_k_codes(soft_sinkhorn_codes(scores, soft.log_v, soft.temperature), soft.top_k)
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
