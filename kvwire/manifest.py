"""The records the service publishes and clients read: a context's manifest and an ingest job's state.

Plain dataclasses with JSON round trips and no dependency beyond the standard library and
``kvwire.errors``, so that the server (which writes them) and the client (which reads them) share one
definition without the client pulling in the server's settings, storage or worker (docs/architecture.md).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from kvwire.errors import InvalidInputError, NotFoundError

MANIFEST_FORMAT = "kvwire-manifest"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class LevelEntry:
    """One encoded bitstream of a chunk: where it is stored, its size and its crc32 (8 hex digits)."""

    level: int
    key: str
    nbytes: int
    checksum: str


@dataclass(frozen=True)
class ChunkEntry:
    """One chunk of a context: tokens ``[token_start, token_end)`` and its bitstream per level."""

    index: int
    token_start: int
    token_end: int
    token_ids: list[int]
    text: str
    levels: list[LevelEntry]

    def level(self, level: int) -> LevelEntry:
        for entry in self.levels:
            if entry.level == level:
                return entry
        raise NotFoundError(f"chunk {self.index} has no level {level}")


@dataclass(frozen=True)
class ContextManifest:
    """Everything a client needs to fetch and decode a context; stored as JSON, published last."""

    context_id: str
    tenant: str
    model_fingerprint: str
    profile_digest: str
    codec_version: int
    chunk_tokens: int
    total_tokens: int
    levels: list[int]
    default_level: int
    chunks: list[ChunkEntry]
    created_at: float = field(default_factory=time.time)
    format: str = MANIFEST_FORMAT
    manifest_version: int = MANIFEST_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ContextManifest:
        if data.get("format") != MANIFEST_FORMAT or data.get("manifest_version") != MANIFEST_VERSION:
            raise InvalidInputError("not a kvwire manifest of a known version")
        chunks = [
            ChunkEntry(**{**c, "levels": [LevelEntry(**lv) for lv in c["levels"]]}) for c in data["chunks"]
        ]
        return cls(**{**data, "chunks": chunks})

    @classmethod
    def from_json(cls, data: bytes) -> ContextManifest:
        return cls.from_dict(json.loads(data))

    def chunk(self, index: int) -> ChunkEntry:
        if not 0 <= index < len(self.chunks):
            raise NotFoundError(
                f"context {self.context_id!r} has no chunk {index} ({len(self.chunks)} chunks)"
            )
        return self.chunks[index]


# -------------------------------------------------------------------------------------------- jobs

JobState = Literal["queued", "running", "done", "failed"]
JOB_STATES: tuple[JobState, ...] = ("queued", "running", "done", "failed")


@dataclass
class Job:
    """The public state of one ingest job (JSON-serialisable through :meth:`to_dict`)."""

    id: str
    tenant: str
    context_id: str
    state: JobState = "queued"
    chunks_done: int = 0
    chunks_total: int = 0
    error: dict[str, str] | None = None  # {"type": ..., "message": ...} when failed
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
