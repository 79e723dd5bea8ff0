"""Redis and Redis Cluster stores (redis-py), binary-safe, pipelined, with TTLs and parted large values.

Key layout (namespace ``ns``, store key ``k``):

* ``ns:{k}`` holds one tag byte then either the value (tag ``0``, values up to ``part_bytes``) or a
  header (tag ``1``: total length, part count, a random generation id) for a larger value;
* ``ns:{k}#<generation>:<i>`` hold the parts of a large value.

The ``{k}`` hash tag puts a value's header and parts in one cluster slot. Parts are written before
the header and under a fresh generation id, so a reader sees the old value or the whole new one; the
old generation's parts are deleted after the header is replaced. Parts get the value's TTL plus
``PART_TTL_MARGIN_S`` so they outlive their header.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import struct
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from kvwire.errors import BackendUnavailableError, CorruptChunkError, InvalidInputError, NotFoundError
from kvwire.server.storage.base import (
    DEFAULT_MAX_VALUE_BYTES,
    DEFAULT_PART_BYTES,
    Items,
    Store,
    iter_items,
    validate_key,
    validate_prefix,
    validate_ttl,
    validate_value,
)

PART_TTL_MARGIN_S = 60.0
_INLINE = b"\x00"
_PARTED = b"\x01"
_PARTS_HEADER = struct.Struct("<QI16s")  # total length, part count, generation id (hex)
_NAMESPACE = re.compile(r"[A-Za-z0-9._:-]+")
_BATCH = 500  # commands per pipeline round trip when scanning/deleting many keys


class RedisStore(Store):
    """A store on one redis-server. ``url`` is a redis-py URL (``redis://[:password@]host:port/db``)."""

    backend = "redis"

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        namespace: str = "kvwire",
        part_bytes: int = DEFAULT_PART_BYTES,
        socket_timeout_s: float = 5.0,
        connect_timeout_s: float = 2.0,
        retries: int = 1,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
    ):
        if not _NAMESPACE.fullmatch(namespace):
            raise InvalidInputError(f"redis namespace {namespace!r} must match [A-Za-z0-9._:-]+")
        if part_bytes < 1:
            raise InvalidInputError(f"part_bytes must be positive, got {part_bytes}")
        parts = urlsplit(url)
        self.name = f"{self.backend} at {parts.hostname or '127.0.0.1'}:{parts.port or 6379}"
        self.namespace = namespace
        self.part_bytes = part_bytes
        self.max_value_bytes = max_value_bytes
        options: dict[str, Any] = {
            "socket_timeout": socket_timeout_s,
            "socket_connect_timeout": connect_timeout_s,
            # redis-py's default retries with up to 10 s backoff; a store should fail fast and let
            # the caller (or the tiered store) decide.
            "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), retries),
        }
        with self._errors():
            self._client: Any = self._connect(url, options)

    def _connect(self, url: str, options: dict[str, Any]) -> Any:
        return redis.Redis.from_url(url, **options)

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Turn every redis-py failure into BackendUnavailableError naming this backend."""
        try:
            yield
        except (redis.RedisError, RedisClusterException) as exc:
            raise BackendUnavailableError(f"{self.name}: {type(exc).__name__}: {exc}") from exc

    # -- key layout ----------------------------------------------------------------------------------

    def _main(self, key: str) -> str:
        return f"{self.namespace}:{{{key}}}"

    def _part(self, key: str, generation: bytes, index: int) -> str:
        return f"{self.namespace}:{{{key}}}#{generation.decode()}:{index}"

    def _parts_of(self, key: str, stored: bytes | None) -> list[str]:
        """The part keys a stored main value refers to (none for an inline value or None)."""
        if not stored or stored[:1] != _PARTED:
            return []
        _, count, generation = self._parse_header(key, stored)
        return [self._part(key, generation, i) for i in range(count)]

    def _parse_header(self, key: str, stored: bytes) -> tuple[int, int, bytes]:
        if len(stored) != 1 + _PARTS_HEADER.size:
            raise CorruptChunkError(f"{self.name}: malformed parts header for {key!r}")
        total, count, generation = _PARTS_HEADER.unpack(stored[1:])
        return total, count, generation

    # -- writing -------------------------------------------------------------------------------------

    def put(self, key: str, data: bytes, ttl_s: float | None = None) -> None:
        self.put_many([(key, data)], ttl_s)

    def put_many(self, items: Items, ttl_s: float | None = None) -> None:
        pairs = [(validate_key(k), validate_value(v, self.max_value_bytes)) for k, v in iter_items(items)]
        ttl = validate_ttl(ttl_s)
        px = max(1, int(ttl * 1000)) if ttl else None
        part_px = int((ttl + PART_TTL_MARGIN_S) * 1000) if ttl else None
        with self._errors():
            # Round 1: every part of every large value.
            headers: list[bytes] = []
            parts_pipe = self._client.pipeline(transaction=False)
            for key, data in pairs:
                view = memoryview(data).cast("B")
                if view.nbytes <= self.part_bytes:
                    headers.append(_INLINE + view.tobytes())
                    continue
                generation = secrets.token_hex(8).encode()
                count = -(-view.nbytes // self.part_bytes)
                for i in range(count):
                    part = view[i * self.part_bytes : (i + 1) * self.part_bytes]
                    parts_pipe.set(self._part(key, generation, i), part, px=part_px)
                headers.append(_PARTED + _PARTS_HEADER.pack(view.nbytes, count, generation))
            if len(parts_pipe):
                parts_pipe.execute()
            # Round 2: the main keys, swapping in the new value and fetching the old one.
            pipe = self._client.pipeline(transaction=False)
            for (key, _), header in zip(pairs, headers, strict=True):
                pipe.set(self._main(key), header, px=px, get=True)
            olds = pipe.execute()
            # Round 3: parts of replaced large values.
            stale = [p for (key, _), old in zip(pairs, olds, strict=True) for p in self._parts_of(key, old)]
            self._unlink(stale)

    def _unlink(self, keys: list[str]) -> None:
        for start in range(0, len(keys), _BATCH):
            pipe = self._client.pipeline(transaction=False)
            for k in keys[start : start + _BATCH]:
                pipe.unlink(k)
            pipe.execute()

    # -- reading -------------------------------------------------------------------------------------

    def get(self, key: str) -> bytes:
        value = self.try_get_many([key])[0]
        if value is None:
            raise NotFoundError(f"{self.name}: no key {key!r}")
        return value

    def try_get_many(self, keys: Iterable[str]) -> list[bytes | None]:
        keys = [validate_key(k) for k in keys]
        with self._errors():
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.get(self._main(key))
            stored: list[bytes | None] = pipe.execute()
            out: list[bytes | None] = []
            part_keys: list[str] = []
            for key, value in zip(keys, stored, strict=True):
                out.append(value[1:] if value is not None and value[:1] == _INLINE else None)
                part_keys.extend(self._parts_of(key, value))
            if not part_keys:
                return out
            pipe = self._client.pipeline(transaction=False)
            for k in part_keys:
                pipe.get(k)
            parts = iter(pipe.execute())
            for i, (key, value) in enumerate(zip(keys, stored, strict=True)):
                if value is None or value[:1] != _PARTED:
                    continue
                total, count, _ = self._parse_header(key, value)
                chunk = [next(parts) for _ in range(count)]
                if any(p is None for p in chunk):
                    out[i] = self._get_parted_again(key, value)
                    continue
                joined = b"".join(chunk)
                if len(joined) != total:
                    raise CorruptChunkError(f"{self.name}: parts of {key!r} do not add up")
                out[i] = joined
            return out

    def _get_parted_again(self, key: str, seen: bytes) -> bytes | None:
        """A part vanished: the value was replaced, deleted, expired or evicted meanwhile. Re-read;
        None if the value is gone."""
        for _ in range(3):
            value = self._client.get(self._main(key))
            if value is None or value == seen:
                return None
            if value[:1] == _INLINE:
                return bytes(value[1:])
            pipe = self._client.pipeline(transaction=False)
            for k in self._parts_of(key, value):
                pipe.get(k)
            chunk = pipe.execute()
            if all(p is not None for p in chunk):
                return b"".join(chunk)
            seen = value
        return None

    def exists(self, key: str) -> bool:
        with self._errors():
            return bool(self._client.exists(self._main(validate_key(key))))

    # -- deleting and listing ------------------------------------------------------------------------

    def delete(self, key: str) -> bool:
        return self._delete_many([validate_key(key)]) == 1

    def _delete_many(self, keys: list[str]) -> int:
        deleted = 0
        with self._errors():
            for start in range(0, len(keys), _BATCH):
                batch = keys[start : start + _BATCH]
                pipe = self._client.pipeline(transaction=False)
                for key in batch:
                    pipe.getdel(self._main(key))
                olds = pipe.execute()
                deleted += sum(old is not None for old in olds)
                self._unlink(
                    [p for key, old in zip(batch, olds, strict=True) for p in self._parts_of(key, old)]
                )
        return deleted

    def delete_prefix(self, prefix: str) -> int:
        prefix = validate_prefix(prefix)
        deleted = self._delete_many(list(self.list_keys(prefix)))
        # Parts orphaned by a writer that died between writing parts and header.
        with self._errors():
            self._unlink([k for k in self._scan(prefix) if not k.endswith("}")])
        return deleted

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        prefix = validate_prefix(prefix)
        start = len(self.namespace) + 2
        with self._errors():
            keys = [k[start:-1] for k in self._scan(prefix) if k.endswith("}")]
        return iter(keys)

    def _scan(self, prefix: str) -> list[str]:
        """Raw Redis keys (mains and parts) under a validated prefix."""
        ns = self.namespace
        patterns = [f"{ns}:{{*"] if not prefix else [f"{ns}:{{{prefix}}}*", f"{ns}:{{{prefix}/*"]
        found: set[str] = set()
        for pattern in patterns:
            for raw in self._client.scan_iter(match=pattern, count=1000):
                found.add(raw.decode() if isinstance(raw, bytes) else raw)
        return sorted(found)

    def health(self) -> None:
        with self._errors():
            self._client.ping()

    def close(self) -> None:
        with contextlib.suppress(redis.RedisError, RedisClusterException):
            self._client.close()


class RedisClusterStore(RedisStore):
    """A store on a Redis Cluster through redis-py's cluster client; ``url`` names any one node.

    Same layout and code path as :class:`RedisStore`; pipelines are split per node by redis-py, and
    the ``{key}`` hash tag keeps a value's header and parts in one slot.
    """

    backend = "redis-cluster"

    def _connect(self, url: str, options: dict[str, Any]) -> Any:
        # Connects at once to discover the slot map, so a down cluster fails here, not later.
        return RedisCluster.from_url(url, **options)
