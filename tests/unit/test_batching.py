"""Micro-batching of the gate: concurrent decisions share encoder calls and match sequential ones."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Sequence

import numpy as np

from experts.types import ChatMessage, ChatRequest
from router.batching import GateBatcher
from router.orchestrator import Orchestrator
from tests.doubles.fakes import FakeExpert, FakeGate, fake_config

NAMES = ["math", "code", "law"]
TEXTS = [f"{topic} question {i}" for i in range(12) for topic in ("integral", "python", "contract")]


class FakeCountingEncoder:
    """Embeds a text as itself (as the fake gate expects), counting calls; each call takes ``delay`` s so
    concurrent requests pile up behind it."""

    def __init__(self, delay: float = 0.005) -> None:
        self.calls: list[int] = []
        self.delay = delay

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(len(texts))
        time.sleep(self.delay)
        return np.asarray(list(texts), dtype=object)


def build(**gate: object) -> tuple[Orchestrator, FakeCountingEncoder]:
    config = fake_config(NAMES, gate=gate) if gate else fake_config(NAMES)
    fake = FakeGate(NAMES, {"integral": [0.7, 0.2, 0.1], "python": [0.15, 0.8, 0.05]}, default=[0.2, 0.2, 0.6])
    encoder = FakeCountingEncoder()
    fake.encoder = encoder  # type: ignore[assignment]
    return Orchestrator(config, fake, {n: FakeExpert(config.expert(n)) for n in NAMES}), encoder


def ask(text: str) -> ChatRequest:
    return ChatRequest(model="auto", messages=[ChatMessage(role="user", content=text)])


def gate_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("moe-gate")]


async def test_concurrent_decisions_match_sequential_ones_in_few_encoder_calls() -> None:
    orch, encoder = build(max_batch=32)
    sequential = [orch.decide_sync(t) for t in TEXTS]
    encoder.calls.clear()
    concurrent = await asyncio.gather(*(orch.decide(ask(t)) for t in TEXTS))
    for seq, con in zip(sequential, concurrent, strict=True):
        assert con.scores == seq.scores
        assert con.chosen == seq.chosen
        assert con.nearest == seq.nearest
    assert sum(encoder.calls) == len(TEXTS)
    assert len(encoder.calls) <= 3  # 36 queries, max_batch 32: a batch of 32 and what is left
    assert max(encoder.calls) == 32
    await orch.aclose()


async def test_queries_arriving_while_the_worker_is_busy_form_the_next_batch() -> None:
    orch, encoder = build(batch_window_ms=0.0, max_batch=64)
    held = threading.Event()
    encode = encoder.encode

    def first_held(texts: Sequence[str]) -> np.ndarray:
        if not encoder.calls:
            held.wait(timeout=10)  # the worker stays busy until the rest have queued, however loaded the machine
        return encode(texts)

    encoder.encode = first_held  # type: ignore[method-assign]
    first = asyncio.ensure_future(orch.decide(ask("solve this integral")))  # goes alone, at once
    await asyncio.sleep(0)
    rest_task = asyncio.gather(*(orch.decide(ask(t)) for t in TEXTS[:10]))
    await asyncio.sleep(0.05)  # all ten are queued behind the busy worker
    held.set()
    rest = await rest_task
    await first
    assert encoder.calls == [1, 10]
    assert [d.chosen[0].expert for d in rest[:3]] == ["math", "code", "law"]
    await orch.aclose()


async def test_aclose_leaves_no_thread_or_task_behind() -> None:
    before = asyncio.all_tasks()
    # Only this test's workers count: an earlier test that left an orchestrator open must not fail this one.
    earlier = set(gate_threads())
    orch, _ = build()
    await asyncio.gather(*(orch.decide(ask(t)) for t in TEXTS))
    assert set(gate_threads()) - earlier
    await orch.aclose()
    assert not set(gate_threads()) - earlier
    assert asyncio.all_tasks() == before
    # A later decision reopens a worker, as the experts' pools reopen, and closing again leaves nothing.
    decision = await orch.decide(ask("later"))
    assert decision.ranking
    await orch.aclose()
    assert not set(gate_threads()) - earlier


async def test_a_failing_batch_fails_each_caller_and_a_cancelled_one_is_skipped() -> None:
    seen: list[list[str]] = []

    def work(texts: list[str]) -> list[str]:
        seen.append(list(texts))
        if "boom" in texts:
            raise RuntimeError("encoder down")
        return [t.upper() for t in texts]

    batcher: GateBatcher[str] = GateBatcher(work, window_ms=5.0)
    results = await asyncio.gather(batcher.submit("a"), batcher.submit("boom"), return_exceptions=True)
    assert [type(r) for r in results] == [RuntimeError, RuntimeError]
    gone = asyncio.ensure_future(batcher.submit("gone"))
    kept = asyncio.ensure_future(batcher.submit("kept"))
    await asyncio.sleep(0)
    gone.cancel()
    assert await kept == "KEPT"
    assert seen == [["a", "boom"], ["kept"]]  # the cancelled caller's text never reached the encoder
    assert batcher.batches == 2
    await batcher.aclose()


def test_callers_on_two_event_loops_at_once_are_each_answered_on_their_own_loop() -> None:
    """``asyncio.run`` in two threads at once (a LocalRouter driven from two threads): one batch could hold both
    loops' futures, resolved on whichever loop flushed it, and a loop that had closed left the batcher busy
    forever. Each loop now has its own queue."""
    def work(texts: list[str]) -> list[str]:
        time.sleep(0.05)  # long enough that the two loops' queries overlap
        return [t.upper() for t in texts]

    batcher: GateBatcher[str] = GateBatcher(work, window_ms=5.0)
    answers: dict[str, object] = {}

    def run(name: str) -> None:
        async def many() -> list[str]:
            return list(await asyncio.gather(*(batcher.submit(f"{name} {i}") for i in range(5))))
        answers[name] = asyncio.run(asyncio.wait_for(many(), timeout=10))

    threads = [threading.Thread(target=run, args=(n,)) for n in ("left", "right")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert answers == {n: [f"{n.upper()} {i}" for i in range(5)] for n in ("left", "right")}


def test_a_loop_that_closes_before_its_batch_returns_does_not_stall_the_others() -> None:
    release = threading.Event()

    def work(texts: list[str]) -> list[str]:
        if "early" in texts[0]:
            release.wait(timeout=10)  # held until the first loop has gone
        return texts

    batcher: GateBatcher[str] = GateBatcher(work, window_ms=0.0)

    async def gives_up() -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(batcher.submit("early"), timeout=0.05)

    asyncio.run(gives_up())  # its loop is closed now, its batch still out
    release.set()
    assert asyncio.run(asyncio.wait_for(batcher.submit("later"), timeout=10)) == "later"
    assert asyncio.run(asyncio.wait_for(batcher.submit("again"), timeout=10)) == "again"


def test_a_close_from_one_loop_leaves_another_loops_queued_query_answered() -> None:
    """Loop B has a batch out and a query queued behind it when loop A closes the batcher: B's next batch goes to a
    fresh worker (it was submitted to the one being shut down, raised in a loop callback, and B's queue stayed
    busy: that query, and every later one on B, went unanswered)."""
    release, running, queued = threading.Event(), threading.Event(), threading.Event()

    def work(texts: list[str]) -> list[str]:
        if "first" in texts[0]:
            running.set()
            release.wait(timeout=10)
        return [t.upper() for t in texts]

    batcher: GateBatcher[str] = GateBatcher(work, window_ms=0.0)
    answers: list[str] = []

    def on_b() -> None:
        async def two() -> None:
            first = asyncio.ensure_future(batcher.submit("first"))
            await asyncio.sleep(0.05)  # the first batch is out; the second query queues behind it
            second = asyncio.ensure_future(batcher.submit("second"))
            await asyncio.sleep(0.05)
            queued.set()
            answers.extend(await asyncio.wait_for(asyncio.gather(first, second), timeout=10))
            answers.append(await asyncio.wait_for(batcher.submit("third"), timeout=10))
        asyncio.run(two())

    b = threading.Thread(target=on_b)
    b.start()
    assert running.wait(timeout=10) and queued.wait(timeout=10)

    async def close_on_a() -> None:
        closing = asyncio.ensure_future(batcher.aclose())
        await asyncio.sleep(0.1)  # A has marked the batcher closed and waits for the worker to finish
        release.set()
        await asyncio.wait_for(closing, timeout=10)

    asyncio.run(close_on_a())
    b.join(timeout=20)
    assert answers == ["FIRST", "SECOND", "THIRD"]
