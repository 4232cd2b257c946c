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

from eval.datasets import CLINC_OOS_LABEL, load_clinc150_domains
from experts.types import ChatMessage, ChatRequest
from router.build import load_gate
from router.cascade import (
    CASCADE_FILE,
    FAST_DIR,
    CascadeFit,
    CascadeGate,
    CascadeNotTrained,
    fit_familiarity,
    fit_threshold,
)
from router.config import ConfigError, load_config, parse_config
from router.encoders import Encoder
from router.gate import OOD_KEEP, Assessment, Gate, GateArtifactMismatch, train_gate
from router.metrics import RouterMetrics
from router.orchestrator import Orchestrator
from router.trace import Trace
from router.train import train_from_config
from tests.doubles.fakes import FakeExpert, FakeHashingEncoder, fake_config


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


def test_the_familiarity_bar_keeps_the_share_asked_for_and_never_admits_what_the_fast_gate_abstains_on() -> None:
    ood = np.arange(1, 11) / 10.0  # ten validation queries, familiarity 0.1 .. 1.0
    assert fit_familiarity(ood, 0.8, None) == pytest.approx(np.quantile(ood, 0.2))
    assert (ood >= fit_familiarity(ood, 0.8, None)).sum() == 8
    # The fast gate's own abstain threshold is a floor: a query it would abstain on is the full gate's.
    assert fit_familiarity(ood, 0.8, 0.55) == 0.55
    assert fit_familiarity(np.array([np.nan]), 0.8, 0.3) == 0.3 and fit_familiarity(np.zeros(0), 0.8, None) is None


# -- serving ---------------------------------------------------------------------------------------------------
class FakeCountingEncoder(FakeHashingEncoder):
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
    # The held-out calibration a gate trained on enough data gets (these few examples would be cross-validated):
    # the cascade's fit is checked against it.
    fast = train_gate(texts, labels, fast_encoder, experts=list(EXAMPLES), progress=False, min_held_out=1)
    full = train_gate(texts, labels, full_encoder, experts=list(EXAMPLES), progress=False, min_held_out=1)
    return fast, full, texts, labels


def test_the_full_gate_sees_only_the_queries_the_fast_gate_is_unsure_of() -> None:
    fast_encoder, full_encoder = FakeCountingEncoder(), FakeCountingEncoder("~", "fake-hashing-salted")
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
    # Merged from each stage's assessment of every query (as the label suites score it), the same assessment.
    first = fast.assess(queries)
    merged = cascade.merge(first, full.assess(queries).rows(np.flatnonzero(~cascade.decides(first))))
    np.testing.assert_array_equal(merged.probs, a.probs)
    np.testing.assert_array_equal(merged.ood, a.ood)
    assert (merged.stage, merged.ood_threshold, merged.nearest) == (a.stage, a.ood_threshold, a.nearest)
    # k=0 (expert-choice batches, scores): the same probabilities and stages, without the explanations.
    bare = cascade.assess(queries, k=0)
    np.testing.assert_array_equal(bare.probs, a.probs)
    assert bare.stage == a.stage and bare.nearest == [[] for _ in queries]
    np.testing.assert_array_equal(cascade.scores(queries), a.probs)
    plain = full.assess(queries, 0)
    np.testing.assert_array_equal(plain.probs, full_rows)
    assert np.isnan(plain.ood).all() and plain.nearest == [[] for _ in queries]
    # No threshold: everything goes to the full gate, as without the cascade.
    none = CascadeGate(fast, full, CascadeFit(None, 0.995, 0, 0.0, 1.0, fast_encoder.identity))
    assert none.assess(queries).stage == ["full"] * len(queries)


def test_the_fit_scores_validation_queries_as_each_gate_was_fitted_on_them() -> None:
    fast_encoder, full_encoder = FakeCountingEncoder(), FakeCountingEncoder("~", "fake-hashing-salted")
    fast, full, texts, labels = two_gates(fast_encoder, full_encoder)
    fast_encoder.texts = full_encoder.texts = 0
    kept = CascadeGate.train(full, fast, texts, labels, agreement=0.995, familiar=OOD_KEEP)
    # From the embeddings the gates keep: nothing embedded again.
    assert fast_encoder.texts == full_encoder.texts == 0
    # Familiarity against the training part alone, as the fast gate's abstain threshold was fitted: asking for
    # the share that threshold keeps gives that threshold back. Against every example, each validation query
    # would find itself at cosine 1 and the bar would come out above it.
    assert fast.ood_threshold is not None and kept.fit.familiarity == pytest.approx(fast.ood_threshold)
    assert kept.fit.familiar_share == OOD_KEEP and kept.fit.n_val == full.metadata.metrics.n_val
    # Serving holds queries to the fitted bar: above every familiarity, the fast gate decides nothing.
    queries = ["solve for x", "boil an egg", "pancakes"]
    strict = CascadeGate(fast, full, dataclasses.replace(kept.fit, threshold=0.0, familiarity=2.0))
    assert strict.assess(queries).stage == ["full"] * 3
    lenient = CascadeGate(fast, full, dataclasses.replace(kept.fit, threshold=0.0, familiarity=-1.0))
    assert lenient.assess(queries).stage == ["fast"] * 3


def test_an_expert_added_with_examples_is_routable_by_both_stages() -> None:
    fast, full, _, _ = two_gates(FakeCountingEncoder(), FakeCountingEncoder("~", "fake-hashing-salted"))
    travel = ["book a flight to rome", "cheap hotels in lisbon", "train tickets to paris", "visa for japan"]
    cascade = CascadeGate(fast, full, CascadeFit(0.5, 0.995, 0, 0.0, 1.0, "x"))
    served = cascade.for_experts({**EXAMPLES, "travel": travel})  # cold start: no retraining
    assert served.experts == served.fast.experts == served.full.experts == [*EXAMPLES, "travel"]
    a = served.assess(["a flight to rome and hotels in lisbon", "cheap train tickets to paris"])
    assert [served.experts[int(i)] for i in a.probs.argmax(axis=1)] == ["travel", "travel"]
    # However sure and familiar the fast stage is, a query it would route to the newcomer is the full gate's:
    # its claims are the better judge (the familiarity is judged against the newcomer's few examples).
    lenient = CascadeGate(fast, full, CascadeFit(0.0, 0.995, 0, 0.0, 1.0, "x", familiarity=-1.0))
    served = lenient.for_experts({**EXAMPLES, "travel": travel})
    a = served.assess(["cheap train tickets to paris", "solve the equation for x"])
    assert served.fast.cold_start_experts == ["travel"]
    assert [served.experts[int(i)] for i in a.probs.argmax(axis=1)] == ["travel", "maths"]
    assert a.stage == ["full", "fast"]


async def test_the_decision_names_the_stage_and_abstains_by_that_stage_s_threshold() -> None:
    fast, full, _, _ = two_gates(FakeCountingEncoder(), FakeCountingEncoder("~", "fake-hashing-salted"))
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


def write_config(tmp_path: Path, rows: list[dict[str, object]], labels: list[str],
                 cascade: bool | dict[str, float]) -> Path:
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "router.yaml"
    gate: dict[str, object] = {"artifact": "gate", "train_data": ["train.jsonl"]}
    if cascade:
        gate["cascade"] = cascade if isinstance(cascade, dict) else {"agreement": 0.995}
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
    share = a.stage.count("fast") / len(texts)
    assert share >= 0.75
    # The fast stage decides only queries as familiar as the familiar share (0.9) of the validation queries,
    # (give or take ties at the bar), and the share fitted there is what serving gives, within a few points.
    assert trained.fit.familiar_share == 0.9 and trained.fit.fast_share <= 0.91
    assert abs(share - trained.fit.fast_share) <= 0.06
    assert (cascade == full).mean() >= 0.99
    assert (experts[cascade] == gold).mean() >= (experts[full] == gold).mean() - 0.01


@pytest.mark.slow
def test_a_stricter_familiarity_bar_leaves_out_of_scope_queries_to_the_full_gate(data_dir: Path) -> None:
    """Real encoders on CLINC150: 300 seeded training queries per domain, CLINC's 1,000 out-of-scope test
    queries. The static gate finds some of those familiar enough to decide them, where the ONNX gate would
    abstain; a bar that fewer validation queries clear hands them back (measured: the ONNX gate alone abstains
    on 63.3% of them; the cascade on 56.4% at a familiar share of 0.97, 59.6% at 0.9, 61.9% at 0.8)."""
    from router.config import EncoderConfig
    from router.encoders import build_encoder
    from router.static_encoder import StaticMiniLMEncoder

    rng = np.random.default_rng(0)
    train = [q for q in load_clinc150_domains(data_dir, "train") if q.label != CLINC_OOS_LABEL]
    labels = sorted({q.label for q in train})
    picked = []
    for label in labels:
        rows = [q for q in train if q.label == label]
        picked += [rows[i] for i in rng.permutation(len(rows))[:300]]
    texts, tags = [q.text for q in picked], [q.label for q in picked]
    oos = [q.text for q in load_clinc150_domains(data_dir, "test") if q.label == CLINC_OOS_LABEL]
    full = train_gate(texts, tags, build_encoder(EncoderConfig(backend="onnx")), experts=labels, progress=False)
    fast = train_gate(texts, tags, StaticMiniLMEncoder(), experts=labels, progress=False)
    alone = full.assess(oos)
    gate_abstains = float(np.mean(alone.ood < full.ood_threshold))

    def abstains(familiar: float) -> tuple[float, float]:
        cascade = CascadeGate.train(full, fast, texts, tags, agreement=0.995, familiar=familiar)
        a = cascade.assess(oos)
        # Validation queries tied at the bar all clear it, so the share may pass the target by a few of them.
        assert a.ood_threshold is not None and cascade.fit.fast_share <= familiar + 0.01
        return float(np.mean([o < t for o, t in zip(a.ood, a.ood_threshold, strict=True)])), cascade.fit.fast_share

    lenient, strict = abstains(0.97), abstains(0.8)
    assert strict[0] >= lenient[0] + 0.03 and strict[0] >= gate_abstains - 0.03
    assert strict[1] >= 0.7  # the static stage still decides most in-scope (validation) queries


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


def test_a_cascade_over_an_outcome_gate_says_to_drop_the_cascade_not_to_retrain(tmp_path: Path) -> None:
    # moe train refuses gate.cascade for outcome records, so "train it with moe train" would send the user round
    # in a circle (moe config check said so before).
    (tmp_path / "gate.json").write_text(json.dumps({"kind": "outcome"}))
    with pytest.raises(CascadeNotTrained, match=r"is an outcome gate, and gate\.cascade applies to label gates "
                                                r"only; remove gate\.cascade") as refused:
        CascadeGate.load(tmp_path, FakeHashingEncoder(), FakeHashingEncoder())
    assert "moe train" not in str(refused.value)
    (tmp_path / "gate.json").write_text(json.dumps({"kind": "label"}))
    with pytest.raises(CascadeNotTrained, match="no cascade stage"):
        CascadeGate.load(tmp_path, FakeHashingEncoder(), FakeHashingEncoder())


def test_other_targets_in_the_config_are_fitted_at_load_without_retraining(
        snips_rows: tuple[list[dict[str, str]], list[dict[str, str]], list[str]], tmp_path: Path) -> None:
    train, _, labels = snips_rows
    small = train[::2]
    config = load_config(write_config(tmp_path, small, labels, cascade=True))
    trained = train_from_config(config, progress=False, feedback=False)
    assert isinstance(trained, CascadeGate)
    as_trained = load_gate(config)
    assert isinstance(as_trained, CascadeGate) and as_trained.fit == trained.fit  # its own targets: the saved fit
    # A stricter familiar share and another agreement: both bars fitted again at load, as moe train would fit
    # them on the same validation split, while the artifact keeps the trained fit.
    other = load_config(write_config(tmp_path, small, labels, cascade={"agreement": 0.99, "familiar": 0.7}))
    served = load_gate(other)
    texts, tags = [r["query"] for r in small], [r["label"] for r in small]
    expected = CascadeGate.train(trained.full, trained.fast, texts, tags, agreement=0.99, familiar=0.7).fit
    assert isinstance(served, CascadeGate)
    assert (served.fit.agreement_target, served.fit.familiar_share, served.fit.n_val) == (0.99, 0.7, expected.n_val)
    assert served.fit.threshold == pytest.approx(expected.threshold)
    assert served.fit.familiarity == pytest.approx(expected.familiarity)
    assert trained.fit.familiarity is not None and served.fit.familiarity > trained.fit.familiarity
    saved = json.loads((tmp_path / "gate" / CASCADE_FILE).read_text())
    assert (saved["agreement_target"], saved["familiar_share"]) == (0.995, 0.9)
    # An artifact from before the familiarity bar (no familiar_share) gets one at load.
    (tmp_path / "gate" / CASCADE_FILE).write_text(json.dumps(
        {k: v for k, v in saved.items() if k not in ("familiarity", "familiar_share")}))
    upgraded = load_gate(config)
    assert isinstance(upgraded, CascadeGate) and upgraded.fit.familiar_share == 0.9
    assert upgraded.fit.familiarity == pytest.approx(trained.fit.familiarity)


def test_a_cascade_whose_examples_are_not_its_training_data_is_not_fitted_again() -> None:
    fast, full, texts, labels = two_gates(FakeCountingEncoder(), FakeCountingEncoder("~", "fake-hashing-salted"))
    cascade = CascadeGate.train(full, fast, texts, labels, agreement=0.995, familiar=0.9)
    assert cascade.with_targets(agreement=0.995, familiar=0.9) is cascade
    full.metadata = dataclasses.replace(full.metadata, training_data_sha256="0" * 64)
    with pytest.raises(GateArtifactMismatch, match=r"not its training data.* moe train --config"):
        cascade.with_targets(agreement=0.995, familiar=0.8)


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


@pytest.mark.parametrize(("written", "says"), [
    (b"{not json", "corrupt, not readable as JSON"),
    (b"\xff\xfe", "corrupt, not readable as JSON"),
    (b"[1, 2]", "not a fitted two-stage gate"),
    (b'{"threshold": 0.9}', "not a fitted two-stage gate"),
])
def test_a_corrupt_cascade_file_is_named(
        snips_rows: tuple[list[dict[str, str]], list[dict[str, str]], list[str]], tmp_path: Path,
        written: bytes, says: str) -> None:
    train, _, labels = snips_rows
    config = load_config(write_config(tmp_path, train[::4], labels, cascade=True))
    train_from_config(config, progress=False, feedback=False)
    file = tmp_path / "gate" / CASCADE_FILE
    file.write_bytes(written)
    with pytest.raises(GateArtifactMismatch) as info:
        load_gate(config)
    assert str(info.value).startswith(f"{file}: {says}") and "moe train --config" in str(info.value)


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


def test_the_cascade_is_fitted_on_the_queries_its_stages_held_out_feedback_pinned_or_not(tmp_path: Path) -> None:
    """Feedback's queries are never held out of training (``pinned``). The cascade's split used to leave them
    out of that rule, so a third of its "validation" queries were ones both stages trained on; it holds out what
    they held out now, when moe train fits it and when a load fits it again for other targets."""
    texts = [f"{e} question number {i} about topic {i % 7}" for e in ("math", "code", "chat") for i in range(60)]
    labels = [t.split()[0] for t in texts]
    pinned = frozenset(texts[::3])
    full_encoder = FakeCountingEncoder("~", "fake-hashing-salted")
    fast, full = (train_gate(texts, labels, encoder, experts=["math", "code", "chat"], progress=False,
                             pinned=pinned, refit=False) for encoder in (FakeCountingEncoder(), full_encoder))
    held_out = full.metadata.metrics.n_val
    assert held_out == fast.metadata.metrics.n_val == 18
    assert CascadeGate.train(full, fast, texts, labels, agreement=0.9, pinned=pinned).fit.n_val == held_out
    cascade = CascadeGate.train(full, fast, texts, labels, agreement=0.9)
    assert cascade.fit.n_val != held_out  # unpinned, the split differs: what moe train used to fit on
    assert full.pinned_texts == fast.pinned_texts == pinned  # train_gate keeps them, and the artifact with it
    CascadeGate.train(full, fast, texts, labels, agreement=0.9, pinned=pinned).save(tmp_path / "gate")
    loaded = CascadeGate.load(tmp_path / "gate", FakeCountingEncoder(), full_encoder)
    assert loaded.full.pinned_texts == pinned
    assert loaded.with_targets(agreement=0.8, familiar=0.7).fit.n_val == held_out
