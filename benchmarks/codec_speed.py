"""CPU encode and decode speed of the kvwire codec on one core, on a real SmolLM2 cache.

Usage: ``python benchmarks/codec_speed.py [--cpu 0] [--repeats 5] [--out docs/codec_speed.md]``.
Pins the process to one core and one thread for every library before any of them loads, prefills a
2048-token GPL-3 context, and times encode and decode of its eight 256-token chunks (fp16 cache) per
level: best of ``--repeats`` passes, reported as KV elements per second.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kvwire.calibration import load_or_calibrate  # noqa: E402
from kvwire.kernels import codec  # noqa: E402
from kvwire.model import load_model, prefill_kv, text_tokens  # noqa: E402


def best_of(repeats: int, fn: object) -> float:
    """Fastest wall time of ``repeats`` calls of ``fn``."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", type=int, default=0, help="core to pin to")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    torch.set_num_threads(1)

    model, tokenizer = load_model()
    profile = load_or_calibrate(model, tokenizer)
    ids = text_tokens(tokenizer, ["GPL-3"], 2048)
    kv = prefill_kv(model, ids).to(torch.float16)
    ranges = codec.split_tokens(kv.shape[3])
    parts = [kv[:, :, :, a:b].contiguous() for a, b in ranges]
    # Warm up the JIT-compiled coder and the profile's cached matrices.
    codec.decode_chunk(codec.encode_chunk(parts[1], profile, token_start=ranges[1][0]).data, profile)

    rows = []
    for level in codec.LEVELS:
        encoded: list[codec.EncodedChunk] = []

        def encode_all(level: int = level, out: list[codec.EncodedChunk] = encoded) -> None:
            out[:] = [
                codec.encode_chunk(p, profile, level=level, token_start=a)
                for p, (a, _) in zip(parts, ranges, strict=True)
            ]

        t_enc = best_of(args.repeats, encode_all)

        def decode_all(chunks: list[codec.EncodedChunk] = encoded) -> None:
            for c in chunks:
                codec.decode_chunk(c.data, profile)

        t_dec = best_of(args.repeats, decode_all)
        n = kv.numel()
        bits = 8 * sum(c.nbytes for c in encoded) / n
        rows.append(f"| {level} | {bits:.3f} | {n / t_enc / 1e6:.1f} | {n / t_dec / 1e6:.1f} |")
        print(rows[-1], file=sys.stderr)
    table = "\n".join(
        [
            f"KV elements: {kv.numel():,} (SmolLM2-135M, GPL-3, 2048 tokens, fp16), one core, "
            f"best of {args.repeats}",
            "",
            "| level | bits/elem | encode M elem/s | decode M elem/s |",
            "|---|---|---|---|",
            *rows,
        ]
    )
    print(table)
    if args.out:
        args.out.write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
