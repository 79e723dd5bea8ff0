"""The codec's cache-level API on the real model: a decoded cache drives generate like the original."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import kvwire
from kvwire.errors import ModelMismatchError
from kvwire.model import cache_kwargs, model_fingerprint, prefill_kv, tensor_to_cache, text_tokens


@pytest.mark.integration
def test_decoded_cache_generates_like_the_original(smollm2: tuple[Any, Any], smollm2_profile: Any) -> None:
    model, tokenizer = smollm2
    fingerprint = model_fingerprint(model, tokenizer)
    ids = text_tokens(tokenizer, ["GPL-3"], 600)
    context, prompt = ids[:560], torch.tensor([ids[560:]])
    cache = tensor_to_cache(prefill_kv(model, context))

    chunks = kvwire.encode_cache(cache, smollm2_profile, levels=[0, 4], model_fingerprint=fingerprint)
    assert [c[0].token_start for c in chunks] == [0, 256, 512]
    assert all(c[4].nbytes < c[0].nbytes for c in chunks)
    restored = kvwire.decode_cache(
        [c[0].data for c in chunks], smollm2_profile, config=model.config, model_fingerprint=fingerprint
    )

    def greedy(past: Any) -> list[int]:
        full = torch.cat([torch.tensor([context]), prompt], dim=1)
        out = model.generate(full, **cache_kwargs(model, past), max_new_tokens=16, do_sample=False)
        return out[0, full.shape[1] :].tolist()

    reference = greedy(tensor_to_cache(prefill_kv(model, context)))
    assert greedy(restored)[:8] == reference[:8]

    with pytest.raises(ModelMismatchError):
        kvwire.decode_cache([chunks[0][0].data], smollm2_profile, model_fingerprint="00" * 32)
