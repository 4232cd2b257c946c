"""The figures of ``eval.report``: each writes a PNG that reads back, and ``routellm-mmlu`` draws its curve."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from eval.harness import run_suite
from eval.report import plot_accuracy_bars, plot_accuracy_cost, plot_strong_calls
from tests.doubles.fakes import HashingEncoder
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


def test_accuracy_cost_points(tmp_path: Path) -> None:
    plot_accuracy_cost(tmp_path / "c.png", {"vote": (0.005, 0.87), "top-1": (0.005, 0.87)},
                       {"org/model-a": (0.001, 0.6), "model-b": (0.004, 0.85)}, "USD per query", "title")
    _read_png(tmp_path / "c.png")


def test_strong_calls_marks_reached_cpt_points_only(tmp_path: Path) -> None:
    x = np.array([0.0, 25.0, 50.0, 75.0, 100.0])
    plot_strong_calls(tmp_path / "s.png", {"router": (x, np.array([0.6, 0.7, 0.75, 0.78, 0.8])),
                                            "random": (x, np.linspace(0.6, 0.8, 5))}, 0.8, 0.6, "title",
                      cpt={50: 25.0, 80: float("nan")})  # CPT(80%) never reached: no point, no error
    _read_png(tmp_path / "s.png")


@pytest.mark.parametrize("plots", [True, False])
def test_routellm_mmlu_figure(plots: bool, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "routellm"
    results = run_suite("routellm-mmlu", data_dir, out, encoder=HashingEncoder(), limit=200, progress=False,
                        cache_dir=tmp_path / "cache", plots=plots)
    if not plots:  # --no-plots
        assert not list(out.glob("*.png")) and "figures" not in results
        return
    assert results["figures"] == ["strong_calls.png"]
    height, width = _read_png(out / "strong_calls.png")
    assert width > 600 and height > 400
    assert "![strong_calls.png](strong_calls.png)" in (out / "report.md").read_text(encoding="utf-8")


def test_table_cells_holding_pipes_or_line_breaks_keep_the_row_whole() -> None:
    from eval.report import _table

    lines = _table(["label", "n"], [["a|b", 1], ["two\nlines", 2.5], ["back\\slash", None]])
    assert lines[2:5] == ["| a\\|b | 1 |", "| two lines | 2.5 |", "| back\\\\slash | n/a |"]
