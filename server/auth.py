"""Who is calling and may they call now: API keys to tenants, and per-key rate limits.

One :class:`AccessControl` per server process is shared by the REST and gRPC APIs, so a key's
requests draw from one token bucket whichever API they use. Keys are known only by their sha256
(:func:`kvwire.server.config.hash_api_key`); the presented key is hashed and compared in constant
time against every stored hash.

When a Redis is configured (``rate_limit_redis_url``, else the job queue's, else the store's), the
buckets live there and every server process draws from the same ones (:class:`RedisRateLimiter`); if
that Redis fails, each process falls back to its own in-memory bucket until Redis answers again. See
docs/service.md, "Limits", and docs/reliability.md, "Security".
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import token_bucket

from kvwire.errors import AuthError, RateLimitError
from kvwire.server.config import ServiceSettings, hash_api_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: its tenant and the bucket its requests draw from (its key's hash)."""

    tenant: str
    key_id: str


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


# One bucket per hash key: refill by the time elapsed (Redis' clock, so every server agrees), take a
# token if there is one, store, and expire the hash once it would be full again anyway. Atomic: two
# servers can never both take the last token. Returns {1 if taken else 0, tokens left as a string}
# (Lua numbers become Redis integers on return, which would truncate the fraction).
_TOKEN_BUCKET_LUA = """
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
    """Token buckets in Redis, shared by every process that names the same Redis and namespace.

    One Lua script per request (``register_script``: ``EVALSHA``, loaded again after a Redis restart)
    under ``<namespace>:ratelimit:<id>``, where ``id`` is derived from the key's hash (neither the key
    nor its stored hash appears in Redis). Fails open to this process's own bucket (``fallback``):
    when Redis errs or does not answer within ``timeout_s``, the request is judged by ``fallback`` and
    Redis is not asked again for ``retry_s``. So an outage of the limiter's Redis never refuses
    service that the store could still give, and each process still holds every key to the limit on
    its own (N processes: at most N times the rate while Redis is down). ``fallback`` is also charged
    for every request Redis admits, so it holds this process's share when it takes over.
    """

    def __init__(
        self,
        url: str,
        rate_per_s: float,
        burst: int,
        *,
        namespace: str = "kvwire",
        cluster: bool = False,
        timeout_s: float = 0.5,
        retry_s: float = 5.0,
        fallback: RateLimiter | None = None,
    ):
        import redis
        from redis.exceptions import RedisClusterException

        self.rate_per_s = rate_per_s
        self.burst = burst
        self.fallback = fallback or RateLimiter(rate_per_s, burst)
        self.retry_s = retry_s
        parts = urlsplit(url)  # name the server, never the password
        self.name = f"rate-limit redis at {parts.hostname or '127.0.0.1'}:{parts.port or 6379}"
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, RedisClusterException, OSError)
        self._url, self._cluster, self._timeout_s = url, cluster, timeout_s
        self._redis: Any = None  # connected on first use: a Redis down at start-up is an outage like any
        self._script: Any = None
        self._prefix = f"{namespace}:ratelimit:"
        # The bucket is full again burst / rate seconds after its last request: drop it then.
        self._ttl_ms = math.ceil(burst / rate_per_s * 1000) + 1000
        self._lock = threading.Lock()
        self._skip_until = 0.0  # monotonic; while in the future, the fallback decides

    @property
    def degraded(self) -> bool:
        """Whether requests are judged by this process's bucket alone right now (Redis failed)."""
        return time.monotonic() < self._skip_until

    def bucket_key(self, key: str) -> str:
        """The Redis key of ``key``'s bucket."""
        return self._prefix + hashlib.sha256(b"kvwire-rate-limit:" + key.encode()).hexdigest()[:32]

    def take(self, key: str, what: str) -> None:
        """Take one token from ``key``'s shared bucket (or, Redis down, this process's), or raise
        ``RateLimitError`` with ``retry_after_s``."""
        if not self.degraded:
            try:
                taken, tokens = self._connected()(
                    keys=[self.bucket_key(key)], args=[self.rate_per_s, self.burst, self._ttl_ms]
                )
            except self._errors as exc:
                self._redis_failed(exc)
            else:
                if int(taken):
                    self.fallback.consume(key)  # this process's share; its verdict does not count
                    return
                raise _refusal(self.rate_per_s, self.burst, float(tokens), what)
        self.fallback.take(key, what)

    def _connected(self) -> Any:
        """The registered script, connecting first if this is the first use."""
        if self._script is not None:
            return self._script
        with self._lock:
            if self._script is None:
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
                    self._redis = RedisCluster.from_url(self._url, **options)
                else:
                    self._redis = redis.Redis.from_url(self._url, **options)
                self._script = self._redis.register_script(_TOKEN_BUCKET_LUA)
            return self._script

    def _redis_failed(self, exc: BaseException) -> None:
        with self._lock:
            was_up = not self.degraded
            self._skip_until = time.monotonic() + self.retry_s
        if was_up:
            log.warning(
                "%s failed (%s: %s): rate limits are per process for the next %g s",
                self.name,
                type(exc).__name__,
                exc,
                self.retry_s,
            )

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()


def shared_rate_limit_redis(settings: ServiceSettings) -> tuple[str, str, bool] | None:
    """``(url, namespace, cluster)`` of the Redis that holds the shared rate-limit buckets, or None.

    The explicit ``rate_limit_redis_url``, else the job queue's Redis, else the store's (``redis``,
    ``redis-cluster``, or the hot tier of ``tiered``); None when there is none or sharing is off.
    """
    if not settings.rate_limit_shared:
        return None
    if settings.rate_limit_redis_url:
        return settings.rate_limit_redis_url, settings.jobs_namespace, False
    if settings.jobs_redis_url:
        return settings.jobs_redis_url, settings.jobs_namespace, False
    storage = settings.storage
    kind = storage.tiered_hot if storage.store == "tiered" else storage.store
    if kind in ("redis", "redis-cluster"):
        return storage.redis_url, storage.redis_namespace, kind == "redis-cluster"
    return None


class AccessControl:
    """Authenticate a request's ``Authorization`` value and charge it to its key's rate limit."""

    def __init__(self, settings: ServiceSettings):
        self.settings = settings
        self.limiter: RateLimiter | RedisRateLimiter | None = None
        if settings.rate_limited:
            rate = settings.rate_limit_per_s
            burst = settings.rate_limit_burst or max(1, math.ceil(rate))
            shared = shared_rate_limit_redis(settings)
            if shared is None:
                self.limiter = RateLimiter(rate, burst)
            else:
                url, namespace, cluster = shared
                self.limiter = RedisRateLimiter(
                    url,
                    rate,
                    burst,
                    namespace=namespace,
                    cluster=cluster,
                    timeout_s=settings.rate_limit_redis_timeout_s,
                    retry_s=settings.rate_limit_redis_retry_s,
                )

    def authenticate(self, authorization: str | None) -> Caller:
        """The caller of a ``Bearer <key>`` header value (the default tenant when auth is off)."""
        settings = self.settings
        if not settings.auth_enabled:
            return Caller(settings.default_tenant, f"tenant:{settings.default_tenant}")
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthError("missing 'Authorization: Bearer <key>'")
        digest = hash_api_key(key.strip())
        tenant = None
        for known, name in settings.api_keys.items():  # constant time over every stored hash
            if hmac.compare_digest(known, digest):
                tenant = name
        if tenant is None:
            raise AuthError("invalid API key")
        return Caller(tenant, digest)

    def admit(self, authorization: str | None) -> str:
        """Authenticate, then take a token from the caller's bucket; return the caller's tenant."""
        caller = self.authenticate(authorization)
        if self.limiter is not None:
            self.limiter.take(caller.key_id, f"tenant {caller.tenant!r}")
        return caller.tenant

    def check_metrics_token(self, authorization: str | None) -> None:
        """Return if ``/metrics`` is open or the header carries its token; raise ``AuthError`` otherwise."""
        expected = self.settings.metrics_token
        if expected is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(hash_api_key(token.strip()), expected):
            raise AuthError("/metrics needs 'Authorization: Bearer <KVWIRE_METRICS_TOKEN>'")

    def close(self) -> None:
        """Release the shared limiter's Redis connections (if any)."""
        if isinstance(self.limiter, RedisRateLimiter):
            self.limiter.close()
