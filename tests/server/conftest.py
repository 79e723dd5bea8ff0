"""Fixtures for the service tests: a tiny random-weight Llama, a character tokenizer, a fake codec.

The fake codec stands in for ``kvwire.kernels.codec`` (same call signature): it stores the chunk as
float16 rounded more coarsely at higher levels, behind a small header, and counts its calls.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvwire.server.config import ServiceSettings
from kvwire.server.jobs import InProcessJobQueue
from kvwire.server.service import KvwireService, Worker
from kvwire.server.storage import LocalStore, Store

torch.set_num_threads(1)

VOCAB = 128
API_KEYS = "alice:alice-key,bob:bob-key"


class CharTokenizer:
    """One token per ASCII character (code point modulo 128): enough of a tokenizer for the worker."""

    all_special_ids: list[int] = []  # noqa: RUF012 - read-only class data, as on real tokenizers

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % VOCAB for c in text]}

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)

    def get_vocab(self) -> dict[str, int]:
        return {chr(i): i for i in range(VOCAB)}


class FakeProfile:
    def __init__(self, seed: str = "profile-1"):
        self._bytes = b"FAKEPROFILE:" + seed.encode()
        self.digest = hashlib.sha256(self._bytes).hexdigest()

    def to_bytes(self) -> bytes:
        return self._bytes


class FakeCodec:
    """``encode(kv, profile, level=, token_start=, model_fingerprint=) -> bytes``, deterministic."""

    version = 1
    levels = (0, 1, 2, 3, 4)
    default_level = 2

    def __init__(self) -> None:
        self.calls = 0

    def encode(
        self, kv: torch.Tensor, profile: Any, *, level: int, token_start: int, model_fingerprint: str
    ) -> bytes:
        self.calls += 1
        step = 2.0 ** (level - 6)
        q = (kv.float() / step).round() * step
        header = struct.pack("<4sBI5I", b"FAKE", level, token_start, *kv.shape)
        return header + q.to(torch.float16).numpy().tobytes()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture
def codec() -> FakeCodec:
    return FakeCodec()


def make_settings(tmp_path: Path, **overrides: Any) -> ServiceSettings:
    values: dict[str, Any] = {
        "api_keys": API_KEYS,
        "chunk_tokens": 64,
        "inline_max_tokens": 200,
        "max_context_tokens": 2000,
        "max_request_bytes": 64 * 1024,
    }
    values.update(overrides)
    settings = ServiceSettings(**values)
    settings.storage.data_dir = tmp_path / "store"
    return settings


@pytest.fixture
def settings(tmp_path: Path) -> ServiceSettings:
    return make_settings(tmp_path)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with LocalStore(tmp_path / "store") as s:
        yield s


def make_worker(model: Any, store: Store, codec: Any, settings: ServiceSettings, **kw: Any) -> Worker:
    return Worker(
        model,
        CharTokenizer(),
        store,
        profile=kw.pop("profile", FakeProfile()),
        codec=codec,
        chunk_tokens=settings.chunk_tokens,
        max_context_tokens=settings.max_context_tokens,
        **kw,
    )


@pytest.fixture
def worker(model: Any, store: Store, codec: FakeCodec, settings: ServiceSettings) -> Worker:
    return make_worker(model, store, codec, settings)


@pytest.fixture
def service(store: Store, worker: Worker, settings: ServiceSettings) -> Iterator[KvwireService]:
    svc = KvwireService(store, InProcessJobQueue(max_pending=settings.max_pending_jobs), settings, worker)
    svc.start_workers()
    try:
        yield svc
    finally:
        svc.close()
