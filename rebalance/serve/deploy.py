"""The weighting endpoint as a Ray Serve application, and the loop behind ``rebalance serve``.

Each replica loads the run (centroids, scaling factors, the model when raw inputs are accepted) in its
constructor and serves the app of :mod:`rebalance.serve.app`. Ray is handed only the path of the token
file: each replica reads the token from it and keeps its SHA-256 digest, so neither the token nor its digest
is ever in the cluster's state or in any process's environment. A local Ray started here runs the Serve
proxy with the :class:`~rebalance.serve.limits.ProxyGuard` in front.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict
from pathlib import Path

import ray
from ray import serve

from rebalance.data import fs
from rebalance.runtime.session import start_local_ray
from rebalance.serve.app import build_app, read_token_file, token_sha256
from rebalance.serve.limits import Limits, proxy_environment
from rebalance.serve.weigher import Weigher

__all__ = ["WeighDeployment", "run_server", "is_loopback", "APP_NAME"]

log = logging.getLogger(__name__)

APP_NAME = "rebalance"


@serve.deployment(name="rebalance-weigh", max_ongoing_requests=8)
@serve.ingress()
class WeighDeployment:
    """One replica: a :class:`Weigher` over the run directory and its HTTP app."""

    def __init__(
        self,
        run_dir: str,
        token_file: str | None,
        limits: dict,
        load_model: bool,
        device: str,
        threads: int,
    ):
        import faiss
        import torch

        torch.set_num_threads(max(1, threads))
        faiss.omp_set_num_threads(max(1, threads))  # more OpenMP threads than CPUs only spin
        self.weigher = Weigher(run_dir, load_model=load_model, device=device)
        self.token_digest = None if token_file is None else token_sha256(read_token_file(token_file))
        self.limits = Limits(**limits)

    def __serve_build_asgi_app__(self):
        return build_app(self.weigher, token_digest=self.token_digest, limits=self.limits)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_server(
    run_dir: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    token_file: str | os.PathLike | None,
    limits: Limits | None = None,
    replicas: int = 1,
    num_cpus: float = 1.0,
    device: str = "cpu",
    load_model: bool = True,
    ray_address: str | None = None,
    ray_listen: str = "loopback",
    ready_timeout_s: float = 300.0,
    stop: threading.Event | None = None,
) -> None:
    """Deploy the endpoint for ``run_dir`` on Ray Serve at http://host:port and block until SIGINT/SIGTERM
    (or ``stop`` is set), then remove it. ``token_file`` holds the bearer token (mode 600: see
    :func:`~rebalance.serve.app.read_token_file`); None means no authentication (loopback hosts only).

    Joins ``ray_address`` (or RAY_ADDRESS) when given, else (or for ``local``) starts a local Ray, listening
    on ``ray_listen`` (:func:`~rebalance.runtime.session.start_local_ray`), that is shut down on exit; its
    Serve proxy applies the header, per-client and body-deadline ``limits`` before any replica sees a
    request. The run directory and the token file must be readable at the same paths wherever a replica
    runs.
    """
    if token_file is None and not is_loopback(host):
        raise ValueError(f"refusing to serve without authentication on {host}: give a token file")
    if token_file is not None:
        token_file = str(Path(token_file).resolve())
        read_token_file(token_file)  # fail here, with the reason, rather than in a replica
    run_dir = str(run_dir) if fs.is_remote(run_dir) else str(Path(run_dir).resolve())
    # Fail here, with the reason, rather than in a replica: the run must be complete and carry scaling.
    probe = Weigher(run_dir, load_model=False)
    if load_model and probe.format != "embeddings":
        log.info("serve: replicas will load model %s for raw inputs", probe.model_name)
    limits = limits or Limits()
    started = False
    if not ray.is_initialized():
        address = ray_address or os.environ.get("RAY_ADDRESS") or None
        if address in (None, "local"):
            # The proxy reads the hook from its environment, which Ray's processes inherit from this one
            # while it starts them: set it for the start only.
            hook = proxy_environment(limits)
            saved = {name: os.environ.get(name) for name in hook}
            os.environ.update(hook)
            try:
                start_local_ray(ray_listen, configure_logging=False, log_to_driver=True)
            finally:
                for name, value in saved.items():
                    if value is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = value
            started = True
        else:
            ray.init(address=address, configure_logging=False, log_to_driver=True)
            log.warning(
                "serve: joined Ray at %s: its Serve proxy applies the header, per-client and body-deadline "
                "limits only if the head was started with %s (docs/serve.md); the replicas check the header "
                "limits and the body deadline in any case",
                address,
                " ".join(f"{k}={v!r}" for k, v in proxy_environment(limits).items()),
            )
    stop = stop or threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set())
        for sig in (signal.SIGINT, signal.SIGTERM)
        if threading.current_thread() is threading.main_thread()
    }
    try:
        serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
        app = WeighDeployment.options(
            num_replicas=replicas,
            ray_actor_options={"num_cpus": num_cpus, "num_gpus": 1 if device == "cuda" else 0},
        ).bind(run_dir, token_file, asdict(limits), load_model, device, max(1, int(num_cpus)))
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
        if started:
            _wait_ready(url, ready_timeout_s)
        print(
            f"rebalance serve: {run_dir} at {url} (POST /v1/weigh, GET /v1/info, GET /openapi.json; "
            f"auth: {'bearer token' if token_file else 'NONE'})",
            flush=True,
        )
        while not stop.wait(1.0):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if started:
            # Shutting the local Ray down ends Serve with it; asking Serve first can hang when Ctrl-C also
            # reached Ray's own processes (they share the terminal's process group).
            ray.shutdown()
        else:
            serve.delete(APP_NAME)


def _wait_ready(url: str, timeout_s: float) -> None:
    """Wait until the proxy answers /healthz from our app (another Serve instance's proxy would not)."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError) as err:
            last = err
        time.sleep(0.5)
    raise RuntimeError(f"the endpoint did not come up at {url} within {timeout_s:.0f} s ({last})")
