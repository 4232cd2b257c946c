"""The combiners that ask a model: ``fuse`` (an aggregator writes the answer) and ``escalate`` (a stronger expert
answers where the panel disagrees). The prompt building and the reading of the reply are pure; the one model
call goes through the hook the orchestrator hands them (``Aggregate``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from experts.errors import ExpertError
from experts.types import ChatMessage
from router.combine.base import Aggregate, Combined, Combiner, CombinerSettings, EmptyAnswer, WeightedAnswer
from router.combine.choose import TopOne, Vote
from router.combine.extract import Extraction
from router.trace import AttemptRole, Contribution
from router.vote_weights import VoteWeights

__all__ = ["FUSE_SYSTEM", "Escalate", "Fuse", "FusePromptTooLong"]

FUSE_SYSTEM = (
    "You are given a question and answers to it from several models, each with a weight: the router's "
    "estimate of how likely that model is to be right. Some answers may be wrong. Critically evaluate them "
    "and write one final answer that is correct and complete. Do not mention the models or the weights. "
    "Keep the answer format the question asks for."
)


class FusePromptTooLong(ExpertError):
    """The fuse prompt would not fit the aggregator's bound (``service.max_prompt_chars``) even with every answer
    cut to its least: the question and the conversation alone take it. The panel's top answer stands."""

    kind = "prompt_too_long"


# An answer cut shorter than this says too little to fuse: the aggregator is not asked then.
_FUSE_LEAST_CHARS = 200
# Room kept beside a cut answer for the marker saying how much was left out, and its newlines.
_CLIP_MARKER_CHARS = 60


class Fuse(Combiner):
    """Mixture-of-Agents aggregation: ``aggregator`` (an expert's name) writes the final answer.

    ``messages`` builds the aggregation prompt: the conversation's own instructions (its system and developer
    messages) after the fuse instruction, the turns before the question (their end, at most ``2 * max_chars``
    characters), the question, and the answers heaviest first. An answer over ``max_chars`` keeps its start and its
    end (where a chain of thought states its result), with a marker saying how much was left out; with
    ``max_prompt_chars``, every answer is cut further so the prompt fits, and a prompt that cannot fit even then is
    a ``FusePromptTooLong``.
    ``result`` turns the aggregator's reply into a ``Combined`` whose contributions mark an answer as agreeing
    when ``extractor`` (or its expert's own, ``per_expert``; the aggregator's own for the reply) finds the same
    final answer in it as in the reply (without an extractor, none agrees).
    ``fuse`` does both around the one model call, the injected ``aggregate`` hook, and falls back to the
    top-weight answer, with the error in ``Combined.fallback``, when the hook (or the prompt) raises an
    ``ExpertError``. A single answer is returned as it is: one answer has nothing to be fused with."""

    name = "fuse"
    aggregator: str

    def __init__(self, aggregator: str, extractor: str | None = None, max_chars: int = 4000, *,
                 per_expert: Mapping[str, str] | None = None, max_prompt_chars: int | None = None) -> None:
        self.aggregator, self.max_chars, self.max_prompt_chars = aggregator, max_chars, max_prompt_chars
        self.top1 = TopOne(extractor, per_expert)
        self.extraction = self.top1.extraction

    @classmethod
    def from_settings(cls, settings: CombinerSettings) -> Fuse:
        if settings.aggregator is None:
            raise ValueError("the fuse combiner needs an aggregator expert (combiner.aggregator in the config)")
        return cls(settings.aggregator, settings.extractor, per_expert=settings.per_expert,
                   max_prompt_chars=settings.max_prompt_chars)

    def messages(self, query: str, answers: list[WeightedAnswer], history: Sequence[ChatMessage] = (),
                 after: Sequence[ChatMessage] = ()) -> list[ChatMessage]:
        instructions = "\n\n".join(t for m in (*history, *after)
                                   if m.role in ("system", "developer") and (t := m.text().strip()))
        system = FUSE_SYSTEM + (f"\n\nThe conversation's own instructions, which the final answer follows:\n"
                                f"{instructions}" if instructions else "")
        # After the question, an agent's loop: the tool calls made for it and their results, the evidence the answers
        # use.
        context, later = self._turns("Conversation so far", history), self._turns("Since the question", after)
        ordered = sorted(answers, key=lambda a: -a.weight)
        head = f"{context}Question:\n{query}\n\n{later}"

        def user(room: int) -> str:
            blocks = [f"Answer {i} (weight {a.weight:.2f}):\n{_clipped(a.content, room)}"
                      for i, a in enumerate(ordered, start=1)]
            return head + "\n\n".join(blocks) + "\n\nFinal answer:"

        room, text = self.max_chars, user(self.max_chars)
        limit = self.max_prompt_chars
        if limit is not None and len(system) + len(text) > limit:
            # What the rest leaves is shared out as water fills a vessel: an answer shorter than its share is kept
            # whole and its unused room goes to the longer ones, which are all cut to the same length (each
            # keeping 60 characters for its marker).
            fixed = len(system) + len(user(0)) - sum(len(_clipped(a.content, 0)) for a in ordered)
            room = _level(sorted(min(len(a.content), self.max_chars) for a in ordered), limit - fixed,
                          _CLIP_MARKER_CHARS)
            if room < _FUSE_LEAST_CHARS:
                raise FusePromptTooLong(self.aggregator, (
                    f"not asked: the fuse prompt cannot fit service.max_prompt_chars ({limit:,}): the question, the "
                    f"conversation and the instructions alone take {fixed:,} characters, leaving the "
                    f"longest answers under {_FUSE_LEAST_CHARS} each"))
            text = user(room)
        return [ChatMessage(role="system", content=system), ChatMessage(role="user", content=text)]

    def result(self, answers: list[WeightedAnswer], text: str) -> Combined:
        return _answered_by(self.aggregator, text, answers, self.extraction)

    def _turns(self, heading: str, messages: Sequence[ChatMessage]) -> str:
        """``messages`` but the instructions, one ``_turn`` a line under ``heading``, their end kept within twice
        ``max_chars``; "" when none is left."""
        turns = "\n".join(_turn(m) for m in messages if m.role not in ("system", "developer"))
        return f"{heading}:\n{_clipped_end(turns, 2 * self.max_chars)}\n\n" if turns else ""

    def combine(self, answers: list[WeightedAnswer]) -> Combined:
        return self.top1.combine(answers)

    async def fuse(self, query: str, answers: list[WeightedAnswer], aggregate: Aggregate,
                   history: Sequence[ChatMessage] = (), after: Sequence[ChatMessage] = ()) -> Combined:
        if len(answers) < 2:
            return self.combine(answers)
        try:
            text = await aggregate(self.messages(query, answers, history, after))
        except ExpertError as exc:  # a failed aggregator degrades the answer to top-1; it never fails the request
            return dataclasses.replace(self.combine(answers), fallback=exc)
        return self.result(answers, text)

    async def acombine(self, query: str, answers: list[WeightedAnswer], aggregate: Aggregate, *,
                       history: Sequence[ChatMessage] = (), after: Sequence[ChatMessage] = ()) -> Combined:
        return await self.fuse(query, answers, aggregate, history, after)


def _level(lengths: Sequence[int], total: int, marker: int) -> int:
    """The most characters each text may keep when texts of ``lengths`` (ascending) share ``total``: a text no longer
    than the result is kept whole; a longer one keeps the result plus ``marker`` characters for what says it was cut."""
    for i, length in enumerate(lengths):
        share = total // (len(lengths) - i) - marker
        if length <= share:
            total -= length
            continue
        return share
    return max(lengths, default=0)


def _clipped(text: str, room: int) -> str:
    """``text``, or its start and end with a marker saying how much was left out between, within about ``room``
    characters."""
    if len(text) <= room:
        return text
    keep = max(room, 0)
    tail = keep - keep // 2
    end = text[len(text) - tail:] if tail else ""
    return f"{text[:keep // 2]}\n[... {len(text) - keep:,} characters left out ...]\n{end}"


def _turn(message: ChatMessage) -> str:
    """A message as ``fuse``'s aggregator reads it: its role, its text, and each tool call it made (the function's
    name and arguments, as sent)."""
    said = [message.text().strip()]
    calls = (message.model_extra or {}).get("tool_calls")
    for call in calls if isinstance(calls, list) else []:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            said.append(f"[tool call: {function.get('name')}({function.get('arguments') or ''})]")
    return f"{message.role}: {' '.join(t for t in said if t) or '[no text]'}"


def _clipped_end(text: str, room: int) -> str:
    """``text``, or its last ``room`` characters after a marker saying how much came before."""
    if len(text) <= room:
        return text
    return f"[... {len(text) - room:,} earlier characters left out ...]\n{text[len(text) - room:]}"


def _answered_by(expert: str, text: str, answers: list[WeightedAnswer], extraction: Extraction) -> Combined:
    """``expert``'s ``text`` as the result (``fuse``'s aggregator, ``escalate``'s expert), the panel's answers as
    its contributions: each agrees when ``extraction`` reads the same final answer from it as from ``text``, read
    as ``expert``'s own answer."""
    final = extraction(expert, text)
    contributions = [Contribution(expert=a.expert, weight=a.weight,
                                  agreed=final is not None and extraction(a.expert, a.content) == final)
                     for a in answers]
    return Combined(content=text, expert=expert, contributions=contributions)


class Escalate(Combiner):
    """Keep the panel's answer when all of it agrees; otherwise ask ``expert`` (see the module docstring).

    ``agreed`` is the pure decision: the final answer every answer extracts to, or None. The contributions mark
    which answers match the result's extracted answer."""

    name = "escalate"
    aggregator: str
    fallback_to = "vote"
    call_role: AttemptRole = "escalate"

    def __init__(self, expert: str, extractor: str = "choice", per_expert: Mapping[str, str] | None = None,
                 learned: Mapping[str, float] | VoteWeights | None = None) -> None:
        self.aggregator = expert
        # The panel's vote, as ``vote`` would count it (with the learned weights when there are any).
        self.vote = Vote(extractor, per_expert, learned=learned)

    @classmethod
    def from_settings(cls, settings: CombinerSettings) -> Escalate:
        if settings.escalate_to is None:
            raise ValueError("the escalate combiner needs the expert to escalate to (combiner.escalate_to in the "
                             "config)")
        return cls(settings.escalate_to, settings.extractor, settings.per_expert, learned=settings.vote_weights)

    def agreed(self, answers: list[WeightedAnswer]) -> str | None:
        keys = {self.vote.key(a) for a in answers}
        if len(answers) < 2 or len(keys) != 1:
            return None
        return next(iter(keys))

    def combine(self, answers: list[WeightedAnswer]) -> Combined:
        # No model call here: the panel's weighted vote, which is also the agreed answer when there is one.
        return self.vote.combine(answers)

    def result(self, answers: list[WeightedAnswer], text: str) -> Combined:
        return _answered_by(self.aggregator, text, answers, self.vote.extraction)

    async def acombine(self, query: str, answers: list[WeightedAnswer], aggregate: Aggregate, *,
                       history: Sequence[ChatMessage] = (), after: Sequence[ChatMessage] = ()) -> Combined:
        if self.agreed(answers) is not None:
            return self.vote.combine(answers)
        own = next((a for a in answers if a.expert == self.aggregator), None)
        if own is not None and own.blank:
            # As an escalation call that answered with no text counts: the vote of the rest of the panel stands (a
            # vote that reads no answer falls back to the heaviest, which must not be the blank one), or, where it
            # answered alone, its blank answer, marked as such.
            voted = self.vote.combine([a for a in answers if a is not own] or answers)
            agreed = {c.expert: c for c in voted.contributions}
            contributions = [agreed.get(a.expert, Contribution(expert=a.expert, weight=a.weight, agreed=False))
                             for a in answers]
            return dataclasses.replace(voted, contributions=contributions,
                                       fallback=EmptyAnswer(self.aggregator, "answered with no text"))
        if own is not None:  # the escalation expert sat on the panel: its answer is already here
            return self.result(answers, own.content)
        try:
            text = await aggregate(None)
        except ExpertError as exc:  # a failed escalation degrades to the panel's vote; it never fails the request
            return dataclasses.replace(self.vote.combine(answers), fallback=exc)
        return self.result(answers, text)
