"""rebalance.samplers: frequencies follow the weights, ranks split one stream, keys map to indices."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from rebalance.data.parts import write_part
from rebalance.data.synthetic import generate_dataset
from rebalance.samplers import (
    DistributedWeightedSampler,
    WeightedKeySampler,
    export_webdataset_buckets,
    weights_for_keys,
)

ROOT = Path(__file__).resolve().parents[1]


def make_run(tmp_path, keys, weights, parts=2):
    """A minimal run directory: weights/part-*.parquet (key, weight) with their commit summaries."""
    run = tmp_path / "run"
    chunks = np.array_split(np.arange(len(keys)), parts)
    for i, idx in enumerate(chunks):
        table = pa.table(
            {"key": [keys[j] for j in idx], "weight": pa.array([weights[j] for j in idx], pa.float64())}
        )
        (run / "weights").mkdir(parents=True, exist_ok=True)
        write_part(run / "weights", i, table, {})
    return run


def chi_square_p(draws, weights):
    w = np.asarray(weights, dtype=float)
    counts = np.bincount(draws, minlength=w.size)
    pos = w > 0
    assert counts[~pos].sum() == 0, "a zero-weight index was drawn"
    expected = len(draws) * w[pos] / w[pos].sum()
    return stats.chisquare(counts[pos], expected).pvalue


WEIGHTS = [1.0, 2.0, 3.0, 4.0, 0.0, 10.0, 0.5]


def test_frequencies_match_weights_chi_square():
    sampler = WeightedKeySampler.from_weights(WEIGHTS, num_samples=50_000, seed=123)
    draws = np.fromiter(iter(sampler), dtype=np.int64)
    assert len(draws) == len(sampler) == 50_000
    assert chi_square_p(draws, WEIGHTS) > 0.01
    # and it is not trivially uniform: the largest weight is drawn about 10/20.5 of the time
    assert np.mean(draws == 5) == pytest.approx(10 / 20.5, abs=0.01)


def test_keys_map_to_dataset_indices(tmp_path):
    run_keys = [f"k{i}" for i in range(6)]
    run_weights = [0.5, 1.0, 1.5, 2.0, 0.0, 1.0]
    run = make_run(tmp_path, run_keys, run_weights)
    dataset_keys = ["k3", "k0", "k5", "k2"]  # a subset, in the dataset's own order
    assert weights_for_keys(run, dataset_keys).tolist() == [2.0, 0.5, 1.0, 1.5]
    sampler = WeightedKeySampler(run, dataset_keys, num_samples=20_000, seed=0)
    draws = sampler.indices()
    assert draws.max() < 4
    assert chi_square_p(draws, [2.0, 0.5, 1.0, 1.5]) > 0.01


def test_unknown_and_duplicate_keys_are_clear_errors(tmp_path):
    run = make_run(tmp_path, ["a", "b", "c"], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"1 dataset keys have no weight.*'zz'.*missing='zero'"):
        weights_for_keys(run, ["a", "zz", "c"])
    assert weights_for_keys(run, ["a", "zz", "c"], missing="zero").tolist() == [1.0, 0.0, 3.0]
    with pytest.raises(ValueError, match="none of the dataset's 2 keys"):
        weights_for_keys(run, ["x", "y"])
    with pytest.raises(ValueError, match="duplicate keys: 'a'"):
        weights_for_keys(run, ["a", "b", "a"])
    with pytest.raises(ValueError, match="duplicate keys"):
        weights_for_keys((["a", "a"], [1.0, 2.0]), ["a"])
    with pytest.raises(FileNotFoundError, match="no weights/"):
        weights_for_keys(tmp_path / "nothing", ["a"])
    with pytest.raises(ValueError, match="all zero"):
        WeightedKeySampler.from_weights([0.0, 0.0])
    with pytest.raises(ValueError, match="finite"):
        WeightedKeySampler.from_weights([1.0, float("nan")])


def test_reproducible_by_seed_and_epoch():
    a = WeightedKeySampler.from_weights(WEIGHTS, num_samples=100, seed=7)
    b = WeightedKeySampler.from_weights(WEIGHTS, num_samples=100, seed=7)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)
    a.set_epoch(0)
    assert list(a) == first
    c = WeightedKeySampler.from_weights(WEIGHTS, num_samples=100, seed=8)
    assert list(c) != first


@pytest.mark.parametrize("replicas", [1, 2, 3, 4])
def test_ranks_are_disjoint_positions_of_one_stream(replicas):
    samplers = [
        DistributedWeightedSampler(WEIGHTS, replicas, r, num_samples=5000, seed=3) for r in range(replicas)
    ]
    for s in samplers:
        s.set_epoch(2)
    per_rank = [np.fromiter(iter(s), dtype=np.int64) for s in samplers]
    assert all(len(d) == len(s) == 5000 for d, s in zip(per_rank, samplers, strict=True))
    # interleaving the ranks' draws rebuilds the global stream exactly: rank r owns positions r::replicas
    stream = samplers[0].global_indices()
    merged = np.empty(replicas * 5000, dtype=np.int64)
    for r, d in enumerate(per_rank):
        merged[r::replicas] = d
    assert np.array_equal(merged, stream)
    # the global stream is the single-process stream of the same seed and epoch
    single = WeightedKeySampler.from_weights(WEIGHTS, num_samples=replicas * 5000, seed=3)
    assert np.array_equal(single.indices(epoch=2), stream)
    assert chi_square_p(np.concatenate(per_rank), WEIGHTS) > 0.01


@settings(deadline=None, derandomize=True, max_examples=40)
@given(
    st.lists(st.floats(0, 100, allow_nan=False), min_size=1, max_size=30).filter(lambda w: sum(w) > 0),
    st.integers(1, 6),
    st.integers(1, 50),
    st.integers(0, 2**32),
    st.integers(0, 100),
)
def test_distributed_partition_property(weights, replicas, num_samples, seed, epoch):
    samplers = [DistributedWeightedSampler(weights, replicas, r, num_samples, seed) for r in range(replicas)]
    for s in samplers:
        s.set_epoch(epoch)
    positions = np.arange(replicas * num_samples)
    owned = [positions[r::replicas] for r in range(replicas)]
    assert sorted(np.concatenate(owned).tolist()) == positions.tolist()  # disjoint, covering
    stream = samplers[0].global_indices()
    for r, s in enumerate(samplers):
        assert np.array_equal(s.indices(), stream[owned[r]])
    assert all(weights[i] > 0 for i in stream)


def test_default_sizes_and_dataloader():
    s = DistributedWeightedSampler(WEIGHTS, num_replicas=3, rank=2)
    assert len(s) == 3 and s.total_size == 9  # ceil(7 / 3) per rank, like torch's DistributedSampler
    assert DistributedWeightedSampler(WEIGHTS).num_replicas == 1  # no process group: one replica
    with pytest.raises(ValueError, match="rank"):
        DistributedWeightedSampler(WEIGHTS, num_replicas=2, rank=2)
    data = torch.arange(len(WEIGHTS)) * 10
    loader = torch.utils.data.DataLoader(
        data, batch_size=4, sampler=WeightedKeySampler.from_weights(WEIGHTS, 8)
    )
    batches = list(loader)
    assert [len(b) for b in batches] == [4, 4]
    assert all(int(v) % 10 == 0 and int(v) != 40 for b in batches for v in b)


def test_export_webdataset_buckets(tmp_path):
    info = generate_dataset(tmp_path / "data", n_rows=48, n_shards=2, seed=0)

    keys = [
        k
        for p in sorted((tmp_path / "data").glob("*.parquet"))
        for k in pq.read_table(p).column("key").to_pylist()
    ]
    assert len(keys) == info["rows"]
    # two weight levels and one zero: 2 buckets reproduce the weights exactly
    weights = [0.5 if i % 3 == 0 else 2.0 for i in range(48)]
    weights[5] = 0.0
    run = make_run(tmp_path, keys, weights)
    out = export_webdataset_buckets(run, tmp_path / "data", tmp_path / "wds", n_buckets=2, shard_size=10)
    assert out["upsampling_factors"] == "0.5::2"
    assert out["total_variation"] == pytest.approx(0.0, abs=1e-12)
    assert [b["rows"] for b in out["buckets"]] == [16, 31]
    assert [b["tars"] for b in out["buckets"]] == [2, 4]
    assert out["train_data"].split("::")[0].endswith("bucket-00/{000000..000001}.tar")
    seen = {}
    for tar_path in sorted((tmp_path / "wds").glob("bucket-*/*.tar")):
        with tarfile.open(tar_path) as tar:
            names = tar.getnames()
            for name in names:
                if name.endswith(".json"):
                    meta = json.loads(tar.extractfile(name).read())
                    assert meta["key"] not in seen
                    seen[meta["key"]] = meta["weight"]
                    assert f"{meta['key']}.jpg" in names and f"{meta['key']}.txt" in names
    assert seen == {k: w for k, w in zip(keys, weights, strict=True) if w > 0}
    assert json.loads((tmp_path / "wds" / "buckets.json").read_text()) == out
    # more distinct weights than buckets: approximate, with a reported total-variation error in (0, 1)
    run2 = make_run(tmp_path / "r2", keys, [1.0 + i for i in range(48)])
    out2 = export_webdataset_buckets(run2, tmp_path / "data", tmp_path / "wds2", n_buckets=3)
    assert 0 < out2["total_variation"] < 0.2
    assert sum(b["rows"] for b in out2["buckets"]) == 48


def test_open_clip_train_reads_the_exported_buckets(tmp_path):
    # The real consumer: open_clip's own training script trains rebalance-tiny for a few CPU steps on the
    # exported tars with the --train-data / --train-data-upsampling-factors strings the export returned.
    pytest.importorskip("webdataset", reason="open_clip_train reads tars with the webdataset package")
    data = pytest.importorskip("open_clip_train.data", reason="open_clip_train ships with open_clip_torch")
    generate_dataset(tmp_path / "data", n_rows=96, n_shards=2, seed=0)
    keys = [
        k
        for p in sorted((tmp_path / "data").glob("*.parquet"))
        for k in pq.read_table(p).column("key").to_pylist()
    ]
    weights = [(0.25, 1.0, 3.0)[i % 3] for i in range(96)]
    run = make_run(tmp_path, keys, weights)
    out = export_webdataset_buckets(run, tmp_path / "data", tmp_path / "wds", n_buckets=3, shard_size=8)
    assert out["total_variation"] == pytest.approx(0.0, abs=1e-12)
    # The drawn samples' bucket frequencies match the factors: open_clip draws tar t with probability
    # factor(t) / sum(factors) and reads all of it, so bucket b gets factor_b * rows_b of the draws, which is
    # its share of the total weight (1/17, 4/17, 12/17 here).
    shards = data.ResampledShards2(
        out["train_data"], weights=out["upsampling_factors"], nshards=20_000, deterministic=True,
        worker_seed=lambda: 0,
    )  # fmt: skip
    rows = {}
    for tar_path in (tmp_path / "wds").glob("bucket-*/*.tar"):
        with tarfile.open(tar_path) as tar:
            rows[str(tar_path)] = sum(name.endswith(".json") for name in tar.getnames())
    drawn = np.zeros(3)
    for shard in shards:
        drawn[int(shard["url"].split("bucket-")[1][:2])] += rows[shard["url"]]
    expected = np.array([0.25, 1.0, 3.0]) * 32 / (4.25 * 32)
    assert np.abs(drawn / drawn.sum() - expected).max() < 0.01, drawn / drawn.sum()
    script = "import sys, rebalance.models; from open_clip_train.main import main; sys.exit(main(sys.argv[1:]) or 0)"
    args = [
        "--train-data", out["train_data"], "--train-data-upsampling-factors", out["upsampling_factors"],
        "--dataset-type", "webdataset", "--dataset-resampled", "--train-num-samples", "64",
        "--batch-size", "16", "--epochs", "1", "--workers", "0", "--model", "rebalance-tiny",
        "--lr", "1e-3", "--warmup", "1", "--precision", "fp32", "--seed", "0", "--save-frequency", "0",
        "--logs", str(tmp_path / "logs"), "--name", "tiny", "--log-every-n-steps", "1", "--report-to", "",
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = (tmp_path / "logs" / "tiny" / "out.log").read_text()
    steps = [line for line in log.splitlines() if "Train Epoch: 0" in line and "Loss:" in line]
    assert len(steps) >= 4, log[-3000:]  # 64 samples / batch 16


def test_export_leaves_out_keys_that_would_escape_the_tar(tmp_path):
    (tmp_path / "data").mkdir()
    keys = ["ok-0", "../../evil", "/etc/cron.d/x", "a\0b", "dir/ok-1"]
    table = pa.table({"key": keys, "jpg": [b"img"] * 5, "txt": ["caption"] * 5})
    pq.write_table(table, tmp_path / "data" / "s.parquet")
    run = make_run(tmp_path, keys, [1.0] * 5)
    out = export_webdataset_buckets(run, tmp_path / "data", tmp_path / "wds", n_buckets=1)
    assert out["unsafe_keys"] == {"count": 3, "examples": keys[1:4]}
    assert out["buckets"][0]["rows"] == 2
    with tarfile.open(tmp_path / "wds" / "bucket-00" / "000000.tar") as tar:
        assert sorted(tar.getnames()) == sorted(
            f"{k}.{e}" for k in ("ok-0", "dir/ok-1") for e in ("jpg", "txt", "json")
        )
