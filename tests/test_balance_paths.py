"""The balance stage's two exact paths (cells on the driver, rows on actors) and its soft labels, end to end
on the demo run directory."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from ot.bregman import sinkhorn_log

import rebalance
from rebalance.data.parts import read_parts
from rebalance.data.readers import vector_matrix
from rebalance.stages.balance import BalanceError


def _balance(run, balance: dict) -> tuple[dict[str, float], dict]:
    spec = rebalance.Spec.from_yaml(run / "spec.yaml").to_dict()
    spec["balance"] = {"relax": "exact", **balance}  # the exact problem unless the case relaxes it
    result = rebalance.run(spec, run)
    w = result.weights
    record = json.loads((run / "balance.json").read_text())
    return dict(zip(w.column("key").to_pylist(), w.column("weight").to_numpy(), strict=True)), record


@pytest.mark.parametrize(
    "balance",
    [
        {"marginals": ["image_cluster", "source"], "tol": 1e-10},
        {"marginals": ["image_cluster", "text_cluster", "source"], "iterations": 7, "max_weight": 4.0},
        {"marginals": ["label", "image_cluster"], "target": {"power": 0.5}, "iterations": 50},
        {
            "marginals": ["image_cluster", "text_cluster", "source"],
            "relax": {"image_cluster": 1.0, "text_cluster": 3.0},
            "tol": 1e-10,
        },
    ],
    ids=["two-marginals", "three-fixed-clipped", "carried-tempered", "relaxed"],
)
def test_row_path_gives_the_cell_paths_weights(demo_copy, ray_local, balance):
    cell, cell_record = _balance(demo_copy, {**balance, "path": "cell"})
    # auto with a tiny cell budget must switch to the row path by itself, and say so
    rows, row_record = _balance(demo_copy, {**balance, "max_cells": 10})
    assert cell_record["path"] == "cell" and row_record["path"] == "rows"
    assert "max_cells" in row_record["path_reason"]
    assert cell.keys() == rows.keys()
    keys = sorted(cell)
    np.testing.assert_allclose([rows[k] for k in keys], [cell[k] for k in keys], rtol=1e-9, atol=0)
    assert row_record["passes"] == cell_record["passes"]
    np.testing.assert_allclose(
        [list(e.values()) for e in row_record["marginal_error_per_iteration"]],
        [list(e.values()) for e in cell_record["marginal_error_per_iteration"]],
        rtol=1e-6,
        atol=1e-13,
    )
    for name in ("ess", "max_weight_value", "min_weight_value", "mean_weight"):
        assert row_record[name] == pytest.approx(cell_record[name], rel=1e-9)
    assert row_record["weight_histogram"]["rows"] == cell_record["weight_histogram"]["rows"]
    for a, b in zip(row_record["joint"], cell_record["joint"], strict=True):
        np.testing.assert_allclose(a["singular_values"], b["singular_values"], rtol=1e-9, atol=1e-12)
    # ESS and the largest weight recomputed from the weights themselves
    w = np.array([cell[k] for k in keys])
    assert cell_record["ess"] == pytest.approx(w.sum() ** 2 / (w**2).sum(), rel=1e-9)
    assert cell_record["max_weight_value"] == pytest.approx(w.max(), rel=1e-12)
    assert w.mean() == pytest.approx(1.0, abs=1e-12)


def test_soft_labels_match_pot_and_meet_the_column_marginal(demo_copy, ray_local):
    spec = rebalance.Spec.from_yaml(demo_copy / "spec.yaml").to_dict()
    k = spec["cluster"]["image"]["k"]
    soft = {"side": "image", "temperature": 0.1, "iterations": "auto", "top_k": k}
    _, record = _balance(demo_copy, {"marginals": ["image_cluster"], "tol": 1e-9, "soft": soft})
    assert record["soft"]["converged"] and record["soft"]["column_error_per_iteration"][-1] < 1e-9
    weights = read_parts(demo_copy / "weights")
    emb = read_parts(demo_copy / "embeddings").select(["key", "image"])
    order = {key: i for i, key in enumerate(emb.column("key").to_pylist())}
    rows = [order[key] for key in weights.column("key").to_pylist()]
    x = vector_matrix(emb.column("image").combine_chunks())[rows].astype(np.float64)
    centroids = np.load(demo_copy / "clusters" / "image_centroids.npy").astype(np.float64)
    sizes = np.bincount(weights.column("image_cluster").to_numpy(), minlength=k)
    pi = (sizes > 0) / (sizes > 0).sum()  # uniform over the non-empty clusters
    n = len(rows)
    # Independent reference: POT's log-domain Sinkhorn on the cost -S with regularisation T
    plan = sinkhorn_log(np.full(n, 1 / n), pi, -(x @ centroids.T), reg=0.1, numItermax=5000, stopThr=1e-12)
    idx = np.stack(weights.column("soft_clusters").to_numpy(zero_copy_only=False))
    probs = np.stack(weights.column("soft_probs").to_numpy(zero_copy_only=False)).astype(np.float64)
    codes = np.zeros((n, k))
    np.put_along_axis(codes, idx.astype(np.int64), probs, axis=1)
    np.testing.assert_allclose(codes, n * plan, atol=2e-6)
    np.testing.assert_allclose(codes.sum(axis=0) / n, pi, atol=1e-6)
    assert (np.diff(probs, axis=1) <= 0).all()  # by decreasing probability


def test_soft_top_k_keeps_the_largest_codes(demo_copy, ray_local):
    soft = {"side": "text", "temperature": 0.05, "iterations": 3, "top_k": 2}
    _, record = _balance(demo_copy, {"marginals": ["text_cluster"], "soft": soft})
    assert record["soft"]["passes"] == 3 and len(record["soft"]["column_error_per_iteration"]) == 4
    table = pq.read_table(demo_copy / "weights" / "part-00000.parquet")
    kind = table.schema.field("soft_clusters").type
    assert kind.list_size == 2 and str(kind.value_type) == "int32"
    probs = np.stack(table.column("soft_probs").to_numpy(zero_copy_only=False))
    assert ((probs > 0) & (probs <= 1)).all() and (probs.sum(axis=1) <= 1 + 1e-6).all()


def test_soft_on_an_absent_side_or_too_many_labels_is_refused(demo_copy, ray_local):
    spec = rebalance.Spec.from_yaml(demo_copy / "spec.yaml").to_dict()
    k = spec["cluster"]["image"]["k"]
    spec["balance"]["soft"] = {"top_k": k + 1}
    with pytest.raises(BalanceError, match="top_k"):
        rebalance.run(spec, demo_copy)
    with pytest.raises(rebalance.SpecError, match="balance.soft.temperature"):
        rebalance.Spec.from_dict({**spec, "balance": {"soft": {"temperature": 0}}})


def test_min_ess_finds_the_strongest_balancing_above_the_floor(demo_copy, ray_local):
    # image x text clusters toward uniform cannot be met on the demo's support: the exact attempt is
    # skipped and the search relaxes both marginals to the strongest strength above the floor
    floor = 0.8
    _, record = _balance(
        demo_copy, {"marginals": ["image_cluster", "text_cluster"], "tol": 1e-9, "min_ess": floor}
    )
    search = record["min_ess"]
    assert record["feasibility"]["flow"]["feasible"] is False
    assert search["met"] and isinstance(search["rho"], float) and record["converged"]
    assert (
        record["ess_fraction"] == pytest.approx(search["ess_fraction"], rel=1e-9)
        and record["ess_fraction"] >= floor
    )
    frontier = search["frontier"]
    assert frontier[0]["rho"] == pytest.approx(1e-3) and "exact" not in [p["rho"] for p in frontier]
    chosen = [p for p in frontier if p["rho"] == search["rho"]]
    assert chosen and chosen[0]["max_weight"] == pytest.approx(record["max_weight_value"], rel=1e-9)
    assert chosen[0]["ess"] == pytest.approx(record["ess_fraction"], rel=1e-9)
    # every stronger strength tried fell below the floor, and one did
    stronger = [p["ess"] for p in frontier if p["rho"] > search["rho"]]
    assert stronger and all(e < floor for e in stronger)
    assert set(frontier[1]["marginal_error"]) == {"image_cluster", "text_cluster"}


def test_bounded_weights_end_to_end_and_served_alike(demo_copy, ray_local):
    from rebalance.serve.weigher import Sample, Weigher

    balance = {
        "marginals": ["image_cluster", "text_cluster"],
        "relax": 1.0,
        "bounds": [0.5, 2.0],
        "tol": 1e-9,
    }
    weights, record = _balance(demo_copy, balance)
    w = np.array(list(weights.values()))
    assert record["converged"] and record["path"] == "cell"
    assert (w >= 0.5 - 1e-12).all() and (w <= 2.0 + 1e-12).all() and w.mean() == pytest.approx(1.0, abs=1e-9)
    bounds = record["bounds"]
    assert (bounds["lo"], bounds["hi"]) == (0.5, 2.0) and record["scaling"]["bounds"] == [0.5, 2.0]
    assert bounds["rows_at_hi"] == pytest.approx((w >= 2.0 - 1e-9).mean()) and bounds["rows_at_hi"] > 0
    # the endpoint computes every row's weight from the balance.json scaling alone: the same weights
    emb = read_parts(demo_copy / "embeddings")
    image, text = (vector_matrix(emb.column(side).combine_chunks()) for side in ("image", "text"))
    samples = [
        Sample(key=k, image_embedding=a.tolist(), text_embedding=b.tolist())
        for k, a, b in zip(emb.column("key").to_pylist(), image, text, strict=True)
    ]
    weigher = Weigher(demo_copy, load_model=False)
    served = [r for s in range(0, len(samples), 500) for r in weigher.weigh(samples[s : s + 500])]
    np.testing.assert_allclose([r["weight"] for r in served], [weights[r["key"]] for r in served], rtol=1e-12)
    # exact targets outside the bounds fail before any pass, naming the values and the weight they need
    with pytest.raises(BalanceError, match=r"balance.bounds \[0.9, 1.1\].*'image_cluster'.*needs"):
        _balance(demo_copy, {"marginals": ["image_cluster"], "bounds": [0.9, 1.1]})
    # the row path has no cell table to bound
    with pytest.raises(BalanceError, match=r"cells in all > balance.max_cells = 10"):
        _balance(demo_copy, {**balance, "max_cells": 10})
