"""What every suite runner shares: its context, seeded subsampling and the label-metric bundle."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eval.datasets import _unit_hash
from eval.embeddings import CachedEncoder
from router import logs

__all__ = ["PREDICTIONS", "SuiteContext", "as_float", "check_limit", "subsample", "warnings_once"]

LIMIT_RULE = "must be an integer >= 1"


def check_limit(limit: int | None) -> None:
    """Raise ``ValueError`` naming ``--limit`` unless ``limit`` is None or an integer >= 1 (0 would keep nothing
    and a negative one would slice from the end)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"argument --limit: {LIMIT_RULE}, got {limit!r}")


# Loggers whose warnings a run repeats when it trains several gates on the same data (the headline gate, each
# ensemble member alone, the two-stage gate's static stage): each distinct message is shown once per run.
ONCE_LOGGERS = ("router.gate", "router.cascade", "router.outcome_gate", "router.static_encoder")


def warnings_once(names: Sequence[str] = ONCE_LOGGERS,
                  into: list[str] | None = None) -> AbstractContextManager[None]:
    """``router.logs.warnings_once`` over the loggers a run's gates warn on; ``into``: a list (a run's notes)
    each distinct warning is added to, so the report says what the terminal did (a gate that could not calibrate
    an expert, a text given two labels)."""
    return logs.warnings_once(names, into)


# Each scored test query's outcome, one JSON object per line beside results.json: what the metrics are computed
# from, so they can be audited (or recomputed) from the files alone.
PREDICTIONS = "predictions.jsonl"


@dataclass
class SuiteContext:
    """What every suite runner gets: where the data is, where to write, and the shared encoder."""

    name: str
    data_dir: Path
    out: Path
    encoder: CachedEncoder
    seed: int = 0
    limit: int | None = None  # at most this many queries per split (a fast, smaller run)
    pool: str | None = None  # the experts a suite may use (``--pool``); None: all of them
    plots: bool = True
    progress: bool = True
    train_path: Path | None = None
    test_path: Path | None = None
    notes: list[str] = field(default_factory=list)


def subsample(items: Sequence[Any], limit: int | None, seed: int, key: Callable[[Any], str]) -> list[Any]:
    """At most ``limit`` items, chosen by a seeded hash of their id (so the same ones on every run). ``limit``
    is None (all of them) or at least 1 (``ValueError`` otherwise)."""
    check_limit(limit)
    if limit is None or len(items) <= limit:
        return list(items)
    chosen = sorted(range(len(items)), key=lambda i: _unit_hash(f"limit:{seed}:{key(items[i])}"))[:limit]
    return [items[i] for i in sorted(chosen)]


def as_float(values: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)
