"""Loaders against the real shared data (row counts from each folder's PROVENANCE.md), and splits.

``data_dir`` is the shared fixture in tests/conftest.py.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from eval import datasets as ds
from eval.datasets import LabelledQuery

CLINC_DOMAINS = {
    "banking", "credit_cards", "kitchen_and_dining", "home", "auto_and_commute",
    "travel", "utility", "work", "small_talk", "meta",
}  # fmt: skip
SNIPS_INTENTS = {
    "AddToPlaylist", "BookRestaurant", "GetWeather", "PlayMusic",
    "RateBook", "SearchCreativeWork", "SearchScreeningEvent",
}  # fmt: skip
MMLU_PRO_SIZES = {
    "math": 1351, "physics": 1299, "chemistry": 1132, "law": 1101, "engineering": 969, "other": 924,
    "economics": 844, "health": 818, "psychology": 798, "business": 789, "biology": 717,
    "philosophy": 499, "computer science": 410, "history": 381,
}  # fmt: skip


def _unique_ids(items: list[LabelledQuery]) -> bool:
    return len({q.id for q in items}) == len(items)


# ---------------------------------------------------------------- real suites


def test_mmlu_pro_domains(data_dir: Path) -> None:
    items = ds.load_mmlu_pro_domains(data_dir)
    assert len(items) == 12_032 and _unique_ids(items)
    assert Counter(q.label for q in items) == MMLU_PRO_SIZES
    assert all(q.id.isdigit() and q.text for q in items)


def test_mmlu_pro_include_options_and_suite_folder(data_dir: Path) -> None:
    plain = ds.load_mmlu_pro_domains(data_dir / "mmlu_pro_outcomes")
    full = ds.load_mmlu_pro_domains(data_dir, include_options=True)
    assert [q.id for q in plain] == [q.id for q in full]
    assert full[0].text.startswith(plain[0].text) and "\nA. " in full[0].text


def test_clinc150_domains(data_dir: Path) -> None:
    items = ds.load_clinc150_domains(data_dir)
    assert len(items) == 22_500 + 1_200 and _unique_ids(items)
    counts = Counter(q.label for q in items)
    assert set(counts) == CLINC_DOMAINS | {ds.CLINC_OOS_LABEL}
    assert counts[ds.CLINC_OOS_LABEL] == 1_200
    # 15 intents per domain x 150 rows per intent (100 train + 20 val + 30 test).
    assert all(counts[d] == 15 * 150 for d in CLINC_DOMAINS)


@pytest.mark.parametrize(("split", "in_scope", "oos"), [("train", 15_000, 100), ("val", 3_000, 100),
                                                        ("test", 4_500, 1_000)])
def test_clinc150_own_splits(data_dir: Path, split: str, in_scope: int, oos: int) -> None:
    items = ds.load_clinc150_domains(data_dir, split=split)  # type: ignore[arg-type]
    assert sum(q.label != "oos" for q in items) == in_scope
    assert sum(q.label == "oos" for q in items) == oos
    assert all(q.id.split("-")[0] in (split, f"oos_{split}") for q in items)


def test_clinc150_intent_labels(data_dir: Path) -> None:
    items = ds.load_clinc150_domains(data_dir, split="test", label="intent")
    assert len({q.label for q in items}) == 151  # 150 intents + oos


def test_banking77(data_dir: Path) -> None:
    items = ds.load_banking77(data_dir)
    assert len(items) == 13_083 and _unique_ids(items)
    assert len({q.label for q in items}) == 77
    assert len(ds.load_banking77(data_dir, split="train")) == 10_003
    assert len(ds.load_banking77(data_dir, split="test")) == 3_080


def test_snips(data_dir: Path) -> None:
    items = ds.load_snips(data_dir)
    assert len(items) == 14_484 and _unique_ids(items)
    assert {q.label for q in items} == SNIPS_INTENTS
    test = ds.load_snips(data_dir, split="test")
    assert len(test) == 700 and Counter(q.label for q in test) == dict.fromkeys(SNIPS_INTENTS, 100)
    assert len(ds.load_snips(data_dir, split="train")) == 13_784


def test_routellm_mmlu(data_dir: Path) -> None:
    full = ds.load_routellm_mmlu(data_dir, drop_contaminated=False)
    assert len(full.queries) == 14_042 and _unique_ids(full.queries)
    assert len({q.label for q in full.queries}) == 57
    assert full.strong_correct.shape == full.weak_correct.shape == (14_042,)
    # PROVENANCE.md: GPT-4-1106 .806, Mixtral .681.
    assert full.strong_correct.mean() == pytest.approx(0.806, abs=5e-4)
    assert full.weak_correct.mean() == pytest.approx(0.681, abs=5e-4)
    assert full.strong_model == "gpt-4-1106-preview"
    clean = ds.load_routellm_mmlu(data_dir)
    assert len(clean.queries) == 14_042 - 5  # the 5 contaminated prompts


# ---------------------------------------------------------------- labelled JSONL


def test_load_labelled_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text(
        '{"query": "what is 2+2", "label": "math"}\n'
        "\n"
        '{"query": "who won", "label": "sport", "id": "q-7"}\n'
        '{"query": "hello", "label": "chat", "id": 12}\n',
        encoding="utf-8",
    )
    assert ds.load_labelled_jsonl(path) == [
        LabelledQuery("1", "what is 2+2", "math"),
        LabelledQuery("q-7", "who won", "sport"),
        LabelledQuery("12", "hello", "chat"),
    ]


def test_load_labelled_jsonl_reads_integer_labels_as_strings(tmp_path: Path) -> None:
    path = tmp_path / "int.jsonl"
    path.write_text('{"query": "play some jazz", "label": 1}\n{"query": "book a table", "label": "2"}\n',
                    encoding="utf-8")
    assert ds.load_labelled_jsonl(path) == [LabelledQuery("1", "play some jazz", "1"),
                                            LabelledQuery("2", "book a table", "2")]


@pytest.mark.parametrize(
    ("second_line", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"query": "x"}', "'label' must be a non-empty string"),
        ('{"query": 3, "label": "a"}', "'query' must be a non-empty string, got 3"),
        ('{"text": "hi", "label": "a"}', "'query' must be a non-empty string, and is missing \\(the keys here: "
                                         "'text', 'label'\\)"),
        ('{"query": "  ", "label": "a"}', "'query' must be a non-empty string"),
        ('{"query": "\\u200b\\u200b", "label": "a"}', "'query' must be a non-empty string"),
        ('{"query": "x", "label": "\\t"}', "'label' must be a non-empty string or an integer, got \"\\\\t\""),
        ('{"query": "x", "outcomes": {"a": 1}}', "an outcome record .* --train and --test take labelled queries"),
        ('["query", "label"]', "expected an object with 'query' and 'label', got list"),
        ('{"query": "x", "label": "a", "id": "a"}',
         "duplicate id 'a' \\(first on line 1\\); ids name queries in the seeded splits.*drop the 'id' fields"),
        ('{"query": "x", "label": "a", "id": true}', "'id' must be a string or integer"),
        ('{"query": "x", "label": true}', "'label' must be a non-empty string or an integer, got true"),
        ('{"query": "x", "label": 1.5}', "'label' must be a non-empty string or an integer, got 1.5"),
        ('{"query": "x", "label": null}', "'label' must be a non-empty string or an integer, got null"),
        ('{"query": "x", "label": {"id": 1}}', "'label' must be a non-empty string or an integer, got {\"id\": 1}"),
        ('{"query": "x"}', "'label' must be a non-empty string or an integer, and is missing"),
    ],
)
def test_load_labelled_jsonl_errors_name_file_and_line(tmp_path: Path, second_line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"query": "ok", "label": "a", "id": "a"}\n' + second_line + "\n", encoding="utf-8")
    with pytest.raises(ds.DatasetError, match=rf"bad\.jsonl:2: {message}"):
        ds.load_labelled_jsonl(path)


def test_implicit_ids_never_collide_with_explicit_ones(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    lines = [{"query": f"query {n}", "label": "ab"[n % 2]} for n in range(1, 8)]
    lines[4]["id"] = 2  # line 5 names the id line 2 would get from its number
    lines[5]["id"] = "line-3"  # line 6 names line 3's first fallback too
    lines[6]["id"] = 3  # and line 7 line 3's number
    path.write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    rows = ds.load_labelled_jsonl(path)
    assert [q.id for q in rows] == ["1", "line-2", "line-3-2", "4", "2", "line-3", "3"]
    assert [q.text for q in rows] == [f"query {n}" for n in range(1, 8)]
    # Lines whose number no line names keep it, so files with no ids, or ids on every line, read as before.
    path.write_text('{"query": "a", "label": "x"}\n{"query": "b", "label": "y", "id": 7}\n', encoding="utf-8")
    assert [q.id for q in ds.load_labelled_jsonl(path)] == ["1", "7"]


def test_explicit_duplicate_ids_are_still_refused_beside_implicit_ones(tmp_path: Path) -> None:
    path = tmp_path / "dup.jsonl"
    path.write_text('{"query": "a", "label": "x"}\n{"query": "b", "label": "y", "id": 1}\n'
                    '{"query": "c", "label": "x", "id": "1"}\n', encoding="utf-8")
    with pytest.raises(ds.DatasetError, match=r"dup\.jsonl:3: duplicate id '1' \(first on line 2\)"):
        ds.load_labelled_jsonl(path)


def test_missing_suite_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ds.DatasetError, match="snips"):
        ds.load_snips(tmp_path)


# ---------------------------------------------------------------- splits


def _toy(n: int) -> list[LabelledQuery]:
    return [LabelledQuery(f"q{i}", f"text {i}", "x") for i in range(n)]


def test_split_by_id_is_disjoint_complete_and_near_fractions() -> None:
    items = _toy(10_000)
    train, val, test = ds.split_by_id(items)
    ids = [{q.id for q in part} for part in (train, val, test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert len(train) + len(val) + len(test) == len(items)
    for part, frac in zip((train, val, test), (0.7, 0.1, 0.2), strict=True):
        assert abs(len(part) / len(items) - frac) < 0.02


def test_split_by_id_is_reproducible_and_seeded() -> None:
    items = _toy(2_000)
    first = ds.split_by_id(items, seed=1)
    assert first == ds.split_by_id(list(reversed(items))[::-1], seed=1)
    assert first != ds.split_by_id(items, seed=2)
    # An item's part depends only on its id: dropping other items does not move it.
    sub = ds.split_by_id(items[:500], seed=1)
    assert [[q.id for q in p] for p in sub] == [[q.id for q in p if int(q.id[1:]) < 500] for p in first]


def test_split_by_id_pinned_assignment() -> None:
    # Pins the hash (sha256 of "seed:id"), so a change to it cannot silently reshuffle every split.
    train, val, test = ds.split_by_id(_toy(10), seed=0)
    assert ([q.id for q in train], [q.id for q in val], [q.id for q in test]) == PINNED


PINNED = (["q0", "q2", "q4", "q5", "q6", "q9"], ["q7", "q8"], ["q1", "q3"])


def test_split_by_id_rejects_bad_fractions() -> None:
    with pytest.raises(ValueError):
        ds.split_by_id(_toy(3), fractions=(0.5, 0.4))
    with pytest.raises(ValueError):
        ds.split_by_id(_toy(3), fractions=(1.2, -0.2))


def test_split_by_id_on_real_suite_by_question_id(data_dir: Path) -> None:
    items = ds.load_mmlu_pro_domains(data_dir)
    train, val, test = ds.split_by_id(items, seed=0)
    assert {q.id for q in train}.isdisjoint(q.id for q in test)
    assert {q.id for q in val}.isdisjoint(q.id for q in test)
    assert ds.split_by_id(items, seed=0) == (train, val, test)
