"""A reasoning model's reasoning (vLLM's reasoning parsers: ``reasoning_content``, or ``reasoning`` in newer vLLM)
reaches the client as ``reasoning_content``: from the expert (real HTTP to the scripted OpenAI-compatible server, a
test double), through the service (read back with the official openai client), to the SDK and LangChain. Combiners
work on the text; the reasoning returned is that of the reply whose text is returned, never a mix."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, ExitStack, asynccontextmanager
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI

from experts.openai_compat import OpenAICompatibleExpert
from experts.types import ChatMessage, ChatRequest, StreamDelta
from router.completions import Chunks, sse
from router.config import ExpertConfig
from router.orchestrator import StreamEnd, StreamPiece
from router.sdk import AsyncClient, LocalRouter
from router.sdk_protocol import BaseClient
from router.streaming import continuation as _continuation
from router.trace import Trace
from tests.doubles.scripted_server import Behaviour, ScriptedOpenAIServer
from tests.support import service_over

ASK = [{"role": "user", "content": "which letter?"}]


def completion(content: str | None, reasoning: str | None = None, key: str = "reasoning_content",
               usage: bool = True) -> Behaviour:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning is not None:
        message[key] = reasoning
    body: dict[str, Any] = {"id": "x", "object": "chat.completion", "created": 1, "model": "m",
                            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
    if usage:
        body["usage"] = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    return Behaviour.raw(json.dumps(body).encode())


def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
    return "data: " + json.dumps({"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m",
                                  "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + "\n\n"


def streamed(reasoning: list[str], text: list[str], key: str = "reasoning_content", *,
             finish: bool = True) -> Behaviour:
    """vLLM's shape: the role, reasoning deltas (no content), then content deltas, the finish and [DONE]; without
    ``finish`` the body ends after the deltas, a stream that broke off."""
    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({key: piece}) for piece in reasoning]
    events += [chunk({"content": piece}) for piece in text]
    if finish:
        events += [chunk({}, "stop"), "data: [DONE]\n\n"]
    return Behaviour.raw("".join(events).encode(), content_type="text/event-stream")


@pytest.fixture
def upstream() -> Iterator[ScriptedOpenAIServer]:
    with ScriptedOpenAIServer(name="thinker") as server:
        yield server


def expert_on(server: ScriptedOpenAIServer) -> OpenAICompatibleExpert:
    return OpenAICompatibleExpert(ExpertConfig(name="e1", type="vllm", endpoint=server.url, model="m", timeout_s=5.0))


def request() -> ChatRequest:
    return ChatRequest(messages=[ChatMessage(role="user", content="which letter?")])


# --- the expert --------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["reasoning_content", "reasoning"])
async def test_the_expert_reads_reasoning_by_either_name(upstream: ScriptedOpenAIServer, key: str) -> None:
    upstream.push(completion("B", "B fits best", key), streamed(["B ", "fits"], ["B"], key))
    expert = expert_on(upstream)
    try:
        reply = await expert.generate(request())
        deltas = [d async for d in expert.stream(request())]
    finally:
        await expert.aclose()
    assert (reply.content, reply.reasoning_content) == ("B", "B fits best")
    # Deltas that carry only reasoning are passed on, in order, before the text.
    assert [(d.reasoning_content, d.content) for d in deltas[:-1]] == [("B ", ""), ("fits", ""), ("", "B")]
    assert deltas[-1].finish_reason == "stop"


async def test_an_answer_without_reasoning_has_none(upstream: ScriptedOpenAIServer) -> None:
    upstream.push(completion("B"))
    expert = expert_on(upstream)
    try:
        assert (await expert.generate(request())).reasoning_content is None
    finally:
        await expert.aclose()


# --- through the service -----------------------------------------------------------------------------


def service(servers: dict[str, ScriptedOpenAIServer], scores: list[float],
            **config: Any) -> AbstractAsyncContextManager[httpx.AsyncClient]:
    raw = [{"name": n, "type": "vllm", "model": "m", "endpoint": s.url, "timeout_s": 5.0} for n, s in servers.items()]
    return service_over(raw, scores, **config)


@asynccontextmanager
async def servers(*names: str) -> AsyncIterator[dict[str, ScriptedOpenAIServer]]:
    """One scripted server per expert, so concurrent panel calls each get their own expert's answer."""
    with ExitStack() as stack:
        yield {name: stack.enter_context(ScriptedOpenAIServer(name=name)) for name in names}


def openai_client(http: httpx.AsyncClient) -> AsyncOpenAI:
    return AsyncOpenAI(base_url="http://router/v1", api_key="unused", http_client=http, max_retries=0)


async def test_a_plain_answer_carries_its_reasoning_to_the_openai_client_and_the_sdk() -> None:
    async with servers("solo", "other") as up:
        up["solo"].default = completion("B", "the question asks for a letter", key="reasoning")
        up["other"].default = completion("A")
        async with service(up, [0.9, 0.1]) as http:
            answer = await openai_client(http).chat.completions.create(model="auto", messages=ASK)
            result = await AsyncClient("http://router", transport=http._transport).chat(ASK)
            plain = await openai_client(http).chat.completions.create(model="other", messages=ASK)
    message = answer.choices[0].message
    assert message.content == "B"
    assert (message.model_extra or {})["reasoning_content"] == "the question asks for a letter"
    assert (result.content, result.reasoning_content) == ("B", "the question asks for a letter")
    # An answer without reasoning has no reasoning_content field at all, as an OpenAI answer.
    assert "reasoning_content" not in (plain.choices[0].message.model_extra or {})


VOTERS = {"math": ("The answer is (A).", "math reasons A"), "code": ("The answer is (B).", "code reasons B"),
          "law": ("Answer: B", "law reasons B")}


@pytest.mark.parametrize(("combiner", "expert"), [("vote", "code"), ("top1", "math")])
async def test_a_combined_answer_carries_the_reasoning_of_the_reply_it_returns(combiner: str, expert: str) -> None:
    async with servers(*VOTERS) as up:
        for name, (text, reasoning) in VOTERS.items():
            up[name].default = completion(text, reasoning)
        async with service(up, [0.45, 0.3, 0.25], gate={"top_k": {"policy": "fixed", "k": 3}},
                           combiner={"strategy": "vote"}) as http:
            r = await http.post("/v1/chat/completions", json={"messages": ASK},
                                headers={"x-moe-combiner": combiner})
    body = r.json()
    assert len(body["moe"]["attempts"]) == 3  # the whole panel answered
    message = body["choices"][0]["message"]
    # vote: B wins, and code is its heaviest voice; top1: math. Each with its own reasoning, and no other's.
    assert (body["model"], message["content"], message["reasoning_content"]) == (expert, *VOTERS[expert])


async def test_a_fused_answer_carries_the_aggregators_reasoning() -> None:
    async with servers("math", "code", "judge") as up:
        up["math"].default = completion("A", "math reasons")
        up["code"].default = completion("B", "code reasons")
        up["judge"].default = completion("B, on balance", "judge weighs both")
        async with service(up, [0.5, 0.3, 0.2], gate={"top_k": {"policy": "fixed", "k": 2}},
                           combiner={"strategy": "fuse", "aggregator": "judge"}) as http:
            r = await http.post("/v1/chat/completions", json={"messages": ASK})
    message = r.json()["choices"][0]["message"]
    assert (message["content"], message["reasoning_content"]) == ("B, on balance", "judge weighs both")


# --- streams: the service's chunks, the SDK's, LocalRouter's ------------------------------------------------


def pieces() -> list[StreamPiece | StreamEnd]:
    return [StreamPiece(expert="e1", delta=StreamDelta(reasoning_content="think ")),
            StreamPiece(expert="e1", delta=StreamDelta(reasoning_content="hard")),
            StreamPiece(expert="e1", delta=StreamDelta(content="B")),
            StreamEnd(trace=Trace(), finish_reason="stop")]


async def test_the_services_stream_carries_reasoning_deltas_which_the_sdk_reads() -> None:
    events = pieces()

    async def rest() -> AsyncIterator[StreamPiece | StreamEnd]:
        for event in events[1:]:
            yield event

    lines = [line async for data in sse(rest(), events[0], Chunks("chatcmpl-1", False))
             for line in data.decode().split("\n") if line]
    deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in lines[1:-2]]
    assert deltas == [{"reasoning_content": "think "}, {"reasoning_content": "hard"}, {"content": "B"}]
    chunks = [c for c in map(BaseClient.stream_chunk, lines) if c is not None]
    assert [(c.reasoning_content, c.content) for c in chunks[:3]] == [("think ", ""), ("hard", ""), ("", "B")]
    assert chunks[-1].finish_reason == "stop"


async def test_local_router_streams_reasoning_deltas() -> None:
    async def stream(_: ChatRequest, caller: object = None) -> AsyncIterator[StreamPiece | StreamEnd]:
        for event in pieces():
            yield event

    orchestrator = SimpleNamespace(config=SimpleNamespace(service=SimpleNamespace(max_prompt_chars=1000)),
                                   stream=stream)
    chunks = [c async for c in LocalRouter(orchestrator).stream(ASK)]
    assert "".join(c.reasoning_content for c in chunks) == "think hard"
    assert "".join(c.content for c in chunks) == "B"


async def test_streamed_reasoning_reaches_the_openai_client() -> None:
    async with servers("solo", "other") as up:
        up["solo"].default = streamed(["think ", "hard"], ["B"], key="reasoning")
        async with service(up, [0.9, 0.1]) as http:
            stream = await openai_client(http).chat.completions.create(model="auto", messages=ASK, stream=True)
            deltas = [c.choices[0].delta async for c in stream if c.choices]
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == "think hard"
    assert "".join(d.content or "" for d in deltas) == "B"


# --- a mid-stream switch ------------------------------------------------------------------------------------


def test_a_continuation_after_reasoning_alone_asks_afresh_within_the_token_limit() -> None:
    """An expert that broke off while still reasoning sent no text: the next is asked the question itself, not to
    continue an empty answer, and each reasoning delta counts as a token of the limit."""
    asked = ChatRequest(messages=[ChatMessage(role="user", content="which letter?")], max_tokens=10)
    continued = _continuation(asked, ["", "", ""], 3)
    assert continued is not None
    assert [(m.role, m.content) for m in continued.messages] == [("user", "which letter?")]
    assert continued.max_tokens == 7
    after_text = _continuation(asked, ["", "The "], 2)
    assert after_text is not None and [m.role for m in after_text.messages] == ["user", "assistant", "user"]
    assert after_text.messages[1].content == "The "


async def test_a_stream_that_breaks_off_while_reasoning_goes_on_from_the_next_expert() -> None:
    async with servers("first", "second") as up:
        up["first"].default = streamed(["let me ", "see"], [], finish=False)  # ends before any text or finish
        up["second"].default = streamed(["fresh look"], ["B"])
        async with service(up, [0.9, 0.1]) as http:
            stream = await openai_client(http).chat.completions.create(model="auto", messages=ASK, stream=True)
            chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "B" and chunks[-1].choices[0].finish_reason == "stop"
    # The second expert was asked the question itself: no empty answer to continue.
    assert up["second"].requests[-1]["messages"] == ASK


async def test_a_switch_while_reasoning_shows_both_experts_reasoning_and_is_recorded() -> None:
    async with servers("first", "second") as up:
        up["first"].default = streamed(["let me ", "see"], [], finish=False)
        up["second"].default = streamed(["fresh look"], ["B"])
        async with service(up, [0.9, 0.1]) as http:
            stream = await openai_client(http).chat.completions.create(model="auto", messages=ASK, stream=True)
            chunks = [c async for c in stream]
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                        for c in chunks if c.choices)
    assert reasoning == "let me seefresh look"  # what the client was sent stays sent; the next expert's follows
    switches = (chunks[-1].model_extra or {})["moe"]["switches"]
    assert [(s["from"], s["to"], s["after_chars"]) for s in switches] == [("first", "second", 0)]


async def test_a_continuation_after_text_sends_no_reasoning_after_it() -> None:
    """The first expert sent text, then broke off; the continuing expert reasons before writing, but its
    reasoning would arrive after the client's text, so only its text is passed on."""
    async with servers("first", "second") as up:
        up["first"].default = streamed(["plan"], ["The answer "], finish=False)
        up["second"].default = streamed(["where was I"], ["is B."])
        async with service(up, [0.9, 0.1]) as http:
            stream = await openai_client(http).chat.completions.create(model="auto", messages=ASK, stream=True)
            chunks = [c async for c in stream]
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == "The answer is B."
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == "plan"
    assert up["second"].requests[-1]["messages"][-2] == {"role": "assistant", "content": "The answer "}
