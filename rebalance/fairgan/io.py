"""Files of the fair-GAN work: module checkpoints (safetensors, never pickle) and the balanced synthetic set
in the img2dataset Parquet layout. Every file is written atomically (``rebalance.data.atomic``).

Checkpoints: a safetensors file of the module's ``state_dict`` with metadata ``{"module": <class name>,
"config": <JSON of the constructor arguments>}``. A generator file without metadata (e.g. a Ray Train
checkpoint's ``model.safetensors``) is rebuilt from its tensor shapes.

Balanced set: ``out_dir/part-NNNNN.parquet`` with the columns of ``rebalance.data.synthetic.SCHEMA``
(``key``, ``jpg``, ``txt``, ``label``, ``source``, ``status``, ``width``, ``height``) plus ``latent``
(``fixed_size_list<float32>[nz]``) and ``class`` (int32), and ``out_dir/dataset.json`` with the counts.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch import nn

from rebalance.data.atomic import atomic_write_bytes, atomic_write_json, atomic_write_table
from rebalance.data.synthetic import SCHEMA
from rebalance.fairgan.models import Discriminator, Generator, SmallConvNet

__all__ = [
    "balanced_schema",
    "encode_jpeg",
    "load_generator",
    "load_module",
    "load_state_dict",
    "save_module",
    "to_uint8",
    "write_balanced_set",
]

MODULES: dict[str, type[nn.Module]] = {
    "Generator": Generator,
    "Discriminator": Discriminator,
    "SmallConvNet": SmallConvNet,
}
_MAX_ROWS_PER_SHARD = 10_000  # keys have 4 digits for the row in the shard
_SHARD_RE = re.compile(r"^part-(\d{5})\.parquet$")


def _check_file(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} checkpoint {str(p)!r} does not exist or is not a file")
    return p


def load_state_dict(path: str | os.PathLike, what: str = "model") -> tuple[dict[str, torch.Tensor], dict]:
    """``(state_dict, metadata)`` of a ``.safetensors`` file, or of a ``.pt``/``.pth``/``.bin`` file read with
    ``torch.load(weights_only=True)`` (tensors only; no metadata). Other suffixes are refused."""
    p = _check_file(path, what)
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        return state, meta
    if suffix in (".pt", ".pth", ".bin"):
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"{what} checkpoint {str(p)!r} is not a weights-only torch file: {err}") from err
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{what} checkpoint {str(p)!r} does not hold a state dict of tensors")
        return state, {}
    raise ValueError(f"{what} checkpoint {str(p)!r}: expected .safetensors, .pt, .pth or .bin")


def save_module(
    module: nn.Module, path: str | os.PathLike, fp16: bool = False, metadata: dict[str, str] | None = None
) -> None:
    """Write ``module``'s state dict (float tensors as float16 with ``fp16``) and its class and ``config``
    (plus ``metadata``, e.g. ``class_names`` as JSON) as safetensors metadata, atomically."""
    from safetensors.torch import save

    module = module.module if hasattr(module, "module") else module
    tensors = {
        k: (v.detach().to("cpu", torch.float16) if fp16 and v.is_floating_point() else v.detach().cpu())
        .contiguous()
        .clone()
        for k, v in module.state_dict().items()
    }
    meta = {
        **(metadata or {}),
        "module": type(module).__name__,
        "config": json.dumps(getattr(module, "config", {})),
    }
    atomic_write_bytes(save(tensors, metadata=meta), path)


def _float_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _generator_config_from_shapes(state: dict[str, torch.Tensor]) -> dict:
    convs = sorted(
        (k for k, v in state.items() if k.startswith("net.") and k.endswith(".weight") and v.ndim == 4),
        key=lambda k: int(k.split(".")[1]),
    )
    if not convs:
        raise ValueError("not a Generator state dict (no net.*.weight transposed convolutions)")
    first = state[convs[0]]
    nz, top = int(first.shape[0]), int(first.shape[1])
    n_up = len(convs) - 1
    return {"nz": nz, "ngf": top // 2 ** (n_up - 1), "image_size": 4 * 2**n_up}


def load_module(path: str | os.PathLike, expect: str | None = None) -> nn.Module:
    """Rebuild a module of :data:`MODULES` from a checkpoint written by :func:`save_module` (eval mode,
    float32). ``expect`` names the class it must be. A Generator without metadata is rebuilt from its
    shapes."""
    state, meta = load_state_dict(path, expect or "model")
    name = meta.get("module") or expect
    if name == "Generator" and "config" not in meta:
        config = _generator_config_from_shapes(state)
    else:
        if name not in MODULES or "config" not in meta:
            raise ValueError(
                f"{path}: no module metadata (expected one of {sorted(MODULES)} written by save_module)"
            )
        config = json.loads(meta["config"])
    if expect is not None and name != expect:
        raise ValueError(f"{path} holds a {name}, expected a {expect}")
    module = MODULES[name](**config)
    try:
        module.load_state_dict(_float_state(state))
    except RuntimeError as err:
        raise ValueError(f"{path} does not match {name}({config}): {err}") from err
    return module.eval()


def load_generator(path: str | os.PathLike) -> Generator:
    """The :class:`Generator` of a checkpoint (eval mode), with clear errors for a bad path or content."""
    module = load_module(path, expect="Generator")
    assert isinstance(module, Generator)
    return module


# ---------------------------------------------------------------------------------------------- images


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(N, 3, H, W)`` in [-1, 1] -> ``(N, H, W, 3)`` uint8 (round to nearest)."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def encode_jpeg(arr: np.ndarray, quality: int = 95) -> bytes:
    """JPEG bytes of a ``(H, W, 3)`` uint8 image (4:4:4 chroma, as the built-in dataset)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr), mode="RGB").save(
        buf, format="JPEG", quality=quality, subsampling=0
    )
    return buf.getvalue()


def balanced_schema(nz: int) -> pa.Schema:
    """The balanced set's schema: the built-in dataset's columns, ``class`` (int32), ``latent`` [nz]."""
    return pa.schema([*SCHEMA, pa.field("class", pa.int32()), pa.field("latent", pa.list_(pa.float32(), nz))])


def write_balanced_set(
    out_dir: str | os.PathLike,
    latents: np.ndarray,
    classes: np.ndarray,
    class_names: Sequence[str],
    class_prompts: Sequence[Sequence[str]],
    render: Callable[[np.ndarray], np.ndarray],
    *,
    rows_per_shard: int = 2000,
    source: str = "fairgan",
    seed: int = 0,
    extra: dict | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Write the balanced set: one row per latent, ``rows_per_shard`` rows per shard, rows shuffled.

    ``latents`` (N, nz), ``classes`` (N,) in ``0 .. K-1``; ``render(latents (n, nz)) -> (n, H, W, 3) uint8``
    draws the images (called once per shard, so memory is bounded by a shard). Row ``i``'s caption is one
    of ``class_prompts[classes[i]]`` (seeded choice), its ``label`` ``class_names[classes[i]]``. Returns the
    summary written to ``out_dir/dataset.json``: ``path``, ``rows``, ``shards``, ``counts`` by label, plus
    ``extra``. Stale ``part-NNNNN.parquet`` files from a larger earlier write are removed.
    """
    latents = np.asarray(latents, dtype=np.float32)
    classes = np.asarray(classes).astype(np.int64)
    if latents.ndim != 2 or classes.shape != (latents.shape[0],):
        raise ValueError(f"need latents (N, nz) and classes (N,), got {latents.shape} and {classes.shape}")
    if len(class_prompts) != len(class_names) or any(len(p) == 0 for p in class_prompts):
        raise ValueError("class_prompts needs a non-empty list of prompts for every class")
    if classes.size and (classes.min() < 0 or classes.max() >= len(class_names)):
        raise ValueError("classes out of range of class_names")
    if not 1 <= rows_per_shard <= _MAX_ROWS_PER_SHARD:
        raise ValueError(f"rows_per_shard must lie in [1, {_MAX_ROWS_PER_SHARD}], got {rows_per_shard}")
    say = progress or (lambda _msg: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(classes))
    latents, classes = latents[order], classes[order]
    prompt_pick = rng.integers(0, 2**31, size=len(classes))
    n, nz = latents.shape
    schema = balanced_schema(nz)
    shards = max(1, -(-n // rows_per_shard))
    for s in range(shards):
        lo, hi = s * rows_per_shard, min(n, (s + 1) * rows_per_shard)
        z, y = latents[lo:hi], classes[lo:hi]
        images = np.asarray(render(z)) if hi > lo else np.zeros((0, 1, 1, 3), np.uint8)
        if images.shape[0] != hi - lo or images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(
                f"render returned {images.shape} {images.dtype}, expected ({hi - lo}, H, W, 3) uint8"
            )
        h, w = images.shape[1:3]
        prompts = [class_prompts[c][prompt_pick[lo + j] % len(class_prompts[c])] for j, c in enumerate(y)]
        table = pa.Table.from_arrays(
            [
                pa.array([f"{s:05d}{j:04d}" for j in range(hi - lo)], pa.string()),
                pa.array([encode_jpeg(im) for im in images], pa.binary()),
                pa.array(prompts, pa.string()),
                pa.array([class_names[c] for c in y], pa.string()),
                pa.array([source] * (hi - lo), pa.string()),
                pa.array(["success"] * (hi - lo), pa.string()),
                pa.array(np.full(hi - lo, w, np.int32)),
                pa.array(np.full(hi - lo, h, np.int32)),
                pa.array(y.astype(np.int32)),
                pa.FixedSizeListArray.from_arrays(pa.array(z.reshape(-1), pa.float32()), nz),
            ],
            schema=schema,
        )
        atomic_write_table(table, out / f"part-{s:05d}.parquet")
        say(f"balanced set: shard {s + 1}/{shards} written ({hi} of {n} rows)")
    for stale in sorted(out.iterdir()):
        m = _SHARD_RE.match(stale.name)
        if m and int(m.group(1)) >= shards and stale.is_file():
            stale.unlink()
    counts = np.bincount(classes, minlength=len(class_names))
    summary = {
        "path": str(out.resolve()),
        "rows": int(n),
        "shards": shards,
        "counts": {name: int(c) for name, c in zip(class_names, counts, strict=True)},
        **(extra or {}),
    }
    atomic_write_json(summary, out / "dataset.json")
    return summary
