"""Web-regime benchmark (issue 16, item 2): which fraction of a redundant pool should a short run see?

The pool is the built-in generator's web regime (``generate_web_dataset``: Zipf concepts, head concepts
made of few renders repeated with small perturbations, alt-text captions with noise and unrelated
captions). The pipeline embeds it once with the shipped ``rebalance-tiny`` (``pretrained: synthetic``),
Parquet in, and clusters it; each balance spec is then one more ``rebalance.run`` into the same run
directory (embed and cluster are skipped: same fingerprint) whose ``weights/`` are copied aside. A
balanced held-out set (fresh renders, 50 per concept) goes through the same pipeline.

Every arm draws ``--budget`` x pool rows with replacement in proportion to its weights (the samplers'
``draw_weighted``, seeded by the seed) and trains two cheap models on the frozen embeddings of its draws:

- a linear probe (softmax regression on the 64-d image embedding, labels = the ``label`` column), scored
  on the held-out set: balanced accuracy, tail accuracy (8 rarest concepts), worst concept;
- 2-layer CLIP heads (image and text, 64 -> 128 -> 64, CLIP loss ``balanced_clip_loss(L, 1)``) on the
  drawn (image, caption) pairs, scored by zero-shot balanced accuracy (nearest concept prompt
  ``"a photo of a {colour} {shape}"`` through the text head) and image -> text retrieval R@1 over the
  held-out captions (a hit when the top caption names the image's concept).

Arms: ``plain`` (uniform), ``oracle`` (uniform over the true concepts: weight 1 / n_label),
``logit-adjusted`` (uniform draws, probe trained with ``logit_adjusted_loss``; its CLIP heads equal
plain's), and the product's weights under each ``--specs`` entry (``image``: ``image_cluster``;
``levels``: the coarse level ``image_cluster_1`` of ``cluster.levels``, Vo et al.; ``joint``:
``joint_cluster`` of ``cluster.joint``; ``image-text``: ``[image_cluster, text_cluster]`` exact (the spec
default before ``relax: auto``), ``allow_partial``; ``image-text-rho1`` / ``-rho3``, ``levels-rho1``: the same relaxed,
``balance.relax`` 1 or 3; ``dedup``: near-duplicate groups balanced (``dedup``, ``[dup_group,
image_cluster_1]``); ``metaclip``: MetaCLIP curation of the captions, ``concepts.vocabulary`` = the 24
concepts and their words, marginal ``concept``; ``default``: the spec's own cluster and balance defaults,
k auto, relax auto). ``--specs`` also takes the ``SWEEP`` arms: the coarse level at other k
(``levels-K``, ``levels-K-rho1``) and the defaults with one coarse level (``default-level``,
``default-level-image``). Prints mean ± sample std over seeds, the per-seed paired difference of every arm
to ``plain`` and to ``default``, and per arm its balance run (converged, passes, ESS, largest weight) and
the concept distribution's total variation to uniform (weights and draws); writes ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from downstream import summarise, write_balanced_set  # noqa: E402

from rebalance.data.atomic import atomic_write_json  # noqa: E402
from rebalance.data.parts import read_parts  # noqa: E402
from rebalance.data.synthetic import CONCEPTS, LABELS, VOCABULARY_FILE, generate_web_dataset  # noqa: E402
from rebalance.losses import balanced_clip_loss, logit_adjusted_loss  # noqa: E402
from rebalance.samplers import draw_weighted  # noqa: E402

# Each arm is one balance run over the same pool: the spec sections it sets (``balance`` always; ``dedup``
# and ``concepts`` where the arm needs that stage; ``cluster`` where it changes the clusters). ``dedup``
# last: its section reruns the cluster stage (the groups are written with the assignments), so an arm
# after it would rerun it again (and the smoke test reads the dedup run's assignments). An arm that changes
# the cluster section (``default``, the ``SWEEP`` arms) reruns the cluster stage too.
# DEDUP_THRESHOLD: chosen on the 100,000-row pool's image vectors (docs/downstream.md, "Web regime"): the
# tiny model hardly separates a concept's renders (47 % of the pairs inside a render and 14 % of the pairs
# of different renders of a concept reach cosine 0.95), so below 0.99 the groups chain into whole clusters;
# at 0.998 they agree best with the renders (adjusted Rand 0.18, 85 % of rows in their group's majority
# render, the largest group 202 rows, about one head render, and no group mixes two concepts).
# METACLIP_CAP: MetaCLIP's t as a fraction of the pool (1,000 rows at 100,000: above the rarest concept's
# 605 rows, so the tail's entries are kept whole and the head's sampled down).
DEDUP_THRESHOLD = 0.998
METACLIP_CAP = 0.01
EXACT_IMAGE_TEXT = {"marginals": ["image_cluster", "text_cluster"]}
DEFAULT_ARM = "default"  # the spec's defaults: every arm is also compared with it
# an arm with this key set runs the spec's own cluster and balance defaults, changed only where it says
SPEC_DEFAULTS = "spec_defaults"
SPECS: dict[str, dict] = {
    "image": {"balance": {"marginals": ["image_cluster"]}},
    "levels": {"balance": {"marginals": ["image_cluster_1"]}},
    "levels-rho1": {"balance": {"marginals": ["image_cluster_1"], "relax": 1.0}},
    "joint": {"balance": {"marginals": ["joint_cluster"]}},
    "image-text": {"balance": EXACT_IMAGE_TEXT},
    "image-text-rho1": {"balance": EXACT_IMAGE_TEXT | {"relax": 1.0}},
    "image-text-rho3": {"balance": EXACT_IMAGE_TEXT | {"relax": 3.0}},
    "metaclip": {
        "concepts": {"vocabulary": str(VOCABULARY_FILE), "field": "txt", "cap": METACLIP_CAP},
        "balance": {"marginals": ["concept"]},
    },
    # the spec's own defaults (``SPEC_DEFAULTS``: no cluster or balance setting but the data): k auto =
    # round(sqrt(N)) image and text clusters, [image_cluster, text_cluster] relaxed (relax: auto, rho 1)
    "default": {SPEC_DEFAULTS: True, "balance": {}},
    "dedup": {
        "dedup": {"threshold": DEDUP_THRESHOLD},
        "balance": {"marginals": ["dup_group", "image_cluster_1"]},
    },
}
# Arms outside the default set (``--specs`` names them): how the coarse level fares when its k is not the
# true number of concepts (``levels-K``: cluster.levels [K] over the 64 clusters, exact; ``-rho1``
# relaxed), and the spec defaults with one coarse level of round(sqrt(k)) clusters (k auto = 316 at
# 100,000 rows: level 18), balanced at that level: image and text relaxed (``default-level``: balance.level
# 1, the default marginals and relax) or the image side exact (``default-level-image``).
SWEEP_LEVELS = (8, 12, 16, 32, 48)
SWEEP: dict[str, dict] = {}
for _k in SWEEP_LEVELS:
    SWEEP[f"levels-{_k}"] = {"cluster": {"levels": [_k]}, "balance": {"marginals": ["image_cluster_1"]}}
    SWEEP[f"levels-{_k}-rho1"] = {
        "cluster": {"levels": [_k]},
        "balance": {"marginals": ["image_cluster_1"], "relax": 1.0},
    }
SWEEP["default-level"] = {SPEC_DEFAULTS: True, "cluster": {"levels": [18]}, "balance": {"level": 1}}
SWEEP["default-level-image"] = {
    SPEC_DEFAULTS: True,
    "cluster": {"levels": [18]},
    "balance": {"marginals": ["image_cluster_1"], "relax": "exact"},
}
# the level that the silhouette of the 316 image centroids picks among 6 - 64 (docs/downstream.md)
SWEEP["default-level-24"] = {SPEC_DEFAULTS: True, "cluster": {"levels": [24]}, "balance": {"level": 1}}
SWEEP["default-level-24-image"] = {
    SPEC_DEFAULTS: True,
    "cluster": {"levels": [24]},
    "balance": {"marginals": ["image_cluster_1"]},
}
ARMS = SPECS | SWEEP
METRICS = (
    "probe_balanced",
    "probe_tail",
    "probe_worst",
    "zeroshot_balanced",
    "zeroshot_tail",
    "retrieval_r1",
)
PROMPT = "a photo of a {colour} {shape}"
# carried into embeddings/: the true concept, the near-duplicate group (render), the caption (MetaCLIP's field)
CARRY = ["label", "render", "txt"]


def pipeline_spec(data: Path, arm: dict, k: int, level: int, carry: list[str], rows: int) -> dict:
    """The pipeline's spec for one arm (``ARMS`` entry): its balance section over uniform targets, exact
    (``relax: exact``) unless the arm sets ``relax`` (``allow_partial``, so an exact run that does not
    converge still gives its weights), its ``cluster`` settings laid over k image / text / joint clusters
    and one coarse level, its ``dedup`` and ``concepts`` sections when set (a concepts ``cap`` below 1 is a
    fraction of ``rows``). An arm with ``SPEC_DEFAULTS`` gets only its own cluster and balance settings,
    the spec's defaults for the rest."""
    if arm.get(SPEC_DEFAULTS):
        cluster, balance = dict(arm.get("cluster", {})), dict(arm["balance"])
    else:
        cluster = {
            "image": {"k": k},
            "text": {"k": k},
            "joint": {"k": k},
            "levels": [level],
            "niter": 20,
            "seed": 0,
        } | arm.get("cluster", {})
        # exact unless the arm relaxes (the spec default relaxes cluster marginals)
        balance = {"target": "uniform", "tol": 1.0e-6, "allow_partial": True, "relax": "exact"}
        balance |= arm["balance"]
    spec = {
        "data": {"path": str(data), "format": "parquet", "carry": carry},
        "embed": {"model": "rebalance-tiny", "pretrained": "synthetic", "batch_size": 512},
        "cluster": cluster,
        "balance": balance,
        "report": {"spectra_by": ["image_cluster"], "html": False},
        "ray": {"address": "local"},
    }
    if "dedup" in arm:
        spec["dedup"] = dict(arm["dedup"])
    if "concepts" in arm:
        concepts = dict(arm["concepts"])
        if concepts.get("cap", 1) < 1:
            concepts["cap"] = max(1, round(concepts["cap"] * rows))
        spec["concepts"] = concepts
    return spec


def load_embeddings(run: Path) -> dict[str, np.ndarray]:
    t = read_parts(run / "embeddings")
    return {
        "key": np.asarray(t.column("key").to_pylist()),
        "image": np.asarray(t.column("image").to_pylist(), dtype=np.float32),
        "text": np.asarray(t.column("text").to_pylist(), dtype=np.float32),
        "label": np.array([LABELS.index(v) for v in t.column("label").to_pylist()]),
    } | ({"render": t.column("render").to_numpy()} if "render" in t.column_names else {})


def per_class(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.array([(pred[y == c] == c).mean() for c in range(len(LABELS))])


def train_probe(x, y, counts, seed, epochs, adjusted) -> torch.nn.Linear:
    """Softmax regression on the drawn rows, ``epochs`` passes in batches of 256, Adam lr 1e-2."""
    torch.manual_seed(seed)
    probe = torch.nn.Linear(x.shape[1], len(LABELS))
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    n = torch.as_tensor(np.maximum(counts, 1), dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(yt), generator=gen).split(256):
            logits = probe(xt[idx] * 10.0)
            loss = (
                logit_adjusted_loss(logits, yt[idx], n)
                if adjusted
                else torch.nn.functional.cross_entropy(logits, yt[idx])
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
    return probe


def head(d: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(d, 128), torch.nn.GELU(), torch.nn.Linear(128, d))


def train_clip_heads(xi, xt, seed, epochs):
    """Image and text heads with a learnt temperature, CLIP loss on batches of 256 drawn pairs."""
    torch.manual_seed(seed)
    hi, ht = head(xi.shape[1]), head(xt.shape[1])
    scale = torch.nn.Parameter(torch.tensor(np.log(10.0), dtype=torch.float32))
    opt = torch.optim.Adam([*hi.parameters(), *ht.parameters(), scale], lr=3e-3)
    a, b = torch.from_numpy(xi), torch.from_numpy(xt)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(a), generator=gen).split(256):
            if len(idx) < 2:
                continue
            zi = torch.nn.functional.normalize(hi(a[idx]), dim=1)
            zt = torch.nn.functional.normalize(ht(b[idx]), dim=1)
            loss = balanced_clip_loss(scale.exp().clamp(max=100.0) * zi @ zt.T, 1)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return hi, ht


def prompt_embeddings() -> np.ndarray:
    from rebalance.models import TINY_MODEL, TINY_TAG, load_model

    m = load_model(TINY_MODEL, TINY_TAG)
    with torch.no_grad():
        z = m.model.encode_text(m.tokenizer([PROMPT.format(colour=c, shape=s) for c, s in CONCEPTS]))
    return torch.nn.functional.normalize(z.float(), dim=1).numpy()


def score(probe, heads, test, test_txt, prompts, tail) -> dict:
    with torch.no_grad():
        pred = probe(torch.from_numpy(test["image"]) * 10.0).argmax(1).numpy()
        acc = per_class(pred, test["label"])
        out = {"probe_balanced": acc.mean(), "probe_tail": acc[tail].mean(), "probe_worst": acc.min()}
        hi, ht = heads
        zi = torch.nn.functional.normalize(hi(torch.from_numpy(test["image"])), dim=1)
        zp = torch.nn.functional.normalize(ht(torch.from_numpy(prompts)), dim=1)
        zt = torch.nn.functional.normalize(ht(torch.from_numpy(test["text"])), dim=1)
        zs = per_class((zi @ zp.T).argmax(1).numpy(), test["label"])
        top = (zi @ zt.T).argmax(1).numpy()
    out |= {"zeroshot_balanced": zs.mean(), "zeroshot_tail": zs[tail].mean()}
    # a hit: the top caption names the image's concept (the held-out captions cycle 6 templates per concept,
    # so the image's own string is found only by chance, about 1/6: kept as retrieval_exact_r1)
    out["retrieval_r1"] = float(np.mean(test["label"][top] == test["label"]))
    out["retrieval_exact_r1"] = float(np.mean(test_txt[top] == test_txt))
    return {k: float(v) for k, v in out.items()} | {
        "probe_per_class": acc.tolist(),
        "zeroshot_per_class": zs.tolist(),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/web-regime", help="working directory (default: %(default)s)")
    parser.add_argument("--rows", type=int, default=100_000, help="pool rows (default: %(default)s)")
    parser.add_argument("--budget", type=float, default=0.10, help="draws as a fraction of the pool")
    parser.add_argument(
        "--epochs", type=int, default=1, help="passes over the drawn rows (1: each draw seen once)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--specs", nargs="+", choices=list(ARMS), default=list(SPECS), help="default: every arm of SPECS"
    )
    parser.add_argument("--k", type=int, default=64, help="image / text / joint clusters")
    parser.add_argument("--level", type=int, default=24, help="clusters of the coarse level (cluster.levels)")
    parser.add_argument("--test", type=int, default=50, help="held-out images per concept")
    parser.add_argument("--quick", action="store_true", help="a 6,000-row pool, k 32, level 12, 2 seeds")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.k, args.level, args.seeds, args.test = 6000, 32, 12, args.seeds[:2], 20
    logging.basicConfig(level=logging.WARNING)
    # the models are tiny: one thread (torch's default, one per core, made each training minutes on a
    # loaded 2-core machine instead of seconds)
    torch.set_num_threads(1)
    import rebalance
    from rebalance.runtime.session import ray_session
    from rebalance.spec import RaySpec

    t_start = time.time()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    pool = out / "pool"
    info_path = pool / "dataset.json"
    if not info_path.is_file() or json.loads(info_path.read_text())["rows"] != args.rows:
        generate_web_dataset(pool, n_rows=args.rows, seed=0)
    info = json.loads(info_path.read_text())
    timings = {"generate": time.time() - t_start}
    # the Ray this process already runs (a test's), or a local one started and stopped here
    with ray_session(RaySpec(address="local")):
        run = out / "run"
        weights: dict[str, np.ndarray] = {}
        weight_keys: dict[str, np.ndarray] = {}
        balance_info = {}
        for name in args.specs:
            t0 = time.time()
            saved = out / f"weights-{name}"
            marker = {"rows": args.rows, "k": args.k, "level": args.level, "arm": ARMS[name]}
            if not (saved / "done.json").is_file() or json.loads((saved / "done.json").read_text()) != marker:
                rebalance.run(
                    pipeline_spec(pool, ARMS[name], args.k, args.level, CARRY, args.rows),
                    run,
                    until="balance",
                )
                shutil.rmtree(saved, ignore_errors=True)
                shutil.copytree(run / "weights", saved)
                shutil.copy(run / "balance.json", saved / "balance.json")
                shutil.copy(run / "clusters" / "clusters.json", saved / "clusters.json")
                atomic_write_json(marker, saved / "done.json")
            table = read_parts(saved, columns=["key", "weight"])
            weight_keys[name] = table.column("key").to_numpy(zero_copy_only=False)
            weights[name] = table.column("weight").to_numpy()
            b = json.loads((saved / "balance.json").read_text())
            balance_info[name] = {
                k: b.get(k) for k in ("converged", "passes", "ess_fraction", "max_weight_value")
            }
            timings[f"run-{name}"] = time.time() - t0
        test_dir = write_balanced_set(out / "test-data", args.test, seed=1002)
        rebalance.run(
            pipeline_spec(
                test_dir, {"balance": {"marginals": ["image_cluster"]}}, 8, 4, ["label"], args.test
            ),
            out / "test-run",
            until="embed",
        )
    emb = load_embeddings(run)
    for name, keys in weight_keys.items():  # the weights parts list the rows in the embeddings' order
        if not np.array_equal(keys, emb["key"]):
            raise RuntimeError(f"weights of {name} are not in the order of {run / 'embeddings'}")
    test = load_embeddings(out / "test-run")
    caps = pa.concat_tables(
        pq.read_table(p, columns=["key", "txt"]) for p in sorted(test_dir.glob("part-*.parquet"))
    )
    by_key = dict(zip(caps.column("key").to_pylist(), caps.column("txt").to_pylist(), strict=True))
    test_txt = np.array([by_key[k] for k in test["key"]])
    prompts = prompt_embeddings()
    render = emb["render"]
    counts = np.bincount(emb["label"], minlength=len(LABELS))
    tail = np.argsort(counts, kind="stable")[:8]
    weights = {"plain": np.ones(len(counts[emb["label"]])), "oracle": 1.0 / counts[emb["label"]], **weights}
    weights["logit-adjusted"] = weights["plain"]
    n_draws = int(round(args.budget * args.rows))

    results: dict = {
        "config": vars(args) | {"draws": n_draws},
        "pool": info,
        "balance": balance_info,
        "runs": [],
    }
    # the frozen towers without heads: the same for every arm (what the trained heads start from)
    zs = per_class((test["image"] @ prompts.T).argmax(1), test["label"])
    top = (test["image"] @ test["text"].T).argmax(1)
    results["frozen_towers"] = {
        "zeroshot_balanced": float(zs.mean()),
        "zeroshot_tail": float(zs[tail].mean()),
        "retrieval_r1": float(np.mean(test["label"][top] == test["label"])),
    }
    for arm, w in weights.items():
        shares = np.bincount(emb["label"], weights=w, minlength=len(LABELS)) / w.sum()
        results.setdefault("concept_share", {})[arm] = shares.tolist()
        results.setdefault("concept_tv", {})[arm] = float(0.5 * np.abs(shares - 1 / len(LABELS)).sum())
        for seed in args.seeds:
            t0 = time.time()
            idx = draw_weighted(w, n_draws, seed, 0)
            y = emb["label"][idx]
            drawn = np.bincount(y, minlength=len(LABELS))
            probe = train_probe(emb["image"][idx], y, drawn, seed, args.epochs, arm == "logit-adjusted")
            heads = train_clip_heads(emb["image"][idx], emb["text"][idx], seed, args.epochs)
            rec = {"arm": arm, "seed": seed} | score(probe, heads, test, test_txt, prompts, tail)
            rec["drawn_per_concept"] = drawn.tolist()
            rec["draw_tv_to_uniform"] = float(0.5 * np.abs(drawn / n_draws - 1 / len(LABELS)).sum())
            rec["distinct_renders_drawn"] = int(np.unique(render[idx]).size)
            rec["seconds"] = time.time() - t0
            results["runs"].append(rec)
            print(
                f"{arm:15s} seed {seed}: probe {rec['probe_balanced']:.4f} zero-shot {rec['zeroshot_balanced']:.4f}"
                f" R@1 {rec['retrieval_r1']:.4f} TV {rec['draw_tv_to_uniform']:.3f}"
                f" renders {rec['distinct_renders_drawn']}",
                flush=True,
            )
    arms = list(weights)
    by_arm = {arm: {r["seed"]: r for r in results["runs"] if r["arm"] == arm} for arm in arms}
    extra = ("draw_tv_to_uniform", "distinct_renders_drawn")
    table = {
        arm: {m: summarise([r[m] for r in by_arm[arm].values()]) for m in METRICS + extra} for arm in arms
    }

    def paired_to(ref: str) -> dict:
        return {
            arm: {m: summarise([by_arm[arm][s][m] - by_arm[ref][s][m] for s in args.seeds]) for m in METRICS}
            for arm in arms
            if arm != ref
        }

    paired = paired_to("plain")
    results["summary"], results["paired_difference_to_plain"] = table, paired
    if DEFAULT_ARM in by_arm:  # every arm against the spec default's marginals (the candidates' before/after)
        results["paired_difference_to_default"] = paired_to(DEFAULT_ARM)
    # per concept: the paired difference to plain of each concept's accuracy, mean and std over seeds; the
    # concept that falls most, and how many fall by more than twice their own seed spread
    drops = {}
    for arm in arms:
        if arm == "plain":
            continue
        drops[arm] = {}
        for kind in ("probe", "zeroshot"):
            d = np.array(
                [
                    np.subtract(by_arm[arm][s][f"{kind}_per_class"], by_arm["plain"][s][f"{kind}_per_class"])
                    for s in args.seeds
                ]
            )
            mean, std = d.mean(0), d.std(0, ddof=1) if len(args.seeds) > 1 else np.zeros(d.shape[1])
            worst = int(np.argmin(mean))
            drops[arm][kind] = {
                "worst_concept": LABELS[worst],
                "mean": float(mean[worst]),
                "std": float(std[worst]),
                "concepts_below_2std": int(np.sum(mean < -2 * std)),
            }
    results["concept_drop_to_plain"] = drops
    timings["total"] = time.time() - t_start
    results["seconds"] = timings
    atomic_write_json(results, out / "results.json")

    print(
        f"\npool {args.rows} rows, {sum(info['renders'].values())} distinct renders; draws {n_draws} per arm;"
        f" seeds {args.seeds}; mean ± sample std"
    )
    head_row = " ".join(f"{m:>17s}" for m in METRICS)
    print(f"  {'arm':15s} {head_row} {'TV to uniform':>13s} {'renders':>9s}")
    for arm, row in table.items():
        cells = " ".join(f"{row[m]['mean']:.4f} ± {row[m]['std']:.4f}" for m in METRICS)
        print(
            f"  {arm:15s} {cells} {row['draw_tv_to_uniform']['mean']:13.3f} "
            f"{row['distinct_renders_drawn']['mean']:9.0f}"
        )
    for ref, rows in (("plain", paired), (DEFAULT_ARM, results.get("paired_difference_to_default", {}))):
        if rows:
            print(f"\npaired difference to {ref} (same seed), mean ± std:")
        for arm, row in rows.items():
            print(f"  {arm:15s} " + " ".join(f"{row[m]['mean']:+.4f} ± {row[m]['std']:.4f}" for m in METRICS))
    print(
        "\nper concept, paired difference to plain: the concept that falls most (mean ± std over seeds) and"
    )
    print("the concepts whose mean fall exceeds twice their seed std, probe | zero-shot:")
    for arm, row in drops.items():
        print(
            f"  {arm:15s} "
            + " | ".join(
                f"{r['worst_concept']:>15s} {r['mean']:+.3f} ± {r['std']:.3f} ({r['concepts_below_2std']})"
                for r in row.values()
            )
        )
    print(f"frozen towers without heads: {json.dumps(results['frozen_towers'])}")
    print("\nbalance runs (concept TV to uniform: of the weights, of the draws averaged over seeds):")
    print(
        f"  {'arm':15s} {'converged':>9s} {'passes':>6s} {'ESS':>6s} {'max w':>8s} {'TV w':>6s} {'TV draws':>8s}"
    )
    for arm, b in balance_info.items():
        print(
            f"  {arm:15s} {b['converged']!s:>9s} {b['passes']!s:>6s} {b['ess_fraction']:6.3f}"
            f" {b['max_weight_value']:8.2f} {results['concept_tv'][arm]:6.3f}"
            f" {table[arm]['draw_tv_to_uniform']['mean']:8.3f}"
        )
    print(
        f"seconds: {json.dumps({k: round(v) for k, v in timings.items()})}; results: {out / 'results.json'}"
    )
    return results


if __name__ == "__main__":
    main()
