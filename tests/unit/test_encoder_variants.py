"""``bench.encoder_variants``' premise: folding the packaged graph's int8 weights into fp32 constants changes
nothing it computes, so every variant derived from the folded graph differs from the packaged one only by its
own quantization."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.encoder_variants import VariantEncoder, fold, table
from router.encoders import OnnxMiniLMEncoder, verified_onnx_model


def test_the_folded_graph_embeds_as_the_packaged_one(tmp_path: Path) -> None:
    texts = ["set an alarm for 7 am", "what is the derivative of x squared", "play some jazz by miles davis"]
    folded = fold(tmp_path)
    assert folded.parent == tmp_path and folded.stat().st_size > 0
    variant = VariantEncoder("folded", folded)
    packaged = OnnxMiniLMEncoder()
    assert np.abs(variant.encode(texts) - packaged.encode(texts)).max() < 1e-5
    assert variant.identity == packaged.identity + "+folded"
    assert variant.checksum != packaged.checksum == verified_onnx_model()[1]
    written = folded.stat().st_mtime_ns
    assert fold(tmp_path) == folded and folded.stat().st_mtime_ns == written  # derived once, then reused


def test_table_has_a_row_per_graph_with_its_figures() -> None:
    row = {"cosine_vs_st_min": 0.99928, "cosine_vs_st_mean": 0.99956, "clinc150_same_route": 1.0,
           "clinc150_accuracy": 0.9693, "gate_p50_ms": 5.384, "gate_p99_ms": 8.2, "gate_batch_qps": 362.1}
    lines = table({"packaged": row, "w8a8-tensor": {**row, "cosine_vs_st_min": 0.9165}},
                  {"w8a8-tensor": "per tensor"}).splitlines()
    assert len(lines) == 4 and lines[0].split()[:3] == ["graph", "cos", "min"]
    assert lines[2].split()[:2] == ["packaged", "0.9993"] and "5.38" in lines[2].split()
    assert lines[3].split()[:2] == ["w8a8-tensor", "0.9165"] and lines[3].endswith("per tensor")
