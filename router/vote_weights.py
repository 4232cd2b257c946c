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

With a penalty for it (``answer_bias_l2``), the fit also learns an *answer bias*: an adjustment ``b_e(a)`` for
each answer ``a`` an expert gives often (at least ``BIAS_MIN_ANSWERS`` times in the training records), so an
answer counts for ``max(0, w_e + beta * f + b_e(a))``. Experts have favourite answers: a model unsure of a
multiple-choice question leans towards some letters more than others (the selection bias of LLMs as
multiple-choice answerers, Zheng et al., ICLR 2024), so its vote for a favourite letter is worth less than its
vote for a letter it gives only when it has a reason to. The L2 penalty keeps every bias near 0 unless the
records show it; an answer the expert gave rarely, or never, gets none.

Measured on MMLU-Pro's 31 recorded LLMs (``moe eval --suite mmlu-pro-combine``): see that suite's report.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from router.files import atomic_write_text

if TYPE_CHECKING:
    from router.outcome import OutcomeRecord

__all__ = ["ANSWER_BIAS_GRID", "ANSWER_BIAS_L2", "BIAS_MIN_ANSWERS", "CV_FOLDS", "CV_MIN_RECORDS", "FILE_NAME",
           "L2_GRID", "LENGTH_CLIP", "VoteWeights", "cross_validate", "fit_from_records", "fit_vote_weights",
           "length_feature", "vote_accuracy"]

FILE_NAME = "vote_weights.json"
# 2 added the length term, 3 the answer bias. A file without biases is written as format 2, so code from before
# the bias still reads it; a file with them is refused by that code instead of being served without them.
_FORMAT = 3
_READABLE = (1, 2, 3)
BIAS_MIN_ANSWERS = 20  # an expert's answer gets a bias once the expert gave it this often in training
ANSWER_BIAS_L2 = 100.0  # the answer bias's penalty where too few records are there to choose it by cross-validation
DEFAULT_L2 = 10.0  # the weights' penalty likewise
# What cross-validation chooses among (``combiner.vote_l2: cv``, ``combiner.vote_answer_bias_l2: cv``); for the
# answer bias, no bias at all is a choice too.
L2_GRID = (1.0, 10.0, 30.0, 100.0, 300.0)
ANSWER_BIAS_GRID = (30.0, 100.0, 300.0)
CV_FOLDS = 5
CV_MIN_RECORDS = 50  # fewer records that can teach: no cross-validation, the defaults above
LENGTH_CLIP = 3.0  # the length feature's bound: answers 20x longer or shorter than the median count as 20x


def length_feature(chars: np.ndarray, median: np.ndarray) -> np.ndarray:
    """``log(chars / median)`` clipped to +-``LENGTH_CLIP``; 0 where either is unknown (NaN) or not positive (an
    empty answer gets no length term). Broadcasts: ``chars`` [..., m] against ``median`` [m]."""
    chars, median = np.asarray(chars, dtype=float), np.asarray(median, dtype=float)
    known = np.isfinite(chars) & (chars > 0) & np.isfinite(median) & (median > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        f = np.log(chars / median)
    return np.where(known, np.clip(f, -LENGTH_CLIP, LENGTH_CLIP), 0.0)


@dataclass(frozen=True)
class VoteWeights:
    """One learned vote weight per expert."""

    experts: tuple[str, ...]
    weights: np.ndarray  # [m], finite and >= 0 (refused otherwise)
    metrics: dict[str, Any] = field(default_factory=dict)
    length_coef: float = 0.0  # beta of the length term; 0: answers count for their weight alone
    median_chars: np.ndarray | None = None  # [m] each expert's median answer length (NaN: unknown)
    # expert -> answer -> the learned bias of that answer by that expert (answers absent: 0)
    answer_bias: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {e: j for j, e in enumerate(self.experts)})
        if self.weights.shape != (len(self.experts),):
            raise ValueError(f"vote weights: {self.weights.shape[0]} weights for {len(self.experts)} experts")
        if self.median_chars is not None and self.median_chars.shape != self.weights.shape:
            raise ValueError(f"vote weights: {self.median_chars.shape[0]} median lengths for "
                             f"{len(self.experts)} experts")
        refused = [(e, w) for e, w in zip(self.experts, self.weights.tolist(), strict=True)
                   if not (isinstance(w, int | float) and np.isfinite(w) and w >= 0)]
        if refused:
            expert, weight = refused[0]
            raise ValueError(f"vote weights: {expert}'s weight must be a finite number >= 0, not {weight!r}")
        if not np.isfinite(self.length_coef):
            raise ValueError(f"vote weights: length_coef must be a finite number, not {self.length_coef}")
        stray = sorted(set(self.answer_bias) - set(self.experts))
        if stray:
            raise ValueError(f"vote weights: answer biases for experts without a weight: {', '.join(stray)}")
        for expert, biases in self.answer_bias.items():
            bad = [a for a, b in biases.items() if not isinstance(b, int | float) or not np.isfinite(b)]
            if bad:
                raise ValueError(f"vote weights: {expert}'s answer bias for {bad[0]!r} must be a finite number, "
                                 f"not {biases[bad[0]]!r}")

    def as_mapping(self) -> dict[str, float]:
        return {e: float(w) for e, w in zip(self.experts, self.weights, strict=True)}

    def counted(self, chars: np.ndarray, columns: np.ndarray | slice = slice(None),
                answers: np.ndarray | None = None) -> np.ndarray:
        """What answers of these lengths count for: ``[..., m]`` chars (NaN: no length) -> ``[..., m]``;
        with ``columns``, the chars are those experts' only. ``answers`` (the same shape, the extracted answers
        as strings; "" or None: none) adds each answer's bias."""
        weights = np.broadcast_to(self.weights[columns], np.shape(chars)).astype(float)
        if self.median_chars is not None and self.length_coef != 0.0:
            weights = weights + self.length_coef * length_feature(chars, self.median_chars[columns])
        if answers is not None and self.answer_bias:
            weights = weights + self.bias_of(answers, columns)
        return np.maximum(weights, 0.0)

    def bias_of(self, answers: np.ndarray, columns: np.ndarray | slice = slice(None)) -> np.ndarray:
        """``[..., m]`` each answer's bias (0 where an answer has none) for ``[..., m]`` extracted answers of the
        experts in ``columns``."""
        answers = np.asarray(answers, dtype=object)
        names = np.array(self.experts, dtype=object)[columns]
        out = np.zeros(answers.shape)
        for j, expert in enumerate(np.atleast_1d(names)):
            biases = self.answer_bias.get(str(expert))
            if biases:
                column = answers[..., j]
                out[..., j] = np.reshape([biases.get(a, 0.0) if a else 0.0 for a in np.ravel(column)],
                                         np.shape(column))
        return out

    def count_for(self, expert: str, chars: int, answer: str | None = None) -> float | None:
        """What one answer of ``chars`` characters by ``expert`` counts for (with its bias when ``answer``, the
        extracted answer, has one); None when ``expert`` has no learned weight."""
        j = self._index.get(expert)
        if j is None:
            return None
        return float(self.counted(np.array([float(chars)]), np.array([j]), np.array([answer], dtype=object))[0])

    def restrict(self, names: Sequence[str]) -> VoteWeights:
        """The weights of the experts among ``names`` (a config's experts), in this object's order."""
        wanted = set(names)
        keep = [j for j, e in enumerate(self.experts) if e in wanted]
        return VoteWeights(experts=tuple(self.experts[j] for j in keep), weights=self.weights[keep],
                           metrics=self.metrics, length_coef=self.length_coef,
                           median_chars=None if self.median_chars is None else self.median_chars[keep],
                           answer_bias={e: b for e, b in self.answer_bias.items() if e in wanted})

    def as_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"format": _FORMAT if self.answer_bias else 2, "experts": list(self.experts),
                               "weights": self.weights.tolist(), "length_coef": self.length_coef}
        if self.median_chars is not None:  # JSON has no NaN: an unknown median is null
            doc["median_chars"] = [None if np.isnan(v) else float(v) for v in self.median_chars]
        if self.answer_bias:
            doc["answer_bias"] = {e: {a: float(b) for a, b in biases.items()} for e, biases in self.answer_bias.items()}
        return {**doc, "metrics": self.metrics}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], where: str = "vote weights") -> VoteWeights:
        if doc.get("format") not in _READABLE:
            raise ValueError(f"{where}: unknown format {doc.get('format')!r}; this version reads "
                             f"{', '.join(map(str, _READABLE))}")
        try:
            medians = doc.get("median_chars")
            bias = doc.get("answer_bias") or {}
            return cls(experts=tuple(doc["experts"]), weights=np.asarray(doc["weights"], dtype=float),
                       metrics=dict(doc.get("metrics") or {}), length_coef=float(doc.get("length_coef", 0.0)),
                       median_chars=None if medians is None else np.array(
                           [np.nan if v is None else v for v in medians], dtype=float),
                       answer_bias={str(e): {str(a): float(b) for a, b in biases.items()}
                                    for e, biases in bias.items()})
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: malformed ({exc})") from exc

    def save(self, directory: str | Path) -> Path:
        return atomic_write_text(Path(directory) / FILE_NAME, json.dumps(self.as_dict(), indent=1) + "\n")

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


def _chars(lengths: Sequence[Sequence[float | None]]) -> np.ndarray:
    """``[n, m]`` answer lengths as floats, NaN where unknown."""
    return np.array([[np.nan if v is None else float(v) for v in row] for row in lengths], dtype=float)


def _medians(answers: Sequence[Sequence[str | None]], chars: np.ndarray) -> np.ndarray:
    """[m] each expert's median length over the answers it gave (NaN: none with a length)."""
    given = np.array([[a is not None for a in row] for row in answers], dtype=bool).reshape(chars.shape)
    lengths = np.where(given & np.isfinite(chars) & (chars > 0), chars, np.nan)
    out = np.full(chars.shape[1], np.nan)
    seen = ~np.all(np.isnan(lengths), axis=0)
    out[seen] = np.nanmedian(lengths[:, seen], axis=0)
    return out


def _bias_slots(answers: Sequence[Sequence[str | None]], kept: np.ndarray,
                experts: Sequence[str]) -> tuple[list[tuple[str, str]], np.ndarray]:
    """The (expert, answer) pairs that get an answer bias (given at least ``BIAS_MIN_ANSWERS`` times over all
    ``answers``), and ``[len(kept), m]`` each kept record's answer's slot among them (-1: none)."""
    counts: dict[tuple[int, str], int] = {}
    for row in answers:
        for e, a in enumerate(row):
            if a is not None:
                counts[(e, a)] = counts.get((e, a), 0) + 1
    slots = sorted(k for k, n in counts.items() if n >= BIAS_MIN_ANSWERS)
    index = {k: s for s, k in enumerate(slots)}
    where = np.array([[index.get((e, a), -1) if a is not None else -1 for e, a in enumerate(answers[i])]
                      for i in kept], dtype=np.int64).reshape(len(kept), len(experts))
    return [(experts[e], a) for e, a in slots], where


def fit_vote_weights(answers: Sequence[Sequence[str | None]], target: Sequence[str | None],
                     experts: Sequence[str], *, l2: float = 1.0, max_iter: int = 500,
                     lengths: Sequence[Sequence[float | None]] | None = None,
                     answer_bias_l2: float | None = None) -> VoteWeights:
    """Weights for ``experts`` from ``answers[i][e]`` (expert e's extracted answer to record i; None: it gave
    none) and ``target[i]`` (the right answer; None: unknown). With ``lengths[i][e]`` (the characters of expert
    e's whole answer to record i; None: unknown) the length term is fitted too, and with ``answer_bias_l2`` (its
    L2 penalty) the answer bias (see the module). Raises ``ValueError`` when no record can teach anything."""
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
        chars = _chars(lengths)
        medians = _medians(answers, chars)
        feature = length_feature(chars[kept], medians)
    if answer_bias_l2 is not None and not (np.isfinite(answer_bias_l2) and answer_bias_l2 > 0):
        raise ValueError(f"answer_bias_l2 must be a positive number, not {answer_bias_l2}")
    slots, slot_of = _bias_slots(answers, kept, experts) if answer_bias_l2 is not None else ([], None)
    rows = np.arange(n)
    voted = choice >= 0
    vote_rows, vote_cols = np.nonzero(voted)  # one entry per answer given
    vote_cands = choice[vote_rows, vote_cols]
    vote_feature = feature[vote_rows, vote_cols]
    vote_slot = slot_of[vote_rows, vote_cols] if slot_of is not None else np.full(len(vote_rows), -1)
    biased = vote_slot >= 0
    nb = len(slots)
    bias_l2 = answer_bias_l2 or 0.0

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        w, beta, bias = params[:m], params[m], params[m + 1:]
        per_answer = w[vote_cols] + beta * vote_feature
        per_answer[biased] += bias[vote_slot[biased]]
        scores = np.zeros(mask.shape)
        np.add.at(scores, (vote_rows, vote_cands), per_answer)  # each candidate's tally
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
        grad_bias = np.zeros(nb)
        np.add.at(grad_bias, vote_slot[biased], per_vote[biased])
        penalty = 0.5 * l2 * float(w @ w) + 0.5 * bias_l2 * float(bias @ bias)
        return nll + penalty, np.r_[grad + l2 * w, float(per_vote @ vote_feature), grad_bias + bias_l2 * bias]

    # The length term is unpenalised (one coefficient, fitted on every answer) and held at 0 without lengths.
    beta_bounds = (None, None) if lengths is not None else (0.0, 0.0)
    result = minimize(loss, np.r_[np.ones(m), 0.0, np.zeros(nb)], jac=True, method="L-BFGS-B",
                      bounds=[(0.0, None)] * m + [beta_bounds] + [(None, None)] * nb, options={"maxiter": max_iter})
    metrics = {"records": len(answers), "records_used": n, "nll_per_record": float(result.fun) / n,
               "l2": l2, "converged": bool(result.success), "length_term": lengths is not None,
               "answer_bias_l2": answer_bias_l2, "answer_biases": nb}
    answer_bias: dict[str, dict[str, float]] = {}
    for (expert, answer), b in zip(slots, result.x[m + 1:], strict=True):
        answer_bias.setdefault(expert, {})[answer] = float(b)
    return VoteWeights(experts=tuple(experts), weights=result.x[:m], metrics=metrics,
                       length_coef=float(result.x[m]), median_chars=medians, answer_bias=answer_bias)


def vote_accuracy(weights: VoteWeights, answers: Sequence[Sequence[str | None]], target: Sequence[str | None],
                  lengths: Sequence[Sequence[float | None]] | None = None) -> tuple[int, int]:
    """How many records the weighted vote over *all* their answers gets right, out of how many could be (their
    right answer among their answers): ``(right, scored)``. Each answer counts for what ``weights`` say for its
    expert, its length (``lengths``; None: no length) and the answer; a tie goes to the answer given first."""
    m = len(weights.experts)
    choice, mask, y, kept = _candidates(answers, target, m)
    if not len(y):
        return 0, 0
    chars = np.full(choice.shape, np.nan) if lengths is None else _chars([lengths[i] for i in kept])
    given = np.array([["" if a is None else a for a in answers[i]] for i in kept], dtype=object)
    counts = weights.counted(chars, answers=given)
    rows, cols = np.nonzero(choice >= 0)
    tally = np.zeros(mask.shape)
    np.add.at(tally, (rows, choice[rows, cols]), counts[rows, cols])
    return int(np.sum(np.where(mask, tally, -np.inf).argmax(axis=1) == y)), len(y)


def cross_validate(answers: Sequence[Sequence[str | None]], target: Sequence[str | None], experts: Sequence[str],
                   *, lengths: Sequence[Sequence[float | None]] | None = None, l2: float | None = None,
                   answer_bias: bool = False, answer_bias_l2: float | None = None, folds: int = CV_FOLDS,
                   seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """The penalties for ``fit_vote_weights`` chosen by ``folds``-fold cross-validation over the records that can
    teach (their right answer among their answers): first the weights' L2 among ``L2_GRID`` (unless ``l2`` is
    given), then, with ``answer_bias``, the answer bias's among no bias and ``ANSWER_BIAS_GRID`` (unless
    ``answer_bias_l2`` is given), each by the held-out records' ``vote_accuracy``. A tie keeps the heavier
    penalty, and no bias over any. With fewer than ``CV_MIN_RECORDS`` such records nothing is cross-validated:
    the defaults (``DEFAULT_L2``, ``ANSWER_BIAS_L2``) stand. Returns ``l2``, ``answer_bias_l2`` (None: no bias)
    and what was scored (``grid``: each setting's held-out accuracy)."""
    *_, kept = _candidates(answers, target, len(experts))
    chosen: dict[str, Any] = {"l2": DEFAULT_L2 if l2 is None else l2,
                              "answer_bias_l2": (ANSWER_BIAS_L2 if answer_bias_l2 is None else answer_bias_l2)
                              if answer_bias else None,
                              "folds": folds, "records": len(kept), "grid": []}
    if len(kept) < max(CV_MIN_RECORDS, folds) or (l2 is not None and (not answer_bias or answer_bias_l2 is not None)):
        chosen["folds"] = 0
        return chosen
    def part(rows: Sequence[int]) -> tuple[list[Sequence[str | None]], list[str | None],
                                           list[Sequence[float | None]] | None]:
        return ([answers[i] for i in rows], [target[i] for i in rows],
                None if lengths is None else [lengths[i] for i in rows])

    splits = []  # (fit part, held-out part) per fold, sliced once for every setting
    for hold in np.array_split(np.random.default_rng(seed).permutation(kept), folds):
        held = set(hold.tolist())
        splits.append((part([i for i in range(len(answers)) if i not in held]), part(hold.tolist())))
    scores: dict[tuple[float, float | None], float] = {}

    def score(weight_l2: float, bias_l2: float | None) -> float:
        if (weight_l2, bias_l2) not in scores:
            right = total = 0
            for (fit_answers, fit_target, fit_lengths), held_out in splits:
                fitted = fit_vote_weights(fit_answers, fit_target, experts, l2=weight_l2, lengths=fit_lengths,
                                          answer_bias_l2=bias_l2)
                r, t = vote_accuracy(fitted, *held_out)
                right, total = right + r, total + t
            scores[(weight_l2, bias_l2)] = right / total
            chosen["grid"].append({"l2": weight_l2, "answer_bias_l2": bias_l2, "accuracy": right / total})
            if progress:
                bias = "none" if bias_l2 is None else f"{bias_l2:g}"
                print(f"  vote weights, {folds}-fold cross-validation: L2 {weight_l2:g}, answer bias {bias}: "
                      f"held-out accuracy {right / total:.4f}", flush=True)
        return scores[(weight_l2, bias_l2)]

    # max() keeps the first of equals: heaviest penalty first, and no bias before any.
    if l2 is None:
        chosen["l2"] = max(sorted(L2_GRID, reverse=True), key=lambda v: score(v, None))
    if answer_bias and answer_bias_l2 is None:
        options: list[float | None] = [None, *sorted(ANSWER_BIAS_GRID, reverse=True)]
        chosen["answer_bias_l2"] = max(options, key=lambda o: score(chosen["l2"], o))
    return chosen


def fit_from_records(records: Sequence[OutcomeRecord], experts: Sequence[str],
                     extract: Callable[[str], str | None], *, l2: float | Literal["cv"] = DEFAULT_L2,
                     length_term: bool = True, answer_bias_l2: float | Literal["cv"] | None = None,
                     progress: bool = False, per_expert: Mapping[str, Callable[[str], str | None]] | None = None,
                     seed: int = 0) -> VoteWeights:
    """Vote weights from outcome records that carry ``answers``. Each answer's final answer is read with
    ``extract`` (the combiner's extractor), or its expert's own in ``per_expert`` (``experts[].extractor``), as
    the vote will read it; a record's right answer is the one its successful experts (outcome
    at least 0.5) gave, and a record whose successful experts disagree, or that has none, teaches nothing.
    ``length_term``: fit the length term on the answers' lengths too; ``answer_bias_l2``: fit the answer bias
    with this penalty (None: no answer bias). ``"cv"`` for either penalty: choose it by cross-validation over the
    records (``cross_validate``, seeded by ``seed``; for the answer bias, no bias can win), recorded in the
    weights' ``metrics["cross_validation"]``. Raises ``ValueError`` naming what is missing when no record
    carries answers."""
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
    fit_lengths = lengths if length_term else None
    fixed_l2 = None if l2 == "cv" else float(l2)
    fixed_bias = None if answer_bias_l2 is None or answer_bias_l2 == "cv" else float(answer_bias_l2)
    cv = None
    if fixed_l2 is None or answer_bias_l2 == "cv":
        cv = cross_validate(answers, target, experts, lengths=fit_lengths, l2=fixed_l2,
                            answer_bias=answer_bias_l2 is not None, answer_bias_l2=fixed_bias, seed=seed,
                            progress=progress)
        fixed_l2, fixed_bias = cv["l2"], cv["answer_bias_l2"]
    if progress:
        print(f"fitting vote weights on {len(with_answers)} records with answers", flush=True)
    weights = fit_vote_weights(answers, target, experts, l2=float(fixed_l2), lengths=fit_lengths,
                               answer_bias_l2=fixed_bias)
    weights.metrics["records_with_answers"] = len(with_answers)
    if cv is not None:
        weights.metrics["cross_validation"] = cv
    return weights
