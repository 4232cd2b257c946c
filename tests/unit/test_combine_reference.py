"""``eval.combine_reference``: the stacked classifier over every model's answer learns what a vote cannot."""

from __future__ import annotations

import numpy as np

from eval.combine_reference import candidate_features, stacked_letters
from router.vote_weights import fit_vote_weights


def _u_shaped(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two models over four letters. Model 0 answers short, medium or long (10, 100, 1000 characters, a third
    each) and is right when short or long; model 1 (always 100 characters) is right exactly when model 0 is
    wrong. Each wrong answer is another letter. No weighted vote, even with a length term, can tell the cases
    apart: model 0's length matters in a U shape, not in one direction."""
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, 4, n)
    wrong = (gold + rng.integers(1, 4, n)) % 4
    size = rng.integers(0, 3, n)  # 0 short, 1 medium, 2 long
    first_right = size != 1
    onehot = np.zeros((n, 2, 4), dtype=np.float32)
    onehot[np.arange(n), 0, np.where(first_right, gold, wrong)] = 1
    onehot[np.arange(n), 1, np.where(first_right, wrong, gold)] = 1
    chars = np.stack([np.array([10.0, 100.0, 1000.0])[size], np.full(n, 100.0)], axis=1)
    return onehot, chars, gold


def test_learns_an_interaction_no_weighted_vote_can_express() -> None:
    onehot, chars, gold = _u_shaped(1200, seed=0)
    fit, test = np.arange(900), np.arange(900, 1200)
    letters = stacked_letters(onehot, chars, gold, fit, test, seed=0)
    accuracy = float(np.mean(letters == gold[test]))
    best_single = max(float(np.mean(onehot[test, j].argmax(axis=1) == gold[test])) for j in range(2))
    assert best_single < 0.72 and accuracy > 0.97
    # The learned vote with its length term, fitted on the same records, stays near the best single model.
    weights = fit_vote_weights([["ABCD"[int(a)] for a in row] for row in onehot[fit].argmax(axis=2)],
                               ["ABCD"[int(g)] for g in gold[fit]], ["m0", "m1"], l2=1.0,
                               lengths=chars[fit].tolist())
    counted = weights.counted(chars[test])
    voted = np.where(counted[:, 0] > counted[:, 1], onehot[test, 0].argmax(axis=1), onehot[test, 1].argmax(axis=1))
    assert float(np.mean(voted == gold[test])) < 0.72


def test_a_question_nobody_answered_gets_no_letter() -> None:
    onehot, chars, gold = _u_shaped(400, seed=1)
    onehot[-1] = 0
    chars[-1] = np.nan
    letters = stacked_letters(onehot, chars, gold, np.arange(300), np.arange(300, 400), seed=0)
    assert letters[-1] == -1 and (letters[:-1] >= 0).all()


def test_one_class_fit_scores_every_candidate_alike() -> None:
    # Every fit candidate is right (the models always agree with the key): nothing to learn, no error.
    onehot = np.zeros((20, 2, 4), dtype=np.float32)
    gold = np.arange(20) % 4
    onehot[np.arange(20), :, gold] = 1
    letters = stacked_letters(onehot, np.full((20, 2), 50.0), gold, np.arange(15), np.arange(15, 20))
    assert list(letters) == list(gold[15:])


def test_candidate_features_describe_who_gave_each_letter() -> None:
    onehot = np.zeros((1, 3, 4), dtype=np.float32)
    onehot[0, 0, 2] = onehot[0, 1, 2] = onehot[0, 2, 0] = 1  # models 0 and 1 gave C, model 2 gave A
    lengths = np.array([[0.5, np.nan, -1.0]])
    f = candidate_features(onehot, lengths, np.array([1.0, 2.0, -0.5]))
    assert f.shape == (1, 4, 2 * 3 + 3)
    assert list(f[0, 2, :3]) == [1, 1, 0] and f[0, 2, 3] == 2 and f[0, 2, 4] == 3.0
    assert list(f[0, 2, 5:8]) == [0.5, 0.0, 0.0] and f[0, 2, 8] == 2  # NaN length: the median's 0
    assert list(f[0, 0, :5]) == [0, 0, 1, 1, -0.5] and f[0, 0, 7] == -1.0
    assert not f[0, 1, :8].any() and f[0, 1, 8] == 1  # nobody gave B
