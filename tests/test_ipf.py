"""IPF kernel: hand-computed cases, POT's Sinkhorn as reference, properties, error cases."""

import numpy as np
import ot
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rebalance.kernels.ipf import MissingMassError, clip_weights, ess, ipf, marginal_errors

UNIFORM2 = [np.array([0.5, 0.5]), np.array([0.5, 0.5])]
CODES_2X2 = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])


def test_2x2_uniform_matches_closed_form():
    # Balancing keeps the cross-ratio: q00 q11 / (q01 q10) = (.5 * .1) / (.2 * .2) = 1.25, and with uniform
    # marginals q = [[a, .5 - a], [.5 - a, a]], so a / (.5 - a) = sqrt(1.25).
    mass = np.array([0.5, 0.2, 0.2, 0.1])
    result = ipf(CODES_2X2, mass, UNIFORM2, tol=1e-12)
    r = np.sqrt(1.25)
    a = 0.5 * r / (1 + r)
    np.testing.assert_allclose(result.mass, [a, 0.5 - a, 0.5 - a, a], atol=1e-11)
    assert result.converged and result.final_error < 1e-12


def test_one_pass_by_hand():
    # 3x3 table, one pass (X-step then Y-step), computed step by step by hand.
    codes = np.array([[i, j] for i in range(3) for j in range(3)])
    p = np.array([6, 2, 2, 1, 1, 0, 1, 0, 1], dtype=float) / 14
    tx, ty = np.full(3, 1 / 3), np.array([0.5, 0.25, 0.25])
    rows = np.array([10, 2, 2]) / 14
    q = p * (tx / rows)[codes[:, 0]]  # X-step
    cols = np.array([q[[0, 3, 6]].sum(), q[[1, 4, 7]].sum(), q[[2, 5, 8]].sum()])
    q = q * (ty / cols)[codes[:, 1]]  # Y-step
    result = ipf(codes, p, [tx, ty], iterations=1)
    np.testing.assert_allclose(result.mass, q / q.sum(), rtol=1e-14)
    assert result.passes == 1 and result.errors.shape == (2, 2)
    assert result.errors[-1][1] < 1e-15  # the last marginal of a pass is exact


def test_zero_iterations_is_identity():
    mass = np.array([0.5, 0.2, 0.2, 0.1])
    result = ipf(CODES_2X2, mass, UNIFORM2, iterations=0)
    np.testing.assert_allclose(result.mass, mass, rtol=1e-15)
    np.testing.assert_allclose(result.errors[0], [0.2, 0.2])


def test_matches_pot_sinkhorn_on_dense_table():
    rng = np.random.default_rng(0)
    p = rng.gamma(0.5, size=(7, 5)) * (rng.random((7, 5)) > 0.2)
    p[:, 0] += 0.1  # no empty row or column
    p /= p.sum()
    a, b = rng.dirichlet(np.ones(7)), rng.dirichlet(np.ones(5))
    codes = np.array([[i, j] for i in range(7) for j in range(5)])
    keep = p.reshape(-1) > 0
    ours = np.zeros(35)
    ours[keep] = ipf(codes[keep], p.reshape(-1)[keep], [a, b], tol=1e-13, max_iter=100_000).mass
    # Sinkhorn with kernel K = p (cost M = -reg log p) is exactly IPF of p toward (a, b).
    reg = 1.0
    cost = np.where(p > 0, -reg * np.log(np.where(p > 0, p, 1)), 1e3)
    reference = ot.sinkhorn(a, b, cost, reg, stopThr=1e-14, numItermax=100_000)
    np.testing.assert_allclose(ours, reference.reshape(-1), atol=1e-10)


def test_missing_mass_is_reported():
    codes = np.array([[0, 0], [1, 0]])
    with pytest.raises(MissingMassError) as info:
        ipf(codes, np.array([0.5, 0.5]), [np.array([0.5, 0.5]), np.array([0.5, 0.5])])
    assert info.value.marginal == 1 and info.value.labels.tolist() == [1]


def test_incompatible_targets_do_not_converge():
    # Value x=0 holds half the mass but y=0 (only reachable from x=0) must hold 0.9: infeasible.
    codes = np.array([[0, 0], [0, 1], [1, 1]])
    result = ipf(codes, np.ones(3) / 3, [np.array([0.5, 0.5]), np.array([0.9, 0.1])], max_iter=200)
    assert not result.converged and result.passes == 200
    assert result.final_error > 0.1
    assert result.worst[0]["marginal"] == 0


@st.composite
def tables(draw):
    k1, k2 = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    counts = draw(st.lists(st.integers(1, 50), min_size=k1 * k2, max_size=k1 * k2))
    codes = np.array([[i, j] for i in range(k1) for j in range(k2)])
    return codes, np.array(counts, dtype=float), k1, k2


@settings(deadline=None, derandomize=True, max_examples=60)
@given(tables(), st.integers(0, 10**6))
def test_properties(table, seed):
    codes, counts, k1, k2 = table
    rng = np.random.default_rng(seed)
    targets = [rng.dirichlet(np.ones(k1)), rng.dirichlet(np.ones(k2))]
    result = ipf(codes, counts, targets, tol=1e-9, max_iter=10_000)
    # A full table (no structural zeros) with positive targets is always feasible.
    assert result.converged
    np.testing.assert_allclose(marginal_errors(codes, result.mass, targets), 0, atol=2e-9)
    assert np.isfinite(result.mass).all() and (result.mass > 0).all()
    # Permutation equivariance.
    perm = rng.permutation(len(counts))
    permuted = ipf(codes[perm], counts[perm], targets, tol=1e-9, max_iter=10_000)
    np.testing.assert_allclose(permuted.mass, result.mass[perm], rtol=1e-9, atol=1e-15)
    # Splitting a cell into two rows with the same labels (sharding) changes nothing.
    split_codes = np.vstack([codes, codes[:1]])
    split_counts = np.concatenate([counts, counts[:1]])
    split_counts[0] /= 2
    split_counts[-1] = split_counts[0]
    split = ipf(split_codes, split_counts, targets, iterations=3)
    fixed = ipf(codes, counts, targets, iterations=3)
    np.testing.assert_allclose(split.mass[0] + split.mass[-1], fixed.mass[0], rtol=1e-12)


def test_clip_weights_keeps_mean_and_cap():
    counts = np.array([10, 10, 1, 1], dtype=float)
    weights = np.array([0.5, 0.5, 4.0, 6.0])  # mean over rows: (5 + 5 + 4 + 6) / 22 ... rescale to mean 1
    weights *= counts.sum() / (counts * weights).sum()
    clipped, scale = clip_weights(weights, counts, 2.0)
    assert clipped.max() <= 2.0 + 1e-12
    np.testing.assert_allclose(clipped, np.minimum(scale * weights, 2.0))
    assert np.isclose((counts * clipped).sum(), counts.sum())
    # Uncapped cells keep their ratios.
    assert np.isclose(clipped[0] / clipped[1], 1.0)


def test_ess():
    assert ess(np.ones(10)) == pytest.approx(10)
    # Two rows with weights 1 and 3: (4)^2 / (1 + 9) = 1.6.
    assert ess(np.array([1.0, 3.0])) == pytest.approx(1.6)
    assert ess(np.array([1.0, 3.0]), np.array([2, 1])) == pytest.approx(25 / 11)


def test_log_factors_reproduce_every_cell_weight():
    rng = np.random.default_rng(3)
    codes = np.array([[i, j] for i in range(4) for j in range(3)])
    keep = rng.random(len(codes)) > 0.25
    keep[:3] = keep[[0, 3, 6, 9]] = True  # every label occurs
    mass = rng.random(keep.sum())
    targets = [rng.dirichlet(np.ones(4)), rng.dirichlet(np.ones(3))]
    result = ipf(codes[keep], mass, targets, iterations=4)
    log_w = result.log_factors[0][codes[:, 0]] + result.log_factors[1][codes[:, 1]] - result.log_normalizer
    np.testing.assert_allclose(np.exp(log_w[keep]), result.mass / (mass / mass.sum()), rtol=1e-12)
    # An unseen cell gets the product of its labels' factors: the weight the same scaling gives it when
    # it carries a vanishing amount of mass.
    tiny = np.zeros(len(codes))
    tiny[keep] = mass
    tiny[~keep] = 1e-14
    with_tiny = ipf(codes, tiny, targets, iterations=4)
    np.testing.assert_allclose(
        np.exp(log_w[~keep]), with_tiny.mass[~keep] / (tiny[~keep] / tiny.sum()), rtol=1e-6
    )


def zipf_table(k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Cells and counts of a long-tailed, correlated two-label table (the shape of image x text clusters)."""
    rng = np.random.default_rng(seed)
    p = np.arange(1, k + 1) ** -1.1
    a = rng.choice(k, 200_000, p=p / p.sum())
    b = (a + rng.geometric(0.4, a.size) - 1) % k
    noise = rng.random(a.size) < 0.1
    b[noise] = rng.integers(0, k, int(noise.sum()))
    cells, counts = np.unique(a * k + b, return_counts=True)
    return np.stack([cells // k, cells % k], axis=1), counts.astype(float)


def test_overrelaxation_reaches_the_same_limit_in_fewer_passes():
    codes, counts = zipf_table(60, 0)
    targets = [np.full(60, 1 / 60), np.full(60, 1 / 60)]
    plain = ipf(codes, counts, targets, tol=1e-12, max_iter=20_000, omega=1.0)
    fast = ipf(codes, counts, targets, tol=1e-12, max_iter=20_000)  # omega="auto", the default
    assert plain.converged and fast.converged
    assert (plain.omegas == 1).all() and fast.omegas.max() > 1.2
    assert fast.passes < plain.passes / 2
    np.testing.assert_allclose(fast.mass, plain.mass, rtol=1e-9)
    assert marginal_errors(codes, fast.mass, targets).max() < 1e-12
    # A fixed over-relaxation converges to the same measure too.
    fixed = ipf(codes, counts, targets, tol=1e-12, max_iter=20_000, omega=1.5)
    np.testing.assert_allclose(fixed.mass, plain.mass, rtol=1e-9)
    assert fixed.omegas.max() == 1.5


def test_fixed_iterations_are_plain_passes():
    # The k-step measure is defined by plain projections: omega does not apply to iterations=k.
    codes, counts = zipf_table(20, 1)
    targets = [np.full(20, 0.05), np.full(20, 0.05)]
    for omega in ("auto", 1.7):
        result = ipf(codes, counts, targets, iterations=15, omega=omega)
        np.testing.assert_array_equal(result.omegas, np.ones(15))
        np.testing.assert_allclose(result.mass, ipf(codes, counts, targets, iterations=15, omega=1.0).mass)


def test_overrelaxation_falls_back_when_targets_cannot_be_met():
    # Two cells on a diagonal: marginal 0 wants 0.47 on the cell that marginal 1 wants 0.68 on. The error
    # plateaus; auto must not over-relax a plateau, and the factors drift by a constant ratio every pass
    # (past 1e100 within 2000 passes), which the two-marginal cell path folds into its table.
    codes = np.array([[1, 0], [0, 1]])
    targets = [np.array([0.47, 0.53]), np.array([0.32, 0.68])]
    plain = ipf(codes, np.ones(2), targets, max_iter=2000, omega=1.0)
    auto = ipf(codes, np.ones(2), targets, max_iter=2000)
    for result in (plain, auto):
        assert not result.converged and np.isfinite(result.mass).all()
        # The last marginal of a pass is exact: the mass on cell (0, 1) is 0.68, so marginal 0 is off by 0.21.
        np.testing.assert_allclose(result.mass, [0.32, 0.68], atol=1e-12)
        assert result.final_error == pytest.approx(0.21, abs=1e-12)
    assert (auto.omegas == 1).all()
    fixed = ipf(codes, np.ones(2), targets, max_iter=2000, omega=1.8)
    assert (fixed.omegas[-10:] == 1).all()  # patience ran out: plain passes for good
    np.testing.assert_allclose(fixed.mass, [0.32, 0.68], atol=1e-12)


@pytest.mark.parametrize("omega", [0.9, 2.0, "fast"])
def test_overrelaxation_out_of_range_is_rejected(omega):
    with pytest.raises(ValueError, match="omega"):
        ipf(CODES_2X2, np.ones(4), UNIFORM2, omega=omega)


def test_overrelaxation_never_costs_passes_on_random_tables():
    # Random 2- and 3-marginal tables with Zipf labels, mostly correlated, tempered targets. With three
    # marginals the errors of an over-relaxed pass can oscillate; auto must then stop raising omega.
    rng = np.random.default_rng(6)  # table 36 heads slowly to a plateau: over-relaxing it overflowed
    gains = []
    for _ in range(60):
        sizes = rng.integers(2, 40, rng.integers(2, 4))
        n = int(rng.integers(50, 5000))
        zipfs = [np.arange(1, k + 1) ** -rng.uniform(0, 2) for k in sizes]
        codes = np.stack([rng.choice(k, n, p=z / z.sum()) for k, z in zip(sizes, zipfs, strict=True)], axis=1)
        if rng.random() < 0.7:
            codes[:, 1] = (codes[:, 0] + rng.integers(0, 3, n)) % sizes[1]
        cells, counts = np.unique(codes, axis=0, return_counts=True)
        targets = [np.bincount(codes[:, m], minlength=k) ** rng.uniform(0, 1) for m, k in enumerate(sizes)]
        targets = [t / t.sum() for t in targets]
        plain = ipf(cells, counts.astype(float), targets, tol=1e-9, max_iter=3000, omega=1.0)
        auto = ipf(cells, counts.astype(float), targets, tol=1e-9, max_iter=3000)
        assert auto.converged == plain.converged
        if plain.converged:
            assert auto.passes <= plain.passes
            np.testing.assert_allclose(auto.mass, plain.mass, rtol=1e-5, atol=1e-12)
            gains.append(plain.passes / auto.passes)
        else:  # targets it cannot meet, or a boundary solution that plain passes approach slowly
            assert np.isfinite(auto.mass).all() and auto.final_error <= 1.01 * plain.final_error
    assert len(gains) > 30 and max(gains) > 3
