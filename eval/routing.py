"""Outcome suites: route each query to the expert predicted most likely to succeed, and what that costs.

Rules for missing records (``eval.metrics``' rule): a routed system, a single expert taken as a system
included, gets 0 for a query whose chosen expert has no record; the success estimates learn only from
recorded outcomes. Routers are tuned on validation data; the test split is scored once.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from eval import metrics as M
from eval.datasets import load_routellm_mmlu, split_by_id, without_seen
from eval.outcome import NeighbourOutcomes, route_with_cost, route_with_margin
from eval.report import plot_cost_curves, plot_quality_cost, plot_strong_calls
from eval.suite import PREDICTIONS, SuiteContext, as_float, subsample

__all__ = ["best_within", "chosen_match", "chosen_within", "escalate_curve", "fill_costs", "mmlu_pro_split",
           "routerbench_split", "run_mmlu_pro_outcome", "run_routellm_mmlu",
           "run_routerbench", "tune_margin"]

FRACTIONS = (0.7, 0.1, 0.2)
K_GRID = (10, 25, 50, 100)
ALPHA_GRID = (1.0, 3.0, 10.0, 30.0)
MARGIN_GRID = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, np.inf)
N_LAMBDA = 40
N_BOOT = 1000


def _system(outcomes: np.ndarray, costs: np.ndarray, choices: np.ndarray) -> dict[str, float]:
    return {"accuracy": M.routed_accuracy(choices, outcomes), "cost": M.routed_cost(choices, costs)}


def _always(n: int, m: int) -> np.ndarray:
    return np.full(n, m, dtype=np.int64)


def fill_costs(costs: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Unknown costs become the expert's mean over ``rows`` (train), so a routed cost is always defined."""
    mean = np.nanmean(costs[rows], axis=0)
    return np.where(np.isnan(costs), mean[None, :], costs)


def tune_margin(x: np.ndarray, outcomes: np.ndarray, train: np.ndarray, val: np.ndarray,
          best: int) -> tuple[dict[str, float], list[dict[str, float]]]:
    """(k, alpha, margin) with the best validation accuracy; ties go to the larger margin (closer to best)."""
    model = NeighbourOutcomes(x[train], outcomes[train])
    ids = model.neighbours(x[val], max(K_GRID))
    grid = []
    for k, alpha in itertools.product(K_GRID, ALPHA_GRID):
        success = model.success(ids[:, :k], alpha)
        for margin in MARGIN_GRID:
            acc = M.routed_accuracy(route_with_margin(success, best, margin), outcomes[val])
            grid.append({"k": k, "alpha": alpha, "margin": float(margin), "val_accuracy": acc})
    chosen = max(grid, key=lambda g: (round(g["val_accuracy"], 12), g["margin"]))
    return chosen, grid


def _naive_regression(x: np.ndarray, outcomes: np.ndarray, train: np.ndarray, test: np.ndarray) -> np.ndarray:
    """The trap: ridge regression of every expert's success on the embedding, then plain argmax."""
    from sklearn.linear_model import Ridge

    y = outcomes[train]
    y = np.where(np.isnan(y), np.nanmean(y, axis=0)[None, :], y)
    return np.asarray(Ridge(alpha=1.0).fit(x[train], y).predict(x[test]).argmax(axis=1), dtype=np.int64)


def write_outcome_predictions(path: Path, query_ids: Sequence[str], models: Sequence[str],
                              picks: Mapping[str, np.ndarray], best: int, outcomes: np.ndarray,
                              costs: np.ndarray) -> None:
    """One line per test query: its id, and for each system in ``picks`` (its expert index per query) the expert
    it chose, that expert's recorded outcome (null: none recorded, scored wrong) and cost; and the best single
    expert's outcome. What the routed accuracy and cost are computed from."""

    def value(x: float) -> float | None:
        return None if math.isnan(x) else round(float(x), 8)

    with open(path, "w", encoding="utf-8") as fh:
        for row, qid in enumerate(query_ids):
            line: dict[str, Any] = {"id": qid}
            for name, chosen in picks.items():
                pick = int(chosen[row])
                line[name] = {"expert": models[pick], "outcome": value(outcomes[row, pick]),
                              "cost": value(costs[row, pick])}
            line["best_single_outcome"] = value(outcomes[row, best])
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")


def split_fingerprint(ids: Sequence[str]) -> str:
    """The SHA-256 of a split part's query ids, sorted, one per line: the same part gives the same digest
    whatever its order."""
    return hashlib.sha256("\n".join(sorted(ids)).encode("utf-8")).hexdigest()


def route_outcomes(ctx: SuiteContext, x: np.ndarray, outcomes: np.ndarray, costs: np.ndarray,
                   models: Sequence[str], train: np.ndarray, val: np.ndarray, test: np.ndarray, *,
                   cost_label: str, title: str, texts: Sequence[str], reference: str | None = None,
                   tasks: Sequence[str] | None = None, query_ids: Sequence[str] | None = None) -> dict[str, Any]:
    """Tune on ``val``, refit on ``train + val``, score on ``test``; the results body of an outcome suite.
    ``texts`` are the queries (every row), for the served gate, which is trained on ``train + val`` as
    ``moe train`` trains it; ``tasks`` (every row; the task or domain the data set records) go into its
    records' ``task``; ``query_ids`` (every row; the data set's own) name the test queries in
    ``predictions.jsonl``."""
    served = _served_gate(ctx, x, outcomes, costs, models, np.r_[train, val], texts, tasks)
    costs = fill_costs(costs, train)
    o_test, c_test = outcomes[test], costs[test]
    n_models = len(models)
    train_acc = [M.routed_accuracy(_always(len(train), m), outcomes[train]) for m in range(n_models)]
    best = int(np.argmax(train_acc))  # chosen on training data, as a user would
    chosen, grid = tune_margin(x, outcomes, train, val, best)
    fit = np.r_[train, val]
    model = NeighbourOutcomes(x[fit], outcomes[fit], costs[fit])
    ids = model.neighbours(x[test], int(chosen["k"]))
    success = model.success(ids, chosen["alpha"])
    choices = route_with_margin(success, best, chosen["margin"])
    routed = _system(o_test, c_test, choices)
    rng = np.random.default_rng(ctx.seed)
    experts = {m: _system(o_test, c_test, _always(len(test), i)) | {"train_accuracy": train_acc[i]}
               for i, m in enumerate(models)}
    oracle = M.cheapest_correct_oracle(o_test, c_test)
    served_choices = served.predict_proba(x[test]).argmax(axis=1)
    served_system = _system(o_test, c_test, served_choices)
    systems = {
        "gate (kNN success, margin over best single)": routed,
        "served gate (router.outcome_gate, as moe train builds it)": served_system,
        "gate, argmax of predicted success (no margin)": _system(o_test, c_test, success.argmax(axis=1)),
        "naive per-expert success regression": _system(o_test, c_test, _naive_regression(x, outcomes, fit, test)),
        f"best single ({models[best]})": experts[models[best]],
        "random expert": _system(o_test, c_test, rng.integers(0, n_models, len(test))),
        "oracle (cheapest correct)": {"accuracy": oracle.accuracy, "cost": oracle.cost},
    }
    diff = M.bootstrap_ci(lambda o, c: M.routed_accuracy(c, o) - float(np.nan_to_num(o[:, best]).mean()),
                          o_test, choices, n=N_BOOT, seed=ctx.seed)
    acc_ci = M.bootstrap_ci(lambda o, c: M.routed_accuracy(c, o), o_test, choices, n=N_BOOT, seed=ctx.seed)
    # Paired: the served gate and the best single on the same resampled test queries (the gate is not refitted).
    served_diff = M.bootstrap_ci(lambda o, c: M.routed_accuracy(c, o) - float(np.nan_to_num(o[:, best]).mean()),
                                 o_test, served_choices, n=N_BOOT, seed=ctx.seed)
    if query_ids is not None:
        write_outcome_predictions(ctx.out / PREDICTIONS, [query_ids[i] for i in test], models,
                                  {"routed": choices, "served": served_choices}, best, o_test, c_test)
    curve, hull = _curve(model, ids, success, o_test, c_test, chosen["alpha"])
    curve_costs = [p["cost"] for p in curve]
    metrics = {"routed_accuracy": routed["accuracy"], "best_single_accuracy": experts[models[best]]["accuracy"],
               "oracle_accuracy": M.oracle_accuracy(o_test), "routed_cost": routed["cost"],
               "best_single_cost": experts[models[best]]["cost"], "routed_minus_best_single": diff.estimate,
               "aiq": M.aiq(curve_costs, [p["accuracy"] for p in curve]),
               # RouterBench's own code normalises over [0, the hull's best-quality cost], not the curve's range.
               "aiq_from_zero": M.aiq_routerbench(curve_costs, [p["accuracy"] for p in curve]),
               "served_routed_accuracy": served_system["accuracy"],
               "served_minus_best_single": served_system["accuracy"] - experts[models[best]]["accuracy"]}
    body: dict[str, Any] = {
        "metrics": metrics,
        "setup": {"train": len(train), "val": len(val), "test": len(test), "experts": n_models,
                  "best_single": models[best], "cost_unit": cost_label, **{f"chosen_{k}": v for k, v in
                                                                           chosen.items()},
                  "served_gate": served.settings()},
        "confidence_intervals": {
            "routed_accuracy": {"estimate": acc_ci.estimate, "low": acc_ci.low, "high": acc_ci.high},
            "routed_minus_best_single": {"estimate": diff.estimate, "low": diff.low, "high": diff.high},
            "served_minus_best_single": {"estimate": served_diff.estimate, "low": served_diff.low,
                                         "high": served_diff.high}},
        "systems": systems, "experts": experts, "curve": curve, "hull": {"cost": hull[0], "accuracy": hull[1]},
        "routed_share": {m: float(np.mean(choices == i)) for i, m in enumerate(models) if np.any(choices == i)},
        "served_routed_share": {m: float(np.mean(served_choices == i)) for i, m in enumerate(models)
                                if np.any(served_choices == i)},
        "tuning_grid": grid,
    }
    if query_ids is not None:
        body["predictions"] = PREDICTIONS
        # Which queries each part held, as a fingerprint (``split_fingerprint``): a rerun that drew another split
        # (another seed, changed data) says so, though the split's files are not written.
        body["setup"]["split_sha256"] = {part: split_fingerprint([query_ids[i] for i in rows])
                                         for part, rows in (("train", train), ("val", val), ("test", test))}
    if reference is not None:
        # The operating point is chosen on val (router fitted on train), then scored once on test.
        ref = models.index(reference)
        tune_model = NeighbourOutcomes(x[train], outcomes[train], costs[train])
        tune_ids = tune_model.neighbours(x[val], int(chosen["k"]))
        tune_success = tune_model.success(tune_ids, chosen["alpha"])
        tune_curve, _ = _curve(tune_model, tune_ids, tune_success, outcomes[val], costs[val], chosen["alpha"])
        tune_ref = _system(outcomes[val], costs[val], _always(len(val), ref))
        predicted = model.cost(ids)
        body["reference_match"] = chosen_match(
            tune_curve, tune_ref, lambda lam: _system(o_test, c_test, route_with_cost(success, predicted, lam)),
            experts[reference], reference)
    if ctx.plots:
        singles = {m: (e["cost"], e["accuracy"]) for m, e in experts.items()}
        # The headline routers as labelled points: the curve is the bare success model swept over λ, which the
        # margin (routed) and the served gate's own tuning improve on.
        marked = {"router (margin tuned on val)": (routed["cost"], routed["accuracy"]),
                  "served gate": (served_system["cost"], served_system["accuracy"])}
        plot_quality_cost(ctx.out / "quality_cost.png", [(p["cost"], p["accuracy"]) for p in curve], hull,
                          singles, (oracle.cost, oracle.accuracy), cost_label, f"{title}: quality against cost",
                          marked=marked)
        body["figures"] = ["quality_cost.png"]
    return body


def _served_gate(ctx: SuiteContext, x: np.ndarray, outcomes: np.ndarray, costs: np.ndarray, models: Sequence[str],
                 fit: np.ndarray, texts: Sequence[str], tasks: Sequence[str] | None = None) -> Any:
    """The outcome gate the product serves (``router.outcome_gate.train_outcome_gate``, kNN success with its
    k, shrinkage, prior and margin tuned out of fold), trained on the ``fit`` rows' records (with
    ``tasks``, each naming its task) at cost weight 0."""
    from router.outcome import OutcomeRecord
    from router.outcome_gate import train_outcome_gate

    records = [OutcomeRecord(texts[i], {m: float(outcomes[i, j]) for j, m in enumerate(models)
                                        if not np.isnan(outcomes[i, j])},
                             {m: float(costs[i, j]) for j, m in enumerate(models) if not np.isnan(costs[i, j])},
                             task=None if tasks is None else tasks[i])
               for i in fit]
    return train_outcome_gate(records, ctx.encoder, experts=list(models), progress=False, embeddings=x[fit],
                              seed=ctx.seed)


def _curve(model: NeighbourOutcomes, ids: np.ndarray, success: np.ndarray, o_test: np.ndarray,
           c_test: np.ndarray, alpha: float) -> tuple[list[dict[str, float]], tuple[np.ndarray, np.ndarray]]:
    """Sweep ``score = p_success - λ·predicted_cost`` from λ = 0 (quality only) to cost-dominated."""
    predicted = model.cost(ids)
    scale = float(np.median(predicted))
    lambdas = np.r_[0.0, np.logspace(-3, 3, N_LAMBDA) / max(scale, 1e-12)]
    curve = []
    for lam in lambdas:
        picks = route_with_cost(success, predicted, float(lam))
        curve.append({"lambda": float(lam), **_system(o_test, c_test, picks)})
    hull = M.quality_cost_hull([p["cost"] for p in curve], [p["accuracy"] for p in curve])
    return curve, hull


def _match(curve: Sequence[dict[str, float]], ref: dict[str, float], name: str) -> dict[str, Any]:
    """The cheapest curve point at least as accurate as ``ref``, and its cost as a share of ``ref``'s."""
    hits = [p for p in curve if p["accuracy"] >= ref["accuracy"]]
    point = min(hits, key=lambda p: p["cost"]) if hits else None
    return {"reference": name, "reference_accuracy": ref["accuracy"], "reference_cost": ref["cost"],
            "point": point, "cost_share": point["cost"] / ref["cost"] if point else None}


def _four(value: float | None) -> str:
    return "none" if value is None else f"{value:.4f}"


def _on_test(point: dict[str, float] | None, test_ref: dict[str, float]) -> dict[str, Any]:
    return {"point": point, "accuracy": point["accuracy"] if point else None,
            "cost_share": point["cost"] / test_ref["cost"] if point else None}


def chosen_match(tune_curve: Sequence[dict[str, float]], tune_ref: dict[str, float],
                 test_at: Callable[[float], dict[str, float]], test_ref: dict[str, float],
                 name: str) -> dict[str, Any]:
    """"The reference's accuracy at what share of its cost", with the operating point chosen on tuning data: the
    cheapest λ of ``tune_curve`` at least as accurate as the reference there (``_match``), then that λ applied
    once to test (``test_at(λ)``: the test point). ``cost_share`` and ``accuracy`` are the test point's;
    ``reaches_reference_on_test`` says whether it is at least as accurate as the reference on test."""
    tuned = _match(tune_curve, tune_ref, name)
    lam = tuned["point"]["lambda"] if tuned["point"] else None
    test = _on_test(test_at(lam) if lam is not None else None, test_ref)
    return {"reference": name, "chosen_on": "tuning", "lambda": lam, "reference_accuracy": test_ref["accuracy"],
            "reference_cost": test_ref["cost"], **test,
            "reaches_reference_on_test": None if lam is None else bool(test["accuracy"] >= test_ref["accuracy"]),
            "tuning": {"reference_accuracy": tune_ref["accuracy"], "point": tuned["point"],
                       "cost_share": tuned["cost_share"]}}


def chosen_within(tune_curve: Sequence[dict[str, float]], tune_ref: dict[str, float],
                  test_at: Callable[[float], dict[str, float]], test_ref: dict[str, float],
                  share: float) -> dict[str, Any]:
    """The most accurate λ of ``tune_curve`` costing at most ``share`` of the reference there (``best_within``
    on tuning data), applied once to test: ``accuracy`` and ``cost_share`` are the test point's, and
    ``within_budget_on_test`` says whether it kept to the budget there."""
    tuned = best_within(tune_curve, share * tune_ref["cost"])
    lam = tuned["point"]["lambda"] if tuned["point"] else None
    test = _on_test(test_at(lam) if lam is not None else None, test_ref)
    return {"chosen_on": "tuning", "budget_share": share, "lambda": lam, **test,
            "within_budget_on_test": None if lam is None else bool(test["cost_share"] <= share),
            "tuning": {"accuracy": tuned["accuracy"],
                       "cost_share": tuned["point"]["cost"] / tune_ref["cost"] if tuned["point"] else None}}


# ---------------------------------------------------------------- suites


def _ids_to_rows(ids: Sequence[str], parts: Sequence[Sequence[Any]]) -> list[np.ndarray]:
    pos = {i: n for n, i in enumerate(ids)}
    return [np.array([pos[p.id] for p in part], dtype=np.int64) for part in parts]


class _Row:
    __slots__ = ("id", "text")

    def __init__(self, id_: str, text: str = "") -> None:
        self.id, self.text = id_, text


def _split(ctx: SuiteContext, ids: Sequence[str], fractions: Sequence[float],
           texts: Sequence[str] | None = None) -> list[np.ndarray]:
    """Row indices of each part of ``split_by_id`` over ``ids``; with ``texts``, copies of one normalised text
    share a part (``split_by_id``'s ``text``)."""
    rows = [_Row(i, t) for i, t in zip(ids, texts if texts is not None else [""] * len(ids), strict=True)]
    parts = split_by_id(rows, fractions, seed=ctx.seed, text=(lambda r: r.text) if texts is not None else None)
    parts = tuple(subsample(p, ctx.limit, ctx.seed, key=lambda r: r.id) for p in parts)
    return _ids_to_rows(ids, parts)


def mmlu_pro_split(ctx: SuiteContext,
                   store: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(train, val, test) question indices of MMLU-Pro's seeded id split, the prompts' embeddings (rows of
    questions outside the three parts, left out by ``--limit``, stay zero), and the prompts. Shared by the
    outcome and combine suites."""
    from experts.recordings import mmlu_pro_prompt

    ids = [str(q.question_id) for q in store.questions]
    prompts = [mmlu_pro_prompt(q) for q in store.questions]
    train, val, test = _split(ctx, ids, FRACTIONS, prompts)
    used = np.r_[train, val, test]
    x = np.zeros((len(ids), ctx.encoder.dim), dtype=np.float32)
    x[used] = ctx.encoder.encode([prompts[i] for i in used])
    return train, val, test, x, prompts


def run_mmlu_pro_outcome(ctx: SuiteContext) -> dict[str, Any]:
    from experts.recordings import load_mmlu_pro

    folder = ctx.data_dir / "mmlu_pro_outcomes"
    store = load_mmlu_pro(folder if folder.is_dir() else ctx.data_dir)
    models = list(store.models)
    train, val, test, x, texts = mmlu_pro_split(ctx, store)
    outcomes = np.stack([as_float(store.correct(m)) for m in models], axis=1)
    chars = np.stack([as_float([o.response_chars for o in store.outcomes(m)]) for m in models], axis=1)
    chars = np.where(np.isnan(outcomes), np.nan, chars)
    ctx.notes += [
        f"split by question id, fractions {FRACTIONS}, seed {ctx.seed} (prompts whose normalised text occurs more "
        "than once are placed by a hash of that text, so no test prompt is also a training one); k, shrinkage and "
        "margin tuned on val",
        "cost model: MMLU-Pro records no prices, so a query's cost is the chosen model's recorded output length "
        "in characters (response_chars; generation cost grows with output tokens); a missing length is the "
        "model's training-split mean. Model size is not priced in: a 7B and a frontier model cost the same per "
        "character here",
        "missing outcomes: excluded when estimating success; counted as wrong for every routed system, single "
        "models included (so DeepSeek-Coder-V2, with 1,681 questions unrecorded, scores below its own accuracy)",
    ]
    return route_outcomes(ctx, x, outcomes, chars / 1000.0, models, train, val, test, texts=texts,
                          cost_label="output length (thousand characters per query)",
                          title="MMLU-Pro, 31 LLMs", tasks=[q.category for q in store.questions],
                          query_ids=[str(q.question_id) for q in store.questions])


def routerbench_split(ctx: SuiteContext,
                      rows: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(train, tuning, test) row indices into RouterBench's ``rows``: its own train/test split, 15% of train by
    row id for tuning (copies of one prompt share a part), and the test split less the prompts that also occur in
    train (normalised text; a note says how many), subsampled to ``ctx.limit``; and how many test prompts were so
    dropped. Shared by the routing and combining suites."""
    ids = [str(r.row_index) for r in rows]
    train_all = np.array([i for i, r in enumerate(rows) if r.split == "train"])
    tr, va = _split(ctx, [ids[i] for i in train_all], (0.85, 0.15), [rows[i].prompt for i in train_all])[:2]
    test_rows, dropped = without_seen([_Row(ids[i], r.prompt) for i, r in enumerate(rows) if r.split == "test"],
                                      (rows[i].prompt for i in train_all), lambda r: r.text)
    ctx.notes.append(f"RouterBench's own test split repeats {dropped} of its training prompts (same text after "
                     f"lower-casing and collapsing whitespace); those {dropped} are dropped from test")
    test = _ids_to_rows(ids, [subsample(test_rows, ctx.limit, ctx.seed, key=lambda r: r.id)])[0]
    return train_all[tr], train_all[va], test, dropped


def run_routerbench(ctx: SuiteContext) -> dict[str, Any]:
    from experts.recordings import load_routerbench

    folder = ctx.data_dir / "routerdc" / "routerbench_zs"
    store = load_routerbench(folder if folder.is_dir() else ctx.data_dir)
    rows = list(store.rows)
    models = list(store.models)
    train, val, test, dropped = routerbench_split(ctx, rows)
    used = np.r_[train, val, test]
    x = np.zeros((len(rows), ctx.encoder.dim), dtype=np.float32)
    x[used] = ctx.encoder.encode([rows[i].prompt for i in used])
    outcomes = np.array([[as_float([r.answers[m].correct])[0] for m in models] for r in rows])
    costs = np.array([[as_float([r.answers[m].cost_usd])[0] for m in models] for r in rows])
    ctx.notes += [
        "RouterBench's own train/test split (ARC-Challenge, MBPP, Winogrande); 15% of train, by row id, tunes "
        "k, shrinkage and margin; the router is then refitted on all of train",
        "the gate embeds the whole prompt. ARC and Winogrande prompts open with the same inline few-shot "
        "examples, so MiniLM's 256-token window mostly sees those and the embedding mainly tells the task; "
        "embedding only the last paragraph (the question) was measured and did worse (AIQ 0.811 vs 0.843)",
        "cost: each model's recorded USD cost for the query; the gate predicts it as the mean cost of that "
        "model on the query's nearest training neighbours",
        "escalate (ARC): at each λ the gate's top two by predicted success - λ·predicted cost answer; where "
        "router.combine.Escalate finds their recorded letters equal that answer stands, else GPT-4's recorded "
        "answer is returned and its cost paid too (not when it sat on the panel)",
    ]
    body = route_outcomes(ctx, x, outcomes, costs, models, train, val, test, texts=[r.prompt for r in rows],
                          cost_label="USD per query",
                          title="RouterBench subset, 11 LLMs", reference="gpt-4-1106-preview",
                          tasks=[r.eval_name for r in rows], query_ids=[str(r.row_index) for r in rows])
    body["setup"]["test_dropped_seen_in_training"] = dropped
    arc = np.array([rows[i].task == "arc_challenge" for i in test])
    tune_arc = val[[rows[i].task == "arc_challenge" for i in val]]
    if arc.any() and len(tune_arc):
        def responses(idx: np.ndarray) -> list[list[str]]:
            return [[rows[i].answers[m].response for m in models] for i in idx]

        body["arc_challenge"] = _subset_curve(body, outcomes[test][arc], fill_costs(costs, train)[test][arc],
                                              models, x, outcomes, costs, np.r_[train, val], test[arc],
                                              responses(test[arc]), train, tune_arc, responses(tune_arc))
        arc_body = body["arc_challenge"]
        match, esc_match = arc_body["reference_match"], arc_body["escalate"]["reference_match"]
        within, esc_within = arc_body["within_30pct"], arc_body["escalate"]["within_30pct"]
        # Every operating point below was chosen on the tuning split's ARC queries, then scored once on test.
        body["metrics"].update({
            "arc_operating_points_chosen_on": "tuning",
            "arc_gpt4_accuracy": match["reference_accuracy"],
            "arc_gpt4_cost_share": match["cost_share"], "arc_gpt4_match_accuracy": match["accuracy"],
            "arc_escalate_gpt4_cost_share": esc_match["cost_share"],
            "arc_escalate_gpt4_match_accuracy": esc_match["accuracy"],
            "arc_accuracy_within_30pct": within["accuracy"], "arc_cost_share_within_30pct": within["cost_share"],
            "arc_escalate_accuracy_within_30pct": esc_within["accuracy"],
            "arc_escalate_cost_share_within_30pct": esc_within["cost_share"],
            "arc_pair_escalate_accuracy_within_30pct": arc_body["pair_escalate"]["within_budget"]["accuracy"],
            "arc_pair_escalate_cost_share_within_30pct": arc_body["pair_escalate"]["within_budget"]["cost_share"],
            "arc_pair_escalate_best_on_test_accuracy": arc_body["pair_escalate"]["best_on_test"]["accuracy"]})
        ctx.notes.append(
            "ARC operating points (GPT-4's accuracy at the least cost; the best accuracy within 30% of GPT-4's "
            "cost), for routing to one expert and for escalate: each λ is chosen on the tuning split's "
            f"{len(tune_arc)} ARC queries (router fitted on the rest of train, GPT-4's cost and accuracy on those "
            "queries as the reference), then applied once to the test split's ARC queries (router refitted on all "
            "of train); the reported accuracy and cost share are that test point's. The curves are the whole test "
            "sweep, for reading")
        pair = arc_body["pair_escalate"]

        def pair_result(found: Mapping[str, Any], what: str) -> str:
            if not found["pair"]:  # no pair fits the budget there: say so, not "none scores none"
                return f"no pair stays within 30% of GPT-4's cost {what}"
            shown = f"{', '.join(found['pair'])} {what}, which scores {_four(found['accuracy'])} on test"
            return shown + (f" at {_four(found['cost_share'])} of GPT-4's cost" if "cost_share" in found else "")

        ctx.notes.append(
            f"ARC reference, fixed pairs (no gate): for each of the {pair['pairs']} pairs of models other than "
            "GPT-4, both answer every query and GPT-4 answers where their letters differ (router.combine.Escalate). "
            f"The most accurate pair within 30% of GPT-4's cost: "
            f"{pair_result(pair['within_budget'], 'on the tuning queries')}; "
            f"{pair_result(pair['best_on_test'], 'on test itself (chosen with hindsight, for reading)')}; "
            f"GPT-4 scores {pair['reference_accuracy']:.4f}")
        if ctx.plots:
            ref = arc_body["reference_match"]
            plot_cost_curves(ctx.out / "arc_quality_cost.png",
                             {"gate, swept over λ": [(p["cost"], p["accuracy"]) for p in arc_body["curve"]],
                              "escalate: the gate's top two, GPT-4 when they disagree":
                                  [(p["cost"], p["accuracy"]) for p in arc_body["escalate"]["curve"]]},
                             ("gpt-4-1106-preview", ref["reference_cost"], ref["reference_accuracy"]), 0.30,
                             "USD per query", "RouterBench ARC-Challenge (test): quality against cost")
            body.setdefault("figures", []).append("arc_quality_cost.png")
    body["metrics"]["gpt4_cost_share"] = body["reference_match"]["cost_share"]
    return body


def _subset_curve(body: dict[str, Any], o: np.ndarray, c: np.ndarray, models: list[str], x: np.ndarray,
                  outcomes: np.ndarray, costs: np.ndarray, fit: np.ndarray, rows: np.ndarray,
                  texts: Sequence[Sequence[str]], train: np.ndarray, tune: np.ndarray,
                  tune_texts: Sequence[Sequence[str]]) -> dict[str, Any]:
    """The λ sweep restricted to one task's test queries (``rows``, router fitted on ``fit``), and the same sweep
    for the ``escalate`` combiner over the gate's top two (``escalate_curve``). Operating points (where it
    reaches GPT-4; the best within 30% of GPT-4's cost) are chosen on the same sweeps over that task's tuning
    queries (``tune``, router fitted on ``train``) and applied once to test (``chosen_match``,
    ``chosen_within``)."""
    k, alpha = int(body["setup"]["chosen_k"]), body["setup"]["chosen_alpha"]
    reference = models.index("gpt-4-1106-preview")

    def sweep(fit_rows: np.ndarray, score_rows: np.ndarray, o_: np.ndarray, c_: np.ndarray,
              texts_: Sequence[Sequence[str]]) -> dict[str, Any]:
        model = NeighbourOutcomes(x[fit_rows], outcomes[fit_rows], fill_costs(costs, fit_rows)[fit_rows])
        ids = model.neighbours(x[score_rows], k)
        success, predicted = model.success(ids, alpha), model.cost(ids)
        curve, _ = _curve(model, ids, success, o_, c_, alpha)
        return {"curve": curve, "escalate": escalate_curve(success, predicted, texts_, o_, c_, reference,
                                                           [p["lambda"] for p in curve]),
                "gpt4": _system(o_, c_, _always(len(o_), reference)),
                "route_at": lambda lam: _system(o_, c_, route_with_cost(success, predicted, lam)),
                "escalate_at": lambda lam: escalate_curve(success, predicted, texts_, o_, c_, reference, [lam])[0]}

    test = sweep(fit, rows, o, c, texts)
    tuned = sweep(train, tune, outcomes[tune], fill_costs(costs, train)[tune], tune_texts)
    gpt4 = test["gpt4"]
    pairs = {"test": fixed_pairs(o, c, texts, reference),
             "tuning": fixed_pairs(outcomes[tune], fill_costs(costs, train)[tune], tune_texts, reference)}
    oracle = M.cheapest_correct_oracle(o, c)
    name = "gpt-4-1106-preview"
    return {"queries": len(o), "tuning_queries": len(tune), "curve": test["curve"],
            "reference_match": chosen_match(tuned["curve"], tuned["gpt4"], test["route_at"], gpt4, name),
            "within_30pct": chosen_within(tuned["curve"], tuned["gpt4"], test["route_at"], gpt4, 0.30),
            "oracle": {"accuracy": oracle.accuracy, "cost": oracle.cost, "cost_share": oracle.cost / gpt4["cost"]},
            "escalate": {"panel": 2, "escalate_to": name, "curve": test["escalate"],
                         "reference_match": chosen_match(tuned["escalate"], tuned["gpt4"], test["escalate_at"],
                                                         gpt4, name),
                         "within_30pct": chosen_within(tuned["escalate"], tuned["gpt4"], test["escalate_at"],
                                                       gpt4, 0.30)},
            "pair_escalate": pair_reference(pairs["tuning"], tuned["gpt4"], pairs["test"], gpt4, models, 0.30)}


def _apgr(pct: np.ndarray, perf: np.ndarray, weak: float, strong: float) -> float:
    """``M.apgr``, NaN where it is undefined: the strong and weak models equally accurate on these queries."""
    return float("nan") if strong == weak else M.apgr(pct, perf, weak, strong)


def _or_none(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def _f3(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.3f}"


def fixed_pairs(o: np.ndarray, c: np.ndarray, texts: Sequence[Sequence[str]],
                escalate_to: int) -> list[dict[str, Any]]:
    """``escalate`` with a fixed panel, no gate: for every pair of models other than ``escalate_to``, both answer
    every query and ``escalate_to`` answers where they disagree (``escalate_curve`` with that pair as the panel).
    Returns each pair's ``accuracy`` and mean ``cost``; ``pair`` holds the two models' indices."""
    n, m = o.shape
    points = []
    for a, b in itertools.combinations([j for j in range(m) if j != escalate_to], 2):
        panel = np.zeros((n, m))
        panel[:, [a, b]] = 1.0
        point = escalate_curve(panel, np.zeros((n, m)), texts, o, c, escalate_to, [0.0])[0]
        points.append({"pair": (a, b), "accuracy": point["accuracy"], "cost": point["cost"]})
    return points


def pair_reference(tuning: Sequence[dict[str, Any]], tune_ref: dict[str, float], test: Sequence[dict[str, Any]],
                   test_ref: dict[str, float], models: Sequence[str], share: float) -> dict[str, Any]:
    """A reference for what the recordings allow within ``share`` of the reference model's cost: the fixed pair
    (``fixed_pairs``) most accurate within that budget on the tuning queries, scored once on test
    (``within_budget``), and, chosen on test itself and so only for reading, the most accurate pair within the
    budget there (``best_on_test``)."""
    def named(point: dict[str, Any] | None, ref: dict[str, float]) -> dict[str, Any]:
        if point is None:
            return {"pair": None, "accuracy": None, "cost_share": None}
        return {"pair": [models[j] for j in point["pair"]], "accuracy": point["accuracy"],
                "cost_share": point["cost"] / ref["cost"]}

    tuned = best_within(tuning, share * tune_ref["cost"])["point"]
    on_test = next((p for p in test if tuned is not None and p["pair"] == tuned["pair"]), None)
    picked = named(on_test, test_ref)
    kept = None if picked["cost_share"] is None else bool(picked["cost_share"] <= share)
    return {"pairs": len(test), "budget_share": share, "reference_accuracy": test_ref["accuracy"],
            "within_budget": {"chosen_on": "tuning", **picked, "within_budget_on_test": kept,
                              "tuning": named(tuned, tune_ref)},
            "best_on_test": {"chosen_on": "test", **named(best_within(test, share * test_ref["cost"])["point"],
                                                            test_ref)}}


def best_within(curve: Sequence[dict[str, float]], budget: float) -> dict[str, Any]:
    """The most accurate curve point costing at most ``budget`` (the cheaper on a tie); accuracy None when none
    does."""
    fits = [p for p in curve if p["cost"] <= budget]
    point = max(fits, key=lambda p: (p["accuracy"], -p["cost"])) if fits else None
    return {"budget": budget, "point": point, "accuracy": point["accuracy"] if point else None}


def escalate_curve(success: np.ndarray, predicted: np.ndarray, texts: Sequence[Sequence[str]], o: np.ndarray,
                   c: np.ndarray, escalate_to: int, lambdas: Sequence[float], panel: int = 2,
                   extractor: str = "choice") -> list[dict[str, float]]:
    """``router.combine.Escalate`` on recorded responses, over the λ sweep: for each query the gate's top
    ``panel`` experts by ``success - λ·predicted`` answer; when ``Escalate.agreed`` finds them on one answer,
    that answer stands (graded as any member that gave it: every response with the same letter has the same
    grade here), otherwise expert ``escalate_to`` answers, at its cost too unless it sat on the panel. A member
    with no record (NaN grade) gave no answer, so the rest cannot agree with it. ``c`` holds no NaN
    (``fill_costs``)."""
    from router.combine import Escalate, WeightedAnswer

    combiner = Escalate(str(escalate_to), extractor)
    out = []
    for lam in lambdas:
        panels = np.argsort(-(success - lam * predicted), axis=1, kind="stable")[:, :panel]
        right, spent = np.zeros(len(o)), np.zeros(len(o))
        for q, members in enumerate(panels):
            answers = [WeightedAnswer(str(j), 1.0 / panel, texts[q][j]) for j in members if not np.isnan(o[q, j])]
            spent[q] = c[q, members].sum()
            if combiner.agreed(answers) is not None:
                right[q] = o[q, int(answers[0].expert)]  # every answer that agreed has a record and this grade
            else:
                right[q] = np.nan_to_num(o[q, escalate_to])
                spent[q] += 0.0 if escalate_to in members else c[q, escalate_to]
        out.append({"lambda": float(lam), "accuracy": float(right.mean()), "cost": float(spent.mean())})
    return out


def run_routellm_mmlu(ctx: SuiteContext) -> dict[str, Any]:
    suite = load_routellm_mmlu(ctx.data_dir)
    ids = [q.id for q in suite.queries]
    train, val, test = _split(ctx, ids, FRACTIONS, [q.text for q in suite.queries])
    used = np.r_[train, val, test]
    x = np.zeros((len(ids), ctx.encoder.dim), dtype=np.float32)
    x[used] = ctx.encoder.encode([suite.queries[i].text for i in used])
    pair = np.stack([suite.strong_correct, suite.weak_correct], axis=1).astype(float)

    def win_rate(fit: np.ndarray, rows: np.ndarray, k: int, alpha: float) -> np.ndarray:
        model = NeighbourOutcomes(x[fit], pair[fit])
        p = model.success(model.neighbours(x[rows], k), alpha)
        return np.asarray(p[:, 0] - p[:, 1])  # predicted gain from calling the strong model

    def score(s: np.ndarray, rows: np.ndarray) -> tuple[float, float]:
        """APGR on ``rows`` (NaN where the two models are equally accurate there, and APGR undefined) and the
        area under the accuracy curve, which decides between settings then (a --limit run's small split)."""
        strong, weak = pair[rows, 0], pair[rows, 1]
        pct, perf = M.strong_call_curve(s, strong, weak)
        return _apgr(pct, perf, float(weak.mean()), float(strong.mean())), float(np.mean(perf))

    grid: list[dict[str, Any]] = []
    for k, a in itertools.product(K_GRID, ALPHA_GRID):
        val_apgr, val_mean = score(win_rate(train, val, k, a), val)
        grid.append({"k": k, "alpha": a, "val_apgr": val_apgr, "val_mean_accuracy": val_mean})
    tied = any(np.isnan(g["val_apgr"]) for g in grid)
    chosen = max(grid, key=lambda g: g["val_mean_accuracy" if tied else "val_apgr"])
    for g in grid:
        g["val_apgr"] = _or_none(g["val_apgr"])
    s = win_rate(np.r_[train, val], test, int(chosen["k"]), chosen["alpha"])
    strong, weak = pair[test, 0], pair[test, 1]
    sw, ww = float(strong.mean()), float(weak.mean())
    pct, perf = M.strong_call_curve(s, strong, weak)
    rand = np.random.default_rng(ctx.seed).random(len(test))
    r_pct, r_perf = M.strong_call_curve(rand, strong, weak)
    ci = M.bootstrap_ci(lambda sc, st, wk: _apgr(*M.strong_call_curve(sc, st, wk), float(wk.mean()),
                                                 float(st.mean())), s, strong, weak, n=N_BOOT, seed=ctx.seed)
    defined = sw != ww  # else APGR and CPT, fractions of the gap between the two, have no gap to measure
    cpts: dict[float, float] = {t: M.cpt(pct, perf, ww, sw, t) for t in (50, 80)} if defined else {}
    metrics = {"apgr": _or_none(_apgr(pct, perf, ww, sw)), "cpt50": cpts.get(50), "cpt80": cpts.get(80),
               "best_single_accuracy": sw, "weak_accuracy": ww, "oracle_accuracy": M.oracle_accuracy(pair[test]),
               "random_apgr": _or_none(_apgr(r_pct, r_perf, ww, sw))}
    if tied:
        ctx.notes.append("the strong and weak models are equally accurate on the validation split (a small "
                         "--limit?), where APGR is undefined: k and shrinkage were tuned on the mean accuracy "
                         "along the strong-call curve instead")
    if not defined:
        ctx.notes.append("the strong and weak models are equally accurate on the test split, so APGR and CPT "
                         "are undefined (null)")
    ctx.notes.append(f"split by id, fractions {FRACTIONS}, seed {ctx.seed} (prompts whose normalised text occurs "
                     "more than once are placed by a hash of that text, so no test prompt is also a training "
                     "one); contaminated prompts dropped as "
                     "RouteLLM does; the win-rate score is the kNN-estimated success of the strong model minus "
                     "the weak one's, with k and shrinkage tuned on val by APGR")
    body: dict[str, Any] = {
        "metrics": metrics,
        "setup": {"train": len(train), "val": len(val), "test": len(test), "strong": suite.strong_model,
                  "weak": suite.weak_model, "chosen_k": chosen["k"], "chosen_alpha": chosen["alpha"]},
        "confidence_intervals": {"apgr": {"estimate": _or_none(ci.estimate), "low": _or_none(ci.low),
                                          "high": _or_none(ci.high)}},
        "strong_call_curve": {"gate": {"strong_pct": pct, "accuracy": perf},
                              "random": {"strong_pct": r_pct, "accuracy": r_perf}},
        "tuning_grid": grid,
    }
    with open(ctx.out / PREDICTIONS, "w", encoding="utf-8") as fh:  # what the curves and APGR are computed from
        for row, i in enumerate(test):
            fh.write(json.dumps({"id": ids[i], "strong_win_score": float(s[row]),
                                 "random_score": float(rand[row]), "strong_correct": bool(strong[row]),
                                 "weak_correct": bool(weak[row])}) + "\n")
    body["predictions"] = PREDICTIONS
    if ctx.plots:
        plot_strong_calls(ctx.out / "strong_calls.png", {"gate (kNN win rate)": (pct, perf),
                                                          "random router (seeded draw)": (r_pct, r_perf)}, sw, ww,
                          f"RouteLLM MMLU: {suite.strong_model.split('/')[-1]} (strong) vs "
                          f"{suite.weak_model.split('/')[-1]} (weak)\n{len(test)} test questions, "
                          f"APGR {_f3(metrics['apgr'])} (random router {_f3(metrics['random_apgr'])})",
                          cpt=cpts)
        body["figures"] = ["strong_calls.png"]
    return body
