"""End to end at scale on precomputed CLIP-like vectors: per stage wall time, rows/s, peak memory, bytes, and
each stage's floor measured in the same run.

    .venv/bin/python benchmarks/scale.py --quick                                # ~1-2 min: 20,000 x 64
    nice -n 10 .venv/bin/python benchmarks/scale.py --rows 1000000 --dim 512 --shards 10 --k 1024
    .venv/bin/python benchmarks/scale.py --rows 300000 --dim 256 --k 256 --generate-only --data /tmp/d

The data: the clip-retrieval layout that ``format: embeddings`` reads (``img_emb/img_emb_{i}.npy`` and
``text_emb/text_emb_{i}.npy`` float16, ``metadata/metadata_{i}.parquet`` with ``key``, ``caption`` and the
true ``concept``), written shard by shard in chunks (the generator holds O(chunk d) memory). Each row draws
a concept from a Zipf(``--zipf``) law over ``--concepts`` concepts; its image vector is the concept's
unit centre plus isotropic noise of norm ``--noise``, normalised; its text vector likewise around a
text centre correlated with the image centre.

The run: the default spec (``cluster.{image,text}.k = --k``, ``data.carry: [concept]``), one
``rebalance.run(..., until=stage)`` per stage on a local Ray started first with ``--cpus`` CPUs (its
start-up is not counted). A thread samples every 0.25 s the RSS of this process (the driver) and of every
Ray worker process (``ray::...``, the actors), so "driver peak" and "largest actor" are the highest
samples inside the stage's window (a peak shorter than 0.25 s can be missed). Bytes are the sizes of the
files each stage reads and writes (``embed``: the dataset -> ``embeddings/``; ``cluster``: ``embeddings/``
-> ``assignments/``, ``clusters/``; ``balance``: ``assignments/`` -> ``weights/``, ``balance.json``;
``report``: ``embeddings/``, ``assignments/``, ``weights/`` -> ``report/``).

Floors, same data, same process count: ``embed`` pyarrow reading the shards' vectors and metadata and
writing the same columns as one Parquet file per shard; ``cluster`` bare ``faiss.Kmeans`` (same k, niter,
spherical, ``max_points_per_centroid``) trained on a sample of the stage's size and one ``index.search``
of every row, per side; ``balance`` one pass reading the label columns, a ``bincount`` of their joint
cells, and writing one weight per row; ``report`` one streamed pass (Parquet batches) over the vectors of
``embeddings/`` accumulating their sums and squares, and, printed beside it, the report's own spectra
arithmetic in one process (:func:`floor_report_moments`: per-group d x d moments of every row, both
phases, and the eigendecompositions). Printed as a table and written as JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import ray

import rebalance
from rebalance.kernels.spectra import GroupMoments
from rebalance.runtime.manifest import STAGES

CHUNK = 65536


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def generate(
    root: Path,
    rows: int,
    dim: int,
    shards: int,
    concepts: int,
    *,
    zipf: float = 1.1,
    noise: float = 0.8,
    seed: int = 0,
) -> dict[str, Any]:
    """Write ``rows`` rows in the clip-retrieval layout under ``root``; returns the concept counts."""
    rng = np.random.default_rng(seed)
    image_centres = _unit(rng.standard_normal((concepts, dim), dtype=np.float32))
    text_centres = _unit(image_centres + _unit(rng.standard_normal((concepts, dim), dtype=np.float32)))
    p = np.arange(1, concepts + 1, dtype=np.float64) ** -zipf
    p /= p.sum()
    for sub in ("img_emb", "text_emb", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    counts = np.zeros(concepts, np.int64)
    for i, n in enumerate(np.diff(np.linspace(0, rows, shards + 1).astype(np.int64))):
        n = int(n)
        img = np.lib.format.open_memmap(root / "img_emb" / f"img_emb_{i}.npy", "w+", np.float16, (n, dim))
        txt = np.lib.format.open_memmap(root / "text_emb" / f"text_emb_{i}.npy", "w+", np.float16, (n, dim))
        labels = rng.choice(concepts, size=n, p=p).astype(np.int32)
        counts += np.bincount(labels, minlength=concepts)
        scale = np.float32(noise / np.sqrt(dim))
        for lo in range(0, n, CHUNK):
            lab = labels[lo : lo + CHUNK]
            for out, centres in ((img, image_centres), (txt, text_centres)):
                x = centres[lab] + scale * rng.standard_normal((lab.size, dim), dtype=np.float32)
                out[lo : lo + lab.size] = _unit(x)
        img.flush()
        txt.flush()
        del img, txt
        keys = np.char.add(f"{i:05d}", np.char.zfill(np.arange(n).astype(str), 9))
        table = pa.table(
            {
                "key": pa.array(keys.tolist(), pa.string()),
                "caption": pa.array([f"a photo of concept {c}" for c in labels.tolist()], pa.string()),
                "concept": pa.array(labels),
            }
        )
        pq.write_table(table, root / "metadata" / f"metadata_{i}.parquet")
    return {"rows": rows, "dim": dim, "shards": shards, "concepts": concepts, "concept_counts": counts}


class MemorySampler(threading.Thread):
    """Samples every ``interval`` seconds: time, this process's RSS and private memory (RSS - shared: pages
    of the Ray object store that a process maps count in its RSS as shared), and the largest of each over the
    ``ray::`` worker processes."""

    def __init__(self, interval: float = 0.25):
        super().__init__(daemon=True)
        self.interval, self.samples, self.stopped = interval, [], threading.Event()
        self.me = psutil.Process()

    def run(self) -> None:
        while not self.stopped.is_set():
            actor = actor_private = 0
            for child in self.me.children(recursive=True):
                try:
                    if child.cmdline()[:1] and child.cmdline()[0].startswith("ray::"):
                        info = child.memory_info()
                        actor, actor_private = (
                            max(actor, info.rss),
                            max(actor_private, info.rss - info.shared),
                        )
                except (psutil.NoSuchProcess, psutil.AccessDenied, IndexError):
                    continue
            info = self.me.memory_info()
            self.samples.append((time.perf_counter(), info.rss, info.rss - info.shared, actor, actor_private))
            self.stopped.wait(self.interval)

    def peaks(self, start: float, end: float) -> list[int]:
        """Peak driver RSS, driver private (RSS - shared), largest actor RSS and private in [start, end]."""
        window = [s for s in self.samples if start <= s[0] <= end] or self.samples[-1:]
        return [max(s[i] for s in window) for i in range(1, 5)]


def _size(*paths: Path) -> int:
    total = 0
    for path in paths:
        if path.is_file():
            total += path.stat().st_size
        elif path.is_dir():
            total += sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return total


def _io(stage: str, data: Path, out: Path) -> tuple[int, int]:
    """(bytes read, bytes written) of a stage: the sizes of its input and output files."""
    read, written = {
        "embed": ([data], [out / "embeddings"]),
        "cluster": ([out / "embeddings"], [out / "assignments", out / "clusters"]),
        "balance": ([out / "assignments"], [out / "weights", out / "balance.json"]),
        "report": ([out / "embeddings", out / "assignments", out / "weights"], [out / "report"]),
    }[stage]
    return _size(*read), _size(*written)


def floor_embed(data: Path, scratch: Path) -> float:
    """Read every shard's vectors (float16 -> float32) and metadata, write them as one Parquet per shard."""
    t = time.perf_counter()
    for i, meta in enumerate(sorted((data / "metadata").glob("metadata_*.parquet"))):
        n = meta.stem.split("_")[1]
        columns = pq.read_table(meta, columns=["key", "concept"])
        for side, role in (("image", "img_emb"), ("text", "text_emb")):
            x = np.load(data / role / f"{role}_{n}.npy").astype(np.float32)
            flat = pa.array(x.reshape(-1))
            columns = columns.append_column(side, pa.FixedSizeListArray.from_arrays(flat, x.shape[1]))
        pq.write_table(columns, scratch / f"part-{i:05d}.parquet")
    return time.perf_counter() - t


def floor_cluster(data: Path, k: int, niter: int, per_centroid: int, seed: int) -> float:
    """Per side: bare faiss k-means on a uniform sample of min(rows, k per_centroid) rows, then assign all."""
    t = time.perf_counter()
    for role in ("img_emb", "text_emb"):
        files = sorted((data / role).glob("*.npy"))
        arrays = [np.load(f, mmap_mode="r") for f in files]
        rows = sum(a.shape[0] for a in arrays)
        take = np.sort(
            np.random.default_rng(seed).choice(rows, size=min(rows, k * per_centroid), replace=False)
        )
        offsets = np.cumsum([0] + [a.shape[0] for a in arrays])
        sample = np.concatenate(
            [
                a[take[(take >= lo) & (take < hi)] - lo]
                for a, lo, hi in zip(arrays, offsets[:-1], offsets[1:], strict=True)
            ]
        ).astype(np.float32)
        km = faiss.Kmeans(
            sample.shape[1], k, niter=niter, spherical=True, seed=seed, max_points_per_centroid=per_centroid
        )
        km.train(sample)
        for a in arrays:
            for lo in range(0, a.shape[0], CHUNK * 4):
                km.index.search(np.ascontiguousarray(a[lo : lo + CHUNK * 4], dtype=np.float32), 1)
    return time.perf_counter() - t


def floor_balance(out: Path, scratch: Path, k: int) -> float:
    """Read the label columns, bincount their joint cells, write one weight per row (1 / cell count)."""
    t = time.perf_counter()
    parts = sorted((out / "assignments").glob("part-*.parquet"))
    labels = [pq.read_table(p, columns=["image_cluster", "text_cluster"]) for p in parts]
    cells = [t.column(0).to_numpy().astype(np.int64) * k + t.column(1).to_numpy() for t in labels]
    counts = np.bincount(np.concatenate(cells), minlength=k * k)
    for i, c in enumerate(cells):
        pq.write_table(pa.table({"weight": 1.0 / counts[c]}), scratch / f"weights-{i:05d}.parquet")
    return time.perf_counter() - t


def floor_report(out: Path) -> float:
    """One streamed pass over the vectors of embeddings/: per side, the sum and sum of squares."""
    t = time.perf_counter()
    sums: dict[str, np.ndarray] = {}
    for part in sorted((out / "embeddings").glob("part-*.parquet")):
        for batch in pq.ParquetFile(part).iter_batches(batch_size=CHUNK, columns=["image", "text"]):
            for name, column in zip(batch.schema.names, batch.columns, strict=True):
                x = column.flatten().to_numpy().reshape(len(column), -1).astype(np.float64)
                moments = np.stack([x.sum(axis=0), np.einsum("ij,ij->j", x, x)])
                sums[name] = sums.get(name, 0) + moments
    return time.perf_counter() - t


def floor_report_moments(data: Path, k: int) -> float:
    """The report's spectra arithmetic alone, one process: per side, per-group float64 second moments of
    every row (the concept modulo k as the group), unweighted and weighted (the two phases), merged over the
    shards, then the k eigendecompositions per side and phase."""
    t = time.perf_counter()
    for role in ("img_emb", "text_emb"):
        acc: dict[str, GroupMoments] = {}
        for f in sorted((data / role).glob("*.npy")):
            meta = data / "metadata" / f"metadata_{f.stem.split('_')[-1]}.parquet"
            groups = pq.read_table(meta, columns=["concept"]).column(0).to_numpy() % k
            x = np.load(f).astype(np.float32)
            w = np.random.default_rng(0).random(len(x))
            for phase, weights in (("before", None), ("after", w)):
                m = GroupMoments.from_batch(x, groups, k, weights)
                acc[phase] = acc[phase].merge(m) if phase in acc else m
        for m in acc.values():
            m.spectra()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--concepts", type=int, default=2000)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--data", type=Path, help="dataset directory (generated there unless it exists)")
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temporary directory)")
    parser.add_argument("--out", type=Path, help="run directory, kept (default: in the scratch directory)")
    parser.add_argument("--generate-only", action="store_true")
    parser.add_argument("--no-floors", action="store_true")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--quick", action="store_true", help="20,000 x 64, 4 shards, 200 concepts, k = 32")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.dim, args.shards, args.concepts, args.k = 20_000, 64, 4, 200, 32
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        tmp = Path(tmp)
        data = args.data or tmp / "data"
        t = time.perf_counter()
        if not (data / "img_emb").is_dir():
            generate(data, args.rows, args.dim, args.shards, args.concepts, zipf=args.zipf)
        generate_s = time.perf_counter() - t
        print(f"data: {data} ({_size(data) / 2**20:.0f} MiB, generated in {generate_s:.1f} s)")
        if args.generate_only:
            return {"data": str(data)}
        return _run(args, data, tmp)


def _run(args: argparse.Namespace, data: Path, tmp: Path) -> dict[str, Any]:
    spec = {
        "data": {"path": str(data), "format": "embeddings", "carry": ["concept"]},
        "cluster": {"image": {"k": args.k}, "text": {"k": args.k}},
    }
    out = args.out or tmp / "run"
    ray.init(
        address="local",
        num_cpus=args.cpus,
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=False,
    )
    sampler = MemorySampler()
    sampler.start()
    results: dict[str, Any] = {"rows": args.rows, "dim": args.dim, "shards": args.shards, "k": args.k,
                               "cpus": args.cpus, "load_before": os.getloadavg(), "stages": {}}  # fmt: skip
    try:
        # no concepts section in this spec: that stage is a no-op, timed within the balance stage's run
        for stage in [s for s in STAGES if s != "concepts"]:
            start = time.perf_counter()
            rebalance.run(spec, out, until=stage)
            end = time.perf_counter()
            driver, driver_private, actor, actor_private = sampler.peaks(start, end)
            read, written = _io(stage, data, out)
            results["stages"][stage] = {"wall_s": end - start, "rows_per_s": args.rows / (end - start),
                                        "driver_peak_rss": driver, "actor_peak_rss": actor,
                                        "driver_peak_private": driver_private, "actor_peak_private": actor_private,
                                        "bytes_read": read, "bytes_written": written}  # fmt: skip
            print(f"{stage}: {json.dumps(results['stages'][stage])}", flush=True)
    finally:
        sampler.stopped.set()
        ray.shutdown()
    if not args.no_floors:
        scratch = tmp / "floor"
        scratch.mkdir()
        cluster = rebalance.Spec.from_dict({**spec}).cluster
        floors = {
            "embed": floor_embed(data, scratch),
            "cluster": floor_cluster(data, args.k, cluster.niter, cluster.sample_per_centroid, cluster.seed),
            "balance": floor_balance(out, scratch, args.k),
            "report": floor_report(out),
        }
        shutil.rmtree(scratch)
        for stage, seconds in floors.items():
            results["stages"][stage].update(
                floor_s=seconds, ratio=results["stages"][stage]["wall_s"] / seconds
            )
        report = results["stages"]["report"]
        report["moments_floor_s"] = floor_report_moments(data, args.k)
        report["moments_ratio"] = report["wall_s"] / report["moments_floor_s"]
    results["load_after"] = os.getloadavg()
    results["total_s"] = sum(s["wall_s"] for s in results["stages"].values())
    _print(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


def _print(results: dict[str, Any]) -> None:
    mib = 2**20
    print(f"\nN = {results['rows']:,} x {results['dim']}, {results['shards']} shards, k = {results['k']}, "
          f"{results['cpus']} CPUs, load {results['load_before'][0]:.1f} -> {results['load_after'][0]:.1f}")  # fmt: skip
    print(
        "| stage | wall s | rows/s | driver peak MiB (private) | largest actor MiB (private) | read MiB | written MiB | floor s | x floor |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for stage, s in results["stages"].items():
        floor = f"{s['floor_s']:.1f} | {s['ratio']:.2f}" if "floor_s" in s else "- | -"
        print(f"| {stage} | {s['wall_s']:.1f} | {s['rows_per_s']:,.0f} | {s['driver_peak_rss'] / mib:.0f} "
              f"({s['driver_peak_private'] / mib:.0f}) | {s['actor_peak_rss'] / mib:.0f} "
              f"({s['actor_peak_private'] / mib:.0f}) | {s['bytes_read'] / mib:.1f} | {s['bytes_written'] / mib:.1f} | "
              f"{floor} |")  # fmt: skip
    print(f"| total | {results['total_s']:.1f} | {results['rows'] / results['total_s']:,.0f} | | | | | | |")
    report = results["stages"].get("report", {})
    if "moments_floor_s" in report:
        print(f"report against its spectra arithmetic alone (per-group d x d moments, one process): "
              f"{report['moments_floor_s']:.1f} s, x {report['moments_ratio']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
