"""Fallback decisions, kept apart from I/O: who is asked next, and how long each attempt may take."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from experts.errors import ExpertError

__all__ = ["AllExpertsFailed", "Deadline", "next_candidate"]


class AllExpertsFailed(Exception):
    """No candidate expert could answer. ``causes`` holds each expert's own error, in the order tried."""

    def __init__(self, causes: list[ExpertError], reason: str = "every candidate expert failed") -> None:
        self.causes = causes
        detail = "; ".join(f"{c.expert} ({c.kind}): {c.message}" for c in causes) or "no expert was tried"
        super().__init__(f"{reason}: {detail}")

    def to_list(self) -> list[dict[str, str]]:
        return [c.to_dict() for c in self.causes]


def next_candidate(ranking: Iterable[str], taken: set[str], unavailable: Iterable[str] = ()) -> str | None:
    """The best-ranked expert not yet taken and not known to be unavailable; None when the ranking is spent."""
    skip = taken.union(unavailable)
    return next((name for name in ranking if name not in skip), None)


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
