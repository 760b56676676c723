"""Report stage: imbalance statistics, covariance spectra and spectral scores, before and after balancing.

1. Counts: per-marginal statistics derive from ``balance.json``, which holds the exact per-label counts
   before and after balancing, and ``clusters/clusters.json``.
2. Spectra: for every group column of ``report.spectra_by`` and every embedding side, the pool streams the
   parts and accumulates per-group moments (:class:`~rebalance.kernels.spectra.GroupMoments`, float64),
   unweighted ("before") and weighted by the balance weights ("after"). When G d^2 float64 values exceed
   the memory budget, a per-group bottom-r sample (:class:`~rebalance.kernels.spectra.GroupSample`) is kept
   instead and the report says so. The groups are cut into contiguous partitions of at most
   ``SPECTRA_PARTITION_BYTES`` of accumulator each; a map call puts one accumulator per (part, partition)
   in the object store, and a reduce call per partition merges that partition over the parts (in part
   order) and returns its eigenvalues. The driver receives spectra, O(G d), never a covariance; no process
   holds more than one partition's accumulators besides its shard.
3. Truth alignment (``report.truth``): per side and cluster level, the contingency table of clusters
   against the carried ground-truth column, reduced over the parts, and its scores
   (:func:`rebalance.kernels.alignment.alignment_scores`: NMI, purity, the spread of every true label).
4. Joint diagnostics: the singular values of the normalised joint counts of every pair of marginals and
   the variance they predict for balanced estimates (computed by the balance stage).
5. Concept cards (:mod:`rebalance.stages.concepts`): per concept its sizes, weights, central and random
   rows read back from the input as thumbnails and captions, and a 2-D map of a bounded sample.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from rebalance.data.atomic import atomic_write_json
from rebalance.data.fs import join, read_table
from rebalance.data.parts import list_parts, read_part
from rebalance.kernels.alignment import alignment_scores, truth_shares
from rebalance.kernels.sampling import key_priorities
from rebalance.kernels.spectra import GroupMoments, GroupSample, spectral_scores
from rebalance.kernels.stats import imbalance_stats
from rebalance.runtime.manifest import RunDir
from rebalance.runtime.pool import MAX_RESTARTS, ActorPool, ShardWorker
from rebalance.spec import Spec, cluster_marginal
from rebalance.stages.concepts import compute_concepts
from rebalance.stages.context import StageContext

__all__ = [
    "build_report",
    "run_report",
    "part_accumulators",
    "reduce_spectra",
    "REPORT_SCHEMA_VERSION",
    "SPECTRA_BUDGET_BYTES",
    "SPECTRA_PARTITION_BYTES",
]

log = logging.getLogger(__name__)

REPORT_SCHEMA_VERSION = 2
SPECTRA_BUDGET_BYTES = 256 * 2**20  # per accumulator (one group column, one side, before or after)
SPECTRA_PARTITION_BYTES = 64 * 2**20  # accumulator bytes of one group partition (one reduce call)
SQS_QUANTILE = 0.5


def _group_vocab(run: RunDir, column: str) -> list[str] | None:
    """Sorted values (as strings, null as ``<missing>``) of a carried group column, None for clusters: from
    balance.json when the column is a balance marginal, else read from the embeddings parts (that column
    only)."""
    if cluster_marginal(column) is not None:
        return None
    balance = json.loads(run.path("balance.json").read_text())
    dist = balance["marginal_distributions"].get(column)
    if dist:
        return dist["values"]
    values: set[str] = set()
    for path in list_parts(run.path("embeddings")):
        column_values = read_table(path, columns=[column]).column(column)
        values.update(pc.unique(pc.fill_null(pc.cast(column_values, pa.string()), "<missing>")).to_pylist())
    return sorted(values)


def part_accumulators(
    run_root: str, index: int, plan: list[dict[str, Any]], sample_seed: int
) -> Iterator[tuple[tuple[str, str, str, int], GroupMoments | GroupSample]]:
    """Per-group moments (or samples) of one part, one group partition at a time: yields
    ((column, side, phase, partition), accumulator of that partition's groups, numbered from its start)."""
    sides = sorted({item["side"] for item in plan})
    carried = sorted({item["column"] for item in plan if item["vocab"] is not None})
    emb = read_part(join(run_root, "embeddings"), index, columns=["key", *sides, *carried])
    assignments = read_part(join(run_root, "assignments"), index)
    weights = read_part(join(run_root, "weights"), index, columns=["weight"]).column("weight").to_numpy()
    priorities = key_priorities(emb.column("key").to_pylist(), sample_seed)
    for item in plan:
        column, side = item["column"], item["side"]
        if emb.num_rows:
            vectors = emb.column(side).combine_chunks()
            x = vectors.flatten().to_numpy().reshape(len(vectors), vectors.type.list_size)
        else:
            x = np.zeros((0, item["d"]), np.float32)
        if item["vocab"] is None:
            groups = assignments.column(column).to_numpy().astype(np.int64)
        else:  # every value is in the vocabulary: it comes from this run's balance counts
            values = pc.fill_null(pc.cast(emb.column(column), pa.string()), "<missing>")
            groups = pc.index_in(values, value_set=pa.array(item["vocab"])).to_numpy(zero_copy_only=False)
            groups = groups.astype(np.int64)
        for p, (lo, hi) in enumerate(item["partitions"]):
            rows = np.flatnonzero((groups >= lo) & (groups < hi))
            xp, gp, up = x[rows], groups[rows] - lo, priorities[rows]
            for phase, w in (("before", None), ("after", weights[rows])):
                if item["method"] == "moments":
                    acc = GroupMoments.from_batch(xp, gp, hi - lo, w)
                else:
                    acc = GroupSample.from_batch(xp, gp, hi - lo, item["r"], up, w)
                yield (column, side, phase, p), acc


def _put_parts(run_root: str, indices: list[int], plan: list[dict[str, Any]], sample_seed: int) -> dict:
    """Map call: every partition accumulator of a run of parts, merged in part order, put in the object
    store (this actor owns them). One call per actor, so the store holds A sets of accumulators, not M."""
    merged: dict[tuple, GroupMoments | GroupSample] = {}
    for index in indices:
        for key, acc in part_accumulators(run_root, index, plan, sample_seed):
            merged[key] = merged[key].merge(acc) if key in merged else acc
    return {key: ray.put(acc) for key, acc in merged.items()}


def reduce_spectra(accumulators: list[GroupMoments | GroupSample | ray.ObjectRef]) -> dict[str, np.ndarray]:
    """Reduce call: merge one partition's accumulators (objects or references, fetched one at a time) in
    the order given, and return its spectra: ``eigs`` (G_p, d) descending, ``traces``, ``count`` and
    ``valid`` (G_p,)."""
    acc = None
    for item in accumulators:
        part = ray.get(item) if isinstance(item, ray.ObjectRef) else item
        acc = part if acc is None else acc.merge(part)
    eigs, traces = acc.spectra()
    return {"eigs": eigs, "traces": traces, "count": acc.count, "valid": acc.valid}


def _plan(ctx: StageContext) -> list[dict[str, Any]]:
    clusters = json.loads(ctx.run.path("clusters", "clusters.json").read_text())
    plan = []
    for column in ctx.spec.report.spectra_by:
        cluster = cluster_marginal(column)
        vocab = _group_vocab(ctx.run, column)
        # a carried column or joint_cluster groups the vectors of every side; image/text_cluster its own
        sides = [cluster[0]] if cluster is not None and cluster[0] in ctx.sides else ctx.sides
        for side in sides:
            d = clusters[side]["d"]
            info = clusters[cluster[0]] if cluster is not None else None
            n_groups = len(vocab) if vocab is not None else (info["k"] if cluster[1] == 0 else
                                                              info["levels"][cluster[1] - 1]["k"])  # fmt: skip
            item = {"column": column, "side": side, "groups": n_groups, "d": d, "vocab": vocab}
            if GroupMoments.nbytes_for(n_groups, d) <= SPECTRA_BUDGET_BYTES:
                item.update(method="moments", r=None)
                group_bytes = GroupMoments.nbytes_for(1, d)
            else:
                r = max(2, GroupSample.rows_for_budget(n_groups, d, SPECTRA_BUDGET_BYTES))
                item.update(method="sample", r=r)
                group_bytes = r * (d + 2) * 8
            item["partitions"] = _partitions(n_groups, group_bytes, ctx.workers(len(ctx.shards)))
            plan.append(item)
    return plan


def _partitions(n_groups: int, group_bytes: int, workers: int) -> list[tuple[int, int]]:
    """Contiguous group ranges [lo, hi) of at most SPECTRA_PARTITION_BYTES of accumulator each, and at
    least ``workers`` of them (when there are that many groups), so that the reduce runs in parallel."""
    size = max(1, min(SPECTRA_PARTITION_BYTES // group_bytes, math.ceil(n_groups / max(1, workers))))
    return [(lo, min(lo + size, n_groups)) for lo in range(0, n_groups, size)]


def _scores(spectra: list[dict[str, np.ndarray]], top: int) -> dict[str, Any]:
    """Scores of all groups from the spectra of the partitions, in group order."""
    eigs, traces, counts, valid = (np.concatenate([s[name] for s in spectra]) for name in
                                   ("eigs", "traces", "count", "valid"))  # fmt: skip
    scores = spectral_scores(eigs, traces, SQS_QUANTILE, valid=valid)
    per_group = {name: scores[name] for name in ("sqs", "trace", "top_share", "effective_rank")}
    summary = {k: v for k, v in scores.items() if k not in per_group and k not in ("valid", "quantile")}
    return {
        "rows": counts.tolist(),
        "valid": scores["valid"].tolist(),
        **{k: v.tolist() for k, v in per_group.items()},
        "summary": summary,
        "top_eigenvalues": eigs[:, :top].tolist(),
    }


def _jsonable(obj: Any) -> Any:
    """numpy scalars to Python; non-finite floats (an infinite spread) to None, so the JSON stays strict."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _map_reduce(ctx: StageContext, fn: functools.partial, keys: list[tuple]) -> list[dict[str, np.ndarray]]:
    """The map calls (one per actor, each over a contiguous run of parts), then the reduce calls (one per
    key, merging the runs in part order), on one pool: its actors own the map outputs, which are lost with
    them. The merge order, and so the last bits of the spectra, depend on the number of actors."""
    workers = ctx.workers(len(ctx.shards))
    runs = [run.tolist() for run in np.array_split([s.index for s in ctx.shards], workers) if run.size]
    with ActorPool(ShardWorker, workers) as pool:
        maps = pool.map("call", [(fn, run) for run in runs], "spectra", "run")
        items = [(reduce_spectra, [m[key] for m in maps]) for key in keys]
        del maps
        return pool.map("call", items, "spectra reduce", "group")


def compute_spectra(ctx: StageContext) -> dict[str, Any]:
    """Per-group spectra and scores for every (spectra_by column, side), before and after balancing."""
    plan = _plan(ctx)
    if not plan:
        return {}
    fn = functools.partial(_put_parts, str(ctx.run.root), plan=plan, sample_seed=ctx.spec.cluster.seed)
    keys = [
        (item["column"], item["side"], phase, p)
        for item in plan
        for phase in ("before", "after")
        for p in range(len(item["partitions"]))
    ]
    for attempt in range(MAX_RESTARTS + 1):
        try:
            reduced = _map_reduce(ctx, fn, keys)
            break
        except ray.exceptions.ObjectLostError:  # an actor (or its node) died between map and reduce
            if attempt == MAX_RESTARTS:
                raise
            log.warning(
                "report: map outputs lost with their actor; redoing the spectra (attempt %d)", attempt + 2
            )
    spectra: dict[tuple, list] = {}
    for (column, side, phase, _), result in zip(keys, reduced, strict=True):
        spectra.setdefault((column, side, phase), []).append(result)
    out: dict[str, Any] = {}
    for item in plan:
        entry = {
            "groups": item["groups"],
            "d": item["d"],
            "method": "moments" if item["method"] == "moments" else f"sample of {item['r']} rows per group",
            "q": SQS_QUANTILE,
            "labels": item["vocab"] if item["vocab"] is not None else list(range(item["groups"])),
        }
        for phase in ("before", "after"):
            entry[phase] = _scores(
                spectra[(item["column"], item["side"], phase)], ctx.spec.report.top_eigenvalues
            )
        out.setdefault(item["column"], {})[item["side"]] = entry
    return out


TRUTH = "__truth__"
ZERO_SHOT = "zero_shot"


def truth_part(run_root: str, index: int, columns: list[str], truth: str) -> tuple[list[pa.Table], pa.Table]:
    """Rows per (concept, true label) of one part for every concept column (cluster columns from
    ``assignments``, ``zero_shot`` from ``concepts``): tables of the column, ``__truth__`` (the carried
    ``truth`` as a string, null as ``<missing>``) and ``count_all``; and the rows and summed weights per true
    label (``__truth__``, ``count_all``, ``weight_sum``)."""
    clusters = [c for c in columns if c != ZERO_SHOT]
    labels = read_part(join(run_root, "assignments"), index, columns=clusters)
    if ZERO_SHOT in columns:
        zero_shot = read_part(join(run_root, "concepts"), index, columns=[ZERO_SHOT]).column(ZERO_SHOT)
        labels = labels.append_column(ZERO_SHOT, zero_shot)
    values = read_part(join(run_root, "embeddings"), index, columns=[truth]).column(truth)
    labels = labels.append_column(TRUTH, pc.fill_null(pc.cast(values, pa.string()), "<missing>"))
    weights = read_part(join(run_root, "weights"), index, columns=["weight"]).column("weight")
    shares = labels.select([TRUTH]).append_column("weight", weights)
    shares = shares.group_by(TRUTH).aggregate([([], "count_all"), ("weight", "sum")])
    return [labels.group_by([c, TRUTH]).aggregate([([], "count_all")]) for c in columns], shares


def compute_truth_alignment(ctx: StageContext) -> dict[str, Any] | None:
    """How every concept column spreads over the ``report.truth`` column, and the true labels' shares
    before and after balancing (None without ``report.truth``): ``column``, ``values`` (the sorted true
    labels), ``shares`` (per label in that order ``rows`` and ``weighted_rows``, and
    :func:`~rebalance.kernels.alignment.truth_shares`), per side (``image``, ``text``, ``joint``) a list of
    levels (0: the base clusters), each ``level``, ``k``, ``balanced`` and :func:`alignment_scores` with true
    labels as indices of ``values``, and with zero-shot labels (``concepts.prompts``) ``zero_shot``: the
    same for the prompts (``k``: the prompts and ``<none>``, ``labels`` naming them in concepts.json's
    sorted order)."""
    truth = ctx.spec.report.truth
    if truth is None:
        return None
    clusters = json.loads(ctx.run.path("clusters", "clusters.json").read_text())
    levels = {
        side: [info["k"], *(level["k"] for level in info.get("levels", []))]
        for side, info in clusters.items()
    }
    columns = [
        f"{side}_cluster" + (f"_{lv}" if lv else "") for side, ks in levels.items() for lv in range(len(ks))
    ]
    concepts_json = ctx.run.path("concepts", "concepts.json")
    prompts = None
    if concepts_json.is_file():
        prompts = list(json.loads(concepts_json.read_text()).get("zero_shot_counts") or []) or None
    if prompts is not None:
        columns.append(ZERO_SHOT)
    root = str(ctx.run.root)
    with ActorPool(ShardWorker, ctx.workers(len(ctx.shards))) as pool:
        parts = pool.map("call", [(truth_part, root, s.index, columns, truth) for s in ctx.shards], "truth")
    merged = [
        pa.concat_tables([p[0][i] for p in parts]).group_by([c, TRUTH]).aggregate([("count_all", "sum")])
        for i, c in enumerate(columns)
    ]
    shares = pa.concat_tables([p[1] for p in parts]).group_by(TRUTH)
    shares = shares.aggregate([("count_all", "sum"), ("weight_sum", "sum")]).sort_by(TRUTH)
    values = shares.column(TRUTH).to_pylist()
    rows, weighted = (shares.column(c).to_numpy() for c in ("count_all_sum", "weight_sum_sum"))
    out: dict[str, Any] = {
        "column": truth,
        "values": values,
        "shares": {"rows": rows.tolist(), "weighted_rows": weighted.tolist(), **truth_shares(rows, weighted)},
    }
    balanced = set(ctx.spec.balance.marginals)

    def scores(column: str, k: int, names: list | None) -> dict[str, Any]:
        table = merged[columns.index(column)]
        c = np.zeros((k, len(values)))
        cols = pc.index_in(table.column(TRUTH), value_set=pa.array(values, pa.string())).to_numpy()
        if names is None:
            rows_ = table.column(0).to_numpy()
        else:
            rows_ = pc.index_in(table.column(0), value_set=pa.array(names, pa.string())).to_numpy()
        np.add.at(c, (rows_, cols), table.column("count_all_sum").to_numpy())
        return {"k": k, "balanced": column in balanced, **alignment_scores(c)}

    for side, ks in levels.items():
        out[side] = [
            {"level": lv, **scores(f"{side}_cluster" + (f"_{lv}" if lv else ""), k, None)}
            for lv, k in enumerate(ks)
        ]
    if prompts is not None:
        out[ZERO_SHOT] = [{"level": 0, "labels": prompts, **scores(ZERO_SHOT, len(prompts), prompts)}]
    return out


def build_report(
    run: RunDir, spec: Spec, spectra: dict[str, Any] | None = None, truth: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The report dict (schema in docs/report.md) of a run whose balance stage is complete."""
    clusters = json.loads(run.path("clusters", "clusters.json").read_text())
    balance = json.loads(run.path("balance.json").read_text())
    embed = run.stage("embed")
    marginals = {}
    for name, dist in balance["marginal_distributions"].items():
        counts, balanced = np.array(dist["counts"], float), np.array(dist["balanced"], float)
        marginals[name] = {
            "before": imbalance_stats(counts),
            "after": imbalance_stats(balanced),
            "final_marginal_error": balance["final_marginal_error"][name],
        }
    report = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "rows": balance["rows"],
        "rejected_rows": embed.get("rejected", {}).get("count", 0),
        "clusters": {
            side: {
                "k": info["k"],
                "d": info["d"],
                "sizes": info["sizes"],
                "empty_clusters": info["empty_clusters"],
                "final_objective": info["objective"][-1] if info["objective"] else None,
                "stats": imbalance_stats(np.array(info["sizes"], float)),
                "levels": [{"k": lv["k"], "sizes": lv["sizes"]} for lv in info.get("levels", [])],
            }
            for side, info in clusters.items()
        },
        "balance": {
            "marginals": balance["marginals"],
            "targets": balance["targets"],
            "cells": balance["cells"],
            "passes": balance["passes"],
            "converged": balance["converged"],
            "final_marginal_error": max(balance["final_marginal_error"].values()),
            "marginal_error_per_iteration": [
                max(e.values(), default=0.0) for e in balance["marginal_error_per_iteration"]
            ],
            "ess": balance["ess"],
            "ess_fraction": balance["ess_fraction"],
            "max_weight": balance["max_weight_value"],
            "min_weight": balance["min_weight_value"],
            "clipping": balance.get("clipping"),
            "relax": balance.get("relax"),
            "min_ess": balance.get("min_ess"),
        },
        "marginals": marginals,
        "joint": balance.get("joint", []),
        "spectra": spectra or {},
    }
    if truth is not None:
        report["truth_alignment"] = truth
    dedup = run.path("clusters", "dedup.json")
    if dedup.is_file():  # near-duplicate groups (dedup section): counts and sizes
        report["duplicates"] = json.loads(dedup.read_text())
    return _jsonable(report)


def run_report(ctx: StageContext) -> dict[str, Any]:
    """Write ``report/report.json`` and, when ``report.html`` is set, ``report/report.html`` and PNGs."""
    report = build_report(ctx.run, ctx.spec, compute_spectra(ctx), compute_truth_alignment(ctx))
    concepts, media = compute_concepts(ctx)
    report["concepts"] = _jsonable(concepts)
    out = ctx.run.path("report")
    if ctx.spec.report.html:
        from rebalance.report.html import write_html

        balance = json.loads(ctx.run.path("balance.json").read_text())
        report["files"] = write_html(report, balance, out, media)
    atomic_write_json(report, out / "report.json")
    return {
        "ess": report["balance"]["ess"],
        "final_marginal_error": report["balance"]["final_marginal_error"],
    }
