"""`python -m jobs.curate` joins a running Ray instance (as inside `ray job submit`) and reproduces the demo."""

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from processes import free_port

from rebalance.data.parts import read_parts

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def ray_head(tmp_path):
    port = free_port()
    ray = str(Path(sys.executable).with_name("ray"))
    # Token authentication on, as in the documented deployment: the head and the job share the token file.
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
    }
    # --block keeps the head's processes in our own process group: the teardown stops this head only
    # (`ray stop` would stop every Ray on the machine).
    proc = subprocess.Popen(
        [ray, "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
         "--disable-usage-stats", f"--temp-dir={tempfile.mkdtemp(prefix='rb-', dir='/tmp')}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        # Ray replaces 127.0.0.1 by this machine's own interface address; read back the address it chose.
        address, seen = None, []
        for line in proc.stdout:
            seen.append(line)
            found = re.search(r"ray start --address='([^']+)'", line)
            if found:
                address = found.group(1)
                break
        assert address and address.endswith(f":{port}"), "".join(seen)[-3000:]
        yield address, env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.ray
def test_curate_job_on_running_ray(demo_run, ray_head, tmp_path):
    address, env = ray_head
    spec = yaml.safe_load((demo_run / "spec.yaml").read_text())
    spec["ray"] = {"address": "auto"}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.curate", str(tmp_path / "spec.yaml"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**env, "RAY_ADDRESS": address, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["rows"] == 3000 and summary["converged"] is True
    assert f"joining Ray at {address}" in proc.stderr
    # Same spec and data on another Ray instance: the same weights, row for row.
    ours, demo = read_parts(out / "weights"), read_parts(demo_run / "weights")
    assert ours.column("key").to_pylist() == demo.column("key").to_pylist()
    np.testing.assert_allclose(ours.column("weight").to_numpy(), demo.column("weight").to_numpy(), rtol=1e-9)
