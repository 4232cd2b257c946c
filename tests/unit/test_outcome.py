"""Outcome records, the outcome gate on real RouterBench outcomes, the cost knob, cold start and removal."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import replace as dataclasses_replace
from pathlib import Path

import numpy as np
import pytest

from experts.recordings import RouterBenchRow, load_routerbench
from router.encoders import Encoder, OnnxMiniLMEncoder
from router.gate import Gate, GateArtifactMismatch
from router.outcome import OutcomeRecord, is_outcome_file, load_outcome_jsonl
from router.outcome_gate import (
    KNN_GRID,
    OutcomeGate,
    _folds,
    _KnnOutOfFold,
    outcome_data_sha256,
    train_outcome_gate,
    tune,
)

N_TRAIN, N_TEST = 900, 450
GPT4 = "gpt-4-1106-preview"
SQL_EXAMPLES = [
    "Write a SQL query that returns the ten customers with the highest total order value.",
    "How do I join two tables in PostgreSQL and keep rows without a match?",
    "Write an SQL statement to delete duplicate rows from a table, keeping the lowest id.",
    "Explain the difference between WHERE and HAVING in SQL with an example query.",
    "Create a SQL index to speed up a query filtering orders by customer_id and date.",
]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- records ------------------------------------------------------------------------------------------------

def test_outcome_records_load_and_missing_experts_stay_missing(tmp_path: Path) -> None:
    path = _write(tmp_path / "o.jsonl", [
        json.dumps({"query": "q1", "outcomes": {"a": 1, "b": 0.25}, "cost": {"a": 0.5}}), "",
        json.dumps({"query": "q2", "outcomes": {"b": 1.0}})])
    assert is_outcome_file(path)
    assert load_outcome_jsonl(path) == [OutcomeRecord("q1", {"a": 1.0, "b": 0.25}, {"a": 0.5}),
                                        OutcomeRecord("q2", {"b": 1.0}, {})]
    assert not is_outcome_file(_write(tmp_path / "l.jsonl", [json.dumps({"query": "q", "label": "a"})]))


def test_outcome_records_keep_their_task(tmp_path: Path) -> None:
    path = _write(tmp_path / "o.jsonl", [json.dumps({"query": "q1", "outcomes": {"a": 1}, "task": "law"}),
                                         json.dumps({"query": "q2", "outcomes": {"a": 0}, "task": None})])
    assert [r.task for r in load_outcome_jsonl(path)] == ["law", None]


@pytest.mark.parametrize(("bad", "problem"), [
    ('{"query": "q", "outcomes": ', "not valid JSON"),
    ('["q"]', "expected an object"),
    ('{"outcomes": {"a": 1}}', "'query' missing"),
    ('{"query": " ", "outcomes": {"a": 1}}', "'query' must be a non-empty string"),
    ('{"query": "\\u200b\\u0000", "outcomes": {"a": 1}}', "'query' must be a non-empty string"),
    ('{"query": "q"}', "'outcomes' missing"),
    ('{"query": "q", "outcomes": [1]}', "'outcomes' must be an object"),
    ('{"query": "q", "outcomes": {}}', "'outcomes' is empty"),
    ('{"query": "q", "outcomes": {"a": 1.5}}', r"outcomes\['a'\] must be in \[0, 1\]"),
    ('{"query": "q", "outcomes": {"a": true}}',
     r"outcomes\['a'\] must be in \[0, 1\], got true \(a JSON boolean, not a number: write 1\)"),
    ('{"query": "q", "outcomes": {"a": 1}, "cost": {"a": -1}}', r"cost\['a'\] must be a finite number"),
    ('{"query": "q", "outcomes": {"a": 1}, "cost": {"a": 1' + "0" * 400 + '}}',
     r"cost\['a'\] must be a finite number >= 0, got 10000000000000000000\.\.\. \(401 digits\)"),
    ('{"query": "q", "outcomes": {"a": 1}, "label": "a"}', r"unknown key\(s\) 'label'; .* \('label' is a labelled "
                                                           "query's key: the file was read as outcome records"),
    ('{"query": "q", "outcomes": {"a": 1}, "task": 3}', "'task' must be a non-empty string"),
    ('{"query": "q", "outcomes": {"a": 1}, "task": " "}', "'task' must be a non-empty string"),
])
def test_bad_outcome_line_is_reported_with_its_number(tmp_path: Path, bad: str, problem: str) -> None:
    path = _write(tmp_path / "o.jsonl", [json.dumps({"query": "q", "outcomes": {"a": 1}}), "", bad])
    with pytest.raises(ValueError, match=problem) as info:
        load_outcome_jsonl(path)
    assert str(info.value).startswith(f"{path}:3: ")


# --- the gate on real RouterBench outcomes -----------------------------------------------------------------

def _records(rows: list[RouterBenchRow], models: tuple[str, ...]) -> list[OutcomeRecord]:
    return [OutcomeRecord(r.prompt, {m: a.correct for m in models if (a := r.answers[m]).correct is not None},
                          {m: a.cost_usd for m in models if (a := r.answers[m]).cost_usd is not None})
            for r in rows]


@pytest.fixture(scope="module")
def routerbench(data_dir: Path) -> dict[str, list[RouterBenchRow]]:
    """A seeded sample of RouterBench's train and test splits (900 and 450 rows)."""
    store = load_routerbench(data_dir / "routerdc" / "routerbench_zs")
    rng = np.random.default_rng(0)
    out = {}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        rows = store.select(split=split)
        out[split] = [rows[i] for i in sorted(rng.choice(len(rows), n, replace=False))]
    return out


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    # The first 32 tokens carry the task and question type, which is most of what routing here learns;
    # RouterBench's long few-shot prompts would make the full 256 tokens cost minutes on 2 cores.
    return OnnxMiniLMEncoder(max_length=32)


@pytest.fixture(scope="module")
def models(data_dir: Path) -> tuple[str, ...]:
    return load_routerbench(data_dir / "routerdc" / "routerbench_zs").models


@pytest.fixture(scope="module")
def outcome_gate(routerbench: dict[str, list[RouterBenchRow]], models: tuple[str, ...],
                 encoder: Encoder) -> OutcomeGate:
    return train_outcome_gate(_records(routerbench["train"], models), encoder, experts=list(models),
                              progress=False)


@pytest.fixture(scope="module")
def test_x(routerbench: dict[str, list[RouterBenchRow]], encoder: Encoder) -> np.ndarray:
    return encoder.encode([r.prompt for r in routerbench["test"]])


def _score(gate: Gate, x: np.ndarray, rows: list[RouterBenchRow]) -> tuple[float, float]:
    """(accuracy, total USD) of top-1 routing; a missing record counts as wrong and free."""
    chosen = [gate.experts[i] for i in gate.predict_proba(x).argmax(axis=1)]
    acc = np.mean([r.answers[e].correct or 0.0 for r, e in zip(rows, chosen, strict=True)])
    return float(acc), float(sum(r.answers[e].cost_usd or 0.0 for r, e in zip(rows, chosen, strict=True)))


def test_outcome_gate_scores_are_distributions_and_probabilities(outcome_gate: OutcomeGate,
                                                                 test_x: np.ndarray) -> None:
    p, s = outcome_gate.predict_proba(test_x), outcome_gate.predict_success(test_x)
    assert p.shape == s.shape == (N_TEST, 11)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-9)
    assert ((s >= 0) & (s <= 1)).all()
    np.testing.assert_allclose(outcome_gate.predict_utility(test_x), s)  # cost weight 0: utility is success
    m = outcome_gate.metadata.metrics
    assert m.best_single == GPT4 and m.ece_after is not None and m.ece_before is not None
    assert m.ece_after <= m.ece_before + 1e-9


def test_knn_neighbourhood_and_shrinkage_are_chosen_out_of_fold(outcome_gate: OutcomeGate) -> None:
    """Training picks the (k, alpha) whose out-of-fold top-1 routing realises the most utility, and keeps that
    setting's out-of-fold predictions for re-tuning the margin."""
    cal = outcome_gate.calibration
    outcomes, costs = cal["cal_outcomes"].astype(np.float64), cal["cal_costs"].astype(np.float64)
    x, texts = outcome_gate.example_embeddings, list(outcome_gate.example_texts)
    oof = _KnnOutOfFold(x, outcomes, _folds(texts, 0), max(k for k, _ in KNN_GRID))
    assert oof.k == 100  # 900 records: every fold's training part holds far more
    cost = outcome_gate.cost / outcome_gate.cost_scale
    value = {(k, a): tune(oof.success(k, a), outcomes, costs, cost, 0.0).metrics["routed_utility"]
             for k, a in KNN_GRID}
    chosen = (outcome_gate.model.k, outcome_gate.model.alpha)  # type: ignore[attr-defined]
    assert chosen in value and value[chosen] == max(value.values()), (chosen, value)
    assert len(set(value.values())) > 1  # the settings differ, so the choice is a real one
    np.testing.assert_allclose(cal["cal_success"], oof.success(*chosen), atol=1e-6)
    assert min(k for k, _ in KNN_GRID) >= 25  # small neighbourhoods turn into shared hubs (see KNN_GRID)


def test_cost_knob_trades_accuracy_for_cost_and_beats_single_experts(
        outcome_gate: OutcomeGate, test_x: np.ndarray, routerbench: dict[str, list[RouterBenchRow]],
        models: tuple[str, ...]) -> None:
    rows = routerbench["test"]
    single = {m: (np.mean([r.answers[m].correct or 0.0 for r in rows]),
                  sum(r.answers[m].cost_usd or 0.0 for r in rows)) for m in models}
    curve = {lam: _score(outcome_gate.with_cost_weight(lam), test_x, rows) for lam in (0.0, 0.1, 1.0)}
    gpt4_acc, gpt4_cost = single[GPT4]
    # Measured on this sample: lambda 0 -> 0.87-0.88 at 95-100% of GPT-4's cost (GPT-4 itself: 0.88);
    # lambda 0.1 -> ~0.85 at ~35%; lambda 1 -> ~0.80 at ~7%. Best expert other than GPT-4: ~0.78.
    assert curve[0.0][0] >= gpt4_acc - 0.02
    assert curve[1.0][1] < curve[0.1][1] < curve[0.0][1]
    best_cheap = max(acc for m, (acc, _) in single.items() if m != GPT4)
    acc, cost = curve[0.1]
    assert acc >= best_cheap + 0.03 and cost <= 0.5 * gpt4_cost, (acc, cost / gpt4_cost, best_cheap)


def test_outcome_artifact_round_trip(outcome_gate: OutcomeGate, test_x: np.ndarray, tmp_path: Path) -> None:
    tuned = outcome_gate.with_cost_weight(0.1)
    tuned.save(tmp_path / "gate")
    doc = json.loads((tmp_path / "gate" / "gate.json").read_text())
    assert doc["kind"] == "outcome" and doc["cost_weight"] == 0.1 and doc["classifier"] == "knn"
    loaded = Gate.load(tmp_path / "gate", outcome_gate.encoder)
    assert isinstance(loaded, OutcomeGate) and loaded.metadata == tuned.metadata
    np.testing.assert_allclose(loaded.predict_proba(test_x), tuned.predict_proba(test_x), atol=1e-6)
    assert loaded.tuning.margin == tuned.tuning.margin and loaded.temperature == pytest.approx(tuned.temperature)


# --- cold start and removal ----------------------------------------------------------------------------------

def test_cold_start_expert_is_routed_queries_like_its_examples(
        outcome_gate: OutcomeGate, test_x: np.ndarray, encoder: Encoder) -> None:
    config_experts = {**{key: [] for key in outcome_gate.experts}, "sql-expert": SQL_EXAMPLES}
    gate = outcome_gate.for_experts(config_experts)
    assert gate.experts[-1] == "sql-expert"
    sql = gate.scores(["Write a SQL query listing each department with its average salary, highest first."])
    assert gate.experts[int(sql.argmax())] == "sql-expert"
    np.testing.assert_allclose(sql.sum(), 1.0)
    # RouterBench's own questions stay with the trained experts.
    p = gate.predict_proba(test_x)
    assert (p.argmax(axis=1) != len(gate.experts) - 1).mean() >= 0.98
    assert np.isnan(gate.predict_success(test_x)[:, -1]).all()
    assert gate.nearest(encoder.encode([SQL_EXAMPLES[1]])[0], 1)[0].label == "sql-expert"


def test_removing_experts_needs_no_retraining(outcome_gate: OutcomeGate, test_x: np.ndarray) -> None:
    keep = [e for e in outcome_gate.experts if e != GPT4][::-1]
    gate = outcome_gate.for_experts({key: [] for key in keep})
    p, full = gate.predict_proba(test_x), outcome_gate.predict_proba(test_x)
    assert gate.experts == keep and p.shape == (N_TEST, 10)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-9)
    cols = [outcome_gate.experts.index(e) for e in keep]
    np.testing.assert_allclose(p, full[:, cols] / full[:, cols].sum(axis=1, keepdims=True), atol=1e-9)


def test_expert_without_data_or_examples_is_refused_by_name(outcome_gate: OutcomeGate) -> None:
    with pytest.raises(GateArtifactMismatch, match="'new-model'"):
        outcome_gate.for_experts({**{key: [] for key in outcome_gate.experts}, "new-model": []})


def test_the_margin_does_not_credit_picks_that_have_no_record() -> None:
    """An expert with no record for a query earns nothing there when the margin is chosen, as the evaluation
    scores it: its predicted success (here its prior, extrapolated to queries it never answered) is no evidence.
    Crediting the prediction chose margin 0 here and sent half the queries to the unrecorded expert."""
    n = 100
    a = np.array([1.0 if i % 10 < 7 else 0.0 for i in range(n)])  # 0.7, recorded everywhere
    b = np.where(np.arange(n) < 50, np.array([1.0 if i % 10 < 6 else 0.0 for i in range(n)]), np.nan)
    outcomes = np.stack([a, b], axis=1)
    success = np.stack([np.full(n, 0.7), np.where(np.arange(n) < 50, 0.65, 0.9)], axis=1)
    t = tune(success, outcomes, np.full((n, 2), np.nan), np.zeros(2), 0.0)
    assert t.anchor == 0
    logits = success.copy()
    logits[:, t.anchor] += t.margin
    assert (logits.argmax(axis=1) == 0).all(), t.margin
    assert t.metrics["routed_utility"] == pytest.approx(0.7)


def test_the_reported_routed_accuracy_counts_a_pick_without_a_record_as_wrong() -> None:
    """gate.json's ``routed_accuracy`` and ``best_single_accuracy`` are scored as the evaluation scores them: a
    pick (or a single expert) with no record for a query is wrong, not credited with its predicted success."""
    n = 100
    a = np.array([1.0 if i % 10 < 6 else 0.0 for i in range(n)])  # 0.6, recorded everywhere
    b = np.where(np.arange(n) < 50, 1.0, np.nan)  # right on every query it has a record for, half of them
    outcomes = np.stack([a, b], axis=1)
    success = np.stack([np.full(n, 0.6), np.full(n, 0.95)], axis=1)  # b predicted everywhere
    t = tune(success, outcomes, np.full((n, 2), np.nan), np.zeros(2), 0.0)
    chosen = (success + np.eye(2)[t.anchor] * t.margin).argmax(axis=1)
    expected = np.where(np.isnan(outcomes), 0.0, outcomes)[np.arange(n), chosen].mean()
    assert t.metrics["routed_accuracy"] == pytest.approx(expected)
    assert t.metrics["unrecorded_pick_share"] == pytest.approx(np.isnan(outcomes[np.arange(n), chosen]).mean())
    assert t.metrics["best_single_accuracy"] == pytest.approx(0.6)  # b: 50 right of 100, a: 60


def test_the_routed_cost_is_reported_only_when_every_pick_has_a_recorded_cost() -> None:
    """With b's cost unrecorded, the mean over the picks that have one was a's cost alone (1.0, with most picks
    on b): the routed cost is null then, beside the share of picks without a cost."""
    n = 100
    outcomes = np.stack([np.where(np.arange(n) < 20, 1.0, 0.0), np.where(np.arange(n) < 20, 0.0, 1.0)], axis=1)
    costs = np.stack([np.ones(n), np.full(n, np.nan)], axis=1)
    t = tune(outcomes.copy(), outcomes, costs, np.zeros(2), 0.0)
    chosen = (outcomes + np.eye(2)[t.anchor] * t.margin).argmax(axis=1)
    assert 0 < (chosen == 1).mean() < 1
    assert t.metrics["routed_cost"] is None
    assert t.metrics["uncosted_pick_share"] == pytest.approx((chosen == 1).mean())
    both = tune(outcomes.copy(), outcomes, np.stack([np.ones(n), np.full(n, 3.0)], axis=1), np.zeros(2), 0.0)
    picks = (outcomes + np.eye(2)[both.anchor] * both.margin).argmax(axis=1)
    assert both.metrics["routed_cost"] == pytest.approx(np.where(picks == 1, 3.0, 1.0).mean())
    assert both.metrics["uncosted_pick_share"] == 0.0


def test_an_expert_with_a_few_lucky_records_does_not_take_over_routing(caplog: pytest.LogCaptureFixture) -> None:
    """Three records, all right, once made an expert the anchor and every query's pick: where no neighbour has
    a record for it, its success estimate was its own 3/3. The anchor is now chosen by what the records make
    sure of, picks without a record earn nothing when the margin is tuned, and training says the records are
    thin for it."""
    from tests.doubles.fakes import FakeHashingEncoder

    rng = np.random.default_rng(0)
    n = 300
    a = (rng.random(n) < 0.6).astype(float)
    b = (rng.random(n) < 0.5).astype(float)
    records = [OutcomeRecord(f"question number {i} about topic {i % 7}",
                             {"a": a[i], "b": b[i], **({"rare": 1.0} if i < 3 else {})}, {}) for i in range(n)]
    with caplog.at_level("WARNING", logger="router.outcome_gate"):
        gate = train_outcome_gate(records, FakeHashingEncoder(), experts=["a", "b", "rare"], progress=False)
    assert "few records for rare (3)" in caplog.text
    assert gate.experts[gate.tuning.anchor] == "a"
    assert gate.metadata.metrics.best_single == "a"
    picks = gate.scores([f"a new question {i}" for i in range(50)]).argmax(axis=1)
    assert np.mean([gate.experts[p] == "rare" for p in picks]) < 0.1
    assert gate.metadata.metrics.routed_accuracy is not None and gate.metadata.metrics.routed_accuracy > 0.5
    assert gate.metadata.metrics.routed_cost is None  # no costs recorded: null, not NaN
    assert gate.metadata.uncosted_pick_share == 1.0  # which gate.json says beside it


def test_success_prior_is_shrunk_toward_the_pooled_rate_by_record_count() -> None:
    from router.outcome import PRIOR_RECORDS, success_prior

    outcomes = np.full((1000, 2), np.nan)
    outcomes[:, 0] = np.r_[np.ones(600), np.zeros(400)]  # 0.6 over 1000 records
    outcomes[:3, 1] = 1.0  # 3 of 3
    pooled = 603 / 1003
    assert success_prior(outcomes) == pytest.approx(
        [(600 + PRIOR_RECORDS * pooled) / (1000 + PRIOR_RECORDS), (3 + PRIOR_RECORDS * pooled) / (3 + PRIOR_RECORDS)])
    assert success_prior(outcomes, strength=0.0) == pytest.approx([0.6, 1.0])


# --- the task prior ------------------------------------------------------------------------------------------

# Success rates of four experts on three tasks: "a" is the best single expert, "b" and "c" are specialists.
TASK_RATES = {"a": (0.7, 0.7, 0.7), "b": (0.95, 0.45, 0.45), "c": (0.45, 0.95, 0.45), "d": (0.4, 0.4, 0.4)}


def _task_data(n: int, seed: int, noise: float = 8.0) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Queries of three tasks around three fixed directions, with so much noise that a query's nearest
    neighbours mix the tasks, and each expert's recorded outcomes at its rate on the query's task."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(3, 384))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    task = rng.integers(0, 3, n)
    x = centres[task] + noise * rng.normal(size=(n, 384)) / np.sqrt(384)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    outcomes = {e: (rng.random(n) < np.array(r)[task]).astype(float) for e, r in TASK_RATES.items()}
    return x.astype(np.float32), task, outcomes


def _task_records(outcomes: dict[str, np.ndarray], tasks: Sequence[str | None]) -> list[OutcomeRecord]:
    return [OutcomeRecord(f"q{i}", {e: float(o[i]) for e, o in outcomes.items()}, {}, task=t)
            for i, t in enumerate(tasks)]


def _accuracy(gate: Gate, x: np.ndarray, outcomes: dict[str, np.ndarray]) -> float:
    picks = gate.predict_proba(x).argmax(axis=1)
    return float(np.mean([outcomes[gate.experts[p]][i] for i, p in enumerate(picks)]))


def test_records_that_name_their_task_let_the_gate_route_by_task(tmp_path: Path) -> None:
    """Where neighbourhoods mix tasks, each task's success rates (from hundreds of records, mixed by a
    classifier's task probabilities) tell the specialists' strengths better than 25-100 neighbours do. Out of
    fold, training picks the task prior; the gate then routes fresh queries far better than without tasks, and
    an artifact keeps the prior."""
    from tests.doubles.fakes import FakeHashingEncoder

    x, task, outcomes = _task_data(1500, seed=0)
    x_new, _, new = _task_data(3000, seed=1)
    with_tasks = train_outcome_gate(_task_records(outcomes, [f"t{t}" for t in task]), FakeHashingEncoder(),
                                    progress=False, embeddings=x)
    without = train_outcome_gate(_task_records(outcomes, [None] * len(x)), FakeHashingEncoder(), progress=False,
                                 embeddings=x)
    assert with_tasks.settings()["success_model"]["prior"] == "task"
    assert with_tasks.settings()["success_model"]["tasks"] == ["t0", "t1", "t2"]
    assert without.settings()["success_model"]["prior"] == "overall"
    best_single = float(np.mean(new["a"]))
    routed, plain = _accuracy(with_tasks, x_new, new), _accuracy(without, x_new, new)
    # Routing each task to its best expert would score (0.95 + 0.95 + 0.7) / 3 = 0.87.
    assert routed > plain + 0.04, (routed, plain)
    assert routed > best_single + 0.08, (routed, best_single)

    with_tasks.save(tmp_path / "gate")
    loaded = Gate.load(tmp_path / "gate", FakeHashingEncoder())
    assert isinstance(loaded, OutcomeGate)
    np.testing.assert_allclose(loaded.predict_proba(x_new[:200]), with_tasks.predict_proba(x_new[:200]), atol=1e-6)
    saved = json.loads((tmp_path / "gate" / "gate.json").read_text())
    assert saved["success_model"] == loaded.settings()["success_model"]
    assert {k: saved["success_model"][k] for k in ("kind", "prior", "tasks")} == {
        "kind": "knn", "prior": "task", "tasks": ["t0", "t1", "t2"]}
    assert saved["format_version"] == 2  # code from before task priors refuses it rather than misreading it


def test_tasks_that_say_nothing_about_outcomes_are_left_out() -> None:
    from tests.doubles.fakes import FakeHashingEncoder

    x, _, outcomes = _task_data(1500, seed=0)
    noise = np.random.default_rng(5).integers(0, 3, len(x))
    gate = train_outcome_gate(_task_records(outcomes, [f"r{t}" for t in noise]), FakeHashingEncoder(), progress=False,
                              embeddings=x)
    assert gate.settings()["success_model"]["prior"] == "overall"


def test_task_prior_mixes_each_tasks_rates_by_the_query_s_task_probabilities() -> None:
    from router.outcome import TASK_RECORDS, KnnSuccess, TaskPrior, success_prior

    x, task, outcomes = _task_data(1200, seed=2, noise=1.0)  # tasks the classifier tells apart
    matrix = np.stack([outcomes[e] for e in TASK_RATES], axis=1)
    tasks: list[str | None] = [f"t{t}" for t in task]
    tasks[:100] = [None] * 100  # rows without a task teach neither the classifier nor the rates
    prior = TaskPrior.fit(x, tasks, matrix)
    assert prior is not None and prior.tasks == ("t0", "t1", "t2")
    knn = KnnSuccess(25, 10.0)
    knn.fit(x, matrix)
    near = knn.neighbours(x, 25)
    overall = success_prior(matrix)
    rows = np.flatnonzero(task[100:] == 1) + 100
    expected = (matrix[rows].sum(axis=0) + TASK_RECORDS * overall) / (len(rows) + TASK_RECORDS)
    np.testing.assert_allclose(prior.rates[1], expected)
    proba = prior.task_proba(x[task == 1], x, near[task == 1])
    assert np.mean(proba.argmax(axis=1) == 1) > 0.95
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_allclose(prior.predict(x[:5], x, near[:5]), prior.task_proba(x[:5], x, near[:5]) @ prior.rates)
    restored = TaskPrior.from_arrays(prior.arrays())
    np.testing.assert_allclose(restored.predict(x[:50], x, near[:50]), prior.predict(x[:50], x, near[:50]))
    assert TaskPrior.fit(x, ["only"] * len(x), matrix) is None  # one task: nothing to mix
    # A task with fewer than TASK_MIN_RECORDS records is no task: one task per record models nothing.
    assert TaskPrior.fit(x, [f"q{i}" for i in range(len(x))], matrix) is None
    rare = [*tasks[:-5], *["rare"] * 5]
    fitted = TaskPrior.fit(x, rare, matrix)
    assert fitted is not None and "rare" not in fitted.tasks and (fitted.row_tasks[-5:] == -1).all()


def test_a_task_changes_the_data_fingerprint_and_no_task_keeps_it() -> None:
    plain = [OutcomeRecord("q1", {"a": 1.0}, {}), OutcomeRecord("q2", {"a": 0.0}, {})]
    tasked = [OutcomeRecord("q1", {"a": 1.0}, {}, task="law"), OutcomeRecord("q2", {"a": 0.0}, {})]
    assert outcome_data_sha256(plain) != outcome_data_sha256(tasked)
    # Records without tasks hash as they did before tasks existed, so older artifacts still match their data.
    lines = sorted(json.dumps([r.query, sorted(r.outcomes.items()), sorted(r.cost.items())], ensure_ascii=False)
                   for r in plain)
    assert outcome_data_sha256(plain) == hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def test_task_names_are_trimmed(tmp_path: Path) -> None:
    path = _write(tmp_path / "o.jsonl", [json.dumps({"query": "q", "outcomes": {"a": 1}, "task": " law "})])
    assert load_outcome_jsonl(path)[0].task == "law"


def test_a_success_model_that_reads_no_tasks_says_so(caplog: pytest.LogCaptureFixture) -> None:
    from tests.doubles.fakes import FakeHashingEncoder

    x, task, outcomes = _task_data(300, seed=3)
    with caplog.at_level("WARNING", logger="router.outcome_gate"):
        gate = train_outcome_gate(_task_records(outcomes, [f"t{t}" for t in task]), FakeHashingEncoder(),
                                  model="logistic", progress=False, embeddings=x)
    assert "only the knn success model reads" in caplog.text
    assert gate.settings()["success_model"] == {"kind": "logistic"}
    caplog.clear()
    lonely = ["t0"] * len(x)
    lonely[:12] = ["t1"] * 12  # a second task, but too rare in some fold's training records
    with caplog.at_level("WARNING", logger="router.outcome_gate"):
        gate = train_outcome_gate(_task_records(outcomes, lonely), FakeHashingEncoder(), progress=False, embeddings=x)
    assert "give no task prior" in caplog.text
    assert gate.settings()["success_model"]["prior"] == "overall"


class _FakeTableEncoder(Encoder):
    """Replays fixed vectors for fixed texts, so the synthetic geometry reaches the gate through its encoder."""

    identity, checksum = "fake-table", "2" * 64

    def __init__(self, rows: dict[str, np.ndarray]) -> None:
        self.rows = rows

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([self.rows[t] for t in texts]).astype(np.float32)


def test_the_route_decision_names_the_query_s_likeliest_tasks() -> None:
    """The task prior carries much of an outcome gate's decision, so the decision shows it: the query's likeliest
    tasks and their probabilities, beside the scores and the nearest examples."""
    from router.orchestrator import Orchestrator
    from tests.doubles.fakes import FakeExpert, fake_config

    x, task, outcomes = _task_data(1500, seed=0)
    texts = [f"q{i}" for i in range(len(x))]
    table = _FakeTableEncoder(dict(zip(texts, x, strict=True)))
    gate = train_outcome_gate(_task_records(outcomes, [f"t{t}" for t in task]), table, progress=False, embeddings=x)
    assert gate.settings()["success_model"]["prior"] == "task"
    assessed = gate.assess(texts[:300])
    assert assessed.tasks is not None and all(len(t) == 3 and sum(t.values()) <= 1.0 + 1e-3 for t in assessed.tasks)
    top = [max(t, key=t.__getitem__) for t in assessed.tasks]
    assert np.mean([t == f"t{task[i]}" for i, t in enumerate(top)]) > 0.8  # these queries were trained on
    config = fake_config(gate.experts)
    orchestrator = Orchestrator(config, gate, {n: FakeExpert(config.expert(n)) for n in gate.experts})
    decision = orchestrator.decide_sync(texts[0])
    assert decision.tasks == assessed.tasks[0]
    without = train_outcome_gate(_task_records(outcomes, [None] * len(x)), table, progress=False, embeddings=x)
    assert without.task_probabilities(x[:5]) is None and without.assess(texts[:5]).tasks is None


def test_an_expert_whose_cost_no_record_gives_trains_without_numpy_warnings() -> None:
    """The warning training gives for it is the router's own (``_warn_thin_data``), not numpy's "Mean of empty
    slice" with a source line; the expert's cost counts as 0."""
    import warnings

    from tests.doubles.fakes import FakeHashingEncoder

    rng = np.random.default_rng(1)
    records = [OutcomeRecord(f"question {i} on topic {i % 5}", {"a": float(rng.random() < 0.6),
                                                                "b": float(rng.random() < 0.5), "c": 1.0},
                             {"a": 0.01, "b": 0.002}) for i in range(120)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        gate = train_outcome_gate(records, FakeHashingEncoder(), experts=["a", "b", "c"], cost_weight=0.5,
                                  progress=False)
    assert gate.experts == ["a", "b", "c"]
    assert gate.metadata.metrics.routed_accuracy is not None and np.isfinite(gate.metadata.metrics.routed_accuracy)


def _cost_records(cost: float) -> list[OutcomeRecord]:
    rng = np.random.default_rng(2)
    return [OutcomeRecord(f"question {i} on topic {i % 5}", {"a": float(rng.random() < 0.7),
                                                            "b": float(rng.random() < 0.5)}, {"a": cost, "b": cost})
            for i in range(60)]


def test_costs_of_any_finite_size_train_as_their_ratios_do(tmp_path: Path) -> None:
    """Costs are in the user's own unit. 1e308 each is a finite number >= 0, as the loader asks, but 60 of them
    summed are infinite: training warned of overflow, wrote ``"ece_before": NaN`` and ``"routed_cost": Infinity``
    to gate.json (no JSON reader takes either) and routed otherwise than with the same costs in another unit. The
    means are now taken without overflow: the gate is the one equal costs of 1 give."""
    import warnings

    from tests.doubles.fakes import FakeHashingEncoder

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        huge = train_outcome_gate(_cost_records(1e308), FakeHashingEncoder(), cost_weight=0.5, progress=False)
        unit = train_outcome_gate(_cost_records(1.0), FakeHashingEncoder(), cost_weight=0.5, progress=False)
        np.testing.assert_array_equal(huge.cost, [1e308, 1e308])
        assert (huge.tuning.anchor, huge.tuning.margin, huge.temperature) == \
            (unit.tuning.anchor, unit.tuning.margin, unit.temperature)
        metrics = huge.metadata.metrics
        assert metrics.routed_cost == 1e308 and metrics.ece_before == unit.metadata.metrics.ece_before
        huge.save(tmp_path / "gate")

        def refuse(constant: str) -> None:
            raise AssertionError(f"gate.json holds {constant}")

        doc = json.loads((tmp_path / "gate" / "gate.json").read_text(encoding="utf-8"), parse_constant=refuse)
        assert doc["metrics"]["routed_cost"] == 1e308
        loaded = Gate.load(tmp_path / "gate", huge.encoder)  # re-tuned on load: the stored costs stay finite
        assert isinstance(loaded, OutcomeGate) and loaded.tuning.metrics["routed_cost"] == 1e308
        texts = [f"a new question {i} on topic {i % 5}" for i in range(20)]
        np.testing.assert_allclose(loaded.scores(texts), unit.scores(texts), atol=1e-6)


def test_a_gate_json_figure_that_is_not_finite_is_refused_not_written(tmp_path: Path) -> None:
    from tests.doubles.fakes import FakeHashingEncoder

    gate = train_outcome_gate(_cost_records(1.0), FakeHashingEncoder(), progress=False)
    metrics = dataclasses_replace(gate.metadata.metrics, ece_before=float("nan"), routed_cost=float("inf"))
    gate.metadata = dataclasses_replace(gate.metadata, metrics=metrics)
    with pytest.raises(ValueError, match=r"^gate\.json: not a finite number, so not JSON: metrics\.ece_before, "
                                         r"metrics\.routed_cost; the gate was not saved$"):
        gate.save(tmp_path / "gate")
    assert not (tmp_path / "gate" / "gate.json").exists()


def test_a_cost_for_an_expert_that_no_record_scores_is_left_out(caplog: pytest.LogCaptureFixture) -> None:
    """Such an expert has no column to weigh the cost against (it is routed from its config examples, if any):
    training leaves the cost out and says so, rather than calling the expert unknown."""
    from tests.doubles.fakes import FakeHashingEncoder

    records = [dataclasses_replace(r, cost={**r.cost, "unrated": 5.0}) for r in _cost_records(1.0)]
    with caplog.at_level("WARNING", logger="router.outcome_gate"):
        gate = train_outcome_gate(records, FakeHashingEncoder(), cost_weight=0.5, progress=False)
    assert gate.experts == ["a", "b"] and list(gate.cost) == [1.0, 1.0]
    assert "a cost but no score ('outcomes') for unrated; the cost is left out" in caplog.text
    with pytest.raises(ValueError, match="outcome records score experts that are not experts of the gate: b"):
        train_outcome_gate(records, FakeHashingEncoder(), experts=["a", "c"], progress=False)


def test_with_a_cost_weight_the_top_probability_is_still_the_chance_the_pick_answers_right() -> None:
    """A dear expert right 90% of the time, two cheap ones about half the time. At cost_weight 0.2 the gate keeps
    the dear one (the margin anchors it); its top probability must still say how often that pick is right, not
    flatten towards uniform because a cheaper expert that was also right was "better in hindsight" (the fit
    used to pin the temperature at its bound, 10, and every adaptive or mass panel took all three)."""
    from router.outcome_gate import _softmax, _with_margin

    rng = np.random.default_rng(0)
    n, rate = 2000, np.array([0.9, 0.55, 0.5])
    outcomes = (rng.random((n, 3)) < rate).astype(float)
    success = np.clip(rate + rng.normal(0, 0.05, (n, 3)), 0, 1)
    cost = np.array([1.0, 0.1, 0.1])
    for cost_weight in (0.0, 0.2):
        t = tune(success, outcomes, np.tile(cost, (n, 1)), cost, cost_weight)
        p = _softmax(_with_margin(success - cost_weight * cost, t.anchor, t.margin) / t.temperature)
        right = outcomes[np.arange(n), p.argmax(axis=1)].mean()
        assert t.anchor == 0 and t.temperature < 1.0
        assert abs(p.max(axis=1).mean() - right) < 0.05  # 0.919 against 0.899 right


def _event_ece(top: np.ndarray, event: np.ndarray, bins: int = 15) -> float:
    """ECE of ``top`` (each query's top weight) against ``event`` (whether its pick was no worse than the rest)."""
    which = np.clip(np.ceil(top * bins).astype(int) - 1, 0, bins - 1)
    return float(sum(abs(event[which == b].mean() - top[which == b].mean()) * (which == b).mean()
                     for b in range(bins) if (which == b).any()))


def test_on_held_out_queries_the_top_weight_is_the_chance_no_other_expert_does_better(
        outcome_gate: OutcomeGate, routerbench: dict[str, list[RouterBenchRow]], models: tuple[str, ...],
        test_x: np.ndarray) -> None:
    """The temperature was fitted to the whole softmax against one best expert per query: with a cost weight, where
    a cheap expert and the dear pick were both right, that flattened the top weight (the demo's gate on RouterBench's
    full test split: ECE 0.37 at 2, 0.19 now). It is fitted to the top weight against the event panels size on."""
    outcomes = np.array([[float(r.answers[m].correct or 0.0) for m in outcome_gate.experts]
                         for r in routerbench["test"]])
    found = {}
    for cost_weight in (0.0, 0.2, 2.0):
        gate = outcome_gate if cost_weight == 0 else outcome_gate.with_cost_weight(cost_weight)
        p = gate.predict_proba(test_x)
        event = outcomes[np.arange(len(p)), p.argmax(axis=1)] >= outcomes.max(axis=1)
        found[cost_weight] = _event_ece(p.max(axis=1), event)
    # 0.13 at 2 (0.33 with the softmax fit). At 0, with 900 training records of 32 tokens, no one temperature reaches
    # the event: near-equal experts split the weight while either would do (0.25, and 0.26 with the softmax fit;
    # 0.002 trained on the whole train split at full length).
    assert found[2.0] < 0.2 and found[0.2] < 0.15 and found[0.0] < 0.26, found


def test_an_expert_scored_on_part_of_the_queries_is_not_the_anchor() -> None:
    """The anchor answers every query the margin does not hand on, and is counted wrong where it has no record:
    an expert measured on one task at 0.9 is not the fallback over one measured everywhere at 0.8."""
    n = 400
    everywhere = np.array([1.0 if i % 10 < 8 else 0.0 for i in range(n)])  # 0.8 on every query
    one_task = np.where(np.arange(n) < 100, np.array([1.0 if i % 10 < 9 else 0.0 for i in range(n)]), np.nan)
    outcomes = np.stack([everywhere, one_task], axis=1)
    success = np.stack([np.full(n, 0.8), np.full(n, 0.85)], axis=1)
    t = tune(success, outcomes, np.full((n, 2), np.nan), np.zeros(2), 0.0)
    assert t.anchor == 0
    assert t.metrics["routed_accuracy"] >= 0.8 - 1e-9


def test_the_temperature_bound_grows_with_the_cost_weight() -> None:
    """At a large cost weight the utilities span more than 1: a fixed bound held the temperature there, and the
    weights went to 1 whatever the chance of success (ECE 0.38 at 50 on RouterBench)."""
    rng = np.random.default_rng(3)
    n = 600
    outcomes = (rng.random((n, 3)) < np.array([0.8, 0.6, 0.4])).astype(float)
    success = np.clip(outcomes * 0.3 + rng.random((n, 3)) * 0.5 + 0.1, 0, 1)
    cost = np.array([1.0, 0.3, 0.05])
    t = tune(success, outcomes, np.tile(cost, (n, 1)), cost, 50.0)
    assert t.temperature > 10.0
    assert t.metrics["ece_after"] < t.metrics["ece_before"]


def test_the_abstain_threshold_keeps_its_share_whatever_one_folds_mix() -> None:
    """Fitted on fold 0 alone (a fifth of the records, its task mix its own), the threshold had a gate abstain on
    13% of held-out RouterBench queries where 3% was meant. Every fold's queries against the rest's are pooled."""
    from router.gate import OOD_KEEP, nearest_similarity
    from router.outcome_gate import FOLDS, _ood_threshold

    rng = np.random.default_rng(7)
    centre = rng.normal(size=16)
    tight = centre + 0.15 * rng.normal(size=(400, 16))  # one task's queries, alike
    loose = rng.normal(size=(200, 16))  # another's, each unlike the rest
    x = np.vstack([tight, loose]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    # Fold 0 holds tight queries alone; the loose ones are spread over the other folds.
    folds = np.concatenate([np.arange(400) % FOLDS, 1 + np.arange(200) % (FOLDS - 1)])
    pooled = np.concatenate([nearest_similarity(x[folds != f], x[folds == f]) for f in range(FOLDS)])
    threshold = _ood_threshold(x, folds)
    assert threshold is not None
    assert abs(float(np.mean(pooled < threshold)) - (1 - OOD_KEEP)) < 0.01
    one_fold = np.quantile(nearest_similarity(x[folds != 0], x[folds == 0]), 1 - OOD_KEEP)
    assert np.mean(pooled < one_fold) > 0.2  # what fold 0 alone gave


def test_a_few_records_still_fit_the_abstain_threshold() -> None:
    """With a dozen records the hash may leave fold 0 empty: another fold stands in, so a configured
    default_expert still applies (it was silently never used)."""
    from router.outcome_gate import FOLDS, _ood_threshold

    x = np.random.default_rng(0).normal(size=(12, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    folds = np.array([1, 2, 3, 4] * 3) % FOLDS  # no record in fold 0
    assert _ood_threshold(x, folds) is not None
    assert _ood_threshold(x, np.zeros(12, dtype=int)) is None  # one fold holds every record: nothing to hold out


def test_the_served_gate_prices_an_expert_no_record_costs_at_its_config_price() -> None:
    """c is always right, and no record gives its cost: served with the config's price for it (``for_config``
    passes ``config_prices``), it costs that, not nothing, which at any cost weight would route to it as if free."""
    from tests.doubles.fakes import FakeHashingEncoder

    rng = np.random.default_rng(1)
    records = [OutcomeRecord(f"question {i} on topic {i % 5}", {"a": float(rng.random() < 0.6),
                                                                "b": float(rng.random() < 0.5), "c": 1.0},
                             {"a": 0.01, "b": 0.002}) for i in range(120)]
    gate = train_outcome_gate(records, FakeHashingEncoder(), experts=["a", "b", "c"], cost_weight=0.5, progress=False)
    priced = gate.with_cost_weight(0.5, {"a": 0.0, "b": 0.0, "c": 0.05})
    assert priced.cost[priced.artifact_experts.index("c")] == 0.05
    x = gate.encoder.encode(["question 3 on topic 3"])
    assert priced.predict_utility(x)[0, 2] < gate.predict_utility(x)[0, 2]
