"""Read chosen rows back from the input shards by key, as small thumbnails and captions for the report.

Rows are found with the dataset's own reader (:func:`rebalance.data.readers.read_shard`, so every input
format and store works the same); one shard is streamed once, in bounded batches, and only the rows whose
key was asked for are kept. Images are downscaled to at most ``size`` pixels on their longer side (never
enlarged) and encoded as WebP, a few kilobytes each.
"""

from __future__ import annotations

import io
from collections.abc import Collection

from PIL import Image, UnidentifiedImageError

from rebalance.data.readers import read_shard
from rebalance.data.rows import Shard
from rebalance.spec import DataSpec

__all__ = ["CAPTION_COLUMNS", "THUMBNAIL_PIXELS", "make_thumbnail", "read_rows_by_key"]

THUMBNAIL_PIXELS = 64
THUMBNAIL_QUALITY = 80
MAX_SOURCE_PIXELS = 64_000_000  # the embed stage rejects larger images; never decode one here either
#: Carried columns read as the caption when the dataset has no text side (embeddings-only data).
CAPTION_COLUMNS = ("caption", "txt", "text", "TEXT")


def make_thumbnail(data: bytes, size: int = THUMBNAIL_PIXELS) -> bytes | None:
    """A WebP of the encoded image ``data`` at most ``size`` pixels on its longer side, composited onto
    white when it has alpha; None when the bytes do not decode as an image (or declare too many pixels)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_SOURCE_PIXELS or image.width == 0 or image.height == 0:
                return None
            image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale
            image = image.convert("RGBA")
            flat = Image.new("RGB", image.size, "white")
            flat.paste(image, mask=image.getchannel("A"))
            flat.thumbnail((size, size), Image.Resampling.LANCZOS)
            out = io.BytesIO()
            flat.save(out, format="WEBP", quality=THUMBNAIL_QUALITY, method=4)
            return out.getvalue()
    except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError):
        return None


def read_rows_by_key(
    shard: Shard,
    data: DataSpec,
    fmt: str,
    image_column: str | None,
    text_column: str | None,
    keys: Collection[str],
    thumbnail_keys: Collection[str] = (),
    size: int = THUMBNAIL_PIXELS,
    batch_size: int = 256,
) -> dict[str, dict[str, bytes | str | None]]:
    """{key: {"thumbnail": WebP bytes or None, "caption": str or None}} for the rows of ``shard`` whose key
    is in ``keys`` (keys not found are absent); a thumbnail only for keys also in ``thumbnail_keys``. Thumbnails need an image side with encoded images
    (not ``format: embeddings``); captions come from the text side, else from a carried column named in
    :data:`CAPTION_COLUMNS`."""
    wanted, thumbs = set(keys), set(thumbnail_keys)
    out: dict[str, dict[str, bytes | str | None]] = {}
    if not wanted:
        return out
    for batch in read_shard(shard, data, fmt, image_column, text_column, batch_size):
        caption_column = next((c for c in CAPTION_COLUMNS if c in batch.carried), None)
        for i, key in enumerate(batch.keys):
            if key not in wanted:
                continue
            image = batch.images[i] if batch.images is not None else None
            caption = batch.texts[i] if batch.texts is not None else None
            if caption is None and caption_column is not None:
                caption = batch.carried[caption_column][i].as_py()
            if isinstance(caption, bytes):
                caption = caption.decode("utf-8", "replace")
            out[key] = {
                "thumbnail": make_thumbnail(image, size) if image and key in thumbs else None,
                "caption": None if caption is None else str(caption),
            }
        if len(out) == len(wanted):
            break
    return out
