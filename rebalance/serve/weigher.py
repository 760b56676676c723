"""Weigh new samples with a finished run: nearest fitted centroid per side, then the cell's balance weight.

Everything here is plain Python (numpy, faiss, optionally the run's open_clip model); the HTTP layer is in
:mod:`rebalance.serve.app` and the Ray Serve deployment in :mod:`rebalance.serve.deploy`.

The weight of a new row is the weight of its cell (its tuple of labels), read from ``balance.json``'s
``scaling`` (:class:`~rebalance.kernels.scaling.Scaling`, the formula the balance stage weighs its rows
with; see docs/run-directory.md)::

    w = min(clip.scale * exp(sum_m log_factors[m][index of label_m] - log_normalizer), clip.max_weight)

which is also defined for cells the offline data never had. A label that is not among a marginal's fitted
``values`` has no weight: such a request is rejected with the reason.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rebalance.data import fs
from rebalance.kernels.kmeans import level_labels
from rebalance.kernels.scaling import Scaling
from rebalance.spec import DUP_GROUP, cluster_marginal

__all__ = ["RequestError", "Sample", "Weigher", "MISSING_LABEL", "SIDES"]

log = logging.getLogger(__name__)

MISSING_LABEL = "<missing>"  # a null carried value, as the balance stage labels it
SIDES = ("image", "text")
MAX_ERRORS_REPORTED = 10
MAX_IMAGE_PIXELS = 4096 * 4096  # per image: larger ones are refused before decoding
MAX_REQUEST_PIXELS = 256 * 1024 * 1024  # decoded pixels per request, all images together


class RequestError(ValueError):
    """A request the server cannot answer, with the HTTP status and the reason sent back."""

    def __init__(self, reason: str, status: int = 422):
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass
class Sample:
    """One new row: per side an embedding or a raw input (base64 image bytes / caption), and metadata."""

    key: str | None = None
    image_embedding: list[float] | None = None
    text_embedding: list[float] | None = None
    image: str | None = None
    caption: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Side:
    centroids: np.ndarray  # (k, d) float32
    index: Any  # faiss.IndexFlatL2 over the centroids
    parents: list[np.ndarray]  # level L parent map of level L-1 clusters, L = 1, 2, ...


class Weigher:
    """The fitted state of a finished run directory and the computation of clusters and weights.

    ``load_model`` loads the run's open_clip model (``embed.model``, ``embed.pretrained``, ``embed.seed``
    of the manifest's spec) so that raw images and captions can be embedded; without it, or for runs fitted
    on precomputed embeddings, only embeddings are accepted.
    """

    def __init__(self, run_dir: str | Path, *, load_model: bool = True, device: str = "cpu"):
        import faiss

        self.root = fs.as_path(run_dir)
        manifest_path = self.root / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{self.root} is not a run directory (no manifest.json)")
        manifest = json.loads(manifest_path.read_text())
        stages = manifest.get("stages", {})
        for stage in ("embed", "cluster", "balance"):
            if stages.get(stage, {}).get("status") != "complete":
                raise RuntimeError(f"run {self.root} has no complete {stage} stage: finish the run first")
        self.spec = manifest["spec"]
        balance = json.loads((self.root / "balance.json").read_text())
        scaling = balance.get("scaling")
        if not scaling:
            raise RuntimeError(
                f"{self.root}/balance.json has no 'scaling' (written by an older rebalance): re-run the "
                "balance stage to weigh new rows"
            )
        self.scaling = Scaling.from_dict(scaling)
        self.marginals: list[str] = list(self.scaling.marginals)
        self.values: dict[str, list[str]] = {
            m: list(v) for m, v in zip(self.marginals, self.scaling.values, strict=True)
        }
        self._codes = {m: {v: i for i, v in enumerate(vals)} for m, vals in self.values.items()}

        embed = stages["embed"]
        self.format = embed.get("format")
        self.dataset_sides = [s for s in SIDES if s in embed.get("sides", SIDES)]
        clusters = json.loads((self.root / "clusters" / "clusters.json").read_text())
        self.sides: dict[str, _Side] = {}
        for side in self.dataset_sides:
            if side not in clusters:
                continue
            centroids = fs.read_npy(self.root / "clusters" / f"{side}_centroids.npy").astype(np.float32)
            index = faiss.IndexFlatL2(centroids.shape[1])
            index.add(np.ascontiguousarray(centroids))
            parents = [
                np.asarray(level["parent"], dtype=np.int64) for level in clusters[side].get("levels", [])
            ]
            self.sides[side] = _Side(centroids, index, parents)
        dims = {s.centroids.shape[1] for s in self.sides.values()}
        if len(dims) > 1:
            raise RuntimeError(f"centroids of {self.root} have different widths {sorted(dims)}")
        self.dim = dims.pop() if dims else 0
        self.cluster_marginals: dict[str, tuple[str, int]] = {}
        self.carried_marginals: list[str] = []
        for m in self.marginals:
            if m == DUP_GROUP:
                raise RuntimeError(
                    f"marginal {m!r}: serving runs balanced on near-duplicate groups is not supported "
                    "(a new row's group is unknown)"
                )
            c = cluster_marginal(m)
            if c is None:
                self.carried_marginals.append(m)
            else:
                if c[0] == "joint":
                    raise RuntimeError(
                        f"marginal {m!r}: serving runs balanced on joint clusters is not supported"
                    )
                if c[0] not in self.sides:
                    raise RuntimeError(f"marginal {m!r} needs {c[0]} centroids, which {self.root} lacks")
                if c[1] > len(self.sides[c[0]].parents):
                    raise RuntimeError(f"marginal {m!r} needs cluster level {c[1]}, which {self.root} lacks")
                self.cluster_marginals[m] = c
        self.required_sides = sorted({side for side, _ in self.cluster_marginals.values()})

        self.model = None
        self.device = device
        embed_spec = self.spec.get("embed", {})
        self.model_name = embed_spec.get("model")
        if load_model and self.format != "embeddings":
            from rebalance.models import load_model as _load

            self.model = _load(
                embed_spec["model"], embed_spec.get("pretrained"), device, int(embed_spec.get("seed", 0))
            )
            if self.model.dim != self.dim:
                raise RuntimeError(
                    f"model {self.model_name!r} embeds into {self.model.dim} dimensions but the run's "
                    f"centroids have {self.dim}"
                )

    # -- description -------------------------------------------------------------------------------------

    @property
    def accepts_raw(self) -> bool:
        return self.model is not None

    def info(self) -> dict[str, Any]:
        """What a client needs to build requests: sides, width, marginals and their fitted values."""
        return {
            "run": self.root.name,
            "dim": self.dim,
            "sides": list(self.sides),
            "required_sides": self.required_sides,
            "k": {side: int(s.centroids.shape[0]) for side, s in self.sides.items()},
            "levels": {side: len(s.parents) for side, s in self.sides.items()},
            "marginals": self.marginals,
            "metadata_fields": self.carried_marginals,
            "values": self.values,
            "clip": self.scaling.to_dict()["clip"],
            "model": self.model_name if self.accepts_raw else None,
            "accepts_raw_inputs": self.accepts_raw,
        }

    # -- weighting ---------------------------------------------------------------------------------------

    def weigh(self, samples: list[Sample]) -> list[dict[str, Any]]:
        """Clusters, labels and weight of every sample; raises :class:`RequestError` for a bad sample."""
        n = len(samples)
        errors: list[str] = []
        vectors: dict[str, np.ndarray] = {}
        given: dict[str, np.ndarray] = {}
        for side in SIDES:
            vecs, mask = self._side_vectors(side, samples, errors)
            if vecs is not None:
                vectors[side], given[side] = vecs, mask
        for i, sample in enumerate(samples):
            for side in self.required_sides:
                raw_field = "image" if side == "image" else "caption"
                sent = (
                    getattr(sample, f"{side}_embedding") is not None or getattr(sample, raw_field) is not None
                )
                if not sent:  # (a side that was sent but is unusable has its own error already)
                    raw = "an image" if side == "image" else "a caption"
                    errors.append(
                        f"samples[{i}]: the run balances {self._marginals_of(side)}, which need {raw} or "
                        f"{side}_embedding"
                    )
        if errors:
            raise RequestError(self._join(errors))

        clusters: dict[str, np.ndarray] = {}
        distances: dict[str, np.ndarray] = {}
        for side, x in vectors.items():
            s = self.sides[side]
            dist, idx = s.index.search(x, 1)
            clusters[f"{side}_cluster"] = idx[:, 0].astype(np.int64)
            distances[side] = dist[:, 0]
            for level, labels in enumerate(level_labels(idx[:, 0], s.parents), start=1):
                clusters[f"{side}_cluster_{level}"] = labels.astype(np.int64)

        labels: dict[str, list[str]] = {}
        for name in self.cluster_marginals:
            labels[name] = [str(v) for v in clusters[name]]
        for name in self.carried_marginals:
            column = []
            for i, sample in enumerate(samples):
                metadata = sample.metadata or {}
                if name not in metadata:
                    errors.append(
                        f"samples[{i}].metadata: missing field {name!r} (a balance marginal; send null for a "
                        "missing value)"
                    )
                    column.append(MISSING_LABEL)
                    continue
                value = metadata[name]
                column.append(MISSING_LABEL if value is None else str(value))
            labels[name] = column
        codes = np.zeros((n, len(self.marginals)), dtype=np.int64)
        for m, name in enumerate(self.marginals):
            table = self._codes[name]
            for i, value in enumerate(labels[name]):
                code = table.get(value)
                if code is None:
                    errors.append(
                        f"samples[{i}]: {name} value {value!r} was never seen by the fitted balance (known "
                        f"values: {self._preview(self.values[name])}); it has no weight"
                    )
                else:
                    codes[i, m] = code
        if errors:
            raise RequestError(self._join(errors))
        weights = self.scaling.weights(codes)

        out = []
        for i, sample in enumerate(samples):
            row_clusters = {
                name: int(v[i]) for name, v in clusters.items() if given[name.split("_cluster")[0]][i]
            }
            out.append(
                {
                    "key": sample.key,
                    "weight": float(weights[i]),
                    "labels": {name: labels[name][i] for name in self.marginals},
                    "clusters": row_clusters,
                    "distances": {side: float(d[i]) for side, d in distances.items() if given[side][i]},
                }
            )
        return out

    # -- helpers -----------------------------------------------------------------------------------------

    def _marginals_of(self, side: str) -> list[str]:
        return [m for m, (s, _) in self.cluster_marginals.items() if s == side]

    def _side_vectors(
        self, side: str, samples: list[Sample], errors: list[str]
    ) -> tuple[np.ndarray | None, np.ndarray]:
        """L2-normalised vectors (n, d) of one side (zero rows where not given) and the mask of given rows."""
        from rebalance.kernels.vectors import normalize_rows

        n = len(samples)
        raw_field = "image" if side == "image" else "caption"
        emb_field = f"{side}_embedding"
        mask = np.zeros(n, dtype=bool)
        x = np.zeros((n, max(self.dim, 1)), dtype=np.float32)
        raw_rows: list[int] = []
        raw_values: list[Any] = []
        emb_rows: list[int] = []
        emb_values: list[list[float]] = []
        for i, sample in enumerate(samples):
            emb, raw = getattr(sample, emb_field), getattr(sample, raw_field)
            if emb is None and raw is None:
                continue
            where = f"samples[{i}]"
            if side not in self.sides:
                errors.append(f"{where}: this run has no {side} side; leave out {emb_field} and {raw_field}")
                continue
            if emb is not None and raw is not None:
                errors.append(f"{where}: give {emb_field} or {raw_field}, not both")
                continue
            if emb is not None:
                if len(emb) != self.dim:
                    errors.append(f"{where}.{emb_field}: must have {self.dim} values (got {len(emb)})")
                    continue
                emb_rows.append(i)
                emb_values.append(emb)
                continue
            if self.model is None:
                why = (
                    "this run was fitted on precomputed embeddings"
                    if self.format == "embeddings"
                    else "the server was started without the model"
                )
                errors.append(f"{where}.{raw_field}: {why}; send {emb_field} instead")
                continue
            if side == "image":
                try:
                    data = base64.b64decode(raw, validate=True)
                except (binascii.Error, ValueError) as err:
                    errors.append(f"{where}.image: not valid base64 ({err})")
                    continue
                raw_values.append(data)
            else:
                if not raw.strip():
                    errors.append(f"{where}.caption: empty caption (text:missing)")
                    continue
                raw_values.append(raw)
            raw_rows.append(i)
        if emb_rows:
            with np.errstate(over="ignore", invalid="ignore"):
                rows = np.asarray(emb_values, dtype=np.float64).astype(np.float32)
            normed, ok = normalize_rows(rows)
            for j, i in enumerate(emb_rows):
                if ok[j]:
                    x[i], mask[i] = normed[j], True
                else:
                    errors.append(
                        f"samples[{i}].{emb_field}: vector is zero, not finite, or its norm overflows float32"
                    )
        if raw_rows:
            encoded = self._encode(side, raw_rows, raw_values, errors)
            for i, vec in encoded.items():
                x[i], mask[i] = vec, True
        attempted = any(
            getattr(s, emb_field) is not None or getattr(s, raw_field) is not None for s in samples
        )
        return (x if attempted else None), mask

    def _encode(
        self, side: str, rows: list[int], values: list[Any], errors: list[str]
    ) -> dict[int, np.ndarray]:
        """Embed raw images / captions with the run's model, exactly as the embed stage does."""
        from rebalance.data.images import decode_image

        model = self.model
        if side == "image":
            tensors, kept, budget = [], [], MAX_REQUEST_PIXELS
            for i, data in zip(rows, values, strict=True):
                try:
                    pixels = _pixels(data)
                    if pixels > MAX_IMAGE_PIXELS:
                        raise ValueError(
                            f"image:too large for the endpoint ({pixels} > {MAX_IMAGE_PIXELS} pixels)"
                        )
                    budget -= pixels
                    if budget < 0:
                        raise ValueError(
                            f"image:the request's images exceed {MAX_REQUEST_PIXELS} pixels together; split the batch"
                        )
                    tensors.append(model.preprocess(decode_image(data)))
                    kept.append(i)
                except ValueError as err:
                    errors.append(f"samples[{i}].image: {err}")
            vecs = model.encode_images(tensors)
        else:
            kept = rows
            vecs = model.encode_texts([str(v) for v in values])
        return dict(zip(kept, vecs, strict=True))

    @staticmethod
    def _preview(values: list[str], limit: int = 20) -> str:
        shown = ", ".join(repr(v) for v in values[:limit])
        return f"{shown}, ... ({len(values)} in all)" if len(values) > limit else shown

    @staticmethod
    def _join(errors: list[str]) -> str:
        head = "; ".join(errors[:MAX_ERRORS_REPORTED])
        more = len(errors) - MAX_ERRORS_REPORTED
        return head + (f"; and {more} more problems" if more > 0 else "")


def _pixels(data: bytes) -> int:
    """Width x height from the image header (nothing is decoded; only JPEG, PNG and WebP are opened); 0 when
    unreadable (decode_image says why)."""
    from rebalance.data.images import open_header

    try:
        with open_header(data) as image:
            return int(image.width) * int(image.height)
    except Exception:  # noqa: BLE001 - decode_image reports the reason
        return 0
