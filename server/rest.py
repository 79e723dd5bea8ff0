"""The REST API: a thin FastAPI layer over :class:`~kvwire.server.service.KvwireService`.

Authentication (bearer API keys mapped to tenants), the request body size limit, Prometheus metrics
and the one mapping from the typed ``kvwire.errors`` hierarchy to HTTP statuses live here and nowhere
else. See docs/service.md for the endpoints.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvwire._version import __version__
from kvwire.errors import (
    AuthError,
    BackendUnavailableError,
    InvalidInputError,
    KvwireError,
    LimitExceededError,
    NotFoundError,
    RateLimitError,
)
from kvwire.manifest import ContextManifest, Job, LevelEntry
from kvwire.server.auth import AccessControl
from kvwire.server.config import ServiceSettings
from kvwire.server.service import CONTEXT_ID_PATTERN, DEFAULT_LIST_PAGE, MAX_LIST_PAGE, KvwireService

log = logging.getLogger(__name__)

# The one mapping from error types to HTTP statuses (most specific first).
ERROR_STATUS: tuple[tuple[type[KvwireError], int], ...] = (
    (InvalidInputError, 400),
    (AuthError, 401),
    (NotFoundError, 404),
    (RateLimitError, 429),
    (LimitExceededError, 413),
    (BackendUnavailableError, 503),
)


def error_response(
    status: int, type_: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "message": message}}, status_code=status, headers=headers)


def kvwire_error_response(exc: KvwireError) -> JSONResponse:
    for cls, status in ERROR_STATUS:
        if isinstance(exc, cls):
            headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
            if isinstance(exc, RateLimitError):
                headers = {"Retry-After": str(exc.retry_after_s)}
            return error_response(status, type(exc).__name__, str(exc), headers)
    # Corrupt stored data, model/profile mismatches: a server-side fault, reported without internals.
    log.error("internal kvwire error: %s: %s", type(exc).__name__, exc)
    return error_response(500, type(exc).__name__, str(exc))


# --------------------------------------------------------------------------------------- body limit


class BodySizeLimit:
    """Refuse request bodies above ``max_bytes`` with 413 before anything parses them.

    ``Content-Length`` is checked first; a body without one (chunked) is read up to the limit here
    and replayed to the app.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_bytes
            except ValueError:
                too_big = True
            if too_big:
                await self._refuse(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        if scope.get("method") in ("GET", "HEAD", "DELETE", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"request body exceeds {self.max_bytes} bytes"
        await error_response(413, "LimitExceededError", message)(scope, receive, send)


# ------------------------------------------------------------------------------------------ metrics


class Metrics:
    """Prometheus metrics of one app, in its own registry (several apps may live in one process).

    Under ``kvwire serve --workers N`` the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` for its
    children (:mod:`kvwire.server.supervisor`): prometheus_client then keeps every process's counters
    in files there, and a scrape, which reaches one process, reports the sum over all of them.
    """

    def __init__(self, service: KvwireService):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "kvwire_http_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "kvwire_http_request_seconds", "HTTP request latency", ["method", "route"], registry=self.registry
        )
        self.bytes_served = Counter(
            "kvwire_chunk_bytes_served", "chunk bitstream bytes sent", registry=self.registry
        )
        self.ingests = Counter(
            "kvwire_ingest_requests", "ingest requests by outcome", ["outcome"], registry=self.registry
        )
        self.jobs = _JobCollector(service)
        self.registry.register(self.jobs)

    def exposition(self) -> bytes:
        """The text a scrape gets: this process's registry, or every serving process's sum."""
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        registry.register(self.jobs)  # read from the shared queue: the same in every process
        return generate_latest(registry)


class _JobCollector:
    """``kvwire_ingest_jobs{state}``: jobs per state, read from the queue at scrape time."""

    def __init__(self, service: KvwireService):
        self.service = service

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> list[GaugeMetricFamily]:
        family = GaugeMetricFamily("kvwire_ingest_jobs", "ingest jobs per state", labels=["state"])
        try:
            counts = self.service.jobs.counts()
        except KvwireError:
            return []
        for state, n in counts.items():
            family.add_metric([state], n)
        return [family]


_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


class RequestMetrics:
    """Count and time every HTTP request by method, route template and status.

    Plain ASGI rather than ``@app.middleware("http")``: Starlette's ``BaseHTTPMiddleware`` re-streams
    every response body through an extra task and queue, which cost more than serving a chunk.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            # Labels are bounded and carry no caller data: the route *template* (never a context id),
            # and a known method, since a client may send any token as one.
            path = getattr(scope.get("route"), "path", "unmatched")
            method = scope.get("method", "")
            method = method if method in _HTTP_METHODS else "other"
            self.metrics.requests.labels(method, path, str(status)).inc()
            self.metrics.latency.labels(method, path).observe(time.perf_counter() - start)


# -------------------------------------------------------------------------------------------- models


class IngestBody(BaseModel):
    """A context to ingest: exactly one of ``text`` and ``token_ids``."""

    text: str | None = None
    token_ids: list[int] | None = Field(default=None, min_length=1)
    context_id: str | None = Field(default=None, min_length=1, max_length=128)


class ContextList(BaseModel):
    """One page of the caller's context ids, sorted; pass ``next_after`` as ``after`` for the next."""

    context_ids: list[str]
    next_after: str | None = None


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": desc}
    for status, desc in (
        (400, "invalid input"),
        (401, "missing or invalid API key"),
        (404, "unknown id (or another tenant's)"),
        (413, "request or context too large"),
        (429, "rate limit, or too many pending jobs (Retry-After)"),
        (503, "storage or job queue unavailable"),
    )
}
_BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}


# --------------------------------------------------------------------------------------------- auth


async def authenticate(request: Request) -> str:
    """The tenant of the request's bearer key, charged to its rate limit (``kvwire.server.auth``).

    On the event loop unless the rate limit is shared through Redis: FastAPI runs a plain ``def``
    dependency in its thread pool, a second thread hop per request on top of the endpoint's, which
    cost more than the hash and comparisons themselves (docs/serving-benchmark.md)."""
    access: AccessControl = request.app.state.access
    header = request.headers.get("authorization")
    if access.admit_blocks:
        return await run_in_threadpool(access.admit, header)
    return access.admit(header)


Tenant = Annotated[str, Depends(authenticate)]
PageLimit = Annotated[int, Query(ge=1, le=MAX_LIST_PAGE, description="ids per page")]
ContextId = Annotated[
    str, Path(pattern=f"^{CONTEXT_ID_PATTERN}$", description="1-128 of [A-Za-z0-9._-], not led by '.'")
]
PageAfter = Annotated[str | None, Query(max_length=128, description="the previous page's next_after")]


# ----------------------------------------------------------------------------------------------- app


def create_app(
    service: KvwireService, settings: ServiceSettings | None = None, access: AccessControl | None = None
) -> FastAPI:
    """The REST app over ``service``; ``settings`` defaults to the service's, ``access`` (keys and
    rate limits, shared with a gRPC server of the same process) to one built from ``settings``."""
    settings = settings or service.settings
    metrics = Metrics(service)
    app = FastAPI(
        title="kvwire",
        version=__version__,
        description="Networked KV-cache streaming: ingest contexts, fetch their encoded KV chunks.",
    )
    app.state.service = service
    app.state.settings = settings
    app.state.access = access or AccessControl(settings)
    app.state.metrics = metrics

    # -- errors, mapped once

    @app.exception_handler(KvwireError)
    async def _kvwire_error(request: Request, exc: KvwireError) -> JSONResponse:
        return kvwire_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors()[:5]
        )
        return error_response(400, "InvalidInputError", problems or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = {404: "NotFoundError", 405: "MethodNotAllowed"}.get(exc.status_code, "HTTPError")
        return error_response(exc.status_code, type_, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "InternalError", "internal server error")

    # -- middleware: the body limit runs inside the metrics, so that refused requests are counted

    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)

    app.add_middleware(RequestMetrics, metrics=metrics)

    # -- endpoints

    @app.post(
        "/v1/contexts",
        status_code=201,
        response_model=ContextManifest,
        responses={202: {"model": Job, "description": "queued: poll GET /v1/jobs/{id}"}, **_ERRORS},
        summary="Ingest a context (inline: 201 + manifest; long: 202 + job)",
    )
    async def ingest(body: IngestBody, tenant: Tenant) -> Any:
        result = await run_in_threadpool(
            service.ingest, tenant, text=body.text, token_ids=body.token_ids, context_id=body.context_id
        )
        if isinstance(result, Job):
            metrics.ingests.labels("queued").inc()
            location = {"Location": f"/v1/jobs/{result.id}"}
            return JSONResponse(result.to_dict(), status_code=202, headers=location)
        metrics.ingests.labels("inline").inc()
        return JSONResponse(result.to_dict(), status_code=201)

    @app.get(
        "/v1/contexts",
        response_model=ContextList,
        responses=_ERRORS,
        summary="List the caller's contexts (ids, sorted, paged)",
    )
    async def list_contexts(
        tenant: Tenant,
        limit: PageLimit = DEFAULT_LIST_PAGE,
        after: PageAfter = None,
    ) -> Any:
        ids, next_after = await run_in_threadpool(service.list_contexts, tenant, limit=limit, after=after)
        return JSONResponse({"context_ids": ids, "next_after": next_after})

    @app.get("/v1/jobs/{job_id}", response_model=Job, responses=_ERRORS, summary="Ingest job state")
    async def get_job(job_id: str, tenant: Tenant) -> Any:
        job = await run_in_threadpool(service.job, tenant, job_id)
        return JSONResponse(job.to_dict())

    @app.get(
        "/v1/contexts/{context_id}", response_model=ContextManifest, responses=_ERRORS, summary="Manifest"
    )
    async def get_context(context_id: ContextId, tenant: Tenant) -> Any:
        # The stored JSON as is: it is what JSONResponse(manifest.to_dict()) would render, without
        # rebuilding and re-encoding every chunk entry on each request.
        data = await run_in_threadpool(service.manifest_json, tenant, context_id)
        return Response(data, media_type="application/json")

    @app.get(
        "/v1/contexts/{context_id}/chunks/{index}",
        response_class=Response,
        responses={
            200: {"content": _BINARY, "description": "the chunk bitstream (ETag = crc32 hex)"},
            304: {"description": "not modified (If-None-Match matched)"},
            **_ERRORS,
        },
        summary="One encoded chunk at one level",
    )
    async def get_chunk(
        request: Request,
        context_id: ContextId,
        index: int,
        tenant: Tenant,
        level: Annotated[int | None, Query(ge=0, description="quality level (default: manifest's)")] = None,
    ) -> Response:
        if_none_match = request.headers.get("if-none-match")

        def read() -> tuple[LevelEntry, bytes | None]:  # one thread hop for the entry and the bytes
            entry = service.chunk_entry(tenant, context_id, index, level)
            if _etag_matches(if_none_match, entry.checksum):
                return entry, None
            return entry, service.store.get(entry.key)

        entry, data = await run_in_threadpool(read)
        etag = f'"{entry.checksum}"'
        if data is None:
            return Response(status_code=304, headers={"ETag": etag})
        metrics.bytes_served.inc(len(data))
        headers = {
            "ETag": etag,
            "X-Kvwire-Checksum": entry.checksum,
            "X-Kvwire-Level": str(entry.level),
            "Cache-Control": "private, max-age=31536000, immutable",
        }
        return Response(data, media_type="application/octet-stream", headers=headers)

    @app.get(
        "/v1/profiles/{digest}",
        response_class=Response,
        responses={200: {"content": _BINARY, "description": "calibration profile bytes"}, **_ERRORS},
        summary="Calibration profile by digest",
    )
    async def get_profile(digest: str, tenant: Tenant) -> Response:
        data = await run_in_threadpool(service.profile, digest)
        metrics.bytes_served.inc(len(data))
        return Response(data, media_type="application/octet-stream", headers={"ETag": f'"{digest}"'})

    @app.delete("/v1/contexts/{context_id}", status_code=204, responses=_ERRORS, summary="Delete a context")
    async def delete_context(context_id: ContextId, tenant: Tenant) -> Response:
        await run_in_threadpool(service.delete, tenant, context_id)
        return Response(status_code=204)

    @app.get("/healthz", summary="Liveness (no auth)")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", responses={503: _ERRORS[503]}, summary="Readiness: store and job queue answer")
    async def readyz() -> dict[str, str]:
        await run_in_threadpool(service.health)
        return {"status": "ready"}

    @app.get(
        "/metrics",
        response_class=Response,
        responses={401: _ERRORS[401]},
        summary="Prometheus metrics (Bearer KVWIRE_METRICS_TOKEN when one is set)",
    )
    async def prometheus(request: Request) -> Response:
        app.state.access.check_metrics_token(request.headers.get("authorization"))
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app


def _etag_matches(header: str | None, checksum: str) -> bool:
    if not header:
        return False
    if header.strip() == "*":
        return True
    tags = [t.strip().removeprefix("W/").strip('"') for t in header.split(",")]
    return checksum in tags


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_tls_files(settings: ServiceSettings) -> None:
    """Refuse, with a clear error, TLS settings whose files cannot be read as a PEM cert and key."""
    if not settings.tls_enabled:
        return
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(str(settings.tls_certfile), str(settings.tls_keyfile))
    except (OSError, ssl.SSLError) as exc:
        raise InvalidInputError(
            f"cannot load TLS certificate {settings.tls_certfile} / key {settings.tls_keyfile}: {exc}"
        ) from exc


def serve(settings: ServiceSettings | None = None) -> None:
    """Build the service from ``settings`` and run the REST API with uvicorn until interrupted.

    With ``settings.grpc_port`` set, the gRPC API (``kvwire.server.grpc_server``) runs alongside it;
    with ``tls_certfile``/``tls_keyfile`` set, both serve TLS only. With ``settings.workers > 1``,
    that many such processes share the ports (``kvwire.server.supervisor``).
    """
    from kvwire.server.supervisor import check_workers, serve_workers

    settings = settings or ServiceSettings()
    if not settings.auth_enabled and not settings.allow_anonymous and not _is_loopback(settings.host):
        raise InvalidInputError(
            f"refusing to serve without API keys on {settings.host}: set KVWIRE_API_KEYS "
            "(or KVWIRE_ALLOW_ANONYMOUS=true to serve every caller as the default tenant)"
        )
    check_tls_files(settings)
    check_workers(settings)
    if settings.workers > 1:
        serve_workers(settings)
    else:
        serve_process(settings)


def serve_process(settings: ServiceSettings, *, reuse_port: bool = False) -> None:
    """One serving process: the service, the gRPC API (if ``grpc_port``) and the REST API (uvicorn).

    ``reuse_port``: bind both ports with ``SO_REUSEPORT``, beside other processes serving the same
    ports (a child of :func:`kvwire.server.supervisor.serve_workers`; grpcio sets it by itself).
    """
    import uvicorn

    from kvwire.server.allocator import keep_freed_memory
    from kvwire.server.service import build_service
    from kvwire.server.supervisor import reuse_port_socket
    from kvwire.server.timeouts import uvicorn_options

    keep_freed_memory(settings.malloc_mmap_threshold_bytes)  # before the servers' threads allocate
    sockets = [reuse_port_socket(settings.host, settings.port)] if reuse_port else None
    service = build_service(settings)
    access = AccessControl(settings)  # one rate-limit bucket per key across both APIs
    grpc_server = None
    try:
        if settings.grpc_port is not None:  # the gRPC API shares the process, service and worker
            from kvwire.server.grpc_server import serve_grpc

            grpc_server = serve_grpc(service, settings, settings.grpc_port, access=access)
        tls: dict[str, Any] = {}
        if settings.tls_enabled:
            tls = {"ssl_certfile": str(settings.tls_certfile), "ssl_keyfile": str(settings.tls_keyfile)}
        config = uvicorn.Config(
            create_app(service, settings, access),
            host=settings.host,
            port=settings.port,
            log_level="info",
            **tls,
            **uvicorn_options(settings),  # timeouts against stalled clients (kvwire.server.timeouts)
        )
        server = uvicorn.Server(config)
        with contextlib.suppress(KeyboardInterrupt):
            server.run(sockets=sockets)
        if not server.started:  # uvicorn logged why (a port in use, say)
            raise InvalidInputError(f"the REST API did not start on {settings.host}:{settings.port}")
    finally:
        if grpc_server is not None:
            grpc_server.stop(settings.shutdown_grace_s)
        access.close()
        service.close()
        for sock in sockets or ():
            sock.close()
