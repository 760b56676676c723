"""Per-group covariance spectra, spectral imbalance scores and spectral diagnostics of a joint measure.

Streaming: :class:`GroupMoments` keeps, per group g, the weight sum W_g, the weighted mean and the scatter
M2_g = sum_i w_i (x_i - mean_g)(x_i - mean_g)^T, built from a batch with one GEMM per group and merged
exactly (Chan et al. 1979; Pebay 2008), so shards reduce in any tree order. Memory is O(G d^2); when that
is over budget, :class:`GroupSample` keeps a uniform bottom-r sample of rows per group instead (O(G r d)).

Scores (Kaushik et al. 2024 in spirit; the definitions are rebalance's own, see docs/spectra.md): from the
eigenvalues lambda_g,1 >= ... >= lambda_g,d of each group's covariance, the q-quantile eigenvalue
Q_g(q) = lambda_g,ceil(q d), the spectral quantile score SQS_g(q) = Q_g(q) / median_h Q_h(q), the trace,
the top-eigenvalue share lambda_g,1 / trace and the effective rank exp(entropy(lambda_g / sum lambda_g)).

Joint measure (Liu et al. 2024): the singular values 1 = s_1 >= s_2 >= ... of D_a^(-1/2) C D_b^(-1/2) for
a joint table C with marginals D_a, D_b, and the variance of k-pass balanced estimators they govern.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "GroupMoments",
    "GroupSample",
    "group_spectra",
    "effective_rank",
    "top_eigenvalue_share",
    "quantile_eigenvalue",
    "spectral_scores",
    "joint_singular_values",
    "balanced_variance_factor",
    "balanced_variance",
]


def _check_batch(
    x: np.ndarray, groups: np.ndarray, n_groups: int, weights: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.asarray(x)
    groups = np.asarray(groups)
    if x.ndim != 2 or groups.shape != (x.shape[0],):
        raise ValueError(f"x {x.shape} must be (n, d) and groups {groups.shape} must be (n,)")
    if groups.size and not np.issubdtype(groups.dtype, np.integer):
        raise ValueError(f"groups must be integers, got {groups.dtype}")
    groups = groups.astype(np.int64, copy=False)
    if groups.size and (groups.min() < 0 or groups.max() >= n_groups):
        raise ValueError(f"groups must lie in [0, {n_groups})")
    if not np.isfinite(x).all():
        raise ValueError("x must be finite")
    if weights is None:
        w = np.ones(x.shape[0])
    else:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != groups.shape or not np.isfinite(w).all() or (w < 0).any():
            raise ValueError(f"weights {w.shape} must be (n,), finite and non-negative")
    return x, groups, w


def _group_slices(groups: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Row order sorting ``groups`` (stable) and the bounds of each group in it, shape (G + 1,)."""
    order = np.argsort(groups, kind="stable")
    return order, np.searchsorted(groups[order], np.arange(n_groups + 1))


@dataclass
class GroupMoments:
    """Weighted first and second moments of G groups of d-dimensional rows, mergeable across shards.

    weight: (G,) float64 weight sum W_g = sum_i w_i (the row count when unweighted).
    count: (G,) int64 rows with w_i > 0 (how many distinct rows the moments rest on).
    mean: (G, d) float64 weighted mean, sum_i w_i x_i / W_g (0 for an empty group).
    m2: (G, d, d) float64 scatter, sum_i w_i (x_i - mean_g)(x_i - mean_g)^T.

    Memory: G d^2 8 bytes for m2 (a 512-dimensional group is 2 MiB; see :meth:`nbytes_for`); above a budget
    use :class:`GroupSample`. Weights are frequency weights (a row of weight 2 counts as two rows).
    """

    weight: np.ndarray
    count: np.ndarray
    mean: np.ndarray
    m2: np.ndarray

    @staticmethod
    def nbytes_for(n_groups: int, d: int) -> int:
        """Bytes the scatter matrices of ``n_groups`` groups in ``d`` dimensions take: G d^2 8."""
        return n_groups * d * d * 8

    @classmethod
    def zeros(cls, n_groups: int, d: int) -> GroupMoments:
        """Moments of G empty groups (the identity of :meth:`merge`)."""
        return cls(
            np.zeros(n_groups),
            np.zeros(n_groups, np.int64),
            np.zeros((n_groups, d)),
            np.zeros((n_groups, d, d)),
        )

    @classmethod
    def from_batch(
        cls, x: np.ndarray, groups: np.ndarray, n_groups: int, weights: np.ndarray | None = None
    ) -> GroupMoments:
        """Moments of a batch: x (n, d) rows, groups (n,) ints in [0, G), weights (n,) >= 0 or None (all 1).

        Per group present: mean = w^T X_g / W_g, then M2 = (w * X_c)^T X_c on the centred rows X_c
        (two passes over the group's rows, float64, one GEMM), symmetrised.
        """
        x, groups, w = _check_batch(x, groups, n_groups, weights)
        out = cls.zeros(n_groups, x.shape[1])
        out.count[:] = np.bincount(groups, weights=w > 0, minlength=n_groups).astype(np.int64)
        order, bounds = _group_slices(groups, n_groups)
        for g in np.flatnonzero(np.diff(bounds)):
            rows = order[bounds[g] : bounds[g + 1]]
            wg = w[rows]
            total = wg.sum()
            if total <= 0:
                continue
            xg = x[rows].astype(np.float64)
            mean = (wg @ xg) / total
            xc = xg - mean
            m2 = (xc.T * wg) @ xc if weights is not None else xc.T @ xc
            out.weight[g], out.mean[g], out.m2[g] = total, mean, 0.5 * (m2 + m2.T)
        return out

    def merge(self, other: GroupMoments) -> GroupMoments:
        """Moments of the union of two disjoint sets of rows (Chan et al.; Pebay 2008, weighted form).

        W = W_a + W_b, delta = mean_b - mean_a, mean = mean_a + delta W_b / W,
        M2 = M2_a + M2_b + delta delta^T W_a W_b / W. Associative and commutative up to rounding.
        """
        if self.m2.shape != other.m2.shape:
            raise ValueError(f"cannot merge moments of shapes {self.m2.shape} and {other.m2.shape}")
        total = self.weight + other.weight
        share_b = np.divide(other.weight, total, out=np.zeros_like(total), where=total > 0)
        delta = other.mean - self.mean
        mean = self.mean + delta * share_b[:, None]
        cross = self.weight * share_b  # W_a W_b / W
        m2 = self.m2 + other.m2 + cross[:, None, None] * (delta[:, :, None] * delta[:, None, :])
        return GroupMoments(total, self.count + other.count, mean, m2)

    @property
    def valid(self) -> np.ndarray:
        """(G,) bool: the group rests on at least 2 rows, so its covariance is informative."""
        return self.count >= 2

    def covariance(self, unbiased: bool = False) -> np.ndarray:
        """(G, d, d) covariance M2_g / W_g, or M2_g / (W_g - 1) when ``unbiased`` (frequency weights).

        A group with W_g <= 0 (or W_g <= 1 when unbiased) gets a zero matrix, never NaN.
        """
        denom = self.weight - (1.0 if unbiased else 0.0)
        scale = np.divide(1.0, denom, out=np.zeros_like(denom), where=denom > 0)
        return self.m2 * scale[:, None, None]

    def spectra(self, top: int | None = None, unbiased: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Eigenvalues (G, d or top), descending, and traces (G,) of each group's covariance
        (:func:`group_spectra` of :meth:`covariance`)."""
        return group_spectra(self.covariance(unbiased), top)


@dataclass
class GroupSample:
    """Bounded-memory fallback for :class:`GroupMoments`: per group, the r rows of smallest priority.

    With priorities u_i i.i.d. uniform (``rebalance.kernels.sampling.key_priorities`` of the row keys, so
    independent of sharding), the kept rows of a group are a uniform sample without replacement of size
    min(r, rows of the group), and merging two samples (keep the r smallest of the union) gives exactly the
    sample of the union: associative and commutative. The covariance is the weighted covariance of the
    sample (exact when a group has at most r rows; a ratio estimator otherwise). Memory: G r (d + 2) 8 bytes.

    rows: (G, r, d) float64; weights: (G, r) float64; priorities: (G, r) float64, +inf in empty slots,
    each group's slots sorted by priority.
    """

    rows: np.ndarray
    weights: np.ndarray
    priorities: np.ndarray

    @staticmethod
    def rows_for_budget(n_groups: int, d: int, budget_bytes: int) -> int:
        """The largest r whose sample fits ``budget_bytes``: floor(budget / (G (d + 2) 8))."""
        return int(budget_bytes // (n_groups * (d + 2) * 8))

    @classmethod
    def from_batch(
        cls,
        x: np.ndarray,
        groups: np.ndarray,
        n_groups: int,
        r: int,
        priorities: np.ndarray,
        weights: np.ndarray | None = None,
    ) -> GroupSample:
        """Keep, per group, the ``r`` rows of x (n, d) with the smallest priorities (n,) in [0, 1).

        Rows of weight 0 are never kept (they would not change the covariance).
        """
        x, groups, w = _check_batch(x, groups, n_groups, weights)
        u = np.asarray(priorities, dtype=np.float64)
        if u.shape != groups.shape or np.isnan(u).any():
            raise ValueError(f"priorities {u.shape} must be (n,) and not NaN")
        if r < 1:
            raise ValueError(f"r must be >= 1, got {r}")
        out = cls(
            np.zeros((n_groups, r, x.shape[1])), np.zeros((n_groups, r)), np.full((n_groups, r), np.inf)
        )
        keep = np.flatnonzero(w > 0)
        order = keep[np.lexsort((keep, u[keep], groups[keep]))]  # by group, then priority, then index
        g = groups[order]
        rank = np.arange(order.size) - np.searchsorted(g, g)  # position within its group
        sel = rank < r
        order, g, rank = order[sel], g[sel], rank[sel]
        out.rows[g, rank] = x[order]
        out.weights[g, rank] = w[order]
        out.priorities[g, rank] = u[order]
        return out

    def merge(self, other: GroupSample) -> GroupSample:
        """The r smallest-priority rows of each group in the union of two samples."""
        if self.rows.shape != other.rows.shape:
            raise ValueError(f"cannot merge samples of shapes {self.rows.shape} and {other.rows.shape}")
        r = self.rows.shape[1]
        u = np.concatenate([self.priorities, other.priorities], axis=1)
        pick = np.argsort(u, axis=1, kind="stable")[:, :r]
        rows = np.concatenate([self.rows, other.rows], axis=1)
        weights = np.concatenate([self.weights, other.weights], axis=1)
        return GroupSample(
            np.take_along_axis(rows, pick[:, :, None], axis=1),
            np.take_along_axis(weights, pick, axis=1),
            np.take_along_axis(u, pick, axis=1),
        )

    @property
    def count(self) -> np.ndarray:
        """(G,) rows kept per group."""
        return np.isfinite(self.priorities).sum(axis=1)

    @property
    def valid(self) -> np.ndarray:
        """(G,) bool: at least 2 rows kept, so the sample covariance is informative."""
        return self.count >= 2

    def moments(self) -> GroupMoments:
        """Exact :class:`GroupMoments` of the kept rows (O(G d^2) memory: for small G or tests)."""
        g, j = np.nonzero(np.isfinite(self.priorities))
        return GroupMoments.from_batch(self.rows[g, j], g, self.rows.shape[0], self.weights[g, j])

    def spectra(self, top: int | None = None, unbiased: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Eigenvalues (G, d or top), descending, and traces (G,) of each group's sample covariance.

        Computed group by group from the singular values s of sqrt(w / W) (X_g - mean_g) (r x d, never a
        d x d matrix): lambda = s^2 (times W / (W - 1) when ``unbiased``), padded with zeros to d.
        """
        n_groups, _, d = self.rows.shape
        k = d if top is None else min(top, d)
        eigs, traces = np.zeros((n_groups, k)), np.zeros(n_groups)
        for g in range(n_groups):
            live = np.isfinite(self.priorities[g])
            w = self.weights[g, live]
            total = w.sum()
            denom = total - (1.0 if unbiased else 0.0)
            if live.sum() < 2 or denom <= 0:
                continue
            xg = self.rows[g, live]
            xc = (xg - (w @ xg) / total) * np.sqrt(w / denom)[:, None]
            s2 = np.linalg.svd(xc, compute_uv=False) ** 2
            eigs[g, : min(k, s2.size)] = s2[:k]
            traces[g] = s2.sum()
        return eigs, traces


def group_spectra(cov: np.ndarray, top: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (G, d or top), descending, and traces (G,) of a stack of covariances cov (G, d, d).

    Batched ``numpy.linalg.eigvalsh`` in float64; rounding-level negative eigenvalues are clipped to 0.
    The trace is that of the matrix (all d eigenvalues), also when only ``top`` are returned.
    """
    cov = np.asarray(cov, dtype=np.float64)
    if cov.ndim != 3 or cov.shape[1] != cov.shape[2]:
        raise ValueError(f"cov {cov.shape} must be (G, d, d)")
    eigs = np.linalg.eigvalsh(cov)[:, ::-1]
    if top is not None:
        eigs = eigs[:, :top]
    return np.clip(eigs, 0.0, None), np.einsum("gii->g", cov)


def effective_rank(eigs: np.ndarray) -> np.ndarray:
    """exp(entropy(p)) with p = lambda / sum lambda per row of eigs (G, k), 0 log 0 = 0; shape (G,).

    Between 1 (one non-zero eigenvalue) and k (a flat spectrum); 0 for an all-zero row.
    """
    lam = np.clip(np.asarray(eigs, dtype=np.float64), 0.0, None)
    total = lam.sum(axis=-1, keepdims=True)
    p = np.divide(lam, total, out=np.zeros_like(lam), where=total > 0)
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return np.where(total[..., 0] > 0, np.exp(-plogp.sum(axis=-1)), 0.0)


def top_eigenvalue_share(eigs: np.ndarray, traces: np.ndarray) -> np.ndarray:
    """lambda_1 / trace per group, shape (G,); 0 where the trace is 0."""
    lam1 = np.asarray(eigs, dtype=np.float64)[:, 0]
    traces = np.asarray(traces, dtype=np.float64)
    return np.divide(lam1, traces, out=np.zeros_like(traces), where=traces > 0)


def quantile_eigenvalue(eigs: np.ndarray, q: float = 0.5, dim: int | None = None) -> np.ndarray:
    """Q_g(q) = lambda_g,ceil(q d) (1-based, eigenvalues descending) per group, shape (G,).

    d is ``dim`` (default eigs.shape[1]); eigs may hold only the top eigenvalues if ceil(q d) of them.
    """
    eigs = np.asarray(eigs, dtype=np.float64)
    d = eigs.shape[1] if dim is None else dim
    if not 0 < q <= 1:
        raise ValueError(f"q must lie in (0, 1], got {q}")
    index = max(1, math.ceil(q * d))
    if index > eigs.shape[1]:
        raise ValueError(f"Q({q}) needs eigenvalue {index} of {d}, only {eigs.shape[1]} given")
    return eigs[:, index - 1]


def _summary(name: str, values: np.ndarray, valid: np.ndarray) -> dict[str, np.ndarray]:
    """spread = max / min (inf when min is 0 < max, 1 when all are 0), population std and argmax over the
    valid groups; 0, 0 and -1 when no group is valid."""
    v = values[valid]
    if v.size == 0:
        return {
            f"{name}_spread": np.float64(0.0),
            f"{name}_std": np.float64(0.0),
            f"{name}_argmax": np.int64(-1),
        }
    lo, hi = v.min(), v.max()
    spread = hi / lo if lo > 0 else (np.inf if hi > 0 else 1.0)
    return {
        f"{name}_spread": np.float64(spread),
        f"{name}_std": np.float64(v.std()),
        f"{name}_argmax": np.int64(np.flatnonzero(valid)[np.argmax(v)]),
    }


def spectral_scores(
    eigs: np.ndarray,
    traces: np.ndarray,
    q: float = 0.5,
    *,
    valid: np.ndarray | None = None,
    dim: int | None = None,
) -> dict[str, np.ndarray]:
    """Spectral imbalance scores of G groups from eigs (G, k) descending and traces (G,).

    Per group (G,): ``valid`` (the given mask, default all, and trace > 0), ``quantile`` Q_g(q) =
    lambda_g,ceil(q d), ``sqs`` SQS_g(q) = Q_g(q) / median over valid groups of Q(q), ``trace``,
    ``top_share`` lambda_1 / trace, ``effective_rank`` exp(entropy(lambda / sum lambda)) of the given
    eigenvalues (pass all d of them for the exact value). Invalid groups get 0 in every per-group array
    and are left out of the median and the summaries; SQS is 0 everywhere when that median is 0.
    Summaries over valid groups, for each of sqs, trace, top_share, effective_rank: ``<stat>_spread``
    (max / min; inf when min is 0 < max, 1 when all are 0), ``<stat>_std`` (population std), ``<stat>_argmax`` (group index, -1 if
    none); ``median_quantile`` and ``worst_group`` (= sqs_argmax).
    """
    eigs = np.asarray(eigs, dtype=np.float64)
    traces = np.asarray(traces, dtype=np.float64)
    if eigs.ndim != 2 or traces.shape != (eigs.shape[0],):
        raise ValueError(f"eigs {eigs.shape} must be (G, k) and traces {traces.shape} (G,)")
    ok = traces > 0
    if valid is not None:
        ok &= np.asarray(valid, dtype=bool)
    zero = np.zeros_like(traces)
    quantile = np.where(ok, quantile_eigenvalue(eigs, q, dim), 0.0)
    median = float(np.median(quantile[ok])) if ok.any() else 0.0
    out: dict[str, np.ndarray] = {
        "valid": ok,
        "quantile": quantile,
        "sqs": quantile / median if median > 0 else zero,
        "trace": np.where(ok, traces, 0.0),
        "top_share": np.where(ok, top_eigenvalue_share(eigs, traces), 0.0),
        "effective_rank": np.where(ok, effective_rank(eigs), 0.0),
    }
    for name in ("sqs", "trace", "top_share", "effective_rank"):
        out.update(_summary(name, out[name], ok))
    out["median_quantile"] = np.float64(median)
    out["worst_group"] = out["sqs_argmax"]
    return out


def _normalized_joint(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """C = counts / total with zero-mass rows and columns dropped, and its marginals."""
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 2 or not np.isfinite(c).all() or (c < 0).any() or c.sum() <= 0:
        raise ValueError("counts must be a finite, non-negative (A, B) table with positive total")
    c = c[c.sum(axis=1) > 0][:, c.sum(axis=0) > 0]
    c = c / c.sum()
    return c, c.sum(axis=1), c.sum(axis=0)


def joint_singular_values(counts: np.ndarray) -> np.ndarray:
    """Singular values, descending, of D_a^(-1/2) C D_b^(-1/2) for a joint table counts (A, B).

    C = counts / total, D_a, D_b the diagonal of its row and column sums; rows and columns with zero mass
    are dropped. s_1 = 1 always (the constant functions); s_2 is the largest correlation of a function of
    the row label with a function of the column label, which sets how fast balancing gains (Liu et al.).
    Shape (min(A', B'),) for the A' x B' table that remains.
    """
    c, pa, pb = _normalized_joint(counts)
    return np.linalg.svd(c / np.sqrt(np.outer(pa, pb)), compute_uv=False)


def balanced_variance_factor(s2: float | np.ndarray, k: int | np.ndarray) -> np.ndarray:
    """Worst-case excess asymptotic variance after k balancing passes, as a fraction of Var_P(h).

    Liu et al.: with the true marginals as targets, sqrt(n)(theta_k - theta) -> N(0, sigma_k^2), where
    sigma_k^2 = Var_P(T^k h), T = (I - mu_X)(I - mu_Y) (one pass = an X-step then a Y-step; mu the
    conditional-mean projections in L2(P)), and sigma_k^2 decreases to sigma_inf^2 = Var_P of h minus its
    L2(P) projection on {a(x) + b(y)}. By Kayalar-Weinert, ||T^k - T^inf|| = s_2^(2k - 1), so

        sup_h (sigma_k^2 - sigma_inf^2) / Var_P(h) = s_2^(4k - 2) for k >= 1, and 1 for k = 0,

    which is what this returns: per pass the excess falls by s_2^4 (s_2^2 per single X- or Y-step, the
    s_2^(2k) of the paper, which counts steps). The bound is attained in the 2 x 2 case.
    """
    s2 = np.asarray(s2, dtype=np.float64)
    k = np.asarray(k)
    if (k < 0).any() or (s2 < 0).any() or (s2 > 1 + 1e-12).any():
        raise ValueError("k must be >= 0 and s2 in [0, 1]")
    return np.where(k == 0, 1.0, s2 ** np.where(k == 0, 0, 4 * k - 2))


def balanced_variance(joint: np.ndarray, h: np.ndarray, k: int | None) -> float:
    """Asymptotic variance sigma_k^2 = Var_P(T^k h) of the k-pass balanced estimate of E_P[h].

    joint (A, B) the true measure P (normalised here; every row and column must have mass), h (A, B) the
    function on cells, k passes (X-step then Y-step, as ``ipf`` with targets [P_X, P_Y]); k = None gives
    the limit sigma_inf^2 = Var_P(h - a - b) with a(x) + b(y) the L2(P) projection of h. n Var(theta_k)
    tends to this as the sample size n grows.
    """
    p = np.asarray(joint, dtype=np.float64)
    h = np.asarray(h, dtype=np.float64)
    if p.ndim != 2 or h.shape != p.shape or (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"joint {p.shape} must be a non-negative (A, B) table and h the same shape")
    p = p / p.sum()
    pa, pb = p.sum(axis=1), p.sum(axis=0)
    if (pa <= 0).any() or (pb <= 0).any():
        raise ValueError("every row and column of joint needs positive mass")
    f = h - (p * h).sum()
    if k is None:
        a, b = p.shape
        design = np.concatenate(
            [np.repeat(np.eye(a), b, axis=0), np.tile(np.eye(b), (a, 1))], axis=1
        )  # cell (x, y) -> indicator of x and of y
        sw = np.sqrt(p.reshape(-1))
        coef = np.linalg.lstsq(design * sw[:, None], f.reshape(-1) * sw, rcond=None)[0]
        f = f - (design @ coef).reshape(p.shape)
    else:
        for _ in range(k):
            f = f - ((p * f).sum(axis=0) / pb)[None, :]  # I - mu_Y
            f = f - ((p * f).sum(axis=1) / pa)[:, None]  # I - mu_X
    return float((p * f * f).sum() - (p * f).sum() ** 2)
