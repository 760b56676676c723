"""Shared pieces of the training jobs: Ray start-up, the Parquet dataset, samplers, Ray Train fit and resume,
checkpoints, per-class metrics.

Every training job runs its loop on Ray Train workers (``TorchTrainer`` with ``ScalingConfig(num_workers,
use_gpu)``) and keeps its state in ``OUT``:

    OUT/job.json                 the job's settings (a re-run with other settings into the same OUT is refused)
    OUT/ray/train/checkpoint_*   one Ray Train checkpoint per epoch: model.safetensors + train_state.pt
    OUT/model.safetensors        the final open_clip model (full CLIP state dict, float32)
    OUT/summary.json             what the run did: epochs, where it resumed from, last metrics

A re-run with the same ``OUT`` resumes from the last checkpoint (Ray Train restores the run of the same name
and storage path; the loop reads ``ray.train.get_checkpoint()``), and a re-run with more ``--epochs``
continues training. ``OUT`` must be reachable from every node (a shared filesystem or a cloud URI for the
checkpoints on a cluster).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

log = logging.getLogger("jobs")

#: settings that may change between a run and its resumption without changing what is trained
RESUMABLE_SETTINGS = frozenset(
    {"out", "epochs", "address", "num_workers", "cpus_per_worker", "gpu", "loader_workers", "export_fp16"}
)


# --------------------------------------------------------------------------------------------------
# arguments and Ray
# --------------------------------------------------------------------------------------------------


def training_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """The argument parser of a training job: its name and docstring, plus :func:`add_common_args`."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser)
    return parser


def add_ray_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The Ray Train options every job takes (--address, --num-workers, --cpus-per-worker, --gpu); returns
    their argument group so a job can add its own Ray options to it."""
    g = parser.add_argument_group("Ray")
    g.add_argument(
        "--address",
        default="auto",
        help="Ray to use: 'auto' joins RAY_ADDRESS when set (inside `ray job submit`) and starts a local "
        "instance otherwise; 'local' always starts one; or a cluster address",
    )
    g.add_argument("--num-workers", type=int, default=1, help="Ray Train workers (default: %(default)s)")
    g.add_argument(
        "--cpus-per-worker",
        type=int,
        default=1,
        help="CPUs (and torch threads) per worker (default: %(default)s)",
    )
    g.add_argument("--gpu", action="store_true", help="one GPU per worker")
    return g


def add_common_args(parser: argparse.ArgumentParser, *, model_default: str = "rebalance-tiny") -> None:
    """Arguments every training job takes."""
    g = parser.add_argument_group("data and output")
    g.add_argument(
        "data", help="img2dataset Parquet dataset directory (part-*.parquet with key, jpg, txt, ...)"
    )
    g.add_argument(
        "--out", required=True, help="job directory: checkpoints, final model, summary (resumable)"
    )
    g.add_argument(
        "--weights",
        metavar="RUN_DIR",
        default=None,
        help="sample rows with replacement proportionally to the weights of this rebalance run directory "
        "(default: uniformly with replacement)",
    )
    g = parser.add_argument_group("model and optimisation")
    g.add_argument("--model", default=model_default, help="open_clip model name (default: %(default)s)")
    g.add_argument(
        "--pretrained",
        default=None,
        help="open_clip tag or local checkpoint to start from (default: random weights from --seed)",
    )
    g.add_argument("--epochs", type=int, default=10, help="epochs to train in all (default: %(default)s)")
    g.add_argument(
        "--steps-per-epoch",
        type=int,
        default=None,
        help="optimiser steps per epoch (default: dataset rows / global batch size)",
    )
    g.add_argument("--batch-size", type=int, default=128, help="batch size per worker (default: %(default)s)")
    g.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: %(default)s)")
    g.add_argument(
        "--weight-decay", type=float, default=0.1, help="AdamW weight decay (default: %(default)s)"
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the initial weights and of the sampler")
    g = add_ray_args(parser)
    g.add_argument(
        "--loader-workers", type=int, default=0, help="DataLoader processes per worker (default: %(default)s)"
    )


def resolve_address(address: str) -> str:
    """``auto`` -> RAY_ADDRESS when set, else ``local`` (never a stray instance found on this machine)."""
    if address == "auto":
        return os.environ.get("RAY_ADDRESS") or "local"
    return address


@contextlib.contextmanager
def ray_context(address: str = "auto") -> Iterator[None]:
    """Use the Ray already initialised in this process, or join/start one (shut down on exit if started)."""
    import ray

    if ray.is_initialized():
        yield
        return
    resolved = resolve_address(address)
    ray.init(address=resolved, include_dashboard=False if resolved == "local" else None, log_to_driver=True)
    try:
        yield
    finally:
        ray.shutdown()


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------


def create_clip(name: str, pretrained: str | None, seed: int) -> tuple[torch.nn.Module, Any, Any, Any]:
    """``(model, preprocess_train, preprocess_val, tokenizer)`` of open_clip model ``name`` (train mode).

    Random weights are drawn from ``seed`` (identical on every worker)."""
    import open_clip

    import rebalance.models  # noqa: F401  (registers rebalance-tiny)

    torch.manual_seed(seed)
    model, pre_train, pre_val = open_clip.create_model_and_transforms(
        name, pretrained=pretrained, weights_only=True
    )
    return model, pre_train, pre_val, open_clip.get_tokenizer(name)


def embed_dim(model: torch.nn.Module) -> int:
    with torch.no_grad():
        size = model.visual.image_size
        size = size if isinstance(size, tuple | list) else (size, size)
        was = model.training
        model.eval()
        d = int(model.encode_image(torch.zeros(1, 3, *size)).shape[1])
        model.train(was)
    return d


def save_safetensors(state: dict[str, torch.Tensor], path: str | os.PathLike, fp16: bool = False) -> None:
    """Write a state dict as safetensors atomically (float tensors cast to float16 with ``fp16``)."""
    from safetensors.torch import save

    from rebalance.data.atomic import atomic_write_bytes

    tensors = {
        k: (
            v.detach().to("cpu", torch.float16) if fp16 and v.is_floating_point() else v.detach().cpu()
        ).contiguous()
        for k, v in state.items()
    }
    atomic_write_bytes(save(tensors), path)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


# --------------------------------------------------------------------------------------------------
# checkpoints and the Ray Train fit
# --------------------------------------------------------------------------------------------------


def resume(
    model: torch.nn.Module,
    extra: dict[str, Any] | None = None,
    modules: dict[str, torch.nn.Module] | None = None,
    *,
    epochs: int,
) -> tuple[int, int] | None:
    """Restore the latest checkpoint (:func:`load_checkpoint`) and return (first epoch to run, global
    step): (0, 0) without a checkpoint. None when all ``epochs`` are done: the saved metrics are reported
    again (the checkpoint stays the latest) and the worker has nothing left to do."""
    from ray import train

    state = load_checkpoint(model, extra, modules)
    if state is None:
        return 0, 0
    start = int(state["epoch"]) + 1
    if start >= epochs:
        train.report({**state["metrics"], "start_epoch": start})
        return None
    return start, int(state["step"])


def load_checkpoint(
    model: torch.nn.Module,
    extra: dict[str, Any] | None = None,
    modules: dict[str, torch.nn.Module] | None = None,
) -> dict[str, Any] | None:
    """Restore ``model`` from Ray Train's latest checkpoint, with the ``state_dict`` of each object in
    ``extra`` (optimizers, losses) and each module in ``modules`` (file name -> module, e.g. a classifier
    head saved as ``head.safetensors``). Returns the saved train state (``epoch`` = the last finished
    epoch, ``step``, ``metrics``) or None when there is no checkpoint."""
    from ray import train
    from safetensors.torch import load_file

    ckpt = train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        unwrap(model).load_state_dict(load_file(os.path.join(d, "model.safetensors")))
        for name, module in (modules or {}).items():
            unwrap(module).load_state_dict(load_file(os.path.join(d, name)))
        state = torch.load(os.path.join(d, "train_state.pt"), map_location="cpu", weights_only=False)
    for name, obj in (extra or {}).items():
        obj.load_state_dict(state["objects"][name])
    return state


def epoch_metrics(epoch: int, start: int, step: int, t0: float, **values: Any) -> dict[str, Any]:
    """What every job reports after an epoch: ``epoch``, ``start_epoch`` (the first epoch of this attempt),
    the global ``step``, the job's own ``values`` and the epoch's wall ``seconds`` since ``t0``."""
    return {"epoch": epoch, "start_epoch": start, "step": step, **values, "seconds": time.time() - t0}


def report_epoch(
    model: torch.nn.Module,
    metrics: dict[str, Any],
    extra: dict[str, Any] | None = None,
    modules: dict[str, torch.nn.Module] | None = None,
    **state: Any,
) -> None:
    """Report ``metrics`` from every worker; rank 0 attaches a checkpoint: ``model.safetensors``, each of
    ``modules`` as its own safetensors file (also published in OUT at the end), and ``train_state.pt``
    with ``state``, ``metrics`` and the ``state_dict`` of each object in ``extra``."""
    from ray import train

    if train.get_context().get_world_rank() != 0:
        train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        save_safetensors(unwrap(model).state_dict(), os.path.join(d, "model.safetensors"))
        for name, module in (modules or {}).items():
            save_safetensors(unwrap(module).state_dict(), os.path.join(d, name))
        objects = {name: obj.state_dict() for name, obj in (extra or {}).items()}
        payload = {**state, "objects": objects, "metrics": metrics, "files": sorted(modules or {})}
        torch.save(payload, os.path.join(d, "train_state.pt"))
        train.report(metrics, checkpoint=train.Checkpoint.from_directory(d))


def _job_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in sorted(vars(args).items()) if k not in ("func",)}


def check_job_dir(out: Path, job: str, args: argparse.Namespace) -> None:
    """Record the job's settings in ``OUT/job.json``; refuse to resume a run made with other settings."""
    from rebalance.data.atomic import atomic_write_json

    settings = {"job": job, **_job_settings(args)}
    path = out / "job.json"
    if path.is_file():
        old = json.loads(path.read_text())
        changed = sorted(
            k
            for k in set(old) | set(settings)
            if k not in RESUMABLE_SETTINGS and old.get(k) != settings.get(k)
        )
        if changed:
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in changed)
            raise ValueError(
                f"{out} holds a run with other settings ({diff}); use a new --out or remove it to start over"
            )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(settings, path)


def fit(
    job: str, loop: Callable[[dict], None], config: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """Run ``loop`` on Ray Train workers, resumable in ``args.out``; publish the final model and a summary.

    Returns the summary (also written to ``OUT/summary.json``): ``job``, ``epochs``, ``start_epoch`` (the
    epoch this invocation began at: > 0 when it resumed), ``resumed``, ``last_metrics``, ``model``.
    """
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from rebalance.data.atomic import atomic_write_json

    out = Path(args.out).resolve()
    check_job_dir(out, job, args)
    # Ray Train's controller polls its workers every 2 s by default, which adds seconds to every short run
    # (and to every test); 0.5 s costs nothing measurable. An explicit setting wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    with ray_context(args.address):
        trainer = TorchTrainer(
            loop,
            train_loop_config={**config, "args": vars(args)},
            scaling_config=ScalingConfig(
                num_workers=args.num_workers,
                use_gpu=args.gpu,
                resources_per_worker={"CPU": args.cpus_per_worker, **({"GPU": 1} if args.gpu else {})},
            ),
            run_config=RunConfig(
                name="train", storage_path=str(out / "ray"), checkpoint_config=CheckpointConfig(num_to_keep=2)
            ),
        )
        result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"{job}: training produced no checkpoint")
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, "train_state.pt"), map_location="cpu", weights_only=False)
        shutil.copyfile(os.path.join(d, "model.safetensors"), out / ".model.safetensors.tmp")
        os.replace(out / ".model.safetensors.tmp", out / "model.safetensors")
        for name in state.get("files", []):
            shutil.copyfile(os.path.join(d, name), out / f".{name}.tmp")
            os.replace(out / f".{name}.tmp", out / name)
    metrics = result.metrics or {}
    summary = {
        "job": job,
        "out": str(out),
        "epochs": int(state["epoch"]) + 1,
        "start_epoch": int(metrics.get("start_epoch", state["epoch"] + 1)),
        "steps": int(state.get("step", 0)),
        "last_metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float | str)},
        "model": str(out / "model.safetensors"),
    }
    summary["resumed"] = summary["start_epoch"] > 0
    if getattr(args, "export_fp16", None):
        from safetensors.torch import load_file

        save_safetensors(load_file(out / "model.safetensors"), args.export_fp16, fp16=True)
        summary["export_fp16"] = str(args.export_fp16)
    atomic_write_json(summary, out / "summary.json")
    return summary


def worker_device() -> torch.device:
    from ray.train.torch import get_device

    return get_device()


def set_threads() -> None:
    """One Ray Train worker per CPU it was given (Ray sets OMP_NUM_THREADS; torch may ignore it)."""
    n = os.environ.get("OMP_NUM_THREADS")
    if n and n.isdigit() and int(n) > 0:
        torch.set_num_threads(int(n))


# --------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------


def class_metrics(
    y_true: Sequence[int],
    y_pred: Sequence[int],
    class_names: Sequence[str],
    class_counts: Sequence[float] | None = None,
    tail_fraction: float = 1 / 3,
) -> dict[str, Any]:
    """Per-class accuracy (recall), balanced accuracy (their mean), class gap (best minus worst class), the
    standard deviation across classes, overall accuracy, and head/tail accuracy.

    Tail classes are the ``ceil(tail_fraction * C)`` classes with the smallest ``class_counts`` (the counts
    in the training data; ties broken by name), head classes the same number with the largest. Classes
    absent from ``y_true`` are left out of every class statistic (listed in ``classes_without_examples``).
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    names = list(class_names)
    per_class: dict[str, float] = {}
    support: dict[str, int] = {}
    for c, name in enumerate(names):
        mask = y_true == c
        if mask.any():
            per_class[name] = float((y_pred[mask] == c).mean())
            support[name] = int(mask.sum())
    accs = np.array(list(per_class.values()))
    out: dict[str, Any] = {
        "accuracy": float((y_true == y_pred).mean()),
        "balanced_accuracy": float(accs.mean()),
        "class_gap": float(accs.max() - accs.min()),
        "class_std": float(accs.std()),
        "worst_class": min(per_class, key=per_class.get),
        "best_class": max(per_class, key=per_class.get),
        "per_class_accuracy": per_class,
        "support": support,
        "classes_without_examples": [n for n in names if n not in per_class],
    }
    if class_counts is not None:
        counts = np.asarray(class_counts, dtype=float)
        k = max(1, math.ceil(tail_fraction * len(names)))
        order = sorted(range(len(names)), key=lambda c: (counts[c], names[c]))
        tail = [names[c] for c in order[:k] if names[c] in per_class]
        head = [names[c] for c in order[-k:] if names[c] in per_class]
        out["tail_classes"], out["head_classes"] = tail, head
        out["tail_accuracy"] = float(np.mean([per_class[n] for n in tail])) if tail else float("nan")
        out["head_accuracy"] = float(np.mean([per_class[n] for n in head])) if head else float("nan")
    return out


def print_json(obj: Any) -> None:
    print(json.dumps(obj, sort_keys=True))


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
