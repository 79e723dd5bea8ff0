"""kvwire client side: the SDK (``Client``), its transports (REST, gRPC) and the bandwidth throttle.

See docs/client.md.
"""

from __future__ import annotations

from kvwire.client.loader import ChunkRecord, LoadTimings
from kvwire.client.retry import RetryPolicy
from kvwire.client.sdk import Answer, Client, KVChunk, LoadedContext, LoadedTensors, parse_mode
from kvwire.controller import Mode

__all__ = [
    "Answer",
    "ChunkRecord",
    "Client",
    "KVChunk",
    "LoadTimings",
    "LoadedContext",
    "LoadedTensors",
    "Mode",
    "RetryPolicy",
    "parse_mode",
]
