"""Connecting to Redis, and riding out its outages: the URL (from the environment, never the file) and the client it's
read into, the start's check (``check_redis``: credentials refused stop it; a Redis that does not answer yet is served
without), and ``Outage``, which a store keeps to serve on its own while Redis is down and to notice when it answers
again. The ``redis`` package is imported lazily; install it with ``pip install redis``."""

from __future__ import annotations

import logging
import re
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from router.config import ConfigError, StateConfig
from router.security import redact

if TYPE_CHECKING:

    pass


__all__ = ["Outage", "certificate_refused", "check_redis", "from_url", "redis_module", "redis_url",
           "redis_url_problems", "unreachable"]

log = logging.getLogger("router.state")



def redis_module() -> Any:
    try:
        import redis
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("state.backend: redis needs the redis package: pip install redis") from exc
    return redis


class Outage:
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
            if probe is not None and unreachable(exc) and not self._stop.is_set():
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


def unreachable(exc: Exception) -> bool:
    """Whether ``exc`` says Redis could not be reached (no connection, a timeout), rather than that it answered
    with an error."""
    redis = redis_module()
    return isinstance(exc, redis.ConnectionError | redis.TimeoutError | SlowRedis)


def redis_url(config: StateConfig, environ: Mapping[str, str]) -> str:
    """The URL ``state.url_env`` names; a ``ConfigError`` naming the variable, never its value, where it holds
    none redis-py can read (``StateConfig.redis_url``)."""
    return config.redis_url(environ)


def from_url(factory: Callable[..., Any], url: str, config: StateConfig, **options: Any) -> Any:
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


def redis_url_problems(config: StateConfig, environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """What ``moe serve`` would refuse in the URL ``state.url_env`` names, found without connecting: its client is
    built (redis-py reads the URL and its options) and closed. ``moe config check`` says it; nothing for
    ``backend: memory``."""
    if config.backend == "memory":
        return []
    try:
        url = redis_url(config, environ)
        redis_module()
        import redis
        import redis.asyncio

        from_url(redis.Redis.from_url, url, config).close()
        # The rate limits' client too, whose connections take fewer options (no OCSP ones); built, never connected.
        from_url(redis.asyncio.Redis.from_url, url, config)
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
    redis_module()
    import redis

    client = from_url(redis.Redis.from_url, url, config, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
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
        if certificate_refused(exc):
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


def certificate_refused(exc: BaseException) -> bool:
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



class SlowRedis(Exception):
    """Redis answers, but each breaker call's round trip holds the event loop past ``RedisBreakerStore.slow_s``."""
