"""Who may call the service, and how often: client keys, the admin key and per-key rate limits.

The decisions are made here, apart from HTTP; ``router.service`` turns a ``Denied`` into an OpenAI-style error.

- Keys are only ever held as SHA-256 hex digests. Raw keys from the environment are hashed when the service
  starts and dropped; a presented key is hashed and compared with ``hmac.compare_digest`` against every known
  digest, with no early exit, so the time taken does not tell which key came close.
- Rate limits are token buckets (``take_token``, pure). Their state sits behind ``RateStore``, one async
  method, so a store shared by several replicas (Redis) can replace ``InMemoryRateStore`` without touching
  the rest.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import ipaddress
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from experts.redact import redact  # re-exported: the service and the state stores use it from here
from router.config import RateLimitConfig, SecurityConfig
from router.config.checks import looks_like_secret, variable_state
from router.errors import retry_after_header

__all__ = [
    "Admitted",
    "Denied",
    "Guard",
    "InMemoryRateStore",
    "KeyRing",
    "RateStore",
    "TokenBucket",
    "bearer_token",
    "hash_key",
    "host_refused",
    "redact",
    "take_token",
]



def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


def bearer_token(authorization: str | None) -> str | None:
    """The key in an ``Authorization: Bearer <key>`` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


@dataclass(frozen=True)
class _Key:
    name: str
    sha256: str
    rate_limit: RateLimitConfig | None = None


class KeyRing:
    """The client keys and the admin key, as digests. ``required`` is whether ``/v1`` needs a key at all;
    ``admin_missing`` says why there is no admin key (never what a key is)."""

    def __init__(self, keys: list[_Key], admin_sha256: str | None = None, *, required: bool | None = None,
                 admin_missing: str = "set security.admin_key_env") -> None:
        self.keys = keys
        self.admin_sha256 = admin_sha256
        self.required = bool(keys) if required is None else required
        self.admin_missing = admin_missing

    @classmethod
    def from_config(cls, config: SecurityConfig, environ: Mapping[str, str]) -> KeyRing:
        keys = [_Key(k.name, k.sha256.lower(), k.rate_limit) for k in config.api_keys]
        if config.api_keys_env:
            raw = [k.strip() for k in environ.get(config.api_keys_env, "").split(",") if k.strip()]
            # Named by place in the variable (env-1, env-2, ...), the same on every replica. Not by the digest: even
            # a prefix of an unsalted hash in every log line lets anyone who reads the logs test guesses offline.
            digests = dict.fromkeys(hash_key(k) for k in raw)
            keys += [_Key(f"env-{place}", d) for place, d in enumerate(digests, start=1)]
        admin = environ.get(config.admin_key_env, "").strip() if config.admin_key_env else ""
        return cls(keys, hash_key(admin) if admin else None,
                   required=bool(config.api_keys) or config.api_keys_env is not None,
                   admin_missing=_admin_missing(config.admin_key_env, environ))

    def client(self, raw: str) -> _Key | None:
        digest = hash_key(raw)
        found = None
        for key in self.keys:
            if hmac.compare_digest(digest, key.sha256) and found is None:
                found = key
        return found

    def is_admin(self, raw: str) -> bool:
        return self.admin_sha256 is not None and hmac.compare_digest(hash_key(raw), self.admin_sha256)


def _admin_missing(admin_key_env: str | None, environ: Mapping[str, str]) -> str:
    """Why ``/admin`` is off: no variable named, or the one named unset or blank (by its name, never its value)."""
    if not admin_key_env:
        return "set security.admin_key_env"
    if admin_key_env not in environ and looks_like_secret(admin_key_env):
        return f"security.admin_key_env: {variable_state(admin_key_env, is_set=False)}"
    state = "not set" if admin_key_env not in environ else "empty"
    return f"the variable security.admin_key_env names ({admin_key_env}) is {state}"


@dataclass(frozen=True)
class TokenBucket:
    tokens: float
    stamp: float


def take_token(bucket: TokenBucket | None, limit: RateLimitConfig, now: float) -> tuple[TokenBucket, float]:
    """Refill by the time passed, then take one token. Returns the new bucket and the wait (0.0: granted)."""
    if bucket is None:
        tokens = float(limit.burst)
    else:
        tokens = min(float(limit.burst), bucket.tokens + max(0.0, now - bucket.stamp) * limit.rate_per_s)
    if tokens >= 1.0:
        return TokenBucket(tokens - 1.0, now), 0.0
    return TokenBucket(tokens, now), (1.0 - tokens) / limit.rate_per_s


class RateStore(Protocol):
    """Where buckets live. ``take`` takes one token from ``key``'s bucket and returns the wait (0.0: granted)."""

    async def take(self, key: str, limit: RateLimitConfig) -> float: ...


class InMemoryRateStore:
    """Buckets for one process. ``take`` never awaits, so it is atomic on the event loop."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000) -> None:
        self.clock = clock
        # Bounded, least recently used first out: with no keys the buckets are per client address.
        self.max_keys = max_keys
        self._buckets: dict[str, TokenBucket] = {}

    async def take(self, key: str, limit: RateLimitConfig) -> float:
        bucket, wait = take_token(self._buckets.pop(key, None), limit, self.clock())
        self._buckets[key] = bucket
        if len(self._buckets) > self.max_keys:
            del self._buckets[next(iter(self._buckets))]
        return wait


@dataclass(frozen=True)
class Admitted:
    # The key's name from the config (never the key), or None when the service is open.
    key_name: str | None
    # The key's SHA-256, which ties an answer to the key it was given to (``router.feedback.answer_owner``); never
    # logged. A name is no such tie: api_keys_env names keys by place, so after a key is revoked the next one
    # takes its name.
    key_sha256: str | None = None


@dataclass(frozen=True)
class Denied:
    status: int
    code: str
    message: str
    type: str = "invalid_request_error"
    retry_after_s: float | None = None
    # The valid key a 429 refused (its name and digest, as ``Admitted`` has them): its log line names it.
    key_name: str | None = None
    key_sha256: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        if self.status == 401:
            return {"www-authenticate": "Bearer"}
        return retry_after_header(self.retry_after_s)


_NO_KEY = Denied(401, "missing_api_key", "this service needs an API key: send 'Authorization: Bearer <key>'")
# The message never repeats the key it was given. It opens with OpenAI's own words, which clients read: LiteLLM
# takes a 401 for an AuthenticationError only by them (a bad request otherwise).
_BAD_KEY = Denied(401, "invalid_api_key", "Incorrect API key provided: the API key given is not valid")


def host_refused(host_header: str | None, allowed: Sequence[str] | None, *, local: str | None,
                 keyless: bool) -> Denied | None:
    """Why a request naming ``host_header`` (its ``Host``) is refused, None when it is not. ``allowed``
    (``service.allowed_hosts``): the names it may give, ``*.example.com`` for any under a domain, ``*`` for any.
    Without them, a ``keyless`` service reached on a loopback address (``local``, the connection's own end) answers
    to loopback names only: a web page that points its own name at 127.0.0.1 (DNS rebinding) reaches it as a page
    of its own site, which the 415 on non-JSON bodies does not stop, but it sends its own name as the Host."""
    if not host_header:
        return None  # HTTP/1.0, or a client of no browser's: nothing a page could forge
    host = _host_name(host_header)
    if allowed is not None:
        if any(p == "*" or host == p or (p.startswith("*.") and host.endswith(p[1:])) for p in allowed):
            return None
        why = f"service.allowed_hosts lists {', '.join(allowed) or 'none'}"
    elif keyless and local is not None and _loopback(_host_name(local)) and not _loopback(host):
        why = ("a service reached on this machine with no client keys answers to localhost, 127.0.0.1 and [::1] "
               "only, as a web page could otherwise reach it by pointing its own name at 127.0.0.1; list the names "
               "it is reached by in service.allowed_hosts")
    else:
        return None
    shown = host_header if len(host_header) <= 100 else host_header[:97] + "..."
    return Denied(400, "invalid_host", f"Host {shown!r} is not one this service answers to: {why}")


def _host_name(host: str) -> str:
    """A Host header's (or an address's) name: lowercased, without its port, brackets and a closing dot."""
    host = host.strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def _loopback(host: str) -> bool:
    """Whether ``host`` names this machine: localhost (and names under it, RFC 6761), 127.0.0.0/8 or ::1, the
    wildcard addresses a server started on every interface prints (0.0.0.0, ::), and the machine's own host name
    (an /etc/hosts entry for 127.0.1.1, say). A web page can send none of them as the Host of its own site."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        # Only a name neither localhost nor an address asks for the machine's own: getfqdn may wait on DNS, which
        # the connection's address and the usual Host (127.0.0.1:8000, localhost) never need.
        return host in _own_names()
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or address.is_unspecified or (mapped is not None and mapped.is_loopback)


@functools.cache
def _own_names() -> frozenset[str]:
    """This machine's host name, and its fully qualified one, lowercased."""
    names = {socket.gethostname()}
    with contextlib.suppress(OSError):
        names.add(socket.getfqdn())
    return frozenset(n.lower().rstrip(".") for n in names if n)


def _rate_limited(limit: RateLimitConfig, who: str, wait: float, key: _Key | None = None) -> Denied:
    return Denied(429, "rate_limit_exceeded", f"rate limit of {limit.rate_per_s:g}/s (burst {limit.burst}) reached "
                  f"for {who}", "rate_limit_error", retry_after_s=wait,
                  key_name=key.name if key else None, key_sha256=key.sha256 if key else None)


class Guard:
    """Admits or denies one call: a client key and its rate limit for ``/v1``, the admin key for ``/admin``."""

    def __init__(self, keys: KeyRing, store: RateStore, rate_limit: RateLimitConfig | None = None) -> None:
        self.keys = keys
        self.store = store
        self.rate_limit = rate_limit

    @classmethod
    def from_config(cls, config: SecurityConfig, environ: Mapping[str, str], store: RateStore | None = None) -> Guard:
        return cls(KeyRing.from_config(config, environ), store or InMemoryRateStore(), config.rate_limit)

    async def admit_client(self, authorization: str | None, client: str) -> Admitted | Denied:
        key = None
        if self.keys.required:
            raw = bearer_token(authorization)
            if raw is None:
                return _NO_KEY
            key = self.keys.client(raw)
            if key is None:
                return await self._wrong_key(client)
        limit = key.rate_limit if key and key.rate_limit else self.rate_limit
        if limit is not None:
            # By the key itself, not its name: a key of api_keys_env is named by place, and a revoked key renames those
            # after it.
            wait = await self.store.take(f"key:{key.sha256}" if key else f"client:{client}", limit)
            if wait > 0:
                return _rate_limited(limit, f"key {key.name!r}" if key else "this client", wait, key)
        return Admitted(key.name, key.sha256) if key else Admitted(None)

    async def admit_admin(self, authorization: str | None, client: str) -> Admitted | Denied:
        if self.keys.admin_sha256 is None:
            return Denied(403, "admin_disabled", f"admin endpoints are disabled: {self.keys.admin_missing}",
                          "permission_error")
        raw = bearer_token(authorization)
        if raw is None:
            return _NO_KEY
        if self.keys.is_admin(raw):
            return Admitted("admin")
        if self.keys.client(raw) is not None:
            return Denied(403, "admin_key_required", "this endpoint needs the admin key", "permission_error")
        return await self._wrong_key(client)

    async def _wrong_key(self, client: str) -> Denied:
        """A wrong key, client or admin: it takes a token from its address's bucket at the service's rate, so keys
        cannot be guessed faster than an anonymous client could call; past it, a 429 rather than another 401."""
        if self.rate_limit is not None:
            wait = await self.store.take(f"client:{client}", self.rate_limit)
            if wait > 0:
                return _rate_limited(self.rate_limit, "this client's wrong keys", wait)
        return _BAD_KEY


