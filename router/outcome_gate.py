"""The outcome gate: route by each expert's predicted chance of success, traded against its cost.

For a query ``x`` and expert ``e``::

    success(x)[e]  = the success model's probability (router.outcome)
    utility(x)[e]  = success(x)[e] - cost_weight * cost[e] / cost_scale
    logits(x)[e]   = utility(x)[e] + margin * [e == anchor]
    predict_proba  = softmax(logits / temperature)

- ``cost[e]`` is the mean recorded cost per query of ``e`` in the training records; an expert with no recorded
  cost takes its config price (``input_per_1k + output_per_1k``, a nominal 1k-in/1k-out call) when the gate
  is trained or served from a config (``moe train``, ``for_config``: both price it alike), else 0.
  ``cost_scale`` is the largest ``cost[e]``, so normalised costs lie in [0, 1] and ``cost_weight`` (lambda,
  ``gate.cost_weight`` in the config) reads as "how much success probability the priciest expert's cost is
  worth". 0 routes on quality alone.
- ``anchor`` is the expert with the best *prior* utility (overall success rate minus its cost term): the
  best single expert at this cost weight. Another expert wins top-1 only if its predicted utility beats the
  anchor's by more than ``margin``. Per-expert success estimates are noisy; the raw argmax over 31 of them
  picks whichever is overestimated and loses to always asking the best single expert. The margin is the
  value that maximises realised utility (outcome minus cost term) of top-1 routing on out-of-fold
  predictions over the training records (a pick of an expert with no record for the query earns nothing),
  so it is 0 where the predictions are good and large where they are noise.
- ``temperature`` is fitted (NLL, as for the label gate) on the same out-of-fold predictions, with the
  *best* expert of each record by quality as the target (its recorded outcome; ties, every expert that
  answered right, go to the expert the gate ranks higher). So at cost weight 0 a top weight of 0.7 means that
  about 70% of such queries are answered right by that expert. With a cost weight the logits carry the cost
  term and the anchor's margin, which one temperature cannot map onto that chance: the weights rank experts by
  utility and are calibrated only roughly (on RouterBench's test split, ECE 0.03 at 0, 0.16 at 0.2, 0.34 at 2).
  ``metadata.metrics`` reports ECE before and after, at the trained cost weight.

Out-of-fold predictions come from 5 folds keyed by a hash of the query text (copies stay in one fold). For the
kNN success model they also choose its neighbourhood ``k`` and shrinkage ``alpha`` (``KNN_GRID``), and, where
the records name tasks (``"task"``: the query's task or domain), whether to shrink toward each expert's overall success
rate or toward the query's task prior (``router.outcome.TaskPrior``, its classifier and rates fitted per fold
on the other folds): the setting whose top-1 routing, at its own tuned margin, realises the most utility. The
final success model is then fitted on every record (``gate.json``'s ``success_model`` says which it is). The
out-of-fold predictions are kept in the artifact (``cal_*`` arrays), so ``with_cost_weight`` re-tunes margin and
temperature for another lambda without retraining.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from router.encoders import Encoder
from router.gate import (
    FORMAT_VERSION,
    OOD_KEEP,
    TASK_PRIOR_FORMAT_VERSION,
    Gate,
    GateMetadata,
    ValidationMetrics,
    _softmax,
    embed_texts,
    expected_calibration_error,
    nearest_similarity,
)
from router.gate_train import fit_top_temperature
from router.outcome import (
    PRIOR_RECORDS,
    SUCCESS_MODELS,
    TASK_MIN_RECORDS,
    KnnSuccess,
    OutcomeRecord,
    SuccessModel,
    TaskPrior,
    outcome_matrices,
    success_prior,
)

if TYPE_CHECKING:
    from router.config import RouterConfig

__all__ = ["MARGINS", "OutcomeGate", "Tuning", "config_prices", "outcome_data_sha256", "train_outcome_gate", "tune"]

log = logging.getLogger(__name__)

FOLDS = 5
# (k, alpha) settings of the kNN success model that training chooses among, out of fold, smoothest first. No k
# below 25: where prompts embed almost alike (RouterBench's Winogrande prompts open with the same few-shot
# examples), a handful of training queries are every test query's nearest, so one small neighbourhood decides a
# whole task. Out of fold, each fold has its own such hubs and the risk does not show: k = 10 scored 0.881 out
# of fold on RouterBench and sent all 380 Winogrande test queries to claude-v1 (0.57 there against GPT-4's
# 0.86), 0.761 on test against 0.874 for every k >= 25.
# Shrinkage from 3 pseudo-neighbours to infinitely many (the prior alone, which for the overall prior is always
# the anchor). Toward a task prior the best settings lean on the prior: on MMLU-Pro each category's rates,
# estimated from hundreds of questions, beat any 25-100 neighbours' rates, and out of fold the grid's largest
# finite shrinkage won each time the grid was widened (30, then 300, then 1,000).
KNN_GRID = tuple((k, alpha) for k in (100, 50, 25) for alpha in (math.inf, 1000.0, 300.0, 100.0, 30.0, 10.0, 3.0))
PRIORS = ("overall", "task")  # what kNN estimates are shrunk toward: each expert's overall rate, or TaskPrior
# How many standard errors of the per-record gain, out of fold, the task prior must win by to be kept.
TASK_PRIOR_Z = 2.0
# Candidate margins, in success-probability units; "always the anchor" is added per cost weight.
MARGINS = (0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2, 0.3)


@dataclass(frozen=True)
class Tuning:
    cost_weight: float
    anchor: int
    margin: float
    temperature: float
    metrics: dict[str, float | None]


def _with_margin(utility: np.ndarray, anchor: int, margin: float) -> np.ndarray:
    """The routing logits: ``utility`` [n, m] with ``margin`` added to the anchor's column (a copy)."""
    logits = utility.copy()
    logits[:, anchor] += margin
    return logits


def _earnings(outcomes: np.ndarray, penalty: np.ndarray) -> np.ndarray:
    """``[n, m]`` what picking each expert earns on each record: its outcome (0 where it has no record, as the
    evaluation scores it) less its cost term."""
    return np.where(np.isnan(outcomes), 0.0, outcomes) - penalty


def _ood_threshold(x: np.ndarray, folds: np.ndarray, keep: float = OOD_KEEP) -> float | None:
    """The abstain threshold: the nearest-example cosine that ``keep`` of the queries reach against the other folds'
    (each fold's against the rest, pooled). It was fitted on the first fold alone, some sixty queries of a few
    hundred, whose 3% quantile swung with the fold's task mix: one such gate abstained on 13% of held-out queries.
    None where no fold holds some but not all of them."""
    pooled = [nearest_similarity(x[folds != f], x[folds == f]) for f in range(FOLDS)
              if (folds == f).any() and not (folds == f).all()]
    return float(np.quantile(np.concatenate(pooled), 1.0 - keep)) if pooled else None


def _realised(outcomes: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Recorded outcomes, with the model's prediction standing in where a record is missing."""
    return np.where(np.isnan(outcomes), predicted, outcomes)


def tune(success: np.ndarray, outcomes: np.ndarray, record_costs: np.ndarray, cost: np.ndarray,
         cost_weight: float) -> Tuning:
    """Anchor, margin and temperature for ``cost_weight`` from out-of-fold ``success`` [n, m] and the
    records' ``outcomes`` and ``record_costs`` [n, m] (NaN = none); ``cost`` [m] is normalised."""
    penalty = cost_weight * cost
    # What a pick is worth when choosing the margin: an expert with no record for the query earns nothing, as
    # the evaluation scores it; crediting its predicted success instead rewarded routing to experts whose
    # answers were never observed there.
    earned = _earnings(outcomes, penalty)
    # The anchor is the expert the gate falls back on, so it is chosen by what the records make sure of: its
    # success shrunk toward the pooled rate, less one standard error. An expert with three lucky records has a
    # high estimate but a wide error, and is not the anchor; experts with thousands of records each keep their
    # order. Picks of other experts must then beat it by the margin, and a pick no record backs earns nothing.
    # The anchor answers every query its margin does not hand on, those its records never covered included, where
    # the evaluation counts it wrong: so its rate counts only the share of queries it was scored on. An expert
    # measured on one task (0.90 there) is not the anchor over one measured on all (0.88): it took the others'
    # queries untried (out-of-fold accuracy 0.64 against 0.88). Experts scored on every query keep their order.
    prior = success_prior(outcomes)
    counts = (~np.isnan(outcomes)).sum(axis=0)
    coverage = counts / max(len(outcomes), 1)
    anchor = int(np.argmax(prior * coverage - np.sqrt(prior * (1.0 - prior) / (counts + PRIOR_RECORDS)) - penalty))
    utility = success - penalty
    rows = np.arange(len(success))
    always = 1.0 + cost_weight + 1e-6  # no gain over the anchor can exceed this: always the anchor
    best_margin, best_value = always, -np.inf
    for margin in (always, *reversed(MARGINS)):  # ties keep the larger, more conservative margin
        value = float(earned[rows, _with_margin(utility, anchor, margin).argmax(axis=1)].mean())
        if value > best_value + 1e-12:
            best_margin, best_value = margin, value
    logits = _with_margin(utility, anchor, best_margin)
    # Target: the best expert in hindsight by quality; among ties (every expert that answered right, or every
    # expert where none did), the one the gate ranks highest. The top probability is then the chance that no other
    # expert would do better than the pick (it answers right, or none does), which is what the adaptive and mass
    # panels size on: more experts cannot help where none is right. By utility (cost counted), the target was the
    # cheapest expert that answered right, which a gate anchored on a dear expert seldom picks: the fit flattened
    # every probability (the temperature at its bound), and panels took every expert as cost_weight rose.
    quality = _realised(outcomes, success)
    target = np.where(quality >= quality.max(axis=1, keepdims=True) - 1e-9, logits, -np.inf).argmax(axis=1)
    chosen = logits.argmax(axis=1)
    # Fitted to the top weight alone (``fit_top_temperature``): fitting the whole softmax to one target per query
    # (NLL) asked mass for one expert of the many that answered right (13 of 31 LLMs on an average MMLU-Pro
    # question), which left a top weight of 0.45 where the pick was no worse than the rest 0.77 of the time (ECE
    # 0.32), and mass and adaptive panels took four or five experts a query.
    # The bound grows with the utility's scale (the margin alone reaches 1 + cost_weight): a fixed 10 held the
    # temperature at its bound from a cost weight of about 25, and the weights went to 1 (ECE 0.38).
    temperature = fit_top_temperature(logits, chosen == target, lo=1e-3, hi=10.0 * (1.0 + cost_weight))
    # Scored as the evaluation scores them: a pick (or a single expert) with no record for a query is wrong.
    scored = np.where(np.isnan(outcomes), 0.0, outcomes)
    # A mean over the picks that have a recorded cost would be the cost of those experts alone (say 1.0, where
    # 6 of 7 picks went to an expert with none): the routed cost is reported only when every pick has one.
    picked_costs = record_costs[rows, chosen]
    uncosted = np.isnan(picked_costs)
    metrics = {
        "routed_utility": best_value,
        "routed_accuracy": float(scored[rows, chosen].mean()),
        "unrecorded_pick_share": float(np.isnan(outcomes[rows, chosen]).mean()),
        "routed_cost": None if uncosted.any() else _mean_known(picked_costs),
        "uncosted_pick_share": float(uncosted.mean()),
        "best_single_accuracy": float(scored.mean(axis=0).max()),
        "oracle_accuracy": float(np.nanmax(np.where(np.isnan(outcomes), 0.0, outcomes), axis=1).mean()),
        "ece_before": expected_calibration_error(_softmax(logits), target),
        "ece_after": expected_calibration_error(_softmax(logits / temperature), target),
    }
    return Tuning(cost_weight, anchor, best_margin, temperature, metrics)


def _warn_thin_data(experts: Sequence[str], outcomes: np.ndarray, record_costs: np.ndarray,
                    cost_weight: float, prices: Mapping[str, float]) -> None:
    """Say which experts the records say little about: few records next to the others (their success leans on
    the pooled rate, ``router.outcome.PRIOR_RECORDS``), or, when cost counts, no recorded cost (they take their
    config price from ``prices``, and count as free without one)."""
    counts = (~np.isnan(outcomes)).sum(axis=0)
    thin = [f"{e} ({n})" for e, n in zip(experts, counts, strict=True) if n < min(PRIOR_RECORDS, counts.max() / 4)]
    if thin:
        log.warning("outcome records: few records for %s, against up to %d for the others; their success "
                    "estimates lean on the pooled success rate", ", ".join(thin), counts.max())
    if cost_weight > 0:
        unpriced = [e for e, c in zip(experts, (~np.isnan(record_costs)).sum(axis=0), strict=True) if c == 0]
        free = [e for e in unpriced if not prices.get(e)]
        if free:
            log.warning("outcome records: no recorded cost for %s, so with cost_weight %.3g the gate counts "
                        "them as free; record a cost for them, or give them a config price", ", ".join(free),
                        cost_weight)
        if len(free) < len(unpriced):
            log.info("outcome records: no recorded cost for %s; the gate takes their config price (cost.input_per_1k "
                     "+ cost.output_per_1k) as their cost per query", ", ".join(e for e in unpriced if e not in free))


def config_prices(config: RouterConfig) -> dict[str, float]:
    """Each config expert's price for a nominal call of 1k tokens in and 1k out: what an expert that no outcome
    record gives a cost for costs, in training (``train_outcome_gate``) and in serving alike."""
    return {e.name: e.cost.input_per_1k + e.cost.output_per_1k for e in config.experts}


def _with_prices(cost: np.ndarray, record_costs: np.ndarray, experts: Sequence[str],
                 prices: Mapping[str, float]) -> np.ndarray:
    """``cost`` [m] with each expert that no record gives a cost for (a NaN column of ``record_costs``) at its
    price in ``prices``, where it has one."""
    unpriced = np.isnan(record_costs).all(axis=0)
    return np.array([prices.get(e, c) if u else c for e, c, u in zip(experts, cost, unpriced, strict=True)],
                    dtype=np.float64)


def _mean_known(values: np.ndarray) -> float | None:
    """The mean of the values that are known (not NaN); None when none is: JSON has no NaN."""
    known = values[~np.isnan(values)]
    return float(_known_means(known)) if known.size else None


def _known_means(values: np.ndarray, axis: int | None = None) -> np.ndarray:
    """The means of the known (not NaN) ``values`` along ``axis``, 0 where none is, without overflow: costs are
    in the user's own unit, so any finite size, and 20 costs of 1e308 summed are infinite. They are summed
    divided by a power of two near the largest (exact, so ordinary costs get the plain mean bit for bit)."""
    known = ~np.isnan(values)
    top = float(np.max(values, where=known, initial=0.0))
    scale = math.ldexp(1.0, math.frexp(top)[1] - 1) if top > 0 else 1.0  # top / scale in [1, 2)
    means = np.where(known, values / scale, 0.0).sum(axis=axis) / np.maximum(known.sum(axis=axis), 1)
    return np.asarray(scale * np.minimum(means, top / scale))  # never above the largest, so never infinite


class OutcomeGate(Gate):
    """A gate over outcome records. ``predict_proba`` as for every gate; ``predict_success`` and
    ``predict_utility`` give the raw per-expert figures behind it (columns follow ``experts``; an expert
    scored only from config examples has no success estimate and reads NaN there)."""

    kind: ClassVar[str] = "outcome"
    EXAMPLES_ARE_EXPERTS_DATA = False  # each example is labelled with the expert that did best on it

    def __init__(self, encoder: Encoder, experts: Sequence[str], model: SuccessModel, cost: np.ndarray,
                 calibration: Mapping[str, np.ndarray], metadata: GateMetadata,
                 examples: tuple[np.ndarray, list[str], list[str]], *, cost_weight: float = 0.0) -> None:
        self._setup(encoder, experts, metadata, examples)
        self.model = model
        self.cost = np.asarray(cost, dtype=np.float64)  # [m] mean cost per query, in the records' unit
        self.calibration = dict(calibration)  # cal_success, cal_outcomes, cal_costs: [n, m] out-of-fold
        self._retune(cost_weight)

    def _retune(self, cost_weight: float) -> None:
        self.cost_scale = _cost_scale(self.cost)
        self.tuning = tune(self.calibration["cal_success"], self.calibration["cal_outcomes"],
                           self.calibration["cal_costs"], self.cost / self.cost_scale, cost_weight)
        self.temperature = self.tuning.temperature

    @property
    def cost_weight(self) -> float:
        return self.tuning.cost_weight

    def with_cost_weight(self, cost_weight: float, prices: Mapping[str, float] | None = None) -> OutcomeGate:
        """A copy routing at another cost weight (margin and temperature re-tuned, no retraining).
        ``prices`` fill in the cost of experts that have no recorded cost."""
        gate = copy.copy(self)
        if prices:
            gate.cost = _with_prices(self.cost, self.calibration["cal_costs"], self.artifact_experts, prices)
        gate._retune(cost_weight)
        return gate

    def for_config(self, config: RouterConfig) -> Gate:
        tuned = self.with_cost_weight(config.gate.cost_weight, config_prices(config))
        return tuned.for_experts(config.routed_examples())

    # -- scores ---------------------------------------------------------------------------------------------
    def _artifact_success(self, x: np.ndarray) -> np.ndarray:
        return self.model.predict(np.atleast_2d(np.asarray(x, dtype=np.float32)))

    def _artifact_utility(self, x: np.ndarray) -> np.ndarray:
        return self._artifact_success(x) - self.cost_weight * self.cost / self.cost_scale

    def _artifact_proba(self, x: np.ndarray, texts: Sequence[str] | None = None) -> np.ndarray:
        logits = _with_margin(self._artifact_utility(x), self.tuning.anchor, self.tuning.margin)
        return _softmax(logits / self.tuning.temperature)

    def _view(self, artifact_rows: np.ndarray) -> np.ndarray:
        if self._columns is None:
            return artifact_rows
        out = np.full((len(artifact_rows), len(self.experts)), np.nan)
        src = self._columns.source
        out[:, src >= 0] = artifact_rows[:, src[src >= 0]]
        return out

    def task_probabilities(self, embeddings: np.ndarray, top: int = 3) -> list[dict[str, float]] | None:
        """Per query, its ``top`` likeliest tasks and their probabilities under the success model's task prior,
        the prior its success estimates lean on (``router.outcome.TaskPrior``); None without a task prior."""
        model = self.model
        if not isinstance(model, KnnSuccess) or model.task_prior is None:
            return None
        prior = model.task_prior
        x = np.atleast_2d(np.asarray(embeddings, dtype=np.float32))
        proba = prior.task_proba(x, model.x, model.neighbours(x, min(TaskPrior.VOTERS, len(model.x))))
        order = np.argsort(-proba, axis=1, kind="stable")[:, :top]
        return [{prior.tasks[j]: round(float(row[j]), 4) for j in picks}
                for row, picks in zip(proba, order, strict=True)]

    def predict_success(self, embeddings: np.ndarray) -> np.ndarray:
        """``[q, len(experts)]`` each expert's predicted chance of success."""
        return self._view(self._artifact_success(embeddings))

    def predict_utility(self, embeddings: np.ndarray) -> np.ndarray:
        """``[q, len(experts)]`` success minus ``cost_weight`` times normalised cost (before the margin)."""
        return self._view(self._artifact_utility(embeddings))

    # -- artifacts ------------------------------------------------------------------------------------------
    def _weights(self) -> dict[str, np.ndarray]:
        model = {f"model_{k}": v for k, v in self.model.arrays().items()}
        return {**model, **self.calibration, "cost": self.cost}

    def _manifest(self) -> dict[str, Any]:
        return self.settings()

    def settings(self) -> dict[str, Any]:
        """What training chose, as ``gate.json`` records it: cost weight, anchor, margin, temperature and the
        success model (its kind, and for ``knn`` its ``k``, ``alpha`` and prior: ``overall`` or ``task``)."""
        success: dict[str, Any] = {"kind": self.model.kind}
        if isinstance(self.model, KnnSuccess):  # what out-of-fold tuning chose, for the reader of gate.json
            prior = self.model.task_prior
            alpha = float(self.model.alpha)
            success |= {"k": int(self.model.k), "alpha": "inf" if math.isinf(alpha) else alpha,
                        "prior": "task" if prior is not None else "overall",
                        **({"tasks": list(prior.tasks)} if prior is not None else {})}
        return {"cost_weight": self.cost_weight, "margin": self.tuning.margin, "temperature": self.temperature,
                "anchor": self.artifact_experts[self.tuning.anchor], "success_model": success}

    @classmethod
    def _restore(cls, encoder: Encoder, experts: list[str], doc: dict[str, Any], metadata: GateMetadata,
                 weights: dict[str, np.ndarray], examples: tuple[np.ndarray, list[str], list[str]]) -> Gate:
        model = SUCCESS_MODELS[metadata.classifier].from_arrays(
            {k.removeprefix("model_"): v for k, v in weights.items() if k.startswith("model_")})
        calibration = {k: v for k, v in weights.items() if k.startswith("cal_")}
        return cls(encoder, experts, model, weights["cost"], calibration, metadata, examples,
                   cost_weight=float(doc["cost_weight"]))


# --- training ---------------------------------------------------------------------------------------------

def outcome_data_sha256(records: Sequence[OutcomeRecord]) -> str:
    """Order-independent fingerprint of outcome records (a task counts where a record has one)."""
    lines = sorted(json.dumps([r.query, sorted(r.outcomes.items()), sorted(r.cost.items())]
                              + ([r.task] if r.task is not None else []), ensure_ascii=False)
                   for r in records)
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def _scored_costs(records: Sequence[OutcomeRecord], experts: Sequence[str]) -> Sequence[OutcomeRecord]:
    """``records`` without the costs of experts outside ``experts`` (no record scores them, or ``unknown`` in
    ``train_outcome_gate`` would have refused them): with no score to weigh it against, a cost trains nothing,
    and such an expert is routed from its config examples, if any (``router.coldstart``). Training says so."""
    columns = set(experts)
    unscored = sorted({e for r in records for e in r.cost} - columns)
    if not unscored:
        return records
    log.warning("outcome records: a cost but no score ('outcomes') for %s; the cost is left out (an expert "
                "without scores is routed from its config examples)", ", ".join(unscored))
    return [dataclasses.replace(r, cost={e: c for e, c in r.cost.items() if e in columns}) for r in records]


def _folds(texts: Sequence[str], seed: int) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.sha256(f"{seed}\x00{t}".encode()).digest()[:8], "big") % FOLDS
                     for t in texts])


def _cost_scale(cost: np.ndarray) -> float:
    """What costs are divided by so they lie in [0, 1]: the largest expert's mean cost (1 when none costs)."""
    scale = float(cost.max())
    return scale if scale > 0 else 1.0


class _KnnOutOfFold:
    """Each fold's nearest queries among the other folds, searched once at the widest ``k``, and the
    out-of-fold ``[n, m]`` success rates any narrower ``k`` and shrinkage give (``k`` is cut to the smallest
    training part). With ``tasks``, each fold also gets the task prior fitted on the other folds."""

    def __init__(self, x: np.ndarray, outcomes: np.ndarray, folds: np.ndarray, k: int,
                 tasks: Sequence[str | None] | None = None, seed: int = 0, progress: bool = False) -> None:
        from tqdm.auto import tqdm

        self.k = min(k, *(int((folds != f).sum()) for f in range(FOLDS)))
        self.folds, self.shape = folds, outcomes.shape
        self.parts = []
        self.task_priors: list[np.ndarray] | None = [] if tasks is not None else None
        for f in tqdm(range(FOLDS), desc="success model, out of fold", unit="fold", disable=not progress):
            fold_model = KnnSuccess(self.k)
            fold_model.fit(x[folds != f], outcomes[folds != f])
            self.parts.append((fold_model, fold_model.neighbours(x[folds == f], self.k)))
            if self.task_priors is not None and tasks is not None:
                rest = np.flatnonzero(folds != f)
                prior = TaskPrior.fit(x[rest], [tasks[int(i)] for i in rest], outcomes[rest], seed=seed)
                if prior is None:  # the other folds hold one task only: no task prior to choose
                    self.task_priors = None
                else:
                    self.task_priors.append(prior.predict(x[folds == f], fold_model.x, self.parts[-1][1]))

    def success(self, k: int, alpha: float, prior: str = "overall") -> np.ndarray:
        oof = np.zeros(self.shape)
        for f, (fold_model, ids) in enumerate(self.parts):
            base = self.task_priors[f] if prior == "task" and self.task_priors is not None else None
            oof[self.folds == f] = fold_model.success(ids[:, :k], alpha, base)
        return oof


def _earned(success: np.ndarray, outcomes: np.ndarray, cost: np.ndarray, tuning: Tuning) -> np.ndarray:
    """``[n]`` what top-1 routing at ``tuning`` earns on each record: its pick's outcome (0 without a record)
    less the pick's cost term, as ``tune`` scores a margin."""
    penalty = tuning.cost_weight * cost
    picks = _with_margin(success - penalty, tuning.anchor, tuning.margin).argmax(axis=1)
    return np.asarray(_earnings(outcomes, penalty)[np.arange(len(picks)), picks])


def _tuned_knn(x: np.ndarray, outcomes: np.ndarray, record_costs: np.ndarray, cost: np.ndarray, folds: np.ndarray,
               cost_weight: float, tasks: Sequence[str | None] | None = None, seed: int = 0,
               progress: bool = False) -> tuple[KnnSuccess, np.ndarray]:
    """The kNN success model whose ``k`` and ``alpha`` (over ``KNN_GRID``) and prior (``PRIORS``) route best
    out of fold, and its out-of-fold success rates: the highest realised utility of top-1 routing at
    ``cost_weight``, each setting with its own tuned margin (``tune``). Ties keep the smoother setting (more
    neighbours, more shrinkage), which the grid lists first. The task prior (``tasks`` naming at least two
    tasks of ``TASK_MIN_RECORDS`` records in every fold's training part) is kept only when its best setting
    beats the overall prior's best by more than noise: the mean per-record gain at least ``TASK_PRIOR_Z``
    standard errors, so tasks that say nothing about the experts are left out."""
    oof = _KnnOutOfFold(x, outcomes, folds, max(k for k, _ in KNN_GRID), tasks, seed, progress)
    if tasks is not None and oof.task_priors is None:
        log.warning("outcome records: the tasks they name give no task prior (fewer than two tasks with %d "
                    "records each in some fold's training records); the gate uses overall success rates",
                    TASK_MIN_RECORDS)
    priors = PRIORS if oof.task_priors is not None else PRIORS[:1]
    scaled = cost / _cost_scale(cost)
    best: dict[str, tuple[float, int, float, np.ndarray, Tuning]] = {}
    for prior in priors:
        for k, alpha in KNN_GRID:
            success = oof.success(min(k, oof.k), alpha, prior)
            tuning = tune(success, outcomes, record_costs, scaled, cost_weight)
            value = tuning.metrics["routed_utility"]
            assert value is not None
            if prior not in best or value > best[prior][0] + 1e-12:
                best[prior] = (value, min(k, oof.k), alpha, success, tuning)
    prior = "overall"
    if "task" in best:
        gain = _earned(best["task"][3], outcomes, scaled, best["task"][4]) - _earned(
            best["overall"][3], outcomes, scaled, best["overall"][4])
        error = float(gain.std(ddof=1) / np.sqrt(len(gain)))
        prior = "task" if gain.mean() > TASK_PRIOR_Z * error else "overall"
        log.info("outcome gate: the task prior routes %+.4f better per record out of fold (standard error %.4f); "
                 "%s", gain.mean(), error, "kept" if prior == "task" else "not kept: within noise")
    value, k, alpha, success, _ = best[prior]
    log.info("outcome gate: kNN success with k=%d, alpha=%g, shrunk toward the %s (out-of-fold routed utility "
             "%.4f, best of %d settings)", k, alpha, "task prior" if prior == "task" else "overall rates",
             value, len(KNN_GRID) * len(priors))
    task_prior = TaskPrior.fit(x, tasks, outcomes, seed=seed) if prior == "task" and tasks else None
    return KnnSuccess(k, alpha, task_prior), success


def train_outcome_gate(records: Sequence[OutcomeRecord], encoder: Encoder, *, experts: Sequence[str] | None = None,
                       cost_weight: float = 0.0, model: str = KnnSuccess.kind, seed: int = 0,
                       progress: bool = True, embeddings: np.ndarray | None = None,
                       prices: Mapping[str, float] | None = None) -> OutcomeGate:
    """Embed the queries, fit the success model out of fold to tune margin and temperature, then on all.

    ``experts`` defaults to every expert named in the records, sorted. ``embeddings`` ([n, dim], aligned
    with ``records``) skips the encoder, for callers that cache vectors. ``prices`` (``config_prices``) give
    the cost of experts that no record gives a cost for, as serving does (``OutcomeGate.for_config``); without
    one such an expert costs 0.
    """
    prices = prices or {}
    experts = sorted({e for r in records for e in r.outcomes}) if experts is None else list(experts)
    unknown = sorted({e for r in records for e in r.outcomes} - set(experts))
    if unknown:
        raise ValueError(f"outcome records score experts that are not experts of the gate: {', '.join(unknown)}")
    if len(experts) < 2 or len(records) < 2 * FOLDS:
        raise ValueError(f"an outcome gate needs at least two experts and {2 * FOLDS} records; "
                         f"got {len(experts)} and {len(records)}")
    outcomes, record_costs = outcome_matrices(_scored_costs(records, experts), experts)
    silent = [e for e, n in zip(experts, (~np.isnan(outcomes)).sum(axis=0), strict=True) if n == 0]
    if silent:
        raise ValueError(f"experts with no outcome record: {', '.join(silent)}; leave them out (a config "
                         "expert without records is routed from its examples)")
    _warn_thin_data(experts, outcomes, record_costs, cost_weight, prices)
    texts = [r.query for r in records]
    x = embed_texts(encoder, texts, progress=progress) if embeddings is None else np.asarray(embeddings, np.float32)
    folds = _folds(texts, seed)
    # An expert whose cost no record gives takes its price, else 0 (``_warn_thin_data`` has said so): means
    # summed over what is there, not numpy's nanmean, which warns of the empty column.
    cost = _with_prices(_known_means(record_costs, axis=0), record_costs, experts, prices)
    record_tasks = [r.task for r in records]
    if model == KnnSuccess.kind:
        final: SuccessModel
        final, oof = _tuned_knn(x, outcomes, record_costs, cost, folds, cost_weight,
                                record_tasks if any(t is not None for t in record_tasks) else None, seed,
                                progress)
    else:
        if any(t is not None for t in record_tasks):
            log.warning("outcome records name tasks, which only the knn success model reads; success_model %s "
                        "leaves them out", model)
        oof = np.zeros_like(outcomes)
        for f in range(FOLDS):
            fold_model = SUCCESS_MODELS[model]()
            fold_model.fit(x[folds != f], outcomes[folds != f])
            oof[folds == f] = fold_model.predict(x[folds == f])
        final = SUCCESS_MODELS[model]()
    final.fit(x, outcomes)
    calibration = {"cal_success": oof.astype(np.float32), "cal_outcomes": outcomes.astype(np.float32),
                   # float64: a cost is any finite number in the user's unit, and float32 ends at 3.4e38
                   "cal_costs": record_costs}
    metadata = GateMetadata(encoder.identity, encoder.checksum, outcome_data_sha256(records),
                            ValidationMetrics(n_train=len(records), n_val=len(records)), classifier=model,
                            kind=OutcomeGate.kind,
                            format_version=TASK_PRIOR_FORMAT_VERSION if getattr(final, "task_prior", None)
                            else FORMAT_VERSION,
                            # A fold stands in for validation data: its queries against the other folds'.
                            ood_threshold=_ood_threshold(x, folds))
    # Explanations: each training query labelled with the expert that did best on it (cheapest among ties).
    best = np.where(np.isnan(outcomes), -np.inf, outcomes - 1e-6 * cost / max(float(cost.max()), 1e-12))
    labels = [experts[i] for i in best.argmax(axis=1)]
    gate = OutcomeGate(encoder, experts, final, cost, calibration, metadata, (x, texts, labels),
                       cost_weight=cost_weight)
    t = gate.tuning
    gate.metadata = dataclasses.replace(metadata, metrics=ValidationMetrics(
        n_train=len(records), n_val=len(records), accuracy=t.metrics["routed_accuracy"],
        ece_before=t.metrics["ece_before"], ece_after=t.metrics["ece_after"],
        routed_accuracy=t.metrics["routed_accuracy"], routed_cost=t.metrics["routed_cost"],
        # Named as best_single_accuracy scores it: a missing record counts as wrong.
        best_single=experts[int(np.argmax(np.where(np.isnan(outcomes), 0.0, outcomes).mean(axis=0)))],
        best_single_accuracy=t.metrics["best_single_accuracy"], oracle_accuracy=t.metrics["oracle_accuracy"]),
        uncosted_pick_share=t.metrics["uncosted_pick_share"])
    return gate
