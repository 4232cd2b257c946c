"""Expert-choice assignment of a batch: each expert takes the queries it scores highest, up to its capacity."""

import numpy as np
import pytest

from router.assign import expert_choice

NAMES = ["math", "code", "law"]


def test_each_expert_takes_its_highest_scoring_queries_up_to_capacity() -> None:
    scores = np.array([[0.9, 0.1, 0.0],
                       [0.8, 0.2, 0.0],
                       [0.7, 0.3, 0.0],
                       [0.1, 0.2, 0.7]])
    # math has room for two: it takes the two queries it scores highest; the third goes to its next choice.
    assert expert_choice(scores, NAMES, {"math": 2, "code": 2, "law": 2}) == ["math", "math", "code", "law"]


def test_a_contested_query_goes_to_the_expert_scoring_it_higher() -> None:
    scores = np.array([[0.6, 0.9, 0.0], [0.5, 0.1, 0.0]])
    assert expert_choice(scores, NAMES, {"math": 1, "code": 1, "law": 0}) == ["code", "math"]


def test_queries_beyond_total_capacity_are_left_unassigned() -> None:
    scores = np.array([[0.5, 0.5, 0.0]] * 3)
    assert expert_choice(scores, NAMES, {"math": 1, "code": 1}) == ["math", "code", None]
    assert expert_choice(np.zeros((2, 3)), NAMES, {}) == [None, None]


def test_no_expert_exceeds_its_capacity_on_random_batches() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.random((50, 3))
        capacity = {n: int(c) for n, c in zip(NAMES, rng.integers(0, 30, 3), strict=True)}
        chosen = expert_choice(scores, NAMES, capacity)
        for name in NAMES:
            assert chosen.count(name) <= capacity[name]
        assert sum(c is not None for c in chosen) == min(50, sum(capacity.values()))


def test_shape_is_checked() -> None:
    with pytest.raises(ValueError, match="scores must be"):
        expert_choice(np.zeros((2, 2)), NAMES, {})
