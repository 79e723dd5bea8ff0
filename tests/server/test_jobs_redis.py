"""The Redis Streams job queue against a real redis-server: sharing, crash recovery, outages."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from kvwire.errors import BackendUnavailableError, InvalidInputError, NotFoundError, RateLimitError
from kvwire.manifest import ContextManifest, Job
from kvwire.server.jobs import IngestRequest, RedisJobQueue
from kvwire.server.rest import create_app
from kvwire.server.service import KvwireService
from kvwire.server.storage import Store

from ..storage.conftest import free_port, redis_server
from .conftest import make_settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis-jobs")) as port:
        yield f"redis://127.0.0.1:{port}/0"


def make_queue(url: str, namespace: str, **kw: Any) -> RedisJobQueue:
    return RedisJobQueue(url, namespace=namespace, **kw)


@pytest.fixture
def namespace() -> str:
    return "t" + uuid.uuid4().hex[:10]


def request(n: int) -> IngestRequest:
    return IngestRequest(tenant="alice", context_id=f"c{n}", token_ids=[n])


def wait(queue: RedisJobQueue, job_id: str, timeout: float = 15.0) -> Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = queue.get(job_id)
        if job.state in ("done", "failed"):
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} not finished: {queue.get(job_id)}")


def test_submit_get_and_counts(redis_url: str, namespace: str) -> None:
    q = make_queue(redis_url, namespace, max_pending=2)
    job = q.submit(request(1))
    assert q.get(job.id) == job and job.state == "queued"
    q.submit(request(2))
    with pytest.raises(RateLimitError):
        q.submit(request(3))
    with pytest.raises(NotFoundError):
        q.get("job-none")
    assert q.counts()["queued"] == 2
    q.health()
    q.close()


def test_jobs_per_tenant_limit(redis_url: str, namespace: str) -> None:
    q = make_queue(redis_url, namespace, max_pending=10, max_per_tenant=2)
    first = q.submit(request(1))
    q.submit(request(2))
    with pytest.raises(RateLimitError, match="limit 2") as info:
        q.submit(request(3))
    assert info.value.retry_after_s >= 1
    assert q.submit(IngestRequest(tenant="bob", context_id="b", token_ids=[1])).tenant == "bob"
    assert q.counts()["queued"] == 3  # the refused job was never queued
    # A finished job (done or failed) frees its tenant's slot.
    assert q.process_one(lambda req, progress: None, consumer="w", block_s=1)
    assert q.get(first.id).state == "done"
    q.submit(request(4))
    with pytest.raises(RateLimitError):
        q.submit(request(5))
    q.close()


def test_two_workers_share_jobs(redis_url: str, namespace: str) -> None:
    producer = make_queue(redis_url, namespace)
    handled: dict[str, list[str]] = {"w1": [], "w2": []}

    def handler_for(name: str) -> Callable[[IngestRequest, Callable[[int, int], None]], None]:
        def handle(req: IngestRequest, progress: Callable[[int, int], None]) -> None:
            progress(0, 2)
            time.sleep(0.05)
            progress(2, 2)
            handled[name].append(req.context_id)

        return handle

    stop = threading.Event()
    workers = [
        threading.Thread(
            target=make_queue(redis_url, namespace).run_worker,
            args=(handler_for(name),),
            kwargs={"consumer": name, "stop": stop},
        )
        for name in handled
    ]
    jobs = [producer.submit(request(n)) for n in range(10)]
    for t in workers:
        t.start()
    try:
        finished = [wait(producer, job.id) for job in jobs]
    finally:
        stop.set()
        for t in workers:
            t.join(timeout=5)
    assert all(j.state == "done" and j.chunks_done == j.chunks_total == 2 for j in finished)
    assert sorted(handled["w1"] + handled["w2"]) == sorted(f"c{n}" for n in range(10))
    assert handled["w1"] and handled["w2"], handled  # both took a share
    assert producer.counts() == {"queued": 0, "running": 0, "done": 10, "failed": 0}


def test_crashed_workers_job_is_reclaimed(redis_url: str, namespace: str) -> None:
    producer = make_queue(redis_url, namespace)
    job = producer.submit(request(1))
    crashed = make_queue(redis_url, namespace, claim_idle_s=0.3)
    entry = crashed._next_entry("crashed", block_s=1.0)  # read, never acknowledged: the worker "died"
    assert entry is not None
    survivor = make_queue(redis_url, namespace, claim_idle_s=0.3)
    seen: list[str] = []
    assert not survivor.process_one(lambda r, p: seen.append(r.context_id), consumer="survivor", block_s=0.1)
    time.sleep(0.4)  # the entry is idle longer than claim_idle_s now
    assert survivor.process_one(lambda r, p: seen.append(r.context_id), consumer="survivor", block_s=0.1)
    assert seen == ["c1"] and producer.get(job.id).state == "done"
    assert producer._r.hget(producer._job_key(job.id), "request") is None  # token ids dropped when done
    assert producer._r.xpending(producer.stream, producer.group)["pending"] == 0


def test_live_worker_keeps_its_claim(redis_url: str, namespace: str) -> None:
    """The heartbeat refreshes the claim, so a slow but alive worker's job is not taken over."""
    producer = make_queue(redis_url, namespace)
    job = producer.submit(request(1))
    slow = make_queue(redis_url, namespace, claim_idle_s=0.3)
    other = make_queue(redis_url, namespace, claim_idle_s=0.3)
    stolen: list[str] = []

    def slow_handler(req: IngestRequest, progress: Callable[[int, int], None]) -> None:
        for _ in range(8):  # 0.8 s without any progress report, claim_idle_s = 0.3
            time.sleep(0.1)
            assert not other.process_one(
                lambda r, p: stolen.append(r.context_id), consumer="other", block_s=0.01
            )

    assert slow.process_one(slow_handler, consumer="slow", block_s=0.5)
    assert stolen == [] and producer.get(job.id).state == "done"


def test_poisoned_job_fails_after_max_deliveries(redis_url: str, namespace: str) -> None:
    producer = make_queue(redis_url, namespace)
    job = producer.submit(request(1))
    for n in range(3):
        q = make_queue(redis_url, namespace, claim_idle_s=0.05, max_deliveries=2)
        assert q._next_entry(f"dies-{n}", block_s=0.2) is not None
        time.sleep(0.1)
    q = make_queue(redis_url, namespace, claim_idle_s=0.05, max_deliveries=2)
    assert q.process_one(lambda r, p: None, consumer="last", block_s=0.2)
    failed = producer.get(job.id)
    assert failed.state == "failed" and failed.error is not None and "too many" in failed.error["message"]


def test_handler_error_fails_job(redis_url: str, namespace: str) -> None:
    q = make_queue(redis_url, namespace)
    job = q.submit(request(1))

    def bad(req: IngestRequest, progress: Callable[[int, int], None]) -> None:
        raise InvalidInputError("token 999 is out of range")

    assert q.process_one(bad, consumer="w", block_s=0.5)
    failed = q.get(job.id)
    assert failed.state == "failed" and failed.error == {
        "type": "InvalidInputError",
        "message": "token 999 is out of range",
    }


def test_queue_down_is_unavailable() -> None:
    q = RedisJobQueue(f"redis://127.0.0.1:{free_port()}/0", connect_timeout_s=0.5)
    with pytest.raises(BackendUnavailableError, match=r"job queue at 127\.0\.0\.1"):
        q.submit(request(1))
    with pytest.raises(BackendUnavailableError):
        q.health()


def test_service_over_redis_queue_end_to_end(
    redis_url: str, namespace: str, store: Store, worker: Any, tmp_path: Path
) -> None:
    """REST submit -> Redis stream -> worker thread (own queue client) -> manifest; outage -> 503."""
    settings = make_settings(tmp_path, jobs_redis_url=redis_url, jobs_namespace=namespace)
    api = KvwireService(store, make_queue(redis_url, namespace), settings, worker=None)
    stop = threading.Event()
    consumer = threading.Thread(
        target=make_queue(redis_url, namespace).run_worker,
        args=(worker.ingest,),
        kwargs={"consumer": "w1", "stop": stop},
    )
    consumer.start()
    headers = {"Authorization": "Bearer alice-key"}
    try:
        with TestClient(create_app(api, settings)) as client:
            r = client.post("/v1/contexts", json={"text": "kv " * 50, "context_id": "e2e"}, headers=headers)
            assert r.status_code == 202, r.text
            job = r.json()
            deadline = time.monotonic() + 20
            while job["state"] not in ("done", "failed") and time.monotonic() < deadline:
                time.sleep(0.05)
                job = client.get(f"/v1/jobs/{job['id']}", headers=headers).json()
            assert job["state"] == "done", job
            manifest = ContextManifest.from_dict(client.get("/v1/contexts/e2e", headers=headers).json())
            assert manifest.total_tokens == 150 and len(manifest.chunks) == 3
            metrics = client.get("/metrics").text
            assert 'kvwire_ingest_jobs{state="done"} 1.0' in metrics
    finally:
        stop.set()
        consumer.join(timeout=5)

    down_settings = make_settings(tmp_path, jobs_redis_url=f"redis://127.0.0.1:{free_port()}/0")
    down = KvwireService(store, RedisJobQueue(down_settings.jobs_redis_url or ""), down_settings, worker=None)
    with TestClient(create_app(down, down_settings)) as client:
        r = client.post("/v1/contexts", json={"token_ids": [1, 2]}, headers=headers)
        assert r.status_code == 503 and r.json()["error"]["type"] == "BackendUnavailableError"
        assert client.get("/readyz").status_code == 503
    assert isinstance(api.ingest("alice", token_ids=[1]), Job)
