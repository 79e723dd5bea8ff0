"""Triton kernels for the interleaved rANS stage (the GPU twin of kvwire.kernels.rans).

One program codes one segment with a vector of lanes. Per step every active lane decodes (or encodes)
one symbol; the words the lanes read (or push) are placed in the segment's shared 16-bit word stream
by a prefix sum of the lanes' word counts, in lane order, exactly as the CPU coder walks it.

A lane's word count is known before the word is read: after the main step a lane reads a word when its
state is below 2**16; the bypass step that follows (``nb`` raw bits) then needs a second word exactly
when the state *before* the first read was below ``2**nb`` (the read word only fills bits that the
shift throws away), or, without a first read, when ``state >> nb < 2**16``. So one exclusive prefix
sum of counts in {0, 1, 2} per step places every read.

Symbol lookup, two ways (``LUT8``, a launch constant): one int32 per table slot packing ``symbol |
freq << 6 | (slot - cum) << 19`` (one load, but the 79-table bank is 1.3 MB and its random reads miss
L1), or the bank's own uint8 slot->symbol table (4 KiB per table, 316 KiB in all) followed by the
symbol's ``freq | cum << 13`` from a 20 KiB table (two loads that mostly hit L1). Same arithmetic either
way.

Each program finds its segment's word range, states and classes in the chunk bytes from a few int64s
per chunk (``gpu.CHUNK_META``), and builds the lane plan itself (the live components in order, one
prefix sum over the segment's classes, kept in a scratch row), so the host prepares no per-segment data.

Import this module only where Triton is installed; ``TRITON_INTERPRET=1`` (read when this module is
imported) runs the kernels on CPU tensors.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kvwire.kernels import rans

# Segment statuses written by the decoder (0: decoded cleanly).
STATUS_OK = 0
STATUS_BAD_STATE = 1  # an initial lane state below 2**16
STATUS_OVERRUN = 2  # would read past the segment's words
STATUS_LEFTOVER = 3  # words left unread
STATUS_END_STATE = 4  # a lane did not return to the initial state 2**16


@triton.jit
def decode_kernel(
    words_ptr,  # int16: the batch's chunk bytes viewed as 16-bit words (read as unsigned)
    states_ptr,  # int32: the same bytes viewed as 32-bit words (lane states and offsets, read as unsigned)
    bytes_ptr,  # uint8: the same bytes (the classes)
    meta_ptr,  # int64 [chunks, META]: per chunk, see gpu.CHUNK_META (word 0, offsets, states, lanes, ...)
    live_ptr,  # int32 [S, D] scratch: each segment's live components in order (written here first)
    out_ptr,  # int32: segment s's [tokens, D] block at its out offset (dead columns untouched)
    table_ptr,  # LUT8: uint8 [n_tables, PROB_SCALE] symbols; else int32, packed (see module docstring)
    symtab_ptr,  # int32 [n_tables, 64]: freq | cum << 13 (read with LUT8 only)
    status_ptr,  # int32 [S]
    sink_ptr,  # int32 [S]: receives the prefetched words' XOR (unused; keeps the loads alive)
    S,
    SP,  # segments per chunk (every chunk of a batch has the profile's)
    D,
    META: tl.constexpr,  # int64 columns per chunk in meta
    SEGS: tl.constexpr,  # segments per program, each its own row of lanes
    BLOCK: tl.constexpr,
    DBLOCK: tl.constexpr,  # a power of two >= D
    LUT8: tl.constexpr,
    PREFETCH: tl.constexpr,  # words ahead of the stream position to touch each step (0: none)
    PROB_BITS: tl.constexpr,
    DIRECT_MAX: tl.constexpr,
    MIN_OCTAVE: tl.constexpr,
):
    seg = tl.program_id(0).to(tl.int64) * SEGS + tl.arange(0, SEGS).to(tl.int64)  # [SEGS]
    seg_on = seg < S
    # Per-segment values from the chunk's metadata and its own offsets section (in the bytes; validated
    # on the host: increasing, within the chunk's words).
    k = seg % SP
    meta = meta_ptr + (seg // SP) * META
    w0 = tl.load(meta, mask=seg_on, other=0)
    offs = tl.load(meta + 1, mask=seg_on, other=0) + k
    lo = tl.load(states_ptr + offs, mask=seg_on, other=0).to(tl.uint32, bitcast=True).to(tl.int64)
    hi = tl.load(states_ptr + offs + 1, mask=seg_on, other=0).to(tl.uint32, bitcast=True).to(tl.int64)
    ptr = w0 + lo
    end = w0 + hi
    lanes = tl.load(meta + 3, mask=seg_on, other=0).to(tl.int32)
    state_base = tl.load(meta + 2, mask=seg_on, other=0) + k * lanes
    n_tok = tl.load(meta + 4, mask=seg_on, other=0).to(tl.int32)
    out_base = tl.load(meta + 5, mask=seg_on, other=0) + k * D * n_tok
    cls_base = tl.load(meta + 6, mask=seg_on, other=0) + k * D
    # The lane plan: live components (class != 0) first, in order, by a prefix sum over the classes.
    c = tl.arange(0, DBLOCK)
    cls_row = tl.load(
        bytes_ptr + cls_base[:, None] + c[None, :], mask=seg_on[:, None] & (c[None, :] < D), other=0
    )
    is_live = (cls_row != 0).to(tl.int32)
    n_live = tl.sum(is_live, axis=1)
    rank = tl.cumsum(is_live, axis=1) - is_live
    comps = tl.zeros((SEGS, DBLOCK), tl.int32) + c[None, :]
    tl.store(live_ptr + seg[:, None] * D + rank, comps, mask=is_live != 0)
    tl.debug_barrier()  # the list is read back below by other threads of this program
    active = tl.minimum(lanes, n_live)
    g = tl.arange(0, BLOCK)
    lane_on = g[None, :] < active[:, None]  # [SEGS, BLOCK]
    # States are < 2**32 and every step keeps them there (f * (x >> 12) + slot - cum < f * 2**20), so
    # uint32 arithmetic is exact.
    x = tl.load(states_ptr + state_base[:, None] + g[None, :], mask=lane_on, other=65536)
    x = x.to(tl.uint32, bitcast=True)
    status = tl.where(tl.sum((x < 65536).to(tl.int32), axis=1) > 0, 1, 0)
    n_blocks = tl.cdiv(n_live, tl.maximum(active, 1))
    max_blocks = tl.max(n_blocks, axis=0)
    max_tok = tl.max(n_tok, axis=0)
    zero = tl.zeros((SEGS, BLOCK), tl.uint32)
    # Prefetch: the first 8 lanes touch one word per 32-byte sector of words [ptr + PREFETCH, + 128),
    # so that the sectors the next steps read are on their way to L1 (a step reads ~16-60 words; each
    # new sector would otherwise cost a DRAM round trip inside the step's dependent chain). The loaded
    # values only go into ``sink`` (one iteration later, so the load does not stall its own step).
    pf_on = g[None, :] < 8
    pf_off = PREFETCH + 16 * g[None, :]
    pre = tl.zeros((SEGS, BLOCK), tl.int32)
    sink = tl.zeros((SEGS, BLOCK), tl.int32)
    # While loops, not range(): the interpreter cannot take a loaded scalar as a range bound.
    j = 0
    while j < max_blocks:
        idx = j * active[:, None] + g[None, :]
        on_j = lane_on & (idx < n_live[:, None])
        comp = tl.load(live_ptr + seg[:, None] * D + idx, mask=on_j, other=0)
        cl = tl.load(bytes_ptr + cls_base[:, None] + comp, mask=on_j, other=0).to(tl.int64)
        row_table = table_ptr + (cl << PROB_BITS)
        row_sym = symtab_ptr + (cl << 6)
        out_col = out_ptr + out_base[:, None] + comp.to(tl.int64)
        t = 0
        while t < max_tok:
            on = on_j & (t < n_tok[:, None])
            if PREFETCH > 0:
                sink = sink ^ pre
                pf = ptr[:, None] + pf_off
                pre = tl.load(words_ptr + pf, mask=pf_on & (pf < end[:, None]), other=0).to(tl.int32)
            slot = x & ((1 << PROB_BITS) - 1)
            if LUT8:  # 4 KiB per table: the bank stays in L1; then freq and cum from a 256-byte row
                sym = tl.load(row_table + slot, mask=on, other=0).to(tl.int32)
                fc = tl.load(row_sym + sym, mask=on, other=1).to(tl.uint32, bitcast=True)
                xs = (fc & 8191) * (x >> PROB_BITS) + slot - (fc >> 13)
            else:
                e = tl.load(row_table + slot, mask=on, other=0).to(tl.uint32, bitcast=True)
                sym = (e & 63).to(tl.int32)
                xs = ((e >> 6) & 8191) * (x >> PROB_BITS) + (e >> 19)
            big = sym > 2 * DIRECT_MAX
            nb = tl.where(big, ((sym - (2 * DIRECT_MAX + 1)) >> 1) + MIN_OCTAVE, 0)
            nbu = nb.to(tl.uint32)
            need1 = xs < 65536
            low = (zero + 1) << nbu
            need2 = big & tl.where(need1, xs < low, (xs >> nbu) < 65536)
            need1 = need1 & on
            need2 = need2 & on
            count = need1.to(tl.int32) + need2.to(tl.int32)
            before = tl.cumsum(count, axis=1) - count
            total = tl.sum(count, axis=1)
            p1 = ptr[:, None] + before
            w1 = tl.load(words_ptr + p1, mask=need1 & (p1 < end[:, None]), other=0)
            xs = tl.where(need1, (xs << 16) | w1.to(tl.uint16, bitcast=True).to(tl.uint32), xs)
            raw = (xs & (low - 1)).to(tl.int32)
            xs = xs >> nbu
            p2 = p1 + need1.to(tl.int64)
            w2 = tl.load(words_ptr + p2, mask=need2 & (p2 < end[:, None]), other=0)
            xs = tl.where(need2, (xs << 16) | w2.to(tl.uint16, bitcast=True).to(tl.uint32), xs)
            ptr = ptr + total
            mag = (1 << nb) + raw
            r = sym - (2 * DIRECT_MAX + 1)
            value = tl.where(big, tl.where((r & 1) != 0, -mag, mag), sym - DIRECT_MAX)
            tl.store(out_col + t * D, value, mask=on)
            x = tl.where(on, xs, x)
            t += 1
        j += 1
    bad_end = tl.sum((lane_on & (x != 65536)).to(tl.int32), axis=1) > 0
    # ptr only grows, so it ended past the segment's words exactly when some step overran them (the
    # reads themselves are masked to the segment's words).
    late = tl.where(ptr > end, 2, tl.where(ptr != end, 3, tl.where(bad_end, 4, 0)))
    status = tl.where(status != 0, status, late)
    tl.store(status_ptr + seg, status, mask=seg_on)
    if PREFETCH > 0:
        tl.store(sink_ptr + seg, tl.sum(sink ^ pre, axis=1), mask=seg_on)


DECODE_CONSTANTS = {
    "PROB_BITS": rans.PROB_BITS,
    "DIRECT_MAX": rans.DIRECT_MAX,
    "MIN_OCTAVE": rans.MIN_OCTAVE,
}
