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

Two kinds of gate share this class's serving surface (``BaseGate``: ``experts``, ``predict_proba``, ``nearest``,
and ``assess`` built on them):
``Gate`` (``kind = "label"``) learns from labelled queries; ``router.outcome_gate.OutcomeGate``
(``kind = "outcome"``) from outcome records. The artifact's ``kind`` picks the class ``Gate.load`` restores.

The artifact (``Gate.save``, ``Gate.load``: a folder of ``gate.json`` and two ``.npz`` files, checked by sha256
on load) is ``router.gate_artifact``'s, which describes the format.

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

Calibration (the temperature, the OOD grids and the threshold, fitted on held-out or cross-validated queries)
is part of training: ``router.gate_train``'s docstring, "Calibration".

This module is the serving side: the ``Gate`` object and what a query needs at run time. It re-exports the
names that moved to ``router.gate_artifact`` (imported as this module loads: that module imports nothing of this
one) and ``router.gate_train`` (imported when one of its names is first asked for, since it builds on this
module), so ``from router.gate import train_gate`` and every other import of them still works.
"""

from __future__ import annotations

import copy
import importlib
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from router.classifiers import CLASSIFIERS, Classifier, LogisticClassifier, Queries
from router.coldstart import Columns, plan_columns
from router.encoders import Encoder
from router.gate_artifact import (
    FORMAT_VERSION,  # noqa: F401  (this and the other noqa names: re-exported for modules that import them here)
    GATE_KINDS,
    READABLE_FORMAT_VERSIONS,  # noqa: F401
    TASK_PRIOR_FORMAT_VERSION,  # noqa: F401
    GateArtifactMismatch,
    GateMetadata,
    ValidationMetrics,
    claim_map_of,
    read_artifact,
    write_artifact,
)
from router.search import flat_ip_index

if TYPE_CHECKING:
    from router.config import RouterConfig
    from router.gate_train import (  # the names of _TRAINING_NAMES, for mypy
        CALIBRATION,  # noqa: F401
        CV_FOLDS,  # noqa: F401
        OOD_GRID,  # noqa: F401
        OOD_KEEP,  # noqa: F401
        conflicting_labels,  # noqa: F401
        cross_validation_folds,
        embed_texts,
        expected_calibration_error,
        fit_ood,
        fit_temperature,
        nearest_similarity,
        split_train_val,
        train_gate,
        training_data_sha256,
    )

__all__ = [
    "CLASSIFIERS",
    "GATE_KINDS",
    "UNSEEN_PRIOR",
    "Assessment",
    "BaseGate",
    "Classifier",
    "EncoderLike",
    "Gate",
    "GateArtifactMismatch",
    "GateMetadata",
    "LogisticClassifier",
    "Neighbour",
    "Queries",
    "ValidationMetrics",
    "cross_validation_folds",
    "embed_texts",
    "expected_calibration_error",
    "fit_ood",
    "fit_temperature",
    "nearest_similarity",
    "ood_score",
    "respelled",
    "spelled_alike",
    "split_train_val",
    "text_key",
    "train_gate",
    "training_data_sha256",
]

UNSEEN_PRIOR = 1e-3

# Names router.gate_train holds and this module re-exports on first use (PEP 562): importing it here at load time
# would be a cycle, since it imports this module for ``Gate``. Hidden from mypy, which reads the imports above.
_TRAINING_NAMES = frozenset({
    "CALIBRATION", "CV_FOLDS", "OOD_GRID", "OOD_KEEP", "conflicting_labels", "cross_validation_folds", "embed_texts",
    "expected_calibration_error", "fit_ood", "fit_temperature", "nearest_similarity",
    "split_train_val", "train_gate", "training_data_sha256",
})

if not TYPE_CHECKING:
    def __getattr__(name: str) -> Any:
        if name not in _TRAINING_NAMES:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module("router.gate_train"), name)
        globals()[name] = value  # once imported, a plain attribute
        return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_TRAINING_NAMES})


@dataclass(frozen=True)
class Neighbour:
    text: str
    label: str
    similarity: float  # cosine, since embeddings are L2-normalised


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


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

    @classmethod
    def joined(cls, parts: Sequence[Assessment]) -> Assessment:
        """One assessment of the queries of ``parts`` (one gate's, each), in order."""
        def listed(field: str) -> list[Any] | None:
            lists = [getattr(p, field) for p in parts]
            return None if any(x is None for x in lists) else [x for one in lists for x in one]

        return cls(np.concatenate([p.probs for p in parts]), [near for p in parts for near in p.nearest],
                   np.concatenate([p.ood for p in parts]), listed("stage"), listed("ood_threshold"), listed("tasks"))

    def rows(self, indices: Sequence[int] | np.ndarray) -> Assessment:
        """The assessment of the queries at ``indices`` alone, in that order."""
        picked = [int(i) for i in indices]
        return Assessment(self.probs[picked], [self.nearest[i] for i in picked], self.ood[picked],
                          None if self.stage is None else [self.stage[i] for i in picked],
                          None if self.ood_threshold is None else [self.ood_threshold[i] for i in picked],
                          None if self.tasks is None else [self.tasks[i] for i in picked])



class EncoderLike(Protocol):
    """What a gate needs of its encoder: ``router.encoders.Encoder``, or anything else that embeds texts."""

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


class BaseGate(ABC):
    """A gate's serving contract, in the manner of RouteLLM's ``Router``: a gate gives each query a probability
    per expert (``predict_proba``, its columns in ``experts`` order) and its nearest labelled examples
    (``nearest``); ``assess``, what the orchestrator decides from, is written once, here, on top of them.

    A gate overrides ``nearest_many`` to search for a batch at once, ``ood_scores`` for a familiarity score beyond
    the nearest example's cosine, ``task_probabilities`` to explain a decision by task, and ``ood_threshold`` to
    abstain (None: never)."""

    experts: list[str]
    encoder: EncoderLike
    # Examples only clients' feedback gave (``router.train``): a decision names their label and similarity, never
    # their text. A gate without examples has none.
    private_texts: frozenset[str] = frozenset()
    # Examples never held out of training (``split_train_val``'s ``pinned``: feedback's verdicts), kept so that a
    # two-stage gate fitted again from the artifact (``CascadeGate.with_targets``) holds out what its stages did.
    pinned_texts: frozenset[str] = frozenset()

    @abstractmethod
    def predict_proba(self, embeddings: np.ndarray, texts: Sequence[str] | None = None) -> np.ndarray:
        """``[q, len(experts)]`` rows summing to 1; ``texts`` are the queries behind ``embeddings``."""

    @abstractmethod
    def nearest(self, embedding: np.ndarray, k: int = 3) -> Sequence[Any]:
        """The ``k`` labelled examples most similar to one embedding, most similar first (each with a
        ``similarity``)."""

    @property
    def ood_threshold(self) -> float | None:
        return None

    def nearest_many(self, embeddings: np.ndarray, k: int = 3) -> Sequence[Sequence[Any]]:
        return [self.nearest(e, k) for e in embeddings]

    def ood_scores(self, proba: np.ndarray, nearest_similarity: np.ndarray,
                   embeddings: np.ndarray | None = None, top: np.ndarray | None = None) -> np.ndarray:
        """Familiarity per query, compared with ``ood_threshold``: here the nearest example's cosine.
        ``embeddings``: the queries', for a gate whose familiarity reads more than the nearest example; ``top``:
        the top probability to judge, where it is not ``proba``'s (``_scored_and_explained``)."""
        return nearest_similarity

    def task_probabilities(self, embeddings: np.ndarray, top: int = 3) -> list[dict[str, float]] | None:
        """Per query, its likeliest tasks and their probabilities, where the gate knows tasks; else None."""
        return None

    def _scored_and_explained(self, embeddings: np.ndarray, texts: Sequence[str],
                              k: int) -> tuple[np.ndarray, Sequence[Sequence[Any]], np.ndarray | None]:
        """``assess``'s probabilities, ``k`` nearest examples, and the top probability its familiarity judges
        (None: ``ood_scores`` reads it from the probabilities); a gate whose probabilities read the example search
        overrides it to search once for both."""
        return np.asarray(self.predict_proba(embeddings, texts)), self.nearest_many(embeddings, k), None

    def assess(self, texts: Sequence[str], k: int = 3) -> Assessment:
        """One embedding per query serves the probabilities, the ``k`` nearest examples and the familiarity
        score; ``k=0``: the probabilities alone (familiarity unknown, nan), with no example search unless the
        probabilities need one (a label gate's cold-start claims read the nearest trained example)."""
        embeddings = self.encoder.encode(texts)
        if k == 0:
            probs = np.asarray(self.predict_proba(embeddings, texts))
            return Assessment(probs, [[] for _ in texts], np.full(len(texts), np.nan))
        probs, nearest, top = self._scored_and_explained(embeddings, texts, k)
        similarity = np.array([_similarity(near[0]) if near else np.nan for near in nearest], dtype=np.float64)
        return Assessment(probs, [list(near) for near in nearest],
                          np.asarray(self.ood_scores(probs, similarity, embeddings, top), dtype=np.float64),
                          tasks=self.task_probabilities(embeddings))


# --- the gate ---------------------------------------------------------------------------------------------

class Gate(BaseGate):
    """Scores experts for queries. Columns of every probability row follow ``experts``."""

    kind: ClassVar[str] = "label"
    encoder: Encoder

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
    def cold_start_experts(self) -> list[str]:
        """The config's experts this view scores from their examples (``for_experts``), in config order."""
        cold = self._columns.cold if self._columns is not None else None
        return [] if cold is None else list(cold.names)

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
        if self._columns is None:
            return proba
        trained = self._trained_similarity(*self._search(x, self._cold_k(1))) if self._columns.reads_trained \
            else None
        return self._columns.apply(proba, x, trained)

    def _scored_and_explained(self, embeddings: np.ndarray, texts: Sequence[str],
                              k: int) -> tuple[np.ndarray, list[list[Neighbour]], np.ndarray | None]:
        """One example search serves both where the cold-start claims read the nearest trained example. A view
        over the config's experts (``for_experts``) gives its familiarity the artifact's own top probability
        (``Columns.familiarity_top``)."""
        x = np.atleast_2d(np.asarray(embeddings, dtype=np.float32))
        artifact = self._artifact_proba(x, texts)
        if self._columns is None:
            return artifact, self.nearest_many(x, k), None
        if self._columns.reads_trained:
            sims, ids = self._search(x, self._cold_k(k))
            probs = self._columns.apply(artifact, x, self._trained_similarity(sims, ids))
            nearest = self._neighbours(sims[:, :k], ids[:, :k])
        else:
            probs, nearest = self._columns.apply(artifact, x), self.nearest_many(x, k)
        return probs, nearest, self._columns.familiarity_top(artifact, probs)

    def _cold_k(self, k: int) -> int:
        """How many nearest examples to search for so that ``k`` of them, and the nearest trained one, are
        among them: the config's cold-start examples can come first."""
        cold = self._columns.cold if self._columns is not None else None
        return k + (0 if cold is None else len(cold.owner))

    def _trained_similarity(self, sims: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Per query, the cosine to its nearest example of a trained expert (``_search``'s results, sorted;
        -1 where none was found). The artifact's examples come before the config's cold-start ones."""
        trained = (ids >= 0) & (ids < self._n_artifact_examples)
        first = trained.argmax(axis=1)
        return np.where(trained.any(axis=1), sims[np.arange(len(ids)), first], -1.0)

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        return self.predict_proba(self.encoder.encode(texts), list(texts))

    @property
    def ood_threshold(self) -> float | None:
        return self.metadata.ood_threshold

    def ood_scores(self, proba: np.ndarray, nearest_similarity: np.ndarray,
                   embeddings: np.ndarray | None = None, top: np.ndarray | None = None) -> np.ndarray:
        """Familiarity per query (higher: more like the training data), compared with ``ood_threshold``.

        ``proba`` is ``predict_proba``'s output for the queries, ``nearest_similarity`` their cosine to the
        nearest example (``nearest_many``), ``embeddings`` the queries' own (``assess`` passes them).

        A query whose top pick is an expert scored from config examples (cold start) is judged by how near that
        expert's examples it lies, against the grid of how near them its own queries lie (``ClaimMap.familiar``,
        for its number of examples, from the cold starts simulated in training), in place of its nearest
        example against the trained data's grid: a newcomer's queries are unlike the trained data and near only
        a handful of examples, so that grid would abstain on most of them. Without ``embeddings``, or for a gate
        whose map has no such grids (an older artifact), the trained data's grid judges every query.

        The top probability compared with the grid is ``top`` where given: ``assess`` gives, for a view over the
        config's experts, the artifact's own probability for the kept trained experts or a cold-start expert's,
        whichever is larger (``Columns.familiarity_top``). The view renormalises the trained experts it keeps, so
        with one of them kept its probability is 1 for every query, and nothing would be out of scope (a query
        of a removed expert's domain is out of this deployment's scope, and is judged so). Without ``top``, with
        experts scored from config examples (cold start), it is the larger of the row's own and the trained
        experts' share of the row renormalised: the probability the grid was fitted on, when no trained expert
        was removed. The cold-start claims scale every trained column down by ``1 - R``, so the row's top alone
        would make each query less familiar for every expert added, and abstain on more of the queries the
        trained experts already served (and of the new expert's own) than without it."""
        proba = np.asarray(proba)
        top = self._familiarity_top(proba) if top is None else np.asarray(top)
        reference = self.metadata.ood_reference
        cold = self._columns.cold if self._columns is not None else None
        if embeddings is None or cold is None or reference is None or cold.claim_map.familiar is None \
                or len(proba) == 0:
            return ood_score(top, nearest_similarity, reference)
        similarity = _percentile(reference[1], nearest_similarity)
        picked = proba.argmax(axis=1)
        x = np.atleast_2d(np.asarray(embeddings, dtype=np.float32))
        for j, count in enumerate(cold.counts):
            mine = picked == self.experts.index(cold.names[j])
            if mine.any():
                grid = cold.claim_map.familiar_grid(int(count))
                assert grid is not None  # familiar is set, so every row has a grid
                similarity[mine] = _percentile(grid, cold.similarities(x[mine])[:, j])
        return (_percentile(reference[0], top) + similarity) / 2.0

    def _familiarity_top(self, proba: np.ndarray) -> np.ndarray:
        """The top probability ``ood_scores`` compares with its grid (see there)."""
        top = proba.max(axis=1) if proba.shape[1] else np.zeros(len(proba))
        if self._columns is None or self._columns.cold is None or len(proba) == 0:
            return top
        trained = proba[:, self._columns.source >= 0]
        if trained.shape[1] == 0:
            return top
        total = trained.sum(axis=1)
        share = np.divide(trained.max(axis=1), total, out=np.zeros_like(total), where=total > 0)
        return np.maximum(top, share)

    def nearest(self, embedding: np.ndarray, k: int = 3) -> list[Neighbour]:
        """The ``k`` labelled examples most similar to one embedding, most similar first."""
        return self.nearest_many(np.asarray(embedding).reshape(1, -1), k)[0]

    def nearest_many(self, embeddings: np.ndarray, k: int = 3) -> list[list[Neighbour]]:
        """``nearest`` for each row of ``[q, dim]`` embeddings, in one index search."""
        return self._neighbours(*self._search(embeddings, k))

    def _search(self, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``[q, k]`` cosines to the nearest examples the searches see, most similar first, and their example
        numbers (-1 past the last)."""
        rows = np.arange(len(self.example_texts)) if self._rows is None else self._rows
        if self._index is None:
            self._index = flat_ip_index(self.example_embeddings[rows])
        queries = np.ascontiguousarray(np.atleast_2d(np.asarray(embeddings, dtype=np.float32)))
        sims, ids = self._index.search(queries, min(k, len(rows)))
        return sims, np.where(ids >= 0, rows[np.maximum(ids, 0)], -1)

    def _neighbours(self, sims: np.ndarray, ids: np.ndarray) -> list[list[Neighbour]]:
        return [[Neighbour(self.example_texts[i], self.example_labels[i], float(s))
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
        # One example given twice (or in another case or spacing, which the uncased model reads alike) is one:
        # counted twice, it made the expert read as better covered than it is, and it took fewer of its queries.
        cold = {n: _distinct(examples[n]) for n in names if n not in trained}
        embedded = {n: self.encoder.encode(texts) for n, texts in cold.items()}
        wanted = {n: embedded.get(n, np.zeros((0, self.encoder.dim), dtype=np.float32)) for n in names}
        view = copy.copy(self)
        view.experts = names
        claim_map = claim_map_of(self.metadata)
        view._columns = plan_columns(self.artifact_experts, self.trained_experts, wanted, claim_map,
                                     self._lifted(names) if cold and claim_map.reads_trained else None)
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

    def _lifted(self, routed: Sequence[str]) -> tuple[np.ndarray, np.ndarray] | None:
        """The examples of the routed trained experts whose ``t`` the claims lift, and each one's lift
        (``metadata.cold_start_offsets``); None when there are none."""
        offsets = {e: o for e, o in (self.metadata.cold_start_offsets or {}).items() if e in routed and o > 0}
        rows = [i for i, label in enumerate(self.example_labels[:self._n_artifact_examples]) if label in offsets]
        if not rows:
            return None
        return (np.asarray(self.example_embeddings[rows], dtype=np.float32),
                np.array([offsets[self.example_labels[i]] for i in rows], dtype=np.float64))

    def for_config(self, config: RouterConfig) -> Gate:
        """The gate over the config's experts (see ``for_experts``); outcome gates also take its cost weight."""
        return self.for_experts(config.routed_examples())

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
        """Write the artifact folder (staged, then renamed into place, ``gate.json`` last), so a folder holding
        ``gate.json`` is complete.

        What is saved is what was trained: the artifact's experts and examples, never a config's view.
        """
        return write_artifact(self, directory)

    @classmethod
    def load(cls, directory: str | Path, encoder: Encoder) -> Gate:
        """Read an artifact of either kind for ``encoder``; raise ``GateArtifactMismatch`` if it was trained
        with another encoder or ``max_length``, or its files (``gate.json`` included) were edited or are corrupt.

        The artifact's ``kind``, not ``cls``, picks the class restored (``GATE_KINDS``)."""
        return read_artifact(directory, encoder)


def _similarity(neighbour: Any) -> float:
    return float(neighbour["similarity"] if isinstance(neighbour, Mapping) else neighbour.similarity)


def text_key(text: str) -> str:
    """A label as a person reads it, and a query as the encoder reads it, near enough: Unicode composed (NFC), case
    folded (MiniLM's tokenizer is uncased), spaces collapsed, and the characters no one sees left out (control and
    format characters: a zero-width space, a byte-order mark, a soft hyphen, which exports leave in a label and the
    tokenizer drops). Two queries with the same key embed alike."""
    text = " ".join(text.split())  # whitespace first: what is left unprintable then is one of those
    if not text.isprintable():  # the fast path: most texts hold none of them
        text = " ".join("".join(c for c in text if c.isprintable()).split())
    return " ".join(unicodedata.normalize("NFC", text).casefold().split())


def spelled_alike(names: Iterable[str]) -> list[list[str]]:
    """The groups of ``names`` (in their order) that share one ``text_key``: one name written two ways, or two
    names a reader tells apart by case alone."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(text_key(name), []).append(name)
    return [group for group in groups.values() if len(group) > 1]


def respelled(names: Iterable[str], among: Iterable[str]) -> dict[str, str]:
    """Each of ``names`` that ``among`` writes another way (the same ``text_key``), with ``among``'s spelling."""
    by_key = {text_key(other): other for other in among}
    return {name: by_key[text_key(name)] for name in names if text_key(name) in by_key}


def _distinct(texts: Sequence[str]) -> list[str]:
    """``texts`` without repeats: the first of those with one ``text_key``."""
    first: dict[str, str] = {}
    for text in texts:
        first.setdefault(text_key(text), text)
    return list(first.values())


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


_TIE_TOLERANCE = 1e-12  # ``_percentile``: a few float64 ulps of 1.0, far below any real difference of two scores


def _percentile(grid: Sequence[float], values: np.ndarray) -> np.ndarray:
    """Mid-rank percentile of each value among ``grid``'s points: ties count half, so a signal that saturates
    (a top probability of 1.0 on every validation query) ranks a saturated query in the middle, not at 0.
    Values within ``_TIE_TOLERANCE`` of a point tie with it: a saturated probability that rounding left at
    0.9999999999999999 (renormalised, or rescaled by a cold-start expert's claim) is as saturated as 1.0,
    and ranking it below every tie would move it from the middle to the bottom of a saturated grid."""
    points = np.asarray(grid, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    below = np.searchsorted(points, values - _TIE_TOLERANCE, side="left")
    at_most = np.searchsorted(points, values + _TIE_TOLERANCE, side="right")
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
