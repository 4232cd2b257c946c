"""Build-time check of the router image: both bundled encoders load offline and agree.

The Dockerfile runs this after the install, so a broken image fails its build, not its first request. It goes
through the router's own encoders, so the ONNX file is checked against the sha256 its package pins, and the
image runs with HF_HUB_OFFLINE=1, so any attempt to download turns into an error here.
"""

import numpy as np

from router.encoders import OnnxMiniLMEncoder, SentenceTransformerEncoder

TEXTS = ["build check: which expert should answer this?", "What is the derivative of x squared?"]

reference = SentenceTransformerEncoder().encode(TEXTS)
onnx = OnnxMiniLMEncoder().encode(TEXTS)
cosines = np.sum(reference * onnx, axis=1)  # both encoders L2-normalise their rows
assert reference.shape == onnx.shape == (len(TEXTS), 384), (reference.shape, onnx.shape)
# The ONNX export is int8; the unit tests hold the two to 0.999 on real queries.
assert float(cosines.min()) > 0.99, cosines
print(f"encoders ok: dim {reference.shape[1]}, cosine(torch fp32, onnx int8) min {cosines.min():.4f}")
