"""Ingest jobs: one :class:`JobQueue` interface, an in-process queue and a Redis Streams queue.

A job carries an :class:`IngestRequest` from the API to a worker and reports its progress back.
States go ``queued -> running -> done | failed``; ``chunks_done / chunks_total`` count encoded
chunks. The Redis queue lets N worker processes share the load through one consumer group; see
docs/service.md, "Jobs".
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

from kvwire.errors import BackendUnavailableError, KvwireError, NotFoundError, RateLimitError
from kvwire.manifest import JOB_STATES, Job
from kvwire.server.limits import SharedJobSlots

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestRequest:
    """What to ingest: exactly one of ``text`` / ``token_ids``, for ``tenant``, under ``context_id``."""

    tenant: str
    context_id: str
    text: str | None = None
    token_ids: list[int] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, data: str | bytes) -> IngestRequest:
        return cls(**json.loads(data))


#: Runs one request; calls ``progress(chunks_done, chunks_total)`` as it goes.
JobHandler = Callable[[IngestRequest, Callable[[int, int], None]], object]


def _tenant_limit_message(active: int, limit: int) -> str:
    return f"{active} of this tenant's ingest jobs are queued or running (limit {limit}); retry later"


def new_job_id() -> str:
    return "job-" + uuid.uuid4().hex


def error_dict(exc: BaseException) -> dict[str, str]:
    """The ``{"type", "message"}`` of a failed job; unexpected exceptions do not leak their text."""
    if isinstance(exc, KvwireError):
        return {"type": type(exc).__name__, "message": str(exc)}
    return {"type": "InternalError", "message": f"ingest failed ({type(exc).__name__}); see worker logs"}


class JobQueue(ABC):
    """Submit ingest jobs, read their state, and (worker side) process them one by one."""

    @abstractmethod
    def submit(self, request: IngestRequest) -> Job:
        """Queue ``request``; raise ``RateLimitError`` if too many jobs are pending in all, or
        ``max_per_tenant`` of the request's tenant are queued or running."""

    @abstractmethod
    def get(self, job_id: str) -> Job:
        """The job's current state; ``NotFoundError`` if unknown (or expired)."""

    @abstractmethod
    def process_one(self, handler: JobHandler, *, consumer: str, block_s: float = 1.0) -> bool:
        """Take one job (waiting up to ``block_s``), run ``handler`` on it, record the outcome.

        Returns whether a job was processed. A handler exception fails the job, never the caller.
        """

    @abstractmethod
    def counts(self) -> dict[str, int]:
        """Jobs per state known to the queue (for metrics)."""

    def health(self) -> None:  # noqa: B027 - the in-process queue is always healthy
        """Return if the queue backend answers; raise ``BackendUnavailableError`` otherwise."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; stop nothing else."""

    def run_worker(self, handler: JobHandler, *, consumer: str, stop: threading.Event) -> None:
        """Process jobs until ``stop`` is set. Backend outages are retried after a pause."""
        while not stop.is_set():
            try:
                self.process_one(handler, consumer=consumer, block_s=0.2)
            except BackendUnavailableError:
                stop.wait(1.0)


# ------------------------------------------------------------------------------------- in-process


class InProcessJobQueue(JobQueue):
    """The embedded default: a thread-safe queue in this process (jobs are lost on restart).

    With ``slots`` (a Redis configured, several server processes), a tenant's unfinished jobs are
    counted across every process sharing that Redis; otherwise in this process only.
    """

    def __init__(
        self,
        *,
        max_pending: int = 1000,
        max_per_tenant: int = 100,
        keep_finished: int = 10000,
        slots: SharedJobSlots | None = None,
    ):
        self._slots = slots
        self._queue: queue.Queue[tuple[str, IngestRequest]] = queue.Queue()
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._max_pending = max_pending
        self._max_per_tenant = max_per_tenant
        self._keep_finished = keep_finished

    def submit(self, request: IngestRequest) -> Job:
        with self._lock:
            active = [j for j in self._jobs.values() if j.state in ("queued", "running")]
            if len(active) >= self._max_pending:
                raise RateLimitError(f"{len(active)} ingest jobs are pending; retry later")
            mine = sum(1 for j in active if j.tenant == request.tenant)
            if mine >= self._max_per_tenant:
                raise self._tenant_full(mine)
            job = Job(id=new_job_id(), tenant=request.tenant, context_id=request.context_id)
            if self._slots is not None:  # every process's jobs (Redis down: the count above decides)
                self._slots.reserve(request.tenant, job.id, self._tenant_full)
            self._jobs[job.id] = job
            self._forget_old()
        self._queue.put((job.id, request))
        return Job(**job.to_dict())

    def _tenant_full(self, active: int) -> RateLimitError:
        return RateLimitError(_tenant_limit_message(active, self._max_per_tenant), retry_after_s=10)

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise NotFoundError(f"no job {job_id!r}")
            return Job(**job.to_dict())

    def counts(self) -> dict[str, int]:
        with self._lock:
            out: dict[str, int] = dict.fromkeys(JOB_STATES, 0)
            for job in self._jobs.values():
                out[job.state] += 1
            return out

    def process_one(self, handler: JobHandler, *, consumer: str, block_s: float = 1.0) -> bool:
        try:
            job_id, request = self._queue.get(timeout=block_s)
        except queue.Empty:
            return False
        self._update(job_id, state="running")

        def progress(done: int, total: int) -> None:
            self._update(job_id, chunks_done=done, chunks_total=total)

        try:
            handler(request, progress)
        except Exception as exc:
            self._update(job_id, state="failed", error=error_dict(exc))
        else:
            self._update(job_id, state="done")
        finally:
            if self._slots is not None:
                self._slots.release(request.tenant, job_id)
        return True

    def close(self) -> None:
        if self._slots is not None:
            self._slots.close()

    def _update(self, job_id: str, **changes: Any) -> None:
        with self._lock:
            job = self._jobs[job_id]
            for name, value in changes.items():
                setattr(job, name, value)
            job.updated_at = time.time()

    def _forget_old(self) -> None:
        finished = [j for j in self._jobs.values() if j.state in ("done", "failed")]
        excess = len(finished) - self._keep_finished
        for job in sorted(finished, key=lambda j: j.updated_at)[: max(0, excess)]:
            del self._jobs[job.id]


# ---------------------------------------------------------------------------------- Redis Streams


class RedisJobQueue(JobQueue):
    """Jobs through a Redis Stream read by one consumer group, so N workers share the load.

    Layout (namespace ``ns``): stream ``ns:jobs:stream`` (entries ``{job: <id>}``), consumer group
    ``ns:workers``, job hash ``ns:jobs:<id>`` (state, progress, request JSON, error), counter hash
    ``ns:jobs:counts``, and per tenant the sorted set ``ns:jobs:active:<tenant>`` of its unfinished
    job ids scored by submit time (for the per-tenant limit; members older than the job TTL are
    dropped). A worker takes new entries with ``XREADGROUP`` and acknowledges with ``XACK`` only after
    the job's outcome is recorded. Before reading new entries it runs ``XAUTOCLAIM`` for
    entries idle longer than ``claim_idle_s``, so a job whose worker crashed is taken over; a live
    worker's heartbeat thread refreshes its claim (``XCLAIM`` to itself) every ``claim_idle_s / 4``
    while the job runs. A job delivered
    ``max_deliveries`` times without finishing is marked failed.
    """

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "kvwire",
        claim_idle_s: float = 60.0,
        max_deliveries: int = 3,
        max_pending: int = 1000,
        max_per_tenant: int = 100,
        job_ttl_s: float = 7 * 24 * 3600.0,
        socket_timeout_s: float = 5.0,
        connect_timeout_s: float = 2.0,
    ):
        import redis

        self._redis_errors: tuple[type[BaseException], ...] = (redis.ConnectionError, redis.TimeoutError)
        self._response_error = redis.ResponseError
        parts = urlsplit(url)  # name the server, never the password
        self.name = f"redis job queue at {parts.hostname or '127.0.0.1'}:{parts.port or 6379}"
        self._r = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout_s + 1.0,  # XREADGROUP BLOCK must outlast its block time
            socket_connect_timeout=connect_timeout_s,
            retry_on_timeout=False,
        )
        self.stream = f"{namespace}:jobs:stream"
        self.group = f"{namespace}:workers"
        self._prefix = f"{namespace}:jobs:"
        self._counts_key = f"{namespace}:jobs:counts"
        self.claim_idle_ms = int(claim_idle_s * 1000)
        self.max_deliveries = max_deliveries
        self.max_pending = max_pending
        self.max_per_tenant = max_per_tenant
        self.job_ttl_ms = int(job_ttl_s * 1000)
        self._group_ready = False

    # -- plumbing

    def _call(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except self._redis_errors as exc:
            raise BackendUnavailableError(f"{self.name}: {type(exc).__name__}: {exc}") from exc

    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            self._call(lambda: self._r.xgroup_create(self.stream, self.group, id="0", mkstream=True))
        except self._response_error as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def _job_key(self, job_id: str) -> str:
        return self._prefix + job_id

    def _active_key(self, tenant: str) -> str:
        return f"{self._prefix}active:{tenant}"

    def _reserve_tenant_slot(self, tenant: str, job_id: str) -> None:
        """Count ``job_id`` among ``tenant``'s unfinished jobs, or raise if that would pass the limit.

        Add-then-count in one transaction: racing submits may both be refused, never both admitted
        past the limit.
        """
        key, now = self._active_key(tenant), time.time()
        pipe = self._r.pipeline(transaction=True)
        pipe.zremrangebyscore(key, "-inf", now - self.job_ttl_ms / 1000)
        pipe.zadd(key, {job_id: now})
        pipe.zcard(key)
        pipe.pexpire(key, self.job_ttl_ms)
        active = int(self._call(pipe.execute)[2])
        if active > self.max_per_tenant:
            self._call(lambda: self._r.zrem(key, job_id))
            raise RateLimitError(_tenant_limit_message(active - 1, self.max_per_tenant), retry_after_s=10)

    def _set(self, job_id: str, state_change: tuple[str, str] | None = None, **fields: Any) -> None:
        """Update the job hash (and the per-state counters when the state changes) in one transaction."""
        mapping: dict[Any, Any] = {k: json.dumps(v) for k, v in fields.items()}
        mapping["updated_at"] = json.dumps(time.time())
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(self._job_key(job_id), mapping=mapping)
        pipe.pexpire(self._job_key(job_id), self.job_ttl_ms)
        if state_change is not None:
            old, new = state_change
            pipe.hincrby(self._counts_key, old, -1)
            pipe.hincrby(self._counts_key, new, 1)
        self._call(pipe.execute)

    # -- API side

    def submit(self, request: IngestRequest) -> Job:
        self._ensure_group()
        pending = int(self._call(lambda: self._r.hget(self._counts_key, "queued")) or 0)
        if pending >= self.max_pending:
            raise RateLimitError(f"{pending} ingest jobs are queued; retry later")
        job = Job(id=new_job_id(), tenant=request.tenant, context_id=request.context_id)
        self._reserve_tenant_slot(request.tenant, job.id)
        fields: dict[Any, Any] = {k: json.dumps(v) for k, v in job.to_dict().items()}
        fields["request"] = request.to_json()
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(self._job_key(job.id), mapping=fields)
        pipe.pexpire(self._job_key(job.id), self.job_ttl_ms)
        pipe.hincrby(self._counts_key, "queued", 1)
        pipe.xadd(self.stream, {"job": job.id})
        self._call(pipe.execute)
        return job

    def get(self, job_id: str) -> Job:
        raw = self._call(lambda: self._r.hgetall(self._job_key(job_id)))
        if not raw:
            raise NotFoundError(f"no job {job_id!r}")
        values = {k.decode(): v for k, v in raw.items() if k != b"request"}
        return Job(**{k: json.loads(v) for k, v in values.items()})

    def counts(self) -> dict[str, int]:
        raw = self._call(lambda: self._r.hgetall(self._counts_key))
        out: dict[str, int] = dict.fromkeys(JOB_STATES, 0)
        for k, v in raw.items():
            if k.decode() in out:
                out[k.decode()] = max(0, int(v))
        return out

    def health(self) -> None:
        self._call(self._r.ping)

    def close(self) -> None:
        self._r.close()

    # -- worker side

    def _next_entry(self, consumer: str, block_s: float) -> tuple[bytes, bytes] | None:
        """``(entry id, job id)`` of a stale pending entry (reclaimed) or else a new one."""
        self._ensure_group()
        claimed = self._call(
            lambda: self._r.xautoclaim(
                self.stream, self.group, consumer, self.claim_idle_ms, start_id="0-0", count=1
            )
        )
        entries = claimed[1] if claimed else []
        if entries and entries[0] and entries[0][1]:
            entry_id, data = entries[0]
            return entry_id, data[b"job"]
        read = self._call(
            lambda: self._r.xreadgroup(
                self.group, consumer, {self.stream: ">"}, count=1, block=max(1, int(block_s * 1000))
            )
        )
        if not read:
            return None
        entry_id, data = read[0][1][0]
        return entry_id, data[b"job"]

    def _deliveries(self, entry_id: bytes) -> int:
        info = self._call(
            lambda: self._r.xpending_range(self.stream, self.group, min=entry_id, max=entry_id, count=1)
        )
        return int(info[0]["times_delivered"]) if info else 1

    def _finish(self, entry_id: bytes, job_id: str | None = None, tenant: str | None = None) -> None:
        """Acknowledge and drop the stream entry; the finished job's request (token ids) is dropped
        too, and the job no longer counts against its tenant's limit."""
        pipe = self._r.pipeline(transaction=True)
        if job_id is not None:
            pipe.hdel(self._job_key(job_id), "request")
            if tenant is not None:
                pipe.zrem(self._active_key(tenant), job_id)
        pipe.xack(self.stream, self.group, entry_id)
        pipe.xdel(self.stream, entry_id)
        self._call(pipe.execute)

    def process_one(self, handler: JobHandler, *, consumer: str, block_s: float = 1.0) -> bool:
        got = self._next_entry(consumer, block_s)
        if got is None:
            return False
        entry_id, job_bytes = got
        job_id = job_bytes.decode()
        raw = self._call(lambda: self._r.hmget(self._job_key(job_id), ["request", "state"]))
        if raw[0] is None:  # job record expired or deleted: nothing to do
            self._finish(entry_id)
            return True
        request = IngestRequest.from_json(raw[0])
        old_state = json.loads(raw[1])
        if old_state in ("done", "failed"):  # finished, but the worker died before XACK
            self._finish(entry_id, job_id, request.tenant)
            return True
        if self._deliveries(entry_id) > self.max_deliveries:
            err = {"type": "InternalError", "message": "job abandoned by workers too many times"}
            self._set(job_id, (old_state, "failed"), state="failed", error=err)
            self._finish(entry_id, job_id, request.tenant)
            return True
        self._set(job_id, (old_state, "running") if old_state != "running" else None, state="running")

        def progress(done: int, total: int) -> None:
            self._set(job_id, chunks_done=done, chunks_total=total)

        stop_heartbeat = threading.Event()
        heartbeat = threading.Thread(
            target=self._heartbeat,
            args=(entry_id, consumer, stop_heartbeat),
            name=f"kvwire-heartbeat-{job_id}",
            daemon=True,
        )
        heartbeat.start()
        try:
            handler(request, progress)
        except Exception as exc:
            if isinstance(exc, BackendUnavailableError):
                raise  # leave the entry pending: another attempt (here or elsewhere) may succeed
            self._set(job_id, ("running", "failed"), state="failed", error=error_dict(exc))
        else:
            self._set(job_id, ("running", "done"), state="done")
        finally:
            stop_heartbeat.set()
            heartbeat.join()
        self._finish(entry_id, job_id, request.tenant)
        return True

    def _heartbeat(self, entry_id: bytes, consumer: str, stop: threading.Event) -> None:
        """Refresh our claim on ``entry_id`` (``XCLAIM`` to ourselves resets its idle time) until ``stop``.

        Runs beside the handler, so a job stays ours through a long prefill that reports no progress;
        when the worker process dies, the heartbeat dies with it and ``XAUTOCLAIM`` elsewhere takes over.
        """
        interval = max(0.02, self.claim_idle_ms / 1000 / 4)
        while not stop.wait(interval):
            try:
                self._r.xclaim(self.stream, self.group, consumer, 0, [entry_id], justid=True)
            except self._redis_errors as exc:  # the next beat may get through; the job goes on
                log.warning("heartbeat for %s failed: %s", entry_id, exc)
