"""``deadline_s=`` and ``budget_usd=`` in the SDK: the HTTP clients send the ``x-moe-deadline-s`` and
``x-moe-budget-usd`` headers, ``LocalRouter`` hands the limits to the orchestrator; either way they narrow the
config's deadline and cost budget for one request, and a value out of range is a ``ValueError`` naming it."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest

from router.orchestrator import Orchestrator
from router.sdk import AsyncClient, Client, LocalRouter
from router.service import create_app
from tests.doubles.fakes import FakeExpert, FakeGate, fake_config

NAMES = ["math", "code", "law"]


def orchestrator(**fakes: dict[str, Any]) -> Orchestrator:
    """A panel of all three (math the heaviest); ``fakes``: an expert's ``FakeExpert`` keywords."""
    config = fake_config(NAMES, gate={"top_k": {"policy": "fixed", "k": 3}})
    experts = {n: FakeExpert(config.expert(n), f"{n} answers", **fakes.get(n, {})) for n in NAMES}
    return Orchestrator(config, FakeGate(NAMES, {}, default=[0.45, 0.3, 0.25]), experts)


def kinds(trace: Any) -> dict[str, str | None]:
    return {a.expert: (a.error or {}).get("kind") for a in trace.attempts}


def test_the_sync_client_sends_the_limits_as_headers_only_when_asked() -> None:
    seen: list[dict[str, str]] = []

    def service(request: httpx.Request) -> httpx.Response:
        seen.append({k: v for k, v in request.headers.items() if k.startswith("x-moe-")})
        body = json.loads(request.content)
        assert "deadline_s" not in body and "budget_usd" not in body  # headers, never fields sent upstream
        if body["stream"]:
            return httpx.Response(200, text="data: [DONE]\n\n", headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json={"id": "chatcmpl-1", "model": "math", "choices": [
            {"message": {"content": "B"}, "finish_reason": "stop"}]})

    with Client("http://router", transport=httpx.MockTransport(service)) as sdk:
        sdk.chat("q", deadline_s=5, budget_usd=0.002)
        sdk.chat("q")
        assert list(sdk.stream("q", budget_usd=0)) == []
    assert 4.9 < float(seen[0]["x-moe-deadline-s"]) <= 5.0 and seen[0]["x-moe-budget-usd"] == "0.002"
    assert seen[1] == {} and seen[2] == {"x-moe-budget-usd": "0"}


async def test_the_async_client_and_local_router_narrow_the_budget_and_the_deadline() -> None:
    """A budget of $0 lets only the panel's first call through (the first is always made); 0.3 s of deadline
    answers with the members that answered in time, where the config's 120 s would have waited on the hang."""
    app = create_app(orchestrator())
    async with AsyncClient("http://router", transport=httpx.ASGITransport(app=app)) as sdk:
        whole = await sdk.chat("q")
        frugal = await sdk.chat("q", budget_usd=0)
    assert kinds(whole.trace) == {"math": None, "code": None, "law": None}
    assert kinds(frugal.trace) == {"math": None, "code": "budget_exhausted", "law": "budget_exhausted"}

    async with LocalRouter(orchestrator(law={"delay": 30.0})) as local:
        frugal = await local.chat("q", budget_usd=0)
        started = time.monotonic()
        quick = await local.chat("q", deadline_s=0.3)
        elapsed = time.monotonic() - started
        chunks = [c async for c in local.stream("q", deadline_s=5, budget_usd=0)]
    assert kinds(frugal.trace) == {"math": None, "code": "budget_exhausted", "law": "budget_exhausted"}
    assert kinds(quick.trace) == {"math": None, "code": None, "law": "timeout"} and elapsed < 1.0
    assert "".join(c.content for c in chunks) == "math answers"


@pytest.mark.parametrize(("limits", "words"), [
    ({"deadline_s": 0}, "deadline_s: 0 is not a number of seconds above 0 up to 3600"),
    ({"deadline_s": float("nan")}, "deadline_s: nan is not a number"),
    ({"deadline_s": True}, "deadline_s: True is not a number"),
    ({"deadline_s": "5"}, "deadline_s: '5' is not a number"),
    ({"budget_usd": -0.01}, "budget_usd: -0.01 is not a number of USD from 0 up to 1000"),
])
async def test_a_limit_out_of_range_is_a_value_error_naming_it_before_anything_is_sent(
        limits: dict[str, Any], words: str) -> None:
    sent: list[httpx.Request] = []
    transport = httpx.MockTransport(lambda r: sent.append(r) or httpx.Response(500))
    with Client("http://router", transport=transport) as sdk, pytest.raises(ValueError) as sync:
        sdk.chat("q", **limits)
    async with AsyncClient("http://router", transport=httpx.MockTransport(
            lambda r: sent.append(r) or httpx.Response(500))) as client:
        with pytest.raises(ValueError) as asynchronous:
            client.stream("q", **limits)
    router = orchestrator()
    async with LocalRouter(router) as local:
        with pytest.raises(ValueError) as in_process:
            await local.chat("q", **limits)
    assert words in str(sync.value) and words in str(asynchronous.value) and words in str(in_process.value)
    assert sent == [] and not any(e.requests for e in router.experts.values())  # type: ignore[attr-defined]


def test_limits_sent_by_header_reach_the_orchestrator_as_the_sdk_gives_them() -> None:
    """The service and ``LocalRouter`` read one ``CallScope``: a header's value is what the argument's would be."""
    from router.fallback import CallScope

    by_header = CallScope.from_headers("2.5", "0.25")
    by_argument = CallScope.limiting(2.5, 0.25)
    assert by_header is not None and by_argument is not None
    assert by_header.budget_usd == by_argument.budget_usd == 0.25
    assert abs(by_header.until - by_argument.until) < 0.05
    assert CallScope.from_headers(None, None) is None and CallScope.limiting(None, None) is None
