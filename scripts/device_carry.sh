#!/usr/bin/env bash
# Prepare what a lent GPU box lacks for kvwire's GPU tests and benchmarks (docs/gpu.md):
#   .whl/          wheels of the service's dependencies for the box's Python 3.12 (the box has torch,
#                  triton, transformers, grpcio, httpx, numba, psutil, but not fastapi, redis-py, ...)
#   .carry/redis/  a redis-server binary with the shared libraries the box may lack
# Both paths are git-ignored; name them in the device call's `carry` and start the command with
#   source scripts/device_env.sh
# Run from the repository root on a machine with pip and redis-server.
set -euo pipefail
cd "$(dirname "$0")/.."

plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
    manylinux2014_x86_64 manylinux1_x86_64; do
    plat+=(--platform "$p")
done
# One version of each; pure-Python ones are fetched as py3 wheels by the same call.
pkgs=(
    fastapi starlette pydantic pydantic-core pydantic-settings python-dotenv annotated-types
    typing-inspection uvicorn opentelemetry-api "redis>=5" "hiredis>=3" "isal>=1.6" "token-bucket<1"
    "grpcio>=1.85.1,<1.86" "protobuf>=7.35.1" "gguf>=0.10"
)
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d .whl "${pkgs[@]}"

rm -rf .carry/redis && mkdir -p .carry/redis
cp "$(command -v redis-server)" .carry/redis/
for lib in liblzf.so.1 libjemalloc.so.2; do
    cp -L "/lib/x86_64-linux-gnu/$lib" .carry/redis/
done
# The generated gRPC modules (setup.py's build step; the box has no grpcio-tools).
rm -rf .carry/proto && mkdir -p .carry/proto
cp kvwire/_proto/*_pb2*.py .carry/proto/
du -sh .whl .carry
