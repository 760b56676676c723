"""Balance arms on an existing run directory, judged by a carried true-concept column.

    .venv/bin/python benchmarks/relaxed_defaults.py RUN_DIR [--concept label] [--rho 0.3 1 3]

Reruns only the balance stage of RUN_DIR (a copy: it is changed) with marginals [image_cluster,
text_cluster] and uniform targets: exact (allow_partial, so a run that does not converge or is infeasible
still reports), then relaxed at each --rho. Per arm: converged, passes, ESS fraction, largest weight, the
weighted concept distribution's total variation to uniform (before balancing: the raw one) and the concepts
starved (weighted share below a tenth of their raw share).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import rebalance
from rebalance.data.parts import read_parts
from rebalance.stages.balance import BalanceError


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path)
    parser.add_argument("--concept", default="label")
    parser.add_argument("--rho", type=float, nargs="+", default=[0.3, 1.0, 3.0])
    args = parser.parse_args()
    base = json.loads((args.run / "manifest.json").read_text())["spec"]  # the spec the run was made with
    print(
        f"{'arm':>8} {'conv':>5} {'passes':>6} {'ESS':>6} {'max w':>8} {'TV raw':>7} {'TV bal':>7} {'starved':>7}"
    )
    table = read_parts(args.run / "embeddings", columns=["key", args.concept])
    keys, labels = table.column("key").to_pylist(), np.array(table.column(args.concept).to_pylist())
    for rho in [None, *args.rho]:
        spec = dict(base)
        spec["balance"] = {
            "marginals": ["image_cluster", "text_cluster"],
            "allow_partial": True,
            "relax": "exact" if rho is None else rho,
        }
        name = "exact" if rho is None else f"rho={rho:g}"
        try:
            rebalance.run(spec, args.run, until="balance")  # the report stage is not needed here
        except BalanceError as err:
            print(f"{name:>8} failed: {str(err)[:160]}")
            continue
        record = json.loads((args.run / "balance.json").read_text())
        w = read_parts(args.run / "weights", columns=["key", "weight"])
        weight_of = dict(zip(w.column("key").to_pylist(), w.column("weight").to_numpy(), strict=True))
        weights = np.array([weight_of[k] for k in keys])
        values, inverse = np.unique(labels, return_inverse=True)
        raw = np.bincount(inverse) / len(inverse)
        bal = np.bincount(inverse, weights=weights) / weights.sum()
        uniform = np.full(len(values), 1 / len(values))
        print(
            f"{name:>8} {str(record['converged']):>5} {record['passes']:>6} {record['ess_fraction']:>6.3f} "
            f"{record['max_weight_value']:>8.2f} {0.5 * np.abs(raw - uniform).sum():>7.3f} "
            f"{0.5 * np.abs(bal - uniform).sum():>7.3f} {int((bal < raw / 10).sum()):>7}"
        )


if __name__ == "__main__":
    main()
