"""cluster.yaml passes the Ray cluster launcher's own validation and keeps its security settings.

`ray up` does, in ray.autoscaler._private.commands._bootstrap_config:

    prepare_config(config)                                   # merge aws/defaults.yaml, fill min/max
    provider_cls.fillout_available_node_types_resources()    # AWS API call (boto3 + credentials)
    validate_config(config)                                  # ray-schema.json + cross-field checks
    provider_cls.bootstrap_config(config)                    # AWS API calls: IAM, subnets, keys

prepare_config for the AWS provider only reads the defaults.yaml shipped inside the ray package, so
it runs offline. The two provider steps need boto3 and AWS credentials, so they are left out here:
validate_config runs on the prepared config, as `ray up` would run it. The resources that the
skipped autodetection would fill in are spelled out for the GPU worker type in cluster.yaml, and
an empty `resources: {}` on the head is valid as it is.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.version import Version
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
TORCH_PIN = "torch==2.14.1"
TORCHVISION_PIN = "torchvision==0.29.1"


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    return prepare_config(copy.deepcopy(raw))


def _validate(config: dict) -> dict:
    """What `ray up` checks before it talks to the cloud provider."""
    config = prepare_config(copy.deepcopy(config))
    validate_config(config)
    return config


def _head_type(config: dict) -> dict:
    return config["available_node_types"][config["head_node_type"]]


def _gpu_worker_types(config: dict) -> dict[str, dict]:
    return {
        name: node_type
        for name, node_type in config["available_node_types"].items()
        if name != config["head_node_type"]
        and (
            node_type.get("resources", {}).get("GPU", 0) >= 1
            or re.match(r"^(g\d|p\d)", node_type["node_config"].get("InstanceType", ""))
        )
    }


def _ray_start_commands(config: dict) -> list[str]:
    cmds = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    return [c for c in cmds if "ray start" in c]


def _index(cmds: list[str], pattern: str) -> int:
    for i, cmd in enumerate(cmds):
        if re.search(pattern, cmd):
            return i
    raise AssertionError(f"no command matches {pattern!r} in {cmds}")


# --- the launcher's own validation ------------------------------------------------------------------


def test_passes_ray_validation(raw):
    config = _validate(raw)
    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] in config["available_node_types"]
    # prepare_config merged the common setup into both per-role lists, as `ray up` runs them.
    assert config["worker_setup_commands"][: len(raw["setup_commands"])] == raw["setup_commands"]
    assert config["head_setup_commands"][: len(raw["setup_commands"])] == raw["setup_commands"]


@pytest.mark.parametrize(
    "mutate, error",
    [
        (lambda c: c.update(max_workers="many"), jsonschema.ValidationError),
        (lambda c: c.update(gpu_workers=4), jsonschema.ValidationError),  # unknown top-level key
        (
            lambda c: c["available_node_types"]["ray.worker.gpu"].update(resources={"GPU": "one"}),
            jsonschema.ValidationError,
        ),
        (lambda c: c.update(head_node_type="no.such.type"), ValueError),
        (lambda c: c["available_node_types"]["ray.worker.gpu"].update(min_workers=99), ValueError),
    ],
    ids=["max_workers-not-int", "unknown-top-level-key", "resources-not-int", "bad-head-type", "min>max"],
)
def test_invalid_copies_fail_validation(raw, mutate, error):
    broken = copy.deepcopy(raw)
    mutate(broken)
    with pytest.raises(error):
        _validate(broken)


# --- node types ---------------------------------------------------------------------------------------


def test_gpu_worker_type(prepared):
    gpu_types = _gpu_worker_types(prepared)
    assert gpu_types, "no GPU worker node type"
    for name, node_type in gpu_types.items():
        assert node_type["resources"].get("GPU", 0) >= 1, name
        assert re.match(r"^(g\d|p\d)", node_type["node_config"]["InstanceType"]), name
        assert node_type["min_workers"] == 0, name
        assert 1 <= node_type["max_workers"] <= prepared["max_workers"], name


def test_head_is_cpu_with_cpus(prepared):
    head = _head_type(prepared)
    # The head runs the driver: it must keep its CPUs and have no GPUs.
    assert head["resources"].get("CPU", 1) > 0
    assert head["resources"].get("GPU", 0) == 0
    assert not re.match(r"^(g\d|p\d)", head["node_config"]["InstanceType"])
    assert head["max_workers"] == 0


# --- security -----------------------------------------------------------------------------------------


def test_dashboard_bound_to_localhost(prepared):
    head_starts = [c for c in prepared["head_start_ray_commands"] if "ray start" in c]
    assert len(head_starts) == 1
    (start,) = head_starts
    assert "--head" in start and "--port=6379" in start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in start
    assert re.search(r"--dashboard-host[= ]127\.0\.0\.1(\s|$)", start)
    everything = yaml.safe_dump(prepared)
    assert "0.0.0.0" not in everything
    assert "8265" not in yaml.safe_dump(prepared["provider"])  # never opened in a security group


def test_token_auth_on_every_ray_start(prepared):
    token_paths = set()
    starts = _ray_start_commands(prepared)
    assert any("--head" in c for c in starts) and any("--address=$RAY_HEAD_IP:6379" in c for c in starts)
    for cmd in starts:
        before_start = cmd[: cmd.index("ray start")]
        assert re.search(r"\bexport\b[^;]*\bRAY_AUTH_MODE=token\b", before_start), cmd
        path = re.search(r"\bRAY_AUTH_TOKEN_PATH=([^\s;]+)", before_start)
        assert path, cmd
        token_paths.add(path.group(1).replace("$HOME/", "~/"))
    # One token file, and file_mounts copies it up from outside the repository.
    assert len(token_paths) == 1
    (remote,) = token_paths
    assert remote in prepared["file_mounts"]
    local = prepared["file_mounts"][remote]
    assert not Path(local).expanduser().resolve().is_relative_to(REPO)
    # Interactive shells on the nodes (ray attach / ray exec) authenticate too.
    init = "\n".join(prepared["initialization_commands"])
    assert "export RAY_AUTH_MODE=token" in init
    assert "RAY_AUTH_TOKEN_PATH=" in init
    assert "chmod 600 " + remote in init


def test_ray_pinned_to_a_fixed_release(prepared):
    pins = re.findall(r"ray\[default\]==([0-9][0-9.]*)", "\n".join(prepared["setup_commands"]))
    assert pins, "Ray is not pinned in setup_commands"
    for pin in pins:
        # CVE-2026-27482 affected Ray <= 2.53.
        assert Version(pin) >= Version("2.54"), pin


# --- installs -----------------------------------------------------------------------------------------


def test_torch_pinned_like_the_project(prepared):
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert TORCH_PIN in deps and TORCHVISION_PIN in deps
    for role in ("head_setup_commands", "worker_setup_commands"):
        cmds = prepared[role]
        torch_at = _index(cmds, re.escape(TORCH_PIN) + r"\s+" + re.escape(TORCHVISION_PIN))
        project_at = _index(cmds, r"pip install .*-e ['\"]?\.")
        assert torch_at < project_at, role


def test_gpu_workers_never_hold_faiss_cpu_and_faiss_gpu(prepared):
    cmds = prepared["worker_setup_commands"]
    uninstall_at = _index(cmds, r"pip uninstall -y faiss-cpu\b")
    gpu_extra_at = _index(cmds, r"pip install .*\.\[gpu\]")
    assert uninstall_at < gpu_extra_at
    # Nothing after the uninstall may bring faiss-cpu back: the project's core dependencies include
    # it, so every later install of the project must skip dependencies.
    for cmd in cmds[uninstall_at + 1 :]:
        if re.search(r"pip install .*-e ", cmd):
            assert "--no-deps" in cmd, cmd
        assert not re.search(r"pip install [^|;&]*faiss-cpu", cmd), cmd
    assert any(re.search(r"pip show -q faiss-cpu", c) for c in cmds[gpu_extra_at:])
    # The head gets plain faiss-cpu only.
    assert not any("gpu" in c and "pip install" in c for c in prepared["head_setup_commands"])


def test_gpu_requirements_generator_drops_faiss_cpu(prepared):
    """Run the worker's requirements one-liner on this repository's pyproject.toml."""
    (cmd,) = [c for c in prepared["worker_setup_commands"] if "tomllib" in c]
    code = re.search(r'python -c "(.*)"', cmd).group(1)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True, timeout=30
    ).stdout.split()
    assert not [r for r in out if r.lower().replace("_", "-").startswith("faiss-cpu")], out
    assert any(r.startswith("faiss-gpu") for r in out), out
    assert TORCH_PIN in out and TORCHVISION_PIN in out
    # It installs from the requirements file that it writes.
    target = re.search(r">\s*(\S+)\s*$", cmd).group(1)
    assert any(f"pip install -q -r {target}" in c for c in prepared["worker_setup_commands"])


# --- least privilege ----------------------------------------------------------------------------------


def _policy(name: str) -> list[dict]:
    import json

    return json.loads((REPO / "iam" / name).read_text())["Statement"]


def _actions(statements: list[dict]) -> set[str]:
    return {a for s in statements for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}


def test_head_and_workers_have_their_own_instance_profiles(raw, prepared):
    """An IamInstanceProfile on the head keeps `ray up` from attaching its default role (EC2 and S3 full
    access); the workers get a profile of their own, and both are marked EDIT ME."""
    head = _head_type(prepared)["node_config"]["IamInstanceProfile"]["Arn"]
    workers = {
        n: t["node_config"]["IamInstanceProfile"]["Arn"] for n, t in _gpu_worker_types(prepared).items()
    }
    assert workers and head not in workers.values()
    for arn in (head, *workers.values()):
        assert re.fullmatch(r"arn:aws:iam::[A-Z0-9-]+:instance-profile/[\w+=,.@-]+", arn), arn
    lines = CLUSTER_YAML.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "IamInstanceProfile:":
            assert any("EDIT ME" in prev for prev in lines[i - 3 : i]), f"line {i + 1} not marked EDIT ME"


def test_policies_grant_only_what_each_role_needs():
    head, worker = _policy("head-policy.json"), _policy("worker-policy.json")
    # workers: S3 only, on named prefixes; no EC2, no IAM
    assert {a.split(":")[0] for a in _actions(worker)} == {"s3"}
    for policy in (head, worker):
        assert all(s["Effect"] == "Allow" for s in policy)
        assert not {a for a in _actions(policy) if a.endswith("*")}  # no wildcard actions
        for s in policy:
            if any(a.startswith("s3:") for a in _actions([s])):
                for resource in s["Resource"]:
                    assert re.fullmatch(r"arn:aws:s3:::[A-Z-]+(/[A-Z-]+/\*)?", resource), resource
                if "s3:ListBucket" in _actions([s]):
                    assert s["Condition"]["StringLike"]["s3:prefix"]  # listing limited to the prefix
    assert {"s3:DeleteObject", "s3:PutObject"} <= _actions(worker)
    # head: the autoscaler's EC2 calls, termination only of this cluster's instances, and passing only the
    # worker role
    assert {"ec2:RunInstances", "ec2:TerminateInstances", "iam:PassRole"} <= _actions(head)
    assert {a.split(":")[0] for a in _actions(head)} == {"ec2", "iam", "s3"}
    (stop,) = [s for s in head if "ec2:TerminateInstances" in _actions([s])]
    assert stop["Condition"]["StringEquals"]["ec2:ResourceTag/ray-cluster-name"] == "rebalance"
    (pass_role,) = [s for s in head if "iam:PassRole" in _actions([s])]
    assert pass_role["Resource"] == ["arn:aws:iam::ACCOUNT-ID:role/rebalance-worker"]
    assert yaml.safe_load(CLUSTER_YAML.read_text())["cluster_name"] == "rebalance"
