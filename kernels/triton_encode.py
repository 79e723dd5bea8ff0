"""Triton kernels of the GPU encoder (kvwire.kernels.gpu_encode): transform, table choice, rANS.

Three stages per batch of chunks, each over every chunk at once:

1. ``transform_kernel``: RoPE off the keys, minus the profile mean, times the profile's forward matrix
   (one dot per tile), times 1/step, dead-zone rounding; writes int32 coefficients token-major and
   flags the (chunk, layer, K/V, token) rows that must be stored raw (sinks, coefficients that
   overflow the coder, non-finite input, which the host also reports).
2. ``count_kernel`` then ``cost_kernel``: per component, the symbol counts over all tokens (raw rows
   count as zeros) into memory, then the cost of every bank table in float64, as the CPU's
   ``choose_tables``; writes the class byte.
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
    bs = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(1)
    pid_n = tl.program_id(2)
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
def _symbol(v, DIRECT_MAX: tl.constexpr, MIN_OCTAVE: tl.constexpr, MAX_OCTAVE: tl.constexpr):
    """The alphabet symbol of int32 coefficients (``rans._to_symbol``), and their octave.

    |v| <= MAX_ABS_VALUE < 2**24, so its float32 conversion is exact and the exponent field is
    floor(log2 |v|): three instructions instead of one compare per octave. Values up to DIRECT_MAX
    (below 2**MIN_OCTAVE) get MIN_OCTAVE, which nothing reads for them.
    """
    a = tl.abs(v)
    k = (a.to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 127
    k = tl.minimum(tl.maximum(k, MIN_OCTAVE), MAX_OCTAVE)
    direct = a <= DIRECT_MAX
    sym = tl.where(direct, v + DIRECT_MAX, 2 * DIRECT_MAX + 1 + 2 * (k - MIN_OCTAVE) + (v < 0).to(tl.int32))
    return sym, k, direct, a


@triton.jit
def count_kernel(
    q_ptr,  # int32 [B, S, T, d]
    row_ptr,  # int32 [B, L, 2, T]: raw rows (their coefficients count as zeros)
    counts_ptr,  # int32 [4 * GROUPS, n]: symbol counts, symbol-major (component c of segment bs: bs * d + c)
    S,
    T,
    d,
    G,
    n,  # B * S * d
    BC: tl.constexpr,  # components per program: 32 per warp, one per thread
    TT: tl.constexpr,  # tokens per load: each thread holds a [TT] column of its component
    WIDEN: tl.constexpr,  # tokens between widenings of the byte counters: a multiple of TT, <= 255
    GROUPS: tl.constexpr,  # ceil(NUM_SYMBOLS / 4)
    DIRECT_MAX: tl.constexpr,
    MIN_OCTAVE: tl.constexpr,
    MAX_OCTAVE: tl.constexpr,
):
    # Counting without cross-thread reductions: each thread holds one component's counts and walks
    # its tokens, TT at a time, the next TT loaded while these are counted (more bytes in flight per
    # warp than one token at a time: the loads' latency, not arithmetic, bounded the one-token loop).
    # Four symbols share an int32 (a byte each), so a token costs 16 compares per component; every
    # WIDEN tokens the bytes move into four wide counters. With tiles [TT, 16 groups, BC components]
    # Triton's default layout gives each thread all TT tokens and 16 groups of one component: the sum
    # over tokens stays in the thread.
    bs = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    c_on = c < d
    b = bs // S
    lk = (bs % S) // G
    row = row_ptr + (b * (S // G) + lk) * T
    col = q_ptr + bs * T * d + c[None, :]
    grp = tl.arange(0, 16)[None, :, None]  # symbol // 4
    w0 = tl.zeros((16, BC), tl.int32)  # count of symbol 4 g + j in row g of w_j
    w1 = tl.zeros((16, BC), tl.int32)
    w2 = tl.zeros((16, BC), tl.int32)
    w3 = tl.zeros((16, BC), tl.int32)
    tok = tl.arange(0, TT)
    # Raw flags loaded as [TT, BC] (one address per token row), in the layout of the coefficients.
    flat = tl.zeros((1, BC), tl.int32)
    x_next = tl.load(col + tok[:, None] * d, mask=(tok < T)[:, None] & c_on[None, :], other=0)
    raw_next = tl.load(row + tok[:, None] + flat, mask=(tok < T)[:, None], other=0)
    t0 = 0
    while t0 < T:
        acc = tl.zeros((16, BC), tl.int32)
        t = t0
        t_end = tl.minimum(t0 + WIDEN, T)
        while t < t_end:
            x = x_next
            raw = raw_next
            on = (t + tok)[:, None] < T
            nxt = t + TT + tok
            x_next = tl.load(col + nxt[:, None] * d, mask=(nxt < T)[:, None] & c_on[None, :], other=0)
            raw_next = tl.load(row + nxt[:, None] + flat, mask=(nxt < T)[:, None], other=0)
            v = tl.where(raw == 0, x, 0)
            sym, _k, _direct, _a = _symbol(v, DIRECT_MAX, MIN_OCTAVE, MAX_OCTAVE)
            one = tl.where(on, 1 << ((sym & 3) * 8), 0)  # tokens past T count nothing
            acc += tl.sum(tl.where(grp == (sym >> 2)[:, None, :], one[:, None, :], 0), axis=0)
            t += TT
        w0 += acc & 255
        w1 += (acc >> 8) & 255
        w2 += (acc >> 16) & 255
        w3 += (acc >> 24) & 255
        t0 += WIDEN
    g2 = tl.arange(0, 16)[:, None]
    out = counts_ptr + (4 * g2).to(tl.int64) * n + (bs * d + c)[None, :]
    on_out = c_on[None, :] & (g2 < GROUPS)
    tl.store(out, w0, mask=on_out)
    tl.store(out + n, w1, mask=on_out)
    tl.store(out + 2 * n, w2, mask=on_out)
    tl.store(out + 3 * n, w3, mask=on_out)


@triton.jit
def cost_kernel(
    counts_ptr,  # int32 [>= NUM_SYMBOLS, n]: symbol counts, symbol-major
    cost_ptr,  # float64 [NUM_SYMBOLS, KA + KB]: code length of symbol s under table k + 1 (padding: huge)
    classes_ptr,  # uint8 [n]
    n,
    T,
    BC: tl.constexpr,
    KA: tl.constexpr,  # the tables' costs in two power-of-two blocks (78 tables: 64 + 16, not 128)
    KB: tl.constexpr,
    NUM_SYMBOLS: tl.constexpr,
    DIRECT_MAX: tl.constexpr,
):
    # Each table's float64 cost summed over the symbols in order, one multiply-add per symbol, as the
    # fused kernel before it did: a loop that is not unrolled, tiles [tables, components].
    c = tl.program_id(0).to(tl.int64) * BC + tl.arange(0, BC)
    c_on = c < n
    ka = tl.arange(0, KA)[:, None]
    kb = KA + tl.arange(0, KB)[:, None]
    cost_a = tl.zeros((KA, BC), tl.float64)
    cost_b = tl.zeros((KB, BC), tl.float64)
    for sy in range(NUM_SYMBOLS):
        cf = tl.load(counts_ptr + sy * n + c, mask=c_on, other=0).to(tl.float64)[None, :]
        cost_a += cf * tl.load(cost_ptr + sy * (KA + KB) + ka)
        cost_b += cf * tl.load(cost_ptr + sy * (KA + KB) + kb)
    # argmin over both blocks, the first of equal costs as numpy's argmin
    min_a = tl.min(cost_a, axis=0)
    min_b = tl.min(cost_b, axis=0)
    arg_a = tl.argmin(cost_a, axis=0).to(tl.int32)
    arg_b = tl.argmin(cost_b, axis=0).to(tl.int32) + KA
    best = tl.where(min_b < min_a, arg_b, arg_a) + 1
    zeros = tl.load(counts_ptr + DIRECT_MAX * n + c, mask=c_on, other=0)
    cls = tl.where(zeros == T, 0, best)
    tl.store(classes_ptr + c, cls.to(tl.uint8), mask=c_on)


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
        # The next step's coefficient and raw flag are loaded one step ahead: they do not depend on
        # the state, so their latency hides behind the state update.
        t = T - 1
        v_next = tl.load(col + t * d, mask=on_j, other=0)
        raw_next = tl.load(row + t)
        while t >= 0:
            v = tl.where(raw_next == 0, v_next, 0)
            v_next = tl.load(col + (t - 1) * d, mask=on_j & (t > 0), other=0)
            raw_next = tl.load(row + t - 1, mask=t > 0, other=0)
            sym, k, direct, a = _symbol(v, DIRECT_MAX, MIN_OCTAVE, MAX_OCTAVE)
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
