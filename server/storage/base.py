"""The one storage interface every backend implements, and the one place keys are validated.

A key is a '/'-separated path of segments made of ``[A-Za-z0-9._-]`` (for example
``tenant-a/ctx-0f3e/chunk-000017.l2``). Values are arbitrary bytes. Prefixes used by
:meth:`Store.delete_prefix` and :meth:`Store.list_keys` match whole segments: ``"a/b"`` matches
``"a/b"`` and ``"a/b/..."`` but not ``"a/bc"``; ``""`` matches every key.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType

from kvwire.errors import InvalidInputError, LimitExceededError, NotFoundError

MAX_KEY_LENGTH = 512
MAX_KEY_SEGMENTS = 32
# Below common filesystems' 255-byte name limit, leaving room for LocalStore's suffix.
MAX_SEGMENT_LENGTH = 200
# Stores refuse single values above this unless configured otherwise (Redis' own limit is 512 MB).
DEFAULT_MAX_VALUE_BYTES = 512 * 1024 * 1024
# Redis stores values above this size as parts (large single values hurt Redis latency).
DEFAULT_PART_BYTES = 8 * 1024 * 1024

_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")

Items = Mapping[str, bytes] | Iterable[tuple[str, bytes]]


def validate_key(key: object) -> str:
    """Return ``key`` unchanged if it is a valid storage key, else raise :class:`InvalidInputError`."""
    if not isinstance(key, str):
        raise InvalidInputError(f"storage key must be a str, got {type(key).__name__}")
    if not key:
        raise InvalidInputError("storage key must not be empty")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidInputError(f"storage key is {len(key)} characters long; the limit is {MAX_KEY_LENGTH}")
    segments = key.split("/")
    if len(segments) > MAX_KEY_SEGMENTS:
        raise InvalidInputError(f"storage key has {len(segments)} segments; the limit is {MAX_KEY_SEGMENTS}")
    for segment in segments:
        if not segment:
            raise InvalidInputError(f"storage key {key!r} has an empty segment (leading, trailing or '//')")
        if len(segment) > MAX_SEGMENT_LENGTH:
            raise InvalidInputError(
                f"storage key segment is {len(segment)} characters; the limit is {MAX_SEGMENT_LENGTH}"
            )
        if segment in (".", ".."):
            raise InvalidInputError(f"storage key {key!r} has a '{segment}' segment")
        if not _SEGMENT.fullmatch(segment):
            raise InvalidInputError(f"storage key {key!r} has characters outside [A-Za-z0-9._-]")
    return key


def validate_prefix(prefix: object) -> str:
    """Normalise a prefix: ``""`` (everything) or a valid key, a trailing '/' allowed and dropped."""
    if not isinstance(prefix, str):
        raise InvalidInputError(f"storage prefix must be a str, got {type(prefix).__name__}")
    if prefix == "":
        return ""
    return validate_key(prefix[:-1] if prefix.endswith("/") else prefix)


def key_matches(key: str, prefix: str) -> bool:
    """True if ``key`` lies under the (already validated) segment prefix ``prefix``."""
    return not prefix or key == prefix or key.startswith(prefix + "/")


def validate_value(data: object, max_bytes: int) -> bytes | bytearray | memoryview:
    """Check that ``data`` is bytes-like and within ``max_bytes``."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidInputError(f"storage value must be bytes-like, got {type(data).__name__}")
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size > max_bytes:
        raise LimitExceededError(f"storage value is {size} bytes; the limit is {max_bytes}")
    return data


def validate_ttl(ttl_s: float | None) -> float | None:
    """A TTL is ``None`` (keep forever) or a positive number of seconds."""
    if ttl_s is None:
        return None
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int | float) or not ttl_s > 0:
        raise InvalidInputError(f"ttl_s must be a positive number of seconds or None, got {ttl_s!r}")
    return float(ttl_s)


def iter_items(items: Items) -> list[tuple[str, bytes]]:
    """Materialise ``put_many``'s argument (a mapping or pairs) as a list of pairs."""
    pairs = items.items() if isinstance(items, Mapping) else items
    return [(k, v) for k, v in pairs]


class Store(ABC):
    """A flat byte store addressed by '/'-separated keys.

    Every backend raises :class:`~kvwire.errors.NotFoundError` for a missing (or expired) key,
    :class:`~kvwire.errors.InvalidInputError` for a bad key, and
    :class:`~kvwire.errors.BackendUnavailableError` for any failure to reach its server; a reader
    never sees a partly written value.
    """

    #: Human-readable backend and address, used in error messages (e.g. ``"redis at 127.0.0.1:6379"``).
    name: str = "store"

    @abstractmethod
    def put(self, key: str, data: bytes, ttl_s: float | None = None) -> None:
        """Store ``data`` under ``key``, replacing any old value; expire it after ``ttl_s`` seconds."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """Return the value of ``key``; raise ``NotFoundError`` if it is missing or expired."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """True if ``key`` holds an unexpired value."""

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Delete ``key``; return whether it existed. Deleting a missing key is not an error."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under the segment prefix ``prefix``; return how many were deleted."""

    @abstractmethod
    def list_keys(self, prefix: str = "") -> Iterator[str]:
        """Yield the keys under the segment prefix ``prefix``, in no particular order."""

    @abstractmethod
    def health(self) -> None:
        """Return if the backend answers; raise ``BackendUnavailableError`` otherwise."""

    def get_many(self, keys: Iterable[str]) -> list[bytes]:
        """Return the values of ``keys`` in order; raise ``NotFoundError`` naming the first missing key."""
        keys = list(keys)
        values = self.try_get_many(keys)
        for key, value in zip(keys, values, strict=True):
            if value is None:
                raise NotFoundError(f"{self.name}: no key {key!r}")
        return values  # type: ignore[return-value]  # no None left

    def try_get_many(self, keys: Iterable[str]) -> list[bytes | None]:
        """Return the values of ``keys`` in order, ``None`` for each missing or expired key.

        Backends override this to batch round trips (Redis pipelines, concurrent S3 GETs).
        """
        out: list[bytes | None] = []
        for key in keys:
            try:
                out.append(self.get(key))
            except NotFoundError:
                out.append(None)
        return out

    def put_many(self, items: Items, ttl_s: float | None = None) -> None:
        """Store many values (a mapping or ``(key, data)`` pairs), each with the same ``ttl_s``."""
        for key, data in iter_items(items):
            self.put(key, data, ttl_s)

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op for stores without connections.
        """Release connections and threads. The store must not be used afterwards."""

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"
