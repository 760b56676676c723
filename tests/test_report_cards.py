"""Concept-card building blocks against hand-computed cases and direct computations; thumbnails and captions
read back from a generated dataset by key."""

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rebalance.data.readers import list_shards, resolve_format
from rebalance.data.synthetic import generate_dataset
from rebalance.data.thumbnails import make_thumbnail, read_rows_by_key
from rebalance.report.cards import caption_words, group_sums, pca_2d, purity, smallest_per_group
from rebalance.spec import DataSpec


def test_smallest_per_group_matches_sorting_each_group():
    rng = np.random.default_rng(0)
    score = rng.integers(0, 20, 500).astype(float)  # ties broken by index
    score[::37] = np.nan
    group = rng.integers(-1, 7, 500)
    idx = smallest_per_group(score, group, 6, 4)  # group 6 and -1 are out of range
    expected = []
    for g in range(6):
        rows = [i for i in range(500) if group[i] == g and not np.isnan(score[i])]
        expected += sorted(rows, key=lambda i: (score[i], i))[:4]
    assert idx.tolist() == expected


def test_group_sums_and_purity_by_hand():
    x = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    np.testing.assert_array_equal(group_sums(x, np.array([1, 0, 1]), 3), [[3, 4], [6, 8], [0, 0]])
    majority, pure = purity(np.array([[3, 1, 0], [0, 0, 0], [1, 1, 2]]))
    assert majority[[0, 2]].tolist() == [0, 2]
    np.testing.assert_allclose(pure[[0, 2]], [0.75, 0.5])
    assert np.isnan(pure[1])


def test_caption_words_counts_each_word_once_per_caption():
    words = caption_words(["A red circle, red!", "a photo of a red square", None, "blue square 42"], top=3)
    assert words == [("red", 2), ("square", 2), ("blue", 1)]


def test_pca_2d_projects_on_the_top_principal_axes():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 5)) * np.array([5.0, 3.0, 1.0, 0.5, 0.1])
    coords, explained = pca_2d(x)
    cov = np.cov(x, rowvar=False, bias=True)
    eigs, vecs = np.linalg.eigh(cov)
    np.testing.assert_allclose(coords.var(axis=0), eigs[::-1][:2], rtol=1e-9)
    np.testing.assert_allclose(explained, eigs[::-1][:2] / eigs.sum(), rtol=1e-9)
    for axis in range(2):  # the same axis as the covariance's eigenvector, up to sign
        direct = (x - x.mean(0)) @ vecs[:, -1 - axis]
        np.testing.assert_allclose(np.abs(coords[:, axis]), np.abs(direct), atol=1e-9)


def test_thumbnail_is_bounded_and_keeps_the_aspect():
    image = Image.new("RGBA", (200, 100), (0, 0, 0, 0))
    image.paste((255, 0, 0, 255), (0, 0, 100, 100))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    thumb = Image.open(io.BytesIO(make_thumbnail(buffer.getvalue(), 64)))
    assert thumb.format == "WEBP" and thumb.size == (64, 32)
    rgb = np.asarray(thumb.convert("RGB"), int)
    assert (abs(rgb[16, 8] - [255, 0, 0]) < 40).all() and (rgb[16, 56] > 215).all()  # alpha onto white
    small = io.BytesIO()
    Image.new("RGB", (20, 10), "blue").save(small, format="JPEG")
    assert Image.open(io.BytesIO(make_thumbnail(small.getvalue(), 64))).size == (20, 10)  # never enlarged
    assert make_thumbnail(b"not an image") is None


@pytest.mark.slow
def test_rows_are_read_back_by_key(tmp_path):
    generate_dataset(tmp_path / "data", n_rows=60, n_shards=2, seed=3)
    data = DataSpec(path=str(tmp_path / "data"), carry=("label",))
    shards = list_shards(data)
    fmt, image_column, text_column = resolve_format(data, shards)
    table = pq.read_table(shards[1].path)
    keys, captions = table.column("key").to_pylist(), table.column("txt").to_pylist()
    found = read_rows_by_key(shards[1], data, fmt, image_column, text_column, [keys[3], keys[7], "nope"],
                             thumbnail_keys=[keys[7]], batch_size=4)  # fmt: skip
    assert set(found) == {keys[3], keys[7]}
    assert found[keys[3]] == {"thumbnail": None, "caption": captions[3]}
    assert found[keys[7]]["caption"] == captions[7]
    assert Image.open(io.BytesIO(found[keys[7]]["thumbnail"])).size == (32, 32)


@pytest.mark.parametrize("bad", [-1, 65])
def test_thumbnails_spec_field_is_bounded(bad):
    from rebalance.spec import ReportSpec, SpecError

    with pytest.raises(SpecError, match="report.thumbnails"):
        ReportSpec(thumbnails=bad)


def test_truth_must_be_a_carried_column():
    from rebalance.spec import Spec, SpecError

    raw = {"data": {"path": ".", "carry": ["label"]}, "report": {"truth": "label"}}
    assert Spec.from_dict(raw).report.truth == "label"
    with pytest.raises(SpecError, match="report.truth"):
        Spec.from_dict({**raw, "report": {"truth": "source"}})


def test_cards_go_to_the_most_down_and_up_weighted_larger_first_among_ties():
    from rebalance.stages.concepts import CARDS_PER_COLUMN, _shown

    rng = np.random.default_rng(2)
    n = 100
    rows = rng.integers(1, 50, n)
    rows[[3, 7]] = 0  # empty: never a card
    mean_weight = rng.choice([0.5, 1.0, 2.0, 3.0], n)  # many ties
    present = [g for g in range(n) if rows[g] > 0]
    down = sorted(present, key=lambda g: (mean_weight[g], -rows[g], g))[: CARDS_PER_COLUMN // 2]
    up = sorted(present, key=lambda g: (-mean_weight[g], -rows[g], g))[: CARDS_PER_COLUMN // 2]
    assert _shown(rows, mean_weight).tolist() == sorted(down + up)
    few = np.array([0, 4, 1])
    assert _shown(few, np.ones(3)).tolist() == [1, 2]  # up to CARDS_PER_COLUMN: every non-empty group


def test_folding_parts_as_they_come_equals_one_pass_over_all_rows(monkeypatch):
    """The driver folds the concept pass's part results one by one (:func:`concepts._fold`); the folded
    counts, sums, truth tables, picks and samples equal those computed directly over all rows at once."""
    from rebalance.stages import concepts

    for name, size in (("MAP_POINTS", 7), ("WEIGHT_SAMPLE", 11), ("LARGEST_WEIGHTS", 3)):
        monkeypatch.setattr(concepts, name, size)
    rng = np.random.default_rng(3)
    n_rows, n_groups, n_truth, k = 900, 6, 4, 5
    group = rng.integers(-1, n_groups, n_rows)  # -1: no label
    truth = rng.integers(0, n_truth, n_rows)
    weight = rng.gamma(2.0, size=n_rows)
    x = rng.standard_normal((n_rows, 3))
    priority = rng.integers(0, 50, n_rows).astype(float)  # ties: broken by row order, as in one pass
    distance = rng.random(n_rows)
    keys = [f"k{i:04d}" for i in range(n_rows)]
    part_of = np.repeat(np.arange(4), [100, 0, 500, 300])  # an empty part too
    plan = [{"column": "image_cluster", "kind": "cluster", "groups": n_groups}]
    n_random = max(k, concepts.CAPTIONS_PER_CONCEPT)

    def summary(rows: np.ndarray, part: int) -> dict:
        g, ok = group[rows], group[rows] >= 0
        pick = lambda score, m: concepts._picks(score, g, n_groups, m, [keys[i] for i in rows], part)  # noqa: E731
        zeros = np.zeros(rows.size, np.int64)
        sample = lambda score, m: {"priority": score[rows][smallest_per_group(score[rows], zeros, 1, m)]}  # noqa: E731
        return {
            "columns": {"image_cluster": {
                "rows": np.bincount(g[ok], minlength=n_groups),
                "weight": np.bincount(g[ok], weights=weight[rows][ok], minlength=n_groups),
                "sum": group_sums(x[rows][ok], g[ok], n_groups),
                "truth": np.bincount(g[ok] * n_truth + truth[rows][ok], minlength=n_groups * n_truth
                                     ).reshape(n_groups, n_truth),
                "random": pick(priority[rows], n_random),
                "central": pick(distance[rows], k),
            }},
            "map": sample(priority, 7),
            "weights": sample(priority, 11),
            "largest": {"score": sample(-weight, 3)["priority"]},
        }  # fmt: skip

    folded = None
    for part in range(4):
        folded = concepts._fold(folded, summary(np.flatnonzero(part_of == part), part), plan, k)
    whole = summary(np.arange(n_rows), 0)["columns"]["image_cluster"]
    got = folded["columns"]["image_cluster"]
    for name in ("rows", "truth"):
        np.testing.assert_array_equal(got[name], whole[name])
    np.testing.assert_allclose(got["weight"], whole["weight"], rtol=1e-12)
    np.testing.assert_allclose(got["sum"], whole["sum"], rtol=1e-12, atol=1e-12)
    for name in ("random", "central"):
        assert got[name]["key"] == whole[name]["key"]
        np.testing.assert_array_equal(
            got[name]["part"], part_of[[int(key[1:]) for key in whole[name]["key"]]]
        )
    np.testing.assert_array_equal(folded["map"]["priority"], np.sort(priority)[:7])
    np.testing.assert_array_equal(folded["largest"]["score"], np.sort(-weight)[:3])
