"""Train a DCGAN-style generator on the images of an img2dataset Parquet dataset, on Ray Train.

    python -m jobs.train_gan DATA --out OUT [--epochs 20] [--steps-per-epoch 100] [--weights RUN_DIR]
    python -m jobs.train_gan BALANCED --out OUT --bias-weight 1 --bias-class-weights W.json   # fair-GAN
    ray job submit --working-dir . -- python -m jobs.train_gan /mnt/shared/data --out /mnt/shared/gan --gpu

The generator ``G: z ~ N(0, I_nz) -> (3, S, S)`` images in [-1, 1] and the discriminator are
``rebalance.fairgan.models`` (DCGAN: transposed convolutions with batch norm; Adam, lr 2e-4, betas
(0.5, 0.999)); images are resized to ``--image-size`` on loading. Losses (non-saturating GAN):

    L_D = BCE(D(x), 1) + BCE(D(G(z)), 0)
    L_G = BCE(D(G(z)), 1) + lambda * sum_k w_k (q_k - 1/K)^2,   q = mean_i softmax(f(G(z_i)))

The second term of L_G, the bias-mitigation loss (``rebalance.fairgan.loss``), is on with
``--bias-weight lambda > 0``: ``f`` is the attribute classifier (``--classifier``, as in
``jobs.fair_gan``), ``w`` the class weights of ``--bias-class-weights`` (a JSON list of K numbers,
default all 1). Rows are drawn with replacement, uniformly or by a rebalance run's weights (``--weights``).
With ``--num-workers N`` each worker draws its share of one global stream and gradients are averaged
across workers (all-reduce) before every optimiser step.

OUT: ``job.json``, ``ray/train/checkpoint_*`` (per epoch: generator, discriminator, optimisers; a re-run
resumes, a larger ``--epochs`` continues), ``model.safetensors`` (generator state dict),
``discriminator.safetensors``, ``generator.safetensors`` (the generator with its config as metadata,
what ``jobs.fair_gan --generator`` and ``rebalance.fairgan.io.load_generator`` read) and
``summary.json``. Prints the JSON summary.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from jobs.cli import add_ray_args, setup_logging
from jobs.dataset import ImageTextParquet, epoch_loader, sampling_weights, steps_per_epoch
from jobs.training import epoch_metrics, fit, report_epoch, resume, set_threads, worker_device

log = logging.getLogger("jobs.train_gan")


# --------------------------------------------------------------------------------------------------
# arguments shared with jobs.fair_gan
# --------------------------------------------------------------------------------------------------


def add_classifier_args(parser: argparse.ArgumentParser) -> None:
    """The attribute classifier options (``rebalance.fairgan.classifiers.build_classifier``)."""
    from rebalance.fairgan.classifiers import KINDS

    g = parser.add_argument_group("attribute classifier")
    g.add_argument(
        "--classifier",
        default="zero-shot",
        help=f"classifier kind, one of {', '.join(KINDS)} (default: %(default)s): zero-shot = open_clip "
        "against class prompts; run-clusters = a rebalance run's open_clip model and image clusters; "
        "torch = a user torch module",
    )
    g.add_argument("--classifier-run", default=None, help="run directory for --classifier run-clusters")
    g.add_argument(
        "--clip-model",
        default=None,
        help="open_clip model for zero-shot / run-clusters (default: rebalance-tiny, or the run's model)",
    )
    g.add_argument(
        "--clip-pretrained",
        default=None,
        help="its weights: open_clip tag or local checkpoint (default: the shipped rebalance-tiny "
        "checkpoint, or the run's)",
    )
    g.add_argument(
        "--classes-file",
        default=None,
        help="JSON list of class names, or {name: [prompts]} (default: the built-in dataset's 24 concepts "
        "and caption templates; for run-clusters the clusters' majority labels)",
    )
    g.add_argument(
        "--classifier-weights",
        default=None,
        help="torch: classifier checkpoint (.safetensors or weights-only .pt)",
    )
    g.add_argument(
        "--classifier-arch",
        default=None,
        help="torch: 'package.module:factory' building the module (default: the class named in the "
        "checkpoint's metadata, a rebalance.fairgan.models module)",
    )
    g.add_argument(
        "--classifier-arch-kwargs", default="{}", help="torch: JSON keyword arguments of the factory"
    )
    g.add_argument(
        "--temperature",
        type=float,
        default=0.05,
        help="run-clusters: temperature T of the soft logits -||e - c||^2 / T (default: %(default)s)",
    )


def classifier_from_args(args: argparse.Namespace, device: str = "cpu"):
    """Build the classifier the options name (validated, with clear errors)."""
    from rebalance.fairgan.classifiers import build_classifier

    try:
        arch_kwargs = json.loads(args.classifier_arch_kwargs or "{}")
    except json.JSONDecodeError as err:
        raise ValueError(f"--classifier-arch-kwargs is not JSON: {err}") from None
    return build_classifier(
        args.classifier,
        run_dir=args.classifier_run,
        clip_model=args.clip_model,
        clip_pretrained=args.clip_pretrained,
        classes_file=args.classes_file,
        weights=args.classifier_weights,
        arch=args.classifier_arch,
        arch_kwargs=arch_kwargs,
        temperature=args.temperature,
        device=device,
    )


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


def load_images(path: str, image_size: int) -> tuple[torch.Tensor, ImageTextParquet]:
    """All usable images of the dataset as ``(N, 3, S, S)`` float32 in [-1, 1] (bicubic resize to S)."""
    data = ImageTextParquet(path, text_column=None)
    out = np.empty((len(data), image_size, image_size, 3), dtype=np.uint8)
    for i, raw in enumerate(data.images):
        img = Image.open(io.BytesIO(raw)).convert("RGB")
        if img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
        out[i] = np.asarray(img)
    x = torch.from_numpy(out).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x.contiguous(), data


def _bias_weights(args: argparse.Namespace, k: int) -> torch.Tensor:
    if not args.bias_class_weights:
        return torch.ones(k)
    w = json.loads(Path(args.bias_class_weights).read_text())
    if isinstance(w, dict):
        w = w.get("weights", w)
    if not isinstance(w, list) or len(w) != k or not all(isinstance(v, int | float) and v >= 0 for v in w):
        raise ValueError(f"--bias-class-weights must hold a JSON list of {k} non-negative numbers")
    return torch.tensor(w, dtype=torch.float32)


def _allreduce_grads(*modules: torch.nn.Module) -> None:
    """Average the gradients of ``modules`` across Ray Train workers (no-op with one worker)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for m in modules:
        for p in m.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world


# --------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------


def build_gan(
    args: argparse.Namespace, device: torch.device | str
) -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.Adam, torch.optim.Adam]:
    """Generator, discriminator (seeded with ``args.seed``) and their Adam optimisers, models on ``device``.

    The models are on the device before the optimisers exist: Adam casts a resumed state to its parameters'
    device when the state is loaded, so models moved afterwards would leave it on the CPU and the first
    step of a resumed GPU run would fail.
    """
    from rebalance.fairgan.models import Discriminator, Generator

    torch.manual_seed(args.seed)
    G = Generator(args.nz, args.ngf, args.image_size).to(device)
    D = Discriminator(args.ndf, args.image_size).to(device)
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(args.beta1, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(args.beta1, 0.999))
    return G, D, opt_g, opt_d


def train_loop(config: dict) -> None:
    from ray import train

    from rebalance.fairgan.loss import bias_mitigation_loss

    args = argparse.Namespace(**config["args"])
    set_threads()
    device = worker_device()
    rank = train.get_context().get_world_rank()
    images, data = load_images(args.data, args.image_size)
    dataset = torch.utils.data.TensorDataset(images)
    weights = sampling_weights(data, args.weights)
    steps = steps_per_epoch(args, len(dataset))
    G, D, opt_g, opt_d = build_gan(args, device)
    extra = {"opt_g": opt_g, "opt_d": opt_d}
    modules = {"discriminator.safetensors": D}
    resumed = resume(G, extra, modules, epochs=args.epochs)
    if resumed is None:
        return
    if resumed[0] == 0 and args.init_generator:
        from rebalance.fairgan.io import load_generator

        G.load_state_dict(load_generator(args.init_generator).state_dict())
    start, step = resumed
    classifier, w = None, None
    if args.bias_weight > 0:
        from jobs.train_gan import classifier_from_args

        classifier = classifier_from_args(args, str(device))
        w = _bias_weights(args, classifier.num_classes).to(device)
    bce = F.binary_cross_entropy_with_logits
    for epoch in range(start, args.epochs):
        G.train()
        D.train()
        t0 = time.time()
        sums = {"d_loss": 0.0, "g_loss": 0.0, "bias_loss": 0.0, "d_real": 0.0, "d_fake": 0.0}
        loader = epoch_loader(dataset, weights, args.batch_size, steps, args.seed, epoch)
        gen = torch.Generator(device="cpu").manual_seed(args.seed * 1_000_003 + epoch * 7919 + rank)
        for (real,) in loader:
            real = real.to(device)
            n = real.shape[0]
            z = torch.randn(n, args.nz, generator=gen).to(device)
            fake = G(z)
            d_real, d_fake = D(real), D(fake.detach())
            loss_d = bce(d_real, torch.ones_like(d_real)) + bce(d_fake, torch.zeros_like(d_fake))
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            _allreduce_grads(D)
            opt_d.step()
            d_out = D(fake)
            loss_g = bce(d_out, torch.ones_like(d_out))
            loss_bias = torch.zeros((), device=device)
            if classifier is not None:
                loss_bias = bias_mitigation_loss(classifier(fake), w)
            opt_g.zero_grad(set_to_none=True)
            (loss_g + args.bias_weight * loss_bias).backward()
            _allreduce_grads(G)
            opt_g.step()
            step += 1
            sums["d_loss"] += loss_d.item()
            sums["g_loss"] += loss_g.item()
            sums["bias_loss"] += loss_bias.item()
            sums["d_real"] += torch.sigmoid(d_real).mean().item()
            sums["d_fake"] += torch.sigmoid(d_fake).mean().item()
        metrics = epoch_metrics(epoch, start, step, t0, **{k: v / steps for k, v in sums.items()})
        if rank == 0:
            log.info(
                "epoch %d/%d: %d steps, D %.3f, G %.3f, bias %.5f, D(real) %.2f, D(fake) %.2f, %.1f s",
                epoch + 1, args.epochs, step, metrics["d_loss"], metrics["g_loss"], metrics["bias_loss"],
                metrics["d_real"], metrics["d_fake"], metrics["seconds"],
            )  # fmt: skip
        report_epoch(G, metrics, extra, modules, epoch=epoch, step=step)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.train_gan",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = parser.add_argument_group("data and output")
    g.add_argument("data", help="img2dataset Parquet dataset directory (part-*.parquet with key, jpg, ...)")
    g.add_argument("--out", required=True, help="job directory: checkpoints, generator, summary (resumable)")
    g.add_argument(
        "--weights",
        metavar="RUN_DIR",
        default=None,
        help="draw rows by the weights of this rebalance run directory (default: uniformly, with replacement)",
    )
    g.add_argument(
        "--export-fp16",
        default=None,
        metavar="PATH",
        help="also write the final generator as float16 safetensors (with its config) to PATH",
    )
    g = parser.add_argument_group("model and optimisation")
    g.add_argument(
        "--image-size", type=int, default=32, help="image side S, a power of two (default: %(default)s)"
    )
    g.add_argument("--nz", type=int, default=64, help="latent dimension (default: %(default)s)")
    g.add_argument("--ngf", type=int, default=32, help="generator width (default: %(default)s)")
    g.add_argument("--ndf", type=int, default=32, help="discriminator width (default: %(default)s)")
    g.add_argument("--epochs", type=int, default=20, help="epochs to train in all (default: %(default)s)")
    g.add_argument(
        "--steps-per-epoch",
        type=int,
        default=None,
        help="optimiser steps per epoch (default: dataset rows / global batch size)",
    )
    g.add_argument("--batch-size", type=int, default=64, help="batch size per worker (default: %(default)s)")
    g.add_argument(
        "--lr", type=float, default=2e-4, help="Adam learning rate, G and D (default: %(default)s)"
    )
    g.add_argument("--beta1", type=float, default=0.5, help="Adam beta1 (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed of the weights, latents and sampler")
    g.add_argument(
        "--init-generator",
        default=None,
        metavar="CKPT",
        help="start the generator from this checkpoint instead of random weights (fine-tuning)",
    )
    g = parser.add_argument_group("bias mitigation (fair-GAN)")
    g.add_argument(
        "--bias-weight",
        type=float,
        default=0.0,
        help="lambda of the bias-mitigation loss added to the generator loss; 0 = off (default: %(default)s)",
    )
    g.add_argument(
        "--bias-class-weights",
        default=None,
        metavar="JSON",
        help="file with the K class weights w_k (a JSON list, or {'weights': [...]}); default all 1",
    )
    add_classifier_args(parser)
    add_ray_args(parser)
    return parser


def validate(args: argparse.Namespace) -> None:
    """Clear errors for bad options, before Ray starts."""
    from rebalance.fairgan.classifiers import KINDS

    if not Path(args.data).is_dir():
        raise ValueError(f"data directory {args.data!r} does not exist")
    # workers run in another directory: every path they read is made absolute
    for name in ("data", "weights", "init_generator", "bias_class_weights", "classifier_weights",
                 "classes_file", "classifier_run", "clip_pretrained"):  # fmt: skip
        value = getattr(args, name)
        if value and Path(value).exists():
            setattr(args, name, str(Path(value).resolve()))
    for name in ("epochs", "batch_size", "nz", "ngf", "ndf", "num_workers", "cpus_per_worker"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.image_size < 8 or args.image_size & (args.image_size - 1):
        raise ValueError(f"--image-size must be a power of two >= 8, got {args.image_size}")
    if args.lr <= 0 or args.bias_weight < 0:
        raise ValueError("--lr must be > 0 and --bias-weight >= 0")
    if args.classifier not in KINDS:
        raise ValueError(f"unknown classifier kind {args.classifier!r}; choose one of {', '.join(KINDS)}")
    for name in ("init_generator", "bias_class_weights", "classifier_weights", "classes_file"):
        value = getattr(args, name)
        if value and not Path(value).is_file():
            raise ValueError(f"--{name.replace('_', '-')} {value!r} does not exist")


def run(args: argparse.Namespace) -> dict:
    """Train (resumably) and publish ``OUT/generator.safetensors``; returns the summary."""
    from rebalance.data.atomic import atomic_write_json
    from rebalance.fairgan.io import load_generator, save_module

    validate(args)
    args.loader_workers = 0
    summary = fit("train_gan", train_loop, {}, args)
    out = Path(args.out).resolve()
    G = load_generator(out / "model.safetensors")
    save_module(G, out / "generator.safetensors")
    summary["generator"] = str(out / "generator.safetensors")
    summary["generator_config"] = G.config
    if args.export_fp16:
        save_module(G, args.export_fp16, fp16=True)
    atomic_write_json(summary, out / "summary.json")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        summary = run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"train_gan: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
