"""An expert that implements only ``generate`` streams through ``Expert.stream``'s default: its one piece must be
a chunk OpenAI's clients can read, tool calls included (each delta's ``index``). The expert is a test double
(``FakeToolCallingExpert``); the client is the official ``openai`` SDK, over the service in-process."""

from __future__ import annotations

import json

import httpx
from openai import AsyncOpenAI

from experts.base import Expert
from experts.types import ChatRequest, ExpertReply, Usage
from router.config import RouterConfig
from router.orchestrator import Orchestrator
from router.service import create_app
from tests.doubles.fakes import FakeGate, fake_config

CALLS = [{"id": "call_1", "type": "function", "function": {"name": "save", "arguments": '{"name": "Ada"}'}},
         {"id": "call_2", "type": "function", "function": {"name": "save", "arguments": '{"name": "Alan"}'}}]
TOOLS = [{"type": "function", "function": {"name": "save", "parameters": {"type": "object"}}}]
ASK = [{"role": "user", "content": "save Ada and Alan"}]


class FakeToolCallingExpert(Expert):
    """Answers every request with two tool calls; it has no ``stream`` of its own."""

    async def generate(self, request: ChatRequest) -> ExpertReply:
        return ExpertReply(expert=self.name, content="", tool_calls=[dict(c) for c in CALLS],
                           finish_reason="tool_calls", usage=Usage(prompt_tokens=5, completion_tokens=9,
                                                                   total_tokens=14))


def config() -> RouterConfig:
    return fake_config(["tools"], experts=[{"name": "tools", "type": "replay", "model": "tools", "capabilities": [
        "chat", "stream", "tools"], "replay": {"source": "routerbench", "path": "unused"}}])


def app() -> object:
    routed = config()
    return create_app(Orchestrator(routed, FakeGate(["tools"], {}, default=[1.0]),
                                   {"tools": FakeToolCallingExpert(routed.expert("tools"))}))


async def test_the_default_stream_numbers_each_tool_call_as_a_delta() -> None:
    expert = FakeToolCallingExpert(config().expert("tools"))
    pieces = [piece async for piece in expert.stream(ChatRequest(messages=ASK))]
    assert pieces[0].tool_calls == [{"index": 0, **CALLS[0]}, {"index": 1, **CALLS[1]}]
    assert pieces[-1].finish_reason == "tool_calls"


async def test_openai_s_stream_helper_reads_the_tool_calls_of_a_generate_only_expert() -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app()), base_url="http://router") as http:
        async with http.stream("POST", "/v1/chat/completions",
                               json={"messages": ASK, "tools": TOOLS, "stream": True}) as response:
            deltas = [json.loads(line[6:])["choices"][0]["delta"] async for line in response.aiter_lines()
                      if line.startswith("data: {") and '"tool_calls"' in line]
        assert [[c["index"] for c in d["tool_calls"]] for d in deltas if "tool_calls" in d] == [[0, 1]]
        client = AsyncOpenAI(base_url="http://router/v1", api_key="unused", http_client=http)
        async with client.chat.completions.stream(model="auto", messages=ASK, tools=TOOLS) as stream:  # type: ignore[arg-type]
            final = await stream.get_final_completion()
    calls = final.choices[0].message.tool_calls or []
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == [
        (c["id"], c["function"]["name"], c["function"]["arguments"]) for c in CALLS]
