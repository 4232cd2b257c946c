"""What a routed answer carries back: the gate's decision and every expert attempt behind the answer."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from experts.types import Usage

__all__ = ["Attempt", "Contribution", "RouteDecision", "RoutedAnswer", "Trace", "WeightedExpert"]


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
    # ``gate.default_expert`` alone; ``ood_score`` is its cosine to the nearest training example.
    abstained: bool = False
    ood_score: float | None = None
    # Training examples nearest to the query: why the gate decided as it did.
    nearest: list[dict[str, Any]] = []
    gate_ms: float = 0.0


class Attempt(BaseModel):
    """One call to one expert."""

    expert: str
    weight: float = 0.0
    ok: bool
    latency_ms: float = 0.0
    usage: Usage = Usage()
    cost_usd: float = 0.0
    error: dict[str, str] | None = None
    # Set when this attempt replaced a failed one.
    fallback_for: str | None = None
    # When the expert is itself a router (``type: router``): its own trace, so a mixture of mixtures shows
    # every level's decision.
    nested: dict[str, Any] | None = None


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
    trace: Trace
