"""Derive int8-compute variants of the packaged MiniLM ONNX graph (runs in ``bench/.venv-quant``).

The packaged export stores int8 weights that the graph turns back into fp32 (``Cast`` then ``Mul`` by a
scale) before every ``MatMul``, so onnxruntime computes in fp32. These variants quantize the activations too,
so the matrix products run on int8 kernels (VNNI where the CPU has it):

- ``w8a8-block{32,64,128}``: ``MatMulNBits`` with 8-bit weights in blocks of that many input rows, each block
  with its own scale, and ``accuracy_level`` 4, which quantizes the activations to int8 per block of the same
  length;
- ``w8a8-tensor`` and ``w8a8-channel``: ``quantize_dynamic``, int8 weights (one scale per matrix, or per output
  column) and activations quantized per tensor at run time (``MatMulInteger``);
- ``w8a8-<group>``: ``w8a8-channel`` for one group of the six layers' products only, the rest left in fp32: the
  attention's query, key and value projections (``qkv``), its output projection (``attn-out``), the feed-forward
  block's first (``ffn-in``) or second (``ffn-out``) product. Which products tolerate int8 activations, and what
  each saves.

Input: the packaged graph with its weights folded to fp32 constants (``bench.encoder_variants`` writes it
with onnxruntime's basic optimisations). Output: one ``.onnx`` per variant in ``--out``, and a JSON list of
them on stdout. Needs ``onnx``, ``onnx_ir`` and ``onnxruntime`` (``install_quant.sh``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BLOCKS = (32, 64, 128)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folded", required=True, type=Path, help="the fp32-folded graph")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    args.out.mkdir(parents=True, exist_ok=True)
    made = []
    for block in BLOCKS:
        config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, accuracy_level=4, bits=8)
        quantizer = MatMulNBitsQuantizer(onnx.load(str(args.folded)), bits=8, block_size=block, is_symmetric=True,
                                         accuracy_level=4, algo_config=config)
        quantizer.process()
        path = args.out / f"w8a8-block{block}.onnx"
        quantizer.model.save_model_to_file(str(path), use_external_data_format=False)
        made.append({"name": path.stem, "path": str(path),
                     "how": f"MatMulNBits, 8-bit weights and int8 activations in blocks of {block}"})
    for name, per_channel in (("w8a8-tensor", False), ("w8a8-channel", True)):
        path = args.out / f"{name}.onnx"
        quantize_dynamic(str(args.folded), str(path), weight_type=QuantType.QInt8, per_channel=per_channel)
        scope = "per output column" if per_channel else "per matrix"
        made.append({"name": name, "path": str(path),
                     "how": f"quantize_dynamic, int8 weights {scope}, activations per tensor"})
    groups = _product_groups(onnx.load(str(args.folded)))
    for group, nodes in groups.items():
        path = args.out / f"w8a8-{group}.onnx"
        others = [n for g, ns in groups.items() if g != group for n in ns]
        quantize_dynamic(str(args.folded), str(path), weight_type=QuantType.QInt8, per_channel=True,
                         nodes_to_exclude=others, op_types_to_quantize=["MatMul"])
        made.append({"name": path.stem, "path": str(path),
                     "how": f"quantize_dynamic as w8a8-channel, the {group} products only ({len(nodes)} of them)"})
    print(json.dumps(made))


def _product_groups(model: object) -> dict[str, list[str]]:
    """The names of the MatMuls by a constant weight, by their place in a layer, told from their input: the
    attention block's LayerNorm output (``layer_norm``, ``layer_norm_2``, ...: query, key, value), the attention
    output (``view_*``), the feed-forward block's LayerNorm output (``layer_norm_1``, ``layer_norm_3``, ...) and the
    GELU output (``gelu*``). The names are the exporter's, so an export that names them otherwise fails here."""
    groups: dict[str, list[str]] = {"qkv": [], "attn-out": [], "ffn-in": [], "ffn-out": []}
    for node in model.graph.node:  # type: ignore[attr-defined]
        source, weight = node.input[0] if node.input else "", node.input[1] if len(node.input) > 1 else ""
        if node.op_type != "MatMul" or not weight.startswith("val_") or source.startswith("val_"):
            continue
        if source.startswith("view"):
            groups["attn-out"].append(node.name)
        elif source.startswith("gelu"):
            groups["ffn-out"].append(node.name)
        elif source.startswith("layer_norm"):
            index = 0 if source == "layer_norm" else int(source.rsplit("_", 1)[1])
            groups["qkv" if index % 2 == 0 else "ffn-in"].append(node.name)
    counts = {g: len(n) for g, n in groups.items()}
    if counts != {"qkv": 18, "attn-out": 6, "ffn-in": 6, "ffn-out": 6}:
        raise SystemExit(f"unexpected products in the folded graph: {counts} (6 layers expected)")
    return groups


if __name__ == "__main__":
    main()
