"""Storage for encoded chunks: one :class:`Store` interface, several backends, chosen by configuration.

``RedisStore``, ``RedisClusterStore`` and ``S3Store`` are imported on first use, so the local-disk
default needs neither redis-py nor boto3 installed. See docs/storage.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kvwire.server.storage.base import Store, key_matches, validate_key, validate_prefix
from kvwire.server.storage.config import StorageSettings, open_store
from kvwire.server.storage.local import LocalStore
from kvwire.server.storage.tiered import TieredStore

if TYPE_CHECKING:
    from kvwire.server.storage.redis import RedisClusterStore, RedisStore
    from kvwire.server.storage.s3 import S3Store

_LAZY = {
    "RedisStore": "kvwire.server.storage.redis",
    "RedisClusterStore": "kvwire.server.storage.redis",
    "S3Store": "kvwire.server.storage.s3",
}

__all__ = [
    "LocalStore",
    "RedisClusterStore",
    "RedisStore",
    "S3Store",
    "StorageSettings",
    "Store",
    "TieredStore",
    "key_matches",
    "open_store",
    "validate_key",
    "validate_prefix",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
