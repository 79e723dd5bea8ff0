"""The SDK's load path against an in-memory transport: real codec chunks of a tiny model, injected faults."""

from __future__ import annotations

import dataclasses
import logging
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch

from kvwire.client import Client, RetryPolicy
from kvwire.client.loader import TensorCollector
from kvwire.client.sdk import parse_mode, parse_profile
from kvwire.controller import CostModel, Mode
from kvwire.errors import (
    AuthError,
    CorruptChunkError,
    InvalidInputError,
    LimitExceededError,
    ModelMismatchError,
    NotFoundError,
    ProfileMismatchError,
    ServerUnavailableError,
)
from kvwire.manifest import ContextManifest, Job
from kvwire.model import cache_kwargs, cache_to_tensor, prefill_kv, tensor_to_cache

from .conftest import CHUNK_TOKENS, FAST_RETRY, ServiceTransport, Setup, make_client, push_stream


def reference_kv(setup: Setup) -> torch.Tensor:
    ids = [t for c in setup.manifest.chunks for t in c.token_ids]
    return prefill_kv(setup.model, ids)


def load(setup: Setup, transport: ServiceTransport, tmp_path: Path, **kw: Any) -> Any:
    client = make_client(transport, tmp_path, kw.pop("retry", FAST_RETRY))
    return client.load(setup.model, "ctx", tokenizer=setup.tokenizer, **kw)


# ------------------------------------------------------------------------------------ what is loaded


def test_level0_cache_is_close_to_prefill(setup: Setup, tmp_path: Path) -> None:
    transport = ServiceTransport(setup.service)
    loaded = load(setup, transport, tmp_path, mode=Mode.fixed_level(0))
    kv = cache_to_tensor(loaded.cache)
    ref = reference_kv(setup)
    assert kv.shape == ref.shape
    assert loaded.token_ids == [t for c in setup.manifest.chunks for t in c.token_ids]
    # level 0 is lossy but close: far closer than the spread of the values
    assert (kv - ref).pow(2).mean() < 0.05 * ref.pow(2).mean()
    assert [r.level for r in loaded.chunks] == [0] * len(setup.manifest.chunks)
    assert transport.chunk_calls() == list(range(len(setup.manifest.chunks)))
    # coarser levels are further from the prefill
    coarse = cache_to_tensor(load(setup, transport, tmp_path, mode=Mode.fixed_level(4)).cache)
    assert (coarse - ref).pow(2).mean() > (kv - ref).pow(2).mean()


def test_text_mode_recomputes_exactly_and_downloads_nothing(setup: Setup, tmp_path: Path) -> None:
    transport = ServiceTransport(setup.service)
    loaded = load(setup, transport, tmp_path, mode=Mode.text())
    torch.testing.assert_close(cache_to_tensor(loaded.cache), reference_kv(setup), atol=1e-4, rtol=1e-4)
    assert transport.chunk_calls() == []
    assert all(r.kind == "text" for r in loaded.chunks) and loaded.timings.recompute_s > 0


def test_load_and_generate_pass_the_cache_without_deprecation_warnings(setup: Setup, tmp_path: Path) -> None:
    """transformers renamed ``past_key_values`` to ``cache`` (the old name warns where it has the new
    one): prefill, text recompute and generation use whichever name the installed version takes, and
    the answer from a text-mode load equals the full prefill's."""
    import warnings

    from transformers.utils import logging as hf_logging

    from kvwire.client.sdk import generate_answer

    class Ids:  # the test tokenizer cannot decode; the answers are compared as token ids
        eos_token_id = None

        def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
            return ""

    hf_logging.warning_once.cache_clear()  # transformers logs each such warning once per process
    logged: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: logged.append(record.getMessage())  # type: ignore[method-assign]
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            prefill_kv(setup.model, setup.manifest.chunks[0].token_ids)
            loaded = load(setup, ServiceTransport(setup.service), tmp_path, mode=Mode.text())
            answer = loaded.generate(setup.model, Ids(), [5, 6, 7], max_new_tokens=4)
            ids = [*loaded.token_ids, 5, 6, 7]
            reference = generate_answer(setup.model, Ids(), ids, None, max_new_tokens=4)
    finally:
        hf_logger.removeHandler(handler)
    messages = [str(w.message) for w in caught] + logged
    assert [m for m in messages if "deprecated" in m] == []
    assert answer.token_ids == reference.token_ids


def test_text_chunks_are_recomputed_on_top_of_decoded_ones(setup: Setup, tmp_path: Path) -> None:
    """Text after KV: each text chunk's KV is the model's continuation of the cache before it."""
    script: list[int | None] = [0, None, 0, None, None, 0]
    transport = ServiceTransport(setup.service, stream=push_stream(setup.service, script=script))
    transport.name = "grpc"
    loaded = load(setup, transport, tmp_path, mode=Mode.fixed_level(0), push=True)
    assert [r.level if r.kind == "kv" else None for r in loaded.chunks] == script
    kv, ref = cache_to_tensor(loaded.cache), reference_kv(setup)
    assert kv.shape == ref.shape
    # the exact continuation of the (lossy, level 0) cache before it: what running the model gives
    before = cache_to_tensor(loaded.cache)[:, :, :, : 2 * CHUNK_TOKENS]
    prefix_cache = tensor_to_cache(before[:, :, :, :CHUNK_TOKENS].clone(), setup.model.config)
    ids = torch.tensor([setup.manifest.chunks[1].token_ids])
    with torch.no_grad():
        setup.model(ids, **cache_kwargs(setup.model, prefix_cache), use_cache=True)
    torch.testing.assert_close(cache_to_tensor(prefix_cache), before, atol=1e-5, rtol=1e-5)
    # and close to the prefill's KV for those tokens
    assert (kv - ref).pow(2).mean() < 0.05 * ref.pow(2).mean()


def test_adaptive_pull_mode_plans_with_the_controller(setup: Setup, tmp_path: Path) -> None:
    transport = ServiceTransport(setup.service)
    costs = CostModel(recompute_s_per_token=1e-3, decode_s_per_chunk=0.01)
    loaded = load(setup, transport, tmp_path, mode=Mode.adaptive(slo_s=5.0), costs=costs)
    assert all(r.reason.startswith(("robust", "lookahead")) for r in loaded.chunks)  # robust builds on it
    assert all(r.predicted_completion_s is not None for r in loaded.chunks)
    assert loaded.slo_met is True and cache_to_tensor(loaded.cache).shape[3] == setup.manifest.total_tokens


def test_decisions_are_logged_and_returned(
    setup: Setup, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="kvwire.controller"):
        loaded = load(setup, ServiceTransport(setup.service), tmp_path, mode=Mode.fixed_level(2))
    assert [r.reason for r in loaded.chunks] == ["fixed level"] * len(setup.manifest.chunks)
    logged = [m for m in caplog.messages if m.startswith("chunk ")]
    assert len(logged) == len(setup.manifest.chunks) and "L2" in logged[0]
    assert all(r.source == "pull" and r.nbytes > 0 for r in loaded.chunks)


def test_progress_and_bounded_prefetch(setup: Setup, tmp_path: Path) -> None:
    """The fetcher never runs more than ``prefetch`` chunks ahead of the consumer."""
    transport = ServiceTransport(setup.service)
    seen: list[tuple[int, int, int]] = []

    def progress(done: int, total: int) -> None:
        seen.append((done, total, len(transport.chunk_calls())))

    load(setup, transport, tmp_path, mode=Mode.fixed_level(1), prefetch=1, progress=progress)
    n = len(setup.manifest.chunks)
    assert [(d, t) for d, t, _ in seen] == [(i, n) for i in range(1, n + 1)]
    # when chunk i is done, at most: i fetched and consumed + 1 queued + 1 in the fetcher's hands
    assert all(fetched <= done + 2 for done, _, fetched in seen)


def test_tensor_api(setup: Setup, tmp_path: Path) -> None:
    client = make_client(ServiceTransport(setup.service), tmp_path)
    loaded = client.load_tensors("ctx", level=0, model_fingerprint=setup.manifest.model_fingerprint)
    assert [c.token_start for c in loaded.chunks] == [c.token_start for c in setup.manifest.chunks]
    assert loaded.kv().shape == reference_kv(setup).shape
    assert loaded.chunks[0].kv.shape[3] == CHUNK_TOKENS and loaded.chunks[0].level == 0
    with pytest.raises(InvalidInputError, match="KV only"):
        TensorCollector().add_text(setup.manifest.chunks[0], [1])


# --------------------------------------------------------------------------------- retries, resume


def test_transient_failures_are_retried_and_the_load_resumes(setup: Setup, tmp_path: Path) -> None:
    failures = {"left": 2}

    def fault(method: str, args: tuple[Any, ...]) -> None:
        if method == "get_chunk" and args[1] == 3 and failures["left"]:
            failures["left"] -= 1
            raise ServerUnavailableError("connection reset")

    transport = ServiceTransport(setup.service, fault=fault)
    loaded = load(setup, transport, tmp_path, mode=Mode.fixed_level(2))
    n = len(setup.manifest.chunks)
    # chunks before the failure were not fetched again: the load went on from chunk 3
    assert transport.chunk_calls() == [0, 1, 2, 3, 3, 3, *range(4, n)]
    assert loaded.chunks[3].retries == 2 and loaded.timings.retries == 2
    assert cache_to_tensor(loaded.cache).shape[3] == setup.manifest.total_tokens


def test_a_dead_server_fails_clearly_after_the_retry_budget(setup: Setup, tmp_path: Path) -> None:
    def fault(method: str, args: tuple[Any, ...]) -> None:
        if method == "get_chunk" and args[1] >= 2:
            raise ServerUnavailableError("connection refused")

    transport = ServiceTransport(setup.service, fault=fault)
    retry = RetryPolicy(max_attempts=3, initial_backoff_s=0.001, max_backoff_s=0.001, total_timeout_s=5)
    with pytest.raises(ServerUnavailableError, match=r"chunk 2 .*gave up after 3 attempt"):
        load(setup, transport, tmp_path, mode=Mode.fixed_level(2), retry=retry)
    assert transport.chunk_calls().count(2) == 3 and 3 not in transport.chunk_calls()


@pytest.mark.parametrize(
    ("error", "calls"),
    [(NotFoundError("no context 'ctx'"), 1), (AuthError("invalid API key"), 1)],
)
def test_permanent_errors_are_not_retried(setup: Setup, tmp_path: Path, error: Exception, calls: int) -> None:
    def fault(method: str, args: tuple[Any, ...]) -> None:
        if method == "get_chunk" and args[1] == 1:
            raise error

    transport = ServiceTransport(setup.service, fault=fault)
    with pytest.raises(type(error)):
        load(setup, transport, tmp_path, mode=Mode.fixed_level(2))
    assert transport.chunk_calls().count(1) == calls


def test_a_deleted_context_is_not_found(setup: Setup, tmp_path: Path) -> None:
    transport = ServiceTransport(setup.service)
    with pytest.raises(NotFoundError, match="no context 'gone'"):
        make_client(transport, tmp_path).load(setup.model, "gone", tokenizer=setup.tokenizer)


def test_push_stream_resumes_in_pull_mode_after_a_break(setup: Setup, tmp_path: Path) -> None:
    transport = ServiceTransport(setup.service, stream=push_stream(setup.service, fail_after=2))
    transport.name = "grpc"
    loaded = load(setup, transport, tmp_path, mode=Mode.fixed_level(1), push=True)
    assert [r.source for r in loaded.chunks] == ["push"] * 2 + ["pull"] * (len(setup.manifest.chunks) - 2)
    assert transport.chunk_calls() == list(range(2, len(setup.manifest.chunks)))
    assert cache_to_tensor(loaded.cache).shape[3] == setup.manifest.total_tokens


def test_push_needs_grpc(setup: Setup, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="gRPC"):
        load(setup, ServiceTransport(setup.service), tmp_path, push=True)


# ----------------------------------------------------------------------------------- verification


def test_another_models_context_is_refused(setup: Setup, tmp_path: Path) -> None:
    from ..server.conftest import tiny_llama

    transport = ServiceTransport(setup.service)
    other = tiny_llama(seed=1)
    with pytest.raises(ModelMismatchError, match="load it with the model"):
        make_client(transport, tmp_path).load(other, "ctx", tokenizer=setup.tokenizer)
    assert transport.chunk_calls() == []


def test_a_context_over_the_clients_token_bound_is_refused_before_any_chunk(
    setup: Setup, tmp_path: Path
) -> None:
    transport = ServiceTransport(setup.service)
    total = setup.manifest.total_tokens
    client = Client(
        "unused",
        transport=transport,  # type: ignore[arg-type]
        retry=FAST_RETRY,
        profile_dir=tmp_path / "profiles",
        max_context_tokens=total - 1,
    )
    with pytest.raises(LimitExceededError, match=f"has {total} tokens.*max_context_tokens={total - 1}"):
        client.load(setup.model, "ctx", tokenizer=setup.tokenizer)
    with pytest.raises(LimitExceededError):
        client.load_tensors("ctx")
    assert transport.chunk_calls() == []
    client.max_context_tokens = total  # exactly at the bound: loads
    assert client.load_tensors("ctx").manifest.total_tokens == total


def test_max_context_tokens_must_be_positive() -> None:
    with pytest.raises(InvalidInputError, match="max_context_tokens"):
        Client("http://127.0.0.1:1", max_context_tokens=0)


def test_a_corrupted_chunk_is_refused(setup: Setup, tmp_path: Path) -> None:
    def flip(index: int, data: bytes) -> bytes:
        return data[:-1] + bytes([data[-1] ^ 1]) if index == 2 else data

    transport = ServiceTransport(setup.service, mangle=flip)
    with pytest.raises(CorruptChunkError, match="chunk 2 level 2: checksum"):
        load(setup, transport, tmp_path, mode=Mode.fixed_level(2))


def test_a_chunk_of_another_context_is_refused_even_with_a_matching_checksum(setup: Setup) -> None:
    """The decoder's own header checks catch what a wrong manifest entry would let through."""
    from kvwire.client.loader import verify_chunk

    manifest = setup.manifest
    data = setup.service.chunk("default", "ctx", 1, 2)[0]
    with pytest.raises(CorruptChunkError, match="asked for chunk 0 at level 2, got level 3"):
        verify_chunk(manifest, 0, 2, data, 3)
    with pytest.raises(CorruptChunkError, match="does not match"):
        verify_chunk(manifest, 0, 2, data, 2)
    assert f"{zlib.crc32(data):08x}" == manifest.chunks[1].level(2).checksum


def _count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count calls of the codec's decoder from here on (the loader calls it through the module)."""
    from kvwire.kernels import codec

    calls: list[int] = []
    decode = codec.decode_chunk

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return decode(*args, **kwargs)

    monkeypatch.setattr(codec, "decode_chunk", counting)
    return calls


@pytest.mark.parametrize("shift", [-1, 1])
def test_a_manifest_that_lies_about_a_chunks_token_count_is_refused_before_decoding(
    setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shift: int
) -> None:
    """The manifest moves the boundary between chunks 0 and 1 by one token: it still tiles the
    context and every checksum is right, but chunk 0's bitstream holds 16 tokens, not 15 or 17."""

    def lie(manifest: ContextManifest) -> ContextManifest:
        first, second = manifest.chunks[0], manifest.chunks[1]
        ids = first.token_ids + second.token_ids
        cut = first.token_end + shift
        chunks = [
            dataclasses.replace(first, token_end=cut, token_ids=ids[:cut]),
            dataclasses.replace(second, token_start=cut, token_ids=ids[cut:]),
            *manifest.chunks[2:],
        ]
        return dataclasses.replace(manifest, chunks=chunks)

    decodes = _count_decodes(monkeypatch)
    transport = ServiceTransport(setup.service, edit_manifest=lie)
    with pytest.raises(CorruptChunkError, match="chunk 0 holds 16 tokens, not its manifest's"):
        load(setup, transport, tmp_path, mode=Mode.fixed_level(2))
    assert decodes == []
    assert transport.chunk_calls()[:1] == [0]  # it was fetched and verified, then refused


def test_a_chunk_from_another_position_is_refused_before_decoding(
    setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that serves chunk 1's bytes as chunk 0, with a manifest whose chunk 0 entry carries
    chunk 1's checksums: same token count, but the header says it starts at token 16."""

    def lie(manifest: ContextManifest) -> ContextManifest:
        first = dataclasses.replace(manifest.chunks[0], levels=manifest.chunks[1].levels)
        return dataclasses.replace(manifest, chunks=[first, *manifest.chunks[1:]])

    def swap(index: int, data: bytes) -> bytes:
        return setup.service.chunk("default", "ctx", 1, 2)[0] if index == 0 else data

    decodes = _count_decodes(monkeypatch)
    transport = ServiceTransport(setup.service, edit_manifest=lie, mangle=swap)
    with pytest.raises(CorruptChunkError, match=f"chunk 0 starts at token {CHUNK_TOKENS}"):
        load(setup, transport, tmp_path, mode=Mode.fixed_level(2))
    assert decodes == []


def test_profile_is_fetched_once_verified_and_cached(setup: Setup, tmp_path: Path) -> None:
    transport = ServiceTransport(setup.service)
    load(setup, transport, tmp_path)
    load(setup, transport, tmp_path)
    assert [m for m, _ in transport.calls].count("get_profile") == 1
    assert (tmp_path / "profiles" / f"{setup.profile.digest}.kvprofile").is_file()


def test_a_profile_that_does_not_hash_to_its_digest_is_refused(setup: Setup, tmp_path: Path) -> None:
    from .conftest import tiny_profile

    other = tiny_profile(setup.model, setup.tokenizer)
    import dataclasses

    from kvwire.kernels.profile import with_digest

    other = with_digest(dataclasses.replace(other, notes="tampered"))
    transport = ServiceTransport(setup.service, profile_bytes=other.to_bytes())
    with pytest.raises(ProfileMismatchError, match="hashes to"):
        load(setup, transport, tmp_path / "fresh")
    with pytest.raises(ProfileMismatchError, match="malformed"):
        parse_profile(b"not a profile", setup.profile.digest)


# ------------------------------------------------------------------------------------------ ingest


def test_ingest_waits_for_the_job_with_progress(setup: Setup, tmp_path: Path) -> None:
    job = Job(id="job-1", tenant="default", context_id="ctx", chunks_total=6)
    transport = ServiceTransport(
        setup.service,
        jobs=[job, Job(**{**job.to_dict(), "state": "running", "chunks_done": 3}),
              Job(**{**job.to_dict(), "state": "done", "chunks_done": 6})],
    )  # fmt: skip
    seen: list[tuple[int, int]] = []
    manifest = make_client(transport, tmp_path).ingest(
        "text", progress=lambda d, t: seen.append((d, t)), poll_s=0
    )
    assert manifest.context_id == "ctx" and seen == [(3, 6), (6, 6)]


def test_a_failed_ingest_job_raises_its_error_type(setup: Setup, tmp_path: Path) -> None:
    from kvwire.errors import LimitExceededError

    job = Job(id="job-1", tenant="default", context_id="ctx")
    failed = Job(
        **{**job.to_dict(), "state": "failed", "error": {"type": "LimitExceededError", "message": "big"}}
    )
    transport = ServiceTransport(setup.service, jobs=[job, failed])
    with pytest.raises(LimitExceededError, match="big"):
        make_client(transport, tmp_path).ingest("text", poll_s=0)


def test_ingest_picks_the_context_id_so_that_retries_replace(setup: Setup, tmp_path: Path) -> None:
    failures = {"left": 1}

    def fault(method: str, args: tuple[Any, ...]) -> None:
        if method == "create_context" and failures["left"]:
            failures["left"] -= 1
            raise ServerUnavailableError("reset")

    transport = ServiceTransport(setup.service, fault=fault)
    manifest = make_client(transport, tmp_path).ingest("abc " * 10)
    ids = [args[0] for m, args in transport.calls if m == "create_context"]
    assert len(ids) == 2 and ids[0] == ids[1] == manifest.context_id


# ----------------------------------------------------------------------------------------- options


def test_parse_mode() -> None:
    assert parse_mode("text") == Mode.text()
    assert parse_mode("level:3") == Mode.fixed_level(3) == parse_mode("3")
    assert parse_mode("adaptive", 0.5) == Mode.adaptive(0.5)
    with pytest.raises(InvalidInputError, match="SLO"):
        parse_mode("adaptive")
    with pytest.raises(InvalidInputError, match="unknown mode"):
        parse_mode("fast")


def test_load_needs_a_way_to_identify_the_model(setup: Setup, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="tokenizer"):
        make_client(ServiceTransport(setup.service), tmp_path).load(setup.model, "ctx")


# ------------------------------------------------------------------------------------ measured costs


class CountingModel(torch.nn.Module):
    """A stand-in model that counts its forward passes (the recompute measurement runs two)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(16, 4)
        self.calls = 0

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.embed

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.embed(ids)


def test_recompute_cost_is_measured_once_per_model_across_clients(setup: Setup, tmp_path: Path) -> None:
    model, other = CountingModel(), CountingModel()
    first = make_client(ServiceTransport(setup.service), tmp_path).measure_costs(model, tokens=32)
    assert model.calls == 2  # a warm-up pass and the timed one
    second = make_client(ServiceTransport(setup.service), tmp_path).measure_costs(model, tokens=32)
    assert model.calls == 2 and second.recompute_s_per_token == first.recompute_s_per_token > 0
    make_client(ServiceTransport(setup.service), tmp_path).measure_costs(other, tokens=32)
    assert other.calls == 2 and model.calls == 2  # each model object has its own measurement


def test_given_costs_are_used_instead_of_measuring(
    setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kvwire.client.sdk

    def refuse(model: Any, tokens: int = 256) -> float:
        raise AssertionError("measured although costs were given")

    monkeypatch.setattr(kvwire.client.sdk, "recompute_s_per_token", refuse)
    costs = CostModel(recompute_s_per_token=1e-3, decode_s_per_chunk=0.01)
    transport = ServiceTransport(setup.service)
    loaded = load(setup, transport, tmp_path, mode=Mode.adaptive(slo_s=5.0), costs=costs)
    assert loaded.slo_met is True
