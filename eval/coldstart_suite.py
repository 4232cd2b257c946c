"""Cold start, measured: each CLINC150 domain in turn is added by config to a gate trained on the other nine.

For every domain, the gate is trained on the other domains' training queries (CLINC150's own split, in scope
only), and the domain is then added as a config expert with ``n`` of its own training queries as ``examples``
(``COUNTS``, ``DRAWS`` seeded draws each), with no retraining: ``Gate.for_experts``, as a config edit serves it
(``router.coldstart``). On CLINC150's in-scope test queries of all ten domains it reports:

- ``own_share``: the share of the newcomer's own queries routed to it (top-1);
- ``trained_taken``: the share of the trained domains' queries it takes from them (``trained_taken_max``: in the
  worst draw);
- ``trained_accuracy``: top-1 accuracy on the trained domains' queries (without the newcomer: ``…_before``);
- ``overall_accuracy``: top-1 accuracy on every test query (without the newcomer its queries are all missed);
- with abstain (the gate's threshold, as ``gate.default_expert`` serves it): ``own_served``, the share of the
  newcomer's queries routed to it and not abstained on; ``trained_abstained``, the share of the trained domains'
  queries abstained on; ``oos_abstained``, the share of CLINC150's out-of-scope test queries abstained on, and
  ``oos_to_newcomer``, the share routed to the newcomer and not abstained on.

Each figure is averaged over the domains and draws, under the gate's fitted claim map (``fitted``) and, for
comparison, under the similarity-only map older artifacts hold (``similarity only``). The headline ``metrics``
are the fitted map's at ``HEADLINE`` examples.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from eval.datasets import CLINC_OOS_LABEL, LabelledQuery, load_clinc150_domains
from eval.labels import label_order
from eval.suite import SuiteContext, subsample

__all__ = ["COUNTS", "DRAWS", "HEADLINE", "run_clinc150_cold_start"]

COUNTS = (1, 3, 6, 10, 20)  # config examples given to the newcomer
DRAWS = 3  # seeded draws of those examples, per domain and count
HEADLINE = 10
MAPS = ("fitted", "similarity only")
MEASURES = ("own_share", "trained_taken", "trained_accuracy", "overall_accuracy", "own_served", "trained_abstained",
            "oos_abstained", "oos_to_newcomer")


def run_clinc150_cold_start(ctx: SuiteContext) -> dict[str, Any]:
    from tqdm.auto import tqdm

    d = ctx.data_dir
    train = _limit(ctx, [q for q in load_clinc150_domains(d, "train") if q.label != CLINC_OOS_LABEL])
    test = _limit(ctx, load_clinc150_domains(d, "test"))
    domains = label_order(q.label for q in train)
    texts = [q.text for q in test]
    x = ctx.encoder.encode(texts)
    y = np.array([q.label for q in test])  # CLINC_OOS_LABEL: out of scope
    rows: list[dict[str, Any]] = []
    before: dict[str, dict[str, float]] = {}
    with tqdm(total=len(domains), desc="cold start, one domain added at a time", unit="domain",
              disable=not ctx.progress) as bar:
        for new in domains:
            measured, before[new] = _domain(ctx, new, domains, train, x, texts, y)
            rows += measured
            bar.update()
    systems = {f"{m}, {n} example{'s' * (n > 1)}": _mean(rows, m, n) for m in MAPS for n in COUNTS}
    headline = systems[f"fitted, {HEADLINE} examples"]
    metrics = {f"{k}@{HEADLINE}": v for k, v in headline.items() if k != "runs"}
    for key in ("trained_accuracy", "overall_accuracy", "trained_abstained", "oos_abstained"):
        metrics[f"{key}_before"] = float(np.mean([b[key] for b in before.values()]))
    ctx.notes.append(f"CLINC150's own split; each of the {len(domains)} domains in turn added by config to a gate "
                     "trained on the others' in-scope training queries, its examples drawn from its own training "
                     f"queries ({DRAWS} seeded draws per count); scored on the in-scope test queries of every "
                     "domain (accuracies and shares) and the out-of-scope ones (abstain); figures are means over "
                     "domains and draws")
    body: dict[str, Any] = {
        "setup": {"train": len(train), "test": int((y != CLINC_OOS_LABEL).sum()),
                  "test_out_of_scope": int((y == CLINC_OOS_LABEL).sum()), "domains": len(domains),
                  "counts": list(COUNTS), "draws": DRAWS},
        "metrics": metrics, "systems": systems,
        "systems_title": "Per claim map and number of examples (means over domains and draws)",
        "before": before, "runs": rows}
    if ctx.plots:
        from eval.report import plot_cold_start

        plot_cold_start(ctx.out / "cold_start.png", {m: [systems[f"{m}, {n} example{'s' * (n > 1)}"]
                                                         for n in COUNTS] for m in MAPS}, COUNTS,
                        metrics["overall_accuracy_before"],
                        "CLINC150: one domain added by config examples to a gate trained on the other nine")
        body["figures"] = ["cold_start.png"]
    return body


def _limit(ctx: SuiteContext, items: list[LabelledQuery]) -> list[LabelledQuery]:
    return subsample(items, ctx.limit, ctx.seed, key=lambda q: q.id)


def _domain(ctx: SuiteContext, new: str, domains: Sequence[str], train: Sequence[LabelledQuery], x: np.ndarray,
            texts: list[str], y: np.ndarray) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """The runs with ``new`` added to a gate trained without it, and that gate's figures without it."""
    from router.gate import train_gate

    trained = [dom for dom in domains if dom != new]
    kept = [q for q in train if q.label != new]
    gate = train_gate([q.text for q in kept], [q.label for q in kept], ctx.encoder, experts=trained, seed=ctx.seed,
                      progress=False)
    own, oos = y == new, y == CLINC_OOS_LABEL
    rest = ~own & ~oos  # the trained domains' queries
    scope = ~oos
    assessed = gate.assess(texts)
    alone = np.array(trained)[assessed.probs.argmax(axis=1)]
    abstained = _abstained(assessed.ood, gate.ood_threshold)
    before = {"trained_accuracy": float(np.mean(alone[rest] == y[rest])),
              "overall_accuracy": float(np.mean(alone[scope] == y[scope])),
              "trained_abstained": float(abstained[rest].mean()), "oos_abstained": _share(abstained[oos])}
    pool = [q.text for q in train if q.label == new]
    similarity_only = copy.copy(gate)  # the same gate, as an artifact from before the fitted claim map
    similarity_only.metadata = dataclasses.replace(gate.metadata, cold_start_claims=None)
    gates = {"fitted": gate, "similarity only": similarity_only}
    rng = np.random.default_rng(ctx.seed)
    runs = []
    for n in COUNTS:
        if n > len(pool):
            continue
        for draw in range(DRAWS):
            examples = [pool[i] for i in rng.choice(len(pool), n, replace=False)]
            for name, served in gates.items():
                view = served.for_experts({**{dom: [] for dom in trained}, new: examples})
                assessed = view.assess(texts)
                top = np.array(view.experts)[assessed.probs.argmax(axis=1)]
                taken, abstained = top == new, _abstained(assessed.ood, view.ood_threshold)
                runs.append({"domain": new, "map": name, "examples": n, "draw": draw,
                             "own_share": _share(taken[own]), "trained_taken": float(taken[rest].mean()),
                             "trained_accuracy": float(np.mean(top[rest] == y[rest])),
                             "overall_accuracy": float(np.mean(top[scope] == y[scope])),
                             "own_served": _share((taken & ~abstained)[own]),
                             "trained_abstained": float(abstained[rest].mean()),
                             "oos_abstained": _share(abstained[oos]),
                             "oos_to_newcomer": _share((taken & ~abstained)[oos])})
    return runs, before


def _abstained(ood: np.ndarray, threshold: float | None) -> np.ndarray:
    return np.zeros(len(ood), dtype=bool) if threshold is None else np.asarray(ood < threshold)


def _share(flags: np.ndarray) -> float:
    """The share of ``flags`` set; nan where there are none (a ``--limit`` run can leave a domain no test query)."""
    return float(flags.mean()) if len(flags) else float("nan")


def _mean(rows: Sequence[dict[str, Any]], name: str, n: int) -> dict[str, float]:
    mine = [r for r in rows if r["map"] == name and r["examples"] == n]
    out = {k: float(np.nanmean([r[k] for r in mine])) if mine else float("nan") for k in MEASURES}
    out["trained_taken_max"] = max((r["trained_taken"] for r in mine), default=float("nan"))
    out["runs"] = len(mine)
    return out
