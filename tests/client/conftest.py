"""Fixtures for the client tests: a tiny random-weight Llama with a real fitted profile, a real worker
that stores real codec chunks, and an in-memory transport over the service that can be told to fail."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kvwire.client import Client, RetryPolicy
from kvwire.client.throttle import TokenBucket
from kvwire.client.transport import FetchedChunk, StreamedChunk, StreamSpec
from kvwire.controller import Controller
from kvwire.kernels.profile import CalibrationProfile, fit_profile
from kvwire.kernels.transform import remove_rope, rope_tables
from kvwire.manifest import ContextManifest, Job
from kvwire.model import model_fingerprint, prefill_kv, rope_parameters
from kvwire.server.config import ServiceSettings
from kvwire.server.jobs import InProcessJobQueue
from kvwire.server.service import KernelsCodec, KvwireService, Worker
from kvwire.server.storage import LocalStore

from ..server.conftest import CharTokenizer, tiny_llama

CHUNK_TOKENS = 16
CONTEXT = "The quick brown fox jumps over the lazy dog; " * 2  # 90 characters = 90 tokens, 6 chunks


def tiny_profile(model: Any, tokenizer: Any) -> CalibrationProfile:
    """A real calibration profile of ``model`` fitted on its own KV of random tokens (no sensitivity
    weighting: the tests need a valid profile, not a good one)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 128, size=256).tolist()
    kv = prefill_kv(model, ids).double().numpy()
    inv_freq = rope_parameters(model).inv_freq.numpy().astype(np.float32)
    cos, sin = rope_tables(np.arange(kv.shape[3]), inv_freq)
    kv[:, 0] = remove_rope(kv[:, 0], cos, sin)
    return fit_profile(
        [kv[:, :, :, 4:]],
        model_fingerprint=model_fingerprint(model, tokenizer),
        inv_freq=inv_freq,
        layer_weight=np.full((kv.shape[0], 2), 0.02),
    )


@dataclass
class Setup:
    model: Any
    tokenizer: Any
    profile: CalibrationProfile
    service: KvwireService
    manifest: ContextManifest


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    torch.manual_seed(0)
    model, tokenizer = tiny_llama(), CharTokenizer()
    profile = tiny_profile(model, tokenizer)
    store = LocalStore(tmp_path_factory.mktemp("store"))
    settings = ServiceSettings(chunk_tokens=CHUNK_TOKENS, inline_max_tokens=10_000)
    worker = Worker(model, tokenizer, store, profile=profile, codec=KernelsCodec(), chunk_tokens=CHUNK_TOKENS)
    service = KvwireService(store, InProcessJobQueue(), settings, worker)
    manifest = service.ingest("default", text=CONTEXT, context_id="ctx")
    assert isinstance(manifest, ContextManifest)
    try:
        yield Setup(model, tokenizer, profile, service, manifest)
    finally:
        service.close()


Fault = Callable[[str, tuple[Any, ...]], None]


@dataclass
class ServiceTransport:
    """The ``Transport`` interface straight over a ``KvwireService`` (no network), recording every call
    and running ``fault(method, args)`` first, which may raise to simulate a failure."""

    service: KvwireService
    name: str = "fake"
    bucket: TokenBucket | None = None  # the Transport interface's throttle; this fake ignores it
    calls: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    fault: Fault | None = None
    profile_bytes: bytes | None = None  # served instead of the real profile
    mangle: Callable[[int, bytes], bytes] | None = None  # rewrites chunk bytes
    edit_manifest: Callable[[ContextManifest], ContextManifest] | None = None  # rewrites manifests
    stream: Callable[[str, StreamSpec], Iterator[StreamedChunk]] | None = None
    jobs: list[Job] = field(default_factory=list)  # served by get_job, in order

    def _call(self, method: str, *args: Any) -> None:
        self.calls.append((method, args))
        if self.fault is not None:
            self.fault(method, args)

    def create_context(
        self, *, text: str | None, token_ids: list[int] | None, context_id: str | None
    ) -> ContextManifest | Job:
        self._call("create_context", context_id)
        if self.jobs:
            return self.jobs.pop(0)
        return self.service.ingest("default", text=text, token_ids=token_ids, context_id=context_id)

    def get_job(self, job_id: str) -> Job:
        self._call("get_job", job_id)
        return self.jobs.pop(0)

    def get_manifest(self, context_id: str) -> ContextManifest:
        self._call("get_manifest", context_id)
        manifest = self.service.manifest("default", context_id)
        return self.edit_manifest(manifest) if self.edit_manifest is not None else manifest

    def get_chunk(self, context_id: str, index: int, level: int | None) -> FetchedChunk:
        self._call("get_chunk", context_id, index, level)
        data, entry = self.service.chunk("default", context_id, index, level)
        if self.mangle is not None:
            data = self.mangle(index, data)
        return FetchedChunk(index, entry.level, data, entry.checksum, 1e-3)

    def get_profile(self, digest: str) -> bytes:
        self._call("get_profile", digest)
        return self.profile_bytes if self.profile_bytes is not None else self.service.profile(digest)

    def delete_context(self, context_id: str) -> None:
        self._call("delete_context", context_id)
        self.service.delete("default", context_id)

    def health(self, ready: bool = False) -> None:
        self._call("health")

    def stream_context(self, context_id: str, spec: StreamSpec) -> Iterator[StreamedChunk]:
        self._call("stream_context", context_id)
        assert self.stream is not None
        return self.stream(context_id, spec)

    def close(self) -> None:
        pass

    def chunk_calls(self) -> list[int]:
        return [args[1] for method, args in self.calls if method == "get_chunk"]


def push_stream(
    service: KvwireService, fail_after: int | None = None, script: list[int | None] | None = None
) -> Any:
    """A server-push stream as the gRPC servicer builds it (same controller), optionally broken after
    ``fail_after`` chunks; ``script`` dictates each chunk's choice instead (a level, or None: text)."""
    from kvwire.client.loader import context_options
    from kvwire.controller import CostModel, ThroughputEstimator

    def stream(context_id: str, spec: StreamSpec) -> Iterator[StreamedChunk]:
        from kvwire.errors import ServerUnavailableError

        manifest = service.manifest("default", context_id)
        controller = Controller(
            context_options(manifest),
            spec.mode,
            spec.costs or CostModel(recompute_s_per_token=1e-3),
            estimator=ThroughputEstimator(prior_bytes_per_s=1e8),
        )
        for chunk in manifest.chunks:
            if fail_after is not None and chunk.index == fail_after:
                raise ServerUnavailableError("stream reset by peer")
            d = controller.decide(0.0)
            if script is not None:
                level = script[chunk.index]
                d = dataclasses.replace(d, kind="kv" if level is not None else "text", level=level)
            data = service.chunk("default", context_id, chunk.index, d.level)[0] if d.kind == "kv" else b""
            yield StreamedChunk(
                index=chunk.index,
                token_start=chunk.token_start,
                n_tokens=chunk.token_end - chunk.token_start,
                kind=d.kind,
                level=d.level,
                data=data,
                checksum="",
                token_ids=chunk.token_ids if d.kind == "text" else [],
                reason="server: " + d.reason,
                predicted_completion_s=None,
                estimate_bytes_per_s=None,
                seconds=1e-3,
            )

    return stream


FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff_s=0.001, max_backoff_s=0.002, total_timeout_s=10)


def make_client(transport: ServiceTransport, tmp_path: Path, retry: RetryPolicy = FAST_RETRY) -> Client:
    return Client("unused", transport=transport, retry=retry, profile_dir=tmp_path / "profiles")  # type: ignore[arg-type]
