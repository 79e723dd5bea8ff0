"""The GPU path of the codec: the same bitstream, coded with Triton kernels and torch on the device.

Decoding is bit-identical to the CPU path (kvwire.kernels.codec): the rANS kernel reproduces
``rans.decode_segments`` word for word, including its corruption checks, and reconstruction repeats the
CPU's arithmetic op for op: an exact float64 GEMM of integers (the integer basis times the integer
coefficients, then one exact multiply by the step's power-of-two scale; see ``codec.reconstruct``),
``+ 0.0`` and a round-to-nearest cast to float32, ``+ mean`` as its own op, and RoPE as separate float32
multiplies and an add with the host's cos/sin tables. Every op is a separate torch kernel, so nothing is
contracted into a fused multiply-add.

Encoding is in ``kvwire.kernels.gpu_encode``.

On a machine without CUDA these functions still run on CPU tensors under ``TRITON_INTERPRET=1`` (how the
tests check them).
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from kvwire.errors import CorruptChunkError
from kvwire.kernels import codec, host_crc, rans
from kvwire.kernels import format as fmt
from kvwire.kernels.profile import CalibrationProfile
from kvwire.kernels.tables import table_bank
from kvwire.kernels.transform import rope_tables

# Launch shapes (measured on an H200, see docs/gpu.md); module-level so that benchmarks can sweep them.
# rans_warps 0: chosen per launch (wide lane vectors over several warps below rans_few segments).
# rans_lut8 and rans_prefetch are pairs: (below rans_few segments, at or above). rans_lut8: symbol lookup
# through the bank's uint8 table (else one packed int32 per slot); rans_prefetch: words ahead of each
# segment's stream position the rANS kernel touches every step (0: off). Both cut one chunk's rANS time
# by 15% and slowed 64 chunks by 2 to 7% (docs/gpu.md), hence per regime.
TUNING: dict[str, Any] = {
    "rans_segs": 1,
    "rans_warps": 0,
    "rans_few": 2048,
    "rans_lut8": (1, 0),
    "rans_prefetch": (64, 0),
    "recon_bt": 64,
    "recon_warps": 4,
}
T = TypeVar("T")
_STATUS_TEXT = {1: "bad initial state", 2: "overrun", 3: "unread words", 4: "bad final state"}


@functools.cache
def triton_available() -> bool:
    """Whether Triton imports (the GPU path needs it; CUDA itself is checked by the caller's device)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class _DeviceBank:
    freq: torch.Tensor  # int64 [n_tables, NUM_SYMBOLS]
    cum: torch.Tensor  # int64 [n_tables, NUM_SYMBOLS]
    lut: torch.Tensor  # int32 [n_tables, PROB_SCALE]
    extra: torch.Tensor  # int32 [NUM_SYMBOLS]
    code_length: torch.Tensor  # float64 [n_tables - 1, NUM_SYMBOLS] (table 0 left out)


@functools.cache
def _device_bank(device: torch.device) -> _DeviceBank:
    """The table bank, uploaded once per device."""
    bank = table_bank()
    return _DeviceBank(
        freq=torch.from_numpy(bank.freq.astype(np.int64)).to(device),
        cum=torch.from_numpy(bank.cum.astype(np.int64)).to(device),
        lut=torch.from_numpy(bank.lut.astype(np.int32)).to(device),
        extra=torch.from_numpy(rans.symbol_extra_bits()).to(device),
        code_length=torch.from_numpy(np.ascontiguousarray(bank.code_length[1:])).to(device),
    )


class ProfileCache(Generic[T]):
    """Data built from a calibration profile for one device, kept for the few most recent (profile, device)
    pairs: the GPU decoder and encoder each keep their matrices on the device this way, since a server
    may see many models. Thread-safe; a pair built twice at once keeps the later copy."""

    def __init__(self, size: int, build: Callable[[CalibrationProfile, torch.device], T]) -> None:
        self.size = size
        self._build = build
        self._items: OrderedDict[tuple[str, str], T] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, profile: CalibrationProfile, device: torch.device) -> T:
        key = (profile.digest, str(device))
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
                return item
        item = self._build(profile, device)  # outside the lock: uploads take a while
        with self._lock:
            self._items[key] = item
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return item

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class _DeviceProfile:
    basis: torch.Tensor  # float64 [S, d, d]: the integer basis (exact in float64)
    basis_exp: np.ndarray  # int64 [S]
    mean: torch.Tensor  # float32 [S, d]
    b0: torch.Tensor  # int8 [S, d, d]: basis & 127 (the reconstruction kernel's low digit)
    b1: torch.Tensor  # int8 [S, d, d]: basis >> 7 (high digit, -128..127 as |basis| < 2**14)


def _build_device_profile(profile: CalibrationProfile, device: torch.device) -> _DeviceProfile:
    S, d = profile.layers * 2 * profile.groups, profile.group_dim
    basis = np.ascontiguousarray(profile.basis.reshape(S, d, d)).astype(np.int16)
    return _DeviceProfile(
        basis=torch.from_numpy(profile.basis.reshape(S, d, d).astype(np.float64)).to(device),
        basis_exp=profile.basis_exp.reshape(S).astype(np.int64),
        mean=torch.from_numpy(np.ascontiguousarray(profile.mean.reshape(S, d), np.float32)).to(device),
        b0=torch.from_numpy((basis & 127).astype(np.int8)).to(device),
        b1=torch.from_numpy((basis >> 7).astype(np.int8)).to(device),
    )


PROFILE_CACHE_SIZE = 8  # profiles (per device) kept on the GPU; a server may see many models
_PROFILE_CACHE = ProfileCache(PROFILE_CACHE_SIZE, _build_device_profile)


def _device_profile(profile: CalibrationProfile, device: torch.device) -> _DeviceProfile:
    """A profile's decoder matrices on ``device``, cached by digest."""
    return _PROFILE_CACHE.get(profile, device)


_STAGING: dict[str, torch.Tensor] = {}
_STAGING_LOCK = threading.Lock()  # one staging buffer per device, shared by every decoding thread
_STAGING_READ: dict[str, torch.cuda.Event] = {}  # recorded after the last uploads from that buffer


def _staging(device: torch.device, nbytes: int) -> torch.Tensor:
    stage = _STAGING.get(str(device))
    if stage is None or stage.numel() < nbytes:
        stage = torch.empty(max(nbytes, 1 << 24), dtype=torch.uint8, pin_memory=True)
        _STAGING[str(device)] = stage
    return stage


@dataclass(frozen=True)
class StagedBatch:
    """A batch of validated chunks whose bytes sit, back to back, in one buffer on the device."""

    parsed: list[tuple[fmt.ChunkHeader, fmt.ChunkSections]]  # host views of each chunk's sections
    base: list[int]  # byte offset of each chunk in ``buf`` (multiples of 4: chunk sizes are)
    buf: torch.Tensor  # uint8 on the device


def stage_chunks(
    chunks: Sequence[bytes | memoryview],
    profile: CalibrationProfile,
    device: torch.device,
    model_fingerprint: str | None = None,
    max_chunk_tokens: int | None = None,  # decode-size limit, see codec.check_chunk_tokens
) -> StagedBatch:
    """Validate every chunk (header, sizes, profile, checksum) and upload all their bytes at once.

    Headers and section bounds are checked on the calling thread; the CRC-32s run in a thread pool, each
    thread also copying its bytes into one reused pinned buffer; each chunk's upload starts as soon as
    its bytes are there, overlapping the later chunks' checksums. A bad checksum raises before the
    caller can launch anything. The pinned buffer keeps the size of the largest batch seen.

    The uploads are queued on the current stream and not waited for: work queued there afterwards (the
    decode kernels) sees the bytes, and the host goes on preparing the launches meanwhile. The next call
    waits for them before it writes the pinned buffer again.
    """
    parsed = [
        codec.validate_chunk(
            c, profile, model_fingerprint, verify_crc=False, max_chunk_tokens=max_chunk_tokens
        )
        for c in chunks
    ]
    views = [memoryview(c).cast("B") for c in chunks]
    base = np.cumsum([0] + [len(v) for v in views]).tolist()
    total = base[-1]
    cuda = device.type == "cuda"
    with _STAGING_LOCK:
        read = _STAGING_READ.pop(str(device), None) if cuda else None
        if read is not None:  # the previous batch's uploads are done with the pinned buffer
            read.synchronize()
        host = _staging(device, total).numpy() if cuda else np.empty(total, dtype=np.uint8)
        buf = torch.empty(total, dtype=torch.uint8, device=device) if cuda else torch.from_numpy(host)
        bad = None
        try:
            for i, (stored, computed) in enumerate(_checksum_and_copy(views, base, host)):
                if stored != computed and bad is None:
                    bad = i
                if cuda and bad is None:  # this chunk's bytes are staged: start its upload at once
                    lo, hi = base[i], base[i + 1]
                    buf[lo:hi].copy_(torch.from_numpy(host[lo:hi]), non_blocking=True)
        finally:
            if cuda:  # the staging buffer is free again once these uploads are done
                read = torch.cuda.Event()
                read.record(torch.cuda.current_stream(device))
                _STAGING_READ[str(device)] = read
        if bad is not None:
            raise CorruptChunkError(f"chunk {bad} checksum mismatch: the bytes were corrupted")
    return StagedBatch(parsed=parsed, base=base[:-1], buf=buf)


def _checksum_and_copy(
    views: list[memoryview], base: list[int], host: np.ndarray
) -> Iterator[tuple[int, int]]:
    """Each chunk's (stored, computed) CRC-32 in order, computed in threads that also copy the bytes to
    ``host``; a chunk's pair is yielded once all its bytes are there."""
    combine = host_crc.crc32_combine()

    def piece(i: int, lo: int, hi: int) -> int:
        v = views[i]
        host[base[i] + lo : base[i] + hi] = np.frombuffer(v[lo:hi], dtype=np.uint8)
        if lo == 0:  # the header, with its CRC field zeroed, then the rest of the piece
            head = bytes(v[: fmt.HEADER_SIZE - 4]) + b"\0\0\0\0"
            return fmt.crc32(v[fmt.HEADER_SIZE : hi], fmt.crc32(head))
        return fmt.crc32(v[lo:hi])

    jobs: list[list[tuple[int, concurrent.futures.Future[int]]]] = []
    pool = host_crc.pool()
    for i, v in enumerate(views):
        step = host_crc.PIECE if combine is not None else len(v)
        cuts = [0, *range(max(step, fmt.HEADER_SIZE), len(v), step), len(v)]
        jobs.append([(hi - lo, pool.submit(piece, i, lo, hi)) for lo, hi in itertools.pairwise(cuts)])
    for i, parts in enumerate(jobs):
        crc = parts[0][1].result()
        for n, fut in parts[1:]:
            assert combine is not None
            crc = combine(crc, fut.result(), n)
        stored = int.from_bytes(views[i][fmt.HEADER_SIZE - 4 : fmt.HEADER_SIZE], "little")
        yield stored, crc & 0xFFFFFFFF


def live_lists(classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The lane plan's live components: (int32 [S, d] live components first, in order; int32 [S] count)."""
    dead = (classes == 0).to(torch.int8)
    live = torch.sort(dead, dim=1, stable=True).indices.to(torch.int32).contiguous()
    return live, (1 - dead).sum(1, dtype=torch.int32)


def lane_block(lanes: int) -> int:
    """The Triton block (a power of two, at least 16) holding a segment's ``lanes`` rANS lanes."""
    return max(16, 1 << (max(lanes, 1) - 1).bit_length())


# ----------------------------------------------------------------------------------------------- decode


def decode_chunks_gpu(
    chunks: Sequence[bytes | memoryview],
    profile: CalibrationProfile,
    *,
    model_fingerprint: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    max_chunk_tokens: int | None = None,  # decode-size limit, see codec.check_chunk_tokens
) -> list[torch.Tensor]:
    """Decode many chunks with one rANS launch and one reconstruction launch; each ``[L, 2, H, T, D]``.

    Every chunk is validated (header, sizes, checksum, profile) before anything is uploaded or launched.
    The results are views into one buffer, in each chunk's dtype unless ``dtype`` asks for another.
    """
    if not chunks:
        return []
    dev = _resolve_device(device)
    staged = stage_chunks(chunks, profile, dev, model_fingerprint, max_chunk_tokens)
    return decode_staged(staged, profile, dtype=dtype)


def decode_staged(
    staged: StagedBatch, profile: CalibrationProfile, *, dtype: torch.dtype | None = None
) -> list[torch.Tensor]:
    """Decode a batch whose bytes are already on the device (see ``stage_chunks``)."""
    batch = prepare_decode(staged, profile)
    if batch.fused:
        outs = launch_kernels(batch)
    else:
        launch_decode(batch)
        check_status(batch)
        outs = _reconstruct_unfused(batch, profile)
    results = []
    for i, out in enumerate(outs):  # queued behind the kernels: the host work overlaps them
        _overwrite_raw_staged(out, staged, i, batch.raw_rows[i])
        results.append(out if dtype is None or dtype == out.dtype else out.to(dtype))
    if batch.fused:
        check_status(batch)  # the one synchronisation; a corrupt segment discards the results
    return results


def _overwrite_raw_staged(result: torch.Tensor, staged: StagedBatch, i: int, where: torch.Tensor) -> None:
    """Put a chunk's raw rows in place with one indexed copy: values read straight from its bytes on the
    device, positions ``where`` (int64 [2, n_raw] on the device, from ``prepare_decode``)."""
    h = staged.parsed[i][0]
    if h.n_raw == 0:
        return
    off = fmt.section_offsets(h)["raw_values"] + staged.base[i]
    nbytes = h.n_raw * h.kv_heads * h.head_dim * fmt.DTYPE_BYTES[h.dtype]
    values = staged.buf[off : off + nbytes].view(result.dtype).view(h.n_raw, h.kv_heads, h.head_dim)
    rows = result.view(h.layers * 2, h.kv_heads, h.n_tokens, h.head_dim)
    rows[where[0], :, where[1], :] = values


# The decoder's metadata: a few int64s per chunk (columns below), from which both kernels find each
# segment's word range, states, classes, coefficient block and output rows in the chunk bytes themselves.
CHUNK_META = 9
META_WORDS = 0  # 16-bit word index of the chunk's words section in the staged bytes
META_OFFSETS = 1  # 32-bit word index of its offsets section (segment s: words [off[s], off[s + 1]))
META_STATES = 2  # 32-bit word index of its states section (segment s: lanes states from s * lanes)
META_LANES = 3
META_TOKENS = 4
META_Q = 5  # first element of the chunk's coefficients in DecodeBatch.q (segment s: + s * d * tokens)
META_CLASSES = 6  # byte position of its classes section (segment s: d bytes from s * d)
META_OUT = 7  # first element of the chunk in its dtype's output buffer
META_ROPE = 8  # first cos/sin row (its first token's position in the tables)


@dataclass(frozen=True)
class DecodeBatch:
    """The decoder's inputs for a batch of chunks, on the device (see ``prepare_decode``)."""

    staged: StagedBatch
    meta: torch.Tensor  # int64 [B, CHUNK_META]
    scale: torch.Tensor  # float64 [S]: mant * 2**-(exp + basis_exp)
    live: torch.Tensor  # int32 [S, d]: scratch for the rANS kernel's lane plan
    q: torch.Tensor  # int32, flat: chunk after chunk, each [segments, tokens, d]
    status: torch.Tensor  # int32 [all segments]
    n_seg: list[int]
    out_base: list[int]  # each chunk's first element in its dtype's output buffer
    cos: torch.Tensor  # float32 [rows, head_dim / 2] (empty without RoPE)
    sin: torch.Tensor
    d: int
    max_lanes: int
    max_tokens: int
    fused: bool  # reconstruction by the Triton kernel (else the torch fallback, see ``_fusable``)
    rope: bool
    dp: _DeviceProfile
    q_base: list[int]  # each chunk's first element in ``q``
    raw_rows: list[torch.Tensor]  # int64 [2, n_raw] per chunk: each raw row's (layer * 2 + kv, token)


def _fusable(profile: CalibrationProfile) -> bool:
    """Whether the one-pass reconstruction kernel covers this profile's layout (rotary over whole heads)."""
    D = profile.head_dim
    return D % 2 == 0 and (not profile.has_rope or 2 * profile.inv_freq.size == D)


def _host_buffer(n: int, device: torch.device) -> torch.Tensor:
    """An int64 host tensor of ``n`` for one upload: pinned for a CUDA device (torch's caching host
    allocator hands it out again only after the copy that reads it is done), so the upload is
    asynchronous; a pageable copy would wait for the stream's earlier work."""
    return torch.empty(n, dtype=torch.int64, pin_memory=device.type == "cuda")


def prepare_decode(staged: StagedBatch, profile: CalibrationProfile) -> DecodeBatch:
    """The kernels' inputs for a staged batch: ``CHUNK_META`` int64s per chunk, each segment's step
    scale, the raw rows' positions, in one asynchronous upload; nothing waits for the device.

    Every chunk has the profile's segments and group dimension (checked by ``validate_chunk``), so the
    kernels derive each segment's ranges from its chunk's row and the sections in the staged bytes
    (offsets, states, classes); the host work is a few numpy ops over [chunks] and one over
    [chunks, segments] for the scales.
    """
    parsed = staged.parsed
    dev = staged.buf.device
    dp = _device_profile(profile, dev)
    h0 = parsed[0][0]
    d, SP = h0.group_dim, h0.segments
    B = len(parsed)
    S = B * SP
    lanes = np.array([h.lanes for h, _ in parsed], dtype=np.int64)
    tokens = np.array([h.n_tokens for h, _ in parsed], dtype=np.int64)
    sections: dict[int, dict[str, int]] = {}  # the sections up to the words depend only on the lanes
    for h, _ in parsed:
        if h.lanes not in sections:
            sections[h.lanes] = fmt.section_offsets(h)
    at = {
        k: np.asarray(staged.base, dtype=np.int64)
        + np.array([sections[h.lanes][k] for h, _ in parsed], dtype=np.int64)
        for k in ("classes", "states", "offsets", "words")
    }
    q_base = np.zeros(B + 1, dtype=np.int64)
    np.cumsum(SP * d * tokens, out=q_base[1:])
    out_base: list[int] = []
    out_pos: dict[str, int] = {}
    for h, _ in parsed:
        o = out_pos.get(h.dtype, 0)
        out_base.append(o)
        out_pos[h.dtype] = o + h.elements
    cos, sin, rows = _rope_rows(staged, profile)
    # One int64 upload: chunk metadata [B, CHUNK_META], scale [S] (float64 bits), then per chunk with raw
    # rows their (layer * 2 + kv, token) positions [2, n_raw].
    raw_at: list[int] = []
    pos = CHUNK_META * B + S
    for h, _ in parsed:
        raw_at.append(pos)
        pos += 2 * h.n_raw
    host = _host_buffer(pos, dev)
    meta = host.numpy()
    chunk = meta[: CHUNK_META * B].reshape(B, CHUNK_META)
    chunk[:, META_WORDS] = at["words"] // 2
    chunk[:, META_OFFSETS] = at["offsets"] // 4
    chunk[:, META_STATES] = at["states"] // 4
    chunk[:, META_LANES] = lanes
    chunk[:, META_TOKENS] = tokens
    chunk[:, META_Q] = q_base[:-1]
    chunk[:, META_CLASSES] = at["classes"]
    chunk[:, META_OUT] = out_base
    chunk[:, META_ROPE] = rows
    mant = np.stack([sec.step_mant for _, sec in parsed]).astype(np.float64)
    exp = np.stack([sec.step_exp for _, sec in parsed]).astype(np.int64) + dp.basis_exp[None, :]
    meta[CHUNK_META * B : CHUNK_META * B + S].view(np.float64)[:] = np.ldexp(mant, -exp).ravel()
    for (h, sec), a in zip(parsed, raw_at, strict=True):
        if h.n_raw:  # raw_index = (layer * 2 + kv) * tokens + token, increasing, in range (validated)
            lk, tok = np.divmod(sec.raw_index.astype(np.int64), h.n_tokens)
            meta[a : a + h.n_raw] = lk
            meta[a + h.n_raw : a + 2 * h.n_raw] = tok
    meta_d = host.to(dev, non_blocking=True) if dev.type == "cuda" else host
    fused = _fusable(profile)
    q = (torch.empty if fused else torch.zeros)(int(q_base[-1]) + 1, dtype=torch.int32, device=dev)
    return DecodeBatch(
        staged=staged,
        meta=meta_d[: CHUNK_META * B].view(B, CHUNK_META),
        scale=meta_d[CHUNK_META * B : CHUNK_META * B + S].view(torch.float64),
        live=torch.empty(S, d, dtype=torch.int32, device=dev),
        q=q,
        status=torch.empty(S, dtype=torch.int32, device=dev),
        n_seg=[SP] * B,
        out_base=out_base,
        cos=cos,
        sin=sin,
        d=d,
        max_lanes=int(lanes.max()),
        max_tokens=int(tokens.max()),
        fused=fused,
        rope=profile.has_rope,
        dp=dp,
        q_base=q_base[:-1].tolist(),
        raw_rows=[
            meta_d[a : a + 2 * h.n_raw].view(2, h.n_raw) for (h, _), a in zip(parsed, raw_at, strict=True)
        ],
    )


_ROPE_CACHE: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
_ROPE_CACHED_POSITIONS = 1 << 18  # positions below this share one cached table per profile and device


def _rope_rows(
    staged: StagedBatch, profile: CalibrationProfile
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """cos/sin tables (float32 [rows, rotary_dim / 2], the host's ``rope_tables``) and each chunk's first row.

    Positions below 2**18 index one table per profile and device, grown by powers of two and kept;
    a batch reaching beyond gets its own table of just its positions.
    """
    dev = staged.buf.device
    if not profile.has_rope:
        empty = torch.zeros(1, dtype=torch.float32, device=dev)
        return empty, empty, [0] * len(staged.parsed)
    half = profile.inv_freq.size
    ends = [h.token_start + h.n_tokens for h, _ in staged.parsed]
    if max(ends) <= _ROPE_CACHED_POSITIONS:
        key = (profile.digest, str(dev))
        cached = _ROPE_CACHE.get(key)
        if cached is None or cached[0].shape[0] < max(ends):
            n = max(4096, 1 << (max(ends) - 1).bit_length())
            c, s = rope_tables(np.arange(n), profile.inv_freq, profile.rope_scaling)
            cached = (
                torch.from_numpy(np.ascontiguousarray(c[:, :half])).to(dev),
                torch.from_numpy(np.ascontiguousarray(s[:, :half])).to(dev),
            )
            _ROPE_CACHE[key] = cached
        return cached[0], cached[1], [h.token_start for h, _ in staged.parsed]
    scaling = profile.rope_scaling
    parts = [
        rope_tables(np.arange(h.token_start, h.token_start + h.n_tokens), profile.inv_freq, scaling)
        for h, _ in staged.parsed
    ]
    rows = np.cumsum([0] + [h.n_tokens for h, _ in staged.parsed])[:-1].tolist()
    cos = torch.from_numpy(np.concatenate([c[:, :half] for c, _ in parts])).to(dev)
    sin = torch.from_numpy(np.concatenate([s[:, :half] for _, s in parts])).to(dev)
    return cos, sin, rows


@functools.cache
def _packed_table(device: torch.device) -> torch.Tensor:
    """The bank as one int32 per (table, slot): symbol | freq << 6 | (slot - cum) << 19, uploaded once."""
    bank = table_bank()
    slot = np.arange(rans.PROB_SCALE, dtype=np.int64)[None, :]
    sym = bank.lut.astype(np.int64)
    f = np.take_along_axis(bank.freq.astype(np.int64), sym, axis=1)
    c = np.take_along_axis(bank.cum.astype(np.int64), sym, axis=1)
    packed = (sym | (f << 6) | ((slot - c) << 19)).astype(np.uint32).view(np.int32)
    return torch.from_numpy(np.ascontiguousarray(packed)).to(device)


@functools.cache
def _lut8_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The bank's uint8 slot->symbol table [n_tables, PROB_SCALE] and int32 freq | cum << 13 per
    (table, symbol) [n_tables, 64], uploaded once (the kernel's ``LUT8`` lookup)."""
    bank = table_bank()
    fc = np.zeros((bank.n_tables, 64), dtype=np.int64)
    fc[:, : rans.NUM_SYMBOLS] = bank.freq.astype(np.int64) | (bank.cum.astype(np.int64) << 13)
    lut = torch.from_numpy(np.ascontiguousarray(bank.lut, dtype=np.uint8)).to(device)
    return lut, torch.from_numpy(fc.astype(np.int32)).to(device)


_SINKS: dict[str, torch.Tensor] = {}


def _sink(device: torch.device, n: int) -> torch.Tensor:
    """A scratch int32 buffer of at least ``n`` for the rANS kernel's prefetch results (never read; any
    thread may overwrite it at any time)."""
    sink = _SINKS.get(str(device))
    if sink is None or sink.numel() < n:
        sink = torch.empty(max(n, 1 << 16), dtype=torch.int32, device=device)
        _SINKS[str(device)] = sink
    return sink


def launch_decode(batch: DecodeBatch) -> None:
    """Run the rANS decode kernel over every segment of the batch (asynchronous)."""
    import triton

    from kvwire.kernels import triton_rans as tr

    buf = batch.staged.buf
    block = lane_block(batch.max_lanes)
    S = len(batch.status)
    segs = TUNING["rans_segs"]
    # Few segments (one chunk): spread wide lane vectors over warps for latency; many: one warp each,
    # for occupancy (measured, docs/gpu.md).
    few = TUNING["rans_few"] > S
    warps = TUNING["rans_warps"] or (max(1, min(4, block // 32)) if few else 1)
    lut8 = bool(TUNING["rans_lut8"][0 if few else 1])
    prefetch = int(TUNING["rans_prefetch"][0 if few else 1])
    if lut8:
        table, symtab = _lut8_tables(buf.device)
    else:
        table = symtab = _packed_table(buf.device)
    tr.decode_kernel[(triton.cdiv(S, segs),)](
        buf.view(torch.int16), buf.view(torch.int32), buf, batch.meta, batch.live, batch.q, table, symtab,
        batch.status, _sink(buf.device, S), S, batch.n_seg[0], batch.d, META=CHUNK_META, SEGS=segs,
        BLOCK=block, DBLOCK=lane_block(batch.d), LUT8=lut8, PREFETCH=prefetch, num_warps=warps,
        **tr.DECODE_CONSTANTS,
    )  # fmt: skip


def launch_reconstruct(batch: DecodeBatch) -> list[torch.Tensor]:
    """Reconstruct every chunk (after ``launch_decode``), one launch per run of consecutive chunks with
    the same dtype; each chunk's ``[L, 2, H, T, D]`` view into one output buffer per dtype."""
    import triton

    from kvwire.kernels import triton_recon as trc

    parsed = batch.staged.parsed
    h0 = parsed[0][0]
    D, d, SP, G = h0.head_dim, h0.group_dim, h0.segments, h0.groups
    sizes: dict[str, int] = {}
    for (h, _), o in zip(parsed, batch.out_base, strict=True):
        sizes[h.dtype] = max(sizes.get(h.dtype, 0), o + h.elements)
    dev = batch.q.device
    outs = {name: torch.empty(n, dtype=codec._TORCH_DTYPES[name], device=dev) for name, n in sizes.items()}
    dp = batch.dp
    BT = TUNING["recon_bt"]
    i = 0
    while i < len(parsed):
        k = i + 1
        while k < len(parsed) and parsed[k][0].dtype == parsed[i][0].dtype:
            k += 1
        a, b = i * SP, k * SP  # every chunk has the profile's SP segments
        grid = (triton.cdiv(batch.max_tokens, BT), b - a, h0.heads_per_group)
        wide = torch.empty(grid[0] * grid[1] * grid[2], dtype=torch.int8, device=dev)
        # Two launches of one kernel: every tile whose coefficients fit in int8 (two dots), then the
        # rest, flagged by the first (six dots; their code apart keeps the first out of register spills).
        for w in (0, 1):
            trc.reconstruct_kernel[grid](
                batch.q, batch.meta[i:k], batch.scale[a:b], batch.staged.buf, dp.b0, dp.b1, dp.mean,
                batch.cos, batch.sin, outs[parsed[i][0].dtype], wide, d, SP, G, h0.kv_heads, META=CHUNK_META,
                HALF=D // 2, HAS_ROPE=batch.rope, BT=BT, KP=max(32, triton.next_power_of_2(d)),
                HALFP=max(16, triton.next_power_of_2(D // 2)), QVEC=min(16, d & -d),
                OVEC=min(16, D & -D), WIDE=w,
                num_warps=TUNING["recon_warps"], enable_fp_fusion=False,
            )  # fmt: skip
        i = k
    views = zip(parsed, batch.out_base, strict=True)
    return [outs[h.dtype][o : o + h.elements].view(h.shape) for (h, _), o in views]


def launch_kernels(batch: DecodeBatch) -> list[torch.Tensor]:
    """Both kernels over the batch, one launch each (asynchronous); each chunk's ``[L, 2, H, T, D]``
    view. (Groups of chunks overlapping the two kernels on two streams were slower, docs/gpu.md.)"""
    launch_decode(batch)
    return launch_reconstruct(batch)


def check_status(batch: DecodeBatch) -> None:
    """Raise CorruptChunkError naming the first segment the rANS kernel found corrupt (synchronises)."""
    bad = batch.status.cpu().numpy()
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        chunk = int(np.searchsorted(np.cumsum(batch.n_seg), first, side="right"))
        seg = first - int(np.sum(batch.n_seg[:chunk]))
        why = _STATUS_TEXT.get(int(bad[first]), "?")
        raise CorruptChunkError(f"entropy-coded segment {seg} of chunk {chunk} is corrupt ({why})")


def _reconstruct_unfused(batch: DecodeBatch, profile: CalibrationProfile) -> list[torch.Tensor]:
    """Torch reconstruction (op for op the CPU's) for layouts the kernel does not cover."""
    parsed = batch.staged.parsed
    results: list[torch.Tensor] = []
    i = 0
    while i < len(parsed):  # runs of consecutive chunks with the same token count go together
        j = i + 1
        while j < len(parsed) and parsed[j][0].n_tokens == parsed[i][0].n_tokens:
            j += 1
        results.extend(
            _reconstruct_run(parsed[i:j], batch.q, batch.q_base[i], batch.dp, profile, batch.q.device, None)
        )
        i = j
    return results


def _rope_tensors(
    starts: Sequence[int], n_tok: int, profile: CalibrationProfile, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Host-computed float32 cos/sin (the CPU path's very tables) for each chunk: [B, T, r]."""
    cs = [rope_tables(np.arange(s, s + n_tok), profile.inv_freq, profile.rope_scaling) for s in starts]
    cos = torch.from_numpy(np.stack([c for c, _ in cs])).to(device)
    sin = torch.from_numpy(np.stack([s for _, s in cs])).to(device)
    return cos, sin


def _reconstruct_run(
    parsed: Sequence[tuple[fmt.ChunkHeader, fmt.ChunkSections]],
    q_flat: torch.Tensor,
    base: int,
    dp: _DeviceProfile,
    profile: CalibrationProfile,
    device: torch.device,
    dtype: torch.dtype | None,
) -> list[torch.Tensor]:
    """Exact inverse transform of B chunks with the same token count (see the module docstring)."""
    h0 = parsed[0][0]
    B, L, G, hpg, D = len(parsed), h0.layers, h0.groups, h0.heads_per_group, h0.head_dim
    T, d, S = h0.n_tokens, h0.group_dim, h0.segments
    q = q_flat[base : base + B * S * d * T].view(B, S, T, d)
    # Exact: integer coefficients times integer basis, partial sums far below 2**53.
    acc = torch.matmul(q.to(torch.float64), dp.basis)  # [B, S, T, d]
    mant = np.stack([sec.step_mant.astype(np.float64) for _, sec in parsed])
    exp = np.stack([sec.step_exp.astype(np.int64) for _, sec in parsed]) + dp.basis_exp[None]
    scale = torch.from_numpy(np.ldexp(mant, -exp)).to(device)  # exact: 8-bit mantissa x power of two
    # `+ 0.0` as the CPU path: a zero sum becomes +0 whatever sign the GEMM gave it. (In place: the
    # float64 buffer is the largest of the decoder's.)
    acc.mul_(scale[:, :, None, None]).add_(0.0)
    y = acc.to(torch.float32)
    del acc
    y = y + dp.mean[None, :, None, :]
    classes = torch.from_numpy(np.stack([sec.classes for _, sec in parsed])).to(device)
    all_dead = (classes == 0).all(dim=2)  # the CPU path copies the mean as is for these segments
    y = torch.where(all_dead[:, :, None, None], dp.mean[None, :, None, :].expand_as(y), y)
    x = y.view(B, L, 2, G, T, hpg, D).permute(0, 1, 2, 3, 5, 4, 6).reshape(B, L, 2, G * hpg, T, D)
    if profile.has_rope:
        cos, sin = _rope_tensors([h.token_start for h, _ in parsed], T, profile, device)
        r = cos.shape[-1]
        half = r // 2
        keys = x[:, :, 0]  # [B, L, H, T, D]
        rot = keys[..., :r]
        cb, sb = cos[:, None, None], sin[:, None, None]
        a = rot * cb
        b = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1) * sb
        keys[..., :r] = a + b
    results = []
    for i, (h, sec) in enumerate(parsed):
        native = codec._TORCH_DTYPES[h.dtype]
        result = x[i].to(native)
        _overwrite_raw_gpu(result, h, sec)
        results.append(result.to(dtype=dtype or native))
    return results


def _overwrite_raw_gpu(result: torch.Tensor, h: fmt.ChunkHeader, sec: fmt.ChunkSections) -> None:
    if h.n_raw == 0:
        return
    idx = sec.raw_index.astype(np.int64)
    layer, rest = np.divmod(idx, 2 * h.n_tokens)
    k, tok = np.divmod(rest, h.n_tokens)
    values = torch.from_numpy(np.ascontiguousarray(sec.raw_values).copy()).view(result.dtype)
    values = values.reshape(h.n_raw, h.kv_heads, h.head_dim).to(result.device)
    dev = result.device
    result[
        torch.from_numpy(layer).to(dev), torch.from_numpy(k).to(dev), :, torch.from_numpy(tok).to(dev), :
    ] = values
