"""``mmlu-pro-combine``: route to a top-k panel and combine the panel's recorded answers, scored offline.

Same data and seeded id split as ``mmlu-pro-outcome`` (``eval.routing``): the gate's success model
(``eval.outcome.NeighbourOutcomes``: the shrunk success rate of each expert on the query's nearest training
queries) ranks the experts of the pool, the top ``k`` form the panel, and each member's *recorded* letter
(``pred.csv``) is its answer. Strategies scored:

- ``top1``: the gate's single choice (argmax of predicted success, with the margin over the best single expert
  that ``mmlu-pro-outcome`` tunes);
- ``vote``: ``router.combine.Vote`` over the panel, weights from predicted success (``uniform``, ``success`` or
  ``logodds``: ``log(9 p / (1 - p))``, the optimal weight of an independent voter with accuracy ``p`` among 10
  options, floored at 0);
- ``consensus``: ``router.combine.Consensus`` over one-hot letter embeddings: weighted agreement, the same
  letter as ``vote`` by construction (checked, not assumed).
- ``learned_vote``: the same routed panel, but each member's letter counts for its *learned* vote weight
  (``router.vote_weights``: per-expert weights fitted jointly on the training questions' recorded letters, so
  experts that err together are discounted), as ``combiner.vote_weights: learned`` serves it.
- ``fuse`` needs an aggregator model to write an answer, so it cannot be scored from recordings.

The panel's size ``k``, the weights and the success model's prior (global, or per MMLU-Pro category: the
category is part of each question's record) are chosen on the validation split, and so are the learned vote's
panel size and L2 penalty, and which strategy is the suite's headline (``chosen_strategy``); the test split is
scored once.
A model with no record for a question abstains (no vote); a panel with no vote at all is wrong.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from eval import metrics as M
from eval.outcome import NeighbourOutcomes, route_with_margin
from eval.report import plot_accuracy_bars
from eval.routing import FRACTIONS, mmlu_pro_split
from eval.suite import SuiteContext, as_float
from router.combine import TIE_BREAK, Combiner, Consensus, Vote, choice_embedding
from router.outcome import shrunk_success, success_prior
from router.vote_weights import fit_vote_weights

__all__ = ["POOLS", "SMALL_OPEN", "mean_interval", "panel_letters", "plot_strategies", "pool_models",
           "run_mmlu_pro_combine", "weights_of"]

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
PRIORS = ("global", "category")
K_NEIGHBOURS = (50, 100, 200)
ALPHAS = (3.0, 10.0, 30.0, 100.0)
MARGINS = (0.0, 0.02, 0.05, 0.1, np.inf)
N_BOOT = 1000
TARGETS = {"all": 0.05, "small": 0.07}  # issue 4: points over the pool's best single model
L2_GRID = (1.0, 10.0, 30.0)  # the learned vote's penalty


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


def panel_letters(onehot: np.ndarray, panels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted vote per query: ``onehot`` [n, m, 10], ``panels`` and ``weights`` [n, k] -> letter index
    [n], -1 where no member voted (every member abstained)."""
    votes = onehot[np.arange(len(panels))[:, None], panels]  # [n, k, 10]
    tally = (votes * weights[:, :, None]).sum(axis=1)
    return np.where(tally.max(axis=1) > 0, tally.argmax(axis=1), -1)


def _accuracy(letters: np.ndarray, gold: np.ndarray) -> float:
    return float(np.mean(letters == gold))


class _Scorer:
    """Success estimates over the pool from a fit split, with either prior."""

    def __init__(self, x: np.ndarray, outcomes: np.ndarray, category: np.ndarray, fit: np.ndarray) -> None:
        self.x, self.outcomes, self.category, self.fit = x, outcomes, category, fit
        self.model = NeighbourOutcomes(x[fit], outcomes[fit])
        self.cat_prior = {c: success_prior(outcomes[fit][category[fit] == c]) for c in np.unique(category)}

    def success(self, rows: np.ndarray, k: int, alpha: float, prior: str) -> np.ndarray:
        ids = self.model.neighbours(self.x[rows], k)
        base = (np.stack([self.cat_prior[c] for c in self.category[rows]]) if prior == "category"
                else self.model.prior)
        return shrunk_success(self.model.outcomes[ids], base, alpha)


def _panels(success: np.ndarray, size: int) -> np.ndarray:
    """``[n, size]`` the routed panels: the experts of highest predicted success, best first."""
    return np.argsort(-success, axis=1, kind="stable")[:, :size]


def _vote(onehot: np.ndarray, success: np.ndarray, size: int, scheme: str) -> np.ndarray:
    panels = _panels(success, size)
    return panel_letters(onehot, panels, weights_of(np.take_along_axis(success, panels, 1), scheme))


def _answers(onehot: np.ndarray, rows: np.ndarray) -> list[list[str | None]]:
    """Each row's recorded letters, one slot per expert (None: no record)."""
    return [[_text(onehot[i, j]) or None for j in range(onehot.shape[1])] for i in rows]


def _learned_vote(onehot: np.ndarray, success: np.ndarray, size: int, weights: np.ndarray) -> np.ndarray:
    """The routed panel (top ``size`` by predicted success) voting with learned per-expert ``weights``."""
    panels = _panels(success, size)
    # The panel weight (here: predicted success) breaks ties, as in Vote with learned weights.
    return panel_letters(onehot, panels, weights[panels] + TIE_BREAK * np.take_along_axis(success, panels, 1))


def _tune_learned(onehot: np.ndarray, gold: np.ndarray, fit: np.ndarray, rows: np.ndarray,
                  success: np.ndarray, names: Sequence[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Best validation (L2 penalty, panel size) for the learned vote; weights fitted on ``fit``."""
    targets = [LETTERS[g] for g in gold[fit]]
    grid = []
    for l2 in L2_GRID:
        weights = fit_vote_weights(_answers(onehot, fit), targets, names, l2=l2).weights
        for size in PANEL_SIZES:
            acc = _accuracy(_learned_vote(onehot[rows], success, size, weights), gold[rows])
            grid.append({"l2": l2, "k": size, "val_accuracy": acc})
    return max(grid, key=lambda g: (round(g["val_accuracy"], 12), -g["k"], g["l2"])), grid


def _tune(scorer: _Scorer, rows: np.ndarray, onehot: np.ndarray, gold: np.ndarray,
          best: int) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """Best validation (prior, K, alpha, panel size, weights) for voting, and (K, alpha, margin) for top-1."""
    grid: list[dict[str, Any]] = []
    top1: list[dict[str, Any]] = []
    for prior, k, alpha in itertools.product(PRIORS, K_NEIGHBOURS, ALPHAS):
        s = scorer.success(rows, k, alpha, prior)
        for size, scheme in itertools.product(PANEL_SIZES, WEIGHTS):
            grid.append({"prior": prior, "neighbours": k, "alpha": alpha, "k": size, "weights": scheme,
                         "val_accuracy": _accuracy(_vote(onehot[rows], s, size, scheme), gold[rows])})
        if prior == "global":
            for margin in MARGINS:
                picks = route_with_margin(s, best, margin)
                acc = _accuracy(_letters_of(onehot[rows], picks), gold[rows])
                top1.append({"neighbours": k, "alpha": alpha, "margin": float(margin), "val_accuracy": acc})
    # Ties prefer the smaller panel (fewer calls), then the simpler weights and prior.
    chosen = max(grid, key=lambda g: (round(g["val_accuracy"], 12), -g["k"]))
    chosen_top1 = max(top1, key=lambda g: (round(g["val_accuracy"], 12), g["margin"]))
    return chosen, chosen_top1, grid


def _letters_of(onehot: np.ndarray, picks: np.ndarray) -> np.ndarray:
    row = onehot[np.arange(len(picks)), picks]  # [n, 10]
    return np.where(row.max(axis=1) > 0, row.argmax(axis=1), -1)


def _agreement(onehot: np.ndarray, panels: np.ndarray, weights: np.ndarray, names: Sequence[str],
               combiners: Mapping[str, Combiner], expected: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Run each of ``router.combine``'s ``combiners`` on the test panels (members' panel weights ``weights``);
    per combiner, the share of queries where it picks the letter the vectorised scoring chose (``expected``;
    1.0 expected: the suite scores what the combiners do)."""
    from router.combine import WeightedAnswer

    got: dict[str, list[int]] = {name: [] for name in combiners}
    for row, panel in enumerate(panels):
        answers = [WeightedAnswer(names[j], float(w), _text(onehot[row, j]))
                   for j, w in zip(panel, weights[row], strict=True)]
        for name, combiner in combiners.items():
            letter = _text(onehot[row, names.index(combiner.combine(answers).expert)])
            got[name].append(LETTERS.index(letter) if letter else -1)
    return {k: float(np.mean(np.array(v) == expected[k])) for k, v in got.items()}


def _text(onehot_row: np.ndarray) -> str:
    return LETTERS[int(onehot_row.argmax())] if onehot_row.max() > 0 else ""


def run_mmlu_pro_combine(ctx: SuiteContext) -> dict[str, Any]:
    from experts.recordings import load_mmlu_pro

    folder = ctx.data_dir / "mmlu_pro_outcomes"
    store = load_mmlu_pro(folder if folder.is_dir() else ctx.data_dir)
    pool_name = ctx.pool or "all"
    models = pool_models(pool_name, store.models)
    ids = [str(q.question_id) for q in store.questions]
    train, val, test, x = mmlu_pro_split(ctx, store)
    outcomes = np.stack([as_float(store.correct(m)) for m in models], axis=1)
    onehot = np.zeros((len(ids), len(models), len(LETTERS)), dtype=np.float32)
    for j, m in enumerate(models):
        for i, o in enumerate(store.outcomes(m)):
            if o.pred is not None and o.pred in LETTERS:
                onehot[i, j, LETTERS.index(o.pred)] = 1.0
    gold = np.array([LETTERS.index(q.answer) for q in store.questions])
    category = np.array([q.category for q in store.questions])

    train_acc = np.nan_to_num(outcomes[train]).mean(axis=0)  # missing = wrong, as for every system
    best = int(np.argmax(train_acc))
    train_scorer = _Scorer(x, outcomes, category, train)
    chosen, chosen_top1, grid = _tune(train_scorer, val, onehot, gold, best)
    s_val = train_scorer.success(val, chosen["neighbours"], chosen["alpha"], chosen["prior"])
    chosen_learned, learned_grid = _tune_learned(onehot, gold, train, val, s_val, models)
    val_scores = {"vote": max(g["val_accuracy"] for g in grid), "learned_vote": chosen_learned["val_accuracy"]}
    headline = max(val_scores, key=lambda k: (val_scores[k], k == "vote"))  # a tie keeps the plain vote
    fit = np.r_[train, val]
    learned = fit_vote_weights(_answers(onehot, fit), [LETTERS[g] for g in gold[fit]], models,
                               l2=chosen_learned["l2"])
    scorer = _Scorer(x, outcomes, category, fit)
    s = scorer.success(test, chosen["neighbours"], chosen["alpha"], chosen["prior"])
    s_top1 = scorer.success(test, chosen_top1["neighbours"], chosen_top1["alpha"], "global")
    oh, g = onehot[test], gold[test]
    voted = _vote(oh, s, chosen["k"], chosen["weights"])
    learned_voted = _learned_vote(oh, s, chosen_learned["k"], learned.weights)
    routed = _letters_of(oh, route_with_margin(s_top1, best, chosen_top1["margin"]))
    single = _letters_of(oh, np.full(len(test), best))
    top3 = np.argsort(-train_acc, kind="stable")[:3]
    fixed = panel_letters(oh, np.tile(top3, (len(test), 1)), np.tile(weights_of(train_acc[top3], "uniform"),
                                                                     (len(test), 1)))
    panels = _panels(s, chosen["k"])
    check = _agreement(oh, panels, weights_of(np.take_along_axis(s, panels, 1), chosen["weights"]), models,
                       {"vote": Vote("choice"), "consensus": Consensus(choice_embedding)},
                       {"vote": voted, "consensus": voted})
    panels = _panels(s, chosen_learned["k"])
    check |= _agreement(oh, panels, np.take_along_axis(s, panels, 1), models,
                        {"learned_vote": Vote("choice", learned=learned.as_mapping())},
                        {"learned_vote": learned_voted})
    consensus = voted if check["consensus"] == 1.0 else np.full(len(test), -2)  # never silently wrong
    if check["learned_vote"] != 1.0:
        learned_voted = np.full(len(test), -2)  # never silently wrong: the suite scores what the combiner does
    correct = {"best_single": single == g, "top1": routed == g, "vote": voted == g, "consensus": consensus == g,
               "learned_vote": learned_voted == g, "fixed_top3_vote": fixed == g}
    metrics: dict[str, Any] = {f"{k}_accuracy": float(v.mean()) for k, v in correct.items()}
    metrics["oracle_accuracy"] = M.oracle_accuracy(outcomes[test])
    metrics["vote_minus_best_single"] = metrics["vote_accuracy"] - metrics["best_single_accuracy"]
    metrics["learned_vote_minus_best_single"] = metrics["learned_vote_accuracy"] - metrics["best_single_accuracy"]
    metrics["chosen_strategy"] = headline
    metrics["chosen_minus_best_single"] = metrics[f"{headline}_minus_best_single"]
    metrics["target_points"] = TARGETS.get(pool_name)
    metrics["target_met"] = (None if pool_name not in TARGETS
                             else bool(metrics["chosen_minus_best_single"] >= TARGETS[pool_name]))
    metrics["k"], metrics["learned_k"], metrics["pool"] = chosen["k"], chosen_learned["k"], pool_name
    cis = {f"{k}_accuracy": mean_interval(v.astype(float), ctx.seed) for k, v in correct.items()}
    for key in ("vote", "learned_vote"):
        cis[f"{key}_minus_best_single"] = mean_interval(correct[key].astype(float) - correct["best_single"],
                                                        ctx.seed)
    by_size = {}
    for size in PANEL_SIZES:
        by_size[f"k={size}"] = {w: _accuracy(_vote(oh, s, size, w), g) for w in WEIGHTS}
        by_size[f"k={size}"]["learned"] = _accuracy(_learned_vote(oh, s, size, learned.weights), g)
    experts = {m: {"accuracy": float(np.nan_to_num(outcomes[test, j]).mean()), "train_accuracy": train_acc[j],
                   "recorded_share": float(np.mean(~np.isnan(outcomes[test, j])))} for j, m in enumerate(models)}
    ctx.notes += [
        f"split by question id, fractions {FRACTIONS}, seed {ctx.seed} (the mmlu-pro-outcome split); panel size, "
        "weights, neighbours, shrinkage and prior chosen on val, test scored once",
        "answers are the models' recorded letters (pred.csv); a model with no record, or no extracted letter, "
        "for a question abstains (no vote); a panel where every member abstained is wrong, and so is a single "
        "model without a record",
        "consensus over one-hot letter embeddings is weighted agreement: the same letter as vote by "
        f"construction; checked by running router.combine's Vote and Consensus on every test panel "
        f"(agreement with the scored vote: vote {check['vote']:.4f}, consensus {check['consensus']:.4f}); the "
        f"learned vote likewise through Vote with learned weights (agreement {check['learned_vote']:.4f})",
        f"learned vote weights: fitted on train for tuning (L2 in {L2_GRID}, panel size), refitted on train + val "
        f"with the chosen L2 {chosen_learned['l2']:g} for test; {learned.metrics['records_used']} of "
        f"{learned.metrics['records']} questions had the right letter among the recorded ones and taught the fit",
        f"headline strategy chosen on val between vote ({val_scores['vote']:.4f}) and learned vote "
        f"({val_scores['learned_vote']:.4f}): {headline}; the target is judged on it",
        "fuse is not scored: it needs an aggregator model to write each answer, which recordings cannot give",
        "the 'category' prior uses each question's MMLU-Pro category from its record (a deployed router would "
        "predict it with the domain gate)",
        "panel-size table: every k and weight scheme on the test split, for reading only (not used to choose)",
    ]
    body: dict[str, Any] = {
        "metrics": metrics,
        "setup": {"pool": pool_name, "experts": len(models), "train": len(train), "val": len(val),
                  "test": len(test), "best_single": models[best],
                  "fixed_top3": [models[j] for j in top3],
                  "learned_vote_weights": {e: round(w, 4) for e, w in learned.as_mapping().items() if w > 0},
                  **{f"chosen_learned_{k}": v for k, v in chosen_learned.items()},
                  **{f"chosen_{k}": v for k, v in chosen.items()},
                  **{f"top1_{k}": v for k, v in chosen_top1.items()}},
        "confidence_intervals": cis,
        "systems": {
            f"best single ({models[best]})": {"accuracy": metrics["best_single_accuracy"]},
            "top-1 routing (gate)": {"accuracy": metrics["top1_accuracy"]},
            f"routed top-{chosen['k']} vote ({chosen['weights']} weights)": {"accuracy": metrics["vote_accuracy"]},
            f"routed top-{chosen['k']} consensus": {"accuracy": metrics["consensus_accuracy"]},
            f"routed top-{chosen_learned['k']} vote (learned weights)": {"accuracy": metrics["learned_vote_accuracy"]},
            "fixed top-3 vote (three best on train)": {"accuracy": metrics["fixed_top3_vote_accuracy"]},
            "fuse (aggregator model)": {"accuracy": None},
            "oracle (any pool model right)": {"accuracy": metrics["oracle_accuracy"]},
        },
        "experts": experts,
        "panel_sizes": by_size,
        "tuning_grid": grid,
        "learned_tuning_grid": learned_grid,
    }
    if ctx.plots:
        shown = {"best_single": f"best single\n({models[best]})", "top1": "top-1 routing",
                 "vote": f"top-{chosen['k']} vote\n({chosen['weights']})", "consensus": f"top-{chosen['k']} consensus",
                 "learned_vote": f"top-{chosen_learned['k']} vote\n(learned weights)",
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


def mean_interval(values: np.ndarray, seed: int) -> dict[str, float]:
    """The mean of per-query ``values`` with its 95% percentile-bootstrap interval."""
    ci = M.bootstrap_ci(lambda v: float(v.mean()), values, n=N_BOOT, seed=seed)
    return {"estimate": ci.estimate, "low": ci.low, "high": ci.high}
