"""The kvwire client SDK: ingest a text, read a manifest, load a stored context into a model.

```python
from kvwire.client import Client
from kvwire.controller import Mode

with Client("http://127.0.0.1:8080", api_key="alice-key", throttle="1gbps") as client:
    manifest = client.ingest(open("notes.txt").read())
    loaded = client.load(model, manifest.context_id, tokenizer=tokenizer, mode=Mode.adaptive(slo_s=1.0))
    answer = loaded.generate(model, tokenizer, "\\nQuestion: what is this about?\\nAnswer:")
```

See docs/client.md for the pipeline, the checks, retries and the numbers measured.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from kvwire.client.loader import (
    CacheBuilder,
    ChunkRecord,
    Loader,
    LoadPlan,
    LoadTimings,
    Progress,
    TensorCollector,
    check_manifest,
)
from kvwire.client.retry import Deadline, RetryPolicy, call_with_retries
from kvwire.client.throttle import ThrottleConfig, TokenBucket, parse_throttle
from kvwire.client.transport import RestTransport, Transport
from kvwire.controller import CostModel, Mode, Policy, ThroughputEstimator, warm_up
from kvwire.errors import (
    InvalidInputError,
    KvwireError,
    LimitExceededError,
    ModelMismatchError,
    ProfileMismatchError,
    ServerUnavailableError,
    UnsupportedVersionError,
)
from kvwire.kernels import codec
from kvwire.kernels.profile import CalibrationProfile
from kvwire.manifest import ChunkEntry, ContextManifest, Job

log = logging.getLogger(__name__)

#: Decode cost per chunk assumed before the first chunk of a load is decoded (then measured).
DEFAULT_DECODE_S_PER_CHUNK = 0.05
#: A pulled chunk's request overhead (one loopback/LAN round trip plus server work).
DEFAULT_REQUEST_OVERHEAD_S = 2e-3
#: Throughput assumed for the first chunk when nothing better is known (1 Gbit/s).
DEFAULT_BANDWIDTH_BYTES_PER_S = 125e6
#: Most tokens one load brings into memory unless the client is told otherwise: 256K tokens, 23 GB of
#: fp16 KV for a Llama-3-8B-shaped model (4 GB for SmolLM2-135M).
DEFAULT_MAX_CONTEXT_TOKENS = 262_144

#: Recompute seconds per token by model object, shared by every ``Client`` of the process: the cost
#: belongs to the model on its device, not to a server connection, and timing it is a prefill.
_RECOMPUTE_S_PER_TOKEN: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
#: Held while measuring, so that a model is measured once however many threads ask, and no two
#: measurements share the device (which would skew both).
_MEASURE_LOCK = threading.Lock()


def recompute_s_per_token(model: Any, tokens: int = 256) -> float:
    """Seconds per token to recompute ``model``'s KV, timed on a dummy ``tokens``-token prefill the
    first time a model object is asked about (then cached for it, process-wide, until it is freed)."""
    with _MEASURE_LOCK:
        cached = _RECOMPUTE_S_PER_TOKEN.get(model)
        if cached is not None:
            return cached
        vocab = int(model.get_input_embeddings().num_embeddings)
        device = next(model.parameters()).device
        ids = torch.arange(tokens, device=device).reshape(1, -1) % vocab
        with torch.no_grad():
            model(ids[:, :8])  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            model(ids)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        measured = (time.perf_counter() - start) / tokens
        _RECOMPUTE_S_PER_TOKEN[model] = measured
        return measured


@dataclass
class Answer:
    """A generated continuation and its timing: ``first_token_s`` runs from the ``generate`` call
    to the first new token (the question's prefill and one decoding step)."""

    text: str
    token_ids: list[int]
    first_token_s: float
    total_s: float


@dataclass
class LoadedContext:
    """A context loaded into a model: the cache ``model.generate`` accepts, the token ids it covers,
    what the controller chose per chunk and where the time went."""

    manifest: ContextManifest
    cache: Any
    token_ids: list[int]
    chunks: list[ChunkRecord]
    timings: LoadTimings
    mode: Mode

    @property
    def context_id(self) -> str:
        return self.manifest.context_id

    @property
    def slo_met(self) -> bool | None:
        """Whether the load met the adaptive mode's SLO (None in fixed modes)."""
        return None if self.mode.slo_s is None else self.timings.total_s <= self.mode.slo_s

    def fresh_cache(self) -> Any:
        """A copy of the cache: ``generate`` grows the cache it is given, so use one copy per call."""
        return copy.deepcopy(self.cache)

    def generate(
        self, model: Any, tokenizer: Any, question: str | list[int], *, max_new_tokens: int = 32
    ) -> Answer:
        """Greedy continuation of the context followed by ``question`` (text, tokenized without special
        tokens, or token ids), from a copy of the loaded cache."""
        if isinstance(question, str):
            question_ids = list(tokenizer(question, add_special_tokens=False)["input_ids"])
        else:
            question_ids = list(question)
        if not question_ids:
            raise InvalidInputError("the question is empty")
        return generate_answer(
            model, tokenizer, self.token_ids + question_ids, self.fresh_cache(), max_new_tokens=max_new_tokens
        )


@torch.no_grad()
def generate_answer(
    model: Any, tokenizer: Any, token_ids: list[int], cache: Any = None, *, max_new_tokens: int = 32
) -> Answer:
    """Greedy ``model.generate`` over ``token_ids``, of which ``cache`` (grown in place) already holds a
    prefix; ``cache=None`` prefills them all (the full-prefill baseline). Times the first new token."""
    from transformers.generation.streamers import BaseStreamer

    from kvwire.model import cache_kwargs

    device = next(model.parameters()).device
    ids = torch.tensor([token_ids], dtype=torch.long, device=device)
    first_token: list[float] = []

    class _FirstToken(BaseStreamer):
        calls = 0

        def put(self, value: Any) -> None:  # first call: the prompt; second: the first new token
            self.calls += 1
            if self.calls == 2:
                first_token.append(time.perf_counter())

        def end(self) -> None:
            pass

    extra = cache_kwargs(model, cache) if cache is not None else {}
    start = time.perf_counter()
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        streamer=_FirstToken(),
        pad_token_id=getattr(tokenizer, "eos_token_id", None),
        **extra,
    )
    end = time.perf_counter()
    new = out[0, ids.shape[1] :].tolist()
    first = (first_token[0] if first_token else end) - start
    return Answer(tokenizer.decode(new, skip_special_tokens=True), new, first, end - start)


@dataclass
class KVChunk:
    """One chunk of the plain tensor API: canonical KV ``[layers, 2, kv_heads, tokens, head_dim]``
    (keys post-RoPE) for tokens ``[token_start, token_start + len(token_ids))``."""

    index: int
    token_start: int
    token_ids: list[int]
    level: int
    kv: torch.Tensor


@dataclass
class LoadedTensors:
    """A context as per-chunk KV tensors, for engines other than transformers."""

    manifest: ContextManifest
    chunks: list[KVChunk]
    records: list[ChunkRecord]
    timings: LoadTimings

    def kv(self) -> torch.Tensor:
        """All chunks joined along the token axis."""
        return torch.cat([c.kv for c in self.chunks], dim=3)


# ---------------------------------------------------------------------------------------- profiles


class ProfileCache:
    """Calibration profiles by digest: in memory, on disk (``<dir>/<digest>.kvprofile``), verified.

    A profile's digest is a hash of its content (``kvwire.kernels.profile.profile_digest``); a file
    or download whose recomputed digest differs from the one asked for is never used.
    """

    def __init__(self, directory: str | os.PathLike[str] | None = None):
        if directory is None:
            from kvwire.calibration import default_profile_dir

            directory = default_profile_dir() / "by-digest"
        self.directory = Path(directory)
        self._memory: dict[str, CalibrationProfile] = {}

    def _path(self, digest: str) -> Path:
        if not (len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            raise ProfileMismatchError(f"not a profile digest: {digest!r}")
        return self.directory / f"{digest}.kvprofile"

    def get(self, digest: str) -> CalibrationProfile | None:
        if digest in self._memory:
            return self._memory[digest]
        try:
            profile = CalibrationProfile.from_bytes(self._path(digest).read_bytes())
        except (OSError, InvalidInputError):
            return None
        if profile.digest != digest:
            return None
        self._memory[digest] = profile
        return profile

    def put(self, profile: CalibrationProfile) -> None:
        self._memory[profile.digest] = profile
        try:
            from kvwire.calibration import _write_atomic

            _write_atomic(self._path(profile.digest), profile.to_bytes())
        except OSError as exc:  # a read-only home is no reason to fail a load
            log.warning("cannot cache profile %s on disk: %s", profile.digest[:12], exc)


def parse_profile(data: bytes, digest: str) -> CalibrationProfile:
    """Parse downloaded profile bytes and check that they hash to ``digest``."""
    try:
        profile = CalibrationProfile.from_bytes(data)
    except InvalidInputError as exc:
        raise ProfileMismatchError(f"the server's profile {digest[:12]} is malformed: {exc}") from exc
    if profile.digest != digest:
        raise ProfileMismatchError(
            f"the server's profile hashes to {profile.digest[:12]}, not the manifest's {digest[:12]}"
        )
    return profile


# ------------------------------------------------------------------------------------------ client


def parse_mode(spec: str, slo_s: float | None = None) -> Mode:
    """``"text"``, ``"level:N"`` (or ``"N"``), or ``"adaptive"`` (needs ``slo_s``): the CLI's --mode."""
    text = spec.strip().lower()
    if text == "text":
        return Mode.text()
    if text == "adaptive":
        if slo_s is None:
            raise InvalidInputError("adaptive mode needs an SLO (--slo SECONDS)")
        return Mode.adaptive(slo_s)
    number = text.removeprefix("level:").removeprefix("l")
    if number.isdigit():
        return Mode.fixed_level(int(number))
    raise InvalidInputError(f"unknown mode {spec!r}: expected text, level:N or adaptive")


def make_bucket(throttle: str | ThrottleConfig | TokenBucket | None) -> TokenBucket | None:
    """A token bucket from a throttle spec (``"1gbps"``, ``"trace:step-down"``, ...), config or bucket."""
    if throttle is None or isinstance(throttle, TokenBucket):
        return throttle
    if isinstance(throttle, str):
        config = parse_throttle(throttle)
        return config.make_bucket() if config is not None else None
    if isinstance(throttle, ThrottleConfig):
        return throttle.make_bucket()
    raise InvalidInputError(
        f"throttle must be a spec string, ThrottleConfig or TokenBucket, not {throttle!r}"
    )


class Client:
    """A kvwire server over REST (``http://host:port``) or gRPC (``host:port``).

    ``throttle`` emulates a link (``"500mbps"``, ``"trace:lte-like"``, a ``ThrottleConfig`` or a
    ``TokenBucket``) in the transport: every download waits for the bucket. ``retry`` bounds how
    long transient failures are retried; ``timeout_s`` bounds every single request.
    ``max_context_tokens`` bounds what one load may bring into memory: a manifest of more tokens is
    refused (``LimitExceededError``) before any chunk is fetched, so a wrong id or a hostile server
    cannot make the client decode an unbounded cache (None: no bound).
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        transport: Literal["rest", "grpc"] | Transport = "rest",
        throttle: str | ThrottleConfig | TokenBucket | None = None,
        timeout_s: float = 30.0,
        retry: RetryPolicy | None = None,
        profile_dir: str | os.PathLike[str] | None = None,
        max_context_tokens: int | None = DEFAULT_MAX_CONTEXT_TOKENS,
    ):
        if max_context_tokens is not None and max_context_tokens < 1:
            raise InvalidInputError(f"max_context_tokens must be >= 1 or None, got {max_context_tokens}")
        self.retry = retry or RetryPolicy()
        self.max_context_tokens = max_context_tokens
        self.bucket = make_bucket(throttle)
        self.transport: Transport
        if transport == "rest":
            self.transport = RestTransport(url, api_key=api_key, timeout_s=timeout_s, bucket=self.bucket)
        elif transport == "grpc":
            from kvwire.client.grpc_transport import GrpcTransport

            self.transport = GrpcTransport(url, api_key=api_key, timeout_s=timeout_s, bucket=self.bucket)
        elif isinstance(transport, str):
            raise InvalidInputError(f"transport must be 'rest' or 'grpc', not {transport!r}")
        else:
            self.transport = transport
        self.profiles = ProfileCache(profile_dir)
        self._fingerprints: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        self._decode_s_per_chunk: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()

    def set_throttle(self, throttle: str | ThrottleConfig | TokenBucket | None) -> None:
        """Emulate another link from now on: ``throttle`` as the constructor takes it (None: none).

        A spec or ``ThrottleConfig`` gets a fresh bucket, so a trace starts at its time 0 now. The
        next download (the next chunk or stream message of a load in progress) waits for the new
        bucket; what this client has measured and cached (costs, fingerprints, profiles) is kept,
        which is why a benchmark changes the link of one client rather than opening a new one.
        """
        bucket = make_bucket(throttle)  # a bad spec raises here, leaving the current link in place
        self.transport.bucket = bucket
        self.bucket = bucket

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.transport.close()

    def _retrying(self, fn: Callable[[], Any], what: str, deadline: Deadline | None = None) -> Any:
        return call_with_retries(fn, self.retry, what=what, deadline=deadline)

    # -- contexts

    def ingest(
        self,
        text: str | None = None,
        *,
        token_ids: list[int] | None = None,
        context_id: str | None = None,
        progress: Progress | None = None,
        timeout_s: float = 3600.0,
        poll_s: float = 0.25,
    ) -> ContextManifest:
        """Ingest a text or token ids and wait until it is stored; return its manifest.

        The context id is chosen here when not given, so that a retried request replaces rather than
        duplicates. Long contexts go through the server's job queue: ``progress(chunks_done, total)``
        is called while it works; a failed job raises its error type.
        """
        if (text is None) == (token_ids is None):
            raise InvalidInputError("give exactly one of text and token_ids")
        context_id = context_id or f"ctx-{uuid.uuid4().hex[:20]}"
        result = self._retrying(
            lambda: self.transport.create_context(text=text, token_ids=token_ids, context_id=context_id),
            "ingest",
        )
        if isinstance(result, ContextManifest):
            if progress is not None:
                progress(len(result.chunks), len(result.chunks))
            return result
        job: Job = result
        deadline = time.monotonic() + timeout_s
        while job.state not in ("done", "failed"):
            if time.monotonic() > deadline:
                raise ServerUnavailableError(f"ingest job {job.id} not done after {timeout_s:.0f} s")
            time.sleep(poll_s)
            job = self._retrying(functools.partial(self.transport.get_job, job.id), f"job {job.id}")
            if progress is not None and job.chunks_total:
                progress(job.chunks_done, job.chunks_total)
        if job.state == "failed":
            from kvwire.client.transport import remote_error

            error = job.error or {}
            raise remote_error(error.get("type"), f"ingest failed: {error.get('message', '?')}", KvwireError)
        return self.manifest(job.context_id)

    def manifest(self, context_id: str) -> ContextManifest:
        return self._retrying(lambda: self.transport.get_manifest(context_id), f"manifest of {context_id!r}")

    def delete(self, context_id: str) -> None:
        self._retrying(lambda: self.transport.delete_context(context_id), f"delete {context_id!r}")

    def health(self, ready: bool = False) -> None:
        self._retrying(lambda: self.transport.health(ready), "health")

    def profile(self, digest: str, deadline: Deadline | None = None) -> CalibrationProfile:
        """The calibration profile ``digest`` from the local cache, else from the server (verified)."""
        cached = self.profiles.get(digest)
        if cached is not None:
            return cached
        data = self._retrying(lambda: self.transport.get_profile(digest), f"profile {digest[:12]}", deadline)
        profile = parse_profile(data, digest)
        self.profiles.put(profile)
        return profile

    # -- loading

    def fingerprint(self, model: Any, tokenizer: Any) -> str:
        """``kvwire.model.model_fingerprint``, computed once per model object."""
        from kvwire.model import model_fingerprint

        if model not in self._fingerprints:
            self._fingerprints[model] = model_fingerprint(model, tokenizer)
        return self._fingerprints[model]

    def measure_costs(self, model: Any, tokens: int = 256) -> CostModel:
        """The device costs the controller plans with: recompute per token timed on a dummy
        ``tokens``-token prefill of ``model`` (once per model object, shared by every client:
        ``recompute_s_per_token``); decode per chunk as measured by this client's last load into this
        model (a default before the first), and again during each load."""
        return CostModel(
            recompute_s_per_token=recompute_s_per_token(model, tokens),
            decode_s_per_chunk=self._decode_s_per_chunk.get(model, DEFAULT_DECODE_S_PER_CHUNK),
            request_overhead_s=DEFAULT_REQUEST_OVERHEAD_S,
        )

    def _prepare(
        self, context_id: str, fingerprint: str | None, started: float
    ) -> tuple[ContextManifest, CalibrationProfile, Deadline, LoadTimings]:
        """Manifest and profile of a load, both verified; the load's deadline and first timings."""
        deadline = self.retry.deadline()
        manifest = self._retrying(
            lambda: self.transport.get_manifest(context_id), f"manifest of {context_id!r}", deadline
        )
        check_manifest(manifest)
        if self.max_context_tokens is not None and manifest.total_tokens > self.max_context_tokens:
            raise LimitExceededError(
                f"context {context_id!r} has {manifest.total_tokens} tokens, more than this client's "
                f"max_context_tokens={self.max_context_tokens}; raise the bound (Client(..., "
                "max_context_tokens=N), None for none) to load it"
            )
        if fingerprint is not None and manifest.model_fingerprint != fingerprint:
            raise ModelMismatchError(
                f"context {context_id!r} was encoded for model {manifest.model_fingerprint[:12]}, not for "
                f"this model ({fingerprint[:12]}); load it with the model the server ingested it with"
            )
        if manifest.codec_version != codec.CODEC_VERSION:
            raise UnsupportedVersionError(
                f"context {context_id!r} uses codec version {manifest.codec_version}; "
                f"this client reads {codec.CODEC_VERSION}"
            )
        timings = LoadTimings(manifest_s=time.perf_counter() - started)
        profile = self.profile(manifest.profile_digest, deadline)
        timings.profile_s = time.perf_counter() - started - timings.manifest_s
        if profile.model_fingerprint != manifest.model_fingerprint:
            raise ModelMismatchError(
                f"profile {profile.digest[:12]} belongs to model {profile.model_fingerprint[:12]}, "
                f"not the context's {manifest.model_fingerprint[:12]}"
            )
        return manifest, profile, deadline, timings

    def load(
        self,
        model: Any,
        context_id: str,
        *,
        tokenizer: Any = None,
        model_fingerprint: str | None = None,
        mode: Mode | None = None,
        policy: Policy = "robust",
        costs: CostModel | None = None,
        estimator: ThroughputEstimator | None = None,
        bandwidth_hint_bytes_per_s: float | None = None,
        push: bool = False,
        prefetch: int = 2,
        progress: Progress | None = None,
    ) -> LoadedContext:
        """Load context ``context_id`` into a ``DynamicCache`` for ``model``.

        ``tokenizer`` (or ``model_fingerprint``) identifies the model, so that a context ingested with
        another model is refused (``ModelMismatchError``). ``mode``: ``Mode.fixed_level(L)``,
        ``Mode.text()`` or ``Mode.adaptive(slo_s)`` (default: the manifest's default level).
        ``push`` (gRPC only): the server chooses per chunk (``StreamContext``) instead of this
        client's controller. ``costs``: the device's recompute/decode costs (default: measured).
        """
        # Identifying the model and measuring its costs happen once per model object (the recompute
        # cost once per process), before the load's clock starts; the clock (the SLO's) then runs
        # from the manifest request on.
        if model_fingerprint is None:
            if tokenizer is None:
                raise InvalidInputError(
                    "give tokenizer= (or model_fingerprint=) so the context can be checked against the model"
                )
            model_fingerprint = self.fingerprint(model, tokenizer)
        if push and self.transport.name != "grpc":
            raise InvalidInputError("push=True (server-chosen levels) needs the gRPC transport")
        if costs is None:
            costs = (
                self.measure_costs(model)
                if mode is not None and mode.kind == "adaptive"
                else _nominal_costs()
            )
        if mode is not None and mode.kind == "adaptive":
            warm_up()  # once per process: the planner's compiled code, kept out of the load's TTFT
        started = time.perf_counter()
        manifest, profile, _, timings = self._prepare(context_id, model_fingerprint, started)
        mode = mode or Mode.fixed_level(manifest.default_level)
        hint = bandwidth_hint_bytes_per_s or DEFAULT_BANDWIDTH_BYTES_PER_S
        plan = LoadPlan(
            transport=self.transport,
            manifest=manifest,
            profile=profile,
            mode=mode,
            costs=costs,
            policy=policy,
            estimator=estimator or ThroughputEstimator(prior_bytes_per_s=hint),
            push=push,
            bandwidth_hint_bytes_per_s=bandwidth_hint_bytes_per_s,
            prefetch=prefetch,
            retry=self.retry,
        )
        sink = CacheBuilder(model)
        loader = Loader(plan, sink, started=started, timings=timings)
        records = loader.run(progress)
        cache = sink.result()
        timings.total_s = time.perf_counter() - started
        decoded = [r.compute_s for r in records if r.kind == "kv"]
        if decoded:  # the next adaptive load into this model starts from what this one measured
            self._decode_s_per_chunk[model] = sum(decoded) / len(decoded)
        token_ids = [t for c in manifest.chunks for t in c.token_ids]
        return LoadedContext(manifest, cache, token_ids, records, timings, mode)

    def load_tensors(
        self,
        context_id: str,
        *,
        level: int | None = None,
        model_fingerprint: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        prefetch: int = 2,
        progress: Progress | None = None,
    ) -> LoadedTensors:
        """The plain tensor API: every chunk's KV at ``level`` (default: the manifest's), decoded on
        ``device``. With ``model_fingerprint``, a context of another model is refused."""
        started = time.perf_counter()
        manifest, profile, _, timings = self._prepare(context_id, model_fingerprint, started)
        plan = LoadPlan(
            transport=self.transport,
            manifest=manifest,
            profile=profile,
            mode=Mode.fixed_level(manifest.default_level if level is None else level),
            costs=_nominal_costs(),
            prefetch=prefetch,
            retry=self.retry,
        )
        sink = TensorCollector(device, dtype)
        loader = Loader(plan, sink, started=started, timings=timings)
        records = loader.run(progress)
        loader.timings.total_s = time.perf_counter() - started
        chunks = [
            KVChunk(entry.index, entry.token_start, entry.token_ids, record.level or 0, kv)
            for (entry, kv), record in zip(sink.chunks, records, strict=True)
        ]
        return LoadedTensors(manifest, chunks, records, loader.timings)

    def iter_chunks(self, context_id: str) -> Iterator[ChunkEntry]:
        """The manifest's chunk entries (token ids, text, levels), without downloading any KV."""
        yield from self.manifest(context_id).chunks


def _nominal_costs() -> CostModel:
    """Costs for fixed modes, which do not plan (the decision log still shows expected seconds)."""
    return CostModel(recompute_s_per_token=1e-3, decode_s_per_chunk=DEFAULT_DECODE_S_PER_CHUNK)


__all__ = [
    "Answer",
    "Client",
    "KVChunk",
    "LoadedContext",
    "LoadedTensors",
    "ProfileCache",
    "generate_answer",
    "make_bucket",
    "parse_mode",
    "parse_profile",
    "recompute_s_per_token",
]
