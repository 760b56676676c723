"""Deterministic generator of a small long-tailed image-text dataset in the img2dataset Parquet layout.

Each row shows one coloured shape (a *concept*, e.g. ``"red circle"``) on a light, noisy background.
Concept frequencies follow a Zipf law, so the dataset has a steep head and a long tail, which is what the
rebalancing pipeline is meant to flatten. Everything is derived from ``seed``: the same arguments give
byte-identical Parquet files.

Layout written by :func:`generate_dataset`::

    out_dir/part-00000.parquet ... part-{n_shards-1:05d}.parquet
    out_dir/dataset.json            # the summary dict returned by generate_dataset

Columns, in this order: ``key`` (string, 9 digits: 5 for the shard, 4 for the row in the shard),
``jpg`` (binary JPEG), ``txt`` (caption), ``label`` (``"<colour> <shape>"``), ``source`` (string),
``status`` (``"success"``), ``width`` and ``height`` (int32).

:func:`generate_web_dataset` writes the *web regime* in the same layout (plus a ``render`` column): a large
pool whose head concepts are a few distinct renders repeated with small perturbations (near-duplicates)
and whose captions look like alt-text (concept words amid template noise, some unrelated to the image).
"""

from __future__ import annotations

import io
import math
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from rebalance.data.atomic import atomic_write_json, atomic_write_table

__all__ = [
    "CAPTION_TEMPLATES",
    "COLOURS",
    "CONCEPTS",
    "LABELS",
    "PROMPTS_FILE",
    "SCHEMA",
    "SHAPES",
    "SOURCES",
    "VOCABULARY_FILE",
    "concept_frequencies",
    "concept_counts",
    "generate_dataset",
    "generate_web_dataset",
    "render_image",
    "WEB_SCHEMA",
]

#: Colour name -> RGB used to draw the shape. Pairwise RGB distances are >= ~120 so colours stay
#: distinguishable after noise and JPEG compression; all are far from the light-grey background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 205, 20),
    "purple": (140, 40, 170),
    "cyan": (20, 190, 210),
}

#: Shape names, each drawn with Pillow ImageDraw.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")

#: The (colour, shape) concepts in fixed order; index 0 is the most frequent concept.
#: Colour-major order: 6 colours x 4 shapes = 24 concepts.
CONCEPTS: list[tuple[str, str]] = [(c, s) for c in COLOURS for s in SHAPES]

#: Label string of each concept, same order as CONCEPTS ("red circle", "red square", ...).
LABELS: list[str] = [f"{c} {s}" for c, s in CONCEPTS]

#: Vocabulary of the built-in dataset for ``concepts.vocabulary`` (one entry per line): the 24 labels, then
#: the 6 colours and the 4 shapes on their own (only three caption templates name "<colour> <shape>").
VOCABULARY_FILE = Path(__file__).parent / "concepts" / "synthetic-vocabulary.txt"
#: Zero-shot prompts of the built-in dataset for ``concepts.prompts``: "a photo of a <label>" per concept.
PROMPTS_FILE = Path(__file__).parent / "concepts" / "synthetic-prompts.txt"

#: Caption templates; every one names both the colour and the shape.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of a {colour} {shape}",
    "{colour} {shape} on a plain background",
    "a small {shape}, coloured {colour}",
    "an image showing a {shape} that is {colour}",
    "a simple drawing of a {colour} {shape}",
    "close-up of a {shape} painted {colour}",
)

#: Made-up provenance values for the ``source`` column.
SOURCES: tuple[str, ...] = ("web", "stock", "synthetic-render", "forum")

#: Arrow schema of every shard, columns in this order.
SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("jpg", pa.binary()),
        pa.field("txt", pa.string()),
        pa.field("label", pa.string()),
        pa.field("source", pa.string()),
        pa.field("status", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
    ]
)

IMAGE_SIZE = 32
JPEG_QUALITY = 95
_MAX_ROWS_PER_SHARD = 10_000  # the key has 4 digits for the row within a shard
_SHARD_RE = re.compile(r"^part-(\d{5})\.parquet$")


def concept_frequencies(
    n_concepts: int, zipf_exponent: float = 1.3, head_tail_ratio_min: float = 50.0
) -> np.ndarray:
    """Zipf-like concept probabilities, shape ``(n_concepts,)`` float64, strictly decreasing, summing to 1.

    ``p_i ∝ (i + 1) ** -s`` with ``s = max(zipf_exponent, log(head_tail_ratio_min) / log(n_concepts))``,
    i.e. the exponent is steepened when needed so that ``p[0] / p[-1] = n_concepts ** s`` is at least
    ``head_tail_ratio_min`` (pass ``head_tail_ratio_min=1`` to use ``zipf_exponent`` as is). With the
    defaults and 24 concepts the ratio is ``24 ** 1.3 ≈ 62``. A single concept gets probability 1.
    """
    n_concepts = int(n_concepts)
    if n_concepts < 1:
        raise ValueError(f"n_concepts must be >= 1, got {n_concepts}")
    if not math.isfinite(zipf_exponent) or zipf_exponent <= 0:
        raise ValueError(f"zipf_exponent must be a finite number > 0, got {zipf_exponent}")
    if not math.isfinite(head_tail_ratio_min) or head_tail_ratio_min < 1:
        raise ValueError(f"head_tail_ratio_min must be a finite number >= 1, got {head_tail_ratio_min}")
    if n_concepts == 1:
        return np.ones(1, dtype=np.float64)
    s = max(float(zipf_exponent), math.log(head_tail_ratio_min) / math.log(n_concepts))
    weights = np.arange(1, n_concepts + 1, dtype=np.float64) ** -s
    return weights / weights.sum()


def concept_counts(n_rows: int, probs: np.ndarray, min_count: int | None = None) -> np.ndarray:
    """Exact per-concept row counts, shape ``(len(probs),)`` int64, summing to ``n_rows``.

    Largest-remainder rounding of ``n_rows * probs`` (ties go to the lower index), then every concept is
    raised to at least ``min_count`` (default ``min(2, n_rows // len(probs))``) by taking rows one at a
    time from the currently largest concept. No randomness is involved.
    """
    probs = np.asarray(probs, dtype=np.float64)
    k = probs.shape[0]
    if n_rows < k:
        raise ValueError(f"n_rows must be >= the number of concepts ({k}), got {n_rows}")
    if min_count is None:
        min_count = min(2, n_rows // k)
    if min_count * k > n_rows:
        raise ValueError(f"min_count={min_count} x {k} concepts exceeds n_rows={n_rows}")
    exact = n_rows * probs / probs.sum()
    counts = np.floor(exact).astype(np.int64)
    remainder = exact - counts
    # Stable sort on -remainder: the largest remainders first, ties broken by concept index.
    order = np.argsort(-remainder, kind="stable")
    counts[order[: n_rows - int(counts.sum())]] += 1
    for i in range(k):
        while counts[i] < min_count:
            donor = int(np.argmax(counts))
            counts[donor] -= 1
            counts[i] += 1
    return counts


def _rgb(colour: str) -> tuple[int, int, int]:
    try:
        return COLOURS[colour]
    except KeyError:
        raise ValueError(f"colour must be one of {sorted(COLOURS)}, got {colour!r}") from None


def render_image(colour: str, shape: str, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw one ``colour`` ``shape`` on a light noisy background; returns uint8 array ``(size, size, 3)``.

    The shape's centre and size are jittered (half-extent 22-36 % of ``size``), its fill colour is
    jittered by a few RGB levels around ``COLOURS[colour]``, the background is a random light grey, and
    Gaussian pixel noise (sigma 2-5) is added to the whole image. All randomness comes from ``rng``.
    """
    base = np.asarray(_rgb(colour), dtype=np.float64)
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {list(SHAPES)}, got {shape!r}")
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")

    background = int(rng.integers(215, 246))
    fill = tuple(int(v) for v in np.clip(base + rng.integers(-8, 9, size=3), 0, 255))
    r = float(rng.uniform(0.22, 0.36)) * size
    cx = float(rng.uniform(r + 1, size - 1 - r))
    cy = float(rng.uniform(r + 1, size - 1 - r))

    img = Image.new("RGB", (size, size), (background,) * 3)
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = r * 0.85
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:  # cross
        w = max(1.5, 0.3 * r)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)

    sigma = float(rng.uniform(2.0, 5.0))
    noisy = np.asarray(img, dtype=np.float64) + rng.normal(0.0, sigma, size=(size, size, 3))
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _encode_jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # 4:4:4 chroma: with 4:2:0 a 32x32 image loses most of the shape's colour at its edges.
    Image.fromarray(arr, mode="RGB").save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buf.getvalue()


def _source_probs(n_concepts: int) -> np.ndarray:
    """Per-concept distribution over SOURCES, shape ``(n_concepts, len(SOURCES))``.

    Head concepts come mostly from "web"; tail concepts increasingly from "stock" and "synthetic-render",
    so the source column is correlated with the concept (something for metadata balancing to act on).
    """
    t = np.linspace(0.0, 1.0, n_concepts)[:, None] if n_concepts > 1 else np.zeros((1, 1))
    weights = np.hstack([0.70 - 0.55 * t, 0.10 + 0.35 * t, 0.12 + 0.25 * t, 0.08 + 0.00 * t])
    return weights / weights.sum(axis=1, keepdims=True)


def generate_dataset(
    out_dir: str | os.PathLike[str],
    n_rows: int = 3000,
    n_shards: int = 4,
    seed: int = 0,
    zipf_exponent: float = 1.3,
    copies: int = 0,
) -> dict:
    """Write a long-tailed synthetic dataset of ``n_rows`` rows in ``n_shards`` Parquet shards.

    Per-concept counts are exact (:func:`concept_counts` of :func:`concept_frequencies`, every concept
    gets at least ``min(2, n_rows // 24)`` rows; head/tail ≈ 62 for the defaults). Rows are shuffled with
    the seeded RNG and split into near-equal contiguous shards (the first ``n_rows % n_shards`` shards get
    one extra row). Files are written atomically; stale ``part-NNNNN.parquet`` files with an index
    ``>= n_shards`` from an earlier run are removed.

    ``copies`` > 0 plants exact copies (for near-duplicate detection): that many rows, drawn with their own
    seeded stream, repeat another row's JPEG bytes, caption, label and source under their own key (so the
    per-concept counts shift by the copies; ``counts`` gives the actual ones), and ``copies`` in the
    summary maps each copy's key to its original's. ``copies=0`` writes the same bytes as before.

    Returns ``{"path": str, "rows": int, "shards": int, "concepts": int, "counts": {label: count}}`` (plus
    ``copies`` when asked), also written to ``out_dir/dataset.json``. Raises ValueError for
    ``n_rows < len(CONCEPTS)``, ``n_shards < 1``, ``n_shards > n_rows``, more than 10000 rows per shard or
    ``copies`` outside [0, n_rows / 2].
    """
    n_concepts = len(CONCEPTS)
    if isinstance(n_rows, bool) or not isinstance(n_rows, (int, np.integer)) or n_rows < n_concepts:
        raise ValueError(
            f"n_rows must be an integer >= the number of concepts ({n_concepts}), got {n_rows!r}"
        )
    if isinstance(n_shards, bool) or not isinstance(n_shards, (int, np.integer)) or n_shards < 1:
        raise ValueError(f"n_shards must be an integer >= 1, got {n_shards!r}")
    n_rows, n_shards = int(n_rows), int(n_shards)
    if n_shards > n_rows:
        raise ValueError(f"n_shards must be <= n_rows ({n_rows}), got {n_shards}")
    if -(-n_rows // n_shards) > _MAX_ROWS_PER_SHARD:
        raise ValueError(
            f"n_rows={n_rows} with n_shards={n_shards} gives more than {_MAX_ROWS_PER_SHARD} rows per shard "
            "(keys have 4 digits for the row); increase n_shards"
        )

    if (
        isinstance(copies, bool)
        or not isinstance(copies, (int, np.integer))
        or not 0 <= copies <= n_rows // 2
    ):
        raise ValueError(f"copies must be an integer in [0, n_rows // 2 = {n_rows // 2}], got {copies!r}")

    probs = concept_frequencies(n_concepts, zipf_exponent)
    counts = concept_counts(n_rows, probs)

    # Independent streams so that e.g. changing the caption logic does not change the images.
    shuffle_rng, caption_rng, source_rng, image_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)
    )
    concept_idx = shuffle_rng.permutation(np.repeat(np.arange(n_concepts), counts))
    template_idx = caption_rng.integers(0, len(CAPTION_TEMPLATES), size=n_rows)
    cdf = np.cumsum(_source_probs(n_concepts), axis=1)[concept_idx]
    u = source_rng.random(n_rows)[:, None]
    source_idx = np.minimum((u >= cdf).sum(axis=1), len(SOURCES) - 1)
    original = np.arange(n_rows)  # the row whose image and caption each row shows
    if copies:
        copy_rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(5)[4])
        order = copy_rng.permutation(n_rows)
        copy_rows, originals = order[:copies], copy_rng.choice(order[copies:], size=copies)
        original[copy_rows] = originals
        for column in (concept_idx, template_idx, source_idx):
            column[copy_rows] = column[originals]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bounds = np.cumsum(
        [0] + [n_rows // n_shards + (1 if i < n_rows % n_shards else 0) for i in range(n_shards)]
    )
    row_key = [
        f"{shard:05d}{j:04d}" for shard in range(n_shards) for j in range(bounds[shard + 1] - bounds[shard])
    ]
    copied: dict[int, bytes] = {}  # originals' JPEGs, rendered once (in row order) when a copy needs them
    for row in np.unique(original[original != np.arange(n_rows)]):
        colour, shape = CONCEPTS[concept_idx[row]]
        copied[int(row)] = _encode_jpeg(render_image(colour, shape, np.random.default_rng([seed, int(row)])))
    for shard in range(n_shards):
        lo, hi = int(bounds[shard]), int(bounds[shard + 1])
        keys, jpgs, txts, labels, sources = [], [], [], [], []
        for j, row in enumerate(range(lo, hi)):
            colour, shape = CONCEPTS[concept_idx[row]]
            keys.append(f"{shard:05d}{j:04d}")
            if int(original[row]) in copied:
                jpgs.append(copied[int(original[row])])
            else:
                jpgs.append(_encode_jpeg(render_image(colour, shape, image_rng)))
            txts.append(CAPTION_TEMPLATES[template_idx[row]].format(colour=colour, shape=shape))
            labels.append(LABELS[concept_idx[row]])
            sources.append(SOURCES[source_idx[row]])
        n = hi - lo
        table = pa.Table.from_arrays(
            [
                pa.array(keys, pa.string()),
                pa.array(jpgs, pa.binary()),
                pa.array(txts, pa.string()),
                pa.array(labels, pa.string()),
                pa.array(sources, pa.string()),
                pa.array(["success"] * n, pa.string()),
                pa.array(np.full(n, IMAGE_SIZE, dtype=np.int32)),
                pa.array(np.full(n, IMAGE_SIZE, dtype=np.int32)),
            ],
            schema=SCHEMA,
        )
        atomic_write_table(table, out / f"part-{shard:05d}.parquet")

    extra = {}
    if copies:
        extra["copies"] = {
            row_key[r]: row_key[original[r]] for r in np.flatnonzero(original != np.arange(n_rows))
        }
    return _finish(out, n_rows, n_shards, np.bincount(concept_idx, minlength=n_concepts), **extra)


def _finish(out: Path, n_rows: int, n_shards: int, counts: np.ndarray, **extra: dict) -> dict:
    """Remove stale shards (index >= ``n_shards``), write and return the summary (``dataset.json``)."""
    for stale in sorted(out.iterdir()):
        m = _SHARD_RE.match(stale.name)
        if m and int(m.group(1)) >= n_shards and stale.is_file():
            stale.unlink()
    summary = {
        "path": str(out.resolve()),
        "rows": n_rows,
        "shards": n_shards,
        "concepts": len(CONCEPTS),
        "counts": {label: int(c) for label, c in zip(LABELS, counts, strict=True)},
        **extra,
    }
    atomic_write_json(summary, out / "dataset.json")
    return summary


#: Schema of :func:`generate_web_dataset`: :data:`SCHEMA` plus ``render`` (int32), the id of the distinct
#: render a row perturbs (rows sharing it are near-duplicates; ground truth for duplicate grouping).
WEB_SCHEMA = SCHEMA.append(pa.field("render", pa.int32()))

#: Alt-text templates of the web regime: the concept's words amid the noise of scraped captions.
WEB_TEMPLATES: tuple[str, ...] = (
    "{colour} {shape}",
    "{shape} {colour} png",
    "buy {colour} {shape} online",
    "{colour} {shape} clipart free download",
    "a {colour} {shape} on white",
    "{colour} {shape} icon vector",
    "cheap {shape} in {colour} - best price",
    "{shape}, {colour}",
)

#: Captions that say nothing about the image (a share ``unrelated`` of the web pool's captions).
UNRELATED_CAPTIONS: tuple[str, ...] = (
    "click to enlarge",
    "untitled",
    "image",
    "free shipping on all orders",
    "photo by our team",
    "stock image",
    "thumbnail",
    "see more",
)

#: Words scraped captions carry around the concept (prefix or suffix, ``noise`` of the related captions).
NOISE_WORDS: tuple[str, ...] = (
    "hd",
    "jpg",
    "new",
    "2019",
    "sale",
    "img",
    "wallpaper",
    "design",
    "logo",
    "pic",
)


def generate_web_dataset(
    out_dir: str | os.PathLike[str],
    n_rows: int = 100_000,
    seed: int = 0,
    zipf_exponent: float = 1.3,
    max_renders: int = 200,
    unrelated: float = 0.1,
    noise: float = 0.5,
    rows_per_shard: int = _MAX_ROWS_PER_SHARD,
) -> dict:
    """Write the web regime: ``n_rows`` rows over the 24 concepts in ``ceil(n_rows / rows_per_shard)`` shards.

    Concept counts are :func:`concept_counts` of :func:`concept_frequencies` (Zipf). Concept ``c`` with
    ``n_c`` rows has ``m_c = min(n_c, max_renders)`` distinct renders (:func:`render_image`), each used by
    ``n_c / m_c`` rows (rounded; assigned in a random order); each row is its render shifted by at most one
    pixel and with Gaussian pixel noise of sigma 2, so a head concept is a few images repeated ``n_c / m_c`` times with small perturbations, a tail concept mostly
    distinct images. Captions: each render has its own alt-text (a :data:`WEB_TEMPLATES` entry with the
    concept's words, a :data:`NOISE_WORDS` prefix or suffix with probability ``noise``); a row repeats its
    render's caption with probability 0.7, else draws a fresh one; with probability ``unrelated`` the
    caption is replaced by one of :data:`UNRELATED_CAPTIONS`. Columns: :data:`WEB_SCHEMA` (``label`` is the
    ground-truth concept, ``render`` the global render id). Rows are shuffled; all randomness comes from
    ``seed``, so the same arguments give byte-identical shards.

    Returns ``{"path", "rows", "shards", "concepts", "counts": {label: n}, "renders": {label: m}}``, also
    written to ``out_dir/dataset.json``.
    """
    n_concepts = len(CONCEPTS)
    if isinstance(n_rows, bool) or not isinstance(n_rows, (int, np.integer)) or n_rows < n_concepts:
        raise ValueError(
            f"n_rows must be an integer >= the number of concepts ({n_concepts}), got {n_rows!r}"
        )
    if not 1 <= rows_per_shard <= _MAX_ROWS_PER_SHARD:
        raise ValueError(f"rows_per_shard must be in [1, {_MAX_ROWS_PER_SHARD}], got {rows_per_shard}")
    if max_renders < 1:
        raise ValueError(f"max_renders must be >= 1, got {max_renders}")
    for name, p in (("unrelated", unrelated), ("noise", noise)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
    n_rows = int(n_rows)
    counts = concept_counts(n_rows, concept_frequencies(n_concepts, zipf_exponent))
    renders = np.minimum(counts, int(max_renders))
    shuffle_rng, render_rng, caption_rng, source_rng, image_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence([seed, 7]).spawn(5)
    )

    def alt_text(c: int) -> str:
        colour, shape = CONCEPTS[c]
        text = WEB_TEMPLATES[caption_rng.integers(len(WEB_TEMPLATES))].format(colour=colour, shape=shape)
        if caption_rng.random() < noise:
            word = NOISE_WORDS[caption_rng.integers(len(NOISE_WORDS))]
            text = f"{word} {text}" if caption_rng.random() < 0.5 else f"{text} {word}"
        return text

    # distinct renders, concept by concept (global ids in this order), each with its own alt-text
    offsets = np.concatenate([[0], np.cumsum(renders)])
    bases, base_captions = [], []
    for c, (colour, shape) in enumerate(CONCEPTS):
        for _ in range(int(renders[c])):
            bases.append(render_image(colour, shape, render_rng))
            base_captions.append(alt_text(c))
    concept_idx = shuffle_rng.permutation(np.repeat(np.arange(n_concepts), counts))
    render_idx = np.empty(n_rows, dtype=np.int64)
    for c in range(n_concepts):  # every render is used, each about n_c / m_c times
        rows = np.flatnonzero(concept_idx == c)
        render_idx[rows] = offsets[c] + render_rng.permutation(np.arange(rows.size) % renders[c])
    cdf = np.cumsum(_source_probs(n_concepts), axis=1)[concept_idx]
    source_idx = np.minimum((source_rng.random(n_rows)[:, None] >= cdf).sum(axis=1), len(SOURCES) - 1)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_shards = -(-n_rows // rows_per_shard)
    for shard in range(n_shards):
        lo, hi = shard * rows_per_shard, min(n_rows, (shard + 1) * rows_per_shard)
        jpgs, txts = [], []
        for row in range(lo, hi):
            base = bases[render_idx[row]].astype(np.int16)
            dy, dx = image_rng.integers(-1, 2, size=2)
            pert = np.roll(base, (int(dy), int(dx)), axis=(0, 1)) + np.rint(
                image_rng.normal(0.0, 2.0, size=base.shape)
            ).astype(np.int16)
            jpgs.append(_encode_jpeg(np.clip(pert, 0, 255).astype(np.uint8)))
            if caption_rng.random() < unrelated:
                txts.append(UNRELATED_CAPTIONS[caption_rng.integers(len(UNRELATED_CAPTIONS))])
            elif caption_rng.random() < 0.7:
                txts.append(base_captions[render_idx[row]])
            else:
                txts.append(alt_text(int(concept_idx[row])))
        n = hi - lo
        table = pa.Table.from_arrays(
            [
                pa.array([f"{shard:05d}{j:04d}" for j in range(n)], pa.string()),
                pa.array(jpgs, pa.binary()),
                pa.array(txts, pa.string()),
                pa.array([LABELS[c] for c in concept_idx[lo:hi]], pa.string()),
                pa.array([SOURCES[s] for s in source_idx[lo:hi]], pa.string()),
                pa.array(["success"] * n, pa.string()),
                pa.array(np.full(n, IMAGE_SIZE, dtype=np.int32)),
                pa.array(np.full(n, IMAGE_SIZE, dtype=np.int32)),
                pa.array(render_idx[lo:hi].astype(np.int32)),
            ],
            schema=WEB_SCHEMA,
        )
        atomic_write_table(table, out / f"part-{shard:05d}.parquet")
    renders_by_label = {label: int(m) for label, m in zip(LABELS, renders, strict=True)}
    return _finish(out, n_rows, n_shards, counts, renders=renders_by_label)
