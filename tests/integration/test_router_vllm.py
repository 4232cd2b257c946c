"""The whole router on real vLLM servers (CPU build, tiny random-weight Llama): `moe serve` as a process,
the official openai client, LangChain's ChatOpenAI, concurrency, streaming, and fallback when a vLLM process
is killed, mid-stream (the next expert continues the answer) and between requests. The tiny model writes random
text, so these tests check routing and transport, not answer quality.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from contextlib import aclosing
from pathlib import Path

import pytest
import yaml
from langchain_openai import ChatOpenAI
from openai import AsyncOpenAI, OpenAI

from experts.types import ChatMessage, ChatRequest
from router.build import build_orchestrator
from router.config import load_config
from router.orchestrator import Orchestrator, StreamEnd, StreamPiece
from router.train import train_from_config
from tests.integration.vllm_server import ServerSpec, VLLMServer
from tests.support import moe_serve

MATH = ["solve the equation 3x + 5 = 20", "what is the derivative of x squared", "integrate sin x from 0 to pi",
        "factor the polynomial x^2 - 9", "compute 17 times 23", "is 97 a prime number"]
COOKING = ["how long do I boil an egg", "a recipe for tomato soup", "how to bake sourdough bread",
           "what spices go into a curry", "how do I caramelise onions", "best way to roast vegetables"]
SPACE = ["how far is the moon from earth", "why is mars red", "what is a black hole",
         "how many moons does jupiter have", "what is a light year", "how do stars form"]
# ignore_eos makes the tiny model write exactly max_tokens tokens, so lengths are checkable.
GEN = {"max_tokens": 8, "extra_body": {"ignore_eos": True}}


def write_config(path: Path, experts: dict[str, tuple[VLLMServer, list[str]]]) -> Path:
    raw = {
        "version": 1,
        "service": {"name": "moe-router"},
        "gate": {"artifact": str(path.parent / "gate"), "top_k": {"policy": "fixed", "k": 1}},
        "fallback": {"enabled": True, "max_attempts": 3, "deadline_s": 60},
        "experts": [
            {"name": name, "type": "vllm", "endpoint": server.url, "model": server.spec.served_name,
             "timeout_s": 30, "max_concurrency": 32, "cost": {"input_per_1k": 0.001, "output_per_1k": 0.002},
             "examples": examples}
            for name, (server, examples) in experts.items()
        ],
    }
    path.write_text(yaml.safe_dump(raw))
    train_from_config(load_config(path), progress=False)
    return path


@pytest.fixture(scope="module")
def served(vllm_experts: dict[str, VLLMServer], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`moe serve` in its own process, routing between the two session vLLM servers."""
    work = tmp_path_factory.mktemp("router")
    config = write_config(work / "router.yaml", {"math": (vllm_experts["tiny-a"], MATH),
                                                  "cooking": (vllm_experts["tiny-b"], COOKING)})
    with moe_serve(config, work / "serve.log", extra=["--log-level", "warning"]) as url:
        yield url


def test_openai_client_is_routed_by_topic(served: str) -> None:
    client = OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0)
    math = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "solve 2x + 1 = 7"}],
                                          **GEN)
    food = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "how to boil pasta"}],
                                          **GEN)
    assert (math.model, food.model) == ("math", "cooking")
    assert math.usage is not None and math.usage.completion_tokens == 8
    trace = math.model_extra["moe"]  # type: ignore[index]
    assert trace["decision"]["ranking"][0] == "math"
    assert trace["attempts"][0]["ok"] is True
    assert trace["cost_usd"] == pytest.approx(
        (math.usage.prompt_tokens * 0.001 + math.usage.completion_tokens * 0.002) / 1000)
    direct = client.chat.completions.create(model="cooking", messages=[{"role": "user", "content": "2x + 1 = 7"}],
                                            **GEN)
    assert direct.model == "cooking"


def test_openai_client_streams(served: str) -> None:
    client = OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0)
    chunks = list(client.chat.completions.create(
        model="auto", stream=True, messages=[{"role": "user", "content": "a recipe for pancakes"}], **GEN))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    final = chunks[-1]
    assert final.choices[0].finish_reason == "length"
    assert final.model_extra["moe"]["attempts"][0]["expert"] == "cooking"  # type: ignore[index]
    assert final.model_extra["moe"]["usage"]["completion_tokens"] == 8  # type: ignore[index]


def test_langchain_chat_openai_invoke_and_stream(served: str) -> None:
    llm = ChatOpenAI(base_url=f"{served}/v1", api_key="unused", model="auto", max_tokens=8,  # type: ignore[call-arg]
                     extra_body={"ignore_eos": True}, max_retries=0)
    message = llm.invoke("what is the integral of x")
    assert isinstance(message.content, str) and message.content
    assert message.response_metadata["model_name"] == "math"
    pieces = [c.content for c in llm.stream("how do I make a salad")]
    assert "".join(str(p) for p in pieces)


def test_concurrent_requests_all_answer_on_both_experts(served: str) -> None:
    async def run() -> list[str]:
        client = AsyncOpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0)
        questions = [MATH[i % 6] if i % 2 else COOKING[i % 6] for i in range(16)]
        replies = await asyncio.gather(*(client.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": q}], **GEN) for q in questions))
        await client.close()
        return [r.model for r in replies]

    models = asyncio.run(run())
    assert len(models) == 16
    assert models.count("math") == 8 and models.count("cooking") == 8


# The mid-stream kill: a long stream from the doomed server, frozen (SIGSTOP, at once) and then SIGKILLed once
# KILL_AFTER pieces have arrived. The tiny model writes a token in about 2 ms here, so LONG tokens take about
# 0.8 s: the stream is cut mid-way unless this process lags that far behind the server. Prompt, partial answer
# and the rest of LONG stay inside the servers' 512 positions.
LONG = 380
KILL_AFTER = 3


async def stream_and(orchestrator: Orchestrator, request: ChatRequest, after: int = 0,
                     act: Callable[[], Awaitable[None]] | None = None) -> tuple[list[StreamPiece], StreamEnd]:
    """Stream ``request``, awaiting ``act()`` (if given) once ``after`` pieces have arrived; the pieces and the
    end."""
    pieces: list[StreamPiece] = []
    end: StreamEnd | None = None
    async with aclosing(orchestrator.stream(request)) as events:
        async for event in events:
            if isinstance(event, StreamPiece):
                pieces.append(event)
                if act is not None and len(pieces) == after:
                    await act()
            else:
                end = event
    assert end is not None
    return pieces, end


async def stream_and_kill(orchestrator: Orchestrator, request: ChatRequest,
                          doomed: VLLMServer) -> tuple[list[StreamPiece], StreamEnd]:
    """Stream ``request``, freezing and then SIGKILLing ``doomed``'s process group once ``KILL_AFTER`` pieces have
    arrived."""

    async def kill() -> None:
        doomed.freeze()
        await asyncio.to_thread(doomed.kill)

    return await stream_and(orchestrator, request, KILL_AFTER, kill)


async def test_fallback_when_a_vllm_process_is_killed(vllm_experts: dict[str, VLLMServer], vllm_server_factory,  # type: ignore[no-untyped-def]
                                                      tmp_path: Path) -> None:
    doomed: VLLMServer = vllm_server_factory(ServerSpec("tiny-c"))
    config = load_config(write_config(tmp_path / "router.yaml", {
        "space": (doomed, SPACE), "math": (vllm_experts["tiny-a"], MATH)}))
    orchestrator = build_orchestrator(config)
    ask = ChatRequest(messages=[ChatMessage(role="user", content="how far away is the sun")], max_tokens=8,
                      ignore_eos=True)
    try:
        before = await orchestrator.complete(ask)
        assert before.expert == "space"
        # Killed mid-stream: the client's stream goes on from "math", which continues the partial answer.
        pieces, end = await stream_and_kill(orchestrator, ask.model_copy(update={"max_tokens": LONG}), doomed)
        experts = [p.expert for p in pieces]
        from_space = experts.count("space")
        print(f"\nmid-stream kill: {from_space} pieces from space, then {len(pieces) - from_space} from math "
              f"(max_tokens {LONG}, finish {end.finish_reason}, switch {end.trace.switches})")
        assert from_space >= KILL_AFTER and len(pieces) > from_space
        assert experts == ["space"] * from_space + ["math"] * (len(pieces) - from_space)
        sent = "".join(p.delta.content for p in pieces[:from_space])
        assert [(s["from"], s["to"], s["after_chars"]) for s in end.trace.switches] == [("space", "math", len(sent))]
        assert end.trace.switches[0]["cause"] in ("unavailable", "bad_response", "timeout")
        assert [(a.expert, a.ok) for a in end.trace.attempts] == [("space", False), ("math", True)]
        # The whole answer stays within the client's max_tokens: "math" wrote what was left of it, to the end
        # (ignore_eos), so the stream ends as one cut off by its length.
        assert len(pieces) <= LONG and end.finish_reason == "length"
        assert end.trace.attempts[1].usage.completion_tokens == LONG - from_space  # as vLLM counted them
        assert sum(c.weight for c in end.trace.contributions) == pytest.approx(1.0)
        assert [c.expert for c in end.trace.contributions] == ["space", "math"]
        after = await orchestrator.complete(ask)
        assert after.expert == "math"
        attempts = [(a.expert, a.ok, (a.error or {}).get("kind")) for a in after.trace.attempts]
        assert attempts == [("space", False, "unavailable"), ("math", True, None)]
        assert after.trace.decision is not None and after.trace.decision.ranking[0] == "space"
        # streaming falls back before the first token, invisibly to the client
        events = [e async for e in orchestrator.stream(ask)]
        assert all(e.expert == "math" for e in events if isinstance(e, StreamPiece))
        last = events[-1]
        assert isinstance(last, StreamEnd) and last.trace.switches == []
        assert [a.ok for a in last.trace.attempts] == [False, True]
    finally:
        await orchestrator.aclose()
