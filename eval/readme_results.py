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
    """A goal an issue states, and how to check it against one suite's ``metrics`` (None: cannot tell).

    ``judge``, when given, reads the whole results (intervals included) and returns the cell's verdict in words
    (None: fall back to ``check``'s mark), so a target met only within noise is not shown as plainly met."""

    text: str
    check: Callable[[Metrics], bool | None]
    judge: Callable[[Mapping[str, Any]], str | None] | None = None


def _straddles(key: str, bar: float) -> Callable[[Mapping[str, Any]], str | None]:
    """``check``'s mark, plus the margin in test queries and a warning when the 95% interval straddles ``bar``."""

    def judge(r: Mapping[str, Any]) -> str | None:
        value, ci = _num(r["metrics"].get(key)), r.get("confidence_intervals", {}).get(key)
        if value is None or not ci or _num(ci.get("low")) is None or not ci["low"] < bar <= ci["high"]:
            return None
        mark = "✅" if value >= bar else "❌"
        n = _num(r.get("setup", {}).get("test"))
        by = ""
        if n:
            queries = round(value * n) - math.ceil(bar * n - 1e-9)
            by = f" by {abs(queries)} of {int(n)} test queries" if value >= bar else ""
        return (f"{mark}{by}, not shown: its 95% interval [{_f(ci['low'])}, {_f(ci['high'])}] straddles "
                f"{bar:g}")

    return judge


def _at_least(key: str, bar: float) -> Callable[[Metrics], bool | None]:
    return lambda m: None if _num(m.get(key)) is None else float(m[key]) >= bar


def _beats_peer(m: Metrics) -> bool | None:
    ours, peer = _num(m.get("accuracy")), _num(m.get(f"{PEER}_accuracy"))
    return None if ours is None or peer is None else ours > peer


def _served_vs_best(r: Mapping[str, Any]) -> str | None:
    """The served gate against the best single LLM (chosen on training) with the paired bootstrap interval of
    their difference on test: met only when the interval lies above 0; within noise when it holds 0."""
    ci = r.get("confidence_intervals", {}).get("served_minus_best_single")
    if not ci or _num(ci.get("low")) is None:
        return None
    d = (f"served − best single {float(ci['estimate']):+.4f}, 95% paired bootstrap interval "
         f"[{float(ci['low']):+.4f}, {float(ci['high']):+.4f}]")
    if ci["low"] > 0:
        return f"✅ ({d})"
    if ci["high"] < 0:
        return f"❌ ({d})"
    return f"{'≈' if ci['estimate'] >= 0 else '❌'}, not shown: within noise ({d})"


def _routed_vs_best(m: Metrics) -> bool | None:
    """Judged on the gate the product serves (``served_routed_accuracy``); results from before it was scored
    fall back to the evaluation's tuned router."""
    ours = _num(m.get("served_routed_accuracy", m.get("routed_accuracy")))
    best = _num(m.get("best_single_accuracy"))
    return None if ours is None or best is None else ours >= best


def _arc_cost(m: Metrics) -> bool | None:
    """Met when an operating point chosen on tuning data (routing to one expert, or ``escalate``) reaches GPT-4's
    test accuracy at ≤ 30% of its test cost. Results from before the points were chosen on tuning carry no
    ``arc_gpt4_match_accuracy`` and are judged on the share alone."""
    # None in results.json means the curve never reached GPT-4's accuracy on ARC: the target is missed.
    if "arc_gpt4_cost_share" not in m:
        return None
    gpt4 = _num(m.get("arc_gpt4_accuracy"))
    for prefix in ("arc_", "arc_escalate_"):
        share, acc = _num(m.get(f"{prefix}gpt4_cost_share")), _num(m.get(f"{prefix}gpt4_match_accuracy"))
        reached = gpt4 is None or "arc_gpt4_match_accuracy" not in m or (acc is not None and acc >= gpt4)
        if share is not None and share <= 0.30 and reached:
            return True
    return False


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
    "mmlu-pro-domain": [Target("acc@1 ≥ 0.85", _at_least("accuracy", 0.85), _straddles("accuracy", 0.85)),
                        Target("top-2 ≥ 0.95", _at_least("top2_recall", 0.95), _straddles("top2_recall", 0.95)),
                        _PEER_TARGET],
    "clinc150-domain": [Target("acc@1 ≥ 0.98", _at_least("accuracy", 0.98), _straddles("accuracy", 0.98)),
                        Target("OOS AUROC ≥ 0.97", _at_least("oos_auroc", 0.97)), _PEER_TARGET],
    "snips-intent": [_PEER_TARGET],
    "banking77-intent": [_PEER_TARGET],
    "mmlu-pro-outcome": [Target("served gate's top-1 ≥ best single on training", _routed_vs_best, _served_vs_best)],
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


# Not combiner strategies: baselines and references (the stacked reference calls every model; a ceiling to read).
_REFERENCES = {"best_single_accuracy", "oracle_accuracy", "random_accuracy", "stacked_reference_accuracy"}


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


def _unit(r: Mapping[str, Any]) -> str:
    """The cost unit, short: ``setup.cost_unit`` as the outcome suites record it."""
    unit = str(r.get("setup", {}).get("cost_unit", ""))
    if unit.startswith("USD"):
        return " USD/query"
    if "thousand characters" in unit:
        return " k output chars/query"
    return f" {unit}" if unit else ""


def _share(m: Metrics, acc: str, share: str, chosen: str = "λ") -> str:
    if _num(m.get(acc)) is None:
        return f"none (no {chosen} qualified on tuning)"
    return f"{_f(m.get(acc))} at {_f(m.get(share), 2)} of its cost"


def _outcome_cells(r: Mapping[str, Any]) -> tuple[str, str, str]:
    m = r["metrics"]
    unit = _unit(r)
    head = (f"routed acc **{_f(m['routed_accuracy'])}**{_ci(r, 'routed_accuracy')} at cost "
            f"{_f(m.get('routed_cost'), 4)}{unit}, AIQ {_f(m.get('aiq'))}")
    head += f" ({_f(m['aiq_from_zero'])} as RouterBench's code normalises)" if "aiq_from_zero" in m else ""
    if "served_routed_accuracy" in m:
        head += f"; served gate (`moe train`) acc **{_f(m['served_routed_accuracy'])}**"
    if m.get("arc_operating_points_chosen_on") == "tuning":
        head += (f"; ARC (GPT-4 {_f(m.get('arc_gpt4_accuracy'))}), λ chosen on tuning, scored on test: the "
                 f"cheapest λ reaching GPT-4 on tuning {_share(m, 'arc_gpt4_match_accuracy', 'arc_gpt4_cost_share')}"
                 f", with `escalate` {_share(m, 'arc_escalate_gpt4_match_accuracy', 'arc_escalate_gpt4_cost_share')}"
                 f"; the best λ within 30% of GPT-4's cost on tuning "
                 f"{_share(m, 'arc_accuracy_within_30pct', 'arc_cost_share_within_30pct')}, with `escalate` "
                 f"{_share(m, 'arc_escalate_accuracy_within_30pct', 'arc_escalate_cost_share_within_30pct')}")
        if "arc_pair_escalate_accuracy_within_30pct" in m:
            pair = _share(m, "arc_pair_escalate_accuracy_within_30pct", "arc_pair_escalate_cost_share_within_30pct",
                          chosen="pair")
            head += (f"; reference, a fixed pair escalating to GPT-4 when they disagree (no gate), the best within "
                     f"30% on tuning {pair}, the best within 30% on test, with hindsight, "
                     f"{_f(m.get('arc_pair_escalate_best_on_test_accuracy'))}")
    else:
        if "arc_gpt4_cost_share" in m:
            head += f"; ARC: GPT-4's accuracy at {_f(m['arc_gpt4_cost_share'], 2)} of its cost"
        if "arc_escalate_accuracy_within_30pct" in m:
            head += (f"; ARC within 30% of GPT-4's cost: acc {_f(m.get('arc_accuracy_within_30pct'))}, "
                     f"with `escalate` {_f(m['arc_escalate_accuracy_within_30pct'])}")
    systems = {k: v for k, v in r.get("systems", {}).items()
               if not k.startswith(("gate", "served gate", "oracle")) and _num(v.get("accuracy")) is not None}
    best = max(systems, key=lambda k: systems[k]["accuracy"]) if systems else None
    shown = best.replace("best single (", "best single on training (", 1) if best else None
    base = (f"{shown} acc {_f(systems[best]['accuracy'])} at cost {_f(systems[best].get('cost'), 4)}{unit}" if best
            else f"best single on training acc {_f(m.get('best_single_accuracy'))}")
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
    # Strategies with the same answer on every test query are one system: named together, shown once.
    alias = {name: group for group in r.get("setup", {}).get("identical_strategies", []) for name in group}
    cells, done = [], set()
    for name, v in shown:
        group = [g for g in alias.get(name, [name]) if g in dict(shown)]
        if name in done:
            continue
        done.update(group)
        cells.append(f"{' = '.join(group)} {_f(v)}" + (" (same answers)" if len(group) > 1 else ""))
    head = ", ".join(cells) or "n/a"
    head += f" (chosen by cross-validation: {m['chosen_strategy']})" if m.get("chosen_strategy") else ""
    panels = r.get("setup", {}).get("panel_k")
    head += f"; chosen panel sizes: {', '.join(f'{k} top-{v}' for k, v in panels.items())}" if panels else ""
    base = f"best single on training acc {_f(m.get('best_single_accuracy'))}"
    if "stacked_reference_accuracy" in m:
        base += f"; stacked classifier over every model's answer (reference) {_f(m['stacked_reference_accuracy'])}"
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


def _targets(suite: str, r: Mapping[str, Any]) -> str:
    marks = {True: "✅", False: "❌", None: "?"}
    shown = []
    for t in TARGETS.get(suite, []):
        verdict = t.judge(r) if t.judge is not None else None
        shown.append(f"{t.text} {verdict if verdict is not None else marks[t.check(r['metrics'])]}")
    return "; ".join(shown) or "—"


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
        rows.append([f"`{r['suite']}`", head, base, peer, _targets(r["suite"], r), command,
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
