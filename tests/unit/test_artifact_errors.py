"""A damaged gate artifact is one `error:` line that names the file and says to retrain, never a traceback, and
`moe config check` reports it as a problem rather than as "no gate artifact yet"."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from router.cli import main
from router.encoders import sha256_file
from router.gate_artifact import _manifest_digest
from tests.support import trained_config

CONFIG = ("version: 1\ngate:\n  artifact: gate\nexperts:\n"
          "  - {name: coder, type: vllm, endpoint: 'http://127.0.0.1:9/v1', model: m, description: code, "
          "examples: ['write a python function', 'fix this bug']}\n"
          "  - {name: lawyer, type: vllm, endpoint: 'http://127.0.0.1:9/v1', model: m, description: legal questions, "
          "examples: ['can I break my lease', 'is this contract valid']}\n")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A gate trained once by `moe train` from the config's examples; each test damages a copy."""
    return trained_config(tmp_path_factory.mktemp("trained"), CONFIG).parent / "gate"


@pytest.fixture
def config(tmp_path: Path, trained: Path) -> Path:
    shutil.copytree(trained, tmp_path / "gate")
    (tmp_path / "router.yaml").write_text(CONFIG)
    return tmp_path / "router.yaml"


def _both_commands_say(config: Path, capsys: pytest.CaptureFixture[str], *says: str) -> None:
    """`moe route` (the path `moe serve` loads the gate by) ends in one error line with every one of ``says`` and
    the retrain command for this config; `moe config check` lists the same as its problem with ``gate.artifact``."""
    assert main(["route", "hi", "--config", str(config)]) == 1
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and err.count("\n") == 1, (out, err)
    assert main(["config", "check", str(config)]) == 2
    out, listed = capsys.readouterr()
    assert "OK" not in out and "1 problem(s) in the config" in listed, (out, listed)
    assert f"  - gate.artifact: {err.removeprefix('error: ')}" in listed, (err, listed)
    for text in (*says, f"moe train --config {config}"):
        assert text in err, err


@pytest.mark.parametrize(("contents", "says"), [
    (b"[1, 2]\n", "gate.json: not a gate artifact (a JSON array where a JSON object belongs)"),
    (b'"a gate"', "gate.json: not a gate artifact (a JSON string where a JSON object belongs)"),
    (b"{not json", "gate.json: corrupt, not readable as JSON (Expecting property name"),
    (b"\xff\xfe{}", "gate.json: corrupt, not readable as JSON"),
    (b"", "gate.json: corrupt, not readable as JSON"),
])
def test_a_gate_json_that_is_no_json_object_is_named(config: Path, capsys: pytest.CaptureFixture[str],
                                                      contents: bytes, says: str) -> None:
    (config.parent / "gate" / "gate.json").write_bytes(contents)
    _both_commands_say(config, capsys, f"{config.parent / 'gate'}/{says}")


def test_a_gate_json_whose_experts_are_no_list_of_names_is_named(config: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Without the check, the string "coder" would read as the experts 'c', 'o', 'd', 'e', 'r'."""
    _rewrite(config.parent / "gate", lambda doc: doc.update(experts="coder"))
    _both_commands_say(config, capsys, "gate.json: not a gate artifact ('experts' is not a list of expert names)")


def _rewrite(folder: Path, edit: Callable[[dict[str, object]], None]) -> None:
    """Edit gate.json as an artifact from before the self-digest would be (no ``manifest_sha256``), with the
    sha256 of each listed file brought up to date, so the load gets past its checksums."""
    doc = json.loads((folder / "gate.json").read_text())
    doc.pop("manifest_sha256")
    edit(doc)
    if isinstance(doc.get("files"), dict):
        doc["files"] = {name: sha256_file(folder / name) for name in doc["files"] if (folder / name).exists()}
    (folder / "gate.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("name", ["weights.npz", "examples.npz"])
@pytest.mark.parametrize(("damage", "says"), [
    (lambda b: b[: len(b) // 2], "corrupt, not readable as NumPy arrays"),
    (lambda b: b"not an archive", "corrupt, not readable as NumPy arrays (not a zip archive"),
    (lambda b: b[:80] + bytes(x ^ 0xFF for x in b[80:120]) + b[120:], "corrupt, not readable as NumPy arrays ("),
])
def test_a_corrupt_npz_that_gate_json_vouches_for_is_named(config: Path, capsys: pytest.CaptureFixture[str],
                                                           name: str, damage: Callable[[bytes], bytes],
                                                           says: str) -> None:
    folder = config.parent / "gate"
    (folder / name).write_bytes(damage((folder / name).read_bytes()))
    _rewrite(folder, lambda doc: None)
    assert main(["route", "hi", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"error: {folder / name}: {says}" in err and f"moe train --config {config}" in err


def test_a_missing_npz_is_named_as_an_incomplete_artifact(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = config.parent / "gate"
    (folder / "examples.npz").unlink()
    assert main(["route", "hi", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"error: {folder / 'examples.npz'}: missing, though gate.json lists it (the artifact is incomplete)" in err


def test_a_folder_where_an_artifact_file_belongs_is_named(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = config.parent / "gate"
    (folder / "examples.npz").unlink()
    (folder / "examples.npz").mkdir()
    assert main(["route", "hi", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"error: {folder / 'examples.npz'}: a folder, where gate.json lists a file" in err
    assert f"moe train --config {config}" in err


@pytest.mark.parametrize(("edit", "says"), [
    (lambda doc: doc.pop("files"), "(no 'files')"),
    (lambda doc: doc.pop("encoder_identity"), "(no 'encoder_identity')"),
    (lambda doc: doc.update(metrics=[1]), "(TypeError: "),
])
def test_a_gate_json_missing_what_a_gate_needs_is_named(config: Path, capsys: pytest.CaptureFixture[str],
                                                        edit: Callable[[dict[str, object]], object],
                                                        says: str) -> None:
    folder = config.parent / "gate"
    _rewrite(folder, edit)
    assert main(["route", "hi", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"error: {folder}: not a gate artifact this code can read {says}" in err
    assert f"moe train --config {config}" in err


def _edited(config: Path, old: str, new: str) -> Path:
    config.write_text(config.read_text().replace(old, new, 1))
    return config


@pytest.mark.parametrize(("old", "new", "key", "says"), [
    ("  artifact: gate\n", "  artifact: gate\n  encoder: {backend: onnx, max_length: 128}\n", "gate.artifact",
     "trained with encoder max_length 256"),
    ("  artifact: gate\n", "  artifact: gate\ncombiner: {strategy: vote, vote_weights: learned}\n",
     "combiner.vote_weights", "holds no vote_weights.json"),
    ("  artifact: gate\n", "  artifact: gate.txt\n", "gate.artifact", "gate.txt: exists and is not a folder"),
])
def test_config_check_loads_the_gate_as_serve_would_and_lists_what_it_would_refuse(
        config: Path, capsys: pytest.CaptureFixture[str], old: str, new: str, key: str, says: str) -> None:
    (config.parent / "gate.txt").write_text("not a folder")
    assert main(["config", "check", str(_edited(config, old, new))]) == 2
    err = capsys.readouterr().err
    assert f"  - {key}: " in err and says in err, err


def test_config_check_passes_a_trained_gate_and_an_expert_added_with_examples(
        config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    added = ("  - {name: cook, type: vllm, endpoint: 'http://127.0.0.1:9/v1', model: m, description: cooking, "
             "examples: ['how long do I boil an egg']}\n")
    config.write_text(config.read_text() + added)
    assert main(["config", "check", str(config)]) == 0
    assert f"gate artifact {config.parent / 'gate'})" in capsys.readouterr().out
    config.write_text(config.read_text().replace(", examples: ['how long do I boil an egg']", ""))
    assert main(["config", "check", str(config)]) == 2
    assert "cannot route to expert(s) 'cook'" in capsys.readouterr().err


def test_config_check_builds_the_experts_as_serve_would(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A replay expert whose recordings are missing said OK, and serve then refused to start."""
    added = ("  - {name: replayed, type: replay, model: gpt-4-1106-preview, description: recorded answers, "
             "examples: ['what is the capital of France'], replay: {source: routerbench, path: no/such/folder}}\n")
    config.write_text(config.read_text() + added)
    assert main(["config", "check", str(config)]) == 2
    err = capsys.readouterr().err
    index = config.read_text().split("experts:")[1].count("- {name:") - 1
    assert f"  - experts[{index}] (replayed).replay.path: cannot load routerbench recordings" in err, err


def test_training_settings_the_artifact_was_not_trained_with_are_named_when_it_loads(
        config: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    """gate.classifier and gate.balance act through `moe train` only: a config edited after training still
    routes with the trained gate, and loading it (serve, a reload, `moe route`, `moe config check`) says which
    settings the artifact was not trained with, instead of letting the edit look applied."""
    assert json.loads((config.parent / "gate" / "gate.json").read_text())["balance"] == "prior"
    with caplog.at_level("WARNING", logger="router.build"):
        assert main(["route", "write a python function", "--config", str(config)]) == 0
    assert "untrained" not in caplog.text and "trained with" not in caplog.text, caplog.text
    edited = _edited(config, "  artifact: gate\n", "  artifact: gate\n  classifier: knn\n  balance: none\n")
    caplog.clear()
    with caplog.at_level("WARNING", logger="router.build"):
        assert main(["route", "write a python function", "--config", str(edited)]) == 0
    assert ("gate.classifier is 'knn' but the artifact was trained with 'ensemble'; gate.balance is 'none' but the "
            "artifact was trained with 'prior'; the gate routes as trained until moe train retrains it") in caplog.text
    assert '"coder"' in capsys.readouterr().out  # routed all the same


def test_new_examples_of_a_trained_expert_are_named_when_it_loads(
        config: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    """An expert's examples train a label gate: ones added to a trained expert after `moe train` change nothing
    until it runs again, and loading the gate says so (a reload said "config reloaded" and routed as before)."""
    same = _edited(config, "examples: ['write a python function', 'fix this bug']",
                   "examples: ['Write a  Python function', 'fix this bug']")  # read as the encoder reads it: no edit
    with caplog.at_level("WARNING", logger="router.build"):
        assert main(["route", "write a python function", "--config", str(same)]) == 0
    assert "examples of trained expert" not in caplog.text, caplog.text
    edited = _edited(same, "'fix this bug']", "'fix this bug', 'lint my go code', 'a rust borrow error']")
    caplog.clear()
    with caplog.at_level("WARNING", logger="router.build"):
        assert main(["route", "write a python function", "--config", str(edited)]) == 0
    assert ("the examples of trained expert(s) coder (2 new) are not in the artifact's training data (an expert the "
            "artifact was trained on routes as trained; only a new expert is routed from its examples at once); the "
            "gate routes as trained until moe train retrains it") in caplog.text, caplog.text
    capsys.readouterr()


def test_a_trained_expert_dropped_or_renamed_in_the_config_is_named_when_it_loads(
        config: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    """Renaming a trained expert (coder to Coder) dropped the trained one and routed the new name from its two
    config examples, with nothing said by config check, serve or a reload."""
    renamed = _edited(config, "{name: coder,", "{name: Coder,")
    with caplog.at_level("WARNING", logger="router.build"):
        assert main(["config", "check", str(renamed)]) == 0
    assert ("the artifact's expert(s) coder are not among the config's routed experts, so they are not routed (the "
            "config now spells 'coder' as 'Coder', routed from its config examples alone); the gate routes as "
            "trained until moe train retrains it") in caplog.text, caplog.text
    caplog.clear()
    added = _edited(renamed, "{name: Coder,", "{name: coder,").read_text() + (
        "  - {name: cook, type: vllm, endpoint: 'http://127.0.0.1:9/v1', model: m, examples: ['a recipe']}\n")
    config.write_text(added)  # an expert only added is a cold start: nothing to say
    with caplog.at_level("WARNING", logger="router.build"):
        assert main(["config", "check", str(config)]) == 0
    assert "not routed" not in caplog.text, caplog.text
    capsys.readouterr()


def test_a_label_gate_under_a_config_describing_an_outcome_gate_is_named_when_it_loads(
        config: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    """The config was switched to outcome records and a cost weight after the label gate was trained: the label
    gate still routes, without cost, and loading it says so."""
    outcomes = config.parent / "outcomes.jsonl"
    outcomes.write_text(json.dumps({"query": "write a python function", "outcomes": {"coder": 1.0}}) + "\n")
    edited = _edited(config, "  artifact: gate\n", "  artifact: gate\n  train_data: [outcomes.jsonl]\n"
                                                   "  cost_weight: 0.5\n")
    with caplog.at_level("WARNING", logger="router.build"):
        assert main(["route", "write a python function", "--config", str(edited)]) == 0
    assert ("gate.train_data holds outcome records, which train an outcome gate, but the artifact is a label gate; "
            "gate.cost_weight is 0.5, which only an outcome gate reads, but the artifact is a label gate (trained on "
            "labelled queries), so it routes without cost; the gate routes as trained") in caplog.text
    assert '"coder"' in capsys.readouterr().out


def test_an_outcome_gate_names_a_success_model_it_was_not_trained_with_and_old_artifacts_are_not_compared() -> None:
    from router.build import untrained_settings
    from router.config import GateConfig
    from router.gate_artifact import GateMetadata, ValidationMetrics

    def metadata(**kw: object) -> GateMetadata:
        return GateMetadata("enc", "sum", "data", ValidationMetrics(n_train=1, n_val=1), **kw)  # type: ignore[arg-type]

    outcome = metadata(kind="outcome", classifier="knn")
    assert untrained_settings(outcome, GateConfig(success_model="logistic")) == [
        "gate.success_model is 'logistic' but the artifact was trained with 'knn'"]
    assert untrained_settings(outcome, GateConfig(success_model="knn", classifier="knn", balance="none")) == []
    # An artifact from before gate.balance was recorded (balance None) is compared on its classifier only.
    assert untrained_settings(metadata(classifier="ensemble"), GateConfig(balance="none")) == []


def test_an_outcome_gate_says_when_it_is_served_at_another_cost_weight_and_panels_it_would_widen(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    """Re-tuned at another cost weight, an outcome gate keeps the success model chosen for the trained one
    (retraining routed 3 points better on RouterBench); and mass, adaptive or min_weight panels grow as a cost
    weight flattens its weights. Loading it says both."""
    rows = [{"query": f"{topic} question number {i}", "outcomes": {"coder": float(topic == "code" or i % 3 == 0),
                                                                   "lawyer": float(topic == "law" or i % 4 == 0)},
             "cost": {"coder": 0.002, "lawyer": 0.0005}}
            for i in range(30) for topic in ("code", "law")]
    (tmp_path / "o.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = CONFIG.replace("  artifact: gate\n", "  artifact: gate\n  train_data: [o.jsonl]\n")
    config = trained_config(tmp_path, text)
    with caplog.at_level("WARNING", logger="router.build"):
        assert main(["route", "a code question", "--config", str(config)]) == 0
    assert "tuned at" not in caplog.text and "flatten" not in caplog.text
    config.write_text(text.replace("  train_data: [o.jsonl]\n", "  train_data: [o.jsonl]\n  cost_weight: 0.5\n"
                                   "  top_k: {policy: mass, mass: 0.9}\n"))
    caplog.clear()
    with caplog.at_level("WARNING", logger="router.build"):
        assert main(["route", "a code question", "--config", str(config)]) == 0
    assert "gate.cost_weight is 0.5 but the artifact was tuned at 0: it is served re-tuned" in caplog.text
    assert "gate.top_k.policy 'mass' sizes panels on the outcome gate's weights, which flatten" in caplog.text
    capsys.readouterr()


# What format 1's metrics held when it was fixed: the code of earlier releases refuses any other key there, so a
# gate this code trains stays readable by them (a rolling upgrade's old replicas reload it; a rollback loads it).
FORMAT_1_METRICS = {"n_train", "n_val", "accuracy", "ece_before", "ece_after", "nll_before", "nll_after",
                    "routed_accuracy", "routed_cost", "best_single", "best_single_accuracy", "oracle_accuracy",
                    "calibration", "n_calibration"}


def test_gate_json_metrics_keep_to_format_1_and_an_unknown_one_is_ignored(config: Path) -> None:
    """A metrics key added to gate.json made every gate this code trains unreadable by the previous release
    ('unexpected keyword argument'), whose message then told the operator to retrain."""
    gate_json = config.parent / "gate" / "gate.json"
    doc = json.loads(gate_json.read_text(encoding="utf-8"))
    assert doc["format_version"] == 1 and set(doc["metrics"]) <= FORMAT_1_METRICS
    doc["metrics"]["a_later_figure"] = 0.5  # what a later release may add: read past, as top-level keys are
    doc["manifest_sha256"] = _manifest_digest(doc)  # as that release would have signed it
    gate_json.write_text(json.dumps(doc), encoding="utf-8")
    assert main(["route", "write a python function", "--config", str(config)]) == 0
