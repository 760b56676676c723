"""``benchmarks/scale.py``: its generator writes the clip-retrieval layout that ``format: embeddings`` reads,
with the long-tailed concept carried as metadata; ``--quick`` runs end to end and measures every stage."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bench import load_benchmark

from rebalance.data.embeddings import list_laion_shards, read_laion_shard

ROOT = Path(__file__).resolve().parents[1]


def test_generator_writes_the_clip_retrieval_layout(tmp_path):
    info = load_benchmark("scale").generate(
        tmp_path, rows=3001, dim=16, shards=3, concepts=50, zipf=1.1, seed=1
    )
    shards = list_laion_shards(tmp_path)
    assert len(shards) == 3
    keys, concepts, image, text = [], [], [], []
    for shard in shards:
        for batch in read_laion_shard(shard, "key", ("concept",), batch_size=500):
            keys += batch.keys
            concepts += batch.carried["concept"].to_pylist()
            image.append(batch.image_vectors)
            text.append(batch.text_vectors)
    image, text = np.concatenate(image), np.concatenate(text)
    assert len(keys) == len(set(keys)) == 3001 and image.shape == text.shape == (3001, 16)
    np.testing.assert_allclose(np.linalg.norm(image, axis=1), 1, atol=2e-3)  # float16 storage
    counts = np.bincount(concepts, minlength=50)
    np.testing.assert_array_equal(counts, info["concept_counts"])
    # Zipf(1.1) over 50 concepts: concept 0 has p = 0.22, concept 49 p = 0.0033 (about 10 rows).
    assert counts[0] > 500 and counts[:5].sum() > counts[25:].sum()
    # The concept is what the vectors carry: a row is nearer its own concept's mean than any other's.
    means = np.stack([image[np.array(concepts) == c].mean(0) for c in range(5)])
    top = np.isin(concepts, range(5))
    nearest = np.argmax(image[top] @ means.T, axis=1)
    assert (nearest == np.array(concepts)[top]).mean() > 0.95


@pytest.mark.slow
def test_quick_run_measures_every_stage(tmp_path):
    out = tmp_path / "scale.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/scale.py", "--quick", "--cpus", "2", "--work", str(tmp_path), "--json", str(out)],
        capture_output=True, text=True, timeout=900, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert list(results["stages"]) == ["embed", "cluster", "balance", "report"]
    for stage in results["stages"].values():
        assert stage["wall_s"] > 0 and stage["floor_s"] > 0 and stage["driver_peak_rss"] > 0
        assert stage["bytes_read"] > 0
    embed = results["stages"]["embed"]
    assert embed["actor_peak_rss"] > 0 and embed["bytes_written"] > 0.5 * embed["bytes_read"]
    assert "| total |" in proc.stdout
    report = results["stages"]["report"]
    assert report["moments_floor_s"] > 0 and "spectra arithmetic alone" in proc.stdout
    assert not [p for p in tmp_path.iterdir() if p.name != "scale.json"]  # the scratch directory is gone
