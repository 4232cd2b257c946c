"""The README results block: rendered from results.json files only, rewritten between its markers and nowhere else."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from eval.readme_results import END, START, load_results, render_block, rewrite_readme

STAMP = {"date": "2031-02-03", "machine": "Linux x86_64, Test CPU, 2 cores"}

LABEL = {
    "suite": "clinc150-domain",
    "command": "moe eval --suite clinc150-domain --out out/results/clinc150-domain --encoder onnx --seed 0",
    "metrics": {"accuracy": 0.9876, "top2_recall": 0.9961, "macro_f1": 0.9871, "ece": 0.0123, "oos_auroc": 0.9654,
                "peer_semantic_router_accuracy": 0.9012, "peer_semantic_router_oos_auroc": 0.8766,
                "cascade_accuracy": 0.9871, "cascade_fast_share": 0.9213, "cascade_agreement": 0.9968},
    "confidence_intervals": {"accuracy": {"estimate": 0.9876, "low": 0.9811, "high": 0.9922}},
    "systems": {"gate": {"accuracy": 0.9876}, "random": {"accuracy": 0.1001}, "knn": {"accuracy": 0.9702},
                "logistic": {"accuracy": 0.9555}, "cascade": {"accuracy": 0.9871},
                "gate classifier: knn": {"accuracy": 0.9800}},  # ours: never the baseline column
    "setup": STAMP,
}
OUTCOME = {
    "suite": "routerbench",
    "command": "moe eval --suite routerbench --out out/results/routerbench --encoder onnx --seed 0",
    "metrics": {"routed_accuracy": 0.8811, "best_single_accuracy": 0.8741, "oracle_accuracy": 0.9738,
                "routed_cost": 0.0042, "aiq": 0.8427, "arc_gpt4_cost_share": None},
    "systems": {"gate (kNN success)": {"accuracy": 0.8811, "cost": 0.0042},
                "best single (gpt-4)": {"accuracy": 0.8741, "cost": 0.005},
                "oracle (cheapest correct)": {"accuracy": 0.9738, "cost": 0.0003}},
    "setup": STAMP,
}
STRONG_WEAK = {
    "suite": "routellm-mmlu", "command": "moe eval --suite routellm-mmlu --out x",
    "metrics": {"apgr": 0.6639, "cpt50": 30.59, "cpt80": 58.3, "random_apgr": 0.4868, "weak_accuracy": 0.6844,
                "best_single_accuracy": 0.8093, "oracle_accuracy": 0.8652},
    "setup": STAMP,
}
COMBINE = {
    "suite": "mmlu-pro-combine", "command": "moe eval --suite mmlu-pro-combine --out y",
    "metrics": {"best_single_accuracy": 0.7260, "top1_accuracy": 0.7317, "vote_accuracy": 0.7701,
                "stacked_reference_accuracy": 0.7712, "oracle_accuracy": 0.9620},
    "setup": STAMP,
}
README = "# Project\n\nIntro.\n\n## Results\n\n" + START + "\nold table 0.123\n" + END + "\n\n## Tests\n\nMore.\n"


def _write(root: Path, results: dict[str, Any]) -> None:
    folder = root / results["suite"]
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results), encoding="utf-8")


@pytest.fixture
def block(tmp_path: Path) -> str:
    for r in (LABEL, OUTCOME, STRONG_WEAK, COMBINE):
        _write(tmp_path, r)
    loaded = load_results(tmp_path, ["clinc150-domain", "routerbench", "routellm-mmlu", "mmlu-pro-combine", "absent"])
    assert [r["suite"] for r in loaded] == ["clinc150-domain", "routerbench", "routellm-mmlu", "mmlu-pro-combine"]
    return render_block(loaded)


def _row(block: str, suite: str) -> list[str]:
    line = next(line for line in block.splitlines() if line.startswith(f"| `{suite}`"))
    return [c.strip() for c in line.strip("|").split(" | ")]


def test_one_table_with_a_row_per_suite(block: str) -> None:
    table = [line for line in block.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 4  # header, rule, four suites
    assert table[0].split(" | ")[0] == "| suite"
    assert all(line.count(" | ") == table[0].count(" | ") for line in table[2:])


def test_label_row_numbers_come_from_results_json(block: str) -> None:
    _suite, ours, base, peer, target, command, date, machine = _row(block, "clinc150-domain")
    assert "acc@1 **0.988** [0.981, 0.992]" in ours and "OOS AUROC 0.965" in ours and "ECE 0.012" in ours
    assert "two-stage acc@1 0.987, static stage decides 92%" in ours
    assert base == "knn acc@1 0.970"  # the best baseline, not the gate (nor the two-stage gate)
    assert peer == "acc@1 0.901, OOS AUROC 0.877"
    assert target == "acc@1 ≥ 0.98 ✅; OOS AUROC ≥ 0.97 ❌; beat semantic-router ✅"
    assert command == f"`{LABEL['command']}`"
    assert (date, machine) == (STAMP["date"], STAMP["machine"])


def test_outcome_strong_weak_and_combine_rows(block: str) -> None:
    ours, base, _peer, target = _row(block, "routerbench")[1:5]
    assert "routed acc **0.881**" in ours and "AIQ 0.843" in ours and "n/a of its cost" in ours
    assert base.startswith("best single on training (gpt-4) acc 0.874") and "oracle 0.974" in base
    assert target.endswith("❌")  # never reached GPT-4's ARC accuracy (null in results.json)
    ours, base = _row(block, "routellm-mmlu")[1:3]
    assert "APGR **0.664**" in ours and "CPT(50%) 30.6%" in ours and "random APGR 0.487" in base
    ours, base, _peer, target = _row(block, "mmlu-pro-combine")[1:5]
    # The stacked reference calls every model: a reference next to the baseline, never a strategy.
    assert ours == "vote 0.770, top1 0.732" and base == (
        "best single on training acc 0.726; stacked classifier over every model's answer (reference) 0.771; "
        "oracle 0.962")
    assert target.endswith("❌")  # the oracle is no strategy


def test_arc_points_chosen_on_tuning_and_the_fixed_pair_reference(tmp_path: Path) -> None:
    arc = {"arc_operating_points_chosen_on": "tuning", "arc_gpt4_accuracy": 0.9573, "arc_gpt4_cost_share": 1.0,
           "arc_gpt4_match_accuracy": 0.9573, "arc_escalate_gpt4_cost_share": None,
           "arc_escalate_gpt4_match_accuracy": None, "arc_accuracy_within_30pct": 0.9161,
           "arc_cost_share_within_30pct": 0.08, "arc_escalate_accuracy_within_30pct": None,
           "arc_escalate_cost_share_within_30pct": None, "arc_pair_escalate_accuracy_within_30pct": 0.9601,
           "arc_pair_escalate_cost_share_within_30pct": 0.271, "arc_pair_escalate_best_on_test_accuracy": 0.9371}
    _write(tmp_path, {**OUTCOME, "metrics": {**OUTCOME["metrics"], **arc}})
    ours, _base, _peer, target = _row(render_block(load_results(tmp_path, ["routerbench"])), "routerbench")[1:5]
    assert "the best λ within 30% of GPT-4's cost on tuning 0.916 at 0.08 of its cost" in ours
    assert "with `escalate` none (no λ qualified on tuning)" in ours
    # The fixed pair is a reference, shown but never judged: here it beats GPT-4 within 30%, the gate does not.
    assert ("a fixed pair escalating to GPT-4 when they disagree (no gate), the best within 30% on tuning 0.960 at "
            "0.27 of its cost, the best within 30% on test, with hindsight, 0.937") in ours
    assert target.endswith("❌")


def test_combine_target_is_judged_on_the_strategy_chosen_on_validation() -> None:
    from eval.readme_results import TARGETS

    judge = TARGETS["mmlu-pro-combine"][0].check
    chosen = {**COMBINE["metrics"], "learned_vote_accuracy": 0.7801, "chosen_strategy": "vote",
              "chosen_minus_best_single": 0.7701 - 0.7260}
    assert judge(chosen) is False  # learned_vote would pass on test, but validation chose vote
    assert judge({**chosen, "chosen_strategy": "learned_vote", "chosen_minus_best_single": 0.7801 - 0.7260})
    assert judge({**COMBINE["metrics"], "learned_vote_accuracy": 0.7801}) is True  # older results: best on test


def test_rewrite_replaces_only_the_marked_block(block: str) -> None:
    text = rewrite_readme(README, block)
    assert "old table" not in text and block in text
    assert text.startswith("# Project\n\nIntro.\n\n## Results\n\n" + START + "\n")
    assert text.endswith(END + "\n\n## Tests\n\nMore.\n")
    assert rewrite_readme(text, block) == text  # idempotent


def test_rewrite_appends_a_section_without_markers_and_refuses_half_a_pair(block: str) -> None:
    text = rewrite_readme("# Project\n", block)
    assert text == f"# Project\n\n## Results\n\n{START}\n{block}{END}\n"
    with pytest.raises(ValueError, match="exactly one"):
        rewrite_readme(f"# P\n{START}\nno end\n", block)
    with pytest.raises(ValueError, match="exactly one"):
        rewrite_readme(f"# P\n{END}\n{START}\n", block)


def test_outcome_target_is_judged_on_the_served_gate(tmp_path: Path) -> None:
    """The evaluation's tuned router tying the best single LLM does not meet the target when the gate `moe train`
    builds scores below it; the served figure is shown, and the served system is not taken as the baseline."""
    served = "served gate (router.outcome_gate, as moe train builds it)"
    metrics = {**OUTCOME["metrics"], "routed_accuracy": 0.7317, "best_single_accuracy": 0.7313}
    for share, mark in ((0.7258, "❌"), (0.7313, "✅")):
        root = tmp_path / mark
        _write(root, {**OUTCOME, "suite": "mmlu-pro-outcome", "command": "moe eval --suite mmlu-pro-outcome",
                      "metrics": {**metrics, "served_routed_accuracy": share},
                      "systems": {**OUTCOME["systems"], served: {"accuracy": 0.99, "cost": 0.001}}})
        cells = _row(render_block(load_results(root, ["mmlu-pro-outcome"])), "mmlu-pro-outcome")
        assert f"served gate (`moe train`) acc **{share:.3f}**" in cells[1]
        assert "best single on training (gpt-4) acc 0.874" in cells[2]  # the served system is ours, not a baseline
        assert cells[4] == f"served gate's top-1 ≥ best single on training {mark}"
