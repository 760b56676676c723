"""Shared fixtures: one built-in demo run (through the CLI, as a user runs it) reused by many tests.

Every test that needs the demo run or a local Ray (fixtures ``demo_run``, ``demo_copy``, ``ray_local``, or
the ``ray`` marker) is marked ``slow`` here, so ``pytest -m "not slow"`` is the fast inner loop; other slow
tests carry ``@pytest.mark.slow`` themselves.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLOW_FIXTURES = frozenset({"demo_run", "demo_copy", "ray_local"})


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("ray"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """`rebalance demo` on the default built-in dataset (3000 rows, 4 shards), run once per session."""
    out = tmp_path_factory.mktemp("demo") / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "rebalance.cli", "demo", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (out / "demo_stdout.txt").write_text(proc.stdout)
    return out


@pytest.fixture
def demo_copy(demo_run, tmp_path) -> Path:
    """A private copy of the demo run directory that a test may change."""
    target = tmp_path / "run"
    shutil.copytree(demo_run, target)
    return target


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for in-process pipeline runs (the pipeline reuses an initialised Ray)."""
    import ray

    ray.init(
        address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False
    )
    yield
    ray.shutdown()
