"""What an OpenAI client reads off the wire in two corners an audit with the official openai client found: an
upstream float that JSON cannot hold (a ``-Infinity`` log-probability, as Python servers write it) is sent as one it
can, plain (not a 500 after the expert was paid) and streamed (not a ``-Infinity`` a strict JSON parser refuses);
a stream whose expert sent no text names that expert in its header and on every chunk, as any other stream does;
and the upstream's usage breakdowns (cached and reasoning tokens) reach the client's usage, plain and streamed.
Upstreams are the scripted OpenAI-compatible server (a test double, real HTTP)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI

from tests.doubles.scripted_server import Behaviour, ScriptedOpenAIServer
from tests.support import service_over

ASK = [{"role": "user", "content": "what is the capital of France?"}]


@pytest.fixture
def upstream() -> Iterator[ScriptedOpenAIServer]:
    with ScriptedOpenAIServer(name="wire") as server:
        yield server


def service(server: ScriptedOpenAIServer) -> AbstractAsyncContextManager[httpx.AsyncClient]:
    raw = [{"name": "solo", "type": "vllm", "model": "m", "endpoint": server.url, "timeout_s": 5.0,
            "capabilities": ["chat", "stream"]}]
    return service_over(raw, [1.0])


def openai_client(http: httpx.AsyncClient) -> AsyncOpenAI:
    return AsyncOpenAI(base_url="http://router/v1", api_key="unused", http_client=http, max_retries=0)


def strict_json(text: str) -> Any:
    """JSON as the spec has it (and JavaScript's JSON.parse reads it): no NaN, Infinity or -Infinity."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


# A log-probability of -Infinity (a token the model ruled out), as a Python server's json.dumps writes it.
_LOGPROBS = ('{"content": [{"token": "Paris", "logprob": -Infinity, "bytes": [80, 97, 114, 105, 115], '
             '"top_logprobs": [{"token": "Paris", "logprob": -Infinity, "bytes": null}, '
             '{"token": "Rome", "logprob": NaN, "bytes": null}]}]}')


async def test_a_non_finite_logprob_is_answered_as_json_not_a_500(upstream: ScriptedOpenAIServer) -> None:
    upstream.push(Behaviour.raw((
        '{"id": "x", "object": "chat.completion", "created": 1, "model": "m", "choices": [{"index": 0, "message": '
        '{"role": "assistant", "content": "Paris"}, "logprobs": ' + _LOGPROBS + ', "finish_reason": "stop"}], '
        '"usage": {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8}}').encode()))
    async with service(upstream) as http:
        r = await http.post("/v1/chat/completions", json={"messages": ASK, "logprobs": True, "top_logprobs": 2})
    assert r.status_code == 200, r.text
    body = strict_json(r.text)
    token = body["choices"][0]["logprobs"]["content"][0]
    assert body["choices"][0]["message"]["content"] == "Paris"
    # -inf as vLLM floors a log-probability; NaN (no number at all) as null
    assert token["logprob"] == -9999.0
    assert [t["logprob"] for t in token["top_logprobs"]] == [-9999.0, None]


async def test_a_non_finite_logprob_in_a_stream_is_sent_as_json(upstream: ScriptedOpenAIServer) -> None:
    piece = ('{"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [{"index": 0, '
             '"delta": {"content": "Paris"}, "logprobs": ' + _LOGPROBS + '}]}')
    end = '{"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [{"index": 0, ' \
          '"delta": {}, "finish_reason": "stop"}]}'
    upstream.push(Behaviour.raw(f"data: {piece}\n\ndata: {end}\n\ndata: [DONE]\n\n".encode(),
                                content_type="text/event-stream"))
    body = {"messages": ASK, "stream": True, "logprobs": True}
    async with service(upstream) as http, http.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    events = [strict_json(line[6:]) for line in lines[:-1]]  # every event is JSON a strict parser reads
    scored = [e for e in events if e["choices"] and e["choices"][0].get("logprobs")]
    assert [e["choices"][0]["delta"].get("content") for e in scored] == ["Paris"]
    assert scored[0]["choices"][0]["logprobs"]["content"][0]["logprob"] == -9999.0


async def test_a_lone_surrogate_in_an_answer_is_sent_escaped_not_a_500(upstream: ScriptedOpenAIServer) -> None:
    """``"\\ud83d"`` without its pair is valid JSON but no UTF-8: the plain answer sends it escaped, as a stream's
    chunk does, where Starlette's UTF-8 renderer raised (a 500 after the expert was paid)."""
    upstream.push(Behaviour.raw(
        b'{"id": "x", "object": "chat.completion", "created": 1, "model": "m", "choices": [{"index": 0, "message": '
        b'{"role": "assistant", "content": "smile \\ud83d here"}, "finish_reason": "stop"}], '
        b'"usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}'))
    async with service(upstream) as http:
        r = await http.post("/v1/chat/completions", json={"messages": ASK})
    assert r.status_code == 200, r.text
    assert "\\ud83d" in r.text and r.content.isascii()
    assert r.json()["choices"][0]["message"]["content"] == "smile \ud83d here"
    assert r.json()["usage"]["total_tokens"] == 5


async def test_a_stream_without_text_names_its_expert_like_any_other(upstream: ScriptedOpenAIServer) -> None:
    upstream.push(Behaviour.ok("", finish_reason="length"))  # a role chunk and a finish chunk: no delta of text
    async with service(upstream) as http:
        raw = await openai_client(http).chat.completions.with_raw_response.create(
            model="auto", messages=ASK, stream=True, max_tokens=1)
        chunks = [chunk async for chunk in raw.parse()]
    assert raw.headers.get("x-moe-expert") == "solo"
    assert [c.model for c in chunks] == ["solo", "solo"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"


# An upstream's usage with the breakdowns OpenAI and vLLM send: cached prompt tokens, reasoning tokens; the
# breakdowns hold what a client cannot count on reading (null, a nested object, a negative number) too.
_USAGE = ('{"prompt_tokens": 7, "completion_tokens": 12, "total_tokens": 19, "prompt_tokens_details": '
          '{"cached_tokens": 4, "audio_tokens": null}, "completion_tokens_details": {"reasoning_tokens": 9, '
          '"accepted_prediction_tokens": 0, "odd": {"x": 1}, "bad": -3}}')


async def test_usage_breakdowns_reach_the_client_plain_and_streamed(upstream: ScriptedOpenAIServer) -> None:
    """A client counting reasoning or cached tokens reads them as it would from the expert; a breakdown value that
    is no count is left out, not a reason to refuse the answer."""
    upstream.push(Behaviour.raw((
        '{"id": "x", "object": "chat.completion", "created": 1, "model": "m", "choices": [{"index": 0, "message": '
        '{"role": "assistant", "content": "Paris"}, "finish_reason": "stop"}], "usage": ' + _USAGE + '}').encode()))
    end = ('{"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [{"index": 0, '
           '"delta": {"content": "Paris"}, "finish_reason": "stop"}]}')
    counted = '{"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [], ' \
              '"usage": ' + _USAGE + '}'
    upstream.push(Behaviour.raw(f"data: {end}\n\ndata: {counted}\n\ndata: [DONE]\n\n".encode(),
                                content_type="text/event-stream"))
    async with service(upstream) as http:
        client = openai_client(http)
        plain = await client.chat.completions.create(model="auto", messages=ASK)  # type: ignore[arg-type]
        streamed = [c async for c in await client.chat.completions.create(
            model="auto", messages=ASK, stream=True, stream_options={"include_usage": True})]  # type: ignore[arg-type]
    for usage in (plain.usage, streamed[-1].usage):
        assert usage is not None and usage.total_tokens == 19
        assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 4
        assert usage.prompt_tokens_details.audio_tokens is None
        details = usage.completion_tokens_details
        assert details is not None and details.reasoning_tokens == 9 and details.accepted_prediction_tokens == 0
        assert details.model_dump(exclude_none=True) == {"reasoning_tokens": 9, "accepted_prediction_tokens": 0}
    assert plain.model_extra is not None
    assert plain.model_extra["moe"]["attempts"][0]["usage"]["completion_tokens_details"]["reasoning_tokens"] == 9


async def test_a_usage_without_breakdowns_sends_none(upstream: ScriptedOpenAIServer) -> None:
    upstream.push(Behaviour.ok("Paris"))
    async with service(upstream) as http:
        r = await http.post("/v1/chat/completions", json={"messages": ASK})
    assert set(r.json()["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
