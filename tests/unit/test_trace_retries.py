"""Retries in the trace: each retry a ``Retry`` record (expert, number, cause, backoff) and each attempt its retry
number, in the orchestrator's trace, a stream's final trace and the service's response body."""

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from experts.errors import (
    ExpertError,
    ExpertRateLimited,
    ExpertRejected,
    ExpertServerError,
    ExpertTimeout,
    ExpertUnavailable,
)
from experts.types import ChatMessage, ChatRequest, ExpertReply, StreamDelta
from router.config import parse_config
from router.orchestrator import Orchestrator, StreamEnd
from router.retry import RETRY_AFTER_SLACK_S
from router.service import create_app
from router.trace import Retry
from tests.doubles.fakes import FakeExpert, FakeGate

NAMES = ["math", "code"]
# Orchestrators a test built, closed after it so no gate worker thread outlives the test.
BUILT: list[Orchestrator] = []


@pytest.fixture(autouse=True)
async def close_orchestrators() -> AsyncIterator[None]:
    yield
    while BUILT:
        await BUILT.pop().aclose()


class FlakyFakeExpert(FakeExpert):
    """A fake that raises the queued errors first, one per call (plain or streamed), then answers."""

    def __init__(self, *args: Any, errors: list[ExpertError], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.errors = errors

    async def generate(self, request: ChatRequest) -> ExpertReply:
        if self.errors:
            raise self.errors.pop(0)
        return await super().generate(request)

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamDelta]:
        if self.errors:
            raise self.errors.pop(0)
        async for delta in super().stream(request):
            yield delta


def build(math_errors: list[ExpertError], **fallback: Any) -> tuple[Orchestrator, list[float]]:
    """``math`` (the gate's first choice) fails with ``math_errors`` first; sleeps are recorded, not waited."""
    config = parse_config({"version": 1, "fallback": fallback, "experts": [
        {"name": n, "type": "replay", "model": n, "timeout_s": 1.0, "replay": {"source": "routerbench", "path": "x"}}
        for n in NAMES]}, check_env=False)
    experts = {"math": FlakyFakeExpert(config.expert("math"), errors=list(math_errors)),
               "code": FakeExpert(config.expert("code"))}
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    gate = FakeGate(NAMES, {}, default=[0.7, 0.3])
    BUILT.append(Orchestrator(config, gate, experts, sleep=sleep, rand=lambda: 0.5))
    return BUILT[-1], slept


def ask() -> ChatRequest:
    return ChatRequest(messages=[ChatMessage(role="user", content="an integral")])


async def test_each_retry_is_recorded_with_its_cause_and_backoff() -> None:
    orch, slept = build([ExpertUnavailable("math", "reset"), ExpertServerError("math", 502, "bad gateway")],
                        retries=2, backoff_base_s=0.1)
    answer = await orch.complete(ask())
    assert answer.expert == "math"
    # base * 2**n, equal jitter at rand=0.5: 0.1 -> 0.075, 0.2 -> 0.15
    assert [(r.expert, r.number, r.cause) for r in answer.trace.retries] == [("math", 1, "unavailable"),
                                                                            ("math", 2, "server_error")]
    assert [r.backoff_s for r in answer.trace.retries] == pytest.approx([0.075, 0.15])
    assert [r.backoff_s for r in answer.trace.retries] == slept
    assert [(a.expert, a.ok, a.retry) for a in answer.trace.attempts] == [
        ("math", False, 0), ("math", False, 1), ("math", True, 2)]


async def test_a_retry_after_longer_than_the_backoff_is_the_recorded_wait() -> None:
    orch, slept = build([ExpertRateLimited("math", 429, "slow down", retry_after_s=1.5)], retries=1)
    answer = await orch.complete(ask())
    assert answer.trace.retries == [Retry(expert="math", number=1, cause="rate_limited",
                                          backoff_s=1.5 + RETRY_AFTER_SLACK_S)]
    assert slept == [1.5 + RETRY_AFTER_SLACK_S]


async def test_a_failure_that_is_not_retried_leaves_no_retry_and_fallback_is_not_a_retry() -> None:
    orch, slept = build([ExpertRejected("math", 400, "bad request")], retries=3)
    answer = await orch.complete(ask())
    assert answer.expert == "code" and answer.trace.retries == [] and slept == []
    assert [(a.expert, a.retry, a.fallback_for) for a in answer.trace.attempts] == [("math", 0, None),
                                                                                   ("code", 0, "math")]


async def test_retries_then_fallback_show_both() -> None:
    orch, _ = build([ExpertTimeout("math", "slow"), ExpertTimeout("math", "slow again")], retries=1)
    answer = await orch.complete(ask())
    assert answer.expert == "code"
    assert [(r.expert, r.number, r.cause) for r in answer.trace.retries] == [("math", 1, "timeout")]
    assert [(a.expert, a.ok, a.retry, a.fallback_for) for a in answer.trace.attempts] == [
        ("math", False, 0, None), ("math", False, 1, None), ("code", True, 0, "math")]


async def test_a_retry_refused_by_the_breaker_is_not_recorded() -> None:
    errors: list[ExpertError] = [ExpertServerError("math", 503, "down") for _ in range(5)]
    orch, slept = build(errors, retries=5, breaker={"failure_threshold": 2})
    answer = await orch.complete(ask())
    assert answer.expert == "code"
    assert len(answer.trace.retries) == len(slept) == 1  # the second failure opened the breaker
    assert [a.retry for a in answer.trace.attempts if a.expert == "math"] == [0, 1]


async def test_stream_retries_are_in_the_final_trace() -> None:
    orch, _ = build([ExpertServerError("math", 503, "busy")], retries=1)
    events = [e async for e in orch.stream(ask())]
    end = events[-1]
    assert isinstance(end, StreamEnd)
    assert [(r.expert, r.number, r.cause) for r in end.trace.retries] == [("math", 1, "server_error")]
    assert [(a.expert, a.ok, a.retry) for a in end.trace.attempts] == [("math", False, 0), ("math", True, 1)]


async def test_the_response_trace_carries_the_retries() -> None:
    orch, _ = build([ExpertUnavailable("math", "reset")], retries=1)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(orch)),
                                 base_url="http://router") as http:
        body = {"model": "auto", "messages": [{"role": "user", "content": "an integral"}]}
        plain = (await http.post("/v1/chat/completions", json=body)).json()
        orch.dispatch.experts["math"].errors = [ExpertUnavailable("math", "reset")]  # type: ignore[attr-defined]
        streamed = await http.post("/v1/chat/completions", json={**body, "stream": True})
    assert plain["moe"]["retries"] == [{"expert": "math", "number": 1, "cause": "unavailable",
                                        "backoff_s": pytest.approx(0.075)}]
    assert [a["retry"] for a in plain["moe"]["attempts"]] == [0, 1]
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines()
              if line.startswith("data: {")]
    assert chunks[-1]["moe"]["retries"] == plain["moe"]["retries"]


@pytest.mark.parametrize("retries", [0, 2])
async def test_no_failure_means_no_retry(retries: int) -> None:
    orch, slept = build([], retries=retries)
    answer = await orch.complete(ask())
    assert answer.trace.retries == [] and slept == []
    assert answer.trace.summary()["retries"] == []
