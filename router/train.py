"""Training the gate from a config: gather labelled queries, build the encoder, train, save the artifact.

Labelled data comes from two places: each expert's ``examples`` in the config (labelled with the expert's
name) and the JSONL files in ``gate.train_data``, one ``{"query": ..., "label": ...}`` object per line.
Every label must name an expert of the config.
"""

from __future__ import annotations

import json
from pathlib import Path

from router.config import RouterConfig
from router.encoders import build_encoder
from router.gate import Gate, train_gate

__all__ = ["collect_training_data", "load_labelled_jsonl", "train_from_config"]


def load_labelled_jsonl(path: str | Path) -> list[tuple[str, str]]:
    """``(query, label)`` pairs from a JSONL file; blank lines are skipped.

    A bad line raises ``ValueError`` naming the file, the line number and what is wrong with it.
    """
    pairs = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if line.strip():
                pairs.append(_parse_line(line, f"{path}:{number}"))
    return pairs


def _parse_line(line: str, where: str) -> tuple[str, str]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with 'query' and 'label', got {type(row).__name__}")
    for key in ("query", "label"):
        value = row.get(key)
        if not isinstance(value, str) or not value.strip():
            problem = "missing" if key not in row else f"must be a non-empty string, got {value!r}"
            raise ValueError(f"{where}: {key!r} {problem}")
    return row["query"], row["label"]


def collect_training_data(config: RouterConfig) -> tuple[list[str], list[str]]:
    """``(texts, labels)``: the experts' examples, then every ``gate.train_data`` file, in config order."""
    texts: list[str] = []
    labels: list[str] = []
    for expert in config.experts:
        texts += expert.examples
        labels += [expert.name] * len(expert.examples)
    names = set(config.expert_names)
    for entry in config.gate.train_data:
        path = config.resolve(entry)
        pairs = load_labelled_jsonl(path)
        unknown = sorted({label for _, label in pairs} - names)
        if unknown:
            raise ValueError(f"{path}: labels {', '.join(map(repr, unknown))} are not experts of the config; "
                             f"experts: {', '.join(config.expert_names)}")
        texts += [q for q, _ in pairs]
        labels += [label for _, label in pairs]
    return texts, labels


def train_from_config(config: RouterConfig, *, progress: bool = True) -> Gate:
    """Train the gate the config describes and save it to ``gate.artifact``."""
    texts, labels = collect_training_data(config)
    encoder = build_encoder(config.gate.encoder)
    gate = train_gate(texts, labels, encoder, experts=config.expert_names, progress=progress)
    gate.save(config.resolve(config.gate.artifact))
    return gate
