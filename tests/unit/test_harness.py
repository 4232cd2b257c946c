"""``moe eval``: the user-JSONL path on labels the project has never seen, and a small real outcome suite."""

from __future__ import annotations

import argparse
import json
import subprocess
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from eval.datasets import load_snips
from eval.embeddings import CachedEncoder
from eval.harness import run_suite
from eval.metrics import auroc
from router.cli import main as cli_main
from router.encoders import Encoder
from tests.doubles.fakes import FakeHashingEncoder
from tests.support import PNG_SIGNATURE

# SNIPS intents renamed to labels no code or config of the project knows.
# The four that SNIPS confuses most, so the scores are not all 1.0.
RENAMED = {"SearchCreativeWork": "expert-aurora", "SearchScreeningEvent": "expert-basalt",
           "PlayMusic": "expert-cirrus", "AddToPlaylist": "expert-dune"}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("embedding-cache")


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 2000, path


def _relabelled(data_dir: Path, split: str, per_label: int) -> list[dict[str, Any]]:
    return _snips_rows(data_dir, split, per_label, RENAMED)


def test_user_jsonl_with_unseen_labels(data_dir: Path, tmp_path: Path, cache_dir: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOE_CACHE_DIR", str(cache_dir))
    train = _write_jsonl(tmp_path / "train.jsonl", _relabelled(data_dir, "train", 50))
    test = _write_jsonl(tmp_path / "test.jsonl", _relabelled(data_dir, "test", 20))
    out = tmp_path / "out"
    assert cli_main(["eval", "--train", str(train), "--test", str(test), "--out", str(out)]) == 0

    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    m = results["metrics"]
    assert set(m) >= {"accuracy", "top2_recall", "macro_f1", "ece"}
    assert all(0.0 <= v <= 1.0 for v in m.values())
    assert m["accuracy"] > 0.85 and m["top2_recall"] >= m["accuracy"]
    assert results["labels"] == sorted(RENAMED.values())
    assert set(results["per_class"]) == set(RENAMED.values())
    assert results["setup"]["train"] == 200 and results["setup"]["test"] == 80
    # Where the figures came from, for whoever reruns them: the day, the machine, the commit and the versions.
    setup = results["setup"]
    assert setup["date"] == datetime.now(UTC).strftime("%Y-%m-%d") and "cores" in setup["machine"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert setup["code"]["commit"] == (head.stdout.strip() or None) and setup["code"]["dirty"] in (True, False, None)
    assert setup["code"]["versions"]["numpy"] == np.__version__ and "scikit-learn" in setup["code"]["versions"]
    # And the data: the SHA-256 of each file the run read, by the path it was given.
    from router.encoders import sha256_file

    assert setup["data_sha256"] == {str(train): sha256_file(train), str(test): sha256_file(test)}
    systems = results["systems"]
    members = {f"gate classifier: {kind}" for kind in ("logistic", "knn", "lexical")}
    assert set(systems) == {"gate", "cascade", "random", "majority", "centroid", "knn", "logistic"} | members
    # Each member of the default ensemble, trained alone as a gate on the same split: the choice is measured.
    assert all(systems[name]["accuracy"] > systems["random"]["accuracy"] for name in members)
    assert systems["gate classifier: logistic"] != systems["gate"]
    # The two-stage gate (static first, as moe train builds it): its own figures, next to the gate's.
    assert m["cascade_accuracy"] == systems["cascade"]["accuracy"] >= m["accuracy"] - 0.05
    assert 0.0 < m["cascade_fast_share"] <= 1.0 and m["cascade_agreement"] >= 0.9
    assert results["cascade"]["fit"]["agreement_target"] == 0.995
    assert systems["gate"]["accuracy"] > systems["random"]["accuracy"]
    assert systems["majority"]["accuracy"] == pytest.approx(0.25)  # balanced test set, four labels
    ci = results["confidence_intervals"]["accuracy"]
    assert ci["low"] <= m["accuracy"] <= ci["high"] and ci["estimate"] == pytest.approx(m["accuracy"])
    assert np.array(results["confusion_matrix"]).sum() == 80
    # Each test query's outcome is written beside the results, and the headline figures follow from it alone.
    predicted = [json.loads(line) for line in (out / results["predictions"]).read_text(encoding="utf-8").splitlines()]
    assert [p["id"] for p in predicted] == [row["id"] for row in _relabelled(data_dir, "test", 20)]
    assert np.mean([p["predicted"] == p["label"] for p in predicted]) == pytest.approx(m["accuracy"])
    assert np.mean([p["rank_of_label"] <= 2 for p in predicted]) == pytest.approx(m["top2_recall"])
    assert all((p["rank_of_label"] == 1) == (p["predicted"] == p["label"]) and p["p_predicted"] >= p["p_label"]
               for p in predicted)
    assert "| gate |" in (out / "report.md").read_text(encoding="utf-8")
    for name in ("confusion_matrix.png", "reliability.png"):
        _assert_png(out / name)


def _snips_rows(data_dir: Path, split: str, per_label: int, labels: dict[str, Any]) -> list[dict[str, Any]]:
    """The first ``per_label`` queries of each SNIPS intent in ``labels``, labelled with its value there."""
    rows: list[dict[str, Any]] = []
    counts = dict.fromkeys(labels, 0)
    for q in load_snips(data_dir, split):  # type: ignore[arg-type]
        if q.label in counts and counts[q.label] < per_label:
            counts[q.label] += 1
            rows.append({"id": f"{split}-{q.id}", "query": q.text, "label": labels[q.label]})
    return rows


def test_user_jsonl_test_labels_absent_from_training_are_out_of_scope(
        data_dir: Path, tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOE_CACHE_DIR", str(cache_dir))
    train = _write_jsonl(tmp_path / "train.jsonl", _relabelled(data_dir, "train", 30))
    unseen = _snips_rows(data_dir, "test", 10, {"GetWeather": "expert-weather"})  # no training query has it
    test = _write_jsonl(tmp_path / "test.jsonl", _relabelled(data_dir, "test", 10) + unseen)
    out = tmp_path / "out"
    assert cli_main(["eval", "--train", str(train), "--test", str(test), "--out", str(out), "--no-plots"]) == 0
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    setup = results["setup"]
    assert (setup["test"], setup["test_out_of_scope"], setup["test_unseen_label"]) == (40, 10, 0)
    assert results["out_of_scope"]["labels"] == ["expert-weather"]
    assert 0.5 < results["metrics"]["oos_auroc"] <= 1.0  # weather requests are unlike music and film ones
    said = "out of scope: test labels the training data lacks, with their queries: 'expert-weather' (10)"
    assert said in results["notes"] and said in (out / "report.md").read_text(encoding="utf-8")
    # predictions.jsonl holds the out-of-scope queries too, with the score oos_auroc ranks by: recomputable.
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 50 and sum(line["out_of_scope"] for line in lines) == 10
    assert {line["label"] for line in lines if line["out_of_scope"]} == {"expert-weather"}
    recomputed = auroc(np.array([line["oos_score"] for line in lines]),
                       np.array([line["out_of_scope"] for line in lines]))
    # Exactly: a tie (equal familiarity) counts half in both.
    assert recomputed == pytest.approx(results["metrics"]["oos_auroc"], abs=1e-9)


def test_user_jsonl_test_labels_written_another_way_are_flagged(
        data_dir: Path, tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A test label that differs from a training one only in case, spaces or Unicode form is most likely the
    same class: still scored as out of scope (labels are the user's), but warned about and noted."""
    monkeypatch.setenv("MOE_CACHE_DIR", str(cache_dir))
    rows = _relabelled(data_dir, "train", 30)
    other = next(label for label in RENAMED.values() if label != rows[0]["label"])
    train = _write_jsonl(tmp_path / "train.jsonl", [*rows, {**rows[0], "id": "again", "label": other}])
    twins = {"SearchCreativeWork": "Expert-Aurora ", "PlayMusic": "expert-cirrus", "GetWeather": "expert-weather"}
    test = _write_jsonl(tmp_path / "test.jsonl", _snips_rows(data_dir, "test", 10, twins))
    out = tmp_path / "out"
    assert cli_main(["eval", "--train", str(train), "--test", str(test), "--out", str(out), "--no-plots",
                     "--encoder", "static"]) == 0
    notes = json.loads((out / "results.json").read_text(encoding="utf-8"))["notes"]
    flagged = [n for n in notes if "only in case, spaces, invisible characters or Unicode form" in n]
    assert flagged == ["test label 'Expert-Aurora ' differs from training label 'expert-aurora' only in case, "
                       "spaces, invisible characters or Unicode form, so its 10 queries are scored as out of scope; "
                       "if they are the same class, write the label the same way in both files"]
    assert f"warning: {flagged[0]}" in capsys.readouterr().err
    assert "1 training queries carry more than one label; the gate splits its probability between them" in notes


def test_user_jsonl_training_labels_written_two_ways_are_flagged(
        data_dir: Path, tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Half of a class labelled "Expert-Aurora " and half "expert-aurora" was learned as two classes, splitting
    its queries between them (accuracy fell from 1.0 to 0.625 in a review's run), with no word of it."""
    monkeypatch.setenv("MOE_CACHE_DIR", str(cache_dir))
    rows = _relabelled(data_dir, "train", 20)
    aurora = [i for i, row in enumerate(rows) if row["label"] == "expert-aurora"]
    for i in aurora[::2]:
        rows[i] = {**rows[i], "label": "Expert-Aurora "}
    train = _write_jsonl(tmp_path / "train.jsonl", rows)
    test = _write_jsonl(tmp_path / "test.jsonl", _relabelled(data_dir, "test", 5))
    out = tmp_path / "out"
    assert cli_main(["eval", "--train", str(train), "--test", str(test), "--out", str(out), "--no-plots",
                     "--encoder", "static"]) == 0
    notes = json.loads((out / "results.json").read_text(encoding="utf-8"))["notes"]
    said = ("training labels 'Expert-Aurora ' (10), 'expert-aurora' (10) differ only in case, spaces, invisible "
            "characters or Unicode form, and are learned as 2 classes; if they are one class, write its label one way")
    assert said in notes and f"warning: {said}" in capsys.readouterr().err


def test_a_warning_of_the_gates_training_is_in_the_report_as_well_as_the_terminal(
        data_dir: Path, tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A label with one training example cannot be held out for calibration; the warning saying so reached
    stderr only, so results.json and report.md read as though every label were calibrated."""
    monkeypatch.setenv("MOE_CACHE_DIR", str(cache_dir))
    rows = _relabelled(data_dir, "train", 20)
    dune = [i for i, row in enumerate(rows) if row["label"] == "expert-dune"]
    rows = [row for i, row in enumerate(rows) if i not in dune[1:]]  # expert-dune keeps one example
    train = _write_jsonl(tmp_path / "train.jsonl", rows)
    test = _write_jsonl(tmp_path / "test.jsonl", _relabelled(data_dir, "test", 5))
    out = tmp_path / "out"
    assert cli_main(["eval", "--train", str(train), "--test", str(test), "--out", str(out), "--no-plots",
                     "--encoder", "static"]) == 0
    warned = [r.getMessage() for r in caplog.records if r.name == "router.gate" and "none of them of" in r.getMessage()]
    assert warned and "'expert-dune'" in warned[0]
    notes = json.loads((out / "results.json").read_text(encoding="utf-8"))["notes"]
    assert warned[0] in notes and notes.count(warned[0]) == 1
    assert warned[0] in (out / "report.md").read_text(encoding="utf-8")


def test_the_out_of_scope_label_written_another_way_is_flagged(
        data_dir: Path, tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """With --oos-label oos, training lines labelled "OOS" were learned as a class, silently: the twin check ran
    after the oos lines were left out."""
    monkeypatch.setenv("MOE_CACHE_DIR", str(cache_dir))
    rows = _relabelled(data_dir, "train", 20)
    rows += [{**row, "id": f"oos-{i}", "label": "oos" if i % 2 else "OOS"} for i, row in enumerate(rows[:6])]
    train = _write_jsonl(tmp_path / "train.jsonl", rows)
    test = _write_jsonl(tmp_path / "test.jsonl", _relabelled(data_dir, "test", 5))
    out = tmp_path / "out"
    assert cli_main(["eval", "--train", str(train), "--test", str(test), "--out", str(out), "--no-plots",
                     "--encoder", "static", "--oos-label", "oos"]) == 0
    notes = json.loads((out / "results.json").read_text(encoding="utf-8"))["notes"]
    assert any(n.startswith("training labels 'OOS' (3), 'oos' (3) differ only in case") for n in notes), notes


def test_user_jsonl_with_integer_labels_and_an_oos_label(data_dir: Path, tmp_path: Path, cache_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOE_CACHE_DIR", str(cache_dir))
    numbers: dict[str, Any] = dict(zip(RENAMED, (2, 9, 10, 11), strict=True))
    oos = {"GetWeather": 99}  # the class number of out-of-scope queries, in training and in test
    train = _write_jsonl(tmp_path / "train.jsonl", _snips_rows(data_dir, "train", 30, {**numbers, **oos}))
    test = _write_jsonl(tmp_path / "test.jsonl", _snips_rows(data_dir, "test", 10, {**numbers, **oos}))
    out = tmp_path / "out"
    assert cli_main(["eval", "--train", str(train), "--test", str(test), "--out", str(out), "--no-plots",
                     "--oos-label", "99"]) == 0
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    # Class numbers in numeric order (as strings "10" would come before "2"); the out-of-scope label is no expert.
    assert results["labels"] == ["2", "9", "10", "11"]
    assert list(results["per_class"]) == ["2", "9", "10", "11"]
    assert (results["setup"]["train"], results["setup"]["test"], results["setup"]["test_out_of_scope"]) == (
        120, 40, 10)
    assert results["out_of_scope"]["labels"] == ["99"] and "oos_auroc" in results["metrics"]
    assert results["command"].endswith("--oos-label 99")
    # The gate's abstain shares, recomputed from predictions.jsonl: each query's familiarity to the gate against
    # its threshold. (With few examples a cascade's full stage is a gate fitted again without the held-out
    # queries; its shares had stood in for the scored gate's.)
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    threshold = results["out_of_scope"]["gate_ood_threshold"]
    for part, outside in (("in_scope", False), ("oos", True)):
        below = [line["gate_familiarity"] < threshold for line in lines if line["out_of_scope"] is outside]
        assert results["metrics"][f"gate_abstain_{part}"] == sum(below) / len(below), part
    with pytest.raises(ValueError, match="--oos-label names an out-of-scope label in --train/--test JSONL"):
        run_suite("snips-intent", data_dir, tmp_path / "snips", oos_label="99")


def _eval_suite(suite: str, limit: int, data_dir: Path, out: Path) -> dict[str, Any]:
    """``moe eval --suite SUITE --limit LIMIT`` through the CLI; its results.json."""
    assert cli_main(["eval", "--suite", suite, "--limit", str(limit), "--data", str(data_dir),
                     "--out", str(out)]) == 0
    return dict(json.loads((out / "results.json").read_text(encoding="utf-8")))


def test_real_label_suite_with_limit(data_dir: Path, tmp_path: Path, cache_dir: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOE_CACHE_DIR", str(cache_dir))
    results = _eval_suite("snips-intent", 120, data_dir, tmp_path / "snips")
    assert results["setup"]["train"] == results["setup"]["test"] == 120 and results["setup"]["labels"] == 7
    assert results["metrics"]["accuracy"] > 0.7
    assert "--limit 120" in results["command"]


def test_clinc150_scores_the_two_stage_gate_over_its_familiar_share(data_dir: Path, tmp_path: Path, cache_dir: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from eval.labels import FAMILIAR_SWEEP
    from router.config import CascadeConfig

    monkeypatch.setenv("MOE_CACHE_DIR", str(cache_dir))
    out = tmp_path / "clinc"
    results = _eval_suite("clinc150-domain", 600, data_dir, out)
    m, sweep = results["metrics"], results["cascade"]["familiar_sweep"]
    assert results["setup"]["test_out_of_scope"] > 50
    assert [row["familiar"] for row in sweep] == list(FAMILIAR_SWEEP)
    # The row at the default share is the two-stage gate the suite reports.
    default = next(row for row in sweep if row["familiar"] == CascadeConfig().familiar)
    assert default["threshold"] == results["cascade"]["fit"]["threshold"]
    for key in ("fast_share", "agreement", "accuracy", "abstain_oos", "abstain_in_scope"):
        assert default[key] == pytest.approx(m["cascade_" + key]), key
    for row in sweep:  # validation queries tied at the bar may pass the share by a few
        assert row["val_fast_share"] <= row["familiar"] + 0.02
        assert 0.0 <= row["abstain_oos"] <= 1.0 and row["familiarity"] is not None
    _assert_png(out / "cascade_familiar.png")
    assert "cascade_familiar.png" in results["figures"]


def test_the_cold_start_suite_adds_each_clinc150_domain_by_config(data_dir: Path, tmp_path: Path, cache_dir: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Each domain in turn added by examples to a gate trained on the other nine; the fitted claim map against
    the similarity-only one, on the same draws."""
    from eval.coldstart_suite import COUNTS, DRAWS, HEADLINE

    monkeypatch.setenv("MOE_CACHE_DIR", str(cache_dir))
    out = tmp_path / "cold"
    results = _eval_suite("clinc150-cold-start", 1000, data_dir, out)
    m, systems = results["metrics"], results["systems"]
    assert results["setup"]["domains"] == 10 and len(results["runs"]) == 10 * len(COUNTS) * DRAWS * 2
    assert results["setup"]["test_out_of_scope"] > 100
    fitted, similarity = systems[f"fitted, {HEADLINE} examples"], systems[f"similarity only, {HEADLINE} examples"]
    assert m[f"overall_accuracy@{HEADLINE}"] == fitted["overall_accuracy"]
    # The newcomer gets most of its own queries, takes few of the others', and the whole gets more right than
    # without it, and than with the similarity-only claims.
    assert fitted["own_share"] > 0.7 and fitted["trained_taken"] < 0.02
    assert fitted["overall_accuracy"] > m["overall_accuracy_before"] + 0.05
    assert fitted["overall_accuracy"] > similarity["overall_accuracy"] + 0.02
    assert fitted["trained_taken"] < similarity["trained_taken"]
    # With abstain: its queries are judged by how near its examples they lie, as its own queries in the simulated
    # cold starts lay, so most of what it is given is served; the trained domains' abstain no more than before.
    assert fitted["own_served"] > similarity["own_served"] + 0.15
    assert fitted["own_served"] > 0.9 * fitted["own_share"]
    assert fitted["trained_abstained"] <= m["trained_abstained_before"] + 0.01
    assert 0 < fitted["oos_abstained"] <= m["oos_abstained_before"]  # the price: out-of-scope queries near it
    runs = [r for r in results["runs"] if r["map"] == "fitted" and r["examples"] == HEADLINE]
    assert fitted["trained_taken_max"] == max(r["trained_taken"] for r in runs)
    _assert_png(out / "cold_start.png")
    assert "Per claim map and number of examples" in (out / "report.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("suite", ["mmlu-pro-outcome", "routerbench"])
def test_outcome_suites_small_run(suite: str, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / suite
    results = run_suite(suite, data_dir, out, encoder=FakeHashingEncoder(), limit=60, progress=False,
                        cache_dir=tmp_path / "cache")
    m = results["metrics"]
    assert set(m) >= {"routed_accuracy", "best_single_accuracy", "oracle_accuracy", "routed_cost", "aiq",
                      "served_routed_accuracy", "served_minus_best_single"}
    served = results["systems"]["served gate (router.outcome_gate, as moe train builds it)"]
    assert served["accuracy"] == m["served_routed_accuracy"] and served["cost"] > 0
    assert m["served_minus_best_single"] == pytest.approx(m["served_routed_accuracy"] - m["best_single_accuracy"])
    assert 0.0 <= m["best_single_accuracy"] <= m["oracle_accuracy"] <= 1.0
    assert 0.0 <= m["routed_accuracy"] <= m["oracle_accuracy"] and m["routed_cost"] > 0
    assert len(results["experts"]) == (31 if suite == "mmlu-pro-outcome" else 11)
    assert results["setup"]["test"] == 60
    # The split's fingerprint: the test part's is that of the ids predictions.jsonl names.
    from eval.routing import split_fingerprint

    lines = (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    tested = [str(json.loads(line)["id"]) for line in lines if line.strip()]
    digests = results["setup"]["split_sha256"]
    assert set(digests) == {"train", "val", "test"} and digests["test"] == split_fingerprint(tested)
    assert len(set(digests.values())) == 3
    # The data files the run read, by their paths in the data folder, with their SHA-256.
    from router.encoders import sha256_file

    read = results["setup"]["data_sha256"]
    expected = {"mmlu-pro-outcome": "mmlu_pro_outcomes/", "routerbench": "routerdc/routerbench_zs/"}[suite]
    assert read and all(name.startswith(expected) for name in read)
    assert all(sha256_file(data_dir / name) == digest for name, digest in read.items())
    assert len(results["curve"]) > 10 and results["curve"][0]["lambda"] == 0.0
    assert json.loads((out / "results.json").read_text(encoding="utf-8"))["metrics"] == pytest.approx(m)
    _assert_png(out / "quality_cost.png")
    # The curve's λ is per unit of the suite's cost: MMLU-Pro records no prices, so output length stands in.
    unit = {"mmlu-pro-outcome": "thousand output characters", "routerbench": "USD"}[suite]
    assert f"(λ per {unit} of predicted cost" in (out / "report.md").read_text(encoding="utf-8")
    # The served gate trained on records that name their task (MMLU-Pro's category, RouterBench's task) and
    # says which prior it chose; its routed shares add up to every test query.
    gate = results["setup"]["served_gate"]
    assert gate["success_model"]["kind"] == "knn" and gate["success_model"]["prior"] in ("overall", "task")
    assert sum(results["served_routed_share"].values()) == pytest.approx(1.0)
    # Each test query's pick, outcome and cost, as the routed figures are computed from them (no record: wrong).
    predicted = [json.loads(line) for line in (out / results["predictions"]).read_text(encoding="utf-8").splitlines()]
    assert len(predicted) == 60 and len({p["id"] for p in predicted}) == 60
    for system, accuracy in (("routed", m["routed_accuracy"]), ("served", m["served_routed_accuracy"])):
        assert np.mean([p[system]["outcome"] or 0.0 for p in predicted]) == pytest.approx(accuracy)
    assert np.mean([p["best_single_outcome"] or 0.0 for p in predicted]) == pytest.approx(m["best_single_accuracy"])


def test_unknown_suite_and_missing_test_file_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown suite"):
        run_suite("no-such-suite", tmp_path, tmp_path / "out")
    assert cli_main(["eval", "--out", str(tmp_path / "out")]) == 2


def test_a_device_the_encoder_cannot_use_is_refused_by_name(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "out")
    assert cli_main(["eval", "--suite", "snips-intent", "--out", out, "--encoder", "onnx", "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert "--encoder onnx --device cuda: device 'cuda': only the sentence-transformers backend" in err
    assert cli_main(["eval", "--suite", "snips-intent", "--out", out, "--device", "tpu"]) == 1
    assert "--device tpu: String should match pattern" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_the_reproducing_command_names_a_device_other_than_the_cpu() -> None:
    from eval.harness import reproducing_command

    args = argparse.Namespace(out="o", encoder="sentence-transformers", seed=0, data=None, limit=None, pool=None,
                              device="cuda:1")
    assert reproducing_command(args, "snips-intent").endswith(
        "--encoder sentence-transformers --seed 0 --device cuda:1")
    args.device = "cpu"
    assert "--device" not in reproducing_command(args, "snips-intent")


def test_the_reproducing_command_quotes_arguments_a_shell_would_split() -> None:
    import shlex

    from eval.harness import reproducing_command

    args = argparse.Namespace(train="my data/tr ain.jsonl", test="test.jsonl", out="out dir", encoder="onnx",
                              seed=0, data=None, limit=None, pool=None, device="cpu", oos_label="out of 'scope'")
    command = reproducing_command(args, "jsonl")
    assert shlex.split(command) == ["moe", "eval", "--train", "my data/tr ain.jsonl", "--test", "test.jsonl",
                                    "--out", "out dir", "--encoder", "onnx", "--seed", "0",
                                    "--oos-label", "out of 'scope'"]
    # Plain arguments are written as they always were (committed reports keep their command line).
    args = argparse.Namespace(out="out/eval/snips", encoder="onnx", seed=0, data=None, limit=200, pool=None,
                              device="cpu")
    assert reproducing_command(args, "snips-intent") == (
        "moe eval --suite snips-intent --out out/eval/snips --encoder onnx --seed 0 --limit 200")


class _CountingEncoder(Encoder):
    identity, checksum = "fake-counting", "0" * 64

    def __init__(self) -> None:
        self.calls: list[int] = []

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(len(texts))
        rng = np.random.default_rng(len(texts))
        x = rng.normal(size=(len(texts), self.dim)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_embedding_cache_embeds_each_text_once_across_runs(tmp_path: Path) -> None:
    inner = _CountingEncoder()
    first = CachedEncoder(inner, tmp_path, max_length=256, progress=False).encode(["a", "b", "a"])
    assert inner.calls == [2] and np.array_equal(first[0], first[2])
    again = CachedEncoder(inner, tmp_path, max_length=256, progress=False)  # a fresh process reads the shards
    second = again.encode(["b", "a", "c"])
    assert inner.calls == [2, 1]
    assert np.array_equal(second[0], first[1]) and np.array_equal(second[1], first[0])
    other = CachedEncoder(inner, tmp_path, max_length=128, progress=False)  # another truncation, another key
    other.encode(["a"])
    assert inner.calls == [2, 1, 1]


def test_user_jsonl_problems_are_named_before_any_work(data_dir: Path, tmp_path: Path, cache_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MOE_CACHE_DIR", str(cache_dir))
    train = _write_jsonl(tmp_path / "train.jsonl", _relabelled(data_dir, "train", 30))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    out = str(tmp_path / "out")
    assert cli_main(["eval", "--train", str(train), "--test", str(empty), "--out", out, "--no-plots"]) == 1
    assert f"--test {empty} holds no records" in capsys.readouterr().err
    test = _write_jsonl(tmp_path / "test.jsonl", _relabelled(data_dir, "test", 5))
    assert cli_main(["eval", "--train", str(train), "--test", str(test), "--out", out, "--no-plots",
                     "--oos-label", "oos"]) == 1
    assert "--oos-label 'oos' labels no query" in capsys.readouterr().err
    assert cli_main(["eval", "--train", str(tmp_path), "--test", str(test), "--out", out, "--no-plots"]) == 1
    assert "Is a directory" in capsys.readouterr().err


def test_test_queries_that_occur_in_training_are_noted(data_dir: Path, tmp_path: Path, cache_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MOE_CACHE_DIR", str(cache_dir))
    rows = _relabelled(data_dir, "train", 20)
    train = _write_jsonl(tmp_path / "train.jsonl", rows)
    # Four of the ten repeats differ from their training query only in case and spacing, which MiniLM's
    # uncased tokenizer does not see: they are repeats all the same.
    repeats = rows[:6] + [{**r, "query": "  " + r["query"].upper().replace(" ", "  ")} for r in rows[6:10]]
    test = _write_jsonl(tmp_path / "test.jsonl", repeats + _relabelled(data_dir, "test", 5))
    out = tmp_path / "out"
    assert cli_main(["eval", "--train", str(train), "--test", str(test), "--out", str(out), "--no-plots"]) == 0
    note = "10 of 30 test queries also occur in the training data"
    assert note in capsys.readouterr().err
    assert any(note in n for n in json.loads((out / "results.json").read_text(encoding="utf-8"))["notes"])


def test_label_order_reads_digits_as_numbers() -> None:
    from eval.labels import label_order

    assert label_order(["10", "2", "1", "2"]) == ["1", "2", "10"]
    assert label_order(["intent10", "intent9", "alarm"]) == ["alarm", "intent9", "intent10"]
    assert label_order(["biology", "Business", "law"]) == sorted(["biology", "Business", "law"])
    # digits int() cannot read (circled, superscript) are text; other scripts' decimal digits are numbers
    assert label_order(["②", "①", "10²", "10"]) == ["10", "10²", "①", "②"]
    assert label_order(["٣", "١٠"]) == ["٣", "١٠"]


def test_the_exported_split_is_labelled_jsonl_moe_eval_reads(tmp_path: Path) -> None:
    """moe eval writes split/{train,val,test}.jsonl beside results.json; written with a "text" key, they were
    refused by moe eval --train and gate.train_data, which read {"query", "label"}."""
    from eval.datasets import LabelledQuery
    from eval.peer import write_split
    from router.train import load_labelled_jsonl

    rows = [LabelledQuery("q1", "play some jazz", "music"), LabelledQuery("q2", "Ünïcode \"quoted\"", "a/b")]
    write_split(tmp_path / "split", rows, rows[:1], rows[1:])
    assert load_labelled_jsonl(tmp_path / "split" / "train.jsonl") == [("play some jazz", "music"),
                                                                       ("Ünïcode \"quoted\"", "a/b")]
    assert load_labelled_jsonl(tmp_path / "split" / "test.jsonl") == [("Ünïcode \"quoted\"", "a/b")]


def test_make_results_records_the_command_moe_eval_would_with_its_data(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m eval.results --data X` wrote a reproducing command without --data (and unquoted): pasted where
    the default data folder differs, it read other data."""
    import eval.results as results_module

    seen: dict[str, Any] = {}

    def fake_run(suite: str, data: str, out: Path, **kwargs: Any) -> dict[str, Any]:
        seen["command"] = kwargs["command"]
        return {"setup": {}, "metrics": {}}

    monkeypatch.setattr(results_module, "run_suite", fake_run)
    monkeypatch.setattr(results_module, "write_results", lambda out, results: None)
    args = argparse.Namespace(encoder="onnx", seed=1, limit=None, data="/my data", peer_suites="")
    results_module._run_one("routellm-mmlu", tmp_path / "r", args, {"date": "2026-12-07"})
    assert seen["command"] == (f"moe eval --suite routellm-mmlu --out {tmp_path / 'r'} --encoder onnx --seed 1 "
                               "--data '/my data'")


def test_the_per_class_table_leaves_undefined_what_macro_f1_leaves_out() -> None:
    """A training label the test split neither holds nor predicts has no precision, recall or F1 (None: n/a in
    report.md), not zeros that contradict macro F1; one predicted but absent from the test labels has precision
    and F1 0 and no recall, and macro F1 averages it, as it does every label the table gives an F1."""
    from eval import metrics as M
    from eval.labels import _per_class

    y, pred = np.array([0, 0, 1, 1]), np.array([0, 3, 1, 1])
    table = _per_class(y, pred, ["a", "b", "untested", "predicted only"])
    assert table["untested"] == {"precision": None, "recall": None, "f1": None, "support": 0}
    assert table["predicted only"] == {"precision": 0.0, "recall": None, "f1": 0.0, "support": 0}
    assert table["a"]["precision"] == 1.0 and table["a"]["recall"] == 0.5 and table["b"]["f1"] == 1.0
    f1s = [row["f1"] for row in table.values() if row["f1"] is not None]
    assert np.mean(f1s) == pytest.approx(M.macro_f1(y, pred))


def test_nested_blocks_each_record_the_files_read_within_them(tmp_path: Path) -> None:
    from eval.provenance import data_digests, files_read

    (tmp_path / "a.csv").write_text("a\n")
    (tmp_path / "b.csv").write_text("b\n")
    with files_read() as outer:
        (tmp_path / "a.csv").read_text()
        with files_read() as inner:
            (tmp_path / "a.csv").read_text()  # the two sets are equal here
        (tmp_path / "b.csv").read_text()  # after the inner block: the outer's alone
    (tmp_path / "b.csv").write_text("written, not read\n")
    (tmp_path / "a.csv").read_text()  # after both blocks: neither's
    assert inner == {str(tmp_path / "a.csv")} and outer == {str(tmp_path / "a.csv"), str(tmp_path / "b.csv")}
    assert list(data_digests(outer, [tmp_path])) == ["a.csv", "b.csv"]


def test_a_store_loaded_from_the_cache_still_names_the_files_it_rests_on(data_dir: Path) -> None:
    """Suites run one after another in one process (make results) load MMLU-Pro's and RouterBench's stores once:
    the second suite opens no file, yet its results rest on them, and its data_sha256 must list them."""
    from eval.provenance import files_read
    from experts.recordings import load_mmlu_pro, load_routerbench

    load_mmlu_pro(data_dir / "mmlu_pro_outcomes")
    load_routerbench(data_dir / "routerdc" / "routerbench_zs")
    with files_read() as read:
        load_mmlu_pro(data_dir / "mmlu_pro_outcomes")
        load_routerbench(data_dir / "routerdc" / "routerbench_zs")
    names = {Path(p).relative_to(data_dir.resolve()).as_posix() for p in read}
    assert {"mmlu_pro_outcomes/correct.csv", "mmlu_pro_outcomes/pred.csv",
            "mmlu_pro_outcomes/response_chars.csv"} <= names
    assert any(n.startswith("mmlu_pro_outcomes/questions/") for n in names)
    assert any(n.startswith("routerdc/routerbench_zs/") and n.endswith(".csv") for n in names)


def test_data_read_through_a_link_is_named_under_the_folder_given(tmp_path: Path) -> None:
    from eval.provenance import data_digests

    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a.csv").write_text("a\n")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    read = [str(tmp_path / "link" / "a.csv"), str(tmp_path / "real" / "a.csv")]  # opened, and named by a store
    assert list(data_digests(read, [tmp_path / "link"])) == ["a.csv"]
    # A data file that is itself a link out of the folder (a DVC or git-annex checkout) is named where it was opened.
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "blob").write_text("b\n")
    (tmp_path / "real" / "b.csv").symlink_to(tmp_path / "store" / "blob")
    assert list(data_digests([str(tmp_path / "link" / "b.csv")], [tmp_path / "link"])) == ["b.csv"]
