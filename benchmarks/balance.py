"""Balance kernels against POT and the memory-bandwidth floor, on the same data, in one run.

    .venv/bin/python benchmarks/balance.py                    # 10,000,000 rows, two marginals of K = 1000
    .venv/bin/python benchmarks/balance.py --rows 1000000 --k 200 --soft-rows 20000 --soft-iterations 5

The labels: an image concept a ~ Zipf(1.1) over K values and a text concept b correlated with it, as
image and text clusters of the same pair are: b = perm(a + d) with a small two-sided geometric offset d
(most text concepts are the image concept's own or a neighbour), and for a fraction of the rows
(--independent, 10%) an independent Zipf draw. Targets: uniform on both marginals; tol is on the largest
total-variation marginal error, as the stage uses it.

(a) the cell path end to end: the cell table by ``np.unique`` of the label pairs, :func:`ipf` to tol, each
    row's weight looked up from its cell; (a') the same with the table counted by ``np.bincount`` of the
    pair ids (possible while K^2 fits in memory; no sort), and its solve again with plain IPF (omega = 1,
    no over-relaxation). The counting and the lookup are row work POT's line does too, so POT's end-to-end
    time over theirs is the most any solver could gain end to end (the "ceiling" line).
(c) POT: ``ot.sinkhorn`` on the dense K x K joint table (kernel = the table: cost -log P, reg 1), stopped
    on POT's L2 column error at 2 tol / sqrt(K), which bounds the TV error by tol; the table by bincount and
    the lookup by flat index, so POT gets the fast row work too.
(b) the row path: :func:`ipf_rows` over 8 parts to the same tol, over-relaxed and plain. One step (:func:`apply_ratio_and_sum` over
    all parts) against one ``np.bincount`` with weights over all rows, the memory-bandwidth floor; both
    timed as --steps consecutive passes, best of --repeat.
(d) soft Sinkhorn on an N' x K' score matrix (cosine scores of rows around long-tailed prototypes, T =
    0.05, uniform column marginal): :func:`soft_sinkhorn` vs POT's ``ot.bregman.sinkhorn_log`` for the
    same fixed number of iterations (both run the same iteration, so the codes must agree), plus ours to
    tol and the distributed form over 8 parts.
Each timing is the best of --repeat runs (POT's log-domain Sinkhorn, minutes, runs once).
(e) ``--relaxed RHO [RHO ...]`` (instead of (a) to (d)): the cell path on the same pair, exact (over-relaxed,
    to tol) against relaxed marginals (``relax = [rho, rho]``, to the same tol on the fixed-point residual):
    passes, time, time per pass, ESS, largest weight, final marginal errors, and the image concepts starved
    (weighted share below a tenth of their raw share).
(f) ``--min-ess FLOOR [FLOOR ...]`` (instead of (a) to (e)): the ``balance.min_ess`` search
    (:func:`strongest_within`, relaxed strengths only, the exact attempt skipped) on the same pair, each
    solve from the data ("cold", before warm starts) against warm-started from the strengths already
    solved ("warm", what the stage does): the strength found, passes summed over the search, time; with
    ``--bounds LO HI`` (HI 0: none) every solve bounds the weights (:func:`ipf_bounded`).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import ot

from rebalance.kernels.ipf import apply_ratio_and_sum, ess, ipf, ipf_rows, prepare_codes, strongest_within
from rebalance.kernels.sinkhorn import soft_sinkhorn, soft_sinkhorn_parts


def best_of(repeat: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    """Smallest wall time over ``repeat`` calls, and the result of that call."""
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - start
        if elapsed < best:
            best, out = elapsed, result
        del result
    return best, out


def zipf(k: int, exponent: float) -> np.ndarray:
    p = np.arange(1, k + 1, dtype=np.float64) ** -exponent
    return p / p.sum()


def make_labels(rows: int, k: int, seed: int, independent: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = zipf(k, 1.1)
    a = rng.choice(k, rows, p=p)
    offset = (rng.geometric(0.4, rows) - 1) * rng.choice([-1, 1], rows)
    b = rng.permutation(k)[(a + offset) % k]
    noise = rng.random(rows) < independent
    b[noise] = rng.choice(k, int(noise.sum()), p=p[rng.permutation(k)])
    return a, b


def tv(weights_by_label: np.ndarray, target: np.ndarray) -> float:
    return float(0.5 * np.abs(weights_by_label / weights_by_label.sum() - target).sum())


def categorical(args: argparse.Namespace) -> dict[str, Any]:
    k, n, tol = args.k, args.rows, args.tol
    a, b = make_labels(n, k, args.seed, args.independent)
    targets = [np.full(k, 1 / k), np.full(k, 1 / k)]
    pair = a * k + b
    out: dict[str, Any] = {}

    # (a) cell path, np.unique table.
    def cell_unique() -> tuple[np.ndarray, Any, list[float]]:
        t0 = time.perf_counter()
        cells, inverse, counts = np.unique(pair, return_inverse=True, return_counts=True)
        codes = np.stack([cells // k, cells % k], axis=1)
        t1 = time.perf_counter()
        result = ipf(codes, counts.astype(np.float64), targets, tol=tol, max_iter=args.max_iter)
        t2 = time.perf_counter()
        weights = (result.mass * (n / counts))[inverse]
        return weights, result, [t1 - t0, t2 - t1, time.perf_counter() - t2]

    out["cell_unique_s"], (w_cell, cell, parts_s) = best_of(args.repeat, cell_unique)
    out["cell_unique_parts_s"] = parts_s
    out["cells"], out["passes"], out["cell_error"] = len(cell.mass), cell.passes, cell.final_error
    out["omega"] = float(cell.omegas.max()) if cell.passes else 1.0
    full_counts = np.bincount(pair, minlength=k * k)
    cells_of_pair = np.flatnonzero(full_counts)
    plain_counts = full_counts[cells_of_pair].astype(np.float64)

    # (a') cell path, counting table; and the same table balanced by plain IPF (omega = 1).
    def cell_count() -> tuple[np.ndarray, list[float]]:
        t0 = time.perf_counter()
        full = np.bincount(pair, minlength=k * k)
        ids = np.flatnonzero(full)
        counts = full[ids].astype(np.float64)
        t1 = time.perf_counter()
        result = ipf(np.stack([ids // k, ids % k], axis=1), counts, targets, tol=tol, max_iter=args.max_iter)
        t2 = time.perf_counter()
        dense = np.zeros(k * k)
        dense[ids] = result.mass * (n / counts)
        weights = dense[pair]
        return weights, [t1 - t0, t2 - t1, time.perf_counter() - t2]

    out["cell_count_s"], (w_count, out["cell_count_parts_s"]) = best_of(args.repeat, cell_count)
    out["ipf_solve_s"] = out["cell_count_parts_s"][1]
    out["count_vs_unique_max_rel"] = float(np.abs(w_count / w_cell - 1).max())
    plain_codes = np.stack([cells_of_pair // k, cells_of_pair % k], axis=1)
    out["ipf_plain_s"], plain = best_of(
        args.repeat,
        lambda: ipf(plain_codes, plain_counts, targets, tol=tol, max_iter=args.max_iter, omega=1.0),
    )
    out["plain_passes"], out["plain_error"] = plain.passes, plain.final_error

    # (c) POT on the dense table.
    def pot() -> tuple[np.ndarray, float, int]:
        table = np.bincount(pair, minlength=k * k).reshape(k, k) / n
        with np.errstate(divide="ignore"):
            cost = np.where(table > 0, -np.log(table), 1e3)
        t1 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan, log = ot.sinkhorn(
                targets[0], targets[1], cost, 1.0, stopThr=2 * tol / np.sqrt(k), numItermax=100_000, log=True
            )
        solve = time.perf_counter() - t1
        ratio = np.divide(plan, table, out=np.zeros_like(plan), where=table > 0)
        return ratio.reshape(-1)[pair], solve, int(log["niter"]) + 1

    out["pot_s"], (w_pot, out["pot_solve_s"], out["pot_iterations"]) = best_of(args.repeat, pot)
    out["pot_error"] = max(tv(np.bincount(a, w_pot, k), targets[0]), tv(np.bincount(b, w_pot, k), targets[1]))
    out["pot_vs_cell_max_rel"] = float(np.abs(w_pot / w_cell - 1).max())

    # (b) row path.
    rows = np.stack([a, b], axis=1)
    split = np.array_split(rows, args.parts)
    out["rows_s"], row = best_of(
        max(1, args.repeat - 1), lambda: ipf_rows(split, targets, tol=tol, max_iter=args.max_iter)
    )
    out["row_passes"], out["row_error"] = row.passes, row.final_error
    out["rows_plain_s"], row_plain = best_of(
        1, lambda: ipf_rows(split, targets, tol=tol, max_iter=args.max_iter, omega=1.0)
    )
    out["row_plain_passes"] = row_plain.passes
    out["row_vs_cell_max_rel"] = float(np.abs(np.concatenate(row.weights) / w_cell - 1).max())
    parts = [prepare_codes(p) for p in split]
    weights = [np.full(len(p), 1 / n) for p in parts]
    ratios = [1 + 1e-3 * np.random.default_rng(1).random(k) for _ in range(2)]

    def steps() -> None:
        for s in range(args.steps):
            m = s % 2
            sum(
                apply_ratio_and_sum(p, w, m, ratios[m], 1 - m, k) for p, w in zip(parts, weights, strict=True)
            )

    out["row_step_s"] = best_of(args.repeat, steps)[0] / args.steps
    column, w_all = np.ascontiguousarray(a), np.full(n, 1.0)

    def floor() -> None:  # timed like the steps: args.steps passes in a row, so both see the same noise
        for _ in range(args.steps):
            np.bincount(column, weights=w_all, minlength=k)

    out["bincount_s"] = best_of(args.repeat, floor)[0] / args.steps
    return out


def soft(args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed + 1)
    n, k, d = args.soft_rows, args.soft_k, 64
    prototypes = rng.normal(size=(k, d))
    prototypes /= np.linalg.norm(prototypes, axis=1, keepdims=True)
    x = prototypes[rng.choice(k, n, p=zipf(k, 1.1))] + 0.15 * rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    scores = x @ prototypes.T
    del x
    pi = np.full(k, 1 / k)
    temperature, iterations = 0.05, args.soft_iterations
    out: dict[str, Any] = {}
    out["soft_s"], ours = best_of(args.repeat, lambda: soft_sinkhorn(scores, pi, temperature, iterations))
    codes, out["soft_error"] = ours.codes, ours.final_error
    del ours
    out["soft_parts_s"], parts = best_of(
        1, lambda: soft_sinkhorn_parts(np.array_split(scores, args.parts), pi, temperature, iterations)
    )
    out["soft_parts_vs_single"] = float(np.abs(parts.codes - codes).max())
    del parts
    tol_time, to_tol = best_of(1, lambda: soft_sinkhorn(scores, pi, temperature, None, tol=args.tol))
    out["soft_tol_s"], out["soft_tol_iterations"], out["soft_tol_error"] = (
        tol_time,
        to_tol.iterations,
        to_tol.final_error,
    )
    del to_tol

    def pot_log() -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ot.bregman.sinkhorn_log(
                np.full(n, 1 / n), pi, -scores, temperature, numItermax=iterations, stopThr=0.0
            )

    out["pot_log_s"], plan = best_of(1, pot_log)
    out["soft_vs_pot_max_abs"] = float(np.abs(codes - n * plan).max())
    return out


def relaxed(args: argparse.Namespace) -> None:
    a, b = make_labels(args.rows, args.k, args.seed, args.independent)
    pair = a * args.k + b
    ids, inverse, counts = np.unique(pair, return_inverse=True, return_counts=True)
    codes = np.stack([ids // args.k, ids % args.k], axis=1)
    targets = [np.full(args.k, 1 / args.k)] * 2
    raw = np.bincount(a, minlength=args.k) / args.rows
    print(f"(e) {args.rows:,} rows, K = {args.k}, {len(ids):,} cells; exact vs relaxed, tol {args.tol:g}")
    print(
        f"{'arm':>10} {'passes':>7} {'time s':>8} {'ms/pass':>8} {'ESS':>6} {'max w':>9} {'err 0':>8} "
        f"{'err 1':>8} {'starved':>7}"
    )
    for rho in [None, *args.relaxed]:
        relax = None if rho is None else [rho, rho]
        elapsed, result = best_of(
            args.repeat,
            lambda relax=relax: ipf(
                codes, counts.astype(float), targets, tol=args.tol, max_iter=args.max_iter, relax=relax
            ),
        )
        w = result.mass / (counts / args.rows)
        share = np.bincount(codes[:, 0], weights=result.mass, minlength=args.k)
        starved = int(((raw > 0) & (share < raw / 10)).sum())
        name = "exact" if rho is None else f"rho={rho:g}"
        print(
            f"{name:>10} {result.passes:>7} {elapsed:>8.3f} {1e3 * elapsed / max(result.passes, 1):>8.2f} "
            f"{ess(w, counts) / args.rows:>6.3f} {w.max():>9.2f} {result.errors[-1][0]:>8.1e} "
            f"{result.errors[-1][1]:>8.1e} {starved:>7}"
        )


def min_ess_search(args: argparse.Namespace) -> None:
    a, b = make_labels(args.rows, args.k, args.seed, args.independent)
    ids, counts = np.unique(a * args.k + b, return_counts=True)
    codes = np.stack([ids // args.k, ids % args.k], axis=1)
    targets = [np.full(args.k, 1 / args.k)] * 2
    bounds = None if args.bounds is None else (args.bounds[0], args.bounds[1] or None)
    print(
        f"(f) {args.rows:,} rows, K = {args.k}, {len(ids):,} cells; min_ess search, tol {args.tol:g}, "
        f"bounds {bounds}"
    )
    print(f"{'floor':>6} {'arm':>5} {'rho':>10} {'ESS':>6} {'solves':>6} {'passes':>7} {'time s':>8}")
    for floor in args.min_ess:
        for warm in (False, True):

            def solve(rho, start, warm=warm):
                return ipf(
                    codes,
                    counts.astype(float),
                    targets,
                    tol=args.tol,
                    max_iter=args.max_iter,
                    relax=[rho, rho],
                    bounds=bounds,
                    init=start if warm else None,
                )

            def ess_of(result):
                return ess(result.scaling.weights(codes), counts) / args.rows

            start = time.perf_counter()
            rho, result, frontier = strongest_within(solve, ess_of, floor, exact=False)
            elapsed = time.perf_counter() - start
            print(
                f"{floor:>6.2f} {'warm' if warm else 'cold':>5} {rho:>10.4g} {ess_of(result):>6.3f} "
                f"{len(frontier):>6} {sum(p['passes'] for p in frontier):>7} {elapsed:>8.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--independent", type=float, default=0.1)
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--max-iter", type=int, default=10_000)
    parser.add_argument("--parts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="row-path steps timed per repeat")
    parser.add_argument("--soft-rows", type=int, default=100_000)
    parser.add_argument("--soft-k", type=int, default=1000)
    parser.add_argument("--soft-iterations", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-soft", action="store_true", help="skip (d)")
    parser.add_argument("--skip-categorical", action="store_true", help="skip (a) to (c)")
    parser.add_argument("--relaxed", type=float, nargs="+", help="(e) only: relaxed strengths rho to compare")
    parser.add_argument("--min-ess", type=float, nargs="+", help="(f) only: ESS floors to search")
    parser.add_argument(
        "--bounds", type=float, nargs=2, help="(f): bound the weights to [LO, HI] (HI 0: none)"
    )
    args = parser.parse_args()
    if args.min_ess:
        print(f"load average (1 min) at start: {os.getloadavg()[0]:.2f}")
        min_ess_search(args)
        print(f"load average (1 min) at end: {os.getloadavg()[0]:.2f}")
        return
    if args.relaxed:
        print(f"load average (1 min) at start: {os.getloadavg()[0]:.2f}")
        relaxed(args)
        print(f"load average (1 min) at end: {os.getloadavg()[0]:.2f}")
        return

    blas = "unknown"
    try:
        from threadpoolctl import threadpool_info

        info = [i for i in threadpool_info() if i.get("user_api") == "blas"]
        blas = ", ".join(f"{i['internal_api']} {i.get('version')} {i.get('architecture')}" for i in info[:1])
    except ImportError:
        pass
    print(
        f"machine: {os.cpu_count()} cpus, {platform.machine()}, numpy {np.__version__}, "
        f"POT {ot.__version__}, BLAS {blas}, OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '-')}"
    )
    load = os.getloadavg()[0]
    c = None if args.skip_categorical else categorical(args)
    s = None if args.skip_soft else soft(args)
    load_end = os.getloadavg()[0]
    if c is not None:
        report_categorical(args, c)
    if s is not None:
        report_soft(args, s)
    print(f"\nload average (1 min) at start / end: {load:.2f} / {load_end:.2f}")


def report_categorical(args: argparse.Namespace, c: dict[str, Any]) -> None:
    k = args.k
    print(
        f"\ncategorical: {args.rows:,} rows, K = {k} x {k}, {c['cells']:,} cells ({c['cells'] / k / k:.1%} "
        f"of K^2), {args.independent:.0%} independent text labels, uniform targets, tol {args.tol:g} (TV)"
    )
    table, solve, lookup = c["cell_unique_parts_s"]
    ctable, csolve, clookup = c["cell_count_parts_s"]
    pot_note = f"{c['pot_iterations']} it, solve {c['pot_solve_s']:.3f} s"
    rows = [
        ("(a)  cell path, np.unique table", c["cell_unique_s"], f"{c['passes']} passes", c["cell_error"]),
        ("       table / ipf / row lookup", None, f"{table:.3f} / {solve:.3f} / {lookup:.3f} s", None),
        ("(a') cell path, bincount table", c["cell_count_s"], f"omega up to {c['omega']:.3f}", None),
        ("       table / ipf / row lookup", None, f"{ctable:.3f} / {csolve:.3f} / {clookup:.3f} s", None),
        (
            "       ipf solve, plain (omega 1)",
            c["ipf_plain_s"],
            f"{c['plain_passes']} passes",
            c["plain_error"],
        ),
        ("(c)  POT ot.sinkhorn, dense K x K", c["pot_s"], pot_note, c["pot_error"]),
        (
            f"(b)  row path ipf_rows, {args.parts} parts",
            c["rows_s"],
            f"{c['row_passes']} passes",
            c["row_error"],
        ),
        ("       the same, plain (omega 1)", c["rows_plain_s"], f"{c['row_plain_passes']} passes", None),
        ("       one row-path step", c["row_step_s"], "apply ratio + next sums", None),
        ("       one np.bincount, all rows", c["bincount_s"], "the floor", None),
    ]
    print_rows(rows)
    e2e, e2e_count = c["pot_s"] / c["cell_unique_s"], c["pot_s"] / c["cell_count_s"]
    step = c["row_step_s"] / c["bincount_s"]
    print("ratios (target):")
    print(f"  POT / cell path, end to end, np.unique table   {e2e:7.2f}x  (>= 10x: {verdict(e2e >= 10)})")
    print(f"  POT / cell path, end to end, bincount table    {e2e_count:7.2f}x")
    print(f"  POT / (count + lookup), ceiling of the above   {c['pot_s'] / (ctable + clookup):7.2f}x")
    print(f"  POT solve / ipf solve                          {c['pot_solve_s'] / c['ipf_solve_s']:7.2f}x")
    print(f"  plain / over-relaxed ipf solve                 {c['ipf_plain_s'] / c['ipf_solve_s']:7.2f}x")
    print(f"  plain / over-relaxed row path                  {c['rows_plain_s'] / c['rows_s']:7.2f}x")
    print(f"  row-path step / bincount pass                  {step:7.2f}x  (<= 2x: {verdict(step <= 2)})")
    print("agreement:")
    print(f"  row path vs cell path weights, max relative      {c['row_vs_cell_max_rel']:.1e}")
    print(f"  bincount vs np.unique cell path, max relative    {c['count_vs_unique_max_rel']:.1e}")
    print(f"  POT vs cell path weights (both at tol), max rel  {c['pot_vs_cell_max_rel']:.1e}")


def report_soft(args: argparse.Namespace, s: dict[str, Any]) -> None:
    it = f"{args.soft_iterations} it"
    print(f"\nsoft: {args.soft_rows:,} x {args.soft_k} cosine scores, T = 0.05, uniform column marginal")
    rows = [
        ("(d)  soft_sinkhorn", s["soft_s"], it, s["soft_error"]),
        ("       POT sinkhorn_log, same problem", s["pot_log_s"], it, None),
        (f"       soft_sinkhorn_parts, {args.parts} parts", s["soft_parts_s"], it, None),
        (
            "       soft_sinkhorn to tol",
            s["soft_tol_s"],
            f"{s['soft_tol_iterations']} it",
            s["soft_tol_error"],
        ),
    ]
    print_rows(rows)
    ratio = s["pot_log_s"] / s["soft_s"]
    print("ratios (target):")
    print(f"  POT sinkhorn_log / soft_sinkhorn               {ratio:7.1f}x  (>= 1x: {verdict(ratio >= 1)})")
    print("agreement:")
    print(f"  soft_sinkhorn vs POT sinkhorn_log codes, max abs {s['soft_vs_pot_max_abs']:.1e}")
    print(f"  parts vs single-process codes, max abs           {s['soft_parts_vs_single']:.1e}")


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def print_rows(rows: list[tuple[str, float | None, str, float | None]]) -> None:
    print(f"{'':38s} {'seconds':>9s}  {'':34s} {'final error':>11s}")
    for name, seconds, note, error in rows:
        sec = f"{seconds:9.4f}" if seconds is not None else " " * 9
        err = f"{error:11.2e}" if error is not None else ""
        print(f"{name:38s} {sec}  {note:34s} {err}".rstrip())


if __name__ == "__main__":
    main()
