"""What every suite runner shares: its context, seeded subsampling and the label-metric bundle."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eval.datasets import _unit_hash
from eval.embeddings import CachedEncoder

__all__ = ["SuiteContext", "as_float", "subsample"]


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
    """At most ``limit`` items, chosen by a seeded hash of their id (so the same ones on every run)."""
    if limit is None or len(items) <= limit:
        return list(items)
    chosen = sorted(range(len(items)), key=lambda i: _unit_hash(f"limit:{seed}:{key(items[i])}"))[:limit]
    return [items[i] for i in sorted(chosen)]


def as_float(values: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)
