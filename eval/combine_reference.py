"""A reference for answer combination: a stacked classifier over *every* pool model's recorded answer.

The served combiners (``router.combine``) vote over a routed panel of a few experts, with weights that are a
linear function of who answered what. This reference drops both limits, at a cost no deployment would pay: it
reads every model of the pool (31 calls per query on MMLU-Pro) and scores each candidate answer with a
gradient-boosted classifier that can learn interactions (model A is right when model B agrees with it, or
wrong whenever it gives one letter). It tells how much room the recorded answers leave above the served vote:
when this reference is not above a target either, no way of combining these answers reaches it.

For each question, the candidates are the distinct letters the models gave. Each candidate is described by:

- which models gave it (one indicator per model);
- how many models gave it, and the summed log-odds of their accuracy on the fit questions;
- for each model that gave it, how much longer or shorter than that model's median its answer was
  (``router.vote_weights.length_feature``; 0 for a model that did not give it);
- the letter itself (position bias).

A classifier (``sklearn.ensemble.HistGradientBoostingClassifier``, fixed settings, not tuned) learns on the
fit questions whether a candidate is the right answer; on a scored question the candidate with the highest
probability is the answer. A question where no model gave a letter gets none (-1).
"""

from __future__ import annotations

import numpy as np

from router.vote_weights import length_feature

__all__ = ["GBDT_SETTINGS", "candidate_features", "stacked_letters"]

# Fixed, not tuned: 300 shallow trees with a small step, as a sound default for ~40,000 tabular rows.
GBDT_SETTINGS = {"max_iter": 300, "learning_rate": 0.05, "max_leaf_nodes": 15, "l2_regularization": 1.0}


def candidate_features(onehot: np.ndarray, lengths: np.ndarray, logodds: np.ndarray) -> np.ndarray:
    """``[n, L, 2m + 3]`` features of each of the ``L`` candidate letters of ``n`` questions.

    ``onehot`` ``[n, m, L]``: each model's letter (all zero: no answer); ``lengths`` ``[n, m]``: each answer's
    length feature (NaN: unknown, taken as the median's 0); ``logodds`` ``[m]``: each model's fit accuracy as
    log-odds."""
    n, _, n_letters = onehot.shape
    gave = onehot.transpose(0, 2, 1).astype(float)  # [n, L, m]
    return np.concatenate([
        gave,
        gave.sum(axis=2, keepdims=True),
        (gave * logodds).sum(axis=2, keepdims=True),
        gave * np.nan_to_num(lengths)[:, None, :],
        np.broadcast_to(np.arange(n_letters, dtype=float)[None, :, None], (n, n_letters, 1)),
    ], axis=2)


def stacked_letters(onehot: np.ndarray, chars: np.ndarray, gold: np.ndarray, fit: np.ndarray,
                    rows: np.ndarray, seed: int = 0) -> np.ndarray:
    """The reference's letter index for each of ``rows`` (-1: no model answered), learned on ``fit``.

    ``onehot`` ``[n, m, L]`` every question's recorded letters, ``chars`` ``[n, m]`` the answers' lengths in
    characters (NaN: unknown), ``gold`` ``[n]`` the right letters' indices (only ``fit``'s are read)."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    answered = onehot.max(axis=2) > 0
    right = onehot[fit][np.arange(len(fit)), :, gold[fit]] > 0  # [fit, m]; no answer counts as wrong
    accuracy = np.clip(right.mean(axis=0), 1e-3, 1 - 1e-3)
    logodds = np.log(accuracy / (1 - accuracy))
    known = answered[fit] & np.isfinite(chars[fit])
    medians = np.array([np.median(chars[fit][known[:, j], j]) if known[:, j].any() else np.nan
                        for j in range(onehot.shape[1])])
    lengths = length_feature(chars, medians)

    def features(subset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return candidate_features(onehot[subset], lengths[subset], logodds), onehot[subset].sum(axis=1) > 0

    x_fit, cand_fit = features(fit)
    x_rows, cand_rows = features(rows)
    target = (np.arange(onehot.shape[2])[None, :] == gold[fit][:, None])[cand_fit]
    ranked = np.where(cand_rows, 0.0, -np.inf)
    if target.any() and not target.all() and cand_rows.any():  # one class only: every candidate scores alike
        model = HistGradientBoostingClassifier(**GBDT_SETTINGS, random_state=seed).fit(x_fit[cand_fit], target)
        ranked[cand_rows] = model.predict_proba(x_rows[cand_rows])[:, 1]
    return np.where(cand_rows.any(axis=1), ranked.argmax(axis=1), -1)
