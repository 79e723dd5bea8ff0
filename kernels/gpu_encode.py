"""The GPU encoder: KV tensors on a CUDA device -> packed kvwire chunks in host memory.

A batch of chunks of one shape goes through four Triton launches (``kvwire.kernels.triton_encode``):
the transform (RoPE off, mean, forward matrix, step, rounding, raw-row flags), the table choice in two
(symbol counts per component into memory, then float64 table costs) and the rANS encoder. The chunk
bytes are then assembled on the device (header, fixed sections, words, raw rows; docs/format.md),
copied to pinned host memory chunk after chunk, and checksummed by the threads that decode staging
uses (ISA-L CRC-32 in pieces, combined), each chunk as soon as its bytes are in. Two small reads
synchronise the host: the non-finite flag and raw-row counts before the rANS launch (bad input raises
``InvalidInputError`` before any coding), and the word counts that size the packed buffer.

The bitstream is the CPU encoder's (``codec.encode_chunk``): when the float32 transform gives the same
integer coefficients (the GEMM's summation order may round a coefficient at a half-step boundary the
other way), the bytes are identical; any stream decodes identically on both paths.

On a machine without CUDA the kernels run on CPU tensors under ``TRITON_INTERPRET=1`` (the tests).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kvwire.errors import InvalidInputError
from kvwire.kernels import codec, gpu, host_crc, rans
from kvwire.kernels import format as fmt
from kvwire.kernels.profile import CalibrationProfile
from kvwire.kernels.tables import TABLE_BANK_VERSION, table_bank

# Launch shapes, the transform's dot precision and the chunks per sub-batch (measured on an H200,
# docs/gpu.md); module-level so benchmarks can sweep them. "ieee" is float32 on the CUDA cores (as the
# CPU's float32 GEMM); "tf32x3" (three tensor-core products) measured slower, plain "tf32" changes
# about 1% of the coefficients. count_tokens: tokens per load of the counting kernel (8: 4.2 ms for 64
# Llama chunks, one token a step 6.7 ms). Sub-batches overlap nothing measurable (64 Llama chunks:
# 16 per sub-batch 53.5 ms, 32 49.1 ms, one batch 50.1 ms; docs/gpu.md): 64 keeps batches up to 64
# chunks whole and bounds device memory above.
TUNING: dict[str, int | str] = {
    "bt": 64,
    "bn": 64,
    "bk": 32,
    "warps": 4,
    "precision": "ieee",
    "count_warps": 1,
    "count_tokens": 8,
    "cost_bc": 32,
    "cost_warps": 4,
    "sub_batch": 64,
}
_HUGE_COST = 1e300  # cost of the padding tables: never the cheapest, finite (0 * inf would be NaN)


@dataclass(frozen=True)
class _EncoderProfile:
    mean: torch.Tensor  # float32 [S, d]
    forward: torch.Tensor  # float32 [S, d, d]
    inv_freq: torch.Tensor  # float64 [rotary_dim / 2]


def _build_encoder_profile(profile: CalibrationProfile, device: torch.device) -> _EncoderProfile:
    S, d = profile.layers * 2 * profile.groups, profile.group_dim
    forward = np.ascontiguousarray(codec.profile_forward(profile).reshape(S, d, d))
    return _EncoderProfile(
        mean=torch.from_numpy(np.ascontiguousarray(profile.mean.reshape(S, d), np.float32)).to(device),
        forward=torch.from_numpy(forward).to(device),
        inv_freq=torch.from_numpy(profile.inv_freq.astype(np.float64)).to(device),
    )


_PROFILES = gpu.ProfileCache(gpu.PROFILE_CACHE_SIZE, _build_encoder_profile)


def _encoder_profile(profile: CalibrationProfile, device: torch.device) -> _EncoderProfile:
    """The profile's encoder matrices on ``device``, cached by digest (a few most recent)."""
    return _PROFILES.get(profile, device)


_BANKS: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def _encoder_bank(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(int32 [n_tables, NUM_SYMBOLS] freq | cum << 13; float64 [NUM_SYMBOLS, KA + KB] costs), per device.

    Column k of the costs is table k + 1's code length per symbol (raw bits included), as the CPU's
    ``choose_tables`` uses; columns past the bank cost ``_HUGE_COST``.
    """
    key = str(device)
    if key not in _BANKS:
        bank = table_bank()
        packed = (bank.freq.astype(np.int64) | (bank.cum.astype(np.int64) << 13)).astype(np.int32)
        n = bank.n_tables - 1
        cost = np.full((rans.NUM_SYMBOLS, sum(_cost_blocks(n))), _HUGE_COST)
        cost[:, :n] = bank.code_length[1:].T
        _BANKS[key] = (torch.from_numpy(packed).to(device), torch.from_numpy(cost).to(device))
    return _BANKS[key]


def _cost_blocks(n_tables: int) -> tuple[int, int]:
    """Two power-of-two widths covering ``n_tables`` costs with little padding (78: 64 + 16)."""
    full = 1 << (n_tables - 1).bit_length()
    ka = full if full <= 16 else full // 2
    return ka, 1 << (n_tables - ka - 1).bit_length() if n_tables > ka else 1


@dataclass(frozen=True)
class EncodedBatch:
    """Packed chunks, CRCs filled in, back to back in host buffers (pinned for a CUDA encode): one
    buffer per sub-batch."""

    parts: list[np.ndarray]  # uint8 host buffers
    where: list[tuple[int, int, int]]  # each chunk's (buffer, byte offset, byte size)
    level: int
    token_starts: list[int]
    n_tokens: int

    def __len__(self) -> int:
        return len(self.where)

    @property
    def nbytes(self) -> int:
        return sum(size for _, _, size in self.where)

    def view(self, i: int) -> memoryview:
        """Chunk ``i``'s bytes, without a copy (valid while this batch is referenced)."""
        part, lo, size = self.where[i]
        return memoryview(self.parts[part][lo : lo + size].data)

    def chunks(self) -> list[codec.EncodedChunk]:
        """Each chunk as an ``EncodedChunk`` holding its own ``bytes`` (one host copy per chunk)."""
        return [
            codec.EncodedChunk(self.view(i).tobytes(), self.level, self.token_starts[i], self.n_tokens)
            for i in range(len(self))
        ]


@dataclass
class EncodeJob:
    """A batch on its way through the encoder's stages (each ``launch_*`` fills in its outputs)."""

    kv: torch.Tensor  # [B, L, 2, H, T, D], the caller's tensor (any strides)
    profile: CalibrationProfile
    level: int
    lanes: int
    starts: list[int]
    dtype: str
    mant: np.ndarray  # uint16 [S]
    exp: np.ndarray  # int16 [S]
    inv_step: torch.Tensor  # float32 [S]
    cos: torch.Tensor  # float32 [B, T, rotary / 2]
    sin: torch.Tensor
    n_sink: torch.Tensor  # int32 [B]
    q: torch.Tensor  # int32 [B, S, T, d]
    rows: torch.Tensor  # int32 [B, L, 2, T]: raw rows
    bad: torch.Tensor  # int32 [1]: non-finite input seen
    classes: torch.Tensor  # uint8 [B * S, d]
    n_raw: list[int]  # per chunk, once ``check_input`` ran
    scratch: torch.Tensor | None = None  # int16 [B * S, CAP]
    n_words: torch.Tensor | None = None  # int32 [B * S]
    states: torch.Tensor | None = None  # int32 [B * S, lanes]


def chunk_view(kv: torch.Tensor, chunk_tokens: int = codec.DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """The whole chunks of a context ``[L, 2, H, N, D]`` as ``[B, L, 2, H, chunk_tokens, D]``, no copy.

    Tokens past the last whole chunk are left out (encode them as their own, shorter batch).
    """
    if not isinstance(kv, torch.Tensor) or kv.ndim != 5 or not 0 < chunk_tokens <= fmt.MAX_TOKENS:
        raise InvalidInputError("chunk_view takes KV [layers, 2, kv_heads, tokens, head_dim] and 1..65536")
    L, two, H, N, D = kv.shape
    B = N // chunk_tokens
    if B == 0:
        raise InvalidInputError(f"context of {N} tokens holds no whole chunk of {chunk_tokens}")
    s = kv.stride()
    return kv.as_strided((B, L, two, H, chunk_tokens, D), (chunk_tokens * s[3], *s), kv.storage_offset())


def _check_batch(
    kv: torch.Tensor,
    profile: CalibrationProfile,
    level: int,
    token_starts: Sequence[int] | None,
    lanes: int,
    base_step: float | None,
) -> list[int]:
    """Raise InvalidInputError for a bad batch tensor or option; each chunk's first token position."""
    if not isinstance(kv, torch.Tensor) or kv.ndim != 6 or kv.shape[0] == 0:
        raise InvalidInputError("a batch is a tensor [chunks, layers, 2, kv_heads, tokens, head_dim]")
    codec.check_kv(kv[0], profile)
    starts = list(token_starts) if token_starts is not None else [0] * kv.shape[0]
    if len(starts) != kv.shape[0]:
        raise InvalidInputError("one token_start per chunk")
    for s in starts:
        codec.check_encode_options(level, lanes, s, base_step)
    return starts


def prepare_encode(
    kv: torch.Tensor,
    profile: CalibrationProfile,
    *,
    level: int = codec.DEFAULT_LEVEL,
    token_starts: Sequence[int] | None = None,
    lanes: int = codec.DEFAULT_LANES,
    base_step: float | None = None,
) -> EncodeJob:
    """Validate a batch ``[B, L, 2, H, T, D]`` and its options (typed errors, nothing launched yet)."""
    starts = _check_batch(kv, profile, level, token_starts, lanes, base_step)
    dtype = codec.check_kv(kv[0], profile)
    B, L, _, _, T, _ = kv.shape
    dev = kv.device
    G, d = profile.groups, profile.group_dim
    S = L * 2 * G
    mant_lk, exp_lk, steps = codec.step_codes(profile, level, base_step)
    inv = np.repeat((1.0 / steps).astype(np.float32).reshape(-1), G)  # the CPU's float32 1/step
    half = profile.inv_freq.size if profile.has_rope else 0
    if half:
        ep = _encoder_profile(profile, dev)
        pos = torch.tensor(starts, dtype=torch.float64, device=dev)[:, None] + torch.arange(
            T, dtype=torch.float64, device=dev
        )
        angle = pos[:, :, None] * ep.inv_freq[None, None, :]
        sq = torch.tensor(np.float32(profile.rope_scaling * profile.rope_scaling), device=dev)
        cos = (torch.cos(angle) * profile.rope_scaling).to(torch.float32) / sq  # remove_rope's tables
        sin = (torch.sin(angle) * profile.rope_scaling).to(torch.float32) / sq
    else:
        cos = sin = torch.zeros(1, dtype=torch.float32, device=dev)
    n_sink = [max(0, min(T, profile.sink_tokens - s)) for s in starts]
    return EncodeJob(
        kv=kv.detach(),
        profile=profile,
        level=level,
        lanes=lanes,
        starts=starts,
        dtype=dtype,
        mant=np.repeat(mant_lk.reshape(-1), G),
        exp=np.repeat(exp_lk.reshape(-1), G),
        inv_step=torch.from_numpy(inv).to(dev),
        cos=cos.contiguous(),
        sin=sin.contiguous(),
        n_sink=torch.tensor(n_sink, dtype=torch.int32, device=dev),
        q=torch.empty((B, S, T, d), dtype=torch.int32, device=dev),
        rows=torch.zeros((B, L, 2, T), dtype=torch.int32, device=dev),
        bad=torch.zeros(1, dtype=torch.int32, device=dev),
        classes=torch.empty((B * S, d), dtype=torch.uint8, device=dev),
        n_raw=[],
    )


def launch_transform(job: EncodeJob) -> None:
    """Coefficients and raw-row flags of every chunk (one launch, asynchronous)."""
    import triton

    from kvwire.kernels import triton_encode as te

    p = job.profile
    B, L, _, _, T, D = job.kv.shape
    G, d = p.groups, p.group_dim
    S = L * 2 * G
    ep = _encoder_profile(p, job.kv.device)
    bt, bn, bk = int(TUNING["bt"]), int(TUNING["bn"]), int(TUNING["bk"])
    bn = min(bn, max(16, triton.next_power_of_2(d)))
    bk = min(bk, max(16, triton.next_power_of_2(d)))
    grid = (B * S, triton.cdiv(T, bt), triton.cdiv(d, bn))
    te.transform_kernel[grid](
        job.kv, *job.kv.stride(), job.cos, job.sin, ep.mean, ep.forward, job.inv_step, job.n_sink,
        job.q, job.rows, job.bad, S, T, d, G, p.heads_per_group, D, 0.5 - codec.DEADZONE,
        HALF=p.inv_freq.size if p.has_rope else 0, BT=bt, BN=bn, BK=bk, PRECISION=TUNING["precision"],
        num_warps=int(TUNING["warps"]), enable_fp_fusion=False,
    )  # fmt: skip


def launch_tables(job: EncodeJob) -> None:
    """Each component's cheapest table (asynchronous): symbol counts into memory, then the costs."""
    launch_costs(job, launch_counts(job))


def launch_counts(job: EncodeJob) -> torch.Tensor:
    """int32 [4 * ceil(NUM_SYMBOLS / 4), B * S * d]: every component's symbol counts, symbol-major
    (asynchronous)."""
    import triton

    from kvwire.kernels import triton_encode as te

    B, S, T, d = job.q.shape
    groups = -(-rans.NUM_SYMBOLS // 4)
    n = B * S * d
    counts = torch.empty((4 * groups, n), dtype=torch.int32, device=job.q.device)
    bc = min(32 * int(TUNING["count_warps"]), max(16, triton.next_power_of_2(d)))
    tt = int(TUNING["count_tokens"])
    te.count_kernel[(B * S, triton.cdiv(d, bc))](
        job.q, job.rows, counts, S, T, d, job.profile.groups, n, BC=bc, TT=tt, WIDEN=255 // tt * tt,
        GROUPS=groups, num_warps=max(1, bc // 32), DIRECT_MAX=rans.DIRECT_MAX, MIN_OCTAVE=rans.MIN_OCTAVE,
        MAX_OCTAVE=rans.MAX_OCTAVE,
    )  # fmt: skip
    return counts


def launch_costs(job: EncodeJob, counts: torch.Tensor) -> None:
    """Each component's cheapest table from its counts (``launch_counts``) into ``job.classes``."""
    import triton

    from kvwire.kernels import triton_encode as te

    T = job.q.shape[2]
    _, cost = _encoder_bank(job.q.device)
    ka, kb = _cost_blocks(table_bank().n_tables - 1)
    n, bc = counts.shape[1], int(TUNING["cost_bc"])
    te.cost_kernel[(triton.cdiv(n, bc),)](
        counts, cost, job.classes, n, T, BC=bc, KA=ka, KB=kb, NUM_SYMBOLS=rans.NUM_SYMBOLS,
        DIRECT_MAX=rans.DIRECT_MAX, num_warps=int(TUNING["cost_warps"]),
    )  # fmt: skip


def check_input(job: EncodeJob) -> None:
    """Raise InvalidInputError for non-finite KV (synchronises); note each chunk's raw-row count."""
    B = job.rows.shape[0]
    counts = torch.cat([job.bad, job.rows.view(B, -1).sum(1, dtype=torch.int32)]).cpu().tolist()
    if counts[0]:
        raise InvalidInputError("KV holds NaN or Inf values; kvwire does not encode non-finite caches")
    job.n_raw = counts[1:]


def launch_rans(job: EncodeJob) -> None:
    """The rANS encoder over every segment of the batch (one launch, asynchronous)."""
    from kvwire.kernels import triton_encode as te

    B, S, T, d = job.q.shape
    table, _ = _encoder_bank(job.q.device)
    live, n_live = gpu.live_lists(job.classes)
    cap = 2 * d * T  # at most two words per coefficient
    dev = job.q.device
    job.scratch = torch.empty((B * S, cap), dtype=torch.int16, device=dev)
    job.n_words = torch.empty(B * S, dtype=torch.int32, device=dev)
    job.states = torch.zeros((B * S, job.lanes), dtype=torch.int32, device=dev)
    block = gpu.lane_block(job.lanes)
    te.rans_kernel[(B * S,)](
        job.q, job.rows, live, n_live, job.classes, table, job.scratch, job.n_words, job.states,
        S, T, d, job.profile.groups, job.lanes, cap, BLOCK=block, num_warps=max(1, block // 32),
        PROB_BITS=rans.PROB_BITS, **te.CONSTANTS,
    )  # fmt: skip


def _pad4(n: int) -> int:
    return (n + 3) & ~3


def pack_device(
    job: EncodeJob, model_fingerprint: str | None = None
) -> tuple[torch.Tensor, list[int], list[int]]:
    """Every chunk's bytes (CRC field zero) back to back in one device buffer; (buffer, bases, sizes).

    Synchronises once, for the word counts that size the buffer.
    """
    from kvwire.kernels import triton_encode as te

    assert job.n_words is not None and job.states is not None and job.scratch is not None
    p = job.profile
    B, L, _, H, T, D = job.kv.shape
    S, d = L * 2 * p.groups, p.group_dim
    dev = job.q.device
    per_chunk = job.n_words.view(B, S)
    ends = torch.cumsum(per_chunk, dim=1, dtype=torch.int32)
    n_words = ends[:, -1].cpu().tolist()
    n_raw = job.n_raw
    fp = codec.fingerprint_bytes(model_fingerprint)
    digest = bytes.fromhex(p.digest)[:16]
    headers, sizes = [], []
    for i in range(B):
        h = fmt.ChunkHeader(
            version=fmt.FORMAT_VERSION, dtype=job.dtype, level=job.level, layers=L, kv_heads=H,
            head_dim=D, heads_per_group=p.heads_per_group, lanes=job.lanes, table_bank=TABLE_BANK_VERSION,
            token_start=job.starts[i], n_tokens=T, n_raw=n_raw[i], n_words=n_words[i],
            model_fingerprint=fp, profile_digest=digest, payload_size=0,
        )  # fmt: skip
        payload = sum(size for _, size in fmt.section_sizes(h))
        headers.append(fmt.pack_header(h, payload, 0))
        sizes.append(fmt.HEADER_SIZE + payload)
    bases = np.cumsum([0, *sizes]).tolist()
    total = bases.pop()
    # Fixed part of every chunk: header, steps (host), classes, states, offsets (device).
    steps = np.zeros(2 * _pad4(2 * S), dtype=np.uint8)
    steps[: 2 * S] = job.mant.astype("<u2").view(np.uint8)
    steps[_pad4(2 * S) : _pad4(2 * S) + 2 * S] = job.exp.astype("<i2").view(np.uint8)
    host_part = np.concatenate(
        [np.frombuffer(b"".join(headers), np.uint8).reshape(B, -1), np.tile(steps, (B, 1))], 1
    )
    classes = job.classes.view(B, S * d)
    if _pad4(S * d) != S * d:
        classes = torch.nn.functional.pad(classes, (0, _pad4(S * d) - S * d))
    offsets = torch.cat([torch.zeros((B, 1), dtype=torch.int32, device=dev), ends], dim=1)
    prefix = torch.cat(
        [
            torch.from_numpy(host_part).to(dev, non_blocking=True),
            classes,
            job.states.view(B, -1).view(torch.uint8),
            offsets.view(torch.uint8),
        ],
        dim=1,
    )
    fixed = prefix.shape[1]
    buf = torch.zeros(total, dtype=torch.uint8, device=dev)
    base_d = torch.tensor(bases, dtype=torch.int64, device=dev)
    cols = torch.arange(fixed // 4, device=dev)
    buf.view(torch.int32)[(base_d[:, None] // 4 + cols[None, :]).view(-1)] = prefix.view(torch.int32).view(-1)
    # Words: each segment's stream from the end of its scratch row to its place after the fixed part.
    dst = (base_d[:, None] + fixed) // 2 + (ends - per_chunk).to(torch.int64)
    te.words_kernel[(B * S,)](
        job.scratch, job.n_words, dst.view(-1), buf.view(torch.int16), job.scratch.shape[1], BLOCK=1024
    )
    if sum(n_raw):
        _place_raw_rows(job, buf, bases, [fixed + _pad4(2 * w) for w in n_words])
    return buf, bases, sizes


def _place_raw_rows(job: EncodeJob, buf: torch.Tensor, bases: list[int], raw_at: list[int]) -> None:
    """Raw index and values of every chunk, written into its bytes on the device."""
    B, T = job.kv.shape[0], job.kv.shape[4]
    dev = buf.device
    b, flat = torch.nonzero(job.rows.view(B, -1), as_tuple=True)  # in order: chunk, then index
    first = torch.tensor(np.cumsum([0, *job.n_raw])[:-1], dtype=torch.int64, device=dev)
    rank = torch.arange(b.numel(), device=dev) - first[b]
    start = torch.tensor([bs + r for bs, r in zip(bases, raw_at, strict=True)], dtype=torch.int64, device=dev)
    buf.view(torch.int32)[start[b] // 4 + rank] = flat.to(torch.int32)
    lk, t = flat // T, flat % T
    values = job.kv[b, lk // 2, lk % 2, :, t, :].contiguous().view(torch.uint8).view(b.numel(), -1)
    row_bytes = values.shape[1]
    n_raw = torch.tensor(job.n_raw, dtype=torch.int64, device=dev)
    at = start[b] + 4 * n_raw[b] + rank * row_bytes
    buf[(at[:, None] + torch.arange(row_bytes, device=dev)[None, :]).view(-1)] = values.view(-1)


class _HostCopy:
    """One packed device buffer on its way to host memory: chunk after chunk is copied asynchronously
    (on ``stream``), and ``checksum`` hands each chunk, once its copy is done, to the thread pool that
    decode staging uses (ISA-L CRC-32 in pieces, combined, when available)."""

    def __init__(
        self, buf: torch.Tensor, bases: list[int], sizes: list[int], stream: torch.cuda.Stream | None
    ) -> None:
        self.bases, self.sizes = bases, sizes
        self.events: list[torch.cuda.Event] = []
        self.jobs: list[list[tuple[int, concurrent.futures.Future[int]]]] = []
        if buf.device.type != "cuda":
            self.host = buf.numpy()
            return
        host_t = torch.empty(buf.numel(), dtype=torch.uint8, pin_memory=True)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(buf.device))
        with torch.cuda.stream(stream or torch.cuda.current_stream(buf.device)):
            side = torch.cuda.current_stream(buf.device)
            side.wait_event(ready)
            for lo, n in zip(bases, sizes, strict=True):
                host_t[lo : lo + n].copy_(buf[lo : lo + n], non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(side)
                self.events.append(ev)
            buf.record_stream(side)  # the allocator keeps the buffer until the copies are done
        self.host = host_t.numpy()

    def checksum(self) -> None:
        """Submit each chunk's CRC-32 as soon as its copy is done (waits for the copies)."""
        combine = host_crc.crc32_combine()
        pool = host_crc.pool()
        # Pieces of at least 1 MiB, about two per thread over the buffer: one per chunk for a large
        # batch, a single chunk split over every thread (few submissions: each costs Python time).
        per_thread = -(-self.host.shape[0] // (2 * host_crc.WORKERS))
        piece = max(self.sizes) if combine is None else max(host_crc.PIECE, per_thread)
        host = self.host

        def crc(lo: int, hi: int) -> int:
            return fmt.crc32(host[lo:hi])

        for i, (lo, n) in enumerate(zip(self.bases, self.sizes, strict=True)):
            if self.events:
                self.events[i].synchronize()
            cuts = [*range(0, n, piece), n]
            self.jobs.append([(b - a, pool.submit(crc, lo + a, lo + b)) for a, b in itertools.pairwise(cuts)])

    def finish(self) -> np.ndarray:
        """Store every chunk's CRC-32 in its header; the host buffer."""
        if not self.jobs:
            self.checksum()
        combine = host_crc.crc32_combine()
        for lo, parts in zip(self.bases, self.jobs, strict=True):
            value = parts[0][1].result()
            for n, fut in parts[1:]:
                assert combine is not None
                value = combine(value, fut.result(), n)
            field = np.frombuffer(struct.pack("<I", value & 0xFFFFFFFF), np.uint8)
            self.host[lo + fmt.HEADER_SIZE - 4 : lo + fmt.HEADER_SIZE] = field
        return self.host


def copy_out(buf: torch.Tensor, bases: list[int], sizes: list[int]) -> np.ndarray:
    """The packed chunks of ``pack_device`` in host memory (pinned for CUDA), each chunk's CRC-32 stored."""
    return _HostCopy(buf, bases, sizes, None).finish()


def encode_batch_gpu(
    kv: torch.Tensor,
    profile: CalibrationProfile,
    *,
    level: int = codec.DEFAULT_LEVEL,
    token_starts: Sequence[int] | None = None,
    model_fingerprint: str | None = None,
    lanes: int = codec.DEFAULT_LANES,
    base_step: float | None = None,
) -> EncodedBatch:
    """Encode a batch ``[B, L, 2, H, T, D]`` (any strides, e.g. ``chunk_view`` of a context) on its
    device into packed chunks in host memory (see ``EncodedBatch``).

    Larger batches go in sub-batches of ``TUNING["sub_batch"]`` chunks (bounded device memory), each
    copied to pinned memory on a second stream while the next is coded, and checksummed by host
    threads. Every option is checked before the first launch; non-finite KV raises before its
    sub-batch is coded.
    """
    starts = _check_batch(kv, profile, level, token_starts, lanes, base_step)
    B = kv.shape[0]
    cuda = kv.device.type == "cuda"
    stream = torch.cuda.Stream(kv.device) if cuda else None
    step = max(1, int(TUNING["sub_batch"]))
    copies: list[_HostCopy] = []
    where: list[tuple[int, int, int]] = []
    for s0 in range(0, B, step):
        job = prepare_encode(
            kv[s0 : s0 + step], profile, level=level, token_starts=starts[s0 : s0 + step], lanes=lanes,
            base_step=base_step,
        )  # fmt: skip
        launch_transform(job)
        launch_tables(job)
        check_input(job)
        launch_rans(job)
        buf, bases, sizes = pack_device(job, model_fingerprint)
        del job
        copies.append(_HostCopy(buf, bases, sizes, stream))
        where.extend((len(copies) - 1, lo, n) for lo, n in zip(bases, sizes, strict=True))
        if len(copies) > 1:  # the previous sub-batch's copies are done or nearly: checksum them now
            copies[-2].checksum()
    parts = [c.finish() for c in copies]
    return EncodedBatch(parts, where, level, starts, int(kv.shape[4]))


def encode_chunks_gpu(
    kvs: Sequence[torch.Tensor],
    profile: CalibrationProfile,
    *,
    level: int = codec.DEFAULT_LEVEL,
    token_starts: Sequence[int] | None = None,
    model_fingerprint: str | None = None,
    lanes: int = codec.DEFAULT_LANES,
    base_step: float | None = None,
) -> list[codec.EncodedChunk]:
    """Encode chunks of one shape and dtype ``[L, 2, H, T, D]`` on their device, as one batch."""
    if not kvs:
        return []
    for kv in kvs:
        if not isinstance(kv, torch.Tensor):
            raise InvalidInputError(f"KV must be a torch tensor, not {type(kv).__name__}")
        codec.check_kv(kv, profile)
    if len({(tuple(kv.shape), kv.dtype, kv.device) for kv in kvs}) != 1:
        raise InvalidInputError("chunks encoded together must share shape, dtype and device")
    batch = torch.stack([kv.detach() for kv in kvs]) if len(kvs) > 1 else kvs[0].detach()[None]
    return encode_batch_gpu(
        batch,
        profile,
        level=level,
        token_starts=token_starts,
        model_fingerprint=model_fingerprint,
        lanes=lanes,
        base_step=base_step,
    ).chunks()
