"""LocalStore specifics: atomic writes, the on-disk format, TTL honoured on read."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from kvwire.errors import CorruptChunkError, LimitExceededError, NotFoundError
from kvwire.server.storage import LocalStore


def test_layout_and_no_temp_files_left(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("a/b", b"v1")
    store.put("a/b/c", b"v2")  # a key and a "directory" of the same name coexist
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "a/b/c@",
        "a/b@",
    ]
    assert store.get("a/b") == b"v1" and store.get("a/b/c") == b"v2"


def test_failed_write_keeps_old_value_and_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStore(tmp_path)
    store.put("k", b"old")

    def crash(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(Exception, match="No space left"):
        store.put("k", b"new value")
    monkeypatch.undo()
    assert store.get("k") == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["k@"]


def test_temp_and_foreign_files_are_not_keys(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("x/y", b"1")
    (tmp_path / "x" / ".abc~tmp").write_bytes(b"partial")
    (tmp_path / "x" / "README").write_text("not a value")
    assert list(store.list_keys()) == ["x/y"]


def test_ttl_honoured_on_read_and_expired_file_removed(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("t", b"v", ttl_s=0.2)
    assert store.exists("t")
    time.sleep(0.3)
    assert list(store.list_keys()) == []
    with pytest.raises(NotFoundError):
        store.get("t")
    assert not (tmp_path / "t@").exists()


def test_corrupt_file_is_reported(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    (tmp_path / "bad@").write_bytes(b"not a kvwire file at all")
    with pytest.raises(CorruptChunkError):
        store.get("bad")


def test_value_size_limit(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, max_value_bytes=10)
    with pytest.raises(LimitExceededError):
        store.put("k", b"x" * 11)


def test_delete_prefix_prunes_empty_directories(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_many({"t/c1/0": b"a", "t/c1/1": b"b", "t/c2/0": b"c"})
    assert store.delete_prefix("t/c1") == 2
    assert not (tmp_path / "t" / "c1").exists()
    assert store.get("t/c2/0") == b"c"


def test_reader_never_sees_a_partial_write(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    values = [bytes([b]) * (1 << 20) for b in (0xA1, 0xB2)]
    store.put("race", values[0])
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            store.put("race", values[i % 2])

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(100):
            assert store.get("race") in values
    finally:
        stop.set()
        thread.join()
    assert [p.name for p in tmp_path.iterdir()] == ["race@"]
