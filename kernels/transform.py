"""Rotary-embedding removal and re-application for keys, bit-exact across devices.

Keys are stored post-RoPE in a model's cache; their pre-RoPE form is far more predictable (a fixed
per-channel structure instead of one rotating with position), so the codec codes pre-RoPE keys and
re-applies the rotation on decode. The cos/sin tables are computed on the host in float64 and rounded
to float32 once, and the rotation uses separate float32 multiplies and adds (no fused multiply-add),
so a CPU and a GPU decoder produce identical bits.
"""

from __future__ import annotations

import numpy as np


def rope_tables(
    positions: np.ndarray, inv_freq: np.ndarray, scaling: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables, float32 [T, rotary_dim], in the rotate-half layout of Llama-style models."""
    angle = positions.astype(np.float64)[:, None] * inv_freq.astype(np.float64)[None, :]
    angle = np.concatenate([angle, angle], axis=-1)
    return (np.cos(angle) * scaling).astype(np.float32), (np.sin(angle) * scaling).astype(np.float32)


def _rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(keys: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate float32 keys [..., T, D] by position (first ``cos.shape[1]`` channels); returns float32."""
    r = cos.shape[1]
    k = np.asarray(keys, dtype=np.float32)
    rot = k[..., :r]
    out = k.copy()
    a = rot * cos
    b = _rotate_half(rot) * sin
    out[..., :r] = a + b
    return out


def remove_rope(keys: np.ndarray, cos: np.ndarray, sin: np.ndarray, scaling: float = 1.0) -> np.ndarray:
    """Inverse of ``apply_rope`` (encoder side, float32; exactness is not needed here)."""
    r = cos.shape[1]
    k = np.asarray(keys, dtype=np.float32)
    c = cos / np.float32(scaling * scaling)
    s = sin / np.float32(scaling * scaling)
    rot = k[..., :r]
    out = k.copy()
    out[..., :r] = rot * c - _rotate_half(rot) * s
    return out
