"""Cold start, measured: each CLINC150 domain in turn is added by config to a gate trained on the other nine.

For every domain, the gate is trained on the other domains' training queries (CLINC150's own split, in scope
only), and the domain is then added as a config expert with ``n`` of its own training queries as ``examples``
(``COUNTS``, ``DRAWS`` seeded draws each), with no retraining: ``Gate.for_experts``, as a config edit serves it
(``router.coldstart``). On CLINC150's in-scope test queries of all ten domains it reports:

- ``own_share``: the share of the newcomer's own queries routed to it (top-1);
- ``trained_taken``: the share of the trained domains' queries it takes from them (``trained_taken_max``: in the
  worst draw);
- ``trained_accuracy``: top-1 accuracy on the trained domains' queries (without the newcomer: ``…_before``);
- ``overall_accuracy``: top-1 accuracy on every test query (without the newcomer its queries are all missed).

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
MEASURES = ("own_share", "trained_taken", "trained_accuracy", "overall_accuracy")


def run_clinc150_cold_start(ctx: SuiteContext) -> dict[str, Any]:
    from tqdm.auto import tqdm

    d = ctx.data_dir
    train = _limit(ctx, [q for q in load_clinc150_domains(d, "train") if q.label != CLINC_OOS_LABEL])
    test = _limit(ctx, [q for q in load_clinc150_domains(d, "test") if q.label != CLINC_OOS_LABEL])
    domains = label_order(q.label for q in train)
    texts = [q.text for q in test]
    x = ctx.encoder.encode(texts)
    y = np.array([q.label for q in test])
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
    metrics["trained_accuracy_before"] = float(np.mean([b["trained_accuracy"] for b in before.values()]))
    metrics["overall_accuracy_before"] = float(np.mean([b["overall_accuracy"] for b in before.values()]))
    ctx.notes.append(f"CLINC150's own split, in-scope queries only; each of the {len(domains)} domains in turn "
                     f"added by config to a gate trained on the others' training queries, its examples drawn from "
                     f"its own training queries ({DRAWS} seeded draws per count); scored on the test queries of "
                     "every domain; figures are means over domains and draws")
    body: dict[str, Any] = {
        "setup": {"train": len(train), "test": len(test), "domains": len(domains), "counts": list(COUNTS),
                  "draws": DRAWS},
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
    own = y == new
    alone = np.array(trained)[gate.predict_proba(x, texts).argmax(axis=1)]
    before = {"trained_accuracy": float(np.mean(alone[~own] == y[~own])),
              "overall_accuracy": float(np.mean(alone == y))}
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
                top = np.array(view.experts)[view.predict_proba(x, texts).argmax(axis=1)]
                taken = top == new
                runs.append({"domain": new, "map": name, "examples": n, "draw": draw,
                             "own_share": float(taken[own].mean()) if own.any() else float("nan"),
                             "trained_taken": float(taken[~own].mean()),
                             "trained_accuracy": float(np.mean(top[~own] == y[~own])),
                             "overall_accuracy": float(np.mean(top == y))})
    return runs, before


def _mean(rows: Sequence[dict[str, Any]], name: str, n: int) -> dict[str, float]:
    mine = [r for r in rows if r["map"] == name and r["examples"] == n]
    out = {k: float(np.nanmean([r[k] for r in mine])) if mine else float("nan") for k in MEASURES}
    out["trained_taken_max"] = max((r["trained_taken"] for r in mine), default=float("nan"))
    out["runs"] = len(mine)
    return out
