"""What a routed answer carries back: the gate's decision and every expert attempt behind the answer.

Every try of an expert is one ``Attempt``; a retry of the same expert is an attempt too, numbered by its
``retry`` field, and each retry also has its own ``Retry`` record in ``Trace.retries``: which failure caused it
and how long the router waited before making it. Fallback to another expert is not a retry: its attempt names
the expert it replaced in ``fallback_for``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from experts.types import Usage

__all__ = ["Attempt", "AttemptRole", "Contribution", "Retry", "RouteDecision", "RoutedAnswer", "Trace",
           "WeightedExpert"]


# What an expert call was for: answering the query, writing the final answer from the panel's answers (the fuse
# combiner), or answering in the panel's place when it disagreed (the escalate combiner).
AttemptRole = Literal["answer", "aggregate", "escalate"]


class WeightedExpert(BaseModel):
    expert: str
    weight: float


class RouteDecision(BaseModel):
    """The gate's view of one query: a probability for every expert and the weighted top-k panel."""

    scores: dict[str, float]
    ranking: list[str]
    chosen: list[WeightedExpert]
    policy: str
    # True when the query looked out of distribution (``ood_score`` below the gate's threshold) and went to
    # ``gate.default_expert`` alone. ``ood_score`` is the gate's familiarity score (``Gate.ood_scores``), higher
    # for queries like its training data: for a label gate the mean of two percentiles in [0, 1], its calibrated
    # top probability and its cosine to the nearest training example, each ranked among the gate's calibration
    # queries; for gates without those grids (outcome gates, older artifacts), the cosine itself. None: unknown.
    abstained: bool = False
    ood_score: float | None = None
    # Training examples nearest to the query: why the gate decided as it did.
    nearest: list[dict[str, Any]] = []
    # With a two-stage gate (``gate.cascade``): ``fast`` when the fast gate was sure enough to decide, ``full``
    # when the full gate did; None for a one-stage gate.
    stage: str | None = None
    # With an outcome gate trained on records that name their task (``router.outcome.TaskPrior``): the query's
    # likeliest tasks (up to three) and their probabilities, the prior its scores lean on; None otherwise.
    tasks: dict[str, float] | None = None
    gate_ms: float = 0.0


class Attempt(BaseModel):
    """One call to one expert."""

    expert: str
    weight: float = 0.0
    ok: bool
    latency_ms: float = 0.0
    usage: Usage = Usage()
    cost_usd: float = 0.0
    # True when ``usage`` and ``cost_usd`` are our estimate: a stream that broke off before its usage chunk, counted
    # as a token per delta it sent and the prompt at about 4 characters a token.
    usage_estimated: bool = False
    error: dict[str, str] | None = None
    # Set when this attempt replaced a failed one.
    fallback_for: str | None = None
    # 0 for the expert's first try; n for its n-th retry after a transient failure (see ``Trace.retries``).
    retry: int = 0
    role: AttemptRole = "answer"
    # When the expert is itself a router (``type: router``): its own trace, so a mixture of mixtures shows
    # every level's decision.
    nested: dict[str, Any] | None = None


class Retry(BaseModel):
    """One retry of an expert: the transient failure behind it and the wait before it was made."""

    expert: str
    # 1 for the first retry of one call to the expert, 2 for the second, ...; the attempt the retry made has the
    # same number in its ``retry`` field.
    number: int
    # The failure's kind (``ExpertError.kind``: unavailable, timeout, server_error, rate_limited, ...).
    cause: str
    # Seconds waited before retrying: the jittered backoff, or the expert's Retry-After when that was longer.
    backoff_s: float


class Contribution(BaseModel):
    expert: str
    weight: float
    agreed: bool


class Trace(BaseModel):
    decision: RouteDecision | None = None
    attempts: list[Attempt] = []
    combiner: str = "top1"
    contributions: list[Contribution] = []
    # Mid-stream switches from one expert to the next, in order: {"from", "to", "after_chars", "cause"}.
    switches: list[dict[str, Any]] = []
    # Every retry made, in order; ``len(retries)`` is the request's retry count.
    retries: list[Retry] = []
    # Set when the combiner could not do its own work and returned the top-weight answer instead (fuse: the
    # aggregator failed): ``{"to": "top1", "expert", "kind", "message"}``, the aggregator's error.
    combiner_fallback: dict[str, str] | None = None
    latency_ms: float = 0.0

    @property
    def cost_usd(self) -> float:
        return sum(a.cost_usd for a in self.attempts)

    @property
    def usage(self) -> Usage:
        total = Usage()
        for attempt in self.attempts:
            total = total + attempt.usage
        return total

    @property
    def usage_estimated(self) -> bool:
        """Whether ``usage`` is, in part, an estimate: an attempt's expert sent none."""
        return any(a.usage_estimated for a in self.attempts)

    @property
    def answered_by(self) -> str | None:
        """The expert that gave (or finished, after a mid-stream switch) the answer: the last attempt that
        succeeded; None when none did."""
        return next((a.expert for a in reversed(self.attempts) if a.ok), None)

    def credited(self, expert: str) -> str:
        """The expert a verdict on this answer, returned as ``expert``'s, rates: the one whose text it is, but

        - for an answer ``fuse``'s aggregator wrote from the panel's, the panel's top-weight member that agreed with
          it (the top-weight one if none did): the verdict rates the gate's choice, and the aggregator was never
          asked the question alone, so crediting it would teach the gate to send the query there;
        - for a stream that switched experts, the one that wrote most of it (of equals, the one that began it).
        """
        fused = self.combiner == "fuse" and self.combiner_fallback is None and len(self.contributions) > 1
        if fused:
            agreed = [c for c in self.contributions if c.agreed] or self.contributions
            return max(agreed, key=lambda c: c.weight).expert  # the first of equals
        if self.combiner == "stream" and self.switches and self.contributions:
            return max(self.contributions, key=lambda c: c.weight).expert
        return expert

    def summary(self) -> dict[str, Any]:
        """The trace as returned to clients, with its totals."""
        body = self.model_dump()
        body["cost_usd"] = self.cost_usd
        body["usage"] = self.usage.model_dump()
        return body


class RoutedAnswer(BaseModel):
    content: str
    expert: str = Field(description="the expert whose text is returned")
    finish_reason: str = "stop"
    tool_calls: list[dict[str, Any]] | None = None
    # The returned reply's own, when the answer is that reply's text (not one an aggregator wrote from several).
    logprobs: dict[str, Any] | None = None
    refusal: str | None = None
    # The reasoning (vLLM's ``reasoning_content``) of the reply whose text is returned: top-1's, the vote's
    # winner's, or the aggregator's own for ``fuse``; never a mix of the panel's. None when that reply had none.
    reasoning_content: str | None = None
    # The upstream's own fields of the reply whose text is returned (``ExpertReply.extra``), when it is.
    extra: dict[str, dict[str, Any]] | None = None
    trace: Trace
