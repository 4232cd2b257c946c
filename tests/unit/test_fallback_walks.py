"""A plain request and a stream that fail over the same way walk the gate's ranking the same way: the same experts
called in the same order, the same causes, and the same ``fallback_for`` in the trace. (A plain request calls a
top-k panel at once and a stream one expert at a time, so a panel of two differs there by design.)"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from experts.errors import ExpertUnavailable
from experts.types import ChatMessage, ChatRequest
from router.breaker import BreakerState
from router.config import RouterConfig, parse_config
from router.fallback import AllExpertsFailed, CallScope
from router.orchestrator import Orchestrator, StreamEnd
from tests.doubles.fakes import FakeExpert, FakeGate

NAMES = ["a", "b", "c", "d"]
SCORES = [0.4, 0.3, 0.2, 0.1]  # the ranking: a, b, c, d


def _config(**overrides: Any) -> RouterConfig:
    experts = [{"name": n, "type": "replay", "model": n, "timeout_s": 1.0,
                "replay": {"source": "routerbench", "path": "unused"}} for n in NAMES]
    return parse_config({"version": 1, "experts": experts, **overrides}, check_env=False)


class _SlowGate(FakeGate):
    """A test double: a gate that takes 50 ms to decide (behind other queries in its batch, say)."""

    def predict_proba(self, embeddings: np.ndarray, texts: Any = None) -> np.ndarray:
        time.sleep(0.05)
        return super().predict_proba(embeddings, texts)


def _orchestrator(config: RouterConfig, gate: FakeGate | None = None) -> Orchestrator:
    down = {n: FakeExpert(config.expert(n), fail=lambda name: ExpertUnavailable(name, "connection refused"))
            for n in NAMES}
    return Orchestrator(config, gate or FakeGate(NAMES, {}, default=SCORES), down)


async def _failure(orchestrator: Orchestrator, stream: bool, caller: CallScope | None = None) -> AllExpertsFailed:
    request = ChatRequest(model="auto", messages=[ChatMessage(role="user", content="hello")], stream=stream)
    try:
        if stream:
            async for event in orchestrator.stream(request, caller=caller):
                assert not isinstance(event, StreamEnd)
        else:
            await orchestrator.complete(request, caller=caller)
    except AllExpertsFailed as exc:
        return exc
    raise AssertionError("every expert is down, yet the request was answered")


def _walk(exc: AllExpertsFailed) -> dict[str, Any]:
    return {"causes": [(c.expert, c.kind) for c in exc.causes],
            "attempts": [(a.expert, (a.error or {}).get("kind"), a.fallback_for) for a in exc.trace.attempts]}


async def test_a_deadline_spent_before_the_first_call_reads_as_a_timeout_plain_or_streamed() -> None:
    """The caller (an outer router, a client's x-moe-deadline-s) left 10 ms and the gate took 50: a plain
    request still called its first expert, whose call failed as a timeout, while a stream listed every expert
    as not tried. As a nested router, one reached the outer level as a timeout and the other as a 503, which
    its breaker counted against it."""
    plain, streamed = [await _failure(_orchestrator(_config(), _SlowGate(NAMES, {}, default=SCORES)), stream,
                                      CallScope(until=time.monotonic() + 0.01)) for stream in (False, True)]
    for exc in (plain, streamed):
        assert _walk(exc)["causes"] == [("a", "timeout"), ("b", "not_tried"), ("c", "not_tried"), ("d", "not_tried")]
        assert exc.timed_out  # what RouterExpert._failure hands the outer level as a timeout
    assert _walk(plain)["attempts"] == _walk(streamed)["attempts"] == [("a", "timeout", None)]


async def test_every_breaker_open_names_the_first_in_line_as_the_one_replaced() -> None:
    """Every expert passed over without a call: each after the first replaces the first in line
    (``fallback_for``), in a plain request as in a stream and as with fallback off."""
    walks = []
    for stream in (False, True):
        orchestrator = _orchestrator(_config())
        for n in NAMES:
            orchestrator.breakers.store.save(n, BreakerState(state="open", trips=1, opened_at=time.monotonic(),
                                                             cooldown_s=30.0, last_error="unavailable"))
        walks.append(_walk(await _failure(orchestrator, stream)))
    plain, streamed = walks
    assert plain == streamed
    assert plain["attempts"] == [(n, "circuit_open", None if n == "a" else "a") for n in NAMES]


async def test_a_panel_s_saturated_member_is_not_named_as_the_one_a_fallback_replaced() -> None:
    """A panel of two: ``a`` at its in-flight limit (passed over, never called), ``b`` called and failed. The
    first fallback replaces ``b``, the member whose call failed, not ``a``."""
    orchestrator = _orchestrator(_config(gate={"top_k": {"policy": "fixed", "k": 2}}))
    orchestrator.capacity.in_flight["a"] = orchestrator.capacity.limit("a")
    assert _walk(await _failure(orchestrator, stream=False))["attempts"] == [
        ("a", "overloaded", None), ("b", "unavailable", None), ("c", "unavailable", "b"), ("d", "unavailable", "c")]
