"""Balancing losses for training code (torch): balanced CLIP, InfoNCE + Geometric Harmonization, long tail.

Everything here is a plain function of tensors (plus a few small ``nn.Module`` wrappers that hold class
statistics), so any training loop can import it. Notation: ``f`` logits of shape ``(N, C)``, ``y`` integer
targets of shape ``(N,)``, ``n_c`` the training count of class ``c``, ``pi_c = n_c / sum n``.
Formulas and defaults follow ``research/papers.md`` (Liu et al. 2024 for the balanced CLIP loss,
Zhou et al. 2023 for Geometric Harmonization, and the long-tail literature for the rest).

Contents

- :func:`balanced_clip_loss`: the CLIP loss after ``n_iter`` Sinkhorn (balancing) iterations on the batch
  logit matrix; ``n_iter = 1`` is the standard CLIP loss.
- :func:`info_nce_loss` (SimCLR's NT-Xent), :func:`simplex_etf`, :func:`gh_predictions`,
  :func:`gh_surrogate_labels`, :func:`gh_loss`, :class:`GeometricHarmonizationLoss`.
- :func:`logit_adjusted_loss`, :func:`logit_adjust_posthoc`, :func:`balanced_softmax_loss`,
  :func:`class_balanced_weights`, :func:`ldam_margins`, :class:`LDAMLoss`, :func:`drw_weights`,
  :func:`vs_loss`, :func:`focal_loss`, and :func:`make_longtail_loss` (a loss by name, for the jobs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "COSINE_LOSSES",
    "DRW_LOSSES",
    "LONGTAIL_LOSSES",
    "GeometricHarmonizationLoss",
    "LDAMLoss",
    "balanced_clip_loss",
    "balanced_clip_log_plans",
    "balanced_softmax_loss",
    "class_balanced_weights",
    "class_prior",
    "drw_weights",
    "focal_loss",
    "gh_loss",
    "gh_predictions",
    "gh_surrogate_labels",
    "info_nce_loss",
    "ldam_margins",
    "logit_adjust_posthoc",
    "logit_adjusted_loss",
    "make_longtail_loss",
    "simplex_etf",
    "vs_loss",
]


# --------------------------------------------------------------------------------------------------
# Balanced CLIP loss (Liu, Mehta, Pal, Harchaoui 2024)
# --------------------------------------------------------------------------------------------------


def _log_softmax_rows(x: Tensor) -> Tensor:
    """Normalise every row (image i over texts j): ``x_ij - logsumexp_j x_ij``."""
    return x - torch.logsumexp(x, dim=1, keepdim=True)


def _log_softmax_cols(x: Tensor) -> Tensor:
    """Normalise every column (text j over images i): ``x_ij - logsumexp_i x_ij``."""
    return x - torch.logsumexp(x, dim=0, keepdim=True)


def balanced_clip_log_plans(logits: Tensor, n_iter: int) -> tuple[Tensor, Tensor]:
    """The two log-measures ``(a, b)`` after ``n_iter`` balancing steps on a square logit matrix.

    Start from the joint softmax ``log P0 = L - logsumexp over all m^2 entries``. ``a`` applies ``n_iter``
    alternating steps starting with rows (row step = ``log_softmax`` over each row, i.e. the KL projection
    onto the measures whose image marginal is uniform, up to the constant ``log m``), ``b`` the same
    starting with columns::

        n = 0: a = b = L - logsumexp(L)
        n = 1: a = log_softmax_rows(L),  b = log_softmax_cols(L)
        n = 2: a = log_softmax_cols(log_softmax_rows(L)),  b = log_softmax_rows(log_softmax_cols(L))
    """
    if logits.ndim != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"logits must be a square (m, m) matrix, got shape {tuple(logits.shape)}")
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 0:
        raise ValueError(f"n_iter must be an integer >= 0, got {n_iter!r}")
    start = logits - torch.logsumexp(logits.reshape(-1), dim=0)
    a, b = start, start
    for step in range(n_iter):
        if step % 2 == 0:
            a, b = _log_softmax_rows(a), _log_softmax_cols(b)
        else:
            a, b = _log_softmax_cols(a), _log_softmax_rows(b)
    return a, b


def balanced_clip_loss(logits: Tensor, n_iter: int = 1) -> Tensor:
    """CLIP loss after ``n_iter`` Sinkhorn iterations on the batch logit matrix ``L`` (``m x m``).

    ``L_ij = s <f(x_i), g(y_j)>`` (image i, text j; the logit scale already applied), matching pairs on
    the diagonal. With ``(a, b)`` from :func:`balanced_clip_log_plans`::

        loss = -(1/m) sum_i (a_ii + b_ii) / 2

    so ``n_iter = 0`` gives ``-(1/m) sum_i [L_ii - logsumexp over all m^2 entries]``, ``n_iter = 1`` the
    standard CLIP loss ``(CE(L, I) + CE(L^T, I)) / 2`` and ``n_iter = 2`` the two-step form
    ``-(1/m) sum_i (a_ii + b_ii) / 2`` with ``a = log_softmax_cols(log_softmax_rows(L))`` and
    ``b = log_softmax_rows(log_softmax_cols(L))``. Larger ``n_iter`` continue alternating.
    """
    a, b = balanced_clip_log_plans(logits, n_iter)
    return -(torch.diagonal(a) + torch.diagonal(b)).mean() / 2


# --------------------------------------------------------------------------------------------------
# InfoNCE and Geometric Harmonization (Zhou, Yao et al. 2023)
# --------------------------------------------------------------------------------------------------


def info_nce_loss(z1: Tensor, z2: Tensor, temperature: float = 0.2) -> Tensor:
    """SimCLR's NT-Xent loss over ``2N`` views: ``z1[i]`` and ``z2[i]`` are two views of sample ``i``.

    With ``u`` the L2-normalised rows of ``[z1; z2]`` and ``s_kl = <u_k, u_l> / temperature``::

        loss = -(1/2N) sum_k [ s_{k,p(k)} - logsumexp_{l != k} s_kl ]

    where ``p(k)`` is the other view of the same sample.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"z1 and z2 must both be (N, d), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    u = F.normalize(torch.cat([z1, z2], dim=0), dim=1)
    sim = u @ u.T / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=sim.device), float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(sim.device)
    return F.cross_entropy(sim, positives)


def simplex_etf(num_classes: int, dim: int, seed: int = 0) -> Tensor:
    """A simplex equiangular tight frame ``M`` of shape ``(K, d)``: unit rows, pairwise inner products -1/(K-1).

    ``A ~ N(0, 1)`` of shape ``(K, d)`` (drawn from ``seed``), ``U = W V^T`` its polar factor from the SVD
    ``A = W S V^T`` (orthonormal rows), ``M = sqrt(K / (K - 1)) (I - 11^T / K) U``. Needs ``2 <= K <= d``.
    """
    if num_classes < 2 or num_classes > dim:
        raise ValueError(f"a simplex ETF needs 2 <= num_classes <= dim, got K={num_classes}, d={dim}")
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(num_classes, dim, generator=gen, dtype=torch.float64)
    w, _, vh = torch.linalg.svd(a, full_matrices=False)
    u = w @ vh
    k = num_classes
    centre = torch.eye(k, dtype=torch.float64) - torch.full((k, k), 1.0 / k, dtype=torch.float64)
    return (math.sqrt(k / (k - 1)) * centre @ u).to(torch.float32)


def gh_predictions(z: Tensor, etf: Tensor) -> Tensor:
    """Geometric prediction ``t_i = normalize(z_i M^T)`` (``z`` of shape ``(N, d)``, ``M`` = ``etf`` ``(K, d)``)."""
    return F.normalize(z @ etf.T, dim=1)


def gh_surrogate_labels(
    t: Tensor, class_marginal: Tensor, temperature: float = 0.05, iterations: int = 300
) -> Tensor:
    """Balanced soft labels ``Q_hat`` (``(N, K)``, rows sum to 1, no gradient) for geometric predictions ``t``.

    ``Q = exp(t / lambda)`` is scaled by Sinkhorn iterations toward row marginal ``1/N`` (each sample one
    unit of mass) and column marginal ``pi`` (``class_marginal``, normalised to sum to 1); the rows of the
    result, renormalised to sum to 1, are the labels, so column ``k`` sums to ``N pi_k``.
    Computed by :func:`rebalance.kernels.sinkhorn.sinkhorn_knopp_torch`.
    """
    from rebalance.kernels.sinkhorn import sinkhorn_knopp_torch

    pi = torch.as_tensor(class_marginal, dtype=t.dtype, device=t.device)
    if pi.ndim != 1 or pi.shape[0] != t.shape[1]:
        raise ValueError(f"class_marginal must have shape ({t.shape[1]},), got {tuple(pi.shape)}")
    if not torch.isfinite(pi).all() or (pi < 0).any() or pi.sum() <= 0:
        raise ValueError("class_marginal must be finite, non-negative and not all zero")
    with torch.no_grad():
        q = sinkhorn_knopp_torch(t.detach(), pi / pi.sum(), temperature, iterations)
    return q / q.sum(dim=1, keepdim=True)


def gh_loss(
    z1: Tensor,
    z2: Tensor,
    etf: Tensor,
    class_marginal: Tensor,
    gamma: float = 0.1,
    lam: float = 0.05,
    iterations: int = 300,
) -> Tensor:
    """Geometric Harmonization loss: swapped prediction between two views against balanced surrogate labels.

    ``t^v = normalize(z^v M^T)``, ``q(t) = softmax(t / gamma)``, ``Q_hat`` = :func:`gh_surrogate_labels`::

        L_GH = -(1/N) sum_i [ Q_hat(t^1)_i . log q(t^2)_i + Q_hat(t^2)_i . log q(t^1)_i ]
    """
    t1, t2 = gh_predictions(z1, etf), gh_predictions(z2, etf)
    q1 = gh_surrogate_labels(t1, class_marginal, lam, iterations)
    q2 = gh_surrogate_labels(t2, class_marginal, lam, iterations)
    logp1 = F.log_softmax(t1 / gamma, dim=1)
    logp2 = F.log_softmax(t2 / gamma, dim=1)
    return -((q1 * logp2).sum(dim=1) + (q2 * logp1).sum(dim=1)).mean()


class GeometricHarmonizationLoss(nn.Module):
    """``InfoNCE(temperature) + weight * L_GH`` with a fixed simplex ETF of ``num_classes`` vertices in ``dim``.

    ``class_marginal`` (pi, length K) defaults to uniform; set it with :meth:`set_class_marginal` (e.g. the
    cluster marginal of a rebalance run). ``weight`` is set by the training loop (:meth:`ramp` gives the
    linear ramp from 0 to 1 over ``ramp_epochs`` after ``warmup_epochs`` of plain SSL).
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        temperature: float = 0.2,
        gamma: float = 0.1,
        lam: float = 0.05,
        iterations: int = 300,
        class_marginal: Tensor | Sequence[float] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.register_buffer("etf", simplex_etf(num_classes, dim, seed))
        pi = torch.full((num_classes,), 1.0 / num_classes) if class_marginal is None else class_marginal
        self.register_buffer("class_marginal", torch.zeros(num_classes))
        self.set_class_marginal(pi)
        self.temperature, self.gamma, self.lam, self.iterations = temperature, gamma, lam, iterations
        self.weight = 1.0

    def set_class_marginal(self, pi: Tensor | Sequence[float]) -> None:
        pi = torch.as_tensor(pi, dtype=torch.float32).flatten()
        if pi.shape != self.class_marginal.shape:
            raise ValueError(
                f"class marginal must have {self.class_marginal.numel()} values, got {pi.numel()}"
            )
        if not torch.isfinite(pi).all() or (pi < 0).any() or pi.sum() <= 0:
            raise ValueError("class marginal must be finite, non-negative and not all zero")
        self.class_marginal.copy_(pi / pi.sum())

    @staticmethod
    def ramp(epoch: int, warmup_epochs: int, ramp_epochs: int = 10) -> float:
        """GH weight at ``epoch`` (0-based): 0 during warm-up, then linear up to 1 over ``ramp_epochs``."""
        if epoch < warmup_epochs:
            return 0.0
        if ramp_epochs <= 0:
            return 1.0
        return min(1.0, (epoch - warmup_epochs + 1) / ramp_epochs)

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        loss = info_nce_loss(z1, z2, self.temperature)
        if self.weight > 0:
            gh = gh_loss(z1, z2, self.etf, self.class_marginal, self.gamma, self.lam, self.iterations)
            loss = loss + self.weight * gh
        return loss


# --------------------------------------------------------------------------------------------------
# Long-tail classification losses
# --------------------------------------------------------------------------------------------------


def _counts(class_counts: Tensor | Sequence[float], like: Tensor | None = None) -> Tensor:
    n = torch.as_tensor(class_counts, dtype=torch.float32)
    if like is not None:
        n = n.to(device=like.device, dtype=like.dtype if like.is_floating_point() else torch.float32)
    if n.ndim != 1 or n.numel() == 0:
        raise ValueError(f"class_counts must be a non-empty 1-d sequence, got shape {tuple(n.shape)}")
    if not torch.isfinite(n).all() or (n <= 0).any():
        raise ValueError(
            "class_counts must be finite and > 0 for every class (a class without rows has no prior)"
        )
    return n


def class_prior(class_counts: Tensor | Sequence[float], like: Tensor | None = None) -> Tensor:
    """``pi_c = n_c / sum_c n_c``."""
    n = _counts(class_counts, like)
    return n / n.sum()


def _check_logits(logits: Tensor, n_classes: int) -> None:
    if logits.ndim != 2 or logits.shape[1] != n_classes:
        raise ValueError(f"logits must be (N, {n_classes}), got shape {tuple(logits.shape)}")


def logit_adjusted_loss(
    logits: Tensor, target: Tensor, class_counts: Tensor | Sequence[float], tau: float = 1.0
) -> Tensor:
    """Logit-adjusted cross-entropy (Menon et al.): ``CE(f + tau log pi, y)``; ``tau = 0`` is plain CE."""
    pi = class_prior(class_counts, logits)
    _check_logits(logits, pi.numel())
    return F.cross_entropy(logits + tau * torch.log(pi), target)


def logit_adjust_posthoc(logits: Tensor, class_counts: Tensor | Sequence[float], tau: float = 1.0) -> Tensor:
    """Post-hoc logit adjustment of a model trained with plain CE: predict ``argmax_y f_y - tau log pi_y``."""
    pi = class_prior(class_counts, logits)
    _check_logits(logits, pi.numel())
    return logits - tau * torch.log(pi)


def balanced_softmax_loss(logits: Tensor, target: Tensor, class_counts: Tensor | Sequence[float]) -> Tensor:
    """Balanced softmax (Ren et al.): ``CE(f + log n, y)``, i.e. logit adjustment with tau = 1 (raw f at test)."""
    n = _counts(class_counts, logits)
    _check_logits(logits, n.numel())
    return F.cross_entropy(logits + torch.log(n), target)


def class_balanced_weights(class_counts: Tensor | Sequence[float], beta: float = 0.9999) -> Tensor:
    """Class-balanced weights by effective number (Cui et al.).

    ``w_c = (1 - beta) / (1 - beta^n_c)``, normalised so that ``sum_c w_c = C``. ``beta = 0`` gives all ones;
    ``beta -> 1`` tends to inverse frequency.
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    n = _counts(class_counts).to(torch.float64)
    w = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n))
    return (w * n.numel() / w.sum()).to(torch.float32)


def ldam_margins(class_counts: Tensor | Sequence[float], max_margin: float = 0.5) -> Tensor:
    """LDAM margins ``Delta_c = C n_c^(-1/4)`` with ``C`` chosen so that the largest margin is ``max_margin``."""
    n = _counts(class_counts).to(torch.float64)
    m = n.pow(-0.25)
    return (m * (max_margin / m.max())).to(torch.float32)


class LDAMLoss(nn.Module):
    """Label-distribution-aware margin loss (Cao et al.): ``CE(s (z - Delta_y e_y), y)``, optional class weights.

    ``z`` are cosine logits (a cosine classifier: normalised features times normalised weights, in
    [-1, 1]); ``Delta`` from :func:`ldam_margins`; ``s`` = 30. For deferred re-weighting (DRW) set
    :attr:`weight` each epoch to :func:`drw_weights`.
    """

    def __init__(
        self,
        class_counts: Tensor | Sequence[float],
        max_margin: float = 0.5,
        s: float = 30.0,
        weight: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("margins", ldam_margins(class_counts, max_margin))
        self.s = s
        self.weight = weight

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        _check_logits(logits, self.margins.numel())
        margins = self.margins.to(logits.device, logits.dtype)  # the module itself may stay on the CPU
        shifted = logits - F.one_hot(target, logits.shape[1]).to(logits.dtype) * margins
        weight = None if self.weight is None else self.weight.to(logits.device, logits.dtype)
        return F.cross_entropy(self.s * shifted, target, weight=weight)


def drw_weights(
    epoch: int, class_counts: Tensor | Sequence[float], start_epoch: int, beta: float = 0.9999
) -> Tensor | None:
    """Deferred re-weighting: None (unweighted) before ``start_epoch``, class-balanced weights from it on."""
    if epoch < start_epoch:
        return None
    return class_balanced_weights(class_counts, beta)


def vs_loss(
    logits: Tensor,
    target: Tensor,
    class_counts: Tensor | Sequence[float],
    gamma: float = 0.3,
    tau: float = 1.0,
    weight: Tensor | None = None,
) -> Tensor:
    """Vector-scaling loss (Kini et al.): ``CE(Delta * f + iota, y)`` per class.

    ``Delta_c = (n_c / n_max)^gamma`` (multiplicative), ``iota_c = tau log pi_c`` (additive); ``gamma = 0``
    is logit adjustment.
    """
    n = _counts(class_counts, logits)
    _check_logits(logits, n.numel())
    delta = (n / n.max()).pow(gamma)
    iota = tau * torch.log(n / n.sum())
    w = None if weight is None else weight.to(logits.device, logits.dtype)
    return F.cross_entropy(logits * delta + iota, target, weight=w)


def focal_loss(logits: Tensor, target: Tensor, gamma: float = 2.0, weight: Tensor | None = None) -> Tensor:
    """Focal loss (Lin et al.): mean over the batch of ``-w_y (1 - p_y)^gamma log p_y``; gamma = 0 is (weighted) CE
    averaged over the batch."""
    logp = F.log_softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
    loss = -((1.0 - logp.exp()).pow(gamma)) * logp
    if weight is not None:
        loss = loss * weight.to(logits.device, logits.dtype)[target]
    return loss.mean()


#: Loss names accepted by :func:`make_longtail_loss` (and ``jobs.train_longtail --loss``).
LONGTAIL_LOSSES = ("ce", "logit_adjusted", "balanced_softmax", "ldam", "vs", "focal", "cb")
#: The losses whose ``weight`` (per-class weights) deferred re-weighting sets (``--drw-epoch``).
DRW_LOSSES = ("ldam", "vs")
#: The losses that expect cosine logits in [-1, 1] (a cosine classifier head) rather than raw logits.
COSINE_LOSSES = ("ldam",)


class _ClassWeighted:
    """``loss(logits, target)`` through ``fn(logits, target, weight)`` with per-class ``weight`` (C,) that
    can be set between epochs (None: unweighted), like :attr:`LDAMLoss.weight`."""

    def __init__(self, fn: Callable[[Tensor, Tensor, Tensor | None], Tensor]) -> None:
        self.fn = fn
        self.weight: Tensor | None = None

    def __call__(self, logits: Tensor, target: Tensor) -> Tensor:
        return self.fn(logits, target, self.weight)


def make_longtail_loss(
    name: str,
    class_counts: Tensor | Sequence[float],
    *,
    tau: float = 1.0,
    gamma: float | None = None,
    beta: float = 0.9999,
    max_margin: float = 0.5,
    s: float = 30.0,
) -> Callable[[Tensor, Tensor], Tensor]:
    """A ``loss(logits, target)`` by name: ``ce``, ``logit_adjusted`` (tau), ``balanced_softmax``,
    ``ldam`` (cosine logits expected: :data:`COSINE_LOSSES`; max_margin, s), ``vs`` (gamma default 0.3, tau), ``focal``
    (gamma default 2), ``cb`` (class-balanced weighted CE with beta). The losses of :data:`DRW_LOSSES`
    have a settable ``weight`` attribute (per-class weights, None at first) for deferred re-weighting
    (:func:`drw_weights`)."""
    counts = _counts(class_counts)
    if name == "ce":
        return lambda f, y: F.cross_entropy(f, y)
    if name == "logit_adjusted":
        return lambda f, y: logit_adjusted_loss(f, y, counts, tau)
    if name == "balanced_softmax":
        return lambda f, y: balanced_softmax_loss(f, y, counts)
    if name == "ldam":
        return LDAMLoss(counts, max_margin=max_margin, s=s)
    if name == "vs":
        g = 0.3 if gamma is None else gamma
        return _ClassWeighted(lambda f, y, w: vs_loss(f, y, counts, g, tau, weight=w))
    if name == "focal":
        g = 2.0 if gamma is None else gamma
        return lambda f, y: focal_loss(f, y, g)
    if name == "cb":
        w = class_balanced_weights(counts, beta)
        return lambda f, y: F.cross_entropy(f, y, weight=w.to(f.device, f.dtype))
    raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LONGTAIL_LOSSES)}")
