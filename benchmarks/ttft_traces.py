"""SLO-met rate and mean quality level of adaptive loads through the real client under time-varying links.

The end-to-end counterpart of benchmarks/controller_sim.py: the same named bandwidth traces, but each
run is a real ``Client.load`` in adaptive mode over REST on loopback against an in-process service
(as benchmarks/ttft.py), with the trace in the transport's token bucket and real decoding on this
machine. Per trace, ``--runs`` start phases are drawn as the simulation draws them (a random offset
into the trace, within the first second for the step traces); every policy sees the same phases:

- ``robust``: the default policy (``policy="robust"``, harmonic-mean estimator);
- ``cachegen``: CacheGen's rule (``policy="cachegen"``) with the last-sample estimator, as in the
  simulation.

A phase is *feasible* when a clairvoyant plan could meet the SLO: the simulation's hindsight-fastest
plan (each chunk as text or at the smallest level, knowing the trace) with the device costs this
machine showed during that phase's loads (mean decode time per KV chunk, mean recompute time per
token; the costs measured before the runs where a phase recomputed nothing). It is a model of the
pipeline, not a measured load: on a machine whose speed wanders, it is an estimate.

Every adaptive load starts from the trace's rate at its start phase (as if probed, as in the
simulation). The SLO is on the load (``LoadedContext.slo_met``: request to cache ready), the part the
controller plans; the question's own prefill is the same for every plan and is left out. Unless
``--slo`` fixes it, each phase's SLO is ``--slo-factor`` times an unthrottled level-0 load measured just
before the phase: on a shared machine whose CPU speed wanders several-fold within minutes, a fixed SLO
measures the machine's load rather than the policy's handling of the link.

The traces' rates are multiplied by ``--trace-scale`` (default 0.15): SmolLM2-135M's KV is 4.9 KB per
token at level 0, the simulation's 7B-class model 32 KB, so 0.15 puts the same link pressure on the small
model as the unscaled traces put on a 7B one (at scale 1 every trace is far faster than this CPU decodes).

    python benchmarks/ttft_traces.py --tokens 2048 --runs 10 --out docs/ttft-traces.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.controller_sim import START_WINDOW_S, hindsight_fastest_s  # noqa: E402
from benchmarks.ttft import TEXTS, start_service  # noqa: E402
from kvwire.client import Client  # noqa: E402
from kvwire.client.loader import context_options  # noqa: E402
from kvwire.client.throttle import BandwidthTrace, TokenBucket  # noqa: E402
from kvwire.controller import CostModel, Mode, ThroughputEstimator  # noqa: E402
from kvwire.model import text_tokens  # noqa: E402

TRACES = ("step-down", "fluctuating", "lte-like")
POLICIES = ("robust", "cachegen")


@dataclass
class Run:
    """One adaptive load: which phase of which trace, the policy, and what it cost and chose."""

    trace: str
    phase: int
    offset_s: float
    policy: str
    load_s: float
    slo_met: bool
    mean_level: float  # text counted as 0 (recompute is exact)
    text_chunks: int
    choices: str
    mb: float
    decode_s: float | None  # mean decode time of this load's KV chunks
    recompute_s_per_token: float | None  # mean recompute time per token of its text chunks
    slo_s: float
    reference_s: float  # the unthrottled level-0 load just before this phase
    feasible: bool = True  # could a clairvoyant plan meet the SLO in this phase (see the module doc)


def scaled(trace: BandwidthTrace, scale: float) -> BandwidthTrace:
    """``trace`` with every rate multiplied by ``scale`` (same timing)."""
    return BandwidthTrace(
        [(d, g * scale) for d, g in trace.segments], loop=trace.loop, name=f"{trace.name}x{scale:g}"
    )


def load_once(
    client: Client, model: Any, tokenizer: Any, context_id: str, trace: BandwidthTrace, policy: str,
    slo_s: float,
) -> Any:  # fmt: skip
    """One load with the link starting at ``trace``'s time 0 (a fresh bucket on the same client,
    which keeps the decode cost it measured on earlier loads)."""
    client.set_throttle(TokenBucket(trace=trace, burst_bytes=64 * 1024))
    prior = trace.rate_at(0.0)
    estimator = ThroughputEstimator(
        method="last" if policy == "cachegen" else "harmonic", prior_bytes_per_s=prior
    )
    return client.load(
        model, context_id, tokenizer=tokenizer, mode=Mode.adaptive(slo_s), policy=policy,  # type: ignore[arg-type]
        estimator=estimator, bandwidth_hint_bytes_per_s=prior,
    )  # fmt: skip


def run(args: argparse.Namespace) -> tuple[list[Run], dict[str, Any]]:
    from kvwire.calibration import load_or_calibrate
    from kvwire.model import load_model

    model, tokenizer = load_model(args.model)
    profile = load_or_calibrate(model, tokenizer)
    runs: list[Run] = []
    meta: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kvwire-traces-") as tmp:
        service, server, url = start_service(model, tokenizer, profile, tmp)
        try:
            ids = text_tokens(tokenizer, TEXTS, args.tokens)
            manifest = service.ingest("default", token_ids=ids, context_id="ctx-traces")
            with Client(url, timeout_s=300) as client:
                # Warm-up, unthrottled: the client measures recompute and decode costs on this machine.
                for mode in (Mode.fixed_level(0), Mode.adaptive(60.0)):
                    client.load(model, manifest.context_id, tokenizer=tokenizer, mode=mode)
                fast = [
                    client.load(model, manifest.context_id, tokenizer=tokenizer, mode=Mode.fixed_level(0))
                    for _ in range(2)
                ]
                unthrottled_s = statistics.median(x.timings.total_s for x in fast)
                costs = client.measure_costs(model)
                meta = {
                    "tokens": len(ids), "chunks": len(manifest.chunks), "slo": args.slo or
                    f"{args.slo_factor} x an unthrottled L0 load just before each phase",
                    "unthrottled_L0_load_s_at_start": unthrottled_s,
                    "recompute_s_per_chunk": costs.recompute_s_per_token * manifest.chunk_tokens,
                    "decode_s_per_chunk": costs.decode_s_per_chunk,
                    "level_mb": {
                        lv: sum(c.level(lv).nbytes for c in manifest.chunks) / 1e6 for lv in manifest.levels
                    },
                }  # fmt: skip
                print(f"setup: {json.dumps(meta)}", flush=True)
                for name in args.traces:
                    base = scaled(BandwidthTrace.named(name), args.trace_scale)
                    rng = random.Random(f"{args.seed}:{name}")
                    window = START_WINDOW_S.get(name, base.duration_s)
                    for phase in range(args.runs):
                        offset = rng.uniform(0.0, window)
                        trace = base.shifted(offset)
                        # The reference load (unthrottled, level 0) also leaves its decode cost in the
                        # client, which the adaptive loads of this phase start from.
                        client.set_throttle(None)
                        ref_s = client.load(
                            model, manifest.context_id, tokenizer=tokenizer, mode=Mode.fixed_level(0)
                        ).timings.total_s
                        slo_s = args.slo or args.slo_factor * ref_s
                        costs = client.measure_costs(model)
                        phase_runs = []
                        for policy in args.policies:
                            loaded = load_once(
                                client, model, tokenizer, manifest.context_id, trace, policy, slo_s
                            )
                            levels = [0 if r.kind == "text" else int(r.level or 0) for r in loaded.chunks]
                            kv = [r.compute_s for r in loaded.chunks if r.kind == "kv"]
                            text = [(r.compute_s, r.n_tokens) for r in loaded.chunks if r.kind == "text"]
                            row = Run(
                                name, phase, offset, policy, loaded.timings.total_s,
                                loaded.timings.total_s <= slo_s, statistics.fmean(levels),
                                sum(r.kind == "text" for r in loaded.chunks),
                                "".join("T" if r.kind == "text" else str(r.level) for r in loaded.chunks),
                                sum(r.nbytes for r in loaded.chunks) / 1e6,
                                statistics.fmean(kv) if kv else None,
                                sum(t for t, _ in text) / sum(n for _, n in text) if text else None,
                                slo_s, ref_s,
                            )  # fmt: skip
                            phase_runs.append(row)
                            print(
                                f"{name:<12} phase {phase:>2} @{offset:6.2f}s SLO {slo_s:5.2f} s {policy:<9} "
                                f"load {row.load_s:6.2f} s {'met ' if row.slo_met else 'MISS'} "
                                f"lvl {row.mean_level:.2f} {row.choices}",
                                flush=True,
                            )
                        feasible = phase_feasible(phase_runs, manifest, trace, slo_s, costs)
                        for row in phase_runs:
                            row.feasible = feasible
                        runs += phase_runs
                        save(runs, meta, args)
        finally:
            server.should_exit = True
            service.close()
    return runs, meta


def phase_feasible(
    phase_runs: list[Run], manifest: Any, trace: BandwidthTrace, slo_s: float, before: CostModel
) -> bool:
    """Whether the hindsight-fastest plan meets the SLO on ``trace`` with the costs of these loads."""
    decode = [r.decode_s for r in phase_runs if r.decode_s is not None]
    recompute = [r.recompute_s_per_token for r in phase_runs if r.recompute_s_per_token is not None]
    costs = CostModel(
        recompute_s_per_token=statistics.fmean(recompute) if recompute else before.recompute_s_per_token,
        decode_s_per_chunk=statistics.fmean(decode) if decode else before.decode_s_per_chunk,
        request_overhead_s=before.request_overhead_s,
    )
    return hindsight_fastest_s(context_options(manifest), trace, 0.0, costs) <= slo_s


def summary(runs: list[Run]) -> list[dict[str, Any]]:
    """Per trace and policy: SLO met over all runs and over the feasible phases, mean level, text
    share, mean and worst load time."""
    out = []
    for trace in dict.fromkeys(r.trace for r in runs):
        for policy in dict.fromkeys(r.policy for r in runs if r.trace == trace):
            rows = [r for r in runs if r.trace == trace and r.policy == policy]
            ok = [r for r in rows if r.feasible]
            out.append({
                "trace": trace, "policy": policy, "runs": len(rows),
                "slo_met": sum(r.slo_met for r in rows) / len(rows),
                "feasible_runs": len(ok),
                "slo_met_feasible": sum(r.slo_met for r in ok) / len(ok) if ok else float("nan"),
                "mean_level": statistics.fmean(r.mean_level for r in rows),
                "text_share": statistics.fmean(r.text_chunks / len(r.choices) for r in rows),
                "mean_load_s": statistics.fmean(r.load_s for r in rows),
                "max_load_s": max(r.load_s for r in rows),
            })  # fmt: skip
    return out


def markdown(runs: list[Run], meta: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"- Command: `python benchmarks/ttft_traces.py {' '.join(sys.argv[1:])}`",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. Machine: "
        f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} torch threads; model "
        f"{args.model or 'SmolLM2-135M-Instruct (bundled)'}; traces x{args.trace_scale:g}.",
        f"- Setup: {json.dumps(meta)}",
        "",
        "| trace | policy | runs | SLO met | SLO met (feasible runs) | mean lvl | text | load mean "
        "| load max |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for s in summary(runs):
        lines.append(
            f"| {s['trace']} | {s['policy']} | {s['runs']} | {s['slo_met']:.0%} | "
            f"{s['slo_met_feasible']:.0%} of {s['feasible_runs']} | {s['mean_level']:.2f} | "
            f"{s['text_share']:.0%} | {s['mean_load_s']:.2f} s | {s['max_load_s']:.2f} s |"
        )
    lines += [
        "",
        "| trace | phase | offset s | SLO s | feasible | policy | load s | SLO met | mean lvl | choices "
        "| MB | decode s/chunk |",
        "|---|--:|--:|--:|---|---|--:|---|--:|---|--:|--:|",
    ]
    for r in runs:
        decode = "" if r.decode_s is None else f"{r.decode_s:.2f}"
        lines.append(
            f"| {r.trace} | {r.phase} | {r.offset_s:.2f} | {r.slo_s:.2f} | {'yes' if r.feasible else 'no'} "
            f"| {r.policy} | "
            f"{r.load_s:.2f} | {'yes' if r.slo_met else 'no'} | {r.mean_level:.2f} | {r.choices} | "
            f"{r.mb:.2f} | {decode} |"
        )
    return "\n".join(lines) + "\n"


def save(runs: list[Run], meta: dict[str, Any], args: argparse.Namespace) -> None:
    if args.out:
        args.out.write_text(markdown(runs, meta, args))
        data = {"meta": meta, "runs": [asdict(r) for r in runs], "summary": summary(runs)}
        args.out.with_suffix(".json").write_text(json.dumps(data, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=10, help="start phases per trace")
    parser.add_argument("--traces", nargs="+", default=list(TRACES))
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--trace-scale", type=float, default=0.15, help="multiply the traces' rates")
    parser.add_argument(
        "--slo",
        type=float,
        help="load SLO in seconds (default: --slo-factor x unthrottled L0 before each phase)",
    )
    parser.add_argument("--slo-factor", type=float, default=1.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", help="model path (default: bundled SmolLM2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, help="write a markdown table here (and JSON next to it)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs, meta = run(args)
    print(markdown(runs, meta, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
