"""Concept cards of the report: who is in each concept, and how balancing reweighted it.

A *concept* is one value of a concept column: a cluster of each side (``image_cluster``, ``text_cluster``,
``joint_cluster`` with ``cluster.joint``) and of each coarser level (``image_cluster_L``), each value of a
carried column with at most :data:`MAX_CARRIED_VALUES` distinct values, and the concepts that are not
clusters: each prompt of ``zero_shot`` (``concepts.prompts``), each vocabulary entry of ``concept``
(``concepts.vocabulary``; a row matching several entries belongs to each) and each near-duplicate group of
``dup_group`` (``dedup``; only the :data:`CARDS_PER_COLUMN` largest groups of two or more rows). Two
streamed passes over the run directory (parts in a pool):

1. per part and concept: rows, summed weight, summed embedding, the rows of smallest key priority (a
   seeded random sample, :func:`~rebalance.kernels.sampling.key_priorities`), the rows nearest the
   centroid for level-0 clusters (``assignments`` distances), the contingency against ``report.truth``;
   and over all rows a bounded random sample for the embedding map and weight percentiles, and the rows
   of the largest weights;
   for vocabulary entries only rows and summed weight (a vocabulary has up to millions of entries), for
   near-duplicate groups the part's largest groups (the global :data:`CARDS_PER_COLUMN` largest are among
   every part's, since a group's size is global) with their sums and sampled rows;
2. for the other concepts (levels, carried values, prompts): the rows nearest the concept's mean
   embedding; for the vocabulary entries that get a card: their seeded random rows.

The driver folds each pass's part results as they come (:func:`_fold`), so it holds one merged result.

The chosen rows are then read back from the input shards by key (:mod:`rebalance.data.thumbnails`):
``report.thumbnails`` thumbnails per shown concept and up to :data:`CAPTIONS_PER_CONCEPT` captions for its
words. Everything the page holds is bounded: :data:`CARDS_PER_COLUMN` cards per column, :data:`MAP_POINTS`
map points, :data:`LARGEST_WEIGHTS` heaviest rows.
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rebalance.data import fs
from rebalance.data.fs import join, read_table
from rebalance.data.parts import list_parts, read_part
from rebalance.data.readers import list_shards, resolve_format
from rebalance.data.thumbnails import THUMBNAIL_PIXELS, read_rows_by_key
from rebalance.kernels.kmeans import joint_vectors
from rebalance.kernels.sampling import key_priorities
from rebalance.report.cards import (
    caption_words,
    group_sums,
    pca_2d,
    purity,
    smallest_per_group,
    weight_percentiles,
)
from rebalance.runtime.pool import ActorPool, ShardWorker
from rebalance.spec import DUP_GROUP, SpecError
from rebalance.stages.context import StageContext

__all__ = [
    "CAPTIONS_PER_CONCEPT",
    "CARDS_PER_COLUMN",
    "LARGEST_WEIGHTS",
    "MAP_POINTS",
    "MAX_CARRIED_VALUES",
    "WEIGHT_SAMPLE",
    "compute_concepts",
]

log = logging.getLogger(__name__)

CARDS_PER_COLUMN = 48  # cards with thumbnails per concept column (the most up- and down-weighted beyond)
CAPTIONS_PER_CONCEPT = 24  # random captions per concept whose words are counted
MAP_POINTS = 1000  # rows of the embedding map (a seeded random sample)
LARGEST_WEIGHTS = 12  # heaviest rows shown as images
WEIGHT_SAMPLE = 100_000  # rows of the weight percentiles (exact below this many rows)
MAX_CARRIED_VALUES = 1000  # a carried column with more distinct values (a caption, a URL) is no concept


def _carried_vocab(run_root: str, column: str) -> list[str] | None:
    """Sorted distinct values (as strings, null as ``<missing>``) of a carried column in the embeddings
    parts, or None when it has more than MAX_CARRIED_VALUES or is not a scalar column."""
    values: set[str] = set()
    for path in list_parts(join(run_root, "embeddings")):
        column_values = read_table(path, columns=[column]).column(column)
        if pa.types.is_nested(column_values.type) or pa.types.is_binary(column_values.type):
            return None
        values.update(pc.unique(pc.fill_null(pc.cast(column_values, pa.string()), "<missing>")).to_pylist())
        if len(values) > MAX_CARRIED_VALUES:
            return None
    return sorted(values)


def _plan(ctx: StageContext) -> tuple[list[dict[str, Any]], list[str] | None, list[str], list[str]]:
    """(concept columns, the truth column's vocabulary or None, carried columns left out, the vocabulary's
    entry names (empty without one)). A column's ``kind``: ``cluster`` (labels in ``assignments``),
    ``carried`` (``embeddings``), ``zero_shot`` (``concepts``), ``concept`` (the entries each row matches,
    ``concepts``) or ``dup_group`` (``assignments``)."""
    clusters = json.loads(ctx.run.path("clusters", "clusters.json").read_text())
    plan: list[dict[str, Any]] = []

    def add(column: str, kind: str, side: str, level: int | None, groups: int, vocab=None, **extra) -> None:
        plan.append({"column": column, "kind": kind, "side": side, "level": level, "groups": groups,
                     "vocab": vocab, **extra})  # fmt: skip

    for side in [*ctx.sides, *(["joint"] if "joint" in clusters else [])]:
        info = clusters[side]
        add(f"{side}_cluster", "cluster", side, 0, info["k"])
        for level in info.get("levels", []):
            add(f"{side}_cluster_{level['level']}", "cluster", side, level["level"], level["k"])
    skipped = []
    root = str(ctx.run.root)
    vocabs = {c: _carried_vocab(root, c) for c in ctx.spec.data.carry}
    for column, vocab in vocabs.items():
        if vocab is None:
            skipped.append(column)
        else:
            add(column, "carried", ctx.sides[0], None, len(vocab), vocab)
    entries: list[str] = []
    settings_file = ctx.run.path("concepts", "concepts.json")
    settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
    if settings.get("zero_shot_counts"):  # the prompts and <none>, in concepts.json's (sorted) order
        prompts = list(settings["zero_shot_counts"])
        add("zero_shot", "zero_shot", "image", None, len(prompts), prompts)
    if settings.get("vocabulary") is not None:
        entries = read_table(ctx.run.path("concepts", "entries.parquet"), columns=["entry"])
        entries = entries.column("entry").to_pylist()
        none = len(entries) - 1 if settings["unmatched"] == "entry" else None
        add("concept", "concept", ctx.sides[0], None, len(entries), none_entry=none)
    if ctx.run.path("clusters", "dedup.json").is_file():
        add(DUP_GROUP, DUP_GROUP, ctx.sides[0], None, CARDS_PER_COLUMN)
    truth = ctx.spec.report.truth
    return plan, (vocabs.get(truth) if truth else None), skipped, entries


def _codes(table: pa.Table, column: str, vocab: list[str]) -> np.ndarray:
    values = pc.fill_null(pc.cast(table.column(column), pa.string()), "<missing>")
    codes = pc.index_in(values, value_set=pa.array(vocab, pa.string())).to_numpy(zero_copy_only=False)
    return np.where(np.isnan(codes.astype(float)), -1, codes).astype(np.int64)


def _matrix(table: pa.Table, side: str) -> np.ndarray:
    vectors = table.column(side).combine_chunks()
    if len(vectors) == 0:
        return np.zeros((0, vectors.type.list_size), np.float32)
    return vectors.flatten().to_numpy().reshape(len(vectors), vectors.type.list_size)


def _entry_pairs(table: pa.Table, none_entry: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(row, entry) pairs of a concepts part's ``concept_entries``; a row matching nothing pairs with
    ``none_entry`` (the ``<none>`` pseudo-entry) when there is one."""
    lists = table.column("concept_entries").combine_chunks()
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
    rows = np.repeat(np.arange(len(lists)), lengths)
    entries = pc.list_flatten(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    if none_entry is not None:
        empty = np.flatnonzero(lengths == 0)
        rows, entries = (
            np.concatenate([rows, empty]),
            np.concatenate([entries, np.full(empty.size, none_entry)]),
        )
    return rows, entries


def _read(run_root: str, index: int, plan: list[dict], truth: str | None, truth_vocab: list[str] | None):
    emb = read_part(join(run_root, "embeddings"), index)
    assignments = read_part(join(run_root, "assignments"), index)
    weights = read_part(join(run_root, "weights"), index, columns=["weight"]).column("weight").to_numpy()
    kinds = {item["kind"] for item in plan}
    labels = read_part(join(run_root, "concepts"), index) if kinds & {"zero_shot", "concept"} else None
    codes = {}
    for item in plan:
        column, kind = item["column"], item["kind"]
        if kind == "cluster":
            codes[column] = assignments.column(column).to_numpy().astype(np.int64)
        elif kind == "carried":
            codes[column] = _codes(emb, column, item["vocab"])
        elif kind == "zero_shot":
            codes[column] = _codes(labels, column, item["vocab"])
        elif kind == "concept":  # several entries per row: the (row, entry) pairs
            codes[column] = _entry_pairs(labels, item["none_entry"])
        else:  # dup_group: the group key and its size
            codes[column] = assignments.select([DUP_GROUP, "dup_size"])
    truth_codes = _codes(emb, truth, truth_vocab) if truth_vocab is not None else None
    sides = {item["side"] for item in plan}
    vectors = {side: _matrix(emb, side) for side in sides - {"joint"}}
    if "joint" in sides:  # joint_cluster: k-means on [image, text] / sqrt(2)
        vectors["joint"] = joint_vectors(_matrix(emb, "image"), _matrix(emb, "text"))
    return emb, assignments, weights, codes, truth_codes, vectors


def _picks(score: np.ndarray, groups: np.ndarray, n_groups: int, k: int, keys: list[str], part: int) -> dict:
    idx = smallest_per_group(score, groups, n_groups, k)
    return {
        "score": score[idx],
        "group": groups[idx],
        "key": [keys[i] for i in idx],
        "part": np.full(idx.size, part, np.int64),
    }


def _concat_picks(picks: list[dict], n_groups: int, k: int) -> dict:
    score = np.concatenate([p["score"] for p in picks])
    group = np.concatenate([p["group"] for p in picks])
    keys = [k_ for p in picks for k_ in p["key"]]
    part = np.concatenate([p["part"] for p in picks])
    idx = smallest_per_group(score, group, n_groups, k)
    return {"score": score[idx], "group": group[idx], "key": [keys[i] for i in idx], "part": part[idx]}


def _largest_groups(
    groups: pa.Table, weights: np.ndarray, priority: np.ndarray, keys: list[str], part: int, k: int
) -> dict[str, Any]:
    """The part's CARDS_PER_COLUMN largest near-duplicate groups of two or more rows (by global size, then
    group key): ``group`` keys, ``size``, the part's ``rows`` and summed ``weight`` of each, and ``random``:
    up to max(k, CAPTIONS_PER_CONCEPT) rows of each by key priority (``group`` as an index into them)."""
    size = groups.column("dup_size").to_numpy()
    dup = np.flatnonzero(size > 1)
    key_of = np.asarray(groups.column(DUP_GROUP).to_pylist(), dtype=object)[dup]
    names, local = np.unique(key_of.astype(str), return_inverse=True) if dup.size else (np.array([]), dup)
    group_size = np.zeros(names.size, np.int64)
    group_size[local] = size[dup]
    chosen = np.lexsort((names, -group_size))[:CARDS_PER_COLUMN]
    index = np.full(names.size, -1, np.int64)
    index[chosen] = np.arange(chosen.size)
    g = np.full(len(keys), -1, np.int64)
    g[dup] = index[local]
    ok = g >= 0
    return {
        "group": names[chosen].tolist(),
        "size": group_size[chosen],
        "rows": np.bincount(g[ok], minlength=chosen.size),
        "weight": np.bincount(g[ok], weights=weights[ok], minlength=chosen.size),
        "random": _picks(priority, g, chosen.size, max(k, CAPTIONS_PER_CONCEPT), keys, part),
    }


def concepts_part(
    run_root: str,
    index: int,
    plan: list[dict],
    truth: str | None,
    truth_vocab: list[str] | None,
    seed: int,
    k: int,
) -> dict:
    """Pass 1 over part ``index``: per concept column its per-group sums and sampled / central rows;
    over all rows the map sample, the weight sample and the heaviest rows."""
    emb, assignments, weights, codes, truth_codes, vectors = _read(run_root, index, plan, truth, truth_vocab)
    keys = emb.column("key").to_pylist()
    priority = key_priorities(keys, seed)
    out: dict[str, Any] = {"columns": {}}
    for item in plan:
        column, groups, n = item["column"], codes[item["column"]], item["groups"]
        if item["kind"] == "concept":
            rows, entries = groups
            out["columns"][column] = {
                "rows": np.bincount(entries, minlength=n),
                "weight": np.bincount(entries, weights=weights[rows], minlength=n),
            }
            continue
        if item["kind"] == DUP_GROUP:
            out["columns"][column] = _largest_groups(groups, weights, priority, keys, index, k)
            continue
        ok = groups >= 0
        entry = {
            "rows": np.bincount(groups[ok], minlength=n),
            "weight": np.bincount(groups[ok], weights=weights[ok], minlength=n),
            "sum": group_sums(vectors[item["side"]][ok], groups[ok], n),
            "random": _picks(priority, groups, n, max(k, CAPTIONS_PER_CONCEPT), keys, index),
        }
        if item["level"] == 0:
            distance = assignments.column(f"{item['side']}_distance").to_numpy().astype(np.float64)
            entry["central"] = _picks(distance, groups, n, k, keys, index)
        if truth_codes is not None:
            both = ok & (truth_codes >= 0)
            flat = groups[both] * len(truth_vocab) + truth_codes[both]
            entry["truth"] = np.bincount(flat, minlength=n * len(truth_vocab)).reshape(n, len(truth_vocab))
        out["columns"][column] = entry
    zeros = np.zeros(len(keys), np.int64)
    sample = smallest_per_group(priority, zeros, 1, MAP_POINTS)
    side = plan[0]["side"]
    codes = {c: g for c, g in codes.items() if isinstance(g, np.ndarray)}  # single-label columns
    out["map"] = {
        "priority": priority[sample],
        "key": [keys[i] for i in sample],
        "weight": weights[sample],
        "x": vectors[side][sample],
        "codes": {c: g[sample] for c, g in codes.items()},
        "part": np.full(sample.size, index, np.int64),
    }
    wsample = smallest_per_group(priority, zeros, 1, WEIGHT_SAMPLE)
    out["weights"] = {"priority": priority[wsample], "weight": weights[wsample]}
    heavy = smallest_per_group(-weights, zeros, 1, LARGEST_WEIGHTS)
    out["largest"] = {
        "score": -weights[heavy],
        "key": [keys[i] for i in heavy],
        "weight": weights[heavy],
        "codes": {c: g[heavy] for c, g in codes.items()},
        "part": np.full(heavy.size, index, np.int64),
    }
    return out


def central_part(
    run_root: str,
    index: int,
    plan: list[dict],
    means: dict[str, np.ndarray],
    k: int,
    shown_entries: np.ndarray | None = None,
    seed: int = 0,
) -> dict:
    """Pass 2 over part ``index``: for each column of ``means``, the ``k`` rows of each group nearest the
    group's mean embedding (squared L2); with ``shown_entries`` (vocabulary entry ids), ``concept``: the
    rows of each of those entries of smallest key priority (``group``: the position in ``shown_entries``)."""
    emb, _, _, codes, _, vectors = _read(run_root, index, plan, None, None)
    keys = emb.column("key").to_pylist()
    out = {}
    if shown_entries is not None:
        rows, entries = codes["concept"]
        position = np.searchsorted(shown_entries, entries)
        hit = (position < shown_entries.size) & (shown_entries[np.minimum(position, shown_entries.size - 1)]
                                                 == entries)  # fmt: skip
        priority = key_priorities(keys, seed)[rows[hit]]
        pair_keys = [keys[i] for i in rows[hit]]
        n = max(k, CAPTIONS_PER_CONCEPT)
        out["concept"] = _picks(priority, position[hit], shown_entries.size, n, pair_keys, index)
    for item in plan:
        column = item["column"]
        if column not in means:
            continue
        groups = codes[column]
        x = vectors[item["side"]]
        safe = np.where(groups >= 0, groups, 0)
        distance = ((x - means[column][safe]) ** 2).sum(axis=1)
        out[column] = _picks(np.where(groups >= 0, distance, np.nan), groups, item["groups"], k, keys, index)
    return out


def _bottom(rows: list[dict], n: int, score: str) -> dict:
    """The ``n`` entries of smallest ``score`` over the concatenated per-part dicts ``rows``."""
    cat: dict[str, Any] = {}
    for name, first in rows[0].items():
        if name == "codes":
            cat[name] = {c: np.concatenate([r[name][c] for r in rows]) for c in first}
        elif isinstance(first, list):
            cat[name] = [v for r in rows for v in r[name]]
        else:
            cat[name] = np.concatenate([r[name] for r in rows])
    idx = smallest_per_group(cat[score], np.zeros(len(cat[score]), np.int64), 1, n)
    out = {}
    for name, value in cat.items():
        if name == "codes":
            out[name] = {c: v[idx] for c, v in value.items()}
        elif isinstance(value, list):
            out[name] = [value[i] for i in idx]
        else:
            out[name] = value[idx]
    return out


def _project(x: np.ndarray, seed: int) -> tuple[np.ndarray, str, list[float] | None]:
    """2-D coordinates of the map: UMAP when the optional ``umap-learn`` package is installed (and the
    sample is large enough for its neighbour graph), else PCA."""
    try:
        import umap  # optional
    except ImportError:
        umap = None
    if umap is not None and len(x) > 16:
        coords = umap.UMAP(n_components=2, n_neighbors=15, random_state=seed).fit_transform(x)
        return np.asarray(coords, np.float64), "umap", None
    coords, explained = pca_2d(x)
    return coords, "pca", explained.tolist()


def _input_shards(ctx: StageContext):
    """(shards, format, image column, text column) of the input; listed again from the spec when the
    context has none (a report rebuilt from the run directory alone)."""
    if all(s.path for s in ctx.shards):
        return ctx.shards, ctx.fmt, ctx.image_column, ctx.text_column
    shards = list_shards(ctx.spec.data)
    if len(shards) != len(ctx.shards):
        raise SpecError("data.path", f"holds {len(shards)} shards, the run had {len(ctx.shards)}")
    return (shards, *resolve_format(ctx.spec.data, shards))


def _shown(rows: np.ndarray, mean_weight: np.ndarray) -> np.ndarray:
    """Groups that get a card with thumbnails: every non-empty one, or, beyond CARDS_PER_COLUMN, the most
    down- and up-weighted halves of that many (among equal mean weights the larger groups first)."""
    present = np.flatnonzero(rows > 0)
    if present.size <= CARDS_PER_COLUMN:
        return present
    down = present[np.lexsort((-rows[present], mean_weight[present]))]
    up = present[np.lexsort((-rows[present], -mean_weight[present]))]
    chosen = dict.fromkeys(down[: CARDS_PER_COLUMN // 2].tolist())
    for g in up.tolist():
        if len(chosen) == CARDS_PER_COLUMN:
            break
        chosen.setdefault(g)
    return np.sort(np.fromiter(chosen, np.int64))


def _label(item: dict, group: int) -> str:
    return str(group) if item["vocab"] is None else item["vocab"][group]


NO_PICKS = {"score": np.zeros(0), "group": np.zeros(0, np.int64), "key": [], "part": np.zeros(0, np.int64)}


def _merge_groups(entries: list[dict], k: int) -> dict[str, Any]:
    """The CARDS_PER_COLUMN largest near-duplicate groups over the parts' :func:`_largest_groups`, in their
    shape: ``group`` (group keys), ``size``, ``rows``, ``weight`` and ``random`` picks (``group``: position in
    ``group``). A group outside a part's largest cannot be among the largest of all (sizes are global)."""
    size: dict[str, int] = {}
    for e in entries:
        size.update(zip(e["group"], e["size"].tolist(), strict=True))
    names = sorted(size, key=lambda g: (-size[g], g))[:CARDS_PER_COLUMN]
    position = {g: i for i, g in enumerate(names)}
    rows, weight = np.zeros(len(names), np.int64), np.zeros(len(names))
    picks = []
    for e in entries:
        local = np.array([position.get(g, -1) for g in e["group"]], np.int64)
        ok = local >= 0
        np.add.at(rows, local[ok], e["rows"][ok])
        np.add.at(weight, local[ok], e["weight"][ok])
        p = e["random"]
        mapped = local[p["group"]] if p["group"].size else p["group"]
        keep = mapped >= 0
        picks.append({"score": p["score"][keep], "group": mapped[keep],
                      "key": [key for key, kept in zip(p["key"], keep, strict=True) if kept],
                      "part": p["part"][keep]})  # fmt: skip
    return {
        "group": names,
        "size": np.array([size[g] for g in names], np.int64),
        "rows": rows,
        "weight": weight,
        "random": _concat_picks(picks, len(names), max(k, CAPTIONS_PER_CONCEPT)),
    }


def _fold(acc: dict | None, part: dict, plan: list[dict], k: int) -> dict:
    """Two :func:`concepts_part` results (of parts, or of parts already folded) merged into one of the same
    shape: counts, weights, sums and truth tables add, picks keep the smallest scores per group (ties by part
    order, as one merge of all parts would). Folding the parts as they come holds one result on the driver,
    O(G d) per concept column, instead of every part's."""
    if acc is None:
        return part
    columns = {}
    for item in plan:
        column, n = item["column"], item["groups"]
        a, b = acc["columns"][column], part["columns"][column]
        if item["kind"] == DUP_GROUP:
            columns[column] = _merge_groups([a, b], k)
            continue
        m = {name: a[name] + b[name] for name in ("rows", "weight", "sum", "truth") if name in a}
        for name, size in (("random", max(k, CAPTIONS_PER_CONCEPT)), ("central", k)):
            if name in a:
                m[name] = _concat_picks([a[name], b[name]], n, size)
        columns[column] = m
    return {
        "columns": columns,
        "map": _bottom([acc["map"], part["map"]], MAP_POINTS, "priority"),
        "weights": _bottom([acc["weights"], part["weights"]], WEIGHT_SAMPLE, "priority"),
        "largest": _bottom([acc["largest"], part["largest"]], LARGEST_WEIGHTS, "score"),
    }


def _fetch_media(
    ctx: StageContext, pool: ActorPool, wanted: dict[int, tuple[set, set]]
) -> tuple[dict, str | None]:
    """Captions and thumbnails of the wanted rows ({part: (caption keys, thumbnail keys)}), read back from
    the input shards; (media, None) or ({}, why none could be read)."""
    try:
        shards, fmt, image_column, text_column = _input_shards(ctx)
        jobs = [
            (
                read_rows_by_key,
                shards[i],
                ctx.spec.data,
                fmt,
                image_column,
                text_column,
                keys | thumbs,
                thumbs,
            )
            for i, (keys, thumbs) in sorted(wanted.items())
        ]
        found = pool.map("call", jobs, "thumbnails") if jobs else []
    except (SpecError, OSError, fs.StorageError) as err:
        log.warning("report: no thumbnails or captions, the input cannot be read: %s", err)
        return {}, f"the input shards could not be read ({type(err).__name__}: {err})"
    media = {key: row for rows in found for key, row in rows.items()}
    note = None if image_column is not None and fmt != "embeddings" else "the dataset has no encoded images"
    return media, note


def compute_concepts(ctx: StageContext) -> tuple[dict[str, Any], dict[str, dict]]:
    """(the ``concepts`` section of report.json, media) where media maps a row key to its ``thumbnail``
    (WebP bytes or None) and ``caption``, for the rows the page shows."""
    plan, truth_vocab, skipped, entry_names = _plan(ctx)
    truth = ctx.spec.report.truth
    dedup = ctx.run.path("clusters", "dedup.json")
    dup_groups = json.loads(dedup.read_text())["groups_with_duplicates"] if dedup.is_file() else 0
    n_thumbs = ctx.spec.report.thumbnails
    n_random = n_thumbs // 4
    n_central = n_thumbs - n_random
    seed = ctx.spec.cluster.seed
    root = str(ctx.run.root)
    k = max(n_central, 1)
    balance = json.loads(ctx.run.path("balance.json").read_text())
    one = functools.partial(
        concepts_part, root, plan=plan, truth=truth, truth_vocab=truth_vocab, seed=seed, k=k
    )
    with ActorPool(ShardWorker, ctx.workers(len(ctx.shards))) as pool:
        folded = None
        for part in pool.imap("call", [(one, s.index) for s in ctx.shards], "concepts"):
            folded = _fold(folded, part, plan, k)
        means, merged, names = {}, {}, {}
        shown_entries = None
        for item in plan:
            column, n = item["column"], item["groups"]
            m = folded["columns"][column]
            if item["kind"] == DUP_GROUP:
                m["central"], names[column] = NO_PICKS, m.pop("group")
                merged[column] = m
                continue
            if item["kind"] == "concept":  # the entries with a card only (up to millions of entries)
                rows = m["rows"]
                shown_entries = _shown(rows, np.where(rows > 0, m["weight"] / np.maximum(rows, 1), np.nan))
                probability = read_table(ctx.run.path("concepts", "entries.parquet"), columns=["probability"])
                m = {"rows": rows[shown_entries], "weight": m["weight"][shown_entries], "central": NO_PICKS,
                     "values": int((rows > 0).sum()),
                     "probability": probability.column(0).to_numpy()[shown_entries]}  # fmt: skip
                names[column] = [entry_names[i] for i in shown_entries.tolist()]
                merged[column] = m
                continue
            if "central" not in m:
                means[column] = m["sum"] / np.maximum(m["rows"], 1)[:, None]
            names[column] = [_label(item, g) for g in range(n)]
            merged[column] = m
        if means or shown_entries is not None:
            two = functools.partial(
                central_part, root, plan=plan, means=means, k=k, shown_entries=shown_entries, seed=seed
            )
            sizes = {i["column"]: (i["groups"], k) for i in plan if i["column"] in means}
            if shown_entries is not None:
                sizes["concept"] = (shown_entries.size, max(k, CAPTIONS_PER_CONCEPT))
            centres = None
            for c in pool.imap("call", [(two, s.index) for s in ctx.shards], "concept centres"):
                centres = c if centres is None else {
                    column: _concat_picks([centres[column], c[column]], *sizes[column]) for column in sizes
                }  # fmt: skip
            for item in plan:
                if item["column"] in means:
                    merged[item["column"]]["central"] = centres[item["column"]]
            if shown_entries is not None:
                merged["concept"]["random"] = centres["concept"]
        sample, largest = folded["map"], folded["largest"]
        weight_sample = folded["weights"]["weight"]

        columns: dict[str, Any] = {}
        wanted: dict[int, tuple[set, set]] = {}

        def want(keys: list[str], parts_: np.ndarray, thumbnail: bool) -> None:
            for key, part in zip(keys, parts_.tolist(), strict=True):
                captions, thumbs = wanted.setdefault(part, (set(), set()))
                (thumbs if thumbnail and n_thumbs else captions).add(key)

        for item in plan:
            column, m, kind = item["column"], merged[item["column"]], item["kind"]
            rows = m["rows"].astype(np.int64)
            mean_weight = np.where(rows > 0, m["weight"] / np.maximum(rows, 1), np.nan)
            shown = set(_shown(rows, mean_weight).tolist())
            dist = (
                balance["marginal_distributions"].get(column) if kind not in ("concept", DUP_GROUP) else None
            )
            targets = dict(zip(dist["values"], dist["target"], strict=True)) if dist else {}
            with_truth = truth_vocab is not None and "truth" in m
            if with_truth:
                majority, pure = purity(m["truth"])
            n_shown_random = n_thumbs if kind in ("concept", DUP_GROUP) else n_random  # no central rows
            records = []
            for g in np.flatnonzero(rows > 0).tolist():
                pick = {name: np.flatnonzero(m[name]["group"] == g) for name in ("central", "random")}
                central = [m["central"]["key"][i] for i in pick["central"][:n_central]]
                randoms = [
                    key for key in (m["random"]["key"][i] for i in pick["random"]) if key not in central
                ]
                value = names[column][g]
                record = {
                    "value": value,
                    "rows": int(rows[g]),
                    "weighted_rows": float(m["weight"][g]),
                    "mean_weight": float(mean_weight[g]),
                    "target": targets.get(value),
                    "central_keys": central,
                    "random_keys": randoms[:n_shown_random],
                    "card": g in shown,
                }
                if kind == "concept":
                    record["probability"] = float(m["probability"][g])
                if with_truth:
                    record["truth_value"] = truth_vocab[int(majority[g])]
                    record["purity"] = float(pure[g])
                records.append(record)
                if g in shown:
                    want(central, m["central"]["part"][pick["central"][: len(central)]], True)
                    chosen = pick["random"][:CAPTIONS_PER_CONCEPT]
                    random_keys = [m["random"]["key"][i] for i in chosen]
                    parts_of = m["random"]["part"][chosen]
                    thumb = np.isin(random_keys, record["random_keys"])
                    want([kk for kk, t in zip(random_keys, thumb, strict=True) if t], parts_of[thumb], True)
                    want(
                        [kk for kk, t in zip(random_keys, thumb, strict=True) if not t],
                        parts_of[~thumb],
                        False,
                    )
                    record["caption_keys"] = random_keys
            columns[column] = {
                "kind": kind,
                "side": item["side"],
                "level": item["level"],
                "balanced": column in balance["marginals"],
                "values": m.get("values", len(records)) if kind != DUP_GROUP else dup_groups,
                "concepts": records,
            }
        want(sample["key"], sample["part"], True)
        want(largest["key"], largest["part"], True)
        media, note = _fetch_media(ctx, pool, wanted)
    for entry in columns.values():
        for record in entry["concepts"]:
            keys = record.pop("caption_keys", [])
            chosen = dict.fromkeys([*record["central_keys"], *keys])  # each row once
            captions = [media[key]["caption"] for key in chosen if key in media and media[key]["caption"]]
            record["words"] = [[w, c] for w, c in caption_words(captions)]
            record["captions_read"] = len(captions)
    coords, method, explained = _project(sample["x"], seed)
    colour = next((c for c in balance["marginals"] if c in sample["codes"]), plan[0]["column"])
    item = next(i for i in plan if i["column"] == colour)
    codes = sample["codes"][colour]
    summary = {
        "thumbnails": n_thumbs,
        "thumbnail_pixels": THUMBNAIL_PIXELS,
        "truth": truth,
        "note": note,
        "skipped_columns": skipped,
        "columns": columns,
        "weights": {
            "sample_rows": int(len(weight_sample)),
            "percentiles": weight_percentiles(weight_sample),
            "largest": [
                {
                    "key": key,
                    "weight": float(w),
                    "concepts": {
                        c: _label(i, int(largest["codes"][c][j]))
                        for c, i in ((p["column"], p) for p in plan if p["column"] in largest["codes"])
                        if largest["codes"][c][j] >= 0
                    },
                }
                for j, (key, w) in enumerate(zip(largest["key"], largest["weight"], strict=True))
            ],
        },
        "map": {
            "method": method,
            "explained_variance": explained,
            "side": plan[0]["side"],
            "colour": colour,
            "points": [
                {
                    "key": key,
                    "x": float(x),
                    "y": float(y),
                    "weight": float(w),
                    "concept": _label(item, int(g)) if g >= 0 else None,
                }
                for key, (x, y), w, g in zip(sample["key"], coords, sample["weight"], codes, strict=True)
            ],
        },
    }
    return summary, media
