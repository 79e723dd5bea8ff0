"""Controller policies: properties checked against brute force over small manifests."""

from __future__ import annotations

import itertools
import logging

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kvwire.controller import (
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
from kvwire.errors import InvalidInputError

from .conftest import LEVELS, costs_st, manifests, rate_st


def plan_time(chunks, plan: list[tuple[str, int | None]], costs: CostModel, rate: float, now: float) -> float:
    stages = []
    for chunk, (kind, level) in zip(chunks, plan, strict=True):
        if kind == "text":
            nbytes = chunk.num_tokens * costs.text_bytes_per_token
            stages.append(
                (costs.request_overhead_s + nbytes / rate, chunk.num_tokens * costs.recompute_s_per_token)
            )
        else:
            assert level is not None
            stages.append(
                (costs.request_overhead_s + chunk.level_bytes[level] / rate, costs.decode_s_per_chunk)
            )
    return pipeline_completion(now, now, stages)


def all_plans(chunks) -> list[list[tuple[str, int | None]]]:
    per_chunk: list[tuple[str, int | None]] = [("text", None)] + [("kv", lv) for lv in LEVELS]
    return [list(p) for p in itertools.product(per_chunk, repeat=len(chunks))]


def as_plan(decisions: list[Decision]) -> list[tuple[str, int | None]]:
    return [(d.kind, d.level) for d in decisions]


def loss(plan: list[tuple[str, int | None]]) -> int:
    return sum(0 if kind == "text" else LEVELS.index(level) for kind, level in plan)


@settings(max_examples=150, deadline=None)
@given(chunks=manifests(), costs=costs_st, rate=rate_st, slo=st.floats(0.001, 5.0), now=st.floats(0, 1.0))
def test_lookahead_meets_slo_whenever_a_plan_can(chunks, costs, rate, slo, now) -> None:
    decisions = plan_remaining(chunks, LEVELS, costs, elapsed_s=now, bytes_per_s=rate, slo_s=slo)
    plan = as_plan(decisions)
    predicted = plan_time(chunks, plan, costs, rate, now)
    assert decisions[0].predicted_completion_s == pytest.approx(predicted)
    times = [plan_time(chunks, p, costs, rate, now) for p in all_plans(chunks)]
    feasible = [p for p, t in zip(all_plans(chunks), times, strict=True) if t <= slo]
    if feasible:
        assert predicted <= slo
        assert decisions[0].reason.startswith("lookahead: best plan")
    else:
        # No plan meets the SLO: the plan is the fastest there is (exact DP).
        assert predicted == pytest.approx(min(times), rel=1e-9)
        assert "infeasible" in decisions[0].reason
    first = choose_next(
        chunks, LEVELS, Mode.adaptive(slo), costs, elapsed_s=now, bytes_per_s=rate, policy="lookahead"
    )
    assert (first.kind, first.level) == plan[0]


@settings(max_examples=150, deadline=None)
@given(chunks=manifests(), costs=costs_st, rate=rate_st, slo=st.floats(0.001, 5.0))
def test_lookahead_never_plans_worse_than_cachegen_uniform_plan(chunks, costs, rate, slo) -> None:
    plan = as_plan(plan_remaining(chunks, LEVELS, costs, elapsed_s=0.0, bytes_per_s=rate, slo_s=slo))
    for level in LEVELS:
        uniform: list[tuple[str, int | None]] = [("kv", level)] * len(chunks)
        if plan_time(chunks, uniform, costs, rate, 0.0) <= slo:
            assert loss(plan) <= loss(uniform)
            break


@settings(max_examples=150, deadline=None)
@given(
    chunks=manifests(),
    costs=costs_st,
    rate=rate_st,
    factor=st.floats(1.0, 100.0),
    slo=st.floats(0.001, 5.0),
)
def test_more_bandwidth_never_lowers_planned_quality(chunks, costs, rate, factor, slo) -> None:
    slow = plan_remaining(chunks, LEVELS, costs, elapsed_s=0.0, bytes_per_s=rate, slo_s=slo)
    fast = plan_remaining(chunks, LEVELS, costs, elapsed_s=0.0, bytes_per_s=rate * factor, slo_s=slo)
    assume("infeasible" not in slow[0].reason)  # an infeasible plan optimises speed, not quality
    assert loss(as_plan(fast)) <= loss(as_plan(slow))


@settings(max_examples=100, deadline=None)
@given(chunks=manifests(), costs=costs_st, rate=rate_st, slo=st.floats(0.001, 5.0))
def test_cachegen_rule(chunks, costs, rate, slo) -> None:
    d = choose_next(
        chunks, LEVELS, Mode.adaptive(slo), costs, elapsed_s=0.0, bytes_per_s=rate, policy="cachegen"
    )
    uniform_times = {lv: plan_time(chunks, [("kv", lv)] * len(chunks), costs, rate, 0.0) for lv in LEVELS}
    fitting = [lv for lv in LEVELS if uniform_times[lv] <= slo]
    if fitting:
        assert (d.kind, d.level) == ("kv", fitting[0])
    else:
        text_time = plan_time(chunks, [("text", None)] * len(chunks), costs, rate, 0.0)
        fastest = ("text", None) if text_time < uniform_times[LEVELS[-1]] else ("kv", LEVELS[-1])
        assert (d.kind, d.level) == fastest


@settings(max_examples=50, deadline=None)
@given(chunks=manifests(), costs=costs_st, rate=st.one_of(st.none(), rate_st), level=st.sampled_from(LEVELS))
def test_fixed_modes_are_fixed(chunks, costs, rate, level) -> None:
    for start in range(len(chunks)):
        d = choose_next(
            chunks[start:], LEVELS, Mode.fixed_level(level), costs, elapsed_s=9.0, bytes_per_s=rate
        )
        assert (d.kind, d.level, d.chunk_index) == ("kv", level, start)
        assert d.expected_bytes == chunks[start].level_bytes[level]
        t = choose_next(chunks[start:], LEVELS, Mode.text(), costs, elapsed_s=9.0, bytes_per_s=rate)
        assert (t.kind, t.level, t.expected_bytes) == ("text", None, chunks[start].num_tokens * 4)


def test_text_fallback_at_low_bandwidth_and_best_level_at_high() -> None:
    chunks = tuple(ChunkOption(i, 256, {0: 8_000_000, 1: 4_000_000, 2: 2_000_000}) for i in range(8))
    costs = CostModel(recompute_s_per_token=1e-4, decode_s_per_chunk=0.002)
    for policy in ("cachegen", "lookahead", "robust"):
        low = choose_next(
            chunks, LEVELS, Mode.adaptive(0.5), costs, elapsed_s=0, bytes_per_s=1e6, policy=policy
        )
        assert low.kind == "text"
        high = choose_next(
            chunks, LEVELS, Mode.adaptive(0.5), costs, elapsed_s=0, bytes_per_s=1e10, policy=policy
        )
        assert (high.kind, high.level) == ("kv", 0)


def test_controller_logs_returns_and_learns(caplog: pytest.LogCaptureFixture) -> None:
    chunks = tuple(ChunkOption(i, 256, {0: 4_000_000, 1: 2_000_000, 2: 1_000_000}) for i in range(4))
    context = ContextOptions(LEVELS, chunks)
    estimator = ThroughputEstimator(prior_bytes_per_s=1e7)
    controller = Controller(
        context,
        Mode.adaptive(1.0),
        CostModel(recompute_s_per_token=1.0),
        policy="lookahead",
        estimator=estimator,
    )
    caplog.set_level(logging.INFO, logger="kvwire.controller")
    elapsed = 0.0
    while not controller.done:
        d = controller.decide(elapsed)
        seconds = d.expected_bytes / 2e7  # the link is twice as fast as the prior
        controller.record_transfer(d.expected_bytes, seconds)
        elapsed += seconds
    assert [d.chunk_index for d in controller.decisions] == [0, 1, 2, 3]
    # Planned at the prior (10 MB/s) the first chunk is L1; the faster link is learned and spent on quality.
    levels = [d.level for d in controller.decisions]
    assert levels[0] == 1 and levels[-1] == 0 and levels == sorted(levels, reverse=True)  # type: ignore[type-var]
    assert elapsed <= 1.0
    assert len([r for r in caplog.records if "chunk" in r.getMessage()]) == 4
    with pytest.raises(InvalidInputError):
        controller.decide(elapsed)


def test_fixed_mode_controller_needs_no_throughput() -> None:
    chunks = (ChunkOption(0, 10, {0: 100, 1: 50}),)
    controller = Controller(ContextOptions((0, 1), chunks), Mode.fixed_level(1), CostModel(1e-4))
    assert controller.decide(0.0).level == 1


def test_estimator() -> None:
    est = ThroughputEstimator(window=3)
    assert not est.can_predict
    with pytest.raises(InvalidInputError):
        est.predict()
    for nbytes in (100, 100, 100, 100):
        est.add_sample(nbytes, 1.0)
    assert est.predict() == pytest.approx(100)
    est.add_sample(100_000, 1.0)  # one fast outlier barely moves the harmonic mean
    assert est.predict() < 150
    est.add_sample(10, 1.0)  # a slow sample pulls it down hard
    assert est.predict() < 30
    last = ThroughputEstimator(method="last", safety=0.5)
    last.add_sample(1000, 2.0)
    assert last.predict() == 250
    for bad in (
        {"window": 0},
        {"safety": 0.0},
        {"safety": 1.5},
        {"method": "mean"},
        {"prior_bytes_per_s": -1},
    ):
        with pytest.raises(InvalidInputError):
            ThroughputEstimator(**bad)
    with pytest.raises(InvalidInputError):
        est.add_sample(0, 1.0)


def test_bad_inputs_rejected() -> None:
    chunk = ChunkOption(0, 10, {0: 100})
    costs = CostModel(1e-4)
    with pytest.raises(InvalidInputError):
        choose_next([], (0,), Mode.text(), costs, elapsed_s=0, bytes_per_s=1.0)
    with pytest.raises(InvalidInputError):
        choose_next([chunk], (0,), Mode.adaptive(1.0), costs, elapsed_s=0, bytes_per_s=None)
    with pytest.raises(InvalidInputError):
        choose_next([chunk], (0,), Mode.adaptive(1.0), costs, elapsed_s=-1, bytes_per_s=1.0)
    with pytest.raises(InvalidInputError):
        choose_next([chunk], (0,), Mode.fixed_level(3), costs, elapsed_s=0, bytes_per_s=1.0)
    with pytest.raises(InvalidInputError):
        choose_next([chunk], (0,), Mode.adaptive(1.0), costs, elapsed_s=0, bytes_per_s=1.0, policy="bola")  # type: ignore[arg-type]
    for bad in (
        lambda: Mode.adaptive(0),
        lambda: CostModel(-1.0),
        lambda: ChunkOption(0, 0, {0: 1}),
        lambda: ChunkOption(0, 1, {}),
        lambda: ContextOptions((0, 1), (chunk,)),
        lambda: ContextOptions((), ()),
        lambda: ContextOptions((0,), (ChunkOption(1, 1, {0: 1}),)),
    ):
        with pytest.raises(InvalidInputError):
            bad()


def test_floor_insurance_lowers_the_next_chunk() -> None:
    # 8 chunks; at 1 GB/s level 0 fits easily, but if the link fell to 10 MB/s right after a level-0
    # chunk, no continuation would make the deadline: the insured choice is smaller. (Recompute is too
    # slow for text to be an option.)
    chunks = tuple(ChunkOption(i, 256, {0: 8_000_000, 1: 2_000_000, 2: 500_000}) for i in range(8))
    costs = CostModel(recompute_s_per_token=1e-2)
    kwargs = {"elapsed_s": 0.0, "bytes_per_s": 1e9, "policy": "lookahead"}
    plain = choose_next(chunks, LEVELS, Mode.adaptive(1.0), costs, **kwargs)  # type: ignore[arg-type]
    insured = choose_next(chunks, LEVELS, Mode.adaptive(1.0, floor_bytes_per_s=1e7), costs, **kwargs)  # type: ignore[arg-type]
    assert (plain.kind, plain.level) == ("kv", 0)
    assert insured.kind == "kv" and insured.level is not None and insured.level > 0
    assert "insured" in insured.reason
    worst = pipeline_completion(0.0, 0.0, [(insured.expected_bytes / 1e7, 0.0)] + [(5e5 / 1e7, 0.0)] * 7)
    assert worst <= 1.0


def test_margin_plans_against_a_shorter_deadline() -> None:
    chunks = tuple(ChunkOption(i, 256, {0: 4_000_000, 1: 2_000_000, 2: 1_000_000}) for i in range(4))
    costs = CostModel(recompute_s_per_token=1.0)
    plan = plan_remaining(chunks, LEVELS, costs, elapsed_s=0.0, bytes_per_s=1e7, slo_s=0.8)
    d = choose_next(
        chunks,
        LEVELS,
        Mode.adaptive(1.0, margin=0.2),
        costs,
        elapsed_s=0.0,
        bytes_per_s=1e7,
        policy="lookahead",
    )
    assert (d.kind, d.level) == (plan[0].kind, plan[0].level)
    assert d.predicted_completion_s is not None and d.predicted_completion_s <= 0.8
    with pytest.raises(InvalidInputError):
        Mode.adaptive(1.0, margin=1.0)
    with pytest.raises(InvalidInputError):
        Mode.adaptive(1.0, floor_bytes_per_s=0.0)


def test_robust_estimator_discounts_by_recent_error() -> None:
    est = ThroughputEstimator(method="robust", window=4, prior_bytes_per_s=100.0)
    est.add_sample(100, 1.0)
    assert est.predict() == pytest.approx(100.0)  # prediction was exact: no discount
    est.add_sample(50, 1.0)  # predicted 100, got 50: error 1.0
    assert est.predict() == pytest.approx((2 / (1 / 100 + 1 / 50)) / 2)


def test_warm_up_runs_every_policy_once_per_process() -> None:
    from kvwire import controller

    controller.warm_up.cache_clear()
    controller.warm_up()
    controller.warm_up()
    assert controller.warm_up.cache_info().misses == 1
