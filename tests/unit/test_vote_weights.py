"""Learned vote weights: fitted jointly, they discount experts that err together; saved, loaded, trained from a
config and served by the vote combiner."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from router.build import VoteWeightsNotTrained, build_orchestrator, load_vote_weights
from router.combine import Vote, WeightedAnswer, extract_choice, extract_number
from router.config import ConfigError, RouterConfig, parse_config
from router.outcome import OutcomeRecord, load_outcome_jsonl
from router.vote_weights import (
    ANSWER_BIAS_GRID,
    CV_FOLDS,
    CV_MIN_RECORDS,
    FILE_NAME,
    L2_GRID,
    VoteWeights,
    cross_validate,
    fit_from_records,
    fit_vote_weights,
    length_feature,
    vote_accuracy,
)

LETTERS = "ABCD"
EXPERTS = ["solo", "twin-1", "twin-2"]


Answer = Callable[[int, float], str]  # (the right letter's index, p) -> right with probability p, else a wrong one


def _questions(n: int, seed: int,
               panel: Callable[[np.random.Generator, int, Answer], list[str | None]]) -> tuple[
                   list[list[str | None]], list[str]]:
    """``n`` four-choice questions, each answered by ``panel(rng, right, answer)``."""
    rng = np.random.default_rng(seed)
    answers: list[list[str | None]] = []
    target: list[str] = []

    def answer(right: int, p: float) -> str:
        return LETTERS[right] if rng.random() < p else LETTERS[(right + int(rng.integers(1, 4))) % 4]

    for _ in range(n):
        right = int(rng.integers(4))
        answers.append(panel(rng, right, answer))
        target.append(LETTERS[right])
    return answers, target


def _copies(n: int, seed: int) -> tuple[list[list[str | None]], list[str]]:
    """Four-choice questions. ``solo`` is right 80% of the time on its own; ``twin-1`` and ``twin-2`` are one
    65% model recorded twice, so they always give the same letter and always err together."""

    def panel(rng: np.random.Generator, right: int, answer: Answer) -> list[str | None]:
        twin = answer(right, 0.65)
        return [answer(right, 0.80), twin, twin]

    return _questions(n, seed, panel)


def _vote_accuracy(answers: list[list[str | None]], target: list[str], weights: np.ndarray) -> float:
    vote = Vote("choice", learned=dict(zip(EXPERTS, weights.tolist(), strict=True)))
    right = 0
    for row, gold in zip(answers, target, strict=True):
        panel = [WeightedAnswer(e, 1 / 3, a or "") for e, a in zip(EXPERTS, row, strict=True)]
        right += vote.combine(panel).content == gold
    return right / len(target)


def test_joint_fit_discounts_experts_that_err_together() -> None:
    answers, target = _copies(3000, seed=0)
    learned = fit_vote_weights(answers, target, EXPERTS, l2=1.0)
    w = learned.as_mapping()
    # Counted separately the twins outvote solo whenever they agree with each other; jointly they are one voter.
    assert w["solo"] > w["twin-1"] + w["twin-2"]
    test_answers, test_target = _copies(3000, seed=1)
    logodds = np.log(3 * np.array([0.80, 0.65, 0.65]) / (1 - np.array([0.80, 0.65, 0.65])))
    independent = _vote_accuracy(test_answers, test_target, logodds)
    joint = _vote_accuracy(test_answers, test_target, learned.weights)
    solo_alone = float(np.mean([row[0] == gold for row, gold in zip(test_answers, test_target, strict=True)]))
    assert independent == pytest.approx(0.65, abs=0.03)  # the twins decide every question: 65%
    assert joint >= solo_alone - 0.005 and joint > independent + 0.1
    teachable = sum(gold in row for row, gold in zip(answers, target, strict=True))  # somebody was right
    assert learned.metrics["records_used"] == teachable < 3000 and learned.metrics["converged"]


def test_an_expert_that_never_answered_learns_no_weight() -> None:
    answers, target = _copies(500, seed=2)
    silent = [[row[0], row[1], None] for row in answers]  # twin-2 never answers
    learned = fit_vote_weights(silent, target, EXPERTS, l2=1.0).as_mapping()
    assert learned["twin-2"] == pytest.approx(0.0, abs=1e-3) and learned["solo"] > 0.5


def test_records_that_cannot_teach_are_left_out_and_bad_input_is_named() -> None:
    answers: list[list[str | None]] = [["A", "B", "B"], ["C", "C", None], [None, None, None], ["A", "A", "A"]]
    learned = fit_vote_weights(answers, ["A", "D", "B", None], EXPERTS)
    assert learned.metrics["records"] == 4 and learned.metrics["records_used"] == 1  # only the first
    with pytest.raises(ValueError, match="no record has its right answer"):
        fit_vote_weights([["A", "B", "C"]], ["D"], EXPERTS)
    with pytest.raises(ValueError, match=r"one answer slot per expert \(3\)"):
        fit_vote_weights([["A", "B"]], ["A"], EXPERTS)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    answers, target = _copies(200, seed=3)
    learned = fit_vote_weights(answers, target, EXPERTS)
    learned.save(tmp_path)
    again = VoteWeights.load(tmp_path)
    assert again is not None and again.experts == learned.experts and again.metrics == learned.metrics
    assert np.allclose(again.weights, learned.weights) and again.median_chars is None
    answers3, target3, lengths = _with_lengths(300, seed=8)
    lengths = [[None, *row[1:]] for row in lengths]  # solo's lengths unknown: its median is too
    fitted = fit_vote_weights(answers3, target3, EXPERTS, lengths=lengths)
    fitted.save(tmp_path / "")
    loaded = VoteWeights.load(tmp_path)
    assert loaded is not None and loaded.length_coef == fitted.length_coef != 0.0 and loaded.median_chars is not None
    assert np.isnan(loaded.median_chars[0]) and np.allclose(loaded.median_chars[1:], fitted.median_chars[1:])  # type: ignore[index]
    assert loaded.count_for("solo", 5) == pytest.approx(loaded.weights[0])  # no median: no length term
    assert loaded.count_for("newcomer", 5) is None
    # A file written before the length term (format 1) loads as weights alone.
    (tmp_path / FILE_NAME).write_text(json.dumps({"format": 1, "experts": ["a", "b"], "weights": [1, 2]}),
                                      encoding="utf-8")
    old = VoteWeights.load(tmp_path)
    assert old is not None and old.length_coef == 0.0 and old.count_for("b", 10) == 2.0
    assert VoteWeights.load(tmp_path / "elsewhere") is None
    (tmp_path / FILE_NAME).write_text(json.dumps({"format": 99}), encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{FILE_NAME}: unknown format 99"):
        VoteWeights.load(tmp_path)
    (tmp_path / FILE_NAME).write_text(json.dumps({"format": 1, "experts": ["a"], "weights": [1, 2]}),
                                      encoding="utf-8")
    with pytest.raises(ValueError, match="2 weights for 1 experts"):
        VoteWeights.load(tmp_path)


def _with_lengths(n: int, seed: int) -> tuple[list[list[str | None]], list[str], list[list[float | None]]]:
    """``_copies`` with a length per answer: a right answer runs about 1.5x its expert's usual length, a wrong
    one about 0.67x (an expert that gives up early, or cuts its reasoning short, is more often wrong)."""
    answers, target = _copies(n, seed)
    rng = np.random.default_rng(seed + 100)
    usual = {"solo": 800.0, "twin-1": 300.0, "twin-2": 300.0}
    lengths: list[list[float | None]] = []
    for row, gold in zip(answers, target, strict=True):
        twin = usual["twin-1"] * float(np.exp(rng.normal(0.4 if row[1] == gold else -0.4, 0.3)))
        lengths.append([usual["solo"] * float(np.exp(rng.normal(0.4 if row[0] == gold else -0.4, 0.3))),
                        twin, twin])  # one model recorded twice: the same answer, the same length
    return answers, target, lengths


def _served(vote: Vote, answers: list[list[str | None]], lengths: list[list[float | None]]) -> list[str]:
    """What ``vote`` answers, run on answers whose text has the recorded length and ends with the letter."""
    out = []
    for row, size in zip(answers, lengths, strict=True):
        panel = [WeightedAnswer(e, 1 / 3, "x" * max(int(n or 0) - 18, 0) + f" The answer is ({a})")
                 for e, a, n in zip(EXPERTS, row, size, strict=True) if a]
        out.append(extract_choice(vote.combine(panel).content) or "")
    return out


def test_the_length_term_learns_what_length_says_and_is_served() -> None:
    answers, target, lengths = _with_lengths(3000, seed=5)
    plain = fit_vote_weights(answers, target, EXPERTS, l2=1.0)
    with_length = fit_vote_weights(answers, target, EXPERTS, l2=1.0, lengths=lengths)
    assert plain.length_coef == 0.0 and plain.median_chars is None
    assert with_length.length_coef > 0.5  # longer than usual: more likely right
    assert with_length.median_chars is not None
    assert with_length.median_chars[0] == pytest.approx(np.median([row[0] for row in lengths]))
    test_answers, test_target, test_lengths = _with_lengths(3000, seed=6)
    right = {name: float(np.mean([a == g for a, g in zip(_served(Vote("choice", learned=w), test_answers,
                                                                   test_lengths), test_target, strict=True)]))
             for name, w in (("plain", plain), ("length", with_length))}
    assert right["length"] > right["plain"] + 0.03, right
    # The vectorised count (what the offline suites score) is what the served vote counts.
    chars = np.array(test_lengths[:50], dtype=float)
    assert np.allclose(with_length.counted(chars)[:, 0],
                       [with_length.count_for("solo", int(n)) for n in chars[:, 0]], atol=1e-2)


def test_length_that_says_nothing_learns_no_length_term() -> None:
    answers, target = _copies(3000, seed=7)
    rng = np.random.default_rng(7)
    noise: list[list[float | None]] = [[float(rng.integers(100, 2000)) for _ in EXPERTS] for _ in answers]
    learned = fit_vote_weights(answers, target, EXPERTS, l2=1.0, lengths=noise)
    assert abs(learned.length_coef) < 0.1
    with pytest.raises(ValueError, match="lengths need one slot per expert"):
        fit_vote_weights(answers, target, EXPERTS, lengths=noise[:10])


def test_targets_come_from_the_experts_that_succeeded() -> None:
    records = [
        OutcomeRecord("q1", {"solo": 1.0, "twin-1": 0.0}, {}, {"solo": "The answer is (B).", "twin-1": "A"}),
        # Two successful experts with different answers: the right one is unknown, so the record is skipped.
        OutcomeRecord("q2", {"solo": 1.0, "twin-1": 1.0}, {}, {"solo": "B", "twin-1": "C"}),
        OutcomeRecord("q3", {"solo": 0.0}, {}, {}),  # no answers at all
    ]
    learned = fit_from_records(records, EXPERTS, extract_choice)
    assert learned.metrics["records_with_answers"] == 2 and learned.metrics["records_used"] == 1
    with pytest.raises(ValueError, match="carry 'answers'"):
        fit_from_records(records[2:], EXPERTS, extract_choice)


def test_an_experts_own_extractor_reads_its_answers_when_fitting() -> None:
    """An expert that answers with a number (``experts[].extractor: number``) is read as the vote will read it:
    with the choice extractor its answers say nothing, so its record teaches nothing."""
    records = [OutcomeRecord(f"q{i}", {"solo": 1.0, "twin-1": 1.0}, {}, {"solo": "42", "twin-1": "It is 42."})
               for i in range(3)]
    with pytest.raises(ValueError, match="nothing to fit vote weights on"):
        fit_from_records(records, EXPERTS, extract_choice)
    own = fit_from_records(records, EXPERTS, extract_choice, per_expert={"solo": extract_number,
                                                                         "twin-1": extract_number})
    assert own.metrics["records_used"] == 3


def test_vote_counts_learned_weights_not_panel_weights() -> None:
    panel = [WeightedAnswer("solo", 0.2, "B"), WeightedAnswer("twin-1", 0.4, "A"), WeightedAnswer("twin-2", 0.4, "A")]
    assert Vote("choice").combine(panel).content == "A"  # the gate's weights: 0.8 for A
    learned = Vote("choice", learned={"solo": 1.5, "twin-1": 0.5, "twin-2": 0.3})
    combined = learned.combine(panel)
    assert combined.content == "B" and combined.expert == "solo"
    assert [(c.expert, round(c.weight, 6), c.agreed) for c in combined.contributions] == [
        ("solo", 1.5, True), ("twin-1", 0.5, False), ("twin-2", 0.3, False)]
    # An expert added after training counts for the mean learned weight; zero weights leave the gate to decide.
    newcomer = Vote("choice", learned={"solo": 0.2, "twin-1": 1.0})
    assert newcomer.combine([WeightedAnswer("solo", 0.1, "B"), WeightedAnswer("new", 0.9, "C")]).content == "C"
    zeros = Vote("choice", learned={"twin-1": 0.0, "twin-2": 0.0})
    assert zeros.combine([WeightedAnswer("twin-1", 0.3, "A"), WeightedAnswer("twin-2", 0.7, "D")]).content == "D"


def _config(tmp_path: Path, train_data: list[str], **combiner: Any) -> RouterConfig:
    experts = [{"name": n, "type": "openai", "endpoint": "http://127.0.0.1:9/v1", "model": "m"} for n in EXPERTS]
    raw = {"version": 1, "experts": experts, "combiner": {"strategy": "vote", **combiner},
           "gate": {"train_data": train_data, "artifact": "out/gate", "top_k": {"policy": "fixed", "k": 3}}}
    return parse_config(raw, base_dir=tmp_path, check_env=False)


def _outcome_file(path: Path, n: int) -> Path:
    answers, target = _copies(n, seed=4)
    with open(path, "w", encoding="utf-8") as fh:
        for i, (row, right) in enumerate(zip(answers, target, strict=True)):
            fh.write(json.dumps({
                "query": f"question {i}: which of four options is right?",
                "outcomes": {e: float(a == right) for e, a in zip(EXPERTS, row, strict=True)},
                "answers": {e: f"The answer is ({a})." for e, a in zip(EXPERTS, row, strict=True) if a}}) + "\n")
    return path


def test_outcome_jsonl_carries_answers_and_names_a_bad_one(tmp_path: Path) -> None:
    records = load_outcome_jsonl(_outcome_file(tmp_path / "o.jsonl", 2))
    assert records[0].answers["solo"].startswith("The answer is (")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"query": "q", "outcomes": {"solo": 1}, "answers": {"solo": 3}}) + "\n",
                   encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: answers\['solo'\] must be a string"):
        load_outcome_jsonl(bad)


def test_moe_train_writes_learned_weights_and_the_service_votes_with_them(tmp_path: Path) -> None:
    from router.train import train_from_config

    _outcome_file(tmp_path / "o.jsonl", 600)
    config = _config(tmp_path, ["o.jsonl"], vote_weights="learned")
    with pytest.raises(VoteWeightsNotTrained, match="moe train"):
        load_vote_weights(config)
    train_from_config(config, progress=False)
    assert (tmp_path / "out" / "gate" / FILE_NAME).is_file()
    weights = load_vote_weights(config)
    assert weights is not None
    w = weights.as_mapping()
    assert w["solo"] > w["twin-1"] + w["twin-2"]
    # Every answer in this file is "The answer is (X).": one length, so the length term learns nothing.
    assert weights.metrics["length_term"] and weights.length_coef == pytest.approx(0.0, abs=1e-6)
    orchestrator = build_orchestrator(config)
    combiner = orchestrator.combiner
    assert isinstance(combiner, Vote) and combiner.learned is not None
    assert combiner.learned.experts == weights.experts and np.allclose(combiner.learned.weights, weights.weights)
    assert load_vote_weights(_config(tmp_path, ["o.jsonl"])) is None  # the default counts the gate's weights


def test_learned_weights_need_outcome_records_with_answers(tmp_path: Path) -> None:
    from router.train import train_from_config

    (tmp_path / "l.jsonl").write_text(json.dumps({"query": "q", "label": "solo"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="needs outcome records with 'answers'"):
        train_from_config(_config(tmp_path, ["l.jsonl"], vote_weights="learned"), progress=False)
    (tmp_path / "o.jsonl").write_text(json.dumps({"query": "q", "outcomes": {"solo": 1}}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="carry 'answers'"):
        train_from_config(_config(tmp_path, ["o.jsonl"], vote_weights="learned"), progress=False)
    assert not (tmp_path / "out").exists()  # refused before anything was trained or written


# ---------------------------------------------------------------- the answer bias

BIASED = ["lazy", "solo", "other"]


def _favourite(n: int, seed: int) -> tuple[list[list[str | None]], list[str]]:
    """Four-choice questions. ``lazy`` is right 70% of the time and otherwise answers "A", its favourite, so
    its "A" is right only about half the time and every other letter it gives is right; ``solo`` and ``other``
    are right 60% of the time each and otherwise pick a wrong letter at random, independently."""

    def panel(rng: np.random.Generator, right: int, answer: Answer) -> list[str | None]:
        lazy = LETTERS[right] if rng.random() < 0.7 else "A"
        return [lazy, answer(right, 0.6), answer(right, 0.6)]

    return _questions(n, seed, panel)


def _accuracy_of(weights: VoteWeights, answers: list[list[str | None]], target: list[str]) -> float:
    vote = Vote("choice", learned=weights)
    right = 0
    for row, gold in zip(answers, target, strict=True):
        panel = [WeightedAnswer(e, 1 / 3, f"({a})" if a else "") for e, a in zip(BIASED, row, strict=True)]
        right += vote.combine(panel).content == f"({gold})"
    return right / len(target)


def test_answer_bias_learns_a_favourite_letter_and_the_vote_gains() -> None:
    answers, target = _favourite(3000, seed=11)
    plain = fit_vote_weights(answers, target, BIASED, l2=1.0)
    biased = fit_vote_weights(answers, target, BIASED, l2=1.0, answer_bias_l2=1.0)
    assert plain.answer_bias == {} and plain.metrics["answer_biases"] == 0
    # Every (expert, letter) pair was given at least BIAS_MIN_ANSWERS times: 3 experts x 4 letters.
    assert biased.metrics["answer_biases"] == 12 and biased.metrics["answer_bias_l2"] == 1.0
    lazy = biased.answer_bias["lazy"]
    # lazy's "A" is worth far less than its other letters; solo and other have no favourite to learn.
    assert lazy["A"] < min(lazy["B"], lazy["C"], lazy["D"]) - 3.0
    for expert in ("solo", "other"):
        spread = max(biased.answer_bias[expert].values()) - min(biased.answer_bias[expert].values())
        assert spread < 0.5
    test_answers, test_target = _favourite(2000, seed=12)
    with_bias, without = _accuracy_of(biased, test_answers, test_target), _accuracy_of(plain, test_answers,
                                                                                        test_target)
    assert with_bias > without + 0.03  # lazy's "A" no longer outvotes solo and other agreeing on the right one
    # The combiner counts lazy's "A" for weight + bias, clipped at 0, and reports it.
    combined = Vote("choice", learned=biased).combine(
        [WeightedAnswer("lazy", 0.5, "(A)"), WeightedAnswer("solo", 0.3, "(B)"), WeightedAnswer("other", 0.2, "(B)")])
    counted = {c.expert: c.weight for c in combined.contributions}
    assert counted["lazy"] == pytest.approx(max(0.0, biased.weights[0] + lazy["A"]), abs=1e-6)
    assert combined.content == "(B)"


def test_answer_bias_only_for_answers_given_often_and_bad_penalties_are_named() -> None:
    answers: list[list[str | None]] = [["A", "A", None]] * 30 + [["B", "A", None]] * 5
    target = ["A"] * 30 + ["B"] * 5
    fitted = fit_vote_weights(answers, target, ["x", "y", "z"], answer_bias_l2=10.0)
    assert set(fitted.answer_bias) == {"x", "y"} and set(fitted.answer_bias["x"]) == {"A"}  # "B": only 5 times
    assert fitted.count_for("x", 3, "B") == pytest.approx(fitted.count_for("x", 3))  # no bias: the weight alone
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="answer_bias_l2 must be a positive number"):
            fit_vote_weights(answers, target, ["x", "y", "z"], answer_bias_l2=bad)


def test_answer_bias_round_trip_format_and_bad_files(tmp_path: Path) -> None:
    answers, target = _favourite(600, seed=13)
    biased = fit_vote_weights(answers, target, BIASED, answer_bias_l2=3.0)
    biased.save(tmp_path)
    doc = json.loads((tmp_path / FILE_NAME).read_text(encoding="utf-8"))
    assert doc["format"] == 3 and set(doc["answer_bias"]) == set(BIASED)
    loaded = VoteWeights.load(tmp_path)
    assert loaded is not None and loaded.answer_bias == biased.answer_bias
    assert loaded.count_for("lazy", 3, "A") == pytest.approx(biased.count_for("lazy", 3, "A"))
    assert loaded.count_for("lazy", 3, "A") != pytest.approx(loaded.count_for("lazy", 3, "B"))
    assert loaded.restrict(["solo", "lazy"]).answer_bias.keys() == {"solo", "lazy"}
    # Without biases the file stays format 2, which code from before the bias reads.
    fit_vote_weights(answers, target, BIASED).save(tmp_path)
    assert json.loads((tmp_path / FILE_NAME).read_text(encoding="utf-8"))["format"] == 2
    for bias, message in (({"ghost": {"A": 1.0}}, "answer biases for experts without a weight: ghost"),
                          ({"solo": {"A": "much"}}, "malformed"),
                          ({"solo": {"A": None}}, "malformed")):
        (tmp_path / FILE_NAME).write_text(json.dumps({**doc, "answer_bias": bias}), encoding="utf-8")
        with pytest.raises(ValueError, match=message):
            VoteWeights.load(tmp_path)
    with pytest.raises(ValueError, match="lazy's answer bias for 'A' must be a finite number"):
        VoteWeights(experts=tuple(BIASED), weights=np.ones(3), answer_bias={"lazy": {"A": float("nan")}})


def test_moe_train_fits_the_answer_bias_when_the_config_asks(tmp_path: Path) -> None:
    from router.train import train_from_config

    with open(tmp_path / "o.jsonl", "w", encoding="utf-8") as fh:
        answers, target = _favourite(800, seed=14)
        for i, (row, right) in enumerate(zip(answers, target, strict=True)):
            fh.write(json.dumps({
                "query": f"question {i}: which of four options is right?",
                "outcomes": {e: float(a == right) for e, a in zip(BIASED, row, strict=True)},
                "answers": {e: f"The answer is ({a})." for e, a in zip(BIASED, row, strict=True) if a}}) + "\n")
    experts = [{"name": n, "type": "openai", "endpoint": "http://127.0.0.1:9/v1", "model": "m"} for n in BIASED]

    def config(**combiner: Any) -> RouterConfig:
        raw = {"version": 1, "experts": experts,
               "combiner": {"strategy": "vote", "vote_weights": "learned", **combiner},
               "gate": {"train_data": ["o.jsonl"], "artifact": "out/gate", "top_k": {"policy": "fixed", "k": 3}}}
        return parse_config(raw, base_dir=tmp_path, check_env=False)

    train_from_config(config(), progress=False)
    plain = load_vote_weights(config())
    assert plain is not None and plain.answer_bias == {}  # off by default
    train_from_config(config(vote_answer_bias=True), progress=False)
    biased = load_vote_weights(config(vote_answer_bias=True))
    assert biased is not None and biased.answer_bias["lazy"]["A"] < biased.answer_bias["lazy"]["B"] - 0.3
    combiner = build_orchestrator(config(vote_answer_bias=True)).combiner
    assert isinstance(combiner, Vote) and combiner.learned is not None
    assert combiner.learned.answer_bias == biased.answer_bias


# ---------------------------------------------------------------- penalties chosen by cross-validation


def test_vote_accuracy_counts_the_weighted_vote_over_every_answer() -> None:
    weights = VoteWeights(experts=("a", "b", "c"), weights=np.array([1.0, 0.4, 0.4]))
    answers: list[list[str | None]] = [["A", "B", "B"], ["A", "A", None], ["C", "B", "B"], ["D", "D", "D"]]
    # Record 0: a's A (1.0) beats B (0.4 + 0.4), right; record 1: right; record 2: B's 0.8 loses to a's C, wrong;
    # record 3: its right answer is not among its answers, so it is not scored.
    assert vote_accuracy(weights, answers, ["A", "A", "B", "C"]) == (2, 3)
    heavier = VoteWeights(experts=("a", "b", "c"), weights=np.array([1.0, 0.6, 0.6]))
    assert vote_accuracy(heavier, answers, ["A", "A", "B", "C"]) == (2, 3)  # now record 0 is lost, 2 is won
    biased = VoteWeights(experts=("a", "b", "c"), weights=np.array([1.0, 0.4, 0.4]), answer_bias={"a": {"C": -0.9}})
    assert vote_accuracy(biased, answers, ["A", "A", "B", "C"]) == (3, 3)


def test_cross_validation_keeps_a_bias_the_records_support_and_drops_one_they_do_not() -> None:
    answers, target = _favourite(1500, seed=21)
    cv = cross_validate(answers, target, BIASED, answer_bias=True)
    assert cv["folds"] == CV_FOLDS and cv["records"] == sum(t in row for row, t in zip(answers, target, strict=True))
    grid = {(g["l2"], g["answer_bias_l2"]): g["accuracy"] for g in cv["grid"]}
    assert {l2 for l2, bias in grid if bias is None} == set(L2_GRID)
    assert {bias for l2, bias in grid if l2 == cv["l2"]} == {None, *ANSWER_BIAS_GRID}
    assert cv["l2"] in L2_GRID and cv["answer_bias_l2"] in ANSWER_BIAS_GRID  # lazy's "A" is worth learning
    assert grid[(cv["l2"], cv["answer_bias_l2"])] > grid[(cv["l2"], None)] + 0.03
    # Experts with no favourite: no bias wins (or ties, and the tie keeps none).
    plain, plain_target = _copies(1500, seed=22)
    assert cross_validate(plain, plain_target, EXPERTS, answer_bias=True)["answer_bias_l2"] is None


def test_cross_validation_needs_enough_records_and_fixed_penalties_skip_it() -> None:
    answers, target = _favourite(40, seed=23)
    few = cross_validate(answers, target, BIASED, answer_bias=True)
    assert few == {"l2": 10.0, "answer_bias_l2": 100.0, "folds": 0, "records": few["records"], "grid": []}
    assert few["records"] < CV_MIN_RECORDS
    answers, target = _favourite(600, seed=24)
    fixed = cross_validate(answers, target, BIASED, l2=3.0, answer_bias=True, answer_bias_l2=7.0)
    assert (fixed["l2"], fixed["answer_bias_l2"], fixed["folds"], fixed["grid"]) == (3.0, 7.0, 0, [])
    only_bias = cross_validate(answers, target, BIASED, l2=3.0, answer_bias=True)
    assert {g["l2"] for g in only_bias["grid"]} == {3.0} and len(only_bias["grid"]) == 1 + len(ANSWER_BIAS_GRID)


def test_moe_train_chooses_the_penalties_by_cross_validation(tmp_path: Path) -> None:
    from router.train import train_from_config

    _outcome_file(tmp_path / "o.jsonl", 600)
    train_from_config(_config(tmp_path, ["o.jsonl"], vote_weights="learned"), progress=False)
    weights = load_vote_weights(_config(tmp_path, ["o.jsonl"], vote_weights="learned"))
    assert weights is not None
    cv = weights.metrics["cross_validation"]
    assert cv["folds"] == CV_FOLDS and weights.metrics["l2"] == cv["l2"] in L2_GRID
    assert [g["l2"] for g in cv["grid"]] == sorted(L2_GRID, reverse=True) and cv["answer_bias_l2"] is None
    fixed = _config(tmp_path, ["o.jsonl"], vote_weights="learned", vote_l2=2.5)
    train_from_config(fixed, progress=False)
    weights = load_vote_weights(fixed)
    assert weights is not None and weights.metrics["l2"] == 2.5 and "cross_validation" not in weights.metrics
    for field in ("vote_l2", "vote_answer_bias_l2"):
        for bad in (0, -1, "auto", float("nan")):
            with pytest.raises(ConfigError, match=field):
                _config(tmp_path, ["o.jsonl"], vote_weights="learned", **{field: bad})


def test_retraining_without_learned_weights_removes_the_old_ones(tmp_path: Path) -> None:
    """Weights fitted on earlier records must not outlive the gate trained with them: a config switched back to
    learned weights without retraining is refused, not served with stale ones."""
    from router.build import VoteWeightsNotTrained
    from router.train import train_from_config

    _outcome_file(tmp_path / "o.jsonl", 200)
    learned = _config(tmp_path, ["o.jsonl"], vote_weights="learned")
    train_from_config(learned, progress=False)
    assert load_vote_weights(learned) is not None
    train_from_config(_config(tmp_path, ["o.jsonl"], vote_weights="gate"), progress=False)
    assert not (tmp_path / "out" / "gate" / "vote_weights.json").exists()
    with pytest.raises(VoteWeightsNotTrained, match=r"holds no vote_weights\.json"):
        load_vote_weights(learned)


# ---------------------------------------------------------------- weights refused, empty answers, ties


@pytest.mark.parametrize(("weights", "message"), [
    ([float("nan"), 1.0, 1.0], "a's weight must be a finite number >= 0, not nan"),
    ([1.0, float("inf"), 1.0], "b's weight must be a finite number >= 0, not inf"),
    ([1.0, 1.0, -6.0], "c's weight must be a finite number >= 0, not -6.0"),
])
def test_nan_infinite_or_negative_weights_are_refused_naming_the_expert(tmp_path: Path, weights: list[float],
                                                                        message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VoteWeights(experts=("a", "b", "c"), weights=np.array(weights))
    # json writes NaN and Infinity, and reads them back: the file is refused as the constructor refuses them.
    (tmp_path / FILE_NAME).write_text(json.dumps({"format": 2, "experts": ["a", "b", "c"], "weights": weights}),
                                      encoding="utf-8")
    with pytest.raises(ValueError, match=f"{FILE_NAME}: malformed .*{message}"):
        VoteWeights.load(tmp_path)
    with pytest.raises(ValueError, match=message):
        Vote("choice", learned=dict(zip("abc", weights, strict=True)))


def test_an_expert_without_a_learned_weight_counts_for_the_mean_never_below_zero() -> None:
    vote = Vote("choice", learned={"a": 0.0, "b": 0.5, "c": 1.0})
    result = vote.combine([WeightedAnswer("b", 0.5, "Answer: B"), WeightedAnswer("new", 0.5, "Answer: A")])
    assert [(c.expert, round(c.weight, 6)) for c in result.contributions] == [("b", 0.5), ("new", 0.5)]
    assert result.content == "Answer: B"  # 0.5 each, learned and in the panel: the first listed
    zeros = Vote("choice", learned={"a": 0.0, "b": 0.0})
    assert zeros.counted(WeightedAnswer("new", 0.5, "Answer: A"), "A") == pytest.approx(0.5e-9)


def test_an_empty_answer_gets_no_length_term() -> None:
    assert length_feature(np.array([0.0, 50.0, np.nan]), np.array([100.0, 100.0, 100.0])).tolist() == [
        0.0, pytest.approx(np.log(0.5)), 0.0]
    weights = VoteWeights(experts=("a", "b"), weights=np.array([1.0, 1.0]), length_coef=-0.12,
                          median_chars=np.array([100.0, 100.0]))
    assert weights.count_for("a", 0) == 1.0 and weights.count_for("b", 100) == 1.0
    # Nothing extractable: the vote falls back to the top answer by what each counts for, the gate breaking ties.
    unsure = "I cannot tell which option is right without the figure."  # 56 chars: longer by the length term
    result = Vote("choice", learned=weights).combine([WeightedAnswer("b", 0.7, unsure), WeightedAnswer("a", 0.3, "")])
    assert result.expert == "b"
    counted = [c.weight for c in result.contributions]
    assert counted == [pytest.approx(1.0 - 0.12 * np.log(len(unsure) / 100) + 0.7e-9, abs=1e-15),
                       pytest.approx(1.0 + 0.3e-9, abs=1e-15)]


def test_learned_vote_ties_go_to_the_panel_weights_however_small_the_learned_counts() -> None:
    # Learned counts of 0: the gate votes, A's 0.3 + 0.3 over B's 0.5 (below the 9 places the tallies are rounded
    # to, as TIE_BREAK times the panel weight, but compared on their own).
    zeros = Vote("choice", learned={"x": 0.0, "y": 0.0, "z": 0.0})
    panel = [WeightedAnswer("x", 0.5, "Answer: B"), WeightedAnswer("y", 0.3, "Answer: A"),
             WeightedAnswer("z", 0.3, "Answer: A")]
    assert zeros.combine(panel).content == "Answer: A"
    # Learned tallies equal up to float rounding (0.1 + 0.2 against 0.3): the panel weights decide, in any order.
    equal = Vote("choice", learned={"x": 0.3, "y": 0.1, "z": 0.2})
    for order in (panel, panel[::-1]):
        assert equal.combine(order).content == "Answer: A"
    light = [WeightedAnswer("x", 0.7, "Answer: B"), WeightedAnswer("y", 0.2, "Answer: A"),
             WeightedAnswer("z", 0.1, "Answer: A")]
    for order in (light, light[::-1]):
        assert equal.combine(order).content == "Answer: B"


def test_moe_train_fits_the_weights_on_answers_pooled_as_the_vote_reads_them() -> None:
    """An expert with its own extractor: its right "b" and another's right "B" were two right answers, so no
    record taught anything (moe train failed), and an answer bias learned under "b" was never looked up as the
    pooled "B" the vote serves."""
    from router.train import TrainingData, _learned_vote_weights

    experts = [{"name": n, "type": "openai", "endpoint": "http://127.0.0.1:9/v1", "model": n, "examples": ["q"],
                **({"extractor": "short"} if n == "s" else {})} for n in ("a", "s", "c")]
    config = parse_config({"version": 1, "experts": experts,
                           "combiner": {"strategy": "vote", "extractor": "choice", "vote_weights": "learned",
                                        "vote_l2": 10.0, "vote_length": False}}, check_env=False)
    records = [OutcomeRecord(query=f"q{i}", outcomes={"a": 1.0, "s": 1.0, "c": 0.0}, cost={},
                             answers={"a": "The answer is B.", "s": "b", "c": "The answer is C."}) for i in range(30)]
    weights = _learned_vote_weights(config, TrainingData("outcome", records=records), progress=False)
    assert weights is not None
    mapping = weights.as_mapping()
    assert mapping["a"] > mapping["c"] and mapping["s"] > mapping["c"]
