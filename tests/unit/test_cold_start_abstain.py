"""The gate as an operator drives it through the config, on a real MiniLM gate trained on SNIPS.

Adding an expert from a handful of config ``examples`` (cold start) must not make the trained experts' own
queries less familiar: the abstain threshold keeps ``OOD_KEEP`` of in-distribution queries, and it was fitted
on the trained classifier's probabilities, which the cold-start claims scale down.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from router.config import EncoderConfig
from router.encoders import Encoder, build_encoder
from router.gate import Gate, GateArtifactMismatch, train_gate
from tests.support import snips_first

TRAINED = ["AddToPlaylist", "BookRestaurant", "GetWeather", "RateBook", "SearchCreativeWork"]
COLD = ["PlayMusic", "SearchScreeningEvent"]
PER_INTENT_TRAIN, PER_INTENT_TEST, COLD_EXAMPLES = 100, 40, 5


@pytest.fixture(scope="module")
def snips(data_dir: Path) -> dict[str, list[tuple[str, str]]]:
    return snips_first(data_dir, PER_INTENT_TRAIN, PER_INTENT_TEST)


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return build_encoder(EncoderConfig(backend="onnx"))


@pytest.fixture(scope="module")
def gate(snips: dict[str, list[tuple[str, str]]], encoder: Encoder) -> Gate:
    pairs = [(t, label) for t, label in snips["train"] if label in TRAINED]
    texts, labels = zip(*pairs, strict=True)
    return train_gate(texts, labels, encoder, experts=TRAINED, progress=False)


def test_adding_experts_by_config_keeps_the_trained_experts_queries_as_familiar(
        gate: Gate, snips: dict[str, list[tuple[str, str]]]) -> None:
    cold = {n: [t for t, label in snips["train"] if label == n][:COLD_EXAMPLES] for n in COLD}
    view = gate.for_experts({**{e: [] for e in TRAINED}, **cold})
    assert view.experts == [*TRAINED, *COLD]
    texts = [t for t, label in snips["test"] if label in TRAINED]
    before, after = gate.assess(texts), view.assess(texts)
    threshold = gate.ood_threshold
    assert threshold is not None and view.ood_threshold == threshold
    # The new experts take a share of every row, so the trained experts' top probability falls ...
    assert np.median(after.probs.max(axis=1)) < np.median(before.probs.max(axis=1)) - 0.02
    # ... but their queries are as familiar as before: the nearest example can only get nearer, and the top
    # probability judged is the one the threshold was fitted on.
    assert (after.ood >= before.ood - 1e-12).all()
    assert (after.ood < threshold).sum() <= (before.ood < threshold).sum()
    # Without experts added, the familiarity is the row's own top probability, as before.
    plain = gate.for_experts({e: [] for e in reversed(TRAINED)})
    np.testing.assert_allclose(plain.assess(texts).ood, before.ood)


def _routed(view: Gate, texts: list[str]) -> np.ndarray:
    return np.array(view.experts)[view.assess(texts).probs.argmax(axis=1)]


def test_a_newcomer_with_more_examples_takes_its_own_queries_not_the_trained_experts(
        gate: Gate, snips: dict[str, list[tuple[str, str]]]) -> None:
    """The two cold intents added with 3, 10 and 20 examples each. Their claims read the query's nearest trained
    example too, with weights fitted per example count: a query nearer a trained expert's example stays with it.
    (The similarity-only map, fitted with 5 examples, took 12%, 23% and 28% of the trained intents' queries.)"""
    texts = [t for t, _ in snips["test"]]
    y = np.array([label for _, label in snips["test"]])
    trained, own = np.isin(y, TRAINED), np.isin(y, COLD)
    for n in (3, 10, 20):
        cold = {c: [t for t, label in snips["train"] if label == c][:n] for c in COLD}
        top = _routed(gate.for_experts({**{e: [] for e in TRAINED}, **cold}), texts)
        assert np.isin(top[trained], COLD).mean() <= 0.03, n
        assert (top[own] == y[own]).mean() >= 0.6, n
        assert (top == y)[trained | own].mean() >= 0.88, n


def test_the_claims_and_the_explanation_share_one_search(gate: Gate, snips: dict[str, list[tuple[str, str]]],
                                                          encoder: Encoder) -> None:
    """``assess`` searches once for the nearest examples and the nearest trained one; its probabilities are
    ``predict_proba``'s, and its neighbours ``nearest_many``'s, cold-start examples among them."""
    cold = {c: [t for t, label in snips["train"] if label == c][:COLD_EXAMPLES] for c in COLD}
    view = gate.for_experts({**{e: [] for e in TRAINED}, **cold})
    texts = [t for t, _ in snips["test"]]
    assessed = view.assess(texts, k=3)
    x = encoder.encode(texts)
    np.testing.assert_allclose(assessed.probs, view.predict_proba(x, texts), rtol=0, atol=1e-12)
    assert assessed.nearest == view.nearest_many(x, 3)
    assert {n.label for near in assessed.nearest for n in near} >= set(COLD)


def test_an_artifact_without_a_fitted_claim_map_claims_by_similarity_alone(
        gate: Gate, snips: dict[str, list[tuple[str, str]]], encoder: Encoder, tmp_path: Path) -> None:
    """A gate saved before the fitted map (no ``cold_start_claims`` in gate.json) routes a newcomer as it did:
    by ``sigmoid(slope * (s - midpoint))`` of the cosine to its examples, whatever their number."""
    import json

    from router.coldstart import SimilarityMap

    assert gate.metadata.cold_start_claims is not None
    gate.save(tmp_path / "g")
    assert Gate.load(tmp_path / "g", encoder).metadata == gate.metadata
    doc = json.loads((tmp_path / "g" / "gate.json").read_text(encoding="utf-8"))
    # As written before the fields (and without its self-digest, as an artifact written by hand).
    del doc["cold_start_claims"], doc["cold_start_familiar"], doc["cold_start_offsets"], doc["manifest_sha256"]
    (tmp_path / "g" / "gate.json").write_text(json.dumps(doc), encoding="utf-8")
    older = Gate.load(tmp_path / "g", encoder)
    assert older.metadata.cold_start_claims is None
    examples = [t for t, label in snips["train"] if label == COLD[0]][:10]
    view = older.for_experts({**{e: [] for e in TRAINED}, COLD[0]: examples})
    texts = [t for t, _ in snips["test"]][:60]
    x = encoder.encode(texts)
    r = SimilarityMap(gate.metadata.cold_start_slope, gate.metadata.cold_start_midpoint)(
        (x @ encoder.encode(examples).T).max(axis=1))
    np.testing.assert_allclose(view.predict_proba(x, texts)[:, -1], r, rtol=1e-6)
    doc["cold_start_claims"] = [[3, 1.0, 0.0, 0.0], [1, 1.0, 0.0, 0.0]]
    (tmp_path / "g" / "gate.json").write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(GateArtifactMismatch, match=r"gate\.json: cold_start_claims/_familiar/_offsets: .*ascending"):
        Gate.load(tmp_path / "g", encoder)
    doc["cold_start_claims"], doc["cold_start_familiar"] = [[1, 1.0, 0.0, 0.0]], [[0.5, 0.2]]
    (tmp_path / "g" / "gate.json").write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(GateArtifactMismatch, match=r"_familiar/_offsets: .*familiarity grids .* ascending"):
        Gate.load(tmp_path / "g", encoder)
    doc["cold_start_familiar"], doc["cold_start_offsets"] = None, {"Nobody": 0.1}
    (tmp_path / "g" / "gate.json").write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(GateArtifactMismatch, match=r"offsets must map the artifact's experts to finite numbers"):
        Gate.load(tmp_path / "g", encoder)
    # An older artifact is loaded as it was written, whatever its s-only map says.
    del doc["cold_start_claims"], doc["cold_start_familiar"], doc["cold_start_offsets"]
    doc["cold_start_slope"] = -2.0
    (tmp_path / "g" / "gate.json").write_text(json.dumps(doc), encoding="utf-8")
    assert Gate.load(tmp_path / "g", encoder).metadata.cold_start_slope == -2.0


def test_a_trained_expert_with_few_examples_keeps_its_queries_from_a_newcomer(
        snips: dict[str, list[tuple[str, str]]], encoder: Encoder) -> None:
    """One trained intent with 8 examples beside four with 100: its queries lie far from its few examples, so
    the nearest-trained-example cosine alone made them look like nobody's and a newcomer took them (17.5% and 15%
    here). The claim lifts that cosine for an expert with few examples, by how much lower its own queries reach
    in the simulated cold starts (``cold_start_offsets``)."""
    texts = [t for t, _ in snips["test"]]
    y = np.array([label for _, label in snips["test"]])
    taken = []
    for small, newcomer in (("AddToPlaylist", "PlayMusic"), ("SearchCreativeWork", "SearchScreeningEvent")):
        pairs = [(t, label) for t, label in snips["train"] if label in TRAINED and label != small]
        pairs += [(t, label) for t, label in snips["train"] if label == small][:8]
        gate = train_gate([t for t, _ in pairs], [label for _, label in pairs], encoder, experts=TRAINED,
                          progress=False)
        assert list(gate.metadata.cold_start_offsets or {}) == [small]
        view = gate.for_experts({**{e: [] for e in TRAINED},
                                 newcomer: [t for t, label in snips["train"] if label == newcomer][:10]})
        top = _routed(view, texts)
        taken.append((top[y == small] == newcomer).mean())
        assert (top[y == newcomer] == newcomer).mean() >= 0.6
    assert np.mean(taken) <= 0.06, taken


@pytest.mark.parametrize("kept", [TRAINED[2:3], TRAINED[1:3]])
def test_removing_trained_experts_keeps_out_of_scope_queries_out_of_scope(
        gate: Gate, snips: dict[str, list[tuple[str, str]]], kept: list[str]) -> None:
    """With one trained expert kept, the view's renormalised top probability was 1 for every query, so nothing
    was out of scope: queries of every removed domain, and ones unlike any, went to the kept expert. The
    familiarity now judges the artifact's own probability: the kept experts' queries stay as familiar as with
    every expert, and the removed domains' queries are out of this deployment's scope."""
    view = gate.for_experts({e: [] for e in kept})
    threshold = gate.ood_threshold
    assert threshold is not None
    mine = [t for t, label in snips["test"] if label in kept]
    removed = [t for t, label in snips["test"] if label in TRAINED and label not in kept]
    unlike = ["The light reactions of photosynthesis supply the Calvin cycle with which of the following?",
              "Which of the following is the body cavity that contains the pituitary gland?",
              "A state law requires that all persons seeking a license to practise medicine pass an examination."]
    full, served = gate.assess(mine), view.assess(mine)
    # never more familiar than to the whole gate (the removed experts' examples and probabilities are not read),
    # and about as often in scope
    assert (served.ood <= full.ood + 1e-12).all()
    assert (served.ood < threshold).mean() <= (full.ood < threshold).mean() + 0.05
    assert (view.assess(removed).ood < threshold).mean() > 0.8
    assert (view.assess(unlike).ood < threshold).all()

