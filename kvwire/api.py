"""The codec's Python API at the level of transformers caches.

``encode_cache`` turns a model's ``DynamicCache`` (batch 1) into per-chunk bitstreams at the chosen
levels; ``decode_cache`` turns bitstreams back into a ``DynamicCache`` that ``model.generate`` and
``model(...)`` accept. Plain-tensor work goes through ``kvwire.kernels.codec`` directly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from kvwire.kernels import codec
from kvwire.kernels.profile import CalibrationProfile
from kvwire.model import cache_to_tensor, tensor_to_cache


def encode_cache(
    cache: Any,
    profile: CalibrationProfile,
    *,
    levels: Sequence[int] = codec.LEVELS,
    chunk_tokens: int = codec.DEFAULT_CHUNK_TOKENS,
    model_fingerprint: str | None = None,
) -> list[dict[int, codec.EncodedChunk]]:
    """Encode a transformers cache: for each chunk of ``chunk_tokens`` tokens, one bitstream per level."""
    kv = cache_to_tensor(cache)
    return codec.encode_kv(
        kv, profile, levels=levels, chunk_tokens=chunk_tokens, model_fingerprint=model_fingerprint
    )


def decode_cache(
    chunks: Iterable[bytes | memoryview],
    profile: CalibrationProfile,
    *,
    config: Any = None,
    model_fingerprint: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    max_chunk_tokens: int | None = None,
) -> Any:
    """Decode consecutive chunks (any mix of levels) into a ``DynamicCache`` on ``device``.

    ``max_chunk_tokens``: the most tokens one chunk may declare (``codec.decode_chunk``)."""
    kv = codec.decode_chunks(
        chunks,
        profile,
        model_fingerprint=model_fingerprint,
        device=device,
        dtype=dtype,
        max_chunk_tokens=max_chunk_tokens,
    )
    return tensor_to_cache(kv, config)
