"""The gRPC API: a servicer of ``proto/kvwire.proto`` over :class:`~kvwire.server.service.KvwireService`.

The same operations, tenants and API keys as the REST API (``kvwire.server.rest``), plus
``StreamContext``: the server pushes a context's chunks in order and, in adaptive mode, chooses each
chunk's level (or text) with :class:`kvwire.controller.Controller`, fed with the send throughput it
measures itself. Authentication and the one mapping from ``kvwire.errors`` to gRPC status codes live
here. See docs/grpc.md.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from kvwire._proto import CHANNEL_OPTIONS
from kvwire._proto import kvwire_pb2 as pb
from kvwire._proto import kvwire_pb2_grpc as pb_grpc
from kvwire._version import __version__
from kvwire.controller import (
    ChunkOption,
    ContextOptions,
    Controller,
    CostModel,
    Mode,
    Policy,
    ThroughputEstimator,
    warm_up,
)
from kvwire.errors import (
    AuthError,
    BackendUnavailableError,
    CorruptChunkError,
    InvalidInputError,
    KvwireError,
    LimitExceededError,
    NotFoundError,
    RateLimitError,
)
from kvwire.manifest import ChunkEntry, ContextManifest, Job, LevelEntry
from kvwire.server.auth import AccessControl
from kvwire.server.config import ServiceSettings
from kvwire.server.service import DEFAULT_LIST_PAGE, KvwireService, crc32_hex
from kvwire.server.timeouts import SendWatchdog, grpc_server_options

log = logging.getLogger(__name__)

#: Adaptive streaming before the first measured chunk, when the client gives no bandwidth hint (1 Gbit/s).
DEFAULT_BANDWIDTH_BYTES_PER_S = 125e6
#: Smallest message whose send time is fed to the throughput estimator: for smaller ones (text chunks,
#: tiny KV chunks) the time is per-message overhead, not bandwidth.
MIN_SAMPLE_BYTES = 256 * 1024
#: The client device's costs when it gives none: a small model's prefill on one GPU.
DEFAULT_COSTS = CostModel(recompute_s_per_token=2e-4, decode_s_per_chunk=2e-3)
#: Trailing metadata key carrying the ``kvwire.errors`` type name of a failed call.
ERROR_TYPE_KEY = "kvwire-error-type"
#: Trailing metadata key of a rate-limited call: whole seconds to wait before retrying.
RETRY_AFTER_KEY = "retry-after"

# The one mapping from error types to gRPC status codes (most specific first; RateLimitError is a
# LimitExceededError, UnsupportedVersionError a CorruptChunkError). Anything else is INTERNAL.
ERROR_CODES: tuple[tuple[type[KvwireError], grpc.StatusCode], ...] = (
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (AuthError, grpc.StatusCode.UNAUTHENTICATED),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (LimitExceededError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (BackendUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (CorruptChunkError, grpc.StatusCode.DATA_LOSS),
)

_JOB_STATES = {
    "queued": pb.JOB_STATE_QUEUED,
    "running": pb.JOB_STATE_RUNNING,
    "done": pb.JOB_STATE_DONE,
    "failed": pb.JOB_STATE_FAILED,
}
_POLICIES: dict[int, Policy] = {
    pb.POLICY_UNSPECIFIED: "robust",
    pb.POLICY_LOOKAHEAD: "lookahead",
    pb.POLICY_CACHEGEN: "cachegen",
    pb.POLICY_ROBUST: "robust",
}


def status_code(exc: KvwireError) -> grpc.StatusCode:
    """The gRPC status code of a kvwire error."""
    for cls, code in ERROR_CODES:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def _abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    """End the call with the status of ``exc`` (raises, as ``context.abort`` does)."""
    if isinstance(exc, KvwireError):
        code, name, message = status_code(exc), type(exc).__name__, str(exc)
        if code == grpc.StatusCode.INTERNAL:  # corrupt profile, model mismatch: a server-side fault
            log.error("internal kvwire error: %s: %s", name, message)
    else:
        log.error("unhandled error in gRPC call", exc_info=exc)
        code, name, message = grpc.StatusCode.INTERNAL, "InternalError", "internal server error"
    trailers: tuple[tuple[str, str], ...] = ((ERROR_TYPE_KEY, name),)
    if isinstance(exc, RateLimitError):
        trailers += ((RETRY_AFTER_KEY, str(exc.retry_after_s)),)
    context.set_trailing_metadata(trailers)
    context.abort(code, message)


F = TypeVar("F", bound=Callable[..., Any])


def _rpc(method: F) -> F:
    """Map every exception a servicer method (unary or streaming) raises to a gRPC status."""
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def streaming(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from method(self, request, context)
            except Exception as exc:
                _abort(context, exc)

        return streaming  # type: ignore[return-value]

    @functools.wraps(method)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:
            _abort(context, exc)

    return unary  # type: ignore[return-value]


def authenticate(access: AccessControl, metadata: Sequence[tuple[str, Any]]) -> str:
    """The tenant of the call's ``authorization: Bearer <key>`` metadata, charged to its rate limit."""
    header = next((str(v) for k, v in metadata if k.lower() == "authorization"), None)
    return access.admit(header)


# ------------------------------------------------------------------------------------------ messages


def manifest_message(manifest: ContextManifest) -> pb.Manifest:
    return pb.Manifest(
        context_id=manifest.context_id,
        tenant=manifest.tenant,
        model_fingerprint=manifest.model_fingerprint,
        profile_digest=manifest.profile_digest,
        codec_version=manifest.codec_version,
        chunk_tokens=manifest.chunk_tokens,
        total_tokens=manifest.total_tokens,
        levels=manifest.levels,
        default_level=manifest.default_level,
        chunks=[_chunk_entry_message(c) for c in manifest.chunks],
        created_at=manifest.created_at,
        format=manifest.format,
        manifest_version=manifest.manifest_version,
    )


def _chunk_entry_message(chunk: ChunkEntry) -> pb.ChunkEntry:
    return pb.ChunkEntry(
        index=chunk.index,
        token_start=chunk.token_start,
        token_end=chunk.token_end,
        token_ids=chunk.token_ids,
        text=chunk.text,
        levels=[
            pb.LevelEntry(level=e.level, key=e.key, nbytes=e.nbytes, checksum=e.checksum)
            for e in chunk.levels
        ],
    )


def job_message(job: Job) -> pb.Job:
    return pb.Job(
        id=job.id,
        tenant=job.tenant,
        context_id=job.context_id,
        state=_JOB_STATES[job.state],
        chunks_done=job.chunks_done,
        chunks_total=job.chunks_total,
        error=pb.JobError(**job.error) if job.error else None,
        created_at=job.created_at,
        updated_at=job.updated_at,
    )


def context_options(manifest: ContextManifest) -> ContextOptions:
    """What the controller needs of a manifest: per chunk, its token count and size at each level."""
    return ContextOptions(
        levels=tuple(manifest.levels),
        chunks=tuple(
            ChunkOption(c.index, c.token_end - c.token_start, {e.level: e.nbytes for e in c.levels})
            for c in manifest.chunks
        ),
    )


def stream_controller(request: pb.StreamRequest, manifest: ContextManifest) -> Controller:
    """The controller of one ``StreamContext`` call: the request's mode, costs and bandwidth hint."""
    which = request.WhichOneof("mode")
    costs, prior = DEFAULT_COSTS, DEFAULT_BANDWIDTH_BYTES_PER_S
    policy: Policy = "robust"
    if which == "fixed_level":
        mode = Mode.fixed_level(request.fixed_level)
    elif which == "text":
        mode = Mode.text()
    elif which == "adaptive":
        a = request.adaptive
        mode = Mode.adaptive(a.slo_ms / 1e3, a.margin, a.floor_bytes_per_s or None)
        if a.HasField("costs"):
            costs = CostModel(
                recompute_s_per_token=a.costs.recompute_ms_per_token / 1e3,
                decode_s_per_chunk=a.costs.decode_ms_per_chunk / 1e3,
            )
        if a.policy not in _POLICIES:
            raise InvalidInputError(f"unknown policy {a.policy}")
        policy = _POLICIES[a.policy]
        prior = a.bandwidth_bytes_per_s or prior
    else:
        mode = Mode.fixed_level(manifest.default_level)
    estimator = ThroughputEstimator(prior_bytes_per_s=prior)
    return Controller(context_options(manifest), mode, costs, policy=policy, estimator=estimator)


# ----------------------------------------------------------------------------------------- servicer


class KvwireServicer(pb_grpc.KvwireServicer):
    """Every RPC of ``kvwire.v1.Kvwire``; each authenticates, calls the service, converts the result."""

    def __init__(
        self,
        service: KvwireService,
        settings: ServiceSettings | None = None,
        access: AccessControl | None = None,
    ):
        self.service = service
        self.settings = settings or service.settings
        self.access = access or AccessControl(self.settings)
        self.send_watchdog = SendWatchdog(self.settings.grpc_send_timeout_s)
        # StreamContext reads the next chunk while the current one is being sent (see _prefetch).
        self.prefetcher = futures.ThreadPoolExecutor(
            max_workers=self.settings.grpc_max_workers, thread_name_prefix="kvwire-grpc-prefetch"
        )

    def _tenant(self, context: grpc.ServicerContext) -> str:
        return authenticate(self.access, context.invocation_metadata() or ())

    def _read(self, entry: LevelEntry) -> bytes:
        """A chunk's bitstream, checked against the manifest's checksum."""
        data = self.service.store.get(entry.key)
        if crc32_hex(data) != entry.checksum:
            raise CorruptChunkError(f"stored chunk {entry.key} does not match its manifest checksum")
        return data

    def _prefetch(self, chunks: Sequence[ChunkEntry], position: int, level: int) -> _Prefetch | None:
        """Start reading chunk ``position`` at ``level`` in the background, if it has that level.

        A stream is read, sent, read, sent...: reading the next chunk while a message waits for the
        transport overlaps the store's latency with the send. The guess is the level just sent (the
        fixed level, or the controller's last choice, which rarely changes between chunks); a stream
        that then decides otherwise reads what it decided and drops the guess. At most one chunk per
        stream is held ahead."""
        if position >= len(chunks):
            return None
        entry = next((e for e in chunks[position].levels if e.level == level), None)
        if entry is None:
            return None
        try:
            future = self.prefetcher.submit(self._read, entry)
        except RuntimeError:  # the server is stopping (GrpcServer.stop): the stream reads on its own
            return None
        return _Prefetch(entry.key, future)

    def _read_decided(self, entry: LevelEntry, prefetched: _Prefetch | None) -> bytes:
        """The bytes of ``entry``: the prefetch's result (or error) if it read this entry, else a read now."""
        if prefetched is not None and prefetched.key == entry.key:
            return prefetched.future.result()
        if prefetched is not None:
            prefetched.future.cancel()
        return self._read(entry)

    @_rpc
    def CreateContext(
        self, request: pb.CreateContextRequest, context: grpc.ServicerContext
    ) -> pb.CreateContextResponse:
        tenant = self._tenant(context)
        if request.ByteSize() > self.settings.max_request_bytes:
            raise LimitExceededError(f"request exceeds {self.settings.max_request_bytes} bytes")
        which = request.WhichOneof("input")
        if which is None:
            raise InvalidInputError("give text or token_ids")
        if which == "token_ids" and not request.token_ids.ids:
            raise InvalidInputError("token_ids is empty")
        result = self.service.ingest(
            tenant,
            text=request.text if which == "text" else None,
            token_ids=list(request.token_ids.ids) if which == "token_ids" else None,
            context_id=request.context_id or None,
        )
        if isinstance(result, Job):
            return pb.CreateContextResponse(job=job_message(result))
        return pb.CreateContextResponse(manifest=manifest_message(result))

    @_rpc
    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.Job:
        return job_message(self.service.job(self._tenant(context), request.job_id))

    @_rpc
    def GetManifest(self, request: pb.GetManifestRequest, context: grpc.ServicerContext) -> pb.Manifest:
        return manifest_message(self.service.manifest(self._tenant(context), request.context_id))

    @_rpc
    def GetChunk(self, request: pb.GetChunkRequest, context: grpc.ServicerContext) -> pb.Chunk:
        level = request.level if request.HasField("level") else None
        entry = self.service.chunk_entry(self._tenant(context), request.context_id, request.index, level)
        data = self._read(entry)
        return pb.Chunk(index=request.index, level=entry.level, data=data, checksum=entry.checksum)

    @_rpc
    def ListContexts(
        self, request: pb.ListContextsRequest, context: grpc.ServicerContext
    ) -> pb.ListContextsResponse:
        tenant = self._tenant(context)
        limit = request.limit or DEFAULT_LIST_PAGE
        ids, next_after = self.service.list_contexts(tenant, limit=limit, after=request.after or None)
        return pb.ListContextsResponse(context_ids=ids, next_after=next_after or "")

    @_rpc
    def GetProfile(self, request: pb.GetProfileRequest, context: grpc.ServicerContext) -> pb.Profile:
        self._tenant(context)  # profiles describe models, not tenant data: any tenant may read
        return pb.Profile(digest=request.digest, data=self.service.profile(request.digest))

    @_rpc
    def DeleteContext(
        self, request: pb.DeleteContextRequest, context: grpc.ServicerContext
    ) -> pb.DeleteContextResponse:
        self.service.delete(self._tenant(context), request.context_id)
        return pb.DeleteContextResponse()

    @_rpc
    def Health(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthResponse:
        if request.ready:
            self.service.health()
        return pb.HealthResponse(status="ready" if request.ready else "ok", version=__version__)

    @_rpc
    def StreamContext(
        self, request: pb.StreamRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ChunkMessage]:
        started = time.perf_counter()
        manifest = self.service.manifest(self._tenant(context), request.context_id)
        controller = stream_controller(request, manifest)
        adaptive = controller.mode.kind == "adaptive"
        prefetched: _Prefetch | None = None
        for position, chunk in enumerate(manifest.chunks):
            if not context.is_active():  # the client cancelled or went away
                if prefetched is not None:
                    prefetched.future.cancel()
                return
            estimate = controller.estimator.predict() if adaptive else 0.0
            decision = controller.decide(time.perf_counter() - started)
            message = pb.ChunkMessage(
                index=chunk.index,
                token_start=chunk.token_start,
                n_tokens=chunk.token_end - chunk.token_start,
                reason=decision.reason,
                predicted_completion_ms=(decision.predicted_completion_s or 0.0) * 1e3,
                estimate_bytes_per_s=estimate,
            )
            if decision.kind == "kv":
                assert decision.level is not None
                entry = chunk.level(decision.level)
                message.kind = pb.CHUNK_KIND_KV
                message.level = entry.level
                message.data = self._read_decided(entry, prefetched)
                message.checksum = entry.checksum
                prefetched = self._prefetch(manifest.chunks, position + 1, entry.level)
            else:
                if prefetched is not None:
                    prefetched.future.cancel()
                    prefetched = None
                message.kind = pb.CHUNK_KIND_TEXT
                message.token_ids.extend(chunk.token_ids)
            # The sync server resumes this generator once the message is handed to the transport,
            # which HTTP/2 flow control holds back to the client's pace (once the socket buffers and
            # the flow-control window are full): that is the send time.
            sent = time.perf_counter()
            with self.send_watchdog.guard(context):  # a client that stops reading loses the stream
                yield message
            nbytes = message.ByteSize()
            if nbytes >= MIN_SAMPLE_BYTES:
                controller.record_transfer(nbytes, max(time.perf_counter() - sent, 1e-6))


@dataclass(frozen=True)
class _Prefetch:
    """A chunk read started ahead of its turn in a stream: the store key and the read."""

    key: str
    future: futures.Future[bytes]


# ------------------------------------------------------------------------------------------- server


class PlannerWarmUp:
    """The stream planner's compilation (``kvwire.controller.warm_up``), run in a background thread
    when the gRPC API starts; :meth:`check` holds the process's readiness back until it is done.

    Compiling takes about a second from numba's on-disk cache and ten without one (a fresh install);
    the first adaptive ``StreamContext`` would otherwise pay it while its client waits. Liveness
    (``/healthz``, ``Health``) answers meanwhile, readiness (``/readyz``, ``Health(ready)``) does not.
    A compilation that fails is logged and releases readiness all the same: the rest of the API
    serves, and a stream compiles the planner on first use as it would have without a warm-up.
    """

    def __init__(self) -> None:
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvwire-planner-warm-up", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        started = time.perf_counter()
        try:
            warm_up()  # once per process; later servers of the same process find it done
        except Exception:
            log.exception("stream planner warm-up failed; adaptive streams compile it on first use")
        else:
            log.info("stream planner compiled in %.1f s; ready", time.perf_counter() - started)
        finally:
            self.done.set()

    def check(self) -> None:
        """A readiness check (``KvwireService.readiness_checks``)."""
        if not self.done.is_set():
            raise BackendUnavailableError("not ready: the stream planner is still compiling (warm-up)")

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the warm-up is done (True) or ``timeout_s`` has passed (False)."""
        return self.done.wait(timeout_s)


@dataclass
class GrpcServer:
    """A started gRPC server and the port it is bound to."""

    server: grpc.Server
    port: int
    watchdog: SendWatchdog | None = None
    prefetcher: futures.ThreadPoolExecutor | None = None
    planner: PlannerWarmUp | None = None

    def stop(self, grace_s: float | None = 5.0) -> None:
        self.server.stop(grace_s).wait()
        if self.watchdog is not None:
            self.watchdog.close()
        if self.prefetcher is not None:
            self.prefetcher.shutdown(wait=False, cancel_futures=True)

    def wait_for_termination(self, timeout_s: float | None = None) -> bool:
        return bool(self.server.wait_for_termination(timeout_s))


def server_credentials(settings: ServiceSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from ``settings.tls_certfile``/``tls_keyfile`` (PEM), or None without TLS."""
    if settings.tls_certfile is None or settings.tls_keyfile is None:
        return None
    try:
        chain = settings.tls_certfile.read_bytes()
        key = settings.tls_keyfile.read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"cannot read TLS certificate or key: {exc}") from exc
    return grpc.ssl_server_credentials([(key, chain)])


def serve_grpc(
    service: KvwireService, settings: ServiceSettings, port: int, *, access: AccessControl | None = None
) -> GrpcServer:
    """Start the gRPC API over ``service`` on ``settings.host:port`` (0 = a free port); do not block.

    TLS only when ``settings`` names a certificate and key; ``access`` (keys, rate limits) may be
    shared with the REST app of the same process. The service reports not ready (on every API of the
    process) until the stream planner has compiled in the background (:class:`PlannerWarmUp`).
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.grpc_max_workers, thread_name_prefix="kvwire-grpc"),
        options=[*CHANNEL_OPTIONS, *grpc_server_options(settings)],
        maximum_concurrent_rpcs=settings.grpc_max_concurrent_rpcs,
    )
    servicer = KvwireServicer(service, settings, access)
    pb_grpc.add_KvwireServicer_to_server(servicer, server)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    credentials = server_credentials(settings)
    try:
        if credentials is None:
            bound = server.add_insecure_port(f"{host}:{port}")
        else:
            bound = server.add_secure_port(f"{host}:{port}", credentials)
    except RuntimeError as exc:  # grpcio raises when it cannot bind
        raise InvalidInputError(f"cannot bind gRPC to {host}:{port}: {exc}") from exc
    if bound == 0:
        raise InvalidInputError(f"cannot bind gRPC to {host}:{port}")
    # Not ready (REST and gRPC alike: one service) until the planner is compiled; serving starts now.
    planner = PlannerWarmUp()
    service.readiness_checks.append(planner.check)
    server.start()
    log.info("kvwire gRPC API on %s:%d%s", host, bound, " (TLS)" if credentials else "")
    return GrpcServer(server, bound, servicer.send_watchdog, servicer.prefetcher, planner)
