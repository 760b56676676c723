"""Cluster stage: faiss k-means on a bounded uniform sample, then every row assigned to its nearest centroid.

Sampling: every row gets a seeded priority hash of its key and the sample is the ``m`` rows of lowest
priority, where m = k * sample_per_centroid (largest k of the sides): a uniform sample without replacement,
independent of sharding. When the parts hold more than m rows, a first pass over the key columns finds the
m-th lowest priority (merged a chunk of parts at a time); each part then ships only its rows at or below
it, so the driver holds O(m) vectors and floats, and scatters them once into the training array; the
actor pool assigns every row. When they hold at most m rows, the sample is every row: the driver reads
them itself (they all go to it anyway), trains, and assigns each part from memory with one faiss thread
per part, as an actor does, so both paths give the same assignments; no actors start.
Every k-means run starts from k-means++ seeds (``cluster.init``). With ``cluster.joint``, a third "side",
``joint``, clusters each row's joint vector (:func:`rebalance.kernels.kmeans.joint_vectors` of its image
and text vectors), trained on the same sample and assigned like the others.
Coarser levels (``cluster.levels``): :func:`rebalance.kernels.kmeans.hierarchical_kmeans` on the centroids.
With a ``dedup`` section, near-duplicate groups follow the assignment (:mod:`rebalance.stages.dedup`):
``dup_group`` and ``dup_size`` join the assignments parts and ``clusters/dedup.json`` counts the groups.
Outputs: ``clusters/{side}_centroids.npy``, ``clusters/clusters.json`` and ``assignments/part-NNNNN.parquet``
with ``key``, ``{side}_cluster`` (int32) and ``{side}_distance`` (float32, squared L2 to the centroid).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import ray

from rebalance.data.atomic import atomic_save_npy, atomic_write_json
from rebalance.data.fs import read_table
from rebalance.data.parts import part_path, part_summary, write_part
from rebalance.data.readers import vector_matrix
from rebalance.kernels.kmeans import (
    assign,
    auto_nredo,
    gpu_available,
    hierarchical_kmeans,
    joint_vectors,
    level_labels,
    train_kmeans,
)
from rebalance.kernels.sampling import bottom_k, key_priorities
from rebalance.runtime.pool import ActorPool, ShardWorker
from rebalance.runtime.session import ClusterResources
from rebalance.spec import ClusterSpec
from rebalance.stages.context import StageContext
from rebalance.stages.dedup import in_process, on_pool, run_dedup

__all__ = ["run_cluster", "sample_part", "assign_part", "ClusterError"]

log = logging.getLogger(__name__)


class ClusterError(ValueError):
    """The data cannot be clustered as specified (e.g. fewer rows than k)."""


def _vectors(table: pa.Table, side: str) -> np.ndarray:
    return vector_matrix(table.column(side).combine_chunks())


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
    device: str = "cpu",
) -> dict[str, Any]:
    """Assign every row of one embeddings part to its nearest centroid per side (on ``device``: see
    :func:`~rebalance.kernels.kmeans.assign`), and to its cluster at every coarser level through the
    ``parents`` maps; commit the assignments part and return its summary with the base cluster sizes and
    the device. Idempotent."""
    done = part_summary(out_dir, index)
    if done is not None:
        return done
    sides = _input_sides(centroids)
    table = read_table(emb_path, columns=["key", *sides])
    vectors = {side: _vectors(table, side) for side in sides}
    return _commit_assignments(out_dir, index, table.column("key"), vectors, centroids, parents, device)


def _input_sides(sides: Any) -> list[str]:
    """The embedding columns that the cluster sides ``sides`` read: ``joint`` reads image and text."""
    return [s for s in ("image", "text") if s in sides or "joint" in sides]


def _side_vectors(vectors: dict[str, np.ndarray], side: str) -> np.ndarray:
    """The vectors that ``side`` clusters: a side's own, or for ``joint`` the joint vectors of both."""
    if side == "joint":
        return joint_vectors(vectors["image"], vectors["text"])
    return vectors[side]


def _commit_assignments(
    out_dir: str,
    index: int,
    keys: pa.ChunkedArray,
    vectors: dict[str, np.ndarray],
    centroids: dict[str, np.ndarray],
    parents: dict[str, list[np.ndarray]],
    device: str = "cpu",
) -> dict[str, Any]:
    """Assign one part's rows (``vectors[side]`` (n, d), in the part's row order) and commit the part."""
    columns: dict[str, Any] = {"key": keys}
    sizes = {}
    for side, c in centroids.items():
        labels, distances = assign(_side_vectors(vectors, side).reshape(-1, c.shape[1]), c, device=device)
        columns[f"{side}_cluster"] = pa.array(labels, pa.int32())
        columns[f"{side}_distance"] = pa.array(distances, pa.float32())
        for level, labels_at_level in enumerate(level_labels(labels, parents.get(side, [])), start=1):
            columns[f"{side}_cluster_{level}"] = pa.array(labels_at_level, pa.int32())
        sizes[side] = np.bincount(labels, minlength=c.shape[0]).tolist()
    summary = {"sizes": sizes, "device": device}
    write_part(out_dir, index, pa.table(columns), summary)
    return {"rows": len(keys), **summary}


def _assign(emb_path: str, out_dir: str, index: int, model: tuple) -> dict[str, Any]:
    return assign_part(emb_path, out_dir, index, *model)


def _assign_on_gpu_actor(emb_path: str, out_dir: str, index: int, model: tuple) -> dict[str, Any]:
    """:func:`assign_part` in a one-GPU actor: torch on its GPU (faiss-gpu is not needed for a flat
    search), or on its CPU when it sees no CUDA device (recorded as ``cpu``)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        log.warning("cluster: the GPU actor sees no CUDA device: assigning part %d on its CPU", index)
    return assign_part(emb_path, out_dir, index, *model, device=device)


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
        for side, x in out.items():
            _scatter(x, dest[offset : offset + p.size], vectors[side])
        offset += p.size
    return out


def _scatter(out: np.ndarray, rows: np.ndarray, vectors: np.ndarray) -> None:
    """out[rows[i]] = vectors[i] for every i with 0 <= rows[i] < len(out); rows (n,), vectors (n, d)."""
    keep = (rows >= 0) & (rows < out.shape[0])
    if keep.all():
        out[rows] = vectors
    else:
        out[rows[keep]] = vectors[keep]


def _read_everything(
    paths: list[str], sides: list[str], seed: int
) -> tuple[list[pa.ChunkedArray], list[np.ndarray], dict[str, np.ndarray]]:
    """Every row of every part, in sample order, read by the driver (for when the sample is the whole dataset).

    Returns each part's keys, each part's row positions in the sample (n_p,) and the sample per side (n, d)
    float32 in (priority, part, row) order, so that its first r rows are the r-row sample (equal to
    :func:`_merge_samples` of every part's :func:`sample_part`; tested). The key columns give the order;
    then each Arrow chunk of each part's vectors is scattered straight to its rows' places."""
    keys = [read_table(p, columns=["key"]).column("key") for p in paths]
    priorities = np.concatenate([key_priorities(k.to_pylist(), seed) for k in keys])
    order = bottom_k(priorities, priorities.size)
    dest = np.empty(priorities.size, dtype=np.int64)
    dest[order] = np.arange(order.size)
    bounds = np.cumsum([0, *(len(k) for k in keys)])
    positions = [dest[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    sample: dict[str, np.ndarray] = {}
    for path, part_dest in zip(paths, positions, strict=True):
        if part_dest.size == 0:
            continue
        table = read_table(path, columns=[*sides])
        for side in sides:
            start = 0
            for chunk in table.column(side).chunks:
                d = chunk.type.list_size
                if side not in sample:
                    sample[side] = np.empty((order.size, d), dtype=np.float32)
                sample[side][part_dest[start : start + len(chunk)]] = (
                    chunk.flatten().to_numpy().reshape(-1, d)
                )
                start += len(chunk)
    return keys, positions, sample


def _assign_in_driver(
    items: list[tuple[int, str]],
    out_dir: str,
    keys: list[pa.ChunkedArray],
    positions: list[np.ndarray],
    sample: dict[str, np.ndarray],
    centroids: dict[str, np.ndarray],
    parents: dict[str, list[np.ndarray]],
) -> list[dict[str, Any]]:
    """:func:`assign_part` for every part from the rows the driver holds, one part per thread and one faiss
    thread per part, exactly as an actor computes it (faiss's distances depend on its thread count)."""

    def one(j: int) -> dict[str, Any]:
        index = items[j][0]
        done = part_summary(out_dir, index)
        if done is not None:
            return done
        faiss.omp_set_num_threads(1)  # this thread only: OpenMP settings are per thread
        vectors = {side: sample[side][positions[j]] for side in _input_sides(centroids)}
        return _commit_assignments(out_dir, index, keys[j], vectors, centroids, parents)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as threads:
        return list(threads.map(one, range(len(items))))


AUTO_K_MAX = 1024


def auto_k(n_rows: int) -> int:
    """``k: auto`` for ``n_rows`` embedded rows: round(sqrt(n_rows)), between 2 and :data:`AUTO_K_MAX` (at
    most ``n_rows``). The training sample may lower it further (:func:`_train_sides`)."""
    return int(min(AUTO_K_MAX, n_rows, max(2, round(math.sqrt(n_rows)))))


def _distinct_rows(x: np.ndarray, k: int) -> int:
    """Number of distinct rows of ``x`` (n, d), or a lower bound of it when that bound is already >= k.

    Rows with different projections x.r on a fixed random r are different rows, so the number of distinct
    projections bounds the count from below (one GEMV and a sort); only below k are the rows compared."""
    r = np.random.default_rng(0).standard_normal(x.shape[1]).astype(x.dtype)
    lower = int(np.unique(x @ r).size)
    if lower >= k:
        return lower
    return len(set(x.view(f"V{x.shape[1] * x.itemsize}").ravel().tolist()))


def _fold_summaries(
    summaries: Iterable[dict[str, Any]], ks: dict[str, int]
) -> tuple[dict[str, np.ndarray], set[str]]:
    """Rows per cluster of every side, (k,) int64, summed over the parts' assignment summaries, and the
    devices that assigned them."""
    sizes = {side: np.zeros(k, np.int64) for side, k in ks.items()}
    devices = set()
    for summary in summaries:
        devices.add(summary.get("device", "cpu"))
        for side in ks:
            sizes[side] += np.asarray(summary["sizes"][side], np.int64)
    return sizes, devices


def kmeans_placement(resources: ClusterResources, driver_gpu: bool) -> str:
    """Where k-means trains: ``driver`` when the driver's faiss has a GPU, or when the cluster has no GPU
    and its autoscaler can add none; else ``gpu actor`` (a one-GPU actor, so that the autoscaler starts a GPU
    node if none is live)."""
    if driver_gpu or max(resources.gpus, resources.capacity.gpus) == 0:
        return "driver"
    return "gpu actor"


def assign_placement(resources: ClusterResources) -> str:
    """Where rows are assigned to centroids (when the sample is not every row): ``gpu actors`` when the
    cluster has GPUs or its autoscaler can add some (one actor per GPU, at most one per part), else ``cpu
    actors`` (the stage's pool, one per CPU)."""
    return "gpu actors" if max(resources.gpus, resources.capacity.gpus) > 0 else "cpu actors"


def _train_on_gpu_actor(
    spec: ClusterSpec,
    clusters_dir: Any,
    ks: dict[str, int],
    sample: dict[str, np.ndarray],
    auto: frozenset[str] = frozenset(),
) -> tuple[dict[str, np.ndarray], dict[str, list[np.ndarray]], dict[str, Any]]:
    """:func:`_train_sides` in a one-GPU actor: faiss on the GPU when its faiss is faiss-gpu, else faiss
    on the actor's CPUs (recorded as ``cpu``; torch is no substitute for faiss's k-means)."""
    gpu = gpu_available()
    if not gpu:
        log.warning("cluster: the GPU actor's faiss has no GPU support (faiss-cpu?): training on its CPU")
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    return _train_sides(spec, clusters_dir, ks, sample, gpu, auto)


def _train(
    ctx: StageContext,
    ks: dict[str, int],
    sample: dict[str, np.ndarray],
    placement: str,
    auto: frozenset[str] = frozenset(),
) -> tuple[dict[str, np.ndarray], dict[str, list[np.ndarray]], dict[str, Any]]:
    """k-means of every side where :func:`kmeans_placement` says (``auto`` as in :func:`_train_sides`);
    clusters.json records the placement."""
    spec, clusters_dir = ctx.spec.cluster, ctx.run.path("clusters")
    if placement == "driver":
        centroids, parents, info = _train_sides(spec, clusters_dir, ks, sample, gpu_available(), auto)
    else:
        log.info("cluster: training k-means on a GPU actor")
        # no CPU asked: the stage's CPU pool may hold every CPU of the GPU node meanwhile
        timeout = ctx.spec.ray.placement_timeout_s
        with ActorPool(ShardWorker, 1, num_cpus=0, num_gpus=1, placement_timeout_s=timeout) as pool:
            ((centroids, parents, info),) = pool.map(
                "call", [(_train_on_gpu_actor, spec, clusters_dir, ks, sample, auto)]
            )
    for side in info:
        info[side]["placement"] = placement
    return centroids, parents, info


def _train_sides(
    spec: ClusterSpec,
    clusters_dir: Any,
    ks: dict[str, int],
    sample: dict[str, np.ndarray],
    gpu: bool,
    auto: frozenset[str] = frozenset(),
) -> tuple[dict[str, np.ndarray], dict[str, list[np.ndarray]], dict[str, Any]]:
    """k-means per side on the first k * sample_per_centroid rows of its sample (a uniform sample too), then
    the coarser levels; saves the centroids under ``clusters_dir``. A side in ``auto`` (``k: auto``) takes
    at most the distinct vectors of its training rows as k; a given k above them is an error. Returns
    centroids, parent maps per level and clusters.json (with the k used)."""
    centroids: dict[str, np.ndarray] = {}
    parents: dict[str, list[np.ndarray]] = {}
    info: dict[str, Any] = {}
    for side, k in ks.items():
        rows = k * spec.sample_per_centroid
        x = _side_vectors({s: v[:rows] for s, v in sample.items()}, side)
        distinct = _distinct_rows(x, k)
        if distinct < k and side in auto:
            log.info(
                "cluster: %s k auto: %d -> %d, the distinct vectors of the training sample", side, k, distinct
            )
            k = distinct
        elif distinct < k:
            raise ClusterError(
                f"cluster.{side}.k = {k} exceeds the {distinct} distinct {side} vectors in the training "
                f"sample; lower cluster.{side}.k"
            )
        if spec.levels and spec.levels[0] > k:
            raise ClusterError(
                f"cluster.levels[0] = {spec.levels[0]} exceeds cluster.{side}.k = {k} (the level below); "
                f"lower cluster.levels or set cluster.{side}.k"
            )
        nredo = auto_nredo(x.shape[0], k, x.shape[1]) if spec.nredo == "auto" else spec.nredo
        log.info(
            "cluster: %s k-means, k=%d on %d x %d, %d run(s) (%s)", side, k, *x.shape, nredo,
            "GPU" if gpu else "CPU",
        )  # fmt: skip
        result = train_kmeans(
            x, k, niter=spec.niter, spherical=spec.spherical, seed=spec.seed, gpu=gpu, nredo=nredo,
            init=spec.init,
        )  # fmt: skip
        centroids[side] = result.centroids
        atomic_save_npy(result.centroids, clusters_dir / f"{side}_centroids.npy")
        info[side] = {
            "k": k,
            "d": int(x.shape[1]),
            "seed": spec.seed,
            "niter": spec.niter,
            "nredo": nredo,
            "init": spec.init,
            "spherical": spec.spherical,
            "train_rows": int(x.shape[0]),
            "objective": result.objective,
            "device": "gpu" if gpu else "cpu",
            "levels": [],
        }
        hierarchy = hierarchical_kmeans(
            result.centroids, list(spec.levels), niter=spec.niter, spherical=spec.spherical,
            seed=spec.seed, gpu=gpu, resampling_steps=spec.resampling_steps, init=spec.init,
        )  # fmt: skip
        parents[side] = [level.parent for level in hierarchy]
        for number, level in enumerate(hierarchy, start=1):
            atomic_save_npy(level.centroids, clusters_dir / f"{side}_centroids_{number}.npy")
            info[side]["levels"].append(
                {
                    "level": number,
                    "k": int(level.centroids.shape[0]),
                    "objective": level.objective,
                    "resampling_steps": spec.resampling_steps,
                    "parent": level.parent.tolist(),
                }  # fmt: skip
            )
    return centroids, parents, info


def run_cluster(ctx: StageContext) -> dict[str, Any]:
    """Train k-means per side on a bounded sample and assign every row; returns the stage summary."""
    spec = ctx.spec.cluster
    emb_dir, out_dir, clusters_dir = (
        ctx.run.path("embeddings"),
        ctx.run.path("assignments"),
        ctx.run.path("clusters"),
    )
    wanted = {side: getattr(spec, side).k for side in ctx.sides}
    if spec.joint is not None:
        if len(ctx.sides) < 2:
            raise ClusterError(
                f"cluster.joint needs an image and a text side; the dataset has only {ctx.sides}"
            )
        wanted["joint"] = spec.joint.k
    items = [(s.index, str(part_path(emb_dir, s.index))) for s in ctx.shards]
    part_rows = {i: part_summary(emb_dir, i)["rows"] for i, _ in items}
    n_rows = sum(part_rows.values())
    ks = {side: auto_k(n_rows) if k == "auto" else k for side, k in wanted.items()}
    auto = {side for side, k in wanted.items() if k == "auto"}
    m = max(ks.values()) * spec.sample_per_centroid
    for side, k in ks.items():
        if k > n_rows:
            raise ClusterError(
                f"cluster.{side}.k = {k} exceeds the {n_rows} embedded rows: set cluster.{side}.k <= {n_rows}"
            )
    dedup = ctx.spec.dedup
    if dedup is not None and dedup.side not in ks:
        raise ClusterError(f"dedup.side is {dedup.side!r} but the dataset has no such side ({sorted(ks)})")
    root = str(ctx.run.root)
    indices = [i for i, _ in items]
    placement = kmeans_placement(ctx.resources, gpu_available())
    # faiss results depend on its thread count, and Ray job drivers run with OMP_NUM_THREADS=1: use every
    # core of the machine, whatever the environment says, so a job and a local run agree. (Assignment runs
    # one faiss thread per part on either path below, so its results do not depend on the machine.)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    assign_on = "driver"
    if n_rows <= m:
        # The sample is every row, so every vector goes to the driver anyway: it reads them itself, trains,
        # and assigns every part from memory (no actors: starting them costs more than the work here).
        keys, positions, sample = _read_everything([p for _, p in items], ctx.sides, spec.seed)
        seconds["sample"], clock = time.perf_counter() - clock, time.perf_counter()
        centroids, parents, info = _train(ctx, ks, sample, placement, frozenset(auto))
        ks = {side: info[side]["k"] for side in ks}
        seconds["train"], clock = time.perf_counter() - clock, time.perf_counter()
        summaries = _assign_in_driver(items, str(out_dir), keys, positions, sample, centroids, parents)
        sizes, devices = _fold_summaries(summaries, ks)
        del sample
        if dedup is not None:
            seconds["assign"], clock = time.perf_counter() - clock, time.perf_counter()
            dedup_info = run_dedup(root, indices, n_rows, ks[dedup.side], dedup, in_process())
    else:
        with ActorPool(ShardWorker, ctx.workers(len(items))) as pool:
            # 1. Uniform bounded sample: a key-only pass finds the m-th lowest priority over all parts, then
            # each part ships only its rows at or below it; the driver scatters them into place.
            nonempty = [p for i, p in items if part_rows[i] > 0]
            threshold = _sample_threshold(pool, nonempty, m, spec.seed)
            samples = pool.map(
                "call", [(sample_part, p, ctx.sides, m, spec.seed, threshold) for p in nonempty], "sample"
            )
            rows = {side: k * spec.sample_per_centroid for side, k in ks.items() if side != "joint"}
            if "joint" in ks:  # the joint side trains on the first rows of both sides' samples
                rows = {side: max(n, ks["joint"] * spec.sample_per_centroid) for side, n in rows.items()}
            sample = _merge_samples(samples, m, rows)
            del samples
            seconds["sample"], clock = time.perf_counter() - clock, time.perf_counter()
            # 2. k-means per side and the coarser levels, in the driver.
            centroids, parents, info = _train(ctx, ks, sample, placement, frozenset(auto))
            ks = {side: info[side]["k"] for side in ks}
            del sample
            seconds["train"], clock = time.perf_counter() - clock, time.perf_counter()
            # 3. Assignment of every row: by GPU actors where the cluster has GPUs, else by the pool.
            model_ref = ray.put((centroids, parents))
            assign_on = assign_placement(ctx.resources)
            # the parts' summaries are folded as they come: O(k) held, not O(parts k)
            if assign_on == "gpu actors":
                gpus = max(ctx.resources.gpus, ctx.resources.capacity.gpus)
                # no CPU asked, as for GPU k-means: the stage's CPU pool may hold every CPU of a GPU node
                with ActorPool(
                    ShardWorker, min(len(items), gpus), num_cpus=0, num_gpus=1,
                    placement_timeout_s=ctx.spec.ray.placement_timeout_s,
                ) as gpu_pool:  # fmt: skip
                    work = [(_assign_on_gpu_actor, p, str(out_dir), i, model_ref) for i, p in items]
                    sizes, devices = _fold_summaries(gpu_pool.imap("call", work, "assign"), ks)
            else:
                work = [(_assign, p, str(out_dir), i, model_ref) for i, p in items]
                sizes, devices = _fold_summaries(pool.imap("call", work, "assign"), ks)
            if dedup is not None:
                seconds["assign"], clock = time.perf_counter() - clock, time.perf_counter()
                tasks = ctx.workers(len(items))
                dedup_info = run_dedup(root, indices, n_rows, ks[dedup.side], dedup, on_pool(pool), tasks)
    seconds["dedup" if dedup is not None else "assign"] = time.perf_counter() - clock
    for side in ks:
        info[side]["sizes"] = sizes[side].tolist()
        info[side]["empty_clusters"] = int((sizes[side] == 0).sum())
        below = sizes[side]
        for level in info[side]["levels"]:
            below = np.bincount(level["parent"], weights=below, minlength=level["k"])
            level["sizes"] = below.astype(int).tolist()
    atomic_write_json(info, clusters_dir / "clusters.json")
    device = ",".join(sorted({info[side]["device"] for side in ks}))
    assign_device = ",".join(sorted(devices))
    summary = {"rows": n_rows, "k": ks, "device": device, "placement": placement,
               "assign": {"placement": assign_on, "device": assign_device},
               "seconds": {k: round(v, 3) for k, v in seconds.items()}}  # fmt: skip
    if dedup is not None:
        summary["dup_groups"] = dedup_info["groups"]
    return summary
