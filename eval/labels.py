"""Label suites: the gate against random, majority, centroid, kNN and logistic baselines on one split, and
against gates on each member of its default ensemble alone (``gate classifier: <kind>``).

Every system yields a ``[n_test, n_labels]`` probability matrix over the training label set (sorted), so all
of them are scored by the same code. Test queries whose label never occurs in training cannot be routed
correctly by any system. On the user's JSONL (``run_jsonl``) they are out-of-scope queries, like CLINC150's
``oos``: scored by ``oos_auroc`` and counted in ``setup.test_out_of_scope``. In the named suites they are left
out of the scores and counted in ``setup.test_unseen_label``.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from eval import metrics as M
from eval.datasets import (
    CLINC_OOS_LABEL,
    LabelledQuery,
    load_banking77,
    load_clinc150_domains,
    load_labelled_jsonl,
    load_snips,
    split_by_id,
    without_seen,
)
from eval.peer import write_split
from eval.report import plot_confusion, plot_familiar_sweep, plot_reliability
from eval.suite import PREDICTIONS, SuiteContext, subsample
from router.config.checks import name_list
from router.gate import conflicting_labels, respelled, spelled_alike, text_key
from router.gate_train import conflicts_note
from router.search import flat_ip_index

__all__ = ["evaluate_labels", "run_banking77_intent", "run_clinc150_domain", "run_jsonl",
           "run_mmlu_pro_domain", "run_snips_intent", "unseen_test"]

FRACTIONS = (0.7, 0.1, 0.2)
KNN_K = 10
# gate.cascade.familiar values the label suites also score (the default is among them); 1.0: the static
# stage's bar is its own abstain threshold.
FAMILIAR_SWEEP = (0.7, 0.8, 0.85, 0.9, 0.95, 1.0)
N_BOOT = 1000


# ---------------------------------------------------------------- suites


def _limit(ctx: SuiteContext, items: list[LabelledQuery]) -> list[LabelledQuery]:
    return subsample(items, ctx.limit, ctx.seed, key=lambda q: q.id)


def run_mmlu_pro_domain(ctx: SuiteContext) -> dict[str, Any]:
    from experts.recordings import load_mmlu_pro, mmlu_pro_prompt

    store = load_mmlu_pro(_folder(ctx, "mmlu_pro_outcomes"))
    # The text is the prompt a user sends (question and lettered options), as routed in production.
    items = [LabelledQuery(str(q.question_id), mmlu_pro_prompt(q), q.category) for q in store.questions]
    train, val, test = split_by_id(items, FRACTIONS, seed=ctx.seed, text=lambda q: q.text)
    ctx.notes.append(f"split by question id, fractions {FRACTIONS}, seed {ctx.seed}, except that prompts whose "
                     "normalised text occurs more than once are placed by a hash of that text, so copies share a "
                     "part and no test prompt is also a training one; train and val both train "
                     "the gate (it holds out its own calibration part); text = mmlu_pro_prompt (question + options)")
    return evaluate_labels(ctx, _limit(ctx, train + val), _limit(ctx, test), title="MMLU-Pro, 14 categories")


def run_clinc150_domain(ctx: SuiteContext) -> dict[str, Any]:
    d = ctx.data_dir
    train = [q for q in load_clinc150_domains(d, "train") if q.label != CLINC_OOS_LABEL]
    val = load_clinc150_domains(d, "val")
    test, dropped = unseen_test(ctx, "CLINC150", load_clinc150_domains(d, "test"), [*train, *val])
    ctx.notes.append("CLINC150's own split; the gate trains on in-scope train only; the out-of-scope score is "
                     "chosen by AUROC on CLINC's val split (in-scope + oos_val), then reported on test")
    return evaluate_labels(ctx, _limit(ctx, train), _limit(ctx, test), val=_limit(ctx, val),
                           oos_label=CLINC_OOS_LABEL, title="CLINC150, 10 domains", test_dropped=dropped)


def unseen_test(ctx: SuiteContext, name: str, test: list[LabelledQuery],
                seen: Sequence[LabelledQuery]) -> tuple[list[LabelledQuery], int]:
    """A data set's own test split less the queries whose normalised text also occurs in its training (or
    validation) data ``seen``, with a note saying how many were dropped."""
    kept, dropped = without_seen(test, (q.text for q in seen), lambda q: q.text)
    ctx.notes.append(f"{name}'s own test split repeats {dropped} of its training/validation queries (same text "
                     f"after lower-casing and collapsing whitespace); those {dropped} are dropped from test "
                     "(setup.test_dropped_seen_in_training)")
    return kept, dropped


def run_snips_intent(ctx: SuiteContext) -> dict[str, Any]:
    ctx.notes.append("SNIPS's own train/test split")
    train = load_snips(ctx.data_dir, "train")
    test, dropped = unseen_test(ctx, "SNIPS", load_snips(ctx.data_dir, "test"), train)
    return evaluate_labels(ctx, _limit(ctx, train), _limit(ctx, test), title="SNIPS, 7 intents",
                           test_dropped=dropped)


def run_banking77_intent(ctx: SuiteContext) -> dict[str, Any]:
    ctx.notes.append("Banking77's own train/test split")
    train = load_banking77(ctx.data_dir, "train")
    test, dropped = unseen_test(ctx, "Banking77", load_banking77(ctx.data_dir, "test"), train)
    train = _limit(ctx, train)
    return evaluate_labels(ctx, train, _limit(ctx, test), title=f"Banking77, {len({q.label for q in train})} intents",
                           test_dropped=dropped)


def run_jsonl(ctx: SuiteContext, *, oos_label: str | None = None) -> dict[str, Any]:
    """The user's train and test JSONL. Test queries whose label the training data lacks are out of scope, and
    so are those labelled ``oos_label``, whose training queries the gate never learns (as CLINC150's ``oos``)."""
    assert ctx.train_path is not None and ctx.test_path is not None
    ctx.notes.append(f"user data: trained on {ctx.train_path}, tested on {ctx.test_path}")
    train, test = load_labelled_jsonl(ctx.train_path), load_labelled_jsonl(ctx.test_path)
    for flag, path, rows in (("--train", ctx.train_path, train), ("--test", ctx.test_path, test)):
        if not rows:
            raise ValueError(f"{flag} {path} holds no records")
    _note_label_twins(ctx, train)  # the out-of-scope label's twin ("OOS" beside "oos") too, before it is left out
    if oos_label is not None:
        if not any(q.label == oos_label for q in (*train, *test)):
            known = label_order(q.label for q in (*train, *test))
            raise ValueError(f"--oos-label {oos_label!r} labels no query in {ctx.train_path} or {ctx.test_path}; "
                             f"their labels: {', '.join(known[:20])}{' ...' if len(known) > 20 else ''}")
        dropped = sum(q.label == oos_label for q in train)
        train = [q for q in train if q.label != oos_label]
        ctx.notes.append(f"--oos-label {oos_label}: out of scope; {dropped} training queries with it left out")
    # --limit first: the overlap below counts the queries this run trains and tests on.
    train, test = _limit(ctx, train), _limit(ctx, test)
    found = label_order(q.label for q in train)
    if len(found) < 2:
        limited = f" (the {len(train)} chosen by --limit {ctx.limit})" if ctx.limit is not None else ""
        left = f" once --oos-label {oos_label}'s are left out" if oos_label is not None else ""
        raise ValueError(f"--train {ctx.train_path}: its queries{limited} carry {len(found)} label(s)"
                         f"{': ' + repr(found[0]) if found else ''}{left}; routing needs at least two")
    _note_unseen_labels(ctx, found, test, oos_label)
    conflicts = conflicting_labels([q.text for q in train], [q.label for q in train])
    if conflicts:  # the gate logs it while training (with the texts); the report keeps it (without)
        ctx.notes.append(conflicts_note(len(conflicts)))
    seen = {text_key(q.text) for q in train}
    overlap = sum(text_key(q.text) in seen for q in test)
    if overlap:
        note = (f"{overlap} of {len(test)} test queries also occur in the training data (as written, or differing "
                "only in case, spaces or invisible characters), so the scores overstate accuracy on new queries")
        ctx.notes.append(note)
        print(f"warning: {note}", file=sys.stderr)
    return evaluate_labels(ctx, train, test, oos_label=oos_label, unseen_out_of_scope=True,
                           title=ctx.test_path.name)


def label_order(labels: Iterable[str]) -> list[str]:
    """Distinct labels in the order a person reads them: runs of digits compare as numbers, so class numbers
    ``"2"`` and ``"10"`` come in that order (plain string order puts ``"10"`` first); labels without digits keep
    plain string order."""
    def key(label: str) -> tuple[tuple[int, int, str], ...]:
        return tuple((0, int(part), part) if part.isdecimal() else (1, 0, part)
                     for part in re.split(r"(\d+)", label) if part)
    return sorted(set(labels), key=key)


def _note_unseen_labels(ctx: SuiteContext, trained: Sequence[str], test: Sequence[LabelledQuery],
                        oos_label: str | None) -> None:
    """Say which test labels the training data lacks (their queries are scored as out of scope), and warn
    about any that differ from a training label only in case, spaces, invisible characters or Unicode form: most
    likely the same class written two ways, which would otherwise pass silently as out of scope."""
    known = set(trained)
    counts = Counter(q.label for q in test if q.label not in known and q.label != oos_label)
    if not counts:
        return
    listed = name_list([f"{label!r} ({counts[label]})" for label in label_order(counts)])
    ctx.notes.append(f"out of scope: test labels the training data lacks, with their queries: {listed}")
    for label, twin in respelled(label_order(counts), trained).items():
        note = (f"test label {label!r} differs from training label {twin!r} only in case, spaces, invisible "
                f"characters or Unicode form, so its {counts[label]} queries are scored as out of scope; if they are "
                "the same class, write the label the same way in both files")
        ctx.notes.append(note)
        print(f"warning: {note}", file=sys.stderr)


def _note_label_twins(ctx: SuiteContext, train: Sequence[LabelledQuery]) -> None:
    """Warn about training labels that differ from each other only in case, spaces, invisible characters or Unicode
    form (``"Billing"``, ``"billing "`` and ``"billing\u200b"``): most likely one class written two ways, which the
    gate would otherwise learn as two, splitting the class's queries between them."""
    counts = Counter(q.label for q in train)
    for group in spelled_alike(label_order(counts)):
        listed = ", ".join(f"{label!r} ({counts[label]})" for label in group)
        note = (f"training labels {listed} differ only in case, spaces, invisible characters or Unicode form, and "
                f"are learned as {len(group)} classes; if they are one class, write its label one way")
        ctx.notes.append(note)
        print(f"warning: {note}", file=sys.stderr)


def _folder(ctx: SuiteContext, name: str) -> Any:
    return ctx.data_dir / name if (ctx.data_dir / name).is_dir() else ctx.data_dir


# ---------------------------------------------------------------- scoring


def evaluate_labels(ctx: SuiteContext, train: Sequence[LabelledQuery], test: Sequence[LabelledQuery], *,
                    val: Sequence[LabelledQuery] = (), oos_label: str | None = None,
                    unseen_out_of_scope: bool = False, title: str,
                    test_dropped: int | None = None) -> dict[str, Any]:
    """Train the gate and the baselines on ``train``, score them on ``test``; the results body.

    Test queries labelled ``oos_label`` are out of scope; with ``unseen_out_of_scope``, so are those whose
    label never occurs in ``train`` (otherwise they are left out and counted as ``test_unseen_label``).
    ``test_dropped``: how many test queries the caller dropped as repeats of training ones (recorded in setup)."""
    from router.gate import train_gate

    labels = label_order(q.label for q in train)
    if len(labels) < 2:
        raise ValueError(f"training data has {len(labels)} label(s); routing needs at least two")
    index = {lab: i for i, lab in enumerate(labels)}
    scored = [q for q in test if q.label in index]
    oos = [q for q in test if (oos_label is not None and q.label == oos_label)
           or (unseen_out_of_scope and q.label not in index)]
    unseen = len(test) - len(scored) - len(oos)
    if not scored:
        raise ValueError(f"no test query has a label that occurs in the training data ({len(oos)} of {len(test)} "
                         "are out of scope); routing accuracy needs in-scope test queries")
    # Peers (bench/peers) read the identical split from here.
    write_split(ctx.out / "split", train, val, test)
    enc = ctx.encoder
    x_tr, x_te = enc.encode([q.text for q in train]), enc.encode([q.text for q in scored])
    y_tr = np.array([index[q.label] for q in train])
    y_te = np.array([index[q.label] for q in scored])
    gate = train_gate([q.text for q in train], [q.label for q in train], enc, experts=labels, seed=ctx.seed,
                      progress=ctx.progress)
    _status(ctx, "scoring the baselines (random, majority, centroid, kNN, logistic)")
    probs = {"gate": gate.predict_proba(x_te, [q.text for q in scored]),
             **_baselines(x_tr, y_tr, x_te, len(labels), ctx.seed),
             **_gate_members(ctx, train, [q.text for q in scored], x_te, labels)}
    _status(ctx, "fitting and scoring the two-stage gate")
    cascade = _cascade(ctx, gate, train, [q.text for q in scored], y_te, [q.text for q in oos])
    if cascade is not None:
        probs["cascade"] = cascade.pop("probs")
    systems = {name: _scores(p, y_te) for name, p in probs.items()}
    metrics = dict(systems["gate"])
    if cascade is not None:
        metrics.update({"cascade_accuracy": systems["cascade"]["accuracy"], **cascade.pop("metrics")})
    body: dict[str, Any] = {"setup": {"train": len(train), "test": len(scored), "val": len(val),
                                      "test_out_of_scope": len(oos), "test_unseen_label": unseen,
                                      "labels": len(labels), "gate_temperature": gate.temperature,
                                      "gate_classifier": gate.metadata.classifier}}
    if test_dropped is not None:
        body["setup"]["test_dropped_seen_in_training"] = test_dropped
    oos_lines = None
    if oos:
        oos_texts = [q.text for q in oos]
        x_oos = enc.encode(oos_texts)
        oos_result = _out_of_scope(gate, x_tr, (x_te, [q.text for q in scored]), (x_oos, oos_texts), val, index,
                                   oos_label, enc)
        metrics["oos_auroc"] = oos_result.pop("oos_auroc")
        oos_lines = (oos, gate.predict_proba(x_oos, oos_texts), *oos_result.pop("per_query"))
        if unseen_out_of_scope:  # which labels made a query out of scope: the user's data names them
            oos_result["labels"] = label_order(q.label for q in oos)
        body["out_of_scope"] = oos_result
    body["metrics"] = metrics
    body["systems"] = systems
    if cascade is not None:
        body["cascade"] = cascade
    _status(ctx, f"bootstrap confidence intervals ({N_BOOT} resamples)")
    body["confidence_intervals"] = _intervals(probs["gate"], y_te, ctx.seed)
    pred = probs["gate"].argmax(axis=1)
    write_predictions(ctx.out / PREDICTIONS, scored, probs["gate"], labels, oos_lines)
    body["predictions"] = PREDICTIONS
    body["per_class"] = _per_class(y_te, pred, labels)
    body["labels"] = labels
    cm = M.confusion_matrix(y_te, pred, labels=range(len(labels)))
    body["confusion_matrix"] = cm
    if ctx.plots:
        plot_confusion(ctx.out / "confusion_matrix.png", cm, labels, f"{title}: gate confusion matrix")
        bins = M.reliability_bins(probs["gate"], y_te)
        plot_reliability(ctx.out / "reliability.png", bins, metrics["ece"], f"{title}: gate reliability")
        body["figures"] = ["confusion_matrix.png", "reliability.png"]
        if cascade is not None and oos:
            plot_familiar_sweep(ctx.out / "cascade_familiar.png", cascade["familiar_sweep"],
                                metrics["gate_abstain_oos"], f"{title}: two-stage gate, gate.cascade.familiar",
                                gate_label=f"{ctx.encoder.identity.split(':')[0]} gate alone")
            body["figures"].append("cascade_familiar.png")
    return body


def _cascade(ctx: SuiteContext, gate: Any, train: Sequence[LabelledQuery], test_texts: Sequence[str],
             test_y: np.ndarray, oos_texts: Sequence[str]) -> dict[str, Any] | None:
    """The two-stage gate (``router.cascade``: a gate on the static encoder first, this gate for the rest) as
    ``moe train`` builds it with ``gate.cascade``'s defaults, on the test queries: its probabilities, the share
    the static stage decided and how often it picks the gate's own top expert; with out-of-scope queries, how
    often each of the two abstains (in scope and out). Beside it, the same figures for other values of
    ``gate.cascade.familiar`` (``familiar_sweep``). None when the gate already runs on the static encoder."""
    from router.cascade import CascadeGate, Comparison
    from router.config import CascadeConfig
    from router.gate import train_gate
    from router.static_encoder import StaticMiniLMEncoder

    if ctx.encoder.identity.startswith("static"):
        return None
    texts, labels = [q.text for q in train], [q.label for q in train]
    # Both stages hold the validation queries out, however few, as moe train trains them for a cascade (refit).
    fast = train_gate(texts, labels, StaticMiniLMEncoder(), experts=gate.experts, seed=ctx.seed,
                      progress=ctx.progress, refit=False)
    served = gate  # the gate scored as "gate": what serves without a cascade, whose abstain shares stand beside
    if gate.metadata.metrics.calibration == "cross-validated":
        gate = train_gate(texts, labels, ctx.encoder, experts=gate.experts, seed=ctx.seed, progress=ctx.progress,
                          refit=False)
    default = CascadeConfig()

    def fit(familiar: float) -> CascadeGate:
        return CascadeGate.train(gate, fast, texts, labels, agreement=default.agreement, familiar=familiar,
                                 seed=ctx.seed)

    fits = {default.familiar: fit(default.familiar)}
    # The sweep's other fits would only repeat the served fit's warnings (few validation queries, say), once each.
    cascade_log = logging.getLogger("router.cascade")
    level = cascade_log.level
    cascade_log.setLevel(logging.ERROR)
    try:
        fits |= {familiar: fit(familiar) for familiar in FAMILIAR_SWEEP if familiar not in fits}
    finally:
        cascade_log.setLevel(level)
    # Each stage assesses every query once; each fit's cascade is merged from those (CascadeGate.merge, as
    # serving merges), with the full gate's rows for the queries that fit leaves to it.
    parts = {"in_scope": (fast.assess(test_texts), gate.assess(test_texts))}
    if oos_texts:
        parts["oos"] = (fast.assess(oos_texts), gate.assess(oos_texts))

    def alone(part: str, texts: Sequence[str]) -> float:
        """The share of ``texts`` the gate scored as "gate" abstains on, serving alone."""
        full = parts[part][1] if served is gate else served.assess(texts)
        return _abstaining(full, served.ood_threshold)

    def two_stage(cascade: CascadeGate, part: str) -> Comparison:
        first, full = parts[part]
        return Comparison(cascade.merge(first, full.rows(np.flatnonzero(~cascade.decides(first)))), full)

    cascade = fits[default.familiar]
    test = two_stage(cascade, "in_scope")
    metrics = {"cascade_fast_share": test.fast_share, "cascade_agreement": test.agreement}
    if oos_texts:
        oos = two_stage(cascade, "oos")
        metrics.update({
            "cascade_abstain_in_scope": _abstaining(test.cascade, gate.ood_threshold),
            "gate_abstain_in_scope": alone("in_scope", test_texts),
            "cascade_abstain_oos": _abstaining(oos.cascade, gate.ood_threshold),
            "gate_abstain_oos": alone("oos", oos_texts)})
    sweep = []
    for familiar in FAMILIAR_SWEEP:
        other = fits[familiar]
        scored = {part: two_stage(other, part) for part in parts}
        inside = scored["in_scope"]
        sweep.append({"familiar": familiar, "threshold": other.fit.threshold, "familiarity": other.fit.familiarity,
                      "val_fast_share": other.fit.fast_share, "fast_share": inside.fast_share,
                      "agreement": inside.agreement,
                      "accuracy": float((inside.cascade.probs.argmax(axis=1) == test_y).mean()),
                      **{f"abstain_{part}": _abstaining(c.cascade, gate.ood_threshold) for part, c in scored.items()}})
    return {"probs": test.cascade.probs, "fit": cascade.fit.as_dict(), "metrics": metrics, "familiar_sweep": sweep}


def _abstaining(assessed: Any, threshold: float | None) -> float:
    """Share of queries scored below their out-of-distribution threshold (each one's stage's, else the gate's):
    those the service sends to ``gate.default_expert``."""
    thresholds = assessed.ood_threshold or [threshold] * len(assessed.ood)
    below = [t is not None and bool(o < t) for o, t in zip(assessed.ood, thresholds, strict=True)]
    return float(np.mean(below)) if below else 0.0


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return np.asarray(e / e.sum(axis=1, keepdims=True))


# The ensemble's members (``router.classifiers``), each trained alone as a gate (``gate.classifier``), so the
# choice of the default is measured on every suite's split.
MEMBER_CLASSIFIERS = ("logistic", "knn", "lexical")


def write_predictions(path: Path, queries: Sequence[LabelledQuery], probs: np.ndarray, labels: list[str],
                      out_of_scope: tuple[Sequence[LabelledQuery], np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                          np.ndarray] | None = None,
                      ) -> None:
    """``{"id", "label", "predicted", "p_predicted", "p_label", "rank_of_label"}`` per query, in ``queries``'
    order: the gate's pick, its probability, and the true label's probability and rank (1: the pick).

    With ``out_of_scope`` (the out-of-scope test queries, their probabilities, and the chosen out-of-scope score
    of the in-scope queries and of them, then their familiarity to the gate), every line also has ``out_of_scope``,
    ``oos_score`` and ``gate_familiarity``, and each out-of-scope query a line of its own after the rest (no
    ``p_label`` or rank: its label is none the gate has), so ``oos_auroc`` and the gate's abstain shares
    (``gate_familiarity`` below ``results.json``'s ``out_of_scope.gate_ood_threshold``) can be recomputed from the
    file too."""
    order = np.argsort(-probs, axis=1, kind="stable")
    index = {lab: i for i, lab in enumerate(labels)}
    with open(path, "w", encoding="utf-8") as fh:
        for row, q in enumerate(queries):
            pick, true = int(order[row, 0]), index[q.label]
            line = {"id": q.id, "label": q.label, "predicted": labels[pick],
                    "p_predicted": round(float(probs[row, pick]), 6), "p_label": round(float(probs[row, true]), 6),
                    "rank_of_label": int(np.flatnonzero(order[row] == true)[0]) + 1}
            if out_of_scope is not None:
                line |= {"out_of_scope": False, "oos_score": round(float(out_of_scope[2][row]), 6),
                         "gate_familiarity": float(out_of_scope[4][row])}
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")
        if out_of_scope is not None:
            outside, outside_probs, _, outside_scores, _, outside_familiarity = out_of_scope
            for row, q in enumerate(outside):
                pick = int(np.argmax(outside_probs[row]))
                fh.write(json.dumps({"id": q.id, "label": q.label, "predicted": labels[pick],
                                     "p_predicted": round(float(outside_probs[row, pick]), 6), "out_of_scope": True,
                                     "oos_score": round(float(outside_scores[row]), 6),
                                     "gate_familiarity": float(outside_familiarity[row])}, ensure_ascii=False)
                         + "\n")


def _status(ctx: SuiteContext, doing: str) -> None:
    """One line on stderr for a step with no progress bar of its own, so a long run never sits silent."""
    if ctx.progress:
        print(f"{ctx.name}: {doing} ...", file=sys.stderr, flush=True)


def _gate_members(ctx: SuiteContext, train: Sequence[LabelledQuery], test_texts: list[str], x_te: np.ndarray,
                  labels: list[str]) -> dict[str, np.ndarray]:
    """Test probabilities of a gate trained as ``train_gate`` trains the headline one, on each member
    classifier alone (system names ``gate classifier: <kind>``)."""
    from router.classifiers import build_classifier
    from router.gate import train_gate

    out = {}
    for kind in MEMBER_CLASSIFIERS:
        gate = train_gate([q.text for q in train], [q.label for q in train], ctx.encoder, experts=labels,
                          seed=ctx.seed, progress=ctx.progress, classifier=build_classifier(kind, ctx.seed))
        out[f"gate classifier: {kind}"] = gate.predict_proba(x_te, test_texts)
    return out


def _baselines(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, n: int, seed: int) -> dict[str, np.ndarray]:
    """Probability rows of each baseline over the same ``n`` labels."""
    from sklearn.linear_model import LogisticRegression

    from router.gate import fit_temperature

    rng = np.random.default_rng(seed)
    prior = np.bincount(y_tr, minlength=n) / len(y_tr)
    # Semantic-router style: cosine to each label's mean embedding; a temperature fitted on train makes the
    # similarities probabilities (it does not change the ranking).
    means = np.stack([x_tr[y_tr == c].mean(axis=0) if (y_tr == c).any() else np.zeros(x_tr.shape[1])
                      for c in range(n)])
    means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    t = fit_temperature(x_tr @ means.T, y_tr)
    index = flat_ip_index(x_tr)  # the serving gate's exact search
    k = min(KNN_K, len(y_tr))
    sims, ids = index.search(np.ascontiguousarray(x_te, dtype=np.float32), k)
    votes = np.zeros((len(x_te), n))
    for j in range(k):  # similarity-weighted votes of the k nearest training queries
        np.add.at(votes, (np.arange(len(x_te)), y_tr[ids[:, j]]), np.maximum(sims[:, j], 0.0) + 1e-6)
    logistic = LogisticRegression(max_iter=1000, random_state=seed).fit(x_tr, y_tr)
    lr = np.zeros((len(x_te), n))
    lr[:, logistic.classes_] = logistic.predict_proba(x_te)
    return {
        "random": rng.dirichlet(np.ones(n), size=len(x_te)),
        "majority": np.tile(prior, (len(x_te), 1)),
        "centroid": _softmax(x_te @ means.T / t),
        "knn": votes / votes.sum(axis=1, keepdims=True),
        "logistic": lr,
    }


def _macro_f1(probs: np.ndarray, y: np.ndarray) -> float:
    return M.macro_f1(y, probs.argmax(axis=1))


def _scores(probs: np.ndarray, y: np.ndarray) -> dict[str, float]:
    return {"accuracy": M.accuracy(y, probs.argmax(axis=1)),
            "top2_recall": M.topk_recall(probs, y, min(2, probs.shape[1])),
            "macro_f1": _macro_f1(probs, y),
            "ece": M.expected_calibration_error(probs, y)}


def _intervals(probs: np.ndarray, y: np.ndarray, seed: int) -> dict[str, dict[str, float]]:
    fns = {"accuracy": lambda p, t: M.accuracy(t, p.argmax(axis=1)),
           "top2_recall": lambda p, t: M.topk_recall(p, t, min(2, p.shape[1])),
           "macro_f1": _macro_f1,
           "ece": M.expected_calibration_error}
    out = {}
    for name, fn in fns.items():
        ci = M.bootstrap_ci(fn, probs, y, n=N_BOOT, seed=seed)
        out[name] = {"estimate": ci.estimate, "low": ci.low, "high": ci.high}
    return out


def _per_class(y: np.ndarray, pred: np.ndarray, labels: list[str]) -> dict[str, dict[str, float | None]]:
    """Each label's precision, recall, F1 and support on the test split. What a label's absence leaves undefined
    is None (n/a), as macro F1 leaves it out: recall for a label no test query has, and all three for one that is
    neither a test query's label nor any prediction (a training label the test split lacks)."""
    table = M.per_class_precision_recall(y, pred, labels=range(len(labels)))
    out: dict[str, dict[str, float | None]] = {}
    for i, (p, r, s) in table.items():
        predicted = bool(np.any(pred == i))
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        out[labels[i]] = {"precision": p if s or predicted else None, "recall": r if s else None,
                          "f1": f1 if s or predicted else None, "support": s}
    return out


# Decimals an out-of-scope score keeps before AUROC ranks it: far below any real difference, above float noise.
_TIE_DECIMALS = 12


def _out_of_scope(gate: Any, x_tr: np.ndarray, inside: tuple[np.ndarray, list[str]],
                  outside: tuple[np.ndarray, list[str]], val: Sequence[LabelledQuery], index: dict[str, int],
                  oos_label: str | None, enc: Any) -> dict[str, Any]:
    """AUROC of each out-of-scope score on test; the one reported is chosen on validation data.

    ``1-gate_familiarity`` is the score the serving gate abstains on (``Gate.ood_scores``); the others are its
    two ingredients alone and their plain mean."""
    nn = flat_ip_index(x_tr)

    def scores(batch: tuple[np.ndarray, list[str]]) -> dict[str, np.ndarray]:
        x, texts = batch
        proba = gate.predict_proba(x, texts)
        maxprob = 1.0 - proba.max(axis=1)
        sim, _ = nn.search(np.ascontiguousarray(x, dtype=np.float32), 1)
        far = 1.0 - sim[:, 0]
        # Both lie in [0, 1] and grow with "unlike anything trained on"; their mean uses both signals.
        return {"1-max_prob": maxprob, "1-nn_similarity": far, "mean_of_both": (maxprob + far) / 2,
                "1-gate_familiarity": 1.0 - gate.ood_scores(proba, sim[:, 0])}

    def aurocs(s_pos: dict[str, np.ndarray], s_neg: dict[str, np.ndarray]) -> dict[str, float]:
        truth = np.r_[np.ones(len(s_pos["1-max_prob"]), bool), np.zeros(len(s_neg["1-max_prob"]), bool)]
        # Rounded first: the familiarity score is a mean of two percentiles, and equal ones summed in another
        # order differ in the last bit ((0 + 5) / n against (1 + 4) / n), which would break real ties by
        # rounding noise; AUROC counts a tie as half.
        return {k: M.auroc(np.round(np.r_[s_pos[k], s_neg[k]], _TIE_DECIMALS), truth) for k in s_pos}

    s_out, s_in = scores(outside), scores(inside)
    test = aurocs(s_out, s_in)
    val_oos = [q.text for q in val if q.label == oos_label]
    val_in = [q.text for q in val if q.label in index]
    chosen, on_val = "1-gate_familiarity", None
    if val_oos and val_in:
        on_val = aurocs(scores((enc.encode(val_oos), val_oos)), scores((enc.encode(val_in), val_in)))
        chosen = max(on_val, key=lambda k: on_val[k])
    # Each test query's value of the chosen score, and its familiarity to the gate (what the service abstains on,
    # below ``gate_ood_threshold``), in scope and out of scope, for predictions.jsonl.
    return {"oos_auroc": test[chosen], "score": chosen, "auroc_test": test, "auroc_val": on_val,
            "gate_ood_threshold": gate.ood_threshold,
            "per_query": (s_in[chosen], s_out[chosen], 1.0 - s_in["1-gate_familiarity"],
                          1.0 - s_out["1-gate_familiarity"])}
