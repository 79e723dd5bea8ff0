"""A worker process consuming the Redis Streams job queue is killed (SIGKILL) in the middle of a job.

The job must not be lost: its stream entry stays pending (``XPENDING``) under the dead consumer, and
another worker takes it over with ``XAUTOCLAIM`` once it has been idle ``claim_idle_s`` (the dead
worker's heartbeat stopped) and finishes it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.processes import RedisProcess, wait_until
from kvwire.manifest import Job
from kvwire.server.jobs import IngestRequest, RedisJobQueue
from kvwire.server.storage import LocalStore

from ..server.conftest import FakeCodec, make_settings, make_worker
from .conftest import check_manifests

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CHUNKS = 6
TOKENS = [(i * 13) % 120 + 1 for i in range(64 * CHUNKS)]

# The doomed worker: a tiny model and a codec slowed to 0.1 s per encode (30 encodes: 3 s per job),
# so that the kill lands in the middle of the job.
WORKER_SCRIPT = """
import sys, threading, time
from pathlib import Path
from kvwire.server.jobs import RedisJobQueue
from kvwire.server.storage import LocalStore
from tests.server.conftest import FakeCodec, make_settings, make_worker, tiny_llama

class SlowCodec(FakeCodec):
    def encode(self, *args, **kwargs):
        time.sleep(0.1)
        return super().encode(*args, **kwargs)

url, namespace, store_dir = sys.argv[1:4]
settings = make_settings(Path(store_dir))
worker = make_worker(tiny_llama(), LocalStore(store_dir), SlowCodec(), settings)
queue = RedisJobQueue(url, namespace=namespace, claim_idle_s=1.0)
queue.run_worker(worker.ingest, consumer="doomed", stop=threading.Event())
"""


@pytest.fixture
def doomed_worker(tmp_path: Path, redis_proc: RedisProcess) -> Iterator[subprocess.Popen[bytes]]:
    script = tmp_path / "doomed_worker.py"
    script.write_text(WORKER_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    log = open(tmp_path / "doomed.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, str(script), redis_proc.url, "faults", str(tmp_path / "store")],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=REPO,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_worker_killed_mid_job(
    tmp_path: Path, model: Any, redis_proc: RedisProcess, doomed_worker: subprocess.Popen[bytes]
) -> None:
    """The job is redelivered and finished. (A job delivered more than ``max_deliveries`` times is
    failed instead: tests/server/test_jobs_redis.py.)"""
    queue = RedisJobQueue(redis_proc.url, namespace="faults", claim_idle_s=1.0, max_deliveries=3)
    job = queue.submit(IngestRequest(tenant="alice", context_id="doc", token_ids=TOKENS))
    running: Job = wait_until(
        lambda: (j := queue.get(job.id)).state == "running" and j.chunks_done >= 2 and j, 60, "job progress"
    )
    doomed_worker.kill()  # SIGKILL mid-job: no cleanup, no XACK
    doomed_worker.wait()
    pending = queue._r.xpending_range(queue.stream, queue.group, min="-", max="+", count=10)
    assert [(p["consumer"], p["times_delivered"]) for p in pending] == [(b"doomed", 1)]
    assert queue.get(job.id).state == "running"  # not lost, not finished

    store = LocalStore(tmp_path / "store")
    codec = FakeCodec()
    survivor = make_worker(model, store, codec, make_settings(tmp_path))
    stop = threading.Event()
    thread = threading.Thread(
        target=queue.run_worker, args=(survivor.ingest,), kwargs={"consumer": "survivor", "stop": stop}
    )
    thread.start()
    try:
        finished = wait_until(
            lambda: (j := queue.get(job.id)).state in ("done", "failed") and j, 30, "the taken-over job"
        )
    finally:
        stop.set()
        thread.join(timeout=10)
    assert queue._r.xpending(queue.stream, queue.group)["pending"] == 0
    assert finished.state == "done" and finished.chunks_done == CHUNKS
    # Chunks the doomed worker stored are reused (content-addressed), not encoded again.
    assert codec.calls <= (CHUNKS - running.chunks_done) * len(codec.levels)
    assert [m.context_id for m in check_manifests(store)] == ["doc"]
    assert queue.counts()["running"] == 0
    queue.close()
