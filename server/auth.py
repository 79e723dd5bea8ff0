"""Who is calling and may they call now: API keys to tenants, and per-key rate limits.

One :class:`AccessControl` per server process is shared by the REST and gRPC APIs, so a key's
requests draw from one token bucket whichever API they use. Keys are known only by their sha256
(:func:`kvwire.server.config.hash_api_key`); the presented key is hashed and compared in constant
time against every stored hash. With a Redis configured the buckets are shared by every server
process (``kvwire.server.limits``). See docs/service.md, "Authentication and tenants" and "Limits".
"""

from __future__ import annotations

import hmac
import math
from dataclasses import dataclass

from kvwire.errors import AuthError
from kvwire.server.config import ServiceSettings, hash_api_key
from kvwire.server.limits import RateLimiter, RedisRateLimiter, open_limits_redis


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: its tenant and the bucket its requests draw from (its key's hash)."""

    tenant: str
    key_id: str


class AccessControl:
    """Authenticate a request's ``Authorization`` value and charge it to its key's rate limit."""

    def __init__(self, settings: ServiceSettings):
        self.settings = settings
        self.limiter: RateLimiter | RedisRateLimiter | None = None
        if settings.rate_limited:
            rate = settings.rate_limit_per_s
            burst = settings.rate_limit_burst or max(1, math.ceil(rate))
            redis = open_limits_redis(settings)  # shared by every process when there is one
            self.limiter = RateLimiter(rate, burst) if redis is None else RedisRateLimiter(redis, rate, burst)

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

    @property
    def admit_blocks(self) -> bool:
        """Whether :meth:`admit` waits on the network (a rate limit shared through Redis); without
        that it is a hash, a comparison per key and an in-memory bucket, cheap enough to call on an
        event loop."""
        return isinstance(self.limiter, RedisRateLimiter)

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
        if self.limiter is not None:
            self.limiter.close()
