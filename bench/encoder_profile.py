"""Where the ONNX encoder's time goes: onnxruntime's own per-operator profile of one short query.

``python -m bench.encoder_profile`` runs a session with the serving encoder's options on real SNIPS queries with
onnxruntime's profiler on, then sums kernel time per operator type, and writes
``bench/results/encoder_profile.json``. What it shows: the export stores its weights as int8 with a scale (a Cast
and a Mul in front of each MatMul, as its graph lists them), which onnxruntime folds into float32 weights when it
loads the model, so the matrix products run in float32 and take most of the time.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.data import snips

RESULTS = Path(__file__).resolve().parent / "results"

__all__ = ["profile_encoder"]


def profile_encoder(queries: Sequence[str], runs: int = 200) -> dict[str, Any]:
    """Per operator type: kernel microseconds per run and share of all kernel time, over ``runs`` queries."""
    import onnxruntime as ort

    from router.config import EncoderConfig
    from router.encoders import _session_options, minilm_tokenizer, onnx_feeds, verified_onnx_model

    path, _ = verified_onnx_model()  # the file is checked against its pinned sha256 before it is profiled
    tokenizer = minilm_tokenizer(EncoderConfig().max_length)  # as the serving encoder tokenises
    opts = _session_options(ort, 1)
    opts.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        opts.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        ids = [e.ids for e in tokenizer.encode_batch(list(queries[:runs]))]
        for seq in ids:
            session.run(None, onnx_feeds([seq]))
        events = json.loads(Path(session.end_profiling()).read_text())
    by_op: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
    model_runs = [e["dur"] for e in events if e.get("name") == "model_run"]
    total = sum(by_op.values()) or 1
    return {
        "runs": len(ids), "tokens_p50": float(np.median([len(x) for x in ids])),
        "model_run_p50_us_profiled": float(np.median(model_runs)) if model_runs else None,
        "ops": [{"op": op, "us_per_run": round(us / len(ids), 1), "share": round(us / total, 3)}
                for op, us in by_op.most_common()],
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.encoder_profile", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--out", type=Path, default=RESULTS / "encoder_profile.json")
    args = parser.parse_args(argv)
    result = profile_encoder(snips(per_label=10, n_test=args.runs).test_texts, runs=args.runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"ONNX encoder, {result['runs']} short queries (p50 {result['tokens_p50']:.0f} tokens), "
          f"kernel time per operator type:")
    for row in result["ops"][:8]:
        print(f"  {row['op']:<28} {row['us_per_run']:>8.1f} us/run  {100 * row['share']:5.1f}%")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
