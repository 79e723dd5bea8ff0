"""Retries with exponential backoff under one time budget, for the client's requests.

A load makes many requests (manifest, profile, one per chunk); every one of them retries transient
failures (:func:`is_transient`) with full-jitter exponential backoff for at most ``total_timeout_s``
(the manifest and the profile share one such budget), so a load that meets a dead server fails within
that time plus one request timeout with a ``ServerUnavailableError`` instead of hanging, however long
the load had been running. Permanent errors (404, auth, corrupt data) are raised
at once. Small enough that a retry library would not save code: the shared deadline and the
resume-from-last-good-chunk logic live in the caller either way.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from kvwire.errors import (
    BackendUnavailableError,
    InvalidInputError,
    KvwireError,
    RateLimitError,
    ServerUnavailableError,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: the server or its backend is unreachable, timed out, or asked us to slow down."""
    return isinstance(exc, (BackendUnavailableError, RateLimitError))


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: ``total_timeout_s`` bounds how long one operation is retried (the time from
    its first attempt to the last retry's start); ``max_attempts`` bounds its tries."""

    max_attempts: int = 8
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    total_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise InvalidInputError(f"max_attempts must be >= 1, got {self.max_attempts}")
        for name in ("initial_backoff_s", "max_backoff_s", "total_timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise InvalidInputError(f"{name} must be finite and >= 0, got {value}")

    def backoff_s(self, attempt: int, rng: random.Random | None = None) -> float:
        """Full-jitter backoff before retry number ``attempt`` (1 = the first retry)."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * 2 ** (attempt - 1))
        return (rng or random).uniform(cap / 2, cap)

    def deadline(self, clock: Callable[[], float] = time.monotonic) -> Deadline:
        return Deadline(clock() + self.total_timeout_s, clock)


@dataclass
class Deadline:
    """A point in time (on ``clock``) after which no further retry starts."""

    at: float
    clock: Callable[[], float] = time.monotonic

    def remaining_s(self) -> float:
        return self.at - self.clock()


def call_with_retries(
    fn: Callable[[], T],
    policy: RetryPolicy,
    *,
    what: str,
    deadline: Deadline | None = None,
    sleep: Callable[[float], None] = time.sleep,
    on_retry: Callable[[int, BaseException], None] | None = None,
) -> T:
    """``fn()``, retried on transient errors until it succeeds, ``max_attempts`` is reached or the
    deadline passes; then ``ServerUnavailableError`` naming ``what`` and the last error."""
    deadline = deadline or policy.deadline()
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except KvwireError as exc:
            if not is_transient(exc):
                raise
            wait_s = policy.backoff_s(attempt)
            if isinstance(exc, RateLimitError):
                wait_s = max(wait_s, min(policy.max_backoff_s, 1.0))
            if attempt >= policy.max_attempts or deadline.remaining_s() < wait_s:
                raise ServerUnavailableError(
                    f"{what}: gave up after {attempt} attempt(s): {type(exc).__name__}: {exc}"
                ) from exc
            log.warning("%s: %s (attempt %d), retrying in %.2f s", what, exc, attempt, wait_s)
            if on_retry is not None:
                on_retry(attempt, exc)
            sleep(wait_s)
