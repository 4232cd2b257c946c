"""Writing an evaluation's outputs: ``results.json``, ``report.md`` and PNG figures with labelled axes.

Figures are drawn with matplotlib's Agg backend (no display needed), imported only when a figure is drawn.
Every function here takes plain numbers and writes files; none computes a metric.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from eval.metrics import ReliabilityBins
from router.files import atomic_write_text

__all__ = [
    "plot_accuracy_bars",
    "plot_accuracy_cost",
    "plot_cold_start",
    "plot_confusion",
    "plot_cost_curves",
    "plot_quality_cost",
    "plot_reliability",
    "plot_strong_calls",
    "render_markdown",
    "write_results",
]


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float) and math.isinf(value):
        # JSON has no infinity. An infinite setting means something (alpha = inf: the prior alone), so it is
        # written as the gate's own settings write it (``moe train``'s summary), not as null.
        return "inf" if value > 0 else "-inf"
    if isinstance(value, float) and math.isnan(value):
        return None  # null reads as "undefined"
    return value


# Every figure a suite of the harness draws. A run removes those of them its results do not list, so a reused
# ``--out`` never shows an earlier run's figures beside this run's numbers; any other file there is left alone.
HARNESS_FIGURES = ("confusion_matrix.png", "reliability.png", "cascade_familiar.png", "quality_cost.png",
                   "arc_quality_cost.png", "strong_calls.png", "accuracy.png", "accuracy_cost.png",
                   "cold_start.png")


def write_results(out: Path, results: Mapping[str, Any]) -> None:
    """``results.json`` and ``report.md`` in ``out``; the ``HARNESS_FIGURES`` there that ``results["figures"]``
    does not list (an earlier run's) are removed."""
    out.mkdir(parents=True, exist_ok=True)
    # Each under a temporary name, then renamed: a full disk or a kill part way leaves the earlier file whole
    # (``make results`` rewrites them in place of the last run's, ``eval.peer.attach_peer`` once more).
    atomic_write_text(out / "results.json", json.dumps(_jsonable(results), indent=2) + "\n")
    atomic_write_text(out / "report.md", render_markdown(results))
    kept = set(results.get("figures") or ())
    for name in HARNESS_FIGURES:
        stale = out / name
        if name not in kept and stale.is_file():
            stale.unlink()


# ---------------------------------------------------------------- markdown


def _fmt(value: Any) -> str:
    """A value as report.md shows it: numbers to 4 significant digits (inf as ∞, NaN and None as n/a), and a
    setting that holds several (a mapping, a list) as ``key=value`` pairs or a comma list, not as Python's repr."""
    if isinstance(value, float | np.floating):
        number = float(value)
        if math.isinf(number):
            return "∞" if number > 0 else "-∞"
        return "n/a" if math.isnan(number) else f"{number:.4g}"
    if value is None:
        return "n/a"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_fmt_inner(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(_fmt_inner(v) for v in value)
    return str(value)


def _fmt_inner(value: Any) -> str:
    """``_fmt`` for a value inside a mapping or list: one that holds several again is bracketed."""
    shown = _fmt(value)
    if isinstance(value, Mapping):
        return f"({shown})"
    return f"[{shown}]" if isinstance(value, list | tuple) else shown


def _cell(value: Any) -> str:
    """A table cell: a label holding ``|`` or a line break (a user's label may) must not split the row."""
    return " ".join(_fmt(value).replace("\\", "\\\\").replace("|", "\\|").splitlines())


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def _rows_of(systems: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    keys: list[str] = []
    for metrics in systems.values():
        keys += [k for k, v in metrics.items() if k not in keys and not isinstance(v, Mapping | list)]
    return ["system", *keys], [[name, *(m.get(k) for k in keys)] for name, m in systems.items()]


def _curve_rows(curve: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The sweep's points by λ, without λ repeated as a column; consecutive λ with the same point share a row
    (``λ=a to b``)."""
    merged: list[tuple[list[float], dict[str, Any]]] = []
    for p in curve:
        point = {k: v for k, v in p.items() if k != "lambda"}
        if merged and merged[-1][1] == point:
            merged[-1][0][1] = p["lambda"]
        else:
            merged.append(([p["lambda"], p["lambda"]], point))
    return {(f"λ={lo:.4g}" if lo == hi else f"λ={lo:.4g} to {hi:.4g}"): point for (lo, hi), point in merged}


def render_markdown(results: Mapping[str, Any]) -> str:
    lines = [f"# Evaluation: {results['suite']}", ""]
    lines += [f"Command: `{results['command']}`", ""] if results.get("command") else []
    lines += [f"- {k}: {_fmt(v)}" for k, v in results.get("setup", {}).items()] + [""]
    lines += ["## Headline metrics", ""]
    ci = results.get("confidence_intervals", {})
    lines += _table(["metric", "value", "95% CI"],
                    [[k, v, f"[{_fmt(ci[k]['low'])}, {_fmt(ci[k]['high'])}]" if k in ci else ""]
                     for k, v in results["metrics"].items()])
    if results.get("systems"):
        lines += [f"## {results.get('systems_title', 'Gate and baselines on the same test split')}", ""]
        lines += _table(*_rows_of(results["systems"]))
    if results.get("experts"):
        lines += ["## Every single expert on the test split", ""]
        lines += _table(*_rows_of(results["experts"]))
    if results.get("curve"):
        # The evaluation's router's own trade-off: its λ is per unit of predicted cost (the suite's: USD, or
        # thousand output characters where no price is recorded), on another scale than the served gate's unitless
        # gate.cost_weight, so a row names no cost_weight to serve.
        chars = "thousand characters" in str(results.get("setup", {}).get("cost_unit", ""))
        unit = "thousand output characters" if chars else "USD"
        lines += [f"## Quality–cost curve of the evaluation's router (λ per {unit} of predicted cost, not "
                  "gate.cost_weight)", ""]
        lines += _table(*_rows_of(_curve_rows(results["curve"])))
    if results.get("per_class"):
        # "#" is the label's row and column in the confusion matrix, whose figure shows indices past 40 labels (or
        # where cutting long labels to fit the axes would leave two alike).
        order = {lab: i for i, lab in enumerate(results.get("labels") or results["per_class"])}
        lines += ["## Per class (gate)", ""]
        lines += _table(["#", "label", "precision", "recall", "f1", "support"],
                        [[order.get(lab, ""), lab, r["precision"], r["recall"], r["f1"], r["support"]]
                         for lab, r in results["per_class"].items()])
    if results.get("figures"):
        lines += ["## Figures", ""] + [f"![{name}]({name})" for name in results["figures"]] + [""]
    if results.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------- figures


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@functools.cache
def _font_codepoints() -> frozenset[int]:
    """The characters the fonts matplotlib draws text with (its default font and any fallbacks) have glyphs for."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    props = font_manager.FontProperties()
    finder = getattr(font_manager.fontManager, "_find_fonts_by_props", None)  # the fallback list (matplotlib 3.6+)
    try:
        paths = list(finder(props)) if finder is not None else [font_manager.findfont(props)]
    except Exception:  # a private helper whose signature may change: the first font alone then
        paths = [font_manager.findfont(props)]
    return frozenset(itertools.chain.from_iterable(FT2Font(str(p)).get_charmap() for p in paths))


def _legible(text: str) -> str:
    """``text`` as a figure shows it: each character the fonts lack (CJK, emoji: an empty box otherwise) as its
    ASCII escape, ``\\U0001f389`` for 🎉, and so is a control character (a tab: ``\\t``). Every ``$`` is escaped
    (``\\$``, which matplotlib draws as ``$``): text holding two would otherwise be parsed as mathtext, drawing
    ``a_b $x_1$`` as maths and refusing ``$\\frac{a}$`` with a parse error. Figures only: results.json and
    report.md keep the true text."""
    if not (text.isascii() and text.isprintable()):
        have = _font_codepoints()
        text = "".join(c if c.isprintable() and ord(c) in have else c.encode("unicode_escape").decode("ascii")
                       for c in text)
    return text.replace("$", "\\$")


@contextlib.contextmanager
def _quiet_glyphs() -> Iterator[None]:
    """Drawing a character the font lacks warns once per character ("Glyph ... missing from font(s)"); the
    figures escape those characters (``_legible``), so the warnings would only repeat that."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from", category=UserWarning)
        yield


def _finish(plt: Any, fig: Any, ax: Any, path: Path, title: str, *, xlabel: str, ylabel: str,
            legend: str | None = None, legend_size: int = 8, title_size: int | None = None) -> None:
    """Label the axes, title, legend; write the PNG and free the figure."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    shown = "\n".join(map(_legible, title.split("\n")))  # a title's line breaks are meant
    ax.set_title(shown, **({} if title_size is None else {"fontsize": title_size}))
    if legend is not None:
        ax.legend(loc=legend, fontsize=legend_size)
    with _quiet_glyphs():
        fig.tight_layout()
        # The bounding box of what was drawn, not the canvas: a long title or colorbar label is never cut off.
        fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)


def plot_confusion(path: Path, matrix: np.ndarray, labels: Sequence[str], title: str) -> None:
    """Row-normalised confusion matrix (each row: where that true label's queries went)."""
    plt = _pyplot()
    rows = matrix.sum(axis=1, keepdims=True)
    norm = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    n = len(labels)
    shown = _tick_labels(labels) if n <= 40 else None
    named = shown is not None
    # The cells' square plus room for the tick labels (about 0.07 inch a character at 8 points), so a few
    # long labels do not crush the matrix; beyond 40 labels, indices and smaller cells.
    cells = min(max(3.5, (0.35 if named else 0.17) * n), 16.0)
    room = 0.8 + (0.07 * max(map(len, shown), default=0) if shown is not None else 0.4)
    fig, ax = plt.subplots(figsize=(cells + room + 1.6, cells + room))
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, label="fraction of the true label's queries", shrink=0.8)
    key = ""
    if n <= 16:  # few enough cells to write each one's count in it
        for i, j in zip(*np.nonzero(matrix), strict=True):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=6,
                    color="white" if norm[i, j] > 0.5 else "black")
    if shown is not None:
        ax.set_xticks(range(len(labels)), shown, rotation=90, fontsize=8)
        ax.set_yticks(range(len(labels)), shown, fontsize=8)
    else:  # too many to name on the axes, or names that tell no two apart: indices, keyed by report.md's table
        key = " (index: the # column of report.md's per-class table)"
        # The figure stops growing at 16 inches: every 5th index fits up to about 200 labels, and beyond, every
        # 10th, 15th, ... keeps about 40 on an axis, where every 5th ran together ("105110115...").
        step = 5 * math.ceil(n / 200) if n > 40 else 1
        ax.set_xticks(range(0, n, step), [str(i) for i in range(0, n, step)], fontsize=7)
        ax.set_yticks(range(0, n, step), [str(i) for i in range(0, n, step)], fontsize=7)
    _finish(plt, fig, ax, path, title, xlabel=f"predicted label{key}", ylabel=f"true label{key}")


def _clipped(label: str, most: int = 32) -> str:
    """A tick label short enough that the figure keeps its axes: a long one ends in an ellipsis."""
    return label if len(label) <= most else label[:most - 1] + "…"


def _middle_clipped(label: str, most: int = 32) -> str:
    """A tick label short enough that the figure keeps its axes: a long one keeps its start and its end."""
    if len(label) <= most:
        return label
    head = (most - 1) // 2
    return label[:head] + "…" + label[len(label) - (most - 1 - head):]


def _tick_labels(labels: Sequence[str], most: int = 32) -> list[str] | None:
    """The labels as the axes show them (``_legible``, then cut to fit), cut at the end or, where that leaves two
    alike (labels with a long shared start), in the middle; None where both leave two alike: the axes show indices
    then."""
    legible = [_legible(lab) for lab in labels]
    for cut in (_clipped, _middle_clipped):
        shown = [cut(lab, most) for lab in legible]
        if len(set(shown)) == len(set(labels)):
            return shown
    return None


def plot_reliability(path: Path, bins: ReliabilityBins, ece: float, title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    centres = (bins.edges[:-1] + bins.edges[1:]) / 2
    width = bins.edges[1] - bins.edges[0]
    filled = bins.counts > 0
    ax.bar(centres[filled], bins.accuracy[filled], width=width * 0.9, color="tab:blue", alpha=0.8,
           label="accuracy in bin")
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.plot(bins.confidence[filled], bins.accuracy[filled], "o", color="tab:orange", ms=4,
            label="(mean confidence, accuracy)", clip_on=False)
    for x, n in zip(centres[filled], bins.counts[filled], strict=True):
        # How many queries each bar stands for: a bin of two looks as solid as one of two hundred. Written along
        # the foot of the axes, on white, where neither a dot, the diagonal nor the top border covers it.
        ax.annotate(f"{int(n)}", (x, 0), xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                    fontsize=6, color="dimgray", zorder=5,
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85})
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    _finish(plt, fig, ax, path, f"{title}\nECE = {ece:.4f} (at the foot of each bar: queries in its bin)",
            xlabel="confidence (max probability)", ylabel="accuracy", legend="upper left")


def plot_familiar_sweep(path: Path, sweep: Sequence[Mapping[str, Any]], gate_abstain_oos: float,
                        title: str, *, gate_label: str = "full gate alone") -> None:
    """The two-stage gate over ``gate.cascade.familiar``: the share of in-scope queries its static stage decides
    against the share of out-of-scope queries it abstains on, beside the full gate alone (``gate_label``). The
    points are joined in the order of the first axis; the default ``familiar`` is ringed."""
    from router.cascade import FAMILIAR_SHARE

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 5))
    points = sorted((100 * float(r["fast_share"]), 100 * float(r["abstain_oos"]), float(r["familiar"])) for r in sweep)
    x, y = [p[0] for p in points], [p[1] for p in points]
    ax.plot(x, y, "o-", color="tab:blue", label="two-stage gate (point label: familiar)")
    labels: dict[tuple[float, float], list[str]] = {}  # settings that land on the same point share one label
    for xi, yi, familiar in points:
        labels.setdefault((round(xi, 6), round(yi, 6)), []).append(f"{familiar:g}")
        if math.isclose(familiar, FAMILIAR_SHARE):
            ax.plot(xi, yi, "o", ms=12, mfc="none", mec="tab:red", label=f"the default, familiar = {familiar:g}")
    for (xi, yi), names in labels.items():
        ax.annotate(", ".join(names), (xi, yi), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.axhline(100 * gate_abstain_oos, color="tab:red", ls="--", label=gate_label)
    ax.margins(0.15)
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    ax.set_xlim(max(0.0, x0), min(100.0, x1))  # shares: never outside 0-100%
    ax.set_ylim(max(0.0, y0), min(100.0, y1))
    _finish(plt, fig, ax, path, title, xlabel="in-scope test queries decided by the static stage (%)",
            ylabel="out-of-scope test queries sent to the default expert (%)", title_size=10, legend="lower left")


def plot_quality_cost(path: Path, curve: Sequence[tuple[float, float]], hull: tuple[np.ndarray, np.ndarray],
                      singles: Mapping[str, tuple[float, float]], oracle: tuple[float, float] | None,
                      cost_label: str, title: str, *, marked: Mapping[str, tuple[float, float]] | None = None) -> None:
    """The router's (cost, accuracy) sweep, its non-decreasing convex hull, every single expert (grey squares)
    and the oracle; ``marked``: the headline routers, each a labelled point."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 6))
    cx, cy = zip(*curve, strict=True)
    ax.plot(cx, cy, ".-", color="tab:blue", label="success model alone (no margin), swept over λ")
    ax.plot(hull[0], hull[1], "--", color="tab:blue", alpha=0.5, label="convex hull (AIQ)")
    ax.plot([], [], "s", color="tab:gray", ms=4, label="single expert")
    _plot_singles(ax, singles, key_at=0.0)
    for (name, (c, q)), (marker, color) in zip((marked or {}).items(), (("D", "tab:green"), ("P", "tab:purple")),
                                               strict=False):
        ax.plot(c, q, marker, color=color, ms=9, label=f"{name}: {q:.3f}")
    if oracle is not None:
        ax.plot(*oracle, "*", color="tab:red", ms=10, label="cheapest-correct oracle")
    ax.set_xscale("log")
    ax.grid(True, which="both", axis="x", alpha=0.25)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # beside the axes: it covers no point
    _finish(plt, fig, ax, path, title, xlabel=cost_label, ylabel="accuracy")


def plot_cold_start(path: Path, maps: Mapping[str, Sequence[Mapping[str, float]]], counts: Sequence[int],
                    overall_before: float, title: str) -> None:
    """Per claim map, a newcomer's share of its own queries (and of those not abstained on), the share it takes of
    the trained experts' and the overall accuracy, against its number of config examples; the overall accuracy
    without it for reference."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10.5, 5.5))
    for (name, points), style in zip(maps.items(), ("-", "--"), strict=False):
        for key, label, color in (("own_share", "its own queries routed to it", "tab:blue"),
                                  ("own_served", "... and not abstained on", "tab:purple"),
                                  ("trained_taken", "trained experts' queries it takes", "tab:red"),
                                  ("overall_accuracy", "overall accuracy", "tab:green")):
            ax.plot(counts, [p[key] for p in points], "o" + style, color=color, label=f"{label} ({name})")
    ax.axhline(overall_before, color="tab:gray", ls=":", lw=0.8,
               label=f"overall accuracy without it ({overall_before:.3f})")
    ax.set_xscale("log")
    ax.set_xticks(list(counts), [str(c) for c in counts])
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)  # beside the plot: the curves fill it
    _finish(plt, fig, ax, path, title, xlabel="config examples of the added expert", ylabel="share of queries")


def plot_cost_curves(path: Path, curves: Mapping[str, Sequence[tuple[float, float]]],
                     reference: tuple[str, float, float], budget_share: float, cost_label: str, title: str) -> None:
    """Several systems' (cost, accuracy) sweeps on one task against a reference model: its point, and a vertical
    line at ``budget_share`` of its cost (a target's budget)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    for (name, curve), color in zip(curves.items(), ("tab:blue", "tab:purple", "tab:olive"), strict=False):
        cx, cy = zip(*sorted(curve), strict=True)  # in cost order: a sweep need not be monotone in cost
        ax.plot(cx, cy, ".-", color=color, label=name)
    name, cost, accuracy = reference
    ax.plot(cost, accuracy, "s", color="tab:green", ms=8, label=f"{name} ({accuracy:.3f})")
    ax.axhline(accuracy, color="tab:green", ls=":", lw=0.8)
    ax.axvline(budget_share * cost, color="tab:red", ls="--", lw=0.8, label=f"{budget_share:.0%} of its cost")
    ax.set_xscale("log")
    _finish(plt, fig, ax, path, title, xlabel=cost_label, ylabel="accuracy", legend="lower right")


def plot_strong_calls(path: Path, curves: Mapping[str, tuple[np.ndarray, np.ndarray]], strong: float,
                      weak: float, title: str, *, cpt: Mapping[float, float] | None = None) -> None:
    """RouteLLM's figure: accuracy against the share of calls sent to the strong model.

    ``curves``: the first is the router's, drawn with CPT points on it; any others (a seeded random router)
    are drawn faintly. The straight line from (0 %, weak) to (100 %, strong) is what a random router gets
    in expectation. ``cpt`` maps a threshold (50 for CPT(50%)) to its % of strong calls (NaN: never reached);
    each point sits at the accuracy that threshold asks for, ``weak + t/100 * (strong - weak)``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5.2))
    for i, (name, (x, y)) in enumerate(curves.items()):
        style = {"color": "tab:blue", "lw": 2} if i == 0 else {"color": "tab:gray", "alpha": 0.6, "ms": 3}
        ax.plot(x, y, ".-" if i == 0 else ".:", label=name, **style)
    ax.plot([0, 100], [weak, strong], color="tab:orange", ls="-.", label="random router (expected)")
    ax.axhline(strong, color="tab:green", ls="--", label=f"strong model alone ({strong:.3f})")
    ax.axhline(weak, color="tab:red", ls="--", label=f"weak model alone ({weak:.3f})")
    for threshold, pct in (cpt or {}).items():
        if not math.isfinite(pct):
            continue
        level = weak + threshold / 100 * (strong - weak)
        ax.plot(pct, level, "D", color="black", ms=6, zorder=5)
        ax.vlines(pct, weak, level, colors="black", linestyles=":", lw=0.8)
        # Up and to the left: a router's curve rises to the right, so that corner is free.
        ax.annotate(f"CPT({threshold:g}%) = {pct:.1f}%", (pct, level), xytext=(-6, 6), textcoords="offset points",
                    ha="right", va="bottom", fontsize=8)
    ax.set_xlim(-2, 102)
    _finish(plt, fig, ax, path, title, xlabel="calls to the strong model (%)", ylabel="accuracy on the test split",
            title_size=10, legend="lower right")


Bar = tuple[str, float, tuple[float, float] | None]  # (label, value, 95% interval or None)


def _axis_floor(values: Sequence[float]) -> float:
    """Where an accuracy axis starts: 0.05 below the lowest value, on a 0.05 step, never below 0."""
    return max(0.0, math.floor((min(values) - 0.05) * 20) / 20)


def plot_accuracy_bars(path: Path, bars: Sequence[Bar], title: str, *,
                       references: Sequence[tuple[str, float]] = (), ylabel: str = "accuracy on the test split",
                       notes: Sequence[str] = ()) -> None:
    """One bar per system, ``(label, accuracy, (low, high) or None)``, with the interval as an error bar;
    ``references`` (an oracle) are hatched bars without one. ``notes`` go under each bar (its cost).

    The axis starts just below the lowest value (the label says where), so gaps of a point or two show."""
    plt = _pyplot()
    labels = [b[0] for b in bars] + [r[0] for r in references]
    values = [b[1] for b in bars] + [r[1] for r in references]
    lows = [b[2][0] if b[2] else b[1] for b in bars]
    floor = _axis_floor([*values, *lows])
    fig, ax = plt.subplots(figsize=(max(6.0, 1.25 * len(labels) + 1.5), 5.2))
    xs = np.arange(len(labels))
    errs = np.array([[b[1] - b[2][0], b[2][1] - b[1]] if b[2] else [0.0, 0.0] for b in bars]).T
    with_ci = any(b[2] for b in bars)
    ax.bar(xs[:len(bars)], [b[1] for b in bars], yerr=errs if with_ci else None, capsize=4, color="tab:blue",
           alpha=0.85, label="system (error bar: 95% bootstrap CI)" if with_ci else "system")
    if references:
        ax.bar(xs[len(bars):], [r[1] for r in references], color="white", edgecolor="tab:gray", hatch="//",
               label="reference (not a deployable system)")
    tops = [b[2][1] if b[2] else b[1] for b in bars] + [r[1] for r in references]
    for x, v, top in zip(xs, values, tops, strict=True):  # above the error bar, where nothing covers it
        ax.annotate(f"{v:.3f}", (x, top), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=8)
    ticks = [f"{lab}\n{note}" if note else lab for lab, note in
             itertools.zip_longest(labels, notes[:len(labels)], fillvalue="")]
    ax.set_xticks(xs, ticks, fontsize=8)
    ax.set_ylim(floor, min(1.0, max(tops) + 0.04))  # an accuracy; the value labels above the bars may overhang
    _finish(plt, fig, ax, path, title, xlabel="system",
            ylabel=f"{ylabel} (axis from {floor:.2f})" if floor > 0 else ylabel, legend="upper left")


# Past this many single experts, their names would cover one another: the points are numbered instead, with a key.
_NAMED_SINGLES = 8


def _plot_singles(ax: Any, singles: Mapping[str, tuple[float, float]], *, key_at: float) -> None:
    """Every single expert's (cost, accuracy) as a grey square. A few are labelled with their names (cut to fit,
    never two alike); more are numbered by accuracy, best first, with the key beside the axes (its foot at
    ``key_at`` of their height), since many experts share a cost and accuracy region and their names overlap."""
    names = [name.split("/")[-1] for name in singles]
    shown = _tick_labels(names, 22) if len(singles) <= _NAMED_SINGLES and len(set(names)) == len(names) else None
    order = sorted(range(len(names)), key=lambda i: (-list(singles.values())[i][1], names[i]))
    number = {i: n + 1 for n, i in enumerate(order)}
    for i, (c, q) in enumerate(singles.values()):
        ax.plot(c, q, "s", color="tab:gray", ms=4)
        ax.annotate(shown[i] if shown is not None else str(number[i]), (c, q), fontsize=6, xytext=(3, 2),
                    textcoords="offset points", annotation_clip=False)
    if shown is None:
        key = "\n".join(f"{number[i]:>2}  {_legible(list(singles)[i])}" for i in order)
        ax.text(1.02, key_at, f"single experts\n{key}", transform=ax.transAxes, fontsize=6, va="bottom",
                family="monospace")


def plot_accuracy_cost(path: Path, systems: Mapping[str, tuple[float, float]],
                       singles: Mapping[str, tuple[float, float]], cost_label: str, title: str) -> None:
    """Each system's (cost, accuracy) as a labelled point among every single expert's (grey squares)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    _plot_singles(ax, singles, key_at=0.0)
    # Systems often coincide (a gate that keeps the best single expert): each is drawn smaller than the one
    # before, so every marker stays visible.
    for i, (marker, (name, (c, q))) in enumerate(zip(itertools.cycle("o^vD*P"), systems.items(), strict=False)):
        ax.plot(c, q, marker, ms=max(14 - 2 * i, 4), alpha=0.85, label=f"{name}: {q:.3f} at {c:.3g}")
    ax.set_xscale("log")
    _finish(plt, fig, ax, path, title, xlabel=cost_label, ylabel="accuracy on the test split", legend="best",
            legend_size=7)
