"""The README's results table, rendered from ``results.json`` files only, and rewritten between two markers.

``render_block`` reads nothing but the results it is given (as ``load_results`` reads them from disk), so every
number in the README comes from a run's outputs. Targets are the ones the issues state (issue 3: the gate, issue
4: the combiner); each is shown with whether this run meets it. ``rewrite_readme`` replaces only the text
between ``START`` and ``END`` and leaves the rest of the file byte for byte.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["END", "START", "TARGETS", "Target", "load_results", "render_block", "rewrite_readme"]

START = "<!-- results:start -->"
END = "<!-- results:end -->"
PEER = "peer_semantic_router"

Metrics = Mapping[str, Any]


@dataclass(frozen=True)
class Target:
    """A goal an issue states, and how to check it against one suite's ``metrics`` (None: cannot tell)."""

    text: str
    check: Callable[[Metrics], bool | None]


def _at_least(key: str, bar: float) -> Callable[[Metrics], bool | None]:
    return lambda m: None if _num(m.get(key)) is None else float(m[key]) >= bar


def _beats_peer(m: Metrics) -> bool | None:
    ours, peer = _num(m.get("accuracy")), _num(m.get(f"{PEER}_accuracy"))
    return None if ours is None or peer is None else ours > peer


def _routed_vs_best(m: Metrics) -> bool | None:
    """Judged on the gate the product serves (``served_routed_accuracy``); results from before it was scored
    fall back to the evaluation's tuned router."""
    ours = _num(m.get("served_routed_accuracy", m.get("routed_accuracy")))
    best = _num(m.get("best_single_accuracy"))
    return None if ours is None or best is None else ours >= best


def _arc_cost(m: Metrics) -> bool | None:
    # None in results.json means the curve never reached GPT-4's accuracy on ARC: the target is missed.
    if "arc_gpt4_cost_share" not in m:
        return None
    share = _num(m["arc_gpt4_cost_share"])
    return share is not None and share <= 0.30


def _combine_margin(m: Metrics) -> bool | None:
    """Judged on the strategy the suite chose by cross-validation (``chosen_minus_best_single``); results from
    before that choice existed fall back to the best strategy's figure."""
    chosen = _num(m.get("chosen_minus_best_single"))
    if chosen is not None:
        return chosen >= 0.05 - 1e-12
    best, strategies = _num(m.get("best_single_accuracy")), _strategies(m)
    return None if best is None or not strategies else max(strategies.values()) >= best + 0.05


_PEER_TARGET = Target("beat semantic-router", _beats_peer)
TARGETS: dict[str, list[Target]] = {
    "mmlu-pro-domain": [Target("acc@1 ≥ 0.85", _at_least("accuracy", 0.85)),
                        Target("top-2 ≥ 0.95", _at_least("top2_recall", 0.95)), _PEER_TARGET],
    "clinc150-domain": [Target("acc@1 ≥ 0.98", _at_least("accuracy", 0.98)),
                        Target("OOS AUROC ≥ 0.97", _at_least("oos_auroc", 0.97)), _PEER_TARGET],
    "snips-intent": [_PEER_TARGET],
    "banking77-intent": [_PEER_TARGET],
    "mmlu-pro-outcome": [Target("served gate's top-1 ≥ best single", _routed_vs_best)],
    "routerbench": [Target("ARC: GPT-4's accuracy at ≤ 30% of its cost", _arc_cost)],
    "mmlu-pro-combine": [Target("strategy chosen by cross-validation ≥ best single + 0.05", _combine_margin)],
}


# ---------------------------------------------------------------- reading


def load_results(root: Path, suites: Sequence[str]) -> list[dict[str, Any]]:
    """``root/<suite>/results.json`` for each suite that has one, in the given order."""
    found = []
    for suite in suites:
        path = root / suite / "results.json"
        if path.exists():
            found.append(json.loads(path.read_text(encoding="utf-8")))
    return found


# ---------------------------------------------------------------- rendering


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _f(value: Any, digits: int = 3) -> str:
    v = _num(value)
    return "n/a" if v is None else f"{v:.{digits}f}"


def _ci(results: Mapping[str, Any], key: str) -> str:
    ci = results.get("confidence_intervals", {}).get(key)
    if not ci or _num(ci.get("low")) is None:
        return ""
    return f" [{_f(ci['low'])}, {_f(ci['high'])}]"


_REFERENCES = {"best_single_accuracy", "oracle_accuracy", "random_accuracy"}  # not combiner strategies


def _strategies(m: Metrics) -> dict[str, float]:
    """A combine suite's ``<strategy>_accuracy`` figures (not the best single's)."""
    return {k.removesuffix("_accuracy"): float(v) for k, v in m.items()
            if k.endswith("_accuracy") and k not in _REFERENCES and not k.startswith(PEER)
            and _num(v) is not None}


def _label_cells(r: Mapping[str, Any]) -> tuple[str, str, str]:
    m = r["metrics"]
    head = (f"acc@1 **{_f(m['accuracy'])}**{_ci(r, 'accuracy')}, top-2 {_f(m.get('top2_recall'))}, "
            f"macro-F1 {_f(m.get('macro_f1'))}, ECE {_f(m.get('ece'))}")
    head += f", OOS AUROC {_f(m['oos_auroc'])}" if "oos_auroc" in m else ""
    if "cascade_accuracy" in m:
        head += (f"; two-stage acc@1 {_f(m['cascade_accuracy'])}, static stage decides "
                 f"{100 * float(m['cascade_fast_share']):.0f}%")
    baselines = {k: v for k, v in r.get("systems", {}).items()
                 if k not in ("gate", "cascade") and not k.startswith("gate classifier:")  # ours, one member alone
                 and _num(v.get("accuracy")) is not None}
    best = max(baselines, key=lambda k: baselines[k]["accuracy"]) if baselines else None
    base = f"{best} acc@1 {_f(baselines[best]['accuracy'])}" if best else "n/a"
    peer = "not run"
    if f"{PEER}_accuracy" in m:
        peer = f"acc@1 {_f(m[f'{PEER}_accuracy'])}"
        peer += f", OOS AUROC {_f(m[f'{PEER}_oos_auroc'])}" if f"{PEER}_oos_auroc" in m else ""
    return head, base, peer


def _outcome_cells(r: Mapping[str, Any]) -> tuple[str, str, str]:
    m = r["metrics"]
    head = (f"routed acc **{_f(m['routed_accuracy'])}**{_ci(r, 'routed_accuracy')} at cost "
            f"{_f(m.get('routed_cost'), 4)}, AIQ {_f(m.get('aiq'))}")
    if "served_routed_accuracy" in m:
        head += f"; served gate (`moe train`) acc **{_f(m['served_routed_accuracy'])}**"
    if "arc_gpt4_cost_share" in m:
        head += f"; ARC: GPT-4's accuracy at {_f(m['arc_gpt4_cost_share'], 2)} of its cost"
    if "arc_escalate_accuracy_within_30pct" in m:
        head += (f"; ARC within 30% of GPT-4's cost: acc {_f(m.get('arc_accuracy_within_30pct'))}, "
                 f"with `escalate` {_f(m['arc_escalate_accuracy_within_30pct'])}")
    systems = {k: v for k, v in r.get("systems", {}).items()
               if not k.startswith(("gate", "served gate", "oracle")) and _num(v.get("accuracy")) is not None}
    best = max(systems, key=lambda k: systems[k]["accuracy"]) if systems else None
    base = (f"{best} acc {_f(systems[best]['accuracy'])} at cost {_f(systems[best].get('cost'), 4)}" if best
            else f"best single acc {_f(m.get('best_single_accuracy'))}")
    base += f"; oracle {_f(m.get('oracle_accuracy'))}"
    return head, base, "—"


def _strong_weak_cells(r: Mapping[str, Any]) -> tuple[str, str, str]:
    m = r["metrics"]
    head = (f"APGR **{_f(m['apgr'])}**{_ci(r, 'apgr')}, CPT(50%) {_f(m.get('cpt50'), 1)}%, "
            f"CPT(80%) {_f(m.get('cpt80'), 1)}%")
    base = (f"random APGR {_f(m.get('random_apgr'))}; weak acc {_f(m.get('weak_accuracy'))}, strong "
            f"{_f(m.get('best_single_accuracy'))}, oracle {_f(m.get('oracle_accuracy'))}")
    return head, base, "—"


def _combine_cells(r: Mapping[str, Any]) -> tuple[str, str, str]:
    m = r["metrics"]
    shown = sorted(_strategies(m).items(), key=lambda kv: -kv[1])
    head = ", ".join(f"{name} {_f(v)}" for name, v in shown) or "n/a"
    head += f" (chosen by cross-validation: {m['chosen_strategy']})" if m.get("chosen_strategy") else ""
    base = f"best single acc {_f(m.get('best_single_accuracy'))}"
    base += f"; oracle {_f(m['oracle_accuracy'])}" if "oracle_accuracy" in m else ""
    return head, base, "—"


def _generic_cells(r: Mapping[str, Any]) -> tuple[str, str, str]:
    shown = [f"{k} {_f(v)}" for k, v in r["metrics"].items() if _num(v) is not None]
    return ", ".join(shown) or "n/a", "n/a", "—"


def _cells(r: Mapping[str, Any]) -> tuple[str, str, str]:
    m = r["metrics"]
    if "accuracy" in m:
        return _label_cells(r)
    if "routed_accuracy" in m:
        return _outcome_cells(r)
    if "apgr" in m:
        return _strong_weak_cells(r)
    if "best_single_accuracy" in m and _strategies(m):
        return _combine_cells(r)
    return _generic_cells(r)


def _targets(suite: str, m: Metrics) -> str:
    marks = {True: "✅", False: "❌", None: "?"}
    return "; ".join(f"{t.text} {marks[t.check(m)]}" for t in TARGETS.get(suite, [])) or "—"


def _escape(cell: str) -> str:
    return cell.replace("|", "\\|").replace("\n", " ")


def render_block(results: Sequence[Mapping[str, Any]]) -> str:
    """The Markdown between the markers: a caption line and one table, one row per suite."""
    header = ["suite", "ours (gate)", "best baseline", "peer: semantic-router", "target (issue)", "reproduce",
              "date", "machine"]
    rows = []
    for r in results:
        setup = r.get("setup", {})
        head, base, peer = _cells(r)
        command = f"`{r['command']}`" if r.get("command") else "n/a"
        rows.append([f"`{r['suite']}`", head, base, peer, _targets(r["suite"], r["metrics"]), command,
                     str(setup.get("date", "n/a")), str(setup.get("machine", "n/a"))])
    lines = [
        "Generated by `make results` (`python -m eval.results`) from each suite's `results.json` under "
        "`out/results/`; edit nothing here by hand. Test splits only; 95% bootstrap intervals in brackets. "
        "semantic-router runs in its own venv on the identical split "
        "(`bench/peers/semantic_router_accuracy.py`, same MiniLM weights); ✅/❌ say whether this run meets the "
        "target its issue states.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(_escape(c) for c in row) + " |" for row in rows),
    ]
    return "\n".join(lines) + "\n"


def rewrite_readme(text: str, block: str) -> str:
    """``text`` with everything between the markers replaced by ``block``; a Results section is appended
    when neither marker is there. One marker without the other is an error, not a guess."""
    has_start, has_end = text.count(START), text.count(END)
    if has_start == has_end == 0:
        return text.rstrip("\n") + f"\n\n## Results\n\n{START}\n{block}{END}\n"
    if has_start != 1 or has_end != 1 or text.index(START) > text.index(END):
        raise ValueError(f"the README needs exactly one {START} followed by one {END}")
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    return f"{before}{START}\n{block}{END}{after}"
