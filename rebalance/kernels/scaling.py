"""The balancing result: per-label log factors from which any row's weight follows, and its JSON record.

IPF scales the measure of a cell by one factor per label of each marginal, so after balancing the weight
of a row with labels l = (l_1, ..., l_M) (its cell, seen offline or not) is

    w(l) = min(clip * b(exp(sum_m f_m(l_m) - L)), max_weight),    b(x) = min(max(x, lo), hi)

with f_m = ``log_factors[m]`` (K_m,) (-inf where the target is 0: weight 0), L = ``log_normalizer`` (the
weights have mean 1 over the balanced rows), b the clip to ``bounds`` = (lo, hi) when the balancing bounded
the weights inside its iteration (``balance.bounds``; hi None: no upper bound; without bounds b(x) = x)
and, when ``max_weight`` is set, the scale ``clip`` >= 1 that keeps that mean at 1 after capping
(:func:`rebalance.kernels.ipf.clip_scale`); without it w = b(exp(...)).
This module is the one place that formula is written: the balance stage weighs its rows with it, the
online endpoint its requests, from the same ``balance.json`` ``scaling`` record (:meth:`Scaling.to_dict`,
:meth:`Scaling.from_dict`; docs/run-directory.md).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Scaling"]


@dataclass(frozen=True)
class Scaling:
    """Per-label log factors and the normaliser, cap and labels that turn a row's label codes into its weight.

    log_factors: M arrays (K_m,) float64, -inf for a label whose target is 0. log_normalizer: L.
    clip, max_weight: the cap (``max_weight`` None: none; ``clip`` is then 1). bounds: (lo, hi) the weights
    were bounded to inside the iteration (hi None: none above), or None. marginals, values: the name
    of each marginal and the label each code stands for (values[m][c] is code c of marginal m), needed by
    :meth:`to_dict` and filled by :meth:`from_dict`; empty where only codes matter (the kernels).
    """

    log_factors: tuple[np.ndarray, ...]
    log_normalizer: float
    clip: float = 1.0
    max_weight: float | None = None
    marginals: tuple[str, ...] = ()
    values: tuple[tuple[str, ...], ...] = ()
    bounds: tuple[float, float | None] | None = None

    def weights(self, codes: np.ndarray) -> np.ndarray:
        """Weights (n,) float64 of rows (or cells) with label codes (n, M): codes[:, m] in [0, K_m)."""
        codes = np.asarray(codes)
        log_w = np.full(codes.shape[0], -float(self.log_normalizer))
        for m, f in enumerate(self.log_factors):
            log_w += np.asarray(f, dtype=np.float64)[codes[:, m]]
        with np.errstate(over="ignore"):  # a cell no row had may lie far above the cap: inf, then capped
            w = np.exp(log_w)
        if self.bounds is not None:
            lo, hi = self.bounds
            w = np.clip(w, lo, np.inf if hi is None else hi)
        return w if self.max_weight is None else np.minimum(self.clip * w, self.max_weight)

    def capped(self, clip: float, max_weight: float) -> Scaling:
        """The same scaling with weights min(clip * w, max_weight)."""
        return dataclasses.replace(self, clip=float(clip), max_weight=float(max_weight))

    def labelled(self, marginals: Sequence[str], values: Sequence[Sequence[Any]]) -> Scaling:
        """The same scaling with the marginals' names and each code's label (stored as strings)."""
        if len(marginals) != len(self.log_factors) or len(values) != len(self.log_factors):
            raise ValueError(
                f"{len(self.log_factors)} marginals scaled, but {len(marginals)} names and {len(values)} "
                "value lists given"
            )
        for name, v, f in zip(marginals, values, self.log_factors, strict=True):
            if len(v) != len(f):
                raise ValueError(f"marginal {name!r}: {len(v)} values for {len(f)} log factors")
        labels = tuple(tuple(str(x) for x in v) for v in values)
        return dataclasses.replace(self, marginals=tuple(marginals), values=labels)

    def to_dict(self) -> dict[str, Any]:
        """The ``balance.json`` ``scaling`` record: ``marginals``, ``values`` and ``log_factors`` per marginal
        (null for -inf), ``log_normalizer``, ``bounds`` ([lo, hi], hi null for none, or null), ``clip``
        ({scale, max_weight} or null)."""
        if len(self.marginals) != len(self.log_factors):
            raise ValueError("a scaling needs its marginals' names and values to be recorded (see labelled)")
        return {
            "marginals": list(self.marginals),
            "values": {m: list(v) for m, v in zip(self.marginals, self.values, strict=True)},
            "log_factors": {
                m: [float(x) if np.isfinite(x) else None for x in f]
                for m, f in zip(self.marginals, self.log_factors, strict=True)
            },
            "log_normalizer": float(self.log_normalizer),
            "bounds": None if self.bounds is None else [float(self.bounds[0]), self.bounds[1]],
            "clip": None if self.max_weight is None else {"scale": self.clip, "max_weight": self.max_weight},
        }

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Scaling:
        """The scaling of a ``balance.json`` ``scaling`` record (:meth:`to_dict`; a record without ``bounds``,
        from before they existed, has none)."""
        marginals = tuple(str(m) for m in record["marginals"])
        clip = record.get("clip")
        bounds = record.get("bounds")
        return cls(
            log_factors=tuple(
                np.array([-math.inf if x is None else float(x) for x in record["log_factors"][m]])
                for m in marginals
            ),
            log_normalizer=float(record["log_normalizer"]),
            clip=1.0 if clip is None else float(clip["scale"]),
            max_weight=None if clip is None else float(clip["max_weight"]),
            marginals=marginals,
            values=tuple(tuple(str(v) for v in record["values"][m]) for m in marginals),
            bounds=None
            if bounds is None
            else (float(bounds[0]), None if bounds[1] is None else float(bounds[1])),
        )
