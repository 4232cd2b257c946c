"""Cold start and modularity: routing over the config's experts, not only the ones a gate was trained on.

A trained gate scores the experts of its artifact. The config may differ from it, and neither change needs
retraining:

- An expert **removed** from the config loses its column; the remaining columns are renormalised to sum to 1.
- An expert **added** to the config (or one the artifact holds without training data) is routable from its
  ``examples`` alone. Its *claim* on a query is ``r = sigmoid(a * s + b)``, where ``s`` is the query's highest
  cosine to one of the expert's examples and ``(a, b)`` map similarity to the probability that the query
  belongs to that expert (``SimilarityMap``; a label gate fits it on its own validation data, see
  ``fit_similarity_map``). The claims are combined as independent events: with probability
  ``R = 1 - prod(1 - r_j)`` some new expert owns the query, and that mass is shared in proportion to ``r_j``;
  the trained experts' distribution is scaled by ``1 - R``. Rows still sum to 1, so top-k policies apply as
  before.
- An expert with neither training data in the artifact nor examples in the config cannot be scored at all;
  ``plan_columns`` refuses it with ``GateArtifactMismatch``, naming it.

Max cosine rather than the centroid: a handful of examples often covers several phrasings or sub-topics, and
the centroid of unrelated examples lies near none of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["ColdStart", "Columns", "SimilarityMap", "fit_similarity_map", "plan_columns"]

# Used when a gate has no labelled validation data to fit the map on (outcome gates). Measured with
# ``fit_similarity_map`` on label gates (5 examples per expert): SNIPS 7 intents (15.5, 0.41) and CLINC150 10
# domains (12.8, 0.43), both with the ONNX MiniLM encoder at 256 tokens.
DEFAULT_SLOPE, DEFAULT_MIDPOINT = 14.0, 0.42
COLD_START_EXAMPLES = 5  # examples per expert when simulating a cold start to fit the map


@dataclass(frozen=True)
class SimilarityMap:
    """``r = sigmoid(slope * (s - midpoint))``: the probability a query with max cosine ``s`` is the expert's."""

    slope: float = DEFAULT_SLOPE
    midpoint: float = DEFAULT_MIDPOINT

    def __call__(self, s: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.slope * (s - self.midpoint)))


@dataclass(frozen=True)
class ColdStart:
    """The examples of experts scored by similarity: ``embeddings [n, dim]``, ``owner [n]`` (0..len(names)-1)."""

    names: list[str]
    embeddings: np.ndarray
    owner: np.ndarray
    similarity_map: SimilarityMap

    def claims(self, x: np.ndarray) -> np.ndarray:
        """``[q, len(names)]``: each expert's claim ``r`` on each query."""
        sims = np.asarray(x, dtype=np.float32) @ self.embeddings.T  # [q, n]
        best = np.full((len(x), len(self.names)), -1.0)
        for j in range(len(self.names)):
            best[:, j] = sims[:, self.owner == j].max(axis=1)
        return self.similarity_map(best)


@dataclass(frozen=True)
class Columns:
    """How the routable experts (config order) map onto the artifact's columns, or onto ``cold``."""

    experts: list[str]
    source: np.ndarray  # [len(experts)]: artifact column, or -1 - j for cold-start expert j
    cold: ColdStart | None = None

    def apply(self, artifact_proba: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Rows over ``experts`` from rows over the artifact's trained experts (each summing to 1)."""
        kept = self.source[self.source >= 0]
        out = np.zeros((len(x), len(self.experts)), dtype=np.float64)
        trained = artifact_proba[:, kept]
        total = trained.sum(axis=1, keepdims=True)
        # Dropping experts renormalises the rest; when every kept column is ~0, share evenly.
        trained = np.where(total > 1e-12, trained / np.maximum(total, 1e-12), 1.0 / max(len(kept), 1))
        if self.cold is None:
            out[:, self.source >= 0] = trained
            return out
        r = np.clip(self.cold.claims(x), 1e-9, 1.0 - 1e-9)
        owned = 1.0 - np.exp(np.log1p(-r).sum(axis=1, keepdims=True))  # P(some new expert owns the query)
        cold_cols = np.flatnonzero(self.source < 0)
        out[:, cold_cols] = owned * r[:, -1 - self.source[cold_cols]] / r[:, -1 - self.source[cold_cols]].sum(
            axis=1, keepdims=True)
        out[:, self.source >= 0] = trained * (1.0 - owned) if len(kept) else 0.0
        return out / out.sum(axis=1, keepdims=True)


def plan_columns(artifact_experts: Sequence[str], trained: Sequence[str], wanted: Mapping[str, np.ndarray],
                 similarity_map: SimilarityMap) -> Columns:
    """Columns for the experts in ``wanted`` (name -> its example embeddings, in config order).

    ``trained`` are the artifact experts with training data. Any other wanted expert is scored from its
    examples; one without examples raises ``GateArtifactMismatch``.
    """
    from router.gate import GateArtifactMismatch

    index = {e: i for i, e in enumerate(artifact_experts)}
    trained_set = set(trained)
    cold = [n for n in wanted if n not in trained_set]
    empty = [n for n in cold if len(wanted[n]) == 0]
    if empty:
        raise GateArtifactMismatch(
            "cannot route to expert(s) " + ", ".join(map(repr, empty)) + ": the gate artifact holds no training "
            "data for them and the config gives them no examples. Add examples to the config, or retrain the "
            "gate (moe train) with data for them.")
    source = np.array([index[n] if n in trained_set else -1 - cold.index(n) for n in wanted], dtype=np.int64)
    if not cold:
        return Columns(list(wanted), source)
    embeddings = np.concatenate([np.asarray(wanted[n], dtype=np.float32) for n in cold])
    owner = np.concatenate([np.full(len(wanted[n]), j, dtype=np.int64) for j, n in enumerate(cold)])
    return Columns(list(wanted), source, ColdStart(cold, embeddings, owner, similarity_map))


def fit_similarity_map(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                       n_classes: int, *, seed: int = 0) -> SimilarityMap:
    """Fit ``SimilarityMap`` by simulating a cold start: each class keeps ``COLD_START_EXAMPLES`` training
    examples, and validation queries teach how max cosine to them predicts membership.

    Falls back to the defaults when there is too little data to fit (fewer than two classes or no
    validation queries).
    """
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(y_train == c))[:COLD_START_EXAMPLES] for c in range(n_classes)]
    classes = [c for c in range(n_classes) if len(picked[c])]
    if len(classes) < 2 or len(y_val) == 0:
        return SimilarityMap()
    sims = np.stack([(x_val @ x_train[picked[c]].T).max(axis=1) for c in classes], axis=1).ravel()
    member = np.stack([y_val == c for c in classes], axis=1).ravel()
    slope, intercept = _fit_1d_logistic(sims, member.astype(np.float64))
    if not slope > 0:  # similarity carries no signal here; keep the defaults rather than invert them
        return SimilarityMap()
    return SimilarityMap(slope=float(slope), midpoint=float(-intercept / slope))


def _fit_1d_logistic(s: np.ndarray, y: np.ndarray, steps: int = 200) -> tuple[float, float]:
    """Maximum-likelihood ``(slope, intercept)`` by Newton's method; 1-D, so no solver dependency."""
    w = np.array([1.0, 0.0])
    design = np.stack([s, np.ones_like(s)], axis=1)
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-np.clip(design @ w, -30, 30)))
        grad = design.T @ (p - y)
        hess = design.T @ (design * (p * (1 - p))[:, None]) + 1e-6 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return float(w[0]), float(w[1])
