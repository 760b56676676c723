"""k-means with faiss (GPU when asked and available, CPU otherwise) and nearest-centroid assignment."""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

__all__ = [
    "KMeansResult",
    "KMeansLevel",
    "train_kmeans",
    "assign",
    "gpu_available",
    "hierarchical_kmeans",
    "resampled_kmeans",
    "closest_per_cluster",
    "level_labels",
]


def gpu_available() -> bool:
    """True when torch sees a CUDA device and faiss was built with GPU support.

    A CPU-only faiss answers first (without importing torch, ~1 s); otherwise torch is asked before faiss:
    faiss GPU calls on a machine with a missing or old driver have aborted processes.
    """
    if not hasattr(faiss, "StandardGpuResources"):
        return False
    try:
        import torch

        if not torch.cuda.is_available():
            return False
    except ImportError:
        return False
    return faiss.get_num_gpus() > 0


@dataclass
class KMeansResult:
    """centroids: (k, d) float32 (unit rows when spherical); objective: the k-means objective per iteration."""

    centroids: np.ndarray
    objective: list[float]


def kmeans_plus_plus(x: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): k rows of ``x`` (n, d), the first uniform, each next
    drawn with probability D(x)^2 / sum D^2, D the distance to the nearest row drawn so far; (k, d) float32.
    One GEMV per draw, O(n k d) in all: meant for the coarser levels, whose inputs are centroids."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    norms = np.einsum("ij,ij->i", x, x).astype(np.float64)
    chosen = [int(rng.integers(n))]
    d2 = np.full(n, np.inf)
    for _ in range(k - 1):
        i = chosen[-1]
        d2 = np.minimum(d2, np.maximum(norms + norms[i] - 2.0 * (x @ x[i]).astype(np.float64), 0.0))
        total = d2.sum()
        chosen.append(int(rng.choice(n, p=d2 / total)) if total > 0 else int(rng.integers(n)))
    return x[chosen].copy()


def train_kmeans(
    x: np.ndarray, k: int, *, niter: int = 20, spherical: bool = True, seed: int = 0, gpu: bool = False,
    nredo: int = 1, init: str = "random",
) -> KMeansResult:  # fmt: skip
    """Train k-means on ``x`` (n, d) float32 with faiss; the caller bounds n (faiss does no subsampling here).

    Spherical k-means re-normalises the centroids each iteration (for L2-normalised CLIP vectors).
    ``nredo`` runs from seeds seed, seed + 1, ... and keeps the centroids with the smallest sum of squared
    distances sum_i min_j ||x_i - c_j||^2 (one criterion for spherical and plain k-means alike).
    ``init``: ``random`` (faiss: k distinct random rows) or ``kmeans++`` (:func:`kmeans_plus_plus`).
    """
    if init not in ("random", "kmeans++"):
        raise ValueError(f"init must be 'random' or 'kmeans++', got {init!r}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if k < 1 or k > n:
        raise ValueError(f"k must lie in [1, {n}] for {n} training rows, got {k}")
    best: tuple[float, KMeansResult] | None = None
    for redo in range(nredo):
        km = faiss.Kmeans(
            d, k, niter=niter, spherical=spherical, seed=seed + redo, gpu=gpu, verbose=False,
            max_points_per_centroid=max(1, -(-n // k)), min_points_per_centroid=1,
        )  # fmt: skip
        km.train(x, init_centroids=kmeans_plus_plus(x, k, seed + redo) if init == "kmeans++" else None)
        result = KMeansResult(np.array(km.centroids, dtype=np.float32), [float(v) for v in km.obj])
        sse = float(assign(x, result.centroids)[1].astype(np.float64).sum()) if nredo > 1 else 0.0
        if best is None or sse < best[0]:
            best = (sse, result)
    return best[1]


def assign(x: np.ndarray, centroids: np.ndarray, *, batch_size: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every row of ``x`` (n, d): labels (n,) int32 and squared L2 distances (n,) float32."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    labels = np.empty(x.shape[0], dtype=np.int32)
    distances = np.empty(x.shape[0], dtype=np.float32)
    for start in range(0, x.shape[0], batch_size):
        dist, idx = index.search(x[start : start + batch_size], 1)
        labels[start : start + batch_size] = idx[:, 0]
        distances[start : start + batch_size] = dist[:, 0]
    return labels, distances


@dataclass
class KMeansLevel:
    """One coarser level: centroids (k_l, d) and parent (k_{l-1},), the level-l cluster of each centroid of the
    level below."""

    centroids: np.ndarray
    parent: np.ndarray
    objective: list[float]


def closest_per_cluster(labels: np.ndarray, distances: np.ndarray, k: int, s: int) -> np.ndarray:
    """Indices (ascending) of the ``s`` rows nearest to their centroid in each of the ``k`` clusters (all rows
    of a cluster with fewer), given each row's cluster ``labels`` (n,) and ``distances`` (n,) to it; ties
    go to the lower index."""
    order = np.lexsort((np.arange(labels.size), distances, labels))  # by cluster, then distance, then index
    starts = np.searchsorted(labels[order], np.arange(k))
    rank = np.arange(labels.size) - starts[labels[order]]
    return np.sort(order[rank < s])


def resampled_kmeans(
    x: np.ndarray, k: int, *, steps: int = 10, sample_size: int | None = None, niter: int = 20,
    spherical: bool = True, seed: int = 0, gpu: bool = False, init: str = "kmeans++",
) -> KMeansResult:  # fmt: skip
    """k-means with resampling steps (Vo et al. 2024, Algorithm 1; their code's "closest" strategy).

    k-means on ``x`` (n, d), then ``steps`` times: assign every row of ``x`` to the current centroids, keep
    the ``s`` rows nearest to the centroid in each cluster (``sample_size``; default ceil(n / 2k), half the
    mean cluster size, as in the paper's configurations), and re-run k-means from a fresh initialisation
    (seed + step) on that union of at most k * s rows. Each cluster, dense or sparse, weighs at most s rows
    in the next run, so centroids drift from where ``x`` is dense toward an even cover of its support.
    Stops early when the union holds fewer than k rows. Returns the last run's centroids (k, d).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[0]
    s = max(1, -(-n // (2 * k))) if sample_size is None else sample_size
    if s < 1:
        raise ValueError(f"sample_size must be >= 1, got {s}")
    result = train_kmeans(x, k, niter=niter, spherical=spherical, seed=seed, gpu=gpu, init=init)
    for step in range(1, steps + 1):
        labels, distances = assign(x, result.centroids)
        chosen = closest_per_cluster(labels, distances, k, s)
        if chosen.size < k:
            break
        result = train_kmeans(
            x[chosen], k, niter=niter, spherical=spherical, seed=seed + step, gpu=gpu, init=init
        )
    return result


def hierarchical_kmeans(
    centroids: np.ndarray, levels: list[int], *, niter: int = 20, spherical: bool = True, seed: int = 0,
    gpu: bool = False, resampling_steps: int = 10, sample_size: int | None = None, init: str = "kmeans++",
) -> list[KMeansLevel]:  # fmt: skip
    """k-means on the centroids of the level below, once per entry of ``levels`` (Vo et al. 2024), each
    with ``resampling_steps`` resampling steps (:func:`resampled_kmeans`; 0: plain k-means).

    Every centroid of the level below counts once, however many rows it holds; the resampling steps then
    keep a dense region's many near-duplicate centroids from drawing most coarse centroids to it, so the
    coarse concepts cover the embedding space evenly rather than following the data's density. Levels nest
    by construction: a row's level-l cluster is ``parent_l[...parent_1[base cluster]]``, where parent_l
    (k_{l-1},) is the nearest level-l centroid of each level-(l-1) centroid.
    """
    out = []
    below = np.ascontiguousarray(centroids, dtype=np.float32)
    for k in levels:
        result = resampled_kmeans(
            below, k, steps=resampling_steps, sample_size=sample_size, niter=niter, spherical=spherical,
            seed=seed, gpu=gpu, init=init,
        )  # fmt: skip
        parent, _ = assign(below, result.centroids)
        out.append(KMeansLevel(result.centroids, parent, result.objective))
        below = result.centroids
    return out


def level_labels(base: np.ndarray, parents: list[np.ndarray]) -> list[np.ndarray]:
    """Labels of rows at every coarser level, given their base labels (n,) and each level's parent map."""
    labels, out = base, []
    for parent in parents:
        labels = parent[labels]
        out.append(labels.astype(np.int32))
    return out
