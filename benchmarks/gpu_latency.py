"""One-chunk GPU decode latency on one CUDA device: where the host time around the kernels goes, and
staging timed against an older ``kernels/gpu.py`` in the same process.

Usage: ``python benchmarks/gpu_latency.py [--out DIR] [--old OLD_GPU_PY ...] [--reps N]`` on a machine
with CUDA and Triton; writes ``DIR/gpu_latency.md`` and prints it. ``--old`` takes a copy of an older
``kernels/gpu.py`` (``git show 65b7d7e:kernels/gpu.py > old.py``), imported beside the current one
(against the current package) for its ``stage_chunks``: both versions stage the same bytes,
interleaved call by call, so host speed and code can be told apart.

Data: the synthetic Llama-3-8B-shaped KV and profile of benchmarks/gpu_codec.py, level 2, chunks
encoded by the GPU encoder; chunk 0 holds the 4 raw sink rows, chunk 1 none.

Reported: host facts (CPU model, cores, load, one-thread copy and CRC-32 rates); per chunk and lane count
the phases of ``decode_staged`` as the host sees them (metadata prepared and uploaded, each launch call,
raw rows, the final synchronisation), ``decode_staged`` and ``decode_chunks_gpu`` wall time, both
kernels by CUDA events; staging of 1 and 8 chunks by each ``gpu.py`` version.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from benchmarks.gpu_codec import CHUNK, SHAPES, events, make_profile, synthetic_kv, wall
from kvwire.kernels import codec, gpu, gpu_encode
from kvwire.kernels import format as fmt
from kvwire.kernels.profile import CalibrationProfile


def host_facts() -> list[str]:
    """CPU model, cores usable, load, and one-thread copy and CRC-32 rates on 16 MiB."""
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    src = np.random.default_rng(0).integers(0, 255, 16 << 20, dtype=np.uint8)
    dst = np.empty_like(src)
    t_copy = wall(lambda: np.copyto(dst, src), 9)
    t_crc = wall(lambda: fmt.crc32(src.data), 9)
    t_zlib = wall(lambda: zlib.crc32(src.data), 5)
    n = src.size / 1e9
    return [
        f"- host: {model}; {os.cpu_count()} logical CPUs, {len(os.sched_getaffinity(0))} usable; "
        f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}",
        f"- one thread, 16 MiB: copy {n / t_copy:.1f} GB/s, CRC-32 ({fmt.crc32.__module__}) "
        f"{n / t_crc:.1f} GB/s, zlib CRC-32 {n / t_zlib:.1f} GB/s",
    ]


def decode_phases(staged: gpu.StagedBatch, profile: CalibrationProfile, reps: int) -> dict[str, float]:
    """Median host seconds of each step of ``decode_staged`` (fused path), run as it runs them: the time
    a step's call takes on the host, the last one including the wait for the device."""
    keys = ("prepare", "launch rANS", "launch recon", "raw rows", "sync", "total")
    got: dict[str, list[float]] = {k: [] for k in keys}
    for rep in range(reps + 2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        batch = gpu.prepare_decode(staged, profile)
        t1 = time.perf_counter()
        gpu.launch_decode(batch)
        t2 = time.perf_counter()
        outs = gpu.launch_reconstruct(batch)
        t3 = time.perf_counter()
        for i, out in enumerate(outs):
            gpu._overwrite_raw_staged(out, staged, i, batch.raw_rows[i])
        t4 = time.perf_counter()
        gpu.check_status(batch)
        t5 = time.perf_counter()
        if rep >= 2:
            for k, v in zip(keys, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t5 - t0), strict=True):
                got[k].append(v)
    return {k: statistics.median(v) for k, v in got.items()}


def _checksum_and_copy_all(views: list[memoryview], host: np.ndarray) -> None:
    """Staging's threaded CRC + copy of whole chunks into pinned memory, run to the end."""
    list(gpu._checksum_and_copy(views, [0, len(views[0])], host))


def load_old(path: Path) -> ModuleType:
    """An older ``kernels/gpu.py`` as its own module (``kvwire.kernels._gpu_old``), on the current package."""
    spec = importlib.util.spec_from_file_location("kvwire.kernels._gpu_old", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def staging_ab(
    versions: dict[str, Callable[..., object]], streams: list[bytes], profile: CalibrationProfile, reps: int
) -> list[str]:
    """Each version's ``stage_chunks`` on the same 1 and 8 chunks, interleaved call by call (so drift in
    the host's speed hits every version alike): median and minimum ms."""
    dev = torch.device("cuda")
    lines = ["| version | chunks | MB | median ms | min ms | GB/s (median) |", "|---|---|---|---|---|---|"]
    for b in (1, 8):
        part = streams[:b]
        times: dict[str, list[float]] = {k: [] for k in versions}
        for rep in range(reps + 2):
            for name, stage in versions.items():
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                stage(part, profile, dev)
                torch.cuda.synchronize()
                if rep >= 2:
                    times[name].append(time.perf_counter() - t0)
        mb = sum(len(x) for x in part) / 1e6
        for name, ts in times.items():
            med = statistics.median(ts)
            lines.append(
                f"| {name} | {b} | {mb:.1f} | {med * 1e3:.3f} | {min(ts) * 1e3:.3f} | {mb / 1e3 / med:.1f} |"
            )
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--old", nargs="*", default=[], help="older kernels/gpu.py copies to stage with")
    parser.add_argument("--reps", type=int, default=21)
    args = parser.parse_args()
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(0)
    lines = [
        "# One-chunk GPU decode latency\n",
        f"{props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; Llama-3-8B shape, level 2, synthetic KV.\n",
        *host_facts(),
        "",
    ]
    print("\n".join(lines), flush=True)
    name = "Llama-3-8B"
    L, H, D, _hpg, base = SHAPES[name]
    profile = make_profile(name)
    kv = synthetic_kv(L, H, CHUNK * 8, D, base, seed=2, device="cuda").to(torch.bfloat16)
    ctx = gpu_encode.chunk_view(kv, CHUNK)
    starts = [CHUNK * j for j in range(8)]
    streams = {
        lanes: [
            bytes(e.data)
            for e in gpu_encode.encode_batch_gpu(
                ctx, profile, level=2, token_starts=starts, lanes=lanes
            ).chunks()
        ]
        for lanes in (32, 128)
    }
    del kv, ctx
    lines += [
        "## decode_staged, step by step (host wall ms, medians)\n",
        "| chunk | lanes | prepare | launch rANS | launch recon | raw rows | sync | total "
        "| decode_staged | kernels (events) | decode_chunks_gpu | stage_chunks | validate | CRC + copy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lanes in (32, 128):
        for c in (0, 1):
            one = streams[lanes][c : c + 1]
            staged = gpu.stage_chunks(one, profile, dev)
            ph = decode_phases(staged, profile, args.reps)
            t_dev = wall(functools.partial(gpu.decode_staged, staged, profile), args.reps, warm=2)
            batch = gpu.prepare_decode(staged, profile)
            t_k = events(functools.partial(gpu.launch_kernels, batch), args.reps)
            e2e = functools.partial(gpu.decode_chunks_gpu, one, profile, device=dev)
            t_e2e = wall(e2e, args.reps, warm=2)
            t_stage = wall(functools.partial(gpu.stage_chunks, one, profile, dev), args.reps, warm=2)
            t_valid = wall(
                functools.partial(codec.validate_chunk, one[0], profile, verify_crc=False), args.reps
            )
            views = [memoryview(one[0])]
            host = torch.empty(len(one[0]), dtype=torch.uint8, pin_memory=True).numpy()
            t_crc = wall(functools.partial(_checksum_and_copy_all, views, host), args.reps)
            cells = " | ".join(f"{ph[k] * 1e3:.3f}" for k in ph)
            lines.append(
                f"| {c} | {lanes} | {cells} | {t_dev * 1e3:.3f} | {t_k * 1e3:.3f} | {t_e2e * 1e3:.3f} "
                f"| {t_stage * 1e3:.3f} | {t_valid * 1e3:.3f} | {t_crc * 1e3:.3f} |"
            )
            print(lines[-1], flush=True)
            del staged, batch
    versions: dict[str, Callable[..., object]] = {"current": gpu.stage_chunks}
    for i, path in enumerate(args.old):
        versions[f"{Path(path).stem}" if Path(path).stem not in versions else f"old{i}"] = load_old(
            Path(path)
        ).stage_chunks
    lines += ["", "## stage_chunks by gpu.py version, interleaved (wall ms)\n"]
    lines += staging_ab(versions, streams[32], profile, args.reps)
    lines += ["", *host_facts()]  # again after the runs: did the host's speed move?
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_latency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
