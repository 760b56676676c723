"""Cluster stage vs a bare faiss.Kmeans call vs scikit-learn KMeans, on the same data, in one run; and the
stage's k-means++ seeding (``cluster.init: kmeans++``, the default) against its random start.

    .venv/bin/python benchmarks/cluster.py                    # 200,000 x 512, k = 1024, 20 iterations
    .venv/bin/python benchmarks/cluster.py --rows 50000 --k 256 --skip-sklearn
    .venv/bin/python benchmarks/cluster.py --quick            # 20,000 x 128, k = 64, 1 round, no sklearn

The stage runs as "stage" with ``cluster.init: random`` and ``cluster.nredo: 1`` (faiss's own start, the
computation the bare baseline repeats) and as "stage k-means++" with the default seeding and restarts
(``nredo: auto``: 1 run at 200,000 x 512 or 262,144 x 512 with k = 1024, 2 at ``--quick``; the line prints
the number), in its own run directory, every round;
the script prints the seeded stage's time over the random one's per round (target <= 1.3) and both
objectives (the final faiss objective).

The data: unit vectors from a long-tailed Gaussian mixture (4 * k components), written as precomputed
embeddings in ``--shards`` parts. The stage (key-hash sample read from the parts, faiss training in the
driver, assignment of every row by the actor pool, parts committed to disk) is timed through
``rebalance.run(..., until="cluster")`` in a run directory whose embed stage is already complete, with Ray
already started (its ~4 s start-up is not counted). The baseline is what a user would write by hand on the
same in-memory array: ``faiss.Kmeans(d, k, niter, spherical=True, seed=0, max_points_per_centroid=256)``
then one ``index.search(x, 1)`` over every row.

Same work on both sides: k, niter, spherical, seed 0, the same training rows in the same order (the
stage's key-hash sample of min(rows, 256 k) rows of the vectors its embed stage wrote (re-normalised:
the last bits differ from the generated array), which the baseline gets as an in-memory array, so faiss
starts both from the same random rows and the two trainings are one computation: the script prints the
largest difference between the two sets of centroids; with another row order the training's time moves by
up to 10 % with the starting rows alone, see docs/performance.md), the same assignment
(exact L2 over every row), and the same threads (``os.cpu_count()``: faiss's OpenMP in the driver; the
stage's actors hold one CPU each and run faiss on one thread). The two alternate ``--repeat`` times
(stage first on even rounds, baseline first on odd ones) so that load from other jobs falls on both;
overhead = stage / baseline - 1 per round (target <= 15%), reported with its range over rounds. As
other jobs' load moves the ~20 s training by more than the overhead, the stage's fixed cost (its sample and
assign phases minus the baseline's search) and the gap between the two identical training calls are also
printed per round: the fixed cost is the part that the stage adds.
scikit-learn's KMeans (Lloyd, n_init=1, init="random" as faiss, max_iter = niter, tol = 0, the same
training rows, ``os.cpu_count()`` OpenMP threads) is timed once; it is plain Euclidean k-means (there is no
spherical option), which on unit vectors differs from faiss's only by centroid normalisation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

import rebalance
from rebalance.kernels.kmeans import gpu_available
from rebalance.kernels.sampling import bottom_k, key_priorities


def make_data(rows: int, dim: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    components = 4 * k
    p = np.arange(1, components + 1, dtype=float) ** -1.0
    labels = rng.choice(components, size=rows, p=p / p.sum())
    x = rng.normal(size=(components, dim)).astype(np.float32)[labels]
    x += 0.5 * rng.normal(size=(rows, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def write_shards(x: np.ndarray, path: Path, shards: int) -> None:
    path.mkdir(parents=True)
    for s, rows in enumerate(np.array_split(np.arange(len(x)), shards)):
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(x[rows].ravel()), x.shape[1])
        pq.write_table(
            pa.table({"key": [f"{i:09d}" for i in rows], "image": vectors}), path / f"p{s:03d}.parquet"
        )


def bare_faiss(
    train: np.ndarray, x: np.ndarray, k: int, niter: int, gpu: bool = False
) -> tuple[float, float, np.ndarray]:
    """Seconds for faiss.Kmeans training on ``train`` (on the GPU with ``gpu``, as the stage when one is
    there) and for one search of every row of ``x``; centroids."""
    start = time.perf_counter()
    km = faiss.Kmeans(
        x.shape[1], k, niter=niter, spherical=True, seed=0, max_points_per_centroid=256, gpu=gpu
    )
    km.train(train)
    trained = time.perf_counter()
    km.index.search(x, 1)
    return trained - start, time.perf_counter() - trained, km.centroids


def embedded_vectors(run: Path) -> np.ndarray:
    """The image vectors of a run's embed stage (the stage re-normalises them), row i = key i."""
    table = pa.concat_tables(
        pq.read_table(p, columns=["key", "image"]) for p in sorted(run.glob("embeddings/*.parquet"))
    )
    rows = np.array(table.column("key").to_pylist(), dtype=np.int64)
    vectors = np.empty((len(rows), table.schema.field("image").type.list_size), dtype=np.float32)
    vectors[rows] = table.column("image").combine_chunks().flatten().to_numpy().reshape(len(rows), -1)
    return vectors


def stage_sample_order(rows: int, m: int, seed: int) -> np.ndarray:
    """The rows the stage trains on, in its order: the m lowest key-hash priorities (keys as written by
    :func:`write_shards`), so that the baseline trains on the same rows in the same order."""
    return bottom_k(key_priorities([f"{i:09d}" for i in range(rows)], seed), m)


def train_only(args: argparse.Namespace) -> None:
    """The stage's training call alone (``train_kmeans`` on the generated rows, every thread), with each
    start, alternating over ``--repeat`` rounds, plus the seeding alone: the part of the stage that
    ``cluster.init`` changes (its sample and assign phases do not depend on it)."""
    from rebalance.kernels.kmeans import kmeans_plus_plus, train_kmeans

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    x = make_data(args.rows, args.dim, args.k, seed=0)
    print(f"train only: {args.rows} x {args.dim}, k = {args.k}, {args.niter} iterations, spherical, "
          f"{os.cpu_count()} threads; load {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
    times: dict[str, list[float]] = {"random": [], "kmeans++": []}
    for r in range(args.repeat):
        for init in ("random", "kmeans++") if r % 2 == 0 else ("kmeans++", "random"):
            start = time.perf_counter()
            nredo = "auto" if init == "kmeans++" else 1  # each start as the stage's default runs it
            result = train_kmeans(x, args.k, niter=args.niter, init=init, nredo=nredo)
            times[init].append(time.perf_counter() - start)
            print(f"  round {r} {init:9s} {times[init][-1]:7.2f} s, final objective {result.objective[-1]:.2f}"
                  " (spherical: sum of cosines, higher is better)", flush=True)  # fmt: skip
    start = time.perf_counter()
    kmeans_plus_plus(x, args.k, 0)
    ratios = [s / r for s, r in zip(times["kmeans++"], times["random"], strict=True)]
    print(f"  seeding alone {time.perf_counter() - start:.2f} s; k-means++ / random {statistics.median(ratios):.3f} "
          f"median per round; load {os.getloadavg()[0]:.2f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--niter", type=int, default=20)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3, help="alternating rounds of stage and baseline")
    parser.add_argument("--skip-sklearn", action="store_true")
    parser.add_argument("--quick", action="store_true", help="20,000 x 128, k = 64, 1 round, no sklearn")
    parser.add_argument(
        "--train-only", action="store_true", help="no Ray: only the training call, random vs k-means++ start"
    )
    args = parser.parse_args()
    if args.quick:
        args.rows, args.dim, args.k, args.repeat, args.skip_sklearn = 20_000, 128, 64, 1, True
    if args.train_only:
        train_only(args)
        return

    threads = os.cpu_count() or 1
    faiss.omp_set_num_threads(threads)
    gpu = gpu_available()  # the stage trains on the GPU when faiss has one: so does the baseline
    load_start = os.getloadavg()[0]
    x = make_data(args.rows, args.dim, args.k, seed=0)
    stage, bare, bare_search, phases, seeded, objectives = [], [], [], [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_shards(x, data, args.shards)
        spec = {
            "data": {"path": str(data), "format": "embeddings"},
            "cluster": {
                "image": {"k": args.k},
                "niter": args.niter,
                "sample_per_centroid": 256,
                "init": "random",
                "nredo": 1,
            },
            "balance": {"marginals": ["image_cluster"]},
        }
        seeded_spec = {**spec, "cluster": {**spec["cluster"], "init": "kmeans++", "nredo": "auto"}}
        ray.init(address="local", include_dashboard=False, configure_logging=False, log_to_driver=False)
        outs = [Path(tmp) / f"run{r}" for r in range(args.repeat)]
        seeded_outs = [Path(tmp) / f"seeded{r}" for r in range(args.repeat)]
        for out in outs + seeded_outs:
            rebalance.run(spec, out, until="embed")
        train = embedded_vectors(outs[0])[stage_sample_order(len(x), args.k * 256, seed=0)]
        for r, out in enumerate(outs):
            for which in ("stage", "bare", "seeded") if r % 2 == 0 else ("seeded", "bare", "stage"):
                if which == "seeded":
                    start = time.perf_counter()
                    rebalance.run(seeded_spec, seeded_outs[r], until="cluster")
                    seeded.append(time.perf_counter() - start)
                    continue
                if which == "bare":
                    train_s, search_s, bare_centroids = bare_faiss(train, x, args.k, args.niter, gpu)
                    bare.append(train_s + search_s)
                    bare_search.append(search_s)
                    continue
                start = time.perf_counter()
                rebalance.run(spec, out, until="cluster")
                stage.append(time.perf_counter() - start)
                phases.append(json.loads((out / "manifest.json").read_text())["stages"]["cluster"]["seconds"])
            print(
                f"  round {r}: stage {stage[-1]:.2f} s {phases[-1]}, bare faiss {bare[-1]:.2f} s, "
                f"stage k-means++ {seeded[-1]:.2f} s",
                flush=True,
            )
        for name, run_dirs in (("random", outs), ("kmeans++", seeded_outs)):
            info = json.loads((run_dirs[0] / "clusters" / "clusters.json").read_text())["image"]
            objectives[name] = info["objective"][-1]
        seeded_nredo = info["nredo"]
        train_rows = json.loads((outs[0] / "clusters" / "clusters.json").read_text())["image"]["train_rows"]
        stage_centroids = np.load(outs[0] / "clusters" / "image_centroids.npy")
        same = float(np.abs(stage_centroids - bare_centroids).max())
        ray.shutdown()

    sklearn_s = None
    if not args.skip_sklearn:
        from sklearn.cluster import KMeans
        from threadpoolctl import threadpool_limits

        with threadpool_limits(threads):
            start = time.perf_counter()
            model = KMeans(args.k, init="random", n_init=1, max_iter=args.niter, tol=0.0, random_state=0)
            model.fit(train)
            model.predict(x)
            sklearn_s = time.perf_counter() - start

    ratios = [s / b - 1 for s, b in zip(stage, bare, strict=True)]
    print(f"cluster benchmark: {args.rows} x {args.dim}, k = {args.k}, {args.niter} iterations, spherical, "
          f"{train_rows} training rows, {args.shards} shards, {threads} threads, {args.repeat} rounds, {'GPU' if gpu else 'CPU'} training")  # fmt: skip
    print(f"  rebalance cluster stage   {min(stage):8.2f} s best  ({', '.join(f'{s:.2f}' for s in stage)})")
    print(f"  bare faiss.Kmeans+search  {min(bare):8.2f} s best  ({', '.join(f'{s:.2f}' for s in bare)})")
    print(
        f"  stage overhead            {100 * statistics.median(ratios):+7.1f} % median per round, range "
        f"{100 * min(ratios):+.1f} .. {100 * max(ratios):+.1f} %; best/best {100 * (min(stage) / min(bare) - 1):+.1f} %"
        "  (target <= +15%)"
    )
    fixed = [ph["sample"] + ph["assign"] - b for ph, b in zip(phases, bare_search, strict=True)]
    train_gap = [ph["train"] - (b - bs) for ph, b, bs in zip(phases, bare, bare_search, strict=True)]
    print(
        f"  stage fixed cost          {statistics.median(fixed):8.2f} s median per round (range "
        f"{min(fixed):.2f} .. {max(fixed):.2f}): sample + assign - bare search = "
        f"{100 * statistics.median(fixed) / min(bare):+.1f} % of the best baseline"
    )
    print(
        f"  stage train - bare train  {statistics.median(train_gap):8.2f} s median per round (range "
        f"{min(train_gap):.2f} .. {max(train_gap):.2f}): the same faiss call and parameters"
    )
    print(f"  centroids, stage vs bare  max abs difference {same:.1e} (the same computation)")
    seeded_ratios = [s / r for s, r in zip(seeded, stage, strict=True)]
    print(
        f"  stage k-means++, {seeded_nredo} run(s) {min(seeded):6.2f} s best  ({', '.join(f'{s:.2f}' for s in seeded)}); "
        f"k-means++ / random {statistics.median(seeded_ratios):.3f} median per round (range "
        f"{min(seeded_ratios):.3f} .. {max(seeded_ratios):.3f}), best/best {min(seeded) / min(stage):.3f}"
        "  (target <= 1.3)"
    )
    print(
        f"  final objective           random {objectives['random']:.2f}, k-means++ {objectives['kmeans++']:.2f} "
        f"({objectives['kmeans++'] / objectives['random']:.4f} x)"
    )
    if sklearn_s is not None:
        print(f"  scikit-learn KMeans       {sklearn_s:8.2f} s  (once)")
        print(f"  sklearn / best stage      {sklearn_s / min(stage):8.2f} x")
    print(f"load average (1 min) at start / end: {load_start:.2f} / {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
