"""kvwire: networked KV-cache streaming for LLM applications.

The codec API is importable from here; names load lazily so that ``import kvwire`` (and the CLI)
stays fast and pulls in neither torch nor numba until a codec function is used.

>>> import kvwire
>>> profile = kvwire.load_or_calibrate(model, tokenizer)            # once per model, cached on disk
>>> chunks = kvwire.encode_cache(cache, profile, levels=[2])        # [{level: EncodedChunk}, ...]
>>> cache = kvwire.decode_cache([c[2].data for c in chunks], profile, config=model.config)
"""

from __future__ import annotations

import importlib
from typing import Any

from kvwire._version import __version__

_EXPORTS = {
    "EncodedChunk": "kvwire.kernels.codec",
    "LEVELS": "kvwire.kernels.codec",
    "DEFAULT_LEVEL": "kvwire.kernels.codec",
    "DEFAULT_CHUNK_TOKENS": "kvwire.kernels.codec",
    "encode_chunk": "kvwire.kernels.codec",
    "decode_chunk": "kvwire.kernels.codec",
    "encode_kv": "kvwire.kernels.codec",
    "decode_chunks": "kvwire.kernels.codec",
    "read_header": "kvwire.kernels.format",
    "CalibrationProfile": "kvwire.kernels.profile",
    "fit_profile": "kvwire.kernels.profile",
    "calibrate": "kvwire.calibration",
    "load_or_calibrate": "kvwire.calibration",
    "encode_cache": "kvwire.api",
    "decode_cache": "kvwire.api",
    "load_model": "kvwire.model",
    "model_fingerprint": "kvwire.model",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvwire' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
