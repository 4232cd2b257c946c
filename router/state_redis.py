"""State shared by router replicas, in Redis: rate-limit buckets and circuit breakers.

The router is stateless apart from these, so with ``state.backend: redis`` any number of replicas behind a load
balancer enforce one rate limit per key and agree on which experts are broken.

- ``RedisRateStore`` (``router.security.RateStore``): one hash per bucket, ``{tokens, stamp}``, refilled and
  taken by a Lua script, so a take is atomic across replicas. The clock is the Redis server's (``TIME``), so
  replicas' clocks need not agree. Same arithmetic as ``security.take_token``.
- ``RedisBreakerStore`` (``router.breaker.BreakerStore``): one hash per expert holding a ``BreakerState``.
  That interface is synchronous (the breaker transitions are pure and run between awaits), so this store uses
  a blocking client with short timeouts: a round trip to a nearby Redis is ~0.1 ms. A request reads every
  breaker it may need in one round trip (``load_many``), and a Redis whose round trips stay slow (three in a row
  over ``slow_s``, 50 ms) is served as an outage, since each holds the event loop. Load and save are separate
  calls, so two replicas finishing calls to one expert at the same instant may lose one count (last write
  wins); a breaker only needs the trend, not an exact count. ``Breakers`` over this store must use a wall
  clock (``time.time``): ``opened_at`` is compared across hosts.

- ``RedisFeedbackStore`` (``router.feedback_redis``): the feedback verdicts, in one store for every replica.

The rate-limit and breaker stores degrade, not fail, when Redis is unreachable: they fall back to per-process
state and log one warning, so an outage of Redis loosens limits to per replica instead of failing every request.
The rate store tries Redis again on the first request ``retry_s`` after a failure (an await: the event loop goes
on). The breaker store's calls block, so a try would hold the event loop for up to the client's timeout: a thread
of its own PINGs Redis every ``retry_s`` instead, and the breakers use Redis again once it answers.
Connecting, the start's check and the outage each store rides out are ``router.redis_client``'s. The ``redis``
package is imported lazily; install it with ``pip install redis``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, get_args

from router.breaker import BreakerState, BreakerStore, MemoryBreakerStore, State
from router.config import RateLimitConfig, StateConfig
from router.feedback_redis import RedisFeedbackStore
from router.redis_client import (
    Outage,
    SlowRedis,
    check_redis,
    from_url,
    redis_module,
    redis_url,
    redis_url_problems,
)
from router.security import InMemoryRateStore, RateStore

if TYPE_CHECKING:
    import redis
    import redis.asyncio

    from router.encoders import Encoder

__all__ = ["RedisBreakerStore", "RedisFeedbackStore", "RedisRateStore", "SharedState", "build_shared_state",
           "check_redis", "redis_url", "redis_url_problems"]

log = logging.getLogger("router.state")  # under "router": the service writes it as JSON lines

# KEYS[1]: the bucket. ARGV: rate_per_s, burst. Returns the wait in seconds as a string ("0": granted);
# a Lua number would be truncated to an integer on the way out.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens = burst
if b[1] and b[2] then
  tokens = math.min(burst, tonumber(b[1]) + math.max(0, now - tonumber(b[2])) * rate)
end
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'stamp', string.format('%.17g', now))
-- A full bucket is the same as no bucket: let the key go once it would have refilled.
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return string.format('%.17g', wait)
"""
# Breaker hashes of experts no longer configured go after a day without a call.
_BREAKER_TTL_S = 86_400


class RedisRateStore:
    """Token buckets shared by every replica; falls back to per-process buckets while Redis is down."""

    metric_name = "rate_limits"  # the ``store`` label of ``moe_redis_up``

    def __init__(self, client: redis.asyncio.Redis, key_prefix: str = "moe:", *, retry_s: float = 5.0) -> None:
        self.client = client
        self.key_prefix = key_prefix
        self._script = client.register_script(_TAKE)
        self._local = InMemoryRateStore()
        self._outage = Outage("rate limits", retry_s)

    async def take(self, key: str, limit: RateLimitConfig) -> float:
        if not self._outage.active():
            try:
                wait = await self._script(keys=[f"{self.key_prefix}rate:{key}"], args=[limit.rate_per_s, limit.burst])
                self._outage.ended()
                return float(wait)
            except redis_module().RedisError as exc:
                self._outage.begin(exc)
        return await self._local.take(key, limit)

    def redis_up(self) -> bool:
        """False while an outage has this replica enforce its limits on its own (``moe_redis_up``)."""
        return not self._outage.down

    def assume_down(self, exc: Exception, probe: Callable[[], object]) -> None:
        """Redis did not answer at start (``check_redis``, which said so): serve without it until ``probe`` (a
        blocking PING, on a thread of its own) or a take finds it answering."""
        self._outage.begin(exc, said=True, probe=probe)

    async def aclose(self) -> None:
        self._outage.close()
        await self.client.aclose()


def _encode(state: BreakerState) -> dict[str, str]:
    return {k: json.dumps(v) for k, v in asdict(state).items()}


# What each field of a stored ``BreakerState`` must hold, as JSON gives it back (an int is a number too). A test
# pins these to the dataclass's fields and their defaults (tests/unit/test_state_redis_decode.py).
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "state": (str,), "consecutive": (int,), "trips": (int,), "opened_at": (int, float), "cooldown_s": (int, float),
    "probes": (int,), "probe_round": (int,), "buckets": (list,), "last_error": (str, type(None)), "held": (bool,),
    "epoch": (int,), "config": (str,), "probe_at": (int, float)}


class BadBreakerHash(ValueError):
    """A stored breaker state that is no ``BreakerState`` (a field not JSON, or of another type): written by
    something else, or by hand. Its breaker starts afresh, and the next save overwrites it."""


def _decode(raw: Mapping[bytes | str, bytes | str]) -> BreakerState:
    fields: dict[str, Any] = {}
    for k, v in raw.items():
        name = k.decode(errors="replace") if isinstance(k, bytes) else k
        if name not in _FIELD_TYPES:
            continue  # a field a later release adds: this one reads what it knows
        try:
            value = json.loads(v)
        except ValueError:  # JSONDecodeError, and bytes that are not UTF-8
            raise BadBreakerHash(f"field {name!r} is not JSON") from None
        ok = isinstance(value, _FIELD_TYPES[name]) and (name == "held" or not isinstance(value, bool))
        if name == "state":
            ok = ok and value in get_args(State)
        elif name == "buckets":
            ok = ok and all(isinstance(b, list) and len(b) == 3 and all(type(n) is int for n in b) for b in value)
        if not ok:
            raise BadBreakerHash(f"field {name!r} holds {type(value).__name__} {str(value)[:40]!r}, not what a "
                                 "breaker state holds")
        fields[name] = tuple(tuple(b) for b in value) if name == "buckets" else value
    return BreakerState(**fields)


class RedisBreakerStore:
    """A hash per breaker key (``<prefix>breaker:<expert>@<service>``, ``Breakers``'s key); falls back to
    per-process states while Redis is down."""

    metric_name = "breakers"

    # Each call holds the event loop for its round trip (the breaker interface is synchronous: see the module's
    # notes), so a Redis that answers, but slowly, slows every request of the replica and breaks their deadlines
    # without ever failing. SLOW_CALLS calls in a row slower than ``slow_s`` are served as an outage: per-process
    # breakers, until a PING answers within ``slow_s`` again. A nearby Redis answers in well under a millisecond.
    SLOW_CALLS = 3
    # What a pipeline of many keys may take beyond ``slow_s`` per key it reads (packing and parsing them: 0.04 to
    # 0.07 ms a key for 1,050 to 2,000 experts on a local Redis), so a large batch is not taken for a slow Redis.
    PER_KEY_S = 0.0002

    def __init__(self, client: redis.Redis, key_prefix: str = "moe:", *, retry_s: float = 5.0,
                 slow_s: float = 0.05) -> None:
        self.client = client
        self.key_prefix = key_prefix
        self.slow_s = slow_s
        self._slow_calls = 0
        # Also the fallback's starting point: the last state seen in Redis carries on through an outage.
        self._local = MemoryBreakerStore()
        # Probed off the event loop, which these blocking calls run on (see the module's notes).
        self._outage = Outage("circuit breakers", retry_s, probe=self._timed_ping)

    def _key(self, expert: str) -> str:
        return f"{self.key_prefix}breaker:{expert}"

    def _timed_ping(self) -> None:
        start = time.perf_counter()
        self.client.ping()
        took = time.perf_counter() - start
        if took > self.slow_s:
            raise SlowRedis(f"PING took {took * 1000:.0f} ms, over {self.slow_s * 1000:.0f} ms")

    def _timed(self, start: float, keys: int = 1) -> None:
        """Note a call's round trip (one reading ``keys`` keys); the SLOW_CALLS-th slow one in a row begins an
        outage."""
        took = time.perf_counter() - start
        if took <= self.slow_s + self.PER_KEY_S * (keys - 1):
            self._slow_calls = 0
            self._outage.ended()
            return
        self._slow_calls += 1
        if self._slow_calls >= self.SLOW_CALLS:
            self._slow_calls = 0
            self._outage.begin(SlowRedis(f"{self.SLOW_CALLS} calls in a row took over {self.slow_s * 1000:.0f} ms "
                                         f"each (the last {took * 1000:.0f} ms), holding every request"))

    def _decoded(self, expert: str, raw: Mapping[bytes | str, bytes | str]) -> BreakerState:
        """The state ``raw`` holds; for a hash that holds none, a fresh one, which is saved over it."""
        try:
            return _decode(raw) if raw else BreakerState()
        except BadBreakerHash as exc:
            log.warning("circuit breaker of %s: the hash %s in Redis is no breaker state (%s); starting it afresh",
                        expert, self._key(expert), exc)
            self.save(expert, BreakerState())
            return BreakerState()

    def load(self, expert: str) -> BreakerState:
        return self.load_many([expert])[0]

    def load_many(self, experts: Sequence[str]) -> list[BreakerState]:
        if experts and not self._outage.active():
            start = time.perf_counter()
            try:
                pipe = self.client.pipeline(transaction=False)
                for expert in experts:
                    pipe.hgetall(self._key(expert))
                raws = pipe.execute()
            except redis_module().RedisError as exc:
                self._outage.begin(exc)
            else:
                self._timed(start, len(experts))
                states = [self._decoded(expert, raw) for expert, raw in zip(experts, raws, strict=True)]
                for expert, state in zip(experts, states, strict=True):
                    self._local.save(expert, state)
                return states
        return self._local.load_many(experts)

    def save(self, expert: str, state: BreakerState) -> None:
        self._local.save(expert, state)
        if self._outage.active():
            return
        start = time.perf_counter()
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.delete(self._key(expert))
            pipe.hset(self._key(expert), mapping=_encode(state))  # type: ignore[arg-type]
            pipe.expire(self._key(expert), _BREAKER_TTL_S)
            pipe.execute()
        except redis_module().RedisError as exc:
            self._outage.begin(exc)
        else:
            self._timed(start)

    def redis_up(self) -> bool:
        """False while an outage has this replica's breakers learn on their own (``moe_redis_up``)."""
        return not self._outage.down

    def assume_down(self, exc: Exception) -> None:
        """As ``RedisRateStore.assume_down``; the probe thread ends the outage once Redis answers."""
        self._outage.begin(exc, said=True)

    def close(self, *, client: bool = True) -> None:
        """Stop the outage probe, and close the client unless ``client`` is false (a nested router's store, on
        its parent's client)."""
        self._outage.close()
        if client:
            self.client.close()


@dataclass
class SharedState:
    """What outlives one config: built once by ``moe serve`` and handed to every orchestrator a hot reload
    builds, so a reload keeps rate-limit buckets, breaker states, in-flight counts and the loaded encoders.

    Rate limits and breakers are shared with the other replicas when ``state.backend`` is redis, and live in
    this process otherwise. ``in_flight`` (calls per expert, for ``max_concurrency``) is always this process's:
    an old and a new config answering at once count against one limit, the latest config's (``limits``).
    ``encoders`` holds the encoders the latest config uses, by their settings, so a reload that leaves
    ``gate.encoder`` alone reuses the loaded model (a new onnxruntime session per reload grew the process by
    several MB each time)."""

    rate_store: RateStore = field(default_factory=InMemoryRateStore)
    breaker_store: BreakerStore = field(default_factory=MemoryBreakerStore)
    in_flight: dict[str, int] = field(default_factory=dict)
    limits: dict[str, int] = field(default_factory=dict)
    encoders: dict[str, Encoder] = field(default_factory=dict)
    # The states of the routers nested in-process in this one (``router.build.build_nested``), by the nesting
    # expert's name and the nested config's file: a reload keeps theirs as it keeps this one's.
    nested: dict[tuple[str, str], Any] = field(default_factory=dict)

    @property
    def shared(self) -> bool:
        """Whether the replicas share the stores (Redis)."""
        return isinstance(self.breaker_store, RedisBreakerStore)

    def assume_redis_down(self, exc: Exception) -> None:
        """Redis did not answer at start: the stores serve on their own (``moe_redis_up`` 0) until it answers, as
        after an outage, rather than each saying so only once first used."""
        if isinstance(self.breaker_store, RedisBreakerStore):
            self.breaker_store.assume_down(exc)
            if isinstance(self.rate_store, RedisRateStore):  # its client is async: PINGed on the breakers' one
                self.rate_store.assume_down(exc, self.breaker_store.client.ping)

    async def aclose(self) -> None:
        if isinstance(self.rate_store, RedisRateStore):
            await self.rate_store.aclose()
        if isinstance(self.breaker_store, RedisBreakerStore):
            self.breaker_store.close()
        self._close_nested()

    def _close_nested(self) -> None:
        """Stop the probes of the nested routers' breaker stores, at every depth: they share this state's clients."""
        for entry in self.nested.values():
            state = getattr(entry, "state", None)
            if isinstance(state, SharedState):
                if isinstance(state.breaker_store, RedisBreakerStore):
                    state.breaker_store.close(client=False)
                state._close_nested()


# Connections the rate store keeps to Redis per process: as many requests take a token at once (a take is a
# fraction of a millisecond), and more wait for one. Few enough to open at once within the connect timeout.
RATE_CONNECTIONS = 16


def build_shared_state(config: StateConfig, environ: Mapping[str, str], *, timeout_s: float = 0.25) -> SharedState:
    """The stores ``config`` names. Connections open lazily, at first use, on the loop that serves."""
    if config.backend == "memory":
        return SharedState()
    url = redis_url(config, environ)
    redis_module()
    import redis
    import redis.asyncio
    import redis.asyncio.retry
    from redis.backoff import NoBackoff

    # No retries inside the clients: a failed call falls back to local state at once instead of blocking.
    timeouts: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}

    def rate_client(address: str, **options: Any) -> redis.asyncio.Redis:
        # Every request takes a token: a burst of more requests at once than the pool holds connections waits up
        # to timeout_s for one (a blocking pool), where the default pool failed them with MaxConnectionsError,
        # which read as Redis being down (per-process buckets for retry_s, and a false outage in the log).
        pool = redis.asyncio.BlockingConnectionPool.from_url(address, max_connections=RATE_CONNECTIONS,
                                                             timeout=timeout_s, **options)
        return redis.asyncio.Redis.from_pool(pool)

    return SharedState(
        rate_store=RedisRateStore(from_url(rate_client, url, config,
                                            retry=redis.asyncio.retry.Retry(NoBackoff(), 0), **timeouts),
                                  config.key_prefix),
        breaker_store=RedisBreakerStore(from_url(redis.Redis.from_url, url, config,
                                                  retry=redis.retry.Retry(NoBackoff(), 0), **timeouts),
                                        config.key_prefix),
    )
