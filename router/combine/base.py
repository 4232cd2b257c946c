"""What every combiner shares: the weighted answers it is given, its result, its settings and its interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from experts.errors import ExpertError
from experts.types import ChatMessage
from router.trace import AttemptRole, Contribution
from router.vote_weights import VoteWeights

__all__ = ["Aggregate", "Combined", "Combiner", "CombinerSettings", "Embed", "EmptyAnswer", "WeightedAnswer"]

Embed = Callable[[Sequence[str]], np.ndarray]
# The combiner's one model call, to its ``aggregator`` expert: with these messages (``fuse``'s prompt), or, given
# None, with the client's own request (``escalate``).
Aggregate = Callable[[list[ChatMessage] | None], Awaitable[str]]


@dataclass(frozen=True)
class WeightedAnswer:
    expert: str
    weight: float
    content: str
    # The expert's refusal, when it refused (then ``content`` may be empty, and the refusal is its answer).
    refusal: str | None = None

    @property
    def blank(self) -> bool:
        """No text and no refusal: nothing to stand as the answer."""
        return not self.content.strip() and self.refusal is None


class EmptyAnswer(ExpertError):
    """A combiner's expert (``fuse``'s aggregator, ``escalate``'s expert) answered with no text: the panel's answer
    stands rather than an empty one."""

    kind = "empty_answer"


@dataclass(frozen=True)
class Combined:
    content: str
    expert: str
    contributions: list[Contribution]
    # Set when the combiner could not do its own work and returned the top-weight answer instead: the cause
    # (``fuse``: the aggregator's error).
    fallback: ExpertError | None = None


@dataclass(frozen=True)
class CombinerSettings:
    """What ``build_combiner`` is given (see it); each strategy takes what it needs in ``Combiner.from_settings``."""

    extractor: str = "choice"
    per_expert: Mapping[str, str] | None = None
    embed: Embed | None = None
    aggregator: str | None = None
    vote_weights: Mapping[str, float] | VoteWeights | None = None
    escalate_to: str | None = None
    # The most characters an aggregator's prompt may hold (``service.max_prompt_chars``); None: no bound.
    max_prompt_chars: int | None = None


class Combiner(ABC):
    name = "combiner"
    # The expert a combiner asks to write its answer (``fuse``) or to answer instead (``escalate``); None for those
    # that only choose among answers.
    aggregator: str | None = None
    # What ``Combined.fallback`` results were decided by instead, when that call failed.
    fallback_to = "top1"
    # How the trace labels the ``aggregator`` call.
    call_role: AttemptRole = "aggregate"

    @classmethod
    @abstractmethod
    def from_settings(cls, settings: CombinerSettings) -> Combiner:
        """This strategy as ``settings`` configure it; ``ValueError`` saying what is missing when they cannot."""

    @abstractmethod
    def combine(self, answers: list[WeightedAnswer]) -> Combined:
        """Merge non-empty ``answers`` (weights already renormalised over the experts that answered)."""

    async def acombine(self, query: str, answers: list[WeightedAnswer], aggregate: Aggregate, *,
                       history: Sequence[ChatMessage] = (), after: Sequence[ChatMessage] = ()) -> Combined:
        """``combine`` for the orchestrator. ``query``, the conversation before it (``history``) and after it
        (``after``: in an agent's loop, the tool calls made for it and their results) and ``aggregate`` (one model
        call) serve strategies that write a new answer; the others ignore them."""
        return self.combine(answers)
