"""The encoder backends a config (``gate.encoder.backend``) or ``moe eval --encoder`` may name, each the
``module:Class`` that builds it (``router.encoders.build_encoder``).

Kept apart from ``router.encoders`` so that what only needs the names (the CLI's ``--encoder`` choices, built for
every ``moe`` command, ``--help`` included) loads no numpy.
"""

from __future__ import annotations

__all__ = ["ENCODER_BACKENDS"]

ENCODER_BACKENDS: dict[str, str] = {
    "onnx": "router.encoders:OnnxMiniLMEncoder",
    "openvino": "router.openvino_encoder:OpenVinoMiniLMEncoder",
    "sentence-transformers": "router.encoders:SentenceTransformerEncoder",
    "static": "router.static_encoder:StaticMiniLMEncoder",
}
