"""The flow check of exact two-marginal targets on the data's support, by hand and against IPF."""

import numpy as np
import pytest

from rebalance.kernels.feasibility import needed_weights, support_flow
from rebalance.kernels.ipf import ipf


def test_block_diagonal_support_names_the_violator():
    # cells (0,0), (1,0), (2,1), (2,2): values {0, 1} of marginal 0 reach only value 0 of marginal 1
    codes = np.array([[0, 0], [1, 0], [2, 1], [2, 2]])
    t0, t1 = np.full(3, 1 / 3), np.full(3, 1 / 3)
    flow = support_flow(codes, np.ones(4), t0, t1)
    assert not flow.feasible
    assert flow.rows.tolist() == [0, 1] and flow.cols.tolist() == [0]
    assert flow.need == pytest.approx(2 / 3) and flow.reach == pytest.approx(1 / 3)
    assert flow.placed == pytest.approx(2 / 3, abs=1e-8)
    # IPF indeed cannot meet it
    assert not ipf(codes, np.ones(4), [t0, t1], max_iter=200).converged
    # targets the support can carry: feasible, and IPF converges
    t1_ok = np.array([2 / 3, 1 / 6, 1 / 6])
    assert support_flow(codes, np.ones(4), t0, t1_ok).feasible
    assert ipf(codes, np.ones(4), [t0, t1_ok], tol=1e-9).converged


def test_zero_mass_cells_are_not_support_and_full_tables_are_feasible():
    rng = np.random.default_rng(0)
    codes = np.array([(i, j) for i in range(6) for j in range(4)])
    t0, t1 = rng.dirichlet(np.ones(6)), rng.dirichlet(np.ones(4))
    assert support_flow(codes, rng.random(24) + 0.1, t0, t1).feasible
    mass = np.ones(24)
    mass[codes[:, 0] == 5] = 0  # value 5 of marginal 0 has no support at all
    flow = support_flow(codes, mass, t0, t1)
    assert not flow.feasible and 5 in flow.rows and flow.shortfall == pytest.approx(t0[5], abs=1e-7)


def test_needed_weights():
    np.testing.assert_allclose(
        needed_weights([90, 9, 1], [1 / 3, 1 / 3, 1 / 3]), [100 / 270, 100 / 27, 100 / 3]
    )
    assert needed_weights([5, 0], [0.5, 0.5])[1] == np.inf and needed_weights([5, 5], [1.0, 0.0])[1] == 0
