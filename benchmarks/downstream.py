"""Does rebalancing help downstream? Plain vs rebalance-weighted vs logit-adjusted training, probed.

    .venv/bin/python benchmarks/downstream.py --out runs/downstream            # everything, ~15-25 min on 2 cores
    .venv/bin/python benchmarks/downstream.py --out runs/downstream --arms sup-plain sup-rebalanced --seeds 0
    .venv/bin/python benchmarks/downstream.py --out runs/downstream-exact --balance-yaml exact.yaml  # relax: exact

What it does, all on the built-in long-tailed dataset (3000 rows, 24 concepts, head/tail 63):

1. generates the dataset and runs the rebalance pipeline on it (``--embed-pretrained``: the embedding
   model of the pipeline; default the trained checkpoint shipped in ``rebalance/model_configs/`` when
   present, else random weights) to get per-row weights;
2. renders two *balanced* labelled sets of the same 24 concepts with other seeds (``--probe-train`` and
   ``--probe-test`` images per concept), the yardstick for every arm;
3. trains the same model (``rebalance-tiny``'s image tower, same steps, batch, learning rate, seeds) in each
   arm through the real jobs on Ray Train:

   - ``sup-plain``: ``train_longtail --loss ce``, rows drawn uniformly (with replacement);
   - ``sup-rebalanced``: ``train_longtail --loss ce --weights RUN``: rows drawn by the rebalance weights
     (the spec's default balancing: ``relax: auto``, rho 1 on both cluster marginals; ``--balance-yaml
     FILE``: a YAML mapping laid over that run's balance section, e.g. ``relax: exact``, to compare
     balancing settings);
   - ``sup-image-rebalanced``: the same with the weights of a run that balances ``image_cluster`` only;
   - ``sup-label-balanced``: the same with the weights of a run that balances the true ``label`` column
     (the oracle: what re-sampling could give if the clusters were exactly the concepts);
   - ``sup-logit-adjusted``: ``train_longtail --loss logit_adjusted``, uniform draws;
   - ``clip-plain`` / ``clip-rebalanced`` / ``clip-label-balanced``: ``train_clip`` without / with the
     cluster / label weights (image-text, no labels seen by the model);

4. scores each trained model two ways on the balanced test set: the linear probe (``jobs.linear_probe``:
   frozen features, probe fitted on the balanced probe-train set) and, for the supervised arms, the
   trained classifier itself (``train_longtail --eval-data``); tail = the 8 concepts with the fewest rows.

Prints one table per score with mean and sample standard deviation over seeds, and the per-seed paired
difference of each arm to its plain arm; writes everything to ``OUT/results.json``. Re-running the same
command continues where it stopped (finished arms are kept, an interrupted job resumes from its checkpoint).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from jobs import linear_probe, train_clip, train_longtail
from rebalance.data.atomic import atomic_write_json, atomic_write_table
from rebalance.data.synthetic import (
    CAPTION_TEMPLATES,
    CONCEPTS,
    LABELS,
    SCHEMA,
    generate_dataset,
    render_image,
)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "rebalance" / "model_configs" / "rebalance-tiny-synthetic.safetensors"
ARMS = (
    "sup-plain",
    "sup-rebalanced",
    "sup-image-rebalanced",
    "sup-label-balanced",
    "sup-logit-adjusted",
    "clip-plain",
    "clip-rebalanced",
    "clip-label-balanced",
)
METRICS = ("balanced_accuracy", "tail_accuracy", "class_gap", "class_std", "accuracy")


def write_balanced_set(out_dir: Path, per_concept: int, seed: int) -> Path:
    """``per_concept`` freshly rendered images of each of the 24 concepts, img2dataset layout, one shard."""
    rng = np.random.default_rng(seed)
    rows = {name: [] for name in SCHEMA.names}
    for c, (colour, shape) in enumerate(CONCEPTS):
        for j in range(per_concept):
            buf = io.BytesIO()
            Image.fromarray(render_image(colour, shape, rng), mode="RGB").save(
                buf, format="JPEG", quality=95, subsampling=0
            )
            rows["key"].append(f"s{seed}-{c:02d}-{j:05d}")
            rows["jpg"].append(buf.getvalue())
            rows["txt"].append(
                CAPTION_TEMPLATES[j % len(CAPTION_TEMPLATES)].format(colour=colour, shape=shape)
            )
            rows["label"].append(LABELS[c])
            rows["source"].append("benchmark")
            rows["status"].append("success")
            rows["width"].append(32)
            rows["height"].append(32)
    atomic_write_table(pa.table(rows, schema=SCHEMA), out_dir / "part-00000.parquet")
    return out_dir


def rebalance_run(
    dataset: Path,
    out: Path,
    pretrained: str | None,
    marginals: tuple[str, ...] = (),
    balance: dict | None = None,
) -> Path:
    """The demo's pipeline (16 image x 16 text clusters, uniform targets) on ``dataset``; ``marginals``
    replaces the balanced columns (``("label",)``: the oracle that balances the true concepts), ``balance``
    is laid over the balance section (``{"relax": 1.0}``)."""
    import rebalance

    spec = {
        "data": {"path": str(dataset), "carry": ["label", "source"]},
        "embed": {"model": "rebalance-tiny", "pretrained": pretrained, "batch_size": 256},
        "cluster": {"image": {"k": 16}, "text": {"k": 16}, "niter": 20, "seed": 0},
        # allow_partial: with a trained embedding model image and text clusters are nearly the same partition
        # of the concepts, the joint table is sparse and IPF toward two uniform marginals can stall short of
        # tol (structural zeros); the weights it reached are still kept, and the error is printed.
        "balance": {
            "marginals": list(marginals) or ["image_cluster", "text_cluster"],
            "target": "uniform",
            "tol": 1.0e-6,
            "allow_partial": True,
        }
        | (balance or {}),
        "report": {"spectra_by": ["image_cluster"], "html": False},
        "ray": {"address": "local"},
    }
    result = rebalance.run(spec, out)
    return result.out


def label_weight_shares(run: Path) -> dict[str, float]:
    """Share of the total weight that each concept gets (uniform over concepts would be 1/24 each)."""
    from rebalance.data.parts import read_parts

    emb = read_parts(run / "embeddings", columns=["key", "label"])
    w = read_parts(run / "weights", columns=["key", "weight"])
    assert emb.column("key").to_pylist() == w.column("key").to_pylist()
    labels = np.asarray(emb.column("label").to_pylist())
    weights = w.column("weight").to_numpy()
    return {lab: float(weights[labels == lab].sum() / weights.sum()) for lab in LABELS}


def summarise(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=float)
    return {
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
        "min": float(a.min()),
        "max": float(a.max()),
    }


def train_arm(
    arm: str,
    seed: int,
    data: Path,
    runs: dict[str, Path],
    out: Path,
    args: argparse.Namespace,
    eval_set: Path,
) -> dict:
    budget = [
        "--epochs",
        str(args.epochs),
        "--steps-per-epoch",
        str(args.steps_per_epoch),
        "--batch-size",
        str(args.batch_size),
        "--lr",
        str(args.lr),
        "--seed",
        str(seed),
    ]
    common = [str(data), "--out", str(out), *budget]
    if arm.startswith("sup-"):
        loss = "logit_adjusted" if arm == "sup-logit-adjusted" else "ce"
        argv = [*common, "--loss", loss, "--eval-data", str(eval_set)]
    else:
        argv = list(common)
    for kind in ("image-rebalanced", "label-balanced", "rebalanced"):
        if arm.endswith(kind):
            argv += ["--weights", str(runs[kind])]
            break
    return run_job(train_longtail if arm.startswith("sup-") else train_clip, argv, out)


def todo(runs: list[dict], pairs: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """The (arm, seed) ``pairs`` without a record in ``runs`` (those an earlier invocation finished)."""
    done = {(r["arm"], r["seed"]) for r in runs}
    return [pair for pair in pairs if pair not in done]


def probe_arm(
    arm: str,
    seed: int,
    arm_out: Path,
    summary: dict,
    sets: tuple[Path, Path, Path],
    metrics: tuple[str, ...],
    t0: float,
) -> tuple[dict, dict]:
    """``jobs.linear_probe`` on the model an arm trained into ``arm_out``: fitted on ``sets[0]``, tested on
    ``sets[1]``, head / tail by the class counts of ``sets[2]``. Returns the probe's result and the arm's
    record (its ``metrics``, per-class accuracy, the job's last loss, seconds since ``t0``)."""
    probe_train, probe_test, counts_from = sets
    argv = [
        str(probe_train),
        "--test-data",
        str(probe_test),
        "--pretrained",
        str(arm_out / "model.safetensors"),
    ]
    argv += ["--class-counts-from", str(counts_from), "--cpu"]
    probe = linear_probe.probe(linear_probe.build_parser().parse_args(argv))
    record = {
        "arm": arm,
        "seed": seed,
        "train_loss": summary["last_metrics"].get("loss"),
        "probe": {k: probe[k] for k in metrics},
        "probe_per_class": probe["per_class_accuracy"],
        "seconds": time.time() - t0,
    }
    return probe, record


def run_job(job, argv: list[str], out: Path) -> dict:
    """``job.main(argv)`` (a training job module writing into ``out``) with its stdout in
    ``out/job_stdout.txt``; returns the job's ``out/summary.json``."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "job_stdout.txt", "w") as log, contextlib.redirect_stdout(log):
        job.main(argv)
    return json.loads((out / "summary.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/downstream", help="working directory (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps-per-epoch", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--probe-train", type=int, default=20, help="balanced probe-train images per concept")
    parser.add_argument("--probe-test", type=int, default=50, help="balanced test images per concept")
    parser.add_argument(
        "--embed-pretrained",
        default=str(SHIPPED) if SHIPPED.is_file() else "none",
        help="the pipeline's embedding checkpoint ('none' = random weights; default: the shipped one if present)",
    )
    parser.add_argument(
        "--balance-yaml",
        type=Path,
        default=None,
        help="YAML mapping laid over the balance section of the *-rebalanced arms' run (e.g. relax: exact)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import ray
    import yaml

    balance_override = None
    if args.balance_yaml is not None:
        balance_override = yaml.safe_load(args.balance_yaml.read_text())
        if not isinstance(balance_override, dict):
            parser.error(f"--balance-yaml {args.balance_yaml}: not a YAML mapping")

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    t_start = time.time()
    data = out / "dataset"
    if not (data / "dataset.json").is_file():
        generate_dataset(data, n_rows=3000, n_shards=4, seed=0)
    pretrained = None if args.embed_pretrained == "none" else args.embed_pretrained
    runs = {
        "rebalanced": rebalance_run(data, out / "run", pretrained, balance=balance_override),
        "image-rebalanced": rebalance_run(data, out / "run-image", pretrained, ("image_cluster",)),
        "label-balanced": rebalance_run(data, out / "run-label", pretrained, ("label",)),
    }
    shares = label_weight_shares(runs["rebalanced"])
    counts = json.loads((data / "dataset.json").read_text())["counts"]
    balance = json.loads((runs["rebalanced"] / "balance.json").read_text())
    probe_train = write_balanced_set(out / "probe_train", args.probe_train, seed=1001)
    probe_test = write_balanced_set(out / "probe_test", args.probe_test, seed=1002)
    raw_share = np.array([counts[lab] / 3000 for lab in LABELS])
    weighted_share = np.array([shares[lab] for lab in LABELS])
    print(f"pipeline embedding model: {pretrained or 'random weights'}")
    print(
        f"rebalance run: converged {balance['converged']}, ESS {balance['ess_fraction']:.3f} of rows, "
        f"largest weight {balance['max_weight_value']:.2f}"
    )
    print("share of each concept in the sampled stream (raw -> rebalance weights; uniform = 0.0417):")
    for lab in sorted(LABELS, key=lambda name: -counts[name]):
        print(f"  {lab:16s} {counts[lab] / 3000:.4f} -> {shares[lab]:.4f}")
    print(
        "total variation distance of the concept distribution to uniform: "
        f"raw {0.5 * np.abs(raw_share - 1 / 24).sum():.3f}, "
        f"rebalance weights {0.5 * np.abs(weighted_share - 1 / 24).sum():.3f}, label-balanced 0.000"
    )

    results: dict = {
        "config": {k: v for k, v in vars(args).items()} | {"balance_yaml": balance_override},
        "weight_share_by_concept": shares,
        "raw_share_by_concept": {lab: counts[lab] / 3000 for lab in LABELS},
        "rebalance_run": {k: balance[k] for k in ("converged", "ess_fraction", "max_weight_value")}
        | {"tv_to_uniform_raw": float(0.5 * np.abs(raw_share - 1 / 24).sum())}
        | {"tv_to_uniform_weighted": float(0.5 * np.abs(weighted_share - 1 / 24).sum())},
        "runs": [],
    }
    # Resume: keep the finished (arm, seed) records of an earlier invocation with the same budget.
    budget_keys = (
        "epochs",
        "steps_per_epoch",
        "batch_size",
        "lr",
        "probe_train",
        "probe_test",
        "embed_pretrained",
        "balance_yaml",
    )
    previous = out / "results.json"
    if previous.is_file():
        old = json.loads(previous.read_text())
        if all(old["config"].get(k) == results["config"][k] for k in budget_keys):
            results["runs"] = old["runs"]
    for arm, seed in todo(results["runs"], [(a, s) for a in args.arms for s in args.seeds]):
        t0 = time.time()
        arm_out = out / "arms" / f"{arm}-seed{seed}"
        summary = train_arm(arm, seed, data, runs, arm_out, args, probe_test)
        probe, record = probe_arm(arm, seed, arm_out, summary, (probe_train, probe_test, data), METRICS, t0)
        if arm.startswith("sup-"):
            ev = json.loads((arm_out / "eval.json").read_text())
            record["classifier"] = {k: ev["raw"][k] for k in METRICS}
            record["classifier_posthoc"] = {k: ev["posthoc_adjusted"][k] for k in METRICS}
            record["classifier_per_class"] = ev["raw"]["per_class_accuracy"]
        results["runs"].append(record)
        print(
            f"{arm:20s} seed {seed}: probe bal.acc {probe['balanced_accuracy']:.4f} tail {probe['tail_accuracy']:.4f}"
            + (
                f" | classifier bal.acc {record['classifier']['balanced_accuracy']:.4f}"
                f" tail {record['classifier']['tail_accuracy']:.4f}"
                if "classifier" in record
                else ""
            )
            + f" ({record['seconds']:.0f} s)",
            flush=True,
        )
        atomic_write_json(results, out / "results.json")

    # every finished record counts, also those of earlier invocations with other --arms / --seeds
    arms = [a for a in ARMS if any(r["arm"] == a for r in results["runs"])]
    seeds = sorted({r["seed"] for r in results["runs"]})
    tables = {}
    for score in ("probe", "classifier", "classifier_posthoc"):
        table = {}
        for arm in arms:
            recs = [r for r in results["runs"] if r["arm"] == arm and score in r]
            if recs:
                table[arm] = {m: summarise([r[score][m] for r in recs]) for m in METRICS}
        tables[score] = table
    results["summary"] = tables
    paired = {}
    for score in ("probe", "classifier"):
        for arm in arms:
            base = "sup-plain" if arm.startswith("sup-") else "clip-plain"
            if arm == base or base not in arms:
                continue
            diffs = []
            for seed in seeds:
                a = [r for r in results["runs"] if r["arm"] == arm and r["seed"] == seed and score in r]
                b = [r for r in results["runs"] if r["arm"] == base and r["seed"] == seed and score in r]
                if a and b:
                    diffs.append(a[0][score]["balanced_accuracy"] - b[0][score]["balanced_accuracy"])
            if diffs:
                paired[f"{score}: {arm} - {base}"] = summarise(diffs)
    results["paired_balanced_accuracy_difference"] = paired
    results["seconds"] = time.time() - t_start
    atomic_write_json(results, out / "results.json")

    for score, table in tables.items():
        if not table:
            continue
        print(f"\n{score} (mean ± sample std over seeds {seeds}; balanced test set, 24 concepts)")
        print(f"  {'arm':20s} {'balanced acc':>16s} {'tail acc':>16s} {'class gap':>16s} {'class std':>16s}")
        for arm, row in table.items():
            cells = [f"{row[m]['mean']:.4f} ± {row[m]['std']:.4f}" for m in METRICS[:4]]
            print(f"  {arm:20s} " + " ".join(f"{c:>16s}" for c in cells))
    print("\npaired difference in balanced accuracy (same seed), mean ± std [min, max]:")
    for name, s in paired.items():
        print(f"  {name:45s} {s['mean']:+.4f} ± {s['std']:.4f} [{s['min']:+.4f}, {s['max']:+.4f}]")
    print(f"\nresults: {out / 'results.json'} ({results['seconds']:.0f} s)")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
