"""Unit tests of the service core: manifests, content-addressed keys, the worker, jobs, limits."""

from __future__ import annotations

import random
import time
import zlib
from typing import Any

import pytest

from kvwire.errors import (
    BackendUnavailableError,
    InvalidInputError,
    LimitExceededError,
    ModelMismatchError,
    NotFoundError,
    RateLimitError,
)
from kvwire.manifest import ChunkEntry, ContextManifest, Job, LevelEntry
from kvwire.server.config import ServiceSettings, hash_api_key, parse_api_keys
from kvwire.server.jobs import IngestRequest, InProcessJobQueue
from kvwire.server.service import (
    KvwireService,
    ManifestCache,
    Worker,
    chunk_key,
    chunk_prefix_digests,
    manifest_key,
    manifest_memory,
    profile_key,
)
from kvwire.server.storage import LocalStore, Store

from .conftest import FakeCodec, FakeProfile, make_worker


def ids(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(128) for _ in range(n)]


def wait_job(service: KvwireService, tenant: str, job_id: str, timeout: float = 20.0) -> Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = service.job(tenant, job_id)
        if job.state in ("done", "failed"):
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish: {service.job(tenant, job_id)}")


# ------------------------------------------------------------------------------------------- keys


def test_chunk_key_layout() -> None:
    key = chunk_key("alice", "ab" * 32, "cd" * 16, 1, 3)
    assert key == f"t/alice/chunks/{'ab' * 8}/{'cd' * 16}/v1/L3"
    assert manifest_key("alice", "ctx-1") == "t/alice/contexts/ctx-1"
    assert profile_key("00ff") == "profiles/00ff"


def test_prefix_digests_share_prefix_only() -> None:
    a = ids(200)
    b = a[:128] + ids(72, seed=1)
    da, db = chunk_prefix_digests(a, 64, "p"), chunk_prefix_digests(b, 64, "p")
    assert len(da) == 4 and all(len(d) == 32 for d in da)
    assert da[:2] == db[:2] and da[2] != db[2] and da[3] != db[3]
    assert chunk_prefix_digests(a, 64, "q")[0] != da[0]  # another profile never aliases
    assert chunk_prefix_digests(a, 32, "p")[1] != da[0]  # same end, other start: distinct


# --------------------------------------------------------------------------------------- manifest


def test_ingest_tokens_writes_chunks_and_manifest(worker: Worker, store: Store, codec: FakeCodec) -> None:
    tokens = ids(150)
    manifest = worker.ingest(IngestRequest(tenant="alice", context_id="c1", token_ids=tokens))
    assert manifest.total_tokens == 150 and manifest.chunk_tokens == 64
    assert [(c.token_start, c.token_end) for c in manifest.chunks] == [(0, 64), (64, 128), (128, 150)]
    assert manifest.levels == [0, 1, 2, 3, 4] and manifest.default_level == 2
    assert codec.calls == 3 * 5
    for chunk in manifest.chunks:
        assert chunk.token_ids == tokens[chunk.token_start : chunk.token_end]
        assert chunk.text == "".join(chr(t) for t in chunk.token_ids)
        for entry in chunk.levels:
            data = store.get(entry.key)
            assert entry.nbytes == len(data) and entry.checksum == f"{zlib.crc32(data):08x}"
    assert store.get(profile_key(manifest.profile_digest)) == FakeProfile().to_bytes()
    stored = ContextManifest.from_json(store.get(manifest_key("alice", "c1")))
    assert stored == manifest
    assert ContextManifest.from_dict(manifest.to_dict()) == manifest


def test_reingest_and_shared_prefix_skip_encoding(
    worker: Worker, codec: FakeCodec, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kvwire.model

    prefilled: list[int] = []
    real_prefill = kvwire.model.prefill_kv

    def counting_prefill(model: Any, token_ids: list[int], *args: Any) -> Any:
        prefilled.append(len(token_ids))
        return real_prefill(model, token_ids, *args)

    monkeypatch.setattr(kvwire.model, "prefill_kv", counting_prefill)
    tokens = ids(256)
    first = worker.ingest(IngestRequest(tenant="alice", context_id="a", token_ids=tokens))
    assert codec.calls == 4 * 5 and prefilled == [256]
    again = worker.ingest(IngestRequest(tenant="alice", context_id="b", token_ids=tokens))
    assert codec.calls == 4 * 5 and prefilled == [256]  # nothing encoded, model not run
    assert [c.levels for c in again.chunks] == [c.levels for c in first.chunks]
    # Another tenant shares nothing: its chunks are encoded again, under its own keys.
    bobs = worker.ingest(IngestRequest(tenant="bob", context_id="b", token_ids=tokens))
    assert codec.calls == 2 * 4 * 5 and prefilled == [256, 256]
    assert all(e.key.startswith("t/bob/") for c in bobs.chunks for e in c.levels)
    other = tokens[:192] + ids(100, seed=5)
    longer = worker.ingest(IngestRequest(tenant="alice", context_id="c", token_ids=other))
    assert codec.calls == (8 + 2) * 5  # chunks 0-2 shared; 3 and 4 (partial) new
    assert prefilled == [256, 256, 292]
    assert [c.levels for c in longer.chunks[:3]] == [c.levels for c in first.chunks[:3]]


def test_encoding_matches_fresh_prefill_of_prefix(worker: Worker, store: Store) -> None:
    """Chunks are the KV of the whole prefix: a context's chunk equals the same chunk of a longer one."""
    tokens = ids(200, seed=3)
    short = worker.ingest(IngestRequest(tenant="alice", context_id="s", token_ids=tokens[:128]))
    store.delete_prefix("chunks")
    long = worker.ingest(IngestRequest(tenant="alice", context_id="l", token_ids=tokens))
    assert [lv.checksum for lv in long.chunks[1].levels] == [lv.checksum for lv in short.chunks[1].levels]


def test_text_ingest(worker: Worker) -> None:
    manifest = worker.ingest(IngestRequest(tenant="alice", context_id="t", text="hello world " * 10))
    assert manifest.total_tokens == 120
    assert "".join(c.text for c in manifest.chunks) == "hello world " * 10


def test_profile_of_another_model_is_refused(model: Any, store: Store, settings: ServiceSettings) -> None:
    profile = FakeProfile()
    profile.model_fingerprint = "f" * 64  # type: ignore[attr-defined]
    with pytest.raises(ModelMismatchError):
        make_worker(model, store, FakeCodec(), settings, profile=profile)


def test_levels_subset(model: Any, store: Store, settings: ServiceSettings) -> None:
    worker = make_worker(model, store, FakeCodec(), settings, levels=(1, 3))
    manifest = worker.ingest(IngestRequest(tenant="alice", context_id="x", token_ids=ids(10)))
    assert manifest.levels == [1, 3] and manifest.default_level == 1
    with pytest.raises(InvalidInputError):
        make_worker(model, store, FakeCodec(), settings, levels=(9,))


@pytest.mark.parametrize(
    ("tokens", "error"),
    [
        ([], InvalidInputError),
        ([1, 500], InvalidInputError),
        ([1, -1], InvalidInputError),
        ([1] * 2001, LimitExceededError),
    ],
)
def test_worker_rejects_bad_contexts(worker: Worker, tokens: list[int], error: type[Exception]) -> None:
    with pytest.raises(error):
        worker.ingest(IngestRequest(tenant="alice", context_id="bad", token_ids=tokens))


# ---------------------------------------------------------------------------------- atomic publish


class RecordingStore(LocalStore):
    """A local store that logs every key written, and can fail the n-th ``put_many``."""

    def __init__(self, *args: Any, fail_at: int | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.written: list[str] = []
        self.put_many_calls = 0
        self.fail_at = fail_at

    def put(self, key: str, data: bytes, ttl_s: float | None = None) -> None:
        super().put(key, data, ttl_s)
        self.written.append(key)

    def put_many(self, items: Any, ttl_s: float | None = None) -> None:
        self.put_many_calls += 1
        if self.fail_at is not None and self.put_many_calls == self.fail_at:
            raise BackendUnavailableError("store went away")
        super().put_many(items, ttl_s)


def test_manifest_is_written_after_every_chunk(model: Any, tmp_path: Any, settings: ServiceSettings) -> None:
    store = RecordingStore(tmp_path / "rec")
    worker = make_worker(model, store, FakeCodec(), settings)
    manifest = worker.ingest(IngestRequest(tenant="alice", context_id="m", token_ids=ids(200)))
    mkey = manifest_key("alice", "m")
    assert store.written[-1] == mkey and store.written.count(mkey) == 1
    chunk_keys = {lv.key for c in manifest.chunks for lv in c.levels}
    assert chunk_keys <= set(store.written[:-1])
    assert store.written[0] == profile_key(manifest.profile_digest)


def test_failed_ingest_publishes_no_manifest(model: Any, tmp_path: Any, settings: ServiceSettings) -> None:
    store = RecordingStore(tmp_path / "rec", fail_at=2)
    worker = make_worker(model, store, FakeCodec(), settings)
    with pytest.raises(BackendUnavailableError):
        worker.ingest(IngestRequest(tenant="alice", context_id="m", token_ids=ids(200)))
    assert not store.exists(manifest_key("alice", "m"))
    # A retry reuses the chunk that made it and completes.
    store.fail_at = None
    manifest = worker.ingest(IngestRequest(tenant="alice", context_id="m", token_ids=ids(200)))
    assert store.exists(manifest_key("alice", "m")) and len(manifest.chunks) == 4


# ----------------------------------------------------------------------------------------- service


def test_service_inline_and_reads(service: KvwireService) -> None:
    result = service.ingest("alice", token_ids=ids(100), context_id="c")
    assert isinstance(result, ContextManifest)
    assert service.manifest("alice", "c") == result
    data, entry = service.chunk("alice", "c", 1, 0)
    assert entry.level == 0 and len(data) == entry.nbytes
    assert service.chunk_entry("alice", "c", 0).level == result.default_level
    assert service.profile(result.profile_digest) == FakeProfile().to_bytes()
    with pytest.raises(NotFoundError):
        service.manifest("bob", "c")  # tenants are isolated
    with pytest.raises(NotFoundError):
        service.chunk("alice", "c", 2)
    with pytest.raises(NotFoundError):
        service.chunk("alice", "c", 0, level=7)
    with pytest.raises(NotFoundError):
        service.profile("0" * 64)
    with pytest.raises(InvalidInputError):
        service.manifest("alice", "../etc")


def test_service_generates_context_ids(service: KvwireService) -> None:
    a = service.ingest("alice", text="abc")
    b = service.ingest("alice", text="abc")
    assert isinstance(a, ContextManifest) and isinstance(b, ContextManifest)
    assert a.context_id != b.context_id and a.context_id.startswith("ctx-")


def test_service_queues_long_contexts(service: KvwireService) -> None:
    job = service.ingest("alice", token_ids=ids(500), context_id="long")
    assert isinstance(job, Job) and job.state in ("queued", "running")
    with pytest.raises(NotFoundError):
        service.job("bob", job.id)
    done = wait_job(service, "alice", job.id)
    assert done.state == "done" and done.chunks_done == done.chunks_total == 8
    assert service.manifest("alice", "long").total_tokens == 500


def test_failed_job_reports_typed_error(service: KvwireService) -> None:
    job = service.ingest("alice", token_ids=[1] * 300 + [999], context_id="bad")
    assert isinstance(job, Job)
    done = wait_job(service, "alice", job.id)
    assert done.state == "failed" and done.error is not None
    assert done.error["type"] == "InvalidInputError"


def test_service_limits_and_input(service: KvwireService) -> None:
    with pytest.raises(LimitExceededError):
        service.ingest("alice", token_ids=[1] * 2001)
    with pytest.raises(LimitExceededError):
        service.ingest("alice", text="x" * 2001)
    with pytest.raises(InvalidInputError):
        service.ingest("alice", text="a", token_ids=[1])
    with pytest.raises(InvalidInputError):
        service.ingest("alice")
    with pytest.raises(InvalidInputError):
        service.ingest("alice", text="a", context_id="no/slash")


def test_delete_keeps_shared_chunks(service: KvwireService) -> None:
    tokens = ids(100)
    a = service.ingest("alice", token_ids=tokens, context_id="a")
    service.ingest("alice", token_ids=tokens, context_id="b")
    service.delete("alice", "a")
    with pytest.raises(NotFoundError):
        service.manifest("alice", "a")
    with pytest.raises(NotFoundError):
        service.delete("alice", "a")
    assert isinstance(a, ContextManifest)
    data, _ = service.chunk("alice", "b", 0)
    assert len(data) == a.chunks[0].level(a.default_level).nbytes


class CountingStore(LocalStore):
    """A local store that counts reads."""

    gets = 0

    def get(self, key: str) -> bytes:
        self.gets += 1
        return super().get(key)


def test_manifest_cache_reads_once_and_drops_on_delete_and_reingest(
    model: Any, codec: FakeCodec, tmp_path: Any, settings: ServiceSettings
) -> None:
    store = CountingStore(tmp_path / "counting")
    service = KvwireService(store, InProcessJobQueue(), settings, make_worker(model, store, codec, settings))
    first = service.ingest("alice", token_ids=ids(100), context_id="c")
    assert isinstance(first, ContextManifest)
    store.gets = 0
    for index in (0, 1, 0):
        service.chunk_entry("alice", "c", index)
    assert service.manifest("alice", "c") == first
    assert service.manifest_json("alice", "c") == first.to_json()
    assert store.gets == 1  # one read and parse of the manifest for all of them

    second = service.ingest("alice", token_ids=ids(150, seed=1), context_id="c")  # re-ingest: replaced
    assert isinstance(second, ContextManifest) and service.manifest("alice", "c") == second

    service.delete("alice", "c")
    with pytest.raises(NotFoundError):
        service.chunk_entry("alice", "c", 0)
    with pytest.raises(NotFoundError):
        service.manifest_json("alice", "c")


def test_manifest_cache_sees_other_writers_after_its_ttl(
    store: Store, settings: ServiceSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = KvwireService(store, InProcessJobQueue(), settings, worker=None)
    manifest = ContextManifest("c", "alice", "f" * 64, "0" * 64, 1, 64, 0, [0], 0, [])
    store.put(manifest_key("alice", "c"), manifest.to_json())
    assert service.manifest("alice", "c") == manifest
    store.delete(manifest_key("alice", "c"))  # another process deletes it
    assert service.manifest("alice", "c") == manifest  # still cached here...
    now = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: now + settings.manifest_cache_ttl_s + 1)
    with pytest.raises(NotFoundError):  # ...until the TTL runs out
        service.manifest("alice", "c")


def test_manifest_cache_is_bounded_and_skips_raced_reads() -> None:
    manifest = ContextManifest("c", "t", "f" * 64, "0" * 64, 1, 64, 0, [0], 0, [])
    cache = ManifestCache(size=2, ttl_s=60)
    for name in ("a", "b", "c"):
        cache.put("t", name, manifest, b"{}", cache.token())
    assert len(cache) == 2 and cache.get("t", "a") is None and cache.get("t", "c") is not None
    token = cache.token()  # a reader starts reading "d" from the store...
    cache.invalidate("t", "d")  # ...while this process deletes or publishes it
    cache.put("t", "d", manifest, b"{}", token)
    assert cache.get("t", "d") is None  # the raced read is not cached
    assert len(ManifestCache(size=0, ttl_s=60)) == 0


def test_manifest_cache_is_bounded_in_bytes() -> None:
    def manifest(tokens: int) -> tuple[ContextManifest, bytes]:
        ids = list(range(1000, 1000 + tokens))
        chunk = ChunkEntry(0, 0, tokens, ids, "x" * tokens, [LevelEntry(0, "k", 10, "0" * 8)])
        m = ContextManifest("c", "t", "f" * 64, "0" * 64, 1, tokens, tokens, [0], 0, [chunk])
        return m, m.to_json()

    small, small_json = manifest(1000)
    one = manifest_memory(small, small_json)
    assert one > 36 * 1000  # the parsed token ids count, not only the JSON
    cache = ManifestCache(size=100, ttl_s=60, max_bytes=2 * one + one // 2)
    for name in ("a", "b", "c"):
        cache.put("t", name, small, small_json, cache.token())
    assert len(cache) == 2 and cache.get("t", "a") is None and cache.nbytes == 2 * one
    big, big_json = manifest(3000)  # alone over the bound: served, never cached
    assert cache.put("t", "big", big, big_json, cache.token()).manifest is big
    assert cache.get("t", "big") is None and len(cache) == 2
    cache.put("t", "c", small, small_json, cache.token())  # replacing an entry does not count it twice
    assert cache.nbytes == 2 * one
    for name in ("b", "c"):
        cache.invalidate("t", name)
    assert len(cache) == 0 and cache.nbytes == 0


def test_manifest_cache_drops_expired_entries_as_new_ones_come(monkeypatch: pytest.MonkeyPatch) -> None:
    import kvwire.server.service as service_module

    now = [100.0]
    monkeypatch.setattr(service_module.time, "monotonic", lambda: now[0])
    manifest = ContextManifest("c", "t", "f" * 64, "0" * 64, 1, 64, 0, [0], 0, [])
    cache = ManifestCache(size=100, ttl_s=5)
    for name in ("a", "b"):
        cache.put("t", name, manifest, b"{}", cache.token())
    now[0] += 6  # both expired, never read again
    cache.put("t", "c", manifest, b"{}", cache.token())
    assert len(cache) == 1 and cache.nbytes == manifest_memory(manifest, b"{}")


def test_queue_limit_is_rate_limit() -> None:
    queue = InProcessJobQueue(max_pending=1)
    queue.submit(IngestRequest(tenant="a", context_id="x", token_ids=[1]))
    with pytest.raises(RateLimitError):
        queue.submit(IngestRequest(tenant="a", context_id="y", token_ids=[1]))
    assert queue.counts()["queued"] == 1


def test_service_without_worker_queues_everything(store: Store, settings: ServiceSettings) -> None:
    service = KvwireService(store, InProcessJobQueue(), settings, worker=None)
    job = service.ingest("alice", text="short")
    assert isinstance(job, Job) and job.state == "queued"
    with pytest.raises(LimitExceededError):
        service.ingest("alice", token_ids=[1] * 2001)


# ------------------------------------------------------------------------------------------ config


def test_api_keys_are_hashed_at_load(monkeypatch: pytest.MonkeyPatch) -> None:
    digest = hash_api_key("k2")
    monkeypatch.setenv("KVWIRE_API_KEYS", f"alice:k1, bob:sha256:{digest}")
    monkeypatch.setenv("KVWIRE_CHUNK_TOKENS", "128")
    monkeypatch.setenv("KVWIRE_LEVELS", "0,2")
    s = ServiceSettings()
    assert s.api_keys == {hash_api_key("k1"): "alice", digest: "bob"}
    assert "k1" not in repr(s.api_keys)
    assert s.chunk_tokens == 128 and s.levels == (0, 2)
    assert s.storage.store == "local"
    with pytest.raises(InvalidInputError):
        parse_api_keys("no-colon")
    with pytest.raises(InvalidInputError):
        parse_api_keys("bad tenant:k")
    assert not ServiceSettings(api_keys="").auth_enabled


def test_settings_file(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "kvwire.toml"
    path.write_text('[service]\nport = 9000\napi_keys = "t:key"\n[storage]\nstore = "local"\n')
    monkeypatch.setenv("KVWIRE_CONFIG_FILE", str(path))
    s = ServiceSettings()
    assert s.port == 9000 and s.api_keys == {hash_api_key("key"): "t"}


# ------------------------------------------------------------------------------------------ wiring


def test_build_service_embedded(model: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The zero-configuration wiring: local store, in-process queue, a worker thread on the loaded model."""
    import kvwire.model
    from kvwire.server.service import build_service

    from .conftest import CharTokenizer, make_settings

    loaded: list[Any] = []

    def fake_load(name_or_path: Any = None, device: Any = None, **kw: Any) -> Any:
        loaded.append((name_or_path, device))
        return model, CharTokenizer()

    monkeypatch.setattr(kvwire.model, "load_model", fake_load)
    settings = make_settings(tmp_path, device="cpu", levels="0,4")
    service = build_service(settings, codec=FakeCodec(), calibrate=lambda m, t: FakeProfile())
    try:
        assert loaded == [(None, "cpu")] and isinstance(service.jobs, InProcessJobQueue)
        assert service.worker is not None and service.worker.levels == (0, 4)
        job = service.ingest("alice", token_ids=ids(300), context_id="big")
        assert isinstance(job, Job)
        assert wait_job(service, "alice", job.id).state == "done"
        service.health()
    finally:
        service.close()
    api_only = build_service(settings, with_worker=False)
    assert api_only.worker is None
    api_only.close()
