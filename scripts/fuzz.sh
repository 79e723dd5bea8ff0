#!/usr/bin/env bash
# A short coverage-guided fuzz pass over each parser of untrusted bytes (fuzz/run.py; docs/reliability.md,
# "Fuzzing"): KVWIRE_FUZZ_SECONDS per target (default 15; 0 skips), fixed seed, committed seed corpus.
# A crash, hang or oversized allocation fails the run and leaves the input in the printed folder.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
. .venv/bin/activate
seconds=${KVWIRE_FUZZ_SECONDS:-15}
[ "$seconds" -gt 0 ] || exit 0
work=$(mktemp -d /tmp/kvwire-fuzz-ci.XXXXXX)
for target in decode gpu_header profile; do
    log="$work/$target.log"
    if ! python -m fuzz.run "$target" --seconds "$seconds" --seed 1 --work "$work/$target" >"$log" 2>&1; then
        tail -n 60 "$log"
        echo "fuzz $target: FAILED (input and log in $work/$target)" >&2
        exit 1
    fi
    # libFuzzer's closing stats: inputs tried and coverage reached
    runs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
    cov=$(grep -o 'cov: [0-9]* ft: [0-9]*' "$log" | tail -n 1 || true)
    echo "fuzz $target: ${seconds}s, $runs inputs, $cov, no finding"
done
rm -rf "$work"
