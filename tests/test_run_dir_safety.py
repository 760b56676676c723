"""A run never deletes what it did not write: a foreign --out is refused before Ray starts, and only the
temporary files of dead writers are cleaned when a stage starts (no Ray: the stages are not run)."""

import subprocess
import sys

import pytest
import yaml

import rebalance
from rebalance.cli import demo_spec
from rebalance.runtime.manifest import RunDir, check_run_dir


def _spec(tmp_path) -> dict:
    (tmp_path / "data").mkdir(exist_ok=True)  # never read: the run directory is refused first
    spec = demo_spec(str(tmp_path / "data"))
    spec["ray"] = {"address": "local", "num_cpus": 1}
    return spec


def test_a_non_empty_directory_without_a_manifest_is_refused_before_ray_starts(tmp_path, monkeypatch):
    # whether or not an earlier test left a Ray running in this process, the run must not reach Ray
    sessions = []
    monkeypatch.setattr(rebalance.api, "ray_session", lambda spec: sessions.append(spec))
    out = tmp_path / "mine"
    (out / "report").mkdir(parents=True)
    (out / "report" / "thesis.tex").write_text("years of work")
    (out / "balance.json").write_text("{}")
    with pytest.raises(RuntimeError, match=f"{out} is not empty and holds no manifest.json") as err:
        rebalance.run(_spec(tmp_path), out)
    assert "balance.json, report" in str(err.value)
    assert sessions == []
    assert (out / "report" / "thesis.tex").read_text() == "years of work"
    # the CLI says the same, exit 1, before Ray starts
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(_spec(tmp_path)))
    proc = subprocess.run(
        [sys.executable, "-m", "rebalance.cli", "-q", "run", str(tmp_path / "spec.yaml"), "--out", str(out)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1 and "holds no manifest.json" in proc.stderr, proc.stderr[-2000:]
    assert "Started a local Ray" not in proc.stderr


def test_new_empty_and_run_directories_are_accepted(tmp_path):
    check_run_dir(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    check_run_dir(tmp_path / "empty")
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text('{"stages": {}}')
    (run / "anything").write_text("")
    check_run_dir(run)
    # what the caller put there itself, and the temporary file of a killed first manifest write
    demo = tmp_path / "demo"
    (demo / "dataset").mkdir(parents=True)
    (demo / ".manifest.json.tmp-123").write_text("")
    check_run_dir(demo, keep=("dataset",))
    with pytest.raises(RuntimeError, match="holds dataset"):
        check_run_dir(demo)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporary_files_of_dead_writers_are_removed_when_a_stage_starts(tmp_path):
    dead, alive = _dead_pid(), subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run = RunDir(tmp_path / "run")
        run.begin("embed", "fp-embed")
        parts = tmp_path / "run" / "embeddings"
        parts.mkdir()
        committed = parts / "part-00000.parquet"
        committed.write_bytes(b"PAR1")
        stale = [parts / f".part-00001.parquet.tmp-{dead}", tmp_path / "run" / f".manifest.json.tmp-{dead}"]
        stale.append(tmp_path / "run" / f".balance.json.tmp-{dead}")
        kept = [
            parts / f".part-00002.parquet.tmp-{alive.pid}",  # a writer that may still be running
            parts / ".notes.tmp-draft",  # not a temporary name of ours
            tmp_path / "run" / f".balance.json.tmp-{alive.pid}",
        ]
        for path in stale + kept:
            path.write_bytes(b"x")
        run.fail("embed", "killed")
        RunDir(tmp_path / "run").begin("embed", "fp-embed")  # resumes: committed parts are kept
        assert committed.exists()
        assert [p.name for p in stale if p.exists()] == [stale[2].name]  # balance has not started yet
        assert all(p.exists() for p in kept)
        RunDir(tmp_path / "run").begin("balance", "fp-balance")
        assert not any(p.exists() for p in stale)
        assert [p.exists() for p in kept] == [True, True, True]  # its writer is alive
    finally:
        alive.kill()
        alive.wait()
