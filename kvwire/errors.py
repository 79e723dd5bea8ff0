"""The one hierarchy of typed kvwire errors.

Raised where a problem is found and mapped once to HTTP / gRPC status codes at the API edge.
"""

from __future__ import annotations


class KvwireError(Exception):
    """Base of every error kvwire raises on purpose."""


class InvalidInputError(KvwireError, ValueError):
    """The caller passed something kvwire cannot accept (wrong shape, dtype, NaN/Inf, bad option)."""


class CorruptChunkError(KvwireError):
    """A bitstream is malformed, truncated, or fails its checksum."""


class UnsupportedVersionError(CorruptChunkError):
    """A bitstream was written by a format version this build cannot read."""


class ModelMismatchError(KvwireError):
    """A chunk or profile belongs to a different model (fingerprint mismatch)."""


class ProfileMismatchError(KvwireError):
    """A chunk references a calibration profile other than the one supplied (hash mismatch)."""


class NotFoundError(KvwireError, KeyError):
    """A context, chunk, job or profile does not exist."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0]) if self.args else "not found"


class BackendUnavailableError(KvwireError):
    """A storage backend or queue is down or unreachable."""


class LimitExceededError(KvwireError):
    """A request, context or job exceeds a configured size or rate limit."""


class AuthError(KvwireError):
    """Missing or invalid credentials, or access to another tenant's data."""


class RateLimitError(LimitExceededError):
    """Too many requests or queued jobs right now; the caller should retry later (HTTP 429).

    ``retry_after_s`` (whole seconds) is when a retry may succeed: the ``Retry-After`` header (REST)
    and ``retry-after`` trailing metadata (gRPC).
    """

    def __init__(self, message: str, *, retry_after_s: int = 5):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ServerUnavailableError(BackendUnavailableError):
    """The kvwire server cannot be reached, timed out, or answered 503 / gRPC UNAVAILABLE.

    Raised by the client's transports; the client retries it with backoff and raises it once its
    retry budget is spent.
    """
