"""Decision time of the streaming controller: how long one `Controller.decide()` takes, per policy.

The client calls `decide()` once per chunk on its critical path, so a decision must cost far less than a
chunk's transfer. Measured here: decisions with N chunks still to decide (N = 8, 32, 128, 512; the
first decision of an N-chunk context is the most expensive one of the request), over random scenarios
drawn from the simulation's setting (benchmarks/controller_sim.py: 256-token chunks, four levels, 0.4 ms
per token to recompute, 5 ms to decode a chunk): predicted throughput log-uniform in 0.2-8 Gbit/s, an SLO
of 1.5 s per 32 chunks, 0-30% of it already elapsed, the device busy for 0-50 ms. That mixes SLOs met
at the prediction (the robust policy's drop insurance) and missed (its planning for a rise).

Reported per (policy, N): median, 99th percentile and max of the thread CPU time of one `decide()`
(`time.thread_time`: on a loaded machine, wall time also counts waiting for a core), and the median wall
time. One untimed decision per (policy, N) comes first, so the table shows steady-state decisions; the
first decision of a process also loads the compiled planning kernels (numba's on-disk cache, or a
compile of several seconds when there is none yet), which is reported once, as "first call".

    python benchmarks/controller_speed.py [--chunks 8 32 128 512] [--reps 200 100 40 10] [--markdown]
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.controller_sim import SimConfig
from kvwire.controller import POLICIES, Controller, Mode, Policy, ThroughputEstimator

BYTES_PER_GBPS = 1e9 / 8
DEFAULT_CHUNKS = (8, 32, 128, 512)
DEFAULT_REPS = (200, 100, 40, 10)


@dataclass(frozen=True)
class Timing:
    policy: str
    chunks: int
    reps: int
    median_cpu_ms: float
    p99_cpu_ms: float
    max_cpu_ms: float
    median_wall_ms: float


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty sample."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def time_decisions(policy: Policy, num_chunks: int, reps: int, seed: int) -> Timing:
    """Time `reps` decisions with `num_chunks` chunks left, one fresh controller (and scenario) each."""
    rng = random.Random(seed)
    config = SimConfig(num_chunks=num_chunks)
    context = config.context()
    slo_s = config.slo_s * num_chunks / 32
    cpu: list[float] = []
    wall: list[float] = []
    for rep in range(reps + 1):
        rate = BYTES_PER_GBPS * math.exp(rng.uniform(math.log(0.2), math.log(8.0)))
        elapsed = rng.uniform(0.0, 0.3) * slo_s
        busy = rng.uniform(0.0, 0.05)
        controller = Controller(
            context,
            Mode.adaptive(slo_s),
            config.costs,
            policy=policy,
            estimator=ThroughputEstimator(prior_bytes_per_s=rate),
        )
        cpu_start, wall_start = time.thread_time(), time.perf_counter()
        controller.decide(elapsed, compute_free_s=elapsed + busy)
        if rep > 0:  # the first one is the warm-up
            cpu.append(time.thread_time() - cpu_start)
            wall.append(time.perf_counter() - wall_start)
    return Timing(
        policy=policy,
        chunks=num_chunks,
        reps=reps,
        median_cpu_ms=1e3 * statistics.median(cpu),
        p99_cpu_ms=1e3 * percentile(cpu, 99),
        max_cpu_ms=1e3 * max(cpu),
        median_wall_ms=1e3 * statistics.median(wall),
    )


def time_first_call() -> float:
    """Wall seconds of the process's first adaptive decision (robust policy, 4 chunks)."""
    context = SimConfig(num_chunks=4).context()
    controller = Controller(
        context, Mode.adaptive(0.5), SimConfig().costs, estimator=ThroughputEstimator(prior_bytes_per_s=1e8)
    )
    start = time.perf_counter()
    controller.decide(0.0)
    return time.perf_counter() - start


def format_rows(rows: Sequence[Timing], markdown: bool) -> str:
    header = ("policy", "chunks", "reps", "median CPU ms", "p99 CPU ms", "max CPU ms", "median wall ms")
    cells = [
        (
            r.policy,
            str(r.chunks),
            str(r.reps),
            f"{r.median_cpu_ms:.3f}",
            f"{r.p99_cpu_ms:.3f}",
            f"{r.max_cpu_ms:.3f}",
            f"{r.median_wall_ms:.3f}",
        )
        for r in rows
    ]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(lines)
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(c, widths, strict=True)) for c in cells]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, nargs="*", default=list(DEFAULT_CHUNKS))
    parser.add_argument(
        "--reps", type=int, nargs="*", default=list(DEFAULT_REPS), help="decisions timed, per --chunks entry"
    )
    parser.add_argument("--policies", nargs="*", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    if len(args.reps) != len(args.chunks) or min(args.chunks + args.reps, default=1) < 1:
        parser.error("give one positive --reps entry per positive --chunks entry")
    first = time_first_call()
    print(f"first call in this process (loads or compiles the planning kernels): {1e3 * first:.1f} ms wall")
    rows = [
        time_decisions(policy, chunks, reps, args.seed)
        for policy in args.policies
        for chunks, reps in zip(args.chunks, args.reps, strict=True)
    ]
    print(format_rows(rows, args.markdown))


if __name__ == "__main__":
    main()
