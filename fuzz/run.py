"""Coverage-guided fuzzing of kvwire's untrusted-input parsers with atheris (libFuzzer for Python).

    python -m fuzz.run TARGET [--seconds N] [--seed N] [--work DIR] [-- libFuzzer flags...]
    python -m fuzz.run decode --repro CRASH_FILE      # replay one input (no fuzzing)

TARGET is one of ``decode``, ``gpu_header``, ``profile`` (see ``fuzz/targets.py``). The committed seeds
in ``fuzz/corpus/`` (``chunk/`` for both chunk targets, ``profile/``) are read but never written: new
inputs go to ``--work`` (default a folder under ``/tmp``), failing inputs to ``--work``/crash-* and
finding-*. Every input gets ``--timeout`` seconds (a slower one is a hang
finding) and the process an RSS limit (a larger allocation is a finding). The chunk targets use a
custom mutator (``targets.mutate_chunk``) that mostly rewrites the CRC after libFuzzer's byte mutation
or a header-field edit, so mutants get past the checksum into the parser, the rANS decoder and
reconstruction. Only kvwire's (and this package's) Python is instrumented: the numba decoder is not (its
safety rests on the checks in front of it, ``codec.validate_chunk``, which are), but it is compiled
with numba's bounds checking, so any out-of-bounds access it made would surface as an IndexError.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import sys
import tempfile
from pathlib import Path

# The numba decoder is compiled with bounds checks while fuzzing (an out-of-bounds index raises
# IndexError, a finding, instead of reading stray memory), cached apart from the normal build.
os.environ["NUMBA_BOUNDSCHECK"] = "1"
os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(tempfile.gettempdir(), "kvwire-numba-boundscheck"))

# Heavy native libraries are imported before instrumentation starts, so only kvwire code is instrumented.
import numpy  # noqa: F401
import safetensors.numpy  # noqa: F401
import torch

os.environ.setdefault("NUMBA_NUM_THREADS", "1")
torch.set_num_threads(1)
NOT_INSTRUMENTED = ["kvwire.kernels.rans", "kvwire.kernels.triton_rans"]


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description="Fuzz a kvwire parser with atheris.")
    parser.add_argument("target", choices=("decode", "gpu_header", "profile"))
    parser.add_argument("--seconds", type=int, default=60, help="total fuzzing time")
    parser.add_argument("--runs", type=int, default=-1, help="stop after this many inputs (-1: no limit)")
    parser.add_argument("--seed", type=int, default=1, help="libFuzzer -seed (fixed for reproducible runs)")
    parser.add_argument("--timeout", type=int, default=10, help="seconds per input (hang)")
    parser.add_argument("--rss-limit-mb", type=int, default=3072, help="memory limit; above it is a finding")
    parser.add_argument("--work", type=Path, default=None, help="folder for new corpus entries and crashes")
    parser.add_argument("--repro", type=Path, default=None, help="run one input file through the target")
    parser.add_argument("extra", nargs="*", help="more libFuzzer flags (after --)")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> None:
    args, unknown = _parse(sys.argv[1:] if argv is None else argv)
    import atheris

    # numba compiles rans.py from its bytecode and cannot compile atheris's probes: leave it out.
    with atheris.instrument_imports(include=["kvwire", "fuzz"], exclude=NOT_INSTRUMENTED):
        from fuzz import targets

    check = targets.CHECKS[args.target]
    work = args.work or Path(tempfile.mkdtemp(prefix=f"kvwire-fuzz-{args.target}-"))
    (work / "corpus").mkdir(parents=True, exist_ok=True)
    if args.repro is not None:
        check(args.repro.read_bytes())
        print(f"{args.repro}: handled (tensor, profile or typed error)")
        return
    for seed in sorted(targets.seed_dir(args.target).iterdir())[:3]:
        check(seed.read_bytes())  # compile numba and fill caches before the clock starts

    def test_one_input(data: bytes) -> None:
        try:
            check(data)
        except BaseException:  # keep the input even if libFuzzer's own crash dump does not run
            (work / f"finding-{hashlib.sha1(data).hexdigest()}").write_bytes(data)
            raise

    mutate = targets.mutate_profile if args.target == "profile" else targets.mutate_chunk

    def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        out = mutate(data, rng, byte_mutator=lambda d: atheris.Mutate(d, max_size))
        return out[:max_size]

    flags = [
        f"-max_total_time={args.seconds}",
        f"-runs={args.runs}",
        f"-seed={args.seed}",
        f"-timeout={args.timeout}",
        f"-rss_limit_mb={args.rss_limit_mb}",
        "-max_len=65536",
        f"-artifact_prefix={work}/",
        "-print_final_stats=1",
    ]
    if args.target == "profile":
        flags.append(f"-dict={targets.FUZZ_DIR / 'profile.dict'}")
    libfuzzer_argv = [sys.argv[0], *flags, *unknown, *args.extra, str(work / "corpus")]
    libfuzzer_argv.append(str(targets.seed_dir(args.target)))
    print(f"fuzzing {args.target}: work folder {work}", flush=True)
    atheris.Setup(libfuzzer_argv, test_one_input, custom_mutator=custom_mutator)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
