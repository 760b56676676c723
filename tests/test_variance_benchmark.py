"""Smoke test of ``benchmarks/variance.py --quick``: the variance that k-pass balancing (``ipf``) leaves,
measured by Monte Carlo, against ``balanced_variance`` / ``balanced_variance_factor``.

Every comparison allows 4 Monte Carlo standard errors, the benchmark's own (delta method on the paired
ratio of mean squared errors over 1,000 datasets). The finite-sample effects it documents stay below that
where the population prediction is used: for the ``cell`` and ``xy`` functions the full run
(docs/downstream.md) finds every k within 2 SE at n = 500, 2000 and 8000, with no consistent sign; for the
``worst`` function (where the ratio falls like s_2^(4k-2) and the sample's own s_2, biased upward, takes
over from k = 2 on) the comparison is with the plug-in factor at each dataset's own s_2. The benchmark is
run in-process through its command-line entry point, ``main(["--quick"])``.
"""

import numpy as np
from bench import load_benchmark

Z = 4.0


def test_quick_variance_benchmark_agrees_with_the_prediction():
    summary = load_benchmark("variance").main(["--quick"])
    (res,) = summary["results"]
    assert res["redrawn"] == 0 and res["n"] == 2000 and res["reps"] == 1000
    assert res["functions"] == ["worst", "cell", "xy"]
    measured, se, predicted = (np.array(res[key]) for key in ("measured", "se", "predicted"))
    factor, plugin = np.array(res["factor"]), np.array(res["plugin_factor"])
    assert (se[1:] > 0).all()
    z = (measured - predicted) / np.where(se > 0, se, 1)

    # the worst-case function attains balanced_variance_factor, in the formula and in the data
    np.testing.assert_allclose(predicted[:, 0], factor, rtol=1e-9)
    assert abs(z[1, 0]) < Z  # one pass: the population factor s_2^2
    assert (np.abs(measured[1:, 0] - plugin[1:]) < Z * se[1:, 0]).all()  # every k: the plug-in factor
    assert (np.diff(np.log(measured[1:, 0])) < np.log(0.1)).all()  # falls by more than 10x per pass
    # cell probability and mixed moment: the exact asymptotic variance of that h, every k
    assert (np.abs(z[1:, 1:]) < Z).all(), z
    assert (measured[1:, 1:] < 1).all()  # balancing toward the true marginals helps every function here

    # targets corrupted with the data's own marginal noise (nu = 1): no gain at one pass, as linearised,
    # and a loss for the worst-case function, whose balanced variance is all target noise
    (noise,) = res["noise"]
    assert noise["nu"] == 1.0
    nm, ns, npred = (np.array(noise[key]) for key in ("measured", "se", "predicted"))
    np.testing.assert_allclose(npred[1], 1.0, rtol=1e-6)
    assert (np.abs(nm[1] - 1) < Z * ns[1]).all()
    assert nm[-1, 0] - 1 > Z * ns[-1, 0]
    assert (np.abs(nm[1:] - npred[1:]) < Z * ns[1:]).all(), (nm - npred) / np.where(ns > 0, ns, 1)
