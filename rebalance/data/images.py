"""Decoding the encoded images of a dataset (JPEG, PNG, ...) into RGB PIL images, with a short reason for
every image that cannot be used. The embed stage and the endpoint decode through :func:`decode_image`."""

from __future__ import annotations

import io
import warnings

import numpy as np

__all__ = ["IMAGE_FORMATS", "MAX_DECODED_BYTES", "MAX_IMAGE_PIXELS", "decode_image", "open_header"]

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")  # Pillow formats tried; any other content is refused unopened
MAX_IMAGE_PIXELS = 64_000_000  # larger images are rejected as decompression bombs
MAX_DECODED_BYTES = 256 * 1024 * 1024  # width x height x bytes per pixel x frames, checked before decoding
_ROWS_PER_CHUNK = 1024  # 16-bit to 8-bit conversion in row blocks: a bounded working copy


def _bytes_per_pixel(mode: str) -> int:
    """Bytes a pixel of ``mode`` takes in Pillow's memory: 1 for 1, L and P, 2 for I;16*, else 4 (Pillow
    keeps multi-band images in 4 bytes per pixel; I and F are 32-bit)."""
    from PIL import Image

    if mode.startswith("I;16"):
        return 2
    return 1 if mode in ("1", "L", "P") or (Image.getmodebands(mode) == 1 and mode not in ("I", "F")) else 4


def _declared_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG or GIF header (Pillow refuses to open those that declare 0)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24 and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    return None


def _looks_allowed(data: bytes) -> str | None:
    """The allowed format whose signature ``data`` starts with (JPEG's SOI marker, PNG's signature, a RIFF
    WEBP header), or None."""
    if data[:2] == b"\xff\xd8":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return None


def open_header(data: bytes):
    """Open ``data`` lazily with Pillow, trying only :data:`IMAGE_FORMATS` (nothing is decoded: the image's
    ``size``, ``mode`` and ``n_frames`` come from its header). Raises ValueError ``image:unsupported format``
    when the content is none of them (another format's plugin, EPS, PDF, ..., never sees the bytes), or
    ``image:undecodable`` when it has one's signature but its header cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError as err:
        if _looks_allowed(data):
            raise ValueError(f"image:undecodable (corrupt {_looks_allowed(data)} header)") from err
        raise ValueError("image:unsupported format (content is not JPEG, PNG or WebP)") from err


def _check_size(image) -> None:
    """Refuse (ValueError) an opened image whose decoded size would exceed the limits, from its header."""
    width, height = image.size
    if width == 0 or height == 0:
        raise ValueError(f"image:zero size ({width}x{height})")
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(f"image:decompression bomb ({width}x{height} pixels > {MAX_IMAGE_PIXELS})")
    frames = int(getattr(image, "n_frames", 1))
    decoded = width * height * _bytes_per_pixel(image.mode) * frames
    if decoded > MAX_DECODED_BYTES:
        raise ValueError(
            f"image:decompression bomb ({width}x{height} {image.mode} x {frames} frames = {decoded} bytes "
            f"decoded > {MAX_DECODED_BYTES})"
        )


def _to_8bit(image):
    """A 32-bit (I) or 16-bit (I;16*) grayscale image as L: round(v / 257) clipped to 0..255, computed in
    blocks of rows so the working copy stays small."""
    from PIL import Image

    pixels = np.asarray(image)
    out = np.empty(pixels.shape, np.uint8)
    for r in range(0, pixels.shape[0], _ROWS_PER_CHUNK):
        block = pixels[r : r + _ROWS_PER_CHUNK].astype(np.int64)
        out[r : r + _ROWS_PER_CHUNK] = np.clip((block + 128) // 257, 0, 255)
    return Image.fromarray(out, mode="L")


def decode_image(data: bytes | None):
    """Decode encoded image bytes to an RGB PIL image; raise ValueError with a short reason otherwise.

    Only JPEG, PNG and WebP content is opened (:data:`IMAGE_FORMATS`, whatever the file's name), and the
    decoded size is bounded from the header before any pixel is decoded. Reasons: ``image:missing`` (None),
    ``image:zero size`` (0 bytes, or a declared width or height of 0), ``image:unsupported format`` (content
    without a JPEG, PNG or WebP signature: EPS, PDF, TIFF, GIF, text, ...), ``image:decompression bomb (...)`` (more than
    MAX_IMAGE_PIXELS pixels, or more than MAX_DECODED_BYTES = width x height x bytes per pixel of its mode x
    frames), ``image:undecodable (...)`` (a JPEG, PNG or WebP
    signature, but corrupt or truncated). The first frame of a multi-frame image is
    used. Grayscale (L, I, I;16), bilevel, palette and CMYK images are converted to RGB; transparency (RGBA,
    LA, PA, palette with a transparent colour) is composited onto white.
    """
    from PIL import Image

    if data is None:
        raise ValueError("image:missing")
    if len(data) == 0:
        raise ValueError("image:zero size (0 bytes)")
    declared = _declared_size(data)
    if declared is not None and 0 in declared:
        raise ValueError(f"image:zero size ({declared[0]}x{declared[1]})")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = open_header(data)
            _check_size(image)
            image.load()
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
            raise ValueError(f"image:decompression bomb ({err})") from err
        except ValueError as err:
            if str(err).startswith("image:"):
                raise
            raise ValueError(f"image:undecodable ({type(err).__name__}: {err})") from err
        except Exception as err:
            raise ValueError(f"image:undecodable ({type(err).__name__}: {err})") from err
    try:
        if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):  # 16/32-bit grayscale: scale to 8 bits
            image = _to_8bit(image)
        if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
            image.mode == "P" and "transparency" in image.info
        ):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except Exception as err:
        raise ValueError(f"image:undecodable ({type(err).__name__}: {err})") from err
