"""The ``escalate`` combiner scored on recordings (``eval.routing.escalate_curve``), the budget pick
(``best_within``), and the outcome suites' neighbour search being the serving gate's single-threaded index."""

from __future__ import annotations

import numpy as np
import pytest

from eval.outcome import NeighbourOutcomes
from eval.routing import best_within, escalate_curve, fixed_pairs, pair_reference

# Experts 0 and 1 are cheap, 2 is the strong one escalated to. Three queries:
# q0: the cheap two agree on B (right); q1: they split (A vs C), the strong one says C (right);
# q2: they agree on D (wrong).
TEXTS = [["B", "(B)", "B"], ["A", "The answer is C", "C"], ["D", "D", "A"]]
GRADES = np.array([[1.0, 1.0, 1.0], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0]])
C = np.array([[1.0, 2.0, 10.0]] * 3)
CHEAP_FIRST = np.array([[0.9, 0.8, 0.1]] * 3)  # success: the cheap two rank first at any lambda
NO_COST = np.zeros((3, 3))


def test_agreeing_cheap_panels_stand_and_split_ones_pay_for_the_strong_expert() -> None:
    [point] = escalate_curve(CHEAP_FIRST, NO_COST, TEXTS, GRADES, C, escalate_to=2, lambdas=[0.0])
    # q0 and q2 stand (q2 wrongly: both cheap experts agree on the wrong letter), q1 escalates.
    assert point["accuracy"] == pytest.approx(2 / 3)
    assert point["cost"] == pytest.approx((3 + 13 + 3) / 3)


def test_the_strong_expert_on_the_panel_is_not_paid_twice() -> None:
    strong_first = np.array([[0.2, 0.8, 0.9]] * 3)  # panel: experts 2 and 1
    [point] = escalate_curve(strong_first, NO_COST, TEXTS, GRADES, C, escalate_to=2, lambdas=[0.0])
    # q0: 2 and 1 agree on B; q1: both say C; q2: A against D -> expert 2's A, already paid for, right.
    assert point["accuracy"] == pytest.approx(1.0)
    assert point["cost"] == pytest.approx(12.0)  # the panel's price, never an extra call


def test_a_member_without_a_record_cannot_agree_so_the_query_escalates() -> None:
    o = GRADES.copy()
    o[0, 1] = np.nan
    [point] = escalate_curve(CHEAP_FIRST, NO_COST, TEXTS, o, C, escalate_to=2, lambdas=[0.0])
    assert point["cost"] == pytest.approx((13 + 13 + 3) / 3)


def test_lambda_moves_the_panel_by_predicted_cost() -> None:
    success = np.array([[0.9, 0.5, 0.95]] * 3)
    predicted = np.array([[1.0, 1.0, 100.0]] * 3)
    quality, frugal = escalate_curve(success, predicted, TEXTS, GRADES, C, escalate_to=2, lambdas=[0.0, 1.0])
    assert quality["cost"] == pytest.approx(11.0)  # panel 2 and 0: the strong expert always answers
    assert frugal["cost"] < quality["cost"]  # panel 0 and 1, escalating only q1


def test_fixed_pairs_score_every_pair_of_cheaper_models_escalating_on_disagreement() -> None:
    # Four models: 0-2 answer, 3 is escalated to. q0: 0 and 1 agree on B (right), 2 says A; q1: 0 says A (wrong),
    # 1 and 2 say C (right); the escalation target is always right and costs 10.
    texts = [["B", "(B)", "A", "B"], ["A", "C", "The answer is C", "C"]]
    grades = np.array([[1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
    costs = np.array([[1.0, 2.0, 3.0, 10.0]] * 2)
    points = {p["pair"]: p for p in fixed_pairs(grades, costs, texts, escalate_to=3)}
    assert set(points) == {(0, 1), (0, 2), (1, 2)}  # never a pair with the escalation target
    assert points[(0, 1)]["accuracy"] == 1.0 and points[(0, 1)]["cost"] == pytest.approx((3 + 13) / 2)
    assert points[(1, 2)]["accuracy"] == 1.0 and points[(1, 2)]["cost"] == pytest.approx((15 + 5) / 2)
    assert points[(0, 2)]["cost"] == pytest.approx(14.0)  # they split on both: escalated twice

    reference = {"accuracy": 1.0, "cost": 10.0}
    chosen = pair_reference(list(points.values()), reference, list(points.values()), reference,
                            ["a", "b", "c", "gpt"], share=0.9)
    # Within 9 per query: (0, 1) at 8; (1, 2) at 10 and (0, 2) at 14 are over the budget.
    assert chosen["within_budget"]["pair"] == ["a", "b"] and chosen["within_budget"]["cost_share"] == 0.8
    assert chosen["within_budget"]["within_budget_on_test"] is True
    assert chosen["best_on_test"]["pair"] == ["a", "b"] and chosen["pairs"] == 3
    none = pair_reference(list(points.values()), reference, list(points.values()), reference,
                          ["a", "b", "c", "gpt"], share=0.5)
    assert none["within_budget"]["accuracy"] is None and none["best_on_test"]["pair"] is None


def test_best_within_takes_the_most_accurate_point_under_the_budget() -> None:
    curve = [{"accuracy": 0.9, "cost": 5.0}, {"accuracy": 0.93, "cost": 2.9}, {"accuracy": 0.93, "cost": 2.0},
             {"accuracy": 0.95, "cost": 3.5}]
    assert best_within(curve, 3.0) == {"budget": 3.0, "point": {"accuracy": 0.93, "cost": 2.0}, "accuracy": 0.93}
    assert best_within(curve, 1.0)["accuracy"] is None


def test_neighbour_search_uses_the_serving_gates_index(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two OpenMP threads reorder the similarity sums; RouterBench prompts that share few-shot examples tie to the
    # last bits, so the neighbours (and the published AIQ: 0.833 against 0.840) moved with the machine's cores.
    # router.search's index runs faiss on MOE_FAISS_THREADS (default 1), as the serving gate does.
    import eval.outcome
    from router.search import flat_ip_index

    built: list[int] = []

    def spy(vectors: np.ndarray) -> object:
        built.append(len(vectors))
        return flat_ip_index(vectors)

    monkeypatch.setattr(eval.outcome, "flat_ip_index", spy)
    x = np.eye(4, dtype=np.float32)
    model = NeighbourOutcomes(x, np.ones((4, 2)))
    assert built == [4]
    assert model.neighbours(x[2:3], 2)[0, 0] == 2
