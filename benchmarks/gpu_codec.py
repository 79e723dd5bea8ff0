"""Throughput and latency of the GPU codec path (kvwire.kernels.gpu) on one CUDA device, in one run.

Usage: ``python benchmarks/gpu_codec.py [--out DIR] [--budget SECONDS]`` on a machine with CUDA and
Triton; writes ``DIR/gpu_bench.md`` and prints it.

Data is synthetic (no model weights needed): Laplacian sources mixed by a random matrix per
(layer, K/V, head), with per-channel log-normal scales, offsets and a large first token, the statistics
the CPU codec tests use (tests/codec/conftest.py); keys get RoPE applied. A profile is fitted on 512
separate tokens with ``fit_profile``. Shapes: Llama-3-8B (32 layers, 8 KV heads, head dim 128, bf16,
one head per group, d = 128) and SmolLM2-135M (30, 3, 64, bf16, d = 192); 256-token chunks.

Reported per level and batch size: decode end to end (bytes in host memory -> KV tensors on the GPU:
validate + CRC + pinned copy + upload + kernels), the staging step alone (validate + CRC + copy +
upload), the device part alone (bytes already on the device -> KV: metadata, rANS kernel,
reconstruction kernel, status check), each kernel alone (CUDA events), and encode end to end (KV
tensor on the GPU -> bytes). Llama rows at level 2 are repeated with 128 lanes per segment (a header
field, no format change) for single-chunk latency. Baselines in the same run: a device-to-device copy
of the fp16 KV (bandwidth ceiling), a plain 8-bit dequantise kernel, and the CPU path on one chunk.
Bit-exactness of GPU and CPU decode is checked on one chunk per level.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from kvwire.kernels import codec, gpu, gpu_encode, host_crc
from kvwire.kernels import format as fmt
from kvwire.kernels.profile import CalibrationProfile, fit_profile
from kvwire.kernels.transform import remove_rope, rope_tables

CHUNK = 256
SHAPES = {  # name: (layers, kv heads, head dim, heads per group, rope base)
    "Llama-3-8B": (32, 8, 128, 1, 500000.0),
    "SmolLM2-135M": (30, 3, 64, None, 100000.0),
}


def synthetic_kv(L: int, H: int, T: int, D: int, base: float, seed: int, device: str) -> torch.Tensor:
    """float32 [L, 2, H, T, D] post-RoPE KV with per-channel structure (see the module docstring)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    mix = (torch.randn(L, 2, H, D, D, generator=g) / D**0.5).to(device)
    scale = torch.randn(L, 2, H, 1, D, generator=g).exp().to(device)
    offset = (torch.randn(L, 2, H, 1, D, generator=g) * 2).to(device)
    z = torch.distributions.Laplace(0.0, 1.0).sample((L, 2, H, T, D)).to(device)
    kv = torch.matmul(z, mix) * scale + offset
    kv[:, :, :, :1] *= 8
    inv_freq = 1.0 / base ** (np.arange(0, D, 2) / D)
    cos, sin = rope_tables(np.arange(T), inv_freq.astype(np.float32))
    c, s = torch.from_numpy(cos).to(device), torch.from_numpy(sin).to(device)
    k = kv[:, 0]
    kv[:, 0] = k * c + torch.cat([-k[..., D // 2 :], k[..., : D // 2]], -1) * s
    return kv


def make_profile(name: str) -> CalibrationProfile:
    L, H, D, hpg, base = SHAPES[name]
    inv_freq = (1.0 / base ** (np.arange(0, D, 2) / D)).astype(np.float32)
    kv = synthetic_kv(L, H, 512, D, base, seed=1, device="cpu").double().numpy()
    cos, sin = rope_tables(np.arange(512), inv_freq)
    kv[:, 0] = remove_rope(kv[:, 0], cos, sin)
    return fit_profile(
        [kv[:, :, :, 4:]],
        model_fingerprint="cd" * 32,
        inv_freq=inv_freq,
        heads_per_group=hpg,
        layer_weight=np.full((L, 2), 0.25),
    )


def _encoded_chunks(encode: Callable[[], Any]) -> object:
    """Run an encode and take its chunks as host bytes (what a caller storing them pays)."""
    return encode().chunks()


def wall(fn: Callable[[], object], reps: int, warm: int = 1) -> float:
    """Median wall-clock seconds of ``fn`` (synchronised), after ``warm`` untimed calls."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def events(fn: Callable[[], object], reps: int, warm: int = 2) -> float:
    """Median device seconds of ``fn`` between CUDA events, after warm-up."""
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def dequant8_kernel():  # built lazily: triton is imported only where the benchmark runs
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(q_ptr, scale_ptr, zero_ptr, out_ptr, n, D: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        q = tl.load(q_ptr + i, mask=m, other=0).to(tl.float32)
        c = i % D
        s = tl.load(scale_ptr + c, mask=m, other=0.0)
        z = tl.load(zero_ptr + c, mask=m, other=0.0)
        tl.store(out_ptr + i, (q * s + z).to(tl.float16), mask=m)

    def run(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, out: torch.Tensor) -> None:
        n = q.numel()
        kernel[(triton.cdiv(n, 4096),)](q, scale, zero, out, n, D=scale.numel(), BLOCK=4096)

    return run


def _decode_row(
    name: str,
    level: int,
    lanes: int,
    b: int,
    streams: list[bytes],
    chunks: list[torch.Tensor],
    profile: CalibrationProfile,
    elt: int,
    enc_batches: list[int],
) -> str:
    """One table row: decode end to end, staging, device part, each kernel; encode end to end."""
    dev = torch.device("cuda")
    reps = 7 if b <= 8 else 5
    part = streams[:b]
    bits = 8 * sum(len(x) for x in part) / (elt * b)
    t_e2e = wall(functools.partial(gpu.decode_chunks_gpu, part, profile, device=dev), reps)
    t_stage = wall(functools.partial(gpu.stage_chunks, part, profile, dev), reps)
    staged = gpu.stage_chunks(part, profile, dev)
    t_dev = wall(functools.partial(gpu.decode_staged, staged, profile), reps)
    t_prep = wall(functools.partial(gpu.prepare_decode, staged, profile), reps)
    batch = gpu.prepare_decode(staged, profile)
    t_rans = events(functools.partial(gpu.launch_decode, batch), reps)
    gpu.check_status(batch)
    t_recon = events(functools.partial(gpu.launch_reconstruct, batch), reps)
    t_both = events(functools.partial(gpu.launch_kernels, batch), reps)
    del batch, staged
    enc = "| |"
    if b in enc_batches and lanes == 32:
        starts = [CHUNK * j for j in range(b)]
        run = functools.partial(
            gpu_encode.encode_chunks_gpu, chunks[:b], profile, level=level, token_starts=starts
        )
        t_enc = wall(run, reps=3)
        enc = f"| {t_enc * 1e3:.1f} | {elt * b * 2 / t_enc / 1e9:.1f} |"
    n = elt * b
    return (
        f"| {name} | {level} | {lanes} | {b} | {bits:.2f} | {t_e2e * 1e3:.2f} | {n * 2 / t_e2e / 1e9:.1f} "
        f"| {t_stage * 1e3:.2f} | {t_dev * 1e3:.3f} | {t_prep * 1e3:.3f} | {n / t_dev / 1e9:.1f} "
        f"| {n * 2 / t_dev / 1e9:.0f} "
        f"| {t_rans * 1e3:.3f} | {t_recon * 1e3:.3f} | {t_both * 1e3:.3f} | {n / t_both / 1e9:.1f} {enc}"
    )


def stage_breakdown(streams: list[bytes], reps: int = 5) -> str:
    """Where staging time goes for a batch: threaded CRC alone, threaded copy to pinned memory alone,
    one H2D copy of the pinned bytes, and a single-threaded CRC, each a median wall time."""
    from concurrent.futures import ThreadPoolExecutor

    views = [memoryview(x) for x in streams]
    total = sum(len(v) for v in views)
    pinned = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    host = pinned.numpy()
    dev_buf = torch.empty(total, dtype=torch.uint8, device="cuda")
    offs = np.cumsum([0] + [len(v) for v in views])
    piece = 1 << 20
    jobs = [(i, lo) for i, v in enumerate(views) for lo in range(0, len(v), piece)]
    pool = ThreadPoolExecutor(min(16, os.cpu_count() or 1))

    def crc_all() -> None:
        list(pool.map(lambda j: fmt.crc32(views[j[0]][j[1] : j[1] + piece]), jobs))

    def copy_all() -> None:
        def one(j: tuple[int, int]) -> None:
            i, lo = j
            hi = min(lo + piece, len(views[i]))
            host[offs[i] + lo : offs[i] + hi] = np.frombuffer(views[i][lo:hi], dtype=np.uint8)

        list(pool.map(one, jobs))

    t_crc = wall(crc_all, reps)
    t_copy = wall(copy_all, reps)
    t_h2d = wall(functools.partial(dev_buf.copy_, pinned, non_blocking=True), reps)
    t_one = wall(lambda: [fmt.crc32(v) for v in views], 3)
    gb = total / 1e9
    return (
        f"staging breakdown, {len(streams)} chunks, {gb:.3f} GB, {os.cpu_count()} cores, crc32 = "
        f"{fmt.crc32.__module__}.{fmt.crc32.__name__}: threaded CRC {t_crc * 1e3:.1f} ms "
        f"({gb / t_crc:.1f} GB/s), threaded copy to pinned {t_copy * 1e3:.1f} ms ({gb / t_copy:.1f} GB/s), "
        f"H2D from pinned {t_h2d * 1e3:.1f} ms ({gb / t_h2d:.1f} GB/s), one-thread CRC {t_one * 1e3:.1f} ms "
        f"({gb / t_one:.1f} GB/s)"
    )


def tune(out_dir: Path) -> None:
    """Sweep the kernels' launch shapes (gpu.TUNING) on Llama level 2 and SmolLM2; check each output."""
    dev = torch.device("cuda")
    lines = [
        "| model | lanes | chunks | kernel | setting | ms | same bits |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in SHAPES:
        L, H, D, _hpg, base = SHAPES[name]
        profile = make_profile(name)
        kv = synthetic_kv(L, H, CHUNK * 64, D, base, seed=2, device="cuda").to(torch.bfloat16)
        chunks = [kv[:, :, :, i * CHUNK : (i + 1) * CHUNK].contiguous() for i in range(64)]
        del kv
        for lanes in (32, 128):
            data: list[bytes] = []
            for i in range(0, 64, 32):
                starts = [CHUNK * j for j in range(i, i + 32)]
                encs = gpu_encode.encode_chunks_gpu(
                    chunks[i : i + 32], profile, level=2, token_starts=starts, lanes=lanes
                )
                data.extend(e.data for e in encs)
            for b in (1, 64):
                staged = gpu.stage_chunks(data[:b], profile, dev)
                gpu.TUNING.update(rans_segs=1, rans_warps=0, recon_bt=64, recon_warps=4)
                batch = gpu.prepare_decode(staged, profile)
                gpu.launch_decode(batch)
                ref_q = batch.q.clone()
                ref = [o.clone() for o in gpu.launch_reconstruct(batch)]
                for segs in (1, 2):
                    for warps in (1, 2, 4):
                        gpu.TUNING.update(rans_segs=segs, rans_warps=warps)
                        t = events(functools.partial(gpu.launch_decode, batch), 5)
                        same: bool | str = all(
                            torch.equal(batch.q[o : o + n], ref_q[o : o + n]) for o, n in _q_spans(batch)
                        )
                        lines.append(
                            f"| {name} | {lanes} | {b} | rANS | segs {segs} warps {warps} "
                            f"| {t * 1e3:.3f} | {same} |"
                        )
                        print(lines[-1], flush=True)
                gpu.TUNING.update(rans_segs=1, rans_warps=0)
                gpu.launch_decode(batch)
                for bt, warps in ((32, 4), (64, 4), (64, 8), (128, 8)):
                    for _ in (0,):
                        gpu.TUNING.update(recon_bt=bt, recon_warps=warps)
                        try:
                            t = events(functools.partial(gpu.launch_reconstruct, batch), 5)
                            outs = gpu.launch_reconstruct(batch)
                            same = all(torch.equal(a, r) for a, r in zip(outs, ref, strict=True))
                        except Exception as exc:  # e.g. out of shared memory
                            t, same = float("nan"), f"{type(exc).__name__}"
                        lines.append(
                            f"| {name} | {lanes} | {b} | recon | BT {bt} warps {warps} "
                            f"| {t * 1e3:.3f} | {same} |"
                        )
                        print(lines[-1], flush=True)
                gpu.TUNING.update(rans_segs=1, rans_warps=0, recon_bt=64, recon_warps=4)
                del batch, staged, ref, ref_q
                torch.cuda.empty_cache()
                (out_dir / "gpu_tune.md").write_text("\n".join(lines) + "\n")


DECODE_VARIANTS = [(0, 0), (1, 0), (0, 64), (1, 64), (1, 128)]  # (rans_lut8, rans_prefetch)


def decode_variants(
    name: str, variants: list[tuple[int, list[bytes]]], profile: CalibrationProfile, batches: list[int]
) -> list[str]:
    """Time the decode kernels and the device part under each (symbol lookup, prefetch) setting of
    ``gpu.TUNING``, forced for both segment-count regimes; check every output against the first
    setting's bits. Returns the table lines."""
    dev = torch.device("cuda")
    lines = [
        "| model | lanes | chunks | rans_lut8 | rans_prefetch | rANS ms | recon ms | kernels ms "
        "| device ms | kernels Gelt/s | same bits |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    saved = dict(gpu.TUNING)
    for lanes, streams in variants:
        for b in batches:
            if b > len(streams):
                continue
            staged = gpu.stage_chunks(streams[:b], profile, dev)
            n = sum(h.elements for h, _ in staged.parsed)
            ref: list[torch.Tensor] | None = None
            for lut8, prefetch in DECODE_VARIANTS:
                gpu.TUNING.update(rans_lut8=(lut8, lut8), rans_prefetch=(prefetch, prefetch))
                batch = gpu.prepare_decode(staged, profile)
                t_rans = events(functools.partial(gpu.launch_decode, batch), 5)
                t_recon = events(functools.partial(gpu.launch_reconstruct, batch), 5)
                t_both = events(functools.partial(gpu.launch_kernels, batch), 5)
                outs = [o.clone() for o in gpu.launch_kernels(batch)]
                gpu.check_status(batch)
                t_dev = wall(functools.partial(gpu.decode_staged, staged, profile), 5)
                ref = ref if ref is not None else outs
                same = all(torch.equal(a, r) for a, r in zip(outs, ref, strict=True))
                lines.append(
                    f"| {name} | {lanes} | {b} | {lut8} | {prefetch} | {t_rans * 1e3:.3f} "
                    f"| {t_recon * 1e3:.3f} | {t_both * 1e3:.3f} | {t_dev * 1e3:.3f} "
                    f"| {n / t_both / 1e9:.1f} | {same} |"
                )
                print(lines[-1], flush=True)
                del batch, outs
            del staged, ref
            torch.cuda.empty_cache()
    gpu.TUNING.clear()
    gpu.TUNING.update(saved)
    return lines


RECON_VARIANTS = [(64, 4), (64, 8), (128, 8)]  # (recon_bt, recon_warps); the first is the reference


def recon_variants(
    name: str, streams: list[bytes], profile: CalibrationProfile, batches: list[int]
) -> list[str]:
    """Time the reconstruction (both of its launches) and both kernels under each launch shape of
    ``RECON_VARIANTS``; check every output against the first shape's bits. Returns the table lines."""
    dev = torch.device("cuda")
    lines = [
        "| model | chunks | recon BT | recon warps | recon ms | kernels ms | recon Gelt/s | same bits |",
        "|---|---|---|---|---|---|---|---|",
    ]
    saved = dict(gpu.TUNING)
    for b in batches:
        if b > len(streams):
            continue
        staged = gpu.stage_chunks(streams[:b], profile, dev)
        n = sum(h.elements for h, _ in staged.parsed)
        batch = gpu.prepare_decode(staged, profile)
        gpu.launch_decode(batch)
        gpu.check_status(batch)
        ref: list[torch.Tensor] | None = None
        for bt, warps in RECON_VARIANTS:
            gpu.TUNING.update(recon_bt=bt, recon_warps=warps)
            t_recon = events(functools.partial(gpu.launch_reconstruct, batch), 5)
            t_both = events(functools.partial(gpu.launch_kernels, batch), 5)
            outs = [o.clone() for o in gpu.launch_kernels(batch)]
            ref = ref if ref is not None else outs
            same = all(torch.equal(x, r) for x, r in zip(outs, ref, strict=True))
            lines.append(
                f"| {name} | {b} | {bt} | {warps} | {t_recon * 1e3:.3f} | {t_both * 1e3:.3f} "
                f"| {n / t_recon / 1e9:.1f} | {same} |"
            )
            print(lines[-1], flush=True)
            del outs
        gpu.TUNING.update(saved)
        del batch, staged, ref
        torch.cuda.empty_cache()
    return lines


def _q_spans(batch: gpu.DecodeBatch) -> list[tuple[int, int]]:
    """Where each chunk's coefficients sit in ``batch.q`` (the rest of the buffer is never written)."""
    return [
        (o, h.segments * h.group_dim * h.n_tokens)
        for (h, _), o in zip(batch.staged.parsed, batch.q_base, strict=True)
    ]


def _encode_stages(view: torch.Tensor, profile: CalibrationProfile, level: int, starts: list[int]) -> dict:
    """The encoder's stages on one batch: CUDA-event times of each launch, wall times of the rest."""
    reps = 5
    job = gpu_encode.prepare_encode(view, profile, level=level, token_starts=starts)
    out = {
        "prep": wall(
            functools.partial(gpu_encode.prepare_encode, view, profile, level=level, token_starts=starts),
            reps,
        ),
        "transform": events(functools.partial(gpu_encode.launch_transform, job), reps),
    }
    out["tables"] = events(functools.partial(gpu_encode.launch_tables, job), reps)
    out["check"] = wall(functools.partial(gpu_encode.check_input, job), reps)
    out["rans"] = events(functools.partial(gpu_encode.launch_rans, job), reps)
    out["pack"] = wall(functools.partial(gpu_encode.pack_device, job), reps)
    buf, bases, sizes = gpu_encode.pack_device(job)
    out["copy_out"] = wall(functools.partial(gpu_encode.copy_out, buf, bases, sizes), reps)
    out["bytes"] = sum(sizes)
    return out


def encode_bench(args: argparse.Namespace) -> None:
    """``--encode``: the GPU encoder alone, KV on the GPU -> packed chunks in host memory, by stage.

    Input: a bf16 context ``[L, 2, H, chunks * 256, D]`` on the GPU, encoded through ``chunk_view``
    (no copy). *e2e* = ``encode_batch_gpu``: packed chunks with CRCs in pinned host memory; *+bytes* =
    the same plus one Python ``bytes`` per chunk (``EncodedBatch.chunks``); *device* = everything up to
    the packed device buffer (``pack_device``), wall clock; then each stage (CUDA events for launches).
    """
    dev = torch.device(args.device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    props = torch.cuda.get_device_properties(0)
    head = (
        f"# GPU encoder benchmark\n\n{props.name}, {props.multi_processor_count} SMs; "
        f"torch {torch.__version__}; "
        f"{os.cpu_count()} host cores; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; tuning "
        f"{gpu_encode.TUNING}\n"
    )
    rows = [
        "| model | level | chunks | bits/elt | e2e ms | e2e Gelt/s | +bytes ms | device ms | device Gelt/s "
        "| prep | transform | tables | check | rANS | pack | copy+CRC | MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes: list[str] = []

    def write() -> None:
        text = "\n".join([head, *rows, "", *notes, ""])
        (out_dir / f"gpu_encode_{args.models.replace(',', '_')}.md").write_text(text)

    wanted = args.models.split(",")  # names from SHAPES, or their first part ("Llama")
    models = [m for m in SHAPES if m in wanted or m.split("-")[0] in wanted]
    batches = [int(b) for b in args.batches.split(",")]
    levels = [int(v) for v in args.levels.split(",")]
    for name in models:
        L, H, D, _hpg, base = SHAPES[name]
        profile = make_profile(name)
        max_b = max(batches)
        ctx = synthetic_kv(L, H, CHUNK * max_b, D, base, seed=2, device=args.device).to(torch.bfloat16)
        elt = L * 2 * H * CHUNK * D
        # Exactness: a settled chunk (CPU encode + decode) gets the CPU encoder's bytes; a raw one decodes
        # the same on both paths.
        j0 = CHUNK if max_b > 1 else 0
        one = ctx[:, :, :, j0 : j0 + CHUNK].cpu()
        settled = codec.decode_chunk(
            codec.encode_chunk(one, profile, token_start=j0, backend="cpu").data, profile
        )
        ref = codec.encode_chunk(settled, profile, token_start=j0, backend="cpu").data
        got = gpu_encode.encode_chunks_gpu([settled.to(dev)], profile, token_starts=[j0])[0].data
        raw = gpu_encode.encode_chunks_gpu([one.to(dev)], profile, token_starts=[j0])[0].data
        same = torch.equal(
            codec.decode_chunk(raw, profile, backend="cpu"),
            codec.decode_chunk(raw, profile, device=dev).cpu(),
        )
        cpu_raw = codec.encode_chunk(one, profile, token_start=j0, backend="cpu").data
        notes.append(
            f"- {name}: GPU bytes == CPU bytes on a settled chunk: {got == ref}; on the raw chunk the "
            "streams "
            f"are {len(raw)} (GPU) and {len(cpu_raw)} (CPU) bytes, identical: {raw == cpu_raw}; the GPU "
            f"stream decodes the same on both paths: {same}"
        )
        print(notes[-1], flush=True)
        for level in levels:
            for b in batches:
                if time.perf_counter() - t_start > args.budget:
                    notes.append("- time budget reached, rows missing")
                    break
                view = gpu_encode.chunk_view(ctx[:, :, :, : b * CHUNK], CHUNK)
                starts = [CHUNK * j for j in range(b)]
                run = functools.partial(
                    gpu_encode.encode_batch_gpu, view, profile, level=level, token_starts=starts
                )
                reps = 7 if b <= 8 else 5
                t_e2e = wall(run, reps)
                t_bytes = wall(functools.partial(_encoded_chunks, run), 3)

                def device_part(view=view, level=level, starts=starts, profile=profile) -> None:
                    job = gpu_encode.prepare_encode(view, profile, level=level, token_starts=starts)
                    gpu_encode.launch_transform(job)
                    gpu_encode.launch_tables(job)
                    gpu_encode.check_input(job)
                    gpu_encode.launch_rans(job)
                    gpu_encode.pack_device(job)

                t_dev = wall(device_part, reps)
                st = _encode_stages(view, profile, level, starts)
                n = elt * b
                bits = 8 * st["bytes"] / n
                ms = " | ".join(
                    f"{st[k] * 1e3:.3f}"
                    for k in ("prep", "transform", "tables", "check", "rans", "pack", "copy_out")
                )
                rows.append(
                    f"| {name} | {level} | {b} | {bits:.2f} | {t_e2e * 1e3:.2f} | {n / t_e2e / 1e9:.1f} "
                    f"| {t_bytes * 1e3:.1f} | {t_dev * 1e3:.2f} | {n / t_dev / 1e9:.1f} | {ms} "
                    f"| {st['bytes'] / 1e6:.1f} |"
                )
                print(rows[-1], flush=True)
                write()
                torch.cuda.empty_cache()
        if name.startswith("Llama") and args.sweep:
            _encode_sweep(ctx, profile, notes, t_start, args.budget, args.sweep_transform)
            write()
        del ctx
        torch.cuda.empty_cache()
    if args.ceiling_mib:
        _encode_ceilings(args, dev, notes, max(batches))
    write()
    print("\n".join([head, *rows, "", *notes]))


def _encode_ceilings(args: argparse.Namespace, dev: torch.device, notes: list[str], nb: int) -> None:
    """Copy, D2H, host CRC, host bytes and float32 GEMM rates on this machine, for the encoder's table."""
    n = args.ceiling_mib << 20
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    b2 = torch.empty_like(a)
    t = events(functools.partial(b2.copy_, a), 10)
    notes.append(
        f"- ceiling: d2d copy {args.ceiling_mib} MiB: {t * 1e3:.3f} ms, "
        f"{2 * n / t / 1e12:.2f} TB/s read + write"
    )
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=dev.type == "cuda")
    t = wall(functools.partial(pinned.copy_, a, non_blocking=True), 5)
    notes.append(
        f"- ceiling: D2H {args.ceiling_mib} MiB into pinned memory: {t * 1e3:.1f} ms, {n / t / 1e9:.1f} GB/s"
    )
    host = pinned.numpy()
    pool = host_crc.pool()
    piece = 1 << 20
    t = wall(lambda: list(pool.map(lambda lo: fmt.crc32(host[lo : lo + piece]), range(0, n, piece))), 5)
    notes.append(
        f"- ceiling: threaded CRC-32 ({fmt.crc32.__module__}) of {args.ceiling_mib} MiB in 1 MiB pieces: "
        f"{t * 1e3:.1f} ms, "
        f"{n / t / 1e9:.1f} GB/s"
    )
    t = wall(lambda: [host[lo : lo + (16 << 20)].tobytes() for lo in range(0, n, 16 << 20)], 3)
    notes.append(
        f"- ceiling: host copy into bytes objects (16 MiB each): {t * 1e3:.1f} ms, {n / t / 1e9:.1f} GB/s"
    )
    del a, b2, pinned
    x = torch.randn(nb, 512, CHUNK, 128, device=dev)
    w = torch.randn(512, 128, 128, device=dev)
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        t = events(lambda: torch.matmul(x, w), 5)
        notes.append(
            f"- ceiling: torch float32 batched GEMM, Llama transform shape ({nb} chunks, tf32 {tf32}): "
            f"{t * 1e3:.3f} ms, {2 * x.numel() * 128 / t / 1e12:.1f} TFLOP/s"
        )
    torch.backends.cuda.matmul.allow_tf32 = False


def _encode_sweep(
    ctx: torch.Tensor,
    profile: CalibrationProfile,
    notes: list[str],
    t_start: float,
    budget: float,
    transform: bool = False,
) -> None:
    """The pipeline's sub-batch size, then launch shapes of the table
    kernels (and of the transform with ``transform``), 64 chunks, level 2; kernel outputs checked
    against the default's."""
    b = ctx.shape[3] // CHUNK
    view = gpu_encode.chunk_view(ctx, CHUNK)
    starts = [CHUNK * j for j in range(b)]
    job = gpu_encode.prepare_encode(view, profile, level=2, token_starts=starts)
    saved = dict(gpu_encode.TUNING)
    gpu_encode.launch_transform(job)
    gpu_encode.launch_tables(job)
    q_ref, cls_ref = job.q.clone(), job.classes.clone()
    for prec, bt, bn, bk, warps in (
        ("ieee", 128, 64, 32, 8),
        ("ieee", 64, 64, 64, 4),
        ("ieee", 64, 128, 32, 4),
        ("tf32x3", 64, 64, 32, 4),
    ):
        if not transform or time.perf_counter() - t_start > budget:
            continue
        gpu_encode.TUNING.update(bt=bt, bn=bn, bk=bk, warps=warps, precision=prec)
        try:
            t = events(functools.partial(gpu_encode.launch_transform, job), 3)
            diff = int((job.q != q_ref).sum())
            notes.append(
                f"- sweep transform {prec} BT {bt} BN {bn} BK {bk} warps {warps}: {t * 1e3:.3f} ms, "
                f"{diff} coefficients differ from the default's"
            )
        except Exception as exc:
            notes.append(f"- sweep transform {prec} {bt} {bn} {bk} {warps}: {type(exc).__name__}")
        print(notes[-1], flush=True)
    gpu_encode.TUNING.update(saved)
    del job
    for sub in (16, 32, 64):
        if time.perf_counter() - t_start > budget:
            continue
        gpu_encode.TUNING.update(sub_batch=sub)
        run = functools.partial(gpu_encode.encode_batch_gpu, view, profile, level=2, token_starts=starts)
        t = wall(run, 5)
        notes.append(
            f"- sweep sub-batch {sub} chunks, e2e {b} chunks level 2: "
            f"{t * 1e3:.2f} ms ({view[0].numel() * b / t / 1e9:.1f} G elements/s)"
        )
        print(notes[-1], flush=True)
    gpu_encode.TUNING.update(saved)
    job = gpu_encode.prepare_encode(view, profile, level=2, token_starts=starts)
    gpu_encode.launch_transform(job)
    counts = gpu_encode.launch_counts(job)
    t_count = events(functools.partial(gpu_encode.launch_counts, job), 5)
    t_cost = events(functools.partial(gpu_encode.launch_costs, job, counts), 5)
    del counts
    notes.append(
        f"- tables, default shapes: count kernel {t_count * 1e3:.3f} ms, cost kernel {t_cost * 1e3:.3f} ms"
    )
    print(notes[-1], flush=True)
    for variant in (
        {"count_tokens": 16},
        {"count_tokens": 4},
        {"count_warps": 2},
        {"cost_bc": 64, "cost_warps": 8},
        {"cost_bc": 16, "cost_warps": 4},
    ):
        if time.perf_counter() - t_start > budget:
            continue
        gpu_encode.TUNING.update(variant)
        try:
            t = events(functools.partial(gpu_encode.launch_tables, job), 3)
            same = torch.equal(job.classes, cls_ref)
            notes.append(f"- sweep tables {variant}: {t * 1e3:.3f} ms, same classes {same}")
        except Exception as exc:
            notes.append(f"- sweep tables {variant}: {type(exc).__name__}: {exc}")
        print(notes[-1], flush=True)
        gpu_encode.TUNING.update(saved)
    del job
    gpu_encode.TUNING.update(saved)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--budget", type=float, default=480.0, help="stop adding rows after this many s")
    parser.add_argument("--levels", default="0,1,2,3,4")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--max-chunks", type=int, default=64)
    parser.add_argument("--tune", action="store_true", help="sweep the kernels' launch shapes instead")
    parser.add_argument("--models", default=",".join(SHAPES), help="comma-separated names from SHAPES")
    parser.add_argument("--batches", default="1,8,32,64", help="batch sizes (chunks), decode or --encode")
    parser.add_argument(
        "--decode-variants",
        action="store_true",
        help="also sweep gpu.TUNING's rANS lookup and prefetch settings (level 2, before the table rows)",
    )
    parser.add_argument(
        "--recon-variants",
        action="store_true",
        help="also sweep the reconstruction's launch shapes (Llama, level 2, before the table rows)",
    )
    parser.add_argument("--encode", action="store_true", help="benchmark the encoder alone, by stage")
    parser.add_argument(
        "--sweep", action="store_true", help="with --encode: sweep the encoder's launch shapes"
    )
    parser.add_argument(
        "--sweep-transform", action="store_true", help="with --sweep: the transform's launch shapes too"
    )
    parser.add_argument("--ceiling-mib", type=int, default=1024, help="with --encode: size of the ceilings")
    args = parser.parse_args()
    if args.encode:
        encode_bench(args)
        return
    if args.tune:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        tune(Path(args.out))
        return
    t_start = time.perf_counter()
    dev = args.device
    import triton

    props = torch.cuda.get_device_properties(0) if dev == "cuda" else None
    where = f"{props.name}, {props.multi_processor_count} SMs" if props else dev
    head = [
        f"# GPU codec benchmark\n\n{where}; torch {torch.__version__}, "
        f"triton {triton.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
        "Synthetic KV (see benchmarks/gpu_codec.py), 256-token chunks, bf16 input/output. "
        "GB/s counts the fp16/bf16 bytes of the decoded (or encoded) KV; Gelt/s its elements.\n",
    ]
    rows: list[str] = []
    base_rows: list[str] = []
    exact_rows: list[str] = []
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        text = "\n".join(
            [
                *head,
                "## Codec (GPU path)\n",
                "| model | level | lanes | chunks | bits/elt | e2e ms | e2e GB/s | stage ms | device ms "
                "| prep ms | device Gelt/s | device GB/s | rANS ms | recon ms | kernels ms | kernels Gelt/s "
                "| encode e2e ms | encode GB/s |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
                *rows,
                "\n## Baselines (same run)\n",
                "| what | model | chunks | ms | GB/s |",
                "|---|---|---|---|---|",
                *base_rows,
                "\n## Bit-exactness on this GPU (one chunk per level); staging breakdown\n",
                *exact_rows,
                "\n## Decode settings (gpu.TUNING), level 2\n" if variant_rows else "",
                *variant_rows,
                "\n## Reconstruction launch shapes, level 2\n" if recon_rows else "",
                *recon_rows,
                "",
            ]
        )
        (out_dir / "gpu_bench.md").write_text(text)

    levels = [int(v) for v in args.levels.split(",")]
    variant_rows: list[str] = []
    recon_rows: list[str] = []
    for name in args.models.split(","):
        L, H, D, _hpg, base = SHAPES[name]
        t0 = time.perf_counter()
        profile = make_profile(name)
        print(
            f"{name}: profile fitted in {time.perf_counter() - t0:.1f} s (d = {profile.group_dim})",
            flush=True,
        )
        max_b = args.max_chunks
        kv = synthetic_kv(L, H, CHUNK * max_b, D, base, seed=2, device=dev).to(torch.bfloat16)
        chunks = [kv[:, :, :, i * CHUNK : (i + 1) * CHUNK].contiguous() for i in range(max_b)]
        del kv
        elt = L * 2 * H * CHUNK * D
        enc_batches = [1, 8, 32] if name.startswith("Llama") else [1, 8, 64]
        dec_batches = [b for b in (int(v) for v in args.batches.split(",")) if b <= max_b]
        enc_batches = [b for b in enc_batches if b <= max_b]
        # Baselines: copy of the fp16 KV, plain 8-bit dequantise.
        for b in dec_batches:
            src = torch.stack(chunks[:b]).to(torch.float16)
            dst = torch.empty_like(src)
            t = events(functools.partial(dst.copy_, src), reps=10)
            gbs = src.numel() * 2 / t / 1e9
            base_rows.append(
                f"| d2d copy of fp16 KV | {name} | {b} | {t * 1e3:.3f} | {gbs:.0f} out, {2 * gbs:.0f} r+w |"
            )
            q8 = torch.randint(-128, 127, src.shape, dtype=torch.int8, device=dev)
            sc, zp = torch.rand(D, device=dev), torch.rand(D, device=dev)
            deq = dequant8_kernel()
            t = events(functools.partial(deq, q8, sc, zp, dst), reps=10)
            gbs = src.numel() * 2 / t / 1e9
            base_rows.append(f"| 8-bit dequantise (Triton) | {name} | {b} | {t * 1e3:.3f} | {gbs:.0f} out |")
            del src, dst, q8
        if name.startswith("Llama"):  # the matrix-unit ceiling the reconstruction's int8 dots run on
            try:
                a = torch.randint(-128, 127, (8192, 8192), dtype=torch.int8, device=dev)
                bm = torch.randint(-128, 127, (8192, 8192), dtype=torch.int8, device=dev).t()
                t = events(functools.partial(torch._int_mm, a, bm), reps=10)
                tops = 2 * 8192**3 / t / 1e12
                what = "int8 GEMM 8192^3 (torch._int_mm)"
                base_rows.append(f"| {what} | - | - | {t * 1e3:.3f} | {tops:.0f} TOPS |")
                del a, bm
            except Exception:
                traceback.print_exc()
        torch.cuda.empty_cache()
        write()
        cpu_done = False
        for level in levels:
            if time.perf_counter() - t_start > args.budget:
                print("time budget reached, stopping", flush=True)
                break
            # Streams for decoding: GPU-encoded, in batches of at most 32 chunks.
            data: list[bytes] = []
            for i in range(0, max_b, 32):
                kv_part = chunks[i : i + 32]
                starts = [CHUNK * j for j in range(i, i + len(kv_part))]
                encs = gpu_encode.encode_chunks_gpu(kv_part, profile, level=level, token_starts=starts)
                data.extend(e.data for e in encs)
            # Bit-exactness on the device: GPU decode vs CPU decode of the same bytes.
            ref = codec.decode_chunk(data[1], profile, backend="cpu")
            got = codec.decode_chunk(data[1], profile, device=dev).cpu()
            same = torch.equal(ref, got)
            exact_rows.append(f"- {name} level {level}: GPU decode == CPU decode (torch.equal): {same}")
            if not cpu_done:
                t_enc = time.perf_counter()
                codec.encode_chunk(chunks[1].cpu(), profile, level=level, token_start=CHUNK, backend="cpu")
                t_enc = time.perf_counter() - t_enc
                t_dec = time.perf_counter()
                codec.decode_chunk(data[1], profile, backend="cpu")
                t_dec = time.perf_counter() - t_dec
                for what, t in (("encode", t_enc), ("decode", t_dec)):
                    base_rows.append(
                        f"| CPU path {what}, 1 chunk (level {level}) | {name} | 1 | {t * 1e3:.0f} "
                        f"| {elt * 2 / t / 1e9:.2f} out |"
                    )
                cpu_done = True
            if level == 2:
                exact_rows.append("- " + stage_breakdown(data))
                print(exact_rows[-1], flush=True)
            variants = [(32, data)]
            if (level == 2 or len(levels) == 1) and name.startswith("Llama"):
                starts8 = [CHUNK * j for j in range(8)]
                encs = gpu_encode.encode_chunks_gpu(
                    chunks[:8], profile, level=level, token_starts=starts8, lanes=128
                )
                wide = [e.data for e in encs]
                variants.append((128, wide))
                ref = codec.decode_chunk(wide[1], profile, backend="cpu")
                same = torch.equal(ref, codec.decode_chunk(wide[1], profile, device=dev).cpu())
                exact_rows.append(f"- {name} level {level}, 128 lanes: GPU decode == CPU decode: {same}")
            if args.decode_variants and not variant_rows and len(variants) > 1:
                variant_rows.extend(decode_variants(name, variants, profile, dec_batches))
            if args.recon_variants and not recon_rows and len(variants) > 1:
                recon_rows.extend(recon_variants(name, data, profile, dec_batches))
                write()
            for lanes, streams in variants:
                for b in dec_batches:
                    if b > len(streams):
                        continue
                    try:
                        row = _decode_row(name, level, lanes, b, streams, chunks, profile, elt, enc_batches)
                        rows.append(row)
                    except Exception:  # keep the rest of the run (one device call) going
                        traceback.print_exc()
                        continue
                    print(rows[-1], flush=True)
                    torch.cuda.empty_cache()
                    write()
        del chunks
        torch.cuda.empty_cache()
    write()
    print((out_dir / "gpu_bench.md").read_text())
    print(f"total {time.perf_counter() - t_start:.0f} s; format version {fmt.FORMAT_VERSION}")


if __name__ == "__main__":
    main()
