"""``RedisFeedbackStore`` (``router.feedback.FeedbackStore``): the answers verdicts may name, one hash each
(``<prefix>feedback:answer:<id>``, expiring after the retention), and the verdicts in one sorted set
(``<prefix>feedback:verdicts``, scored by creation time, ids from ``INCR``), so every replica records into, and
``moe train`` reads from, one store. Verdicts are data, not soft state: a verdict that cannot be stored raises
``FeedbackUnavailable`` (the service answers 503, so the client can send it again) instead of being kept locally, and
an answer that cannot be remembered is logged and can still be rated by query and expert."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from router.config import StateConfig
from router.feedback import (
    REDIS_REQUEST_RETENTION_S,
    Answered,
    FeedbackBody,
    FeedbackRecord,
    FeedbackStore,
    FeedbackUnavailable,
    in_pool,
)
from router.redis_client import Outage, from_url, redis_module, redis_url
from router.security import redact

if TYPE_CHECKING:
    import redis
    import redis.asyncio



__all__ = ["RedisFeedbackStore"]

log = logging.getLogger("router.state")



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
        self._outage = Outage("feedback", 5.0, fallback="answers are not remembered for rating by id",
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
        redis = redis_module()

        def client(timeout: float) -> Any:
            return from_url(redis.Redis.from_url, url, config, socket_timeout=timeout,
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
        refused = isinstance(exc, redis_module().ResponseError)
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
        except redis_module().RedisError as exc:
            self._outage.begin(exc)  # the answer stands; only a verdict by its id is lost (by query still works)
        else:
            self._outage.ended()

    def answered(self, request_id: str) -> Answered | None:
        self._refuse_while_down("looking up the answer", "nothing was stored; " + _RETRY)
        try:
            raw = self.client.hgetall(self._answer_key(request_id))
        except redis_module().RedisError as exc:
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
        except redis_module().RedisError as exc:
            raise self._unavailable("storing a verdict", exc, "it may or may not have been stored; " + _RETRY) \
                from exc
        return FeedbackRecord.model_validate_json(member)

    def records(self, since: float | None = None) -> list[FeedbackRecord]:
        advice = "check the Redis that state.url_env names (the log has the details), or train with --no-feedback"
        self._refuse_while_down("reading the verdicts", advice)
        try:
            raw = self.client.zrangebyscore(self._verdicts, "-inf" if since is None else repr(since), "+inf")
        except redis_module().RedisError as exc:
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
