"""Hypothesis strategies shared by the controller tests: manifests, device costs, throughputs."""

from __future__ import annotations

from hypothesis import strategies as st

from kvwire.controller import ChunkOption, CostModel

LEVELS = (0, 1, 2)


@st.composite
def manifests(draw: st.DrawFn, max_chunks: int = 4) -> tuple[ChunkOption, ...]:
    """Chunks whose size shrinks with the level (as the codec's levels do), last chunk possibly short."""
    n = draw(st.integers(1, max_chunks))
    chunks = []
    for i in range(n):
        tokens = draw(st.sampled_from([256, 256, 256, 17, 100]))
        sizes = sorted(draw(st.lists(st.integers(1_000, 3_000_000), min_size=3, max_size=3)), reverse=True)
        chunks.append(ChunkOption(i, tokens, dict(zip(LEVELS, sizes, strict=True))))
    return tuple(chunks)


costs_st = st.builds(
    CostModel,
    recompute_s_per_token=st.sampled_from([1e-5, 1e-4, 5e-4, 2e-3]),
    decode_s_per_chunk=st.sampled_from([0.0, 0.002, 0.02]),
    request_overhead_s=st.sampled_from([0.0, 0.001]),
)
rate_st = st.floats(1e5, 1e9)
