"""Weighted samplers that train on a rebalance run: per-row weights in, dataset indices out.

A run directory's ``weights/part-*.parquet`` holds one ``key, weight`` row per dataset row. Training code
has a dataset whose items are in its own order; :func:`weights_for_keys` maps the run's weights onto that
order by key, and the samplers draw dataset indices with replacement, with probability proportional to
weight, from a stream fixed by ``(seed, epoch)``:

- :class:`WeightedKeySampler`: one process (a ``torch.utils.data.Sampler``; unlike torch's
  ``WeightedRandomSampler`` it is built from keys and is reproducible per epoch through :meth:`set_epoch`).
- :class:`DistributedWeightedSampler`: ``num_replicas`` ranks. Every rank draws the same global stream of
  ``num_replicas * num_samples`` indices for the epoch and keeps positions ``rank, rank + num_replicas, ...``,
  so the ranks' draws are disjoint positions of one stream, together exactly that stream, and the union
  does not depend on how many ranks there are beyond the stream's length.
- :func:`export_webdataset_buckets`: for WebDataset users, who cannot weight single samples: re-shard the
  rows into buckets of similar weight and return open_clip's ``--train-data`` and
  ``--train-data-upsampling-factors`` strings (use with ``--dataset-resampled``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from rebalance.kernels.sampling import check_weights, draw_with_replacement

__all__ = [
    "DistributedWeightedSampler",
    "WeightedKeySampler",
    "draw_weighted",
    "export_webdataset_buckets",
    "load_run_weights",
    "weights_for_keys",
]


def load_run_weights(run_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(keys, weights)`` of every row of a run directory's ``weights/`` parts (object array of str, float64)."""
    from rebalance.data.fs import as_path
    from rebalance.data.parts import read_parts

    weights_dir = as_path(run_dir) / "weights"
    if not weights_dir.is_dir():
        raise FileNotFoundError(
            f"{run_dir} has no weights/ directory: is it a finished rebalance run directory?"
        )
    table = read_parts(weights_dir, columns=["key", "weight"])
    keys = np.asarray(table.column("key").to_pylist(), dtype=object)
    weights = table.column("weight").to_numpy().astype(np.float64)
    return keys, weights


def _examples(values: Sequence[Any], limit: int = 5) -> str:
    shown = ", ".join(repr(v) for v in list(values)[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def weights_for_keys(
    run_dir: str | os.PathLike | tuple[Sequence[str], Sequence[float]],
    keys: Sequence[str],
    missing: str = "error",
) -> np.ndarray:
    """The run's weight of every dataset key, in the dataset's order: float64 array of ``len(keys)``.

    ``run_dir`` is a run directory or an explicit ``(keys, weights)`` pair. A dataset key that the run does
    not have (e.g. a row the pipeline rejected, or a different dataset) raises ValueError, or gets weight 0
    (never drawn) with ``missing="zero"``. Duplicate keys on either side raise ValueError; run keys that the
    dataset lacks are ignored (training on a subset is allowed).
    """
    if missing not in ("error", "zero"):
        raise ValueError(f"missing must be 'error' or 'zero', got {missing!r}")
    if isinstance(run_dir, tuple):
        run_keys, run_weights = np.asarray(run_dir[0], dtype=object), np.asarray(run_dir[1], dtype=np.float64)
        source = "the given weights"
    else:
        run_keys, run_weights = load_run_weights(run_dir)
        source = f"run {run_dir}"
    if run_keys.shape != run_weights.shape:
        raise ValueError(f"{len(run_keys)} keys but {len(run_weights)} weights")
    lookup: dict[str, int] = {}
    dup_run = []
    for i, k in enumerate(run_keys.tolist()):
        if k in lookup:
            dup_run.append(k)
        lookup[k] = i
    if dup_run:
        raise ValueError(f"{source} has duplicate keys: {_examples(dup_run)}")
    keys = [str(k) for k in keys]
    if len(set(keys)) != len(keys):
        seen: set[str] = set()
        dups = [k for k in keys if k in seen or seen.add(k)]
        raise ValueError(f"the dataset has duplicate keys: {_examples(dups)}")
    idx = np.fromiter((lookup.get(k, -1) for k in keys), dtype=np.int64, count=len(keys))
    absent = idx < 0
    if absent.all() and len(keys):
        raise ValueError(
            f"none of the dataset's {len(keys)} keys is in {source} (dataset keys look like "
            f"{_examples(keys, 3)}; the run's like {_examples(run_keys.tolist(), 3)}): wrong run directory?"
        )
    if absent.any() and missing == "error":
        raise ValueError(
            f"{int(absent.sum())} dataset keys have no weight in {source}: {_examples(np.asarray(keys)[absent])}. "
            "Rows the pipeline rejected have no weight; pass missing='zero' to never draw them."
        )
    out = np.zeros(len(keys), dtype=np.float64)
    out[~absent] = run_weights[idx[~absent]]
    return out


def _check_weights(weights: Any) -> np.ndarray:
    return check_weights(weights.detach().cpu() if isinstance(weights, torch.Tensor) else weights)


def draw_weighted(weights: np.ndarray, size: int, seed: int, epoch: int) -> np.ndarray:
    """``size`` indices drawn with replacement with probability ``weights / sum(weights)``; int64.

    The stream depends only on ``(seed, epoch)`` and the weights (numpy PCG64 seeded by
    ``SeedSequence([seed, epoch])``, inverse-CDF sampling: ``kernels.sampling.draw_with_replacement``).
    """
    w = _check_weights(weights)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch)])))
    return draw_with_replacement(w, size, rng)


class WeightedKeySampler(Sampler[int]):
    """Draws dataset indices with replacement, proportional to a rebalance run's weights (one process).

    ``WeightedKeySampler(run_dir, keys)`` maps the dataset's ``keys`` to the run's weights
    (:func:`weights_for_keys`; ``missing`` as there); ``WeightedKeySampler.from_weights(w)`` takes weights
    already in dataset order. Each epoch yields ``num_samples`` (default: the dataset size) indices from
    the stream of ``(seed, epoch)``; call :meth:`set_epoch` before each epoch for fresh draws.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike | tuple[Sequence[str], Sequence[float]] | None,
        keys: Sequence[str] | None = None,
        num_samples: int | None = None,
        seed: int = 0,
        missing: str = "error",
        *,
        weights: Any = None,
    ) -> None:
        if weights is None:
            if run_dir is None or keys is None:
                raise ValueError("give a run directory and the dataset's keys, or weights=")
            weights = weights_for_keys(run_dir, keys, missing)
        self.weights = _check_weights(weights)
        self.num_samples = self.weights.size if num_samples is None else int(num_samples)
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.seed = int(seed)
        self.epoch = 0

    @classmethod
    def from_weights(cls, weights: Any, num_samples: int | None = None, seed: int = 0) -> WeightedKeySampler:
        return cls(None, None, num_samples, seed, weights=weights)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def indices(self, epoch: int | None = None) -> np.ndarray:
        """This sampler's draws for ``epoch`` (default: the current one)."""
        return draw_weighted(
            self.weights, self.num_samples, self.seed, self.epoch if epoch is None else epoch
        )

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return self.num_samples


class DistributedWeightedSampler(Sampler[int]):
    """Weighted sampling with replacement for ``num_replicas`` ranks, disjoint across ranks.

    Per epoch one global stream of ``num_replicas * num_samples`` draws is made from ``(seed, epoch)``
    (:func:`draw_weighted`); rank ``r`` yields positions ``r, r + num_replicas, r + 2 num_replicas, ...``.
    ``num_samples`` is the number of draws per rank per epoch (default ``ceil(len(weights) / num_replicas)``,
    as in torch's ``DistributedSampler``). ``num_replicas`` and ``rank`` default to the initialised
    ``torch.distributed`` process group (else 1 and 0). Call :meth:`set_epoch` before each epoch.
    """

    def __init__(
        self,
        weights: Any,
        num_replicas: int | None = None,
        rank: int | None = None,
        num_samples: int | None = None,
        seed: int = 0,
    ) -> None:
        dist = torch.distributed
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas}, {rank}"
            )
        self.weights = _check_weights(weights)
        self.num_replicas, self.rank, self.seed = int(num_replicas), int(rank), int(seed)
        self.num_samples = (
            math.ceil(self.weights.size / self.num_replicas) if num_samples is None else int(num_samples)
        )
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.total_size = self.num_samples * self.num_replicas
        self.epoch = 0

    @classmethod
    def from_run_dir(
        cls,
        run_dir: str | os.PathLike,
        keys: Sequence[str],
        num_replicas: int | None = None,
        rank: int | None = None,
        num_samples: int | None = None,
        seed: int = 0,
        missing: str = "error",
    ) -> DistributedWeightedSampler:
        """Weights of the dataset's ``keys`` from a run directory (:func:`weights_for_keys`)."""
        return cls(weights_for_keys(run_dir, keys, missing), num_replicas, rank, num_samples, seed)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def global_indices(self, epoch: int | None = None) -> np.ndarray:
        """The whole stream of the epoch, all ranks' draws interleaved."""
        return draw_weighted(self.weights, self.total_size, self.seed, self.epoch if epoch is None else epoch)

    def indices(self, epoch: int | None = None) -> np.ndarray:
        """This rank's draws: positions ``rank::num_replicas`` of :meth:`global_indices`."""
        return self.global_indices(epoch)[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return self.num_samples


# --------------------------------------------------------------------------------------------------
# WebDataset export
# --------------------------------------------------------------------------------------------------


def export_webdataset_buckets(
    run_dir: str | os.PathLike,
    dataset: str | os.PathLike,
    out_dir: str | os.PathLike,
    n_buckets: int = 8,
    shard_size: int = 1000,
    image_column: str = "jpg",
    text_column: str = "txt",
    key_column: str = "key",
) -> dict[str, Any]:
    """Re-shard an img2dataset Parquet dataset into WebDataset buckets of similar weight.

    Rows with weight 0 are left out. The positive weights are cut into ``n_buckets`` equal-width bins of
    ``log(weight)`` (so within a bucket weights differ by at most a factor
    ``(max/min)^(1/n_buckets)``); each non-empty bucket ``b`` is written as ``out_dir/bucket-BB/NNNNNN.tar``
    (``{key}.jpg``, ``{key}.txt``, ``{key}.json`` with the key and weight, ``shard_size`` samples a tar).
    open_clip with ``--dataset-resampled`` draws each tar with probability proportional to its source's
    upsampling factor and then reads all of it, so a sample's expected frequency is proportional to the
    factor of its bucket: the factor is the bucket's mean weight, and every bucket's total share equals its
    share of the total weight. Returns (and writes to ``out_dir/buckets.json``) ``train_data``
    (``"b0/{000000..000003}.tar::b1/..."``), ``upsampling_factors`` (``"1.2::0.4::..."``), per-bucket rows,
    factor and weight range, ``total_variation``: the distance between the exact per-row sampling
    distribution and the bucketed one (0 = exact), and ``unsafe_keys`` (``count``, up to 5 ``examples``):
    rows left out because their key cannot name a tar member safely (``../``, an absolute path, NUL, ...:
    :func:`rebalance.data.webdataset_writer.unsafe_key`).
    """
    import pyarrow.parquet as pq

    from rebalance.data.webdataset_writer import unsafe_key, write_webdataset_tar

    if n_buckets < 1 or shard_size < 1:
        raise ValueError("n_buckets and shard_size must be >= 1")
    shards = sorted(Path(dataset).glob("*.parquet"))
    if not shards:
        raise FileNotFoundError(f"no Parquet shards in {dataset}")
    run_keys, run_weights = load_run_weights(run_dir)
    lookup = dict(zip(run_keys.tolist(), run_weights.tolist(), strict=True))
    positive = run_weights[run_weights > 0]
    lo, hi = math.log(positive.min()), math.log(positive.max())
    width = (hi - lo) / n_buckets if hi > lo else 1.0

    def bucket_of(w: float) -> int:
        return min(n_buckets - 1, int((math.log(w) - lo) / width)) if hi > lo else 0

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pending: dict[int, list[dict[str, bytes]]] = {b: [] for b in range(n_buckets)}
    n_tars = dict.fromkeys(range(n_buckets), 0)
    rows = dict.fromkeys(range(n_buckets), 0)
    wsum = dict.fromkeys(range(n_buckets), 0.0)
    wmin: dict[int, float] = {}
    wmax: dict[int, float] = {}
    exact_weights: dict[str, tuple[int, float]] = {}
    unsafe: list[str] = []

    def flush(b: int) -> None:
        (out / f"bucket-{b:02d}").mkdir(exist_ok=True)
        write_webdataset_tar(out / f"bucket-{b:02d}" / f"{n_tars[b]:06d}.tar", pending[b])
        n_tars[b] += 1
        pending[b] = []

    for shard in shards:
        table = pq.read_table(shard, columns=[key_column, image_column, text_column])
        for key, img, txt in zip(
            table.column(key_column).to_pylist(),
            table.column(image_column).to_pylist(),
            table.column(text_column).to_pylist(),
            strict=True,
        ):
            w = lookup.get(key)
            if w is None or w <= 0 or img is None:
                continue
            if unsafe_key(key):
                unsafe.append(key)
                continue
            b = bucket_of(w)
            rows[b] += 1
            wsum[b] += w
            wmin[b], wmax[b] = min(wmin.get(b, w), w), max(wmax.get(b, w), w)
            exact_weights[key] = (b, w)
            meta = json.dumps({"key": key, "weight": w}).encode()
            pending[b].append(
                {"__key__": key.encode(), "jpg": img, "txt": (txt or "").encode(), "json": meta}
            )
            if len(pending[b]) >= shard_size:
                flush(b)
    for b in range(n_buckets):
        if pending[b]:
            flush(b)
    used = [b for b in range(n_buckets) if rows[b]]
    if not used:
        raise ValueError(f"no dataset row of {dataset} has a positive weight in {run_dir}")
    factors = {b: wsum[b] / rows[b] for b in used}
    total = sum(wsum[b] for b in used)
    tv = 0.5 * sum(abs(w - factors[b]) for b, w in exact_weights.values()) / total
    train_data = "::".join(
        str(out / f"bucket-{b:02d}" / ("{000000.." + f"{n_tars[b] - 1:06d}" + "}.tar")) for b in used
    )
    info = {
        "train_data": train_data,
        "upsampling_factors": "::".join(f"{factors[b]:.6g}" for b in used),
        "buckets": [
            {
                "bucket": b,
                "rows": rows[b],
                "tars": n_tars[b],
                "factor": factors[b],
                "min_weight": wmin[b],
                "max_weight": wmax[b],
            }
            for b in used
        ],
        "rows": sum(rows[b] for b in used),
        "total_variation": tv,
        "unsafe_keys": {"count": len(unsafe), "examples": unsafe[:5]},
    }
    from rebalance.data.atomic import atomic_write_json

    atomic_write_json(info, out / "buckets.json")
    return info
