"""The cold-start claim map (``router.coldstart``): its rows, its validation, and its fit on real embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from router.coldstart import (
    CLAIM_COUNTS,
    ClaimMap,
    SimilarityMap,
    _nearest_per_class,
    fit_claim_map,
)
from router.config import EncoderConfig
from router.encoders import build_encoder
from router.gate_train import MIN_HELD_OUT
from tests.support import snips_first


def test_an_expert_uses_the_row_of_the_largest_count_it_reaches() -> None:
    claims = ClaimMap(((2, 10.0, -5.0, 1.0), (5, 12.0, -6.0, 0.5), (20, 14.0, -7.0, 0.0)))
    assert [claims.weights(n) for n in (1, 2, 4, 5, 19, 20, 500)] == [
        (10.0, -5.0, 1.0), (10.0, -5.0, 1.0), (10.0, -5.0, 1.0), (12.0, -6.0, 0.5), (12.0, -6.0, 0.5),
        (14.0, -7.0, 0.0), (14.0, -7.0, 0.0)]
    assert claims.reads_trained
    s, t = np.array([0.9, 0.3]), np.array([0.2, 0.8])
    r = claims(s, t, 5)
    np.testing.assert_allclose(r, 1 / (1 + np.exp(-(12.0 * s - 6.0 * t + 0.5))))
    assert r[0] > 0.99 and r[1] < 0.5
    with pytest.raises(ValueError, match="nearest trained example"):
        claims(np.array([0.9]), None, 5)
    assert ClaimMap.from_list(claims.as_list()) == claims


def test_the_similarity_only_map_is_the_one_older_artifacts_hold() -> None:
    old = SimilarityMap(13.8, 0.38)
    claims = ClaimMap.from_similarity(old)
    s = np.linspace(-0.2, 1.0, 13)
    for n in (1, 5, 40):
        np.testing.assert_allclose(claims(s, None, n), old(s), rtol=1e-12)
    assert not claims.reads_trained


@pytest.mark.parametrize(("rows", "problem"), [
    ((), "ascending example count"),
    (((5, 1.0, 0.0, 0.0), (2, 1.0, 0.0, 0.0)), "ascending example count"),
    (((2, 1.0, 0.0, 0.0), (2, 3.0, 0.0, 0.0)), "ascending example count"),
    (((0, 1.0, 0.0, 0.0),), "ascending example count"),
    (((1, 2.0, float("nan"), 0.0),), "finite"),
])
def test_a_bad_claim_map_is_refused_naming_the_problem(rows: tuple[tuple[int, float, float, float], ...],
                                                       problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        ClaimMap(rows)


def test_familiarity_grids_follow_the_rows() -> None:
    rows = ((1, 10.0, -5.0, 1.0), (5, 12.0, -6.0, 0.5))
    claims = ClaimMap(rows, ((0.2, 0.4, 0.6), (0.3, 0.5, 0.8)))
    assert [claims.familiar_grid(n) for n in (1, 4, 5, 50)] == [(0.2, 0.4, 0.6), (0.2, 0.4, 0.6),
                                                               (0.3, 0.5, 0.8), (0.3, 0.5, 0.8)]
    assert ClaimMap(rows).familiar_grid(5) is None
    for grids in (((0.2, 0.4),), ((0.2, 0.4), (0.5, 0.3)), ((0.2, 0.4), ())):
        with pytest.raises(ValueError, match="familiarity grids must be one per row"):
            ClaimMap(rows, grids)


@pytest.mark.parametrize(("rows", "problem"), [
    ([[1, 2.0, 0.0]], "4 numbers"),
    ([[float("inf"), 2.0, 0.0, 0.0]], "whole number"),
    ([[1.5, 2.0, 0.0, 0.0]], "whole number"),
    ([["1", 2.0, 0.0, 0.0]], "list of numbers"),
    ([[True, 2.0, 0.0, 0.0]], "list of numbers"),
    ([{"count": 1}], "list of numbers"),
    ([[1, -2.0, 0.0, 0.0]], "similarity weights must be positive"),
])
def test_a_fitted_map_from_gate_json_is_checked(rows: list[object], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        ClaimMap.from_list(rows)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="familiarity grid must be a list of numbers"):
        ClaimMap.from_list([[1, 2.0, 0.0, 0.0]], [["0.1"]])


def test_the_similarity_only_map_takes_an_older_artifact_s_slope_as_written() -> None:
    """Older artifacts were loaded whatever their slope; the s-only map still is (a fitted row never has one)."""
    claims = ClaimMap.from_similarity(SimilarityMap(-3.0, 0.5))
    np.testing.assert_allclose(claims(np.array([0.2]), None, 4), SimilarityMap(-3.0, 0.5)(np.array([0.2])))


def test_the_nearest_example_per_class_leaves_the_query_s_own_row_out() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(40, 8)).astype(np.float32)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    y = rng.integers(0, 3, 40)
    own = np.array([0, 7, 39, -1])
    queries = np.concatenate([ref[own[:3]], rng.normal(size=(1, 8)).astype(np.float32)])
    got = _nearest_per_class(queries, own, ref, y, 4, block=3)
    for i, q in enumerate(queries):
        for c in range(4):
            rows = [j for j in range(40) if y[j] == c and j != own[i]]
            want = max((float(q @ ref[j]) for j in rows), default=-1.0)
            assert got[i, c] == pytest.approx(want, abs=1e-6)
    assert (got[:3] < 0.999).all()  # no query found itself


@pytest.fixture(scope="module")
def snips_embedded(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    snips = snips_first(data_dir, 60, 0)
    labels = sorted({label for _, label in snips["train"]})
    encoder = build_encoder(EncoderConfig(backend="onnx"))
    x = encoder.encode([t for t, _ in snips["train"]])
    return x, np.array([labels.index(label) for _, label in snips["train"]])


def test_the_map_fitted_on_real_queries_favours_the_newcomer_s_examples_and_not_a_trained_expert_s(
        snips_embedded: tuple[np.ndarray, np.ndarray]) -> None:
    """SNIPS, 7 intents, 60 queries each, MiniLM (ONNX): every row weighs the cosine to the newcomer's examples
    up and the cosine to a trained expert's down; with more examples the similarity needed to claim rises."""
    x, y = snips_embedded
    val = np.arange(len(y)) % 5 == 0
    claims, _ = fit_claim_map(x[~val], y[~val], x[val], y[val], 7, min_held_out=MIN_HELD_OUT)
    assert claims is not None
    assert [r[0] for r in claims.rows] == [c for c in CLAIM_COUNTS if c <= 48]
    assert all(r[1] > 3 and r[2] < -3 for r in claims.rows), claims.rows
    # The cosine to its own examples at which a newcomer's claim is even, a trained example 0.5 away: higher with
    # more examples, since their maximum runs higher.
    even = [(-r[3] - r[2] * 0.5) / r[1] for r in claims.rows]
    assert even[-1] > even[0] + 0.05, even
    assert fit_claim_map(x[~val], y[~val], x[val], y[val], 7, min_held_out=MIN_HELD_OUT, seed=0)[0] == claims  # seeded
    # The newcomer's own queries lie nearer its examples the more it has: the familiarity grids' medians rise.
    assert claims.familiar is not None and len(claims.familiar) == len(claims.rows)
    medians = [g[len(g) // 2] for g in claims.familiar]
    assert medians[-1] > medians[0] + 0.1 and all(len(g) == 201 for g in claims.familiar), medians
    # Fewer held-out queries than MIN_HELD_OUT: every example serves, each left out of its own similarities.
    few = np.flatnonzero(val)[:MIN_HELD_OUT - 1]
    rest = np.setdiff1d(np.arange(len(y)), few)
    small, _ = fit_claim_map(x[rest], y[rest], x[few], y[few], 7, min_held_out=MIN_HELD_OUT)
    assert small is not None and all(r[1] > 3 and r[2] < -3 for r in small.rows)


def test_too_little_data_leaves_the_similarity_only_map(snips_embedded: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = snips_embedded
    one = y == 0
    # One class: nothing to tell apart.
    assert fit_claim_map(x[one], y[one], x[one][:0], y[one][:0], 7, min_held_out=MIN_HELD_OUT)[0] is None
    assert fit_claim_map(x[:0], y[:0], x[:0], y[:0], 7, min_held_out=MIN_HELD_OUT)[0] is None


@pytest.fixture(scope="module")
def tiny(data_dir: Path) -> dict[str, list[tuple[str, str]]]:
    return snips_first(data_dir, 6, 40)


@pytest.mark.parametrize("copies", [1, 2])
def test_a_tiny_gate_lets_a_newcomer_own_its_queries_and_no_more(tiny: dict[str, list[tuple[str, str]]],
                                                                  copies: int) -> None:
    """Six SNIPS intents with 6 examples each (too few to hold any out: the map is fitted on every example, each
    left out of its own similarities), a seventh added with 5. Taking a newcomer's examples out of the simulated
    queries must not leave it owning none (it won 0% of its own queries), and a training text given twice must
    not stand as its own nearest neighbour (the newcomer then took 71% of the trained intents' queries)."""
    from router.gate import train_gate

    intents = sorted({label for _, label in tiny["train"]})
    new, trained = intents[0], intents[1:]
    pairs = [(t, label) for t, label in tiny["train"] if label in trained] * copies
    encoder = build_encoder(EncoderConfig(backend="onnx"))
    gate = train_gate([t for t, _ in pairs], [label for _, label in pairs], encoder, experts=trained,
                      progress=False)
    assert gate.metadata.cold_start_claims is not None
    view = gate.for_experts({**{e: [] for e in trained}, new: [t for t, label in tiny["train"] if label == new][:5]})
    texts, y = [t for t, _ in tiny["test"]], np.array([label for _, label in tiny["test"]])
    top = np.array(view.experts)[view.predict_proba(encoder.encode(texts), texts).argmax(axis=1)]
    own = y == new
    assert (top[own] == new).mean() >= 0.3
    assert (top[~own] == new).mean() <= 0.1


def test_a_newcomer_s_repeated_examples_count_once(tiny: dict[str, list[tuple[str, str]]]) -> None:
    """One example given 30 times (or in other cases and spacings) counted as 30: the newcomer was read as well
    covered, its claims judged by the 30-example row, and it took fewer of its own queries (23 of 60 Banking77
    queries where one copy took 53, in a review's run)."""
    from router.gate import train_gate

    intents = sorted({label for _, label in tiny["train"]})
    new, trained = intents[0], intents[1:]
    pairs = [(t, label) for t, label in tiny["train"] if label in trained]
    encoder = build_encoder(EncoderConfig(backend="onnx"))
    gate = train_gate([t for t, _ in pairs], [label for _, label in pairs], encoder, experts=trained,
                      progress=False)
    example = next(t for t, label in tiny["train"] if label == new)
    once = gate.for_experts({**{e: [] for e in trained}, new: [example]})
    again = gate.for_experts({**{e: [] for e in trained},
                              new: [example] * 20 + [f"  {example.upper()} ", example.lower()] * 5})
    texts = [t for t, _ in tiny["test"]]
    x = encoder.encode(texts)
    assert np.allclose(once.predict_proba(x, texts), again.predict_proba(x, texts))
    assert again.example_texts.count(example) == 1
