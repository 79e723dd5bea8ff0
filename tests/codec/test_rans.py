"""The interleaved rANS coder: lossless round trips, range limits, corrupt streams detected."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvwire.kernels import rans
from kvwire.kernels.tables import BANK_FILE, build_table_bank, choose_tables, table_bank


def _roundtrip(values: np.ndarray, lanes: int) -> tuple[np.ndarray, int, np.ndarray, np.ndarray, np.ndarray]:
    bank = table_bank()
    classes, _ = choose_tables(rans.symbol_histograms(values))
    classes = classes.reshape(values.shape[0], values.shape[1])
    words, offsets, states = rans.encode_segments(values, classes, lanes, bank.freq, bank.cum)
    out = np.zeros_like(values)
    status = rans.decode_segments(
        words,
        offsets,
        states,
        classes,
        values.shape[2],
        bank.freq,
        bank.cum,
        bank.lut,
        rans.symbol_extra_bits(),
        out,
    )
    return out, status, words, offsets, states


@settings(max_examples=60, deadline=None)
@given(
    segs=st.integers(1, 3),
    d=st.integers(1, 40),
    tokens=st.integers(1, 70),
    lanes=st.integers(1, 40),
    scale=st.floats(0.01, 5000),
    seed=st.integers(0, 2**31),
)
def test_roundtrip_is_lossless(segs: int, d: int, tokens: int, lanes: int, scale: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = np.clip(
        np.rint(rng.laplace(0, scale, size=(segs, d, tokens))), -rans.MAX_ABS_VALUE, rans.MAX_ABS_VALUE
    )
    values = values.astype(np.int32)
    values[:, rng.random(d) < 0.3] = 0  # dead components
    out, status, *_ = _roundtrip(values, lanes)
    assert status == 0
    np.testing.assert_array_equal(out, values)


def test_extreme_values_and_all_zero() -> None:
    values = np.zeros((2, 5, 9), dtype=np.int32)
    values[0, 0] = [rans.MAX_ABS_VALUE, -rans.MAX_ABS_VALUE, 16, -16, 15, -15, 1 << 15, -(1 << 15), 0]
    out, status, words, *_ = _roundtrip(values, 4)
    assert status == 0
    np.testing.assert_array_equal(out, values)
    zeros = np.zeros((3, 4, 10), dtype=np.int32)
    out, status, words, *_ = _roundtrip(zeros, 8)
    assert status == 0 and words.size == 0 and not out.any()


def test_corrupt_words_and_states_are_detected() -> None:
    rng = np.random.default_rng(3)
    values = np.rint(rng.laplace(0, 3, size=(2, 16, 64))).astype(np.int32)
    _, status, words, offsets, states = _roundtrip(values, 8)
    assert status == 0
    bank = table_bank()
    classes, _ = choose_tables(rans.symbol_histograms(values))
    classes = classes.reshape(2, 16)
    detected = 0
    for trial in range(40):
        w, s = words.copy(), states.copy()
        if trial % 2:
            w[rng.integers(w.size)] ^= np.uint16(1 << rng.integers(16))
        else:
            s[rng.integers(2), rng.integers(8)] ^= np.uint32(1 << rng.integers(32))
        out = np.zeros_like(values)
        st_ = rans.decode_segments(
            w, offsets, s, classes, 64, bank.freq, bank.cum, bank.lut, rans.symbol_extra_bits(), out
        )
        detected += st_ != 0
    assert detected >= 38  # a flipped bit survives the end-state check only by rare coincidence


def test_truncated_stream_never_reads_past_its_end() -> None:
    rng = np.random.default_rng(4)
    values = np.rint(rng.laplace(0, 40, size=(1, 8, 32))).astype(np.int32)
    _, status, words, offsets, states = _roundtrip(values, 4)
    bank = table_bank()
    classes, _ = choose_tables(rans.symbol_histograms(values))
    short = offsets.copy()
    short[-1] -= 5
    out = np.zeros_like(values)
    status = rans.decode_segments(
        words[: short[-1]],
        short,
        states,
        classes.reshape(1, 8),
        32,
        bank.freq,
        bank.cum,
        bank.lut,
        rans.symbol_extra_bits(),
        out,
    )
    assert status == 1


def test_shipped_table_bank_matches_its_generator() -> None:
    assert np.array_equal(np.load(BANK_FILE), build_table_bank())
    bank = table_bank()
    assert np.all(bank.freq[1:].min(axis=1) >= 1)
    assert bank.n_tables < 256


@pytest.mark.parametrize("scale", [0.2, 2.0, 50.0])
def test_table_choice_costs_close_to_entropy(scale: float) -> None:
    rng = np.random.default_rng(5)
    values = np.rint(rng.laplace(0, scale, size=(1, 1, 4096))).astype(np.int32)
    hist = rans.symbol_histograms(values)
    _, bits = choose_tables(hist)
    _, counts = np.unique(values, return_counts=True)
    p = counts / counts.sum()
    entropy = -(counts * np.log2(p)).sum()
    assert bits[0] <= entropy * 1.08 + 64
