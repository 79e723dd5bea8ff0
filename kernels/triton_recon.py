"""Triton kernel for the exact inverse transform: rANS coefficients -> KV tensor, in one pass.

One program writes a tile of ``BT`` tokens x one head (``D`` features) of one segment, straight into the
chunk's ``[layers, 2, kv_heads, tokens, head_dim]`` layout, in the output dtype. It repeats the CPU
reconstruction (``codec.reconstruct``, docs/format.md) bit for bit:

- the coefficient-basis product is computed *exactly* in integers on the tensor cores: coefficients
  (|q| < 2**16) and basis (|B| < 2**14) are split into signed 8-bit digits (q = q0 + q1 * 2**7 +
  q2 * 2**14, B = B0 + B1 * 2**7 with q0, q1, B0 in 0..127), each digit product is an int8 dot with
  int32 accumulation (exact: at most 8192 * 2**14 < 2**31), and the digit sums are combined in float64
  (exact: integers below 2**53). A tile whose coefficients all fit in int8 (the usual case) takes two
  dots instead of six, and the kernel is launched twice (``WIDE``): first every two-dot tile, flagging
  the others, then only the flagged ones with six dots. Apart, each variant fits in registers (the
  two-dot one in 230 per thread at 64 tokens and 4 warps; in one body both spilled, docs/gpu.md);
- times the step's scale ``mant * 2**-(exp + basis_exp)`` in one float64 multiply (exact: the integer
  sum times ``mant`` is below 2**53), then a round-to-nearest cast to float32: the same value the CPU's
  exact float64 GEMM rounds;
- ``+ mean`` in float32; a segment without live components copies the mean as the CPU does;
- keys: RoPE with the host's float32 cos/sin tables, each multiply and the add rounded separately (the
  caller launches with ``enable_fp_fusion=False``, so nothing is contracted into an FMA);
- a round-to-nearest cast to the output dtype.

The head's features are handled as two halves (the rotate-half partners), so the rotary dimension must
be the whole head (or absent); the caller falls back to the torch path otherwise.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _digit_product(q, b0, b1, SMALL: tl.constexpr):
    """Exact sum over components of q * (b0 + b1 * 2**7) as float64 [BT, HALFP].

    Every digit dot is an exact int32; every partial sum below is an integer below 2**53, so the float64
    additions (in any order) are exact too.
    """
    if SMALL:
        qa = q.to(tl.int8)
        res = tl.dot(qa, b0, out_dtype=tl.int32).to(tl.float64)
        res += tl.dot(qa, b1, out_dtype=tl.int32).to(tl.float64) * 128.0
    else:
        q0 = (q & 127).to(tl.int8)
        q1 = ((q >> 7) & 127).to(tl.int8)
        q2 = (q >> 14).to(tl.int8)
        res = tl.dot(q0, b0, out_dtype=tl.int32).to(tl.float64)
        mid = tl.dot(q0, b1, out_dtype=tl.int32) + tl.dot(q1, b0, out_dtype=tl.int32)
        res += mid.to(tl.float64) * 128.0
        mid = tl.dot(q1, b1, out_dtype=tl.int32) + tl.dot(q2, b0, out_dtype=tl.int32)
        res += mid.to(tl.float64) * 16384.0
        res += tl.dot(q2, b1, out_dtype=tl.int32).to(tl.float64) * 2097152.0
    return res


@triton.jit
def _half(q, b0_ptr, b1_ptr, col, kmask, jmask, d, scale, WIDE: tl.constexpr, KP: tl.constexpr):
    """One half of the head's basis columns: the exact integer product with the coefficient tile, times
    the step scale, rounded once to float32."""
    k = tl.arange(0, KP)
    off = k[:, None] * d + col[None, :]
    m = kmask[:, None] & jmask[None, :]
    b0 = tl.load(b0_ptr + off, mask=m, other=0)
    b1 = tl.load(b1_ptr + off, mask=m, other=0)
    res = _digit_product(q, b0, b1, WIDE == 0)
    return (res * scale).to(tl.float32)


@triton.jit
def _to_out(x, OUT_TY: tl.constexpr):
    """Round-to-nearest-even cast of float32 to the output dtype; bf16 by hand (the interpreter's bf16
    cast truncates; on the GPU this is the same rounding the cast instruction does), NaN as torch's."""
    if OUT_TY == tl.bfloat16:  # noqa: SIM300
        b = x.to(tl.uint32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        r = tl.where(x != x, 0x7FC0, r)
        res = r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        res = x.to(OUT_TY)
    return res


@triton.jit
def reconstruct_kernel(
    q_ptr,  # int32: per segment a [tokens, d] block (columns of dead components hold garbage)
    meta_ptr,  # int64 [chunks, META]: per chunk, see gpu.CHUNK_META (q base, out base, classes, ...)
    scale_ptr,  # float64 [S]: mant * 2**-(exp + basis_exp), exact
    bytes_ptr,  # uint8: the chunk bytes (each segment's classes)
    b0_ptr,  # int8 [SP, d, d]: low 7 bits of the basis (0..127)
    b1_ptr,  # int8 [SP, d, d]: the rest (basis >> 7)
    mean_ptr,  # float32 [SP, d]
    cos_ptr,  # float32 [positions, HALF]
    sin_ptr,  # float32 [positions, HALF]
    out_ptr,  # output dtype, flat
    wide_ptr,  # int8 [grid]: per program, whether its tile needs the six-dot path (see WIDE)
    d,
    SP,  # segments per chunk (the profile's)
    G,  # groups (segments per (layer, K/V))
    H,  # KV heads
    META: tl.constexpr,
    HALF: tl.constexpr,
    HAS_ROPE: tl.constexpr,
    BT: tl.constexpr,
    KP: tl.constexpr,
    HALFP: tl.constexpr,
    QVEC: tl.constexpr,  # a power of two dividing d (so every segment's coefficient block is aligned)
    OVEC: tl.constexpr,  # a power of two dividing the head dim (so is every chunk's output offset)
    WIDE: tl.constexpr,  # 0: two-dot tiles, flag the others in wide_ptr; 1: only the flagged tiles
):
    pid_t = tl.program_id(0)
    seg = tl.program_id(1).to(tl.int64)
    head = tl.program_id(2)
    ps = seg % SP  # the profile's segment
    meta = meta_ptr + (seg // SP) * META
    n_tok = tl.load(meta + 4)
    tile = (pid_t * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + head
    todo = pid_t * BT < n_tok
    if WIDE:
        todo = todo & (tl.load(wide_ptr + tile) != 0)
    if todo:
        q_off = tl.multiple_of(tl.load(meta + 5) + ps * d * n_tok, QVEC)
        # the segment's first head in the chunk's [L * 2 * H] rows: group ps % G of (layer, K/V) ps // G
        head0 = (ps // G) * H + (ps % G) * (H // G)
        out_off = tl.multiple_of(tl.load(meta + 7), OVEC) + head0 * n_tok * (2 * HALF)
        start = tl.load(meta + 8)
        scale = tl.load(scale_ptr + seg)
        t = pid_t * BT + tl.arange(0, BT)
        tmask = t < n_tok
        k = tl.arange(0, KP)
        kmask = k < d
        live = tl.load(bytes_ptr + tl.load(meta + 6) + ps * d + k, mask=kmask, other=0) != 0
        # Offsets inside a tile in int32 (t < 2**16 tokens, fmt.MAX_TOKENS) from 64-bit base pointers, and
        # the tile unmasked along the live columns (dead ones hold garbage, zeroed after): vector loads.
        q = tl.load(
            (q_ptr + q_off) + (t[:, None] * d + k[None, :]), mask=tmask[:, None] & kmask[None, :], other=0
        )
        q = tl.where(live[None, :], q, 0)
        big = tl.max(tl.abs(q)) > 127
        if not WIDE:
            tl.store(wide_ptr + tile, big.to(tl.int8))
        if (big == 0) | (WIDE != 0):
            j = tl.arange(0, HALFP)
            jmask = j < HALF
            col_lo = head * (2 * HALF) + j
            bbase = ps * d * d
            b0 = b0_ptr + bbase
            b1 = b1_ptr + bbase
            y_lo = _half(q, b0, b1, col_lo, kmask, jmask, d, scale, WIDE, KP)
            y_hi = _half(q, b0, b1, col_lo + HALF, kmask, jmask, d, scale, WIDE, KP)
            mean_lo = tl.load(mean_ptr + ps * d + col_lo, mask=jmask, other=0.0)
            mean_hi = tl.load(mean_ptr + ps * d + col_lo + HALF, mask=jmask, other=0.0)
            dead = tl.sum(live.to(tl.int32)) == 0
            # (where, not + 0: the CPU copies the mean of a dead segment as is, a -0.0 included)
            x_lo = tl.where(dead, mean_lo[None, :], y_lo + mean_lo[None, :])
            x_hi = tl.where(dead, mean_hi[None, :], y_hi + mean_hi[None, :])
            if HAS_ROPE:  # noqa: SIM102 (compile-time, then runtime condition)
                if (ps // G) % 2 == 0:  # keys
                    pm = tmask[:, None] & jmask[None, :]
                    rope = t[:, None] * HALF + j[None, :]
                    cs = tl.load((cos_ptr + start * HALF) + rope, mask=pm, other=0.0)
                    sn = tl.load((sin_ptr + start * HALF) + rope, mask=pm, other=0.0)
                    a_lo = x_lo * cs
                    b_lo = (-x_hi) * sn
                    a_hi = x_hi * cs
                    b_hi = x_lo * sn
                    x_lo = a_lo + b_lo
                    x_hi = a_hi + b_hi
            dst = out_ptr + out_off + head * n_tok * (2 * HALF)
            row = t[:, None] * (2 * HALF) + j[None, :]
            m = tmask[:, None] & jmask[None, :]
            tl.store(dst + row, _to_out(x_lo, out_ptr.dtype.element_ty), mask=m)
            tl.store(dst + (row + HALF), _to_out(x_hi, out_ptr.dtype.element_ty), mask=m)
