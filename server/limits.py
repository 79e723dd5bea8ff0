"""Limits shared by every server process of a deployment through one Redis: per-key rate limits and
per-tenant job slots.

Several ``kvwire serve`` processes (replicas, or ``--workers``) must together allow what one would, so
when a Redis is configured (:func:`shared_limits_redis`) the state of each limit lives there and is
changed by one atomic Lua script per request. Without a Redis, each process keeps its own.

If that Redis fails or does not answer within ``limits_redis_timeout_s``, the limits fail *open to the
process*: each process judges requests by its own in-memory state (so N processes allow at most N
times a limit) and skips Redis for ``limits_redis_retry_s`` before trying again. The choice: a limiter
that fails closed would turn an outage of its Redis into an outage of the whole API (reads from S3 or
local disk included), and one that fails fully open would drop every limit; this keeps the limits,
loosened by the replica count, for the length of the outage. docs/reliability.md, "Security".
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import token_bucket

from kvwire.errors import RateLimitError
from kvwire.server.config import ServiceSettings

log = logging.getLogger(__name__)


def shared_limits_redis(settings: ServiceSettings) -> tuple[str, str, bool] | None:
    """``(url, namespace, cluster)`` of the Redis holding the shared limits, or None (per process).

    The explicit ``limits_redis_url``, else the job queue's Redis, else the store's (``redis``,
    ``redis-cluster``, or the hot tier of ``tiered``); None when there is none or ``limits_shared``
    is off.
    """
    if not settings.limits_shared:
        return None
    if settings.limits_redis_url:
        return settings.limits_redis_url, settings.jobs_namespace, False
    if settings.jobs_redis_url:
        return settings.jobs_redis_url, settings.jobs_namespace, False
    storage = settings.storage
    kind = storage.tiered_hot if storage.store == "tiered" else storage.store
    if kind in ("redis", "redis-cluster"):
        return storage.redis_url, storage.redis_namespace, kind == "redis-cluster"
    return None


def open_limits_redis(settings: ServiceSettings) -> LimitsRedis | None:
    """A :class:`LimitsRedis` on :func:`shared_limits_redis`, or None when limits are per process."""
    shared = shared_limits_redis(settings)
    if shared is None:
        return None
    url, namespace, cluster = shared
    return LimitsRedis(
        url,
        namespace=namespace,
        cluster=cluster,
        timeout_s=settings.limits_redis_timeout_s,
        retry_s=settings.limits_redis_retry_s,
    )


class LimitsRedis:
    """A Redis connection for shared limits that fails open: :meth:`run` returns None when Redis errs.

    Connects on first use (a Redis down at start-up is an outage like any other), with short timeouts
    and no redis-py retries; after a failure, :meth:`run` returns None at once for ``retry_s``.
    """

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "kvwire",
        cluster: bool = False,
        timeout_s: float = 0.5,
        retry_s: float = 5.0,
    ):
        import redis
        from redis.exceptions import RedisClusterException

        self.namespace = namespace
        self.retry_s = retry_s
        parts = urlsplit(url)  # name the server, never the password
        self.name = f"limits redis at {parts.hostname or '127.0.0.1'}:{parts.port or 6379}"
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, RedisClusterException, OSError)
        self._url, self._cluster, self._timeout_s = url, cluster, timeout_s
        self._client: Any = None
        self._scripts: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._skip_until = 0.0  # monotonic; while in the future, Redis is not asked

    @property
    def degraded(self) -> bool:
        """Whether Redis failed within the last ``retry_s`` (limits are per process meanwhile)."""
        return time.monotonic() < self._skip_until

    def run(self, lua: str, keys: list[str], args: list[Any]) -> Any:
        """The result of script ``lua`` on ``keys``/``args``, or None if Redis failed (now or lately)."""
        if self.degraded:
            return None
        try:
            return self._script(lua)(keys=keys, args=args)
        except self._errors as exc:
            with self._lock:
                was_up = not self.degraded
                self._skip_until = time.monotonic() + self.retry_s
            if was_up:
                log.warning(
                    "%s failed (%s: %s): limits are per process for the next %g s",
                    self.name,
                    type(exc).__name__,
                    exc,
                    self.retry_s,
                )
            return None

    def _script(self, lua: str) -> Any:
        script = self._scripts.get(lua)
        if script is not None:
            return script
        with self._lock:
            if self._client is None:
                import redis
                from redis.backoff import NoBackoff
                from redis.cluster import RedisCluster
                from redis.retry import Retry

                options: dict[str, Any] = {
                    "socket_timeout": self._timeout_s,
                    "socket_connect_timeout": self._timeout_s,
                    # No retries (redis-py's default backs off for up to 10 s): the fallback decides.
                    "retry": Retry(NoBackoff(), 0),
                }
                if self._cluster:  # discovers the nodes now: may raise, like any call
                    self._client = RedisCluster.from_url(self._url, **options)
                else:
                    self._client = redis.Redis.from_url(self._url, **options)
            # register_script runs EVALSHA, and loads the script again after a Redis restart.
            return self._scripts.setdefault(lua, self._client.register_script(lua))

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


# ------------------------------------------------------------------------------------- rate limits


def _refusal(rate_per_s: float, burst: int, tokens: float, what: str) -> RateLimitError:
    """The 429 for a bucket holding ``tokens`` (< 1): retry once a whole token has refilled."""
    retry_after_s = max(1, math.ceil(max(0.0, 1.0 - tokens) / rate_per_s))
    return RateLimitError(
        f"rate limit of {rate_per_s:g} requests/s (burst {burst}) exceeded for {what}; "
        f"retry in {retry_after_s} s",
        retry_after_s=retry_after_s,
    )


class RateLimiter:
    """A token bucket per key in this process (``token_bucket.Limiter``): ``rate_per_s`` refill,
    ``burst`` capacity."""

    def __init__(self, rate_per_s: float, burst: int):
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._storage = token_bucket.MemoryStorage()
        self._limiter = token_bucket.Limiter(rate_per_s, burst, self._storage)

    def consume(self, key: str) -> bool:
        """Take one token from ``key``'s bucket if it has one; whether it had."""
        return bool(self._limiter.consume(key))

    def take(self, key: str, what: str) -> None:
        """Take one token from ``key``'s bucket or raise ``RateLimitError`` with ``retry_after_s``."""
        if not self.consume(key):
            raise _refusal(self.rate_per_s, self.burst, self._storage.get_token_count(key), what)

    def close(self) -> None:  # nothing to release
        pass


# One bucket per hash key: refill by the time elapsed (Redis' clock, so every server agrees), take a
# token if there is one, store, and expire the hash once it would be full again anyway. Atomic: two
# servers can never both take the last token. Returns {1 if taken else 0, tokens left as a string}
# (Lua numbers become Redis integers on return, which would truncate the fraction).
TOKEN_BUCKET_LUA = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local tokens = burst
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
if bucket[1] and bucket[2] then
  tokens = tonumber(bucket[1])
  local elapsed = now - tonumber(bucket[2])
  if elapsed > 0 then
    tokens = math.min(burst, tokens + elapsed * rate)
  end
end
local taken = 0
if tokens >= 1 then
  tokens = tokens - 1
  taken = 1
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens), 'ts', string.format('%.6f', now))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {taken, string.format('%.6f', tokens)}
"""


class RedisRateLimiter:
    """Token buckets in Redis, one per key under ``<namespace>:ratelimit:<id>``, shared by every
    process naming the same Redis and namespace (``id`` is derived from the key's hash: neither the
    key nor its stored hash appears in Redis).

    Redis down: ``fallback`` (this process's buckets) decides. It is also charged for every request
    Redis admits, so it holds this process's share of the burst when it takes over.
    """

    def __init__(self, redis: LimitsRedis, rate_per_s: float, burst: int):
        self.redis = redis
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.fallback = RateLimiter(rate_per_s, burst)
        self._prefix = f"{redis.namespace}:ratelimit:"
        # The bucket is full again burst / rate seconds after its last request: drop it then.
        self._ttl_ms = math.ceil(burst / rate_per_s * 1000) + 1000

    def bucket_key(self, key: str) -> str:
        """The Redis key of ``key``'s bucket."""
        return self._prefix + hashlib.sha256(b"kvwire-rate-limit:" + key.encode()).hexdigest()[:32]

    def take(self, key: str, what: str) -> None:
        """Take one token from ``key``'s shared bucket (or, Redis down, this process's), or raise
        ``RateLimitError`` with ``retry_after_s``."""
        result = self.redis.run(
            TOKEN_BUCKET_LUA, [self.bucket_key(key)], [self.rate_per_s, self.burst, self._ttl_ms]
        )
        if result is None:
            self.fallback.take(key, what)
            return
        taken, tokens = result
        if not int(taken):
            raise _refusal(self.rate_per_s, self.burst, float(tokens), what)
        self.fallback.consume(key)  # this process's share; its verdict does not count here

    def close(self) -> None:
        self.redis.close()


# ------------------------------------------------------------------------------- per-tenant jobs

# A tenant's unfinished jobs in all processes: a sorted set of job ids scored by lease expiry (Redis
# time, ms). Drop expired leases (their process died or lost Redis), count, add if below the limit.
# Returns -1 when reserved, else the number of jobs already held.
_RESERVE_SLOT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
if held >= tonumber(ARGV[2]) then
  return held
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return -1
"""

# Extend the leases of the listed job ids that are still there (ZADD XX), and the set's expiry.
_RENEW_SLOTS_LUA = """
local t = redis.call('TIME')
local until_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', until_ms, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 0
"""

_RELEASE_SLOT_LUA = "return redis.call('ZREM', KEYS[1], ARGV[1])"


class SharedJobSlots:
    """Per-tenant slots for unfinished jobs, counted across the processes sharing one Redis.

    Used by the in-process job queue (each process runs its own jobs) when a Redis is configured; the
    Redis job queue keeps its own count (``RedisJobQueue._reserve_tenant_slot``). A slot is a lease
    of ``lease_s``, renewed every ``lease_s / 3`` by a thread while its job is queued or running, so
    a process that dies frees its tenants' slots within ``lease_s``. Redis down: ``reserve`` returns
    False and the caller falls back to its own count.
    """

    def __init__(self, redis: LimitsRedis, max_per_tenant: int, *, lease_s: float = 60.0):
        self.redis = redis
        self.max_per_tenant = max_per_tenant
        self._lease_ms = max(1, int(lease_s * 1000))
        self._held: dict[str, set[str]] = {}  # tenant -> this process's job ids holding a slot
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _key(self, tenant: str) -> str:
        return f"{self.redis.namespace}:jobs:slots:{tenant}"

    def reserve(self, tenant: str, job_id: str, refuse: Callable[[int], RateLimitError]) -> bool:
        """Hold a slot for ``job_id``, or raise ``refuse(held)`` if ``tenant`` has the limit in use.

        Returns False (nothing reserved) when Redis cannot be asked: the caller's own count decides.
        """
        held = self.redis.run(
            _RESERVE_SLOT_LUA, [self._key(tenant)], [self._lease_ms, self.max_per_tenant, job_id]
        )
        if held is None:
            return False
        if int(held) >= 0:
            raise refuse(int(held))
        with self._lock:
            self._held.setdefault(tenant, set()).add(job_id)
            if self._renewer is None:
                self._renewer = threading.Thread(target=self._renew, name="kvwire-job-slots", daemon=True)
                self._renewer.start()
        return True

    def release(self, tenant: str, job_id: str) -> None:
        """Free ``job_id``'s slot (finished or failed). A failure here leaves the lease to expire."""
        with self._lock:
            ids = self._held.get(tenant)
            if ids is None or job_id not in ids:
                return
            ids.discard(job_id)
            if not ids:
                del self._held[tenant]
        self.redis.run(_RELEASE_SLOT_LUA, [self._key(tenant)], [job_id])

    def _renew(self) -> None:
        while not self._stop.wait(self._lease_ms / 3000):
            with self._lock:
                held = {tenant: sorted(ids) for tenant, ids in self._held.items()}
            for tenant, ids in held.items():
                self.redis.run(_RENEW_SLOTS_LUA, [self._key(tenant)], [self._lease_ms, *ids])

    def close(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=5)
        self.redis.close()
