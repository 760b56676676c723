"""How well do near-duplicate groups (``dedup``) at each cosine threshold recover a pool's true copies?

    .venv/bin/python benchmarks/dedup_threshold.py runs/web-regime/run --threshold 0.95 0.99 0.998 0.999

RUN is a run directory of the web-regime pool (``benchmarks/web_regime.py``) whose embeddings carry
``label`` (the concept) and ``render`` (the near-duplicate group the generator made: one render's rows are
copies of one image, shifted by at most a pixel, with pixel noise). For each threshold, the groups the
``dedup`` stage would form (``rebalance.kernels.dedup.duplicate_roots`` inside each ``image_cluster``: the
default ``dedup.side: image``) against the renders: how many groups, the largest, the singletons, render
purity (share of rows in their group's most common render), the adjusted Rand index to the renders
(scikit-learn's ``adjusted_rand_score``) and the groups that mix two concepts. First, the share of pairs
inside one render and of pairs of different renders of one concept whose cosine reaches each threshold.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.metrics import adjusted_rand_score

from rebalance.data.parts import read_parts
from rebalance.kernels.dedup import duplicate_roots


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path)
    parser.add_argument("--threshold", type=float, nargs="+", default=[0.95, 0.99, 0.995, 0.998, 0.999])
    parser.add_argument("--pairs-per-concept", type=int, default=1500, help="rows sampled per concept")
    args = parser.parse_args()
    emb = read_parts(args.run / "embeddings", columns=["key", "image", "label", "render"])
    assign = read_parts(args.run / "assignments", columns=["key", "image_cluster"])
    if emb.column("key").to_pylist() != assign.column("key").to_pylist():
        raise SystemExit(f"{args.run}: embeddings and assignments list different rows")
    x = np.asarray(emb.column("image").to_pylist(), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    _, concept = np.unique(np.asarray(emb.column("label").to_pylist()), return_inverse=True)
    _, render = np.unique(
        np.stack([concept, emb.column("render").to_numpy()], 1), axis=0, return_inverse=True
    )
    render = render.ravel()
    cluster = assign.column("image_cluster").to_numpy()

    rng = np.random.default_rng(0)
    within, between = [], []
    for c in np.unique(concept):
        idx = np.flatnonzero(concept == c)
        idx = rng.choice(idx, min(idx.size, args.pairs_per_concept), replace=False)
        iu = np.triu_indices(idx.size, 1)
        sim = (x[idx] @ x[idx].T)[iu]
        same = (render[idx][:, None] == render[idx][None, :])[iu]
        within.append(sim[same])
        between.append(sim[~same])
    within, between = np.concatenate(within), np.concatenate(between)
    print(f"{len(x)} rows, {np.unique(render).size} renders, {np.unique(cluster).size} image clusters")
    print(f"{'threshold':>9} {'pairs in a render':>17} {'pairs of 2 renders':>18}")
    for t in args.threshold:
        print(f"{t:9.4f} {np.mean(within >= t):17.3f} {np.mean(between >= t):18.4f}")

    print(
        f"\n{'threshold':>9} {'groups':>7} {'largest':>7} {'single':>7} {'purity':>6} {'ARI':>6} {'mixed':>5}"
    )
    for t in args.threshold:
        group = np.empty(len(x), np.int64)
        for c in np.unique(cluster):
            idx = np.flatnonzero(cluster == c)
            group[idx] = idx[duplicate_roots(x[idx], t)]
        _, group, size = np.unique(group, return_inverse=True, return_counts=True)
        pairs, n = np.unique(np.stack([group, render], 1), axis=0, return_counts=True)
        majority = np.zeros(size.size, np.int64)
        np.maximum.at(majority, pairs[:, 0], n)
        concepts_per_group = np.bincount(np.unique(np.stack([group, concept], 1), axis=0)[:, 0])
        print(
            f"{t:9.4f} {size.size:7d} {size.max():7d} {int((size == 1).sum()):7d} "
            f"{majority.sum() / len(x):6.3f} {adjusted_rand_score(render, group):6.3f} "
            f"{int((concepts_per_group > 1).sum()):5d}"
        )


if __name__ == "__main__":
    main()
