"""Linear probe of frozen image features: per-class accuracy, balanced accuracy, class gap, std across classes.

    python -m jobs.linear_probe DATA --pretrained OUT/model.safetensors [--test-data TEST] [--out probe.json]
    ray job submit --working-dir . -- python -m jobs.linear_probe DATA --pretrained /mnt/shared/clip/model.safetensors

Embeds every image of DATA (and TEST) with the frozen image tower of an open_clip model (``--model``,
default ``rebalance-tiny``; ``--pretrained`` an open_clip tag or a checkpoint such as a training job's
``OUT/model.safetensors``; none = random weights from ``--seed``), standardises the features with the
training split's mean and scale, fits a multinomial logistic regression (full-batch L-BFGS, L2 penalty
``--l2``) on DATA and evaluates on TEST. Without ``--test-data`` DATA is split per class
(``--test-fraction``, seeded; a class with one row goes to training only).

Reported (JSON, on stdout and in ``--out``): ``per_class_accuracy``, ``balanced_accuracy`` (mean of the
per-class accuracies), ``class_gap`` (best minus worst class), ``class_std`` (population standard
deviation across classes), ``accuracy``, and ``tail_accuracy`` / ``head_accuracy``: the mean accuracy of the
third of the classes with the fewest / most rows in ``--class-counts-from`` (a dataset, e.g. the one the
model was trained on; default DATA). ``--balanced`` weights the probe's loss by inverse class frequency.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from jobs.cli import setup_logging
from jobs.dataset import ImageTextParquet
from jobs.metrics import class_metrics

log = logging.getLogger("jobs.linear_probe")


@torch.no_grad()
def embed_images(
    model: torch.nn.Module, preprocess, data: ImageTextParquet, device: str, batch_size: int = 256
):
    """``(N, d)`` float32 image features of every row of ``data`` (un-normalised image tower output)."""
    data.with_output("image", transform=preprocess)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size)
    model.eval()
    feats = [model.encode_image(x.to(device)).float().cpu() for (x,) in loader]
    return torch.cat(feats).numpy()


def stratified_split(targets: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices ``(train, test)``: per class ``round(n * test_fraction)`` rows to test, at least 1 and at
    most ``n - 1`` (a class of 1 row is train only), chosen with ``seed``."""
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in np.unique(targets):
        rows = rng.permutation(np.flatnonzero(targets == c))
        n_test = min(len(rows) - 1, max(1, round(len(rows) * test_fraction)))
        test_idx.extend(rows[:n_test].tolist())
        train_idx.extend(rows[n_test:].tolist())
    return np.sort(np.array(train_idx, dtype=np.int64)), np.sort(np.array(test_idx, dtype=np.int64))


def fit_logistic(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    l2: float = 1e-3,
    max_iter: int = 500,
    class_weight: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression ``softmax(x W^T + b)`` by full-batch L-BFGS on
    ``CE + l2 * ||W||^2``; returns ``(W, b)`` (float64)."""
    xt = torch.as_tensor(x, dtype=torch.float64)
    yt = torch.as_tensor(y, dtype=torch.int64)
    w = torch.zeros(num_classes, xt.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    cw = None if class_weight is None else torch.as_tensor(class_weight, dtype=torch.float64)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xt @ w.T + b, yt, weight=cw) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def probe(args: argparse.Namespace) -> dict:
    from rebalance.models import load_model

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    clip = load_model(args.model, args.pretrained, device, args.seed)
    model, preprocess = clip.model, clip.preprocess
    data = ImageTextParquet(args.data, text_column=None, label_column=args.label_column)
    names = data.class_names
    feats = embed_images(model, preprocess, data, device)
    if args.test_data:
        test = ImageTextParquet(args.test_data, text_column=None, label_column=args.label_column)
        unknown = sorted(set(test.class_names) - set(names))
        if unknown:
            raise ValueError(f"test data has classes the training data lacks: {unknown[:5]}")
        x_train, y_train = feats, data.targets
        x_test = embed_images(model, preprocess, test, device)
        y_test = np.array([names.index(c) for c in test.class_names])[test.targets]
    else:
        train_idx, test_idx = stratified_split(data.targets, args.test_fraction, args.seed)
        x_train, y_train, x_test, y_test = (
            feats[train_idx],
            data.targets[train_idx],
            feats[test_idx],
            data.targets[test_idx],
        )
    mean, scale = x_train.mean(0), x_train.std(0) + 1e-8
    counts_train = np.bincount(y_train, minlength=len(names))
    class_weight = None
    if args.balanced:
        class_weight = np.where(
            counts_train > 0, len(y_train) / (len(names) * np.maximum(counts_train, 1)), 0.0
        )
    w, b = fit_logistic((x_train - mean) / scale, y_train, len(names), args.l2, args.max_iter, class_weight)
    logits = torch.as_tensor((x_test - mean) / scale, dtype=torch.float64) @ w.T + b
    pred = logits.argmax(1).numpy()
    if args.class_counts_from:
        ref = ImageTextParquet(args.class_counts_from, text_column=None, label_column=args.label_column)
        ref_counts = dict(zip(ref.class_names, ref.class_counts().tolist(), strict=True))
        counts = np.array([ref_counts.get(n, 0) for n in names], dtype=float)
    else:
        counts = np.bincount(data.targets, minlength=len(names)).astype(float)
    result = class_metrics(y_test, pred, names, counts, args.tail_fraction)
    result.update(
        {
            "model": args.model,
            "pretrained": args.pretrained,
            "train_rows": len(y_train),
            "test_rows": len(y_test),
            "feature_dim": int(feats.shape[1]),
            "train_accuracy": float(
                (
                    (torch.as_tensor((x_train - mean) / scale, dtype=torch.float64) @ w.T + b)
                    .argmax(1)
                    .numpy()
                    == y_train
                ).mean()
            ),
        }
    )
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.linear_probe",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("data", help="labelled img2dataset Parquet dataset to fit the probe on")
    parser.add_argument(
        "--test-data", default=None, help="labelled dataset to evaluate on (default: split DATA)"
    )
    parser.add_argument(
        "--test-fraction", type=float, default=0.5, help="without --test-data (default: %(default)s)"
    )
    parser.add_argument(
        "--model", default="rebalance-tiny", help="open_clip model name (default: %(default)s)"
    )
    parser.add_argument(
        "--pretrained", default=None, help="open_clip tag or checkpoint (default: random weights)"
    )
    parser.add_argument("--label-column", default="label", help="class label column (default: %(default)s)")
    parser.add_argument(
        "--class-counts-from", default=None, help="dataset whose class counts define head/tail"
    )
    parser.add_argument("--tail-fraction", type=float, default=1 / 3, help="share of classes in the tail")
    parser.add_argument(
        "--l2", type=float, default=1e-3, help="L2 penalty on the probe weights (default: %(default)s)"
    )
    parser.add_argument("--max-iter", type=int, default=500, help="L-BFGS iterations (default: %(default)s)")
    parser.add_argument(
        "--balanced", action="store_true", help="inverse-frequency class weights in the probe loss"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of random weights and of the split")
    parser.add_argument("--cpu", action="store_true", help="embed on CPU even when a GPU is visible")
    parser.add_argument("--out", default=None, help="write the JSON result here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    result = probe(args)
    if args.out:
        from rebalance.data.atomic import atomic_write_json

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(result, args.out)
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
