"""The REST and gRPC transports against the real apps over the tiny service: operations, error
mapping, throttling; and a whole load through each."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from kvwire.client import Client, RetryPolicy
from kvwire.client.grpc_transport import GrpcTransport, rpc_error
from kvwire.client.throttle import TokenBucket
from kvwire.client.transport import FetchedChunk, RestTransport, http_error
from kvwire.controller import Mode
from kvwire.errors import (
    AuthError,
    BackendUnavailableError,
    CorruptChunkError,
    InvalidInputError,
    KvwireError,
    LimitExceededError,
    NotFoundError,
    RateLimitError,
    ServerUnavailableError,
)
from kvwire.kernels.profile import CalibrationProfile
from kvwire.model import cache_to_tensor
from kvwire.server.config import ServiceSettings
from kvwire.server.grpc_server import serve_grpc
from kvwire.server.rest import create_app

from ..storage.conftest import free_port
from .conftest import Setup

KEY = "alice-key"


@pytest.fixture(scope="module")
def settings(setup: Setup) -> ServiceSettings:
    return setup.service.settings.model_copy(update={"api_keys": {}})


class CountingBucket(TokenBucket):
    """A bucket with an unlimited rate that records what passes through it."""

    def __init__(self) -> None:
        super().__init__(rate_bytes_per_s=1e15)
        self.bytes = 0

    def acquire(self, nbytes: int) -> None:
        self.bytes += nbytes


@pytest.fixture
def rest(setup: Setup, settings: ServiceSettings) -> Iterator[RestTransport]:
    from fastapi.testclient import TestClient

    with TestClient(create_app(setup.service, settings)) as http:
        yield RestTransport("http://testserver", bucket=CountingBucket(), http=http)


@pytest.fixture(scope="module")
def grpc_port(setup: Setup, settings: ServiceSettings) -> Iterator[int]:
    server = serve_grpc(setup.service, settings, 0)
    try:
        yield server.port
    finally:
        server.stop(0)


@pytest.fixture
def grpc_transport(grpc_port: int) -> Iterator[GrpcTransport]:
    transport = GrpcTransport(f"127.0.0.1:{grpc_port}", bucket=CountingBucket(), timeout_s=10)
    try:
        yield transport
    finally:
        transport.close()


@pytest.fixture(params=["rest", "grpc"])
def transport(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue("rest" if request.param == "rest" else "grpc_transport")


def test_operations_and_throttle(transport: Any, setup: Setup) -> None:
    manifest = transport.get_manifest("ctx")
    assert manifest == setup.manifest
    chunk = transport.get_chunk("ctx", 1, 3)
    assert isinstance(chunk, FetchedChunk) and chunk.level == 3 and chunk.index == 1
    assert chunk.data == setup.service.chunk("default", "ctx", 1, 3)[0]
    assert chunk.checksum == manifest.chunks[1].level(3).checksum
    before = transport.bucket.bytes
    transport.get_chunk("ctx", 0, None)  # the manifest's default level
    assert transport.bucket.bytes - before >= manifest.chunks[0].level(manifest.default_level).nbytes
    assert (
        CalibrationProfile.from_bytes(transport.get_profile(setup.profile.digest)).digest
        == setup.profile.digest
    )
    transport.health()
    created = transport.create_context(text="hello " * 5, token_ids=None, context_id="small")
    assert created.context_id == "small" and created.total_tokens == 30
    transport.delete_context("small")
    with pytest.raises(NotFoundError):
        transport.get_manifest("small")
    with pytest.raises(NotFoundError):
        transport.get_chunk("ctx", 99, 0)
    with pytest.raises(NotFoundError):
        transport.get_chunk("ctx", 0, 17)
    with pytest.raises(InvalidInputError):
        transport.create_context(text=None, token_ids=[10**9], context_id="bad")


def test_set_throttle_swaps_the_link_of_an_existing_client(
    transport: Any, setup: Setup, tmp_path: Path
) -> None:
    client = Client("unused", transport=transport, profile_dir=tmp_path)
    first, second = transport.bucket, CountingBucket()
    client.set_throttle(second)
    assert client.bucket is transport.bucket is second
    client.load_tensors("ctx", level=3)
    assert second.bytes >= sum(c.level(3).nbytes for c in setup.manifest.chunks) and first.bytes == 0
    client.set_throttle("500mbps")  # a spec, as the constructor takes: a fresh bucket at that rate
    assert isinstance(transport.bucket, TokenBucket) and transport.bucket.rate_now() == 500e6 / 8
    with pytest.raises(InvalidInputError):
        client.set_throttle("fast please")
    assert transport.bucket.rate_now() == 500e6 / 8  # a bad spec leaves the link as it was
    client.set_throttle(None)
    assert client.bucket is transport.bucket is None
    counted = second.bytes
    client.load_tensors("ctx", level=3)  # unthrottled: no bucket sees it
    assert second.bytes == counted


def test_rest_has_no_push_stream(rest: RestTransport) -> None:
    from kvwire.client.transport import StreamSpec

    with pytest.raises(InvalidInputError, match="gRPC"):
        rest.stream_context("ctx", StreamSpec(Mode.text()))


@pytest.mark.parametrize("kind", ["rest", "grpc"])
@pytest.mark.parametrize("push", [False, True])
def test_whole_load_over_each_transport(
    setup: Setup, request: pytest.FixtureRequest, tmp_path: Path, kind: str, push: bool
) -> None:
    if push and kind == "rest":
        pytest.skip("push is gRPC only")
    transport = request.getfixturevalue("rest" if kind == "rest" else "grpc_transport")
    client = Client("unused", transport=transport, profile_dir=tmp_path)
    loaded = client.load(setup.model, "ctx", tokenizer=setup.tokenizer, mode=Mode.fixed_level(0), push=push)
    direct = client.load_tensors("ctx", level=0).kv()
    assert cache_to_tensor(loaded.cache).equal(direct)  # decoding is exact: same bytes, same tensor
    assert {r.source for r in loaded.chunks} == {"push" if push else "pull"}
    assert [r.level for r in loaded.chunks] == [0] * len(setup.manifest.chunks)


def test_grpc_push_adaptive_carries_the_servers_reasons(
    setup: Setup, grpc_transport: GrpcTransport, tmp_path: Path
) -> None:
    client = Client("unused", transport=grpc_transport, profile_dir=tmp_path)
    loaded = client.load(
        setup.model, "ctx", tokenizer=setup.tokenizer, mode=Mode.adaptive(slo_s=10.0), push=True
    )
    assert all(r.reason.startswith(("robust", "lookahead")) for r in loaded.chunks)  # robust builds on it
    assert cache_to_tensor(loaded.cache).shape[3] == setup.manifest.total_tokens


# ------------------------------------------------------------------------------------- error mapping


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (400, {"type": "InvalidInputError", "message": "m"}, InvalidInputError),
        (401, {"type": "AuthError", "message": "m"}, AuthError),
        (404, {"type": "NotFoundError", "message": "m"}, NotFoundError),
        (404, {"type": "AuthError", "message": "lies"}, NotFoundError),  # the status decides the family
        (413, {"type": "LimitExceededError", "message": "m"}, LimitExceededError),
        (429, {"type": "RateLimitError", "message": "m"}, RateLimitError),
        (503, {"type": "BackendUnavailableError", "message": "m"}, BackendUnavailableError),
        (502, None, ServerUnavailableError),
        (500, {"type": "CorruptChunkError", "message": "m"}, CorruptChunkError),
        (500, {"type": "InternalError", "message": "m"}, KvwireError),
    ],
)
def test_http_errors_are_typed(status: int, body: dict[str, str] | None, error: type[Exception]) -> None:
    import json

    raw = json.dumps({"error": body}).encode() if body else b"<html>bad gateway</html>"
    exc = http_error(status, raw, "chunk 3")
    assert type(exc) is error and "chunk 3" in str(exc)


def test_rest_connection_failures_are_transient() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out")

    for handler in (refuse, slow):
        http = httpx.Client(base_url="http://x", transport=httpx.MockTransport(handler))
        with pytest.raises(ServerUnavailableError):
            RestTransport("http://x", http=http).get_manifest("ctx")
    with pytest.raises(InvalidInputError, match="http"):
        RestTransport("ftp://x")


def test_a_dead_server_fails_within_the_retry_budget(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    retry = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.01, total_timeout_s=5)
    for client in (
        Client(f"http://127.0.0.1:{port}", transport="rest", retry=retry, timeout_s=2),
        Client(f"127.0.0.1:{port}", transport="grpc", retry=retry, timeout_s=2),
    ):
        with client, pytest.raises(ServerUnavailableError, match="gave up after 3 attempt"):
            client.manifest("ctx")


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, type_name: str | None = None):
        self._code, self._type = code, type_name

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "details"

    def trailing_metadata(self) -> Any:
        return (("kvwire-error-type", self._type),) if self._type else ()


@pytest.mark.parametrize(
    ("code", "type_name", "error"),
    [
        (grpc.StatusCode.NOT_FOUND, "NotFoundError", NotFoundError),
        (grpc.StatusCode.UNAUTHENTICATED, "AuthError", AuthError),
        (grpc.StatusCode.UNAVAILABLE, None, ServerUnavailableError),
        (grpc.StatusCode.UNAVAILABLE, "BackendUnavailableError", BackendUnavailableError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, None, ServerUnavailableError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "RateLimitError", RateLimitError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "LimitExceededError", LimitExceededError),
        (grpc.StatusCode.DATA_LOSS, "CorruptChunkError", CorruptChunkError),
        (grpc.StatusCode.INTERNAL, "ModelMismatchError", KvwireError),
    ],
)
def test_grpc_errors_are_typed(code: grpc.StatusCode, type_name: str | None, error: type[Exception]) -> None:
    exc = rpc_error(FakeRpcError(code, type_name), "chunk 3")
    assert isinstance(exc, error) and "chunk 3" in str(exc)
    if error is KvwireError:
        from kvwire.errors import ModelMismatchError

        assert isinstance(exc, ModelMismatchError)


def test_grpc_authentication(setup: Setup, settings: ServiceSettings) -> None:
    from kvwire.server.config import parse_api_keys

    server = serve_grpc(
        setup.service, settings.model_copy(update={"api_keys": parse_api_keys(f"default:{KEY}")}), 0
    )
    try:
        good = GrpcTransport(f"127.0.0.1:{server.port}", api_key=KEY)
        bad = GrpcTransport(f"127.0.0.1:{server.port}", api_key="nope")
        assert good.get_manifest("ctx").context_id == "ctx"
        with pytest.raises(AuthError):
            bad.get_manifest("ctx")
        good.close()
        bad.close()
    finally:
        server.stop(0)
