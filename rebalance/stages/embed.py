"""Embed stage: Ray actors read shards and embed images and captions with an open_clip model.

Output: ``embeddings/part-NNNNN.parquet`` per input shard with ``key``, ``image`` and ``text``
(fixed_size_list<float32>[d], L2-normalised; a side absent from the dataset is absent here too) and the
carried columns, rows in input order. Rows that cannot be used are not written; their keys and reasons
are in the part summaries and, summed, in the manifest.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rebalance.data import readers
from rebalance.data.atomic import atomic_open, atomic_write_json
from rebalance.data.images import decode_image
from rebalance.data.parts import part_path, part_summary
from rebalance.data.readers import RowBatch, Shard, check_unique_keys, key_counts, read_shard
from rebalance.kernels.vectors import normalize_rows
from rebalance.runtime.placement import plan_embed
from rebalance.runtime.pool import ActorPool, ShardWorker
from rebalance.runtime.prefetch import prefetch
from rebalance.spec import DataSpec, EmbedSpec
from rebalance.stages.context import StageContext

__all__ = ["EmbedWorker", "run_embed"]

log = logging.getLogger(__name__)

MAX_REJECTED_IN_MANIFEST = 10_000


@dataclass
class _Prepared:
    """A batch after its CPU work: per-row rejection reasons, preprocessed image tensors and captions
    (None for a side the dataset lacks), or normalised given vectors (``format: embeddings``)."""

    batch: RowBatch
    reasons: list[str | None]
    images: list | None = None
    texts: list[str | None] | None = None
    vectors: dict[str, np.ndarray] = field(default_factory=dict)


class EmbedWorker:
    """Ray actor holding one open_clip model; embeds whole shards and commits one part per shard.

    ``device`` is ``cpu`` or ``cuda`` (resolved by the driver: :func:`rebalance.runtime.placement.plan_embed`).
    On ``cpu`` the actor's ``threads`` run torch; on ``cuda`` they decode and preprocess images (a thread
    pool: Pillow and the transforms release the GIL) while the GPU encodes, and batches reach the GPU
    through pinned memory with non-blocking copies.
    """

    def __init__(
        self,
        embed: EmbedSpec,
        data: DataSpec,
        fmt: str,
        image_column: str | None,
        text_column: str | None,
        threads: int,
        device: str = "cpu",
    ):
        from concurrent.futures import ThreadPoolExecutor

        import torch

        self.embed, self.data = embed, data
        self.fmt, self.image_column, self.text_column = fmt, image_column, text_column
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                "embed actor was given a GPU by Ray but torch sees no CUDA device "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): check the node's driver"
            )
        self.device = device
        torch.set_num_threads(1 if device == "cuda" else max(1, threads))
        self.decoders = ThreadPoolExecutor(max(1, threads) if device == "cuda" else 1, "decode")
        self.model = None
        if fmt != "embeddings":
            from rebalance.models import load_model

            self.model = load_model(self.embed.model, self.embed.pretrained, self.device, self.embed.seed)

    def embed_shard(self, shard: Shard, out_dir: str) -> dict[str, Any]:
        """Embed one shard into ``out_dir/part-<shard.index>``; returns the part summary. Idempotent."""
        done = part_summary(out_dir, shard.index)
        if done is not None:
            return done
        start = time.perf_counter()
        rejected: list[tuple[str, str]] = []
        rows = 0
        writer = None
        with atomic_open(part_path(out_dir, shard.index)) as handle:
            batches = read_shard(
                shard, self.data, self.fmt, self.image_column, self.text_column, self.embed.batch_size
            )
            # Reading, decoding and preprocessing batch i + 1 overlap the model's encoding of batch i.
            depth = self.embed.prefetch
            ready = prefetch(batches, self._prepare, depth) if depth else map(self._prepare, batches)
            for prepared in ready:
                table, batch_rejected = self._encode(prepared)
                rejected += prepared.batch.rejected + batch_rejected
                if writer is None:
                    writer = pq.ParquetWriter(handle, table.schema)
                writer.write_table(table)
                rows += table.num_rows
            writer.close()
        summary = {
            "rows": rows,
            "rejected": rejected,
            "seconds": round(time.perf_counter() - start, 3),
            **self.encoder(),
        }
        atomic_write_json(summary, part_path(out_dir, shard.index, ".json"))
        return summary

    def encoder(self) -> dict[str, str | None]:
        """The device and the compute dtype that encoded this actor's rows (None: given vectors)."""
        if self.model is None:
            return {"device": None, "dtype": None}
        return {"device": self.device, "dtype": "bfloat16" if self.device == "cuda" else "float32"}

    def _decode_preprocess(self, data: bytes | None) -> tuple[Any, str | None]:
        """One image: (preprocessed tensor, None) or (None, reason)."""
        try:
            image = decode_image(data)
        except ValueError as err:
            return None, str(err)
        try:
            return self.model.preprocess(image), None
        except Exception as err:  # a decoded image the model's transform cannot take
            return None, f"image:preprocess failed ({type(err).__name__}: {err})"

    def _prepare(self, batch: RowBatch) -> _Prepared:
        """The CPU side of a batch: decode and preprocess images, check captions, normalise given vectors."""
        n = len(batch.keys)
        prepared = _Prepared(batch, [None] * n)
        reasons = prepared.reasons
        if self.fmt == "embeddings":
            for side, vectors in (("image", batch.image_vectors), ("text", batch.text_vectors)):
                if vectors is not None:
                    prepared.vectors[side], ok = normalize_rows(vectors)
                    for i in np.flatnonzero(~ok):
                        reasons[i] = reasons[i] or f"{side}:non-finite or zero vector"
            return prepared
        if batch.images is not None:
            prepared.images = []
            for i, (tensor, reason) in enumerate(self.decoders.map(self._decode_preprocess, batch.images)):
                reasons[i] = reason
                prepared.images.append(tensor)
        if batch.texts is not None:
            prepared.texts = []
            for i, text in enumerate(batch.texts):
                text, reason = _caption(text)
                reasons[i] = reasons[i] or reason
                prepared.texts.append(text)
        return prepared

    def _encode(self, prepared: _Prepared) -> tuple[pa.Table, list[tuple[str, str]]]:
        """The model side of a prepared batch: encode the rows that passed, build the part's table."""
        batch, reasons, sides = prepared.batch, prepared.reasons, prepared.vectors
        n = len(batch.keys)
        if self.fmt != "embeddings":
            keep = [i for i in range(n) if reasons[i] is None]
            if prepared.images is not None:
                sides["image"] = self.model.encode_images([prepared.images[i] for i in keep])
            if prepared.texts is not None:
                sides["text"] = self.model.encode_texts([str(prepared.texts[i]) for i in keep])
            sides = {s: _scatter(v, keep, n) for s, v in sides.items()}
        mask = np.array([r is None for r in reasons], dtype=bool)
        columns = {"key": pa.array([k for k, ok in zip(batch.keys, mask, strict=True) if ok], pa.string())}
        for side, vectors in sides.items():
            kept = vectors[mask]
            columns[side] = pa.FixedSizeListArray.from_arrays(pa.array(kept.reshape(-1)), kept.shape[1])
        for name, column in batch.carried.items():
            columns[name] = column.filter(pa.array(mask))
        rejected = [(batch.keys[i], r) for i, r in enumerate(reasons) if r is not None]
        return pa.table(columns), rejected


def _caption(text: str | bytes | None) -> tuple[str | None, str | None]:
    """(caption, None) or (None, reason): ``text:missing`` (None), ``text:not utf-8`` (bytes that do not
    decode), ``text:empty`` (nothing but whitespace)."""
    if text is None:
        return None, "text:missing"
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError:
            return None, "text:not utf-8"
    text = str(text)
    if not text.strip():
        return None, "text:empty"
    return text, None


def _scatter(values: np.ndarray, keep: list[int], n: int) -> np.ndarray:
    """Place the rows of ``values`` at positions ``keep`` of an (n, d) zero array."""
    out = np.zeros((n, values.shape[1]), dtype=np.float32)
    out[keep] = values
    return out


def run_embed(ctx: StageContext) -> dict[str, Any]:
    """Embed every shard not yet committed; returns the stage summary for the manifest."""
    out_dir = ctx.run.path("embeddings")
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [s for s in ctx.shards if part_summary(out_dir, s.index) is None]
    if todo:
        embed = ctx.spec.embed
        plan = plan_embed(embed.device, embed.workers, embed.cpus_per_gpu, len(todo), ctx.resources)
        log.info(
            "embed: %d of %d shards on %d %s actor(s) of %d CPU(s) each",
            len(todo),
            len(ctx.shards),
            plan.workers,
            "GPU" if plan.num_gpus else "CPU",
            plan.num_cpus,
        )
        init = (embed, ctx.spec.data, ctx.fmt, ctx.image_column, ctx.text_column, plan.threads, plan.device)
        with ActorPool(
            EmbedWorker,
            plan.workers,
            init_args=init,
            num_cpus=plan.num_cpus,
            num_gpus=plan.num_gpus,
            placement_timeout_s=ctx.spec.ray.placement_timeout_s,
        ) as pool:
            pool.map("embed_shard", [(s, str(out_dir)) for s in todo], desc="embed")
    _check_keys(ctx, out_dir)  # also on a resumed run: parts may come from several attempts
    # One part summary at a time: the driver keeps counts and the first MAX_REJECTED_IN_MANIFEST rejections.
    rows = count = 0
    by_reason: Counter = Counter()
    listed: list[dict[str, str]] = []
    values: dict[str, set[str]] = {"device": set(), "dtype": set()}
    for shard in ctx.shards:
        summary = part_summary(out_dir, shard.index)
        rows += summary["rows"]
        count += len(summary["rejected"])
        by_reason.update(r.split(" (")[0] for _, r in summary["rejected"])
        room = MAX_REJECTED_IN_MANIFEST - len(listed)
        listed += [{"key": k, "reason": r} for k, r in summary["rejected"][: max(room, 0)]]
        for name, seen in values.items():
            if summary.get(name):
                seen.add(summary[name])
    return {
        "rows": rows,
        # parts of a resumed run may come from other devices: every value seen, comma-separated
        **{name: ",".join(sorted(seen)) or None for name, seen in values.items()},
        "shards": len(ctx.shards),
        "format": ctx.fmt,
        "sides": ctx.sides,
        "rejected": {
            "count": count,
            "by_reason": dict(by_reason),
            "rows": listed,
            "complete_list": "embeddings/_part-*.json" if count > MAX_REJECTED_IN_MANIFEST else None,
        },
    }


def _check_keys(ctx: StageContext, out_dir: Any) -> None:
    """:func:`check_unique_keys` over the committed parts: in the driver when every key hash fits one
    bucket (:data:`~rebalance.data.readers.BUCKET_KEYS`), else on a pool of CPU actors, one bucket per
    reduce call, so the driver's memory does not grow with the number of rows."""
    counts = key_counts(out_dir, ctx.shards)
    if sum(counts) <= readers.BUCKET_KEYS:
        check_unique_keys(out_dir, ctx.shards, counts=counts)
        return
    workers = ctx.workers(len(ctx.shards))
    with ActorPool(ShardWorker, workers) as pool:
        check_unique_keys(
            out_dir,
            ctx.shards,
            lambda fn, args: pool.map("call", [(fn, *a) for a in args], "key check"),
            tasks=workers,
            counts=counts,
        )
