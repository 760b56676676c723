"""Cluster stage: faiss k-means on a bounded uniform sample, then every row assigned by the actor pool.

Sampling: every row gets a seeded priority hash of its key; each shard returns its ``m`` lowest-priority
rows and the driver keeps the ``m`` lowest overall, where m = k * sample_per_centroid (largest k of the
sides). That is a uniform sample without replacement, independent of sharding, in O(m) driver memory.
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


def sample_part(path: str, sides: list[str], m: int, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The ``m`` lowest-priority rows of one embeddings part: (priorities (m',), {side: (m', d) vectors})."""
    table = read_table(path, columns=["key", *sides])
    priorities = key_priorities(table.column("key").to_pylist(), seed)
    idx = bottom_k(priorities, m)
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
    table = read_table(emb_path)
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


def _assign(emb_path: str, out_dir: str, index: int, model: tuple) -> dict[str, Any]:
    return assign_part(emb_path, out_dir, index, *model)


def _merge_samples(
    samples: list[tuple[np.ndarray, dict[str, np.ndarray]]], m: int
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    priorities = np.concatenate([p for p, _ in samples])
    idx = bottom_k(priorities, m)
    sides = samples[0][1].keys()
    return priorities[idx], {s: np.concatenate([v[s] for _, v in samples])[idx] for s in sides}


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
    n_rows = sum(part_summary(emb_dir, i)["rows"] for i, _ in items)
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
    with ActorPool(ShardWorker, ctx.workers(len(items))) as pool:
        # 1. Uniform bounded sample: bottom-m priorities per part, then merged, m rows per side at most.
        nonempty = [(i, p) for i, p in items if part_summary(emb_dir, i)["rows"] > 0]
        samples = pool.map("call", [(sample_part, p, ctx.sides, m, spec.seed) for _, p in nonempty], "sample")
        _, sample = _merge_samples(samples, m)
        seconds["sample"], clock = time.perf_counter() - clock, time.perf_counter()
        # 2. k-means per side on the first k * sample_per_centroid sampled rows (a uniform sample too).
        centroids, info = {}, {}
        for side, k in ks.items():
            x = sample[side][: k * spec.sample_per_centroid]
            distinct = len(set(x.view(f"V{x.shape[1] * x.itemsize}").ravel().tolist()))
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
