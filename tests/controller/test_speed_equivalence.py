"""The compiled controller decides exactly as the plain-Python one it replaced (reference_controller.py).

Decisions are compared with `==`: same chunk, kind, level, bytes, reason, and the same floats (expected
seconds, predicted completion) to the last bit, over random manifests, level sets, costs, modes, policies,
throughputs, clocks and device backlogs, for single decisions, whole plans and whole controller runs.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from kvwire.controller import (
    POLICIES,
    ChunkOption,
    ContextOptions,
    Controller,
    CostModel,
    Decision,
    Mode,
    ThroughputEstimator,
    choose_next,
    pipeline_completion,
    plan_remaining,
)


def _load_reference():  # tests/ is not a package (pytest's importlib mode): load the file by path
    path = Path(__file__).resolve().parent / "reference_controller.py"
    spec = importlib.util.spec_from_file_location("kvwire_reference_controller", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


reference = _load_reference()


@st.composite
def manifests(
    draw: st.DrawFn, min_chunks: int = 1, max_chunks: int = 8
) -> tuple[tuple[int, ...], tuple[ChunkOption, ...]]:
    """Level ids in any order (1-4 levels), chunk sizes mostly shrinking with the level but not always
    (ties and inversions too), some short chunks."""
    levels = tuple(draw(st.lists(st.integers(0, 9), min_size=1, max_size=4, unique=True)))
    n = draw(st.integers(min_chunks, max_chunks))
    uniform = draw(st.booleans())
    base = sorted(draw(st.lists(st.integers(1_000, 3_000_000), min_size=len(levels), max_size=len(levels))))
    chunks = []
    for i in range(n):
        if uniform and i % 7:
            tokens, sizes = 256, list(reversed(base))
        else:
            tokens = draw(st.sampled_from([256, 256, 17, 100, 1]))
            sizes = draw(st.lists(st.integers(1, 3_000_000), min_size=len(levels), max_size=len(levels)))
            if draw(st.booleans()):
                sizes.sort(reverse=True)
        chunks.append(ChunkOption(i, tokens, dict(zip(sorted(levels), sizes, strict=True))))
    return levels, tuple(chunks)


costs_st = st.builds(
    CostModel,
    recompute_s_per_token=st.sampled_from([0.0, 1e-5, 1e-4, 4e-4, 2e-3]),
    decode_s_per_chunk=st.sampled_from([0.0, 0.002, 0.005, 0.02]),
    request_overhead_s=st.sampled_from([0.0, 5e-4, 0.001]),
    text_bytes_per_token=st.sampled_from([2, 4]),
)
slo_st = st.floats(0.001, 8.0)
adaptive_st = st.one_of(
    st.builds(Mode.adaptive, slo_st),
    st.builds(Mode.adaptive, slo_st, st.sampled_from([0.0, 0.1, 0.2])),
    st.builds(Mode.adaptive, slo_st, drop_factor=st.sampled_from([0.1, 0.25, 0.5, 1.0])),
    st.builds(Mode.adaptive, slo_st, floor_bytes_per_s=st.floats(1e4, 1e8)),
    st.builds(
        Mode.adaptive, slo_st, floor_bytes_per_s=st.floats(1e4, 1e8), drop_factor=st.sampled_from([0.1, 0.5])
    ),
)
rate_st = st.floats(1e4, 1e10)
clock_st = st.floats(0.0, 3.0)


@settings(max_examples=400, deadline=None)
@given(
    manifest=manifests(),
    costs=costs_st,
    mode=adaptive_st,
    rate=rate_st,
    elapsed=clock_st,
    backlog=st.one_of(st.none(), st.floats(0.0, 2.0)),
)
def test_single_decisions_match_the_reference(manifest, costs, mode, rate, elapsed, backlog) -> None:
    levels, chunks = manifest
    compute_free = None if backlog is None else elapsed + backlog
    for policy in POLICIES:
        kwargs = {"elapsed_s": elapsed, "bytes_per_s": rate, "policy": policy, "compute_free_s": compute_free}
        assert choose_next(chunks, levels, mode, costs, **kwargs) == reference.choose_next(
            chunks, levels, mode, costs, **kwargs
        )


@settings(max_examples=200, deadline=None)
@given(manifest=manifests(), costs=costs_st, rate=rate_st, slo=slo_st, elapsed=clock_st)
def test_plans_match_the_reference(manifest, costs, rate, slo, elapsed) -> None:
    levels, chunks = manifest
    kwargs = {"elapsed_s": elapsed, "bytes_per_s": rate, "slo_s": slo}
    assert plan_remaining(chunks, levels, costs, **kwargs) == reference.plan_remaining(
        chunks, levels, costs, **kwargs
    )


def reference_run(
    context: ContextOptions, mode: Mode, costs: CostModel, policy: str, samples: list[tuple[int, float]]
) -> list[Decision]:
    """`Controller`'s loop over the reference policies: decide, then feed one transfer sample."""
    estimator = ThroughputEstimator(prior_bytes_per_s=1e8)
    decisions: list[Decision] = []
    elapsed = 0.0
    for chunk_position, (nbytes, seconds) in enumerate(samples):
        remaining = context.chunks[chunk_position:]
        decision = reference.choose_next(
            remaining,
            context.levels,
            mode,
            costs,
            elapsed_s=elapsed,
            bytes_per_s=estimator.predict(),
            policy=policy,  # type: ignore[arg-type]
            compute_free_s=elapsed + 0.001 * chunk_position,
        )
        decisions.append(decision)
        estimator.add_sample(nbytes, seconds)
        elapsed += seconds
    return decisions


@settings(max_examples=120, deadline=None)
@given(
    manifest=manifests(),
    costs=costs_st,
    mode=adaptive_st,
    rates=st.lists(st.floats(1e5, 1e10), min_size=8, max_size=8),
)
def test_controller_runs_match_the_reference(manifest, costs, mode, rates) -> None:
    levels, chunks = manifest
    context = ContextOptions(levels, chunks)
    samples = [(1_000_000, 1_000_000 / rates[i % len(rates)]) for i in range(len(chunks))]
    for policy in POLICIES:
        controller = Controller(
            context, mode, costs, policy=policy, estimator=ThroughputEstimator(prior_bytes_per_s=1e8)
        )
        elapsed = 0.0
        for chunk_position, (nbytes, seconds) in enumerate(samples):
            controller.decide(elapsed, compute_free_s=elapsed + 0.001 * chunk_position)
            controller.record_transfer(nbytes, seconds)
            elapsed += seconds
        assert controller.decisions == reference_run(context, mode, costs, policy, samples)


@settings(max_examples=12, deadline=None)
@given(
    manifest=manifests(min_chunks=40, max_chunks=70),
    costs=costs_st,
    rate=st.floats(2e7, 1e9),
    slo_per_chunk=st.floats(0.01, 0.1),
)
def test_long_contexts_match_the_reference(manifest, costs, rate, slo_per_chunk) -> None:
    """Contexts long enough for the dynamic programs to thin their Pareto fronts."""
    levels, chunks = manifest
    mode = Mode.adaptive(slo_per_chunk * len(chunks))
    for policy in POLICIES:
        kwargs = {"elapsed_s": 0.01, "bytes_per_s": rate, "policy": policy, "compute_free_s": 0.05}
        assert choose_next(chunks, levels, mode, costs, **kwargs) == reference.choose_next(
            chunks, levels, mode, costs, **kwargs
        )


def test_fixed_modes_match_the_reference() -> None:
    chunks = tuple(ChunkOption(i, 256, {0: 900_000, 1: 300_000}) for i in range(3))
    costs = CostModel(recompute_s_per_token=1e-4, decode_s_per_chunk=0.002)
    for mode in (Mode.text(), Mode.fixed_level(1)):
        for rate in (None, 1e8):
            kwargs = {"elapsed_s": 0.0, "bytes_per_s": rate}
            assert choose_next(chunks, (0, 1), mode, costs, **kwargs) == reference.choose_next(
                chunks, (0, 1), mode, costs, **kwargs
            )
    assert math.isfinite(
        choose_next(chunks, (0, 1), Mode.text(), costs, elapsed_s=0, bytes_per_s=None).expected_seconds
    )


@settings(max_examples=150, deadline=None)
@given(
    manifest=manifests(max_chunks=12),
    costs=costs_st,
    rate=rate_st,
    elapsed=clock_st,
    rank=st.integers(0, 3),
    policy=st.sampled_from(POLICIES),
)
def test_deadlines_on_a_plans_exact_completion_match_the_reference(
    manifest, costs, rate, elapsed, rank, policy
) -> None:
    """The SLO is exactly the completion of a uniform-level plan (computed as the pipeline computes it),
    so the planners' trials land on the deadline to the last bit: their shortcuts must not decide
    those."""
    levels, chunks = manifest
    level = sorted(levels)[min(rank, len(levels) - 1)]
    stages = [
        (costs.request_overhead_s + c.level_bytes[level] / rate, costs.decode_s_per_chunk) for c in chunks
    ]
    slo = pipeline_completion(elapsed, elapsed, stages)
    if not (math.isfinite(slo) and slo > 0):
        return
    mode = Mode.adaptive(slo)
    kwargs = {"elapsed_s": elapsed, "bytes_per_s": rate, "policy": policy}
    assert choose_next(chunks, levels, mode, costs, **kwargs) == reference.choose_next(
        chunks, levels, mode, costs, **kwargs
    )
    plan_kwargs = {"elapsed_s": elapsed, "bytes_per_s": rate, "slo_s": slo}
    assert plan_remaining(chunks, levels, costs, **plan_kwargs) == reference.plan_remaining(
        chunks, levels, costs, **plan_kwargs
    )
