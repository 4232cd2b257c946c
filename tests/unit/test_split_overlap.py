"""No suite's test split holds a query whose normalised text (lower case, whitespace collapsed) is also among its
training or validation queries: the seeded splits place copies of one text together, and the data sets' own test
splits drop the repeats (counting them). Real data from the shared folder, split functions only (no encoder)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from eval import datasets as ds
from eval.labels import FRACTIONS as LABEL_FRACTIONS
from eval.labels import unseen_test
from eval.routing import FRACTIONS, _split, routerbench_split
from experts.recordings import load_mmlu_pro, load_routerbench, mmlu_pro_prompt


def _ctx() -> Any:
    return SimpleNamespace(seed=0, limit=None, notes=[])


def _overlap(seen: Iterable[str], test: Iterable[str]) -> set[str]:
    return {ds.normalise_text(t) for t in seen} & {ds.normalise_text(t) for t in test}


def _texts(texts: Sequence[str], rows: Iterable[int]) -> list[str]:
    return [texts[i] for i in rows]


def test_normalise_text() -> None:
    assert ds.normalise_text("  What IS\tthe\n answer? ") == "what is the answer?"


def test_split_by_id_with_text_keeps_copies_together_and_unique_texts_in_place() -> None:
    items = [ds.LabelledQuery(f"q{i}", f"text {i}", "x") for i in range(2_000)]
    items += [ds.LabelledQuery(f"d{i}", f"  TEXT {i % 50}", "x") for i in range(200)]  # copies of 50 texts
    by_id = ds.split_by_id(items, seed=3)
    by_text = ds.split_by_id(items, seed=3, text=lambda q: q.text)
    part_of = {q.id: p for p, part in enumerate(by_text) for q in part}
    for i in range(50):  # every copy of one text in one part
        assert len({part_of[q.id] for q in items if ds.normalise_text(q.text) == f"text {i}"}) == 1
    for i in range(50, 2_000):  # a text of its own keeps its id's part
        assert part_of[f"q{i}"] == next(p for p, part in enumerate(by_id) if any(q.id == f"q{i}" for q in part))
    assert by_text == ds.split_by_id(list(items), seed=3, text=lambda q: q.text)  # reproducible
    assert _overlap((q.text for q in by_text[0] + by_text[1]), (q.text for q in by_text[2])) == set()


def test_mmlu_pro_split_has_no_repeated_prompt(data_dir: Path) -> None:
    store = load_mmlu_pro(data_dir / "mmlu_pro_outcomes")
    prompts = [mmlu_pro_prompt(q) for q in store.questions]
    train, val, test = _split(_ctx(), [str(q.question_id) for q in store.questions], FRACTIONS, prompts)
    assert len(train) + len(val) + len(test) == len(prompts)
    assert _overlap(_texts(prompts, [*train, *val]), _texts(prompts, test)) == set()
    assert _overlap(_texts(prompts, train), _texts(prompts, val)) == set()  # the outcome suite tunes on val
    # mmlu-pro-domain splits LabelledQuery items the same way
    items = [ds.LabelledQuery(str(q.question_id), p, q.category) for q, p in zip(store.questions, prompts, strict=True)]
    parts = ds.split_by_id(items, LABEL_FRACTIONS, seed=0, text=lambda q: q.text)
    assert [[int(q.id) for q in part] for part in parts] == [
        [store.questions[i].question_id for i in part] for part in (train, val, test)]


def test_routellm_mmlu_split_has_no_repeated_prompt(data_dir: Path) -> None:
    suite = ds.load_routellm_mmlu(data_dir)
    texts = [q.text for q in suite.queries]
    train, val, test = _split(_ctx(), [q.id for q in suite.queries], FRACTIONS, texts)
    assert _overlap(_texts(texts, [*train, *val]), _texts(texts, test)) == set()
    assert _overlap(_texts(texts, train), _texts(texts, val)) == set()


def test_routerbench_test_split_drops_training_prompts(data_dir: Path) -> None:
    rows = list(load_routerbench(data_dir / "routerdc" / "routerbench_zs").rows)
    ctx = _ctx()
    train, tune, test, dropped = routerbench_split(ctx, rows)
    prompts = [r.prompt for r in rows]
    assert _overlap(_texts(prompts, [*train, *tune]), _texts(prompts, test)) == set()
    assert _overlap(_texts(prompts, train), _texts(prompts, tune)) == set()
    assert dropped == 8 and len(test) == sum(r.split == "test" for r in rows) - dropped
    assert any("dropped from test" in n and " 8 " in n for n in ctx.notes)


@pytest.mark.parametrize(("name", "load", "dropped"), [
    ("snips-intent", lambda d: (ds.load_snips(d, "train"), ds.load_snips(d, "test")), 11),
    ("banking77-intent", lambda d: (ds.load_banking77(d, "train"), ds.load_banking77(d, "test")), 7),
    ("clinc150-domain", lambda d: ([q for q in ds.load_clinc150_domains(d, "train") if q.label != ds.CLINC_OOS_LABEL]
                                   + ds.load_clinc150_domains(d, "val"), ds.load_clinc150_domains(d, "test")), 2),
])
def test_own_test_splits_drop_training_queries(name: str, load: Any, dropped: int, data_dir: Path) -> None:
    seen, test = load(data_dir)
    ctx = _ctx()
    kept, n = unseen_test(ctx, name, test, seen)
    assert n == dropped and len(kept) == len(test) - dropped
    assert _overlap((q.text for q in seen), (q.text for q in kept)) == set()
    assert f"repeats {dropped} of" in ctx.notes[-1]
