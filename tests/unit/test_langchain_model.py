"""ChatMoERouter against the service in-process (ASGI transport injected), with fake experts and a fake gate."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda
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


def make_app(fail: frozenset[str] = frozenset(), keys: bool = False, tools: bool = False,
             panel: bool = False) -> FastAPI:
    security = {"security": {"api_keys": [{"name": "lc", "sha256": hash_key(KEY)}]}} if keys else {}
    # ``panel``: every call goes to both experts (top-k 2), so a combiner has answers to combine.
    gate = {"gate": {"top_k": {"policy": "fixed", "k": 2}}} if panel else {}
    config = fake_config(NAMES, **security, **gate)
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


async def test_a_tool_round_trip_in_standard_content_blocks_sends_chat_completions_messages() -> None:
    """With output_version="v1" the answer's content holds a tool_call block; sent back in the history, it went
    upstream as a content part ({"type": "tool_call", ...}), which OpenAI and vLLM refuse for an assistant."""
    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    app = make_app(tools=True)
    model = model_for(app, output_version="v1").bind_tools([add])
    answer = await model.ainvoke("what is 2 + 3?")
    assert isinstance(answer, AIMessage) and any(
        isinstance(b, dict) and b.get("type") == "tool_call" for b in answer.content)
    reasoned = answer.model_copy(update={"content": [{"type": "reasoning", "reasoning": "add them"},
                                                     {"type": "text", "text": "Adding.", "annotations": []},
                                                     {"type": "server_tool_call", "id": "s1", "name": "search",
                                                      "args": {}},
                                                     {"type": "non_standard", "value": {"x": 1}},
                                                     *answer.content]})
    await model.ainvoke([HumanMessage("what is 2 + 3?"), reasoned, ToolMessage("5", tool_call_id="call_1")])
    sent = app.state.fake_experts["code"].requests[-1].model_dump(exclude_none=True)["messages"][1]
    assert sent["role"] == "assistant" and sent["content"] in ("Adding.", [{"type": "text", "text": "Adding."}])
    assert [c["function"]["name"] for c in sent["tool_calls"]] == ["add"]


async def test_the_combiner_is_sent_for_calls_and_refused_names_surface() -> None:
    app = make_app()
    message = await model_for(app, combiner="vote").ainvoke("an integral")
    assert message.response_metadata["moe_trace"]["combiner"] == "vote"
    assert (await model_for(app).ainvoke("an integral")).response_metadata["moe_trace"]["combiner"] == "top1"
    with pytest.raises(RouterAPIError, match="unknown combiner"):
        await model_for(app, combiner="best").ainvoke("an integral")


def test_the_combiner_is_sent_by_sync_calls_and_a_stream_with_one_is_one_combined_chunk() -> None:
    trace = model_for(make_app(), combiner="consensus").invoke("an integral").response_metadata["moe_trace"]
    assert trace["combiner"] == "consensus"
    # A stream cannot be combined (one expert serves it): with a combiner, stream() makes one combined call and
    # yields its answer whole, rather than streaming one expert's with the combiner dropped.
    app = make_app(panel=True)
    chunks = list(model_for(app, combiner="vote").stream("an integral"))
    assert len(chunks) == 1 and isinstance(chunks[0], AIMessageChunk)
    assert chunks[0].content in ("math says hi", "code says hi")
    assert chunks[0].response_metadata["moe_trace"]["combiner"] == "vote"
    assert chunks[0].usage_metadata is not None and (chunks[0].id or "").startswith("chatcmpl-")
    assert all(len(e.requests) == 1 for e in app.state.fake_experts.values())  # the whole panel answered
    # top1 (as None) streams as ever
    streamed = list(model_for(app, combiner="top1").stream("an integral"))
    assert "".join(str(c.content) for c in streamed) == "math says hi" and len(streamed) > 1
    assert streamed[-1].response_metadata["moe_trace"]["combiner"] == "stream"


async def test_a_combiner_is_not_dropped_by_langchains_streaming_paths() -> None:
    """``astream``, and an ``ainvoke`` inside ``astream_events`` (as LangGraph's messages mode runs a node), give
    the combined answer, the model's combiner or one bound per call."""
    app = make_app(panel=True)
    model = model_for(app, combiner="vote")
    chunks = [c async for c in model.astream("an integral")]
    assert len(chunks) == 1 and chunks[0].response_metadata["moe_trace"]["combiner"] == "vote"
    bound = [c async for c in model_for(app).bind(combiner="vote").astream("an integral")]
    assert len(bound) == 1 and bound[0].response_metadata["moe_trace"]["combiner"] == "vote"

    async def node(question: str) -> Any:
        return await model.ainvoke(question)

    ends, tokens = [], []
    async for event in RunnableLambda(node).astream_events("an integral", version="v2"):
        if event["event"] == "on_chat_model_end":
            ends.append(event["data"]["output"])
        elif event["event"] == "on_chat_model_stream":
            tokens.append(event["data"]["chunk"].content)
    assert [m.response_metadata["moe_trace"]["combiner"] for m in ends] == ["vote"]
    assert tokens == [ends[0].content]  # the combined answer, as one token


def test_the_call_s_model_and_combiner_override_the_model_s() -> None:
    """``bind(model=...)``, ``invoke(..., model=...)`` and ``bind(combiner=...)`` as ``ChatOpenAI`` takes them: the
    call's value is sent, not refused as a second value for the SDK's argument."""
    app = make_app(panel=True)
    model = model_for(app, combiner="top1")
    assert model.bind(model="code").invoke("an integral").response_metadata["model_name"] == "code"
    assert model.invoke("an integral", model="code").response_metadata["model_name"] == "code"
    streamed = list(model_for(app).bind(model="code").stream("an integral"))
    assert streamed[-1].response_metadata["model_name"] == "code"
    trace = model.bind(combiner="vote").invoke("an integral").response_metadata["moe_trace"]
    assert trace["combiner"] == "vote"


async def test_the_call_s_model_and_combiner_override_the_model_s_async_too() -> None:
    app = make_app(panel=True)
    model = model_for(app, combiner="top1")
    assert (await model.bind(model="code").ainvoke("an integral")).response_metadata["model_name"] == "code"
    trace = (await model.bind(combiner="vote").ainvoke("an integral")).response_metadata["moe_trace"]
    assert trace["combiner"] == "vote"
    chunks = [c async for c in model_for(app).bind(model="code").astream("an integral")]
    assert chunks[-1].response_metadata["model_name"] == "code"


def test_arguments_it_does_not_declare_are_sent_with_a_warning_as_chatopenai_takes_them() -> None:
    app = make_app()
    with pytest.warns(UserWarning) as warned:
        seeded = model_for(app, seed=7, frequency_penalty=0.2)
    assert [str(w.message).split(":")[0] for w in warned] == [
        "seed is not a ChatMoERouter parameter", "frequency_penalty is not a ChatMoERouter parameter"]
    assert seeded.model_kwargs == {"seed": 7, "frequency_penalty": 0.2}
    seeded.invoke("an integral")
    assert app.state.fake_experts["math"].requests[-1].model_extra == {"seed": 7, "frequency_penalty": 0.2}
    with pytest.warns(UserWarning, match="max_completion_tokens is not a ChatMoERouter parameter"):
        model_for(app, max_completion_tokens=9).invoke("an integral")
    assert app.state.fake_experts["math"].requests[-1].max_completion_tokens == 9

    named = model_for(app, model_name="code")  # ChatOpenAI's name for model
    assert named.model == "code"
    assert named.invoke("an integral").response_metadata["model_name"] == "code"
    with pytest.raises(ValueError, match="model_name='code' and model='math' both given"):
        model_for(app, model_name="code", model="math")
    with pytest.raises(ValueError, match="seed given twice"):
        model_for(app, seed=1, model_kwargs={"seed": 2})
    with pytest.warns(UserWarning, match="combiner is a ChatMoERouter parameter"):
        moved = model_for(app, model_kwargs={"combiner": "vote", "seed": 3})
    assert (moved.combiner, moved.model_kwargs) == ("vote", {"seed": 3})


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


def test_stream_usage_is_the_model_s_never_a_request_field(recwarn: pytest.WarningsRecorder) -> None:
    """ChatOpenAI's stream_usage was sent to the experts as an unknown field (an upstream that checks its fields
    refuses it), and given to the model it warned of an undeclared argument."""
    app = make_app()
    sent = app.state.fake_experts["math"].requests
    quiet = model_for(app, stream_usage=False)
    assert not recwarn.list
    assert all(c.usage_metadata is None for c in quiet.stream("an integral"))
    counted = list(quiet.stream("an integral", stream_usage=True))
    assert counted[-1].usage_metadata is not None and counted[-1].usage_metadata["output_tokens"] == 3
    quiet.invoke("an integral", stream_usage=True)
    assert len(sent) == 3 and not any("stream_usage" in (r.model_extra or {}) for r in sent)


@pytest.mark.parametrize(("given", "sent"), [
    ("any", "required"),  # what langchain-core's own with_structured_output asks for
    ("add", {"type": "function", "function": {"name": "add"}}),
    (True, {"type": "function", "function": {"name": "add"}}),
    ("auto", "auto"),
    ({"type": "function", "function": {"name": "add"}}, {"type": "function", "function": {"name": "add"}}),
])
async def test_tool_choice_is_sent_as_openai_takes_it(given: Any, sent: Any) -> None:
    app = make_app(tools=True)
    await model_for(app).bind_tools([_add_tool()], tool_choice=given).ainvoke("what is 2 + 3?")
    assert app.state.fake_experts["code"].requests[-1].model_extra["tool_choice"] == sent


async def test_strict_tools_are_marked_strict_on_each_function_as_chatopenai_sends_them() -> None:
    app = make_app(tools=True)
    await model_for(app).bind_tools([_add_tool()], strict=True).ainvoke("what is 2 + 3?")
    sent = app.state.fake_experts["code"].requests[-1]
    assert sent.tools is not None and sent.tools[0]["function"]["strict"] is True
    assert "strict" not in (sent.model_extra or {})  # never a top-level request field


def test_a_call_s_timeout_is_its_http_timeout_and_never_sent() -> None:
    app = make_app()
    assert model_for(app).invoke("an integral", timeout=30).content == "math says hi"
    assert "timeout" not in (app.state.fake_experts["math"].requests[-1].model_extra or {})


def test_a_tool_choice_naming_no_bound_tool_is_refused() -> None:
    with pytest.raises(ValueError, match="neither auto, none, required, any nor a bound tool"):
        model_for(make_app(tools=True)).bind_tools([_add_tool()], tool_choice="subtract")


def test_chatopenai_s_openai_api_key_is_the_service_key_and_never_sent_to_the_experts() -> None:
    """``ChatOpenAI(openai_api_key=...)``'s name for the key authenticates, rather than landing in ``model_kwargs``,
    whence every request's body would carry it to every expert (and the service would answer 401)."""
    app = make_app(keys=True)
    model = model_for(app, openai_api_key=KEY)  # no warning: warnings are errors here
    assert model.model_kwargs == {} and model.api_key is not None
    assert model.invoke("hi").content == "code says hi"
    assert app.state.fake_experts["code"].requests[-1].model_extra == {}
    with pytest.raises(ValueError, match="openai_api_key and api_key both given") as info:
        model_for(app, openai_api_key=KEY, api_key="sk-another-key")
    assert KEY not in str(info.value) and "sk-another-key" not in str(info.value)


def test_no_timeout_as_chatopenai_and_the_sdk_take_it() -> None:
    model = model_for(make_app(), timeout=None)
    assert model.timeout is None
    assert model.invoke("an integral").content == "math says hi"


def test_a_refused_argument_s_error_never_shows_the_key() -> None:
    with pytest.raises(ValueError, match="seed given twice") as info:
        ChatMoERouter(api_key=KEY, seed=1, model_kwargs={"seed": 2})  # the key first: pydantic cuts a long input
    assert KEY[:8] not in str(info.value)


async def test_bound_limits_narrow_the_request_and_are_not_sent_upstream() -> None:
    """``bind(budget_usd=0)``: the SDK's per-request limit (the x-moe-budget-usd header), so only the panel's first
    call is made; neither it nor ``deadline_s`` reaches an expert as a request field."""
    app = make_app(panel=True)
    bound = model_for(app).bind(budget_usd=0, deadline_s=30)
    trace = (await bound.ainvoke("an integral")).response_metadata["moe_trace"]
    assert [(a["expert"], (a["error"] or {}).get("kind")) for a in trace["attempts"]] == [
        ("code", "budget_exhausted"), ("math", None)]
    sent = app.state.fake_experts["math"].requests[-1]
    assert "budget_usd" not in (sent.model_extra or {}) and "deadline_s" not in (sent.model_extra or {})
    whole = (await model_for(app).ainvoke("an integral")).response_metadata["moe_trace"]
    assert [a["error"] for a in whole["attempts"]] == [None, None]


def test_a_model_with_an_httpx_timeout_dumps_to_json_and_back() -> None:
    """``model_dump(mode="json")`` (which tracing and config stores call) failed on an ``httpx.Timeout``: it is now
    its four limits by name, and the dump builds the same model again."""
    import json

    timeout = httpx.Timeout(5.0, connect=2.0)
    dumped = ChatMoERouter(timeout=timeout).model_dump(mode="json")
    assert json.loads(json.dumps(dumped))["timeout"] == {"connect": 2.0, "read": 5.0, "write": 5.0, "pool": 5.0}
    assert ChatMoERouter(timeout=dumped["timeout"]).timeout == timeout
    assert ChatMoERouter(timeout=(3.0, 9.0)).model_dump(mode="json")["timeout"]["read"] == 9.0
    assert [ChatMoERouter(timeout=t).model_dump(mode="json")["timeout"] for t in (7.5, None)] == [7.5, None]
    assert ChatMoERouter(timeout=timeout).model_dump()["timeout"] == timeout  # Python mode keeps the object
