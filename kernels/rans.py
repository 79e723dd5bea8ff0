"""Interleaved rANS entropy coder for quantized KV coefficients (CPU reference, numba-compiled).

A chunk's coefficients are coded in *segments* (one per layer and K/V). Inside a segment, up to
``lanes`` rANS coders run in lockstep and share one stream of 16-bit words: at step ``s`` lane ``g``
decodes the ``s``-th symbol of its own sequence, and any renormalisation word it needs is the next
word of the shared stream. This is the layout a GPU decodes with one thread per lane and a prefix
sum per step (coalesced reads); the CPU walks the same order. See docs/format.md.

Constants: 32-bit state in ``[2**16, 2**32)``, 12-bit probabilities, 16-bit renormalisation words.
Each coefficient ``v`` maps to a symbol of a 55-letter alphabet: ``|v| <= 15`` directly, larger
magnitudes as (sign, octave ``k``) plus ``k`` raw bits coded as an equiprobable rANS step, so every
``|v| < 2**16`` is representable and the decoder reads at most two words per coefficient.
"""

from __future__ import annotations

import numba
import numpy as np

PROB_BITS = 12
PROB_SCALE = 1 << PROB_BITS
STATE_LOW = 1 << 16
DIRECT_MAX = 15
MIN_OCTAVE = 4
MAX_OCTAVE = 15
NUM_SYMBOLS = 2 * DIRECT_MAX + 1 + 2 * (MAX_OCTAVE - MIN_OCTAVE + 1)
MAX_ABS_VALUE = (1 << (MAX_OCTAVE + 1)) - 1


def symbol_extra_bits() -> np.ndarray:
    """Number of raw bits that follow each symbol (0 for the direct symbols)."""
    bits = np.zeros(NUM_SYMBOLS, dtype=np.int32)
    for k in range(MIN_OCTAVE, MAX_OCTAVE + 1):
        base = 2 * DIRECT_MAX + 1 + 2 * (k - MIN_OCTAVE)
        bits[base] = bits[base + 1] = k
    return bits


@numba.njit(cache=True, inline="always")
def _to_symbol(v: int) -> tuple[int, int, int]:
    """(symbol, number of raw bits, raw bits) for a coefficient value."""
    a = v if v >= 0 else -v
    if a <= DIRECT_MAX:
        return v + DIRECT_MAX, 0, 0
    k = MIN_OCTAVE
    while (a >> (k + 1)) > 0:
        k += 1
    sym = 2 * DIRECT_MAX + 1 + 2 * (k - MIN_OCTAVE) + (1 if v < 0 else 0)
    return sym, k, a - (1 << k)


@numba.njit(cache=True, inline="always")
def _from_symbol(sym: int, raw: int) -> int:
    if sym <= 2 * DIRECT_MAX:
        return sym - DIRECT_MAX
    r = sym - (2 * DIRECT_MAX + 1)
    k = r // 2 + MIN_OCTAVE
    mag = (1 << k) + raw
    return -mag if (r & 1) else mag


@numba.njit(cache=True)
def lane_plan(classes: np.ndarray, lanes: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Assign the live components of one segment to lanes, round robin in component order.

    Returns (lane_of_live, live_components, active_lanes). Components with class 0 are dead (all
    zero, not coded). Encoder and decoder both derive the plan from the per-component classes.
    """
    live = np.flatnonzero(classes != 0)
    n_live = live.shape[0]
    active = min(lanes, n_live)
    lane_of = np.empty(n_live, dtype=np.int64)
    for i in range(n_live):
        lane_of[i] = i % active if active > 0 else 0
    return lane_of, live, active


@numba.njit(cache=True)
def _encode_segment(
    values: np.ndarray,  # int32 [d, T]
    classes: np.ndarray,  # uint8 [d]
    lanes: int,
    freq: np.ndarray,  # uint32 [n_class, NUM_SYMBOLS]
    cum: np.ndarray,  # uint32 [n_class, NUM_SYMBOLS]
    out_words: np.ndarray,  # uint16 scratch, large enough
    out_states: np.ndarray,  # uint32 [lanes]
) -> int:
    n_tok = values.shape[1]
    _, live, active = lane_plan(classes, lanes)
    n_live = live.shape[0]
    if active == 0:
        return 0
    # Lane g codes live components g, g+active, ...: its s-th symbol is token s % T of its (s // T)-th
    # component. The decoder walks s upwards and lanes upwards; the encoder walks both downwards.
    x = np.empty(active, dtype=np.uint64)
    for g in range(active):
        x[g] = STATE_LOW
    sp = 0
    n_blocks = (n_live + active - 1) // active
    main_limit = np.uint64((STATE_LOW >> PROB_BITS) << 16)
    for j in range(n_blocks - 1, -1, -1):
        na = min(active, n_live - j * active)
        for t in range(n_tok - 1, -1, -1):
            for g in range(na - 1, -1, -1):
                c = live[j * active + g]
                cl = classes[c]
                sym, nb, raw = _to_symbol(values[c, t])
                xs = x[g]
                if nb > 0:
                    if xs >= (np.uint64(STATE_LOW >> nb) << np.uint64(16)):
                        out_words[sp] = xs & np.uint64(0xFFFF)
                        sp += 1
                        xs >>= np.uint64(16)
                    xs = (xs << np.uint64(nb)) | np.uint64(raw)
                f = np.uint64(freq[cl, sym])
                if xs >= main_limit * f:
                    out_words[sp] = xs & np.uint64(0xFFFF)
                    sp += 1
                    xs >>= np.uint64(16)
                xs = ((xs // f) << np.uint64(PROB_BITS)) + (xs % f) + np.uint64(cum[cl, sym])
                x[g] = xs
    for g in range(active):
        out_states[g] = np.uint32(x[g])
    # The decoder reads words in the reverse order of their emission.
    out_words[:sp] = out_words[:sp][::-1].copy()
    return sp


@numba.njit(cache=True)
def encode_segments(
    values: np.ndarray,  # int32 [n_seg, d, T]
    classes: np.ndarray,  # uint8 [n_seg, d]
    lanes: int,
    freq: np.ndarray,
    cum: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Encode every segment.

    Returns (words uint16, word offsets int64 [n_seg + 1], final lane states uint32 [n_seg, lanes]).
    """
    n_seg, d, n_tok = values.shape
    scratch = np.empty(2 * d * n_tok + 16, dtype=np.uint16)
    words = np.empty(2 * n_seg * d * n_tok + 16, dtype=np.uint16)
    offsets = np.zeros(n_seg + 1, dtype=np.int64)
    states = np.zeros((n_seg, lanes), dtype=np.uint32)
    pos = 0
    for seg in range(n_seg):
        n = _encode_segment(values[seg], classes[seg], lanes, freq, cum, scratch, states[seg])
        words[pos : pos + n] = scratch[:n]
        pos += n
        offsets[seg + 1] = pos
    return words[:pos].copy(), offsets, states


@numba.njit(cache=True)
def symbol_histograms(values: np.ndarray) -> np.ndarray:
    """Per-component symbol counts of int32 [n_seg, d, T] values: float64 [n_seg * d, NUM_SYMBOLS]."""
    n_seg, d, n_tok = values.shape
    hist = np.zeros((n_seg * d, NUM_SYMBOLS), dtype=np.float64)
    for seg in range(n_seg):
        for c in range(d):
            row = seg * d + c
            for t in range(n_tok):
                sym, _, _ = _to_symbol(values[seg, c, t])
                hist[row, sym] += 1.0
    return hist


@numba.njit(cache=True)
def decode_segments(
    words: np.ndarray,  # uint16
    offsets: np.ndarray,  # int64 [n_seg+1]
    states: np.ndarray,  # uint32 [n_seg, lanes]
    classes: np.ndarray,  # uint8 [n_seg, d]
    n_tok: int,
    freq: np.ndarray,
    cum: np.ndarray,
    lut: np.ndarray,  # uint8 [n_class, PROB_SCALE]
    extra_bits: np.ndarray,  # int32 [NUM_SYMBOLS]
    out: np.ndarray,  # int32 [n_seg, d, T], zero-filled by the caller
) -> int:
    """Decode every segment into ``out``. Returns 0 on success, or 1 + the index of the first bad segment.

    A segment is bad when it would read past its words, leaves words unread, or does not return every
    lane to the initial state: a corrupt stream never reads out of bounds and is always detected here
    or by the chunk checksum.
    """
    n_seg = classes.shape[0]
    lanes = states.shape[1]
    mask = np.uint64(PROB_SCALE - 1)
    comp = np.empty(lanes, dtype=np.int64)
    ccls = np.empty(lanes, dtype=np.int64)
    for seg in range(n_seg):
        _, live, active = lane_plan(classes[seg], lanes)
        n_live = live.shape[0]
        ptr = offsets[seg]
        end = offsets[seg + 1]
        if ptr > end or end > words.shape[0]:
            return seg + 1
        if active == 0:
            if ptr != end:
                return seg + 1
            continue
        x = np.empty(active, dtype=np.uint64)
        for g in range(active):
            x[g] = np.uint64(states[seg, g])
            if x[g] < STATE_LOW:
                return seg + 1
        n_blocks = (n_live + active - 1) // active
        for j in range(n_blocks):
            na = min(active, n_live - j * active)
            for g in range(na):
                comp[g] = live[j * active + g]
                ccls[g] = classes[seg, comp[g]]
            for t in range(n_tok):
                for g in range(na):
                    cl = ccls[g]
                    xs = x[g]
                    slot = xs & mask
                    sym = lut[cl, slot]
                    xs = (
                        np.uint64(freq[cl, sym]) * (xs >> np.uint64(PROB_BITS))
                        + slot
                        - np.uint64(cum[cl, sym])
                    )
                    if xs < STATE_LOW:
                        if ptr >= end:
                            return seg + 1
                        xs = (xs << np.uint64(16)) | np.uint64(words[ptr])
                        ptr += 1
                    nb = extra_bits[sym]
                    if nb > 0:
                        raw = int(xs & np.uint64((1 << nb) - 1))
                        xs >>= np.uint64(nb)
                        if xs < STATE_LOW:
                            if ptr >= end:
                                return seg + 1
                            xs = (xs << np.uint64(16)) | np.uint64(words[ptr])
                            ptr += 1
                        out[seg, comp[g], t] = _from_symbol(sym, raw)
                    else:
                        out[seg, comp[g], t] = sym - DIRECT_MAX
                    x[g] = xs
        if ptr != end:
            return seg + 1
        for g in range(active):
            if x[g] != STATE_LOW:
                return seg + 1
    return 0
