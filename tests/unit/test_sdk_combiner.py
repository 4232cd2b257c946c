"""``combiner=`` in the SDK: the HTTP clients send the ``x-moe-combiner`` header, ``LocalRouter`` checks the strategy
with the service's own check; an unknown strategy fails with the service's error either way."""

from __future__ import annotations

import json

import httpx
import pytest

from router.orchestrator import Orchestrator
from router.sdk import AsyncClient, Client, LocalRouter, RouterAPIError
from router.service import create_app
from tests.doubles.fakes import FakeExpert, FakeGate, fake_config

NAMES = ["math", "code", "law"]
TEXTS = {"math": "The answer is (A).", "code": "The answer is (B).", "law": "Answer: B"}
UNKNOWN = "unknown combiner strategy 'best'; known: consensus, escalate, fuse, top1, vote"


def orchestrator() -> Orchestrator:
    """A panel of three where top1 (math, the heaviest) and vote (code and law on B) disagree."""
    config = fake_config(NAMES, gate={"top_k": {"policy": "fixed", "k": 3}})
    experts = {n: FakeExpert(config.expert(n), TEXTS[n]) for n in NAMES}
    return Orchestrator(config, FakeGate(NAMES, {}, default=[0.45, 0.3, 0.25]), experts)


async def test_the_async_client_picks_the_combiner_per_request() -> None:
    async with AsyncClient("http://router", transport=httpx.ASGITransport(app=create_app(orchestrator()))) as sdk:
        default = await sdk.chat("which letter?")
        voted = await sdk.chat("which letter?", combiner="vote")
        with pytest.raises(RouterAPIError) as unknown:
            await sdk.chat("which letter?", combiner="best")
        with pytest.raises(RouterAPIError) as streamed:
            _ = [c async for c in sdk.stream("which letter?", combiner="vote")]
    assert (default.trace.combiner, default.expert) == ("top1", "math")
    assert (voted.trace.combiner, voted.expert, voted.content) == ("vote", "code", "The answer is (B).")
    assert (unknown.value.status, unknown.value.code) == (400, "invalid_combiner")
    assert unknown.value.message == f"x-moe-combiner: {UNKNOWN}"
    assert (streamed.value.status, streamed.value.code) == (400, "invalid_combiner")
    assert "cannot combine a streamed answer" in streamed.value.message


def test_the_sync_client_sends_the_header_only_when_asked() -> None:
    seen: list[str | None] = []

    def service(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("x-moe-combiner"))
        assert "combiner" not in json.loads(request.content)  # a header, never a body field sent upstream
        if json.loads(request.content)["stream"]:
            return httpx.Response(200, text="data: [DONE]\n\n", headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json={"id": "chatcmpl-1", "model": "math", "moe": {"combiner": "vote"},
                                         "choices": [{"message": {"content": "B"}, "finish_reason": "stop"}]})

    with Client("http://router", transport=httpx.MockTransport(service)) as sdk:
        assert sdk.chat("q", combiner="vote").trace.combiner == "vote"
        sdk.chat("q")
        assert list(sdk.stream("q", combiner="top1")) == []
    assert seen == ["vote", None, "top1"]


async def test_the_local_router_picks_the_combiner_and_refuses_an_unknown_one() -> None:
    async with LocalRouter(orchestrator()) as local:
        default = await local.chat("which letter?")
        voted = await local.chat("which letter?", combiner=" Vote")
        with pytest.raises(RouterAPIError) as unknown:
            await local.chat("which letter?", combiner="best")
    assert (default.trace.combiner, default.expert) == ("top1", "math")
    assert (voted.trace.combiner, voted.expert) == ("vote", "code")
    # what Client raises from the service's answer
    assert (unknown.value.status, unknown.value.code, unknown.value.message) == \
        (400, "invalid_combiner", f"x-moe-combiner: {UNKNOWN}")
