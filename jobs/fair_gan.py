"""Fair-GAN resynthesis: rebalance a generator without its training data (Jain, Memon, Togelius 2023).

    python -m jobs.fair_gan --out OUT                                   # the shipped generator, zero-shot CLIP
    python -m jobs.fair_gan --generator G.safetensors --out OUT --classifier run-clusters --classifier-run RUN
    ray job submit --working-dir . -- python -m jobs.fair_gan --out /mnt/shared/fair --num-workers 4 --gpu

Steps (progress is logged; everything lands in OUT):

1. measure: sample ``--measure-samples`` latents, generate, classify (argmax), and report the class
   distribution and the fairness discrepancy FD = sqrt(sum_k (1/K - p_k)^2) with a bootstrap confidence
   interval, the paper's mean/std over 10 splits and the FD a uniform generator would show at that n;
2. explore: breadth-first latent-space search (``rebalance.fairgan.explore``) for ``--per-class`` latents
   of every class within ``--budget`` generator calls, with an adaptive mutation step (a node whose
   children keep leaving the class halves its ``--sigma``, down to ``--sigma-min``); classes not reached
   are reported (``unreachable``);
3. write ``OUT/balanced/part-*.parquet`` (img2dataset layout: key, jpg, txt = a class prompt, label,
   source, status, width, height, plus class and latent columns): ``rebalance run`` ingests it;
4. retrain: ``jobs.train_gan`` on the balanced set, on Ray Train, with the bias-mitigation loss
   ``lambda * sum_k w_k (q_k - 1/K)^2`` (``--bias-weight`` lambda, default 10; class weights
   ``w_k ∝ max(p_k, 1e-3)^-bias_power`` from step 1's fractions, mean 1; default power 0: equal weights);
   ``--init original`` fine-tunes the given generator instead of starting from random weights;
5. measure the new generator as in step 1; with ``--real-data`` also the per-class image-quality proxy
   (diagonal Fréchet distance between CLIP features of generated and real images of the same class) of
   both generators.

Writes ``OUT/report.json`` (atomically) and prints a JSON summary. A re-run with the same settings reuses
the balanced set and resumes training from its checkpoints.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jobs import train_gan
from jobs.cli import add_ray_args, setup_logging
from jobs.dataset import ImageTextParquet

log = logging.getLogger("jobs.fair_gan")


# --------------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_and_classify(
    generator: torch.nn.Module,
    classifier,
    n: int,
    seed: int,
    batch_size: int = 256,
    encoder: torch.nn.Module | None = None,
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray | None]:
    """Labels ``(n,)`` (classifier argmax) of ``G(z)`` for ``n`` latents drawn from ``seed``, and the
    ``encoder`` features ``(n, d)`` of the same images when an encoder is given."""
    generator.eval()
    rng = np.random.default_rng(seed)
    labels, feats = [], []
    for i in range(0, n, batch_size):
        m = min(batch_size, n - i)
        z = torch.from_numpy(rng.standard_normal((m, generator.nz)).astype(np.float32)).to(device)
        images = generator(z)
        labels.append(classifier.predict(images))
        if encoder is not None:
            feats.append(encoder(images).cpu().numpy())
        if (i // batch_size) % 8 == 7:
            log.info("measure: %d/%d samples classified", i + m, n)
    return np.concatenate(labels), (np.concatenate(feats) if encoder is not None else None)


def measure(
    generator, classifier, n: int, seed: int, encoder=None, device: str = "cpu"
) -> tuple[dict[str, Any], np.ndarray, np.ndarray | None]:
    """The fairness estimate of ``generator`` as a JSON-ready dict (with fractions by class name), the
    labels and the features."""
    from rebalance.fairgan.metrics import fairness_estimate

    labels, feats = sample_and_classify(generator, classifier, n, seed, encoder=encoder, device=device)
    est = fairness_estimate(labels, classifier.num_classes, seed=seed).to_dict()
    names = classifier.class_names
    est["by_class"] = {name: est["fractions"][i] for i, name in enumerate(names)}
    est["classes_never_generated"] = [names[i] for i, c in enumerate(est["counts"]) if c == 0]
    return est, labels, feats


def real_features(
    path: str,
    classifier,
    encoder,
    label_column: str,
    max_rows: int,
    seed: int,
    device: str,
    image_size: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """CLIP features ``(m, d)`` of up to ``max_rows`` real images (a seeded sample, decoded and resized to
    the generator's ``image_size`` as the generated images are) and their class indices under the
    classifier's names (rows whose label is not a class name are left out)."""
    data = ImageTextParquet(path, text_column=None, label_column=label_column)
    index = {name: i for i, name in enumerate(classifier.class_names)}
    names = data.class_names
    keep = [i for i in range(len(data)) if names[data.targets[i]] in index]
    if not keep:
        raise ValueError(f"no row of {path} has a {label_column!r} among the classifier's class names")
    rng = np.random.default_rng(seed)
    if len(keep) > max_rows:
        keep = sorted(rng.choice(keep, size=max_rows, replace=False).tolist())
    images, _ = train_gan.load_images(path, image_size)
    x = images[keep]
    feats = []
    with torch.no_grad():
        for i in range(0, len(x), 256):
            feats.append(encoder(x[i : i + 256].to(device)).cpu().numpy())
    labels = np.array([index[names[data.targets[i]]] for i in keep])
    return np.concatenate(feats), labels


def quality(gen_feats, gen_labels, real_feats, real_labels, class_names, min_samples: int) -> dict[str, Any]:
    """Per-class diagonal Fréchet distances (``rebalance.fairgan.metrics``) by class name."""
    from rebalance.fairgan.metrics import per_class_feature_distance

    d = per_class_feature_distance(
        gen_feats, gen_labels, real_feats, real_labels, len(class_names), min_samples=min_samples
    )
    return {class_names[c]: v for c, v in d.items()}


def compare_quality(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Mean per-class distance over the classes both generators produced (enough samples), and the ratio."""
    common = sorted(set(before) & set(after))
    out: dict[str, Any] = {"common_classes": len(common)}
    if common:
        b = float(np.mean([before[c] for c in common]))
        a = float(np.mean([after[c] for c in common]))
        out.update(before_mean=b, after_mean=a, ratio=a / b if b > 0 else None)
        out["after_mean_all_classes"] = float(np.mean(list(after.values())))
    return out


# --------------------------------------------------------------------------------------------------
# the job
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from rebalance.fairgan import SHIPPED_GENERATOR

    parser = argparse.ArgumentParser(
        prog="python -m jobs.fair_gan",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = parser.add_argument_group("input and output")
    g.add_argument(
        "--generator",
        default=str(SHIPPED_GENERATOR),
        help="generator checkpoint (.safetensors from jobs.train_gan; default: the shipped DCGAN trained on "
        "the built-in dataset)",
    )
    g.add_argument("--out", required=True, help="output directory: balanced/, train/, report.json")
    g.add_argument(
        "--device", default="cpu", help="device of generator and classifier on the driver (default: cpu)"
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the measurement, the search and training")
    g = parser.add_argument_group("measure")
    g.add_argument(
        "--measure-samples",
        type=int,
        default=2000,
        help="samples drawn to measure each generator's class distribution (default: %(default)s)",
    )
    g.add_argument(
        "--real-data",
        default=None,
        help="labelled img2dataset Parquet dataset of real images: adds the per-class quality proxy",
    )
    g.add_argument(
        "--label-column", default="label", help="class column of --real-data (default: %(default)s)"
    )
    g.add_argument(
        "--real-max-rows",
        type=int,
        default=3000,
        help="real images used for the quality proxy (default: %(default)s)",
    )
    g.add_argument(
        "--quality-min-samples",
        type=int,
        default=5,
        help="classes with fewer generated or real samples get no quality value (default: %(default)s)",
    )
    g = parser.add_argument_group("explore")
    g.add_argument(
        "--per-class", type=int, default=100, help="latents to collect per class (default: %(default)s)"
    )
    g.add_argument(
        "--budget", type=int, default=20000, help="most generator calls for the search (default: %(default)s)"
    )
    g.add_argument(
        "--sigma", type=float, default=0.5, help="mutation step z' = z + sigma eps (default: %(default)s)"
    )
    g.add_argument(
        "--sigma-min",
        type=float,
        default=None,
        help="floor of the adaptive step: a node with --max-failures rejections halves its sigma down to "
        "this before its branch dies; = --sigma for a fixed step (default: --sigma / 8, i.e. 0.0625)",
    )
    g.add_argument(
        "--children", type=int, default=4, help="children per node and round (default: %(default)s)"
    )
    g.add_argument(
        "--max-failures",
        type=int,
        default=20,
        help="rejected children that end a branch (default: %(default)s)",
    )
    g.add_argument(
        "--seed-fraction",
        type=float,
        default=0.5,
        help="largest share of the budget spent on random seeds (default: %(default)s)",
    )
    g.add_argument(
        "--min-confidence",
        type=float,
        default=0.0,
        help="keep a latent only when the classifier's softmax probability of its class is at least this",
    )
    g.add_argument(
        "--rows-per-shard", type=int, default=2000, help="rows per Parquet shard (default: %(default)s)"
    )
    g = parser.add_argument_group("retrain")
    g.add_argument("--skip-retrain", action="store_true", help="stop after writing the balanced set")
    g.add_argument(
        "--init",
        choices=("scratch", "original"),
        default="scratch",
        help="new generator from random weights, or fine-tuned from --generator (default: %(default)s)",
    )
    g.add_argument("--epochs", type=int, default=20, help="training epochs (default: %(default)s)")
    g.add_argument("--steps-per-epoch", type=int, default=100, help="steps per epoch (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=64, help="batch size per worker (default: %(default)s)")
    g.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate (default: %(default)s)")
    g.add_argument("--ndf", type=int, default=32, help="discriminator width (default: %(default)s)")
    g.add_argument(
        "--bias-weight",
        type=float,
        default=10.0,
        help="lambda of the bias-mitigation loss (default: %(default)s)",
    )
    g.add_argument(
        "--bias-power",
        type=float,
        default=0.0,
        help="class weights w_k ∝ max(p_k, 1e-3)^-power from the original generator's measured fractions; "
        "0 = equal weights, 0.5 = toward its rare classes (default: %(default)s)",
    )
    train_gan.add_classifier_args(parser)
    add_ray_args(parser)
    return parser


def validate(args: argparse.Namespace) -> None:
    """Clear errors for bad options, before any work."""
    from rebalance.fairgan.classifiers import KINDS

    if not Path(args.generator).is_file():
        raise FileNotFoundError(f"--generator {args.generator!r} does not exist or is not a file")
    if args.classifier not in KINDS:
        raise ValueError(f"unknown classifier kind {args.classifier!r}; choose one of {', '.join(KINDS)}")
    if args.budget < 1:
        raise ValueError(f"--budget must be >= 1 generator call, got {args.budget}")
    for name in ("measure_samples", "per_class", "children", "max_failures", "rows_per_shard", "epochs",
                 "steps_per_epoch", "batch_size", "real_max_rows", "quality_min_samples"):  # fmt: skip
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.sigma <= 0 or not 0 < args.seed_fraction <= 1 or not 0 <= args.min_confidence < 1:
        raise ValueError("need --sigma > 0, 0 < --seed-fraction <= 1 and 0 <= --min-confidence < 1")
    if args.sigma_min is None:
        args.sigma_min = args.sigma / 8
    if not 0 < args.sigma_min <= args.sigma:
        raise ValueError(f"need 0 < --sigma-min <= --sigma, got {args.sigma_min} and {args.sigma}")
    if args.bias_weight < 0 or args.bias_power < 0:
        raise ValueError("--bias-weight and --bias-power must be >= 0")
    if args.real_data and not Path(args.real_data).is_dir():
        raise FileNotFoundError(f"--real-data {args.real_data!r} is not a directory")


def _explore_settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("generator", "classifier", "classifier_run", "clip_model", "clip_pretrained", "classes_file",
            "classifier_weights", "classifier_arch", "classifier_arch_kwargs", "per_class", "budget", "sigma",
            "sigma_min", "children", "max_failures", "seed_fraction", "min_confidence", "rows_per_shard", "seed")  # fmt: skip
    return {k: getattr(args, k) for k in keys}


def _train_argv(args: argparse.Namespace, out: Path, G, weights_path: Path) -> list[str]:
    argv = [
        str(out / "balanced"), "--out", str(out / "train"),
        "--epochs", str(args.epochs), "--steps-per-epoch", str(args.steps_per_epoch),
        "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--seed", str(args.seed),
        "--nz", str(G.config["nz"]), "--ngf", str(G.config["ngf"]), "--ndf", str(args.ndf),
        "--image-size", str(G.config["image_size"]),
        "--bias-weight", str(args.bias_weight), "--bias-class-weights", str(weights_path),
        "--classifier", args.classifier, "--temperature", str(args.temperature),
        "--classifier-arch-kwargs", args.classifier_arch_kwargs,
        "--address", args.address, "--num-workers", str(args.num_workers),
        "--cpus-per-worker", str(args.cpus_per_worker),
    ]  # fmt: skip
    for opt in ("classifier_run", "clip_model", "clip_pretrained", "classes_file", "classifier_weights",
                "classifier_arch"):  # fmt: skip
        if getattr(args, opt):
            argv += [f"--{opt.replace('_', '-')}", str(getattr(args, opt))]
    if args.init == "original":
        argv += ["--init-generator", str(args.generator)]
    if args.gpu:
        argv.append("--gpu")
    return argv


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole job (see the module docstring); returns the report written to ``OUT/report.json``."""
    from rebalance.data.atomic import atomic_write_json
    from rebalance.fairgan.classifiers import latent_classifier
    from rebalance.fairgan.explore import explore
    from rebalance.fairgan.io import load_generator, to_uint8, write_balanced_set
    from rebalance.fairgan.loss import rarity_weights

    validate(args)
    t_start = time.time()
    out = Path(args.out).resolve()
    balanced = out / "balanced"
    settings = _explore_settings(args)
    done = balanced / "dataset.json"
    previous = json.loads(done.read_text()) if done.is_file() else None
    reuse = previous is not None and previous.get("settings") == settings
    if not reuse and (out / "train").exists():
        # a new balanced set under an old generator's checkpoints would silently resume stale training
        raise ValueError(
            f"{out} holds a generator trained on a balanced set with other exploration settings; "
            "use a new --out or remove it to start over"
        )
    out.mkdir(parents=True, exist_ok=True)
    device = args.device
    G = load_generator(args.generator).to(device)
    classifier = train_gan.classifier_from_args(args, device)
    names = classifier.class_names
    log.info(
        "generator %s (%s); classifier %s with %d classes",
        args.generator,
        G.config,
        classifier.kind,
        len(names),
    )
    encoder = getattr(classifier, "encoder", None)
    real = None
    if args.real_data:
        if encoder is None:
            from rebalance.fairgan.classifiers import _clip_encoder
            from rebalance.models import TINY_CHECKPOINT, TINY_MODEL

            encoder = _clip_encoder(TINY_MODEL, str(TINY_CHECKPOINT), device)
        real = real_features(
            args.real_data, classifier, encoder, args.label_column, args.real_max_rows, args.seed, device,
            G.config["image_size"],
        )  # fmt: skip
        log.info("real data: %d images for the quality proxy", len(real[1]))
    feat_encoder = encoder if real is not None else None

    # 1. measure
    before, labels0, feats0 = measure(G, classifier, args.measure_samples, args.seed, feat_encoder, device)
    log.info(
        "before: FD %.4f [%.4f, %.4f] over %d samples (uniform floor %.4f); %d classes never generated",
        before["fd"], before["ci_low"], before["ci_high"], before["n"], before["floor"],
        len(before["classes_never_generated"]),
    )  # fmt: skip
    report: dict[str, Any] = {
        "generator": str(Path(args.generator).resolve()),
        "generator_config": G.config,
        "classifier": classifier.describe(),
        "before": before,
        "argv": getattr(args, "argv", None) or sys.argv[1:],
    }

    # 2-3. explore and write the balanced set (reused when the settings match)
    if reuse:
        assert previous is not None
        log.info("balanced set in %s matches the settings: reused", balanced)
        exploration = previous["exploration"]
        dataset = previous
    else:
        classify = latent_classifier(G, classifier, args.min_confidence, device=device)
        result = explore(
            classify, G.nz, len(names), args.per_class, args.budget, sigma=args.sigma, sigma_min=args.sigma_min,
            children=args.children,
            max_failures=args.max_failures, seed_fraction=args.seed_fraction, seed=args.seed + 1,
            progress=lambda msg: log.info("explore: %s", msg),
        )  # fmt: skip
        exploration = result.summary()
        exploration["unreachable_classes"] = {names[int(c)]: r for c, r in exploration["unreachable"].items()}
        for name, reason in exploration["unreachable_classes"].items():
            log.warning("class %r not reached: %s", name, reason)
        z, y = result.stacked()

        @torch.no_grad()
        def render(latents: np.ndarray) -> np.ndarray:
            return np.concatenate(
                [
                    to_uint8(G(torch.from_numpy(latents[i : i + 256]).to(device)))
                    for i in range(0, len(latents), 256)
                ]
            )

        dataset = write_balanced_set(
            balanced, z, y, names, classifier.class_prompts, render, rows_per_shard=args.rows_per_shard,
            seed=args.seed, extra={"settings": settings, "exploration": exploration},
            progress=lambda msg: log.info("%s", msg),
        )  # fmt: skip
    report["exploration"] = exploration
    report["balanced_set"] = {k: dataset[k] for k in ("path", "rows", "shards", "counts")}
    if dataset["rows"] == 0:
        raise RuntimeError("exploration found no latent of any class; nothing to retrain on")

    # 4. retrain with the bias-mitigation loss
    w = rarity_weights(before["fractions"], power=args.bias_power)
    weights_path = out / "bias_weights.json"
    atomic_write_json({"weights": [float(v) for v in w], "classes": names}, weights_path)
    report["bias_weights"] = {n: float(v) for n, v in zip(names, w, strict=True)}
    if not args.skip_retrain:
        train_args = train_gan.build_parser().parse_args(_train_argv(args, out, G, weights_path))
        summary = train_gan.run(train_args)
        report["train"] = summary
        G2 = load_generator(summary["generator"]).to(device)
        # 5. measure again
        after, labels1, feats1 = measure(
            G2, classifier, args.measure_samples, args.seed, feat_encoder, device
        )
        log.info(
            "after: FD %.4f [%.4f, %.4f] (before %.4f)",
            after["fd"],
            after["ci_low"],
            after["ci_high"],
            before["fd"],
        )
        report["after"] = after
        report["fd_ratio"] = before["fd"] / after["fd"] if after["fd"] > 0 else None
        if real is not None:
            q0 = quality(feats0, labels0, *real, names, args.quality_min_samples)
            q1 = quality(feats1, labels1, *real, names, args.quality_min_samples)
            report["quality"] = {"before": q0, "after": q1, **compare_quality(q0, q1)}
    report["seconds"] = time.time() - t_start
    atomic_write_json(report, out / "report.json")
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else None
    setup_logging()
    try:
        report = run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"fair_gan: error: {err}", file=sys.stderr)
        return 2
    headline = {
        "out": str(Path(args.out).resolve()),
        "fd_before": report["before"]["fd"],
        "fd_after": report.get("after", {}).get("fd"),
        "fd_ratio": report.get("fd_ratio"),
        "balanced_rows": report["balanced_set"]["rows"],
        "unreachable": report["exploration"]["unreachable_classes"],
        "quality_ratio": report.get("quality", {}).get("ratio"),
    }
    print(json.dumps(headline, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
