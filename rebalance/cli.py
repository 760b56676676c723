"""The ``rebalance`` command: run a spec, run the built-in demo, run up to one stage, rebuild a report."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path

import yaml

from rebalance.spec import SpecError

__all__ = ["main", "demo_spec"]

log = logging.getLogger("rebalance")


DEMO_CONCEPTS = ("none", "vocabulary", "prompts")


def demo_spec(dataset: str, concepts: str = "none") -> dict:
    """The spec of the built-in demo: the tiny open_clip model with the shipped weights trained on the
    built-in dataset, on CPU; image clusters balanced toward uniform. (Image x text clusters cannot both be
    uniform on this data: the head concept fills several image clusters and one text cluster per caption
    template while tail concepts share clusters, so IPF does not converge; docs/downstream.md.)

    ``concepts``: ``vocabulary`` balances on the ``concept`` marginal instead (MetaCLIP over the shipped
    vocabulary, matched against the captions, cap 50), ``prompts`` on the ``zero_shot`` marginal (the
    shipped prompts, uniform)."""
    if concepts not in DEMO_CONCEPTS:
        raise ValueError(f"concepts must be one of {DEMO_CONCEPTS}, got {concepts!r}")
    from rebalance.data.synthetic import PROMPTS_FILE, VOCABULARY_FILE

    spec = {
        "data": {"path": dataset, "carry": ["label", "source"]},
        "embed": {"model": "rebalance-tiny", "pretrained": "synthetic", "batch_size": 256},
        "cluster": {"image": {"k": 16}, "text": {"k": 16}, "niter": 20, "seed": 0},
        "balance": {"marginals": ["image_cluster"], "target": "uniform", "tol": 1.0e-6, "relax": "exact"},
        "report": {"spectra_by": ["image_cluster", "label"], "html": True, "truth": "label"},
        "ray": {"address": "local"},
    }
    if concepts == "vocabulary":
        spec["data"]["carry"].append("txt")
        spec["concepts"] = {"vocabulary": str(VOCABULARY_FILE), "field": "txt", "cap": 50}
        spec["balance"]["marginals"] = ["concept"]
    elif concepts == "prompts":
        spec["concepts"] = {"prompts": str(PROMPTS_FILE)}
        spec["balance"]["marginals"] = ["zero_shot"]
    return spec


def _print_summary(result) -> None:
    s = result.summary()
    print(f"run directory:          {s['run_dir']}")
    print(f"rows:                   {s['rows']} ({s['rejected_rows']} rejected)")
    print(f"clusters:               {', '.join(f'{side} {k}' for side, k in s['clusters'].items())}")
    print(f"effective sample size:  {s['ess']:.1f} ({100 * s['ess_fraction']:.1f}% of rows)")
    print(f"largest weight:         {s['max_weight']:.4f}")
    print(
        f"final marginal error:   {s['final_marginal_error']:.3e} ({'converged' if s['converged'] else 'NOT converged'})"
    )
    html = result.out / "report" / "report.html"
    if html.is_file():
        print(f"report:                 {html}")


def _cmd_run(args: argparse.Namespace, until: str = "report") -> int:
    from rebalance.api import run

    result = run(args.spec, args.out, until=until)
    if result is not None:
        _print_summary(result)
    else:
        print(f"stages up to {until} complete in {args.out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import numpy as np

    from rebalance.api import run
    from rebalance.data.atomic import atomic_write_bytes, atomic_write_json
    from rebalance.data.parts import read_parts
    from rebalance.data.synthetic import generate_dataset
    from rebalance.kernels.stats import normalized_mutual_info
    from rebalance.preflight import check_run_directory

    out = Path(args.out).resolve()
    own = ("dataset", "spec.yaml")
    check_run_directory(out, own)  # before writing the dataset there
    dataset = out / "dataset"
    summary = dataset / "dataset.json"
    wanted = {"rows": args.rows, "shards": args.shards, "seed": args.seed}
    if not summary.is_file() or {k: json.loads(summary.read_text()).get(k) for k in wanted} != wanted:
        info = generate_dataset(dataset, n_rows=args.rows, n_shards=args.shards, seed=args.seed)
        atomic_write_json({**info, "seed": args.seed}, summary)
        log.info("generated %d rows in %d shards at %s", info["rows"], info["shards"], dataset)
    spec = demo_spec(str(dataset), args.concepts)
    atomic_write_bytes(yaml.safe_dump(spec, sort_keys=False).encode(), out / "spec.yaml")
    result = run(spec, out, keep=own)
    _print_summary(result)
    # The built-in dataset knows its true concepts: how well do the clusters recover them?
    labels = read_parts(out / "embeddings", columns=["label"]).column("label").to_numpy(zero_copy_only=False)
    assignments = read_parts(out / "assignments")
    for side in ("image", "text"):
        nmi = normalized_mutual_info(assignments.column(f"{side}_cluster").to_numpy(), labels)
        print(f"{side} clusters vs concepts: NMI {nmi:.3f}")
    if args.concepts == "prompts":
        zero_shot = read_parts(out / "concepts", columns=["zero_shot"]).column("zero_shot").to_pylist()
        correct = np.mean([z == f"a photo of a {label}" for z, label in zip(zero_shot, labels, strict=True)])
        print(f"zero-shot labels:       {100 * correct:.1f}% name the true concept")
    if args.concepts != "none":
        weights = result.weights.column("weight").to_numpy()
        values, inverse = np.unique(labels, return_inverse=True)
        uniform = np.full(len(values), 1 / len(values))
        for name, w in (("raw", np.ones_like(weights)), ("weighted", weights)):
            share = np.bincount(inverse, weights=w, minlength=len(values)) / w.sum()
            print(f"concepts, {name}: total variation to uniform {0.5 * np.abs(share - uniform).sum():.3f}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from rebalance.api import rebuild_report

    _print_summary(rebuild_report(args.run_dir))
    return 0


def _add_service_commands(sub) -> None:
    """submit / status / logs / stop (Ray Jobs: rebalance.client) and serve (rebalance.serve)."""
    from rebalance.client import add_job_commands
    from rebalance.serve.cli import add_serve_command

    add_job_commands(sub)
    add_serve_command(sub)


_RUN_HELP = """Run the stages of SPEC (a YAML file, docs/spec.md) into run directory OUT. Stages already
complete for the same inputs and spec are skipped, and an interrupted run resumes from its committed parts
when the same command runs again. Everything that can be checked without work (the spec, the data path,
the model and its weights, k against the rows the inputs declare, OUT) is checked before Ray starts."""


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="YAML spec file (docs/spec.md)")
    p.add_argument(
        "--out", required=True, help="run directory: a local path or a pyarrow.fs URI (s3://bucket/run1)"
    )


def _parser() -> argparse.ArgumentParser:
    from rebalance import __version__

    parser = argparse.ArgumentParser(
        prog="rebalance",
        description=__doc__,
        epilog="Exit status: 0 done, 1 a failure while running, 2 a spec or input error, 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"rebalance {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and the summary")
    parser.add_argument(
        "--verbose", dest="show_traceback", action="store_true", help="print the traceback of an error"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("run", help="run every stage of SPEC into run directory OUT", description=_RUN_HELP)
    _add_run_arguments(p)
    p.set_defaults(func=_cmd_run)
    for stage in ("embed", "cluster", "concepts", "balance"):
        p = sub.add_parser(
            stage,
            help=f"run the stages up to and including {stage}",
            description=f"{_RUN_HELP}\n\nThis command stops after the {stage} stage; `rebalance run` "
            "with the same SPEC and OUT continues from there.",
        )
        _add_run_arguments(p)
        p.set_defaults(func=lambda a, s=stage: _cmd_run(a, until=s))
    p = sub.add_parser(
        "demo",
        help="generate the built-in long-tailed dataset and run everything on it",
        description="Generate the built-in long-tailed image-text dataset in OUT/dataset (kept while ROWS, "
        "SHARDS and SEED stay the same), write the demo spec to OUT/spec.yaml and run every stage on CPU with "
        "the shipped tiny model; prints the summary and how well the clusters recover the true concepts.",
    )
    p.add_argument("--out", default="runs/demo", help="run directory (the dataset goes in OUT/dataset)")
    p.add_argument("--rows", type=int, default=3000, help="rows of the generated dataset (default 3000)")
    p.add_argument("--shards", type=int, default=4, help="Parquet shards it is split into (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated dataset (default 0)")
    p.add_argument(
        "--concepts",
        choices=DEMO_CONCEPTS,
        default="none",
        help="balance on the shipped vocabulary (MetaCLIP) or zero-shot prompts instead of image clusters",
    )
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser(
        "report",
        help="rebuild report/ of a finished run directory",
        description="Recompute report/ (report.json, and report.html with report.html: true) of RUN_DIR "
        "from the run directory alone; the dataset need not be reachable.",
    )
    p.add_argument("run_dir", help="a run directory whose balance stage is complete")
    p.set_defaults(func=_cmd_report)
    _add_service_commands(sub)
    return parser


def _exit_code(err: BaseException) -> int:
    """2 for a spec or input error (the same command cannot succeed until the input changes), else 1."""
    from rebalance.data.input_format import LayoutError
    from rebalance.data.readers import DuplicateKeyError
    from rebalance.preflight import UsageError

    input_errors: tuple[type[BaseException], ...] = (
        SpecError,
        UsageError,
        DuplicateKeyError,
        LayoutError,
        FileNotFoundError,
        NotADirectoryError,
    )
    if type(err).__name__ in ("ClusterError", "MissingMassError"):  # not imported: they pull in faiss
        return 2
    return 2 if isinstance(err, input_errors) else 1


def main(argv: list[str] | None = None) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("rebalance").setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        with logging_redirect_tqdm():  # progress bars and log lines never share a line
            return args.func(args)
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        again = f"run the same command again to resume {out}" if out else "nothing to resume"
        print(f"rebalance: interrupted; committed work is kept: {again}", file=sys.stderr)
        return 130
    except Exception as err:
        cause = getattr(err, "cause", None)  # a Ray task error: the actor's own exception
        if isinstance(cause, BaseException):
            err = cause
        if args.show_traceback:
            traceback.print_exception(err, file=sys.stderr)
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"rebalance: error: {message}", file=sys.stderr)
        return _exit_code(err)


if __name__ == "__main__":
    sys.exit(main())
