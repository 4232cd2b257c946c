"""Learned vote weights: how much each expert's answer counts in a weighted vote, fitted on recorded answers.

Weighting a voter by the log-odds of its own accuracy is optimal only when voters err independently. Experts
do not: models of one family, or trained on the same data, make the same mistakes, and a vote that counts
each of them fully counts one mistake several times. Fitting the weights *jointly*, on records where the right
answer is known, discounts experts whose votes add nothing to the others'.

The model is a conditional logit over each record's candidate answers (the distinct answers its experts
gave)::

    P(c | record) = softmax_c( sum_e w_e * [answer_e == c] )

with every ``w_e >= 0``, so the decision is exactly a weighted vote: the answer with the largest tally of
weights wins (``router.combine.Vote`` with these weights). An L2 penalty keeps experts with little evidence
near zero. Only records whose right answer is among the candidates teach anything about choosing among them;
the others are left out and counted in ``metrics``.

Measured on MMLU-Pro's 31 recorded LLMs (``moe eval --suite mmlu-pro-combine``): see that suite's report.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from router.outcome import OutcomeRecord

__all__ = ["FILE_NAME", "VoteWeights", "fit_from_records", "fit_vote_weights"]

FILE_NAME = "vote_weights.json"
_FORMAT = 1


@dataclass(frozen=True)
class VoteWeights:
    """One learned vote weight per expert."""

    experts: tuple[str, ...]
    weights: np.ndarray  # [m], >= 0
    metrics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.weights.shape != (len(self.experts),):
            raise ValueError(f"vote weights: {self.weights.shape[0]} weights for {len(self.experts)} experts")

    def as_mapping(self) -> dict[str, float]:
        return {e: float(w) for e, w in zip(self.experts, self.weights, strict=True)}

    def as_dict(self) -> dict[str, Any]:
        return {"format": _FORMAT, "experts": list(self.experts), "weights": self.weights.tolist(),
                "metrics": self.metrics}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], where: str = "vote weights") -> VoteWeights:
        if doc.get("format") != _FORMAT:
            raise ValueError(f"{where}: unknown format {doc.get('format')!r}; this version reads {_FORMAT}")
        try:
            return cls(experts=tuple(doc["experts"]), weights=np.asarray(doc["weights"], dtype=float),
                       metrics=dict(doc.get("metrics") or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: malformed ({exc})") from exc

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / FILE_NAME
        path.write_text(json.dumps(self.as_dict(), indent=1) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> VoteWeights | None:
        """The weights saved in ``directory``, or None when it holds none."""
        path = Path(directory) / FILE_NAME
        if not path.is_file():
            return None
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")), str(path))


def _candidates(answers: Sequence[Sequence[str | None]], target: Sequence[str | None],
                m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For the records whose target is one of their candidates: ``choice`` [n, m], the candidate each expert
    voted for (-1: no answer), the candidate mask [n, C] and each record's target index [n]. Memory grows with
    records times experts, not times candidates too."""
    kept: list[tuple[int, list[str]]] = []
    for i, (row, right) in enumerate(zip(answers, target, strict=True)):
        distinct = list(dict.fromkeys(a for a in row if a is not None))
        if right is not None and right in distinct:
            kept.append((i, distinct))
    width = max((len(d) for _, d in kept), default=1)
    choice = np.full((len(kept), m), -1, dtype=np.int64)
    mask = np.zeros((len(kept), width), dtype=bool)
    y = np.zeros(len(kept), dtype=np.int64)
    for k, (i, distinct) in enumerate(kept):
        index = {c: j for j, c in enumerate(distinct)}
        mask[k, :len(distinct)] = True
        y[k] = index[target[i]]  # type: ignore[index]
        choice[k] = [index[a] if a is not None else -1 for a in answers[i]]
    return choice, mask, y


def fit_vote_weights(answers: Sequence[Sequence[str | None]], target: Sequence[str | None],
                     experts: Sequence[str], *, l2: float = 1.0, max_iter: int = 500) -> VoteWeights:
    """Weights for ``experts`` from ``answers[i][e]`` (expert e's extracted answer to record i; None: it gave
    none) and ``target[i]`` (the right answer; None: unknown). Raises ``ValueError`` when no record can teach
    anything."""
    from scipy.optimize import minimize

    m = len(experts)
    if any(len(row) != m for row in answers):
        raise ValueError(f"every record needs one answer slot per expert ({m})")
    choice, mask, y = _candidates(answers, target, m)
    n = len(y)
    if n == 0:
        raise ValueError("no record has its right answer among the experts' answers; nothing to fit vote "
                         "weights on")
    rows = np.arange(n)
    voted = choice >= 0
    vote_rows, vote_cols = np.nonzero(voted)  # one entry per answer given
    vote_cands = choice[vote_rows, vote_cols]

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        scores = np.zeros(mask.shape)
        np.add.at(scores, (vote_rows, vote_cands), w[vote_cols])  # each candidate's tally
        scores = np.where(mask, scores, -np.inf)
        top = scores.max(axis=1, keepdims=True)
        z = np.exp(scores - top)
        total = z.sum(axis=1, keepdims=True)
        p = z / total
        nll = float(-(scores[rows, y] - top[:, 0] - np.log(total[:, 0])).sum())
        residual = p.copy()
        residual[rows, y] -= 1.0
        grad = np.zeros(m)  # d nll / d w_e: the residuals of the candidates expert e voted for
        np.add.at(grad, vote_cols, residual[vote_rows, vote_cands])
        return nll + 0.5 * l2 * float(w @ w), grad + l2 * w

    result = minimize(loss, np.ones(m), jac=True, method="L-BFGS-B", bounds=[(0.0, None)] * m,
                      options={"maxiter": max_iter})
    metrics = {"records": len(answers), "records_used": n, "nll_per_record": float(result.fun) / n,
               "l2": l2, "converged": bool(result.success)}
    return VoteWeights(experts=tuple(experts), weights=result.x, metrics=metrics)


def fit_from_records(records: Sequence[OutcomeRecord], experts: Sequence[str],
                     extract: Callable[[str], str | None], *, l2: float = 10.0,
                     progress: bool = False) -> VoteWeights:
    """Vote weights from outcome records that carry ``answers``. Each answer's final answer is read with
    ``extract`` (the combiner's extractor); a record's right answer is the one its successful experts (outcome
    at least 0.5) gave, and a record whose successful experts disagree, or that has none, teaches nothing.
    Raises ``ValueError`` naming what is missing when no record carries answers."""
    with_answers = [r for r in records if r.answers]
    if not with_answers:
        raise ValueError("learned vote weights need outcome records that carry 'answers' (expert -> answer "
                         "text); none of the training records has any")
    answers: list[list[str | None]] = []
    target: list[str | None] = []
    for rec in with_answers:
        row = [extract(rec.answers[e]) if e in rec.answers else None for e in experts]
        right = {a for e, a in zip(experts, row, strict=True) if a is not None and rec.outcomes.get(e, 0.0) >= 0.5}
        answers.append(row)
        target.append(next(iter(right)) if len(right) == 1 else None)
    if progress:
        print(f"fitting vote weights on {len(with_answers)} records with answers", flush=True)
    weights = fit_vote_weights(answers, target, experts, l2=l2)
    weights.metrics["records_with_answers"] = len(with_answers)
    return weights
