"""The seed paper's CLIP experiments (Liu et al. 2024), reproduced with rebalance's pieces.

    nice -n 10 .venv/bin/python benchmarks/seed_clip.py --out runs/seed_clip           # full run (docs/downstream.md)
    .venv/bin/python benchmarks/seed_clip.py --out /tmp/seed_clip --quick              # < 5 min, the smoke test's

Liu et al. train two 2-layer heads on frozen encoders from image-text pairs with the CLIP loss after 0, 1
and 2 balancing iterations and report zero-shot mean per-class recall (CIFAR-100 27.0 / 38.0 / 52.1), and a
MetaCLIP-like metadata curation (caption x entry substring matches, target proportional to min(count, t),
t = 50, one step, resample) at 41.9 vs 38.0. Here, on the built-in generator (24 colour-shape concepts, Zipf):

1. a training pool of ``--rows`` pairs (``generate_dataset``, seed 0) and a balanced held-out set of
   ``--held-out`` fresh renders per concept (``benchmarks/downstream.py``'s ``write_balanced_set``);
2. every row embedded once by each frozen tower pair of ``--towers``: ``synthetic`` (the shipped
   ``rebalance-tiny`` checkpoint, trained on this generator) and/or ``random`` (``rebalance-tiny`` with
   seeded random weights: frozen features that do not already separate the concepts), cached in OUT;
3. heads trained by ``jobs.train_clip``'s own pieces (:class:`ClipHeads`, :func:`head_step`, its cosine
   schedule and fixed logit scale 100) on the cached features, same steps, batch, learning rate, initial
   heads and draws per seed in every arm (paired):

   - ``iter0`` / ``iter1`` / ``iter2``: ``balanced_clip_loss(L, n)`` with n = 0, 1, 2; uniform draws;
   - ``metaclip`` (1 iteration): rows drawn with rebalance's one-step cap weights. MetaCLIP's entries are
     the concept names; the benchmark derives each caption's concept by substring match on whole words (the
     first colour in ``COLOURS`` order and the first shape in ``SHAPES`` order occurring as words: a bare
     substring ``red`` matches the template word ``coloured``, MetaCLIP's known false positive; every
     caption of the generator names exactly one of each, so the caption x entry matrix is one-hot and its
     row normalisation is the identity). The target is the product's ``{cap: t}`` (min(count, t)),
     reached in one Y-step by ``kernels.ipf.ipf(iterations=1)``; rows are then resampled with replacement
     by weight, as the job's ``--weights`` does. ``t`` defaults to the paper's ratio of t to the mean
     entry count (50 / (174,594 / 1,000)) times this pool's mean concept count; ``--cap`` overrides it;
   - ``towers`` (no training): zero-shot through the frozen towers alone, the reference;

4. zero-shot scoring as ``train_clip --eval``: prompt ``"a photo of a {label}"``, mean per-class recall on the
   balanced held-out set, tail = the 8 concepts with the fewest training rows.

Prints the mean and sample standard deviation over seeds and the per-seed paired differences (iter1 -
iter0, iter2 - iter1, metaclip - iter1); writes ``OUT/results.json`` (``OUT/results-NAME.json`` with ``--name``: a variant,
e.g. another batch size or logit scale, that reuses OUT's datasets and cached features).
"""

# ruff: noqa: E402  (imports after putting the repository root on sys.path)
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.downstream import summarise, write_balanced_set
from jobs.dataset import ImageTextParquet
from jobs.metrics import class_metrics
from jobs.train_clip import (
    DEFAULT_PROMPT,
    ClipHeads,
    cosine_lr,
    encode_rows,
    frozen_features,
    head_step,
    zero_shot,
)
from rebalance.data.atomic import atomic_write_json
from rebalance.data.synthetic import COLOURS, LABELS, SHAPES, generate_dataset
from rebalance.kernels.ipf import ipf
from rebalance.kernels.targets import target_marginal
from rebalance.models import TINY_MODEL, TINY_TAG, load_model
from rebalance.samplers import draw_weighted
from rebalance.spec import Target

#: Liu et al. 2024, zero-shot mean per-class recall (research/papers.md section 1)
PAPER = {
    "cifar100": {"iter0": 27.0, "iter1": 38.0, "iter2": 52.1, "metaclip": 41.9},
    "cifar10": {"iter0": 68.1, "iter1": 78.6, "iter2": 85.0},
}
#: the paper's t relative to its mean entry count: t = 50 on 174,594 ImageNet-Captions pairs, 1,000 entries
PAPER_CAP_RATIO = 50 / (174_594 / 1_000)
ARMS = ("iter0", "iter1", "iter2", "metaclip")
PAIRS = (("iter1", "iter0"), ("iter2", "iter1"), ("iter2", "iter0"), ("metaclip", "iter1"))
TOWERS = {"synthetic": TINY_TAG, "random": None}
TAIL = 8
#: the held-out set's class order (``ImageTextParquet`` sorts the labels), that of the prompts
LABELS_SORTED = sorted(LABELS)


def caption_concept(caption: str) -> str:
    """The concept a caption names by substring match on whole words: the first colour (``COLOURS`` order)
    and the first shape (``SHAPES`` order) occurring as a word, ``"<colour> <shape>"``; ``""`` when either
    is missing. Whole words, because a bare substring ``red`` also matches the template word ``coloured``."""
    words = set(re.findall(r"[a-z]+", caption.lower()))
    colour = next((c for c in COLOURS if c in words), None)
    shape = next((s for s in SHAPES if s in words), None)
    return f"{colour} {shape}" if colour and shape else ""


def metaclip_weights(captions: list[str], cap: float) -> tuple[np.ndarray, dict]:
    """Per-row weights of the MetaCLIP-like curation: one Y-step of rebalance's IPF toward the ``{cap: t}``
    target of the substring-matched concept (rows matching no concept get weight 0). Returns (weights (n,)
    with mean 1 over the matched rows, {concept: share of the weight})."""
    concept = np.array([caption_concept(c) for c in captions])
    names, codes, counts = np.unique(concept, return_inverse=True, return_counts=True)
    matched = names != ""
    target = np.zeros(len(names))
    target[matched] = target_marginal(counts[matched].astype(float), Target.parse({"cap": cap}, "cap"))
    result = ipf(np.arange(len(names))[:, None], counts.astype(float), [target], iterations=1)
    per_row = result.mass / (counts / counts.sum())
    w = per_row[codes]
    return w / w[w > 0].mean(), {str(n): float(m) for n, m in zip(names, result.mass, strict=True) if n}


def embed(out: Path, towers: str, train: Path, held_out: Path) -> dict[str, np.ndarray]:
    """Frozen features of the pool and the held-out set (and the class prompts), cached in OUT."""
    cache = out / f"features-{towers}.npz"
    if cache.is_file():
        return dict(np.load(cache))
    clip = load_model(TINY_MODEL, TOWERS[towers], seed=0)
    pool = ImageTextParquet(train)
    image, text = frozen_features(clip, pool)
    test = ImageTextParquet(held_out, text_column=None, label_column="label")
    feats = {
        "image": image,
        "text": text,
        "test_image": encode_rows(clip, test),
        "test_label": test.targets,
        "prompts": clip.encode_texts([DEFAULT_PROMPT.format(c) for c in test.class_names]),
    }
    np.savez(out / "features.tmp.npz", **feats)
    (out / "features.tmp.npz").replace(cache)
    return feats


def train_heads(
    feats: dict[str, np.ndarray], weights: np.ndarray, n_iter: int, seed: int, args: argparse.Namespace
) -> ClipHeads:
    """Heads trained as ``train_clip --frozen`` trains them (one process): ``args.epochs`` x ``steps`` batches
    drawn with replacement by ``weights`` (``draw_weighted`` with (seed, epoch)), AdamW, cosine LR."""
    torch.manual_seed(seed)
    image, text = torch.as_tensor(feats["image"]), torch.as_tensor(feats["text"])
    heads = ClipHeads(image.shape[1], args.head_hidden)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps = len(image) // args.batch_size
    total, step = steps * args.epochs, 0
    for epoch in range(args.epochs):
        idx = torch.as_tensor(draw_weighted(weights, steps * args.batch_size, seed, epoch))
        for batch in idx.view(steps, args.batch_size):
            lr = cosine_lr(step, total, args.lr, args.warmup_steps)
            head_step(heads, optimizer, image[batch], text[batch], n_iter, args.logit_scale, lr)
            step += 1
    return heads.eval()


def score(heads: torch.nn.Module | None, feats: dict[str, np.ndarray], tail: list[str]) -> dict[str, float]:
    """Zero-shot mean per-class recall (through the heads, or the towers alone when None), tail and worst."""
    if heads is None:
        pred = (feats["test_image"] @ feats["prompts"].T).argmax(axis=1)
        m = class_metrics(feats["test_label"], pred, LABELS_SORTED)
    else:
        m = zero_shot(heads, feats["test_image"], feats["test_label"], feats["prompts"], LABELS_SORTED)
    per = m["per_class_accuracy"]
    return {
        "recall": m["balanced_accuracy"],
        "tail_recall": float(np.mean([per[c] for c in tail])),
        "worst_recall": per[m["worst_class"]],
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="work directory (datasets, cached features, results.json)")
    p.add_argument("--rows", type=int, default=30_000, help="training pairs (default: %(default)s)")
    p.add_argument(
        "--held-out", type=int, default=100, help="held-out images per concept (default: %(default)s)"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="head seeds (default: 0 1 2)")
    p.add_argument("--towers", nargs="+", choices=sorted(TOWERS), default=["synthetic", "random"])
    p.add_argument("--epochs", type=int, default=10, help="epochs over the pool (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=512, help="the paper's batch (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--head-hidden", type=int, default=512)
    p.add_argument("--logit-scale", type=float, default=100.0, help="fixed s (paper: 100)")
    p.add_argument("--cap", type=float, default=None, help="MetaCLIP t (default: the paper's t / mean count)")
    p.add_argument("--quick", action="store_true", help="3,000 pairs, 20 held-out per concept, 3 epochs")
    p.add_argument(
        "--name", default=None, help="write results-NAME.json (a variant reusing OUT's data and features)"
    )
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    # one thread: the heads are too small to gain from more, and on a loaded machine OpenMP's barriers stall
    torch.set_num_threads(1)
    if args.quick:
        args.rows, args.held_out, args.epochs, args.batch_size, args.warmup_steps = 3000, 20, 3, 256, 5
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    train, held_out = out / f"train-{args.rows}", out / f"held-out-{args.held_out}"
    if not (train / "dataset.json").is_file():
        generate_dataset(train, n_rows=args.rows, n_shards=max(1, -(-args.rows // 10_000)), seed=0)
    if not (held_out / "part-00000.parquet").is_file():
        held_out.mkdir(parents=True, exist_ok=True)
        write_balanced_set(held_out, args.held_out, seed=1000)
    counts = json.loads((train / "dataset.json").read_text())["counts"]
    tail = sorted(counts, key=lambda c: (counts[c], c))[:TAIL]
    captions = ImageTextParquet(train).texts
    cap = args.cap if args.cap is not None else PAPER_CAP_RATIO * args.rows / len(LABELS)
    meta_w, meta_shares = metaclip_weights(captions, cap)
    uniform = np.ones(len(captions))
    results: dict = {
        "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"cap": cap},
        "paper": PAPER,
        "metaclip_shares": meta_shares,
        "tail": tail,
        "towers": {},
    }
    for towers in args.towers:
        t0 = time.time()
        feats = embed(out, towers, train, held_out)
        embed_s = time.time() - t0
        res: dict = {"embed_seconds": embed_s, "towers_only": score(None, feats, tail), "arms": {}}
        t0 = time.time()
        for arm in ARMS:
            n_iter = 1 if arm == "metaclip" else int(arm[-1])
            w = meta_w if arm == "metaclip" else uniform
            runs = [score(train_heads(feats, w, n_iter, seed, args), feats, tail) for seed in args.seeds]
            print(f"  {towers} {arm}: {[round(r['recall'], 3) for r in runs]}", flush=True)
            res["arms"][arm] = {
                "per_seed": runs,
                **{k: summarise([r[k] for r in runs]) for k in ("recall", "tail_recall", "worst_recall")},
            }
        res["train_seconds"] = time.time() - t0
        res["paired"] = {
            f"{a}-{b}": summarise(
                [
                    ra["recall"] - rb["recall"]
                    for ra, rb in zip(res["arms"][a]["per_seed"], res["arms"][b]["per_seed"], strict=True)
                ]
            )
            for a, b in PAIRS
        }
        results["towers"][towers] = res
        print(f"\nfrozen towers: {towers} (embed {embed_s:.0f} s, heads {res['train_seconds']:.0f} s)")
        print(f"  towers alone: recall {100 * res['towers_only']['recall']:.1f}")
        print(f"  {'arm':10s} {'recall':>14s} {'tail':>14s} {'worst':>14s}   paper CIFAR-100 / CIFAR-10")
        for arm in ARMS:
            r = res["arms"][arm]
            cells = " ".join(
                f"{100 * r[k]['mean']:6.1f} +- {100 * r[k]['std']:4.1f}"
                for k in ("recall", "tail_recall", "worst_recall")
            )
            paper = " / ".join(str(PAPER[d].get(arm, "-")) for d in ("cifar100", "cifar10"))
            print(f"  {arm:10s} {cells}   {paper}")
        for pair, d in res["paired"].items():
            print(
                f"  paired {pair:16s} {100 * d['mean']:+6.1f} +- {100 * d['std']:4.1f} (min {100 * d['min']:+.1f}, max {100 * d['max']:+.1f})"
            )
    results["seconds"] = time.time() - t_start
    path = out / (f"results-{args.name}.json" if args.name else "results.json")
    atomic_write_json(results, path)
    print(f"\nwall time {results['seconds']:.0f} s; {path}")
    return results


if __name__ == "__main__":
    main()
