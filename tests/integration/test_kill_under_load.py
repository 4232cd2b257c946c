"""A real vLLM server SIGKILLed in the middle of a concurrent load run through the router.

Two real vLLM experts (the session's ``tiny-a`` as "math", and a server this test owns as "space") sit behind
the service, in-process through ``httpx.ASGITransport``. ``CLIENTS`` clients send routed requests back to back
for ``RUN_S`` seconds, half of them on space topics; ``KILL_AT_S`` seconds in, the "space" server's whole
process group is SIGKILLed, as a crash or an OOM kill would take it. Every request must still be answered (the
other expert takes over), none may run past the request deadline by more than ``MARGIN_S``, and the traces of
requests after the kill must show why "math" answered a space question: a failed "space" attempt followed by
"math" falling back for it, or "space" left off the panel by its open circuit breaker.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from router.build import build_orchestrator
from router.config import load_config
from router.service import create_app
from tests.integration.test_router_vllm import MATH, SPACE, write_config
from tests.integration.vllm_server import ServerSpec, VLLMServer

CLIENTS = 16
RUN_S = 13.0
KILL_AT_S = 5.0
DEADLINE_S = 12.0
# Slack over the deadline for what sits around the orchestrator's own deadline (the service, the gate's worker
# thread, the last attempt's cancellation) on two cores shared with three vLLM servers.
MARGIN_S = 1.0


@dataclass
class Sent:
    """One request of the load run, timed from the run's start, as the client saw it."""

    topic: str
    start: float
    end: float
    status: int
    body: dict[str, Any]

    @property
    def trace(self) -> dict[str, Any]:
        return dict(self.body.get("moe") or {})

    @property
    def ranked_first(self) -> str | None:
        decision = self.trace.get("decision") or {}
        ranking = decision.get("ranking") or [None]
        return ranking[0]

    def attempts(self) -> list[tuple[str, bool, str | None, str | None]]:
        return [(a["expert"], a["ok"], (a.get("error") or {}).get("kind"), a.get("fallback_for"))
                for a in self.trace.get("attempts", [])]


async def load_run(http: httpx.AsyncClient, kill: Callable[[], None]) -> tuple[list[Sent], float, float]:
    """``CLIENTS`` clients back to back for ``RUN_S`` s, ``kill`` called at ``KILL_AT_S`` s (in a thread, so the
    load goes on while the process group is taken down). Returns every request and when the kill began and
    ended, all in seconds from the start."""
    start = time.monotonic()
    sent: list[Sent] = []

    async def client(i: int) -> None:
        n = 0
        while time.monotonic() - start < RUN_S:
            topic, questions = ("space", SPACE) if (i + n) % 2 else ("math", MATH)
            body = {"model": "auto", "messages": [{"role": "user", "content": questions[(i + n) % len(questions)]}],
                    "max_tokens": 8, "ignore_eos": True}
            t0 = time.monotonic() - start
            r = await http.post("/v1/chat/completions", json=body)
            sent.append(Sent(topic, t0, time.monotonic() - start, r.status_code, r.json()))
            n += 1

    async def killer() -> tuple[float, float]:
        await asyncio.sleep(KILL_AT_S)
        began = time.monotonic() - start
        await asyncio.to_thread(kill)
        return began, time.monotonic() - start

    *_, (kill_began, kill_done) = await asyncio.gather(*(client(i) for i in range(CLIENTS)), killer())
    return sent, kill_began, kill_done


@pytest.mark.slow
async def test_a_vllm_killed_under_load_hands_its_queries_to_the_other(
        vllm_experts: dict[str, VLLMServer], vllm_server_factory: Callable[[ServerSpec], VLLMServer],
        tmp_path: Path) -> None:
    doomed = vllm_server_factory(ServerSpec("tiny-doomed"))
    config = load_config(write_config(tmp_path / "router.yaml", {
        "space": (doomed, SPACE), "math": (vllm_experts["tiny-a"], MATH)}))
    config = config.model_copy(update={"fallback": config.fallback.model_copy(update={"deadline_s": DEADLINE_S})})
    orchestrator = build_orchestrator(config)
    try:
        transport = httpx.ASGITransport(app=create_app(orchestrator))
        # The client's own timeout only catches a hang: the router must answer well before it.
        async with httpx.AsyncClient(transport=transport, base_url="http://router",
                                     timeout=DEADLINE_S + 30) as http:
            # The kill returns once the group is signalled and the API server reaped, as a crash would leave it;
            # the rest of the group may take seconds to be torn down, and the load run must not wait on that.
            sent, kill_began, kill_done = await load_run(http, lambda: doomed.kill(wait=False))
    finally:
        await orchestrator.aclose()
    doomed.wait_gone()  # raises, with each process's state, if any of the group outlives SIGKILL
    assert not doomed.is_alive() and not doomed.group_pids()

    latencies = [s.end - s.start for s in sent]
    fell_back = [s for s in sent if ("math", True, None, "space") in s.attempts()]
    after = [s for s in sent if s.start >= kill_done]
    print(f"\nkill under load: {len(sent)} requests from {CLIENTS} clients in {RUN_S:.0f} s, kill at "
          f"{kill_began:.1f}-{kill_done:.1f} s; {len(after)} sent after it, {len(fell_back)} fell back; latency "
          f"p50 {statistics.median(latencies):.2f} s, max {max(latencies):.2f} s (deadline {DEADLINE_S:.0f} s)")

    # Every request was answered, within the deadline and its margin.
    failed = [(s.status, s.body) for s in sent if s.status != 200]
    assert failed == [], f"{len(failed)} of {len(sent)} requests failed, e.g. {failed[:3]}"
    assert max(latencies) <= DEADLINE_S + MARGIN_S
    assert len(sent) >= CLIENTS * 2  # enough load that the kill landed in the middle of it

    # Before the kill, "space" answered its own questions: the kill took out an expert that was serving.
    before = [s for s in sent if s.end < kill_began]
    assert any(s.body["model"] == "space" for s in before if s.topic == "space")

    # Requests that ended after the kill began and whose space attempt failed show the failure and the fallback.
    failures = [a for s in sent if s.end > kill_began for a in s.attempts() if a[0] == "space" and not a[1]]
    assert failures and {kind for _, _, kind, _ in failures} <= {"unavailable", "circuit_open"}
    assert fell_back and all(s.end > kill_began for s in fell_back)

    # After the kill, "math" answered everything; each question the gate still ranked "space" first for shows why.
    assert after and all(s.body["model"] == "math" for s in after)
    space_first = [s for s in after if s.ranked_first == "space"]
    assert space_first
    for s in space_first:
        chosen = [c["expert"] for c in s.trace["decision"]["chosen"]]
        attempts = s.attempts()
        # A breaker that opened between the gate's decision and the call refuses it as circuit_open.
        explicit = [(e, ok, fb) for e, ok, _, fb in attempts] == [("space", False, None), ("math", True, "space")] \
            and attempts[0][2] in ("unavailable", "circuit_open")
        breaker_open = chosen == ["math"] and attempts == [("math", True, None, None)]
        assert explicit or breaker_open, s.trace
