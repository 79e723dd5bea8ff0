"""Small real inputs for codec tests: a profile fitted on synthetic KV with realistic structure."""

from __future__ import annotations

import os

# The GPU path's Triton kernels run on CPU tensors in the interpreter (tests/codec/test_gpu.py). Triton
# reads this when it is first imported, so it is set here, before any test module can import it; it only
# changes how Triton runs kernels, which nothing else in the tests does.
# KVWIRE_TEST_DEVICE=cuda runs the same tests on a real GPU instead (compiled kernels, CUDA tensors).
if os.environ.get("KVWIRE_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import torch

from kvwire.kernels.profile import CalibrationProfile, fit_profile
from kvwire.kernels.transform import remove_rope, rope_tables


def synthetic_kv(layers: int, heads: int, tokens: int, head_dim: int, seed: int = 0) -> np.ndarray:
    """KV with per-channel offsets and scales, correlated channels and a big first token, like real caches."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(layers, 2, heads, head_dim, head_dim)) / np.sqrt(head_dim)
    scale = np.exp(rng.normal(size=(layers, 2, heads, 1, head_dim)))
    offset = rng.normal(size=(layers, 2, heads, 1, head_dim)) * 2
    z = rng.laplace(size=(layers, 2, heads, tokens, head_dim))
    kv = np.einsum("lkhtd,lkhde->lkhte", z, mix) * scale + offset
    kv[:, :, :, :1] *= 8  # attention-sink-like first token
    return kv.astype(np.float32)


def make_profile(
    layers: int = 2, heads: int = 2, head_dim: int = 8, heads_per_group: int | None = None
) -> CalibrationProfile:
    kv = synthetic_kv(layers, heads, 512, head_dim, seed=1).astype(np.float64)
    inv_freq = (1.0 / 10000.0 ** (np.arange(0, head_dim, 2) / head_dim)).astype(np.float32)
    cos, sin = rope_tables(np.arange(512), inv_freq)
    kv[:, 0] = remove_rope(kv[:, 0], cos, sin)
    return fit_profile(
        [kv[:, :, :, 4:]],
        model_fingerprint="ab" * 32,
        inv_freq=inv_freq,
        heads_per_group=heads_per_group,
        layer_weight=np.full((layers, 2), 0.05),
    )


@pytest.fixture(scope="session")
def profile() -> CalibrationProfile:
    return make_profile()


def triton_test_device() -> torch.device:
    """The device the Triton-kernel tests run on, or skip the calling module (call it at import time):
    CPU tensors under TRITON_INTERPRET=1 (CI), or ``KVWIRE_TEST_DEVICE=cuda`` on a GPU."""
    triton = pytest.importorskip("triton")
    device = torch.device(os.environ.get("KVWIRE_TEST_DEVICE", "cpu"))
    if device.type == "cpu" and not triton.knobs.runtime.interpret:  # set at the top of this file
        pytest.skip("TRITON_INTERPRET=1 must be set before triton is imported", allow_module_level=True)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("KVWIRE_TEST_DEVICE=cuda without a CUDA device", allow_module_level=True)
    return device
