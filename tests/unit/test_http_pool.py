"""ClientPool: an expert's connections in small httpx clients, checked over real HTTP against ScriptedOpenAIServer
(a test double on 127.0.0.1) and on its own."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from experts.base import ExpertContext
from experts.http_pool import ClientPool
from experts.openai_compat import OpenAICompatibleExpert
from experts.types import ChatMessage, ChatRequest
from router.config import ExpertConfig
from tests.doubles import Behaviour, ScriptedOpenAIServer


@pytest.fixture
def server() -> Iterator[ScriptedOpenAIServer]:
    with ScriptedOpenAIServer(name="pool") as srv:
        yield srv


def expert_for(server: ScriptedOpenAIServer, max_concurrency: int,
               context: ExpertContext | None = None) -> OpenAICompatibleExpert:
    return OpenAICompatibleExpert(ExpertConfig(name="e", type="vllm", endpoint=server.url, model="m",
                                               timeout_s=5.0, max_concurrency=max_concurrency), context)


def ask(text: str) -> ChatRequest:
    return ChatRequest(messages=[ChatMessage(role="user", content=text)])


def test_connections_are_split_evenly_and_never_exceed_the_total() -> None:
    made: list[int] = []

    def factory(limit: int) -> httpx.AsyncClient:
        made.append(limit)
        return httpx.AsyncClient()

    for total, limits in ((8, [8]), (10, [5, 5]), (9, [5, 4]), (33, [7, 7, 7, 6, 6]), (1, [1])):
        pool = ClientPool(factory, total)
        assert pool._limits == limits and sum(limits) == total
    assert ClientPool(factory, 64, shard=False)._limits == [64]
    assert made == []  # no client exists before a request needs one
    with pytest.raises(ValueError, match="at least 1"):
        ClientPool(factory, 0)


async def test_a_new_client_opens_only_when_every_open_one_is_full() -> None:
    pool = ClientPool(lambda limit: httpx.AsyncClient(), 20, per_client=4)  # 5 clients of 4
    held = []
    try:
        for n in range(1, 21):
            lease = pool.lease()
            await lease.__aenter__()
            held.append(lease)
            assert pool.clients == -(-n // 4)  # ceil: a fifth request in flight opens the second client
        # All five open and full: the next request queues in the least busy client instead of a sixth.
        extra = pool.lease()
        await extra.__aenter__()
        assert pool.clients == 5
        await extra.__aexit__(None, None, None)
        for lease in held:
            await lease.__aexit__(None, None, None)
        async with pool.lease():
            assert pool.clients == 5  # clients stay open for reuse
    finally:
        await pool.aclose()
    assert pool.clients == 0


async def test_sequential_calls_reuse_one_connection(server: ScriptedOpenAIServer) -> None:
    expert = expert_for(server, max_concurrency=64)
    try:
        for i in range(10):
            reply = await expert.generate(ask(f"question {i}"))
            assert reply.content == "answer from pool"
        assert server.connections_total == 1
    finally:
        await expert.aclose()
    assert server.wait_for(lambda s: s.open_connections == 0)


async def test_concurrent_calls_spread_over_clients_and_all_close(server: ScriptedOpenAIServer) -> None:
    server.default = Behaviour.slow("slow answer", delay_s=0.3)
    expert = expert_for(server, max_concurrency=32)
    try:
        replies = await asyncio.gather(*(expert.generate(ask(f"q{i}")) for i in range(32)))
        assert [r.content for r in replies] == ["slow answer"] * 32
        pool = expert._clients()
        assert pool.clients == 4  # 32 in flight at once, 8 per client
        assert server.connections_total == 32
        # Streams hold their lease until they end, and take part in the same accounting.
        server.default = Behaviour.slow("one two three", token_delay_s=0.05)
        texts = await asyncio.gather(*(_streamed(expert, f"s{i}") for i in range(16)))
        assert texts == ["one two three"] * 16
        assert server.connections_total == 32  # served by the connections already open
    finally:
        await expert.aclose()
    assert server.wait_for(lambda s: s.open_connections == 0)


async def test_leases_come_back_after_errors_cancellation_and_an_abandoned_stream(
        server: ScriptedOpenAIServer) -> None:
    from contextlib import aclosing

    from experts.errors import ExpertError

    expert = expert_for(server, max_concurrency=16)
    pool = expert._clients()
    try:
        server.push(Behaviour.error(500), Behaviour.reset())
        for _ in range(2):
            with pytest.raises(ExpertError):
                await expert.generate(ask("fails"))
        server.default = Behaviour.hang()
        hung = asyncio.create_task(expert.generate(ask("hangs")))
        assert await asyncio.to_thread(server.wait_for, lambda s: s.open_connections >= 1)
        hung.cancel()
        with pytest.raises(asyncio.CancelledError):
            await hung
        server.default = Behaviour.slow("one two three four", token_delay_s=0.05)
        async with aclosing(expert.stream(ask("stream"))) as deltas:
            async for delta in deltas:
                if delta.content:
                    break  # the caller walks away after the first token
        assert sum(pool._in_flight) == 0  # every lease returned, so no client looks busy forever
    finally:
        await expert.aclose()


async def test_an_injected_transport_gets_one_client(server: ScriptedOpenAIServer) -> None:
    transport = httpx.AsyncHTTPTransport()
    expert = expert_for(server, max_concurrency=32, context=ExpertContext(transport=transport))
    try:
        await asyncio.gather(*(expert.generate(ask(f"q{i}")) for i in range(16)))
        assert expert._clients().clients == 1
    finally:
        await expert.aclose()


async def _streamed(expert: OpenAICompatibleExpert, text: str) -> str:
    parts = [d.content async for d in expert.stream(ask(text)) if d.content]
    return "".join(parts)
