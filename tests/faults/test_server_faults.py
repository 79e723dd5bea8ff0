"""``kvwire serve`` as a real subprocess: killed and restarted, its backend killed under it, stalled clients.

The server runs without a model (jobs go to a Redis stream), so it starts in seconds; contexts are
ingested beforehand by an in-test worker (tiny random Llama, fake codec) into the same store, and
queued jobs are finished by an in-test worker after the restart.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from benchmarks.processes import KvwireProcess, RedisProcess, wait_until
from kvwire._proto import CHANNEL_OPTIONS
from kvwire._proto import kvwire_pb2 as pb
from kvwire._proto import kvwire_pb2_grpc as pb_grpc
from kvwire.manifest import ChunkEntry, ContextManifest, LevelEntry
from kvwire.server.jobs import IngestRequest, RedisJobQueue
from kvwire.server.service import crc32_hex, manifest_key, profile_key
from kvwire.server.storage import StorageSettings, Store, open_store

from ..server.conftest import FakeCodec, make_settings, make_worker
from .conftest import check_manifests

pytestmark = pytest.mark.integration

KEY = "alice-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
GRPC_AUTH = (("authorization", f"Bearer {KEY}"),)
TEXT = "".join(chr(33 + (i * 11) % 90) for i in range(64 * 4))  # 4 chunks


def storage_env(kind: str, tmp_path: Path, redis: RedisProcess) -> dict[str, str]:
    if kind == "local":
        return {"KVWIRE_STORE": "local", "KVWIRE_DATA_DIR": str(tmp_path / "store")}
    return {"KVWIRE_STORE": "redis", "KVWIRE_REDIS_URL": redis.url, "KVWIRE_REDIS_NAMESPACE": "faults"}


def open_test_store(env: dict[str, str]) -> Store:
    """The store the server will open, from the same settings."""
    fields = {k.removeprefix("KVWIRE_").lower(): v for k, v in env.items() if k.startswith("KVWIRE_")}
    return open_store(StorageSettings(**fields))  # type: ignore[arg-type]


def server_env(kind: str, tmp_path: Path, redis: RedisProcess, **extra: str) -> dict[str, str]:
    return {
        **storage_env(kind, tmp_path, redis),
        "KVWIRE_API_KEYS": f"alice:{KEY}",
        "KVWIRE_JOBS_REDIS_URL": redis.url,
        "KVWIRE_JOBS_NAMESPACE": "faultjobs",
        "KVWIRE_REDIS_SOCKET_TIMEOUT_S": "1",
        "KVWIRE_REDIS_CONNECT_TIMEOUT_S": "0.5",
        "KVWIRE_MANIFEST_CACHE_TTL_S": "0",  # every request reads the store
        **extra,
    }


def ingest(store: Store, model: Any, tmp_path: Path, context_id: str, text: str = TEXT) -> ContextManifest:
    worker = make_worker(model, store, FakeCodec(), make_settings(tmp_path))
    return worker.ingest(
        IngestRequest(tenant="alice", context_id=context_id, token_ids=worker.tokenize(text))
    )


def put_big_context(store: Store, context_id: str, chunks: int, nbytes: int) -> ContextManifest:
    """A context of random ``nbytes`` chunks written directly (the server never decodes chunks)."""
    entries = []
    for i in range(chunks):
        data = os.urandom(nbytes)
        key = f"chunks/big/{context_id}/{i}"
        store.put(key, data)
        level = LevelEntry(level=2, key=key, nbytes=nbytes, checksum=crc32_hex(data))
        entries.append(ChunkEntry(i, i * 64, (i + 1) * 64, [1] * 64, "x" * 64, [level]))
    manifest = ContextManifest(context_id, "alice", "fp", "0" * 64, 1, 64, chunks * 64, [2], 2, entries)
    store.put(profile_key(manifest.profile_digest), b"synthetic profile")
    store.put(manifest_key("alice", context_id), manifest.to_json())
    return manifest


def fetch_all(client: httpx.Client, manifest: ContextManifest) -> list[bytes]:
    """Every chunk of ``manifest`` through REST, each checked against its manifest checksum."""
    out = []
    for chunk in manifest.chunks:
        entry = chunk.levels[0]
        r = client.get(
            f"/v1/contexts/{manifest.context_id}/chunks/{chunk.index}", params={"level": entry.level}
        )
        assert r.status_code == 200, r.text
        assert f"{zlib.crc32(r.content):08x}" == entry.checksum == r.headers["X-Kvwire-Checksum"]
        out.append(r.content)
    return out


def start_server(tmp_path: Path, env: dict[str, str]) -> KvwireProcess:
    server = KvwireProcess(tmp_path / "server", env)
    server.start(timeout_s=60)
    return server


def grpc_stub(server: KvwireProcess) -> tuple[grpc.Channel, pb_grpc.KvwireStub]:
    channel = grpc.insecure_channel(server.grpc_target, options=list(CHANNEL_OPTIONS))
    return channel, pb_grpc.KvwireStub(channel)


# --------------------------------------------------------------------------------- kill and restart


@pytest.mark.parametrize("kind", ["local", "redis"])
def test_server_killed_and_restarted(tmp_path: Path, model: Any, redis_proc: RedisProcess, kind: str) -> None:
    env = server_env(kind, tmp_path, redis_proc)
    store = open_test_store(env)
    stored = ingest(store, model, tmp_path, "kept")
    put_big_context(store, "big", chunks=16, nbytes=1 << 20)
    server = start_server(tmp_path, env)
    try:
        with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=10) as client:
            before = fetch_all(client, stored)
            r = client.post("/v1/contexts", json={"text": TEXT, "context_id": "queued"})
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]

        # A stream in flight when the server dies ends with an error at once, not a hang.
        channel, stub = grpc_stub(server)
        stream = stub.StreamContext(pb.StreamRequest(context_id="big"), metadata=GRPC_AUTH, timeout=30)
        assert next(stream).index == 0
        server.kill()
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as failed:
            for _ in stream:
                pass
        assert failed.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
        assert time.monotonic() - started < 10
        channel.close()

        server.start(timeout_s=60)  # same ports, same store and queue
        with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=10) as client:
            assert fetch_all(client, stored) == before  # stored contexts survive, byte for byte
            assert client.get(f"/v1/jobs/{job_id}").json()["state"] == "queued"  # the job too
            # A worker (here: in the test) takes the queued job over after the restart.
            queue = RedisJobQueue(redis_proc.url, namespace="faultjobs")
            worker = make_worker(model, store, FakeCodec(), make_settings(tmp_path))
            stop = threading.Event()
            thread = threading.Thread(
                target=queue.run_worker, args=(worker.ingest,), kwargs={"consumer": "t", "stop": stop}
            )
            thread.start()
            try:
                job = wait_until(
                    lambda: (
                        (j := client.get(f"/v1/jobs/{job_id}").json())["state"] in ("done", "failed") and j
                    ),
                    30,
                    "the queued job",
                )
            finally:
                stop.set()
                thread.join(timeout=10)
                queue.close()
            assert job["state"] == "done", job
            manifest = ContextManifest.from_json(client.get("/v1/contexts/queued").content)
            fetch_all(client, manifest)
        assert sorted(m.context_id for m in check_manifests(store)) == ["big", "kept", "queued"]
    finally:
        server.kill()
        store.close()


# ------------------------------------------------------------------------- backend down while serving


def rest_error(r: httpx.Response) -> dict[str, str]:
    assert r.headers["content-type"].startswith("application/json")
    error: dict[str, str] = r.json()["error"]
    return error


def test_backend_down_while_serving_then_back(tmp_path: Path, model: Any, redis_proc: RedisProcess) -> None:
    """Redis (store and queue) killed, then hung (SIGSTOP): REST 503 JSON, gRPC UNAVAILABLE, each naming
    the backend, in bounded time; full service once it is back. Repeated, with stalled clients thrown in,
    the server's thread count and memory stay flat."""
    env = server_env("redis", tmp_path, redis_proc, KVWIRE_REDIS_SOCKET_TIMEOUT_S="0.5")
    store = open_test_store(env)
    stored = ingest(store, model, tmp_path, "kept")
    server = start_server(tmp_path, env)
    channel, stub = grpc_stub(server)
    backend = f"redis at 127.0.0.1:{redis_proc.port}"
    try:
        with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=20) as client:
            expected = fetch_all(client, stored)

            def round_trip(fault: str) -> None:
                if fault == "killed":
                    redis_proc.kill()
                else:
                    redis_proc.pause()
                started = time.monotonic()
                r = client.get("/v1/contexts/kept/chunks/0")
                assert r.status_code == 503, r.text
                assert (
                    rest_error(r)["type"] == "BackendUnavailableError" and backend in rest_error(r)["message"]
                )
                assert client.get("/readyz").status_code == 503
                r = client.post("/v1/contexts", json={"text": TEXT})
                assert r.status_code == 503  # the job queue, on the same redis
                assert f"redis job queue at 127.0.0.1:{redis_proc.port}" in rest_error(r)["message"]
                with pytest.raises(grpc.RpcError) as err:
                    stub.GetChunk(
                        pb.GetChunkRequest(context_id="kept", index=0), metadata=GRPC_AUTH, timeout=20
                    )
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE and backend in (
                    err.value.details() or ""
                )
                assert time.monotonic() - started < 15  # socket timeouts, not a hang
                stall_clients(server.port)
                if fault == "killed":
                    redis_proc.start()
                else:
                    redis_proc.resume()
                wait_until(lambda: client.get("/readyz").status_code == 200, 10, "readiness")
                assert fetch_all(client, stored) == expected
                chunk = stub.GetChunk(
                    pb.GetChunkRequest(context_id="kept", index=1, level=0), metadata=GRPC_AUTH, timeout=10
                )
                assert chunk.data == expected[1]

            round_trip("killed")
            round_trip("paused")
            rss0, threads0 = server.rss_and_threads()
            for fault in ("killed", "paused", "killed"):
                round_trip(fault)
            rss1, threads1 = server.rss_and_threads()
        # Generous bounds: a leak per fault (a thread, a connection pool, buffers) would add up.
        assert threads1 <= threads0 + 4, (threads0, threads1)
        assert rss1 - rss0 < 64 * 2**20, (rss0, rss1)
    finally:
        channel.close()
        server.kill()
        store.close()


def stall_clients(port: int, n: int = 5) -> None:
    """Open ``n`` connections that send half a request and then nothing; leave them open."""
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET /v1/contexts/kept HTTP/1.1\r\nHost: x\r\n")
        _STALLED.append(s)


_STALLED: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_stalled() -> Iterator[None]:
    yield
    while _STALLED:
        _STALLED.pop().close()


# ------------------------------------------------------------------------------------------ start-up


def test_ready_only_once_the_stream_planner_is_compiled(tmp_path: Path, redis_proc: RedisProcess) -> None:
    """A fresh ``kvwire serve`` (an empty numba cache: the planner compiles from scratch) answers
    liveness at once but reports ready only after the planner's warm-up, which leaves its compiled
    code in numba's on-disk cache for the next start."""
    numba_cache = tmp_path / "numba-cache"
    server = start_server(
        tmp_path, server_env("local", tmp_path, redis_proc, NUMBA_CACHE_DIR=str(numba_cache))
    )
    channel, stub = grpc_stub(server)
    try:
        with httpx.Client(base_url=server.base_url, timeout=10) as client:
            assert client.get("/healthz").status_code == 200
            not_ready: list[str] = []

            def ready() -> bool:
                r = client.get("/readyz")
                if r.status_code != 200:
                    not_ready.append(rest_error(r)["message"])
                return r.status_code == 200

            wait_until(ready, 300, "readiness")
            assert "stream planner compiled" in server.log_path.read_text(errors="replace")
            assert all("compiling" in m for m in not_ready), not_ready
        assert stub.Health(pb.HealthRequest(ready=True), timeout=10).status == "ready"
        assert list(numba_cache.rglob("*.nbi")), "the planner was not cached on disk"
    finally:
        channel.close()
        server.stop()
