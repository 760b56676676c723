"""Train an open_clip model on an img2dataset Parquet dataset with Ray Train, optionally balanced.

    python -m jobs.train_clip DATA --out OUT [--weights RUN_DIR] [--balanced-loss-iters N] [--epochs E]
    python -m jobs.train_clip DATA --out OUT --frozen --pretrained synthetic --loss-iterations 2 --eval HELD_OUT
    ray job submit --working-dir . -- python -m jobs.train_clip DATA --out /mnt/shared/clip --num-workers 4 --gpu

Two ways to balance, usable together: ``--weights RUN_DIR`` draws rows with replacement proportionally to a
rebalance run's per-row weights (default: uniformly with replacement, so both arms see the same number
of samples); ``--balanced-loss-iters N`` uses the CLIP loss after N Sinkhorn iterations on the batch logit
matrix (``rebalance.losses.balanced_clip_loss``: 0 = joint softmax, 1 = standard CLIP loss, 2 = the
two-step balanced loss). With several workers the features are gathered (with gradients) so the loss sees
the global batch. Checkpoints are saved every epoch; a re-run with the same ``--out`` resumes. The final
model is ``OUT/model.safetensors`` (loadable by open_clip / ``rebalance.models.load_model`` as
``pretrained``); ``--export-fp16 PATH`` also writes a float16 copy. Prints a JSON summary.

Frozen towers (``--frozen``, the setting of Liu et al. 2024): the open_clip towers of ``--model`` /
``--pretrained`` stay fixed; every row is embedded once (L2-normalised, :meth:`LoadedModel.encode_images`
and ``encode_texts``) or, with ``--embeddings RUN_DIR``, read from a rebalance run's ``embeddings/`` (its
``image`` and ``text`` columns, matched by key: the run must have embedded DATA with the same model), and
only two 2-layer heads are trained (:class:`ClipHeads`), with a fixed logit scale (``--logit-scale``,
default 100 as in the paper). ``OUT/model.safetensors`` then holds the heads' state dict, not a CLIP model.
``--eval HELD_OUT`` (a Parquet dataset with a ``label`` column, ideally balanced) scores zero-shot
classification after the last epoch: each class is the prompt ``--prompt`` with its label, images and
prompts go through the frozen towers and the heads, and the metrics (``zero_shot_balanced_recall``, the
mean per-class recall, and the worst class's) join the last epoch's.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
import torch
from torch import nn

from jobs.cli import print_json, setup_logging, training_parser
from jobs.dataset import ImageTextParquet, epoch_loader, sampling_weights, steps_per_epoch
from jobs.metrics import class_metrics
from jobs.training import epoch_metrics, fit, report_epoch, resume, set_threads, unwrap, worker_device

__all__ = [
    "ClipHeads",
    "build_parser",
    "cosine_lr",
    "encode_rows",
    "frozen_features",
    "head_step",
    "main",
    "run_embeddings",
    "zero_shot",
]

#: the class prompt of zero-shot scoring (CLIP's ImageNet prompt; ``{}`` is the class label)
DEFAULT_PROMPT = "a photo of a {}"


def _gather(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows, with gradients flowing back to each rank's own rows."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return x
    if torch.distributed.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * base * (1 + math.cos(math.pi * progress))


class ClipHeads(nn.Module):
    """Two 2-layer heads on frozen features: ``h(x) = W2 gelu(W1 x + b1) + b2`` for each side, outputs
    L2-normalised. ``image(x)`` and ``text(y)`` map (n, dim) to (n, out)."""

    def __init__(self, dim: int, hidden: int = 512, out: int | None = None) -> None:
        super().__init__()
        out = dim if out is None else out
        self.image_head = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out))
        self.text_head = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out))

    def image(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.image_head(x), dim=-1)

    def text(self, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.text_head(y), dim=-1)


def head_step(
    heads: nn.Module,
    optimizer: torch.optim.Optimizer,
    image: torch.Tensor,
    text: torch.Tensor,
    n_iter: int,
    scale: float,
    lr: float,
) -> float:
    """One optimiser step of the heads on a batch of frozen (B, dim) image and text features: the loss is
    ``balanced_clip_loss(scale * h_img(image) @ h_txt(text).T, n_iter)`` on the gathered global batch."""
    from rebalance.losses import balanced_clip_loss

    for group in optimizer.param_groups:
        group["lr"] = lr
    inner = unwrap(heads)
    fi, ft = _gather(inner.image(image)), _gather(inner.text(text))
    loss = balanced_clip_loss(scale * fi @ ft.T, n_iter)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.item())


def encode_rows(clip, data: ImageTextParquet, batch: int = 1024) -> np.ndarray:
    """The frozen image tower's (n, dim) float32 features of every image of ``data``, ``batch`` at a time."""
    parts = [
        clip.encode_images([clip.preprocess(data.image(i)) for i in range(lo, min(lo + batch, len(data)))])
        for lo in range(0, len(data), batch)
    ]
    return np.concatenate(parts).astype(np.float32)


def frozen_features(clip, data: ImageTextParquet) -> tuple[np.ndarray, np.ndarray]:
    """The frozen towers' (n, dim) float32 image and text features of every row of ``data`` (each distinct
    caption is encoded once)."""
    unique, inverse = np.unique(np.asarray(data.texts, dtype=object), return_inverse=True)
    texts = clip.encode_texts([str(t) for t in unique])[inverse]
    return encode_rows(clip, data), texts.astype(np.float32)


def run_embeddings(run_dir: str, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The ``image`` and ``text`` embeddings of ``keys`` from a rebalance run's ``embeddings/`` parts."""
    from pathlib import Path

    from rebalance.data.parts import read_parts

    table = read_parts(Path(run_dir) / "embeddings")
    for col in ("image", "text"):
        if col not in table.column_names:
            raise ValueError(f"{run_dir}/embeddings has no {col!r} column: the run embedded no {col}s")
    position = {k: i for i, k in enumerate(table.column("key").to_pylist())}
    missing = [k for k in keys if k not in position]
    if missing:
        raise ValueError(
            f"{len(missing)} rows of the dataset are not in {run_dir}/embeddings, e.g. {missing[:3]}"
        )
    rows = np.array([position[k] for k in keys], dtype=np.int64)
    image = np.stack(table.column("image").to_numpy(zero_copy_only=False))[rows]
    text = np.stack(table.column("text").to_numpy(zero_copy_only=False))[rows]
    return image.astype(np.float32), text.astype(np.float32)


def zero_shot(
    heads: ClipHeads,
    image_features: np.ndarray,
    labels: np.ndarray,
    prompt_features: np.ndarray,
    class_names: list[str],
) -> dict:
    """Zero-shot classification through the heads: image i gets the class whose prompt feature has the
    largest cosine with it; returns :func:`jobs.metrics.class_metrics` (``balanced_accuracy`` = mean
    per-class recall). image_features (n, dim), labels (n,) in [0, C), prompt_features (C, dim)."""
    inner = unwrap(heads)
    with torch.no_grad():
        fi = inner.image(torch.as_tensor(image_features))
        ft = inner.text(torch.as_tensor(prompt_features))
        pred = (fi @ ft.T).argmax(dim=1).numpy()
    return class_metrics(labels, pred, class_names)


def _zero_shot_metrics(clip, heads: ClipHeads, args: argparse.Namespace) -> dict:
    held_out = ImageTextParquet(args.eval, text_column=None, label_column=args.eval_label_column)
    images = encode_rows(clip, held_out)
    prompts = clip.encode_texts([args.prompt.format(c) for c in held_out.class_names])
    m = zero_shot(heads, images, held_out.targets, prompts, held_out.class_names)
    return {
        "zero_shot_balanced_recall": m["balanced_accuracy"],
        "zero_shot_worst_class": m["worst_class"],
        "zero_shot_worst_recall": m["per_class_accuracy"][m["worst_class"]],
    }


def _start(module: nn.Module, args: argparse.Namespace, n_rows: int) -> tuple | None:
    """AdamW on ``module`` and the schedule: (optimizer, steps per epoch, total steps, first epoch, global
    step) after restoring the latest checkpoint; None when every epoch is done (:func:`resume`)."""
    steps = steps_per_epoch(args, n_rows)
    optimizer = torch.optim.AdamW(module.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    resumed = resume(module, {"optimizer": optimizer}, epochs=args.epochs)
    if resumed is None:
        return None
    return optimizer, steps, steps * args.epochs, *resumed


def heads_loop(config: dict) -> None:
    """Ray Train loop of ``--frozen``: 2-layer heads on the frozen towers' features (or a run's)."""
    from ray.train.torch import prepare_model

    from rebalance.models import load_model

    args = argparse.Namespace(**config["args"])
    set_threads()
    device = worker_device()
    torch.manual_seed(args.seed)
    clip = load_model(args.model, args.pretrained, seed=args.seed)
    data = ImageTextParquet(args.data, text_column=args.text_column)
    if args.embeddings:
        image, text = run_embeddings(args.embeddings, data.keys)
    else:
        image, text = frozen_features(clip, data)
    image, text = torch.as_tensor(image), torch.as_tensor(text)
    weights = sampling_weights(data, args.weights)
    heads = ClipHeads(image.shape[1], args.head_hidden).to(device)
    state = _start(heads, args, len(data))
    if state is None:
        return
    optimizer, steps, total_steps, start, step = state
    heads = prepare_model(heads)
    rows = torch.utils.data.TensorDataset(torch.arange(len(data)))
    for epoch in range(start, args.epochs):
        heads.train()
        t0, losses = time.time(), []
        for (idx,) in epoch_loader(rows, weights, args.batch_size, steps, args.seed, epoch):
            lr = cosine_lr(step, total_steps, args.lr, args.warmup_steps)
            losses.append(
                head_step(
                    heads,
                    optimizer,
                    image[idx].to(device),
                    text[idx].to(device),
                    args.balanced_loss_iters,
                    args.logit_scale,
                    lr,
                )
            )
            step += 1
        extra = {}
        if args.eval and epoch == args.epochs - 1:
            heads.eval()
            extra = _zero_shot_metrics(clip, unwrap(heads).cpu(), args)
            unwrap(heads).to(device)
        metrics = epoch_metrics(epoch, start, step, t0, loss=sum(losses) / len(losses), **extra)
        report_epoch(unwrap(heads), metrics, {"optimizer": optimizer}, epoch=epoch, step=step)


def train_loop(config: dict) -> None:
    from ray.train.torch import prepare_model

    from rebalance.losses import balanced_clip_loss
    from rebalance.models import load_model

    args = argparse.Namespace(**config["args"])
    set_threads()
    device = worker_device()
    clip = load_model(args.model, args.pretrained, seed=args.seed)
    model, pre_train, tokenizer = clip.model, clip.preprocess_train, clip.tokenizer
    data = ImageTextParquet(args.data, text_column=args.text_column).with_output(
        "image", "text", transform=pre_train, tokenizer=tokenizer
    )
    weights = sampling_weights(data, args.weights)
    model.to(device)
    state = _start(model, args, len(data))
    if state is None:
        return
    optimizer, steps, total_steps, start, step = state
    model = prepare_model(model)
    inner = unwrap(model)
    for epoch in range(start, args.epochs):
        model.train()
        t0, losses = time.time(), []
        loader = epoch_loader(data, weights, args.batch_size, steps, args.seed, epoch, args.loader_workers)
        for images, texts in loader:
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, total_steps, args.lr, args.warmup_steps)
            image_features, text_features, scale = model(images.to(device), texts.to(device))
            image_features, text_features = _gather(image_features), _gather(text_features)
            logits = scale * image_features @ text_features.T
            loss = balanced_clip_loss(logits, args.balanced_loss_iters)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                inner.logit_scale.clamp_(0, math.log(100))
            losses.append(loss.item())
            step += 1
        metrics = epoch_metrics(
            epoch, start, step, t0, loss=sum(losses) / len(losses), logit_scale=float(inner.logit_scale.exp())
        )
        report_epoch(inner, metrics, {"optimizer": optimizer}, epoch=epoch, step=step)


def build_parser() -> argparse.ArgumentParser:
    parser = training_parser("python -m jobs.train_clip", __doc__)
    g = parser.add_argument_group("CLIP")
    g.add_argument(
        "--balanced-loss-iters",
        "--loss-iterations",
        dest="balanced_loss_iters",
        type=int,
        default=1,
        metavar="N",
        help="Sinkhorn iterations on the batch logit matrix in the loss: 0, 1 (standard CLIP loss), 2, ... "
        "(default: %(default)s)",
    )
    g.add_argument("--text-column", default="txt", help="caption column (default: %(default)s)")
    g.add_argument(
        "--warmup-steps", type=int, default=50, help="linear LR warm-up steps (default: %(default)s)"
    )
    g.add_argument(
        "--export-fp16", metavar="PATH", default=None, help="also write the final model as fp16 safetensors"
    )
    g = parser.add_argument_group("frozen towers and heads (Liu et al. 2024)")
    g.add_argument(
        "--frozen",
        action="store_true",
        help="keep the towers of --model/--pretrained frozen and train two 2-layer heads on their features",
    )
    g.add_argument(
        "--embeddings",
        metavar="RUN_DIR",
        default=None,
        help="with --frozen: read the rows' image and text features from this run's embeddings/ (by key) "
        "instead of embedding DATA",
    )
    g.add_argument(
        "--head-hidden", type=int, default=512, help="hidden width of each head (default: %(default)s)"
    )
    g.add_argument(
        "--logit-scale",
        type=float,
        default=100.0,
        help="fixed logit scale s of the heads' loss, L = s * cos (default: %(default)s)",
    )
    g.add_argument(
        "--eval",
        metavar="HELD_OUT",
        default=None,
        help="with --frozen: Parquet dataset with labels scored zero-shot after the last epoch",
    )
    g.add_argument(
        "--eval-label-column", default="label", help="label column of --eval (default: %(default)s)"
    )
    g.add_argument(
        "--prompt", default=DEFAULT_PROMPT, help="zero-shot class prompt, {} = label (default: %(default)r)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.balanced_loss_iters < 0:
        raise SystemExit("--balanced-loss-iters must be >= 0")
    if (args.embeddings or args.eval) and not args.frozen:
        raise SystemExit("--embeddings and --eval need --frozen (heads on frozen towers)")
    if args.frozen and "{}" not in args.prompt:
        raise SystemExit("--prompt must contain {} (where the class label goes)")
    if args.head_hidden < 1 or not args.logit_scale > 0:
        raise SystemExit("--head-hidden must be >= 1 and --logit-scale > 0")
    setup_logging()
    summary = fit("train_clip", heads_loop if args.frozen else train_loop, {}, args)
    print_json(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
