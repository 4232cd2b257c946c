"""Fallback decisions, kept apart from I/O: who is asked next, how long each attempt may take, what it may cost."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

from experts.errors import INVALID_REQUEST_STATUSES, ExpertAuthError, ExpertError, ExpertRejected
from router.errors import error_body

__all__ = ["AllExpertsFailed", "BudgetSpent", "Deadline", "budget_spent", "next_candidate"]


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
    STATUS_BY_CODE: ClassVar[Mapping[str, int]] = MappingProxyType({"rejected_by_experts": 400,
                                                                     "all_experts_failed": 503})

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
            blamed = {getattr(c, "param", None) for c in self.causes if c.kind not in NOT_CALLED}
            param = blamed.pop() if len(blamed) == 1 else None
        else:
            message, kind = str(self), "service_unavailable"
        return error_body(message, kind, self.code, param, causes=self.to_list())

    @property
    def invalid_request(self) -> bool:
        """Whether every expert that was called refused the request itself as invalid (HTTP 400, 413 or 422):
        the request is at fault, not the experts. An auth error or a 404 (the expert's model is unknown there)
        is the deployment's fault, and an expert passed over without a call says nothing either way."""
        called = [c for c in self.causes if c.kind not in NOT_CALLED]
        return bool(called) and all(isinstance(c, ExpertRejected) and not isinstance(c, ExpertAuthError)
                                    and c.status in INVALID_REQUEST_STATUSES for c in called)


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
    """The overall time budget of one request, across every attempt."""

    seconds: float
    start: float = field(default_factory=time.monotonic)

    @property
    def remaining(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def attempt_timeout(self, expert_timeout: float) -> float:
        """An attempt gets its expert's own limit, cut short by what is left of the request's deadline."""
        return max(0.0, min(expert_timeout, self.remaining))
