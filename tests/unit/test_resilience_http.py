"""Resilience through the service over real HTTP: the cost budget of a mid-stream continuation and of a panel's
left-out members, open breakers with fallback off, an upstream 404 and the breaker, and a Retry-After that
would eat the deadline. Upstreams are ``ScriptedOpenAIServer`` test doubles, one per expert ("a", "b", "c",
ranked in that order by a fake gate), behind the real experts, orchestrator and service."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager
from typing import Any

import httpx
import pytest

from experts.types import ChatMessage, ChatRequest
from router.streaming import CONTINUE_PROMPT
from tests.doubles.scripted_server import Behaviour, ScriptedOpenAIServer
from tests.support import service_over

QUESTION = "what is the capital of France?"  # 30 characters: 7 tokens by estimate
CHAT = {"model": "auto", "messages": [{"role": "user", "content": QUESTION}]}
PRICES = {"input_per_1k": 1.0, "output_per_1k": 2.0}


@asynccontextmanager
async def rig(names: tuple[str, ...] = ("a", "b", "c"), *, prices: dict[str, float] | None = None,
              timeout_s: float = 5.0,
              **config: Any) -> AsyncIterator[tuple[dict[str, ScriptedOpenAIServer], httpx.AsyncClient]]:
    """A scripted server per expert and the service over them; the gate ranks them in ``names`` order."""
    scores = [0.6, 0.3, 0.1][: len(names)]
    with ExitStack() as stack:
        servers = {n: stack.enter_context(ScriptedOpenAIServer(name=n)) for n in names}
        raw = [{"name": n, "type": "vllm", "model": n, "endpoint": s.url, "timeout_s": timeout_s,
                "capabilities": ["chat", "stream"], "cost": prices or PRICES} for n, s in servers.items()]
        async with service_over(raw, scores, **config) as http:
            yield servers, http


async def stream(http: httpx.AsyncClient, **fields: Any) -> tuple[int, dict[str, str], list[dict[str, Any]]]:
    """A streamed chat request: its status, headers, and its events (or the error body when it was refused)."""
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}, **fields}
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return r.status_code, dict(r.headers), [json.loads(await r.aread())]
        events = [json.loads(line[6:]) async for line in r.aiter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
        return r.status_code, dict(r.headers), events


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))


def causes(error: dict[str, Any]) -> list[tuple[str, str]]:
    return [(c["expert"], c["kind"]) for c in error["error"]["causes"]]


# --- the cost budget prices a mid-stream continuation as it is sent ---------------------------------------


async def test_a_continuation_too_costly_for_the_budget_is_not_sent() -> None:
    """a streams 200 words (1,000 characters), then dies. The continuation b would be sent holds them all in
    its prompt (about 280 tokens at $10 per 1k: $2.78), far past the $0.20 budget, though the original request
    (7 tokens, $0.07) would fit: b and c are passed over, and the stream ends with the budget's error."""
    words = " ".join(f"w{i:03d}" for i in range(300))
    async with rig(prices={"input_per_1k": 10.0, "output_per_1k": 0.0},
                   fallback={"cost_budget_usd": 0.20}) as (srv, http):
        srv["a"].push(Behaviour.die_mid_stream(200, words))
        srv["b"].default = srv["c"].default = Behaviour.ok("end.")
        status, _, events = await stream(http)
    assert status == 200 and len(text_of(events)) == 1000
    assert len(srv["b"].requests) == len(srv["c"].requests) == 0
    error = events[-1]
    assert causes(error) == [("a", "unavailable"), ("b", "budget_exhausted"), ("c", "budget_exhausted")]
    continuation = ChatRequest(messages=[ChatMessage(role="user", content=QUESTION),
                                         ChatMessage(role="assistant", content=text_of(events)),
                                         ChatMessage(role="user", content=CONTINUE_PROMPT)])
    estimate = continuation.estimated_prompt_tokens() * 10.0 / 1000
    assert estimate > 2.0
    # a's cut-off answer is counted as its server counted it (vLLM's running usage; the double counts the prompt's
    # 6 words): $0.06 spent; b is priced as the continuation.
    # $0.06 of $0.20 is not the budget spent: the next call would exceed it, and the cause says so
    assert error["error"]["causes"][1]["message"] == (
        f"not tried: the request's cost budget of $0.2 would be exceeded ($0.060000 spent so far, next call "
        f"estimated at ${estimate:.6f})")


async def test_a_continuation_is_priced_at_the_tokens_left_not_the_whole_max_tokens() -> None:
    """With max_tokens 110, a streams 100 tokens and dies: the continuation may write 10 more, so b costs about
    $0.02 (its longer prompt at $0.1 per 1k, 10 tokens at $1 per 1k) and fits the $0.15 budget next to a's
    $0.1006; priced at the whole 110 tokens ($0.1107) it would not."""
    words = " ".join(f"w{i:03d}" for i in range(200))
    async with rig(prices={"input_per_1k": 0.1, "output_per_1k": 1.0},
                   fallback={"cost_budget_usd": 0.15}) as (srv, http):
        srv["a"].push(Behaviour.die_mid_stream(100, words))
        srv["b"].default = srv["c"].default = Behaviour.ok("end.")
        status, _, events = await stream(http, max_tokens=110)
    assert status == 200 and text_of(events) == words[:500] + "end."
    assert (len(srv["b"].requests), len(srv["c"].requests)) == (1, 0)
    assert srv["b"].requests[0]["max_tokens"] == 10
    final = next(e for e in events if e.get("choices") and e["choices"][0].get("finish_reason"))
    assert final["choices"][0]["finish_reason"] == "stop"
    moe = final["moe"]
    assert [(x["expert"], x["ok"]) for x in moe["attempts"]] == [("a", False), ("b", True)]
    # a's tokens as its server counted them (vLLM's running usage): the prompt's 6 words, 100 tokens
    assert moe["attempts"][0]["cost_usd"] == pytest.approx(6 * 0.0001 + 100 * 0.001)
    assert not moe["attempts"][0].get("usage_estimated")
    assert moe["cost_usd"] == pytest.approx(sum(x["cost_usd"] for x in moe["attempts"]))
    assert moe["cost_usd"] <= 0.15


async def test_a_continuation_counts_the_tokens_vllm_generated_not_its_deltas() -> None:
    """vLLM sends no delta for a token that completes no character, so deltas undercount tokens. A vllm expert
    asks for its running usage (``continuous_usage_stats``): a streams 20 deltas that were 40 tokens and dies, and
    with max_tokens 60 the continuation may write 20 more (not 40), and a is priced at its 40 tokens, counted,
    not estimated. An openai expert is never sent vLLM's key, which OpenAI refuses."""
    words = " ".join(f"w{i:03d}" for i in range(100))
    async with rig(("a", "b")) as (srv, http):
        srv["a"].push(Behaviour(text=words, die_after=20, tokens_per_delta=2))
        srv["b"].default = Behaviour.ok("end.")
        status, _, events = await stream(http, max_tokens=60)
    assert status == 200 and text_of(events) == words[:100] + "end."
    assert srv["a"].requests[0]["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert srv["b"].requests[0]["max_tokens"] == 20
    final = next(e for e in events if e.get("choices") and e["choices"][0].get("finish_reason"))
    broken = final["moe"]["attempts"][0]
    assert (broken["expert"], broken["ok"], broken["usage"]["completion_tokens"]) == ("a", False, 40)
    assert not broken.get("usage_estimated")
    assert broken["cost_usd"] == pytest.approx((broken["usage"]["prompt_tokens"] * 1.0 + 40 * 2.0) / 1000)
    with ScriptedOpenAIServer(name="o") as plain:
        raw = [{"name": "o", "type": "openai", "model": "o", "endpoint": plain.url, "capabilities": ["stream"]},
               {"name": "p", "type": "openai", "model": "p", "endpoint": plain.url}]
        async with service_over(raw, [0.9, 0.1]) as http2:
            assert (await stream(http2))[0] == 200
        assert plain.requests[0]["stream_options"] == {"include_usage": True}


async def test_a_broken_vllm_stream_is_priced_at_the_upstreams_own_cost_when_it_gives_one() -> None:
    """An upstream that prices its calls (usage.cost) on every running usage: the stream that breaks off is counted
    at that price, as a finished one is, not at the config's."""
    words = " ".join(f"w{i:03d}" for i in range(100))
    async with rig(("a", "b")) as (srv, http):
        srv["a"].push(Behaviour(text=words, die_after=20, tokens_per_delta=2, cost=0.05))
        srv["b"].default = Behaviour.ok("end.")
        status, _, events = await stream(http, max_tokens=60)
    final = next(e for e in events if e.get("choices") and e["choices"][0].get("finish_reason"))
    broken = final["moe"]["attempts"][0]
    assert status == 200 and (broken["expert"], broken["ok"]) == ("a", False)
    assert broken["cost_usd"] == pytest.approx(0.05)


# --- a panel member left out for the budget stays a fallback candidate ----------------------------------


TOP2 = {"top_k": {"policy": "fixed", "k": 2}}


async def test_a_panel_member_left_out_for_the_budget_answers_when_the_others_fail() -> None:
    """Each call is estimated at about $0.52 (7 prompt tokens, 256 answer tokens before an expert's first
    answer): b does not fit next to a in $0.60, so the panel calls a alone. a fails, which costs nothing, and
    fallback asks b, which now fits."""
    async with rig(("a", "b"), gate=TOP2, fallback={"cost_budget_usd": 0.6}) as (srv, http):
        srv["a"].push(Behaviour.error(500, "a is down"))
        srv["b"].default = Behaviour.ok("Paris")
        r = await http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model"], body["choices"][0]["message"]["content"]) == ("b", "Paris")
    assert len(srv["b"].requests) == 1
    assert [(x["expert"], x["ok"], (x["error"] or {}).get("kind"), x["fallback_for"])
            for x in body["moe"]["attempts"]] == [("b", False, "budget_exhausted", None),
                                                   ("a", False, "server_error", None),
                                                   ("b", True, None, "a")]
    assert body["moe"]["cost_usd"] <= 0.6


async def test_a_left_out_member_that_fails_in_fallback_is_one_cause_not_two() -> None:
    async with rig(("a", "b"), gate=TOP2, fallback={"cost_budget_usd": 0.6}) as (srv, http):
        srv["a"].push(Behaviour.error(500, "a is down"))
        srv["b"].push(Behaviour.error(502, "b is down"))
        r = await http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 503
    error = r.json()
    assert causes(error) == [("a", "server_error"), ("b", "server_error")]
    assert error["error"]["message"].startswith("every candidate expert failed")


# --- fallback off, every breaker open: each candidate is a cause, and the 503 says when to come back ------


TRIP_AT_ONCE = {"failure_threshold": 1, "cooldown_s": 5.0, "min_calls": 100}


@pytest.mark.parametrize(("k", "stream_it"), [(1, False), (1, True), (2, False)],
                         ids=["plain", "stream", "plain-top2"])
async def test_with_fallback_off_open_breakers_are_causes_with_a_retry_after(k: int, stream_it: bool) -> None:
    async with rig(("a", "b"), gate={"top_k": {"policy": "fixed", "k": k}},
                   fallback={"enabled": False, "breaker": TRIP_AT_ONCE}) as (srv, http):
        srv["a"].default = srv["b"].default = Behaviour.error(500)
        for _ in range(2):  # with fallback off, each request calls the best expert whose breaker is closed
            await http.post("/v1/chat/completions", json=CHAT)
        assert {e["name"]: e["breaker"]["state"] for e in (await http.get("/v1/experts")).json()["data"]} == {
            "a": "open", "b": "open"}
        calls = len(srv["a"].requests) + len(srv["b"].requests)
        if stream_it:
            status, headers, (error,) = await stream(http)
        else:
            r = await http.post("/v1/chat/completions", json=CHAT)
            status, headers, error = r.status_code, dict(r.headers), r.json()
    assert len(srv["a"].requests) + len(srv["b"].requests) == calls  # no expert was called
    assert status == 503 and error["error"]["code"] == "all_experts_failed"
    # Every expert is a cause: with fallback off, an expert passed over without a call hands the query on.
    assert causes(error) == [("a", "circuit_open"), ("b", "circuit_open")]
    assert all("next probe in" in c["message"] for c in error["error"]["causes"])
    assert headers["retry-after"] == "5"


# --- an upstream 404 is the deployment's fault: it counts against the breaker ----------------------------


@pytest.mark.parametrize(("status", "a_called", "state"), [(404, 2, "open"), (400, 4, "closed")])
async def test_an_upstream_404_opens_the_breaker_but_a_rejected_request_does_not(status: int, a_called: int,
                                                                                 state: str) -> None:
    breaker = {"failure_threshold": 2, "cooldown_s": 30.0, "min_calls": 100}
    async with rig(("a", "b"), fallback={"breaker": breaker}) as (srv, http):
        srv["a"].default = Behaviour.error(status, "The model `a` does not exist." if status == 404 else "bad")
        for _ in range(4):
            r = await http.post("/v1/chat/completions", json=CHAT)
            assert (r.status_code, r.json()["model"]) == (200, "b")
        snap = (await http.get("/v1/experts")).json()["data"][0]["breaker"]
    assert len(srv["a"].requests) == a_called
    assert snap["state"] == state
    if status == 404:
        assert (snap["consecutive_failures"], snap["last_error"]) == (2, "rejected")


# --- a Retry-After that would leave the retry too little time is not waited for -------------------------


@pytest.mark.parametrize("retry_after", ["1.5", "1.85"])
async def test_a_retry_after_that_would_eat_the_deadline_moves_on_to_the_next_expert(retry_after: str) -> None:
    """With a 2 s deadline, waiting 1.5 s or more would leave a's retry less than half the 2 s it could have
    had: b is asked at once instead, and answers."""
    async with rig(fallback={"retries": 1, "retry_after_max_s": 5.0, "deadline_s": 2.0}) as (srv, http):
        srv["a"].push(Behaviour.error(429, "slow down", retry_after=retry_after), Behaviour.ok("a after its wait"))
        srv["b"].default = Behaviour.ok("b at once")
        r = await http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model"], body["moe"]["retries"]) == ("b", [])
    assert (len(srv["a"].requests), len(srv["b"].requests)) == (1, 1)


async def test_a_retry_after_that_leaves_the_retry_time_is_waited_for() -> None:
    async with rig(fallback={"retries": 1, "retry_after_max_s": 5.0, "deadline_s": 2.0}) as (srv, http):
        srv["a"].push(Behaviour.error(429, "slow down", retry_after="0.5"), Behaviour.ok("a after its wait"))
        r = await http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "a"
    assert [(x["expert"], x["cause"], x["backoff_s"]) for x in body["moe"]["retries"]] == [("a", "rate_limited", 0.505)]
    assert (len(srv["a"].requests), len(srv["b"].requests)) == (2, 0)


async def test_a_refused_reply_that_reported_its_usage_is_counted_at_it() -> None:
    """a answers 200 with 1,000 + 1,000 tokens of usage and no choice: the router refuses the reply and falls back
    to b, but a's upstream bills those tokens all the same. The failed attempt counted $0 and 0 tokens; it now
    counts what a reported, in the attempt, the response's usage and cost, and the budget."""
    refused = json.dumps({"id": "x", "object": "chat.completion", "created": 1, "model": "a", "choices": [],
                          "usage": {"prompt_tokens": 1000, "completion_tokens": 1000, "total_tokens": 2000}})
    await _a_refused_reply_is_counted(refused)
    # no 'choices' key at all: refused where the body is decoded, billed all the same
    await _a_refused_reply_is_counted(refused.replace('"choices": [], ', ""))


async def _a_refused_reply_is_counted(refused: str) -> None:
    async with rig(("a", "b"), prices={"input_per_1k": 1.0, "output_per_1k": 2.0}) as (srv, http):
        srv["a"].push(Behaviour.raw(refused.encode()))
        srv["b"].default = Behaviour.ok("Paris.", prompt_tokens=10, completion_tokens=5)
        body = (await http.post("/v1/chat/completions", json=CHAT)).json()
    first, second = body["moe"]["attempts"]
    assert (first["expert"], first["ok"], first["error"]["kind"]) == ("a", False, "protocol")
    assert first["usage"]["prompt_tokens"] == first["usage"]["completion_tokens"] == 1000
    assert first["cost_usd"] == pytest.approx(3.0) and not first.get("usage_estimated")
    assert second["ok"] and second["cost_usd"] == pytest.approx(0.02)
    assert body["usage"]["prompt_tokens"] == 1010 and body["usage"]["completion_tokens"] == 1005
    assert body["moe"]["cost_usd"] == pytest.approx(3.02)


async def test_a_budget_already_spent_says_so() -> None:
    """What refused reply a billed ($3) spends the $1 budget: b is not tried, and its cause says the budget is
    spent (not that the next call would exceed it)."""
    refused = json.dumps({"id": "x", "object": "chat.completion", "created": 1, "model": "a", "choices": [],
                          "usage": {"prompt_tokens": 1000, "completion_tokens": 1000, "total_tokens": 2000}})
    async with rig(("a", "b"), prices={"input_per_1k": 1.0, "output_per_1k": 2.0},
                   fallback={"cost_budget_usd": 1.0}) as (srv, http):
        srv["a"].push(Behaviour.raw(refused.encode()))
        r = await http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 503 and len(srv["b"].requests) == 0
    assert r.json()["error"]["causes"][1]["message"].startswith(
        "not tried: the request's cost budget of $1 is spent ($3.000000 spent so far")
