"""Threaded CRC-32 of chunk bytes on the host, shared by GPU decode staging and GPU encode copy-out.

Both paths checksum up to about a gigabyte per batch next to the device work; one thread computes
10-12 GB/s, so the work is spread over a pool (zlib and ISA-L release the GIL). With ISA-L installed a
chunk can be checksummed in pieces whose CRCs are combined (``crc32_combine``); with zlib alone each
chunk is one piece.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import threading
from collections.abc import Callable

PIECE = 1 << 20  # bytes a thread checksums at a time (when pieces can be combined)
WORKERS = min(16, os.cpu_count() or 1)  # threads in the pool

_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def pool() -> concurrent.futures.ThreadPoolExecutor:
    """The process's checksum threads (created on first use, ``WORKERS`` of them)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = concurrent.futures.ThreadPoolExecutor(WORKERS, thread_name_prefix="kvwire-crc")
        return _POOL


@functools.cache
def crc32_combine() -> Callable[[int, int, int], int] | None:
    """ISA-L's ``crc32_combine(crc_a, crc_b, len_b)``, or None without ``isal`` (checksum whole chunks)."""
    try:
        from isal import isal_zlib
    except ImportError:
        return None
    return getattr(isal_zlib, "crc32_combine", None)
