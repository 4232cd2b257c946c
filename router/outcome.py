"""Outcome records and success models: how likely each expert is to answer a query well.

Outcome records are JSONL, one query per line::

    {"query": "...", "outcomes": {"expert-a": 1.0, "expert-b": 0.0}, "cost": {"expert-a": 0.0021}}

``outcomes`` scores each expert's answer in [0, 1] (1 = right). ``cost`` (optional) is what the call cost, in
any one unit (USD in RouterBench). ``answers`` (optional) holds what each expert answered, as text; records
with answers teach the combiner's learned vote weights (``router.vote_weights``, ``combiner.vote_weights:
learned``). ``task`` (optional) names the query's task or domain, as a data set records it (MMLU-Pro's
category, RouterBench's task); the kNN model can then shrink toward the success rates of the tasks a query
probably belongs to (``TaskPrior``). An expert absent from a line has *no record* for that query; it is never
counted as a failure. ``load_outcome_jsonl`` reports a bad line with its file and line number.

A success model maps embeddings ``[q, dim]`` to ``[q, m]`` probabilities of success, fitted on outcome
matrices with NaN for "no record". Two are registered in ``SUCCESS_MODELS``:

- ``knn`` (the default): the success rate of each expert on the query's ``k`` nearest training queries, shrunk
  toward the expert's overall rate with ``alpha`` pseudo-observations. Shrinkage matters: with a few dozen
  neighbours the raw rates are noisy, and their argmax chases the noise. With a ``TaskPrior`` (records with
  tasks), the rate is shrunk toward the query's own prior instead: each task's success rates, mixed by a
  classifier's probabilities that the query belongs to that task. Hundreds of records per task estimate a
  task's rates far better than a few dozen neighbours estimate a query's.
- ``logistic``: one L2-regularised logistic regression per expert on the embedding.

The measured figures are in the results of ``moe eval --suite mmlu-pro-outcome`` and ``--suite routerbench``
(``results.json``, under ``systems``). There the kNN gate is compared with a naive per-expert success regression
(ridge on the embedding, plain argmax), which stands in for a per-expert linear model; the ``logistic`` model
itself has no row there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import numpy as np

from experts.types import is_blank
from router.jsonl import read_jsonl

__all__ = [
    "SUCCESS_MODELS",
    "KnnSuccess",
    "LogisticSuccess",
    "OutcomeRecord",
    "SuccessModel",
    "TaskPrior",
    "is_outcome_file",
    "load_outcome_jsonl",
    "load_outcome_lines",
    "outcome_matrices",
    "train_file_kind",
]


@dataclass(frozen=True)
class OutcomeRecord:
    query: str
    outcomes: dict[str, float]  # expert -> score in [0, 1]; experts without a record are absent
    cost: dict[str, float]  # expert -> recorded cost; may be empty
    # expert -> the answer it gave (its text, or the final answer alone); optional. Records with answers teach
    # learned vote weights (``router.vote_weights``).
    answers: dict[str, str] = field(default_factory=dict)
    # The query's task or domain, as the data set records it (e.g. MMLU-Pro's category); None: unknown.
    task: str | None = None


def load_outcome_jsonl(path: str | Path) -> list[OutcomeRecord]:
    """Outcome records from a JSONL file; blank lines are skipped.

    A bad line raises ``ValueError`` naming the file, the line number and what is wrong with it.
    """
    return [record for _, record in load_outcome_lines(path)]


def _as_float(number: float) -> float:
    try:
        return float(number)
    except OverflowError:
        return math.inf


def load_outcome_lines(path: str | Path) -> list[tuple[int, OutcomeRecord]]:
    """``load_outcome_jsonl``'s records, each with its line number, for callers that check more than the loader
    (``router.train``: that every expert a record names is one of the config's) and name the line."""
    return [(number, _parse_record(row, where))
            for where, number, row in read_jsonl(path, expected="an object with 'query' and 'outcomes'")]


def is_outcome_file(path: str | Path) -> bool:
    """Whether a JSONL file holds outcome records (``train_file_kind``)."""
    return train_file_kind(path) == "outcome"


def train_file_kind(path: str | Path) -> Literal["outcome", "label"] | None:
    """What a JSONL training file holds, by its first non-blank line: ``outcome`` records (an object with
    ``outcomes``) or labelled queries; None when it holds no line at all (empty, or blank lines only).

    Read as the loaders read (``read_jsonl``: a BOM is no error); a first line that is not UTF-8 or not a JSON
    object is ``label``, left for the labelled loader to report, naming the file and line."""
    rows = read_jsonl(path)
    try:
        for _, _, row in rows:
            return "outcome" if "outcomes" in row else "label"
    except ValueError:
        return "label"
    finally:
        rows.close()  # the file, at once
    return None


def _parse_record(row: dict[str, Any], where: str) -> OutcomeRecord:
    unknown = sorted(set(row) - {"query", "outcomes", "cost", "answers", "task"})
    if unknown:
        hint = (" ('label' is a labelled query's key: the file was read as outcome records because its first line "
                "holds 'outcomes'; a file holds one kind)") if "label" in unknown else ""
        raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; expected query, outcomes, cost, "
                         f"answers, task{hint}")
    query = row.get("query")
    if not isinstance(query, str) or is_blank(query):
        raise ValueError(f"{where}: 'query' " + ("missing" if "query" not in row
                                                  else f"must be a non-empty string, got {query!r}"))
    outcomes = _number_map(row, "outcomes", where, upper=1.0, required=True)
    if not outcomes:
        raise ValueError(f"{where}: 'outcomes' is empty; give at least one expert's score")
    task = row.get("task")
    if task is not None and (not isinstance(task, str) or not task.strip()):
        raise ValueError(f"{where}: 'task' must be a non-empty string (the query's task or domain) or null, "
                         f"got {task!r}")
    task = task.strip() if task is not None else None  # "law " is the task "law"
    return OutcomeRecord(query, outcomes, _number_map(row, "cost", where, upper=math.inf, required=False),
                         _answer_map(row, where), task)


def _answer_map(row: dict[str, Any], where: str) -> dict[str, str]:
    value = row.get("answers")
    if value is None and "answers" not in row:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{where}: 'answers' must be an object of expert -> answer text, got {value!r}")
    bad = [e for e, text in value.items() if not isinstance(text, str)]
    if bad:
        raise ValueError(f"{where}: answers[{bad[0]!r}] must be a string, got {value[bad[0]]!r}")
    return dict(value)


def _number_map(row: dict[str, Any], key: str, where: str, *, upper: float, required: bool) -> dict[str, float]:
    value = row.get(key)
    if value is None and not required and key not in row:
        return {}
    if not isinstance(value, dict):
        problem = "missing" if key not in row else f"must be an object of expert -> number, got {value!r}"
        raise ValueError(f"{where}: {key!r} {problem}")
    out = {}
    for expert, number in value.items():
        ok = isinstance(number, int | float) and not isinstance(number, bool) and 0.0 <= number <= upper
        # An integer past a float's range (JSON allows 1 followed by 400 zeros) is no finite number either.
        as_float = _as_float(number) if ok else math.nan
        if not ok or not math.isfinite(as_float):
            bound = "in [0, 1]" if upper == 1.0 else "a finite number >= 0"
            shown = repr(number)
            shown = shown if len(shown) <= 40 else f"{shown[:20]}... ({len(shown)} digits)"
            if isinstance(number, bool):  # JSON's true reads as a score to a person, and is none
                shown = f"{str(number).lower()} (a JSON boolean, not a number: write {int(number)})"
            raise ValueError(f"{where}: {key}[{expert!r}] must be {bound}, got {shown}")
        out[expert] = as_float
    return out


def outcome_matrices(records: Sequence[OutcomeRecord], experts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(outcomes, costs)``, each ``[n, len(experts)]`` float64 with NaN where a record has no value."""
    col = {e: i for i, e in enumerate(experts)}
    outcomes = np.full((len(records), len(experts)), np.nan)
    costs = np.full((len(records), len(experts)), np.nan)
    for i, rec in enumerate(records):
        for e, v in rec.outcomes.items():
            outcomes[i, col[e]] = v
        for e, v in rec.cost.items():
            costs[i, col[e]] = v
    return outcomes, costs


# --- success models ---------------------------------------------------------------------------------------

class SuccessModel(Protocol):
    """``[q, m]`` success probabilities from embeddings. Swappable; state is plain arrays, never pickle."""

    kind: ClassVar[str]

    def fit(self, x: np.ndarray, outcomes: np.ndarray) -> None: ...
    def predict(self, x: np.ndarray, *, exclude_self: bool = False) -> np.ndarray: ...
    def arrays(self) -> dict[str, np.ndarray]: ...


# How many records' worth of the pooled success rate each expert's own rate is shrunk toward: an expert with a
# handful of records (three, all right) must not outrank one measured on hundreds, and take every query where no
# neighbour has a record for it. With thousands of records an expert's own rate moves by well under a point.
PRIOR_RECORDS = 50.0


def success_prior(outcomes: np.ndarray, strength: float = PRIOR_RECORDS) -> np.ndarray:
    """``[m]`` each expert's mean outcome over the rows with a record for it (NaN = no record), shrunk toward
    the pooled mean of every record with the weight of ``strength`` records."""
    known = ~np.isnan(outcomes)
    hits = np.where(known, outcomes, 0.0).sum(axis=0)
    pooled = float(hits.sum() / max(int(known.sum()), 1))
    return np.asarray((hits + strength * pooled) / (known.sum(axis=0) + strength))


def shrunk_success(neighbour_outcomes: np.ndarray, prior: np.ndarray, alpha: float) -> np.ndarray:
    """``[q, m]`` from the neighbours' outcomes ``[q, k, m]``: each expert's success rate over the neighbours
    with a record for it, shrunk toward ``prior`` with the weight of ``alpha`` pseudo-neighbours; ``alpha``
    infinite: the prior alone."""
    if math.isinf(alpha):
        return np.broadcast_to(prior, (neighbour_outcomes.shape[0], neighbour_outcomes.shape[2])).astype(float)
    known = ~np.isnan(neighbour_outcomes)
    hits = np.where(known, neighbour_outcomes, 0.0).sum(axis=1)
    return np.asarray((hits + alpha * prior) / (known.sum(axis=1) + alpha))


# How many records' worth of an expert's overall success rate each task's own rate is shrunk toward: a task
# with a dozen records says little about an expert, one with hundreds speaks for itself.
TASK_RECORDS = 20.0
# A task needs this many records to be modelled; rarer ones count as no task (a record per task is no task).
TASK_MIN_RECORDS = 10


class TaskPrior:
    """A query's prior success rates from the records' tasks (``OutcomeRecord.task``: task or domain), mixed by
    how likely the query is to belong to each task::

        prior_m(x) = sum_c P(c | x) * rate_cm,   rate_cm = (sum_{j in c} o_jm + TASK_RECORDS * overall_m)
                                                          / (n_cm + TASK_RECORDS)

    ``P(c | x)`` is the mean of two classifiers on the embedding alone, as the label gate's ensemble averages its
    members (``router.classifiers``): a logistic regression, and a similarity-weighted vote of the tasks of the
    query's ``VOTERS`` nearest training records. The vote reads the neighbours the kNN success model has already
    found (``KnnSuccess.neighbours``), so it costs no second search and stores no second copy of the
    embeddings. Serving needs nothing but the query. ``overall_m`` is ``success_prior``. Rows without a task, or
    with a task of fewer than ``TASK_MIN_RECORDS`` records, teach neither the classifiers nor the rates.
    """

    VOTERS = 10  # as router.classifiers.KNNClassifier
    VOTE_TEMPERATURE = 0.05
    VOTE_FLOOR = 1e-4

    def __init__(self, tasks: Sequence[str], logistic: Any, row_tasks: np.ndarray, rates: np.ndarray) -> None:
        self.tasks, self.logistic = tuple(tasks), logistic  # logistic: a fitted router.classifiers.LogisticClassifier
        self.row_tasks = np.asarray(row_tasks, dtype=np.int64)  # [n] each training row's task index, -1: none
        self.rates = np.asarray(rates, dtype=np.float64)  # [tasks, m]
        if self.rates.shape[0] != len(self.tasks) or self.logistic.coef.shape[0] != len(self.tasks):
            raise ValueError(f"task prior: {self.rates.shape[0]} rows of rates and {self.logistic.coef.shape[0]} "
                             f"of coefficients for {len(self.tasks)} tasks")

    @classmethod
    def fit(cls, x: np.ndarray, tasks: Sequence[str | None], outcomes: np.ndarray, *,
            seed: int = 0) -> TaskPrior | None:
        """The prior from ``tasks[i]`` of training row ``i`` (None: not given); None when fewer than two tasks
        have ``TASK_MIN_RECORDS`` records."""
        from collections import Counter

        from router.classifiers import LogisticClassifier, Queries

        if len(tasks) != len(x):
            raise ValueError(f"{len(tasks)} tasks for {len(x)} records")
        counts = Counter(t for t in tasks if t is not None)
        names = sorted(t for t, n in counts.items() if n >= TASK_MIN_RECORDS)
        if len(names) < 2:
            return None
        col = {t: j for j, t in enumerate(names)}
        row_tasks = np.array([col.get(t, -1) if t is not None else -1 for t in tasks], dtype=np.int64)
        rows = np.flatnonzero(row_tasks >= 0)
        y = row_tasks[rows]
        logistic = LogisticClassifier(seed=seed, balance="none")  # category probabilities: the data's mix is the prior
        logistic.fit(Queries([""] * len(rows), np.asarray(x, dtype=np.float32)[rows]), y, len(names))
        overall = success_prior(outcomes)
        known = ~np.isnan(outcomes[rows])
        hits = np.where(known, outcomes[rows], 0.0)
        rates = np.stack([(hits[y == j].sum(axis=0) + TASK_RECORDS * overall)
                          / (known[y == j].sum(axis=0) + TASK_RECORDS) for j in range(len(names))])
        return cls(names, logistic, row_tasks, rates)

    def task_proba(self, x: np.ndarray, train_x: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
        """``[q, tasks]`` the probability that each query belongs to each task, from its embedding ``x`` and its
        nearest training rows ``neighbours`` (``[q, >= 1]``, nearest first, rows of ``train_x``, the embeddings
        the prior was fitted on)."""
        from router.classifiers import Queries, _softmax, similarity_votes

        x = np.atleast_2d(np.asarray(x, dtype=np.float32))
        logistic = _softmax(np.asarray(self.logistic.predict_logits(Queries([""] * len(x), x)), dtype=np.float64))
        ids = neighbours[:, :self.VOTERS]
        sims = np.einsum("qd,qkd->qk", x, np.asarray(train_x, dtype=np.float32)[ids])
        votes = similarity_votes(sims, self.row_tasks[ids], len(self.tasks), self.VOTE_TEMPERATURE, self.VOTE_FLOOR)
        return np.asarray((logistic + votes) / 2.0)

    def predict(self, x: np.ndarray, train_x: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
        """``[q, m]`` each query's prior success rate of each expert (arguments as for ``task_proba``)."""
        return np.asarray(self.task_proba(x, train_x, neighbours) @ self.rates)

    def arrays(self) -> dict[str, np.ndarray]:
        from router.classifiers import pack_strings

        data, offsets = pack_strings(self.tasks)
        return {"names": data, "name_offsets": offsets, "rates": self.rates, "row_tasks": self.row_tasks,
                **self.logistic.arrays()}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> TaskPrior:
        from router.classifiers import LogisticClassifier, unpack_strings

        return cls(unpack_strings(arrays["names"], arrays["name_offsets"]), LogisticClassifier.from_arrays(arrays),
                   arrays["row_tasks"], arrays["rates"])


class KnnSuccess:
    """Shrunk success rate over the ``k`` nearest training queries (cosine)::

        p_m(x) = (sum_j o_jm + alpha * prior_m) / (n_m(x) + alpha)

    over the neighbours ``j`` with a record for expert ``m`` (``n_m(x)`` of them). ``prior_m`` is the expert's
    overall rate (``success_prior``), or with ``task_prior`` the query's own (``TaskPrior``). ``exclude_self``
    leaves each query's own row out of its neighbours, for honest in-sample (leave-one-out) predictions (the
    task prior's classifier still saw it).

    Without ``k`` and ``alpha``, ``k = sqrt(n)`` clipped to [5, 50] and ``alpha = k / 5``. ``moe train`` does
    not use that default: it picks both out of fold (``router.outcome_gate.KNN_GRID``), by how well the gate
    then routes.
    """

    kind: ClassVar[str] = "knn"

    def __init__(self, k: int | None = None, alpha: float | None = None,
                 task_prior: TaskPrior | None = None) -> None:
        self.k, self.alpha = k or 0, alpha if alpha is not None else -1.0  # set from the data by fit
        self._k_given, self._alpha_given = k, alpha
        self.task_prior = task_prior
        self._overall: np.ndarray | None = None
        self.x = np.zeros((0, 0), dtype=np.float32)
        self.outcomes = np.zeros((0, 0), dtype=np.float32)

    def fit(self, x: np.ndarray, outcomes: np.ndarray) -> None:
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        self.outcomes = np.asarray(outcomes, dtype=np.float32)
        self._overall = None
        if self.task_prior is not None and len(self.task_prior.row_tasks) != len(self.x):
            raise ValueError(f"the task prior was fitted on {len(self.task_prior.row_tasks)} records, the kNN "
                             f"success model on {len(self.x)}; fit both on the same records")
        self.k = self._k_given or int(np.clip(round(math.sqrt(len(x))), 5, 50))
        self.alpha = self._alpha_given if self._alpha_given is not None else self.k / 5.0

    def predict(self, x: np.ndarray, *, exclude_self: bool = False) -> np.ndarray:
        k = min(self.k, len(self.x) - int(exclude_self))
        ids = self.neighbours(x, k, exclude_self=exclude_self)
        prior = None if self.task_prior is None else self.task_prior.predict(x, self.x, ids)
        return self.success(ids, self.alpha, prior)

    def neighbours(self, x: np.ndarray, k: int, *, exclude_self: bool = False) -> np.ndarray:
        """``[q, k]`` row indices of each query's ``k`` nearest training queries, nearest first."""
        x = np.atleast_2d(np.asarray(x, dtype=np.float32))
        k = min(k, len(self.x) - int(exclude_self))
        out = np.empty((len(x), k), dtype=np.int64)
        for start in range(0, len(x), 1024):  # [1024, n] similarities at a time bounds the memory
            sims = x[start:start + 1024] @ self.x.T
            if exclude_self:
                # The query's own row (or an exact copy of it) scores ~1; drop the single best match.
                sims[np.arange(len(sims)), sims.argmax(axis=1)] = -np.inf
            ids = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < sims.shape[1] else np.argsort(-sims, axis=1)
            order = np.argsort(-np.take_along_axis(sims, ids, axis=1), axis=1, kind="stable")
            out[start:start + 1024] = np.take_along_axis(ids, order, axis=1)[:, :k]
        return out

    def success(self, neighbours: np.ndarray, alpha: float, prior: np.ndarray | None = None) -> np.ndarray:
        """``[q, m]`` shrunk success rates over the training rows ``neighbours`` ``[q, k]``, toward ``prior``
        (``[q, m]`` or ``[m]``; None: each expert's overall rate)."""
        return shrunk_success(self.outcomes[neighbours], self.overall_prior() if prior is None else prior, alpha)

    def overall_prior(self) -> np.ndarray:
        """``[m]`` each expert's overall success rate (``success_prior``), computed once per fitted model: over
        thousands of records it cost more than the rest of a query's scoring."""
        if self._overall is None or len(self._overall) != self.outcomes.shape[1]:
            self._overall = success_prior(self.outcomes)
        return self._overall

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"x": self.x, "outcomes": self.outcomes, "k": np.array(self.k), "alpha": np.array(self.alpha)}
        if self.task_prior is not None:
            out.update({f"task.{k}": v for k, v in self.task_prior.arrays().items()})
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> KnnSuccess:
        tasked = {k.removeprefix("task."): v for k, v in arrays.items() if k.startswith("task.")}
        model = cls(int(arrays["k"]), float(arrays["alpha"]), TaskPrior.from_arrays(tasked) if tasked else None)
        model.x, model.outcomes = arrays["x"], arrays["outcomes"]
        return model


class LogisticSuccess:
    """One logistic regression per expert. Fractional scores are fitted as weighted 1 and 0 copies of a row."""

    kind: ClassVar[str] = "logistic"

    def __init__(self, c: float = 1.0, max_iter: int = 1000) -> None:
        self.c, self.max_iter = c, max_iter
        self.coef = np.zeros((0, 0), dtype=np.float32)
        self.intercept = np.zeros(0, dtype=np.float32)

    def fit(self, x: np.ndarray, outcomes: np.ndarray) -> None:
        from sklearn.linear_model import LogisticRegression

        m = outcomes.shape[1]
        self.coef = np.zeros((m, x.shape[1]), dtype=np.float32)
        self.intercept = np.zeros(m, dtype=np.float32)
        for j in range(m):
            known = ~np.isnan(outcomes[:, j])
            xs, ys = x[known], outcomes[known, j]
            rate = float(ys.mean()) if len(ys) else 0.5
            if len(ys) == 0 or ys.min() == ys.max():  # one class only: a constant is all there is to learn
                self.intercept[j] = math.log(max(rate, 1e-3) / max(1.0 - rate, 1e-3))
                continue
            model = LogisticRegression(C=self.c, max_iter=self.max_iter).fit(
                np.concatenate([xs, xs]), np.concatenate([np.ones(len(ys)), np.zeros(len(ys))]),
                sample_weight=np.concatenate([ys, 1.0 - ys]))
            self.coef[j], self.intercept[j] = model.coef_[0], model.intercept_[0]

    def predict(self, x: np.ndarray, *, exclude_self: bool = False) -> np.ndarray:
        z = np.atleast_2d(np.asarray(x, dtype=np.float32)) @ self.coef.T + self.intercept
        return np.asarray(1.0 / (1.0 + np.exp(-z.astype(np.float64))))

    def arrays(self) -> dict[str, np.ndarray]:
        return {"coef": self.coef, "intercept": self.intercept}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> LogisticSuccess:
        model = cls()
        model.coef, model.intercept = arrays["coef"], arrays["intercept"]
        return model


SUCCESS_MODELS: dict[str, Any] = {KnnSuccess.kind: KnnSuccess, LogisticSuccess.kind: LogisticSuccess}
