"""How long the two-stage gate takes to fit its bars again (``CascadeGate.with_targets``): what a service pays
at load time, or on hot reload, when ``gate.cascade.agreement`` or ``familiar`` differ from the artifact's fit.

``python -m bench.cascade_refit --split out/results/clinc150-domain/split`` trains the ONNX and static gates on a
suite's exported training part (``moe eval`` writes ``split/`` beside ``results.json``; embeddings come from the
evaluation cache, so a second run embeds nothing), then times the fit for each ``familiar`` share, and writes
``bench/results/cascade_refit.json``. Not part of ``make bench``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
SHARES = (0.9, 0.8, 0.7)


def measure(split: Path, shares: Sequence[float] = SHARES) -> dict[str, Any]:
    from eval.embeddings import CachedEncoder
    from router.cascade import CascadeGate
    from router.config import EncoderConfig
    from router.encoders import build_encoder
    from router.gate import train_gate
    from router.jsonl import read_jsonl
    from router.static_encoder import StaticMiniLMEncoder

    rows = [row for _, _, row in read_jsonl(split / "train.jsonl", expected="an object with 'text' and 'label'")]
    texts, labels = [r["query"] for r in rows], [r["label"] for r in rows]
    experts = sorted(set(labels))
    config = EncoderConfig(backend="onnx")
    full = train_gate(texts, labels, CachedEncoder(build_encoder(config), max_length=config.max_length),
                      experts=experts)
    fast = train_gate(texts, labels, StaticMiniLMEncoder(), experts=experts, progress=False)
    fits = []
    for share in shares:
        t0 = time.perf_counter()
        cascade = CascadeGate.train(full, fast, texts, labels, agreement=0.995, familiar=share)
        fits.append({"familiar": share, "seconds": round(time.perf_counter() - t0, 3), **cascade.fit.as_dict()})
    return {"split": str(split), "training_queries": len(texts), "experts": len(experts), "fits": fits}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cascade_refit", description=__doc__.splitlines()[0])
    parser.add_argument("--split", type=Path, default=Path("out/results/clinc150-domain/split"))
    parser.add_argument("--out", type=Path, default=RESULTS / "cascade_refit.json")
    args = parser.parse_args(argv)
    if not (args.split / "train.jsonl").is_file():
        parser.error(f"{args.split / 'train.jsonl'} not found: run `moe eval --suite SUITE --out DIR` first and "
                     "pass --split DIR/split")
    result = measure(args.split)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"two-stage gate fitted again on {result['training_queries']} training queries "
          f"({result['experts']} experts; {result['fits'][0]['n_val']} validation queries):")
    for fit in result["fits"]:
        print(f"  familiar {fit['familiar']:<4}  {fit['seconds']:.2f} s  threshold {fit['threshold']:.3f}  "
              f"static stage on validation {fit['fast_share']:.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
