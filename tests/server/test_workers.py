"""``kvwire serve --workers N``: N serving processes on shared ports (``kvwire.server.supervisor``).

The integration tests start a real supervisor with a Redis store and job queue (no model: with a Redis
queue no serving process loads one) and check that every child serves both ports, that any child finds
a job queued through another, and how the supervisor stops.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.processes import KvwireProcess, RedisProcess, listens, wait_until
from kvwire import cli
from kvwire.errors import InvalidInputError
from kvwire.server.config import ServiceSettings
from kvwire.server.service import ChunkEntry, ContextManifest, LevelEntry, crc32_hex, manifest_key

WORKERS = 3
KEY = "workers-key"


def test_workers_need_a_redis_job_queue() -> None:
    from kvwire.server.rest import serve

    with pytest.raises(InvalidInputError, match="KVWIRE_JOBS_REDIS_URL"):
        serve(ServiceSettings(workers=2, api_keys=f"a:{KEY}"))


def test_cli_passes_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    import kvwire.server.rest

    seen: list[ServiceSettings] = []
    monkeypatch.setattr(kvwire.server.rest, "serve", lambda settings: seen.append(settings))
    assert cli.main(["serve", "--workers", "3", "--jobs-redis-url", "redis://127.0.0.1:1/0"]) == 0
    assert seen[0].workers == 3
    assert cli.main(["serve", "--workers", "0"]) == 2  # a clear settings error, not a traceback


# ------------------------------------------------------------------------------------- integration


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[KvwireProcess, RedisProcess]]:
    redis = RedisProcess(tmp_path / "redis", persist=False)
    redis.start()
    env = {
        "KVWIRE_STORE": "redis",
        "KVWIRE_REDIS_URL": redis.url,
        "KVWIRE_JOBS_REDIS_URL": redis.url[:-1] + "1",
        "KVWIRE_API_KEYS": f"a:{KEY}",
        "KVWIRE_WORKERS": str(WORKERS),
        "KVWIRE_SHUTDOWN_GRACE_S": "2",
    }
    server = KvwireProcess(tmp_path / "server", env)
    try:
        server.start(timeout_s=180)
        yield server, redis
    finally:
        server.kill()
        redis.kill()


def serving_children(server: KvwireProcess) -> list[int]:
    """Pids of the supervisor's children that listen on its REST port, each also on its gRPC port."""
    children = server.serving_children()
    for child in children:
        assert listens(child, server.grpc_port), "a child serves REST but not gRPC"
    return [child.pid for child in children]


def seed_context(redis_url: str) -> bytes:
    """A one-chunk context ``c`` of tenant ``a`` written straight to the store; returns its bytes."""
    from kvwire.server.storage.redis import RedisStore

    data = os.urandom(100_000)
    with RedisStore(redis_url, namespace="kvwire") as store:
        key = "t/a/chunks/test/0/v1/L2"
        store.put(key, data)
        manifest = ContextManifest(
            context_id="c",
            tenant="a",
            model_fingerprint="f" * 64,
            profile_digest="0" * 64,
            codec_version=1,
            chunk_tokens=4,
            total_tokens=4,
            levels=[2],
            default_level=2,
            chunks=[
                ChunkEntry(0, 0, 4, [1, 2, 3, 4], "abcd", [LevelEntry(2, key, len(data), crc32_hex(data))])
            ],
        )
        store.put(manifest_key("a", "c"), manifest.to_json())
    return data


@pytest.mark.integration
def test_every_process_serves_both_ports_and_sees_every_job(
    served: tuple[KvwireProcess, RedisProcess],
) -> None:
    import grpc
    import httpx

    from kvwire._proto import CHANNEL_OPTIONS
    from kvwire._proto import kvwire_pb2 as pb
    from kvwire._proto import kvwire_pb2_grpc as pb_grpc

    server, redis = served
    children = wait_until(
        lambda: (c := serving_children(server)) and len(c) == WORKERS and c, 120, "children"
    )
    assert len(set(children)) == WORKERS
    data = seed_context(redis.url)
    auth = {"Authorization": f"Bearer {KEY}"}
    # A new connection per request: the kernel spreads them over the processes.
    for _ in range(4 * WORKERS):
        r = httpx.get(f"{server.base_url}/v1/contexts/c/chunks/0", headers=auth, timeout=30)
        assert r.status_code == 200 and r.content == data
        with grpc.insecure_channel(server.grpc_target, options=CHANNEL_OPTIONS) as channel:
            chunk = pb_grpc.KvwireStub(channel).GetChunk(
                pb.GetChunkRequest(context_id="c", index=0), metadata=(("authorization", f"Bearer {KEY}"),)
            )
            assert chunk.data == data
    # A scrape reaches one process and reports every process's requests.
    chunk_route = 'route="/v1/contexts/{context_id}/chunks/{index}",status="200"'
    metrics = httpx.get(f"{server.base_url}/metrics", timeout=30).text
    assert f'kvwire_http_requests_total{{method="GET",{chunk_route}}} {4.0 * WORKERS}' in metrics
    served_line = next(x for x in metrics.splitlines() if x.startswith("kvwire_chunk_bytes_served_total "))
    assert float(served_line.split()[1]) == 4 * WORKERS * len(data)
    # Ingests are queued in Redis (no serving process has a model) and visible from every process.
    r = httpx.post(f"{server.base_url}/v1/contexts", json={"token_ids": [1, 2, 3]}, headers=auth, timeout=30)
    assert r.status_code == 202
    job_id = r.json()["id"]
    for _ in range(4 * WORKERS):
        got = httpx.get(f"{server.base_url}/v1/jobs/{job_id}", headers=auth, timeout=30)
        assert got.status_code == 200 and got.json()["state"] == "queued"
    assert httpx.get(f"{server.base_url}/v1/contexts/c/chunks/0", timeout=30).status_code == 401

    # SIGTERM to the supervisor stops every child, and it exits cleanly.
    os.kill(server.pid, signal.SIGTERM)
    assert server.proc is not None
    assert server.proc.wait(timeout=60) == 0
    import psutil

    assert not [
        pid for pid in children if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
    ]


@pytest.mark.integration
def test_a_dead_process_stops_the_supervisor(served: tuple[KvwireProcess, RedisProcess]) -> None:
    import psutil

    server, _ = served
    children = wait_until(
        lambda: (c := serving_children(server)) and len(c) == WORKERS and c, 120, "children"
    )
    os.kill(children[0], signal.SIGKILL)
    assert server.proc is not None
    assert server.proc.wait(timeout=60) != 0  # left to whatever runs it to restart
    deadline = time.monotonic() + 30
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in children[1:]):
        assert time.monotonic() < deadline, "a serving process outlived its supervisor"
        time.sleep(0.1)
    assert "exited with -9" in server.log_path.read_text()
