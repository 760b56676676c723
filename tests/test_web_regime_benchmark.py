"""Smoke test of ``benchmarks/web_regime.py --quick`` (a 6,000-row web-regime pool, 2 seeds): the
structure of its results and the invariants of its arms, not their values. Run in-process through the
benchmark's entry point, ``main(["--quick", ...])``; it starts its own local Ray."""

import json

import numpy as np
import pytest
from bench import load_benchmark

from rebalance.data.synthetic import LABELS

# chi-square with 23 degrees of freedom, upper 0.1 % point: the draws are deterministic (seeded), so this
# bound decides once whether they follow the intended distribution within sampling error
CHI2_23_999 = 49.73


def _chi2(observed, expected_share):
    expected = np.sum(observed) * np.asarray(expected_share)
    return float(((np.asarray(observed) - expected) ** 2 / expected).sum())


@pytest.mark.slow
@pytest.mark.ray
def test_quick_web_regime_benchmark(tmp_path):
    module = load_benchmark("web_regime")
    results = module.main(["--quick", "--out", str(tmp_path / "web")])
    arms = ["plain", "oracle", *module.SPECS, "logit-adjusted"]
    assert set(results["summary"]) == set(arms)
    assert set(results["paired_difference_to_plain"]) == set(arms) - {"plain"}
    assert set(results["paired_difference_to_default"]) == set(arms) - {module.DEFAULT_ARM}
    seeds = results["config"]["seeds"]
    assert len(seeds) == 2 and results["config"]["rows"] == 6000
    draws = results["config"]["draws"]
    assert draws == 600  # 10 % of the pool
    counts = np.array([results["pool"]["counts"][lab] for lab in LABELS])
    assert counts.sum() == 6000 and counts[0] > 40 * counts[-1]
    # the oracle's weights give every concept 1/24 of the mass, and its draws are uniform within sampling error
    assert np.allclose(results["concept_share"]["oracle"], 1 / 24)
    # plain draws follow the pool's concept frequencies
    assert np.allclose(results["concept_share"]["plain"], counts / counts.sum())
    by = {(r["arm"], r["seed"]): r for r in results["runs"]}
    assert len(by) == len(arms) * len(seeds)
    for seed in seeds:
        assert _chi2(by["oracle", seed]["drawn_per_concept"], np.full(24, 1 / 24)) < CHI2_23_999
        assert _chi2(by["plain", seed]["drawn_per_concept"], counts / counts.sum()) < CHI2_23_999
        # logit adjustment changes the probe's loss only: same draws, same CLIP heads as plain
        for m in ("zeroshot_balanced", "retrieval_r1"):
            assert by["logit-adjusted", seed][m] == by["plain", seed][m]
        assert by["logit-adjusted", seed]["drawn_per_concept"] == by["plain", seed]["drawn_per_concept"]
    total_renders = sum(results["pool"]["renders"].values())
    for r in results["runs"]:
        assert sum(r["drawn_per_concept"]) == draws
        assert 0 < r["distinct_renders_drawn"] <= min(draws, total_renders)
        for m in module.METRICS:
            assert 0.0 <= r[m] <= 1.0
        assert r["probe_worst"] == min(r["probe_per_class"]) <= r["probe_balanced"]
        assert np.isclose(r["probe_balanced"], np.mean(r["probe_per_class"]))
    # the oracle's stream is closer to uniform over the concepts than plain's
    for seed in seeds:
        assert by["oracle", seed]["draw_tv_to_uniform"] < by["plain", seed]["draw_tv_to_uniform"]
    assert (tmp_path / "web" / "results.json").is_file()
    _check_balance_arms(results, tmp_path / "web")


def _check_balance_arms(results, out):
    """The balance arms' own invariants: relaxed arms converge (a relaxed problem always has a solution) with
    a larger ESS than the exact arm over the same marginals (for one marginal the relaxed weights are the
    exact ones to the power rho / (1 + rho), so the ESS can only rise); dedup meets the coarse level exactly
    and weighs the rows of a near-duplicate group in one coarse cluster alike; MetaCLIP curation moves the
    concept mix toward uniform."""
    from rebalance.data.parts import read_parts

    b = results["balance"]
    for relaxed, exact in (
        ("image-text-rho1", "image-text"),
        ("image-text-rho3", "image-text"),
        ("levels-rho1", "levels"),
    ):
        assert b[relaxed]["converged"] is True
        assert b[relaxed]["ess_fraction"] > b[exact]["ess_fraction"]
    assert b["image-text-rho1"]["ess_fraction"] > b["image-text-rho3"]["ess_fraction"]
    assert b["dedup"]["converged"] is True and b["metaclip"]["converged"] is True
    # the spec's own defaults: k auto = round(sqrt(6000)) = 77 image clusters (text: at most that, the
    # distinct captions of the sample bound it), both cluster marginals relaxed with rho 1 (relax: auto)
    clusters = json.loads((out / "weights-default" / "clusters.json").read_text())
    assert clusters["image"]["k"] == 77 and 1 < clusters["text"]["k"] <= 77 and "joint" not in clusters
    record = json.loads((out / "weights-default" / "balance.json").read_text())
    assert record["marginals"] == ["image_cluster", "text_cluster"]
    assert record["relax"] == {"image_cluster": 1.0, "text_cluster": 1.0}
    assert b["default"]["converged"] is True
    weights = read_parts(out / "weights-dedup", columns=["key", "weight", "dup_group"])
    assignments = read_parts(out / "run" / "assignments", columns=["key", "image_cluster_1"])
    assert weights.column("key").to_pylist() == assignments.column("key").to_pylist()
    w = weights.column("weight").to_numpy()
    level = assignments.column("image_cluster_1").to_numpy()
    mass = np.bincount(level, weights=w)[np.unique(level)]
    assert np.allclose(mass, mass.mean(), rtol=1e-4)
    cells = {}
    for g, c, wi in zip(weights.column("dup_group").to_pylist(), level.tolist(), w.tolist(), strict=True):
        cells.setdefault((g, c), []).append(wi)
    assert len(cells) < len(w)  # some rows are near-copies of others
    assert all(np.ptp(v) <= 1e-9 * max(v) for v in cells.values())
    share = results["concept_share"]
    assert share["metaclip"][0] < share["plain"][0] and share["metaclip"][-1] > share["plain"][-1]
    assert results["concept_tv"]["metaclip"] < results["concept_tv"]["plain"]


def test_every_arm_is_the_spec_it_names(tmp_path):
    """Every arm, the ``SWEEP`` ones included, builds a valid spec at the full benchmark's settings (k 64,
    level 24), and the ``SPEC_DEFAULTS`` arms keep the spec's own cluster and balance defaults."""
    from rebalance.spec import Spec

    module = load_benchmark("web_regime")

    def spec(name):
        return Spec.from_dict(
            module.pipeline_spec(tmp_path, module.ARMS[name], 64, 24, module.CARRY, 100_000)
        )

    for name, arm in module.ARMS.items():
        s = spec(name)
        if arm.get(module.SPEC_DEFAULTS):
            assert s.cluster.image.k == s.cluster.text.k == "auto" and s.cluster.joint is None
            assert s.balance.allow_partial is False and s.balance.tol == 1e-6
        else:
            assert s.cluster.image.k == 64 and s.balance.relax_for("image_cluster") in (None, 1.0, 3.0)
    default = spec("default")
    assert default.cluster.levels == () and default.balance.marginals == ("image_cluster", "text_cluster")
    assert default.balance.relax == "auto" and default.balance.relax_for("image_cluster") == 1.0
    assert spec("default-level").balance.marginals == ("image_cluster_1", "text_cluster_1")
    assert spec("default-level").cluster.levels == (18,)
    for k in module.SWEEP_LEVELS:
        assert spec(f"levels-{k}").cluster.levels == (k,)
        assert spec(f"levels-{k}").balance.relax_for("image_cluster_1") is None
        assert spec(f"levels-{k}-rho1").balance.relax_for("image_cluster_1") == 1.0
