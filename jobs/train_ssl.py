"""Self-supervised training (SimCLR), optionally with Geometric Harmonization, on Ray Train.

    python -m jobs.train_ssl DATA --out OUT [--gh --gh-run RUN_DIR] [--weights RUN_DIR]
    ray job submit --working-dir . -- python -m jobs.train_ssl DATA --out /mnt/shared/ssl --gh --gh-run RUN

The network is the image tower of an open_clip model (default ``rebalance-tiny``) with a 2-layer MLP
projection head; two augmented views per image (random resized crop, flip, brightness/contrast jitter:
no hue or saturation change, which would erase colour concepts) and InfoNCE at temperature 0.2.

``--gh`` adds the Geometric Harmonization loss (``rebalance.losses.GeometricHarmonizationLoss``): a simplex
ETF of K vertices in the projection space, balanced surrogate labels from Sinkhorn with class marginal
pi, swapped prediction between the views; its weight is 0 for ``--gh-warmup-epochs`` epochs and then ramps
linearly to 1 over ``--gh-ramp-epochs``. ``--gh-run RUN_DIR`` takes K and pi from a rebalance run: the
number of image clusters and the fraction of rows in each (``assignments/``); without it pi is uniform over
``--gh-classes`` vertices. ``--weights RUN_DIR`` samples rows by a run's weights. Checkpoints every epoch,
resumable; the final model is ``OUT/model.safetensors`` (``jobs.linear_probe --pretrained`` reads it) and
the projection head ``OUT/projector.safetensors``. Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from jobs.cli import setup_logging, training_parser
from jobs.dataset import ImageTextParquet, epoch_loader, sampling_weights, steps_per_epoch
from jobs.training import epoch_metrics, fit, report_epoch, resume, set_threads, unwrap, worker_device


def run_cluster_marginal(run_dir: str | Path, side: str = "image") -> np.ndarray:
    """Fraction of a run's rows in each ``side`` cluster (length k from ``clusters/clusters.json``)."""
    from rebalance.data.fs import as_path
    from rebalance.data.parts import read_parts

    root = as_path(run_dir)
    info = json.loads((root / "clusters" / "clusters.json").read_text())
    k = int(info[side]["k"])
    labels = read_parts(root / "assignments", columns=[f"{side}_cluster"]).column(0).to_numpy()
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    return counts / counts.sum()


class SSLNet(nn.Module):
    def __init__(self, visual: nn.Module, dim: int, hidden: int, proj_dim: int) -> None:
        super().__init__()
        self.visual = visual
        self.projector = nn.Sequential(
            nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, proj_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.visual(x))


def simclr_transform(image_size: int, mean, std):
    from torchvision import transforms as T

    return T.Compose(
        [
            T.RandomResizedCrop(image_size, scale=(0.4, 1.0), antialias=True),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(brightness=0.3, contrast=0.3)], p=0.8),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def train_loop(config: dict) -> None:
    import open_clip
    from ray.train.torch import prepare_model

    from rebalance.losses import GeometricHarmonizationLoss, info_nce_loss
    from rebalance.models import load_model

    args = argparse.Namespace(**config["args"])
    set_threads()
    device = worker_device()
    clip = load_model(args.model, args.pretrained, seed=args.seed)
    model = clip.model
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    data = ImageTextParquet(args.data, text_column=None)
    data.with_output("image", "image2", transform=simclr_transform(size, mean, std))
    net = SSLNet(model.visual, clip.dim, args.hidden_dim, args.proj_dim).to(device)
    gh = None
    if args.gh:
        pi = config["gh_marginal"]
        gh = GeometricHarmonizationLoss(
            len(pi),
            args.proj_dim,
            temperature=args.temperature,
            iterations=args.gh_iterations,
            class_marginal=pi,
        ).to(device)
    weights = sampling_weights(data, args.weights)
    steps = steps_per_epoch(args, len(data))
    total_steps = steps * args.epochs
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    resumed = resume(
        model, {"optimizer": optimizer}, {"projector.safetensors": net.projector}, epochs=args.epochs
    )
    if resumed is None:
        return
    start, step = resumed
    from jobs.train_clip import cosine_lr

    net = prepare_model(net)
    for epoch in range(start, args.epochs):
        gh_weight = 0.0
        if gh is not None:
            gh_weight = GeometricHarmonizationLoss.ramp(epoch, args.gh_warmup_epochs, args.gh_ramp_epochs)
            gh.weight = gh_weight
        net.train()
        t0, losses = time.time(), []
        loader = epoch_loader(data, weights, args.batch_size, steps, args.seed, epoch, args.loader_workers)
        for view1, view2 in loader:
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, total_steps, args.lr, args.warmup_steps)
            z = net(torch.cat([view1, view2]).to(device))
            z1, z2 = z.chunk(2)
            loss = gh(z1, z2) if gh is not None else info_nce_loss(z1, z2, args.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
        metrics = epoch_metrics(epoch, start, step, t0, loss=sum(losses) / len(losses), gh_weight=gh_weight)
        projector = unwrap(net).projector
        report_epoch(
            model,
            metrics,
            {"optimizer": optimizer},
            {"projector.safetensors": projector},
            epoch=epoch,
            step=step,
        )


def build_parser() -> argparse.ArgumentParser:
    parser = training_parser("python -m jobs.train_ssl", __doc__)
    g = parser.add_argument_group("SimCLR and Geometric Harmonization")
    g.add_argument(
        "--temperature", type=float, default=0.2, help="InfoNCE temperature (default: %(default)s)"
    )
    g.add_argument(
        "--hidden-dim", type=int, default=256, help="projection head hidden width (default: %(default)s)"
    )
    g.add_argument(
        "--proj-dim", type=int, default=128, help="projection output width, >= K (default: %(default)s)"
    )
    g.add_argument(
        "--warmup-steps", type=int, default=20, help="linear LR warm-up steps (default: %(default)s)"
    )
    g.add_argument("--gh", action="store_true", help="add the Geometric Harmonization loss")
    g.add_argument(
        "--gh-run", metavar="RUN_DIR", default=None, help="take K and pi from this run's image clusters"
    )
    g.add_argument(
        "--gh-classes", type=int, default=16, help="K without --gh-run (uniform pi; default: %(default)s)"
    )
    g.add_argument(
        "--gh-warmup-epochs", type=int, default=0, help="plain SSL epochs first (default: %(default)s)"
    )
    g.add_argument(
        "--gh-ramp-epochs", type=int, default=10, help="GH weight ramp 0 -> 1 (default: %(default)s)"
    )
    g.add_argument(
        "--gh-iterations", type=int, default=300, help="Sinkhorn iterations (default: %(default)s)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = {}
    if args.gh:
        pi = (
            run_cluster_marginal(args.gh_run)
            if args.gh_run
            else np.full(args.gh_classes, 1 / args.gh_classes)
        )
        if len(pi) > args.proj_dim:
            raise SystemExit(f"--proj-dim ({args.proj_dim}) must be >= the number of GH classes ({len(pi)})")
        config["gh_marginal"] = pi.tolist()
    setup_logging()
    summary = fit("train_ssl", train_loop, config, args)
    if args.gh:
        summary["gh_classes"] = len(config["gh_marginal"])
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
