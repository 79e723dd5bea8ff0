"""The controller's policies as they were before the speed-up (kvwire/controller.py at commit a9f8714):
plain Python, one `_Option` object per chunk and level, every what-if plan recomputed from scratch.

Kept verbatim (only the input/output types are imported from kvwire.controller instead of defined here)
as the reference that tests/controller/test_speed_equivalence.py holds the fast implementation to:
the same `Decision`s, float for float.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from kvwire.controller import (
    POLICIES,
    ROBUST_DROP_FACTOR,
    ROBUST_MAX_RISE,
    ChunkOption,
    CostModel,
    Decision,
    DecisionKind,
    Mode,
    Policy,
)
from kvwire.errors import InvalidInputError


@dataclass(frozen=True)
class _Option:
    kind: DecisionKind
    level: int | None
    nbytes: int
    net_s: float
    compute_s: float
    loss: int  # rank of the level among the manifest's levels; text is exact, so 0 like the best level


def _chunk_options(
    chunk: ChunkOption, levels: Sequence[int], costs: CostModel, bytes_per_s: float
) -> list[_Option]:
    """Text first, then KV levels best to worst."""
    text_bytes = chunk.num_tokens * costs.text_bytes_per_token
    options = [
        _Option(
            "text",
            None,
            text_bytes,
            costs.request_overhead_s + text_bytes / bytes_per_s,
            chunk.num_tokens * costs.recompute_s_per_token,
            0,
        )
    ]
    for rank, level in enumerate(levels):
        nbytes = chunk.level_bytes[level]
        options.append(
            _Option(
                "kv",
                level,
                nbytes,
                costs.request_overhead_s + nbytes / bytes_per_s,
                costs.decode_s_per_chunk,
                rank,
            )
        )
    return options


def pipeline_completion(
    start_s: float, compute_free_s: float, stages: Sequence[tuple[float, float]]
) -> float:
    """Finish time of a two-stage pipeline: fetches back to back from `start_s`, then compute in order.

    stages: per chunk (network seconds, compute seconds). compute_free_s: when the compute device finishes
    the work already queued (decoding or recomputing chunks fetched earlier).
    """
    net_done = start_s
    compute_done = max(compute_free_s, start_s)
    for net_s, compute_s in stages:
        net_done += net_s
        compute_done = max(compute_done, net_done) + compute_s
    return compute_done


def _completion(start_s: float, compute_free_s: float, plan: Sequence[_Option]) -> float:
    return pipeline_completion(start_s, compute_free_s, [(o.net_s, o.compute_s) for o in plan])


def _decision(chunk: ChunkOption, option: _Option, reason: str, completion: float | None = None) -> Decision:
    return Decision(
        chunk_index=chunk.index,
        kind=option.kind,
        level=option.level,
        expected_bytes=option.nbytes,
        expected_seconds=option.net_s + option.compute_s,
        reason=reason,
        predicted_completion_s=completion,
    )


# --------------------------------------------------------------------------------------------------------
# Policies
# --------------------------------------------------------------------------------------------------------


# (net_done, compute_done, loss so far, index of the parent state, option taken for this chunk)
_State = tuple[float, float, int, int, "_Option | None"]


def _fastest_plan(
    options: Sequence[Sequence[_Option]], start_s: float, compute_free_s: float, max_front: int = 128
) -> list[_Option]:
    """The plan with the earliest completion, by dynamic programming over the (net_done, compute_done)
    Pareto front. Only options not dominated in (net, compute) can be in it; with a level-independent
    decode cost that is the smallest level and text. Exact while the front holds at most `max_front`
    states (contexts up to ~40 chunks of equal size); above that the front is thinned evenly, keeping both
    ends, which bounds the cost (~30 ms for 128 chunks) and makes the result near-fastest."""
    front: list[_State] = [(start_s, max(compute_free_s, start_s), 0, -1, None)]
    history: list[list[_State]] = []
    for chunk_options in options:
        candidates = [o for o in chunk_options if not any(_dominates(p, o) for p in chunk_options)]
        grown: list[_State] = []
        for parent, (net_done, compute_done, loss, _, _) in enumerate(front):
            for o in candidates:
                new_net = net_done + o.net_s
                grown.append((new_net, max(compute_done, new_net) + o.compute_s, loss + o.loss, parent, o))
        grown.sort(key=lambda s: (s[0], s[1]))
        pruned: list[_State] = []
        for state in grown:  # by net_done ascending: keep a state only if it also finishes compute sooner
            if not pruned or state[1] < pruned[-1][1]:
                pruned.append(state)
        if len(pruned) > max_front:
            step = (len(pruned) - 1) / (max_front - 1)
            pruned = [pruned[round(i * step)] for i in range(max_front)]
        history.append(front)
        front = pruned
    best = min(range(len(front)), key=lambda i: (front[i][1], front[i][2]))
    plan: list[_Option] = []
    state = front[best]
    for level_states in reversed(history):
        option = state[4]
        assert option is not None
        plan.append(option)
        state = level_states[state[3]]
    plan.reverse()
    return plan


def _dominates(a: _Option, b: _Option) -> bool:
    """a is at least as fast as b on both stages and at least as good, and strictly better somewhere."""
    no_worse = a.net_s <= b.net_s and a.compute_s <= b.compute_s and a.loss <= b.loss
    return no_worse and (a.net_s < b.net_s or a.compute_s < b.compute_s or a.loss < b.loss)


def _plan_lookahead(
    options: Sequence[Sequence[_Option]], start_s: float, compute_free_s: float, deadline_s: float
) -> tuple[list[_Option], float, bool]:
    """Best-quality plan that meets the deadline, by greedy upgrades from two starting plans.

    Starts: the fastest plan (exact, `_fastest_plan`) and the best uniform-level plan that meets the
    deadline (what CacheGen's rule would assume), if any; the better result wins, so the lookahead never
    plans worse quality than CacheGen's rule would at the same throughput. Upgrades go one level at a time
    in rounds, last chunk first, so the plan keeps its slack early (anything saved now is spent by the next
    re-plan, with a fresher throughput estimate). A chunk that cannot go one level up is tried as text
    (which is exact). Returns (plan, predicted completion, feasible).
    """
    fastest = _fastest_plan(options, start_s, compute_free_s)
    fastest_completion = _completion(start_s, compute_free_s, fastest)
    if fastest_completion > deadline_s:
        return fastest, fastest_completion, False
    starts = [fastest]
    for rank in range(len(options[0]) - 1):
        uniform = [opts[1 + rank] for opts in options]
        if _completion(start_s, compute_free_s, uniform) <= deadline_s:
            starts.append(uniform)
            break
    results = [_upgrade(options, plan, start_s, compute_free_s, deadline_s) for plan in starts]
    plan, completion = min(results, key=lambda r: (sum(o.loss for o in r[0]), r[1]))
    return plan, completion, True


def _upgrade(
    options: Sequence[Sequence[_Option]],
    plan: list[_Option],
    start_s: float,
    compute_free_s: float,
    deadline_s: float,
) -> tuple[list[_Option], float]:
    plan = list(plan)
    # Pipeline state before each chunk; a trial change at chunk i only re-runs the suffix from i, and
    # stops as soon as the compute clock (which only grows) passes the deadline.
    nets, comps = _pipeline_states(plan, start_s, compute_free_s)
    changed = True
    while changed:
        changed = False
        for i in reversed(range(len(plan))):
            current = plan[i]
            if current.loss == 0:
                continue
            better_kv = [o for o in options[i] if o.kind == "kv" and o.loss == current.loss - 1]
            text = [o for o in options[i] if o.kind == "text"]
            for candidate in better_kv + text:
                net = nets[i] + candidate.net_s
                comp = max(comps[i], net) + candidate.compute_s
                for o in plan[i + 1 :]:
                    if comp > deadline_s:
                        break
                    net += o.net_s
                    comp = max(comp, net) + o.compute_s
                if comp <= deadline_s:
                    plan[i] = candidate
                    nets, comps = _pipeline_states(plan, start_s, compute_free_s)
                    changed = True
                    break
    return plan, comps[-1]


def _pipeline_states(
    plan: Sequence[_Option], start_s: float, compute_free_s: float
) -> tuple[list[float], list[float]]:
    """(network done, compute done) before each chunk of `plan`, and after the last."""
    nets, comps = [start_s], [max(compute_free_s, start_s)]
    for o in plan:
        nets.append(nets[-1] + o.net_s)
        comps.append(max(comps[-1], nets[-1]) + o.compute_s)
    return nets, comps


def _plan_cachegen(
    options: Sequence[Sequence[_Option]], start_s: float, compute_free_s: float, deadline_s: float
) -> tuple[_Option, float, bool]:
    """CacheGen's rule for the next chunk: best level such that sending every remaining chunk at that
    level meets the deadline; else whichever of smallest level / text finishes everything sooner."""
    n_kv = len(options[0]) - 1
    for rank in range(n_kv):
        uniform = [opts[1 + rank] for opts in options]
        completion = _completion(start_s, compute_free_s, uniform)
        if completion <= deadline_s:
            return uniform[0], completion, True
    smallest = [opts[n_kv] for opts in options]
    text = [opts[0] for opts in options]
    t_small = _completion(start_s, compute_free_s, smallest)
    t_text = _completion(start_s, compute_free_s, text)
    return (text[0], t_text, False) if t_text < t_small else (smallest[0], t_small, False)


def plan_remaining(
    remaining: Sequence[ChunkOption],
    levels: Sequence[int],
    costs: CostModel,
    *,
    elapsed_s: float,
    bytes_per_s: float,
    slo_s: float,
    compute_free_s: float | None = None,
) -> list[Decision]:
    """The lookahead plan for all remaining chunks (the first entry is what `choose_next` sends)."""
    _check_step(remaining, elapsed_s, bytes_per_s)
    options = [_chunk_options(c, sorted(levels), costs, bytes_per_s) for c in remaining]
    compute_free = elapsed_s if compute_free_s is None else compute_free_s
    plan, completion, feasible = _plan_lookahead(options, elapsed_s, compute_free, slo_s)
    reason = "lookahead: best plan within SLO" if feasible else "lookahead: SLO infeasible, fastest plan"
    return [_decision(c, o, reason, completion) for c, o in zip(remaining, plan, strict=True)]


def _check_step(remaining: Sequence[ChunkOption], elapsed_s: float, bytes_per_s: float | None) -> None:
    if not remaining:
        raise InvalidInputError("no remaining chunks to decide")
    if not (math.isfinite(elapsed_s) and elapsed_s >= 0):
        raise InvalidInputError(f"elapsed_s must be finite and >= 0, got {elapsed_s}")
    if bytes_per_s is not None and not (math.isfinite(bytes_per_s) and bytes_per_s > 0):
        raise InvalidInputError(f"throughput must be finite and > 0 bytes/s, got {bytes_per_s}")


def choose_next(
    remaining: Sequence[ChunkOption],
    levels: Sequence[int],
    mode: Mode,
    costs: CostModel,
    *,
    elapsed_s: float,
    bytes_per_s: float | None,
    policy: Policy = "robust",
    compute_free_s: float | None = None,
) -> Decision:
    """Decide the first of `remaining` (chunks not yet requested, in order).

    elapsed_s: seconds since the request started (the SLO clock); the network is free now.
    bytes_per_s: predicted throughput for the remaining transfer (see `ThroughputEstimator`). Fixed modes
    accept None (the decision's expected_seconds then leaves out transfer time).
    compute_free_s: when the compute device finishes chunks already fetched (default: now).
    """
    _check_step(remaining, elapsed_s, bytes_per_s)
    sorted_levels = sorted(levels)
    chunk = remaining[0]
    if mode.kind in ("fixed_level", "text"):
        options = _chunk_options(
            chunk, sorted_levels, costs, math.inf if bytes_per_s is None else bytes_per_s
        )
        if mode.kind == "text":
            return _decision(chunk, options[0], "fixed text")
        if mode.level not in sorted_levels:
            raise InvalidInputError(f"fixed level {mode.level} is not one of {sorted_levels}")
        return _decision(chunk, options[1 + sorted_levels.index(mode.level)], "fixed level")
    deadline = mode.deadline_s
    if deadline is None or bytes_per_s is None:
        raise InvalidInputError("adaptive mode needs an SLO and a throughput estimate")
    if policy not in POLICIES:
        raise InvalidInputError(f"unknown policy {policy!r}; expected one of {POLICIES}")
    compute_free = elapsed_s if compute_free_s is None else compute_free_s
    all_options = [_chunk_options(c, sorted_levels, costs, bytes_per_s) for c in remaining]
    if policy == "cachegen":
        option, completion, feasible = _plan_cachegen(all_options, elapsed_s, compute_free, deadline)
        reason = (
            "cachegen: best uniform level within SLO" if feasible else "cachegen: SLO infeasible, fastest"
        )
    elif policy == "robust":
        return _choose_robust(remaining, sorted_levels, mode, costs, elapsed_s, bytes_per_s, compute_free)
    else:
        plan, completion, feasible = _plan_lookahead(all_options, elapsed_s, compute_free, deadline)
        option = plan[0]
        reason = "lookahead: best plan within SLO" if feasible else "lookahead: SLO infeasible, fastest plan"
    floor = mode.insurance_floor(bytes_per_s)
    if floor is not None:
        insured = _insure(
            option, all_options, remaining, sorted_levels, costs, floor, elapsed_s, compute_free, deadline
        )
        if insured is not option:
            option, reason = insured, reason + "; lowered to stay insured against the floor throughput"
    return _decision(chunk, option, reason, completion)


def _fast_stages(options: Sequence[Sequence[_Option]]) -> list[list[tuple[float, float]]]:
    """Per chunk, the (network s, compute s) pairs that can be on a fastest plan (the pairs no other
    option beats on both stages; quality plays no part in speed)."""
    stages = []
    for chunk_options in options:
        kept: list[tuple[float, float]] = []
        for net_s, compute_s in sorted({(o.net_s, o.compute_s) for o in chunk_options}):
            if not kept or compute_s < kept[-1][1]:  # by network time: keep it only if it computes faster
                kept.append((net_s, compute_s))
        stages.append(kept)
    return stages


def _fastest_completion(
    first: tuple[float, float],
    rest: Sequence[Sequence[tuple[float, float]]],
    start_s: float,
    compute_free_s: float,
    max_front: int = 128,
) -> float:
    """Earliest completion with the next chunk's (network s, compute s) fixed to `first` and every later
    chunk at its fastest: `_fastest_plan`'s dynamic programming (same front, same thinning) without
    keeping the plan, which is all the robust policy's what-if questions need."""
    net_done = start_s + first[0]
    front = [(net_done, max(compute_free_s, net_done) + first[1])]
    for pairs in rest:
        grown = sorted((net + a, max(comp, net + a) + b) for net, comp in front for a, b in pairs)
        front = []
        for state in grown:
            if not front or state[1] < front[-1][1]:
                front.append(state)
        if len(front) > max_front:
            step = (len(front) - 1) / (max_front - 1)
            front = [front[round(i * step)] for i in range(max_front)]
    return min(comp for _, comp in front)


def _worst_case(
    first_index: int,
    remaining: Sequence[ChunkOption],
    levels: Sequence[int],
    costs: CostModel,
    floor_bytes_per_s: float,
    start_s: float,
    compute_free_s: float,
) -> float:
    """Completion if the link fell to `floor_bytes_per_s` now: the next chunk sent as option
    `first_index` (an index into `_chunk_options`), every later one as fast as possible at the floor."""
    floor_first = _chunk_options(remaining[0], levels, costs, floor_bytes_per_s)[first_index]
    rest = _fast_stages([_chunk_options(c, levels, costs, floor_bytes_per_s) for c in remaining[1:]])
    return _fastest_completion((floor_first.net_s, floor_first.compute_s), rest, start_s, compute_free_s)


def _insure(
    chosen: _Option,
    all_options: Sequence[Sequence[_Option]],
    remaining: Sequence[ChunkOption],
    levels: Sequence[int],
    costs: CostModel,
    floor_bytes_per_s: float,
    start_s: float,
    compute_free_s: float,
    deadline_s: float,
) -> _Option:
    """The best-quality option for the next chunk, no bigger than `chosen`, whose worst case (this chunk
    and every later one at the floor throughput, later ones sent as fast as possible) meets the deadline;
    `chosen` itself if it is insured or if nothing is."""
    first_options = all_options[0]

    def worst(option: _Option) -> float:
        index = first_options.index(option)
        return _worst_case(index, remaining, levels, costs, floor_bytes_per_s, start_s, compute_free_s)

    if worst(chosen) <= deadline_s:
        return chosen
    insured = [o for o in first_options if o.nbytes < chosen.nbytes and worst(o) <= deadline_s]
    return min(insured, key=lambda o: (o.loss, o.nbytes)) if insured else chosen


def _choose_robust(
    remaining: Sequence[ChunkOption],
    levels: Sequence[int],
    mode: Mode,
    costs: CostModel,
    elapsed_s: float,
    bytes_per_s: float,
    compute_free_s: float,
) -> Decision:
    """The robust policy (see docs/controller.md): the lookahead, made to keep its options open.

    Feasible at the prediction: take the lookahead's choice if it is insured against a drop to
    `mode.insurance_floor` (default `ROBUST_DROP_FACTOR` x the prediction) right now; otherwise the best
    option that is insured *and* still meets the deadline at the prediction ("viable"); if none is
    insured, the viable one whose worst case is soonest.
    Infeasible at the prediction: plan for the smallest rise in throughput (up to `ROBUST_MAX_RISE`x)
    that would make the SLO reachable, instead of the fastest plan at the prediction, which tends to queue
    recompute early and cannot profit from a later rise; past that, the fastest plan.
    """
    chunk = remaining[0]
    deadline = mode.deadline_s
    assert deadline is not None
    options = [_chunk_options(c, levels, costs, bytes_per_s) for c in remaining]
    plan, completion, feasible = _plan_lookahead(options, elapsed_s, compute_free_s, deadline)
    if not feasible:
        rise = _smallest_feasible_rise(
            remaining, levels, costs, bytes_per_s, elapsed_s, compute_free_s, deadline
        )
        if rise is None:
            return _decision(chunk, plan[0], "robust: SLO infeasible, fastest plan", completion)
        hoped = [_chunk_options(c, levels, costs, bytes_per_s * rise) for c in remaining]
        hoped_plan, _, _ = _plan_lookahead(hoped, elapsed_s, compute_free_s, deadline)
        option = options[0][hoped[0].index(hoped_plan[0])]
        reason = f"robust: SLO infeasible at the prediction, planned for a {rise:.2g}x rise"
        return _decision(chunk, option, reason, completion)
    floor = mode.insurance_floor(bytes_per_s)
    if floor is None:
        floor = ROBUST_DROP_FACTOR * bytes_per_s
    floor_first = _chunk_options(chunk, levels, costs, floor)
    floor_rest = _fast_stages([_chunk_options(c, levels, costs, floor) for c in remaining[1:]])
    nominal_rest = _fast_stages(options[1:])
    worst_of: dict[int, float] = {}
    viable_of: dict[int, bool] = {}

    def worst(index: int) -> float:  # completion if the link fell to the floor now
        if index not in worst_of:
            first = floor_first[index]
            worst_of[index] = _fastest_completion(
                (first.net_s, first.compute_s), floor_rest, elapsed_s, compute_free_s
            )
        return worst_of[index]

    def viable(index: int) -> bool:  # the fastest continuation at the prediction meets the deadline
        if index not in viable_of:
            first = options[0][index]
            continuation = _fastest_completion(
                (first.net_s, first.compute_s), nominal_rest, elapsed_s, compute_free_s
            )
            viable_of[index] = continuation <= deadline
        return viable_of[index]

    chosen = options[0].index(plan[0])
    if worst(chosen) <= deadline:
        return _decision(chunk, plan[0], "robust: best plan within SLO, insured", completion)
    # Best quality first (then fewer bytes); insuring against the unlikely case must not give up the
    # likely one, so only viable options count.
    by_quality = sorted(range(len(options[0])), key=lambda i: (options[0][i].loss, options[0][i].nbytes))
    for index in by_quality:
        if worst(index) <= deadline and viable(index):
            reason = "robust: lowered to stay insured against a drop"
            return _decision(chunk, options[0][index], reason, completion)
    candidates = [i for i in by_quality if viable(i)] or [chosen]
    safest = min(candidates, key=worst)  # min keeps the first of equals: the better quality
    reason = "robust: no option insured against a drop, safest one within SLO"
    return _decision(chunk, options[0][safest], reason, completion)


def _smallest_feasible_rise(
    remaining: Sequence[ChunkOption],
    levels: Sequence[int],
    costs: CostModel,
    bytes_per_s: float,
    elapsed_s: float,
    compute_free_s: float,
    deadline_s: float,
    max_rise: float = ROBUST_MAX_RISE,
    steps: int = 6,
) -> float | None:
    """The smallest factor in (1, max_rise] by which the throughput would have to rise for the fastest
    plan to meet the deadline (bisection in log space, to within max_rise ** (1 / 2**steps); completion
    only falls as the rate rises), or None if even `max_rise` is not enough."""

    def fits(factor: float) -> bool:
        stages = _fast_stages([_chunk_options(c, levels, costs, bytes_per_s * factor) for c in remaining])
        return any(
            _fastest_completion(first, stages[1:], elapsed_s, compute_free_s) <= deadline_s
            for first in stages[0]
        )

    if not fits(max_rise):
        return None
    low, high = 1.0, max_rise
    for _ in range(steps):
        middle = math.sqrt(low * high)
        low, high = (low, middle) if fits(middle) else (middle, high)
    return high
