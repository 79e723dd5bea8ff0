"""The worker and REST API with the real codec (``kvwire.kernels.codec``) and calibration."""

from __future__ import annotations

from typing import Any

import torch
from fastapi.testclient import TestClient

from kvwire.kernels import codec as codec_module
from kvwire.model import model_fingerprint, prefill_kv
from kvwire.server.config import ServiceSettings
from kvwire.server.jobs import InProcessJobQueue
from kvwire.server.rest import create_app
from kvwire.server.service import KernelsCodec, KvwireService, Worker
from kvwire.server.storage import Store

from .conftest import CharTokenizer


def tiny_profile(model: Any, tokenizer: Any) -> Any:
    from kvwire.calibration import calibrate

    torch.manual_seed(1)
    tokens = torch.randint(0, model.config.vocab_size, (400,)).tolist()
    return calibrate(model, tokenizer, token_ids=tokens, n_tokens=400, sens_context=128, sens_continuation=32)


def test_real_codec_round_trip(model: Any, store: Store, settings: ServiceSettings) -> None:
    tokenizer = CharTokenizer()
    fingerprint = model_fingerprint(model, tokenizer)
    profile = tiny_profile(model, tokenizer)
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
    # The served bytes are exactly what the codec makes of the model's KV for that chunk, and they
    # decode with the served profile. (Reconstruction quality is the codec's business: tests/codec.)
    direct = codec_module.encode_chunk(
        reference[:, :, :, 64:100], profile, level=0, token_start=64, model_fingerprint=fingerprint
    )
    assert chunk == direct.data
    assert manifest["chunks"][1]["levels"][0]["nbytes"] == direct.nbytes
    kv = codec_module.decode_chunk(chunk, loaded, model_fingerprint=fingerprint)
    assert kv.shape == reference[:, :, :, 64:100].shape
