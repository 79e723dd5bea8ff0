"""Local-disk store: the embedded, zero-configuration default.

Layout: key ``a/b/c`` lives in the file ``<root>/a/b/c@``. The ``@`` suffix cannot occur in a key
segment, so a key ``a/b`` (file ``a/b@``) and a key ``a/b/c`` (directory ``a/b``) never collide, and
temporary files (``.*~tmp``) are never mistaken for values. Each file starts with a 16-byte header,
``b"KVWL"``, a version byte, 3 pad bytes and a little-endian float64 expiry time (Unix seconds,
``0.0`` = never), followed by the value bytes. Expired values are treated as missing and removed when
next read.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from kvwire.errors import BackendUnavailableError, CorruptChunkError, InvalidInputError, NotFoundError
from kvwire.server.storage.base import (
    DEFAULT_MAX_VALUE_BYTES,
    Store,
    key_matches,
    validate_key,
    validate_prefix,
    validate_ttl,
    validate_value,
)

_HEADER = struct.Struct("<4sB3xd")
_MAGIC = b"KVWL"
_VERSION = 1
_SUFFIX = "@"


class LocalStore(Store):
    """Values as files under ``root``: atomic replace-on-write, keys confined to ``root``."""

    def __init__(self, root: str | os.PathLike[str], *, max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES):
        self.root = Path(root).expanduser()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BackendUnavailableError(f"local store at {self.root}: cannot create root: {exc}") from exc
        self.root = self.root.resolve()
        self.max_value_bytes = max_value_bytes
        self.name = f"local store at {self.root}"

    # -- paths ---------------------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        """The file for ``key``, refusing any path whose directory resolves outside ``root``."""
        segments = validate_key(key).split("/")
        path = self.root.joinpath(*segments[:-1], segments[-1] + _SUFFIX)
        # Keys cannot contain '..' or absolute parts, but a symlinked directory under root could
        # still point elsewhere: resolve the existing part of the path and check it.
        if not path.parent.resolve().is_relative_to(self.root):
            raise InvalidInputError(f"{self.name}: key {key!r} resolves outside the store root")
        return path

    def _dir(self, prefix: str) -> Path | None:
        """The directory holding keys under ``prefix``, or None if it escapes root."""
        path = self.root.joinpath(*prefix.split("/")) if prefix else self.root
        return path if path.resolve().is_relative_to(self.root) else None

    def _unavailable(self, what: str, exc: OSError) -> BackendUnavailableError:
        return BackendUnavailableError(f"{self.name}: {what}: {exc}")

    # -- reading -------------------------------------------------------------------------------------

    def _read(self, key: str, path: Path, *, header_only: bool) -> bytes | None:
        """The value (or b"" if ``header_only``), or None if missing or expired."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise InvalidInputError(f"{self.name}: key {key!r} is a symlink; refusing to follow") from exc
            if exc.errno in (errno.ENOTDIR, errno.EISDIR):
                return None
            raise self._unavailable(f"cannot open {key!r}", exc) from exc
        with os.fdopen(fd, "rb") as f:
            try:
                head = f.read(_HEADER.size)
                if len(head) < _HEADER.size:
                    raise CorruptChunkError(f"{self.name}: {key!r} is shorter than its header")
                magic, version, expires_at = _HEADER.unpack(head)
                if magic != _MAGIC or version != _VERSION:
                    raise CorruptChunkError(f"{self.name}: {key!r} has no kvwire local-store header")
                if expires_at and expires_at <= time.time():
                    with contextlib.suppress(OSError):
                        path.unlink()
                    return None
                return b"" if header_only else f.read()
            except OSError as exc:
                raise self._unavailable(f"cannot read {key!r}", exc) from exc

    def get(self, key: str) -> bytes:
        data = self._read(key, self._path(key), header_only=False)
        if data is None:
            raise NotFoundError(f"{self.name}: no key {key!r}")
        return data

    def exists(self, key: str) -> bool:
        return self._read(key, self._path(key), header_only=True) is not None

    # -- writing -------------------------------------------------------------------------------------

    def put(self, key: str, data: bytes, ttl_s: float | None = None) -> None:
        path = self._path(key)
        validate_value(data, self.max_value_bytes)
        ttl = validate_ttl(ttl_s)
        header = _HEADER.pack(_MAGIC, _VERSION, time.time() + ttl if ttl else 0.0)
        fd, tmp = self._temp_file(key, path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(header)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(exc, OSError):
                raise self._unavailable(f"cannot write {key!r}", exc) from exc
            raise
        _fsync_dir(path.parent)

    def _temp_file(self, key: str, directory: Path) -> tuple[int, str]:
        """A temp file in the value's own directory, so os.replace is an atomic rename on one
        filesystem: a reader sees the old value or the whole new one, never a partial file."""
        for attempt in range(3):
            try:
                directory.mkdir(parents=True, exist_ok=True)
                return tempfile.mkstemp(dir=directory, prefix=".", suffix="~tmp")
            except FileNotFoundError:
                if attempt == 2:  # a concurrent delete_prefix keeps pruning the directory
                    raise self._unavailable(f"cannot write {key!r}", OSError("directory vanished")) from None
            except OSError as exc:
                raise self._unavailable(f"cannot write {key!r}", exc) from exc
        raise AssertionError("unreachable")

    def delete(self, key: str) -> bool:
        path = self._path(key)
        existed = self._read(key, path, header_only=True) is not None
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as exc:
            raise self._unavailable(f"cannot delete {key!r}", exc) from exc
        return existed

    def delete_prefix(self, prefix: str) -> int:
        prefix = validate_prefix(prefix)
        deleted = sum(self.delete(key) for key in list(self._walk(prefix, skip_expired=False)))
        self._prune_empty_dirs(prefix)
        return deleted

    def _prune_empty_dirs(self, prefix: str) -> None:
        top = self._dir(prefix)
        if top is None or not top.is_dir() or top.is_symlink():
            return
        for dirpath, _, _ in os.walk(top, topdown=False):
            if Path(dirpath) != self.root:
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)  # fails harmlessly if not empty (or a writer just used it)

    # -- listing -------------------------------------------------------------------------------------

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        return self._walk(validate_prefix(prefix), skip_expired=True)

    def _walk(self, prefix: str, *, skip_expired: bool) -> Iterator[str]:
        if prefix:
            # The key equal to the prefix itself, then everything in the directory of that name.
            with contextlib.suppress(InvalidInputError):
                if self._accept(prefix, skip_expired):
                    yield prefix
        top = self._dir(prefix)
        if top is None or not top.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
            dirnames.sort()
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in sorted(filenames):
                if not name.endswith(_SUFFIX):
                    continue
                key = name[: -len(_SUFFIX)] if rel == "." else f"{rel}/{name[: -len(_SUFFIX)]}"
                try:
                    validate_key(key)
                except InvalidInputError:
                    continue
                if key_matches(key, prefix) and self._accept(key, skip_expired):
                    yield key

    def _accept(self, key: str, skip_expired: bool) -> bool:
        path = self._path(key)
        if not skip_expired:
            return path.is_file() and not path.is_symlink()
        try:
            return self._read(key, path, header_only=True) is not None
        except (CorruptChunkError, InvalidInputError):
            return False

    def health(self) -> None:
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise BackendUnavailableError(f"{self.name}: root is not writable")


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (POSIX needs the directory entry synced too)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
