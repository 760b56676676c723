"""The command line of the jobs: the argument parser every training job shares, the Ray options, logging
and the JSON line a job prints at the end."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

__all__ = ["add_common_args", "add_ray_args", "print_json", "setup_logging", "training_parser"]


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


def print_json(obj: Any) -> None:
    print(json.dumps(obj, sort_keys=True))


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
