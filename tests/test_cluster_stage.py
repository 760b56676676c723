"""The cluster stage on precomputed embeddings with known labels: quality, determinism, levels, bad input."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import normalized_mutual_info_score

import rebalance
from rebalance.data.parts import read_parts
from rebalance.stages import cluster
from rebalance.stages.cluster import ClusterError


def write_mixture(path, n=2400, k=8, d=32, shards=3, seed=0, nan_rows=(), noise=0.25):
    """A Gaussian mixture on the sphere, with text vectors from a second mixture with the same labels; the
    two sides carry independent noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    image = rng.normal(size=(k, d))[labels] + noise * rng.normal(size=(n, d))
    text = rng.normal(size=(k, d))[labels] + noise * rng.normal(size=(n, d))
    image[list(nan_rows)] = np.nan
    path.mkdir(parents=True)
    for s, rows in enumerate(np.array_split(np.arange(n), shards)):
        table = pa.table({
            "key": [f"r{i:05d}" for i in rows],
            "image": pa.FixedSizeListArray.from_arrays(pa.array(image[rows].astype(np.float32).ravel()), d),
            "text": pa.FixedSizeListArray.from_arrays(pa.array(text[rows].astype(np.float32).ravel()), d),
            "label": [f"c{v}" for v in labels[rows]],
        })  # fmt: skip
        pq.write_table(table, path / f"part-{s:05d}.parquet")
    return labels


def spec_for(path, **cluster):
    return {
        "data": {"path": str(path), "carry": ["label"]},
        "cluster": {"image": {"k": 8}, "text": {"k": 8}, "niter": 25, **cluster},
        "balance": {"marginals": ["image_cluster"], "relax": "exact"},
        "report": {"html": False},
    }


def test_recovers_labels_deterministically_with_nested_levels(tmp_path, ray_local):
    truth = write_mixture(tmp_path / "data")
    spec = spec_for(tmp_path / "data", levels=[3, 2], sample_per_centroid=100, nredo=4)
    a = rebalance.run(spec, tmp_path / "a")
    table = read_parts(tmp_path / "a" / "assignments")
    assert table.column("key").to_pylist() == [f"r{i:05d}" for i in range(2400)]
    for side in ("image", "text"):
        assert normalized_mutual_info_score(truth, table.column(f"{side}_cluster").to_numpy()) >= 0.9
        base = table.column(f"{side}_cluster").to_numpy()
        l1 = table.column(f"{side}_cluster_1").to_numpy()
        l2 = table.column(f"{side}_cluster_2").to_numpy()
        # Nesting: every base cluster lies inside one level-1 cluster, every level-1 cluster in one level-2.
        for fine, coarse in ((base, l1), (l1, l2)):
            pairs = np.unique(np.stack([fine, coarse], 1), axis=0)
            assert len(pairs) == len(np.unique(fine))
        assert l1.max() < 3 and l2.max() < 2
    clusters = json.loads((tmp_path / "a" / "clusters" / "clusters.json").read_text())
    assert clusters["image"]["train_rows"] == 800  # k * sample_per_centroid rows, not the whole dataset
    assert [lv["k"] for lv in clusters["image"]["levels"]] == [3, 2]
    assert sum(clusters["image"]["levels"][0]["sizes"]) == 2400
    # Determinism: same spec and inputs, another run directory: the same centroids and assignments.
    rebalance.run(spec, tmp_path / "b")
    for side in ("image", "text"):
        np.testing.assert_array_equal(
            np.load(tmp_path / "a" / "clusters" / f"{side}_centroids.npy"),
            np.load(tmp_path / "b" / "clusters" / f"{side}_centroids.npy"),
        )
    assert read_parts(tmp_path / "b" / "assignments").equals(table)
    assert a.report["clusters"]["image"]["k"] == 8


def test_joint_concepts_beat_each_side_and_balance(tmp_path, ray_local):
    """cluster.joint on rows whose image and text carry independent noise (each side alone recovers the 8
    concepts with NMI ~0.65-0.75): k-means on the joint vectors recovers them better than either side
    (0.94 here), and joint_cluster is assigned, saved and balanced like the other cluster marginals."""
    truth = write_mixture(tmp_path / "data", noise=2.0)
    spec = spec_for(tmp_path / "data", joint={"k": 8})
    spec["balance"] = {"marginals": ["joint_cluster"], "relax": "exact"}
    spec["report"] = {"html": False, "spectra_by": ["joint_cluster"]}
    result = rebalance.run(spec, tmp_path / "out")
    table = read_parts(tmp_path / "out" / "assignments")
    scores = {s: normalized_mutual_info_score(truth, table.column(f"{s}_cluster").to_numpy()) for s in
              ("image", "text", "joint")}  # fmt: skip
    assert scores["joint"] > max(scores["image"], scores["text"]) + 0.1, scores
    clusters = json.loads((tmp_path / "out" / "clusters" / "clusters.json").read_text())
    assert (
        clusters["joint"]["d"] == 64
        and clusters["joint"]["k"] == 8
        and sum(clusters["joint"]["sizes"]) == 2400
    )
    centroids = np.load(tmp_path / "out" / "clusters" / "joint_centroids.npy")
    np.testing.assert_allclose(
        np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5
    )  # spherical, unit joint rows
    assert table.column("joint_distance").type == pa.float32()
    assert result.report["balance"]["final_marginal_error"] < 1e-6
    assert set(result.report["spectra"]["joint_cluster"]) == {"image", "text"}


def test_joint_needs_both_sides_and_its_marginal_needs_it(tmp_path):
    write_mixture(tmp_path / "data")
    spec = spec_for(tmp_path / "data")
    spec["balance"] = {"marginals": ["joint_cluster"]}
    with pytest.raises(rebalance.SpecError, match="joint_cluster with cluster.joint"):
        rebalance.run(spec, tmp_path / "out")
    (tmp_path / "image_only").mkdir()
    table = pq.read_table(tmp_path / "data" / "part-00000.parquet", columns=["key", "image", "label"])
    pq.write_table(table, tmp_path / "image_only" / "part-00000.parquet")
    spec = spec_for(tmp_path / "image_only", joint={"k": 4})
    with pytest.raises(rebalance.SpecError, match="cluster.joint"):  # before any embedding work
        rebalance.run(spec, tmp_path / "out2")
    assert not (tmp_path / "out2" / "embeddings").exists()


def test_balancing_on_a_coarse_level(tmp_path, ray_local):
    write_mixture(tmp_path / "data")
    spec = spec_for(tmp_path / "data", levels=[3])
    spec["balance"] = {"marginals": ["image_cluster_1"], "relax": "exact"}
    result = rebalance.run(spec, tmp_path / "out")
    w = result.weights
    labels, weights = w.column("image_cluster_1").to_numpy(), w.column("weight").to_numpy()
    np.testing.assert_allclose(np.bincount(labels, weights=weights) / len(weights), 1 / 3, atol=1e-9)


def test_level_marginal_needs_the_level(tmp_path):
    write_mixture(tmp_path / "data", n=50)
    spec = spec_for(tmp_path / "data", levels=[3])
    spec["balance"] = {"marginals": ["image_cluster_2"]}
    with pytest.raises(rebalance.SpecError, match="image_cluster_2"):
        rebalance.Spec.from_dict(spec)
    with pytest.raises(rebalance.SpecError, match=r"cluster.levels\[0\]"):
        rebalance.Spec.from_dict(spec_for(tmp_path / "data", levels=[9]))
    with pytest.raises(rebalance.SpecError, match=r"cluster.resampling_steps"):
        rebalance.Spec.from_dict(spec_for(tmp_path / "data", levels=[3], resampling_steps=-1))


def test_nan_vectors_are_rejected_with_their_keys(tmp_path, ray_local):
    write_mixture(tmp_path / "data", n=600, nan_rows=(3, 400))
    result = rebalance.run(spec_for(tmp_path / "data"), tmp_path / "out")
    rejected = result.manifest["stages"]["embed"]["rejected"]
    assert sorted(r["key"] for r in rejected["rows"]) == ["r00003", "r00400"]
    assert rejected["by_reason"] == {"image:non-finite or zero vector": 2}
    keys = read_parts(tmp_path / "out" / "assignments").column("key").to_pylist()
    assert len(keys) == 598 and "r00003" not in keys


def test_too_few_rows_or_distinct_vectors(tmp_path, ray_local):
    write_mixture(tmp_path / "data", n=6)
    # The Parquet footers declare 6 rows: refused before Ray starts, with nothing created.
    with pytest.raises(rebalance.SpecError, match=r"'cluster.image.k': exceeds the 6 rows the dataset's"):
        rebalance.run(spec_for(tmp_path / "data"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # 9 declared rows of which 2 are rejected while embedding: the cluster stage finds 7 < 8.
    write_mixture(tmp_path / "data9", n=9, nan_rows=(0, 5))
    with pytest.raises(ClusterError, match=r"cluster.image.k = 8 exceeds the 7 embedded rows"):
        rebalance.run(spec_for(tmp_path / "data9"), tmp_path / "out")
    same = tmp_path / "same"
    same.mkdir()
    vec = pa.FixedSizeListArray.from_arrays(pa.array(np.ones(40 * 4, np.float32)), 4)
    pq.write_table(
        pa.table({"key": [str(i) for i in range(40)], "image": vec, "text": vec}), same / "p.parquet"
    )
    with pytest.raises(ClusterError, match=r"exceeds the 1 distinct image vectors"):
        rebalance.run({**spec_for(same), "data": {"path": str(same)}}, tmp_path / "out2")


class _InlinePool:
    """Runs ``pool.map("call", items)`` in this process, as the actors would."""

    def map(self, method, items, desc=""):
        return [fn(*args) for fn, *args in items]


def test_sampling_and_assignment_paths_agree(tmp_path):
    """The two sampling paths (actors with a priority threshold, or the driver reading everything) give the
    bottom-m rows of the old per-part merge, and the driver's assignment equals the actors' part by part."""
    write_mixture(tmp_path / "data", n=900, shards=3)
    paths = [str(p) for p in sorted((tmp_path / "data").glob("*.parquet"))]
    sides = ["image", "text"]
    keys, positions, everything = cluster._read_everything(paths, sides, seed=3)
    for m in (100, 450, 899):
        merged = cluster._merge_samples(
            [cluster.sample_part(p, sides, m, 3) for p in paths], m, {"image": m, "text": m // 2}
        )
        threshold = cluster._sample_threshold(_InlinePool(), paths, m, 3)
        parts = [cluster.sample_part(p, sides, m, 3, threshold) for p in paths]
        assert sum(len(pr) for pr, _ in parts) == m  # only the sample's rows are shipped
        sampled = cluster._merge_samples(parts, m, {"image": m, "text": m // 2})
        for side, n in (("image", m), ("text", m // 2)):
            np.testing.assert_array_equal(sampled[side], merged[side])
            np.testing.assert_array_equal(everything[side][:n], merged[side])
    rng = np.random.default_rng(0)
    centroids = {s: rng.normal(size=(8, 32)).astype(np.float32) for s in sides}
    parents = {"image": [np.array([0, 1, 2, 0, 1, 2, 0, 1])]}
    items = list(enumerate(paths))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    by_actor = [cluster.assign_part(p, str(tmp_path / "a"), i, centroids, parents) for i, p in items]
    by_driver = cluster._assign_in_driver(
        items, str(tmp_path / "b"), keys, positions, everything, centroids, parents
    )
    assert by_actor == by_driver
    assert read_parts(tmp_path / "a").equals(read_parts(tmp_path / "b"))
