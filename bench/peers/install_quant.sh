#!/usr/bin/env bash
# onnx and onnxruntime's quantization tools, in their own virtual environment (bench/.venv-quant), for
# bench.encoder_variants: the router never needs them. onnxruntime is pinned to the router's own version
# (ONNXRUNTIME_VERSION, which bench.encoder_variants passes), so the derived graphs use kernels the router's
# runtime has. Idempotent: a stamp marks a finished install.
set -euo pipefail
VERSION="${QUANT_ONNX_VERSION:-1.23.2}"
ORT="${ONNXRUNTIME_VERSION:?set ONNXRUNTIME_VERSION to the router venv onnxruntime version}"
BENCH="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${QUANT_VENV:-$BENCH/.venv-quant}"
STAMP="$VENV/.installed-quant-$VERSION-ort$ORT"
[ -f "$STAMP" ] && exit 0
test -x "$VENV/bin/python" || "${PYTHON:-python3}" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet "onnx==$VERSION" onnx_ir "onnxruntime==$ORT" numpy
touch "$STAMP"
