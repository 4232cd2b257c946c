"""The README's and the examples' prompts run as written against ``moe serve --config configs/demo.yaml``: each is
recorded for every demo expert (a prompt none recorded made the README's SDK example stop at a 503)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from experts.base import ExpertContext
from experts.replay import ReplayExpert
from router.config import load_config

ROOT = Path(__file__).resolve().parents[2]
# The demo's recordings are RouterBench's MBPP questions: every prompt the docs send starts so.
PROMPT = re.compile(r"\"(Write a function[^\"]*)\"")


def _prompts() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in [ROOT / "README.md", *sorted((ROOT / "examples").glob("*.py"))]:
        for prompt in PROMPT.findall(path.read_text(encoding="utf-8")):
            found.setdefault(prompt, set()).add(path.name)
    return found


def test_the_docs_send_prompts() -> None:
    assert len(_prompts()) >= 5  # the pattern still finds them


def test_every_prompt_the_docs_send_is_recorded_for_every_demo_expert(data_dir: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOE_DATA_DIR", str(data_dir))
    config = load_config(ROOT / "configs" / "demo.yaml")
    context = ExpertContext(base_dir=Path(config.base_dir))
    experts = [ReplayExpert(e, context) for e in config.experts if e.type == "replay"]
    assert len(experts) == 11
    unrecorded = {prompt: sorted(files) for prompt, files in _prompts().items()
                  if any(e.recording(prompt) is None for e in experts)}
    assert unrecorded == {}
