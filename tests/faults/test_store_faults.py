"""A storage backend killed in the middle of an ingest: nothing half-published, clean failure, recovery.

The kill is deterministic: a hook on the store runs it just before the worker writes chunk 3 of 6
(chunks 0-1 are stored, the manifest is not). Afterwards every manifest in the store must point at
existing chunks, the ingest must have failed with ``BackendUnavailableError`` naming the backend (or
have been retried to completion), and once the backend is back a re-ingest must succeed, encoding only
the chunks that were not stored before the kill.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks.processes import MotoProcess, ProxyProcess, RedisProcess, wait_until
from kvwire.errors import BackendUnavailableError
from kvwire.manifest import ContextManifest, Job
from kvwire.server.jobs import InProcessJobQueue, RedisJobQueue
from kvwire.server.service import KvwireService, Worker
from kvwire.server.storage import Store, TieredStore

from ..server.conftest import FakeCodec, make_settings, make_worker
from .conftest import check_manifests, on_nth_put, redis_store, s3_store

pytestmark = pytest.mark.integration

CHUNKS = 6
TEXT = "".join(chr(33 + (i * 7) % 90) for i in range(64 * CHUNKS))  # 6 chunks of 64 characters
LEVELS = len(FakeCodec.levels)


def worker_for(model: Any, store: Store, tmp_path: Path) -> tuple[Worker, FakeCodec]:
    codec = FakeCodec()
    return make_worker(model, store, codec, make_settings(tmp_path)), codec


def wait_job(service: KvwireService, job: Job, timeout_s: float = 30.0) -> Job:
    """Poll until the job finishes; a queue that is down meanwhile is polled again (as a client would)."""

    def finished() -> Job | None:
        try:
            j = service.job(job.tenant, job.id)
        except BackendUnavailableError:
            return None
        return j if j.state in ("done", "failed") else None

    return wait_until(finished, timeout_s, f"job {job.id}")


def assert_reingest_reuses(worker: Worker, codec: FakeCodec, store: Store, stored_chunks: int) -> None:
    """Re-ingest ``TEXT``: only the chunks not stored before the fault are encoded again."""
    codec.calls = 0
    manifest = worker.ingest_text("alice", "doc")
    assert codec.calls == (CHUNKS - stored_chunks) * LEVELS
    assert [m.context_id for m in check_manifests(store)] == ["doc"]
    for chunk in manifest.chunks:  # what the manifest promises is what is stored
        for entry in chunk.levels:
            assert len(store.get(entry.key)) == entry.nbytes


@pytest.fixture(autouse=True)
def _ingest_text_helper(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvwire.server.jobs import IngestRequest

    def ingest_text(self: Worker, tenant: str, context_id: str) -> ContextManifest:
        return self.ingest(IngestRequest(tenant=tenant, context_id=context_id, token_ids=self.tokenize(TEXT)))

    monkeypatch.setattr(Worker, "ingest_text", ingest_text, raising=False)


# --------------------------------------------------------------------------------------------- redis


def test_redis_killed_mid_ingest_fails_the_job_then_recovers(
    tmp_path: Path, model: Any, redis_proc: RedisProcess
) -> None:
    store = redis_store(redis_proc.url)
    worker, codec = worker_for(model, store, tmp_path)
    settings = make_settings(tmp_path, inline_max_tokens=16)  # TEXT goes through the job queue
    service = KvwireService(store, InProcessJobQueue(), settings, worker)
    service.start_workers()
    try:
        on_nth_put(store, 3, redis_proc.kill)
        job = service.ingest("alice", text=TEXT, context_id="doc")
        assert isinstance(job, Job)
        failed = wait_job(service, job)
        assert failed.state == "failed" and failed.error is not None
        assert failed.error["type"] == "BackendUnavailableError"
        assert f"redis at 127.0.0.1:{redis_proc.port}" in failed.error["message"]
        assert failed.chunks_done == 2 and failed.chunks_total == CHUNKS

        redis_proc.start()  # same port, data back from the AOF
        assert check_manifests(store) == []  # the failed ingest published nothing
        assert len(list(store.list_keys("t/alice/chunks"))) == 2 * LEVELS
        codec.calls = 0
        done = wait_job(service, service.ingest("alice", text=TEXT, context_id="doc"))  # type: ignore[arg-type]
        assert done.state == "done", done.error
        assert codec.calls == (CHUNKS - 2) * LEVELS  # chunks 0-1 were reused
        assert [m.context_id for m in check_manifests(store)] == ["doc"]
    finally:
        service.close()


@pytest.mark.parametrize("shared", [False, True], ids=["queue-elsewhere", "queue-on-same-redis"])
def test_redis_killed_mid_job_is_retried_to_completion(
    tmp_path: Path, model: Any, redis_proc: RedisProcess, shared: bool
) -> None:
    """Redis Streams queue: the store (and, shared, the queue too) dies mid-job and comes back 1 s later;
    the entry stays pending, is claimed again and the job finishes without a second submit."""
    jobs_redis = redis_proc if shared else RedisProcess(tmp_path / "jobs-redis", persist=True)
    if not shared:
        jobs_redis.start()
    store = redis_store(redis_proc.url)
    worker, codec = worker_for(model, store, tmp_path)
    queue = RedisJobQueue(jobs_redis.url, namespace="faults", claim_idle_s=0.5, max_deliveries=5)
    service = KvwireService(store, queue, make_settings(tmp_path, inline_max_tokens=16), worker)

    def outage() -> None:
        redis_proc.kill()
        threading.Timer(1.0, redis_proc.start).start()

    on_nth_put(store, 3, outage)
    service.start_workers()
    try:
        job = service.ingest("alice", text=TEXT, context_id="doc")
        assert isinstance(job, Job)
        done = wait_job(service, job, timeout_s=40)
        assert done.state == "done", done.error
        # Chunks 0-1 were stored before the outage and not encoded again; only chunk 2, whose write
        # failed, was encoded twice.
        assert codec.calls == (CHUNKS + 1) * LEVELS
        assert [m.context_id for m in check_manifests(store)] == ["doc"]
        assert queue._r.xpending(queue.stream, queue.group)["pending"] == 0
    finally:
        service.close()
        if not shared:
            jobs_redis.kill()


# ------------------------------------------------------------------------------------------------ S3


def test_s3_unreachable_mid_ingest_then_recovers(
    tmp_path: Path, model: Any, moto_proc: MotoProcess, s3_proxy: ProxyProcess
) -> None:
    """The object store goes away (its proxy is killed: connections reset, objects kept)."""
    store = s3_store(s3_proxy.endpoint)
    worker, codec = worker_for(model, store, tmp_path)
    on_nth_put(store, 3, s3_proxy.kill)
    started = time.monotonic()
    with pytest.raises(BackendUnavailableError, match="s3 bucket 'kvwire-faults'"):
        worker.ingest_text("alice", "doc")
    assert time.monotonic() - started < 20  # connect timeout x retries, not forever
    s3_proxy.start()
    assert check_manifests(store) == []
    assert_reingest_reuses(worker, codec, store, stored_chunks=2)
    store.close()


def test_s3_server_killed_mid_ingest_then_recovers_empty(
    tmp_path: Path, model: Any, moto_proc: MotoProcess
) -> None:
    """moto itself is killed (it keeps objects in memory, so everything is lost, profile included):
    the ingest fails cleanly and, once a fresh server is up, a re-ingest stores a complete context."""
    store = s3_store(moto_proc.endpoint)
    worker, codec = worker_for(model, store, tmp_path)
    on_nth_put(store, 3, moto_proc.kill)
    with pytest.raises(BackendUnavailableError, match="s3 bucket 'kvwire-faults'"):
        worker.ingest_text("alice", "doc")
    moto_proc.start()
    s3_store(moto_proc.endpoint).close()  # recreates the bucket
    assert check_manifests(store) == []
    assert_reingest_reuses(worker, codec, store, stored_chunks=0)  # also checks the profile is there
    store.close()


# -------------------------------------------------------------------------------------------- tiered


def test_tiered_hot_killed_mid_ingest_completes_on_cold(
    tmp_path: Path, model: Any, redis_proc: RedisProcess, moto_proc: MotoProcess
) -> None:
    """The hot tier is a cache: losing it mid-ingest slows the ingest, never fails or corrupts it."""
    cold = s3_store(moto_proc.endpoint)
    store = TieredStore(redis_store(redis_proc.url), cold, hot_ttl_s=60)
    worker, _ = worker_for(model, store, tmp_path)
    on_nth_put(store, 3, redis_proc.kill)
    manifest = worker.ingest_text("alice", "doc")
    assert [m.context_id for m in check_manifests(cold)] == ["doc"]  # durable in cold alone
    entry = manifest.chunks[-1].levels[0]
    assert len(store.get(entry.key)) == entry.nbytes  # reads go on with hot down
    redis_proc.start()
    assert len(store.get(entry.key)) == entry.nbytes
    store.close()


def test_tiered_cold_unreachable_mid_ingest_then_recovers(
    tmp_path: Path, model: Any, redis_proc: RedisProcess, moto_proc: MotoProcess, s3_proxy: ProxyProcess
) -> None:
    cold = s3_store(s3_proxy.endpoint)
    store = TieredStore(redis_store(redis_proc.url), cold, hot_ttl_s=60)
    worker, codec = worker_for(model, store, tmp_path)
    on_nth_put(store, 3, s3_proxy.kill)
    with pytest.raises(BackendUnavailableError, match="s3 bucket"):
        worker.ingest_text("alice", "doc")
    s3_proxy.start()
    assert check_manifests(cold) == [] and check_manifests(store) == []
    assert_reingest_reuses(worker, codec, store, stored_chunks=2)
    assert [m.context_id for m in check_manifests(cold)] == ["doc"]
    store.close()
