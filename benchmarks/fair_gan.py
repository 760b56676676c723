"""Does fair-GAN resynthesis rebalance a long-tailed generator without hurting its images?

    .venv/bin/python benchmarks/fair_gan.py --out runs/bench-fairgan-v2            # ~3.5 min on 2 cores
    .venv/bin/python benchmarks/fair_gan.py --out runs/bench-fairgan-v2 --sweep 0 \
        --arm 'previous-defaults=--bias-weight 1 --bias-power 0.5 --sigma-min 0.5'   # + 2 arms, ~9 min

On the built-in long-tailed dataset (``generate_dataset(seed=0)``: 3000 rows, 24 concepts, 1130 rows of
``red circle``, 18 of ``cyan cross``):

1. the original generator is the shipped DCGAN (``rebalance/model_configs/fairgan-dcgan-synthetic``,
   trained on that dataset by ``jobs.train_gan``, docs/fair_gan.md); the classifier is zero-shot
   ``rebalance-tiny`` against the concepts' caption templates (97 % accurate on real images);
2. ``jobs.fair_gan`` measures it (``--measure-samples`` samples), explores its latent space for
   ``--per-class`` latents per concept within ``--budget`` generator calls, writes the balanced set and
   retrains a generator from random weights on it with the bias-mitigation loss (the same steps, batch and
   learning rate as the original), on Ray Train, and measures the result; everything else (lambda, the
   class weights, the adaptive mutation step) is ``jobs.fair_gan``'s default;
3. scores: the fairness discrepancy FD of both generators (target: the rebalanced one at least 3x lower),
   and per concept the diagonal Fréchet distance between ``rebalance-tiny`` features of the generated
   images of that concept and of the real images of that concept (target: the mean over the concepts
   both generators produce at least ``--quality-min-samples`` times is not more than 20 % worse).

The main arm (``fair-gan``) is ``jobs.fair_gan`` with its default settings. ``--sweep 0 1`` adds arms
retrained with other bias-loss weights lambda (0: the balanced data alone, what the data does without the
loss), everything else default; ``--arm 'NAME=OPTIONS'`` adds an arm with other ``jobs.fair_gan``
options. Extra arms are reported beside the main arm; the targets are judged on the main arm only. Prints a
table and writes ``OUT/results.json``. Use a new ``--out`` when the job's defaults change (an arm directory
holding a run with other settings is refused, not resumed).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from jobs import fair_gan
from rebalance.data.atomic import atomic_write_json
from rebalance.data.synthetic import generate_dataset

ROOT = Path(__file__).resolve().parents[1]


def arm_argv(args: argparse.Namespace, out: Path, data: Path, extra: list[str]) -> list[str]:
    """``jobs.fair_gan`` options of one arm: the shared measurement and budget, plus the arm's ``extra``."""
    return [
        "--out", str(out), "--real-data", str(data), "--seed", str(args.seed),
        "--measure-samples", str(args.measure_samples), "--per-class", str(args.per_class),
        "--budget", str(args.budget), "--epochs", str(args.epochs), "--steps-per-epoch", str(args.steps_per_epoch),
        "--quality-min-samples", str(args.quality_min_samples), *extra,
    ]  # fmt: skip


def parse_arm(text: str) -> tuple[str, list[str]]:
    """``'NAME=--opt value ...'`` -> ``(NAME, ['--opt', 'value', ...])``."""
    import shlex

    name, sep, options = text.partition("=")
    if not sep or not name.strip() or "/" in name:
        raise argparse.ArgumentTypeError(f"expected NAME=OPTIONS, got {text!r}")
    return name.strip(), shlex.split(options)


def summarise(report: dict) -> dict:
    q = report.get("quality", {})
    return {
        "fd_before": report["before"]["fd"],
        "fd_before_ci": [report["before"]["ci_low"], report["before"]["ci_high"]],
        "fd_after": report["after"]["fd"],
        "fd_after_ci": [report["after"]["ci_low"], report["after"]["ci_high"]],
        "fd_floor": report["after"]["floor"],
        "fd_ratio": report["fd_ratio"],
        "quality_before_mean": q.get("before_mean"),
        "quality_after_mean": q.get("after_mean"),
        "quality_ratio": q.get("ratio"),
        "quality_common_classes": q.get("common_classes"),
        "classes_never_generated_before": report["before"]["classes_never_generated"],
        "classes_never_generated_after": report["after"]["classes_never_generated"],
        "unreachable": report["exploration"]["unreachable_classes"],
        "balanced_rows": report["balanced_set"]["rows"],
        "exploration_calls": report["exploration"]["calls"],
        "train_seconds": report["train"]["last_metrics"].get("seconds"),
        "seconds": report["seconds"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="benchmark directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--measure-samples", type=int, default=2000, help="samples per measurement")
    parser.add_argument("--per-class", type=int, default=100, help="latents per concept in the balanced set")
    parser.add_argument("--budget", type=int, default=30000, help="generator calls for the search")
    parser.add_argument("--epochs", type=int, default=20, help="retraining epochs (as the shipped generator)")
    parser.add_argument("--steps-per-epoch", type=int, default=100, help="retraining steps per epoch")
    parser.add_argument(
        "--quality-min-samples", type=int, default=5, help="min samples per class for quality"
    )
    parser.add_argument(
        "--sweep",
        type=float,
        nargs="*",
        default=[],
        metavar="LAMBDA",
        help="extra arms with these bias-loss weights (0 = the balanced data alone), reported beside the main arm",
    )
    parser.add_argument(
        "--arm",
        type=parse_arm,
        action="append",
        default=[],
        metavar="NAME=OPTIONS",
        help="an extra arm with these jobs.fair_gan options, e.g. 'old=--bias-weight 1 --bias-power 0.5'",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = Path(args.out).resolve()
    data = out / "data"
    if not (data / "dataset.json").is_file():
        generate_dataset(data, seed=0)
    defaults = fair_gan.build_parser()
    arms: dict[str, list[str]] = {"fair-gan": []}
    for lam in args.sweep:
        arms[f"lambda={lam:g}"] = ["--bias-weight", str(lam)]
    arms.update(args.arm)
    settings = {**vars(args), "arm": dict(args.arm)}
    settings["job_defaults"] = {
        k: defaults.get_default(k) for k in ("bias_weight", "bias_power", "sigma", "sigma_min", "init")
    }
    if settings["job_defaults"]["sigma_min"] is None:  # jobs.fair_gan's default: sigma / 8
        settings["job_defaults"]["sigma_min"] = settings["job_defaults"]["sigma"] / 8
    results: dict = {"settings": settings, "arms": {}, "commands": {}}
    t0 = time.time()
    for name, extra in arms.items():
        argv_arm = arm_argv(args, out / name, data, extra)
        results["commands"][name] = "python -m jobs.fair_gan " + " ".join(argv_arm)
        if fair_gan.main(argv_arm) != 0:
            raise SystemExit(f"arm {name} failed")
        report = json.loads((out / name / "report.json").read_text())
        results["arms"][name] = summarise(report)
        results["arms"][name]["per_class_quality"] = {
            "before": report["quality"]["before"],
            "after": report["quality"]["after"],
        }
        results["arms"][name]["counts_before"] = dict(
            zip(report["classifier"]["classes"], report["before"]["counts"], strict=True)
        )
        results["arms"][name]["counts_after"] = dict(
            zip(report["classifier"]["classes"], report["after"]["counts"], strict=True)
        )
    results["seconds"] = time.time() - t0
    atomic_write_json(results, out / "results.json")

    print(f"\nfair-GAN benchmark ({args.measure_samples} samples per measurement, {args.per_class} latents per "
          f"concept, budget {args.budget}, retraining {args.epochs} x {args.steps_per_epoch} steps)")  # fmt: skip
    jd = settings["job_defaults"]
    print(f"fair-gan = jobs.fair_gan defaults: lambda {jd['bias_weight']:g}, class weights power "
          f"{jd['bias_power']:g}, sigma {jd['sigma']:g} adaptive down to {jd['sigma_min']:g}, init {jd['init']}")  # fmt: skip
    for name, extra in arms.items():
        if name != "fair-gan":
            print(f"{name}: {' '.join(extra)}")
    print(f"{'arm':<20} {'FD before [95% CI]':>26} {'FD after [95% CI]':>26} {'ratio':>6} "
          f"{'quality before':>15} {'after':>8} {'ratio':>6} {'classes':>7}")  # fmt: skip
    for name, r in results["arms"].items():
        b, a = r["fd_before_ci"], r["fd_after_ci"]
        print(
            f"{name:<20} {r['fd_before']:.4f} [{b[0]:.4f}, {b[1]:.4f}] {r['fd_after']:>8.4f} [{a[0]:.4f}, {a[1]:.4f}] "
            f"{r['fd_ratio']:>6.2f} {r['quality_before_mean']:>15.4f} {r['quality_after_mean']:>8.4f} "
            f"{r['quality_ratio']:>6.3f} {r['quality_common_classes']:>7}"
        )
    main_arm = results["arms"]["fair-gan"]
    print(f"FD of a perfectly uniform generator at this sample size: {main_arm['fd_floor']:.4f}")
    print(f"target FD ratio >= 3: {'met' if main_arm['fd_ratio'] >= 3 else 'NOT met'} ({main_arm['fd_ratio']:.2f}); "
          f"target quality ratio <= 1.2: {'met' if main_arm['quality_ratio'] <= 1.2 else 'NOT met'} "
          f"({main_arm['quality_ratio']:.3f})")  # fmt: skip
    print(f"unreachable classes: {main_arm['unreachable'] or 'none'}")
    print(f"wrote {out / 'results.json'} ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
