"""Keep freed chunk-sized buffers in a serving process instead of handing them back to the kernel.

Serving one chunk allocates a few buffers of its size: redis-py's reply, the payload without its tag
byte, the protobuf message and grpcio's slices, the HTTP response. glibc's malloc maps allocations
above ``M_MMAP_THRESHOLD`` fresh from the kernel and unmaps them on free, and gives the top of a heap
back once more than ``M_TRIM_THRESHOLD`` of it is free. Its own adaptive thresholds (start: 128 KiB,
raised as large blocks are freed) still let chunk-sized buffers go back to the kernel between
requests when several are freed together, so that the next request writes fresh pages: one page
fault per 4 KiB. Measured on 1 MiB chunks (docs/serving-benchmark.md): 560-750 page faults per gRPC
``GetChunk`` in the server, over half of its CPU time, and about 230 per REST request at 8
connections. Pinning both thresholds above the largest chunk keeps those buffers in the heap for the
next request; the price is that a process keeps up to twice the threshold of free memory per malloc
arena instead of returning it, i.e. its resident size stays near its peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

from kvwire.errors import InvalidInputError

log = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc refuses a larger M_MMAP_THRESHOLD on 64-bit (HEAP_MAX_SIZE / 2); it is also the ceiling of
#: its own adaptive threshold.
MAX_MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024


def keep_freed_memory(threshold_bytes: int) -> bool:
    """Serve allocations below ``threshold_bytes`` from the heap and keep up to twice that free.

    Sets glibc's ``M_MMAP_THRESHOLD`` to ``threshold_bytes`` and ``M_TRIM_THRESHOLD`` to twice it
    (the pairing glibc's adaptive rule uses) for the whole process. Returns whether both were set;
    False (and nothing changed) for ``threshold_bytes <= 0``, on a C library other than glibc, or if
    glibc refused a value. Process-wide: call it in a server process, not from a library.
    """
    if threshold_bytes <= 0:
        return False
    if threshold_bytes > MAX_MMAP_THRESHOLD_BYTES:
        raise InvalidInputError(
            f"malloc threshold must be at most {MAX_MMAP_THRESHOLD_BYTES} bytes, got {threshold_bytes}"
        )
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if not mallopt(_M_MMAP_THRESHOLD, threshold_bytes):
        log.warning("glibc refused M_MMAP_THRESHOLD=%d; malloc left as it was", threshold_bytes)
        return False
    if not mallopt(_M_TRIM_THRESHOLD, 2 * threshold_bytes):
        log.warning("glibc refused M_TRIM_THRESHOLD=%d", 2 * threshold_bytes)
        return False
    return True
