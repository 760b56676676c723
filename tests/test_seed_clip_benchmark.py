"""Smoke test of ``benchmarks/seed_clip.py --quick`` (Liu et al.'s frozen-tower CLIP heads with 0/1/2
balancing iterations and the MetaCLIP-like curation): the structure of its results and the invariants of its
curation, checked against values computed here from the generator's own labels and counts."""

import numpy as np
import pytest
from bench import load_benchmark

from jobs.dataset import ImageTextParquet


@pytest.mark.slow
def test_quick_seed_clip_benchmark(tmp_path):
    bench = load_benchmark("seed_clip")
    res = bench.main(["--quick", "--out", str(tmp_path), "--towers", "synthetic"])
    assert res["settings"]["rows"] == 3000 and res["settings"]["seeds"] == [0, 1, 2]

    # the substring rule recovers every caption's concept (the generator's label column)
    pool = ImageTextParquet(tmp_path / "train-3000", label_column="label")
    labels = [pool.class_names[t] for t in pool.targets]
    assert [bench.caption_concept(c) for c in pool.texts] == labels

    # one step to the cap target: each concept's share is min(count, t) / sum min(count, t)
    counts = dict(zip(*np.unique(labels, return_counts=True), strict=True))
    t = res["settings"]["cap"]
    assert t == pytest.approx(50 / 174.594 * 3000 / 24)
    capped = {c: min(n, t) for c, n in counts.items()}
    total = sum(capped.values())
    for concept, share in res["metaclip_shares"].items():
        assert share == pytest.approx(capped[concept] / total, rel=1e-9)
    w, _ = bench.metaclip_weights(pool.texts, t)
    head = max(counts, key=counts.get)
    assert w[np.array(labels) == head].max() < 1 < w[np.array(labels) == min(counts, key=counts.get)].min()

    out = res["towers"]["synthetic"]
    assert 0 <= out["towers_only"]["recall"] <= 1
    for arm in bench.ARMS:
        runs = out["arms"][arm]["per_seed"]
        assert len(runs) == 3
        for r in runs:
            assert 0 <= r["worst_recall"] <= r["recall"] <= 1 and 0 <= r["tail_recall"] <= 1
        assert out["arms"][arm]["recall"]["mean"] == pytest.approx(np.mean([r["recall"] for r in runs]))
    # paired differences are per-seed differences of the same seeds
    d = [
        a["recall"] - b["recall"]
        for a, b in zip(out["arms"]["iter2"]["per_seed"], out["arms"]["iter1"]["per_seed"], strict=True)
    ]
    assert out["paired"]["iter2-iter1"]["mean"] == pytest.approx(np.mean(d))
    assert (tmp_path / "results.json").is_file() and (tmp_path / "features-synthetic.npz").is_file()
