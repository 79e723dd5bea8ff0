"""Pipelined loading of a stored context: fetch chunk i+1 while chunk i is decoded or recomputed.

Two threads and a bounded queue. The *fetcher* (a background thread) asks the controller what to do
with the next chunk (pull mode, ``kvwire.controller.Controller`` fed with the throughput it measures)
or reads the server's choice from a gRPC push stream, downloads it with retries, checks its checksum
and puts it in the queue (at most ``prefetch`` encoded chunks wait there: bounded memory). The
*consumer* (the caller's thread) takes chunks in order and hands them to a :class:`KVSink`: KV chunks
are decoded (``kvwire.kernels.codec.decode_chunk``, the GPU kernels when the target device is CUDA),
text chunks are recomputed by the model on top of the cache built so far. A push stream that breaks
on a transient error is resumed in pull mode from the first chunk not yet received.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from kvwire.client.retry import RetryPolicy, call_with_retries, is_transient
from kvwire.client.transport import StreamSpec, Transport
from kvwire.controller import (
    ChunkOption,
    ContextOptions,
    Controller,
    CostModel,
    Mode,
    Policy,
    ThroughputEstimator,
)
from kvwire.errors import CorruptChunkError, InvalidInputError, KvwireError, ServerUnavailableError
from kvwire.kernels import codec
from kvwire.kernels import format as fmt
from kvwire.kernels.profile import CalibrationProfile
from kvwire.manifest import ChunkEntry, ContextManifest

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
#: A throughput estimate (bytes/s) is only updated from transfers at least this big: below, the
#: time is request overhead rather than bandwidth (as the gRPC server does for pushed chunks).
MIN_SAMPLE_BYTES = 16 * 1024


# ------------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class ChunkRecord:
    """What happened to one chunk: the decision (who made it and why) and what it cost."""

    index: int
    token_start: int
    n_tokens: int
    kind: Literal["kv", "text"]
    level: int | None
    nbytes: int
    reason: str
    source: Literal["pull", "push"]
    fetch_s: float
    compute_s: float
    retries: int = 0
    predicted_completion_s: float | None = None


@dataclass
class LoadTimings:
    """Where the time of one load went, in seconds. ``total_s`` runs from the call to the cache being
    ready (the TTFT before the question's own prefill); fetch, decode and recompute overlap in it."""

    manifest_s: float = 0.0
    profile_s: float = 0.0
    fetch_s: float = 0.0
    decode_s: float = 0.0
    recompute_s: float = 0.0
    total_s: float = 0.0
    retries: int = 0


# ---------------------------------------------------------------------------------------- cost model


class CostTracker:
    """The device costs the controller plans with, refined by what this load measures.

    Starts from ``base`` (configured or measured before the load) and replaces each cost by the
    mean of the observations so far: the decode time per KV chunk and the recompute time per token.
    """

    def __init__(self, base: CostModel):
        self.base = base
        self._decode: list[float] = []
        self._recompute: list[tuple[float, int]] = []
        self._lock = threading.Lock()

    def observe_decode(self, seconds: float) -> None:
        with self._lock:
            self._decode.append(seconds)

    def observe_recompute(self, seconds: float, tokens: int) -> None:
        with self._lock:
            self._recompute.append((seconds, tokens))

    def costs(self) -> CostModel:
        with self._lock:
            decode = sum(self._decode) / len(self._decode) if self._decode else self.base.decode_s_per_chunk
            tokens = sum(n for _, n in self._recompute)
            per_token = (
                sum(s for s, _ in self._recompute) / tokens if tokens else self.base.recompute_s_per_token
            )
        return dataclasses.replace(self.base, decode_s_per_chunk=decode, recompute_s_per_token=per_token)


# --------------------------------------------------------------------------------------------- sinks


class KVSink(Protocol):
    """Where loaded chunks go, in token order: canonical KV ``[layers, 2, kv_heads, tokens, head_dim]``
    or token ids whose KV the sink must compute itself."""

    device: torch.device | None
    dtype: torch.dtype | None

    def add_kv(self, chunk: ChunkEntry, kv: torch.Tensor) -> None: ...

    def add_text(self, chunk: ChunkEntry, token_ids: list[int]) -> None: ...


class CacheBuilder:
    """Builds the transformers ``DynamicCache`` of a context for ``model``; recomputes text chunks.

    Decoded chunks are kept as tensors and appended to the cache only when a text chunk needs the
    cache so far, or at the end, so that the cache is concatenated a few times rather than per chunk.
    """

    def __init__(self, model: Any):
        from kvwire.model import _text_config, empty_cache

        self.model = model
        parameter = next(model.parameters())
        self.device: torch.device | None = parameter.device
        self.dtype: torch.dtype | None = parameter.dtype
        self.layers = int(_text_config(model.config).num_hidden_layers)
        self.cache = empty_cache(model.config)
        self._pending: list[torch.Tensor] = []
        self.tokens = 0

    def add_kv(self, chunk: ChunkEntry, kv: torch.Tensor) -> None:
        if kv.shape[0] != self.layers:
            raise InvalidInputError(
                f"chunk {chunk.index} has {kv.shape[0]} layers, the model has {self.layers}"
            )
        self._pending.append(kv)
        self.tokens += int(kv.shape[3])

    def _flush(self) -> None:
        if not self._pending:
            return
        kv = self._pending[0] if len(self._pending) == 1 else torch.cat(self._pending, dim=3)
        self._pending = []
        for layer in range(kv.shape[0]):
            self.cache.update(kv[layer, 0].unsqueeze(0), kv[layer, 1].unsqueeze(0), layer)

    @torch.no_grad()
    def add_text(self, chunk: ChunkEntry, token_ids: list[int]) -> None:
        from kvwire.model import cache_kwargs

        self._flush()
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.device).reshape(1, -1)
        self.model(ids, use_cache=True, logits_to_keep=1, **cache_kwargs(self.model, self.cache))
        self.tokens += len(token_ids)

    def result(self) -> Any:
        self._flush()
        return self.cache


class TensorCollector:
    """Keeps each chunk's decoded KV tensor (the plain tensor API); cannot recompute text."""

    def __init__(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        self.chunks: list[tuple[ChunkEntry, torch.Tensor]] = []

    def add_kv(self, chunk: ChunkEntry, kv: torch.Tensor) -> None:
        self.chunks.append((chunk, kv))

    def add_text(self, chunk: ChunkEntry, token_ids: list[int]) -> None:
        raise InvalidInputError("the tensor API loads KV only: use a fixed level, not text or adaptive mode")


# ------------------------------------------------------------------------------------------ the load


def context_options(manifest: ContextManifest, first: int = 0) -> ContextOptions:
    """The controller's view of chunks ``first..`` of a manifest, re-indexed from 0."""
    return ContextOptions(
        levels=tuple(manifest.levels),
        chunks=tuple(
            ChunkOption(c.index - first, c.token_end - c.token_start, {e.level: e.nbytes for e in c.levels})
            for c in manifest.chunks[first:]
        ),
    )


@dataclass
class _Item:
    """One chunk on its way from the fetcher to the consumer."""

    chunk: ChunkEntry
    kind: Literal["kv", "text"]
    level: int | None
    data: bytes
    reason: str
    source: Literal["pull", "push"]
    fetch_s: float
    retries: int
    predicted_completion_s: float | None


_DONE = object()


@dataclass
class LoadPlan:
    """Everything one load needs besides the sink."""

    transport: Transport
    manifest: ContextManifest
    profile: CalibrationProfile
    mode: Mode
    costs: CostModel
    policy: Policy = "robust"
    estimator: ThroughputEstimator = field(default_factory=ThroughputEstimator)
    push: bool = False
    bandwidth_hint_bytes_per_s: float | None = None
    prefetch: int = 2
    retry: RetryPolicy = field(default_factory=RetryPolicy)


def check_manifest(manifest: ContextManifest) -> None:
    """Reject a manifest whose chunks do not tile its tokens (it would build a wrong cache)."""
    position = 0
    for i, chunk in enumerate(manifest.chunks):
        n = chunk.token_end - chunk.token_start
        if chunk.index != i or chunk.token_start != position or n <= 0 or len(chunk.token_ids) != n:
            raise CorruptChunkError(
                f"manifest of {manifest.context_id!r}: chunk {i} does not tile the tokens"
            )
        if {e.level for e in chunk.levels} != set(manifest.levels):
            raise CorruptChunkError(f"manifest of {manifest.context_id!r}: chunk {i} lacks levels")
        position = chunk.token_end
    if position != manifest.total_tokens or not manifest.chunks:
        raise CorruptChunkError(f"manifest of {manifest.context_id!r}: chunks cover {position} tokens")


def verify_chunk(manifest: ContextManifest, index: int, level: int, data: bytes, claimed_level: int) -> None:
    """Raise ``CorruptChunkError`` unless ``data`` is the manifest's chunk ``index`` at ``level``."""
    entry = manifest.chunks[index].level(level)
    got = fmt.crc32_hex(data)
    if claimed_level != level:
        raise CorruptChunkError(f"asked for chunk {index} at level {level}, got level {claimed_level}")
    if got != entry.checksum or len(data) != entry.nbytes:
        raise CorruptChunkError(
            f"chunk {index} level {level}: checksum {got} ({len(data)} B) does not match the manifest's "
            f"{entry.checksum} ({entry.nbytes} B)"
        )


class Loader:
    """Runs one load of ``plan`` into ``sink``; :meth:`run` returns the per-chunk records."""

    def __init__(self, plan: LoadPlan, sink: KVSink, *, started: float, timings: LoadTimings | None = None):
        if plan.prefetch < 1:
            raise InvalidInputError(f"prefetch must be >= 1, got {plan.prefetch}")
        self.plan = plan
        self.sink = sink
        self.started = started
        self.tracker = CostTracker(plan.costs)
        self.timings = timings or LoadTimings()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=plan.prefetch)
        self._stop = threading.Event()
        self._predicted_compute_done = 0.0

    # -- fetcher (background thread)

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _fetch_all(self) -> None:
        try:
            first = 0
            if self.plan.push:
                first = self._fetch_pushed()
            if first < len(self.plan.manifest.chunks):
                self._fetch_pulled(first)
            self._put(_DONE)
        except BaseException as exc:  # handed to the consumer, which raises it
            self._put(exc)

    def _elapsed(self) -> float:
        return time.perf_counter() - self.started

    def _fetch_pulled(self, first: int) -> None:
        plan, manifest = self.plan, self.plan.manifest
        controller = Controller(
            context_options(manifest, first),
            plan.mode,
            plan.costs,
            policy=plan.policy,
            estimator=plan.estimator,
        )
        for chunk in manifest.chunks[first:]:
            if self._stop.is_set():
                return
            controller.costs = self.tracker.costs()
            now = self._elapsed()
            decision = controller.decide(now, max(now, self._predicted_compute_done))
            attempts: list[int] = []
            if decision.kind == "text":  # the manifest carries the token ids: nothing to download
                data, fetch_s = b"", 0.0
            else:
                assert decision.level is not None
                level = decision.level
                fetched = call_with_retries(
                    functools.partial(plan.transport.get_chunk, manifest.context_id, chunk.index, level),
                    plan.retry,
                    what=f"chunk {chunk.index} of {manifest.context_id!r}",
                    on_retry=functools.partial(_count_retry, attempts),
                )
                verify_chunk(manifest, chunk.index, level, fetched.data, fetched.level)
                data, fetch_s = fetched.data, fetched.seconds
                if len(data) >= MIN_SAMPLE_BYTES:
                    controller.record_transfer(len(data), max(fetch_s, 1e-6))
            self._account(decision.kind, chunk)
            item = _Item(
                chunk, decision.kind, decision.level, data, decision.reason, "pull", fetch_s, len(attempts),
                decision.predicted_completion_s,
            )  # fmt: skip
            if not self._put(item):
                return

    def _fetch_pushed(self) -> int:
        """Read the server's stream; return the index of the first chunk not received."""
        plan, manifest = self.plan, self.plan.manifest
        spec = StreamSpec(plan.mode, plan.policy, self.tracker.costs(), plan.bandwidth_hint_bytes_per_s)
        received = 0
        try:
            for message in plan.transport.stream_context(manifest.context_id, spec):
                if message.index != received:
                    raise CorruptChunkError(f"stream sent chunk {message.index}, expected {received}")
                chunk = manifest.chunks[received]
                if message.kind == "kv":
                    assert message.level is not None
                    verify_chunk(manifest, received, message.level, message.data, message.level)
                elif message.token_ids != chunk.token_ids:
                    raise CorruptChunkError(f"stream's text of chunk {received} differs from the manifest")
                self._account(message.kind, chunk)
                item = _Item(
                    chunk, message.kind, message.level, message.data, message.reason, "push", message.seconds,
                    0, message.predicted_completion_s,
                )  # fmt: skip
                if not self._put(item):
                    return len(manifest.chunks)
                received += 1
        except KvwireError as exc:
            if not is_transient(exc):
                raise
            log.warning("push stream broke after %d chunks (%s); resuming in pull mode", received, exc)
            self.timings.retries += 1
        return received

    def _account(self, kind: str, chunk: ChunkEntry) -> None:
        costs = self.tracker.costs()
        compute = (
            costs.decode_s_per_chunk
            if kind == "kv"
            else (chunk.token_end - chunk.token_start) * costs.recompute_s_per_token
        )
        self._predicted_compute_done = max(self._predicted_compute_done, self._elapsed()) + compute

    # -- consumer (caller's thread)

    def run(self, progress: Progress | None = None) -> list[ChunkRecord]:
        thread = threading.Thread(target=self._fetch_all, name="kvwire-fetch", daemon=True)
        thread.start()
        records: list[ChunkRecord] = []
        total = len(self.plan.manifest.chunks)
        try:
            while True:
                item = self._next()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                records.append(self._consume(item))
                if progress is not None:
                    progress(len(records), total)
        finally:
            self._stop.set()
            thread.join(timeout=5)
        if len(records) != total:
            raise CorruptChunkError(f"loaded {len(records)} of {total} chunks")
        return records

    def _next(self) -> Any:
        # The fetcher's requests have timeouts and each chunk's retries a time budget; a backstop.
        wait_s = self.plan.retry.total_timeout_s + 120.0
        try:
            return self._queue.get(timeout=wait_s)
        except queue.Empty:
            raise ServerUnavailableError(f"no chunk arrived within {wait_s:.0f} s") from None

    def _consume(self, item: _Item) -> ChunkRecord:
        chunk, plan = item.chunk, self.plan
        start = time.perf_counter()
        if item.kind == "kv":
            # The header is checked against the manifest before decoding, so a chunk that claims more
            # tokens than its manifest entry cannot make the decoder allocate for them.
            header = fmt.read_header(item.data)
            if header.n_tokens != chunk.token_end - chunk.token_start:
                raise CorruptChunkError(
                    f"chunk {chunk.index} holds {header.n_tokens} tokens, not its manifest's"
                )
            if header.token_start != chunk.token_start:
                raise CorruptChunkError(f"chunk {chunk.index} starts at token {header.token_start}")
            kv = codec.decode_chunk(
                item.data,
                plan.profile,
                model_fingerprint=plan.manifest.model_fingerprint,
                device=self.sink.device,
                dtype=self.sink.dtype,
                max_chunk_tokens=header.n_tokens,  # the manifest's count, checked above
            )
            if kv.shape[3] != chunk.token_end - chunk.token_start:
                raise CorruptChunkError(f"chunk {chunk.index} decodes to {kv.shape[3]} tokens")
            self.sink.add_kv(chunk, kv)
            compute_s = time.perf_counter() - start
            self.tracker.observe_decode(compute_s)
            self.timings.decode_s += compute_s
        else:
            self.sink.add_text(chunk, chunk.token_ids)
            compute_s = time.perf_counter() - start
            self.tracker.observe_recompute(compute_s, chunk.token_end - chunk.token_start)
            self.timings.recompute_s += compute_s
        self.timings.fetch_s += item.fetch_s
        self.timings.retries += item.retries
        return ChunkRecord(
            index=chunk.index,
            token_start=chunk.token_start,
            n_tokens=chunk.token_end - chunk.token_start,
            kind=item.kind,
            level=item.level,
            nbytes=len(item.data),
            reason=item.reason,
            source=item.source,
            fetch_s=item.fetch_s,
            compute_s=compute_s,
            retries=item.retries,
            predicted_completion_s=item.predicted_completion_s,
        )


def _count_retry(attempts: list[int], attempt: int, exc: BaseException) -> None:
    attempts.append(attempt)


def iter_records(records: list[ChunkRecord]) -> Iterator[str]:
    """One human-readable line per chunk (the CLI's decision table)."""
    yield f"{'chunk':>5} {'tokens':>11} {'choice':>6} {'bytes':>10} {'fetch ms':>9} {'compute ms':>10}  why"
    for r in records:
        choice = "text" if r.kind == "text" else f"L{r.level}"
        span = f"{r.token_start}-{r.token_start + r.n_tokens}"
        yield (
            f"{r.index:>5} {span:>11} {choice:>6} {r.nbytes:>10,} {r.fetch_s * 1e3:>9.1f} "
            f"{r.compute_s * 1e3:>10.1f}  {r.reason}{f' ({r.retries} retries)' if r.retries else ''}"
        )
