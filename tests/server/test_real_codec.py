"""The worker and REST API with the real codec (``kvwire.kernels.codec``); skipped until it lands."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from kvwire.model import model_fingerprint, prefill_kv
from kvwire.server.config import ServiceSettings
from kvwire.server.jobs import InProcessJobQueue
from kvwire.server.rest import create_app
from kvwire.server.service import KernelsCodec, KvwireService, Worker
from kvwire.server.storage import Store

from .conftest import CharTokenizer

codec_module = pytest.importorskip("kvwire.kernels.codec", reason="kvwire.kernels.codec not merged yet")


def tiny_profile(model: Any, fingerprint: str) -> Any:
    from kvwire.kernels.profile import fit_profile, with_digest

    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, head_dim, 2) / head_dim))
    torch.manual_seed(1)
    kv = prefill_kv(model, torch.randint(0, config.vocab_size, (300,)).tolist())
    profile = fit_profile(
        [kv[:, :, :, 4:].numpy()], model_fingerprint=fingerprint, inv_freq=inv_freq.astype(np.float32)
    )
    return with_digest(profile)


def test_real_codec_round_trip(model: Any, store: Store, settings: ServiceSettings) -> None:
    tokenizer = CharTokenizer()
    fingerprint = model_fingerprint(model, tokenizer)
    profile = tiny_profile(model, fingerprint)
    worker = Worker(
        model,
        tokenizer,
        store,
        profile=profile,
        codec=KernelsCodec(),
        chunk_tokens=64,
        fingerprint=fingerprint,
    )
    service = KvwireService(store, InProcessJobQueue(), settings, worker)
    tokens = list(range(1, 101))
    reference = prefill_kv(model, tokens)
    with TestClient(create_app(service, settings)) as client:
        headers = {"Authorization": "Bearer alice-key"}
        manifest = client.post("/v1/contexts", json={"token_ids": tokens}, headers=headers).json()
        assert manifest["codec_version"] == worker.codec.version
        profile_bytes = client.get(f"/v1/profiles/{manifest['profile_digest']}", headers=headers).content
        loaded = type(profile).from_bytes(profile_bytes)
        chunk = client.get(f"/v1/contexts/{manifest['context_id']}/chunks/1?level=0", headers=headers).content
    kv = codec_module.decode_chunk(chunk, loaded, model_fingerprint=fingerprint)
    expected = reference[:, :, :, 64:100]
    assert kv.shape == expected.shape
    err = (kv.float() - expected).norm() / expected.norm()
    assert err < 0.5, float(err)
