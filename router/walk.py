"""The fallback walk: one request's way down the gate's ranking, one expert at a time.

A request answered whole (``Orchestrator.complete``, after its panel failed) and a stream (from its first expert
on) walk the ranking by the same rules, kept here once:
- with fallback off, only the first call is made; experts passed over without a call (an open breaker, a full
  in-flight limit) hand the query on all the same;
- the walk stops when the deadline has passed or ``max_attempts`` experts were tried, and each candidate left is
  listed as ``not_tried``, its message saying which stopped it;
- the request's first call is free; every later one must fit in what is left of the cost budget, and one that
  would not is passed over (a cheaper one further down may fit), with a ``budget_exhausted`` attempt in the
  trace so an answered request still says who was not asked;
- an expert passed over without a call does not count as tried, and the expert a call stands in for
  (``fallback_for``) is the last one called that failed, else the first passed over.

Which candidates there are, and what a call is (a whole answer, a stream), is the caller's; ``Walk`` only keeps
the count and decides.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from experts.errors import ExpertError
from experts.types import ChatRequest
from router.config.schema import FallbackConfig
from router.dispatch import Dispatcher, skipped
from router.fallback import BudgetSpent, Deadline
from router.trace import Attempt, Trace

__all__ = ["NotTried", "Stop", "Walk"]


class NotTried(ExpertError):
    """A candidate expert fallback never reached: the deadline passed, or ``max_attempts`` experts were tried."""

    kind = "not_tried"


@dataclass(frozen=True)
class Stop:
    """Why the walk stopped before trying every candidate: the cause each untried one is listed with, and the
    reason the 503 gives. Both are None when fallback is off and its one call was made: the candidates left were
    never going to be asked, so none is listed."""

    cause: str | None = None
    reason: str | None = None

    def untried(self, candidates: Sequence[str], taken: Collection[str] = ()) -> list[ExpertError]:
        """A ``not_tried`` cause for each of ``candidates`` not in ``taken``."""
        if self.cause is None:
            return []
        return [NotTried(n, f"not tried: {self.cause}") for n in candidates if n not in taken]


class Walk:
    """The count one walk keeps: ``tried`` (calls that failed, which ``max_attempts`` bounds), ``replaces`` (whom
    the next call stands in for), and ``errors``, the request's causes, which each failure and budget pass-over
    joins."""

    def __init__(self, fallback: FallbackConfig, dispatch: Dispatcher, deadline: Deadline, trace: Trace,
                 errors: list[ExpertError], *, tried: int = 0, replaces: str | None = None) -> None:
        self.fallback, self.dispatch, self.deadline, self.trace = fallback, dispatch, deadline, trace
        self.errors, self.tried, self.replaces = errors, tried, replaces

    def stop(self, *, first: bool = False) -> Stop | None:
        """Why no further expert may be called, or None while one may. ``first``: the request's first call, made
        even when the deadline is already spent (it fails as a timeout, so a nested router out of time reads as
        one either way)."""
        if not self.fallback.enabled and self.tried:
            return Stop()
        if first:
            return None
        if self.deadline.remaining <= 0:
            at = ("when the caller's time for the stream's first output ran out," if self.deadline.first_output_due
                  else f"at the request's deadline of {self.deadline.seconds:g}s")
            return Stop("deadline reached", f"fallback stopped {at} with no complete answer")
        limit = self.fallback.max_attempts
        if self.tried >= limit:
            return Stop(f"max_attempts {limit} used", f"fallback stopped after max_attempts ({limit}) experts failed")
        return None

    def affordable(self, name: str, request: ChatRequest) -> bool:
        """Whether ``name`` may be called with ``request`` within the cost budget. The first call is free; one
        that would not fit is passed over: its cause joins the errors and the trace lists it."""
        spent = self.dispatch.over_budget(name, self.trace, request, self.deadline) if self.tried else None
        if spent is None:
            return True
        self.passed_over(spent)
        return False

    def passed_over(self, spent: BudgetSpent) -> None:
        self.errors.append(spent)
        self.trace.attempts.append(Attempt(expert=spent.expert, ok=False, error=spent.to_dict(),
                                           fallback_for=self.replaces))

    def failed(self, name: str, error: ExpertError) -> None:
        """``name`` failed with ``error``: a call counts as tried and is whom the next one replaces; an expert
        passed over without a call (``skipped``) counts for neither, unless nothing was called before it."""
        self.errors.append(error)
        if skipped(error):
            self.replaces = self.replaces or name
        else:
            self.tried += 1
            self.replaces = name
