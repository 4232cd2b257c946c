"""``mmlu-pro-combine``: route to a top-k panel and combine the panel's recorded answers, scored offline.

Same data and seeded id split as ``mmlu-pro-outcome`` (``eval.routing``): the gate's success model
(``eval.outcome.NeighbourOutcomes``: the shrunk success rate of each expert on the query's nearest training
queries) ranks the experts of the pool, the top ``k`` form the panel, and each member's *recorded* letter
(``pred.csv``) is its answer. Strategies scored:

- ``top1``: the gate's single choice (argmax of predicted success, with a margin over the best single expert,
  as the served outcome gate routes);
- ``vote``: ``router.combine.Vote`` over the panel, weights from predicted success (``uniform``, ``success`` or
  ``logodds``: ``log(9 p / (1 - p))``, the optimal weight of an independent voter with accuracy ``p`` among 10
  options, floored at 0);
- ``consensus``: ``router.combine.Consensus`` over one-hot letter embeddings: weighted agreement, the same
  letter as ``vote`` by construction (checked, not assumed).
- ``learned_vote``: the same routed panel, but each member's letter counts for its *learned* vote weight
  (``router.vote_weights``: per-expert weights fitted jointly on the training questions' recorded letters, so
  experts that err together are discounted), as ``combiner.vote_weights: learned`` with
  ``combiner.vote_length: false`` serves it.
- ``learned_length_vote``: the learned vote with its length term (an answer longer or shorter than its expert's
  median counts for more or less, as fitted), as ``combiner.vote_weights: learned`` serves it by default.
- Either learned vote may add the answer bias (``router.vote_weights``: how much more or less an expert's vote
  counts when it gives one of its favourite letters; ``combiner.vote_answer_bias``), with its penalty, or
  without it, chosen by cross-validation.
- ``fuse`` needs an aggregator model to write an answer, so it cannot be scored from recordings.
- ``stacked_reference`` (a reference, never the headline: it calls every pool model): a gradient-boosted
  classifier over all the pool's recorded answers (``eval.combine_reference``), to show how much room the
  recordings leave above the served votes.

The panel's size ``k``, the weights and the success model's prior (overall, or the task prior the served
outcome gate learns from records that name their task: ``router.outcome.TaskPrior``, each MMLU-Pro category's
success rates mixed by an embedding classifier's category probabilities for the question, as serving knows it,
never its recorded category), the learned votes' panel sizes and L2 penalties, and which strategy
is the suite's headline (``chosen_strategy``) are chosen by 5-fold cross-validation over train + val: one
1,200-question validation split has a standard error of about 1.2 points, too coarse to tell these strategies
apart, and the folds together score every one of the 9,658 questions. Everything is then refitted on train +
val, and the test split is scored once.
A model with no record for a question abstains (no vote); a panel with no vote at all is wrong.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from eval import metrics as M
from eval.combine_reference import stacked_letters
from eval.outcome import NeighbourOutcomes, route_with_margin
from eval.report import plot_accuracy_bars
from eval.routing import FRACTIONS, mmlu_pro_split
from eval.suite import SuiteContext, as_float
from router.combine import Combiner, Consensus, Vote, choice_embedding
from router.outcome import TaskPrior, shrunk_success
from router.vote_weights import ANSWER_BIAS_GRID as BIAS_PENALTIES
from router.vote_weights import BIAS_MIN_ANSWERS, L2_GRID, VoteWeights, fit_vote_weights

__all__ = ["ANSWER_BIAS_GRID", "LEARNED", "POOLS", "SMALL_OPEN", "identical_groups", "mean_interval",
           "panel_letters", "plot_strategies", "pool_models", "run_mmlu_pro_combine", "weights_of"]

LETTERS = "ABCDEFGHIJ"
# Open models of at most 8x7B parameters among MMLU-Pro's 31.
SMALL_OPEN = (
    "Llama-2-7b-hf", "Llama-2-13b-hf", "Meta-Llama-3-8B", "Meta-Llama-3_1-8B", "Meta-Llama-3_1-8B-Instruct",
    "Mistral-7B-v0.1", "Mistral-7B-v0.2-hf", "Mistral-7B-Instruct-v0.1", "Mistral-7B-Instruct-v0.2",
    "Mixtral-8x7B-v0.1", "Mixtral-8x7B-Instruct-v0.1", "Phi-3-mini-4k-instruct", "Qwen1.5-7B-Chat", "Yi-6B",
    "Yi-6b-Chat", "gemma-7b", "mathstral-7B",
)
POOLS: dict[str, tuple[str, ...] | None] = {"all": None, "small": SMALL_OPEN}
PANEL_SIZES = (1, 3, 5, 7, 9)
WEIGHTS = ("uniform", "success", "logodds")
PRIORS = ("overall", "task")
K_NEIGHBOURS = (50, 100, 200)
ALPHAS = (3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, float("inf"))  # inf: the prior alone
MARGINS = (0.0, 0.02, 0.05, 0.1, np.inf)
N_BOOT = 1000
TARGETS = {"all": 0.05, "small": 0.07}  # issue 4: points over the pool's best single model
# The learned vote's penalties: moe train's grids (router.vote_weights), and for the bias, None: no answer bias.
ANSWER_BIAS_GRID = (None, *BIAS_PENALTIES)
N_FOLDS = 5  # cross-validation over train + val chooses every setting
# The strategies the headline is chosen among, simplest first (a tie keeps the earlier one).
CANDIDATES = ("vote", "learned_vote", "learned_length_vote")
LEARNED = {"learned_vote": False, "learned_length_vote": True}  # learned strategy -> fitted with the length term


def pool_models(spec: str | None, available: Sequence[str]) -> list[str]:
    """The experts of ``--pool``: ``all``, ``small``, or comma-separated names (each must be recorded)."""
    spec = spec or "all"
    names = POOLS[spec] if spec in POOLS else tuple(n.strip() for n in spec.split(",") if n.strip())
    if names is None:
        return list(available)
    unknown = [n for n in names if n not in available]
    if unknown or len(names) < 2:
        raise ValueError(f"--pool needs at least two recorded models; unknown: {', '.join(unknown) or '-'}; "
                         f"known: all, small, {', '.join(available)}")
    return list(names)


def weights_of(success: np.ndarray, scheme: str, options: float | np.ndarray = 10) -> np.ndarray:
    """Vote weights from predicted success; a tiny rank term makes ties go to the higher-ranked expert.

    ``options``: how many answers a question offers (``logodds`` only; a scalar, or ``[n, 1]`` per query;
    MMLU-Pro's ten letters by default)."""
    if scheme == "uniform":
        w = np.ones_like(success)
    elif scheme == "success":
        w = success.copy()
    elif scheme == "logodds":
        p = np.clip(success, 1e-3, 1 - 1e-3)
        w = np.maximum(np.log((np.asarray(options, dtype=float) - 1) * p / (1 - p)), 0.0)
    else:
        raise ValueError(f"unknown weight scheme {scheme!r}; known: {', '.join(WEIGHTS)}")
    return w + 1e-6 * success


def panel_letters(onehot: np.ndarray, panels: np.ndarray, weights: np.ndarray,
                  tie_weights: np.ndarray | None = None) -> np.ndarray:
    """Weighted vote per query: ``onehot`` [n, m, 10], ``panels`` and ``weights`` [n, k] -> letter index
    [n], -1 where no member voted (every member abstained).

    As ``router.combine.Vote`` decides: the winner is the letter of the member with the highest (tally of its
    letter, its own weight), rounded to 9 places, the first member in the panel on a full tie. ``tie_weights``
    [n, k] (the panel weights under learned counts) break ties of the counts as Vote's second strength does:
    (tally, tie tally, own weight, own tie weight)."""
    rows = np.arange(len(panels))[:, None]
    votes = onehot[rows, panels].astype(float)  # [n, k, 10]
    voted = votes.any(axis=2)  # [n, k]
    letter = np.where(voted, votes.argmax(axis=2), 0)
    strengths = [weights] if tie_weights is None else [weights, tie_weights]
    tallies = [(votes * w[:, :, None]).sum(axis=1)[rows, letter] for w in strengths]  # each member's letter's
    best = voted.copy()
    for key in (*tallies, *strengths):  # most significant first
        value = np.where(best, np.round(key, 9), -np.inf)
        best &= value >= value.max(axis=1, keepdims=True)
    first = best.argmax(axis=1)  # the first member on a full tie
    return np.where(voted.any(axis=1), letter[rows[:, 0], first], -1)


def _accuracy(letters: np.ndarray, gold: np.ndarray) -> float:
    return float(np.mean(letters == gold))


class _Scorer:
    """Success estimates over the pool from a fit split, with either prior: each expert's overall rate
    (``overall``), or the served gate's task prior (``task``: ``router.outcome.TaskPrior`` fitted on the fit rows'
    embeddings, recorded categories and outcomes; a scored question's prior mixes the categories by the
    classifier's probabilities, never reading its recorded category)."""

    def __init__(self, x: np.ndarray, outcomes: np.ndarray, category: np.ndarray, fit: np.ndarray,
                 seed: int = 0) -> None:
        self.x, self.outcomes, self.fit = x, outcomes, fit
        self.model = NeighbourOutcomes(x[fit], outcomes[fit])
        self.task_prior = TaskPrior.fit(x[fit], list(category[fit]), outcomes[fit], seed=seed)
        self._priors: dict[bytes, np.ndarray] = {}

    def success(self, rows: np.ndarray, k: int, alpha: float, prior: str) -> np.ndarray:
        ids = self.model.neighbours(self.x[rows], k)
        base = self.model.prior
        if prior == "task" and self.task_prior is not None:
            key = rows.tobytes()
            if key not in self._priors:  # the same rows are scored at every k and alpha
                self._priors[key] = self.task_prior.predict(self.x[rows], self.model.embeddings, ids)
            base = self._priors[key]
        return shrunk_success(self.model.outcomes[ids], base, alpha)


@dataclass(frozen=True)
class _Data:
    """The pool's recordings over every question: embeddings, outcomes, letters, answer lengths."""

    models: list[str]
    x: np.ndarray  # [n, d] prompt embeddings
    outcomes: np.ndarray  # [n, m] 1/0, NaN: no record
    onehot: np.ndarray  # [n, m, 10] the recorded letter
    chars: np.ndarray  # [n, m] the recorded answer's length in characters, NaN where no letter
    gold: np.ndarray  # [n] the right letter's index
    category: np.ndarray  # [n]

    def fit_weights(self, rows: np.ndarray, l2: float, length: bool,
                    answer_bias_l2: float | None = None) -> VoteWeights:
        """Learned vote weights fitted on ``rows``' letters (and lengths, with the length term; and the answer
        bias, with its penalty)."""
        lengths = [[None if np.isnan(v) else float(v) for v in row] for row in self.chars[rows]] if length else None
        return fit_vote_weights(_answers(self.onehot, rows), [LETTERS[g] for g in self.gold[rows]], self.models,
                                l2=l2, lengths=lengths, answer_bias_l2=answer_bias_l2)

    def counts(self, rows: np.ndarray, learned: VoteWeights) -> np.ndarray:
        """``[len(rows), m]`` what each recorded answer of ``rows`` counts for under ``learned``: its expert's
        weight and, when ``learned`` has them, the length term for its length and the bias of its letter."""
        return learned.counted(self.chars[rows], answers=_letter_matrix(self.onehot[rows]))


def _panels(success: np.ndarray, size: int) -> np.ndarray:
    """``[n, size]`` the routed panels: the experts of highest predicted success, best first."""
    return np.argsort(-success, axis=1, kind="stable")[:, :size]


def _vote(onehot: np.ndarray, success: np.ndarray, size: int, scheme: str) -> np.ndarray:
    panels = _panels(success, size)
    return panel_letters(onehot, panels, weights_of(np.take_along_axis(success, panels, 1), scheme))


def _letter_matrix(onehot: np.ndarray) -> np.ndarray:
    """``[..., m]`` the recorded letters of ``onehot`` ``[..., m, 10]`` as strings; "" where none was recorded."""
    return np.where(onehot.max(axis=-1) > 0, np.array(list(LETTERS), dtype=object)[onehot.argmax(axis=-1)], "")


def _answers(onehot: np.ndarray, rows: np.ndarray) -> list[list[str | None]]:
    """Each row's recorded letters, one slot per expert (None: no record)."""
    return [[letter or None for letter in row] for row in _letter_matrix(onehot[rows]).tolist()]


def _learned_vote(onehot: np.ndarray, success: np.ndarray, size: int, counts: np.ndarray) -> np.ndarray:
    """The routed panel (top ``size`` by predicted success) voting with learned weights: each answer counts for
    its entry of ``counts`` (``_Data.counts``)."""
    panels = _panels(success, size)
    counted = np.take_along_axis(counts, panels, 1)
    # The panel weight (here: predicted success) breaks ties, as in Vote with learned weights.
    return panel_letters(onehot, panels, counted, np.take_along_axis(success, panels, 1))


def folds_of(rows: np.ndarray, seed: int, n: int = N_FOLDS) -> list[np.ndarray]:
    """``rows`` in ``n`` seeded, disjoint folds of near-equal size."""
    order = np.random.default_rng(seed).permutation(rows)
    return [np.sort(f) for f in np.array_split(order, n)]


def _mean_grid(scores: Mapping[tuple[Any, ...], list[float]], keys: Sequence[str]) -> list[dict[str, Any]]:
    return [{**dict(zip(keys, setting, strict=True)), "cv_accuracy": float(np.mean(accs))}
            for setting, accs in scores.items()]


def _cross_validate(data: _Data, fit: np.ndarray, best: int, seed: int,
                    progress: bool) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Every setting's mean held-out accuracy over ``N_FOLDS`` folds of ``fit`` (train + val): each fold is
    scored with the success model (and learned weights) of the other folds. Returns the grids and the best
    setting of each kind: vote (prior, neighbours, alpha, panel size, weights), top-1 (prior, neighbours, alpha,
    margin), learned vote and learned vote with the length term (L2, panel size)."""
    folds = folds_of(fit, seed)
    vote: dict[tuple[Any, ...], list[float]] = {}
    top1: dict[tuple[Any, ...], list[float]] = {}
    held: list[tuple[np.ndarray, np.ndarray, _Scorer]] = []
    for i, hold in enumerate(folds):
        rest = np.setdiff1d(fit, hold)
        scorer = _Scorer(data.x, data.outcomes, data.category, rest, seed)
        held.append((hold, rest, scorer))
        for prior, k, alpha in itertools.product(PRIORS, K_NEIGHBOURS, ALPHAS):
            s = scorer.success(hold, k, alpha, prior)
            for size, scheme in itertools.product(PANEL_SIZES, WEIGHTS):
                vote.setdefault((prior, k, alpha, size, scheme), []).append(
                    _accuracy(_vote(data.onehot[hold], s, size, scheme), data.gold[hold]))
            for margin in MARGINS:
                picks = route_with_margin(s, best, margin)
                top1.setdefault((prior, k, alpha, float(margin)), []).append(
                    _accuracy(_letters_of(data.onehot[hold], picks), data.gold[hold]))
        if progress:
            print(f"  cross-validation, fold {i + 1}/{len(folds)}: vote and top-1 settings scored", flush=True)
    grid = _mean_grid(vote, ("prior", "neighbours", "alpha", "k", "weights"))
    # Ties prefer the smaller panel (fewer calls), then the simpler weights and prior (the grid's order).
    chosen = max(grid, key=lambda g: (round(g["cv_accuracy"], 12), -g["k"]))
    top1_grid = _mean_grid(top1, ("prior", "neighbours", "alpha", "margin"))
    chosen_top1 = max(top1_grid, key=lambda g: (round(g["cv_accuracy"], 12), g["margin"]))
    learned: dict[tuple[Any, ...], list[float]] = {}
    # The chosen success model's estimates for each held-out fold: the learned votes' panels, with and without bias.
    success = [scorer.success(hold, chosen["neighbours"], chosen["alpha"], chosen["prior"]) for hold, _, scorer in held]
    for i, ((hold, rest, _), s) in enumerate(zip(held, success, strict=True)):
        for l2, length in itertools.product(L2_GRID, (False, True)):
            counts = data.counts(hold, data.fit_weights(rest, l2, length))
            for size in PANEL_SIZES:
                learned.setdefault((length, l2, size), []).append(_accuracy(
                    _learned_vote(data.onehot[hold], s, size, counts), data.gold[hold]))
        if progress:
            print(f"  cross-validation, fold {i + 1}/{len(folds)}: learned votes fitted and scored", flush=True)
    learned_grid = _mean_grid(learned, ("length_term", "l2", "k"))
    best_learned = {
        name: max((g for g in learned_grid if g["length_term"] == length),
                  key=lambda g: (round(g["cv_accuracy"], 12), -g["k"], g["l2"]))
        for name, length in LEARNED.items()}
    # The answer bias, at each penalty, on top of each learned vote's chosen L2 and length term.
    biased: dict[tuple[Any, ...], list[float]] = {}
    for i, ((hold, rest, _), s) in enumerate(zip(held, success, strict=True)):
        for (name, length), bias_l2 in itertools.product(LEARNED.items(), ANSWER_BIAS_GRID[1:]):
            counts = data.counts(hold, data.fit_weights(rest, best_learned[name]["l2"], length, bias_l2))
            for size in PANEL_SIZES:
                biased.setdefault((name, bias_l2, size), []).append(_accuracy(
                    _learned_vote(data.onehot[hold], s, size, counts), data.gold[hold]))
        if progress:
            print(f"  cross-validation, fold {i + 1}/{len(folds)}: answer biases fitted and scored", flush=True)
    bias_grid = [{"strategy": name, "answer_bias_l2": None, "k": g["k"], "cv_accuracy": g["cv_accuracy"]}
                 for name, length in LEARNED.items() for g in learned_grid
                 if g["length_term"] == length and g["l2"] == best_learned[name]["l2"]]
    bias_grid += _mean_grid(biased, ("strategy", "answer_bias_l2", "k"))
    for name in LEARNED:
        # Ties prefer no bias (the simpler model), then the smaller panel and the heavier penalty.
        pick = max((g for g in bias_grid if g["strategy"] == name),
                   key=lambda g: (round(g["cv_accuracy"], 12), g["answer_bias_l2"] is None, -g["k"],
                                  g["answer_bias_l2"] or 0.0))
        best_learned[name] = {**best_learned[name], "answer_bias_l2": pick["answer_bias_l2"], "k": pick["k"],
                              "cv_accuracy": pick["cv_accuracy"]}
    return ({"vote": chosen, **best_learned}, chosen_top1, {"vote": grid, "top1": top1_grid},
            {"learned": learned_grid, "answer_bias": bias_grid})


def _bias_summary(weights: VoteWeights) -> str:
    """The fitted answer biases in a phrase: the penalty, how many, and the largest either way."""
    if not weights.answer_bias:
        return "none"
    flat = [(b, e, a) for e, biases in weights.answer_bias.items() for a, b in biases.items()]
    low, high = min(flat), max(flat)
    return (f"penalty {weights.metrics['answer_bias_l2']:g}, {len(flat)} biases from {low[0]:+.3f} ({low[1]} "
            f"giving {low[2]}) to {high[0]:+.3f} ({high[1]} giving {high[2]})")


def _task_accuracy(scorer: _Scorer, rows: np.ndarray, category: np.ndarray) -> float:
    """How often the task prior's classifier ranks a question's recorded category first."""
    prior = scorer.task_prior
    if prior is None:
        return float("nan")
    proba = prior.task_proba(scorer.x[rows], scorer.model.embeddings,
                             scorer.model.neighbours(scorer.x[rows], TaskPrior.VOTERS))
    return float(np.mean(np.array(prior.tasks)[proba.argmax(axis=1)] == category[rows]))


def _letters_of(onehot: np.ndarray, picks: np.ndarray) -> np.ndarray:
    row = onehot[np.arange(len(picks)), picks]  # [n, 10]
    return np.where(row.max(axis=1) > 0, row.argmax(axis=1), -1)


def _agreement(onehot: np.ndarray, chars: np.ndarray, panels: np.ndarray, weights: np.ndarray,
               names: Sequence[str], combiners: Mapping[str, Combiner],
               expected: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Run each of ``router.combine``'s ``combiners`` on the test panels (members' panel weights ``weights``);
    per combiner, the share of queries where it picks the letter the vectorised scoring chose (``expected``;
    1.0 expected: the suite scores what the combiners do). Each answer's text is its recorded letter written
    out to its recorded length (``chars``), so a learned length term sees what it would see served."""
    from router.combine import WeightedAnswer

    got: dict[str, list[int]] = {name: [] for name in combiners}
    for row, panel in enumerate(panels):
        answers = [WeightedAnswer(names[j], float(w), _text(onehot[row, j], chars[row, j]))
                   for j, w in zip(panel, weights[row], strict=True)]
        for name, combiner in combiners.items():
            letter = _letter(onehot[row, names.index(combiner.combine(answers).expert)])
            got[name].append(LETTERS.index(letter) if letter else -1)
    return {k: float(np.mean(np.array(v) == expected[k])) for k, v in got.items()}


def _letter(onehot_row: np.ndarray) -> str:
    """The recorded letter; "" when none was recorded."""
    return LETTERS[int(onehot_row.argmax())] if onehot_row.max() > 0 else ""


def _text(onehot_row: np.ndarray, chars: float = np.nan) -> str:
    """The recorded letter as an answer text, ``"...(C)"`` padded to ``chars`` characters when given; "" when
    none was recorded."""
    if onehot_row.max() <= 0:
        return ""
    letter = f"({_letter(onehot_row)})"
    return letter if np.isnan(chars) else letter.rjust(int(chars), ".")


def run_mmlu_pro_combine(ctx: SuiteContext) -> dict[str, Any]:
    from experts.recordings import load_mmlu_pro

    folder = ctx.data_dir / "mmlu_pro_outcomes"
    store = load_mmlu_pro(folder if folder.is_dir() else ctx.data_dir)
    pool_name = ctx.pool or "all"
    models = pool_models(pool_name, store.models)
    ids = [str(q.question_id) for q in store.questions]
    train, val, test, x, _ = mmlu_pro_split(ctx, store)
    onehot = np.zeros((len(ids), len(models), len(LETTERS)), dtype=np.float32)
    chars = np.full((len(ids), len(models)), np.nan)
    for j, m in enumerate(models):
        for i, o in enumerate(store.outcomes(m)):
            if o.pred is not None and o.pred in LETTERS:
                onehot[i, j, LETTERS.index(o.pred)] = 1.0
                chars[i, j] = np.nan if o.response_chars is None else max(float(o.response_chars), 3.0)
    data = _Data(models=models, x=x, outcomes=np.stack([as_float(store.correct(m)) for m in models], axis=1),
                 onehot=onehot, chars=chars, gold=np.array([LETTERS.index(q.answer) for q in store.questions]),
                 category=np.array([q.category for q in store.questions]))
    outcomes, gold = data.outcomes, data.gold

    fit = np.r_[train, val]
    fit_acc = np.nan_to_num(outcomes[fit]).mean(axis=0)  # missing = wrong, as for every system
    best = int(np.argmax(fit_acc))
    chosen, chosen_top1, grids, learned_grids = _cross_validate(data, fit, best, ctx.seed, ctx.progress)
    cv_scores = {name: chosen[name]["cv_accuracy"] for name in CANDIDATES}
    # The headline is the candidate with the best cross-validated accuracy; a tie keeps the simpler one.
    headline = max(CANDIDATES, key=lambda k: (round(cv_scores[k], 12), -CANDIDATES.index(k)))
    learned = {name: data.fit_weights(fit, chosen[name]["l2"], length, chosen[name]["answer_bias_l2"])
               for name, length in LEARNED.items()}
    scorer = _Scorer(x, outcomes, data.category, fit, ctx.seed)
    task_accuracy = _task_accuracy(scorer, test, data.category)
    cv = chosen["vote"]
    s = scorer.success(test, cv["neighbours"], cv["alpha"], cv["prior"])
    s_top1 = scorer.success(test, chosen_top1["neighbours"], chosen_top1["alpha"], chosen_top1["prior"])
    oh, g, ch = onehot[test], gold[test], chars[test]
    voted = _vote(oh, s, cv["k"], cv["weights"])
    learned_counts = {name: data.counts(test, w) for name, w in learned.items()}
    learned_voted = {name: _learned_vote(oh, s, chosen[name]["k"], c) for name, c in learned_counts.items()}
    routed = _letters_of(oh, route_with_margin(s_top1, best, chosen_top1["margin"]))
    single = _letters_of(oh, np.full(len(test), best))
    top3 = np.argsort(-fit_acc, kind="stable")[:3]
    fixed = panel_letters(oh, np.tile(top3, (len(test), 1)), np.tile(weights_of(fit_acc[top3], "uniform"),
                                                                     (len(test), 1)))
    panels = _panels(s, cv["k"])
    check = _agreement(oh, ch, panels, weights_of(np.take_along_axis(s, panels, 1), cv["weights"]), models,
                       {"vote": Vote("choice"), "consensus": Consensus(choice_embedding)},
                       {"vote": voted, "consensus": voted})
    for name, weights in learned.items():
        panels = _panels(s, chosen[name]["k"])
        check |= _agreement(oh, ch, panels, np.take_along_axis(s, panels, 1), models,
                            {name: Vote("choice", learned=weights)}, {name: learned_voted[name]})
        if check[name] != 1.0:
            learned_voted[name] = np.full(len(test), -2)  # never silently wrong: the suite scores the combiner
    consensus = voted if check["consensus"] == 1.0 else np.full(len(test), -2)
    if ctx.progress:
        print("  reference: a stacked classifier over every pool model's answers", flush=True)
    stacked = stacked_letters(onehot, chars, gold, fit, test, ctx.seed)
    correct = {"best_single": single == g, "top1": routed == g, "vote": voted == g, "consensus": consensus == g,
               **{name: letters == g for name, letters in learned_voted.items()}, "fixed_top3_vote": fixed == g,
               "stacked_reference": stacked == g}
    metrics: dict[str, Any] = {f"{k}_accuracy": float(v.mean()) for k, v in correct.items()}
    metrics["oracle_accuracy"] = M.oracle_accuracy(outcomes[test])
    for name in CANDIDATES:
        metrics[f"{name}_minus_best_single"] = metrics[f"{name}_accuracy"] - metrics["best_single_accuracy"]
    metrics["chosen_strategy"] = headline
    metrics["chosen_minus_best_single"] = metrics[f"{headline}_minus_best_single"]
    metrics["target_points"] = TARGETS.get(pool_name)
    metrics["target_met"] = (None if pool_name not in TARGETS
                             else bool(metrics["chosen_minus_best_single"] >= TARGETS[pool_name]))
    metrics["k"], metrics["pool"] = cv["k"], pool_name
    metrics["learned_k"], metrics["learned_length_k"] = chosen["learned_vote"]["k"], chosen["learned_length_vote"]["k"]
    metrics["length_coef"] = learned["learned_length_vote"].length_coef
    metrics["learned_answer_bias_l2"] = chosen["learned_vote"]["answer_bias_l2"]
    metrics["learned_length_answer_bias_l2"] = chosen["learned_length_vote"]["answer_bias_l2"]
    cis = {f"{k}_accuracy": mean_interval(v.astype(float), ctx.seed) for k, v in correct.items()}
    metrics["stacked_reference_minus_best_single"] = (metrics["stacked_reference_accuracy"]
                                                      - metrics["best_single_accuracy"])
    for key in (*CANDIDATES, "stacked_reference"):
        cis[f"{key}_minus_best_single"] = mean_interval(correct[key].astype(float) - correct["best_single"],
                                                        ctx.seed)
    by_size = {}
    for size in PANEL_SIZES:
        by_size[f"k={size}"] = {w: _accuracy(_vote(oh, s, size, w), g) for w in WEIGHTS}
        for name, counts in learned_counts.items():
            by_size[f"k={size}"][name] = _accuracy(_learned_vote(oh, s, size, counts), g)
    # A model's test accuracy as every strategy here is scored: its recorded letter against the gold one. The data
    # set's correct.csv, which the success model and the best single's choice learn from, disagrees with that on a
    # few records (the notes count them), so its mean would give one model two accuracies in one report.
    letter_correct = [_letters_of(oh, np.full(len(test), j)) == g for j in range(len(models))]
    recorded = ~np.isnan(outcomes[test])
    disagree = int(sum(np.sum(((outcomes[test, j] == 1.0) != letter_correct[j]) & recorded[:, j])
                       for j in range(len(models))))
    experts = {m: {"accuracy": float(letter_correct[j].mean()), "fit_accuracy": fit_acc[j],
                   "recorded_share": float(np.mean(recorded[:, j]))} for j, m in enumerate(models)}
    length = learned["learned_length_vote"]
    ctx.notes += [
        f"split by question id, fractions {FRACTIONS}, seed {ctx.seed} (the mmlu-pro-outcome split); every "
        f"setting (panel size, weights, neighbours, shrinkage, prior, L2, the headline strategy) chosen by "
        f"{N_FOLDS}-fold cross-validation over train + val ({len(fit)} questions, seeded folds), then refitted "
        "on all of train + val; test scored once",
        "answers are the models' recorded letters (pred.csv); a model with no record, or no extracted letter, "
        "for a question abstains (no vote); a panel where every member abstained is wrong, and so is a single "
        "model without a record",
        f"the experts table's test accuracy is of the recorded letters too; correct.csv, which the success model and "
        f"the best single's choice learn from (fit_accuracy), disagrees with them on {disagree} of this pool's "
        "test records",
        "consensus over one-hot letter embeddings is weighted agreement: the same letter as vote by "
        f"construction; checked by running router.combine's Vote and Consensus on every test panel "
        f"(agreement with the scored vote: vote {check['vote']:.4f}, consensus {check['consensus']:.4f}); the "
        f"learned votes likewise through Vote with their learned weights, each answer written out to its recorded "
        f"length (agreement {check['learned_vote']:.4f} and {check['learned_length_vote']:.4f})",
        f"learned vote weights (router.vote_weights; served with combiner.vote_weights: learned): "
        f"{learned['learned_vote'].metrics['records_used']} of {learned['learned_vote'].metrics['records']} "
        "train + val questions had the right letter among the recorded ones and taught the fit; learned_vote "
        "is served with combiner.vote_length: false, learned_length_vote (the default) adds the length term, "
        f"fitted at {length.length_coef:+.3f} per unit of log(answer chars / the expert's median) "
        "(response_chars.csv)",
        "answer bias (combiner.vote_answer_bias): per model, a learned adjustment for each letter it gave at least "
        f"{BIAS_MIN_ANSWERS} times, L2 penalty chosen by cross-validation among "
        f"{', '.join('none' if b is None else f'{b:g}' for b in ANSWER_BIAS_GRID)} on top of each learned vote's "
        "chosen L2 and panel sizes: " + "; ".join(
            f"{name} {_bias_summary(w)}" for name, w in learned.items()),
        "headline strategy: the best cross-validated of " + ", ".join(
            f"{k} ({v:.4f})" for k, v in cv_scores.items()) + f": {headline}; the target is judged on it",
        "fuse is not scored: it needs an aggregator model to write each answer, which recordings cannot give",
        f"stacked_reference (eval.combine_reference; a reference, never the headline): a gradient-boosted "
        f"classifier trained on train + val over every one of the {len(models)} pool models' answers (which "
        "models gave each candidate letter, their fit accuracies, their answers' lengths, the letter), so it "
        "calls every model for every query; it scores "
        f"{metrics['stacked_reference_accuracy']:.4f} "
        f"({metrics['stacked_reference_minus_best_single']:+.4f} over the best single model), against "
        f"{metrics[f'{headline}_accuracy']:.4f} for the headline {headline}: the room the recorded answers leave "
        "above the served vote",
        "the 'task' prior: the served outcome gate's task prior (router.outcome.TaskPrior, as moe train fits it "
        "from outcome records that name their task): each category's success rates over the fit questions, mixed "
        "for a scored question by an embedding classifier's category probabilities, never its recorded category, "
        "in every cross-validation fold and on test; the classifier's top category is right for "
        f"{task_accuracy:.4f} of the test questions",
        "panel-size table (panel_sizes in results.json): every k and weight scheme on the test split, for reading "
        "only (not used to choose)",
    ]
    body: dict[str, Any] = {
        "metrics": metrics,
        "setup": {"pool": pool_name, "experts": len(models), "train": len(train), "val": len(val),
                  "test": len(test), "folds": N_FOLDS, "best_single": models[best],
                  "fixed_top3": [models[j] for j in top3],
                  "learned_vote_weights": {e: round(w, 4) for e, w in learned["learned_vote"].as_mapping().items()
                                           if w > 0},
                  "learned_length_vote_weights": {e: round(w, 4) for e, w in length.as_mapping().items() if w > 0},
                  "chosen": chosen, "chosen_top1": chosen_top1,
                  "task_prior_uses": "router.outcome.TaskPrior: category rates mixed by classifier probabilities",
                  "predicted_category_accuracy": task_accuracy,
                  "identical_strategies": identical_groups(
                      {k: v for k, v in correct.items() if k != "best_single"})},
        "confidence_intervals": cis,
        "systems": {
            f"best single ({models[best]})": {"accuracy": metrics["best_single_accuracy"]},
            "top-1 routing (gate)": {"accuracy": metrics["top1_accuracy"]},
            f"routed top-{cv['k']} vote ({cv['weights']} weights)": {"accuracy": metrics["vote_accuracy"]},
            f"routed top-{cv['k']} consensus": {"accuracy": metrics["consensus_accuracy"]},
            f"routed top-{chosen['learned_vote']['k']} vote (learned weights)":
                {"accuracy": metrics["learned_vote_accuracy"]},
            f"routed top-{chosen['learned_length_vote']['k']} vote (learned weights and length term)":
                {"accuracy": metrics["learned_length_vote_accuracy"]},
            "fixed top-3 vote (three best on train + val)": {"accuracy": metrics["fixed_top3_vote_accuracy"]},
            "fuse (aggregator model)": {"accuracy": None},
            f"reference: stacked classifier over all {len(models)} models' answers":
                {"accuracy": metrics["stacked_reference_accuracy"]},
            "oracle (any pool model right)": {"accuracy": metrics["oracle_accuracy"]},
        },
        "experts": experts,
        "panel_sizes": by_size,
        "cv_grids": {**grids, **learned_grids},
    }
    if ctx.plots:
        shown = {"best_single": f"best single\n({models[best]})", "top1": "top-1 routing",
                 "vote": f"top-{cv['k']} vote\n({cv['weights']})", "consensus": f"top-{cv['k']} consensus",
                 "learned_vote": f"top-{chosen['learned_vote']['k']} vote\n(learned weights)",
                 "learned_length_vote": f"top-{chosen['learned_length_vote']['k']} vote\n(learned + length)",
                 "fixed_top3_vote": "fixed top-3 vote"}
        body["figures"] = [plot_strategies(ctx, metrics, cis, shown,
                                           f"MMLU-Pro, pool '{pool_name}' ({len(models)} LLMs, {len(test)} test "
                                           "questions): accuracy per system")]
    return body


def plot_strategies(ctx: SuiteContext, metrics: Mapping[str, Any], cis: Mapping[str, Mapping[str, float]],
                    shown: Mapping[str, str], title: str, notes: Sequence[str] = ()) -> str:
    """``accuracy.png``: a bar per ``shown`` system (``<key>_accuracy`` in ``metrics``, its CI as the error
    bar when ``cis`` has one) and the oracle as a reference; returns the file name."""
    bars = []
    for key, label in shown.items():
        ci = cis.get(f"{key}_accuracy")
        bars.append((label, float(metrics[f"{key}_accuracy"]), (ci["low"], ci["high"]) if ci else None))
    plot_accuracy_bars(ctx.out / "accuracy.png", bars, title, notes=notes,
                       references=[("oracle\n(any model right)", float(metrics["oracle_accuracy"]))])
    return "accuracy.png"


def identical_groups(answers: Mapping[str, np.ndarray]) -> list[list[str]]:
    """Groups (two or more, in ``answers``' order) of strategies whose per-query results are equal on every
    query: the same system under several names (a panel of one is top-1 of its panel; consensus over letter
    embeddings is the vote), to be reported once, not as separate results."""
    groups: dict[bytes, list[str]] = {}
    for name, values in answers.items():
        groups.setdefault(np.asarray(values, dtype=float).tobytes(), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def mean_interval(values: np.ndarray, seed: int) -> dict[str, float]:
    """The mean of per-query ``values`` with its 95% percentile-bootstrap interval."""
    ci = M.bootstrap_ci(lambda v: float(v.mean()), values, n=N_BOOT, seed=seed)
    return {"estimate": ci.estimate, "low": ci.low, "high": ci.high}
