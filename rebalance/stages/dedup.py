"""Near-duplicate groups (``dedup`` section), run by the cluster stage after it has assigned every row.

SemDeDup (Abbas et al. 2023): near-duplicates lie in the same k-means cluster, so pairs are only compared
inside each ``<side>_cluster``. Three passes over the parts, each spread over the actors:

1. shuffle: every part sends each row's key, cluster and ``dedup.side`` vector to one of B batches of
   clusters (cluster mod B), as ``clusters/dedup-shuffle/bNNNNN/part-NNNNN.parquet``; B is chosen so a
   batch holds about :data:`BATCH_ROWS` rows, and at least one batch per actor (at most one per cluster);
2. group: one task per batch orders each cluster's rows by key and finds its groups with
   :func:`rebalance.kernels.dedup.duplicate_roots` (cosine >= ``dedup.threshold``, tiles of
   ``dedup.block`` rows); it writes the rows of groups of two or more (key, group, size) per part they come
   from, ``clusters/dedup-shuffle/groups/part-NNNNN/bNNNNN.parquet``, and returns its rows per group size;
3. label: every assignments part reads its own group files and gains ``dup_group`` (string: the smallest
   key of the row's group, the row's own key when it has no near-duplicate) and ``dup_size`` (int32: rows
   in the group).

``clusters/dedup.json`` records the threshold, the number of groups, the rows in groups of two or more and
the number of groups of each size. The driver holds B histograms of group sizes, never rows: an actor
holds one part, or one batch of clusters.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rebalance.data.atomic import atomic_write_json, atomic_write_table
from rebalance.data.fs import as_path, read_table, remove
from rebalance.data.parts import part_summary, read_part, write_part
from rebalance.data.readers import vector_matrix
from rebalance.kernels.dedup import duplicate_roots
from rebalance.kernels.kmeans import joint_vectors
from rebalance.runtime.pool import ActorPool
from rebalance.spec import DedupSpec

__all__ = [
    "run_dedup",
    "shuffle_part",
    "group_batch",
    "label_part",
    "Runner",
    "in_process",
    "on_pool",
    "BATCH_ROWS",
]

BATCH_ROWS = 262_144  # rows per batch of clusters (a batch's vectors are held by one task)
SHUFFLE = "dedup-shuffle"


@dataclass(frozen=True)
class Runner:
    """How the passes run: ``map(fn, [args, ...], what)`` calls fn on every args tuple (on the actors, or
    in this process)."""

    map: Callable[[Callable, list[tuple], str], list[Any]]


def in_process() -> Runner:
    """Every call in this process, one after the other."""
    return Runner(lambda fn, args, what: [fn(*a) for a in args])


def on_pool(pool: ActorPool) -> Runner:
    """Every call on ``pool``'s actors."""
    return Runner(lambda fn, args, what: pool.map("call", [(fn, *a) for a in args], what))


def _side_matrix(table: pa.Table, side: str) -> np.ndarray:
    if side == "joint":
        image, text = (vector_matrix(table.column(s).combine_chunks()) for s in ("image", "text"))
        return joint_vectors(image, text)
    return vector_matrix(table.column(side).combine_chunks())


def shuffle_part(run_root: str, index: int, side: str, n_batches: int) -> int:
    """Send part ``index``'s rows (key, cluster, ``side`` vector) to their batch files; returns its rows."""
    root = as_path(run_root)
    labels = read_part(root / "assignments", index, columns=["key", f"{side}_cluster"])
    if labels.num_rows == 0:
        return 0
    inputs = ["image", "text"] if side == "joint" else [side]
    x = _side_matrix(read_part(root / "embeddings", index, columns=inputs), side)
    cluster = labels.column(f"{side}_cluster").to_numpy()
    batch = cluster % n_batches
    keys = labels.column("key")
    for b in np.unique(batch):
        rows = np.flatnonzero(batch == b)
        table = pa.table({
            "key": keys.take(pa.array(rows)),
            "part": pa.array(np.full(rows.size, index), pa.int32()),
            "cluster": pa.array(cluster[rows], pa.int32()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(x[rows].ravel()), x.shape[1]),
        })  # fmt: skip
        directory = root / "clusters" / SHUFFLE / f"b{b:05d}"
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_table(table, directory / f"part-{index:05d}.parquet")
    return labels.num_rows


def group_batch(run_root: str, batch: int, threshold: float, block: int) -> list[int]:
    """The near-duplicate groups of every cluster of one batch. The rows in groups of two or more (``key``,
    ``dup_group``: the group's smallest key, ``dup_size``) are written per part they come from, to
    ``clusters/dedup-shuffle/groups/part-NNNNN/bBBBBB.parquet``; returns the rows per group size (a list
    indexed by size, sizes 0 and 1 left at 0)."""
    shuffle = as_path(run_root) / "clusters" / SHUFFLE
    files = sorted((shuffle / f"b{batch:05d}").glob("part-*.parquet"))
    if not files:
        return []
    table = pa.concat_tables([read_table(f) for f in files])
    table = table.take(pc.sort_indices(table, [("cluster", "ascending"), ("key", "ascending")]))
    cluster = table.column("cluster").to_numpy()
    x = vector_matrix(table.column("vector").combine_chunks())
    starts = np.flatnonzero(np.r_[True, cluster[1:] != cluster[:-1]])
    ends = np.r_[starts[1:], cluster.size]
    roots = np.empty(cluster.size, dtype=np.int64)
    for a, b in zip(starts, ends, strict=True):
        roots[a:b] = a + duplicate_roots(x[a:b], threshold, block)
    sizes = np.bincount(roots, minlength=roots.size)[roots]
    dup = np.flatnonzero(sizes > 1)
    if dup.size == 0:
        return []
    keys, parts = table.column("key").combine_chunks(), table.column("part").to_numpy()[dup]
    groups = pa.table({"key": keys.take(pa.array(dup)), "dup_group": keys.take(pa.array(roots[dup])),
                       "dup_size": pa.array(sizes[dup], pa.int32())})  # fmt: skip
    for part in np.unique(parts).tolist():
        rows = groups.filter(pa.array(parts == part))
        atomic_write_table(rows, shuffle / "groups" / f"part-{part:05d}" / f"b{batch:05d}.parquet")
    return np.bincount(sizes[dup]).tolist()


def label_part(run_root: str, index: int) -> dict[str, Any]:
    """Add ``dup_group`` and ``dup_size`` to assignments part ``index`` from the groups :func:`group_batch`
    wrote for it (the part's rows that have a near-duplicate); other rows are their own group of one.
    Idempotent."""
    root = as_path(run_root)
    out = root / "assignments"
    summary = part_summary(out, index)
    if summary.get("dedup"):
        return summary
    files = sorted((root / "clusters" / SHUFFLE / "groups" / f"part-{index:05d}").glob("b*.parquet"))
    schema = pa.schema([("key", pa.string()), ("dup_group", pa.string()), ("dup_size", pa.int32())])
    groups = pa.concat_tables([schema.empty_table(), *(read_table(f) for f in files)]).combine_chunks()
    table = read_part(out, index)
    table = table.drop_columns([c for c in ("dup_group", "dup_size") if c in table.column_names])
    keys = table.column("key")
    at = pc.index_in(keys, value_set=groups.column("key"))
    found = at.is_valid()
    group = pc.if_else(found, groups.column("dup_group").take(pc.fill_null(at, 0)), keys)
    size = pc.if_else(found, groups.column("dup_size").take(pc.fill_null(at, 0)), pa.scalar(1, pa.int32()))
    table = table.append_column("dup_group", group).append_column("dup_size", size.cast(pa.int32()))
    write_part(out, index, table, {k: v for k, v in summary.items() if k != "rows"} | {"dedup": True})
    return summary | {"dedup": True}


def run_dedup(
    run_root: str, indices: list[int], n_rows: int, k: int, spec: DedupSpec, runner: Runner, tasks: int = 1
) -> dict:
    """The three passes over parts ``indices`` (``n_rows`` rows, ``k`` clusters on ``spec.side``), run by
    ``runner`` with at least ``tasks`` batches (at most k); writes ``clusters/dedup.json`` and returns it."""
    root = as_path(run_root)
    shuffle = root / "clusters" / SHUFFLE
    remove(shuffle)  # a crashed attempt's files
    n_batches = max(1, min(k, max(tasks, math.ceil(n_rows / BATCH_ROWS))))
    runner.map(shuffle_part, [(run_root, i, spec.side, n_batches) for i in indices], "dedup shuffle")
    histograms = runner.map(
        group_batch, [(run_root, b, spec.threshold, spec.block) for b in range(n_batches)], "dedup groups"
    )
    runner.map(label_part, [(run_root, i) for i in indices], "dedup labels")
    remove(shuffle)
    rows_by_size = np.zeros(max(map(len, histograms), default=0), np.int64)
    for h in histograms:  # a batch without duplicates returns [] (not an int array)
        rows_by_size[: len(h)] += np.asarray(h, np.int64)
    per_size = rows_by_size // np.maximum(np.arange(rows_by_size.size), 1)
    multi = {int(s): int(c) for s, c in enumerate(per_size) if s >= 2 and c > 0}
    rows_in_multi = int(rows_by_size.sum())
    info = {
        "side": spec.side,
        "threshold": spec.threshold,
        "block": spec.block,
        "batches": n_batches,
        "rows": n_rows,
        "groups": n_rows - rows_in_multi + sum(multi.values()),
        "duplicated_rows": rows_in_multi,
        "groups_with_duplicates": sum(multi.values()),
        "largest_group": max(multi, default=1),
        "groups_by_size": {"1": n_rows - rows_in_multi, **{str(s): c for s, c in multi.items()}},
    }
    atomic_write_json(info, root / "clusters" / "dedup.json")
    return info
