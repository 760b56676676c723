"""The GPU check (issue 21): every GPU path of rebalance on one GPU, in under 8 minutes, with its numbers.

    python benchmarks/gpu_check.py                 # on a GPU machine: ViT-B-32, 16,384 rows; faiss 262,144 x 512
    python benchmarks/gpu_check.py --cpu-dry-run   # anywhere: the same code paths, tiny sizes, on the CPU

Prints, each with its own wall time:

1. embed: the model-bound rate (ViT-B-32, random weights, bf16 autocast, on tensors already on the GPU),
   a plain open_clip loop (one thread decodes, the GPU encodes: ``benchmarks/embed_throughput.plain_loop``)
   and the embed stage (``rebalance.run(..., until="embed")``, ``embed.device: cuda``, its decode pool of
   ``embed.cpus_per_gpu`` threads), as images/s; target: stage >= 0.8 x model-bound. The images are the
   synthetic dataset's, re-encoded as ``--image-size`` px JPEGs (LAION-like decode cost).
2. k-means: faiss GPU vs faiss CPU (``rebalance.kernels.kmeans.train_kmeans``) at 262,144 x 512, k = 1024,
   20 iterations, and the agreement of the two objectives; "faiss-gpu not installed" when it is not.
3. row assignment: the cluster stage's GPU-actor kernel (``assign(..., device="cuda")``, a torch flat
   search) vs faiss CPU on 262,144 random rows x 512 to k = 1024 centroids: rows/s and label agreement
   (target > 99.99 %: only float32 near-ties may differ).
4. Sinkhorn: ``sinkhorn_knopp_torch`` on the GPU with bf16 and fp16 inputs vs float64 on the same rounded
   scores (target: max error < 1e-4).
5. LDAM (``--loss ldam`` on the GPU: one forward / backward) and the resumed GAN (``jobs.train_gan.build_gan``,
   Adam state from a CPU checkpoint, one step on the GPU): OK or the error.

Exit status 1 when a check fails (an exception, or a target missed). ``--cpu-dry-run`` runs every path at
toy sizes on the CPU (rebalance-tiny, 256 rows, 4,096 x 64 k-means) to prove the script itself works; its
numbers mean nothing.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.embed_throughput import plain_loop, stage_spec  # noqa: E402
from rebalance.data.synthetic import generate_dataset  # noqa: E402

FAILED: list[str] = []


def section(name: str, fn: Callable[[], None]) -> None:
    """Run one check; a crash is printed and recorded, the next check still runs."""
    print(f"\n== {name}", flush=True)
    start = time.perf_counter()
    try:
        fn()
    except Exception:
        traceback.print_exc()
        FAILED.append(f"{name}: crashed")
    print(f"   ({time.perf_counter() - start:.1f} s)", flush=True)


def check(name: str, ok: bool, what: str) -> None:
    print(f"   {'PASS' if ok else 'FAIL'}  {what}")
    if not ok:
        FAILED.append(f"{name}: {what}")


def resize_shards(data: Path, size: int) -> None:
    """Re-encode every image of the synthetic shards as a ``size`` x ``size`` JPEG (quality 90)."""
    from PIL import Image

    def one(b: bytes) -> bytes:
        out = io.BytesIO()
        Image.open(io.BytesIO(b)).convert("RGB").resize((size, size)).save(out, "JPEG", quality=90)
        return out.getvalue()

    with ThreadPoolExecutor() as pool:
        for path in sorted(data.glob("part-*.parquet")):
            table = pq.read_table(path)
            jpg = pa.array(list(pool.map(one, table.column("jpg").to_pylist())), pa.binary())
            pq.write_table(table.set_column(table.schema.get_field_index("jpg"), "jpg", jpg), path)


def model_bound(model_name: str, device: str, rows: int, batch_size: int) -> float:
    """Images/s of the image tower alone on random pixels already on ``device`` (bf16 autocast on cuda)."""
    import contextlib

    from PIL import Image

    from rebalance.models import load_model

    model = load_model(model_name, None, device, seed=0)
    shape = model.preprocess(Image.new("RGB", (64, 64))).shape  # the model's input size
    x = torch.randn(batch_size, *shape, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        model.model.encode_image(x)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(max(1, rows // batch_size)):
            model.model.encode_image(x)
        if device == "cuda":
            torch.cuda.synchronize()
    return max(1, rows // batch_size) * batch_size / (time.perf_counter() - start)


def embed_check(args: argparse.Namespace, device: str) -> None:
    import ray

    import rebalance

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        generate_dataset(data, n_rows=args.rows, n_shards=args.shards, seed=0)
        resize_shards(data, args.image_size)
        bound = model_bound(args.model, device, args.rows, args.batch_size)
        start = time.perf_counter()
        rows = plain_loop(data, args.model, args.batch_size, device)
        plain = rows / (time.perf_counter() - start)
        # "local": a Ray of its own, never one that another process on this machine started
        ray.init(address="local", include_dashboard=False, configure_logging=False, log_to_driver=False)
        try:
            spec = stage_spec(data, args.model, args.batch_size, device)
            out = Path(tmp) / "run"
            start = time.perf_counter()
            rebalance.run(spec, out, until="embed")
            stage = rows / (time.perf_counter() - start)
            manifest = json.loads((out / "manifest.json").read_text())["stages"]["embed"]
        finally:
            ray.shutdown()
    print(f"   {args.model}, {rows} rows of {args.image_size} px JPEG, batch {args.batch_size}, {device}")
    print(f"   model-bound (image tower only)   {bound:10.1f} images/s")
    print(f"   plain open_clip loop             {plain:10.1f} images/s  ({plain / bound:.2f} x model-bound)")
    print(f"   embed stage                      {stage:10.1f} images/s  ({stage / bound:.2f} x model-bound)")
    print(f"   manifest: device {manifest['device']}, dtype {manifest['dtype']}")
    check("embed", manifest["device"] == device, f"manifest records device {device}")
    if device == "cuda":
        check("embed", stage >= 0.8 * bound, "embed stage >= 0.8 x model-bound rate")


def kmeans_check(args: argparse.Namespace) -> None:
    from rebalance.kernels.kmeans import gpu_available, train_kmeans

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4 * args.k, args.dim)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), args.kmeans_rows)] + 0.3 * rng.normal(
        size=(args.kmeans_rows, args.dim)
    ).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    times, objectives = {}, {}
    for gpu in (False, True) if gpu_available() else (False,):
        start = time.perf_counter()
        result = train_kmeans(x, args.k, niter=20, spherical=True, seed=0, gpu=gpu)
        times[gpu], objectives[gpu] = time.perf_counter() - start, result.objective[-1]
    print(f"   {args.kmeans_rows} x {args.dim}, k = {args.k}, 20 iterations, spherical")
    print(f"   faiss CPU    {times[False]:8.2f} s  objective {objectives[False]:.6g}")
    if True not in times:
        print("   faiss GPU    not measured: faiss-gpu is not installed (or torch sees no GPU)")
        if torch.cuda.is_available():
            FAILED.append("k-means: a GPU is here but faiss has no GPU support")
        return
    print(f"   faiss GPU    {times[True]:8.2f} s  objective {objectives[True]:.6g}")
    print(f"   speed-up     {times[False] / times[True]:8.2f} x")
    gap = abs(objectives[True] - objectives[False]) / abs(objectives[False])
    check("k-means", gap < 1e-2, f"GPU and CPU objectives within 1 % ({100 * gap:.3f} %)")


def assign_check(args: argparse.Namespace, device: str) -> None:
    """Row assignment as the cluster stage's GPU actors run it (torch flat search) vs faiss-cpu."""
    from rebalance.kernels.kmeans import assign

    rng = np.random.default_rng(1)
    x = rng.normal(size=(args.kmeans_rows, args.dim)).astype(np.float32)
    c = rng.normal(size=(args.k, args.dim)).astype(np.float32)
    times, labels = {}, {}
    for where in ("cpu", device) if device != "cpu" else ("cpu",):
        assign(x[:1024], c, device=where)  # warm-up (CUDA context, kernels)
        start = time.perf_counter()
        labels[where] = assign(x, c, device=where)[0]
        times[where] = time.perf_counter() - start
    print(f"   {args.kmeans_rows} x {args.dim} rows to k = {args.k} centroids")
    print(f"   faiss CPU     {times['cpu']:8.2f} s  ({args.kmeans_rows / times['cpu']:,.0f} rows/s)")
    if device == "cpu":
        return
    print(f"   torch {device}    {times[device]:8.2f} s  ({args.kmeans_rows / times[device]:,.0f} rows/s)")
    print(f"   speed-up      {times['cpu'] / times[device]:8.2f} x")
    agree = float((labels["cpu"] == labels[device]).mean())
    check("assign", agree > 0.9999, f"GPU and CPU labels agree on {100 * agree:.4f} % of rows (> 99.99 %)")


def sinkhorn_check(args: argparse.Namespace, device: str) -> None:
    from rebalance.kernels.sinkhorn import sinkhorn_knopp_torch, soft_sinkhorn

    rng = np.random.default_rng(0)
    z = rng.normal(size=(args.sinkhorn_rows, args.sinkhorn_k))
    scores = z / np.linalg.norm(z, axis=1, keepdims=True)
    pi = np.linspace(1, 3, args.sinkhorn_k)
    for dtype in (torch.bfloat16, torch.float16):
        s = torch.tensor(scores, dtype=dtype, device=device)
        codes = sinkhorn_knopp_torch(s, torch.tensor(pi, device=device), 0.05, 300)
        expected = soft_sinkhorn(s.double().cpu().numpy(), pi, 0.05, 300).codes
        error = float(np.abs(codes.double().cpu().numpy() - expected).max())
        check(
            "sinkhorn",
            error < 1e-4,
            f"{dtype} inputs {tuple(s.shape)} on {device}: max error {error:.2e} < 1e-4",
        )


def ldam_resume_check(device: str) -> None:
    from jobs.train_gan import build_gan
    from rebalance.losses import LDAMLoss

    loss = LDAMLoss([500, 50, 5, 1])  # stays on the CPU, as in jobs/train_longtail.py
    logits = torch.randn(8, 4, device=device, requires_grad=True)
    value = loss(logits, torch.randint(0, 4, (8,), device=device))
    value.backward()
    check(
        "ldam", bool(torch.isfinite(value).item()), f"LDAM forward/backward on {device}: {value.item():.4f}"
    )
    gan = argparse.Namespace(seed=0, nz=16, ngf=8, ndf=8, image_size=32, lr=2e-4, beta1=0.5)
    G, D, opt_g, opt_d = build_gan(gan, "cpu")
    G(torch.randn(2, 16)).square().mean().backward()
    opt_g.step()
    saved = opt_g.state_dict()
    G, D, opt_g, opt_d = build_gan(gan, device)  # a resumed run: checkpoint loaded after the move
    opt_g.load_state_dict(saved)
    G(torch.randn(2, 16, device=device)).square().mean().backward()
    opt_g.step()
    devices = {v.device.type for s in opt_g.state.values() for k, v in s.items() if k != "step"}
    check(
        "resume", devices == {torch.device(device).type}, f"resumed Adam step on {device}, state on {devices}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu-dry-run", "--quick", action="store_true", help="toy sizes on the CPU")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--rows", type=int, default=16_384)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--kmeans-rows", type=int, default=262_144)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=1024)
    args = parser.parse_args()
    args.sinkhorn_rows, args.sinkhorn_k = 1024, 512
    if args.cpu_dry_run:
        args.model, args.rows, args.shards, args.batch_size, args.image_size = (
            "rebalance-tiny",
            256,
            2,
            64,
            64,
        )
        args.kmeans_rows, args.dim, args.k = 4096, 64, 16
        args.sinkhorn_rows, args.sinkhorn_k = 256, 16
        device = "cpu"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on a GPU machine, or pass --cpu-dry-run")
        device = "cuda"
        print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    start = time.perf_counter()
    section("1. embed stage vs plain GPU loop vs model-bound", lambda: embed_check(args, device))
    section("2. k-means: faiss GPU vs CPU", lambda: kmeans_check(args))
    section("3. row assignment: torch on the GPU vs faiss CPU", lambda: assign_check(args, device))
    section("4. torch Sinkhorn, bf16 / fp16 inputs vs float64", lambda: sinkhorn_check(args, device))
    section("5. LDAM and resumed GAN on the device", lambda: ldam_resume_check(device))
    print(
        f"\ntotal {time.perf_counter() - start:.1f} s; {'FAILED: ' + '; '.join(FAILED) if FAILED else 'all passed'}"
    )
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
