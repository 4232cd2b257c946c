"""The combiners that choose among the panel's answers: ``top1``, ``vote`` and ``consensus``."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from experts.types import ChatMessage
from router.combine.base import Aggregate, Combined, Combiner, CombinerSettings, Embed, WeightedAnswer
from router.combine.extract import LETTERS, Extraction, extract_choice
from router.trace import Contribution
from router.vote_weights import VoteWeights

__all__ = ["PLACES", "TIE_BREAK", "Consensus", "TopOne", "Vote", "answer_embeddings", "choice_embedding"]

class TopOne(Combiner):
    """The answer of the highest-weight expert that succeeded.

    An answer agrees with it when it gives the same final answer: the same text up to case and whitespace, or
    the same answer as the extraction reads from both. An empty answer (tool calls alone) has no final answer,
    so it agrees with none but itself."""

    name = "top1"

    def __init__(self, extractor: str | None = None, per_expert: Mapping[str, str] | None = None) -> None:
        self.extraction = Extraction(extractor, per_expert)

    @classmethod
    def from_settings(cls, settings: CombinerSettings) -> TopOne:
        return cls(settings.extractor, settings.per_expert)

    def combine(self, answers: list[WeightedAnswer]) -> Combined:
        best = max(answers, key=lambda a: a.weight)
        final, text = self.extraction(best.expert, best.content), _folded(best.content)

        def agrees(a: WeightedAnswer) -> bool:
            if a is best:
                return True
            same_text = bool(text) and _folded(a.content) == text
            return same_text or (final is not None and self.extraction(a.expert, a.content) == final)

        contributions = [Contribution(expert=a.expert, weight=a.weight, agreed=agrees(a)) for a in answers]
        return Combined(content=best.content, expert=best.expert, contributions=contributions)


TIE_BREAK = 1e-9  # how much a panel weight counts next to a learned vote weight: ties only
PLACES = 9  # tallies and weights are compared rounded to this many places, so float rounding never decides


def _rounded(values: Sequence[float]) -> tuple[float, ...]:
    return tuple(round(float(v), PLACES) for v in values)


class Vote(Combiner):
    """Weighted vote on the extracted final answer.

    The result is the answer that maximises (its extracted answer's tally, its own weight), both rounded to
    ``PLACES`` places, and the first in the list of those that tie on both (the panel's order: the gate's
    ranking). So the winning final answer is the one with the heaviest tally, a tie goes to the one backed by
    the heavier single answer, then to the one given first, and the returned text is the heaviest answer that
    voted for it. ``Consensus`` over letters (``choice_embedding``) chooses the same answer.

    ``per_expert`` maps an expert to its own extractor name (an expert that answers in its own format).
    ``learned`` holds learned vote weights (``router.vote_weights.VoteWeights``, or a plain mapping from expert
    to weight): an answer then counts for its expert's learned weight, adjusted by the learned length term for
    the answer's length and by the learned bias for the answer it gives, instead of its panel weight (which
    only breaks ties, so a panel whose experts all learned a weight of 0 still votes by the gate), and an expert
    without one (added after training) counts for the mean learned weight. The contributions report the weight
    each answer counted for (the learned count plus ``TIE_BREAK`` times the panel weight)."""

    name = "vote"

    def __init__(self, extractor: str = "choice", per_expert: Mapping[str, str] | None = None,
                 learned: Mapping[str, float] | VoteWeights | None = None) -> None:
        self.extraction = Extraction(extractor, per_expert)
        if learned is not None and not isinstance(learned, VoteWeights):
            learned = VoteWeights(experts=tuple(learned), weights=np.array(list(learned.values()), dtype=float))
        self.learned = learned
        # VoteWeights refuses negative weights; the clamp states what an unlisted expert can count for.
        self._unlearned = max(0.0, float(np.mean(learned.weights))) if learned is not None and learned.experts \
            else 0.0

    @classmethod
    def from_settings(cls, settings: CombinerSettings) -> Vote:
        return cls(settings.extractor, settings.per_expert, learned=settings.vote_weights)

    def key(self, answer: WeightedAnswer) -> str | None:
        return self.extraction(answer.expert, answer.content)

    def strength(self, answer: WeightedAnswer, key: str | None) -> tuple[float, ...]:
        """What ``answer``, whose extracted answer is ``key``, adds to the tally, most significant first: its panel
        weight; with learned weights, its learned count, then its panel weight (which only breaks ties)."""
        if self.learned is None:
            return (answer.weight,)
        learned = self.learned.count_for(answer.expert, len(answer.content), key)
        return (self._unlearned if learned is None else learned, answer.weight)

    def counted(self, answer: WeightedAnswer, key: str | None) -> float:
        """What ``answer``, whose extracted answer is ``key``, counts for in the tally, as one number."""
        first, *ties = self.strength(answer, key)
        return first + TIE_BREAK * sum(ties)

    def combine(self, answers: list[WeightedAnswer]) -> Combined:
        # By position, not by expert: two answers from one expert each keep their own final answer.
        keys = [self.key(a) for a in answers]
        strengths = [self.strength(a, k) for a, k in zip(answers, keys, strict=True)]
        if self.learned is not None:
            answers = [dataclasses.replace(a, weight=self.counted(a, k)) for a, k in zip(answers, keys, strict=True)]
        tally: dict[str, tuple[float, ...]] = {}
        for key, strength in zip(keys, strengths, strict=True):
            if key is not None:
                tally[key] = tuple(t + s for t, s in zip(tally.get(key, (0.0,) * len(strength)), strength,
                                                         strict=True))
        voted = [(i, k) for i, k in enumerate(keys) if k is not None]
        if not voted:
            return TopOne().combine(answers)
        best, _ = max(voted, key=lambda v: (_rounded(tally[v[1]]), _rounded(strengths[v[0]])))  # the first of equals
        contributions = [Contribution(expert=a.expert, weight=a.weight, agreed=k == keys[best])
                         for a, k in zip(answers, keys, strict=True)]
        return Combined(content=answers[best].content, expert=answers[best].expert, contributions=contributions)


def choice_embedding(texts: Sequence[str]) -> np.ndarray:
    """``[n, 10]`` one-hot of each text's extracted choice letter (a zero row when none): consensus over
    these vectors is a weighted vote on the letter."""
    out = np.zeros((len(texts), len(LETTERS)), dtype=np.float32)
    for row, text in enumerate(texts):
        letter = extract_choice(text)
        if letter is not None:
            out[row, LETTERS.index(letter)] = 1.0
    return out


# The characters of an answer's end that ``answer_embeddings`` embeds beside its start, per token the encoder reads:
# about three, a little less than English takes, so the end is within what the encoder reads of it.
ANSWER_END_TOKENS_TO_CHARS = 3


def answer_embeddings(encode: Embed, texts: Sequence[str], max_length: int | None) -> np.ndarray:
    """``consensus``'s embeddings of answers: each answer's start and its end, side by side, each unit length (a
    cosine of two rows is the mean of their starts' and their ends' cosines). ``encode`` reads only an answer's first
    ``max_length`` tokens (None: 256), so two chains of thought that begin alike and conclude apart looked the same;
    a short answer's end is its start."""
    starts = np.asarray(encode(texts), dtype=np.float32)
    reach = ANSWER_END_TOKENS_TO_CHARS * (max_length or 256)
    long = [i for i, text in enumerate(texts) if len(text) > reach]
    ends = starts.copy()
    if long:
        ends[long] = encode([texts[i][-reach:] for i in long])
    halves = [h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-12) for h in (starts, ends)]
    return np.concatenate(halves, axis=1)


class Consensus(Combiner):
    """The answer closest (cosine) to the weight-averaged embedding of all answers.

    An answer agrees with the result when its cosine to the chosen answer is at least ``agree_at``. An
    answer whose embedding is zero (nothing to embed) has cosine 0 to everything, and is chosen only where every
    answer's is. The result maximises (its closeness to the centroid, its weight), both rounded to ``PLACES``
    places, and is the first in the list of those that tie on both: over ``choice_embedding`` a letter's closeness
    is its tally, so this is ``Vote``'s rule and both choose the same answer."""

    name = "consensus"

    def __init__(self, embed: Embed, agree_at: float = 0.8) -> None:
        self.embed, self.agree_at = embed, agree_at

    @classmethod
    def from_settings(cls, settings: CombinerSettings) -> Consensus:
        # Letters need no model: their one-hot (``choice_embedding``) makes consensus a weighted vote.
        if settings.embed is None and settings.extractor != "choice":
            raise ValueError("the consensus combiner needs an embedding function for non-choice answers")
        return cls(settings.embed or choice_embedding)

    async def acombine(self, query: str, answers: list[WeightedAnswer], aggregate: Aggregate, *,
                       history: Sequence[ChatMessage] = (), after: Sequence[ChatMessage] = ()) -> Combined:
        if len(answers) < 2:
            return self.combine(answers)
        # A sentence encoder is milliseconds of CPU per answer: too long to hold the event loop.
        return await asyncio.to_thread(self.combine, answers)

    def combine(self, answers: list[WeightedAnswer]) -> Combined:
        if len(answers) < 2:
            return TopOne().combine(answers)  # one answer is its own consensus: nothing to embed
        vectors = np.asarray(self.embed([a.content for a in answers]), dtype=np.float64)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        unit = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
        centroid = np.array([a.weight for a in answers]) @ unit
        closeness = unit @ centroid
        # An answer with something to embed comes before one with nothing (a zero row: over ``choice_embedding``,
        # no letter), whose closeness, 0, a tally that rounds to 0 would tie; ``Vote`` counts no unreadable answer.
        best = max(range(len(answers)),  # the first of equals
                   key=lambda i: (bool(norms[i, 0] > 0), *_rounded((closeness[i], answers[i].weight))))
        agreement = unit @ unit[best]
        contributions = [Contribution(expert=a.expert, weight=a.weight,
                                      agreed=i == best or bool(agreement[i] >= self.agree_at))
                         for i, a in enumerate(answers)]
        return Combined(content=answers[best].content, expert=answers[best].expert, contributions=contributions)


def _folded(text: str) -> str:
    return " ".join(text.split()).casefold()
