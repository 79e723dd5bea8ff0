"""Chunk codec: round trips within the quantisation bound, raw tokens exact, bad input typed errors."""

from __future__ import annotations

import dataclasses
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvwire.errors import (
    CorruptChunkError,
    InvalidInputError,
    LimitExceededError,
    ModelMismatchError,
    ProfileMismatchError,
    UnsupportedVersionError,
)
from kvwire.kernels import codec
from kvwire.kernels import format as fmt
from kvwire.kernels.profile import CalibrationProfile

from .conftest import make_profile, synthetic_kv

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def error_bound(profile: CalibrationProfile, level: int, x: torch.Tensor) -> torch.Tensor:
    """Worst-case reconstruction error per (layer, K/V) and channel for a non-raw token."""
    basis = np.abs(profile.basis_float())  # [L, 2, G, d, d]
    steps = codec.LEVEL_STEPS[level] * profile.layer_weight.astype(np.float64)  # [L, 2]
    per_dim = 0.5 * (1 + 1 / 128) * steps[:, :, None, None] * basis.sum(axis=3)  # [L, 2, G, d]
    L, _, H, _, D = x.shape
    per_dim = per_dim.reshape(L, 2, H, 1, D)
    bound = torch.from_numpy(per_dim).float()
    if profile.has_rope:  # rotation mixes each channel with its pair: bound both by the larger
        half = D // 2
        pair = torch.maximum(bound[..., :half], bound[..., half:])
        bound = bound.clone()
        bound[:, 0] = torch.cat([pair, pair], dim=-1)[:, 0] * 2
    eps = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[x.dtype]
    return bound + eps * x.float().abs() + 1e-5


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    tokens=st.integers(1, 300),
    start=st.sampled_from([0, 2, 256, 5000]),
    level=st.sampled_from(codec.LEVELS),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 1000),
    kind=st.sampled_from(["realistic", "all-equal-channels", "outliers", "tiny"]),
)
def test_roundtrip_within_bound(
    profile: CalibrationProfile, tokens: int, start: int, level: int, dtype: torch.dtype, seed: int, kind: str
) -> None:
    x = torch.from_numpy(synthetic_kv(2, 2, tokens, 8, seed=seed))
    if kind == "all-equal-channels":
        x[:, :, :, :, ::2] = 0.75
    elif kind == "outliers":
        big = 6e4 if dtype == torch.float16 else 1e30
        x[1, 0, 1, tokens // 2, 3] = big
        x[0, 1, 0, tokens - 1, 0] = -big
    elif kind == "tiny":
        x *= 1e-6
    x = x.to(dtype)
    chunk = codec.encode_chunk(x, profile, level=level, token_start=start, model_fingerprint="ab" * 32)
    y = codec.decode_chunk(chunk.data, profile, model_fingerprint="ab" * 32)
    assert y.dtype == dtype and y.shape == x.shape
    assert chunk.n_tokens == tokens and chunk.token_start == start and chunk.level == level
    err = (y.float() - x.float()).abs()
    assert torch.all(err <= error_bound(profile, level, x)), float(err.max())
    sinks = max(0, min(tokens, profile.sink_tokens - start))
    assert torch.equal(y[:, :, :, :sinks], x[:, :, :, :sinks])


def test_outlier_rows_are_stored_exactly(profile: CalibrationProfile) -> None:
    x = torch.from_numpy(synthetic_kv(2, 2, 40, 8))
    x[1, 1, 0, 17, 2] = 3e38
    y = codec.decode_chunk(codec.encode_chunk(x, profile, level=4, token_start=100).data, profile)
    assert torch.equal(y[1, 1, :, 17], x[1, 1, :, 17])
    assert torch.isfinite(y).all()


def test_levels_trade_size_for_error(profile: CalibrationProfile) -> None:
    x = torch.from_numpy(synthetic_kv(2, 2, 256, 8, seed=7))
    sizes, errors = [], []
    for level in codec.LEVELS:
        chunk = codec.encode_chunk(x, profile, level=level, token_start=512)
        y = codec.decode_chunk(chunk.data, profile)
        sizes.append(chunk.nbytes)
        errors.append(float(((y - x) ** 2).mean()))
    assert sizes == sorted(sizes, reverse=True)
    assert errors == sorted(errors)


def test_decoding_is_deterministic_and_bytes_are_stable(profile: CalibrationProfile) -> None:
    x = torch.from_numpy(synthetic_kv(2, 2, 64, 8, seed=9))
    a = codec.encode_chunk(x, profile, level=2, token_start=64)
    b = codec.encode_chunk(x.clone(), profile, level=2, token_start=64)
    assert a.data == b.data
    assert torch.equal(codec.decode_chunk(a.data, profile), codec.decode_chunk(a.data, profile))


def test_grouped_heads_per_group_one() -> None:
    prof = make_profile(layers=1, heads=4, head_dim=4, heads_per_group=1)
    x = torch.from_numpy(synthetic_kv(1, 4, 33, 4))
    y = codec.decode_chunk(codec.encode_chunk(x, prof, level=0, token_start=10).data, prof)
    assert torch.all((y - x).abs() <= error_bound(prof, 0, x))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_is_rejected(profile: CalibrationProfile, value: float) -> None:
    x = torch.from_numpy(synthetic_kv(2, 2, 8, 8))
    x[0, 1, 1, 3, 2] = value
    with pytest.raises(InvalidInputError, match="NaN or Inf"):
        codec.encode_chunk(x, profile)


@pytest.mark.parametrize(
    "shape", [(2, 2, 2, 8), (3, 2, 2, 8, 8), (2, 2, 3, 8, 8), (2, 2, 2, 8, 6), (2, 2, 2, 0, 8)]
)
def test_wrong_shapes_are_rejected(profile: CalibrationProfile, shape: tuple[int, ...]) -> None:
    with pytest.raises(InvalidInputError):
        codec.encode_chunk(torch.zeros(shape), profile)


def test_bad_arguments_are_rejected(profile: CalibrationProfile) -> None:
    x = torch.zeros(2, 2, 2, 4, 8)
    with pytest.raises(InvalidInputError):
        codec.encode_chunk(x, profile, level=9)
    with pytest.raises(InvalidInputError):
        codec.encode_chunk(x.to(torch.int32), profile)
    with pytest.raises(InvalidInputError):
        codec.encode_chunk(x, profile, token_start=-1)


def _refresh_crc(data: bytearray) -> bytes:
    data[fmt.HEADER_SIZE - 4 : fmt.HEADER_SIZE] = b"\0\0\0\0"
    crc = zlib.crc32(bytes(data[fmt.HEADER_SIZE :]), zlib.crc32(bytes(data[: fmt.HEADER_SIZE])))
    data[fmt.HEADER_SIZE - 4 : fmt.HEADER_SIZE] = struct.pack("<I", crc)
    return bytes(data)


@pytest.fixture(scope="module")
def chunk_bytes(profile: CalibrationProfile) -> bytes:
    x = torch.from_numpy(synthetic_kv(2, 2, 50, 8, seed=11)).half()
    return codec.encode_chunk(x, profile, level=1, token_start=0, model_fingerprint="ab" * 32).data


def test_truncated_and_extended_chunks_are_rejected(profile: CalibrationProfile, chunk_bytes: bytes) -> None:
    for cut in (0, 3, fmt.HEADER_SIZE - 1, fmt.HEADER_SIZE, len(chunk_bytes) // 2, len(chunk_bytes) - 1):
        with pytest.raises(CorruptChunkError):
            codec.decode_chunk(chunk_bytes[:cut], profile)
    with pytest.raises(CorruptChunkError, match="trailing"):
        codec.decode_chunk(chunk_bytes + b"\0", profile)


def test_flipped_bits_are_detected(profile: CalibrationProfile, chunk_bytes: bytes) -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        data = bytearray(chunk_bytes)
        pos = int(rng.integers(len(data)))
        data[pos] ^= 1 << int(rng.integers(8))
        with pytest.raises(CorruptChunkError):
            codec.decode_chunk(bytes(data), profile)


def test_corruption_behind_a_valid_checksum_never_crashes(
    profile: CalibrationProfile, chunk_bytes: bytes
) -> None:
    """With a forged CRC, a damaged stream gives a typed error or a well-formed tensor, never a crash.

    The coder's end-state check catches most damage (tests/codec/test_rans.py); raw bits of large
    coefficients carry no redundancy, so only the checksum can catch damage there.
    """
    h, _ = fmt.parse_chunk(chunk_bytes)
    caught = 0
    rng = np.random.default_rng(1)
    for _ in range(100):
        data = bytearray(chunk_bytes)
        data[fmt.HEADER_SIZE + int(rng.integers(len(data) - fmt.HEADER_SIZE))] ^= 1 << int(rng.integers(8))
        try:
            y = codec.decode_chunk(_refresh_crc(data), profile)
        except CorruptChunkError:
            caught += 1
        else:
            assert y.shape == h.shape and y.dtype == torch.float16
    assert caught > 0


def test_header_fields_are_validated(profile: CalibrationProfile, chunk_bytes: bytes) -> None:
    def patched(offset: int, fmt_: str, value: int) -> bytes:
        data = bytearray(chunk_bytes)
        struct.pack_into(fmt_, data, offset, value)
        return _refresh_crc(data)

    with pytest.raises(CorruptChunkError, match="magic"):
        codec.decode_chunk(b"XXXX" + chunk_bytes[4:], profile)
    with pytest.raises(UnsupportedVersionError, match="version 7"):
        codec.decode_chunk(patched(4, "<H", 7), profile)
    with pytest.raises(CorruptChunkError, match="dtype"):
        codec.decode_chunk(patched(10, "<B", 9), profile)
    # layer count 1024 with 65536 tokens claims ~2**31+ elements: refused before any allocation
    data = bytearray(chunk_bytes)
    struct.pack_into("<H", data, 12, 1024)
    struct.pack_into("<I", data, 28, 65536)
    with pytest.raises(CorruptChunkError):
        codec.decode_chunk(_refresh_crc(data), profile)


def test_wrong_profile_and_model_are_refused(profile: CalibrationProfile, chunk_bytes: bytes) -> None:
    other = make_profile(layers=2, heads=2, head_dim=8, heads_per_group=1)
    with pytest.raises(ProfileMismatchError):
        codec.decode_chunk(chunk_bytes, other)
    with pytest.raises(ModelMismatchError):
        codec.decode_chunk(chunk_bytes, profile, model_fingerprint="cd" * 32)
    codec.decode_chunk(chunk_bytes, profile, model_fingerprint="ab" * 32)


def test_encode_kv_and_decode_chunks(profile: CalibrationProfile) -> None:
    x = torch.from_numpy(synthetic_kv(2, 2, 300, 8, seed=5))
    chunks = codec.encode_kv(x, profile, levels=[0, 3], chunk_tokens=128)
    assert [c[0].token_start for c in chunks] == [0, 128, 256]
    assert all(c[3].nbytes < c[0].nbytes for c in chunks)
    y = codec.decode_chunks([c[0].data for c in chunks], profile)
    assert y.shape == x.shape
    mixed = codec.decode_chunks([chunks[0][0].data, chunks[1][3].data, chunks[2][0].data], profile)
    assert mixed.shape == x.shape
    with pytest.raises(InvalidInputError, match="contiguous"):
        codec.decode_chunks([chunks[0][0].data, chunks[2][0].data], profile)


def test_profile_bytes_roundtrip_and_reject_garbage(profile: CalibrationProfile) -> None:
    again = CalibrationProfile.from_bytes(profile.to_bytes())
    assert again.digest == profile.digest
    for junk in (b"", b"\0" * 100, profile.to_bytes()[:-10]):
        with pytest.raises(InvalidInputError):
            CalibrationProfile.from_bytes(junk)


@settings(max_examples=25, deadline=None)
@given(
    layers=st.integers(1, 3),
    heads=st.sampled_from([1, 2, 3, 4]),
    head_dim=st.sampled_from([2, 4, 6, 16]),
    grouped=st.booleans(),
    rope=st.booleans(),
    tokens=st.integers(1, 40),
    level=st.sampled_from(codec.LEVELS),
    seed=st.integers(0, 100),
)
def test_roundtrip_any_layout(
    layers: int, heads: int, head_dim: int, grouped: bool, rope: bool, tokens: int, level: int, seed: int
) -> None:
    """Any (layers, heads, head dim, heads per group) and models with or without RoPE round-trip."""
    from kvwire.kernels.profile import fit_profile

    sample = synthetic_kv(layers, heads, 64, head_dim, seed=seed + 1).astype(np.float64)
    inv_freq = (1.0 / 10000.0 ** (np.arange(0, head_dim, 2) / head_dim)).astype(np.float32) if rope else None
    prof = fit_profile(
        [sample],
        model_fingerprint="",
        inv_freq=inv_freq,
        heads_per_group=heads if grouped else 1,
        layer_weight=np.full((layers, 2), 0.05),
        sink_tokens=1,
    )
    x = torch.from_numpy(synthetic_kv(layers, heads, tokens, head_dim, seed=seed))
    y = codec.decode_chunk(codec.encode_chunk(x, prof, level=level, token_start=3).data, prof)
    assert y.shape == x.shape
    assert torch.all((y - x).abs() <= error_bound(prof, level, x))


# ------------------------------------------------------------------------------- decode-size limit


def dead_chunk(profile: CalibrationProfile, n_tokens: int) -> bytes:
    """A chunk whose components are all dead (no rANS words), its header rewritten to ``n_tokens``
    tokens and its CRC fixed: still a valid chunk, of a few hundred bytes, whatever the count."""
    x = torch.from_numpy(synthetic_kv(profile.layers, profile.kv_heads, 6, profile.head_dim, seed=2))
    h, sec = fmt.parse_chunk(codec.encode_chunk(x, profile, token_start=1000).data)
    dead = dataclasses.replace(sec, classes=np.zeros_like(sec.classes))  # every component at its mean
    zeros = np.zeros((h.segments, h.group_dim, h.n_tokens), dtype=np.int32)
    means = torch.from_numpy(codec.reconstruct(h, dead, zeros, profile))  # KV at the profile's mean
    data = bytearray(codec.encode_chunk(means, profile, level=2, token_start=1000).data)
    assert fmt.read_header(data).n_words == 0
    struct.pack_into("<I", data, 28, n_tokens)
    return _refresh_crc(data)


def test_default_decode_limit_follows_the_profile_shape(profile: CalibrationProfile) -> None:
    smol = make_profile(layers=30, heads=3, head_dim=64)  # SmolLM2-135M's KV layout
    assert codec.default_max_chunk_tokens(smol) == 512 * 2**20 // (30 * 2 * 3 * 64 * 4) == 11650
    assert codec.default_max_chunk_tokens(profile) == fmt.MAX_TOKENS  # a tiny layout: the format's cap
    tiny = dead_chunk(smol, 6)
    assert codec.decode_chunk(tiny, smol).shape == (30, 2, 3, 6, 64)
    # 65,536 tokens from ~20 KB would decode to 3 GB of float32 (plus a coefficient buffer as large).
    huge = dead_chunk(smol, fmt.MAX_TOKENS)
    assert len(huge) < 32 * 1024
    for call in (
        lambda: codec.decode_chunk(huge, smol, backend="cpu"),
        lambda: codec.decode_chunks([huge], smol, backend="cpu"),
        lambda: codec.validate_chunk(huge, smol, verify_crc=False),  # what the GPU path runs first
    ):
        with pytest.raises(LimitExceededError, match="65536 tokens, above the decode limit of 11650"):
            call()


def test_decode_limit_is_checked_before_anything_is_allocated(profile: CalibrationProfile) -> None:
    import contextlib
    import tracemalloc

    data = dead_chunk(profile, 40_000)  # 40,000 x 64 elements: 10 MB of float32, as much again of int32

    def peak_bytes(**kw: object) -> int:
        tracemalloc.start()
        try:
            with contextlib.suppress(LimitExceededError):
                codec.decode_chunk(data, profile, backend="cpu", **kw)  # type: ignore[arg-type]
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    assert codec.decode_chunk(data, profile).shape[3] == 40_000  # within the default: decodes
    assert peak_bytes() > 10 * 2**20
    assert peak_bytes(max_chunk_tokens=39_999) < 2**20  # refused from the header


def test_decode_limit_options(profile: CalibrationProfile) -> None:
    x = torch.from_numpy(synthetic_kv(2, 2, 9, 8, seed=3))
    chunks = [c[1].data for c in codec.encode_kv(x, profile, levels=[1], chunk_tokens=4)]  # 4 + 4 + 1
    assert codec.decode_chunks(chunks, profile, max_chunk_tokens=4, max_total_tokens=9).shape[3] == 9
    with pytest.raises(LimitExceededError, match="decode limit of 3"):
        codec.decode_chunks(chunks, profile, max_chunk_tokens=3)
    with pytest.raises(LimitExceededError, match="9 tokens in all"):
        codec.decode_chunks(chunks, profile, max_total_tokens=8)
    with pytest.raises(LimitExceededError):
        codec.decode_chunk(chunks[0], profile, max_chunk_tokens=3)
    for bad in (0, -1, 2.5, True, "4"):
        with pytest.raises(InvalidInputError, match="max_chunk_tokens"):
            codec.decode_chunk(chunks[0], profile, max_chunk_tokens=bad)  # type: ignore[arg-type]
