"""Fair-GAN resynthesis: the fairness metric and bias loss against hand computations, exploration on a toy
generator/classifier, the balanced Parquet through the service's reader, checkpoints and classifiers, and a
smoke run of the whole job on a local Ray."""

import io
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jobs import fair_gan, train_gan
from rebalance.data.readers import list_shards, read_shard, resolve_format
from rebalance.data.synthetic import CONCEPTS, LABELS, generate_dataset, render_image
from rebalance.fairgan import SHIPPED_GENERATOR
from rebalance.fairgan.classifiers import build_classifier, latent_classifier
from rebalance.fairgan.explore import explore
from rebalance.fairgan.io import load_generator, save_module, write_balanced_set
from rebalance.fairgan.loss import bias_mitigation_loss, rarity_weights
from rebalance.fairgan.metrics import (
    class_fractions,
    diagonal_frechet,
    fairness_discrepancy,
    fairness_estimate,
    per_class_feature_distance,
    uniform_floor,
)
from rebalance.fairgan.models import Generator, SmallConvNet
from rebalance.spec import DataSpec


def read_parts(directory):
    return pa.concat_tables(pq.read_table(p) for p in sorted(directory.glob("part-*.parquet")))


# ------------------------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("k", [2, 3, 24])
def test_fd_uniform_and_one_hot(k):
    assert fairness_discrepancy(np.full(k, 1 / k)) == pytest.approx(0.0, abs=1e-15)
    one_hot = np.eye(k)[0]
    expected = math.sqrt((1 - 1 / k) ** 2 + (k - 1) / k**2)
    assert fairness_discrepancy(one_hot) == pytest.approx(expected, rel=1e-12)
    assert fairness_discrepancy(one_hot) == pytest.approx(math.sqrt(1 - 1 / k), rel=1e-12)


def test_fd_hand_computed_distributions():
    # K = 4, p = (1/2, 1/2, 0, 0): four deviations of 1/4 -> sqrt(4 / 16) = 1/2
    assert fairness_discrepancy([0.5, 0.5, 0, 0]) == pytest.approx(0.5)
    # counts are normalised: (2, 1, 1) -> p = (1/2, 1/4, 1/4); (1/6)^2 + 2 (1/12)^2 = 1/24
    assert fairness_discrepancy([2, 1, 1]) == pytest.approx(math.sqrt(1 / 24))
    with pytest.raises(ValueError):
        fairness_discrepancy([0, 0])
    assert class_fractions(np.array([0, 0, 2, -1]), 3).tolist() == [2 / 3, 0, 1 / 3]


def test_fairness_estimate_splits_counts_and_unassigned():
    # 10 of class 0 then 10 of class 1: balanced overall, each of 2 splits all on one class
    labels = np.array([0] * 10 + [1] * 10 + [-1, -1])
    est = fairness_estimate(labels, 2, n_splits=2)
    assert est.fd == pytest.approx(0.0, abs=1e-15)
    assert (est.split_mean, est.split_std) == (pytest.approx(math.sqrt(0.5)), pytest.approx(0.0))
    assert (est.n, est.unassigned, est.counts) == (20, 2, [10, 10])
    assert est.floor == pytest.approx(math.sqrt(0.5 / 20))
    assert est.ci_low <= est.ci_high


def test_confidence_interval_contains_estimate_and_shrinks_with_samples():
    p = np.array([0.5, 0.2, 0.2, 0.1])
    true_fd = fairness_discrepancy(p)  # sqrt(0.0625 + 0.0025 * 2 + 0.0225) = 0.3
    assert true_fd == pytest.approx(0.3)
    rng = np.random.default_rng(0)
    widths = []
    for n in (200, 2000, 20000):
        est = fairness_estimate(rng.choice(4, size=n, p=p), 4, seed=1)
        assert est.ci_low <= est.fd <= est.ci_high
        assert abs(est.fd - true_fd) < 4 * (est.ci_high - est.ci_low) + 0.01
        widths.append(est.ci_high - est.ci_low)
    assert widths[0] > widths[1] > widths[2]
    # the width scales about like 1/sqrt(n): x10 samples -> about 1/3.2 of the width
    assert 2.0 < widths[0] / widths[1] < 5.0 and 2.0 < widths[1] / widths[2] < 5.0
    # a perfectly uniform generator measured on n samples shows FD near the floor, not 0
    fds = [fairness_discrepancy(np.bincount(rng.integers(0, 4, 500), minlength=4)) for _ in range(400)]
    assert math.sqrt(np.mean(np.square(fds))) == pytest.approx(uniform_floor(4, 500), rel=0.1)


def test_diagonal_frechet_and_per_class_distance():
    a = np.array([[0.0, 0.0], [2.0, 2.0]])  # mean (1, 1), std (1, 1)
    b = np.array([[1.0, 3.0], [1.0, 3.0]])  # mean (1, 3), std (0, 0)
    assert diagonal_frechet(a, b) == pytest.approx(4.0 + 2.0)
    assert diagonal_frechet(a, a) == 0.0
    gen_labels, real_labels = np.array([0, 0, 1]), np.array([0, 0, 1, 1])
    gen, real = np.vstack([a, [[5.0, 5.0]]]), np.vstack([b, [[0.0, 0.0], [0.0, 0.0]]])
    assert per_class_feature_distance(gen, gen_labels, real, real_labels, 2) == {0: pytest.approx(6.0)}


# ------------------------------------------------------------------------------------------- loss


def test_bias_loss_hand_computed_and_zero_at_uniform():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.2, 0.7]])
    logits = probs.log().requires_grad_(True)
    # q = (0.4, 0.2, 0.4); q - 1/3 = (1/15, -2/15, 1/15); weights (1, 2, 3)
    expected = (1 / 15) ** 2 * 1 + (2 / 15) ** 2 * 2 + (1 / 15) ** 2 * 3
    loss = bias_mitigation_loss(logits, [1.0, 2.0, 3.0])
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert logits.grad.abs().sum() > 0
    assert bias_mitigation_loss(probs.log()).item() == pytest.approx(
        (1 / 15) ** 2 * 2 + (2 / 15) ** 2, rel=1e-5
    )
    assert bias_mitigation_loss(torch.zeros(5, 4)).item() == pytest.approx(0.0, abs=1e-12)
    assert bias_mitigation_loss(10 * torch.eye(3)).item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        bias_mitigation_loss(torch.zeros(2, 3), [1.0, 1.0])


def test_rarity_weights():
    # w ∝ max(p, 0.01)^-1 = (2, 4, 4, 100), mean 27.5
    w = rarity_weights([0.5, 0.25, 0.25, 0.0], power=1.0, floor=0.01)
    np.testing.assert_allclose(w, np.array([2, 4, 4, 100]) / 27.5)
    np.testing.assert_allclose(rarity_weights([0.9, 0.1], power=0.0), [1.0, 1.0])


# ------------------------------------------------------------------------------------------- exploration


def toy_classify(z: np.ndarray) -> np.ndarray:
    """Quadrant (0-3) of (z0, z1); class 4 (rare, ~1 %) for radius in (2.5, 3.5) in quadrant 0;
    class 5 never."""
    z = np.asarray(z)
    quadrant = (z[:, 0] < 0).astype(int) + 2 * (z[:, 1] < 0).astype(int)
    r = np.linalg.norm(z[:, :2], axis=1)
    return np.where((quadrant == 0) & (r > 2.5) & (r < 3.5), 4, quadrant)


class Counting:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, z):
        self.calls += len(z)
        return self.fn(z)


def test_explore_returns_only_latents_of_the_requested_class():
    classify = Counting(toy_classify)
    result = explore(classify, nz=3, num_classes=6, per_class=40, budget=6000, sigma=0.3, seed_fraction=0.2)
    assert result.calls == classify.calls <= 6000
    for c in range(5):
        z = result.latents[c]
        assert z.shape == (40, 3)
        assert (toy_classify(z) == c).all()
    # the rare class needed the breadth-first search: few seeds among the random samples
    assert result.class_calls[4] > 0
    assert result.counts[5] == 0 and "no seed" in result.unreachable[5]
    assert set(result.unreachable) == {5}
    z, y = result.stacked()
    assert z.shape == (200, 3) and (toy_classify(z) == y).all()


def test_explore_respects_the_budget_and_reports_short_classes():
    classify = Counting(toy_classify)
    result = explore(
        classify, nz=3, num_classes=6, per_class=500, budget=700, seed_fraction=0.5, batch_size=64
    )
    assert classify.calls == result.calls <= 700
    assert result.seed_calls <= 350
    assert set(result.unreachable) == {0, 1, 2, 3, 4, 5}  # 500 per class cannot fit in 700 calls
    assert all("500 latents" in reason for reason in result.unreachable.values())
    assert sum(result.counts.values()) <= 700
    for c, z in result.latents.items():
        assert (toy_classify(z) == c).all() if len(z) else True
    with pytest.raises(ValueError, match="budget"):
        explore(toy_classify, nz=3, num_classes=6, per_class=5, budget=0)
    with pytest.raises(ValueError, match="out of range"):
        explore(toy_classify, nz=3, num_classes=6, per_class=5, budget=10, classes=[7])


def test_explore_dead_branches_are_reported():
    # class 1 is a single point's neighbourhood that every mutation leaves: seeds exist, branches die
    def classify(z):
        return np.where(np.abs(z[:, 0] - 3.0) < 1e-3, 1, 0)

    def seeded(z):
        labels = classify(z)
        labels[0] = 1  # the very first sample counts as class 1 (a seed), none after it
        return labels

    calls = {"n": 0}

    def classify_once(z):
        calls["n"] += 1
        return seeded(z) if calls["n"] == 1 else classify(z)

    result = explore(classify_once, nz=2, num_classes=2, per_class=10, budget=2000, max_failures=5)
    assert result.counts[1] == 1
    assert "every branch failed" in result.unreachable[1]


def slab_classify(z: np.ndarray) -> np.ndarray:
    """Class 1 in the thin slab |z0| < 0.004 (0.3 % of N(0, I) samples), class 0 elsewhere."""
    return (np.abs(np.asarray(z)[:, 0]) < 0.004).astype(np.int64)


def test_explore_adaptive_step_reaches_a_class_smaller_than_the_step():
    # a sigma = 0.5 step lands back in the slab with probability ~0.6 %: the fixed step's branches die
    fixed = explore(slab_classify, nz=6, num_classes=2, per_class=30, budget=5000, sigma=0.5, seed=3)
    assert 1 <= fixed.counts[1] < 30
    assert "every branch failed" in fixed.unreachable[1]
    # halving the step after max_failures rejections (down to 0.001) fills the class within the budget
    classify = Counting(slab_classify)
    adaptive = explore(
        classify, nz=6, num_classes=2, per_class=30, budget=5000, sigma=0.5, sigma_min=0.001, seed=3
    )
    assert classify.calls == adaptive.calls <= 5000
    assert adaptive.counts == {0: 30, 1: 30} and not adaptive.unreachable
    z1 = adaptive.latents[1]
    assert (slab_classify(z1) == 1).all() and (np.abs(z1[:, 0]) < 0.004).all()
    assert len(np.unique(z1, axis=0)) == 30  # distinct latents, not copies of the seeds
    # the same seeds as the fixed step: the random phase is unchanged by the adaptive step
    assert adaptive.seed_calls == fixed.seed_calls
    # sigma_min = sigma is the fixed step exactly
    same = explore(
        slab_classify, nz=6, num_classes=2, per_class=30, budget=5000, sigma=0.5, sigma_min=0.5, seed=3
    )
    assert same.counts == fixed.counts and same.calls == fixed.calls
    np.testing.assert_array_equal(same.latents[1], fixed.latents[1])
    with pytest.raises(ValueError, match="sigma_min"):
        explore(slab_classify, nz=6, num_classes=2, per_class=5, budget=100, sigma=0.5, sigma_min=0.6)


# ------------------------------------------------------------------------------------------- Parquet


def test_balanced_parquet_passes_the_service_reader(tmp_path):
    rng = np.random.default_rng(0)
    n, nz = 30, 5
    latents = rng.standard_normal((n, nz)).astype(np.float32)
    classes = np.arange(n) % 3
    names = ["red circle", "green square", "blue cross"]
    prompts = [
        ["a photo of a red circle", "red circle on a plain background"],
        ["green square"],
        ["blue cross"],
    ]
    colours = {0: (220, 30, 30), 1: (30, 160, 50), 2: (30, 60, 220)}

    def render(z):
        # class from the latent's position in the input (row i of the input has class i % 3)
        out = np.zeros((len(z), 16, 16, 3), np.uint8)
        for i, zi in enumerate(z):
            c = int(classes[np.flatnonzero((latents == zi).all(axis=1))[0]])
            out[i] = colours[c]
        return out

    summary = write_balanced_set(
        tmp_path / "set", latents, classes, names, prompts, render, rows_per_shard=12
    )
    assert (summary["rows"], summary["shards"]) == (30, 3)
    assert summary["counts"] == {"red circle": 10, "green square": 10, "blue cross": 10}
    assert json.loads((tmp_path / "set" / "dataset.json").read_text()) == summary

    spec = DataSpec(path=str(tmp_path / "set"), carry=("label", "class"))
    shards = list_shards(spec)
    fmt, image_col, text_col = resolve_format(spec, shards)
    assert (len(shards), fmt, image_col, text_col) == (3, "parquet", "jpg", "txt")
    rows = []
    for shard in shards:
        for batch in read_shard(shard, spec, fmt, image_col, text_col, batch_size=8):
            assert batch.rejected == []
            for j, key in enumerate(batch.keys):
                label = batch.carried["label"][j].as_py()
                c = batch.carried["class"][j].as_py()
                rows.append((key, label, c, batch.texts[j], batch.images[j]))
    assert len(rows) == 30 and len({r[0] for r in rows}) == 30
    for _, label, c, text, jpg in rows:
        assert label == names[c] and text in prompts[c]
        pixel = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"))[8, 8].astype(int)
        assert np.abs(pixel - colours[c]).max() < 12
    # the latent column holds exactly the given latents with their classes
    table = read_parts(tmp_path / "set")
    got = np.array(table["latent"].to_pylist(), dtype=np.float32)
    got_order, want_order = np.lexsort(got.T), np.lexsort(latents.T)
    np.testing.assert_array_equal(got[got_order], latents[want_order])
    np.testing.assert_array_equal(np.array(table["class"].to_pylist())[got_order], classes[want_order])


# ------------------------------------------------------------------------------------------- checkpoints and classifiers


def test_generator_checkpoint_roundtrip_and_errors(tmp_path):
    torch.manual_seed(0)
    g = Generator(nz=8, ngf=8, image_size=16).eval()
    save_module(g, tmp_path / "g.safetensors")
    g2 = load_generator(tmp_path / "g.safetensors")
    assert g2.config == {"nz": 8, "ngf": 8, "image_size": 16}
    z = torch.randn(4, 8)
    with torch.no_grad():
        assert torch.equal(g(z), g2(z))
        assert g(z).shape == (4, 3, 16, 16) and g(z).abs().max() <= 1
    # without metadata (a Ray Train checkpoint's model.safetensors) the config comes from the shapes
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in g.state_dict().items()}, tmp_path / "plain.safetensors")
    assert load_generator(tmp_path / "plain.safetensors").config == g2.config
    with pytest.raises(FileNotFoundError):
        load_generator(tmp_path / "missing.safetensors")
    (tmp_path / "g.pkl").write_bytes(b"x")
    with pytest.raises(ValueError, match="expected .safetensors"):
        load_generator(tmp_path / "g.pkl")
    save_module(SmallConvNet(3), tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="holds a SmallConvNet"):
        load_generator(tmp_path / "c.safetensors")


def rendered(per_concept: int, seed: int, concepts=range(24)):
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for c in concepts:
        for _ in range(per_concept):
            images.append(render_image(*CONCEPTS[c], rng))
            labels.append(c)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, np.array(labels)


@pytest.fixture(scope="module")
def zero_shot():
    return build_classifier("zero-shot")


@pytest.mark.slow
def test_zero_shot_classifier_on_real_images(zero_shot):
    x, y = rendered(5, seed=3)
    pred = zero_shot.predict(x)
    assert zero_shot.class_names == LABELS
    assert (pred == y).mean() > 0.85
    logits = zero_shot(x[:4])
    assert logits.shape == (4, 24)
    assert (zero_shot.predict(x[:4], min_confidence=0.999999) == -1).any()


@pytest.mark.slow
def test_shipped_generator_inherits_the_long_tail(zero_shot):
    g = load_generator(SHIPPED_GENERATOR)
    labels = latent_classifier(g, zero_shot)(
        np.random.default_rng(0).standard_normal((1000, g.nz)).astype(np.float32)
    )
    est = fairness_estimate(labels, 24)
    counts = np.array(est.counts)
    red = counts[[LABELS.index(f"red {s}") for s in ("circle", "square", "triangle", "cross")]].sum()
    cyan = counts[[LABELS.index(f"cyan {s}") for s in ("circle", "square", "triangle", "cross")]].sum()
    assert est.ci_low > 0.2  # far from uniform (0), like the data (FD 0.37)
    assert red > 10 * cyan  # the head colour dominates the tail colour, as 2046 : 79 rows in the data


def test_run_cluster_classifier_matches_the_service_assignment(tmp_path, zero_shot):
    from rebalance.kernels.kmeans import assign
    from rebalance.models import TINY_CHECKPOINT

    concepts = [0, 9, 22]  # red circle, blue square, cyan triangle
    x, y = rendered(6, seed=4, concepts=concepts)
    with torch.no_grad():
        e = zero_shot.encoder(x).numpy()
    centroids = np.stack([e[y == c].mean(0) for c in concepts])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    run = tmp_path / "run"
    (run / "clusters").mkdir(parents=True)
    np.save(run / "clusters" / "image_centroids.npy", centroids.astype(np.float32))
    embed = {"model": "rebalance-tiny", "pretrained": str(TINY_CHECKPOINT), "seed": 0}
    (run / "manifest.json").write_text(json.dumps({"spec": {"embed": embed}}))
    clf = build_classifier("run-clusters", run_dir=run)
    assert clf.class_names == ["image cluster 0", "image cluster 1", "image cluster 2"]
    x2, y2 = rendered(4, seed=5, concepts=concepts)
    pred = clf.predict(x2)
    with torch.no_grad():
        expected = assign(zero_shot.encoder(x2).numpy(), centroids)[0]
        soft = clf(x2).argmax(1).numpy()
    np.testing.assert_array_equal(pred, expected)
    np.testing.assert_array_equal(pred, soft)
    assert (pred == np.searchsorted(concepts, y2)).mean() > 0.9
    with pytest.raises(FileNotFoundError, match="not a finished rebalance run"):
        build_classifier("run-clusters", run_dir=tmp_path)


def test_torch_classifier_and_bad_kind(tmp_path):
    torch.manual_seed(0)
    net = SmallConvNet(num_classes=3, width=4, image_size=32).eval()
    save_module(net, tmp_path / "clf.safetensors", metadata={"class_names": json.dumps(["a", "b", "c"])})
    clf = build_classifier("torch", weights=tmp_path / "clf.safetensors")
    x = torch.rand(6, 3, 16, 16) * 2 - 1  # resized to the module's 32x32 input
    with torch.no_grad():
        expected = net(
            torch.nn.functional.interpolate(x, size=(32, 32), mode="bicubic", antialias=True)
        ).argmax(1)
    assert clf.class_names == ["a", "b", "c"]
    np.testing.assert_array_equal(clf.predict(x), expected.numpy())
    with pytest.raises(ValueError, match="unknown classifier kind"):
        build_classifier("svm")
    with pytest.raises(ValueError, match="needs a checkpoint"):
        build_classifier("torch")


# ------------------------------------------------------------------------------------------- jobs


def test_job_help_and_input_validation(tmp_path, capsys):
    for job, options in (
        (
            fair_gan,
            ["--budget", "--per-class", "--classifier", "run-clusters", "--bias-weight", "--real-data"],
        ),
        (
            train_gan,
            ["--bias-weight", "--bias-class-weights", "--init-generator", "--num-workers", "--weights"],
        ),
    ):
        with pytest.raises(SystemExit) as exit_info:
            job.main(["--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        for option in options:
            assert option in text
    out = str(tmp_path / "o")
    assert fair_gan.main(["--out", out, "--budget", "0"]) == 2
    assert "--budget must be >= 1" in capsys.readouterr().err
    assert fair_gan.main(["--out", out, "--generator", str(tmp_path / "nope.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert fair_gan.main(["--out", out, "--classifier", "svm"]) == 2
    assert "unknown classifier kind 'svm'" in capsys.readouterr().err
    assert fair_gan.main(["--out", out, "--sigma-min", "0.6"]) == 2
    assert "--sigma-min" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # a trained generator next to a balanced set from other exploration settings is not resumed
    (tmp_path / "o" / "balanced").mkdir(parents=True)
    (tmp_path / "o" / "balanced" / "dataset.json").write_text(json.dumps({"settings": {"sigma": 0.5}}))
    (tmp_path / "o" / "train").mkdir()
    assert fair_gan.main(["--out", out, "--skip-retrain"]) == 2
    assert "other exploration settings" in capsys.readouterr().err


@pytest.mark.ray
def test_fair_gan_job_smoke(ray_local, tmp_path, capsys):
    real = tmp_path / "real"
    generate_dataset(real, n_rows=48, n_shards=1, seed=5)
    out = tmp_path / "fair"
    argv = ["--out", str(out), "--measure-samples", "200", "--per-class", "4", "--budget", "600",
            "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "16", "--real-data", str(real),
            "--quality-min-samples", "1"]  # fmt: skip
    assert fair_gan.main(argv) == 0
    headline = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads((out / "report.json").read_text())
    assert headline["fd_before"] == report["before"]["fd"] and headline["fd_after"] == report["after"]["fd"]
    for side in ("before", "after"):
        assert report[side]["n"] + report[side]["unassigned"] == 200
        assert report[side]["ci_low"] <= report[side]["fd"] <= report[side]["ci_high"]
    exploration = report["exploration"]
    assert exploration["calls"] <= 600
    counts = {LABELS[int(c)]: n for c, n in exploration["counts"].items()}
    short = {LABELS[int(c)] for c in exploration["unreachable"]}
    assert short == set(exploration["unreachable_classes"])
    assert all((n < 4) == (name in short) for name, n in counts.items())
    assert report["balanced_set"]["counts"] == counts
    # the balanced set: every row's image is still classified as its class by the same classifier
    table = read_parts(out / "balanced")
    assert table.num_rows == sum(counts.values())
    g = load_generator(SHIPPED_GENERATOR)
    clf = build_classifier("zero-shot")
    z = np.array(table["latent"].to_pylist(), dtype=np.float32)
    np.testing.assert_array_equal(latent_classifier(g, clf)(z), np.array(table["class"].to_pylist()))
    assert [LABELS[c] for c in table["class"].to_pylist()] == table["label"].to_pylist()
    # retraining ran on Ray Train with the bias loss, and produced a loadable generator
    train = report["train"]
    assert (train["epochs"], train["steps"]) == (1, 2)
    assert train["last_metrics"]["bias_loss"] > 0
    assert load_generator(out / "train" / "generator.safetensors").config == g.config
    assert json.loads((out / "bias_weights.json").read_text())["classes"] == LABELS
    assert "quality" in report and report["quality"]["common_classes"] >= 1
