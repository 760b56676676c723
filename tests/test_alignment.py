"""Cluster levels against a carried ground truth: the alignment kernel and report.json's truth_alignment."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import normalized_mutual_info_score
from test_cluster_stage import write_mixture

import rebalance
from rebalance.data.parts import read_parts
from rebalance.kernels.alignment import alignment_scores, truth_shares
from rebalance.spec import Spec, SpecError


def test_scores_match_scikit_learn_and_hand_counts():
    rng = np.random.default_rng(0)
    truth, clusters = rng.integers(0, 4, 500), rng.integers(0, 6, 500)
    clusters[truth == 0] = 5  # label 0 lies in one cluster
    c = pd.crosstab(clusters, truth).to_numpy()
    got = alignment_scores(c)
    assert got["nmi"] == pytest.approx(normalized_mutual_info_score(truth, clusters), rel=1e-12)
    assert got["purity"] == pytest.approx(c.max(axis=1).sum() / 500)
    assert got["truth_spread"][0] == {
        "rows": int((truth == 0).sum()),
        "clusters": 1,
        "effective_clusters": 1.0,
    }
    spread = got["truth_spread"][1]
    share = c[:, 1] / c[:, 1].sum()
    assert spread["effective_clusters"] == pytest.approx(
        np.exp(-(share[share > 0] * np.log(share[share > 0])).sum())
    )
    k5 = got["clusters"][list(np.unique(clusters)).index(5)]
    assert k5["rows"] == int((clusters == 5).sum()) and k5["dominant"] == 0
    assert alignment_scores(np.array([[3.0]]))["nmi"] == 1.0


def test_truth_shares_by_hand():
    # 3 labels: rows 6, 3, 1 (shares 0.6, 0.3, 0.1); weighted rows 4, 4, 2 (0.4, 0.4, 0.2); uniform 1/3.
    got = truth_shares(np.array([6, 3, 1]), np.array([4.0, 4.0, 2.0]))
    np.testing.assert_allclose(got["share_before"], [0.6, 0.3, 0.1])
    np.testing.assert_allclose(got["share_after"], [0.4, 0.4, 0.2])
    assert got["tv_uniform_before"] == pytest.approx(0.5 * (0.6 - 1 / 3 + 1 / 3 - 0.3 + 1 / 3 - 0.1))
    assert got["tv_uniform_after"] == pytest.approx(0.5 * (2 * (0.4 - 1 / 3) + 1 / 3 - 0.2))
    assert truth_shares(np.ones(4), np.ones(4))["tv_uniform_after"] == 0.0
    with pytest.raises(ValueError, match="positive sums"):
        truth_shares(np.zeros(2), np.ones(2))


def test_report_shows_every_level_against_the_truth(tmp_path, ray_local):
    truth = write_mixture(tmp_path / "data", n=600, d=16, shards=2)
    spec = {
        "data": {"path": str(tmp_path / "data"), "carry": ["label"]},
        "cluster": {"image": {"k": 8}, "text": {"k": 8}, "levels": [3], "sample_per_centroid": 100},
        "balance": {"marginals": ["image_cluster_1"]},
        "report": {"html": True, "spectra_by": [], "truth": "label", "thumbnails": 0},
    }
    rebalance.run(spec, tmp_path / "o")
    report = json.loads((tmp_path / "o" / "report" / "report.json").read_text())
    alignment = report["truth_alignment"]
    assert alignment["column"] == "label" and alignment["values"] == [f"c{i}" for i in range(8)]
    table = read_parts(tmp_path / "o" / "assignments").to_pandas()
    for side in ("image", "text"):
        assert [lv["k"] for lv in alignment[side]] == [8, 3]
        for lv, column in ((0, f"{side}_cluster"), (1, f"{side}_cluster_1")):
            entry = alignment[side][lv]
            labels = table[column].to_numpy()
            assert entry["nmi"] == pytest.approx(normalized_mutual_info_score(truth, labels), rel=1e-9)
            c = pd.crosstab(labels, truth)
            assert entry["purity"] == pytest.approx(c.max(axis=1).sum() / 600)
            assert [s["clusters"] for s in entry["truth_spread"]] == (c > 0).sum(axis=0).tolist()
            assert entry["balanced"] == (column == "image_cluster_1")
    # The true labels' shares: rows and weighted rows per label, computed directly from the parts.
    weights = read_parts(tmp_path / "o" / "weights").column("weight").to_numpy()
    shares = alignment["shares"]
    rows = np.bincount(truth, minlength=8)
    weighted = np.bincount(truth, weights=weights, minlength=8)
    assert shares["rows"] == rows.tolist()
    np.testing.assert_allclose(shares["weighted_rows"], weighted, rtol=1e-12)
    np.testing.assert_allclose(shares["share_after"], weighted / weighted.sum(), rtol=1e-12)
    tv = [0.5 * np.abs(v / v.sum() - 1 / 8).sum() for v in (rows, weighted)]
    assert [shares["tv_uniform_before"], shares["tv_uniform_after"]] == pytest.approx(tv, rel=1e-9)
    page = (tmp_path / "o" / "report" / "report.html").read_text()
    assert "Concepts against the ground truth" in page and f"{tv[0]:.3f} before, {tv[1]:.3f} after" in page
    assert (
        f"<td>image_cluster_1</td><td>3</td><td>yes</td><td>{alignment['image'][1]['nmi']:.3f}</td>" in page
    )


def test_a_level_is_the_default_marginal(tmp_path):
    raw = {
        "data": {"path": str(tmp_path)},
        "cluster": {"image": {"k": 8}, "text": {"k": 8}, "levels": [4, 2]},
    }
    assert Spec.from_dict(raw).balance.marginals == ("image_cluster", "text_cluster")
    spec = Spec.from_dict({**raw, "balance": {"level": 2}})
    assert spec.balance.marginals == ("image_cluster_2", "text_cluster_2")
    assert Spec.from_dict(spec.to_dict()) == spec
    named = Spec.from_dict({**raw, "balance": {"level": 2, "marginals": ["image_cluster_1"]}})
    assert named.balance.marginals == ("image_cluster_1",)  # named marginals win
    with pytest.raises(SpecError, match="spec field 'balance.level'"):
        Spec.from_dict({**raw, "balance": {"level": 3}})
