"""Cluster stage: faiss k-means on a bounded uniform sample, then every row assigned by the actor pool.

Sampling: every row gets a seeded priority hash of its key and the sample is the ``m`` rows of lowest
priority, where m = k * sample_per_centroid (largest k of the sides): a uniform sample without replacement,
independent of sharding. When the parts hold more than m rows, a first pass over the key columns finds the
m-th lowest priority (merged a chunk of parts at a time); each part then ships only its rows at or below
it, so the driver holds O(m) vectors and floats, and scatters them once into the training array. When
they hold at most m rows, the driver reads them itself (they all go to it anyway) while the actors start.
Outputs: ``clusters/{side}_centroids.npy``, ``clusters/clusters.json`` and ``assignments/part-NNNNN.parquet``
with ``key``, ``{side}_cluster`` (int32) and ``{side}_distance`` (float32, squared L2 to the centroid).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import ray

from rebalance.data.atomic import atomic_save_npy, atomic_write_json
from rebalance.data.fs import read_table
from rebalance.data.parts import part_path, part_summary, write_part
from rebalance.kernels.kmeans import assign, gpu_available, hierarchical_kmeans, level_labels, train_kmeans
from rebalance.kernels.sampling import bottom_k, key_priorities
from rebalance.runtime.pool import ActorPool, ShardWorker
from rebalance.stages.context import StageContext

__all__ = ["run_cluster", "sample_part", "assign_part", "ClusterError"]

log = logging.getLogger(__name__)


class ClusterError(ValueError):
    """The data cannot be clustered as specified (e.g. fewer rows than k)."""


def _vectors(table: pa.Table, side: str) -> np.ndarray:
    column = table.column(side).combine_chunks()
    return column.flatten().to_numpy().reshape(len(column), column.type.list_size)


def part_priorities(path: str, m: int, seed: int) -> np.ndarray:
    """The ``m`` lowest key priorities of one embeddings part, ascending: (min(m, rows),) float64.

    Reads the key column only; the driver merges these to find the sample's priority threshold."""
    keys = read_table(path, columns=["key"]).column("key").to_pylist()
    priorities = key_priorities(keys, seed)
    return priorities[bottom_k(priorities, m)]


def sample_part(
    path: str, sides: list[str], m: int, seed: int, threshold: float = np.inf
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The rows of one embeddings part among its ``m`` lowest priorities whose priority is <= ``threshold``,
    in (priority, row) order: (priorities (m',), {side: (m', d) float32 vectors})."""
    table = read_table(path, columns=["key", *sides])
    priorities = key_priorities(table.column("key").to_pylist(), seed)
    idx = bottom_k(priorities, m)
    idx = idx[priorities[idx] <= threshold]
    return priorities[idx], {side: _vectors(table, side)[idx] for side in sides}


def assign_part(
    emb_path: str,
    out_dir: str,
    index: int,
    centroids: dict[str, np.ndarray],
    parents: dict[str, list[np.ndarray]],
) -> dict[str, Any]:
    """Assign every row of one embeddings part to its nearest centroid per side, and to its cluster at every
    coarser level through the ``parents`` maps; commit the assignments part and return its summary with
    the base cluster sizes. Idempotent."""
    done = part_summary(out_dir, index)
    if done is not None:
        return done
    table = read_table(emb_path, columns=["key", *centroids])
    columns: dict[str, Any] = {"key": table.column("key")}
    sizes = {}
    for side, c in centroids.items():
        x = _vectors(table, side) if table.num_rows else np.zeros((0, c.shape[1]), np.float32)
        labels, distances = assign(x, c)
        columns[f"{side}_cluster"] = pa.array(labels, pa.int32())
        columns[f"{side}_distance"] = pa.array(distances, pa.float32())
        for level, labels_at_level in enumerate(level_labels(labels, parents.get(side, [])), start=1):
            columns[f"{side}_cluster_{level}"] = pa.array(labels_at_level, pa.int32())
        sizes[side] = np.bincount(labels, minlength=c.shape[0]).tolist()
    summary = {"sizes": sizes}
    write_part(out_dir, index, pa.table(columns), summary)
    return {"rows": table.num_rows, **summary}


def _warm_up(path: str, sides: list[str], k: int) -> None:
    """Sent to every actor as it starts, to run while the driver samples and trains: reads a part and
    assigns it to k dummy centroids, so that the first assignment item does not pay for first-touch page
    faults of the Arrow and faiss buffers (0.2-0.5 s per actor here)."""
    try:
        table = read_table(path, columns=["key", *sides])
        for side in sides:
            x = _vectors(table, side)
            assign(x, np.zeros((k, x.shape[1]), np.float32))
    except Exception:  # only a warm-up: the work items that follow meet and report any real error
        log.debug("cluster: warm-up failed", exc_info=True)


def _assign(emb_path: str, out_dir: str, index: int, model: tuple) -> dict[str, Any]:
    return assign_part(emb_path, out_dir, index, *model)


SAMPLE_CHUNK = 256  # parts per round of the threshold pass: driver memory O((SAMPLE_CHUNK + 1) * m) floats


def _sample_threshold(pool: ActorPool, paths: list[str], m: int, seed: int) -> float:
    """The m-th smallest key priority over all parts, which hold more than m rows.

    A pass over the key columns only, merged a chunk of parts at a time so the driver keeps O(m) floats."""
    lowest = np.zeros(0)
    for start in range(0, len(paths), SAMPLE_CHUNK):
        chunk = [(part_priorities, p, m, seed) for p in paths[start : start + SAMPLE_CHUNK]]
        lowest = np.concatenate([lowest, *pool.map("call", chunk, "sample keys")])
        lowest = lowest[bottom_k(lowest, m)]
    return float(lowest[m - 1])


def _merge_samples(
    samples: list[tuple[np.ndarray, dict[str, np.ndarray]]], m: int, rows: dict[str, int]
) -> dict[str, np.ndarray]:
    """The ``m`` lowest-priority rows over all parts' samples, in (priority, part, row) order, as one
    (min(m, rows[side]), d) float32 array per side holding the first ``rows[side]`` of them.

    Equal to ``concatenate(vectors)[bottom_k(concatenate(priorities), m)][: rows[side]]``, with one copy:
    each part's rows are scattered straight to their final position."""
    priorities = np.concatenate([p for p, _ in samples])
    order = bottom_k(priorities, m)
    dest = np.full(priorities.size, -1, dtype=np.int64)
    dest[order] = np.arange(order.size)
    out = {}
    for side, n in rows.items():
        d = samples[0][1][side].shape[1]
        out[side] = np.empty((min(n, order.size), d), dtype=np.float32)
    offset = 0
    for p, vectors in samples:
        part_dest = dest[offset : offset + p.size]
        offset += p.size
        for side, x in out.items():
            keep = (part_dest >= 0) & (part_dest < x.shape[0])
            x[part_dest[keep]] = vectors[side][keep]
    return out


def _sample_everything(
    paths: list[str], sides: list[str], seed: int, rows: dict[str, int]
) -> dict[str, np.ndarray]:
    """The whole dataset as the sample (when it holds at most m rows), read by the driver: every byte goes to
    the driver anyway, so actors would only add a hop through the object store. The key columns give the
    (priority, part, row) order; then each part's vectors are scattered straight to their place. Equal to
    :func:`_merge_samples` of every part's :func:`sample_part` (tested)."""
    priorities = np.concatenate(
        [key_priorities(read_table(p, columns=["key"]).column("key").to_pylist(), seed) for p in paths]
    )
    order = bottom_k(priorities, priorities.size)
    dest = np.empty(priorities.size, dtype=np.int64)
    dest[order] = np.arange(order.size)
    out: dict[str, np.ndarray] = {}
    offset = 0
    for path in paths:
        table = read_table(path, columns=["key", *sides])
        part_dest = dest[offset : offset + table.num_rows]
        offset += table.num_rows
        for side in sides:
            x = _vectors(table, side)
            if side not in out:
                out[side] = np.empty((min(rows[side], order.size), x.shape[1]), dtype=np.float32)
            keep = part_dest < out[side].shape[0]
            out[side][part_dest[keep]] = x[keep]
    return out


def _distinct_rows(x: np.ndarray, k: int) -> int:
    """Number of distinct rows of ``x`` (n, d), or a lower bound of it when that bound is already >= k.

    Rows with different projections x.r on a fixed random r are different rows, so the number of distinct
    projections bounds the count from below (one GEMV and a sort); only below k are the rows compared."""
    r = np.random.default_rng(0).standard_normal(x.shape[1]).astype(x.dtype)
    lower = int(np.unique(x @ r).size)
    if lower >= k:
        return lower
    return len(set(x.view(f"V{x.shape[1] * x.itemsize}").ravel().tolist()))


def run_cluster(ctx: StageContext) -> dict[str, Any]:
    """Train k-means per side on a bounded sample and assign every row; returns the stage summary."""
    spec = ctx.spec.cluster
    emb_dir, out_dir, clusters_dir = (
        ctx.run.path("embeddings"),
        ctx.run.path("assignments"),
        ctx.run.path("clusters"),
    )
    ks = {side: getattr(spec, side).k for side in ctx.sides}
    m = max(ks.values()) * spec.sample_per_centroid
    items = [(s.index, str(part_path(emb_dir, s.index))) for s in ctx.shards]
    part_rows = {i: part_summary(emb_dir, i)["rows"] for i, _ in items}
    n_rows = sum(part_rows.values())
    for side, k in ks.items():
        if k > n_rows:
            raise ClusterError(
                f"cluster.{side}.k = {k} exceeds the {n_rows} embedded rows: set cluster.{side}.k <= {n_rows}"
            )
    gpu = gpu_available()
    # faiss results depend on its thread count, and Ray job drivers run with OMP_NUM_THREADS=1: use every
    # core of the machine, whatever the environment says, so a job and a local run agree.
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    nonempty = [p for i, p in items if part_rows[i] > 0]
    with ActorPool(ShardWorker, ctx.workers(len(items))) as pool:
        for actor in pool.actors:  # fire and forget: an actor runs its calls in order, this one first
            actor.call.remote(_warm_up, nonempty[0], ctx.sides, max(ks.values()))
        # 1. Uniform bounded sample: the m lowest key priorities over all parts. When that is every row, the
        # driver reads the parts itself while the actors start. Otherwise a key-only pass on the actors finds
        # the m-th priority, then each part ships only its rows at or below it.
        rows = {side: k * spec.sample_per_centroid for side, k in ks.items()}
        if n_rows <= m:
            sample = _sample_everything(nonempty, ctx.sides, spec.seed, rows)
        else:
            threshold = _sample_threshold(pool, nonempty, m, spec.seed)
            samples = pool.map(
                "call", [(sample_part, p, ctx.sides, m, spec.seed, threshold) for p in nonempty], "sample"
            )
            sample = _merge_samples(samples, m, rows)
            del samples
        seconds["sample"], clock = time.perf_counter() - clock, time.perf_counter()
        # 2. k-means per side on the first k * sample_per_centroid sampled rows (a uniform sample too).
        centroids, info = {}, {}
        for side, k in ks.items():
            x = sample.pop(side)
            distinct = _distinct_rows(x, k)
            if distinct < k:
                raise ClusterError(
                    f"cluster.{side}.k = {k} exceeds the {distinct} distinct {side} vectors in the training "
                    f"sample; lower cluster.{side}.k"
                )
            log.info("cluster: %s k-means, k=%d on %d x %d (%s)", side, k, *x.shape, "GPU" if gpu else "CPU")
            result = train_kmeans(
                x, k, niter=spec.niter, spherical=spec.spherical, seed=spec.seed, gpu=gpu, nredo=spec.nredo
            )
            centroids[side] = result.centroids
            atomic_save_npy(result.centroids, clusters_dir / f"{side}_centroids.npy")
            info[side] = {
                "k": k,
                "d": int(x.shape[1]),
                "seed": spec.seed,
                "niter": spec.niter,
                "nredo": spec.nredo,
                "spherical": spec.spherical,
                "train_rows": int(x.shape[0]),
                "objective": result.objective,
                "device": "gpu" if gpu else "cpu",
            }
        parents: dict[str, list[np.ndarray]] = {}
        for side in ks:
            hierarchy = hierarchical_kmeans(centroids[side], list(spec.levels), niter=spec.niter,
                                            spherical=spec.spherical, seed=spec.seed, gpu=gpu)  # fmt: skip
            parents[side] = [level.parent for level in hierarchy]
            info[side]["levels"] = []
            for number, level in enumerate(hierarchy, start=1):
                atomic_save_npy(level.centroids, clusters_dir / f"{side}_centroids_{number}.npy")
                info[side]["levels"].append(
                    {
                        "level": number,
                        "k": int(level.centroids.shape[0]),
                        "objective": level.objective,
                        "parent": level.parent.tolist(),
                    }  # fmt: skip
                )
        seconds["train"], clock = time.perf_counter() - clock, time.perf_counter()
        # 3. Assignment of every row by the pool.
        out_dir.mkdir(parents=True, exist_ok=True)
        model_ref = ray.put((centroids, parents))
        summaries = pool.map("call", [(_assign, p, str(out_dir), i, model_ref) for i, p in items], "assign")
    seconds["assign"] = time.perf_counter() - clock
    for side in ks:
        sizes = np.sum([s["sizes"][side] for s in summaries], axis=0)
        info[side]["sizes"] = sizes.astype(int).tolist()
        info[side]["empty_clusters"] = int((sizes == 0).sum())
        below = sizes
        for level in info[side]["levels"]:
            below = np.bincount(level["parent"], weights=below, minlength=level["k"])
            level["sizes"] = below.astype(int).tolist()
    atomic_write_json(info, clusters_dir / "clusters.json")
    return {"rows": n_rows, "k": ks, "device": "gpu" if gpu else "cpu",
            "seconds": {k: round(v, 3) for k, v in seconds.items()}}  # fmt: skip
