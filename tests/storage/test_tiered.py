"""TieredStore: Redis hot cache in front of S3, read-through and write-through."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvwire.errors import NotFoundError
from kvwire.server.storage import LocalStore
from kvwire.server.storage.redis import RedisStore
from kvwire.server.storage.tiered import TieredStore

from .conftest import make_store, redis_server

pytestmark = pytest.mark.integration


@pytest.fixture
def tiered(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TieredStore]:
    store = make_store("tiered", request, tmp_path)
    assert isinstance(store, TieredStore)
    yield store
    store.delete_prefix("")
    store.close()


def test_write_goes_to_both_tiers(tiered: TieredStore) -> None:
    tiered.put("c/0", b"v", ttl_s=3600)
    assert tiered.cold.get("c/0") == b"v"
    assert tiered.hot.get("c/0") == b"v"
    assert isinstance(tiered.hot, RedisStore)
    assert 0 < tiered.hot._client.pttl(tiered.hot._main("c/0")) <= 60_000  # capped at hot_ttl_s


def test_hot_miss_falls_back_to_cold_and_repopulates(tiered: TieredStore) -> None:
    tiered.put_many({"c/0": b"zero", "c/1": b"one", "c/2": b"two"})
    tiered.hot.delete("c/1")  # as if evicted or expired from the cache
    assert not tiered.hot.exists("c/1")
    assert tiered.get_many(["c/0", "c/1", "c/2"]) == [b"zero", b"one", b"two"]
    assert tiered.hot.get("c/1") == b"one"


def test_cold_only_value_is_served_and_cached(tiered: TieredStore) -> None:
    tiered.cold.put("c/9", b"from cold")
    assert tiered.get("c/9") == b"from cold"
    assert tiered.hot.get("c/9") == b"from cold"


def test_missing_everywhere_is_not_found(tiered: TieredStore) -> None:
    with pytest.raises(NotFoundError):
        tiered.get("nope")


def test_delete_removes_from_both(tiered: TieredStore) -> None:
    tiered.put("c/0", b"v")
    assert tiered.delete("c/0")
    assert not tiered.hot.exists("c/0") and not tiered.cold.exists("c/0")


def test_lru_eviction_in_a_small_hot_tier_loses_nothing(tmp_path: Path) -> None:
    """With maxmemory + allkeys-lru, Redis evicts old cache entries; reads fall back to cold."""
    with redis_server(tmp_path / "hot", "--maxmemory", "3mb", "--maxmemory-policy", "allkeys-lru") as port:
        hot = RedisStore(f"redis://127.0.0.1:{port}/0", part_bytes=256 * 1024)
        store = TieredStore(hot, LocalStore(tmp_path / "cold"), hot_ttl_s=60)
        values = {f"ctx/{i}": os.urandom(200 * 1024) for i in range(40)}  # 8 MB through a 3 MB cache
        store.put_many(values)
        assert hot._client.info("stats")["evicted_keys"] > 0
        assert sum(hot.exists(k) for k in values) < len(values)
        assert store.get_many(list(values)) == list(values.values())
        store.close()
