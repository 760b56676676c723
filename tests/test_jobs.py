"""The downstream jobs: 2-step smoke runs on a local Ray (Ray Train TorchTrainer, one CPU worker), resume
from checkpoints, and the probe's metrics against hand-computed values."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from jobs import linear_probe, train_clip, train_longtail, train_ssl
from jobs.metrics import class_metrics
from rebalance.data.synthetic import generate_dataset
from rebalance.models import load_model
from rebalance.runtime.session import resolve_address
from rebalance.spec import RaySpec

SMOKE = ["--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "16", "--warmup-steps", "1"]


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("job", [train_clip, train_longtail, train_ssl, linear_probe])
def test_help_documents_options(job, capsys):
    with pytest.raises(SystemExit) as exit_info:
        job.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"python -m jobs.{job.__name__.split('.')[-1]}" in text
    expected = {
        train_clip: [
            "--weights",
            "--balanced-loss-iters",
            "--loss-iterations",
            "--frozen",
            "--eval",
            "--num-workers",
            "--gpu",
            "--epochs",
        ],
        train_longtail: ["--loss", "logit_adjusted", "--drw-epoch", "--eval-data", "--weights"],
        train_ssl: ["--gh", "--gh-run", "--gh-warmup-epochs", "--weights"],
        linear_probe: ["--test-data", "--class-counts-from", "--pretrained", "class gap"],
    }[job]
    for option in expected:
        assert option in text


@pytest.mark.ray
def test_train_clip_smoke_resume_and_settings_guard(ray_local, demo_run, tmp_path, capsys):
    out = tmp_path / "clip"
    args = [
        str(demo_run / "dataset"),
        "--out",
        str(out),
        "--weights",
        str(demo_run),
        "--balanced-loss-iters",
        "2",
    ]
    assert train_clip.main(args + SMOKE) == 0
    first = last_json(capsys)
    assert (first["epochs"], first["steps"], first["start_epoch"], first["resumed"]) == (1, 2, 0, False)
    assert np.isfinite(first["last_metrics"]["loss"])
    model1 = load_file(out / "model.safetensors")
    # the trained model loads as an open_clip checkpoint and differs from the seeded random initialisation
    model = load_model("rebalance-tiny", str(out / "model.safetensors"), seed=0).model
    random_init = load_model("rebalance-tiny", None, seed=0).model
    assert torch.equal(model.state_dict()["visual.conv1.weight"], model1["visual.conv1.weight"])
    assert not torch.equal(random_init.state_dict()["visual.conv1.weight"], model1["visual.conv1.weight"])

    # a second invocation with more epochs resumes after epoch 0: it trains epoch 1 only (steps 3, 4)
    assert train_clip.main(args + SMOKE[:1] + ["2"] + SMOKE[2:]) == 0
    second = last_json(capsys)
    assert (second["epochs"], second["steps"], second["start_epoch"], second["resumed"]) == (2, 4, 1, True)
    assert second["last_metrics"]["epoch"] == 1
    model2 = load_file(out / "model.safetensors")
    assert not torch.equal(model1["visual.conv1.weight"], model2["visual.conv1.weight"])
    assert json.loads((out / "summary.json").read_text()) == second

    # the same directory with other training settings is refused before any work
    with pytest.raises(ValueError, match="balanced_loss_iters: 2 -> 0"):
        train_clip.main(args[:-1] + ["0"] + SMOKE)


@pytest.mark.ray
def test_train_clip_frozen_heads_on_run_embeddings_with_zero_shot(ray_local, demo_run, tmp_path, capsys):
    """``--frozen --embeddings RUN``: heads trained on the run's features; the zero-shot recall it reports is
    recomputed here by hand from the saved heads (MLP, cosine, argmax, mean per-class recall)."""
    from jobs.dataset import ImageTextParquet

    data = ImageTextParquet(demo_run / "dataset", label_column="label")
    clip = load_model("rebalance-tiny", "synthetic")
    # the demo embedded its rows with the shipped towers: the run's features are the towers' own
    image, text = train_clip.run_embeddings(str(demo_run), data.keys)
    mine_image, mine_text = train_clip.frozen_features(clip, data)
    np.testing.assert_allclose(image, mine_image, atol=1e-4)
    np.testing.assert_allclose(text, mine_text, atol=1e-4)

    out = tmp_path / "heads"
    held_out = tmp_path / "held"
    generate_dataset(held_out, n_rows=48, n_shards=1, seed=5)  # 2 rows of each of the 24 concepts
    args = [str(demo_run / "dataset"), "--out", str(out), "--frozen", "--pretrained", "synthetic"]
    args += ["--embeddings", str(demo_run), "--loss-iterations", "2", "--eval", str(held_out)]
    assert train_clip.main(args + SMOKE + ["--head-hidden", "32"]) == 0
    metrics = last_json(capsys)["last_metrics"]
    assert np.isfinite(metrics["loss"])

    heads = load_file(out / "model.safetensors")
    assert heads["image_head.0.weight"].shape == (32, 64) and heads["text_head.2.weight"].shape == (64, 32)

    def head(side, x):
        h = torch.nn.functional.gelu(x @ heads[f"{side}.0.weight"].T + heads[f"{side}.0.bias"])
        return torch.nn.functional.normalize(h @ heads[f"{side}.2.weight"].T + heads[f"{side}.2.bias"], dim=1)

    test = ImageTextParquet(held_out, text_column=None, label_column="label")
    test_image = torch.as_tensor(train_clip.encode_rows(clip, test))
    prompts = torch.as_tensor(clip.encode_texts([f"a photo of a {c}" for c in test.class_names]))
    pred = (head("image_head", test_image) @ head("text_head", prompts).T).argmax(1).numpy()
    recalls = [np.mean(pred[test.targets == c] == c) for c in range(len(test.class_names))]
    assert metrics["zero_shot_balanced_recall"] == pytest.approx(np.mean(recalls))
    assert metrics["zero_shot_worst_recall"] == pytest.approx(min(recalls))

    with pytest.raises(SystemExit, match="need --frozen"):
        train_clip.main([str(demo_run / "dataset"), "--out", str(tmp_path / "x"), "--eval", str(held_out)])


@pytest.mark.ray
def test_train_longtail_smoke_with_eval(ray_local, demo_run, tmp_path, capsys):
    out = tmp_path / "lt"
    generate_dataset(tmp_path / "eval", n_rows=48, n_shards=1, seed=5)  # 2 rows of each of the 24 concepts
    args = [str(demo_run / "dataset"), "--out", str(out), "--loss", "logit_adjusted"]
    assert train_longtail.main(args + SMOKE + ["--eval-data", str(tmp_path / "eval")]) == 0
    summary = last_json(capsys)
    assert (summary["epochs"], summary["steps"]) == (1, 2)
    head = load_file(out / "head.safetensors")
    assert head["weight"].shape == (24, 64)  # 24 concepts, 64-d features of rebalance-tiny
    result = json.loads((out / "eval.json").read_text())
    for kind in ("raw", "posthoc_adjusted"):
        per_class = result[kind]["per_class_accuracy"]
        assert len(per_class) == 24
        assert result[kind]["balanced_accuracy"] == pytest.approx(np.mean(list(per_class.values())))
        assert set(result[kind]["support"].values()) == {2}
    assert sum(result["train_class_counts"].values()) == 3000


@pytest.mark.ray
def test_train_ssl_gh_smoke(ray_local, demo_run, tmp_path, capsys):
    out = tmp_path / "ssl"
    args = [str(demo_run / "dataset"), "--out", str(out), "--gh", "--gh-run", str(demo_run)]
    assert train_ssl.main(args + SMOKE + ["--gh-ramp-epochs", "2"]) == 0
    summary = last_json(capsys)
    assert summary["gh_classes"] == 16 and summary["steps"] == 2
    assert summary["last_metrics"]["gh_weight"] == 0.5  # epoch 0 of a 2-epoch ramp without warm-up
    assert load_file(out / "projector.safetensors")["2.weight"].shape == (128, 256)
    # pi is the run's image-cluster marginal: the cluster sizes over the row count
    sizes = np.array(json.loads((demo_run / "clusters" / "clusters.json").read_text())["image"]["sizes"])
    assert train_ssl.run_cluster_marginal(demo_run) == pytest.approx(sizes / sizes.sum())


def test_linear_probe_end_to_end(demo_run, tmp_path, capsys):
    out = tmp_path / "probe.json"
    assert linear_probe.main([str(demo_run / "dataset"), "--out", str(out), "--max-iter", "50"]) == 0
    result = last_json(capsys)
    assert json.loads(out.read_text()) == result
    acc = np.array(list(result["per_class_accuracy"].values()))
    assert len(acc) == 24 and result["test_rows"] + result["train_rows"] == 3000
    assert result["balanced_accuracy"] == pytest.approx(acc.mean())
    assert result["class_gap"] == pytest.approx(acc.max() - acc.min())
    assert result["class_std"] == pytest.approx(acc.std())
    assert 1 / 24 < result["balanced_accuracy"] <= 1  # better than chance even with random features
    # tail = the 8 rarest classes of the training data (the generator's last 8 concepts)
    assert sorted(result["tail_classes"]) == sorted(
        ["cyan circle", "cyan square", "cyan triangle", "cyan cross"]
        + ["purple circle", "purple square", "purple triangle", "purple cross"]
    )


def test_class_metrics_by_hand():
    names = ["a", "b", "c"]
    y_true = [0, 0, 0, 0, 1, 1, 2, 2]
    y_pred = [0, 0, 0, 1, 1, 0, 0, 0]  # a: 3/4, b: 1/2, c: 0/2
    m = class_metrics(y_true, y_pred, names, class_counts=[100, 10, 1])
    assert m["per_class_accuracy"] == {"a": 0.75, "b": 0.5, "c": 0.0}
    assert m["balanced_accuracy"] == pytest.approx(1.25 / 3)
    assert m["accuracy"] == pytest.approx(4 / 8)
    assert m["class_gap"] == pytest.approx(0.75)
    assert m["class_std"] == pytest.approx(np.std([0.75, 0.5, 0.0]))
    assert (m["tail_classes"], m["tail_accuracy"]) == (["c"], 0.0)
    assert (m["head_classes"], m["head_accuracy"]) == (["a"], 0.75)
    assert (m["worst_class"], m["best_class"]) == ("c", "a")


def test_stratified_split_and_logistic_probe():
    targets = np.array([0] * 10 + [1] * 3 + [2])
    train_idx, test_idx = linear_probe.stratified_split(targets, 0.5, seed=0)
    assert set(train_idx).isdisjoint(test_idx) and len(train_idx) + len(test_idx) == 14
    assert np.bincount(targets[test_idx], minlength=3).tolist() == [5, 2, 0]  # round(1.5) = 2; 1 row: train
    # linearly separable clusters: the probe fits them exactly
    rng = np.random.default_rng(0)
    centres = np.array([[4.0, 0.0], [0.0, 4.0], [-4.0, -4.0]])
    y = np.repeat(np.arange(3), 20)
    x = centres[y] + rng.normal(0, 0.5, size=(60, 2))
    w, b = linear_probe.fit_logistic(x, y, 3, l2=1e-4)
    assert ((torch.as_tensor(x) @ w.T + b).argmax(1).numpy() == y).all()


def test_resolve_address(monkeypatch):
    # the jobs' --address goes through the library's Ray session: None = start a local instance
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(RaySpec(address="auto")) is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert resolve_address(RaySpec(address="auto")) == "10.0.0.1:6379"
    assert resolve_address(RaySpec(address="local")) is None
    assert resolve_address(RaySpec(address="10.0.0.2:6379")) == "10.0.0.2:6379"
