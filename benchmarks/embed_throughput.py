"""Embed stage throughput vs a plain single-process open_clip loop, same model, data, batch size and cores.

    .venv/bin/python benchmarks/embed_throughput.py                          # rebalance-tiny, 48,000 rows
    .venv/bin/python benchmarks/embed_throughput.py --model ViT-B-32 --rows 384 --batch-size 64

Both sides read the same img2dataset Parquet shards of the built-in dataset, decode and preprocess every
image, tokenize every caption and encode both with the same randomly initialised model. The plain loop is
what a user would write: one process, torch using every core, batches in order. The stage runs through
``rebalance.run(spec, out, until="embed")`` on a local Ray already started (its start-up is not counted;
the actors' model loading is). The stage runs twice: with its default ``embed.prefetch: 2`` (each actor
prepares the next batches in a background thread while its model encodes) and with ``prefetch: 0``.
Printed: images/s of each, the ratio stage / plain (target >= 0.9) and the overlap's gain.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray
import torch
from PIL import Image

import rebalance
from rebalance.data.synthetic import generate_dataset
from rebalance.models import load_model


def plain_loop(data: Path, model_name: str, batch_size: int, device: str = "cpu") -> int:
    """Embed every row of every shard in one process on ``device`` (bf16 autocast on cuda, as the stage);
    returns the number of rows."""
    torch.set_num_threads(os.cpu_count() or 1)
    model = load_model(model_name, None, device, seed=0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
    rows = 0
    for path in sorted(data.glob("part-*.parquet")):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=["jpg", "txt"]):
            images = torch.stack(
                [
                    model.preprocess(Image.open(io.BytesIO(b)).convert("RGB"))
                    for b in batch.column("jpg").to_pylist()
                ]
            )
            with torch.no_grad(), autocast:
                image = model.model.encode_image(images.to(device))
                tokens = model.tokenizer(batch.column("txt").to_pylist()).to(device)
                text = model.model.encode_text(tokens)
            image = torch.nn.functional.normalize(image.float(), dim=-1).cpu().numpy()
            text = torch.nn.functional.normalize(text.float(), dim=-1).cpu().numpy()
            assert np.isfinite(image).all() and np.isfinite(text).all()
            rows += len(image)
    return rows


def stage_spec(data: Path, model: str, batch_size: int, device: str, prefetch: int = 2) -> dict:
    """The embed stage's spec for the same work as :func:`plain_loop` (random weights of ``model``)."""
    embed = {
        "model": model,
        "pretrained": None,
        "batch_size": batch_size,
        "prefetch": prefetch,
        "device": device,
    }
    return {"data": {"path": str(data)}, "embed": embed}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="rebalance-tiny")
    parser.add_argument("--rows", type=int, default=48_000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="both sides")
    args = parser.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        generate_dataset(data, n_rows=args.rows, n_shards=args.shards, seed=0)
        start = time.perf_counter()
        rows = plain_loop(data, args.model, args.batch_size, device)
        plain = time.perf_counter() - start

        ray.init(address="local", include_dashboard=False, configure_logging=False, log_to_driver=False)
        stage = {}
        for prefetch in (2, 0):  # the default, then decoding and encoding one after the other
            spec = stage_spec(data, args.model, args.batch_size, device, prefetch)
            start = time.perf_counter()
            rebalance.run(spec, Path(tmp) / f"run-{prefetch}", until="embed")
            stage[prefetch] = time.perf_counter() - start
        ray.shutdown()

    print(f"embed throughput: {args.model}, {rows} rows in {args.shards} shards, batch {args.batch_size}, "
          f"{os.cpu_count()} cores, {device}")  # fmt: skip
    print(f"  plain open_clip loop             {rows / plain:9.1f} images/s  ({plain:.2f} s)")
    print(f"  embed stage (prefetch 2)         {rows / stage[2]:9.1f} images/s  ({stage[2]:.2f} s)")
    print(f"  embed stage (prefetch 0)         {rows / stage[0]:9.1f} images/s  ({stage[0]:.2f} s)")
    print(f"  ratio stage / plain              {plain / stage[2]:9.2f}  (target >= 0.9)")
    print(f"  prefetch 2 / prefetch 0          {stage[0] / stage[2]:9.2f}  (the overlap's gain)")


if __name__ == "__main__":
    main()
