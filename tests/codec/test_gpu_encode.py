"""GPU encoder (kvwire.kernels.gpu_encode): the CPU encoder's bytes, typed errors before any launch.

Kernels run under ``TRITON_INTERPRET=1`` on CPU tensors (small shapes: the interpreter executes every
step in numpy); ``KVWIRE_TEST_DEVICE=cuda`` runs the same tests compiled on a GPU.

Byte identity needs the same integer coefficients on both paths. The two float32 transforms sum in
different orders, so a coefficient sitting on a rounding boundary may round either way; the tests
therefore encode KV that is itself a decoded chunk, whose coefficients are near integers (far from any
boundary), and separately check raw inputs for faithful, CPU-decodable streams.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from kvwire.errors import InvalidInputError
from kvwire.kernels import codec, gpu_encode, rans
from kvwire.kernels import format as fmt
from kvwire.kernels.profile import CalibrationProfile, with_digest
from kvwire.kernels.tables import choose_tables, table_bank

from .conftest import make_profile, synthetic_kv, triton_test_device

DEV = triton_test_device()

pytestmark = pytest.mark.triton


def _kv(tokens: int, seed: int, dtype: torch.dtype, outlier: bool = False) -> torch.Tensor:
    x = torch.from_numpy(synthetic_kv(2, 2, tokens, 8, seed=seed))
    if outlier:  # a row whose coefficients overflow the coder: stored raw
        x[1, 0, 1, tokens // 2] = 6e4
    return x.to(dtype)


def _settled(x: torch.Tensor, profile: CalibrationProfile, **opts: object) -> torch.Tensor:
    """KV whose coefficients are near integers: ``x`` encoded and decoded on the CPU path."""
    return codec.decode_chunk(codec.encode_chunk(x, profile, backend="cpu", **opts).data, profile)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def profile_hpg1() -> CalibrationProfile:
    return make_profile(heads_per_group=1)  # d = 8: padded to the kernels' 16-wide tiles


@pytest.mark.parametrize(
    ("tokens", "start", "level", "dtype", "lanes", "outlier", "base_step"),
    [
        (1, 0, 2, torch.float32, 32, False, None),  # a single sink token: everything raw
        (6, 2, 4, torch.float16, 3, True, None),  # sinks and an overflow row; 3 lanes over 16 components
        (7, 300, 1, torch.bfloat16, 1, False, None),  # one lane: one sequential coder per segment
        (5, 9, 0, torch.float32, 16, False, 0.01),  # coefficients > 1000: octave symbols and raw bits
        (9, 5000, 3, torch.bfloat16, 32, True, None),
    ],
)
def test_gpu_encoder_writes_the_cpu_encoders_bytes(
    profile: CalibrationProfile,
    tokens: int,
    start: int,
    level: int,
    dtype: torch.dtype,
    lanes: int,
    outlier: bool,
    base_step: float | None,
) -> None:
    opts = {"level": level, "token_start": start, "lanes": lanes, "base_step": base_step}
    x = _settled(_kv(tokens, seed=tokens + level, dtype=dtype, outlier=outlier), profile, **opts)
    cpu = codec.encode_chunk(x, profile, backend="cpu", **opts).data  # type: ignore[arg-type]
    dev = codec.encode_chunk(x.to(DEV), profile, backend="gpu", **opts).data  # type: ignore[arg-type]
    assert dev == cpu
    h = fmt.read_header(dev)
    if base_step is None:
        assert (h.n_raw > 0) == (start < profile.sink_tokens or outlier)
    else:  # some rows overflow the coder at this step and are stored raw; the rest are large
        assert np.abs(codec.reconstruct_coefficients(*fmt.parse_chunk(dev))).max() > 1000


def test_other_layouts_give_the_cpu_encoders_bytes(
    profile: CalibrationProfile, profile_hpg1: CalibrationProfile
) -> None:
    """One head per group (d = 8, below the tile width) and rotary over part of each head."""
    part = with_digest(dataclasses.replace(profile, inv_freq=profile.inv_freq[:2], digest=""))
    for prof in (profile_hpg1, part):
        x = _settled(_kv(5, 3, torch.float16), prof, token_start=7)
        cpu = codec.encode_chunk(x, prof, token_start=7, backend="cpu").data
        assert gpu_encode.encode_chunks_gpu([x.to(DEV)], prof, token_starts=[7])[0].data == cpu


@pytest.mark.parametrize("sub_batch", [16, 2])
def test_batch_of_a_context_in_one_pass(
    profile: CalibrationProfile, monkeypatch: pytest.MonkeyPatch, sub_batch: int
) -> None:
    """``chunk_view`` of a context: no copy, one batch (or pipelined sub-batches), every chunk the CPU's
    bytes, valid CRCs."""
    monkeypatch.setitem(gpu_encode.TUNING, "sub_batch", sub_batch)
    full = torch.from_numpy(synthetic_kv(2, 2, 12, 8, seed=9)).half()
    parts = [_settled(full[:, :, :, i : i + 4], profile, token_start=i, level=3) for i in (0, 4, 8)]
    ctx = torch.cat(parts, dim=3).to(DEV)
    view = gpu_encode.chunk_view(ctx, 4)
    assert view.shape == (3, 2, 2, 2, 4, 8) and view.data_ptr() == ctx.data_ptr()
    batch = gpu_encode.encode_batch_gpu(
        view, profile, level=3, token_starts=[0, 4, 8], model_fingerprint="ab"
    )
    chunks = batch.chunks()
    assert len(batch) == 3 and [c.token_start for c in chunks] == [0, 4, 8]
    assert len(batch.parts) == (1 if sub_batch == 16 else 2)
    assert batch.nbytes == sum(len(c.data) for c in chunks)
    for i, c in enumerate(chunks):
        assert bytes(batch.view(i)) == c.data
        ref = codec.encode_chunk(
            parts[i], profile, level=3, token_start=4 * i, model_fingerprint="ab", backend="cpu"
        ).data
        assert c.data == ref
        fmt.parse_chunk(c.data)  # the checksum verifies
    assert fmt.read_header(chunks[0].data).n_raw == 2 * 2 * 4  # the sinks, all in chunk 0
    assert fmt.read_header(chunks[1].data).n_raw == 0
    with pytest.raises(InvalidInputError):
        gpu_encode.chunk_view(ctx, 13)


def test_tables_and_rans_kernels_match_the_cpu_coder(profile: CalibrationProfile) -> None:
    """Arbitrary coefficients (the whole alphabet, dead components, raw rows): the table kernel picks
    ``choose_tables``'s tables and the rANS kernel writes ``rans.encode_segments``'s words and states."""
    T, lanes = 7, 3
    job = gpu_encode.prepare_encode(_kv(T, 1, torch.float32)[None].to(DEV), profile, lanes=lanes)
    B, S, _, d = job.q.shape
    rng = np.random.default_rng(5)
    q = rng.laplace(scale=4.0, size=(B, S, T, d)).round().astype(np.int64)
    q[..., 0, :3] = [65535, -65535, 40000]  # largest magnitudes
    q[:, 3, :, 5] = 0  # a dead component
    q[:, 1] = 0  # a dead segment
    rows = np.zeros(tuple(job.rows.shape), dtype=np.int32)
    rows[0, 1, 0, 2] = 1  # a raw row: its coefficients are coded as zeros
    job.q.copy_(torch.from_numpy(q.astype(np.int32)))
    job.rows.copy_(torch.from_numpy(rows))
    job.n_raw = [1]
    gpu_encode.launch_tables(job)
    gpu_encode.launch_rans(job)
    raw = np.repeat(rows[0].reshape(-1, T), profile.groups, axis=0)  # [S, T]
    sym = np.where(raw[:, :, None] == 1, 0, q[0]).transpose(0, 2, 1).astype(np.int32).copy()  # [S, d, T]
    classes, _ = choose_tables(rans.symbol_histograms(sym))
    classes = classes.reshape(S, d)
    assert np.array_equal(job.classes.cpu().numpy(), classes)
    assert classes[1].max() == 0 and classes[3, 5] == 0
    bank = table_bank()
    words, offsets, states = rans.encode_segments(sym, classes, lanes, bank.freq, bank.cum)
    assert job.n_words is not None and job.states is not None and job.scratch is not None
    n = job.n_words.cpu().numpy()
    assert np.array_equal(np.diff(offsets), n)
    scratch = job.scratch.cpu().numpy().view(np.uint16)
    got = np.concatenate([scratch[s, scratch.shape[1] - n[s] :] for s in range(S)])
    assert np.array_equal(got, words)
    assert np.array_equal(job.states.cpu().numpy().view(np.uint32), states)


def test_table_counts_go_past_a_byte(profile: CalibrationProfile) -> None:
    """More than 255 tokens: the counting kernel's byte counters are widened mid-way; the counts equal
    ``symbol_histograms`` (a component of one symbol throughout: 300 counts), the tables
    ``choose_tables``'s."""
    T = 300
    job = gpu_encode.prepare_encode(_kv(T, 2, torch.float32)[None].to(DEV), profile)
    B, S, _, d = job.q.shape
    rng = np.random.default_rng(8)
    q = rng.laplace(scale=2.0, size=(B, S, T, d)).round().astype(np.int32)
    q[0, 0, :, 0] = 3
    q[0, 2, :, 1] = 0
    q[0, 2, -1, 1] = -40
    job.q.copy_(torch.from_numpy(q))
    hist = rans.symbol_histograms(q[0].transpose(0, 2, 1).copy())
    counts = gpu_encode.launch_counts(job).cpu().numpy()
    assert np.array_equal(counts[: rans.NUM_SYMBOLS].T, hist) and counts[rans.DIRECT_MAX + 3, 0] == T
    gpu_encode.launch_tables(job)
    classes, _ = choose_tables(hist)
    assert np.array_equal(job.classes.cpu().numpy(), classes.reshape(S, d))


def test_bad_input_raises_before_any_launch(
    profile: CalibrationProfile, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_launch(*args: object) -> None:
        raise AssertionError("kernel launched for invalid input")

    x = _kv(3, 2, torch.float16).to(DEV)
    monkeypatch.setattr(gpu_encode, "launch_transform", no_launch)
    bad_calls = [
        lambda: gpu_encode.encode_chunks_gpu([x, _kv(4, 1, torch.float16).to(DEV)], profile),  # shapes
        lambda: gpu_encode.encode_chunks_gpu([x, x.float()], profile),  # dtypes
        lambda: gpu_encode.encode_chunks_gpu([x.to(torch.int32)], profile),
        lambda: gpu_encode.encode_chunks_gpu([x[:, :, :1]], profile),  # heads
        lambda: gpu_encode.encode_chunks_gpu([x], profile, level=7),
        lambda: gpu_encode.encode_chunks_gpu([x], profile, lanes=0),
        lambda: gpu_encode.encode_chunks_gpu([x], profile, base_step=0.0),
        lambda: gpu_encode.encode_chunks_gpu([x, x], profile, token_starts=[0]),
        lambda: gpu_encode.encode_chunks_gpu([x], profile, token_starts=[-1]),
        lambda: gpu_encode.encode_batch_gpu(x, profile),  # a chunk, not a batch
        lambda: gpu_encode.encode_chunks_gpu([x.cpu().numpy()], profile),  # type: ignore[list-item]
    ]
    for call in bad_calls:
        with pytest.raises(InvalidInputError):
            call()
    assert gpu_encode.encode_chunks_gpu([], profile) == []


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf - inf
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_input_raises_before_the_coder(
    profile: CalibrationProfile, monkeypatch: pytest.MonkeyPatch, value: float
) -> None:
    def no_launch(*args: object) -> None:
        raise AssertionError("rANS launched for non-finite input")

    monkeypatch.setattr(gpu_encode, "launch_rans", no_launch)
    x = _kv(3, 4, torch.bfloat16).to(DEV)
    x[1, 1, 0, 2, 3] = value  # a value, not a key: RoPE removal does not touch it
    with pytest.raises(InvalidInputError, match="NaN or Inf"):
        codec.encode_chunk(x, profile, backend="gpu")
