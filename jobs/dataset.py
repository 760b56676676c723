"""The training data of the jobs: an img2dataset Parquet dataset in memory, its per-row sampling weights from
a rebalance run, and one epoch's weighted loader on a Ray Train worker."""

from __future__ import annotations

import argparse
import io
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

__all__ = ["ImageTextParquet", "epoch_loader", "sampling_weights", "steps_per_epoch"]

log = logging.getLogger("jobs")


class ImageTextParquet(torch.utils.data.Dataset):
    """An img2dataset Parquet dataset held in memory as encoded bytes, decoded per item.

    Shards ``*.parquet`` are read in sorted path order, rows in file order (the order of a rebalance run's
    parts). Rows whose ``status`` is not ``success`` or whose image is null are skipped. Items are
    ``transform(image)`` plus, as set by :meth:`with_output`, the tokenised caption and/or the class index.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        image_column: str = "jpg",
        text_column: str | None = "txt",
        label_column: str | None = None,
        key_column: str = "key",
    ) -> None:
        shards = sorted(Path(path).glob("*.parquet"))
        if not shards:
            raise FileNotFoundError(f"no Parquet shards (*.parquet) in {path}")
        keys: list[str] = []
        images: list[bytes] = []
        texts: list[str] = []
        labels: list[str] = []
        for shard in shards:
            names = set(pq.read_schema(shard).names)
            for col in (key_column, image_column, text_column, label_column):
                if col is not None and col not in names:
                    raise ValueError(f"{shard} has no column {col!r} (columns: {sorted(names)})")
            cols = [c for c in (key_column, image_column, text_column, label_column) if c]
            if "status" in names:
                cols.append("status")
            table = pq.read_table(shard, columns=cols)
            status = table.column("status").to_pylist() if "status" in names else None
            col_img = table.column(image_column).to_pylist()
            col_key = table.column(key_column).to_pylist()
            col_txt = table.column(text_column).to_pylist() if text_column else None
            col_lab = table.column(label_column).to_pylist() if label_column else None
            for i, img in enumerate(col_img):
                if img is None or (status is not None and status[i] != "success"):
                    continue
                keys.append(str(col_key[i]))
                images.append(img)
                if col_txt is not None:
                    texts.append(col_txt[i] or "")
                if col_lab is not None:
                    labels.append(str(col_lab[i]))
        if not keys:
            raise ValueError(f"no usable rows in {path}")
        self.keys, self.images, self.texts = keys, images, texts
        self.class_names: list[str] = sorted(set(labels))
        index = {c: i for i, c in enumerate(self.class_names)}
        self.targets = np.array([index[c] for c in labels], dtype=np.int64) if labels else None
        self.transform: Callable[[Image.Image], torch.Tensor] | None = None
        self.tokenizer: Callable | None = None
        self.outputs: tuple[str, ...] = ("image",)

    def __len__(self) -> int:
        return len(self.keys)

    def class_counts(self) -> np.ndarray:
        if self.targets is None:
            raise ValueError("the dataset was read without a label column")
        return np.bincount(self.targets, minlength=len(self.class_names))

    def with_output(self, *outputs: str, transform=None, tokenizer=None) -> ImageTextParquet:
        """Items become tuples of ``outputs`` from ``image``, ``image2`` (a second view), ``text``, ``label``."""
        self.outputs, self.transform, self.tokenizer = outputs, transform, tokenizer
        return self

    def image(self, i: int) -> Image.Image:
        return Image.open(io.BytesIO(self.images[i])).convert("RGB")

    def __getitem__(self, i: int) -> tuple:
        out: list[Any] = []
        img = self.image(i) if {"image", "image2"} & set(self.outputs) else None
        for name in self.outputs:
            if name in ("image", "image2"):
                out.append(self.transform(img) if self.transform else img)
            elif name == "text":
                out.append(self.tokenizer([self.texts[i]])[0])
            elif name == "label":
                out.append(int(self.targets[i]))
            else:
                raise ValueError(f"unknown output {name!r}")
        return tuple(out)


def sampling_weights(dataset: ImageTextParquet, run_dir: str | None) -> np.ndarray:
    """The per-row sampling weights: the run's weights by key (rows it lacks are never drawn), or uniform."""
    if run_dir is None:
        return np.ones(len(dataset), dtype=np.float64)
    from rebalance.samplers import weights_for_keys

    w = weights_for_keys(run_dir, dataset.keys, missing="zero")
    absent = int((w == 0).sum())
    if absent:
        log.warning(
            "%d of %d rows have no (or zero) weight in %s and are never drawn", absent, len(w), run_dir
        )
    return w


def epoch_loader(
    dataset: torch.utils.data.Dataset,
    weights: np.ndarray,
    batch_size: int,
    steps: int,
    seed: int,
    epoch: int,
    loader_workers: int = 0,
) -> torch.utils.data.DataLoader:
    """``steps`` batches for this worker and epoch: disjoint draws of one weighted stream across workers."""
    from ray import train

    from rebalance.samplers import DistributedWeightedSampler

    ctx = train.get_context()
    sampler = DistributedWeightedSampler(
        weights, ctx.get_world_size(), ctx.get_world_rank(), num_samples=steps * batch_size, seed=seed
    )
    sampler.set_epoch(epoch)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=loader_workers
    )


def steps_per_epoch(args: argparse.Namespace, n_rows: int) -> int:
    if args.steps_per_epoch is not None:
        if args.steps_per_epoch < 1:
            raise ValueError("--steps-per-epoch must be >= 1")
        return args.steps_per_epoch
    return max(1, n_rows // (args.batch_size * args.num_workers))
