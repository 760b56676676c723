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
    "assign_torch",
    "gpu_available",
    "hierarchical_kmeans",
    "resampled_kmeans",
    "closest_per_cluster",
    "level_labels",
    "kmeans_plus_plus",
    "auto_nredo",
    "joint_vectors",
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


KMEANS_PP_MAX_REJECTS = 16  # consecutive rejected draws after which d2_sample refreshes its distances


def d2_sample(x: np.ndarray, m: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``m`` distinct rows of ``x`` (n, d) drawn as k-means++ draws them (Arthur & Vassilvitskii 2007): the
    first uniform, each next with probability D^2(x) / sum D^2, D the distance to the nearest row drawn so
    far. Returns their indices (m,) in draw order and the position in that list of every row's nearest
    drawn row (n,) int64.

    Exact D^2 sampling with the distance passes batched. D^2 (n,) is refreshed with faiss (a BLAS GEMM on
    every thread) against the rows drawn since the last refresh, not after every draw: in between, a draw
    proposes row i with probability D_old^2(i) / sum D_old^2 and accepts it with probability
    D^2(i) / D_old^2(i), D^2(i) computed for that row only against the few new rows. This is rejection
    sampling from a proposal that dominates the target, so every accepted row follows the k-means++ law
    exactly. A refresh comes when the new rows are as many as the ones before them, or after
    ``KMEANS_PP_MAX_REJECTS`` rejections in a row: about log2(m) passes over ``x`` and n m d multiply-adds
    in all, where one GEMV per draw would take m passes.
    """
    n, d = x.shape
    norms = np.einsum("ij,ij->i", x, x)
    drawn = np.empty((m, d), dtype=np.float32)  # the drawn rows, in draw order
    chosen = [int(rng.integers(n))]
    drawn[0] = x[chosen[0]]
    d2 = np.full(n, np.inf, dtype=np.float32)
    nearest = np.zeros(n, dtype=np.int64)
    start, rejects = 0, 0  # chosen[start:] are drawn but not yet folded into d2
    while True:
        c = len(chosen)
        if c > start and (c - start >= start or rejects >= KMEANS_PP_MAX_REJECTS or c == m):
            index = faiss.IndexFlatL2(d)
            index.add(drawn[start:c])
            dist, idx = index.search(x, 1)
            closer = dist[:, 0] < d2
            d2[closer] = np.maximum(dist[closer, 0], 0.0)
            nearest[closer] = idx[closer, 0] + start
            d2[chosen[start:]] = 0.0  # exactly: faiss's expanded form leaves rounding residue on drawn rows
            nearest[chosen[start:]] = np.arange(start, c)
            cumulative = np.cumsum(d2, dtype=np.float64)
            start, rejects = c, 0
            if c == m:
                return np.array(chosen, dtype=np.int64), nearest
            if cumulative[-1] <= 0:  # every row coincides with a drawn one: the rest uniformly
                rest = rng.choice(np.setdiff1d(np.arange(n), chosen), m - c, replace=False).tolist()
                drawn[c:] = x[rest]
                chosen.extend(rest)
                continue
        i = min(int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")), n - 1)
        true = float(d2[i])
        if c > start:  # against the rows drawn since the refresh, for row i only: one GEMV
            sq = norms[chosen[start:]] + norms[i] - 2.0 * (drawn[start:c] @ x[i])
            true = min(true, max(float(sq.min()), 0.0))
        if rng.random() * float(d2[i]) < true:
            drawn[c] = x[i]
            chosen.append(i)
            rejects = 0
        else:
            rejects += 1


def greedy_kmeans_plus_plus(
    y: np.ndarray, k: int, rng: np.random.Generator, weights: np.ndarray | None = None, trials: int = 0
) -> np.ndarray:
    """Greedy weighted k-means++ (scikit-learn's ``kmeans_plusplus``): indices (k,) of k rows of ``y`` (c, d),
    the first drawn with probability proportional to its weight, each next the best of ``trials`` rows
    (at least 2 + ln k, scikit-learn's number) drawn with probability w D^2 / sum w D^2: the one that leaves
    the smallest sum_i w_i min_j ||y_i - c_j||^2. O(c k d trials): meant for c a small multiple of k."""
    c = y.shape[0]
    w = np.ones(c) if weights is None else np.asarray(weights, dtype=np.float64)
    trials = max(trials, 2 + int(np.log(k)))
    norms = np.einsum("ij,ij->i", y, y).astype(np.float64)

    def sq_dist(rows: np.ndarray) -> np.ndarray:  # (len(rows), c)
        return np.maximum(norms[rows, None] + norms[None, :] - 2.0 * (y[rows] @ y.T).astype(np.float64), 0.0)

    cumulative_w = np.cumsum(w)
    first = min(int(np.searchsorted(cumulative_w, rng.random() * cumulative_w[-1], side="right")), c - 1)
    chosen = [first]
    closest = sq_dist(np.array([first]))[0]
    closest[first] = 0.0
    for _ in range(k - 1):
        cumulative = np.cumsum(w * closest)
        if cumulative[-1] <= 0:  # every row coincides with a chosen one: the rest uniformly
            rest = np.setdiff1d(np.arange(c), chosen)
            chosen.extend(rng.choice(rest, k - len(chosen), replace=False).tolist())
            break
        candidates = np.minimum(
            np.searchsorted(cumulative, rng.random(trials) * cumulative[-1], side="right"), c - 1
        )
        options = np.minimum(closest, sq_dist(candidates))
        options[np.arange(trials), candidates] = 0.0
        best = int(np.argmin(options @ w))
        chosen.append(int(candidates[best]))
        closest = options[best]
    return np.array(chosen, dtype=np.int64)


KMEANS_PP_ALL_ROWS = 4096  # kmeans_plus_plus runs greedy k-means++ on every row of at most this many rows
KMEANS_PP_ALL_ROWS_TRIALS = 16  # greedy trials per centre on that path (candidates: 2 + ln k)


def kmeans_plus_plus(x: np.ndarray, k: int, seed: int = 0, *, oversample: int = 2) -> np.ndarray:
    """k-means++ seeds: k distinct rows of ``x`` (n, d), (k, d) float32, built for k-means at scale.

    With n <= max(oversample * k, ``KMEANS_PP_ALL_ROWS``), greedy k-means++ on every row
    (:func:`greedy_kmeans_plus_plus`, as scikit-learn seeds, with max(2 + ln k,
    ``KMEANS_PP_ALL_ROWS_TRIALS``) trials per centre: on long-tailed mixtures a single run then reaches
    scikit-learn's ``KMeans(n_init=10)`` about as often as another ``n_init=10`` run does, docs/design.md
    "Restarts"). Otherwise in the manner of k-means|| (Bahmani et al. 2012): exact D^2 sampling of
    oversample * k candidate rows (:func:`d2_sample`, n oversample k d multiply-adds in faiss GEMMs,
    about ``oversample`` Lloyd iterations), each weighted by the number of rows nearest to it, then greedy
    weighted k-means++ (2 + ln k trials) on the candidates picks the k seeds. The greedy step's local
    trials are what finds small, distant clusters of a long-tailed mixture that plain D^2 sampling (which
    spends draws on the spread of the head clusters) misses."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must lie in [1, {n}] for {n} rows, got {k}")
    if oversample < 1:
        raise ValueError(f"oversample must be >= 1, got {oversample}")
    rng = np.random.default_rng(seed)
    if n <= max(oversample * k, KMEANS_PP_ALL_ROWS):
        return x[greedy_kmeans_plus_plus(x, k, rng, trials=KMEANS_PP_ALL_ROWS_TRIALS)].copy()
    candidates, nearest = d2_sample(x, oversample * k, rng)
    weights = np.bincount(nearest, minlength=candidates.size).astype(np.float64)
    return x[candidates[greedy_kmeans_plus_plus(x[candidates], k, rng, weights)]].copy()


AUTO_NREDO_BUDGET = 2**28  # multiply-adds per Lloyd iteration, summed over the restarts of nredo: auto
AUTO_NREDO_MAX = 10  # the most restarts nredo: auto gives (scikit-learn's n_init)


def auto_nredo(n: int, k: int, d: int) -> int:
    """``nredo: auto`` for k-means of k centroids on n training rows of dimension d:
    clamp(floor(B / (n k d)), 1, R_max), B = ``AUTO_NREDO_BUDGET`` = 2^28, R_max = ``AUTO_NREDO_MAX`` = 10.

    One Lloyd iteration costs n k d multiply-adds, so where this gives 2 or more runs, all of them together
    cost at most B per iteration: many where a run is cheap, as scikit-learn's n_init = 10, and 1 from
    n k d > B / 2 on (k >= 33 at d = 512 with 256 training rows per centroid; 262,144 x 512 with k = 1024
    is 1.4e11)."""
    return int(min(AUTO_NREDO_MAX, max(1, AUTO_NREDO_BUDGET // max(1, n * k * d))))


def train_kmeans(
    x: np.ndarray, k: int, *, niter: int = 20, spherical: bool = True, seed: int = 0, gpu: bool = False,
    nredo: int | str = 1, init: str = "kmeans++",
) -> KMeansResult:  # fmt: skip
    """Train k-means on ``x`` (n, d) float32 with faiss; the caller bounds n (faiss does no subsampling here).

    Spherical k-means re-normalises the centroids each iteration (for L2-normalised CLIP vectors).
    ``nredo`` runs from seeds seed, seed + 1, ... and keeps the centroids with the smallest sum of squared
    distances sum_i min_j ||x_i - c_j||^2 (one criterion for spherical and plain k-means alike);
    ``"auto"``: :func:`auto_nredo` runs.
    ``init``: ``kmeans++`` (:func:`kmeans_plus_plus`, fed to faiss as its initial centroids) or ``random``
    (faiss's own start: k distinct random rows).
    """
    if init not in ("random", "kmeans++"):
        raise ValueError(f"init must be 'random' or 'kmeans++', got {init!r}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if k < 1 or k > n:
        raise ValueError(f"k must lie in [1, {n}] for {n} training rows, got {k}")
    if nredo == "auto":
        nredo = auto_nredo(n, k, d)
    if isinstance(nredo, bool) or not isinstance(nredo, int) or nredo < 1:
        raise ValueError(f"nredo must be an integer >= 1 or 'auto', got {nredo!r}")
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


def assign(
    x: np.ndarray, centroids: np.ndarray, *, batch_size: int = 65536, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every row of ``x`` (n, d): labels (n,) int32 and squared L2 distances (n,) float32.

    ``device="cpu"``: faiss's exact flat index on the CPU; any other torch device (``"cuda"``,
    ``"cuda:1"``): :func:`assign_torch` there."""
    if device != "cpu":
        return assign_torch(x, centroids, device=device, batch_size=batch_size)
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


def assign_torch(
    x: np.ndarray, centroids: np.ndarray, *, device: str, batch_size: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`assign` with torch on ``device``, as faiss computes it: per row
    ``argmin_j |x|^2 + |c_j|^2 - 2 x.c_j`` in float32 (TF32 off), the distance clamped at 0.

    The centroids stay on the device; ``x`` moves in batches of ``batch_size`` rows (pinned host memory and
    non-blocking copies on CUDA). Labels agree with faiss's except where two centroids are within float32
    rounding of each other."""
    import torch

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    x = np.ascontiguousarray(x, dtype=np.float32)
    c = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32)).to(dev)
    c_norms = (c * c).sum(dim=1)
    labels = np.empty(x.shape[0], dtype=np.int32)
    distances = np.empty(x.shape[0], dtype=np.float32)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            for start in range(0, x.shape[0], batch_size):
                rows = torch.from_numpy(x[start : start + batch_size])
                rows = rows.pin_memory().to(dev, non_blocking=True) if cuda else rows
                d2 = (rows * rows).sum(dim=1, keepdim=True) + c_norms - 2.0 * (rows @ c.T)
                best, idx = d2.min(dim=1)
                labels[start : start + len(rows)] = idx.to(torch.int32).cpu().numpy()
                distances[start : start + len(rows)] = best.clamp_min_(0).cpu().numpy()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return labels, distances


def joint_vectors(image: np.ndarray, text: np.ndarray) -> np.ndarray:
    """Joint vectors (n, d_image + d_text) float32 of rows with unit image (n, d_image) and text (n, d_text)
    vectors: [image, text] / sqrt(2), unit vectors again. Their squared distance is the mean of the two
    sides' squared distances and their inner product the mean of the two cosines, so k-means on them
    weighs both sides equally."""
    if image.shape[0] != text.shape[0]:
        raise ValueError(f"image and text hold {image.shape[0]} and {text.shape[0]} rows")
    out = np.empty((image.shape[0], image.shape[1] + text.shape[1]), dtype=np.float32)
    np.multiply(image, np.float32(np.sqrt(0.5)), out=out[:, : image.shape[1]])
    np.multiply(text, np.float32(np.sqrt(0.5)), out=out[:, image.shape[1] :])
    return out


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
