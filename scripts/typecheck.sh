#!/usr/bin/env bash
# mypy over the installed layout: kvwire/ plus kernels/, server/ and client/ as kvwire.kernels,
# kvwire.server and kvwire.client. mypy cannot follow setuptools' package-dir remapping, so we lay the
# same tree out with symlinks in a temporary folder and check the package there.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
mkdir "$tree/kvwire"
for f in "$root"/kvwire/*; do ln -s "$f" "$tree/kvwire/"; done
ln -s "$root/kernels" "$tree/kvwire/kernels"
ln -s "$root/server" "$tree/kvwire/server"
ln -s "$root/client" "$tree/kvwire/client"
ln -s "$root/fuzz" "$tree/fuzz"  # the fuzz harness reaches into the codec: check it too
ln -s "$root/benchmarks" "$tree/benchmarks"  # benchmarks drive every layer: a rename breaks them first
mypy=mypy
command -v mypy >/dev/null || mypy="$root/.venv/bin/mypy"  # scripts/setup.sh's venv, not activated
cd "$tree" && "$mypy" -p kvwire -p fuzz -p benchmarks --config-file "$root/pyproject.toml"
