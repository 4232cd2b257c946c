"""The error tree every expert speaks.

Transport libraries raise their own exceptions (httpx.ConnectError, httpx.ReadTimeout, ...). Experts translate
them here, at the boundary, so the router only ever catches ``ExpertError``::

    ExpertError                      any failure of one expert call
    ├── ExpertUnavailable            cannot connect / connection reset / process gone   (transient)
    ├── ExpertTimeout                no answer within the attempt's time limit           (transient)
    ├── ExpertOverloaded             the expert's in-flight limit is reached             (transient)
    ├── ExpertProtocolError          malformed JSON or SSE from the endpoint             (transient)
    ├── ExpertHTTPError              the endpoint answered with an error status
    │   ├── ExpertRateLimited        429, with the Retry-After it sent                   (transient)
    │   ├── ExpertServerError        5xx                                                 (transient)
    │   └── ExpertRejected           other 4xx: the request itself is wrong              (permanent)
    │       └── ExpertAuthError      401 / 403                                           (permanent)
    ├── NoRecording                  a replay expert holds no recording for the prompt   (permanent)
    └── ExpertConfigError            the expert cannot be built from its config          (permanent)

``transient`` tells the fallback policy whether a retry of the same expert may succeed. Messages never carry
an API key: experts build them from status codes and short body excerpts only.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

# The HTTP status a moe-router service answers with, by its error code: what an error event in the middle of one's
# stream (which has no status of its own) stands for, to another router (``type: router`` over HTTP) and the SDK.
ROUTER_STATUS_BY_CODE = MappingProxyType({"rejected_by_experts": 400, "all_experts_failed": 503,
                                          "internal_error": 500})

__all__ = [
    "INVALID_REQUEST_STATUSES",
    "ExpertAuthError",
    "ExpertConfigError",
    "ExpertError",
    "ExpertHTTPError",
    "ExpertOverloaded",
    "ExpertProtocolError",
    "ExpertRateLimited",
    "ExpertRejected",
    "ExpertServerError",
    "ExpertTimeout",
    "ExpertUnavailable",
    "NoRecording",
]


# What an OpenAI-compatible server answers to a request it finds invalid: bad parameters, too long a prompt. (A
# 404, a model the server does not serve, is the deployment's fault, as are 401 and 403.)
INVALID_REQUEST_STATUSES = frozenset({400, 413, 422})


class ExpertError(Exception):
    """One expert call failed. ``kind`` is a short stable label used in traces and metrics."""

    kind = "error"
    transient = False
    # Seconds the caller should wait before calling this expert again, when someone said: the expert's own
    # Retry-After (a 429's or a 503's), or how long its open circuit breaker will refuse calls. None otherwise.
    retry_after_s: float | None = None
    # For an expert that is another moe-router (``type: router``) over HTTP: the trace its error carried (its
    # ``moe`` field), so what it tried and spent before failing still counts. None otherwise.
    nested: dict[str, Any] | None = None
    # What the upstream reported it spent on a call it still failed (a 200 whose body was refused, with its
    # ``usage``): the ``Attempt`` fields ``usage``, ``cost_usd`` and ``usage_estimated``, so the failed attempt is
    # counted at that, not as free. None otherwise.
    spent: dict[str, Any] | None = None

    def __init__(self, expert: str, message: str) -> None:
        super().__init__(f"{expert}: {message}")
        self.expert = expert
        self.message = message

    def to_dict(self) -> dict[str, str]:
        return {"expert": self.expert, "kind": self.kind, "message": self.message}


class ExpertUnavailable(ExpertError):
    kind = "unavailable"
    transient = True


class ExpertTimeout(ExpertError):
    kind = "timeout"
    transient = True


class ExpertOverloaded(ExpertError):
    kind = "overloaded"
    transient = True


class ExpertProtocolError(ExpertError):
    kind = "protocol"
    transient = True


class ExpertHTTPError(ExpertError):
    kind = "http"

    def __init__(self, expert: str, status: int, message: str) -> None:
        super().__init__(expert, f"HTTP {status}: {message}")
        self.status = status


class ExpertRateLimited(ExpertHTTPError):
    kind = "rate_limited"
    transient = True

    def __init__(self, expert: str, status: int, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(expert, status, message)
        self.retry_after_s = retry_after_s


class ExpertServerError(ExpertHTTPError):
    """A 5xx. ``retry_after_s``: the wait a 503's Retry-After asked for (how long the server expects to be
    unavailable, RFC 9110 10.2.3); None when it sent none."""

    kind = "server_error"
    transient = True

    def __init__(self, expert: str, status: int, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(expert, status, message)
        self.retry_after_s = retry_after_s


class ExpertRejected(ExpertHTTPError):
    """The expert refused the request (4xx). ``param``: the request field it blamed (OpenAI's ``error.param``),
    when it named one."""

    kind = "rejected"

    def __init__(self, expert: str, status: int, message: str, param: str | None = None) -> None:
        super().__init__(expert, status, message)
        self.param = param


class ExpertAuthError(ExpertRejected):
    kind = "auth"


class NoRecording(ExpertError):
    kind = "no_recording"


class ExpertConfigError(ExpertError):
    """An expert's config that its type cannot build on; ``field``, where known, the key at fault within the
    expert's block (``replay.path``), which ``moe config check`` appends to the expert's path."""

    kind = "config"

    def __init__(self, expert: str, message: str, field: str | None = None) -> None:
        super().__init__(expert, message)
        self.field = field
