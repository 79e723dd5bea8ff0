"""Reference KV quantizers the kvwire codec is benchmarked against (fp16, per-channel min/max, KIVI).

Each is a ``Quantizer``: canonical float KV ``[layers, 2, kv_heads, tokens, head_dim]`` in, the
reconstruction (same shape, float32) and the total encoded size in bytes out. Sizes count every stored
bit: payload at the nominal bit width (bit-packed, no entropy coding) plus every scale and zero-point
at 16 bits (fp16). Reconstructions use the fp16-rounded scales and zero-points, as a decoder would.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from kvwire.errors import InvalidInputError

Quantizer = Callable[[torch.Tensor], tuple[torch.Tensor, int]]

MINMAX_CHUNK_TOKENS = 256
KIVI_GROUP = 32
PARAM_BYTES = 2  # one fp16 scale or zero-point


def _check(kv: torch.Tensor) -> torch.Tensor:
    if not isinstance(kv, torch.Tensor) or kv.dim() != 5 or kv.shape[1] != 2:
        raise InvalidInputError("expected KV of shape [layers, 2, kv_heads, tokens, head_dim]")
    if not kv.is_floating_point() or not torch.isfinite(kv).all():
        raise InvalidInputError("KV must be a finite floating-point tensor")
    return kv.float()


def _payload_bytes(elements: int, bits: int) -> int:
    return math.ceil(elements * bits / 8)


def minmax_quantize(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Asymmetric uniform quantization of ``x`` with one (fp16 scale, fp16 min) per slice along ``dim``.

    Returns the dequantized tensor; codes are ``round((x - min) / scale)`` clamped to ``[0, 2**bits - 1]``.
    """
    levels = 2**bits - 1
    low = x.amin(dim=dim, keepdim=True).half().float()
    high = x.amax(dim=dim, keepdim=True)
    scale = ((high - low) / levels).half().float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant slice: every code is 0
    codes = torch.clamp(torch.round((x - low) / scale), 0, levels)
    return codes * scale + low


def fp16(kv: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Plain fp16 storage: 16 bits per element, no side information."""
    kv = _check(kv)
    return kv.half().float(), kv.numel() * 2


def _minmax_chunked(
    kv: torch.Tensor, bits: int, chunk: int = MINMAX_CHUNK_TOKENS
) -> tuple[torch.Tensor, int]:
    """Per-channel min/max quantization: one scale+zero per (layer, K/V, head, channel) per token chunk.

    A last partial chunk is quantized on its own (its own scale+zero); it is padded by repeating its
    last token, which leaves min and max unchanged.
    """
    kv = _check(kv)
    layers, two, heads, tokens, head_dim = kv.shape
    chunks = math.ceil(tokens / chunk)
    pad = chunks * chunk - tokens
    padded = torch.cat((kv, kv[:, :, :, -1:].expand(-1, -1, -1, pad, -1)), dim=3) if pad else kv
    grouped = padded.reshape(layers, two, heads, chunks, chunk, head_dim)
    recon = minmax_quantize(grouped, bits, dim=4).reshape(padded.shape)[:, :, :, :tokens]
    groups = layers * two * heads * chunks * head_dim
    return recon.contiguous(), _payload_bytes(kv.numel(), bits) + groups * 2 * PARAM_BYTES


def minmax8(kv: torch.Tensor) -> tuple[torch.Tensor, int]:
    """8-bit per-channel min/max over 256-token chunks (8 + 32/256 = 8.125 bits per element)."""
    return _minmax_chunked(kv, 8)


def minmax4(kv: torch.Tensor) -> tuple[torch.Tensor, int]:
    """4-bit per-channel min/max over 256-token chunks (4 + 32/256 = 4.125 bits per element)."""
    return _minmax_chunked(kv, 4)


def _kivi(kv: torch.Tensor, bits: int, group: int = KIVI_GROUP) -> tuple[torch.Tensor, int]:
    """KIVI (Liu et al., ICML 2024): keys per-channel, values per-token, asymmetric min/max, group 32.

    Keys: for each (layer, head, channel), groups of ``group`` consecutive tokens share one fp16 scale
    and one fp16 zero-point (KIVI stores both in fp16, like its reference kernels). Tokens past the last
    full group are KIVI's full-precision residual, stored and counted as fp16. Values: for each
    (layer, head, token), groups of ``group`` consecutive channels share one fp16 scale and zero-point.
    So each quantized element costs ``bits + 32/group`` bits: 3 bits for 2-bit and 5 bits for 4-bit
    at group 32. (A 4.75-bit figure for 4-bit would mean 24 bits of side information per 32
    elements, e.g. an 8-bit zero-point; KIVI does not do that.)
    """
    kv = _check(kv)
    layers, _, heads, tokens, head_dim = kv.shape
    if head_dim % group:
        raise InvalidInputError(f"head_dim {head_dim} is not a multiple of the KIVI group size {group}")
    keys, values = kv[:, 0], kv[:, 1]

    full = tokens // group * group
    key_groups = keys[:, :, :full].reshape(layers, heads, full // group, group, head_dim)
    keys_hat = torch.cat(
        (
            minmax_quantize(key_groups, bits, dim=3).reshape(layers, heads, full, head_dim),
            keys[:, :, full:].half().float(),
        ),
        dim=2,
    )
    value_groups = values.reshape(layers, heads, tokens, head_dim // group, group)
    values_hat = minmax_quantize(value_groups, bits, dim=4).reshape(values.shape)

    residual = keys[:, :, full:].numel()
    key_bytes = _payload_bytes(keys.numel() - residual, bits) + residual * 2
    key_bytes += (keys.numel() - residual) // group * 2 * PARAM_BYTES
    value_bytes = _payload_bytes(values.numel(), bits) + values.numel() // group * 2 * PARAM_BYTES
    return torch.stack((keys_hat, values_hat), dim=1), key_bytes + value_bytes


def kivi2(kv: torch.Tensor) -> tuple[torch.Tensor, int]:
    """KIVI-style 2-bit (3 bits per element with its fp16 scales and zero-points, group 32)."""
    return _kivi(kv, 2)


def kivi4(kv: torch.Tensor) -> tuple[torch.Tensor, int]:
    """KIVI-style 4-bit (5 bits per element with its fp16 scales and zero-points, group 32)."""
    return _kivi(kv, 4)


BASELINES: dict[str, Quantizer] = {
    "fp16": fp16,
    "minmax8": minmax8,
    "minmax4": minmax4,
    "kivi4": kivi4,
    "kivi2": kivi2,
}
