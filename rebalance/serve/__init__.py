"""The online weighting endpoint: ``rebalance serve RUN_DIR`` (see docs/serve.md).

- :mod:`rebalance.serve.weigher`: :class:`Weigher`, the fitted state of a run and the computation of new
  rows' clusters and weights (numpy/faiss, and the run's open_clip model for raw inputs);
- :mod:`rebalance.serve.app`: the HTTP+JSON API (FastAPI), bearer-token authentication and limits;
- :mod:`rebalance.serve.limits`: the request limits and the guard that Ray Serve's proxy applies before any
  replica sees a request;
- :mod:`rebalance.serve.deploy`: the Ray Serve deployment and :func:`run_server`.

Names are imported lazily: ``rebalance.serve.weigher`` needs neither FastAPI nor Ray Serve.
"""

from __future__ import annotations

import importlib

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024  # 32 MiB: about 256 base64 images of 90 kB
DEFAULT_MAX_BATCH = 256  # samples per request

__all__ = ["Weigher", "RequestError", "Sample", "Limits", "build_app", "token_sha256", "run_server"]

_WHERE = {
    "Weigher": "weigher",
    "RequestError": "weigher",
    "Sample": "weigher",
    "Limits": "app",
    "build_app": "app",
    "token_sha256": "app",
    "run_server": "deploy",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"rebalance.serve.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'rebalance.serve' has no attribute {name!r}")
