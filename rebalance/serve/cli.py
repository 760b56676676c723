"""``rebalance serve RUN_DIR``: argument parsing and token-file checks (registered by :mod:`rebalance.cli`)."""

from __future__ import annotations

import argparse
import os
import sys

from rebalance.serve import DEFAULT_MAX_BATCH, DEFAULT_MAX_BODY_BYTES

__all__ = ["add_serve_command", "check_token_file", "OLD_TOKEN_ENV"]

# No longer read: a token in the environment is inherited by every process of the Ray that serve starts.
OLD_TOKEN_ENV = "REBALANCE_SERVE_TOKEN"


def add_serve_command(sub) -> None:
    """Add ``serve`` to the ``rebalance`` command's sub-parsers."""
    from rebalance.serve.limits import Limits

    defaults = Limits()
    p = sub.add_parser(
        "serve", help="serve clusters and balance weights of new samples over HTTP (Ray Serve)"
    )
    p.add_argument("run_dir", help="a finished run directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--token-file", help="file holding the bearer token (mode 600; required unless --no-auth)")
    p.add_argument(
        "--no-auth", action="store_true", help="serve without authentication (loopback hosts only)"
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="request size limit (default 32 MiB)",
    )
    p.add_argument(
        "--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="samples per request (default 256)"
    )
    for name, kind, what in (
        ("max_header_bytes", int, "request target plus all headers, in bytes"),
        ("max_headers", int, "header lines"),
        ("body_timeout_s", float, "seconds to receive a whole request body"),
        ("max_requests_per_client", int, "requests in flight per client address"),
    ):
        default = getattr(defaults, name)
        p.add_argument(
            f"--{name.replace('_', '-')}", type=kind, default=default, help=f"{what} (default {default:g})"
        )
    p.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (default 1)")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica, also its torch threads")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where replicas run the model")
    p.add_argument("--embeddings-only", action="store_true", help="do not load the model: embeddings in only")
    p.add_argument("--ray-address", help="join this Ray cluster (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument(
        "--ray-listen",
        choices=["loopback", "all"],
        default="loopback",
        help="interfaces a local Ray started here listens on (default loopback: 127.0.0.1 only)",
    )
    p.set_defaults(func=_cmd_serve)


def check_token_file(token_file: str | None, no_auth: bool, host: str) -> str | None:
    """The token file to serve with, checked (:func:`~rebalance.serve.app.read_token_file`); None only with
    ``no_auth`` on a loopback host. Raises ValueError with the reason otherwise."""
    from rebalance.serve.app import read_token_file
    from rebalance.serve.deploy import is_loopback

    if OLD_TOKEN_ENV in os.environ:
        raise ValueError(
            f"{OLD_TOKEN_ENV} is not read (a token in the environment reaches every Ray process): unset it and "
            "give --token-file FILE (mode 600)"
        )
    if no_auth:
        if token_file:
            raise ValueError("--no-auth and --token-file exclude each other")
        if not is_loopback(host):
            raise ValueError(f"--no-auth is allowed on a loopback host only, not {host}")
        return None
    if not token_file:
        raise ValueError(
            "refusing to start without a token: give --token-file FILE (or --no-auth, on a loopback host only)"
        )
    read_token_file(token_file)
    return token_file


def _cmd_serve(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from rebalance.serve.deploy import is_loopback, run_server
    from rebalance.serve.limits import Limits

    try:
        token_file = check_token_file(args.token_file, args.no_auth, args.host)
        limits = Limits(**{f.name: getattr(args, f.name) for f in fields(Limits)})
    except (ValueError, OSError) as err:
        print(f"rebalance serve: error: {err}", file=sys.stderr)
        return 2
    if token_file is None:
        print("rebalance serve: WARNING: no authentication (--no-auth)", file=sys.stderr)
    if not is_loopback(args.host):
        print(
            f"rebalance serve: WARNING: listening on {args.host}: plain http carries the token in clear text; "
            "put a TLS proxy in front",
            file=sys.stderr,
        )
    try:
        run_server(
            args.run_dir,
            host=args.host,
            port=args.port,
            token_file=token_file,
            limits=limits,
            replicas=args.replicas,
            num_cpus=args.num_cpus,
            device=args.device,
            load_model=not args.embeddings_only,
            ray_address=args.ray_address,
            ray_listen=args.ray_listen,
        )
    except (FileNotFoundError, RuntimeError, ValueError) as err:
        print(f"rebalance serve: error: {err}", file=sys.stderr)
        return 1
    return 0
