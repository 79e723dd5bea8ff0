"""gRPC API tests: an in-process server on a free loopback port, called through a real channel."""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from kvwire._proto import CHANNEL_OPTIONS
from kvwire._proto import kvwire_pb2 as pb
from kvwire._proto import kvwire_pb2_grpc as pb_grpc
from kvwire.errors import (
    AuthError,
    BackendUnavailableError,
    CorruptChunkError,
    InvalidInputError,
    KvwireError,
    LimitExceededError,
    ModelMismatchError,
    NotFoundError,
    RateLimitError,
    UnsupportedVersionError,
)
from kvwire.manifest import ChunkEntry, ContextManifest, LevelEntry
from kvwire.server.config import ServiceSettings
from kvwire.server.grpc_server import ERROR_TYPE_KEY, KvwireServicer, serve_grpc, status_code
from kvwire.server.service import KvwireService, crc32_hex, manifest_key

ALICE = (("authorization", "Bearer alice-key"),)
BOB = (("authorization", "Bearer bob-key"),)


@pytest.fixture
def stub(service: KvwireService, settings: ServiceSettings) -> Iterator[pb_grpc.KvwireStub]:
    server = serve_grpc(service, settings, 0)
    assert server.planner is not None and server.planner.wait(120)  # ready, as clients would wait for
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}", options=CHANNEL_OPTIONS) as channel:
            yield pb_grpc.KvwireStub(channel)
    finally:
        server.stop(grace_s=None)


def create(stub: Any, metadata: Any = ALICE, **fields: Any) -> pb.Manifest:
    if "token_ids" in fields:
        fields["token_ids"] = pb.TokenIds(ids=fields["token_ids"])
    response = stub.CreateContext(pb.CreateContextRequest(**fields), metadata=metadata)
    assert response.WhichOneof("result") == "manifest"
    manifest: pb.Manifest = response.manifest
    return manifest


def assert_status(call: Any, code: grpc.StatusCode, error_type: str | None = None) -> None:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if isinstance(result, Iterator):
            list(result)
    assert info.value.code() == code, info.value.details()
    assert info.value.details() and "Traceback" not in info.value.details()
    if error_type:
        assert (ERROR_TYPE_KEY, error_type) in tuple(info.value.trailing_metadata() or ())


def stream(stub: Any, metadata: Any = ALICE, **fields: Any) -> list[pb.ChunkMessage]:
    return list(stub.StreamContext(pb.StreamRequest(**fields), metadata=metadata))


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidInputError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (NotFoundError("x"), grpc.StatusCode.NOT_FOUND),
        (LimitExceededError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (RateLimitError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (AuthError("x"), grpc.StatusCode.UNAUTHENTICATED),
        (BackendUnavailableError("x"), grpc.StatusCode.UNAVAILABLE),
        (CorruptChunkError("x"), grpc.StatusCode.DATA_LOSS),
        (UnsupportedVersionError("x"), grpc.StatusCode.DATA_LOSS),
        (ModelMismatchError("x"), grpc.StatusCode.INTERNAL),
        (KvwireError("x"), grpc.StatusCode.INTERNAL),
    ],
)
def test_error_codes(error: KvwireError, code: grpc.StatusCode) -> None:
    assert status_code(error) == code


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        (("authorization", "Bearer wrong"),),
        (("authorization", "Basic alice-key"),),
        (("authorization", "Bearer"),),
    ],
)
def test_auth_required(stub: Any, metadata: Any) -> None:
    unauth = grpc.StatusCode.UNAUTHENTICATED
    request = pb.CreateContextRequest(text="a")
    assert_status(lambda: stub.CreateContext(request, metadata=metadata), unauth, "AuthError")
    assert_status(lambda: stub.GetManifest(pb.GetManifestRequest(context_id="x"), metadata=metadata), unauth)
    assert_status(lambda: stub.GetJob(pb.GetJobRequest(job_id="j"), metadata=metadata), unauth)
    assert_status(lambda: stub.StreamContext(pb.StreamRequest(context_id="x"), metadata=metadata), unauth)


def test_health_needs_no_auth(stub: Any) -> None:
    assert stub.Health(pb.HealthRequest()).status == "ok"
    ready = stub.Health(pb.HealthRequest(ready=True))
    assert ready.status == "ready" and ready.version


def test_not_ready_until_the_stream_planner_is_compiled(
    service: KvwireService, settings: ServiceSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The planner compiles in the background: alive at once, ready (gRPC and REST) once compiled."""
    import threading

    from fastapi.testclient import TestClient

    import kvwire.server.grpc_server
    from kvwire.server.rest import create_app

    compiled = threading.Event()
    monkeypatch.setattr(kvwire.server.grpc_server, "warm_up", lambda: compiled.wait(60))
    server = serve_grpc(service, settings, 0)
    try:
        with (
            grpc.insecure_channel(f"127.0.0.1:{server.port}", options=CHANNEL_OPTIONS) as channel,
            TestClient(create_app(service, settings), raise_server_exceptions=False) as rest,
        ):
            stub = pb_grpc.KvwireStub(channel)
            assert stub.Health(pb.HealthRequest()).status == "ok"
            assert rest.get("/healthz").status_code == 200
            ready = pb.HealthRequest(ready=True)
            assert_status(lambda: stub.Health(ready), grpc.StatusCode.UNAVAILABLE, "BackendUnavailableError")
            answer = rest.get("/readyz")
            assert answer.status_code == 503 and "compiling" in answer.json()["error"]["message"]
            compiled.set()
            assert server.planner is not None and server.planner.wait(10)
            assert stub.Health(ready).status == "ready"
            assert rest.get("/readyz").json() == {"status": "ready"}
    finally:
        compiled.set()
        server.stop(grace_s=None)


def test_unknown_ids_are_not_found(stub: Any) -> None:
    create(stub, token_ids=[1, 2, 3], context_id="c")
    nf = grpc.StatusCode.NOT_FOUND
    assert_status(lambda: stub.GetManifest(pb.GetManifestRequest(context_id="nope"), metadata=ALICE), nf)
    assert_status(lambda: stub.GetChunk(pb.GetChunkRequest(context_id="nope"), metadata=ALICE), nf)
    assert_status(lambda: stub.GetChunk(pb.GetChunkRequest(context_id="c", index=5), metadata=ALICE), nf)
    assert_status(lambda: stub.GetChunk(pb.GetChunkRequest(context_id="c", level=9), metadata=ALICE), nf)
    assert_status(lambda: stub.GetJob(pb.GetJobRequest(job_id="job-nope"), metadata=ALICE), nf)
    assert_status(lambda: stub.DeleteContext(pb.DeleteContextRequest(context_id="nope"), metadata=ALICE), nf)
    assert_status(lambda: stream(stub, context_id="nope"), nf, "NotFoundError")
    # Another tenant's context does not exist for this one.
    assert_status(lambda: stub.GetManifest(pb.GetManifestRequest(context_id="c"), metadata=BOB), nf)


def test_invalid_input(stub: Any) -> None:
    bad = grpc.StatusCode.INVALID_ARGUMENT
    assert_status(lambda: stub.CreateContext(pb.CreateContextRequest(), metadata=ALICE), bad)
    empty = pb.CreateContextRequest(token_ids=pb.TokenIds())
    assert_status(lambda: stub.CreateContext(empty, metadata=ALICE), bad)
    bad_id = pb.CreateContextRequest(text="a", context_id="../x")
    assert_status(lambda: stub.CreateContext(bad_id, metadata=ALICE), bad, "InvalidInputError")
    out_of_vocab = pb.CreateContextRequest(token_ids=pb.TokenIds(ids=[1, 10**6]))
    assert_status(lambda: stub.CreateContext(out_of_vocab, metadata=ALICE), bad)
    create(stub, token_ids=[1, 2, 3], context_id="c")
    assert_status(lambda: stream(stub, context_id="c", fixed_level=9), bad)
    slo = pb.AdaptiveMode(slo_ms=0)
    assert_status(lambda: stream(stub, context_id="c", adaptive=slo), bad)
    policy = pb.AdaptiveMode(slo_ms=100, policy=7)  # type: ignore[arg-type]
    assert_status(lambda: stream(stub, context_id="c", adaptive=policy), bad)
    negative = pb.AdaptiveMode(slo_ms=100, bandwidth_bytes_per_s=-1)
    assert_status(lambda: stream(stub, context_id="c", adaptive=negative), bad)


def test_limits(stub: Any, settings: ServiceSettings) -> None:
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    too_long = pb.CreateContextRequest(token_ids=pb.TokenIds(ids=[1] * (settings.max_context_tokens + 1)))
    assert_status(lambda: stub.CreateContext(too_long, metadata=ALICE), exhausted, "LimitExceededError")
    too_big = pb.CreateContextRequest(text="a" * (settings.max_request_bytes + 1))
    assert_status(lambda: stub.CreateContext(too_big, metadata=ALICE), exhausted)


# --------------------------------------------------------------------------------------- unary RPCs


def test_create_manifest_chunk_delete(stub: Any, service: KvwireService) -> None:
    manifest = create(stub, token_ids=list(range(100)), context_id="ctx-1")
    assert manifest.context_id == "ctx-1" and manifest.tenant == "alice"
    assert manifest.total_tokens == 100 and len(manifest.chunks) == 2
    assert list(manifest.chunks[1].token_ids) == list(range(64, 100))
    assert stub.GetManifest(pb.GetManifestRequest(context_id="ctx-1"), metadata=ALICE) == manifest
    assert manifest == _expected(service.manifest("alice", "ctx-1"))

    for index, level in [(1, 0), (0, 4)]:
        entry = manifest.chunks[index].levels[level]
        chunk = stub.GetChunk(
            pb.GetChunkRequest(context_id="ctx-1", index=index, level=level), metadata=ALICE
        )
        assert chunk.index == index and chunk.level == level == entry.level
        assert f"{zlib.crc32(chunk.data):08x}" == chunk.checksum == entry.checksum
        assert chunk.data == service.store.get(entry.key) and len(chunk.data) == entry.nbytes
    default = stub.GetChunk(pb.GetChunkRequest(context_id="ctx-1"), metadata=ALICE)
    assert default.level == manifest.default_level

    assert stub.DeleteContext(pb.DeleteContextRequest(context_id="ctx-1"), metadata=ALICE) is not None
    nf = grpc.StatusCode.NOT_FOUND
    assert_status(lambda: stub.GetManifest(pb.GetManifestRequest(context_id="ctx-1"), metadata=ALICE), nf)


def _expected(manifest: ContextManifest) -> pb.Manifest:
    from kvwire.server.grpc_server import manifest_message

    return manifest_message(manifest)


def test_text_ingest(stub: Any) -> None:
    manifest = create(stub, BOB, text="The quick brown fox. " * 4)
    assert manifest.context_id.startswith("ctx-") and manifest.tenant == "bob"
    assert "".join(c.text for c in manifest.chunks) == "The quick brown fox. " * 4


def test_async_job(stub: Any) -> None:
    request = pb.CreateContextRequest(token_ids=pb.TokenIds(ids=[7] * 300), context_id="long")
    response = stub.CreateContext(request, metadata=ALICE)
    assert response.WhichOneof("result") == "job"
    job = response.job
    assert job.context_id == "long" and job.tenant == "alice"
    nf = grpc.StatusCode.NOT_FOUND
    assert_status(lambda: stub.GetJob(pb.GetJobRequest(job_id=job.id), metadata=BOB), nf)
    deadline = time.monotonic() + 20
    while job.state not in (pb.JOB_STATE_DONE, pb.JOB_STATE_FAILED) and time.monotonic() < deadline:
        time.sleep(0.02)
        job = stub.GetJob(pb.GetJobRequest(job_id=job.id), metadata=ALICE)
    assert job.state == pb.JOB_STATE_DONE and job.chunks_done == job.chunks_total == 5
    assert stub.GetManifest(pb.GetManifestRequest(context_id="long"), metadata=ALICE).total_tokens == 300


def test_corrupt_chunk_is_data_loss(stub: Any, service: KvwireService) -> None:
    manifest = create(stub, token_ids=list(range(10)), context_id="c")
    service.store.put(manifest.chunks[0].levels[0].key, b"garbage")
    request = pb.GetChunkRequest(context_id="c", level=0)
    assert_status(
        lambda: stub.GetChunk(request, metadata=ALICE), grpc.StatusCode.DATA_LOSS, "CorruptChunkError"
    )
    assert_status(lambda: stream(stub, context_id="c", fixed_level=0), grpc.StatusCode.DATA_LOSS)


def test_stream_reads_ahead_yet_fails_at_the_corrupt_chunk(stub: Any, service: KvwireService) -> None:
    """StreamContext reads the next chunk while sending one: a corrupt third chunk still arrives as
    two good messages and then DATA_LOSS, and a prefetch for a level the stream does not use is dropped."""
    synthetic_context(service, "ahead", 4, [1000, 500])
    manifest = stub.GetManifest(pb.GetManifestRequest(context_id="ahead"), metadata=ALICE)
    _check_stream(stream(stub, context_id="ahead", fixed_level=1), manifest, service)
    service.store.put(manifest.chunks[2].levels[1].key, b"garbage")
    received: list[pb.ChunkMessage] = []
    request = pb.StreamRequest(context_id="ahead", fixed_level=1)
    with pytest.raises(grpc.RpcError) as caught:
        for message in stub.StreamContext(request, metadata=ALICE):
            received.append(message)
    assert caught.value.code() == grpc.StatusCode.DATA_LOSS
    assert [m.index for m in received] == [0, 1]
    _check_stream(stream(stub, context_id="ahead", fixed_level=0), manifest, service)  # level 0 intact


class _DirectCall:
    """The servicer-side context of a call made without a channel: alice's key, never cancelled."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ALICE

    def is_active(self) -> bool:
        return True

    def set_trailing_metadata(self, metadata: Any) -> None:
        self.trailers = metadata

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise AssertionError(f"aborted: {code} {details}")


def test_stream_reads_on_its_own_once_the_server_stops_prefetching(
    service: KvwireService, settings: ServiceSettings
) -> None:
    """A stream still running while its server stops (the prefetch pool is shut down first) reads
    each chunk itself rather than failing with an internal error."""
    synthetic_context(service, "stopping", 3, [1000])
    servicer = KvwireServicer(service, settings)
    servicer.prefetcher.shutdown()
    request = pb.StreamRequest(context_id="stopping", fixed_level=0)
    messages = list(servicer.StreamContext(request, _DirectCall()))
    assert [m.index for m in messages] == [0, 1, 2]
    assert all(m.checksum == crc32_hex(m.data) and len(m.data) == 1000 for m in messages)


def synthetic_context(service: KvwireService, context_id: str, chunks: int, level_bytes: list[int]) -> None:
    """Store a context of ``chunks`` chunks whose level ``i`` is ``level_bytes[i]`` bytes (no model).

    The fake codec's chunks are a few KB; these stand in for a real model's MB-sized ones.
    """
    entries = []
    for index in range(chunks):
        levels = []
        for level, nbytes in enumerate(level_bytes):
            data = bytes([index, level]) * (nbytes // 2)
            key = f"test/{context_id}/{index}/{level}"
            service.store.put(key, data)
            levels.append(LevelEntry(level, key, len(data), crc32_hex(data)))
        entries.append(ChunkEntry(index, index * 64, (index + 1) * 64, [1] * 64, "a" * 64, levels))
    manifest = ContextManifest(
        context_id, "alice", "f" * 64, "0" * 64, 1, 64, 64 * chunks, list(range(len(level_bytes))), 0, entries
    )
    service.store.put(manifest_key("alice", context_id), manifest.to_json())


def test_chunks_above_grpc_default_limit(stub: Any, service: KvwireService) -> None:
    """A 6 MiB chunk travels (gRPC's default limit is 4 MiB; kvwire configures 64 MiB)."""
    synthetic_context(service, "big", 1, [6 * 1024 * 1024])
    got = stub.GetChunk(pb.GetChunkRequest(context_id="big", level=0), metadata=ALICE)
    assert len(got.data) == 6 * 1024 * 1024 and got.checksum == crc32_hex(got.data)
    (message,) = stream(stub, context_id="big", fixed_level=0)
    assert message.data == got.data


# ---------------------------------------------------------------------------------------- streaming


def _check_stream(messages: list[pb.ChunkMessage], manifest: pb.Manifest, service: KvwireService) -> None:
    assert [m.index for m in messages] == list(range(len(manifest.chunks)))
    for message, chunk in zip(messages, manifest.chunks, strict=True):
        assert message.token_start == chunk.token_start
        assert message.n_tokens == chunk.token_end - chunk.token_start
        assert message.reason
        if message.kind == pb.CHUNK_KIND_KV:
            entry = chunk.levels[[e.level for e in chunk.levels].index(message.level)]
            assert message.checksum == entry.checksum == f"{zlib.crc32(message.data):08x}"
            assert message.data == service.store.get(entry.key) and not message.token_ids
        else:
            assert message.kind == pb.CHUNK_KIND_TEXT and not message.HasField("level")
            assert list(message.token_ids) == list(chunk.token_ids) and not message.data


def test_stream_fixed_level_default_and_text(stub: Any, service: KvwireService) -> None:
    manifest = create(stub, token_ids=[i % 100 for i in range(150)], context_id="s")
    fixed = stream(stub, context_id="s", fixed_level=3)
    _check_stream(fixed, manifest, service)
    assert len(fixed) == 3 and {(m.kind, m.level) for m in fixed} == {(pb.CHUNK_KIND_KV, 3)}

    default = stream(stub, context_id="s")
    assert {m.level for m in default} == {manifest.default_level}
    _check_stream(default, manifest, service)

    text = stream(stub, context_id="s", text=pb.TextMode())
    _check_stream(text, manifest, service)
    assert {m.kind for m in text} == {pb.CHUNK_KIND_TEXT}


def test_stream_adaptive(stub: Any, service: KvwireService) -> None:
    manifest = create(stub, token_ids=[i % 100 for i in range(200)], context_id="a")
    kv_bytes = manifest.chunks[0].levels[0].nbytes

    # A generous SLO on a fast link: every chunk as KV, at the best level.
    roomy = pb.AdaptiveMode(slo_ms=60_000, bandwidth_bytes_per_s=1e9)
    messages = stream(stub, context_id="a", adaptive=roomy)
    _check_stream(messages, manifest, service)
    assert all(m.estimate_bytes_per_s > 0 and m.predicted_completion_ms > 0 for m in messages)
    assert messages[0].estimate_bytes_per_s == 1e9  # the hint, before any measurement

    # A link hint far too slow for KV (one chunk at level 0 would take 1000 s), with cheap
    # recompute: the first chunk goes as text. Later ones follow the measured loopback throughput.
    slow = pb.AdaptiveMode(
        slo_ms=2_000,
        bandwidth_bytes_per_s=kv_bytes / 1000,
        costs=pb.DeviceCosts(recompute_ms_per_token=0.001),
        policy=pb.POLICY_CACHEGEN,
    )
    messages = stream(stub, context_id="a", adaptive=slow)
    _check_stream(messages, manifest, service)
    assert messages[0].kind == pb.CHUNK_KIND_TEXT


def test_stream_adaptive_follows_a_slow_reader(stub: Any, service: KvwireService) -> None:
    """The server measures its send throughput: a client reading ~25 MB/s gets smaller levels.

    The first few chunks fill the socket buffers and the client's HTTP/2 window and read as fast;
    after that each send waits for the reader.
    """
    synthetic_context(service, "slow", 12, [4 << 20, 1 << 20, 256 << 10])
    mode = pb.AdaptiveMode(
        slo_ms=1000, bandwidth_bytes_per_s=1e9, costs=pb.DeviceCosts(recompute_ms_per_token=100)
    )
    messages = []
    for message in stub.StreamContext(pb.StreamRequest(context_id="slow", adaptive=mode), metadata=ALICE):
        messages.append(message)
        time.sleep(0.15)  # a slow link: the server's sends back up through HTTP/2 flow control
    trace = [(m.level, round(m.estimate_bytes_per_s / 1e6)) for m in messages]
    assert [m.kind for m in messages] == [pb.CHUNK_KIND_KV] * 12
    assert messages[0].level == 0 and messages[0].estimate_bytes_per_s == 1e9, trace  # the hint
    assert min(m.estimate_bytes_per_s for m in messages) < 1e8, trace  # measured
    assert max(m.level for m in messages) > 0, trace


def test_codegen_writes_package_relative_stubs(tmp_path: Any) -> None:
    from kvwire.server.grpc_codegen import generate

    written = generate(out_dir=tmp_path)
    assert sorted(p.name for p in written) == ["kvwire_pb2.py", "kvwire_pb2.pyi", "kvwire_pb2_grpc.py"]
    grpc_module = (tmp_path / "kvwire_pb2_grpc.py").read_text()
    assert "from . import kvwire_pb2 as kvwire__pb2" in grpc_module
    assert "\nimport kvwire_pb2" not in grpc_module


def test_kvwire_serve_runs_grpc_beside_rest(
    service: KvwireService, settings: ServiceSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``rest.serve`` with ``grpc_port`` starts the gRPC API on the same service and stops it after."""
    import uvicorn

    import kvwire.server.allocator
    import kvwire.server.service
    from kvwire.server.rest import serve

    from ..storage.conftest import free_port

    port = free_port()
    answers = []

    def fake_server_run(self: uvicorn.Server, sockets: Any = None) -> None:  # instead of serving REST
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            answers.append(pb_grpc.KvwireStub(channel).Health(pb.HealthRequest(), timeout=10))  # alive
        self.started = True

    thresholds: list[int] = []  # mallopt would change this whole test process: record instead
    monkeypatch.setattr(kvwire.server.allocator, "keep_freed_memory", lambda b: thresholds.append(b))
    monkeypatch.setattr(kvwire.server.service, "build_service", lambda s: service)
    monkeypatch.setattr(service, "close", lambda: None)
    monkeypatch.setattr(uvicorn.Server, "run", fake_server_run)
    serve(settings.model_copy(update={"grpc_port": port, "malloc_mmap_threshold_bytes": 12345}))
    assert [a.status for a in answers] == ["ok"]
    assert thresholds == [12345]  # the serving process keeps its chunk buffers (kvwire.server.allocator)
    # Stopped with the REST server.
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError):
        pb_grpc.KvwireStub(channel).Health(pb.HealthRequest(), timeout=1)
