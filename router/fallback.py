"""Fallback decisions, kept apart from I/O: who is asked next, how long each attempt may take, what it may cost."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from experts.errors import (
    INVALID_REQUEST_STATUSES,
    ROUTER_STATUS_BY_CODE,
    ExpertAuthError,
    ExpertError,
    ExpertOverloaded,
    ExpertRejected,
    ExpertTimeout,
)
from router.errors import error_body

if TYPE_CHECKING:
    from router.trace import Trace

__all__ = ["BUDGET_HEADER", "CALL_SCOPE", "DEADLINE_HEADER", "FIRST_OUTPUT_HEADER", "LIMIT_HEADERS", "MAX_BUDGET_USD",
           "MAX_DEADLINE_S", "AllExpertsFailed", "BudgetSpent", "CallScope", "Deadline", "LimitError", "budget_spent",
           "next_candidate"]


class BudgetSpent(ExpertError):
    """The expert was not tried: the request's cost budget was already spent on earlier attempts."""

    kind = "budget_exhausted"


class AllExpertsFailed(Exception):
    """No candidate expert could answer. ``causes`` holds each expert's own error, in the order tried.

    An expert skipped by its open breaker appears with kind ``circuit_open``, a saturated one with ``overloaded``;
    one left untried because the cost budget was spent, with kind ``budget_exhausted``, and one fallback never
    reached (deadline, ``max_attempts``) with ``not_tried``.
    """

    def __init__(self, causes: list[ExpertError], reason: str | None = None, *,
                 retry_cap_s: float | None = None) -> None:
        self.causes = causes
        # The longest wait the answer's Retry-After may ask for: the breakers' own longest hold
        # (``cooldown_max_s``), past which the router calls the expert again whatever it asked.
        self.retry_cap_s = retry_cap_s
        if reason is None:
            spent = any(isinstance(c, BudgetSpent) for c in causes)
            reason = "no expert answered within the request's cost budget: each one tried failed, and the rest " \
                     "would not fit in it" if spent else "every candidate expert failed"
        detail = "; ".join(f"{c.expert} ({c.kind}): {c.message}" for c in causes) or "no expert was tried"
        super().__init__(f"{reason}: {detail}")

    def to_list(self) -> list[dict[str, str]]:
        return [c.to_dict() for c in self.causes]

    @property
    def retry_after_s(self) -> float | None:
        """The soonest any cause said an expert may be called again (its Retry-After, or its open breaker's
        next probe), for the answer's own Retry-After; None when none said, or when the request itself was at
        fault (a 400: sending it again later would not help)."""
        waits = [c.retry_after_s for c in self.causes if c.retry_after_s is not None]
        if not waits or self.status != 503:
            return None
        return min(waits) if self.retry_cap_s is None else min(*waits, self.retry_cap_s)

    # The HTTP status the service answers with, by error code: 400 when the request itself was refused, else 503.
    # A client that has only the error body (a stream's error event) reads the status from here too.
    STATUS_BY_CODE: ClassVar[Mapping[str, int]] = ROUTER_STATUS_BY_CODE

    @property
    def status(self) -> int:
        return self.STATUS_BY_CODE[self.code]

    @property
    def code(self) -> str:
        return "rejected_by_experts" if self.invalid_request else "all_experts_failed"

    def error_body(self) -> dict[str, Any]:
        """The OpenAI-style error object the service sends (and ``LocalRouter`` raises), with each cause."""
        param = None
        if self.invalid_request:
            message, kind = f"the request is invalid: every expert called refused it ({self})", "invalid_request_error"
            # The field at fault, where every expert called named the same one (as vLLM does: "logprobs").
            blamed = {getattr(c, "param", None) for c in self.called}
            param = blamed.pop() if len(blamed) == 1 else None
        else:
            message, kind = str(self), "service_unavailable"
        return error_body(message, kind, self.code, param, causes=self.to_list())

    @property
    def called(self) -> list[ExpertError]:
        """The causes of the experts that were called: an expert passed over without a call (``NOT_CALLED``)
        says nothing of the request or of the experts."""
        return [c for c in self.causes if c.kind not in NOT_CALLED]

    @property
    def invalid_request(self) -> bool:
        """Whether every expert that was called refused the request itself as invalid (HTTP 400, 413 or 422):
        the request is at fault, not the experts. An auth error or a 404 (the expert's model is unknown there)
        is the deployment's fault."""
        called = self.called
        return bool(called) and all(isinstance(c, ExpertRejected) and not isinstance(c, ExpertAuthError)
                                    and c.status in INVALID_REQUEST_STATUSES for c in called)

    @property
    def timed_out(self) -> bool:
        """Whether it failed for lack of time: every expert that was called timed out."""
        called = self.called
        return bool(called) and all(isinstance(c, ExpertTimeout) for c in called)

    @property
    def saturated(self) -> bool:
        """Whether it failed for lack of room: no expert was called, and one at least was at its in-flight
        limit (the others passed over too: breaker open, budget spent)."""
        return not self.called and any(c.kind == ExpertOverloaded.kind for c in self.causes)


# The causes that record an expert passed over without a call: its breaker was open, its in-flight limit full,
# the budget spent, or fallback stopped before reaching it.
NOT_CALLED = frozenset({"circuit_open", "overloaded", "budget_exhausted", "not_tried"})


def next_candidate(ranking: Iterable[str], taken: set[str], unavailable: Iterable[str] = ()) -> str | None:
    """The best-ranked expert not yet taken and not known to be unavailable; None when the ranking is spent."""
    skip = taken.union(unavailable)
    return next((name for name in ranking if name not in skip), None)


def budget_spent(limit_usd: float | None, spent_usd: float, next_call_usd: float = 0.0) -> bool:
    """Whether a request that has spent ``spent_usd`` may not make a further call estimated at ``next_call_usd``."""
    return limit_usd is not None and (spent_usd >= limit_usd or spent_usd + next_call_usd > limit_usd)


@dataclass
class Deadline:
    """What one request may use across every attempt: ``seconds`` from ``start``, and ``budget_usd`` (None: no
    cost budget). A nested router's are its own config's, narrowed to what its caller's call leaves it
    (``within``). ``fair_seconds`` judges whether an expert cut off had a fair chance (``router.dispatch``): the
    whole deadline, not what is left of it when a caller's fallback reached this router, and never a deadline a
    client set (``CallScope.fair_s``), so neither blames a healthy expert. A stream's
    caller may also need its first output sooner (``first_output_at``, ``time.monotonic()``): until the stream
    sends some (``output_sent``), that limit counts too."""

    seconds: float
    start: float = field(default_factory=time.monotonic)
    budget_usd: float | None = None
    fair_limit_s: float | None = None
    first_output_at: float = math.inf

    @classmethod
    def within(cls, seconds: float, budget_usd: float | None, caller: CallScope | None, *,
               stream: bool = False) -> Deadline:
        """A request's limits: the config's ``seconds`` and ``budget_usd``, or, for a router called as an expert
        (``caller``), whichever is tighter of those and what the caller's call leaves. The time ends
        ``NESTED_MARGIN`` before the caller cuts the call off (at most ``NESTED_MARGIN_MAX_S``), so the inner
        router stops its own tries first and hands back what it has: a panel member's answer, or its error with
        what it spent. The same margin comes off a ``stream``'s first-output limit; a plain request has no first
        output before its whole answer, so the caller's first-output limit does not apply to it (the deadline
        does)."""
        if caller is None:
            return cls(seconds, budget_usd=budget_usd)
        now = time.monotonic()
        fair = min(seconds, caller.fair_s)
        seconds = min(seconds, _less_margin(caller.until - now))
        first_output_at = now + _less_margin(caller.first_output_by - now) if stream else math.inf
        if caller.budget_usd is not None:
            given = max(0.0, caller.budget_usd)
            budget_usd = given if budget_usd is None else min(budget_usd, given)
        return cls(seconds, start=now, budget_usd=budget_usd, fair_limit_s=fair, first_output_at=first_output_at)

    @property
    def remaining(self) -> float:
        now = time.monotonic()
        return min(self.seconds - (now - self.start), self.first_output_at - now)

    @property
    def fair_seconds(self) -> float:
        """The deadline an expert's fair chance is judged by: ``seconds``, or for a nested router its own config's
        deadline within the whole limit of the call that reached it (``CallScope.fair_s``)."""
        return self.seconds if self.fair_limit_s is None else self.fair_limit_s

    @property
    def first_output_due(self) -> bool:
        """Whether the stream's first-output limit has run out (none of its output sent by then)."""
        return time.monotonic() >= self.first_output_at

    def reached(self) -> str:
        """What ran out, in words, once ``remaining`` is spent."""
        if self.first_output_due:
            return "the caller's time for the stream's first output ran out"
        return f"the request's deadline of {self.seconds:g}s was reached"

    def output_sent(self) -> None:
        """The stream sent output: its first-output limit no longer counts."""
        self.first_output_at = math.inf

    def attempt_timeout(self, expert_timeout: float) -> float:
        """An attempt gets its expert's own limit, cut short by what is left of the request's deadline."""
        return max(0.0, min(expert_timeout, self.remaining))

    def budget_left(self, spent_usd: float) -> float | None:
        """What is left of the cost budget once ``spent_usd`` is spent (or reserved); None with no budget."""
        return None if self.budget_usd is None else self.budget_usd - spent_usd


def _less_margin(left: float) -> float:
    """A caller's time left, less the nested margin; infinite stays infinite."""
    if not math.isfinite(left):
        return left
    return max(0.0, left - min(NESTED_MARGIN * left, NESTED_MARGIN_MAX_S))


# A nested router's deadline ends this share of its caller's time limit early, and at most this many seconds.
NESTED_MARGIN = 0.05
NESTED_MARGIN_MAX_S = 0.25


@dataclass
class CallScope:
    """One expert call, as the dispatcher makes it, for an expert that is itself a router (``router.hierarchy``),
    or the limits a client set for its request (``limiting``, ``from_headers``): when the call is cut off
    (``until``, ``time.monotonic()``; infinite for none), what is left of the caller's cost budget for it
    (``budget_usd``: less what was spent and what the panel's other members are estimated to spend; None: no
    budget), and what the inner router spent: its trace (``inner``), kept as soon as it exists so that it still
    counts when the call fails or is cut off, or, for one over HTTP, the ``Attempt`` fields its error reported
    (``remote``)."""

    until: float = math.inf
    budget_usd: float | None = None
    inner: Trace | None = None
    remote: dict[str, Any] | None = None
    # A stream's: when the caller cuts the stream off if no output has come by then (its first wait's limit).
    first_output_by: float = math.inf
    # The call's whole limit, by which the inner router judges whether its experts had a fair chance: the nesting
    # expert's timeout_s, or the caller's own whole deadline if shorter (not what was left of it when the call was
    # made). Infinite for limits a client set (headers, the SDK): a client's short deadline blames no expert.
    fair_s: float = math.inf

    def keep(self, trace: Trace) -> None:
        self.inner = trace

    def spent(self) -> dict[str, Any]:
        """The ``Attempt`` fields for what the inner router spent and its trace; empty when there is none."""
        if self.inner is None:
            return dict(self.remote or {})
        trace = self.inner
        return {"usage": trace.usage, "cost_usd": trace.cost_usd, "usage_estimated": trace.usage_estimated,
                "nested": trace.summary()}

    def headers(self) -> dict[str, str]:
        """The limits as the request headers another moe-router reads (``from_headers``): the seconds left, the
        seconds left for a stream's first output, and the budget left; none for a limit the call does not have."""
        now = time.monotonic()
        out = {}
        for name, at in ((DEADLINE_HEADER, self.until), (FIRST_OUTPUT_HEADER, self.first_output_by)):
            if math.isfinite(at):
                out[name] = f"{max(at - now, 0.001):.3f}"
        if self.budget_usd is not None:
            out[BUDGET_HEADER] = f"{max(self.budget_usd, 0.0):.9g}"
        return out

    @classmethod
    def limiting(cls, deadline_s: float | None, budget_usd: float | None, first_output_s: float | None = None, *,
                 names: tuple[str, str, str] = ("deadline_s", "budget_usd", "first_output_s"),
                 shown: tuple[str, str, str] | None = None) -> CallScope | None:
        """The scope a caller's limits set, from now: ``deadline_s`` seconds (above 0, up to 3600), ``budget_usd``
        USD (0 up to 1000), and, for a stream, ``first_output_s`` seconds for its first output; None when it gave
        none. They only narrow the config's limits (``Deadline.within``). Raises ``ValueError`` naming the limit
        (``names``; ``shown``: the values as the caller wrote them) for one that is not a number in range: a
        ``LimitError``, whose ``name`` says which."""
        if deadline_s is None and budget_usd is None and first_output_s is None:
            return None
        shown = shown or (repr(deadline_s), repr(budget_usd), repr(first_output_s))
        now = time.monotonic()
        scope = cls()
        if deadline_s is not None:
            scope.until = now + _limit(names[0], shown[0], deadline_s, MAX_DEADLINE_S, "seconds")
        if budget_usd is not None:
            scope.budget_usd = _limit(names[1], shown[1], budget_usd, MAX_BUDGET_USD, "USD", zero=True)
        if first_output_s is not None:
            scope.first_output_by = now + _limit(names[2], shown[2], first_output_s, MAX_DEADLINE_S, "seconds")
        return scope

    @classmethod
    def from_headers(cls, deadline_s: str | None, budget_usd: str | None,
                     first_output_s: str | None = None) -> CallScope | None:
        """``limiting``, from a request's ``x-moe-deadline-s``, ``x-moe-budget-usd`` and ``x-moe-first-output-s``
        headers (``headers``)."""
        def shown(text: str | None) -> str:
            return repr((text or "")[:40])

        return cls.limiting(_number(deadline_s), _number(budget_usd), _number(first_output_s),
                            names=(DEADLINE_HEADER, BUDGET_HEADER, FIRST_OUTPUT_HEADER),
                            shown=(shown(deadline_s), shown(budget_usd), shown(first_output_s)))


DEADLINE_HEADER = "x-moe-deadline-s"
BUDGET_HEADER = "x-moe-budget-usd"
FIRST_OUTPUT_HEADER = "x-moe-first-output-s"
LIMIT_HEADERS = (DEADLINE_HEADER, BUDGET_HEADER, FIRST_OUTPUT_HEADER)
# The widest limits a caller may give, as the config's own ``fallback.deadline_s`` and ``cost_budget_usd``.
MAX_DEADLINE_S, MAX_BUDGET_USD = 3600.0, 1000.0
# A plain decimal number, as a header gives one: not Python's "1_0", "inf" or "nan", which float() reads.
_DECIMAL = re.compile(r"[0-9]+(\.[0-9]*)?([eE][-+]?[0-9]+)?|\.[0-9]+([eE][-+]?[0-9]+)?")


def asked_deadline_s(text: str | None) -> float | None:
    """The deadline an ``x-moe-deadline-s`` header's ``text`` asks for, in seconds; None where it asks for none
    that ``CallScope.from_headers`` would take (the request is then refused, or runs to the config's)."""
    value = _number(text)
    if value is None:
        return None
    try:
        return _limit(DEADLINE_HEADER, "", value, MAX_DEADLINE_S, "seconds")  # the range CallScope.limiting takes
    except LimitError:
        return None


def _number(text: str | None) -> float | None:
    if text is None:
        return None
    text = text.strip()
    return float(text) if _DECIMAL.fullmatch(text) else math.nan


class LimitError(ValueError):
    """A caller's limit that is not a number in range; ``name`` is the limit (a header, an argument)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name


def _limit(name: str, shown: str, value: Any, high: float, unit: str, *, zero: bool = False) -> float:
    number = value if isinstance(value, int | float) and not isinstance(value, bool) else math.nan
    if not (math.isfinite(number) and (number >= 0 if zero else number > 0) and number <= high):
        raise LimitError(name, f"{shown} is not a number of {unit} {'from' if zero else 'above'} 0 up to {high:g}")
    return float(number)


# Set by the dispatcher while an expert's call starts (``router.dispatch``); read by a nested router.
CALL_SCOPE: ContextVar[CallScope | None] = ContextVar("moe_call_scope", default=None)
