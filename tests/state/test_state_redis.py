"""Shared state in a real Redis: two service instances, one rate-limit bucket and one breaker per expert."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
import redis
from fastapi import FastAPI

from experts.errors import ExpertUnavailable
from router.breaker import Breakers, BreakerState, CircuitOpen, MemoryBreakerStore
from router.build import build_breakers, build_shared_state
from router.config import BreakerConfig, ConfigError, RateLimitConfig, RouterConfig, StateConfig, parse_config
from router.orchestrator import Orchestrator
from router.security import InMemoryRateStore
from router.service import create_app
from router.state_redis import RedisBreakerStore, RedisFeedbackStore, RedisRateStore, SharedState, check_redis
from router.state_redis import build_shared_state as build_state
from tests.doubles.fakes import FakeExpert, FakeGate, fake_config
from tests.support import free_port, hung_redis

NAMES = ["math", "code"]


@pytest.fixture
async def shared(redis_url: str) -> AsyncIterator[list[SharedState]]:
    """Two replicas' stores over one Redis, under a prefix of their own so tests do not see each other."""
    config = StateConfig(backend="redis", key_prefix=f"test-{uuid.uuid4().hex[:8]}:")
    states = [build_state(config, {"MOE_REDIS_URL": redis_url}) for _ in range(2)]
    yield states
    for state in states:
        await state.aclose()


def replica(config: RouterConfig, state: SharedState,
            fail: frozenset[str] = frozenset()) -> tuple[FastAPI, dict[str, FakeExpert]]:
    experts = {n: FakeExpert(config.expert(n), text=f"{n} says hi",
                             fail=(lambda x: ExpertUnavailable(x, "connection refused")) if n in fail else None)
               for n in NAMES}
    gate = FakeGate(NAMES, {"integral": [0.9, 0.1]}, default=[0.2, 0.8])
    orchestrator = Orchestrator(config, gate, experts, breakers=build_breakers(config, state))
    return create_app(orchestrator, rate_store=state.rate_store, environ={}), experts


def client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router")


async def ask(http: httpx.AsyncClient, text: str) -> httpx.Response:
    return await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": text}]})


async def test_two_replicas_share_one_rate_limit_bucket(shared: list[SharedState]) -> None:
    # Three requests in all, whichever replica takes them; the refill is too slow to matter here.
    config = fake_config(NAMES, security={"rate_limit": {"rate_per_s": 0.001, "burst": 3}})
    (a, _), (b, _) = (replica(config, s) for s in shared)
    async with client(a) as ha, client(b) as hb:
        statuses = [(await ha.get("/v1/models")).status_code, (await hb.get("/v1/models")).status_code,
                    (await ha.get("/v1/models")).status_code]
        refused = [await hb.get("/v1/models"), await ha.get("/v1/models")]
    assert statuses == [200, 200, 200]
    for r in refused:
        assert r.status_code == 429
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        assert int(r.headers["retry-after"]) >= 1


async def test_two_replicas_share_one_breaker_per_expert(shared: list[SharedState]) -> None:
    config = fake_config(NAMES, fallback={"breaker": {"failure_threshold": 2, "failure_rate": None,
                                                      "cooldown_s": 60, "cooldown_max_s": 60}})
    a, a_experts = replica(config, shared[0], fail=frozenset({"math"}))
    b, b_experts = replica(config, shared[1])
    async with client(a) as ha, client(b) as hb:
        for _ in range(2):  # math fails twice on replica A; code answers through fallback
            assert (await ask(ha, "an integral")).json()["model"] == "code"
        experts = {e["name"]: e for e in (await hb.get("/v1/experts")).json()["data"]}
        answer = await ask(hb, "an integral")
    assert len(a_experts["math"].requests) == 2
    assert experts["math"]["breaker"]["state"] == "open"
    assert experts["math"]["breaker"]["trips"] == 1
    assert experts["code"]["breaker"]["state"] == "closed"
    # Replica B never saw math fail, yet leaves it out: the breaker is shared.
    assert answer.status_code == 200 and answer.json()["model"] == "code"
    assert b_experts["math"].requests == []


async def test_a_burst_past_the_pools_connections_waits_for_one_rather_than_calling_redis_down(
        shared: list[SharedState], caplog: pytest.LogCaptureFixture) -> None:
    """300 requests taking a token at once ran the default pool (100 connections) out: MaxConnectionsError read
    as an outage, so every key fell back to per-process buckets for 5 s, and the log said Redis was
    unreachable. The pool now blocks a moment for a free connection, and every take is Redis's."""
    caplog.set_level(logging.WARNING)
    store = shared[0].rate_store
    assert isinstance(store, RedisRateStore)
    limit = RateLimitConfig(rate_per_s=0.001, burst=1000)
    waits = await asyncio.gather(*(store.take("burst", limit) for _ in range(300)))
    assert waits == [0.0] * (300)
    assert not store._outage.active() and "unreachable" not in caplog.text
    # Every token came out of the one shared bucket: what is left there is the burst less all of them.
    other = shared[1].rate_store
    spent = [await other.take("burst", limit) for _ in range(1000 - 300)]
    assert spent == [0.0] * (1000 - 300) and await other.take("burst", limit) > 0


async def test_the_lua_bucket_refills_like_take_token(shared: list[SharedState]) -> None:
    store = shared[0].rate_store
    assert store is not None
    limit = RateLimitConfig(rate_per_s=20.0, burst=2)
    waits = [await store.take("k", limit) for _ in range(3)]
    assert waits[:2] == [0.0, 0.0]
    assert 0.0 < waits[2] <= 0.05 + 1e-6
    await asyncio.sleep(0.06)
    assert await store.take("k", limit) == 0.0
    assert await store.take("other", limit) == 0.0  # buckets are per key


def test_breaker_state_round_trips_through_a_hash(shared: list[SharedState], redis_url: str) -> None:
    store = shared[0].breaker_store
    assert store is not None
    state = BreakerState(state="open", consecutive=3, trips=2, opened_at=1.7e9 + 0.25, cooldown_s=10.0,
                         probes=1, buckets=((170, 4, 3), (171, 1, 1)), last_error="timeout")
    store.save("math", state)
    other = shared[1].breaker_store
    assert other is not None
    assert other.load("math") == state
    assert other.load("never-seen") == BreakerState()


async def test_an_unreachable_redis_falls_back_to_per_process_state(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"redis://127.0.0.1:{s.getsockname()[1]}/0"  # bound, never listening: refused at once
        state = build_state(StateConfig(backend="redis"), {"MOE_REDIS_URL": dead})
        assert state.rate_store is not None and state.breaker_store is not None
        limit = RateLimitConfig(rate_per_s=0.001, burst=1)
        with caplog.at_level(logging.WARNING, logger="router.state"):
            assert await state.rate_store.take("k", limit) == 0.0
            assert await state.rate_store.take("k", limit) > 0.0  # the local bucket still limits
            state.breaker_store.save("math", BreakerState(state="open", trips=1))
            assert state.breaker_store.load("math").state == "open"
        await state.aclose()
    warnings = [r.getMessage() for r in caplog.records if r.name == "router.state"]
    # One warning per store and outage, not one per call; the URL is never logged.
    assert len(warnings) == 2 and all("per-process state" in w for w in warnings)
    assert not any(dead in w for w in warnings)


def test_an_outage_warns_once_however_long_it_lasts_and_says_when_it_ends(
        redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """It warned again at every retry (every 5 s): 12 lines a minute per store and replica for one outage, and
    nothing when Redis was back."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = redis.Redis.from_url(f"redis://127.0.0.1:{s.getsockname()[1]}/0", socket_connect_timeout=0.2)
        store = RedisBreakerStore(dead, key_prefix=f"moe-test-{uuid.uuid4().hex[:8]}:", retry_s=0.02)
        with caplog.at_level(logging.WARNING, logger="router.state"):
            for _ in range(30):  # requests through 30 of the probe's tries
                store.load("math")
                time.sleep(0.02)
            assert store._outage.active()
            store.client = redis.Redis.from_url(redis_url)  # Redis is back
            _wait_for(lambda: not store._outage.active())
            store.load("math")
            store.load("math")
    lines = [r.getMessage() for r in caplog.records if r.name == "router.state"]
    assert len(lines) == 2, lines
    assert lines[0].startswith("redis unreachable for circuit breakers")
    assert lines[1] == "redis answers again for circuit breakers; shared state resumes"
    store.close()


def test_a_hung_redis_never_holds_the_breakers_calls_after_the_first(redis_url: str) -> None:
    """Breaker calls block the event loop. After an outage's first call waited out the client's timeout, the first
    call past each retry_s tried Redis again and waited it out too, holding every request on the replica up by the
    timeout every 5 s while the outage lasted. A thread of the store's own tries Redis now; the calls stay local
    until it answers, and then use it again."""
    with hung_redis() as (url, _):
        store = RedisBreakerStore(redis.Redis.from_url(url, socket_timeout=0.1, socket_connect_timeout=0.1),
                                  key_prefix=f"moe-test-{uuid.uuid4().hex[:8]}:", retry_s=0.05)
        calls: list[str] = []
        pings: list[float] = []
        ping = store.client.ping

        def probed() -> object:
            pings.append(time.monotonic())
            return ping()

        # What the store's pipelines go to: the hung Redis, later one that answers.
        reached = [store.client.pipeline]

        def pipeline(**options: object) -> object:
            calls.append("pipeline")
            return reached[0](**options)  # type: ignore[arg-type]

        store.client.pipeline, store.client.ping = pipeline, probed  # type: ignore[method-assign, assignment]
        store.save("math", BreakerState(state="open", trips=1))  # the outage's first call: it waits, and fails
        calls.clear()
        for _ in range(40):  # requests through several retry_s: none of them reaches Redis
            assert store.load("math").state == "open"
            time.sleep(0.01)
        assert calls == [] and len(pings) >= 2, (calls, pings)
        assert store._outage.active()
        # Redis answers again: the probe sees it, and the calls after it read and write Redis.
        up = redis.Redis.from_url(redis_url)
        store.client.ping = up.ping  # type: ignore[method-assign]
        reached[0] = up.pipeline
        _wait_for(lambda: not store._outage.active())
        assert store.load("math") == BreakerState() and calls == ["pipeline"]
        assert store._outage._prober is None  # it ended when Redis answered
        store.close()


@pytest.mark.parametrize("field", ["opened_at", "last_error", "state", "buckets"])
@pytest.mark.parametrize("value", ['"2026-12-07T10:00:00Z"', "not json", "[[1, 2]]"])
def test_a_hash_that_is_no_breaker_state_starts_that_breaker_afresh_and_is_no_outage(
        redis_url: str, caplog: pytest.LogCaptureFixture, field: str, value: str) -> None:
    """A field of the wrong type (a date where a time is a number) made every routed request fail with a
    TypeError, on every replica, until the key expired a day later; one that is not JSON was taken for an
    outage of Redis, every replica's breakers per process, and the hash never mended."""
    prefix = f"moe-test-{uuid.uuid4().hex[:8]}:"
    client = redis.Redis.from_url(redis_url)
    store = RedisBreakerStore(client, key_prefix=prefix, retry_s=0.05)
    store.save("math", BreakerState(state="open", trips=1, opened_at=1.0, cooldown_s=5.0))
    client.hset(f"{prefix}breaker:math", field, value)
    if (field, value) in (("last_error", '"2026-12-07T10:00:00Z"'),):
        assert store.load("math").last_error == "2026-12-07T10:00:00Z"  # a string is what last_error holds
        return
    with caplog.at_level(logging.WARNING, logger="router.state"):
        assert store.load("math") == BreakerState()
        assert Breakers(BreakerConfig(), store).refusing(["math", "code"]) == frozenset()
    assert not store._outage.down and store.redis_up()
    assert store.load("math") == BreakerState() and client.hget(f"{prefix}breaker:math", field) != value.encode()
    lines = [r.getMessage() for r in caplog.records if r.name == "router.state"]
    assert len(lines) == 1 and lines[0].startswith(f"circuit breaker of math: the hash {prefix}breaker:math in "
                                                   f"Redis is no breaker state (field '{field}' "), lines
    store.close()


def test_the_breakers_of_a_request_are_read_in_one_round_trip(redis_url: str) -> None:
    """Which experts' breakers refuse a call was read one key at a time, a round trip each (1,050 for 1,050
    experts), on the event loop."""
    store = RedisBreakerStore(redis.Redis.from_url(redis_url), key_prefix=f"moe-test-{uuid.uuid4().hex[:8]}:")
    breakers = Breakers(BreakerConfig(), store, clock=time.time)
    names = [f"expert-{i}" for i in range(50)]
    store.save("expert-7", BreakerState(state="open", trips=1, opened_at=time.time(), cooldown_s=60.0))
    executed: list[int] = []
    pipeline = store.client.pipeline

    def counted(**options: object) -> object:
        made = pipeline(**options)  # type: ignore[arg-type]
        execute = made.execute
        made.execute = lambda: (executed.append(len(made.command_stack)), execute())[1]  # type: ignore[method-assign]
        return made

    store.client.pipeline = counted  # type: ignore[method-assign, assignment]
    assert breakers.refusing(names) == frozenset({"expert-7"})
    assert executed == [50]
    store.close()


def test_a_large_batch_of_breakers_is_no_slow_redis(redis_url: str) -> None:
    """Reading 1,050 experts' breakers in one pipeline takes tens of milliseconds on a local Redis, packing and
    parsing them: judged against 50 ms alone, a healthy Redis flapped between shared and per-process breakers
    about once a second."""
    store = RedisBreakerStore(redis.Redis.from_url(redis_url), key_prefix=f"moe-test-{uuid.uuid4().hex[:8]}:",
                              retry_s=0.05)
    breakers = Breakers(BreakerConfig(), store, clock=time.time)
    names = [f"expert-{i}" for i in range(1050)]
    for name in names:
        store.save(name, BreakerState(consecutive=1, buckets=((1, 1, 1),), last_error="timeout"))
    # The batch takes 60 ms or more however fast this machine is: over the 50 ms a lone call is judged by, within
    # the budget of 1,050 keys (50 ms + 0.2 ms a key).
    pipeline = store.client.pipeline

    def slower(**options: object) -> object:
        made = pipeline(**options)  # type: ignore[arg-type]
        execute = made.execute
        made.execute = lambda: (time.sleep(0.06), execute())[1]  # type: ignore[method-assign]
        return made

    store.client.pipeline = slower  # type: ignore[method-assign, assignment]
    for _ in range(6):
        assert breakers.refusing(names) == frozenset()
        assert store.redis_up()
    store.close()


def test_a_slow_redis_is_served_as_an_outage_until_it_answers_quickly_again(
        redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Breaker calls hold the event loop for their round trip: a Redis answering each in 200 ms (inside the
    client's timeout, so never an outage) slowed every request on every replica to seconds and broke their
    deadlines. Three slow calls in a row now hand the breakers to this replica, until a PING is quick again."""
    client = redis.Redis.from_url(redis_url)
    store = RedisBreakerStore(client, key_prefix=f"moe-test-{uuid.uuid4().hex[:8]}:", retry_s=0.05, slow_s=0.02)
    delay = [0.03]
    pipeline, ping = client.pipeline, client.ping

    def slow_pipeline(**options: object) -> object:
        made = pipeline(**options)  # type: ignore[arg-type]
        execute = made.execute
        made.execute = lambda: (time.sleep(delay[0]), execute())[1]  # type: ignore[method-assign]
        return made

    def slow_ping() -> object:
        time.sleep(delay[0])
        return ping()

    client.pipeline, client.ping = slow_pipeline, slow_ping  # type: ignore[method-assign, assignment]
    with caplog.at_level(logging.WARNING, logger="router.state"):
        store.load("math")
        store.load("math")
        assert store.redis_up()  # two slow calls: a blip
        store.load("math")
        assert not store.redis_up() and store._outage.active()
        start = time.perf_counter()
        for _ in range(5):
            store.load("math")  # served here, at once
        assert time.perf_counter() - start < delay[0]
        time.sleep(0.2)
        assert not store.redis_up()  # the probe's PINGs are slow too
        delay[0] = 0.0
        _wait_for(store.redis_up)
    lines = [r.getMessage() for r in caplog.records if r.name == "router.state"]
    assert lines[0].startswith("redis unreachable for circuit breakers (SlowRedis: 3 calls in a row took over 20 ms")
    assert lines[-1] == "redis answers again for circuit breakers; shared state resumes"
    store.close()


def test_closing_the_breaker_store_stops_its_probe() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        store = RedisBreakerStore(redis.Redis.from_url(f"redis://127.0.0.1:{s.getsockname()[1]}/0"), retry_s=0.02)
        store.load("math")
        prober = store._outage._prober
        assert prober is not None and prober.is_alive()
        store.close()
        prober.join(2.0)
        assert not prober.is_alive()


def test_an_error_from_a_redis_that_answers_is_no_outage_a_ping_ends(
        redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """A breaker key of the wrong type (or a command an ACL refuses) failed every load while PING succeeded: the
    probe ended the outage each retry_s, and the next load began it again, two warnings each time, for ever."""
    prefix = f"moe-test-{uuid.uuid4().hex[:8]}:"
    redis.Redis.from_url(redis_url).set(f"{prefix}breaker:math", "not a hash")
    store = RedisBreakerStore(redis.Redis.from_url(redis_url), key_prefix=prefix, retry_s=0.05)
    with caplog.at_level(logging.WARNING, logger="router.state"):
        for _ in range(40):  # through several retry_s
            assert store.load("math") == BreakerState()
            time.sleep(0.01)
    lines = [r.getMessage() for r in caplog.records if r.name == "router.state"]
    assert len(lines) == 1 and lines[0].startswith("redis unreachable for circuit breakers (ResponseError"), lines
    assert store._outage._prober is None
    store.close()


def test_an_outage_without_a_probe_thread_ends_by_its_time_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no thread to be had, or after close(), begin() raised into the breaker's call or left the outage on for
    good; the time window serves then, as it does without a probe."""
    from router.redis_client import Outage

    refused = redis.ConnectionError("refused")
    closed = Outage("circuit breakers", 0.05, probe=lambda: None)
    closed.close()
    closed.begin(refused)
    assert closed.active() and closed._prober is None
    _wait_for(lambda: not closed.active(), 1.0)

    def no_thread(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", no_thread)
    starved = Outage("circuit breakers", 0.05, probe=lambda: None)
    starved.begin(refused)
    assert starved.active() and starved._prober is None
    _wait_for(lambda: not starved.active(), 1.0)


async def test_closing_the_state_stops_the_nested_routers_probes() -> None:
    """A nested router's breaker store (on the parent's client) kept probing after shutdown, and reopened a
    connection once Redis answered."""
    from router.build import _child_state, _Nested

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        state = build_state(StateConfig(backend="redis"), {"MOE_REDIS_URL": f"redis://127.0.0.1:{s.getsockname()[1]}/0"})
        child = _child_state(state, "inner")
        grandchild = _child_state(child, "innermost")
        child.nested[("innermost", "c.yaml")] = _Nested(grandchild)
        state.nested[("inner", "b.yaml")] = _Nested(child)
        stores = [st.breaker_store for st in (state, child, grandchild)]
        for store in stores:
            assert isinstance(store, RedisBreakerStore)
            store.load("math")
        probers = [store._outage._prober for store in stores if isinstance(store, RedisBreakerStore)]
        assert all(p is not None and p.is_alive() for p in probers)
        await state.aclose()
        for prober in probers:
            assert prober is not None
            prober.join(2.0)
            assert not prober.is_alive()


def _wait_for(done: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "not within 5 s"
        time.sleep(0.01)


def test_memory_is_the_default_and_redis_needs_its_url_variable(redis_url: str) -> None:
    config = fake_config(NAMES)
    assert config.state == StateConfig()
    memory = build_shared_state(config, {})
    # This process's stores, which a hot reload keeps: the orchestrators built from it share them.
    assert isinstance(memory.rate_store, InMemoryRateStore) and isinstance(memory.breaker_store, MemoryBreakerStore)
    assert not memory.shared
    assert build_breakers(config, memory).clock is not time.time
    assert build_breakers(config, memory).store is memory.breaker_store
    redis_config = fake_config(NAMES, state={"backend": "redis", "url_env": "MY_REDIS"})
    with pytest.raises(ConfigError) as info:
        build_shared_state(redis_config, {})
    assert "state.url_env" in str(info.value) and "MY_REDIS" in str(info.value)
    state = build_shared_state(redis_config, {"MY_REDIS": redis_url})
    assert isinstance(state.rate_store, RedisRateStore) and isinstance(state.breaker_store, RedisBreakerStore)
    breakers = build_breakers(redis_config, state)
    # Times compared across hosts: the wall clock.
    assert breakers.store is state.breaker_store and breakers.clock is time.time
    state.breaker_store.close()


def test_state_config_is_strict() -> None:
    with pytest.raises(ConfigError):
        fake_config(NAMES, state={"backend": "redis", "url": "redis://secret@host"})
    with pytest.raises(ConfigError):
        fake_config(NAMES, state={"backend": "etcd"})




def test_a_probe_whose_end_never_reaches_redis_does_not_shut_the_expert_out_for_good(
        shared: list[SharedState]) -> None:
    """Replica A lets a half-open probe through, then dies (or Redis times out as the probe ends, so the end is
    recorded in A's memory only). The shared breaker must not stay half-open "with a probe in flight" for every
    replica until its key expires a day later: once the probe's lease is over, B probes the expert again."""
    cfg = BreakerConfig(failure_threshold=1, failure_rate=None, cooldown_s=5, cooldown_max_s=5)
    now = [1.7e9]
    a_store, b_store = shared[0].breaker_store, shared[1].breaker_store
    a = Breakers(cfg, a_store, clock=lambda: now[0], probe_lease_s=30)
    b = Breakers(cfg, b_store, clock=lambda: now[0], probe_lease_s=30)
    a.finish(a.admit("math"), ExpertUnavailable("math", "connection refused"))  # trips
    now[0] += 6
    lost = a.admit("math")  # A's probe; A is killed before it ends
    assert lost.probe
    with pytest.raises(CircuitOpen, match="probe call is already in flight"):
        b.admit("math")  # a live probe is respected
    now[0] += 29
    assert b.refuses("math")
    now[0] += 2  # the lease is over: the probe is presumed lost
    assert not b.refuses("math")
    probe = b.admit("math")
    assert probe.probe and probe.probe_round > lost.probe_round
    b.finish(probe, None)
    assert a_store is not None and a_store.load("math").state == "closed"
    # The lost probe's end, should it come after all, is stale: it does not reopen the breaker.
    a.finish(lost, ExpertUnavailable("math", "connection refused"))
    assert b.snapshot("math")["state"] == "closed"


def test_replicas_pointing_one_expert_at_different_services_keep_apart_breakers(shared: list[SharedState]) -> None:
    """A rolling config change, or a reload on one replica, leaves replicas calling one expert name at two
    endpoints. The old endpoint failing on B must not open the breaker A keeps for its new, healthy one; replicas on
    the same service still share one breaker."""
    def config(endpoint: str) -> RouterConfig:
        return parse_config({"version": 1, "fallback": {"breaker": {"failure_threshold": 1}}, "experts": [
            {"name": "math", "type": "vllm", "endpoint": endpoint, "model": "m"}]}, check_env=False)

    old, new = config("http://old-host:8000/v1"), config("http://new-host:8000/v1")
    assert old.experts[0].service_identity() != new.experts[0].service_identity()
    a, b = build_breakers(new, shared[0]), build_breakers(old, shared[1])
    b.finish(b.admit("math"), ExpertUnavailable("math", "connection refused"))  # the old endpoint is down
    assert b.refuses("math") and not a.refuses("math")
    b_too = build_breakers(old, shared[0])  # another replica still on the old config: the same service
    assert b_too.refuses("math")


def test_a_redis_refusing_the_credentials_stops_the_start_naming_the_variable_and_an_absent_one_does_not(
        redis_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """With the wrong password a replica would run alone (its own limits and breakers, every verdict refused)
    while /health said all was well: `moe serve` stops at once instead, the variable named and the password never
    shown. A Redis not answering yet is served without (it may start after the router), as an outage is."""
    import redis

    from router.state_redis import check_redis

    admin = redis.Redis.from_url(redis_url)
    admin.execute_command("ACL", "SETUSER", "moe-test", "on", ">right-PASSWORD-1", "~*", "+@all")
    host = redis_url.removeprefix("redis://")
    config = StateConfig(backend="redis", url_env="MOE_TEST_REDIS_URL")
    try:
        monkeypatch.setenv("MOE_TEST_REDIS_URL", f"redis://moe-test:wrong-PASSWORD-2@{host}")
        with pytest.raises(ConfigError) as refused:
            check_redis(config, os.environ)
        [(key, message)] = refused.value.problems
        assert key == "state.url_env" and "MOE_TEST_REDIS_URL names refused its credentials" in message
        assert "PASSWORD" not in str(refused.value)
        monkeypatch.setenv("MOE_TEST_REDIS_URL", f"redis://moe-test:right-PASSWORD-1@{host}")
        check_redis(config, os.environ)
        monkeypatch.setenv("MOE_TEST_REDIS_URL", f"redis://:right-PASSWORD-1@127.0.0.1:{free_port()}/0")
        with caplog.at_level("WARNING", logger="router.state"):
            check_redis(config, os.environ, timeout_s=0.5)
        assert "does not answer at start" in caplog.text and "PASSWORD" not in caplog.text
    finally:
        admin.execute_command("ACL", "DELUSER", "moe-test")
        admin.close()


@pytest.mark.parametrize("build", ["state", "check"])
def test_a_url_option_the_connection_does_not_take_is_a_config_error(build: str) -> None:
    """An ssl_* option on a redis:// URL passed every check, then each command raised TypeError: moe serve and
    moe train died with a traceback."""
    for url, says in (("redis://:s3cret-pw@127.0.0.1:1/0?ssl_cert_reqs=none", "TLS option(s) 'ssl_cert_reqs'"),
                      ("redis://:s3cret-pw@127.0.0.1:1/0?bogus_option=1", "option 'bogus_option'")):
        with pytest.raises(ConfigError) as info:
            if build == "state":
                build_state(StateConfig(backend="redis"), {"MOE_REDIS_URL": url})
            else:
                check_redis(StateConfig(backend="redis"), {"MOE_REDIS_URL": url})
        [(key, message)] = info.value.problems
        assert key == "state.url_env" and says in message, message
        assert "s3cret" not in str(info.value)


def test_a_redis_that_answers_ping_with_an_error_stops_the_start(redis_url: str) -> None:
    """A database number the server does not have (or a certificate that fails verification) is no outage a wait
    ends: the replica ran alone, its /health ok, logging "unreachable" every few seconds."""
    import ssl

    from router.redis_client import certificate_refused

    with pytest.raises(ConfigError) as info:
        check_redis(StateConfig(backend="redis"), {"MOE_REDIS_URL": redis_url.rsplit("/", 1)[0] + "/99999"})
    [(key, message)] = info.value.problems
    assert key == "state.url_env" and "answered PING with an error (ResponseError: DB index is out of range)" \
        in message
    try:
        try:
            raise ssl.SSLCertVerificationError(1, "certificate verify failed: self-signed certificate")
        except ssl.SSLError as cause:
            raise redis.ConnectionError("Error 1 connecting to host:6380.") from cause
    except redis.ConnectionError as exc:
        assert certificate_refused(exc)
    assert not certificate_refused(redis.ConnectionError("Error 111 connecting: Connection refused."))


async def _redis_up(app: FastAPI) -> dict[str, float]:
    async with client(app) as http:
        text = (await http.get("/metrics")).text
    return {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("moe_redis_up{")}


async def test_moe_redis_up_says_when_a_replica_serves_its_own_state(redis_url: str) -> None:
    """While Redis is down a replica enforces its rate limits and learns its breakers alone, and remembers no answer
    for feedback by id; only a log line said so. ``moe_redis_up`` is a series per Redis-backed store: 1 while it
    reaches Redis, 0 during an outage, and none with the memory backend."""
    config = fake_config(NAMES, security={"rate_limit": {"rate_per_s": 100, "burst": 100}})
    up = build_state(StateConfig(backend="redis", key_prefix=f"test-{uuid.uuid4().hex[:8]}:"),
                     {"MOE_REDIS_URL": redis_url})
    feedback = RedisFeedbackStore.from_config(StateConfig(backend="redis"), {"MOE_REDIS_URL": redis_url})
    app, _ = replica(config, up)
    app.state.feedback = feedback
    async with client(app) as http:
        assert (await ask(http, "integral")).status_code == 200
    assert await _redis_up(app) == {"rate_limits": 1.0, "breakers": 1.0, "feedback": 1.0}
    await up.aclose()
    feedback.close()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"redis://127.0.0.1:{s.getsockname()[1]}/0"  # bound, never listening: refused at once
        down = build_state(StateConfig(backend="redis"), {"MOE_REDIS_URL": dead})
        feedback = RedisFeedbackStore.from_config(StateConfig(backend="redis"), {"MOE_REDIS_URL": dead})
        app, _ = replica(config, down)
        app.state.feedback = feedback
        async with client(app) as http:
            assert (await ask(http, "integral")).status_code == 200  # served on this replica's own state
        assert await _redis_up(app) == {"rate_limits": 0.0, "breakers": 0.0, "feedback": 0.0}
        await down.aclose()
        feedback.close()

    app, _ = replica(config, SharedState())
    assert await _redis_up(app) == {}


def test_moe_serve_s_start_warnings_are_json_lines_too(tmp_path: Path) -> None:
    """The warning for a Redis that does not answer at start came out as plain text, before the log stream was made
    JSON lines; a log pipeline that parses every line lost it."""
    import subprocess
    import sys

    config = tmp_path / "router.yaml"
    config.write_text("version: 1\nstate: {backend: redis}\ngate: {artifact: gate}\nexperts:\n"
                      "  - {name: a, type: openai, endpoint: 'http://127.0.0.1:9/v1', model: a}\n"
                      "  - {name: b, type: openai, endpoint: 'http://127.0.0.1:9/v1', model: b}\n")
    env = {**os.environ, "MOE_REDIS_URL": f"redis://:secret-PASSWORD@127.0.0.1:{free_port()}/0",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, "-m", "router.cli", "serve", "--config", str(config), "--port",
                           str(free_port())], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0  # no gate trained: it stops after the warning
    warning = next(line for line in done.stderr.splitlines() if "does not answer at start" in line)
    record = json.loads(warning)
    assert record["level"] == "WARNING" and "PASSWORD" not in done.stderr


async def test_a_redis_that_does_not_answer_at_start_reads_as_down_before_any_request_and_up_once_it_answers(
        caplog: pytest.LogCaptureFixture) -> None:
    """With Redis down at start, ``moe_redis_up`` said 1 for the rate limits and feedback until a request first used
    them (and one more warning each then): the stores start on their own, quietly, as ``check_redis`` said, and
    each reads as up again once Redis answers, with no request (a rate store with no limit configured is never
    used, and read as down for good in the first version)."""
    import subprocess

    config = fake_config(NAMES)
    port = free_port()
    dead = {"MOE_REDIS_URL": f"redis://127.0.0.1:{port}/0"}
    with caplog.at_level(logging.WARNING, logger="router.state"):
        unanswered = check_redis(StateConfig(backend="redis"), dead, timeout_s=0.5)
        assert isinstance(unanswered, redis.ConnectionError)
        state = build_state(StateConfig(backend="redis"), dead)
        state.assume_redis_down(unanswered)
        feedback = RedisFeedbackStore.from_config(StateConfig(backend="redis"), dead)
        feedback.assume_down(unanswered)
        app, _ = replica(config, state)
        app.state.feedback = feedback
        assert await _redis_up(app) == {"rate_limits": 0.0, "breakers": 0.0, "feedback": 0.0}
        started = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                    "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 20.0
            while await _redis_up(app) != {"rate_limits": 1.0, "breakers": 1.0, "feedback": 1.0}:
                assert time.monotonic() < deadline, await _redis_up(app)
                await asyncio.sleep(0.2)
        finally:
            await state.aclose()
            feedback.close()
            started.terminate()
            started.wait(10)
    lines = [r.getMessage() for r in caplog.records if r.name == "router.state"]
    assert "does not answer at start" in lines[0] and not any("unreachable" in line for line in lines), lines
    assert sum("answers again" in line for line in lines) == 3, lines
    assert check_redis(StateConfig(backend="memory"), dead) is None
