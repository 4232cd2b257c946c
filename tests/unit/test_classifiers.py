"""The gate's classifiers on small hand-made data: what each computes, and that arrays round-trip exactly."""

from __future__ import annotations

import numpy as np
import pytest

from router.classifiers import (
    CLASSIFIERS,
    EnsembleClassifier,
    KNNClassifier,
    LexicalClassifier,
    LogisticClassifier,
    Queries,
    build_classifier,
    pack_strings,
    unpack_strings,
    word_ngrams,
)
from router.gate import fit_ood, ood_score

TEXTS = ["integrate the function over the interval", "solve the quadratic equation for x",
         "derivative of a polynomial function", "the court ruled the contract void",
         "the defendant appealed the verdict", "statute of limitations for a contract claim",
         "photosynthesis in plant cells", "dna replication in the cell nucleus"]
LABELS = np.array([0, 0, 0, 1, 1, 1, 2, 2])


def unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def queries(texts: list[str], seed: int = 0) -> Queries:
    return Queries(texts, unit_rows(len(texts), 16, seed))


def test_word_ngrams_match_scikit_learns_default_analyzer() -> None:
    from sklearn.feature_extraction.text import TfidfVectorizer

    reference = TfidfVectorizer(ngram_range=(1, 2), strip_accents="unicode").build_analyzer()
    for text in ["Café au lait, s'il vous plaît!", "The E. coli bacterium (K-12) grows at 37°C", "a b cd"]:
        assert word_ngrams(text) == reference(text)


def test_lexical_logits_equal_scikit_learns_pipeline() -> None:
    """Serving computes TF-IDF and the dot product by hand; it must equal the fitted sklearn pipeline."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    clf = LexicalClassifier(c=30.0, balance="none")
    clf.fit(queries(TEXTS), LABELS, 3)
    vec = TfidfVectorizer(ngram_range=(1, 2), strip_accents="unicode", sublinear_tf=True)
    model = LogisticRegression(C=30.0, max_iter=3000, random_state=0).fit(vec.fit_transform(TEXTS), LABELS)
    probe = ["the contract was void, said the court", "cell division and dna", "nothing known here"]
    np.testing.assert_allclose(clf.predict_logits(queries(probe)), model.decision_function(vec.transform(probe)),
                               rtol=1e-4, atol=1e-4)
    assert list(clf.predict_logits(queries(probe)).argmax(axis=1)[:2]) == [1, 2]
    # A text with no known term scores the intercepts alone.
    np.testing.assert_allclose(clf.predict_logits(queries(["zzz"]))[0], clf.intercept)


@pytest.mark.parametrize("balance", ["none", "prior"])
def test_knn_votes_are_similarity_weighted_by_hand(balance: str) -> None:
    x = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], dtype=np.float32)
    clf = KNNClassifier(k=2, temperature=0.1, balance=balance)
    clf.fit(Queries(["a", "b", "c"], x), np.array([0, 1, 1]), 3)
    logits = clf.predict_logits(Queries(["q"], np.array([[1.0, 0.0]], dtype=np.float32)))
    # Nearest: row 0 (cos 1.0, label 0) and row 1 (cos 0.8, label 1); weights exp(0/0.1) : exp(-0.2/0.1), each
    # divided by its label's share of the examples (1/3 and 2/3) when balanced.
    w0, w1 = (1.0, np.exp(-2.0)) if balance == "none" else (1.0 / (1 / 3), np.exp(-2.0) / (2 / 3))
    votes = np.array([w0 / (w0 + w1), w1 / (w0 + w1), 0.0]) + KNNClassifier.FLOOR
    np.testing.assert_allclose(np.exp(logits[0]), votes / votes.sum(), rtol=1e-5)


def test_ensemble_is_the_mean_of_its_members_probabilities() -> None:
    q, probe = queries(TEXTS, 1), queries(["solve for x in the equation", "appeal the verdict"], 2)
    members = [LogisticClassifier(), KNNClassifier(k=3), LexicalClassifier()]
    ens = EnsembleClassifier(members)
    ens.fit(q, LABELS, 3)
    probs = []
    for m in members:
        z = m.predict_logits(probe)
        e = np.exp(z - z.max(axis=1, keepdims=True))
        probs.append(e / e.sum(axis=1, keepdims=True))
    np.testing.assert_allclose(np.exp(ens.predict_logits(probe)), np.mean(probs, axis=0), rtol=1e-5)
    assert ens.reads_text and not LogisticClassifier.reads_text and not KNNClassifier.reads_text


@pytest.mark.parametrize("kind", sorted(CLASSIFIERS))
def test_every_classifier_round_trips_through_plain_arrays(kind: str) -> None:
    clf = build_classifier(kind, seed=0)
    clf.fit(queries(TEXTS, 3), LABELS, 4)  # class 3 has no examples
    arrays = clf.arrays()
    assert all(isinstance(v, np.ndarray) and v.dtype != object for v in arrays.values())
    restored = CLASSIFIERS[kind].from_arrays(arrays)
    probe = queries(["the verdict on the contract", "plant cells"], 4)
    np.testing.assert_array_equal(restored.predict_logits(probe), clf.predict_logits(probe))
    assert restored.predict_logits(probe).shape == (2, 4)


def test_a_cold_start_of_one_example_per_expert_fits_without_sklearns_regression_guess() -> None:
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        texts = [f"{t} ({i})" for i in range(3) for t in TEXTS]  # 24 examples of 16 experts, one or two each
        LogisticClassifier().fit(queries(texts, 5), np.arange(len(texts)) % 16, 16)
    assert [str(w.message) for w in caught] == []


def test_unknown_classifier_kind_is_named() -> None:
    with pytest.raises(ValueError, match=r"unknown classifier 'svm'; known: ensemble, knn, lexical, logistic"):
        build_classifier("svm")


@pytest.mark.parametrize("kind", ["logistic", "lexical", "knn", "ensemble"])
def test_balance_prior_divides_the_training_share_out(kind: str) -> None:
    """``balance: prior`` (the default): a class's share of the examples is no prior. The logistic members' logits
    are the unbalanced ones minus log(share), a kNN vote is divided by its class's share; with equal classes it
    changes nothing; it survives the artifact's arrays."""
    from router.classifiers import class_shares

    texts, labels = [*TEXTS, *TEXTS[:3] * 6], np.r_[LABELS, np.zeros(18, dtype=np.int64)]  # class 0: 21 of 26
    x = Queries(texts, unit_rows(len(texts), 16, 0))
    probe = queries(["the court and the cell", "an equation"], seed=5)
    prior, plain = build_classifier(kind), build_classifier(kind, balance="none")
    prior.fit(x, labels, 3)
    plain.fit(x, labels, 3)
    shares = class_shares(labels, 3)
    np.testing.assert_allclose(shares, [21 / 26, 3 / 26, 2 / 26])
    if kind in ("logistic", "lexical"):
        np.testing.assert_allclose(prior.predict_logits(probe), plain.predict_logits(probe) - np.log(shares),
                                   rtol=1e-4, atol=1e-4)
    # the minority classes gain on the majority, for every probe
    gain = _softmax_np(prior.predict_logits(probe)) - _softmax_np(plain.predict_logits(probe))
    assert (gain[:, 0] <= 1e-6).all() and (gain[:, 1:].sum(axis=1) >= -1e-6).all()
    loaded = type(prior).from_arrays(prior.arrays())
    np.testing.assert_allclose(loaded.predict_logits(probe), prior.predict_logits(probe), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="balance 'weights': expected one of prior, none"):
        build_classifier(kind, balance="weights")
    if kind != "ensemble":  # equal classes: nothing to divide out
        even_prior, even_plain = build_classifier(kind), build_classifier(kind, balance="none")
        even_prior.fit(queries(TEXTS[:6]), np.array([0, 0, 0, 1, 1, 1]), 2)
        even_plain.fit(queries(TEXTS[:6]), np.array([0, 0, 0, 1, 1, 1]), 2)
        np.testing.assert_allclose(_softmax_np(even_prior.predict_logits(probe)),
                                   _softmax_np(even_plain.predict_logits(probe)), rtol=1e-4, atol=1e-5)


def _softmax_np(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def test_lexical_member_reads_a_long_texts_first_characters_only() -> None:
    """A 50 MB training line is read for its first MAX_CHARS characters, in training and serving alike: terms
    past them are not in the vocabulary, and a long query scores as its head does."""
    head = "the court ruled the contract void "
    long = head * (LexicalClassifier.MAX_CHARS // len(head)) + " photosynthesis " * 100_000
    clf = LexicalClassifier(c=30.0)
    clf.fit(queries([*TEXTS, long]), np.r_[LABELS, 1], 3)
    assert "photosynthesis" in clf.vocabulary  # from the short biology texts
    assert "photosynthesis photosynthesis" not in clf.vocabulary  # the long text's tail was never read
    cut = long[:LexicalClassifier.MAX_CHARS]
    np.testing.assert_allclose(clf.predict_logits(queries([long])), clf.predict_logits(queries([cut])))


def test_lexical_member_abstains_when_no_term_survives() -> None:
    clf = LexicalClassifier()
    clf.fit(queries(["a", "b", "c", "d"]), np.array([0, 0, 1, 1]), 2)
    np.testing.assert_array_equal(clf.predict_logits(queries(["a b"])), np.zeros((1, 2)))


def test_strings_pack_and_unpack() -> None:
    strings = ["", "ünïcode ✓", "plain", "line\nbreak"]
    assert unpack_strings(*pack_strings(strings)) == strings
    assert unpack_strings(*pack_strings([])) == []


def test_ood_score_is_a_mid_rank_percentile_of_both_signals() -> None:
    top = np.full(100, 0.99)  # a saturated signal: every validation query has the same top probability
    sims = np.linspace(0.3, 0.9, 100)
    reference = np.concatenate([unit_rows(50, 8, 5)])
    held = reference[:20] * 0.9 + unit_rows(20, 8, 6) * 0.1
    held /= np.linalg.norm(held, axis=1, keepdims=True)
    grids, threshold = fit_ood(top[:20], reference, held, keep=0.9)
    assert grids is not None and threshold is not None and len(grids) == 2
    scores = ood_score(top[:20], np.max(held @ reference.T, axis=1), grids)
    assert np.mean(scores >= threshold) >= 0.9
    # Tied at the saturated value: half the percentile mass, not 0; below every grid point: 0.
    grids = [[0.99] * 5, [0.3, 0.45, 0.6, 0.75, 0.9]]
    np.testing.assert_allclose(ood_score(np.array([0.99, 0.5]), np.array([0.6, 0.2]), grids), [(0.5 + 0.5) / 2, 0.0])
    # Without grids the score is the cosine itself (outcome gates, older artifacts).
    np.testing.assert_array_equal(ood_score(top[:3], sims[:3], None), sims[:3])
    assert fit_ood(top[:0], reference, held[:0]) == (None, None)
