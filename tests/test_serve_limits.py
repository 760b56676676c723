"""Request limits of the endpoint, in process (no Ray): the Serve proxy's guard and the replica's guard.

Each request is driven through the ASGI app with a scripted ``receive``; the wrapped app records whether it
was reached, so "refused before any work" is checked directly. The live server is covered by
tests/test_serve.py.
"""

import asyncio
import secrets
import time

import pytest

from rebalance.serve.app import _Guard, read_token_file, token_sha256
from rebalance.serve.limits import Limits, ProxyGuard, proxy_environment, proxy_middlewares

TOKEN = secrets.token_hex(32)
LIMITS = Limits(max_body_bytes=4096, max_header_bytes=2048, max_headers=16, body_timeout_s=0.3)


class Inner:
    """The wrapped app: records the bodies it got and answers 200."""

    def __init__(self):
        self.bodies: list[bytes] = []

    async def __call__(self, scope, receive, send):
        message = await receive()
        self.bodies.append(message["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


def _scope(headers=(), client="10.0.0.1", path="/v1/weigh"):
    raw = [(k.lower().encode(), v.encode()) for k, v in headers]
    return {"type": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "headers": raw,
            "client": (client, 40000), "method": "POST"}  # fmt: skip


def _chunks(*chunks: bytes, delay: float = 0.0):
    """A receive() that sends ``chunks`` (the last one closes the body), each after ``delay`` seconds."""
    queue = list(chunks)

    async def receive():
        await asyncio.sleep(delay)
        if not queue:
            await asyncio.sleep(3600)  # a client that stops sending
        chunk = queue.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(queue)}

    return receive


async def _call(app, scope, receive) -> tuple[int, dict]:
    sent = []

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {"headers": dict(start["headers"]), "body": body}


AUTH = ("Authorization", f"Bearer {TOKEN}")


def _guards():
    proxy_inner, replica_inner = Inner(), Inner()
    return [
        ("proxy", ProxyGuard(proxy_inner, LIMITS), proxy_inner),
        ("replica", _Guard(replica_inner, token_sha256(TOKEN), LIMITS), replica_inner),
    ]


@pytest.mark.parametrize(
    "headers, status, reason",
    [
        ([AUTH] + [(f"X-H{i}", "v") for i in range(16)], 431, "header lines exceed the limit of 16"),
        ([AUTH, ("X-Big", "a" * 2048)], 431, "exceed the limit of 2048 bytes"),
        ([("Authorization", "Bearer x" * 300)], 431, "exceed the limit of 2048 bytes"),  # before auth
        ([AUTH, AUTH], 400, "more than one Authorization header"),
        ([("Authorization", "Bearer wrong-token-wrong"), AUTH], 400, "more than one Authorization header"),
    ],
    ids=["count", "bytes", "big-auth", "same-twice", "wrong-then-right"],
)
def test_header_limits_and_duplicate_authorization_refused_before_the_app(headers, status, reason):
    for where, guard, inner in _guards():
        got, response = asyncio.run(_call(guard, _scope(headers), _chunks(b"{}")))
        assert (got, where) == (status, where) and reason in response["body"].decode(), response
        assert inner.bodies == [], where


def test_within_the_limits_the_body_reaches_the_app_whole():
    for where, guard, inner in _guards():
        headers = [AUTH, ("Content-Type", "application/json")] + [(f"X-H{i}", "v") for i in range(13)]
        status, _ = asyncio.run(_call(guard, _scope(headers), _chunks(b'{"samples"', b": []}", delay=0.01)))
        assert status == 200 and inner.bodies == [b'{"samples": []}'], where


def test_a_body_not_received_in_time_gets_408_and_never_reaches_the_app():
    for where, guard, inner in _guards():
        t0 = time.monotonic()
        status, response = asyncio.run(_call(guard, _scope([AUTH]), _chunks(b"{", b"}", delay=0.2)))
        assert status == 408 and "not received within 0.3 s" in response["body"].decode(), where
        assert time.monotonic() - t0 < 5  # bounded by the deadline, not by the client
        assert inner.bodies == [], where
        assert response["headers"][b"connection"] == b"close"


def test_oversized_bodies_get_413_before_the_app():
    for where, guard, inner in _guards():
        status, _ = asyncio.run(_call(guard, _scope([AUTH, ("Content-Length", "5000")]), _chunks(b"x")))
        assert status == 413, where
        status, _ = asyncio.run(_call(guard, _scope([AUTH]), _chunks(b"x" * 3000, b"x" * 3000)))
        assert status == 413 and inner.bodies == [], where


def test_per_client_bound_refuses_the_excess_of_one_client_only():
    """Two slow requests from one address fill its bound: its third gets 429 at once, while another
    address is still served; once they end, the first address is served again."""
    inner = Inner()
    guard = ProxyGuard(inner, Limits(max_requests_per_client=2, body_timeout_s=5))

    async def scenario():
        slow = [
            asyncio.create_task(_call(guard, _scope([AUTH]), _chunks(b"{}", delay=0.5))) for _ in range(2)
        ]
        await asyncio.sleep(0.1)
        refused = await _call(guard, _scope([AUTH]), _chunks(b"{}"))
        other = await _call(guard, _scope([AUTH], client="10.0.0.2"), _chunks(b"{}"))
        done = await asyncio.gather(*slow)
        again = await _call(guard, _scope([AUTH]), _chunks(b"{}"))
        return refused, other, done, again

    refused, other, done, again = asyncio.run(scenario())
    assert refused[0] == 429 and refused[1]["headers"][b"retry-after"] == b"1"
    assert b"more than 2 requests in flight from 10.0.0.1" in refused[1]["body"]
    assert other[0] == 200 and [d[0] for d in done] == [200, 200] and again[0] == 200
    assert guard.in_flight == {}


def test_the_proxy_hook_builds_the_guard_from_its_environment(monkeypatch):
    limits = Limits(max_header_bytes=4096, max_requests_per_client=3)
    env = proxy_environment(limits)
    assert env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == "rebalance.serve.limits:proxy_middlewares"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    (middleware,) = proxy_middlewares()
    assert middleware.cls is ProxyGuard and middleware.kwargs["limits"] == limits


def test_token_files_others_can_read_are_refused(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    for mode in (0o644, 0o640, 0o604):
        path.chmod(mode)
        with pytest.raises(ValueError, match=f"readable by others \\(mode {mode:o}\\): chmod 600"):
            read_token_file(path)
    path.chmod(0o600)
    assert read_token_file(path) == TOKEN
    path.write_text("short")
    with pytest.raises(ValueError, match="at least 16 characters") as err:
        read_token_file(path)
    assert "short" not in str(err.value)


def test_the_token_is_never_taken_from_the_environment(tmp_path, monkeypatch):
    from rebalance.serve.cli import check_token_file

    path = tmp_path / "token"
    path.write_text(TOKEN)
    path.chmod(0o600)
    assert check_token_file(str(path), False, "127.0.0.1") == str(path)
    monkeypatch.setenv("REBALANCE_SERVE_TOKEN", TOKEN)
    with pytest.raises(ValueError, match="REBALANCE_SERVE_TOKEN is not read") as err:
        check_token_file(str(path), False, "127.0.0.1")
    assert TOKEN not in str(err.value)
