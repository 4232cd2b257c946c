"""``mmlu-pro-combine``: the panel vote on hand-built letters, pools, and a small real run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from eval.combine_suite import ANSWER_BIAS_GRID, SMALL_OPEN, panel_letters, pool_models, weights_of
from eval.harness import run_suite
from router.cli import _parser
from tests.doubles.fakes import FakeHashingEncoder
from tests.support import PNG_SIGNATURE


def _onehot(letters: list[list[str]]) -> np.ndarray:
    out = np.zeros((len(letters), len(letters[0]), 10), dtype=np.float32)
    for i, row in enumerate(letters):
        for j, letter in enumerate(row):
            if letter:
                out[i, j, "ABCDEFGHIJ".index(letter)] = 1.0
    return out


def test_panel_vote_abstains_missing_records_and_breaks_ties_by_rank() -> None:
    onehot = _onehot([["A", "B", "B"], ["", "C", ""], ["A", "B", "C"], ["", "", ""]])
    panels = np.tile([0, 1, 2], (4, 1))
    success = np.tile([0.9, 0.5, 0.4], (4, 1))
    letters = panel_letters(onehot, panels, weights_of(success, "uniform"))
    assert letters.tolist() == [1, 2, 0, -1]  # majority; the only voter; tie to the top; nobody voted
    heavy = panel_letters(onehot, panels, weights_of(np.tile([0.99, 0.5, 0.4], (4, 1)), "logodds"))
    assert heavy[0] == 0  # a near-certain expert outweighs two coin-flippers


def _served_letters(rows: list[list[str]], weights: np.ndarray) -> list[str]:
    from router.combine import Vote, WeightedAnswer

    return [Vote("choice").combine([WeightedAnswer(f"e{j}", float(w), letter) for j, (w, letter)
                                    in enumerate(zip(weights[i], row, strict=True)) if letter]).content
            for i, row in enumerate(rows)]


def test_exact_ties_break_as_the_served_vote_breaks_them() -> None:
    # Equal tallies: A has one member of 0.5, C two of 0.25 (the heavier single voter wins).
    rows = [["A", "C", "C"], ["C", "A", "A"]]
    onehot = _onehot(rows)
    panels = np.tile([0, 1, 2], (2, 1))
    weights = np.array([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]])
    assert panel_letters(onehot, panels, weights).tolist() == [0, 2]
    assert _served_letters(rows, weights) == ["A", "C"]


def test_full_ties_break_as_the_served_vote_breaks_them() -> None:
    # B and D one member of 0.5 each, equal in every way: the served vote takes the panel's first (its top-ranked).
    rows = [["B", "D", ""], ["D", "B", ""]]
    weights = np.array([[0.5, 0.5, 0.2], [0.5, 0.5, 0.2]])
    assert _served_letters(rows, weights) == ["B", "D"]
    assert panel_letters(_onehot(rows), np.tile([0, 1, 2], (2, 1)), weights).tolist() == [1, 3]


def test_pools() -> None:
    models = ["gpt-4o", *SMALL_OPEN]
    assert pool_models("all", models) == models and pool_models(None, models) == models
    assert pool_models("small", models) == list(SMALL_OPEN)
    assert pool_models("gpt-4o, Yi-6B", models) == ["gpt-4o", "Yi-6B"]
    with pytest.raises(ValueError, match="unknown: nope"):
        pool_models("gpt-4o,nope", models)


def test_cli_takes_a_pool() -> None:
    args = _parser().parse_args(["eval", "--suite", "mmlu-pro-combine", "--pool", "small", "--out", "x"])
    assert args.pool == "small"


@pytest.mark.parametrize("pool", ["all", "small"])
def test_small_real_run(pool: str, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / pool
    results = run_suite("mmlu-pro-combine", data_dir, out, encoder=FakeHashingEncoder(), limit=80, progress=False,
                        plots=False, cache_dir=tmp_path / "cache", pool=pool)
    m = results["metrics"]
    assert set(m) >= {"best_single_accuracy", "top1_accuracy", "vote_accuracy", "consensus_accuracy",
                      "learned_vote_accuracy", "learned_length_vote_accuracy", "fixed_top3_vote_accuracy",
                      "oracle_accuracy", "k", "learned_k", "learned_length_k", "length_coef", "pool",
                      "chosen_strategy"}
    assert m["chosen_strategy"] in ("vote", "learned_vote", "learned_length_vote")
    assert m["chosen_minus_best_single"] == m[f"{m['chosen_strategy']}_minus_best_single"]
    assert m["target_met"] == (m["chosen_minus_best_single"] >= m["target_points"])
    weights = results["setup"]["learned_vote_weights"]
    assert weights and set(weights) <= set(results["experts"]) and all(w > 0 for w in weights.values())
    assert m["pool"] == pool and results["setup"]["experts"] == (31 if pool == "all" else len(SMALL_OPEN))
    worst = min(e["accuracy"] for e in results["experts"].values())
    # The best single's test accuracy in the experts table is the one best_single_accuracy scores (its letters).
    best = max(results["experts"], key=lambda name: results["experts"][name]["fit_accuracy"])
    assert results["experts"][best]["accuracy"] == m["best_single_accuracy"]
    assert any(note.startswith("the experts table's test accuracy is of the recorded letters too")
               for note in results["notes"])
    for key in ("best_single", "top1", "vote", "consensus", "learned_vote", "learned_length_vote", "fixed_top3_vote",
                "stacked_reference"):
        assert 0.0 <= m[f"{key}_accuracy"] <= m["oracle_accuracy"] <= 1.0
    # The stacked classifier over every model's answer is a reference: reported, never the headline.
    assert m["stacked_reference_minus_best_single"] == m["stacked_reference_accuracy"] - m["best_single_accuracy"]
    assert any(name.startswith("reference: stacked classifier over all") for name in results["systems"])
    assert any(note.startswith("stacked_reference") for note in results["notes"])
    assert m["vote_accuracy"] >= worst and m["consensus_accuracy"] == m["vote_accuracy"]
    # -2 letters (the served combiner disagreeing with the scored vote) would score 0 here.
    assert m["learned_vote_accuracy"] >= worst and m["learned_length_vote_accuracy"] >= worst
    assert any("vote 1.0000, consensus 1.0000" in note and "(agreement 1.0000 and 1.0000)" in note
               for note in results["notes"])
    # Every setting was chosen by 5-fold cross-validation over train + val (80 + 80 questions here).
    assert results["setup"]["folds"] == 5 and results["setup"]["chosen"]["vote"]["cv_accuracy"] > 0
    # The 'task' prior is the served gate's TaskPrior, its classifier scored on the test questions' categories.
    assert {g["prior"] for g in results["cv_grids"]["vote"]} == {"overall", "task"}
    assert {g["prior"] for g in results["cv_grids"]["top1"]} == {"overall", "task"}
    assert 0.0 <= results["setup"]["predicted_category_accuracy"] <= 1.0
    learned_grid = results["cv_grids"]["learned"]
    assert {g["length_term"] for g in learned_grid} == {False, True} and all(
        0 <= g["cv_accuracy"] <= 1 for g in learned_grid)
    # The answer bias's penalty (or none) is chosen by the same cross-validation, on top of each learned vote.
    bias_grid = results["cv_grids"]["answer_bias"]
    assert {g["answer_bias_l2"] for g in bias_grid} == set(ANSWER_BIAS_GRID)
    assert {g["strategy"] for g in bias_grid} == {"learned_vote", "learned_length_vote"}
    for name, key in (("learned_vote", "learned_answer_bias_l2"), ("learned_length_vote",
                                                                     "learned_length_answer_bias_l2")):
        chosen = results["setup"]["chosen"][name]
        best = max(g["cv_accuracy"] for g in bias_grid if g["strategy"] == name)
        assert m[key] == chosen["answer_bias_l2"] in ANSWER_BIAS_GRID and chosen["cv_accuracy"] == best
    assert results["setup"]["test"] == 80 and "fuse" in (out / "report.md").read_text(encoding="utf-8")
    ci = results["confidence_intervals"]["vote_accuracy"]
    assert ci["low"] <= m["vote_accuracy"] <= ci["high"]
    assert json.loads((out / "results.json").read_text(encoding="utf-8"))["metrics"]["k"] == m["k"]
    assert not list(out.glob("*.png")) and "figures" not in results  # plots=False, as --no-plots gives


def test_accuracy_figure(data_dir: Path, tmp_path: Path) -> None:
    import matplotlib.image

    out = tmp_path / "plots"
    results = run_suite("mmlu-pro-combine", data_dir, out, encoder=FakeHashingEncoder(), limit=80, progress=False,
                        cache_dir=tmp_path / "cache", pool="small")
    assert results["figures"] == ["accuracy.png"]
    data = (out / "accuracy.png").read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 10_000
    height, width, _ = matplotlib.image.imread(out / "accuracy.png").shape
    assert width > 600 and height > 400
    assert "![accuracy.png](accuracy.png)" in (out / "report.md").read_text(encoding="utf-8")
