"""The Python API: ``run(spec, out) -> Result`` and ``load_result(out)``.

``out`` (the run directory) and ``data.path`` may be local paths or URIs of any ``pyarrow.fs`` filesystem
(``s3://bucket/run1``, ``gs://...``): see :mod:`rebalance.data.fs` for the options and credentials.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from rebalance.data.fs import StoragePath, as_path, check_location
from rebalance.data.parts import read_parts
from rebalance.data.readers import dataset_fingerprint, list_shards, resolve_format
from rebalance.preflight import check_run
from rebalance.runtime.manifest import STAGES, RunDir, check_run_dir, fingerprint, package_versions
from rebalance.runtime.session import ray_session
from rebalance.spec import Spec, SpecError

__all__ = ["Result", "run", "load_result", "rebuild_report", "stage_fingerprints", "as_spec"]

log = logging.getLogger(__name__)


@dataclass
class Result:
    """A finished run: its directory (a ``Path``, or a ``StoragePath`` for a URI), manifest and report;
    per-row weights are read on first access."""

    out: Path | StoragePath
    manifest: dict[str, Any]
    report: dict[str, Any]

    @functools.cached_property
    def weights(self) -> pa.Table:
        """``key``, ``weight`` and the marginal columns of every row, in part order."""
        return read_parts(self.out / "weights")

    @property
    def paths(self) -> dict[str, Path | StoragePath]:
        names = (
            "manifest.json",
            "embeddings",
            "clusters",
            "assignments",
            "concepts",
            "weights",
            "balance.json",
            "report",
        )
        return {name.split(".")[0]: self.out / name for name in names}

    def summary(self) -> dict[str, Any]:
        """The headline numbers: rows, clusters, ESS, largest weight, final marginal error."""
        b = self.report["balance"]
        return {
            "run_dir": str(self.out),
            "rows": self.report["rows"],
            "rejected_rows": self.report["rejected_rows"],
            "clusters": {side: c["k"] for side, c in self.report["clusters"].items()},
            "ess": round(b["ess"], 3),
            "ess_fraction": round(b["ess_fraction"], 4),
            "max_weight": round(b["max_weight"], 6),
            "final_marginal_error": b["final_marginal_error"],
            "converged": b["converged"],
        }


def as_spec(spec: Spec | dict | str | os.PathLike) -> Spec:
    """A :class:`Spec` from a spec, a mapping or a YAML path."""
    if isinstance(spec, Spec):
        return spec
    if isinstance(spec, dict):
        return Spec.from_dict(spec)
    return Spec.from_yaml(spec)


# Version of the per-row directories' layout, in the fingerprints: a run directory of an older layout
# (layout 1: part summaries named part-NNNNN.json) is recomputed, never read as if it were complete.
PART_LAYOUT = 2


def stage_fingerprints(spec: Spec, inputs: list[dict]) -> dict[str, str]:
    """Chained fingerprints: each stage hashes its own spec section and the previous stage's fingerprint
    (the cluster stage also ``dedup``, when set).
    ``embed.workers``, ``embed.prefetch``, ``embed.cpus_per_gpu`` and the ``ray`` section change where and
    when work runs, not its result, and are left out. The concepts stage also hashes the contents of its
    vocabulary and prompt files, so an edited file reruns it and what follows."""
    from rebalance.stages.concept_labels import file_digests

    s = spec.to_dict()
    embed = {k: v for k, v in s["embed"].items() if k not in ("workers", "prefetch", "cpus_per_gpu")}
    fps = {"embed": fingerprint("embed", s["data"], embed, inputs, PART_LAYOUT)}
    # the dedup section (near-duplicate groups, written with the assignments) joins the cluster stage's
    # fingerprint only when set, so runs without it keep their fingerprints
    cluster = (s["cluster"],) if spec.dedup is None else (s["cluster"], {"dedup": s["dedup"]})
    fps["cluster"] = fingerprint("cluster", fps["embed"], *cluster)
    fps["concepts"] = fingerprint("concepts", fps["cluster"], s["concepts"], file_digests(spec))
    fps["balance"] = fingerprint("balance", fps["concepts"], s["balance"])
    fps["report"] = fingerprint("report", fps["balance"], s["report"])
    return fps


def _stage_functions() -> dict[str, Callable]:
    from rebalance.stages.balance import run_balance
    from rebalance.stages.cluster import run_cluster
    from rebalance.stages.concept_labels import run_concepts
    from rebalance.stages.embed import run_embed
    from rebalance.stages.report import run_report

    return {
        "embed": run_embed,
        "cluster": run_cluster,
        "concepts": run_concepts,
        "balance": run_balance,
        "report": run_report,
    }


def run(
    spec: Spec | dict | str | os.PathLike,
    out: str | os.PathLike,
    *,
    until: str = "report",
    keep: tuple[str, ...] = (),
) -> Result | None:
    """Run the pipeline for ``spec`` into run directory ``out``, up to and including stage ``until``.

    Stages already complete with the same fingerprint are skipped (a complete run does no work and writes
    nothing); a stage interrupted earlier resumes from its committed parts. Returns the :class:`Result`
    when the report stage is complete, else None. ``out`` must be new, empty or a run directory (with
    ``manifest.json``), else RuntimeError before anything is written; ``keep`` names entries the caller put
    in a new ``out`` itself (never touched by the run).
    """
    from rebalance.stages.context import StageContext

    if until not in STAGES:
        raise ValueError(f"until must be one of {STAGES}, got {until!r}")
    spec = as_spec(spec)
    check_location(out, "run directory")
    check_run_dir(out, keep)  # first: a directory of something else is refused before anything else
    run_dir = RunDir(out)
    shards = list_shards(spec.data)
    inputs = dataset_fingerprint(shards)
    fmt, image_column, text_column = resolve_format(spec.data, shards)
    if spec.cluster.joint is not None and (image_column is None or text_column is None):
        raise SpecError(
            "cluster.joint", f"needs an image and a text side; the {fmt} dataset at {spec.data.path} has one"
        )
    fps = stage_fingerprints(spec, inputs)
    wanted = STAGES[: STAGES.index(until) + 1]
    todo = [s for s in wanted if not run_dir.is_complete(s, fps[s])]
    if todo:
        first = STAGES.index(todo[0])
        sides = [side for side, c in (("image", image_column), ("text", text_column)) if c is not None]
        prompts = spec.concepts is not None and spec.concepts.prompts is not None
        check_run(
            spec, out, shards, sides, embed=first == 0, keep=keep, cluster="cluster" in wanted[first:],
            model=fmt != "embeddings" or prompts,
        )  # fmt: skip
        for stage in wanted[:first]:
            log.info("stage %s: skipped (complete)", stage)
        header = {"spec": spec.to_dict(), "versions": package_versions(), "inputs": inputs}
        functions = _stage_functions()
        with ray_session(spec.ray) as resources:
            ctx = StageContext(spec, run_dir, shards, fmt, image_column, text_column, resources)
            for stage in wanted[first:]:
                log.info("stage %s: start", stage)
                run_dir.begin(stage, fps[stage], **header)
                try:
                    info = functions[stage](ctx)
                except BaseException as err:
                    run_dir.fail(stage, f"{type(err).__name__}: {err}")
                    raise
                run_dir.complete(stage, info)
                log.info("stage %s: done %s", stage, info)
    else:
        log.info("all stages up to %s are complete in %s: nothing to do", until, out)
    return load_result(out) if until == "report" else None


def load_result(out: str | os.PathLike) -> Result:
    """The :class:`Result` of a finished run directory (a local path or a URI)."""
    out = as_path(out)
    check_location(out, "run directory")
    run_dir = RunDir(out)
    if not run_dir.manifest_path.is_file():
        raise FileNotFoundError(f"{out} is not a run directory (no manifest.json)")
    incomplete = [s for s in STAGES if run_dir.stage(s).get("status") != "complete"]
    if incomplete:
        raise RuntimeError(f"run {out} is not finished: stages {incomplete} are not complete")
    report = json.loads(run_dir.path("report", "report.json").read_text())
    return Result(out=out, manifest=run_dir.manifest, report=report)


def rebuild_report(out: str | os.PathLike) -> Result:
    """Recompute ``report/`` of a run whose balance stage is complete, from the run directory alone (the
    dataset need not be reachable any more); the report stage's manifest record is replaced."""
    from rebalance.data.readers import Shard
    from rebalance.stages.context import StageContext
    from rebalance.stages.report import run_report

    check_location(out, "run directory")
    run_dir = RunDir(out)
    if not run_dir.manifest_path.is_file():
        raise FileNotFoundError(f"{out} is not a run directory (no manifest.json)")
    missing = [s for s in STAGES[:-1] if run_dir.stage(s).get("status") != "complete"]
    if missing:
        raise RuntimeError(f"cannot build the report of {out}: stages {missing} are not complete")
    raw = run_dir.manifest["spec"]
    try:
        spec = Spec.from_dict(raw)
    except SpecError as err:  # the dataset may be gone: the report only reads the run directory
        if err.field_path != "data.path":
            raise
        spec = Spec.from_dict({**raw, "data": {**raw["data"], "path": str(run_dir.root)}})
    embed = run_dir.stage("embed")
    shards = [Shard(i, "") for i in range(embed["shards"])]
    report_fingerprint = fingerprint(
        "report", run_dir.stage("balance")["fingerprint"], spec.to_dict()["report"]
    )
    with ray_session(spec.ray) as resources:
        sides = embed["sides"]
        columns = ["image" if "image" in sides else None, "text" if "text" in sides else None]
        ctx = StageContext(spec, run_dir, shards, embed["format"], *columns, resources)
        run_dir.begin("report", report_fingerprint)
        run_dir.complete("report", run_report(ctx))
    return load_result(out)
