"""Train an open_clip model on an img2dataset Parquet dataset with Ray Train, optionally balanced.

    python -m jobs.train_clip DATA --out OUT [--weights RUN_DIR] [--balanced-loss-iters N] [--epochs E]
    ray job submit --working-dir . -- python -m jobs.train_clip DATA --out /mnt/shared/clip --num-workers 4 --gpu

Two ways to balance, usable together: ``--weights RUN_DIR`` draws rows with replacement proportionally to a
rebalance run's per-row weights (default: uniformly with replacement, so both arms see the same number
of samples); ``--balanced-loss-iters N`` uses the CLIP loss after N Sinkhorn iterations on the batch logit
matrix (``rebalance.losses.balanced_clip_loss``: 0 = joint softmax, 1 = standard CLIP loss, 2 = the
two-step balanced loss). With several workers the features are gathered (with gradients) so the loss sees
the global batch. Checkpoints are saved every epoch; a re-run with the same ``--out`` resumes. The final
model is ``OUT/model.safetensors`` (loadable by open_clip / ``rebalance.models.load_model`` as
``pretrained``); ``--export-fp16 PATH`` also writes a float16 copy. Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from jobs.cli import print_json, setup_logging, training_parser
from jobs.dataset import ImageTextParquet, epoch_loader, sampling_weights, steps_per_epoch
from jobs.training import epoch_metrics, fit, report_epoch, resume, set_threads, unwrap, worker_device


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
    steps = steps_per_epoch(args, len(data))
    total_steps = steps * args.epochs
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    resumed = resume(model, {"optimizer": optimizer}, epochs=args.epochs)
    if resumed is None:
        return
    start, step = resumed
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.balanced_loss_iters < 0:
        raise SystemExit("--balanced-loss-iters must be >= 0")
    setup_logging()
    summary = fit("train_clip", train_loop, {}, args)
    print_json(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
