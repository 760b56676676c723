"""Concepts stage (run directory ``concepts/``): vocabulary (MetaCLIP) matches and zero-shot labels of
every row, per part on the actors. (The report's concept cards are :mod:`rebalance.stages.concepts`.)

1. The driver reads the vocabulary and prompt files (``concepts.vocabulary``, ``concepts.prompts``), builds
   the Aho-Corasick automaton once and embeds the prompts with the run's text tower (``embed.model``).
2. The pool writes ``concepts/part-NNNNN.parquet`` for every ``embeddings/`` part, rows in the same order:
   ``key``; with a vocabulary ``concept_entries`` (list<int32>, the sorted distinct entry ids the row's
   ``concepts.field`` matches); with prompts ``zero_shot`` (the nearest prompt, or ``<none>`` below
   ``concepts.threshold``) and ``zero_shot_similarity`` (float32 cosine). Each part's summary holds its
   entry counts and rows per prompt.
3. The driver sums the counts into ``concepts/entries.parquet`` (``entry``, ``count``, ``probability`` =
   min(1, cap / count)); with ``unmatched: entry`` its last row is the pseudo-entry ``<none>`` of the rows
   that match nothing. ``concepts/concepts.json`` records the settings, how many rows matched and the most
   frequent entries.

The balance stage turns a row's entries into its keep probability (:func:`concept_keep`) and its
``concept`` label (that probability, as a string).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from rebalance.data.atomic import atomic_write_json, atomic_write_table
from rebalance.data.fs import as_path, join, read_table
from rebalance.data.parts import part_summary, read_part, write_part
from rebalance.data.readers import vector_matrix
from rebalance.kernels.concepts import build_matcher, keep_probabilities, match_captions
from rebalance.kernels.concepts import zero_shot_labels as nearest_prompts
from rebalance.runtime.pool import ActorPool, ShardWorker
from rebalance.spec import ConceptsSpec, Spec, read_entries
from rebalance.stages.context import StageContext

__all__ = ["NONE_LABEL", "concept_keep", "concept_label", "file_digests", "run_concepts"]

log = logging.getLogger(__name__)

NONE_LABEL = "<none>"
TOP_ENTRIES = 50  # most frequent entries listed in concepts.json


def file_digests(spec: Spec) -> dict[str, str]:
    """SHA-256 of the vocabulary and prompt files, for the stage fingerprint (an edited file reruns it)."""
    concepts = spec.concepts
    if concepts is None:
        return {}
    files = {"vocabulary": concepts.vocabulary, "prompts": concepts.prompts}
    return {k: hashlib.sha256(Path(p).read_bytes()).hexdigest() for k, p in files.items() if p is not None}


def _embed_prompts(spec: Spec, prompts: list[str]) -> np.ndarray:
    """(P, d) text-tower embeddings of the prompts under ``embed.model`` / ``embed.pretrained`` (CPU)."""
    from rebalance.models import load_model

    model = load_model(spec.embed.model, spec.embed.pretrained, "cpu", spec.embed.seed)
    return model.encode_texts(prompts).astype(np.float64)


def label_part(run_root: str, index: int, what: tuple) -> dict[str, Any]:
    """Write ``concepts/part-<index>`` from ``embeddings/part-<index>``; ``what``: (the concepts spec, the
    automaton or None, the prompts or None, their (P, d) embeddings or None). Returns the part's summary
    (``entries``, ``counts``: its sparse entry counts; ``unmatched``; ``zero_shot``: rows per prompt, then
    ``<none>``). Idempotent."""
    concepts, automaton, prompts, prompt_vectors = what
    out_dir = join(run_root, "concepts")
    done = part_summary(out_dir, index)
    if done is not None:
        return done
    columns = ["key"]
    if automaton is not None:
        columns.append(concepts.field)
    if prompts is not None:
        columns.append("image")
    table = read_part(join(run_root, "embeddings"), index, columns=columns)
    out: dict[str, Any] = {"key": table.column("key")}
    summary: dict[str, Any] = {"entries": [], "counts": []}
    if automaton is not None:
        texts = [None if v is None else str(v) for v in table.column(concepts.field).to_pylist()]
        matches = match_captions(texts, automaton, concepts.case_fold)
        out["concept_entries"] = pa.array(matches, pa.list_(pa.int32()))
        ids, counts = np.unique(np.asarray([i for m in matches for i in m], np.int64), return_counts=True)
        summary = {
            "entries": ids.tolist(),
            "counts": counts.tolist(),
            "unmatched": sum(not m for m in matches),
        }
    if prompts is not None:
        labels, sim = nearest_prompts(
            vector_matrix(table.column("image").combine_chunks()), prompt_vectors, concepts.threshold
        )
        names = np.asarray([*prompts, NONE_LABEL], dtype=object)
        out["zero_shot"] = pa.array(names[labels].tolist(), pa.string())
        out["zero_shot_similarity"] = pa.array(sim, pa.float32())
        none = len(prompts)  # label -1: <none>, the last name
        summary["zero_shot"] = np.bincount(np.where(labels < 0, none, labels), minlength=none + 1).tolist()
    write_part(out_dir, index, pa.table(out), summary)
    return {"rows": table.num_rows, **summary}


def run_concepts(ctx: StageContext) -> dict[str, Any]:
    """Label every part; returns the stage summary. Without a ``concepts`` section only
    ``concepts/concepts.json`` is written (``{"enabled": false}``)."""
    concepts: ConceptsSpec | None = ctx.spec.concepts
    out_dir = ctx.run.path("concepts")
    out_dir.mkdir(parents=True, exist_ok=True)
    if concepts is None:
        atomic_write_json({"enabled": False}, out_dir / "concepts.json")
        return {"enabled": False}
    vocabulary = automaton = prompts = prompt_vectors = None
    if concepts.vocabulary is not None:
        vocabulary = read_entries(concepts.vocabulary, "concepts.vocabulary")
        automaton = build_matcher(vocabulary, concepts.case_fold)
    if concepts.prompts is not None:
        if "image" not in ctx.sides:
            raise RuntimeError("concepts.prompts labels images, but the dataset has no image side")
        prompts = read_entries(concepts.prompts, "concepts.prompts")
        prompt_vectors = _embed_prompts(ctx.spec, prompts)
    root = str(ctx.run.root)
    indices = [s.index for s in ctx.shards]
    what = ray.put((concepts, automaton, prompts, prompt_vectors))
    # the parts' summaries are folded as they come: the driver holds one count per entry and prompt
    rows = unmatched = 0
    counts = np.zeros(len(vocabulary) if vocabulary is not None else 0, np.int64)
    totals = np.zeros(len(prompts) + 1 if prompts is not None else 0, np.int64)
    with ActorPool(ShardWorker, ctx.workers(len(indices))) as pool:
        for s in pool.imap("call", [(label_part, root, i, what) for i in indices], "concepts"):
            rows += s["rows"]
            if vocabulary is not None:
                np.add.at(counts, np.asarray(s["entries"], np.int64), np.asarray(s["counts"], np.int64))
                unmatched += s["unmatched"]
            if prompts is not None:
                totals += np.asarray(s["zero_shot"], np.int64)
    record: dict[str, Any] = {"enabled": True, **dataclasses.asdict(concepts), "rows": rows}
    info: dict[str, Any] = {"enabled": True, "rows": rows}
    if vocabulary is not None:
        names = list(vocabulary)
        if concepts.unmatched == "entry":
            names.append(NONE_LABEL)
            counts = np.append(counts, unmatched)
        probability = concepts.cap / np.maximum(counts.astype(np.float64), concepts.cap)
        atomic_write_table(
            pa.table({"entry": names, "count": counts, "probability": probability}),
            out_dir / "entries.parquet",
        )
        order = np.argsort(-counts[: len(vocabulary)], kind="stable")[:TOP_ENTRIES]
        record.update(
            entries=len(vocabulary),
            entries_matched=int((counts[: len(vocabulary)] > 0).sum()),
            rows_matched=rows - unmatched,
            rows_unmatched=unmatched,
            top_entries=[{"entry": vocabulary[i], "count": int(counts[i])} for i in order if counts[i] > 0],
        )
        info.update(entries_matched=record["entries_matched"], rows_unmatched=unmatched)
        if unmatched == rows:
            log.warning(
                "concepts.vocabulary %s matches no value of column %r in any of the %d rows; "
                "concepts.unmatched: %s %s",
                concepts.vocabulary,
                concepts.field,
                rows,
                concepts.unmatched,
                "(every row is <none>: the concept marginal is uniform)"
                if concepts.unmatched == "entry"
                else "(every row gets probability 0: balancing on concept will fail)",
            )
            record["warning"] = "the vocabulary matches no row"
    if prompts is not None:
        per_prompt = dict(zip([*prompts, NONE_LABEL], totals.tolist(), strict=True))
        record["zero_shot_counts"] = per_prompt
        info["zero_shot_none"] = per_prompt[NONE_LABEL]
    atomic_write_json(record, out_dir / "concepts.json")
    return info


def concept_keep(run_root: str, index: int) -> np.ndarray:
    """Keep probabilities (n,) of part ``index``'s rows: 1 - prod over the row's entries (the pseudo-entry
    ``<none>`` for a row matching nothing, with ``unmatched: entry``) of (1 - min(1, cap / count_e))."""
    settings = json.loads(as_path(join(run_root, "concepts", "concepts.json")).read_text())
    counts = read_table(join(run_root, "concepts", "entries.parquet"), columns=["count"]).column("count")
    counts = counts.to_numpy()
    matches = read_part(join(run_root, "concepts"), index, columns=["concept_entries"])
    rows = matches.column("concept_entries").to_pylist()
    if settings["unmatched"] == "entry":
        none = len(counts) - 1
        rows = [r if r else [none] for r in rows]
    return keep_probabilities(rows, counts, settings["cap"])


def concept_label(keep: np.ndarray) -> pa.Array:
    """The ``concept`` marginal's labels: each row's keep probability as a string (``repr`` of the float,
    so ``float(label)`` gives it back exactly)."""
    return pa.array([repr(float(p)) for p in keep], pa.string())
