"""Mutated chunks behind a valid CRC give the same verdict on the GPU path (Triton kernels, run by the
interpreter on CPU tensors) as on the CPU path: the same error type, or bit-identical tensors."""

from __future__ import annotations

import random
from functools import cache

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fuzz import targets
from fuzz.make_corpus import valid_chunks
from kvwire.errors import KvwireError
from kvwire.kernels import codec
from kvwire.kernels import format as fmt

triton = pytest.importorskip("triton")
if not triton.knobs.runtime.interpret:
    pytest.skip("TRITON_INTERPRET=1 must be set before triton is imported", allow_module_level=True)

pytestmark = pytest.mark.triton


@cache
def small_chunks() -> tuple[bytes, ...]:
    """The valid chunks of at most 6 tokens (the interpreter runs every kernel step in numpy)."""
    every = [c for i, p in enumerate(targets.profiles()) for c in valid_chunks(p, seed=3 + i)]
    return tuple(c for c in every if fmt.read_header(c).n_tokens <= 6)


def _verdict(data: bytes, backend: str) -> torch.Tensor | type:
    try:
        return codec.decode_chunk(data, targets.profile_for(data), backend=backend, device="cpu")
    except KvwireError as exc:
        return type(exc)


@settings(max_examples=20, deadline=None)
@given(i=st.integers(0, 63), seed=st.integers(0, 1 << 32))
def test_gpu_path_agrees_with_cpu_on_mutated_chunks(i: int, seed: int) -> None:
    chunks = small_chunks()
    data = targets.fix_crc(targets.mutate_chunk(chunks[i % len(chunks)], random.Random(seed)))
    try:
        declared = fmt.read_header(data).n_tokens
    except KvwireError:
        declared = 0
    # The interpreter runs every kernel step in numpy: a mutation that declares hundreds of tokens
    # (e.g. 517 in a 6-token chunk's header) costs it half a minute before the kernels report the
    # overrun, where compiled kernels take microseconds. Up to 64 tokens keeps a run bounded.
    assume(declared <= 64)
    cpu, dev = _verdict(data, "cpu"), _verdict(data, "gpu")
    if isinstance(cpu, torch.Tensor):
        assert isinstance(dev, torch.Tensor), f"GPU path raised {dev}, CPU path decoded"
        assert torch.equal(cpu.view(torch.uint8), dev.view(torch.uint8))
    else:
        assert dev is cpu
