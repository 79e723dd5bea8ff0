"""How deep a corpus reaches: ``python -m fuzz.report TARGET [DIR ...]``.

Replays every input of the given corpus folders (default: the committed seeds) through a target and
prints (1) the outcomes, grouped by error type and message with numbers blanked, so one can see how many
inputs got past the checksum into the section checks, the rANS decoder ("entropy-coded segment # is
corrupt") and all the way to a tensor, and with ``--mutants N`` the same for N one-step mutants of them;
(2) with ``--coverage``, line coverage of the codec modules the
target exercises, measured with coverage.py (the numba decoder is compiled and is not measured; its
verdicts show up in the outcomes instead).
"""

from __future__ import annotations

import argparse
import collections
import random
import re
from pathlib import Path

MODULES = ("kernels/format.py", "kernels/codec.py", "kernels/profile.py", "kernels/gpu.py")


def outcome(target: str, data: bytes) -> str:
    """The target's verdict on one input: "tensor"/"profile"/"ok" or the error type and blanked message."""
    from fuzz import targets
    from kvwire.errors import KvwireError
    from kvwire.kernels import codec
    from kvwire.kernels.profile import CalibrationProfile

    try:
        if target == "decode":
            codec.decode_chunk(data, targets.profile_for(data), backend="cpu")
            return "tensor"
        if target == "profile":
            CalibrationProfile.from_bytes(data)
            return "profile"
        targets.check_gpu_validation(data)
        return "handled"
    except KvwireError as exc:
        msg = re.sub(r"[0-9a-f]{8,}", "#", str(exc))
        msg = re.sub(r"\d+", "#", msg)[:90]
        return f"{type(exc).__name__}: {msg}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", choices=("decode", "gpu_header", "profile"))
    parser.add_argument("dirs", nargs="*", type=Path)
    parser.add_argument("--coverage", action="store_true", help="measure line coverage with coverage.py")
    parser.add_argument(
        "--mutants", type=int, default=0, help="also replay this many fuzzer mutations of the inputs (seed 0)"
    )
    args = parser.parse_args(argv)
    cov = None
    if args.coverage:
        import coverage

        cov = coverage.Coverage(data_file=None, include=[f"*/{m}" for m in MODULES])
        cov.start()
    from fuzz import targets

    dirs = args.dirs or [targets.seed_dir(args.target)]
    tally: collections.Counter[str] = collections.Counter()
    inputs = [p.read_bytes() for folder in dirs for p in sorted(folder.iterdir()) if p.is_file()]
    for data in inputs:
        tally[outcome(args.target, data)] += 1
    mutants: collections.Counter[str] = collections.Counter()
    rng = random.Random(0)
    mutate = targets.mutate_profile if args.target == "profile" else targets.mutate_chunk
    for _ in range(args.mutants):
        mutants[outcome(args.target, mutate(rng.choice(inputs), rng))] += 1
    if cov is not None:
        cov.stop()
    total = sum(tally.values())
    print(f"{total} inputs from {', '.join(map(str, dirs))}")
    for what, n in tally.most_common():
        print(f"{n:8d}  {what}")
    if mutants:
        print(f"\n{args.mutants} mutants (fuzz.targets mutators, one mutation each, seed 0)")
        for what, n in mutants.most_common():
            print(f"{n:8d}  {what}")
    if cov is not None:
        print()
        cov.report(show_missing=False)


if __name__ == "__main__":
    main()
