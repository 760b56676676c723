"""Does the SQS of a trained model's features rank the built-in concepts by linear-probe error?

    .venv/bin/python benchmarks/spectral_trained.py                  # 5 seeds, shipped and random weights
    .venv/bin/python benchmarks/spectral_trained.py --seeds 3 --train 10

The Gaussian benchmark (``spectral_validity.py``) checks the spectral quantile score where the theory
holds; this one checks it on real features: the image tower of ``rebalance-tiny`` with the shipped
checkpoint (``embed.pretrained: synthetic``, trained by ``jobs.train_clip`` on the built-in dataset) and,
as a contrast, the same model with random weights. Counts are balanced, as in the claim (Kaushik et al.
2024: with equal counts, classes whose feature spectra are larger or decay more slowly get more error).

Per seed: ``--spectra + --train + --test`` fresh renders of each of the 24 built-in concepts
(``render_image``, not JPEG-coded), embedded and L2-normalised as the embed stage does
(``LoadedModel.encode_images``). Per-concept statistics from the first ``--spectra`` rows of each concept
(``GroupMoments`` unbiased -> ``group_spectra`` -> ``spectral_scores``, q = 0.5): SQS, trace, effective
rank, top-eigenvalue share. A multinomial logistic regression (scikit-learn, features standardised on the
train split) fitted on ``--train`` rows per concept; per-concept error and mean log loss on ``--test``
rows per concept. ``nearest_mean`` is a reference that is not spectral: the distance from a concept's
mean to the nearest other concept's mean (same rows as the spectra); it should correlate negatively.
Printed: Spearman(statistic, per-concept error) and (statistic, log loss) per seed, and
their mean +- sample std over seeds. Error is a count out of ``--test`` and has ties when the probe is
nearly perfect; the log loss is the continuous version of the same ranking.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image
from scipy.stats import spearmanr
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from rebalance.data.synthetic import CONCEPTS, render_image
from rebalance.kernels.spectra import GroupMoments, group_spectra, spectral_scores
from rebalance.models import TINY_MODEL, TINY_TAG, load_model

STATS = ("sqs", "trace", "effective_rank", "top_share", "nearest_mean")
MODELS = {"shipped": TINY_TAG, "random": None}


def embed(loaded, images: list[np.ndarray], batch_size: int = 512) -> np.ndarray:
    """L2-normalised image features, (n, d)."""
    out = []
    for i in range(0, len(images), batch_size):
        batch = [loaded.preprocess(Image.fromarray(a, mode="RGB")) for a in images[i : i + batch_size]]
        out.append(loaded.encode_images(batch))
    return np.concatenate(out)


def run_seed(loaded, seed: int, args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(seed)
    per = args.spectra + args.train + args.test
    n_concepts = len(CONCEPTS)
    images = [render_image(colour, shape, rng) for colour, shape in CONCEPTS for _ in range(per)]
    x = embed(loaded, images).reshape(n_concepts, per, -1)
    labels = np.repeat(np.arange(n_concepts), per).reshape(n_concepts, per)
    parts = np.cumsum([0, args.spectra, args.train, args.test])
    spec_x, train_x, test_x = (
        x[:, a:b].reshape(-1, x.shape[2]) for a, b in zip(parts[:-1], parts[1:], strict=True)
    )
    spec_y, train_y, test_y = (labels[:, a:b].reshape(-1) for a, b in zip(parts[:-1], parts[1:], strict=True))

    moments = GroupMoments.from_batch(spec_x, spec_y, n_concepts)
    eigs, traces = group_spectra(moments.covariance(unbiased=True))
    scores = spectral_scores(eigs, traces, q=0.5, valid=moments.valid)
    distances = np.linalg.norm(moments.mean[:, None] - moments.mean[None, :], axis=2)
    np.fill_diagonal(distances, np.inf)
    scores = {**scores, "nearest_mean": distances.min(1)}

    scaler = StandardScaler().fit(train_x)
    probe = LogisticRegression(max_iter=3000).fit(scaler.transform(train_x), train_y)
    proba = probe.predict_proba(scaler.transform(test_x))
    wrong = proba.argmax(1) != test_y
    error = np.bincount(test_y, weights=wrong, minlength=n_concepts) / args.test
    loss = np.bincount(test_y, weights=-np.log(proba[np.arange(test_y.size), test_y] + 1e-12)) / args.test
    return {
        "error": error,
        "rho_error": {s: float(spearmanr(scores[s], error).statistic) for s in STATS},
        "rho_loss": {s: float(spearmanr(scores[s], loss).statistic) for s in STATS},
        "sqs_spread": float(scores["sqs_spread"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--spectra", type=int, default=150, help="rows per concept for the spectra")
    parser.add_argument("--train", type=int, default=20, help="probe-train rows per concept")
    parser.add_argument("--test", type=int, default=150, help="probe-test rows per concept")
    args = parser.parse_args()
    torch.set_num_threads(1)

    start, cpu = time.perf_counter(), time.process_time()
    print(
        f"24 concepts, balanced: {args.spectra} rows per concept for the spectra, probe {args.train} train / "
        f"{args.test} test per concept; Spearman(statistic, per-concept error | log loss)"
    )
    for name, pretrained in MODELS.items():
        loaded = load_model(TINY_MODEL, pretrained, seed=0)
        runs = [run_seed(loaded, seed, args) for seed in range(args.seeds)]
        print(f"\n{name} weights")
        print(
            f"{'seed':>4} {'err mean':>8} {'err range':>11} {'SQS spread':>10} "
            + " ".join(f"{s + ' err':>18} {s + ' loss':>19}" for s in STATS)
        )
        for seed, r in enumerate(runs):
            e = r["error"]
            print(
                f"{seed:>4} {e.mean():>8.3f} {e.min():>5.3f}-{e.max():<5.3f} {r['sqs_spread']:>10.2f} "
                + " ".join(f"{r['rho_error'][s]:>18.3f} {r['rho_loss'][s]:>19.3f}" for s in STATS)
            )
        for key in ("rho_error", "rho_loss"):
            rho = np.array([[r[key][s] for s in STATS] for r in runs])
            mean, sd = np.nanmean(rho, 0), np.nanstd(rho, 0, ddof=1)
            print(
                f"{key:>9} mean +- sd over {args.seeds} seeds: "
                + ", ".join(f"{s} {m:+.3f} +- {d:.3f}" for s, m, d in zip(STATS, mean, sd, strict=True))
            )
    print(f"\ntime {time.perf_counter() - start:.1f} s wall, {time.process_time() - cpu:.1f} s CPU")


if __name__ == "__main__":
    main()
