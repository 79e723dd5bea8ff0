"""Redis specifics: large values as parts (single node and cluster), cleanup, TTLs, server settings."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from kvwire.errors import NotFoundError
from kvwire.server.storage.redis import PART_TTL_MARGIN_S, RedisClusterStore, RedisStore

from .conftest import make_store

pytestmark = pytest.mark.integration


@pytest.fixture(params=["redis", "redis-cluster"])
def small_parts(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RedisStore]:
    """A Redis store that splits values above 1 KiB into parts, so parts are cheap to test."""
    store = make_store(request.param, request, tmp_path, part_bytes=1024)
    assert isinstance(store, RedisStore)
    yield store
    store.delete_prefix("")
    store.close()


def raw_keys(store: RedisStore) -> list[str]:
    return sorted(k.decode() for k in store._client.scan_iter(match=f"{store.namespace}:*"))


def test_large_value_round_trips_as_parts(small_parts: RedisStore) -> None:
    data = os.urandom(10 * 1024 + 7)
    small_parts.put("ctx/big", data)
    keys = raw_keys(small_parts)
    assert len(keys) == 1 + 11  # header + 11 parts, all with the same hash tag
    assert all(k.startswith(f"{small_parts.namespace}:{{ctx/big}}") for k in keys)
    assert small_parts.get("ctx/big") == data
    assert list(small_parts.list_keys()) == ["ctx/big"]


def test_overwrite_and_delete_remove_old_parts(small_parts: RedisStore) -> None:
    small_parts.put("k", os.urandom(5000))
    small_parts.put("k", os.urandom(3000))  # new generation of parts, old ones unlinked
    assert len(raw_keys(small_parts)) == 1 + 3
    small_parts.put("k", b"small now")
    assert raw_keys(small_parts) == [f"{small_parts.namespace}:{{k}}"]
    small_parts.put("k", os.urandom(2048))
    assert small_parts.delete("k")
    assert raw_keys(small_parts) == []


def test_reader_keeps_old_value_until_header_is_written(small_parts: RedisStore) -> None:
    """A writer that dies after writing parts (before the header) leaves the old value readable."""
    old = os.urandom(4000)
    small_parts.put("k", old)
    for i in range(4):  # parts of an abandoned new generation
        small_parts._client.set(small_parts._part("k", b"deadbeefdeadbeef", i), b"junk")
    assert small_parts.get("k") == old
    assert list(small_parts.list_keys()) == ["k"]
    assert small_parts.delete_prefix("") == 1
    assert raw_keys(small_parts) == []  # orphaned parts cleaned up too


def test_missing_part_reads_as_not_found(small_parts: RedisStore) -> None:
    small_parts.put("k", os.urandom(4000))
    part = next(k for k in raw_keys(small_parts) if "#" in k)
    small_parts._client.delete(part)  # as if evicted by allkeys-lru
    with pytest.raises(NotFoundError, match="no key"):
        small_parts.get("k")


def test_ttl_set_with_px_and_parts_outlive_header(small_parts: RedisStore) -> None:
    small_parts.put("k", os.urandom(3000), ttl_s=100)
    client = small_parts._client
    ttls = {k: client.pttl(k) for k in raw_keys(small_parts)}
    header = ttls.pop(f"{small_parts.namespace}:{{k}}")
    assert 99_000 < header <= 100_000
    assert all(t > header + (PART_TTL_MARGIN_S - 1) * 1000 for t in ttls.values())


def test_cluster_spreads_keys_over_masters(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    store = make_store("redis-cluster", request, tmp_path)
    assert isinstance(store, RedisClusterStore)
    try:
        store.put_many({f"ctx-{i}/0": b"x" for i in range(60)})
        per_node = [n.redis_connection.dbsize() for n in store._client.get_primaries()]
        assert len(per_node) == 3 and all(n > 0 for n in per_node)
        assert len(store.get_many([f"ctx-{i}/0" for i in range(60)])) == 60
    finally:
        store.delete_prefix("")
        store.close()


def test_server_is_configured_for_lru_eviction(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "allkeys-lru"}
    client.close()


def test_reader_never_sees_a_mix_of_two_writes(small_parts: RedisStore) -> None:
    """A reader racing a writer that keeps replacing a 6-part value sees one whole value or the other."""
    values = [bytes([b]) * 6000 for b in (0xA1, 0xB2)]
    small_parts.put("race", values[0])
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            small_parts.put("race", values[i % 2])

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        seen = set()
        for _ in range(200):
            got = small_parts.try_get_many(["race"])[0]
            if got is not None:  # None only if overwritten three times during one read
                assert got in values
                seen.add(got[0])
    finally:
        stop.set()
        thread.join()
    assert seen  # the reader did get whole values


def test_batches_are_one_round_trip(small_parts: RedisStore, monkeypatch: pytest.MonkeyPatch) -> None:
    executes: list[int] = []
    real_pipeline = small_parts._client.pipeline

    def counting_pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = real_pipeline(*args, **kwargs)
        real_execute = pipe.execute

        def execute(*a: Any, **k: Any) -> Any:
            executes.append(1)
            return real_execute(*a, **k)

        pipe.execute = execute
        return pipe

    monkeypatch.setattr(small_parts._client, "pipeline", counting_pipeline)
    items = {f"ctx/{i}": b"v%d" % i for i in range(100)}
    small_parts.put_many(items)
    assert len(executes) == 1
    assert small_parts.get_many(list(items)) == list(items.values())
    assert len(executes) == 2
