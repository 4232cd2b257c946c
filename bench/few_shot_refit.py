"""What training the served classifier on every example gains a gate with few examples per expert.

With too few held-out queries to calibrate on (fewer than 50), ``train_gate`` calibrates by cross-validation over
every example and then fits the served classifier on all of them (``refit``), not on the training part alone.
``python -m bench.few_shot_refit`` samples ``N`` SNIPS training queries for each of its 7 intents (N = 8, 10, 15,
20; 5 seeds each), trains a gate both ways on the same sample, and prints the accuracy of each on SNIPS's test
queries; it writes ``bench/results/few_shot_refit.json``. Not part of ``make bench``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.data import data_dir

RESULTS = Path(__file__).resolve().parent / "results"
PER_INTENT = (8, 10, 15, 20)
SEEDS = 5


def measure(per_intent: Sequence[int] = PER_INTENT, seeds: int = SEEDS) -> dict[str, Any]:
    from eval.datasets import load_snips
    from router.config import EncoderConfig
    from router.encoders import build_encoder
    from router.gate import train_gate

    encoder = build_encoder(EncoderConfig())
    train, test = load_snips(data_dir(), "train"), load_snips(data_dir(), "test")
    test_texts = [q.text for q in test]
    x_test = encoder.encode(test_texts)
    intents = sorted({q.label for q in train})
    rows = []
    for n in per_intent:
        accuracy: dict[bool, list[float]] = {True: [], False: []}
        for seed in range(seeds):
            rng = random.Random(seed)
            texts, labels = [], []
            for intent in intents:
                for text in rng.sample([q.text for q in train if q.label == intent], n):
                    texts.append(text)
                    labels.append(intent)
            for refit in (True, False):
                gate = train_gate(texts, labels, encoder, experts=intents, seed=seed, progress=False, refit=refit)
                picked = gate.predict_proba(x_test, test_texts).argmax(axis=1)
                accuracy[refit].append(float(np.mean([gate.experts[i] == q.label for i, q in zip(picked, test,
                                                                                                 strict=True)])))
        row = {"examples_per_intent": n, "refit": float(np.mean(accuracy[True])),
               "training_part_only": float(np.mean(accuracy[False])), "seeds": seeds}
        row["gain_points"] = 100 * (row["refit"] - row["training_part_only"])
        rows.append(row)
        print(f"{n:>3} examples per intent: refit {row['refit']:.4f}, training part only "
              f"{row['training_part_only']:.4f} ({row['gain_points']:+.2f} points, mean of {seeds} seeds)",
              flush=True)
    return {"data": "SNIPS (7 intents): N training queries per intent, SNIPS test split", "rows": rows}


def main(argv: Sequence[str] | None = None) -> int:
    from eval.provenance import stamp

    parser = argparse.ArgumentParser(prog="python -m bench.few_shot_refit", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=SEEDS)
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # each small gate warns that its held-out part is too small to fit on
    result = {**measure(seeds=args.seeds), **stamp()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "few_shot_refit.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
