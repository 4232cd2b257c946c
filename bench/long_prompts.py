"""Long prompts through the ONNX encoder: one run per ``batch_size`` texts against runs capped at
``batch_tokens`` padded tokens (``gate.encoder.batch_tokens``), which go at once on the encoder's pool.

``python -m bench.long_prompts`` prints queries/s and the p50 time of a call for calls of 1, 4, 16 and 64
MMLU-Pro prompts (real questions with their options, as the ``mmlu-pro-*`` suites embed them), and writes
``bench/results/long_prompts.json``. The two encoders take turns call by call, so a busy moment of the shared
machine hits both about equally.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.data import data_dir

RESULTS = Path(__file__).resolve().parent / "results"
CALL_SIZES = (1, 4, 16, 64)
WIDE = 10**9  # no token cap: one run per batch_size texts, as before batch_tokens


def prompts(n: int) -> list[str]:
    """The first ``n`` MMLU-Pro questions as the suites embed them."""
    from experts.recordings import load_mmlu_pro, mmlu_pro_prompt

    store = load_mmlu_pro(data_dir() / "mmlu_pro_outcomes")
    return [mmlu_pro_prompt(q) for q in store.questions[:n]]


def measure(texts: Sequence[str], sizes: Sequence[int] = CALL_SIZES, rounds: int = 2) -> dict[str, Any]:
    from router.encoders import OnnxMiniLMEncoder

    encoders = {"capped": OnnxMiniLMEncoder(), "one run per batch": OnnxMiniLMEncoder(batch_tokens=WIDE)}
    capped = encoders["capped"]
    tokens = [len(ids) for ids in capped.token_ids(texts)]
    for encoder in encoders.values():
        encoder.encode(texts[:8])  # warm-up: session, pool
    out: dict[str, Any] = {"prompts": len(texts), "tokens_p50": float(np.median(tokens)),
                           "batch_tokens": capped.batch_tokens, "batch_size": capped.batch_size,
                           "threads": capped.threads, "parallel": capped.parallel, "calls": {}}
    for size in sizes:
        times: dict[str, list[float]] = {name: [] for name in encoders}
        for _ in range(rounds):
            for start in range(0, len(texts) - size + 1, size):
                for name, encoder in encoders.items():
                    t0 = time.perf_counter()
                    encoder.encode(texts[start:start + size])
                    times[name].append(time.perf_counter() - t0)
        out["calls"][str(size)] = {
            name: {"queries_per_s": round(size * len(t) / sum(t), 1),
                   "call_p50_ms": round(1e3 * float(np.median(t)), 1)}
            for name, t in times.items()}
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.long_prompts", description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--out", type=Path, default=RESULTS / "long_prompts.json")
    args = parser.parse_args(argv)
    result = measure(prompts(args.prompts))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"ONNX encoder, {result['prompts']} MMLU-Pro prompts (p50 {result['tokens_p50']:.0f} tokens); runs of at "
          f"most {result['batch_size']} texts, capped at {result['batch_tokens']} padded tokens or not:")
    print(f"  {'texts per call':>14}  {'capped q/s':>10}  {'p50 ms':>8}  {'uncapped q/s':>12}  {'p50 ms':>8}")
    for size, row in result["calls"].items():
        c, w = row["capped"], row["one run per batch"]
        print(f"  {size:>14}  {c['queries_per_s']:>10}  {c['call_p50_ms']:>8}  {w['queries_per_s']:>12}  "
              f"{w['call_p50_ms']:>8}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
