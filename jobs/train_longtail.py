"""Train a supervised classifier on a label column of an img2dataset Parquet dataset with a long-tail loss.

    python -m jobs.train_longtail DATA --out OUT --loss logit_adjusted [--weights RUN_DIR] [--eval-data EVAL]
    ray job submit --working-dir . -- python -m jobs.train_longtail DATA --out /mnt/shared/lt --num-workers 4

The network is the image tower of an open_clip model (default ``rebalance-tiny``) with a linear head
(a cosine head, ``s * cos``, for ``--loss ldam``), trained on Ray Train workers. Losses
(``rebalance.losses``, class counts from the training data):

    ce                plain cross-entropy
    logit_adjusted    CE(f + tau log pi, y)                       (--tau, default 1)
    balanced_softmax  CE(f + log n, y)
    ldam              CE(s (cos - Delta_y e_y), y), Delta ~ n^-1/4 (--max-margin 0.5, --ldam-scale 30)
    vs                CE(Delta f + tau log pi, y), Delta = (n / n_max)^gamma   (--gamma 0.3, --tau)
    focal             (1 - p_y)^gamma CE                          (--gamma 2)
    cb                class-balanced weighted CE, weights (1 - beta) / (1 - beta^n)  (--beta 0.9999)

``--drw-epoch E`` switches class-balanced weights on from epoch E (deferred re-weighting, for ldam and vs).
``--weights RUN_DIR`` samples rows by a rebalance run's weights (default: uniform, with replacement).
Checkpoints every epoch, resumable; the final model is ``OUT/model.safetensors`` (the whole open_clip
model: ``jobs.linear_probe --pretrained`` reads it) and the head ``OUT/head.safetensors``. With
``--eval-data`` (a labelled dataset, e.g. a balanced test set) the classifier is evaluated at the end:
per-class accuracy, balanced accuracy, class gap, tail accuracy, raw and with post-hoc logit adjustment,
written to ``OUT/eval.json``. Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from jobs.cli import setup_logging, training_parser
from jobs.dataset import ImageTextParquet, epoch_loader, sampling_weights, steps_per_epoch
from jobs.metrics import class_metrics
from jobs.training import epoch_metrics, fit, report_epoch, resume, set_threads, worker_device


class CosineHead(nn.Module):
    """Logits ``cos(x, w_c)`` (in [-1, 1]); the loss applies the scale."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, dim) * dim**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=1).T


class Classifier(nn.Module):
    def __init__(self, visual: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.visual, self.head = visual, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.visual(x))


def make_head(loss: str, dim: int, num_classes: int) -> nn.Module:
    """A cosine head for the losses that expect cosine logits (``rebalance.losses.COSINE_LOSSES``), else a
    linear one."""
    from rebalance.losses import COSINE_LOSSES

    return CosineHead(dim, num_classes) if loss in COSINE_LOSSES else nn.Linear(dim, num_classes)


def train_loop(config: dict) -> None:
    from ray.train.torch import prepare_model

    from rebalance.losses import drw_weights, make_longtail_loss
    from rebalance.models import load_model

    args = argparse.Namespace(**config["args"])
    set_threads()
    device = worker_device()
    clip = load_model(args.model, args.pretrained, seed=args.seed)
    model, pre_train = clip.model, clip.preprocess_train
    data = ImageTextParquet(args.data, text_column=None, label_column=args.label_column)
    data.with_output("image", "label", transform=pre_train)
    counts = data.class_counts()
    head = make_head(args.loss, clip.dim, len(counts))
    net = Classifier(model.visual, head).to(device)
    loss_fn = make_longtail_loss(
        args.loss,
        counts,
        tau=args.tau,
        gamma=args.gamma,
        beta=args.beta,
        max_margin=args.max_margin,
        s=args.ldam_scale,
    )
    weights = sampling_weights(data, args.weights)
    steps = steps_per_epoch(args, len(data))
    total_steps = steps * args.epochs
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    resumed = resume(model, {"optimizer": optimizer}, {"head.safetensors": head}, epochs=args.epochs)
    if resumed is None:
        return
    start, step = resumed
    from jobs.train_clip import cosine_lr

    net = prepare_model(net)
    for epoch in range(start, args.epochs):
        if args.drw_epoch is not None:
            loss_fn.weight = drw_weights(epoch, counts, args.drw_epoch, args.beta)
        net.train()
        t0, losses, correct, seen = time.time(), [], 0, 0
        loader = epoch_loader(data, weights, args.batch_size, steps, args.seed, epoch, args.loader_workers)
        for images, labels in loader:
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, total_steps, args.lr, args.warmup_steps)
            images, labels = images.to(device), labels.to(device)
            logits = net(images)
            loss = loss_fn(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            correct += int((logits.argmax(1) == labels).sum())
            seen += len(labels)
            step += 1
        metrics = epoch_metrics(
            epoch, start, step, t0, loss=sum(losses) / len(losses), train_accuracy=correct / seen
        )
        report_epoch(
            model, metrics, {"optimizer": optimizer}, {"head.safetensors": head}, epoch=epoch, step=step
        )


@torch.no_grad()
def evaluate(args: argparse.Namespace) -> dict:
    """Evaluate OUT's final classifier on ``args.eval_data`` (raw argmax and post-hoc logit adjustment)."""
    from safetensors.torch import load_file

    from rebalance.losses import logit_adjust_posthoc
    from rebalance.models import load_model

    train_data = ImageTextParquet(args.data, text_column=None, label_column=args.label_column)
    counts = train_data.class_counts()
    clip = load_model(args.model, f"{args.out}/model.safetensors", seed=args.seed)
    model, pre_val = clip.model, clip.preprocess
    head = make_head(args.loss, clip.dim, len(counts))
    head.load_state_dict(load_file(f"{args.out}/head.safetensors"))
    net = Classifier(model.visual, head).eval()
    test = ImageTextParquet(args.eval_data, text_column=None, label_column=args.label_column)
    unknown = sorted(set(test.class_names) - set(train_data.class_names))
    if unknown:
        raise ValueError(f"eval data has classes the training data lacks: {unknown[:5]}")
    remap = np.array([train_data.class_names.index(c) for c in test.class_names])
    y = remap[test.targets]
    test.with_output("image", transform=pre_val)
    loader = torch.utils.data.DataLoader(test, batch_size=256)
    logits = torch.cat([net(x) for (x,) in loader])
    pred_raw = logits.argmax(1).numpy()
    pred_adj = logit_adjust_posthoc(logits, counts, tau=1.0).argmax(1).numpy()
    names = train_data.class_names
    return {
        "eval_data": str(args.eval_data),
        "raw": class_metrics(y, pred_raw, names, counts),
        "posthoc_adjusted": class_metrics(y, pred_adj, names, counts),
        "train_class_counts": dict(zip(names, counts.tolist(), strict=True)),
    }


def build_parser() -> argparse.ArgumentParser:
    from rebalance.losses import DRW_LOSSES, LONGTAIL_LOSSES

    parser = training_parser("python -m jobs.train_longtail", __doc__)
    g = parser.add_argument_group("long tail")
    g.add_argument("--label-column", default="label", help="class label column (default: %(default)s)")
    g.add_argument(
        "--loss", choices=LONGTAIL_LOSSES, default="ce", help="training loss (default: %(default)s)"
    )
    g.add_argument("--tau", type=float, default=1.0, help="logit adjustment strength (default: %(default)s)")
    g.add_argument("--gamma", type=float, default=None, help="focal gamma (2) or VS gamma (0.3)")
    g.add_argument("--beta", type=float, default=0.9999, help="class-balanced beta (default: %(default)s)")
    g.add_argument("--max-margin", type=float, default=0.5, help="LDAM largest margin (default: %(default)s)")
    g.add_argument("--ldam-scale", type=float, default=30.0, help="LDAM logit scale s (default: %(default)s)")
    g.add_argument(
        "--drw-epoch",
        type=int,
        default=None,
        help=f"deferred re-weighting from this epoch ({', '.join(DRW_LOSSES)})",
    )
    g.add_argument(
        "--warmup-steps", type=int, default=20, help="linear LR warm-up steps (default: %(default)s)"
    )
    g.add_argument("--eval-data", default=None, help="labelled dataset to evaluate the final classifier on")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from rebalance.losses import DRW_LOSSES

    if args.drw_epoch is not None and args.loss not in DRW_LOSSES:
        raise SystemExit(f"--drw-epoch applies to --loss {' or '.join(DRW_LOSSES)}")
    setup_logging()
    summary = fit("train_longtail", train_loop, {}, args)
    if args.eval_data:
        from rebalance.data.atomic import atomic_write_json

        result = evaluate(args)
        atomic_write_json(result, f"{args.out}/eval.json")
        summary["eval"] = {
            kind: {
                k: result[kind][k] for k in ("balanced_accuracy", "tail_accuracy", "class_gap", "accuracy")
            }
            for kind in ("raw", "posthoc_adjusted")
        }
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
