"""Row-wise operations on embedding matrices."""

from __future__ import annotations

import numpy as np

__all__ = ["normalize_rows"]


def normalize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalise the rows of ``x`` (n, d): ``x_i / ||x_i||`` as float32; returns the normalised rows and a
    mask (n,) of usable rows (finite and non-zero; the others are zero rows)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1)
    ok = np.isfinite(x).all(axis=1) & (norms > 0) & np.isfinite(norms)
    out = np.zeros_like(x)
    out[ok] = x[ok] / norms[ok, None]
    return out, ok
