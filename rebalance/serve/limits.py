"""Request limits of the weighting endpoint, and the guard that enforces them in the Ray Serve HTTP proxy.

Ray Serve's proxy (uvicorn) hands every request to a replica as soon as its headers are parsed, and streams
the body to it. Unchecked, a client could send huge or numerous headers (forwarded to the replica and only
then refused), or keep replicas' request slots busy by sending a body slowly. :class:`ProxyGuard` is a
pure-ASGI middleware that Ray Serve places in front of its proxy through Ray Serve's
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` hook (:func:`proxy_middlewares`); before any replica is
involved it

- refuses too many headers or too many header bytes (431), and a repeated ``Authorization`` header (400);
- bounds the requests one client (IP address) may have in flight (429 with ``Retry-After``);
- reads the whole body under a deadline (408) and a size limit (413), so that a replica only ever gets
  complete requests and slow senders hold no replica slot.

The replica's own guard (:mod:`rebalance.serve.app`) repeats the header checks and the body deadline, so the
limits hold also where the proxy runs without this middleware (a Serve instance on a joined cluster that was
not started with the hook).
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
from dataclasses import asdict, dataclass, fields

from rebalance.serve import DEFAULT_MAX_BATCH, DEFAULT_MAX_BODY_BYTES

__all__ = [
    "Limits",
    "ProxyGuard",
    "proxy_middlewares",
    "proxy_environment",
    "header_problem",
    "read_body",
    "forward_whole",
    "send_json",
    "PROXY_CALLBACK_ENV",
    "PROXY_LIMITS_ENV",
]

PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_LIMITS_ENV = "REBALANCE_SERVE_PROXY_LIMITS"
PROXY_CALLBACK = "rebalance.serve.limits:proxy_middlewares"


@dataclass(frozen=True)
class Limits:
    """Request limits.

    ``max_body_bytes`` and ``max_batch``: body size and samples per request. ``max_header_bytes``: request
    target plus all header names and values; ``max_headers``: number of header lines. ``body_timeout_s``:
    time allowed to receive the whole body. ``max_requests_per_client``: requests one client IP address may
    have in flight at once (in the proxy).
    """

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_batch: int = DEFAULT_MAX_BATCH
    max_header_bytes: int = 16384
    max_headers: int = 64
    body_timeout_s: float = 30.0
    max_requests_per_client: int = 16

    def __post_init__(self):
        if (
            self.max_body_bytes < 1024
            or self.max_batch < 1
            or self.max_header_bytes < 1024
            or self.max_headers < 8
            or not self.body_timeout_s > 0
            or self.max_requests_per_client < 1
        ):
            raise ValueError(
                "limits must be max_body_bytes >= 1024, max_batch >= 1, max_header_bytes >= 1024, "
                f"max_headers >= 8, body_timeout_s > 0 and max_requests_per_client >= 1, got {self}"
            )

    @classmethod
    def from_json(cls, text: str) -> Limits:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in json.loads(text).items() if k in names})


def header_problem(scope: dict, limits: Limits) -> tuple[int, str] | None:
    """(status, reason) when the request's headers break ``limits`` or repeat ``Authorization``."""
    headers = scope.get("headers", [])
    if len(headers) > limits.max_headers:
        return 431, f"{len(headers)} header lines exceed the limit of {limits.max_headers}"
    size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
    size += sum(len(name) + len(value) for name, value in headers)
    if size > limits.max_header_bytes:
        return 431, f"request headers of {size} bytes exceed the limit of {limits.max_header_bytes} bytes"
    if sum(1 for name, _ in headers if name.lower() == b"authorization") > 1:
        return 400, "more than one Authorization header"
    return None


async def read_body(receive, limits: Limits) -> bytes | tuple[int, str] | None:
    """The whole request body; (status, reason) when it is over ``limits.max_body_bytes`` (by Content-Length
    or counted) or not complete within ``limits.body_timeout_s``; None when the client disconnected."""
    chunks, size = [], 0
    try:
        async with asyncio.timeout(limits.body_timeout_s):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limits.max_body_bytes:
                    return 413, too_large(limits.max_body_bytes, size, at_least=True)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
    except TimeoutError:
        return 408, f"the request body was not received within {limits.body_timeout_s:g} s"


def too_large(limit: int, size: int, at_least: bool = False) -> str:
    return (
        f"request body of {'more than ' if at_least else ''}{limit if at_least else size} bytes "
        f"exceeds the limit of {limit} bytes; split the batch"
    )


def content_length_problem(headers: list, limit: int) -> tuple[int, str] | None:
    """(status, reason) for an unreadable Content-Length or one over ``limit``."""
    values = [v for k, v in headers if k.lower() == b"content-length"]
    if not values:
        return None
    if len(set(values)) > 1 or not values[0].isdigit():
        return 400, "Content-Length is not a number"
    if int(values[0]) > limit:
        return 413, too_large(limit, int(values[0]))
    return None


async def send_json(send, status: int, content: dict, extra_headers: list | None = None) -> None:
    body = json.dumps(content).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status in (400, 408, 413, 431):  # the rest of the request may still be on the wire
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra_headers or [])})
    await send({"type": "http.response.body", "body": body})


async def forward_whole(app, scope, receive, send, limits: Limits) -> None:
    """Read the request body whole (:func:`read_body`), then hand the request to ``app`` with the body in one
    message; answer 408 / 413 instead when the body breaks ``limits``."""
    body = await read_body(receive, limits)
    if body is None:
        return
    if isinstance(body, tuple):
        return await send_json(send, body[0], {"detail": body[1]})
    return await app(scope, replay(body, receive), send)


def replay(body: bytes, receive):
    """An ASGI ``receive`` that returns ``body`` whole once, then defers to ``receive`` (disconnects)."""
    delivered = False

    async def _receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return _receive


class ProxyGuard:
    """Pure ASGI middleware for the Serve proxy: header limits, a per-client bound on requests in flight,
    and the body read whole under a deadline before the request goes on to a replica."""

    def __init__(self, app, limits: Limits):
        self.app, self.limits = app, limits
        self.in_flight: collections.Counter[str] = collections.Counter()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        problem = header_problem(scope, self.limits) or content_length_problem(
            scope.get("headers", []), self.limits.max_body_bytes
        )
        if problem:
            return await send_json(send, problem[0], {"detail": problem[1]})
        client = (scope.get("client") or ("?", 0))[0]
        if self.in_flight[client] >= self.limits.max_requests_per_client:
            reason = f"more than {self.limits.max_requests_per_client} requests in flight from {client}"
            return await send_json(send, 429, {"detail": reason}, [(b"retry-after", b"1")])
        self.in_flight[client] += 1
        try:
            return await forward_whole(self.app, scope, receive, send, self.limits)
        finally:
            self.in_flight[client] -= 1
            if not self.in_flight[client]:
                del self.in_flight[client]


def proxy_middlewares() -> list:
    """Ray Serve's HTTP proxy callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``): the
    :class:`ProxyGuard`, with the limits from ``REBALANCE_SERVE_PROXY_LIMITS`` (JSON; defaults otherwise)."""
    from starlette.middleware import Middleware

    text = os.environ.get(PROXY_LIMITS_ENV)
    return [Middleware(ProxyGuard, limits=Limits.from_json(text) if text else Limits())]


def proxy_environment(limits: Limits) -> dict[str, str]:
    """The environment that makes a Ray Serve proxy started from it apply :class:`ProxyGuard` with
    ``limits`` (set it for ``ray start --head`` on a cluster; ``rebalance serve`` sets it for a local Ray)."""
    return {PROXY_CALLBACK_ENV: PROXY_CALLBACK, PROXY_LIMITS_ENV: json.dumps(asdict(limits))}
