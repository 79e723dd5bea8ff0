#!/usr/bin/env bash
# Validate the deployment files without a Docker engine: the compose files parse and resolve
# (docker-compose config), and the Dockerfile passes hadolint. Exits non-zero on any finding.
# Callable from .ci/run: `bash scripts/check_deploy.sh`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
[ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ] && . .venv/bin/activate

# The compose files require secrets from the environment (or .env); validate with placeholders, and
# without reading a developer's own .env.
export KVWIRE_API_KEYS="ci:placeholder-key" MINIO_ROOT_PASSWORD="placeholder-password"
empty_env=$(mktemp)
trap 'rm -f "$empty_env"' EXIT
for files in "docker-compose.yml" "docker-compose.yml docker-compose.gpu.yml"; do
    args=()
    for f in $files; do args+=(-f "$f"); done
    docker-compose --project-directory "$root" --env-file "$empty_env" "${args[@]}" config -q
    echo "docker-compose config: ok ($files)"
done

hadolint Dockerfile
echo "hadolint Dockerfile: ok"
