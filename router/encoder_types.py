"""The encoder backends a config (``gate.encoder.backend``) or ``moe eval --encoder`` may name, each the
``module:Class`` that builds it (``router.encoders.build_encoder``).

Kept apart from ``router.encoders`` so that what only needs the names (the CLI's ``--encoder`` choices, built for
every ``moe`` command, ``--help`` included) loads no numpy.
"""

from __future__ import annotations

from experts.plugins import ENCODER_GROUP, installed

__all__ = ["ENCODER_BACKENDS", "known_backends"]

ENCODER_BACKENDS: dict[str, str] = {
    "onnx": "router.encoders:OnnxMiniLMEncoder",
    "openvino": "router.openvino_encoder:OpenVinoMiniLMEncoder",
    "sentence-transformers": "router.encoders:SentenceTransformerEncoder",
    "static": "router.static_encoder:StaticMiniLMEncoder",
}


def known_backends() -> list[str]:
    """Every backend a config may name: ``ENCODER_BACKENDS``' and the installed packages' entry points' (as
    ``experts.registry.known_types`` for expert types)."""
    return sorted({*ENCODER_BACKENDS, *installed(ENCODER_GROUP)})
