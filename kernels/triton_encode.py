"""Triton kernels of the GPU encoder (kvwire.kernels.gpu_encode): transform, table choice, rANS.

Three launches per batch of chunks, each over every chunk at once:

1. ``transform_kernel``: RoPE off the keys, minus the profile mean, times the profile's forward matrix
   (one dot per tile), times 1/step, dead-zone rounding; writes int32 coefficients token-major and
   flags the (chunk, layer, K/V, token) rows that must be stored raw (sinks, coefficients that
   overflow the coder, non-finite input, which the host also reports).
2. ``table_kernel``: per component, the symbol counts over all tokens (raw rows count as zeros) and
   the cost of every bank table in float64, as the CPU's ``choose_tables``; writes the class byte.
3. ``rans_kernel``: the interleaved rANS encoder, one program per segment, a vector of lanes walking
   the decoder's order backwards, in uint32 arithmetic with one packed (freq, cum) load per symbol;
   words land in the segment's scratch row back to front, so each row ends with the segment's stream
   in decoder order and packing is a plain copy (``words_kernel``).

Import this module only where Triton is installed; ``TRITON_INTERPRET=1`` (read when Triton is
imported) runs the kernels on CPU tensors.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kvwire.kernels import rans


@triton.jit
def transform_kernel(
    kv_ptr,  # [B, L, 2, H, T, D] in its dtype, any strides (elements)
    sb,
    sl,
    sk,
    sh,
    st,
    sd,
    cos_ptr,  # float32 [B, T, HALF]: cos(p * inv_freq) * scaling / scaling**2 (unused without RoPE)
    sin_ptr,  # float32 [B, T, HALF]
    mean_ptr,  # float32 [S, d]
    fwd_ptr,  # float32 [S, d, d]: coefficients = (x - mean) @ fwd
    inv_ptr,  # float32 [S]: 1 / step
    n_sink_ptr,  # int32 [B]: leading tokens of each chunk that are attention sinks
    q_ptr,  # int32 [B, S, T, d]: coefficients, token-major
    row_ptr,  # int32 [B, L, 2, T], zero-filled: set to 1 for rows stored raw
    bad_ptr,  # int32 [1], zero-filled: set to 1 if the input holds a non-finite value
    S,
    T,
    d,
    G,
    HPG,
    D,
    HALF_SUB,  # float32: 0.5 - dead zone
    HALF: tl.constexpr,  # rotary dimension / 2 (0 without RoPE)
    BT: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    bs = tl.program_id(2).to(tl.int64)
    b = bs // S
    s = bs % S
    lk = s // G  # layer * 2 + kv
    g = s % G
    layer = lk // 2
    kv = lk % 2
    tok = pid_t * BT + tl.arange(0, BT)
    tok_on = tok < T
    n = pid_n * BN + tl.arange(0, BN)
    n_on = n < d
    base = kv_ptr + b * sb + layer * sl + kv * sk
    is_key = kv == 0
    acc = tl.zeros((BT, BN), tl.float32)
    nonfinite = tl.zeros((BT,), tl.int32)
    k0 = 0
    while k0 < d:  # a while loop: the interpreter cannot range() over a kernel argument
        kk = k0 + tl.arange(0, BK)
        k_on = kk < d
        head = g * HPG + kk // D
        ch = kk % D
        on = tok_on[:, None] & k_on[None, :]
        rows = base + tok[:, None].to(tl.int64) * st + head[None, :].to(tl.int64) * sh
        x = tl.load(rows + ch[None, :].to(tl.int64) * sd, mask=on, other=0.0).to(tl.float32)
        nonfinite += tl.sum(((x - x) != 0).to(tl.int32), axis=1)  # inf - inf and NaN are NaN
        if HALF > 0:
            rot = is_key & (ch < 2 * HALF)
            first = ch < HALF
            partner = tl.where(first, ch + HALF, ch - HALF)
            on_r = on & rot[None, :]
            xp = tl.load(rows + partner[None, :].to(tl.int64) * sd, mask=on_r, other=0.0).to(tl.float32)
            cs_off = (b * T + tok[:, None]) * HALF + tl.where(first, ch, ch - HALF)[None, :]
            c = tl.load(cos_ptr + cs_off, mask=on_r, other=1.0)
            sn = tl.load(sin_ptr + cs_off, mask=on_r, other=0.0)
            # the CPU's remove_rope: rot * c - rotate_half(rot) * s, each op rounded on its own
            rh = tl.where(first[None, :], -xp, xp)
            x = tl.where(on_r, x * c - rh * sn, x)
        mu = tl.load(mean_ptr + s * d + kk, mask=k_on, other=0.0)
        xm = tl.where(on, x - mu[None, :], 0.0)
        w = tl.load(
            fwd_ptr + s * d * d + kk[:, None].to(tl.int64) * d + n[None, :],
            mask=k_on[:, None] & n_on[None, :],
            other=0.0,
        )
        acc += tl.dot(xm, w, input_precision=PRECISION)
        k0 += BK
    inv = tl.load(inv_ptr + s)
    scaled = acc * inv
    v = scaled + tl.where(scaled < 0, -HALF_SUB, HALF_SUB)
    ok = tl.abs(v) < 65536.0  # |trunc(v)| <= MAX_ABS_VALUE; NaN is not ok
    q = tl.where(ok, v, 0.0).to(tl.int32)  # truncates toward zero, as the CPU's np.trunc
    on_q = tok_on[:, None] & n_on[None, :]
    tl.store(q_ptr + (bs * T + tok[:, None]) * d + n[None, :], q, mask=on_q)
    n_sink = tl.load(n_sink_ptr + b)
    over = tl.sum((on_q & ~ok).to(tl.int32), axis=1) > 0
    raw = over | (tok < n_sink) | (nonfinite > 0)
    tl.atomic_max(row_ptr + (b * (S // G) + lk) * T + tok, 1, mask=tok_on & raw)
    any_bad = tl.sum(tl.where(tok_on, nonfinite, 0), axis=0) > 0
    tl.atomic_max(bad_ptr, 1, mask=any_bad)


@triton.jit
def table_kernel(
    q_ptr,  # int32 [B, S, T, d]
    row_ptr,  # int32 [B, L, 2, T]: raw rows (their coefficients count as zeros)
    cost_ptr,  # float64 [NUM_SYMBOLS, KP]: code length of symbol s under table k + 1 (padding: huge)
    classes_ptr,  # uint8 [B, S, d]
    S,
    T,
    d,
    G,
    BT: tl.constexpr,
    BC: tl.constexpr,
    KP: tl.constexpr,
    NUM_SYMBOLS: tl.constexpr,
    DIRECT_MAX: tl.constexpr,
    MIN_OCTAVE: tl.constexpr,
    MAX_OCTAVE: tl.constexpr,
):
    bs = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    c_on = c < d
    b = bs // S
    lk = (bs % S) // G
    row = row_ptr + (b * (S // G) + lk) * T
    kcol = tl.arange(0, KP)
    cost = tl.zeros((BC, KP), tl.float64)
    zeros = tl.zeros((BC,), tl.int32)
    t0 = 0
    while t0 < T:
        tok = t0 + tl.arange(0, BT)
        tok_on = tok < T
        raw = tl.load(row + tok, mask=tok_on, other=1)
        on = tok_on[:, None] & c_on[None, :]
        v = tl.load(q_ptr + (bs * T + tok[:, None]) * d + c[None, :], mask=on & (raw[:, None] == 0), other=0)
        a = tl.abs(v)
        k = tl.full(v.shape, MIN_OCTAVE, tl.int32)
        for o in tl.static_range(MIN_OCTAVE + 1, MAX_OCTAVE + 1):
            k += (a >= (1 << o)).to(tl.int32)
        sym = tl.where(
            a <= DIRECT_MAX, v + DIRECT_MAX, 2 * DIRECT_MAX + 1 + 2 * (k - MIN_OCTAVE) + (v < 0).to(tl.int32)
        )
        sym = tl.where(tok_on[:, None], sym, NUM_SYMBOLS)  # padding tokens count nowhere
        for sy in tl.static_range(NUM_SYMBOLS):
            cnt = tl.sum((sym == sy).to(tl.int32), axis=0)
            if sy == DIRECT_MAX:
                zeros += cnt
            cl = tl.load(cost_ptr + sy * KP + kcol)
            cost += cnt.to(tl.float64)[:, None] * cl[None, :]
        t0 += BT
    best = tl.argmin(cost, axis=1).to(tl.int32) + 1
    cls = tl.where(zeros == T, 0, best)
    tl.store(classes_ptr + bs * d + c, cls.to(tl.uint8), mask=c_on)


@triton.jit
def rans_kernel(
    q_ptr,  # int32 [B, S, T, d]
    row_ptr,  # int32 [B, L, 2, T]: raw rows (coded as zeros)
    live_ptr,  # int32 [B * S, d]: live components in order, then padding
    n_live_ptr,  # int32 [B * S]
    classes_ptr,  # uint8 [B * S, d]
    table_ptr,  # int32 [n_tables, NUM_SYMBOLS]: freq | cum << 13
    scratch_ptr,  # int16 [B * S, CAP]: emitted word i at CAP - 1 - i
    n_words_ptr,  # int32 [B * S]
    states_ptr,  # int32 [B * S, LANES], zero-filled: final lane states (uint32 bits)
    S,
    T,
    d,
    G,
    LANES,
    CAP,
    BLOCK: tl.constexpr,
    NUM_SYMBOLS: tl.constexpr,
    PROB_BITS: tl.constexpr,
    DIRECT_MAX: tl.constexpr,
    MIN_OCTAVE: tl.constexpr,
    MAX_OCTAVE: tl.constexpr,
):
    seg = tl.program_id(0).to(tl.int64)
    b = seg // S
    lk = (seg % S) // G
    row = row_ptr + (b * (S // G) + lk) * T
    n_live = tl.load(n_live_ptr + seg)
    active = tl.minimum(LANES, n_live)
    g = tl.arange(0, BLOCK)
    lane_on = g < active
    # States stay below 2**32 at every step (see the bounds below), so uint32 arithmetic is exact.
    x = tl.full((BLOCK,), 65536, tl.uint32)
    sp = tl.zeros((), tl.int32)
    n_blocks = tl.cdiv(n_live, tl.maximum(active, 1))
    dst = scratch_ptr + seg * CAP + CAP - 1
    j = n_blocks - 1
    while j >= 0:
        idx = j * active + g
        on_j = lane_on & (idx < n_live)
        comp = tl.load(live_ptr + seg * d + idx, mask=on_j, other=0)
        cl = tl.load(classes_ptr + seg * d + comp, mask=on_j, other=0).to(tl.int32)
        col = q_ptr + seg * T * d + comp
        trow = table_ptr + cl * NUM_SYMBOLS
        t = T - 1
        while t >= 0:
            raw_row = tl.load(row + t)
            on = on_j & (raw_row == 0)
            v = tl.load(col + t * d, mask=on, other=0)
            a = tl.abs(v)
            k = tl.full((BLOCK,), MIN_OCTAVE, tl.int32)
            for o in tl.static_range(MIN_OCTAVE + 1, MAX_OCTAVE + 1):
                k += (a >= (1 << o)).to(tl.int32)
            direct = a <= DIRECT_MAX
            sym = tl.where(
                direct, v + DIRECT_MAX, 2 * DIRECT_MAX + 1 + 2 * (k - MIN_OCTAVE) + (v < 0).to(tl.int32)
            )
            e = tl.load(trow + sym, mask=on_j, other=1)
            f = (e & 8191).to(tl.uint32)
            cum = (e >> 13).to(tl.uint32)
            nb = tl.where(direct, 0, k).to(tl.uint32)
            raw = tl.where(direct, 0, a - (1 << k)).to(tl.uint32)
            # bypass step (nb raw bits): push when x >= 2**(32 - nb), leaving x << nb below 2**32
            limit = tl.full((BLOCK,), 1, tl.uint32) << tl.where(nb > 0, 32 - nb, 31)
            push1 = (nb > 0) & (x >= limit) & on_j
            word1 = x & 0xFFFF
            xs = tl.where(push1, x >> 16, x)
            xs = tl.where(nb > 0, (xs << nb) | raw, xs)
            # main step: push when x >= f * 2**20 (f < 4096 for every coded table); then x / f < 2**20
            push2 = ((xs >> 20) >= f) & on_j
            word2 = xs & 0xFFFF
            xs = tl.where(push2, xs >> 16, xs)
            qd = xs // f
            xs = (qd << PROB_BITS) + (xs - qd * f) + cum
            count = push1.to(tl.int32) + push2.to(tl.int32)
            # Lanes push from the highest down: lane g's words follow those of every lane above it.
            total = tl.sum(count, axis=0)
            pos = sp + total - tl.cumsum(count, axis=0)
            tl.store(dst - pos, word1.to(tl.int16), mask=push1)
            tl.store(dst - pos - push1.to(tl.int32), word2.to(tl.int16), mask=push2)
            sp += total
            x = tl.where(on_j, xs, x)
            t -= 1
        j -= 1
    tl.store(states_ptr + seg * LANES + g, x.to(tl.int32, bitcast=True), mask=lane_on)
    tl.store(n_words_ptr + seg, sp)


@triton.jit
def words_kernel(
    scratch_ptr,  # int16 [B * S, CAP]
    n_words_ptr,  # int32 [B * S]
    dst_ptr,  # int64 [B * S]: where each segment's words go, in 16-bit units of the packed buffer
    out_ptr,  # int16: the packed buffer
    CAP,
    BLOCK: tl.constexpr,
):
    seg = tl.program_id(0).to(tl.int64)
    n = tl.load(n_words_ptr + seg)
    dst = tl.load(dst_ptr + seg)
    src = scratch_ptr + seg * CAP + CAP - n
    i = 0
    while i < n:
        o = i + tl.arange(0, BLOCK)
        m = o < n
        tl.store(out_ptr + dst + o, tl.load(src + o, mask=m), mask=m)
        i += BLOCK


CONSTANTS = {
    "NUM_SYMBOLS": rans.NUM_SYMBOLS,
    "DIRECT_MAX": rans.DIRECT_MAX,
    "MIN_OCTAVE": rans.MIN_OCTAVE,
    "MAX_OCTAVE": rans.MAX_OCTAVE,
}
