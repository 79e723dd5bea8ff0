"""The service core that the REST (and later gRPC) API call: manifests, chunk keys, the worker, jobs.

No HTTP here. The path of a context: text -> token ids -> KV cache (``kvwire.model.prefill_kv``) ->
chunks of ``chunk_tokens`` -> one bitstream per chunk and level (``kvwire.kernels.codec``) -> the
store (content-addressed keys) -> a :class:`ContextManifest` published last. See docs/service.md.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from kvwire.errors import InvalidInputError, LimitExceededError, ModelMismatchError, NotFoundError
from kvwire.kernels.format import crc32_hex
from kvwire.manifest import ChunkEntry, ContextManifest, Job, LevelEntry
from kvwire.server.config import ServiceSettings
from kvwire.server.jobs import IngestRequest, InProcessJobQueue, JobQueue, RedisJobQueue
from kvwire.server.limits import SharedJobSlots, open_limits_redis
from kvwire.server.storage import Store, open_store

log = logging.getLogger(__name__)

_DIGEST = re.compile(r"[0-9a-f]{16,128}")
CONTEXT_ID_PATTERN = r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}"
#: Most context ids one list page returns (REST ``GET /v1/contexts``, gRPC ``ListContexts``).
MAX_LIST_PAGE = 1000
DEFAULT_LIST_PAGE = 100
_CONTEXT_ID = re.compile(CONTEXT_ID_PATTERN)

Progress = Callable[[int, int], None]


# ------------------------------------------------------------------------------------- the codec seam


class Profile(Protocol):
    """What the service needs of a ``CalibrationProfile``: its digest and its bytes."""

    @property
    def digest(self) -> str: ...

    def to_bytes(self) -> bytes: ...


class ChunkCodec(Protocol):
    """Encodes one chunk of KV ``[layers, 2, kv_heads, tokens, head_dim]`` at one level into bytes."""

    version: int
    levels: tuple[int, ...]
    default_level: int

    def encode(
        self, kv: torch.Tensor, profile: Any, *, level: int, token_start: int, model_fingerprint: str
    ) -> bytes: ...


class KernelsCodec:
    """The real codec, ``kvwire.kernels.codec`` (imported on first use)."""

    def __init__(self) -> None:
        from kvwire.kernels import codec

        self._codec = codec
        self.version = int(codec.CODEC_VERSION)
        self.levels = tuple(codec.LEVELS)
        self.default_level = int(codec.DEFAULT_LEVEL)

    def encode(
        self, kv: torch.Tensor, profile: Any, *, level: int, token_start: int, model_fingerprint: str
    ) -> bytes:
        encoded = self._codec.encode_chunk(
            kv, profile, level=level, token_start=token_start, model_fingerprint=model_fingerprint
        )
        return bytes(encoded.data)


def default_calibrate(model: Any, tokenizer: Any) -> Profile:
    """``kvwire.calibration.load_or_calibrate`` (imported on first use)."""
    try:
        from kvwire.calibration import load_or_calibrate  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:
        raise NotFoundError(f"calibration is not available in this build: {exc}") from exc

    profile: Profile = load_or_calibrate(model, tokenizer)
    return profile


# -------------------------------------------------------------------------------------------- keys


def manifest_key(tenant: str, context_id: str) -> str:
    return f"{manifests_prefix(tenant)}/{context_id}"


def manifests_prefix(tenant: str) -> str:
    """The store prefix under which every manifest of ``tenant`` (and nothing else) lives."""
    return f"t/{tenant}/contexts"


def profile_key(digest: str) -> str:
    return f"profiles/{digest}"


def chunk_key(tenant: str, model_fingerprint: str, prefix_digest: str, codec_version: int, level: int) -> str:
    """A chunk's content address, inside its tenant's namespace: prefixes are shared within a tenant
    only, so no tenant can learn (from what is reused, or how fast) what another has ingested."""
    return f"t/{tenant}/chunks/{model_fingerprint[:16]}/{prefix_digest}/v{codec_version}/L{level}"


def chunk_prefix_digests(token_ids: Sequence[int], chunk_tokens: int, profile_digest: str) -> list[str]:
    """Per chunk, ``sha256(profile digest, chunk start, token ids [0, chunk end))[:32]`` in hex.

    A chunk's KV depends on every token before its end, so the digest covers the whole prefix; the
    start and the profile are mixed in so that a changed chunk size or recalibration never aliases.
    Token ids enter as little-endian uint32.
    """
    ids = np.asarray(token_ids, dtype="<u4").tobytes()
    running = hashlib.sha256(b"kvwire-chunk-v1\0" + profile_digest.encode() + b"\0")
    out = []
    for start in range(0, len(token_ids), chunk_tokens):
        end = min(start + chunk_tokens, len(token_ids))
        running.update(ids[start * 4 : end * 4])
        digest = running.copy()
        digest.update(start.to_bytes(8, "little"))
        out.append(digest.hexdigest()[:32])
    return out


def validate_context_id(context_id: str) -> str:
    if not isinstance(context_id, str) or not _CONTEXT_ID.fullmatch(context_id):
        raise InvalidInputError("context_id must be 1-128 characters of [A-Za-z0-9._-], not led by '.'")
    return context_id


def validate_text(text: str) -> str:
    """Refuse text that is not valid Unicode: JSON may carry lone surrogates (``"\\ud800"``), which
    tokenizers cannot encode (a TypeError deep in ``tokenizers``, not a clear error)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(
            f"text is not valid Unicode at position {exc.start} (a lone surrogate)"
        ) from None
    return text


def new_context_id() -> str:
    return "ctx-" + uuid.uuid4().hex[:20]


# ------------------------------------------------------------------------------------------- worker


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class Worker:
    """Prefills contexts with one model, encodes their chunks at every level, stores them, publishes.

    Holds the model, its fingerprint and its calibration profile (stored under ``profiles/<digest>``
    at start). Thread-compatible, not thread-safe: run one ingest at a time per worker.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        store: Store,
        *,
        profile: Profile,
        codec: ChunkCodec,
        chunk_tokens: int = 256,
        levels: Sequence[int] | None = None,
        max_context_tokens: int = 131072,
        fingerprint: str | None = None,
    ):
        from kvwire.model import model_fingerprint

        self.model = model
        self.tokenizer = tokenizer
        self.store = store
        self.profile = profile
        self.codec = codec
        self.chunk_tokens = chunk_tokens
        self.levels = tuple(levels) if levels is not None else tuple(codec.levels)
        if not self.levels or any(lv not in codec.levels for lv in self.levels):
            raise InvalidInputError(f"levels {self.levels} must be a non-empty subset of {codec.levels}")
        self.default_level = codec.default_level if codec.default_level in self.levels else self.levels[0]
        self.max_context_tokens = max_context_tokens
        self.fingerprint = fingerprint or model_fingerprint(model, tokenizer)
        profile_model = getattr(profile, "model_fingerprint", None)
        if profile_model and profile_model != self.fingerprint:
            raise ModelMismatchError(
                f"profile {profile.digest[:12]} was calibrated for model {profile_model[:12]}, "
                f"not {self.fingerprint[:12]}"
            )
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)
        key = profile_key(profile.digest)
        if not store.exists(key):
            store.put(key, profile.to_bytes())

    @classmethod
    def from_settings(
        cls,
        settings: ServiceSettings,
        store: Store,
        *,
        codec: ChunkCodec | None = None,
        calibrate: Callable[[Any, Any], Profile] | None = None,
    ) -> Worker:
        """Load the configured model (GPU if available), calibrate or load its profile."""
        from kvwire.model import load_model

        model, tokenizer = load_model(settings.model, device=settings.device or _default_device())
        return cls(
            model,
            tokenizer,
            store,
            profile=(calibrate or default_calibrate)(model, tokenizer),
            codec=codec or KernelsCodec(),
            chunk_tokens=settings.chunk_tokens,
            levels=settings.levels,
            max_context_tokens=settings.max_context_tokens,
        )

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens (a context is a plain token stream)."""
        validate_text(text)
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        self._check_tokens(ids)
        return ids

    def _check_tokens(self, ids: Sequence[int]) -> None:
        if not ids:
            raise InvalidInputError("the context is empty")
        if len(ids) > self.max_context_tokens:
            raise LimitExceededError(f"context has {len(ids)} tokens; the limit is {self.max_context_tokens}")
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size for t in ids):
            raise InvalidInputError(f"token ids must be integers in [0, {self.vocab_size})")

    def ingest(self, request: IngestRequest, progress: Progress | None = None) -> ContextManifest:
        """Encode and store every chunk of the request's context, then publish its manifest.

        Chunks whose keys all exist already (same model, profile, codec and token prefix) are reused
        without encoding, and the model is run only up to the end of the last missing chunk.
        """
        validate_context_id(request.context_id)
        if request.token_ids is not None:
            ids = list(request.token_ids)
            self._check_tokens(ids)
        elif request.text is not None:
            ids = self.tokenize(request.text)
        else:
            raise InvalidInputError("give text or token_ids")
        ct, version = self.chunk_tokens, self.codec.version
        ranges = [(s, min(s + ct, len(ids))) for s in range(0, len(ids), ct)]
        digests = chunk_prefix_digests(ids, ct, self.profile.digest)
        keys = [
            [chunk_key(request.tenant, self.fingerprint, d, version, lv) for lv in self.levels]
            for d in digests
        ]
        existing = self.store.try_get_many([k for row in keys for k in row])
        levels_of: list[list[LevelEntry] | None] = []
        for i, row in enumerate(keys):
            values = existing[i * len(self.levels) : (i + 1) * len(self.levels)]
            if all(v is not None for v in values):
                levels_of.append(
                    [
                        LevelEntry(lv, k, len(v), crc32_hex(v))
                        for lv, k, v in zip(self.levels, row, values, strict=True)
                        if v is not None
                    ]
                )
            else:
                levels_of.append(None)
        missing = [i for i, entry in enumerate(levels_of) if entry is None]
        total = len(ranges)
        done = total - len(missing)
        if progress:
            progress(done, total)
        if missing:
            from kvwire.model import prefill_kv

            kv = prefill_kv(self.model, ids[: ranges[missing[-1]][1]])
            for i in missing:
                start, end = ranges[i]
                chunk_kv = kv[:, :, :, start:end]
                entries, items = [], []
                for lv, key in zip(self.levels, keys[i], strict=True):
                    data = self.codec.encode(
                        chunk_kv,
                        self.profile,
                        level=lv,
                        token_start=start,
                        model_fingerprint=self.fingerprint,
                    )
                    entries.append(LevelEntry(lv, key, len(data), crc32_hex(data)))
                    items.append((key, data))
                self.store.put_many(items)
                levels_of[i] = entries
                done += 1
                if progress:
                    progress(done, total)
            del kv
        chunks = [
            ChunkEntry(
                index=i,
                token_start=start,
                token_end=end,
                token_ids=ids[start:end],
                text=self.tokenizer.decode(ids[start:end]),
                levels=levels_of[i] or [],
            )
            for i, (start, end) in enumerate(ranges)
        ]
        manifest = ContextManifest(
            context_id=request.context_id,
            tenant=request.tenant,
            model_fingerprint=self.fingerprint,
            profile_digest=self.profile.digest,
            codec_version=version,
            chunk_tokens=ct,
            total_tokens=len(ids),
            levels=list(self.levels),
            default_level=self.default_level,
            chunks=chunks,
        )
        # The profile was stored when the worker started, but a store can lose it since (Redis
        # eviction, a backend restarted empty): a manifest is never published without its profile.
        profile = profile_key(self.profile.digest)
        if not self.store.exists(profile):
            self.store.put(profile, self.profile.to_bytes())
        # Published only now: every chunk and the profile are already in the store.
        self.store.put(manifest_key(request.tenant, request.context_id), manifest.to_json())
        return manifest


# ------------------------------------------------------------------------------------------ service


@dataclass(frozen=True)
class _CachedManifest:
    manifest: ContextManifest
    data: bytes  # the stored JSON, served as is by GET /v1/contexts/{id}
    expires_at: float
    nbytes: int = 0  # memory it holds, estimated (manifest_memory)


#: Python memory per token id of a parsed manifest (an int object and its list slot), measured with
#: tracemalloc on 4,600-token manifests (docs/reliability.md: 167 KB parsed for 4,600 ids).
_PARSED_BYTES_PER_TOKEN = 36


def manifest_memory(manifest: ContextManifest, data: bytes) -> int:
    """What a cached manifest costs in memory: its JSON, its parsed token ids and chunk texts."""
    text = sum(len(chunk.text) for chunk in manifest.chunks)
    return len(data) + _PARSED_BYTES_PER_TOKEN * manifest.total_tokens + text + 512 * len(manifest.chunks)


class ManifestCache:
    """A small LRU of parsed manifests keyed by (tenant, context_id), each kept ``ttl_s`` seconds.

    Every chunk request needs its context's manifest; re-reading and re-parsing the whole JSON
    (~1 ms per 10 chunks) cost more than serving the chunk itself (see docs/serving-benchmark.md).
    This process drops an entry when it deletes or publishes that context; the TTL bounds how long
    another process's delete or re-ingest stays unseen here. It holds at most ``size`` manifests and
    ``max_bytes`` of them (``manifest_memory``: a manifest holds every token id, so a long context's
    is megabytes); expired entries at the old end are dropped as new ones come. Thread-safe; the
    manifests it hands out are shared, so callers must not mutate them.
    """

    def __init__(self, size: int, ttl_s: float, max_bytes: int = 64 * 1024 * 1024):
        self.size = size
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[tuple[str, str], _CachedManifest] = OrderedDict()
        self._lock = threading.Lock()
        self._invalidations = 0

    def token(self) -> int:
        """Take before reading a manifest from the store; :meth:`put` drops the read if any
        invalidation happened since, so a read that raced a delete or publish is never cached."""
        return self._invalidations

    def get(self, tenant: str, context_id: str) -> _CachedManifest | None:
        with self._lock:
            entry = self._entries.get((tenant, context_id))
            if entry is None:
                return None
            if entry.expires_at <= time.monotonic():
                self._drop((tenant, context_id))
                return None
            self._entries.move_to_end((tenant, context_id))
            return entry

    def put(
        self, tenant: str, context_id: str, manifest: ContextManifest, data: bytes, token: int
    ) -> _CachedManifest:
        now = time.monotonic()
        entry = _CachedManifest(manifest, data, now + self.ttl_s, manifest_memory(manifest, data))
        if self.size <= 0 or self.ttl_s <= 0 or entry.nbytes > self.max_bytes:
            return entry
        with self._lock:
            if token != self._invalidations:
                return entry
            self._drop((tenant, context_id))
            self._entries[tenant, context_id] = entry
            self.nbytes += entry.nbytes
            while self._entries and (
                len(self._entries) > self.size
                or self.nbytes > self.max_bytes
                or next(iter(self._entries.values())).expires_at <= now
            ):
                self._drop(next(iter(self._entries)))
        return entry

    def invalidate(self, tenant: str, context_id: str) -> None:
        with self._lock:
            self._invalidations += 1
            self._drop((tenant, context_id))

    def _drop(self, key: tuple[str, str]) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.nbytes -= entry.nbytes

    def __len__(self) -> int:
        return len(self._entries)


class KvwireService:
    """The operations every API exposes, per tenant. ``worker`` is set when this process can ingest.

    With a worker (the embedded default), contexts of up to ``inline_max_tokens`` tokens are ingested
    inline and longer ones through the job queue, whose consumer thread :meth:`start_workers` starts.
    Without one, every ingest is queued for standalone workers (``kvwire worker``).
    """

    def __init__(self, store: Store, jobs: JobQueue, settings: ServiceSettings, worker: Worker | None = None):
        self.store = store
        self.jobs = jobs
        self.settings = settings
        self.worker = worker
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._worker_lock = threading.Lock()  # inline ingests and the worker thread share one model
        self.manifests = ManifestCache(
            settings.manifest_cache_size, settings.manifest_cache_ttl_s, settings.manifest_cache_bytes
        )
        #: More that ``health`` checks, added by what starts with the process (the gRPC API's
        #: planner warm-up): each raises ``BackendUnavailableError`` while the process is not ready.
        self.readiness_checks: list[Callable[[], None]] = []

    # -- ingest

    def ingest(
        self,
        tenant: str,
        *,
        text: str | None = None,
        token_ids: list[int] | None = None,
        context_id: str | None = None,
    ) -> ContextManifest | Job:
        """Ingest a context: its manifest if done inline, else the queued :class:`Job`."""
        if (text is None) == (token_ids is None):
            raise InvalidInputError("give exactly one of text and token_ids")
        if text is not None:
            validate_text(text)
        context_id = validate_context_id(context_id) if context_id is not None else new_context_id()
        if token_ids is not None and len(token_ids) > self.settings.max_context_tokens:
            raise LimitExceededError(
                f"context has {len(token_ids)} tokens; the limit is {self.settings.max_context_tokens}"
            )
        if self.worker is not None and text is not None:
            token_ids, text = self.worker.tokenize(text), None
        request = IngestRequest(tenant=tenant, context_id=context_id, text=text, token_ids=token_ids)
        inline = token_ids is not None and len(token_ids) <= self.settings.inline_max_tokens
        if self.worker is not None and inline:
            return self.run_ingest(request)
        return self.jobs.submit(request)

    def run_ingest(self, request: IngestRequest, progress: Progress | None = None) -> ContextManifest:
        """Run one ingest on this process's worker (the job handler of the embedded queue)."""
        if self.worker is None:
            raise InvalidInputError("this process has no worker")
        try:
            with self._worker_lock:
                return self.worker.ingest(request, progress)
        finally:
            self.manifests.invalidate(request.tenant, request.context_id)

    def job(self, tenant: str, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job.tenant != tenant:  # another tenant's job does not exist for this one
            raise NotFoundError(f"no job {job_id!r}")
        return job

    # -- reads

    def manifest(self, tenant: str, context_id: str) -> ContextManifest:
        return self._manifest(tenant, context_id).manifest

    def manifest_json(self, tenant: str, context_id: str) -> bytes:
        """The manifest as stored (JSON, checked to parse as a :class:`ContextManifest`)."""
        return self._manifest(tenant, context_id).data

    def _manifest(self, tenant: str, context_id: str) -> _CachedManifest:
        cached = self.manifests.get(tenant, context_id)
        if cached is not None:
            return cached
        validate_context_id(context_id)
        token = self.manifests.token()
        try:
            data = self.store.get(manifest_key(tenant, context_id))
        except NotFoundError:
            raise NotFoundError(f"no context {context_id!r}") from None
        return self.manifests.put(tenant, context_id, ContextManifest.from_json(data), data, token)

    def chunk_entry(self, tenant: str, context_id: str, index: int, level: int | None = None) -> LevelEntry:
        """Where chunk ``index`` at ``level`` (default: the manifest's) is, without reading it."""
        manifest = self.manifest(tenant, context_id)
        return manifest.chunk(index).level(manifest.default_level if level is None else level)

    def chunk(
        self, tenant: str, context_id: str, index: int, level: int | None = None
    ) -> tuple[bytes, LevelEntry]:
        """The bitstream of chunk ``index`` at ``level`` and its manifest entry."""
        entry = self.chunk_entry(tenant, context_id, index, level)
        return self.store.get(entry.key), entry

    def profile(self, digest: str) -> bytes:
        """Profile bytes by digest (profiles describe models, not tenant data: any tenant may read)."""
        if not _DIGEST.fullmatch(digest):
            raise NotFoundError(f"no profile {digest!r}")
        try:
            return self.store.get(profile_key(digest))
        except NotFoundError:
            raise NotFoundError(f"no profile {digest!r}") from None

    def list_contexts(
        self, tenant: str, *, limit: int, after: str | None = None
    ) -> tuple[list[str], str | None]:
        """Up to ``limit`` of ``tenant``'s context ids in sorted order, those after ``after`` if given,
        and the id to pass as ``after`` for the next page (``None`` on the last page)."""
        if not 0 < limit <= MAX_LIST_PAGE:
            raise InvalidInputError(f"limit must be in [1, {MAX_LIST_PAGE}]")
        prefix = manifests_prefix(tenant) + "/"
        ids = sorted(key[len(prefix) :] for key in self.store.list_keys(prefix))
        if after is not None:
            ids = [i for i in ids if i > after]
        page = ids[:limit]
        return page, (page[-1] if len(ids) > limit else None)

    def delete(self, tenant: str, context_id: str) -> None:
        """Delete a context's manifest. Its chunks stay: they are content-addressed and may be shared."""
        validate_context_id(context_id)
        try:
            existed = self.store.delete(manifest_key(tenant, context_id))
        finally:
            self.manifests.invalidate(tenant, context_id)
        if not existed:
            raise NotFoundError(f"no context {context_id!r}")

    def health(self) -> None:
        """Return if the store and the job queue answer and every readiness check passes;
        ``BackendUnavailableError`` otherwise."""
        for check in self.readiness_checks:
            check()
        self.store.health()
        self.jobs.health()

    # -- lifecycle

    def start_workers(self, count: int = 1) -> None:
        """Start ``count`` threads consuming the job queue with this process's worker."""
        if self.worker is None:
            raise InvalidInputError("this process has no worker")
        for n in range(count):
            thread = threading.Thread(
                target=self.jobs.run_worker,
                args=(self.run_ingest,),
                kwargs={"consumer": f"{_consumer_name()}-t{n}", "stop": self._stop},
                name=f"kvwire-worker-{n}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        self.jobs.close()
        self.store.close()


def _consumer_name() -> str:
    import os
    import socket

    return f"{socket.gethostname()}-{os.getpid()}"


def open_job_queue(settings: ServiceSettings) -> JobQueue:
    """The Redis Streams queue if ``jobs_redis_url`` is set, else the in-process one."""
    if settings.jobs_redis_url:
        return RedisJobQueue(
            settings.jobs_redis_url,
            namespace=settings.jobs_namespace,
            claim_idle_s=settings.jobs_claim_idle_s,
            max_deliveries=settings.jobs_max_deliveries,
            max_pending=settings.max_pending_jobs,
            max_per_tenant=settings.max_jobs_per_tenant,
            job_ttl_s=settings.jobs_ttl_s,
            # The same socket and connect timeouts as the Redis store (docs/service.md, "Timeouts").
            socket_timeout_s=settings.storage.redis_socket_timeout_s,
            connect_timeout_s=settings.storage.redis_connect_timeout_s,
        )
    # Several server processes with their own queues still share one per-tenant count when there is
    # a Redis (kvwire.server.limits).
    redis = open_limits_redis(settings)
    slots = None if redis is None else SharedJobSlots(redis, settings.max_jobs_per_tenant)
    return InProcessJobQueue(
        max_pending=settings.max_pending_jobs, max_per_tenant=settings.max_jobs_per_tenant, slots=slots
    )


def build_service(
    settings: ServiceSettings,
    *,
    with_worker: bool | None = None,
    codec: ChunkCodec | None = None,
    calibrate: Callable[[Any, Any], Profile] | None = None,
) -> KvwireService:
    """Open the store and queue ``settings`` describe; load a worker unless jobs go to Redis workers.

    ``with_worker=None`` means: a worker (and its consumer thread) for the in-process queue, none
    when ``jobs_redis_url`` is set (standalone ``kvwire worker`` processes do the work).
    """
    store = open_store(settings.storage)
    jobs = open_job_queue(settings)
    if with_worker is None:
        with_worker = not settings.jobs_redis_url
    worker = Worker.from_settings(settings, store, codec=codec, calibrate=calibrate) if with_worker else None
    service = KvwireService(store, jobs, settings, worker)
    if worker is not None:
        service.start_workers()
    return service


def run_standalone_worker(settings: ServiceSettings, stop: threading.Event | None = None) -> None:
    """Consume the Redis job stream until ``stop`` is set (``kvwire worker``)."""
    if not settings.jobs_redis_url:
        raise InvalidInputError("a standalone worker needs KVWIRE_JOBS_REDIS_URL")
    store = open_store(settings.storage)
    jobs = open_job_queue(settings)
    worker = Worker.from_settings(settings, store)
    stop = stop or threading.Event()
    log.info("kvwire worker %s consuming %s", _consumer_name(), settings.jobs_redis_url)
    try:
        jobs.run_worker(worker.ingest, consumer=_consumer_name(), stop=stop)
    finally:
        jobs.close()
        store.close()
