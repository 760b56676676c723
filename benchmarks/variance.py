"""Does k-pass balancing shrink an estimator's variance as Liu et al. (2024) predict? Measured by Monte Carlo.

    nice -n 10 .venv/bin/python benchmarks/variance.py            # full: 4 settings, 2,000 datasets each
    .venv/bin/python benchmarks/variance.py --quick                # 1 setting, under a minute (smoke test)
    .venv/bin/python benchmarks/variance.py --json out.json        # also write every number as JSON

Setting. A joint P of (X, Y) on an m x m grid (m = 2^depth) whose normalised joint D^(-1/2) P D^(-1/2) has a
chosen spectrum: the m labels are the leaves of a balanced binary tree, both marginals are one non-uniform
p, and

    P = r_0 diag(p) + sum_{l=1..depth-1} r_l B_l + r_depth p p^T,   B_l(x, y) = p_x p_y / p(b) 1{x, y in block b}

with B_l the "same block at level l" coupling (blocks of 2^l leaves). Every term is a non-negative joint with
marginals p, and D^(-1/2) B_l D^(-1/2) is the L2(p) projection on functions constant on level-l blocks, so
the singular values are 1, then spectrum[0] (functions of the top split, multiplicity 1), spectrum[1]
(multiplicity 2), ..., spectrum[depth - 1] (within pairs, multiplicity m/2), for any decreasing spectrum in
[0, 1): r_0 = spectrum[-1], r_l = spectrum[-1-l] - spectrum[-l], r_depth = 1 - spectrum[0].
``joint_singular_values`` recomputes the spectrum from P as a check.

Estimators of theta = E_P[h] from n rows drawn from P: the plain empirical mean (k = 0) and the k-pass
balanced one, theta_k = sum_cells ipf(cells, counts, [P_X, P_Y], iterations=k).mass * h (rebalance's own
kernel, one pass = an X-step then a Y-step, true marginals as targets). Test functions:

- ``worst``: h = a(x) - s_2 a(y), a the standardised indicator of the top split (the top singular function).
  sigma_inf = 0 and sigma_k^2 / Var(h) = s_2^(4k-2) exactly: it attains ``balanced_variance_factor``.
- ``cell``: h = 1{x = y = m - 1} (a cell probability; m - 1 is the label of smallest mass).
- ``xy``: h = x y / (m - 1)^2 (a mixed moment; part of its variance is not additive, so sigma_inf > 0).

Printed per k: the measured ratio MSE_k / MSE_0 over the datasets (same datasets for every k), its Monte
Carlo standard error (delta method on the paired ratio of means), the predicted ratio sigma_k^2 / sigma_0^2
from ``balanced_variance`` (the asymptotic variance of this h), the worst-case factor
``balanced_variance_factor(s_2, k)`` and the bound it implies for this h, sigma_inf^2 / Var(h) + factor,
and z = (measured - predicted) / SE. ``plug-in``: the factor at each dataset's own s_2 (its
``joint_singular_values``, as the balance stage reports it), averaged over the datasets: a sample's s_2
scatters around the population's and is biased upward, and s_2^(4k - 2) magnifies that for large k.

Corrupted targets (Liu et al.'s third check): the same datasets balanced toward t_X ~ Dirichlet(alpha p),
t_Y ~ Dirichlet(alpha p), drawn afresh per dataset. Dirichlet(alpha p) has covariance (diag(p) - p p^T) /
(alpha + 1), the covariance of an empirical marginal of alpha + 1 rows, so ``nu`` = n / (alpha + 1) is the
target noise relative to the sampling noise of the data's own marginals. Linearising in the noise,
MSE_k = sigma_k^2 / n + tau_k^2 / (alpha + 1), with tau_k^2 = Var_p(g_X) + Var_p(g_Y) and g the gradient of
theta_k(t_X, t_Y) at the true marginals, taken by central differences of ``ipf`` on P itself; the predicted
ratio is sigma_k^2 / Var(h) + nu tau_k^2 / Var(h). k = 0 does not use the targets; balancing helps while
the ratio is below 1.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from rebalance.kernels.ipf import ipf
from rebalance.kernels.spectra import balanced_variance, balanced_variance_factor, joint_singular_values

A, B = (0.5, 0.3, 0.1), (0.9, 0.6, 0.3)
# runs: (spectrum, rows per dataset, target-noise levels nu); the sweep over n at spectrum A shows how the
# finite-sample excess over the asymptotic prediction shrinks with n.
FULL = {
    "runs": [(A, 500, []), (A, 2000, [0.1, 1.0]), (A, 8000, []), (B, 2000, [0.1, 1.0])],
    "reps": 2000,
    "passes": 6,
}
QUICK = {"runs": [(A, 2000, [1.0])], "reps": 1000, "passes": 6}
STEP = 1e-4  # central-difference step for the target gradient


def tree_marginal(depth: int) -> np.ndarray:
    """A non-uniform marginal on 2^depth leaves: p_i proportional to 1 / sqrt(i + 1)."""
    p = 1.0 / np.sqrt(np.arange(1, 2**depth + 1))
    return p / p.sum()


def tree_joint(p: np.ndarray, spectrum: tuple[float, ...]) -> np.ndarray:
    """The (m, m) joint with marginals p and singular values 1, spectrum[0], ..., spectrum[-1] (module doc).

    p: (m,), m = 2^len(spectrum); spectrum decreasing in [0, 1): level 0 (the top split) first.
    """
    depth = len(spectrum)
    m = p.size
    s = np.asarray(spectrum, dtype=np.float64)
    if m != 2**depth or (np.diff(s) > 0).any() or s.min() < 0 or s.max() >= 1:
        raise ValueError("need 2^len(spectrum) labels and a decreasing spectrum in [0, 1)")
    joint = s[-1] * np.diag(p) + (1 - s[0]) * np.outer(p, p)
    # level l: blocks of 2^l leaves, coupling weight spectrum[-1-l] - spectrum[-l]
    for level in range(1, depth):
        block = np.arange(m) // 2**level
        same = block[:, None] == block[None, :]
        mass = np.bincount(block, weights=p)
        joint += (s[-1 - level] - s[-level]) * np.outer(p, p) * same / mass[block][:, None]
    return joint


def test_functions(p: np.ndarray, s2: float) -> dict[str, np.ndarray]:
    """The (m, m) functions h(x, y) of the module docstring."""
    m = p.size
    top = (np.arange(m) < m // 2).astype(float)
    w = p @ top
    a = (top - w) / np.sqrt(w * (1 - w))
    grid = np.arange(m) / (m - 1)
    cell = np.zeros((m, m))
    cell[-1, -1] = 1.0
    return {
        "worst": a[:, None] - s2 * a[None, :],
        "cell": cell,
        "xy": np.outer(grid, grid),
    }


def target_sensitivity(joint: np.ndarray, hs: np.ndarray, passes: int) -> np.ndarray:
    """tau_k^2 for k = 0..passes and every h: Var_p of the gradient of theta_k in each target, summed.

    hs: (cells, H). Returns (passes + 1, H). theta_k(t_X, t_Y) = ipf(P, [t_X, t_Y], k) . h; the derivative
    along e_i - p (a direction that keeps the target on the simplex) is g_i - p.g, whose p-variance is that
    of g, and Var(g . delta) = Var_p(g) / (alpha + 1) for delta ~ Dirichlet(alpha p) - p.
    """
    m = joint.shape[0]
    codes = np.stack(np.divmod(np.arange(m * m), m), axis=1)
    marginals = [joint.sum(1), joint.sum(0)]
    tau2 = np.zeros((passes + 1, hs.shape[1]))
    for k in range(1, passes + 1):
        for side, p in enumerate(marginals):
            grad = np.zeros((m, hs.shape[1]))
            for i in range(m):
                step = STEP * (np.eye(m)[i] - p)
                theta = []
                for sign in (1, -1):
                    targets = list(marginals)
                    targets[side] = p + sign * step
                    theta.append(ipf(codes, joint.reshape(-1), targets, iterations=k).mass @ hs)
                grad[i] = (theta[0] - theta[1]) / (2 * STEP)
            tau2[k] += p @ grad**2 - (p @ grad) ** 2
    return tau2


def simulate(
    joint: np.ndarray, hs: np.ndarray, n: int, reps: int, passes: int, nus: list[float], seed: int
) -> dict[str, np.ndarray | int]:
    """Squared errors of theta_k over ``reps`` datasets of n rows drawn from ``joint``.

    Returns clean (reps, passes + 1, H); noisy (len(nus), reps, passes + 1, H), k = 0 copied from clean
    (the empirical estimator does not use the targets); s2 (reps,), each dataset's own s_2
    (``joint_singular_values`` of its counts); redrawn, the number of datasets drawn again because a label
    had no row (a target on it cannot be met; the theory conditions on this event).
    """
    rng = np.random.default_rng(seed)
    m = joint.shape[0]
    codes = np.stack(np.divmod(np.arange(m * m), m), axis=1)
    flat = joint.reshape(-1)
    p_x, p_y = joint.sum(1), joint.sum(0)
    theta = flat @ hs
    clean = np.empty((reps, passes + 1, hs.shape[1]))
    noisy = np.empty((len(nus), reps, passes + 1, hs.shape[1]))
    s2 = np.empty(reps)
    redrawn = 0
    for r in range(reps):
        while True:
            counts = rng.multinomial(n, flat)
            table = counts.reshape(m, m)
            if (table.sum(1) > 0).all() and (table.sum(0) > 0).all():
                break
            redrawn += 1
        s2[r] = joint_singular_values(table)[1]
        seen = counts > 0
        c, h = codes[seen], hs[seen]
        clean[r, 0] = counts[seen] / n @ h - theta
        for k in range(1, passes + 1):
            clean[r, k] = ipf(c, counts[seen], [p_x, p_y], iterations=k).mass @ h - theta
        for j, nu in enumerate(nus):
            alpha = n / nu - 1
            targets = [rng.dirichlet(alpha * p_x), rng.dirichlet(alpha * p_y)]
            noisy[j, r, 0] = clean[r, 0]
            for k in range(1, passes + 1):
                noisy[j, r, k] = ipf(c, counts[seen], targets, iterations=k).mass @ h - theta
    return {"clean": clean**2, "noisy": noisy**2, "s2": s2, "redrawn": redrawn}


def paired_ratio(sq: np.ndarray, sq0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """mean(sq) / mean(sq0) over axis 0 and its delta-method standard error sqrt(Var(A - R B) / N) / mean(B)."""
    ratio = sq.mean(0) / sq0.mean(0)
    se = (sq - ratio * sq0).std(0, ddof=1) / np.sqrt(sq.shape[0]) / sq0.mean(0)
    return ratio, se


def run(spectrum: tuple[float, ...], n: int, nus: list[float], reps: int, passes: int, seed: int) -> dict:
    """One setting: predictions from the product's formulas, then the Monte Carlo measurement."""
    p = tree_marginal(len(spectrum))
    joint = tree_joint(p, spectrum)
    sv = joint_singular_values(joint)
    s2 = float(sv[1])
    funcs = test_functions(p, s2)
    names = list(funcs)
    hs = np.stack([funcs[name].reshape(-1) for name in names], axis=1)
    ks = np.arange(passes + 1)
    var0 = np.array([balanced_variance(joint, funcs[name], 0) for name in names])
    predicted = (
        np.array([[balanced_variance(joint, funcs[name], int(k)) for name in names] for k in ks]) / var0
    )
    floor = np.array([balanced_variance(joint, funcs[name], None) for name in names]) / var0
    factor = balanced_variance_factor(s2, ks)
    tau2 = target_sensitivity(joint, hs, passes) / var0
    with np.errstate(divide="ignore"):
        break_even = np.where(tau2 > 0, (1 - predicted) / np.where(tau2 > 0, tau2, 1), np.inf)

    start = time.perf_counter()
    sim = simulate(joint, hs, n, reps, passes, nus, seed)
    seconds = time.perf_counter() - start
    measured, se = paired_ratio(sim["clean"], sim["clean"][:, :1])
    plugin = balanced_variance_factor(sim["s2"][:, None], ks[None, :]).mean(0)
    return {
        "spectrum": list(spectrum),
        "singular_values": sv.tolist(),
        "s2": s2,
        "empirical_s2_mean": float(sim["s2"].mean()),
        "empirical_s2_sd": float(sim["s2"].std()),
        "marginal": p.tolist(),
        "functions": names,
        "n": n,
        "reps": reps,
        "seed": seed,
        "redrawn": sim["redrawn"],
        "seconds": seconds,
        "k": ks.tolist(),
        "var0_times_n": var0.tolist(),
        "measured": measured.tolist(),
        "se": se.tolist(),
        "predicted": predicted.tolist(),
        "floor": floor.tolist(),
        "factor": factor.tolist(),
        "plugin_factor": plugin.tolist(),
        "bound": (floor[None, :] + factor[:, None]).tolist(),
        "break_even_nu": break_even[1:].tolist(),
        "noise": [
            {
                "nu": nu,
                "alpha": n / nu - 1,
                "measured": ratio.tolist(),
                "se": err.tolist(),
                "predicted": (predicted + nu * tau2).tolist(),
            }
            for nu, (ratio, err) in zip(
                nus, (paired_ratio(sq, sim["clean"][:, :1]) for sq in sim["noisy"]), strict=True
            )
        ],
    }


def print_run(res: dict) -> None:
    names = res["functions"]
    print(
        f"\nspectrum {res['spectrum']} (joint_singular_values: {', '.join(f'{v:.3f}' for v in res['singular_values'])}), "
        f"s_2 = {res['s2']:.3f}; n = {res['n']}, {res['reps']} datasets ({res['redrawn']} redrawn), "
        f"their own s_2 {res['empirical_s2_mean']:.3f} +- {res['empirical_s2_sd']:.3f}; {res['seconds']:.0f} s"
    )
    measured, se, predicted = (np.array(res[key]) for key in ("measured", "se", "predicted"))
    bound, factor, plugin = (np.array(res[key]) for key in ("bound", "factor", "plugin_factor"))
    print("MSE_k / MSE_0 measured +- SE | predicted sigma_k^2 / sigma_0^2 | bound from factor | z")
    print(
        f"{'k':>2} {'factor':>9} {'plug-in':>9} "
        + " ".join(f"{name + ' meas':>19} {'pred':>9} {'bound':>8} {'z':>5}" for name in names)
    )
    for k in res["k"]:
        cells = []
        for j in range(len(names)):
            z = (measured[k, j] - predicted[k, j]) / se[k, j] if se[k, j] > 0 else 0.0
            cells.append(
                f"{measured[k, j]:>10.3g} +- {se[k, j]:<5.2g} {predicted[k, j]:>9.3g} {bound[k, j]:>8.3g} {z:>5.1f}"
            )
        print(f"{k:>2} {factor[k]:>9.3g} {plugin[k]:>9.3g} " + " ".join(cells))
    if not res["noise"]:
        return
    print(
        "targets ~ Dirichlet(alpha p), nu = n / (alpha + 1): MSE_k / MSE_0 measured +- SE (linearised prediction); "
        "break-even nu (prediction = 1)"
    )
    heads = [f"{name} nu={d['nu']:g}" for name in names for d in res["noise"]]
    print(
        f"{'k':>2} "
        + " ".join(f"{head:>26}" for head in heads)
        + " "
        + " ".join(f"{name + ' nu*':>9}" for name in names)
    )
    for k in res["k"][1:]:
        cells = [
            f"{d['measured'][k][j]:>8.3g} +- {d['se'][k][j]:<5.2g} ({d['predicted'][k][j]:<6.3g})"
            for j in range(len(names))
            for d in res["noise"]
        ]
        print(
            f"{k:>2} " + " ".join(cells) + " " + " ".join(f"{v:>9.3g}" for v in res["break_even_nu"][k - 1])
        )


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the tables, return (and with --json write) every number."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one setting, 1,500 datasets (under a minute)")
    parser.add_argument("--reps", type=int, default=None, help="datasets per setting (default: by mode)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    cfg["reps"] = args.reps or cfg["reps"]
    if cfg["reps"] < 2:
        parser.error("--reps must be >= 2")

    start, cpu = time.perf_counter(), time.process_time()
    results = []
    for i, (spectrum, n, nus) in enumerate(cfg["runs"]):
        results.append(run(spectrum, n, nus, cfg["reps"], cfg["passes"], args.seed + i))
        print_run(results[-1])
    total, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"\ntime {total:.0f} s wall, {cpu:.0f} s CPU")
    summary = {"config": cfg, "seconds": total, "cpu_seconds": cpu, "results": results}
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
