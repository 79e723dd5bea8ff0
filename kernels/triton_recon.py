"""Triton kernel for the exact inverse transform: rANS coefficients -> KV tensor, in one pass.

One program writes a tile of ``BT`` tokens x one head (``D`` features) of one segment, straight into the
chunk's ``[layers, 2, kv_heads, tokens, head_dim]`` layout, in the output dtype. It repeats the CPU
reconstruction (``codec.reconstruct``, docs/format.md) bit for bit:

- the coefficient-basis product is computed *exactly* in integers on the tensor cores: coefficients
  (|q| < 2**16) and basis (|B| < 2**14) are split into signed 8-bit digits (q = q0 + q1 * 2**7 +
  q2 * 2**14, B = B0 + B1 * 2**7 with q0, q1, B0 in 0..127), each digit product is an int8 dot with
  int32 accumulation (exact: at most 8192 * 2**14 < 2**31), and the digit sums are combined in float64
  (exact: integers below 2**53). A tile whose coefficients all fit in int8 (the usual case) takes two
  dots instead of six;
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
def _half(q, b0_ptr, b1_ptr, col, kmask, jmask, d, big, KP: tl.constexpr):
    """Exact integer product of the coefficient tile with one half of the head's basis columns."""
    k = tl.arange(0, KP)
    off = k[:, None] * d + col[None, :]
    m = kmask[:, None] & jmask[None, :]
    b0 = tl.load(b0_ptr + off, mask=m, other=0)
    b1 = tl.load(b1_ptr + off, mask=m, other=0)
    if big:  # noqa: SIM108 (a runtime branch in a Triton kernel)
        res = _digit_product(q, b0, b1, False)
    else:
        res = _digit_product(q, b0, b1, True)
    return res


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
    meta_ptr,  # int64 [S, 4]: q offset, out offset (head 0 of the group), tokens, token start
    scale_ptr,  # float64 [S]: mant * 2**-(exp + basis_exp), exact
    n_live_ptr,  # int32 [S]
    classes_ptr,  # uint8 [S, d]
    b0_ptr,  # int8 [SP, d, d]: low 7 bits of the basis (0..127)
    b1_ptr,  # int8 [SP, d, d]: the rest (basis >> 7)
    mean_ptr,  # float32 [SP, d]
    cos_ptr,  # float32 [positions, HALF]
    sin_ptr,  # float32 [positions, HALF]
    out_ptr,  # output dtype, flat
    d,
    SP,  # segments per chunk (the profile's)
    G,  # groups (segments per (layer, K/V))
    HALF: tl.constexpr,
    HAS_ROPE: tl.constexpr,
    BT: tl.constexpr,
    KP: tl.constexpr,
    HALFP: tl.constexpr,
):
    pid_t = tl.program_id(0)
    seg = tl.program_id(1).to(tl.int64)
    head = tl.program_id(2)
    n_tok = tl.load(meta_ptr + seg * 4 + 2)
    if pid_t * BT < n_tok:
        q_off = tl.load(meta_ptr + seg * 4)
        out_off = tl.load(meta_ptr + seg * 4 + 1)
        start = tl.load(meta_ptr + seg * 4 + 3)
        scale = tl.load(scale_ptr + seg)
        n_live = tl.load(n_live_ptr + seg)
        ps = seg % SP  # the profile's segment
        t = pid_t * BT + tl.arange(0, BT)
        tmask = t < n_tok
        k = tl.arange(0, KP)
        kmask = k < d
        live = tl.load(classes_ptr + seg * d + k, mask=kmask, other=0) != 0
        q = tl.load(
            q_ptr + q_off + t[:, None].to(tl.int64) * d + k[None, :],
            mask=tmask[:, None] & live[None, :],
            other=0,
        )
        big = tl.max(tl.abs(q)) > 127
        j = tl.arange(0, HALFP)
        jmask = j < HALF
        col_lo = head * (2 * HALF) + j
        bbase = ps * d * d
        b0 = b0_ptr + bbase
        b1 = b1_ptr + bbase
        lo = _half(q, b0, b1, col_lo, kmask, jmask, d, big, KP)
        hi = _half(q, b0, b1, col_lo + HALF, kmask, jmask, d, big, KP)
        # Exact in float64 (an integer below 2**53 times mant * 2**-e), then rounded once.
        y_lo = (lo * scale).to(tl.float32)
        y_hi = (hi * scale).to(tl.float32)
        mean_lo = tl.load(mean_ptr + ps * d + col_lo, mask=jmask, other=0.0)
        mean_hi = tl.load(mean_ptr + ps * d + col_lo + HALF, mask=jmask, other=0.0)
        dead = n_live == 0
        # (where, not + 0: the CPU copies the mean of a dead segment as is, a -0.0 included)
        x_lo = tl.where(dead, mean_lo[None, :], y_lo + mean_lo[None, :])
        x_hi = tl.where(dead, mean_hi[None, :], y_hi + mean_hi[None, :])
        if HAS_ROPE:  # noqa: SIM102 (compile-time, then runtime condition)
            if (ps // G) % 2 == 0:  # keys
                pos = (start + t).to(tl.int64)
                pm = tmask[:, None] & jmask[None, :]
                cs = tl.load(cos_ptr + pos[:, None] * HALF + j[None, :], mask=pm, other=0.0)
                sn = tl.load(sin_ptr + pos[:, None] * HALF + j[None, :], mask=pm, other=0.0)
                a_lo = x_lo * cs
                b_lo = (-x_hi) * sn
                a_hi = x_hi * cs
                b_hi = x_lo * sn
                x_lo = a_lo + b_lo
                x_hi = a_hi + b_hi
        row = (head.to(tl.int64) * n_tok + t[:, None].to(tl.int64)) * (2 * HALF)
        dst = out_ptr + out_off + row
        m = tmask[:, None] & jmask[None, :]
        tl.store(dst + j[None, :], _to_out(x_lo, out_ptr.dtype.element_ty), mask=m)
        tl.store(dst + HALF + j[None, :], _to_out(x_hi, out_ptr.dtype.element_ty), mask=m)
