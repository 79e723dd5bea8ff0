"""Build the fuzzers' fixed profiles and seed corpus: ``python -m fuzz.make_corpus``.

Writes ``fuzz/profiles/*.safetensors`` (two tiny synthetic calibration profiles: a grouped one with RoPE
and one with a head per group and no RoPE) and the seeds in ``fuzz/corpus/``: for ``chunk/`` (read by
the decode and gpu_header targets) small valid chunks at
every level, dtype and several lane counts, token counts and starts (attention-sink and outlier raw
rows, dead components), plus truncations, bit flips and CRC-fixed header edits of some of them; for
the profile target the profiles themselves plus damaged copies. The outputs are committed; rerun only
when the format changes (``--force`` overwrites the profiles, whose fit depends on the BLAS).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import random
from pathlib import Path

import numpy as np
import torch

from fuzz.targets import CORPUS_DIR, HEADER_FIELDS, PROFILE_DIR, fix_crc, profiles, set_header_field
from kvwire.kernels import codec
from kvwire.kernels import format as fmt
from kvwire.kernels.profile import CalibrationProfile, fit_profile


def synthetic_kv(layers: int, heads: int, tokens: int, head_dim: int, seed: int) -> np.ndarray:
    """KV with per-channel offsets and scales, correlated channels and a large first token."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(layers, 2, heads, head_dim, head_dim)) / np.sqrt(head_dim)
    scale = np.exp(rng.normal(size=(layers, 2, heads, 1, head_dim)))
    offset = rng.normal(size=(layers, 2, heads, 1, head_dim)) * 2
    z = rng.laplace(size=(layers, 2, heads, tokens, head_dim))
    kv = np.einsum("lkhtd,lkhde->lkhte", z, mix) * scale + offset
    kv[:, :, :, :1] *= 8
    return kv.astype(np.float32)


def build_profiles() -> list[CalibrationProfile]:
    """Two tiny profiles: [2 layers, 2 heads, D 8, grouped, RoPE] and [1 layer, 4 heads, D 4, hpg 1]."""
    a = fit_profile(
        [synthetic_kv(2, 2, 256, 8, seed=1)[:, :, :, 4:]],
        model_fingerprint="ab" * 32,
        inv_freq=(1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8)).astype(np.float32),
        layer_weight=np.full((2, 2), 0.05),
        notes="fuzz profile A",
    )
    b = fit_profile(
        [synthetic_kv(1, 4, 128, 4, seed=2)],
        model_fingerprint="",
        inv_freq=None,
        heads_per_group=1,
        layer_weight=np.full((1, 2), 0.2),
        sink_tokens=1,
        notes="fuzz profile B",
    )
    return [a, b]


def valid_chunks(prof: CalibrationProfile, seed: int) -> list[bytes]:
    """Small valid chunks of ``prof`` covering levels, dtypes, lanes, starts, raw rows and dead components."""
    L, H, D = prof.layers, prof.kv_heads, prof.head_dim
    out = []
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    for i, level in enumerate(codec.LEVELS):
        for tokens, start, lanes in ((1, 0, 1), (5, 2, 4), (19, 300, 32)):
            x = torch.from_numpy(synthetic_kv(L, H, tokens, D, seed=seed + 10 * i + tokens))
            if tokens == 19:
                x[L - 1, 0, H - 1, 7] = 6e4  # an outlier row, stored raw
            x = x.to(dtypes[(i + tokens) % 3])
            out.append(
                codec.encode_chunk(
                    x,
                    prof,
                    level=level,
                    token_start=start,
                    lanes=lanes,
                    model_fingerprint=prof.model_fingerprint,
                ).data
            )
    flat = torch.zeros(L, 2, H, 6, D) + 0.5  # constant: every component dead, no rANS words
    out.append(codec.encode_chunk(flat, prof, level=2, token_start=1000).data)
    return out


def huge_dead_chunk(prof: CalibrationProfile) -> bytes:
    """The all-dead-components chunk declaring the most tokens the format allows (65,536), CRC fixed:
    a few hundred bytes that decode to millions of values, where the decode-size limit bites
    (``codec.default_max_chunk_tokens``; docs/reliability.md, "Fuzzing")."""
    x = torch.from_numpy(synthetic_kv(prof.layers, prof.kv_heads, 6, prof.head_dim, seed=2))
    h, sec = fmt.parse_chunk(codec.encode_chunk(x, prof, token_start=1000).data)
    zeros = np.zeros((h.segments, h.group_dim, h.n_tokens), dtype=np.int32)
    dead = dataclasses.replace(sec, classes=np.zeros_like(sec.classes))  # every component at its mean
    means = torch.from_numpy(codec.reconstruct(h, dead, zeros, prof))  # so the encoder codes nothing
    data = codec.encode_chunk(means, prof, level=2, token_start=1000).data
    assert fmt.read_header(data).n_words == 0
    return set_header_field(data, 28, "<I", fmt.MAX_TOKENS)


def damaged(chunk: bytes, rng: random.Random) -> list[bytes]:
    """Truncations, extensions, raw and CRC-fixed bit flips and header edits of a valid chunk."""
    out = [chunk[: rng.randrange(len(chunk))], chunk + b"\0" * rng.randrange(1, 9)]
    for _ in range(2):
        buf = bytearray(chunk)
        buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        out += [bytes(buf), fix_crc(buf)]
    for off, f in rng.sample(HEADER_FIELDS, 3):
        out.append(set_header_field(chunk, off, f, rng.getrandbits(8)))
    return out


def write_corpus(folder: Path, items: list[bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for item in items:
        (folder / hashlib.sha1(item).hexdigest()).write_bytes(item)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="refit and overwrite the fixed profiles")
    args = parser.parse_args(argv)
    if args.force or not list(PROFILE_DIR.glob("*.safetensors")):
        PROFILE_DIR.mkdir(parents=True, exist_ok=True)
        for name, prof in zip("ab", build_profiles(), strict=True):
            (PROFILE_DIR / f"{name}.safetensors").write_bytes(prof.to_bytes())
        profiles.cache_clear()
    rng = random.Random(0)
    chunks: list[bytes] = []
    for i, prof in enumerate(profiles()):
        chunks += valid_chunks(prof, seed=100 * i)
    seeds = chunks + [d for c in chunks[::4] for d in damaged(c, rng)]
    seeds += [huge_dead_chunk(prof) for prof in profiles()]
    write_corpus(CORPUS_DIR / "chunk", seeds)
    prof_seeds = [p.read_bytes() for p in sorted(PROFILE_DIR.glob("*.safetensors"))]
    for data in list(prof_seeds):
        buf = bytearray(data)
        buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        prof_seeds += [data[: rng.randrange(len(data))], bytes(buf)]
    write_corpus(CORPUS_DIR / "profile", prof_seeds)
    print(f"{len(seeds)} chunk seeds, {len(prof_seeds)} profile seeds in {CORPUS_DIR}")


if __name__ == "__main__":
    main()
