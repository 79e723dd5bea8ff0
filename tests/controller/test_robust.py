"""The robust policy, the conservative estimator and drop insurance; properties shared by every policy."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kvwire.controller import (
    POLICIES,
    ROBUST_DROP_FACTOR,
    ChunkOption,
    ContextOptions,
    Controller,
    CostModel,
    Mode,
    ThroughputEstimator,
    choose_next,
    pipeline_completion,
)
from kvwire.errors import InvalidInputError

from .conftest import LEVELS, costs_st, manifests, rate_st

modes_st = st.one_of(
    st.builds(Mode.adaptive, st.floats(0.001, 5.0)),
    st.builds(Mode.adaptive, st.floats(0.001, 5.0), st.sampled_from([0.0, 0.2])),
    st.builds(Mode.adaptive, st.floats(0.001, 5.0), drop_factor=st.sampled_from([0.1, 0.5, 1.0])),
    st.builds(Mode.adaptive, st.floats(0.001, 5.0), floor_bytes_per_s=st.floats(1e4, 1e8)),
    st.just(Mode.text()),
    st.builds(Mode.fixed_level, st.sampled_from(LEVELS)),
)


def run_controller(
    chunks: tuple[ChunkOption, ...],
    mode: Mode,
    costs: CostModel,
    policy: str,
    rates: list[float],
    prior: float,
) -> tuple[Controller, float]:
    """Drive a Controller over a whole context the way a client does; the link's rate for chunk i is
    rates[i % len(rates)]. Returns the controller and the completion time of the two-stage pipeline."""
    controller = Controller(
        ContextOptions(LEVELS, chunks),
        mode,
        costs,
        policy=policy,  # type: ignore[arg-type]
        estimator=ThroughputEstimator(prior_bytes_per_s=prior),
    )
    net = compute = 0.0
    for step in range(len(chunks) + 1):  # bounded: a controller that never finishes fails here
        if controller.done:
            break
        decision = controller.decide(net, compute_free_s=max(compute, net))
        seconds = decision.expected_bytes / rates[step % len(rates)]
        controller.record_transfer(decision.expected_bytes, seconds)
        net += costs.request_overhead_s + seconds
        chunk = chunks[decision.chunk_index]
        work = (
            chunk.num_tokens * costs.recompute_s_per_token
            if decision.kind == "text"
            else costs.decode_s_per_chunk
        )
        compute = max(compute, net) + work
    return controller, compute


@settings(max_examples=120, deadline=None)
@given(
    chunks=manifests(max_chunks=5),
    costs=costs_st,
    mode=modes_st,
    policy=st.sampled_from(POLICIES),
    rates=st.lists(rate_st, min_size=1, max_size=4),
    prior=rate_st,
)
def test_every_policy_terminates_with_valid_decisions(chunks, costs, mode, policy, rates, prior) -> None:
    controller, _ = run_controller(chunks, mode, costs, policy, rates, prior)
    assert controller.done and len(controller.decisions) == len(chunks)
    for chunk, decision in zip(chunks, controller.decisions, strict=True):
        assert decision.chunk_index == chunk.index
        if decision.kind == "text":
            assert decision.level is None
            assert decision.expected_bytes == chunk.num_tokens * costs.text_bytes_per_token
        else:
            assert decision.kind == "kv" and decision.level in LEVELS
            assert decision.expected_bytes == chunk.level_bytes[decision.level]
        assert decision.expected_seconds >= 0 and decision.reason
    with pytest.raises(InvalidInputError):
        controller.decide(0.0)


def fastest_possible(chunks, costs: CostModel, rate: float) -> float:
    """Earliest completion of any plan at a constant rate (brute force over text / every level)."""
    import itertools

    per_chunk = [
        [(c.num_tokens * costs.text_bytes_per_token, c.num_tokens * costs.recompute_s_per_token)]
        + [(c.level_bytes[lv], costs.decode_s_per_chunk) for lv in LEVELS]
        for c in chunks
    ]
    return min(
        pipeline_completion(0.0, 0.0, [(costs.request_overhead_s + b / rate, w) for b, w in plan])
        for plan in itertools.product(*per_chunk)
    )


@settings(max_examples=150, deadline=None)
@given(
    chunks=manifests(max_chunks=5),
    costs=costs_st,
    rate=rate_st,
    slack=st.floats(1.000001, 3.0),  # exactly 1 would leave the plan at the mercy of float rounding
    policy=st.sampled_from(["lookahead", "robust"]),
    drop_factor=st.sampled_from([None, 0.1, 0.5]),
)
def test_accurate_prediction_and_feasible_slo_is_always_met(
    chunks, costs, rate, slack, policy, drop_factor
) -> None:
    """With a constant link whose rate the estimator knows from the start, whenever some plan meets the
    SLO the controller's real completion meets it too (the robust policy's insurance never gives up the
    predicted case)."""
    slo = fastest_possible(chunks, costs, rate) * slack
    assume(slo > 0)
    mode = Mode.adaptive(slo, drop_factor=drop_factor)
    controller, completion = run_controller(chunks, mode, costs, policy, [rate], rate)
    assert completion <= slo * (1 + 1e-9)
    assert all("infeasible" not in d.reason for d in controller.decisions)


@settings(max_examples=80, deadline=None)
@given(chunks=manifests(max_chunks=5), costs=costs_st, rate=rate_st, slo=st.floats(0.001, 5.0))
def test_robust_insures_or_is_no_less_safe_than_the_lookahead(chunks, costs, rate, slo) -> None:
    """When the robust policy changes the lookahead's choice, it keeps the deadline at the predicted
    rate and is at least as safe if the link drops to the insured floor now."""
    from kvwire.controller import _chunk_options, _worst_case

    kwargs = {"elapsed_s": 0.0, "bytes_per_s": rate}
    look = choose_next(chunks, LEVELS, Mode.adaptive(slo), costs, policy="lookahead", **kwargs)
    rob = choose_next(chunks, LEVELS, Mode.adaptive(slo), costs, policy="robust", **kwargs)
    assume("infeasible" not in look.reason)
    options = _chunk_options(chunks[0], LEVELS, costs, rate)
    index = {(o.kind, o.level): i for i, o in enumerate(options)}
    floor = ROBUST_DROP_FACTOR * rate

    def worst(d) -> float:
        return _worst_case(index[(d.kind, d.level)], chunks, LEVELS, costs, floor, 0.0, 0.0)

    if (rob.kind, rob.level) != (look.kind, look.level):
        assert worst(rob) <= worst(look) + 1e-12
    assert rob.predicted_completion_s is not None and rob.predicted_completion_s <= slo


# Eight 256-token chunks; 8 / 4 / 1 MB per level; recompute 0.1 s per chunk.
CHUNKS = tuple(ChunkOption(i, 256, {0: 8_000_000, 1: 4_000_000, 2: 1_000_000}) for i in range(8))
COSTS = CostModel(recompute_s_per_token=0.1 / 256, decode_s_per_chunk=0.001)


def test_robust_lowers_a_chunk_that_a_drop_would_strand() -> None:
    # At 100 MB/s the lookahead can afford level 0 first (its plan mixes text and KV to finish in 0.48 s),
    # but if the link fell to 25 MB/s during that 8 MB chunk, even the fastest continuation would finish
    # at 0.53 s; the robust policy sends a smaller first chunk, from which the drop can be absorbed.
    mode = Mode.adaptive(0.5)
    look = choose_next(CHUNKS, LEVELS, mode, COSTS, elapsed_s=0.0, bytes_per_s=1e8, policy="lookahead")
    rob = choose_next(CHUNKS, LEVELS, mode, COSTS, elapsed_s=0.0, bytes_per_s=1e8, policy="robust")
    assert (look.kind, look.level) == ("kv", 0)
    assert (rob.kind, rob.level) != ("kv", 0) and "robust" in rob.reason
    # A steady link with plenty of time: nothing to insure against, the robust policy sends the best.
    easy = choose_next(
        CHUNKS, LEVELS, Mode.adaptive(5.0), COSTS, elapsed_s=0.0, bytes_per_s=1e8, policy="robust"
    )
    assert (easy.kind, easy.level) == ("kv", 0) and "insured" in easy.reason


def test_robust_plans_for_a_rise_when_the_slo_is_out_of_reach() -> None:
    # At 10 MB/s the fastest plan needs about 0.5 s; an SLO of 0.35 s is only reachable if the link gets
    # faster. The lookahead then sends its fastest plan's first chunk; the robust policy plans for the
    # smallest rise that would make the SLO reachable, and says so.
    mode = Mode.adaptive(0.35)
    rob = choose_next(CHUNKS, LEVELS, mode, COSTS, elapsed_s=0.0, bytes_per_s=1e7, policy="robust")
    assert "rise" in rob.reason
    assert rob.predicted_completion_s is not None and rob.predicted_completion_s > 0.35
    # Far out of reach (more than a 4x rise needed): the fastest plan, like the lookahead.
    hopeless = Mode.adaptive(0.05)
    rob = choose_next(CHUNKS, LEVELS, hopeless, COSTS, elapsed_s=0.0, bytes_per_s=1e7, policy="robust")
    look = choose_next(CHUNKS, LEVELS, hopeless, COSTS, elapsed_s=0.0, bytes_per_s=1e7, policy="lookahead")
    assert "fastest" in rob.reason and (rob.kind, rob.level) == (look.kind, look.level)


def test_planning_for_a_rise_keeps_the_compute_path_free() -> None:
    # Slow recompute (0.3 s a chunk) and an SLO out of reach at 10 MB/s: the fastest plan at the
    # prediction starts by recomputing text, which books the device early and cannot profit from a faster
    # link later; planned for the rise, the first chunk is fetched as KV.
    costs = CostModel(recompute_s_per_token=0.3 / 256, decode_s_per_chunk=0.001)
    mode = Mode.adaptive(0.3)
    look = choose_next(CHUNKS, LEVELS, mode, costs, elapsed_s=0.0, bytes_per_s=1e7, policy="lookahead")
    rob = choose_next(CHUNKS, LEVELS, mode, costs, elapsed_s=0.0, bytes_per_s=1e7, policy="robust")
    assert look.kind == "text"
    assert rob.kind == "kv"


def test_drop_factor_and_floor() -> None:
    assert Mode.adaptive(1.0).insurance_floor(100.0) is None
    assert Mode.adaptive(1.0, drop_factor=0.5).insurance_floor(100.0) == 50.0
    assert Mode.adaptive(1.0, floor_bytes_per_s=10.0).insurance_floor(100.0) == 10.0
    # Both: the link may fall by the factor, but never below the known floor.
    assert Mode.adaptive(1.0, floor_bytes_per_s=70.0, drop_factor=0.5).insurance_floor(100.0) == 70.0
    for bad in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(InvalidInputError):
            Mode.adaptive(1.0, drop_factor=bad)
    # A relative drop insures the lookahead just as an absolute floor does.
    kwargs = {"elapsed_s": 0.0, "bytes_per_s": 1e8, "policy": "lookahead"}
    plain = choose_next(CHUNKS, LEVELS, Mode.adaptive(0.5), COSTS, **kwargs)  # type: ignore[arg-type]
    insured = choose_next(CHUNKS, LEVELS, Mode.adaptive(0.5, drop_factor=0.25), COSTS, **kwargs)  # type: ignore[arg-type]
    assert (plain.kind, plain.level) == ("kv", 0)
    assert (insured.kind, insured.level) != ("kv", 0) and "insured" in insured.reason


def test_conservative_estimator_reacts_to_drops_at_once_and_to_rises_slowly() -> None:
    est = ThroughputEstimator(method="conservative", window=4)
    for _ in range(4):
        est.add_sample(100, 1.0)
    est.add_sample(10, 1.0)  # a drop: the last sample wins
    assert est.predict() == pytest.approx(10.0)
    est.add_sample(1000, 1.0)  # a rise: the harmonic mean of the window holds it back
    assert est.predict() == pytest.approx(4 / (2 / 100 + 1 / 10 + 1 / 1000))
    harmonic = ThroughputEstimator(method="harmonic", window=4)
    for nbytes in (100, 100, 100, 100, 10):
        harmonic.add_sample(nbytes, 1.0)
    assert harmonic.predict() > 10.0 * 2  # the harmonic mean alone lags a drop
