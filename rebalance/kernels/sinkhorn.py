"""Soft (entropic) Sinkhorn: balanced soft assignments of N rows to K columns from a score matrix.

Given scores S (N, K), a temperature T and a column marginal pi (K,), find the matrix

    Q = diag(u) exp(S / T) diag(v),   Q 1 = 1/N (each row one unit of mass),   Q^T 1 = pi,

the entropic optimal-transport plan for cost -S and regularisation T (POT: ``ot.sinkhorn_log(a=1/N,
b=pi, M=-S, reg=T)``), as used for Geometric Harmonization's surrogate labels (T = 0.05, 300 iterations)
and SwAV's balanced codes (epsilon = 0.05, 3 iterations). The functions return the codes N Q, whose rows
sum to 1 and whose column k sums to N pi_k.

The iteration is SwAV's and POT's: start from Q proportional to exp(S / T) (u constant, v = 1), then each
iteration scales the columns to pi and then the rows to 1/N, so the rows are always exact and the error of
an iteration is the total variation 0.5 ||Q^T 1 - pi||_1 of the column marginal after it. Since the rows
are then a softmax, Q is determined by the column potential log v (K,): N Q_i = softmax(S_i / T + log v).

Three forms of the same iteration (equal to rounding):
- :func:`soft_sinkhorn` (numpy, one process): keeps the kernel exp(S/T + f + g) and iterates on the
  scaling vectors u, v (two matrix-vector products per iteration); the log potentials f, g absorb u, v,
  and a step runs in log domain (log-sum-exp), only when a sum underflows or a scaling grows large, so it
  is stable for any scores and temperature.
- :func:`soft_sinkhorn_partial` + :func:`soft_sinkhorn_driver` (+ :func:`soft_sinkhorn_parts`, the
  reference over a list of row parts): rows stay on workers and only K-vectors are reduced per iteration;
  the state is log v alone. A worker may cache its kernel (:func:`soft_sinkhorn_kernel`): an iteration is
  then two matrix-vector products over its rows instead of a log-sum-exp.
- :func:`sinkhorn_knopp_torch`: log domain in torch, for training jobs (batches on a GPU).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "SoftSinkhornResult",
    "sinkhorn_knopp_torch",
    "soft_sinkhorn",
    "soft_sinkhorn_codes",
    "soft_sinkhorn_driver",
    "soft_sinkhorn_kernel",
    "soft_sinkhorn_partial",
    "soft_sinkhorn_parts",
    "top_k_codes",
]

TINY = 1e-250
"""A sum below this (where the target is positive) may have lost terms to underflow: redo the step in log
domain. Terms that underflow are below 2.2e-308, so above TINY they change a sum by < N * 1e-58 relative."""
ABSORB = 100.0
"""Absorb the scaling vectors into the kernel when |log u| or |log v| exceeds this (keeps products finite)."""


@dataclass
class SoftSinkhornResult:
    """Balanced soft codes and the trace of the iteration.

    codes: (N, K) N Q, rows sum to 1 (None from :func:`soft_sinkhorn_driver`, whose rows live elsewhere).
    log_v: (K,) column potential, codes_i = softmax(S_i / T + log_v) for every row, also a new one
    (-inf where pi is 0). errors: (iterations + 1,) total-variation error of the column marginal, [0] for
    the starting Q proportional to exp(S / T). converged: the last error is below ``tol``.
    """

    codes: np.ndarray | None
    log_v: np.ndarray
    errors: np.ndarray
    converged: bool
    iterations: int
    tol: float

    @property
    def final_error(self) -> float:
        """The column-marginal error after the last iteration."""
        return float(self.errors[-1])


def _check(scores: np.ndarray, col_marginal: np.ndarray, temperature: float) -> tuple[np.ndarray, int]:
    """Validate; return the column marginal normalised to sum to 1, and N."""
    if scores.ndim != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"scores must be a non-empty (N, K) matrix, got shape {scores.shape}")
    return _check_marginal(col_marginal, scores.shape[1], temperature), scores.shape[0]


def _check_marginal(col_marginal: np.ndarray, k: int, temperature: float) -> np.ndarray:
    pi = np.asarray(col_marginal, dtype=np.float64)
    if pi.shape != (k,):
        raise ValueError(f"col_marginal must have shape ({k},), got {pi.shape}")
    if not np.isfinite(pi).all() or (pi < 0).any() or pi.sum() <= 0:
        raise ValueError("col_marginal must be finite, non-negative and not all zero")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return pi / pi.sum()


def _limits(iterations: int | None, max_iter: int) -> int:
    limit = max_iter if iterations is None else iterations
    if limit < 1:
        raise ValueError(f"need at least one iteration, got iterations={iterations}, max_iter={max_iter}")
    return limit


def _tv(col: np.ndarray, pi: np.ndarray) -> float:
    return float(0.5 * np.abs(col - pi).sum())


def _log(x: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(x)


def soft_sinkhorn(
    scores: np.ndarray,
    col_marginal: np.ndarray,
    temperature: float = 0.05,
    iterations: int | None = 3,
    *,
    tol: float = 1e-6,
    max_iter: int = 1000,
) -> SoftSinkhornResult:
    """Soft Sinkhorn in one process (numpy, float64): codes = N diag(u) exp(S/T) diag(v).

    scores: (N, K). col_marginal: (K,) non-negative, normalised here to sum to 1 (pi). temperature: T > 0.
    iterations: exactly this many (>= 1) column-then-row scalings; None iterates until the column error
    is below ``tol`` or ``max_iter`` iterations. Memory: two (N, K) float64 arrays.
    """
    s = np.asarray(scores)
    pi, n = _check(s, col_marginal, temperature)
    limit = _limits(iterations, max_iter)
    positive = pi > 0
    log_pi = _log(pi)

    # State: kernel = exp(S/T + f[:, None] + g[None, :]) and Q = diag(u) kernel diag(v). Two (N, K)
    # buffers in all: the kernel and a work array for the rare log-domain steps, swapped, never reallocated.
    work = np.empty(s.shape)

    def logits() -> np.ndarray:
        return np.divide(s, temperature, out=work)

    a = logits()
    top = a.max()
    if not (np.isfinite(top) and np.isfinite(a.min())):
        raise ValueError("scores must be finite")
    f = np.full(n, -top)
    g = np.zeros(s.shape[1])
    kernel = np.subtract(a, top, out=np.empty(s.shape))
    np.exp(kernel, out=kernel)
    u, v = np.ones(n), np.ones(s.shape[1])

    def column_log_step() -> None:
        """g <- log pi - LSE_i(S/T + f + log u): columns exact in log domain."""
        nonlocal f, g, u, v, kernel, work
        f = f + _log(u)
        b = logits()
        b += f[:, None]
        top = b.max(axis=0)
        b -= top
        np.exp(b, out=b)
        sums = b.sum(axis=0)
        scale = np.divide(pi, sums, out=np.zeros_like(pi), where=positive & (sums > 0))
        g = np.where(positive, log_pi - top - _log(sums), -np.inf)
        b *= scale
        kernel, work = b, kernel
        u, v = np.ones(n), np.ones(s.shape[1])

    def row_log_step() -> None:
        """f <- -log N - LSE_j(S/T + g + log v): rows exact in log domain."""
        nonlocal f, g, u, v, kernel, work
        g = g + _log(v)
        b = logits()
        b += g[None, :]
        top = b.max(axis=1)
        b -= top[:, None]
        np.exp(b, out=b)
        sums = b.sum(axis=1)
        f = -np.log(n) - top - np.log(sums)
        b /= (n * sums)[:, None]
        kernel, work = b, kernel
        u, v = np.ones(n), np.ones(s.shape[1])

    def absorb() -> None:
        """Fold u, v into f, g and recompute the kernel from the scores."""
        nonlocal f, g, u, v, kernel, work
        f = f + _log(u)
        g = g + _log(v)
        b = logits()
        b += f[:, None]
        b += g[None, :]
        np.exp(b, out=b)
        kernel, work = b, kernel
        u, v = np.ones(n), np.ones(s.shape[1])

    col = kernel.T @ u  # column sums of the starting Q, up to a constant
    if np.isfinite(col).all() and (col[positive] >= TINY).all():
        errors = [_tv(col / col.sum(), pi)]
    else:  # underflow: the starting marginal in log domain
        b = logits()
        peak = b.max(axis=0)
        b -= peak
        np.exp(b, out=b)
        lc = peak + np.log(b.sum(axis=0))
        errors = [_tv(np.exp(lc - np.logaddexp.reduce(lc)), pi)]
        col = None
    done = 0
    while done < limit and (iterations is not None or done == 0 or errors[-1] >= tol):
        # Columns to pi.
        if col is not None and np.isfinite(col).all() and (col[positive] >= TINY).all():
            v = np.divide(pi, col, out=np.zeros_like(pi), where=positive)
        else:
            column_log_step()
        # Rows to 1/N.
        rows = kernel @ v
        if np.isfinite(rows).all() and (rows >= TINY).all():
            u = 1.0 / (n * rows)
        else:
            row_log_step()
        if max(np.abs(np.log(u)).max(), np.abs(_log(v[positive])).max()) > ABSORB:
            absorb()
        done += 1
        col = kernel.T @ u
        errors.append(_tv(v * col, pi))
    log_v = g + _log(v)
    np.multiply(kernel, (n * u)[:, None], out=kernel)
    kernel *= v[None, :]
    return SoftSinkhornResult(kernel, log_v, np.array(errors), bool(errors[-1] < tol), done, tol)


def soft_sinkhorn_kernel(scores_part: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """A part's cached kernel for the fast form of :func:`soft_sinkhorn_partial` and
    :func:`soft_sinkhorn_codes`: (E, m) with m_i = max_j S_ij / T (n,) and E = exp(S / T - m) (n, K),
    so every row of E has its largest entry 1. Costs one more (n, K) float64 array per part."""
    e = np.divide(np.asarray(scores_part), temperature, dtype=np.float64)
    m = e.max(axis=1) if e.shape[0] else np.zeros(0)
    e -= m[:, None]
    np.exp(e, out=e)
    return e, m


def _scaled(
    kernel: tuple[np.ndarray, np.ndarray], log_v: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float] | None:
    """v = exp(log_v - max log_v) and the row sums E v, or None when a row sum may have underflowed."""
    e, _ = kernel
    finite = np.isfinite(log_v)
    shift = float(log_v[finite].max())
    v = np.exp(log_v - shift)
    rows = e @ v
    if not (np.isfinite(rows).all() and (rows >= TINY).all()):
        return None
    return v, rows, shift


def soft_sinkhorn_partial(
    scores_part: np.ndarray,
    log_v: np.ndarray | None,
    temperature: float,
    *,
    kernel: tuple[np.ndarray, np.ndarray] | None = None,
    work: np.ndarray | None = None,
) -> np.ndarray:
    """The K-vector one part contributes per iteration: log column sums over its rows, shape (K,).

    log_v None (the start): LSE_i S_ij / T, the log column sums of exp(S/T). Otherwise
    log sum_i softmax(S_i / T + log_v)_j, the log column sums of the part's codes after the row step.
    Parts combine with ``np.logaddexp.reduce``. scores_part: (n, K); log_v: (K,). kernel: the part's
    :func:`soft_sinkhorn_kernel`, which turns an iteration into two matrix-vector products,
    col = v * E^T (1 / (E v)) with v = exp(log_v) (up to a constant), instead of a log-sum-exp over the
    part; a step whose sums may have underflowed falls back to log domain. work: optional (n, K) float64
    buffer for the log-domain form, reused across calls (a fresh large array costs page faults).
    """
    s = np.asarray(scores_part)
    if s.shape[0] == 0:
        return np.full(s.shape[1], -np.inf)
    if log_v is not None:
        log_v = np.asarray(log_v, dtype=np.float64)
        scaled = None if kernel is None else _scaled(kernel, log_v)
        if scaled is not None:
            v, rows, shift = scaled
            out = _log(v * (kernel[0].T @ (1.0 / rows)))
            log_norm = kernel[1] + shift + np.log(rows)  # log sum_j exp(S_ij / T + log_v_j)
            return _exact_small_columns(s, log_v, temperature, out, log_norm)
    b = np.divide(s, temperature, out=_buffer(work, s.shape))
    if log_v is None:
        top = b.max(axis=0)
        b -= top
        np.exp(b, out=b)
        return top + np.log(b.sum(axis=0))
    b += log_v[None, :]
    top = b.max(axis=1)
    b -= top[:, None]
    np.exp(b, out=b)
    rowsum = b.sum(axis=1)
    out = _log(b.T @ (1.0 / rowsum))
    return _exact_small_columns(s, log_v, temperature, out, top + np.log(rowsum))


def _exact_small_columns(
    s: np.ndarray, log_v: np.ndarray, temperature: float, out: np.ndarray, log_norm: np.ndarray
) -> np.ndarray:
    """Redo, by an exact log-sum-exp over the rows, the columns whose sum may have lost terms to
    underflow: log col_j = LSE_i(S_ij / T + log_v_j - log_norm_i)."""
    small = np.flatnonzero((out < np.log(TINY)) & np.isfinite(log_v))
    if small.size:
        sub = s[:, small] / temperature + log_v[small] - log_norm[:, None]
        peak = sub.max(axis=0)
        out[small] = peak + np.log(np.exp(sub - peak).sum(axis=0))
    return out


def _buffer(work: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if work is None:
        return np.empty(shape)
    if work.dtype != np.float64 or work.size < int(np.prod(shape)) or not work.flags.c_contiguous:
        raise ValueError(
            f"need a contiguous float64 buffer of at least {shape}, got {work.dtype} {work.shape}"
        )
    return work.reshape(-1)[: int(np.prod(shape))].reshape(shape)


def soft_sinkhorn_codes(
    scores: np.ndarray,
    log_v: np.ndarray,
    temperature: float,
    *,
    kernel: tuple[np.ndarray, np.ndarray] | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Codes of rows from the column potential: softmax(S_i / T + log_v), shape (n, K), rows sum to 1.
    kernel: the rows' :func:`soft_sinkhorn_kernel` (then E diag(v) / (E v)); out: (n, K) float64 target."""
    s = np.asarray(scores)
    log_v = np.asarray(log_v, dtype=np.float64)
    b = _buffer(out, s.shape)
    scaled = None if kernel is None or s.shape[0] == 0 else _scaled(kernel, log_v)
    if scaled is not None:
        v, rows, _ = scaled
        np.multiply(kernel[0], v[None, :], out=b)
        b /= rows[:, None]
        return b
    np.divide(s, temperature, out=b)
    b += log_v[None, :]
    b -= b.max(axis=1, keepdims=True)
    np.exp(b, out=b)
    b /= b.sum(axis=1, keepdims=True)
    return b


def soft_sinkhorn_driver(
    column_logsums: Callable[[np.ndarray | None], np.ndarray],
    n_rows: int,
    col_marginal: np.ndarray,
    temperature: float = 0.05,
    iterations: int | None = 3,
    *,
    tol: float = 1e-6,
    max_iter: int = 1000,
) -> SoftSinkhornResult:
    """Soft Sinkhorn on the column potential alone, given one reduction over all rows per iteration.

    column_logsums(log_v): :func:`soft_sinkhorn_partial` of every part, combined with
    ``np.logaddexp.reduce`` (a Ray layer calls its actors here). Iteration t: log_v <- log_v + log pi -
    log(col / N), col the column sums of the codes (the first from u constant: log_v = log pi - LSE_i S/T).
    Returns codes None and log_v; each part then writes :func:`soft_sinkhorn_codes`.
    """
    pi = _check_marginal(col_marginal, len(np.asarray(col_marginal)), temperature)
    limit = _limits(iterations, max_iter)
    positive = pi > 0
    log_pi = _log(pi)
    lc = np.asarray(column_logsums(None), dtype=np.float64)
    errors = [_tv(np.exp(lc - np.logaddexp.reduce(lc)), pi)]
    log_v = np.where(positive, log_pi - lc, -np.inf)
    done = 0
    while True:
        done += 1
        log_col = np.asarray(column_logsums(log_v), dtype=np.float64) - np.log(n_rows)
        errors.append(_tv(np.exp(log_col), pi))
        if done >= limit or (iterations is None and errors[-1] < tol):
            break
        log_v[positive] += log_pi[positive] - log_col[positive]
    return SoftSinkhornResult(None, log_v, np.array(errors), bool(errors[-1] < tol), done, tol)


def soft_sinkhorn_parts(
    parts_scores: Sequence[np.ndarray],
    col_marginal: np.ndarray,
    temperature: float = 0.05,
    iterations: int | None = 3,
    *,
    tol: float = 1e-6,
    max_iter: int = 1000,
    cache_kernels: bool = True,
) -> SoftSinkhornResult:
    """Reference for the distributed form: rows split into parts (n_i, K), one reduction per iteration.

    Equal to :func:`soft_sinkhorn` on the stacked rows (to rounding), whatever the split; codes are
    stacked in part order. cache_kernels: each part keeps its :func:`soft_sinkhorn_kernel` (two
    matrix-vector products per iteration, one more (n_i, K) array) instead of a log-sum-exp per iteration.
    """
    parts = [np.asarray(p) for p in parts_scores]
    n_rows = sum(p.shape[0] for p in parts)
    if n_rows == 0 or any(p.ndim != 2 for p in parts):
        raise ValueError("parts must be (n_i, K) matrices with at least one row in all")

    work = np.empty(max(p.size for p in parts))
    kernels = [soft_sinkhorn_kernel(p, temperature) if cache_kernels else None for p in parts]

    def column_logsums(log_v: np.ndarray | None) -> np.ndarray:
        sums = [
            soft_sinkhorn_partial(p, log_v, temperature, kernel=kern, work=work)
            for p, kern in zip(parts, kernels, strict=True)
        ]
        return np.logaddexp.reduce(sums, axis=0)

    result = soft_sinkhorn_driver(
        column_logsums, n_rows, col_marginal, temperature, iterations, tol=tol, max_iter=max_iter
    )
    result.codes = np.empty((n_rows, parts[0].shape[1]))
    start = 0
    for p, kern in zip(parts, kernels, strict=True):
        rows = result.codes[start : start + p.shape[0]]
        soft_sinkhorn_codes(p, result.log_v, temperature, kernel=kern, out=rows)
        start += p.shape[0]
    return result


@torch.no_grad()
def sinkhorn_knopp_torch(
    scores: torch.Tensor, col_marginal: torch.Tensor, temperature: float = 0.05, iterations: int = 3
) -> torch.Tensor:
    """Soft Sinkhorn codes in torch (no gradient), on the scores' device: (N, K), rows sum to 1.

    Computed and returned in ``promote_types(scores.dtype, float32)``: float32 for bf16 / fp16 scores (in
    their own dtype the log-sum-exps lose the codes: errors of 0.7-0.8 vs float64 on GH shapes), float64 for
    float64 scores.

    The same iteration as :func:`soft_sinkhorn` with a fixed number (>= 1) of iterations, in log domain
    (stable for any scores): log_v = log pi - LSE_i S/T; then iterations - 1 times
    log_u = -LSE_j(S/T + log_v), log_v = log pi - LSE_i(S/T + log_u); codes = softmax(S/T + log_v).
    GH: temperature 0.05, 300 iterations; SwAV: epsilon 0.05, 3 iterations (uniform col_marginal).
    col_marginal: (K,) non-negative, normalised here.
    """
    if scores.ndim != 2 or iterations < 1 or not temperature > 0:
        raise ValueError(f"need (N, K) scores, iterations >= 1, temperature > 0; got {tuple(scores.shape)}")
    logits = scores.to(torch.promote_types(scores.dtype, torch.float32)) / temperature
    pi = torch.as_tensor(col_marginal, dtype=logits.dtype, device=logits.device)
    if pi.shape != (scores.shape[1],) or (pi < 0).any() or pi.sum() <= 0:
        raise ValueError(f"col_marginal must be non-negative with shape ({scores.shape[1]},)")
    log_pi = torch.log(pi / pi.sum())
    log_v = log_pi - torch.logsumexp(logits, dim=0)
    for _ in range(iterations - 1):
        log_u = -torch.logsumexp(logits + log_v, dim=1, keepdim=True)
        log_v = log_pi - torch.logsumexp(logits + log_u, dim=0)
    return torch.softmax(logits + log_v, dim=1)


def top_k_codes(codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest entries of each row of codes (N, K): indices (N, k) int32 and values (N, k) float32,
    by decreasing value (ties by increasing index; which of several equal values at the k-th place is kept
    is unspecified). Values are not renormalised: a row's kept values sum to at most 1."""
    c = np.asarray(codes)
    if c.ndim != 2 or not 1 <= k <= c.shape[1]:
        raise ValueError(f"need (N, K) codes and 1 <= k <= K, got shape {c.shape} and k={k}")
    idx = np.argpartition(-c, k - 1, axis=1)[:, :k] if k < c.shape[1] else np.tile(np.arange(k), (len(c), 1))
    vals = np.take_along_axis(c, idx, axis=1)
    order = np.lexsort((idx, -vals), axis=1)
    idx = np.take_along_axis(idx, order, axis=1)
    return idx.astype(np.int32), np.take_along_axis(vals, order, axis=1).astype(np.float32)
