"""``make faults`` fails when any acceptance figure misses its bar, overrun and memory growth included."""

from __future__ import annotations

import pytest

from bench.faults import failures

GOOD = {"answered_ratio_when_one_healthy": 1.0, "clear_error_when_all_down": True, "max_deadline_overrun_ms": 12.0,
        "leaked_tasks": 0, "leaked_connections": 0, "memory_growth_pct": 3.0}


def test_figures_within_their_bars_pass() -> None:
    assert failures(GOOD) == []


@pytest.mark.parametrize(("key", "value", "bar"), [
    ("answered_ratio_when_one_healthy", 0.999, "== 1.0"),
    ("clear_error_when_all_down", False, "true"),
    ("max_deadline_overrun_ms", 300.0, "<= 250"),
    ("leaked_tasks", 1, "== 0"),
    ("leaked_connections", 2, "== 0"),
    ("memory_growth_pct", 40.0, "< 25"),
])
def test_each_missed_bar_is_named_with_its_value(key: str, value: object, bar: str) -> None:
    assert failures({**GOOD, key: value}) == [f"{key} is {value}, the bar is {bar}"]
