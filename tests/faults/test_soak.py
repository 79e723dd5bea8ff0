"""A short soak (benchmarks/soak.py) in CI: 8 clients for 10 s against a real ``kvwire serve`` with the
Redis backend and a tiny random-weight model, so that it starts in seconds. Asserts behaviour only:
nothing lost or corrupted, no 5xx, no error of any kind; speed is measured by the full run
(docs/reliability.md, "Load")."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.random_model import save_random_llama
from benchmarks.soak import SoakOptions, markdown, run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

VOCAB = 128


def tiny_model_dir(path: Path) -> Path:
    """A 2-layer random-weight Llama and a one-token-per-character tokenizer, saved as a HF model
    directory that ``kvwire serve`` loads (``KVWIRE_MODEL``) and calibrates in a few seconds."""
    return save_random_llama(path, "tiny")


def test_short_soak_loses_and_corrupts_nothing(tmp_path: Path) -> None:
    options = SoakOptions(
        clients=8,
        seconds=10,
        chunk_tokens=64,
        contexts=3,
        context_chunks=3,
        vocab=VOCAB,
        decode_every=4,
        model=str(tiny_model_dir(tmp_path / "model")),
        workdir=tmp_path / "soak",
        startup_timeout_s=180,
        extra_env={"XDG_CACHE_HOME": str(tmp_path / "cache")},  # the tiny model's profile
    )
    report = run(options)
    print(markdown(report))
    assert report["problems"] == [] and report["errors"] == 0
    assert report["lost"] == 0 and report["corrupted"] == 0 and report["status_5xx"] == 0
    # It did do work of each kind, and every acknowledged context was found again afterwards.
    assert report["ingests"] > 0 and report["loads"] > 0 and report["streams"] > 0
    assert report["chunks_verified"] > 0 and report["chunks_decoded_and_compared"] > 0
    assert report["swept_contexts"] > 0
