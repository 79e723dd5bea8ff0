"""Token bucket and bandwidth traces, on a fake clock (nothing here really sleeps)."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvwire.client.throttle import (
    BYTES_PER_GBPS,
    NAMED_TRACES,
    BandwidthTrace,
    TokenBucket,
    athrottled,
    parse_rate,
    parse_throttle,
    throttled,
)
from kvwire.errors import InvalidInputError


class FakeClock:
    """A clock that only moves when someone sleeps on it."""

    def __init__(self) -> None:
        self.now = 100.0
        self.lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        with self.lock:
            self.now += seconds

    async def async_sleep(self, seconds: float) -> None:
        self.sleep(seconds)


def make_bucket(clock: FakeClock, **kwargs: object) -> TokenBucket:
    return TokenBucket(clock=clock, sleep=clock.sleep, async_sleep=clock.async_sleep, **kwargs)


@pytest.mark.parametrize("chunk", [1_000, 65_536, 1_000_000])
def test_long_run_rate_matches_configured_rate(chunk: int) -> None:
    clock = FakeClock()
    rate = 12_500_000.0  # 100 Mbps
    bucket = make_bucket(clock, rate_bytes_per_s=rate, burst_bytes=64 * 1024)
    start, sent = clock.now, 0
    while clock.now - start < 20.0:
        bucket.acquire(chunk)
        sent += chunk
    measured = sent / (clock.now - start)
    assert measured == pytest.approx(rate, rel=0.01)


def test_burst_is_bounded_after_idle() -> None:
    clock = FakeClock()
    bucket = make_bucket(clock, rate_bytes_per_s=1_000_000.0, burst_bytes=50_000)
    clock.now += 3600  # idle for an hour: tokens must not pile up beyond the burst
    sent = 0
    while True:
        before = clock.now
        bucket.acquire(1_000)
        if clock.now > before:
            break
        sent += 1_000
    assert sent == 50_000


def test_oversized_reservation_goes_into_debt_and_paces_followers() -> None:
    clock = FakeClock()
    bucket = make_bucket(clock, rate_bytes_per_s=1_000.0, burst_bytes=100)
    assert bucket.reserve(100) == 0.0
    assert bucket.reserve(1_000) == pytest.approx(1.0)
    assert bucket.reserve(500) == pytest.approx(1.5)  # queued behind the debt
    with pytest.raises(InvalidInputError):
        bucket.reserve(-1)


def test_trace_switches_rate_at_the_right_times() -> None:
    clock = FakeClock()
    trace = BandwidthTrace([(1.0, 0.8), (2.0, 0.08)], loop=False)  # 100 MB/s for 1 s, then 10 MB/s
    bucket = make_bucket(clock, trace=trace, burst_bytes=1)
    start = clock.now
    bucket.acquire(100_000_003)  # the 1-byte burst, the first second's worth, and 2 bytes more
    assert clock.now - start == pytest.approx(1.0 + 2 / 10e6, abs=1e-9)
    assert bucket.rate_now() == pytest.approx(10e6)
    bucket.acquire(10_000_000)
    assert clock.now - start == pytest.approx(2.0 + 2 / 10e6, abs=1e-6)


def test_trace_rate_and_integral() -> None:
    trace = BandwidthTrace([(1.0, 2.0), (1.0, 0.0), (2.0, 1.0)])
    assert trace.rate_at(0.5) == 2 * BYTES_PER_GBPS
    assert trace.rate_at(1.5) == 0.0
    assert trace.rate_at(4.5) == 2 * BYTES_PER_GBPS  # loops
    assert trace.bytes_between(0.5, 3.0) == pytest.approx((0.5 * 2 + 1.0) * BYTES_PER_GBPS)
    # From t=0.5: 1 Gbit-second's worth by t=1, nothing in the outage, then 0.8 more at 1 Gbps
    assert trace.time_to_send(0.5, 1.8 * BYTES_PER_GBPS) == pytest.approx(2.8)
    # Five whole periods (8 Gbit-seconds each) from t=0 end where the fifth period's bytes are done
    assert trace.time_to_send(0.0, 5 * 4.0 * BYTES_PER_GBPS) == pytest.approx(4 * 4.0 + 4.0)


@settings(max_examples=200, deadline=None)
@given(
    segments=st.lists(
        st.tuples(st.floats(0.01, 5.0), st.sampled_from([0.0, 0.05, 0.3, 1.0, 4.0])), min_size=1, max_size=6
    ).filter(lambda s: any(g > 0 for _, g in s)),
    loop=st.booleans(),
    t0=st.floats(0.0, 30.0),
    gigabytes=st.floats(0.0, 3.0),
)
def test_time_to_send_inverts_bytes_between(
    segments: list[tuple[float, float]], loop: bool, t0: float, gigabytes: float
) -> None:
    if not loop and segments[-1][1] == 0:
        segments = [*segments, (1.0, 0.3)]
    trace = BandwidthTrace(segments, loop=loop)
    nbytes = gigabytes * 1e9
    t1 = trace.time_to_send(t0, nbytes)
    assert t1 >= t0
    assert trace.bytes_between(t0, t1) == pytest.approx(nbytes, rel=1e-9, abs=1.0)
    if nbytes > 1.0 and t1 - 1e-6 > t0:  # and not any earlier
        assert trace.bytes_between(t0, t1 - 1e-6) < nbytes


@settings(max_examples=200, deadline=None)
@given(
    segments=st.lists(
        st.tuples(st.floats(0.01, 5.0), st.sampled_from([0.0, 0.05, 0.3, 1.0, 4.0])), min_size=1, max_size=6
    ).filter(lambda s: any(g > 0 for _, g in s)),
    loop=st.booleans(),
    offset=st.floats(0.0, 30.0),
    t0=st.floats(0.0, 20.0),
    span=st.floats(0.0, 20.0),
)
def test_a_shifted_trace_is_the_same_link_from_the_offset(
    segments: list[tuple[float, float]], loop: bool, offset: float, t0: float, span: float
) -> None:
    if not loop and segments[-1][1] == 0:
        segments = [*segments, (1.0, 0.3)]
    trace = BandwidthTrace(segments, loop=loop)
    shifted = trace.shifted(offset)
    assert shifted.bytes_between(t0, t0 + span) == pytest.approx(
        trace.bytes_between(offset + t0, offset + t0 + span), rel=1e-9, abs=1.0
    )


def test_shift_rejects_bad_offsets() -> None:
    trace = BandwidthTrace.named("step-down")
    assert trace.shifted(0.5).rate_at(0.0) == 2 * BYTES_PER_GBPS
    assert trace.shifted(0.5).rate_at(0.6) == 0.2 * BYTES_PER_GBPS
    for offset in (-1.0, float("nan"), float("inf")):
        with pytest.raises(InvalidInputError, match="offset"):
            trace.shifted(offset)


@pytest.mark.parametrize("name", sorted(NAMED_TRACES))
def test_named_traces_are_deterministic_and_in_range(name: str) -> None:
    a, b = BandwidthTrace.named(name), BandwidthTrace.named(name)
    assert a.segments == b.segments
    assert a.duration_s >= 30
    assert all(0.0 < gbps <= 3.0 for _, gbps in a.segments)


def test_fluctuating_trace_stays_between_bounds() -> None:
    rates = [g for _, g in BandwidthTrace.named("fluctuating").segments]
    assert min(rates) >= 0.1 and max(rates) <= 3.0
    assert max(rates) / min(rates) > 5  # it does fluctuate


def test_threads_share_the_rate() -> None:
    clock = FakeClock()
    bucket = make_bucket(clock, rate_bytes_per_s=1_000_000.0, burst_bytes=10_000)
    total = []

    def worker() -> None:
        for _ in range(50):
            bucket.acquire(10_000)
        total.append(500_000)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # 2 MB at 1 MB/s: the fake clock advances by the sum of the waits, which is ~2 s minus the burst
    assert sum(total) == 2_000_000
    assert clock.now - 100.0 == pytest.approx(1.99, rel=0.01)


def test_throttled_iterators() -> None:
    clock = FakeClock()
    bucket = make_bucket(clock, rate_bytes_per_s=1_000.0, burst_bytes=100)
    assert list(throttled([b"x" * 100, b"y" * 400], bucket)) == [b"x" * 100, b"y" * 400]
    assert clock.now == pytest.approx(100.4)
    assert list(throttled([b"a"], None)) == [b"a"]

    async def source():
        for part in (b"a" * 500, b"b" * 500):
            yield part

    async def collect() -> list[bytes]:
        return [part async for part in athrottled(source(), bucket)]

    assert asyncio.run(collect()) == [b"a" * 500, b"b" * 500]
    assert clock.now == pytest.approx(101.4)


@pytest.mark.parametrize(
    ("spec", "bytes_per_s"),
    [
        ("1gbps", 125e6),
        ("500mbps", 62.5e6),
        (" 0.1Gbps ", 12.5e6),
        ("20kbps", 2_500.0),
        ("1e9bps", 125e6),
        ("100MB/s", 100e6),
        ("64KiB/s", 65_536.0),
    ],
)
def test_parse_rates(spec: str, bytes_per_s: float) -> None:
    assert parse_rate(spec) == pytest.approx(bytes_per_s)
    config = parse_throttle(spec)
    assert config is not None
    assert config.trace.rate_at(12.3) == pytest.approx(bytes_per_s)
    assert config.burst_bytes >= 64 * 1024


def test_parse_traces_and_files(tmp_path: Path) -> None:
    config = parse_throttle("trace:step-down", burst_bytes=1234)
    assert config is not None and config.burst_bytes == 1234
    assert config.trace.rate_at(0.5) == pytest.approx(2 * BYTES_PER_GBPS)
    assert config.trace.rate_at(1.5) == pytest.approx(0.2 * BYTES_PER_GBPS)
    csv_path = tmp_path / "t.csv"
    csv_path.write_text("duration_s,gbps\n0.5,1.0\n# comment\n1.5,0.25\n")
    parsed = parse_throttle(f"trace:{csv_path}")
    assert parsed is not None
    trace = parsed.trace
    assert trace.segments == ((0.5, 1.0), (1.5, 0.25))
    json_path = tmp_path / "t.json"
    json_path.write_text(json.dumps({"loop": False, "segments": [{"duration_s": 2, "gbps": 0.5}]}))
    parsed = parse_throttle(f"trace:{json_path}")
    assert parsed is not None
    trace = parsed.trace
    assert trace.segments == ((2.0, 0.5),) and not trace.loop
    assert parse_throttle("none") is None and parse_throttle("Unlimited") is None
    config = parse_throttle("100mbps")
    assert config is not None
    bucket = config.make_bucket(clock=FakeClock(), sleep=lambda s: None)
    assert bucket.burst_bytes == config.burst_bytes


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "fast",
        "1",
        "gbps",
        "-1gbps",
        "0mbps",
        "1 furlongs/s",
        "1gbps2",
        "trace:",
        "trace:nope",
        "trace:/no/such/file.csv",
        "nan gbps",
    ],
)
def test_parse_rejects_junk(spec: str) -> None:
    with pytest.raises(InvalidInputError):
        parse_throttle(spec)


def test_bad_traces_and_buckets_rejected(tmp_path: Path) -> None:
    for segments in ([], [(1.0, 0.0)], [(0.0, 1.0)], [(1.0, -1.0)], [(float("inf"), 1.0)]):
        with pytest.raises(InvalidInputError):
            BandwidthTrace(segments)
    with pytest.raises(InvalidInputError):
        BandwidthTrace([(1.0, 1.0), (1.0, 0.0)], loop=False)
    bad = tmp_path / "bad.csv"
    bad.write_text("1.0,fast\n")
    with pytest.raises(InvalidInputError):
        BandwidthTrace.from_file(bad)
    with pytest.raises(InvalidInputError):
        TokenBucket()
    with pytest.raises(InvalidInputError):
        TokenBucket(1.0, burst_bytes=0)
    with pytest.raises(InvalidInputError):
        TokenBucket(1.0, trace=BandwidthTrace.constant(1.0))
