#!/usr/bin/env bash
# Lint, type-check and run the whole test suite (unit and integration; the integration tests start
# their own redis-server, Redis Cluster and S3 server on free ports and load the bundled model).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
. .venv/bin/activate
export HF_HUB_OFFLINE=1
ruff check .
ruff format --check .
bash scripts/typecheck.sh
bash scripts/check_deploy.sh
bash scripts/fuzz.sh  # short fixed-seed atheris pass over the codec parsers
python -m pytest -q "$@"
