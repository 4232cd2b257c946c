"""Gaps an audit with the official openai client found, each held here: an upstream answer without usage is
estimated, not free; the SDK refuses ``stream=`` among a call's parameters; an empty ``tools`` list is no tools
upstream; an unknown role is named in words; a stream's ``stream_options`` reach the expert merged, not replaced.
Upstreams are the scripted OpenAI-compatible server (a test double, real HTTP), which records each request body."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI, BadRequestError

from experts.openai_compat import OpenAICompatibleExpert
from experts.types import ChatMessage, ChatRequest
from router.config import ExpertConfig
from router.langchain import ChatMoERouter
from router.sdk import AsyncClient, Client, LocalRouter
from tests.doubles.scripted_server import Behaviour, ScriptedOpenAIServer
from tests.support import service_over

ASK = [{"role": "user", "content": "what is the capital of France?"}]  # 30 characters: 7 tokens by estimate
PRICES = {"input_per_1k": 1.0, "output_per_1k": 2.0}


@pytest.fixture
def upstream() -> Iterator[ScriptedOpenAIServer]:
    with ScriptedOpenAIServer(name="audit") as server:
        yield server


def service(server: ScriptedOpenAIServer, **config: Any) -> AbstractAsyncContextManager[httpx.AsyncClient]:
    raw = [{"name": "solo", "type": "vllm", "model": "m", "endpoint": server.url, "timeout_s": 5.0, "cost": PRICES,
            "capabilities": ["chat", "stream", "tools"]}]
    return service_over(raw, [1.0], **config)


def openai_client(http: httpx.AsyncClient) -> AsyncOpenAI:
    return AsyncOpenAI(base_url="http://router/v1", api_key="unused", http_client=http, max_retries=0)


def unmetered(content: str) -> Behaviour:
    """A plain answer with no ``usage``, as some OpenAI-compatible servers send."""
    return Behaviour.raw(json.dumps({"id": "x", "object": "chat.completion", "created": 1, "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}).encode())


# --- 2. usage: estimated where the upstream sent none ------------------------------------------------------


async def test_a_plain_answer_without_usage_is_estimated_not_free(upstream: ScriptedOpenAIServer) -> None:
    upstream.push(unmetered("Paris is the capital."))  # 21 characters: 6 tokens by estimate
    async with service(upstream) as http:
        completion = await openai_client(http).chat.completions.create(model="auto", messages=ASK)
        metrics = (await http.get("/metrics")).text
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens, completion.usage.total_tokens) == (
        7, 6, 13)
    assert (completion.model_extra or {})["moe"]["cost_usd"] == pytest.approx(7 / 1000 * 1.0 + 6 / 1000 * 2.0)
    assert 'moe_tokens_total{expert="solo",kind="completion"} 6.0' in metrics


async def test_upstream_usage_is_kept_as_sent(upstream: ScriptedOpenAIServer) -> None:
    upstream.push(Behaviour.ok("Paris", prompt_tokens=11, completion_tokens=1))
    expert = OpenAICompatibleExpert(ExpertConfig(name="e", type="vllm", endpoint=upstream.url, model="m",
                                                 cost=PRICES))
    try:
        reply = await expert.generate(ChatRequest(messages=[ChatMessage(role="user", content="capital?")]))
    finally:
        await expert.aclose()
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage_estimated) == (11, 1, False)


async def test_a_finished_stream_without_usage_is_estimated_too(upstream: ScriptedOpenAIServer) -> None:
    events = [{"choices": [{"index": 0, "delta": {"content": piece}}]} for piece in ("Par", "is")]
    events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    upstream.push(Behaviour.raw(body.encode(), content_type="text/event-stream"))
    expert = OpenAICompatibleExpert(ExpertConfig(name="e", type="vllm", endpoint=upstream.url, model="m",
                                                 cost=PRICES))
    try:
        deltas = [d async for d in expert.stream(ChatRequest(messages=[ChatMessage(**ASK[0])]))]
    finally:
        await expert.aclose()
    last = deltas[-1]
    assert last.usage is not None and last.usage_estimated
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (7, 2, 9)
    assert last.cost_usd == pytest.approx(7 / 1000 * 1.0 + 2 / 1000 * 2.0)


async def test_the_trace_marks_an_estimated_plain_answer(upstream: ScriptedOpenAIServer) -> None:
    upstream.push(unmetered("Paris"))
    async with service(upstream) as http:
        r = await http.post("/v1/chat/completions", json={"messages": ASK})
    assert r.json()["moe"]["attempts"][0]["usage_estimated"] is True


# --- 3. the SDK refuses stream= among a call's parameters ----------------------------------------------------


def test_client_refuses_stream_among_params_before_sending_anything() -> None:
    sent: list[httpx.Request] = []
    with Client("http://router", transport=httpx.MockTransport(lambda r: sent.append(r) or httpx.Response(500))) as c:
        with pytest.raises(TypeError, match=r"Client\.chat\(\) takes no stream= argument .*call Client\.stream"):
            c.chat("hi", stream=True)
        with pytest.raises(TypeError, match=r"Client\.stream\(\) takes no stream= argument .*call Client\.chat"):
            c.stream("hi", stream=False)  # refused at the call, before iterating
    assert sent == []


async def test_async_client_and_local_router_refuse_it_alike() -> None:
    sent: list[httpx.Request] = []
    transport = httpx.MockTransport(lambda r: sent.append(r) or httpx.Response(500))
    async with AsyncClient("http://router", transport=transport) as c:
        with pytest.raises(TypeError, match=r"AsyncClient\.chat\(\) takes no stream= .*AsyncClient\.stream"):
            await c.chat("hi", stream=True)
        with pytest.raises(TypeError, match=r"AsyncClient\.stream\(\) takes no stream="):
            c.stream("hi", stream=True)
    assert sent == []
    local = LocalRouter(SimpleNamespace())  # any use of the orchestrator would fail with AttributeError
    with pytest.raises(TypeError, match=r"LocalRouter\.chat\(\) takes no stream= .*LocalRouter\.stream"):
        await local.chat("hi", stream=True)
    with pytest.raises(TypeError, match=r"LocalRouter\.stream\(\) takes no stream="):
        local.stream("hi", stream=True)


async def test_langchains_own_stream_switch_is_not_sent(upstream: ScriptedOpenAIServer) -> None:
    upstream.default = Behaviour.ok("Paris")
    async with service(upstream) as http:
        model = ChatMoERouter(base_url="http://router", async_transport=http._transport)
        plain = await model.ainvoke("capital of France?", stream=False)
        streamed = await model.ainvoke("capital of France?", stream=True)
    assert plain.content == streamed.content == "Paris"
    assert [r["stream"] for r in upstream.requests] == [False, True]


# --- 4. an empty tools list is no tools ---------------------------------------------------------------------

TOOL = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize("stream", [False, True])
async def test_an_empty_tools_list_is_not_sent_nor_what_only_tools_mean(upstream: ScriptedOpenAIServer,
                                                                        stream: bool) -> None:
    upstream.default = Behaviour.ok("Paris")
    async with service(upstream) as http:
        for choice in ("auto", "none"):
            r = await http.post("/v1/chat/completions", json={
                "messages": ASK, "tools": [], "tool_choice": choice, "parallel_tool_calls": False, "stream": stream})
            assert r.status_code == 200
        with_tools = await http.post("/v1/chat/completions", json={
            "messages": ASK, "tools": [TOOL], "tool_choice": "auto", "parallel_tool_calls": False, "stream": stream})
        assert with_tools.status_code == 200
    for body in upstream.requests[:2]:
        assert not {"tools", "tool_choice", "parallel_tool_calls"} & set(body), body
    assert {k: upstream.requests[2][k] for k in ("tools", "tool_choice", "parallel_tool_calls")} == {
        "tools": [TOOL], "tool_choice": "auto", "parallel_tool_calls": False}


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
@pytest.mark.parametrize("tools", [[], None])
async def test_a_tool_choice_that_demands_a_call_without_tools_is_a_400(upstream: ScriptedOpenAIServer,
                                                                        choice: Any, tools: Any) -> None:
    body = {"messages": ASK, "tool_choice": choice, **({"tools": tools} if tools is not None else {})}
    async with service(upstream) as http:
        with pytest.raises(BadRequestError) as refused:
            await openai_client(http).chat.completions.create(model="auto", **body)
    error = refused.value.body
    assert isinstance(error, dict) and error["param"] == "tool_choice" and error["code"] == "invalid_request"
    assert "asks for a tool call" in error["message"]
    assert upstream.requests == []  # no expert was paid to refuse it


@pytest.mark.parametrize("legacy", [{"functions": [TOOL["function"]]},
                                    {"functions": [TOOL["function"]], "function_call": "auto"},
                                    {"function_call": {"name": "add"}}])
async def test_the_deprecated_function_calling_fields_are_a_400_naming_tools(upstream: ScriptedOpenAIServer,
                                                                              legacy: dict[str, Any]) -> None:
    """An expert would answer with message.function_call, which the router's answer does not carry: the call would
    be lost after the expert was paid. Refused up front, pointing at tools."""
    async with service(upstream) as http:
        with pytest.raises(BadRequestError) as refused:
            await openai_client(http).chat.completions.create(model="auto", messages=ASK, **legacy)
    error = refused.value.body
    assert isinstance(error, dict) and error["param"] == next(iter(legacy)) and error["code"] == "invalid_request"
    assert "deprecated function-calling fields are not supported; send tools" in error["message"]
    assert upstream.requests == []


async def test_the_deprecated_fields_sent_as_null_ask_for_nothing(upstream: ScriptedOpenAIServer) -> None:
    """The Python openai client sends a None it was given as null: like any other field's null, it asks for
    nothing (it was refused as the deprecated fields were)."""
    upstream.push(Behaviour.ok("4"))
    async with service(upstream) as http:
        answer = await openai_client(http).chat.completions.create(
            model="auto", messages=ASK, extra_body={"functions": None, "function_call": None})
    assert answer.choices[0].message.content == "4" and len(upstream.requests) == 1


# --- 5. an unknown role, in words ------------------------------------------------------------------------------


async def test_an_unknown_role_is_named_with_the_roles_there_are(upstream: ScriptedOpenAIServer) -> None:
    async with service(upstream) as http:
        with pytest.raises(BadRequestError) as refused:
            await openai_client(http).chat.completions.create(model="auto", messages=[  # type: ignore[misc,list-item]
                {"role": "wizard", "content": "hi"}])
    error = refused.value.body
    assert isinstance(error, dict) and error["param"] == "messages[0].role"
    assert error["message"] == ("invalid request: messages[0].role: 'wizard' is not one of system, user, "
                                "assistant, tool, developer, function")
    schema = ChatMessage.model_json_schema()["properties"]["role"]
    assert schema["enum"] == ["system", "user", "assistant", "tool", "developer", "function"]


# --- 6. stream_options: the client's keys, include_usage forced on -------------------------------------------


async def test_stream_options_are_merged_upstream_with_include_usage_forced(upstream: ScriptedOpenAIServer) -> None:
    upstream.default = Behaviour.ok("Paris is")
    options = {"include_usage": False, "continuous_usage_stats": True}
    async with service(upstream) as http:
        stream = await openai_client(http).chat.completions.create(
            model="auto", messages=ASK, stream=True, stream_options=options)  # type: ignore[arg-type]
        chunks = [c async for c in stream]
        plain = await http.post("/v1/chat/completions", json={"messages": ASK, "stream_options": options})
    assert upstream.requests[0]["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert "stream_options" not in upstream.requests[1]  # a request that does not stream sends none
    assert plain.status_code == 200
    # The client asked for no usage chunk, and gets none: only the upstream's include_usage was forced.
    assert all(c.choices for c in chunks)


@pytest.mark.parametrize(("options", "param", "says"), [
    ("yes", "stream_options", "stream_options must be an object, got str"),
    ({"include_usage": 1}, "stream_options.include_usage", "stream_options.include_usage must be a boolean, got 1"),
])
async def test_a_bad_stream_options_is_a_400_naming_the_field(upstream: ScriptedOpenAIServer, options: Any,
                                                              param: str, says: str) -> None:
    async with service(upstream) as http:
        r = await http.post("/v1/chat/completions", json={"messages": ASK, "stream": True, "stream_options": options})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == param and says in error["message"] and "<body>" not in error["message"]
    assert upstream.requests == []
