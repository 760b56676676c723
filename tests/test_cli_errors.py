"""A new user's first contact, through the CLI: one line per error before the expensive work, the exit codes
the README documents (2: spec or input error, 1: failure while running, 130: interrupted), no traceback
unless --verbose, and the CLI's own help, version, logs and summary."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rebalance.cli import demo_spec
from rebalance.data.synthetic import generate_dataset

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, env: dict | None = None, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rebalance.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """120 rows of the built-in dataset in 2 Parquet shards."""
    path = tmp_path_factory.mktemp("cli") / "data"
    generate_dataset(path, n_rows=120, n_shards=2, seed=0)
    return path


def _spec(tmp_path: Path, data: Path, **sections) -> Path:
    spec = demo_spec(str(data))
    spec["cluster"] = {"image": {"k": 4}, "text": {"k": 4}, "niter": 5, "seed": 0}
    spec["ray"] = {"address": "local", "num_cpus": 2}
    for name, values in sections.items():
        spec[name] = {**spec[name], **values}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _assert_one_line_error(proc: subprocess.CompletedProcess, code: int, first: str, before_ray: bool = True):
    """Exit ``code``; one line of stderr is the error, starting with ``first`` (stderr's first line for an
    error found before Ray starts, its last for one found while running); no traceback anywhere."""
    assert proc.returncode == code, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("rebalance: error:")]
    assert len(errors) == 1 and errors[0].startswith(first), proc.stderr[-3000:]
    assert lines[0 if before_ray else -1] == errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout


def test_unknown_model_is_a_spec_error_before_ray(tmp_path, dataset):
    spec = _spec(tmp_path, dataset, embed={"model": "ViT-B-99", "pretrained": None})
    proc = _cli("run", str(spec), "--out", str(tmp_path / "out"), timeout=60)
    _assert_one_line_error(proc, 2, "rebalance: error: spec field 'embed.model': not an open_clip model")
    assert "'ViT-B-99'" in proc.stderr and "ViT-B-32" in proc.stderr  # the close names are suggested
    assert "Ray" not in proc.stderr and not (tmp_path / "out").exists()
    # The traceback only with --verbose, the one line still last.
    proc = _cli("--verbose", "run", str(spec), "--out", str(tmp_path / "out"), timeout=60)
    assert proc.returncode == 2 and "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("rebalance: error: spec field 'embed.model'")


def test_pretrained_tag_not_in_the_cache_without_network(tmp_path, dataset):
    spec = _spec(tmp_path, dataset, embed={"model": "ViT-B-32", "pretrained": "openai"})
    empty = {"HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = _cli("run", str(spec), "--out", str(tmp_path / "out"), env=empty, timeout=60)
    _assert_one_line_error(
        proc, 2, "rebalance: error: spec field 'embed.pretrained': the weights of ViT-B-32"
    )
    assert "not in this machine's cache" in proc.stderr and "local checkpoint" in proc.stderr
    # A tag the model does not have, or a checkpoint path that does not exist, is a spec error too.
    missing = _spec(tmp_path, dataset, embed={"model": "ViT-B-32", "pretrained": "no-such-tag"})
    proc = _cli("run", str(missing), "--out", str(tmp_path / "out"), timeout=60)
    _assert_one_line_error(proc, 2, "rebalance: error: spec field 'embed.pretrained': neither an existing")
    assert "openai" in proc.stderr  # the model's tags are listed


def test_k_above_the_declared_rows_fails_before_ray(tmp_path, dataset):
    spec = _spec(tmp_path, dataset, cluster={"image": {"k": 1000}})
    proc = _cli("run", str(spec), "--out", str(tmp_path / "out"), timeout=60)
    _assert_one_line_error(proc, 2, "rebalance: error: spec field 'cluster.image.k': exceeds the 120 rows")
    # a run that stops before the cluster stage (until="embed") is not refused for a k it never uses
    from rebalance.data.readers import list_shards
    from rebalance.preflight import check_run
    from rebalance.spec import Spec, SpecError

    parsed = Spec.from_yaml(spec)
    shards = list_shards(parsed.data)
    check_run(parsed, tmp_path / "embed-only", shards, ["image", "text"], embed=False, cluster=False)
    with pytest.raises(SpecError, match="exceeds the 120 rows"):
        check_run(parsed, tmp_path / "embed-only", shards, ["image", "text"], embed=False, cluster=True)


def test_a_vocabulary_that_matches_no_caption_is_a_warning_before_embedding(tmp_path, dataset, caplog):
    from rebalance.data.readers import list_shards
    from rebalance.data.synthetic import VOCABULARY_FILE
    from rebalance.preflight import check_run, check_vocabulary_matches
    from rebalance.spec import Spec

    spec = demo_spec(str(dataset), concepts="vocabulary")
    parsed = Spec.from_dict(spec)
    shards = list_shards(parsed.data)
    # the shipped vocabulary names the built-in concepts: captions match it
    assert check_vocabulary_matches(parsed, shards) > 0
    assert check_vocabulary_matches(parsed, shards, rows=7) <= 7
    (tmp_path / "vocab.txt").write_text("zebra crossing\nquantum foam\n")
    spec["concepts"]["vocabulary"] = str(tmp_path / "vocab.txt")
    parsed = Spec.from_dict(spec)
    with caplog.at_level("WARNING", logger="rebalance.preflight"):
        check_run(parsed, tmp_path / "out", shards, ["image", "text"], embed=True)
    (warning,) = [r.getMessage() for r in caplog.records if "matches none" in r.getMessage()]
    assert check_vocabulary_matches(parsed, shards) == 0
    assert "vocab.txt matches none of the first 120 values of field 'txt'" in warning
    assert "kept as one entry '<none>'" in warning
    assert VOCABULARY_FILE.is_file()


def test_out_under_a_regular_file(tmp_path, dataset):
    spec = _spec(tmp_path, dataset)
    (tmp_path / "file").write_text("x")
    proc = _cli("run", str(spec), "--out", str(tmp_path / "file" / "run"), timeout=60)
    _assert_one_line_error(proc, 2, f"rebalance: error: --out {tmp_path / 'file' / 'run'} is under")
    assert "which is a regular file" in proc.stderr


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs a /proc filesystem")
def test_out_that_cannot_be_created(tmp_path, dataset):
    spec = _spec(tmp_path, dataset)
    proc = _cli("run", str(spec), "--out", "/proc/x", timeout=60)
    _assert_one_line_error(
        proc, 2, "rebalance: error: --out /proc/x: cannot create the run directory in /proc"
    )
    assert "No such file or directory" not in proc.stderr


def test_duplicate_keys_across_shards(tmp_path, dataset):
    data = tmp_path / "dup"
    shutil.copytree(dataset, data)
    shutil.copy(data / "part-00000.parquet", data / "part-00002.parquet")
    spec = _spec(tmp_path, data)
    proc = _cli("-q", "run", str(spec), "--out", str(tmp_path / "out"))
    _assert_one_line_error(proc, 2, "rebalance: error: duplicate keys", before_ray=False)
    assert "part-00000" in proc.stderr and "part-00002" in proc.stderr


def test_a_model_that_cannot_load_inside_the_actors_is_not_retried(tmp_path, dataset):
    # A checkpoint that exists but is not one: the actors fail to build the model. One line, exit 1, once.
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a checkpoint")
    spec = _spec(tmp_path, dataset, embed={"pretrained": str(bad)})
    proc = _cli("-q", "run", str(spec), "--out", str(tmp_path / "out"))
    _assert_one_line_error(proc, 1, "rebalance: error: ", before_ray=False)
    assert "broken.safetensors" in proc.stderr.strip().splitlines()[-1]
    assert "ActorDiedError" not in proc.stderr


def test_yaml_numbers_html_off_skipped_stages_and_the_summary(tmp_path, dataset):
    # `tol: 1e-6` as users write it; report.html off: the summary names no report.html that does not exist.
    spec = _spec(tmp_path, dataset, report={"html": False})
    spec.write_text(spec.read_text().replace("tol: 1.0e-06", "tol: 1e-6"))
    assert "tol: 1e-6" in spec.read_text()
    out = tmp_path / "out"
    proc = _cli("embed", str(spec), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _cli("run", str(spec), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage embed: skipped (complete)" in proc.stderr and "stage cluster: start" in proc.stderr
    assert "report.html" not in proc.stdout and not (out / "report" / "report.html").exists()
    assert "largest weight:" in proc.stdout and "report:" not in proc.stdout
    # Log lines from the stages are whole lines: none carries a progress bar's carriage return.
    assert all(
        "\r" not in line or line.endswith("\r") for line in proc.stderr.split("\n") if " rebalance" in line
    )


def test_ctrl_c_ends_with_one_line_saying_the_run_can_be_resumed(tmp_path, dataset):
    spec = _spec(tmp_path, dataset)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rebalance.cli", "run", str(spec), "--out", str(out)],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        deadline = time.monotonic() + 300
        while not (out / "manifest.json").is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == (
        f"rebalance: interrupted; committed work is kept: run the same command again to resume {out}"
    )
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr


@pytest.mark.parametrize("command", ["run", "embed", "cluster", "concepts", "balance", "report", "demo"])
def test_every_command_has_help(command, capsys):
    from rebalance.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    usage, _, rest = capsys.readouterr().out.partition("\n\n")
    assert usage.startswith(f"usage: rebalance {command}")
    description = rest.split("\n\n")[0]
    assert len(description.split()) >= 15, rest  # a description, not only the argument list


def test_version():
    from rebalance import __version__

    proc = _cli("--version", timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"rebalance {__version__}"
