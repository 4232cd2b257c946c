"""``moe convert``: the shared data sets as training JSONL, split as the suites split them, read back by the
loaders that ``moe train`` and ``moe eval`` use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval import datasets
from eval.convert import CONVERTERS, convert, replay_names
from eval.routing import FRACTIONS
from experts.recordings import load_mmlu_pro, load_routerbench, mmlu_pro_prompt
from router.cli import main
from router.combine import extract_choice
from router.config import load_config, parse_config
from router.outcome import load_outcome_jsonl
from router.train import load_labelled_jsonl
from router.vote_weights import fit_from_records

ROOT = Path(__file__).resolve().parents[2]


def test_mmlu_pro_domain_splits_are_the_suites_and_never_overlap(data_dir: Path, tmp_path: Path) -> None:
    written = {s: convert("mmlu-pro-domain", data_dir, s, tmp_path / f"{s}.jsonl") for s in ("train", "val", "test")}
    store = load_mmlu_pro(data_dir / "mmlu_pro_outcomes")
    items = [datasets.LabelledQuery(str(q.question_id), mmlu_pro_prompt(q), q.category) for q in store.questions]
    expected = [{q.id for q in part} for part in datasets.split_by_id(items, FRACTIONS, seed=0, text=lambda q: q.text)]
    ids = {s: {q.id for q in datasets.load_labelled_jsonl(tmp_path / f"{s}.jsonl")} for s in written}
    assert [ids["train"], ids["val"], ids["test"]] == expected
    assert written == {s: len(ids[s]) for s in written} and sum(written.values()) == len(store.questions)
    pairs = load_labelled_jsonl(tmp_path / "test.jsonl")  # what moe train reads
    assert {label for _, label in pairs} == set(store.categories) and pairs[0][0].startswith("Question:\n")


@pytest.mark.parametrize(("name", "split", "count", "dropped"), [
    ("snips-intent", "test", None, 11), ("banking77-intent", "test", 3073, 7), ("clinc150-domain", "test", 4498, 2)])
def test_labelled_data_sets_keep_their_own_splits(name: str, split: str, count: int | None, dropped: int,
                                                  data_dir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Their own test split, less the queries that repeat a training one (as the suites score it), said."""
    out = tmp_path / "x.jsonl"
    written = convert(name, data_dir, split, out)
    rows = datasets.load_labelled_jsonl(out)
    assert written == len(rows) > 0 and (count is None or written == count)
    assert "oos" not in {r.label for r in rows}  # CLINC150's out-of-scope queries name no expert
    assert f"repeats {dropped} training/validation queries" in capsys.readouterr().err
    train = datasets.load_labelled_jsonl(tmp_path / "train.jsonl") if convert(
        name, data_dir, "train", tmp_path / "train.jsonl") else []
    assert not {datasets.normalise_text(q.text) for q in rows} & {datasets.normalise_text(q.text) for q in train}


def test_unknown_data_set_split_or_naming_is_refused(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown data set 'mmlu'; known: mmlu-pro-domain"):
        convert("mmlu", data_dir, "train", tmp_path / "x.jsonl")
    with pytest.raises(ValueError, match="snips-intent has no 'val' split; it has: train, test, all"):
        convert("snips-intent", data_dir, "val", tmp_path / "x.jsonl")
    with pytest.raises(ValueError, match="expert names apply to outcome records only"):
        convert("snips-intent", data_dir, "train", tmp_path / "x.jsonl", names={"a": ("b",)})
    assert set(CONVERTERS) == {"mmlu-pro-domain", "clinc150-domain", "snips-intent", "banking77-intent",
                               "mmlu-pro-outcome", "routerbench"}
    with pytest.raises(ValueError, match=f"--out {tmp_path} is a folder; name the JSONL file to write, e.g. "
                                         f"{tmp_path / 'snips-intent-train.jsonl'}"):
        convert("snips-intent", data_dir, "train", tmp_path)


def test_limit_samples_across_labels_the_same_way_each_time(data_dir: Path, tmp_path: Path) -> None:
    """The data sets' rows come grouped by label: the first 200 SNIPS training queries are one intent. --limit
    samples by a seeded hash instead, as ``moe eval --limit`` does, and keeps the file's order."""
    full, first, again, other = (tmp_path / f"{n}.jsonl" for n in ("full", "first", "again", "other"))
    convert("snips-intent", data_dir, "train", full)
    for path, seed in ((first, 0), (again, 0), (other, 1)):
        assert convert("snips-intent", data_dir, "train", path, limit=200, seed=seed) == 200
    rows = [json.loads(line) for line in first.read_text(encoding="utf-8").splitlines()]
    order = {json.dumps(json.loads(line)): i for i, line in enumerate(full.read_text(encoding="utf-8").splitlines())}
    assert len({r["label"] for r in rows}) == 7  # every intent, not the first one only
    assert [order[json.dumps(r)] for r in rows] == sorted(order[json.dumps(r)] for r in rows)
    assert first.read_text(encoding="utf-8") == again.read_text(encoding="utf-8")
    assert first.read_text(encoding="utf-8") != other.read_text(encoding="utf-8")


def test_mmlu_pro_outcomes_carry_letters_that_teach_vote_weights(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    assert convert("mmlu-pro-outcome", data_dir, "train", out, limit=3000) == 3000
    records = load_outcome_jsonl(out)  # what moe train reads
    store = load_mmlu_pro(data_dir / "mmlu_pro_outcomes")
    first = store.questions_for(records[0].query)[0]
    for model in store.models:
        outcome = store.outcome(first.question_id, model)
        assert records[0].outcomes.get(model) == (None if outcome.correct is None else float(outcome.correct))
        assert records[0].answers.get(model) == outcome.pred
    assert records[0].task == first.category
    assert {r.task for r in records} <= set(store.categories) and len({r.task for r in records}) > 1
    assert all(set(r.answers) <= set(r.outcomes) and set(r.cost) <= set(r.outcomes) for r in records)
    weights = fit_from_records(records, list(store.models), extract_choice).as_mapping()
    strongest = sorted(weights, key=weights.__getitem__, reverse=True)[:2]
    # The two strongest recorded LLMs lead; most of the 31 add nothing once they have voted.
    assert set(strongest) <= {"gpt-4o-2024-05-13@ff991b5", "gemini-1.5-pro-002", "Meta-Llama-3_1-70B-Instruct"}
    assert sum(w < 1e-3 for w in weights.values()) >= 10


def test_routerbench_outcomes_named_after_a_configs_replay_experts(data_dir: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOE_DATA_DIR", str(data_dir))
    names = replay_names(load_config(ROOT / "configs" / "demo.yaml", check_env=False))
    assert len(names) == 11 and names["gpt-4-1106-preview"] == ("gpt-4-turbo",)
    out = tmp_path / "rb.jsonl"
    count = convert("routerbench", data_dir, "test", out, names=names)
    store = load_routerbench(data_dir / "routerdc" / "routerbench_zs")
    assert count == len(store.select(split="test")) - 8  # less the 8 that repeat a training prompt (below)
    records = load_outcome_jsonl(out)
    assert {e for r in records for e in r.outcomes} == {e for experts in names.values() for e in experts}
    row = store.select(split="test")[0]
    assert records[0].query == row.prompt
    assert records[0].answers["gpt-4-turbo"] == row.answers["gpt-4-1106-preview"].response
    assert records[0].cost["gpt-4-turbo"] == row.answers["gpt-4-1106-preview"].cost_usd
    assert records[0].task == row.eval_name
    convert("routerbench", data_dir, "test", out, names=names, answers=False, limit=5)
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 5 and all(set(line) == {"query", "outcomes", "cost", "task"} for line in lines)


def test_two_experts_replaying_one_model_both_get_its_records(data_dir: Path, tmp_path: Path) -> None:
    """Two endpoints of one model (a fast and a slow deployment, say): the records named only the last of them,
    with no warning, and moe train then refused the other for want of data."""
    replay = {"source": "routerbench", "path": str(data_dir / "routerdc" / "routerbench_zs")}
    config = parse_config({"version": 1, "experts": [
        {"name": name, "type": "replay", "model": model, "replay": replay}
        for name, model in (("gpt4-fast", "gpt-4-1106-preview"), ("gpt4-slow", "gpt-4-1106-preview"),
                            ("gpt35", "gpt-3.5-turbo-1106"))]}, check_env=False)
    names = replay_names(config)
    assert names == {"gpt-4-1106-preview": ("gpt4-fast", "gpt4-slow"), "gpt-3.5-turbo-1106": ("gpt35",)}
    out = tmp_path / "two.jsonl"
    convert("routerbench", data_dir, "test", out, names=names, limit=20)
    records = load_outcome_jsonl(out)
    assert len(records) == 20
    for r in records:
        assert set(r.outcomes) == {"gpt4-fast", "gpt4-slow", "gpt35"}
        assert r.outcomes["gpt4-fast"] == r.outcomes["gpt4-slow"] and r.cost["gpt4-fast"] == r.cost["gpt4-slow"]


def test_routerbench_test_split_leaves_out_training_prompts_as_the_suites_do(
        data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """RouterBench's test split repeats 8 of its training prompts; the routerbench suites drop them from test
    (``eval.routing.routerbench_split``), and so does the converted test file: it holds the suites' test
    prompts, none of which the converted train file holds."""
    from eval.routing import routerbench_split
    from eval.suite import SuiteContext

    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    convert("routerbench", data_dir, "train", train)
    assert convert("routerbench", data_dir, "test", test) == 945
    assert "repeats 8 training prompts" in capsys.readouterr().err
    prompts = {s: [r.query for r in load_outcome_jsonl(p)] for s, p in (("train", train), ("test", test))}
    normalised = {s: {datasets.normalise_text(q) for q in qs} for s, qs in prompts.items()}
    assert not normalised["train"] & normalised["test"]
    store = load_routerbench(data_dir / "routerdc" / "routerbench_zs")
    ctx = SuiteContext(name="routerbench", data_dir=data_dir, out=tmp_path, encoder=None)  # type: ignore[arg-type]
    suite_test = routerbench_split(ctx, list(store.rows))[2]
    assert prompts["test"] == [store.rows[i].prompt for i in suite_test]


def test_cli_writes_and_says_what(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "snips.jsonl"
    assert main(["convert", "snips-intent", "--split", "test", "--data", str(data_dir), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"labelled queries (snips-intent, test split) to {out}" in said
    assert said.startswith(f"wrote {len(datasets.load_labelled_jsonl(out))} ")
    assert main(["convert", "snips-intent", "--split", "val", "--data", str(data_dir), "--out", str(out)]) == 1
    assert "has no 'val' split" in capsys.readouterr().err


def test_a_config_whose_experts_the_data_set_never_recorded_writes_nothing_and_says_so(
        data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MOE_DATA_DIR", str(data_dir))
    out = tmp_path / "none.jsonl"
    # the demo's experts replay RouterBench's LLMs, none of which MMLU-Pro records
    assert main(["convert", "mmlu-pro-outcome", "--split", "test", "--data", str(data_dir), "--out", str(out),
                 "--config", str(ROOT / "configs" / "demo.yaml"), "--limit", "5"]) == 1
    assert "none of the experts' recorded models" in capsys.readouterr().err and not out.exists()


def test_replay_experts_missing_from_the_data_set_are_named(data_dir: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MOE_DATA_DIR", str(data_dir))
    config = (ROOT / "configs" / "demo.yaml").read_text(encoding="utf-8")
    assert "model: gpt-4-1106-preview" in config
    edited = tmp_path / "demo.yaml"
    edited.write_text(config.replace("model: gpt-4-1106-preview", "model: gpt-5-preview"), encoding="utf-8")
    out = tmp_path / "rb.jsonl"
    assert main(["convert", "routerbench", "--split", "test", "--data", str(data_dir), "--out", str(out),
                 "--config", str(edited), "--limit", "5"]) == 0
    err = capsys.readouterr().err
    assert "leave them out: gpt-4-turbo (model 'gpt-5-preview')" in err
    assert all("gpt-4-turbo" not in r.outcomes for r in load_outcome_jsonl(out))


def test_files_converted_with_their_own_id_prefix_join_into_one(data_dir: Path, tmp_path: Path) -> None:
    """Two data sets' files share ids (``train-17``), so joined they were refused as duplicates with no way out but
    dropping every id; ``--id-prefix`` keeps each file's ids its own."""
    parts = []
    for name, prefix in (("snips-intent", "snips-"), ("banking77-intent", "bank-")):
        out = tmp_path / f"{name}.jsonl"
        assert main(["convert", name, "--data", str(data_dir), "--out", str(out), "--limit", "50",
                     "--id-prefix", prefix]) == 0
        parts.append(out.read_text(encoding="utf-8"))
        ids = [json.loads(line)["id"] for line in parts[-1].splitlines()]
        assert len(ids) == 50 and all(i.startswith(prefix) for i in ids)
    plain = tmp_path / "plain.jsonl"
    assert main(["convert", "snips-intent", "--data", str(data_dir), "--out", str(plain), "--limit", "50"]) == 0
    assert [json.loads(line)["id"] for line in plain.read_text(encoding="utf-8").splitlines()] == [
        json.loads(line)["id"].removeprefix("snips-") for line in parts[0].splitlines()]  # the prefix alone differs
    joined = tmp_path / "joined.jsonl"
    joined.write_text("".join(parts), encoding="utf-8")
    rows = datasets.load_labelled_jsonl(joined)
    assert len(rows) == 100 and len({q.id for q in rows}) == 100
    (tmp_path / "twice.jsonl").write_text(plain.read_text(encoding="utf-8") * 2, encoding="utf-8")
    with pytest.raises(datasets.DatasetError, match="convert each with its own --id-prefix"):
        datasets.load_labelled_jsonl(tmp_path / "twice.jsonl")
