"""Retries, circuit breakers, the cost budget and expert-choice batches, through the orchestrator with fakes."""

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence

import pytest

from experts.errors import ExpertError, ExpertRateLimited, ExpertRejected, ExpertServerError, ExpertUnavailable
from experts.types import ChatMessage, ChatRequest, ExpertReply, StreamDelta
from router.config import parse_config
from router.decide import BATCH_CHUNK
from router.fallback import AllExpertsFailed
from router.gate import Assessment
from router.orchestrator import Orchestrator, StreamEnd, StreamPiece
from router.retry import RETRY_AFTER_SLACK_S
from tests.doubles.fakes import FakeClock, FakeExpert, FakeGate, FakeRefusalThenDies, FakeToolCallThenDies

NAMES = ["math", "code", "law"]


class FakeFlakyExpert(FakeExpert):
    """A fake that raises the queued errors first, one per call, then answers."""

    def __init__(self, *args: object, errors: list[ExpertError], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.errors = errors
        self.calls = 0

    async def generate(self, request: ChatRequest) -> ExpertReply:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return await super().generate(request)

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamDelta]:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        async for delta in super().stream(request):
            yield delta


def ask(text: str = "an integral", model: str = "auto", **fields: object) -> ChatRequest:
    return ChatRequest(model=model, messages=[ChatMessage(role="user", content=text)], **fields)  # type: ignore[arg-type]


def build(experts: dict[str, FakeExpert] | None = None, *, fallback: dict[str, object] | None = None,
          costs: dict[str, float] | None = None, **overrides: object) -> tuple[Orchestrator, list[float]]:
    config = parse_config({"version": 1, "fallback": fallback or {}, **overrides, "experts": [
        {"name": n, "type": "replay", "model": n, "timeout_s": 1.0, "replay": {"source": "routerbench", "path": "x"},
         "cost": {"input_per_1k": (costs or {}).get(n, 0.0)}} for n in NAMES]}, check_env=False)
    built: dict[str, FakeExpert] = {n: FakeExpert(config.expert(n)) for n in NAMES}
    for name, expert in (experts or {}).items():
        expert.config = config.expert(name)
        built[name] = expert
    gate = FakeGate(NAMES, {"integral": [0.7, 0.2, 0.1]}, default=[0.2, 0.2, 0.6])
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    return Orchestrator(config, gate, built, sleep=sleep, rand=lambda: 0.5), slept


def flaky(name: str, *errors: ExpertError) -> FakeFlakyExpert:
    base = build()[0].config.expert(name)
    return FakeFlakyExpert(base, errors=list(errors))


async def test_transient_failures_are_retried_with_backoff_on_the_same_expert() -> None:
    math = flaky("math", ExpertUnavailable("math", "reset"), ExpertServerError("math", 502, "bad gateway"))
    orch, slept = build({"math": math}, fallback={"retries": 2, "backoff_base_s": 0.1})
    answer = await orch.complete(ask())
    assert answer.expert == "math" and math.calls == 3
    assert slept == pytest.approx([0.075, 0.15])  # base * 2**n, equal jitter at rand=0.5
    assert [(a.expert, a.ok) for a in answer.trace.attempts] == [("math", False), ("math", False), ("math", True)]


def clocked(orch: Orchestrator, slept: list[float]) -> FakeClock:
    """Tie ``orch``'s breakers to a fake clock that each fake sleep moves on."""
    clock = FakeClock()
    orch.breakers.clock = clock
    sleep = orch.dispatch.sleep

    async def sleeping(seconds: float) -> None:
        clock.now += seconds
        await sleep(seconds)

    orch.dispatch.sleep = sleeping
    return clock


async def test_retry_after_is_honoured() -> None:
    math = flaky("math", ExpertRateLimited("math", 429, "slow down", retry_after_s=1.5))
    orch, slept = build({"math": math}, fallback={"retries": 1})
    clocked(orch, slept)
    assert (await orch.complete(ask())).expert == "math"
    assert slept == [1.5 + RETRY_AFTER_SLACK_S]  # and a little more: see the next test
    assert orch.breakers.snapshot("math")["state"] == "closed"  # the retry was the probe, and it answered


@pytest.mark.parametrize("stream", [False, True])
async def test_a_wait_that_ends_a_little_early_still_retries_after_a_retry_after(stream: bool) -> None:
    """uvloop's timers count whole milliseconds from the loop iteration's start, so a wait can end 1-2 ms short
    by the clock the breaker reads; the breaker holds the expert for exactly the Retry-After, and refused the
    retry (1 in 5 streamed requests over HTTP), which fell to another expert or failed the request."""
    math = flaky("math", ExpertRateLimited("math", 429, "slow down", retry_after_s=1.0))
    orch, slept = build({"math": math}, fallback={"retries": 1})
    clock = clocked(orch, slept)
    sleep = orch.dispatch.sleep

    async def early(seconds: float) -> None:  # the wait, ending 2 ms short by the breaker's clock
        await sleep(seconds - 0.002)

    orch.dispatch.sleep = early
    before = clock.now
    if stream:
        events = [e async for e in orch.stream(ask(model="math"))]
        end = events[-1]
        assert isinstance(end, StreamEnd) and end.trace.answered_by == "math"
    else:
        assert (await orch.complete(ask(model="math"))).expert == "math"
    assert math.calls == 2 and clock.now - before >= 1.0
    assert orch.breakers.snapshot("math")["state"] == "closed"


async def test_a_retry_after_keeps_every_request_off_the_expert_until_it_ends() -> None:
    """Without retries (the default), a 429's Retry-After still holds: the next requests go to the next-ranked
    expert without calling the rate-limited one, which is called again (as a probe) once the wait is over."""
    math = flaky("math", ExpertRateLimited("math", 429, "slow down", retry_after_s=1.5))
    orch, slept = build({"math": math})
    clock = clocked(orch, slept)
    first = await orch.complete(ask())
    assert (first.expert, math.calls) == ("code", 1)
    snap = orch.breakers.snapshot("math")
    assert (snap["state"], snap["retry_in_s"], snap["held_by_retry_after"], snap["trips"]) == ("open", 1.5, True, 0)
    clock.now += 1.0
    assert ((await orch.complete(ask())).expert, math.calls) == ("code", 1)  # not called: the wait is not over
    clock.now += 0.5
    assert ((await orch.complete(ask())).expert, math.calls) == ("math", 2)
    assert orch.breakers.snapshot("math")["state"] == "closed"


async def test_retry_after_can_be_left_to_the_failure_count() -> None:
    math = flaky("math", ExpertRateLimited("math", 429, "a", retry_after_s=1.5),
                 ExpertRateLimited("math", 429, "b", retry_after_s=1.5))
    orch, slept = build({"math": math}, fallback={"breaker": {"honour_retry_after": False}})
    clocked(orch, slept)
    assert ((await orch.complete(ask())).expert, math.calls) == ("code", 1)
    assert ((await orch.complete(ask())).expert, math.calls) == ("code", 2)  # called again at once
    assert orch.breakers.snapshot("math")["state"] == "closed"  # 2 of failure_threshold's 5


async def test_when_every_candidate_waits_the_error_says_until_when() -> None:
    waits = {"math": 4.0, "code": 2.5, "law": 9.0}
    experts = {n: flaky(n, ExpertRateLimited(n, 429, "slow down", retry_after_s=w)) for n, w in waits.items()}
    orch, slept = build(experts)  # type: ignore[arg-type]
    clock = clocked(orch, slept)
    with pytest.raises(AllExpertsFailed) as first:
        await orch.complete(ask())
    assert first.value.retry_after_s == 2.5  # the soonest any of them said
    clock.now += 1.0
    with pytest.raises(AllExpertsFailed) as second:
        await orch.complete(ask())
    assert [c.kind for c in second.value.causes] == ["circuit_open"] * 3
    assert "the expert asked to wait (Retry-After; last: rate_limited)" in str(second.value)
    assert second.value.retry_after_s == pytest.approx(1.5)


async def test_a_4xx_is_never_retried_and_falls_back() -> None:
    math = flaky("math", ExpertRejected("math", 400, "bad request"), ExpertRejected("math", 400, "again"))
    orch, slept = build({"math": math}, fallback={"retries": 3})
    answer = await orch.complete(ask())
    assert (answer.expert, math.calls, slept) == ("code", 1, [])


async def test_open_breaker_leaves_the_panel_and_is_a_cause_when_all_are_down() -> None:
    down = {n: FakeExpert(build()[0].config.expert(n), fail=lambda n: ExpertServerError(n, 503, "down"))
            for n in NAMES}
    orch, _ = build(down, fallback={"max_attempts": 3, "breaker": {"failure_threshold": 2}})
    for _ in range(2):
        with pytest.raises(AllExpertsFailed):
            await orch.complete(ask())
    assert {n: s["breaker"]["state"] for n, s in orch.expert_states().items()} == dict.fromkeys(NAMES, "open")
    calls = sum(len(e.requests) for e in down.values())
    with pytest.raises(AllExpertsFailed) as info:
        await orch.complete(ask())
    assert sum(len(e.requests) for e in down.values()) == calls  # no expert was called
    assert [(c["expert"], c["kind"]) for c in info.value.to_list()] == [
        ("math", "circuit_open"), ("code", "circuit_open"), ("law", "circuit_open")]
    assert "next probe in" in info.value.causes[0].message


async def test_an_open_expert_is_skipped_and_the_next_answers() -> None:
    math = FakeExpert(build()[0].config.expert("math"), fail=lambda n: ExpertUnavailable(n, "refused"))
    orch, _ = build({"math": math}, fallback={"breaker": {"failure_threshold": 1}})
    first = await orch.complete(ask())
    assert [(a.expert, a.ok) for a in first.trace.attempts] == [("math", False), ("code", True)]
    second = await orch.complete(ask())
    assert second.trace.decision is not None
    assert [c.expert for c in second.trace.decision.chosen] == ["code"]  # math left out of the panel
    assert [(a.expert, a.ok) for a in second.trace.attempts] == [("code", True)]
    assert len(math.requests) == 1


async def test_retries_stop_when_the_breaker_opens() -> None:
    math = FakeExpert(build()[0].config.expert("math"), fail=lambda n: ExpertUnavailable(n, "refused"))
    orch, slept = build({"math": math}, fallback={"retries": 5, "breaker": {"failure_threshold": 2}})
    answer = await orch.complete(ask())
    assert answer.expert == "code"
    assert len(math.requests) == 2 and len(slept) == 1


async def test_budget_stops_further_experts_with_a_clear_cause() -> None:
    math = FakeExpert(build()[0].config.expert("math"), fail=lambda n: ExpertUnavailable(n, "refused"))
    orch, _ = build({"math": math}, fallback={"cost_budget_usd": 0.001}, costs={"code": 1000.0, "law": 1000.0})
    with pytest.raises(AllExpertsFailed, match="no expert answered within the request's cost budget") as info:
        await orch.complete(ask("solve this integral please"))
    assert [(c["expert"], c["kind"]) for c in info.value.to_list()] == [
        ("math", "unavailable"), ("code", "budget_exhausted"), ("law", "budget_exhausted")]
    # a cheap next expert fits in the same budget
    cheap, _ = build({"math": math}, fallback={"cost_budget_usd": 0.001})
    assert (await cheap.complete(ask("an integral"))).expert == "code"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_a_candidate_over_budget_is_passed_over_for_a_cheaper_one_further_down(stream: bool) -> None:
    """code would not fit in the budget, but law, ranked after it, does: fallback goes on to law."""
    math = FakeExpert(build()[0].config.expert("math"), fail=lambda n: ExpertUnavailable(n, "refused"))
    orch, _ = build({"math": math}, fallback={"cost_budget_usd": 0.001}, costs={"code": 1000.0})
    if stream:
        _, end = await collect(orch, ask())
        trace = end.trace
    else:
        answer = await orch.complete(ask())
        assert answer.expert == "law"
        trace = answer.trace
    assert [(a.expert, (a.error or {}).get("kind")) for a in trace.attempts] == [
        ("math", "unavailable"), ("code", "budget_exhausted"), ("law", None)]


async def test_budget_counts_max_tokens_at_the_output_price() -> None:
    math = FakeExpert(build()[0].config.expert("math"), fail=lambda n: ExpertUnavailable(n, "refused"))
    orch, _ = build({"math": math}, fallback={"cost_budget_usd": 0.01})
    orch.experts["code"].config = orch.config.expert("code").model_copy(
        update={"cost": orch.config.expert("code").cost.model_copy(update={"output_per_1k": 1.0})})
    assert (await orch.complete(ask(max_tokens=5))).expert == "code"
    # 500 tokens at code's output price would not fit: law (free) answers, and the trace says code was passed over.
    answer = await orch.complete(ask(max_tokens=500))
    assert [(a.expert, (a.error or {}).get("kind")) for a in answer.trace.attempts] == [
        ("math", "unavailable"), ("code", "budget_exhausted"), ("law", None)]


async def test_without_max_tokens_the_budget_prices_an_expert_s_typical_answer() -> None:
    """A request that sets no max_tokens: code's answer is priced at 256 tokens (no answers seen yet) until it
    has answered, then at its own answers' running mean (5 tokens here)."""
    from router.dispatch import PRIOR_COMPLETION_TOKENS

    math = FakeExpert(build()[0].config.expert("math"), fail=lambda n: ExpertUnavailable(n, "refused"))
    orch, _ = build({"math": math}, fallback={"cost_budget_usd": 0.1})
    orch.experts["code"].config = orch.config.expert("code").model_copy(
        update={"cost": orch.config.expert("code").cost.model_copy(update={"output_per_1k": 1.0})})
    assert orch.dispatch.typical_completion("code") == PRIOR_COMPLETION_TOKENS
    first = await orch.complete(ask())  # 256 tokens at $1/1k: $0.256, over the budget
    assert [(a.expert, (a.error or {}).get("kind")) for a in first.trace.attempts] == [
        ("math", "unavailable"), ("code", "budget_exhausted"), ("law", None)]
    assert (await orch.complete(ask("anything", model="code"))).expert == "code"  # named: no budget check
    assert orch.dispatch.typical_completion("code") == 5
    assert (await orch.complete(ask())).expert == "code"  # 5 tokens: $0.005, it fits


async def collect(orch: Orchestrator, request: ChatRequest) -> tuple[str, StreamEnd]:
    text, end = [], None
    async for event in orch.stream(request):
        if isinstance(event, StreamPiece):
            text.append(event.delta.content)
        else:
            end = event
    assert end is not None
    return "".join(text), end


async def test_stream_retries_before_the_first_token_and_feeds_the_breaker() -> None:
    math = flaky("math", ExpertServerError("math", 503, "busy"))
    math.pieces = ["a ", "b"]
    orch, slept = build({"math": math}, fallback={"retries": 1})
    text, end = await collect(orch, ask())
    assert text == "a b" and len(slept) == 1
    assert [(a.expert, a.ok) for a in end.trace.attempts] == [("math", False), ("math", True)]
    assert orch.expert_states()["math"]["breaker"]["consecutive_failures"] == 0


def _held_gate(orch: Orchestrator) -> tuple[list[tuple[str, int]], threading.Event, threading.Event]:
    """The orchestrator's gate made to hold each assessment until ``release`` is set: each one's thread and size go
    into the list, and ``entered`` is set once one has begun."""
    gate = orch.decider.gate
    seen: list[tuple[str, int]] = []
    entered, release = threading.Event(), threading.Event()
    assess = gate.assess

    def held(texts: Sequence[str], k: int = 3) -> Assessment:
        seen.append((threading.current_thread().name, len(texts)))
        entered.set()
        release.wait(5)
        return assess(texts, k)

    gate.assess = held  # type: ignore[method-assign]
    return seen, entered, release


async def test_a_batch_is_assessed_in_chunks_on_its_own_thread_and_stops_when_its_caller_leaves() -> None:
    """Batches run on a thread of their own, not the default threads every answer needs (remembering it for
    feedback: twelve batches of 1024 queries there held a chat answer for 29 s), and a caller that leaves stops
    its batch at the next chunk (one batch went on for 43 CPU-seconds after its client had gone)."""
    orch, _ = build()
    seen, entered, release = _held_gate(orch)
    queries = [f"integral {i}" if i % 3 else f"a contract {i}" for i in range(2 * BATCH_CHUNK + 5)]
    task = asyncio.create_task(orch.assign(queries))
    assert await asyncio.to_thread(entered.wait, 5)
    task.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.05)
    assert seen == [("moe-batch_0", BATCH_CHUNK)]  # the chunk under way finished; no other began
    seen.clear()
    assigned = await orch.assign(queries)
    assert seen == [("moe-batch_0", BATCH_CHUNK), ("moe-batch_0", BATCH_CHUNK), ("moe-batch_0", 5)]
    assert assigned == orch.assign_batch(queries)  # the experts chose over the whole batch, as in one piece
    await orch.aclose()


async def test_a_batch_under_way_when_its_decider_closes_finishes_then_stops_the_thread() -> None:
    """A reload retires the decider (``aclose``) once its requests drained or their time ran out: a batch under
    way finishes whole (it got a bare 500 when the thread's queued chunks were cancelled), and its thread stops
    after it rather than being opened anew."""
    orch, _ = build()
    _, entered, release = _held_gate(orch)
    queries = [f"integral {i}" for i in range(2 * BATCH_CHUNK + 5)]
    task = asyncio.create_task(orch.assign(queries))
    assert await asyncio.to_thread(entered.wait, 5)
    pool = orch.decider._batch_pool
    assert pool is not None
    await orch.decider.aclose()
    release.set()
    assigned = await task
    assert orch.decider._batch_pool is None
    assert assigned == orch.assign_batch(queries)  # whole, and as the batch in one piece
    for thread in list(pool._threads):
        await asyncio.to_thread(thread.join, 5)
        assert not thread.is_alive()


async def test_stream_skips_an_open_breaker() -> None:
    math = FakeExpert(build()[0].config.expert("math"), fail=lambda n: ExpertUnavailable(n, "refused"))
    orch, _ = build({"math": math}, fallback={"breaker": {"failure_threshold": 1}})
    await collect(orch, ask())
    text, end = await collect(orch, ask())
    assert text == "answer from code"
    assert [(a.expert, a.ok) for a in end.trace.attempts] == [("code", True)]
    assert orch.expert_states()["math"]["in_flight"] == 0


async def test_stream_with_all_open_lists_circuit_open_causes() -> None:
    down = {n: FakeExpert(build()[0].config.expert(n), fail=lambda n: ExpertUnavailable(n, "down")) for n in NAMES}
    orch, _ = build(down, fallback={"breaker": {"failure_threshold": 1}})
    with pytest.raises(AllExpertsFailed):
        await collect(orch, ask())
    with pytest.raises(AllExpertsFailed) as info:
        await collect(orch, ask())
    assert {c["kind"] for c in info.value.to_list()} == {"circuit_open"}


def test_assign_batch_respects_capacity_and_open_breakers() -> None:
    orch, _ = build()
    queries = ["integral one", "integral two", "integral three", "a contract"]
    assert orch.assign_batch(queries, {"math": 2, "code": 1, "law": 1}) == ["math", "math", "code", "law"]
    orch.capacity.limits.update({"math": 1, "code": 5, "law": 5})
    assert orch.assign_batch(queries).count("math") == 1
    for _ in range(5):
        orch.breakers.finish(orch.breakers.admit("math"), ExpertUnavailable("math", "down"))
    assert "math" not in orch.assign_batch(queries)
    assert orch.assign_batch([]) == []
    assert asyncio.run(orch.assign(queries)) == orch.assign_batch(queries)  # the same, off the event loop


def test_expert_states_for_the_experts_endpoint() -> None:
    orch, _ = build()
    states = orch.expert_states()
    assert list(states) == NAMES
    assert states["math"]["in_flight"] == 0 and states["math"]["max_concurrency"] == 16
    assert states["math"]["breaker"]["state"] == "closed"


def saturate(orch: Orchestrator, *names: str) -> None:
    """Fill the experts' in-flight limits, as other requests would."""
    for name in names:
        orch.capacity.limits[name] = 1
        orch.capacity.in_flight[name] = 1


async def test_saturated_experts_are_skipped_without_using_up_max_attempts() -> None:
    orch, _ = build(fallback={"max_attempts": 1})
    saturate(orch, "math", "code")
    answer = await orch.complete(ask())
    assert answer.expert == "law"
    assert [(a.expert, a.ok) for a in answer.trace.attempts] == [("math", False), ("code", False), ("law", True)]
    text, end = await collect(orch, ask())
    assert text == "answer from law"
    assert [(a.expert, a.ok) for a in end.trace.attempts] == [("math", False), ("code", False), ("law", True)]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_saturated_experts_are_causes_when_nothing_answers(stream: bool) -> None:
    law = FakeExpert(build()[0].config.expert("law"), fail=lambda n: ExpertUnavailable(n, "refused"))
    orch, _ = build({"law": law}, fallback={"max_attempts": 1})
    saturate(orch, "math", "code")
    with pytest.raises(AllExpertsFailed) as info:
        await (collect(orch, ask()) if stream else orch.complete(ask()))
    assert [(c["expert"], c["kind"]) for c in info.value.to_list()] == [
        ("math", "overloaded"), ("code", "overloaded"), ("law", "unavailable")]
    assert "1 calls already in flight" in info.value.causes[0].message


async def test_the_cost_budget_bounds_a_top_k_panel() -> None:
    experts = {n: FakeExpert(build()[0].config.expert(n), "The answer is (A).") for n in NAMES}
    # "an integral" is estimated at 2 prompt tokens: $2 a call at $1000 per 1k. The top member is always
    # called; code fits next to it ($4), law would not ($6).
    orch, _ = build(experts, fallback={"cost_budget_usd": 4.5}, costs=dict.fromkeys(NAMES, 1000.0),
                    gate={"top_k": {"policy": "fixed", "k": 3}}, combiner={"strategy": "vote"})
    answer = await orch.complete(ask())
    assert [len(e.requests) for e in experts.values()] == [1, 1, 0]
    assert [c.expert for c in answer.trace.contributions] == ["math", "code"]
    left_out = next(a for a in answer.trace.attempts if a.expert == "law")
    assert (left_out.expert, left_out.ok, left_out.error and left_out.error["kind"]) == (
        "law", False, "budget_exhausted")
    assert left_out.error is not None
    assert "$4.000000 reserved for the panel's other members" in left_out.error["message"]


@pytest.mark.parametrize("skipped", ["breaker_open", "fails_first"])
async def test_a_mid_stream_switch_names_the_expert_that_continued(skipped: str) -> None:
    math = FakeExpert(build()[0].config.expert("math"), pieces=["one ", "two ", "three"], fail_after=2,
                      fail=lambda n: ExpertUnavailable(n, "peer closed"))
    law = FakeExpert(build()[0].config.expert("law"), pieces=["three"])
    code = FakeExpert(build()[0].config.expert("code"), fail=lambda n: ExpertServerError(n, 500, "down"))
    orch, _ = build({"math": math, "code": code, "law": law}, fallback={"breaker": {"failure_threshold": 1}})
    if skipped == "breaker_open":
        orch.breakers.finish(orch.breakers.admit("code"), ExpertServerError("code", 500, "down"))
    text, end = await collect(orch, ask())
    assert text == "one two three"
    assert end.trace.switches == [{"from": "math", "to": "law", "after_chars": 8, "cause": "unavailable"}]
    assert end.trace.summary()["switches"][0]["to"] == "law"  # what the final chunk's moe.switches carries
    # Both experts' text is in the answer: each contributed its share of the characters, and agreed with it.
    assert [(c.expert, round(c.weight, 3), c.agreed) for c in end.trace.contributions] == [
        ("math", round(8 / 13, 3), True), ("law", round(5 / 13, 3), True)]


async def test_a_stream_from_one_expert_credits_it_alone() -> None:
    orch, _ = build()
    _, end = await collect(orch, ask())
    assert [(c.expert, c.weight, c.agreed) for c in end.trace.contributions] == [(end.trace.attempts[-1].expert,
                                                                                  1.0, True)]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_max_attempts_stopping_fallback_lists_the_untried_and_says_why(stream: bool) -> None:
    down = {n: FakeExpert(build()[0].config.expert(n), fail=lambda n: ExpertUnavailable(n, "refused"))
            for n in ("math", "code")}
    orch, _ = build(down, fallback={"max_attempts": 2})
    with pytest.raises(AllExpertsFailed, match=r"fallback stopped after max_attempts \(2\) experts failed") as info:
        await (collect(orch, ask()) if stream else orch.complete(ask()))
    assert [(c["expert"], c["kind"], c["message"]) for c in info.value.to_list()] == [
        ("math", "unavailable", "refused"), ("code", "unavailable", "refused"),
        ("law", "not_tried", "not tried: max_attempts 2 used")]


class FakeTrickleExpert(FakeExpert):
    """Streams a piece every 0.1 s, for longer than any deadline here."""

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamDelta]:
        for i in range(100):
            await asyncio.sleep(0.1)
            yield StreamDelta(content=f"t{i} ")


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_the_deadline_stopping_fallback_lists_the_untried_and_says_why(stream: bool) -> None:
    math = FakeTrickleExpert(build()[0].config.expert("math"), delay=5.0)  # plain: no answer within the deadline
    orch, _ = build({"math": math}, fallback={"deadline_s": 0.35})
    with pytest.raises(AllExpertsFailed, match=r"fallback stopped at the request's deadline of 0\.35s") as info:
        await (collect(orch, ask()) if stream else orch.complete(ask()))
    assert [(c["expert"], c["kind"], c["message"]) for c in info.value.to_list()] == [
        ("math", "timeout", "the request's deadline of 0.35s was reached"),
        ("code", "not_tried", "not tried: deadline reached"), ("law", "not_tried", "not tried: deadline reached")]


def _tool_call_id(piece: StreamPiece) -> object:
    return piece.delta.tool_calls and piece.delta.tool_calls[0]["id"]


def _refusal(piece: StreamPiece) -> object:
    return piece.delta.refusal


@pytest.mark.parametrize(("fake", "what", "shown", "sent_once"), [
    (FakeToolCallThenDies, "a tool call", _tool_call_id, "call-1"),
    (FakeRefusalThenDies, "a refusal", _refusal, "I can't help with that. "),
], ids=["tool_call", "refusal"])
async def test_a_stream_that_dies_after_a_tool_call_or_refusal_delta_is_not_continued_or_retried(
        fake: type[FakeExpert], what: str, shown: Callable[[StreamPiece], object], sent_once: str) -> None:
    """Part of a tool call or of a refusal reached the client: another expert cannot finish either (it would start
    a call of its own, or answer after the refusal), and a blind retry would send it twice; the stream ends."""
    math = fake(build()[0].config.expert("math"))
    orch, slept = build({"math": math}, fallback={"retries": 2})
    sent: list[StreamPiece] = []
    with pytest.raises(AllExpertsFailed, match=f"from expert 'math' broke off after part of {what}") as info:
        async for event in orch.stream(ask()):
            assert isinstance(event, StreamPiece)
            sent.append(event)
    assert [shown(p) for p in sent] == [sent_once]  # sent once
    assert len(math.requests) == 1 and slept == []
    assert sum(len(e.requests) for e in orch.experts.values() if isinstance(e, FakeExpert)) == 1
    assert [(c["expert"], c["kind"]) for c in info.value.to_list()] == [("math", "unavailable")]
    trace = getattr(info.value, "trace", None)
    assert trace is not None and trace.switches == []


async def test_an_expert_that_hangs_through_whole_deadlines_opens_its_breaker() -> None:
    """Its timeout_s (1 s) outlasts the request's deadline (0.2 s), so each call is cut by the deadline; it had
    the whole deadline, so the breaker counts it, opens, and the next request goes to the next expert."""
    math = FakeExpert(build()[0].config.expert("math"), delay=5.0)
    orch, _ = build({"math": math}, fallback={"deadline_s": 0.2, "breaker": {"failure_threshold": 2}})
    for _ in range(2):
        with pytest.raises(AllExpertsFailed, match=r"deadline of 0\.2s was reached"):
            await orch.complete(ask())
    assert orch.breakers.snapshot("math")["state"] == "open"
    answer = await orch.complete(ask())
    assert answer.expert == "code"
    assert [(a.expert, (a.error or {}).get("kind")) for a in answer.trace.attempts] == [("code", None)]


async def test_a_fallback_asked_with_little_time_left_is_not_blamed_for_the_deadline() -> None:
    """math fails after 0.25 s of a 0.3 s deadline; code gets the 0.05 s left, under half of what it would have
    had (0.15 s), and runs out: the deadline's fault, not code's."""
    math = FakeExpert(build()[0].config.expert("math"), delay=0.25, fail=lambda n: ExpertUnavailable(n, "reset"))
    code = FakeExpert(build()[0].config.expert("code"), delay=5.0)
    orch, _ = build({"math": math, "code": code}, fallback={"deadline_s": 0.3})
    with pytest.raises(AllExpertsFailed):
        await orch.complete(ask())
    assert orch.breakers.snapshot("math")["consecutive_failures"] == 1
    assert orch.breakers.snapshot("code")["consecutive_failures"] == 0


async def test_a_stream_cut_by_the_deadline_while_writing_is_not_blamed() -> None:
    math = FakeTrickleExpert(build()[0].config.expert("math"))
    orch, _ = build({"math": math}, fallback={"deadline_s": 0.35})
    with pytest.raises(AllExpertsFailed):
        await collect(orch, ask())
    assert orch.breakers.snapshot("math")["consecutive_failures"] == 0


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_a_full_top_expert_hands_its_query_on_within_a_tight_cost_budget(stream: bool) -> None:
    """Every call is estimated over the budget, and the request's first call is free: when the top expert is full,
    the first call is the next one's, not a budget_exhausted 503."""
    orch, _ = build(fallback={"cost_budget_usd": 0.0001}, costs=dict.fromkeys(NAMES, 1.0))
    saturate(orch, "math")
    if stream:
        text, end = await collect(orch, ask())
        assert text == "answer from code"
        trace = end.trace
    else:
        answer = await orch.complete(ask())
        assert answer.expert == "code"
        trace = answer.trace
    assert [(a.expert, a.ok, (a.error or {}).get("kind")) for a in trace.attempts] == [
        ("math", False, "overloaded"), ("code", True, None)]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_with_fallback_off_a_full_expert_still_hands_its_query_on_but_a_failure_ends_it(stream: bool) -> None:
    code = FakeExpert(build()[0].config.expert("code"), fail=lambda n: ExpertUnavailable(n, "refused"))
    for experts, expected in (({}, "code"), ({"code": code}, None)):
        orch, _ = build(experts, fallback={"enabled": False})  # type: ignore[arg-type]
        saturate(orch, "math")
        if expected is not None:
            answered = (await collect(orch, ask()))[0] if stream else (await orch.complete(ask())).content
            assert answered == f"answer from {expected}"
            continue
        with pytest.raises(AllExpertsFailed) as info:
            await (collect(orch, ask()) if stream else orch.complete(ask()))
        # code was called and failed: with fallback off nobody else is called, and law is no cause.
        assert [(c["expert"], c["kind"]) for c in info.value.to_list()] == [
            ("math", "overloaded"), ("code", "unavailable")]
        assert orch.experts["law"].requests == []  # type: ignore[attr-defined]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_a_retry_that_finds_its_expert_full_keeps_the_failed_calls_error(stream: bool) -> None:
    """math fails with a 500 and, while it backs off, another request takes its only slot: its cause is the 500
    it gave, and it counts as tried, so max_attempts 1 calls nobody else."""
    math = flaky("math", ExpertServerError("math", 500, "boom"))
    orch, _ = build({"math": math}, fallback={"retries": 1, "max_attempts": 1})
    orch.capacity.limits["math"] = 1

    async def taken_meanwhile(seconds: float) -> None:
        orch.capacity.in_flight["math"] = 1  # as another request's call would

    orch.dispatch.sleep = taken_meanwhile
    with pytest.raises(AllExpertsFailed) as info:
        await (collect(orch, ask()) if stream else orch.complete(ask()))
    assert [(c["expert"], c["kind"]) for c in info.value.to_list()] == [
        ("math", "server_error"), ("code", "not_tried"), ("law", "not_tried")]
    assert math.calls == 1
    assert orch.experts["code"].requests == [] and orch.experts["law"].requests == []  # type: ignore[attr-defined]


def test_assign_batch_leftovers_avoid_open_breakers_and_unnamed_experts_keep_their_slots() -> None:
    orch, _ = build()
    queries = ["integral one", "integral two", "integral three"]
    orch.capacity.limits.update({"math": 5, "code": 5, "law": 5})
    # capacity names math only: code and law keep their free in-flight slots and take the rest
    assert orch.assign_batch(queries, {"math": 1}) == ["math", "code", "code"]
    for _ in range(5):
        orch.breakers.finish(orch.breakers.admit("math"), ExpertUnavailable("math", "down"))
    # nobody has room: the queries go to their best expert whose breaker is closed, not to math
    assert orch.assign_batch(queries, {"code": 0, "law": 0}) == ["code"] * 3
    for name in ("code", "law"):
        for _ in range(5):
            orch.breakers.finish(orch.breakers.admit(name), ExpertUnavailable(name, "down"))
    assert orch.assign_batch(queries) == ["math"] * 3  # every breaker open: each query's own best


@pytest.mark.parametrize(("fields", "continued"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}}, False),
    ({"response_format": {"type": "json_object"}}, False),
    ({"guided_json": {"type": "object"}}, False),  # vLLM's own
    ({"response_format": {"type": "text"}}, True),  # free text: continued as any answer is
])
async def test_a_stream_held_to_a_format_is_not_spliced_from_two_experts(fields: dict[str, object],
                                                                         continued: bool) -> None:
    """Half a JSON object reached the client: the next expert, held to the format too, would write a whole object
    after it, and the client would get invalid JSON reported as a success. The stream ends with an error instead."""
    math = FakeExpert(build()[0].config.expert("math"), pieces=['{"answer": 5, ', '"unit": "kg"}'],
                      fail=lambda n: ExpertUnavailable(n, "reset"), fail_after=1)
    orch, _ = build({"math": math})
    request = ask(**fields)
    if continued:
        text, end = await collect(orch, request)
        assert text.startswith('{"answer": 5, ') and [s["from"] for s in end.trace.switches] == ["math"]
        return
    sent: list[str] = []
    with pytest.raises(AllExpertsFailed, match=r"broke off after part of an answer held to a format"):
        async for event in orch.stream(request):
            if isinstance(event, StreamPiece):
                sent.append(event.delta.content)
    assert sent == ['{"answer": 5, ']
    assert orch.experts["code"].requests == []  # type: ignore[attr-defined]


async def test_a_client_leaving_a_stream_whose_deltas_come_at_once_stops_it() -> None:
    """Each delta of this stream is ready when asked for (an upstream faster than the router): a cancellation (the
    client left) must still end the stream. Python 3.11's asyncio.wait_for dropped a cancellation arriving when
    the awaited step was already done, and the router read the whole answer for nobody."""
    class Instant(FakeExpert):
        """A test double: a stream whose every delta is ready at once, as a fast upstream's buffered ones are."""

        sent = 0

        async def stream(self, request: ChatRequest) -> AsyncIterator[StreamDelta]:
            for _ in range(1_000_000):
                self.sent += 1
                yield StreamDelta(content="x")

    math = Instant(build()[0].config.expert("math"))
    orch, _ = build({"math": math})

    async def read() -> None:
        async for _ in orch.stream(ask()):
            await asyncio.sleep(0)  # the client's side yields to the loop between chunks

    task = asyncio.ensure_future(read())
    await asyncio.sleep(0.05)
    for _ in range(20):  # as a server cancels a request task: once; a few more in case one is dropped
        task.cancel()
        await asyncio.sleep(0)
        if task.done():
            break
    cancels_needed = _ + 1
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert cancels_needed == 1 and math.sent < 1_000_000
    assert orch.expert_states()["math"]["in_flight"] == 0


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_a_time_limit_the_router_enforces_has_its_log_line(stream: bool,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A call cut off by the router's own timer (the expert's timeout_s, or the request's deadline) left no log
    line, where every call that fails on its own has one: 312 timeouts of one expert in a soak, and no line. Its
    own limit is a WARNING naming it; a deadline that cut it short is INFO (the expert was not at fault)."""
    caplog.set_level(logging.INFO, logger="router.dispatch")
    math = FakeExpert(build()[0].config.expert("math"), delay=5.0)  # timeout_s 1 s
    code = FakeExpert(build()[0].config.expert("code"), delay=5.0)
    orch, _ = build({"math": math, "code": code}, fallback={"deadline_s": 1.5})
    with pytest.raises(AllExpertsFailed):
        if stream:
            await collect(orch, ask())
        else:
            await orch.complete(ask())
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "router.dispatch"]
    assert lines == [("WARNING", "expert math: timeout failed: " + lines[0][1].split(": ", 2)[2]),
                     ("INFO", "expert code: timeout failed: the request's deadline of 1.5s was reached")]
    assert "1.0s" in lines[0][1]


def test_a_call_that_exactly_fits_the_budget_left_is_made() -> None:
    """Experts are passed over once the request "would spend more" than ``cost_budget_usd``: one whose estimate
    is exactly what is left still fits."""
    from router.fallback import budget_spent

    assert budget_spent(1.0, 0.5, 0.5) is False
    assert budget_spent(1.0, 0.5, 0.5000001) is True
