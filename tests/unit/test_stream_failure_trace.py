"""A stream that fails for good, through the service in-process with fakes: the error event it ends with, and
the trace (attempts, switches) the request's log line keeps even though no expert finished."""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx
import pytest

from experts.errors import ExpertServerError, ExpertUnavailable
from router.orchestrator import Orchestrator
from router.service import create_app
from tests.doubles.fakes import FakeExpert, FakeGate, FakeToolCallThenDies, fake_config

NAMES = ["math", "code", "law"]
CHAT = {"model": "auto", "stream": True, "messages": [{"role": "user", "content": "an integral"}]}


def dies_mid_stream(name: str) -> Any:
    return lambda n: ExpertUnavailable(n, f"{name} went away")


async def stream_events(experts: dict[str, FakeExpert], config: Any) -> list[dict[str, Any]]:
    gate = FakeGate(NAMES, {"integral": [0.7, 0.2, 0.1]}, default=[0.2, 0.2, 0.6])
    app = create_app(Orchestrator(config, gate, experts), environ={})
    async with (httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as http,
                http.stream("POST", "/v1/chat/completions", json=CHAT) as r):
        assert r.status_code == 200
        return [json.loads(line[6:]) async for line in r.aiter_lines()
                if line.startswith("data: ") and line != "data: [DONE]"]


async def test_a_stream_that_switched_then_failed_keeps_its_trace_in_the_log(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="router.requests")
    config = fake_config(NAMES)
    experts = {
        "math": FakeExpert(config.expert("math"), pieces=["one ", "two ", "three"], fail_after=2,
                           fail=dies_mid_stream("math")),
        "code": FakeExpert(config.expert("code"), pieces=["three ", "four"], fail_after=1,
                           fail=dies_mid_stream("code")),
        "law": FakeExpert(config.expert("law"), fail=lambda n: ExpertServerError(n, 500, "down")),
    }
    events = await stream_events(experts, config)
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if "choices" in e) == \
        "one two three "
    assert events[-1]["error"]["code"] == "all_experts_failed"
    [line] = [json.loads(r.getMessage()) for r in caplog.records if r.name == "router.requests"]
    assert line["error"] == "all_experts_failed"
    assert line["switches"] == 2
    assert [(a["expert"], a["ok"], a["kind"]) for a in line["attempts"]] == [
        ("math", False, "unavailable"), ("code", False, "unavailable"), ("law", False, "server_error")]


async def test_a_stream_that_dies_mid_tool_call_ends_with_an_error_naming_the_expert() -> None:
    config = fake_config(NAMES)
    experts = {n: FakeExpert(config.expert(n)) for n in NAMES}
    experts["math"] = FakeToolCallThenDies(config.expert("math"))
    events = await stream_events(experts, config)
    deltas = [e["choices"][0]["delta"] for e in events if "choices" in e]
    assert [d["tool_calls"][0]["id"] for d in deltas if "tool_calls" in d] == ["call-1"]
    assert not any(d.get("content") for d in deltas)  # no other expert's answer was spliced in
    error = events[-1]["error"]
    assert "expert 'math'" in error["message"] and "tool call" in error["message"]
    assert [(c["expert"], c["kind"]) for c in error["causes"]] == [("math", "unavailable")]
