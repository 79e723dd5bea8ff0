"""The client's transport interface, and its REST implementation over httpx.

A transport does one request per call and nothing more: no retries (``kvwire.client.retry``), no
verification (``kvwire.client.loader``). It maps every failure to a typed ``kvwire.errors`` error,
transient ones (connection refused or reset, timeouts, 503) to ``ServerUnavailableError`` /
``BackendUnavailableError`` so that the caller can retry them, and it applies the bandwidth throttle
(``kvwire.client.throttle``) to everything it downloads. ``GrpcTransport`` (``grpc_transport``) is
the other implementation.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from kvwire import errors
from kvwire.client.throttle import TokenBucket, throttled
from kvwire.controller import CostModel, Mode, Policy
from kvwire.errors import (
    AuthError,
    BackendUnavailableError,
    InvalidInputError,
    KvwireError,
    LimitExceededError,
    NotFoundError,
    RateLimitError,
    ServerUnavailableError,
)
from kvwire.manifest import ContextManifest, Job

DEFAULT_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 5.0


# ------------------------------------------------------------------------------------- what moves


@dataclass(frozen=True)
class FetchedChunk:
    """One chunk bitstream as received: ``checksum`` is what the server says it is (crc32 hex)."""

    index: int
    level: int
    data: bytes
    checksum: str
    seconds: float  # wall time of the request, throttle included


@dataclass(frozen=True)
class StreamSpec:
    """What a server-push stream is asked for: the mode, and in adaptive mode the policy, the client
    device's costs and a throughput hint for the first chunk (None: the server's defaults)."""

    mode: Mode
    policy: Policy = "robust"
    costs: CostModel | None = None
    bandwidth_hint_bytes_per_s: float | None = None


@dataclass(frozen=True)
class StreamedChunk:
    """One message of a server-push stream: KV bytes at a level, or the chunk's token ids as text."""

    index: int
    token_start: int
    n_tokens: int
    kind: Literal["kv", "text"]
    level: int | None
    data: bytes
    checksum: str
    token_ids: list[int]
    reason: str
    predicted_completion_s: float | None
    estimate_bytes_per_s: float | None
    seconds: float  # wait for this message, throttle included


class Transport(Protocol):
    """One kvwire server, over one protocol. Every method raises typed ``kvwire.errors`` errors."""

    name: str
    #: The emulated link every download waits for (``kvwire.client.throttle``); None: unthrottled.
    #: Read per request, so that ``Client.set_throttle`` can swap it between (and during) loads.
    bucket: TokenBucket | None

    def create_context(
        self, *, text: str | None, token_ids: list[int] | None, context_id: str | None
    ) -> ContextManifest | Job:
        """Ingest: the manifest when done inline, else the queued job."""
        ...

    def get_job(self, job_id: str) -> Job: ...

    def get_manifest(self, context_id: str) -> ContextManifest: ...

    def get_chunk(self, context_id: str, index: int, level: int | None) -> FetchedChunk: ...

    def get_profile(self, digest: str) -> bytes: ...

    def delete_context(self, context_id: str) -> None: ...

    def health(self, ready: bool = False) -> None:
        """Return if the server answers (and, with ``ready``, its store and queue)."""
        ...

    def stream_context(self, context_id: str, spec: StreamSpec) -> Iterator[StreamedChunk]:
        """Every chunk of a context in order, the server choosing per chunk (gRPC only)."""
        ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------------------- error mapping


def _error_classes() -> dict[str, type[KvwireError]]:
    out: dict[str, type[KvwireError]] = {}
    for name in dir(errors):
        value = getattr(errors, name)
        if isinstance(value, type) and issubclass(value, KvwireError):
            out[name] = value
    return out


ERROR_CLASSES = _error_classes()

#: HTTP status -> the error type when the body does not name one (or names one we do not know).
STATUS_ERRORS: dict[int, type[KvwireError]] = {
    400: InvalidInputError,
    401: AuthError,
    404: NotFoundError,
    413: LimitExceededError,
    429: RateLimitError,
    502: BackendUnavailableError,
    503: BackendUnavailableError,  # the server's store or queue is down (a named type says which)
    504: BackendUnavailableError,
}


def remote_error(type_name: str | None, message: str, fallback: type[KvwireError]) -> KvwireError:
    """The typed error a server reported by name (``kvwire-error-type``, JSON ``error.type``).

    Names are only trusted within the family the status implies, so that a 404 is always a
    ``NotFoundError`` and a 503 always retryable whatever the body says. An unavailable status that
    names no kvwire error came from something other than the kvwire server (a proxy, the network).
    """
    cls = ERROR_CLASSES.get(type_name or "")
    if cls is None or not (issubclass(cls, fallback) or fallback is KvwireError):
        cls = ServerUnavailableError if fallback is BackendUnavailableError else fallback
    return cls(message)


def http_error(status: int, body: bytes, what: str) -> KvwireError:
    """The typed error of a failed HTTP response (``{"error": {"type", "message"}}`` when kvwire's)."""
    import json

    type_name, message = None, body[:200].decode("utf-8", "replace")
    try:
        detail = json.loads(body)["error"]
        type_name, message = str(detail["type"]), str(detail["message"])
    except (ValueError, KeyError, TypeError):
        pass
    fallback = STATUS_ERRORS.get(status, BackendUnavailableError if status >= 500 else KvwireError)
    if status == 500:  # corrupt stored data, model mismatch on the server: not transient
        fallback = KvwireError
    return remote_error(type_name, f"{what}: HTTP {status}: {message}", fallback)


# -------------------------------------------------------------------------------------------- REST


class RestTransport:
    """The REST API (docs/service.md) over one pooled ``httpx.Client``."""

    name = "rest"

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        bucket: TokenBucket | None = None,
        http: Any = None,
    ):
        import httpx

        if not url.startswith(("http://", "https://")):
            raise InvalidInputError(f"a REST url starts with http:// or https://, got {url!r}")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, CONNECT_TIMEOUT_S))
        self.url = url.rstrip("/")
        self.bucket = bucket
        self._httpx = httpx
        self._http = http or httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def _request(
        self, method: str, path: str, what: str, *, ok: tuple[int, ...] = (200,), **kwargs: Any
    ) -> tuple[int, dict[str, str], bytes]:
        """One request; the body is read through the throttle. Returns (status, headers, body)."""
        httpx = self._httpx
        try:
            with self._http.stream(method, path, **kwargs) as response:
                body = b"".join(throttled(response.iter_bytes(), self.bucket))
                status, headers = response.status_code, dict(response.headers)
        except httpx.TimeoutException as exc:
            raise ServerUnavailableError(f"{what}: timed out ({type(exc).__name__})") from exc
        except (httpx.TransportError, OSError) as exc:  # refused, reset, DNS, closed mid-body
            raise ServerUnavailableError(f"{what}: {type(exc).__name__}: {exc}") from exc
        if status not in ok:
            raise http_error(status, body, what)
        return status, headers, body

    def _json(self, body: bytes, what: str) -> Any:
        import json

        try:
            return json.loads(body)
        except ValueError as exc:
            raise ServerUnavailableError(f"{what}: the server sent malformed JSON") from exc

    def create_context(
        self, *, text: str | None, token_ids: list[int] | None, context_id: str | None
    ) -> ContextManifest | Job:
        payload: dict[str, Any] = {"text": text} if text is not None else {"token_ids": token_ids}
        if context_id is not None:
            payload["context_id"] = context_id
        status, _, body = self._request("POST", "/v1/contexts", "ingest", ok=(201, 202), json=payload)
        data = self._json(body, "ingest")
        return ContextManifest.from_dict(data) if status == 201 else Job(**data)

    def get_job(self, job_id: str) -> Job:
        _, _, body = self._request("GET", f"/v1/jobs/{job_id}", f"job {job_id}")
        return Job(**self._json(body, f"job {job_id}"))

    def get_manifest(self, context_id: str) -> ContextManifest:
        what = f"manifest of {context_id!r}"
        _, _, body = self._request("GET", f"/v1/contexts/{context_id}", what)
        try:
            return ContextManifest.from_json(body)
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidInputError(f"{what}: not a kvwire manifest: {exc}") from exc

    def get_chunk(self, context_id: str, index: int, level: int | None) -> FetchedChunk:
        params = {"level": level} if level is not None else {}
        what = f"chunk {index} of {context_id!r}"
        start = time.perf_counter()
        _, headers, body = self._request(
            "GET", f"/v1/contexts/{context_id}/chunks/{index}", what, params=params
        )
        seconds = time.perf_counter() - start
        try:
            got_level = int(headers.get("x-kvwire-level", level if level is not None else -1))
        except ValueError as exc:
            raise ServerUnavailableError(f"{what}: bad X-Kvwire-Level header") from exc
        checksum = headers.get("x-kvwire-checksum", "")
        return FetchedChunk(index, got_level, body, checksum, seconds)

    def get_profile(self, digest: str) -> bytes:
        return self._request("GET", f"/v1/profiles/{digest}", f"profile {digest[:12]}")[2]

    def delete_context(self, context_id: str) -> None:
        self._request("DELETE", f"/v1/contexts/{context_id}", f"delete {context_id!r}", ok=(204,))

    def health(self, ready: bool = False) -> None:
        self._request("GET", "/readyz" if ready else "/healthz", "health")

    def stream_context(self, context_id: str, spec: StreamSpec) -> Iterator[StreamedChunk]:
        raise InvalidInputError("server-push streaming (StreamContext) needs the gRPC transport")

    def close(self) -> None:
        self._http.close()
