"""Row-path IPF: the same iteration as the cell path, on rows split into parts, from per-label reductions."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rebalance.kernels.ipf import (
    MissingMassError,
    apply_ratio,
    apply_ratio_and_sum,
    ipf,
    ipf_driver,
    ipf_rows,
    label_sums,
    prepare_codes,
)
from rebalance.kernels.scaling import Scaling


def cell_path(codes: np.ndarray, targets, **kwargs):
    """The cell path as the stage runs it: distinct cells, ipf, weight = mass_c / (count_c / N) per row."""
    cells, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    result = ipf(cells, counts.astype(float), targets, **kwargs)
    weights = result.mass / (counts / len(codes))
    return result, weights[inverse.reshape(-1)]


def split(codes: np.ndarray, cuts) -> list[np.ndarray]:
    return np.split(codes, sorted(cuts))


def test_2x2_closed_form_on_rows():
    # Rows in cells 00, 01, 10, 11 with counts 5, 2, 2, 1 (the 2x2 case of test_ipf): balanced masses
    # [a, .5 - a, .5 - a, a] with a / (.5 - a) = sqrt(1.25); a row's weight is its cell mass / (count / 10).
    codes = np.repeat(np.array([[0, 0], [0, 1], [1, 0], [1, 1]]), [5, 2, 2, 1], axis=0)
    rng = np.random.default_rng(0)
    codes = codes[rng.permutation(10)]
    result = ipf_rows(split(codes, [3, 3, 7]), [np.array([0.5, 0.5])] * 2, tol=1e-13)
    r = np.sqrt(1.25)
    a = 0.5 * r / (1 + r)
    mass = {(0, 0): a, (0, 1): 0.5 - a, (1, 0): 0.5 - a, (1, 1): a}
    count = {(0, 0): 5, (0, 1): 2, (1, 0): 2, (1, 1): 1}
    expected = [mass[tuple(c)] / (count[tuple(c)] / 10) for c in codes]
    np.testing.assert_allclose(np.concatenate(result.weights), expected, rtol=1e-12)
    assert result.converged and result.final_error < 1e-13
    assert np.concatenate(result.weights).mean() == pytest.approx(1.0, rel=1e-14)


def test_one_pass_by_hand():
    # 4 rows with labels (0,0), (0,1), (1,1), (1,1), each of mass 1/4; uniform targets on both marginals.
    # X-step: x=0 and x=1 each hold 1/2 already (ratio 1). Y-step: y=0 holds 1/4 -> ratio 2, y=1 holds
    # 3/4 -> ratio 2/3: masses 1/2, 1/6, 1/6, 1/6, i.e. weights (x 4 rows) 2, 2/3, 2/3, 2/3.
    codes = np.array([[0, 0], [0, 1], [1, 1], [1, 1]])
    targets = [np.array([0.5, 0.5]), np.array([0.5, 0.5])]
    result = ipf_rows([codes[:1], codes[1:]], targets, iterations=1)
    np.testing.assert_allclose(np.concatenate(result.weights), [2, 2 / 3, 2 / 3, 2 / 3], rtol=1e-14)
    # After the pass: x marginal (1/2 + 1/6, 1/3): TV = 1/6; y exact.
    np.testing.assert_allclose(result.errors, [[0, 0.25], [1 / 6, 0]], atol=1e-15)
    assert result.passes == 1


@st.composite
def problems(draw):
    n_marginals = draw(st.integers(1, 3))
    sizes = [draw(st.integers(1, 5)) for _ in range(n_marginals)]
    n = draw(st.integers(1, 60))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    codes = np.stack([rng.integers(0, k, n) for k in sizes], axis=1)
    if n_marginals > 1 and draw(st.booleans()):  # correlated labels
        codes[:, 1] = (codes[:, 0] + rng.integers(0, 2, n)) % sizes[1]
    targets = []
    for m, k in enumerate(sizes):
        t = rng.dirichlet(np.ones(k))
        if draw(st.booleans()):
            t[np.bincount(codes[:, m], minlength=k) == 0] = 0  # usually feasible; else missing mass
        if draw(st.booleans()) and k > 1:
            t[rng.integers(0, k)] = 0  # a label balanced away
        if t.sum() == 0:
            t[codes[0, m]] = 1
        targets.append(t / t.sum())
    cuts = draw(st.lists(st.integers(0, n), max_size=6))
    iterations = draw(st.one_of(st.none(), st.integers(0, 12)))
    return codes, targets, cuts, iterations


@settings(deadline=None, derandomize=True, max_examples=150)
@given(problems())
def test_row_path_equals_cell_path_whatever_the_split(problem):
    codes, targets, cuts, iterations = problem
    kwargs = {"iterations": iterations, "tol": 1e-9, "max_iter": 300}
    try:
        cell, expected = cell_path(codes, targets, **kwargs)
    except MissingMassError as err:
        with pytest.raises(MissingMassError) as info:
            ipf_rows(split(codes, cuts), targets, **kwargs)
        assert info.value.marginal == err.marginal and info.value.labels.tolist() == err.labels.tolist()
        return
    rows = ipf_rows(split(codes, cuts), targets, **kwargs)
    weights = np.concatenate(rows.weights)
    assert [len(w) for w in rows.weights] == [len(p) for p in split(codes, cuts)]
    np.testing.assert_allclose(weights, expected, rtol=1e-9, atol=1e-300)
    assert weights.mean() == pytest.approx(1.0, rel=1e-12)
    assert rows.passes == cell.passes and rows.converged == cell.converged
    np.testing.assert_allclose(rows.errors, cell.errors, rtol=1e-9, atol=1e-13)
    # The same scaling as the cell path's, and it reproduces every weight.
    for m in range(len(targets)):
        finite = np.isfinite(cell.log_factors[m])
        assert (np.isfinite(rows.log_factors[m]) == finite).all()
        np.testing.assert_allclose(rows.log_factors[m][finite], cell.log_factors[m][finite], atol=1e-9)
    assert rows.log_normalizer == pytest.approx(cell.log_normalizer, abs=1e-12)
    again = np.concatenate([rows.scaling.weights(p) for p in split(codes, cuts)])
    np.testing.assert_allclose(again, weights, rtol=1e-9, atol=1e-300)


def test_over_relaxed_row_path_equals_cell_path():
    # A long-tailed correlated table on which auto over-relaxes: both paths decide omega from the same
    # K-vectors, so they run the same passes and give the same weights.
    rng = np.random.default_rng(7)
    k, n = 40, 100_000
    p = np.arange(1, k + 1) ** -1.1
    a = rng.choice(k, n, p=p / p.sum())
    b = (a + rng.geometric(0.4, n) - 1) % k
    codes = np.stack([a, b], axis=1)
    targets = [np.full(k, 1 / k), np.full(k, 1 / k)]
    cell, expected = cell_path(codes, targets, tol=1e-10)
    rows = ipf_rows(np.array_split(codes, 6), targets, tol=1e-10)
    assert cell.converged and rows.converged and cell.omegas.max() > 1.2
    assert rows.passes == cell.passes
    np.testing.assert_array_equal(rows.omegas, cell.omegas)
    np.testing.assert_allclose(np.concatenate(rows.weights), expected, rtol=1e-9)


def test_three_marginals_converge_to_targets():
    rng = np.random.default_rng(4)
    n = 20_000
    a = rng.zipf(1.5, n) % 7
    b = (a + rng.integers(0, 3, n)) % 5
    c = rng.integers(0, 4, n)
    codes = np.stack([a, b, c], axis=1)
    targets = [np.full(7, 1 / 7), np.full(5, 1 / 5), np.array([0.1, 0.2, 0.3, 0.4])]
    rows = ipf_rows(np.array_split(codes, 5), targets, tol=1e-10, max_iter=2000)
    w = np.concatenate(rows.weights)
    assert rows.converged
    for m, t in enumerate(targets):
        np.testing.assert_allclose(np.bincount(codes[:, m], weights=w, minlength=t.size) / n, t, atol=1e-10)
    _, expected = cell_path(codes, targets, tol=1e-10, max_iter=2000)
    np.testing.assert_allclose(w, expected, rtol=1e-9)


def test_missing_mass_is_reported():
    codes = np.array([[0, 0], [1, 0]])
    with pytest.raises(MissingMassError) as info:
        ipf_rows([codes], [np.array([0.5, 0.5]), np.array([0.5, 0.5])])
    assert info.value.marginal == 1 and info.value.labels.tolist() == [1]


def test_incompatible_targets_do_not_converge():
    # As in test_ipf: x=0 holds half the mass, but y=0 (only reachable from x=0) must hold 0.9.
    codes = np.array([[0, 0], [0, 1], [1, 1]])
    targets = [np.array([0.5, 0.5]), np.array([0.9, 0.1])]
    rows = ipf_rows([codes[:2], codes[2:]], targets, max_iter=200)
    assert not rows.converged and rows.passes == 200 and rows.final_error > 0.1
    assert rows.worst[0]["marginal"] == 0


def test_step_kernels_by_brute_force_and_chunking():
    rng = np.random.default_rng(1)
    codes = np.stack([rng.integers(0, 4, 50), rng.integers(0, 3, 50), rng.integers(0, 2, 50)], axis=1)
    w0 = rng.random(50)
    ratio = rng.random(4)
    expected_w = np.array([w0[i] * ratio[codes[i, 0]] for i in range(50)])
    expected_sums = np.zeros(3)
    for i in range(50):
        expected_sums[codes[i, 1]] += expected_w[i]
    np.testing.assert_allclose(apply_ratio(codes, w0, 0, ratio), expected_w, rtol=1e-15)
    np.testing.assert_allclose(label_sums(codes, expected_w, 1, 3), expected_sums, rtol=1e-13)
    np.testing.assert_allclose(label_sums(codes, None, 2, 2), np.bincount(codes[:, 2], minlength=2))
    for chunk in (7, 1 << 17):
        w = w0.copy()
        sums = apply_ratio_and_sum(prepare_codes(codes), w, 0, ratio, 1, 3, chunk=chunk)
        np.testing.assert_allclose(sums, expected_sums, rtol=1e-13)
        np.testing.assert_allclose(w, expected_w, rtol=1e-15)  # updated in place
    w = w0.copy()
    assert np.allclose(apply_ratio_and_sum(codes, w, None, None, 2, 2), np.bincount(codes[:, 2], w0, 2))
    assert (w == w0).all()
    log_factors = [np.log(rng.random(4)), np.log(rng.random(3)), np.array([-np.inf, 0.5])]
    direct = [np.exp(sum(f[c[j]] for j, f in enumerate(log_factors)) - 2.0) for c in codes]
    np.testing.assert_allclose(Scaling(tuple(log_factors), 2.0).weights(codes), direct, rtol=1e-14)


def test_two_marginals_need_one_reduction_per_step():
    rng = np.random.default_rng(2)
    codes = prepare_codes(np.stack([rng.integers(0, 6, 500), rng.integers(0, 4, 500)], axis=1))
    counts = [np.bincount(codes[:, m], minlength=k).astype(float) for m, k in enumerate([6, 4])]
    weights = np.full(500, 1 / 500)
    calls = []

    def step(m, ratio, next_m):
        calls.append(m)
        return apply_ratio_and_sum(codes, weights, m, ratio, next_m, [6, 4][next_m])

    targets = [np.full(6, 1 / 6), np.full(4, 1 / 4)]
    result = ipf_driver(step, counts, targets, tol=1e-10)
    assert result.converged and len(calls) == 2 * result.passes  # one per step, errors included
    weights *= 500 / np.exp(result.log_normalizer)
    _, expected = cell_path(codes, targets, tol=1e-10)
    np.testing.assert_allclose(weights, expected, rtol=1e-9)


def test_input_errors():
    codes = np.array([[0, 0], [1, 2]])
    with pytest.raises(ValueError, match="lie in"):
        label_sums(codes, None, 1, 2)
    with pytest.raises(ValueError, match="lie in"):
        ipf_rows([codes], [np.array([0.5, 0.5]), np.array([0.5, 0.5])])
    with pytest.raises(ValueError, match="sum to 1"):
        ipf_rows([codes], [np.array([0.5, 0.6]), np.array([0.2, 0.3, 0.5])])
    with pytest.raises(ValueError, match="label columns"):
        ipf_rows([codes], [np.array([0.5, 0.5])])
    with pytest.raises(ValueError, match="same positive number"):
        ipf_driver(lambda *a: None, [np.ones(2), np.ones(3)], [np.full(2, 0.5), np.full(3, 1 / 3)])
    with pytest.raises(ValueError, match="float64"):
        apply_ratio_and_sum(codes, np.ones(2, dtype=np.float32), 0, np.ones(2), 1, 3)
    prepared = prepare_codes(codes.astype(np.int32))
    assert prepared.dtype == np.int64 and prepared.flags.f_contiguous
