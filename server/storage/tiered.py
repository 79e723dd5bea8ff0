"""A hot cache (typically Redis) in front of a durable cold store (typically S3 or local disk).

Writes go to cold first (so an acknowledged write is durable), then to hot with a TTL of at most
``hot_ttl_s``. Reads try hot, fall back to cold and repopulate hot. Eviction in the hot tier is by
that TTL and, for Redis, by the server's ``maxmemory`` + ``maxmemory-policy allkeys-lru`` settings.
The hot tier is only a cache: if it is unavailable, reads and writes go on against cold and the
failure is logged. A delete may stay visible through another reader's repopulated hot entry for up to
``hot_ttl_s``; a value read back from cold gets a fresh ``hot_ttl_s`` in hot, whatever its cold TTL.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

from kvwire.errors import BackendUnavailableError
from kvwire.server.storage.base import Items, Store, iter_items, validate_key, validate_ttl

log = logging.getLogger(__name__)


class TieredStore(Store):
    """Read-through, write-through cache of ``cold`` in ``hot``."""

    def __init__(self, hot: Store, cold: Store, hot_ttl_s: float = 3600.0):
        self.hot = hot
        self.cold = cold
        self.hot_ttl_s = validate_ttl(hot_ttl_s) or 3600.0
        self.name = f"tiered ({hot.name} over {cold.name})"

    def _hot_ttl(self, ttl_s: float | None) -> float:
        return self.hot_ttl_s if ttl_s is None else min(ttl_s, self.hot_ttl_s)

    def _warn(self, what: str, exc: BackendUnavailableError) -> None:
        log.warning("hot tier unavailable during %s, using cold tier only: %s", what, exc)

    def put(self, key: str, data: bytes, ttl_s: float | None = None) -> None:
        self.put_many([(key, data)], ttl_s)

    def put_many(self, items: Items, ttl_s: float | None = None) -> None:
        pairs = iter_items(items)
        ttl = validate_ttl(ttl_s)
        self.cold.put_many(pairs, ttl)
        try:
            self.hot.put_many(pairs, self._hot_ttl(ttl))
        except BackendUnavailableError as exc:
            self._warn("put", exc)

    def get(self, key: str) -> bytes:
        return self.get_many([key])[0]

    def try_get_many(self, keys: Iterable[str]) -> list[bytes | None]:
        keys = [validate_key(k) for k in keys]
        values: list[bytes | None] = [None] * len(keys)
        try:
            values = self.hot.try_get_many(keys)  # one pipelined round trip
        except BackendUnavailableError as exc:
            self._warn("get", exc)
        missing = list(dict.fromkeys(k for k, v in zip(keys, values, strict=True) if v is None))
        if not missing:
            return values
        from_cold = dict(zip(missing, self.cold.try_get_many(missing), strict=True))
        found = [(k, v) for k, v in from_cold.items() if v is not None]
        if found:
            try:
                self.hot.put_many(found, self.hot_ttl_s)
            except BackendUnavailableError as exc:
                self._warn("repopulate", exc)
        return [v if v is not None else from_cold[k] for k, v in zip(keys, values, strict=True)]

    def exists(self, key: str) -> bool:
        try:
            if self.hot.exists(key):
                return True
        except BackendUnavailableError as exc:
            self._warn("exists", exc)
        return self.cold.exists(key)

    def delete(self, key: str) -> bool:
        existed = self.cold.delete(key)
        try:
            self.hot.delete(key)
        except BackendUnavailableError as exc:
            self._warn("delete", exc)
        return existed

    def delete_prefix(self, prefix: str) -> int:
        deleted = self.cold.delete_prefix(prefix)
        try:
            self.hot.delete_prefix(prefix)
        except BackendUnavailableError as exc:
            self._warn("delete_prefix", exc)
        return deleted

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        return self.cold.list_keys(prefix)

    def health(self) -> None:
        """Healthy if cold is; a down hot tier only degrades speed (and is logged)."""
        self.cold.health()
        try:
            self.hot.health()
        except BackendUnavailableError as exc:
            self._warn("health", exc)

    def close(self) -> None:
        try:
            self.hot.close()
        finally:
            self.cold.close()
