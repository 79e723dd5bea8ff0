"""Benchmark KV compression methods on real contexts: size, quality (KL, perplexity, greedy) and speed.

Usage: ``python benchmarks/codec_quality.py [--out docs/codec_quality.md] [--methods fp16,kivi2]``.
To benchmark a new method, add one entry ``name: callable(kv) -> (kv_hat, nbytes)`` to ``METHODS``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks.*` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.baselines import BASELINES, Quantizer
from kvwire.calibration import load_or_calibrate
from kvwire.errors import InvalidInputError
from kvwire.kernels import codec
from kvwire.kernels.profile import CalibrationProfile
from kvwire.model import load_model, model_fingerprint, prefill_kv, text_tokens
from kvwire.quality import Quality, Reference, evaluate, reference_pass

METHODS: dict[str, Quantizer] = dict(BASELINES)
# Extra kvwire operating points (base steps) for comparisons with baselines at equal KL.
SWEEP_STEPS = (0.12, 0.18, 0.35)


def kvwire_methods(profile: CalibrationProfile, fingerprint: str) -> dict[str, Quantizer]:
    """kvwire at each level (and the sweep steps): encode the fp16 cache chunk by chunk, decode it back."""

    def method(level: int, step: float | None) -> Quantizer:
        def run(kv: torch.Tensor) -> tuple[torch.Tensor, int]:
            half = kv.to(torch.float16)
            chunks = [
                codec.encode_chunk(
                    half[:, :, :, a:b],
                    profile,
                    level=level,
                    token_start=a,
                    model_fingerprint=fingerprint,
                    base_step=step,
                )
                for a, b in codec.split_tokens(kv.shape[3])
            ]
            out = codec.decode_chunks([c.data for c in chunks], profile, model_fingerprint=fingerprint)
            return out.to(kv.dtype), sum(c.nbytes for c in chunks)

        return run

    methods = {f"kvwire-L{lv}": method(lv, None) for lv in codec.LEVELS}
    methods.update({f"kvwire-step{s}": method(0, s) for s in SWEEP_STEPS})
    return methods


# Each text: license files concatenated in order; context = first N tokens, continuation = next M.
TEXTS: dict[str, list[str]] = {
    "GPL-3": ["GPL-3"],
    "Apache-2.0+GFDL-1.3": ["Apache-2.0", "GFDL-1.3"],
}


@dataclass(frozen=True)
class Result:
    """One method on one text."""

    method: str
    text: str
    bits_per_element: float
    seconds: float  # encode + decode wall time
    quality: Quality


def run_method(
    name: str,
    method: Quantizer,
    text: str,
    kv: torch.Tensor,
    model: object,
    reference: Reference,
    repeats: int = 3,
) -> Result:
    """Encode+decode ``kv`` with ``method`` (timed: best of ``repeats``) and measure the result's quality."""
    seconds = float("inf")
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        kv_hat, nbytes = method(kv)
        seconds = min(seconds, time.perf_counter() - start)
    if kv_hat.shape != kv.shape:
        raise InvalidInputError(f"{name} returned shape {tuple(kv_hat.shape)} for {tuple(kv.shape)}")
    return Result(name, text, 8 * nbytes / kv.numel(), seconds, evaluate(model, reference, kv_hat))


def _row(method: str, results: list[Result]) -> str:
    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    bits = mean([r.bits_per_element for r in results])
    ppl_ref = mean([r.quality.perplexity_ref for r in results])
    ppl = mean([r.quality.perplexity for r in results])
    cells = [
        method,
        f"{bits:.3f}",
        f"{16 / bits:.2f}x",
        f"{8 / bits:.2f}x",
        f"{mean([r.quality.kl for r in results]):.5f}",
        f"{ppl_ref:.3f} → {ppl:.3f} ({ppl - ppl_ref:+.3f})",
        f"{mean([r.quality.greedy_match for r in results]):.3f}",
        f"{mean([float(r.quality.greedy_prefix) for r in results]):.1f}",
        f"{1000 * mean([r.seconds for r in results]):.1f}",
    ]
    return "| " + " | ".join(cells) + " |"


def markdown(results: list[Result], header: str) -> str:
    """Tables: mean over texts, then one per text."""
    columns = [
        "method",
        "bits/elem",
        "vs fp16",
        "vs 8-bit",
        "mean KL (nats)",
        "ppl ref → method (Δ)",
        "greedy match",
        "greedy prefix",
        "enc+dec ms",
    ]
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)
    methods = list(dict.fromkeys(r.method for r in results))
    texts = list(dict.fromkeys(r.text for r in results))
    parts = [header, "", f"### Mean over {', '.join(texts)}", "", head]
    parts += [_row(m, [r for r in results if r.method == m]) for m in methods]
    for text in texts:
        parts += ["", f"### {text}", "", head]
        parts += [_row(m, [r for r in results if r.method == m and r.text == text]) for m in methods]
    parts += [
        "",
        "bits/elem = 8 × encoded bytes / KV elements, side information included; vs 8-bit = 8 / bits/elem. "
        "KL is KL(p_ref ‖ p_method) averaged over the continuation positions (teacher forcing); "
        "greedy: 32 tokens generated after the first continuation token; "
        "enc+dec ms: best of the timed runs.",
    ]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the Markdown tables here")
    parser.add_argument("--methods", help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--model", help="local model path (default: bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--context-tokens", type=int, default=2048)
    parser.add_argument("--continuation-tokens", type=int, default=256)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (timings are per thread count)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="time each method as the best of N runs")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, tokenizer = load_model(args.model)
    print(f"model loaded in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    profile = load_or_calibrate(model, tokenizer)
    print(f"calibration profile {profile.digest[:16]} ready", file=sys.stderr)
    METHODS.update(kvwire_methods(profile, model_fingerprint(model, tokenizer)))
    names = args.methods.split(",") if args.methods else list(METHODS)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {list(METHODS)}")
    results = []
    for text, files in TEXTS.items():
        ids = text_tokens(tokenizer, files, args.context_tokens + args.continuation_tokens)
        kv = prefill_kv(model, ids[: args.context_tokens]).float()
        reference = reference_pass(model, kv, ids[args.context_tokens :])
        for name in names:
            results.append(run_method(name, METHODS[name], text, kv, model, reference, args.repeats))
            print(f"{text:>22} {name:>12}: {results[-1].quality}", file=sys.stderr)
    header = (
        f"## KV codec quality: {args.model or 'SmolLM2-135M-Instruct (bundled)'}, "
        f"{args.context_tokens}-token contexts, {args.continuation_tokens}-token continuations, "
        f"{args.threads} thread(s)"
    )
    table = markdown(results, header)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table, encoding="utf-8")
    print(f"total {time.perf_counter() - started:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
