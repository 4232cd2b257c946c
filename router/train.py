"""Training the gate from a config: gather the data, build the encoder, train, save the artifact.

``gate.train_data`` files are JSONL of one of two kinds, detected per file from its first record
(``router.outcome.train_file_kind``):

- labelled, ``{"query": ..., "label": ...}``: joined with each expert's config ``examples`` (labelled with
  the expert's name) to train a label gate (``router.gate.train_gate``). With no files, the examples alone
  train it; a few per expert leave no held-out split, so the gate is calibrated by cross-validation over them
  (``metrics.calibration`` in the artifact; ``router.gate``'s docstring, "Calibration");
- outcome records, ``{"query": ..., "outcomes": {...}, "cost": {...}}``: trained into an outcome gate
  (``router.outcome_gate.train_outcome_gate``) at ``gate.cost_weight`` with ``gate.success_model``. The
  records must score (``outcomes``) at least two experts, among which the gate learns to choose; config experts
  without any score are left to cold start from their examples (``router.coldstart``), and a cost recorded for
  one of them is left out, with a warning.

With ``combiner.vote_weights: learned``, outcome records that carry ``answers`` also teach the vote's learned
weights (``router.vote_weights``), written beside the gate as ``vote_weights.json``.

All files must be of one kind. Every label, and every expert named in an outcome record, must be an expert
of the config; one that is not is refused at the first line naming it. A config expert with no training data
and no examples cannot be routed, and is refused here rather than at serving time.

Feedback (``router.feedback``) is folded in after the files, unless ``feedback.enabled`` is false or the
caller passes ``feedback=False`` (``moe train --no-feedback``). A verdict is a query, an expert and a score in
[0, 1] (good = 1.0, bad = 0.0); ``fold_feedback`` turns it into the kind of data being trained:

- outcome gate: the verdicts on one query become one outcome record, each rated expert's outcome the mean
  of its scores on that query (so good = 1.0, bad = 0.0, good and bad once = 0.5). Except for an expert the
  files give no record but the config gives ``examples`` (a cold start): its verdicts wait until they cover
  ``COLD_START_RECORDS`` queries. A handful of records would make it a trained expert whose success leans on the
  pooled rate (``router.outcome.PRIOR_RECORDS``) against experts measured on thousands, and a few good verdicts
  would then take from it the very queries they rated; until then it is routed from its examples;
- label gate: the verdicts on one query and expert are averaged as above. At 0.5 or more the pair becomes the
  example ``(query, expert)``, once, and one the classifier always trains on (never held out for calibration).
  Below it, "not this expert" names no label to learn, but it does say the pairing is wrong: training-file
  examples of exactly that query with that label are dropped (the config's own ``examples`` are kept as written).

Verdicts on experts no longer in the config are dropped.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from experts.types import is_blank
from router.cascade import CascadeGate, forget_cascade
from router.classifiers import build_classifier
from router.config import RouterConfig
from router.config.checks import name_list
from router.encoders import build_encoder
from router.feedback import FeedbackRecord, load_feedback
from router.files import staged
from router.gate import Gate, train_gate
from router.jsonl import read_jsonl
from router.logs import warnings_once
from router.outcome import PRIOR_RECORDS, OutcomeRecord, load_outcome_lines, train_file_kind

if TYPE_CHECKING:
    from collections.abc import Iterable

    from router.vote_weights import VoteWeights

log = logging.getLogger("router.train")

__all__ = ["TrainingData", "collect_training_data", "fold_feedback", "load_labelled_jsonl", "train_from_config"]

# Queries a cold-start expert's verdicts must cover before an outcome gate trains on them (module docstring): as
# many as the pooled rate's weight, so its own records count at least as much as the pooled rate.
COLD_START_RECORDS = int(PRIOR_RECORDS)


@dataclass
class TrainingData:
    """What a config trains on: labelled ``texts``/``labels``, or outcome ``records``, as ``kind`` says."""

    kind: Literal["label", "outcome"]
    texts: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    records: list[OutcomeRecord] = field(default_factory=list)
    # How many stored feedback verdicts were folded in (``fold_feedback``), and when the newest of them was given
    # (Unix seconds; None: none), which the artifact records so it says which verdicts a served gate has seen.
    feedback: int = 0
    feedback_through: float | None = None
    # Label data: how many of the leading examples are the config's own (kept whatever the feedback says), and
    # how many training examples bad feedback dropped.
    config_examples: int = 0
    dropped: int = 0
    # Label data: the texts good feedback made examples of, which the gate always trains on (never held out).
    pinned: frozenset[str] = frozenset()
    # Outcome data: cold-start experts whose verdicts wait (``COLD_START_RECORDS``), with how many queries rated.
    waiting: dict[str, int] = field(default_factory=dict)
    # The queries only clients' feedback gave (no config example or training file holds them): the gate trains
    # on them, but never shows their text as a decision's nearest example, which every client sees.
    private: frozenset[str] = frozenset()
    # Label data: where each text was given, and with which label (("data.jsonl:12", "music"),
    # ("experts[0] (maths).examples[3]", "maths"), ("feedback", "music")), for a warning that names where a text
    # given two labels is.
    places: dict[str, list[tuple[str, str]]] = field(default_factory=dict)


def load_labelled_jsonl(path: str | Path) -> list[tuple[str, str]]:
    """``(query, label)`` pairs from a JSONL file; blank lines are skipped.

    A bad line raises ``ValueError`` naming the file, the line number and what is wrong with it.
    """
    return [(query, label) for _, query, label in _labelled_lines(path)]


def _labelled_lines(path: str | Path) -> list[tuple[int, str, str]]:
    """``(line number, query, label)`` for each non-blank line, checked as ``load_labelled_jsonl`` checks them."""
    return [(number, *_labelled(row, where))
            for where, number, row in read_jsonl(path, expected="an object with 'query' and 'label'")]


def _labelled(row: dict[str, Any], where: str) -> tuple[str, str]:
    label = row.get("label")
    if isinstance(label, int) and not isinstance(label, bool):  # a class number names the expert "3", as in moe eval
        row = {**row, "label": str(label)}
    if "label" not in row and "outcomes" in row:
        raise ValueError(f"{where}: an outcome record ('query', 'outcomes') in a file whose first line is a labelled "
                         "query ({'query', 'label'}); a file holds one kind: put the outcome records in a file of "
                         "their own")
    for key in ("query", "label"):
        value = row.get(key)
        if not isinstance(value, str) or (is_blank(value) if key == "query" else not value.strip()):
            problem = "missing" if key not in row else f"must be a non-empty string, got {value!r}"
            raise ValueError(f"{where}: {key!r} {problem}")
    return row["query"], row["label"]


def collect_training_data(config: RouterConfig, *, feedback: bool = True,
                          drop_unknown: bool = False) -> TrainingData:
    """The config's training data. Labelled: the experts' examples, then every file, in config order.
    Outcome: every file's records, in order (the examples then serve cold start only). Then the stored
    feedback, folded in, unless ``feedback`` is false or the config turns feedback off.

    A file naming an expert the config does not have is refused (a typo would train a gate without those
    lines), unless ``drop_unknown``: after an expert was removed from the config, its lines (labelled data) or its
    outcomes and costs (records) are left out, with a warning saying how many."""
    data = _collect_files(config, drop_unknown)
    if feedback:
        data = fold_feedback(data, load_feedback(config), config.expert_names,
                             cold_start=[e.name for e in config.experts if e.examples])
    return data


def fold_feedback(data: TrainingData, verdicts: list[FeedbackRecord], experts: list[str], *,
                  cold_start: Collection[str] = ()) -> TrainingData:
    """``data`` with the feedback ``verdicts`` added by the rule in the module docstring; ``cold_start``: the
    experts the config gives examples (an outcome gate routes those without records from them)."""
    kept = [v for v in verdicts if v.expert in experts]
    through = max([v.created for v in kept] + ([data.feedback_through] if data.feedback_through else []),
                  default=None)
    scores: dict[str, dict[str, list[float]]] = {}
    for v in kept:
        scores.setdefault(v.query, {}).setdefault(v.expert, []).append(v.score)
    mean = {(q, e): sum(s) / len(s) for q, by in scores.items() for e, s in by.items()}
    operators = set(data.texts) if data.kind == "label" else {r.query for r in data.records}
    private = data.private | (scores.keys() - operators)
    if data.kind == "outcome":
        # A verdict on a query the files name a task for carries that task, so it counts toward the task's rates.
        task_of = {r.query: r.task for r in data.records if r.task is not None}
        recorded = {e for r in data.records for e in r.outcomes}
        rated = Counter(e for by in scores.values() for e in by)
        waiting = {e: n for e, n in rated.items()
                   if e in cold_start and e not in recorded and n < COLD_START_RECORDS}
        # Priced as the records price that expert on that query, else at its mean recorded cost: a verdict
        # without a cost made the gate's routed cost unknown (its metrics' routed_cost null).
        costs: dict[str, list[float]] = {}
        own: dict[tuple[str, str], float] = {}
        for r in data.records:
            for e, c in r.cost.items():
                costs.setdefault(e, []).append(c)
                own[r.query, e] = c
        typical = {e: sum(cs) / len(cs) for e, cs in costs.items()}
        folded = []
        for q, by in scores.items():
            outcomes = {e: mean[q, e] for e in by if e not in waiting}
            cost = {e: own.get((q, e), typical[e]) for e in outcomes if e in typical}
            folded.append(OutcomeRecord(q, outcomes, cost, task=task_of.get(q)))
        return TrainingData("outcome", records=[*data.records, *(r for r in folded if r.outcomes)],
                            feedback=data.feedback + len(kept), feedback_through=through,
                            waiting={**data.waiting, **waiting}, private=private)
    wrong = {pair for pair, score in mean.items() if score < 0.5}
    pairs = list(zip(data.texts, data.labels, strict=True))
    fixed = data.config_examples
    pairs = pairs[:fixed] + [pair for pair in pairs[fixed:] if pair not in wrong]
    dropped = len(data.texts) - len(pairs)
    good = [pair for pair, score in mean.items() if score >= 0.5]
    pairs += good
    return TrainingData("label", texts=[q for q, _ in pairs], labels=[e for _, e in pairs],
                        feedback=data.feedback + len(kept), feedback_through=through, config_examples=fixed,
                        dropped=data.dropped + dropped, pinned=data.pinned | {q for q, _ in good},
                        private=private, places=_places_after(data.places, wrong, good))


def _places_after(places: dict[str, list[tuple[str, str]]], wrong: set[tuple[str, str]],
                  good: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """``places`` with feedback folded in: a pair bad feedback dropped from the files loses its places (the config's
    examples stay, as ``fold_feedback`` keeps them), a good one is a place of its own."""
    kept = {text: [(where, label) for where, label in found
                   if (text, label) not in wrong or where.startswith("experts[")] for text, found in places.items()}
    for text, label in good:
        kept.setdefault(text, []).append(("feedback", label))
    return kept


def _collect_files(config: RouterConfig, drop_unknown: bool = False) -> TrainingData:
    found = {p: train_file_kind(p) for p in (config.resolve(entry) for entry in config.gate.train_data)}
    # A file with no records (a day's empty shard) has no kind and adds nothing.
    kinds = {p: kind for p, kind in found.items() if kind is not None}
    paths = list(kinds)
    if len(set(kinds.values())) > 1:
        listing = "; ".join(f"{p}: {k}" for p, k in kinds.items())
        raise ValueError(f"gate.train_data mixes labelled and outcome files ({listing}); use one kind")
    if paths and kinds[paths[0]] == "outcome":
        return TrainingData("outcome", records=_collect_outcomes(config, paths, drop_unknown))
    data = TrainingData("label")
    for i, expert in enumerate(config.experts):
        data.texts += expert.examples
        data.labels += [expert.name] * len(expert.examples)
        for j, example in enumerate(expert.examples):
            data.places.setdefault(example, []).append((f"experts[{i}] ({expert.name}).examples[{j}]", expert.name))
    data.config_examples = len(data.texts)
    for path in paths:
        rows = _labelled_lines(path)
        unknown = _unknown(config, path, "label", ((number, [label]) for number, _, label in rows), drop_unknown)
        if unknown:
            rows = [row for row in rows if row[2] not in unknown]
        data.texts += [q for _, q, _ in rows]
        data.labels += [label for _, _, label in rows]
        for number, query, label in rows:
            data.places.setdefault(query, []).append((f"{path}:{number}", label))
    return data


def _collect_outcomes(config: RouterConfig, paths: list[Path], drop_unknown: bool = False) -> list[OutcomeRecord]:
    records: list[OutcomeRecord] = []
    for path in paths:
        found = load_outcome_lines(path)
        unknown = _unknown(config, path, "expert", ((number, [*r.outcomes, *r.cost]) for number, r in found),
                           drop_unknown)
        kept = [(number, _without(r, unknown)) for number, r in found]
        emptied = [number for number, r in kept if not r.outcomes]
        if emptied:
            log.warning("%s: left out %d record(s) that score only experts the config does not have (first on "
                        "line %d); %d record(s) of the file are kept", path, len(emptied), emptied[0],
                        len(kept) - len(emptied))
        records += [r for _, r in kept if r.outcomes]
    return records


def _unknown(config: RouterConfig, path: Path, noun: str, lines: Iterable[tuple[int, list[str]]],
             drop: bool) -> set[str]:
    """The names the lines of ``path`` give (as a label, or as an expert of a record) that are no expert of the
    config. Unless ``drop``, ``ValueError`` at the first line naming one, with the first line of each other such
    name; with ``drop``, a warning saying how many lines name them, which the caller leaves out."""
    names = set(config.expert_names)
    first: dict[str, int] = {}
    count: Counter[str] = Counter()
    for number, named in lines:
        for name in dict.fromkeys(named):  # an expert in a record's outcomes and its costs: one line naming it
            if name not in names:
                first.setdefault(name, number)
                count[name] += 1
    if not first:
        return set()
    (name, line), *others = sorted(first.items(), key=lambda item: item[1])
    if drop:
        log.warning("%s: left out what names expert(s) the config does not have: %s", path, ", ".join(
            f"{n!r} ({count[n]} line(s), first {first[n]})" for n in sorted(first, key=first.__getitem__)))
        return set(first)
    also = "" if not others else "; nor " + ("is " if len(others) == 1 else "are ") + ", ".join(
        f"{other!r} (first on line {number})" for other, number in others)
    from router.gate import respelled

    renamed = [f"{n!r} as {spelt!r}" for n, spelt in respelled(first, config.expert_names).items()]
    hint = f" (the config spells {', '.join(renamed)}: fix one spelling or the other)" if renamed else ""
    raise ValueError(f"{path}:{line}: {noun} {name!r} is not an expert of the config{also}{hint}; "
                     f"experts: {name_list(config.expert_names)}. If it was removed from the config, "
                     "moe train --drop-unknown-experts leaves its lines out")


def _routed_only(config: RouterConfig, data: TrainingData) -> TrainingData:
    """``data`` without what names an expert the gate does not route to (``routed: false``): its labelled
    examples, or its outcomes and costs in each record (a record left with no outcome is left out). The learned
    vote weights still read every expert's answers. A warning says how much was left out."""
    unrouted = {e.name for e in config.experts if not e.routed}
    if not unrouted:
        return data
    if data.kind == "label":
        kept = [i for i, label in enumerate(data.labels) if label not in unrouted]
        left = len(data.labels) - len(kept)
        out = replace(data, texts=[data.texts[i] for i in kept], labels=[data.labels[i] for i in kept],
                      config_examples=sum(1 for i in kept if i < data.config_examples))
    else:
        left = sum(1 for r in data.records if set(r.outcomes) & unrouted)
        out = replace(data, records=[r for r in (_without(r, unrouted) for r in data.records) if r.outcomes])
    if left:
        them = "it" if len(unrouted) == 1 else "them"
        what = (f"the {left} labelled example(s) naming {them}" if data.kind == "label"
                else f"{'its' if len(unrouted) == 1 else 'their'} outcomes in the {left} record(s) scoring {them}")
        log.warning("the gate does not route to %s (routed: false), so it trains without %s",
                    ", ".join(map(repr, sorted(unrouted))), what)
    return out


def _without(record: OutcomeRecord, experts: Collection[str]) -> OutcomeRecord:
    """``record`` without the outcomes, costs and answers of ``experts`` (itself when it names none of them)."""
    if not experts or not (set(record.outcomes) | set(record.cost) | set(record.answers)) & set(experts):
        return record
    return replace(record, outcomes={e: v for e, v in record.outcomes.items() if e not in experts},
                   cost={e: v for e, v in record.cost.items() if e not in experts},
                   answers={e: v for e, v in record.answers.items() if e not in experts})


def _check_routable(config: RouterConfig, trained: set[str]) -> None:
    unroutable = [e.name for e in config.routed_experts if e.name not in trained and not e.examples]
    if unroutable:
        raise ValueError("no training data and no examples for expert(s) " + ", ".join(map(repr, unroutable))
                         + "; the gate could not route to them. Add examples in the config or records for them.")


def _check_scored(config: RouterConfig, records: list[OutcomeRecord]) -> None:
    """Refuse outcome records that score fewer than two of the config's experts, naming those they leave out.

    An outcome gate learns to choose among the experts the records score (``train_outcome_gate``; a label gate
    likewise needs examples of two experts), and the config's other experts are routed beside them from their
    examples (``router.coldstart``). With one scored expert there is nothing to learn a choice from."""
    routed = [e.name for e in config.routed_experts]
    scored = [n for n in routed if any(n in r.outcomes for r in records)]
    if len(scored) >= 2:
        return
    unscored = [n for n in routed if n not in scored]
    only = f"only {scored[0]!r}" if scored else "no expert"
    if not unscored:
        raise ValueError(f"an outcome gate chooses among at least two experts, and the config routes to only "
                         f"{routed[0]!r}; add an expert, with records scoring its answers")
    costed = [n for n in unscored if any(n in r.cost for r in records)]
    costs = "" if not costed else (f" (the records give a cost for {', '.join(map(repr, costed))}, but a cost alone "
                                   "trains nothing: the gate learns from 'outcomes')")
    raise ValueError(f"the outcome records in gate.train_data score {only} ('outcomes'); an outcome "
                     "gate learns to choose among at least two scored experts, the config's others being routed "
                     f"from their examples. Add outcomes for {' or '.join(map(repr, unscored))}{costs}")


def train_from_config(config: RouterConfig, *, progress: bool = True, feedback: bool = True,
                      drop_unknown: bool = False) -> Gate | CascadeGate:
    """Train the gate the config describes (label or outcome kind, and with ``gate.cascade`` its fast first
    stage) and save it to ``gate.artifact``.

    ``feedback=False`` leaves the stored feedback out (it is folded in by default; see the module docstring).
    """
    artifact = config.resolve(config.gate.artifact)
    if artifact.exists() and not artifact.is_dir():  # found now, not when saving after all the training
        raise NotADirectoryError(f"gate.artifact {artifact}: exists and is not a folder; the gate is saved as a "
                                 "folder of files")
    data = collect_training_data(config, feedback=feedback, drop_unknown=drop_unknown)
    if progress and data.feedback:
        dropped = f"; bad verdicts dropped {data.dropped} training example(s)" if data.dropped else ""
        print(f"feedback: {data.feedback} stored verdict(s) folded in{dropped}", flush=True)
    if progress and data.waiting:
        print("feedback: of these, the verdicts on cold-start expert(s) " + ", ".join(
            f"{e} ({n} quer{'y' if n == 1 else 'ies'} rated)" for e, n in sorted(data.waiting.items()))
            + f" wait until they cover {COLD_START_RECORDS} queries; until then each is routed from its config "
              "examples", flush=True)
    vote_weights = _learned_vote_weights(config, data, progress=progress)  # before the gate: fails fast
    data = _routed_only(config, data)
    routed = [e.name for e in config.routed_experts]
    if config.gate.cascade is not None and data.kind == "outcome":
        raise ValueError("gate.cascade applies to label gates, but gate.train_data holds outcome records; "
                         "remove gate.cascade, or train from labelled queries")
    # The two stages of a cascade train on the same data: what is wrong with it (texts given two labels, experts
    # with no examples) is said once.
    with warnings_once(("router.gate",)):
        served = _train_gates(config, data, routed, progress=progress)
    artifact = config.resolve(config.gate.artifact)
    # One staging folder for the whole artifact: the gate, its fast stage and the vote weights are renamed into
    # place together once all are written, so a running service's reload watch never reads half of a new one.
    try:
        with staged(artifact) as stage:
            served.save(stage)
            if vote_weights is not None:
                vote_weights.save(stage)
    except OSError as exc:  # a read-only or full disk: named by the key to change, not by the staging folder
        advice = "; make the folder writable, or set gate.artifact to one that is" \
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else ""
        raise OSError(f"gate.artifact {artifact}: cannot write the gate there ({exc.strerror or exc}){advice}") \
            from exc
    if config.gate.cascade is None:
        forget_cascade(artifact)  # a fast stage trained with earlier data must not be paired with this gate
    if vote_weights is None:  # nor vote weights fitted on earlier records, which a later config could turn on
        from router.vote_weights import FILE_NAME as VOTE_WEIGHTS_FILE

        (artifact / VOTE_WEIGHTS_FILE).unlink(missing_ok=True)
    return served


def _train_gates(config: RouterConfig, data: TrainingData, routed: list[str], *,
                 progress: bool) -> Gate | CascadeGate:
    """The gate the config describes, trained on ``data`` (its fast first stage too, with ``gate.cascade``)."""
    encoder = build_encoder(config.gate.encoder)
    gate: Gate
    if data.kind == "outcome":
        from router.outcome_gate import config_prices, train_outcome_gate

        trained = {e for r in data.records for e in r.outcomes}
        _check_routable(config, trained)
        _check_scored(config, data.records)
        gate = train_outcome_gate(data.records, encoder, experts=[n for n in routed if n in trained],
                                  cost_weight=config.gate.cost_weight, model=config.gate.success_model,
                                  progress=progress, prices=config_prices(config))
    else:
        _check_routable(config, set(data.labels))
        # A two-stage gate fits its thresholds on the queries both stages held out, however few (refit).
        gate = train_gate(data.texts, data.labels, encoder, experts=routed, progress=progress,
                          classifier=build_classifier(config.gate.classifier, balance=config.gate.balance),
                          pinned=data.pinned, refit=config.gate.cascade is None, places=data.places)
    _record_feedback(gate, data)
    if config.gate.cascade is None:
        return gate
    fast = train_gate(data.texts, data.labels, build_encoder(config.gate.cascade.encoder),
                      experts=routed, progress=progress,
                      classifier=build_classifier(config.gate.classifier, balance=config.gate.balance),
                      pinned=data.pinned, refit=False, places=data.places)
    _record_feedback(fast, data)
    return CascadeGate.train(gate, fast, data.texts, data.labels, agreement=config.gate.cascade.agreement,
                             familiar=config.gate.cascade.familiar, pinned=data.pinned)


def _record_feedback(gate: Gate, data: TrainingData) -> None:
    """Note in the gate's metadata (and so in ``gate.json``) how many feedback verdicts it was trained with and
    the time of the newest, so a served gate says which verdicts it has seen; and which of its examples only
    feedback gave, whose text it never shows (``Gate.private_texts``)."""
    through = None if data.feedback_through is None else \
        datetime.fromtimestamp(data.feedback_through, UTC).isoformat(timespec="seconds")
    gate.metadata = replace(gate.metadata, feedback_verdicts=data.feedback, feedback_through=through)
    gate.private_texts = data.private


def _learned_vote_weights(config: RouterConfig, data: TrainingData, *, progress: bool) -> VoteWeights | None:
    """The combiner's learned vote weights, fitted on the outcome records' answers, when the config asks for
    them (``combiner.vote_weights: learned``); checked before anything is written."""
    if config.combiner.vote_weights != "learned":
        return None
    if data.kind != "outcome":
        raise ValueError("combiner.vote_weights is 'learned', which needs outcome records with 'answers' in "
                         "gate.train_data; the training data here is labelled queries")
    from router.combine import Extraction
    from router.vote_weights import fit_from_records

    combiner = config.combiner
    # Read as the vote reads them: each expert's answers by its own extractor, where it has one, and then all in
    # one form (``Extraction`` pools them), so the weights are fitted on the answers they will be served on.
    extraction = Extraction(combiner.extractor, {e.name: e.extractor for e in config.experts if e.extractor})
    each = {name: functools.partial(extraction, name) for name in config.expert_names}
    return fit_from_records(data.records, config.expert_names, functools.partial(extraction, ""),
                            l2=combiner.vote_l2, length_term=combiner.vote_length,
                            answer_bias_l2=combiner.vote_answer_bias_l2 if combiner.vote_answer_bias else None,
                            progress=progress, per_expert=each)
