"""Loaders for labelled routing suites, and reproducible splits by id.

Every loader takes a path and reads the files described in that data set's PROVENANCE.md; nothing is
copied or cached. ``data_dir`` may be either the shared data root (holding ``clinc150/``, ``banking77/``,
...) or the data set's own folder, so callers can pass one root around or point at a single suite.

Ids are stable across runs: a data set's own id where it has one (MMLU-Pro ``question_id``), otherwise
``<split>-<row>`` or ``<subject>-<row>`` from the file's row order, which the pinned upstream commits fix.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
from collections import Counter
from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, TypeVar

import numpy as np
from numpy.typing import NDArray

from experts.types import is_blank
from router.jsonl import read_jsonl

__all__ = [
    "CLINC_OOS_LABEL",
    "ROUTELLM_STRONG",
    "ROUTELLM_WEAK",
    "DatasetError",
    "LabelledQuery",
    "StrongWeakSuite",
    "load_banking77",
    "load_clinc150_domains",
    "load_labelled_jsonl",
    "load_mmlu_pro_domains",
    "load_routellm_mmlu",
    "load_snips",
    "normalise_text",
    "split_by_id",
    "without_seen",
]

CLINC_OOS_LABEL = "oos"
_CLINC_SPLITS = ("train", "val", "test")
ROUTELLM_STRONG = "gpt-4-1106-preview"
ROUTELLM_WEAK = "mistralai/Mixtral-8x7B-Instruct-v0.1"


class DatasetError(ValueError):
    """A data file is missing or does not have the layout its provenance describes."""


@dataclass(frozen=True, slots=True)
class LabelledQuery:
    id: str
    text: str
    label: str


@dataclass(frozen=True)
class StrongWeakSuite:
    """A strong/weak model pair's recorded correctness on the same queries (the RouteLLM setting).

    ``queries[i]`` is labelled with its MMLU subject; ``strong_correct[i]`` / ``weak_correct[i]`` say
    whether each model answered it correctly.
    """

    queries: list[LabelledQuery]
    strong_model: str
    weak_model: str
    strong_correct: NDArray[np.bool_]
    weak_correct: NDArray[np.bool_]


# ---------------------------------------------------------------- splits


class _HasId(Protocol):
    @property
    def id(self) -> str: ...


T = TypeVar("T", bound=_HasId)
Item = TypeVar("Item")  # anything, read through a function given with it


def _unit_hash(key: str) -> float:
    """A number in [0, 1) from sha256: stable across processes and Python versions, unlike hash()."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def normalise_text(text: str) -> str:
    """A query's text as duplicates are detected: lower case, whitespace runs collapsed to one space, trimmed."""
    return " ".join(text.lower().split())


def split_by_id(
    items: Iterable[T], fractions: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 0, *,
    text: Callable[[T], str] | None = None,
) -> tuple[list[T], ...]:
    """Split items into ``len(fractions)`` parts (train, val, test by default) by a hash of id and seed.

    Each item's part depends only on its id and the seed, so the split is the same on every run and every
    machine, does not move when items are added or removed, and keeps items that share an id together.
    Part sizes are close to, not exactly, ``fractions``. Input order is kept within each part.

    With ``text`` (an item's query text), items whose normalised text (``normalise_text``) occurs more than once
    among ``items`` are placed by a hash of that text and the seed instead, so copies of one query always land
    in the same part and no test query's text is also a training one; items with a text of their own keep their
    id's part.
    """
    fr = np.asarray(fractions, dtype=float)
    if fr.ndim != 1 or fr.size == 0 or (fr < 0).any() or not np.isclose(fr.sum(), 1.0):
        raise ValueError(f"fractions must be non-negative and sum to 1, got {tuple(fractions)}")
    bounds = np.cumsum(fr)[:-1]
    items = list(items)
    keys = [f"{seed}:{item.id}" for item in items]
    if text is not None:
        norms = [normalise_text(text(item)) for item in items]
        counts = Counter(norms)
        keys = [f"{seed}:text:{n}" if counts[n] > 1 else k for k, n in zip(keys, norms, strict=True)]
    parts: tuple[list[T], ...] = tuple([] for _ in range(fr.size))
    for item, key in zip(items, keys, strict=True):
        parts[int(np.searchsorted(bounds, _unit_hash(key), side="right"))].append(item)
    return parts


def without_seen(test: Sequence[Item], seen: Iterable[str], text: Callable[[Item], str]) -> tuple[list[Item], int]:
    """``test`` less the items whose normalised text is one of the ``seen`` texts (normalised here), and how
    many were left out: for data sets that come with their own splits, whose test part repeats some training
    queries."""
    known = {normalise_text(s) for s in seen}
    kept = [q for q in test if normalise_text(text(q)) not in known]
    return kept, len(test) - len(kept)


# ---------------------------------------------------------------- file helpers


def _suite_dir(data_dir: str | Path, name: str, marker: str) -> Path:
    root = Path(data_dir)
    for cand in (root / name, root):
        if (cand / marker).exists():
            return cand
    raise DatasetError(f"{name}: no {marker} under {root} or {root / name}")


def _read_csv(path: Path, columns: Sequence[str]) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = set(columns) - set(reader.fieldnames or ())
        if missing:
            raise DatasetError(f"{path}: missing columns {sorted(missing)}")
        return list(reader)


# ---------------------------------------------------------------- suites


def load_mmlu_pro_domains(data_dir: str | Path, include_options: bool = False) -> list[LabelledQuery]:
    """MMLU-Pro questions labelled with their category (14), id = ``question_id``.

    Text is the question; with ``include_options`` the lettered options follow on their own lines.
    """
    qdir = _suite_dir(data_dir, "mmlu_pro_outcomes", "questions") / "questions"
    out: list[LabelledQuery] = []
    for path in sorted(qdir.glob("*.jsonl")):
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                try:
                    rec = json.loads(line)
                    text = rec["question"]
                    if include_options:
                        text += "".join(f"\n{chr(65 + i)}. {o}" for i, o in enumerate(rec["options"]))
                    out.append(LabelledQuery(str(rec["question_id"]), text, rec["category"]))
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise DatasetError(f"{path}:{lineno}: {e!r}") from e
    if not out:
        raise DatasetError(f"{qdir}: no questions/*.jsonl")
    return out


def load_clinc150_domains(
    data_dir: str | Path,
    split: Literal["train", "val", "test"] | None = None,
    label: Literal["domain", "intent"] = "domain",
) -> list[LabelledQuery]:
    """CLINC150 queries labelled with one of 10 domains (or the intent), out-of-scope ones with ``"oos"``.

    Intents are mapped to domains with ``domains.json``. ``split`` selects CLINC's own split (each
    including its ``oos_<split>`` queries); ``None`` loads all. Ids are ``<clinc split>-<row>``, e.g.
    ``train-17`` or ``oos_test-3``, so CLINC's split can be recovered from any id.
    """
    d = _suite_dir(data_dir, "clinc150", "data_full.json")
    data = json.loads((d / "data_full.json").read_text(encoding="utf-8"))
    domains = json.loads((d / "domains.json").read_text(encoding="utf-8"))
    to_domain = {intent: dom for dom, intents in domains.items() for intent in intents}
    to_domain[CLINC_OOS_LABEL] = CLINC_OOS_LABEL
    out: list[LabelledQuery] = []
    for s in _CLINC_SPLITS if split is None else (split,):
        for key in (s, f"oos_{s}"):
            for i, (text, intent) in enumerate(data[key]):
                if intent not in to_domain:
                    raise DatasetError(f"{d / 'data_full.json'}: {key}[{i}] intent {intent!r} has no domain")
                out.append(LabelledQuery(f"{key}-{i}", text, to_domain[intent] if label == "domain" else intent))
    return out


def load_banking77(data_dir: str | Path, split: Literal["train", "test"] | None = None) -> list[LabelledQuery]:
    """Banking77 requests labelled with one of 77 intents; ids ``train-<row>`` / ``test-<row>``."""
    d = _suite_dir(data_dir, "banking77", "categories.json")
    known = set(json.loads((d / "categories.json").read_text(encoding="utf-8")))
    out: list[LabelledQuery] = []
    for s in ("train", "test") if split is None else (split,):
        for i, row in enumerate(_read_csv(d / f"{s}.csv", ("text", "category"))):
            if row["category"] not in known:
                raise DatasetError(f"{d / f'{s}.csv'}: data row {i}: unknown category {row['category']!r}")
            out.append(LabelledQuery(f"{s}-{i}", row["text"], row["category"]))
    return out


def load_snips(data_dir: str | Path, split: Literal["train", "test"] | None = None) -> list[LabelledQuery]:
    """SNIPS 2017 custom-intent requests labelled with one of 7 intents; ids ``<split>-<row in split>``."""
    path = _suite_dir(data_dir, "snips", "snips_2017_custom_intents.csv") / "snips_2017_custom_intents.csv"
    counters = {"train": 0, "test": 0}
    out: list[LabelledQuery] = []
    for row in _read_csv(path, ("split", "intent", "text")):
        s = row["split"]
        if s not in counters:
            raise DatasetError(f"{path}: unknown split {s!r}")
        if split is None or s == split:
            out.append(LabelledQuery(f"{s}-{counters[s]}", row["text"], row["intent"]))
        counters[s] += 1
    return out


def load_labelled_jsonl(path: str | Path) -> list[LabelledQuery]:
    """Lines of ``{"query": str, "label": str or int}`` with an optional ``"id"`` (str or int).

    Integer labels (class numbers) are read as their decimal string. Without an id a query's id is its 1-based
    line number, unless another line of the file gives that number as its explicit id: then ``line-<n>`` (with
    ``-2``, ``-3``, ... added should the file name that too), so an implicit id never collides with an explicit
    one and a file whose lines all carry ids, or none do, keeps the ids (and so the seeded splits) it always had.
    Blank lines are skipped. Bad JSON, missing or mistyped fields and duplicate explicit ids raise
    ``DatasetError`` naming the file and line.
    """
    rows: list[tuple[int, str | None, str, str]] = []  # (line, explicit id or None, query, label)
    seen: dict[str, int] = {}  # explicit id -> the line that first gave it
    for where, lineno, rec in read_jsonl(path, expected="an object with 'query' and 'label'", error=DatasetError):
        if "label" not in rec and "outcomes" in rec:
            raise DatasetError(f"{where}: an outcome record ('query', 'outcomes'); --train and --test take labelled "
                               "queries ({'query', 'label'}); outcome records train a gate with `moe train` and "
                               "are scored by the outcome suites")
        if not isinstance(rec.get("query"), str) or is_blank(rec["query"]):
            got = f", got {json.dumps(rec['query'])}" if "query" in rec else \
                f", and is missing (the keys here: {', '.join(map(repr, rec))})"
            raise DatasetError(f"{where}: 'query' must be a non-empty string{got}")
        label = rec.get("label")
        # bool is an int subclass, but true/false as a class number is far likelier a mistake than intended.
        blank = isinstance(label, str) and not label.strip()
        if isinstance(label, bool) or not isinstance(label, str | int) or blank:
            got = f", got {json.dumps(label)}" if "label" in rec else ", and is missing"
            raise DatasetError(f"{where}: 'label' must be a non-empty string or an integer{got}")
        qid: str | None = None
        if "id" in rec:
            raw_id = rec["id"]
            if isinstance(raw_id, bool) or not isinstance(raw_id, str | int):
                raise DatasetError(f"{where}: 'id' must be a string or integer")
            qid = str(raw_id)
            if qid in seen:
                raise DatasetError(f"{where}: duplicate id {qid!r} (first on line {seen[qid]}); ids name queries in "
                                   "the seeded splits, so each must be unique in its file (files moe convert wrote "
                                   "from two data sets share ids: convert each with its own --id-prefix, or drop "
                                   "the 'id' fields and each line is known by its number)")
            seen[qid] = lineno
        rows.append((lineno, qid, rec["query"], str(label)))
    return [LabelledQuery(given if given is not None else _implicit_id(lineno, seen), query, label)
            for lineno, given, query, label in rows]


def _implicit_id(lineno: int, explicit: Container[str]) -> str:
    """The id of line ``lineno``, which gives none: its number, else the first of ``line-<n>``, ``line-<n>-2``,
    ... that no line gives as its ``explicit`` id. Distinct lines get distinct ids (the number has no dash,
    ``line-<n>`` one, ``line-<n>-<k>`` two)."""
    candidates = itertools.chain((str(lineno), f"line-{lineno}"), (f"line-{lineno}-{k}" for k in itertools.count(2)))
    return next(c for c in candidates if c not in explicit)


def _parse_bool(value: str, where: str) -> bool:
    if value in ("True", "False"):
        return value == "True"
    raise DatasetError(f"{where}: expected True/False, got {value!r}")


def load_routellm_mmlu(data_dir: str | Path, drop_contaminated: bool = True) -> StrongWeakSuite:
    """RouteLLM's MMLU records: GPT-4-1106 (strong) and Mixtral-8x7B-Instruct (weak) correctness per
    question, each query labelled with its MMLU subject (from the file name ``mmlu_<subject>.csv``).

    Ids are ``<subject>-<row>``. ``drop_contaminated`` removes the prompts listed in
    ``mmlu_contaminated_prompts.jsonl`` (``eval_prompt``), as RouteLLM's ``MMLU`` benchmark does.
    """
    d = _suite_dir(data_dir, "routellm_evals", "mmlu_responses")
    contaminated: set[str] = set()
    if drop_contaminated:
        with (d / "mmlu_contaminated_prompts.jsonl").open(encoding="utf-8") as f:
            contaminated = {json.loads(line)["eval_prompt"] for line in f if line.strip()}
    queries: list[LabelledQuery] = []
    strong: list[bool] = []
    weak: list[bool] = []
    for path in sorted((d / "mmlu_responses").glob("mmlu_*.csv")):
        subject = path.stem.removeprefix("mmlu_")
        for i, row in enumerate(_read_csv(path, ("prompt", ROUTELLM_STRONG, ROUTELLM_WEAK))):
            if row["prompt"] in contaminated:
                continue
            where = f"{path}: data row {i}"
            queries.append(LabelledQuery(f"{subject}-{i}", row["prompt"], subject))
            strong.append(_parse_bool(row[ROUTELLM_STRONG], where))
            weak.append(_parse_bool(row[ROUTELLM_WEAK], where))
    if not queries:
        raise DatasetError(f"{d / 'mmlu_responses'}: no mmlu_*.csv")
    return StrongWeakSuite(queries, ROUTELLM_STRONG, ROUTELLM_WEAK, np.array(strong), np.array(weak))
