"""Combiners: from the weighted answers of a panel to one answer. Pure: no I/O, no model calls.

A combiner has one method, ``combine``. Every result says which experts contributed, with what weight, and
whether each agreed with the result.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from router.trace import Contribution

__all__ = ["COMBINERS", "EXTRACTORS", "Combined", "Combiner", "TopOne", "Vote", "build_combiner", "extract_choice",
           "extract_number", "extract_short"]


@dataclass(frozen=True)
class WeightedAnswer:
    expert: str
    weight: float
    content: str


@dataclass(frozen=True)
class Combined:
    content: str
    expert: str
    contributions: list[Contribution]


class Combiner(ABC):
    name = "combiner"

    @abstractmethod
    def combine(self, answers: list[WeightedAnswer]) -> Combined:
        """Merge non-empty ``answers`` (weights already renormalised over the experts that answered)."""


class TopOne(Combiner):
    """The answer of the highest-weight expert that succeeded."""

    name = "top1"

    def combine(self, answers: list[WeightedAnswer]) -> Combined:
        best = max(answers, key=lambda a: a.weight)
        contributions = [Contribution(expert=a.expert, weight=a.weight, agreed=a is best) for a in answers]
        return Combined(content=best.content, expert=best.expert, contributions=contributions)


# Final-answer extractors. Each returns a canonical answer string, or None when the text holds none; an
# answer that cannot be extracted loses its vote, never the request.
_CHOICE_PATTERNS = [
    re.compile(r"answer\s+is\s*:?\s*\(?([A-J])\)?(?![A-Za-z])", re.IGNORECASE),
    re.compile(r"answer\s*:\s*\(?([A-J])\)?(?![A-Za-z])", re.IGNORECASE),
    re.compile(r"^\W*\(?([A-J])\)?\W*$"),
    re.compile(r"^\s*\(?([A-J])[).:]"),
]
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_choice(text: str) -> str | None:
    """A multiple-choice letter A-J: "The answer is (C).", "Answer: C", "['C']", or a bare "C"."""
    cleaned = text.strip().strip("[]'\" ")
    for pattern in _CHOICE_PATTERNS:
        match = pattern.search(cleaned)
        if match:
            return match.group(1).upper()
    return None


def extract_number(text: str) -> str | None:
    """The last number in the text, without thousands separators or trailing zeros."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    value = found[-1].replace(",", "")
    return value.rstrip("0").rstrip(".") if "." in value else value


def extract_short(text: str) -> str | None:
    """A short free-text answer, case- and punctuation-folded; long texts have no short answer."""
    folded = re.sub(r"[^\w\s]", "", text.lower()).strip()
    folded = re.sub(r"\s+", " ", folded)
    return folded if folded and len(folded.split()) <= 8 else None


EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "choice": extract_choice,
    "number": extract_number,
    "short": extract_short,
}


class Vote(Combiner):
    """Weighted vote on the extracted final answer. The returned text is the heaviest answer that voted for it."""

    name = "vote"

    def __init__(self, extractor: str = "choice") -> None:
        self.extract = EXTRACTORS[extractor]

    def combine(self, answers: list[WeightedAnswer]) -> Combined:
        extracted = {a.expert: self.extract(a.content) for a in answers}
        tally: dict[str, float] = {}
        for a in answers:
            key = extracted[a.expert]
            if key is not None:
                tally[key] = tally.get(key, 0.0) + a.weight
        if not tally:
            return TopOne().combine(answers)
        # Ties go to the answer backed by the single heaviest expert, so the result is deterministic.
        heaviest = {k: max(a.weight for a in answers if extracted[a.expert] == k) for k in tally}
        winner = max(tally, key=lambda k: (tally[k], heaviest[k], k))
        voters = [a for a in answers if extracted[a.expert] == winner]
        best = max(voters, key=lambda a: a.weight)
        contributions = [
            Contribution(expert=a.expert, weight=a.weight, agreed=extracted[a.expert] == winner) for a in answers
        ]
        return Combined(content=best.content, expert=best.expert, contributions=contributions)


COMBINERS: dict[str, Callable[..., Combiner]] = {"top1": TopOne, "vote": Vote}


def build_combiner(strategy: str, extractor: str = "choice") -> Combiner:
    if strategy not in COMBINERS:
        raise ValueError(f"unknown combiner strategy {strategy!r}; known: {', '.join(sorted(COMBINERS))}")
    return Vote(extractor) if strategy == "vote" else COMBINERS[strategy]()
