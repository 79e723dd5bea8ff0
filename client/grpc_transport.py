"""The gRPC transport (proto/kvwire.proto): the same operations as REST, plus the server-push stream.

A unary response arrives whole, so the throttle holds each one until the bucket has paid for its
bytes; a stream is read message by message through the bucket, which also slows the server through
HTTP/2 flow control once the client's receive window is full (how the server measures throughput).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from kvwire._proto import CHANNEL_OPTIONS
from kvwire._proto import kvwire_pb2 as pb
from kvwire._proto import kvwire_pb2_grpc as pb_grpc
from kvwire.client.throttle import TokenBucket
from kvwire.client.transport import (
    DEFAULT_TIMEOUT_S,
    FetchedChunk,
    StreamedChunk,
    StreamSpec,
    remote_error,
)
from kvwire.errors import (
    AuthError,
    BackendUnavailableError,
    CorruptChunkError,
    InvalidInputError,
    KvwireError,
    LimitExceededError,
    NotFoundError,
)
from kvwire.manifest import ChunkEntry, ContextManifest, Job, LevelEntry

T = TypeVar("T")

#: gRPC status -> the family of the error (the type name in ``kvwire-error-type`` refines it).
STATUS_ERRORS: dict[grpc.StatusCode, type[KvwireError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInputError,
    grpc.StatusCode.UNAUTHENTICATED: AuthError,
    grpc.StatusCode.PERMISSION_DENIED: AuthError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: LimitExceededError,
    grpc.StatusCode.UNAVAILABLE: BackendUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: BackendUnavailableError,
    grpc.StatusCode.DATA_LOSS: CorruptChunkError,
}
_JOB_STATES = {
    pb.JOB_STATE_QUEUED: "queued",
    pb.JOB_STATE_RUNNING: "running",
    pb.JOB_STATE_DONE: "done",
    pb.JOB_STATE_FAILED: "failed",
}
_POLICIES = {"lookahead": pb.POLICY_LOOKAHEAD, "cachegen": pb.POLICY_CACHEGEN, "robust": pb.POLICY_ROBUST}


def rpc_error(exc: grpc.RpcError, what: str) -> KvwireError:
    """The typed error of a failed call."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    type_name = next((str(v) for k, v in (trailing or ()) if k == "kvwire-error-type"), None)
    fallback = STATUS_ERRORS.get(code, KvwireError)  # RESOURCE_EXHAUSTED + RateLimitError: retryable
    return remote_error(type_name, f"{what}: {code.name}: {details}", fallback)


def manifest_from_message(m: pb.Manifest) -> ContextManifest:
    """The inverse of ``kvwire.server.grpc_server.manifest_message``."""
    return ContextManifest(
        context_id=m.context_id,
        tenant=m.tenant,
        model_fingerprint=m.model_fingerprint,
        profile_digest=m.profile_digest,
        codec_version=m.codec_version,
        chunk_tokens=m.chunk_tokens,
        total_tokens=m.total_tokens,
        levels=list(m.levels),
        default_level=m.default_level,
        chunks=[
            ChunkEntry(
                index=c.index,
                token_start=c.token_start,
                token_end=c.token_end,
                token_ids=list(c.token_ids),
                text=c.text,
                levels=[LevelEntry(e.level, e.key, e.nbytes, e.checksum) for e in c.levels],
            )
            for c in m.chunks
        ],
        created_at=m.created_at,
        format=m.format,
        manifest_version=m.manifest_version,
    )


def job_from_message(j: pb.Job) -> Job:
    return Job(
        id=j.id,
        tenant=j.tenant,
        context_id=j.context_id,
        state=_JOB_STATES.get(j.state, "queued"),  # type: ignore[arg-type]
        chunks_done=j.chunks_done,
        chunks_total=j.chunks_total,
        error={"type": j.error.type, "message": j.error.message} if j.HasField("error") else None,
        created_at=j.created_at,
        updated_at=j.updated_at,
    )


def stream_request(context_id: str, spec: StreamSpec) -> pb.StreamRequest:
    mode = spec.mode
    if mode.kind == "fixed_level":
        return pb.StreamRequest(context_id=context_id, fixed_level=mode.level)
    if mode.kind == "text":
        return pb.StreamRequest(context_id=context_id, text=pb.TextMode())
    assert mode.slo_s is not None
    adaptive = pb.AdaptiveMode(
        slo_ms=mode.slo_s * 1e3,
        bandwidth_bytes_per_s=spec.bandwidth_hint_bytes_per_s or 0.0,
        margin=mode.margin,
        floor_bytes_per_s=mode.floor_bytes_per_s or 0.0,
        policy=_POLICIES[spec.policy],
    )
    if spec.costs is not None:
        adaptive.costs.CopyFrom(
            pb.DeviceCosts(
                recompute_ms_per_token=spec.costs.recompute_s_per_token * 1e3,
                decode_ms_per_chunk=spec.costs.decode_s_per_chunk * 1e3,
            )
        )
    return pb.StreamRequest(context_id=context_id, adaptive=adaptive)


class GrpcTransport:
    """The gRPC API over one channel. ``target`` is ``host:port`` (a ``grpc://`` prefix is allowed)."""

    name = "grpc"

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        bucket: TokenBucket | None = None,
        stream_timeout_s: float = 600.0,
    ):
        target = target.removeprefix("grpc://")
        if not target or "/" in target:
            raise InvalidInputError(f"a gRPC target is host:port, got {target!r}")
        self.target = target
        self.timeout_s = timeout_s
        self.stream_timeout_s = stream_timeout_s
        self.bucket = bucket
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._channel = grpc.insecure_channel(target, options=list(CHANNEL_OPTIONS))
        self._stub = pb_grpc.KvwireStub(self._channel)

    def _call(self, method: Callable[..., T], request: Any, what: str, nbytes: Callable[[T], int]) -> T:
        try:
            response = method(request, metadata=self._metadata, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise rpc_error(exc, what) from exc
        if self.bucket is not None:
            self.bucket.acquire(nbytes(response))
        return response

    @staticmethod
    def _size(message: Any) -> int:
        return int(message.ByteSize())

    def create_context(
        self, *, text: str | None, token_ids: list[int] | None, context_id: str | None
    ) -> ContextManifest | Job:
        request = pb.CreateContextRequest(context_id=context_id or "")
        if text is not None:
            request.text = text
        else:
            request.token_ids.ids.extend(token_ids or [])
        response = self._call(self._stub.CreateContext, request, "ingest", self._size)
        if response.WhichOneof("result") == "manifest":
            return manifest_from_message(response.manifest)
        return job_from_message(response.job)

    def get_job(self, job_id: str) -> Job:
        request = pb.GetJobRequest(job_id=job_id)
        return job_from_message(self._call(self._stub.GetJob, request, f"job {job_id}", self._size))

    def get_manifest(self, context_id: str) -> ContextManifest:
        request = pb.GetManifestRequest(context_id=context_id)
        what = f"manifest of {context_id!r}"
        return manifest_from_message(self._call(self._stub.GetManifest, request, what, self._size))

    def get_chunk(self, context_id: str, index: int, level: int | None) -> FetchedChunk:
        request = pb.GetChunkRequest(context_id=context_id, index=index)
        if level is not None:
            request.level = level
        start = time.perf_counter()
        chunk = self._call(self._stub.GetChunk, request, f"chunk {index} of {context_id!r}", self._size)
        return FetchedChunk(chunk.index, chunk.level, chunk.data, chunk.checksum, time.perf_counter() - start)

    def get_profile(self, digest: str) -> bytes:
        request = pb.GetProfileRequest(digest=digest)
        return bytes(self._call(self._stub.GetProfile, request, f"profile {digest[:12]}", self._size).data)

    def delete_context(self, context_id: str) -> None:
        request = pb.DeleteContextRequest(context_id=context_id)
        self._call(self._stub.DeleteContext, request, f"delete {context_id!r}", self._size)

    def health(self, ready: bool = False) -> None:
        self._call(self._stub.Health, pb.HealthRequest(ready=ready), "health", self._size)

    def stream_context(self, context_id: str, spec: StreamSpec) -> Iterator[StreamedChunk]:
        request = stream_request(context_id, spec)
        what = f"stream of {context_id!r}"
        try:
            stream = self._stub.StreamContext(request, metadata=self._metadata, timeout=self.stream_timeout_s)
        except grpc.RpcError as exc:
            raise rpc_error(exc, what) from exc
        try:
            while True:
                start = time.perf_counter()
                try:
                    message = next(stream)
                except StopIteration:
                    return
                except grpc.RpcError as exc:
                    raise rpc_error(exc, what) from exc
                if self.bucket is not None:
                    self.bucket.acquire(message.ByteSize())
                kv = message.kind == pb.CHUNK_KIND_KV
                yield StreamedChunk(
                    index=message.index,
                    token_start=message.token_start,
                    n_tokens=message.n_tokens,
                    kind="kv" if kv else "text",
                    level=message.level if message.HasField("level") else None,
                    data=message.data,
                    checksum=message.checksum,
                    token_ids=list(message.token_ids),
                    reason=message.reason,
                    predicted_completion_s=message.predicted_completion_ms / 1e3 or None,
                    estimate_bytes_per_s=message.estimate_bytes_per_s or None,
                    seconds=time.perf_counter() - start,
                )
        finally:
            stream.cancel()

    def close(self) -> None:
        self._channel.close()
