"""Balance step 5 (optional, ``balance.soft``): balanced soft labels.

A distributed log-domain Sinkhorn on every row's cosine scores against its side's centroids, the column
marginal reduced each iteration (:mod:`rebalance.kernels.sinkhorn`); the weights writer gives each row
its top-k balanced codes (:func:`soft_codes`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from rebalance.data.fs import join, read_npy
from rebalance.data.parts import read_part
from rebalance.data.readers import vector_matrix
from rebalance.kernels.sinkhorn import (
    soft_sinkhorn_codes,
    soft_sinkhorn_driver,
    soft_sinkhorn_kernel,
    soft_sinkhorn_partial,
    top_k_codes,
)
from rebalance.kernels.targets import target_marginal
from rebalance.runtime.resident import ResidentParts
from rebalance.spec import BalanceSpec, SoftSpec
from rebalance.stages.balance.survey import BalanceError
from rebalance.stages.context import StageContext

__all__ = ["SoftLabels", "soft_codes", "soft_labels"]


@dataclass
class SoftLabels:
    """What a writer needs to give rows their soft labels: codes = softmax(x C^T / T + log_v), top k."""

    side: str
    centroids: np.ndarray
    temperature: float
    log_v: np.ndarray
    top_k: int


def _part_scores(run_root: str, index: int, side: str, centroids: np.ndarray) -> np.ndarray:
    """Cosine scores S = x C^T (n, K), float64, of part ``index``'s L2-normalised ``side`` embeddings x
    against the (K, d) centroids C."""
    table = read_part(join(run_root, "embeddings"), index, columns=[side])
    return vector_matrix(table.column(side).combine_chunks()).astype(np.float64) @ centroids.T


def _load_scores(run_root: str, index: int, side: str, centroids: np.ndarray, temperature: float) -> tuple:
    scores = _part_scores(run_root, index, side, centroids)
    return scores, soft_sinkhorn_kernel(scores, temperature)


def _soft_partial(state: tuple, log_v: np.ndarray | None, temperature: float) -> np.ndarray:
    scores, kernel = state
    return soft_sinkhorn_partial(scores, log_v, temperature, kernel=kernel)


def soft_labels(ctx: StageContext, spec: BalanceSpec) -> tuple[SoftLabels, dict[str, Any]]:
    """Run the distributed soft Sinkhorn of ``balance.soft``. Its column marginal is the balance target of
    ``<side>_cluster`` (``balance.targets`` or ``balance.target``) applied to the cluster sizes."""
    soft: SoftSpec = spec.soft
    centroids = read_npy(ctx.run.path("clusters") / f"{soft.side}_centroids.npy").astype(np.float64)
    k = centroids.shape[0]
    if soft.top_k > k:
        raise BalanceError(f"balance.soft.top_k = {soft.top_k} exceeds the {k} {soft.side} clusters")
    info = json.loads(ctx.run.path("clusters", "clusters.json").read_text())
    sizes = np.asarray(info[soft.side]["sizes"], dtype=np.float64)
    pi = target_marginal(sizes, spec.target_for(f"{soft.side}_cluster"), values=[str(i) for i in range(k)])
    root = str(ctx.run.root)
    items = [(root, s.index, soft.side, centroids, soft.temperature) for s in ctx.shards]
    iterations = None if soft.iterations == "auto" else soft.iterations
    with ResidentParts(_load_scores, items, ctx.workers(len(items))) as parts:
        result = soft_sinkhorn_driver(
            lambda log_v: parts.reduce(_soft_partial, log_v, soft.temperature, combine=np.logaddexp),
            int(sizes.sum()),
            pi,
            soft.temperature,
            iterations,
            tol=spec.tol,
            max_iter=spec.max_iter,
        )
    labels = SoftLabels(soft.side, centroids, soft.temperature, result.log_v, soft.top_k)
    record = {
        "side": soft.side,
        "temperature": soft.temperature,
        "iterations": soft.iterations,
        "top_k": soft.top_k,
        "passes": result.iterations,
        "converged": result.converged,
        "column_error_per_iteration": result.errors.tolist(),
        "column_marginal": pi.tolist(),
        "log_v": [float(v) if np.isfinite(v) else None for v in result.log_v],
    }
    return labels, record


def soft_codes(run_root: str, index: int, soft: SoftLabels) -> tuple[np.ndarray, np.ndarray]:
    """Part ``index``'s top-k balanced codes (n, k) and their probabilities (n, k), by decreasing
    probability: softmax(x C^T / T + log_v) of each row's ``soft.side`` embedding x."""
    scores = _part_scores(run_root, index, soft.side, soft.centroids)
    return top_k_codes(soft_sinkhorn_codes(scores, soft.log_v, soft.temperature), soft.top_k)
