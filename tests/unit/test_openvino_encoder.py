"""The openvino backend: the verified ONNX export on OpenVINO, its precision, threads, agreement and routing."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import openvino as ov
import pytest
from pydantic import ValidationError

from router.config import EncoderConfig
from router.encoders import OnnxMiniLMEncoder, build_encoder
from router.gate_artifact import GateArtifactMismatch
from router.openvino_encoder import (
    PAD_TO,
    OpenVinoMiniLMEncoder,
    openvino_precision,
    openvino_threads,
    padded_rows,
)
from tests.unit.conftest import DomainSplit


@pytest.fixture(scope="module")
def ov_encoder() -> OpenVinoMiniLMEncoder:
    encoder = build_encoder(EncoderConfig(backend="openvino"))
    assert isinstance(encoder, OpenVinoMiniLMEncoder)
    return encoder


@pytest.mark.parametrize(("wanted", "capabilities", "default", "expected"), [
    ("auto", ["BF16", "FP32", "INT8"], "bf16", "bf16"),  # AMX: the plugin runs bfloat16 by default
    ("auto", ["BF16", "FP32", "INT8"], "f32", "f32"),  # AVX-512 BF16 without AMX: the plugin's default is f32
    ("auto", ["FP32", "INT8"], "f32", "f32"),
    ("f32", ["BF16", "FP32"], "bf16", "f32"),
    ("bf16", ["BF16", "FP32"], "f32", "bf16"),
])
def test_precision_resolves_from_the_cpu(wanted: str, capabilities: list[str], default: str, expected: str) -> None:
    assert openvino_precision(wanted, capabilities, default) == expected


def test_a_precision_the_cpu_lacks_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"openvino precision 'bf16': this CPU does not run it \(OpenVINO reports "
                                         r"FP32, INT8\); use precision auto or f32"):
        openvino_precision("bf16", ["FP32", "INT8"], "f32")
    with pytest.raises(ValueError, match="openvino precision 'fp8': expected one of auto, f32, bf16"):
        openvino_precision("fp8", ["FP32"], "f32")


@pytest.mark.parametrize(("rows", "padded"), [(1, 1), (2, 2), (3, 4), (5, 8), (8, 8), (9, 16), (17, 24), (64, 64)])
def test_runs_are_padded_to_few_row_counts(rows: int, padded: int) -> None:
    assert padded_rows(rows) == padded
    assert len({padded_rows(n) for n in range(1, 65)}) == 11  # 1, 2, 4, 8, 16, ..., 64


@pytest.mark.parametrize(("cores", "threads", "parallel", "expected"), [
    (1, None, None, (1, 1)),
    (2, None, None, (2, 1)),  # one stream holding both cores: a micro-batch is one run
    (3, None, None, (2, 1)),
    (4, None, None, (2, 2)),
    (16, None, None, (8, 2)),
    (16, 4, None, (4, 4)),
    (2, 1, None, (1, 2)),
    (8, 2, 1, (2, 1)),
])
def test_thread_and_stream_defaults_follow_the_cores(cores: int, threads: int | None, parallel: int | None,
                                                     expected: tuple[int, int]) -> None:
    assert openvino_threads(cores, threads, parallel) == expected


def test_the_runtime_gets_the_threads_streams_and_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("router.encoders.usable_cores", lambda: 2)
    encoder = build_encoder(EncoderConfig(backend="openvino", threads=1, precision="f32"))
    assert isinstance(encoder, OpenVinoMiniLMEncoder)
    assert (encoder.threads, encoder.parallel) == (1, 2)
    compiled = encoder._compiled
    assert compiled.get_property("NUM_STREAMS") == 2
    assert compiled.get_property("INFERENCE_NUM_THREADS") == 2
    assert compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    assert compiled.get_property("ENABLE_CPU_PINNING") is False
    assert encoder.identity == "openvino-f32:all-MiniLM-L6-v2"


def test_the_missing_package_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)
    # The project's extra, which pins the version the backend was measured with.
    with pytest.raises(ImportError, match=r"needs the 'openvino' package .*pip install 'moe-router\[openvino\]'$"):
        OpenVinoMiniLMEncoder()


def test_precision_is_an_openvino_setting_only() -> None:
    for backend in ("onnx", "static", "sentence-transformers"):
        with pytest.raises(ValidationError, match=f"precision: read by the openvino backend only; the '{backend}' "
                                                  "backend would ignore it"):
            EncoderConfig.model_validate({"backend": backend, "precision": "bf16"})
    with pytest.raises(ValidationError, match="precision"):
        EncoderConfig.model_validate({"backend": "openvino", "precision": "fp16"})


def test_output_contract_and_identity(ov_encoder: OpenVinoMiniLMEncoder, onnx_encoder: OnnxMiniLMEncoder,
                                     queries: list[str]) -> None:
    out = ov_encoder.encode(queries[:50])
    assert out.dtype == np.float32 and out.shape == (50, 384)
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert ov_encoder.encode([]).shape == (0, 384)
    assert ov_encoder.identity == f"openvino-{ov_encoder.precision}:all-MiniLM-L6-v2"
    assert ov_encoder.checksum == onnx_encoder.checksum  # the same verified file


def test_agrees_with_the_onnx_backend_at_both_precisions(ov_encoder: OpenVinoMiniLMEncoder,
                                                          onnx_encoder: OnnxMiniLMEncoder, queries: list[str]) -> None:
    reference = onnx_encoder.encode(queries)
    f32 = OpenVinoMiniLMEncoder(precision="f32")
    # The same float32 arithmetic in another runtime: measured min 0.9999999 on these queries.
    assert (f32.encode(queries) * reference).sum(axis=1).min() > 0.99999
    # bf16 where the CPU runs it (measured min 0.99998), else f32 again.
    assert (ov_encoder.encode(queries) * reference).sum(axis=1).min() > 0.9999
    # Rows of two precisions are two encoders to a gate artifact.
    assert (f32.identity == ov_encoder.identity) == (ov_encoder.precision == "f32")


def test_rows_do_not_depend_on_padding_or_neighbours(ov_encoder: OpenVinoMiniLMEncoder, queries: list[str]) -> None:
    """Widths are padded to a multiple of PAD_TO and rows to padded_rows, and runs hold many lengths: a row is
    the same alone, in a run of 37 (padded to 40 rows), or in one of 40 (within the last bits of the products'
    blocking)."""
    alone = np.vstack([ov_encoder.encode([q]) for q in queries[:40]])
    for n in (37, 40):
        together = ov_encoder.encode(queries[:n])
        assert (together * alone[:n]).sum(axis=1).min() > 0.99999
    lengths = {len(ids) for ids in ov_encoder.token_ids(queries[:40])}
    assert any(n % PAD_TO for n in lengths)  # the padding was exercised


def test_concurrent_callers_get_their_own_rows(queries: list[str]) -> None:
    """Two streams, so two infer requests handed between four threads: each gets its own rows."""
    encoder = OpenVinoMiniLMEncoder(threads=1, parallel=2)
    serial = [encoder.encode(queries[i * 50:(i + 1) * 50]) for i in range(4)]
    got: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        for _ in range(3):
            got[i] = encoder.encode(queries[i * 50:(i + 1) * 50])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        np.testing.assert_array_equal(got[i], serial[i])


def test_a_gate_trained_on_onnx_rows_is_refused(onnx_encoder: OnnxMiniLMEncoder, ov_encoder: OpenVinoMiniLMEncoder,
                                                tmp_path: Path) -> None:
    from router.gate import Gate, train_gate

    gate = train_gate(["weather in paris", "play some jazz"] * 4, ["weather", "music"] * 4, onnx_encoder,
                      experts=["weather", "music"], progress=False)
    gate.save(tmp_path / "gate")
    with pytest.raises(GateArtifactMismatch, match=r"encoder identity 'onnx-int8:all-MiniLM-L6-v2' in the "
                                                   rf"artifact, '{ov_encoder.identity}' given"):
        Gate.load(tmp_path / "gate", ov_encoder)


def test_a_gate_of_the_other_precision_is_refused_with_a_hint(ov_encoder: OpenVinoMiniLMEncoder,
                                                                tmp_path: Path) -> None:
    from router.gate import Gate, train_gate

    if ov_encoder.precision != "bf16":
        pytest.skip("this CPU runs OpenVINO in f32 only, so there is no second precision to refuse")
    f32 = OpenVinoMiniLMEncoder(precision="f32")
    gate = train_gate(["weather in paris", "play some jazz"] * 4, ["weather", "music"] * 4, f32,
                      experts=["weather", "music"], progress=False)
    gate.save(tmp_path / "gate")
    with pytest.raises(GateArtifactMismatch, match=r"encoder identity 'openvino-f32:all-MiniLM-L6-v2' in the "
                                                   r"artifact, 'openvino-bf16:all-MiniLM-L6-v2' given.*The openvino "
                                                   r"backend ran bf16 on this CPU: set gate.encoder.precision: f32"):
        Gate.load(tmp_path / "gate", ov_encoder)
    assert Gate.load(tmp_path / "gate", f32).experts == gate.experts  # its own precision loads it


def test_routes_clinc150_as_well_as_onnx(ov_encoder: OpenVinoMiniLMEncoder, onnx_encoder: OnnxMiniLMEncoder,
                                         clinc_domains: DomainSplit) -> None:
    """A gate trained on each backend's own embeddings of CLINC150's 10 domains: the same held-out accuracy, and
    nearly every one of 1,500 queries sent to the same domain."""
    routes = {name: clinc_domains.routes(clinc_domains.gate(encoder), encoder)
              for name, encoder in (("onnx", onnx_encoder), ("openvino", ov_encoder))}
    accuracy = {name: float(np.mean(r == clinc_domains.gold)) for name, r in routes.items()}
    assert accuracy["onnx"] > 0.9
    assert abs(accuracy["openvino"] - accuracy["onnx"]) <= 0.005, accuracy
    assert float(np.mean(routes["onnx"] == routes["openvino"])) >= 0.99


def test_a_lone_surrogate_is_encoded_as_the_replacement_character(ov_encoder: OpenVinoMiniLMEncoder) -> None:
    """A JSON escape ("\\ud83d") or a byte of argv that is not UTF-8 once made the tokenizer raise a TypeError."""
    rows = ov_encoder.encode(["hello \ud83d world", "hello \ufffd world", "a \ud83d\ude00 b", "a \U0001F600 b"])
    np.testing.assert_allclose(rows[0], rows[1], atol=1e-6)
    np.testing.assert_allclose(rows[2], rows[3], atol=1e-6)
