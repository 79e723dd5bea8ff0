"""Tests for kvwire.calibration: profile fitting on tiny random models, the on-disk cache, real SmolLM2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from kvwire import calibration
from kvwire.calibration import (
    BENCHMARK_TEXTS,
    CALIBRATION_TEXTS,
    calibrate,
    load_or_calibrate,
    profile_cache_path,
    step_multipliers,
)
from kvwire.errors import InvalidInputError
from kvwire.kernels.profile import CalibrationProfile
from kvwire.model import model_fingerprint

VOCAB = 97
TOKENS = [(7 * i * i + 3 * i) % VOCAB for i in range(160)]
FAST: dict[str, Any] = {"token_ids": TOKENS, "sens_context": 96, "sens_continuation": 16}


class FakeTokenizer:
    """Just enough tokenizer for `model_fingerprint`: a fixed vocabulary."""

    def get_vocab(self) -> dict[str, int]:
        return {f"t{i}": i for i in range(VOCAB)}


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A random-weight 2-layer GQA Llama (4 query heads on 2 kv heads, head_dim 8), float32, eval."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=256, n_embd=32, n_layer=2, n_head=4)
    return GPT2LMHeadModel(config).eval()


def assert_same_profile(a: CalibrationProfile, b: CalibrationProfile) -> None:
    """Field-by-field equality (``==`` on the dataclass would compare arrays ambiguously)."""
    for name, value in a.__dict__.items():
        if name == "digest":
            continue
        if isinstance(value, np.ndarray):
            other = getattr(b, name)
            assert value.dtype == other.dtype and np.array_equal(value, other), name
        else:
            assert value == getattr(b, name), name


def test_tiny_llama_profile_validates_round_trips_and_is_deterministic() -> None:
    model, tokenizer = tiny_llama(), FakeTokenizer()
    messages: list[str] = []
    profile = calibrate(model, tokenizer, progress=messages.append, **FAST)
    profile.validate()
    assert (profile.layers, profile.kv_heads, profile.head_dim) == (2, 2, 8)
    assert profile.has_rope and profile.inv_freq.shape == (4,)
    assert profile.model_fingerprint == model_fingerprint(model, tokenizer)
    assert np.all(np.isfinite(profile.layer_weight)) and np.all(profile.layer_weight > 0)
    assert "caller-supplied" in profile.notes and messages
    assert_same_profile(CalibrationProfile.from_bytes(profile.to_bytes()), profile)
    assert_same_profile(calibrate(model, tokenizer, **FAST), profile)
    reseeded = calibrate(model, tokenizer, **{**FAST, "seed": 1})
    assert np.array_equal(reseeded.basis, profile.basis)  # the seed only drives the sensitivity noise
    assert not np.array_equal(reseeded.layer_weight, profile.layer_weight)


def test_profile_digest_survives_a_byte_round_trip() -> None:
    profile = calibrate(tiny_llama(), FakeTokenizer(), **FAST)
    digests = {CalibrationProfile.from_bytes(profile.to_bytes()).digest for _ in range(8)}
    assert digests == {profile.digest}


def test_metric_changes_the_basis_versus_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer = tiny_llama(), FakeTokenizer()
    weighted = calibrate(model, tokenizer, **FAST)
    monkeypatch.setattr(calibration, "_attention_projections", lambda model: None)
    plain = calibrate(model, tokenizer, **FAST)
    assert plain.has_rope and not np.array_equal(plain.basis, weighted.basis)
    np.testing.assert_allclose(plain.mean, weighted.mean, rtol=1e-6)  # means do not depend on the metric


def test_gpt2_style_model_calibrates_without_rope_or_metric() -> None:
    model, tokenizer = tiny_gpt2(), FakeTokenizer()
    profile = calibrate(model, tokenizer, **FAST)
    profile.validate()
    assert not profile.has_rope and profile.inv_freq.size == 0
    assert "identity" in profile.notes and "rope: none" in profile.notes
    assert np.all(np.isfinite(profile.layer_weight)) and np.all(profile.layer_weight > 0)
    assert_same_profile(CalibrationProfile.from_bytes(profile.to_bytes()), profile)


def test_step_multipliers_predict_the_target_kl() -> None:
    alpha = np.array([[1e-3, 4e-3], [1e-5, 0.0]])
    w = step_multipliers(alpha)
    assert np.all(w > 0) and np.all(np.isfinite(w))
    measured = alpha > 0
    np.testing.assert_allclose(w[0, 1] / w[0, 0], 0.5)
    floor = 1e-3 * np.median(alpha[measured])
    predicted = (np.maximum(alpha, floor) * w**2 / 12).sum()
    np.testing.assert_allclose(predicted, calibration.TARGET_KL_AT_UNIT_STEP)


def test_rejects_too_few_tokens_and_benchmark_texts() -> None:
    with pytest.raises(InvalidInputError):
        calibrate(tiny_llama(), FakeTokenizer(), token_ids=TOKENS[:50], sens_context=96, sens_continuation=16)
    assert not set(CALIBRATION_TEXTS) & set(BENCHMARK_TEXTS)
    with pytest.raises(InvalidInputError):
        calibration.calibration_tokens(FakeTokenizer(), 10, names=("BSD", "GPL-3"))


def test_profile_cache_path_and_recalibration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer = tiny_llama(), FakeTokenizer()
    fingerprint = model_fingerprint(model, tokenizer)
    monkeypatch.setenv("KVWIRE_DATA_DIR", str(tmp_path))
    assert profile_cache_path(fingerprint) == tmp_path / "profiles" / f"{fingerprint}.kvprofile"
    with pytest.raises(InvalidInputError):
        profile_cache_path("../../etc/passwd")

    calls: list[int] = []
    real = calibration.calibrate

    def counting(model: Any, tokenizer: Any, **kwargs: Any) -> CalibrationProfile:
        calls.append(1)
        return real(model, tokenizer, **{**kwargs, **FAST})

    monkeypatch.setattr(calibration, "calibrate", counting)
    path = profile_cache_path(fingerprint)
    first = load_or_calibrate(model, tokenizer)
    assert path.is_file() and len(calls) == 1
    assert_same_profile(load_or_calibrate(model, tokenizer), first)
    assert len(calls) == 1
    assert not [p for p in path.parent.iterdir() if p != path]  # no temp files left behind

    path.write_bytes(path.read_bytes()[:100])  # truncated: recalibrated and rewritten
    assert_same_profile(load_or_calibrate(model, tokenizer), first)
    assert len(calls) == 2

    other = tiny_llama(seed=1)  # another model's profile under this fingerprint's name
    path.write_bytes(real(other, tokenizer, **FAST).to_bytes())
    assert_same_profile(load_or_calibrate(model, tokenizer), first)
    assert len(calls) == 3
    assert CalibrationProfile.from_bytes(path.read_bytes()).model_fingerprint == fingerprint


@pytest.mark.integration
@pytest.mark.slow
def test_real_model_calibration(smollm2: tuple[Any, Any], smollm2_profile: CalibrationProfile) -> None:
    model, tokenizer = smollm2
    profile = smollm2_profile
    profile.validate()
    assert (profile.layers, profile.kv_heads, profile.head_dim, profile.heads_per_group) == (30, 3, 64, 3)
    assert profile.has_rope and profile.model_fingerprint == model_fingerprint(model, tokenizer)
    w = profile.layer_weight.astype(np.float64)
    assert np.all(np.isfinite(w)) and np.all(w > 0)
    # Layers differ a lot in sensitivity; the value cache of layer 0 is among the most sensitive.
    assert w.max() / w.min() > 4
    assert w[0, 1] < np.median(w)
    print(f"\nSmolLM2 layer weights {w.min():.2f}..{w.max():.2f}; {profile.notes}")
