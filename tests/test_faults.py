"""Faults: a killed embedding actor is restarted and its shard redone; a killed driver resumes."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

import rebalance
from rebalance.data.parts import read_parts

ROOT = Path(__file__).resolve().parents[1]


def _wait_for_parts(directory: Path, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(list(directory.glob("_part-*.json"))) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {n} committed parts in {directory} after {timeout} s")
        time.sleep(0.05)


def _pids_of(marker: str) -> list[int]:
    """Processes whose command line (Ray sets it to ray::<ActorClass>...) mentions ``marker``."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker.encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return sorted(pids)


def _assert_same_embeddings(out: Path, reference: Path) -> None:
    ours, theirs = read_parts(out / "embeddings"), read_parts(reference / "embeddings")
    assert ours.column("key").to_pylist() == theirs.column("key").to_pylist()
    for side in ("image", "text"):
        a = ours.column(side).combine_chunks().flatten().to_numpy()
        b = theirs.column(side).combine_chunks().flatten().to_numpy()
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def _spec(demo_run: Path) -> dict:
    spec = yaml.safe_load((demo_run / "spec.yaml").read_text())
    spec["embed"]["batch_size"] = 64  # more, shorter batches: a kill lands mid-shard
    return spec


@pytest.mark.ray
def test_killed_embedding_actor_is_restarted(demo_run, tmp_path, ray_local):
    spec = _spec(demo_run)
    out = tmp_path / "run"
    killed: list[int] = []

    def kill_one_actor():
        _wait_for_parts(out / "embeddings", 1)
        for pid in _pids_of("EmbedWorker")[:1]:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    killer = threading.Thread(target=kill_one_actor)
    killer.start()
    result = rebalance.run(spec, out)
    killer.join()
    assert killed, "no embedding actor was found to kill"
    keys = read_parts(out / "embeddings", columns=["key"]).column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 3000
    assert sorted(result.weights.column("key").to_pylist()) == sorted(keys)
    _assert_same_embeddings(out, demo_run)


@pytest.mark.ray
def test_killed_driver_resumes_to_the_same_result(demo_run, tmp_path, ray_local):
    spec_path = tmp_path / "spec.yaml"
    spec = _spec(demo_run)
    spec["embed"]["workers"] = 1
    spec_path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rebalance.cli", "run", str(spec_path), "--out", str(out)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_for_parts(out / "embeddings", 1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    committed = len(list((out / "embeddings").glob("_part-*.json")))
    assert 1 <= committed < 4, "the driver was killed too late to test a resume"
    result = rebalance.run(spec_path, out)
    assert result.manifest["stages"]["embed"]["resumed"] is True
    keys = read_parts(out / "assignments", columns=["key"]).column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 3000
    _assert_same_embeddings(out, demo_run)
    np.testing.assert_allclose(
        result.weights.column("weight").to_numpy(),
        read_parts(demo_run / "weights").column("weight").to_numpy(),
    )
