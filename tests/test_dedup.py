"""Near-duplicate groups: the blocked kernel against a brute-force reference, and the stage end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import rebalance
from rebalance.api import stage_fingerprints
from rebalance.data.parts import read_parts
from rebalance.kernels.dedup import component_roots, duplicate_roots, similar_pairs
from rebalance.runtime.manifest import fingerprint
from rebalance.spec import Spec, SpecError

ROOT = Path(__file__).resolve().parents[1]


def planted(n_unique=60, copies=(3, 2, 2, 4), d=16, noise=1e-3, seed=0):
    """Random unit vectors plus near-copies of a few of them; returns (x, true root of every row)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n_unique, d))
    rows, roots = [base], list(range(n_unique))
    for source, c in enumerate(copies):
        rows.append(base[source] + noise * rng.normal(size=(c, d)))
        roots += [source] * c
    x = np.concatenate(rows)
    perm = rng.permutation(len(x))
    x, roots = x[perm], np.asarray(roots)[perm]
    # the expected root: the smallest row index among the rows of the same source
    smallest = {r: np.flatnonzero(roots == r).min() for r in np.unique(roots)}
    return x.astype(np.float32), np.array([smallest[r] for r in roots])


def brute_force_roots(x, threshold):
    """O(n^2) reference: the full cosine matrix and a plain union-find, smallest index as the root."""
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = u.astype(np.float64) @ u.T.astype(np.float64)
    parent = list(range(len(x)))

    def find(a):
        while parent[a] != a:
            a = parent[a]
        return a

    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            if sim[i, j] >= threshold:
                a, b = find(i), find(j)
                parent[max(a, b)] = min(a, b)
    return np.array([find(i) for i in range(len(x))])


@pytest.mark.parametrize("block", [7, 64, 4096])
def test_kernel_matches_brute_force_and_the_planted_groups(block):
    x, truth = planted()
    roots = duplicate_roots(x, 0.95, block=block)
    np.testing.assert_array_equal(roots, brute_force_roots(x, 0.95))
    np.testing.assert_array_equal(roots, truth)


def test_chains_join_and_threshold_is_inclusive():
    # a ~ b and b ~ c at cos 0.8, a and c at cos 0.28: one group at threshold 0.8, none above
    t = np.arccos(0.8)
    x = np.array([[1, 0], [np.cos(t), np.sin(t)], [np.cos(2 * t), np.sin(2 * t)], [-1, 0]])
    i, j = similar_pairs(x, 0.8 - 1e-6)
    assert list(zip(i.tolist(), j.tolist(), strict=True)) == [(0, 1), (1, 2)]
    np.testing.assert_array_equal(duplicate_roots(x, 0.8 - 1e-6, block=1), [0, 0, 0, 3])
    np.testing.assert_array_equal(duplicate_roots(x, 0.81), [0, 1, 2, 3])


def test_component_roots_on_a_random_graph_against_brute_force():
    rng = np.random.default_rng(3)
    n = 40
    i, j = rng.integers(0, n, 30), rng.integers(0, n, 30)
    roots = component_roots(n, i, j)
    adjacency = np.eye(n, dtype=bool)
    adjacency[i, j] = adjacency[j, i] = True
    reach = adjacency.copy()
    for _ in range(n):
        reach = (reach.astype(int) @ adjacency.astype(int)) > 0
    np.testing.assert_array_equal(roots, [np.flatnonzero(reach[r]).min() for r in range(n)])


def write_planted(path, n_unique=300, copies=(1, 2, 4, 1, 2), d=32, shards=3, seed=0):
    """An embeddings-format dataset of random vectors (cosine between any two ~ N(0, 1/d)) with near-copies
    of the first rows (copies[i] extra rows of row i, noise 1e-2 per coordinate: cosine ~ 0.9999), shuffled
    over the keys; returns {key: expected dup_group} (the smallest key of the planted group)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(n_unique, d))
    source = list(range(n_unique))
    for s, c in enumerate(copies):
        image = np.vstack([image, image[s] + 1e-2 * rng.normal(size=(c, d))])
        source += [s] * c
    n = len(source)
    order = rng.permutation(n)  # row order[r] gets key r
    keys = np.empty(n, dtype=object)
    keys[order] = [f"r{r:05d}" for r in range(n)]
    source = np.asarray(source)
    smallest = {s: min(keys[source == s]) for s in np.unique(source)}
    text = rng.normal(size=(n, d))
    path.mkdir(parents=True)
    for part, rows in enumerate(np.array_split(rng.permutation(n), shards)):
        table = pa.table({
            "key": list(keys[rows]),
            "image": pa.FixedSizeListArray.from_arrays(pa.array(image[rows].astype(np.float32).ravel()), d),
            "text": pa.FixedSizeListArray.from_arrays(pa.array(text[rows].astype(np.float32).ravel()), d),
        })  # fmt: skip
        pq.write_table(table, path / f"part-{part:05d}.parquet")
    return {k: smallest[s] for k, s in zip(keys, source, strict=True)}


def planted_spec(data, **over):
    spec = {
        "data": {"path": str(data)},
        "cluster": {"image": {"k": 4}, "text": {"k": 4}, "sample_per_centroid": 200},
        "dedup": {"threshold": 0.95},
        "balance": {"marginals": ["dup_group"]},
        "report": {"html": False, "spectra_by": []},
    }
    for section, values in over.items():
        spec[section] = {**spec[section], **values}
    return spec


@pytest.mark.slow
def test_stage_through_the_cli_finds_the_planted_groups_and_gives_each_one_unit(tmp_path):
    truth = write_planted(tmp_path / "data")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(planted_spec(tmp_path / "data")))
    proc = subprocess.run(
        [sys.executable, "-m", "rebalance.cli", "run", str(tmp_path / "spec.yaml"), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assignments = read_parts(tmp_path / "o" / "assignments").to_pandas()
    got = dict(zip(assignments["key"], assignments["dup_group"], strict=True))
    assert got == truth
    sizes = assignments.groupby("dup_group")["key"].transform("size")
    assert (assignments["dup_size"] == sizes).all()
    weights = read_parts(tmp_path / "o" / "weights").to_pandas()
    per_group = weights.groupby("dup_group")["weight"].sum()
    groups = len(set(truth.values()))
    assert len(per_group) == groups == 300
    np.testing.assert_allclose(per_group, len(truth) / groups, rtol=1e-9)  # one unit each, mean weight 1
    report = json.loads((tmp_path / "o" / "report" / "report.json").read_text())
    dup = report["duplicates"]
    assert dup["groups"] == 300 and dup["duplicated_rows"] == 15 and dup["largest_group"] == 5
    assert dup["groups_by_size"] == {"1": 295, "2": 2, "3": 2, "5": 1}


def test_groups_combine_with_a_cluster_marginal_on_the_actor_path_and_both_ipf_paths(tmp_path, ray_local):
    truth = write_planted(tmp_path / "data", seed=1)
    runs = {}
    for path in ("cell", "rows"):  # the second run redoes the balance stage only
        spec = planted_spec(
            tmp_path / "data",
            cluster={"sample_per_centroid": 20},  # 80 < 312 rows: sampling, assignment and dedup on actors
            balance={"marginals": ["dup_group", "image_cluster"], "path": path, "relax": "exact"},
        )
        rebalance.run(spec, tmp_path / "o")
        runs[path] = read_parts(tmp_path / "o" / "weights").to_pandas()
    weights = runs["rows"]
    np.testing.assert_allclose(weights["weight"], runs["cell"]["weight"], rtol=1e-9)
    assert dict(zip(weights["key"], weights["dup_group"], strict=True)) == truth
    # image_cluster is balanced exactly; inside a group (which lies in one cluster) every row weighs the same
    per_cluster = weights.groupby("image_cluster")["weight"].sum()
    np.testing.assert_allclose(per_cluster, len(weights) / 4, rtol=1e-6)
    spread = weights.groupby("dup_group")["weight"].agg(["min", "max"])
    np.testing.assert_allclose(spread["min"], spread["max"], rtol=1e-12)
    # and a group weighs what one row of its cluster without a copy weighs: one unit of its cluster's mass
    weights["unit"] = weights["weight"] * weights.groupby("dup_group")["key"].transform("size")
    unit = weights.groupby("image_cluster")["unit"].agg(["min", "max"])
    np.testing.assert_allclose(unit["min"], unit["max"], rtol=1e-9)
    np.testing.assert_allclose(weights["weight"].mean(), 1.0, rtol=1e-12)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"balance": {"marginals": ["dup_group"]}}, "balance.marginals"),
        ({"dedup": {"threshold": 1.5}}, "dedup.threshold"),
        ({"dedup": {"block": 0}}, "dedup.block"),
        ({"dedup": {"side": "joint"}}, "dedup.side"),
        (
            {
                "dedup": {},
                "balance": {"marginals": ["dup_group"], "targets": {"dup_group": {"weights": {"a": 1}}}},
            },
            "balance.targets.dup_group",
        ),
        ({"dedup": {}, "report": {"spectra_by": ["dup_group"]}}, "report.spectra_by"),
    ],
)
def test_bad_dedup_specs_name_the_field(tmp_path, change, field):
    with pytest.raises(SpecError, match=f"spec field '{field}'"):
        Spec.from_dict({"data": {"path": str(tmp_path)}, **change})


def test_dedup_joins_the_cluster_fingerprint_only_when_set(tmp_path):
    plain = Spec.from_dict({"data": {"path": str(tmp_path)}})
    dedup = Spec.from_dict({"data": {"path": str(tmp_path)}, "dedup": {"threshold": 0.9}})
    assert Spec.from_dict(dedup.to_dict()) == dedup
    a, b = stage_fingerprints(plain, []), stage_fingerprints(dedup, [])
    assert a["embed"] == b["embed"] and a["cluster"] != b["cluster"]
    assert a["cluster"] == fingerprint("cluster", a["embed"], plain.to_dict()["cluster"])  # as before dedup


def test_dedup_balances_groups_by_default(tmp_path):
    spec = Spec.from_dict({"data": {"path": str(tmp_path)}, "dedup": {}})
    assert spec.balance.marginals == ("dup_group", "image_cluster", "text_cluster")
    assert Spec.from_dict(spec.to_dict()) == spec
