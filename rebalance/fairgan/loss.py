"""The bias-mitigation loss of fair-GAN training (Jain et al. 2023), in a differentiable form.

The paper's official term counts the classifier's argmax over a batch, which passes no gradient. Here the
batch class distribution is the classifier's softmax averaged over the generated batch,

    q_k = (1/N) sum_i softmax(f(G(z_i)))_k,                                  f: (N, K) logits

and the loss is its weighted squared distance to equiprobable,

    L_bias = sum_k w_k (q_k - 1/K)^2,

with weights ``w`` (K,) larger for rare classes (:func:`rarity_weights`), so that a deficit in a rare class
costs more than the same deficit in a common one. ``L_bias = 0`` exactly when ``q`` is uniform.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["bias_mitigation_loss", "rarity_weights"]


def rarity_weights(
    fractions: Sequence[float] | np.ndarray, power: float = 0.5, floor: float = 1e-3
) -> np.ndarray:
    """Class weights ``w_k ∝ max(p_k, floor)^-power``, scaled to mean 1; shape ``(K,)`` float64.

    ``p`` are the class fractions of the biased generator (e.g. from ``metrics.fairness_estimate``);
    ``power = 0`` gives equal weights, ``power = 1`` inverse-frequency weights; ``floor`` bounds the weight
    of a class the generator never produced."""
    p = np.asarray(fractions, dtype=np.float64).ravel()
    if p.size == 0 or (p < 0).any() or not np.isfinite(p).all():
        raise ValueError("fractions must be a non-empty vector of non-negative finite numbers")
    if power < 0 or not 0 < floor <= 1:
        raise ValueError(f"need power >= 0 and 0 < floor <= 1, got power={power}, floor={floor}")
    w = np.maximum(p, floor) ** -power
    return w / w.mean()


def bias_mitigation_loss(logits: Tensor, weights: Tensor | Sequence[float] | None = None) -> Tensor:
    """``sum_k w_k (mean_i softmax(logits)_ik - 1/K)^2`` for logits ``(N, K)``; a scalar tensor.

    ``weights`` (K,) default to 1 for every class."""
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(f"logits must have shape (N, K) with N >= 1, got {tuple(logits.shape)}")
    k = logits.shape[1]
    q = torch.softmax(logits.float(), dim=1).mean(dim=0)
    if weights is None:
        w = torch.ones(k, dtype=q.dtype, device=q.device)
    else:
        w = torch.as_tensor(weights, dtype=q.dtype, device=q.device)
        if w.shape != (k,):
            raise ValueError(f"weights must have shape ({k},), got {tuple(w.shape)}")
    return (w * (q - 1.0 / k) ** 2).sum()
