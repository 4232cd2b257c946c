"""Routing-quality metrics: pure numpy functions over arrays, no I/O.

Shapes and conventions used throughout:

- ``probs``: ``(n_queries, n_classes)`` gate probabilities; ``y``: ``(n_queries,)`` integer class indices.
- ``y_true`` / ``y_pred``: ``(n_queries,)`` labels of any hashable type (str or int).
- ``outcomes``: ``(n_queries, n_experts)`` quality of each expert on each query (1/0 for correctness, or a
  score), NaN where the expert has no record for that query. ``costs`` has the same shape.
- ``choices``: ``(n_queries,)`` integer index of the expert the router chose for each query.

Missing outcomes (NaN), the rule used everywhere here:

- for a *routed system* (``routed_accuracy``, ``oracle_accuracy``, ``cheapest_correct_oracle``,
  ``strong_call_curve``), a missing outcome counts as **wrong (0)**: a router that sends a query to an expert
  with no answer gets no credit, and every query stays in the denominator;
- for an *individual expert's* accuracy (``per_expert_accuracy``), missing outcomes are **excluded** from
  both numerator and denominator, so a model is not penalised for questions it was never asked;
- a missing *cost* for an expert the router actually chose is an error (``ValueError``): we refuse to
  invent a price.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "ConfidenceInterval",
    "OracleResult",
    "ReliabilityBins",
    "accuracy",
    "aiq",
    "aiq_routerbench",
    "apgr",
    "auroc",
    "bootstrap_ci",
    "cheapest_correct_oracle",
    "confusion_matrix",
    "cpt",
    "expected_calibration_error",
    "macro_f1",
    "oracle_accuracy",
    "per_class_precision_recall",
    "per_expert_accuracy",
    "quality_cost_hull",
    "reliability_bins",
    "routed_accuracy",
    "routed_cost",
    "strong_call_curve",
    "topk_recall",
]

FloatArray = NDArray[np.float64]


class ReliabilityBins(NamedTuple):
    """Per-bin data for a reliability diagram. Empty bins have count 0 and NaN confidence and accuracy."""

    edges: FloatArray  # (n_bins + 1,) equal-width edges on [0, 1]
    confidence: FloatArray  # (n_bins,) mean max-probability in the bin
    accuracy: FloatArray  # (n_bins,) fraction correct in the bin
    counts: NDArray[np.int64]  # (n_bins,)


class OracleResult(NamedTuple):
    accuracy: float
    cost: float  # mean cost per query
    choices: NDArray[np.int64]  # the expert the oracle picks for each query


class ConfidenceInterval(NamedTuple):
    estimate: float  # fn on the full sample
    low: float
    high: float


# ---------------------------------------------------------------- classification


def _labels(y_true: ArrayLike, y_pred: ArrayLike) -> tuple[NDArray[Any], NDArray[Any]]:
    t, p = np.asarray(y_true), np.asarray(y_pred)
    if t.shape != p.shape or t.ndim != 1:
        raise ValueError(f"y_true and y_pred must be 1-D and the same length, got {t.shape} and {p.shape}")
    return t, p


def accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Fraction of queries whose predicted label equals the true label (standard top-1 accuracy)."""
    t, p = _labels(y_true, y_pred)
    if t.size == 0:
        raise ValueError("accuracy of an empty sample is undefined")
    return float(np.mean(t == p))


def topk_recall(probs: ArrayLike, y: ArrayLike, k: int) -> float:
    """Fraction of queries whose true class is among the ``k`` highest-probability classes.

    scikit-learn's ``top_k_accuracy_score`` without ties. Ties in probability are broken towards the lower
    class index, as ``np.argmax`` does, so ``topk_recall(probs, y, 1)`` equals ``accuracy(y, probs.argmax(1))``
    exactly (a uniform gate gets no free credit from ties); scikit-learn breaks them towards the higher index,
    so the two differ on tied rows.
    """
    p = np.asarray(probs, dtype=float)
    yy = np.asarray(y, dtype=np.int64)
    if p.ndim != 2 or yy.shape != (p.shape[0],):
        raise ValueError(f"probs must be (n, C) and y (n,), got {p.shape} and {yy.shape}")
    if not 1 <= k <= p.shape[1]:
        raise ValueError(f"k must be in [1, {p.shape[1]}], got {k}")
    _finite(p)
    true_p = p[np.arange(len(yy)), yy][:, None]
    cls = np.arange(p.shape[1])[None, :]
    # Rank of the true class: classes strictly above it, plus tied classes with a lower index.
    rank = np.sum(p > true_p, axis=1) + np.sum((p == true_p) & (cls < yy[:, None]), axis=1)
    return float(np.mean(rank < k))


def _finite(probs: NDArray[Any]) -> None:
    """Refuse probabilities with NaN (or inf): every comparison with one is false, so a NaN row ranked its true
    class first (a hit) and fell into an arbitrary calibration bin."""
    bad = ~np.isfinite(probs).all(axis=1)
    if bad.any():
        raise ValueError(f"probs hold NaN or inf in {int(bad.sum())} row(s), the first at row {int(np.argmax(bad))}")


def _label_set(t: NDArray[Any], p: NDArray[Any], labels: Sequence[Hashable] | None) -> list[Any]:
    if labels is not None:
        return list(labels)
    return sorted(set(t.tolist()) | set(p.tolist()))


def per_class_precision_recall(
    y_true: ArrayLike, y_pred: ArrayLike, labels: Sequence[Hashable] | None = None
) -> dict[Any, tuple[float, float, int]]:
    """Per label: ``(precision, recall, support)``.

    precision = TP / (TP + FP), recall = TP / (TP + FN), support = number of true instances. A ratio
    with a zero denominator is 0.0 (scikit-learn's ``zero_division=0`` convention). ``labels`` defaults to
    the sorted union of labels seen in ``y_true`` and ``y_pred``.
    """
    t, p = _labels(y_true, y_pred)
    out: dict[Any, tuple[float, float, int]] = {}
    for lab in _label_set(t, p, labels):
        tp = int(np.sum((t == lab) & (p == lab)))
        n_pred, support = int(np.sum(p == lab)), int(np.sum(t == lab))
        out[lab] = (tp / n_pred if n_pred else 0.0, tp / support if support else 0.0, support)
    return out


def macro_f1(y_true: ArrayLike, y_pred: ArrayLike, labels: Sequence[Hashable] | None = None) -> float:
    """Unweighted mean over labels of per-label F1 = 2PR / (P + R) (0.0 when P + R = 0).

    Matches scikit-learn's ``f1_score(average="macro", zero_division=0)``: labels default to the union
    of those in ``y_true`` and ``y_pred``, so a label that is only ever predicted counts with F1 = 0.
    """
    f1s = [2 * pr * rc / (pr + rc) if pr + rc else 0.0 for pr, rc, _ in
           per_class_precision_recall(y_true, y_pred, labels).values()]
    if not f1s:
        raise ValueError("macro F1 over no labels is undefined")
    return float(np.mean(f1s))


def confusion_matrix(
    y_true: ArrayLike, y_pred: ArrayLike, labels: Sequence[Hashable] | None = None
) -> NDArray[np.int64]:
    """Counts ``C[i, j]`` of queries with true label ``labels[i]`` predicted as ``labels[j]``.

    Rows are true labels, columns predictions (scikit-learn's orientation). ``labels`` defaults to the
    sorted union of observed labels; pairs involving a label outside ``labels`` are not counted.
    """
    t, p = _labels(y_true, y_pred)
    labs = _label_set(t, p, labels)
    index = {lab: i for i, lab in enumerate(labs)}
    m = np.zeros((len(labs), len(labs)), dtype=np.int64)
    for a, b in zip(t.tolist(), p.tolist(), strict=True):
        if a in index and b in index:
            m[index[a], index[b]] += 1
    return m


def reliability_bins(probs: ArrayLike, y: ArrayLike, n_bins: int = 15) -> ReliabilityBins:
    """Bin queries by confidence (max probability) into ``n_bins`` equal-width bins on [0, 1].

    Bin ``b`` holds confidences in ``(b/n, (b+1)/n]`` (the first bin also takes exactly 0), as in Guo et
    al. 2017, "On Calibration of Modern Neural Networks", sec. 2. A query is correct when its argmax class
    equals ``y``.
    """
    p = np.asarray(probs, dtype=float)
    yy = np.asarray(y, dtype=np.int64)
    if p.ndim != 2 or yy.shape != (p.shape[0],) or p.shape[0] == 0:
        raise ValueError(f"probs must be non-empty (n, C) and y (n,), got {p.shape} and {yy.shape}")
    _finite(p)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == yy).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # ceil(conf * n) - 1 maps (b/n, (b+1)/n] to b; clip puts 0 in the first bin.
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
        mean_acc = np.bincount(idx, weights=correct, minlength=n_bins) / count
    return ReliabilityBins(edges, mean_conf, mean_acc, count)


def expected_calibration_error(probs: ArrayLike, y: ArrayLike, n_bins: int = 15) -> float:
    """ECE = sum over bins of (n_b / N) * |acc_b - conf_b|, equal-width bins on the max probability.

    Definition from Naeini et al. 2015 and Guo et al. 2017 (eq. 3), 15 bins as in Guo et al.; binning as
    in ``reliability_bins``. Empty bins contribute nothing.
    """
    bins = reliability_bins(probs, y, n_bins)
    filled = bins.counts > 0
    weights = bins.counts[filled] / bins.counts.sum()
    return float(np.sum(weights * np.abs(bins.accuracy[filled] - bins.confidence[filled])))


def _average_ranks(x: FloatArray) -> FloatArray:
    """1-based ranks with ties given their average rank (scipy.stats.rankdata(method="average"))."""
    order = np.argsort(x, kind="mergesort")
    sx = x[order]
    # Group boundaries of runs of equal values; each run gets the mean of its positions.
    starts = np.flatnonzero(np.r_[True, sx[1:] != sx[:-1]])
    ends = np.r_[starts[1:], len(sx)]
    avg = (starts + ends + 1) / 2.0  # mean of 1-based positions starts+1 .. ends
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def auroc(scores: ArrayLike, positives: ArrayLike) -> float:
    """Area under the ROC curve = P(score of a positive > score of a negative) + 0.5 * P(tie).

    Computed as the Mann-Whitney U statistic of the positives divided by ``n_pos * n_neg``, with tied
    scores given average ranks (Hanley & McNeil 1982); equals scikit-learn's ``roc_auc_score``. For
    out-of-scope detection, ``scores`` is the OOS score (higher = more likely OOS), ``positives`` marks
    the OOS queries.
    """
    s = np.asarray(scores, dtype=float)
    pos = np.asarray(positives, dtype=bool)
    if s.shape != pos.shape or s.ndim != 1:
        raise ValueError(f"scores and positives must be 1-D and the same length, got {s.shape}, {pos.shape}")
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs at least one positive and one negative")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    u = _average_ranks(s)[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


# ---------------------------------------------------------------- outcomes and routing


def _outcomes(outcomes: ArrayLike) -> FloatArray:
    o = np.asarray(outcomes, dtype=float)
    if o.ndim != 2 or o.shape[0] == 0:
        raise ValueError(f"outcomes must be a non-empty (n_queries, n_experts) array, got {o.shape}")
    return o


def _choices(choices: ArrayLike, shape: tuple[int, ...]) -> NDArray[np.int64]:
    c = np.asarray(choices, dtype=np.int64)
    if c.shape != (shape[0],):
        raise ValueError(f"choices must be ({shape[0]},), got {c.shape}")
    if c.size and (c.min() < 0 or c.max() >= shape[1]):
        raise ValueError(f"choices must index experts 0..{shape[1] - 1}")
    return c


def per_expert_accuracy(outcomes: ArrayLike) -> FloatArray:
    """Mean outcome of each expert over the queries it has a record for (NaN outcomes excluded).

    An expert with no records at all gets NaN.
    """
    o = _outcomes(outcomes)
    known = ~np.isnan(o)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(known, o, 0.0).sum(axis=0) / known.sum(axis=0)


def routed_accuracy(choices: ArrayLike, outcomes: ArrayLike) -> float:
    """Mean outcome of the chosen expert over all queries; a missing (NaN) outcome counts as 0 (wrong)."""
    o = _outcomes(outcomes)
    c = _choices(choices, o.shape)
    return float(np.mean(np.nan_to_num(o[np.arange(len(c)), c], nan=0.0)))


def routed_cost(choices: ArrayLike, costs: ArrayLike) -> float:
    """Mean cost per query of the chosen expert. Raises ``ValueError`` if a chosen cost is missing (NaN)."""
    k = _outcomes(costs)
    c = _choices(choices, k.shape)
    chosen = k[np.arange(len(c)), c]
    missing = int(np.isnan(chosen).sum())
    if missing:
        raise ValueError(f"{missing} routed queries have no cost for the chosen expert")
    return float(chosen.mean())


def oracle_accuracy(outcomes: ArrayLike) -> float:
    """Mean over queries of the best expert's outcome: for 1/0 correctness, the fraction of queries that
    at least one expert answers correctly (the "Oracle" upper bound of RouterBench and RouteLLM).
    Missing outcomes count as 0."""
    return float(np.mean(np.nan_to_num(_outcomes(outcomes), nan=0.0).max(axis=1)))


def cheapest_correct_oracle(outcomes: ArrayLike, costs: ArrayLike) -> OracleResult:
    """Per query, the best outcome at the lowest cost: RouterBench's Oracle router.

    For each query pick, among the experts with the highest outcome (for 1/0: the correct ones), the one
    with the lowest cost; when no expert is correct every expert ties at 0, so the cheapest is picked.
    Missing outcomes count as 0; an expert whose cost is missing is never picked. Returns mean outcome,
    mean cost per query and the picks.
    """
    o = np.nan_to_num(_outcomes(outcomes), nan=0.0)
    k = np.asarray(costs, dtype=float)
    if k.shape != o.shape:
        raise ValueError(f"costs must have the outcomes' shape {o.shape}, got {k.shape}")
    if np.isnan(k).all(axis=1).any():
        raise ValueError("some queries have no expert with a known cost")
    o = np.where(np.isnan(k), -np.inf, o)
    best = o == o.max(axis=1, keepdims=True)
    choices = np.where(best, k, np.inf).argmin(axis=1).astype(np.int64)
    rows = np.arange(len(choices))
    return OracleResult(float(o[rows, choices].mean()), float(k[rows, choices].mean()), choices)


# ---------------------------------------------------------------- RouteLLM: APGR and CPT


def strong_call_curve(
    strong_win_rates: ArrayLike, strong_outcomes: ArrayLike, weak_outcomes: ArrayLike, n_results: int = 10
) -> tuple[FloatArray, FloatArray]:
    """Performance-vs-%-strong-calls points of a strong/weak router, swept over thresholds.

    Matches RouteLLM ``routellm/evals/benchmarks.py`` (``MMLU.evaluate``/``GSM8K.evaluate``): thresholds
    are the ``n_results``-quantile bin edges of the router's strong-win-rate scores (``pd.qcut``, i.e.
    linear-interpolated quantiles at 0, 1/n, ..., 1); at each threshold a query goes to the strong model
    when its score is ``>=`` the threshold, except at the last edge where it must be ``>`` it (so the sweep
    ends at 0% strong). Performance is the mean outcome of the routed model (missing outcomes count as 0).

    Returns ``(strong_pct, performance)`` sorted by ``strong_pct`` (0-100).
    """
    s = np.asarray(strong_win_rates, dtype=float)
    strong = np.nan_to_num(np.asarray(strong_outcomes, dtype=float), nan=0.0)
    weak = np.nan_to_num(np.asarray(weak_outcomes, dtype=float), nan=0.0)
    if not s.shape == strong.shape == weak.shape or s.ndim != 1 or s.size == 0:
        raise ValueError("strong_win_rates, strong_outcomes and weak_outcomes must be equal-length 1-D")
    edges = np.quantile(s, np.linspace(0.0, 1.0, n_results + 1))
    pcts, perfs = [], []
    for i, t in enumerate(edges):
        to_strong = s >= t if i < len(edges) - 1 else s > t
        pcts.append(100.0 * to_strong.mean())
        perfs.append(float(np.where(to_strong, strong, weak).mean()))
    order = np.argsort(pcts, kind="mergesort")
    return np.asarray(pcts)[order], np.asarray(perfs)[order]


def _curve(strong_pcts: ArrayLike, performances: ArrayLike) -> tuple[FloatArray, FloatArray]:
    x = np.asarray(strong_pcts, dtype=float)
    y = np.asarray(performances, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or x.size < 2:
        raise ValueError("need at least two (strong_pct, performance) points of equal length")
    order = np.argsort(x, kind="mergesort")
    return x[order], y[order]


def apgr(
    strong_pcts: ArrayLike, performances: ArrayLike, weak_performance: float, strong_performance: float
) -> float:
    """Average Performance Gap Recovered (RouteLLM, Ong et al. 2024, sec. 5).

    Matches ``apgr_metric`` in RouteLLM ``routellm/evals/evaluate.py``: sort the router's points by %
    strong calls, take the trapezoidal area under performance vs. fraction of strong calls, and normalise
    against constant weak and strong lines over the same x-span::

        APGR = (AUC(router) - AUC(weak)) / (AUC(strong) - AUC(weak))

    With points spanning 0-100% this is the integral of PGR(x) = (perf(x) - weak) / (strong - weak) over
    x in [0, 1]. ``weak_performance``/``strong_performance`` are each model alone on the same queries
    (RouteLLM's ``get_model_accuracy``), in the units of ``performances``.
    """
    x, y = _curve(strong_pcts, performances)
    span = (x[-1] - x[0]) / 100.0
    if span <= 0 or strong_performance == weak_performance:
        raise ValueError("APGR needs a non-zero %-strong span and strong_performance != weak_performance")
    dx = np.diff(x) / 100.0
    auc = float(np.sum(dx * (y[1:] + y[:-1]) / 2.0))  # trapezoid rule, as np.trapz
    weak_auc, strong_auc = weak_performance * span, strong_performance * span
    return (auc - weak_auc) / (strong_auc - weak_auc)


def cpt(
    strong_pcts: ArrayLike,
    performances: ArrayLike,
    weak_performance: float,
    strong_performance: float,
    threshold_pct: float,
) -> float:
    """Call-Performance Threshold CPT(threshold_pct): the minimum % of calls to the strong model at which
    the router reaches ``weak + threshold_pct/100 * (strong - weak)`` performance (RouteLLM, sec. 5).

    RouteLLM ``routellm/evals/evaluate.py`` (``pct_call_metric``) computes it as
    ``np.interp(target, performances, strong_pcts)`` on points sorted by % strong. ``np.interp`` is only
    defined for increasing ``performances``; here we take the first crossing of the piecewise-linear
    curve, which gives the same number whenever performance increases with % strong and stays well defined
    otherwise. Returns NaN when the curve never reaches the target (``np.interp`` would clamp instead).
    """
    x, y = _curve(strong_pcts, performances)
    target = weak_performance + threshold_pct / 100.0 * (strong_performance - weak_performance)
    if y[0] >= target:
        return float(x[0])
    hit = np.flatnonzero((y[:-1] < target) & (y[1:] >= target))
    if hit.size == 0:
        return float("nan")
    i = int(hit[0])
    return float(x[i] + (target - y[i]) * (x[i + 1] - x[i]) / (y[i + 1] - y[i]))


# ---------------------------------------------------------------- RouterBench: AIQ


def quality_cost_hull(costs: ArrayLike, qualities: ArrayLike) -> tuple[FloatArray, FloatArray]:
    """Vertices of the non-decreasing convex hull of (cost, quality) points (RouterBench, Hu et al. 2024).

    Any two operating points can be mixed at random, so every point under the upper concave envelope is
    attainable; paying more never has to lower quality, so past the best-quality vertex the curve stays
    flat. Returns the envelope's vertices from the cheapest point up to the best-quality vertex, sorted by
    cost. Same curve (as an area) as ``get_non_descreasing_convex_hull_of`` in withmartian/routerbench
    ``evaluation/AIQ.py``, which keeps the lifted interior points too; we keep vertices only.
    """
    c = np.asarray(costs, dtype=float)
    q = np.asarray(qualities, dtype=float)
    if c.shape != q.shape or c.ndim != 1 or c.size == 0 or np.isnan(c).any() or np.isnan(q).any():
        raise ValueError("costs and qualities must be equal-length, non-empty, NaN-free 1-D arrays")
    # At equal cost only the best quality can be on the upper envelope.
    uc = np.unique(c)
    uq = np.array([q[c == v].max() for v in uc])
    hull: list[tuple[float, float]] = []
    for pt in zip(uc.tolist(), uq.tolist(), strict=True):  # Andrew's monotone chain, upper half
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            # Drop the middle point when it lies on or under the chord from hull[-2] to pt.
            if (x2 - x1) * (pt[1] - y1) - (y2 - y1) * (pt[0] - x1) >= 0:
                hull.pop()
            else:
                break
        hull.append(pt)
    hx, hy = np.array(hull).T
    peak = int(np.argmax(hy))  # first best vertex; the concave envelope only falls after it
    return hx[: peak + 1], hy[: peak + 1]


def aiq(costs: ArrayLike, qualities: ArrayLike, cost_range: tuple[float, float] | None = None) -> float:
    """Average Improvement in Quality (RouterBench, Hu et al. 2024, sec. 4):

        AIQ = 1 / (c_max - c_min) * integral_{c_min}^{c_max} hull(c) dc

    where ``hull`` is ``quality_cost_hull`` of the router's operating points, extended flat beyond its
    last vertex (as ``calc_AIQ`` in withmartian/routerbench ``evaluation/AIQ.py`` does) and counted as 0
    below its cheapest point (unreachable). ``cost_range`` defaults to the points' own cost range; pass a
    shared range to compare several routers on one scale. RouterBench's code normalises otherwise: see
    ``aiq_routerbench``. A zero-width range returns the hull's quality at that cost.
    """
    hx, hy = quality_cost_hull(costs, qualities)
    c_arr = np.asarray(costs, dtype=float)
    lo, hi = cost_range if cost_range is not None else (float(c_arr.min()), float(c_arr.max()))
    if hi < lo:
        raise ValueError(f"cost_range must be (low, high), got {(lo, hi)}")
    if hi == lo:
        return float(np.interp(lo, hx, hy, left=0.0))
    start = max(lo, float(hx[0]))
    if start >= hi:
        return 0.0
    xs = np.unique(np.r_[start, hx[(hx > start) & (hx < hi)], hi])
    ys = np.interp(xs, hx, hy)  # np.interp holds the last vertex's quality flat to the right
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2.0) / (hi - lo))


def aiq_routerbench(costs: ArrayLike, qualities: ArrayLike) -> float:
    """AIQ as ``calc_AIQ`` in withmartian/routerbench ``evaluation/AIQ.py`` computes it for one router: the area
    under the non-decreasing hull, from its cheapest point, divided by the hull's largest cost. That hull drops
    every point below the one before it but keeps ties, so its largest cost is the dearest point of best
    quality, not the dearest operating point. That is ``aiq`` over ``(0, that cost)``, the stretch below the
    cheapest point counting as 0."""
    c, q = np.asarray(costs, dtype=float), np.asarray(qualities, dtype=float)
    quality_cost_hull(c, q)  # the same checks of the input
    return aiq(c, q, (0.0, float(c[q == q.max()].max())))


# ---------------------------------------------------------------- uncertainty


def bootstrap_ci(
    fn: Callable[..., float], *arrays: ArrayLike, n: int = 1000, seed: int = 0, alpha: float = 0.05
) -> ConfidenceInterval:
    """Percentile bootstrap (Efron & Tibshirani 1993, ch. 13) confidence interval for ``fn(*arrays)``.

    Rows (axis 0) are resampled with replacement, the same rows for every array so paired data stay
    paired; the interval is the ``alpha/2`` and ``1 - alpha/2`` percentiles of ``n`` resampled values.
    Deterministic for a given ``seed``. A resample where ``fn`` is undefined (returns NaN) is left out, and the
    interval is NaN when every one is.
    """
    arrs = [np.asarray(a) for a in arrays]
    if not arrs:
        raise ValueError("bootstrap_ci needs at least one array")
    m = len(arrs[0])
    if m == 0 or any(len(a) != m for a in arrs):
        raise ValueError("arrays must be non-empty and share their first dimension")
    if not 0 < alpha < 1 or n < 1:
        raise ValueError("need 0 < alpha < 1 and n >= 1")
    rng = np.random.default_rng(seed)
    stats = np.empty(n)
    for b in range(n):
        idx = rng.integers(0, m, size=m)
        stats[b] = fn(*(a[idx] for a in arrs))
    stats = stats[~np.isnan(stats)]  # a resample where fn is undefined (NaN) is left out
    if not stats.size:
        return ConfidenceInterval(float(fn(*arrs)), float("nan"), float("nan"))
    low, high = np.percentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return ConfidenceInterval(float(fn(*arrs)), float(low), float(high))
