"""The openvino backend: the verified ONNX export on OpenVINO, its precision, threads, agreement and routing."""

from __future__ import annotations

import csv
import threading
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from router.config import EncoderConfig
from router.encoders import OnnxMiniLMEncoder, build_encoder
from router.gate_artifact import GateArtifactMismatch
from router.openvino_encoder import PAD_TO, OpenVinoMiniLMEncoder, openvino_precision, openvino_threads


@pytest.fixture(scope="module")
def ov_encoder() -> OpenVinoMiniLMEncoder:
    encoder = build_encoder(EncoderConfig(backend="openvino"))
    assert isinstance(encoder, OpenVinoMiniLMEncoder)
    return encoder


@pytest.fixture(scope="module")
def onnx_encoder() -> OnnxMiniLMEncoder:
    return OnnxMiniLMEncoder()


@pytest.fixture(scope="module")
def queries(data_dir: Path) -> list[str]:
    """200 real user queries across SNIPS's 7 intents (its test split, every third row)."""
    with open(data_dir / "snips" / "snips_2017_custom_intents.csv", encoding="utf-8") as fh:
        rows = [r["text"] for r in csv.DictReader(fh) if r["split"] == "test"]
    return rows[::3][:200]


@pytest.mark.parametrize(("wanted", "capabilities", "expected"), [
    ("auto", ["BF16", "FP32", "INT8"], "bf16"),
    ("auto", ["FP32", "INT8"], "f32"),
    ("f32", ["BF16", "FP32"], "f32"),
    ("bf16", ["BF16", "FP32"], "bf16"),
])
def test_precision_resolves_from_the_cpu(wanted: str, capabilities: list[str], expected: str) -> None:
    assert openvino_precision(wanted, capabilities) == expected


def test_a_precision_the_cpu_lacks_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"openvino precision 'bf16': this CPU does not run it \(OpenVINO reports "
                                         r"FP32, INT8\); use precision auto or f32"):
        openvino_precision("bf16", ["FP32", "INT8"])
    with pytest.raises(ValueError, match="openvino precision 'fp8': expected one of auto, f32, bf16"):
        openvino_precision("fp8", ["FP32"])


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
    assert str(compiled.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'float32'>"
    assert encoder.identity == "openvino-f32:all-MiniLM-L6-v2"


def test_precision_is_an_openvino_setting_only() -> None:
    for backend in ("onnx", "static", "sentence-transformers"):
        with pytest.raises(ValidationError, match=f"precision: read by the openvino backend only; the '{backend}' "
                                                  "backend would ignore it"):
            EncoderConfig.model_validate({"backend": backend, "precision": "bf16"})
    with pytest.raises(ValidationError, match="precision"):
        EncoderConfig.model_validate({"backend": "openvino", "precision": "fp16"})


def test_output_contract_and_identity(ov_encoder: OpenVinoMiniLMEncoder, queries: list[str]) -> None:
    out = ov_encoder.encode(queries[:50])
    assert out.dtype == np.float32 and out.shape == (50, 384)
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert ov_encoder.encode([]).shape == (0, 384)
    assert ov_encoder.identity == f"openvino-{ov_encoder.precision}:all-MiniLM-L6-v2"
    assert ov_encoder.checksum == OnnxMiniLMEncoder().checksum  # the same verified file


def test_agrees_with_the_onnx_backend_at_both_precisions(ov_encoder: OpenVinoMiniLMEncoder,
                                                          onnx_encoder: OnnxMiniLMEncoder, queries: list[str]) -> None:
    reference = onnx_encoder.encode(queries)
    f32 = OpenVinoMiniLMEncoder(precision="f32").encode(queries)
    # The same float32 arithmetic in another runtime: measured min 0.999999 on these queries.
    assert (f32 * reference).sum(axis=1).min() > 0.99999
    # bf16 where the CPU runs it (measured min 0.99996), else f32 again.
    assert (ov_encoder.encode(queries) * reference).sum(axis=1).min() > 0.9999


def test_rows_do_not_depend_on_padding_or_neighbours(ov_encoder: OpenVinoMiniLMEncoder, queries: list[str]) -> None:
    """Widths are padded to a multiple of PAD_TO and runs hold many lengths: a row is the same alone or in a
    batch (within the last bits of the products' blocking)."""
    together = ov_encoder.encode(queries[:40])
    alone = np.vstack([ov_encoder.encode([q]) for q in queries[:40]])
    assert (together * alone).sum(axis=1).min() > 0.99999
    lengths = {len(ids) for ids in ov_encoder.token_ids(queries[:40])}
    assert any(n % PAD_TO for n in lengths)  # the padding was exercised


def test_concurrent_callers_get_their_own_rows(ov_encoder: OpenVinoMiniLMEncoder, queries: list[str]) -> None:
    serial = [ov_encoder.encode(queries[i * 50:(i + 1) * 50]) for i in range(4)]
    got: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        got[i] = ov_encoder.encode(queries[i * 50:(i + 1) * 50])

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


def test_routes_clinc150_as_well_as_onnx(ov_encoder: OpenVinoMiniLMEncoder, onnx_encoder: OnnxMiniLMEncoder,
                                         data_dir: Path) -> None:
    """A gate trained on each backend's own embeddings of CLINC150's 10 domains: the same held-out accuracy, and
    nearly every one of 1,500 queries sent to the same domain."""
    from eval.datasets import load_clinc150_domains
    from router.gate import train_gate

    train = [q for q in load_clinc150_domains(data_dir, "train") if q.label != "oos"][::5]  # 3,000 queries
    test = [q for q in load_clinc150_domains(data_dir, "test") if q.label != "oos"][::3]  # 1,500 queries
    domains = sorted({q.label for q in train})
    truth = np.array([q.label for q in test])
    texts = [q.text for q in test]
    routes = {}
    for name, encoder in (("onnx", onnx_encoder), ("openvino", ov_encoder)):
        gate = train_gate([q.text for q in train], [q.label for q in train], encoder, experts=domains,
                          progress=False)
        routes[name] = np.array(domains)[gate.predict_proba(encoder.encode(texts), texts).argmax(axis=1)]
    accuracy = {name: float(np.mean(r == truth)) for name, r in routes.items()}
    assert accuracy["onnx"] > 0.9
    assert abs(accuracy["openvino"] - accuracy["onnx"]) <= 0.005, accuracy
    assert float(np.mean(routes["onnx"] == routes["openvino"])) >= 0.99
