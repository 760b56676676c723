"""Decoding the encoded images of a dataset (JPEG, PNG, ...) into RGB PIL images, with a short reason for
every image that cannot be used. The embed stage and the endpoint decode through :func:`decode_image`."""

from __future__ import annotations

import io
import warnings

import numpy as np

__all__ = ["MAX_IMAGE_PIXELS", "decode_image"]

MAX_IMAGE_PIXELS = 64_000_000  # larger images are rejected as decompression bombs


def _declared_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG or GIF header (Pillow refuses to open those that declare 0)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24 and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    return None


def decode_image(data: bytes | None):
    """Decode encoded image bytes to an RGB PIL image; raise ValueError with a short reason otherwise.

    Reasons: ``image:missing`` (None), ``image:zero size`` (0 bytes, or a declared width or height of 0),
    ``image:decompression bomb (...)`` (more than MAX_IMAGE_PIXELS pixels declared; the pixels are never
    decoded), ``image:undecodable (...)`` (corrupt, truncated or not an image). Grayscale (L, I, I;16),
    bilevel, palette and CMYK images are converted to RGB; transparency (RGBA, LA, PA, palette with a
    transparent colour) is composited onto white.
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
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise ValueError(
                    f"image:decompression bomb ({image.width}x{image.height} pixels > {MAX_IMAGE_PIXELS})"
                )
            image.load()
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
            raise ValueError(f"image:decompression bomb ({err})") from err
        except ValueError as err:
            if str(err).startswith("image:"):
                raise
            raise ValueError(f"image:undecodable ({type(err).__name__}: {err})") from err
        except Exception as err:
            raise ValueError(f"image:undecodable ({type(err).__name__}: {err})") from err
    if image.width == 0 or image.height == 0:
        raise ValueError(f"image:zero size ({image.width}x{image.height})")
    try:
        if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):  # 16-bit grayscale: scale to 8 bits
            pixels = np.asarray(image, dtype=np.float64) / 257.0
            image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="L")
        if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
            image.mode == "P" and "transparency" in image.info
        ):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except Exception as err:
        raise ValueError(f"image:undecodable ({type(err).__name__}: {err})") from err
