"""open_clip models: the configs shipped with rebalance, one loader for names, tags and local checkpoints,
and the encoding of images and captions into L2-normalised vectors that the embed stage and the endpoint
share.

``rebalance-tiny`` (64-d, 32x32 images, 2-layer towers) is registered with open_clip on import of this
module, so ``embed.model: rebalance-tiny`` works like any open_clip model name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch

from rebalance.kernels.vectors import normalize_rows

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
    """An open_clip model in eval mode with its image preprocessing (evaluation and training transforms),
    tokenizer and output width ``dim``.

    :meth:`encode_images` and :meth:`encode_texts` are how rebalance embeds: no gradients, bfloat16
    autocast on CUDA, float32 L2-normalised rows ``e / ||e||`` of shape (n, dim).
    """

    model: torch.nn.Module
    preprocess: Any
    tokenizer: Any
    dim: int
    device: torch.device
    preprocess_train: Any

    def encode_images(self, images: Sequence[torch.Tensor]) -> np.ndarray:
        """Embed preprocessed images (each a (3, H, W) tensor from :attr:`preprocess`); (n, dim) float32."""
        if not len(images):
            return np.zeros((0, self.dim), dtype=np.float32)
        pixels = torch.stack(list(images))
        if self.device.type == "cuda":  # page-locked, so the copy overlaps the host's next batch
            pixels = pixels.pin_memory().to(self.device, non_blocking=True)
        with torch.no_grad(), self._autocast():
            out = self.model.encode_image(pixels.to(self.device))
        return normalize_rows(out.float().cpu().numpy())[0]

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embed captions (tokenised with :attr:`tokenizer`); (n, dim) float32."""
        if not len(texts):
            return np.zeros((0, self.dim), dtype=np.float32)
        with torch.no_grad(), self._autocast():
            out = self.model.encode_text(self.tokenizer(list(texts)).to(self.device))
        return normalize_rows(out.float().cpu().numpy())[0]

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


def list_models() -> list[str]:
    """All model names open_clip knows, rebalance's own included."""
    return open_clip.list_models()


def load_model(name: str, pretrained: str | None, device: str = "cpu", seed: int = 0) -> LoadedModel:
    """Create open_clip model ``name`` on ``device``.

    ``pretrained`` is an open_clip tag (e.g. ``openai``), a local checkpoint path (``.pt``/``.bin`` loaded
    with ``weights_only=True``, or ``.safetensors``), ``synthetic`` for ``rebalance-tiny`` (the shipped
    :data:`TINY_CHECKPOINT`), or None for random weights drawn with ``seed``, which are identical in every
    process. The model is returned in eval mode; training code calls ``model.train()`` and transforms its
    images with ``preprocess_train``.
    """
    if name == TINY_MODEL and pretrained == TINY_TAG:
        pretrained = str(TINY_CHECKPOINT)
    if name not in open_clip.list_models() and not name.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(
            f"unknown open_clip model {name!r}; known models include {TINY_MODEL!r} and ViT-B-32"
        )
    torch.manual_seed(seed)
    try:
        model, preprocess_train, preprocess = open_clip.create_model_and_transforms(
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
    return LoadedModel(model, preprocess, tokenizer, dim, torch.device(device), preprocess_train)
