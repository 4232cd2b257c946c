"""Every metric on a small case computed by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from eval import metrics as m

NAN = float("nan")


# ---------------------------------------------------------------- classification


def test_accuracy() -> None:
    assert m.accuracy(["a", "b", "c", "a"], ["a", "b", "a", "a"]) == 0.75
    with pytest.raises(ValueError):
        m.accuracy([], [])
    with pytest.raises(ValueError):
        m.accuracy([1, 2], [1])


TOPK_PROBS = np.array(
    [
        [0.5, 0.3, 0.2],  # y=1: one class above -> rank 1
        [0.1, 0.6, 0.3],  # y=2: one class above -> rank 1
        [0.4, 0.4, 0.2],  # y=1: tied with class 0, which has the lower index -> rank 1
        [0.2, 0.3, 0.5],  # y=0: two classes above -> rank 2
        [0.4, 0.4, 0.2],  # y=0: tied with class 1, but 0 is the lower index -> rank 0
    ]
)
TOPK_Y = np.array([1, 2, 1, 0, 0])


@pytest.mark.parametrize(("k", "expected"), [(1, 1 / 5), (2, 4 / 5), (3, 1.0)])
def test_topk_recall(k: int, expected: float) -> None:
    assert m.topk_recall(TOPK_PROBS, TOPK_Y, k) == pytest.approx(expected)


def test_top1_recall_equals_argmax_accuracy_under_ties() -> None:
    assert m.topk_recall(TOPK_PROBS, TOPK_Y, 1) == m.accuracy(TOPK_Y, TOPK_PROBS.argmax(1))


def test_topk_recall_rejects_bad_k() -> None:
    with pytest.raises(ValueError):
        m.topk_recall(TOPK_PROBS, TOPK_Y, 4)


def test_nan_probabilities_are_refused_not_scored() -> None:
    """A NaN row ranked its true class first (top-1 recall 0.5 where accuracy was 0.0) and fell into an arbitrary
    calibration bin; both now refuse it, naming the row, as auroc refuses NaN scores."""
    probs = np.array([[np.nan, np.nan], [0.9, 0.1]])
    y = np.array([0, 1])
    with pytest.raises(ValueError, match=r"NaN or inf in 1 row\(s\), the first at row 0"):
        m.topk_recall(probs, y, 1)
    with pytest.raises(ValueError, match="NaN or inf"):
        m.reliability_bins(probs, y)
    with pytest.raises(ValueError, match="NaN or inf"):
        m.expected_calibration_error(np.array([[0.5, 0.5], [np.inf, 0.0]]), y)


Y_TRUE = ["a", "a", "a", "b", "b", "c"]
Y_PRED = ["a", "a", "b", "b", "c", "c"]


def test_per_class_precision_recall() -> None:
    # a: TP 2 of 2 predicted, 3 true; b: TP 1 of 2 predicted, 2 true; c: TP 1 of 2 predicted, 1 true.
    got = m.per_class_precision_recall(Y_TRUE, Y_PRED)
    assert got == {
        "a": (1.0, pytest.approx(2 / 3), 3),
        "b": (0.5, 0.5, 2),
        "c": (0.5, 1.0, 1),
    }


def test_macro_f1() -> None:
    # F1: a = 2*1*(2/3)/(5/3) = 0.8; b = 0.5; c = 2*0.5*1/1.5 = 2/3.
    assert m.macro_f1(Y_TRUE, Y_PRED) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_macro_f1_counts_labels_only_predicted() -> None:
    # a: P 1, R 1/2, F1 2/3; d is never true: P 0, R 0, F1 0 (zero_division=0).
    assert m.macro_f1(["a", "a"], ["a", "d"]) == pytest.approx(1 / 3)
    assert m.per_class_precision_recall(["a", "a"], ["a", "d"])["d"] == (0.0, 0.0, 0)


def test_confusion_matrix() -> None:
    np.testing.assert_array_equal(m.confusion_matrix(Y_TRUE, Y_PRED), [[2, 1, 0], [0, 1, 1], [0, 0, 1]])
    # Explicit label order; labels outside it are not counted.
    np.testing.assert_array_equal(m.confusion_matrix(Y_TRUE, Y_PRED, labels=["c", "b"]), [[1, 0], [1, 1]])


def _ece_case() -> tuple[np.ndarray, np.ndarray]:
    # 4 queries at confidence 0.85 (3 correct) and 4 at 0.65 (2 correct).
    probs = np.array([[0.85, 0.15]] * 4 + [[0.35, 0.65]] * 4)
    y = np.array([0, 0, 0, 1, 1, 1, 0, 0])
    return probs, y


def test_expected_calibration_error() -> None:
    probs, y = _ece_case()
    # 10 bins: (0.8, 0.9] holds 4 with acc 0.75, conf 0.85; (0.6, 0.7] holds 4 with acc 0.5, conf 0.65.
    # ECE = 4/8 * |0.75 - 0.85| + 4/8 * |0.5 - 0.65| = 0.05 + 0.075
    assert m.expected_calibration_error(probs, y, n_bins=10) == pytest.approx(0.125)
    # Default 15 bins: 0.85 -> (0.8, 0.8667], 0.65 -> (0.6, 0.6667]; same grouping, same ECE.
    assert m.expected_calibration_error(probs, y) == pytest.approx(0.125)


def test_ece_is_zero_when_calibrated() -> None:
    probs = np.array([[0.75, 0.25]] * 4)
    assert m.expected_calibration_error(probs, np.array([0, 0, 0, 1])) == pytest.approx(0.0)


def test_reliability_bins() -> None:
    probs, y = _ece_case()
    bins = m.reliability_bins(probs, y, n_bins=10)
    np.testing.assert_allclose(bins.edges, np.linspace(0, 1, 11))
    assert bins.counts.tolist() == [0, 0, 0, 0, 0, 0, 4, 0, 4, 0]
    assert bins.confidence[6] == pytest.approx(0.65) and bins.accuracy[6] == 0.5
    assert bins.confidence[8] == pytest.approx(0.85) and bins.accuracy[8] == 0.75
    assert np.isnan(bins.confidence[0]) and np.isnan(bins.accuracy[0])


def test_reliability_bins_are_closed_on_the_right() -> None:
    # Confidence exactly 0.5 belongs to (0, 0.5], 1.0 to (0.5, 1].
    bins = m.reliability_bins(np.array([[0.5, 0.5], [1.0, 0.0]]), np.array([0, 0]), n_bins=2)
    assert bins.counts.tolist() == [1, 1]


def test_auroc_with_ties() -> None:
    # Positives 0.9, 0.8; negatives 0.8, 0.3, 0.8.
    # 0.9 beats all 3 negatives; 0.8 ties twice (0.5 each) and beats 0.3: (3 + 2) / 6.
    assert m.auroc([0.9, 0.8, 0.8, 0.3, 0.8], [1, 1, 0, 0, 0]) == pytest.approx(5 / 6)


def test_auroc_edge_cases() -> None:
    assert m.auroc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert m.auroc([1, 2, 3, 4], [1, 1, 0, 0]) == 0.0
    assert m.auroc([2, 2, 2, 2], [1, 0, 1, 0]) == 0.5
    with pytest.raises(ValueError):
        m.auroc([1, 2], [1, 1])


# ---------------------------------------------------------------- outcomes and routing

OUTCOMES = np.array([[1, 0, NAN], [0, 1, 1], [NAN, 0, 0], [0, 0, 1]])
COSTS = np.array([[1.0, 2.0, 3.0]] * 4)


def test_routed_accuracy_counts_missing_as_wrong() -> None:
    # Picks: row0 e0 -> 1, row1 e1 -> 1, row2 e0 -> NaN -> 0, row3 e1 -> 0.
    assert m.routed_accuracy([0, 1, 0, 1], OUTCOMES) == 0.5


def test_routed_cost() -> None:
    assert m.routed_cost([0, 1, 0, 1], COSTS) == 1.5
    costs = COSTS.copy()
    costs[2, 0] = NAN
    with pytest.raises(ValueError, match="1 routed queries"):
        m.routed_cost([0, 1, 0, 1], costs)
    with pytest.raises(ValueError):
        m.routed_cost([0, 1, 0, 3], COSTS)


def test_per_expert_accuracy_excludes_missing() -> None:
    # e0 known on rows 0,1,3: 1/3; e1: 1/4; e2 known on rows 1,2,3: 2/3.
    np.testing.assert_allclose(m.per_expert_accuracy(OUTCOMES), [1 / 3, 1 / 4, 2 / 3])


def test_oracle_accuracy() -> None:
    # Rows 0, 1, 3 have a correct expert; row 2 has none.
    assert m.oracle_accuracy(OUTCOMES) == 0.75


def test_cheapest_correct_oracle() -> None:
    # row0 -> e0 (only correct, cost 1); row1 -> e1 (cheaper of e1, e2: cost 2);
    # row2 -> none correct, cheapest e0 (cost 1); row3 -> e2 (cost 3).
    res = m.cheapest_correct_oracle(OUTCOMES, COSTS)
    assert res.accuracy == 0.75
    assert res.cost == pytest.approx((1 + 2 + 1 + 3) / 4)
    assert res.choices.tolist() == [0, 1, 0, 2]
    assert m.routed_accuracy(res.choices, OUTCOMES) == res.accuracy


def test_cheapest_correct_oracle_skips_unknown_costs() -> None:
    costs = COSTS.copy()
    costs[1, 1] = NAN  # row1: e1 has no price, so the correct e2 is picked
    assert m.cheapest_correct_oracle(OUTCOMES, costs).choices.tolist() == [0, 2, 0, 2]


# ---------------------------------------------------------------- RouteLLM APGR / CPT


def test_strong_call_curve_matches_routellm_sweep() -> None:
    # Quantile edges for n_results=2 on [.1,.2,.3,.4]: [.1, .25, .4].
    # >= .1: all strong, 100%, acc mean([1,1,0,1]) = .75
    # >= .25: rows 2,3 strong, 50%, acc (w0 0 + w1 1 + s2 0 + s3 1)/4 = .5
    # >  .4 (last edge): none strong, 0%, acc mean(weak) = .5
    x, y = m.strong_call_curve([0.1, 0.2, 0.3, 0.4], [1, 1, 0, 1], [0, 1, 1, 0], n_results=2)
    np.testing.assert_allclose(x, [0, 50, 100])
    np.testing.assert_allclose(y, [0.5, 0.5, 0.75])


# Points (x = % strong, accuracy), deliberately unsorted; weak 0.6, strong 0.8.
APGR_X = [100, 0, 50]
APGR_Y = [0.8, 0.6, 0.75]


def test_apgr_by_hand() -> None:
    # AUC (x as fraction) = 0.5*(0.6+0.75)/2 + 0.5*(0.75+0.8)/2 = 0.3375 + 0.3875 = 0.725
    # weak AUC = 0.6, strong AUC = 0.8 -> APGR = (0.725 - 0.6) / (0.8 - 0.6) = 0.625
    assert m.apgr(APGR_X, APGR_Y, 0.6, 0.8) == pytest.approx(0.625)


def test_apgr_of_random_router_is_half() -> None:
    # Random routing interpolates linearly between weak and strong: PGR(x) = x, mean 0.5.
    x = np.linspace(0, 100, 11)
    assert m.apgr(x, 0.6 + 0.2 * x / 100, 0.6, 0.8) == pytest.approx(0.5)


def test_apgr_normalises_over_the_points_span() -> None:
    # RouteLLM integrates the weak/strong lines over the same x-span as the router's points.
    assert m.apgr([0, 50], [0.6, 0.75], 0.6, 0.8) == pytest.approx((0.5 * 1.35 / 2 - 0.3) / 0.1)


@pytest.mark.parametrize(
    ("pct", "expected"),
    [
        (0, 0.0),
        (50, 100 / 3),  # target 0.70, on segment (0, .6)-(50, .75): 50 * 0.10 / 0.15
        (80, 60.0),  # target 0.76, on segment (50, .75)-(100, .8): 50 + 50 * 0.01 / 0.05
        (100, 100.0),
    ],
)
def test_cpt_by_hand(pct: float, expected: float) -> None:
    assert m.cpt(APGR_X, APGR_Y, 0.6, 0.8, pct) == pytest.approx(expected)
    # Same number as RouteLLM's np.interp on this increasing curve.
    x, y = np.array([0, 50, 100]), np.array([0.6, 0.75, 0.8])
    assert m.cpt(x, y, 0.6, 0.8, pct) == pytest.approx(np.interp(0.6 + pct / 100 * 0.2, y, x))


def test_cpt_unreachable_is_nan() -> None:
    assert math.isnan(m.cpt(APGR_X, APGR_Y, 0.6, 0.8, 120))


def test_cpt_takes_first_crossing_on_non_monotone_curve() -> None:
    # 0.7 is first reached at x = 25 on (0, .6)-(50, .8); the later dip does not matter.
    assert m.cpt([0, 50, 75, 100], [0.6, 0.8, 0.65, 0.8], 0.6, 0.8, 50) == pytest.approx(25.0)


# ---------------------------------------------------------------- RouterBench AIQ

AIQ_COSTS = [3, 1, 4, 2, 5]
AIQ_QUALS = [0.8, 0.5, 0.7, 0.55, 0.85]


def test_quality_cost_hull() -> None:
    # Sorted: (1,.5) (2,.55) (3,.8) (4,.7) (5,.85). The chord (1,.5)-(3,.8) is .65 at 2 > .55, and
    # (3,.8)-(5,.85) is .825 at 4 > .7: both drop. Slopes .15 then .025 are decreasing: concave.
    hx, hy = m.quality_cost_hull(AIQ_COSTS, AIQ_QUALS)
    np.testing.assert_allclose(hx, [1, 3, 5])
    np.testing.assert_allclose(hy, [0.5, 0.8, 0.85])


def test_aiq_by_hand() -> None:
    # Area = 2*(.5+.8)/2 + 2*(.8+.85)/2 = 1.3 + 1.65 = 2.95 over cost range 5 - 1 = 4.
    assert m.aiq(AIQ_COSTS, AIQ_QUALS) == pytest.approx(2.95 / 4)
    # Over [0, 5]: 0 below the cheapest point.
    assert m.aiq(AIQ_COSTS, AIQ_QUALS, cost_range=(0, 5)) == pytest.approx(2.95 / 5)


def test_aiq_routerbench_divides_by_the_best_quality_cost_as_its_code_does() -> None:
    # RouterBench's calc_AIQ on (1,.5) (2,.4) (3,.8) (4,.7): its non-decreasing hull is (1,.5) (3,.8), area 1.3,
    # divided by the hull's largest cost, 3 (the dearer point at 4 is below the best and dropped): 0.4333.
    costs, quals = [1, 2, 3, 4], [0.5, 0.4, 0.8, 0.7]
    assert m.aiq_routerbench(costs, quals) == pytest.approx(1.3 / 3)
    assert m.aiq(costs, quals, cost_range=(0, 4)) == pytest.approx(2.1 / 4)  # to the dearest point: not theirs
    # Points tied at the best quality stay on RouterBench's hull (it drops only points below the one before):
    # the dearer tie, at 5, sets the scale. Area 1.3 to cost 3, then flat at .8 to 5: 2.9 / 5.
    assert m.aiq_routerbench([1, 3, 5], [0.5, 0.8, 0.8]) == pytest.approx(2.9 / 5)
    # When the best point is also the dearest, the two agree.
    assert m.aiq_routerbench(AIQ_COSTS, AIQ_QUALS) == pytest.approx(m.aiq(AIQ_COSTS, AIQ_QUALS, cost_range=(0, 5)))


def test_aiq_hull_is_non_decreasing() -> None:
    # Hull (1,.5) (2,.9) (4,.6) is concave but falls after cost 2, so it is cut there and held flat:
    # area = 1*(.5+.9)/2 + 2*.9 = 2.5 over range 3.
    hx, hy = m.quality_cost_hull([1, 2, 4], [0.5, 0.9, 0.6])
    np.testing.assert_allclose(hx, [1, 2])
    np.testing.assert_allclose(hy, [0.5, 0.9])
    assert m.aiq([1, 2, 4], [0.5, 0.9, 0.6]) == pytest.approx(2.5 / 3)


def test_aiq_shared_range_extends_flat_and_duplicates_take_the_best() -> None:
    # Points (1,.4) (1,.6) (2,.7): hull (1,.6)-(2,.7), held at .7 to cost 4.
    # Area over [1, 4] = 1*(.6+.7)/2 + 2*.7 = 2.05 -> / 3
    assert m.aiq([1, 1, 2], [0.4, 0.6, 0.7], cost_range=(1, 4)) == pytest.approx(2.05 / 3)


def test_aiq_single_cost() -> None:
    assert m.aiq([2, 2], [0.3, 0.7]) == pytest.approx(0.7)


# ---------------------------------------------------------------- bootstrap


def test_bootstrap_ci_constant_data() -> None:
    ci = m.bootstrap_ci(np.mean, np.full(20, 0.3))
    assert ci == pytest.approx((0.3, 0.3, 0.3))


def test_bootstrap_ci_is_seeded_and_paired() -> None:
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 200)
    pred = np.where(rng.random(200) < 0.8, y, 1 - y)
    a = m.bootstrap_ci(m.accuracy, y, pred, n=300, seed=3)
    assert a == m.bootstrap_ci(m.accuracy, y, pred, n=300, seed=3)
    assert a != m.bootstrap_ci(m.accuracy, y, pred, n=300, seed=4)
    assert a.low < a.estimate < a.high
    assert a.estimate == m.accuracy(y, pred)
    # Rows stay paired: predicting y itself is right in every resample.
    assert m.bootstrap_ci(m.accuracy, y, y, n=50) == (1.0, 1.0, 1.0)


def test_bootstrap_ci_leaves_out_resamples_where_the_statistic_is_undefined() -> None:
    x = np.array([0.0] * 3 + [1.0, 2.0, 3.0])

    def mean_of_positive(a: np.ndarray) -> float:  # undefined (NaN) for a resample with no positive value
        return float(a[a > 0].mean()) if (a > 0).any() else float("nan")

    ci = m.bootstrap_ci(mean_of_positive, x, n=400, seed=1)
    assert ci.estimate == 2.0 and 1.0 <= ci.low < 2.0 < ci.high <= 3.0
    none = m.bootstrap_ci(mean_of_positive, np.zeros(5), n=20)
    assert np.isnan(none.estimate) and np.isnan(none.low) and np.isnan(none.high)


def test_bootstrap_ci_rejects_mismatched_rows() -> None:
    with pytest.raises(ValueError):
        m.bootstrap_ci(m.accuracy, np.zeros(3), np.zeros(4))


def test_agrees_with_scikit_learn_on_random_data() -> None:
    from sklearn import metrics as skm

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(5), size=300)
    y = rng.integers(0, 5, 300)
    pred = probs.argmax(1)
    assert m.macro_f1(y, pred) == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0))
    np.testing.assert_array_equal(m.confusion_matrix(y, pred), skm.confusion_matrix(y, pred))
    for k in (1, 2, 3):
        assert m.topk_recall(probs, y, k) == pytest.approx(
            skm.top_k_accuracy_score(y, probs, k=k, labels=np.arange(5))
        )
    scores = np.round(rng.random(300), 1)  # rounding makes many ties
    assert m.auroc(scores, y == 0) == pytest.approx(skm.roc_auc_score(y == 0, scores))


def test_ece_weights_bins_by_their_queries_and_adds_absolute_gaps() -> None:
    """Bin (0.867, 0.933]: three queries at 0.9, two right (overconfident by 0.233); bin (0.533, 0.6]: one at 0.6,
    right (underconfident by 0.4). ECE = 3/4 * 0.233 + 1/4 * 0.4 = 0.275, not the bins' plain mean (0.317) nor a
    signed sum (0.075)."""
    probs = np.array([[0.9, 0.1]] * 3 + [[0.6, 0.4]])
    assert m.expected_calibration_error(probs, np.array([0, 0, 1, 0])) == pytest.approx(0.275)


def test_a_tie_in_top_k_recall_goes_to_the_lower_class_row_by_row() -> None:
    tied = np.array([[0.4, 0.4, 0.2]])
    assert m.topk_recall(tied, np.array([0]), 1) == 1.0  # as argmax picks: class 0
    assert m.topk_recall(tied, np.array([1]), 1) == 0.0
