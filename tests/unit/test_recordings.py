"""The recording loaders, checked against the real files and the figures in their PROVENANCE.md."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest

from experts.recordings import (
    MMLUProQuestion,
    load_mmlu_pro,
    load_routerbench,
    mmlu_pro_prompt,
    normalize_prompt,
    routerbench_prompt,
)

ROUTERBENCH_MODELS = {
    "WizardLM/WizardLM-13B-V1.2", "claude-instant-v1", "claude-v1", "claude-v2", "gpt-3.5-turbo-1106",
    "gpt-4-1106-preview", "meta/code-llama-instruct-34b-chat", "meta/llama-2-70b-chat",
    "mistralai/mistral-7b-chat", "mistralai/mixtral-8x7b-chat", "zero-one-ai/Yi-34B-Chat",
}
MMLU_PRO_SIZES = {
    "math": 1351, "physics": 1299, "chemistry": 1132, "law": 1101, "engineering": 969, "other": 924,
    "economics": 844, "health": 818, "psychology": 798, "business": 789, "biology": 717, "philosophy": 499,
    "computer science": 410, "history": 381,
}


@pytest.fixture(scope="module")
def rb_dir(data_dir: Path) -> Path:
    return data_dir / "routerdc" / "routerbench_zs"


@pytest.fixture(scope="module")
def mp_dir(data_dir: Path) -> Path:
    return data_dir / "mmlu_pro_outcomes"


# ------------------------------------------------------------------------------------------- RouterBench


def test_routerbench_rows_and_models_match_provenance(rb_dir: Path) -> None:
    store = load_routerbench(rb_dir)
    assert set(store.models) == ROUTERBENCH_MODELS
    counts = Counter((r.task, r.split) for r in store.rows)
    assert counts == {
        ("arc_challenge", "train"): 1039, ("arc_challenge", "test"): 445,
        ("mbpp", "train"): 299, ("mbpp", "test"): 128,
        ("winograde", "train"): 887, ("winograde", "test"): 380,
    }
    assert {r.eval_name for r in store.rows} == {"arc-challenge", "mbpp", "winogrande"}
    assert len({r.row_index for r in store.rows}) == len(store) == 3178


def test_routerbench_a_known_row(rb_dir: Path) -> None:
    store = load_routerbench(rb_dir)
    (row,) = [r for r in store.select(task="mbpp", split="test") if r.sample_id == "mbpp.dev.1"]
    assert row.prompt == "Write a python function to identify non-prime numbers."
    gpt35 = row.answers["gpt-3.5-turbo-1106"]
    assert gpt35.correct == 1.0
    assert gpt35.cost_usd == 0.000423
    assert gpt35.response.startswith("Here's a Python function to identify non-prime numbers:\n\n```python\n")
    assert row.correct("gpt-4-1106-preview") == 0.0
    assert row.oracle_model == "mistralai/mistral-7b-chat"


def test_routerbench_one_file_loads_alone(rb_dir: Path) -> None:
    store = load_routerbench(rb_dir / "winograde_test.csv")
    assert len(store) == 380
    assert {(r.task, r.split) for r in store.rows} == {("winograde", "test")}


def test_routerbench_accuracy_leaves_missing_out(rb_dir: Path) -> None:
    store = load_routerbench(rb_dir)
    test_rows = store.select(split="test")
    # gpt-4 has records on 947 of the 953 test rows (six doubled ARC rows hold only gpt-3.5's record).
    scored = [r for r in test_rows if r.answers["gpt-4-1106-preview"].recorded]
    assert len(test_rows) == 953 and len(scored) == 947
    assert store.accuracy("gpt-4-1106-preview", test_rows) == pytest.approx(833 / 947)
    assert store.accuracy("gpt-4-1106-preview") == pytest.approx(0.8799, abs=5e-5)
    assert store.accuracy("WizardLM/WizardLM-13B-V1.2") == pytest.approx(0.5680, abs=5e-5)


def test_routerbench_doubled_prompt_finds_each_models_own_record(rb_dir: Path) -> None:
    store = load_routerbench(rb_dir)
    rows = [r for r in store.select(split="test") if r.sample_id == "arc-challenge.val.172"]
    assert len(rows) == 2 and rows[0].prompt == rows[1].prompt  # the doubled list collapses to one prompt
    prompt = rows[0].prompt
    gpt35 = store.find(prompt, "gpt-3.5-turbo-1106")
    gpt4 = store.find(prompt, "gpt-4-1106-preview")
    assert gpt35 is not None and gpt4 is not None and gpt35 is not gpt4
    assert gpt35.answers["gpt-3.5-turbo-1106"].cost_usd == 0.000968  # recorded with the prompt sent twice
    assert gpt4.answers["gpt-4-1106-preview"].cost_usd == 0.00486


def test_routerbench_prompt_from_the_list_literal() -> None:
    assert routerbench_prompt("['one']") == "one"
    assert routerbench_prompt("['same', 'same']") == "same"
    assert routerbench_prompt("['a', 'b']") == "a\n\nb"
    with pytest.raises(ValueError):
        routerbench_prompt("[1, 2]")


def test_routerbench_find_normalises_whitespace(rb_dir: Path) -> None:
    store = load_routerbench(rb_dir)
    row = store.rows[0]
    messy = "  " + row.prompt.replace(" ", "   ").replace("\n", " \n\n ") + "\n"
    assert store.find(messy, "claude-v2") is row
    assert store.find("not a recorded prompt", "claude-v2") is None


def test_routerbench_missing_path_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_routerbench(tmp_path / "absent")
    with pytest.raises(FileNotFoundError):
        load_routerbench(tmp_path)


# ---------------------------------------------------------------------------------------------- MMLU-Pro


def test_mmlu_pro_questions_and_models_match_provenance(mp_dir: Path) -> None:
    store = load_mmlu_pro(mp_dir)
    assert len(store) == 12_032
    assert len(store.models) == 31
    assert Counter(q.category for q in store.questions) == MMLU_PRO_SIZES
    assert [q.question_id for q in store.questions] == sorted(q.question_id for q in store.questions)
    missing = {m: sum(c is None for c in store.correct(m)) for m in store.models}
    assert {m: n for m, n in missing.items() if n} == {
        "DeepSeek-Coder-V2": 12_032 - 10_351, "deepseek@ff991b5": 12_032 - 11_864,
        "gemini-1.5-flash-002": 20, "gemini-1.5-pro-002": 12,
    }


def test_mmlu_pro_accuracy_matches_model_summary(mp_dir: Path) -> None:
    store = load_mmlu_pro(mp_dir)
    summary = {s["model"]: s for s in json.loads((mp_dir / "model_summary.json").read_text())}
    assert set(summary) == set(store.models)
    for model in store.models:
        assert store.accuracy(model) == pytest.approx(summary[model]["acc"], abs=5e-5), model
        assert sum(o.recorded for o in store.outcomes(model)) == summary[model]["n"]
    for model in ("gpt-4o-2024-05-13@ff991b5", "DeepSeek-Coder-V2", "Llama-2-7b-hf"):
        for category in store.categories:
            assert store.accuracy(model, category) == pytest.approx(summary[model][category], abs=5e-5)
    assert store.accuracy("gpt-4o-2024-05-13@ff991b5") == pytest.approx(0.721, abs=5e-4)


def test_mmlu_pro_a_known_question_and_its_outcomes(mp_dir: Path) -> None:
    store = load_mmlu_pro(mp_dir)
    q = store.question(70)
    assert (q.category, q.src, q.answer, len(q.options)) == ("business", "ori_mmlu-business_ethics", "I", 9)
    gemma = store.outcome(70, "gemma-7b")
    assert (gemma.correct, gemma.pred, gemma.response_chars) == (1, "I", 260)
    llama = store.outcome(70, "Llama-2-70b-hf")
    assert (llama.correct, llama.pred, llama.response_chars) == (0, "F", 256)


def test_mmlu_pro_no_letter_and_no_record_are_told_apart(mp_dir: Path) -> None:
    store = load_mmlu_pro(mp_dir)
    no_letter = [o for o in store.outcomes("Qwen1.5-7B-Chat") if o.recorded and o.pred is None]
    assert len(no_letter) == 2809  # PROVENANCE: 2,809 rows with pred None, counted as wrong
    assert all(o.correct == 0 and o.response_chars is not None for o in no_letter)
    absent = [o for o in store.outcomes("DeepSeek-Coder-V2") if not o.recorded]
    assert len(absent) == 1681
    assert all(o.pred is None and o.response_chars is None for o in absent)


def test_mmlu_pro_prompt_layout_and_lookup(mp_dir: Path) -> None:
    q = MMLUProQuestion(1, "math", "x", "What is 1+1?", ("1", "2"), "B")
    assert mmlu_pro_prompt(q) == "Question:\nWhat is 1+1?\nOptions:\nA. 1\nB. 2"
    store = load_mmlu_pro(mp_dir)
    real = store.question(70)
    found = store.find(normalize_prompt(mmlu_pro_prompt(real)) + "  ", "gemma-7b")
    assert found is not None and found[0] == real
    assert store.find(real.question, "gemma-7b") is None  # the bare question is not the recorded prompt


def test_mmlu_pro_duplicate_prompt_prefers_a_recorded_question(mp_dir: Path) -> None:
    store = load_mmlu_pro(mp_dir)
    dups = [q for q in store.questions if len(store.questions_for(mmlu_pro_prompt(q))) > 1]
    assert len(dups) == 318  # 159 prompts that MMLU-Pro holds twice
    first, second = store.questions_for(mmlu_pro_prompt(store.question(6036)))
    assert (first.question_id, second.question_id) == (6036, 6037)
    found = store.find(mmlu_pro_prompt(first), "gemma-7b")
    assert found is not None and found[0] is first


def test_loads_are_cached_per_resolved_path(rb_dir: Path, mp_dir: Path) -> None:
    assert load_mmlu_pro(mp_dir) is load_mmlu_pro(mp_dir / ".." / "mmlu_pro_outcomes")
    assert load_routerbench(rb_dir) is load_routerbench(str(rb_dir))
    assert math.isnan(load_mmlu_pro(mp_dir).accuracy("gemma-7b", "no such category"))
