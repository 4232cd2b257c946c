"""Recorded real outputs of real LLMs, and the exact prompt text each recording answers.

Two sources, each loaded from a path (never copied into the project) and cached per resolved path:

* **RouterBench** (``routerdc/routerbench_zs``): 11 LLMs on ARC-Challenge, MBPP and Winogrande, with each
  model's correctness, full response text and USD cost per query. ``load_routerbench(path)`` takes that
  folder (every ``<task>_<split>.csv`` in it) or one such CSV file.
* **MMLU-Pro outcomes** (``mmlu_pro_outcomes``): 12,032 questions and, for 31 LLMs, whether each was right,
  the letter it answered and the length of its output. ``load_mmlu_pro(path)`` takes that folder.

Prompt text. RouterBench stores a prompt as a Python list literal of strings. In this subset a list holds one
string, which already carries any few-shot examples inline, except for a few ARC rows where the list holds
the same string twice (RouterBench recorded that call with the prompt doubled, and its cost is doubled too).
The prompt a user sends is the list's *distinct* strings, in order, joined by a blank line: for every row
here that is exactly the single string. MMLU-Pro's prompt is ``mmlu_pro_prompt(question)``: the question and
its lettered options in MMLU-Pro's own layout, without the category (which would give routing away).

Lookup. Recordings are found by prompt text after ``normalize_prompt`` (whitespace runs collapse to one
space, ends trimmed). A prompt can be recorded more than once (RouterBench's doubled ARC rows, two MBPP
prompts in both splits, 159 MMLU-Pro prompts that appear twice); ``find`` returns the first row, in load
order, in which the asked model *has* a record, so each model answers from its own real recording.

Missing values stay missing: a model with no record for a row has ``correct is None``; nothing is counted
as wrong by this module.
"""

from __future__ import annotations

import ast
import csv
import functools
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "MMLU_PRO_LETTERS",
    "MMLUProOutcome",
    "MMLUProQuestion",
    "MMLUProStore",
    "RouterBenchAnswer",
    "RouterBenchRow",
    "RouterBenchStore",
    "load_mmlu_pro",
    "load_routerbench",
    "mmlu_pro_prompt",
    "normalize_prompt",
    "routerbench_prompt",
]

MMLU_PRO_LETTERS = "ABCDEFGHIJ"

# RouterBench's columns that are not a model's correctness; the rest of the unsuffixed ones are.
_RB_FIXED = frozenset({"", "sample_id", "prompt", "eval_name", "oracle_model_to_route_to"})
_RB_RESPONSE = "|model_response"
_RB_COST = "|total_cost"
# RouterBench splits its files by task and split in the name: ``arc_challenge_train.csv``.
_RB_SPLITS = ("train", "test")
# The leading columns of MMLU-Pro's outcome CSVs; every later column is one model.
_MP_FIXED = ("question_id", "category", "src", "answer")


def normalize_prompt(text: str) -> str:
    """The lookup key for a prompt: whitespace runs collapse to one space, ends trimmed."""
    return " ".join(text.split())


def _raise_csv_limit() -> None:
    # RouterBench cells hold whole few-shot prompts and long code answers, above csv's 128 KiB default.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


# --------------------------------------------------------------------------------------------- RouterBench


@dataclass(frozen=True, slots=True)
class RouterBenchAnswer:
    """One model's recording for one RouterBench row."""

    correct: float | None  # 1.0 / 0.0 as RouterBench scored it; None: the model has no record here
    cost_usd: float | None  # what the call cost, in USD, as recorded
    # The response cell as stored (a list literal). Decoding all 35k of them up front would triple the load
    # time, and most uses (accuracy, cost, routing labels) never read the text.
    raw_response: str

    @property
    def recorded(self) -> bool:
        return self.correct is not None

    @property
    def response(self) -> str:
        """The model's full response text, exactly as recorded."""
        return _response_text(self.raw_response)


@dataclass(frozen=True, slots=True)
class RouterBenchRow:
    row_index: int  # RouterBench's own row number (the CSV's unnamed first column); unique, unlike sample_id
    sample_id: str  # e.g. "arc-challenge.test.1"; a few ARC ids occur twice (see the module docstring)
    eval_name: str  # RouterBench's task label: "arc-challenge", "mbpp", "winogrande"
    task: str  # from the file name: "arc_challenge", "mbpp", "winograde"
    split: str  # "train" or "test", from the file name
    prompt: str  # the text a user sends; see ``routerbench_prompt``
    oracle_model: str  # RouterBench's cheapest correct model for the row
    answers: Mapping[str, RouterBenchAnswer]  # model -> its recording

    def correct(self, model: str) -> float | None:
        return self.answers[model].correct


def routerbench_prompt(raw: str) -> str:
    """A RouterBench ``prompt`` cell (a list literal of strings) as the one text a user sends."""
    parts = ast.literal_eval(raw)
    if isinstance(parts, str):
        return parts
    if not isinstance(parts, list) or not all(isinstance(p, str) for p in parts):
        raise ValueError(f"prompt is not a list of strings: {raw[:80]!r}")
    return "\n\n".join(dict.fromkeys(parts))  # distinct strings, first-seen order


def _response_text(raw: str) -> str:
    if not raw:
        return ""
    parts = ast.literal_eval(raw)
    if isinstance(parts, str):
        return parts
    return "\n\n".join(str(p) for p in parts)


def _float_or_none(raw: str) -> float | None:
    return float(raw) if raw.strip() else None


class RouterBenchStore:
    """RouterBench rows in load order (task, then train before test), with a prompt index."""

    def __init__(self, rows: Sequence[RouterBenchRow], models: Sequence[str]) -> None:
        self.rows: tuple[RouterBenchRow, ...] = tuple(rows)
        self.models: tuple[str, ...] = tuple(models)
        self._by_prompt: dict[str, list[RouterBenchRow]] = {}
        for row in self.rows:
            self._by_prompt.setdefault(normalize_prompt(row.prompt), []).append(row)

    def __len__(self) -> int:
        return len(self.rows)

    def rows_for(self, prompt: str) -> tuple[RouterBenchRow, ...]:
        """Every row recorded for ``prompt``."""
        return tuple(self._by_prompt.get(normalize_prompt(prompt), ()))

    def find(self, prompt: str, model: str) -> RouterBenchRow | None:
        """The first row for ``prompt`` in which ``model`` has a record, or None."""
        return next((r for r in self.rows_for(prompt) if r.answers[model].recorded), None)

    def select(self, *, task: str | None = None, split: str | None = None) -> list[RouterBenchRow]:
        return [r for r in self.rows if (task is None or r.task == task) and (split is None or r.split == split)]

    def accuracy(self, model: str, rows: Iterable[RouterBenchRow] | None = None) -> float:
        """Mean correctness of ``model`` over the rows where it has a record (missing rows are left out)."""
        scores = [s for r in (self.rows if rows is None else rows) if (s := r.answers[model].correct) is not None]
        return sum(scores) / len(scores) if scores else float("nan")


def _routerbench_files(path: Path) -> list[tuple[Path, str, str]]:
    if path.is_file():
        candidates = [path]
    elif path.is_dir():
        candidates = sorted(path.glob("*.csv"))
    else:
        raise FileNotFoundError(f"no RouterBench data at {path}")
    files = []
    for file in candidates:
        task, _, split = file.stem.rpartition("_")
        if split in _RB_SPLITS and task:
            files.append((file, task, split))
    if not files:
        raise FileNotFoundError(f"no <task>_{{train,test}}.csv files at {path}")
    # Train before test within a task, so duplicate prompts resolve the same way on every machine.
    return sorted(files, key=lambda f: (f[1], _RB_SPLITS.index(f[2])))


def _routerbench_models(header: Sequence[str]) -> list[str]:
    return [c for c in header if c not in _RB_FIXED and "|" not in c]


def _routerbench_rows(file: Path, task: str, split: str, models: Sequence[str]) -> Iterable[RouterBenchRow]:
    with file.open(newline="", encoding="utf-8") as fh:
        for rec in csv.DictReader(fh):
            answers = {
                m: RouterBenchAnswer(
                    correct=_float_or_none(rec[m]),
                    cost_usd=_float_or_none(rec[m + _RB_COST]),
                    raw_response=rec[m + _RB_RESPONSE],
                )
                for m in models
            }
            yield RouterBenchRow(
                row_index=int(rec[""]),
                sample_id=rec["sample_id"],
                eval_name=rec["eval_name"],
                task=task,
                split=split,
                prompt=routerbench_prompt(rec["prompt"]),
                oracle_model=rec["oracle_model_to_route_to"],
                answers=answers,
            )


@functools.lru_cache(maxsize=8)
def _load_routerbench(path: Path) -> RouterBenchStore:
    _raise_csv_limit()
    rows: list[RouterBenchRow] = []
    models: list[str] | None = None
    for file, task, split in _routerbench_files(path):
        with file.open(newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh))
        found = _routerbench_models(header)
        if models is None:
            models = found
        elif set(found) != set(models):
            raise ValueError(f"{file.name}: its models differ from the other RouterBench files")
        rows.extend(_routerbench_rows(file, task, split, models))
    assert models is not None  # _routerbench_files raises when there is no file
    return RouterBenchStore(rows, models)


def load_routerbench(path: str | os.PathLike[str]) -> RouterBenchStore:
    """Load the RouterBench CSVs under ``path`` (a folder of ``<task>_<split>.csv``, or one such file)."""
    resolved = Path(path).resolve()
    store = _load_routerbench(resolved)
    _read_again(file for file, _, _ in _routerbench_files(resolved))
    return store


# The audit event naming a data file a store was read from (``_read_again``).
DATA_FILE_EVENT = "moe.data_file"


def _read_again(files: Iterable[Path]) -> None:
    """Name each file a store loaded from, as a Python audit event (``DATA_FILE_EVENT``), every time the store is
    handed out: a cached store opens no file, yet what it returns rests on them, and ``eval.provenance.files_read``
    records the data a result was computed from by these events and by the files opened."""
    for file in files:
        sys.audit(DATA_FILE_EVENT, str(file))


# ---------------------------------------------------------------------------------------------- MMLU-Pro


@dataclass(frozen=True, slots=True)
class MMLUProQuestion:
    question_id: int
    category: str  # one of 14, e.g. "math", "computer science"
    src: str  # origin, e.g. "ori_mmlu-business_ethics", "theoremQA-Math"
    question: str
    options: tuple[str, ...]  # up to 10, lettered A-J in order
    answer: str  # the gold letter


@dataclass(frozen=True, slots=True)
class MMLUProOutcome:
    """One model's recorded outcome on one question. All three are None when the model has no record."""

    correct: int | None  # 1 / 0 (0 includes "no letter extracted")
    pred: str | None  # the letter extracted from its answer; None when extraction failed or no record
    response_chars: int | None  # length of its generated text, the only output-size figure recorded

    @property
    def recorded(self) -> bool:
        return self.correct is not None


def mmlu_pro_prompt(question: MMLUProQuestion) -> str:
    """The prompt text for a question: MMLU-Pro's layout (question, then ``A. option`` lines)."""
    options = "\n".join(f"{MMLU_PRO_LETTERS[i]}. {opt}" for i, opt in enumerate(question.options))
    return f"Question:\n{question.question}\nOptions:\n{options}"


@dataclass(frozen=True, slots=True)
class _Columns:
    """One model's outcomes as three columns aligned with the store's questions (372k objects otherwise)."""

    correct: tuple[int | None, ...]
    pred: tuple[str | None, ...]
    chars: tuple[int | None, ...]

    def at(self, i: int) -> MMLUProOutcome:
        return MMLUProOutcome(self.correct[i], self.pred[i], self.chars[i])


class MMLUProStore:
    """Questions sorted by id, and per model its outcomes aligned with them."""

    def __init__(self, questions: Sequence[MMLUProQuestion], columns: Mapping[str, _Columns]) -> None:
        self.questions: tuple[MMLUProQuestion, ...] = tuple(questions)
        self.models: tuple[str, ...] = tuple(columns)
        self._columns = dict(columns)
        self._position = {q.question_id: i for i, q in enumerate(self.questions)}

    def __len__(self) -> int:
        return len(self.questions)

    @functools.cached_property
    def _by_prompt(self) -> dict[str, list[int]]:
        # Built on first lookup: evaluation code that only reads outcomes never pays for it.
        index: dict[str, list[int]] = {}
        for i, q in enumerate(self.questions):
            index.setdefault(normalize_prompt(mmlu_pro_prompt(q)), []).append(i)
        return index

    @property
    def categories(self) -> tuple[str, ...]:
        return tuple(sorted({q.category for q in self.questions}))

    def question(self, question_id: int) -> MMLUProQuestion:
        return self.questions[self._position[question_id]]

    def outcome(self, question_id: int, model: str) -> MMLUProOutcome:
        return self._columns[model].at(self._position[question_id])

    def outcomes(self, model: str) -> list[MMLUProOutcome]:
        """``model``'s outcomes, aligned with ``questions``."""
        column = self._columns[model]
        return [column.at(i) for i in range(len(self.questions))]

    def correct(self, model: str) -> tuple[int | None, ...]:
        """``model``'s correctness (1 / 0 / None), aligned with ``questions``: the fast path for evaluation."""
        return self._columns[model].correct

    def questions_for(self, prompt: str) -> tuple[MMLUProQuestion, ...]:
        return tuple(self.questions[i] for i in self._by_prompt.get(normalize_prompt(prompt), ()))

    def find(self, prompt: str, model: str) -> tuple[MMLUProQuestion, MMLUProOutcome] | None:
        """The first question for ``prompt`` that ``model`` has a record for, with that record."""
        column = self._columns[model]
        for i in self._by_prompt.get(normalize_prompt(prompt), ()):
            if column.correct[i] is not None:
                return self.questions[i], column.at(i)
        return None

    def accuracy(self, model: str, category: str | None = None) -> float:
        """Accuracy over the questions ``model`` has a record for (as ``model_summary.json`` computes it)."""
        scores = [
            c
            for q, c in zip(self.questions, self._columns[model].correct, strict=True)
            if c is not None and (category is None or q.category == category)
        ]
        return sum(scores) / len(scores) if scores else float("nan")


def _question_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.jsonl"))


def _read_questions(folder: Path) -> list[MMLUProQuestion]:
    files = _question_files(folder)
    if not files:
        raise FileNotFoundError(f"no MMLU-Pro questions (*.jsonl) in {folder}")
    questions = []
    for file in files:
        with file.open(encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    q = json.loads(line)
                    questions.append(
                        MMLUProQuestion(
                            question_id=int(q["question_id"]),
                            category=q["category"],
                            src=q["src"],
                            question=q["question"],
                            options=tuple(q["options"]),
                            answer=q["answer"],
                        )
                    )
    return sorted(questions, key=lambda q: q.question_id)


def _read_columns(file: Path, ids: Sequence[int]) -> dict[str, tuple[str, ...]]:
    """A model-per-column CSV as model -> its cells, in the order of ``ids`` ("" where a row is absent)."""
    with file.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        if tuple(header[: len(_MP_FIXED)]) != _MP_FIXED:
            raise ValueError(f"{file.name}: expected leading columns {', '.join(_MP_FIXED)}")
        models = header[len(_MP_FIXED) :]
        blank = ("",) * len(models)
        by_id = {int(rec[0]): rec[len(_MP_FIXED) :] for rec in reader}
    rows = [by_id.get(qid, blank) for qid in ids]
    return dict(zip(models, zip(*rows, strict=True), strict=True))


_CORRECT = {"": None, "0": 0, "1": 1}


_MP_COLUMNS = ("correct.csv", "pred.csv", "response_chars.csv")


@functools.lru_cache(maxsize=4)
def _load_mmlu_pro(path: Path) -> MMLUProStore:
    if not path.is_dir():
        raise FileNotFoundError(f"no MMLU-Pro outcomes folder at {path}")
    questions = _read_questions(path / "questions")
    ids = [q.question_id for q in questions]
    correct, pred, chars = (_read_columns(path / name, ids) for name in _MP_COLUMNS)
    if list(pred) != list(correct) or list(chars) != list(correct):
        raise ValueError("correct.csv, pred.csv and response_chars.csv list different models")
    columns = {}
    for m, c_col in correct.items():
        # A record exists where correct.csv has a value; pred and length count only there.
        known = tuple(_CORRECT[v] for v in c_col)
        columns[m] = _Columns(
            correct=known,
            pred=tuple((p or None) if k is not None else None for k, p in zip(known, pred[m], strict=True)),
            chars=tuple(int(n) if n and k is not None else None for k, n in zip(known, chars[m], strict=True)),
        )
    return MMLUProStore(questions, columns)


def load_mmlu_pro(path: str | os.PathLike[str]) -> MMLUProStore:
    """Load the MMLU-Pro outcomes folder (``questions/*.jsonl``, ``correct.csv``, ``pred.csv``, ...)."""
    resolved = Path(path).resolve()
    store = _load_mmlu_pro(resolved)
    _read_again([*_question_files(resolved / "questions"), *(resolved / name for name in _MP_COLUMNS)])
    return store
