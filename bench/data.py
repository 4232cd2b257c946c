"""Real labelled queries for the benchmarks: SNIPS (7 intents) and CLINC150 (150 intents), read from
``$MOE_DATA_DIR`` (default ``<repo>/../shared/data``). Samples are fixed by a seed, so runs compare."""

from __future__ import annotations

import csv
import json
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Labelled", "clinc150", "data_dir", "snips"]


@dataclass(frozen=True)
class Labelled:
    train_texts: list[str]
    train_labels: list[str]
    test_texts: list[str]
    labels: list[str]  # every label, sorted: the experts of a gate trained on this data


def data_dir() -> Path:
    """``$MOE_DATA_DIR`` as every ``moe`` command reads it (``router.settings``: ``~`` expanded, an empty or blank
    value unset), else the shared data beside the repository."""
    from router.settings import Settings

    return Settings.load().data_dir or Path(__file__).resolve().parents[2] / "shared" / "data"


def _sample(rows: list[tuple[str, str]], per_label: int, seed: int) -> tuple[list[str], list[str]]:
    by_label: dict[str, list[str]] = defaultdict(list)
    for text, label in rows:
        by_label[label].append(text)
    rng = random.Random(seed)
    texts, labels = [], []
    for label in sorted(by_label):
        for text in rng.sample(by_label[label], min(per_label, len(by_label[label]))):
            texts.append(text)
            labels.append(label)
    return texts, labels


def snips(per_label: int = 60, n_test: int = 320, seed: int = 0) -> Labelled:
    """A few hundred SNIPS training queries (``per_label`` per intent) and ``n_test`` held-out test queries."""
    path = data_dir() / "snips" / "snips_2017_custom_intents.csv"
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    train = [(r["text"], r["intent"]) for r in rows if r["split"] == "train"]
    test = [r["text"] for r in rows if r["split"] == "test"]
    texts, labels = _sample(train, per_label, seed)
    random.Random(seed).shuffle(test)
    return Labelled(texts, labels, test[:n_test], sorted(set(labels)))


def clinc150(n_labels: int, per_label: int = 8, n_test: int = 200, seed: int = 0) -> Labelled:
    """``n_labels`` CLINC150 intents (a seeded choice), ``per_label`` training queries each, test queries from
    those intents."""
    doc = json.loads((data_dir() / "clinc150" / "data_full.json").read_text(encoding="utf-8"))
    intents = sorted({label for _, label in doc["train"]})
    chosen = set(random.Random(seed).sample(intents, n_labels))
    texts, labels = _sample([(t, lab) for t, lab in doc["train"] if lab in chosen], per_label, seed)
    test = [t for t, lab in doc["test"] if lab in chosen]
    random.Random(seed).shuffle(test)
    return Labelled(texts, labels, test[:n_test], sorted(chosen))
