"""The codec demo: prefill a real text with the bundled model, encode its KV cache at every level,
decode it back and report size and quality per level. The README's main job at this stage."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from kvwire.calibration import load_or_calibrate
from kvwire.kernels import codec
from kvwire.model import load_model, model_fingerprint, prefill_kv, text_tokens
from kvwire.quality import evaluate, reference_pass


def codec_demo(
    texts: Sequence[str] = ("GPL-3",),
    context_tokens: int = 2048,
    continuation_tokens: int = 64,
    model_path: str | None = None,
    say: Callable[[str], None] = print,
) -> list[dict[str, float]]:
    """Run the demo and return one row of measurements per level (also printed through ``say``)."""
    started = time.perf_counter()
    say(f"loading model {model_path or 'SmolLM2-135M-Instruct (bundled)'} ...")
    model, tokenizer = load_model(model_path)
    fingerprint = model_fingerprint(model, tokenizer)
    say("calibration profile (computed once per model, then cached on disk) ...")
    profile = load_or_calibrate(model, tokenizer, progress=lambda msg: say(f"  {msg}"))
    ids = text_tokens(tokenizer, list(texts), context_tokens + continuation_tokens)
    say(f"prefilling {context_tokens} tokens of {' + '.join(texts)} ...")
    kv = prefill_kv(model, ids[:context_tokens]).to(torch.float16)
    reference = reference_pass(model, kv.float(), ids[context_tokens:])
    fp16_bytes = kv.numel() * 2
    say(f"KV cache: {tuple(kv.shape)} = {kv.numel():,} elements, {fp16_bytes / 1e6:.1f} MB in fp16")
    rows = []
    header = (
        f"{'level':>5} {'bytes':>11} {'bits/elem':>9} {'vs fp16':>8} {'encode s':>9} {'decode s':>9} "
        f"{'KL nats/token':>14} {'greedy match':>12}"
    )
    say(header)
    for level in codec.LEVELS:
        t0 = time.perf_counter()
        chunks = codec.encode_kv(kv, profile, levels=[level], model_fingerprint=fingerprint)
        t1 = time.perf_counter()
        decoded = codec.decode_chunks([c[level].data for c in chunks], profile, model_fingerprint=fingerprint)
        t2 = time.perf_counter()
        nbytes = sum(c[level].nbytes for c in chunks)
        quality = evaluate(model, reference, decoded.float())
        row = {
            "level": level,
            "bytes": nbytes,
            "bits_per_element": 8 * nbytes / kv.numel(),
            "ratio_vs_fp16": fp16_bytes / nbytes,
            "encode_s": t1 - t0,
            "decode_s": t2 - t1,
            "kl": quality.kl,
            "greedy_match": quality.greedy_match,
        }
        rows.append(row)
        say(
            f"{level:>5} {nbytes:>11,} {row['bits_per_element']:>9.3f} {row['ratio_vs_fp16']:>7.1f}x "
            f"{row['encode_s']:>9.2f} {row['decode_s']:>9.2f} {row['kl']:>14.5f} {row['greedy_match']:>12.2f}"
        )
    say(f"done in {time.perf_counter() - started:.0f} s (level {codec.DEFAULT_LEVEL} is the default)")
    return rows
