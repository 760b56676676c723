"""Balance step 2: IPF on one of two paths that compute the same iteration (:mod:`rebalance.kernels.ipf`).

- cell path (:class:`CellParts`): the driver holds the merged cell counts and runs
  :func:`~rebalance.kernels.ipf.ipf` on them;
- row path (:class:`RowParts`): actors keep their parts' label codes and masses in memory and the driver
  reduces the next marginal's per-label sums after every step (:func:`~rebalance.kernels.ipf.ipf_driver`),
  for more cells than one process should hold.

Both parts objects answer the same ``reduce`` (a function of every part's :class:`Labelled` state, the
results added) and ``ipf``, so the later steps (clipping, diagnostics) do not ask which path ran.

``dup_group`` (near-duplicate groups, ``dedup``; held last, :func:`marginal_order`) is not fitted: its fixed
factor g(s) / s per row of a group of s rows (:func:`~rebalance.stages.balance.survey.group_mass`) scales
the starting mass, IPF fits the other marginals, and the normaliser is recomputed so the weights keep
mean 1.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from rebalance.kernels.feasibility import needed_weights, support_flow
from rebalance.kernels.ipf import (
    BoundsError,
    IPFResult,
    MissingMassError,
    apply_ratio_and_sum,
    ipf,
    ipf_driver,
    label_sums,
    prepare_codes,
    strongest_within,
)
from rebalance.kernels.scaling import Scaling
from rebalance.runtime.pool import DEFAULT_PLACEMENT_TIMEOUT_S
from rebalance.runtime.resident import ResidentParts
from rebalance.spec import DUP_GROUP, BalanceSpec
from rebalance.stages.balance.survey import BalanceError, dup_base, encode_labels, load_labels, marginal_order

__all__ = [
    "NEEDED_WEIGHT_WARNING",
    "CellParts",
    "Labelled",
    "RowParts",
    "bounds_record",
    "check",
    "fit",
    "fit_record",
]

NEEDED_WEIGHT_WARNING = 100.0
"""An exact marginal whose values need a mean weight above this (t(l) / p(l)) is reported before IPF."""

log = logging.getLogger(__name__)


class Labelled(NamedTuple):
    """Rows (or cells, each ``counts`` rows) with their label codes and, on the row path, IPF masses."""

    codes: np.ndarray
    counts: np.ndarray | None
    mass: np.ndarray | None = None


class CellParts:
    """The cell table as a single part, in the driver's memory."""

    def __init__(self, state: Labelled):
        self.state = state

    def reduce(self, fn: Any, *args: Any, combine: Any = np.add) -> Any:
        """fn(state, *args) of the one part."""
        return fn(self.state, *args)

    def ipf(
        self,
        counts: list[np.ndarray],
        targets: list[np.ndarray],
        base: np.ndarray | None = None,
        **options: Any,
    ) -> IPFResult:
        """:func:`~rebalance.kernels.ipf.ipf` on the cells (``counts``, the per-label rows, are theirs) of the
        first len(targets) marginals; with ``base``, a cell's starting mass is its rows times
        exp(base[l]) of its label l of the last marginal (``dup_group``); with ``bounds`` that factor is the
        fixed ``offset`` inside the clip instead, the bounds being on the rows' weights."""
        codes, mass = self.state.codes, self.state.counts
        if base is not None and options.get("bounds") is not None:
            options["offset"] = base[codes[:, -1]]
        elif base is not None:
            mass = mass * np.exp(base[codes[:, -1]])
        return ipf(codes[:, : len(targets)], mass, targets, **options)

    def __enter__(self) -> CellParts:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _load_rows(
    run_root: str,
    index: int,
    marginals: list[str],
    values: list[pa.Array],
    n_rows: float,
    base: np.ndarray | None = None,
) -> Labelled:
    """A part's rows with mass 1 / n_rows each, or, with ``base`` (the ``dup_group`` log factors of the last
    marginal), exp(base[l]) / n_rows (``n_rows`` then their sum over all rows)."""
    codes = prepare_codes(encode_labels(load_labels(run_root, index, marginals), marginals, values))
    if base is None:
        return Labelled(codes, None, np.full(codes.shape[0], 1.0 / n_rows))
    return Labelled(codes, None, np.exp(base[codes[:, -1]]) / n_rows)


def _start_sums(state: Labelled, sizes: list[int]) -> list[np.ndarray]:
    """Per-label sums of the rows' starting masses, one (K_m,) array per fitted marginal."""
    return [label_sums(state.codes, state.mass, m, k) for m, k in enumerate(sizes)]


def _add_lists(a: list[np.ndarray], b: list[np.ndarray]) -> list[np.ndarray]:
    return [x + y for x, y in zip(a, b, strict=True)]


def _log_total(state: Labelled, log_factors: tuple[np.ndarray, ...]) -> float:
    """log of the sum over rows (cells: times their rows) of exp(sum_m log_factors[m][l_m])."""
    log_w = np.zeros(state.codes.shape[0])
    for m, f in enumerate(log_factors):
        log_w += f[state.codes[:, m]]
    if state.counts is not None:
        log_w += np.log(state.counts)
    return float(np.logaddexp.reduce(log_w)) if log_w.size else -np.inf


def _row_step(
    state: Labelled, m: int | None, ratio: np.ndarray | None, next_m: int, k_next: int
) -> np.ndarray:
    return apply_ratio_and_sum(state.codes, state.mass, m, ratio, next_m, k_next)


class RowParts(ResidentParts):
    """Every part's rows (label codes, IPF mass) resident on actors: ``RowParts(items, workers)`` loads
    part (run_root, index, marginals, values, n_rows[, base]) of each item."""

    def __init__(self, items: list[tuple], workers: int, load_timeout_s: float = DEFAULT_PLACEMENT_TIMEOUT_S):
        super().__init__(_load_rows, items, workers, load_timeout_s=load_timeout_s)

    def ipf(
        self,
        counts: list[np.ndarray],
        targets: list[np.ndarray],
        base: np.ndarray | None = None,
        **options: Any,
    ) -> IPFResult:
        """:func:`~rebalance.kernels.ipf.ipf_driver` on the first len(targets) marginals, each step one
        reduction over the actors; with ``base`` (loaded with the rows) the starting per-label sums are
        reduced from the rows' masses."""
        sizes = [t.size for t in targets]

        def step(m: int | None, ratio: np.ndarray | None, next_m: int) -> np.ndarray:
            return self.reduce(_row_step, m, ratio, next_m, sizes[next_m])

        if base is not None:
            counts = self.reduce(_start_sums, sizes, combine=_add_lists)
        return ipf_driver(step, counts[: len(targets)], targets, **options)


def check(
    parts: CellParts | RowParts,
    spec: BalanceSpec,
    values: list[pa.Array],
    counts: list[np.ndarray],
    targets: list[np.ndarray],
) -> dict[str, Any]:
    """Diagnose exact targets before any pass (:mod:`rebalance.kernels.feasibility`); the ``feasibility``
    record of ``balance.json``.

    Every exact marginal: the largest mean weight t(l) / p(l) its values need (a lower bound on the
    largest weight of any exact solution), logged as a warning above :data:`NEEDED_WEIGHT_WARNING`. Two
    exact marginals on the cell path: the flow check on the support; targets it cannot carry are a
    :class:`BalanceError` naming the values before any pass; a warning instead with ``allow_partial``,
    ``min_ess`` or fixed ``iterations`` (the k-step measure is defined whether or not its limit exists).
    """
    marginals = marginal_order(spec)
    exact = [m for m, name in enumerate(marginals) if name != DUP_GROUP and spec.relax_for(name) is None]
    record: dict[str, Any] = {"needed_weight": {}, "flow": None}
    for m in exact:
        need = needed_weights(counts[m], targets[m])
        worst = int(np.argmax(need))
        record["needed_weight"][marginals[m]] = {
            "value": values[m][worst].as_py(),
            "weight": float(need[worst]),
        }
        if need[worst] > NEEDED_WEIGHT_WARNING:
            log.warning(
                "balance: exact target of %r needs mean weight %.1f on value %r (%d rows); consider "
                "balance.relax",
                marginals[m],
                need[worst],
                values[m][worst].as_py(),
                int(counts[m][worst]),
            )
    if len(marginals) != 2 or len(exact) != 2:
        record["flow"] = {"checked": False, "reason": "only two exact marginals are checked"}
        return record
    if not isinstance(parts, CellParts):
        record["flow"] = {"checked": False, "reason": "the row path holds no cell table"}
        return record
    flow = support_flow(parts.state.codes, parts.state.counts, targets[0], targets[1])
    record["flow"] = {"checked": True, "feasible": flow.feasible, "placed": flow.placed}
    if flow.feasible:
        return record
    rows = values[0].take(pa.array(flow.rows)).to_pylist()
    cols = values[1].take(pa.array(flow.cols)).to_pylist()
    message = (
        f"balance targets cannot be met on the data's support: the cells of {marginals[0]} values "
        f"{rows[:20]}{' ...' if len(rows) > 20 else ''} (target mass {flow.need:.4g}) only reach "
        f"{marginals[1]} values {cols[:20]}{' ...' if len(cols) > 20 else ''} (target mass {flow.reach:.4g}); "
        f"at most {flow.placed:.4%} of the target mass can be placed. Lower those targets, or set "
        "balance.relax to a strength (always solvable)"
    )
    record["flow"].update(
        values={marginals[0]: rows, marginals[1]: cols}, need=flow.need, reach=flow.reach, error=message
    )
    if spec.min_ess is not None:
        why = "min_ess: relaxing"
    elif spec.iterations != "auto":
        why = "fixed iterations: the k-step measure exists whether or not its limit does"
    elif spec.allow_partial:
        why = "allow_partial: iterating anyway"
    else:
        raise BalanceError(message)
    log.warning("%s (%s)", message, why)
    return record


def _reset(state: Labelled, total: float, base: np.ndarray | None) -> np.ndarray:
    """The row path's starting masses again (:func:`_load_rows`); nothing on the cell path."""
    if state.mass is not None:
        state.mass[:] = 1.0 / total if base is None else np.exp(base[state.codes[:, -1]]) / total
    return np.zeros(1)


def _weight_sums(state: Labelled, scaling: Scaling) -> np.ndarray:
    """[rows, sum w, sum w^2] of the part's rows (cells counted by their rows)."""
    w = scaling.weights(state.codes)
    n = np.ones_like(w) if state.counts is None else np.asarray(state.counts, dtype=np.float64)
    return np.array([n.sum(), (n * w).sum(), (n * w * w).sum()])


def _weight_max(state: Labelled, scaling: Scaling) -> np.ndarray:
    return np.array([scaling.weights(state.codes).max(initial=0.0)])


def _ess_and_max(parts: CellParts | RowParts, result: IPFResult) -> tuple[float, float]:
    """ESS as a fraction of the rows, and the largest weight (mean 1), of ``result``'s scaling."""
    rows, total, squares = parts.reduce(_weight_sums, result.scaling, combine=np.add)
    largest = parts.reduce(_weight_max, result.scaling, combine=np.maximum)[0]
    return float(total * total / squares / rows), float(largest * rows / total)


def fit(
    parts: CellParts | RowParts,
    spec: BalanceSpec,
    values: list[pa.Array],
    counts: list[np.ndarray],
    targets: list[np.ndarray],
    feasible: bool = True,
) -> tuple[IPFResult, dict[str, Any] | None]:
    """IPF of the parts toward ``targets`` as ``spec`` says; a target positive on a label with no rows is a
    :class:`BalanceError` naming the labels. With ``dup_group``, its fixed factor joins the scaling. With
    ``min_ess``, the strongest balancing above the floor (:func:`~rebalance.kernels.ipf.strongest_within`)
    and its ``balance.json`` ``min_ess`` record (else None); ``feasible=False`` (the flow check failed)
    skips the search's exact attempt. ``balance.bounds`` (cell path only) bound every row's weight inside
    the iteration; exact targets they cannot meet are a :class:`BalanceError` naming the values and the mean
    weight each needs. The search warm-starts each strength (:func:`~rebalance.kernels.ipf.strongest_within`)
    when iterating to a tolerance; fixed ``iterations`` (the k-step measure) always start from the data."""
    marginals = marginal_order(spec)
    fitted = [m for m in marginals if m != DUP_GROUP]
    base = dup_base(spec, values, marginals)
    if not fitted and spec.bounds is not None:
        raise BalanceError("balance.bounds needs a marginal to fit besides dup_group (its factor is fixed)")
    if not fitted:  # dup_group alone: nothing to fit, its factor is the whole scaling
        result = IPFResult(Scaling((), 0.0), np.zeros((1, 0)), True, 0, spec.tol)
        return _with_base(result, parts, base, counts), None
    total = float(counts[0].sum()) if base is None else float(np.exp(base) @ counts[-1])

    bounded = {} if spec.bounds is None else {"bounds": tuple(spec.bounds)}

    def solve(rho: float | None, start: Scaling | None = None) -> IPFResult:
        parts.reduce(_reset, total, base)  # the row path's masses start afresh for every solve
        result = parts.ipf(
            counts,
            targets[: len(fitted)],
            base,
            iterations=None if spec.iterations == "auto" else spec.iterations,
            tol=spec.tol,
            max_iter=spec.max_iter,
            omega=spec.overrelaxation,
            relax=[spec.relax_for(m) for m in fitted] if rho is None else [rho] * len(fitted),
            init=start if spec.iterations == "auto" else None,
            **bounded,
        )
        return result if base is None else _with_base(result, parts, base, counts)

    search = None
    try:
        if spec.min_ess is None:
            result = solve(None)
        else:
            result, search = _search(parts, spec, solve, fitted, feasible)
    except MissingMassError as err:
        labels = values[err.marginal].take(pa.array(err.labels)).to_pylist()
        raise BalanceError(
            f"balance target of marginal {marginals[err.marginal]!r} is positive on values with "
            f"no rows (missing mass): {labels[:20]}"
        ) from None
    except BoundsError as err:
        labels = values[err.marginal].take(pa.array(err.labels)).to_pylist()
        needs = ", ".join(f"{v!r} needs {w:.4g}" for v, w in zip(labels[:20], err.needed[:20], strict=False))
        lo, hi = err.bounds
        raise BalanceError(
            f"balance.bounds [{lo}, {hi}]: the target of marginal {marginals[err.marginal]!r} needs mean "
            f"weights outside them on values {needs}{' ...' if len(labels) > 20 else ''} (t / p, the mean "
            "weight of the value's rows). Widen balance.bounds, change those targets, or relax the marginal "
            "(balance.relax)"
        ) from None
    omega = float(result.omegas.max()) if result.passes else 1.0
    log.info(
        "balance: %d passes (%s), largest marginal error %.3e, %s",
        result.passes,
        f"over-relaxed, omega up to {omega:.3f}" if omega > 1 else "plain",
        result.final_error,
        "converged" if result.converged else "not converged",
    )
    return result, search


def _search(
    parts: CellParts | RowParts, spec: BalanceSpec, solve: Any, fitted: list[str], feasible: bool
) -> tuple[IPFResult, dict[str, Any]]:
    """``balance.min_ess``: the strongest balancing above the floor and the ``min_ess`` record."""
    maxima: list[float] = []

    def ess_of(result: IPFResult) -> float:
        value, largest = _ess_and_max(parts, result)
        maxima.append(largest)
        return value

    rho, result, frontier = strongest_within(solve, ess_of, spec.min_ess, exact=feasible)
    for point, largest in zip(frontier, maxima, strict=True):
        point["marginal_error"] = dict(zip(fitted, point["marginal_error"], strict=True))
        point["max_weight"] = largest
        if point["rho"] == "exact" and any(spec.relax_for(m) is not None for m in fitted):
            point["rho"] = "as relax"
    final_ess, _ = _ess_and_max(parts, result)
    search = {
        "floor": spec.min_ess,
        "rho": "as relax" if rho is None else rho,
        "ess_fraction": final_ess,
        "met": final_ess >= spec.min_ess,
        "frontier": frontier,
    }
    log.info("balance: min_ess %.3f -> strength %s (ESS %.3f)", spec.min_ess, search["rho"], final_ess)
    if not search["met"]:
        log.warning(
            "balance: no strength in [1e-3, 1e3] keeps the ESS at min_ess %.3f; weakest gives %.3f",
            spec.min_ess,
            final_ess,
        )
    return result, search


def _with_base(
    result: IPFResult, parts: CellParts | RowParts, base: np.ndarray, counts: list[np.ndarray]
) -> IPFResult:
    """``result`` with the fixed ``dup_group`` factor as its last marginal and the normaliser that gives
    the rows (sum of counts[0]) mean weight 1 (a bounded result's already does: the factor was inside)."""
    log_factors = (*result.scaling.log_factors, base)
    if result.scaling.bounds is not None:
        return dataclasses.replace(
            result, scaling=dataclasses.replace(result.scaling, log_factors=log_factors)
        )
    log_total = parts.reduce(_log_total, log_factors, combine=np.logaddexp)
    scaling = Scaling(log_factors, float(log_total - np.log(counts[0].sum())))
    return dataclasses.replace(result, scaling=scaling)


def _at_bounds(state: Labelled, scaling: Scaling) -> np.ndarray:
    """[rows, rows at lo, rows at hi] of the part under a bounded scaling (to 1e-9 relative)."""
    w = scaling.weights(state.codes)
    n = np.ones_like(w) if state.counts is None else np.asarray(state.counts, dtype=np.float64)
    lo, hi = scaling.bounds
    at_hi = np.zeros_like(w, dtype=bool) if hi is None else w >= hi * (1 - 1e-9)
    return np.array([n.sum(), n[w <= lo * (1 + 1e-9)].sum(), n[at_hi].sum()])


def bounds_record(parts: CellParts | RowParts, result: IPFResult) -> dict[str, Any] | None:
    """The ``balance.json`` ``bounds`` record of a bounded balancing (else None): ``lo``, ``hi`` and the
    share of rows whose weight sits at each (``rows_at_lo``, ``rows_at_hi``); the marginal error the
    bounds leave is ``final_marginal_error``."""
    if result.scaling.bounds is None:
        return None
    rows, at_lo, at_hi = parts.reduce(_at_bounds, result.scaling, combine=np.add)
    lo, hi = result.scaling.bounds
    return {"lo": lo, "hi": hi, "rows_at_lo": float(at_lo / rows), "rows_at_hi": float(at_hi / rows)}


def fit_record(result: IPFResult, spec: BalanceSpec, values: list[pa.Array]) -> dict[str, Any]:
    """The ``balance.json`` fields of the iteration: passes, convergence, errors and omega per pass and,
    when ``iterations: auto`` did not converge, ``error`` naming the values farthest from their targets.
    ``dup_group`` is not fitted and has no entry here."""
    marginals = [m for m in marginal_order(spec) if m != DUP_GROUP]
    record: dict[str, Any] = {
        "passes": result.passes,
        "converged": result.converged,
        "marginal_error_per_iteration": [
            dict(zip(marginals, e.tolist(), strict=True)) for e in result.errors
        ],
        "final_marginal_error": dict(zip(marginals, result.errors[-1].tolist(), strict=True)),
        "overrelaxation": spec.overrelaxation,
        "omega_per_iteration": result.omegas.tolist(),
        "relax": {m: "exact" if spec.relax_for(m) is None else spec.relax_for(m) for m in marginals},
    }
    if not result.converged and spec.iterations == "auto":
        worst = [
            f"{marginals[w['marginal']]}: "
            + ", ".join(
                f"{values[w['marginal']][lab].as_py()!r} ({gap:+.2e})"
                for lab, gap in zip(w["labels"], w["gap"], strict=True)
            )
            for w in result.worst
        ]
        record["error"] = (
            f"IPF did not reach tol={spec.tol} in {result.passes} iterations (largest marginal error "
            f"{result.final_error:.3e}); the targets may be incompatible with the data's structural zeros. "
            f"Farthest values per marginal: {'; '.join(worst)}"
        )
    return record
