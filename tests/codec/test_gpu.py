"""GPU codec path (kvwire.kernels.gpu): bit-identical to the CPU path, same corruption verdicts.

The Triton kernels run under ``TRITON_INTERPRET=1`` on CPU tensors, so no GPU is needed; shapes are kept
small because the interpreter executes each step in numpy. With ``KVWIRE_TEST_DEVICE=cuda`` the same
tests run the compiled kernels on a GPU.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvwire.errors import CorruptChunkError, InvalidInputError
from kvwire.kernels import codec, gpu, gpu_encode, host_crc
from kvwire.kernels import format as fmt
from kvwire.kernels.profile import CalibrationProfile, with_digest

from .conftest import make_profile, synthetic_kv, triton_test_device

DEV = triton_test_device()

pytestmark = pytest.mark.triton


def _refresh_crc(data: bytearray) -> bytes:
    data[fmt.HEADER_SIZE - 4 : fmt.HEADER_SIZE] = b"\0\0\0\0"
    crc = zlib.crc32(bytes(data[fmt.HEADER_SIZE :]), zlib.crc32(bytes(data[: fmt.HEADER_SIZE])))
    data[fmt.HEADER_SIZE - 4 : fmt.HEADER_SIZE] = struct.pack("<I", crc)
    return bytes(data)


def _kv(tokens: int, seed: int, dtype: torch.dtype, outlier: bool = False) -> torch.Tensor:
    x = torch.from_numpy(synthetic_kv(2, 2, tokens, 8, seed=seed))
    if outlier:  # a row whose coefficients overflow the coder: stored raw
        x[1, 0, 1, tokens // 2] = 6e4  # finite in float16 too
    return x.to(dtype)


def _both(data: bytes, profile: CalibrationProfile) -> tuple[torch.Tensor, torch.Tensor]:
    cpu = codec.decode_chunk(data, profile, backend="cpu")
    dev = codec.decode_chunk(data, profile, backend="gpu", device=DEV)
    assert dev.device.type == DEV.type
    return cpu, dev.cpu()


@pytest.fixture(scope="module")
def profile_hpg1() -> CalibrationProfile:
    return make_profile(heads_per_group=1)


@pytest.mark.parametrize(
    ("tokens", "start", "level", "dtype", "lanes", "outlier"),
    [
        (1, 0, 2, torch.float32, 32, False),  # a single (sink, raw) token
        (1, 9, 0, torch.bfloat16, 4, False),
        (6, 2, 4, torch.float16, 3, True),  # sinks and an overflow row stored raw; 3 lanes over 16 comps
        (7, 300, 1, torch.bfloat16, 1, False),  # one lane: the whole segment is one sequential coder
        (9, 5000, 3, torch.float32, 16, True),
    ],
)
def test_gpu_decode_is_bit_identical(
    profile: CalibrationProfile,
    tokens: int,
    start: int,
    level: int,
    dtype: torch.dtype,
    lanes: int,
    outlier: bool,
) -> None:
    x = _kv(tokens, seed=tokens + level, dtype=dtype, outlier=outlier)
    data = codec.encode_chunk(x, profile, level=level, token_start=start, lanes=lanes, backend="cpu").data
    cpu, dev = _both(data, profile)
    assert dev.dtype == cpu.dtype == dtype
    assert torch.equal(cpu.view(torch.uint8), dev.view(torch.uint8))  # bits, signed zeros included
    if outlier:
        assert fmt.read_header(data).n_raw > 0


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    tokens=st.integers(1, 4),
    start=st.integers(0, 600),
    level=st.sampled_from(codec.LEVELS),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    lanes=st.integers(1, 20),
    seed=st.integers(0, 1000),
)
def test_gpu_decode_equals_cpu_property(
    profile: CalibrationProfile,
    tokens: int,
    start: int,
    level: int,
    dtype: torch.dtype,
    lanes: int,
    seed: int,
) -> None:
    x = _kv(tokens, seed=seed, dtype=dtype, outlier=seed % 3 == 0)
    data = codec.encode_chunk(x, profile, level=level, token_start=start, lanes=lanes, backend="cpu").data
    cpu, dev = _both(data, profile)
    assert torch.equal(cpu.view(torch.uint8), dev.view(torch.uint8))


def test_gpu_decode_heads_per_group_one(profile_hpg1: CalibrationProfile) -> None:
    data = codec.encode_chunk(
        _kv(5, 3, torch.float16), profile_hpg1, level=2, token_start=7, backend="cpu"
    ).data
    cpu, dev = _both(data, profile_hpg1)
    assert torch.equal(cpu.view(torch.uint8), dev.view(torch.uint8))


@pytest.mark.parametrize("segs", [1, 32])
def test_batch_decode_in_one_launch(
    profile: CalibrationProfile, monkeypatch: pytest.MonkeyPatch, segs: int
) -> None:
    """Chunks of different lengths, positions, dtypes and lane counts: one rANS launch, CPU-equal results
    (also with several segments of different lengths per kernel program)."""
    monkeypatch.setitem(gpu.TUNING, "rans_segs", segs)
    specs = [
        (4, 0, torch.float16, 32),
        (4, 4, torch.float16, 5),
        (3, 8, torch.bfloat16, 32),
        (1, 11, torch.float32, 2),
    ]
    chunks = [
        codec.encode_chunk(_kv(t, i, dt), profile, level=i % 5, token_start=s, lanes=ln, backend="cpu").data
        for i, (t, s, dt, ln) in enumerate(specs)
    ]
    launches: list[gpu.DecodeBatch] = []
    real = gpu.launch_decode

    def counting(batch: gpu.DecodeBatch) -> None:
        launches.append(batch)
        real(batch)

    monkeypatch.setattr(gpu, "launch_decode", counting)
    got = gpu.decode_chunks_gpu(chunks, profile, device=DEV, dtype=torch.float32)
    assert len(launches) == 1
    for data, y in zip(chunks, got, strict=True):
        ref = codec.decode_chunk(data, profile, backend="cpu", dtype=torch.float32)
        assert torch.equal(ref, y.cpu())


@pytest.mark.parametrize(("lut8", "prefetch"), [(0, 0), (1, 0), (0, 64), (1, 64), (1, 8)])
@pytest.mark.parametrize("few", [True, False])
def test_symbol_lookups_and_prefetch(
    profile: CalibrationProfile, monkeypatch: pytest.MonkeyPatch, lut8: int, prefetch: int, few: bool
) -> None:
    """Both symbol lookups (one packed int32 per slot; the uint8 table then freq | cum per symbol), with
    and without word prefetch, in either segment-count regime, give the CPU's bits for a batch of mixed
    dtypes, lanes, lengths and raw rows."""
    setting = (lut8, 1 - lut8) if few else (1 - lut8, lut8)  # the other regime's entry must not matter
    monkeypatch.setitem(gpu.TUNING, "rans_lut8", setting)
    monkeypatch.setitem(gpu.TUNING, "rans_prefetch", (prefetch, 0) if few else (0, prefetch))
    monkeypatch.setitem(gpu.TUNING, "rans_few", 10**9 if few else 0)
    specs = [  # tokens, start, dtype, lanes, outlier
        (5, 0, torch.float16, 32, True),
        (3, 5, torch.float16, 7, False),
        (4, 8, torch.bfloat16, 32, True),
        (2, 12, torch.float32, 1, False),
    ]
    chunks = [
        codec.encode_chunk(
            _kv(t, 50 + i, dt, outlier=o), profile, level=i % 5, token_start=s, lanes=ln, backend="cpu"
        ).data
        for i, (t, s, dt, ln, o) in enumerate(specs)
    ]
    got = gpu.decode_chunks_gpu(chunks, profile, device=DEV)
    for data, y in zip(chunks, got, strict=True):
        ref = codec.decode_chunk(data, profile, backend="cpu")
        assert torch.equal(ref.view(torch.uint8), y.cpu().view(torch.uint8))


@pytest.mark.parametrize(
    ("tokens", "start", "level", "dtype"), [(1, 0, 2, torch.float16), (7, 3, 0, torch.bfloat16)]
)
def test_gpu_encoder_streams_decode_identically(
    profile: CalibrationProfile, tokens: int, start: int, level: int, dtype: torch.dtype
) -> None:
    x = _kv(tokens, seed=40 + tokens, dtype=dtype, outlier=tokens > 1)
    enc = codec.encode_chunk(x.to(DEV), profile, level=level, token_start=start, lanes=4, backend="gpu")
    cpu, dev = _both(enc.data, profile)
    assert torch.equal(cpu.view(torch.uint8), dev.view(torch.uint8))
    # and the stream is a faithful encoding: as close to the input as the CPU encoder's own stream
    ref = codec.decode_chunk(
        codec.encode_chunk(x, profile, level=level, token_start=start, lanes=4, backend="cpu").data, profile
    )
    assert torch.allclose(cpu.float(), ref.float(), atol=1e-2 * float(x.float().abs().max()))


def test_gpu_encoder_batch_and_validation(profile: CalibrationProfile) -> None:
    xs = [_kv(3, s, torch.float16).to(DEV) for s in (1, 2)]
    encs = gpu_encode.encode_chunks_gpu(xs, profile, level=1, token_starts=[0, 3], lanes=8)
    assert [e.token_start for e in encs] == [0, 3]
    for e in encs:
        cpu, dev = _both(e.data, profile)
        assert torch.equal(cpu, dev)
    with pytest.raises(InvalidInputError):
        gpu_encode.encode_chunks_gpu([xs[0], _kv(4, 1, torch.float16).to(DEV)], profile)
    bad = xs[0].clone()
    bad[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(InvalidInputError):
        codec.encode_chunk(bad, profile, backend="gpu")
    with pytest.raises(InvalidInputError):
        codec.encode_chunk(xs[0], profile, backend="tpu")


@pytest.fixture(scope="module")
def chunk_bytes(profile: CalibrationProfile) -> bytes:
    return codec.encode_chunk(_kv(5, 11, torch.float16), profile, level=1, token_start=0, backend="cpu").data


def test_corruption_behind_a_valid_checksum_gets_the_same_verdict(
    profile: CalibrationProfile, chunk_bytes: bytes
) -> None:
    """Damage to states, offsets-consistent words: both paths raise, or both return the same bits."""
    h, _ = fmt.parse_chunk(chunk_bytes)
    sizes = dict(fmt.section_sizes(h))
    names = [n for n, _ in fmt.section_sizes(h)]
    start = {n: fmt.HEADER_SIZE + sum(sizes[m] for m in names[: names.index(n)]) for n in names}
    rng = np.random.default_rng(3)
    caught = 0
    targets = [("words", 2 * h.n_words)] * 10 + [("states", 4 * h.segments * h.lanes)] * 3
    for name, span in targets:
        data = bytearray(chunk_bytes)
        data[start[name] + int(rng.integers(span))] ^= 1 << int(rng.integers(8))
        forged = _refresh_crc(data)
        try:
            cpu = codec.decode_chunk(forged, profile, backend="cpu")
        except CorruptChunkError:
            caught += 1
            with pytest.raises(CorruptChunkError, match="entropy-coded segment"):
                codec.decode_chunk(forged, profile, backend="gpu", device=DEV)
        else:
            dev = codec.decode_chunk(forged, profile, backend="gpu", device=DEV).cpu()
            assert torch.equal(cpu.view(torch.uint8), dev.view(torch.uint8))
    assert caught > 0


def test_truncated_words_are_caught_without_reading_past_them(
    profile: CalibrationProfile, chunk_bytes: bytes
) -> None:
    """Move a segment boundary (CRC forged): the segment before it overruns, the one after has leftovers."""
    h, sec = fmt.parse_chunk(chunk_bytes)
    sizes = fmt.section_sizes(h)
    off = fmt.HEADER_SIZE + sum(size for name, size in sizes[: [n for n, _ in sizes].index("offsets")])
    seg = int(np.argmax(np.diff(sec.offsets.astype(np.int64))))  # a segment with words
    for delta in (-1, 1):
        data = bytearray(chunk_bytes)
        struct.pack_into("<I", data, off + 4 * (seg + 1), int(sec.offsets[seg + 1]) + delta)
        forged = _refresh_crc(data)
        with pytest.raises(CorruptChunkError):
            codec.decode_chunk(forged, profile, backend="cpu")
        with pytest.raises(CorruptChunkError, match="entropy-coded segment"):
            gpu.decode_chunks_gpu([forged], profile, device=DEV)


def test_header_is_validated_before_any_launch(
    profile: CalibrationProfile, chunk_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_launch(*args: object) -> None:
        raise AssertionError("kernel launched for an invalid chunk")

    monkeypatch.setattr(gpu, "prepare_decode", no_launch)
    monkeypatch.setattr(gpu, "launch_decode", no_launch)
    h, _ = fmt.parse_chunk(chunk_bytes)
    sizes = fmt.section_sizes(h)
    off = fmt.HEADER_SIZE + sum(size for name, size in sizes[: [n for n, _ in sizes].index("offsets")])
    data = bytearray(chunk_bytes)
    struct.pack_into("<I", data, off + 4 * h.segments, h.n_words + 7)  # last offset past the words
    bad_offsets = _refresh_crc(data)
    data = bytearray(chunk_bytes)
    struct.pack_into("<H", data, 12, 1024)  # layer count: implausible size / layout mismatch
    bad_layers = _refresh_crc(data)
    for bad in (chunk_bytes[:-3], bad_offsets, bad_layers, b"XXXX" + chunk_bytes[4:]):
        with pytest.raises(CorruptChunkError):
            gpu.decode_chunks_gpu([chunk_bytes, bad], profile, device=DEV)
        with pytest.raises(CorruptChunkError):
            codec.decode_chunk(bad, profile, backend="gpu", device=DEV)


def test_decode_chunks_joins_a_context_on_either_path(profile: CalibrationProfile) -> None:
    x = torch.from_numpy(synthetic_kv(2, 2, 7, 8, seed=5)).half()
    chunks = codec.encode_kv(x, profile, levels=[2], chunk_tokens=3)
    data = [c[2].data for c in chunks]
    cpu = codec.decode_chunks(data, profile, backend="cpu")
    dev = codec.decode_chunks(data, profile, backend="gpu", device=DEV)
    assert dev.shape == (2, 2, 2, 7, 8) and torch.equal(cpu, dev.cpu())
    with pytest.raises(InvalidInputError, match="contiguous"):
        codec.decode_chunks([data[0], data[2]], profile, backend="gpu", device=DEV)


def test_large_coefficients_take_the_exact_wide_path(profile: CalibrationProfile) -> None:
    """A tiny step makes coefficients far beyond int8: the kernel's six-dot digit product stays exact."""
    x = _kv(6, 21, torch.float32)
    data = codec.encode_chunk(x, profile, level=0, token_start=4, base_step=0.01, backend="cpu").data
    q = codec.reconstruct_coefficients(*fmt.parse_chunk(data))
    assert np.abs(q).max() > 1000
    cpu, dev = _both(data, profile)
    assert torch.equal(cpu.view(torch.uint8), dev.view(torch.uint8))


def test_two_dot_and_six_dot_tiles_in_one_batch(profile: CalibrationProfile) -> None:
    """Segments whose coefficients fit in int8 (the reconstruction's first launch) beside segments that do
    not (flagged, the second launch), in one chunk and across the chunks of a batch: the CPU's bits."""
    x = _kv(6, 33, torch.bfloat16)
    chunks = [
        codec.encode_chunk(x, profile, level=2, token_start=4, base_step=step, backend="cpu").data
        for step in (8.0, 32.0)
    ]
    peaks = [np.abs(codec.reconstruct_coefficients(*fmt.parse_chunk(c))).max(axis=(1, 2)) for c in chunks]
    assert np.any(peaks[0] > 127) and np.any(peaks[0] <= 127) and np.all(peaks[1] <= 127)
    got = gpu.decode_chunks_gpu(chunks, profile, device=DEV)
    for data, y in zip(chunks, got, strict=True):
        ref = codec.decode_chunk(data, profile, backend="cpu")
        assert torch.equal(ref.view(torch.uint8), y.cpu().view(torch.uint8))


def test_partial_rotary_profile_uses_the_torch_fallback(profile: CalibrationProfile) -> None:
    """Rotary over part of each head is outside the one-pass kernel: the torch path decodes it, same bits."""
    part = with_digest(dataclasses.replace(profile, inv_freq=profile.inv_freq[:2], digest=""))
    assert not gpu._fusable(part) and gpu._fusable(profile)
    data = codec.encode_chunk(_kv(5, 8, torch.bfloat16), part, level=2, token_start=3, backend="cpu").data
    cpu, dev = _both(data, part)
    assert torch.equal(cpu.view(torch.uint8), dev.view(torch.uint8))


@pytest.mark.parametrize("pieces", [True, False])
def test_threaded_checksums_in_pieces_and_whole(
    profile: CalibrationProfile, chunk_bytes: bytes, monkeypatch: pytest.MonkeyPatch, pieces: bool
) -> None:
    """CRC-32s in pieces, combined (ISA-L), or whole (zlib): same verdicts, no launch on a bad one."""
    if pieces:
        if host_crc.crc32_combine() is None:
            pytest.skip("isal is not installed")
        monkeypatch.setattr(host_crc, "PIECE", 100)
    else:
        monkeypatch.setattr(host_crc, "crc32_combine", lambda: None)
    x = _kv(3, 12, torch.bfloat16)
    other = codec.encode_chunk(x, profile, level=3, token_start=5, backend="cpu").data
    got = gpu.decode_chunks_gpu([chunk_bytes, other], profile, device=DEV)
    for data, y in zip([chunk_bytes, other], got, strict=True):
        assert torch.equal(codec.decode_chunk(data, profile, backend="cpu"), y.cpu())
    bad = bytearray(other)
    bad[len(bad) // 2] ^= 4

    def no_launch(*args: object) -> None:
        raise AssertionError("kernel launched for a chunk with a bad checksum")

    monkeypatch.setattr(gpu, "prepare_decode", no_launch)
    with pytest.raises(CorruptChunkError, match="chunk 1 checksum"):
        gpu.decode_chunks_gpu([chunk_bytes, bytes(bad)], profile, device=DEV)


def test_positions_beyond_the_cached_rope_table(
    profile: CalibrationProfile, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks past the cached cos/sin range get per-batch tables: same bits as the CPU path."""
    monkeypatch.setattr(gpu, "_ROPE_CACHED_POSITIONS", 8)
    chunks = [
        codec.encode_chunk(_kv(3, 30 + s, torch.float16), profile, level=2, token_start=s, backend="cpu").data
        for s in (2, 70000)
    ]
    got = gpu.decode_chunks_gpu(chunks, profile, device=DEV)
    for data, y in zip(chunks, got, strict=True):
        ref = codec.decode_chunk(data, profile, backend="cpu")
        assert torch.equal(ref.view(torch.uint8), y.cpu().view(torch.uint8))


def test_decode_limit_holds_before_staging(
    profile: CalibrationProfile, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk above the decode limit is refused by the validation in front of the kernels, before
    its bytes are staged or its output allocated; a caller may allow more."""
    from kvwire.errors import LimitExceededError

    from .test_codec import dead_chunk

    data = dead_chunk(profile, 5000)
    real_staging = gpu._checksum_and_copy

    def no_staging(*args: object) -> None:
        raise AssertionError("bytes staged for a chunk above the limit")

    monkeypatch.setattr(gpu, "_checksum_and_copy", no_staging)
    with pytest.raises(LimitExceededError, match="5000 tokens"):
        codec.decode_chunk(data, profile, backend="gpu", device=DEV, max_chunk_tokens=4999)
    with pytest.raises(LimitExceededError):
        gpu.decode_chunks_gpu([data], profile, device=DEV, max_chunk_tokens=256)
    with pytest.raises(LimitExceededError):
        codec.decode_chunks([data], profile, backend="gpu", device=DEV, max_chunk_tokens=256)
    monkeypatch.setattr(gpu, "_checksum_and_copy", real_staging)
    y = codec.decode_chunk(data, profile, backend="gpu", device=DEV, max_chunk_tokens=5000)
    assert y.shape[3] == 5000 and torch.equal(y.cpu(), codec.decode_chunk(data, profile, backend="cpu"))
