"""The gate artifact: the folder ``Gate.save`` writes and ``Gate.load`` reads, and the manifest schema it holds.

An artifact is a folder: ``gate.json`` (renamed into place last, so its presence means the folder is complete) and two
``.npz`` files, read with ``allow_pickle=False``. ``gate.json`` holds the sha256 of each ``.npz`` file and of
its own contents (``manifest_sha256``), so ``Gate.load`` refuses an artifact edited after it was saved. It also
refuses an encoder other than the one the gate was trained with, or one reading another number of tokens per
text (``encoder_max_length``), since its vectors would land in a different space. Artifacts saved before
either field existed load without that check. The artifact's ``kind`` picks the class that restores it
(``GATE_KINDS``); its ``format_version`` says which code can read it.

Why apart from ``router.gate``: the format is a contract with every artifact already on disk, and it changes
for other reasons (and far less often) than serving does. This module is the bottom of the gate's modules: it
imports neither ``router.gate`` nor ``router.gate_train`` at run time (``GateMetadata`` and ``ValidationMetrics``,
the manifest's schema, live here so it need not), and resolves a gate's class by name from ``GATE_KINDS`` only
when it loads one. ``router.gate`` re-exports its public names.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from router.classifiers import EnsembleClassifier, pack_strings, unpack_strings
from router.coldstart import ClaimMap, SimilarityMap
from router.encoders import Encoder, sha256_file
from router.files import staged

if TYPE_CHECKING:
    from router.gate import Gate

__all__ = [
    "ARTIFACT_FILES",
    "FORMAT_VERSION",
    "GATE_KINDS",
    "READABLE_FORMAT_VERSIONS",
    "RETRAIN",
    "TASK_PRIOR_FORMAT_VERSION",
    "GateArtifactMismatch",
    "GateMetadata",
    "ValidationMetrics",
    "claim_map_of",
    "is_trained",
    "read_artifact",
    "read_artifact_json",
    "write_artifact",
]

FORMAT_VERSION = 1
# An outcome gate whose success model shrinks toward a task prior is written as format 2: code from before task
# priors would load it without the prior and route differently, so it must refuse it, and it refuses any format
# but 1. Every other gate is still format 1, readable by that code.
TASK_PRIOR_FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (FORMAT_VERSION, TASK_PRIOR_FORMAT_VERSION)


class GateArtifactMismatch(ValueError):
    """A saved gate does not fit what it is loaded with (encoder, expert list or file contents), or its files
    cannot be read as a gate artifact (corrupt, truncated, or something else)."""

@dataclass(frozen=True)
class ValidationMetrics:
    """What a gate was trained and calibrated on, and how its calibration went. Its fields are fixed for format 1:
    the code of earlier releases refuses a ``metrics`` key it does not know, so a figure added since goes beside
    it in ``GateMetadata`` (whose unknown keys every release ignores); this code ignores unknown ones here too.

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
    # Mean recorded cost per query of the routed expert; None when some pick has no recorded cost (the gate
    # counts those as free, so a mean over the others would be theirs alone).
    routed_cost: float | None = None
    best_single: str | None = None
    best_single_accuracy: float | None = None
    oracle_accuracy: float | None = None
    # Label gates: one of router.gate_train.CALIBRATION, and how many queries it rests on. None: not recorded
    # (outcome gates, calibrated out of fold as router.outcome_gate describes; artifacts from before these fields).
    calibration: str | None = None
    n_calibration: int | None = None

@dataclass(frozen=True)
class GateMetadata:
    encoder_identity: str
    encoder_checksum: str
    training_data_sha256: str
    metrics: ValidationMetrics
    classifier: str = EnsembleClassifier.kind
    # Label gates: the ``gate.balance`` the classifier was fitted with; None: an outcome gate, or an artifact from
    # before this field (whose arrays still encode it).
    balance: str | None = None
    unseen_experts: list[str] = field(default_factory=list)
    kind: str = "label"
    # How experts scored from their config examples claim a query (router.coldstart): ``ClaimMap`` rows
    # ``[count, w_s, w_t, bias]`` where fitted; None (outcome gates, older artifacts): the s-only
    # ``SimilarityMap`` below, which label gates still write for routers that read no other.
    cold_start_slope: float = SimilarityMap.slope
    cold_start_midpoint: float = SimilarityMap.midpoint
    cold_start_claims: list[list[float]] | None = None
    # Per row of ``cold_start_claims``, the percentile grid of a newcomer's own queries' cosine to its examples:
    # what the abstain judges a query routed to a cold-start expert by. None: the trained data's grid.
    cold_start_familiar: list[list[float]] | None = None
    # Trained experts whose nearest-example cosine a cold-start claim lifts (few examples:
    # ``router.coldstart._offsets``), and by how much. None: none.
    cold_start_offsets: dict[str, float] | None = None
    # ``ood_scores`` below this are out of distribution; None: never abstain.
    ood_threshold: float | None = None
    # Percentile grids (router.gate_train.OOD_GRID points each) of the validation queries' [top probability,
    # nearest cosine]; None: ``ood_scores`` is the nearest cosine alone.
    ood_reference: list[list[float]] | None = None
    # Feedback verdicts folded into the training data by ``moe train``, and when the newest was given (ISO 8601,
    # UTC; None: none): which verdicts this gate has seen.
    feedback_verdicts: int = 0
    feedback_through: str | None = None
    # Outcome gates: the share of top-1 picks (as ``metrics.routed_cost`` scores them) with no recorded cost;
    # ``routed_cost`` is None when it is above 0. None: a label gate, or an artifact from before this field.
    uncosted_pick_share: float | None = None
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    format_version: int = FORMAT_VERSION

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data, ``metrics`` included as a dict."""
        return asdict(self)


def _check_offsets(offsets: Any, experts: Sequence[str]) -> None:
    """``cold_start_offsets`` must map artifact experts to finite, non-negative numbers."""
    if offsets is None:
        return
    if not isinstance(offsets, dict) or not all(
            k in experts and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
            for k, v in offsets.items()):
        raise ValueError(f"offsets must map the artifact's experts to finite numbers >= 0, got {offsets!r}")


def claim_map_of(metadata: GateMetadata) -> ClaimMap:
    """How the gate's cold-start experts claim queries: the fitted ``ClaimMap``, else the s-only map."""
    if metadata.cold_start_claims is not None:
        return ClaimMap.from_list(metadata.cold_start_claims, metadata.cold_start_familiar)
    return ClaimMap.from_similarity(SimilarityMap(metadata.cold_start_slope, metadata.cold_start_midpoint))

# The class that restores each kind of artifact, as "module:name" (imported when such an artifact is loaded).
GATE_KINDS: dict[str, str] = {
    "label": "router.gate:Gate",
    "outcome": "router.outcome_gate:OutcomeGate",
}
_METADATA_FIELDS = frozenset(GateMetadata.__dataclass_fields__)
_METRIC_FIELDS = frozenset(ValidationMetrics.__dataclass_fields__)
_MANIFEST, _WEIGHTS, _EXAMPLES = "gate.json", "weights.npz", "examples.npz"
# An artifact folder's files, in the order they are published (``router.files.staged``): the manifest last.
ARTIFACT_FILES = (_WEIGHTS, _EXAMPLES, _MANIFEST)
RETRAIN = "retrain the gate (moe train --config <this config>)"
_SELF_DIGEST = "manifest_sha256"  # gate.json's own sha256, over its other keys (``_manifest_digest``)


def is_trained(directory: str | Path) -> bool:
    """Whether ``directory`` holds a gate: its manifest, published last, so its presence means a whole one."""
    return (Path(directory) / _MANIFEST).is_file()


def write_artifact(gate: Gate, directory: str | Path) -> Path:
    """``Gate.save``: write the artifact folder. The files are written in a staging folder and then renamed into
    ``directory``, ``gate.json`` last (``router.files.staged``), so a reader never meets a half-written file and a
    folder holding ``gate.json`` is complete.

    What is saved is what was trained: the artifact's experts and examples, never a config's view.
    """
    path = Path(directory)
    texts, labels = gate.training_examples  # a config view appends its cold-start examples after these
    text_bytes, text_offsets = pack_strings(texts)
    label_ids = {e: i for i, e in enumerate(gate.artifact_experts)}
    weights: dict[str, Any] = gate._weights()  # typed Any: numpy's stub confuses it with savez's flags
    with staged(path) as stage:
        np.savez(stage / _WEIGHTS, **weights)
        np.savez_compressed(
            stage / _EXAMPLES, embeddings=gate.example_embeddings[:len(texts)],
            text_bytes=text_bytes, text_offsets=text_offsets,
            labels=np.array([label_ids.get(lab, -1) for lab in labels], dtype=np.int32),
            private=np.array([t in gate.private_texts for t in texts], dtype=bool),
            pinned=np.array([t in gate.pinned_texts for t in texts], dtype=bool))
        doc = {**gate.metadata.as_dict(), "kind": gate.kind, "experts": gate.artifact_experts,
               "encoder_max_length": _encoder_max_length(gate.encoder), **gate._manifest(),
               "files": {name: sha256_file(stage / name) for name in (_WEIGHTS, _EXAMPLES)}}
        try:  # NaN and Infinity are not JSON: refused here, not written for every other reader to choke on
            plain = json.dumps(doc, allow_nan=False)
        except ValueError:
            bad = ", ".join(k for k, v in _flat(doc) if isinstance(v, float) and not math.isfinite(v))
            raise ValueError(f"{_MANIFEST}: not a finite number, so not JSON: {bad}; the gate was not saved") \
                from None
        doc[_SELF_DIGEST] = _manifest_digest(json.loads(plain))  # as load will read it back
        (stage / _MANIFEST).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return path


def read_artifact(directory: str | Path, encoder: Encoder) -> Gate:
    """``Gate.load``: read an artifact of either kind for ``encoder``; raise ``GateArtifactMismatch`` if it was
    trained with another encoder or ``max_length``, or its files (``gate.json`` included) were edited or are
    corrupt."""
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
                                   f"{RETRAIN}") from exc


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
                                       f"incomplete); {RETRAIN}") from None
        except IsADirectoryError:
            raise GateArtifactMismatch(f"{path / name}: a folder, where {_MANIFEST} lists a file; {RETRAIN}") \
                from None
        if differs:
            raise GateArtifactMismatch(f"{path / name}: contents differ from the sha256 in {_MANIFEST} (a file changed "
                                       f"by hand, or a moe train stopped while it replaced the files); {RETRAIN}")
    doc["metrics"] = ValidationMetrics(**{k: v for k, v in dict(doc["metrics"]).items() if k in _METRIC_FIELDS})
    experts = _expert_names(path / _MANIFEST, doc.pop("experts"), "experts")
    doc.pop("files")
    metadata = GateMetadata(**{k: v for k, v in doc.items() if k in _METADATA_FIELDS})
    if metadata.cold_start_claims is not None:  # the s-only map of older artifacts is used as it was written
        try:
            claim_map_of(metadata)
            _check_offsets(metadata.cold_start_offsets, experts)
        except (ValueError, TypeError, OverflowError) as exc:
            raise GateArtifactMismatch(f"{path / _MANIFEST}: cold_start_claims/_familiar/_offsets: {exc}; "
                                       f"{RETRAIN}") from None
    weights, ex = _read_arrays(path / _WEIGHTS), _read_arrays(path / _EXAMPLES)
    texts = unpack_strings(ex["text_bytes"], ex["text_offsets"])
    labels = [experts[i] if i >= 0 else "" for i in ex["labels"]]
    module, _, name = GATE_KINDS[kind].partition(":")
    gate_cls: type[Gate] = getattr(importlib.import_module(module), name)
    gate = gate_cls._restore(encoder, experts, doc, metadata, weights, (ex["embeddings"], texts, labels))
    if "private" in ex:  # an artifact from before it was kept marks none
        gate.private_texts = frozenset(t for t, private in zip(texts, ex["private"], strict=True) if private)
    if "pinned" in ex:  # likewise
        gate.pinned_texts = frozenset(t for t, pinned in zip(texts, ex["pinned"], strict=True) if pinned)
    return gate

def _read_manifest(path: Path) -> dict[str, Any]:
    """The artifact folder ``path``'s ``gate.json``, which must be a JSON object; ``FileNotFoundError`` when
    absent, ``GateArtifactMismatch`` naming the file when it is corrupt or something else."""
    file = path / _MANIFEST
    try:
        doc = read_artifact_json(file)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no gate artifact here ({_MANIFEST} missing); run moe train") from None
    if not isinstance(doc, dict):
        raise GateArtifactMismatch(f"{file}: not a gate artifact (a JSON {_json_type(doc)} where a JSON object "
                                   f"belongs); {RETRAIN}")
    return doc


def read_artifact_json(file: Path) -> Any:
    """A JSON file of an artifact (``gate.json``, the two-stage gate's ``cascade.json``), parsed;
    ``GateArtifactMismatch`` naming the file and the retrain command when it is not JSON."""
    try:
        return json.loads(file.read_bytes())
    except ValueError as exc:  # not JSON, or not UTF-8 text (UnicodeDecodeError is a ValueError)
        raise GateArtifactMismatch(f"{file}: corrupt, not readable as JSON ({exc}); {RETRAIN}") from None


def _json_type(value: object) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)

def _expert_names(file: Path, value: object, key: str) -> list[str]:
    """``gate.json``'s ``key``, which must be a list of expert names (a string would read as its letters)."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise GateArtifactMismatch(f"{file}: not a gate artifact ({key!r} is not a list of expert names); "
                                   f"{RETRAIN}")
    return value

def _read_arrays(file: Path) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` file, read now, so a truncated or garbled one is named here, not met later as a
    traceback. (NumPy reads a file that is no zip as a pickle, and says only that it holds pickled data.)"""
    try:
        # Opened here, not by np.load: np.load leaves its own handle open when the archive turns out corrupt.
        with open(file, "rb") as fh, np.load(fh, allow_pickle=False) as arrays:
            return {k: arrays[k] for k in arrays.files}
    except FileNotFoundError:
        raise GateArtifactMismatch(f"{file}: missing (the artifact is incomplete); {RETRAIN}") from None
    except (ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:  # a PermissionError stays itself
        why = str(exc) if zipfile.is_zipfile(file) else "not a zip archive, which a .npz file is"
        raise GateArtifactMismatch(f"{file}: corrupt, not readable as NumPy arrays ({why}); {RETRAIN}") from None


def _flat(doc: Any, key: str = "") -> list[tuple[str, Any]]:
    """``(dotted key, value)`` for each leaf of nested dicts and lists (``metrics.ece_before``, ``experts.0``)."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list | tuple) else None
    if items is None:
        return [(key, doc)]
    return [leaf for k, v in items for leaf in _flat(v, f"{key}.{k}" if key else str(k))]


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
        # The encoder may know how to reach the trained one by a setting (Encoder.mismatch_hint); test doubles
        # need not derive from Encoder.
        hint = getattr(encoder, "mismatch_hint", lambda _identity: "")(doc["encoder_identity"])
        raise GateArtifactMismatch(f"{path}: the gate was trained with another encoder: encoder "
                                   + "; encoder ".join(differences) + ". Use that encoder or retrain the gate."
                                   + (f" {hint}" if hint else ""))
    # Truncating elsewhere moves the vectors of long queries: the classifier would score points it never saw.
    trained, given = doc.get("encoder_max_length"), _encoder_max_length(encoder)
    if trained is not None and given is not None and trained != given:
        raise GateArtifactMismatch(f"{path}: the gate was trained with encoder max_length {trained} (tokens read "
                                   f"per query), and this encoder reads {given}. Set gate.encoder.max_length: "
                                   f"{trained}, or retrain the gate (moe train --config <this config>).")
