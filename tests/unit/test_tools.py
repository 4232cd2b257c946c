"""Tool calling through the router: only experts declaring ``tools`` get such requests, and tool calls come back
unchanged, plain and streamed, far enough for a LangChain agent loop to complete against scripted experts."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from experts.errors import ExpertUnavailable
from router.build import build_experts
from router.config import parse_config
from router.orchestrator import NoCapableExpert, Orchestrator
from router.sdk import AsyncClient
from router.service import create_app
from tests.doubles.fakes import FakeExpert, FakeGate
from tests.doubles.scripted_server import Behaviour, ScriptedOpenAIServer

TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two integers.",
                                           "parameters": {"type": "object", "properties": {
                                               "a": {"type": "integer"}, "b": {"type": "integer"}},
                                               "required": ["a", "b"]}}}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}


def config(experts: list[tuple[str, list[str]]], urls: dict[str, str] | None = None) -> Any:
    raw = [{"name": n, "type": "vllm" if urls else "replay", "model": f"model-{n}", "capabilities": caps,
            "timeout_s": 5.0, **({"endpoint": urls[n]} if urls else
                                 {"replay": {"source": "routerbench", "path": "unused"}})}
           for n, caps in experts]
    return parse_config({"version": 1, "experts": raw}, check_env=False)


def fake_orchestrator(fail: frozenset[str] = frozenset()) -> tuple[Orchestrator, dict[str, FakeExpert]]:
    # The gate prefers "chatty", which cannot call tools; "agent" and "backup" can.
    cfg = config([("chatty", ["chat", "stream"]), ("agent", ["chat", "stream", "tools"]),
                  ("backup", ["chat", "tools"])])
    experts = {n: FakeExpert(cfg.expert(n), fail=(lambda x: ExpertUnavailable(x, "down")) if n in fail else None)
               for n in cfg.expert_names}
    return Orchestrator(cfg, FakeGate(cfg.expert_names, {}, default=[0.7, 0.2, 0.1]), experts), experts


def chat(tools: bool, model: str = "auto") -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "what is 2 + 3?"}]}
    if tools:
        body["tools"] = TOOLS
    return body


async def test_a_request_with_tools_goes_only_to_experts_declaring_them() -> None:
    orch, experts = fake_orchestrator(fail=frozenset({"agent"}))
    from experts.types import ChatRequest

    plain = await orch.complete(ChatRequest.model_validate(chat(tools=False)))
    assert plain.expert == "chatty"
    answer = await orch.complete(ChatRequest.model_validate(chat(tools=True)))
    # "agent" was the panel and failed; fallback skipped "chatty", which never saw a request with tools.
    assert answer.expert == "backup"
    assert [a.expert for a in answer.trace.attempts] == ["agent", "backup"]
    assert all(r.tools is None for r in experts["chatty"].requests)
    assert answer.trace.decision is not None and answer.trace.decision.chosen[0].expert == "agent"


async def test_tools_with_no_capable_expert_is_a_clear_400() -> None:
    cfg = config([("chatty", ["chat", "stream"]), ("other", ["chat"])])
    orch = Orchestrator(cfg, FakeGate(cfg.expert_names, {}, default=[0.6, 0.4]),
                        {n: FakeExpert(cfg.expert(n)) for n in cfg.expert_names})
    tools_orch, _ = fake_orchestrator()
    async with _client(create_app(orch)) as http:
        routed = await http.post("/v1/chat/completions", json=chat(tools=True))
        streamed = await http.post("/v1/chat/completions", json={**chat(tools=True), "stream": True})
    async with _client(create_app(tools_orch)) as http:
        direct = await http.post("/v1/chat/completions", json=chat(tools=True, model="chatty"))
        fine = await http.post("/v1/chat/completions", json=chat(tools=True, model="agent"))
    for r in (routed, streamed):
        assert r.status_code == 400
        error = r.json()["error"]
        assert (error["code"], error["param"]) == ("tools_not_supported", "tools")
        assert "no configured expert" in error["message"] and "'tools' capability" in error["message"]
    assert direct.status_code == 400
    assert "experts that do: agent, backup" in direct.json()["error"]["message"]
    assert fine.status_code == 200
    with pytest.raises(NoCapableExpert):
        await tools_orch.complete(_request(chat(tools=True, model="chatty")))


async def test_tools_a_request_will_not_call_need_no_expert_declaring_them() -> None:
    """tools with tool_choice "none" (offered, never called) was refused 400 tools_not_supported where no expert
    declares tools; OpenAI answers it in text. An expert without the capability is sent it without the tools."""
    cfg = config([("chatty", ["chat", "stream"]), ("other", ["chat"])])
    experts = {n: FakeExpert(cfg.expert(n)) for n in cfg.expert_names}
    orch = Orchestrator(cfg, FakeGate(cfg.expert_names, {}, default=[0.6, 0.4]), experts)
    body = {**chat(tools=True), "tool_choice": "none"}
    async with _client(create_app(orch)) as http:
        plain = await http.post("/v1/chat/completions", json=body)
        streamed = await http.post("/v1/chat/completions", json={**body, "stream": True})
        named = await http.post("/v1/chat/completions", json={**body, "model": "other"})
    assert [r.status_code for r in (plain, streamed, named)] == [200, 200, 200]
    sent = [*experts["chatty"].requests, *experts["other"].requests]
    assert len(sent) == 3 and all(r.tools is None for r in sent)
    assert all("tools" not in r.upstream_payload("m", stream=False) and "tool_choice" not in
               r.upstream_payload("m", stream=False) for r in sent)
    tools_orch, tool_experts = fake_orchestrator()
    await tools_orch.complete(_request({**body, "model": "agent"}))  # one that takes tools gets them as sent
    assert tool_experts["agent"].requests[-1].tools == TOOLS


IMAGE = [{"type": "text", "text": "what is in this picture?"},
         {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]


async def test_a_request_with_an_image_goes_only_to_experts_declaring_vision() -> None:
    # The gate prefers "blind", which cannot read images; "looker" can, and can call tools too.
    cfg = config([("blind", ["chat", "stream", "tools"]), ("looker", ["chat", "stream", "vision", "tools"])])
    experts = {n: FakeExpert(cfg.expert(n)) for n in cfg.expert_names}
    orch = Orchestrator(cfg, FakeGate(cfg.expert_names, {}, default=[0.8, 0.2]), experts)
    picture = {"model": "auto", "messages": [{"role": "user", "content": IMAGE}]}
    async with _client(create_app(orch)) as http:
        routed = await http.post("/v1/chat/completions", json=picture)
        both = await http.post("/v1/chat/completions", json={**picture, "tools": TOOLS})
        text = await http.post("/v1/chat/completions", json=chat(tools=False))
        direct = await http.post("/v1/chat/completions", json={**picture, "model": "blind"})
        decided = await http.post("/v1/route", json={"messages": picture["messages"]})
    assert routed.status_code == 200 and routed.json()["model"] == "looker"
    assert both.status_code == 200 and both.json()["model"] == "looker"
    assert text.json()["model"] == "blind"  # a text request still goes where the gate says
    assert decided.status_code == 200 and [c["expert"] for c in decided.json()["chosen"]] == ["looker"]
    assert all(not any(m.has_image() for m in r.messages) for r in experts["blind"].requests)
    assert direct.status_code == 400
    error = direct.json()["error"]
    assert (error["code"], error["param"]) == ("vision_not_supported", "messages")
    assert "holds an image" in error["message"] and "experts that do: looker" in error["message"]


async def test_an_image_and_tools_with_no_expert_declaring_both_is_a_clear_400() -> None:
    cfg = config([("seer", ["chat", "vision"]), ("agent", ["chat", "tools"])])
    orch = Orchestrator(cfg, FakeGate(cfg.expert_names, {}, default=[0.5, 0.5]),
                        {n: FakeExpert(cfg.expert(n)) for n in cfg.expert_names})
    async with _client(create_app(orch)) as http:
        r = await http.post("/v1/chat/completions",
                            json={"messages": [{"role": "user", "content": IMAGE}], "tools": TOOLS})
    assert r.status_code == 400
    error = r.json()["error"]
    assert (error["code"], error["param"]) == ("tools+vision_not_supported", "tools")
    assert "'tools' and 'vision' capabilities" in error["message"] and "no configured expert" in error["message"]


async def test_a_route_decision_no_expert_could_serve_is_the_same_400_as_the_chat_request() -> None:
    cfg = config([("blind", ["chat", "tools"]), ("deaf", ["chat"])])
    orch = Orchestrator(cfg, FakeGate(cfg.expert_names, {}, default=[0.5, 0.5]),
                        {n: FakeExpert(cfg.expert(n)) for n in cfg.expert_names})
    async with _client(create_app(orch)) as http:
        routed = await http.post("/v1/route", json={"messages": [{"role": "user", "content": IMAGE}]})
        chatted = await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": IMAGE}]})
    assert routed.status_code == chatted.status_code == 400
    assert routed.json() == chatted.json()
    assert routed.json()["error"]["code"] == "vision_not_supported"
    assert "no configured expert does" in routed.json()["error"]["message"]


def _request(body: dict[str, Any]) -> Any:
    from experts.types import ChatRequest

    return ChatRequest.model_validate(body)


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router")


# -- real HTTP experts (the scripted test double) behind the router -------------------------------------------
@pytest.fixture
def servers() -> Iterator[dict[str, ScriptedOpenAIServer]]:
    with ScriptedOpenAIServer(name="chatty") as chatty, ScriptedOpenAIServer(name="agent") as agent:
        chatty.default = Behaviour.ok("I cannot call tools.")
        yield {"chatty": chatty, "agent": agent}


def routed_app(servers: dict[str, ScriptedOpenAIServer]) -> Any:
    cfg = config([("chatty", ["chat", "stream"]), ("agent", ["chat", "stream", "tools"])],
                 {n: s.url for n, s in servers.items()})
    gate = FakeGate(cfg.expert_names, {}, default=[0.9, 0.1])  # would pick "chatty" for everything
    return create_app(Orchestrator(cfg, gate, build_experts(cfg)))


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


async def _agent_loop(llm: Any, stream: bool) -> list[BaseMessage]:
    """Call -> tool result message -> final answer: the loop every tool-using agent runs."""
    bound = llm.bind_tools([add])
    messages: list[BaseMessage] = [HumanMessage("What is 2 + 3? Use the tool.")]
    for _ in range(4):
        if stream:
            reply: Any = None
            async for chunk in bound.astream(messages):
                reply = chunk if reply is None else reply + chunk
            assert isinstance(reply, AIMessageChunk)
        else:
            reply = await bound.ainvoke(messages)
        messages.append(reply)
        if not reply.tool_calls:
            return messages
        for call in reply.tool_calls:
            messages.append(ToolMessage(str(add.invoke(call["args"])), tool_call_id=call["id"]))
    raise AssertionError("the agent loop did not finish")


@pytest.mark.parametrize("stream", [False, True])
async def test_langchain_agent_loop_with_a_tool_completes_through_the_router(
        servers: dict[str, ScriptedOpenAIServer], stream: bool) -> None:
    servers["agent"].push(Behaviour.ok("", tool_calls=[CALL]), Behaviour.ok("The sum is 5."))
    app = routed_app(servers)
    async with _client(app) as http:
        llm = ChatOpenAI(model="auto", base_url="http://router/v1", api_key="unused",  # type: ignore[arg-type]
                         http_async_client=http, max_retries=0)
        messages = await _agent_loop(llm, stream)
    await app.state.orchestrator.aclose()  # no lifespan runs in-process: close the experts' connections
    call, result, final = messages[1], messages[2], messages[3]
    assert isinstance(call, AIMessage)
    assert call.tool_calls == [{"name": "add", "args": {"a": 2, "b": 3}, "id": "call_1", "type": "tool_call"}]
    assert result.content == "5"
    assert final.content == "The sum is 5."
    assert servers["chatty"].requests == []  # the gate's favourite cannot call tools
    first, second = servers["agent"].requests
    assert first["tools"][0]["function"]["name"] == "add"
    tool_message = second["messages"][-1]
    assert (tool_message["role"], tool_message["tool_call_id"], tool_message["content"]) == ("tool", "call_1", "5")
    assert second["messages"][-2]["tool_calls"][0]["function"] == CALL["function"]


async def test_streamed_tool_call_deltas_pass_through_unchanged(servers: dict[str, ScriptedOpenAIServer]) -> None:
    servers["agent"].push(Behaviour.ok("", tool_calls=[CALL]), Behaviour.ok("", tool_calls=[CALL]))
    app = routed_app(servers)
    async with _client(app) as http, http.stream("POST", "/v1/chat/completions",
                                                 json={**chat(tools=True), "stream": True}) as r:
        events = [json.loads(line[6:]) async for line in r.aiter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    deltas = [e["choices"][0]["delta"]["tool_calls"] for e in events if "tool_calls" in e["choices"][0]["delta"]]
    # vLLM's shape, as the scripted expert sent it: id and name first, then the arguments.
    assert deltas == [[{"index": 0, "id": "call_1", "type": "function", "function": {"name": "add", "arguments": ""}}],
                      [{"index": 0, "function": {"arguments": '{"a": 2, "b": 3}'}}]]
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    sdk = AsyncClient("http://router", transport=httpx.ASGITransport(app=app))
    chunks = [c async for c in sdk.stream("What is 2 + 3?", tools=TOOLS)]
    await sdk.aclose()
    await app.state.orchestrator.aclose()
    assert [c.tool_calls for c in chunks if c.tool_calls] == deltas


async def test_a_streamed_request_goes_only_to_experts_declaring_stream() -> None:
    """An expert declared without `stream` (a backend that serves whole answers only) gets no streamed request:
    the gate's favourite passes it on, and naming it directly is a 400 saying who can stream."""
    cfg = config([("whole", ["chat", "tools"]), ("streamer", ["chat", "stream"])])
    experts = {n: FakeExpert(cfg.expert(n)) for n in cfg.expert_names}
    orch = Orchestrator(cfg, FakeGate(cfg.expert_names, {}, default=[0.8, 0.2]), experts)
    async with _client(create_app(orch)) as http:
        plain = await http.post("/v1/chat/completions", json=chat(tools=False))
        streamed = await http.post("/v1/chat/completions", json={**chat(tools=False), "stream": True})
        direct = await http.post("/v1/chat/completions", json={**chat(tools=False, model="whole"), "stream": True})
        both = await http.post("/v1/chat/completions", json={**chat(tools=True), "stream": True})
    assert plain.json()["model"] == "whole"
    assert streamed.status_code == 200 and streamed.headers["x-moe-expert"] == "streamer"
    assert not any(r.stream for r in experts["whole"].requests)
    error = direct.json()["error"]
    assert (direct.status_code, error["code"], error["param"]) == (400, "stream_not_supported", "stream")
    assert "is streamed (stream: true)" in error["message"] and "experts that do: streamer" in error["message"]
    # tools and a stream, which no single expert takes: refused naming both
    assert both.status_code == 400 and both.json()["error"]["code"] == "tools+stream_not_supported"


def test_tool_definitions_and_tool_call_arguments_count_towards_the_prompt() -> None:
    """max_prompt_chars and the prompt estimate (cost budget, usage where an expert sends none) read what an
    upstream tokenises: tools' definitions and past calls' arguments too, not the text alone."""
    from router.requests import RequestProblem, parse_chat

    long = "x" * 5000
    described = chat(tools=True)
    described["tools"] = [{"type": "function", "function": {"name": "add", "description": long}}]
    called = {"model": "auto", "messages": [
        {"role": "user", "content": "add them"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "add", "arguments": json.dumps({"a": long})}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "5"}]}
    for body in (described, called):
        with pytest.raises(RequestProblem) as info:
            parse_chat(body, 2000)
        assert info.value.code == "context_length_exceeded"
        assert "with their tool calls and the tools' definitions" in str(info.value)
        assert parse_chat(body, 10_000).estimated_prompt_tokens() > 5000 // 4
    plain = parse_chat(chat(tools=False), 2000)
    assert plain.text_chars() == len("what is 2 + 3?")


def test_a_message_name_or_a_part_that_is_not_text_counts_towards_the_prompt() -> None:
    from router.requests import RequestProblem, parse_chat

    long = "x" * 5000
    parts = [{"type": "text", "text": "hi"}, {"type": "input_text", "text": long}]
    for message in ({"role": "user", "content": "hi", "name": long}, {"role": "user", "content": parts}):
        with pytest.raises(RequestProblem) as info:
            parse_chat({"model": "auto", "messages": [message]}, 2000)
        assert info.value.code == "context_length_exceeded"
