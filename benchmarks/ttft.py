"""Time to first token versus emulated bandwidth: full prefill, 8-bit KV, kvwire fixed levels, adaptive.

For each context length the context is ingested once into an in-process kvwire service (local store in
a temporary directory, REST on loopback), then, per bandwidth, a question is answered after getting
the context into the model by:

- ``prefill``: a full prefill of context + question on this machine (no network: the text is assumed
  to be there already, which favours it);
- ``minmax8``: 8-bit per-channel min/max KV (benchmarks/baselines.py) moved through the same token
  bucket (in process, no HTTP), dequantised, then the question; fetch and dequantise do not overlap;
- ``kvwire-L<n>``: ``Client.load`` at a fixed level through REST with the throttle in the transport;
- ``adaptive``: ``Client.load`` in adaptive mode with the SLO (default: a third of the prefill's TTFT).

TTFT = the load (from the request to the cache being ready) + the question's prefill and the first new
token. ``python benchmarks/ttft.py --tokens 2048 8192 --gbps 0.1 0.5 1 2 5 --out docs/ttft.md``;
``--model random-llama8b --device cuda`` uses a Llama-3-8B-shaped model with random weights (timing
only: its answers mean nothing) and a profile fitted on its own KV.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.baselines import minmax8  # noqa: E402
from kvwire.client import Client  # noqa: E402
from kvwire.client.sdk import generate_answer  # noqa: E402
from kvwire.client.throttle import BYTES_PER_GBPS, TokenBucket  # noqa: E402
from kvwire.controller import Mode  # noqa: E402
from kvwire.model import tensor_to_cache, text_tokens  # noqa: E402

QUESTION = "\n\nQuestion: What does this license guarantee to its users?\nAnswer:"
# Concatenated in this order; the first five give 24,693 SmolLM2 tokens (2K and 8K contexts), the rest
# extend them past 32K without changing those prefixes.
TEXTS = [
    "GPL-3", "Apache-2.0", "GFDL-1.3", "LGPL-2.1", "MPL-2.0",
    "GPL-2", "MPL-1.1", "LGPL-2", "GFDL-1.2", "GPL-1", "Artistic", "CC0-1.0", "LGPL-3", "BSD",
]  # fmt: skip


@dataclass
class Row:
    tokens: int
    gbps: float
    method: str
    ttft_s: float
    load_s: float
    mb: float
    levels: str
    slo_met: bool | None = None


class StubTokenizer:
    """Enough of a tokenizer for the worker with a random-weight model: ids in, no text out."""

    all_special_ids: list[int] = []  # noqa: RUF012
    eos_token_id = None

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % 1000 for c in text]}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return ""

    def get_vocab(self) -> dict[str, int]:
        return {}


def random_llama8b(device: str) -> tuple[Any, Any, Any]:
    """A Llama-3-8B-shaped model (32 layers, 8 KV heads, head dim 128) with random fp16 weights,
    a stub tokenizer, and a calibration profile fitted on the model's own KV of random tokens."""
    import numpy as np
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvwire.kernels.profile import fit_profile
    from kvwire.kernels.transform import remove_rope, rope_tables
    from kvwire.model import model_fingerprint, prefill_kv, rope_parameters

    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rope_theta=500000.0,  # type: ignore[call-arg]  # transformers 5 folds it into rope_parameters
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).half().eval()
    tokenizer = StubTokenizer()
    ids = torch.randint(0, 128256, (1024,)).tolist()
    kv = prefill_kv(model, ids).double().cpu().numpy()
    inv_freq = rope_parameters(model).inv_freq.numpy().astype(np.float32)
    cos, sin = rope_tables(np.arange(kv.shape[3]), inv_freq)
    kv[:, 0] = remove_rope(kv[:, 0], cos, sin)
    profile = fit_profile(
        [kv[:, :, :, 4:]],
        model_fingerprint=model_fingerprint(model, tokenizer),
        inv_freq=inv_freq,
        layer_weight=np.full((kv.shape[0], 2), 0.05),
    )
    return model, tokenizer, profile


def start_service(model: Any, tokenizer: Any, profile: Any, data_dir: str) -> tuple[Any, Any, str]:
    import uvicorn

    from kvwire.demo import _free_port
    from kvwire.server.config import ServiceSettings
    from kvwire.server.jobs import InProcessJobQueue
    from kvwire.server.rest import create_app
    from kvwire.server.service import KernelsCodec, KvwireService, Worker
    from kvwire.server.storage import LocalStore

    settings = ServiceSettings(port=_free_port(), api_keys={}, inline_max_tokens=1 << 20)
    store = LocalStore(Path(data_dir))
    worker = Worker(model, tokenizer, store, profile=profile, codec=KernelsCodec())
    service = KvwireService(store, InProcessJobQueue(), settings, worker)
    server = uvicorn.Server(
        uvicorn.Config(create_app(service, settings), port=settings.port, log_level="warning")
    )
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return service, server, f"http://127.0.0.1:{settings.port}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace) -> list[Row]:
    if args.model == "random-llama8b":
        model, tokenizer, profile = random_llama8b(args.device)
    else:
        from kvwire.calibration import load_or_calibrate
        from kvwire.model import load_model

        model, tokenizer = load_model(args.model, device=args.device)
        profile = load_or_calibrate(model, tokenizer)
    device = next(model.parameters()).device
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="kvwire-ttft-") as tmp:
        service, server, url = start_service(model, tokenizer, profile, tmp)
        try:
            for n_tokens in args.tokens:
                if args.model == "random-llama8b":
                    ids = torch.randint(0, 128256, (n_tokens,)).tolist()
                    question = torch.randint(0, 128256, (16,)).tolist()
                else:
                    ids = text_tokens(tokenizer, TEXTS, n_tokens)
                    question = list(tokenizer(QUESTION, add_special_tokens=False)["input_ids"])
                measure_context(args, model, tokenizer, service, url, ids, question, device, rows)
        finally:
            server.should_exit = True
            service.close()
    return rows


def measure_context(
    args: argparse.Namespace,
    model: Any,
    tokenizer: Any,
    service: Any,
    url: str,
    ids: list[int],
    question: list[int],
    device: torch.device,
    rows: list[Row],
) -> None:
    """Measure one context at every bandwidth, appending to ``rows`` and saving after each bandwidth
    (a long or time-limited run keeps what it measured)."""
    from kvwire.model import prefill_kv

    n = len(ids)
    print(f"[{n} tokens] ingesting ...", flush=True)
    manifest = service.ingest("default", token_ids=ids, context_id=f"ctx-{n}")
    generate_answer(model, tokenizer, ids[:64] + question, max_new_tokens=1)  # warm-up
    prefill = min(
        (
            generate_answer(model, tokenizer, ids + question, max_new_tokens=1).first_token_s
            for _ in range(args.repeats)
        ),
    )
    print(f"[{n} tokens] full prefill TTFT {prefill:.3f} s", flush=True)
    kv = prefill_kv(model, ids)
    recon, q8_bytes = minmax8(kv.float().cpu())
    recon = recon.to(device=device, dtype=next(model.parameters()).dtype)
    slo = args.slo or prefill / 3
    for gbps in args.gbps:
        rows.append(Row(n, gbps, "prefill", prefill, 0.0, 0.0, "text"))
        rows.append(minmax8_row(model, tokenizer, n, gbps, ids, question, recon, q8_bytes, device))
        modes = [(f"kvwire-L{lv}", Mode.fixed_level(lv)) for lv in args.levels]
        modes.append((f"adaptive (SLO {slo:.2f} s)", Mode.adaptive(slo)))
        with Client(url, throttle=f"{gbps}gbps", timeout_s=120) as client:
            for name, mode in modes:
                best: Row | None = None
                for _ in range(args.repeats):
                    loaded = client.load(
                        model, manifest.context_id, tokenizer=tokenizer, mode=mode,
                        bandwidth_hint_bytes_per_s=gbps * BYTES_PER_GBPS,
                    )  # fmt: skip
                    answer = generate_answer(model, tokenizer, loaded.token_ids + question, loaded.cache,
                                             max_new_tokens=1)  # fmt: skip
                    levels = "".join("T" if r.kind == "text" else str(r.level) for r in loaded.chunks)
                    load_s = loaded.timings.total_s
                    mb = sum(r.nbytes for r in loaded.chunks) / 1e6
                    ttft = load_s + answer.first_token_s
                    row = Row(n, gbps, name, ttft, load_s, mb, _summarize(levels), loaded.slo_met)
                    best = row if best is None or row.ttft_s < best.ttft_s else best
                assert best is not None
                rows.append(best)
        for row in rows[-len(modes) - 2 :]:
            print(
                f"[{n} tokens, {gbps} Gbps] {row.method:<22} TTFT {row.ttft_s:7.3f} s  ({row.levels})",
                flush=True,
            )
        save(rows, args)


def minmax8_row(
    model: Any,
    tokenizer: Any,
    n: int,
    gbps: float,
    ids: list[int],
    question: list[int],
    recon: torch.Tensor,
    nbytes: int,
    device: torch.device,
) -> Row:
    """Move ``nbytes`` through a token bucket in 64 KiB pieces, dequantise (a multiply-add over uint8
    codes of the KV's shape), build the cache, answer."""
    bucket = TokenBucket(rate_bytes_per_s=gbps * BYTES_PER_GBPS)
    codes = torch.randint(0, 255, recon.shape, dtype=torch.uint8, device=device)
    start = time.perf_counter()
    for offset in range(0, nbytes, 65536):
        bucket.acquire(min(65536, nbytes - offset))
    scale = torch.rand((*recon.shape[:3], 1, recon.shape[4]), device=device, dtype=recon.dtype)
    dequant = codes.to(recon.dtype) * scale + scale  # the dequantisation's cost (its values are discarded)
    sync(device)
    del dequant
    cache = tensor_to_cache(recon, model.config)
    load_s = time.perf_counter() - start
    answer = generate_answer(model, tokenizer, ids + question, cache, max_new_tokens=1)
    return Row(n, gbps, "minmax8", load_s + answer.first_token_s, load_s, nbytes / 1e6, "8-bit")


def _summarize(levels: str) -> str:
    if len(levels) <= 12:
        return levels
    counts = {c: levels.count(c) for c in sorted(set(levels))}
    return " ".join(f"{c}x{k}" for k, c in counts.items())


def markdown(rows: list[Row], args: argparse.Namespace) -> str:
    lines = [
        f"- Command: `python benchmarks/ttft.py {' '.join(sys.argv[1:])}`",
        f"- Date: {datetime.date.today()}. Machine: {platform.machine()}, {platform.processor() or '?'}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, device {args.device or 'cpu'}; "
        f"model {args.model or 'SmolLM2-135M-Instruct (bundled)'}.",
        "",
        "| tokens | Gbps | method | TTFT s | load s | MB moved | choices | SLO met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        slo = "" if r.slo_met is None else ("yes" if r.slo_met else "no")
        cells = [str(r.tokens), f"{r.gbps:g}", r.method, f"{r.ttft_s:.3f}", f"{r.load_s:.3f}", f"{r.mb:.2f}"]
        lines.append("| " + " | ".join([*cells, r.levels, slo]) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r.tokens for r in rows})
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.5), squeeze=False)
    for ax, n in zip(axes[0], sizes, strict=True):
        for method in dict.fromkeys(r.method for r in rows if r.tokens == n):
            pts = [(r.gbps, r.ttft_s) for r in rows if r.tokens == n and r.method == method]
            ax.plot(*zip(*pts, strict=True), marker="o", label=method)
        ax.set(xscale="log", yscale="log", xlabel="emulated bandwidth (Gbit/s)", ylabel="TTFT (s)")
        ax.set_title(f"{n} tokens")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--gbps", type=float, nargs="+", default=[0.1, 0.5, 1, 2, 5])
    parser.add_argument("--levels", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--slo", type=float, help="adaptive SLO in seconds (default: prefill TTFT / 3)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per point; the fastest is kept")
    parser.add_argument("--model", help="model path, or random-llama8b (default: bundled SmolLM2)")
    parser.add_argument("--device", help="torch device (default cpu)")
    parser.add_argument("--threads", type=int, help="torch threads")
    parser.add_argument("--out", type=Path, help="write a markdown table here (and JSON next to it)")
    parser.add_argument("--plot", type=Path, help="write a PNG plot here (needs matplotlib)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args)
    print(markdown(rows, args))
    return 0


def save(rows: list[Row], args: argparse.Namespace) -> None:
    if args.out:
        args.out.write_text(markdown(rows, args))
        args.out.with_suffix(".json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    sys.exit(main())
