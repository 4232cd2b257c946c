"""Gathering labelled data from a config and training the gate it describes."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from router.build import load_gate
from router.config import ConfigError, RouterConfig, parse_config
from router.gate import Gate
from router.outcome_gate import OutcomeGate
from router.train import collect_training_data, load_labelled_jsonl, train_from_config

INTENTS = ["GetWeather", "PlayMusic", "BookRestaurant"]


def _config(tmp_path: Path, train_data: list[str], **gate: Any) -> RouterConfig:
    experts = [{"name": name, "type": "openai", "endpoint": "http://127.0.0.1:9/v1", "model": "m",
                "examples": [f"an example for {name}"]} for name in INTENTS]
    raw = {"version": 1, "experts": experts, "gate": {"train_data": train_data, **gate}}
    return parse_config(raw, base_dir=tmp_path, check_env=False)


def _write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def snips_rows(data_dir: Path) -> list[dict[str, str]]:
    """20 SNIPS training queries for each of three intents, as {"query", "label"}."""
    rows: list[dict[str, str]] = []
    with open(data_dir / "snips" / "snips_2017_custom_intents.csv", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row["split"] == "train" and row["intent"] in INTENTS and \
                    sum(r["label"] == row["intent"] for r in rows) < 20:
                rows.append({"query": row["text"], "label": row["intent"]})
    return rows


def test_load_labelled_jsonl_skips_blank_lines(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [{"query": "q1", "label": "A"}, "", {"query": "q2", "label": "B"}])
    assert load_labelled_jsonl(path) == [("q1", "A"), ("q2", "B")]


def test_an_integer_label_names_the_expert_of_that_number_as_moe_eval_reads_it(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [{"query": "q1", "label": 3}, {"query": "q2", "label": "3"}])
    assert load_labelled_jsonl(path) == [("q1", "3"), ("q2", "3")]


@pytest.mark.parametrize(("bad", "problem"), [
    ('{"query": "q", "label": ', "not valid JSON"),
    ('["q", "A"]', "expected an object"),
    ('{"query": "q"}', "'label' missing"),
    ('{"query": "q", "outcomes": {"A": 1}}', r"an outcome record \('query', 'outcomes'\) in a file whose first line is "
                                             "a labelled query"),
    ('{"query": "", "label": "A"}', "'query' must be a non-empty string"),
    ('{"query": "\\u200b\\u0000", "label": "A"}', "'query' must be a non-empty string"),  # what the encoder drops
    ('{"query": "q", "label": true}', "'label' must be a non-empty string"),
    ('{"query": "q", "label": 1.5}', "'label' must be a non-empty string"),
])
def test_malformed_line_is_reported_with_its_number(tmp_path: Path, bad: str, problem: str) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [{"query": "q1", "label": "A"}, "", bad])
    with pytest.raises(ValueError, match=problem) as info:
        load_labelled_jsonl(path)
    assert str(info.value).startswith(f"{path}:3: ")


def test_collect_training_data_joins_examples_and_files(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "extra.jsonl", [{"query": "rain tomorrow?", "label": "GetWeather"}])
    data = collect_training_data(_config(tmp_path, ["extra.jsonl"]))
    assert data.kind == "label"
    assert data.texts == [f"an example for {n}" for n in INTENTS] + ["rain tomorrow?"]
    assert data.labels == [*INTENTS, "GetWeather"]


def test_a_training_file_with_a_bom_is_read_as_its_kind(tmp_path: Path) -> None:
    """A BOM is no error for the loaders, so neither for telling outcome files from labelled ones (an outcome
    file with one was read as labelled, and refused for its missing 'label')."""
    row = {"query": "rain tomorrow?", "outcomes": {"GetWeather": 1.0, "PlayMusic": 0.0}}
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(row).encode() + b"\n")
    data = collect_training_data(_config(tmp_path, ["bom.jsonl"]))
    assert data.kind == "outcome" and [r.query for r in data.records] == ["rain tomorrow?"]


@pytest.mark.parametrize(("content", "line"), [(b"\x1f\x8b\x08\x00gzipped", 1),
                                               (b'{"query": "q", "label": "GetWeather"}\n' * 3 + b"caf\xe9\n", 4)])
def test_a_training_file_that_is_not_utf8_is_named_with_its_line(tmp_path: Path, content: bytes, line: int) -> None:
    (tmp_path / "bad.jsonl").write_bytes(content)
    with pytest.raises(ValueError, match=rf"bad\.jsonl:{line}: not UTF-8 \(byte 0x"):
        collect_training_data(_config(tmp_path, ["bad.jsonl"]))


def test_label_that_is_no_expert_is_named_with_its_line(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "extra.jsonl", [{"query": "q", "label": "GetWeather"}, {"query": "q", "label": "Nope"}])
    with pytest.raises(ValueError) as info:
        collect_training_data(_config(tmp_path, ["extra.jsonl"]))
    assert str(info.value) == (f"{tmp_path / 'extra.jsonl'}:2: label 'Nope' is not an expert of the config; "
                               "experts: GetWeather, PlayMusic, BookRestaurant. If it was removed from the config, "
                               "moe train --drop-unknown-experts leaves its lines out")
    # Several: the first line naming one, and the first line of each other.
    _write_jsonl(tmp_path / "extra.jsonl", [{"query": "q", "label": "GetWeather"}, "", {"query": "q", "label": "b"},
                                            {"query": "q", "label": "a"}, {"query": "q", "label": "b"},
                                            {"query": "q", "label": "c"}])
    with pytest.raises(ValueError, match=r"extra\.jsonl:3: label 'b' is not an expert of the config; nor are 'a' "
                                         r"\(first on line 4\), 'c' \(first on line 6\); experts: GetWeather"):
        collect_training_data(_config(tmp_path, ["extra.jsonl"]))
    # Hundreds of experts: the message names the first 20 and how many more.
    many = parse_config({"version": 1, "experts": [
        {"name": f"intent{i:03d}", "type": "openai", "endpoint": "http://127.0.0.1:9/v1", "model": "m",
         "examples": ["an example"]} for i in range(150)], "gate": {"train_data": ["extra.jsonl"]}},
        base_dir=tmp_path, check_env=False)
    _write_jsonl(tmp_path / "extra.jsonl", [{"query": "q", "label": "nope"}])
    with pytest.raises(ValueError, match=r"; experts: intent000, .*, intent019 and 130 more\. If it was removed"):
        collect_training_data(many)
    # A label the config spells in another case is named with its spelling (a rename, or a typo).
    _write_jsonl(tmp_path / "extra.jsonl", [{"query": "q", "label": "getweather"}])
    with pytest.raises(ValueError, match=r"label 'getweather' is not an expert of the config \(the config spells "
                                         r"'getweather' as 'GetWeather': fix one spelling or the other\); experts:"):
        collect_training_data(_config(tmp_path, ["extra.jsonl"]))


def test_train_from_config_saves_a_loadable_gate(tmp_path: Path, snips_rows: list[dict[str, str]]) -> None:
    (tmp_path / "data").mkdir()
    _write_jsonl(tmp_path / "data" / "snips.jsonl", snips_rows)
    config = _config(tmp_path, ["data/snips.jsonl"], artifact="out/gate")
    gate = train_from_config(config, progress=False)
    assert (tmp_path / "out" / "gate" / "gate.json").is_file()
    assert gate.metadata.metrics.n_train + gate.metadata.metrics.n_val == 63
    loaded = Gate.load(tmp_path / "out" / "gate", gate.encoder)
    loaded.check_experts(config.expert_names)
    probs = loaded.scores(["what's the weather in Paris tomorrow", "play the new album by Adele"])
    assert [loaded.experts[i] for i in probs.argmax(axis=1)] == ["GetWeather", "PlayMusic"]


def test_serving_finishes_the_publish_of_a_first_train_killed_part_way(tmp_path: Path,
                                                                       snips_rows: list[dict[str, str]]) -> None:
    """The first ``moe train`` into a folder, killed after renaming its arrays and before ``gate.json``: the
    folder holds no gate yet, and its sealed stage; loading the gate for serving finishes the publish."""
    from tests.unit.test_files import _killed_stage

    _write_jsonl(tmp_path / "snips.jsonl", snips_rows)
    trained = train_from_config(_config(tmp_path, ["snips.jsonl"], artifact="whole"), progress=False)
    config = _config(tmp_path, ["snips.jsonl"], artifact="gate")
    (tmp_path / "gate").mkdir()
    stage = _killed_stage(tmp_path / "gate", tmp_path / "whole", published=("weights.npz", "examples.npz"))
    assert not (tmp_path / "gate" / "gate.json").exists()
    loaded = load_gate(config)
    assert not stage.exists() and (tmp_path / "gate" / "gate.json").is_file()
    queries = ["what's the weather in Paris tomorrow", "play the new album by Adele"]
    assert np.allclose(loaded.scores(queries), trained.scores(queries))



def test_with_cross_validated_calibration_the_served_classifier_trains_on_every_example(
        tmp_path: Path, snips_rows: list[dict[str, str]]) -> None:
    """Nine held-out queries are too few to calibrate on, so calibration is cross-validated over all 63 examples;
    the served classifier then trains on all 63 too, not on the 54 left after holding those nine out. A two-stage
    gate keeps them out of both stages: its thresholds are fitted on them."""
    from router.cascade import CascadeGate

    _write_jsonl(tmp_path / "snips.jsonl", snips_rows)
    plain = train_from_config(_config(tmp_path, ["snips.jsonl"], artifact="plain"), progress=False)
    assert isinstance(plain, Gate)
    m = plain.metadata.metrics
    assert (m.calibration, m.n_calibration, m.n_train, m.n_val) == ("cross-validated", 63, 63, 0)
    two = train_from_config(_config(tmp_path, ["snips.jsonl"], artifact="two", cascade={}), progress=False)
    assert isinstance(two, CascadeGate) and two.fit.n_val == 9
    for stage in (two.fast, two.full):
        m = stage.metadata.metrics
        assert (m.calibration, m.n_train, m.n_val) == ("cross-validated", 54, 9)


def test_a_gate_from_config_examples_alone_is_calibrated_or_says_it_is_not(
        tmp_path: Path, snips_rows: list[dict[str, str]], caplog: pytest.LogCaptureFixture) -> None:
    # ``moe train`` with experts that have examples and no train_data: six real queries each.
    experts = [{"name": name, "type": "openai", "endpoint": "http://127.0.0.1:9/v1", "model": "m",
                "examples": [r["query"] for r in snips_rows if r["label"] == name][:6]} for name in INTENTS]
    config = parse_config({"version": 1, "experts": experts, "gate": {"artifact": "gate", "default_expert":
                                                                       "GetWeather"}},
                          base_dir=tmp_path, check_env=False)
    train_from_config(config, progress=False)
    doc = json.loads((tmp_path / "gate" / "gate.json").read_text(encoding="utf-8"))
    assert doc["metrics"]["calibration"] == "cross-validated" and doc["metrics"]["n_calibration"] == 18
    assert doc["metrics"]["n_val"] == 0 and doc["metrics"]["ece_after"] is not None
    loaded = load_gate(config)
    assert doc["ood_threshold"] is not None
    assert isinstance(loaded, Gate) and loaded.ood_threshold == doc["ood_threshold"]
    # One example per expert: nothing can be held out. Trained all the same, but the artifact and the log say so.
    caplog.set_level("WARNING", logger="router.gate")
    train_from_config(_config(tmp_path, [], artifact="one"), progress=False)
    doc = json.loads((tmp_path / "one" / "gate.json").read_text(encoding="utf-8"))
    assert (doc["metrics"]["calibration"], doc["ood_threshold"], doc["temperature"]) == ("none", None, 1.0)
    assert "cannot be calibrated" in caplog.text


@pytest.mark.parametrize("classifier", ["logistic", "knn", "lexical", "ensemble"])
def test_the_configured_classifier_is_trained_and_restored(tmp_path: Path, snips_rows: list[dict[str, str]],
                                                           classifier: str) -> None:
    (tmp_path / "data").mkdir()
    _write_jsonl(tmp_path / "data" / "snips.jsonl", snips_rows)
    config = _config(tmp_path, ["data/snips.jsonl"], artifact="out/gate", classifier=classifier)
    gate = train_from_config(config, progress=False)
    loaded = Gate.load(tmp_path / "out" / "gate", gate.encoder)
    assert gate.metadata.classifier == loaded.metadata.classifier == classifier
    assert type(loaded.classifier) is type(gate.classifier)
    probs = loaded.scores(["what's the weather in Paris tomorrow", "play the new album by Adele"])
    assert [loaded.experts[i] for i in probs.argmax(axis=1)] == ["GetWeather", "PlayMusic"]


def test_an_artifact_path_that_is_a_file_is_refused_before_training(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "gate").write_text("not a folder")
    config = _config(tmp_path, [], artifact="gate")

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("training started")

    monkeypatch.setattr("router.train.collect_training_data", no_training)
    with pytest.raises(NotADirectoryError, match=rf"gate.artifact {tmp_path / 'gate'}: exists and is not a folder"):
        train_from_config(config, progress=False)


def test_an_unknown_classifier_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"gate\.classifier"):
        _config(tmp_path, [], classifier="svm")


def _outcome_rows(snips_rows: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Synthetic outcomes on real queries: each intent's specialist gets its queries right, cheaply; the
    generalist ("GetWeather", here the priciest) gets everything right at ten times the cost."""
    specialist = {"PlayMusic": "PlayMusic", "BookRestaurant": "BookRestaurant"}
    rows = []
    for r in snips_rows:
        outcomes = {"GetWeather": 1.0, **{s: float(r["label"] == s) for s in specialist}}
        rows.append({"query": r["query"], "outcomes": outcomes,
                     "cost": {"GetWeather": 1.0, "PlayMusic": 0.1, "BookRestaurant": 0.1}})
    return rows


def test_outcome_files_train_an_outcome_gate_at_the_configured_cost_weight(
        tmp_path: Path, snips_rows: list[dict[str, str]]) -> None:
    _write_jsonl(tmp_path / "o.jsonl", _outcome_rows(snips_rows))
    config = _config(tmp_path, ["o.jsonl"], artifact="out/gate", cost_weight=0.5)
    data = collect_training_data(config)
    assert data.kind == "outcome" and len(data.records) == 60 and not data.texts
    gate = train_from_config(config, progress=False)
    assert isinstance(gate, OutcomeGate) and gate.cost_weight == 0.5
    loaded = load_gate(config)
    assert isinstance(loaded, OutcomeGate) and loaded.experts == INTENTS
    probs = loaded.scores(["play the new album by Adele", "will it snow in Oslo"])
    # Music goes to the cheap specialist; weather only the generalist gets right.
    assert [loaded.experts[i] for i in probs.argmax(axis=1)] == ["PlayMusic", "GetWeather"]
    quality_only = parse_config({**config.model_dump(exclude={"base_dir"}), "gate": {
        **config.gate.model_dump(), "cost_weight": 0.0}}, base_dir=tmp_path, check_env=False)
    assert load_gate(quality_only).scores(["play the new album by Adele"]).argmax() in (0, 1)


def test_a_file_with_no_records_mixes_with_either_kind(tmp_path: Path, snips_rows: list[dict[str, str]]) -> None:
    """A day's empty shard (no bytes, or blank lines) beside outcome records was taken for a labelled file, and
    the two kinds refused as mixed."""
    _write_jsonl(tmp_path / "o.jsonl", _outcome_rows(snips_rows[:3]))
    _write_jsonl(tmp_path / "l.jsonl", snips_rows[:3])
    (tmp_path / "none.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    outcomes = collect_training_data(_config(tmp_path, ["none.jsonl", "o.jsonl", "blank.jsonl"]))
    assert outcomes.kind == "outcome" and len(outcomes.records) == 3
    labelled = collect_training_data(_config(tmp_path, ["blank.jsonl", "l.jsonl"]))
    assert labelled.kind == "label" and labelled.texts[-3:] == [r["query"] for r in snips_rows[:3]]


def test_an_expert_with_no_recorded_cost_trains_at_the_config_price_it_serves_at(
        tmp_path: Path, snips_rows: list[dict[str, str]], caplog: pytest.LogCaptureFixture) -> None:
    """Training counted an expert that no record gives a cost for as free, serving at its config price: the
    trained gate's anchor, margin and temperature (and its reported figures) were not those of the gate served.
    Here the generalist, right on everything, was the free anchor in training and re-tuned away in serving."""
    rows = [{**r, "cost": {e: c for e, c in r["cost"].items() if e != "GetWeather"}} for r in _outcome_rows(snips_rows)]
    _write_jsonl(tmp_path / "o.jsonl", rows)
    base = _config(tmp_path, ["o.jsonl"], artifact="out/gate", cost_weight=0.5)
    raw = base.model_dump(exclude={"base_dir"})
    for expert in raw["experts"]:
        if expert["name"] == "GetWeather":
            expert["cost"] = {**expert["cost"], "input_per_1k": 0.6, "output_per_1k": 0.4}
    config = parse_config(raw, base_dir=tmp_path, check_env=False)
    with caplog.at_level("INFO", logger="router.outcome_gate"):
        gate = train_from_config(config, progress=False)
    assert isinstance(gate, OutcomeGate)
    assert dict(zip(gate.experts, gate.cost.tolist(), strict=True)) == pytest.approx(
        {"BookRestaurant": 0.1, "GetWeather": 1.0, "PlayMusic": 0.1})
    assert "no recorded cost for GetWeather; the gate takes their config price" in caplog.text
    assert "counts them as free" not in caplog.text
    served = load_gate(config)
    assert isinstance(served, OutcomeGate)
    assert (served.tuning.anchor, served.tuning.margin, served.temperature) == \
        (gate.tuning.anchor, gate.tuning.margin, gate.temperature)
    assert served.tuning.metrics == gate.tuning.metrics


def test_mixed_or_unknown_outcome_files_are_refused(tmp_path: Path, snips_rows: list[dict[str, str]]) -> None:
    _write_jsonl(tmp_path / "o.jsonl", _outcome_rows(snips_rows[:3]))
    _write_jsonl(tmp_path / "l.jsonl", snips_rows[:3])
    with pytest.raises(ValueError, match="mixes labelled and outcome files"):
        collect_training_data(_config(tmp_path, ["o.jsonl", "l.jsonl"]))
    _write_jsonl(tmp_path / "u.jsonl", [{"query": "q", "outcomes": {"Nope": 1}}])
    with pytest.raises(ValueError, match=r"u\.jsonl:1: expert 'Nope' is not an expert of the config; experts: "):
        collect_training_data(_config(tmp_path, ["u.jsonl"]))


def test_an_outcome_record_naming_no_expert_is_refused_at_its_line(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """In its outcomes or in its costs: the first line naming each such name is given, as for a malformed line."""
    ok = {"query": "q", "outcomes": {"GetWeather": 1, "PlayMusic": 0}, "cost": {"GetWeather": 0.1}}
    _write_jsonl(tmp_path / "u.jsonl", [ok, ok, {**ok, "outcomes": {"GetWeather": 1, "ghost": 0}}, ok,
                                        {**ok, "cost": {"spectre": 0.1}}, {**ok, "outcomes": {"ghost": 1}}])
    with pytest.raises(ValueError) as info:
        collect_training_data(_config(tmp_path, ["u.jsonl"]))
    assert str(info.value) == (f"{tmp_path / 'u.jsonl'}:3: expert 'ghost' is not an expert of the config; nor is "
                               "'spectre' (first on line 5); experts: GetWeather, PlayMusic, BookRestaurant. If it "
                               "was removed from the config, moe train --drop-unknown-experts leaves its lines out")
    # Told to leave them out: the unknown experts' outcomes and costs go, and a record left with none goes whole.
    with caplog.at_level("WARNING", logger="router.train"):
        kept = collect_training_data(_config(tmp_path, ["u.jsonl"]), drop_unknown=True).records
    assert len(kept) == 5
    # The record left with none is counted apart from those only trimmed.
    assert (f"{tmp_path / 'u.jsonl'}: left out 1 record(s) that score only experts the config does not have (first "
            "on line 6); 5 record(s) of the file are kept") in caplog.text
    assert all(set(r.outcomes) <= {"GetWeather", "PlayMusic", "BookRestaurant"} and "spectre" not in r.cost
               for r in kept)


def test_a_rebuild_with_the_same_encoder_settings_reuses_the_loaded_encoder(
        tmp_path: Path, snips_rows: list[dict[str, str]]) -> None:
    """What a hot reload does (``build_orchestrator`` with the process's ``SharedState``): the encoder is loaded
    once while ``gate.encoder`` stays the same, and a change of its settings loads a new one in its place."""
    from router.build import build_orchestrator
    from router.state_redis import SharedState

    (tmp_path / "data").mkdir()
    _write_jsonl(tmp_path / "data" / "snips.jsonl", snips_rows)
    config = _config(tmp_path, ["data/snips.jsonl"], artifact="gate", encoder={"backend": "onnx"})
    train_from_config(config, progress=False)
    state = SharedState()
    first = build_orchestrator(config, state=state)
    again = build_orchestrator(config, state=state)
    assert again.gate is not first.gate and again.gate.encoder is first.gate.encoder
    other = _config(tmp_path, ["data/snips.jsonl"], artifact="gate", encoder={"backend": "onnx", "batch_size": 16})
    # a build that fails after the gate loaded (a refused reload) leaves the running config's encoder kept
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("router.build.build_experts", lambda *_: (_ for _ in ()).throw(RuntimeError("refused")))
        with pytest.raises(RuntimeError, match="refused"):
            build_orchestrator(other, state=state)
    assert list(state.encoders.values()) == [first.gate.encoder]
    changed = build_orchestrator(other, state=state)
    assert changed.gate.encoder is not first.gate.encoder
    assert list(state.encoders.values()) == [changed.gate.encoder]  # only what the latest config uses is kept
    assert build_orchestrator(config).gate.encoder is not first.gate.encoder  # no state: nothing kept


def _scored_rows(snips_rows: list[dict[str, str]], scored: tuple[str, ...], costed: tuple[str, ...]
                 ) -> list[dict[str, Any]]:
    """Records on real queries scoring ``scored`` (each right on its own intent's queries), with costs for
    ``costed``."""
    return [{"query": r["query"], "outcomes": {e: float(r["label"] == e) for e in scored},
             "cost": {e: 0.1 * (i + 1) for i, e in enumerate(costed)}} for r in snips_rows]


def test_a_cost_for_a_config_expert_without_scores_is_left_out_and_the_expert_cold_starts(
        tmp_path: Path, snips_rows: list[dict[str, str]], caplog: pytest.LogCaptureFixture) -> None:
    """A cost recorded for an expert of the config that no record scores is no unknown expert: the records score
    two experts, the gate chooses among them, and the third is routed from its examples, its cost left out."""
    _write_jsonl(tmp_path / "o.jsonl", _scored_rows(snips_rows, ("GetWeather", "PlayMusic"), tuple(INTENTS)))
    config = _config(tmp_path, ["o.jsonl"], artifact="gate", cost_weight=0.5, encoder={"backend": "static"})
    with caplog.at_level("WARNING", logger="router.outcome_gate"):
        gate = train_from_config(config, progress=False)
    assert isinstance(gate, OutcomeGate) and gate.artifact_experts == ["GetWeather", "PlayMusic"]
    assert "a cost but no score ('outcomes') for BookRestaurant; the cost is left out" in caplog.text
    np.testing.assert_allclose(gate.cost, [0.1, 0.2])
    loaded = load_gate(config)
    assert loaded.experts == INTENTS  # BookRestaurant routed from its config example
    assert loaded.scores(["an example for BookRestaurant"]).argmax() == 2


@pytest.mark.parametrize(("costed", "note"), [
    ((), ""),
    (tuple(INTENTS), " (the records give a cost for 'PlayMusic', 'BookRestaurant', but a cost alone trains nothing: "
                     "the gate learns from 'outcomes')"),
])
def test_records_scoring_one_expert_are_refused_naming_the_experts_to_score(
        tmp_path: Path, snips_rows: list[dict[str, str]], costed: tuple[str, ...], note: str) -> None:
    """The records must score two experts for the gate to learn a choice (the rest cold start); with one, the error
    names the config's experts that need records, and says that their costs alone do not count."""
    _write_jsonl(tmp_path / "o.jsonl", _scored_rows(snips_rows, ("GetWeather",), costed))
    config = _config(tmp_path, ["o.jsonl"], artifact="gate", encoder={"backend": "static"})
    with pytest.raises(ValueError) as info:
        train_from_config(config, progress=False)
    assert str(info.value) == (
        "the outcome records in gate.train_data score only 'GetWeather' ('outcomes'); an outcome gate learns to "
        "choose among at least two scored experts, the config's others being routed from their examples. Add "
        f"outcomes for 'PlayMusic' or 'BookRestaurant'{note}")
    assert not (tmp_path / "gate").exists()


def test_texts_given_two_labels_are_named_by_file_and_line(tmp_path: Path, snips_rows: list[dict[str, str]],
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """The warning gave a count and one example text: a team with 100 such lines had to find the other 99
    itself."""
    rows = list(snips_rows)
    twice = [{**rows[i], "label": rows[i + 25]["label"]} for i in range(5)]  # five texts again, another label
    path = _write_jsonl(tmp_path / "data.jsonl", rows + twice)
    config = _config(tmp_path, ["data.jsonl"], artifact="gate", encoder={"backend": "static"})
    with caplog.at_level("WARNING", logger="router.gate"):
        train_from_config(config, progress=False)
    first = rows[0]
    both = sorted([first["label"], rows[25]["label"]])
    assert (f"5 training queries carry more than one label: {first['query']!r}: {', '.join(both)} ({path}:1 "
            f"{first['label']}, {path}:{len(rows) + 1} {rows[25]['label']})") in caplog.text
    assert "; and 2 more; the gate learns to split its probability between them" in caplog.text


def test_a_two_stage_gate_says_what_is_wrong_with_its_data_once(tmp_path: Path, snips_rows: list[dict[str, str]],
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Both stages of a cascade train on the same data, and each warned of the same texts given two labels."""
    rows = list(snips_rows)
    twice = [{**rows[i], "label": rows[i + 25]["label"]} for i in range(5)]
    _write_jsonl(tmp_path / "data.jsonl", rows + twice)
    config = _config(tmp_path, ["data.jsonl"], artifact="gate", cascade={})
    with caplog.at_level("WARNING", logger="router.gate"):
        train_from_config(config, progress=False)
    said = [r.getMessage() for r in caplog.records if "carry more than one label" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("5 training queries carry more than one label")
    assert not logging.getLogger("router.gate").filters  # the filter is gone once training is done


def test_the_places_of_a_text_follow_the_feedback_folded_in() -> None:
    """A conflict feedback made (a good verdict giving a file's text another label) was shown with the file's label
    alone, and a pair bad feedback dropped still named its line."""
    from router.gate_train import _conflicts_shown
    from router.train import _places_after

    places = {"what is 2+2": [("data.jsonl:1", "maths")], "hello": [("data.jsonl:2", "chat"),
                                                                   ("experts[0] (chat).examples[0]", "chat")]}
    after = _places_after(places, wrong={("hello", "chat")}, good=[("what is 2+2", "music")])
    assert after == {"what is 2+2": [("data.jsonl:1", "maths"), ("feedback", "music")],
                     "hello": [("experts[0] (chat).examples[0]", "chat")]}
    assert _conflicts_shown({"what is 2+2": ["maths", "music"]}, after) == (
        "'what is 2+2': maths, music (data.jsonl:1 maths, feedback music)")
    assert _conflicts_shown({"q": ["a", "b"]}, {}) == "'q': a, b"
