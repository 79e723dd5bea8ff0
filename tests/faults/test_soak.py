"""Short soaks (benchmarks/soak.py) in CI, against a real ``kvwire serve`` with the Redis backend and a
tiny random-weight model, so that they start in seconds: 8 clients for 10 s against one process with the
embedded worker, and 8 clients in 2 processes for 5 s against the scaled deployment (``kvwire serve
--workers 2`` and a ``kvwire worker`` on the Redis job queue). Assert behaviour only: nothing lost or
corrupted, no 5xx, no error of any kind; speed is measured by the full run (docs/reliability.md, "Load")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks.random_model import save_random_llama
from benchmarks.soak import SoakOptions, Stats, client_blocks, markdown, run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

VOCAB = 128


def tiny_model_dir(path: Path) -> Path:
    """A 2-layer random-weight Llama and a one-token-per-character tokenizer, saved as a HF model
    directory that ``kvwire serve`` loads (``KVWIRE_MODEL``) and calibrates in a few seconds."""
    return save_random_llama(path, "tiny")


def short_soak(tmp_path: Path, **scale: Any) -> dict[str, Any]:
    options = SoakOptions(
        clients=8,
        chunk_tokens=64,
        contexts=3,
        context_chunks=3,
        vocab=VOCAB,
        decode_every=4,
        model=str(tiny_model_dir(tmp_path / "model")),
        workdir=tmp_path / "soak",
        startup_timeout_s=180,
        extra_env={"XDG_CACHE_HOME": str(tmp_path / "cache")},  # the tiny model's profile
        settle_s=0.5,
        **scale,
    )
    report = run(options)
    print(markdown(report))
    assert report["problems"] == [] and report["errors"] == 0
    assert report["lost"] == 0 and report["corrupted"] == 0 and report["status_5xx"] == 0
    # It did do work of each kind, and every acknowledged context was found again afterwards.
    assert report["ingests"] > 0 and report["loads"] > 0 and report["streams"] > 0
    assert report["chunks_verified"] > 0 and report["chunks_decoded_and_compared"] > 0
    assert report["swept_contexts"] > 0
    assert report["chunk_requests_timed_rest"] > 0 and report["chunk_requests_timed_grpc"] > 0
    return report


def test_short_soak_loses_and_corrupts_nothing(tmp_path: Path) -> None:
    report = short_soak(tmp_path, seconds=10)
    assert report["server_processes"] == {"api": 1, "ingest_workers": 0}


def test_short_soak_of_the_scaled_deployment(tmp_path: Path) -> None:
    """API processes without a model, ingests through the Redis job queue (202 + job, polled), clients
    in two processes whose counts are merged; the memory of every serving process is sampled."""
    report = short_soak(tmp_path, seconds=5, serve_workers=2, ingest_workers=1, client_processes=2)
    # The supervisor and its 2 children, and the worker.
    assert report["server_processes"] == {"api": 3, "ingest_workers": 1}
    assert report["api_rss_peak_mb"] > 0 and report["worker_rss_peak_mb"] > 0
    # Both client processes ran REST and gRPC clients (contiguous blocks of 4: 2 of each).
    assert client_blocks(8, 2) == [range(0, 4), range(4, 8)]


def test_scaled_options_are_checked() -> None:
    with pytest.raises(ValueError, match="ingest-workers"):
        SoakOptions(serve_workers=2).check()
    with pytest.raises(ValueError, match="client-processes"):
        SoakOptions(clients=4, client_processes=5).check()


def test_stats_merge_adds_counts_and_keeps_twenty_problems() -> None:
    a, b = Stats(requests=3, rest_latency_s=[0.1]), Stats(requests=4, grpc_latency_s=[0.2])
    for n in range(15):
        a.problem("x", str(n))
        b.problem("y", str(n))
    a.merge(b)
    assert a.requests == 7 and a.rest_latency_s == [0.1] and a.grpc_latency_s == [0.2]
    assert a.errors == {"x": 15, "y": 15} and len(a.problems) == 20
