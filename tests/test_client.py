"""rebalance.Client: in-process runs, and Ray Jobs against a real local Ray head with the dashboard and token
authentication (the documented deployment, on this machine)."""

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from processes import free_port, http_ok, server_process

from rebalance.client import Client, JobFailedError, resolve_token
from rebalance.data.parts import read_parts
from rebalance.spec import SpecError

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(sys.executable).parent)


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head --block` with the dashboard on 127.0.0.1 and token auth, in its own process group and
    temp dir (so it neither records itself as this machine's current cluster nor is found by ray.init())."""
    temp_dir = tempfile.mkdtemp(prefix="rbjobs-", dir="/tmp")
    token = secrets.token_hex(32)
    token_path = Path(temp_dir) / "auth_token"
    token_path.write_text(token)
    token_path.chmod(0o600)
    dashboard = free_port()
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        # jobs run `python` from the head's PATH: this virtualenv's, as on a node set up by cluster.yaml
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)
    cmd = [
        str(Path(VENV_BIN) / "ray"), "start", "--head", f"--port={free_port()}", "--num-cpus=2",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}", f"--ray-client-server-port={free_port()}",
        f"--temp-dir={temp_dir}", "--disable-usage-stats", "--block",
    ]  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    probe = http_ok(f"{address}/api/jobs/", {"Authorization": f"Bearer {token}"})
    try:
        with server_process(cmd, Path(temp_dir) / "head.log", env, probe, 180, "ray head"):
            yield {"address": address, "token": token, "token_path": token_path, "temp_dir": temp_dir}
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def token_env(ray_head, monkeypatch):
    """The client side of token auth as Ray's client reads it: RAY_AUTH_MODE + RAY_AUTH_TOKEN_PATH."""
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(ray_head["token_path"]))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    return ray_head


def _job_spec(demo_run: Path) -> dict:
    spec = yaml.safe_load((demo_run / "spec.yaml").read_text())
    spec["ray"] = {"address": "auto"}  # join the cluster the job runs on
    spec["report"]["html"] = False  # the weights do not depend on it; saves the plots' time
    return spec


@pytest.mark.ray
def test_submit_follow_wait_and_result_on_a_ray_head(demo_run, token_env, tmp_path):
    # faiss k-means in the driver depends on its OpenMP thread count, and a Ray job's driver gets
    # OMP_NUM_THREADS=1: give it the thread count the demo's driver had, so the two runs are comparable.
    threads = os.environ.get("OMP_NUM_THREADS") or str(len(os.sched_getaffinity(0)))
    client = Client(token_env["address"], env_vars={"OMP_NUM_THREADS": threads})
    out = tmp_path / "out"
    job = client.submit(_job_spec(demo_run), out)
    assert job.startswith("rebalance-")
    assert client.status(job) in {"PENDING", "RUNNING", "SUCCEEDED"}
    streamed = "".join(client.tail_logs(job))  # ends when the job ends
    assert client.wait(job, timeout=300) == "SUCCEEDED"
    info = client.info(job)
    assert info["out"] == str(out) and "-m jobs.curate" in info["entrypoint"]
    assert "joining Ray at" in streamed
    summary = json.loads(streamed.strip().splitlines()[-1])
    assert summary["rows"] == 3000 and summary["converged"] is True
    assert client.logs(job).strip().splitlines()[-1] == streamed.strip().splitlines()[-1]
    # The same data and spec on another Ray: the demo run's weights, row for row.
    result = client.result(out)
    demo = read_parts(demo_run / "weights")
    assert result.weights.column("key").to_pylist() == demo.column("key").to_pylist()
    np.testing.assert_allclose(
        result.weights.column("weight").to_numpy(), demo.column("weight").to_numpy(), rtol=1e-9
    )
    assert result.manifest["spec"]["data"]["path"] == str(demo_run / "dataset")
    assert any(j["job_id"] == job and j["status"] == "SUCCEEDED" for j in client.list_jobs())


@pytest.mark.ray
def test_cli_submit_wait_reports_a_failed_job_then_status_logs_and_stop(token_env, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump({"data": {"path": str(tmp_path / "no-such-data")}, "ray": {"address": "auto"}})
    )
    cli = [sys.executable, "-m", "rebalance.cli"]
    address = ["--address", token_env["address"]]
    proc = subprocess.run(
        [*cli, "submit", str(spec), "--out", str(tmp_path / "out"), *address, "--wait", "--timeout", "180"],
        capture_output=True, text=True, timeout=240, env=env,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    job = proc.stdout.strip().splitlines()[0]
    assert f"job {job} ended FAILED" in proc.stderr
    status = subprocess.run(
        [*cli, "status", job, *address], capture_output=True, text=True, timeout=60, env=env
    )
    assert status.returncode == 0 and status.stdout.strip() == "FAILED"
    logs = subprocess.run([*cli, "logs", job, *address], capture_output=True, text=True, timeout=60, env=env)
    assert logs.returncode == 0 and "no-such-data" in logs.stdout  # the job's own error, from its log
    stop = subprocess.run([*cli, "stop", job, *address], capture_output=True, text=True, timeout=60, env=env)
    assert stop.returncode == 0 and "already ended (FAILED)" in stop.stdout

    # A running job is stopped: its "python" is a stand-in that would sleep for minutes.
    slow = tmp_path / "slow-python"
    slow.write_text("#!/bin/sh\nsleep 300\n")
    slow.chmod(0o755)
    client = Client(token_env["address"], python=str(slow))
    job = client.submit(_job_spec_file(tmp_path), tmp_path / "never")
    deadline = time.monotonic() + 60
    while client.status(job) == "PENDING" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert client.status(job) == "RUNNING"
    stop = subprocess.run(
        [*cli, "stop", job, *address, "--wait"], capture_output=True, text=True, timeout=120, env=env
    )
    assert stop.returncode == 0, stop.stderr
    assert "stop requested (STOPPED)" in stop.stdout
    with pytest.raises(JobFailedError, match="ended STOPPED"):
        client.wait(job, timeout=30)
    assert not (tmp_path / "never").exists()


def _job_spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "any.yaml"
    path.write_text(yaml.safe_dump({"data": {"path": str(tmp_path)}}))
    return path


@pytest.mark.ray
def test_the_job_api_refuses_a_wrong_or_missing_token(ray_head, monkeypatch):
    with pytest.raises(Exception, match="(?i)auth|forbidden|401|403"):
        Client(ray_head["address"], token="not-the-token").status("any")
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    with pytest.raises(Exception, match="(?i)auth|401"):
        Client(ray_head["address"]).status("any")


def test_remote_submit_needs_an_absolute_out_and_an_http_address(ray_head, demo_run):
    with pytest.raises(ValueError, match="http"):
        Client("127.0.0.1:8265")
    client = Client(ray_head["address"], token=ray_head["token"])
    with pytest.raises(ValueError, match="absolute path"):
        client.submit(_job_spec(demo_run), "relative/out")


@pytest.mark.slow
def test_entrypoints(ray_head):
    client = Client(ray_head["address"], token=ray_head["token"])
    assert (
        client._entrypoint("specs/a b.yaml", "/mnt/runs/x")
        == "python -m jobs.curate 'specs/a b.yaml' --out /mnt/runs/x"
    )
    inline = client._entrypoint(None, "/mnt/runs/x")
    # run the inline form with a stand-in for python: the spec arrives as a file holding the JSON
    spec = {"data": {"path": "/d"}, "balance": {"tol": 1e-06}, "note": 'it\'s "quoted" $HOME `x`\nline 2'}
    proc = subprocess.run(
        ["sh", "-c", inline.replace("python -m jobs.curate", "cat")],
        env={**os.environ, "REBALANCE_SPEC_JSON": yaml.safe_dump(spec)}, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 1  # `cat` rejects --out: its exit status is the job's
    proc = subprocess.run(
        ["sh", "-c", inline.replace("python -m jobs.curate", "cat").replace(" --out /mnt/runs/x", "")],
        env={**os.environ, "REBALANCE_SPEC_JSON": yaml.safe_dump(spec)}, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 0 and yaml.safe_load(proc.stdout) == spec


def test_resolve_token_follows_rays_order(tmp_path, monkeypatch):
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home-token\n")
    (tmp_path / "file").write_text("  file-token\n")
    assert resolve_token() is None  # token mode off: nothing is sent
    assert resolve_token("explicit") == "explicit"
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert resolve_token() == "home-token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "file"))
    assert resolve_token() == "file-token"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert resolve_token() == "env-token"
    assert resolve_token("explicit") == "explicit"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    (tmp_path / ".ray" / "auth_token").unlink()
    with pytest.raises(PermissionError, match="no token found"):
        resolve_token()


# -- in-process ---------------------------------------------------------------------------------------------


def test_in_process_client_on_a_finished_run(demo_copy):
    """No address: the run happens in this process (a complete run does no work and starts no Ray)."""
    client = Client()
    spec = yaml.safe_load((demo_copy / "spec.yaml").read_text())
    job = client.submit(spec, demo_copy)
    assert client.wait(job, timeout=120) == "SUCCEEDED"
    assert "nothing to do" in client.logs(job)
    assert json.loads(client.logs(job).strip().splitlines()[-1])["rows"] == 3000
    assert "".join(client.tail_logs(job)) == client.logs(job)
    assert client.result(demo_copy).summary() == json.loads(client.logs(job).strip().splitlines()[-1])
    with pytest.raises(NotImplementedError):
        client.stop(job)


@pytest.mark.slow
def test_in_process_client_reports_a_failed_run(tmp_path):
    client = Client()
    with pytest.raises(SpecError, match="data.path"):  # an invalid spec fails at once
        client.submit({"data": {"path": str(tmp_path / "missing")}}, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    job = client.submit({"data": {"path": str(tmp_path / "empty")}}, tmp_path / "out")
    with pytest.raises(JobFailedError, match="ended FAILED") as err:
        client.wait(job, timeout=120)
    assert "empty" in str(err.value)  # the run's own error names the directory without shards
    assert client.status(job) == "FAILED"
    with pytest.raises(KeyError):
        client.status("local-unknown")
