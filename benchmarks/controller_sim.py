"""Simulated streaming of one context over the named bandwidth traces: CacheGen's rule vs our policies.

Pure and fast: fake time, the trace integrated exactly (no sockets, no sleeps). Each run starts the
transfer at a random offset into a trace, lets a `Controller` decide every chunk, moves the chunk's bytes
through the trace, and pipelines compute (decode or recompute, in chunk order) behind the network, the
same two-stage model the controller plans with. Reported per (trace, policy): the share of runs that met
the SLO (of all runs, and of the runs a clairvoyant plan could meet), the quality, the compute it cost, and
the mean / 95th-percentile time to first token.

How quality is scored (make sure to read this before comparing policies): levels are ranks, 0 = best KV.
A text chunk is recomputed from its tokens, which gives the exact KV, so "mean lvl" counts it as 0. That
quality is not free: it costs device time that a KV chunk does not (0.1 s per 256-token chunk here against
5 ms to decode), which a busy server would take from other requests. So the table also reports "KV lvl",
the mean level of the chunks sent as KV alone (text left out), the share of chunks sent as text, and
"recompute", the device seconds spent recomputing text per request.

    python benchmarks/controller_sim.py --runs 50 --slo 1.5 [--ablation]
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvwire.client.throttle import BYTES_PER_GBPS, NAMED_TRACES, BandwidthTrace
from kvwire.controller import (
    ChunkOption,
    ContextOptions,
    Controller,
    CostModel,
    Mode,
    Policy,
    ThroughputEstimator,
)

# Bytes per token at each level, roughly a 7B GQA model (fp16 KV is ~128 KiB/token) at CacheGen-like
# compression ratios of ~4x (level 0) to ~18x (level 3).
DEFAULT_LEVEL_BYTES_PER_TOKEN = {0: 32_000, 1: 20_000, 2: 12_000, 3: 7_000}
# Where runs may start in each trace: the step traces only matter if the step falls inside the transfer.
START_WINDOW_S = {"step-down": 1.0, "step-up": 1.0}


@dataclass(frozen=True)
class PolicyVariant:
    """A controller policy plus the throughput estimator it is paired with."""

    name: str
    policy: Policy
    estimator_method: str = "harmonic"
    window: int = 5
    safety: float = 1.0
    margin: float = 0.0
    floor_gbps: float | None = None
    drop_factor: float | None = None


DEFAULT_VARIANTS = (
    PolicyVariant("cachegen", "cachegen", estimator_method="last"),
    PolicyVariant("lookahead", "lookahead", estimator_method="harmonic"),
    PolicyVariant("robust", "robust", estimator_method="harmonic"),
)
ABLATION_VARIANTS = (
    PolicyVariant("cachegen+robust est.", "cachegen", estimator_method="robust"),
    PolicyVariant("cachegen margin 10%", "cachegen", estimator_method="last", margin=0.1),
    PolicyVariant("lookahead margin 10%", "lookahead", estimator_method="harmonic", margin=0.1),
    PolicyVariant("lookahead+conservative", "lookahead", estimator_method="conservative"),
    PolicyVariant("lookahead floor 0.2g", "lookahead", estimator_method="harmonic", floor_gbps=0.2),
    PolicyVariant("lookahead drop 0.1", "lookahead", estimator_method="harmonic", drop_factor=0.1),
    PolicyVariant("robust drop 0.25", "robust", estimator_method="harmonic", drop_factor=0.25),
    PolicyVariant("robust drop 0.15", "robust", estimator_method="harmonic", drop_factor=0.15),
    PolicyVariant("robust+conservative", "robust", estimator_method="conservative"),
)


def default_costs(recompute_s_per_token: float = 4e-4) -> CostModel:
    """Recompute at 0.4 ms/token (~3.3 s to prefill the 8K-token context: a 13B-class model, or a 7B one
    on a smaller GPU), so text alone cannot meet the default SLO; 5 ms to decode a chunk; 0.5 ms per
    request."""
    return CostModel(
        recompute_s_per_token=recompute_s_per_token, decode_s_per_chunk=0.005, request_overhead_s=5e-4
    )


@dataclass(frozen=True)
class SimConfig:
    num_chunks: int = 32
    tokens_per_chunk: int = 256
    level_bytes_per_token: dict[int, int] = field(default_factory=lambda: dict(DEFAULT_LEVEL_BYTES_PER_TOKEN))
    slo_s: float = 1.5
    costs: CostModel = field(default_factory=lambda: default_costs())
    runs: int = 30
    seed: int = 0

    def context(self) -> ContextOptions:
        chunks = tuple(
            ChunkOption(
                i,
                self.tokens_per_chunk,
                {lv: b * self.tokens_per_chunk for lv, b in self.level_bytes_per_token.items()},
            )
            for i in range(self.num_chunks)
        )
        return ContextOptions(tuple(self.level_bytes_per_token), chunks)


@dataclass(frozen=True)
class RunResult:
    ttft_s: float
    mean_level: float  # text counted as 0 (exact)
    kv_level: float | None  # mean level of the KV chunks alone; None if every chunk was text
    text_fraction: float
    recompute_s: float  # device seconds spent recomputing text chunks


@dataclass(frozen=True)
class Row:
    trace: str
    policy: str
    slo_met_rate: float
    slo_met_if_feasible: float  # among runs where a clairvoyant fastest plan meets the SLO
    feasible_runs: int
    runs: int
    mean_level: float
    kv_level: float  # mean over runs of each run's mean KV level (runs with no KV chunk left out)
    text_fraction: float
    recompute_s: float
    mean_ttft_s: float
    p95_ttft_s: float


def simulate_run(
    context: ContextOptions,
    trace: BandwidthTrace,
    start_s: float,
    variant: PolicyVariant,
    slo_s: float,
    costs: CostModel,
) -> RunResult:
    """One transfer starting `start_s` into the trace. The estimator's prior is the rate at the start
    (as if probed), the same for every policy."""
    estimator = ThroughputEstimator(
        method=variant.estimator_method,  # type: ignore[arg-type]
        window=variant.window,
        safety=variant.safety,
        prior_bytes_per_s=trace.rate_at(start_s),
    )
    controller = Controller(
        context,
        Mode.adaptive(
            slo_s,
            variant.margin,
            None if variant.floor_gbps is None else variant.floor_gbps * BYTES_PER_GBPS,
            variant.drop_factor,
        ),
        costs,
        policy=variant.policy,
        estimator=estimator,
    )
    net_s = 0.0  # time since the request started
    compute_done_s = 0.0
    levels: list[int] = []
    kv_levels: list[int] = []
    texts = 0
    recompute_s = 0.0
    for chunk in context.chunks:
        decision = controller.decide(net_s, compute_free_s=max(compute_done_s, net_s))
        begin = net_s + costs.request_overhead_s
        end = trace.time_to_send(start_s + begin, decision.expected_bytes) - start_s
        controller.record_transfer(decision.expected_bytes, max(end - begin, 1e-9))
        net_s = end
        if decision.kind == "text":
            texts += 1
            levels.append(0)
            compute_s = chunk.num_tokens * costs.recompute_s_per_token
            recompute_s += compute_s
        else:
            assert decision.level is not None
            levels.append(decision.level)
            kv_levels.append(decision.level)
            compute_s = costs.decode_s_per_chunk
        compute_done_s = max(compute_done_s, net_s) + compute_s
    return RunResult(
        compute_done_s,
        statistics.fmean(levels),
        statistics.fmean(kv_levels) if kv_levels else None,
        texts / len(context.chunks),
        recompute_s,
    )


def hindsight_fastest_s(
    context: ContextOptions, trace: BandwidthTrace, start_s: float, costs: CostModel
) -> float:
    """Earliest completion any plan could reach knowing the trace in advance: a DP over the Pareto front
    of (network done, compute done), with each chunk either text or its smallest level (the only options
    that can be fastest when decode cost does not depend on the level). Runs whose hindsight-fastest
    completion misses the SLO cannot be met by any policy."""
    smallest = max(context.levels)
    front = [(0.0, 0.0)]
    for chunk in context.chunks:
        text_bytes = chunk.num_tokens * costs.text_bytes_per_token
        options = (
            (text_bytes, chunk.num_tokens * costs.recompute_s_per_token),
            (chunk.level_bytes[smallest], costs.decode_s_per_chunk),
        )
        grown = []
        for net_done, compute_done in front:
            for nbytes, compute_s in options:
                begin = net_done + costs.request_overhead_s
                end = trace.time_to_send(start_s + begin, nbytes) - start_s
                grown.append((end, max(compute_done, end) + compute_s))
        grown.sort()
        front = []
        for state in grown:
            if not front or state[1] < front[-1][1]:
                front.append(state)
    return min(c for _, c in front)


def run_simulation(
    config: SimConfig = SimConfig(),
    traces: Sequence[str] = tuple(NAMED_TRACES),
    variants: Sequence[PolicyVariant] = DEFAULT_VARIANTS,
) -> list[Row]:
    """Every variant on the same start offsets of every trace."""
    context = config.context()
    rows = []
    for trace_name in traces:
        trace = BandwidthTrace.named(trace_name)
        rng = random.Random(f"{config.seed}:{trace_name}")
        window = START_WINDOW_S.get(trace_name, trace.duration_s)
        starts = [rng.uniform(0.0, window) for _ in range(config.runs)]
        feasible = [hindsight_fastest_s(context, trace, s, config.costs) <= config.slo_s for s in starts]
        for variant in variants:
            results = [simulate_run(context, trace, s, variant, config.slo_s, config.costs) for s in starts]
            ttfts = sorted(r.ttft_s for r in results)
            rows.append(
                Row(
                    trace=trace_name,
                    policy=variant.name,
                    slo_met_rate=sum(r.ttft_s <= config.slo_s for r in results) / len(results),
                    slo_met_if_feasible=sum(
                        r.ttft_s <= config.slo_s for r, ok in zip(results, feasible, strict=True) if ok
                    )
                    / max(1, sum(feasible)),
                    feasible_runs=sum(feasible),
                    runs=len(results),
                    mean_level=statistics.fmean(r.mean_level for r in results),
                    kv_level=statistics.fmean(
                        [r.kv_level for r in results if r.kv_level is not None] or [math.nan]
                    ),
                    text_fraction=statistics.fmean(r.text_fraction for r in results),
                    recompute_s=statistics.fmean(r.recompute_s for r in results),
                    mean_ttft_s=statistics.fmean(ttfts),
                    p95_ttft_s=ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))],
                )
            )
    return rows


def format_table(rows: Sequence[Row]) -> str:
    """The rows as a plain-text table (`format_markdown` gives the same as Markdown)."""
    header = (
        f"{'trace':<12} {'policy':<22} {'SLO met':>8} {'feasible':>13} {'mean lvl':>9} {'KV lvl':>7}"
        f" {'text':>5} {'recompute':>10} {'TTFT mean':>10} {'p95':>7}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        feasible = f"{r.slo_met_if_feasible:.0%} of {r.feasible_runs}"
        lines.append(
            f"{r.trace:<12} {r.policy:<22} {r.slo_met_rate:>8.0%} {feasible:>13}"
            f" {r.mean_level:>9.2f} {r.kv_level:>7.2f} {r.text_fraction:>5.0%} {r.recompute_s:>9.2f}s"
            f" {r.mean_ttft_s:>9.3f}s {r.p95_ttft_s:>6.3f}s"
        )
    return "\n".join(lines)


def format_markdown(rows: Sequence[Row]) -> str:
    """The same table as Markdown, for docs/controller.md."""
    lines = [
        "| trace | policy | SLO met | SLO met (feasible runs) | mean lvl | KV lvl | text | recompute"
        " | TTFT mean | p95 |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.trace} | {r.policy} | {r.slo_met_rate:.0%} | {r.slo_met_if_feasible:.0%} of"
            f" {r.feasible_runs} | {r.mean_level:.2f} | {r.kv_level:.2f} | {r.text_fraction:.0%}"
            f" | {r.recompute_s:.2f} s | {r.mean_ttft_s:.3f} s | {r.p95_ttft_s:.3f} s |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--chunks", type=int, default=32)
    parser.add_argument("--slo", type=float, default=1.5, help="TTFT target in seconds")
    parser.add_argument("--recompute-s-per-token", type=float, default=4e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--traces", nargs="*", default=list(NAMED_TRACES))
    parser.add_argument("--ablation", action="store_true", help="also run estimator/safety variants")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args(argv)
    config = SimConfig(
        num_chunks=args.chunks,
        slo_s=args.slo,
        costs=default_costs(args.recompute_s_per_token),
        runs=args.runs,
        seed=args.seed,
    )
    variants = DEFAULT_VARIANTS + (ABLATION_VARIANTS if args.ablation else ())
    print(
        f"{config.num_chunks} chunks x {config.tokens_per_chunk} tokens, SLO {config.slo_s} s, "
        f"{config.runs} runs per trace, recompute {config.costs.recompute_s_per_token:g} s/token"
    )
    rows = run_simulation(config, args.traces, variants)
    print(format_markdown(rows) if args.markdown else format_table(rows))


if __name__ == "__main__":
    main()
