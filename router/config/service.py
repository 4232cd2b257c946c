"""The service's sections: ``service`` (names, address, limits), ``security`` (keys, rate limits), ``state``
(shared with other replicas through Redis), ``tracing`` and ``feedback``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal

from pydantic import (
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from router.config.fields import (
    ENV_NAME_PATTERN,
    NAME_PATTERN,
    ConfigError,
    FilePath,
    Strict,
)


class ServiceConfig(Strict):
    # The model name that routes, next to "auto"; expert names call that expert directly.
    name: str = Field(default="moe-router", pattern=NAME_PATTERN)
    # The address ``moe serve`` binds; never empty: "" binds every interface, as 0.0.0.0 and :: do, so a
    # ``${VAR:-127.0.0.1}`` whose variable was blank would silently expose the service.
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    max_request_bytes: int = Field(default=1_000_000, ge=1024, le=100_000_000)
    # Seconds a request's whole body may take to arrive (408 after): a client that sends part of it and then
    # nothing would otherwise hold its connection, and a graceful shutdown, for ever.
    body_timeout_s: float = Field(default=30.0, gt=0.0, le=3600.0)
    max_prompt_chars: int = Field(default=100_000, ge=16, le=10_000_000)
    # Queries one ``/v1/route/batch`` request may carry; it is one request to the rate limit, however many.
    max_batch_queries: int = Field(default=1024, ge=1, le=100_000)
    # Put prompts and answers in the per-request log lines. Off by default: they may hold personal data.
    log_content: bool = False
    # The names the service answers to, as a request's Host header gives them (its port aside): exact names,
    # ``*.example.com`` for any under a domain, ``*`` for any. None: any, except that with no client keys a service
    # reached on a loopback address answers to loopback names only (``router.security.host_refused``: DNS
    # rebinding). /health answers whatever the Host.
    allowed_hosts: list[str] | None = None
    # ``moe serve``: seconds between checks for hot reload of the config file and of what its build reads that may
    # change (``router.build.config_inputs``: the gate artifact, nested routers' configs); None turns polling off
    # (SIGHUP and ``POST /admin/reload`` still reload).
    reload_poll_s: float | None = Field(default=2.0, gt=0.0, le=3600.0)

    @field_validator("allowed_hosts")
    @classmethod
    def _host_patterns(cls, hosts: list[str] | None) -> list[str] | None:
        if hosts is None:
            return None
        for host in hosts:
            name = host[2:] if host.startswith("*.") else host
            # A name, or an IPv6 address: in brackets, or bare with two colons at least (so "db:80" is no address).
            if host != "*" and not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*|\[[0-9A-Fa-f:.]*\]"
                                                r"|[0-9A-Fa-f.]*:[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*", name):
                raise ValueError(f"{host!r} is not a host name, '*.' and a domain, or '*' (no port: any port "
                                 "matches)")
        return [h.lower().strip("[]").rstrip(".") for h in hosts]

    @field_validator("host")
    @classmethod
    def _host_given(cls, host: str, info: ValidationInfo) -> str:
        # A ``${VAR}`` left blank is reported as unset (or passed on by ``moe compose``), not again here.
        if not host.strip() and "service.host" not in (info.context or {}).get("blanked", frozenset()):
            raise PydanticCustomError(
                "empty_host", "must not be empty: an empty host binds every interface; give an address "
                "(127.0.0.1 for this machine only, 0.0.0.0 for every interface)")
        return host


class RateLimitConfig(Strict):
    """A token bucket per client key: ``burst`` requests at once, refilled at ``rate_per_s``."""

    rate_per_s: float = Field(gt=0.0, le=1_000_000.0)
    burst: int = Field(default=10, ge=1, le=1_000_000)


class ApiKeyConfig(Strict):
    """A client key, held only as its SHA-256 (``printf %s "$KEY" | sha256sum``); the key is never in the file."""

    name: str = Field(pattern=NAME_PATTERN)
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    # Overrides ``security.rate_limit`` for this key.
    rate_limit: RateLimitConfig | None = None


class SecurityConfig(Strict):
    """Client keys, the admin key and rate limits (see ``router.security``). Nothing set: ``/v1`` stays open."""

    api_keys: list[ApiKeyConfig] = Field(default=[])
    # An environment variable holding comma-separated raw client keys, hashed at startup. Once named, ``/v1``
    # needs a key even while the variable is empty: a missing secret fails closed.
    api_keys_env: str | None = Field(default=None, pattern=ENV_NAME_PATTERN)
    # The environment variable holding the admin key; unset, the ``/admin`` endpoints refuse every call.
    admin_key_env: str | None = Field(default=None, pattern=ENV_NAME_PATTERN)
    # Per key; with no keys configured, per client address. None: no limit.
    rate_limit: RateLimitConfig | None = None
    # The endpoints outside /v1 and /admin that answer without a key: "metrics" (/metrics) and "docs" (/docs,
    # /redoc, /openapi.json). One left out needs a client key, as /v1 does. /health always answers, for probes.
    open_endpoints: list[Literal["metrics", "docs"]] = Field(default=["metrics", "docs"])

    @model_validator(mode="after")
    def _distinct(self) -> SecurityConfig:
        names = [k.name for k in self.api_keys]
        hashes = [k.sha256.lower() for k in self.api_keys]
        if len(set(names)) != len(names):
            raise ValueError("api_keys: duplicate key name")
        if len(set(hashes)) != len(hashes):
            raise ValueError("api_keys: the same key hash is listed twice")
        taken = [name for name in names if re.fullmatch(r"env-[0-9]+", name)] if self.api_keys_env else []
        if taken:
            raise ValueError(f"api_keys: the name {taken[0]!r} is the one the service gives a key of api_keys_env "
                             "(env-1, env-2, ... by its place in the variable); rename it")
        return self


class StateConfig(Strict):
    """Where state shared by replicas lives (breakers, rate limits): this process, or Redis (``router.state_redis``)."""

    backend: Literal["memory", "redis"] = "memory"
    # The environment variable holding the Redis URL (``redis://:password@host:6379/0``), never the URL itself.
    url_env: str = Field(default="MOE_REDIS_URL", pattern=ENV_NAME_PATTERN)
    # Every key starts with this, so several routers (or other apps) can share one Redis.
    key_prefix: str = Field(default="moe:", max_length=64)

    def redis_url(self, environ: Mapping[str, str]) -> str:
        """The URL in ``url_env``, stripped; a ``ConfigError`` naming the variable, never its value, where it holds
        none redis-py can read."""
        url = environ.get(self.url_env, "").strip()
        from router.config.checks import redis_url_problem  # as in RouterConfig._cross_check

        problem = redis_url_problem(self.url_env, url, is_set=self.url_env in environ)
        if problem:
            raise ConfigError("<environment>", [("state.url_env", problem)])
        return url


class TracingConfig(Strict):
    """OpenTelemetry spans, one per expert call (``router.tracing``); off: no-op, and the SDK is never imported."""

    enabled: bool = False
    service_name: str = Field(default="moe-router", min_length=1)


class FeedbackConfig(Strict):
    """Feedback on answers (``router.feedback``): stored in SQLite, folded into the next gate by ``moe train``."""

    # Off: ``POST /v1/feedback`` answers 409, answers are not remembered, and ``moe train`` ignores the store.
    enabled: bool = True
    # The SQLite file, relative to the config file; None: ``feedback.sqlite3`` next to ``gate.artifact``.
    path: FilePath | None = None
    # How long an answer can be rated by its id alone (its query and expert are kept that long). None: 30 days in
    # SQLite, one day in Redis, where every remembered answer holds memory (about 1 KB each).
    remember_s: float | None = Field(default=None, gt=0, le=365 * 86400)
