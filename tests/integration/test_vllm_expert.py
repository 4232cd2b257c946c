"""The OpenAI-compatible expert against real vLLM servers serving a tiny random Llama.

The model's text is random, so these tests check the wire (routes, streaming, usage, limits, concurrency,
errors), never what the answer says.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import openai
import pytest

from experts import (
    ChatMessage,
    ChatRequest,
    Expert,
    ExpertRejected,
    ExpertUnavailable,
    StreamDelta,
    build_expert,
    cost_of,
)
from router.config import CostConfig, ExpertConfig
from tests.integration.vllm_server import ServerSpec, VLLMServer

PRICES = CostConfig(input_per_1k=0.5, output_per_1k=1.5)


def expert_config(server: VLLMServer) -> ExpertConfig:
    return ExpertConfig(name=f"vllm-{server.name}", type="vllm", endpoint=server.url, model=server.name,
                        timeout_s=60.0, cost=PRICES)


def ask(text: str = "What is two plus two?", **params: object) -> ChatRequest:
    return ChatRequest(messages=[ChatMessage(role="user", content=text)], **params)


@pytest.fixture
async def expert_a(vllm_experts: dict[str, VLLMServer]) -> AsyncIterator[Expert]:
    expert = build_expert(expert_config(vllm_experts["tiny-a"]))
    try:
        yield expert
    finally:
        await expert.aclose()


@pytest.fixture
async def expert_b(vllm_experts: dict[str, VLLMServer]) -> AsyncIterator[Expert]:
    expert = build_expert(expert_config(vllm_experts["tiny-b"]))
    try:
        yield expert
    finally:
        await expert.aclose()


async def test_chat_answer_reports_usage_within_max_tokens(expert_a: Expert) -> None:
    reply = await expert_a.generate(ask(max_tokens=8, temperature=0.0))

    assert reply.expert == "vllm-tiny-a"
    assert isinstance(reply.content, str) and reply.content
    assert reply.usage.prompt_tokens > 0
    assert 1 <= reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.finish_reason in ("length", "stop")
    assert reply.latency_ms > 0


async def test_max_completion_tokens_is_honoured(expert_b: Expert) -> None:
    reply = await expert_b.generate(ask(max_completion_tokens=3))

    assert 1 <= reply.usage.completion_tokens <= 3


async def test_greedy_answer_is_deterministic(expert_a: Expert) -> None:
    first, second = [await expert_a.generate(ask(max_tokens=6, temperature=0.0)) for _ in range(2)]

    assert first.content == second.content


async def test_stream_reassembles_and_reports_usage(expert_a: Expert) -> None:
    request = ask(max_tokens=12, temperature=0.0)
    deltas: list[StreamDelta] = [d async for d in expert_a.stream(request)]
    reply = await expert_a.generate(request)

    text = "".join(d.content for d in deltas)
    assert text
    # Greedy decoding on the same server: the streamed pieces add up to the non-streamed answer.
    assert text == reply.content
    assert any(d.finish_reason for d in deltas)
    usage = deltas[-1].usage  # the last delta's: the stream's own count
    assert usage is not None and usage.prompt_tokens > 0
    assert 1 <= usage.completion_tokens <= 12
    # A vllm expert asks for vLLM's running usage: every delta carries the count so far, rising to the final one.
    running = [d.usage.completion_tokens for d in deltas if d.usage is not None]
    assert len(running) == len(deltas) and running == sorted(running) and running[-1] == usage.completion_tokens


async def test_eight_concurrent_requests_all_succeed(expert_a: Expert, expert_b: Expert) -> None:
    experts = [expert_a, expert_b] * 4
    replies = await asyncio.gather(*(e.generate(ask(f"Question {i}?", max_tokens=8)) for i, e in enumerate(experts)))

    assert len(replies) == 8
    assert {r.expert for r in replies} == {"vllm-tiny-a", "vllm-tiny-b"}
    assert all(1 <= r.usage.completion_tokens <= 8 for r in replies)


async def test_cost_comes_from_the_configured_prices(expert_b: Expert) -> None:
    reply = await expert_b.generate(ask(max_tokens=5))

    expected = cost_of(reply.usage, PRICES.input_per_1k, PRICES.output_per_1k)
    assert expected > 0
    assert reply.cost_usd == pytest.approx(expected)


async def test_request_beyond_the_context_is_rejected(expert_a: Expert) -> None:
    # vLLM answers 400 when max_tokens exceeds --max-model-len (512): a permanent, not a transient, error.
    with pytest.raises(ExpertRejected) as info:
        await expert_a.generate(ask(max_tokens=4096))

    assert info.value.status == 400
    assert not info.value.transient


async def test_official_openai_client_talks_to_the_server(vllm_experts: dict[str, VLLMServer]) -> None:
    server = vllm_experts["tiny-b"]
    async with openai.AsyncOpenAI(base_url=server.url, api_key="unused", max_retries=0) as client:
        models = await client.models.list()
        completion = await client.chat.completions.create(
            model=server.name, messages=[{"role": "user", "content": "Hello"}], max_tokens=4)
        chunks = [c async for c in await client.chat.completions.create(
            model=server.name, messages=[{"role": "user", "content": "Hello"}], max_tokens=4, stream=True,
            stream_options={"include_usage": True})]

    assert [m.id for m in models.data] == [server.name]
    assert completion.usage is not None and 1 <= completion.usage.completion_tokens <= 4
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 4


async def test_killed_server_raises_unavailable(
        vllm_server_factory: Callable[[ServerSpec], VLLMServer]) -> None:
    # Its own server: killing a shared one would break every test that runs after this one.
    server = vllm_server_factory(ServerSpec("tiny-doomed"))
    expert = build_expert(expert_config(server))
    try:
        assert (await expert.generate(ask(max_tokens=2))).usage.completion_tokens >= 1

        server.kill()
        assert not server.group_pids(), "the engine core or worker outlived the kill"

        with pytest.raises(ExpertUnavailable) as info:
            await expert.generate(ask(max_tokens=2))
        assert info.value.transient
        with pytest.raises(ExpertUnavailable):
            async for _ in expert.stream(ask(max_tokens=2)):
                pass
    finally:
        await expert.aclose()
