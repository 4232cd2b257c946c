"""Fixtures the encoder test modules share (each module gets its own instance: module scope)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from router.config import EncoderConfig
from router.encoders import Encoder, OnnxMiniLMEncoder, build_encoder
from router.gate import Gate
from tests.doubles.fakes import FakeHashingEncoder


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


@dataclass(frozen=True)
class DomainSplit:
    """CLINC150's 10 domains, out-of-scope queries left out: 3,000 training queries and 1,500 held-out ones."""

    train_texts: list[str]
    train_labels: list[str]
    domains: list[str]
    texts: list[str]
    gold: np.ndarray

    def gate(self, encoder: Encoder) -> Gate:
        """A gate trained on ``encoder``'s embeddings of the training queries."""
        from router.gate import train_gate

        return train_gate(self.train_texts, self.train_labels, encoder, experts=self.domains, progress=False)

    def routes(self, gate: Gate, encoder: Encoder) -> np.ndarray:
        """The domain ``gate`` sends each held-out query to, deciding from ``encoder``'s embeddings."""
        return np.array(self.domains)[gate.predict_proba(encoder.encode(self.texts), self.texts).argmax(axis=1)]


@pytest.fixture(scope="module")
def clinc_domains(data_dir: Path) -> DomainSplit:
    from eval.datasets import CLINC_OOS_LABEL, load_clinc150_domains

    train = [q for q in load_clinc150_domains(data_dir, "train") if q.label != CLINC_OOS_LABEL][::5]
    test = [q for q in load_clinc150_domains(data_dir, "test") if q.label != CLINC_OOS_LABEL][::3]
    return DomainSplit([q.text for q in train], [q.label for q in train], sorted({q.label for q in train}),
                       [q.text for q in test], np.array([q.label for q in test]))


class _FakeStaticHashing(FakeHashingEncoder):
    """Stands in for the two-stage gate's static encoder (``StaticMiniLMEncoder``), whose table is not built."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__()


@pytest.fixture
def fast_static(monkeypatch: pytest.MonkeyPatch) -> None:
    """``moe eval`` on a labelled JSONL fits the two-stage gate's static stage too: a hashing encoder stands in."""
    monkeypatch.setattr("router.static_encoder.StaticMiniLMEncoder", _FakeStaticHashing)
