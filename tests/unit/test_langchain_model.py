"""ChatMoERouter against the service in-process (ASGI transport injected), with fake experts and a fake gate."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.tools import tool

from experts.errors import ExpertUnavailable
from experts.types import ChatRequest, ExpertReply, StreamDelta, Usage
from router.langchain import ChatMoERouter
from router.orchestrator import Orchestrator
from router.sdk import RouterAPIError
from router.security import hash_key
from router.service import create_app
from tests.doubles.fakes import FakeExpert, FakeGate, fake_config

NAMES = ["math", "code"]
KEY = "sk-langchain-test-key"


class SyncASGITransport(httpx.BaseTransport):
    """Drives the ASGI app from a blocking client: each request runs to its end on a fresh event loop
    (the body is buffered, which is fine for tests; streams are still read line by line)."""

    def __init__(self, app: Any) -> None:
        self.inner = httpx.ASGITransport(app=app)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        async def call() -> tuple[int, httpx.Headers, bytes]:
            response = await self.inner.handle_async_request(request)
            return response.status_code, response.headers, await response.aread()

        status, headers, body = asyncio.run(call())
        return httpx.Response(status, headers=headers, content=body)


class FakeToolExpert(FakeExpert):
    """Answers with one tool call, as an OpenAI-compatible expert would."""

    async def generate(self, request: ChatRequest) -> ExpertReply:
        self.requests.append(request)
        call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
        return ExpertReply(expert=self.name, content="", tool_calls=[call], finish_reason="tool_calls",
                           usage=Usage(prompt_tokens=4, completion_tokens=2, total_tokens=6))


    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamDelta]:
        """The same call as OpenAI streams it: id and name first, then the arguments in pieces."""
        self.requests.append(request)
        yield StreamDelta(tool_calls=[{"index": 0, "id": "call_1", "type": "function",
                                       "function": {"name": "add", "arguments": '{"a": 2'}}])
        yield StreamDelta(tool_calls=[{"index": 0, "function": {"arguments": ', "b": 3}'}}])
        yield StreamDelta(finish_reason="tool_calls", usage=Usage(prompt_tokens=4, completion_tokens=2,
                                                                  total_tokens=6))


def make_app(fail: frozenset[str] = frozenset(), keys: bool = False, tools: bool = False) -> FastAPI:
    security = {"security": {"api_keys": [{"name": "lc", "sha256": hash_key(KEY)}]}} if keys else {}
    config = fake_config(NAMES, **security)
    if tools:  # a request carrying tools reaches only experts that declare the capability
        config = config.model_copy(update={"experts": [
            e.model_copy(update={"capabilities": ["chat", "stream", "tools"]}) for e in config.experts]})
    experts: dict[str, FakeExpert] = {
        n: (FakeToolExpert if tools else FakeExpert)(
            config.expert(n), pieces=[f"{n} ", "says ", "hi"], text=f"{n} says hi",
            fail=(lambda x: ExpertUnavailable(x, "connection refused")) if n in fail else None)
        for n in NAMES}
    gate = FakeGate(NAMES, {"integral": [0.9, 0.1]}, default=[0.2, 0.8])
    app = create_app(Orchestrator(config, gate, experts), environ={})
    app.state.fake_experts = experts
    return app


def model_for(app: Any, **params: Any) -> ChatMoERouter:
    return ChatMoERouter(base_url="http://router", transport=SyncASGITransport(app),
                         async_transport=httpx.ASGITransport(app=app), **params)


async def test_ainvoke_returns_the_trace_and_the_answering_expert() -> None:
    model = model_for(make_app(fail=frozenset({"code"})))
    message = await model.ainvoke([SystemMessage("be brief"), HumanMessage("hello")])
    assert isinstance(message, AIMessage)
    assert message.content == "math says hi"
    assert message.response_metadata["model_name"] == "math"
    trace = message.response_metadata["moe_trace"]
    assert trace["decision"]["chosen"] == [{"expert": "code", "weight": 1.0}]
    assert [(a["expert"], a["ok"]) for a in trace["attempts"]] == [("code", False), ("math", True)]
    assert trace["cost_usd"] == pytest.approx(0.001)
    assert message.usage_metadata == {"input_tokens": 3, "output_tokens": 5, "total_tokens": 8}


def test_invoke_sync_sends_generation_params() -> None:
    app = make_app()
    model = model_for(app, temperature=0.2, max_tokens=32, model_kwargs={"seed": 7})
    message = model.invoke("an integral", stop=["\n\n"])
    assert message.content == "math says hi"
    assert message.response_metadata["model_name"] == "math"
    sent = app.state.fake_experts["math"].requests[-1]
    assert (sent.temperature, sent.max_tokens) == (0.2, 32)
    assert sent.model_extra == {"seed": 7, "stop": ["\n\n"]}
    assert sent.messages[0].content == "an integral"


async def test_lcel_chain_sync_and_async() -> None:
    app = make_app()
    prompt = ChatPromptTemplate.from_messages([("system", "You answer {topic} questions."), ("human", "{question}")])
    chain = prompt | model_for(app) | StrOutputParser()
    assert await chain.ainvoke({"topic": "maths", "question": "an integral"}) == "math says hi"
    assert await asyncio.to_thread(chain.invoke, {"topic": "code", "question": "a loop"}) == "code says hi"
    sent = app.state.fake_experts["math"].requests[-1]
    assert [m.role for m in sent.messages] == ["system", "user"]


async def test_astream_yields_tokens_then_the_trace() -> None:
    model = model_for(make_app())
    chunks = [c async for c in model.astream("an integral")]
    assert "".join(str(c.content) for c in chunks) == "math says hi"
    assert len([c for c in chunks if c.content]) == 3
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    assert isinstance(total, AIMessageChunk)
    assert total.response_metadata["model_name"] == "math"
    assert total.response_metadata["finish_reason"] == "stop"
    assert total.response_metadata["moe_trace"]["combiner"] == "stream"
    assert total.usage_metadata is not None and total.usage_metadata["output_tokens"] == 3


def test_stream_sync_and_chain_streaming() -> None:
    app = make_app()
    model = model_for(app)
    pieces = [c.content for c in model.stream("an integral")]
    assert "".join(str(p) for p in pieces) == "math says hi"
    chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | model | StrOutputParser()
    assert "".join(chain.stream({"q": "a loop"})) == "code says hi"


async def test_api_key_is_sent_and_errors_surface() -> None:
    app = make_app(keys=True)
    assert (await model_for(app, api_key=KEY).ainvoke("hi")).content == "code says hi"
    with pytest.raises(RouterAPIError) as info:
        await model_for(app).ainvoke("hi")
    assert info.value.status == 401
    with pytest.raises(RouterAPIError) as info:
        await model_for(make_app(), model="nope").ainvoke("hi")
    assert info.value.code == "model_not_found"
    assert KEY not in repr(model_for(app, api_key=KEY))


async def test_a_named_expert_is_called_directly() -> None:
    message = await model_for(make_app(), model="code").ainvoke("an integral")
    assert message.response_metadata["model_name"] == "code"
    assert message.response_metadata["moe_trace"]["decision"] is None


async def test_bound_tools_are_sent_and_tool_calls_come_back() -> None:
    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    app = make_app(tools=True)
    message = await model_for(app).bind_tools([add]).ainvoke("what is 2 + 3?")
    assert isinstance(message, AIMessage)
    assert message.tool_calls == [{"name": "add", "args": {"a": 2, "b": 3}, "id": "call_1", "type": "tool_call"}]
    sent = app.state.fake_experts["code"].requests[-1]
    assert sent.tools is not None and sent.tools[0]["function"]["name"] == "add"


async def test_the_combiner_is_sent_for_calls_and_refused_names_surface() -> None:
    app = make_app()
    message = await model_for(app, combiner="vote").ainvoke("an integral")
    assert message.response_metadata["moe_trace"]["combiner"] == "vote"
    assert (await model_for(app).ainvoke("an integral")).response_metadata["moe_trace"]["combiner"] == "top1"
    with pytest.raises(RouterAPIError, match="unknown combiner"):
        await model_for(app, combiner="best").ainvoke("an integral")


def test_the_combiner_is_sent_by_sync_calls_and_never_by_streams() -> None:
    app = make_app()
    trace = model_for(app, combiner="consensus").invoke("an integral").response_metadata["moe_trace"]
    assert trace["combiner"] == "consensus"
    streamed = "".join(str(c.content) for c in model_for(app, combiner="vote").stream("an integral"))
    assert streamed == "math says hi"  # one expert serves a stream: the combiner is not sent, nor refused


def _add_tool() -> Any:
    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b
    return add


async def test_streamed_tool_calls_reach_the_message_as_tool_call_chunks() -> None:
    app = make_app(tools=True)
    model = model_for(app).bind_tools([_add_tool()])
    chunks = [c async for c in model.astream("what is 2 + 3?")]
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    assert isinstance(total, AIMessageChunk)
    assert total.tool_calls == [{"name": "add", "args": {"a": 2, "b": 3}, "id": "call_1", "type": "tool_call"}]
    assert total.response_metadata["finish_reason"] == "tool_calls"


def test_streamed_tool_calls_reach_the_message_when_streaming_sync_too() -> None:
    total = None
    for chunk in model_for(make_app(tools=True)).bind_tools([_add_tool()]).stream("what is 2 + 3?"):
        total = chunk if total is None else total + chunk
    assert isinstance(total, AIMessageChunk)
    assert total.tool_calls == [{"name": "add", "args": {"a": 2, "b": 3}, "id": "call_1", "type": "tool_call"}]


def test_the_last_streamed_chunk_carries_usage_and_every_message_the_answer_id() -> None:
    app = make_app()
    chunks = list(model_for(app).stream("an integral"))
    assert chunks[-1].usage_metadata is not None and chunks[-1].usage_metadata["output_tokens"] == 3
    ids = {c.id for c in chunks}
    assert len(ids) == 1 and next(iter(ids)).startswith("chatcmpl-")  # what feedback(request_id=...) takes
    assert (model_for(app).invoke("an integral").id or "").startswith("chatcmpl-")


@pytest.mark.parametrize(("given", "sent"), [
    ("any", "required"),  # what with_structured_output asks for
    ("add", {"type": "function", "function": {"name": "add"}}),
    (True, {"type": "function", "function": {"name": "add"}}),
    ("auto", "auto"),
    ({"type": "function", "function": {"name": "add"}}, {"type": "function", "function": {"name": "add"}}),
])
async def test_tool_choice_is_sent_as_openai_takes_it(given: Any, sent: Any) -> None:
    app = make_app(tools=True)
    await model_for(app).bind_tools([_add_tool()], tool_choice=given).ainvoke("what is 2 + 3?")
    assert app.state.fake_experts["code"].requests[-1].model_extra["tool_choice"] == sent


def test_a_tool_choice_naming_no_bound_tool_is_refused() -> None:
    with pytest.raises(ValueError, match="neither auto, none, required, any nor a bound tool"):
        model_for(make_app(tools=True)).bind_tools([_add_tool()], tool_choice="subtract")
