"""Fixtures the encoder test modules share (each module gets its own instance: module scope)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from router.config import EncoderConfig
from router.encoders import OnnxMiniLMEncoder, build_encoder


@pytest.fixture(scope="module")
def onnx_encoder() -> OnnxMiniLMEncoder:
    """The default backend, built from its config as the router builds it."""
    encoder = build_encoder(EncoderConfig(backend="onnx"))
    assert isinstance(encoder, OnnxMiniLMEncoder)
    return encoder


@pytest.fixture(scope="module")
def queries(data_dir: Path) -> list[str]:
    """200 real user queries across SNIPS's 7 intents (its test split, every third row)."""
    with open(data_dir / "snips" / "snips_2017_custom_intents.csv", encoding="utf-8") as fh:
        rows = [r["text"] for r in csv.DictReader(fh) if r["split"] == "test"]
    return rows[::3][:200]
