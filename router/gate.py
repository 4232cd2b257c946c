"""The learned gate: embed a query, score every expert, explain the score by nearest training examples.

A ``Gate`` is an encoder, the expert list in column order, a linear classifier over the frozen embeddings and
a softmax temperature fitted on held-out data. ``predict_proba`` gives one row per query over ``experts``,
summing to 1; choosing top-k from those rows is ``router.topk``'s job, not the gate's.

Experts with no training examples get a fixed tiny probability (``UNSEEN_PRIOR`` each) from ``train_gate``
rather than an error; ``metadata.unseen_experts`` names them. At least two experts need examples, or there is
nothing to learn.

Serving follows the config, not the artifact: ``Gate.for_config`` returns a gate over the config's experts.
An expert the artifact has no training data for is scored from its config ``examples`` (cold start), one the
config dropped loses its column, and the rest are renormalised (``router.coldstart``). An expert with
neither training data nor examples is refused, with ``GateArtifactMismatch`` naming it, and so is a config none
of whose experts the artifact was trained for (a gate from another deployment).

Two kinds of gate share this class's serving surface (``experts``, ``predict_proba``, ``nearest``):
``Gate`` (``kind = "label"``) learns from labelled queries; ``router.outcome_gate.OutcomeGate``
(``kind = "outcome"``) from outcome records. The artifact's ``kind`` picks the class ``Gate.load`` restores.

An artifact is a folder: ``gate.json`` (written last, so its presence means the folder is complete) and two
``.npz`` files, read with ``allow_pickle=False``. ``gate.json`` holds the sha256 of each ``.npz`` file and of
its own contents (``manifest_sha256``), so ``Gate.load`` refuses an artifact edited after it was saved. It also
refuses an encoder other than the one the gate was trained with, or one reading another number of tokens per
text (``encoder_max_length``), since its vectors would land in a different space. Artifacts saved before
either field existed load without that check.

Out of distribution: ``ood_scores`` gives each query a familiarity score, higher for queries like the training
data, and ``metadata.ood_threshold`` is the score that ``OOD_KEEP`` of the validation queries reach; below it a
query is out of distribution and the orchestrator abstains to ``gate.default_expert``. A label gate's score
combines two signals, each turned into a percentile of the validation queries' own values (the grids in
``metadata.ood_reference``) and averaged: the calibrated top probability (the classifier is unsure) and the
cosine to the nearest training example (nothing like it was seen). Each catches out-of-scope queries the other
misses: on CLINC150's out-of-scope test queries the mean's AUROC is above either signal's alone (the README's
Results give the figures, from ``moe eval --suite clinc150-domain``). Gates without the grids (outcome gates,
older artifacts) score by the cosine alone.
Artifacts without a threshold never abstain.

Calibration (the temperature, the grids and the threshold) needs queries the classifier did not train on:
the held-out validation split, when it holds queries of at least two experts. With less (an expert keeps
``floor(0.15 * n)`` of its ``n`` texts, so none with six or fewer, as when a gate is trained from a handful of
config ``examples`` per expert), every example is scored by a classifier fitted without its fold instead
(``cross_validation_folds``: at most ``CV_FOLDS`` folds, stratified per expert, so leave-one-out for an expert
with ten examples or fewer), its cosine taken to the examples outside its fold. An example whose expert has no
other example cannot be held out; when only one expert's or none can (one example per expert), the gate stays
uncalibrated (temperature 1, no threshold: it never abstains) and a warning says so. ``metrics.calibration``
records which it was: ``"held-out"``, ``"cross-validated"`` or ``"none"``.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import logging
import math
import zipfile
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from router.classifiers import (
    CLASSIFIERS,
    Classifier,
    EnsembleClassifier,
    LogisticClassifier,
    Queries,
    pack_strings,
    unpack_strings,
)
from router.coldstart import Columns, SimilarityMap, fit_similarity_map, plan_columns
from router.encoders import Encoder, sha256_file
from router.search import flat_ip_index

if TYPE_CHECKING:
    from router.config import RouterConfig

__all__ = [
    "CLASSIFIERS",
    "GATE_KINDS",
    "UNSEEN_PRIOR",
    "Assessment",
    "Classifier",
    "Gate",
    "GateArtifactMismatch",
    "GateMetadata",
    "LogisticClassifier",
    "Neighbour",
    "Queries",
    "ValidationMetrics",
    "assess",
    "cross_validation_folds",
    "embed_texts",
    "expected_calibration_error",
    "fit_ood",
    "fit_ood_threshold",
    "fit_temperature",
    "nearest_similarity",
    "ood_score",
    "split_train_val",
    "train_gate",
    "training_data_sha256",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# An outcome gate whose success model shrinks toward a task prior is written as format 2: code from before task
# priors would load it without the prior and route differently, so it must refuse it, and it refuses any format
# but 1. Every other gate is still format 1, readable by that code.
TASK_PRIOR_FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (FORMAT_VERSION, TASK_PRIOR_FORMAT_VERSION)
UNSEEN_PRIOR = 1e-3
# Share of in-distribution validation queries the OOD threshold keeps (routes normally). 0.97: one in-domain
# query in ~33 goes to the default expert, the price of catching most unrelated ones.
OOD_KEEP = 0.97
OOD_GRID = 201  # percentile points per signal in metadata.ood_reference
CV_FOLDS = 10  # folds of that cross-validation: at most ten classifier fits, however many examples
CALIBRATION = ("held-out", "cross-validated", "none")  # metrics.calibration: what the calibration was fitted on
_EMBED_CHUNK = 512  # texts per encode call while training: small enough for a smooth progress bar


class GateArtifactMismatch(ValueError):
    """A saved gate does not fit what it is loaded with (encoder, expert list or file contents), or its files
    cannot be read as a gate artifact (corrupt, truncated, or something else)."""


@dataclass(frozen=True)
class Neighbour:
    text: str
    label: str
    similarity: float  # cosine, since embeddings are L2-normalised


# --- calibration ------------------------------------------------------------------------------------------

def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


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
    """The T minimising validation NLL of softmax(logits / T); never one that does worse than T = 1.

    NLL is convex in 1/T, hence unimodal in log T, so a golden-section search on log T finds the optimum.
    When every row ranks its target first, NLL has no minimum: it falls as T -> 0, and the fit would sharpen
    every probability to ~1 (T at ``lo``), so a calibration set that happens to hold no mistake (a few
    examples, or easy ones) would make the gate certain of everything. Then T is the one whose mean top
    probability is the Laplace estimate of the accuracy, ``(n + 1) / (n + 2)``: ``n`` right out of ``n``.
    """
    own = np.arange(logits.shape[1]) == np.asarray(y)[:, None]
    if len(y) and (logits[own] > np.where(own, -np.inf, logits).max(axis=1)).all():
        return _temperature_for_confidence(logits, (len(y) + 1) / (len(y) + 2), lo, hi)
    a, b = math.log(lo), math.log(hi)
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(80):
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        if _nll(logits, y, math.exp(c)) <= _nll(logits, y, math.exp(d)):
            b = d
        else:
            a = c
    t = math.exp((a + b) / 2)
    return t if _nll(logits, y, t) <= _nll(logits, y, 1.0) else 1.0


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


# --- the gate ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ValidationMetrics:
    """What a gate was trained and calibrated on, and how its calibration went.

    ``n_train`` queries trained the classifier and ``n_val`` were held out of it. ``accuracy``, ECE and NLL are
    measured on the ``n_calibration`` queries the temperature was fitted on: the held-out ones, or with
    ``calibration == "cross-validated"`` every example its expert's other examples could stand in for, each
    scored out of fold."""

    n_train: int
    n_val: int
    accuracy: float | None = None  # None when nothing could be scored (calibration "none")
    ece_before: float | None = None
    ece_after: float | None = None
    nll_before: float | None = None
    nll_after: float | None = None
    # Outcome gates only: top-1 routing on out-of-fold predictions at the trained cost weight.
    routed_accuracy: float | None = None
    routed_cost: float | None = None  # mean recorded cost per query of the routed expert
    best_single: str | None = None
    best_single_accuracy: float | None = None
    oracle_accuracy: float | None = None
    # Label gates: one of CALIBRATION, and how many queries it rests on. None: not recorded (outcome gates,
    # calibrated out of fold as router.outcome_gate describes; artifacts from before these fields).
    calibration: str | None = None
    n_calibration: int | None = None


@dataclass(frozen=True)
class GateMetadata:
    encoder_identity: str
    encoder_checksum: str
    training_data_sha256: str
    metrics: ValidationMetrics
    classifier: str = EnsembleClassifier.kind
    unseen_experts: list[str] = field(default_factory=list)
    kind: str = "label"
    # router.coldstart.SimilarityMap for experts scored from their config examples.
    cold_start_slope: float = SimilarityMap.slope
    cold_start_midpoint: float = SimilarityMap.midpoint
    # ``ood_scores`` below this are out of distribution; None: never abstain.
    ood_threshold: float | None = None
    # Percentile grids (OOD_GRID points each) of the validation queries' [top probability, nearest cosine];
    # None: ``ood_scores`` is the nearest cosine alone.
    ood_reference: list[list[float]] | None = None
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    format_version: int = FORMAT_VERSION

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data, ``metrics`` included as a dict."""
        return asdict(self)


GATE_KINDS: dict[str, str] = {
    "label": "router.gate:Gate",
    "outcome": "router.outcome_gate:OutcomeGate",
}


class Gate:
    """Scores experts for queries. Columns of every probability row follow ``experts``."""

    kind: ClassVar[str] = "label"

    def __init__(self, encoder: Encoder, experts: Sequence[str], classifier: Classifier, temperature: float,
                 metadata: GateMetadata, examples: tuple[np.ndarray, list[str], list[str]]) -> None:
        self._setup(encoder, experts, metadata, examples)
        self.classifier = classifier
        self.temperature = temperature
        unseen = set(metadata.unseen_experts)
        self._trained = np.array([i for i, e in enumerate(self.experts) if e not in unseen], dtype=np.int64)

    # An example's label is the expert whose queries it stands for, so a removed expert's examples leave the
    # nearest-example searches with it. (An outcome gate labels each query with the expert that did best on it:
    # the query is still one the other experts are scored on, so it stays.)
    EXAMPLES_ARE_EXPERTS_DATA = True

    def _setup(self, encoder: Encoder, experts: Sequence[str], metadata: GateMetadata,
               examples: tuple[np.ndarray, list[str], list[str]]) -> None:
        self.encoder = encoder
        self.artifact_experts = list(experts)  # the columns the trained model scores
        self.experts = list(experts)  # the columns of predict_proba: the artifact's, or the config's
        self.metadata = metadata
        # (embeddings [n, dim], texts, labels): every labelled example, kept to explain decisions.
        self.example_embeddings, self.example_texts, self.example_labels = examples
        self._n_artifact_examples = len(self.example_texts)
        self._columns: Columns | None = None  # set by for_config when the config's experts differ
        # The example rows nearest-example searches see: all of them, or (a config's view without some of the
        # artifact's experts) only those of the experts it routes to, so no decision is explained, or judged
        # familiar, by the examples of an expert that was removed.
        self._rows: np.ndarray | None = None
        self._index: Any = None

    @property
    def training_examples(self) -> tuple[list[str], list[str]]:
        """The texts and labels the artifact was trained on, in training order (without a config's cold-start
        examples)."""
        n = self._n_artifact_examples
        return list(self.example_texts[:n]), list(self.example_labels[:n])

    @property
    def trained_experts(self) -> list[str]:
        """Artifact experts that had training data; any other expert needs examples to be routable."""
        unseen = set(self.metadata.unseen_experts)
        return [e for e in self.artifact_experts if e not in unseen]

    def _artifact_proba(self, x: np.ndarray, texts: Sequence[str] | None) -> np.ndarray:
        """``[q, len(artifact_experts)]`` rows summing to 1."""
        if texts is None:
            if self.classifier.reads_text:
                raise ValueError(f"this gate's {self.classifier.kind!r} classifier reads the query text: pass "
                                 "texts to predict_proba, or call scores(texts)")
            texts = [""] * len(x)
        logits = self.classifier.predict_logits(Queries(texts, x))
        trained = _softmax(logits.astype(np.float64) / self.temperature)
        n_unseen = len(self.artifact_experts) - len(self._trained)
        out = np.full((len(x), len(self.artifact_experts)), UNSEEN_PRIOR, dtype=np.float64)
        out[:, self._trained] = trained * (1.0 - UNSEEN_PRIOR * n_unseen)
        return out

    def predict_proba(self, embeddings: np.ndarray, texts: Sequence[str] | None = None) -> np.ndarray:
        """``[q, len(experts)]`` rows summing to 1. ``texts`` are the queries behind ``embeddings``; classifiers
        that read the words (the default ensemble) need them."""
        x = np.atleast_2d(np.asarray(embeddings, dtype=np.float32))
        proba = self._artifact_proba(x, texts)
        return proba if self._columns is None else self._columns.apply(proba, x)

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        return self.predict_proba(self.encoder.encode(texts), list(texts))

    @property
    def ood_threshold(self) -> float | None:
        return self.metadata.ood_threshold

    def ood_scores(self, proba: np.ndarray, nearest_similarity: np.ndarray) -> np.ndarray:
        """Familiarity per query (higher: more like the training data), compared with ``ood_threshold``.

        ``proba`` is ``predict_proba``'s output for the queries, ``nearest_similarity`` their cosine to the
        nearest example (``nearest_many``)."""
        return ood_score(np.asarray(proba).max(axis=1), nearest_similarity, self.metadata.ood_reference)

    def nearest(self, embedding: np.ndarray, k: int = 3) -> list[Neighbour]:
        """The ``k`` labelled examples most similar to one embedding, most similar first."""
        return self.nearest_many(np.asarray(embedding).reshape(1, -1), k)[0]

    def nearest_many(self, embeddings: np.ndarray, k: int = 3) -> list[list[Neighbour]]:
        """``nearest`` for each row of ``[q, dim]`` embeddings, in one index search."""
        rows = np.arange(len(self.example_texts)) if self._rows is None else self._rows
        if self._index is None:
            self._index = flat_ip_index(self.example_embeddings[rows])
        queries = np.ascontiguousarray(np.atleast_2d(np.asarray(embeddings, dtype=np.float32)))
        sims, ids = self._index.search(queries, min(k, len(rows)))
        return [[Neighbour(self.example_texts[rows[i]], self.example_labels[rows[i]], float(s))
                 for s, i in zip(row_s, row_i, strict=True) if i >= 0] for row_s, row_i in zip(sims, ids, strict=True)]

    # -- the config's experts ------------------------------------------------------------------------------
    def check_experts(self, names: Sequence[str], examples: Mapping[str, Sequence[str]] | None = None) -> None:
        """Raise ``GateArtifactMismatch`` for config experts this gate cannot score (``routing_problem``)."""
        problem = routing_problem(names, examples or {}, self.trained_experts)
        if problem is not None:
            raise GateArtifactMismatch(problem)

    def for_experts(self, examples: Mapping[str, Sequence[str]]) -> Gate:
        """A copy scoring exactly the experts of ``examples`` (name -> its example texts, in config order).

        Experts without training data in the artifact are scored from their examples (embedded now, so no
        retraining); experts missing from ``examples`` are dropped. See ``router.coldstart``.
        """
        names = list(examples)
        self.check_experts(names, examples)
        trained = set(self.trained_experts)
        cold = {n: list(examples[n]) for n in names if n not in trained}
        embedded = {n: self.encoder.encode(texts) for n, texts in cold.items()}
        wanted = {n: embedded.get(n, np.zeros((0, self.encoder.dim), dtype=np.float32)) for n in names}
        view = copy.copy(self)
        view.experts = names
        view._columns = plan_columns(self.artifact_experts, self.trained_experts, wanted, SimilarityMap(
            self.metadata.cold_start_slope, self.metadata.cold_start_midpoint))
        if cold:  # cold-start examples explain decisions too
            view.example_embeddings = np.concatenate([self.example_embeddings, *embedded.values()])
            view.example_texts = [*self.example_texts, *(t for ts in cold.values() for t in ts)]
            view.example_labels = [*self.example_labels, *(n for n, ts in cold.items() for _ in ts)]
        if self.EXAMPLES_ARE_EXPERTS_DATA:
            routed = set(names)
            kept = [i for i, label in enumerate(view.example_labels) if label in routed]
            view._rows = None if len(kept) == len(view.example_labels) else np.asarray(kept, dtype=np.int64)
        view._index = None
        return view

    def for_config(self, config: RouterConfig) -> Gate:
        """The gate over the config's experts (see ``for_experts``); outcome gates also take its cost weight."""
        return self.for_experts({e.name: e.examples for e in config.experts})

    # -- artifacts -----------------------------------------------------------------------------------------
    def _weights(self) -> dict[str, np.ndarray]:
        return self.classifier.arrays()

    def _manifest(self) -> dict[str, Any]:
        return {"temperature": self.temperature}

    @classmethod
    def _restore(cls, encoder: Encoder, experts: list[str], doc: dict[str, Any], metadata: GateMetadata,
                 weights: dict[str, np.ndarray], examples: tuple[np.ndarray, list[str], list[str]]) -> Gate:
        classifier = CLASSIFIERS[metadata.classifier].from_arrays(weights)
        return cls(encoder, experts, classifier, doc["temperature"], metadata, examples)

    def save(self, directory: str | Path) -> Path:
        """Write the artifact folder; ``gate.json`` goes last, so a folder holding it is complete.

        What is saved is what was trained: the artifact's experts and examples, never a config's view.
        """
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        n = self._n_artifact_examples  # a config view appends its cold-start examples after these
        texts, labels = self.example_texts[:n], self.example_labels[:n]
        text_bytes, text_offsets = pack_strings(texts)
        label_ids = {e: i for i, e in enumerate(self.artifact_experts)}
        weights: dict[str, Any] = self._weights()  # typed Any: numpy's stub confuses it with savez's flags
        np.savez(path / _WEIGHTS, **weights)
        np.savez_compressed(
            path / _EXAMPLES, embeddings=self.example_embeddings[:n],
            text_bytes=text_bytes, text_offsets=text_offsets,
            labels=np.array([label_ids.get(lab, -1) for lab in labels], dtype=np.int32))
        doc = {**self.metadata.as_dict(), "kind": self.kind, "experts": self.artifact_experts,
               "encoder_max_length": _encoder_max_length(self.encoder), **self._manifest(),
               "files": {name: sha256_file(path / name) for name in (_WEIGHTS, _EXAMPLES)}}
        doc[_SELF_DIGEST] = _manifest_digest(json.loads(json.dumps(doc)))  # as load will read it back
        (path / _MANIFEST).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: str | Path, encoder: Encoder) -> Gate:
        """Read an artifact of either kind for ``encoder``; raise ``GateArtifactMismatch`` if it was trained
        with another encoder or ``max_length``, or its files (``gate.json`` included) were edited or are corrupt."""
        path = Path(directory)
        doc = _read_manifest(path)
        if doc.get("format_version") not in READABLE_FORMAT_VERSIONS:
            raise GateArtifactMismatch(f"{path}: gate format version {doc.get('format_version')!r}, this code "
                                       f"reads {' and '.join(map(str, READABLE_FORMAT_VERSIONS))}; retrain the gate")
        digest = doc.pop(_SELF_DIGEST, None)  # None: saved before gate.json covered itself
        if digest is not None and digest != _manifest_digest(doc):
            raise GateArtifactMismatch(f"{path / _MANIFEST}: contents differ from the {_SELF_DIGEST} it was saved "
                                       "with (edited after training); retrain the gate (moe train --config <this "
                                       "config>) rather than editing it")
        try:
            return _restore_artifact(path, doc, encoder)
        except (KeyError, TypeError, AttributeError, IndexError) as exc:
            # Only an artifact without the self-digest (older, or written by hand) gets here with keys missing or
            # of the wrong type; saying which is more use than a traceback.
            what = f"no {exc.args[0]!r}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
            raise GateArtifactMismatch(f"{path}: not a gate artifact this code can read ({what}); "
                                       f"{_RETRAIN}") from exc


def _restore_artifact(path: Path, doc: dict[str, Any], encoder: Encoder) -> Gate:
    """The gate from a checked ``gate.json`` (``doc``, without its self-digest) and the folder's arrays."""
    kind = doc.setdefault("kind", "label")  # artifacts from before outcome gates are label gates
    if kind not in GATE_KINDS:
        raise GateArtifactMismatch(f"{path}: unknown gate kind {kind!r}; known: {', '.join(GATE_KINDS)}")
    _check_encoder(path, doc, encoder)
    for name, digest in doc["files"].items():
        try:
            differs = sha256_file(path / name) != digest
        except FileNotFoundError:
            raise GateArtifactMismatch(f"{path / name}: missing, though {_MANIFEST} lists it (the artifact is "
                                       f"incomplete); {_RETRAIN}") from None
        if differs:
            raise GateArtifactMismatch(f"{path / name}: contents differ from the sha256 in {_MANIFEST}")
    doc["metrics"] = ValidationMetrics(**doc["metrics"])
    experts = _expert_names(path / _MANIFEST, doc.pop("experts"), "experts")
    doc.pop("files")
    metadata = GateMetadata(**{k: v for k, v in doc.items() if k in _METADATA_FIELDS})
    weights, ex = _read_arrays(path / _WEIGHTS), _read_arrays(path / _EXAMPLES)
    texts = unpack_strings(ex["text_bytes"], ex["text_offsets"])
    labels = [experts[i] if i >= 0 else "" for i in ex["labels"]]
    module, _, name = GATE_KINDS[kind].partition(":")
    gate_cls: type[Gate] = getattr(importlib.import_module(module), name)
    return gate_cls._restore(encoder, experts, doc, metadata, weights, (ex["embeddings"], texts, labels))


_METADATA_FIELDS = frozenset(GateMetadata.__dataclass_fields__)


@dataclass
class Assessment:
    """A gate's view of a batch of queries: what the orchestrator decides from."""

    probs: np.ndarray  # [queries, len(gate.experts)], rows summing to 1
    nearest: list[list[Any]]  # per query, the training examples nearest to it (``Neighbour`` or plain dicts)
    ood: np.ndarray  # per query, familiarity (``ood_scores``); nan where unknown
    # Per query: which stage of a two-stage gate decided (router.cascade), and the out-of-distribution
    # threshold its ``ood`` is compared with; None: a one-stage gate, whose ``ood_threshold`` holds for all.
    stage: list[str] | None = None
    ood_threshold: list[float | None] | None = None
    # Per query, with an outcome gate whose success model has a task prior: its likeliest tasks and their
    # probabilities (``OutcomeGate.task_probabilities``); None for every other gate.
    tasks: list[dict[str, float]] | None = None

    def rows(self, indices: Sequence[int] | np.ndarray) -> Assessment:
        """The assessment of the queries at ``indices`` alone, in that order."""
        picked = [int(i) for i in indices]
        return Assessment(self.probs[picked], [self.nearest[i] for i in picked], self.ood[picked],
                          None if self.stage is None else [self.stage[i] for i in picked],
                          None if self.ood_threshold is None else [self.ood_threshold[i] for i in picked],
                          None if self.tasks is None else [self.tasks[i] for i in picked])


def assess(gate: Any, texts: Sequence[str], k: int = 3) -> Assessment:
    """One embedding per query serves the probabilities, the ``k`` nearest examples and the familiarity score;
    ``k=0``: the probabilities alone (no example search; familiarity unknown, nan).

    ``gate`` needs ``encoder`` and ``predict_proba``; ``nearest_many`` and ``ood_scores`` are used where it has
    them (simple gates: one ``nearest`` search per query, and the nearest example's cosine as familiarity)."""
    embeddings = gate.encoder.encode(texts)
    probs = gate.predict_proba(embeddings, texts)
    if k == 0:
        return Assessment(np.asarray(probs), [[] for _ in texts], np.full(len(texts), np.nan))
    many = getattr(gate, "nearest_many", None)
    nearest = many(embeddings, k) if many else [gate.nearest(e, k) for e in embeddings]
    similarity = np.array([_similarity(near[0]) if near else np.nan for near in nearest], dtype=np.float64)
    familiarity = getattr(gate, "ood_scores", None)
    ood = familiarity(probs, similarity) if familiarity else similarity
    explain_tasks = getattr(gate, "task_probabilities", None)
    return Assessment(np.asarray(probs), [list(near) for near in nearest], np.asarray(ood, dtype=np.float64),
                      tasks=explain_tasks(embeddings) if explain_tasks else None)


def _similarity(neighbour: Any) -> float:
    return float(neighbour["similarity"] if isinstance(neighbour, Mapping) else neighbour.similarity)


_MANIFEST, _WEIGHTS, _EXAMPLES = "gate.json", "weights.npz", "examples.npz"


def routing_problem(names: Sequence[str], examples: Mapping[str, Sequence[str]],
                    trained: Sequence[str]) -> str | None:
    """Why a gate whose artifact was trained for ``trained`` experts cannot score the config's experts
    ``names`` (``examples``: name -> the config's example texts), or None when it can: an expert without
    training data in the artifact and without examples, or every expert at once when none of them is one the
    artifact was trained for (it belongs to another deployment). Order, removals and added experts with
    examples are fine."""
    if names and set(trained).isdisjoint(names):
        # Cold start alone would score every expert from a few examples, ignoring the trained classifier.
        return ("the gate artifact was trained for other experts: none of the config's experts ("
                + ", ".join(map(repr, names)) + ") is among the artifact's trained experts ("
                + ", ".join(map(repr, trained)) + "). Retrain the gate for this config "
                "(moe train --config <this config>), or point gate.artifact at the gate trained for it.")
    unroutable = [n for n in names if n not in set(trained) and not examples.get(n)]
    if unroutable:
        return ("cannot route to expert(s) " + ", ".join(map(repr, unroutable)) + ": the gate artifact holds no "
                "training data for them and the config gives them no examples. Add examples to the config, or "
                "retrain the gate (moe train) with data for them.")
    return None


def artifact_trained_experts(directory: str | Path) -> list[str] | None:
    """The experts a gate artifact was trained on (those with training data), read from its ``gate.json``
    alone: no encoder, no weights, no checks. None when the folder holds no artifact (yet); a ``gate.json`` that
    cannot be read as one raises, as ``Gate.load`` would (``GateArtifactMismatch``, ``OSError``)."""
    try:
        doc = _read_manifest(Path(directory))
    except (FileNotFoundError, NotADirectoryError):  # what ``moe serve`` reports as "no trained gate"
        return None
    file = Path(directory) / _MANIFEST
    experts = _expert_names(file, doc.get("experts"), "experts")
    unseen = set(_expert_names(file, doc.get("unseen_experts") or [], "unseen_experts"))
    return [e for e in experts if e not in unseen]


_RETRAIN = "retrain the gate (moe train --config <this config>)"


def _read_manifest(path: Path) -> dict[str, Any]:
    """The artifact folder ``path``'s ``gate.json``, which must be a JSON object; ``FileNotFoundError`` when
    absent, ``GateArtifactMismatch`` naming the file when it is corrupt or something else."""
    file = path / _MANIFEST
    try:
        doc = json.loads(file.read_bytes())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no gate artifact here ({_MANIFEST} missing); run moe train") from None
    except ValueError as exc:  # not JSON, or not UTF-8 text (UnicodeDecodeError is a ValueError)
        raise GateArtifactMismatch(f"{file}: corrupt, not readable as JSON ({exc}); {_RETRAIN}") from None
    if not isinstance(doc, dict):
        raise GateArtifactMismatch(f"{file}: not a gate artifact (a JSON {_json_type(doc)} where a JSON object "
                                   f"belongs); {_RETRAIN}")
    return doc


def _json_type(value: object) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _expert_names(file: Path, value: object, key: str) -> list[str]:
    """``gate.json``'s ``key``, which must be a list of expert names (a string would read as its letters)."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise GateArtifactMismatch(f"{file}: not a gate artifact ({key!r} is not a list of expert names); "
                                   f"{_RETRAIN}")
    return value


def _read_arrays(file: Path) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` file, read now, so a truncated or garbled one is named here, not met later as a
    traceback. (NumPy reads a file that is no zip as a pickle, and says only that it holds pickled data.)"""
    try:
        # Opened here, not by np.load: np.load leaves its own handle open when the archive turns out corrupt.
        with open(file, "rb") as fh, np.load(fh, allow_pickle=False) as arrays:
            return {k: arrays[k] for k in arrays.files}
    except FileNotFoundError:
        raise GateArtifactMismatch(f"{file}: missing (the artifact is incomplete); {_RETRAIN}") from None
    except (ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:  # a PermissionError stays itself
        why = str(exc) if zipfile.is_zipfile(file) else "not a zip archive, which a .npz file is"
        raise GateArtifactMismatch(f"{file}: corrupt, not readable as NumPy arrays ({why}); {_RETRAIN}") from None


_SELF_DIGEST = "manifest_sha256"  # gate.json's own sha256, over its other keys (``_manifest_digest``)


def _manifest_digest(doc: Mapping[str, Any]) -> str:
    """sha256 of ``doc`` without its own digest, canonical (sorted keys), so indentation does not count."""
    body = {k: v for k, v in doc.items() if k != _SELF_DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def _encoder_max_length(encoder: Encoder) -> int | None:
    """The tokens ``encoder`` reads of each text (``gate.encoder.max_length``); None where it cannot say."""
    value = getattr(encoder, "max_length", None)  # test doubles need not derive from Encoder
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _check_encoder(path: Path, doc: dict[str, Any], encoder: Encoder) -> None:
    differences = [f"{what} {doc[key]!r} in the artifact, {have!r} given"
                   for what, key, have in (("identity", "encoder_identity", encoder.identity),
                                           ("checksum", "encoder_checksum", encoder.checksum))
                   if doc[key] != have]
    if differences:
        raise GateArtifactMismatch(f"{path}: the gate was trained with another encoder: encoder "
                                   + "; encoder ".join(differences) + ". Use that encoder or retrain the gate.")
    # Truncating elsewhere moves the vectors of long queries: the classifier would score points it never saw.
    trained, given = doc.get("encoder_max_length"), _encoder_max_length(encoder)
    if trained is not None and given is not None and trained != given:
        raise GateArtifactMismatch(f"{path}: the gate was trained with encoder max_length {trained} (tokens read "
                                   f"per query), and this encoder reads {given}. Set gate.encoder.max_length: "
                                   f"{trained}, or retrain the gate (moe train --config <this config>).")


# --- training ---------------------------------------------------------------------------------------------

def training_data_sha256(texts: Sequence[str], labels: Sequence[str]) -> str:
    """Order-independent fingerprint of the labelled data, so an artifact says what it learned from."""
    lines = sorted(json.dumps([label, text], ensure_ascii=False) for text, label in zip(texts, labels, strict=True))
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def split_train_val(texts: Sequence[str], labels: Sequence[str], *, seed: int = 0,
                    val_fraction: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val), stratified per label and decided by a seeded hash of the text.

    The split depends only on the data and the seed, never on order or the process. Copies of one text stay
    on one side, so duplicates do not leak into validation. Each label sends ``floor(fraction * distinct
    texts)`` texts to validation, so a label with few texts keeps them all for training.
    """
    def key(text: str) -> bytes:
        return hashlib.sha256(f"{seed}\x00{text}".encode()).digest()

    by_label: dict[str, set[str]] = {}
    for text, label in zip(texts, labels, strict=True):
        by_label.setdefault(label, set()).add(text)
    val_texts: set[str] = set()
    for distinct in by_label.values():
        val_texts.update(sorted(distinct, key=key)[:math.floor(val_fraction * len(distinct))])
    # By text, not by (label, text): a text given two labels goes to validation whole, never half on each side.
    in_val = np.array([t in val_texts for t in texts], dtype=bool)
    return np.flatnonzero(~in_val), np.flatnonzero(in_val)


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
               classifier: Classifier | None = None) -> Gate:
    """Embed, split, fit the classifier on the train part, then the temperature and the out-of-distribution
    grids and threshold on queries it did not train on: the validation part, or where that holds fewer than two
    experts' queries every example out of fold (the module docstring, "Calibration"). The cold-start similarity
    map is fitted on the validation part (its defaults without one). ``classifier`` defaults to the ensemble
    (``router.classifiers``)."""
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
        text, both = next(iter(conflicts.items()))
        log.warning("%d training queries carry more than one label, e.g. %r: %s; the gate learns to split its "
                    "probability between them", len(conflicts), text[:80], ", ".join(both))
    texts = list(texts)
    x = embed_texts(encoder, texts, progress=progress)
    col = {e: i for i, e in enumerate(trained)}
    y = np.array([col[lab] for lab in labels], dtype=np.int64)
    train, val = split_train_val(texts, labels, seed=seed, val_fraction=val_fraction)
    queries = Queries(texts, x)
    classifier = classifier or EnsembleClassifier(seed=seed)
    # One expert's queries cannot fit a temperature (every target the same column) nor stand for the others'.
    cross_validate = len(np.unique(y[val])) < 2
    unfitted = copy.deepcopy(classifier) if cross_validate else None  # a fresh one per fold
    with tqdm(total=2, desc=f"training gate ({classifier.kind})", unit="step", disable=not progress) as bar:
        classifier.fit(queries.subset(train), y[train], len(trained))
        bar.update()
        if unfitted is not None:
            scored = _cross_validated(unfitted, queries, y, len(trained), seed=seed)
        else:
            scored = _Scored(classifier.predict_logits(queries.subset(val)), y[val],
                             nearest_similarity(x[train], x[val]), "held-out")
        scored = _usable(scored, trained)
        temperature, metrics = _calibrate(scored, n_train=len(train), n_val=len(val))
        bar.update()
    similarity = fit_similarity_map(x[train], y[train], x[val], y[val], len(trained), seed=seed)
    ood_reference, ood_threshold = _fit_ood_scores(_softmax(scored.logits / temperature).max(axis=1)
                                                   if len(scored.y) else np.zeros(0), scored.similarity)
    metadata = GateMetadata(encoder.identity, encoder.checksum, training_data_sha256(texts, labels), metrics,
                            classifier=classifier.kind, unseen_experts=unseen,
                            cold_start_slope=similarity.slope, cold_start_midpoint=similarity.midpoint,
                            ood_threshold=ood_threshold, ood_reference=ood_reference)
    return Gate(encoder, experts, classifier, temperature, metadata, (x, texts, list(labels)))


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
                     seed: int) -> _Scored:
    """Every example scored by a copy of ``unfitted`` fitted on the other folds, with its cosine to their
    examples. An example is left out when its expert has no example in the other folds (it has one alone):
    the classifier would never have seen its expert, unlike every query it serves."""
    fold = cross_validation_folds(queries.texts, [str(c) for c in y], seed=seed)
    rows: list[np.ndarray] = []
    logits: list[np.ndarray] = []
    similarity: list[np.ndarray] = []
    for f in np.unique(fold):
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
    return scored


def nearest_similarity(reference: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Each query row's highest cosine to a ``reference`` row (rows L2-normalised, so a dot product)."""
    if len(reference) == 0:
        return np.full(len(queries), -1.0)
    return np.concatenate([np.zeros(0), *((queries[i:i + 1024] @ reference.T).max(axis=1)
                                           for i in range(0, len(queries), 1024))])


def _percentile(grid: Sequence[float], values: np.ndarray) -> np.ndarray:
    """Mid-rank percentile of each value among ``grid``'s points: ties count half, so a signal that saturates
    (a top probability of 1.0 on every validation query) ranks a saturated query in the middle, not at 0."""
    points = np.asarray(grid, dtype=np.float64)
    below = np.searchsorted(points, values, side="left")
    at_most = np.searchsorted(points, values, side="right")
    return np.asarray((below + at_most) / (2.0 * len(points)))


def ood_score(top_probability: np.ndarray, similarity: np.ndarray,
              reference: Sequence[Sequence[float]] | None) -> np.ndarray:
    """Familiarity in [0, 1]: the mean of the two signals' percentiles among the validation queries'
    (``reference``: their sorted grids); without ``reference``, the nearest-example cosine itself."""
    similarity = np.asarray(similarity, dtype=np.float64)
    if reference is None:
        return similarity
    top = np.asarray(top_probability, dtype=np.float64)
    return (_percentile(reference[0], top) + _percentile(reference[1], similarity)) / 2.0


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


def fit_ood_threshold(reference: np.ndarray, held_out: np.ndarray, keep: float = OOD_KEEP) -> float | None:
    """The nearest-example cosine that ``keep`` of the ``held_out`` (in-distribution) rows reach against
    ``reference``; None when either is empty. For gates scored by the cosine alone (outcome gates)."""
    if len(reference) == 0 or len(held_out) == 0:
        return None
    return float(np.quantile(nearest_similarity(reference, held_out), 1.0 - keep))


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
