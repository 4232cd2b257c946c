"""What an upstream's answer carries beyond its text reaches the client as OpenAI's API has it: the token
log-probabilities a request asked for, a refusal, and null content beside tool calls, plain and streamed, through
the official openai client. Upstreams are the scripted OpenAI-compatible server (a test double) answering raw
bodies."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI

from router.build import build_experts
from router.config import parse_config
from router.orchestrator import Orchestrator
from router.service import create_app
from tests.doubles.fakes import FakeGate
from tests.doubles.scripted_server import Behaviour, ScriptedOpenAIServer

LOGPROBS = {"content": [{"token": "Hi", "logprob": -0.25, "bytes": [72, 105], "top_logprobs": []}], "refusal": None}
CALL = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2}'}}


def completion(message: dict[str, Any], finish: str = "stop", logprobs: dict[str, Any] | None = None) -> bytes:
    return json.dumps({"id": "x", "object": "chat.completion", "created": 1, "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish, "logprobs": logprobs}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}).encode()


def sse(*chunks: dict[str, Any]) -> Behaviour:
    lines = [f"data: {json.dumps({'id': 'x', 'object': 'chat.completion.chunk', 'created': 1, 'model': 'm', **c})}"
             for c in chunks]
    return Behaviour.raw(("\n\n".join([*lines, "data: [DONE]"]) + "\n\n").encode(), content_type="text/event-stream")


@pytest.fixture
def upstream() -> Iterator[ScriptedOpenAIServer]:
    with ScriptedOpenAIServer(name="solo") as server:
        yield server


@asynccontextmanager
async def client(server: ScriptedOpenAIServer) -> AsyncIterator[httpx.AsyncClient]:
    raw = [{"name": "solo", "type": "vllm", "model": "m", "endpoint": server.url, "timeout_s": 5.0,
            "capabilities": ["chat", "stream", "tools"]},
           {"name": "other", "type": "vllm", "model": "m", "endpoint": server.url, "timeout_s": 5.0}]
    cfg = parse_config({"version": 1, "experts": raw}, check_env=False)
    orchestrator = Orchestrator(cfg, FakeGate(cfg.expert_names, {}, default=[0.9, 0.1]), build_experts(cfg))
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(orchestrator)),
                                     base_url="http://router") as http:
            yield http
    finally:
        await orchestrator.aclose()  # no lifespan runs in-process: close the experts' connections


async def test_logprobs_and_refusal_pass_through_a_plain_answer(upstream: ScriptedOpenAIServer) -> None:
    upstream.push(Behaviour.raw(completion({"content": "Hi"}, logprobs=LOGPROBS)),
                  Behaviour.raw(completion({"content": None, "refusal": "I can't help with that."})))
    async with client(upstream) as http:
        oai = AsyncOpenAI(base_url="http://router/v1", api_key="unused", http_client=http, max_retries=0)
        answered = await oai.chat.completions.create(model="auto", logprobs=True,
                                                     messages=[{"role": "user", "content": "hi"}])
        refused = await oai.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}])
    assert upstream.requests[0]["logprobs"] is True  # the request's own field went upstream
    assert answered.choices[0].logprobs is not None
    assert answered.choices[0].logprobs.model_dump()["content"] == LOGPROBS["content"]
    # As OpenAI's: content is null beside a refusal without text.
    assert (refused.choices[0].message.refusal, refused.choices[0].message.content) == ("I can't help with that.", None)


async def test_content_is_null_beside_tool_calls_without_text(upstream: ScriptedOpenAIServer) -> None:
    upstream.push(Behaviour.raw(completion({"content": None, "tool_calls": [CALL]}, finish="tool_calls")))
    async with client(upstream) as http:
        r = await http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "add"}],
            "tools": [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]})
    message = r.json()["choices"][0]["message"]
    assert message["content"] is None and message["tool_calls"] == [CALL]


async def test_logprobs_and_refusal_pass_through_a_stream(upstream: ScriptedOpenAIServer) -> None:
    upstream.push(sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
                      {"choices": [{"index": 0, "delta": {"content": "Hi"}, "logprobs": LOGPROBS}]},
                      {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
                  sse({"choices": [{"index": 0, "delta": {"role": "assistant", "refusal": ""}}]},
                      {"choices": [{"index": 0, "delta": {"refusal": "I can't"}}]},
                      {"choices": [{"index": 0, "delta": {"refusal": " help."}}]},
                      {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    async with client(upstream) as http:
        oai = AsyncOpenAI(base_url="http://router/v1", api_key="unused", http_client=http, max_retries=0)
        answered = [c async for c in await oai.chat.completions.create(
            model="auto", stream=True, logprobs=True, messages=[{"role": "user", "content": "hi"}])]
        refused = [c async for c in await oai.chat.completions.create(
            model="auto", stream=True, messages=[{"role": "user", "content": "hi"}])]
    with_logprobs = [c.choices[0].logprobs for c in answered if c.choices and c.choices[0].logprobs]
    assert [lp.model_dump()["content"] for lp in with_logprobs] == [LOGPROBS["content"]]
    assert "".join(c.choices[0].delta.refusal or "" for c in refused if c.choices) == "I can't help."


async def test_a_streamed_token_that_completes_no_text_keeps_its_logprobs(upstream: ScriptedOpenAIServer) -> None:
    """vLLM streams a token that completes no character (part of a multi-byte one) as an empty content with its
    log-probabilities; the router dropped those chunks, so a streamed answer had fewer entries than tokens (14
    of 16 on real vLLM) while the same answer not streamed had them all."""
    empty = {"content": [{"token": "\u00e2", "logprob": -1.5, "bytes": [226], "top_logprobs": []}], "refusal": None}
    upstream.push(sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
                      {"choices": [{"index": 0, "delta": {"content": "Hi"}, "logprobs": LOGPROBS}]},
                      {"choices": [{"index": 0, "delta": {"content": ""}, "logprobs": empty}]},
                      {"choices": [{"index": 0, "delta": {"content": "!"}, "logprobs": LOGPROBS},
                                   ], "usage": None},
                      {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    async with client(upstream) as http:
        oai = AsyncOpenAI(base_url="http://router/v1", api_key="unused", http_client=http, max_retries=0)
        chunks = [c async for c in await oai.chat.completions.create(
            model="auto", stream=True, logprobs=True, messages=[{"role": "user", "content": "hi"}])]
    entries = [entry for c in chunks if c.choices and c.choices[0].logprobs
               for entry in c.choices[0].logprobs.model_dump()["content"]]
    assert [e["token"] for e in entries] == ["Hi", "\u00e2", "Hi"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hi!"


async def test_an_upstreams_own_fields_reach_the_client_beside_the_routers(upstream: ScriptedOpenAIServer) -> None:
    """A plain answer was rebuilt from the fields the router reads: vLLM's prompt_logprobs, token_ids and
    stop_reason, a message's annotations and OpenAI's system_fingerprint were dropped, though the client asked for
    (and paid for) them. They are passed on now; the router's own fields are never replaced by an upstream's."""
    body = json.loads(completion({"content": "Hi", "annotations": [{"type": "url_citation"}]}))
    body |= {"system_fingerprint": "fp_1", "prompt_logprobs": [None, {"281": {"logprob": -1.5}}],
             "prompt_token_ids": [1, 281], "id": "upstream-id", "moe": {"forged": True}}
    body["choices"][0] |= {"stop_reason": "100", "token_ids": [581, 581], "index": 7}
    upstream.push(Behaviour.raw(json.dumps(body).encode()))
    async with client(upstream) as http:
        oai = AsyncOpenAI(base_url="http://router/v1", api_key="unused", http_client=http, max_retries=0)
        raw = await oai.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": "hi"}], extra_body={"return_token_ids": True})
    answer = json.loads(raw.text)
    assert (answer["system_fingerprint"], answer["prompt_token_ids"]) == ("fp_1", [1, 281])
    assert answer["prompt_logprobs"] == [None, {"281": {"logprob": -1.5}}]
    choice = answer["choices"][0]
    assert (choice["stop_reason"], choice["token_ids"], choice["index"]) == ("100", [581, 581], 0)
    assert choice["message"]["annotations"] == [{"type": "url_citation"}]
    assert answer["id"].startswith("chatcmpl-") and answer["id"] != "upstream-id" and "forged" not in answer["moe"]
    assert raw.parse().system_fingerprint == "fp_1"  # the openai client reads it as OpenAI's own
