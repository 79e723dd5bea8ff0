"""Encode a KV chunk into a kvwire bitstream and back (CPU reference path).

Pipeline per chunk (canonical KV ``[layers, 2, kv_heads, tokens, head_dim]``, keys post-RoPE):

1. take RoPE off the keys (positions ``token_start + t``);
2. per (layer, K/V, head group): subtract the profile mean and project onto the profile basis
   (PCA in a distortion-weighted space) -> decorrelated coefficients ``[tokens, d]``;
3. quantise uniformly with one step per (layer, K/V): level step x the profile's layer weight;
4. attention-sink tokens and tokens whose coefficients overflow the coder range are stored raw;
5. each component picks its cheapest table from the shipped bank; interleaved rANS codes the rest.

Decoding inverts this with exact integer arithmetic (docs/format.md, "Reconstruction"), so the same
bytes give the same tensor on every device.
"""

from __future__ import annotations

import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kvwire.errors import CorruptChunkError, InvalidInputError, LimitExceededError, ModelMismatchError
from kvwire.kernels import format as fmt
from kvwire.kernels import rans
from kvwire.kernels.profile import CalibrationProfile, check_profile_matches
from kvwire.kernels.tables import TABLE_BANK_VERSION, choose_tables, table_bank
from kvwire.kernels.transform import apply_rope, remove_rope, rope_tables

# Base quantisation step per level, in units where the calibrated profile predicts a mean KL of about
# 0.01 nats/token at step 1.0 (kvwire.calibration). Level 0 is the best quality, 4 the smallest. Chosen
# on SmolLM2-135M (docs/benchmarks.md): level 0 ~ KL 0.001, level 2 (default) ~ KL 0.015 at < 2 bits
# per element, level 4 ~ KL 0.09 at < 1 bit per element.
LEVEL_STEPS: tuple[float, ...] = (0.25, 0.5, 0.85, 1.4, 2.3)
LEVELS: tuple[int, ...] = tuple(range(len(LEVEL_STEPS)))
DEFAULT_LEVEL = 2
DEFAULT_CHUNK_TOKENS = 256
DEFAULT_LANES = 32
DEADZONE = 0.0
CODEC_VERSION = fmt.FORMAT_VERSION
# Step exponents a chunk may carry (step = mant * 2**-exp). The encoder's steps (level step or base_step
# in 1e-6..1e6, times a layer weight in 2**-40..2**40) need about -53..68; capping the negative side at
# -64 keeps every reconstructed coefficient below 2**115, so float32 decoding never overflows.
MIN_STEP_EXP, MAX_STEP_EXP = -64, 120
# Decoded bytes (float32) one chunk may ask for unless the caller allows more. A chunk whose components
# are all dead carries no coded words, so a few kilobytes can declare up to fmt.MAX_TOKENS tokens; this
# caps what decoding such a chunk allocates (output plus an int32 coefficient buffer of the same size).
DEFAULT_MAX_DECODE_BYTES = 512 * 2**20
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class EncodedChunk:
    """One chunk's bitstream plus the header fields callers route on."""

    data: bytes
    level: int
    token_start: int
    n_tokens: int

    @property
    def nbytes(self) -> int:
        return len(self.data)

    @property
    def checksum(self) -> int:
        """CRC-32 stored in the header (covers the whole chunk)."""
        return int.from_bytes(self.data[fmt.HEADER_SIZE - 4 : fmt.HEADER_SIZE], "little")

    @property
    def header(self) -> fmt.ChunkHeader:
        return fmt.read_header(self.data)


def fingerprint_bytes(model_fingerprint: str | None) -> bytes:
    """The 16 bytes of a model fingerprint stored in chunk headers (all zero when unknown)."""
    if not model_fingerprint:
        return b"\0" * 16
    try:
        raw = bytes.fromhex(model_fingerprint)
    except ValueError:
        raw = zlib.crc32(model_fingerprint.encode()).to_bytes(4, "little")
    return (raw + b"\0" * 16)[:16]


def _step_code(step: float) -> tuple[int, int]:
    """Represent ``step`` as mant * 2**-exp with an 8-bit mantissa in [128, 255]."""
    exp = int(np.floor(np.log2(255.0 / step)))
    mant = int(np.rint(step * 2.0**exp))
    if mant > 255:
        exp -= 1
        mant = int(np.rint(step * 2.0**exp))
    return mant, exp


def check_encode_options(level: int, lanes: int, token_start: int, base_step: float | None = None) -> None:
    """Raise InvalidInputError for an unknown level, lane count, token position or step."""
    if level not in LEVELS:
        raise InvalidInputError(f"level must be one of {LEVELS}, not {level!r}")
    if not 0 < lanes <= fmt.MAX_LANES:
        raise InvalidInputError(f"lanes must be in 1..{fmt.MAX_LANES}")
    if not 0 <= token_start < 2**32 - fmt.MAX_TOKENS:
        raise InvalidInputError(f"token_start {token_start} out of range")
    if base_step is not None and not 1e-6 <= base_step <= 1e6:
        raise InvalidInputError(f"base_step {base_step} out of range")


def check_kv(kv: torch.Tensor, profile: CalibrationProfile) -> str:
    """Validate a KV tensor's dtype and shape against the profile; return its dtype name."""
    dtype = {v: k for k, v in _TORCH_DTYPES.items()}.get(kv.dtype)
    if dtype is None:
        raise InvalidInputError(f"KV dtype {kv.dtype} is not supported (float16, bfloat16 or float32)")
    expect = (profile.layers, 2, profile.kv_heads, profile.head_dim)
    if kv.ndim != 5 or (kv.shape[0], kv.shape[1], kv.shape[2], kv.shape[4]) != expect:
        raise InvalidInputError(
            f"KV shape {tuple(kv.shape)} does not match the profile's layout "
            f"[{profile.layers}, 2, {profile.kv_heads}, tokens, {profile.head_dim}]"
        )
    if not 0 < kv.shape[3] <= fmt.MAX_TOKENS:
        raise InvalidInputError(f"a chunk holds 1 to {fmt.MAX_TOKENS} tokens, not {kv.shape[3]}")
    return dtype


def step_codes(
    profile: CalibrationProfile, level: int, base_step: float | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantisation step per (layer, K/V) at ``level`` or ``base_step``.

    Returns (mant uint16, exp int16, step float64), each [L, 2].
    """
    step0 = LEVEL_STEPS[level] if base_step is None else base_step
    L = profile.layers
    steps = np.zeros((L, 2))
    mant = np.zeros((L, 2), dtype=np.uint16)
    exp = np.zeros((L, 2), dtype=np.int16)
    for layer in range(L):
        for k in range(2):
            m, e = _step_code(step0 * float(profile.layer_weight[layer, k]))
            if not MIN_STEP_EXP <= e <= MAX_STEP_EXP:
                raise InvalidInputError(f"quantisation step {step0} x layer weight is out of range")
            mant[layer, k], exp[layer, k] = m, e
            steps[layer, k] = m * 2.0**-e
    return mant, exp, steps


def _canonical(kv: torch.Tensor | np.ndarray, profile: CalibrationProfile) -> tuple[np.ndarray, str]:
    """Validate a KV tensor against the profile; return it as a float32 numpy copy plus its dtype name."""
    if isinstance(kv, np.ndarray):
        kv = torch.from_numpy(kv)
    if not isinstance(kv, torch.Tensor):
        raise InvalidInputError(f"KV must be a torch tensor or numpy array, not {type(kv).__name__}")
    dtype = check_kv(kv, profile)
    x = kv.detach().to("cpu", torch.float32).numpy().copy()
    if not np.isfinite(x).all():
        raise InvalidInputError("KV holds NaN or Inf values; kvwire does not encode non-finite caches")
    return x, dtype


def encode_chunk(
    kv: torch.Tensor | np.ndarray,
    profile: CalibrationProfile,
    *,
    level: int = DEFAULT_LEVEL,
    token_start: int = 0,
    model_fingerprint: str | None = None,
    lanes: int = DEFAULT_LANES,
    base_step: float | None = None,
    backend: str = "auto",
) -> EncodedChunk:
    """Encode one chunk ``[layers, 2, kv_heads, tokens, head_dim]`` at ``level``.

    ``token_start`` is the absolute position of the chunk's first token (RoPE and sinks depend on it).
    ``base_step`` overrides the level's quantisation step (rate-distortion sweeps); the decoder reads
    the steps from the chunk, so any value decodes. ``backend`` "gpu" runs transform, quantisation,
    table choice and rANS on the tensor's device with Triton (kvwire.kernels.gpu_encode); "auto" does so for
    CUDA tensors when Triton is there.
    """
    check_encode_options(level, lanes, token_start, base_step)
    if _use_gpu(backend, None, kv if isinstance(kv, torch.Tensor) else None):
        from kvwire.kernels import gpu_encode

        return gpu_encode.encode_chunks_gpu(
            [torch.as_tensor(kv)],
            profile,
            level=level,
            token_starts=[token_start],
            model_fingerprint=model_fingerprint,
            lanes=lanes,
            base_step=base_step,
        )[0]
    x, dtype = _canonical(kv, profile)
    L, _, H, T, D = x.shape
    G, hpg, d = profile.groups, profile.heads_per_group, profile.group_dim
    positions = np.arange(token_start, token_start + T)
    if profile.has_rope:
        cos, sin = rope_tables(positions, profile.inv_freq, profile.rope_scaling)
        x[:, 0] = remove_rope(x[:, 0], cos, sin, profile.rope_scaling)
    # [L, 2, H, T, D] -> [L, 2, G, T, d]: heads of a group side by side along the feature axis.
    xg = x.reshape(L, 2, G, hpg, T, D).transpose(0, 1, 2, 4, 3, 5).reshape(L, 2, G, T, d)
    coeff = np.matmul(xg - profile.mean[:, :, :, None, :], profile_forward(profile))  # float32: the
    # encoder needs no exactness, any rounding of the coefficients is what gets coded.
    mant_lk, exp_lk, steps = step_codes(profile, level, base_step)
    mant = np.repeat(mant_lk[:, :, None], G, axis=2)
    exp = np.repeat(exp_lk[:, :, None], G, axis=2)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow rows become raw tokens below
        scaled = coeff * (1.0 / steps)[:, :, None, None, None].astype(np.float32)
    # Dead-zone rounding: magnitudes round down unless past ``0.5 + DEADZONE`` of a step, which saves
    # more rate than it costs in distortion on these Laplacian-like coefficients (measured, see docs).
    q = np.trunc(scaled + np.copysign(np.float32(0.5 - DEADZONE), scaled))
    # Raw tokens: attention sinks, and (layer, K/V, token) rows whose coefficients overflow the coder.
    raw = ~(np.abs(q) <= rans.MAX_ABS_VALUE).all(axis=(2, 4))  # [L, 2, T]; NaN from inf - inf too
    n_sink = max(0, min(T, profile.sink_tokens - token_start))
    raw[:, :, :n_sink] = True
    q = np.where(raw[:, :, None, :, None], 0.0, q).astype(np.int32)
    symbols = np.ascontiguousarray(q.transpose(0, 1, 2, 4, 3).reshape(L * 2 * G, d, T))
    classes, _ = choose_tables(rans.symbol_histograms(symbols))
    classes = classes.reshape(L * 2 * G, d)
    bank = table_bank()
    words, offsets, states = rans.encode_segments(symbols, classes, lanes, bank.freq, bank.cum)
    raw_index = np.flatnonzero(raw.reshape(-1)).astype(np.uint32)
    raw_values = _raw_token_bytes(kv, raw, dtype)
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
        token_start=token_start,
        n_tokens=T,
        n_raw=int(raw_index.size),
        n_words=int(words.size),
        model_fingerprint=fingerprint_bytes(model_fingerprint),
        profile_digest=bytes.fromhex(profile.digest)[:16],
        payload_size=0,
    )
    sections = fmt.ChunkSections(
        step_mant=mant.reshape(-1),
        step_exp=exp.reshape(-1),
        classes=classes,
        states=states,
        offsets=offsets.astype(np.uint32),
        words=words,
        raw_index=raw_index,
        raw_values=raw_values,
    )
    return EncodedChunk(fmt.pack_chunk(header, sections), level, token_start, T)


# Most recently used encoder matrices by profile digest. Bounded: every distinct profile would otherwise
# stay in memory for the life of the process (a SmolLM2-135M profile's matrices are ~9 MB).
_FORWARD_CACHE: OrderedDict[str, np.ndarray] = OrderedDict()
FORWARD_CACHE_SIZE = 8
_FORWARD_LOCK = threading.Lock()


def profile_forward(profile: CalibrationProfile) -> np.ndarray:
    """The encoder matrices of a profile, cached by digest (inverting them costs a few ms)."""
    with _FORWARD_LOCK:
        fwd = _FORWARD_CACHE.get(profile.digest)
        if fwd is not None:
            _FORWARD_CACHE.move_to_end(profile.digest)
            return fwd
    fwd = profile.forward_matrix().astype(np.float32)
    with _FORWARD_LOCK:
        _FORWARD_CACHE[profile.digest] = fwd
        while len(_FORWARD_CACHE) > FORWARD_CACHE_SIZE:
            _FORWARD_CACHE.popitem(last=False)
    return fwd


def _raw_token_bytes(kv: torch.Tensor | np.ndarray, raw: np.ndarray, dtype: str) -> np.ndarray:
    """Original values of the raw (layer, K/V, token) rows: uint8 [n_raw, H, D, dtype bytes]."""
    t = torch.from_numpy(kv) if isinstance(kv, np.ndarray) else kv.detach().to("cpu")
    layer, k, tok = np.nonzero(raw)
    if layer.size == 0:
        return np.zeros((0, t.shape[2], t.shape[4], fmt.DTYPE_BYTES[dtype]), dtype=np.uint8)
    rows = t[torch.from_numpy(layer), torch.from_numpy(k), :, torch.from_numpy(tok), :].contiguous()
    return rows.view(torch.uint8).numpy().reshape(layer.size, t.shape[2], t.shape[4], fmt.DTYPE_BYTES[dtype])


def default_max_chunk_tokens(profile: CalibrationProfile) -> int:
    """Tokens one chunk may declare unless the caller allows more: as many as decode to
    ``DEFAULT_MAX_DECODE_BYTES`` of float32 with the profile's layout, and never fewer than a default
    chunk (``DEFAULT_CHUNK_TOKENS``) nor more than the format allows. For example 11,650 tokens for
    SmolLM2-135M (30 layers, 3 KV heads, head dim 64), 2,048 for Llama-3-8B's shape, 819 for 70B's."""
    per_token = profile.layers * 2 * profile.kv_heads * profile.head_dim * 4
    return max(DEFAULT_CHUNK_TOKENS, min(fmt.MAX_TOKENS, DEFAULT_MAX_DECODE_BYTES // max(1, per_token)))


def check_chunk_tokens(n_tokens: int, profile: CalibrationProfile, max_chunk_tokens: int | None) -> None:
    """Raise ``LimitExceededError`` if a chunk declares more than ``max_chunk_tokens`` tokens (None: the
    profile's default, :func:`default_max_chunk_tokens`); ``InvalidInputError`` for a bad limit."""
    limit = default_max_chunk_tokens(profile) if max_chunk_tokens is None else max_chunk_tokens
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InvalidInputError(f"max_chunk_tokens must be a positive int, not {max_chunk_tokens!r}")
    if n_tokens > limit:
        raise LimitExceededError(
            f"chunk declares {n_tokens} tokens, above the decode limit of {limit} "
            "(pass max_chunk_tokens to allow more, e.g. the manifest's count)"
        )


def decode_chunk(
    data: bytes | memoryview,
    profile: CalibrationProfile,
    *,
    model_fingerprint: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    backend: str = "auto",
    max_chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Decode one chunk into ``[layers, 2, kv_heads, tokens, head_dim]`` (keys post-RoPE).

    Raises CorruptChunkError (malformed, truncated, checksum), UnsupportedVersionError,
    ProfileMismatchError (encoded with another profile) or ModelMismatchError (``model_fingerprint``
    given and different from the chunk's). ``backend`` "gpu" runs the Triton kernels (kvwire.kernels.gpu,
    bit-identical output); "auto" does so when ``device`` is CUDA and Triton is installed.
    A chunk declaring more than ``max_chunk_tokens`` tokens (default: :func:`default_max_chunk_tokens`)
    raises LimitExceededError before anything is allocated for it.
    """
    if _use_gpu(backend, device):
        from kvwire.kernels import gpu

        return gpu.decode_chunks_gpu(
            [data],
            profile,
            model_fingerprint=model_fingerprint,
            device=device,
            dtype=dtype,
            max_chunk_tokens=max_chunk_tokens,
        )[0]
    h, sec = validate_chunk(data, profile, model_fingerprint, max_chunk_tokens=max_chunk_tokens)
    q = reconstruct_coefficients(h, sec)
    out = reconstruct(h, sec, q, profile)
    result = torch.from_numpy(out)
    target = dtype or _TORCH_DTYPES[h.dtype]
    result = result.to(_TORCH_DTYPES[h.dtype])
    _overwrite_raw(result, h, sec)
    return result.to(device=device or "cpu", dtype=target)


def validate_chunk(
    data: bytes | memoryview,
    profile: CalibrationProfile,
    model_fingerprint: str | None = None,
    verify_crc: bool = True,
    max_chunk_tokens: int | None = None,
) -> tuple[fmt.ChunkHeader, fmt.ChunkSections]:
    """Parse a chunk and check it against the profile and model; every check that precedes decoding.

    Both device paths call this before any array is built or kernel launched (the GPU path with
    ``verify_crc=False``, checking the checksums of a batch in threads before its upload), so the
    decode-size limit (``max_chunk_tokens``, see :func:`check_chunk_tokens`) holds on both.
    """
    h, sec = fmt.parse_chunk(data, verify_crc=verify_crc)
    check_profile_matches(profile, h.profile_digest)
    check_chunk_tokens(h.n_tokens, profile, max_chunk_tokens)
    if model_fingerprint is not None and h.model_fingerprint != fingerprint_bytes(model_fingerprint):
        want = fingerprint_bytes(model_fingerprint).hex()
        raise ModelMismatchError(f"chunk belongs to model {h.model_fingerprint.hex()}, not {want}")
    if (h.layers, h.kv_heads, h.head_dim, h.heads_per_group) != (
        profile.layers,
        profile.kv_heads,
        profile.head_dim,
        profile.heads_per_group,
    ):
        raise CorruptChunkError("chunk layout does not match its calibration profile")
    if h.table_bank != TABLE_BANK_VERSION:
        raise CorruptChunkError(
            f"chunk uses rANS table bank {h.table_bank}, this build has {TABLE_BANK_VERSION}"
        )
    bank = table_bank()
    if np.any(sec.classes >= bank.n_tables):
        raise CorruptChunkError("chunk names a table outside the bank")
    if np.any((sec.step_mant == 0) | (sec.step_mant > 255)) or np.any(
        (sec.step_exp < MIN_STEP_EXP) | (sec.step_exp > MAX_STEP_EXP)
    ):
        raise CorruptChunkError("chunk holds an invalid quantisation step")
    if h.n_raw and not _raw_rows_finite(sec.raw_values, h.dtype):
        raise CorruptChunkError("chunk holds non-finite raw values (an encoder never writes them)")
    return h, sec


def _raw_rows_finite(raw_values: np.ndarray, dtype: str) -> bool:
    """Whether every stored raw value (bytes [n_raw, H, D, dtype bytes]) is finite."""
    values = torch.from_numpy(np.array(raw_values).reshape(-1)).view(_TORCH_DTYPES[dtype])  # a copy:
    # the sections are read-only views of the chunk
    return bool(torch.isfinite(values).all())


def _use_gpu(backend: str, device: str | torch.device | None, tensor: torch.Tensor | None = None) -> bool:
    """Whether to run the Triton path: forced by ``backend``, or automatic for CUDA inputs/outputs."""
    if backend not in ("auto", "cpu", "gpu"):
        raise InvalidInputError(f"backend must be 'auto', 'cpu' or 'gpu', not {backend!r}")
    if backend != "auto":
        return backend == "gpu"
    on_cuda = (device is not None and torch.device(device).type == "cuda") or (
        tensor is not None and tensor.device.type == "cuda"
    )
    if not on_cuda:
        return False
    from kvwire.kernels.gpu import triton_available

    return triton_available()


def reconstruct_coefficients(h: fmt.ChunkHeader, sec: fmt.ChunkSections) -> np.ndarray:
    """Entropy-decode every segment: int32 [segments, d, tokens]."""
    bank = table_bank()
    q = np.zeros((h.segments, h.group_dim, h.n_tokens), dtype=np.int32)
    offsets = sec.offsets.astype(np.int64)
    check_rans_inputs(sec.words, offsets, sec.states, sec.classes, q, bank.n_tables)
    status = rans.decode_segments(
        sec.words,
        offsets,
        sec.states,
        sec.classes,
        h.n_tokens,
        bank.freq,
        bank.cum,
        bank.lut,
        rans.symbol_extra_bits(),
        q,
    )
    if status:
        raise CorruptChunkError(f"entropy-coded segment {status - 1} is corrupt")
    return q


def check_rans_inputs(
    words: np.ndarray,
    offsets: np.ndarray,
    states: np.ndarray,
    classes: np.ndarray,
    out: np.ndarray,
    n_tables: int,
) -> None:
    """Every bound ``rans.decode_segments`` indexes with, checked where Python can see it.

    The numba decoder runs without bounds checks; ``fmt.parse_chunk`` and ``validate_chunk`` already
    imply all of these, and this states them in one place, next to the call: word ranges inside
    ``words`` (the decoder also stops at its segment's end), one state per lane and at least one lane
    (its per-lane scratch has ``lanes`` slots), table indices inside the bank (``lut[class, slot]``),
    and an output of ``[segments, d, tokens]`` matching the classes. Raises CorruptChunkError.
    """
    n_seg, d = classes.shape
    ok = (
        words.ndim == 1
        and offsets.shape == (n_seg + 1,)
        and int(offsets[0]) >= 0
        and bool(np.all(np.diff(offsets) >= 0))
        and int(offsets[-1]) <= words.shape[0]
        and states.ndim == 2
        and states.shape[0] == n_seg
        and states.shape[1] >= 1
        and out.shape[:2] == (n_seg, d)
        and (classes.size == 0 or int(classes.max()) < n_tables)
    )
    if not ok:
        raise CorruptChunkError("chunk sections are inconsistent with the entropy decoder's layout")


def reconstruct(
    h: fmt.ChunkHeader, sec: fmt.ChunkSections, q: np.ndarray, profile: CalibrationProfile
) -> np.ndarray:
    """Exact inverse transform: float32 [layers, 2, kv_heads, tokens, head_dim] (raw rows not yet placed)."""
    L, G, hpg, D, T, d = h.layers, h.groups, h.heads_per_group, h.head_dim, h.n_tokens, h.group_dim
    out = np.empty((L, 2, G, T, d), dtype=np.float32)
    basis = profile.basis.reshape(L * 2 * G, d, d)
    basis_exp = profile.basis_exp.reshape(-1).astype(np.int64)
    mean = profile.mean.reshape(L * 2 * G, d)
    flat = out.reshape(L * 2 * G, T, d)
    for seg in range(L * 2 * G):
        live = np.flatnonzero(sec.classes[seg])
        if live.size:
            # basis * mant * 2**-(exp + basis_exp) is exact (an integer times a power of two), and every
            # product and partial sum of the GEMM is a multiple of that power of two below 2**53 in
            # magnitude, so the float64 GEMM is exact whatever order the BLAS sums in.
            scale = np.ldexp(float(sec.step_mant[seg]), -(int(sec.step_exp[seg]) + int(basis_exp[seg])))
            rows = basis[seg, live].astype(np.float64) * scale
            np.add(
                np.matmul(q[seg, live].T.astype(np.float64), rows), 0.0, out=flat[seg], casting="same_kind"
            )
            flat[seg] += mean[seg]
        else:
            flat[seg] = mean[seg]
    x = out.reshape(L, 2, G, T, hpg, D).transpose(0, 1, 2, 4, 3, 5).reshape(L, 2, G * hpg, T, D)
    x = np.ascontiguousarray(x)
    if profile.has_rope:
        cos, sin = rope_tables(
            np.arange(h.token_start, h.token_start + T), profile.inv_freq, profile.rope_scaling
        )
        x[:, 0] = apply_rope(x[:, 0], cos, sin)
    return x


def _overwrite_raw(result: torch.Tensor, h: fmt.ChunkHeader, sec: fmt.ChunkSections) -> None:
    if h.n_raw == 0:
        return
    idx = sec.raw_index.astype(np.int64)
    layer, rest = np.divmod(idx, 2 * h.n_tokens)
    k, tok = np.divmod(rest, h.n_tokens)
    values = torch.from_numpy(np.ascontiguousarray(sec.raw_values).copy()).view(result.dtype)
    values = values.reshape(h.n_raw, h.kv_heads, h.head_dim)
    result[torch.from_numpy(layer), torch.from_numpy(k), :, torch.from_numpy(tok), :] = values


def split_tokens(n_tokens: int, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> list[tuple[int, int]]:
    """Token ranges ``[start, end)`` of the chunks of a context."""
    if chunk_tokens <= 0 or chunk_tokens > fmt.MAX_TOKENS:
        raise InvalidInputError(f"chunk_tokens must be in 1..{fmt.MAX_TOKENS}")
    return [(s, min(s + chunk_tokens, n_tokens)) for s in range(0, n_tokens, chunk_tokens)]


def encode_kv(
    kv: torch.Tensor | np.ndarray,
    profile: CalibrationProfile,
    *,
    levels: Sequence[int] = LEVELS,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    model_fingerprint: str | None = None,
    token_start: int = 0,
) -> list[dict[int, EncodedChunk]]:
    """Encode a whole context: for each chunk of ``chunk_tokens`` tokens, a bitstream per level."""
    if kv.ndim != 5:
        raise InvalidInputError(
            f"KV must be [layers, 2, kv_heads, tokens, head_dim], got shape {tuple(kv.shape)}"
        )
    chunks = []
    for start, end in split_tokens(int(kv.shape[3]), chunk_tokens):
        part = kv[:, :, :, start:end]
        chunks.append(
            {
                lv: encode_chunk(
                    part,
                    profile,
                    level=lv,
                    token_start=token_start + start,
                    model_fingerprint=model_fingerprint,
                )
                for lv in levels
            }
        )
    return chunks


def decode_chunks(
    chunks: Iterable[bytes | memoryview],
    profile: CalibrationProfile,
    *,
    model_fingerprint: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    backend: str = "auto",
    max_chunk_tokens: int | None = None,
    max_total_tokens: int | None = None,
) -> torch.Tensor:
    """Decode consecutive chunks and join them along the token axis; checks they are contiguous.

    Every header is read first: a chunk above ``max_chunk_tokens`` (see :func:`decode_chunk`), or all
    of them above ``max_total_tokens`` (None: no limit beyond the per-chunk one), raises
    LimitExceededError before any chunk is decoded. On the GPU path all chunks are validated first and
    then decoded together (one rANS launch).
    """
    chunks = list(chunks)
    if not chunks:
        raise InvalidInputError("no chunks to decode")
    expect, total = None, 0
    for data in chunks:
        h = fmt.read_header(data)
        if expect is not None and h.token_start != expect:
            raise InvalidInputError(
                f"chunks are not contiguous: expected token {expect}, got {h.token_start}"
            )
        check_chunk_tokens(h.n_tokens, profile, max_chunk_tokens)
        expect, total = h.token_start + h.n_tokens, total + h.n_tokens
    if max_total_tokens is not None and total > max_total_tokens:
        raise LimitExceededError(
            f"chunks declare {total} tokens in all, above the limit of {max_total_tokens}"
        )
    if _use_gpu(backend, device):
        from kvwire.kernels import gpu

        parts = gpu.decode_chunks_gpu(
            chunks,
            profile,
            model_fingerprint=model_fingerprint,
            device=device,
            dtype=dtype,
            max_chunk_tokens=max_chunk_tokens,
        )
    else:
        parts = [
            decode_chunk(
                data,
                profile,
                model_fingerprint=model_fingerprint,
                device=device,
                dtype=dtype,
                backend="cpu",
                max_chunk_tokens=max_chunk_tokens,
            )
            for data in chunks
        ]
    return torch.cat(parts, dim=3)
