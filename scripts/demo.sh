#!/usr/bin/env bash
# The main job: set everything up, then prefill a real text with the bundled model, encode its KV cache
# at every level, decode it back and print size and quality per level (all on the CPU, local defaults).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/setup.sh"
. "$root/.venv/bin/activate"
export HF_HUB_OFFLINE=1
exec kvwire codec-demo "$@"
