"""The HTTP+JSON API of the weighting endpoint: a FastAPI (ASGI) app around a :class:`Weigher`.

Routes: ``POST /v1/weigh`` (weigh a batch of samples), ``GET /v1/info`` (what the run expects), both behind
bearer-token authentication; ``GET /healthz`` and ``GET /openapi.json`` are public. A pure-ASGI guard in
front of the app checks the header limits and the token before the body is read, then reads the body under
its size limit and deadline (:mod:`rebalance.serve.limits`); every malformed request gets a 4xx JSON answer
``{"detail": reason, ...}``.
"""

import hashlib
import hmac
import logging
import os
import stat
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from rebalance.serve import DEFAULT_MAX_BATCH, DEFAULT_MAX_BODY_BYTES
from rebalance.serve.limits import Limits, content_length_problem, forward_whole, header_problem, send_json
from rebalance.serve.weigher import RequestError, Sample, Weigher

__all__ = [
    "Limits",
    "build_app",
    "token_sha256",
    "read_token_file",
    "MIN_TOKEN_CHARS",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_BATCH",
    "MAX_CAPTION_CHARS",
]

log = logging.getLogger(__name__)

MAX_CAPTION_CHARS = 8192
MAX_KEY_CHARS = 1024
MAX_METADATA_FIELDS = 64
PUBLIC_PATHS = frozenset({"/healthz", "/openapi.json"})
MAX_ERRORS_LISTED = 20
MIN_TOKEN_CHARS = 16


def token_sha256(token: str) -> str:
    """The SHA-256 hex digest the server keeps instead of the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()


def read_token_file(path: str | os.PathLike) -> str:
    """The bearer token held in file ``path``. Raises ValueError when the file can be read by anyone but
    its owner (group or other permission bits), or the token is shorter than :data:`MIN_TOKEN_CHARS`
    characters or holds white space; OSError when it cannot be read. The token is never logged."""
    path = Path(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ValueError(f"{path} is readable by others (mode {mode:o}): chmod 600 {path}")
    token = path.read_text().strip()
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise ValueError(
            f"the token in {path} must be at least {MIN_TOKEN_CHARS} characters without spaces "
            "(e.g. python -c 'import secrets; print(secrets.token_hex(32))')"
        )
    return token


# -- schemas -------------------------------------------------------------------------------------------------


class ErrorItem(BaseModel):
    loc: list[str]
    msg: str
    type: str


class ErrorBody(BaseModel):
    detail: str = Field(description="why the request was refused")
    errors: list[ErrorItem] | None = Field(None, description="per-field problems of an invalid body")


class SampleResult(BaseModel):
    key: str | None = Field(description="the sample's key, as sent")
    weight: float = Field(description="balance weight of the sample's cell (mean 1 over the offline rows)")
    labels: dict[str, str] = Field(description="the sample's label for every balance marginal")
    clusters: dict[str, int] = Field(description="nearest fitted cluster per given side (and coarser levels)")
    distances: dict[str, float] = Field(
        description="squared L2 distance to that cluster's centroid, per side"
    )


class WeighResponse(BaseModel):
    results: list[SampleResult]


def _models(dim: int, max_batch: int) -> tuple[type[BaseModel], type[BaseModel]]:
    """Request models for a run of width ``dim`` (the OpenAPI document states the exact vector length)."""
    Component = Annotated[float, Field(allow_inf_nan=False)]
    Vector = Annotated[list[Component], Field(min_length=dim, max_length=dim)]
    MetaValue = StrictStr | StrictInt | None

    class SampleIn(BaseModel):
        """Per side, an embedding or a raw input (not both). Metadata carries the values of the run's
        metadata marginals (``GET /v1/info`` lists them); null is the missing value."""

        model_config = ConfigDict(extra="forbid")
        key: str | None = Field(None, max_length=MAX_KEY_CHARS, description="echoed in the result")
        image_embedding: Vector | None = Field(None, description=f"{dim} floats; L2-normalised by the server")
        text_embedding: Vector | None = Field(None, description=f"{dim} floats; L2-normalised by the server")
        image: str | None = Field(None, description="encoded image bytes (JPEG, PNG, ...), standard base64")
        caption: str | None = Field(None, max_length=MAX_CAPTION_CHARS, description="the image's caption")
        metadata: dict[str, MetaValue] = Field(default_factory=dict, max_length=MAX_METADATA_FIELDS)

    class WeighRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        samples: list[SampleIn] = Field(min_length=1, max_length=max_batch)

    return SampleIn, WeighRequest


# -- the guard: header limits and authentication first, then the body under its limits -----------------


class _Guard:
    """Pure ASGI middleware: 431/400 for headers over the limits or a repeated Authorization header, 401
    without a valid bearer token (before the body is read), then 400 for an unreadable Content-Length, 413
    for a body over the limit (by Content-Length, or counted while reading) and 408 for a body not received
    within the deadline. The Serve proxy's :class:`~rebalance.serve.limits.ProxyGuard` checks the same before
    a request reaches a replica; this guard keeps them where the proxy runs without it."""

    def __init__(self, app, digest: str | None, limits: Limits):
        self.app, self.digest, self.limits = app, digest, limits

    def add_exception_handler(self, exc_class, handler) -> None:
        """Delegate to the wrapped app (Ray Serve registers its overload errors this way)."""
        self.app.add_exception_handler(exc_class, handler)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        problem = header_problem(scope, self.limits)
        if problem:
            return await send_json(send, problem[0], {"detail": problem[1]})
        headers = scope.get("headers", [])
        if self.digest is not None and scope.get("path", "") not in PUBLIC_PATHS:
            reason = self._auth_problem(next((v for k, v in headers if k.lower() == b"authorization"), None))
            if reason:
                return await send_json(send, 401, {"detail": reason}, [(b"www-authenticate", b"Bearer")])
        problem = content_length_problem(headers, self.limits.max_body_bytes)
        if problem:
            return await send_json(send, problem[0], {"detail": problem[1]})
        return await forward_whole(self.app, scope, receive, send, self.limits)

    def _auth_problem(self, header: bytes | None) -> str | None:
        if not header:
            return "missing bearer token (send 'Authorization: Bearer <token>')"
        scheme, _, token = header.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "malformed Authorization header (expected 'Bearer <token>')"
        if not hmac.compare_digest(token_sha256(token.strip()), self.digest):
            return "invalid bearer token"
        return None


# -- the app -------------------------------------------------------------------------------------------------


def build_app(weigher: Weigher, *, token_digest: str | None, limits: Limits | None = None) -> Any:
    """The ASGI app serving ``weigher``. ``token_digest`` is :func:`token_sha256` of the bearer token, or None
    for no authentication. Returns the guarded app (the FastAPI app is its ``.app``)."""
    from rebalance import __version__

    limits = limits or Limits()
    SampleIn, WeighRequest = _models(weigher.dim, limits.max_batch)
    app = FastAPI(
        title="rebalance weighting endpoint",
        version=__version__,
        description=(
            "Clusters and balance weights of new samples from a finished rebalance run. Send embeddings "
            "(L2-normalised by the server) or raw inputs (base64 image bytes, captions) plus the metadata "
            f"fields of the run's metadata marginals. At most {limits.max_batch} samples and "
            f"{limits.max_body_bytes} bytes per request."
        ),
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    bearer = HTTPBearer(auto_error=False, description="the server's token (--token-file)")
    secured = [Security(bearer)] if token_digest is not None else []
    errors = {
        400: {"model": ErrorBody, "description": "unreadable body (not JSON), repeated Authorization header"},
        401: {"model": ErrorBody, "description": "missing or wrong bearer token"},
        408: {"model": ErrorBody, "description": "body not received within the deadline"},
        413: {"model": ErrorBody, "description": "body over the size limit"},
        422: {"model": ErrorBody, "description": "invalid request, with the reason"},
        429: {"model": ErrorBody, "description": "too many requests in flight from this client"},
        431: {"model": ErrorBody, "description": "too many or too large headers"},
    }
    if token_digest is None:
        errors.pop(401)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        items = [
            {
                "loc": [str(part) for part in e.get("loc", ())],
                "msg": str(e.get("msg", "")),
                "type": str(e.get("type", "")),
            }
            for e in exc.errors()
        ]
        status = 400 if any(i["type"] == "json_invalid" for i in items) else 422
        if status == 400:
            e = next(e for e in exc.errors() if e.get("type") == "json_invalid")
            why = str((e.get("ctx") or {}).get("error", "")) or "JSON decode error"
            reason = f"body is not valid JSON: {why}"
            return JSONResponse({"detail": reason, "errors": items[:MAX_ERRORS_LISTED]}, status_code=400)
        where = [".".join(i["loc"][1:]) or "body" for i in items]
        reason = "; ".join(f"{w}: {i['msg']}" for w, i in zip(where, items, strict=True)) or "invalid request"
        if len(items) > MAX_ERRORS_LISTED:
            reason = "; ".join(f"{w}: {i['msg']}" for w, i in zip(where[:10], items[:10], strict=True))
            reason += f"; and {len(items) - 10} more problems"
        return JSONResponse({"detail": reason, "errors": items[:MAX_ERRORS_LISTED]}, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.get("/healthz", summary="liveness")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/v1/info",
        summary="what the run expects",
        dependencies=secured,
        responses={k: v for k, v in errors.items() if k in (400, 401, 429, 431)},
    )
    def info() -> dict[str, Any]:
        return {**weigher.info(), "limits": asdict(limits)}

    @app.post(
        "/v1/weigh",
        summary="clusters and balance weights of new samples",
        dependencies=secured,
        responses=errors,
        response_model=WeighResponse,
    )
    def weigh(request: WeighRequest) -> WeighResponse:  # type: ignore[valid-type]
        samples = [Sample(**s.model_dump()) for s in request.samples]
        try:
            results = weigher.weigh(samples)
        except RequestError as err:
            raise HTTPException(status_code=err.status, detail=err.reason) from None
        return WeighResponse(results=[SampleResult(**r) for r in results])

    return _Guard(app, token_digest, limits)
