"""Tests for benchmarks.baselines (sizes, error bounds) and kvwire.quality (on a tiny random Llama)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.baselines import BASELINES, fp16, kivi2, kivi4, minmax4, minmax8, minmax_quantize
from kvwire.errors import InvalidInputError
from kvwire.model import prefill_kv
from kvwire.quality import evaluate, reference_pass


def synthetic_kv(tokens: int = 512, head_dim: int = 64, seed: int = 0) -> torch.Tensor:
    """Canonical KV ``[3, 2, 2, tokens, head_dim]`` with per-channel offsets and scales, like real keys."""
    generator = torch.Generator().manual_seed(seed)
    shape = (3, 2, 2, tokens, head_dim)
    offsets = torch.randn(3, 2, 2, 1, head_dim, generator=generator) * 3
    scales = torch.rand(3, 2, 2, 1, head_dim, generator=generator) + 0.1
    return torch.randn(shape, generator=generator) * scales + offsets


@pytest.mark.parametrize(
    ("method", "tokens", "bits_per_element"),
    [
        (fp16, 512, 16.0),
        (minmax8, 512, 8 + 32 / 256),
        (minmax4, 512, 4 + 32 / 256),
        (kivi4, 512, 5.0),
        (kivi2, 512, 3.0),
    ],
)
def test_sizes_count_payload_and_fp16_side_information(
    method: object, tokens: int, bits_per_element: float
) -> None:
    kv = synthetic_kv(tokens)
    kv_hat, nbytes = method(kv)  # type: ignore[operator]
    assert kv_hat.shape == kv.shape and kv_hat.dtype == torch.float32
    assert 8 * nbytes == pytest.approx(bits_per_element * kv.numel())


def test_partial_chunks_and_groups_are_counted() -> None:
    kv = synthetic_kv(tokens=300)  # one full 256-token chunk + 44; nine 32-token key groups + 12
    elements_per_half = kv.numel() // 2
    channels = 3 * 2 * 2 * 64
    _, nbytes = minmax4(kv)
    assert nbytes == kv.numel() // 2 + 2 * channels * 2 * 2  # 4-bit payload, 2 chunks x (scale, zero)
    _, nbytes = kivi2(kv)
    key_groups, residual = 3 * 2 * 9 * 64, 3 * 2 * 12 * 64
    key_bytes = (elements_per_half - residual) // 4 + key_groups * 4 + residual * 2
    value_bytes = elements_per_half // 4 + elements_per_half // 32 * 4
    assert nbytes == key_bytes + value_bytes


@pytest.mark.parametrize("method", [minmax8, minmax4])
def test_minmax_error_is_at_most_half_a_step_per_channel(method: object) -> None:
    kv = synthetic_kv(tokens=300)
    kv_hat, _ = method(kv)  # type: ignore[operator]
    bits = 8 if method is minmax8 else 4
    for start in (0, 256):
        chunk, chunk_hat = kv[:, :, :, start : start + 256], kv_hat[:, :, :, start : start + 256]
        step = (chunk.amax(dim=3) - chunk.amin(dim=3)) / (2**bits - 1)
        # half a step, plus slack for the fp16-rounded scale and zero-point
        bound = 0.5 * step * 1.01 + 1e-3 * chunk.abs().amax(dim=3)
        assert ((chunk_hat - chunk).abs().amax(dim=3) <= bound).all()


@pytest.mark.parametrize(("method", "bits"), [(kivi4, 4), (kivi2, 2)])
def test_kivi_groups_keys_per_channel_and_values_per_token(method: object, bits: int) -> None:
    kv = synthetic_kv(tokens=64, head_dim=64)
    kv_hat, _ = method(kv)  # type: ignore[operator]
    levels = 2**bits - 1
    key_groups = kv[:, 0].reshape(3, 2, 2, 32, 64)  # 32 tokens per channel
    key_err = (kv_hat[:, 0].reshape(3, 2, 2, 32, 64) - key_groups).abs().amax(dim=3)
    key_step = (key_groups.amax(dim=3) - key_groups.amin(dim=3)) / levels
    assert (key_err <= 0.5 * key_step * 1.01 + 1e-2).all()
    value_groups = kv[:, 1].reshape(3, 2, 64, 2, 32)  # 32 channels per token
    value_err = (kv_hat[:, 1].reshape(3, 2, 64, 2, 32) - value_groups).abs().amax(dim=4)
    value_step = (value_groups.amax(dim=4) - value_groups.amin(dim=4)) / levels
    assert (value_err <= 0.5 * value_step * 1.01 + 1e-2).all()


def test_more_bits_means_less_error() -> None:
    kv = synthetic_kv()
    errors = {name: (method(kv)[0] - kv).pow(2).mean().item() for name, method in BASELINES.items()}
    assert errors["fp16"] < errors["minmax8"] < errors["minmax4"]
    assert errors["kivi4"] < errors["kivi2"]


def test_constant_channels_are_exact() -> None:
    x = torch.full((4, 8), 1.5)
    torch.testing.assert_close(minmax_quantize(x, 2, dim=0), x)


@pytest.mark.parametrize("bad", [torch.zeros(2, 2, 3, 4), torch.full((1, 2, 1, 4, 32), float("nan"))])
def test_rejects_bad_input(bad: torch.Tensor) -> None:
    for method in BASELINES.values():
        with pytest.raises(InvalidInputError):
            method(bad)


def test_kivi_needs_head_dim_multiple_of_group() -> None:
    with pytest.raises(InvalidInputError):
        kivi2(torch.zeros(1, 2, 1, 32, 48))


def test_quality_of_identical_cache_is_perfect_and_noise_hurts() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 97, (80,))
    kv = prefill_kv(model, ids[:60])
    reference = reference_pass(model, kv, ids[60:])
    same = evaluate(model, reference, kv.clone())
    assert same.kl == pytest.approx(0.0, abs=1e-9)
    assert same.perplexity == pytest.approx(same.perplexity_ref)
    assert same.greedy_match == 1.0 and same.greedy_prefix == 32
    noisy = evaluate(model, reference, kv + torch.randn_like(kv) * kv.std() * 3)
    assert noisy.kl > 1e-4
    assert noisy.perplexity_change != 0.0
