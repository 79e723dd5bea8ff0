"""Security: tenant isolation (REST and gRPC), per-key rate limits, per-tenant job limits, hashed keys."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from fastapi.testclient import TestClient

from kvwire._proto import CHANNEL_OPTIONS
from kvwire._proto import kvwire_pb2 as pb
from kvwire._proto import kvwire_pb2_grpc as pb_grpc
from kvwire.errors import AuthError, InvalidInputError, RateLimitError
from kvwire.server.auth import AccessControl
from kvwire.server.config import ServiceSettings, hash_api_key, parse_api_keys
from kvwire.server.grpc_server import ERROR_TYPE_KEY, RETRY_AFTER_KEY, serve_grpc
from kvwire.server.jobs import IngestRequest, InProcessJobQueue
from kvwire.server.limits import LimitsRedis, RedisRateLimiter, SharedJobSlots, shared_limits_redis
from kvwire.server.rest import create_app
from kvwire.server.service import MAX_LIST_PAGE, KvwireService, manifests_prefix, open_job_queue
from kvwire.server.storage import Store

from ..storage.conftest import redis_cluster_url, redis_url, s3_endpoint  # noqa: F401 - fixtures
from .conftest import make_settings

ALICE = {"Authorization": "Bearer alice-key"}
BOB = {"Authorization": "Bearer bob-key"}
ALICE_MD = (("authorization", "Bearer alice-key"),)
BOB_MD = (("authorization", "Bearer bob-key"),)


@pytest.fixture
def client(service: KvwireService, settings: ServiceSettings) -> Iterator[TestClient]:
    with TestClient(create_app(service, settings), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def stub(service: KvwireService, settings: ServiceSettings) -> Iterator[Any]:
    server = serve_grpc(service, settings, 0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}", options=CHANNEL_OPTIONS) as channel:
            yield pb_grpc.KvwireStub(channel)
    finally:
        server.stop(grace_s=None)


def rpc_error(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if isinstance(result, Iterator):
            list(result)
    return info.value


def trailers(err: grpc.RpcError) -> dict[str, str]:
    return dict(err.trailing_metadata() or ())  # type: ignore[attr-defined]


# -------------------------------------------------------------------------------------- isolation


def test_rest_tenant_cannot_read_list_or_delete_another_tenants_context(
    client: TestClient, service: KvwireService
) -> None:
    r = client.post(
        "/v1/contexts", json={"token_ids": list(range(100)), "context_id": "a-secret"}, headers=ALICE
    )
    assert r.status_code == 201, r.text
    manifest = r.json()
    job = client.post("/v1/contexts", json={"token_ids": [5] * 300}, headers=ALICE).json()

    # Bob knows every id, and still sees nothing: 404 (not 403), so ids do not even leak.
    for path in [
        "/v1/contexts/a-secret",
        "/v1/contexts/a-secret/chunks/0",
        "/v1/contexts/a-secret/chunks/1?level=0",
        f"/v1/jobs/{job['id']}",
    ]:
        r = client.get(path, headers=BOB)
        assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError", path
    assert client.delete("/v1/contexts/a-secret", headers=BOB).status_code == 404
    assert client.get("/v1/contexts", headers=BOB).json() == {"context_ids": [], "next_after": None}

    # Alice's context is intact and listed for her only.
    assert client.get("/v1/contexts/a-secret", headers=ALICE).json() == manifest
    assert "a-secret" in client.get("/v1/contexts", headers=ALICE).json()["context_ids"]
    # Every stored key of Alice's context is in her namespace.
    keys = [e["key"] for c in manifest["chunks"] for e in c["levels"]]
    assert keys and all(k.startswith("t/alice/chunks/") for k in keys)

    # The same tokens for Bob: his own chunks (no cross-tenant prefix sharing), his own listing.
    bob = client.post(
        "/v1/contexts", json={"token_ids": list(range(100)), "context_id": "a-secret"}, headers=BOB
    )
    assert bob.status_code == 201
    bob_keys = [e["key"] for c in bob.json()["chunks"] for e in c["levels"]]
    assert all(k.startswith("t/bob/chunks/") for k in bob_keys) and not set(bob_keys) & set(keys)
    assert client.delete("/v1/contexts/a-secret", headers=BOB).status_code == 204
    assert client.get("/v1/contexts/a-secret", headers=ALICE).json() == manifest
    assert all(service.store.exists(k) for k in keys)


def test_grpc_tenant_cannot_read_list_or_delete_another_tenants_context(stub: Any) -> None:
    created = stub.CreateContext(
        pb.CreateContextRequest(token_ids=pb.TokenIds(ids=list(range(100))), context_id="g-secret"),
        metadata=ALICE_MD,
    ).manifest
    calls = [
        lambda: stub.GetManifest(pb.GetManifestRequest(context_id="g-secret"), metadata=BOB_MD),
        lambda: stub.GetChunk(pb.GetChunkRequest(context_id="g-secret", index=0, level=0), metadata=BOB_MD),
        lambda: stub.StreamContext(pb.StreamRequest(context_id="g-secret"), metadata=BOB_MD),
        lambda: stub.DeleteContext(pb.DeleteContextRequest(context_id="g-secret"), metadata=BOB_MD),
    ]
    for call in calls:
        assert rpc_error(call).code() == grpc.StatusCode.NOT_FOUND
    assert list(stub.ListContexts(pb.ListContextsRequest(), metadata=BOB_MD).context_ids) == []
    assert list(stub.ListContexts(pb.ListContextsRequest(), metadata=ALICE_MD).context_ids) == ["g-secret"]
    again = stub.GetManifest(pb.GetManifestRequest(context_id="g-secret"), metadata=ALICE_MD)
    assert again == created


def test_listing_is_sorted_paged_and_bounded(
    client: TestClient, stub: Any, settings: ServiceSettings
) -> None:
    ids = [f"c{n:02d}" for n in range(7)]
    for cid in reversed(ids):
        assert client.post(
            "/v1/contexts", json={"token_ids": [1, 2], "context_id": cid}, headers=ALICE
        ).is_success
    seen, after = [], None
    while True:
        params: dict[str, Any] = {"limit": 3, **({"after": after} if after else {})}
        page = client.get("/v1/contexts", params=params, headers=ALICE).json()
        seen += page["context_ids"]
        after = page["next_after"]
        if after is None:
            break
    assert seen == ids
    grpc_page = stub.ListContexts(pb.ListContextsRequest(limit=5, after="c01"), metadata=ALICE_MD)
    assert list(grpc_page.context_ids) == ids[2:7] and grpc_page.next_after == ""
    too_many = MAX_LIST_PAGE + 1
    assert client.get("/v1/contexts", params={"limit": too_many}, headers=ALICE).status_code == 400
    err = rpc_error(lambda: stub.ListContexts(pb.ListContextsRequest(limit=too_many), metadata=ALICE_MD))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert client.get("/v1/contexts").status_code == 401


# ------------------------------------------------------------------------------------------- keys


def test_api_keys_are_kept_only_as_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVWIRE_API_KEYS", f"alice:plain-secret-1,bob:sha256:{hash_api_key('plain-secret-2')}")
    settings = ServiceSettings()
    dumped = settings.model_dump_json() + repr(settings)
    assert "plain-secret" not in dumped
    assert set(settings.api_keys) == {hash_api_key("plain-secret-1"), hash_api_key("plain-secret-2")}
    access = AccessControl(settings)
    assert access.admit("Bearer plain-secret-1") == "alice"
    assert access.admit("bearer plain-secret-2") == "bob"
    for bad in [None, "", "Bearer", "Bearer nope", "Basic plain-secret-1", hash_api_key("plain-secret-1")]:
        with pytest.raises(AuthError):
            access.admit(bad)
    # The stored hash itself is not a key.
    with pytest.raises(AuthError):
        access.admit("Bearer " + hash_api_key("plain-secret-1"))


@pytest.mark.parametrize("tenant", ["..", ".", ".hidden", "a/b", "x" * 65, ""])
def test_tenant_names_cannot_leave_their_namespace(tenant: str) -> None:
    with pytest.raises(InvalidInputError):
        parse_api_keys(f"{tenant}:k")
    with pytest.raises(ValueError):
        ServiceSettings(api_keys=f"{tenant}:k")
    with pytest.raises(ValueError):
        ServiceSettings(default_tenant=tenant)
    assert manifests_prefix("alice") == "t/alice/contexts"


# ------------------------------------------------------------------------------------ rate limits


def limited_service(store: Store, worker: Any, tmp_path: Path, **overrides: Any) -> KvwireService:
    settings = make_settings(tmp_path, **overrides)
    return KvwireService(store, InProcessJobQueue(max_pending=10, max_per_tenant=10), settings, worker)


def test_rest_rate_limit_per_key_is_429_with_retry_after(store: Store, worker: Any, tmp_path: Path) -> None:
    # 0.1 token/s: the bucket cannot refill a whole token while the test runs.
    service = limited_service(store, worker, tmp_path, rate_limit_per_s=0.1, rate_limit_burst=3)
    with TestClient(create_app(service), raise_server_exceptions=False) as client:
        for _ in range(3):
            assert client.get("/v1/contexts", headers=ALICE).status_code == 200
        r = client.get("/v1/contexts", headers=ALICE)
        assert r.status_code == 429 and r.json()["error"]["type"] == "RateLimitError"
        assert 1 <= int(r.headers["retry-after"]) <= 10
        # Every authenticated endpoint draws from the same bucket; other keys and health do not.
        assert client.post("/v1/contexts", json={"token_ids": [1]}, headers=ALICE).status_code == 429
        assert client.get("/v1/contexts", headers=BOB).status_code == 200
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
        # A bad key is refused as such (401), never charged to anyone's bucket.
        assert client.get("/v1/contexts", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_grpc_rate_limit_is_resource_exhausted_and_shared_with_rest(
    store: Store, worker: Any, tmp_path: Path
) -> None:
    service = limited_service(store, worker, tmp_path, rate_limit_per_s=0.1, rate_limit_burst=2)
    access = AccessControl(service.settings)  # as `kvwire serve` builds it: one for both APIs
    server = serve_grpc(service, service.settings, 0, access=access)
    try:
        with (
            TestClient(create_app(service, access=access)) as client,
            grpc.insecure_channel(f"127.0.0.1:{server.port}", options=CHANNEL_OPTIONS) as channel,
        ):
            stub = pb_grpc.KvwireStub(channel)
            assert client.get("/v1/contexts", headers=ALICE).status_code == 200
            stub.ListContexts(pb.ListContextsRequest(), metadata=ALICE_MD)
            err = rpc_error(lambda: stub.ListContexts(pb.ListContextsRequest(), metadata=ALICE_MD))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert trailers(err)[ERROR_TYPE_KEY] == "RateLimitError"
            assert 1 <= int(trailers(err)[RETRY_AFTER_KEY]) <= 10
            assert client.get("/v1/contexts", headers=ALICE).status_code == 429
            stub.ListContexts(pb.ListContextsRequest(), metadata=BOB_MD)
            assert stub.Health(pb.HealthRequest()).status == "ok"
    finally:
        server.stop(grace_s=None)


def test_rate_limit_refills() -> None:
    settings = ServiceSettings(api_keys="alice:k", rate_limit_per_s=1000.0, rate_limit_burst=1)
    access = AccessControl(settings)
    access.admit("Bearer k")
    # At 1000 tokens/s a token is back within milliseconds; a few retries absorb scheduling.
    for _ in range(1000):
        try:
            access.admit("Bearer k")
            break
        except RateLimitError:
            continue
    else:
        raise AssertionError("the bucket never refilled")


def test_rate_limit_off_by_default() -> None:
    access = AccessControl(ServiceSettings(api_keys="alice:k"))
    assert access.limiter is None
    for _ in range(500):
        access.admit("Bearer k")


# ----------------------------------------------------------------------- rate limits shared by Redis


def shared_settings(tmp_path: Path, redis: str, namespace: str, **overrides: Any) -> ServiceSettings:
    values: dict[str, Any] = dict(
        rate_limit_per_s=0.05, rate_limit_burst=4, limits_redis_url=redis, jobs_namespace=namespace
    )
    return make_settings(tmp_path, **{**values, **overrides})


@pytest.mark.integration
def test_rate_limit_is_shared_by_two_instances_through_redis(
    store: Store,
    worker: Any,
    tmp_path: Path,
    redis_url: str,  # noqa: F811 - the fixture
) -> None:
    """Two server instances (own AccessControl each, as two processes have), REST on one and gRPC on
    the other, sharing a real redis-server: together they admit the burst once, not twice."""
    namespace = "rl-" + tmp_path.name[-12:]
    settings = shared_settings(tmp_path, redis_url, namespace)
    service = KvwireService(store, InProcessJobQueue(), settings, worker)
    access_a, access_b = AccessControl(settings), AccessControl(settings)
    assert isinstance(access_a.limiter, RedisRateLimiter)
    server = serve_grpc(service, settings, 0, access=access_b)
    try:
        with (
            TestClient(create_app(service, access=access_a), raise_server_exceptions=False) as client,
            grpc.insecure_channel(f"127.0.0.1:{server.port}", options=CHANNEL_OPTIONS) as channel,
        ):
            stub = pb_grpc.KvwireStub(channel)
            for _ in range(2):  # 4 requests, alternating instances: the whole burst
                assert client.get("/v1/contexts", headers=ALICE).status_code == 200
                stub.ListContexts(pb.ListContextsRequest(), metadata=ALICE_MD)
            r = client.get("/v1/contexts", headers=ALICE)
            assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 20
            err = rpc_error(lambda: stub.ListContexts(pb.ListContextsRequest(), metadata=ALICE_MD))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert client.get("/v1/contexts", headers=BOB).status_code == 200  # Bob's own bucket
            # Each process alone would still have admitted the rest of its burst.
            assert access_a.limiter.fallback.consume(hash_api_key("alice-key"))
    finally:
        server.stop(grace_s=None)
        access_a.close()
        access_b.close()
    # One hash per key, expiring; neither the key nor its stored hash appears in Redis.
    import redis

    r = redis.Redis.from_url(redis_url)
    keys = sorted(k.decode() for k in r.scan_iter(f"{namespace}:ratelimit:*"))
    assert len(keys) == 2
    for key in keys:
        assert 0 < r.pttl(key) <= (4 / 0.05 + 1) * 1000
        assert (
            "alice" not in key and hash_api_key("alice-key") not in key and hash_api_key("bob-key") not in key
        )
    r.close()


@pytest.mark.integration
def test_limits_shared_through_a_redis_cluster_store(
    tmp_path: Path,
    redis_cluster_url: str,  # noqa: F811 - the fixture
) -> None:
    """With the store on a Redis Cluster and nothing else configured, the buckets go there."""
    settings = make_settings(tmp_path, rate_limit_per_s=0.05, rate_limit_burst=3)
    settings.storage.store, settings.storage.redis_url = "redis-cluster", redis_cluster_url
    settings.storage.redis_namespace = "rl-" + tmp_path.name[-12:]
    instances = [AccessControl(settings) for _ in range(3)]
    try:
        for access in instances:
            assert isinstance(access.limiter, RedisRateLimiter)
            assert access.admit("Bearer bob-key") == "bob"
        for access in instances:
            with pytest.raises(RateLimitError):
                access.admit("Bearer bob-key")
            assert not access.limiter.redis.degraded  # type: ignore[union-attr]
    finally:
        for access in instances:
            access.close()


def test_rate_limit_fails_open_to_the_process_bucket_when_redis_is_down(tmp_path: Path) -> None:
    """Redis unreachable: no 500 and no unlimited access; this process's bucket decides, and Redis is
    not asked again (or waited for) on every request."""
    from ..storage.conftest import free_port

    settings = shared_settings(tmp_path, f"redis://127.0.0.1:{free_port()}/0", "down", rate_limit_burst=3)
    access = AccessControl(settings)
    limiter = access.limiter
    assert isinstance(limiter, RedisRateLimiter) and not limiter.redis.degraded
    calls = []
    script = limiter.redis._script

    def counted(lua: str) -> Any:
        calls.append(1)
        return script(lua)

    limiter.redis._script = counted  # type: ignore[method-assign]
    for _ in range(3):
        assert access.admit("Bearer alice-key") == "alice"
    with pytest.raises(RateLimitError):
        access.admit("Bearer alice-key")
    assert limiter.redis.degraded and len(calls) == 1  # one failed try, then the retry window
    limiter.redis._skip_until = 0.0  # the window is over: Redis is tried again (and still fails)
    with pytest.raises(RateLimitError):
        access.admit("Bearer alice-key")
    assert len(calls) == 2
    access.close()


def test_rate_limit_redis_is_the_one_configured(tmp_path: Path) -> None:
    def chosen(**kw: Any) -> Any:
        return shared_limits_redis(make_settings(tmp_path, **kw))

    assert chosen() is None  # local store, in-process queue: buckets in this process
    assert chosen(jobs_redis_url="redis://q:1/0") == ("redis://q:1/0", "kvwire", False)
    explicit = chosen(jobs_redis_url="redis://q:1/0", limits_redis_url="redis://rl:2/0")
    assert explicit == ("redis://rl:2/0", "kvwire", False)
    assert chosen(jobs_redis_url="redis://q:1/0", limits_shared=False) is None
    settings = make_settings(tmp_path)
    for store, hot, cluster in (
        ("redis", "redis", False),
        ("redis-cluster", "redis", True),
        ("tiered", "redis-cluster", True),
    ):
        settings.storage.store, settings.storage.tiered_hot = store, hot  # type: ignore[assignment]
        assert shared_limits_redis(settings) == (settings.storage.redis_url, "kvwire", cluster)
    settings.storage.store = "s3"
    assert shared_limits_redis(settings) is None


# ------------------------------------------------------------------------------------------ metrics


def test_metrics_token_when_configured(store: Store, worker: Any, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, metrics_token="scrape-secret")
    assert settings.metrics_token == hash_api_key("scrape-secret")  # kept hashed, like API keys
    assert "scrape-secret" not in settings.model_dump_json() + repr(settings)
    assert make_settings(tmp_path, metrics_token="sha256:" + "AB" * 32).metrics_token == "ab" * 32
    service = KvwireService(store, InProcessJobQueue(), settings, worker)
    with TestClient(create_app(service), raise_server_exceptions=False) as client:
        for headers in ({}, ALICE, {"Authorization": "Bearer wrong"}, {"Authorization": "scrape-secret"}):
            r = client.get("/metrics", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "AuthError", headers
        r = client.get("/metrics", headers={"Authorization": "Bearer scrape-secret"})
        assert r.status_code == 200 and "kvwire_http_requests_total" in r.text
        assert client.get("/healthz").status_code == 200  # health stays open


def test_metrics_open_by_default_and_labels_carry_no_caller_data(client: TestClient) -> None:
    """Labels are route templates, fixed methods and statuses: no tenant, context id, key or job id,
    and a client cannot grow the label set with made-up methods."""
    r = client.post("/v1/contexts", json={"token_ids": [5] * 80, "context_id": "secret-ctx-1"}, headers=ALICE)
    assert r.status_code == 201
    job = client.post(
        "/v1/contexts", json={"token_ids": [5] * 300, "context_id": "secret-ctx-2"}, headers=BOB
    )
    assert job.status_code == 202
    client.get("/v1/contexts/secret-ctx-1/chunks/0", headers=ALICE)
    client.get("/v1/contexts/secret-ctx-1", headers=BOB)  # 404 for Bob
    client.get(f"/v1/jobs/{job.json()['id']}", headers=BOB)
    client.get("/v1/contexts/nope-ctx-3", headers={"Authorization": "Bearer bad-key-4"})
    for method in ("BREW", "XSECRETMETHOD"):
        client.request(method, "/v1/contexts", headers=ALICE)
    text = client.get("/metrics").text
    for secret in (
        "alice",
        "bob",
        "secret-ctx",
        "nope-ctx",
        "bad-key",
        job.json()["id"],
        hash_api_key("alice-key"),
        "BREW",
        "XSECRETMETHOD",
    ):
        assert secret not in text, secret
    assert 'method="other"' in text and 'route="/v1/contexts/{context_id}/chunks/{index}"' in text


# --------------------------------------------------------------------------------------- job limits


def test_concurrent_jobs_per_tenant_are_429(store: Store, worker: Any, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, max_jobs_per_tenant=2, max_pending_jobs=10)
    queue = InProcessJobQueue(max_pending=10, max_per_tenant=2)
    service = KvwireService(store, queue, settings, worker)  # no worker thread: jobs stay queued
    long = {"token_ids": [1] * 300}
    with TestClient(create_app(service)) as client:
        for _ in range(2):
            assert client.post("/v1/contexts", json=long, headers=ALICE).status_code == 202
        r = client.post("/v1/contexts", json=long, headers=ALICE)
        assert r.status_code == 429 and r.json()["error"]["type"] == "RateLimitError"
        assert "limit 2" in r.json()["error"]["message"] and int(r.headers["retry-after"]) >= 1
        assert client.post("/v1/contexts", json=long, headers=BOB).status_code == 202  # Bob has his own
        # Short contexts are ingested inline, not queued: not counted as jobs.
        assert client.post("/v1/contexts", json={"token_ids": [1, 2]}, headers=ALICE).status_code == 201
        # A finished job frees its slot.
        assert queue.process_one(lambda request, progress: None, consumer="t", block_s=1)
        assert client.post("/v1/contexts", json=long, headers=ALICE).status_code == 202


def test_text_with_lone_surrogates_is_400(client: TestClient) -> None:
    """Found by hand after schemathesis: JSON can carry lone surrogates, which the real tokenizer
    cannot encode (TypeError, a 500); the fake tokenizer here would accept them, so 400 is the check."""
    for raw in [b'{"text": "\\ud800"}', b'{"text": "ok \\udfff then"}']:
        r = client.post("/v1/contexts", content=raw, headers={**ALICE, "Content-Type": "application/json"})
        assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"], r.text
    ok = client.post("/v1/contexts", json={"text": "\U0010ffff \x00 fine"}, headers=ALICE)
    assert ok.status_code == 201


# ------------------------------------------------------------------------------ real backends


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["redis", "s3"])
def test_every_stored_key_is_in_its_tenants_namespace(
    kind: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    model: Any,
    codec: Any,
    settings: ServiceSettings,
) -> None:
    """On a real redis-server and S3 server: two tenants ingest the same tokens; every key either
    belongs to exactly one tenant's ``t/<tenant>/`` namespace or is the (shared, model-only) profile."""
    from ..storage.conftest import make_store
    from .conftest import make_worker

    store = make_store(kind, request, tmp_path)
    service = KvwireService(store, InProcessJobQueue(), settings, make_worker(model, store, codec, settings))
    try:
        for tenant in ("alice", "bob"):
            service.ingest(tenant, token_ids=[t % 128 for t in range(150)], context_id="same-id")
        keys = sorted(store.list_keys(""))
        alice = [k for k in keys if k.startswith("t/alice/")]
        bob = [k for k in keys if k.startswith("t/bob/")]
        shared = [k for k in keys if not k.startswith("t/")]
        assert len(alice) == len(bob) == 1 + 3 * 5  # one manifest, 3 chunks x 5 levels each
        assert shared == [k for k in keys if k.startswith("profiles/")] and len(shared) == 1
        assert service.list_contexts("alice", limit=10) == (["same-id"], None)
        service.delete("bob", "same-id")
        assert service.list_contexts("bob", limit=10) == ([], None)
        assert service.manifest("alice", "same-id").tenant == "alice"
    finally:
        service.close()


def _slot_queue(url: str, namespace: str, *, lease_s: float = 60.0) -> InProcessJobQueue:
    redis = LimitsRedis(url, namespace=namespace)
    return InProcessJobQueue(max_per_tenant=2, slots=SharedJobSlots(redis, 2, lease_s=lease_s))


@pytest.mark.integration
def test_in_process_queues_share_the_per_tenant_job_limit_through_redis(
    tmp_path: Path,
    redis_url: str,  # noqa: F811 - the fixture
) -> None:
    """Server processes that each run their own job queue (a Redis store, no Redis job queue) still
    hold a tenant to one limit between them; a slot is freed when its job ends, or when the process
    holding it dies (its lease is not renewed)."""
    namespace = "slots-" + tmp_path.name[-12:]
    settings = make_settings(tmp_path, max_jobs_per_tenant=2)
    settings.storage.store, settings.storage.redis_url = "redis", redis_url
    built = open_job_queue(settings)
    assert isinstance(built, InProcessJobQueue) and built._slots is not None
    built.close()
    q1, q2 = _slot_queue(redis_url, namespace), _slot_queue(redis_url, namespace, lease_s=0.5)
    alice = IngestRequest(tenant="alice", context_id="c", token_ids=[1])
    try:
        q1.submit(alice)
        q2.submit(alice)
        for q in (q1, q2):
            with pytest.raises(RateLimitError, match="limit 2"):
                q.submit(alice)
        q2.submit(IngestRequest(tenant="bob", context_id="c", token_ids=[1]))  # Bob has his own
        assert q1.process_one(lambda request, progress: None, consumer="t", block_s=1)  # frees a slot
        q2.submit(alice)
        with pytest.raises(RateLimitError):
            q1.submit(alice)
        # q2's process "dies": its renewals stop, and its two slots expire with their leases.
        q2._slots._stop.set()  # type: ignore[union-attr]
        deadline = time.monotonic() + 20
        while True:
            try:
                q1.submit(alice)
                break
            except RateLimitError:
                assert time.monotonic() < deadline, "a dead process's slots were never freed"
                time.sleep(0.1)
    finally:
        q1.close()
        q2.close()


def test_per_tenant_job_limit_is_per_process_while_its_redis_is_down(tmp_path: Path) -> None:
    from ..storage.conftest import free_port

    q = _slot_queue(f"redis://127.0.0.1:{free_port()}/0", "down")
    alice = IngestRequest(tenant="alice", context_id="c", token_ids=[1])
    q.submit(alice)
    q.submit(alice)  # Redis refused the connection: this process's own count decides
    with pytest.raises(RateLimitError, match="limit 2"):
        q.submit(alice)
    assert q._slots is not None and q._slots.redis.degraded
    q.close()
