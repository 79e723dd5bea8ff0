"""Shared pytest setup: make `benchmarks` importable and load the real model once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

# `benchmarks/` is a plain folder of scripts, not an installed package; tests import it as
# `benchmarks.<module>` from the repository root.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The GPU path's Triton kernels run on CPU tensors in the interpreter (tests/codec/test_gpu.py). Triton
# reads this when it is first imported, and test modules that run the model (tests/client) may import it
# (through transformers' generate) before tests/codec/conftest.py is loaded: so it is set here, first.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2() -> tuple[Any, Any]:
    """The bundled SmolLM2-135M-Instruct ``(model, tokenizer)``, float32 on CPU (loading takes ~20-30 s)."""
    import torch

    from kvwire.model import load_model

    torch.set_num_threads(1)
    return load_model()


@pytest.fixture(scope="session")
def smollm2_profile(smollm2: tuple[Any, Any]) -> Any:
    """The calibration profile of the bundled model, calibrated once per test session (~1 min)."""
    import time

    from kvwire.calibration import calibrate

    start = time.perf_counter()
    profile = calibrate(*smollm2)
    print(f"SmolLM2 calibration took {time.perf_counter() - start:.1f} s")
    return profile
