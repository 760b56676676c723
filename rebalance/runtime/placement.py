"""Where GPU work goes: what the cluster can grow to (not only what is live now), and the embed actors' plan.

``ray.cluster_resources()`` counts live nodes only; a cluster-launcher cluster starts with 0 GPU workers and
adds them only when something asks for GPUs. So the GPUs a run may use are read from the autoscaler's config
as well: ``$REBALANCE_CLUSTER_CONFIG`` when set, else ``~/ray_bootstrap_config.yaml`` (the file ``ray up``
writes on the head, where the driver runs). Each node type contributes ``max_workers`` x its ``GPU`` resource.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from rebalance.runtime.session import ClusterResources

__all__ = ["ClusterCapacity", "EmbedPlan", "autoscaler_capacity", "plan_embed", "resolve_device"]

log = logging.getLogger(__name__)

DEFAULT_CPUS_PER_GPU = 4
CLUSTER_CONFIG_ENV = "REBALANCE_CLUSTER_CONFIG"
DEFAULT_CLUSTER_CONFIG = "~/ray_bootstrap_config.yaml"


@dataclass(frozen=True)
class ClusterCapacity:
    """GPUs the autoscaler may add (``max_workers`` x ``GPU`` summed over node types) and the CPUs per GPU
    of its smallest GPU node type (None without a GPU node type)."""

    gpus: int = 0
    cpus_per_gpu: int | None = None


def autoscaler_capacity(path: str | os.PathLike | None = None) -> ClusterCapacity:
    """Read the autoscaler config (``path``, else ``$REBALANCE_CLUSTER_CONFIG``, else
    ``~/ray_bootstrap_config.yaml``); an absent file means no autoscaling (ClusterCapacity())."""
    path = Path(path or os.environ.get(CLUSTER_CONFIG_ENV) or DEFAULT_CLUSTER_CONFIG).expanduser()
    if not path.is_file():
        return ClusterCapacity()
    config: dict[str, Any] = yaml.safe_load(path.read_text()) or {}
    gpus, ratios = 0, []
    head = config.get("head_node_type")
    for name, node_type in (config.get("available_node_types") or {}).items():
        resources = node_type.get("resources") or {}
        per_node = int(resources.get("GPU", 0))
        if per_node <= 0:
            continue
        count = int(node_type.get("max_workers", config.get("max_workers", 0))) + (name == head)
        gpus += per_node * count
        if "CPU" in resources:
            ratios.append(int(resources["CPU"]) // per_node)
    return ClusterCapacity(gpus=gpus, cpus_per_gpu=min(ratios) if ratios else None)


def resolve_device(device: str, live_gpus: int, capacity: ClusterCapacity) -> str:
    """``cpu`` / ``cuda`` as given; ``auto``: ``cuda`` when the cluster has or may add a GPU, else ``cpu``."""
    if device != "auto":
        return device
    return "cuda" if live_gpus > 0 or capacity.gpus > 0 else "cpu"


@dataclass(frozen=True)
class EmbedPlan:
    """The embed actors: how many, on which device, the CPUs and GPUs each asks Ray for, and its threads
    (torch intra-op threads on CPU actors; decode / preprocess threads on GPU actors)."""

    device: str
    workers: int
    num_cpus: int
    num_gpus: int
    threads: int


def plan_embed(
    device: str, workers: int | str, cpus_per_gpu: int | str, n_items: int, resources: ClusterResources
) -> EmbedPlan:
    """The embed actors for ``n_items`` shards.

    GPU actors (``cuda``, or ``auto`` resolved by :func:`resolve_device`): one GPU each, ``workers: auto``
    = every GPU the cluster has or may add, at most one per shard. Each asks for ``cpus_per_gpu`` CPUs
    (``auto``: the CPUs per GPU of the smallest GPU node type in the autoscaler config, else of the smallest
    live GPU node, at most 16; else 4) and decodes with that many threads. CPU actors: ``workers: auto`` =
    one per CPU, at most one per shard; the CPUs are shared out as torch threads. Raises RuntimeError when
    GPU actors are asked for on a Ray that has no GPU and no autoscaler (a local instance without GPUs).
    """
    device = resolve_device(device, resources.gpus, resources.capacity)
    n_items = max(1, n_items)
    if device == "cpu":
        n = min(n_items, max(1, resources.cpus) if workers == "auto" else int(workers))
        return EmbedPlan("cpu", n, 1, 0, max(1, (resources.cpus or 1) // n))
    reachable = max(resources.gpus, resources.capacity.gpus)
    if reachable == 0 and not resources.autoscaling:
        raise RuntimeError(
            "embed.device is 'cuda' but this Ray has no GPU and no autoscaler to add one: "
            "set embed.device to 'cpu' or 'auto', or run on a cluster with GPU nodes"
        )
    n = min(n_items, max(1, reachable) if workers == "auto" else int(workers))
    if cpus_per_gpu == "auto":
        ratio = resources.capacity.cpus_per_gpu or resources.cpus_per_gpu
        cpus = min(16, max(1, ratio)) if ratio else DEFAULT_CPUS_PER_GPU
    else:
        cpus = int(cpus_per_gpu)
    return EmbedPlan("cuda", n, cpus, 1, cpus)
