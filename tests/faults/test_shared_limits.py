"""Limits that must hold across server processes: two real ``kvwire serve`` sharing one redis-server.

Per-key rate limits live in Redis (``kvwire.server.auth.RedisRateLimiter``) and per-tenant job limits
in the Redis job queue, so N API replicas allow what one would. When that Redis dies, each server falls
back to its own bucket (bounded, never a 500) and goes back to the shared one once Redis returns.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import httpx
import pytest

from benchmarks.processes import KvwireProcess, RedisProcess, wait_until
from kvwire._proto import CHANNEL_OPTIONS
from kvwire._proto import kvwire_pb2 as pb
from kvwire._proto import kvwire_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

KEYS = {"alice": "alice-key", "bob": "bob-key", "carol": "carol-key"}
BURST = 6
RETRY_S = 1.0  # KVWIRE_LIMITS_REDIS_RETRY_S: how long a server skips a failed Redis


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def grpc_auth(tenant: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {KEYS[tenant]}"),)


def test_two_servers_share_rate_and_job_limits(tmp_path: Path, redis_proc: RedisProcess) -> None:
    env = {
        "KVWIRE_STORE": "local",
        "KVWIRE_DATA_DIR": str(tmp_path / "store"),
        "KVWIRE_API_KEYS": ",".join(f"{t}:{k}" for t, k in KEYS.items()),
        "KVWIRE_JOBS_REDIS_URL": redis_proc.url,  # no worker here: every ingest is a queued job
        "KVWIRE_JOBS_NAMESPACE": "shared",
        "KVWIRE_MAX_JOBS_PER_TENANT": "2",
        # One token per 100 s: nothing refills while the test runs.
        "KVWIRE_RATE_LIMIT_PER_S": "0.01",
        "KVWIRE_RATE_LIMIT_BURST": str(BURST),
        "KVWIRE_LIMITS_REDIS_RETRY_S": str(RETRY_S),
        "KVWIRE_REDIS_SOCKET_TIMEOUT_S": "1",
        "KVWIRE_REDIS_CONNECT_TIMEOUT_S": "0.5",
    }
    servers = [KvwireProcess(tmp_path / name, env) for name in ("a", "b")]
    channels: list[grpc.Channel] = []
    try:
        for server in servers:
            server.start(timeout_s=90)
        a, b = (httpx.Client(base_url=s.base_url, timeout=20) for s in servers)
        channels = [grpc.insecure_channel(s.grpc_target, options=list(CHANNEL_OPTIONS)) for s in servers]
        stub_b = pb_grpc.KvwireStub(channels[1])

        def rest_list(client: httpx.Client, tenant: str) -> int:
            return client.get("/v1/contexts", headers=auth(tenant)).status_code

        def grpc_list(tenant: str) -> grpc.StatusCode:
            try:
                stub_b.ListContexts(pb.ListContextsRequest(), metadata=grpc_auth(tenant), timeout=20)
            except grpc.RpcError as exc:
                return exc.code()  # type: ignore[no-any-return]
            return grpc.StatusCode.OK

        # Alice alternates REST on server a and gRPC on server b: one burst between them, not two.
        for _ in range(BURST // 2):
            assert rest_list(a, "alice") == 200
            assert grpc_list("alice") == grpc.StatusCode.OK
        r = a.get("/v1/contexts", headers=auth("alice"))
        assert r.status_code == 429 and r.json()["error"]["type"] == "RateLimitError"
        assert 1 <= int(r.headers["retry-after"]) <= 100
        assert grpc_list("alice") == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert rest_list(b, "alice") == 429

        # Bob's queued jobs count against one per-tenant limit, whichever server took them.
        text = {"text": "a context long enough to be queued"}
        assert a.post("/v1/contexts", json=text, headers=auth("bob")).status_code == 202
        assert b.post("/v1/contexts", json=text, headers=auth("bob")).status_code == 202
        r = a.post("/v1/contexts", json=text, headers=auth("bob"))
        assert r.status_code == 429 and "limit 2" in r.json()["error"]["message"]

        # Redis dies: rate limits fall back to each server's own bucket (what it had left of its share,
        # 3 of alice's 6), so requests that need no Redis (listing the local store) go on, bounded, with
        # no 5xx; ingests, which need the queue, are 503.
        redis_proc.kill()
        outcomes = [rest_list(a, "alice") for _ in range(BURST)]
        assert outcomes == [200] * (BURST // 2) + [429] * (BURST - BURST // 2), outcomes
        assert [rest_list(b, "carol") for _ in range(BURST + 1)] == [200] * BURST + [429]
        r = a.post("/v1/contexts", json=text, headers=auth("bob"))
        assert r.status_code == 503 and r.json()["error"]["type"] == "BackendUnavailableError"

        # Redis is back (AOF: the buckets survived): after the retry window the shared buckets decide
        # again. Carol's shared bucket is untouched (her requests above went to b's own bucket), so
        # together the servers admit her burst once more, and then refuse on both.
        redis_proc.start()
        wait_until(lambda: a.get("/readyz").status_code == 200, 15, "server a ready")
        time.sleep(RETRY_S + 0.5)
        for client in (a, b) * (BURST // 2):
            assert rest_list(client, "carol") == 200
        assert rest_list(a, "carol") == 429 and grpc_list("carol") == grpc.StatusCode.RESOURCE_EXHAUSTED
        for server in servers:
            log = server.log_path.read_text()
            assert "limits are per process for the next" in log
            assert "Traceback" not in log
        a.close()
        b.close()
    finally:
        for channel in channels:
            channel.close()
        for server in servers:
            server.kill()
