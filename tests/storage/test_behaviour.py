"""One behavioural suite, run against every backend through the ``store`` fixture."""

from __future__ import annotations

import os
import time
from typing import Any, cast

import pytest

from kvwire.errors import InvalidInputError, NotFoundError
from kvwire.server.storage import Store

MiB = 1024 * 1024


def test_put_get_overwrite(store: Store) -> None:
    store.put("ctx-1/chunk-0", b"first")
    assert store.get("ctx-1/chunk-0") == b"first"
    store.put("ctx-1/chunk-0", b"second, longer value")
    assert store.get("ctx-1/chunk-0") == b"second, longer value"
    assert store.exists("ctx-1/chunk-0")
    store.health()


def test_binary_safe(store: Store) -> None:
    every_byte = bytes(range(256)) * 4 + b"\x00\r\n\xff" + os.urandom(1000)
    store.put("bin", every_byte)
    assert store.get("bin") == every_byte


SIZES = [0, 1, 64 * 1024, MiB + 1, 16 * MiB]


@pytest.mark.parametrize("size", SIZES, ids=["0B", "1B", "64KiB", "1MiB+1", "16MiB"])
def test_value_sizes(store: Store, size: int) -> None:
    data = os.urandom(size)
    store.put("sized/value", data)
    assert store.get("sized/value") == data


@pytest.mark.slow
def test_64_mib_value(store: Store) -> None:
    data = os.urandom(64 * MiB)
    store.put("big", data)
    assert store.get("big") == data


def test_missing_key(store: Store) -> None:
    with pytest.raises(NotFoundError):
        store.get("no/such/key")
    assert not store.exists("no/such/key")
    assert store.delete("no/such/key") is False


def test_delete(store: Store) -> None:
    store.put("a/b", b"x")
    assert store.delete("a/b") is True
    assert not store.exists("a/b")
    with pytest.raises(NotFoundError):
        store.get("a/b")


def test_ttl_expiry(store: Store) -> None:
    store.put("short", b"gone soon", ttl_s=0.4)
    store.put("long", b"stays")
    assert store.get("short") == b"gone soon"
    time.sleep(0.6)
    with pytest.raises(NotFoundError):
        store.get("short")
    assert not store.exists("short")
    assert store.get("long") == b"stays"


def test_list_keys_and_delete_prefix_match_whole_segments(store: Store) -> None:
    keys = ["t1/ctx-a/0", "t1/ctx-a/1", "t1/ctx-a", "t1/ctx-ab/0", "t1/ctx-b/sub/2", "t2/ctx-a/0"]
    store.put_many({k: k.encode() for k in keys})
    assert sorted(store.list_keys()) == sorted(keys)
    assert sorted(store.list_keys("t1/ctx-a")) == ["t1/ctx-a", "t1/ctx-a/0", "t1/ctx-a/1"]
    assert sorted(store.list_keys("t1/")) == sorted(k for k in keys if k.startswith("t1/"))
    assert list(store.list_keys("t3")) == []

    assert store.delete_prefix("t1/ctx-a") == 3
    assert sorted(store.list_keys()) == ["t1/ctx-ab/0", "t1/ctx-b/sub/2", "t2/ctx-a/0"]
    assert store.get("t1/ctx-ab/0") == b"t1/ctx-ab/0"
    assert store.delete_prefix("t1") == 2
    assert store.delete_prefix("t1") == 0
    assert list(store.list_keys()) == ["t2/ctx-a/0"]


def test_get_many_put_many(store: Store) -> None:
    items = [(f"ctx/chunk-{i:03d}", os.urandom(100 + i)) for i in range(50)]
    store.put_many(items)
    keys = [k for k, _ in items]
    assert store.get_many(keys) == [v for _, v in items]
    values = dict(items)
    mixed = [keys[2], keys[1], keys[0], keys[0]]  # any order, repeats allowed
    assert store.get_many(mixed) == [values[k] for k in mixed]
    assert store.get_many([]) == []
    with pytest.raises(NotFoundError, match="ctx/missing"):
        store.get_many([keys[0], "ctx/missing"])


def test_get_many_with_large_values(store: Store) -> None:
    items = {"m/small": b"s", "m/big": os.urandom(9 * MiB), "m/empty": b""}
    store.put_many(items, ttl_s=60)
    assert store.get_many(list(items)) == list(items.values())


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs", "a//b", "a/", "a/./b", "a b", "ü", ""])
def test_invalid_keys_rejected(store: Store, key: str) -> None:
    with pytest.raises(InvalidInputError):
        store.put(key, b"x")
    with pytest.raises(InvalidInputError):
        store.get(key)


def test_non_bytes_value_rejected(store: Store) -> None:
    with pytest.raises(InvalidInputError):
        store.put("k", cast(Any, "text is not bytes"))


def test_try_get_many_reports_missing_as_none(store: Store) -> None:
    store.put_many({"p/a": b"A", "p/big": os.urandom(9 * MiB)})
    got = store.try_get_many(["p/a", "p/missing", "p/big", "p/a"])
    assert got[0] == b"A" and got[1] is None and got[3] == b"A"
    assert got[2] is not None and len(got[2]) == 9 * MiB
