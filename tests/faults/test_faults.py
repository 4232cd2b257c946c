"""Fault injection over real HTTP: scripted experts behind the real service (see ``harness``).

Every test closes the rig and then counts asyncio tasks against the baseline, and server-side connections: those
still held mid-response once its requests were done, counted before the rig closed its clients (closing them
closes in-use connections too, and would hide a leak), and those still open after.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tests.doubles.scripted_server import Behaviour
from tests.faults.harness import DEADLINE_S, FAULTS, MARGIN_S, Rig, count_leaks, load, rig


@pytest.fixture
async def r() -> AsyncIterator[Rig]:
    before = len(asyncio.all_tasks())
    async with rig() as live:
        yield live
    leaks = await count_leaks(live, before)
    assert (leaks.tasks, leaks.connections) == (0, 0)


def within_deadline(elapsed_s: float) -> bool:
    return elapsed_s <= DEADLINE_S + MARGIN_S


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("fault", sorted(FAULTS))
async def test_every_fault_of_the_top_expert_is_answered(r: Rig, fault: str, stream: bool) -> None:
    r.servers["a"].default = FAULTS[fault]
    replies = await asyncio.gather(*(r.chat(f"q{i}", stream=stream) for i in range(4)))
    for reply in replies:
        assert reply.status == 200, reply.body
        assert reply.content
        assert within_deadline(reply.elapsed_s)
    experts = {a["expert"] for reply in replies for a in reply.body["moe"]["attempts"] if a["ok"]}
    assert experts == ({"a"} if fault == "slow" else {"b"})
    if stream and fault.endswith("mid_stream"):
        switches = replies[0].body["moe"]["switches"]
        assert switches and switches[0]["from"] == "a" and switches[0]["to"] == "b"
        assert replies[0].content.startswith("one two ")


@pytest.mark.parametrize("after", ["die", "stall"])
@pytest.mark.parametrize("tool", [False, True], ids=["text", "tool_call"])
async def test_a_finished_stream_whose_connection_then_fails_is_complete(r: Rig, after: str, tool: bool) -> None:
    """The finish_reason (and the usage) arrived, then the connection broke or stalled before [DONE]: the answer
    is whole. It used to be a mid-stream failure: another expert was asked to continue a finished answer (its
    text appended), or a finished tool call was reported as broken, and the breaker counted it."""
    calls = [{"id": "call-1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}]
    r.servers["a"].default = Behaviour(mode="answer", text="" if tool else "Paris.", after_finish=after,
                                       tool_calls=tuple(calls) if tool else ())
    reply = await r.chat(stream=True)
    assert reply.status == 200 and "error" not in reply.body, reply.body
    assert reply.content == ("" if tool else "Paris.")
    moe = reply.body["moe"]
    assert moe["switches"] == [] and [(a["expert"], a["ok"]) for a in moe["attempts"]] == [("a", True)]
    assert moe["usage"]["completion_tokens"] > 0 or tool  # the usage chunk came before the break
    assert r.servers["b"].requests == []
    assert r.orchestrator.expert_states()["a"]["breaker"]["consecutive_failures"] == 0


async def test_a_finished_stream_that_stalls_as_the_deadline_comes_is_complete() -> None:
    """The finish_reason came 0.3 s before the deadline, then nothing (no [DONE]): the wait for what follows a
    finish ran into the deadline, and the whole answer ended in an all_experts_failed error event, the expert's
    breaker blamed."""
    async with rig(deadline_s=1.0) as live:
        live.servers["a"].default = Behaviour(mode="answer", text="one two three four five six seven",
                                              token_delay_s=0.1, after_finish="stall")
        reply = await live.chat(stream=True)
        assert reply.status == 200 and "error" not in reply.body, reply.body
        assert reply.content == "one two three four five six seven"
        moe = reply.body["moe"]
        assert moe["switches"] == [] and [(a["expert"], a["ok"]) for a in moe["attempts"]] == [("a", True)]
        assert live.servers["b"].requests == []
        assert live.orchestrator.expert_states()["a"]["breaker"]["consecutive_failures"] == 0


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_a_timeout_is_not_retried_into_the_deadline_that_fallback_needs(stream: bool) -> None:
    """Deadline 3 s, timeout 2 s, one retry: after the first timeout a retry could only have the last second,
    on the expert that just failed to answer in time. It used to take it, and the healthy experts were never
    asked (a 503 at the deadline); now fallback asks the next one."""
    async with rig(deadline_s=3.0) as live:
        live.servers["a"].default = FAULTS["hang"]
        reply = await live.chat(stream=stream)
        assert reply.status == 200 and "error" not in reply.body, reply.body
        assert [(a["expert"], a["ok"]) for a in reply.body["moe"]["attempts"]] == [("a", False), ("b", True)]
        assert reply.body["moe"]["retries"] == []
        assert reply.elapsed_s < 3.0


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_every_expert_down_is_a_clear_503_listing_each_cause(r: Rig, stream: bool) -> None:
    r.servers["a"].default = FAULTS["hang"]
    r.servers["b"].default = FAULTS["http_503"]
    r.servers["c"].default = FAULTS["reset"]
    reply = await r.chat(stream=stream)
    assert reply.status == 503
    error = reply.body["error"]
    assert error["code"] == "all_experts_failed"
    assert [c["expert"] for c in error["causes"]] == ["a", "b", "c"]
    assert [c["kind"] for c in error["causes"]] == ["timeout", "server_error", "unavailable"]
    assert within_deadline(reply.elapsed_s)


async def test_a_stream_dying_everywhere_ends_with_an_error_event_listing_each_cause(r: Rig) -> None:
    for server in r.servers.values():
        server.default = FAULTS["die_mid_stream"]
    reply = await r.chat(stream=True)
    assert reply.status == 200  # text had already reached the client when the last expert died
    error = reply.body["error"]
    assert error["code"] == "all_experts_failed"
    assert [(c["expert"], c["kind"]) for c in error["causes"]] == [("a", "unavailable"), ("b", "unavailable"),
                                                                  ("c", "unavailable")]


async def test_open_breakers_are_causes_and_no_expert_is_called(r: Rig) -> None:
    for server in r.servers.values():
        server.default = FAULTS["http_500"]
    for _ in range(3):
        assert (await r.chat()).status == 503
    calls = sum(len(s.requests) for s in r.servers.values())
    reply = await r.chat()
    assert reply.status == 503
    assert {c["kind"] for c in reply.body["error"]["causes"]} == {"circuit_open"}
    assert sum(len(s.requests) for s in r.servers.values()) == calls


async def test_breaker_opens_then_a_probe_closes_it(r: Rig) -> None:
    a = r.servers["a"]
    a.default = FAULTS["http_500"]
    for _ in range(3):
        assert (await r.chat()).status == 200
    assert r.orchestrator.expert_states()["a"]["breaker"]["state"] == "open"
    seen = len(a.requests)
    assert (await r.chat()).body["model"] == "b"
    assert len(a.requests) == seen  # not called while open
    a.default = Behaviour.ok("answer from a")
    await asyncio.sleep(0.55)  # the 0.5 s cooldown
    assert (await r.chat()).body["model"] == "a"  # the half-open probe
    assert r.orchestrator.expert_states()["a"]["breaker"]["state"] == "closed"


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_is_honoured_on_the_same_expert(r: Rig, status: int) -> None:
    r.servers["a"].push(Behaviour.error(status, "slow down", retry_after="0.3"))
    reply = await r.chat()
    assert reply.body["model"] == "a"
    assert reply.elapsed_s >= 0.3
    assert [(x["expert"], x["ok"]) for x in reply.body["moe"]["attempts"]] == [("a", False), ("a", True)]


async def test_a_retry_after_keeps_later_requests_off_the_expert_until_it_ends(r: Rig) -> None:
    """A Retry-After longer than the retry cap (0.5 s) is not waited for: the request falls back, and the next
    ones do not call the rate-limited expert before the time it gave; then it answers again."""
    a = r.servers["a"]
    a.push(Behaviour.error(429, "slow down", retry_after="1"))
    assert (await r.chat()).body["model"] == "b"
    seen = len(a.requests)
    assert (await r.chat()).body["model"] == "b"
    assert len(a.requests) == seen
    assert r.orchestrator.expert_states()["a"]["breaker"]["held_by_retry_after"] is True
    await asyncio.sleep(1.05)
    assert (await r.chat()).body["model"] == "a"
    assert r.orchestrator.expert_states()["a"]["breaker"]["state"] == "closed"


async def test_a_bad_request_is_not_retried(r: Rig) -> None:
    r.servers["a"].push(Behaviour.error(400, "bad request"))
    reply = await r.chat()
    assert reply.body["model"] == "b"
    assert len(r.servers["a"].requests) == 1


async def test_bounded_load_with_faults(r: Rig) -> None:
    # Short and lighter than bench/faults.py's run, so it holds next to the rest of the suite on a small CI box.
    # Memory over the run is a figure, not a behaviour: bench/faults.py measures it and `make faults` holds it.
    stats = await load(r, clients=64, seconds=6.0, think_s=(0.75, 1.5), min_per_client=3)
    assert stats.unexpected == [], stats.unexpected[:3]
    assert stats.answered == stats.requests >= 64 * 3
    assert stats.max_overrun_ms <= MARGIN_S * 1000.0
    assert all(v == 0 for v in r.orchestrator.capacity.in_flight.values())


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_the_overall_deadline_cuts_a_request_short(stream: bool) -> None:
    """With a deadline shorter than one expert's own timeout, a hanging expert is cut off at the deadline: the
    client gets a 503 within the deadline plus the margin, naming the deadline, not a timeout 2 s later."""
    before = len(asyncio.all_tasks())
    deadline_s = 0.8
    async with rig(deadline_s=deadline_s) as live:
        for server in live.servers.values():
            server.default = FAULTS["hang"]
        reply = await live.chat(stream=stream)
        assert reply.status == 503
        error = reply.body["error"]
        assert error["code"] == "all_experts_failed"
        assert "deadline of 0.8s" in error["message"], error["message"]
        assert reply.elapsed_s <= deadline_s + MARGIN_S, reply.elapsed_s
        assert reply.elapsed_s >= deadline_s - 0.05  # it was the deadline that stopped it, not an early failure
        assert {c["expert"] for c in error["causes"]} == set(live.servers)  # tried or listed as not tried
    leaks = await count_leaks(live, before)
    assert (leaks.tasks, leaks.connections) == (0, 0)
