"""Relaxed marginals (``relax``): min KL(q || p) + sum_m rho_m KL(q_m || t_m), against POT's unbalanced
Sinkhorn, hand-computed cases, its limits and the two paths."""

import numpy as np
import ot
import pytest

from rebalance.kernels.ipf import ipf, ipf_rows


def _dense(seed: int, k0: int = 4, k1: int = 5):
    rng = np.random.default_rng(seed)
    p = rng.random((k0, k1)) ** 3
    p /= p.sum()
    codes = np.array([(i, j) for i in range(k0) for j in range(k1)])
    return p, codes, np.full(k0, 1 / k0), rng.dirichlet(np.ones(k1))


def _q(result, p, codes):
    """The unnormalised solution q = p * f_0 * f_1 on the dense table."""
    f = result.log_factors
    return p.ravel() * np.exp(f[0][codes[:, 0]] + f[1][codes[:, 1]])


@pytest.mark.parametrize("rho", [0.3, 1.0, 4.0, (0.5, 3.0)])
def test_matches_pot_unbalanced_sinkhorn(rho):
    # POT solves min <g, M> + reg KL(g || c) + reg_m1 KL(g 1 || a) + reg_m2 KL(g^T 1 || b). With c = 1,
    # reg = 1 and M = -log p: <g, -log p> + sum g log g - g + 1 = KL(g || p) + const, so reg_m = rho.
    p, codes, t0, t1 = _dense(0)
    rhos = rho if isinstance(rho, tuple) else (rho, rho)
    result = ipf(codes, p.ravel(), [t0, t1], relax=list(rhos), tol=1e-14, max_iter=20000)
    assert result.converged
    g = ot.unbalanced.sinkhorn_unbalanced(
        t0,
        t1,
        -np.log(p),
        reg=1.0,
        reg_m=rhos,
        reg_type="kl",
        c=np.ones_like(p),
        numItermax=200000,
        stopThr=1e-16,
    )
    np.testing.assert_allclose(_q(result, p, codes), g.ravel(), rtol=1e-8, atol=1e-14)
    # the mass returned is q normalised; the marginals keep a distance to the targets by design
    np.testing.assert_allclose(result.mass, g.ravel() / g.sum(), rtol=1e-8)
    assert result.final_error > 1e-3


def test_hand_computed_diagonal_2x2():
    # p = diag(1/2, 1/2), t_0 = t_1 = (0.8, 0.2), rho = 1 (exponent 1/2): by symmetry f_0 = f_1 = x with
    # x = (t / (p x))^(1/2), so x^3 = t / p: q_00 = p (1.6)^(2/3), q_11 = p (0.4)^(2/3).
    codes = np.array([[0, 0], [1, 1]])
    t = np.array([0.8, 0.2])
    result = ipf(codes, np.array([0.5, 0.5]), [t, t], relax=[1.0, 1.0], tol=1e-14)
    q = np.array([0.5 * 1.6 ** (2 / 3), 0.5 * 0.4 ** (2 / 3)])
    np.testing.assert_allclose(np.exp(result.log_factors[0] + result.log_factors[1]) * 0.5, q, rtol=1e-12)
    np.testing.assert_allclose(result.mass, q / q.sum(), rtol=1e-12)


def test_one_marginal_closed_form_and_fixed_point():
    # one marginal: q_m = p_m^(1 / (1 + rho)) t_m^(rho / (1 + rho)), in one step
    rng = np.random.default_rng(1)
    p, t, rho = rng.dirichlet(np.ones(6)), rng.dirichlet(np.ones(6)), 2.5
    result = ipf(np.arange(6)[:, None], p, [t], relax=[rho], tol=1e-14)
    a = rho / (1 + rho)
    expected = p ** (1 - a) * t**a
    np.testing.assert_allclose(result.mass, expected / expected.sum(), rtol=1e-12)
    # two marginals: the optimality condition log f_m = rho_m (log t_m - log q_m)
    p2, codes, t0, t1 = _dense(2)
    r2 = ipf(codes, p2.ravel(), [t0, t1], relax=[0.7, 2.0], tol=1e-14, max_iter=20000)
    q = _q(r2, p2, codes)
    for m, (t_m, rho_m) in enumerate([(t0, 0.7), (t1, 2.0)]):
        q_m = np.bincount(codes[:, m], weights=q)
        np.testing.assert_allclose(r2.log_factors[m], rho_m * (np.log(t_m) - np.log(q_m)), atol=1e-10)


def test_setting_the_factor_differs_from_multiplying_a_damped_ratio():
    # Multiplying (t / q_m)^a onto the accumulated weights has the exact marginals as its fixed point; the
    # relaxed step sets the factor and keeps a finite distance.
    p, codes, t0, t1 = _dense(3)
    exact = ipf(codes, p.ravel(), [t0, t1], tol=1e-13)
    relaxed = ipf(codes, p.ravel(), [t0, t1], relax=[1.0, 1.0], tol=1e-13)
    q, a = p.copy(), 0.5
    for _ in range(2000):
        q *= ((t0 / q.sum(1)) ** a)[:, None]
        q *= (t1 / q.sum(0)) ** a
    np.testing.assert_allclose((q / q.sum()).ravel(), exact.mass, atol=1e-9)
    assert np.abs(relaxed.mass - exact.mass).max() > 1e-3
    assert relaxed.final_error > 1e-2 and exact.final_error < 1e-12


def test_limits_rho_zero_and_infinite():
    p, codes, t0, t1 = _dense(4)
    none = ipf(codes, p.ravel(), [t0, t1], relax=[0.0, 0.0])
    np.testing.assert_allclose(none.mass, p.ravel(), rtol=1e-14)
    assert all((f == 0).all() for f in none.log_factors)
    exact = ipf(codes, p.ravel(), [t0, t1], tol=1e-12)
    for rho, atol in ((1e4, 1e-3), (np.inf, 1e-12)):
        strong = ipf(codes, p.ravel(), [t0, t1], relax=[rho, rho], tol=1e-12, max_iter=5000)
        np.testing.assert_allclose(strong.mass, exact.mass, atol=atol)
    # larger rho, closer to the targets
    errs = [ipf(codes, p.ravel(), [t0, t1], relax=[r, r], tol=1e-12).final_error for r in (0.5, 2, 8)]
    assert errs[0] > errs[1] > errs[2]


def test_relaxed_passes_are_never_over_relaxed():
    p, codes, t0, t1 = _dense(5)
    auto = ipf(codes, p.ravel(), [t0, t1], relax=[2.0, 2.0], tol=1e-12, omega="auto")
    plain = ipf(codes, p.ravel(), [t0, t1], relax=[2.0, 2.0], tol=1e-12, omega=1.0)
    assert (auto.omegas == 1).all() and auto.passes == plain.passes
    np.testing.assert_array_equal(auto.mass, plain.mass)
    # one relaxed and one exact marginal: the exact one is met, no over-relaxation
    mixed = ipf(codes, p.ravel(), [t0, t1], relax=[2.0, None], tol=1e-12)
    assert (mixed.omegas == 1).all() and mixed.converged
    assert mixed.errors[-1][1] < 1e-12 and mixed.errors[-1][0] > 1e-3


def test_relaxed_marginal_tolerates_missing_mass_and_zero_targets():
    # label 2 of marginal 0 has no cells (positive target: an exact marginal would refuse); label 0 of
    # marginal 1 has target 0: its cells get weight 0
    codes = np.array([[0, 0], [0, 1], [1, 1], [1, 2]])
    t0, t1 = np.array([0.3, 0.3, 0.4]), np.array([0.0, 0.5, 0.5])
    result = ipf(codes, np.ones(4), [t0, t1], relax=[1.0, 1.0], tol=1e-13)
    assert result.converged and result.mass[0] == 0 and (result.mass[1:] > 0).all()


@pytest.mark.parametrize("n_marginals", [2, 3])
def test_row_path_equals_cell_path(n_marginals):
    rng = np.random.default_rng(6)
    sizes = [5, 7, 3][:n_marginals]
    rows = np.stack([rng.zipf(1.6, 4000) % k for k in sizes], axis=1)
    targets = [np.full(k, 1 / k) for k in sizes]
    relax = [1.0, 3.0, None][:n_marginals]
    cells, inverse, counts = np.unique(rows, axis=0, return_inverse=True, return_counts=True)
    cell = ipf(cells, counts.astype(float), targets, relax=relax, tol=1e-11)
    cuts = np.sort(rng.choice(np.arange(1, len(rows)), 3, replace=False))
    row = ipf_rows(np.split(rows, cuts), targets, relax=relax, tol=1e-11)
    assert row.passes == cell.passes and row.converged
    cell_w = (cell.mass / (counts / counts.sum()))[inverse.ravel()]
    np.testing.assert_allclose(np.concatenate(row.weights), cell_w, rtol=1e-9)
    np.testing.assert_allclose(row.scaling.weights(rows), cell_w, rtol=1e-9)


def test_relax_input_errors():
    codes, mass, t = np.array([[0], [1]]), np.ones(2), [np.array([0.5, 0.5])]
    with pytest.raises(ValueError, match="one strength per marginal"):
        ipf(codes, mass, t, relax=[1.0, 1.0])
    with pytest.raises(ValueError, match=">= 0"):
        ipf(codes, mass, t, relax=[-1.0])


def test_strongest_within_an_ess_floor():
    from rebalance.kernels.ipf import ess, strongest_within

    rng = np.random.default_rng(7)
    rows = np.stack([rng.zipf(1.5, 3000) % 12, rng.zipf(1.5, 3000) % 9], axis=1)
    cells, counts = np.unique(rows, axis=0, return_counts=True)
    targets = [np.full(12, 1 / 12), np.full(9, 1 / 9)]

    def solve(rho, start=None):
        relax = None if rho is None else [rho, rho]
        return ipf(cells, counts.astype(float), targets, relax=relax, tol=1e-10, init=start)

    def ess_of(result):
        return ess(result.mass / counts, counts) / counts.sum()

    exact_ess = ess_of(solve(None))
    rho, result, frontier = strongest_within(solve, ess_of, exact_ess - 1e-9)
    assert rho is None and len(frontier) == 1  # exact already meets the floor
    floor = 0.5 * (exact_ess + 1.0)
    rho, result, frontier = strongest_within(solve, ess_of, floor, steps=12)
    assert rho is not None and ess_of(result) >= floor
    # the strongest: a slightly larger strength falls below the floor (ESS decreases in rho)
    assert ess_of(solve(rho * 1.05)) < floor
    assert frontier[0]["rho"] == "exact" and all(f["ess"] >= floor for f in frontier if f["rho"] == rho)
    tried = sorted((f["rho"], f["ess"]) for f in frontier[1:])
    assert all(a[1] >= b[1] for a, b in zip(tried, tried[1:], strict=False))
