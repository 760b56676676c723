"""Embed stage: Ray actors read shards and embed images and captions with an open_clip model.

Output: ``embeddings/part-NNNNN.parquet`` per input shard with ``key``, ``image`` and ``text``
(fixed_size_list<float32>[d], L2-normalised; a side absent from the dataset is absent here too) and the
carried columns, rows in input order. Rows that cannot be used are not written; their keys and reasons
are in the part summaries and, summed, in the manifest.
"""

from __future__ import annotations

import io
import logging
import os
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rebalance.data.atomic import atomic_open, atomic_write_json
from rebalance.data.parts import part_path, part_summary
from rebalance.data.readers import RowBatch, Shard, check_unique_keys, read_shard
from rebalance.runtime.placement import plan_embed
from rebalance.runtime.pool import ActorPool
from rebalance.runtime.prefetch import prefetch
from rebalance.spec import DataSpec, EmbedSpec
from rebalance.stages.context import StageContext

__all__ = ["EmbedWorker", "run_embed", "decode_image", "normalize_rows"]

log = logging.getLogger(__name__)

MAX_IMAGE_PIXELS = 64_000_000  # larger images are rejected as decompression bombs
MAX_REJECTED_IN_MANIFEST = 10_000


def _declared_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG or GIF header (Pillow refuses to open those that declare 0)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24 and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    return None


def decode_image(data: bytes | None):
    """Decode encoded image bytes to an RGB PIL image; raise ValueError with a short reason otherwise.

    Reasons: ``image:missing`` (None), ``image:zero size`` (0 bytes, or a declared width or height of 0),
    ``image:decompression bomb (...)`` (more than MAX_IMAGE_PIXELS pixels declared; the pixels are never
    decoded), ``image:undecodable (...)`` (corrupt, truncated or not an image). Grayscale (L, I, I;16),
    bilevel, palette and CMYK images are converted to RGB; transparency (RGBA, LA, PA, palette with a
    transparent colour) is composited onto white.
    """
    from PIL import Image

    if data is None:
        raise ValueError("image:missing")
    if len(data) == 0:
        raise ValueError("image:zero size (0 bytes)")
    declared = _declared_size(data)
    if declared is not None and 0 in declared:
        raise ValueError(f"image:zero size ({declared[0]}x{declared[1]})")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise ValueError(
                    f"image:decompression bomb ({image.width}x{image.height} pixels > {MAX_IMAGE_PIXELS})"
                )
            image.load()
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
            raise ValueError(f"image:decompression bomb ({err})") from err
        except ValueError as err:
            if str(err).startswith("image:"):
                raise
            raise ValueError(f"image:undecodable ({type(err).__name__}: {err})") from err
        except Exception as err:
            raise ValueError(f"image:undecodable ({type(err).__name__}: {err})") from err
    if image.width == 0 or image.height == 0:
        raise ValueError(f"image:zero size ({image.width}x{image.height})")
    try:
        if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):  # 16-bit grayscale: scale to 8 bits
            pixels = np.asarray(image, dtype=np.float64) / 257.0
            image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="L")
        if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
            image.mode == "P" and "transparency" in image.info
        ):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except Exception as err:
        raise ValueError(f"image:undecodable ({type(err).__name__}: {err})") from err


def normalize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalise the rows of ``x`` (n, d); returns the normalised rows and a mask of usable rows
    (finite and non-zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1)
    ok = np.isfinite(x).all(axis=1) & (norms > 0) & np.isfinite(norms)
    out = np.zeros_like(x)
    out[ok] = x[ok] / norms[ok, None]
    return out, ok


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
                sides["image"] = self._encode_images([prepared.images[i] for i in keep], len(keep))
            if prepared.texts is not None:
                sides["text"] = self._encode_texts([str(prepared.texts[i]) for i in keep])
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

    def _encode_images(self, tensors: list, n: int) -> np.ndarray:
        import torch

        if n == 0:
            return np.zeros((0, self.model.dim), dtype=np.float32)
        pixels = torch.stack(tensors)
        if self.model.device.type == "cuda":  # page-locked, so the copy overlaps the host's next batch
            pixels = pixels.pin_memory().to(self.model.device, non_blocking=True)
        with torch.no_grad(), self._autocast():
            out = self.model.model.encode_image(pixels.to(self.model.device))
        return normalize_rows(out.float().cpu().numpy())[0]

    def _encode_texts(self, texts: list[str]) -> np.ndarray:
        import torch

        if not texts:
            return np.zeros((0, self.model.dim), dtype=np.float32)
        with torch.no_grad(), self._autocast():
            out = self.model.model.encode_text(self.model.tokenizer(texts).to(self.model.device))
        return normalize_rows(out.float().cpu().numpy())[0]

    def _autocast(self):
        import contextlib

        import torch

        if self.model.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


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
    check_unique_keys(out_dir, ctx.shards)  # also on a resumed run: parts may come from several attempts
    summaries = [part_summary(out_dir, s.index) for s in ctx.shards]
    rejected = [tuple(r) for s in summaries for r in s["rejected"]]
    return {
        "rows": sum(s["rows"] for s in summaries),
        # parts of a resumed run may come from other devices: every value seen, comma-separated
        **{f: ",".join(sorted({s[f] for s in summaries if s.get(f)})) or None for f in ("device", "dtype")},
        "shards": len(ctx.shards),
        "format": ctx.fmt,
        "sides": ctx.sides,
        "rejected": {
            "count": len(rejected),
            "by_reason": dict(Counter(r.split(" (")[0] for _, r in rejected)),
            "rows": [{"key": k, "reason": r} for k, r in rejected[:MAX_REJECTED_IN_MANIFEST]],
            "complete_list": "embeddings/_part-*.json" if len(rejected) > MAX_REJECTED_IN_MANIFEST else None,
        },
    }
