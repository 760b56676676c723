"""The concepts stage through the CLI and the run directory: vocabulary (MetaCLIP) matches and weights
against a reference of MetaCLIP's code, zero-shot labels against an independent recomputation, the
fingerprint chain, and bad vocabulary / prompt files."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from metaclip_reference import entry_probabilities, substr_matching

import rebalance
from rebalance.data.parts import read_parts
from rebalance.data.synthetic import COLOURS, LABELS, PROMPTS_FILE, SHAPES, VOCABULARY_FILE
from rebalance.models import load_model

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "rebalance.cli", "-q", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_builtin_files_name_the_builtin_concepts():
    assert VOCABULARY_FILE.read_text().splitlines() == [*LABELS, *COLOURS, *SHAPES]
    assert PROMPTS_FILE.read_text().splitlines() == [f"a photo of a {label}" for label in LABELS]


def test_vocabulary_concept_marginal_through_cli(demo_copy):
    """MetaCLIP over the shipped vocabulary on the carried ``label`` column: matches and keep
    probabilities equal the reference's, and balanced on ``concept`` alone a row's weight is p / mean(p)."""
    spec = yaml.safe_load((demo_copy / "spec.yaml").read_text())
    spec["concepts"] = {"vocabulary": str(VOCABULARY_FILE), "field": "label", "cap": 30}
    spec["balance"] = {"marginals": ["concept"], "tol": 1e-9}
    (demo_copy / "concepts.yaml").write_text(yaml.safe_dump(spec))
    before = json.loads((demo_copy / "manifest.json").read_text())["stages"]
    proc = _cli("run", demo_copy / "concepts.yaml", "--out", demo_copy)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stages = json.loads((demo_copy / "manifest.json").read_text())["stages"]
    assert stages["embed"] == before["embed"] and stages["cluster"] == before["cluster"]
    assert stages["concepts"]["status"] == "complete"

    vocabulary = VOCABULARY_FILE.read_text().splitlines()
    labels = read_parts(demo_copy / "embeddings", columns=["label"]).column("label").to_pylist()
    concepts = read_parts(demo_copy / "concepts")
    expected = [substr_matching(label.casefold(), [v.casefold() for v in vocabulary]) for label in labels]
    assert concepts.column("concept_entries").to_pylist() == expected
    assert concepts.column("key").to_pylist() == read_parts(demo_copy / "weights").column("key").to_pylist()
    entry_prob = entry_probabilities(expected, len(vocabulary) + 1, 30)  # + the <none> pseudo-entry
    keep = np.array([1 - np.prod([1 - entry_prob[e] for e in row]) for row in expected])
    entries = pq.read_table(demo_copy / "concepts" / "entries.parquet")
    assert entries.column("entry").to_pylist() == [*vocabulary, "<none>"]
    np.testing.assert_array_equal(entries.column("probability").to_numpy(), entry_prob)
    weights = read_parts(demo_copy / "weights")
    np.testing.assert_allclose(weights.column("weight").to_numpy(), keep / keep.mean(), rtol=1e-12)
    np.testing.assert_array_equal([float(c) for c in weights.column("concept").to_pylist()], keep)
    record = json.loads((demo_copy / "concepts" / "concepts.json").read_text())
    assert record["rows_unmatched"] == 0 and record["entries_matched"] == len(vocabulary)
    assert json.loads((demo_copy / "balance.json").read_text())["targets"]["concept"] == {
        "metaclip": {"cap": 30.0}
    }


def test_zero_shot_marginal_and_fingerprint_chain(demo_copy, tmp_path, ray_local, caplog):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a red circle\n\na photo of a blue square\na photo of a green cross\n")
    vocabulary = tmp_path / "vocabulary.txt"
    vocabulary.write_text("zebra\nquokka\n")
    spec = rebalance.Spec.from_yaml(demo_copy / "spec.yaml").to_dict()
    spec["concepts"] = {
        "prompts": str(prompts),
        "threshold": 0.5,
        "vocabulary": str(vocabulary),
        "field": "label",
    }
    spec["balance"] = {"marginals": ["zero_shot"], "tol": 1e-9}
    before = json.loads((demo_copy / "manifest.json").read_text())["stages"]
    with caplog.at_level(logging.WARNING, logger="rebalance"):
        result = rebalance.run(spec, demo_copy)
    assert "matches no value of column 'label'" in caplog.text
    stages = result.manifest["stages"]
    assert stages["embed"] == before["embed"] and stages["cluster"] == before["cluster"]

    names = ["a photo of a red circle", "a photo of a blue square", "a photo of a green cross"]
    model = load_model("rebalance-tiny", "synthetic")
    q = model.model.encode_text(model.tokenizer(names)).detach().numpy().astype(np.float64)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    x = np.stack(read_parts(demo_copy / "embeddings", columns=["image"]).column("image").to_numpy(False))
    x = x.astype(np.float64) / np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ q.T
    expected = np.where(sim.max(1) >= 0.5, np.array(names, dtype=object)[sim.argmax(1)], "<none>")
    concepts = read_parts(demo_copy / "concepts")
    assert concepts.column("zero_shot").to_pylist() == expected.tolist()
    np.testing.assert_allclose(concepts.column("zero_shot_similarity").to_numpy(), sim.max(1), atol=1e-5)
    assert len(set(expected)) == 4  # all three prompts and <none> occur
    # Balanced uniform over the zero-shot labels.
    w = result.weights.column("weight").to_numpy()
    values, inverse = np.unique(result.weights.column("zero_shot").to_pylist(), return_inverse=True)
    np.testing.assert_allclose(np.bincount(inverse, weights=w) / w.sum(), 1 / len(values), atol=1e-9)
    # No vocabulary match: a warning, and every row is the <none> entry (unmatched: entry).
    record = json.loads((demo_copy / "concepts" / "concepts.json").read_text())
    assert record["rows_unmatched"] == 3000 and record["warning"] == "the vocabulary matches no row"
    assert record["zero_shot_counts"] == {n: expected.tolist().count(n) for n in [*names, "<none>"]}
    assert all(not e for e in concepts.column("concept_entries").to_pylist())

    # An edited prompt file reruns concepts and what follows it, not embed or cluster.
    first = result.manifest["stages"]
    prompts.write_text("a photo of a red circle\na photo of a blue square\n")
    result = rebalance.run(spec, demo_copy)
    stages = result.manifest["stages"]
    assert stages["cluster"] == first["cluster"]
    for stage in ("concepts", "balance", "report"):
        assert stages[stage]["fingerprint"] != first[stage]["fingerprint"]
    assert set(result.weights.column("zero_shot").to_pylist()) <= {*names[:2], "<none>"}


def _bad_spec(tmp_path: Path, case: str) -> tuple[dict, list[str]]:
    """A spec with one bad concepts input, and the parts its one-line error must name."""
    vocabulary = tmp_path / "vocabulary.txt"
    vocabulary.write_text("dog\ncat\n")
    concepts = {"vocabulary": str(vocabulary), "field": "txt"}
    balance = {"marginals": ["concept"]}
    expected = ["concepts.vocabulary", str(vocabulary)]
    if case == "missing":
        vocabulary.unlink()
        expected.append("file does not exist")
    elif case == "empty":
        vocabulary.write_text("\n  \n")
        expected.append("holds no entries")
    elif case == "latin-1":
        vocabulary.write_bytes("caf\u00e9\n".encode("latin-1"))
        expected.append("not UTF-8")
    elif case == "duplicate":
        vocabulary.write_text("Dog\ncat\ndog\n")
        expected.append("line 3 ('dog') repeats line 1")
    elif case == "field":
        concepts["field"] = "caption"
        expected = ["concepts.field", "'caption'", "data.carry"]
    elif case == "no field":
        del concepts["field"]
        expected = ["concepts.field", "is required"]
    else:
        balance = {"marginals": ["zero_shot"]}
        expected = ["balance.marginals", "'zero_shot'"]
    data = {"path": str(tmp_path), "carry": ["txt"]}
    return {"data": data, "concepts": concepts, "balance": balance}, expected


@pytest.mark.parametrize(
    "case", ["missing", "empty", "latin-1", "duplicate", "field", "no field", "marginal"]
)
def test_bad_concept_inputs_are_spec_errors_naming_field_and_file(tmp_path, case):
    spec, expected = _bad_spec(tmp_path, case)
    with pytest.raises(rebalance.SpecError) as err:
        rebalance.Spec.from_dict(spec)
    message = str(err.value)
    assert "\n" not in message
    for part in expected:
        assert part in message


def test_bad_vocabulary_fails_the_cli_in_one_line_before_any_work(tmp_path):
    spec, expected = _bad_spec(tmp_path, "duplicate")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "run"
    proc = _cli("run", tmp_path / "spec.yaml", "--out", out)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for part in expected:
        assert part in lines[0]
    assert not out.exists()  # nothing written, no Ray started


def test_prompt_file_errors_name_the_prompts_field(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"\xff\xfe")
    with pytest.raises(rebalance.SpecError, match=r"concepts.prompts.*not UTF-8"):
        rebalance.Spec.from_dict({"data": {"path": str(tmp_path)}, "concepts": {"prompts": str(prompts)}})
