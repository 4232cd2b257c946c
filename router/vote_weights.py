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

Given each answer's length, the fit also learns one *length term*: an answer counts for
``max(0, w_e + beta * f)``, where ``f = log(chars / median_e)`` (clipped to +-``LENGTH_CLIP``) says how much
longer or shorter than its expert's median answer it is. Every answer a combiner sees has a length, so the term
needs nothing the serving path lacks; ``beta`` is fitted jointly with the weights and comes out near 0 when
length says nothing. An expert without a median (added after training) gets no length term.

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

__all__ = ["FILE_NAME", "LENGTH_CLIP", "VoteWeights", "fit_from_records", "fit_vote_weights", "length_feature"]

FILE_NAME = "vote_weights.json"
_FORMAT = 2  # 2 added the length term; format 1 files (weights only) still load
LENGTH_CLIP = 3.0  # the length feature's bound: answers 20x longer or shorter than the median count as 20x


def length_feature(chars: np.ndarray, median: np.ndarray) -> np.ndarray:
    """``log(chars / median)`` clipped to +-``LENGTH_CLIP``; 0 where either is unknown (NaN) or not positive.
    Broadcasts: ``chars`` [..., m] against ``median`` [m]."""
    chars, median = np.asarray(chars, dtype=float), np.asarray(median, dtype=float)
    known = np.isfinite(chars) & np.isfinite(median) & (median > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        f = np.log(np.maximum(chars, 1.0) / median)
    return np.where(known, np.clip(f, -LENGTH_CLIP, LENGTH_CLIP), 0.0)


@dataclass(frozen=True)
class VoteWeights:
    """One learned vote weight per expert."""

    experts: tuple[str, ...]
    weights: np.ndarray  # [m], >= 0
    metrics: dict[str, Any] = field(default_factory=dict)
    length_coef: float = 0.0  # beta of the length term; 0: answers count for their weight alone
    median_chars: np.ndarray | None = None  # [m] each expert's median answer length (NaN: unknown)
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {e: j for j, e in enumerate(self.experts)})
        if self.weights.shape != (len(self.experts),):
            raise ValueError(f"vote weights: {self.weights.shape[0]} weights for {len(self.experts)} experts")
        if self.median_chars is not None and self.median_chars.shape != self.weights.shape:
            raise ValueError(f"vote weights: {self.median_chars.shape[0]} median lengths for "
                             f"{len(self.experts)} experts")
        if not np.isfinite(self.length_coef):
            raise ValueError(f"vote weights: length_coef must be a finite number, not {self.length_coef}")

    def as_mapping(self) -> dict[str, float]:
        return {e: float(w) for e, w in zip(self.experts, self.weights, strict=True)}

    def counted(self, chars: np.ndarray, columns: np.ndarray | slice = slice(None)) -> np.ndarray:
        """What answers of these lengths count for: ``[..., m]`` chars (NaN: no length) -> ``[..., m]``;
        with ``columns``, the chars are those experts' only."""
        weights = self.weights[columns]
        if self.median_chars is None or self.length_coef == 0.0:
            return np.broadcast_to(weights, np.shape(chars)).copy()
        return np.maximum(weights + self.length_coef * length_feature(chars, self.median_chars[columns]), 0.0)

    def count_for(self, expert: str, chars: int) -> float | None:
        """What one answer of ``chars`` characters by ``expert`` counts for; None when ``expert`` has no
        learned weight."""
        j = self._index.get(expert)
        return None if j is None else float(self.counted(np.array([float(chars)]), np.array([j]))[0])

    def restrict(self, names: Sequence[str]) -> VoteWeights:
        """The weights of the experts among ``names`` (a config's experts), in this object's order."""
        wanted = set(names)
        keep = [j for j, e in enumerate(self.experts) if e in wanted]
        return VoteWeights(experts=tuple(self.experts[j] for j in keep), weights=self.weights[keep],
                           metrics=self.metrics, length_coef=self.length_coef,
                           median_chars=None if self.median_chars is None else self.median_chars[keep])

    def as_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"format": _FORMAT, "experts": list(self.experts), "weights": self.weights.tolist(),
                               "length_coef": self.length_coef}
        if self.median_chars is not None:  # JSON has no NaN: an unknown median is null
            doc["median_chars"] = [None if np.isnan(v) else float(v) for v in self.median_chars]
        return {**doc, "metrics": self.metrics}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], where: str = "vote weights") -> VoteWeights:
        if doc.get("format") not in (1, _FORMAT):
            raise ValueError(f"{where}: unknown format {doc.get('format')!r}; this version reads 1 and {_FORMAT}")
        try:
            medians = doc.get("median_chars")
            return cls(experts=tuple(doc["experts"]), weights=np.asarray(doc["weights"], dtype=float),
                       metrics=dict(doc.get("metrics") or {}), length_coef=float(doc.get("length_coef", 0.0)),
                       median_chars=None if medians is None else np.array(
                           [np.nan if v is None else v for v in medians], dtype=float))
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
                m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For the records whose target is one of their candidates: ``choice`` [n, m], the candidate each expert
    voted for (-1: no answer), the candidate mask [n, C], each record's target index [n] and the records kept
    (indices into ``answers``). Memory grows with records times experts, not times candidates too."""
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
    return choice, mask, y, np.array([i for i, _ in kept], dtype=np.int64)


def _medians(answers: Sequence[Sequence[str | None]], chars: np.ndarray) -> np.ndarray:
    """[m] each expert's median length over the answers it gave (NaN: none with a length)."""
    given = np.array([[a is not None for a in row] for row in answers], dtype=bool).reshape(chars.shape)
    lengths = np.where(given & np.isfinite(chars) & (chars > 0), chars, np.nan)
    out = np.full(chars.shape[1], np.nan)
    seen = ~np.all(np.isnan(lengths), axis=0)
    out[seen] = np.nanmedian(lengths[:, seen], axis=0)
    return out


def fit_vote_weights(answers: Sequence[Sequence[str | None]], target: Sequence[str | None],
                     experts: Sequence[str], *, l2: float = 1.0, max_iter: int = 500,
                     lengths: Sequence[Sequence[float | None]] | None = None) -> VoteWeights:
    """Weights for ``experts`` from ``answers[i][e]`` (expert e's extracted answer to record i; None: it gave
    none) and ``target[i]`` (the right answer; None: unknown). With ``lengths[i][e]`` (the characters of expert
    e's whole answer to record i; None: unknown) the length term is fitted too (see the module). Raises
    ``ValueError`` when no record can teach anything."""
    from scipy.optimize import minimize

    m = len(experts)
    if any(len(row) != m for row in answers):
        raise ValueError(f"every record needs one answer slot per expert ({m})")
    if lengths is not None and (len(lengths) != len(answers) or any(len(row) != m for row in lengths)):
        raise ValueError(f"lengths need one slot per expert ({m}) for each of the {len(answers)} records")
    choice, mask, y, kept = _candidates(answers, target, m)
    n = len(y)
    if n == 0:
        raise ValueError("no record has its right answer among the experts' answers; nothing to fit vote "
                         "weights on")
    medians = None
    feature = np.zeros(choice.shape)
    if lengths is not None:
        chars = np.array([[np.nan if v is None else float(v) for v in row] for row in lengths], dtype=float)
        medians = _medians(answers, chars)
        feature = length_feature(chars[kept], medians)
    rows = np.arange(n)
    voted = choice >= 0
    vote_rows, vote_cols = np.nonzero(voted)  # one entry per answer given
    vote_cands = choice[vote_rows, vote_cols]
    vote_feature = feature[vote_rows, vote_cols]

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        w, beta = params[:m], params[m]
        scores = np.zeros(mask.shape)
        np.add.at(scores, (vote_rows, vote_cands), w[vote_cols] + beta * vote_feature)  # each candidate's tally
        scores = np.where(mask, scores, -np.inf)
        top = scores.max(axis=1, keepdims=True)
        z = np.exp(scores - top)
        total = z.sum(axis=1, keepdims=True)
        p = z / total
        nll = float(-(scores[rows, y] - top[:, 0] - np.log(total[:, 0])).sum())
        residual = p.copy()
        residual[rows, y] -= 1.0
        per_vote = residual[vote_rows, vote_cands]  # d nll / d (what one answer counted for)
        grad = np.zeros(m)
        np.add.at(grad, vote_cols, per_vote)
        return nll + 0.5 * l2 * float(w @ w), np.r_[grad + l2 * w, float(per_vote @ vote_feature)]

    # The length term is unpenalised (one coefficient, fitted on every answer) and held at 0 without lengths.
    beta_bounds = (None, None) if lengths is not None else (0.0, 0.0)
    result = minimize(loss, np.r_[np.ones(m), 0.0], jac=True, method="L-BFGS-B",
                      bounds=[(0.0, None)] * m + [beta_bounds], options={"maxiter": max_iter})
    metrics = {"records": len(answers), "records_used": n, "nll_per_record": float(result.fun) / n,
               "l2": l2, "converged": bool(result.success), "length_term": lengths is not None}
    return VoteWeights(experts=tuple(experts), weights=result.x[:m], metrics=metrics,
                       length_coef=float(result.x[m]), median_chars=medians)


def fit_from_records(records: Sequence[OutcomeRecord], experts: Sequence[str],
                     extract: Callable[[str], str | None], *, l2: float = 10.0, length_term: bool = True,
                     progress: bool = False,
                     per_expert: Mapping[str, Callable[[str], str | None]] | None = None) -> VoteWeights:
    """Vote weights from outcome records that carry ``answers``. Each answer's final answer is read with
    ``extract`` (the combiner's extractor), or its expert's own in ``per_expert`` (``experts[].extractor``), as
    the vote will read it; a record's right answer is the one its successful experts (outcome
    at least 0.5) gave, and a record whose successful experts disagree, or that has none, teaches nothing.
    ``length_term``: fit the length term on the answers' lengths too. Raises ``ValueError`` naming what is
    missing when no record carries answers."""
    with_answers = [r for r in records if r.answers]
    if not with_answers:
        raise ValueError("learned vote weights need outcome records that carry 'answers' (expert -> answer "
                         "text); none of the training records has any")
    answers: list[list[str | None]] = []
    target: list[str | None] = []
    lengths: list[list[float | None]] = []
    for rec in with_answers:
        row = [(per_expert or {}).get(e, extract)(rec.answers[e]) if e in rec.answers else None for e in experts]
        lengths.append([float(len(rec.answers[e])) if e in rec.answers else None for e in experts])
        right = {a for e, a in zip(experts, row, strict=True) if a is not None and rec.outcomes.get(e, 0.0) >= 0.5}
        answers.append(row)
        target.append(next(iter(right)) if len(right) == 1 else None)
    if progress:
        print(f"fitting vote weights on {len(with_answers)} records with answers", flush=True)
    weights = fit_vote_weights(answers, target, experts, l2=l2, lengths=lengths if length_term else None)
    weights.metrics["records_with_answers"] = len(with_answers)
    return weights
