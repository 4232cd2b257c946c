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

- ``RedisFeedbackStore`` (``router.feedback.FeedbackStore``): the answers verdicts may name, one hash each
  (``<prefix>feedback:answer:<id>``, expiring after the retention), and the verdicts in one sorted set
  (``<prefix>feedback:verdicts``, scored by creation time, ids from ``INCR``), so every replica records into,
  and ``moe train`` reads from, one store. Verdicts are data, not soft state: a verdict that cannot be stored
  raises ``FeedbackUnavailable`` (the service answers 503, so the client can send it again) instead of being
  kept locally, and an answer that cannot be remembered is logged and can still be rated by query and expert.

The rate-limit and breaker stores degrade, not fail, when Redis is unreachable: they fall back to per-process
state and log one warning, so an outage of Redis loosens limits to per replica instead of failing every request.
The rate store tries Redis again on the first request ``retry_s`` after a failure (an await: the event loop goes
on). The breaker store's calls block, so a try would hold the event loop for up to the client's timeout: a thread
of its own PINGs Redis every ``retry_s`` instead, and the breakers use Redis again once it answers.
The ``redis`` package is imported lazily; install it with ``pip install redis``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import re
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, get_args

from router.breaker import BreakerState, BreakerStore, MemoryBreakerStore, State
from router.config import ConfigError, RateLimitConfig, StateConfig
from router.feedback import (
    REDIS_REQUEST_RETENTION_S,
    Answered,
    FeedbackBody,
    FeedbackRecord,
    FeedbackStore,
    FeedbackUnavailable,
    in_pool,
)
from router.security import InMemoryRateStore, RateStore, redact

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


def _redis_module() -> Any:
    try:
        import redis
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("state.backend: redis needs the redis package: pip install redis") from exc
    return redis


class _Outage:
    """After a Redis error, use local state until Redis answers again. One warning per outage, however many tries
    it takes (each further failed try logs at debug), and one line when Redis answers again (``ended``, which the
    stores call after each call that reached it).

    The outage lasts ``retry_s``, and the next call after it tries Redis again. With ``probe`` (a blocking call that
    raises while Redis cannot be reached: PING), an error that says so (no connection, a timeout) is probed
    instead: a daemon thread calls ``probe`` every ``retry_s`` and ends the outage when it returns, so no caller
    waits on a Redis that does not answer. An error from a Redis that answered (a key of the wrong type, a command
    an ACL refuses) is no such outage, and a PING would not tell when it ends: the time window serves it. ``close``
    stops the probe, and later errors are served by the time window."""

    def __init__(self, what: str, retry_s: float, clock: Callable[[], float] = time.monotonic, *,
                 fallback: str = "using per-process state", probe: Callable[[], object] | None = None) -> None:
        self.what, self.retry_s, self.clock, self.fallback, self.probe = what, retry_s, clock, fallback, probe
        self._until = 0.0
        self._down = False
        self._probed = False  # a probe thread is running for this outage, and ends it
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._prober: threading.Thread | None = None

    def active(self) -> bool:
        return self._probed or self.clock() < self._until

    @property
    def down(self) -> bool:
        """From a failed call until one reaches Redis again (a probe's PING included): the store serves without it."""
        return self._down

    def begin(self, exc: Exception, *, said: bool = False, probe: Callable[[], object] | None = None) -> None:
        """An outage, from ``exc``; ``said``: already warned of (``check_redis`` at start), so logged at debug.
        ``probe``: for this outage, where the store has none of its own (one that nothing may use for a while, a
        rate store with no limit configured, would otherwise read as down until it is used)."""
        cause = redact(f"{type(exc).__name__}: {exc}")
        with self._lock:
            if not self._down and not said:
                log.warning("redis unreachable for %s (%s); %s until it answers again, trying it every %.0fs",
                            self.what, cause, self.fallback, self.retry_s)
            else:
                log.debug("redis still unreachable for %s (%s)", self.what, cause)
            self._down = True
            self._until = self.clock() + self.retry_s
            probe = probe or self.probe
            if probe is not None and _unreachable(exc) and not self._stop.is_set():
                self._probed = self._prober is not None or self._start_prober(probe)

    def _start_prober(self, probe: Callable[[], object]) -> bool:
        """Start the probe thread (under the lock); False where none can start, and the time window serves."""
        prober = threading.Thread(target=self._probing, args=(probe,), name=f"redis probe ({self.what})",
                                  daemon=True)
        try:
            prober.start()
        except RuntimeError as exc:  # no thread to be had: the next call past retry_s tries Redis, as without one
            log.debug("no probe thread for %s (%s)", self.what, exc)
            return False
        self._prober = prober
        return True

    def _probing(self, probe: Callable[[], object]) -> None:
        while not self._stop.wait(self.retry_s):
            try:
                probe()
            except Exception as exc:  # any failure is the outage going on (logged)
                log.debug("redis still unreachable for %s (%s)", self.what, redact(f"{type(exc).__name__}: {exc}"))
                continue
            with self._lock:  # under the lock: a failure begun now starts a new prober, as this one has ended
                self._prober, self._probed, self._until = None, False, 0.0
                self._ended()
            return
        with self._lock:
            self._prober, self._probed = None, False

    def ended(self) -> None:
        with self._lock:
            self._ended()

    def _ended(self) -> None:
        if self._down:
            self._down = False
            log.warning("redis answers again for %s; shared state resumes", self.what)

    def close(self) -> None:
        """Stop the probe (a try under way ends within the client's timeout)."""
        self._stop.set()


def _unreachable(exc: Exception) -> bool:
    """Whether ``exc`` says Redis could not be reached (no connection, a timeout), rather than that it answered
    with an error."""
    redis = _redis_module()
    return isinstance(exc, redis.ConnectionError | redis.TimeoutError | SlowRedis)


class RedisRateStore:
    """Token buckets shared by every replica; falls back to per-process buckets while Redis is down."""

    metric_name = "rate_limits"  # the ``store`` label of ``moe_redis_up``

    def __init__(self, client: redis.asyncio.Redis, key_prefix: str = "moe:", *, retry_s: float = 5.0) -> None:
        self.client = client
        self.key_prefix = key_prefix
        self._script = client.register_script(_TAKE)
        self._local = InMemoryRateStore()
        self._outage = _Outage("rate limits", retry_s)

    async def take(self, key: str, limit: RateLimitConfig) -> float:
        if not self._outage.active():
            try:
                wait = await self._script(keys=[f"{self.key_prefix}rate:{key}"], args=[limit.rate_per_s, limit.burst])
                self._outage.ended()
                return float(wait)
            except _redis_module().RedisError as exc:
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


class SlowRedis(Exception):
    """Redis answers, but each breaker call's round trip holds the event loop past ``RedisBreakerStore.slow_s``."""


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
        self._outage = _Outage("circuit breakers", retry_s, probe=self._timed_ping)

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
            except _redis_module().RedisError as exc:
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
        except _redis_module().RedisError as exc:
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


# KEYS: the id counter, the verdicts, the key of the latest verdict on this answer and expert ("" for a verdict
# without an answer id). ARGV: the verdict as JSON without id and created; that key's lifetime in seconds; the
# verdict's digest. One script, so the id, the time (the Redis server's, one clock for every replica, in id order)
# and the insert happen at once: a verdict is stored whole or not at all. A verdict the same as the latest one on
# its answer (a client's resend after a timeout) returns that one instead of a second copy; any other is stored,
# so good, bad, then good again ends on good, as SQLite's every copy does.
_ADD = """
if KEYS[3] ~= '' then
  local last = redis.call('HMGET', KEYS[3], 'digest', 'member')
  if last[1] == ARGV[3] and last[2] then return last[2] end
end
local record = cjson.decode(ARGV[1])
record['id'] = redis.call('INCR', KEYS[1])
local t = redis.call('TIME')
-- Milliseconds: cjson writes 14 significant digits, so the JSON's time and the score must be this same number.
record['created'] = tonumber(string.format('%.3f', tonumber(t[1]) + tonumber(t[2]) / 1000000))
local member = cjson.encode(record)
redis.call('ZADD', KEYS[2], record['created'], member)
if KEYS[3] ~= '' then
  redis.call('HSET', KEYS[3], 'digest', ARGV[3], 'member', member)
  redis.call('EXPIRE', KEYS[3], tonumber(ARGV[2]))
end
return member
"""
_RETRY = "send it again later (a verdict on an answer id is kept once however often it is sent)"
# Threads for verdicts, lookups and exports: their own, so a hung Redis, which holds each of them for the client's
# timeout, cannot take the event loop's default threads, which every answer needs (remembering it, combining).
_VERDICT_THREADS = 4


class RedisFeedbackStore(FeedbackStore):
    """Verdicts and the answers they name, shared by every replica (see the module's notes).

    ``client`` serves verdicts, lookups and exports (off the event loop, on threads of their own, so it may wait
    ``timeout_s`` without holding up answers); ``remember_client`` serves ``remember``, which runs on every
    answer, with a short timeout, so a hung Redis delays an answer by at most that once per outage. After a
    verdict call finds Redis unreachable, the next ``timeout_s`` of verdict calls are refused at once (503)
    instead of each waiting out the timeout. Messages raised to callers name no host (clients read them); the
    details, with credentials redacted, go to the log."""

    metric_name = "feedback"

    def __init__(self, client: redis.Redis, key_prefix: str = "moe:", *, remember_client: redis.Redis | None = None,
                 where: str = "redis", retention_s: float = REDIS_REQUEST_RETENTION_S, timeout_s: float = 2.0) -> None:
        self.client = client
        self.remember_client = remember_client or client
        self.key_prefix = key_prefix
        self.where = where  # for the log: the URL with any credentials redacted
        self.retention_s = retention_s
        self._add = client.register_script(_ADD)
        # PINGed on a thread while down, so the outage ends when Redis answers, not with the next answer remembered
        # (a replica taking only verdicts read as down until then).
        self._outage = _Outage("feedback", 5.0, fallback="answers are not remembered for rating by id",
                               probe=self.remember_client.ping)
        self._down_s = timeout_s
        self._down_until = 0.0  # verdict calls are refused at once until then (monotonic): Redis was unreachable
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=_VERDICT_THREADS,
                                                           thread_name_prefix="moe-feedback")

    @classmethod
    def from_config(cls, config: StateConfig, environ: Mapping[str, str], *, timeout_s: float = 2.0,
                    remember_timeout_s: float = 0.25,
                    retention_s: float = REDIS_REQUEST_RETENTION_S) -> RedisFeedbackStore:
        """A store on ``state``'s Redis."""
        url = redis_url(config, environ)
        redis = _redis_module()

        def client(timeout: float) -> Any:
            return _from_url(redis.Redis.from_url, url, config, socket_timeout=timeout,
                             socket_connect_timeout=timeout)

        return cls(client(timeout_s), config.key_prefix, remember_client=client(remember_timeout_s),
                   where=str(redact(url)), retention_s=retention_s, timeout_s=timeout_s)

    def _answer_key(self, request_id: str) -> str:
        return f"{self.key_prefix}feedback:answer:{request_id}"

    @property
    def _verdicts(self) -> str:
        return f"{self.key_prefix}feedback:verdicts"

    def _unavailable(self, doing: str, exc: Exception, advice: str) -> FeedbackUnavailable:
        # A reply that is an error (out of memory, read-only replica) is not an outage; say which it was.
        refused = isinstance(exc, _redis_module().ResponseError)
        state = "refused the command" if refused else "is unreachable"
        if not refused:
            self._down_until = time.monotonic() + self._down_s
        log.warning("feedback store %s %s while %s: %s", self.where, state, doing,
                    redact(f"{type(exc).__name__}: {exc}"))
        return FeedbackUnavailable(f"the feedback store {state} while {doing}; {advice}")

    def _refuse_while_down(self, doing: str, advice: str) -> None:
        """Refuse at once while a verdict call has just found Redis unreachable (nothing is sent, so nothing is
        stored): a hung Redis would otherwise hold every verdict, lookup and export for the client's timeout."""
        if time.monotonic() < self._down_until:
            raise FeedbackUnavailable(f"the feedback store is unreachable while {doing}; {advice}")

    def remember(self, request_id: str, query: str, expert: str, key: str | None = None) -> None:
        if self._outage.active():
            return
        entry = self._answer_key(request_id)
        try:
            pipe = self.remember_client.pipeline(transaction=True)
            pipe.hset(entry, mapping={"query": query, "expert": expert, "created": repr(time.time())})
            if key:  # the client key the answer was given to, which alone may rate it by id
                pipe.hset(entry, "key", key)
            pipe.expire(entry, max(1, int(self.retention_s)))
            pipe.execute()
        except _redis_module().RedisError as exc:
            self._outage.begin(exc)  # the answer stands; only a verdict by its id is lost (by query still works)
        else:
            self._outage.ended()

    def answered(self, request_id: str) -> Answered | None:
        self._refuse_while_down("looking up the answer", "nothing was stored; " + _RETRY)
        try:
            raw = self.client.hgetall(self._answer_key(request_id))
        except _redis_module().RedisError as exc:
            raise self._unavailable("looking up the answer", exc, "nothing was stored; " + _RETRY) from exc
        if not raw:
            return None
        fields = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                  for k, v in raw.items()}
        return Answered(id=request_id, query=fields["query"], expert=fields["expert"], created=float(fields["created"]),
                        key=fields.get("key"))

    def add(self, query: str, expert: str, score: float, *, request_id: str | None = None,
            note: str | None = None) -> FeedbackRecord:
        body = {"request_id": request_id, "query": query, "expert": expert, "score": score, "note": note}
        payload = json.dumps(body, sort_keys=True)
        # A verdict on an answer id is the client's to resend after a timeout: one the same as the latest on that
        # answer and expert is kept once.
        latest = (f"{self.key_prefix}feedback:last:"
                  f"{hashlib.sha256(json.dumps([request_id, expert]).encode()).hexdigest()}"
                  if request_id is not None else "")
        self._refuse_while_down("storing a verdict", "nothing was stored; " + _RETRY)
        try:
            member = self._add(keys=[f"{self.key_prefix}feedback:next_id", self._verdicts, latest],
                               args=[payload, max(1, int(self.retention_s)),
                                     hashlib.sha256(payload.encode()).hexdigest()])
        except _redis_module().RedisError as exc:
            raise self._unavailable("storing a verdict", exc, "it may or may not have been stored; " + _RETRY) \
                from exc
        return FeedbackRecord.model_validate_json(member)

    def records(self, since: float | None = None) -> list[FeedbackRecord]:
        advice = "check the Redis that state.url_env names (the log has the details), or train with --no-feedback"
        self._refuse_while_down("reading the verdicts", advice)
        try:
            raw = self.client.zrangebyscore(self._verdicts, "-inf" if since is None else repr(since), "+inf")
        except _redis_module().RedisError as exc:
            raise self._unavailable("reading the verdicts", exc, advice) from exc
        return sorted((FeedbackRecord.model_validate_json(member) for member in raw if isinstance(member, str | bytes)),
                      key=lambda r: r.id)

    def redis_up(self) -> bool:
        """False while answers are not remembered, or verdicts are refused at once, for an outage
        (``moe_redis_up``)."""
        return not self._outage.down and time.monotonic() >= self._down_until

    def assume_down(self, exc: Exception) -> None:
        """As ``RedisRateStore.assume_down``, probed on the client that remembers answers."""
        self._outage.begin(exc, said=True)

    async def aremember(self, request_id: str, query: str, expert: str, key: str | None = None) -> None:
        if self._outage.active():  # skipped during an outage: not even a thread is needed
            return
        # On the default threads, not the verdicts' (``_off_loop``): an answer waits for this, and must not queue
        # behind verdicts that a slow Redis holds for the client's timeout; ``remember`` has a short one of its own.
        await asyncio.to_thread(self.remember, request_id, query, expert, key)

    async def asubmit(self, body: FeedbackBody, experts: Sequence[str], key: str | None = None) -> FeedbackRecord:
        return await self._off_loop(self.submit, body, experts, key)

    async def arecords(self, since: float | None = None) -> list[FeedbackRecord]:
        return await self._off_loop(self.records, since)

    async def _off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await in_pool(self._pool, fn, *args)

    def close(self) -> None:
        self._outage.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()
        if self.remember_client is not self.client:
            self.remember_client.close()


def redis_url(config: StateConfig, environ: Mapping[str, str]) -> str:
    """The URL ``state.url_env`` names; a ``ConfigError`` naming the variable, never its value, where it holds
    none redis-py can read (``StateConfig.redis_url``)."""
    return config.redis_url(environ)


def _from_url(factory: Callable[..., Any], url: str, config: StateConfig, **options: Any) -> Any:
    """``factory(url, **options)``, a redis-py client. redis-py parses the URL there, and its ValueError may quote
    part of it (a password's start read as a port): it becomes one naming the variable, without its value."""
    try:
        client = factory(url, **options)
    except ValueError:
        raise ConfigError("<environment>", [("state.url_env", (
            f"environment variable {config.url_env} holds a URL redis-py cannot read (its value is not shown: it "
            "may hold a password); the form is redis://[[user]:password@]host[:port][/db][?option=value], with a "
            "password's '/', '?', '#' and '@' percent-encoded"))]) from None
    pool = client.connection_pool
    try:  # a connection is made (not connected) only at the first command: an option it does not take fails there
        pool.connection_class(**pool.connection_kwargs)
    except TypeError as exc:
        option = re.search(r"argument '(\w+)'", str(exc))
        named = f"option {option.group(1)!r}" if option else "an option"
        why = ("the asyncio connection the rate limits use does not take it (nor OCSP options)"
               if url.lower().startswith("rediss://") else "an ssl_* option belongs to a rediss:// URL, TLS")
        raise ConfigError("<environment>", [("state.url_env", (
            f"environment variable {config.url_env} holds a URL whose {named} this kind of connection does not "
            f"take ({why}); the value is not shown"))]) from None
    return client


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


def redis_url_problems(config: StateConfig, environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """What ``moe serve`` would refuse in the URL ``state.url_env`` names, found without connecting: its client is
    built (redis-py reads the URL and its options) and closed. ``moe config check`` says it; nothing for
    ``backend: memory``."""
    if config.backend == "memory":
        return []
    try:
        url = redis_url(config, environ)
        _redis_module()
        import redis
        import redis.asyncio

        _from_url(redis.Redis.from_url, url, config).close()
        # The rate limits' client too, whose connections take fewer options (no OCSP ones); built, never connected.
        _from_url(redis.asyncio.Redis.from_url, url, config)
    except ConfigError as exc:
        return exc.problems
    return []


def check_redis(config: StateConfig, environ: Mapping[str, str], *, timeout_s: float = 2.0) -> Exception | None:
    """At start, one PING to the Redis ``state.url_env`` names. A Redis that refuses the URL's credentials (a wrong
    password or user, or none where one is required) is a ``ConfigError`` naming the variable, never its value:
    otherwise the replica would run alone (its own rate limits and breakers, every verdict refused) while its
    /health said all was well. So is one that answers PING with an error (a database number it lacks) or offers a
    TLS certificate that fails verification: no wait mends either. One that does not answer is logged and served
    without, as an outage later is: it may come up after the router; its error is returned, for the stores to start
    on their own (``SharedState.assume_redis_down``). Nothing for ``backend: memory``; None where Redis answers."""
    if config.backend == "memory":
        return None
    url = redis_url(config, environ)
    _redis_module()
    import redis

    client = _from_url(redis.Redis.from_url, url, config, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        client.ping()
    except (redis.AuthenticationError, redis.exceptions.NoPermissionError) as exc:
        raise ConfigError("<environment>", [("state.url_env", (
            f"the Redis that environment variable {config.url_env} names refused its credentials "
            f"({type(exc).__name__}: {redact(str(exc))}); set the password (redis://:password@host:port/db) or the "
            "user and password its ACL expects (the value is not shown)"))]) from None
    except redis.ResponseError as exc:
        # It answered, with an error no wait will mend (a database number it does not have, say).
        raise ConfigError("<environment>", [("state.url_env", (
            f"the Redis that environment variable {config.url_env} names answered PING with an error "
            f"({type(exc).__name__}: {redact(str(exc))}); check the URL's database number and options (the value "
            "is not shown)"))]) from None
    except redis.RedisError as exc:
        if _certificate_refused(exc):
            raise ConfigError("<environment>", [("state.url_env", (
                f"the Redis that environment variable {config.url_env} names offered a TLS certificate that "
                f"failed verification ({redact(str(exc))[:200]}); give the CA that signed it "
                "(?ssl_ca_certs=/path/ca.pem) or fix the host name (the value is not shown)"))]) from None
        log.warning("state: the Redis that %s names (%s) does not answer at start (%s); serving with this "
                    "replica's own rate limits and breakers until it does", config.url_env, redact(url),
                    redact(f"{type(exc).__name__}: {exc}"))
        return exc
    finally:
        client.close()
    return None


def _certificate_refused(exc: BaseException) -> bool:
    """Whether ``exc``, or what caused it, is a TLS certificate that failed verification: no outage, which a
    wait would end, but a setting to fix."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


# Connections the rate store keeps to Redis per process: as many requests take a token at once (a take is a
# fraction of a millisecond), and more wait for one. Few enough to open at once within the connect timeout.
RATE_CONNECTIONS = 16


def build_shared_state(config: StateConfig, environ: Mapping[str, str], *, timeout_s: float = 0.25) -> SharedState:
    """The stores ``config`` names. Connections open lazily, at first use, on the loop that serves."""
    if config.backend == "memory":
        return SharedState()
    url = redis_url(config, environ)
    _redis_module()
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
        rate_store=RedisRateStore(_from_url(rate_client, url, config,
                                            retry=redis.asyncio.retry.Retry(NoBackoff(), 0), **timeouts),
                                  config.key_prefix),
        breaker_store=RedisBreakerStore(_from_url(redis.Redis.from_url, url, config,
                                                  retry=redis.retry.Retry(NoBackoff(), 0), **timeouts),
                                        config.key_prefix),
    )
