"""Attribute classifiers for fair-GAN work: which class a generated image belongs to.

Every classifier is a frozen ``nn.Module`` mapping images ``(N, 3, H, W)`` in ``[-1, 1]`` (a generator's
output) to logits ``(N, K)``, differentiably (the bias-mitigation loss backpropagates through it), with
``class_names`` (K) and ``class_prompts`` (K lists of captions, used for the balanced set's captions).
Three kinds (:data:`KINDS`, :func:`build_classifier`):

- ``zero-shot``: an open_clip model against caption prompts: ``logits = s * e(x) . t_k`` with ``e`` the
  L2-normalised image embedding, ``t_k`` the normalised mean of class ``k``'s normalised prompt embeddings
  and ``s`` the model's logit scale. Default: the shipped ``rebalance-tiny`` checkpoint and the built-in
  dataset's 24 concepts with its caption templates.
- ``run-clusters``: the service itself: a run directory's open_clip model (its manifest's ``embed``
  section) and image centroids; ``logits = -||e(x) - c_k||^2 / T``, and :meth:`predict` assigns with
  ``rebalance.kernels.kmeans.assign``, exactly as the cluster stage does. Classes are named after the
  most frequent carried ``label`` of each cluster when the run has one.
- ``torch``: a user's classifier: a module of ``rebalance.fairgan.models`` written by
  ``rebalance.fairgan.io.save_module``, or ``--classifier-arch pkg.module:factory`` (imported code, called
  with JSON keyword arguments) plus weights read with ``weights_only=True`` or from safetensors; never an
  arbitrary pickle.

Before the CLIP image tower, images are mapped to ``[0, 1]``, resized (bicubic, antialiased) to the
model's input size when they differ, and normalised with the model's mean and std, as its preprocessing
does for decoded images.
"""

from __future__ import annotations

import importlib
import json
import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "KINDS",
    "AttributeClassifier",
    "ClipImageEncoder",
    "ClusterClassifier",
    "TorchClassifier",
    "ZeroShotClassifier",
    "build_classifier",
    "builtin_classes",
    "latent_classifier",
    "load_class_names",
]

KINDS = ("zero-shot", "run-clusters", "torch")


def builtin_classes() -> tuple[list[str], list[list[str]]]:
    """The built-in dataset's 24 concept labels and, per concept, its captions from the 6 templates."""
    from rebalance.data.synthetic import CAPTION_TEMPLATES, CONCEPTS, LABELS

    prompts = [[t.format(colour=c, shape=s) for t in CAPTION_TEMPLATES] for c, s in CONCEPTS]
    return list(LABELS), prompts


def load_class_names(path: str | os.PathLike) -> tuple[list[str], list[list[str]]]:
    """Class names and prompts from a JSON file: a list of names (prompt ``"a photo of a <name>"``) or an
    object ``{name: [prompt, ...]}`` (order kept)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"class names file {str(p)!r} does not exist")
    data = json.loads(p.read_text())
    if isinstance(data, list) and data and all(isinstance(n, str) for n in data):
        return list(data), [[f"a photo of a {n}"] for n in data]
    if isinstance(data, dict) and data and all(isinstance(v, list) and v for v in data.values()):
        return list(data), [[str(t) for t in v] for v in data.values()]
    raise ValueError(f"{p}: expected a JSON list of class names or an object {{name: [prompts]}}")


class ClipImageEncoder(nn.Module):
    """``images (N, 3, H, W) in [-1, 1] -> L2-normalised embeddings (N, d)`` with an open_clip model."""

    def __init__(self, loaded) -> None:
        super().__init__()
        self.model = loaded.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        size = self.model.visual.image_size
        self.image_size = tuple(size) if isinstance(size, tuple | list) else (size, size)
        mean, std = _normalisation(loaded.preprocess)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.tokenizer = loaded.tokenizer

    def forward(self, images: Tensor) -> Tensor:
        x = (images.float() + 1) / 2
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bicubic", antialias=True, align_corners=False)
        x = (x.clamp(0, 1) - self.mean) / self.std
        return F.normalize(self.model.encode_image(x).float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> Tensor:
        device = self.mean.device
        return F.normalize(self.model.encode_text(self.tokenizer(list(texts)).to(device)).float(), dim=-1)


def _normalisation(preprocess) -> tuple[tuple[float, ...], tuple[float, ...]]:
    for t in getattr(preprocess, "transforms", []):
        if type(t).__name__ == "Normalize":
            return tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std)
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    return tuple(OPENAI_DATASET_MEAN), tuple(OPENAI_DATASET_STD)


class AttributeClassifier(nn.Module):
    """Base: ``forward(images) -> logits (N, K)``; :meth:`predict` -> labels (numpy int64, -1 when the
    softmax probability of the argmax is below ``min_confidence``)."""

    kind = "base"

    def __init__(self, class_names: Sequence[str], class_prompts: Sequence[Sequence[str]]) -> None:
        super().__init__()
        if len(class_names) < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {len(class_names)}")
        if len(class_prompts) != len(class_names) or any(len(p) == 0 for p in class_prompts):
            raise ValueError("class_prompts needs a non-empty list of prompts for every class")
        self.class_names = [str(n) for n in class_names]
        self.class_prompts = [[str(t) for t in p] for p in class_prompts]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @torch.no_grad()
    def predict(self, images: Tensor, min_confidence: float = 0.0) -> np.ndarray:
        logits = self(images)
        prob, label = torch.softmax(logits.float(), dim=1).max(dim=1)
        label = label.cpu().numpy().astype(np.int64)
        if min_confidence > 0:
            label[prob.cpu().numpy() < min_confidence] = -1
        return label

    def describe(self) -> dict:
        return {"kind": self.kind, "classes": self.class_names}


class ZeroShotClassifier(AttributeClassifier):
    """Zero-shot CLIP: ``logits = s * e(x) . t_k`` (see the module docstring)."""

    kind = "zero-shot"

    def __init__(self, encoder: ClipImageEncoder, class_names, class_prompts, scale: float | None = None):
        super().__init__(class_names, class_prompts)
        self.encoder = encoder
        text = torch.stack([F.normalize(encoder.encode_text(p).mean(0), dim=0) for p in self.class_prompts])
        self.register_buffer("text", text, persistent=False)
        self.scale = float(scale if scale is not None else encoder.model.logit_scale.exp().item())

    def forward(self, images: Tensor) -> Tensor:
        return self.scale * self.encoder(images) @ self.text.T


class ClusterClassifier(AttributeClassifier):
    """A run's image clusters: ``logits = -||e(x) - c_k||^2 / temperature``; :meth:`predict` uses the
    service's nearest-centroid assignment (``rebalance.kernels.kmeans.assign``)."""

    kind = "run-clusters"

    def __init__(
        self,
        encoder: ClipImageEncoder,
        centroids: np.ndarray,
        class_names,
        class_prompts,
        temperature: float = 0.05,
    ):
        super().__init__(class_names, class_prompts)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        centroids = np.asarray(centroids, dtype=np.float32)
        if centroids.ndim != 2 or centroids.shape[0] != len(self.class_names):
            raise ValueError(f"centroids {centroids.shape} do not match {len(self.class_names)} classes")
        self.encoder, self.temperature = encoder, float(temperature)
        self.register_buffer("centroids", torch.from_numpy(centroids.copy()), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        e = self.encoder(images)
        return -torch.cdist(e, self.centroids).pow(2) / self.temperature

    @torch.no_grad()
    def predict(self, images: Tensor, min_confidence: float = 0.0) -> np.ndarray:
        from rebalance.kernels.kmeans import assign

        labels = assign(self.encoder(images).cpu().numpy(), self.centroids.cpu().numpy())[0].astype(np.int64)
        if min_confidence > 0:
            prob = torch.softmax(self(images), dim=1).max(dim=1).values.cpu().numpy()
            labels[prob < min_confidence] = -1
        return labels


class TorchClassifier(AttributeClassifier):
    """A user's torch module: ``logits = module(resize(images))`` (resized to ``input_size`` when set)."""

    kind = "torch"

    def __init__(self, module: nn.Module, class_names, class_prompts, input_size: int | None = None):
        super().__init__(class_names, class_prompts)
        self.module = module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.input_size = input_size or getattr(module, "input_size", None)

    def forward(self, images: Tensor) -> Tensor:
        x = images.float()
        if self.input_size and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            size = (self.input_size, self.input_size)
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
        logits = self.module(x)
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"the classifier returned logits of shape {tuple(logits.shape)}, expected (N, {self.num_classes})"
            )
        return logits


# ---------------------------------------------------------------------------------------------- building


def _clip_encoder(model: str, pretrained: str | None, device: str, seed: int = 0) -> ClipImageEncoder:
    from rebalance.models import load_model

    if (
        pretrained is not None
        and not Path(pretrained).exists()
        and ("/" in pretrained or pretrained.endswith((".safetensors", ".pt", ".bin")))
    ):
        raise FileNotFoundError(f"open_clip checkpoint {pretrained!r} does not exist")
    return ClipImageEncoder(load_model(model, pretrained, device, seed)).to(device)


def _cluster_names(run: Path, k: int) -> tuple[list[str], list[list[str]]]:
    """Cluster ``i`` is named after the most frequent carried ``label`` of its rows, when the run has one."""
    names = [f"image cluster {i}" for i in range(k)]
    prompts = [[f"an image from image cluster {i}"] for i in range(k)]
    try:
        from rebalance.data.parts import read_parts

        assignments = read_parts(run / "assignments")
        embeddings = read_parts(run / "embeddings")
    except Exception:
        return names, prompts
    if "label" not in embeddings.column_names or "image_cluster" not in assignments.column_names:
        return names, prompts
    label_of = dict(
        zip(embeddings.column("key").to_pylist(), embeddings.column("label").to_pylist(), strict=True)
    )
    votes: dict[int, Counter] = {}
    for key, c in zip(
        assignments.column("key").to_pylist(), assignments.column("image_cluster").to_pylist(), strict=True
    ):
        if label_of.get(key) is not None:
            votes.setdefault(int(c), Counter())[str(label_of[key])] += 1
    for c, counter in votes.items():
        if 0 <= c < k:
            top = counter.most_common(1)[0][0]
            names[c] = f"image cluster {c} ({top})"
            prompts[c] = [f"a photo of a {top}"]
    return names, prompts


def _import_factory(arch: str) -> Callable[..., nn.Module]:
    module_name, sep, attr = arch.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--classifier-arch must look like 'package.module:factory', got {arch!r}")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import classifier architecture {arch!r}: {err}") from err


def build_classifier(
    kind: str,
    *,
    run_dir: str | os.PathLike | None = None,
    clip_model: str | None = None,
    clip_pretrained: str | None = None,
    classes_file: str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
    arch: str | None = None,
    arch_kwargs: dict | None = None,
    temperature: float = 0.05,
    device: str = "cpu",
) -> AttributeClassifier:
    """One classifier of :data:`KINDS`, frozen, in eval mode on ``device``.

    ``zero-shot``: ``clip_model``/``clip_pretrained`` (default ``rebalance-tiny`` and its shipped checkpoint)
    against ``classes_file`` (default the built-in concepts). ``run-clusters``: ``run_dir`` (a finished
    rebalance run) with ``temperature`` for the soft logits. ``torch``: ``weights`` (a checkpoint) and
    optionally ``arch`` + ``arch_kwargs``; class names from ``classes_file``, else the checkpoint's metadata,
    else the built-in concepts when the module has 24 outputs.
    """
    from rebalance.models import TINY_CHECKPOINT, TINY_MODEL

    if kind not in KINDS:
        raise ValueError(f"unknown classifier kind {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == "zero-shot":
        names, prompts = load_class_names(classes_file) if classes_file else builtin_classes()
        model = clip_model or TINY_MODEL
        pretrained = clip_pretrained if clip_pretrained is not None or clip_model else str(TINY_CHECKPOINT)
        return ZeroShotClassifier(_clip_encoder(model, pretrained, device), names, prompts).to(device).eval()
    if kind == "run-clusters":
        if run_dir is None:
            raise ValueError("classifier kind run-clusters needs a run directory (--classifier-run)")
        run = Path(run_dir)
        manifest, centroids = run / "manifest.json", run / "clusters" / "image_centroids.npy"
        for p in (manifest, centroids):
            if not p.is_file():
                raise FileNotFoundError(f"{run} is not a finished rebalance run: {p.name} is missing")
        embed = json.loads(manifest.read_text())["spec"]["embed"]
        c = np.load(centroids, allow_pickle=False)
        if classes_file:
            names, prompts = load_class_names(classes_file)
        else:
            names, prompts = _cluster_names(run, c.shape[0])
        encoder = _clip_encoder(clip_model or embed["model"], clip_pretrained or embed.get("pretrained"), device,
                                int(embed.get("seed", 0)))  # fmt: skip
        return ClusterClassifier(encoder, c, names, prompts, temperature).to(device).eval()
    # torch
    if weights is None:
        raise ValueError("classifier kind torch needs a checkpoint (--classifier-weights)")
    from rebalance.fairgan.io import load_module, load_state_dict

    meta: dict = {}
    if arch is None:
        module = load_module(weights)
        _, meta = load_state_dict(weights, "classifier")
    else:
        state, meta = load_state_dict(weights, "classifier")
        module = _import_factory(arch)(**(arch_kwargs or {}))
        try:
            module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        except RuntimeError as err:
            raise ValueError(f"{weights} does not match {arch}: {err}") from err
    if classes_file:
        names, prompts = load_class_names(classes_file)
    elif "class_names" in meta:
        names = json.loads(meta["class_names"])
        prompts = [[f"a photo of a {n}"] for n in names]
    else:
        names, prompts = builtin_classes()
    return TorchClassifier(module, names, prompts).to(device).eval()


def latent_classifier(
    generator: nn.Module,
    classifier: AttributeClassifier,
    min_confidence: float = 0.0,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> Callable[[np.ndarray], np.ndarray]:
    """``classify(z (n, nz) float32) -> labels (n,) int64``: generate ``G(z)`` (eval mode, no gradient) and
    predict with ``classifier`` (-1 below ``min_confidence``), in batches of ``batch_size``."""

    @torch.no_grad()
    def classify(z: np.ndarray) -> np.ndarray:
        generator.eval()
        out = []
        for i in range(0, len(z), batch_size):
            images = generator(torch.as_tensor(z[i : i + batch_size], dtype=torch.float32, device=device))
            out.append(classifier.predict(images, min_confidence))
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    return classify
