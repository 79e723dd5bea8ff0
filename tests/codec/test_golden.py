"""Golden bytes: pin the version-1 bitstream for a fixed input (docs/format.md).

The profile is an exact identity transform and the input sits on the quantisation grid, so the
coefficients do not depend on floating-point details of the machine and the bytes are fixed.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from kvwire.kernels import codec
from kvwire.kernels.profile import CalibrationProfile, with_digest

GOLDEN_CHUNK_SHA256 = "64eb8c83f07d30fa01f6dba21e43fe1261acc64c28cb74b54911aad1696288e8"


def identity_profile() -> CalibrationProfile:
    L, H, D = 2, 2, 4
    d = H * D
    basis = np.broadcast_to(np.eye(d, dtype=np.int16) * (1 << 12), (L, 2, 1, d, d)).copy()
    return with_digest(
        CalibrationProfile(
            model_fingerprint="00" * 32,
            layers=L,
            kv_heads=H,
            head_dim=D,
            heads_per_group=H,
            mean=np.zeros((L, 2, 1, d), np.float32),
            basis=basis,
            basis_exp=np.full((L, 2, 1), 12, np.int8),
            layer_weight=np.full((L, 2), 1.0, np.float32),
            inv_freq=np.zeros(0, np.float32),
            sink_tokens=1,
        )
    )


def golden_input() -> torch.Tensor:
    rng = np.random.default_rng(2024)
    step = codec.LEVEL_STEPS[2]
    mant, exp = codec._step_code(step)
    q = np.rint(rng.laplace(0, 3, size=(2, 2, 2, 12, 4)))
    return torch.from_numpy((q * mant * 2.0**-exp).astype(np.float32))


def test_golden_chunk_bytes() -> None:
    profile = identity_profile()
    x = golden_input()
    chunk = codec.encode_chunk(x, profile, level=2, token_start=0, model_fingerprint="11" * 32)
    assert chunk.data[:4] == b"KVWC"
    assert hashlib.sha256(chunk.data).hexdigest() == GOLDEN_CHUNK_SHA256
    y = codec.decode_chunk(chunk.data, profile)
    assert torch.equal(y, x)  # on-grid input and an identity transform decode exactly
