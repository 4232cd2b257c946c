"""Training a label gate: embed labelled queries, split them, fit the classifier, then calibrate it.

Calibration (the temperature, the grids and the threshold) needs queries the classifier did not train on:
the held-out validation split, when it holds queries of at least two experts and at least ``MIN_HELD_OUT`` in
all. With less (an expert keeps ``floor(0.15 * n)`` of its ``n`` texts, so none with six or fewer, as when a gate
is trained from a handful of config ``examples`` per expert), every example is scored by a classifier fitted
without its fold instead (``cross_validation_folds``: at most ``CV_FOLDS`` folds, stratified per expert, so
leave-one-out for an expert with ten examples or fewer), its cosine taken to the examples outside its fold. An
example whose expert has no other example cannot be held out; when only one expert's or none can (one example
per expert), the gate stays uncalibrated (temperature 1, no threshold: it never abstains) and a warning says so.
``metrics.calibration`` records which it was: ``"held-out"``, ``"cross-validated"`` or ``"none"``.

The out-of-distribution grids and threshold fitted here are what ``router.gate.ood_score`` compares a query
with (``router.gate``'s docstring, "Out of distribution").

Why apart from ``router.gate``: training and calibration run offline (``moe train``, ``moe eval``), never while
a gate serves, and the serving object should not carry them (STYLE.md, 10). This module depends on
``router.gate`` (it builds a ``Gate``) and ``router.gate_artifact``; ``router.gate`` re-exports its public
names, importing it only when one of them is first asked for, so the two never import each other while loading.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import threading
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from router.classifiers import Classifier, EnsembleClassifier, Queries
from router.coldstart import fit_claim_map, fit_similarity_map
from router.encoders import Encoder
from router.gate import UNSEEN_PRIOR, Gate, _softmax, ood_score
from router.gate_artifact import GateMetadata, ValidationMetrics

__all__ = [
    "CALIBRATION",
    "CV_FOLDS",
    "OOD_GRID",
    "OOD_KEEP",
    "conflicting_labels",
    "conflicts_note",
    "cross_validation_folds",
    "embed_texts",
    "expected_calibration_error",
    "fit_ood",
    "fit_temperature",
    "fit_top_temperature",
    "nearest_similarity",
    "split_train_val",
    "ticking",
    "train_gate",
    "training_data_sha256",
]

# Training's warnings keep the logger they had when this code was part of router.gate: eval.suite's
# ONCE_LOGGERS (a filter on that logger) and callers' log settings name it.
log = logging.getLogger("router.gate")

# Share of in-distribution validation queries the OOD threshold keeps (routes normally). 0.97: one in-domain
# query in ~33 goes to the default expert, the price of catching most unrelated ones.
OOD_KEEP = 0.97
OOD_GRID = 201  # percentile points per signal in metadata.ood_reference
CV_FOLDS = 10  # folds of that cross-validation: at most ten classifier fits, however many examples
# The fewest held-out queries the temperature and the out-of-distribution threshold are fitted on; with fewer
# they are fitted on every example scored out of fold. Fitted on the 7 queries 10 examples per SNIPS intent hold
# out, the 3% threshold made gates abstain on up to 41% of in-scope queries (2.4% at most 6.4% cross-validated).
MIN_HELD_OUT = 50
# Distinct examples an expert needs for one of them to be held out at the default share (15%): floor(0.15 * 7) = 1.
_EXAMPLES_FOR_ONE_HELD_OUT = 7
CALIBRATION = ("held-out", "cross-validated", "none")  # metrics.calibration: what the calibration was fitted on
_EMBED_CHUNK = 512  # texts per encode call while training: small enough for a smooth progress bar


# --- calibration ------------------------------------------------------------------------------------------

def _nll(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(y)), y].mean())

def expected_calibration_error(proba: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE: |accuracy - confidence| per equal-width confidence bin, weighted by bin size. Bin ``b``
    holds confidences in ``(b/bins, (b+1)/bins]`` (the first also 0), as ``eval.metrics`` bins them, so the
    figure ``gate.json`` records is the one ``moe eval`` reports for the same probabilities."""
    conf, hit = proba.max(axis=1), proba.argmax(axis=1) == y
    which = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    return float(sum(abs(hit[which == b].mean() - conf[which == b].mean()) * (which == b).mean()
                     for b in range(bins) if (which == b).any()))

def fit_temperature(logits: np.ndarray, y: np.ndarray, lo: float = 0.01, hi: float = 100.0) -> float:
    """The T minimising validation NLL of softmax(logits / T), never one that does worse on it than T = 1; except
    where every row ranks its target first.

    NLL is convex in 1/T, hence unimodal in log T, so a golden-section search on log T finds the optimum.
    When every row ranks its target first, NLL has no minimum: it falls as T -> 0, and the fit would sharpen
    every probability to ~1 (T at ``lo``), so a calibration set that happens to hold no mistake (a few
    examples, or easy ones) would make the gate certain of everything. Then T is the one whose mean top
    probability is the Laplace estimate of the accuracy, ``(n + 1) / (n + 2)``: ``n`` right out of ``n``. That T
    may be above 1 and do worse on these rows than T = 1 (24 rows, all right, at a mean top probability of 0.99:
    T softens them to 0.96), by design: these rows cannot show the gate's mistakes, which unseen queries will.
    """
    own = np.arange(logits.shape[1]) == np.asarray(y)[:, None]
    if len(y) and (logits[own] > np.where(own, -np.inf, logits).max(axis=1)).all():
        return _temperature_for_confidence(logits, (len(y) + 1) / (len(y) + 2), lo, hi)
    t = math.exp(_golden_section(lambda log_t: _nll(logits, y, math.exp(log_t)), math.log(lo), math.log(hi), 80))
    return t if _nll(logits, y, t) <= _nll(logits, y, 1.0) else 1.0


def _golden_section(f: Callable[[float], float], a: float, b: float, steps: int) -> float:
    """The point of [a, b] where ``f`` (unimodal there) is least, by ``steps`` golden-section steps."""
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(steps):
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        if f(c) <= f(d):
            b = d
        else:
            a = c
    return (a + b) / 2

def fit_top_temperature(logits: np.ndarray, right: np.ndarray, lo: float = 0.01, hi: float = 100.0) -> float:
    """The T whose top probability, max softmax(logits / T), best predicts ``right`` (per row, whether the top
    choice was right): the T minimising the binary log-loss of the top probability, what panels sized on it
    (``mass``, ``adaptive``) and the ECE read. ``fit_temperature`` fits the whole distribution to one target per
    row instead; where several choices are right at once (13 of 31 LLMs, on an average MMLU-Pro question), that
    asks mass for one of them, and the top probability it leaves was 0.45 where the pick was right (or no better
    than the rest) 0.77 of the time.

    Searched on a grid of log T and refined by golden section around the best point (the loss need not be
    unimodal in T). Rows all right, or all wrong, have no optimum inside the bounds: T is then the one whose mean
    top probability is the Laplace estimate, ``(n + 1) / (n + 2)`` or ``1 / (n + 2)``."""
    right = np.asarray(right, dtype=bool)
    n = len(right)
    if n and (right.all() or not right.any()):
        return _temperature_for_confidence(logits, (n + 1) / (n + 2) if right.all() else 1 / (n + 2), lo, hi)

    def loss(log_t: float) -> float:
        top = np.clip(_softmax(logits / math.exp(log_t)).max(axis=1), 1e-12, 1 - 1e-12)
        return float(-np.where(right, np.log(top), np.log1p(-top)).mean())

    grid = np.linspace(math.log(lo), math.log(hi), 61)
    best = int(np.argmin([loss(g) for g in grid]))
    return math.exp(_golden_section(loss, float(grid[max(best - 1, 0)]), float(grid[min(best + 1, len(grid) - 1)]),
                                    40))


def _temperature_for_confidence(logits: np.ndarray, confidence: float, lo: float, hi: float) -> float:
    """The T in [lo, hi] whose mean top probability is ``confidence`` (it falls as T grows), by bisection on
    log T; the bound nearest to it when none is."""
    def mean_top(log_t: float) -> float:
        return float(_softmax(logits / math.exp(log_t)).max(axis=1).mean())

    a, b = math.log(lo), math.log(hi)
    if mean_top(a) <= confidence:
        return lo
    if mean_top(b) >= confidence:
        return hi
    for _ in range(60):
        mid = (a + b) / 2
        a, b = (mid, b) if mean_top(mid) > confidence else (a, mid)
    return math.exp((a + b) / 2)


# --- training ---------------------------------------------------------------------------------------------

def training_data_sha256(texts: Sequence[str], labels: Sequence[str]) -> str:
    """Order-independent fingerprint of the labelled data, so an artifact says what it learned from."""
    lines = sorted(json.dumps([label, text], ensure_ascii=False) for text, label in zip(texts, labels, strict=True))
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()

@contextlib.contextmanager
def ticking(bar: Any, every_s: float = 1.0) -> Iterator[None]:
    """Redraw ``bar`` (a tqdm bar) every ``every_s`` seconds while the block runs, so a step that takes a while
    (fitting 1,000 experts' classifier: half a minute) shows its time going by and its current postfix, not a
    bar that looks stuck. Nothing for a disabled bar."""
    if getattr(bar, "disable", True):
        yield
        return
    done = threading.Event()

    def redraw() -> None:
        while not done.wait(every_s):
            bar.refresh()

    thread = threading.Thread(target=redraw, name="progress-redraw", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def split_train_val(texts: Sequence[str], labels: Sequence[str], *, seed: int = 0,
                    val_fraction: float = 0.15, pinned: Collection[str] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val), stratified per label and decided by a seeded hash of the text.

    The split depends only on the data and the seed, never on order or the process. Copies of one text stay
    on one side, so duplicates do not leak into validation. Each label sends ``floor(fraction * distinct
    texts)`` of its texts that are not ``pinned`` to validation, so a label with few texts keeps them all for
    training. ``pinned`` texts always train: a user's verdict on a query (feedback) must reach the classifier.
    """
    def key(text: str) -> bytes:
        return hashlib.sha256(f"{seed}\x00{text}".encode()).digest()

    by_label: dict[str, set[str]] = {}
    for text, label in zip(texts, labels, strict=True):
        by_label.setdefault(label, set()).add(text)
    val_texts: set[str] = set()
    kept = set(pinned)
    for distinct in by_label.values():
        candidates = sorted(distinct - kept, key=key)
        val_texts.update(candidates[:math.floor(val_fraction * len(candidates))])
    # By text, not by (label, text): a text given two labels goes to validation whole, never half on each side.
    in_val = np.array([t in val_texts for t in texts], dtype=bool)
    return np.flatnonzero(~in_val), np.flatnonzero(in_val)


def _conflicts_shown(conflicts: Mapping[str, Sequence[str]], places: Mapping[str, Sequence[tuple[str, str]]],
                     shown: int = 3) -> str:
    """The first ``shown`` of ``conflicts`` (text -> labels), each with its labels and where it was given with
    them, as far as ``places`` knows (``'q': music, weather (data.jsonl:2 music, data.jsonl:9 weather)``), and how
    many more there are."""
    parts = []
    for text, labels in list(conflicts.items())[:shown]:
        where = [f"{place} {label}" for place, label in places.get(text, ()) if label in labels]
        listed = f" ({', '.join(where[:4])}{' ...' if len(where) > 4 else ''})" if where else ""
        parts.append(f"{text[:80]!r}: {', '.join(labels)}{listed}")
    more = len(conflicts) - shown
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def conflicts_note(count: int) -> str:
    """What a report says of ``count`` training texts given more than one label (without the texts)."""
    return f"{count} training queries carry more than one label; the gate splits its probability between them"


def conflicting_labels(texts: Sequence[str], labels: Sequence[str]) -> dict[str, list[str]]:
    """The texts that carry more than one label, with their labels (sorted)."""
    seen: dict[str, set[str]] = {}
    for text, label in zip(texts, labels, strict=True):
        seen.setdefault(text, set()).add(label)
    return {t: sorted(ls) for t, ls in seen.items() if len(ls) > 1}

def embed_texts(encoder: Encoder, texts: Sequence[str], *, progress: bool = True) -> np.ndarray:
    """``[len(texts), dim]`` embeddings, in chunks behind a progress bar."""
    from tqdm.auto import tqdm

    with tqdm(total=len(texts), desc="embedding", unit="text", disable=not progress) as bar:
        chunks = [np.zeros((0, encoder.dim), dtype=np.float32)]
        for start in range(0, len(texts), _EMBED_CHUNK):
            chunks.append(encoder.encode(texts[start:start + _EMBED_CHUNK]))
            bar.update(len(chunks[-1]))
    return np.concatenate(chunks)

def train_gate(texts: Sequence[str], labels: Sequence[str], encoder: Encoder, *, experts: Sequence[str],
               seed: int = 0, val_fraction: float = 0.15, progress: bool = True,
               classifier: Classifier | None = None, pinned: Collection[str] = (),
               min_held_out: int = MIN_HELD_OUT, refit: bool = True,
               places: Mapping[str, Sequence[tuple[str, str]]] | None = None) -> Gate:
    """Embed, split, fit the classifier on the train part, then the temperature and the out-of-distribution
    grids and threshold on queries it did not train on: the validation part, or where that holds fewer than two
    experts' queries or fewer than ``min_held_out`` queries, every example out of fold (the module docstring,
    "Calibration"). The cold-start claim map is fitted on the validation part (on every example, each left out of
    its own similarities, where that holds fewer than ``min_held_out``), and the s-only map older routers read on
    the validation part.
    ``classifier`` defaults to the ensemble (``router.classifiers``). ``pinned`` texts are never held out
    (``split_train_val``): feedback's. ``places``: where each text was given (a file and line), named by the
    warning about texts given more than one label.

    Where calibration is cross-validated, the few held-out queries teach the classifier nothing they could not
    also teach by training it, so the served classifier is fitted on every example (``refit``). ``refit=False``
    keeps them out of it: a two-stage gate fits its thresholds on them (``router.cascade``), which needs both
    stages never to have trained on them."""
    from tqdm.auto import tqdm

    experts = list(experts)
    _check_training_input(texts, labels, experts)
    counts = Counter(labels)
    unseen = [e for e in experts if counts[e] == 0]
    trained = [e for e in experts if counts[e] > 0]
    if len(trained) < 2:
        raise ValueError(f"the gate needs examples for at least two experts; only {trained or 'none'} have any")
    if unseen:
        log.warning("experts with no training examples get a fixed prior of %g: %s", UNSEEN_PRIOR, unseen)
    conflicts = conflicting_labels(texts, labels)
    if conflicts:
        # The log line names the texts and where they were given; a report's note (``warnings_once``) says how
        # many, never a training text.
        log.warning("%d training queries carry more than one label: %s; the gate learns to split its probability "
                    "between them", len(conflicts), _conflicts_shown(conflicts, places or {}),
                    extra={"note": conflicts_note(len(conflicts))})
    texts = list(texts)
    x = embed_texts(encoder, texts, progress=progress)
    col = {e: i for i, e in enumerate(trained)}
    y = np.array([col[lab] for lab in labels], dtype=np.int64)
    train, val = split_train_val(texts, labels, seed=seed, val_fraction=val_fraction, pinned=pinned)
    queries = Queries(texts, x)
    classifier = classifier or EnsembleClassifier(seed=seed)
    # One expert's queries cannot fit a temperature (every target the same column) nor stand for the others', and a
    # handful fit neither it nor the threshold reliably: calibration is cross-validated over every example, and
    # the served classifier trains on them all (with 8 to 15 examples for each of 7 SNIPS intents, 0.6 to 1.1
    # points more accurate than on the training part alone), unless a two-stage gate needs them held out.
    cross_validate = len(np.unique(y[val])) < 2 or len(val) < min_held_out
    served = np.arange(len(texts)) if cross_validate and refit else train
    unfitted = copy.deepcopy(classifier) if cross_validate else None  # a fresh one per fold
    with tqdm(total=2, desc=f"training gate ({classifier.kind})", unit="step", disable=not progress) as bar, \
            ticking(bar):
        bar.set_postfix_str(f"fitting on {len(served):,} examples")
        classifier.fit(queries.subset(served), y[served], len(trained))
        bar.update()
        if unfitted is not None:
            scored = _cross_validated(unfitted, queries, y, len(trained), seed=seed,
                                      on_fold=lambda f, k: bar.set_postfix_str(f"cross-validating, fold {f} of {k}"))
        else:
            bar.set_postfix_str(f"calibrating on {len(val):,} held-out queries")
            scored = _Scored(classifier.predict_logits(queries.subset(val)), y[val],
                             nearest_similarity(x[train], x[val]), "held-out")
        scored = _usable(scored, trained)
        temperature, metrics = _calibrate(scored, n_train=len(served), n_val=len(texts) - len(served))
        bar.update()
    similarity = fit_similarity_map(x[train], y[train], x[val], y[val], len(trained), seed=seed)
    claims, offsets = fit_claim_map(x[train], y[train], x[val], y[val], len(trained), min_held_out=min_held_out,
                                    seed=seed, grid_points=OOD_GRID)
    ood_reference, ood_threshold = _fit_ood_scores(_softmax(scored.logits / temperature).max(axis=1)
                                                   if len(scored.y) else np.zeros(0), scored.similarity)
    metadata = GateMetadata(encoder.identity, encoder.checksum, training_data_sha256(texts, labels), metrics,
                            classifier=classifier.kind, balance=getattr(classifier, "balance", None),
                            unseen_experts=unseen,
                            cold_start_slope=similarity.slope, cold_start_midpoint=similarity.midpoint,
                            cold_start_claims=None if claims is None else claims.as_list(),
                            cold_start_familiar=None if claims is None else [list(g) for g in claims.familiar or ()],
                            cold_start_offsets=None if claims is None
                            else {trained[i]: float(o) for i, o in enumerate(offsets) if o > 0},
                            ood_threshold=ood_threshold, ood_reference=ood_reference)
    gate = Gate(encoder, experts, classifier, temperature, metadata, (x, texts, list(labels)))
    gate.pinned_texts = frozenset(pinned) & set(texts)  # saved with it: a cascade fitted again holds out the same
    return gate

@dataclass(frozen=True)
class _Scored:
    """Queries scored by a classifier that did not train on them: what calibration is fitted on."""

    logits: np.ndarray  # [n, trained experts]
    y: np.ndarray  # [n] their experts' columns
    similarity: np.ndarray  # [n] each one's cosine to the nearest example that classifier trained on
    how: str  # one of CALIBRATION

def cross_validation_folds(texts: Sequence[str], labels: Sequence[str], *, seed: int = 0,
                           folds: int = CV_FOLDS) -> np.ndarray:
    """The fold of each text, stratified per label and decided by a seeded hash of the text, like
    ``split_train_val``: each label deals its distinct texts out to the folds in turn, so with ``folds`` or
    fewer texts each of them has a fold to itself (leave-one-out), and copies of one text share a fold.

    There are as many folds as the largest label has distinct texts, and at most ``folds``."""
    by_label: dict[str, set[str]] = {}
    for text, label in zip(texts, labels, strict=True):
        by_label.setdefault(label, set()).add(text)
    k = max(2, min(folds, max((len(d) for d in by_label.values()), default=0)))
    fold_of: dict[str, int] = {}
    for label in sorted(by_label):
        ordered = sorted(by_label[label], key=lambda t: hashlib.sha256(f"{seed}\x00{t}".encode()).digest())
        for i, text in enumerate(ordered):
            fold_of.setdefault(text, i % k)  # a text under two labels keeps its first fold
    return np.array([fold_of[t] for t in texts], dtype=np.int64)

def _cross_validated(unfitted: Classifier, queries: Queries, y: np.ndarray, n_classes: int, *,
                     seed: int, on_fold: Callable[[int, int], None] | None = None) -> _Scored:
    """Every example scored by a copy of ``unfitted`` fitted on the other folds, with its cosine to their
    examples. An example is left out when its expert has no example in the other folds (it has one alone):
    the classifier would never have seen its expert, unlike every query it serves. ``on_fold(i, k)`` is told as
    the i-th of the k folds starts."""
    fold = cross_validation_folds(queries.texts, [str(c) for c in y], seed=seed)
    rows: list[np.ndarray] = []
    logits: list[np.ndarray] = []
    similarity: list[np.ndarray] = []
    folds = np.unique(fold)
    for i, f in enumerate(folds):
        if on_fold is not None:
            on_fold(i + 1, len(folds))
        rest = np.flatnonzero(fold != f)
        present = np.unique(y[rest])
        held = np.flatnonzero((fold == f) & np.isin(y, present))
        if len(held) == 0 or len(present) < 2:
            continue
        model = copy.deepcopy(unfitted)
        model.fit(queries.subset(rest), y[rest], n_classes)
        rows.append(held)
        logits.append(model.predict_logits(queries.subset(held)))
        similarity.append(nearest_similarity(queries.embeddings[rest], queries.embeddings[held]))
    order = np.concatenate([np.zeros(0, dtype=np.int64), *rows])
    return _Scored(np.concatenate([np.zeros((0, n_classes)), *logits]).astype(np.float64), y[order],
                   np.concatenate([np.zeros(0), *similarity]), "cross-validated")

def _usable(scored: _Scored, trained: list[str]) -> _Scored:
    """``scored``, with a warning naming what cross-validation could not cover: the experts with a single
    example, or all but one expert, in which case the gate is left uncalibrated (``how`` "none": temperature 1,
    no threshold, so it never abstains), since one expert's examples alone cannot fit a temperature."""
    covered = [e for c, e in enumerate(trained) if (scored.y == c).any()]
    if len(covered) < 2:
        log.warning("the gate cannot be calibrated: %s, so its probabilities keep temperature 1 and it has no "
                    "out-of-distribution threshold (it will never abstain to gate.default_expert); "
                    "metrics.calibration is 'none'. Give every expert at least two distinct examples.",
                    f"only {covered[0]!r} has two distinct examples" if covered else
                    "no expert has two distinct examples, one to hold out and one to train on")
        n = len(trained)
        return _Scored(np.zeros((0, n)), np.zeros(0, dtype=np.int64), np.zeros(0), "none")
    missing = [e for e in trained if e not in covered]
    if missing and scored.how == "cross-validated":
        log.warning("calibration is cross-validated on %d examples, none of them of %s: each has a single "
                    "example, which cannot be held out; give them a second one", len(scored.y),
                    ", ".join(map(repr, missing)))
    elif missing:
        # Each expert holds out its share (val_fraction) of its examples: none, for one with a handful. Its
        # queries then weigh nothing in the temperature, the threshold and metrics.ece, which look well calibrated
        # while the gate is sure of it and wrong half the time (CLINC150: ECE 0.012 reported, 0.042 on test).
        log.warning("calibration is fitted on %d held-out queries, none of them of %s: too few examples to hold "
                    "one out; their probabilities are not calibrated, and metrics.ece leaves them out. Give them "
                    "more examples (about %d each puts one in the held-out part)", len(scored.y),
                    ", ".join(map(repr, missing)), _EXAMPLES_FOR_ONE_HELD_OUT)
    return scored

def nearest_similarity(reference: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Each query row's highest cosine to a ``reference`` row (rows L2-normalised, so a dot product)."""
    if len(reference) == 0:
        return np.full(len(queries), -1.0)
    return np.concatenate([np.zeros(0), *((queries[i:i + 1024] @ reference.T).max(axis=1)
                                           for i in range(0, len(queries), 1024))])

def fit_ood(val_top_probability: np.ndarray, reference: np.ndarray, held_out: np.ndarray,
            keep: float = OOD_KEEP) -> tuple[list[list[float]] | None, float | None]:
    """``(grids, threshold)`` for ``ood_score`` from in-distribution validation queries: their calibrated top
    probabilities, and their embeddings ``held_out`` against the training rows ``reference``. The threshold
    keeps ``keep`` of them. ``(None, None)`` without validation data: such a gate never abstains."""
    if len(reference) == 0 or len(held_out) == 0:
        return None, None
    return _fit_ood_scores(val_top_probability, nearest_similarity(reference, held_out), keep)

def _fit_ood_scores(top_probability: np.ndarray, similarity: np.ndarray,
                    keep: float = OOD_KEEP) -> tuple[list[list[float]] | None, float | None]:
    """``fit_ood`` from the queries' top probabilities and nearest-example cosines themselves."""
    if len(similarity) == 0:
        return None, None
    quantiles = np.linspace(0.0, 1.0, OOD_GRID)
    grids = [np.quantile(top_probability, quantiles).tolist(), np.quantile(similarity, quantiles).tolist()]
    scores = ood_score(top_probability, similarity, grids)
    return grids, float(np.quantile(scores, 1.0 - keep))

def _check_training_input(texts: Sequence[str], labels: Sequence[str], experts: list[str]) -> None:
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    if len(set(experts)) != len(experts):
        raise ValueError(f"duplicate expert names: {sorted(e for e, n in Counter(experts).items() if n > 1)}")
    unknown = sorted(set(labels) - set(experts))
    if unknown:
        raise ValueError(f"labels that are not experts: {', '.join(map(repr, unknown))}; experts: {experts}")

def _calibrate(scored: _Scored, *, n_train: int, n_val: int) -> tuple[float, ValidationMetrics]:
    logits, y = scored.logits, scored.y
    if len(y) == 0:
        return 1.0, ValidationMetrics(n_train=n_train, n_val=n_val, calibration="none", n_calibration=0)
    t = fit_temperature(logits, y)
    before, after = _softmax(logits), _softmax(logits / t)
    return t, ValidationMetrics(
        n_train=n_train, n_val=n_val, accuracy=float((before.argmax(axis=1) == y).mean()),
        ece_before=expected_calibration_error(before, y), ece_after=expected_calibration_error(after, y),
        nll_before=_nll(logits, y, 1.0), nll_after=_nll(logits, y, t), calibration=scored.how,
        n_calibration=len(y))
