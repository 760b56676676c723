"""A real multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``): a head node with no CPU and
two worker nodes of one CPU each, each raylet with its own small object store. The pipeline's driver (the
CLI, in its own process) joins it, so every actor runs on a worker node and a pool of two spans both.

A worker node is removed mid-stage, as a lost spot instance would be, and a fresh node joins in its place
(as the autoscaler would start one):

- while embedding: the lost actor is restarted on the new node and its shard redone; the run completes with
  every row exactly once and the weights of an undisturbed run (docs/cluster.md, What a lost node costs);
- while the balance stage's row path holds its parts in actor memory: the stage fails with
  ``PartsLostError`` and a rerun with the same ``--out``, started before Ray has noticed the loss (so sized
  from the lost node's CPU too), redoes that stage only, on the nodes there are, to the same weights.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from rebalance.data.parts import read_parts

ROOT = Path(__file__).resolve().parents[1]
OBJECT_STORE = 80 * 2**20  # bytes per node: Ray's minimum is 75 MiB
# Ray counts a removed node as alive until this many health checks, 3 s apart, have failed: 60 s here (15 s
# by default), so that a rerun started at once is sized from the lost node's CPUs too, as a job resubmitted
# at once on a real cluster can be
HEALTH_CHECKS = 20
pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "object_store_memory": OBJECT_STORE,
            "include_dashboard": False,
            "_system_config": {"health_check_failure_threshold": HEALTH_CHECKS},
        },
    )
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE)
        cluster.wait_for_nodes(timeout=120)
        yield cluster
    finally:
        cluster.shutdown()


def _raylet_pid(node) -> int:
    from ray._private import ray_constants

    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


def _actor_nodes(cluster, marker: str) -> list:
    """The worker nodes of ``cluster`` whose raylet is the parent of a process titled ``ray::<marker>``."""
    parents = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if marker.encode() not in (stat.parent / "cmdline").read_bytes():
                continue
            parents.add(int(stat.read_text().rsplit(")", 1)[1].split()[1]))
        except (OSError, IndexError, ValueError):
            continue
    return [node for node in cluster.worker_nodes if _raylet_pid(node) in parents]


def _replace(cluster, node) -> None:
    """Remove ``node`` (every process of it killed) and add a fresh one-CPU node."""
    cluster.remove_node(node, allow_graceful=False)
    cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE)


def _spec(demo_run: Path, tmp_path: Path, address: str, **balance) -> Path:
    spec = yaml.safe_load((demo_run / "spec.yaml").read_text())
    spec["embed"]["batch_size"] = 64  # more, shorter batches: a node lost mid-shard
    spec["balance"].update(balance)
    spec["ray"] = {"address": address, "placement_timeout_s": 300}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _run(spec: Path, out: Path, log: Path) -> subprocess.Popen:
    """The CLI run of ``spec`` into ``out``, its output to ``log`` (a file: nobody reads a pipe meanwhile)."""
    with open(log, "w") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "rebalance.cli", "run", str(spec), "--out", str(out)],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=handle, stderr=subprocess.STDOUT,
        )  # fmt: skip


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 900) -> tuple[int, str]:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return proc.returncode, log.read_text()


def _until(condition, proc: subprocess.Popen, timeout: float = 600) -> bool:
    """Poll ``condition()`` until it is true (True) or the run ends or the time is up (False)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def _assert_same_result(out: Path, demo_run: Path) -> None:
    keys = read_parts(out / "weights", columns=["key"]).column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 3000
    reference = read_parts(demo_run / "weights")
    assert keys == reference.column("key").to_pylist()
    np.testing.assert_allclose(
        read_parts(out / "weights").column("weight").to_numpy(),
        reference.column("weight").to_numpy(),
        rtol=1e-9,
    )


# Nodes are removed and added from the test's main thread: a Ray node registers signal handlers.


def test_node_lost_while_embedding_is_survived(cluster, demo_run, tmp_path):
    out, log = tmp_path / "run", tmp_path / "run.log"
    proc = _run(_spec(demo_run, tmp_path, cluster.address), out, log)
    parts = out / "embeddings"
    if _until(lambda: any(parts.glob("_part-*.json")), proc):
        committed = len(list(parts.glob("_part-*.json")))
        _replace(cluster, (_actor_nodes(cluster, "EmbedWorker") or sorted(cluster.worker_nodes, key=id))[0])
    else:
        committed = None
    code, output = _finish(proc, log)
    assert code == 0, output[-4000:]
    assert committed is not None and committed < 4, "the node was removed after the embed stage had finished"
    embed = json.loads((out / "manifest.json").read_text())["stages"]["embed"]
    assert embed["status"] == "complete" and not embed["resumed"]  # survived within the run, not by a rerun
    _assert_same_result(out, demo_run)
    a = read_parts(out / "embeddings").column("image").combine_chunks().flatten().to_numpy()
    b = read_parts(demo_run / "embeddings").column("image").combine_chunks().flatten().to_numpy()
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_node_lost_while_rows_are_resident_reruns_the_stage(cluster, demo_run, tmp_path):
    out, log = tmp_path / "run", tmp_path / "run.log"
    # the row path, and enough passes (one marginal: the first one converges, the rest change nothing)
    # for the node to be removed while the resident parts iterate
    spec = _spec(demo_run, tmp_path, cluster.address, path="rows", iterations=3000)
    proc = _run(spec, out, log)
    holders: list = []
    # a holder titled ray::_PartHolder.reduce has loaded its parts (one lost before it started holds none:
    # the stage goes on without it)
    if _until(lambda: holders.extend(_actor_nodes(cluster, "_PartHolder.reduce")) or holders, proc):
        _replace(cluster, holders[0])
    code, output = _finish(proc, log)
    assert holders, "no node held a resident part"
    assert code != 0 and "an actor holding parts in memory died" in output, output[-4000:]
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    assert stages["cluster"]["status"] == "complete" and stages["balance"]["status"] == "failed"
    assert stages["balance"]["error"].startswith("PartsLostError")
    code, output = _finish(_run(spec, out, log), log)
    assert code == 0, output[-4000:]
    # sized for three actors (the lost node still counted), the rerun loads on the two nodes there are
    assert "1 of the 3 actors asked for to hold parts dropped" in output, output[-4000:]
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    assert stages["balance"]["status"] == stages["report"]["status"] == "complete"
    _assert_same_result(out, demo_run)
