"""Who is calling and may they call now: API keys to tenants, and per-key rate limits.

One :class:`AccessControl` per server process is shared by the REST and gRPC APIs, so a key's
requests draw from one token bucket whichever API they use. Keys are known only by their sha256
(:func:`kvwire.server.config.hash_api_key`); the presented key is hashed and compared in constant
time against every stored hash. See docs/service.md, "Authentication and tenants" and "Limits".
"""

from __future__ import annotations

import hmac
import math
from dataclasses import dataclass

import token_bucket

from kvwire.errors import AuthError, RateLimitError
from kvwire.server.config import ServiceSettings, hash_api_key


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: its tenant and the bucket its requests draw from (its key's hash)."""

    tenant: str
    key_id: str


class RateLimiter:
    """A token bucket per key (``token_bucket.Limiter``): ``rate_per_s`` refill, ``burst`` capacity."""

    def __init__(self, rate_per_s: float, burst: int):
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._storage = token_bucket.MemoryStorage()
        self._limiter = token_bucket.Limiter(rate_per_s, burst, self._storage)

    def take(self, key: str, what: str) -> None:
        """Take one token from ``key``'s bucket or raise ``RateLimitError`` with ``retry_after_s``."""
        if self._limiter.consume(key):
            return
        missing = max(0.0, 1.0 - self._storage.get_token_count(key))
        retry_after_s = max(1, math.ceil(missing / self.rate_per_s))
        raise RateLimitError(
            f"rate limit of {self.rate_per_s:g} requests/s (burst {self.burst}) exceeded for {what}; "
            f"retry in {retry_after_s} s",
            retry_after_s=retry_after_s,
        )


class AccessControl:
    """Authenticate a request's ``Authorization`` value and charge it to its key's rate limit."""

    def __init__(self, settings: ServiceSettings):
        self.settings = settings
        self.limiter: RateLimiter | None = None
        if settings.rate_limited:
            burst = settings.rate_limit_burst or max(1, math.ceil(settings.rate_limit_per_s))
            self.limiter = RateLimiter(settings.rate_limit_per_s, burst)

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
