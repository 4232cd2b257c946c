"""Multi-expert panels (top-k > 1) and their combiners through the service over real HTTP: who escalate and fuse
ask, and when they do not, what an empty aggregation gives, and that a panel's tokens and USD are counted once
in the response, the log line and /metrics. Upstreams are ``ScriptedOpenAIServer`` test doubles, one per expert,
ranked by a fake gate in the order given, behind the real experts, orchestrator and service."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager
from typing import Any

import httpx
import pytest

from tests.doubles.scripted_server import Behaviour, ScriptedOpenAIServer
from tests.support import samples, service_over

CHAT = {"model": "auto", "messages": [{"role": "user", "content": "which letter?"}]}
PRICES = {"input_per_1k": 1.0, "output_per_1k": 2.0}
PANEL = {"top_k": {"policy": "fixed", "k": 2}}
ESCALATE = {"strategy": "escalate", "extractor": "choice", "escalate_to": "j", "aggregator": "j"}
CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@asynccontextmanager
async def rig(names: tuple[str, ...] = ("a", "b", "j"), *, capabilities: dict[str, list[str]] | None = None,
              **config: Any) -> AsyncIterator[tuple[dict[str, ScriptedOpenAIServer], httpx.AsyncClient]]:
    """A scripted server per expert and the service over them; the gate ranks them in ``names`` order."""
    scores = [0.4, 0.3, 0.2, 0.1][: len(names)]
    config.setdefault("gate", PANEL)
    with ExitStack() as stack:
        servers = {n: stack.enter_context(ScriptedOpenAIServer(name=n)) for n in names}
        raw = [{"name": n, "type": "vllm", "model": n, "endpoint": s.url, "timeout_s": 5.0,
                "capabilities": (capabilities or {}).get(n, ["chat", "stream", "tools"]), "cost": PRICES}
               for n, s in servers.items()]
        async with service_over(raw, scores, **config) as http:
            yield servers, http


def attempts(body: dict[str, Any]) -> list[tuple[str, bool, str]]:
    return [(a["expert"], a["ok"], a["role"]) for a in body["moe"]["attempts"]]


# -- escalate asks only an expert that may answer this request ---------------------------------------------------
async def test_an_expert_named_directly_answers_alone_under_escalate() -> None:
    """``model: "a"`` calls a directly: its lone answer is the answer, not handed to the escalation expert (which
    would answer in a's name's place, and be paid for)."""
    async with rig(combiner=ESCALATE) as (srv, http):
        srv["a"].default = Behaviour.ok("The answer is B")
        srv["j"].default = Behaviour.ok("The answer is D")
        r = await http.post("/v1/chat/completions", json={**CHAT, "model": "a"})
        named = await http.post("/v1/chat/completions", json={**CHAT, "model": "a"},
                                headers={"x-moe-combiner": "escalate"})
    for answer in (r, named):
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert (answer.headers["x-moe-expert"], body["model"]) == ("a", "a")
        assert body["choices"][0]["message"]["content"] == "The answer is B"
        assert attempts(body) == [("a", True, "answer")]
    assert srv["j"].requests == []


async def test_escalate_does_not_ask_again_an_expert_that_failed_the_request_on_the_panel() -> None:
    """j sits on the panel and fails it (retries: 0); a's lone answer would escalate to j, with the very request j
    just failed. It is not sent again: the panel's vote stands, j's error in ``combiner_fallback``."""
    async with rig(("a", "j", "c"), combiner=ESCALATE) as (srv, http):
        srv["a"].default = Behaviour.ok("The answer is B")
        srv["j"].push(Behaviour.error(500))
        r = await http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["content"] == "The answer is B" and r.headers["x-moe-expert"] == "a"
    assert len(srv["j"].requests) == 1
    assert sorted(attempts(body)) == [("a", True, "answer"), ("j", False, "answer")]
    assert body["moe"]["combiner_fallback"] == {"to": "vote", "expert": "j", "kind": "server_error",
                                                "message": "HTTP 500: scripted error"}


async def test_escalate_sends_no_image_to_an_expert_without_vision() -> None:
    """The service refuses an image for j when j is named; the panel's disagreement must not send it there
    either. The panel's vote stands, and the fallback says why j was not asked."""
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "which letter is shown?"}, image]}]
    vision = {"a": ["chat", "vision"], "b": ["chat", "vision"], "j": ["chat"]}
    async with rig(capabilities=vision, combiner=ESCALATE) as (srv, http):
        srv["a"].default = Behaviour.ok("The answer is B")
        srv["b"].default = Behaviour.ok("The answer is C")
        r = await http.post("/v1/chat/completions", json={"model": "auto", "messages": messages})
    assert r.status_code == 200, r.text
    body = r.json()
    assert srv["j"].requests == []
    assert body["choices"][0]["message"]["content"] == "The answer is B"
    fallback = body["moe"]["combiner_fallback"]
    assert (fallback["to"], fallback["expert"], fallback["kind"]) == ("vote", "j", "config")
    assert "'vision'" in fallback["message"]


# -- an empty aggregation never replaces the panel's answer -------------------------------------------------------
@pytest.mark.parametrize(("strategy", "to"), [("fuse", "top1"), ("escalate", "vote")])
async def test_an_empty_answer_from_the_combiners_expert_leaves_the_panels_answer(strategy: str, to: str) -> None:
    async with rig(combiner={**ESCALATE, "strategy": strategy}) as (srv, http):
        srv["a"].default = Behaviour.ok("The answer is B")
        srv["b"].default = Behaviour.ok("The answer is C")
        srv["j"].default = Behaviour.ok("")
        r = await http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["choices"][0]["message"]["content"], r.headers["x-moe-expert"]) == ("The answer is B", "a")
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["moe"]["combiner_fallback"] == {"to": to, "expert": "j", "kind": "empty_answer",
                                                "message": "answered with no text"}
    # j was called, and is paid for
    assert ("j", True, "aggregate" if strategy == "fuse" else "escalate") in attempts(body)
    assert body["moe"]["cost_usd"] == pytest.approx(sum(a["cost_usd"] for a in body["moe"]["attempts"]))


# -- a panel with tool calls ---------------------------------------------------------------------------------------
async def panel_of_three(ranked: tuple[str, str, str], combiner: dict[str, str],
                         answers: dict[str, Behaviour]) -> dict[str, Any]:
    """The service's answer over a panel of a, b and c, the gate ranking them in ``ranked`` order, each giving its
    ``answers`` entry."""
    async with rig(ranked, gate={"top_k": {"policy": "fixed", "k": 3}}, combiner=combiner) as (srv, http):
        for name, behaviour in answers.items():
            srv[name].default = behaviour
        r = await http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def test_a_panel_with_tool_calls_marks_agreement_as_top1_reads_it() -> None:
    """c's tool call keeps the panel from being combined: a's answer stands, and b, which gives the same letter,
    agrees with it, as top1 reads answers (the configured extractor)."""
    body = await panel_of_three(("a", "b", "c"), {"strategy": "top1", "extractor": "choice"}, {
        "a": Behaviour.ok("The answer is B"), "b": Behaviour.ok("B"), "c": Behaviour.ok("", tool_calls=[CALL])})
    assert body["choices"][0]["message"]["content"] == "The answer is B"
    assert {c["expert"]: c["agreed"] for c in body["moe"]["contributions"]} == {"a": True, "b": True, "c": False}


@pytest.mark.parametrize("heaviest", ["b", "c"])
async def test_a_blank_answer_has_no_say_beside_a_tool_call(heaviest: str) -> None:
    """a, the heaviest member, answered blank (a reasoning model out of max_tokens while thinking): beside c's tool
    call it stood, text and tool call both lost, because a panel holding a tool call skipped the blank check. Now
    the heaviest answer that is not blank stands: b's text or c's tool call."""
    body = await panel_of_three(("a", "b", "c") if heaviest == "b" else ("a", "c", "b"),
                                {"strategy": "vote", "extractor": "number"},
                                {"a": Behaviour.ok(""), "b": Behaviour.ok("The answer is 391"),
                                 "c": Behaviour.ok("", tool_calls=[CALL])})
    message = body["choices"][0]["message"]
    assert body["model"] == heaviest
    assert (message["content"], bool(message.get("tool_calls"))) == \
        (("The answer is 391", False) if heaviest == "b" else (None, True))
    contributions = {c["expert"]: (c["weight"], c["agreed"]) for c in body["moe"]["contributions"]}
    assert contributions["a"] == (0.0, False) and contributions[heaviest][0] == pytest.approx(0.6)


async def test_fuse_shows_the_aggregator_the_tool_calls_and_results_after_the_question() -> None:
    """An agent's loop: the question, the assistant's tool call, the tool's result. The members saw all of it;
    the aggregator saw the question alone (the turns after it were dropped), and was told to answer "with the
    tool's data only" without the data."""
    call = {"id": "call_7", "type": "function", "function": {"name": "calc", "arguments": '{"expr": "17*23"}'}}
    messages = [{"role": "system", "content": "Answer with the tool's data only."},
                {"role": "user", "content": "compute 17 times 23"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_7", "content": "TOOL RESULT: 391"}]
    async with rig(combiner={"strategy": "fuse", "aggregator": "j"}) as (srv, http):
        srv["a"].default = Behaviour.ok("391")
        srv["b"].default = Behaviour.ok("It is 391.")
        srv["j"].default = Behaviour.ok("391")
        r = await http.post("/v1/chat/completions", json={"model": "auto", "messages": messages})
    assert r.status_code == 200, r.text
    assert [m["role"] for m in srv["a"].requests[0]["messages"]] == ["system", "user", "assistant", "tool"]
    system, user = srv["j"].requests[0]["messages"]
    assert "Answer with the tool's data only." in system["content"]
    assert 'Question:\ncompute 17 times 23\n\nSince the question:\nassistant: [tool call: calc({"expr": "17*23"})]\n' \
           "tool: TOOL RESULT: 391\n\nAnswer 1" in user["content"]


# -- a panel's usage and cost are counted once ----------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["top1", "vote", "fuse", "escalate"])
async def test_a_panels_tokens_and_cost_are_counted_once_everywhere(strategy: str,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Three members (b retried once after a 503) and the combiner's expert: the response's usage and cost are
    the sum of every attempt's, and the request's log line and /metrics hold the same totals."""
    caplog.set_level(logging.INFO, logger="router")
    async with rig(("a", "b", "c", "j"), gate={"top_k": {"policy": "fixed", "k": 3}},
                   combiner={**ESCALATE, "strategy": strategy},
                   fallback={"retries": 1, "backoff_base_s": 0.01, "backoff_max_s": 0.01}) as (srv, http):
        srv["a"].default = Behaviour.ok("The answer is B")
        srv["b"].default = Behaviour.ok("The answer is C", cost=0.25)
        srv["c"].default = Behaviour.ok("The answer is C")
        srv["j"].default = Behaviour.ok("The answer is C, fused")
        srv["b"].push(Behaviour.error(503))
        r = await http.post("/v1/chat/completions", json=CHAT)
        page = samples((await http.get("/metrics")).text)
    assert r.status_code == 200, r.text
    moe = r.json()["moe"]
    tokens = sum(a["usage"]["total_tokens"] for a in moe["attempts"])
    cost = sum(a["cost_usd"] for a in moe["attempts"])
    assert [(x["expert"], x["cause"]) for x in moe["retries"]] == [("b", "server_error")]
    assert r.json()["usage"]["total_tokens"] == moe["usage"]["total_tokens"] == tokens
    assert moe["cost_usd"] == pytest.approx(cost) and cost >= 0.25
    assert sum(v for (name, _), v in page.items() if name == "moe_tokens_total") == tokens
    assert sum(v for (name, _), v in page.items() if name == "moe_cost_usd_total") == pytest.approx(cost)
    [line] = [json.loads(rec.getMessage()) for rec in caplog.records
              if rec.name == "router.requests" and '"/v1/chat/completions"' in rec.getMessage()]
    assert line["prompt_tokens"] + line["completion_tokens"] == tokens
    assert line["cost_usd"] == pytest.approx(cost)
