"""Per-class metrics of a classifier: balanced accuracy, class gap, head and tail accuracy."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["class_metrics"]


def class_metrics(
    y_true: Sequence[int],
    y_pred: Sequence[int],
    class_names: Sequence[str],
    class_counts: Sequence[float] | None = None,
    tail_fraction: float = 1 / 3,
) -> dict[str, Any]:
    """Per-class accuracy (recall), balanced accuracy (their mean), class gap (best minus worst class), the
    standard deviation across classes, overall accuracy, and head/tail accuracy.

    Tail classes are the ``ceil(tail_fraction * C)`` classes with the smallest ``class_counts`` (the counts
    in the training data; ties broken by name), head classes the same number with the largest. Classes
    absent from ``y_true`` are left out of every class statistic (listed in ``classes_without_examples``).
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    names = list(class_names)
    per_class: dict[str, float] = {}
    support: dict[str, int] = {}
    for c, name in enumerate(names):
        mask = y_true == c
        if mask.any():
            per_class[name] = float((y_pred[mask] == c).mean())
            support[name] = int(mask.sum())
    accs = np.array(list(per_class.values()))
    out: dict[str, Any] = {
        "accuracy": float((y_true == y_pred).mean()),
        "balanced_accuracy": float(accs.mean()),
        "class_gap": float(accs.max() - accs.min()),
        "class_std": float(accs.std()),
        "worst_class": min(per_class, key=per_class.get),
        "best_class": max(per_class, key=per_class.get),
        "per_class_accuracy": per_class,
        "support": support,
        "classes_without_examples": [n for n in names if n not in per_class],
    }
    if class_counts is not None:
        counts = np.asarray(class_counts, dtype=float)
        k = max(1, math.ceil(tail_fraction * len(names)))
        order = sorted(range(len(names)), key=lambda c: (counts[c], names[c]))
        tail = [names[c] for c in order[:k] if names[c] in per_class]
        head = [names[c] for c in order[-k:] if names[c] in per_class]
        out["tail_classes"], out["head_classes"] = tail, head
        out["tail_accuracy"] = float(np.mean([per_class[n] for n in tail])) if tail else float("nan")
        out["head_accuracy"] = float(np.mean([per_class[n] for n in head])) if head else float("nan")
    return out
