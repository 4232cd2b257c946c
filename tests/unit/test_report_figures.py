"""The figures of ``eval.report``: each writes a PNG that reads back, and ``routellm-mmlu`` draws its curve."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from eval import report
from eval.harness import run_suite
from eval.metrics import strong_call_curve
from eval.report import plot_accuracy_bars, plot_accuracy_cost, plot_confusion, plot_strong_calls, render_markdown
from tests.doubles.fakes import FakeHashingEncoder
from tests.support import PNG_SIGNATURE


def _read_png(path: Path) -> tuple[int, int]:
    """(height, width) of a PNG that is one, read back by matplotlib."""
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 5_000, path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4) and image.std() > 0  # not a blank canvas
    return image.shape[0], image.shape[1]


def test_accuracy_bars_with_and_without_intervals(tmp_path: Path) -> None:
    bars = [("best single", 0.73, (0.71, 0.75)), ("vote", 0.77, (0.75, 0.79)), ("no interval", 0.74, None)]
    plot_accuracy_bars(tmp_path / "a.png", bars, "title", references=[("oracle", 0.96)],
                       notes=["$1", "$3", "", "$0.5"])
    plot_accuracy_bars(tmp_path / "b.png", [("x", 0.2, None), ("y", 0.3, None)], "no intervals at all")
    assert _read_png(tmp_path / "a.png")[1] > _read_png(tmp_path / "b.png")[1]  # wider for more bars


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The axes each figure is finished with, kept for inspection (the PNG is still written)."""
    axes: list[Any] = []
    finish = report._finish

    def keep(plt: Any, fig: Any, ax: Any, *args: Any, **kwargs: Any) -> None:
        axes.append(ax)
        finish(plt, fig, ax, *args, **kwargs)

    monkeypatch.setattr(report, "_finish", keep)
    return axes


def _points(ax: Any, marker: str) -> list[tuple[float, float]]:
    return [(float(line.get_xdata()[0]), float(line.get_ydata()[0])) for line in ax.get_lines()
            if line.get_marker() == marker]


def test_accuracy_cost_points(tmp_path: Path, drawn: list[Any]) -> None:
    plot_accuracy_cost(tmp_path / "c.png", {"vote": (0.005, 0.87), "top-1": (0.005, 0.87)},
                       {"org/model-a": (0.001, 0.6), "model-b": (0.004, 0.85)}, "USD per query", "title")
    _read_png(tmp_path / "c.png")
    (ax,) = drawn
    assert _points(ax, "s") == [(0.001, 0.6), (0.004, 0.85)]  # the singles, grey squares
    assert [t.get_text() for t in ax.texts] == ["model-a", "model-b"]  # named without their org
    # Coinciding systems both stay visible: the later one drawn smaller on top.
    systems = [line for line in ax.get_lines() if line.get_marker() in ("o", "^")]
    assert [line.get_markersize() for line in systems] == [14, 12]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["vote: 0.870 at 0.005", "top-1: 0.870 at 0.005"]
    assert ax.get_xscale() == "log"


def test_strong_calls_marks_reached_cpt_points_only(tmp_path: Path, drawn: list[Any]) -> None:
    x = np.array([0.0, 25.0, 50.0, 75.0, 100.0])
    plot_strong_calls(tmp_path / "s.png", {"router": (x, np.array([0.6, 0.7, 0.75, 0.78, 0.8])),
                                            "random": (x, np.linspace(0.6, 0.8, 5))}, 0.8, 0.6, "title",
                      cpt={50: 25.0, 80: float("nan")})  # CPT(80%) never reached: no point, no error
    _read_png(tmp_path / "s.png")
    (ax,) = drawn
    # One diamond, at 25% of calls and the accuracy CPT(50%) asks for: halfway from weak (0.6) to strong (0.8).
    ((pct, level),) = _points(ax, "D")
    assert pct == 25.0 and level == pytest.approx(0.7)
    assert [t.get_text() for t in ax.texts] == ["CPT(50%) = 25.0%"]


@pytest.mark.parametrize("plots", [True, False])
def test_routellm_mmlu_figure(plots: bool, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "routellm"
    results = run_suite("routellm-mmlu", data_dir, out, encoder=FakeHashingEncoder(), limit=200, progress=False,
                        cache_dir=tmp_path / "cache", plots=plots)
    # predictions.jsonl, as the other outcome suites write it: the curves are recomputed from it (it wrote none)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert results["predictions"] == "predictions.jsonl" and len(rows) == results["setup"]["test"]
    for system, key in (("gate", "strong_win_score"), ("random", "random_score")):
        pct, perf = strong_call_curve([r[key] for r in rows], [r["strong_correct"] for r in rows],
                                      [r["weak_correct"] for r in rows])
        curve = results["strong_call_curve"][system]
        assert list(pct) == pytest.approx(curve["strong_pct"]) and list(perf) == pytest.approx(curve["accuracy"])
    if not plots:  # --no-plots
        assert not list(out.glob("*.png")) and "figures" not in results
        return
    assert results["figures"] == ["strong_calls.png"]
    height, width = _read_png(out / "strong_calls.png")
    assert width > 600 and height > 400
    assert "![strong_calls.png](strong_calls.png)" in (out / "report.md").read_text(encoding="utf-8")


def test_routellm_mmlu_on_a_split_where_the_two_models_tie_reports_apgr_undefined(data_dir: Path,
                                                                                   tmp_path: Path) -> None:
    # --limit 6: strong and weak are equally accurate on validation and on test, where APGR (a fraction of the
    # gap between them) has no gap to measure. The run still finishes, tuned on the curve's mean accuracy.
    out = tmp_path / "tied"
    results = run_suite("routellm-mmlu", data_dir, out, encoder=FakeHashingEncoder(), limit=6, progress=False,
                        cache_dir=tmp_path / "cache", plots=True)
    m = results["metrics"]
    assert m["best_single_accuracy"] == m["weak_accuracy"]
    assert (m["apgr"], m["cpt50"], m["cpt80"], m["random_apgr"]) == (None, None, None, None)
    assert results["confidence_intervals"]["apgr"]["estimate"] is None
    assert all(g["val_apgr"] is None for g in results["tuning_grid"])
    notes = " ".join(results["notes"])
    assert "tuned on the mean accuracy" in notes and "APGR and CPT are undefined" in notes
    assert _read_png(out / "strong_calls.png")[1] > 600


def test_table_cells_holding_pipes_or_line_breaks_keep_the_row_whole() -> None:
    from eval.report import _table

    lines = _table(["label", "n"], [["a|b", 1], ["two\nlines", 2.5], ["back\\slash", None]])
    assert lines[2:5] == ["| a\\|b | 1 |", "| two lines | 2.5 |", "| back\\\\slash | n/a |"]


def test_confusion_names_its_labels_clipped_or_keys_their_indices(tmp_path: Path, drawn: list[Any]) -> None:
    long = "a label of two hundred characters " * 6
    plot_confusion(tmp_path / "few.png", np.eye(3, dtype=int), ["math", long, "law"], "three")
    many = [f"intent-{i}" for i in range(60)]
    plot_confusion(tmp_path / "many.png", np.eye(60, dtype=int), many, "sixty")
    few, sixty = drawn
    shown = [t.get_text() for t in few.get_xticklabels()]
    assert shown[0] == "math" and len(shown[1]) == 32 and shown[1].endswith("\u2026")
    assert few.get_xlabel() == "predicted label"
    assert "index: the # column of report.md's per-class table" in sixty.get_xlabel()
    # The key itself: report.md's per-class table numbers each label by its row in the matrix.
    table = render_markdown({"suite": "x", "metrics": {}, "labels": many,
                             "per_class": {lab: {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
                                           for lab in many}})
    assert "| 59 | intent-59 |" in table



def test_a_confusion_of_hundreds_of_labels_keeps_its_indices_apart(tmp_path: Path, drawn: list[Any]) -> None:
    """At 450 labels every 5th index, on a figure capped at 16 inches, ran together along the bottom."""
    for n in (150, 450, 1050):
        plot_confusion(tmp_path / f"{n}.png", np.eye(n, dtype=int), [f"intent-{i}" for i in range(n)], str(n))
    ticks = [[t.get_text() for t in ax.get_xticklabels()] for ax in drawn]
    assert ticks[0][:3] == ["0", "5", "10"] and len(ticks[0]) == 30
    assert ticks[1][:3] == ["0", "15", "30"] and len(ticks[1]) == 30
    assert ticks[2][:3] == ["0", "30", "60"] and len(ticks[2]) == 35


def test_confusion_labels_that_share_a_long_start_stay_told_apart(tmp_path: Path, drawn: list[Any]) -> None:
    """Cut at the end, seven labels sharing a 40-character start all read "customer support escalation que…", and
    three CJK labels (each character escaped to six) all read their first five characters."""
    shared = [f"customer support escalation queue for {name}" for name in ("PlayMusic", "GetWeather", "RateBook")]
    cjk = ["客户服务请求：退款", "客户服务请求：发票", "客户服务请求：物流"]
    alike = ["x" * 40 + "a" + "y" * 40, "x" * 40 + "b" + "y" * 40]  # alike at both ends: indices
    for name, labels in (("shared", shared), ("cjk", cjk), ("alike", alike)):
        plot_confusion(tmp_path / f"{name}.png", np.eye(len(labels), dtype=int), labels, name)
    by_end, by_cjk, by_index = ([t.get_text() for t in ax.get_xticklabels()] for ax in drawn)
    assert len(set(by_end)) == 3 and all(len(t) <= 32 and t.startswith("customer supp") for t in by_end)
    assert [t.endswith(n[-8:]) for t, n in zip(by_end, shared, strict=True)] == [True] * 3
    assert len(set(by_cjk)) == 3
    assert by_index == ["0", "1"] and "index: the # column" in drawn[2].get_xlabel()
    assert [t.get_text() for t in drawn[2].texts] == ["1", "1"]  # each cell's count, as when named


def test_quality_cost_marks_the_headline_routers_beside_the_sweep(tmp_path: Path, drawn: list[Any]) -> None:
    from eval.report import plot_quality_cost

    curve = [(0.1, 0.5), (0.3, 0.62), (1.0, 0.70)]
    plot_quality_cost(tmp_path / "q.png", curve, (np.array([0.1, 1.0]), np.array([0.5, 0.7])),
                      {"org/model-a": (0.2, 0.6), "a-model-name-longer-than-any-label-may-be": (0.9, 0.74)},
                      (0.1, 0.95), "USD per query", "title",
                      marked={"router (margin tuned on val)": (1.2, 0.753), "served gate": (1.1, 0.767)})
    _read_png(tmp_path / "q.png")
    (ax,) = drawn
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "router (margin tuned on val): 0.753" in legend and "served gate: 0.767" in legend
    assert _points(ax, "D") == [(1.2, 0.753)] and _points(ax, "P") == [(1.1, 0.767)]
    assert [t.get_text() for t in ax.texts] == ["model-a", "a-model-name-longer-t\u2026"]  # clipped, marked so


def test_the_familiar_sweep_is_drawn_along_its_axis_with_the_default_ringed(tmp_path: Path,
                                                                          drawn: list[Any]) -> None:
    from eval.report import plot_familiar_sweep

    sweep = [{"familiar": f, "fast_share": share, "abstain_oos": oos}
             for f, share, oos in ((0.7, 0.585, 0.439), (0.8, 0.629, 0.439), (0.85, 0.578, 0.439),
                                   (0.9, 0.59, 0.439), (0.95, 0.61, 0.39), (1.0, 0.59, 0.439))]
    plot_familiar_sweep(tmp_path / "f.png", sweep, 0.488, "title", gate_label="onnx-int8 gate alone")
    _read_png(tmp_path / "f.png")
    (ax,) = drawn
    line = next(li for li in ax.get_lines() if li.get_linestyle() == "-" and len(li.get_xdata()) == len(sweep))
    assert list(line.get_xdata()) == sorted(line.get_xdata())  # joined along x: no segment drawn twice
    # Settings that land on one point share its label; the default (0.9) is ringed and named in the legend.
    assert "0.9, 1" in [t.get_text() for t in ax.texts]
    assert "the default, familiar = 0.9" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert ax.get_ylim()[0] >= 0 and ax.get_ylim()[1] <= 100


def test_an_accuracy_axis_stops_at_one(tmp_path: Path, drawn: list[Any]) -> None:
    plot_accuracy_bars(tmp_path / "a.png", [("x", 0.9, (0.88, 0.99))], "title", references=[("oracle", 0.98)])
    (ax,) = drawn
    assert ax.get_ylim()[1] == 1.0


def test_settings_holding_several_values_read_as_text_and_infinity_as_such() -> None:
    import json

    results = {"suite": "x", "metrics": {"ratio": float("inf"), "undefined": float("nan")},
               "setup": {"served_gate": {"cost_weight": 0.0, "temperature": 0.046340812231218005,
                                         "alpha": float("inf")},
                         "fixed_top3": ["gpt-4o", "claude-3-opus", "gemini-1.5-pro"],
                         "identical": [["vote", "top1"]]}}
    text = render_markdown(results)
    assert "- served_gate: cost_weight=0, temperature=0.04634, alpha=∞" in text
    assert "- fixed_top3: gpt-4o, claude-3-opus, gemini-1.5-pro" in text
    assert "- identical: [vote, top1]" in text
    assert "| ratio | ∞ |" in text and "| undefined | n/a |" in text
    written = json.loads(json.dumps(report._jsonable(results)))
    assert written["metrics"] == {"ratio": "inf", "undefined": None}  # as moe train writes an infinite alpha
    assert written["setup"]["served_gate"]["alpha"] == "inf"


def test_the_curve_table_names_each_lambda_once_and_merges_repeated_points() -> None:
    curve = [{"lambda": 0.0, "cost": 2.0, "accuracy": 0.9}, {"lambda": 0.01, "cost": 1.0, "accuracy": 0.8},
             {"lambda": 0.1, "cost": 0.5, "accuracy": 0.6}, {"lambda": 1.0, "cost": 0.5, "accuracy": 0.6}]
    text = render_markdown({"suite": "x", "metrics": {}, "curve": curve})
    assert "| system | cost | accuracy |" in text
    assert "| λ=0.01 | 1 | 0.8 |" in text and "| λ=0.1 to 1 | 0.5 | 0.6 |" in text
    assert text.count("| 0.5 | 0.6 |") == 1


def test_many_single_experts_are_numbered_with_a_key_and_alike_names_stay_apart(tmp_path: Path,
                                                                               drawn: list[Any]) -> None:
    """MMLU-Pro's 31 LLMs crowd one corner of the quality-cost figure, where their names printed over one another,
    and two cut to 22 characters read alike ("Mistral-7B-Instruct-v…"): past eight, each point is numbered by
    accuracy, best first, with the key beside the axes; a few keep their names, cut so no two read alike."""
    from eval.report import plot_quality_cost

    singles = {f"org/model-{i:02d}": (0.3 + 0.01 * i, 0.3 + 0.005 * i) for i in range(12)}
    plot_quality_cost(tmp_path / "many.png", [(0.1, 0.5), (1.0, 0.7)], (np.array([0.1, 1.0]), np.array([0.5, 0.7])),
                      singles, None, "k chars", "title")
    _read_png(tmp_path / "many.png")
    ax = drawn[-1]
    texts = [t.get_text() for t in ax.texts]
    assert texts[:12] == [str(12 - i) for i in range(12)]  # model-11 is the most accurate: 1
    assert texts[12].splitlines()[:3] == ["single experts", " 1  org/model-11", " 2  org/model-10"]
    alike = {"Mistral-7B-Instruct-v0.1": (0.3, 0.3), "Mistral-7B-Instruct-v0.2": (0.31, 0.31)}
    plot_quality_cost(tmp_path / "two.png", [(0.1, 0.5), (1.0, 0.7)], (np.array([0.1, 1.0]), np.array([0.5, 0.7])),
                      alike, None, "k chars", "title")
    shown = [t.get_text() for t in drawn[-1].texts]
    assert len(shown) == 2 and len(set(shown)) == 2 and all(len(t) <= 22 for t in shown)
