"""Near-duplicate groups: the blocked kernel against a brute-force reference, and the stage end to end."""

import numpy as np
import pytest

from rebalance.kernels.dedup import component_roots, duplicate_roots, similar_pairs


def planted(n_unique=60, copies=(3, 2, 2, 4), d=16, noise=1e-3, seed=0):
    """Random unit vectors plus near-copies of a few of them; returns (x, true root of every row)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n_unique, d))
    rows, roots = [base], list(range(n_unique))
    for source, c in enumerate(copies):
        rows.append(base[source] + noise * rng.normal(size=(c, d)))
        roots += [source] * c
    x = np.concatenate(rows)
    perm = rng.permutation(len(x))
    x, roots = x[perm], np.asarray(roots)[perm]
    # the expected root: the smallest row index among the rows of the same source
    smallest = {r: np.flatnonzero(roots == r).min() for r in np.unique(roots)}
    return x.astype(np.float32), np.array([smallest[r] for r in roots])


def brute_force_roots(x, threshold):
    """O(n^2) reference: the full cosine matrix and a plain union-find, smallest index as the root."""
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = u.astype(np.float64) @ u.T.astype(np.float64)
    parent = list(range(len(x)))

    def find(a):
        while parent[a] != a:
            a = parent[a]
        return a

    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            if sim[i, j] >= threshold:
                a, b = find(i), find(j)
                parent[max(a, b)] = min(a, b)
    return np.array([find(i) for i in range(len(x))])


@pytest.mark.parametrize("block", [7, 64, 4096])
def test_kernel_matches_brute_force_and_the_planted_groups(block):
    x, truth = planted()
    roots = duplicate_roots(x, 0.95, block=block)
    np.testing.assert_array_equal(roots, brute_force_roots(x, 0.95))
    np.testing.assert_array_equal(roots, truth)


def test_chains_join_and_threshold_is_inclusive():
    # a ~ b and b ~ c at cos 0.8, a and c at cos 0.28: one group at threshold 0.8, none above
    t = np.arccos(0.8)
    x = np.array([[1, 0], [np.cos(t), np.sin(t)], [np.cos(2 * t), np.sin(2 * t)], [-1, 0]])
    i, j = similar_pairs(x, 0.8 - 1e-6)
    assert list(zip(i.tolist(), j.tolist(), strict=True)) == [(0, 1), (1, 2)]
    np.testing.assert_array_equal(duplicate_roots(x, 0.8 - 1e-6, block=1), [0, 0, 0, 3])
    np.testing.assert_array_equal(duplicate_roots(x, 0.81), [0, 1, 2, 3])


def test_component_roots_on_a_random_graph_against_brute_force():
    rng = np.random.default_rng(3)
    n = 40
    i, j = rng.integers(0, n, 30), rng.integers(0, n, 30)
    roots = component_roots(n, i, j)
    adjacency = np.eye(n, dtype=bool)
    adjacency[i, j] = adjacency[j, i] = True
    reach = adjacency.copy()
    for _ in range(n):
        reach = (reach.astype(int) @ adjacency.astype(int)) > 0
    np.testing.assert_array_equal(roots, [np.flatnonzero(reach[r]).min() for r in range(n)])
