"""``routerbench-combine``: route to a top-k panel, combine the panel's recorded *responses*, and pay for them.

The RouterBench counterpart of ``mmlu-pro-combine`` (issue 4): 11 LLMs on ARC-Challenge, MBPP and Winogrande
(``routerdc/routerbench_zs``), each with its full recorded response, RouterBench's grade of it and the call's
USD cost. Same data, split and success model as the ``routerbench`` suite (RouterBench's own train/test split,
15% of train by row id for tuning): the gate's success model (``eval.outcome.NeighbourOutcomes``) ranks the
experts for each query and the top ``k`` form the panel. Strategies scored:

- ``top1``: the ``routerbench`` suite's gate itself (argmax of predicted success with the margin over the best
  single expert, tuned the same way): one call, the same picks;
- ``vote``: ``router.combine.Vote`` over the panel's full responses, with the task's extractor
  (``TASK_ANSWERS``): ``choice`` letters for ARC-Challenge (A-D) and Winogrande (A/B), ``number`` for
  GSM8K-style tasks. MBPP answers are programs, with no final answer to extract, so ``Vote`` returns the
  top-weight answer there (its documented fallback): top-1 of the panel at the panel's price;
- ``consensus``: ``router.combine.Consensus``, the answer nearest the panel's weighted centroid: over
  ``choice_embedding`` for letters (the same answer as ``vote`` by construction), over a one-hot of the
  extracted number for GSM8K-style tasks, and over the gate encoder's embedding of the response text for MBPP
  (the program most like the others, weighted);
- ``learned_vote`` and ``learned_length_vote``: ``vote`` over the same routed panel with learned vote weights
  (``router.vote_weights``), fitted as ``moe train`` fits them (``fit_from_records``) on the train split's
  responses to the letter tasks, without and with the length term (each response's real length against its
  model's median); a task without an extractor keeps the panel's top answer, as ``vote`` does;
- ``fixed_top3_vote``: ``vote`` among the three best experts on train, for every query (no routing);
- references: the best single expert (chosen on train) and RouterBench's oracle (the cheapest correct expert).
- ``fuse`` needs an aggregator model to write an answer, so it cannot be scored from recordings.

Scoring: the combined answer is one member's recorded response, scored by that member's recorded grade (on
ARC and Winogrande every response with the same extracted letter has the same grade: 0 of 5,218 (row, letter)
groups disagree in this subset). A member with no record is a failed call: it gives no answer and the
combiner sees the others; a panel where every member failed is wrong, as is a routed call to an expert
without a record. Cost: each call's recorded USD cost (a missing one is the expert's mean on train); a panel
of ``k`` costs the sum of its members', whatever the combiner keeps. ``<strategy>_cost`` is the mean per
query, ``<strategy>_total_cost`` the sum over the test split.

Tuning: the panel's size (``PANEL_SIZES``, at most the pool), the weights (``uniform``, ``success``, or
``logodds``: ``log((n - 1) p / (1 - p))`` for a task with ``n`` options, floored at 0), the neighbours and the
shrinkage are chosen on the tuning split by vote accuracy (ties: the smaller panel, then the cheaper); the learned
votes' panel size and L2 penalty likewise, with the vote's success model; the test split is scored once, and
``consensus`` uses the panel ``vote`` chose.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from eval import metrics as M
from eval.combine_suite import (
    ANSWER_BIAS_GRID,
    L2_GRID,
    LEARNED,
    PANEL_SIZES,
    WEIGHTS,
    identical_groups,
    mean_interval,
    plot_strategies,
    weights_of,
)
from eval.outcome import NeighbourOutcomes, route_with_margin
from eval.report import plot_accuracy_cost
from eval.routing import ALPHA_GRID, K_GRID, fill_costs, routerbench_split, tune_margin
from eval.suite import SuiteContext
from router.combine import (
    EXTRACTORS,
    Combiner,
    TopOne,
    WeightedAnswer,
    answer_embeddings,
    build_combiner,
    choice_embedding,
    extract_choice,
)
from router.outcome import OutcomeRecord
from router.vote_weights import VoteWeights, fit_from_records

__all__ = ["TASK_ANSWERS", "Recorded", "answer_format", "combine_panels", "combiners_for", "key_embedding",
           "rank_panels", "run_routerbench_combine"]

Embed = Callable[[Sequence[str]], np.ndarray]

# RouterBench task (its file-name stem) -> (router.combine extractor, or None where no final answer can be
# extracted; how many options a question offers, for log-odds weights). Free answers (numbers) have many
# possible wrong answers, like MMLU-Pro's ten letters, so they weigh as ten options.
TASK_ANSWERS: dict[str, tuple[str | None, int]] = {
    "arc_challenge": ("choice", 4),
    "winograde": ("choice", 2),  # RouterBench's spelling
    "hellaswag": ("choice", 4),
    "mmlu": ("choice", 4),
    "gsm8k": ("number", 10),
    "mbpp": (None, 10),
}
STRATEGIES = ("best_single", "top1", "vote", "consensus", "learned_vote", "learned_length_vote", "fixed_top3_vote")


def answer_format(task: str) -> tuple[str | None, int]:
    """``(extractor, options)`` of a task; an unknown task has no extractor (its vote is top-1 of the panel)."""
    return TASK_ANSWERS.get(task, (None, 10))


@dataclass(frozen=True)
class Recorded:
    """What the experts recorded on some queries: ``texts[i][j]`` is expert ``j``'s response to query ``i``,
    ``outcomes`` ``[n, m]`` its grade (1/0, NaN: no record), ``costs`` ``[n, m]`` its USD cost (no NaN)."""

    experts: Sequence[str]
    tasks: Sequence[str]
    texts: Sequence[Sequence[str]]
    outcomes: np.ndarray
    costs: np.ndarray

    def options(self) -> np.ndarray:
        """``[n, 1]`` options per query, for log-odds weights."""
        return np.array([[answer_format(t)[1]] for t in self.tasks], dtype=float)


def key_embedding(extract: Callable[[str], str | None]) -> Embed:
    """One-hot of each text's extracted answer over the distinct answers in the call (a zero row when none):
    like ``choice_embedding``, consensus over these vectors is a weighted vote on the answer."""

    def embed(texts: Sequence[str]) -> np.ndarray:
        keys = [extract(t) for t in texts]
        columns = {k: c for c, k in enumerate(dict.fromkeys(k for k in keys if k is not None))}
        out = np.zeros((len(texts), max(len(columns), 1)), dtype=np.float32)
        for row, key in enumerate(keys):
            if key is not None:
                out[row, columns[key]] = 1.0
        return out

    return embed


def _answer_embedding(task: str, extractor: str | None, embed_text: Embed | None) -> Embed:
    """What consensus compares a task's answers by: their extracted answer, one-hot (a weighted vote on it), or,
    without an extractor, ``embed_text`` of the whole text."""
    if extractor == "choice":
        return choice_embedding
    if extractor is not None:
        return key_embedding(EXTRACTORS[extractor])
    if embed_text is None:
        raise ValueError(f"consensus on {task!r} answers needs an embedding of their text")
    return embed_text


# Only which member's answer a combiner keeps is scored, so where no final answer is read (``top1``; ``vote`` on a
# task without an extractor, which is what Vote falls back to) the combiner is a ``TopOne`` that reads none,
# without the pointless extraction. Otherwise it is the service's (``build_combiner``) in the task's answer format.
def _build_top1(task: str, extractor: str | None, embed_text: Embed | None, learned: VoteWeights | None) -> Combiner:
    return TopOne()


def _build_vote(task: str, extractor: str | None, embed_text: Embed | None, learned: VoteWeights | None) -> Combiner:
    return TopOne() if extractor is None else build_combiner("vote", extractor, vote_weights=learned)


def _build_consensus(task: str, extractor: str | None, embed_text: Embed | None,
                     learned: VoteWeights | None) -> Combiner:
    return build_combiner("consensus", embed=_answer_embedding(task, extractor, embed_text))


# Scored strategy -> its combiner for one task, given the task's extractor (None: no final answer to read).
_SCORED: dict[str, Callable[[str, str | None, Embed | None, VoteWeights | None], Combiner]] = {
    "top1": _build_top1, "vote": _build_vote, "consensus": _build_consensus}


def combiners_for(strategy: str, tasks: Iterable[str], embed_text: Embed | None = None,
                  learned: VoteWeights | None = None) -> dict[str, Combiner]:
    """Each task's combiner for ``strategy`` (``top1``, ``vote`` or ``consensus``) in the task's answer format.
    ``embed_text`` embeds free-text answers (consensus on a task without an extractor needs it); ``learned``
    gives ``vote`` learned vote weights."""
    if strategy not in _SCORED:
        raise ValueError(f"unknown strategy {strategy!r}; known: {', '.join(_SCORED)}")
    build = _SCORED[strategy]
    return {task: build(task, answer_format(task)[0], embed_text, learned) for task in set(tasks)}


def rank_panels(success: np.ndarray, size: int) -> np.ndarray:
    """``[n, size]`` the experts with the highest predicted success, best first (ties: the lower index)."""
    return np.argsort(-success, axis=1, kind="stable")[:, :size]


def combine_panels(rec: Recorded, panels: np.ndarray, weights: np.ndarray,
                   by_task: Mapping[str, Combiner]) -> tuple[np.ndarray, np.ndarray]:
    """Each query's panel (``[n, k]`` expert indices, ``weights`` ``[n, k]``) combined by its task's combiner:
    ``(correct, cost)``, each ``[n]``. A member without a record gives no answer; every member is paid."""
    index = {e: j for j, e in enumerate(rec.experts)}
    correct = np.zeros(len(panels))
    for i, (panel, w) in enumerate(zip(panels, weights, strict=True)):
        answers = [WeightedAnswer(rec.experts[j], float(wj), rec.texts[i][j])
                   for j, wj in zip(panel, w, strict=True) if not np.isnan(rec.outcomes[i, j])]
        if answers:
            correct[i] = rec.outcomes[i, index[by_task[rec.tasks[i]].combine(answers).expert]]
    return correct, np.take_along_axis(rec.costs, panels, axis=1).sum(axis=1)


def _vote(rec: Recorded, success: np.ndarray, size: int, scheme: str,
          by_task: Mapping[str, Combiner]) -> tuple[np.ndarray, np.ndarray]:
    panels = rank_panels(success, size)
    return combine_panels(rec, panels, weights_of(np.take_along_axis(success, panels, 1), scheme, rec.options()),
                          by_task)


def _single(rec: Recorded, picks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return combine_panels(rec, picks[:, None], np.ones((len(picks), 1)), combiners_for("top1", rec.tasks))


def _tune(x: np.ndarray, outcomes: np.ndarray, train: np.ndarray, val: np.ndarray, rec: Recorded,
          sizes: Sequence[int]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Best validation (neighbours, shrinkage, panel size, weights) for the vote."""
    model = NeighbourOutcomes(x[train], outcomes[train])
    ids = model.neighbours(x[val], max(K_GRID))
    vote = combiners_for("vote", rec.tasks)
    grid: list[dict[str, Any]] = []
    for k, alpha in itertools.product(K_GRID, ALPHA_GRID):
        success = model.success(ids[:, :k], alpha)
        for size, scheme in itertools.product(sizes, WEIGHTS):
            correct, cost = _vote(rec, success, size, scheme, vote)
            grid.append({"neighbours": k, "alpha": alpha, "k": size, "weights": scheme,
                         "val_accuracy": float(correct.mean()), "val_cost": float(cost.mean())})
    chosen = max(grid, key=lambda g: (round(g["val_accuracy"], 12), -g["k"], -g["val_cost"]))
    return chosen, grid


def fit_learned(rows: Sequence[Any], models: Sequence[str], which: np.ndarray, outcomes: np.ndarray, l2: float,
                length: bool, answer_bias_l2: float | None = None) -> VoteWeights:
    """Learned vote weights from the recorded responses of ``which`` rows whose task has a choice letter, as
    ``moe train`` fits them from outcome records with answers (a row's right letter: the one its correct
    models gave), with the answer bias at ``answer_bias_l2`` (None: none)."""
    records = [OutcomeRecord(rows[i].prompt,
                             {m: float(outcomes[i, j]) for j, m in enumerate(models) if not np.isnan(outcomes[i, j])},
                             {}, {m: rows[i].answers[m].response for j, m in enumerate(models)
                                  if not np.isnan(outcomes[i, j])})
               for i in which if answer_format(rows[i].task)[0] == "choice"]
    return fit_from_records(records, models, extract_choice, l2=l2, length_term=length,
                            answer_bias_l2=answer_bias_l2)


def _tune_learned(rows: Sequence[Any], models: Sequence[str], train: np.ndarray, outcomes: np.ndarray,
                  rec: Recorded, success: np.ndarray, sizes: Sequence[int]) -> tuple[dict[str, Any], list[Any]]:
    """Per learned strategy, the best validation (L2, panel size) with weights fitted on ``train``, then the answer
    bias's penalty (or none) on top of that L2, as ``mmlu-pro-combine`` chooses it; ``success`` is the vote's
    success model on the validation rows of ``rec``."""
    grid: list[dict[str, Any]] = []

    def score(name: str, l2: float, length: bool, bias_l2: float | None) -> None:
        vote = combiners_for("vote", rec.tasks,
                             learned=fit_learned(rows, models, train, outcomes, l2, length, bias_l2))
        for size in sizes:
            panels = rank_panels(success, size)
            correct, cost = combine_panels(rec, panels, np.take_along_axis(success, panels, 1), vote)
            grid.append({"strategy": name, "l2": l2, "answer_bias_l2": bias_l2, "k": size,
                         "val_accuracy": float(correct.mean()), "val_cost": float(cost.mean())})

    for (name, length), l2 in itertools.product(LEARNED.items(), L2_GRID):
        score(name, l2, length, None)
    chosen = {name: max((g for g in grid if g["strategy"] == name),
                        key=lambda g: (round(g["val_accuracy"], 12), -g["k"], -g["val_cost"], g["l2"]))
              for name in LEARNED}
    for (name, length), bias_l2 in itertools.product(LEARNED.items(), ANSWER_BIAS_GRID[1:]):
        score(name, chosen[name]["l2"], length, bias_l2)
    # Ties keep no bias (the simpler model), then the smaller panel, the cheaper, the heavier penalty.
    return {name: max((g for g in grid if g["strategy"] == name and g["l2"] == chosen[name]["l2"]),
                      key=lambda g: (round(g["val_accuracy"], 12), g["answer_bias_l2"] is None, -g["k"],
                                     -g["val_cost"], g["answer_bias_l2"] or 0.0))
            for name in LEARNED}, grid


def _penalty(value: float | None) -> str:
    return "none" if value is None else f"{value:g}"


def _recorded(rows: Sequence[Any], models: Sequence[str], which: np.ndarray, outcomes: np.ndarray,
              costs: np.ndarray) -> Recorded:
    return Recorded(models, [rows[i].task for i in which],
                    [[rows[i].answers[m].response for m in models] for i in which], outcomes[which], costs[which])


def _text_embedding(ctx: SuiteContext, rec: Recorded, panels: np.ndarray) -> Embed:
    """The embeddings of the panel responses that consensus compares as text, embedded at once, as serving's
    ``consensus`` embeds answers (``answer_embeddings``: start and end, with the gate encoder)."""
    texts = sorted({rec.texts[i][j] for i, panel in enumerate(panels) if answer_format(rec.tasks[i])[0] is None
                    for j in panel})
    vectors = (dict(zip(texts, answer_embeddings(ctx.encoder.encode, texts, ctx.encoder.max_length), strict=True))
               if texts else {})
    return lambda answers: np.stack([vectors[a] for a in answers])


def run_routerbench_combine(ctx: SuiteContext) -> dict[str, Any]:
    from experts.recordings import load_routerbench

    folder = ctx.data_dir / "routerdc" / "routerbench_zs"
    store = load_routerbench(folder if folder.is_dir() else ctx.data_dir)
    rows, models = list(store.rows), list(store.models)
    train, val, test, dropped = routerbench_split(ctx, rows)
    used = np.r_[train, val, test]
    x = np.zeros((len(rows), ctx.encoder.dim), dtype=np.float32)
    x[used] = ctx.encoder.encode([rows[i].prompt for i in used])
    outcomes = np.array([[np.nan if (c := r.answers[m].correct) is None else c for m in models] for r in rows])
    raw_costs = np.array([[np.nan if (c := r.answers[m].cost_usd) is None else c for m in models] for r in rows])
    costs = fill_costs(raw_costs, train)
    rec_val, rec = _recorded(rows, models, val, outcomes, costs), _recorded(rows, models, test, outcomes, costs)

    train_acc = np.nan_to_num(outcomes[train]).mean(axis=0)  # missing = wrong, as for every system
    best = int(np.argmax(train_acc))
    chosen_top1, _ = tune_margin(x, outcomes, train, val, best)  # the routerbench suite's gate, tuned alike
    sizes = sorted({min(s, len(models)) for s in PANEL_SIZES})
    chosen, grid = _tune(x, outcomes, train, val, rec_val, sizes)
    tune_model = NeighbourOutcomes(x[train], outcomes[train])
    s_val = tune_model.success(tune_model.neighbours(x[val], chosen["neighbours"]), chosen["alpha"])
    chosen_learned, learned_grid = _tune_learned(rows, models, train, outcomes, rec_val, s_val, sizes)
    fit = np.r_[train, val]
    learned = {name: fit_learned(rows, models, fit, outcomes, chosen_learned[name]["l2"], length,
                                 chosen_learned[name]["answer_bias_l2"])
               for name, length in LEARNED.items()}
    model = NeighbourOutcomes(x[fit], outcomes[fit])
    ids = model.neighbours(x[test], max(K_GRID))
    s = model.success(ids[:, :chosen["neighbours"]], chosen["alpha"])
    s_top1 = model.success(ids[:, :int(chosen_top1["k"])], chosen_top1["alpha"])
    panels = rank_panels(s, chosen["k"])
    weights = weights_of(np.take_along_axis(s, panels, 1), chosen["weights"], rec.options())
    # Every panel of the size table is a prefix of the largest, so one batch embeds all they compare.
    vote = combiners_for("vote", rec.tasks)
    consensus = combiners_for("consensus", rec.tasks, _text_embedding(ctx, rec, rank_panels(s, max(sizes))))
    top3 = np.argsort(-train_acc, kind="stable")[:3]
    scored = {
        "best_single": _single(rec, np.full(len(test), best)),
        "top1": _single(rec, route_with_margin(s_top1, best, chosen_top1["margin"])),
        "vote": combine_panels(rec, panels, weights, vote),
        "consensus": combine_panels(rec, panels, weights, consensus),
        **{name: combine_panels(rec, (p := rank_panels(s, chosen_learned[name]["k"])), np.take_along_axis(s, p, 1),
                                combiners_for("vote", rec.tasks, learned=learned[name])) for name in LEARNED},
        "fixed_top3_vote": combine_panels(rec, np.tile(top3, (len(test), 1)), np.ones((len(test), len(top3))),
                                          vote),
    }
    oracle = M.cheapest_correct_oracle(rec.outcomes, rec.costs)
    metrics: dict[str, Any] = {}
    for name, (correct, cost) in scored.items():
        metrics |= {f"{name}_accuracy": float(correct.mean()), f"{name}_cost": float(cost.mean()),
                    f"{name}_total_cost": float(cost.sum())}
    metrics |= {"oracle_accuracy": oracle.accuracy, "oracle_cost": oracle.cost,
                "oracle_total_cost": oracle.cost * len(test),
                "vote_minus_best_single": metrics["vote_accuracy"] - metrics["best_single_accuracy"],
                "k": chosen["k"]}
    cis = {f"{name}_accuracy": mean_interval(correct, ctx.seed) for name, (correct, _) in scored.items()}
    cis["vote_minus_best_single"] = mean_interval(scored["vote"][0] - scored["best_single"][0], ctx.seed)
    labels = {"best_single": f"best single ({models[best]})", "top1": "top-1 routing (routerbench's gate)",
              "vote": f"routed top-{chosen['k']} vote ({chosen['weights']} weights)",
              "consensus": f"routed top-{chosen['k']} consensus",
              "learned_vote": f"routed top-{chosen_learned['learned_vote']['k']} vote (learned weights)",
              "learned_length_vote": f"routed top-{chosen_learned['learned_length_vote']['k']} vote (learned "
                                     "weights and length term)",
              "fixed_top3_vote": "fixed top-3 vote (three best on train)"}
    systems: dict[str, dict[str, Any]] = {
        labels[name]: {"accuracy": metrics[f"{name}_accuracy"], "cost_per_query": metrics[f"{name}_cost"],
                       "total_cost": metrics[f"{name}_total_cost"]} for name in STRATEGIES}
    systems["fuse (aggregator model)"] = {"accuracy": None}
    systems["oracle (cheapest correct)"] = {"accuracy": oracle.accuracy, "cost_per_query": oracle.cost,
                                            "total_cost": oracle.cost * len(test)}
    table = _panel_table(rec, s, sizes, vote, consensus)
    same = identical_groups({name: np.r_[correct, cost] for name, (correct, cost) in scored.items()})
    if same:
        ctx.notes.append(
            "strategies with the same answer and cost on every test query are one system under several names "
            f"({'; '.join(' = '.join(g) for g in same)}): a panel of one (chosen sizes: vote and consensus top-"
            f"{chosen['k']}, " + ", ".join(f"{n} top-{chosen_learned[n]['k']}" for n in LEARNED) + ") is that "
            "expert's answer, and consensus over letter embeddings is the vote by construction")
    ctx.notes += _notes(ctx, chosen, scored, rec, table)
    fitted = learned["learned_length_vote"]
    ctx.notes.append(
        f"learned votes: weights fitted as moe train fits them on the train responses of the letter tasks "
        f"({fitted.metrics['records_used']} of {fitted.metrics['records']} taught the fit), L2 and panel size "
        "chosen on the tuning split, then the answer bias's penalty or none on top of that L2 (" + "; ".join(
            f"{n}: L2 {chosen_learned[n]['l2']:g}, answer bias {_penalty(chosen_learned[n]['answer_bias_l2'])}, "
            f"top-{chosen_learned[n]['k']}" for n in LEARNED) + "), "
        f"refitted on train + tuning; the length term is fitted at {fitted.length_coef:+.3f} per unit of "
        "log(response chars / the model's median); MBPP keeps the panel's top answer")
    body: dict[str, Any] = {
        "metrics": metrics,
        "setup": {"experts": len(models), "train": len(train), "val": len(val), "test": len(test),
                  "best_single": models[best], "fixed_top3": [models[j] for j in top3], "cost_unit": "USD",
                  **{f"chosen_{k}": v for k, v in chosen.items()},
                  "chosen_learned": chosen_learned,
                  "length_coef": fitted.length_coef,
                  "test_dropped_seen_in_training": dropped,
                  "panel_k": {"vote": chosen["k"], "consensus": chosen["k"],
                              **{name: chosen_learned[name]["k"] for name in LEARNED}},
                  "identical_strategies": same,
                  **{f"top1_{k}": v for k, v in chosen_top1.items()}},
        "confidence_intervals": cis,
        "systems": systems,
        "experts": {m: {"accuracy": float(np.nan_to_num(rec.outcomes[:, j]).mean()),
                        "cost_per_query": float(rec.costs[:, j].mean()), "train_accuracy": float(train_acc[j])}
                    for j, m in enumerate(models)},
        "tasks": _by_task(rec, scored),
        "panel_sizes": table,
        "tuning_grid": grid,
        "learned_tuning_grid": learned_grid,
    }
    if ctx.plots:
        body["figures"] = _figures(ctx, metrics, cis, chosen, models[best], body["experts"], len(test))
    return body


def _panel_table(rec: Recorded, success: np.ndarray, sizes: Sequence[int], vote: Mapping[str, Combiner],
                 consensus: Mapping[str, Combiner]) -> dict[str, Any]:
    """Every panel size and weight scheme on the test split (for reading; nothing is chosen from it)."""
    table: dict[str, Any] = {}
    for size, scheme in itertools.product(sizes, WEIGHTS):
        voted, cost = _vote(rec, success, size, scheme, vote)
        agreed = _vote(rec, success, size, scheme, consensus)[0]
        table.setdefault(f"k={size}", {})[scheme] = {"vote_accuracy": float(voted.mean()),
                                                     "consensus_accuracy": float(agreed.mean()),
                                                     "cost_per_query": float(cost.mean())}
    return table


def _by_task(rec: Recorded, scored: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    tasks = np.array(rec.tasks)
    out: dict[str, Any] = {}
    for task in sorted(set(rec.tasks)):
        rows = tasks == task
        out[task] = {"queries": int(rows.sum()), "answers": answer_format(task)[0] or "text (no extractor)",
                     "oracle_accuracy": M.oracle_accuracy(rec.outcomes[rows]),
                     **{name: {"accuracy": float(c[rows].mean()), "cost_per_query": float(k[rows].mean())}
                        for name, (c, k) in scored.items()}}
    return out


def _notes(ctx: SuiteContext, chosen: Mapping[str, Any], scored: Mapping[str, tuple[np.ndarray, np.ndarray]],
           rec: Recorded, table: Mapping[str, Mapping[str, Mapping[str, float]]]) -> list[str]:
    unknown = sorted({t for t in rec.tasks if t not in TASK_ANSWERS})
    same = float(np.mean(scored["vote"][0] == scored["consensus"][0]))
    panels = [(size, scheme, strategy, cell[f"{strategy}_accuracy"], cell["cost_per_query"])
              for size, row in table.items() if size != "k=1" for scheme, cell in row.items()
              for strategy in ("vote", "consensus")]
    size, scheme, strategy, acc, cost = max(panels, key=lambda p: (p[3], -p[4])) if panels else (None,) * 5
    return [
        f"RouterBench's own train/test split; 15% of train by row id (seed {ctx.seed}) tunes the gate and the "
        f"panel, as in the routerbench suite; chosen on it: top-{chosen['k']} panel, {chosen['weights']} weights, "
        f"{chosen['neighbours']} neighbours, shrinkage {chosen['alpha']:g}; test scored once",
        "answers are the models' full recorded responses, combined by router.combine's Vote and Consensus; the "
        "combined answer is one member's response, scored by RouterBench's grade of it",
        "cost: recorded USD per call; a panel costs the sum of its members' calls (all of them are made); "
        "a missing cost is the model's mean on train; <strategy>_cost is per query, <strategy>_total_cost the "
        "test split's sum",
        "MBPP answers are programs with no final answer to extract: vote keeps the top-weight member's program "
        "(Vote's fallback), consensus the program nearest the panel's weighted centroid of gate-encoder "
        f"embeddings; on {same:.4f} of test queries vote and consensus are right together or wrong together "
        "(on letter tasks they pick the same letter by construction)",
        "a model with no record for a query is a failed call (no answer); a panel where all failed is wrong",
        "fuse is not scored: it needs an aggregator model to write each answer, which recordings cannot give",
        "panel-size table (panel_sizes in results.json): every k and weight scheme on the test split, for "
        "reading only (not used to choose)"
        + (f"; its best panel of 3 or more: {size} {strategy}, {scheme} weights, accuracy {acc:.4f} at "
           f"${cost:.5f}/query" if panels else ""),
        *([f"tasks without a known answer format, voted as top-1 of the panel: {', '.join(unknown)}"]
          if unknown else []),
    ]


def _figures(ctx: SuiteContext, metrics: Mapping[str, Any], cis: Mapping[str, Mapping[str, float]],
             chosen: Mapping[str, Any], best: str, experts: Mapping[str, Mapping[str, float]],
             n_test: int) -> list[str]:
    shown = {"best_single": f"best single\n({best.split('/')[-1]})", "top1": "top-1 routing",
             "vote": f"top-{chosen['k']} vote\n({chosen['weights']})", "consensus": f"top-{chosen['k']} consensus",
             "learned_vote": "learned vote", "learned_length_vote": "learned vote\n+ length",
             "fixed_top3_vote": "fixed top-3 vote"}
    costs = [f"${metrics[f'{key}_cost']:.4f}/query" for key in [*shown, "oracle"]]
    title = f"RouterBench subset ({len(experts)} LLMs, {n_test} test queries)"
    bars = plot_strategies(ctx, metrics, cis, shown, f"{title}: accuracy per system", notes=costs)
    plot_accuracy_cost(ctx.out / "accuracy_cost.png",
                       {label.replace("\n", " "): (metrics[f"{key}_cost"], metrics[f"{key}_accuracy"])
                        for key, label in shown.items()}
                       | {"oracle (cheapest correct)": (metrics["oracle_cost"], metrics["oracle_accuracy"])},
                       {m: (e["cost_per_query"], e["accuracy"]) for m, e in experts.items()},
                       "mean USD per query (a panel pays every member)", f"{title}: accuracy against cost")
    return [bars, "accuracy_cost.png"]
