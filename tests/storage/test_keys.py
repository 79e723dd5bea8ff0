"""Key validation (the one place keys are checked) and LocalStore's confinement to its root."""

from __future__ import annotations

import os
import re
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvwire.errors import InvalidInputError
from kvwire.server.storage import LocalStore, key_matches, validate_key, validate_prefix
from kvwire.server.storage.base import MAX_KEY_LENGTH, MAX_SEGMENT_LENGTH

SEGMENT_CHARS = string.ascii_letters + string.digits + "._-"
segment = st.text(SEGMENT_CHARS, min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))
valid_key = st.lists(segment, min_size=1, max_size=6).map("/".join)
VALID = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")


@given(valid_key)
def test_valid_keys_accepted(key: str) -> None:
    assert validate_key(key) == key


@given(st.text(max_size=40))
def test_validator_accepts_exactly_the_documented_grammar(key: str) -> None:
    segments = key.split("/")
    expected = bool(VALID.fullmatch(key)) and all(s not in (".", "..") for s in segments)
    try:
        validate_key(key)
        accepted = True
    except InvalidInputError:
        accepted = False
    assert accepted == expected


@pytest.mark.parametrize(
    "key",
    [
        "..",
        "a/../b",
        "../../etc/passwd",
        "/etc/passwd",
        "a//b",
        "a/",
        "/",
        ".",
        "./a",
        "a\\b",
        "a\x00b",
        "~/x",
        "a:b",
        "a%2F..",
        " a",
        "a\nb",
        "C:\\x",
        "\u2025",
    ],
)
def test_path_tricks_rejected(key: str) -> None:
    with pytest.raises(InvalidInputError):
        validate_key(key)


def test_limits_and_types() -> None:
    long_key = "/".join(["a" * 99] * 6)[:MAX_KEY_LENGTH]
    validate_key(long_key)
    with pytest.raises(InvalidInputError, match="characters long"):
        validate_key(long_key + "/b")
    validate_key("s" * MAX_SEGMENT_LENGTH)
    with pytest.raises(InvalidInputError, match="segment is"):
        validate_key("s" * (MAX_SEGMENT_LENGTH + 1))
    with pytest.raises(InvalidInputError, match="segments"):
        validate_key("/".join(["a"] * 100))
    with pytest.raises(InvalidInputError):
        validate_key(b"bytes")
    with pytest.raises(InvalidInputError):
        validate_key("")


def test_prefixes_match_whole_segments() -> None:
    assert validate_prefix("") == ""
    assert validate_prefix("a/b/") == "a/b"
    with pytest.raises(InvalidInputError):
        validate_prefix("a//")
    assert key_matches("a/b", "a/b") and key_matches("a/b/c", "a/b") and key_matches("x", "")
    assert not key_matches("a/bc", "a/b")


# No deadline: each example fsyncs a file, which a loaded CI machine can take hundreds of ms to do.
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.text(st.sampled_from(SEGMENT_CHARS + "/\\~:\x00 é"), max_size=30))
def test_local_store_never_writes_outside_root(tmp_path: Path, key: str) -> None:
    root = tmp_path / "root"
    store = LocalStore(root)
    try:
        store.put(key, b"v")
    except InvalidInputError:
        return
    written = [Path(d) / f for d, _, fs in os.walk(tmp_path) for f in fs]
    assert written and all(p.resolve().is_relative_to(root.resolve()) for p in written)
    assert store.get(key) == b"v"
    store.delete_prefix("")


def test_symlinked_directory_cannot_escape_root(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    store = LocalStore(tmp_path / "root")
    (tmp_path / "root" / "tenant").symlink_to(outside, target_is_directory=True)
    with pytest.raises(InvalidInputError, match="outside"):
        store.put("tenant/ctx/0", b"secret")
    with pytest.raises(InvalidInputError, match="outside"):
        store.get("tenant/x")
    assert list(outside.iterdir()) == []
    assert list(store.list_keys()) == []


def test_symlinked_value_file_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "passwd"
    target.write_bytes(b"root:x:0:0")
    store = LocalStore(tmp_path / "root")
    (tmp_path / "root" / "k@").symlink_to(target)
    with pytest.raises(InvalidInputError, match="symlink"):
        store.get("k")
    store.put("k", b"new")  # replaces the link itself, not its target
    assert target.read_bytes() == b"root:x:0:0"
    assert store.get("k") == b"new"
