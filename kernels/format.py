"""The kvwire chunk bitstream: header, sections, checksum. Specified in docs/format.md.

Everything a decoder needs is in the chunk except the calibration profile (named by digest) and the
shipped rANS table bank (named by version). Parsing validates every size against the chunk's length
before any array is built, so a hostile chunk can neither trigger a huge allocation nor an
out-of-bounds read; the CRC-32 over the whole chunk catches accidental corruption.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kvwire.errors import CorruptChunkError, UnsupportedVersionError

MAGIC = b"KVWC"
FORMAT_VERSION = 1
# magic, version, header size, flags, dtype, level, layers, kv heads, head dim, heads per group, lanes,
# table bank, token start, tokens, raw entries, words, model fingerprint, profile digest, payload, crc
_HEADER = struct.Struct("<4sHHHBBHHHHHHIIIQ16s16sQI")
HEADER_SIZE = _HEADER.size
DTYPES = ("float32", "float16", "bfloat16")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_HEAD_DIM = 1024
MAX_TOKENS = 1 << 16
MAX_LANES = 1024
MAX_ELEMENTS = 1 << 31  # per chunk: bounds every allocation a header can ask for


def _pick_crc32() -> Callable[..., int]:
    """zlib's CRC-32 from ISA-L when installed (same function, several times faster), else zlib's."""
    try:
        from isal import isal_zlib
    except ImportError:
        return zlib.crc32
    return isal_zlib.crc32


crc32: Callable[..., int] = _pick_crc32()
"""``crc32(data, value=0)``: zlib's CRC-32 (ISA-L's implementation when the ``isal`` package is there)."""


def crc32_hex(data: bytes | memoryview) -> str:
    """The checksum the manifest, ``ETag`` and ``X-Kvwire-Checksum`` carry: the CRC-32 of the whole
    bitstream as 8 hex digits. ISA-L's CRC when ``isal`` is installed: the gRPC API and the client
    check every chunk, and zlib's takes ~0.6 ms per MiB, as long as a raw Redis GET of it."""
    return f"{crc32(data) & 0xFFFFFFFF:08x}"


@dataclass(frozen=True)
class ChunkHeader:
    """The fixed-size header at the start of every chunk."""

    version: int
    dtype: str
    level: int
    layers: int
    kv_heads: int
    head_dim: int
    heads_per_group: int
    lanes: int
    table_bank: int
    token_start: int
    n_tokens: int
    n_raw: int
    n_words: int
    model_fingerprint: bytes
    profile_digest: bytes
    payload_size: int

    @property
    def groups(self) -> int:
        return self.kv_heads // self.heads_per_group

    @property
    def group_dim(self) -> int:
        return self.heads_per_group * self.head_dim

    @property
    def segments(self) -> int:
        return self.layers * 2 * self.groups

    @property
    def elements(self) -> int:
        return self.layers * 2 * self.kv_heads * self.n_tokens * self.head_dim

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (self.layers, 2, self.kv_heads, self.n_tokens, self.head_dim)


@dataclass(frozen=True)
class ChunkSections:
    """The arrays that follow the header (views into the chunk's bytes, never copies)."""

    step_mant: np.ndarray  # uint16 [segments]
    step_exp: np.ndarray  # int16 [segments]
    classes: np.ndarray  # uint8 [segments, group_dim]
    states: np.ndarray  # uint32 [segments, lanes]
    offsets: np.ndarray  # uint32 [segments + 1], in words
    words: np.ndarray  # uint16 [n_words]
    raw_index: np.ndarray  # uint32 [n_raw]: layer * 2 * n_tokens + kv * n_tokens + token
    raw_values: np.ndarray  # bytes [n_raw, kv_heads, head_dim, dtype_bytes]


def _pad4(n: int) -> int:
    return (n + 3) & ~3


def section_sizes(h: ChunkHeader) -> list[tuple[str, int]]:
    """Byte size of each section in order (each padded to 4 bytes)."""
    s = h.segments
    return [
        ("step_mant", _pad4(2 * s)),
        ("step_exp", _pad4(2 * s)),
        ("classes", _pad4(s * h.group_dim)),
        ("states", 4 * s * h.lanes),
        ("offsets", 4 * (s + 1)),
        ("words", _pad4(2 * h.n_words)),
        ("raw_index", 4 * h.n_raw),
        ("raw_values", _pad4(h.n_raw * h.kv_heads * h.head_dim * DTYPE_BYTES[h.dtype])),
    ]


def pack_chunk(h: ChunkHeader, sections: ChunkSections) -> bytes:
    """Serialise header and sections, filling in the payload size and CRC-32."""
    parts = []
    for (name, size), arr in zip(section_sizes(h), _section_arrays(sections), strict=True):
        raw = np.ascontiguousarray(arr).tobytes()
        if len(raw) > size:
            raise ValueError(f"section {name} is larger than its header says")
        parts.append(raw + b"\0" * (size - len(raw)))
    payload = b"".join(parts)
    head = _pack_header(h, len(payload), 0)
    crc = crc32(payload, crc32(head))
    return _pack_header(h, len(payload), crc) + payload


def _section_arrays(s: ChunkSections) -> list[np.ndarray]:
    return [s.step_mant, s.step_exp, s.classes, s.states, s.offsets, s.words, s.raw_index, s.raw_values]


def pack_header(h: ChunkHeader, payload_size: int, crc: int = 0) -> bytes:
    """The 88 header bytes of ``h`` with the given payload size and CRC (encoders that pack elsewhere)."""
    return _pack_header(h, payload_size, crc)


def _pack_header(h: ChunkHeader, payload_size: int, crc: int) -> bytes:
    return _HEADER.pack(
        MAGIC,
        h.version,
        HEADER_SIZE,
        0,
        DTYPES.index(h.dtype),
        h.level,
        h.layers,
        h.kv_heads,
        h.head_dim,
        h.heads_per_group,
        h.lanes,
        h.table_bank,
        h.token_start,
        h.n_tokens,
        h.n_raw,
        h.n_words,
        h.model_fingerprint,
        h.profile_digest,
        payload_size,
        crc,
    )


def read_header(data: bytes | memoryview) -> ChunkHeader:
    """Parse and validate a chunk header (not the payload); raises CorruptChunkError."""
    if len(data) < HEADER_SIZE:
        raise CorruptChunkError(f"chunk is {len(data)} bytes, shorter than the {HEADER_SIZE}-byte header")
    (
        magic,
        version,
        header_size,
        _flags,
        dtype_code,
        level,
        layers,
        kv_heads,
        head_dim,
        hpg,
        lanes,
        table_bank,
        token_start,
        n_tokens,
        n_raw,
        n_words,
        model_fp,
        profile_digest,
        payload_size,
        _crc,
    ) = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CorruptChunkError("not a kvwire chunk (bad magic)")
    if version != FORMAT_VERSION:
        raise UnsupportedVersionError(
            f"chunk format version {version} is not supported (this build reads version {FORMAT_VERSION})"
        )
    if header_size != HEADER_SIZE:
        raise CorruptChunkError(f"header size {header_size} does not match version {version}")
    if dtype_code >= len(DTYPES):
        raise CorruptChunkError(f"unknown dtype code {dtype_code}")
    if not (0 < layers <= MAX_LAYERS and 0 < kv_heads <= MAX_HEADS and 0 < head_dim <= MAX_HEAD_DIM):
        raise CorruptChunkError(f"implausible layout: {layers} layers, {kv_heads} heads, head dim {head_dim}")
    if hpg == 0 or kv_heads % hpg or not 0 < lanes <= MAX_LANES:
        raise CorruptChunkError(f"implausible coder layout: {hpg} heads per group, {lanes} lanes")
    if not 0 < n_tokens <= MAX_TOKENS:
        raise CorruptChunkError(f"implausible token count {n_tokens}")
    h = ChunkHeader(
        version=version,
        dtype=DTYPES[dtype_code],
        level=level,
        layers=layers,
        kv_heads=kv_heads,
        head_dim=head_dim,
        heads_per_group=hpg,
        lanes=lanes,
        table_bank=table_bank,
        token_start=token_start,
        n_tokens=n_tokens,
        n_raw=n_raw,
        n_words=n_words,
        model_fingerprint=model_fp,
        profile_digest=profile_digest,
        payload_size=payload_size,
    )
    if h.elements > MAX_ELEMENTS:
        raise CorruptChunkError(f"chunk claims {h.elements} elements, above the limit of {MAX_ELEMENTS}")
    if n_raw > layers * 2 * n_tokens:
        raise CorruptChunkError(f"chunk claims {n_raw} raw tokens, more than it holds")
    if n_words > 2 * h.elements + 2 * h.segments * lanes:
        raise CorruptChunkError(f"chunk claims {n_words} coder words, more than any stream of its size")
    return h


def chunk_crc(data: bytes | memoryview) -> tuple[int, int]:
    """(stored, computed) CRC-32 of a chunk whose length was already checked."""
    buf = memoryview(data)
    stored_crc = struct.unpack_from("<I", buf, HEADER_SIZE - 4)[0]
    head = bytes(buf[: HEADER_SIZE - 4]) + b"\0\0\0\0"
    return stored_crc, crc32(buf[HEADER_SIZE:], crc32(head))


def section_offsets(h: ChunkHeader) -> dict[str, int]:
    """Byte offset of each section from the start of the chunk."""
    out, pos = {}, HEADER_SIZE
    for name, size in section_sizes(h):
        out[name] = pos
        pos += size
    return out


def parse_chunk(data: bytes | memoryview, verify_crc: bool = True) -> tuple[ChunkHeader, ChunkSections]:
    """Validate length, checksum and section bounds; return the header and section views.

    ``verify_crc=False`` leaves the checksum to the caller (the GPU path checks it on many chunks at
    once in threads, see ``kvwire.kernels.gpu``); every bound is checked either way.
    """
    h = read_header(data)
    sizes = section_sizes(h)
    expect = sum(size for _, size in sizes)
    if h.payload_size != expect:
        raise CorruptChunkError(
            f"payload size {h.payload_size} does not match the header's layout ({expect})"
        )
    if len(data) != HEADER_SIZE + expect:
        what = "is truncated" if len(data) < HEADER_SIZE + expect else "has trailing bytes"
        raise CorruptChunkError(f"chunk {what}: {len(data)} bytes, expected {HEADER_SIZE + expect}")
    buf = memoryview(data)
    if verify_crc:
        stored, computed = chunk_crc(buf)
        if stored != computed:
            raise CorruptChunkError("chunk checksum mismatch: the bytes were corrupted")
    pos = HEADER_SIZE
    views: dict[str, np.ndarray] = {}
    dtypes = {
        "step_mant": (np.uint16, (h.segments,)),
        "step_exp": (np.int16, (h.segments,)),
        "classes": (np.uint8, (h.segments, h.group_dim)),
        "states": (np.uint32, (h.segments, h.lanes)),
        "offsets": (np.uint32, (h.segments + 1,)),
        "words": (np.uint16, (h.n_words,)),
        "raw_index": (np.uint32, (h.n_raw,)),
        "raw_values": (np.uint8, (h.n_raw, h.kv_heads, h.head_dim, DTYPE_BYTES[h.dtype])),
    }
    for name, size in sizes:
        dt, shape = dtypes[name]
        count = int(np.prod(shape))
        views[name] = np.frombuffer(buf, dtype=dt, count=count, offset=pos).reshape(shape)
        pos += size
    sec = ChunkSections(**views)
    offsets = sec.offsets.astype(np.int64)
    if offsets[0] != 0 or offsets[-1] != h.n_words or np.any(np.diff(offsets) < 0):
        raise CorruptChunkError("coder word offsets are inconsistent")
    if h.n_raw and (
        np.any(np.diff(sec.raw_index.astype(np.int64)) <= 0)
        or int(sec.raw_index[-1]) >= h.layers * 2 * h.n_tokens
    ):
        raise CorruptChunkError("raw token index is out of range or unsorted")
    return h, sec
