"""Hierarchical experts: a ``type: router`` expert is another router, in-process or over HTTP, two levels deep,
with the inner trace nested in the outer one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

import router.build
from experts.base import ExpertContext
from experts.errors import ExpertConfigError
from experts.types import ChatRequest
from router.build import build_orchestrator
from router.config import ConfigError, RouterConfig, parse_config
from router.hierarchy import RouterExpert
from router.orchestrator import Orchestrator, StreamEnd
from router.service import create_app
from tests.doubles.fakes import FakeExpert, FakeGate, fake_config


def upstream(request: httpx.Request) -> httpx.Response:
    """Every leaf expert: an OpenAI-compatible endpoint answering with its model's name."""
    body = json.loads(request.content)
    text = f"{body['model']} answers"
    usage = {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    if not body.get("stream"):
        return httpx.Response(200, json={"model": body["model"], "usage": usage, "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]})
    chunks = [{"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]},
              {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}, {"choices": [], "usage": usage}]
    sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    return httpx.Response(200, content=sse.encode(), headers={"content-type": "text/event-stream"})


def leaf(name: str) -> dict[str, Any]:
    return {"name": name, "type": "vllm", "endpoint": f"http://{name}.local/v1", "model": f"model-{name}",
            "cost": {"input_per_1k": 1.0, "output_per_1k": 1.0}}


def write(path: Path, experts: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump({"version": 1, "experts": experts}))
    return path


@pytest.fixture
def fake_gates(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each level's gate picks its last expert: the inner router at the top, ``deep`` inside it."""
    def load(config: RouterConfig, encoders: object = None) -> FakeGate:
        n = len(config.experts)
        return FakeGate(config.expert_names, {}, default=[0.1 / n] * (n - 1) + [0.9])

    monkeypatch.setattr(router.build, "load_gate", load)


async def test_in_process_router_expert_nests_the_inner_trace(tmp_path: Path, fake_gates: None) -> None:
    write(tmp_path / "inner.yaml", [leaf("shallow"), leaf("deep")])
    outer = parse_config({"version": 1, "experts": [leaf("direct"), {
        "name": "team", "type": "router", "model": "auto", "router_config": "inner.yaml"}]},
        base_dir=tmp_path, check_env=False)
    orch = build_orchestrator(outer, context=ExpertContext(base_dir=tmp_path, transport=httpx.MockTransport(upstream)))
    request = ChatRequest(messages=[{"role": "user", "content": "hard question"}])  # type: ignore[list-item]

    answer = await orch.complete(request)
    assert (answer.expert, answer.content) == ("team", "model-deep answers")
    attempt = answer.trace.attempts[0]
    assert attempt.expert == "team" and attempt.nested is not None
    assert attempt.nested["decision"]["chosen"] == [{"expert": "deep", "weight": 1.0}]
    assert attempt.nested["attempts"][0]["expert"] == "deep"
    assert attempt.cost_usd == pytest.approx(attempt.nested["cost_usd"]) and attempt.cost_usd > 0

    events = [e async for e in orch.stream(request)]
    end = events[-1]
    assert isinstance(end, StreamEnd)
    assert "".join(e.delta.content for e in events[:-1]) == "model-deep answers"  # type: ignore[union-attr]
    assert end.trace.attempts[0].nested is not None
    assert end.trace.attempts[0].nested["attempts"][0]["expert"] == "deep"
    await orch.aclose()


async def test_router_over_http_nests_the_inner_services_trace() -> None:
    inner_config = fake_config(["shallow", "deep"])
    inner = Orchestrator(inner_config, FakeGate(["shallow", "deep"], {}, default=[0.1, 0.9]),
                         {n: FakeExpert(inner_config.expert(n), pieces=[f"{n} ", "says"], cost=0.25)
                          for n in inner_config.expert_names})
    inner_app = create_app(inner)
    outer_config = parse_config({"version": 1, "experts": [
        {"name": "team", "type": "router", "endpoint": "http://inner.local/v1", "model": "auto"},
        {"name": "solo", "type": "replay", "model": "solo", "replay": {"source": "routerbench", "path": "x"}}]},
        check_env=False)
    team = RouterExpert(outer_config.expert("team"), ExpertContext(transport=httpx.ASGITransport(app=inner_app)))
    experts = {"team": team, "solo": FakeExpert(outer_config.expert("solo"))}
    outer = Orchestrator(outer_config, FakeGate(["team", "solo"], {}, default=[0.8, 0.2]), experts)
    outer_app = create_app(outer)
    request = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=outer_app), base_url="http://outer") as http:
        plain = (await http.post("/v1/chat/completions", json=request)).json()
        async with http.stream("POST", "/v1/chat/completions", json={**request, "stream": True}) as r:
            lines = [line async for line in r.aiter_lines() if line.startswith("data: {")]
    assert plain["choices"][0]["message"]["content"] == "answer from deep"
    nested = plain["moe"]["attempts"][0]["nested"]
    assert nested["decision"]["chosen"] == [{"expert": "deep", "weight": 1.0}]
    assert nested["attempts"][0]["expert"] == "deep"
    assert plain["moe"]["cost_usd"] == pytest.approx(0.25)  # priced by the inner router, not by our config
    final = json.loads(lines[-1][6:])
    assert "".join(json.loads(x[6:])["choices"][0]["delta"].get("content", "") for x in lines) == "deep says"
    assert final["moe"]["attempts"][0]["nested"]["attempts"][0]["expert"] == "deep"
    await outer.aclose()


def test_a_router_expert_needs_exactly_one_of_endpoint_and_router_config() -> None:
    both = {"name": "r", "type": "router", "model": "auto", "endpoint": "http://x/v1", "router_config": "a.yaml"}
    neither = {"name": "r", "type": "router", "model": "auto"}
    stray = {**leaf("v"), "router_config": "a.yaml"}
    for expert, message in ((both, "exactly one"), (neither, "exactly one"), (stray, "only type 'router'")):
        with pytest.raises(ConfigError) as info:
            parse_config({"version": 1, "experts": [expert]}, check_env=False)
        assert [p for p, _ in info.value.problems] == [f"experts[0] ({expert['name']}).router_config"]
        assert message in str(info.value)


def test_a_router_containing_itself_is_refused(tmp_path: Path, fake_gates: None) -> None:
    path = write(tmp_path / "loop.yaml", [leaf("a"), {"name": "me", "type": "router", "model": "auto",
                                                      "router_config": "loop.yaml"}])
    config = parse_config(yaml.safe_load(path.read_text()), base_dir=tmp_path, check_env=False)
    with pytest.raises(ExpertConfigError, match="contains itself"):
        build_orchestrator(config)
