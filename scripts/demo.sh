#!/usr/bin/env bash
# The main job: set everything up, then run the end-to-end demo (all on the CPU, local defaults): start
# the service in-process, ingest ~2K tokens of a real text with the bundled SmolLM2, load the context back
# through the client under an emulated 1 Gbit/s link, answer a question, and print time-to-first-token
# for a full prefill, text recompute and kvwire (fixed levels and adaptive). Options: kvwire demo --help.
# The codec alone (size and quality per level): kvwire codec-demo.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/setup.sh"
. "$root/.venv/bin/activate"
export HF_HUB_OFFLINE=1
exec kvwire demo "$@"
