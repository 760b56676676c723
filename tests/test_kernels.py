"""Targets, the balancing scaling, imbalance statistics, bottom-k sampling and the faiss k-means wrapper."""

import json

import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

from rebalance.kernels.kmeans import assign, train_kmeans
from rebalance.kernels.sampling import bottom_k, key_priorities
from rebalance.kernels.scaling import Scaling
from rebalance.kernels.stats import gini, imbalance_stats, normalized_entropy
from rebalance.kernels.targets import TARGETS, UnknownValuesError, target_marginal
from rebalance.spec import TARGET_KINDS, Target


def test_targets():
    counts = np.array([100.0, 25.0, 0.0, 4.0])
    np.testing.assert_allclose(target_marginal(counts), [1 / 3, 1 / 3, 0, 1 / 3])
    np.testing.assert_allclose(target_marginal(counts, "power", power=0.5), np.array([10, 5, 0, 2]) / 17)
    np.testing.assert_allclose(target_marginal(counts, "power", power=1.0), counts / counts.sum())
    np.testing.assert_allclose(target_marginal(counts, "cap", cap=20), np.array([20, 20, 0, 4]) / 44)
    t = target_marginal(counts, "weights", weights={"a": 1, "d": 3}, values=["a", "b", "c", "d"])
    np.testing.assert_allclose(t, [0.25, 0, 0, 0.75])
    with pytest.raises(ValueError, match="power"):
        target_marginal(counts, "power", power=-1)
    with pytest.raises(ValueError, match="unknown target kind"):
        target_marginal(counts, "nope")


def test_parsed_targets_compute_themselves():
    # Every kind the spec parses has its function, and a parsed target gives what its kind and value give.
    # `keep_probability` is the concept marginal's own target (MetaCLIP), set by the stage, never parsed.
    assert set(TARGETS) == {"uniform", "keep_probability", *TARGET_KINDS}
    counts = np.array([100.0, 25.0, 0.0, 4.0])
    names = ["a", "b", "c", "d"]
    np.testing.assert_allclose(
        target_marginal(counts, Target.parse("uniform", "t")), [1 / 3, 1 / 3, 0, 1 / 3]
    )
    np.testing.assert_allclose(
        target_marginal(counts, Target.parse({"cap": 20}, "t")), np.array([20, 20, 0, 4]) / 44
    )
    weights = Target.parse({"weights": {"a": 1, "d": 3}}, "t")
    np.testing.assert_allclose(target_marginal(counts, weights, values=names), [0.25, 0, 0, 0.75])
    with pytest.raises(UnknownValuesError) as err:  # positive weight on a value no row has: missing mass
        target_marginal(counts, Target.parse({"weights": {"a": 1, "z": 2, "y": 0}}, "t"), values=names)
    assert err.value.values == ["y", "z"]


def test_scaling_weights_cap_and_record_by_hand():
    # f_0 = log [2, 0.5, 0] (-inf: a target of 0), f_1 = log [1, 4], L = log 2: w(l) = f_0(l_0) f_1(l_1) / 2.
    scaling = Scaling((np.log([2.0, 0.5]).tolist() + [-np.inf], np.log([1.0, 4.0])), float(np.log(2.0)))
    codes = np.array([[0, 0], [0, 1], [1, 1], [2, 1]])
    np.testing.assert_allclose(scaling.weights(codes), [1, 4, 1, 0], rtol=1e-15)
    capped = scaling.capped(1.5, 3.0)
    np.testing.assert_allclose(capped.weights(codes), [1.5, 3, 1.5, 0], rtol=1e-15)
    with pytest.raises(ValueError, match="names"):
        capped.to_dict()  # the record names the labels
    labelled = capped.labelled(["image_cluster", "source"], [[0, 1, 2], ["web", "stock"]])
    record = json.loads(json.dumps(labelled.to_dict()))
    assert record["values"] == {"image_cluster": ["0", "1", "2"], "source": ["web", "stock"]}
    assert record["log_factors"]["image_cluster"][2] is None  # a target of 0
    assert record["clip"] == {"scale": 1.5, "max_weight": 3.0}
    again = Scaling.from_dict(record)
    assert again.marginals == ("image_cluster", "source") and again.values[1] == ("web", "stock")
    np.testing.assert_array_equal(again.weights(codes), capped.weights(codes))
    assert Scaling.from_dict(scaling.labelled(["a", "b"], [[0, 1, 2], [0, 1]]).to_dict()).max_weight is None


def test_stats_by_hand():
    assert gini(np.ones(5)) == pytest.approx(0)
    # x = [0, 0, 0, 4]: sum_i (2i - 5) x_i / (4 * 4) = 3 * 4 / 16 = 0.75 = (K - 1) / K.
    assert gini(np.array([4.0, 0, 0, 0])) == pytest.approx(0.75)
    assert normalized_entropy(np.ones(7)) == pytest.approx(1)
    p = np.array([0.5, 0.25, 0.25])
    assert normalized_entropy(p * 8) == pytest.approx(1.5 * np.log(2) / np.log(3))
    s = imbalance_stats(np.array([100.0, 10.0, 0.0, 2.0]))
    assert s["values"] == 3 and s["imbalance_ratio"] == pytest.approx(50)


def test_bottom_k_is_shard_independent_and_uniform():
    keys = [f"k{i}" for i in range(20_000)]
    p = key_priorities(keys, seed=7)
    assert ((p >= 0) & (p < 1)).all()
    whole = set(np.array(keys)[bottom_k(p, 500)])
    # Bottom-k per shard then merged equals bottom-k of the whole.
    shards = [np.arange(i, 20_000, 3) for i in range(3)]
    local = np.concatenate([s[bottom_k(p[s], 500)] for s in shards])
    merged = set(np.array(keys)[local[bottom_k(p[local], 500)]])
    assert merged == whole
    # Uniformity: sampled indices spread like a uniform sample (mean index near the middle).
    idx = np.array([int(k[1:]) for k in whole])
    assert abs(idx.mean() - 10_000) < 4 * 20_000 / np.sqrt(12 * 500)
    assert not np.array_equal(key_priorities(keys[:5], 1), key_priorities(keys[:5], 2))


def test_kmeans_recovers_gaussian_mixture():
    rng = np.random.default_rng(0)
    k, d = 8, 32
    centers = rng.normal(size=(k, d))
    truth = rng.integers(0, k, 4000)
    x = (centers[truth] + 0.3 * rng.normal(size=(4000, d))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    model = train_kmeans(x, k, niter=25, seed=1)
    labels, distances = assign(x, model.centroids)
    assert normalized_mutual_info_score(truth, labels) >= 0.9
    np.testing.assert_allclose(np.linalg.norm(model.centroids, axis=1), 1, atol=1e-5)
    expected = ((x - model.centroids[labels]) ** 2).sum(1)
    np.testing.assert_allclose(distances, expected, rtol=1e-4, atol=1e-5)
    again = train_kmeans(x, k, niter=25, seed=1)
    np.testing.assert_array_equal(again.centroids, model.centroids)
    with pytest.raises(ValueError, match="k must lie"):
        train_kmeans(x[:5], 8)


def test_nmi_matches_scikit_learn():
    from rebalance.kernels.stats import normalized_mutual_info

    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, 500)
    b = np.where(rng.random(500) < 0.7, a, rng.integers(0, 7, 500))
    assert normalized_mutual_info(a, b) == pytest.approx(normalized_mutual_info_score(a, b), rel=1e-10)
    assert normalized_mutual_info(a, a + 10) == pytest.approx(1)
    assert normalized_mutual_info(np.zeros(5), np.zeros(5)) == 1.0
