"""Which coarse level would a model-selection rule pick? Silhouette of candidate levels over a run's centroids.

    .venv/bin/python benchmarks/level_silhouette.py runs/web-regime/run --truth label
    .venv/bin/python benchmarks/level_silhouette.py RUN --truth label --levels 8 12 16 24 32 --side image

For each side's base centroids (``clusters/<side>_centroids.npy`` of a finished cluster stage) and each
candidate k, the level the cluster stage would build with ``cluster.levels: [k]``
(:func:`rebalance.kernels.kmeans.hierarchical_kmeans` with the run's ``niter``, ``seed``, ``spherical``,
``init`` and ``resampling_steps`` from ``clusters/clusters.json``), and prints:

- ``silhouette``: the mean cosine silhouette of the base centroids under the level's partition (each
  centroid counts once, as in the level's k-means); the rule "largest silhouette" picks the starred row;
- against a carried ground-truth column (``--truth``, in ``embeddings/``): the adjusted Rand index of the
  rows' level labels to the truth, and the truth's total variation to uniform when every level cluster
  gets the same mass (the concept mix that balancing ``<side>_cluster_1`` exactly would give).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.metrics import adjusted_rand_score, silhouette_score

from rebalance.data.parts import read_parts
from rebalance.kernels.kmeans import hierarchical_kmeans


def level_table(run: Path, side: str, levels: list[int], truth: str | None) -> list[dict]:
    """One record per candidate k < the side's number of centroids: silhouette, and ARI / TV with ``truth``."""
    info = json.loads((run / "clusters" / "clusters.json").read_text())[side]
    centroids = np.load(run / "clusters" / f"{side}_centroids.npy")
    base = read_parts(run / "assignments", columns=[f"{side}_cluster"]).column(0).to_numpy()
    labels = None
    if truth is not None:
        values = read_parts(run / "embeddings", columns=[truth]).column(0).to_pylist()
        labels = np.unique(values, return_inverse=True)[1]
    resampling = info["levels"][0]["resampling_steps"] if info["levels"] else 10
    out = []
    for k in levels:
        if not 2 <= k < len(centroids):
            continue
        level = hierarchical_kmeans(
            centroids, [k], niter=info["niter"], spherical=info["spherical"], seed=info["seed"],
            resampling_steps=resampling, init=info.get("init", "kmeans++"),
        )[0]  # fmt: skip
        record = {"k": k, "silhouette": float(silhouette_score(centroids, level.parent, metric="cosine"))}
        if labels is not None:
            rows = level.parent[base]
            w = 1.0 / np.bincount(rows, minlength=k)[rows]
            share = np.bincount(labels, weights=w) / w.sum()
            record["ari"] = float(adjusted_rand_score(labels, rows))
            record["truth_tv"] = float(0.5 * np.abs(share - 1 / share.size).sum())
        out.append(record)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path, help="run directory with a finished cluster stage")
    parser.add_argument("--truth", default=None, help="carried ground-truth column (e.g. label)")
    parser.add_argument("--side", nargs="+", default=["image", "text"])
    parser.add_argument(
        "--levels", type=int, nargs="+", default=[6, 8, 12, 16, 18, 20, 24, 28, 32, 40, 48, 64]
    )
    args = parser.parse_args(argv)
    results = {}
    for side in args.side:
        rows = level_table(args.run, side, args.levels, args.truth)
        results[side] = rows
        best = max(rows, key=lambda r: r["silhouette"])["k"]
        k = len(np.load(args.run / "clusters" / f"{side}_centroids.npy"))
        print(f"{side}: {k} base centroids")
        print(f"  {'k':>4s} {'silhouette':>10s}" + (f" {'ARI':>6s} {'truth TV':>8s}" if args.truth else ""))
        for r in rows:
            extra = f" {r['ari']:6.3f} {r['truth_tv']:8.3f}" if args.truth else ""
            print(f"  {r['k']:4d} {r['silhouette']:10.3f}{extra}{' *' if r['k'] == best else ''}")
    return results


if __name__ == "__main__":
    main()
