"""Bounded weights (``balance.bounds``): w_c = clip(exp(sum_m log f_m), lo, hi) inside the iteration, against a
hand-computed case, scipy's constrained minimiser on the primal, the unbounded kernel and its errors."""

import numpy as np
import pytest
from scipy.optimize import minimize

from rebalance.kernels.ipf import BoundsError, ipf, ipf_bounded, strongest_within
from rebalance.kernels.scaling import Scaling


def _table(seed: int, k0: int = 3, k1: int = 4):
    rng = np.random.default_rng(seed)
    p = 0.5 * rng.random((k0, k1)) ** 2 + 0.02
    p /= p.sum()
    codes = np.array([(i, j) for i in range(k0) for j in range(k1)])
    # targets between the data's marginals and uniform: within the bounds the tests use, label by label
    t0, t1 = 0.5 * p.sum(1) + 0.5 / k0, 0.5 * p.sum(0) + 0.5 / k1
    return p.ravel(), codes, t0, t1


def _primal(p, codes, targets, bounds, rhos):
    """min sum q log(q / p) - q + p + sum_m rho_m KL(q_m || t_m) with the exact marginals (rho None) as
    constraints, sum q = 1 and lo p <= q <= hi p, by scipy (SLSQP), independent of the kernel."""
    lo, hi = bounds

    def margin(q, m):
        return np.bincount(codes[:, m], weights=q, minlength=targets[m].size)

    def objective(q):
        value = (q * np.log(q / p) - q + p).sum()
        grad = np.log(q / p)
        for m, rho in enumerate(rhos):
            if rho is not None:
                qm, t = margin(q, m), targets[m]
                value += rho * (qm * np.log(qm / t) - qm + t).sum()
                grad = grad + rho * np.log(qm / t)[codes[:, m]]
        return value, grad

    constraints = [{"type": "eq", "fun": lambda q: q.sum() - 1, "jac": lambda q: np.ones_like(q)}]
    for m, rho in enumerate(rhos):
        if rho is None:  # the last label of each exact marginal follows from the total
            onehot = (codes[:, m][None, :] == np.arange(targets[m].size - 1)[:, None]).astype(float)
            constraints.append(
                {
                    "type": "eq",
                    "fun": lambda q, m=m, a=onehot: a @ q - targets[m][:-1],
                    "jac": lambda q, a=onehot: a,
                }
            )
    solution = minimize(
        objective,
        np.clip(p, lo * p, hi * p),
        jac=True,
        method="SLSQP",
        bounds=list(zip(lo * p, hi * p, strict=True)),
        constraints=constraints,
        options={"ftol": 1e-15, "maxiter": 2000},
    )
    assert solution.success, solution.message
    return solution.x / p


def test_hand_computed_2x2_with_an_active_upper_bound():
    # p uniform (1/4 each), t_0 = t_1 = (0.6, 0.4). Unbounded, q = t_0 t_1^T: w_00 = 0.36 / 0.25 = 1.44.
    # With hi = 1.3 the table with these marginals has one free entry, q_00, and the objective is strictly
    # convex in it, so the bound clamps it: q_00 = 1.3 / 4 = 0.325, q_01 = q_10 = 0.6 - 0.325 = 0.275
    # (w = 1.1), q_11 = 0.4 - 0.275 = 0.125 (w = 0.5). It is the clip form: w_01 w_10 / w_11 = 2.42 =
    # exp(a_0 + b_0) >= 1.3, so w_00 = clip(2.42, ., 1.3) = 1.3.
    codes = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])
    t = np.array([0.6, 0.4])
    result = ipf(codes, np.full(4, 0.25), [t, t], bounds=(0.0, 1.3), tol=1e-13)
    assert result.converged
    np.testing.assert_allclose(result.scaling.weights(codes), [1.3, 1.1, 1.1, 0.5], rtol=1e-12)
    np.testing.assert_allclose(result.mass, [0.325, 0.275, 0.275, 0.125], rtol=1e-12)
    f0, f1 = result.log_factors
    assert np.exp(f0[0] + f1[0]) >= 1.3 and np.exp(f0[1] + f1[1]) == pytest.approx(0.5, rel=1e-12)
    # a lower bound of 0.6 as well: q_11 = q_00 - 0.2 >= 0.15 needs q_00 >= 0.35 > 0.325: no table meets
    # both, though each value alone can (0.6 p_l <= t_l <= 1.3 p_l); the iteration reports the error it keeps
    both = ipf(codes, np.full(4, 0.25), [t, t], bounds=(0.6, 1.3), tol=1e-10, max_iter=300)
    w = both.scaling.weights(codes)
    assert not both.converged and both.final_error > 1e-3
    assert (w >= 0.6 - 1e-12).all() and (w <= 1.3 + 1e-12).all()


@pytest.mark.parametrize("bounds", [(0.5, 2.2), (0.7, None), (0.0, 2.0)])
def test_exact_marginals_match_the_constrained_primal(bounds):
    p, codes, t0, t1 = _table(0)
    result = ipf(codes, p, [t0, t1], bounds=bounds, tol=1e-13, max_iter=5000)
    assert result.converged
    w = result.scaling.weights(codes)
    expected = _primal(p, codes, [t0, t1], (bounds[0], bounds[1] or np.inf), [None, None])
    np.testing.assert_allclose(w, expected, atol=1e-6)
    hi = bounds[1] or np.inf
    assert ((w > bounds[0] + 1e-6) & (w < hi - 1e-6)).sum() < w.size  # some bound is active
    assert (w >= bounds[0] - 1e-12).all() and (w <= hi + 1e-12).all()
    assert result.final_error < 1e-13 and (p * w).sum() == pytest.approx(1.0, abs=1e-13)


@pytest.mark.parametrize(("rhos", "bounds"), [((1.0, 3.0), (0.9, 1.2)), ((2.0, None), (0.9, 1.3))])
def test_relaxed_and_bounded_match_the_penalised_primal(rhos, bounds):
    p, codes, t0, t1 = _table(1)
    result = ipf(codes, p, [t0, t1], bounds=bounds, relax=list(rhos), tol=1e-13, max_iter=5000)
    assert result.converged
    w = result.scaling.weights(codes)
    np.testing.assert_allclose(w, _primal(p, codes, [t0, t1], bounds, list(rhos)), atol=1e-6)
    # weights relative to the mean: the total block keeps sum q = 1
    assert (p * w).sum() == pytest.approx(1.0, abs=1e-12)
    assert (w >= bounds[0] - 1e-12).all() and (w <= bounds[1] + 1e-12).all()
    assert np.isclose(w, bounds[0]).any() and np.isclose(w, bounds[1]).any()  # both bounds active
    if rhos[1] is None:
        assert result.errors[-1][1] < 1e-13 and result.errors[-1][0] > 1e-3


@pytest.mark.parametrize("relax", [None, [1.0, 3.0], [0.0, 2.0]])
def test_inactive_bounds_give_the_unbounded_weights(relax):
    p, codes, t0, t1 = _table(2)
    free = ipf(codes, p, [t0, t1], relax=relax, tol=1e-14, max_iter=5000)
    bounded = ipf(codes, p, [t0, t1], relax=relax, bounds=(1e-6, 1e6), tol=1e-14, max_iter=5000)
    assert free.converged and bounded.converged
    np.testing.assert_allclose(bounded.scaling.weights(codes), free.scaling.weights(codes), rtol=1e-12)
    np.testing.assert_allclose(bounded.mass, free.mass, rtol=1e-12)


def test_infeasible_bounds_are_refused_naming_the_values():
    codes = np.array([[0], [1], [2]])
    t = np.array([0.5, 0.3, 0.2])
    # label 0 has 10 % of the mass and needs mean weight 5; label 2 has 60 % and needs 1/3
    with pytest.raises(BoundsError, match=r"labels \[0\] need mean weights \[5\.0") as err:
        ipf(codes, np.array([0.1, 0.3, 0.6]), [t], bounds=(0.2, 4.0))
    assert err.value.marginal == 0 and err.value.needed[0] == pytest.approx(5.0)
    with pytest.raises(BoundsError, match=r"labels \[2\]"):
        ipf(codes, np.array([0.1, 0.3, 0.6]), [t], bounds=(0.5, 6.0))
    # a relaxed label with target 0 cannot keep weight >= lo > 0
    with pytest.raises(BoundsError):
        ipf(codes, np.full(3, 1 / 3), [np.array([0.5, 0.5, 0.0])], relax=[1.0], bounds=(0.1, 5.0))
    for bad in [(1.0, 2.0), (0.5, 1.0), (-0.1, 2.0)]:
        with pytest.raises(ValueError, match="0 <= lo < 1 < hi"):
            ipf(codes, np.full(3, 1 / 3), [t], bounds=bad)


@pytest.mark.parametrize("seed", range(4))
def test_weights_stay_in_bounds_and_marginals_meet_tol(seed):
    rng = np.random.default_rng(seed)
    rows = np.stack([rng.zipf(1.6, 4000) % 9, rng.zipf(1.4, 4000) % 7, rng.integers(0, 3, 4000)], axis=1)
    cells, counts = np.unique(rows, axis=0, return_counts=True)
    share = [np.bincount(cells[:, m], weights=counts) / counts.sum() for m in range(3)]
    # halfway to uniform: feasible within (0.25, 4) for these draws
    targets = [0.5 * s + 0.5 / s.size for s in share]
    result = ipf(cells, counts.astype(float), targets, bounds=(0.25, 4.0), tol=1e-9, max_iter=3000)
    w = result.scaling.weights(cells)
    assert (w >= 0.25 - 1e-12).all() and (w <= 4.0 + 1e-12).all()
    assert result.converged and result.final_error < 1e-9
    assert (counts * w).sum() / counts.sum() == pytest.approx(1.0, abs=1e-9)
    # the weights the scaling gives and the mass the kernel returns agree
    np.testing.assert_allclose(result.mass, counts * w / (counts * w).sum(), rtol=1e-12)


def test_offset_is_a_fixed_factor_inside_the_clip():
    # a fixed log factor per cell (dup_group's): weights clip(exp(o + sum f), lo, hi), o not in the scaling
    p, codes, t0, t1 = _table(3)
    offset = np.log(np.linspace(0.5, 2.0, p.size))
    result = ipf_bounded(codes, p, [t0, t1], (0.75, 1.5), offset=offset, tol=1e-12, max_iter=5000)
    with_offset = Scaling((*result.log_factors, offset), result.log_normalizer, bounds=result.scaling.bounds)
    w = with_offset.weights(np.column_stack([codes, np.arange(p.size)]))
    np.testing.assert_allclose(result.mass, p * w, rtol=1e-12)
    assert result.converged and (w <= 1.5 + 1e-12).all() and (w >= 0.75 - 1e-12).all()
    assert np.isclose(w, 1.5).any() and np.isclose(w, 0.75).any()


def test_scaling_record_round_trips_the_bounds():
    scaling = Scaling((np.array([0.0, 2.0]),), 0.1, bounds=(0.95, None)).labelled(["m"], [["a", "b"]])
    record = scaling.to_dict()
    assert record["bounds"] == [0.95, None]
    again = Scaling.from_dict(record)
    np.testing.assert_array_equal(again.weights(np.array([[0], [1]])), scaling.weights(np.array([[0], [1]])))
    assert again.weights(np.array([[0]]))[0] == 0.95  # exp(-0.1) = 0.905 clipped up to lo
    del record["bounds"]  # a record written before bounds existed: none
    assert Scaling.from_dict(record).bounds is None


def test_warm_started_search_finds_the_same_strength_in_fewer_passes():
    rng = np.random.default_rng(7)
    rows = np.stack([rng.zipf(1.5, 3000) % 12, rng.zipf(1.5, 3000) % 9], axis=1)
    cells, counts = np.unique(rows, axis=0, return_counts=True)
    targets = [np.full(12, 1 / 12), np.full(9, 1 / 9)]

    def ess_of(result):
        w = result.scaling.weights(cells)
        return (counts * w).sum() ** 2 / (counts * w * w).sum() / counts.sum()

    def search(warm: bool, **options):
        def solve(rho, start=None):
            return ipf(
                cells,
                counts.astype(float),
                targets,
                relax=[rho, rho],
                tol=1e-10,
                init=start if warm else None,
                **options,
            )

        return strongest_within(solve, ess_of, 0.6, exact=False, steps=10)

    for options in ({}, {"bounds": (0.2, 6.0)}):
        cold_rho, cold, cold_frontier = search(False, **options)
        warm_rho, warm, warm_frontier = search(True, **options)
        assert warm_rho == pytest.approx(cold_rho, rel=1e-12)
        np.testing.assert_allclose(warm.scaling.weights(cells), cold.scaling.weights(cells), rtol=1e-7)
        passes = [sum(p["passes"] for p in f) for f in (cold_frontier, warm_frontier)]
        assert passes[1] < passes[0]


@pytest.mark.parametrize(
    ("bounds", "reason"),
    [
        ([1.0, 2.0], "0 <= lo < 1 < hi"),
        ([0.5, 1.0], "0 <= lo < 1 < hi"),
        ([0.5], r"must be \[lo, hi\]"),
        ([None, 2.0], r"must be \[lo, hi\]"),
    ],
)
def test_spec_bounds_are_checked(tmp_path, bounds, reason):
    from rebalance.spec import Spec, SpecError

    base = {"data": {"path": str(tmp_path)}}
    with pytest.raises(SpecError, match=f"balance.bounds.*{reason}"):
        Spec.from_dict({**base, "balance": {"bounds": bounds}})
    with pytest.raises(SpecError, match="balance.bounds': needs the cell path"):
        Spec.from_dict({**base, "balance": {"bounds": [0.5, 2.0], "path": "rows"}})
    assert Spec.from_dict({**base, "balance": {"bounds": [0.5, None]}}).balance.bounds == (0.5, None)
