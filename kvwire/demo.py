"""The codec demo: prefill a real text with the bundled model, encode its KV cache at every level,
decode it back and report size and quality per level. The README's main job at this stage."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


DEMO_QUESTION = "\n\nQuestion: What does this license guarantee to its users?\nAnswer:"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service_demo(
    text: str = "GPL-3",
    context_tokens: int = 2048,
    bandwidth: str = "1gbps",
    transport: str = "rest",
    slo_s: float | None = None,
    max_new_tokens: int = 16,
    question: str = DEMO_QUESTION,
    say: Callable[[str], None] = print,
) -> list[DemoRow]:
    """The end-to-end demo; returns one row per way of getting the context into the model.

    Starts the service in-process on embedded defaults (local store in a temporary directory, CPU,
    the bundled SmolLM2), ingests ``context_tokens`` tokens of a real text, then loads the context
    back through the client under the emulated ``bandwidth`` in several modes, answers ``question``
    and prints time-to-first-token for each: a local full prefill (the reference answer), text
    recompute through kvwire, kvwire at fixed levels, and adaptive under an SLO.
    """
    import tempfile
    import threading

    import uvicorn

    from kvwire.client import Client
    from kvwire.client.throttle import parse_throttle
    from kvwire.server.config import ServiceSettings
    from kvwire.server.rest import create_app
    from kvwire.server.service import build_service
    from kvwire.server.storage.config import StorageSettings

    rows: list[DemoRow] = []
    with tempfile.TemporaryDirectory(prefix="kvwire-demo-") as tmp:
        settings = ServiceSettings(
            host="127.0.0.1",
            port=_free_port(),
            device="cpu",
            api_keys={},
            storage=StorageSettings(store="local", data_dir=Path(tmp)),
        )
        say("starting the service in-process: local store in a temporary directory, CPU, bundled SmolLM2")
        say("  (the first run calibrates the model, about a minute; the profile is cached on disk)")
        service = build_service(settings)
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(service, settings), host="127.0.0.1", port=settings.port, log_level="warning"
            )
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        grpc_server = None
        try:
            while not server.started:
                if not thread.is_alive():
                    raise RuntimeError("the REST server did not start")
                time.sleep(0.02)
            url = f"http://127.0.0.1:{settings.port}"
            if transport == "grpc":
                from kvwire.server.grpc_server import serve_grpc

                grpc_server = serve_grpc(service, settings, 0)
                url = f"127.0.0.1:{grpc_server.port}"
            assert service.worker is not None
            model, tokenizer = service.worker.model, service.worker.tokenizer  # one copy in memory
            rows = _demo_runs(
                Client(url, transport=transport, throttle=bandwidth),  # type: ignore[arg-type]
                model,
                tokenizer,
                text=text,
                context_tokens=context_tokens,
                bandwidth=bandwidth,
                hint=(cfg.trace.rate_at(0.0) if (cfg := parse_throttle(bandwidth)) else None),
                slo_s=slo_s,
                max_new_tokens=max_new_tokens,
                question=question,
                say=say,
            )
        finally:
            if grpc_server is not None:
                grpc_server.stop()
            server.should_exit = True
            thread.join(timeout=10)
            service.close()
    return rows


@dataclass
class DemoRow:
    """One way of getting the context into the model, and what it cost."""

    how: str
    ttft_s: float  # load (0 for the local prefill) + question and first token
    load_s: float
    first_token_s: float
    mb_moved: float
    choices: str  # per chunk: level digit or T (text)
    answer: str
    answer_ids: list[int]
    same_answer: bool | None  # equal to the full prefill's greedy tokens (None: it is the reference)
    slo_met: bool | None = None


def _demo_runs(
    client: Any,
    model: Any,
    tokenizer: Any,
    *,
    text: str,
    context_tokens: int,
    bandwidth: str,
    hint: float | None,
    slo_s: float | None,
    max_new_tokens: int,
    question: str,
    say: Callable[[str], None],
) -> list[DemoRow]:
    from kvwire.client.sdk import generate_answer
    from kvwire.controller import Mode

    ids = text_tokens(tokenizer, [text], context_tokens)
    say(f"ingesting {context_tokens} tokens of {text} ...")
    t0 = time.perf_counter()
    reported = [-1]

    def progress(done: int, total: int) -> None:  # called on every poll of the job: report changes
        if done != reported[0]:
            reported[0] = done
            say(f"  encoded {done}/{total} chunks")

    manifest = client.ingest(token_ids=ids, progress=progress)
    stored = ", ".join(
        f"L{lv} {sum(c.level(lv).nbytes for c in manifest.chunks) / 1e6:.2f} MB" for lv in manifest.levels
    )
    elapsed = time.perf_counter() - t0
    say(f"  context {manifest.context_id}: {len(manifest.chunks)} chunks in {elapsed:.1f} s; {stored}")
    question_ids = list(tokenizer(question, add_special_tokens=False)["input_ids"])

    say("reference: full prefill of context + question on this machine (no network) ...")
    ref = generate_answer(model, tokenizer, ids + question_ids, max_new_tokens=max_new_tokens)
    say(f"  TTFT {ref.first_token_s:.3f} s; answer: {ref.text.strip()!r}")
    rows = [
        DemoRow("full prefill (local, no network)", ref.first_token_s, 0.0, ref.first_token_s, 0.0, "-",
                ref.text, ref.token_ids, None)
    ]  # fmt: skip

    say(f"loading the context back through the client, link emulated at {bandwidth}:")
    modes = [("text recompute via kvwire", Mode.text())]
    modes += [(f"kvwire level {lv}", Mode.fixed_level(lv)) for lv in (0, 2, 4) if lv in manifest.levels]
    for how, mode in modes:
        rows.append(_demo_load(client, model, tokenizer, manifest.context_id, how, mode, hint, question_ids,
                               max_new_tokens, ref.token_ids))  # fmt: skip
        say(f"  {how}: TTFT {rows[-1].ttft_s:.3f} s")
    slo = slo_s if slo_s is not None else round(rows[1].ttft_s / 3, 3)
    how = f"kvwire adaptive, SLO {slo} s"
    rows.append(_demo_load(client, model, tokenizer, manifest.context_id, how, Mode.adaptive(slo), hint,
                           question_ids, max_new_tokens, ref.token_ids))  # fmt: skip
    say("")
    say(
        f"{'how':<34} {'TTFT s':>7} {'load s':>7} {'1st tok s':>9} {'MB moved':>8} {'choices':>16}  "
        "same answer"
    )
    for row in rows:
        same = "(reference)" if row.same_answer is None else ("yes" if row.same_answer else "no")
        say(
            f"{row.how:<34} {row.ttft_s:>7.3f} {row.load_s:>7.3f} {row.first_token_s:>9.3f} "
            f"{row.mb_moved:>8.2f} {row.choices:>16}  {same}"
        )
    last = rows[-1]
    say(f"adaptive: the load took {last.load_s:.3f} s, SLO {slo} s {'met' if last.slo_met else 'MISSED'}")
    say(f"answer (kvwire level 0): {rows[2].answer.strip()!r}")
    return rows


def _demo_load(
    client: Any,
    model: Any,
    tokenizer: Any,
    context_id: str,
    how: str,
    mode: Any,
    hint: float | None,
    question_ids: list[int],
    max_new_tokens: int,
    reference_ids: list[int],
) -> DemoRow:
    loaded = client.load(model, context_id, tokenizer=tokenizer, mode=mode, bandwidth_hint_bytes_per_s=hint)
    answer = loaded.generate(model, tokenizer, question_ids, max_new_tokens=max_new_tokens)
    kinds = [("T" if r.kind == "text" else str(r.level)) for r in loaded.chunks]
    return DemoRow(
        how=how,
        ttft_s=loaded.timings.total_s + answer.first_token_s,
        load_s=loaded.timings.total_s,
        first_token_s=answer.first_token_s,
        mb_moved=sum(r.nbytes for r in loaded.chunks) / 1e6,
        choices="".join(kinds) if len(kinds) <= 16 else f"{kinds.count('T')}/{len(kinds)} text",
        answer=answer.text,
        answer_ids=answer.token_ids,
        same_answer=answer.token_ids == reference_ids,
        slo_met=loaded.slo_met,
    )
