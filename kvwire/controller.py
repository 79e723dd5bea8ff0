"""Bandwidth-adaptive streaming controller: per chunk, fetch KV at some level or send text and recompute.

A pure policy module: no I/O, no clock reads, no torch. The caller passes in the chunk options from the
manifest, the time elapsed since the request started, a throughput estimate and the device's costs; it gets
back a `Decision` per chunk (also logged). Three adaptive policies are kept side by side so a benchmark can
compare them (see benchmarks/controller_sim.py and docs/controller.md):

- ``"cachegen"``: CacheGen's rule (SIGCOMM'24, section 5.3). Assume the remaining chunks all go at one
  configuration; pick the best level whose predicted completion meets the SLO; if none does, pick whichever
  of "smallest level" or "text" finishes sooner.
- ``"lookahead"``: plan every remaining chunk at once (start from the fastest plan, then greedily upgrade
  chunks while the whole plan still meets the SLO), send the first chunk of the plan, re-plan at the next.
- ``"robust"`` (the default): the lookahead, made to survive a drop in throughput. Each chunk is insured:
  if the link fell to a fraction of the prediction right now, the fastest continuation (mostly text, which
  needs no bandwidth, and the smallest level) must still meet the SLO. When the SLO is out of reach at the
  prediction, it plans for the smallest rise that would make it reachable instead of queueing recompute.

Timing model (documented in docs/controller.md): the network fetches chunks one after another; the compute
device processes chunks one after another in chunk order (decoding a KV chunk or recomputing a text chunk,
which needs every earlier chunk's KV); a chunk's compute starts when its bytes have arrived and the device
has finished the previous chunk. That is a two-stage pipeline (a two-machine flow shop with a fixed order).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from kvwire.errors import InvalidInputError

logger = logging.getLogger(__name__)

DecisionKind = Literal["kv", "text"]
Policy = Literal["cachegen", "lookahead", "robust"]
POLICIES: tuple[Policy, ...] = ("cachegen", "lookahead", "robust")
# The robust policy's defaults: insure each chunk against the link falling to this share of the
# prediction (a 10x drop: the step-down trace's; 0.15 already fails it in a third of the runs), and when the
# SLO is out of reach at the prediction, aim for the smallest rise (up to this factor) that would make it
# reachable. Chosen on the simulation in benchmarks/controller_sim.py (docs/controller.md).
ROBUST_DROP_FACTOR = 0.1
ROBUST_MAX_RISE = 4.0


# --------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkOption:
    """One chunk of a context as the controller sees it: its token count and its size at each level."""

    index: int
    num_tokens: int
    level_bytes: Mapping[int, int]

    def __post_init__(self) -> None:
        if self.index < 0 or self.num_tokens <= 0:
            raise InvalidInputError(f"chunk {self.index}: index must be >= 0 and num_tokens > 0")
        if not self.level_bytes:
            raise InvalidInputError(f"chunk {self.index}: no levels")
        for level, nbytes in self.level_bytes.items():
            if nbytes <= 0:
                raise InvalidInputError(f"chunk {self.index}: level {level} has {nbytes} bytes")


@dataclass(frozen=True)
class ContextOptions:
    """What the manifest offers for one context: the quality levels (0 = best, biggest) and the chunks.

    Every chunk must offer every level in `levels`.
    """

    levels: tuple[int, ...]
    chunks: tuple[ChunkOption, ...]

    def __post_init__(self) -> None:
        if not self.levels or len(set(self.levels)) != len(self.levels):
            raise InvalidInputError(f"levels must be distinct and non-empty, got {self.levels}")
        object.__setattr__(self, "levels", tuple(sorted(self.levels)))
        for position, chunk in enumerate(self.chunks):
            if chunk.index != position:
                raise InvalidInputError(f"chunk at position {position} has index {chunk.index}")
            missing = set(self.levels) - set(chunk.level_bytes)
            if missing:
                raise InvalidInputError(f"chunk {chunk.index} lacks levels {sorted(missing)}")


@dataclass(frozen=True)
class CostModel:
    """Per-device costs, measured or configured.

    recompute_s_per_token: seconds to recompute one token's KV from text on this device (prefill cost).
    decode_s_per_chunk: seconds to decode one KV chunk (any level) on this device; 0 if negligible.
    request_overhead_s: fixed network cost per chunk (a round trip when the client pulls; ~0 when pushed).
    text_bytes_per_token: wire size of a token id.
    """

    recompute_s_per_token: float
    decode_s_per_chunk: float = 0.0
    request_overhead_s: float = 0.0
    text_bytes_per_token: int = 4

    def __post_init__(self) -> None:
        for name in ("recompute_s_per_token", "decode_s_per_chunk", "request_overhead_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise InvalidInputError(f"{name} must be finite and >= 0, got {value}")
        if self.text_bytes_per_token <= 0:
            raise InvalidInputError("text_bytes_per_token must be > 0")


@dataclass(frozen=True)
class Mode:
    """How to choose: a fixed level for every chunk, text for every chunk, or adaptive under an SLO."""

    kind: Literal["fixed_level", "text", "adaptive"]
    level: int | None = None
    slo_s: float | None = None
    margin: float = 0.0
    floor_bytes_per_s: float | None = None
    drop_factor: float | None = None

    @classmethod
    def fixed_level(cls, level: int) -> Mode:
        return cls("fixed_level", level=level)

    @classmethod
    def text(cls) -> Mode:
        return cls("text")

    @classmethod
    def adaptive(
        cls,
        slo_s: float,
        margin: float = 0.0,
        floor_bytes_per_s: float | None = None,
        drop_factor: float | None = None,
    ) -> Mode:
        """Meet `slo_s` (seconds from request start to the whole cache being ready).

        margin: plan against `slo_s * (1 - margin)`, keeping a share of the budget for surprises.
        floor_bytes_per_s: insure against a sudden drop to this throughput: the next chunk is only sent
        at a level from which the fastest continuation would still meet the deadline if the link fell to
        the floor right now (when no option is insurable, the policy's choice stands). See
        docs/controller.md.
        drop_factor: insure against the link falling to this share of the predicted throughput (in
        (0, 1]); with a floor too, the larger of the two floors applies. The robust policy insures
        against `ROBUST_DROP_FACTOR` when neither is given, and handles an uninsurable chunk its own way.
        """
        if not (math.isfinite(slo_s) and slo_s > 0):
            raise InvalidInputError(f"SLO must be finite and > 0 seconds, got {slo_s}")
        if not (0 <= margin < 1):
            raise InvalidInputError(f"margin must be in [0, 1), got {margin}")
        if floor_bytes_per_s is not None and not (math.isfinite(floor_bytes_per_s) and floor_bytes_per_s > 0):
            raise InvalidInputError(f"floor_bytes_per_s must be finite and > 0, got {floor_bytes_per_s}")
        if drop_factor is not None and not (0 < drop_factor <= 1):
            raise InvalidInputError(f"drop_factor must be in (0, 1], got {drop_factor}")
        return cls(
            "adaptive",
            slo_s=slo_s,
            margin=margin,
            floor_bytes_per_s=floor_bytes_per_s,
            drop_factor=drop_factor,
        )

    def insurance_floor(self, bytes_per_s: float) -> float | None:
        """The throughput the next chunk is insured against: the absolute floor, the relative drop
        (`drop_factor` x the prediction), or the larger of the two when both are set (the link may fall
        by the factor, but never below a known floor)."""
        floors = []
        if self.floor_bytes_per_s is not None:
            floors.append(self.floor_bytes_per_s)
        if self.drop_factor is not None:
            floors.append(self.drop_factor * bytes_per_s)
        return max(floors) if floors else None

    @property
    def deadline_s(self) -> float | None:
        """The completion time the adaptive policies plan against."""
        return None if self.slo_s is None else self.slo_s * (1 - self.margin)


# --------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """What to do with one chunk, and why.

    expected_seconds: the chunk's own predicted cost (network time + compute time).
    predicted_completion_s: when the whole remaining plan is predicted to finish, in seconds since the
    request started (None in fixed modes, which do not plan).
    """

    chunk_index: int
    kind: DecisionKind
    level: int | None
    expected_bytes: int
    expected_seconds: float
    reason: str
    predicted_completion_s: float | None = None


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


# --------------------------------------------------------------------------------------------------------
# Throughput prediction and the stateful wrapper
# --------------------------------------------------------------------------------------------------------


@dataclass
class ThroughputEstimator:
    """Predicts throughput (bytes/s) from past transfers.

    method "harmonic": harmonic mean of the last `window` samples' throughputs, as in MPC-style ABR
    (Yin et al., SIGCOMM'15): one fast outlier barely moves it, a slow one pulls it down, which is the safe
    direction for a deadline. method "robust": the harmonic mean divided by (1 + the largest relative
    prediction error over the last `window` samples), RobustMPC's discount: no discount on a steady link,
    a large one on a jumpy link. method "last": the last sample, as CacheGen does. `safety` (<= 1) scales
    the prediction down. Before any sample, `prior_bytes_per_s` is returned.
    """

    method: Literal["harmonic", "robust", "last", "conservative"] = "harmonic"
    window: int = 5
    safety: float = 1.0
    prior_bytes_per_s: float | None = None
    _samples: deque[float] = field(default_factory=deque, init=False, repr=False)
    _errors: deque[float] = field(default_factory=deque, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.method not in ("harmonic", "robust", "last", "conservative"):
            raise InvalidInputError(f"unknown estimator method {self.method!r}")
        if self.window < 1:
            raise InvalidInputError("window must be >= 1")
        if not (0 < self.safety <= 1):
            raise InvalidInputError(f"safety must be in (0, 1], got {self.safety}")
        if self.prior_bytes_per_s is not None and not (
            math.isfinite(self.prior_bytes_per_s) and self.prior_bytes_per_s > 0
        ):
            raise InvalidInputError("prior_bytes_per_s must be finite and > 0")
        self._samples = deque(maxlen=self.window)
        self._errors = deque(maxlen=self.window)

    def add_sample(self, nbytes: int, seconds: float) -> None:
        """One finished transfer of `nbytes` that took `seconds` (wall time of the transfer alone)."""
        if nbytes <= 0 or not (math.isfinite(seconds) and seconds > 0):
            raise InvalidInputError(f"bad throughput sample ({nbytes} bytes, {seconds} s)")
        actual = nbytes / seconds
        if self._samples or self.prior_bytes_per_s is not None:
            predicted = self._harmonic() if self._samples else self.prior_bytes_per_s
            assert predicted is not None
            self._errors.append(abs(predicted - actual) / actual)
        self._samples.append(actual)

    def _harmonic(self) -> float:
        return len(self._samples) / sum(1.0 / s for s in self._samples)

    @property
    def can_predict(self) -> bool:
        return bool(self._samples) or self.prior_bytes_per_s is not None

    def predict(self) -> float:
        """Predicted throughput in bytes/s."""
        if not self._samples:
            if self.prior_bytes_per_s is None:
                raise InvalidInputError("no throughput samples yet and no prior configured")
            return self.prior_bytes_per_s * self.safety
        if self.method == "last":
            estimate = self._samples[-1]
        elif self.method == "conservative":
            estimate = min(self._samples[-1], self._harmonic())
        elif self.method == "robust":
            estimate = self._harmonic() / (1.0 + max(self._errors, default=0.0))
        else:
            estimate = self._harmonic()
        return estimate * self.safety


class Controller:
    """Per-request controller: decides chunks in order, learns throughput, keeps the decision log.

    The caller drives it: `decide(elapsed_s)` before requesting the next chunk, `record_transfer(...)` once
    its bytes have arrived. Pull clients and the push (gRPC streaming) server use it the same way.
    """

    def __init__(
        self,
        context: ContextOptions,
        mode: Mode,
        costs: CostModel,
        *,
        policy: Policy = "robust",
        estimator: ThroughputEstimator | None = None,
    ) -> None:
        if policy not in POLICIES:
            raise InvalidInputError(f"unknown policy {policy!r}; expected one of {POLICIES}")
        if mode.kind == "fixed_level" and mode.level not in context.levels:
            raise InvalidInputError(f"fixed level {mode.level} is not one of {context.levels}")
        self.context = context
        self.mode = mode
        self.costs = costs
        self.policy: Policy = policy
        self.estimator = estimator if estimator is not None else ThroughputEstimator()
        self.decisions: list[Decision] = []

    @property
    def done(self) -> bool:
        return len(self.decisions) == len(self.context.chunks)

    def decide(self, elapsed_s: float, compute_free_s: float | None = None) -> Decision:
        """Decide the next undecided chunk. In fixed modes no throughput estimate is needed."""
        if self.done:
            raise InvalidInputError("every chunk has been decided")
        remaining = self.context.chunks[len(self.decisions) :]
        can_predict = self.estimator.can_predict
        bytes_per_s = self.estimator.predict() if self.mode.kind == "adaptive" or can_predict else None
        decision = choose_next(
            remaining,
            self.context.levels,
            self.mode,
            self.costs,
            elapsed_s=elapsed_s,
            bytes_per_s=bytes_per_s,
            policy=self.policy,
            compute_free_s=compute_free_s,
        )
        self.decisions.append(decision)
        logger.info(
            "chunk %d: %s%s (%d B, %.4f s, predicted completion %s s, %.3g B/s): %s",
            decision.chunk_index,
            decision.kind,
            "" if decision.level is None else f" L{decision.level}",
            decision.expected_bytes,
            decision.expected_seconds,
            "-" if decision.predicted_completion_s is None else f"{decision.predicted_completion_s:.4f}",
            math.nan if bytes_per_s is None else bytes_per_s,
            decision.reason,
        )
        return decision

    def record_transfer(self, nbytes: int, seconds: float) -> None:
        """Feed a finished transfer to the throughput estimator."""
        self.estimator.add_sample(nbytes, seconds)
