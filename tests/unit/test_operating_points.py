"""Operating points chosen on tuning data and scored once on test (``eval.routing.chosen_match``,
``chosen_within``), and the README row's honesty about targets met only within noise."""

from __future__ import annotations

from typing import Any

import numpy as np

from eval.combine_suite import identical_groups
from eval.readme_results import render_block
from eval.routing import chosen_match, chosen_within

TUNE = [{"lambda": 0.0, "accuracy": 0.95, "cost": 10.0}, {"lambda": 1.0, "accuracy": 0.90, "cost": 2.9},
        {"lambda": 2.0, "accuracy": 0.80, "cost": 1.0}]
# On test, λ = 2 would look best within the budget; the tuning split chose λ = 1.
TEST = {0.0: {"accuracy": 0.94, "cost": 10.0}, 1.0: {"accuracy": 0.91, "cost": 5.0},
        2.0: {"accuracy": 0.93, "cost": 2.0}}
REF_TUNE, REF_TEST = {"accuracy": 0.95, "cost": 10.0}, {"accuracy": 0.94, "cost": 10.0}


def _at(lam: float) -> dict[str, float]:
    return {"lambda": lam, **TEST[lam]}


def test_budget_point_is_chosen_on_tuning_and_reported_on_test() -> None:
    got = chosen_within(TUNE, REF_TUNE, _at, REF_TEST, 0.30)
    assert got["chosen_on"] == "tuning" and got["lambda"] == 1.0
    assert got["accuracy"] == 0.91 and got["cost_share"] == 0.5 and got["within_budget_on_test"] is False
    assert got["tuning"] == {"accuracy": 0.90, "cost_share": 0.29}


def test_reference_match_is_chosen_on_tuning() -> None:
    got = chosen_match(TUNE, REF_TUNE, _at, REF_TEST, "gpt-4")
    assert got["lambda"] == 0.0 and got["cost_share"] == 1.0 and got["reaches_reference_on_test"] is True
    none = chosen_match(TUNE, {"accuracy": 0.99, "cost": 10.0}, _at, REF_TEST, "gpt-4")
    assert none["lambda"] is None and none["cost_share"] is None and none["reaches_reference_on_test"] is None


def test_identical_groups() -> None:
    a = np.array([1.0, 0.0, 1.0])
    assert identical_groups({"top1": a, "vote": a.copy(), "consensus": a.copy(), "x": 1 - a}) == [
        ["top1", "vote", "consensus"]]


STAMP = {"date": "2031-02-03", "machine": "m", "test": 2374,
         "cost_unit": "output length (thousand characters per query)"}


def _row(results: dict[str, Any]) -> list[str]:
    line = next(line for line in render_block([results]).splitlines() if line.startswith(f"| `{results['suite']}`"))
    return [c.strip() for c in line.strip("|").split(" | ")]


def test_served_gate_within_noise_is_not_shown_as_met() -> None:
    r = {"suite": "mmlu-pro-outcome", "command": "c", "setup": STAMP,
         "metrics": {"routed_accuracy": 0.732, "routed_cost": 1.0575, "aiq": 0.726, "aiq_from_zero": 0.662,
                     "served_routed_accuracy": 0.7317, "best_single_accuracy": 0.7313},
         "confidence_intervals": {"served_minus_best_single": {"estimate": 0.0004, "low": -0.011, "high": 0.012}},
         "systems": {"best single (gpt-4o)": {"accuracy": 0.7313, "cost": 1.53}}}
    cells = _row(r)
    assert "✅" not in cells[4] and "within noise" in cells[4] and "[-0.0110, +0.0120]" in cells[4]
    assert "k output chars/query" in cells[1] and "0.662 as RouterBench's code normalises" in cells[1]
    assert cells[2].startswith("best single on training (gpt-4o) acc 0.731 at cost 1.5300 k output chars/query")


def test_label_target_whose_interval_straddles_the_bar_says_so() -> None:
    r = {"suite": "clinc150-domain", "command": "c", "setup": {**STAMP, "test": 4500},
         "metrics": {"accuracy": 0.9804, "oos_auroc": 0.973},
         "confidence_intervals": {"accuracy": {"estimate": 0.9804, "low": 0.976, "high": 0.984}}, "systems": {}}
    target = _row(r)[4]
    assert target.startswith("acc@1 ≥ 0.98 ✅ by 2 of 4500 test queries, not shown: its 95% interval")


def test_combine_row_names_identical_strategies_once() -> None:
    r = {"suite": "routerbench-combine", "command": "c", "setup": {
        **STAMP, "identical_strategies": [["best_single", "top1", "vote", "consensus"]], "panel_k": {"vote": 1}},
         "metrics": {"best_single_accuracy": 0.874, "top1_accuracy": 0.874, "vote_accuracy": 0.874,
                     "consensus_accuracy": 0.874, "fixed_top3_vote_accuracy": 0.845}}
    ours = _row(r)[1]
    assert ours.startswith("top1 = vote = consensus 0.874 (same answers), fixed_top3_vote 0.845")
    assert "chosen panel sizes: vote top-1" in ours
