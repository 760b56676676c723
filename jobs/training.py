"""Ray Train for the jobs: the fit, resumption from checkpoints, per-epoch reports and checkpoint files.

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
import json
import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "RESUMABLE_SETTINGS",
    "check_job_dir",
    "epoch_metrics",
    "fit",
    "load_checkpoint",
    "read_train_state",
    "report_epoch",
    "resume",
    "save_safetensors",
    "set_threads",
    "unwrap",
    "worker_device",
    "write_train_state",
]

#: settings that may change between a run and its resumption without changing what is trained
RESUMABLE_SETTINGS = frozenset(
    {"out", "epochs", "address", "num_workers", "cpus_per_worker", "gpu", "loader_workers", "export_fp16"}
)


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


def _plain(value: Any) -> Any:
    """``value`` with numpy scalars and arrays turned into Python numbers / CPU tensors, containers walked,
    so that :func:`read_train_state` can load it with ``weights_only=True``."""
    import numpy as np

    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    return value


def write_train_state(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write a checkpoint's train state (numbers, strings, tensors, optimizer state dicts) as a torch file
    that loads with ``weights_only=True``: no object of another type is pickled."""
    torch.save(_plain(state), path)


def read_train_state(path: str | os.PathLike) -> dict[str, Any]:
    """Load a train state written by :func:`write_train_state` with ``torch.load(weights_only=True)``: a
    file that pickles anything but tensors, numbers, strings and containers (e.g. an object whose
    ``__reduce__`` runs code) is refused with RuntimeError before any of its code runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise RuntimeError(
            f"refusing checkpoint {path}: it holds objects other than tensors, numbers and containers "
            f"(loaded with weights_only=True): {str(err).splitlines()[0]}"
        ) from err


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


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
        state = read_train_state(os.path.join(d, "train_state.pt"))
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
        write_train_state(payload, os.path.join(d, "train_state.pt"))
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
    from rebalance.runtime.session import ray_session
    from rebalance.spec import RaySpec

    out = Path(args.out).resolve()
    check_job_dir(out, job, args)
    # Ray Train's controller polls its workers every 2 s by default, which adds seconds to every short run
    # (and to every test); 0.5 s costs nothing measurable. An explicit setting wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    with ray_session(RaySpec(address=args.address)):
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
        state = read_train_state(os.path.join(d, "train_state.pt"))
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
