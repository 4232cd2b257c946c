"""A refusal and token log-probabilities, from the expert to every client surface: the service's JSON, the SDK
(remote and in-process), its stream, and LangChain. The experts are test doubles (``FakeRefusingExpert``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx

from experts.types import ChatRequest, ExpertReply, StreamDelta, Usage
from router.langchain import ChatMoERouter
from router.orchestrator import Orchestrator
from router.sdk import AsyncClient, LocalRouter
from router.service import create_app
from tests.doubles.fakes import FakeExpert, FakeGate, fake_config

NAMES = ["math", "code"]
REFUSAL = "I can't help with that."
LOGPROBS = {"content": [{"token": "I", "logprob": -0.01, "bytes": [73], "top_logprobs": []}]}


class FakeRefusingExpert(FakeExpert):
    """Refuses, as OpenAI's models do: no content, the refusal's text, and the tokens' log-probabilities."""

    async def generate(self, request: ChatRequest) -> ExpertReply:
        self.requests.append(request)
        return ExpertReply(expert=self.name, content="", refusal=REFUSAL, logprobs=LOGPROBS,
                           usage=Usage(prompt_tokens=3, completion_tokens=6, total_tokens=9))

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamDelta]:
        self.requests.append(request)
        yield StreamDelta(refusal="I can't ", logprobs=LOGPROBS)
        yield StreamDelta(refusal="help with that.")
        yield StreamDelta(finish_reason="stop", usage=Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5))


def orchestrator() -> Orchestrator:
    config = fake_config(NAMES)
    experts = {n: FakeRefusingExpert(config.expert(n)) for n in NAMES}
    return Orchestrator(config, FakeGate(NAMES, {}, default=[0.7, 0.3]), experts)


def sdk_client(app: Any) -> AsyncClient:
    return AsyncClient("http://router", transport=httpx.ASGITransport(app=app))


async def test_the_service_sends_null_content_beside_a_refusal() -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(orchestrator())),
                                 base_url="http://router") as http:
        r = await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    choice = r.json()["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": None, "refusal": REFUSAL}
    assert choice["logprobs"] == LOGPROBS


async def test_the_sdk_gives_the_refusal_and_logprobs() -> None:
    async with sdk_client(create_app(orchestrator())) as client:
        result = await client.chat("hi", logprobs=True)
        pieces = [p async for p in client.stream("hi", logprobs=True)]
    assert (result.content, result.refusal, result.logprobs) == ("", REFUSAL, LOGPROBS)
    assert "".join(p.refusal for p in pieces) == REFUSAL and pieces[-1].trace is not None
    assert [p.logprobs for p in pieces if p.logprobs] == [LOGPROBS]


async def test_local_router_gives_them_too() -> None:
    router = LocalRouter(orchestrator())
    result = await router.chat("hi")
    assert (result.refusal, result.logprobs) == (REFUSAL, LOGPROBS)


async def test_langchain_puts_them_where_langchain_openai_does() -> None:
    app = create_app(orchestrator())
    model = ChatMoERouter(base_url="http://router", async_transport=httpx.ASGITransport(app=app))
    message = await model.ainvoke("hi")
    assert message.content == "" and message.additional_kwargs == {"refusal": REFUSAL}
    assert message.response_metadata["logprobs"] == LOGPROBS
    total = None
    async for chunk in model.astream("hi"):
        total = chunk if total is None else total + chunk
    assert total is not None and total.additional_kwargs == {"refusal": REFUSAL}
