"""Start or join Ray: a local instance when no cluster address is given, the cluster otherwise."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import ray

from rebalance.runtime.placement import ClusterCapacity, autoscaler_capacity
from rebalance.spec import RaySpec

__all__ = ["ClusterResources", "live_resources", "ray_session", "resolve_address"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterResources:
    """CPUs and GPUs of the Ray cluster the run uses: live now (``cpus``, ``gpus``, the CPUs per GPU of the
    smallest live GPU node), what the autoscaler config lets it grow to (``capacity``, docs/cluster.md), and
    whether nodes may still join (a joined cluster; a local instance has what it started with)."""

    cpus: int
    gpus: int
    cpus_per_gpu: int | None = None
    capacity: ClusterCapacity = field(default_factory=ClusterCapacity)
    autoscaling: bool = False


def live_resources(autoscaling: bool) -> ClusterResources:
    """The :class:`ClusterResources` of the Ray this process is connected to."""
    resources = ray.cluster_resources()
    ratios = [
        int(n["Resources"].get("CPU", 0)) // int(n["Resources"]["GPU"])
        for n in ray.nodes()
        if n.get("Alive") and n["Resources"].get("GPU", 0) >= 1
    ]
    return ClusterResources(
        cpus=int(resources.get("CPU", 0)),
        gpus=int(resources.get("GPU", 0)),
        cpus_per_gpu=min(ratios) if ratios else None,
        capacity=autoscaler_capacity() if autoscaling else ClusterCapacity(),
        autoscaling=autoscaling,
    )


def resolve_address(spec: RaySpec) -> str | None:
    """The address to join, or None to start a local Ray.

    ``local`` always starts one; ``auto`` joins ``RAY_ADDRESS`` when it is set (as inside ``ray job submit``);
    anything else is a cluster address.
    """
    if spec.address == "local":
        return None
    if spec.address == "auto":
        return os.environ.get("RAY_ADDRESS") or None
    return spec.address


@contextlib.contextmanager
def ray_session(spec: RaySpec) -> Iterator[ClusterResources]:
    """Use the Ray already initialised in this process, join a cluster, or start a local instance.

    A local instance started here is shut down on exit; a joined cluster is only disconnected from.
    """
    started, autoscaling = False, True
    if not ray.is_initialized():
        address = resolve_address(spec)
        kwargs = {"log_to_driver": True, "configure_logging": False}
        if address is None:
            kwargs.update(num_cpus=spec.num_cpus, num_gpus=spec.num_gpus, include_dashboard=False)
            autoscaling = False
            log.info("starting a local Ray instance")
        else:
            log.info("joining Ray at %s", address)
        # "local" (not None): never join a cluster that `ray start` once recorded in /tmp/ray.
        ray.init(address=address or "local", **kwargs)
        started = True
    try:
        yield live_resources(autoscaling)
    finally:
        if started:
            ray.shutdown()
