"""The run specification: typed dataclasses loaded from YAML or a dict, validated before any work starts.

Every field has a default except ``data.path``. Unknown keys, wrong types and impossible values raise
:class:`SpecError`, whose message names the field (as a dotted path) and the offending value.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "SpecError",
    "Target",
    "DataSpec",
    "EmbedSpec",
    "KMeansSpec",
    "ClusterSpec",
    "DedupSpec",
    "BalanceSpec",
    "SoftSpec",
    "ReportSpec",
    "ConceptsSpec",
    "RaySpec",
    "Spec",
]


class SpecError(ValueError):
    """A spec field is unknown, of the wrong type, or holds an impossible value."""

    def __init__(self, field_path: str, message: str, value: Any = dataclasses.MISSING):
        self.field_path = field_path
        self.value = value
        shown = "" if value is dataclasses.MISSING else f" (got {value!r})"
        super().__init__(f"spec field '{field_path}': {message}{shown}")


def _is_remote(path: str) -> bool:
    return "://" in path


# A decimal number as people write it in YAML. PyYAML (YAML 1.1) reads ``1e-6`` (no dot) and ``1E3`` as
# strings; a float field takes such a string as the number. ``nan``, ``inf`` and words stay errors.
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def _yaml_number(value: Any) -> Any:
    """``value`` as a float when it is a number-looking string (``"1e-6"``), else unchanged."""
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    return value


def _exponent(value: Any, where: str) -> float:
    value = _yaml_number(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise SpecError(where, "expected a number >= 0", value)
    return float(value)


def _positive(value: Any, where: str) -> float:
    value = _yaml_number(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise SpecError(where, "expected a number > 0", value)
    return float(value)


def _value_weights(value: Any, where: str) -> dict[str, float]:
    if isinstance(value, str):
        path = Path(value)
        if not path.is_file():
            raise SpecError(where, "file does not exist", value)
        value = yaml.safe_load(path.read_text())
    if not isinstance(value, dict) or not value:
        raise SpecError(where, "expected a non-empty mapping value -> weight", value)
    clean: dict[str, float] = {}
    for k, w in value.items():
        w = _yaml_number(w)
        if isinstance(w, bool) or not isinstance(w, int | float) or not w >= 0:
            raise SpecError(f"{where}.{k}", "expected a number >= 0", w)
        clean[str(k)] = float(w)
    if sum(clean.values()) <= 0:
        raise SpecError(where, "weights must not all be zero", value)
    return clean


TARGET_KINDS: dict[str, Any] = {
    "power": _exponent,
    "cap": _positive,
    "weights": _value_weights,
}
"""The target kinds with a parameter, each with the parser of ``{kind: value}``'s value (value, field path)
-> the value :func:`rebalance.kernels.targets.target_marginal` takes as the keyword ``kind``. ``uniform``
has none. A new kind: its parser here and its function in :mod:`rebalance.kernels.targets`."""


@dataclass(frozen=True)
class Target:
    """A target marginal: ``uniform``, ``{power: a}`` (count^a), ``{cap: t}`` (min(count, t)) or
    ``{weights: {value: w, ...}}`` (given, normalised to sum 1; values not listed get 0), computed by
    :func:`rebalance.kernels.targets.target_marginal`. ``value`` is the kind's parameter (None for
    ``uniform``)."""

    kind: str = "uniform"
    value: Any = None

    @property
    def params(self) -> dict[str, Any]:
        """The keyword parameters of the kind's target function: ``{kind: value}`` (none for uniform)."""
        return {} if self.kind == "uniform" else {self.kind: self.value}

    @classmethod
    def parse(cls, raw: Any, where: str) -> Target:
        if isinstance(raw, Target):
            return raw
        if raw == "uniform":
            return cls()
        kinds = ", ".join(f"{{{k}: ...}}" for k in TARGET_KINDS)
        if not isinstance(raw, dict) or len(raw) != 1:
            raise SpecError(where, f"expected 'uniform' or one of {kinds}", raw)
        ((kind, value),) = raw.items()
        parse = TARGET_KINDS.get(kind)
        if parse is None:
            raise SpecError(where, f"unknown target kind {kind!r}; expected {', '.join(TARGET_KINDS)}", raw)
        return cls(kind=kind, value=parse(value, f"{where}.{kind}"))

    def to_dict(self) -> Any:
        return "uniform" if self.kind == "uniform" else {self.kind: self.value}


@dataclass(frozen=True)
class DataSpec:
    """Where the dataset is and which columns hold keys, images, captions and carried metadata.

    ``format`` (``auto`` tries them in this order): ``embeddings`` on a directory with ``img_emb/`` or
    ``text_emb/`` (the clip-retrieval / LAION layout of ``.npy`` vectors plus ``metadata/*.parquet``);
    ``webdataset`` (``.tar`` shards of ``{key}.jpg|jpeg|png|webp`` + ``{key}.txt`` or ``{key}.json``);
    ``parquet`` (img2dataset layout; ``embeddings`` when the image/text columns hold float lists);
    ``folder`` (image files with optional sidecar ``.txt`` captions). ``image_column`` / ``text_column``
    name Parquet columns only; for webdataset, folder and the LAION layout they must stay unset (the sides
    are found from the files). ``key_column`` is read from Parquet shards and LAION metadata; WebDataset
    keys are member names without extension, folder keys relative paths without suffix. ``carry`` names
    Parquet / LAION metadata columns or WebDataset json fields. ``max_image_bytes``: a Parquet image cell
    larger than this is rejected (``image:too large``) without being decoded.
    """

    path: str
    format: Literal["auto", "parquet", "webdataset", "folder", "embeddings"] = "auto"
    image_column: str | None = None  # Parquet only; default: "jpg", or "image" for format: embeddings
    text_column: str | None = None  # Parquet only; default: "txt", or "text" for format: embeddings
    key_column: str = "key"
    carry: tuple[str, ...] = ()
    max_image_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_image_bytes < 1:
            raise SpecError("data.max_image_bytes", "must be >= 1", self.max_image_bytes)
        if not self.path:
            raise SpecError("data.path", "is required", self.path)
        if not _is_remote(self.path) and not Path(self.path).exists():
            raise SpecError("data.path", "path does not exist", self.path)


@dataclass(frozen=True)
class EmbedSpec:
    """The open_clip model, its weights (tag, local checkpoint, or null for seeded random init) and batching.

    ``prefetch``: batches each actor reads, decodes and preprocesses in a background thread ahead of the one
    its model encodes (0: one after the other, in the actor's thread).
    ``device``: ``cuda`` asks Ray for one GPU per actor even when no GPU node is live yet (the autoscaler adds
    them); ``auto`` is ``cuda`` when the cluster has a GPU or its autoscaler config may add one
    (docs/cluster.md, "GPU workers"), else ``cpu``. ``cpus_per_gpu``: CPUs each GPU actor asks for and the
    threads that decode and preprocess its images (``auto``: the CPUs per GPU of the GPU node type, else 4)."""

    model: str = "ViT-B-32"
    pretrained: str | None = "openai"
    batch_size: int = 256
    device: Literal["auto", "cpu", "cuda"] = "auto"
    workers: int | Literal["auto"] = "auto"
    seed: int = 0
    prefetch: int = 2
    cpus_per_gpu: int | Literal["auto"] = "auto"

    def __post_init__(self) -> None:
        if self.cpus_per_gpu != "auto" and self.cpus_per_gpu < 1:
            raise SpecError("embed.cpus_per_gpu", "must be >= 1 or 'auto'", self.cpus_per_gpu)
        if self.batch_size < 1:
            raise SpecError("embed.batch_size", "must be >= 1", self.batch_size)
        if self.workers != "auto" and self.workers < 1:
            raise SpecError("embed.workers", "must be >= 1 or 'auto'", self.workers)
        if self.prefetch < 0:
            raise SpecError("embed.prefetch", "must be >= 0 (0: no background preparation)", self.prefetch)


@dataclass(frozen=True)
class KMeansSpec:
    """Number of k-means centroids for one modality: an integer, or ``auto`` (the default): round(sqrt(N))
    for N embedded rows, between 2 and 1024, and at most the distinct vectors of the training sample
    (resolved by the cluster stage; ``clusters/clusters.json`` records the k used)."""

    k: int | Literal["auto"] = "auto"

    def __post_init__(self) -> None:
        if self.k != "auto" and (isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1):
            raise SpecError("k", "must be an integer >= 1 or 'auto'", self.k)


@dataclass(frozen=True)
class ClusterSpec:
    """faiss k-means on image and text embeddings, trained on a uniform sample of k * sample_per_centroid rows.

    ``joint``: also k-means on each row's joint vector (its unit image and text vectors concatenated and
    scaled by 1/sqrt(2), a unit vector), giving ``joint_cluster``; null (the default) for none. ``init``:
    how each k-means run starts, ``kmeans++`` (D^2 seeding) or ``random`` (k distinct random rows, faiss's
    own start); ``nredo`` runs from seeds seed, seed + 1, ... and keeps the smallest squared error;
    ``auto`` (the default): as many as a work budget allows for the side's training sample
    (:func:`rebalance.kernels.kmeans.auto_nredo`, resolved by the cluster stage; ``clusters.json`` records
    the number run).
    """

    image: KMeansSpec = field(default_factory=KMeansSpec)
    text: KMeansSpec = field(default_factory=KMeansSpec)
    joint: KMeansSpec | None = None
    init: Literal["kmeans++", "random"] = "kmeans++"
    niter: int = 20
    spherical: bool = True
    sample_per_centroid: int = 256
    seed: int = 0
    nredo: int | Literal["auto"] = "auto"  # seeded restarts; the best objective is kept
    levels: tuple[int, ...] = ()  # coarser levels: k-means on the centroids of the level below
    resampling_steps: int = 10  # per coarser level: re-run k-means on each cluster's nearest members

    def __post_init__(self) -> None:
        given = [s.k for s in (self.image, self.text, self.joint) if s is not None and s.k != "auto"]
        below = min(given, default=None)  # an auto k is checked against the levels once it is resolved
        for i, k in enumerate(self.levels):
            if not 1 <= k <= (below or k):
                bound = (
                    "must be >= 1"
                    if below is None
                    else f"must lie in [1, {below}] (the k of the level below)"
                )
                raise SpecError(f"cluster.levels[{i}]", bound, k)
            below = k
        if self.niter < 1:
            raise SpecError("cluster.niter", "must be >= 1", self.niter)
        if self.nredo != "auto" and (
            isinstance(self.nredo, bool) or not isinstance(self.nredo, int) or self.nredo < 1
        ):
            raise SpecError("cluster.nredo", "must be an integer >= 1 or 'auto'", self.nredo)
        if self.sample_per_centroid < 1:
            raise SpecError("cluster.sample_per_centroid", "must be >= 1", self.sample_per_centroid)
        if self.resampling_steps < 0:
            raise SpecError("cluster.resampling_steps", "must be >= 0", self.resampling_steps)


@dataclass(frozen=True)
class DedupSpec:
    """Near-duplicate groups (SemDeDup): inside each ``<side>_cluster`` of the cluster stage, rows whose
    ``side`` embeddings have cosine similarity >= ``threshold`` are linked, and each connected component is
    a group (``dup_group``: the group's smallest key; ``dup_size``: its rows). ``block``: rows per tile of
    a cluster's pairwise similarity matrix (memory O(block^2) per actor)."""

    side: Literal["image", "text", "joint"] = "image"
    threshold: float = 0.95
    block: int = 4096

    def __post_init__(self) -> None:
        if not -1 < self.threshold <= 1:
            raise SpecError("dedup.threshold", "must be a cosine similarity in (-1, 1]", self.threshold)
        if self.block < 1:
            raise SpecError("dedup.block", "must be >= 1", self.block)


MARGINAL_CLUSTERS = ("image_cluster", "text_cluster")
AUTO_RELAX = 1.0  # balance.relax: auto, the strength of cluster marginals (docs/spec.md: its evidence)
DUP_GROUP = "dup_group"  # the near-duplicate marginal (dedup section): one unit of mass per group
CLUSTER_SIDES = ("image", "text", "joint")  # joint: k-means on both sides of a row together (cluster.joint)


def cluster_marginal(name: str) -> tuple[str, int] | None:
    """(side, level) of a cluster marginal name (``image_cluster`` is level 0, ``text_cluster_2`` level 2
    of ``cluster.levels``; side ``joint`` with ``cluster.joint``), or None for any other name (a carried
    column)."""
    side, sep, rest = name.partition("_cluster")
    if side not in CLUSTER_SIDES or not sep:
        return None
    if rest == "":
        return side, 0
    if rest.startswith("_") and rest[1:].isdigit() and int(rest[1:]) >= 1:
        return side, int(rest[1:])
    return None


@dataclass(frozen=True)
class SoftSpec:
    """Balanced soft labels: a log-domain Sinkhorn on the scores S = x C^T / temperature of every row's
    ``side`` embedding x against that side's centroids C, with row marginal 1/N and column marginal the
    balance target of ``<side>_cluster``; each row keeps its ``top_k`` largest codes.

    ``iterations`` is a fixed count (GH: 300, SwAV: 3) or ``auto`` (until the column marginal's total
    variation is below ``balance.tol``, at most ``balance.max_iter``).
    """

    side: Literal["image", "text"] = "image"
    temperature: float = 0.05
    iterations: int | Literal["auto"] = 3
    top_k: int = 5

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise SpecError("balance.soft.temperature", "must be > 0", self.temperature)
        if self.iterations != "auto" and self.iterations < 1:
            raise SpecError("balance.soft.iterations", "must be >= 1 or 'auto'", self.iterations)
        if self.top_k < 1:
            raise SpecError("balance.soft.top_k", "must be >= 1", self.top_k)


@dataclass(frozen=True)
class BalanceSpec:
    """Iterative proportional fitting of the joint measure over ``marginals`` toward their targets.

    ``iterations`` is a fixed number of passes (the k-step balanced measure) or ``auto`` (until the largest
    total-variation marginal error is below ``tol``, at most ``max_iter`` passes). ``path``: ``cell`` runs
    IPF on the table of distinct label tuples on the driver, ``rows`` keeps the rows on actors and reduces
    per-label sums each step, ``auto`` takes the cell path while the parts hold at most ``max_cells``
    distinct tuples in all. ``soft``: also write balanced soft labels (:class:`SoftSpec`).
    ``overrelaxation``: with ``iterations: auto``, each projection multiplies by (target / current)^omega;
    ``auto`` chooses omega from the observed convergence rate (``rebalance.kernels.ipf``), a number in
    [1, 2) fixes it, 1 is plain IPF. Fixed ``iterations`` are always plain passes.
    ``marginals`` left unset (None) is filled in by :class:`Spec`: ``<side>_cluster_L`` of image and text
    at ``level`` L (0, the default, is the base clusters: ``image_cluster``, ``text_cluster``; L >= 1 a
    level of ``cluster.levels``), after ``dup_group`` when the spec has a ``dedup`` section.
    ``relax``: ``exact`` (each marginal meets its target) or a strength rho >= 0 (one number for every
    marginal, or a mapping from marginal to a number or ``exact``; marginals it leaves out are exact):
    minimise KL(q || p) + sum_m rho_m KL(q_m || t_m), which always has a solution (relaxed marginals,
    :mod:`rebalance.kernels.ipf`); rho = 0 leaves the data as it is, larger rho comes closer to the target.
    ``auto`` (the default): rho = :data:`AUTO_RELAX` for cluster marginals (k-means clusters are estimates
    of concepts: a singleton cluster must not get a concept's mass), exact for every other marginal (carried
    columns, ``dup_group``, ``concept``, ``zero_shot``: categories the user defined).
    ``min_ess``: a floor on the ESS as a fraction of the rows: the balancing is the strongest whose ESS
    stays at or above it, ``relax`` as given if that meets it, else one strength rho for every marginal,
    the largest in [1e-3, 1e3] found by bisection on log rho (the frontier tried is in ``balance.json``).
    ``bounds``: [lo, hi] with 0 <= lo < 1 < hi (hi null: none above): every row's weight (mean 1) stays in
    [lo, hi] as a constraint of the balancing, not a clip afterwards (bounded raking, Deville and Sarndal
    1992; :func:`rebalance.kernels.ipf.ipf_bounded`); the cell path only.
    """

    marginals: tuple[str, ...] | None = None
    level: int = 0
    target: Target = field(default_factory=Target)
    targets: dict[str, Target] = field(default_factory=dict)
    iterations: int | Literal["auto"] = "auto"
    tol: float = 1e-6
    max_iter: int = 1000
    max_weight: float | None = None
    allow_partial: bool = False
    path: Literal["auto", "cell", "rows"] = "auto"
    max_cells: int = 4_000_000
    soft: SoftSpec | None = None
    overrelaxation: float | Literal["auto"] = "auto"
    relax: float | Literal["exact", "auto"] | dict[str, float | Literal["exact"]] = "auto"
    min_ess: float | None = None
    bounds: tuple[float | None, ...] | None = None

    def __post_init__(self) -> None:
        if self.level < 0:
            raise SpecError("balance.level", "must be >= 0", self.level)
        if self.marginals is None:  # the default marginals: Spec fills them in, then checks them here
            return
        if not self.marginals:
            raise SpecError("balance.marginals", "must name at least one marginal", list(self.marginals))
        if len(set(self.marginals)) != len(self.marginals):
            raise SpecError("balance.marginals", "names a marginal twice", list(self.marginals))
        for name in self.targets:
            if name not in self.marginals:
                raise SpecError(f"balance.targets.{name}", "is not one of balance.marginals", name)
        if self.iterations != "auto" and self.iterations < 0:
            raise SpecError("balance.iterations", "must be >= 0 or 'auto'", self.iterations)
        if not self.tol > 0:
            raise SpecError("balance.tol", "must be > 0", self.tol)
        if self.max_iter < 1:
            raise SpecError("balance.max_iter", "must be >= 1", self.max_iter)
        if self.max_cells < 1:
            raise SpecError("balance.max_cells", "must be >= 1", self.max_cells)
        if self.overrelaxation != "auto" and not 1 <= self.overrelaxation < 2:
            raise SpecError(
                "balance.overrelaxation", "must be 'auto' or a number in [1, 2)", self.overrelaxation
            )
        if self.max_weight is not None and not self.max_weight >= 1:
            raise SpecError(
                "balance.max_weight", "must be >= 1 (weights have mean 1) or null", self.max_weight
            )

        if self.min_ess is not None and not 0 < self.min_ess <= 1:
            raise SpecError(
                "balance.min_ess", "must be a fraction of the rows in (0, 1] or null", self.min_ess
            )
        if self.bounds is not None:
            if len(self.bounds) != 2 or self.bounds[0] is None:
                raise SpecError(
                    "balance.bounds", "must be [lo, hi] (hi null: no upper bound) or null", list(self.bounds)
                )
            lo, hi = self.bounds
            if not (0 <= lo < 1 and (hi is None or hi > 1)):
                raise SpecError(
                    "balance.bounds", "must satisfy 0 <= lo < 1 < hi (weights have mean 1)", list(self.bounds)
                )
            if self.path == "rows":
                raise SpecError(
                    "balance.bounds",
                    "needs the cell path: set balance.path to auto or cell",
                    list(self.bounds),
                )
        strengths = self.relax if isinstance(self.relax, dict) else {}
        for name, rho in strengths.items():
            if name not in self.marginals:
                raise SpecError(f"balance.relax.{name}", "is not one of balance.marginals", name)
            if rho != "exact" and not rho >= 0:
                raise SpecError(f"balance.relax.{name}", "must be a number >= 0 or 'exact'", rho)
        if not isinstance(self.relax, dict) and self.relax not in ("exact", "auto") and not self.relax >= 0:
            raise SpecError(
                "balance.relax", "must be 'auto', 'exact', a number >= 0 or a mapping of them", self.relax
            )

    def relax_for(self, marginal: str) -> float | None:
        """The relaxation strength rho of one marginal, None when it is exact."""
        if self.relax == "auto":
            return AUTO_RELAX if cluster_marginal(marginal) is not None else None
        rho = self.relax.get(marginal, "exact") if isinstance(self.relax, dict) else self.relax
        return None if rho == "exact" else float(rho)

    def target_for(self, marginal: str) -> Target:
        """The target of one marginal: its override in ``targets``, else ``target``."""
        return self.targets.get(marginal, self.target)


@dataclass(frozen=True)
class ReportSpec:
    """What the report computes and whether it renders HTML."""

    spectra_by: tuple[str, ...] = ("image_cluster",)
    top_eigenvalues: int = 64
    html: bool = True
    thumbnails: int = 8  # thumbnails per concept card (0: none; captions are still read back)
    # a carried ground-truth column: concept cards show their purity against it, and truth_alignment how
    # every cluster level spreads over it
    truth: str | None = None

    def __post_init__(self) -> None:
        if self.top_eigenvalues < 1:
            raise SpecError("report.top_eigenvalues", "must be >= 1", self.top_eigenvalues)
        if not 0 <= self.thumbnails <= 64:
            raise SpecError("report.thumbnails", "must be in [0, 64]", self.thumbnails)


CONCEPT_MARGINALS = ("concept", "zero_shot")


def read_entries(path: str, where: str) -> list[str]:
    """The entries of a vocabulary or prompt file: one per line, stripped, blank lines skipped. A missing,
    empty or non-UTF-8 file, or an entry given twice (compared after ``casefold``), is a :class:`SpecError`
    naming the field and the file."""
    file = Path(path)
    if not file.is_file():
        raise SpecError(where, "file does not exist", path)
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise SpecError(where, f"file is not UTF-8 text (byte {err.start})", path) from None
    entries, seen = [], {}
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.strip()
        if not entry:
            continue
        if entry.casefold() in seen:
            raise SpecError(
                where, f"line {number} ({entry!r}) repeats line {seen[entry.casefold()]} of the file", path
            )
        seen[entry.casefold()] = number
        entries.append(entry)
    if not entries:
        raise SpecError(where, "file holds no entries (one per line)", path)
    return entries


@dataclass(frozen=True)
class ConceptsSpec:
    """Concept labels from a vocabulary (MetaCLIP) and from zero-shot prompts, each usable as a marginal.

    ``vocabulary``: a UTF-8 file, one entry per line; every row's ``field`` (a column in ``data.carry``)
    is matched against it (:mod:`rebalance.kernels.concepts`: word boundaries as in MetaCLIP, compared
    after ``casefold`` when ``case_fold``), giving the ``concept`` marginal: row i is kept with
    probability p_i = 1 - prod over its entries of (1 - min(1, cap / count_e)) and weighted in proportion
    to p_i. ``unmatched``: rows matching no entry are ``drop``ped (p = 0, MetaCLIP's rule) or count as one
    more ``entry`` named ``<none>``, capped like the others (the default).

    ``prompts``: a UTF-8 file, one class name or prompt per line, embedded by the run's text tower; each
    row's ``zero_shot`` label is the prompt nearest its image embedding (cosine), or ``<none>`` below
    ``threshold``.
    """

    vocabulary: str | None = None
    field: str | None = None
    case_fold: bool = True
    cap: float = 20_000.0
    unmatched: Literal["entry", "drop"] = "entry"
    prompts: str | None = None
    threshold: float = 0.0

    def __post_init__(self) -> None:
        if self.vocabulary is None and self.prompts is None:
            raise SpecError("concepts", "needs a vocabulary file, a prompts file or both")
        if self.vocabulary is not None:
            read_entries(self.vocabulary, "concepts.vocabulary")
            if self.field is None:
                raise SpecError("concepts.field", "is required with concepts.vocabulary (a carried column)")
        elif self.field is not None:
            raise SpecError("concepts.field", "applies to concepts.vocabulary only", self.field)
        if self.prompts is not None:
            read_entries(self.prompts, "concepts.prompts")
        if not self.cap > 0:
            raise SpecError("concepts.cap", "must be > 0", self.cap)
        if not -1 <= self.threshold <= 1:
            raise SpecError("concepts.threshold", "must lie in [-1, 1] (a cosine similarity)", self.threshold)

    def marginals(self) -> tuple[str, ...]:
        """The marginals these concepts provide: ``concept`` (vocabulary), ``zero_shot`` (prompts)."""
        return tuple(
            name
            for name, given in zip(CONCEPT_MARGINALS, (self.vocabulary, self.prompts), strict=True)
            if given
        )


RAY_LISTEN = ("loopback", "all")


@dataclass(frozen=True)
class RaySpec:
    """Which Ray to use: ``auto`` joins RAY_ADDRESS when set and starts a local one otherwise. A local Ray
    listens on 127.0.0.1 only (``listen: loopback``) unless ``listen: all`` asks for every interface.

    ``placement_timeout_s``: how long the embed stage waits for Ray to place its first actor (a GPU node
    the autoscaler launches takes minutes) before it fails with a message."""

    address: str = "auto"
    num_cpus: int | None = None
    num_gpus: int | None = None
    listen: str = "loopback"
    placement_timeout_s: float = 1200.0

    def __post_init__(self) -> None:
        if self.listen not in RAY_LISTEN:
            raise SpecError("ray.listen", f"expected one of {list(RAY_LISTEN)}", self.listen)
        if not self.placement_timeout_s > 0:
            raise SpecError("ray.placement_timeout_s", "must be > 0", self.placement_timeout_s)
        for name in ("num_cpus", "num_gpus"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise SpecError(f"ray.{name}", "must be >= 0 or null", value)


@dataclass(frozen=True)
class Spec:
    """A whole run: data, embed, cluster, balance, report and ray sections, and the optional dedup and
    concepts."""

    data: DataSpec
    embed: EmbedSpec = field(default_factory=EmbedSpec)
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    balance: BalanceSpec = field(default_factory=BalanceSpec)
    report: ReportSpec = field(default_factory=ReportSpec)
    ray: RaySpec = field(default_factory=RaySpec)
    dedup: DedupSpec | None = None
    concepts: ConceptsSpec | None = None

    def __post_init__(self) -> None:
        levels = len(self.cluster.levels)
        concepts = self.concepts.marginals() if self.concepts is not None else ()
        field_name = self.concepts.field if self.concepts is not None else None
        if field_name is not None and field_name not in self.data.carry:
            raise SpecError(
                "concepts.field", f"is not a column in data.carry {list(self.data.carry)}", field_name
            )
        computed = [
            c for c in self.data.carry
            if c in concepts or cluster_marginal(c) is not None or (c == DUP_GROUP and self.dedup is not None)
        ]  # fmt: skip
        if computed:
            raise SpecError(
                "data.carry",
                "names a column the run computes itself (a cluster, dup_group or concepts marginal); rename "
                "that column in the dataset",
                computed[0],
            )
        if "concept" in self.balance.targets:
            raise SpecError(
                "balance.targets.concept", "the concept marginal's target is set by concepts.cap", "concept"
            )
        if self.balance.level > levels:
            raise SpecError(
                "balance.level", f"must be at most {levels}, the number of cluster.levels", self.balance.level
            )
        if self.balance.marginals is None:
            object.__setattr__(
                self, "balance", dataclasses.replace(self.balance, marginals=self.default_marginals())
            )
        if self.dedup is not None and self.dedup.side == "joint" and self.cluster.joint is None:
            raise SpecError("dedup.side", "joint needs cluster.joint (the joint clusters)", self.dedup.side)
        if DUP_GROUP in self.balance.marginals:
            if self.dedup is None:
                raise SpecError("balance.marginals", f"{DUP_GROUP!r} needs a dedup section", DUP_GROUP)
            if self.balance.target_for(DUP_GROUP).kind == "weights":
                raise SpecError(
                    f"balance.targets.{DUP_GROUP}",
                    "takes uniform (one unit of mass per group), {power: a} or {cap: t} of the group size",
                    self.balance.target_for(DUP_GROUP).to_dict(),
                )

        def known(name: str) -> bool:
            if name == DUP_GROUP:
                return self.dedup is not None
            if name in CONCEPT_MARGINALS:
                return name in concepts
            cluster = cluster_marginal(name)
            if cluster is None:
                return name in self.data.carry
            return cluster[1] <= levels and (cluster[0] != "joint" or self.cluster.joint is not None)

        for name in self.balance.marginals:
            if not known(name):
                joint = (
                    ", joint_cluster with cluster.joint" if self.cluster.joint is None else ", joint_cluster"
                )
                raise SpecError(
                    "balance.marginals",
                    f"{name!r} is neither a cluster marginal ({list(MARGINAL_CLUSTERS)}{joint}, or "
                    f"<side>_cluster_L for a level L <= {levels} of cluster.levels), a concept marginal "
                    f"of the concepts section ({list(concepts)}) nor a column in data.carry "
                    f"{list(self.data.carry)}",
                    list(self.balance.marginals),
                )
        for name in self.report.spectra_by:
            if name == DUP_GROUP or not known(name):
                raise SpecError("report.spectra_by", f"{name!r} is not a cluster or carried column", name)
        if self.report.truth is not None and self.report.truth not in self.data.carry:
            raise SpecError(
                "report.truth", f"must be a column of data.carry {list(self.data.carry)}", self.report.truth
            )

    def default_marginals(self) -> tuple[str, ...]:
        """The marginals of a spec that does not name them: ``dup_group`` with ``dedup``, then
        ``image_cluster``, ``text_cluster`` at level ``balance.level`` (``image_cluster_L`` for L >= 1)."""
        suffix = f"_{self.balance.level}" if self.balance.level else ""
        clusters = tuple(f"{name}{suffix}" for name in MARGINAL_CLUSTERS)
        return ((DUP_GROUP,) if self.dedup is not None else ()) + clusters

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Spec:
        """Build and validate a spec from a plain mapping (as parsed from YAML)."""
        return _build(cls, raw, "")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> Spec:
        """Load a spec from a YAML file."""
        path = Path(path)
        if not path.is_file():
            raise SpecError("<file>", "spec file does not exist", str(path))
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise SpecError("<file>", f"not valid YAML: {err}", str(path)) from err
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        """A JSON/YAML-ready mapping that ``from_dict`` turns back into an equal spec."""
        return _unbuild(self)


def _build(cls: type, raw: Any, where: str) -> Any:
    """Construct dataclass ``cls`` from ``raw``, checking keys and types and naming fields in errors."""
    if not isinstance(raw, dict):
        raise SpecError(where or "<root>", "expected a mapping", raw)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known fields: {sorted(fields)}"
            raise SpecError(f"{where}{key}", f"unknown field{hint}")
    kwargs = {}
    for name, f in fields.items():
        path = f"{where}{name}"
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SpecError(path, "is required")
            continue
        kwargs[name] = _convert(hints[name], raw[name], path)
    try:
        return cls(**kwargs)
    except SpecError as err:
        if where and not err.field_path.startswith(where.rstrip(".")):
            raise SpecError(f"{where}{err.field_path}", str(err).split(": ", 1)[1]) from None
        raise


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Check ``value`` against type hint ``tp`` and convert lists to tuples, dicts to dataclasses."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if tp is Target:
        return Target.parse(value, path)
    if dataclasses.is_dataclass(tp):
        return _build(tp, {} if value is None else value, f"{path}.")
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        others = [o for o in options if o is not type(None)]
        if len(others) == 1 and dataclasses.is_dataclass(others[0]):  # its own errors name the field
            return _convert(others[0], value, path)
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, path)
            except SpecError:
                pass
        raise SpecError(path, f"expected {_describe(tp)}", value)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise SpecError(path, f"expected one of {list(typing.get_args(tp))}", value)
        return value
    if origin is tuple:
        (item,) = typing.get_args(tp)[:1]
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise SpecError(path, f"expected a list of {_describe(item)}", value)
        return tuple(_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        _, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise SpecError(path, "expected a mapping", value)
        return {str(k): _convert(value_tp, v, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise SpecError(path, "expected true or false", value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(path, "expected an integer", value)
        return value
    if tp is float:
        value = _yaml_number(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SpecError(path, "expected a number", value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise SpecError(path, "expected a string", value)
        return value
    raise TypeError(f"unsupported spec type {tp!r} at {path}")  # a bug in this module, not in a spec


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(t) for t in typing.get_args(tp))
    if origin is Literal:
        return " or ".join(repr(v) for v in typing.get_args(tp))
    return {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true/false",
        type(None): "null",
    }.get(tp, getattr(tp, "__name__", str(tp)))


def _unbuild(obj: Any) -> Any:
    if isinstance(obj, Target):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj):
        return {f.name: _unbuild(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [_unbuild(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _unbuild(v) for k, v in obj.items()}
    return obj
