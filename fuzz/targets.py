"""Fuzz targets for the codec's untrusted-input parsers, shared by the atheris harness and the tests.

Each ``check_*`` function takes arbitrary bytes and returns normally when kvwire handled them correctly:
either a result that satisfies the target's invariants, or a typed ``KvwireError``. Anything else (another
exception type, a broken invariant raising ``FuzzFinding``) is a finding. Hangs and huge allocations are
caught by the fuzzer's per-input timeout and RSS limit (``fuzz/run.py``).

- ``check_decode``: the CPU decode path, ``codec.decode_chunk`` (header, sections, CRC, profile checks,
  the decode-size limit, the numba rANS decoder, reconstruction, raw rows).
- ``check_gpu_validation``: what the GPU path runs before a Triton launch, without a GPU: the shared
  ``codec.validate_chunk`` plus ``gpu.prepare_decode`` on CPU tensors, then every bound the decode kernel
  relies on (word ranges, table indices, lane counts, output offsets) is asserted on the prepared batch.
- ``check_profile``: ``CalibrationProfile.from_bytes`` (safetensors + JSON metadata from a server).

Chunks name their profile by digest; the harness decodes with whichever of the fixed profiles in
``fuzz/profiles/`` the chunk names (the first when none matches), as a client that fetched it would.
"""

from __future__ import annotations

import json
import random
import struct
import zlib
from functools import cache
from pathlib import Path

import numpy as np
import torch

from kvwire.errors import KvwireError, LimitExceededError
from kvwire.kernels import codec
from kvwire.kernels import format as fmt
from kvwire.kernels.profile import CalibrationProfile
from kvwire.kernels.tables import table_bank

FUZZ_DIR = Path(__file__).resolve().parent
PROFILE_DIR = FUZZ_DIR / "profiles"
CORPUS_DIR = FUZZ_DIR / "corpus"
TARGETS = ("decode", "gpu_header", "profile")
# The decode limit (``codec.decode_chunk(max_chunk_tokens=)``) for one input in three: the seeds hold
# chunks of 1, 5, 6, 19 and 65,536 tokens, so both sides of the limit are reached.
FUZZ_MAX_CHUNK_TOKENS = 16
CRC_OFFSET = fmt.HEADER_SIZE - 4

# (offset, struct format) of every header field a structured mutation may rewrite (docs/format.md).
HEADER_FIELDS: tuple[tuple[int, str], ...] = (
    (4, "<H"),  # version
    (6, "<H"),  # header size
    (8, "<H"),  # flags
    (10, "<B"),  # dtype
    (11, "<B"),  # level
    (12, "<H"),  # layers
    (14, "<H"),  # kv heads
    (16, "<H"),  # head dim
    (18, "<H"),  # heads per group
    (20, "<H"),  # lanes
    (22, "<H"),  # table bank
    (24, "<I"),  # token start
    (28, "<I"),  # tokens
    (32, "<I"),  # raw rows
    (36, "<Q"),  # words
    (76, "<Q"),  # payload size
)


def seed_dir(target: str) -> Path:
    """The committed seeds of a target: ``fuzz/corpus/chunk/`` for both chunk targets, else its own."""
    return CORPUS_DIR / ("chunk" if target in ("decode", "gpu_header") else target)


class FuzzFinding(AssertionError):
    """A fuzz target broke one of its invariants (the input is a finding, not a typed rejection)."""


@cache
def profiles() -> tuple[CalibrationProfile, ...]:
    """The harness's fixed calibration profiles (``fuzz/profiles/*.safetensors``), loaded once."""
    paths = sorted(PROFILE_DIR.glob("*.safetensors"))
    if not paths:
        raise FileNotFoundError(f"no profiles in {PROFILE_DIR}: run `python -m fuzz.make_corpus`")
    return tuple(CalibrationProfile.from_bytes(p.read_bytes()) for p in paths)


def profile_for(data: bytes) -> CalibrationProfile:
    """The fixed profile a chunk names in its header (the first profile if it names none of them)."""
    if len(data) >= fmt.HEADER_SIZE:
        digest = bytes(data[60:76])
        for prof in profiles():
            if bytes.fromhex(prof.digest)[:16] == digest:
                return prof
    return profiles()[0]


def fix_crc(data: bytes | bytearray) -> bytes:
    """Recompute a chunk's CRC-32 so that a mutation gets past the checksum to the deeper checks."""
    if len(data) < fmt.HEADER_SIZE:
        return bytes(data)
    buf = bytearray(data)
    buf[CRC_OFFSET : fmt.HEADER_SIZE] = b"\0\0\0\0"
    crc = zlib.crc32(bytes(buf[fmt.HEADER_SIZE :]), zlib.crc32(bytes(buf[: fmt.HEADER_SIZE])))
    struct.pack_into("<I", buf, CRC_OFFSET, crc)
    return bytes(buf)


def set_header_field(data: bytes, offset: int, fmt_: str, value: int) -> bytes:
    """``data`` with one header field rewritten (value wrapped to the field's width) and the CRC fixed."""
    buf = bytearray(data)
    size = struct.calcsize(fmt_)
    if len(buf) < offset + size:
        return bytes(data)
    struct.pack_into(fmt_, buf, offset, value % (1 << (8 * size)))
    return fix_crc(buf)


def _check_tensor(y: torch.Tensor, data: bytes) -> fmt.ChunkHeader:
    h = fmt.read_header(data)
    want_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[h.dtype]
    if tuple(y.shape) != h.shape or y.dtype != want_dtype:
        raise FuzzFinding(f"decoded {tuple(y.shape)} {y.dtype}, header says {h.shape} {h.dtype}")
    # Reconstruction is bounded (codec.MIN_STEP_EXP, profile value bounds) and raw rows are checked, so
    # only a float16 cast of a large value may overflow.
    if y.dtype != torch.float16 and not bool(torch.isfinite(y).all()):
        raise FuzzFinding("a chunk decoded to non-finite values")
    return h


def check_decode(data: bytes) -> torch.Tensor | None:
    """CPU decode: a tensor of the header's shape and dtype, or a typed error (returns None).

    Inputs of odd length are decoded naming the profile's model, as a client that knows it does; inputs
    whose length is a multiple of 3 under a decode limit of ``FUZZ_MAX_CHUNK_TOKENS`` tokens (the others
    under the profile's default), and the limit must hold exactly: refused only above it.
    """
    prof = profile_for(data)
    model = prof.model_fingerprint if len(data) % 2 else None
    limit = FUZZ_MAX_CHUNK_TOKENS if len(data) % 3 == 0 else None
    allowed = codec.default_max_chunk_tokens(prof) if limit is None else limit
    try:
        y = codec.decode_chunk(data, prof, model_fingerprint=model, backend="cpu", max_chunk_tokens=limit)
    except LimitExceededError:
        if fmt.read_header(data).n_tokens <= allowed:  # the limit is checked after the header parsed
            raise FuzzFinding("a chunk within the decode limit was refused as above it") from None
        return None
    except KvwireError:
        return None
    if _check_tensor(y, data).n_tokens > allowed:
        raise FuzzFinding("a chunk above the decode limit was decoded")
    return y


def check_gpu_validation(data: bytes) -> None:
    """The host-side checks and batch preparation in front of the Triton decode kernel, on CPU tensors.

    Asserts every precondition the kernel's memory accesses rely on, for the chunk alone and batched
    with a valid chunk of the same profile (the kernel decodes many chunks' segments in one launch).
    """
    from kvwire.kernels import gpu

    prof = profile_for(data)
    try:
        codec.validate_chunk(data, prof)
    except KvwireError:
        return
    batches = [[data]]
    seed = _valid_chunk_for(prof)
    if seed is not None:
        batches.append([seed, data])
    for batch in batches:
        try:
            staged = gpu.stage_chunks(batch, prof, torch.device("cpu"))
        except KvwireError:
            continue
        _check_decode_batch(gpu.prepare_decode(staged, prof))


def _check_decode_batch(b: object) -> None:
    """Every index the rANS and reconstruction kernels compute from the batch metadata (a row per chunk,
    plus the offsets and classes sections in the staged bytes, as the kernels read them) stays in
    bounds."""
    from kvwire.kernels import gpu

    assert isinstance(b, gpu.DecodeBatch)
    parsed = b.staged.parsed
    buf = b.staged.buf.numpy()
    n_bytes = buf.size
    meta = b.meta.numpy()
    B = len(parsed)
    SP = parsed[0][0].segments
    S = B * SP
    if (
        meta.shape != (B, gpu.CHUNK_META)
        or len(b.status) != S
        or sum(b.n_seg) != S
        or b.live.shape != (S, b.d)
    ):
        raise FuzzFinding("per-chunk or per-segment arrays disagree on the batch's size")
    if any(h.segments != SP or h.group_dim != b.d for h, _ in parsed):
        raise FuzzFinding("a chunk's segments or group dimension differ from the batch's")
    out_size: dict[str, int] = {}
    for c, ((h, _), o) in enumerate(zip(parsed, b.out_base, strict=True)):
        m = meta[c]
        lanes, n_tok = int(m[gpu.META_LANES]), int(m[gpu.META_TOKENS])
        if lanes < 1 or lanes > b.max_lanes or b.max_lanes > gpu.lane_block(b.max_lanes):
            raise FuzzFinding("lane counts exceed the kernel's lane block")
        if n_tok < 1 or n_tok > b.max_tokens:
            raise FuzzFinding("a chunk's token count exceeds the batch's")
        offs_at = int(m[gpu.META_OFFSETS])
        if offs_at < 0 or (offs_at + SP + 1) * 4 > n_bytes:
            raise FuzzFinding("a chunk's offsets section leaves the chunk buffer")
        offsets = buf[4 * offs_at : 4 * (offs_at + SP + 1)].view(np.uint32).astype(np.int64)
        w_start = int(m[gpu.META_WORDS]) + offsets[:-1]
        w_end = int(m[gpu.META_WORDS]) + offsets[1:]
        if np.any(w_start < 0) or np.any(w_start > w_end) or np.any(w_end > n_bytes // 2):
            raise FuzzFinding("a segment's word range leaves the chunk buffer")
        state0 = int(m[gpu.META_STATES])
        if state0 < 0 or state0 + SP * lanes > n_bytes // 4:
            raise FuzzFinding("a chunk's rANS states leave the chunk buffer")
        q0 = int(m[gpu.META_Q])
        if q0 < 0 or q0 + SP * b.d * n_tok > b.q.numel():
            raise FuzzFinding("a chunk's coefficient blocks leave the coefficient buffer")
        cls_at = int(m[gpu.META_CLASSES])
        if cls_at < 0 or cls_at + SP * b.d > n_bytes:
            raise FuzzFinding("a chunk's classes leave the chunk buffer")
        if np.any(buf[cls_at : cls_at + SP * b.d] >= table_bank().n_tables):
            raise FuzzFinding("a class indexes outside the table bank")
        if int(m[gpu.META_OUT]) != o:
            raise FuzzFinding("the chunk metadata's output offset disagrees with the batch's")
        out_size[h.dtype] = max(out_size.get(h.dtype, 0), o + h.elements)
        seg = np.arange(SP)
        head0 = (seg // h.groups) * h.kv_heads + (seg % h.groups) * (h.kv_heads // h.groups)
        offs = o + head0 * n_tok * h.head_dim
        block = h.heads_per_group * n_tok * h.head_dim  # one segment's output: its heads' rows
        if np.any(offs < o) or np.any(offs + block > o + h.elements):
            raise FuzzFinding("a segment's output block leaves its chunk's output")
        if b.rope and int(m[gpu.META_ROPE]) + n_tok > b.cos.shape[0]:
            raise FuzzFinding("a chunk's RoPE rows leave the cos/sin tables")


@cache
def _valid_chunks() -> dict[str, bytes]:
    """One small valid chunk per profile digest (for batching with a fuzzed chunk)."""
    out: dict[str, bytes] = {}
    for prof in profiles():
        x = torch.zeros(prof.layers, 2, prof.kv_heads, 3, prof.head_dim)
        x += torch.arange(prof.head_dim, dtype=torch.float32) * 0.25
        out[prof.digest] = codec.encode_chunk(x, prof, level=2, token_start=7, lanes=4).data
    return out


def _valid_chunk_for(prof: CalibrationProfile) -> bytes | None:
    return _valid_chunks().get(prof.digest)


def check_profile(data: bytes) -> CalibrationProfile | None:
    """Profile loading: a validated profile whose bytes round-trip to the same digest, or a typed error."""
    try:
        prof = CalibrationProfile.from_bytes(data)
    except KvwireError:
        return None
    again = CalibrationProfile.from_bytes(prof.to_bytes())
    if again.digest != prof.digest:
        raise FuzzFinding("a loaded profile does not round-trip to the same digest")
    # A profile that loads must also work: encode and decode a small chunk with it (or refuse, typed).
    x = torch.linspace(-2.0, 2.0, prof.head_dim).expand(prof.layers, 2, prof.kv_heads, 3, prof.head_dim)
    try:
        chunk = codec.encode_chunk(x.contiguous(), prof, level=1, token_start=2, lanes=2)
    except KvwireError:
        return prof
    _check_tensor(codec.decode_chunk(chunk.data, prof, backend="cpu"), chunk.data)
    return prof


CHECKS = {"decode": check_decode, "gpu_header": check_gpu_validation, "profile": check_profile}


def mutate_chunk(data: bytes, rng: random.Random, byte_mutator: object = None) -> bytes:
    """A chunk-aware mutation: byte-level (``byte_mutator`` or a bit flip), a header field rewrite, or a
    section-sized splice; then, most of the time, the CRC is recomputed so the result reaches the
    parser and decoder behind the checksum."""
    choice = rng.random()
    if choice < 0.25 and len(data) >= fmt.HEADER_SIZE:
        off, f = rng.choice(HEADER_FIELDS)
        size = struct.calcsize(f)
        old = struct.unpack_from(f, data, off)[0]
        value = rng.choice(
            [0, 1, old - 1, old + 1, old * 2, old // 2, (1 << (8 * size)) - 1, rng.getrandbits(8 * size)]
        )
        out = set_header_field(data, off, f, value)
    elif callable(byte_mutator):
        out = byte_mutator(data)
    else:
        buf = bytearray(data or b"\0")
        pos = rng.randrange(len(buf))
        buf[pos] ^= 1 << rng.randrange(8)
        out = bytes(buf)
    return fix_crc(out) if rng.random() < 0.9 else out


_CONFIG_VALUES: tuple[object, ...] = (0, -1, 1, 2, 3, 7, 1 << 20, 1 << 62, 0.5, -2.5, 1e308, "1", None, True)
_DTYPES = (np.float32, np.float64, np.float16, np.int8, np.int16, np.int32, np.uint8)


def mutate_profile(data: bytes, rng: random.Random, byte_mutator: object = None) -> bytes:
    """A profile-aware mutation: when ``data`` parses as safetensors, rewrite one config value, one
    metadata entry, or one tensor's dtype, shape or bytes, and serialise again (so the result reaches
    ``CalibrationProfile.validate``); otherwise, or one time in three, a byte-level mutation."""
    from safetensors.numpy import load as st_load
    from safetensors.numpy import save as st_save

    if rng.random() < 0.33 or not data:
        return byte_mutator(data) if callable(byte_mutator) else data[: rng.randrange(len(data) + 1)]
    try:
        tensors = dict(st_load(data))
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        meta = {str(k): str(v) for k, v in dict(header.get("__metadata__") or {}).items()}
        cfg = json.loads(meta.get("config", "{}"))
        if not isinstance(cfg, dict):
            cfg = {}
    except Exception:  # not a parseable profile: fall back to bytes
        return byte_mutator(data) if callable(byte_mutator) else data
    choice = rng.random()
    if choice < 0.4 and cfg:
        cfg[rng.choice(sorted(cfg))] = rng.choice((*_CONFIG_VALUES, float("nan"), float("inf")))
        meta["config"] = json.dumps(cfg)
    elif choice < 0.5:
        meta[rng.choice(["format", "version", "config"])] = rng.choice(["", "1", "2", "kvwire-profile", "{}"])
    elif tensors:
        name = rng.choice(sorted(tensors))
        arr = tensors[name]
        what = rng.randrange(4)
        if what == 0:
            with np.errstate(all="ignore"):
                tensors[name] = arr.astype(rng.choice(_DTYPES))
        elif what == 1 and arr.size:
            flat = arr.reshape(-1)
            tensors[name] = np.ascontiguousarray(flat[: rng.randrange(flat.size)])
        elif what == 2 and arr.size:
            raw = bytearray(arr.tobytes())
            raw[rng.randrange(len(raw))] = rng.randrange(256)
            tensors[name] = np.frombuffer(bytes(raw), dtype=arr.dtype).reshape(arr.shape).copy()
        else:
            del tensors[name]
    return bytes(st_save(tensors, metadata=meta))
