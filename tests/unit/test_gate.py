"""The learned gate on real labelled data (SNIPS, 7 intents): accuracy, calibration, artifact round trip."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from router.config import EncoderConfig
from router.encoders import Encoder, build_encoder
from router.gate import (
    CV_FOLDS,
    UNSEEN_PRIOR,
    Gate,
    GateArtifactMismatch,
    cross_validation_folds,
    expected_calibration_error,
    fit_temperature,
    split_train_val,
    train_gate,
    training_data_sha256,
)
from tests.doubles.fakes import FakeHashingEncoder
from tests.support import snips_first

PER_INTENT_TRAIN, PER_INTENT_TEST = 200, 50


class FakeLookupEncoder(Encoder):
    """Replays vectors a real encoder made, so extra trainings in these tests cost no model time."""

    def __init__(self, real: Encoder, texts: Sequence[str], vectors: np.ndarray, identity: str | None = None,
                 checksum: str | None = None) -> None:
        self.identity = identity or real.identity
        self.checksum = checksum or real.checksum
        self._rows = {t: v for t, v in zip(texts, vectors, strict=True)}

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return np.array([self._rows[t] for t in texts], dtype=np.float32).reshape(len(texts), 384)


@pytest.fixture(scope="module")
def snips(data_dir: Path) -> dict[str, list[tuple[str, str]]]:
    """The first 200 training and 50 test queries of each SNIPS intent, as (text, intent)."""
    return snips_first(data_dir, PER_INTENT_TRAIN, PER_INTENT_TEST)


@pytest.fixture(scope="module")
def experts(snips: dict[str, list[tuple[str, str]]]) -> list[str]:
    return sorted({label for _, label in snips["train"]})


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return build_encoder(EncoderConfig(backend="onnx"))


@pytest.fixture(scope="module")
def gate(snips: dict[str, list[tuple[str, str]]], experts: list[str], encoder: Encoder) -> Gate:
    texts, labels = zip(*snips["train"], strict=True)
    return train_gate(texts, labels, encoder, experts=experts, progress=False)


@pytest.fixture(scope="module")
def lookup(snips: dict[str, list[tuple[str, str]]], gate: Gate) -> FakeLookupEncoder:
    return FakeLookupEncoder(gate.encoder, gate.example_texts, gate.example_embeddings)


@pytest.fixture(scope="module")
def test_set(snips: dict[str, list[tuple[str, str]]], experts: list[str],
             encoder: Encoder) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(embeddings, expert index, texts) of the test queries."""
    texts = [t for t, _ in snips["test"]]
    return encoder.encode(texts), np.array([experts.index(label) for _, label in snips["test"]]), texts


def test_the_default_classifier_needs_the_query_text(gate: Gate, test_set: tuple[np.ndarray, np.ndarray, list[str]]
                                                     ) -> None:
    assert gate.metadata.classifier == "ensemble"
    with pytest.raises(ValueError, match="'ensemble' classifier reads the query text"):
        gate.predict_proba(test_set[0])


def test_gate_beats_chance_by_far_on_held_out_queries(gate: Gate,
                                                      test_set: tuple[np.ndarray, np.ndarray, list[str]]) -> None:
    x, y, texts = test_set
    accuracy = float((gate.predict_proba(x, texts).argmax(axis=1) == y).mean())
    # Chance is 1/7. Measured 0.96-0.97 on SNIPS's test split and on the validation split; 0.90 leaves margin.
    assert accuracy >= 0.90, accuracy
    metrics = gate.metadata.metrics
    assert metrics.accuracy is not None and metrics.accuracy >= 0.90
    assert metrics.n_train + metrics.n_val == 7 * PER_INTENT_TRAIN
    assert 0.10 < metrics.n_val / (7 * PER_INTENT_TRAIN) < 0.20
    assert (metrics.calibration, metrics.n_calibration) == ("held-out", metrics.n_val)


def test_probabilities_are_distributions(gate: Gate, test_set: tuple[np.ndarray, np.ndarray, list[str]]) -> None:
    p = gate.predict_proba(test_set[0], test_set[2])
    assert p.shape == (len(test_set[0]), 7)
    assert (p >= 0).all()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-9)
    one = gate.scores(["play some jazz on spotify"])
    assert one.shape == (1, 7) and gate.experts[int(one.argmax())] == "PlayMusic"


def test_temperature_does_not_increase_validation_nll(gate: Gate) -> None:
    m = gate.metadata.metrics
    assert m.nll_before is not None and m.nll_after is not None and m.ece_after is not None
    assert m.nll_after <= m.nll_before
    assert 0.0 <= m.ece_after <= 1.0
    assert gate.temperature > 0


def test_fit_temperature_undoes_known_overconfidence() -> None:
    rng = np.random.default_rng(0)
    true_logits = rng.normal(scale=2.0, size=(4000, 5))
    y = np.array([rng.choice(5, p=p) for p in np.exp(true_logits) / np.exp(true_logits).sum(1, keepdims=True)])
    t = fit_temperature(3.0 * true_logits, y)
    assert 2.7 < t < 3.3
    over = np.exp(3.0 * true_logits)
    fixed = np.exp(3.0 * true_logits / t)
    assert expected_calibration_error(fixed / fixed.sum(1, keepdims=True), y) < expected_calibration_error(
        over / over.sum(1, keepdims=True), y)


def test_a_calibration_set_without_mistakes_does_not_make_the_gate_certain() -> None:
    # Every row ranks its target first: NLL falls without limit as T -> 0, and the plain fit would return the
    # search's bound (0.01), turning every probability into ~1. n right out of n is evidence of an accuracy of
    # about (n + 1) / (n + 2), and that is the mean top probability the temperature gives.
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(40, 4))
    y = logits.argmax(axis=1)
    t = fit_temperature(logits, y)
    assert t > 0.1
    e = np.exp(logits / t - (logits / t).max(axis=1, keepdims=True))
    assert (e / e.sum(axis=1, keepdims=True)).max(axis=1).mean() == pytest.approx(41 / 42, abs=1e-6)
    # One mistake and the NLL has its minimum again: the plain fit, as before.
    y[0] = (y[0] + 1) % 4
    assert fit_temperature(logits, y) != pytest.approx(t)


def test_cross_validation_folds_are_stratified_seeded_and_keep_copies_together() -> None:
    texts = [f"a{i}" for i in range(6)] + ["a0"] + [f"b{i}" for i in range(25)] + ["c0"]
    labels = ["a"] * 7 + ["b"] * 25 + ["c"]
    folds = cross_validation_folds(texts, labels, seed=0)
    assert folds.max() + 1 == CV_FOLDS  # b has 25 distinct texts: ten folds, not 25 fits
    assert folds[0] == folds[6]  # both copies of "a0"
    assert len({int(f) for f in folds[:6]}) == 6  # six texts of a: one per fold (leave-one-out)
    assert all(2 <= n <= 3 for n in Counter(folds[7:32].tolist()).values())  # b dealt out evenly
    reordered = cross_validation_folds(texts[::-1], labels[::-1], seed=0)[::-1]
    np.testing.assert_array_equal(folds, reordered)
    assert cross_validation_folds(["x", "y", "z"], ["p", "p", "q"]).max() + 1 == 2  # as many as the largest has


def test_a_few_examples_per_expert_are_calibrated_by_cross_validation(
        gate: Gate, lookup: FakeLookupEncoder, caplog: pytest.LogCaptureFixture) -> None:
    # Five of each intent: no held-out split (floor(0.15 * 5) = 0), so each example is scored out of fold.
    texts = [t for e in gate.experts for t in [t for t, lab in zip(gate.example_texts, gate.example_labels,
                                                                   strict=True) if lab == e][:5]]
    labels = [e for e in gate.experts for _ in range(5)]
    few = train_gate(texts, labels, lookup, experts=gate.experts, progress=False)
    m = few.metadata.metrics
    assert (m.calibration, m.n_train, m.n_val, m.n_calibration) == ("cross-validated", 35, 0, 35)
    assert m.accuracy is not None and m.accuracy > 0.6 and m.nll_after is not None and m.ece_after is not None
    assert few.ood_threshold is not None and few.metadata.ood_reference is not None
    assert few.temperature != 1.0
    # An expert with a single example cannot be held out: the others calibrate, and a warning names it.
    caplog.set_level("WARNING", logger="router.gate")
    lone = train_gate([*texts[:-4]], labels[:-4], lookup, experts=gate.experts, progress=False)
    assert lone.metadata.metrics.calibration == "cross-validated" and lone.metadata.metrics.n_calibration == 30
    assert lone.ood_threshold is not None
    assert f"none of them of '{gate.experts[-1]}'" in caplog.text


def test_an_expert_with_too_few_examples_to_hold_one_out_is_named_by_held_out_calibration(
        gate: Gate, lookup: FakeLookupEncoder, caplog: pytest.LogCaptureFixture) -> None:
    """Six of the experts with many examples (held-out calibration, enough queries), the seventh with five: none of
    its examples is held out (floor(0.15 * 5) = 0), so its probabilities weighed nothing in the temperature and
    metrics.ece, which looked well calibrated while it was routed right half the time. A warning names it now."""
    rare = gate.experts[-1]
    pairs = list(zip(gate.example_texts, gate.example_labels, strict=True))
    kept = [(t, lab) for t, lab in pairs if lab != rare] + [(t, lab) for t, lab in pairs if lab == rare][:5]
    caplog.set_level("WARNING", logger="router.gate")
    trained = train_gate(*zip(*kept, strict=True), lookup, experts=gate.experts, progress=False)
    assert trained.metadata.metrics.calibration == "held-out"
    assert (f"calibration is fitted on {trained.metadata.metrics.n_calibration} held-out queries, none of them of "
            f"{rare!r}: too few examples to hold one out") in caplog.text, caplog.text
    caplog.clear()
    train_gate(*zip(*pairs, strict=True), lookup, experts=gate.experts, progress=False)
    assert "none of them of" not in caplog.text


def test_one_example_per_expert_says_it_is_uncalibrated(gate: Gate, lookup: FakeLookupEncoder,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("WARNING", logger="router.gate")
    texts = [next(t for t, lab in zip(gate.example_texts, gate.example_labels, strict=True) if lab == e)
             for e in gate.experts]
    one = train_gate(texts, gate.experts, lookup, experts=gate.experts, progress=False)
    m = one.metadata.metrics
    assert (m.calibration, m.n_calibration, m.accuracy) == ("none", 0, None)
    assert one.ood_threshold is None and one.temperature == 1.0
    assert "cannot be calibrated" in caplog.text and "never abstain" in caplog.text
    # A second example for one expert: its examples alone would fit the temperature, every target the same.
    second = next(t for t, lab in zip(gate.example_texts, gate.example_labels, strict=True)
                  if lab == gate.experts[0] and t != texts[0])
    two = train_gate([*texts, second], [*gate.experts, gate.experts[0]], lookup, experts=gate.experts,
                     progress=False)
    assert (two.metadata.metrics.calibration, two.ood_threshold) == ("none", None)
    assert f"only {gate.experts[0]!r} has two distinct examples" in caplog.text


def test_split_is_seeded_stratified_and_order_independent(snips: dict[str, list[tuple[str, str]]]) -> None:
    texts, labels = (list(v) for v in zip(*snips["train"], strict=True))
    train, val = split_train_val(texts, labels, seed=0)
    assert len(set(train) | set(val)) == len(texts) and not set(train) & set(val)
    assert all(25 <= n <= 35 for n in Counter(labels[i] for i in val).values())
    _, rev_val = split_train_val(texts[::-1], labels[::-1], seed=0)
    assert {texts[i] for i in val} == {texts[::-1][i] for i in rev_val}
    assert {texts[i] for i in val} != {texts[i] for i in split_train_val(texts, labels, seed=1)[1]}
    # Copies of a text land on one side; a label with few texts keeps them all for training.
    for seed in range(5):
        small_train, small_val = split_train_val(["a", "a", "d", "e", "b"], ["x", "x", "x", "x", "y"], seed=seed,
                                                 val_fraction=0.5)
        val_set = set(small_val.tolist())
        assert (0 in val_set) == (1 in val_set) and 4 in small_train
        assert len({["a", "a", "d", "e"][i] for i in val_set}) == 1  # floor(0.5 * 3 distinct texts)
    # A text given two labels goes to one side whole: never in validation under one label, training under another.
    texts2 = ["c1", "c2", "c3", "c4", "dup", "dup", "u1", "u2", "u3", "u4"]
    labels2 = ["x", "x", "x", "x", "x", "y", "y", "y", "y", "y"]
    for seed in range(20):
        tr, va = split_train_val(texts2, labels2, seed=seed, val_fraction=0.4)
        assert (4 in va) == (5 in va) and (4 in tr) == (5 in tr)


def test_pinned_texts_always_train(snips: dict[str, list[tuple[str, str]]]) -> None:
    """Feedback's examples are pinned: each trains, whatever its hash, and the rest of its label is split as
    before (the validation share taken from the unpinned texts)."""
    texts, labels = (list(v) for v in zip(*snips["train"], strict=True))
    _, val = split_train_val(texts, labels, seed=0)
    pinned = {texts[i] for i in val[:20]}  # texts the hash would hold out
    train_p, val_p = split_train_val(texts, labels, seed=0, pinned=pinned)
    assert pinned <= {texts[i] for i in train_p} and not pinned & {texts[i] for i in val_p}
    assert len(set(train_p) | set(val_p)) == len(texts) and not set(train_p) & set(val_p)
    assert {texts[i] for i in val_p} - {texts[i] for i in val} != set()  # others took their places
    assert split_train_val(texts, labels, seed=0, pinned=())[1].tolist() == val.tolist()


def test_training_warns_of_queries_with_two_labels(snips: dict[str, list[tuple[str, str]]],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    from router.gate import conflicting_labels

    texts, labels = (list(v) for v in zip(*snips["train"][::10], strict=True))
    other = next(lab for lab in labels if lab != labels[0])
    assert conflicting_labels([*texts, texts[0]], [*labels, other]) == {texts[0]: sorted([labels[0], other])}
    with caplog.at_level("WARNING", logger="router.gate"):
        train_gate([*texts, texts[0]], [*labels, other], FakeHashingEncoder(), experts=sorted(set(labels)),
                   progress=False)
    assert "1 training queries carry more than one label" in caplog.text


def test_nearest_explains_with_training_examples(gate: Gate, snips: dict[str, list[tuple[str, str]]]) -> None:
    text, label = snips["train"][5]
    found = gate.nearest(gate.encoder.encode([text])[0], k=3)
    assert len(found) == 3 and found[0].text == text and found[0].label == label
    assert found[0].similarity == pytest.approx(1.0, abs=1e-4)
    assert found[0].similarity >= found[1].similarity >= found[2].similarity


def test_save_load_round_trip(gate: Gate, tmp_path: Path, test_set: tuple[np.ndarray, np.ndarray, list[str]]) -> None:
    gate.save(tmp_path / "gate")
    doc = json.loads((tmp_path / "gate" / "gate.json").read_text())
    assert doc["encoder_identity"] == gate.encoder.identity and doc["experts"] == gate.experts
    assert doc["training_data_sha256"] == training_data_sha256(gate.example_texts, gate.example_labels)
    loaded = Gate.load(tmp_path / "gate", gate.encoder)
    x, _, texts = test_set
    np.testing.assert_array_equal(loaded.predict_proba(x, texts), gate.predict_proba(x, texts))
    assert loaded.temperature == gate.temperature and loaded.metadata == gate.metadata
    assert loaded.example_texts == gate.example_texts and loaded.example_labels == gate.example_labels
    assert loaded.nearest(test_set[0][0]) == gate.nearest(test_set[0][0])


def test_load_refuses_another_encoder(gate: Gate, tmp_path: Path, lookup: FakeLookupEncoder) -> None:
    gate.save(tmp_path)
    other = FakeLookupEncoder(gate.encoder, [], np.zeros((0, 384)), identity="st-fp32:all-MiniLM-L6-v2")
    with pytest.raises(GateArtifactMismatch, match=r"identity 'onnx-int8:all-MiniLM-L6-v2' in the artifact"):
        Gate.load(tmp_path, other)
    tampered = FakeLookupEncoder(gate.encoder, [], np.zeros((0, 384)), checksum="0" * 64)
    with pytest.raises(GateArtifactMismatch, match="checksum") as info:
        Gate.load(tmp_path, tampered)
    assert "0" * 64 in str(info.value) and "identity" not in str(info.value)


def test_load_refuses_edited_files(gate: Gate, tmp_path: Path) -> None:
    gate.save(tmp_path)
    with np.load(tmp_path / "weights.npz") as w:
        arrays = {k: w[k] for k in w.files}
    arrays["0.coef"] = arrays["0.coef"] * 2  # the ensemble's first member: logistic regression
    np.savez(tmp_path / "weights.npz", **arrays)
    # A moe train killed between its renames leaves new arrays under the old gate.json: the message says the way out.
    with pytest.raises(GateArtifactMismatch, match=r"weights\.npz: contents differ from the sha256 in gate\.json \(a "
                                                   r"file changed by hand, or a moe train stopped while it replaced "
                                                   r"the files\); retrain the gate \(moe train"):
        Gate.load(tmp_path, gate.encoder)


def _edit_manifest(folder: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    manifest = folder / "gate.json"
    doc = json.loads(manifest.read_text(encoding="utf-8"))
    edit(doc)
    manifest.write_text(json.dumps(doc), encoding="utf-8")


def test_load_refuses_an_edited_manifest(gate: Gate, tmp_path: Path) -> None:
    gate.save(tmp_path)
    _edit_manifest(tmp_path, lambda doc: None)  # written again without indentation: the same contents
    assert Gate.load(tmp_path, gate.encoder).experts == gate.experts

    def swap(doc: dict[str, Any]) -> None:
        doc["experts"][:2] = doc["experts"][1::-1]

    _edit_manifest(tmp_path, swap)
    with pytest.raises(GateArtifactMismatch, match=r"gate\.json: contents differ from the manifest_sha256"):
        Gate.load(tmp_path, gate.encoder)


def test_load_refuses_another_max_length(gate: Gate, tmp_path: Path) -> None:
    gate.save(tmp_path)
    assert json.loads((tmp_path / "gate.json").read_text())["encoder_max_length"] == 256
    short = build_encoder(EncoderConfig(backend="onnx", max_length=8))
    with pytest.raises(GateArtifactMismatch, match="trained with encoder max_length 256") as info:
        Gate.load(tmp_path, short)
    assert "reads 8" in str(info.value) and "gate.encoder.max_length: 256" in str(info.value)


def test_an_artifact_saved_before_the_new_fields_still_loads(gate: Gate, tmp_path: Path) -> None:
    gate.save(tmp_path)

    def as_before(doc: dict[str, Any]) -> None:
        del doc["manifest_sha256"], doc["encoder_max_length"]

    _edit_manifest(tmp_path, as_before)
    short = build_encoder(EncoderConfig(backend="onnx", max_length=8))
    assert Gate.load(tmp_path, short).experts == gate.experts  # max_length unknown: not a mismatch


def test_check_experts_refuses_only_unroutable_experts(gate: Gate) -> None:
    gate.check_experts(list(reversed(gate.experts)))  # order does not matter; columns follow gate.experts
    gate.check_experts(gate.experts[1:])  # removing an expert needs no retraining
    gate.check_experts([*gate.experts, "Translate"], {"Translate": ["translate this to French"]})
    with pytest.raises(GateArtifactMismatch) as info:
        gate.check_experts([*gate.experts[1:], "NewExpert"])
    assert "'NewExpert'" in str(info.value) and "no examples" in str(info.value)


def test_a_gate_trained_for_other_experts_is_refused(gate: Gate) -> None:
    # Another deployment's config: every expert has examples, none is one the artifact was trained for.
    other = {"coder": ["write a python function"], "chat": ["hello how are you"]}
    with pytest.raises(GateArtifactMismatch, match="trained for other experts") as info:
        gate.for_experts(other)
    message = str(info.value)
    assert "'coder', 'chat'" in message and ", ".join(map(repr, gate.experts)) in message
    assert "moe train --config" in message
    # One trained expert in common is a cold start, not another deployment.
    assert gate.for_experts({**other, gate.experts[0]: []}).experts == ["coder", "chat", gate.experts[0]]


TRANSLATE = ["translate good night into Spanish", "how do you say thank you in Japanese",
             "what is the German word for bread", "translate this sentence to French please",
             "say hello in Italian"]


def test_cold_start_expert_routes_from_its_examples(gate: Gate, test_set: tuple[np.ndarray, np.ndarray, list[str]],
                                                    tmp_path: Path) -> None:
    view = gate.for_experts({**{e: [] for e in gate.experts[1:]}, "Translate": TRANSLATE})
    assert view.experts == [*gate.experts[1:], "Translate"]
    p = view.scores(["how would I say good morning in French", "will it rain in Boston tomorrow"])
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-9)
    assert [view.experts[i] for i in p.argmax(axis=1)] == ["Translate", "GetWeather"]
    x, y, texts = test_set
    kept = y != 0  # the removed expert's queries have no right answer left
    routed = np.array(view.experts)[view.predict_proba(x[kept], [t for t, k in zip(texts, kept, strict=True) if k])
                                    .argmax(axis=1)]
    assert (routed == np.array(gate.experts)[y[kept]]).mean() >= 0.90
    assert view.nearest(gate.encoder.encode([TRANSLATE[0]])[0], 1)[0].label == "Translate"
    # The removed expert's examples explain nothing any more, even for a query like them.
    removed = gate.experts[0]
    like_removed = next(t for t, label in zip(gate.example_texts, gate.example_labels, strict=True)
                        if label == removed)
    assert gate.nearest(gate.encoder.encode([like_removed])[0], 1)[0].label == removed
    near = view.nearest(gate.encoder.encode([like_removed])[0], 5)
    assert len(near) == 5 and removed not in {n.label for n in near}
    # Saving a view writes what was trained, not the config's additions.
    view.save(tmp_path / "g")
    loaded = Gate.load(tmp_path / "g", gate.encoder)
    assert loaded.experts == gate.experts and loaded.example_texts == gate.example_texts
    sim = gate.metadata
    assert 5 < sim.cold_start_slope < 40 and 0.2 < sim.cold_start_midpoint < 0.8


def test_expert_without_examples_gets_a_tiny_prior(gate: Gate, lookup: FakeLookupEncoder,
                                                   test_set: tuple[np.ndarray, np.ndarray, list[str]]) -> None:
    experts = [*gate.experts, "Unlabelled"]
    g = train_gate(gate.example_texts, gate.example_labels, lookup, experts=experts, progress=False)
    p = g.predict_proba(test_set[0], test_set[2])
    assert p.shape[1] == 8 and g.metadata.unseen_experts == ["Unlabelled"]
    np.testing.assert_allclose(p[:, -1], UNSEEN_PRIOR)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-9)
    assert (p[:, :-1].max(axis=1) > UNSEEN_PRIOR).all()


def test_bad_training_input_is_refused(gate: Gate, lookup: FakeLookupEncoder) -> None:
    texts, labels = gate.example_texts[:20], gate.example_labels[:20]
    with pytest.raises(ValueError, match="'Nope'"):
        train_gate(texts, [*labels[:-1], "Nope"], lookup, experts=gate.experts, progress=False)
    with pytest.raises(ValueError, match="at least two experts"):
        train_gate(texts, [labels[0]] * 20, lookup, experts=gate.experts, progress=False)


def test_the_gate_s_ece_is_the_evaluation_s() -> None:
    """gate.json's ECE and moe eval's bin alike, confidences on a bin's edge included (0.2 = 3/15, 1.0)."""
    from eval.metrics import expected_calibration_error as evaluation_ece
    from router.gate import expected_calibration_error as gate_ece

    rng = np.random.default_rng(0)
    for n in (10, 100, 1000):
        proba = rng.dirichlet(np.ones(5), n)
        proba[:3], proba[3] = np.eye(5)[:3], 0.2
        y = rng.integers(0, 5, n)
        assert gate_ece(proba, y) == pytest.approx(evaluation_ece(proba, y), abs=1e-12)


def test_an_expert_with_few_examples_is_not_outvoted_for_that_alone(
        snips: dict[str, list[tuple[str, str]]], experts: list[str], lookup: FakeLookupEncoder,
        test_set: tuple[np.ndarray, np.ndarray, list[str]]) -> None:
    """Real SNIPS queries: every intent has 5 training examples but one has 200 (an expert added next to one
    with logged traffic). Unbalanced, the crowded intent takes the others' queries; ``balance: prior`` (the
    default) divides each expert's share of the examples out, and the few-example experts keep theirs."""
    from router.classifiers import build_classifier

    by_intent: dict[str, list[str]] = {}
    for text, label in snips["train"]:
        by_intent.setdefault(label, []).append(text)
    crowded = experts[0]
    pairs = [(t, e) for e in experts for t in by_intent[e][:200 if e == crowded else 5]]
    texts, labels = (list(v) for v in zip(*pairs, strict=True))
    x, y, test_texts = test_set
    recall = {}
    for balance in ("none", "prior"):
        gate = train_gate(texts, labels, lookup, experts=experts, progress=False,
                          classifier=build_classifier("ensemble", balance=balance))
        chosen = gate.predict_proba(x, test_texts).argmax(axis=1)
        others = y != 0
        recall[balance] = float((chosen[others] == y[others]).mean())
    assert recall["none"] < 0.8 < recall["prior"], recall
    assert recall["prior"] - recall["none"] > 0.1, recall


def test_a_long_training_step_shows_its_time_going_by_and_what_it_is_doing(capsys: pytest.CaptureFixture[str]) -> None:
    """Fitting a thousand experts' classifier takes half a minute in one step: the bar is redrawn every second
    with what it is doing, not left looking stuck at 0/2."""
    import time

    from router.classifiers import LogisticClassifier
    from router.gate_train import ticking, train_gate

    class _SlowFit(LogisticClassifier):
        """A test double: the logistic classifier, 2.5 s slower to fit."""

        def fit(self, queries: Any, y: np.ndarray, n_classes: int) -> None:
            time.sleep(2.5)
            super().fit(queries, y, n_classes)

    texts = [f"{topic} question {i}" for topic in ("maths", "cooking") for i in range(170)]
    labels = [t.split()[0] for t in texts]
    capsys.readouterr()
    train_gate(texts, labels, FakeHashingEncoder(), experts=["maths", "cooking"], classifier=_SlowFit(), progress=True)
    drawn = capsys.readouterr().err.split("\r")
    fitting = [line for line in drawn if "training gate (logistic)" in line and "fitting on 290 examples" in line]
    assert len(fitting) >= 3  # drawn as it starts, then each second of the 2.5 s
    assert any("calibrating on 50 held-out queries" in line for line in drawn)
    with ticking(object()):  # a bar that says nothing of being disabled: left alone
        pass
