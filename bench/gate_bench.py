"""Gate decision time: embed one query, score every expert, choose the top-k panel; and batch throughput.

The decision measured is the serving path's work, minus the trace object: ``gate.assess([text], k=3)`` (the
probabilities, the three nearest training examples behind the decision and the familiarity score, as the
router's batch worker asks for them) then ``router.topk.choose``. Gates are trained here on real labelled
queries (SNIPS; CLINC150 for 4-64 experts).

The machines are shared, so load from other processes comes and goes. Variants that are compared (ONNX
against sentence-transformers, 4 against 64 experts) are timed interleaved, query by query, so a burst of
outside load falls on all of them alike and their ratios stay fair.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from bench.data import Labelled, clinc150
from router.cascade import CascadeGate
from router.config import TopKConfig
from router.encoders import Encoder
from router.gate import Gate, train_gate
from router.topk import choose

__all__ = ["CachedEncoder", "Decide", "Scorer", "cascade_figures", "decider", "gate_figures", "interleaved_batch_qps",
           "interleaved_times_ms", "scaling", "stats", "train"]


class CachedEncoder(Encoder):
    """Remembers embeddings by text, so gates trained on nested subsets of one data set embed it once.

    Used for training only; decisions are timed with the real encoder.
    """

    def __init__(self, inner: Encoder) -> None:
        self.inner = inner
        self.identity, self.checksum, self.max_length = inner.identity, inner.checksum, inner.max_length
        self._cache: dict[str, np.ndarray] = {}

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            self._cache.update(zip(missing, self.inner.encode(missing), strict=True))
        return np.stack([self._cache[t] for t in texts]) if texts else self.inner.encode([])


def train(encoder: Encoder, data: Labelled) -> Gate:
    return train_gate(data.train_texts, data.train_labels, encoder, experts=data.labels, progress=False)


class Scorer(Protocol):
    """What a timed decision needs of a gate (one-stage or two-stage)."""

    experts: list[str]

    def assess(self, texts: Sequence[str], k: int = 3) -> Any: ...


def decider(gate: Scorer, top_k: TopKConfig) -> Callable[[Sequence[str]], list[list[tuple[str, float]]]]:
    """The decision for a batch of texts: one panel per text."""
    def decide(texts: Sequence[str]) -> list[list[tuple[str, float]]]:
        # k=3: the nearest examples and familiarity are part of every served decision (router.decide._gate_batch).
        probs = np.asarray(gate.assess(texts, k=3).probs)
        return [choose(dict(zip(gate.experts, row, strict=True)), top_k) for row in probs.tolist()]
    return decide


Decide = Callable[[Sequence[str]], object]


def interleaved_times_ms(deciders: dict[str, Decide], queries: Sequence[str], warmup: int = 20,
                         every: dict[str, int] | None = None) -> dict[str, list[float]]:
    """One query at a time, each query through every decider in turn (``every[name] = n``: every n-th query
    only, for a slow decider that would otherwise dominate the run)."""
    every = every or {}
    for q in queries[:warmup]:
        for decide in deciders.values():
            decide([q])
    times: dict[str, list[float]] = {name: [] for name in deciders}
    for i, q in enumerate(queries):
        for name, decide in deciders.items():
            if i % every.get(name, 1):
                continue
            start = time.perf_counter()
            decide([q])
            times[name].append((time.perf_counter() - start) * 1000.0)
    return times


def interleaved_batch_qps(deciders: dict[str, Decide], queries: Sequence[str], batch: int = 64,
                          rounds: int = 3) -> dict[str, float]:
    """Queries/s deciding ``batch`` queries per encoder call, over ``rounds`` passes through ``queries``;
    batches alternate between deciders, so a busy moment of the shared machine hits each about equally."""
    for decide in deciders.values():
        decide(queries[:batch])
    spent = dict.fromkeys(deciders, 0.0)
    for _ in range(rounds):
        for i in range(0, len(queries), batch):
            for name, decide in deciders.items():
                start = time.perf_counter()
                decide(queries[i:i + batch])
                spent[name] += time.perf_counter() - start
    return {name: round(rounds * len(queries) / s, 1) for name, s in spent.items()}


def stats(times_ms: Sequence[float]) -> dict[str, float]:
    return {"p50_ms": round(float(np.percentile(times_ms, 50)), 3),
            "p99_ms": round(float(np.percentile(times_ms, 99)), 3), "n": len(times_ms)}


def cascade_figures(cascade: CascadeGate, queries: Sequence[str]) -> dict[str, float]:
    """On ``queries``: the share the fast stage decides, and how often the cascade picks the full gate's top."""
    compared = cascade.compare(queries)
    return {"fast_share": round(compared.fast_share, 4), "agreement_with_full": round(compared.agreement, 4),
            "threshold": cascade.fit.threshold or float("nan")}


def gate_figures(gates: Mapping[str, Scorer], queries: Sequence[str], batch_queries: Sequence[str],
                 every: dict[str, int] | None = None) -> dict[str, dict[str, Any]]:
    """Per gate: p50/p99 of one top-1 decision at a time, and batched queries/s."""
    deciders: dict[str, Decide] = {name: decider(g, TopKConfig(k=1)) for name, g in gates.items()}
    times = interleaved_times_ms(deciders, queries, every=every)
    qps = interleaved_batch_qps(deciders, batch_queries)
    return {name: {**stats(times[name]), "batch_qps": qps[name]} for name in gates}


def _post_embedding_us(gate: Gate, embeddings: np.ndarray, texts: Sequence[str], top_k: TopKConfig) -> float:
    """Median time of the part that grows with the experts: classifier, softmax, choose (embedding excluded)."""
    times = []
    for row, text in zip(embeddings, texts, strict=True):
        start = time.perf_counter()
        probs = gate.predict_proba(row[None, :], [text])[0]
        choose(dict(zip(gate.experts, probs.tolist(), strict=True)), top_k)
        times.append((time.perf_counter() - start) * 1e6)
    return round(float(np.median(times)), 2)


def nested_gates(encoder: Encoder, experts: Sequence[int], n_test: int) -> tuple[dict[int, Gate], Labelled]:
    """A gate per expert count on nested sets of CLINC150 intents (8 training queries each), all serving on
    ``encoder``, and the largest set's data (its ``n_test`` test queries are drawn from all its intents)."""
    cached = CachedEncoder(encoder)  # the nested sets share their queries: each is embedded once
    largest = clinc150(max(experts), per_label=8, n_test=n_test)
    gates = {}
    for n in experts:
        keep = set(largest.labels[:n])
        pairs = [(t, lab) for t, lab in zip(largest.train_texts, largest.train_labels, strict=True) if lab in keep]
        gate = train(cached, Labelled([t for t, _ in pairs], [lab for _, lab in pairs], largest.test_texts,
                                      sorted(keep)))
        gate.encoder = encoder
        gates[n] = gate
    return gates, largest


def scaling(encoder: Encoder, experts: Sequence[int] = (4, 16, 64), ks: Sequence[int] = (1, 3, 5),
            n_queries: int = 100) -> list[dict[str, Any]]:
    """Decision time as the number of experts (CLINC150 intents, nested sets) and k grow.

    Every gate decides the same queries (drawn from the largest set's intents), interleaved.
    """
    gates, largest = nested_gates(encoder, experts, n_queries)
    combos = {(n, k): decider(gates[n], TopKConfig(k=min(k, n))) for n in experts for k in ks}
    times = interleaved_times_ms({f"{n}/{k}": d for (n, k), d in combos.items()}, largest.test_texts)
    qps = interleaved_batch_qps({str(n): decider(gates[n], TopKConfig(k=1)) for n in experts},
                                (largest.test_texts * 2)[:192])
    embeddings = encoder.encode(largest.test_texts)
    return [{"experts": n, "k": k, **stats(times[f"{n}/{k}"]),
             "post_embedding_us": _post_embedding_us(gates[n], embeddings, largest.test_texts,
                                                    TopKConfig(k=min(k, n))),
             "batch_qps_k1": qps[str(n)]} for (n, k) in combos]
