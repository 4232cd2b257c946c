#!/usr/bin/env bash
# The LiteLLM proxy, in its own virtual environment (bench/.venv-litellm), so its pins never touch .venv.
# Idempotent: a stamp naming the version marks a finished install; rerunning with it present does nothing.
set -euo pipefail
VERSION="${LITELLM_VERSION:-1.106.12}"  # never 1.107.0 (compromised); 1.108+ needs litellm-proxy, not on PyPI
BENCH="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${LITELLM_VENV:-$BENCH/.venv-litellm}"
STAMP="$VENV/.installed-litellm-$VERSION"
[ -f "$STAMP" ] && exit 0
test -x "$VENV/bin/python" || "${PYTHON:-python3}" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet "litellm[proxy]==$VERSION"
touch "$STAMP"
