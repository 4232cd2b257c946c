"""Cold start and modularity: routing over the config's experts, not only the ones a gate was trained on.

A trained gate scores the experts of its artifact. The config may differ from it, and neither change needs
retraining:

- An expert **removed** from the config loses its column; the remaining columns are renormalised to sum to 1.
- An expert **added** to the config (or one the artifact holds without training data) is routable from its
  ``examples`` alone. Its *claim* on a query is ``r = sigmoid(w_s * s + w_t * t + b)``: ``s`` is the query's
  highest cosine to one of the expert's examples, ``t`` its highest cosine to a trained expert's example, and
  ``(w_s, w_t, b)`` depend on how many examples the expert has (``ClaimMap``). The claims are combined as
  independent events: with probability ``R = 1 - prod(1 - r_j)`` some new expert owns the query, and that mass
  is shared in proportion to ``r_j``; the trained experts' distribution is scaled by ``1 - R``. Rows still sum to
  1, so top-k policies apply as before.

  A label gate fits the map as it trains (``fit_claim_map``) by simulating cold starts on its own data: each
  trained expert in turn plays the newcomer, with ``n`` of its examples, and is left out of ``t``; queries held
  out of training say how ``(s, t)`` predict that they are the newcomer's. Both features matter. With ``s`` alone
  (the map older artifacts hold, ``SimilarityMap``), a query of a trained expert that happens to lie near one of
  the newcomer's examples was taken from it, although a trained example lies nearer still; and the map is fitted
  per example count because a maximum over more examples runs higher, so a map fitted with 5 examples made an
  expert with 10 claim too much.

  For the same reason a trained expert with few examples has its ``t`` lifted (``_offsets``, by expert in
  ``gate.json``'s ``cold_start_offsets``): its queries lie farther from its few examples than a large expert's
  from its many, and would look like nobody's. The lift is the difference, measured in the same simulations,
  between how near a large expert's own queries come to its examples and how near a newcomer's come to that many;
  the fit sees the lifted ``t`` too.

  Outcome gates, whose examples are queries every expert was scored on rather than an expert's own, keep the
  ``s``-only map.
- The abstain (``Gate.ood_scores``) judges a query routed to a newcomer by how near the newcomer's examples it
  lies, against the grid of how near them the newcomer's own queries lay in the same simulations
  (``ClaimMap.familiar``): against the trained data's nearest-example grid, which thousands of examples set,
  most of a newcomer's queries, near only a handful of examples, were abstained on. The price: an out-of-scope
  query the newcomer claims is judged by the same grid, and more of them are served to it.
- An expert with neither training data in the artifact nor examples in the config cannot be scored at all;
  ``plan_columns`` refuses it with ``GateArtifactMismatch``, naming it.

Max cosine rather than the centroid: a handful of examples often covers several phrasings or sub-topics, and
the centroid of unrelated examples lies near none of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["ClaimMap", "ColdStart", "Columns", "SimilarityMap", "fit_claim_map", "fit_similarity_map",
           "plan_columns"]

# Used when a gate has no labelled validation data to fit the map on (outcome gates). Measured with
# ``fit_similarity_map`` on label gates (5 examples per expert): SNIPS 7 intents (15.5, 0.41) and CLINC150 10
# domains (12.8, 0.43), both with the ONNX MiniLM encoder at 256 tokens.
DEFAULT_SLOPE, DEFAULT_MIDPOINT = 14.0, 0.42
COLD_START_EXAMPLES = 5  # examples per expert when simulating a cold start to fit the s-only map

# ``fit_claim_map``: the example counts it fits a row for (an expert with n examples uses the row of the largest
# count <= n), how many (newcomer, draw of its examples) simulations each row is fitted on, at most how many
# queries each simulation scores, and how many draws of one newcomer's examples at most.
CLAIM_COUNTS = (1, 2, 3, 5, 8, 13, 20, 32)
CLAIM_SIMULATIONS = 30
CLAIM_QUERIES = 2000
CLAIM_DRAWS = 3
_RIDGE = 1.0  # on the summed log-loss: keeps the fit finite where a small sample separates perfectly
_SAME = 1.0 - 1e-5  # a cosine this high is the same text (a copy of an example), left out with it


@dataclass(frozen=True)
class SimilarityMap:
    """``r = sigmoid(slope * (s - midpoint))``: the probability a query with max cosine ``s`` is the expert's."""

    slope: float = DEFAULT_SLOPE
    midpoint: float = DEFAULT_MIDPOINT

    def __call__(self, s: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.slope * (s - self.midpoint)))


@dataclass(frozen=True)
class ClaimMap:
    """Per example count, ``(w_s, w_t, bias)`` of ``r = sigmoid(w_s * s + w_t * t + bias)`` (module docstring).

    ``rows`` are ``(count, w_s, w_t, bias)`` by ascending count; an expert with ``n`` examples uses the row of the
    largest count <= ``n`` (the first row below every count). ``w_t == 0`` everywhere: ``t`` is not needed."""

    rows: tuple[tuple[int, float, float, float], ...]
    # Per row, the sorted percentile grid of ``s`` over the newcomer's own queries in the simulations: how near its
    # examples its queries lie, which the abstain judges a query routed to it by (``Gate.ood_scores``). None: the
    # trained data's grid judges every query.
    familiar: tuple[tuple[float, ...], ...] | None = None

    def __post_init__(self) -> None:
        counts = [r[0] for r in self.rows]
        if not self.rows or counts != sorted(set(counts)) or counts[0] < 1:
            raise ValueError(f"a claim map needs rows by strictly ascending example count >= 1, got {counts}")
        if not all(np.isfinite(r[1:]).all() for r in self.rows):
            raise ValueError("a claim map's weights must be finite")
        if self.familiar is not None and (
                len(self.familiar) != len(self.rows)
                or not all(len(g) and np.isfinite(g).all() and (np.diff(g) >= 0).all() for g in self.familiar)):
            raise ValueError("a claim map's familiarity grids must be one per row, each finite and ascending")

    @classmethod
    def from_similarity(cls, similarity: SimilarityMap) -> ClaimMap:
        """The ``s``-only map: the same for every count, ``t`` unused."""
        return cls(((1, similarity.slope, 0.0, -similarity.slope * similarity.midpoint),))

    @classmethod
    def from_list(cls, rows: Sequence[Sequence[float]],
                  familiar: Sequence[Sequence[float]] | None = None) -> ClaimMap:
        """A fitted map from ``as_list``'s and ``familiar``'s forms (``gate.json``); ``ValueError`` names what is
        wrong. A fitted map's similarity weights are positive (``fit_claim_map`` keeps no other row)."""
        def numbers(row: Any, what: str) -> list[float]:
            if not isinstance(row, list | tuple) or not all(
                    isinstance(v, int | float) and not isinstance(v, bool) for v in row):
                raise ValueError(f"each {what} must be a list of numbers, got {row!r}")
            return [float(v) for v in row]

        parsed = [numbers(r, "claim map row") for r in rows]
        if not all(len(r) == 4 for r in parsed):
            raise ValueError("each claim map row needs 4 numbers: count, w_s, w_t, bias")
        if not all(np.isfinite(r[0]) and r[0] == int(r[0]) for r in parsed):
            raise ValueError("a claim map row's example count must be a whole number")
        if not all(r[1] > 0 for r in parsed):
            raise ValueError("a claim map's similarity weights must be positive")
        return cls(tuple((int(r[0]), r[1], r[2], r[3]) for r in parsed),
                   None if familiar is None else tuple(tuple(numbers(g, "familiarity grid")) for g in familiar))

    def as_list(self) -> list[list[float]]:
        return [list(r) for r in self.rows]

    def _row(self, count: int) -> int:
        """The row an expert with ``count`` examples uses: the largest count <= ``count``, else the first."""
        return max(0, int(np.searchsorted([r[0] for r in self.rows], count, side="right")) - 1)

    @property
    def reads_trained(self) -> bool:
        """Whether claims need ``t``, the query's cosine to the nearest trained example."""
        return any(r[2] != 0.0 for r in self.rows)

    def weights(self, count: int) -> tuple[float, float, float]:
        """``(w_s, w_t, bias)`` for an expert with ``count`` examples."""
        return self.rows[self._row(count)][1:]

    def familiar_grid(self, count: int) -> tuple[float, ...] | None:
        """The grid of ``s`` its own queries reach, for an expert with ``count`` examples (None: not fitted)."""
        return None if self.familiar is None else self.familiar[self._row(count)]

    def __call__(self, s: np.ndarray, t: np.ndarray | None, count: int) -> np.ndarray:
        w_s, w_t, bias = self.weights(count)
        z = w_s * np.asarray(s, dtype=np.float64) + bias
        if w_t:
            if t is None:
                raise ValueError("this claim map reads the cosine to the nearest trained example; pass it")
            z = z + w_t * np.asarray(t, dtype=np.float64)
        return 1.0 / (1.0 + np.exp(-np.clip(z, -30.0, 30.0)))


@dataclass(frozen=True)
class ColdStart:
    """The examples of experts scored by similarity: ``embeddings [n, dim]``, ``owner [n]`` (0..len(names)-1)."""

    names: list[str]
    embeddings: np.ndarray
    owner: np.ndarray
    claim_map: ClaimMap
    # The examples of routed trained experts whose ``t`` is lifted (``cold_start_offsets``), and each one's lift.
    lifted: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def counts(self) -> np.ndarray:
        """Each expert's number of examples."""
        return np.bincount(self.owner, minlength=len(self.names))

    def similarities(self, x: np.ndarray) -> np.ndarray:
        """``[q, len(names)]``: ``s``, each query's highest cosine to one of each expert's examples."""
        sims = np.asarray(x, dtype=np.float32) @ self.embeddings.T  # [q, n]
        return np.stack([sims[:, self.owner == j].max(axis=1) for j in range(len(self.names))], axis=1)

    def claims(self, x: np.ndarray, trained_similarity: np.ndarray | None = None) -> np.ndarray:
        """``[q, len(names)]``: each expert's claim ``r`` on each query. ``trained_similarity`` (``t``, per query)
        is needed where ``claim_map.reads_trained``."""
        s = self.similarities(x)
        if trained_similarity is not None and self.lifted is not None:
            examples, lift = self.lifted
            raised = (np.asarray(x, dtype=np.float32) @ examples.T + lift).max(axis=1)
            trained_similarity = np.maximum(trained_similarity, raised)
        return np.stack([self.claim_map(s[:, j], trained_similarity, int(n)) for j, n in enumerate(self.counts)],
                        axis=1)


@dataclass(frozen=True)
class Columns:
    """How the routable experts (config order) map onto the artifact's columns, or onto ``cold``."""

    experts: list[str]
    source: np.ndarray  # [len(experts)]: artifact column, or -1 - j for cold-start expert j
    cold: ColdStart | None = None

    @property
    def reads_trained(self) -> bool:
        """Whether ``apply`` needs the queries' cosine to the nearest trained example."""
        return self.cold is not None and self.cold.claim_map.reads_trained

    def familiarity_top(self, artifact_proba: np.ndarray, proba: np.ndarray) -> np.ndarray:
        """Per query, the top probability the gate's familiarity grid judges (``Gate.ood_scores``): the artifact's
        own probability for the kept trained experts, before the view renormalises them (with one expert kept, that
        renormalised probability is 1 for every query, and nothing would be out of scope), or a cold-start
        expert's probability (``proba``, the view's rows), whichever is larger."""
        kept = self.source[self.source >= 0]
        top = artifact_proba[:, kept].max(axis=1) if len(kept) else np.zeros(len(proba))
        cold = proba[:, self.source < 0]
        return np.maximum(top, cold.max(axis=1)) if cold.shape[1] else top

    def apply(self, artifact_proba: np.ndarray, x: np.ndarray,
              trained_similarity: np.ndarray | None = None) -> np.ndarray:
        """Rows over ``experts`` from rows over the artifact's trained experts (each summing to 1).
        ``trained_similarity``: each query's cosine to the nearest example of a routed trained expert, needed
        where ``reads_trained``."""
        kept = self.source[self.source >= 0]
        out = np.zeros((len(x), len(self.experts)), dtype=np.float64)
        trained = artifact_proba[:, kept]
        total = trained.sum(axis=1, keepdims=True)
        # Dropping experts renormalises the rest; when every kept column is ~0, share evenly.
        trained = np.where(total > 1e-12, trained / np.maximum(total, 1e-12), 1.0 / max(len(kept), 1))
        if self.cold is None:
            out[:, self.source >= 0] = trained
            return out
        r = np.clip(self.cold.claims(x, trained_similarity), 1e-9, 1.0 - 1e-9)
        owned = 1.0 - np.exp(np.log1p(-r).sum(axis=1, keepdims=True))  # P(some new expert owns the query)
        cold_cols = np.flatnonzero(self.source < 0)
        out[:, cold_cols] = owned * r[:, -1 - self.source[cold_cols]] / r[:, -1 - self.source[cold_cols]].sum(
            axis=1, keepdims=True)
        out[:, self.source >= 0] = trained * (1.0 - owned) if len(kept) else 0.0
        return out / out.sum(axis=1, keepdims=True)


def plan_columns(artifact_experts: Sequence[str], trained: Sequence[str], wanted: Mapping[str, np.ndarray],
                 claim_map: ClaimMap, lifted: tuple[np.ndarray, np.ndarray] | None = None) -> Columns:
    """Columns for the experts in ``wanted`` (name -> its example embeddings, in config order).

    ``trained`` are the artifact experts with training data. Any other wanted expert is scored from its
    examples; one without examples raises ``GateArtifactMismatch``. ``lifted``: the examples of routed trained
    experts whose ``t`` is lifted, and each example's lift (``ColdStart``).
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
    return Columns(list(wanted), source, ColdStart(cold, embeddings, owner, claim_map, lifted))


def fit_similarity_map(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                       n_classes: int, *, seed: int = 0) -> SimilarityMap:
    """Fit the ``s``-only ``SimilarityMap`` by simulating a cold start: each class keeps ``COLD_START_EXAMPLES``
    training examples, and validation queries teach how max cosine to them predicts membership. (What artifacts
    held before ``fit_claim_map``; still written, for routers that read no other.)

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
    slope, intercept = _fit_logistic(np.stack([sims, np.ones_like(sims)], axis=1), member.astype(np.float64))
    if not slope > 0:  # similarity carries no signal here; keep the defaults rather than invert them
        return SimilarityMap()
    return SimilarityMap(slope=float(slope), midpoint=float(-intercept / slope))


def fit_claim_map(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                  n_classes: int, *, min_held_out: int, seed: int = 0,
                  grid_points: int = 201) -> tuple[ClaimMap | None, np.ndarray]:
    """Fit ``ClaimMap`` by simulating cold starts (module docstring), and each class's offset (``_offsets``).
    The map is None where no row could be fitted (too few classes or queries), and the ``s``-only map serves.

    Each row's simulations deal the classes with at least ``count`` training examples out in turn, up to
    ``CLAIM_SIMULATIONS`` (at most ``CLAIM_DRAWS`` draws of one class's examples). The queries are the validation
    part (at most ``CLAIM_QUERIES``), with the training part the examples; with fewer than ``min_held_out`` of
    them (the gate's calibration rule, ``router.gate_train.MIN_HELD_OUT``), every example is both, its own row
    left out of its similarities. Each row's ``familiar`` grid
    (``grid_points`` quantiles) is of ``s`` over the newcomer's own queries in its simulations."""
    rng = np.random.default_rng(seed)
    x_train, x_val = np.asarray(x_train, dtype=np.float32), np.asarray(x_val, dtype=np.float32)
    y_train, y_val = np.asarray(y_train), np.asarray(y_val)
    leave_self_out = len(y_val) < min_held_out
    if not leave_self_out:
        ref_x, ref_y = x_train, y_train
        queries = rng.permutation(len(y_val))[:CLAIM_QUERIES]
        q_x, q_y, q_self = x_val[queries], y_val[queries], np.full(len(queries), -1)
    else:
        ref_x, ref_y = np.concatenate([x_train, x_val]), np.concatenate([y_train, y_val])
        q_self = rng.permutation(len(ref_y))[:CLAIM_QUERIES]
        q_x, q_y = ref_x[q_self], ref_y[q_self]
    if len(q_y) == 0 or len(np.unique(ref_y)) < 2:
        return None, np.zeros(n_classes)
    nearest = _nearest_per_class(q_x, q_self, ref_x, ref_y, n_classes)  # [q, classes]
    simulated: list[tuple[int, list[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]]] = []
    for count in CLAIM_COUNTS:
        eligible = [c for c in range(n_classes) if (ref_y == c).sum() >= count]
        if len(eligible) < 2:
            break
        runs = [c for _ in range(CLAIM_DRAWS) for c in rng.permutation(eligible)][:CLAIM_SIMULATIONS]
        done = []
        for c in runs:
            picked = rng.choice(np.flatnonzero(ref_y == c), count, replace=False)
            sims = q_x @ ref_x[picked].T
            # A query is never one of the newcomer's own examples, nor a copy of one.
            scored = ~np.isin(q_self, picked) & (sims.max(axis=1) < _SAME) if leave_self_out \
                else np.ones(len(q_y), dtype=bool)
            mine = q_y[scored] == c
            # Where its examples were taken out of the queries, its remaining queries stand for all of them: the
            # newcomer keeps its share of the queries (a handful of examples per class would otherwise leave it
            # few or none, and the fit would learn that it never owns a query).
            weight = np.where(mine, (q_y == c).sum() / max(mine.sum(), 1), 1.0)
            done.append((c, scored, sims[scored].max(axis=1), mine, weight))
        simulated.append((count, done))
    own = {count: np.concatenate([s[mine] for _, _, s, mine, _ in done]) for count, done in simulated}
    offsets = _offsets(nearest, q_y, np.bincount(np.concatenate([y_train, y_val]), minlength=n_classes),
                       {count: float(np.median(s)) for count, s in own.items() if len(s)})
    # t for a newcomer c: the nearest example of any other class, lifted by its offset (the two largest serve
    # every c).
    lifted = np.where(nearest > -1.0, nearest + offsets, nearest)
    order = np.argsort(-lifted, axis=1)[:, :2]
    first, second = np.take_along_axis(lifted, order, axis=1).T
    rows, grids = [], []
    for count, done in simulated:
        y = np.concatenate([mine for *_, mine, _ in done]).astype(np.float64)
        if min(y.sum(), len(y) - y.sum()) < 5:
            continue
        design = np.concatenate([np.stack([s, np.where(order[scored, 0] == c, second[scored], first[scored]),
                                           np.ones_like(s)], axis=1) for c, scored, s, _, _ in done])
        w_s, w_t, bias = _fit_logistic(design.astype(np.float64), y, ridge=_RIDGE,
                                       weights=np.concatenate([w for *_, w in done]))
        if w_s > 0 and np.isfinite([w_s, w_t, bias]).all():
            rows.append((count, float(w_s), float(w_t), float(bias)))
            grids.append(tuple(np.quantile(own[count], np.linspace(0.0, 1.0, grid_points)).tolist()))
    return (ClaimMap(tuple(rows), tuple(grids)) if rows else None), offsets


def _offsets(nearest: np.ndarray, q_y: np.ndarray, sizes: np.ndarray, own_median: Mapping[int, float]) -> np.ndarray:
    """Per class, what lifts ``t`` for it (``gate.json``'s ``cold_start_offsets``): a query's cosine to the
    nearest of a class's few examples runs lower than to the nearest of a large class's many, so a class with
    fewer than the largest simulated count gets the difference between the median a large class's own queries
    reach (``nearest`` at their own class) and the median a newcomer's own queries reached with that many examples
    (``own_median``, by count). Without a large class, the largest count's median stands for it; 0 where there is
    nothing to lift."""
    if not own_median:
        return np.zeros(len(sizes))
    counts = sorted(own_median)
    large = np.isin(q_y, np.flatnonzero(sizes >= CLAIM_COUNTS[-1]))
    reference = float(np.median(nearest[large, q_y[large]])) if large.any() else own_median[counts[-1]]
    out = np.zeros(len(sizes))
    for c, size in enumerate(sizes):
        if 0 < size < CLAIM_COUNTS[-1]:
            reached = own_median[max([n for n in counts if n <= size], default=counts[0])]
            out[c] = max(0.0, reference - reached)
    return out


def _nearest_per_class(q_x: np.ndarray, q_self: np.ndarray, ref_x: np.ndarray, ref_y: np.ndarray,
                       n_classes: int, block: int = 256) -> np.ndarray:
    """``[q, n_classes]``: each query's highest cosine to an example of each class (-1 where it has none),
    leaving out the example ``q_self`` names (-1: none) and that query's copies (cosine ``_SAME`` or more)."""
    by_class = np.argsort(ref_y, kind="stable")
    sorted_x, sorted_y = ref_x[by_class], ref_y[by_class]
    classes, starts = np.unique(sorted_y, return_index=True)
    position = np.empty(len(by_class), dtype=np.int64)
    position[by_class] = np.arange(len(by_class))
    out = np.full((len(q_x), n_classes), -1.0, dtype=np.float64)
    for lo in range(0, len(q_x), block):
        sims = q_x[lo:lo + block] @ sorted_x.T
        own = q_self[lo:lo + block]
        hit = np.flatnonzero(own >= 0)
        sims[hit, position[own[hit]]] = -np.inf
        if len(hit):  # and its copies: a repeated text is not a neighbour that tells its class
            sims[hit] = np.where(sims[hit] >= _SAME, -np.inf, sims[hit])
        out[lo:lo + block, classes] = np.maximum(np.maximum.reduceat(sims, starts, axis=1), -1.0)
    return out


def _fit_logistic(features: np.ndarray, y: np.ndarray, *, ridge: float = 0.0, steps: int = 200,
                  weights: np.ndarray | None = None) -> np.ndarray:
    """Maximum-likelihood weights of a logistic regression on ``features`` (the last column the intercept, never
    penalised; the others by ``ridge / 2 * w**2`` on the summed log-loss, each row's loss times its ``weights``),
    by Newton's method: a few weights, so no solver dependency."""
    w = np.zeros(features.shape[1])
    w[0] = 1.0
    penalty = np.full(len(w), ridge)
    penalty[-1] = 0.0
    weights = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=np.float64)
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-np.clip(features @ w, -30, 30)))
        grad = features.T @ (weights * (p - y)) + penalty * w
        hess = features.T @ (features * (weights * p * (1 - p))[:, None]) + np.diag(penalty) + 1e-6 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w
