"""Bandwidth emulation for the transport: a token bucket that follows a (possibly time-varying) trace.

Lets tests and benchmarks reproduce CacheGen's bandwidth experiments on loopback. The clock and the sleep
functions are injected, so tests run on a fake clock and never really sleep.

Spec strings (CLI and SDK), parsed by `parse_throttle`:
    "1gbps", "500mbps", "20kbps", "1e9bps"      bits per second (decimal)
    "100MB/s", "64KiB/s", "1GB/s"              bytes per second ("B/s" means bytes, in any case)
    "trace:step-down"                          a built-in trace (see `NAMED_TRACES`)
    "trace:/path/file.csv", "trace:x.json"     a trace file: rows/pairs of (duration_s, gbps)
    "none", "off", "unlimited"                 no throttle
"""

from __future__ import annotations

import asyncio
import bisect
import csv
import json
import math
import random
import re
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvwire.errors import InvalidInputError

BYTES_PER_GBPS = 1e9 / 8


class BandwidthTrace:
    """Piecewise-constant bandwidth over time, from (duration_s, gbps) segments.

    Time is seconds since the trace started. With `loop` the trace repeats; without it the last segment's
    rate holds forever. Rates may be 0 (an outage) but not all of them.
    """

    def __init__(self, segments: Sequence[tuple[float, float]], *, loop: bool = True, name: str = "custom"):
        if not segments:
            raise InvalidInputError("a bandwidth trace needs at least one segment")
        for duration_s, gbps in segments:
            if not (math.isfinite(duration_s) and duration_s > 0):
                raise InvalidInputError(f"trace segment duration must be finite and > 0, got {duration_s}")
            if not (math.isfinite(gbps) and gbps >= 0):
                raise InvalidInputError(f"trace segment rate must be finite and >= 0 Gbps, got {gbps}")
        if all(gbps == 0 for _, gbps in segments):
            raise InvalidInputError("a bandwidth trace cannot be 0 Gbps throughout")
        if not loop and segments[-1][1] == 0:
            raise InvalidInputError("a non-looping trace cannot end with a 0 Gbps segment")
        self.name = name
        self.loop = loop
        self.segments: tuple[tuple[float, float], ...] = tuple((float(d), float(g)) for d, g in segments)
        self._starts = [0.0]  # segment start times
        self._cum = [0.0]  # bytes sent by each segment start
        for duration_s, gbps in self.segments:
            self._starts.append(self._starts[-1] + duration_s)
            self._cum.append(self._cum[-1] + duration_s * gbps * BYTES_PER_GBPS)
        self.duration_s = self._starts[-1]
        self._period_bytes = self._cum[-1]

    @classmethod
    def constant(cls, gbps: float) -> BandwidthTrace:
        if not (math.isfinite(gbps) and gbps > 0):
            raise InvalidInputError(f"bandwidth must be finite and > 0 Gbps, got {gbps}")
        return cls([(1.0, gbps)], name=f"constant-{gbps:g}g")

    @classmethod
    def from_file(cls, path: str | Path, *, loop: bool = True) -> BandwidthTrace:
        """CSV rows `duration_s,gbps` (an optional header row is skipped), or JSON: a list of
        [duration_s, gbps] pairs, or {"loop": bool, "segments": [{"duration_s": ..., "gbps": ...}, ...]}."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise InvalidInputError(f"cannot read bandwidth trace {path}: {exc}") from exc
        try:
            if path.suffix.lower() == ".json":
                data = json.loads(text)
                if isinstance(data, dict):
                    loop = bool(data.get("loop", loop))
                    segments = [(float(s["duration_s"]), float(s["gbps"])) for s in data["segments"]]
                else:
                    segments = [(float(d), float(g)) for d, g in data]
            else:
                rows = [r for r in csv.reader(text.splitlines()) if r and not r[0].lstrip().startswith("#")]
                if rows and not _is_number(rows[0][0]):
                    rows = rows[1:]  # header
                segments = [(float(r[0]), float(r[1])) for r in rows]
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise InvalidInputError(f"malformed bandwidth trace {path}: {exc}") from exc
        return cls(segments, loop=loop, name=path.name)

    @classmethod
    def named(cls, name: str) -> BandwidthTrace:
        if name not in NAMED_TRACES:
            raise InvalidInputError(f"unknown bandwidth trace {name!r}; built-in: {sorted(NAMED_TRACES)}")
        return cls(NAMED_TRACES[name](), name=name)

    def rate_at(self, t: float) -> float:
        """Bytes per second at time t."""
        t = self._fold(t)[1]
        i = min(bisect.bisect_right(self._starts, t) - 1, len(self.segments) - 1)
        return self.segments[i][1] * BYTES_PER_GBPS

    def bytes_by(self, t: float) -> float:
        """Bytes the link could have carried from time 0 to time t."""
        if t <= 0:
            return 0.0
        periods, t = self._fold(t)
        if t >= self.duration_s:  # non-looping, past the end: the last rate holds
            extra = (t - self.duration_s) * self.segments[-1][1] * BYTES_PER_GBPS
            return self._period_bytes + extra
        i = bisect.bisect_right(self._starts, t) - 1
        return (
            periods * self._period_bytes
            + self._cum[i]
            + (t - self._starts[i]) * self.segments[i][1] * BYTES_PER_GBPS
        )

    def bytes_between(self, t0: float, t1: float) -> float:
        return self.bytes_by(t1) - self.bytes_by(t0)

    def time_to_send(self, t0: float, nbytes: float) -> float:
        """Earliest time t1 >= t0 by which `nbytes` can have been carried starting at t0."""
        if nbytes <= 0:
            return t0
        target = self.bytes_by(t0) + nbytes
        if target >= self._period_bytes and not self.loop:
            tail_s = (target - self._period_bytes) / (self.segments[-1][1] * BYTES_PER_GBPS)
            return max(t0, self.duration_s + tail_s)
        periods = math.floor(target / self._period_bytes) if self.loop else 0
        rest = target - periods * self._period_bytes
        if (
            rest == 0 and periods > 0
        ):  # lands exactly on a period boundary: finish at the previous period's end
            periods, rest = periods - 1, self._period_bytes
        i = max(bisect.bisect_left(self._cum, rest) - 1, 0)
        rate = self.segments[i][1] * BYTES_PER_GBPS
        within = (rest - self._cum[i]) / rate if rate > 0 else 0.0
        return max(t0, periods * self.duration_s + self._starts[i] + within)

    def shifted(self, offset_s: float) -> BandwidthTrace:
        """The same link seen from ``offset_s`` seconds into this trace: its time 0 is this trace's
        ``offset_s`` (a looping trace wraps around), so a real-time run can start at any phase."""
        if not (math.isfinite(offset_s) and offset_s >= 0):
            raise InvalidInputError(f"trace offset must be finite and >= 0, got {offset_s}")
        t = self._fold(offset_s)[1]
        if t >= self.duration_s:  # non-looping, past the end: the last rate holds
            return BandwidthTrace([(1.0, self.segments[-1][1])], loop=False, name=f"{self.name}@{offset_s:g}")
        head, tail = [], []
        for start, (duration_s, gbps) in zip(self._starts, self.segments, strict=False):
            end = start + duration_s
            if end <= t:
                head.append((duration_s, gbps))
            elif start >= t:
                tail.append((duration_s, gbps))
            else:  # the segment the offset falls in: split it
                tail.append((end - t, gbps))
                head.append((t - start, gbps))
        segments = tail + head if self.loop else tail
        return BandwidthTrace(
            [(d, g) for d, g in segments if d > 0], loop=self.loop, name=f"{self.name}@{offset_s:g}"
        )

    def _fold(self, t: float) -> tuple[int, float]:
        if not self.loop or t < self.duration_s:
            return 0, t
        periods = math.floor(t / self.duration_s)
        return periods, t - periods * self.duration_s

    def __repr__(self) -> str:
        return f"BandwidthTrace({self.name!r}, {len(self.segments)} segments, {self.duration_s:g} s)"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _random_walk(seed: int, step_s: float, steps: int, low: float, high: float) -> list[tuple[float, float]]:
    """Random walk in log-rate between low and high Gbps (reflecting at the bounds)."""
    rng = random.Random(seed)
    lo, hi = math.log(low), math.log(high)
    x = (lo + hi) / 2
    segments = []
    for _ in range(steps):
        x += rng.gauss(0.0, 0.35)
        if x < lo:
            x = 2 * lo - x
        if x > hi:
            x = 2 * hi - x
        x = min(max(x, lo), hi)
        segments.append((step_s, round(math.exp(x), 4)))
    return segments


def _lte_like(seed: int) -> list[tuple[float, float]]:
    """A cellular-like trace: a Markov chain over good/fair/poor/outage-ish states with random dwell times."""
    rng = random.Random(seed)
    states = {"good": 1.5, "fair": 0.6, "poor": 0.2, "bad": 0.05}
    moves = {
        "good": ["good", "fair", "fair", "poor"],
        "fair": ["good", "fair", "poor", "poor"],
        "poor": ["fair", "fair", "poor", "bad"],
        "bad": ["poor", "fair"],
    }
    state, segments, total = "fair", [], 0.0
    while total < 60.0:
        dwell = round(min(max(rng.expovariate(1 / 0.4), 0.05), 2.0), 3)
        gbps = states[state] * rng.uniform(0.7, 1.3)
        segments.append((dwell, round(gbps, 4)))
        total += dwell
        state = rng.choice(moves[state])
    return segments


NAMED_TRACES: dict[str, Callable[[], list[tuple[float, float]]]] = {
    "steady-1g": lambda: [(60.0, 1.0)],
    "step-down": lambda: [(1.0, 2.0), (59.0, 0.2)],
    "step-up": lambda: [(1.0, 0.2), (59.0, 2.0)],
    "fluctuating": lambda: _random_walk(seed=7, step_s=0.1, steps=600, low=0.1, high=3.0),
    "lte-like": lambda: _lte_like(seed=11),
}


class TokenBucket:
    """Token bucket whose fill rate follows a bandwidth trace; usable from threads and from asyncio.

    `acquire(n)` reserves n bytes and sleeps until the bucket has paid for them. A reservation larger than
    the bucket is allowed: the bucket goes into debt and later callers wait for it to be paid back, so the
    long-run rate is the trace's rate and no more than `burst_bytes` ever leave at once after idling.
    Trace time 0 is when the bucket is created.
    """

    def __init__(
        self,
        rate_bytes_per_s: float | None = None,
        burst_bytes: int = 64 * 1024,
        *,
        trace: BandwidthTrace | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        async_sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        if (rate_bytes_per_s is None) == (trace is None):
            raise InvalidInputError("give exactly one of rate_bytes_per_s and trace")
        if rate_bytes_per_s is not None:
            if not (math.isfinite(rate_bytes_per_s) and rate_bytes_per_s > 0):
                raise InvalidInputError(f"rate must be finite and > 0 bytes/s, got {rate_bytes_per_s}")
            trace = BandwidthTrace.constant(rate_bytes_per_s / BYTES_PER_GBPS)
        if burst_bytes <= 0:
            raise InvalidInputError(f"burst_bytes must be > 0, got {burst_bytes}")
        assert trace is not None
        self.trace = trace
        self.burst_bytes = burst_bytes
        self._clock = clock
        self._sleep = sleep
        self._async_sleep = async_sleep
        self._lock = threading.Lock()
        self._origin = clock()
        self._last = 0.0
        self._tokens = float(burst_bytes)

    def rate_now(self) -> float:
        """The trace's current rate in bytes/s."""
        return self.trace.rate_at(self._clock() - self._origin)

    def reserve(self, nbytes: int) -> float:
        """Take `nbytes` now and return how many seconds the caller must wait before sending them."""
        if nbytes < 0:
            raise InvalidInputError(f"cannot acquire {nbytes} bytes")
        with self._lock:
            now = max(self._clock() - self._origin, self._last)
            self._tokens = min(self.burst_bytes, self._tokens + self.trace.bytes_between(self._last, now))
            self._last = now
            self._tokens -= nbytes
            if self._tokens >= 0:
                return 0.0
            return self.trace.time_to_send(now, -self._tokens) - now

    def acquire(self, nbytes: int) -> None:
        """Block (via the injected sleep) until `nbytes` may be sent."""
        wait_s = self.reserve(nbytes)
        if wait_s > 0:
            self._sleep(wait_s)

    async def acquire_async(self, nbytes: int) -> None:
        """Like `acquire`, but awaits instead of blocking the event loop."""
        wait_s = self.reserve(nbytes)
        if wait_s > 0:
            await self._async_sleep(wait_s)


def throttled(chunks: Iterable[bytes], bucket: TokenBucket | None) -> Iterator[bytes]:
    """Yield each chunk once the bucket allows its size through (unchanged if `bucket` is None)."""
    for chunk in chunks:
        if bucket is not None:
            bucket.acquire(len(chunk))
        yield chunk


async def athrottled(chunks: AsyncIterable[bytes], bucket: TokenBucket | None) -> AsyncIterator[bytes]:
    """Async version of `throttled`."""
    async for chunk in chunks:
        if bucket is not None:
            await bucket.acquire_async(len(chunk))
        yield chunk


@dataclass(frozen=True)
class ThrottleConfig:
    """A parsed throttle spec: the trace to follow and the bucket depth."""

    trace: BandwidthTrace
    burst_bytes: int

    def make_bucket(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        async_sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> TokenBucket:
        return TokenBucket(
            trace=self.trace, burst_bytes=self.burst_bytes, clock=clock, sleep=sleep, async_sleep=async_sleep
        )


_BIT_UNITS = {"bps": 1.0, "kbps": 1e3, "mbps": 1e6, "gbps": 1e9, "tbps": 1e12}
_BYTE_UNITS = {
    "b/s": 1.0,
    "kb/s": 1e3,
    "mb/s": 1e6,
    "gb/s": 1e9,
    "kib/s": 1024.0,
    "mib/s": 1024.0**2,
    "gib/s": 1024.0**3,
}
_RATE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z/]+)\s*$")


def parse_rate(spec: str) -> float:
    """A rate like "500mbps" or "100MB/s", in bytes per second."""
    match = _RATE.match(spec)
    if not match:
        raise InvalidInputError(
            f"cannot parse bandwidth {spec!r}; expected e.g. '1gbps', '500mbps', '100MB/s'"
        )
    value, unit = float(match.group(1)), match.group(2).lower()
    if unit in _BIT_UNITS:
        bytes_per_s = value * _BIT_UNITS[unit] / 8
    elif unit in _BYTE_UNITS:
        bytes_per_s = value * _BYTE_UNITS[unit]
    else:
        raise InvalidInputError(f"unknown bandwidth unit {match.group(2)!r} in {spec!r}")
    if not (math.isfinite(bytes_per_s) and bytes_per_s > 0):
        raise InvalidInputError(f"bandwidth must be > 0, got {spec!r}")
    return bytes_per_s


def parse_throttle(spec: str, *, burst_bytes: int | None = None) -> ThrottleConfig | None:
    """Parse a CLI/SDK throttle spec (see the module docstring); None means no throttle.

    The default burst is 10 ms at the trace's peak rate, at least 64 KiB: enough to keep a sender busy
    between wake-ups without letting a visible burst through.
    """
    if not isinstance(spec, str):
        raise InvalidInputError(f"throttle spec must be a string, got {type(spec).__name__}")
    text = spec.strip()
    if text.lower() in ("none", "off", "unlimited"):
        return None
    if text.lower().startswith("trace:"):
        ref = text[len("trace:") :].strip()
        if not ref:
            raise InvalidInputError("empty trace name in throttle spec")
        is_file = "/" in ref or ref.lower().endswith((".csv", ".json"))
        trace = BandwidthTrace.from_file(ref) if is_file else BandwidthTrace.named(ref)
    else:
        trace = BandwidthTrace.constant(parse_rate(text) / BYTES_PER_GBPS)
    if burst_bytes is None:
        peak = max(gbps for _, gbps in trace.segments) * BYTES_PER_GBPS
        burst_bytes = max(64 * 1024, int(peak * 0.010))
    if burst_bytes <= 0:
        raise InvalidInputError(f"burst_bytes must be > 0, got {burst_bytes}")
    return ThrottleConfig(trace=trace, burst_bytes=burst_bytes)
