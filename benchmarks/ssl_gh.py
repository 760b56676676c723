"""Geometric Harmonization (issue 16, item 3b): SimCLR with and without GH on the long-tailed built-in data.

    nice -n 10 .venv/bin/python benchmarks/ssl_gh.py --out runs/ssl-gh          # 3 seeds x 2 arms
    nice -n 10 .venv/bin/python benchmarks/ssl_gh.py --out runs/ssl-gh --arms infonce gh gh-run
    .venv/bin/python benchmarks/ssl_gh.py --quick --out runs/ssl-gh-quick      # 1 seed, 2 short runs

Every arm is the real job, ``jobs.train_ssl`` (``rebalance-tiny``'s image tower from random weights, 2-layer
projection head, two augmented views, InfoNCE at temperature 0.2), on the built-in long-tailed dataset
(``generate_dataset``: 3,000 rows, 24 concepts, head / tail 63), same seeds, steps, batch and learning rate:

- ``infonce``: InfoNCE alone;
- ``gh``: ``--gh``: InfoNCE + the GH loss (Zhou et al. 2023; ``rebalance.losses.GeometricHarmonizationLoss``)
  on a simplex ETF of ``--gh-classes`` vertices with a uniform class marginal, weight 0 for
  ``--gh-warmup-epochs`` (default half the epochs: GH starts from a warmed-up SSL model) and then ramped to
  1 over ``--gh-ramp-epochs``;
- ``gh-run`` (only when ``--arms`` names it): the same with ``--gh-run OUT/run`` instead, the job's
  documented path: K and the class marginal pi from the image clusters of a rebalance run of the dataset
  with the spec's defaults (k auto = round(sqrt(3000)) = 55 clusters; pi their row fractions, long-tailed).

Each trained tower is scored by ``jobs.linear_probe`` (frozen features, logistic regression fitted on a
balanced set of ``--probe-train`` fresh renders per concept, tested on ``--probe-test`` per concept; tail =
the 8 concepts with the fewest rows in the training data). Prints mean ± sample std over seeds per arm and
the per-seed paired difference of each GH arm to ``infonce``; writes ``OUT/results.json``. A re-run with the
same budget keeps the finished (arm, seed) records.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from downstream import probe_arm, run_job, summarise, todo, write_balanced_set  # noqa: E402

import rebalance  # noqa: E402
from jobs import train_ssl  # noqa: E402
from rebalance.data.atomic import atomic_write_json  # noqa: E402
from rebalance.data.synthetic import generate_dataset  # noqa: E402

ARMS = ("infonce", "gh", "gh-run")
METRICS = ("balanced_accuracy", "tail_accuracy", "head_accuracy", "class_gap")
BUDGET = ("epochs", "steps_per_epoch", "batch_size", "lr", "gh_classes", "gh_warmup_epochs", "gh_ramp_epochs")
BUDGET += ("probe_train", "probe_test")


def train(arm: str, seed: int, data: Path, out: Path, args: argparse.Namespace, run: Path | None) -> dict:
    """One ``jobs.train_ssl`` run into ``out`` (its stdout in ``out/job_stdout.txt``); returns its summary.
    ``run``: the rebalance run whose image clusters give ``gh-run`` its K and pi."""
    argv = [str(data), "--out", str(out), "--seed", str(seed), "--epochs", str(args.epochs)]
    argv += ["--steps-per-epoch", str(args.steps_per_epoch), "--batch-size", str(args.batch_size)]
    argv += ["--lr", str(args.lr)]
    if arm in ("gh", "gh-run"):
        argv += (
            ["--gh", "--gh-classes", str(args.gh_classes)] if arm == "gh" else ["--gh", "--gh-run", str(run)]
        )
        argv += [
            "--gh-warmup-epochs",
            str(args.gh_warmup_epochs),
            "--gh-ramp-epochs",
            str(args.gh_ramp_epochs),
        ]
    return run_job(train_ssl, argv, out)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/ssl-gh", help="working directory (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=["infonce", "gh"])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--steps-per-epoch", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--gh-classes", type=int, default=24, help="ETF vertices K (default: the 24 concepts)"
    )
    parser.add_argument("--gh-warmup-epochs", type=int, default=None, help="default: half the epochs")
    parser.add_argument("--gh-ramp-epochs", type=int, default=2)
    parser.add_argument("--probe-train", type=int, default=20, help="balanced probe-train images per concept")
    parser.add_argument("--probe-test", type=int, default=50, help="balanced test images per concept")
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs of 3 steps of 32, small probe")
    args = parser.parse_args(argv)
    if "infonce" not in args.arms:
        parser.error("--arms must include infonce (the reference of the paired differences)")
    if args.quick:
        args.seeds, args.epochs, args.steps_per_epoch, args.batch_size = args.seeds[:1], 2, 3, 32
        args.probe_train, args.probe_test = 5, 10
    if args.gh_warmup_epochs is None:
        args.gh_warmup_epochs = args.epochs // 2
    logging.basicConfig(level=logging.WARNING)
    from rebalance.runtime.session import ray_session
    from rebalance.spec import RaySpec

    t_start = time.time()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = out / "dataset"
    if not (data / "dataset.json").is_file():
        generate_dataset(data, n_rows=3000, n_shards=4, seed=0)
    probe_train = write_balanced_set(out / "probe_train", args.probe_train, seed=1001)
    probe_test = write_balanced_set(out / "probe_test", args.probe_test, seed=1002)
    config = {k: getattr(args, k) for k in BUDGET}
    results: dict = {"config": config | {"seeds": args.seeds}, "runs": []}
    previous = out / "results.json"
    if previous.is_file():
        old = json.loads(previous.read_text())
        if all(old["config"].get(k) == v for k, v in config.items()):
            results["runs"] = old["runs"]
    with ray_session(RaySpec(address="local")):
        run = None
        if "gh-run" in args.arms:  # the spec's defaults on the dataset, up to the clusters
            run = out / "run"
            embed = {"model": "rebalance-tiny", "pretrained": "synthetic"}
            spec = {"data": {"path": str(data)}, "embed": embed, "ray": {"address": "local"}}
            rebalance.run(spec, run, until="cluster")
        for arm, seed in todo(results["runs"], [(a, s) for s in args.seeds for a in args.arms]):
            t0 = time.time()
            arm_out = out / "arms" / f"{arm}-seed{seed}"
            summary = train(arm, seed, data, arm_out, args, run)
            sets = (probe_train, probe_test, data)
            probe, record = probe_arm(arm, seed, arm_out, summary, sets, METRICS, t0)
            results["runs"].append(record)
            atomic_write_json(results, previous)
            print(
                f"{arm:8s} seed {seed}: probe balanced {probe['balanced_accuracy']:.4f}"
                f" tail {probe['tail_accuracy']:.4f} loss {record['train_loss']:.3f}"
                f" ({record['seconds']:.0f} s)",
                flush=True,
            )
    by = {(r["arm"], r["seed"]): r for r in results["runs"]}
    seeds = [s for s in args.seeds if all((a, s) in by for a in args.arms)]
    results["summary"] = {
        arm: {m: summarise([by[arm, s]["probe"][m] for s in seeds]) for m in METRICS} for arm in args.arms
    }
    results["paired_difference_to_infonce"] = {
        arm: {
            m: summarise([by[arm, s]["probe"][m] - by["infonce", s]["probe"][m] for s in seeds])
            for m in METRICS
        }
        for arm in args.arms
        if arm != "infonce"
    }
    results["seconds"] = time.time() - t_start
    atomic_write_json(results, previous)

    print(
        f"\nlinear probe on the balanced test set, {args.epochs} epochs x {args.steps_per_epoch} steps of"
        f" {args.batch_size}, GH warm-up {args.gh_warmup_epochs} epochs; seeds {seeds}; mean ± sample std"
    )
    print(f"  {'arm':18s} " + " ".join(f"{m:>17s}" for m in METRICS))
    rows = [(a, results["summary"][a]) for a in args.arms]
    rows += [(f"{a} - infonce", row) for a, row in results["paired_difference_to_infonce"].items()]
    for name, row in rows:
        sign = "+" if name.endswith(" - infonce") else ""
        print(
            f"  {name:18s} " + " ".join(f"{row[m]['mean']:{sign}.4f} ± {row[m]['std']:.4f}" for m in METRICS)
        )
    print(f"\nresults: {previous} ({results['seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
