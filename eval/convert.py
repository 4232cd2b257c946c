"""``moe convert``: the shared data sets as the JSONL training files ``moe train`` and ``moe eval`` read.

Two kinds of file come out (see ``router.train``):

- labelled queries, ``{"id", "query", "label"}``: ``mmlu-pro-domain`` (14 categories; the query is the prompt
  a user sends, question and lettered options), ``clinc150-domain`` (10 domains, in-scope queries only),
  ``snips-intent`` (7 intents), ``banking77-intent`` (77 intents);
- outcome records, ``{"query", "outcomes", "cost", "answers", "task"}``: ``mmlu-pro-outcome`` (31 LLMs: each
  one's recorded correctness, its recorded letter as its answer, and its output length in characters as its
  cost, since MMLU-Pro records no prices; the question's category as its task) and ``routerbench`` (11 LLMs on
  ARC-Challenge, MBPP and Winogrande: each one's grade, full response and USD cost; RouterBench's task name). An
  LLM without a record for a question is left out of that line.

Splits are the evaluation suites' own, so a file converted with ``--split train`` never holds a question of
the suite's test split: CLINC150's, SNIPS's, Banking77's and RouterBench's published splits, and for MMLU-Pro
the seeded split by question id (``eval.routing.FRACTIONS``) that ``mmlu-pro-domain``, ``mmlu-pro-outcome`` and
``mmlu-pro-combine`` use. Outcome records name the LLMs as recorded; ``--config`` renames them to the config's
replay experts (the expert whose recorded model is that LLM) and keeps only those.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from eval.datasets import (
    CLINC_OOS_LABEL,
    LabelledQuery,
    load_banking77,
    load_clinc150_domains,
    load_snips,
    split_by_id,
    without_seen,
)
from eval.routing import FRACTIONS
from eval.suite import check_limit, subsample

if TYPE_CHECKING:
    from router.config import RouterConfig

__all__ = ["CONVERTERS", "Converter", "convert", "main"]

Row = dict[str, Any]


@dataclass(frozen=True)
class Converter:
    kind: Literal["label", "outcome"]
    splits: tuple[str, ...]  # the splits this data set has
    rows: Callable[[Path, str, int], Iterator[Row]]  # (data dir, split, seed) -> lines


def _mmlu_pro_part(items: list[Any], split: str, seed: int) -> list[Any]:
    """The suites' MMLU-Pro split: by question id, copies of one prompt (``item.text``) in one part."""
    if split == "all":
        return items
    train, val, test = split_by_id(items, FRACTIONS, seed=seed, text=lambda q: q.text)
    return {"train": train, "val": val, "test": test}[split]


def _mmlu_pro_store(data_dir: Path) -> Any:
    from experts.recordings import load_mmlu_pro

    folder = data_dir / "mmlu_pro_outcomes"
    return load_mmlu_pro(folder if folder.is_dir() else data_dir)


def _labelled(items: list[LabelledQuery]) -> Iterator[Row]:
    for q in items:
        yield {"id": q.id, "query": q.text, "label": q.label}


def _mmlu_pro_domain(data_dir: Path, split: str, seed: int) -> Iterator[Row]:
    from experts.recordings import mmlu_pro_prompt

    store = _mmlu_pro_store(data_dir)
    items = [LabelledQuery(str(q.question_id), mmlu_pro_prompt(q), q.category) for q in store.questions]
    return _labelled(_mmlu_pro_part(items, split, seed))


def _unseen_test(items: list[LabelledQuery], seen: list[LabelledQuery], name: str) -> list[LabelledQuery]:
    """A data set's own test split less the queries that repeat a training (or validation) one, as the suites
    score it (``eval.labels.unseen_test``); says how many were left out."""
    kept, dropped = without_seen(items, (q.text for q in seen), lambda q: q.text)
    if dropped:
        print(f"note: {name}'s test split repeats {dropped} training/validation queries (same text after "
              "lower-casing and collapsing whitespace); they are left out, as moe eval leaves them out",
              file=sys.stderr)
    return kept


def _clinc150(data_dir: Path, split: str, seed: int) -> Iterator[Row]:
    chosen = load_clinc150_domains(data_dir, None if split == "all" else split)  # type: ignore[arg-type]
    if split == "test":
        seen = [*load_clinc150_domains(data_dir, "train"), *load_clinc150_domains(data_dir, "val")]
        chosen = _unseen_test(chosen, seen, "CLINC150")
    return _labelled([q for q in chosen if q.label != CLINC_OOS_LABEL])


def _own_split(loader: Callable[..., list[LabelledQuery]], name: str) -> Callable[[Path, str, int], Iterator[Row]]:
    def rows(data_dir: Path, split: str, seed: int) -> Iterator[Row]:
        items = loader(data_dir, None if split == "all" else split)
        if split == "test":
            items = _unseen_test(items, loader(data_dir, "train"), name)
        return _labelled(items)
    return rows


@dataclass(frozen=True)
class _Question:
    id: str
    index: int
    text: str


def _mmlu_pro_outcome(data_dir: Path, split: str, seed: int) -> Iterator[Row]:
    from experts.recordings import mmlu_pro_prompt

    store = _mmlu_pro_store(data_dir)
    columns = {m: store.outcomes(m) for m in store.models}
    part = _mmlu_pro_part([_Question(str(q.question_id), i, mmlu_pro_prompt(q)) for i, q in enumerate(store.questions)],
                          split, seed)
    for item in part:
        recorded = {m: c[item.index] for m, c in columns.items() if c[item.index].correct is not None}
        if not recorded:
            continue
        yield {"query": mmlu_pro_prompt(store.questions[item.index]),
               "outcomes": {m: float(o.correct) for m, o in recorded.items()},
               "cost": {m: float(o.response_chars) for m, o in recorded.items() if o.response_chars is not None},
               "answers": {m: o.pred for m, o in recorded.items() if o.pred is not None},
               "task": store.questions[item.index].category}


def _routerbench(data_dir: Path, split: str, seed: int) -> Iterator[Row]:
    from experts.recordings import load_routerbench

    folder = data_dir / "routerdc" / "routerbench_zs"
    store = load_routerbench(folder if folder.is_dir() else data_dir)
    rows = store.select(split=None if split == "all" else split)
    if split == "test":  # as the routerbench suites score it (eval.routing.routerbench_split)
        rows, dropped = without_seen(rows, (r.prompt for r in store.select(split="train")), lambda r: r.prompt)
        if dropped:
            print(f"note: RouterBench's test split repeats {dropped} training prompts (same text after "
                  "lower-casing and collapsing whitespace); they are left out, as moe eval leaves them out",
                  file=sys.stderr)
    for row in rows:
        recorded = {m: a for m, a in row.answers.items() if a.correct is not None}
        if not recorded:
            continue
        yield {"query": row.prompt, "outcomes": {m: a.correct for m, a in recorded.items()},
               # A cost can be recorded where the grade is not; it still tells what that LLM charges.
               "cost": {m: a.cost_usd for m, a in row.answers.items() if a.cost_usd is not None},
               "answers": {m: a.response for m, a in recorded.items()}, "task": row.eval_name}


CONVERTERS: dict[str, Converter] = {
    "mmlu-pro-domain": Converter("label", ("train", "val", "test", "all"), _mmlu_pro_domain),
    "clinc150-domain": Converter("label", ("train", "val", "test", "all"), _clinc150),
    "snips-intent": Converter("label", ("train", "test", "all"), _own_split(load_snips, "SNIPS")),
    "banking77-intent": Converter("label", ("train", "test", "all"), _own_split(load_banking77, "Banking77")),
    "mmlu-pro-outcome": Converter("outcome", ("train", "val", "test", "all"), _mmlu_pro_outcome),
    "routerbench": Converter("outcome", ("train", "test", "all"), _routerbench),
}


def _renamed(row: Row, names: Mapping[str, tuple[str, ...]]) -> Row | None:
    """An outcome line with the config's expert names, keeping only the LLMs some expert replays; an LLM that
    several experts replay is recorded for each of them."""
    out: Row = {"query": row["query"], **({"task": row["task"]} if "task" in row else {})}
    for key in ("outcomes", "cost", "answers"):
        if key in row:
            out[key] = {e: v for m, v in row[key].items() for e in names.get(m, ())}
    return out if out["outcomes"] else None


def convert(name: str, data_dir: str | Path, split: str, out: str | Path, *, seed: int = 0,
            names: Mapping[str, tuple[str, ...]] | None = None, answers: bool = True, limit: int | None = None,
            matched: set[str] | None = None, id_prefix: str = "") -> int:
    """Write data set ``name``'s ``split`` to ``out`` as JSONL; returns the number of lines written.

    ``names`` (outcome data sets only) maps recorded LLMs to the names of the experts that replay them (one LLM
    may have several), and the experts found in the data go
    into ``matched`` when given; ``answers=False`` leaves the answers out of outcome records; ``limit`` keeps
    at most that many lines, chosen by a seeded hash of each query as ``moe eval --limit`` chooses (the data
    sets' rows come grouped by label, so the first lines would be one label) and written in their order
    (None or >= 1, else ``ValueError``). Raises ``ValueError`` naming the known data
    sets or splits for an unknown one, and when ``names`` match no LLM of the data set (no file is left then).
    ``id_prefix`` goes before every id, so files converted from several data sets can be joined into one (their
    own ids repeat: ``train-17``); it changes which validation split the ids seed, so it is empty by default."""
    if name not in CONVERTERS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(CONVERTERS)}")
    converter = CONVERTERS[name]
    if split not in converter.splits:
        raise ValueError(f"{name} has no {split!r} split; it has: {', '.join(converter.splits)}")
    if names is not None and converter.kind != "outcome":
        raise ValueError(f"{name} holds labelled queries; expert names apply to outcome records only")
    check_limit(limit)
    path = Path(out)
    if path.is_dir():
        example = path / f"{name}-{split}.jsonl"
        raise ValueError(f"--out {path} is a folder; name the JSONL file to write, e.g. {example}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {path}: cannot create its folder {path.parent} ({exc.strerror or exc})") from None
    count = 0
    rows: Iterator[dict[str, Any]] = (kept for row in converter.rows(Path(data_dir), split, seed)
                                      if (kept := _renamed(row, names) if names is not None else row) is not None)
    if limit is not None:
        rows = iter(subsample(list(rows), limit, seed, key=lambda row: str(row["query"])))
    # Written beside the file and renamed into place once complete: a run that fails (no data set at --data, say)
    # or is interrupted leaves the file --out names as it was, never emptied or cut short.
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with _writing(path):
            fh = partial.open("w", encoding="utf-8")
        try:
            for kept in rows:
                if matched is not None:
                    matched.update(kept.get("outcomes", {}))
                if not answers:
                    kept.pop("answers", None)
                if id_prefix and "id" in kept:
                    kept["id"] = f"{id_prefix}{kept['id']}"
                with _writing(path):  # only the write: an OSError reading the data set is the data set's
                    fh.write(json.dumps(kept, ensure_ascii=False) + "\n")
                count += 1
            with _writing(path):
                fh.close()  # what is still buffered is written here: a full disk may say so now
        except BaseException:
            with contextlib.suppress(OSError):  # the same full disk again, flushing what is left: already said
                fh.close()
            raise
        if names is not None and count == 0:
            raise ValueError(f"none of the experts' recorded models ({', '.join(sorted(names))}) is among {name}'s "
                             f"LLMs, so no record was written; point --config at experts that replay {name}")
        with _writing(path):
            partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return count


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """An ``OSError`` inside (a full disk, no permission) as a ``ValueError`` naming ``--out``: a bare "[Errno 28]
    No space left on device" would not say which file could not be written."""
    try:
        yield
    except OSError as exc:
        raise ValueError(f"--out {path}: cannot write there ({exc.strerror or exc})") from None


def replay_names(config: RouterConfig) -> dict[str, tuple[str, ...]]:
    """Recorded LLM -> the names of the config's replay experts that replay it, in config order."""
    names: dict[str, tuple[str, ...]] = {}
    for e in config.experts:
        if e.type == "replay":
            names[e.recorded_model] = (*names.get(e.recorded_model, ()), e.name)
    return names


def main(args: argparse.Namespace) -> int:
    """Entry point for ``moe convert`` (arguments are defined in ``router.cli``)."""
    from eval.harness import data_dir_of
    from router.config import load_config

    names = replay_names(load_config(args.config, check_env=False)) if args.config else None
    if names is not None and not names:
        print(f"error: {args.config} has no replay experts to name the recorded LLMs after", file=sys.stderr)
        return 2
    matched: set[str] = set()
    count = convert(args.dataset, data_dir_of(args), args.split, args.out, seed=args.seed, names=names,
                    answers=not args.no_answers, limit=args.limit, matched=matched,
                    id_prefix=args.id_prefix)
    missing = sorted(f"{e} (model {m!r})" for m, experts in (names or {}).items() for e in experts if e not in matched)
    if missing:
        print(f"warning: {args.dataset} records no answers for these replay experts of {args.config}, so the "
              f"records leave them out: {', '.join(missing)}", file=sys.stderr)
    kind = CONVERTERS[args.dataset].kind
    print(f"wrote {count} {'labelled queries' if kind == 'label' else 'outcome records'} ({args.dataset}, "
          f"{args.split} split) to {args.out}")
    return 0
