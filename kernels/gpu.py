"""The GPU path of the codec: the same bitstream, coded with Triton kernels and torch on the device.

Decoding is bit-identical to the CPU path (kvwire.kernels.codec): the rANS kernel reproduces
``rans.decode_segments`` word for word, including its corruption checks, and reconstruction repeats the
CPU's arithmetic op for op: an exact float64 GEMM of integers (the integer basis times the integer
coefficients, then one exact multiply by the step's power-of-two scale; see ``codec.reconstruct``),
``+ 0.0`` and a round-to-nearest cast to float32, ``+ mean`` as its own op, and RoPE as separate float32
multiplies and an add with the host's cos/sin tables. Every op is a separate torch kernel, so nothing is
contracted into a fused multiply-add.

Encoding runs transform, quantisation, histograms and table choice with torch on the device and the rANS
encoder as a Triton kernel; its float32 rounding may pick other symbols than the CPU encoder would, which
the format allows: any valid stream decodes identically on both paths.

On a machine without CUDA these functions still run on CPU tensors under ``TRITON_INTERPRET=1`` (how the
tests check them).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kvwire.errors import CorruptChunkError, InvalidInputError
from kvwire.kernels import codec, rans
from kvwire.kernels import format as fmt
from kvwire.kernels.profile import CalibrationProfile
from kvwire.kernels.tables import TABLE_BANK_VERSION, table_bank
from kvwire.kernels.transform import rope_tables

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


@dataclass(frozen=True)
class _DeviceProfile:
    basis: torch.Tensor  # float64 [S, d, d]: the integer basis (exact in float64)
    basis_exp: np.ndarray  # int64 [S]
    mean: torch.Tensor  # float32 [S, d]
    forward: torch.Tensor  # float32 [S, d, d]: encoder transform


_PROFILE_CACHE: dict[tuple[str, str], _DeviceProfile] = {}


def _device_profile(profile: CalibrationProfile, device: torch.device) -> _DeviceProfile:
    """A profile's decoder and encoder matrices on ``device``, cached by digest."""
    key = (profile.digest, str(device))
    dp = _PROFILE_CACHE.get(key)
    if dp is None:
        S, d = profile.layers * 2 * profile.groups, profile.group_dim
        dp = _DeviceProfile(
            basis=torch.from_numpy(profile.basis.reshape(S, d, d).astype(np.float64)).to(device),
            basis_exp=profile.basis_exp.reshape(S).astype(np.int64),
            mean=torch.from_numpy(np.ascontiguousarray(profile.mean.reshape(S, d), np.float32)).to(device),
            forward=torch.from_numpy(codec.profile_forward(profile).reshape(S, d, d)).to(device),
        )
        _PROFILE_CACHE[key] = dp
    return dp


_STAGING: dict[str, torch.Tensor] = {}
_STAGING_LOCK = threading.Lock()  # one staging buffer per device, shared by every decoding thread


def _upload_words(parts: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    """Concatenate the chunks' uint16 words on the device as int16 (the kernel reads them unsigned).

    For CUDA the words go through one reused pinned staging buffer: a single host copy, then one
    transfer at full PCIe speed (pageable memory moves at a fraction of it).
    """
    total = sum(p.size for p in parts) + 1  # never empty
    if device.type != "cuda":
        return torch.from_numpy(np.concatenate([*[p.view(np.int16) for p in parts], np.zeros(1, np.int16)]))
    with _STAGING_LOCK:
        stage = _STAGING.get(str(device))
        if stage is None or stage.numel() < total:
            stage = torch.empty(max(total, 1 << 20), dtype=torch.int16, pin_memory=True)
            _STAGING[str(device)] = stage
        host = stage.numpy()
        pos = 0
        for p in parts:
            host[pos : pos + p.size] = p.view(np.int16)
            pos += p.size
        host[pos] = 0
        return stage[:total].to(device)  # synchronous: the buffer is free again when the lock is released


def _live_lists(classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The lane plan's live components: (int32 [S, d] live components first, in order; int32 [S] count)."""
    dead = (classes == 0).to(torch.int8)
    live = torch.sort(dead, dim=1, stable=True).indices.to(torch.int32).contiguous()
    return live, (1 - dead).sum(1, dtype=torch.int32)


def _block(lanes: int) -> int:
    return max(16, 1 << (max(lanes, 1) - 1).bit_length())


# ----------------------------------------------------------------------------------------------- decode


def decode_chunks_gpu(
    chunks: Sequence[bytes | memoryview],
    profile: CalibrationProfile,
    *,
    model_fingerprint: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """Decode many chunks with one rANS launch for all their segments; each ``[L, 2, H, T, D]``.

    Every chunk is validated (header, sizes, checksum, profile) before anything is uploaded or launched.
    """
    parsed = [codec.validate_chunk(data, profile, model_fingerprint) for data in chunks]
    return decode_parsed_gpu(parsed, profile, device=device, dtype=dtype)


def decode_parsed_gpu(
    parsed: Sequence[tuple[fmt.ChunkHeader, fmt.ChunkSections]],
    profile: CalibrationProfile,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """Decode chunks already checked by ``codec.validate_chunk``."""
    if not parsed:
        return []
    dev = _resolve_device(device)
    q, seg_base = entropy_decode_gpu(parsed, dev)
    dp = _device_profile(profile, dev)
    results: list[torch.Tensor] = []
    i = 0
    while i < len(parsed):  # reconstruct runs of consecutive chunks with the same token count together
        j = i + 1
        while j < len(parsed) and parsed[j][0].n_tokens == parsed[i][0].n_tokens:
            j += 1
        results.extend(_reconstruct_run(parsed[i:j], q, seg_base[i], dp, profile, dev, dtype))
        i = j
    return results


@dataclass(frozen=True)
class DecodeBatch:
    """The rANS decoder's inputs for a batch of chunks, on the device (see ``prepare_decode``)."""

    args: tuple[
        torch.Tensor, ...
    ]  # words, starts, ends, states, lanes, tokens, live, n_live, classes, out offsets
    out: torch.Tensor  # int32, flat: chunk after chunk, each [segments, d, tokens]
    status: torch.Tensor  # int32 [all segments]
    seg_base: list[int]  # each chunk's first element in ``out``
    n_seg: list[int]
    d: int
    max_lanes: int


def prepare_decode(
    parsed: Sequence[tuple[fmt.ChunkHeader, fmt.ChunkSections]], device: torch.device
) -> DecodeBatch:
    """Gather every segment of every chunk into flat arrays and upload them."""
    n_seg = [h.segments for h, _ in parsed]
    d = parsed[0][0].group_dim
    max_lanes = max(h.lanes for h, _ in parsed)
    S = sum(n_seg)
    words = _upload_words([sec.words for _, sec in parsed], device)
    word_base = np.cumsum([0] + [h.n_words for h, _ in parsed])[:-1]
    offsets = [sec.offsets.astype(np.int64) + b for (_, sec), b in zip(parsed, word_base, strict=True)]
    starts = np.concatenate([o[:-1] for o in offsets])
    ends = np.concatenate([o[1:] for o in offsets])
    states = np.zeros((S, max_lanes), dtype=np.int64)
    lanes = np.empty(S, dtype=np.int32)
    n_tok = np.empty(S, dtype=np.int32)
    out_offset = np.empty(S, dtype=np.int64)
    seg_base: list[int] = []
    s0, e0 = 0, 0
    for h, sec in parsed:
        s1 = s0 + h.segments
        states[s0:s1, : h.lanes] = sec.states
        lanes[s0:s1] = h.lanes
        n_tok[s0:s1] = h.n_tokens
        out_offset[s0:s1] = e0 + np.arange(h.segments, dtype=np.int64) * d * h.n_tokens
        seg_base.append(e0)
        s0, e0 = s1, e0 + h.segments * d * h.n_tokens
    classes = np.concatenate([sec.classes for _, sec in parsed]).astype(np.int32)

    def up(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    classes_d = up(classes)
    live, n_live = _live_lists(classes_d)
    args = (words, up(starts), up(ends), up(states), up(lanes), up(n_tok), live, n_live, classes_d)
    return DecodeBatch(
        args=(*args, up(out_offset)),
        out=torch.empty(e0, dtype=torch.int32, device=device),
        status=torch.empty(S, dtype=torch.int32, device=device),
        seg_base=seg_base,
        n_seg=n_seg,
        d=d,
        max_lanes=max_lanes,
    )


def launch_decode(batch: DecodeBatch) -> None:
    """Run the rANS decode kernel over every segment of the batch (asynchronous)."""
    from kvwire.kernels import triton_rans as tr

    batch.out.zero_()
    bank = _device_bank(batch.out.device)
    block = _block(batch.max_lanes)
    tr.decode_kernel[(len(batch.status),)](
        *batch.args, batch.out, bank.freq, bank.cum, bank.lut, bank.extra, batch.status, batch.d,
        batch.max_lanes, BLOCK=block, num_warps=max(1, block // 32), **tr.CONSTANTS,
    )  # fmt: skip


def entropy_decode_gpu(
    parsed: Sequence[tuple[fmt.ChunkHeader, fmt.ChunkSections]], device: torch.device
) -> tuple[torch.Tensor, list[int]]:
    """One rANS launch over every segment of every chunk: flat int32 coefficients, chunk after chunk,
    each chunk ``[segments, d, tokens]``; plus each chunk's first element in that buffer.

    Raises CorruptChunkError naming the first bad segment (the kernel never reads outside a segment).
    """
    batch = prepare_decode(parsed, device)
    launch_decode(batch)
    bad = batch.status.cpu().numpy()
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        chunk = int(np.searchsorted(np.cumsum(batch.n_seg), first, side="right"))
        seg = first - int(np.sum(batch.n_seg[:chunk]))
        why = _STATUS_TEXT.get(int(bad[first]), "?")
        raise CorruptChunkError(f"entropy-coded segment {seg} of chunk {chunk} is corrupt ({why})")
    return batch.out, batch.seg_base


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
    q = q_flat[base : base + B * S * d * T].view(B, S, d, T)
    # Exact: integer coefficients times integer basis, partial sums far below 2**53.
    acc = torch.matmul(q.transpose(-1, -2).to(torch.float64), dp.basis)  # [B, S, T, d]
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


# ----------------------------------------------------------------------------------------------- encode


def symbols_of(values: torch.Tensor) -> torch.Tensor:
    """The rANS alphabet symbol of each int32 coefficient (``rans._to_symbol``), int64."""
    v = values.to(torch.int64)
    a = v.abs()
    k = torch.full_like(a, rans.MIN_OCTAVE)
    for b in range(rans.MIN_OCTAVE + 1, rans.MAX_OCTAVE + 1):
        k += (a >= (1 << b)).to(torch.int64)
    big = 2 * rans.DIRECT_MAX + 1 + 2 * (k - rans.MIN_OCTAVE) + (v < 0).to(torch.int64)
    return torch.where(a <= rans.DIRECT_MAX, v + rans.DIRECT_MAX, big)


def choose_tables_gpu(symbols: torch.Tensor, bank: _DeviceBank) -> torch.Tensor:
    """Cheapest table per component of int32 [n, d, T] coefficients: uint8 [n, d] (0 for dead ones)."""
    n, d, T = symbols.shape
    sym = symbols_of(symbols).view(n * d, T)
    hist = torch.zeros(n * d, rans.NUM_SYMBOLS, dtype=torch.float64, device=symbols.device)
    hist.scatter_add_(1, sym, torch.ones_like(sym, dtype=torch.float64))
    cost = hist @ bank.code_length.T
    index = (torch.argmin(cost, dim=1) + 1).to(torch.uint8)
    dead = hist[:, rans.DIRECT_MAX] == T
    return torch.where(dead, torch.zeros_like(index), index).view(n, d)


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
    """Encode chunks of the same shape ``[L, 2, H, T, D]`` on their device, one rANS launch for all."""
    from kvwire.kernels import triton_rans as tr

    if not kvs:
        return []
    starts = list(token_starts) if token_starts is not None else [0] * len(kvs)
    if len(starts) != len(kvs):
        raise InvalidInputError("one token_start per chunk")
    dtypes = {codec.check_kv(kv, profile) for kv in kvs}
    for s in starts:
        codec.check_encode_options(level, lanes, s, base_step)
    if len(dtypes) != 1 or len({tuple(kv.shape) for kv in kvs}) != 1:
        raise InvalidInputError("chunks encoded together must share shape and dtype")
    dtype = dtypes.pop()
    kv = torch.stack([k.detach() for k in kvs])  # [B, L, 2, H, T, D]
    dev = kv.device
    x = kv.to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise InvalidInputError("KV holds NaN or Inf values; kvwire does not encode non-finite caches")
    B, L, _, H, T, D = x.shape
    G, hpg, d = profile.groups, profile.heads_per_group, profile.group_dim
    S = L * 2 * G
    if profile.has_rope:
        cos, sin = _rope_tensors(starts, T, profile, dev)
        r = cos.shape[-1]
        half = r // 2
        sq = float(np.float32(profile.rope_scaling * profile.rope_scaling))
        cs, sn = (cos / sq)[:, None, None], (sin / sq)[:, None, None]
        rot = x[:, :, 0, :, :, :r]
        x[:, :, 0, :, :, :r] = rot * cs - torch.cat([-rot[..., half:], rot[..., :half]], dim=-1) * sn
    dp = _device_profile(profile, dev)
    xg = x.view(B, L, 2, G, hpg, T, D).permute(0, 1, 2, 3, 5, 4, 6).reshape(B, S, T, d)
    coeff = torch.matmul(xg - dp.mean[None, :, None, :], dp.forward)  # [B, S, T, d], float32
    mant, exp, steps = codec.step_codes(profile, level, base_step)
    inv = torch.from_numpy((1.0 / steps).astype(np.float32)).to(dev).repeat_interleave(G).view(1, S, 1, 1)
    scaled = coeff * inv
    half_step = torch.full_like(scaled, 0.5 - codec.DEADZONE)
    q = torch.trunc(scaled + torch.copysign(half_step, scaled))
    ok = (q.abs() <= rans.MAX_ABS_VALUE).view(B, L, 2, G, T, d).all(dim=5).all(dim=3)  # [B, L, 2, T]
    raw = ~ok
    for i, s0 in enumerate(starts):
        n_sink = max(0, min(T, profile.sink_tokens - s0))
        raw[i, :, :, :n_sink] = True
    raw_rows = raw[:, :, :, None, :].expand(B, L, 2, G, T).reshape(B, S, T, 1)
    qi = torch.where(raw_rows, torch.zeros_like(q), q).to(torch.int32)
    symbols = qi.transpose(-1, -2).contiguous().view(B * S, d, T)
    bank = _device_bank(dev)
    classes = choose_tables_gpu(symbols, bank)
    live, n_live = _live_lists(classes)
    scratch_size = 2 * d * T + 16
    scratch = torch.empty(B * S, scratch_size, dtype=torch.int16, device=dev)
    n_words = torch.empty(B * S, dtype=torch.int64, device=dev)
    states = torch.zeros(B * S, lanes, dtype=torch.int64, device=dev)
    tr.encode_kernel[(B * S,)](
        symbols, live, n_live, classes.to(torch.int32), bank.freq, bank.cum, scratch, n_words, states,
        d, T, lanes, scratch_size, BLOCK=_block(lanes), num_warps=max(1, _block(lanes) // 32),
        MAX_OCTAVE=rans.MAX_OCTAVE, **tr.CONSTANTS,
    )  # fmt: skip
    # Compact: each segment's words, reversed (the decoder reads them in the opposite order).
    counts = n_words.cpu().numpy()
    total = int(counts.sum())
    counts_d = n_words
    seg_id = torch.repeat_interleave(torch.arange(B * S, device=dev), counts_d, output_size=total)
    first = torch.cumsum(counts_d, 0) - counts_d
    local = torch.arange(total, device=dev) - first[seg_id]
    src = seg_id * scratch_size + counts_d[seg_id] - 1 - local
    words = scratch.view(-1)[src].cpu().numpy().view(np.uint16)
    classes_h = classes.cpu().numpy()
    states_h = states.cpu().numpy().astype(np.uint32)
    raw_h = raw.cpu().numpy()
    out = []
    word_pos = 0
    for i in range(B):
        seg_counts = counts[i * S : (i + 1) * S]
        offsets = np.zeros(S + 1, dtype=np.uint32)
        offsets[1:] = np.cumsum(seg_counts)
        n = int(offsets[-1])
        raw_index = np.flatnonzero(raw_h[i].reshape(-1)).astype(np.uint32)
        header = fmt.ChunkHeader(
            version=fmt.FORMAT_VERSION,
            dtype=dtype,
            level=level,
            layers=L,
            kv_heads=H,
            head_dim=D,
            heads_per_group=hpg,
            lanes=lanes,
            table_bank=TABLE_BANK_VERSION,
            token_start=starts[i],
            n_tokens=T,
            n_raw=int(raw_index.size),
            n_words=n,
            model_fingerprint=codec.fingerprint_bytes(model_fingerprint),
            profile_digest=bytes.fromhex(profile.digest)[:16],
            payload_size=0,
        )
        sections = fmt.ChunkSections(
            step_mant=np.repeat(mant[:, :, None], G, axis=2).reshape(-1),
            step_exp=np.repeat(exp[:, :, None], G, axis=2).reshape(-1),
            classes=classes_h[i * S : (i + 1) * S],
            states=states_h[i * S : (i + 1) * S],
            offsets=offsets,
            words=words[word_pos : word_pos + n],
            raw_index=raw_index,
            raw_values=_raw_rows(kvs[i], raw[i], fmt.DTYPE_BYTES[dtype]),
        )
        word_pos += n
        out.append(codec.EncodedChunk(fmt.pack_chunk(header, sections), level, starts[i], T))
    return out


def _raw_rows(kv: torch.Tensor, raw: torch.Tensor, nbytes: int) -> np.ndarray:
    """Original values of the raw (layer, K/V, token) rows: uint8 [n_raw, H, D, dtype bytes]."""
    layer, k, tok = torch.nonzero(raw, as_tuple=True)
    if layer.numel() == 0:
        return np.zeros((0, kv.shape[2], kv.shape[4], nbytes), dtype=np.uint8)
    rows = kv.detach()[layer, k, :, tok, :].contiguous().cpu()
    return rows.view(torch.uint8).numpy().reshape(layer.numel(), kv.shape[2], kv.shape[4], nbytes)
