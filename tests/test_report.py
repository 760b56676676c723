"""The report: streamed spectra against a direct computation on the gathered rows, joint diagnostics, rebuild."""

import functools
import json
import logging
import shutil

import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

import rebalance
from rebalance.data.parts import read_parts


def _gathered(run):
    emb = read_parts(run / "embeddings")
    x = emb.column("image").combine_chunks().flatten().to_numpy().reshape(emb.num_rows, -1).astype(np.float64)
    groups = read_parts(run / "assignments").column("image_cluster").to_numpy()
    weights = read_parts(run / "weights").column("weight").to_numpy()
    return x, groups, weights


def test_spectra_match_a_direct_computation(demo_run):
    report = json.loads((demo_run / "report" / "report.json").read_text())
    entry = report["spectra"]["image_cluster"]["image"]
    assert entry["method"] == "moments" and entry["groups"] == 16 and entry["d"] == 64
    x, groups, weights = _gathered(demo_run)
    for g in range(16):
        rows = groups == g
        for phase, w in (("before", None), ("after", weights[rows])):
            cov = np.cov(x[rows], rowvar=False, bias=True, aweights=w)
            eigs = np.linalg.eigvalsh(cov)[::-1]
            top = np.array(entry[phase]["top_eigenvalues"][g])
            np.testing.assert_allclose(top, eigs[: top.size], rtol=1e-8, atol=1e-14)
            assert entry[phase]["trace"][g] == pytest.approx(np.trace(cov), rel=1e-9)
            p = eigs / eigs.sum()
            p = p[p > 0]
            assert entry[phase]["effective_rank"][g] == pytest.approx(
                np.exp(-(p * np.log(p)).sum()), rel=1e-8
            )
        assert entry["before"]["rows"][g] == rows.sum()
    # SQS: median-normalised eigenvalue ceil(d / 2).
    q = np.array(
        [np.linalg.eigvalsh(np.cov(x[groups == g], rowvar=False, bias=True))[::-1][31] for g in range(16)]
    )
    np.testing.assert_allclose(entry["before"]["sqs"], q / np.median(q), rtol=1e-7)
    assert entry["before"]["summary"]["worst_group"] == int(np.argmax(q))


def test_joint_singular_values_match_dense_svd(demo_copy, ray_local):
    spec = rebalance.Spec.from_yaml(demo_copy / "spec.yaml").to_dict()
    spec["balance"].update(marginals=["image_cluster", "text_cluster"], iterations=5)
    report = rebalance.run(spec, demo_copy).report
    (joint,) = report["joint"]
    assert joint["pair"] == ["image_cluster", "text_cluster"]
    a = read_parts(demo_copy / "assignments")
    table = np.zeros((16, 16))
    np.add.at(table, (a.column("image_cluster").to_numpy(), a.column("text_cluster").to_numpy()), 1)
    p = table / table.sum()
    s = np.linalg.svd(p / np.sqrt(np.outer(p.sum(1), p.sum(0))), compute_uv=False)
    np.testing.assert_allclose(joint["singular_values"], s[: len(joint["singular_values"])], atol=1e-10)
    assert joint["s2"] == pytest.approx(s[1])
    # Liu et al.'s worst-case factor from the independently computed s_2: 1, then s_2^(4k - 2). (With
    # k-means++ seeding some demo concepts form blocks of their own, so s_2 may be exactly 1.)
    factors = joint["variance_factor_per_iteration"]
    expected = [1.0] + [s[1] ** (4 * k - 2) for k in range(1, len(factors))]
    np.testing.assert_allclose(factors, expected, rtol=1e-9)


def test_report_rebuilds_without_the_dataset(demo_copy, ray_local):
    before = json.loads((demo_copy / "report" / "report.json").read_text())
    shutil.rmtree(demo_copy / "report")
    dataset = demo_copy / "dataset"
    moved = demo_copy.parent / "moved"
    spec = json.loads((demo_copy / "manifest.json").read_text())["spec"]
    # The copied manifest names the session's demo dataset; point it at a copy we then delete.
    spec["data"]["path"] = str(moved)
    manifest = json.loads((demo_copy / "manifest.json").read_text())
    manifest["spec"] = spec
    (demo_copy / "manifest.json").write_text(json.dumps(manifest))
    assert not moved.exists() and dataset.exists()
    result = rebalance.api.rebuild_report(demo_copy)
    after = result.report
    assert after["balance"] == before["balance"] and after["spectra"] == before["spectra"]
    # Without the input there are no thumbnails or captions; the numbers and chosen rows stay.
    assert "could not be read" in after["concepts"]["note"]
    for column, entry in after["concepts"]["columns"].items():
        for rec, old in zip(
            entry["concepts"], before["concepts"]["columns"][column]["concepts"], strict=True
        ):
            assert (
                rec["words"] == []
                and {**rec, "words": old["words"], "captions_read": old["captions_read"]} == old
            )
    assert (demo_copy / "report" / "report.html").is_file()
    assert result.manifest["stages"]["report"]["status"] == "complete"


def test_spectra_by_a_carried_column_that_is_not_a_marginal(demo_copy, ray_local):
    spec = rebalance.Spec.from_yaml(demo_copy / "spec.yaml").to_dict()
    spec["report"] = {"spectra_by": ["image_cluster", "source"], "html": True}
    result = rebalance.run(spec, demo_copy)
    entry = result.report["spectra"]["source"]
    assert set(entry) == {"image", "text"}
    emb = read_parts(demo_copy / "embeddings")
    sources = np.array(emb.column("source").to_pylist())
    assert entry["image"]["labels"] == sorted(set(sources))
    x = emb.column("text").combine_chunks().flatten().to_numpy().reshape(emb.num_rows, -1).astype(np.float64)
    for g, value in enumerate(entry["text"]["labels"]):
        cov = np.cov(x[sources == value], rowvar=False, bias=True)
        assert entry["text"]["before"]["trace"][g] == pytest.approx(np.trace(cov), rel=1e-9)
        assert entry["text"]["before"]["rows"][g] == (sources == value).sum()


def test_concept_cards_match_the_run_directory(demo_run):
    """Per-concept records against direct computations on the gathered parts: sizes and weights, the rows
    nearest the centroid (assignments distances) or the value's mean embedding, purity against the truth
    column, weight percentiles and heaviest rows, and the map's PCA."""
    concepts = json.loads((demo_run / "report" / "report.json").read_text())["concepts"]
    balance = json.loads((demo_run / "balance.json").read_text())
    emb, assignments = read_parts(demo_run / "embeddings"), read_parts(demo_run / "assignments")
    weights = read_parts(demo_run / "weights").column("weight").to_numpy()
    keys = np.array(emb.column("key").to_pylist())
    labels = np.array(emb.column("label").to_pylist())
    x, _, _ = _gathered(demo_run)
    assert concepts["truth"] == "label" and concepts["thumbnails"] == 8
    assert set(concepts["columns"]) == {"image_cluster", "text_cluster", "label", "source"}
    dist = balance["marginal_distributions"]["image_cluster"]
    groups = assignments.column("image_cluster").to_numpy()
    distance = assignments.column("image_distance").to_numpy()
    for rec in concepts["columns"]["image_cluster"]["concepts"]:
        rows = groups == int(rec["value"])
        assert rec["rows"] == rows.sum() and rec["card"]
        assert rec["weighted_rows"] == pytest.approx(weights[rows].sum(), rel=1e-12)
        assert rec["mean_weight"] == pytest.approx(weights[rows].mean(), rel=1e-12)
        assert rec["target"] == dist["target"][dist["values"].index(rec["value"])]
        nearest = np.lexsort((np.arange(rows.sum()), distance[rows]))[:6]
        assert rec["central_keys"] == keys[rows][nearest].tolist()
        assert len(rec["random_keys"]) == 2 and set(rec["random_keys"]) <= set(keys[rows]) - set(
            rec["central_keys"]
        )
        values, counts = np.unique(labels[rows], return_counts=True)
        assert rec["truth_value"] == values[np.argmax(counts)]
        assert rec["purity"] == pytest.approx(counts.max() / rows.sum())
        assert rec["words"] and min(rows.sum(), 24) <= rec["captions_read"] <= 30
    for rec in concepts["columns"]["label"]["concepts"]:  # a carried value: nearest its mean embedding
        rows = labels == rec["value"]
        d2 = ((x[rows] - x[rows].mean(axis=0)) ** 2).sum(axis=1)
        assert rec["central_keys"] == keys[rows][np.argsort(d2, kind="stable")[:6]].tolist()
        assert rec["purity"] == 1.0 and rec["truth_value"] == rec["value"]
        colour, shape = rec["value"].split()
        assert {w for w, _ in rec["words"][:2]} == {colour, shape}  # every caption names both
    pct = concepts["weights"]["percentiles"]
    assert concepts["weights"]["sample_rows"] == len(weights)
    for q in (0, 5, 50, 95, 100):
        assert pct[f"p{q}"] == pytest.approx(np.percentile(weights, q))
    heaviest = [r["weight"] for r in concepts["weights"]["largest"]]
    np.testing.assert_allclose(heaviest, np.sort(weights)[::-1][:12])
    points = concepts["map"]["points"]
    assert concepts["map"]["method"] == "pca" and len(points) == 1000
    chosen = np.array([np.flatnonzero(keys == p["key"])[0] for p in points])
    centred = x[chosen] - x[chosen].mean(axis=0)
    eigs, vecs = np.linalg.eigh(np.cov(centred, rowvar=False, bias=True))
    xy = np.array([[p["x"], p["y"]] for p in points])
    np.testing.assert_allclose(np.abs(xy), np.abs(centred @ vecs[:, [-1, -2]]), atol=1e-6)
    np.testing.assert_allclose([p["weight"] for p in points], weights[chosen])
    assert [p["concept"] for p in points] == [str(g) for g in groups[chosen]]


@pytest.mark.parametrize("method", ["moments", "sample"])
def test_partitioned_reduce_equals_a_driver_merge(demo_copy, ray_local, monkeypatch, method):
    """The spectra reduced by group partition across the actors equal those of the former implementation:
    every part's accumulators of all groups, merged on the driver in part order."""
    from rebalance.kernels.spectra import spectral_scores
    from rebalance.stages import report as stage

    d, groups = 64, 16
    if method == "sample":  # 16 groups x 5 rows x 66 values x 8 bytes: a 5-row sample per group
        monkeypatch.setattr(stage, "SPECTRA_BUDGET_BYTES", groups * 5 * (d + 2) * 8)
        group_bytes = 5 * (d + 2) * 8
    else:
        group_bytes = d * d * 8
    monkeypatch.setattr(stage, "SPECTRA_PARTITION_BYTES", 3 * group_bytes)  # 6 partitions, the last of 1
    entry = rebalance.api.rebuild_report(demo_copy).report["spectra"]["image_cluster"]["image"]
    assert entry["method"] == ("moments" if method == "moments" else "sample of 5 rows per group")
    whole = {"column": "image_cluster", "side": "image", "groups": groups, "d": d, "vocab": None,
             "method": method, "r": 5 if method == "sample" else None, "partitions": [(0, groups)]}  # fmt: skip
    seed = rebalance.Spec.from_yaml(demo_copy / "spec.yaml").cluster.seed
    parts = [
        dict(stage.part_accumulators(str(demo_copy), i, [whole], seed))
        for i in range(json.loads((demo_copy / "manifest.json").read_text())["stages"]["embed"]["shards"])
    ]
    assert len(parts) == 4
    for phase in ("before", "after"):
        merged = functools.reduce(
            lambda a, b: a.merge(b), [p[("image_cluster", "image", phase, 0)] for p in parts]
        )
        eigs, traces = merged.spectra()
        scores = spectral_scores(eigs, traces, stage.SQS_QUANTILE, valid=merged.valid)
        top = np.array(entry[phase]["top_eigenvalues"])
        np.testing.assert_allclose(top, eigs[:, : top.shape[1]], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(entry[phase]["trace"], scores["trace"], rtol=1e-12)
        np.testing.assert_allclose(entry[phase]["sqs"], scores["sqs"], rtol=1e-10)
        np.testing.assert_allclose(entry[phase]["effective_rank"], scores["effective_rank"], rtol=1e-10)
        assert entry[phase]["rows"] == merged.count.tolist()
        assert entry[phase]["valid"] == scores["valid"].tolist()


def test_spectra_survive_an_actor_lost_between_map_and_reduce(demo_copy, ray_local, monkeypatch, caplog):
    """An actor that dies after its map calls loses the accumulators it owns: the stage redoes the spectra."""
    import ray

    from rebalance.runtime.pool import ActorPool

    original, killed = ActorPool.map, []

    def map_then_kill(self, method, items, desc="", unit="shard"):
        results = original(self, method, items, desc, unit)
        if desc == "spectra" and not killed:
            ray.kill(self.actors[0], no_restart=False)  # restarted empty: its objects are gone
            killed.append(desc)
        return results

    monkeypatch.setattr(ActorPool, "map", map_then_kill)
    before = json.loads((demo_copy / "report" / "report.json").read_text())["spectra"]
    with caplog.at_level(logging.WARNING, logger="rebalance.stages.report"):
        after = rebalance.api.rebuild_report(demo_copy).report["spectra"]
    assert killed == ["spectra"]
    assert "map outputs lost" in caplog.text
    assert after == before


def test_cards_for_concepts_that_are_not_clusters(demo_copy, ray_local):
    """Vocabulary entries (``concept``), zero-shot prompts and near-duplicate groups get cards: their
    records against direct computations on the run directory, and the page names them by their text."""
    import pyarrow.parquet as pq

    from rebalance.data.synthetic import PROMPTS_FILE, VOCABULARY_FILE

    spec = rebalance.Spec.from_yaml(demo_copy / "spec.yaml").to_dict()
    spec["concepts"] = {"vocabulary": str(VOCABULARY_FILE), "field": "label", "cap": 30,
                        "prompts": str(PROMPTS_FILE)}  # fmt: skip
    spec["dedup"] = {"side": "text", "threshold": 0.99}
    spec["balance"] = {"marginals": ["concept", "dup_group"], "tol": 1e-9}
    spec["report"]["thumbnails"] = 4
    report = rebalance.run(spec, demo_copy).report
    columns = report["concepts"]["columns"]
    weights = read_parts(demo_copy / "weights")
    w, keys = weights.column("weight").to_numpy(), weights.column("key").to_pylist()
    labels = read_parts(demo_copy / "concepts")
    assert labels.column("key").to_pylist() == keys

    vocabulary = [*VOCABULARY_FILE.read_text().splitlines(), "<none>"]
    matches = [m or [len(vocabulary) - 1] for m in labels.column("concept_entries").to_pylist()]
    probability = pq.read_table(demo_copy / "concepts" / "entries.parquet").column("probability").to_numpy()
    concept = columns["concept"]
    assert concept["kind"] == "concept" and concept["balanced"]
    matched = {e for m in matches for e in m}
    assert concept["values"] == len(matched) == len(concept["concepts"])  # at most 48: every one a card
    for rec in concept["concepts"]:
        e = vocabulary.index(rec["value"])
        rows = np.array([e in m for m in matches])
        assert rec["rows"] == rows.sum() and rec["card"] and rec["central_keys"] == []
        assert rec["weighted_rows"] == pytest.approx(w[rows].sum(), rel=1e-12)
        assert rec["probability"] == probability[e] and rec["target"] is None
        assert len(rec["random_keys"]) == min(4, rows.sum())
        assert set(rec["random_keys"]) <= {k for k, r in zip(keys, rows, strict=True) if r}

    zero_shot = np.array(labels.column("zero_shot").to_pylist())
    prompts = columns["zero_shot"]
    assert prompts["kind"] == "zero_shot" and not prompts["balanced"]
    assert {r["value"] for r in prompts["concepts"]} == set(zero_shot)
    truth = np.array(read_parts(demo_copy / "embeddings").column("label").to_pylist())
    for rec in prompts["concepts"]:
        rows = zero_shot == rec["value"]
        assert rec["rows"] == rows.sum()
        assert rec["weighted_rows"] == pytest.approx(w[rows].sum(), rel=1e-12)
        values, counts = np.unique(truth[rows], return_counts=True)
        assert rec["purity"] == pytest.approx(counts.max() / rows.sum())
    (aligned,) = report["truth_alignment"]["zero_shot"]  # the prompts against the truth, as a concept column
    assert aligned["labels"] == sorted(
        [*PROMPTS_FILE.read_text().splitlines(), "<none>"]
    )  # concepts.json's order
    assert not aligned["balanced"]
    assert aligned["nmi"] == pytest.approx(normalized_mutual_info_score(truth, zero_shot), rel=1e-9)

    a = read_parts(demo_copy / "assignments").to_pandas()
    a["weight"] = w
    groups = a[a.dup_size > 1].groupby("dup_group").agg(size=("dup_size", "max"), weight=("weight", "sum"))
    groups = groups.reset_index().sort_values(["size", "dup_group"], ascending=[False, True]).head(48)
    dup = columns["dup_group"]
    assert dup["values"] == a.loc[a.dup_size > 1, "dup_group"].nunique()
    assert [r["value"] for r in dup["concepts"]] == groups["dup_group"].tolist()
    assert [r["rows"] for r in dup["concepts"]] == groups["size"].tolist()
    np.testing.assert_allclose([r["weighted_rows"] for r in dup["concepts"]], groups["weight"], rtol=1e-12)
    for rec in dup["concepts"]:
        members = set(a.key[a.dup_group == rec["value"]])
        assert len(rec["random_keys"]) == min(4, len(members)) and set(rec["random_keys"]) <= members

    page = (demo_copy / "report" / "report.html").read_text()
    assert "vocabulary entry <b>red circle</b>" in page and "prompt <b>a photo of a red circle</b>" in page
    assert f"near-duplicate group <b>{dup['concepts'][0]['value']}</b>" in page


def test_min_ess_frontier_and_relax_on_the_page(demo_copy, ray_local):
    """balance.min_ess: report.json carries balance.json's search and relax settings, and the page shows the
    frontier (a plot and one table row per strength tried, in order) and the chosen strength."""
    spec = rebalance.Spec.from_yaml(demo_copy / "spec.yaml").to_dict()
    spec["balance"].update(min_ess=0.9, relax={"image_cluster": "exact"})
    spec["report"] = {"html": True, "spectra_by": [], "thumbnails": 0}
    report = rebalance.run(spec, demo_copy).report
    balance = json.loads((demo_copy / "balance.json").read_text())
    search = balance["min_ess"]
    assert report["balance"]["min_ess"] == search and report["balance"]["relax"] == balance["relax"]
    assert len(search["frontier"]) >= 2 and isinstance(search["rho"], float) and search["met"]
    assert "min_ess_frontier.png" in report["files"]
    assert (demo_copy / "report" / "min_ess_frontier.png").stat().st_size > 0
    page = (demo_copy / "report" / "report.html").read_text()
    assert "balance.relax: image_cluster exact." in page
    assert f"chosen: rho = {search['rho']:.4g}, ESS {search['ess_fraction']:.3f}" in page
    for i, point in enumerate(search["frontier"]):
        rho = point["rho"] if isinstance(point["rho"], str) else f"rho = {point['rho']:.4g}"
        assert f"<tr><td>{i + 1}</td><td>{rho}</td><td>{point['ess']:.3f}</td>" in page
