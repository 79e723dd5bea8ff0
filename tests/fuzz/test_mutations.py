"""Mutated chunks and profiles (hypothesis, and the fuzzers' committed corpus): a typed error or a correct
result, never a crash. The mutations recompute the CRC where noted so they reach the parser and decoder
behind the checksum (fuzz/targets.py has the targets shared with the atheris harness, fuzz/run.py)."""

from __future__ import annotations

import random
import struct
from functools import cache
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzz import targets
from fuzz.make_corpus import valid_chunks
from kvwire.errors import CorruptChunkError, KvwireError, ModelMismatchError
from kvwire.kernels import codec
from kvwire.kernels import format as fmt


@cache
def chunks() -> tuple[bytes, ...]:
    """Valid chunks of both fixed profiles: every level and dtype, raw rows, dead components."""
    return tuple(c for i, p in enumerate(targets.profiles()) for c in valid_chunks(p, seed=7 + i))


@cache
def decoded(data: bytes) -> torch.Tensor:
    return codec.decode_chunk(data, targets.profile_for(data), backend="cpu")


chunk_index = st.integers(0, 31)


def _chunk(i: int) -> bytes:
    return chunks()[i % len(chunks())]


def _corpus(target: str) -> list[Path]:
    return sorted(targets.seed_dir(target).iterdir())


@pytest.mark.parametrize("target", targets.TARGETS)
def test_every_corpus_input_is_handled(target: str) -> None:
    """The seeds and every past finding (fuzz/corpus/) end in a result or a typed error."""
    paths = _corpus(target)
    assert len(paths) >= 10
    for path in paths:
        targets.CHECKS[target](path.read_bytes())


def test_the_corpus_reaches_the_decoder_and_past_it() -> None:
    """Seeds are deep: some decode, some fail in the rANS decoder itself behind a valid CRC."""
    outcomes = set()
    for path in _corpus("decode"):
        data = path.read_bytes()
        try:
            codec.decode_chunk(data, targets.profile_for(data), backend="cpu")
            outcomes.add("tensor")
        except KvwireError as exc:
            outcomes.add("entropy" if "entropy-coded segment" in str(exc) else type(exc).__name__)
    assert {"tensor", "CorruptChunkError", "entropy"} <= outcomes


@settings(max_examples=150, deadline=None)
@given(i=chunk_index, pos=st.integers(0, 1 << 30), bit=st.integers(0, 7))
def test_any_bit_flip_is_caught_by_the_checksum(i: int, pos: int, bit: int) -> None:
    data = bytearray(_chunk(i))
    data[pos % len(data)] ^= 1 << bit
    with pytest.raises(CorruptChunkError):
        codec.decode_chunk(bytes(data), targets.profile_for(bytes(data)), backend="cpu")


@settings(max_examples=60, deadline=None)
@given(i=chunk_index, cut=st.integers(0, 1 << 30), extra=st.binary(min_size=1, max_size=9), fix=st.booleans())
def test_truncated_or_extended_chunks_are_refused(i: int, cut: int, extra: bytes, fix: bool) -> None:
    data = _chunk(i)
    for bad in (data[: cut % len(data)], data + extra):
        bad = targets.fix_crc(bad) if fix else bad
        with pytest.raises(CorruptChunkError):
            codec.decode_chunk(bad, targets.profile_for(data), backend="cpu")


@settings(max_examples=300, deadline=None)
@given(
    i=chunk_index,
    field=st.sampled_from(targets.HEADER_FIELDS),
    value=st.one_of(st.integers(0, 2), st.integers(0, (1 << 64) - 1), st.integers(-2, 2)),
)
def test_header_edits_behind_a_valid_crc(i: int, field: tuple[int, str], value: int) -> None:
    """Any header field set to any value, CRC recomputed: a typed error, or (informational fields only,
    or a value equal to the old one) the same tensor as before."""
    data = _chunk(i)
    off, f = field
    old = struct.unpack_from(f, data, off)[0]
    new = (old + value) if value in (-2, -1, 1, 2) else value
    bad = targets.set_header_field(data, off, f, new)
    try:
        y = codec.decode_chunk(bad, targets.profile_for(data), backend="cpu")
    except KvwireError:
        assert bad != data
        return
    if off in (8, 11) or bad == data:  # flags and level are informational: the same tensor
        assert torch.equal(y, decoded(data))
        return
    # Token start only moves RoPE; the dtype may change when no raw rows are stored (or to one of the
    # same width), the token count when no component is coded: no section's size depends on them.
    # Any other edit must be refused.
    assert off in (10, 24, 28), f"header field at {off} accepted a new value {new} (was {old})"
    h = fmt.read_header(bad)
    assert y.shape == h.shape
    if off == 10:  # raw rows, if any, are read in the new dtype: only one of the same width fits
        assert h.n_raw == 0 or fmt.DTYPE_BYTES[h.dtype] == fmt.DTYPE_BYTES[fmt.read_header(data).dtype]


@settings(max_examples=200, deadline=None)
@given(i=chunk_index, pos=st.integers(0, 1 << 30), mask=st.integers(1, 255))
def test_payload_damage_behind_a_valid_crc(i: int, pos: int, mask: int) -> None:
    """A damaged payload with a forged CRC: a typed error or a tensor of the header's shape and dtype."""
    data = bytearray(_chunk(i))
    data[fmt.HEADER_SIZE + pos % (len(data) - fmt.HEADER_SIZE)] ^= mask
    targets.check_decode(targets.fix_crc(data))


@settings(max_examples=200, deadline=None)
@given(i=chunk_index, seed=st.integers(0, 1 << 32), rounds=st.integers(1, 4))
def test_fuzzer_mutations_are_handled(i: int, seed: int, rounds: int) -> None:
    """The atheris harness's own chunk mutator, stacked a few times, through both chunk targets."""
    rng = random.Random(seed)
    data = _chunk(i)
    for _ in range(rounds):
        data = targets.mutate_chunk(data, rng)
    targets.check_decode(data)
    targets.check_gpu_validation(data)


def test_model_fingerprint_edit_is_refused_when_the_caller_names_the_model() -> None:
    data = _chunk(0)
    bad = bytearray(data)
    bad[44] ^= 0xFF
    bad_bytes = targets.fix_crc(bad)
    prof = targets.profile_for(data)
    assert torch.equal(codec.decode_chunk(bad_bytes, prof, backend="cpu"), decoded(data))
    with pytest.raises(ModelMismatchError):
        codec.decode_chunk(bad_bytes, prof, model_fingerprint=prof.model_fingerprint, backend="cpu")


@settings(max_examples=150, deadline=None)
@given(p=st.integers(0, 1), pos=st.integers(0, 1 << 30), mask=st.integers(1, 255), cut=st.booleans())
def test_damaged_profiles_are_refused_or_consistent(p: int, pos: int, mask: int, cut: bool) -> None:
    data = bytearray(targets.profiles()[p].to_bytes())
    if cut:
        del data[pos % len(data) :]
    else:
        data[pos % len(data)] ^= mask
    targets.check_profile(bytes(data))
