"""Storage for encoded chunks: one :class:`Store` interface, several backends, chosen by configuration.

Backends are imported lazily by :func:`open_store`, so the local-disk default needs neither redis-py
nor boto3 installed. See docs/storage.md.
"""

from __future__ import annotations

from kvwire.server.storage.base import Store, key_matches, validate_key, validate_prefix
from kvwire.server.storage.config import StorageSettings, open_store
from kvwire.server.storage.local import LocalStore

__all__ = [
    "LocalStore",
    "StorageSettings",
    "Store",
    "key_matches",
    "open_store",
    "validate_key",
    "validate_prefix",
]
