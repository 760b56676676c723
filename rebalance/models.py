"""open_clip models: the configs shipped with rebalance and one loader for names, tags and local checkpoints.

``rebalance-tiny`` (64-d, 32x32 images, 2-layer towers) is registered with open_clip on import of this
module, so ``embed.model: rebalance-tiny`` works like any open_clip model name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch

__all__ = ["TINY_MODEL", "TINY_CHECKPOINT", "TINY_TAG", "LoadedModel", "load_model", "list_models"]

TINY_MODEL = "rebalance-tiny"
_CONFIG_DIR = Path(__file__).parent / "model_configs"
#: rebalance-tiny trained by ``jobs.train_clip`` on the built-in dataset (fp16 safetensors, docs/downstream.md).
TINY_CHECKPOINT = _CONFIG_DIR / "rebalance-tiny-synthetic.safetensors"
#: ``embed.pretrained`` tag of that checkpoint for ``rebalance-tiny`` (what ``rebalance demo`` uses).
TINY_TAG = "synthetic"
open_clip.add_model_config(_CONFIG_DIR)


@dataclass
class LoadedModel:
    """An open_clip model in eval mode with its image preprocessing, tokenizer and output width."""

    model: torch.nn.Module
    preprocess: Any
    tokenizer: Any
    dim: int
    device: torch.device


def list_models() -> list[str]:
    """All model names open_clip knows, rebalance's own included."""
    return open_clip.list_models()


def load_model(name: str, pretrained: str | None, device: str = "cpu", seed: int = 0) -> LoadedModel:
    """Create open_clip model ``name`` on ``device``.

    ``pretrained`` is an open_clip tag (e.g. ``openai``), a local checkpoint path (``.pt``/``.bin`` loaded
    with ``weights_only=True``, or ``.safetensors``), ``synthetic`` for ``rebalance-tiny`` (the shipped
    :data:`TINY_CHECKPOINT`), or None for random weights drawn with ``seed``, which are identical in every
    process.
    """
    if name == TINY_MODEL and pretrained == TINY_TAG:
        pretrained = str(TINY_CHECKPOINT)
    if name not in open_clip.list_models() and not name.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(
            f"unknown open_clip model {name!r}; known models include {TINY_MODEL!r} and ViT-B-32"
        )
    torch.manual_seed(seed)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device, weights_only=True
        )
    except Exception as err:
        if pretrained is None:
            raise
        if Path(pretrained).is_file():
            raise RuntimeError(f"could not load checkpoint {pretrained} for model {name!r}: {err}") from err
        raise RuntimeError(
            f"could not load pretrained weights {pretrained!r} for model {name!r} ({err}). Without network "
            "access, download the checkpoint elsewhere and set embed.pretrained to its local path "
            "(.pt, .bin or .safetensors)."
        ) from err
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    with torch.no_grad():
        dim = int(model.encode_text(tokenizer(["x"]).to(device)).shape[1])
    return LoadedModel(model, preprocess, tokenizer, dim, torch.device(device))
