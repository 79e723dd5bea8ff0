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

Speed: the client decides on its critical path, once per chunk, so the planning runs as numba-compiled
loops over numpy tables (~0.3–0.5 ms per robust decision at 32 chunks, ~2–3 ms at 128; the first decision of a
process loads the compiled kernels from numba's cache). It computes the same decisions, float for float,
as the plain-Python policies it replaced (tests/controller/reference_controller.py; docs/controller.md,
"Decision time").
"""

from __future__ import annotations

import functools
import logging
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numba
import numpy as np
import numpy.typing as npt

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


# The policies below work on a table per decision: one row per remaining chunk, one column per option
# (column 0 = text, column 1 + r = the level of rank r, best first), built with numpy in one go. The
# dynamic programs and the greedy upgrades run as numba-compiled loops over that table. They perform
# the same float operations in the same order as the plain-Python policies they replaced (kept in
# tests/controller/reference_controller.py, which the tests hold this code to, decision for decision),
# so every decision is unchanged; only the time per decision fell (docs/controller.md, "Decision time").

_MAX_FRONT = 128  # Pareto-front states kept per chunk by the dynamic programs (see `_fastest_plan`)
# Bound on the relative rounding error per pipeline step (2**-53), with a 16x margin: `_upgrade_nb`.
_ROUNDING = 16 * 2.0**-53


@dataclass(frozen=True)
class _Table:
    """The options of the remaining chunks at one throughput.

    net, compute: (chunks, 1 + levels) seconds per option. loss: the level's rank (text: 0). first_nbytes:
    the exact byte counts of the first chunk's options (the only chunk a decision reports).
    """

    net: npt.NDArray[np.float64]
    compute: npt.NDArray[np.float64]
    loss: npt.NDArray[np.int64]
    first_nbytes: Sequence[int]


@dataclass(frozen=True)
class _Sizes:
    """Throughput-independent part of a table: byte counts and compute seconds per chunk and option."""

    nbytes: npt.NDArray[np.float64]
    compute: npt.NDArray[np.float64]
    loss: npt.NDArray[np.int64]
    rows: tuple[list[int], ...]  # the exact byte counts


def _sizes(remaining: Sequence[ChunkOption], levels: Sequence[int], costs: CostModel) -> _Sizes:
    rows = [
        [c.num_tokens * costs.text_bytes_per_token] + [c.level_bytes[level] for level in levels]
        for c in remaining
    ]
    tokens = np.array([float(c.num_tokens) for c in remaining])
    compute = np.empty((len(remaining), 1 + len(levels)))
    compute[:, 0] = tokens * costs.recompute_s_per_token
    compute[:, 1:] = costs.decode_s_per_chunk
    loss = np.tile(np.arange(-1, len(levels), dtype=np.int64), (len(remaining), 1))
    loss[:, 0] = 0
    return _Sizes(
        nbytes=np.array(rows, dtype=np.float64),
        compute=compute,
        loss=loss,
        rows=tuple(rows),
    )


def _tail(sizes: _Sizes, start: int) -> _Sizes:
    """The sizes of chunks `start`, `start + 1`, ... (views, no copy)."""
    return _Sizes(
        nbytes=sizes.nbytes[start:],
        compute=sizes.compute[start:],
        loss=sizes.loss[start:],
        rows=sizes.rows[start:],
    )


def _table(sizes: _Sizes, costs: CostModel, bytes_per_s: float) -> _Table:
    """Network seconds = request overhead + bytes / throughput, as `_chunk_options` computes them."""
    net = costs.request_overhead_s + sizes.nbytes / bytes_per_s
    return _Table(net=net, compute=sizes.compute, loss=sizes.loss, first_nbytes=sizes.rows[0])


def _chunk_options(
    chunk: ChunkOption, levels: Sequence[int], costs: CostModel, bytes_per_s: float
) -> list[_Option]:
    """Text first, then KV levels best to worst (one chunk; the policies use `_Table`)."""
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


def _decision(
    chunk: ChunkOption,
    table: _Table,
    levels: Sequence[int],
    column: int,
    reason: str,
    completion: float | None,
) -> Decision:
    return Decision(
        chunk_index=chunk.index,
        kind="text" if column == 0 else "kv",
        level=None if column == 0 else levels[column - 1],
        expected_bytes=table.first_nbytes[column],
        expected_seconds=float(table.net[0, column] + table.compute[0, column]),
        reason=reason,
        predicted_completion_s=None if completion is None else float(completion),
    )


# --------------------------------------------------------------------------------------------------------
# Compiled kernels. `_pymax(a, b)` is Python's `max(a, b)` (the first unless the second is larger), so
# every result is bit-identical to the plain-Python formulation.
# --------------------------------------------------------------------------------------------------------


@numba.njit(cache=True, inline="always")
def _pymax(a: float, b: float) -> float:
    return b if b > a else a


@numba.njit(cache=True)
def _completion_nb(
    net: npt.NDArray[np.float64],
    compute: npt.NDArray[np.float64],
    plan: npt.NDArray[np.int64],
    start_s: float,
    compute_free_s: float,
) -> float:
    """`pipeline_completion` of the plan that sends chunk i as option `plan[i]`."""
    net_done = start_s
    compute_done = _pymax(compute_free_s, start_s)
    for i in range(plan.size):
        net_done += net[i, plan[i]]
        compute_done = _pymax(compute_done, net_done) + compute[i, plan[i]]
    return compute_done


@numba.njit(cache=True)
def _dp_step(
    f: int,
    front_net: npt.NDArray[np.float64],
    front_comp: npt.NDArray[np.float64],
    k: int,
    cand_net: npt.NDArray[np.float64],
    cand_comp: npt.NDArray[np.float64],
    cand_pos: npt.NDArray[np.int64],
    k_all: int,
    shadow_count: npt.NDArray[np.int64],
    shadow_pos: npt.NDArray[np.int64],
    shadow_net: npt.NDArray[np.float64],
    shadow_comp: npt.NDArray[np.float64],
    heads: npt.NDArray[np.int64],
    out_net: npt.NDArray[np.float64],
    out_comp: npt.NDArray[np.float64],
    out_parent: npt.NDArray[np.int64],
    out_cand: npt.NDArray[np.int64],
) -> int:
    """One chunk of the Pareto-front dynamic program, as the plain-Python one: grow each of the `f`
    states by each of the chunk's `k_all` candidates (state p, candidate c is grown state p * k_all + c),
    sort by (net, compute), keep the states that finish compute sooner than every state before them
    (equal states: the first grown). Returns the number kept, written to out_* (out_cand: the position c).

    Without the sort: the states grown by one candidate come in net order already (the front is sorted
    by net), so this merges k sorted runs; equal-net groups are taken whole, of which only the one with
    the least compute (then the first grown) can be kept. Only `k` candidates (positions `cand_pos`) are
    grown: each other candidate is never faster than some grown one on either stage, so its state can
    only be kept when it equals that one's state exactly and was grown first (it is then the "first
    grown" of equal states). Those are the shadows of a grown candidate (the ones before it that it
    beats or equals on both stages); they are checked for such a tie only."""
    for c in range(k):
        heads[c] = 0
    m = 0
    cur_min = 0.0
    while True:
        found = False
        best_net = 0.0
        for c in range(k):
            h = heads[c]
            if h < f:
                v = front_net[h] + cand_net[c]
                if not found or v < best_net:
                    best_net = v
                    found = True
        if not found:
            break
        best_comp = 0.0
        best_idx = -1
        best_parent = 0
        best_pos = 0
        for c in range(k):
            h = heads[c]
            while h < f:
                v = front_net[h] + cand_net[c]
                if v != best_net:
                    break
                comp = _pymax(front_comp[h], v) + cand_comp[c]
                idx = h * k_all + cand_pos[c]
                if best_idx < 0 or comp < best_comp or (comp == best_comp and idx < best_idx):
                    best_comp = comp
                    best_idx = idx
                    best_parent = h
                    best_pos = cand_pos[c]
                for s in range(shadow_count[c]):
                    v = front_net[h] + shadow_net[c, s]
                    if v == best_net and _pymax(front_comp[h], v) + shadow_comp[c, s] == comp:
                        idx = h * k_all + shadow_pos[c, s]
                        if comp == best_comp and idx < best_idx:
                            best_idx = idx
                            best_parent = h
                            best_pos = shadow_pos[c, s]
                h += 1
            heads[c] = h
        if m == 0 or best_comp < cur_min:
            out_net[m] = best_net
            out_comp[m] = best_comp
            out_parent[m] = best_parent
            out_cand[m] = best_pos
            cur_min = best_comp
            m += 1
    return m


@numba.njit(cache=True)
def _thin(m: int, max_front: int, index: npt.NDArray[np.int64]) -> int:
    """Which of `m` states an evenly thinned front keeps (Python's `round`, half to even, as np.rint)."""
    if m <= max_front:
        for i in range(m):
            index[i] = i
        return m
    step = (m - 1) / (max_front - 1)
    for i in range(max_front):
        index[i] = int(np.rint(i * step))
    return max_front


@numba.njit(cache=True)
def _fastest_plan_nb(
    net: npt.NDArray[np.float64],
    compute: npt.NDArray[np.float64],
    loss: npt.NDArray[np.int64],
    start_s: float,
    compute_free_s: float,
    max_front: int,
) -> npt.NDArray[np.int64]:
    """`_fastest_plan`'s dynamic program; returns the option (column) per chunk."""
    n, width = net.shape
    cap = max_front * width + 1
    front_net = np.empty(cap)
    front_comp = np.empty(cap)
    front_loss = np.zeros(cap, dtype=np.int64)
    kept_net = np.empty(cap)
    kept_comp = np.empty(cap)
    kept_parent = np.empty(cap, dtype=np.int64)
    kept_cand = np.empty(cap, dtype=np.int64)
    keep = np.empty(cap, dtype=np.int64)
    kept_loss = np.empty(cap, dtype=np.int64)
    heads = np.empty(width, dtype=np.int64)
    all_net = np.empty(width)  # the chunk's candidates, by position
    all_comp = np.empty(width)
    all_col = np.empty(width, dtype=np.int64)
    cand_net = np.empty(width)  # the ones grown, with their positions and shadows
    cand_comp = np.empty(width)
    cand_pos = np.empty(width, dtype=np.int64)
    shadow_count = np.zeros(width, dtype=np.int64)
    shadow_pos = np.empty((width, width), dtype=np.int64)
    shadow_net = np.empty((width, width))
    shadow_comp = np.empty((width, width))
    parents = np.empty((n, max_front), dtype=np.int64)
    columns = np.empty((n, max_front), dtype=np.int64)
    front_net[0] = start_s
    front_comp[0] = _pymax(compute_free_s, start_s)
    f = 1
    for i in range(n):
        k_all = 0  # candidates: the options no other option of this chunk dominates (`_dominates`)
        for b in range(width):
            dominated = False
            for a in range(width):
                no_worse = (
                    net[i, a] <= net[i, b] and compute[i, a] <= compute[i, b] and loss[i, a] <= loss[i, b]
                )
                if no_worse and (
                    net[i, a] < net[i, b] or compute[i, a] < compute[i, b] or loss[i, a] < loss[i, b]
                ):
                    dominated = True
                    break
            if not dominated:
                all_net[k_all] = net[i, b]
                all_comp[k_all] = compute[i, b]
                all_col[k_all] = b
                k_all += 1
        # Grow a candidate unless another one is no slower on both stages: one before it (its state is
        # then never kept), or one after it that differs (it is then a shadow of that one).
        k = 0
        for c in range(k_all):
            earlier = False
            later = False
            for d in range(k_all):
                if d != c and all_net[d] <= all_net[c] and all_comp[d] <= all_comp[c]:
                    if d < c:
                        earlier = True
                    elif all_net[d] != all_net[c] or all_comp[d] != all_comp[c]:
                        later = True
            if not earlier and not later:
                cand_net[k] = all_net[c]
                cand_comp[k] = all_comp[c]
                cand_pos[k] = c
                k += 1
        for g in range(k):
            shadow_count[g] = 0
            e = cand_pos[g]
            for c in range(e):
                if all_net[e] <= all_net[c] and all_comp[e] <= all_comp[c]:
                    shadow_pos[g, shadow_count[g]] = c
                    shadow_net[g, shadow_count[g]] = all_net[c]
                    shadow_comp[g, shadow_count[g]] = all_comp[c]
                    shadow_count[g] += 1
        m = _dp_step(
            f, front_net, front_comp, k, cand_net, cand_comp, cand_pos, k_all,
            shadow_count, shadow_pos, shadow_net, shadow_comp, heads,
            kept_net, kept_comp, kept_parent, kept_cand,
        )  # fmt: skip
        f = _thin(m, max_front, keep)
        for j in range(f):
            s = keep[j]
            parent = kept_parent[s]
            column = all_col[kept_cand[s]]
            parents[i, j] = parent
            columns[i, j] = column
            kept_loss[j] = front_loss[parent] + loss[i, column]
        for j in range(f):
            front_net[j] = kept_net[keep[j]]
            front_comp[j] = kept_comp[keep[j]]
            front_loss[j] = kept_loss[j]
    best = 0
    for j in range(1, f):
        if front_comp[j] < front_comp[best] or (
            front_comp[j] == front_comp[best] and front_loss[j] < front_loss[best]
        ):
            best = j
    plan = np.empty(n, dtype=np.int64)
    state = best
    for i in range(n - 1, -1, -1):
        plan[i] = columns[i, state]
        state = parents[i, state]
    return plan


@numba.njit(cache=True)
def _fast_stages_nb(
    net: npt.NDArray[np.float64], compute: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """Per chunk, the (network s, compute s) pairs that can be on a fastest plan, by network time (the
    pairs no other option beats on both stages): `_fast_stages`. Returns (net, compute, count) arrays."""
    n, width = net.shape
    out_net = np.empty((n, width))
    out_comp = np.empty((n, width))
    counts = np.zeros(n, dtype=np.int64)
    pair_net = np.empty(width)
    pair_comp = np.empty(width)
    for i in range(n):
        for b in range(width):  # insertion sort by (net, compute)
            x, y = net[i, b], compute[i, b]
            j = b
            while j > 0 and (pair_net[j - 1] > x or (pair_net[j - 1] == x and pair_comp[j - 1] > y)):
                pair_net[j] = pair_net[j - 1]
                pair_comp[j] = pair_comp[j - 1]
                j -= 1
            pair_net[j] = x
            pair_comp[j] = y
        kept = 0
        for b in range(width):
            if kept == 0 or pair_comp[b] < out_comp[i, kept - 1]:
                out_net[i, kept] = pair_net[b]
                out_comp[i, kept] = pair_comp[b]
                kept += 1
        counts[i] = kept
    return out_net, out_comp, counts


@numba.njit(cache=True)
def _fastest_completion_nb(
    first_net: float,
    first_comp: float,
    stage_net: npt.NDArray[np.float64],
    stage_comp: npt.NDArray[np.float64],
    counts: npt.NDArray[np.int64],
    start_s: float,
    compute_free_s: float,
    max_front: int,
    give_up_above: float,
) -> float:
    """`_fastest_completion`: the next chunk fixed to (first_net, first_comp), the chunks of the stage
    arrays (from `_fast_stages_nb`) after it at their fastest.

    give_up_above: stop as soon as the answer is known to exceed it, and return a value above it (the
    front's least compute time only grows from chunk to chunk: every state computes no sooner than its
    parent, and thinning only removes states); pass inf for the exact completion."""
    n, width = stage_net.shape
    cap = max_front * width + 1
    front_net = np.empty(cap)
    front_comp = np.empty(cap)
    kept_net = np.empty(cap)
    kept_comp = np.empty(cap)
    kept_parent = np.empty(cap, dtype=np.int64)
    kept_cand = np.empty(cap, dtype=np.int64)
    keep = np.empty(cap, dtype=np.int64)
    heads = np.empty(width, dtype=np.int64)
    positions = np.arange(width)
    no_shadows = np.zeros(width, dtype=np.int64)
    shadow_pos = np.empty((width, 1), dtype=np.int64)
    shadow_val = np.empty((width, 1))
    net_done = start_s + first_net
    front_net[0] = net_done
    front_comp[0] = _pymax(compute_free_s, net_done) + first_comp
    f = 1
    for i in range(n):
        m = _dp_step(
            f, front_net, front_comp, counts[i], stage_net[i], stage_comp[i], positions, counts[i],
            no_shadows, shadow_pos, shadow_val, shadow_val, heads,
            kept_net, kept_comp, kept_parent, kept_cand,
        )  # fmt: skip
        f = _thin(m, max_front, keep)
        for j in range(f):
            front_net[j] = kept_net[keep[j]]
            front_comp[j] = kept_comp[keep[j]]
        if front_comp[f - 1] > give_up_above:  # the least compute time: the front's last state
            return front_comp[f - 1]
    best = front_comp[0]
    for j in range(1, f):
        if front_comp[j] < best:
            best = front_comp[j]
    return best


@numba.njit(cache=True)
def _upgrade_nb(
    net: npt.NDArray[np.float64],
    compute: npt.NDArray[np.float64],
    loss: npt.NDArray[np.int64],
    plan: npt.NDArray[np.int64],
    start_s: float,
    compute_free_s: float,
    deadline_s: float,
) -> float:
    """`_upgrade`, in place on `plan` (option columns); returns the upgraded plan's completion.

    In rounds, last chunk first, try one level up (column = the current level's rank) and then text
    (column 0) for every chunk not yet at loss 0; keep the first trial whose whole plan still meets the
    deadline. A trial re-runs the pipeline from its chunk only, and stops once compute passes the deadline;
    a kept change re-runs the states after it (those before it cannot change)."""
    n = plan.size
    nets = np.empty(n + 1)
    comps = np.empty(n + 1)
    nets[0] = start_s
    comps[0] = _pymax(compute_free_s, start_s)
    for j in range(n):
        nets[j + 1] = nets[j] + net[j, plan[j]]
        comps[j + 1] = _pymax(comps[j], nets[j + 1]) + compute[j, plan[j]]
    # A shortcut for the trials: from state (net, comp) before chunk j, the plan finishes at
    # max(comp + tail_comp, net + tail_span) in exact arithmetic (tail_comp: the compute of chunks j..;
    # tail_span: the most, over k >= j, of the network time of chunks j..k plus the compute of k..).
    # The float pipeline differs from it by rounding only, at most `_ROUNDING` x chunks x magnitude; a
    # trial whose shortcut is that far from the deadline gets the pipeline's answer without running the
    # pipeline, and any nearer one runs it.
    changed = True
    while changed:
        changed = False
        tail_comp = 0.0  # for the chunks after i
        tail_span = -np.inf
        for i in range(n - 1, -1, -1):
            level_loss = loss[i, plan[i]]
            if level_loss != 0:
                for trial in range(2):
                    candidate = level_loss if trial == 0 else 0
                    net_done = nets[i] + net[i, candidate]
                    comp = _pymax(comps[i], net_done) + compute[i, candidate]
                    decided = False
                    fits = False
                    if i + 1 < n:
                        estimate = max(comp + tail_comp, net_done + tail_span)
                        scale = abs(comp) + abs(net_done) + abs(tail_comp) + abs(tail_span) + abs(deadline_s)
                        tolerance = _ROUNDING * (n + 2) * scale
                        if np.isfinite(scale) and estimate <= deadline_s - tolerance:
                            decided, fits = True, True
                        elif np.isfinite(scale) and estimate > deadline_s + tolerance:
                            decided, fits = True, False
                    if not decided:
                        for j in range(i + 1, n):
                            if comp > deadline_s:
                                break
                            net_done += net[j, plan[j]]
                            comp = _pymax(comp, net_done) + compute[j, plan[j]]
                        fits = comp <= deadline_s
                    if fits:
                        plan[i] = candidate
                        for j in range(i, n):
                            nets[j + 1] = nets[j] + net[j, plan[j]]
                            comps[j + 1] = _pymax(comps[j], nets[j + 1]) + compute[j, plan[j]]
                        changed = True
                        break
            a = net[i, plan[i]]
            b = compute[i, plan[i]]
            tail_span = a + max(b + tail_comp, tail_span)
            tail_comp = b + tail_comp
    return comps[n]


# --------------------------------------------------------------------------------------------------------
# Policies
# --------------------------------------------------------------------------------------------------------


def _fastest_plan(table: _Table, start_s: float, compute_free_s: float) -> npt.NDArray[np.int64]:
    """The plan (option column per chunk) with the earliest completion, by dynamic programming over the
    (net_done, compute_done) Pareto front, ties to the lower loss. Only options not dominated in (net,
    compute, loss) can be in it; with a level-independent decode cost only the smallest level and text
    can be fastest. Exact while the front holds at most `_MAX_FRONT` states (contexts up to ~40 chunks of
    equal size); above that the front is thinned evenly, keeping both ends, which bounds the cost and
    makes the result near-fastest."""
    return _fastest_plan_nb(table.net, table.compute, table.loss, start_s, compute_free_s, _MAX_FRONT)


def _completion(table: _Table, plan: npt.NDArray[np.int64], start_s: float, compute_free_s: float) -> float:
    return float(_completion_nb(table.net, table.compute, plan, start_s, compute_free_s))


def _uniform(table: _Table, rank: int) -> npt.NDArray[np.int64]:
    return np.full(table.net.shape[0], 1 + rank, dtype=np.int64)


def _plan_lookahead(
    table: _Table, start_s: float, compute_free_s: float, deadline_s: float
) -> tuple[npt.NDArray[np.int64], float, bool]:
    """Best-quality plan that meets the deadline, by greedy upgrades from two starting plans.

    Starts: the fastest plan (`_fastest_plan`) and the best uniform-level plan that meets the deadline
    (what CacheGen's rule would assume), if any; the better result wins, so the lookahead never plans
    worse quality than CacheGen's rule would at the same throughput. Upgrades go one level at a time in
    rounds, last chunk first, so the plan keeps its slack early (anything saved now is spent by the next
    re-plan, with a fresher throughput estimate). A chunk that cannot go one level up is tried as text
    (which is exact). Returns (plan as option columns, predicted completion, feasible).
    """
    fastest = _fastest_plan(table, start_s, compute_free_s)
    fastest_completion = _completion(table, fastest, start_s, compute_free_s)
    if fastest_completion > deadline_s:
        return fastest, fastest_completion, False
    starts = [fastest]
    for rank in range(table.net.shape[1] - 1):
        uniform = _uniform(table, rank)
        if _completion(table, uniform, start_s, compute_free_s) <= deadline_s:
            starts.append(uniform)
            break
    best: tuple[int, float, npt.NDArray[np.int64]] | None = None
    rows = np.arange(table.net.shape[0])
    for plan in starts:
        plan = plan.copy()
        completion = float(
            _upgrade_nb(table.net, table.compute, table.loss, plan, start_s, compute_free_s, deadline_s)
        )
        quality = int(table.loss[rows, plan].sum())
        if best is None or (quality, completion) < best[:2]:
            best = (quality, completion, plan)
    assert best is not None
    return best[2], best[1], True


def _plan_cachegen(
    table: _Table, start_s: float, compute_free_s: float, deadline_s: float
) -> tuple[int, float, bool]:
    """CacheGen's rule for the next chunk: best level such that sending every remaining chunk at that
    level meets the deadline; else whichever of smallest level / text finishes everything sooner.
    Returns (option column, predicted completion, feasible)."""
    n_kv = table.net.shape[1] - 1
    for rank in range(n_kv):
        completion = _completion(table, _uniform(table, rank), start_s, compute_free_s)
        if completion <= deadline_s:
            return 1 + rank, completion, True
    t_small = _completion(table, _uniform(table, n_kv - 1), start_s, compute_free_s)
    t_text = _completion(table, _uniform(table, -1), start_s, compute_free_s)
    return (0, t_text, False) if t_text < t_small else (n_kv, t_small, False)


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
    sorted_levels = sorted(levels)
    sizes = _sizes(remaining, sorted_levels, costs)
    table = _table(sizes, costs, bytes_per_s)
    compute_free = elapsed_s if compute_free_s is None else compute_free_s
    plan, completion, feasible = _plan_lookahead(table, elapsed_s, compute_free, slo_s)
    reason = "lookahead: best plan within SLO" if feasible else "lookahead: SLO infeasible, fastest plan"
    decisions = []
    for position, (chunk, column) in enumerate(zip(remaining, plan.tolist(), strict=True)):
        nbytes = chunk.num_tokens * costs.text_bytes_per_token if column == 0 else None
        decisions.append(
            Decision(
                chunk_index=chunk.index,
                kind="text" if column == 0 else "kv",
                level=None if column == 0 else sorted_levels[column - 1],
                expected_bytes=nbytes if nbytes is not None else chunk.level_bytes[sorted_levels[column - 1]],
                expected_seconds=float(table.net[position, column] + table.compute[position, column]),
                reason=reason,
                predicted_completion_s=completion,
            )
        )
    return decisions


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
    return _choose_next(
        remaining, levels, mode, costs, elapsed_s, bytes_per_s, policy, compute_free_s, sizes=None
    )


def _choose_next(
    remaining: Sequence[ChunkOption],
    levels: Sequence[int],
    mode: Mode,
    costs: CostModel,
    elapsed_s: float,
    bytes_per_s: float | None,
    policy: Policy,
    compute_free_s: float | None,
    sizes: _Sizes | None,
) -> Decision:
    """`choose_next`; `sizes`, when given, is `_sizes(remaining, sorted(levels), costs)` (a `Controller`
    slices it from the whole context's instead of rebuilding it per chunk)."""
    _check_step(remaining, elapsed_s, bytes_per_s)
    sorted_levels = sorted(levels)
    chunk = remaining[0]
    if mode.kind in ("fixed_level", "text"):
        options = _chunk_options(
            chunk, sorted_levels, costs, math.inf if bytes_per_s is None else bytes_per_s
        )
        if mode.kind == "text":
            return _option_decision(chunk, options[0], "fixed text")
        if mode.level not in sorted_levels:
            raise InvalidInputError(f"fixed level {mode.level} is not one of {sorted_levels}")
        return _option_decision(chunk, options[1 + sorted_levels.index(mode.level)], "fixed level")
    deadline = mode.deadline_s
    if deadline is None or bytes_per_s is None:
        raise InvalidInputError("adaptive mode needs an SLO and a throughput estimate")
    if policy not in POLICIES:
        raise InvalidInputError(f"unknown policy {policy!r}; expected one of {POLICIES}")
    compute_free = elapsed_s if compute_free_s is None else compute_free_s
    if sizes is None:
        sizes = _sizes(remaining, sorted_levels, costs)
    table = _table(sizes, costs, bytes_per_s)
    if policy == "robust":
        return _choose_robust(
            chunk, sizes, table, sorted_levels, mode, costs, elapsed_s, bytes_per_s, compute_free
        )
    if policy == "cachegen":
        column, completion, feasible = _plan_cachegen(table, elapsed_s, compute_free, deadline)
        reason = (
            "cachegen: best uniform level within SLO" if feasible else "cachegen: SLO infeasible, fastest"
        )
    else:
        plan, completion, feasible = _plan_lookahead(table, elapsed_s, compute_free, deadline)
        column = int(plan[0])
        reason = "lookahead: best plan within SLO" if feasible else "lookahead: SLO infeasible, fastest plan"
    floor = mode.insurance_floor(bytes_per_s)
    if floor is not None:
        insured = _insure(column, sizes, table, costs, floor, elapsed_s, compute_free, deadline)
        if insured != column:
            column, reason = insured, reason + "; lowered to stay insured against the floor throughput"
    return _decision(chunk, table, sorted_levels, column, reason, completion)


def _option_decision(chunk: ChunkOption, option: _Option, reason: str) -> Decision:
    return Decision(
        chunk_index=chunk.index,
        kind=option.kind,
        level=option.level,
        expected_bytes=option.nbytes,
        expected_seconds=option.net_s + option.compute_s,
        reason=reason,
        predicted_completion_s=None,
    )


class _WhatIf:
    """The robust policy's what-if questions about the next chunk, answered once each: the completion if
    the next chunk goes as option `column` and every later chunk as fast as possible, at one throughput."""

    def __init__(self, table: _Table, start_s: float, compute_free_s: float) -> None:
        self.table = table
        self.start_s = start_s
        self.compute_free_s = compute_free_s
        self.stages = _fast_stages_nb(table.net[1:], table.compute[1:])
        self.exact: dict[int, float] = {}
        self.above: dict[int, float] = {}  # known to be later than this

    def _run(self, column: int, give_up_above: float) -> float:
        stage_net, stage_comp, counts = self.stages
        return float(
            _fastest_completion_nb(
                float(self.table.net[0, column]),
                float(self.table.compute[0, column]),
                stage_net,
                stage_comp,
                counts,
                self.start_s,
                self.compute_free_s,
                _MAX_FRONT,
                give_up_above,
            )
        )

    def completion(self, column: int) -> float:
        if column not in self.exact:
            self.exact[column] = self._run(column, math.inf)
        return self.exact[column]

    def meets(self, column: int, deadline_s: float) -> bool:
        """completion(column) <= deadline_s, giving up on the plan once it is sure to be late."""
        if column in self.exact:
            return self.exact[column] <= deadline_s
        if column in self.above and self.above[column] >= deadline_s:
            return False
        value = self._run(column, deadline_s)
        if value <= deadline_s:
            self.exact[column] = value  # it ran to the end
            return True
        self.above[column] = max(deadline_s, self.above.get(column, -math.inf))
        return False

    def soonest(self, columns: Sequence[int]) -> int:
        """`min(columns, key=self.completion)` (the first of equals), without finishing the plans that
        are sure to be later than the best so far."""
        best = columns[0]
        best_s = self.completion(best)
        for column in columns[1:]:
            if column in self.above and self.above[column] >= best_s:
                continue
            value = self.exact[column] if column in self.exact else self._run(column, best_s)
            if value <= best_s:
                self.exact[column] = value
                if value < best_s:
                    best, best_s = column, value
        return best


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
    table = _table(_sizes(remaining, levels, costs), costs, floor_bytes_per_s)
    return _WhatIf(table, start_s, compute_free_s).completion(first_index)


def _insure(
    chosen: int,
    sizes: _Sizes,
    table: _Table,
    costs: CostModel,
    floor_bytes_per_s: float,
    start_s: float,
    compute_free_s: float,
    deadline_s: float,
) -> int:
    """The best-quality option (column) for the next chunk, no bigger than `chosen`, whose worst case
    (this chunk and every later one at the floor throughput, later ones sent as fast as possible) meets
    the deadline; `chosen` itself if it is insured or if nothing is."""
    worst = _WhatIf(_table(sizes, costs, floor_bytes_per_s), start_s, compute_free_s)
    if worst.meets(chosen, deadline_s):
        return chosen
    nbytes = table.first_nbytes
    insured = [c for c in range(len(nbytes)) if nbytes[c] < nbytes[chosen] and worst.meets(c, deadline_s)]
    return min(insured, key=lambda c: (int(table.loss[0, c]), nbytes[c])) if insured else chosen


def _choose_robust(
    chunk: ChunkOption,
    sizes: _Sizes,
    table: _Table,
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
    deadline = mode.deadline_s
    assert deadline is not None
    plan, completion, feasible = _plan_lookahead(table, elapsed_s, compute_free_s, deadline)
    if not feasible:
        rise = _smallest_feasible_rise(sizes, costs, bytes_per_s, elapsed_s, compute_free_s, deadline)
        if rise is None:
            reason = "robust: SLO infeasible, fastest plan"
            return _decision(chunk, table, levels, int(plan[0]), reason, completion)
        hoped = _table(sizes, costs, bytes_per_s * rise)
        hoped_plan, _, _ = _plan_lookahead(hoped, elapsed_s, compute_free_s, deadline)
        reason = f"robust: SLO infeasible at the prediction, planned for a {rise:.2g}x rise"
        return _decision(chunk, table, levels, int(hoped_plan[0]), reason, completion)
    floor = mode.insurance_floor(bytes_per_s)
    if floor is None:
        floor = ROBUST_DROP_FACTOR * bytes_per_s
    what_if_drop = _WhatIf(_table(sizes, costs, floor), elapsed_s, compute_free_s)  # the link fell now
    nominal = _WhatIf(table, elapsed_s, compute_free_s)

    def insured(column: int) -> bool:
        return what_if_drop.completion(column) <= deadline

    def viable(column: int) -> bool:  # the fastest continuation at the prediction meets the deadline
        return nominal.meets(column, deadline)

    chosen = int(plan[0])
    if insured(chosen):
        return _decision(chunk, table, levels, chosen, "robust: best plan within SLO, insured", completion)
    # Best quality first (then fewer bytes); insuring against the unlikely case must not give up the
    # likely one, so only viable options count.
    nbytes = table.first_nbytes
    by_quality = sorted(range(len(nbytes)), key=lambda c: (int(table.loss[0, c]), nbytes[c]))
    for column in by_quality:
        if insured(column) and viable(column):
            reason = "robust: lowered to stay insured against a drop"
            return _decision(chunk, table, levels, column, reason, completion)
    candidates = [c for c in by_quality if viable(c)] or [chosen]
    safest = what_if_drop.soonest(candidates)
    reason = "robust: no option insured against a drop, safest one within SLO"
    return _decision(chunk, table, levels, safest, reason, completion)


def _smallest_feasible_rise(
    sizes: _Sizes,
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
        table = _table(sizes, costs, bytes_per_s * factor)
        first_net, first_comp, first_count = _fast_stages_nb(table.net[:1], table.compute[:1])
        what_if = _WhatIf(table, elapsed_s, compute_free_s)
        stage_net, stage_comp, counts = what_if.stages
        return any(
            _fastest_completion_nb(
                float(first_net[0, j]),
                float(first_comp[0, j]),
                stage_net,
                stage_comp,
                counts,
                elapsed_s,
                compute_free_s,
                _MAX_FRONT,
                deadline_s,
            )
            <= deadline_s
            for j in range(int(first_count[0]))
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
        self._context_sizes: _Sizes | None = None  # the whole context's, built at the first adaptive decision

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
        sizes = None
        if self.mode.kind == "adaptive":
            if self._context_sizes is None:
                self._context_sizes = _sizes(self.context.chunks, self.context.levels, self.costs)
            sizes = _tail(self._context_sizes, len(self.decisions))
        decision = _choose_next(
            remaining,
            self.context.levels,
            self.mode,
            self.costs,
            elapsed_s,
            bytes_per_s,
            self.policy,
            compute_free_s,
            sizes,
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


@functools.cache
def warm_up() -> None:
    """Compile (or load from numba's on-disk cache) every planning routine, once per process.

    The first adaptive decision otherwise pays it: about a second from the cache, ten without one (a
    fresh install). Clients and servers call this before they start timing a load or a stream.
    """
    levels = (0, 1, 2)
    chunks = tuple(ChunkOption(i, 256, {0: 4000, 1: 2000, 2: 1000}) for i in range(4))
    context = ContextOptions(levels, chunks)
    costs = CostModel(recompute_s_per_token=1e-4, decode_s_per_chunk=1e-3, request_overhead_s=1e-4)
    for policy in POLICIES:
        estimator = ThroughputEstimator(prior_bytes_per_s=1e7)
        controller = Controller(context, Mode.adaptive(slo_s=0.05), costs, policy=policy, estimator=estimator)
        while not controller.done:
            controller.decide(0.0)
            controller.record_transfer(100_000, 0.01)
