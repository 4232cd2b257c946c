"""router.cascade: the fast gate decides the queries it is sure of, the full gate the rest.

The threshold rule and the stage bookkeeping run on hashed-word encoders (fast); the end-to-end test trains the
real pair (static, then ONNX) on real SNIPS queries through ``moe train``'s path and checks the figures the
cascade exists for, on SNIPS' test queries."""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import yaml

from experts.types import ChatMessage, ChatRequest
from router.build import load_gate
from router.cascade import CASCADE_FILE, FAST_DIR, CascadeFit, CascadeGate, CascadeNotTrained, fit_threshold
from router.config import ConfigError, load_config, parse_config
from router.encoders import Encoder
from router.gate import Assessment, Gate, GateArtifactMismatch, assess, train_gate
from router.metrics import RouterMetrics
from router.orchestrator import Orchestrator
from router.trace import Trace
from router.train import train_from_config
from tests.doubles.fakes import FakeExpert, HashingEncoder, fake_config


# -- the threshold --------------------------------------------------------------------------------------------
def fast_view(top: Sequence[float], picks: Sequence[int], ood: Sequence[float] | None = None) -> Assessment:
    """An assessment whose row i puts ``top[i]`` on expert ``picks[i]`` (of 3)."""
    probs = np.full((len(top), 3), 0.0)
    for i, (p, j) in enumerate(zip(top, picks, strict=True)):
        probs[i] = (1.0 - p) / 2
        probs[i, j] = p
    return Assessment(probs, [[] for _ in top], np.asarray(ood if ood is not None else [1.0] * len(top)))


def test_the_threshold_is_the_lowest_confidence_that_keeps_the_agreement() -> None:
    # Ten queries; the fast gate disagrees with the full one on those at 0.5 and 0.7.
    top = [0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99]
    full = np.zeros(10, dtype=np.int64)
    picks = [0, 1, 0, 2, 0, 0, 0, 0, 0, 0]
    # 0.9 agreement allows one disagreement: from 0.6 up, only the one at 0.7 gets through.
    assert fit_threshold(fast_view(top, picks), full, 0.9, None) == (0.6, 0.8, 0.9)
    # Full agreement: the fast gate may decide only above both disagreements.
    assert fit_threshold(fast_view(top, picks), full, 1.0, None) == (0.8, 0.6, 1.0)
    # A lower target never raises the threshold.
    assert fit_threshold(fast_view(top, picks), full, 0.8, None)[0] == 0.4


def test_queries_the_fast_gate_finds_unfamiliar_are_never_its_to_decide() -> None:
    top, picks = [0.6, 0.99, 0.7], [0, 1, 0]
    # The confident disagreement at 0.99 is out of distribution for the fast gate (0.1 < 0.5): the full gate
    # takes it whatever the threshold, so the fast gate may decide everything else.
    threshold, share, met = fit_threshold(fast_view(top, picks, ood=[0.9, 0.1, 0.9]), np.zeros(3, np.int64),
                                          1.0, 0.5)
    assert (threshold, share, met) == (0.6, 2 / 3, 1.0)


def test_no_threshold_without_validation_queries_or_when_none_meets_the_target() -> None:
    assert fit_threshold(fast_view([], []), np.zeros(0, np.int64), 0.995, None) == (None, 0.0, 1.0)
    # The only query the fast gate is sure of disagrees: no threshold keeps full agreement.
    assert fit_threshold(fast_view([0.9], [1]), np.zeros(1, np.int64), 1.0, None)[0] is None


# -- serving ---------------------------------------------------------------------------------------------------
class Counting(HashingEncoder):
    """Hashed words, counting the texts it embeds; ``salt`` makes a second, different embedding space."""

    def __init__(self, salt: str = "", identity: str = "fake-hashing") -> None:
        self.salt, self.identity, self.texts = salt, identity, 0

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.texts += len(texts)
        return super().encode([" ".join(self.salt + w for w in t.split()) for t in texts])


EXAMPLES = {
    "maths": ["integrate x squared", "solve the equation for x", "derivative of sin x", "prove the theorem",
              "factor the polynomial", "what is the integral of e to the x", "solve this linear system",
              "compute the limit as x goes to zero"],
    "cooking": ["how long to boil an egg", "a recipe for pancakes", "how do I roast vegetables",
                "bake bread at home", "what spices go with lamb", "how to make a tomato sauce",
                "cook rice without a rice cooker", "grill salmon fillets"],
}


def two_gates(fast_encoder: Encoder, full_encoder: Encoder) -> tuple[Gate, Gate, list[str], list[str]]:
    texts = [t for ts in EXAMPLES.values() for t in ts]
    labels = [n for n, ts in EXAMPLES.items() for _ in ts]
    fast = train_gate(texts, labels, fast_encoder, experts=list(EXAMPLES), progress=False)
    full = train_gate(texts, labels, full_encoder, experts=list(EXAMPLES), progress=False)
    return fast, full, texts, labels


def test_the_full_gate_sees_only_the_queries_the_fast_gate_is_unsure_of() -> None:
    fast_encoder, full_encoder = Counting(), Counting("~", "fake-hashing-salted")
    fast, full, _, _ = two_gates(fast_encoder, full_encoder)
    queries = ["solve for x", "boil an egg", "pancakes", "weather in paris tomorrow", "the integral of x"]
    sure = fast.scores(queries).max(axis=1)
    threshold = float(np.median(sure))
    cascade = CascadeGate(fast, full, CascadeFit(threshold, 0.995, 0, 0.0, 1.0, fast_encoder.identity))
    fast_encoder.texts = full_encoder.texts = 0
    a = cascade.assess(queries)
    assert a.stage == ["fast" if s >= threshold else "full" for s in sure]
    assert full_encoder.texts == a.stage.count("full") and fast_encoder.texts == len(queries)
    fast_rows, full_rows = fast.scores(queries), full.scores(queries)
    for i, stage in enumerate(a.stage):
        np.testing.assert_allclose(a.probs[i], fast_rows[i] if stage == "fast" else full_rows[i])
        assert a.ood_threshold is not None
        assert a.ood_threshold[i] == (fast if stage == "fast" else full).ood_threshold
    # k=0 (expert-choice batches, scores): the same probabilities and stages, without the explanations.
    bare = cascade.assess(queries, k=0)
    np.testing.assert_array_equal(bare.probs, a.probs)
    assert bare.stage == a.stage and bare.nearest == [[] for _ in queries]
    np.testing.assert_array_equal(cascade.scores(queries), a.probs)
    plain = assess(full, queries, 0)
    np.testing.assert_array_equal(plain.probs, full_rows)
    assert np.isnan(plain.ood).all() and plain.nearest == [[] for _ in queries]
    # No threshold: everything goes to the full gate, as without the cascade.
    none = CascadeGate(fast, full, CascadeFit(None, 0.995, 0, 0.0, 1.0, fast_encoder.identity))
    assert none.assess(queries).stage == ["full"] * len(queries)


def test_an_expert_added_with_examples_is_routable_by_both_stages() -> None:
    fast, full, _, _ = two_gates(Counting(), Counting("~", "fake-hashing-salted"))
    travel = ["book a flight to rome", "cheap hotels in lisbon", "train tickets to paris", "visa for japan"]
    cascade = CascadeGate(fast, full, CascadeFit(0.5, 0.995, 0, 0.0, 1.0, "x"))
    served = cascade.for_experts({**EXAMPLES, "travel": travel})  # cold start: no retraining
    assert served.experts == served.fast.experts == served.full.experts == [*EXAMPLES, "travel"]
    a = served.assess(["a flight to rome and hotels in lisbon", "cheap train tickets to paris"])
    assert [served.experts[int(i)] for i in a.probs.argmax(axis=1)] == ["travel", "travel"]


async def test_the_decision_names_the_stage_and_abstains_by_that_stage_s_threshold() -> None:
    fast, full, _, _ = two_gates(Counting(), Counting("~", "fake-hashing-salted"))
    # The full gate finds every query unfamiliar: whatever it decides abstains to the default expert.
    full.metadata = dataclasses.replace(full.metadata, ood_threshold=2.0)
    names = list(EXAMPLES)
    config = fake_config(names, gate={"default_expert": "cooking"})
    experts = {n: FakeExpert(config.expert(n)) for n in names}
    always_fast = CascadeGate(fast, full, CascadeFit(0.0, 0.995, 0, 0.0, 1.0, "x"))
    orchestrator = Orchestrator(config, always_fast, experts)
    # The fast gate decides every query familiar to it, by its own threshold, so this one routes; a query of
    # unseen words is unfamiliar to it, so the full gate decides, and abstains by its own threshold.
    known, unknown = await orchestrator.decide(_ask("solve the equation")), await orchestrator.decide(_ask("zq xv"))
    assert (known.stage, known.abstained, known.chosen[0].expert) == ("fast", False, "maths")
    assert (unknown.stage, unknown.abstained, unknown.chosen[0].expert) == ("full", True, "cooking")
    await orchestrator.aclose()
    # /metrics counts decisions by the stage that made them.
    metrics = RouterMetrics()
    for decision in (known, unknown, known):
        metrics.observe_trace(Trace(decision=decision), None)
    page = metrics.render().decode()
    assert 'moe_gate_decisions_total{stage="fast"} 2.0' in page and 'moe_gate_decisions_total{stage="full"} 1.0' in page


def _ask(text: str) -> ChatRequest:
    return ChatRequest(messages=[ChatMessage(role="user", content=text)])


# -- config, training, artifacts -------------------------------------------------------------------------------
def test_the_fast_stage_needs_another_encoder() -> None:
    base = {"version": 1, "experts": [{"name": "a", "type": "openai", "model": "m",
                                       "endpoint": "http://127.0.0.1:9/v1"}]}
    with pytest.raises(ConfigError, match=r"gate.cascade.encoder uses the 'onnx' backend, as gate.encoder does"):
        parse_config({**base, "gate": {"cascade": {"encoder": {"backend": "onnx"}}}}, check_env=False)
    config = parse_config({**base, "gate": {"cascade": {}}}, check_env=False)
    assert config.gate.cascade is not None and config.gate.cascade.encoder.backend == "static"


def write_config(tmp_path: Path, rows: list[dict[str, object]], labels: list[str], cascade: bool) -> Path:
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "router.yaml"
    gate: dict[str, object] = {"artifact": "gate", "train_data": ["train.jsonl"]}
    if cascade:
        gate["cascade"] = {"agreement": 0.995}
    path.write_text(yaml.safe_dump({"version": 1, "gate": gate, "experts": [
        {"name": n, "type": "openai", "model": "m", "endpoint": "http://127.0.0.1:9/v1"} for n in labels]}))
    return path


def snips(data_dir: Path, split: str) -> list[dict[str, str]]:
    with (data_dir / "snips" / "snips_2017_custom_intents.csv").open(newline="", encoding="utf-8") as fh:
        return [{"query": r["text"], "label": r["intent"]} for r in csv.DictReader(fh) if r["split"] == split]


@pytest.fixture(scope="module")
def snips_rows(data_dir: Path) -> tuple[list[dict[str, str]], list[dict[str, str]], list[str]]:
    """100 seeded SNIPS training queries per intent, SNIPS' 700 test queries, the 7 intents."""
    rng = np.random.default_rng(0)
    train = snips(data_dir, "train")
    labels = sorted({r["label"] for r in train})
    by_label: dict[str, list[dict[str, str]]] = {lab: [] for lab in labels}
    for i in rng.permutation(len(train)):
        if len(by_label[train[i]["label"]]) < 100:
            by_label[train[i]["label"]].append(train[i])
    picked = [r for lab in labels for r in by_label[lab]]
    return picked, snips(data_dir, "test"), labels


def test_moe_train_fits_a_cascade_that_spares_the_full_gate_and_agrees_with_it(
        snips_rows: tuple[list[dict[str, str]], list[dict[str, str]], list[str]], tmp_path: Path) -> None:
    train, test, labels = snips_rows
    config = load_config(write_config(tmp_path, train, labels, cascade=True))
    trained = train_from_config(config, progress=False, feedback=False)
    assert isinstance(trained, CascadeGate) and trained.fit.threshold is not None
    # Fitted on the full gate's own validation split, which neither gate trained on.
    assert trained.fit.n_val == trained.full.metadata.metrics.n_val > 0 and trained.fit.agreement >= 0.995
    assert (tmp_path / "gate" / CASCADE_FILE).exists() and (tmp_path / "gate" / FAST_DIR / "gate.json").exists()
    served = load_gate(config)
    assert isinstance(served, CascadeGate) and served.fit == trained.fit
    texts, gold = [r["query"] for r in test], np.array([r["label"] for r in test])
    a = served.assess(texts)
    assert a.stage is not None
    cascade, full = a.probs.argmax(axis=1), served.full.scores(texts).argmax(axis=1)
    experts = np.array(served.experts)
    # On SNIPS' 700 test queries (measured: 90% decided by the fast gate, 99.6% the full gate's pick, and
    # accuracy 0.977 against the full gate's 0.976).
    assert a.stage.count("fast") / len(texts) >= 0.75
    assert (cascade == full).mean() >= 0.99
    assert (experts[cascade] == gold).mean() >= (experts[full] == gold).mean() - 0.01


def test_a_cascade_config_refuses_a_gate_trained_without_one_and_retraining_without_drops_it(
        snips_rows: tuple[list[dict[str, str]], list[dict[str, str]], list[str]], tmp_path: Path) -> None:
    train, _, labels = snips_rows
    small = train[::4]
    with_cascade = load_config(write_config(tmp_path, small, labels, cascade=True))
    train_from_config(with_cascade, progress=False, feedback=False)
    # Retrained without the cascade: the old fast stage goes, so a cascade config must be retrained too.
    without = load_config(write_config(tmp_path, small, labels, cascade=False))
    assert isinstance(train_from_config(without, progress=False, feedback=False), Gate)
    assert not (tmp_path / "gate" / CASCADE_FILE).exists() and not (tmp_path / "gate" / FAST_DIR).exists()
    with pytest.raises(CascadeNotTrained, match=r"no cascade stage .* moe train --config"):
        load_gate(with_cascade)
    assert isinstance(load_gate(without), Gate)


def test_a_fast_stage_trained_on_other_data_is_refused(
        snips_rows: tuple[list[dict[str, str]], list[dict[str, str]], list[str]], tmp_path: Path) -> None:
    train, _, labels = snips_rows
    config = load_config(write_config(tmp_path, train[::4], labels, cascade=True))
    train_from_config(config, progress=False, feedback=False)
    other = train_gate([r["query"] for r in train[1::4]], [r["label"] for r in train[1::4]],
                       load_gate(config).fast.encoder, experts=labels, progress=False)
    other.save(tmp_path / "gate" / FAST_DIR)
    with pytest.raises(GateArtifactMismatch, match=r"fast gate .* trained on other data"):
        load_gate(config)


def test_outcome_records_with_a_cascade_are_refused(tmp_path: Path) -> None:
    rows = [{"query": f"q{i}", "outcomes": {"a": 1.0, "b": 0.0}, "cost": {"a": 1.0, "b": 1.0}} for i in range(4)]
    config = load_config(write_config(tmp_path, rows, ["a", "b"], cascade=True))
    with pytest.raises(ValueError, match=r"gate.cascade applies to label gates"):
        train_from_config(config, progress=False, feedback=False)


def test_the_label_suites_count_abstentions_by_each_query_s_own_threshold() -> None:
    from eval.labels import _abstaining

    one_stage = Assessment(np.zeros((3, 2)), [[], [], []], np.array([0.1, 0.5, np.nan]))
    assert _abstaining(one_stage, 0.3) == pytest.approx(1 / 3)  # nan: no score, no abstaining
    assert _abstaining(one_stage, None) == 0.0
    # Two stages: the first query's stage has no threshold, the second's is above its score.
    two_stage = dataclasses.replace(one_stage, stage=["fast", "full", "full"], ood_threshold=[None, 0.6, 0.6])
    assert _abstaining(two_stage, 0.0) == pytest.approx(1 / 3)
