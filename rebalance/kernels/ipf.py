"""Iterative proportional fitting (Sinkhorn scaling) of a measure on a table of label cells.

A measure q on cells c = (l_1, ..., l_M) (one categorical label per marginal) is balanced toward target
marginals t_1..t_M by cyclic KL projections: for marginal m, q_c <- q_c * t_m(l_m(c)) / q_m(l_m(c)), where
q_m is q's current m-th marginal. One *pass* applies the M projections in order; k passes give the k-step
balanced measure of Liu et al. (2024), and iterating to convergence gives the I-projection of the
empirical measure onto the set of measures with the target marginals, when it exists.

The marginal error of a pass is the total variation 0.5 * sum_l |q_m(l) - t_m(l)| of every marginal of
the normalised measure, measured after the pass (the last marginal of a plain pass is always exact).

Two paths compute the same iteration. The *cell path* (:func:`ipf`) runs on the table of distinct cells.
The *row path* (:func:`ipf_driver`, :func:`ipf_rows`) is for when that table is too large for one
process: rows stay split into parts (on actors), each part holding its rows' labels and masses; a step
multiplies every row's mass by the ratio of its label (:func:`apply_ratio`) and needs from every part only
the per-label sums of the next marginal (:func:`label_sums`), added across parts. The two are fused into
one pass over the part (:func:`apply_ratio_and_sum`), so a step reads the rows once. The driver keeps the
log factors, from which the result's :class:`~rebalance.kernels.scaling.Scaling` recomputes any row's
weight (a lost part, an unseen cell).
On the cell path with two marginals the table is a sparse K_0 x K_1 matrix N and a step is one sparse
matrix-vector product (q = diag(u) N diag(v): the sums of marginal 0 are u * (N v)), the Sinkhorn form.

Iterating to a tolerance (``iterations=None``) over-relaxes the projections by default: step m multiplies
by (t_m / q_m)^omega instead of t_m / q_m, the over-relaxed Sinkhorn of Thibault, Chizat, Dossal and
Papadakis (2017), which converges to the same I-projection and near it contracts at rate omega - 1
instead of plain IPF's rho (Lehmann, von Renesse, Sambale and Uschmajew 2021). ``omega="auto"`` runs plain
passes until rho can be read off the errors, sets the optimal omega = 2 / (1 + sqrt(1 - rho)) of
successive over-relaxation and re-estimates rho from the accelerated rate lambda by Young's relation
(lambda + omega - 1)^2 = lambda omega^2 rho (adaptive SOR, Hageman and Young), raising omega while the
rate says it is below the optimum; if the error stops improving it falls back to plain passes, which
converge from any scaling. A fixed number of passes (``iterations=k``) is always plain IPF: the k-step
measure is defined by the plain projections.

*Relaxed marginals* (``relax``: a strength rho_m >= 0 per marginal, None for an exact one) replace the
constraint q_m = t_m by a penalty: the result minimises KL(q || p) + sum_m rho_m KL(q_m || t_m) over
q = p * prod_m f_m(l_m) (generalised KL of unnormalised measures; the soft-marginal / unbalanced problem of
Chizat, Peyre, Schmitzer and Vialard 2018 and Frogner et al. 2015), which always has a solution. Step m
*sets* the factor f_m = (t_m / r_m)^(rho_m / (1 + rho_m)), r_m the m-th marginal of p * prod_{m' != m}
f_m' (the current marginal divided by the old f_m), so its ratio to the old factor is
(t_m / q_m)^a f_m^(a - 1), a = rho_m / (1 + rho_m). (Multiplying (t_m / q_m)^a onto the accumulated
factors instead would converge to the exact problem.) rho -> inf is an exact projection (a = 1), rho = 0
leaves f_m = 1. At the solution log f_m = rho_m (log t_m - log q_m). Passes with a relaxed marginal are
never over-relaxed. The stopping rule measures, per marginal, the total variation between its marginal
right after its own step and at the end of the pass (both over the end-of-pass total): for an exact
marginal that is the error to t_m, for a relaxed one the fixed-point residual; ``errors`` always reports
the distance to the targets, which a relaxed marginal keeps by design.

*Bounded weights* (``bounds``: lo <= q_c / p_c <= hi, cell path only) make the box a constraint of the
projection: the weight is clip(exp(sum_m log f_m), lo, hi), the truncated-exponential calibration of
Deville and Sarndal (1992), found by block-coordinate ascent on the dual with one exact monotone 1-D solve
per label (:func:`ipf_bounded`, where the math is).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import scipy.sparse

from rebalance.kernels.scaling import Scaling

Omega = float | Literal["auto"]
"""Over-relaxation of the projections: a factor in [1, 2) (1 = plain IPF) or ``"auto"``."""

__all__ = [
    "BoundsError",
    "IPFResult",
    "MissingMassError",
    "Omega",
    "Relaxation",
    "clip_scale",
    "clip_weights",
    "ess",
    "ipf",
    "ipf_bounded",
    "apply_ratio",
    "apply_ratio_and_sum",
    "ipf_driver",
    "ipf_rows",
    "label_sums",
    "marginal_errors",
    "prepare_codes",
    "strongest_within",
]


class MissingMassError(ValueError):
    """A target puts positive mass on a label that no cell carries: no scaling can meet it."""

    def __init__(self, marginal: int, labels: np.ndarray):
        self.marginal = marginal
        self.labels = labels
        super().__init__(f"marginal {marginal}: positive target on labels with no mass: {labels.tolist()}")


@dataclass
class IPFResult:
    """The scaling an IPF found and the trace of the iteration; both paths return it.

    scaling: the per-label log factors (M arrays (K_m,), -inf where the target is 0) and log normaliser,
    such that the weight (mean 1 over all rows) of a row or cell with labels l, seen or not, is
    exp(sum_m log_factors[m][l_m] - log_normalizer) (:class:`~rebalance.kernels.scaling.Scaling`).
    errors: (passes + 1, M) total-variation error per marginal, row 0 before any pass. converged: the
    largest final error is below ``tol``. worst: per marginal the labels farthest from their target and
    their gaps. omegas: (passes,) over-relaxation of each pass (1 = plain IPF). mass: (C,) the balanced
    measure on the cells, summing to 1 (from :func:`ipf`; None from the row path). weights: one (n_i,)
    array of row weights per part (from :func:`ipf_rows`; empty otherwise, the parts living elsewhere).
    """

    scaling: Scaling
    errors: np.ndarray
    converged: bool
    passes: int
    tol: float
    worst: list[dict] = field(default_factory=list)
    omegas: np.ndarray = field(default_factory=lambda: np.ones(0))
    mass: np.ndarray | None = None
    weights: list[np.ndarray] = field(default_factory=list)

    @property
    def log_factors(self) -> tuple[np.ndarray, ...]:
        return self.scaling.log_factors

    @property
    def log_normalizer(self) -> float:
        return self.scaling.log_normalizer

    @property
    def final_error(self) -> float:
        """The largest marginal error after the last pass."""
        return float(self.errors[-1].max())


def marginal_errors(codes: np.ndarray, mass: np.ndarray, targets: Sequence[np.ndarray]) -> np.ndarray:
    """Total-variation error 0.5 * ||q_m - t_m||_1 of each marginal m of ``mass``; shape (M,)."""
    return np.array(
        [
            0.5 * np.abs(np.bincount(codes[:, m], weights=mass, minlength=t.size) - t).sum()
            for m, t in enumerate(targets)
        ]
    )


def ipf(
    codes: np.ndarray,
    mass: np.ndarray,
    targets: Sequence[np.ndarray],
    *,
    iterations: int | None = None,
    tol: float = 1e-6,
    max_iter: int = 1000,
    omega: Omega = "auto",
    relax: Sequence[float | None] | None = None,
    bounds: tuple[float, float | None] | None = None,
    offset: np.ndarray | None = None,
    init: Scaling | None = None,
) -> IPFResult:
    """Balance ``mass`` on cells toward ``targets``.

    codes: (C, M) integer labels of each cell, codes[:, m] in [0, K_m). mass: (C,) non-negative initial
    measure (normalised here). targets: M arrays of shape (K_m,), each summing to 1.
    iterations: run exactly this many plain passes; None runs until the largest marginal error is below
    ``tol`` or ``max_iter`` passes, over-relaxed by ``omega`` (module docstring). relax: per marginal a
    strength rho >= 0 (a relaxed marginal) or None (exact); None for all exact. Raises
    :class:`MissingMassError` when an exact target is positive on a label whose cells have no mass. The iteration
    is :func:`ipf_driver`'s, with the cell table as the one part (a sparse matrix when M = 2).
    bounds: (lo, hi), 0 <= lo < 1 < hi (hi None: no upper bound): every cell's weight q_c / p_c stays in
    [lo, hi] (:func:`ipf_bounded`, which runs instead; never over-relaxed); offset: with bounds, a fixed
    log factor per cell (C,) inside the clip (a fixed marginal: ``dup_group``). init: start from these log
    factors instead of from the data (a warm start: the solution of a nearby problem); a fixed number of
    ``iterations`` then counts from there.
    """
    codes = np.asarray(codes, dtype=np.int64)
    q = np.asarray(mass, dtype=np.float64)
    if codes.ndim != 2 or codes.shape[0] != q.shape[0] or codes.shape[1] != len(targets):
        raise ValueError(f"codes {codes.shape} must be (C, M) with C = len(mass) and M = len(targets)")
    if (q < 0).any() or not np.isfinite(q).all() or q.sum() <= 0:
        raise ValueError("mass must be finite, non-negative and not all zero")
    targets = [np.asarray(t, dtype=np.float64) for t in targets]
    for m, t in enumerate(targets):
        if codes.size and (codes[:, m].min() < 0 or codes[:, m].max() >= t.size):
            raise ValueError(f"codes of marginal {m} must lie in [0, {t.size})")
    q = q / q.sum()
    shared = {"iterations": iterations, "tol": tol, "max_iter": max_iter, "relax": relax, "init": init}
    if bounds is not None:
        return ipf_bounded(codes, q, targets, bounds, offset=offset, **shared)
    if offset is not None:
        raise ValueError("offset is the fixed log factor inside the bounds: only with bounds")
    cells = _PairCells(codes, q, targets) if len(targets) == 2 else _Cells(codes, q, targets)
    result = ipf_driver(cells.step, cells.counts, targets, omega=omega, **shared)
    balanced = cells.mass()
    result.mass = balanced / balanced.sum()
    return result


class _Cells:
    """The cell table as one row-path part: cells are rows weighted by their mass (any M). Takes ``mass``
    as its state and scales it in place."""

    def __init__(self, codes: np.ndarray, mass: np.ndarray, targets: Sequence[np.ndarray]):
        self.codes = prepare_codes(codes)
        self.weights = mass
        self.sizes = [t.size for t in targets]
        self.counts = [label_sums(self.codes, mass, m, k) for m, k in enumerate(self.sizes)]

    def step(self, m: int | None, ratio: np.ndarray | None, next_m: int) -> np.ndarray:
        return apply_ratio_and_sum(self.codes, self.weights, m, ratio, next_m, self.sizes[next_m])

    def mass(self) -> np.ndarray:
        return self.weights


class _PairCells:
    """Two marginals: the cell table as a sparse K_0 x K_1 matrix N and the measure as diag(u) N diag(v).

    A step scales u (or v) by the ratio and returns v * (N^T u) (or u * (N v)): one sparse
    matrix-vector product over the C cells instead of a gather and a bincount. When the iteration drives
    a factor outside [1e-100, 1e100] (cells balanced toward zero, or targets that cannot be met), the
    factors are folded into N (N <- diag(u) N diag(v), u = v = 1), so no product is ever inf * 0.
    """

    LIMIT = 1e100

    def __init__(self, codes: np.ndarray, mass: np.ndarray, targets: Sequence[np.ndarray]):
        self.codes = codes
        self.shape = (targets[0].size, targets[1].size)
        self._fold(mass)
        self.counts = [self.table @ self.factors[1], self.table_t @ self.factors[0]]

    def _fold(self, mass: np.ndarray) -> None:
        self.initial = mass
        self.table = scipy.sparse.csr_array((mass, (self.codes[:, 0], self.codes[:, 1])), shape=self.shape)
        self.table_t = self.table.T.tocsr()
        self.factors = [np.ones(self.shape[0]), np.ones(self.shape[1])]

    def step(self, m: int | None, ratio: np.ndarray | None, next_m: int) -> np.ndarray:
        if m is not None:
            self.factors[m] *= ratio
            positive = self.factors[m][self.factors[m] > 0]
            if positive.size and (positive.max() > self.LIMIT or positive.min() < 1 / self.LIMIT):
                self._fold(self.mass())
        u, v = self.factors
        return u * (self.table @ v) if next_m == 0 else v * (self.table_t @ u)

    def mass(self) -> np.ndarray:
        u, v = self.factors
        return self.initial * u[self.codes[:, 0]] * v[self.codes[:, 1]]


# ------------------------------------------------------------------------------------------ bounded weights


class BoundsError(ValueError):
    """Exact targets that no weighting within the bounds can meet: t(l) outside [lo p(l), hi p(l)]."""

    def __init__(
        self, marginal: int, labels: np.ndarray, needed: np.ndarray, bounds: tuple[float, float | None]
    ):
        self.marginal = marginal
        self.labels = labels
        self.needed = needed
        self.bounds = bounds
        super().__init__(
            f"marginal {marginal}: labels {labels.tolist()[:20]} need mean weights {needed.tolist()[:20]}, "
            f"outside the bounds [{bounds[0]}, {bounds[1]}]"
        )


def ipf_bounded(
    codes: np.ndarray,
    mass: np.ndarray,
    targets: Sequence[np.ndarray],
    bounds: tuple[float, float | None],
    *,
    offset: np.ndarray | None = None,
    iterations: int | None = None,
    tol: float = 1e-6,
    max_iter: int = 1000,
    relax: Sequence[float | None] | None = None,
    init: Scaling | None = None,
) -> IPFResult:
    """Balance ``mass`` (p, summing to 1) on cells with every weight q_c / p_c in [lo, hi].

    The weight of cell c is w_c = clip(exp(u_c), lo, hi), u_c = o_c + log f_T + sum_m log f_m(l_m(c))
    (o = ``offset``, 0 without): the truncated-exponential calibration function of Deville and Sarndal
    (1992) (R ``survey::calibrate(calfun="raking", bounds=)``). It solves

        min_q  sum_c q_c log(q_c / p_c) - q_c + p_c  +  sum_{m relaxed} rho_m KL(q_m || t_m)
        s.t.   q_m = t_m (m exact),  lo p_c <= q_c <= hi p_c,  sum_c q_c = 1 (with a relaxed marginal),

    whose dual is concave in the log factors; this is block-coordinate ascent on it. A block is one
    marginal: for each label l it solves one monotone equation in y = log f_m(l), with
    S_l(y) = sum_{c in l} p_c clip(exp(y + v_c), lo, hi) (v_c: u_c without the label's factor):
    exact, S_l(y) = t_l; relaxed, y / rho + log S_l(y) = log t_l (without an active bound S_l = e^y r_l and
    this is the unbounded relaxed step y = a (log t_l - log r_l), a = rho / (1 + rho)). With a relaxed
    marginal the weights' total is no longer fixed by a target, so one more block, the single label "all
    cells" with the exact target 1 (the factor f_T, recorded as the normaliser L = -log f_T), keeps the
    weights relative to the mean (mean 1 after every pass). Without bounds the unbounded solution's
    normalised weights solve this constrained problem too, so inactive bounds give :func:`ipf`'s weights.
    S_l is piecewise linear in e^y: each label is solved by an active-set Newton iteration on all labels at
    once (:func:`_solve_labels`), exact once the set of clipped cells stops changing.

    codes: (C, M); mass: (C,) summing to 1; targets: M arrays (K_m,) summing to 1; bounds: (lo, hi),
    0 <= lo < 1 < hi, hi None for none. An exact label with t_l outside [lo p_l, hi p_l] (p_l its data
    share) is a :class:`BoundsError` naming the labels and the mean weight t_l / p_l each needs, as is a
    relaxed label with target 0 on cells with mass when lo > 0; a positive exact target on no mass a
    :class:`MissingMassError`. Errors and stopping as in :func:`ipf` (relaxed: the fixed-point residual);
    passes are never over-relaxed. The returned scaling holds bounds, log factors and L, not ``offset``
    (the caller's fixed factor): its weights are clip(exp(o_c + sum_m log f_m - L), lo, hi).
    """
    lo, hi = _check_bounds(bounds)
    p = np.asarray(mass, dtype=np.float64)
    n_marginals = len(targets)
    offset = np.zeros(p.size) if offset is None else np.asarray(offset, dtype=np.float64)
    if offset.shape != p.shape or np.isnan(offset).any() or (offset == np.inf).any():
        raise ValueError(f"offset must be ({p.size},) log factors, finite or -inf")
    exponents = _relax_exponents(relax, n_marginals)
    rhos = [None if a == 1.0 else a / (1.0 - a) for a in exponents]
    shares = [np.bincount(codes[:, m], weights=p, minlength=t.size) for m, t in enumerate(targets)]
    for m, (share, t) in enumerate(zip(shares, targets, strict=True)):
        missing = np.flatnonzero((t > 0) & (share <= 0))
        if missing.size and rhos[m] is None:
            raise MissingMassError(m, missing)
        slack = 1e-12 * share
        if rhos[m] is None:
            bad = (share > 0) & (
                (t < lo * share - slack) | (t > (np.inf if hi is None else hi) * share + slack)
            )
        else:
            bad = (share > 0) & (t == 0) & (lo > 0)
        if bad.any():
            labels = np.flatnonzero(bad)
            raise BoundsError(m, labels, t[labels] / share[labels], (lo, hi))
    relaxed = any(r is not None for r in rhos)
    factors = [np.zeros(t.size) for t in targets] if init is None else _start_factors(init, targets)
    for m, rho in enumerate(rhos):
        if rho == 0:
            factors[m][:] = 0.0  # rho = 0: the factor stays 1
    log_total = np.zeros(1) if init is None or not relaxed else np.array([-init.log_normalizer])
    cells = codes[p > 0]
    p_live, o_live = p[p > 0], offset[p > 0]
    everything = np.zeros(cells.shape[0], dtype=np.int64)
    clip = (lo, np.inf if hi is None else hi)

    def others(skip: int | None) -> np.ndarray:
        v = o_live + log_total[0]
        for m, f in enumerate(factors):
            if m != skip:
                v = v + f[cells[:, m]]
        return v

    def weights() -> np.ndarray:
        with np.errstate(over="ignore"):
            return np.clip(np.exp(others(None)), *clip)

    def tv(post: list[np.ndarray], total: float) -> np.ndarray:
        return np.array([0.5 * np.abs(q / total - t).sum() for q, t in zip(post, targets, strict=True)])

    def marginals(w: np.ndarray) -> list[np.ndarray]:
        return [np.bincount(cells[:, m], weights=p_live * w, minlength=t.size) for m, t in enumerate(targets)]

    w = weights()
    post = marginals(w)
    errors = [tv(post, float(post[0].sum()))]
    residual = errors[-1]
    stepped = list(post)
    limit = max_iter if iterations is None else iterations
    passes = 0
    while passes < limit and (iterations is not None or residual.max() >= tol):
        for m, t in enumerate(targets):
            if rhos[m] == 0:
                continue
            factors[m], stepped[m] = _solve_labels(
                cells[:, m], p_live, others(m), t, 0.0 if rhos[m] is None else 1.0 / rhos[m], factors[m], clip
            )
        if relaxed:
            log_total, _ = _solve_labels(
                everything, p_live, others(None) - log_total[0], np.ones(1), 0.0, log_total, clip
            )
        w = weights()
        post = marginals(w)
        total = float(post[0].sum())
        passes += 1
        errors.append(tv(post, total))
        residual = np.array(
            [
                e if rho is None else 0.0 if rho == 0 else 0.5 * np.abs(q - s).sum() / total
                for e, rho, q, s in zip(errors[-1], rhos, post, stepped, strict=True)
            ]
        )
    total = float(post[0].sum())
    worst = []
    for m, t in enumerate(targets):
        gap = post[m] / total - t
        order = np.argsort(-np.abs(gap))[:5]
        worst.append({"marginal": m, "labels": order.tolist(), "gap": gap[order].tolist()})
    balanced = np.zeros(p.size)
    balanced[p > 0] = p_live * w
    scaling = Scaling(tuple(factors), -float(log_total[0]), bounds=(lo, hi))
    return IPFResult(
        scaling,
        np.array(errors),
        bool(residual.max() < tol),
        passes,
        tol,
        worst,
        omegas=np.ones(passes),
        mass=balanced / total,
    )


def _check_bounds(bounds: tuple[float, float | None]) -> tuple[float, float | None]:
    """(lo, hi) as floats, with 0 <= lo < 1 < hi (hi None: none), else a ValueError."""
    if len(bounds) != 2:
        raise ValueError(f"bounds must be (lo, hi), got {bounds!r}")
    lo, hi = bounds
    if not (0 <= lo < 1) or not (hi is None or hi > 1):
        raise ValueError(f"bounds must satisfy 0 <= lo < 1 < hi (hi None: no upper bound), got {bounds!r}")
    return float(lo), None if hi is None else float(hi)


def _solve_labels(
    labels: np.ndarray,
    p: np.ndarray,
    v: np.ndarray,
    target: np.ndarray,
    coef: float,
    start: np.ndarray,
    clip: tuple[float, float],
    *,
    max_rounds: int = 200,
) -> tuple[np.ndarray, np.ndarray]:
    """Solve every label's block equation phi_l(y) = coef y + log S_l(y) - log t_l = 0 (coef 0: exact;
    1 / rho: relaxed), S_l(y) = sum_{c in l} p_c clip(exp(y + v_c), lo, hi); returns (y, S_l(y)), (K,).

    labels, p, v: (C,) label, mass > 0 and other log factors (-inf allowed) of each cell. start: (K,) the
    previous factors. phi_l is increasing; on a *piece* (a fixed set of cells at lo, at hi and between)
    S_l = A + B e^y with A, B >= 0, so the root there is closed-form (exact: y = log((t - A) / B)) or, for
    a relaxed label, the limit of Newton's iteration on a convex increasing function started to the right
    of the root (monotone, quadratic). Each round evaluates S_l at the current y of every label (O(C)),
    narrows the label's bracket, and jumps to the root of its current piece; a jump out of the bracket
    bisects it (or, while one side is open, steps out by a doubling length). A label is solved once the
    piece at its new y is the one its y was computed on (exact), or phi_l(y) = 0 in floating point.
    Labels with target 0 get y = -inf; labels without cells keep ``start``.
    """
    lo, hi = clip
    log_lo = np.log(lo) if lo > 0 else -np.inf
    log_hi = np.log(hi)
    k = target.size
    rows = np.bincount(labels, minlength=k)
    y = np.where(np.isfinite(start), start, 0.0)
    y[target <= 0] = -np.inf
    stuck = np.bincount(labels, weights=np.isneginf(v), minlength=k)  # cells at lo whatever y is
    done = (target <= 0) | (rows == 0) | (stuck == rows)
    y[rows == 0] = start[rows == 0]
    left, right = np.full(k, -np.inf), np.full(k, np.inf)
    reach = np.ones(k)
    piece_of_y = None  # (at lo, at hi) counts of the piece each y was computed on; None: not a piece root
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        log_t = np.log(target)
        p_lo, p_hi, slots = p * lo, p * hi, 3 * labels
        for _ in range(max_rounds):
            z = y[labels] + v
            high, low = z >= log_hi, z <= log_lo
            state = low + 2 * high  # 0 between the bounds, 1 at lo, 2 at hi
            a_sum = np.bincount(labels, weights=np.where(high, p_hi, np.where(low, p_lo, 0.0)), minlength=k)
            b_sum = np.bincount(
                labels, weights=np.where(state == 0, p * np.exp(z), 0.0), minlength=k
            )  # B e^y
            s = a_sum + b_sum
            per_state = np.bincount(slots + state, minlength=3 * k).reshape(k, 3)
            piece = (per_state[:, 1], per_state[:, 2])
            phi = coef * y + np.log(s) - log_t
            if piece_of_y is not None:
                done |= (piece[0] == piece_of_y[0]) & (piece[1] == piece_of_y[1])
            done |= phi == 0
            if coef == 0:  # exact: nothing left to move toward t (all movable cells at hi, or all at lo)
                done |= ((piece[1] + stuck == rows) & (phi < 0)) | ((piece[0] == rows) & (phi > 0))
            if done.all():
                break
            left = np.where(phi < 0, np.maximum(left, y), left)
            right = np.where(phi > 0, np.minimum(right, y), right)
            closed = np.isfinite(left) & np.isfinite(right)
            done |= closed & (
                right - left <= 4e-16 * np.maximum(np.abs(left), np.abs(right))
            )  # a float apart
            # the root of the current piece, d = y_new - y
            if coef == 0:
                d = np.log(target - a_sum) - np.log(b_sum)
            else:
                log_b = np.log(b_sum) - y  # log B
                d = np.minimum(
                    (log_t - coef * y - y - log_b) / (1 + coef), (log_t - np.log(a_sum)) / coef - y
                )
                for _ in range(
                    60
                ):  # Newton on g(d) = coef (y + d) + log(A + B e^(y + d)) - log t, from the right
                    share = b_sum * np.exp(d)
                    g = coef * (y + d) + np.log(a_sum + share) - log_t
                    step = np.where(np.isfinite(d), g / (coef + share / (a_sum + share)), 0.0)
                    d = d - step
                    if not (np.abs(step) > 1e-15 * (1 + np.abs(y + d))).any():
                        break
            new = y + d
            inside = np.isfinite(new) & (new > left) & (new < right)
            bisect = 0.5 * (left + right)
            outward = np.where(np.isinf(left), right - reach, left + reach)
            fallback = np.where(np.isfinite(bisect), bisect, outward)
            reach = np.where(inside | np.isfinite(bisect), reach, 2 * reach)
            y = np.where(done, y, np.where(inside, new, fallback))
            piece_of_y = (np.where(inside, piece[0], -1), np.where(inside, piece[1], -1))
        else:
            raise RuntimeError("bounded IPF: a label's equation did not settle")  # a bug, not bad input
    return y, s


def clip_scale(above: Callable[[float], tuple[float, float]], total: float, max_weight: float) -> float:
    """The scale s >= 1 of capping weights at ``max_weight`` with the row mean kept at 1 (water-filling):
    sum_i min(s w_i, max_weight) = N.

    above(t) -> (free mass sum_{w_i <= t} w_i, rows with w_i > t): one reduction over the rows (or the
    cells, counted by their rows). total: N, the number of rows, with sum_i w_i = N. Each round caps the
    rows above max_weight / s and solves s for the rest; s only grows, so the capped set only grows and the
    loop ends after at most one round per distinct weight (a few in practice).
    """
    if max_weight < 1:
        raise ValueError(f"max_weight must be >= 1 when weights have mean 1, got {max_weight}")
    scale = 1.0
    n_capped = -1.0
    while True:
        free_mass, capped = above(max_weight / scale)
        if capped == n_capped:
            return float(scale)
        n_capped = capped
        scale = (total - max_weight * capped) / free_mass if free_mass > 0 else scale


def clip_weights(weights: np.ndarray, counts: np.ndarray, max_weight: float) -> tuple[np.ndarray, float]:
    """Cap per-cell weights at ``max_weight`` keeping the row mean at 1 (:func:`clip_scale`).

    weights, counts: (C,) weight of each cell and its number of rows, with sum(counts * weights) =
    sum(counts). Returns (w', s) with w' = min(s * w, max_weight) and the scale s >= 1 chosen so the mean
    stays 1; s applies unchanged to any other cell weighted by the same balancing.
    """
    w = np.asarray(weights, dtype=np.float64)
    n = np.asarray(counts, dtype=np.float64)

    def above(threshold: float) -> tuple[float, float]:
        free = w <= threshold
        return float((n * w)[free].sum()), float(n[~free].sum())

    scale = clip_scale(above, float(n.sum()), max_weight)
    return np.minimum(scale * w, max_weight), scale


def ess(weights: np.ndarray, counts: np.ndarray | None = None) -> float:
    """Effective sample size (sum w)^2 / sum w^2 over rows; ``counts`` repeats each weight that often."""
    w = np.asarray(weights, dtype=np.float64)
    n = np.ones_like(w) if counts is None else np.asarray(counts, dtype=np.float64)
    return float((n * w).sum() ** 2 / (n * w * w).sum())


# ---------------------------------------------------------------------------------------------- row path

ROW_CHUNK = 1 << 17
"""Rows per block in :func:`apply_ratio_and_sum`: a block's gathered ratios stay in cache."""


def prepare_codes(codes: np.ndarray) -> np.ndarray:
    """The (n, M) labels of a part as a column-major int64 array, the layout the row-path kernels read
    fastest (from a row-major array every column is strided: about 4x slower). Do it once per part."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be (n, M), got shape {codes.shape}")
    return np.asfortranarray(codes, dtype=np.int64)


def label_sums(codes_part: np.ndarray, weights_part: np.ndarray | None, m: int, k_m: int) -> np.ndarray:
    """Per-label sums of marginal ``m`` over one part: s(l) = sum_{i : c_im = l} w_i, shape (k_m,).

    codes_part: (n, M) labels, column m in [0, k_m). weights_part: (n,), or None to count rows.
    """
    column = np.asarray(codes_part)[:, m]
    if weights_part is None:
        out = np.bincount(column, minlength=k_m).astype(np.float64)
    else:
        out = np.bincount(column, weights=np.asarray(weights_part, dtype=np.float64), minlength=k_m)
    if out.size != k_m:
        raise ValueError(f"codes of marginal {m} must lie in [0, {k_m}), found {out.size - 1}")
    return out


def apply_ratio(
    codes_part: np.ndarray,
    weights_part: np.ndarray,
    m: int,
    ratio: np.ndarray,
    *,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """One projection on one part: w_i * ratio(c_im), shape (n,). ``out=weights_part`` updates in place."""
    return np.multiply(
        weights_part, np.asarray(ratio, dtype=np.float64)[np.asarray(codes_part)[:, m]], out=out
    )


def apply_ratio_and_sum(
    codes_part: np.ndarray,
    weights_part: np.ndarray,
    m: int | None,
    ratio: np.ndarray | None,
    next_m: int,
    k_next: int,
    *,
    chunk: int = ROW_CHUNK,
) -> np.ndarray:
    """A row-path step on one part in one pass: w_i <- w_i ratio(c_im) in place (skipped when ``m`` is
    None), then return the (k_next,) :func:`label_sums` of marginal ``next_m`` under the new weights.

    codes_part: (n, M), fastest as returned by :func:`prepare_codes`; weights_part: (n,) float64, the
    part's state. Rows go in blocks of ``chunk``, so the gathered ratios never leave the cache.
    """
    codes = np.asarray(codes_part)
    if weights_part.dtype != np.float64 or weights_part.shape != (codes.shape[0],):
        raise ValueError(f"weights_part must be float64 of shape ({codes.shape[0]},)")
    ratio = None if m is None else np.asarray(ratio, dtype=np.float64)
    out = np.zeros(k_next)
    for start in range(0, codes.shape[0], chunk):
        block = codes[start : start + chunk]
        w = weights_part[start : start + chunk]
        if ratio is not None:
            w *= ratio[block[:, m]]
        sums = np.bincount(block[:, next_m], weights=w, minlength=k_next)
        if sums.size != k_next:
            raise ValueError(f"codes of marginal {next_m} must lie in [0, {k_next})")
        out += sums
    return out


def ipf_driver(
    step: Callable[[int | None, np.ndarray | None, int], np.ndarray],
    counts: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    *,
    iterations: int | None = None,
    tol: float = 1e-6,
    max_iter: int = 1000,
    omega: Omega = "auto",
    relax: Sequence[float | None] | None = None,
    init: Scaling | None = None,
) -> IPFResult:
    """The iteration of :func:`ipf`, driven from per-label reductions over parts that hold the rows.

    The parts start with mass 1/N per row (N = sum of counts[0]). step(m, ratio, next_m): every part runs
    :func:`apply_ratio_and_sum` (codes, weights, m, ratio, next_m, K_next) and the sums are added (a Ray
    layer calls its actors here); the driver keeps only K-vectors. counts: M arrays (K_m,), rows per label
    over all parts (:func:`label_sums` without weights, added). targets: M arrays (K_m,) summing to 1.
    Step m of a pass multiplies by t_m / q_m (0 where q_m is 0; for a relaxed marginal the ratio of the new
    factor to the old, module docstring) and returns the next marginal's sums, so a step costs one call:
    the errors after a pass use the last marginal's sums (ratio * q_m) and the first marginal's from the
    last step; M > 2 needs M - 2 more calls per pass for the others.
    Afterwards the parts divide their weights by ``exp(log_normalizer) / N`` (mean 1, as ipf_rows does).
    Stopping, ``iterations``, ``max_iter``, ``omega``, ``relax``, ``init`` and :class:`MissingMassError` are
    those of :func:`ipf`; ``init``'s log factors reach the parts as one step per marginal before the first
    pass (its normaliser is not used: errors are measured on the normalised marginals). With omega > 1 the ratio sent to the parts is (t_m / q_m)^omega; the measure's total then
    drifts from 1, so errors are measured on the normalised marginals.
    """
    targets = [np.asarray(t, dtype=np.float64) for t in targets]
    counts = [np.asarray(c, dtype=np.float64) for c in counts]
    n_marginals = len(targets)
    if n_marginals == 0 or len(counts) != n_marginals:
        raise ValueError(f"need one counts array per target: {len(counts)} counts, {n_marginals} targets")
    exponents = _relax_exponents(relax, n_marginals)
    for m, (c, t) in enumerate(zip(counts, targets, strict=True)):
        if c.shape != t.shape or t.ndim != 1:
            raise ValueError(f"marginal {m}: counts {c.shape} and target {t.shape} must be the same (K_m,)")
        if not np.isclose(t.sum(), 1.0, rtol=0, atol=1e-12) or (t < 0).any():
            raise ValueError(f"target of marginal {m} must be non-negative and sum to 1")
    n_rows = counts[0].sum()
    if n_rows <= 0 or any(not np.isclose(c.sum(), n_rows, rtol=1e-12, atol=0) for c in counts):
        raise ValueError("counts must count the same positive number of rows in every marginal")
    for m, (c, t) in enumerate(zip(counts, targets, strict=True)):
        missing = np.flatnonzero((t > 0) & (c <= 0))
        if missing.size and exponents[m] == 1.0:
            raise MissingMassError(m, missing)

    def tv(post: list[np.ndarray]) -> np.ndarray:
        total = post[0].sum()
        return np.array([0.5 * np.abs(p / total - t).sum() for p, t in zip(post, targets, strict=True)])

    post = [c / n_rows for c in counts]  # the marginals of the current measure
    stepped = list(targets)  # each marginal right after its own step
    log_factors = [np.zeros(t.size) for t in targets]
    if init is not None:
        log_factors = _start_factors(init, targets)
        for m in range(n_marginals):
            post[(m + 1) % n_marginals] = np.asarray(
                step(m, np.exp(log_factors[m]), (m + 1) % n_marginals), dtype=np.float64
            )
    errors = [tv(post)]
    residual = errors[-1]
    limit = max_iter if iterations is None else iterations
    relaxed = any(a != 1.0 for a in exponents)
    relax_omega = Relaxation(1.0 if iterations is not None or relaxed else omega)
    passes = 0
    current = post[0]
    while passes < limit and (iterations is not None or residual.max() >= tol):
        for m, t in enumerate(targets):
            if exponents[m] == 1.0:
                ratio = np.divide(t, current, out=np.zeros_like(t), where=current > 0)
                relax_omega.relax(ratio)
                with np.errstate(divide="ignore"):
                    log_factors[m] += np.log(np.where(current > 0, ratio, 1.0))
            else:
                ratio = _relaxed_ratio(t, current, log_factors[m], exponents[m])
            post[m] = ratio * current
            stepped[m] = post[m]
            next_m = (m + 1) % n_marginals
            current = np.asarray(step(m, ratio, next_m), dtype=np.float64)
        post[0] = current
        for m in range(1, n_marginals - 1):
            post[m] = np.asarray(step(None, None, m), dtype=np.float64)
        passes += 1
        errors.append(tv(post))
        total = post[0].sum()
        residual = np.array(
            [
                e if a == 1.0 else 0.5 * np.abs(p - s).sum() / total
                for e, a, p, s in zip(errors[-1], exponents, post, stepped, strict=True)
            ]
        )
        relax_omega.update(float(errors[-1].max()))
    total = float(post[0].sum())
    errors = np.array(errors)
    worst = []
    for m, t in enumerate(targets):
        gap = post[m] / total - t
        order = np.argsort(-np.abs(gap))[:5]
        worst.append({"marginal": m, "labels": order.tolist(), "gap": gap[order].tolist()})
    converged = bool(residual.max() < tol)
    scaling = Scaling(tuple(log_factors), float(np.log(total)))
    return IPFResult(scaling, errors, converged, passes, tol, worst, omegas=relax_omega.history())


def _start_factors(init: Scaling, targets: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Copies of the first len(targets) log factors of ``init`` (a warm start), checked against the targets."""
    factors = [np.array(f, dtype=np.float64) for f in init.log_factors[: len(targets)]]
    if len(factors) != len(targets) or any(f.shape != t.shape for f, t in zip(factors, targets, strict=True)):
        raise ValueError("init must hold one log factor per label of every marginal")
    return factors


def _relax_exponents(relax: Sequence[float | None] | None, n_marginals: int) -> list[float]:
    """a_m = rho_m / (1 + rho_m) per marginal (1 for an exact one: rho None or inf)."""
    if relax is None:
        return [1.0] * n_marginals
    if len(relax) != n_marginals:
        raise ValueError(f"relax needs one strength per marginal: {len(relax)} for {n_marginals}")
    exponents = []
    for m, rho in enumerate(relax):
        if rho is not None and not (rho >= 0):
            raise ValueError(f"relax strength of marginal {m} must be >= 0 or None (exact), got {rho!r}")
        exponents.append(1.0 if rho is None or np.isinf(rho) else float(rho) / (1.0 + float(rho)))
    return exponents


def _relaxed_ratio(target: np.ndarray, current: np.ndarray, log_factor: np.ndarray, a: float) -> np.ndarray:
    """A relaxed step: set log f = a (log t - log r) with r = current / f the marginal without f; updates
    ``log_factor`` in place and returns new f / old f (0 where the target is 0, 1 where nothing is left)."""
    live = (current > 0) & np.isfinite(log_factor)
    with np.errstate(divide="ignore"):
        wanted = a * (np.log(target[live]) - np.log(current[live]) + log_factor[live]) if a > 0 else 0.0
    ratio = np.ones_like(current)
    ratio[live] = np.exp(wanted - log_factor[live])
    log_factor[live] = wanted
    return ratio


class Relaxation:
    """The over-relaxation factor of each pass, chosen from the errors seen so far (module docstring).

    omega: a fixed factor in [1, 2), or ``"auto"``: plain passes until pass ``warmup``, then
    2 / (1 + sqrt(1 - rho)) from the plain rate rho (the geometric mean error ratio over the last
    ``window`` passes), once the errors fall geometrically toward 0 rather than toward a plateau (the
    Aitken extrapolation e - d rho_d / (1 - rho_d) of the last errors e and their decrements d is below
    half the error; a positive limit means targets the data cannot meet, where over-relaxing only
    amplifies the oscillation); re-estimated every ``every`` passes from the accelerated rate and only
    raised, and only while the errors fall steadily (per-pass ratios within ``steady`` of each other:
    oscillating errors mean omega is past the optimum, or that Young's relation does not hold, as with
    three or more marginals); rounded down to 1/64 and capped at ``cap``; errors falling by a rate of
    ``plateau`` or slower per pass (or by rounding only) are left to plain passes. Either way, an error above
    ``diverge`` times the smallest so far, or ``patience`` passes without a new smallest error, return
    to plain IPF for good (plain passes converge from any scaling).
    """

    def __init__(
        self,
        omega: Omega,
        *,
        warmup: int = 8,
        window: int = 3,
        every: int = 6,
        patience: int = 10,
        cap: float = 1.9,
        steady: float = 0.05,
        diverge: float = 2.0,
        plateau: float = 0.999,
    ):
        if omega != "auto" and not (isinstance(omega, int | float) and 1.0 <= omega < 2.0):
            raise ValueError(f"omega must be 'auto' or a number in [1, 2), got {omega!r}")
        self.auto = omega == "auto"
        self.omega = 1.0 if self.auto else float(omega)
        self.warmup, self.window, self.every, self.patience, self.cap = warmup, window, every, patience, cap
        self.steady, self.diverge, self.plateau = steady, diverge, plateau
        self.errors: list[float] = []
        self.omegas: list[float] = []
        self.best, self.since_best, self.since_change = np.inf, 0, 0
        self.settled = False  # fell back to plain passes

    def history(self) -> np.ndarray:
        """The factor each pass ran with, shape (passes,)."""
        return np.array(self.omegas)

    def relax(self, ratio: np.ndarray) -> np.ndarray:
        """The over-relaxed ratio r^omega of a projection, in place. The extra factor r^(omega - 1) is
        clipped to [1e-10, 1e10], so a label whose current mass has all but vanished cannot overflow."""
        if self.omega != 1.0:
            ratio *= np.clip(np.power(ratio, self.omega - 1.0), 1e-10, 1e10)
        return ratio

    def update(self, error: float) -> None:
        """Record the largest marginal error after the pass just run and choose the next pass's omega."""
        self.omegas.append(self.omega)
        self.errors.append(error)
        self.since_change += 1
        if error < self.best:
            self.best, self.since_best = error, 0
        else:
            self.since_best += 1
        if self.settled:
            return
        if self.omega > 1.0 and (self.since_best >= self.patience or error > self.diverge * self.best):
            self.omega, self.settled = 1.0, True
            return
        if not self.auto or len(self.errors) <= self.window or self.errors[-1 - self.window] <= 0:
            return
        recent = np.array(self.errors[-1 - self.window :])
        rate = (recent[-1] / recent[0]) ** (1 / self.window)
        if not 0 < rate < self.plateau:
            return
        if self.omega == 1.0:
            if len(self.errors) >= self.warmup and rate > 0.5 and self._toward_zero(recent):
                self._set(rate)
        elif (
            self.since_change >= self.every
            and rate > self.omega - 1
            and np.ptp(recent[1:] / recent[:-1]) < self.steady
        ):
            # Young: an eigenvalue lambda of the over-relaxed map and rho of the plain one satisfy
            # (lambda + omega - 1)^2 = lambda omega^2 rho.
            self._set((rate + self.omega - 1) ** 2 / (rate * self.omega**2))

    @staticmethod
    def _toward_zero(errors: np.ndarray) -> bool:
        decrements = errors[:-1] - errors[1:]
        if (decrements <= 0).any():
            return False
        rho = (decrements[-1] / decrements[0]) ** (1 / (decrements.size - 1))
        if rho >= 1:
            return True
        return errors[-1] - decrements[-1] * rho / (1 - rho) < 0.5 * errors[-1]

    def _set(self, rho: float) -> None:
        # Rounded down to a multiple of 1/64: below the optimum is the safe side, and two runs whose
        # errors differ only by rounding (the row and the cell path) choose the same omega.
        optimal = np.floor(min(2 / (1 + np.sqrt(max(1 - rho, 1e-12))), self.cap) * 64) / 64
        if optimal > self.omega:
            self.omega, self.since_change = float(optimal), 0


def ipf_rows(
    parts_codes: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    *,
    iterations: int | None = None,
    tol: float = 1e-6,
    max_iter: int = 1000,
    omega: Omega = "auto",
    relax: Sequence[float | None] | None = None,
) -> IPFResult:
    """Row-path IPF over rows split into parts, in one process: the reference for a distributed driver.

    parts_codes: one (n_i, M) integer array per part, column m in [0, K_m). targets: M arrays (K_m,)
    summing to 1. Returns :class:`IPFResult` whose ``weights`` (one (n_i,) array per part, mean 1 over
    all rows) equal the cell path's mass_c / (count_c / N) for each row's cell, whatever the split.
    Only :func:`label_sums` and :func:`apply_ratio_and_sum` touch the rows, inside ``step``: a Ray adapter
    replaces the sums over parts by actor calls and keeps this loop (:func:`ipf_driver`).
    """
    parts = [prepare_codes(p) for p in parts_codes]
    sizes = [np.asarray(t).size for t in targets]
    for p in parts:
        if p.shape[1] != len(sizes):
            raise ValueError(f"every part must have {len(sizes)} label columns, got shape {p.shape}")
        if p.size and ((p.min(axis=0) < 0).any() or (p.max(axis=0) >= sizes).any()):
            raise ValueError(f"codes of marginal m must lie in [0, K_m) with K = {sizes}")
    counts = [sum((label_sums(p, None, m, k) for p in parts), np.zeros(k)) for m, k in enumerate(sizes)]
    n_rows = sum(len(p) for p in parts)
    weights = [np.full(len(p), 1.0 / max(n_rows, 1)) for p in parts]

    def step(m: int | None, ratio: np.ndarray | None, next_m: int) -> np.ndarray:
        partial = (
            apply_ratio_and_sum(p, w, m, ratio, next_m, sizes[next_m])
            for p, w in zip(parts, weights, strict=True)
        )
        return sum(partial, np.zeros(sizes[next_m]))

    result = ipf_driver(
        step, counts, targets, iterations=iterations, tol=tol, max_iter=max_iter, omega=omega, relax=relax
    )
    scale = n_rows / np.exp(result.log_normalizer)
    for w in weights:
        w *= scale
    result.weights = weights
    return result


def strongest_within(
    solve: Callable[[float | None, Scaling | None], IPFResult],
    ess_of: Callable[[IPFResult], float],
    floor: float,
    *,
    lo: float = 1e-3,
    hi: float = 1e3,
    steps: int = 10,
    exact: bool = True,
) -> tuple[float | None, IPFResult, list[dict]]:
    """The strongest balancing whose ESS fraction stays at or above ``floor``: exact if it does, else the
    largest relaxation strength rho in [lo, hi] found by bisection on log rho (ESS falls as rho grows).

    solve(rho, start): the balancing with every marginal at strength rho (None: exact), from the scaling
    ``start`` (a warm start, :func:`_warm_start`; None for the first strength and the exact attempt).
    ess_of(result): its ESS as a fraction of the rows. Returns (rho or None, that result, the frontier: one record per strength
    tried, {rho, ess, max_weight?, marginal_error, converged} in the order tried; ``max_weight`` is left
    to the caller). When even ``lo`` is below the floor, returns ``lo``'s result (the floor cannot be met
    by balancing at all; the caller reports it). ``exact=False`` skips the exact attempt (targets known
    to be infeasible).
    """
    if not 0 < floor <= 1:
        raise ValueError(f"the ESS floor must be in (0, 1], got {floor}")
    frontier: list[dict] = []
    solved: dict[float, Scaling] = {}  # log rho -> the scaling found there

    def attempt(rho: float | None) -> tuple[IPFResult, float]:
        result = solve(rho, None if rho is None else _warm_start(solved, float(np.log(rho))))
        if rho is not None:
            solved[float(np.log(rho))] = result.scaling
        value = ess_of(result)
        frontier.append(
            {
                "rho": "exact" if rho is None else rho,
                "ess": value,
                "marginal_error": result.errors[-1].tolist(),
                "converged": result.converged,
                "passes": result.passes,
            }
        )
        return result, value

    if exact:
        result, value = attempt(None)
        if value >= floor:
            return None, result, frontier
    log_lo, log_hi = np.log(lo), np.log(hi)
    result, value = attempt(lo)
    if value < floor:
        return lo, result, frontier
    best = (lo, result)
    for _ in range(steps):
        mid = 0.5 * (log_lo + log_hi)
        rho = float(np.exp(mid))
        result, value = attempt(rho)
        if value >= floor:
            best, log_lo = (rho, result), mid
        else:
            log_hi = mid
    return best[0], best[1], frontier


def _warm_start(solved: dict[float, Scaling], log_rho: float) -> Scaling | None:
    """The start of a solve at log rho from the scalings ``solved`` at other log strengths: between two
    solved strengths, their log factors and normalisers interpolated linearly in log rho (the bisection's
    case: fewer passes than the nearer end alone, docs/performance.md); else the nearest; None if none."""
    if not solved:
        return None
    below = [r for r in solved if r < log_rho]
    above = [r for r in solved if r > log_rho]
    if not below or not above:
        return solved[min(solved, key=lambda r: abs(r - log_rho))]
    a, b = max(below), min(above)
    x = (log_rho - a) / (b - a)
    lower, upper = solved[a], solved[b]
    return dataclasses.replace(
        lower,
        log_factors=tuple(
            (1 - x) * f + x * g for f, g in zip(lower.log_factors, upper.log_factors, strict=True)
        ),
        log_normalizer=(1 - x) * lower.log_normalizer + x * upper.log_normalizer,
    )
