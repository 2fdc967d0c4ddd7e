# syntax=docker/dockerfile:1
# flux2-lora-server for a CUDA GPU box: `docker build -t flux2-lora-server .`, then
# `docker run --gpus all -p 8000:8000 -e HF_TOKEN flux2-lora-server` (README: "Docker").
#
# Base image: plain Python on Debian slim, with torch installed from PyPI at the version scripts/setup
# pins. The PyPI torch 2.14.1 wheel is the CUDA 13.0 build and brings its own CUDA runtime, cuDNN, NCCL
# and Triton as wheels (cuda-toolkit==13.0.*, nvidia-cudnn-cu13, ...), so the image runs exactly the
# torch build the test suite runs, and the host needs only an NVIDIA driver that supports CUDA 13.0
# (R580 or newer) plus the NVIDIA Container Toolkit. A nvidia/cuda or pytorch/pytorch base would ship
# a second copy of those libraries (gigabytes) or a torch that differs from the pinned one.
# One stage: every dependency is a binary wheel, so a build stage would leave nothing behind; the layers
# are ordered so that editing the server's code rebuilds only the last small ones.
# tests/test_docker.py checks this file against the project (torch pin, CUDA version, port, paths).

ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-trixie

# torch / torchvision: the pins of scripts/setup. TORCH_CUDA: the CUDA version that torch wheel is built
# for (torch.version.cuda); the NVIDIA runtime refuses to start the container on a driver too old for it.
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_CUDA=13.0

LABEL org.opencontainers.image.title="flux2-lora-server" \
      org.opencontainers.image.description="FLUX.2 [dev] with LoRAs behind fal's API" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    NVIDIA_REQUIRE_CUDA="cuda>=${TORCH_CUDA}"

# A C compiler: Triton builds its CUDA launcher with it when FLUX2_COMPILE=true (torch.compile).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# torch first, in its own layer: the largest and the least often changed.
RUN python -m venv /opt/venv \
    && pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

# The project's dependencies, read from pyproject.toml alone, so code changes keep this layer cached; with
# the scale-out extras (Ray Serve, PostgreSQL), so one image runs `serve` and `serve --ray` alike.
COPY pyproject.toml /tmp/src/pyproject.toml
RUN python -c "import tomllib; p = tomllib.load(open('/tmp/src/pyproject.toml', 'rb'))['project']; extra = p['optional-dependencies']; print('\n'.join(p['dependencies'] + extra['ray'] + extra['postgres']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
    && rm /tmp/requirements.txt

# The project itself (a regular, not editable, install; the flux2-server console script comes with it).
COPY README.md /tmp/src/README.md
COPY server /tmp/src/server
COPY pipeline /tmp/src/pipeline
RUN pip install --no-deps /tmp/src && rm -rf /tmp/src

# A non-root user (flux, uid 1000) owning the folders the server writes: its data, its caches, the Hugging Face cache.
RUN useradd --create-home --uid 1000 --user-group flux \
    && mkdir -p /data /cache/flux2 /cache/huggingface \
    && chown -R flux:flux /data /cache

WORKDIR /app

# 0.0.0.0: reachable through `-p`; the port stays the server's default (8000, FLUX2_PORT to change it).
ENV FLUX2_HOST=0.0.0.0 \
    FLUX2_DATA_DIR=/data \
    FLUX2_CACHE_DIR=/cache/flux2 \
    HF_HOME=/cache/huggingface

VOLUME ["/data", "/cache/flux2", "/cache/huggingface"]

USER 1000:1000
EXPOSE 8000

# Liveness with what the image has: Python's urllib (no curl). Follows FLUX2_PORT and FLUX2_TLS.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, ssl, urllib.request; tls = os.environ.get('FLUX2_TLS', '').strip().lower() in ('1', 'true', 'yes', 'on'); url = ('https' if tls else 'http') + '://127.0.0.1:' + os.environ.get('FLUX2_PORT', '8000') + '/health'; urllib.request.urlopen(url, timeout=5, context=ssl._create_unverified_context() if tls else None)"]

ENTRYPOINT ["flux2-server"]
CMD ["serve"]
