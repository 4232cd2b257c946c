"""A two-stage gate: a fast gate decides the queries it is sure of, the full gate the rest.

Most queries are easy: a gate on the ``static`` encoder (one table lookup per token, well under a millisecond)
picks the same expert as the gate on the MiniLM model (milliseconds of CPU per query) whenever it is
confident. ``CascadeGate`` runs the fast gate on every query and the full gate only on the others:

- the fast gate decides a query when its top probability reaches ``threshold`` and the query is at least
  ``familiarity`` familiar to it (its ``ood_scores``);
- every other query gets the full gate's scores, explanation and out-of-distribution score, as without the
  cascade. Unfamiliar queries, out-of-scope ones among them, are the full gate's: its abstain threshold tells
  them apart better than the fast gate's.

``moe train`` fits both on the full gate's validation split, which neither gate trained on (both are trained on
the same data with the same seeded split). Each gate scores those queries from the embeddings it keeps, with
familiarity measured against the training part alone, as when its own abstain threshold was fitted.
``familiarity`` (``fit_familiarity``) is the score that ``familiar`` of the validation queries reach (default
0.9), never below the fast gate's own abstain threshold. ``threshold`` (``fit_threshold``) is then the lowest top
probability at which the cascade still picks the full gate's top expert for ``agreement`` of the validation
queries (default 99.5%, the agreement the ONNX and sentence-transformers encoders are held to). The label
suites' figures are in the README (Results, the two-stage gate).

The artifact is the full gate's folder as before, plus the fast gate in ``fast/`` and ``cascade.json`` (written
last) with the threshold and its validation figures. A config without ``gate.cascade`` serves the full gate
alone from the same folder.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from router.encoders import Encoder
from router.files import staged
from router.gate import (
    Assessment,
    Gate,
    GateArtifactMismatch,
    nearest_similarity,
    split_train_val,
    training_data_sha256,
)
from router.gate_artifact import RETRAIN, read_artifact_json

if TYPE_CHECKING:
    from router.config import RouterConfig

__all__ = ["CASCADE_FILE", "FAMILIAR_SHARE", "FAST_DIR", "CascadeFit", "CascadeGate", "CascadeNotTrained",
           "Comparison", "fit_familiarity", "fit_threshold", "forget_cascade"]

log = logging.getLogger(__name__)

CASCADE_FILE, FAST_DIR = "cascade.json", "fast"
# The share of in-distribution (validation) queries familiar enough to the fast gate for it to decide them.
FAMILIAR_SHARE = 0.9
STAGES = ("fast", "full")


class CascadeNotTrained(FileNotFoundError):
    def __init__(self, path: Path, kind: str = "label") -> None:
        if kind == "outcome":  # moe train would refuse the cascade for outcome records: say what to do instead
            super().__init__(f"the gate at {path} is an outcome gate, and gate.cascade applies to label gates "
                             "only; remove gate.cascade from the config (or train a label gate)")
        else:
            super().__init__(f"the gate at {path} has no cascade stage ({CASCADE_FILE} missing), but the config "
                             "sets gate.cascade; train it with: moe train --config <this config>")


def _kind(path: Path) -> str:
    """The kind of gate saved at ``path`` (``gate.json``'s ``kind``: label or outcome), label when unreadable
    (loading it then says what is wrong)."""
    from router.gate_artifact import GateArtifactMismatch, read_artifact_json

    try:
        doc = read_artifact_json(path / "gate.json")
    except (OSError, GateArtifactMismatch):
        return "label"
    return str(doc.get("kind", "label")) if isinstance(doc, dict) else "label"


@dataclass(frozen=True)
class CascadeFit:
    """The fitted threshold and what it gave on the validation queries."""

    # Top probability at or above which the fast gate decides; None: too little validation data to fit one,
    # so every query goes to the full gate.
    threshold: float | None
    agreement_target: float
    n_val: int
    # Share of validation queries the fast gate decided, and of all of them routed to the full gate's top expert.
    fast_share: float
    agreement: float
    fast_encoder_identity: str
    # The familiarity (the fast gate's ``ood_scores``) a query needs for the fast gate to decide it: the score
    # that ``familiar_share`` of the validation queries reach, and never below the fast gate's own
    # out-of-distribution threshold. None (artifacts from before it was fitted): that threshold alone.
    familiarity: float | None = None
    familiar_share: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read_fit(file: Path) -> CascadeFit:
    """The fitted cascade in ``file``, or ``GateArtifactMismatch`` naming it when it is corrupt or not one."""
    doc = read_artifact_json(file)
    try:
        return CascadeFit(**doc)
    except TypeError as exc:  # not an object, or keys missing or unknown
        raise GateArtifactMismatch(f"{file}: not a fitted two-stage gate ({exc}); {RETRAIN}") from None


def _decides(fast: Assessment, threshold: float | None, familiarity: float | None) -> np.ndarray:
    """Which queries the fast gate decides: confident, and at least ``familiarity`` familiar to it."""
    if threshold is None:
        return np.zeros(len(fast.probs), dtype=bool)
    sure = fast.probs.max(axis=1) >= threshold
    if familiarity is not None:
        sure &= ~(fast.ood < familiarity)  # a query without a score (nan) is not held against the fast gate
    return np.asarray(sure)


def fit_familiarity(ood: np.ndarray, share: float, floor: float | None) -> float | None:
    """The familiarity bar of the fast stage: the score that ``share`` of the validation queries' ``ood``
    reach, never below ``floor`` (the fast gate's own out-of-distribution threshold: a query it would abstain
    on is the full gate's). None when neither is known."""
    known = np.asarray(ood, dtype=np.float64)
    known = known[np.isfinite(known)]
    bars = [float(b) for b in (np.quantile(known, 1.0 - share) if len(known) else None, floor) if b is not None]
    return max(bars) if bars else None


def fit_threshold(fast: Assessment, full_top: np.ndarray, agreement: float,
                  familiarity: float | None) -> tuple[float | None, float, float]:
    """``(threshold, fast_share, agreement)``: the lowest top probability of the fast gate at which the cascade
    picks the full gate's top expert (``full_top``, column indices) for at least ``agreement`` of the queries.

    Raising the threshold only hands queries from the fast gate to the full one, so the agreement can only grow
    with it, and the lowest threshold that meets the target is the one that spares the full gate most."""
    n = len(full_top)
    eligible = _decides(fast, -np.inf, familiarity)  # familiar to the fast gate, whatever its confidence
    if n == 0 or not eligible.any():
        return None, 0.0, 1.0
    # Eligible queries by the fast gate's top probability; a threshold at one of them lets the fast gate decide
    # it and every query after it, so the disagreements it lets through are a suffix sum.
    sureness = fast.probs.max(axis=1)[eligible]
    order = np.argsort(sureness, kind="stable")
    top = sureness[order]
    differs = (fast.probs.argmax(axis=1) != full_top)[eligible][order]
    let_through = np.cumsum(differs[::-1])[::-1]
    starts = np.flatnonzero(np.r_[True, top[1:] != top[:-1]])  # the first query of each distinct value
    met = 1.0 - let_through[starts] / n
    ok = np.flatnonzero(met >= agreement)
    if len(ok) == 0:
        return None, 0.0, 1.0
    first = starts[ok[0]]
    return float(top[first]), float(len(top) - first) / n, float(met[ok[0]])


@dataclass(frozen=True)
class Comparison:
    """A cascade's assessment of some queries (``cascade``) beside its full gate's alone (``full``)."""

    cascade: Assessment
    full: Assessment

    @property
    def fast_share(self) -> float:
        """Share of the queries the fast stage decided."""
        stages = self.cascade.stage or []
        return stages.count(STAGES[0]) / max(len(stages), 1)

    @property
    def agreement(self) -> float:
        """Share of the queries where the cascade's top expert is the full gate's."""
        return float((self.cascade.probs.argmax(axis=1) == self.full.probs.argmax(axis=1)).mean())


def forget_cascade(directory: str | Path) -> None:
    """Remove a cascade's fast stage from an artifact folder (once a one-stage gate is saved there)."""
    path = Path(directory)
    (path / CASCADE_FILE).unlink(missing_ok=True)
    shutil.rmtree(path / FAST_DIR, ignore_errors=True)


class CascadeGate:
    """``fast`` decides the queries it is sure of (see the module docstring), ``full`` the rest. Serves as a
    gate: ``experts``, ``encoder`` (the full gate's, for what else embeds: ``consensus``), ``assess``."""

    kind = "cascade"

    def __init__(self, fast: Gate, full: Gate, fit: CascadeFit) -> None:
        if fast.experts != full.experts:
            raise GateArtifactMismatch(f"the cascade's fast gate scores {fast.experts}, its full gate "
                                       f"{full.experts}; retrain both with moe train")
        self.fast, self.full, self.fit = fast, full, fit
        self.experts = full.experts
        self.encoder = full.encoder
        self.metadata = full.metadata
        self.ood_threshold = full.ood_threshold

    @property
    def private_texts(self) -> frozenset[str]:
        """The examples only feedback gave, of both stages (they train on the same data)."""
        return self.full.private_texts | self.fast.private_texts

    @property
    def familiarity(self) -> float | None:
        """The familiarity a query needs for the fast stage to decide it (``CascadeFit.familiarity``)."""
        return self.fast.ood_threshold if self.fit.familiarity is None else self.fit.familiarity

    def decides(self, fast: Assessment) -> np.ndarray:
        """Per query of the fast gate's ``fast`` assessment (with familiarity: ``assess`` with ``k >= 1``),
        whether the fast stage decides it. A query it would route to an expert scored from config examples (cold
        start) is the full gate's: its claims are the better judge, and the familiarity it is judged by is that
        expert's examples', not the trained data the threshold was fitted on."""
        decided = _decides(fast, self.fit.threshold, self.familiarity)
        cold = self.fast.cold_start_experts
        if cold and len(fast.probs):
            decided &= ~np.isin(np.asarray(self.fast.experts)[fast.probs.argmax(axis=1)], cold)
        return decided

    def predict_proba(self, embeddings: np.ndarray, texts: Sequence[str] | None = None) -> np.ndarray:
        """The full gate's probabilities for its own encoder's ``embeddings`` (what a plain gate would give)."""
        return self.full.predict_proba(embeddings, texts)

    def nearest(self, embedding: np.ndarray, k: int = 3) -> list[Any]:
        return list(self.full.nearest(embedding, k))

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        return self.assess(texts, k=0).probs

    def assess(self, texts: Sequence[str], k: int = 3) -> Assessment:
        """The fast gate's assessment of every query, replaced by the full gate's where the fast one is unsure.
        ``k=0`` leaves out the explanations; the fast stage still searches its nearest example, since it decides
        only queries familiar to it."""
        texts = list(texts)
        first = self.fast.assess(texts, max(k, 1))
        rest = np.flatnonzero(~self.decides(first))
        return self.merge(first, self.full.assess([texts[i] for i in rest], k), k)

    def merge(self, first: Assessment, second: Assessment, k: int = 3) -> Assessment:
        """The cascade's assessment from the fast gate's ``first`` (with familiarity) and the full gate's
        ``second`` of exactly the queries the fast stage leaves, in order; ``k`` nearest examples each."""
        decided = self.decides(first)
        stage = np.where(decided, STAGES[0], STAGES[1]).tolist()
        ood_threshold = [self.fast.ood_threshold if d else self.full.ood_threshold for d in decided]
        rest = np.flatnonzero(~decided)
        nearest = [near[:k] for near in first.nearest]
        probs, ood = first.probs.copy(), first.ood.astype(np.float64)
        if len(rest):
            probs[rest], ood[rest] = second.probs, second.ood
            for j, i in enumerate(rest):
                nearest[i] = second.nearest[j]
        return Assessment(probs, nearest, ood, stage, ood_threshold)

    def with_targets(self, *, agreement: float, familiar: float) -> CascadeGate:
        """This cascade fitted for ``agreement`` and ``familiar`` (``gate.cascade``): itself when its fit was made
        for them, else both bars fitted again on the validation split of the training data the artifact keeps.
        Neither gate is retrained and nothing is embedded, so changing either target needs no ``moe train``
        (which writes the new fit into the artifact)."""
        if (self.fit.agreement_target, self.fit.familiar_share) == (agreement, familiar):
            return self
        texts, labels = self.full.training_examples
        if training_data_sha256(texts, labels) != self.full.metadata.training_data_sha256:
            raise GateArtifactMismatch("the gate artifact's examples are not its training data, so the cascade "
                                       f"cannot be fitted again for agreement {agreement} and familiar "
                                       f"{familiar}; retrain with: moe train --config <this config>")
        refit = CascadeGate.train(self.full, self.fast, texts, labels, agreement=agreement, familiar=familiar,
                                  pinned=self.full.pinned_texts)
        log.info("gate.cascade asks for agreement %g and familiar %g, the artifact was fitted for %g and %s: "
                 "fitted again on its validation split (threshold %s, familiarity bar %s; moe train saves it)",
                 agreement, familiar, self.fit.agreement_target, self.fit.familiar_share, refit.fit.threshold,
                 refit.fit.familiarity)
        return refit

    def compare(self, texts: Sequence[str]) -> Comparison:
        """This gate's and the full gate's assessments of the same queries, side by side."""
        return Comparison(self.assess(texts), self.full.assess(texts))

    # -- the config's experts, artifacts ---------------------------------------------------------------------
    def for_experts(self, examples: Mapping[str, Sequence[str]]) -> CascadeGate:
        """Both stages over exactly these experts (``Gate.for_experts``: cold start from examples, no retraining)."""
        return CascadeGate(self.fast.for_experts(examples), self.full.for_experts(examples), self.fit)

    def for_config(self, config: RouterConfig) -> CascadeGate:
        return self.for_experts(config.routed_examples())

    def save(self, directory: str | Path) -> Path:
        """The full gate's artifact, the fast gate in ``fast/``, and ``cascade.json``, written in a staging folder
        and renamed into ``directory``, ``cascade.json`` last (``router.files.staged``)."""
        with staged(directory) as stage:
            self.full.save(stage)
            self.fast.save(stage / FAST_DIR)
            (stage / CASCADE_FILE).write_text(json.dumps(self.fit.as_dict(), indent=2) + "\n", encoding="utf-8")
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path, fast_encoder: Encoder, full_encoder: Encoder) -> CascadeGate:
        path = Path(directory)
        if not (path / CASCADE_FILE).exists():
            raise CascadeNotTrained(path, _kind(path))
        fit = _read_fit(path / CASCADE_FILE)
        fast, full = Gate.load(path / FAST_DIR, fast_encoder), Gate.load(path, full_encoder)
        if fast.metadata.training_data_sha256 != full.metadata.training_data_sha256:
            raise GateArtifactMismatch(f"{path}: the cascade's fast gate ({FAST_DIR}/) was trained on other data "
                                       "than the full gate; retrain both with: moe train --config <this config>")
        return cls(fast, full, fit)

    @classmethod
    def train(cls, full: Gate, fast: Gate, texts: Sequence[str], labels: Sequence[str], *, agreement: float,
              familiar: float = FAMILIAR_SHARE, seed: int = 0, val_fraction: float = 0.15,
              pinned: Collection[str] = ()) -> CascadeGate:
        """The cascade of two gates trained on ``texts`` and ``labels`` with the same ``seed`` and
        ``val_fraction``, ``pinned`` and ``refit=False`` (so the same validation queries were held out of both,
        however few), fitted on those queries.

        Each gate scores them as it scored them when it was fitted: from the embeddings it keeps of its training
        data, and with familiarity measured against the training part alone (the gate's example index also
        holds the validation queries, so each would find itself). First the familiarity bar
        (``fit_familiarity``: the score ``familiar`` of them reach), then the lowest confidence threshold that
        meets ``agreement`` among the queries that clear the bar (``fit_threshold``)."""
        texts = list(texts)
        train, val = split_train_val(texts, labels, seed=seed, val_fraction=val_fraction, pinned=pinned)
        first = _held_out(fast, texts, train, val)
        full_top = _held_out(full, texts, train, val, familiarity=False).probs.argmax(axis=1)
        bar = fit_familiarity(first.ood, familiar, fast.ood_threshold)
        threshold, share, met = fit_threshold(first, full_top, agreement, bar)
        if threshold is None:
            log.warning("the cascade's threshold could not be fitted (%d validation queries): every query will "
                        "go to the full gate", len(val))
        fit = CascadeFit(threshold, agreement, len(val), share, met, fast.encoder.identity, bar, familiar)
        return cls(fast, full, fit)


def _held_out(gate: Gate, texts: list[str], train: np.ndarray, val: np.ndarray, *,
              familiarity: bool = True) -> Assessment:
    """``gate``'s probabilities for the validation queries ``texts[val]`` and (``familiarity``) their
    ``ood_scores`` against the training part ``texts[train]``, from the embeddings the gate keeps when they are
    these texts' (``train_gate`` keeps them in order), else embedded again."""
    n = len(texts)
    kept = gate.example_texts[:n] == texts and len(gate.example_embeddings) >= n
    x = gate.example_embeddings[:n] if kept else gate.encoder.encode(texts)
    held = [texts[i] for i in val]
    probs = gate.predict_proba(x[val], held) if len(val) else np.zeros((0, len(gate.experts)))
    ood = np.full(len(val), np.nan)
    if familiarity and len(val):
        ood = gate.ood_scores(probs, nearest_similarity(x[train], x[val]))
    return Assessment(np.asarray(probs), [[] for _ in held], np.asarray(ood, dtype=np.float64))
