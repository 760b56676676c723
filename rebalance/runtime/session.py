"""Start or join Ray: a local instance when no cluster address is given, the cluster otherwise.

A local instance listens on 127.0.0.1 only unless asked otherwise (``ray.listen: all``), and the Ray auth
token file it uses is readable by its owner only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from rebalance.runtime.placement import ClusterCapacity, autoscaler_capacity
from rebalance.spec import RAY_LISTEN, RaySpec

__all__ = [
    "ClusterResources",
    "live_resources",
    "ray_session",
    "resolve_address",
    "secure_ray_token_file",
    "start_local_ray",
]

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


def secure_ray_token_file() -> Path | None:
    """Make the token file that a local Ray's token authentication uses readable by its owner only.

    Ray (>= 2.5x) turns token authentication on for a new local instance unless ``RAY_AUTH_MODE`` says
    otherwise, and writes a fresh token to ``RAY_AUTH_TOKEN_PATH`` (default ``~/.ray/auth_token``) with the
    process umask (0644 by default). Here the file is created first, mode 0600 in a 0700 directory, or an
    existing one is narrowed to 0600. Returns the path, or None when no token file is used (authentication
    off, or the token given in ``RAY_AUTH_TOKEN``)."""
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token" or os.environ.get("RAY_AUTH_TOKEN"):
        return None
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))  # what Ray itself generates: 256 random bits
        log.info("created the Ray auth token file %s (mode 0600)", path)
    elif stat.S_IMODE(path.stat().st_mode) & 0o077:
        path.chmod(0o600)
        log.warning("Ray auth token file %s was readable by others: narrowed to mode 0600", path)
    return path


@contextlib.contextmanager
def _keep_loopback_node_address() -> Iterator[None]:
    """Let ``ray.init(_node_ip_address="127.0.0.1")`` keep the loopback address. Ray replaces a loopback
    node address by the machine's routable one unless it runs as a single-machine instance (its
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` switch, read at import): that switch is turned off for the start."""
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def start_local_ray(listen: str = "loopback", **kwargs: Any) -> None:
    """``ray.init`` a new local instance (never one that ``ray start`` recorded on this machine).

    ``listen="loopback"``: every Ray process (GCS, raylet, agents, workers) listens on 127.0.0.1 only;
    ``"all"``: Ray's own default, every interface. The token file is secured first
    (:func:`secure_ray_token_file`). ``kwargs`` go to ``ray.init``."""
    if listen not in RAY_LISTEN:
        raise ValueError(f"listen must be one of {RAY_LISTEN}, got {listen!r}")
    secure_ray_token_file()
    kwargs.setdefault("include_dashboard", False)
    # "local", not None: None would join whatever cluster `ray start` last recorded on this machine.
    if listen == "all":
        ray.init(address="local", **kwargs)
        return
    with _keep_loopback_node_address():
        ray.init(address="local", _node_ip_address="127.0.0.1", **kwargs)


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
            autoscaling = False
            log.info("starting a local Ray instance (listening on %s)", spec.listen)
            start_local_ray(spec.listen, num_cpus=spec.num_cpus, num_gpus=spec.num_gpus, **kwargs)
        else:
            log.info("joining Ray at %s", address)
            ray.init(address=address, **kwargs)
        started = True
    try:
        yield live_resources(autoscaling)
    finally:
        if started:
            ray.shutdown()
