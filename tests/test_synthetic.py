"""Tests for rebalance.data.synthetic: the long-tailed synthetic image-text dataset generator."""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rebalance.data.synthetic import (
    COLOURS,
    CONCEPTS,
    LABELS,
    SHAPES,
    SOURCES,
    concept_counts,
    concept_frequencies,
    generate_dataset,
    render_image,
)

# Independent reference colours (canonical web colours), used to check that an image shows its label's
# colour without relying on the generator's own palette.
REFERENCE_RGB = {
    "red": (255, 0, 0),
    "green": (0, 128, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (128, 0, 128),
    "cyan": (0, 255, 255),
}

EXPECTED_COLUMNS = ["key", "jpg", "txt", "label", "source", "status", "width", "height"]


def _shards(path: Path) -> list[Path]:
    return sorted(path.glob("part-*.parquet"))


def _read_all(path: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in _shards(path)])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict, pa.Table]:
    out = tmp_path_factory.mktemp("synthetic") / "ds"
    summary = generate_dataset(out)
    return out, summary, _read_all(out)


def test_concepts_and_frequencies():
    assert len(CONCEPTS) >= 24
    assert len(set(CONCEPTS)) == len(CONCEPTS)
    assert [f"{c} {s}" for c, s in CONCEPTS] == LABELS
    p = concept_frequencies(len(CONCEPTS))
    assert p.shape == (len(CONCEPTS),)
    assert np.isclose(p.sum(), 1.0)
    assert np.all(np.diff(p) < 0)
    assert p[0] / p[-1] >= 50
    # Zipf form: p_i * (i+1)^s is constant.
    s = 1.3
    assert np.allclose(p * np.arange(1, len(p) + 1) ** s, p[0])
    # Too few concepts for the requested ratio: the exponent is steepened to reach it.
    p5 = concept_frequencies(5)
    assert p5[0] / p5[-1] == pytest.approx(50.0)
    assert concept_frequencies(1).tolist() == [1.0]


def test_concept_counts_exact_and_minimum():
    p = concept_frequencies(len(CONCEPTS))
    c = concept_counts(3000, p)
    assert c.sum() == 3000 and np.all(np.abs(c - 3000 * p) < 1)
    assert np.array_equal(c, concept_counts(3000, p))
    small = concept_counts(len(CONCEPTS), p)
    assert small.sum() == len(CONCEPTS) and small.min() == 1
    medium = concept_counts(100, p)
    assert medium.sum() == 100 and medium.min() >= 2


def test_layout_counts_and_keys(dataset):
    out, summary, table = dataset
    n_rows = 3000
    assert summary["rows"] == n_rows and summary["shards"] == 4
    assert summary["concepts"] == len(CONCEPTS) >= 24
    assert Path(summary["path"]) == out.resolve()
    assert [p.name for p in _shards(out)] == [f"part-{i:05d}.parquet" for i in range(4)]
    assert json.loads((out / "dataset.json").read_text()) == summary
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]

    assert table.column_names == EXPECTED_COLUMNS
    assert table.schema.field("jpg").type == pa.binary()
    assert table.schema.field("width").type == pa.int32() and table.schema.field("height").type == pa.int32()
    assert table.num_rows == n_rows

    realised = Counter(table["label"].to_pylist())
    assert dict(realised) == summary["counts"]
    assert set(summary["counts"]) == set(LABELS)
    assert sum(summary["counts"].values()) == n_rows
    counts = list(summary["counts"].values())
    assert min(counts) >= 2
    assert max(counts) / min(counts) >= 50

    keys = table["key"].to_pylist()
    assert len(set(keys)) == n_rows
    sizes = [pq.read_metadata(p).num_rows for p in _shards(out)]
    assert sum(sizes) == n_rows and max(sizes) - min(sizes) <= 1
    for shard, p in enumerate(_shards(out)):
        shard_keys = pq.read_table(p, columns=["key"])["key"].to_pylist()
        assert shard_keys == [f"{shard:05d}{j:04d}" for j in range(len(shard_keys))]
    assert all(re.fullmatch(r"\d{9}", k) for k in keys)
    assert set(table["status"].to_pylist()) == {"success"}
    assert set(table["width"].to_pylist()) == {32} and set(table["height"].to_pylist()) == {32}
    # Shuffled: the first rows are not all the head concept.
    assert len(set(table["label"].to_pylist()[:50])) > 3


def test_deterministic_bytes(dataset, tmp_path):
    out, summary, _ = dataset
    again = generate_dataset(tmp_path / "again")
    assert again["counts"] == summary["counts"]
    for a, b in zip(_shards(out), _shards(tmp_path / "again"), strict=True):
        assert a.read_bytes() == b.read_bytes()
    other = generate_dataset(tmp_path / "other", n_rows=300, n_shards=2, seed=1)
    same = generate_dataset(tmp_path / "same", n_rows=300, n_shards=2, seed=0)
    assert (tmp_path / "other/part-00000.parquet").read_bytes() != (
        tmp_path / "same/part-00000.parquet"
    ).read_bytes()
    assert other["counts"] == same["counts"]  # counts depend on n_rows only, not on the seed


def _dominant_colour(img: np.ndarray) -> np.ndarray:
    """Median colour of the pixels that differ clearly from the (border-estimated) background."""
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]).astype(np.float64)
    background = np.median(border, axis=0)
    pixels = img.reshape(-1, 3).astype(np.float64)
    foreground = pixels[np.linalg.norm(pixels - background, axis=1) > 60]
    assert len(foreground) >= 20, "no visible shape"
    return np.median(foreground, axis=0)


def test_images_match_labels(dataset):
    _, _, table = dataset
    names = list(REFERENCE_RGB)
    refs = np.array([REFERENCE_RGB[n] for n in names], dtype=np.float64)
    for jpg, label in zip(table["jpg"].to_pylist(), table["label"].to_pylist(), strict=True):
        img = Image.open(io.BytesIO(jpg))
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (32, 32)
        colour = label.split(" ")[0]
        dominant = _dominant_colour(np.asarray(img))
        assert names[int(np.argmin(np.linalg.norm(refs - dominant, axis=1)))] == colour, (label, dominant)
        assert np.linalg.norm(dominant - np.array(COLOURS[colour])) < 40, (label, dominant)


def test_captions_and_sources(dataset):
    _, _, table = dataset
    labels = table["label"].to_pylist()
    captions = table["txt"].to_pylist()
    for txt, label in zip(captions, labels, strict=True):
        colour, shape = label.split(" ")
        assert re.search(rf"\b{colour}\b", txt) and re.search(rf"\b{shape}\b", txt), (txt, label)
    head = LABELS[0]
    assert len({t for t, lab in zip(captions, labels, strict=True) if lab == head}) >= 4

    sources = table["source"].to_pylist()
    assert set(sources) <= set(SOURCES) and len(set(sources)) >= 3
    # Source is correlated with the concept: the head is mostly "web", the tail much less so.
    head_labels, tail_labels = set(LABELS[:3]), set(LABELS[-8:])
    head_web = np.mean([s == "web" for s, lab in zip(sources, labels, strict=True) if lab in head_labels])
    tail_web = np.mean([s == "web" for s, lab in zip(sources, labels, strict=True) if lab in tail_labels])
    assert head_web > 0.5 and tail_web < head_web - 0.2


def test_render_image():
    for colour in COLOURS:
        for shape in SHAPES:
            img = render_image(colour, shape, np.random.default_rng(0))
            assert img.dtype == np.uint8 and img.shape == (32, 32, 3)
    a = render_image("red", "cross", np.random.default_rng(7), size=48)
    b = render_image("red", "cross", np.random.default_rng(7), size=48)
    assert a.shape == (48, 48, 3) and np.array_equal(a, b)
    with pytest.raises(ValueError, match="colour"):
        render_image("mauve", "circle", np.random.default_rng(0))
    with pytest.raises(ValueError, match="shape"):
        render_image("red", "hexagon", np.random.default_rng(0))


def test_minimal_dataset_and_stale_shards(tmp_path):
    n = len(CONCEPTS)
    summary = generate_dataset(tmp_path, n_rows=n, n_shards=n)
    assert set(summary["counts"].values()) == {1}
    assert len(_shards(tmp_path)) == n
    generate_dataset(tmp_path, n_rows=100, n_shards=2)
    assert [p.name for p in _shards(tmp_path)] == ["part-00000.parquet", "part-00001.parquet"]
    assert _read_all(tmp_path).num_rows == 100


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"n_rows": len(CONCEPTS) - 1}, "n_rows"),
        ({"n_rows": 0}, "n_rows"),
        ({"n_shards": 0}, "n_shards"),
        ({"n_shards": -3}, "n_shards"),
        ({"n_rows": 30, "n_shards": 31}, "n_shards"),
        ({"zipf_exponent": -1.0}, "zipf_exponent"),
        ({"n_rows": 100, "copies": 51}, "copies"),
    ],
)
def test_invalid_arguments(tmp_path, kwargs, param):
    with pytest.raises(ValueError, match=param) as info:
        generate_dataset(tmp_path / "bad", **kwargs)
    assert str(list(kwargs.values())[-1]) in str(info.value)
    assert not (tmp_path / "bad").exists()


def test_planted_copies_repeat_their_original(tmp_path):
    summary = generate_dataset(tmp_path / "d", n_rows=60, n_shards=2, copies=6)
    table = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "d").glob("part-*.parquet"))])
    rows = {r["key"]: r for r in table.to_pylist()}
    assert len(summary["copies"]) == 6 and set(summary["copies"]).isdisjoint(summary["copies"].values())
    for copy, original in summary["copies"].items():
        for column in ("jpg", "txt", "label", "source"):
            assert rows[copy][column] == rows[original][column]
    # every other row is its own image: only the copies repeat bytes
    assert len({r["jpg"] for r in rows.values()}) == 60 - 6
    assert sum(summary["counts"].values()) == 60
    labels = table.column("label").to_pylist()
    assert summary["counts"] == {label: labels.count(label) for label in summary["counts"]}


def test_web_dataset_near_duplicates_and_alt_text(tmp_path):
    """The web regime: exact Zipf counts, head concepts = at most max_renders renders repeated with small
    perturbations (rows of one render are far closer than rows of two renders of the same concept),
    captions with the concept's words or unrelated ones, byte-identical for the same seed."""
    from rebalance.data.synthetic import (
        UNRELATED_CAPTIONS,
        WEB_SCHEMA,
        concept_counts,
        concept_frequencies,
        generate_web_dataset,
    )

    info = generate_web_dataset(tmp_path / "a", n_rows=1200, seed=3, max_renders=20, rows_per_shard=500)
    generate_web_dataset(tmp_path / "b", n_rows=1200, seed=3, max_renders=20, rows_per_shard=500)
    files = sorted(p.name for p in (tmp_path / "a").glob("part-*.parquet"))
    assert files == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    table = pa.concat_tables(pq.read_table(tmp_path / "a" / name) for name in files)
    assert table.schema == WEB_SCHEMA and table.num_rows == 1200
    expected = concept_counts(1200, concept_frequencies(len(LABELS)))
    assert Counter(table.column("label").to_pylist()) == dict(zip(LABELS, expected.tolist(), strict=True))
    assert info["renders"] == {lab: int(min(n, 20)) for lab, n in zip(LABELS, expected, strict=True)}
    labels, renders = table.column("label").to_pylist(), table.column("render").to_numpy()
    owner = {}
    for lab, r in zip(labels, renders, strict=True):
        assert owner.setdefault(int(r), lab) == lab  # a render belongs to one concept
    assert len(owner) == sum(info["renders"].values())
    pix = np.stack(
        [np.asarray(Image.open(io.BytesIO(b)), dtype=np.float64) for b in table.column("jpg").to_pylist()]
    )
    head = [i for i, lab in enumerate(labels) if lab == LABELS[0]]
    same, other = [], []
    for i in head[:60]:
        for j in head[:60]:
            if i < j:
                (same if renders[i] == renders[j] else other).append(np.abs(pix[i] - pix[j]).mean())
    assert same and other and np.median(same) < 0.5 * np.median(other)
    texts = table.column("txt").to_pylist()
    unrelated = [t in UNRELATED_CAPTIONS for t in texts]
    assert 0.05 < np.mean(unrelated) < 0.15  # unrelated = 0.1
    for lab, text, u in zip(labels, texts, unrelated, strict=True):
        if not u:
            colour, shape = lab.split()
            assert colour in text and shape in text
