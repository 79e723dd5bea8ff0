"""Regression tests for the fuzzing findings (docs/reliability.md, "Fuzzing"); each input is also in
fuzz/corpus/, which tests/fuzz/test_mutations.py replays in full."""

from __future__ import annotations

import dataclasses
import hashlib
import struct

import numpy as np
import pytest
import torch

from fuzz import targets
from kvwire.errors import CorruptChunkError, InvalidInputError
from kvwire.kernels import codec
from kvwire.kernels import format as fmt
from kvwire.kernels.profile import CalibrationProfile

PROFILE_FINDINGS = {
    "finding-01-zero-heads-per-group": "layout is inconsistent",  # was ZeroDivisionError
    "finding-02-tiny-layer-weight": "layer weights",  # encoded chunks the decoder then refused
    "finding-03-nan-rope-scaling": "rope scaling",  # loaded; NaN RoPE tables made every row raw
    "finding-04-singular-basis": "",  # loaded; encoding then raised numpy's LinAlgError
    "finding-05-float64-inv-freq": "inv_freq has dtype",  # loaded with a dtype no encoder writes
}


@pytest.mark.parametrize("name", sorted(PROFILE_FINDINGS))
def test_profile_findings_are_typed_errors(name: str) -> None:
    data = (targets.CORPUS_DIR / "profile" / name).read_bytes()
    try:
        prof = CalibrationProfile.from_bytes(data)
    except InvalidInputError as exc:
        assert PROFILE_FINDINGS[name] in str(exc)
        return
    with pytest.raises(InvalidInputError, match="not invertible"):  # the singular basis loads ...
        codec.encode_chunk(torch.zeros(prof.layers, 2, prof.kv_heads, 2, prof.head_dim), prof)


def test_profile_value_bounds() -> None:
    p = targets.profiles()[0]
    for bad in (
        dict(rope_scaling=float("inf")),
        dict(rope_scaling=100.0),
        dict(layer_weight=np.full_like(p.layer_weight, 1e-20)),
        dict(mean=np.full_like(p.mean, 1e35)),
    ):
        with pytest.raises(InvalidInputError):
            CalibrationProfile.from_bytes(dataclasses.replace(p, **bad).to_bytes())


def _chunk_with_raw_rows() -> bytes:
    p = targets.profiles()[0]
    x = torch.linspace(-1, 1, p.head_dim).expand(p.layers, 2, p.kv_heads, 6, p.head_dim).contiguous()
    data = codec.encode_chunk(x, p, token_start=0).data  # the first tokens are attention sinks: raw rows
    assert fmt.read_header(data).n_raw > 0
    return data


def test_non_finite_raw_rows_are_refused() -> None:
    data = bytearray(_chunk_with_raw_rows())
    struct.pack_into("<f", data, len(data) - 4, float("nan"))  # the last raw value (float32)
    with pytest.raises(CorruptChunkError, match="non-finite raw"):
        codec.decode_chunk(targets.fix_crc(data), targets.profiles()[0], backend="cpu")


@pytest.mark.parametrize(("exp", "ok"), [(-65, False), (-64, True), (120, True), (121, False)])
def test_step_exponent_range(exp: int, ok: bool) -> None:
    """Exponents below -64 would let a forged chunk overflow float32 reconstruction to inf."""
    buf = bytearray(_chunk_with_raw_rows())
    h = fmt.read_header(buf)
    step_exp_at = fmt.HEADER_SIZE + ((2 * h.segments + 3) & ~3)  # after the padded mantissas
    struct.pack_into(f"<{h.segments}h", buf, step_exp_at, *[exp] * h.segments)
    data = targets.fix_crc(buf)
    if ok:
        assert targets.check_decode(data) is not None  # decodes, and finite (checked by the target)
    else:
        with pytest.raises(CorruptChunkError, match="quantisation step"):
            codec.decode_chunk(data, targets.profiles()[0], backend="cpu")


def test_encoder_matrix_cache_is_bounded() -> None:
    """Finding 7: every distinct profile's encoder matrices stayed cached for the life of the process."""
    from kvwire.kernels.profile import with_digest

    base = targets.profiles()[1]
    x = torch.zeros(base.layers, 2, base.kv_heads, 2, base.head_dim)
    for i in range(codec.FORWARD_CACHE_SIZE + 5):
        prof = with_digest(dataclasses.replace(base, notes=f"variant {i}"))
        codec.encode_chunk(x, prof)
    assert len(codec._FORWARD_CACHE) == codec.FORWARD_CACHE_SIZE
    assert prof.digest in codec._FORWARD_CACHE


def test_gpu_profile_cache_is_bounded() -> None:
    """The same leak in the GPU path: device copies of every profile seen stayed for the process's life."""
    from kvwire.kernels import gpu
    from kvwire.kernels.profile import with_digest

    base = targets.profiles()[1]
    device = torch.device("cpu")
    for i in range(gpu.PROFILE_CACHE_SIZE + 3):
        prof = with_digest(dataclasses.replace(base, notes=f"gpu variant {i}"))
        first = gpu._device_profile(prof, device)
    assert len(gpu._PROFILE_CACHE) == gpu.PROFILE_CACHE_SIZE
    assert gpu._device_profile(prof, device) is first  # the newest is still cached


def test_dead_chunk_declaring_the_most_tokens_is_bounded_by_the_decode_limit() -> None:
    """The seeds ``make_corpus.huge_dead_chunk`` writes: a few hundred bytes whose components are all dead
    declare 65,536 tokens. Within a limit they decode (to the profile's means); above it they are refused
    from the header (``codec.check_chunk_tokens``), on the CPU path and in the GPU path's validation."""
    from fuzz.make_corpus import huge_dead_chunk
    from kvwire.errors import LimitExceededError

    for prof in targets.profiles():
        data = huge_dead_chunk(prof)
        assert (targets.seed_dir("decode") / hashlib.sha1(data).hexdigest()).exists()  # a committed seed
        assert len(data) < 2048 and fmt.read_header(data).n_words == 0
        with pytest.raises(LimitExceededError, match="65536 tokens"):
            codec.decode_chunk(data, prof, backend="cpu", max_chunk_tokens=65_535)
        with pytest.raises(LimitExceededError, match="65536 tokens"):
            codec.validate_chunk(data, prof, verify_crc=False, max_chunk_tokens=1024)
        assert codec.default_max_chunk_tokens(prof) == fmt.MAX_TOKENS  # a tiny layout: all allowed
        assert codec.decode_chunk(data, prof, backend="cpu").shape[3] == fmt.MAX_TOKENS
