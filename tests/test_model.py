"""Tests for kvwire.model: cache conversion, blockwise prefill, fingerprint, RoPE and text tokens."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvwire.errors import InvalidInputError, NotFoundError
from kvwire.kernels.transform import apply_rope, remove_rope, rope_tables
from kvwire.model import (
    LICENSES_DIR,
    cache_kwargs,
    cache_to_tensor,
    model_fingerprint,
    output_cache,
    prefill_kv,
    rope_parameters,
    tensor_to_cache,
    text_tokens,
)


def tiny_llama(seed: int = 0, **overrides: Any) -> LlamaForCausalLM:
    """A random-weight 2-layer Llama (no download); float32 and eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **overrides,
    )
    return LlamaForCausalLM(config).eval()


class FakeTokenizer:
    """Just enough tokenizer for `model_fingerprint` and `text_tokens`: one token per byte."""

    def __init__(self, shift: int = 0) -> None:
        self.shift = shift

    def get_vocab(self) -> dict[str, int]:
        return {f"b{i}": i + self.shift for i in range(97)}

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode())}


def keys_before_rope(model: Any, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per-layer keys straight out of k_proj, ``[kv_heads, tokens, head_dim]``, captured with hooks."""
    captured: list[torch.Tensor] = []
    head_dim = model.config.head_dim
    hooks = [
        layer.self_attn.k_proj.register_forward_hook(
            lambda _m, _i, out: captured.append(out[0].view(out.shape[1], -1, head_dim).transpose(0, 1))
        )
        for layer in model.model.layers
    ]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def test_cache_round_trip_and_continuation_logits_match() -> None:
    model = tiny_llama()
    ids = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        full = model(ids).logits
        cache = output_cache(model(ids[:, :30], use_cache=True))
    kv = cache_to_tensor(cache)
    assert kv.shape == (2, 2, 2, 30, 8)
    rebuilt = tensor_to_cache(kv, model.config)
    assert torch.equal(cache_to_tensor(rebuilt), kv)
    with torch.no_grad():
        tail = model(ids[:, 30:], **cache_kwargs(model, rebuilt)).logits
    torch.testing.assert_close(tail, full[:, 30:], atol=1e-5, rtol=1e-5)
    assert cache_to_tensor(rebuilt).shape[3] == 40  # the forward pass grew the rebuilt cache
    assert kv.shape[3] == 30  # ... but not the tensor it was built from


def test_generate_accepts_rebuilt_cache() -> None:
    model: Any = tiny_llama()
    ids = torch.randint(0, 97, (1, 12))
    kv = prefill_kv(model, ids[0, :-1])
    out = model.generate(
        ids, **cache_kwargs(model, tensor_to_cache(kv, model.config)), max_new_tokens=4, do_sample=False
    )
    expected = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, expected)


def test_prefill_in_blocks_matches_one_pass() -> None:
    model = tiny_llama()
    ids = torch.randint(0, 97, (50,))
    with torch.no_grad():
        one_pass = cache_to_tensor(output_cache(model(ids[None], use_cache=True)))
    torch.testing.assert_close(prefill_kv(model, ids, block_tokens=16), one_pass, atol=1e-5, rtol=1e-5)


def test_cache_to_tensor_rejects_batch_of_two() -> None:
    model = tiny_llama()
    with torch.no_grad():
        cache = output_cache(model(torch.randint(0, 97, (2, 5)), use_cache=True))
    with pytest.raises(InvalidInputError):
        cache_to_tensor(cache)


@pytest.mark.parametrize("shape", [(2, 2, 3, 4), (2, 3, 2, 3, 4)])
def test_tensor_to_cache_rejects_non_canonical_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(InvalidInputError):
        tensor_to_cache(torch.zeros(shape))


def test_fingerprint_is_stable_and_sensitive() -> None:
    tokenizer = FakeTokenizer()
    first = model_fingerprint(tiny_llama(seed=0), tokenizer)
    assert first == model_fingerprint(tiny_llama(seed=0), tokenizer)
    assert len(first) == 64 and int(first, 16) >= 0
    assert first != model_fingerprint(tiny_llama(seed=1), tokenizer)  # same shapes, other weights
    assert first != model_fingerprint(tiny_llama(seed=0), FakeTokenizer(shift=1))
    assert first != model_fingerprint(tiny_llama(seed=0, rope_theta=500000.0), tokenizer)


@pytest.mark.parametrize(
    "rope",
    [
        {},
        {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ],
    ids=["default", "linear", "llama3"],
)
def test_remove_rope_recovers_k_proj_output(rope: dict[str, Any]) -> None:
    model = tiny_llama(rope_theta=100000.0, **rope)
    ids = torch.randint(0, 97, (1, 48))
    params = rope_parameters(model)
    assert params.head_dim == 8 and params.theta == 100000.0
    cos, sin = rope_tables(np.arange(48), params.inv_freq.numpy(), params.attention_scaling)
    pre = keys_before_rope(model, ids)
    kv = prefill_kv(model, ids)
    for layer, keys in enumerate(pre):
        unroped = remove_rope(kv[layer, 0].numpy(), cos, sin, params.attention_scaling)
        torch.testing.assert_close(torch.from_numpy(unroped), keys, atol=1e-5, rtol=1e-5)
        roped = apply_rope(keys.numpy(), cos, sin)
        torch.testing.assert_close(torch.from_numpy(roped), kv[layer, 0], atol=1e-5, rtol=1e-5)


def test_rope_tables_use_rotate_half_pairing() -> None:
    params = rope_parameters(tiny_llama(rope_theta=10000.0))
    cos, sin = rope_tables(np.arange(4), params.inv_freq.numpy())
    assert cos.shape == sin.shape == (4, 8)
    np.testing.assert_array_equal(cos[:, :4], cos[:, 4:])
    np.testing.assert_array_equal(cos[0], np.ones(8, np.float32))
    assert sin[3, 0] == np.float32(np.sin(3.0))


def test_text_tokens_pads_with_the_next_text_and_truncates() -> None:
    tokenizer = FakeTokenizer()
    apache = (LICENSES_DIR / "Apache-2.0").read_bytes()
    ids = text_tokens(tokenizer, ["Apache-2.0", "GFDL-1.3"], len(apache) + 100)
    assert ids[: len(apache)] == list(apache)
    assert len(ids) == len(apache) + 100
    with pytest.raises(InvalidInputError):
        text_tokens(tokenizer, ["BSD"], 10**6)
    with pytest.raises(NotFoundError):
        text_tokens(tokenizer, ["No-Such-License"], 10)


@pytest.mark.integration
def test_real_model_rope_inverse_and_fingerprint(smollm2: tuple[Any, Any]) -> None:
    model, tokenizer = smollm2
    ids = torch.tensor([text_tokens(tokenizer, ["GPL-3"], 64)])
    params = rope_parameters(model.config)
    assert (params.head_dim, params.theta, params.rope_type) == (64, 100000.0, "default")
    cos, sin = rope_tables(np.arange(64), params.inv_freq.numpy(), params.attention_scaling)
    pre = keys_before_rope(model, ids)
    kv = prefill_kv(model, ids[0], block_tokens=32)
    assert kv.shape == (30, 2, 3, 64, 64)
    worst = max(np.abs(remove_rope(kv[i, 0].numpy(), cos, sin) - pre[i].numpy()).max() for i in range(30))
    assert worst < 1e-4, worst
    assert model_fingerprint(model, tokenizer) == model_fingerprint(model, tokenizer)
