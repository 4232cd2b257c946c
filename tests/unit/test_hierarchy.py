"""Hierarchical experts: a ``type: router`` expert is another router, in-process or over HTTP, two levels deep,
with the inner trace nested in the outer one."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

import router.build
from experts.base import ExpertContext
from experts.errors import ExpertRejected, ExpertServerError, ExpertUnavailable
from experts.types import ChatRequest, ExpertReply, Usage
from router.build import build_orchestrator
from router.config import ConfigError, RouterConfig, load_config, parse_config
from router.hierarchy import RouterExpert
from router.orchestrator import Orchestrator, RouteFailed, StreamEnd
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
    # Refused where the config is read (moe config check says it too), naming the cycle ...
    with pytest.raises(ConfigError, match=r"experts\[1\] \(me\)\.router_config: a routing cycle: .*loop\.yaml -> "
                                          r".*loop\.yaml; a router cannot contain itself"):
        parse_config(yaml.safe_load(path.read_text()), base_dir=tmp_path, check_env=False)
    # ... and by the build, for a config made in code without the cross-checks: the inner file it loads is refused.
    config = RouterConfig.model_validate({**yaml.safe_load(path.read_text()), "base_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"a routing cycle: .*loop\.yaml -> .*loop\.yaml"):
        build_orchestrator(config)


def test_a_cycle_through_another_file_and_a_nested_config_s_own_problems_are_named(tmp_path: Path) -> None:
    """moe config check passed both, and moe serve refused them: said where the config is read, for each level."""
    write(tmp_path / "x.yaml", [leaf("a"), {"name": "y", "type": "router", "model": "auto", "router_config": "y.yaml"}])
    write(tmp_path / "y.yaml", [{**leaf("b"), "timout_s": 3},
                                {"name": "x", "type": "router", "model": "auto", "router_config": "x.yaml"}])
    with pytest.raises(ConfigError) as refused:
        load_config(tmp_path / "x.yaml", check_env=False)
    [(key, message)] = refused.value.problems
    assert key == "experts[1] (y).router_config" and message.startswith(f"{tmp_path / 'y.yaml'}: ")
    assert "experts[0] (b).timout_s: unknown key" in message
    assert f"a routing cycle: {tmp_path / 'x.yaml'} -> {tmp_path / 'y.yaml'} -> {tmp_path / 'x.yaml'}" in message


def priced(name: str, price: float) -> dict[str, Any]:
    return {"name": name, "type": "replay", "model": name, "timeout_s": 1.0,
            "cost": {"input_per_1k": price, "output_per_1k": price},
            "replay": {"source": "routerbench", "path": "unused"}}


def in_process_team(inner_experts: list[tuple[dict[str, Any], dict[str, Any]]], *, panel: int = 1,
                    **team: Any) -> RouterExpert:
    """A ``type: router`` expert over an in-process inner router of fakes; the inner gate picks its first expert
    (its first ``panel`` experts, ranked in order). ``inner_experts``: each fake's config entry and its
    ``FakeExpert`` keyword arguments; ``team``: more of the router expert's own config entry (``timeout_s``)."""
    top_k = {"top_k": {"policy": "fixed", "k": panel}} if panel > 1 else {}
    inner_config = parse_config({"version": 1, "gate": top_k, "experts": [c for c, _ in inner_experts]},
                                check_env=False)
    names = inner_config.expert_names
    others = len(names) - 1
    weights = ([0.9] + [0.1 / others] * others if others else [1.0]) if panel == 1 else \
        [2.0 ** -(i + 1) for i in range(len(names))]
    inner = Orchestrator(inner_config, FakeGate(names, {}, default=weights),
                         {c["name"]: FakeExpert(inner_config.expert(c["name"]), **kw) for c, kw in inner_experts})
    outer = parse_config({"version": 1, "experts": [{"name": "team", "type": "router", "model": "auto",
                                                     "endpoint": "http://inner.local/v1", **team}]}, check_env=False)
    return RouterExpert(outer.expert("team"), orchestrator=inner)


def http_team(inner_experts: list[tuple[dict[str, Any], dict[str, Any]]], *, panel: int = 1,
              **team: Any) -> RouterExpert:
    """As ``in_process_team``, with the inner router served by its own moe-router service, called over HTTP."""
    inner = in_process_team(inner_experts, panel=panel)._inner
    assert inner is not None
    config = parse_config({"version": 1, "experts": [{"name": "team", "type": "router", "model": "auto",
                                                      "endpoint": "http://inner.local/v1", **team}]},
                          check_env=False)
    return RouterExpert(config.expert("team"), ExpertContext(transport=httpx.ASGITransport(app=create_app(inner))))


def outer_router(team: RouterExpert, others: list[dict[str, Any]], weights: list[float],
                 **settings: Any) -> Orchestrator:
    """The outer router over ``team`` (ranked first) and fakes configured by ``others``, its gate giving
    ``weights``; ``settings``: more of its config (``fallback``, ``gate``)."""
    config = parse_config({"version": 1, **settings, "experts": [team.config.model_dump(exclude_none=True), *others]},
                          check_env=False)
    experts = {"team": team, **{o["name"]: FakeExpert(config.expert(o["name"])) for o in others}}
    return Orchestrator(config, FakeGate(config.expert_names, {}, default=weights), experts)


async def test_an_inner_router_whose_experts_all_refuse_the_request_refuses_it_too() -> None:
    """As its service would answer (400 rejected_by_experts): the request is at fault, not the inner router, so the
    outer level neither retries it as an outage nor answers 503."""
    refuse = {"fail": lambda n: ExpertRejected(n, 400, "prompt too long")}
    team = in_process_team([(priced("a", 1.0), refuse), (priced("b", 1.0), refuse)])
    request = ChatRequest(messages=[{"role": "user", "content": "q"}])  # type: ignore[list-item]
    with pytest.raises(ExpertRejected) as info:
        await team.generate(request)
    assert info.value.status == 400 and "inner router" in info.value.message
    with pytest.raises(ExpertRejected):
        [d async for d in team.stream(request)]
    outage = in_process_team([(priced("a", 1.0), {"fail": lambda n: ExpertServerError(n, 503, "busy", 7.0)}),
                              (priced("b", 1.0), {"fail": lambda n: ExpertServerError(n, 503, "busy", 3.0)})])
    with pytest.raises(ExpertServerError) as down:
        await outage.generate(request)
    assert down.value.status == 503 and down.value.retry_after_s == 3.0  # as the inner service's Retry-After


async def test_an_inner_router_failing_mid_stream_still_reports_what_it_spent() -> None:
    """Its expert streamed part of an answer (paid for) and broke off, and its fallback failed: the outer attempt
    counts the inner router's spend and keeps its trace, rather than pricing the deltas at the router's own $0."""
    team = in_process_team([
        (priced("a", 1.0), {"pieces": ["one ", "two ", "three"], "fail_after": 2,
                            "fail": lambda n: ExpertUnavailable(n, "peer closed")}),
        (priced("b", 1.0), {"fail": lambda n: ExpertServerError(n, 503, "busy")})])
    solo_config = parse_config({"version": 1, "experts": [priced("solo", 1.0)]}, check_env=False)
    outer_config = parse_config({"version": 1, "experts": [
        {"name": "team", "type": "router", "model": "auto", "endpoint": "http://inner.local/v1"},
        priced("solo", 1.0)]}, check_env=False)
    outer = Orchestrator(outer_config, FakeGate(["team", "solo"], {}, default=[0.8, 0.2]),
                         {"team": team, "solo": FakeExpert(solo_config.expert("solo"), pieces=["four"])})
    request = ChatRequest(messages=[{"role": "user", "content": "q"}])  # type: ignore[list-item]
    events = [e async for e in outer.stream(request)]
    end = events[-1]
    assert isinstance(end, StreamEnd)
    assert "".join(e.delta.content for e in events[:-1]) == "one two four"  # type: ignore[union-attr]
    attempt = end.trace.attempts[0]
    assert attempt.expert == "team" and not attempt.ok and attempt.nested is not None
    assert [a["expert"] for a in attempt.nested["attempts"]] == ["a", "b"]
    assert attempt.cost_usd == pytest.approx(attempt.nested["cost_usd"]) and attempt.cost_usd > 0
    assert attempt.usage.completion_tokens == 2


async def test_the_cost_budget_prices_an_unpriced_in_process_router_as_its_dearest_expert() -> None:
    """A router expert with no prices of its own would be estimated at $0 and pass any budget, however dear the
    experts it routes to: a panel member behind it is left out as a leaf at those prices would be."""
    team = in_process_team([(priced("gold", 100.0), {}), (priced("silver", 50.0), {})])
    cheap_config = parse_config({"version": 1, "experts": [priced("cheap", 0.01)]}, check_env=False)
    outer_config = parse_config({"version": 1, "gate": {"top_k": {"policy": "fixed", "k": 2}},
                                 "fallback": {"cost_budget_usd": 0.05},
                                 "experts": [priced("cheap", 0.01), {"name": "team", "type": "router",
                                                                      "model": "auto", "endpoint": "http://x/v1"}]},
                                check_env=False)
    outer = Orchestrator(outer_config, FakeGate(["cheap", "team"], {}, default=[0.6, 0.4]),
                         {"cheap": FakeExpert(cheap_config.expert("cheap")), "team": team})
    request = ChatRequest(messages=[{"role": "user", "content": "q"}], max_tokens=100)  # type: ignore[list-item]
    answer = await outer.complete(request)
    assert [(a.expert, (a.error or {}).get("kind")) for a in answer.trace.attempts] == [
        ("team", "budget_exhausted"), ("cheap", None)]
    assert team.cost(Usage(prompt_tokens=1000, completion_tokens=0)) == pytest.approx(100.0)


def test_an_http_inner_routers_estimated_usage_stays_flagged_estimated() -> None:
    """Over HTTP the inner trace says which of its attempts' usage is an estimate; the outer attempt says so too
    (it said false, as in-process nesting never did)."""
    from experts.types import ExpertReply, StreamDelta, Usage
    from router.hierarchy import _priced_by_inner, _priced_delta

    nested = {"cost_usd": 0.3, "attempts": [{"expert": "x", "ok": True, "usage_estimated": True}]}
    reply = _priced_by_inner(ExpertReply(expert="team", content="hi", usage=Usage.counted(4, 2), nested=nested))
    delta = _priced_delta(StreamDelta(finish_reason="stop", usage=Usage.counted(4, 2), nested=nested))
    assert (reply.usage_estimated, reply.cost_usd) == (True, 0.3)
    assert (delta.usage_estimated, delta.cost_usd) == (True, 0.3)
    counted = {"cost_usd": 0.3, "attempts": [{"expert": "x", "ok": True}]}
    assert not _priced_by_inner(ExpertReply(expert="team", content="hi", nested=counted)).usage_estimated


@pytest.mark.parametrize("over_http", [False, True], ids=["in-process", "http"])
async def test_an_inner_router_answers_before_the_outer_call_s_time_limit_with_what_it_has(over_http: bool) -> None:
    """The outer router gives the inner one 0.5 s (the router expert's timeout_s; over HTTP, x-moe-deadline-s).
    Its panel's second member hangs: the inner router's deadline ends just before the outer cut-off, so it answers
    with the first member's answer, where before it waited on the hang (its own deadline is 120 s) and the outer
    call timed out, losing the answer it had."""
    build = http_team if over_http else in_process_team
    team = build([(priced("fast", 1.0), {"text": "fast answers"}),
                  (priced("hangs", 1.0) | {"timeout_s": 30.0}, {"delay": 30.0})], panel=2, timeout_s=0.5)
    outer = outer_router(team, [], [1.0])
    request = ChatRequest(messages=[{"role": "user", "content": "q"}])  # type: ignore[list-item]
    answer = await outer.complete(request)
    assert (answer.expert, answer.content) == ("team", "fast answers")
    nested = answer.trace.attempts[0].nested
    assert nested is not None
    kinds = {a["expert"]: (a["error"] or {}).get("kind") for a in nested["attempts"]}
    assert kinds == {"fast": None, "hangs": "timeout"}
    assert "deadline" in next(a for a in nested["attempts"] if a["expert"] == "hangs")["error"]["message"]
    assert 0.3 < answer.trace.latency_ms / 1000.0 < 5.0  # at its 0.475 s deadline, far from the hang's 30 s
    await outer.aclose()


async def test_an_inner_router_spends_only_what_the_outer_budget_leaves_it() -> None:
    """The outer budget ($0.12) lets its panel call the inner router (free, the first call) and ``sibling``
    (estimated at $0.05). The inner router has no budget of its own; it may spend what is left after the sibling's
    estimate, $0.07, so its panel's second member (another $0.05 on top of the first's) is not called. Before,
    both were, for an estimated $0.15 in all."""
    team = in_process_team([(priced("a", 0.5), {}), (priced("b", 0.5), {})], panel=2)
    outer = outer_router(team, [priced("sibling", 0.5)], [0.6, 0.4],
                         gate={"top_k": {"policy": "fixed", "k": 2}}, fallback={"cost_budget_usd": 0.12})
    request = ChatRequest(messages=[{"role": "user", "content": "q"}], max_tokens=100)  # type: ignore[list-item]
    assert outer.dispatch.estimate("sibling", request) == pytest.approx(0.05, rel=0.05)
    answer = await outer.complete(request)
    outer_kinds = {a.expert: (a.error or {}).get("kind") for a in answer.trace.attempts}
    assert outer_kinds == {"team": None, "sibling": None}
    nested = next(a for a in answer.trace.attempts if a.expert == "team").nested
    assert nested is not None
    inner_kinds = {a["expert"]: (a["error"] or {}).get("kind") for a in nested["attempts"]}
    assert inner_kinds == {"a": None, "b": "budget_exhausted"}
    assert "$0.07" in next(a for a in nested["attempts"] if a["expert"] == "b")["error"]["message"]


async def test_what_an_inner_router_spent_counts_when_the_client_leaves() -> None:
    """Its panel's first member answered (and was paid), the second is still working when the client leaves:
    the outer attempt is cancelled, but it keeps the inner router's spend and trace. Before, it recorded $0 and no
    nested trace."""
    team = in_process_team([(priced("paid", 1.0), {"cost": 0.004}),
                            (priced("slow", 1.0) | {"timeout_s": 30.0}, {"delay": 30.0})], panel=2)
    outer = outer_router(team, [], [1.0])
    request = ChatRequest(messages=[{"role": "user", "content": "q"}])  # type: ignore[list-item]
    traces: list[Any] = []
    task = asyncio.create_task(outer.complete(request, on_trace=traces.append))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    attempt = traces[0].attempts[0]
    assert attempt.expert == "team" and attempt.error["kind"] == "cancelled"
    assert attempt.cost_usd == pytest.approx(0.004)
    assert attempt.nested is not None and attempt.nested["cost_usd"] == pytest.approx(0.004)
    assert {a["expert"]: (a["error"] or {}).get("kind") for a in attempt.nested["attempts"]} == {
        "paid": None, "slow": "cancelled"}


async def test_an_inner_routers_failure_keeps_its_trace_on_the_outer_attempt() -> None:
    """A plain (non-streamed) call whose inner router failed outright: the outer attempt shows which inner experts
    failed and how, as a stream's did. Before, it held the error alone."""
    down = {"fail": lambda n: ExpertServerError(n, 503, "busy")}
    team = in_process_team([(priced("a", 1.0), down), (priced("b", 1.0), down)])
    outer = outer_router(team, [priced("solo", 1.0)], [0.8, 0.2])
    request = ChatRequest(messages=[{"role": "user", "content": "q"}])  # type: ignore[list-item]
    answer = await outer.complete(request)
    assert answer.expert == "solo"
    failed = answer.trace.attempts[0]
    assert failed.expert == "team" and failed.error is not None and failed.error["kind"] == "server_error"
    assert failed.nested is not None
    assert {a["expert"] for a in failed.nested["attempts"]} == {"a", "b"}
    assert all(a["error"]["kind"] == "server_error" for a in failed.nested["attempts"])
    assert failed.cost_usd == 0.0


async def test_an_in_process_inner_stream_the_client_leaves_is_priced_by_the_expert_that_streamed() -> None:
    """The client takes one piece and leaves. The inner expert that was streaming is estimated at its own price
    ($1 per 1k tokens), in the inner trace and on the outer attempt. Before, the outer attempt priced the pieces at
    the inner router's dearest expert ($100 per 1k), and kept no inner trace."""
    team = in_process_team([(priced("cheap", 1.0), {"pieces": ["one ", "two ", "three"]}),
                            (priced("gold", 100.0), {})])
    outer = outer_router(team, [], [1.0])
    request = ChatRequest(messages=[{"role": "user", "content": "q"}])  # type: ignore[list-item]
    traces: list[Any] = []
    events = outer.stream(request, on_trace=traces.append)
    first = await events.__anext__()
    assert first.delta.content == "one "  # type: ignore[union-attr]
    await events.aclose()
    attempt = traces[0].attempts[0]
    assert attempt.expert == "team" and attempt.error["kind"] == "cancelled" and attempt.usage_estimated
    assert attempt.nested is not None and attempt.nested["attempts"][0]["expert"] == "cheap"
    tokens = attempt.usage.prompt_tokens + attempt.usage.completion_tokens
    assert tokens > 0 and attempt.cost_usd == pytest.approx(tokens * 1.0 / 1000)
    assert attempt.cost_usd == pytest.approx(attempt.nested["cost_usd"])


def test_a_nested_routers_limits_are_the_tighter_of_its_own_and_what_its_caller_leaves() -> None:
    """``Deadline.within``: the caller's time less a 5% margin (at most 0.25 s), its budget (never below zero), or
    the router's own config where that is tighter; a caller with no limits leaves the config's."""
    import time

    from router.fallback import CallScope, Deadline

    now = time.monotonic()
    assert Deadline.within(120.0, None, None).seconds == 120.0
    free = Deadline.within(120.0, 0.5, CallScope())
    assert (free.seconds, free.budget_usd) == (120.0, 0.5)
    short = Deadline.within(120.0, None, CallScope(until=now + 2.0, budget_usd=0.3))
    assert short.seconds == pytest.approx(1.9, abs=0.01) and short.budget_usd == 0.3
    long = Deadline.within(120.0, 0.1, CallScope(until=now + 60.0, budget_usd=0.3))
    assert long.seconds == pytest.approx(59.75, abs=0.01) and long.budget_usd == 0.1
    own = Deadline.within(5.0, None, CallScope(until=now + 60.0, budget_usd=-0.01))
    assert own.seconds == 5.0 and own.budget_usd == 0.0
    assert Deadline.within(5.0, None, CallScope(until=now - 1.0)).remaining <= 0.0


async def test_a_router_over_http_gets_the_outer_budget_in_a_header() -> None:
    """The inner service reads x-moe-budget-usd: its panel's second member does not fit what the outer budget
    left."""
    team = http_team([(priced("a", 0.5), {}), (priced("b", 0.5), {})], panel=2)
    outer = outer_router(team, [], [1.0], fallback={"cost_budget_usd": 0.07})
    answer = await outer.complete(ChatRequest(messages=[{"role": "user", "content": "q"}],  # type: ignore[list-item]
                                              max_tokens=100))
    nested = answer.trace.attempts[0].nested
    assert nested is not None
    assert {a["expert"]: (a["error"] or {}).get("kind") for a in nested["attempts"]} == {
        "a": None, "b": "budget_exhausted"}
    await outer.aclose()


async def test_a_router_over_http_that_fails_reports_what_it_spent_and_its_trace() -> None:
    """Its service's 503, and a stream's error event, carry its trace (``moe``), as an answer does: the outer
    attempt counts what it spent and shows what it tried. Before, a stream that broke off mid-way was counted at
    the router expert's own prices ($0 here) and a failed call kept no inner trace."""
    broke = {"pieces": ["one ", "two ", "three"], "fail_after": 2, "fail": lambda n: ExpertUnavailable(n, "closed"),
             "cost": 0.002}
    down = {"fail": lambda n: ExpertServerError(n, 503, "busy")}
    team = http_team([(priced("a", 1.0), broke), (priced("b", 1.0), down)])
    outer = outer_router(team, [priced("solo", 1.0)], [0.8, 0.2])
    request = ChatRequest(messages=[{"role": "user", "content": "q"}])  # type: ignore[list-item]
    events = [e async for e in outer.stream(request)]
    end = events[-1]
    assert isinstance(end, StreamEnd)
    attempt = end.trace.attempts[0]
    assert attempt.expert == "team" and not attempt.ok and attempt.nested is not None
    assert [a["expert"] for a in attempt.nested["attempts"]] == ["a", "b"]
    assert attempt.cost_usd == pytest.approx(attempt.nested["cost_usd"]) and attempt.cost_usd > 0
    assert attempt.usage.completion_tokens == 2

    team = http_team([(priced("a", 1.0), down), (priced("b", 1.0), down)])
    outer = outer_router(team, [priced("solo", 1.0)], [0.8, 0.2])
    answer = await outer.complete(request)
    failed = answer.trace.attempts[0]
    assert answer.expert == "solo" and failed.expert == "team" and failed.error is not None
    assert failed.nested is not None and {a["expert"] for a in failed.nested["attempts"]} == {"a", "b"}
    await outer.aclose()


@pytest.mark.parametrize(("headers", "param", "words"), [
    ({"x-moe-deadline-s": "soon"}, "x-moe-deadline-s", "'soon' is not a number of seconds above 0 up to 3600"),
    ({"x-moe-deadline-s": "0"}, "x-moe-deadline-s", "above 0"),
    ({"x-moe-deadline-s": "nan"}, "x-moe-deadline-s", "not a number"),
    ({"x-moe-budget-usd": "-1"}, "x-moe-budget-usd", "'-1' is not a number of USD from 0 up to 1000"),
    ({"x-moe-budget-usd": "1e9"}, "x-moe-budget-usd", "up to 1000"),
    ({"x-moe-deadline-s": "1_0"}, "x-moe-deadline-s", "'1_0' is not a number"),
    ({"x-moe-first-output-s": "-2"}, "x-moe-first-output-s", "'-2' is not a number of seconds above 0"),
])
async def test_a_bad_limit_header_is_a_400_naming_it(headers: dict[str, str], param: str, words: str) -> None:
    config = fake_config(["a"])
    app = create_app(Orchestrator(config, FakeGate(["a"], {}, default=[1.0]), {"a": FakeExpert(config.expert("a"))}))
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r") as http:
        r = await http.post("/v1/chat/completions", json=body, headers=headers)
        twice = await http.post("/v1/chat/completions", json=body,
                                headers=[("x-moe-budget-usd", "1"), ("x-moe-budget-usd", "2")])
        fine = await http.post("/v1/chat/completions", json=body,
                               headers={"x-moe-deadline-s": "5", "x-moe-budget-usd": "0"})
    assert r.status_code == 400 and r.json()["error"]["param"] == param and words in r.json()["error"]["message"]
    assert twice.status_code == 400 and "sent 2 times" in twice.json()["error"]["message"]
    assert fine.status_code == 200


async def test_a_first_output_header_does_not_cut_short_a_plain_request() -> None:
    """x-moe-first-output-s gives a stream that long for its first output; a plain request has no output before
    its whole answer, which the deadline limits. It cut the plain request off at 0.1 s (a 503 saying the stream's
    first output ran out, every other expert left untried); a stream is still held to it."""
    config = fake_config(["a"])
    slow = FakeExpert(config.expert("a"), "late but whole", delay=0.3)
    app = create_app(Orchestrator(config, FakeGate(["a"], {}, default=[1.0]), {"a": slow}))
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}
    limits = {"x-moe-first-output-s": "0.1", "x-moe-deadline-s": "5"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r") as http:
        plain = await http.post("/v1/chat/completions", json=body, headers=limits)
        streamed = await http.post("/v1/chat/completions", json={**body, "stream": True}, headers=limits)
    assert plain.status_code == 200, plain.text
    assert plain.json()["choices"][0]["message"]["content"] == "late but whole"
    assert streamed.status_code == 503 and "first output ran out" in streamed.text, streamed.text


# Found by review: a shortened deadline blamed healthy experts, a nested stream did not know the outer first-step
# limit, a traced nested stream left by the client lost its spend, a retry counted its siblings twice.

async def test_a_clients_short_deadline_header_never_opens_a_healthy_experts_breaker() -> None:
    """Five requests with x-moe-deadline-s: 0.1 cut a 0.2 s expert off; its breaker must not open (the expert had
    no fair chance), or every other client would get 503 circuit_open."""
    config = fake_config(["healthy"])
    orch = Orchestrator(config, FakeGate(["healthy"], {}, default=[1.0]),
                        {"healthy": FakeExpert(config.expert("healthy"), delay=0.2)})
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(orch)), base_url="http://r") as http:
        for _ in range(5):
            cut = await http.post("/v1/chat/completions", json=body, headers={"x-moe-deadline-s": "0.1"})
            assert cut.status_code == 503
        assert orch.breakers.snapshot("healthy")["state"] == "closed"
        assert (await http.post("/v1/chat/completions", json=body)).status_code == 200


async def test_a_nested_router_reached_late_in_the_outer_deadline_blames_no_one() -> None:
    """The outer fallback reaches the nested router with little of its 1 s deadline left: the inner expert cut off
    at the narrowed deadline had no fair chance, and the nested router ran out of time (a timeout, not a 503), so
    no breaker opens at either level."""
    team = in_process_team([(priced("healthy", 1.0), {"delay": 0.3})])
    outer = outer_router(team, [priced("hangs", 1.0) | {"timeout_s": 0.8}], [0.2, 0.8],
                         fallback={"deadline_s": 1.0, "retries": 0})
    outer.experts["hangs"] = outer.dispatch.experts["hangs"] = FakeExpert(outer.config.expert("hangs"), delay=30.0)
    request = ChatRequest(messages=[{"role": "user", "content": "q"}])  # type: ignore[list-item]
    for _ in range(5):
        with pytest.raises(RouteFailed) as failed:
            await outer.complete(request)
        kinds = {c.expert: c.kind for c in failed.value.causes}
        assert kinds == {"hangs": "timeout", "team": "timeout"}
    inner = team._inner
    assert inner is not None and inner.breakers.snapshot("healthy")["state"] == "closed"
    assert outer.breakers.snapshot("team")["state"] == "closed"


@pytest.mark.parametrize("over_http", [False, True], ids=["in-process", "http"])
async def test_a_nested_stream_stops_before_the_outer_cuts_its_first_step(over_http: bool) -> None:
    """A stream's first output must come within the nesting expert's timeout_s (0.3 s here), though the stream
    may then run to the outer deadline. The inner router knows it (over HTTP, from x-moe-first-output-s), so it
    stops its hanging first expert itself, before the outer level cuts the stream. In process, that expert is
    blamed (it had the nesting expert's whole 0.3 s), so its breaker opens and the stream recovers, as a plain
    call through the same router does. Over HTTP the limit is a client's, which blames no expert: the inner
    service's own config judges its experts. Before, the outer level cancelled the stream every time."""
    build = http_team if over_http else in_process_team
    team = build([(priced("hangs", 1.0) | {"timeout_s": 30.0}, {"delay": 30.0}),
                  (priced("fast", 1.0), {"pieces": ["fast ", "answers"]})], timeout_s=0.3)
    outer = outer_router(team, [], [1.0], fallback={"retries": 0, "breaker": {"enabled": False}})
    request = ChatRequest(messages=[{"role": "user", "content": "q"}])  # type: ignore[list-item]
    errors = []
    for _ in range(7):
        try:
            events = [e async for e in outer.stream(request)]
        except RouteFailed as exc:
            errors.append(str(exc))
        else:
            assert "".join(e.delta.content for e in events[:-1]) == "fast answers"  # type: ignore[union-attr]
            break
    assert len(errors) == (7 if over_http else 5)
    assert all("caller's time for the stream's first output ran out" in e for e in errors)
    await outer.aclose()


async def test_a_traced_nested_stream_the_client_leaves_keeps_its_spend() -> None:
    """With tracing on, the traced wrapper closes the nested router's stream when the client leaves, so its last
    try is in its trace and priced (before: $0, and the inner in-flight slot held until garbage collection)."""
    from opentelemetry.sdk.trace import TracerProvider

    from router.tracing import TracedExpert

    team = in_process_team([(priced("cheap", 1.0), {"pieces": ["one ", "two "]}), (priced("gold", 100.0), {})])
    outer = outer_router(team, [], [1.0])
    outer.experts["team"] = outer.dispatch.experts["team"] = TracedExpert(team, TracerProvider().get_tracer("t"))
    traces: list[Any] = []
    events = outer.stream(ChatRequest(messages=[{"role": "user", "content": "q"}]),  # type: ignore[list-item]
                          on_trace=traces.append)
    await events.__anext__()
    await events.aclose()
    attempt = traces[0].attempts[0]
    assert attempt.cost_usd > 0 and attempt.nested is not None and attempt.nested["attempts"][0]["expert"] == "cheap"
    inner = team._inner
    assert inner is not None and inner.capacity.in_flight["cheap"] == 0


async def test_a_retried_nested_panel_member_is_not_charged_its_siblings_cost_twice() -> None:
    """The nested router fails once (a reset) and is retried. By then its sibling has answered and its $0.05 is in
    the trace: the retry may spend $0.17 - $0.05, not that less the sibling's estimate again."""
    failures = {"left": 2}

    class FailsFirst(FakeExpert):
        async def generate(self, request: ChatRequest) -> ExpertReply:
            if failures["left"]:
                failures["left"] -= 1
                raise ExpertUnavailable(self.name, "reset")
            return await super().generate(request)

    inner_config = parse_config({"version": 1, "gate": {"top_k": {"policy": "fixed", "k": 2}},
                                 "experts": [priced("a", 0.5), priced("b", 0.5)]}, check_env=False)
    inner = Orchestrator(inner_config, FakeGate(["a", "b"], {}, default=[0.5, 0.25]),
                         {n: FailsFirst(inner_config.expert(n), cost=0.05) for n in ["a", "b"]})
    config = parse_config({"version": 1, "gate": {"top_k": {"policy": "fixed", "k": 2}},
                           "fallback": {"cost_budget_usd": 0.17, "retries": 1, "backoff_base_s": 0.01,
                                        "backoff_max_s": 0.01},
                           "experts": [{"name": "team", "type": "router", "model": "auto", "endpoint": "http://x/v1"},
                                       priced("sibling", 0.5)]}, check_env=False)
    outer = Orchestrator(config, FakeGate(["team", "sibling"], {}, default=[0.6, 0.4]),
                         {"team": RouterExpert(config.expert("team"), orchestrator=inner),
                          "sibling": FakeExpert(config.expert("sibling"), cost=0.05)})
    answer = await outer.complete(ChatRequest(messages=[{"role": "user", "content": "q"}],  # type: ignore[list-item]
                                              max_tokens=100))
    retried = [a for a in answer.trace.attempts if a.expert == "team"][-1]
    assert retried.retry == 1 and retried.nested is not None
    assert {a["expert"]: a["ok"] for a in retried.nested["attempts"]} == {"a": True, "b": True}


@pytest.mark.parametrize("over_http", [False, True], ids=["in-process", "http"])
async def test_a_clients_short_deadline_never_opens_a_nested_routers_breaker(over_http: bool) -> None:
    """Over HTTP the inner service's 503 (every expert it called cut off by the deadline the outer passed down)
    counted as the nested router's server error: five clients with x-moe-deadline-s 0.1 opened its breaker, and
    everyone else lost the domain for the cooldown. It is a timeout now, as in-process."""
    make = http_team if over_http else in_process_team
    team = make([(priced("healthy", 1.0), {"delay": 0.3})])
    outer = outer_router(team, [], [1.0])
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(outer)), base_url="http://r") as http:
        for _ in range(6):
            cut = await http.post("/v1/chat/completions", json=body, headers={"x-moe-deadline-s": "0.1"})
            assert cut.status_code == 503
            assert [c["kind"] for c in cut.json()["error"]["causes"]] == ["timeout"]
        assert outer.breakers.snapshot("team")["state"] == "closed"
        assert (await http.post("/v1/chat/completions", json=body)).status_code == 200


def test_a_nested_routers_build_failure_is_marked_as_the_nested_files(tmp_path: Path) -> None:
    """What stops a nested router's build (its gate untrained) carries a note naming its file, so a reload names
    it under the nesting expert (``router.reload``) rather than as the outer config's own gate."""
    from router.build import GateNotTrained
    from router.hierarchy import nested_failure

    inner = write(tmp_path / "inner.yaml", [leaf("a")])
    outer = parse_config({"version": 1, "experts": [{"name": "team", "type": "router", "model": "auto",
                                                     "router_config": "inner.yaml"}]},
                         base_dir=tmp_path, check_env=False)
    with pytest.raises(GateNotTrained) as failed:
        RouterExpert(outer.expert("team"), ExpertContext(base_dir=tmp_path))
    assert nested_failure(failed.value) and failed.value.__notes__ == [f"in the router nested from {inner}"]
    assert not nested_failure(GateNotTrained(tmp_path / "gate"))


@pytest.mark.parametrize("over_http", [False, True], ids=["in-process", "http"])
async def test_a_saturated_nested_router_hands_queries_on_as_a_saturated_expert_does(over_http: bool) -> None:
    """Its one expert at its in-flight limit, the nested router called no one and failed: that counted as its
    server error (503), so it was retried, took an attempt (with ``max_attempts: 1`` a 503 though the sibling was
    idle) and opened its breaker, keeping the domain away for the cooldown once the load had gone. It is
    overloaded now: handed on at once, no failure counted."""
    make = http_team if over_http else in_process_team
    team = make([({**priced("slow", 1.0), "max_concurrency": 1}, {"delay": 0.3})])
    outer = outer_router(team, [priced("sibling", 1.0)], [0.9, 0.1],
                         fallback={"max_attempts": 1, "retries": 1, "backoff_base_s": 0.01, "backoff_max_s": 0.01,
                                   "breaker": {"failure_threshold": 2}})
    request = ChatRequest(messages=[{"role": "user", "content": "q"}])  # type: ignore[list-item]
    answers = await asyncio.gather(*(outer.complete(request) for _ in range(5)))
    assert sorted(a.expert for a in answers) == ["sibling"] * 4 + ["team"]
    handed = [a.trace.attempts for a in answers if a.expert == "sibling"]
    assert all([(t.expert, t.retry, t.error["kind"] if t.error else None) for t in attempts] ==
               [("team", 0, "overloaded"), ("sibling", 0, None)] for attempts in handed)
    assert outer.breakers.snapshot("team")["state"] == "closed"
    assert (await outer.complete(request)).expert == "team"


def test_an_http_inner_routers_error_is_judged_by_each_experts_last_attempt() -> None:
    """In-process, the causes hold each expert's last error: a 503 retried into a timeout ran out of time. Over
    HTTP every attempt of the trace was read, so the retried expert's 503 kept it a server error, which opened
    the breaker at a client's short deadline. An inner router that called no one, one expert at its limit, was
    saturated."""
    from router.hierarchy import _over_http

    def attempt(expert: str, kind: str, retry: int = 0) -> dict[str, Any]:
        return {"expert": expert, "ok": False, "retry": retry, "error": {"expert": expert, "kind": kind}}

    def judged(attempts: list[dict[str, Any]] | None) -> str:
        error = ExpertServerError("team", 503, "all experts failed")
        error.nested = None if attempts is None else {"attempts": attempts}
        out = _over_http(error)
        assert out.nested == error.nested
        return out.kind

    assert judged([attempt("a", "server_error"), attempt("a", "timeout", 1), attempt("b", "not_tried")]) == "timeout"
    assert judged([attempt("a", "timeout"), attempt("a", "server_error", 1)]) == "server_error"
    assert judged([attempt("a", "timeout"), attempt("b", "server_error")]) == "server_error"
    assert judged([attempt("a", "timeout"), {"expert": "b", "ok": True}]) == "server_error"
    assert judged([attempt("b", "circuit_open")]) == "server_error" and judged(None) == "server_error"
    assert judged([attempt("a", "overloaded"), attempt("b", "circuit_open")]) == "overloaded"
    assert judged([attempt("a", "overloaded"), attempt("b", "server_error")]) == "server_error"
