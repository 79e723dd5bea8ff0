"""kvwire.server.allocator: chunk-sized buffers are reused instead of faulted in fresh per request.

mallopt changes the whole process, so each check runs in a fresh interpreter."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from kvwire.errors import InvalidInputError
from kvwire.server.allocator import MAX_MMAP_THRESHOLD_BYTES, keep_freed_memory

# One "request": a few 1 MiB buffers alive together, as serving a chunk makes (a reply, the payload
# sliced out of it, a message built from it), then all freed. Prints page faults per request.
_REQUESTS = """
import resource, sys
from kvwire.server.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory(32 * 1024 * 1024)
def request():
    reply = b"r" * (1 << 20)
    payload = reply[1:]
    message = payload + b"m"
    return len(message)
request()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    request()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 50)
"""


def _faults_per_request(mode: str) -> float:
    done = subprocess.run(
        [sys.executable, "-c", _REQUESTS, mode], capture_output=True, text=True, timeout=60, check=True
    )
    return float(done.stdout.strip())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")
def test_chunk_buffers_are_reused_instead_of_faulted_in() -> None:
    # glibc's defaults hand these buffers back to the kernel: every request faults its pages in
    # again (a 1 MiB buffer is 256 pages). That is what the module is for.
    assert _faults_per_request("default") > 256
    assert _faults_per_request("keep") < 16


def test_zero_leaves_malloc_alone_and_too_large_is_refused() -> None:
    assert keep_freed_memory(0) is False
    with pytest.raises(InvalidInputError, match="at most"):
        keep_freed_memory(MAX_MMAP_THRESHOLD_BYTES + 1)
