"""The fault-injection rig: real-HTTP scripted experts behind the real service, and the figures it measures.

Three ``ScriptedOpenAIServer`` test doubles ("a", "b", "c", ranked in that order by a fake gate) serve as
OpenAI-compatible experts over loopback HTTP; the real ``OpenAICompatibleExpert`` clients, ``Orchestrator`` and
service (in-process through ``httpx.ASGITransport``) sit in front of them. ``FAULTS`` names one behaviour per
fault kind the issue lists. ``bench/faults.py`` reuses this module for its longer run; both are test tier.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import resource
import statistics
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx

from experts.base import ExpertContext
from router.build import build_experts
from router.config import RouterConfig, parse_config
from router.orchestrator import Orchestrator
from router.service import create_app
from tests.doubles.fakes import FakeGate
from tests.doubles.scripted_server import Behaviour, ScriptedOpenAIServer

NAMES = ["a", "b", "c"]
TIMEOUT_S = 2.0  # generous: a healthy expert on a 2-core box under the load run can pause over 1 s
DEADLINE_S = 10.0  # two experts timing out twice each (retries=1) still leave "c" time to answer
# Slack over the deadline for the service around the orchestrator (parsing, the gate, the last attempt's
# cancellation) on a loaded single event loop.
MARGIN_S = 0.25

FAULTS: dict[str, Behaviour] = {
    "hang": Behaviour.hang(),
    "http_500": Behaviour.error(500, "internal error"),
    "http_503": Behaviour.error(503, "overloaded"),
    "http_429": Behaviour.error(429, "rate limited", retry_after="0.1"),
    "http_401": Behaviour.error(401, "bad key"),
    "reset": Behaviour.reset(),
    "malformed": Behaviour.malformed(),
    "stall_mid_stream": Behaviour.stall_mid_stream(2),
    "die_mid_stream": Behaviour.die_mid_stream(2),
    "slow": Behaviour.slow("slow but fine", delay_s=0.2, token_delay_s=0.01),
}


def fault_config(servers: Mapping[str, ScriptedOpenAIServer], **fallback: Any) -> RouterConfig:
    return parse_config({
        "version": 1,
        "experts": [{"name": n, "type": "openai", "model": n, "endpoint": s.url, "timeout_s": TIMEOUT_S,
                     "max_concurrency": 128} for n, s in servers.items()],
        "fallback": {"deadline_s": DEADLINE_S, "max_attempts": 3, "retries": 1, "backoff_base_s": 0.05,
                     "backoff_max_s": 0.2, "retry_after_max_s": 0.5,
                     "breaker": {"failure_threshold": 3, "cooldown_s": 0.5, "cooldown_max_s": 2.0}, **fallback},
    }, check_env=False)


@dataclass
class Rig:
    servers: dict[str, ScriptedOpenAIServer]
    orchestrator: Orchestrator
    http: httpx.AsyncClient
    # Set on exit, once every request was done and before the router's clients were closed (closing them closes
    # every connection, in use or not, and so would hide a leak): tasks beyond the rig's baseline, and
    # connections the servers still held mid-response, i.e. responses the router never released.
    held_tasks: int = -1
    held_connections: int = -1
    # Set on close: connections the servers still held once every client was closed and given time to settle.
    leaked_connections: int = -1

    @property
    def busy_connections(self) -> int:
        return sum(s.chats_in_flight for s in self.servers.values())

    async def chat(self, text: str = "hello", *, stream: bool = False) -> Reply:
        body = {"model": "auto", "stream": stream, "messages": [{"role": "user", "content": text}]}
        start = time.monotonic()
        if not stream:
            r = await self.http.post("/v1/chat/completions", json=body)
            return Reply(r.status_code, r.json(), time.monotonic() - start)
        async with self.http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return Reply(r.status_code, r.json(), time.monotonic() - start)
            events = [json.loads(line[6:]) async for line in r.aiter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        return Reply(200, _stream_body(events), time.monotonic() - start)


@dataclass
class Reply:
    status: int
    body: dict[str, Any]
    elapsed_s: float

    @property
    def content(self) -> str:
        choices = self.body.get("choices") or [{}]
        return str(choices[0].get("message", {}).get("content") or "") if self.status == 200 else ""

    @property
    def overrun_ms(self) -> float:
        return max(0.0, (self.elapsed_s - DEADLINE_S) * 1000.0)


def _stream_body(events: list[dict[str, Any]]) -> dict[str, Any]:
    """A streamed answer folded into the plain shape, with the final chunk's ``moe`` trace."""
    if events and "error" in events[-1]:
        return {"error": events[-1]["error"]}
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))
    return {"choices": [{"message": {"content": text}}], "moe": events[-1].get("moe", {}) if events else {}}


@asynccontextmanager
async def rig(**fallback: Any) -> AsyncIterator[Rig]:
    """Start the servers and the service; on exit count what the finished requests left behind (``_settle``),
    close the router, count the connections the servers still hold (before stopping them, which would close them
    anyway), then stop the servers."""
    tasks_before = len(asyncio.all_tasks())
    servers = {n: ScriptedOpenAIServer(name=n) for n in NAMES}
    for server in servers.values():
        server.start()
    live: Rig | None = None
    try:
        config = fault_config(servers, **fallback)
        gate = FakeGate(NAMES, {}, default=[0.5, 0.3, 0.2])
        orchestrator = Orchestrator(config, gate, build_experts(config, ExpertContext()))
        app = create_app(orchestrator)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router",
                                     timeout=30.0) as http:
            live = Rig(servers, orchestrator, http)
            try:
                yield live
            finally:
                await _settle(live, tasks_before)
                await orchestrator.aclose()
        for _ in range(100):
            if all(s.open_connections == 0 for s in servers.values()):
                break
            await asyncio.sleep(0.02)
        live.leaked_connections = sum(s.open_connections for s in servers.values())
    finally:
        for server in servers.values():
            server.stop()


@dataclass
class Leaks:
    tasks: int
    connections: int


async def _settle(r: Rig, tasks_before: int) -> None:
    """Once the requests in flight are done, before the router closes: the tasks beyond the baseline and the
    connections the servers still hold mid-response (``Rig.held_*``). A connection the router gave up on (a
    stall, a hang) it closes at once, so the servers see it go within the settling time; one it never released
    stays busy."""
    with contextlib.suppress(TimeoutError):  # a request still in flight: what it holds is counted
        await asyncio.wait_for(r.orchestrator.drained(), timeout=DEADLINE_S)
    for _ in range(100):  # let cancelled tasks finish and the servers notice closed connections
        if len(asyncio.all_tasks()) <= tasks_before and r.busy_connections == 0:
            break
        await asyncio.sleep(0.02)
    r.held_tasks = max(0, len(asyncio.all_tasks()) - tasks_before)
    r.held_connections = r.busy_connections


async def count_leaks(r: Rig, tasks_before: int) -> Leaks:
    """Once the rig is closed: tasks beyond the baseline (before the rig closed, or after, whichever is more),
    and connections left, whether held mid-response before the close or still open after it."""
    for _ in range(50):  # let cancelled tasks finish
        if len(asyncio.all_tasks()) <= tasks_before:
            break
        await asyncio.sleep(0.02)
    after = max(0, len(asyncio.all_tasks()) - tasks_before)
    return Leaks(tasks=max(r.held_tasks, after),
                 connections=max(0, r.held_connections) + max(0, r.leaked_connections))


def rss_bytes() -> int:
    """This process's resident memory: /proc on Linux (cheap enough to sample under load), else the peak."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class LoadStats:
    requests: int = 0
    answered: int = 0
    unexpected: list[str] = field(default_factory=list)
    max_overrun_ms: float = 0.0
    memory: list[int] = field(default_factory=list)

    @property
    def memory_growth_pct(self) -> float:
        """Mean resident memory of the last quarter of the run over the first quarter's, in percent."""
        quarter = max(1, len(self.memory) // 4)
        first, last = statistics.fmean(self.memory[:quarter]), statistics.fmean(self.memory[-quarter:])
        return (last - first) / first * 100.0 if first else 0.0


async def load(r: Rig, *, clients: int, seconds: float, think_s: tuple[float, float] = (0.5, 1.0),
               seed: int = 0, min_per_client: int = 0) -> LoadStats:
    """``clients`` concurrent clients for ``seconds``, plain and streamed, while a chaos task keeps switching
    experts "a" and "b" between faults and health; "c" stays healthy, so every request must be answered.

    Each client waits ``think_s`` (uniform) between requests, so the offered load stays below what one process
    holding the router, the clients and three scripted servers can serve (about 200 requests/s on 2 cores):
    the run measures resilience under load, not queueing past saturation.

    ``min_per_client`` makes each client send at least that many requests even when a slow machine runs past
    ``seconds``, so the request count a test asserts on does not depend on the machine's speed."""
    stats = LoadStats()
    rng = random.Random(seed)
    stop = time.monotonic() + seconds
    finished = asyncio.Event()

    async def client(i: int) -> None:
        sent = 0
        while time.monotonic() < stop or sent < min_per_client:
            sent += 1
            stats.requests += 1
            try:
                reply = await r.chat(f"query {i}", stream=rng.random() < 0.5)
            except Exception as exc:  # any exception here is an unexpected error, counted and reported
                stats.unexpected.append(f"{type(exc).__name__}: {exc}")
                continue
            stats.max_overrun_ms = max(stats.max_overrun_ms, reply.overrun_ms)
            if reply.status == 200 and reply.content:
                stats.answered += 1
            else:
                stats.unexpected.append(f"HTTP {reply.status}: {json.dumps(reply.body)[:300]}")
            await asyncio.sleep(rng.uniform(*think_s))

    async def chaos() -> None:
        kinds = [*FAULTS.values(), *[Behaviour.ok(f"answer from {n}") for n in ("a", "b")]]
        while not finished.is_set():
            for name in ("a", "b"):
                r.servers[name].default = rng.choice(kinds)
            await asyncio.sleep(0.5)

    async def sample() -> None:
        while not finished.is_set():
            for server in r.servers.values():  # the doubles keep every request; they are not under test
                server.requests.clear()
                server.headers.clear()
            stats.memory.append(rss_bytes())
            await asyncio.sleep(0.1)

    async def clients_then_finish() -> None:
        try:
            await asyncio.gather(*(client(i) for i in range(clients)))
        finally:
            finished.set()

    try:
        await asyncio.gather(chaos(), sample(), clients_then_finish())
    finally:
        for server in r.servers.values():
            server.default = Behaviour.ok(f"answer from {server.name}")
    return stats
