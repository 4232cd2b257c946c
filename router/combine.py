"""Combiners: from the weighted answers of a panel to one answer. The decisions are pure: no I/O, no model calls.

A combiner has one method, ``combine``. Every result says which experts contributed, with what weight, and
whether each agreed with the result. The orchestrator awaits ``acombine``, which is ``combine`` unless a
strategy needs more than the answers: ``consensus`` embeds them off the event loop, ``fuse`` calls a model
through the hook it is handed. Strategies (``COMBINERS``, the one place a strategy is declared: each class builds
itself from ``build_combiner``'s settings with ``from_settings``, so a new strategy is one class and one line):

- ``top1``: the highest-weight answer. Every answer that gives the same final answer (the same extracted
  answer, else the same text up to case and whitespace) is marked as agreeing with it.
- ``vote``: weighted vote on an extracted final answer; the extractor is set per combiner and may be
  overridden per expert. An answer that cannot be extracted loses its vote, not the request. The weights are
  the gate's panel weights, or learned per-expert weights (``router.vote_weights``).
- ``consensus``: the answer closest (cosine) to the weight-averaged embedding of all answers, with an
  injected embedding function and no extra model call. With ``choice_embedding`` (one-hot of the extracted
  letter) the centroid's coordinate for a letter is that letter's total weight, so consensus over letter
  answers is exactly a weighted vote (weighted agreement).
- ``fuse``: an aggregator expert writes the final answer from the answers and their weights
  (Mixture-of-Agents). The prompt building and the reading of the reply are pure (``Fuse.messages``,
  ``Fuse.result``); the one model call goes through an injected async hook (``Fuse.fuse``). Its plain
  ``combine`` cannot call a model, so it returns the top-weight answer (what ``fuse`` falls back to when the
  aggregator fails, with the failure in ``Combined.fallback``). With a single answer there is nothing to
  fuse: it is returned as it is, without an aggregator call.
- ``escalate``: answer consistency as a cascade. When every answer of the panel extracts to the same final
  answer, that answer stands (no further call); otherwise the ``escalate_to`` expert answers the client's own
  request, and its answer is the result (read from the panel without a new call when it is a member). A panel
  with a single answer has no second opinion, so it escalates too. A failed escalation falls back to the
  panel's weighted vote (``vote``'s, learned weights included), with the failure in ``Combined.fallback``.
  With a cheap panel and a strong ``escalate_to``, the strong model is paid for only where the cheap ones
  disagree.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal

import numpy as np

from experts.errors import ExpertError
from experts.plugins import COMBINER_GROUP, PluginError, installed, load
from experts.types import ChatMessage
from router.trace import AttemptRole, Contribution
from router.vote_weights import VoteWeights

__all__ = ["COMBINERS", "EXTRACTORS", "PLACES", "TIE_BREAK", "Aggregate", "Combined", "Combiner", "CombinerSettings",
           "Consensus", "Escalate", "Extraction", "Fuse", "TopOne", "Vote", "WeightedAnswer", "build_combiner",
           "choice_embedding", "combiner_class", "extract_choice", "extract_number", "extract_short",
           "known_combiners"]

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


# Final-answer extractors. Each returns a canonical answer string, or None when the text holds none; an
# answer that cannot be extracted loses its vote, never the request.
_MARKDOWN = re.compile(r"\*+|__+|`+")  # emphasis and code marks around an answer: **B**, __B__, `B`
_LATEX_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}")  # \text{B} -> B
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")  # \boxed{B} -> "answer: B", an answer statement
_OPENING = r"""[\s:(\[{"'“‘$]*"""  # what may stand between a statement and its letter: "(B)", '"B"', "$B$"
# Words after which "I" is option I ("The answer is I because ...", "I which matches", "\boxed{I} since", "I and J");
# before any other lower-case word it is the pronoun ("Answer: I believe it's C", "I suppose", "I honestly think").
_AFTER_OPTION_I = ("because", "since", "which", "that", "is", "as", "and", "or", "so", "but", "for", "with", "in",
                   "of", "at", "from", "on", "to", "by", "here", "there", "then", "only", "alone", "too", "fits",
                   "matches", "seems", "appears", "holds", "given", "while", "whereas")
# A letter that ends there: uppercase unless a word goes on ("I'm", "E.g.", "Apple", and "I" before a lower-case
# word but those of _AFTER_OPTION_I); lowercase only where no English word can ("(b)", "b.", "b" at the end of a
# line), so "the answer is a bit subtle" reads no letter.
_LETTER = (rf"(?:(?P<upper>[A-HJ]|I(?![ \t]+(?!(?:{'|'.join(_AFTER_OPTION_I)})\b)[a-z]))"
           r"(?![A-Za-z0-9]|['’.][A-Za-z])"
           r"|(?P<lower>[a-j])(?=\)|[\]}\"'”’$]*(?:[.:,;](?![A-Za-z0-9])|[ \t]*(?:\r?\n|$))))")
_CHOICE_STATEMENT = re.compile(  # "the answer is (B)", "Answer: B", "correct answer is option C", "answer is: b"
    rf"(?i:\banswer(?:\s+is\b|\s*(?=:))){_OPENING}(?i:(?:option|choice)\b{_OPENING})?{_LETTER}")
_CHOICE_ALONE = re.compile(r"[\W_]*(?i:(?:option|choice)\b[\W_]*)?([A-Ja-j])[\W_]*")  # "B", "(b)", "['C']", "Option C"
_CHOICE_LEADING = re.compile(r"\s*(?:[(\[]\s*)?([A-Ja-j])(?:[)\]]|[.:](?!\S))")  # "B) because", "C. Paris", not "E.g."
# A line that starts with an option's label, as an option-by-option analysis writes them: "A) too small", "B. ..."
_OPTION_LINE = re.compile(r"^[ \t]*(?:[(\[][ \t]*)?([A-J])(?:[)\]]|[.:](?!\S))", re.MULTILINE)


def extract_choice(text: str) -> str | None:
    """A multiple-choice letter A-J, upper case, or None. Markdown marks (``**``, ``__``, backticks) and LaTeX's
    ``\\text{X}`` are read through. What is read, in this order:

    1. the LAST answer statement in the text: "the answer is X", "answer: X", "final answer: X", "the correct
       answer is: X", "\\boxed{X}", the letter optionally in parentheses, brackets or quotes and after "option" or
       "choice" ("The answer is option (B)."). A revised answer therefore wins over the first one stated;
    2. else the whole text being one letter, upper or lower case: "B", "(b)", "['C']", "**B**", "Option C";
    3. else a leading letter followed by ")", or by "." or ":" and then a space or the end: "B) because ...",
       "(J) because ...", "C. Paris" (never "E.g.," or "I.e."); but not when lines start with two or more
       different options' labels ("A) too small ... B) too large ... C) ..."): that goes through the options,
       and its first is no answer.

    In a statement an uppercase letter counts unless a word goes on ("The answer is I'm afraid ..."); a
    lowercase one only where it cannot be an English word: before ")" or ".", ":", ",", ";", or at the end of a
    line ("answer: b"), so "The answer is a bit subtle" reads no letter."""
    cleaned = _BOXED.sub(r"answer: \1", _LATEX_WRAPPER.sub(r"\1", _MARKDOWN.sub("", text)))
    statements = list(_CHOICE_STATEMENT.finditer(cleaned))
    if statements:
        return (statements[-1]["upper"] or statements[-1]["lower"]).upper()
    match = _CHOICE_ALONE.fullmatch(cleaned)
    if match is None and len({m.group(1) for m in _OPTION_LINE.finditer(cleaned)}) < 2:
        match = _CHOICE_LEADING.match(cleaned)
    return match.group(1).upper() if match else None


_NUMBER_PATTERN = r"""
    (?: (?<![\w.])(?P<sign>[-+\u2212])     # a sign, where no word or number stands before it: "-3", "(−3)", not "5-3"
      | (?<![\d./]) )                      # else the start of a number, not its middle (nor a date's)
    (?: (?:(?P<whole>\d{1,3})[ \u00a0])?                              # a mixed number's whole part: 3 1/2
        (?P<numerator>\d+)/(?P<denominator>\d*[1-9]\d*)(?![\d./])   # a simple fraction: 3/4
      | (?P<mantissa>(?:\d{1,3}(?:,\d{3})+(?!\d)                     # 1,000 ("3,4": two numbers)
                       |\d{1,3}(?:[\u00a0\u202f]\d{3})+(?![\d,]|\.\d{3})  # 1 000 with a (narrow) no-break space
                       [PLAIN]                                         # 1 000 (see _STATED_NUMBER)
                       |\d+)(?:\.\d+)?|\.\d+)                        # 42  1,000.5  .5
        (?:[eE](?P<exponent>[-+\u2212]?\d{1,3})(?!\d))? )              # 1.5e-3
    """
# Thousands split by a no-break or narrow no-break space anywhere ("1\u202f000"); by a plain space only in the
# number an answer statement gives ("The answer is 1 000 000"): elsewhere "scores of 120 135 150" are three.
_NUMBER = re.compile(_NUMBER_PATTERN.replace("[PLAIN]", ""), re.VERBOSE)
# (a group before "-" is a word's: "5 100-dollar bills"; the space is escaped, as a verbose pattern ignores it)
_STATED_NUMBER = re.compile(_NUMBER_PATTERN.replace("[PLAIN]", r"|\d{1,3}(?:\ \d{3})+(?![\d,-]|\.\d{3})"), re.VERBOSE)
# "the answer is 42", "Answer: $42", "\boxed{12}", GSM8K's "#### 42": the number right after one
_NUMBER_STATEMENT = re.compile(r"""(?:(?i:\banswer(?:\s+is\b|\s*:))|\\boxed\{|\#\#\#\#)[\s:$*_`'"(\[{=\\]*""")
_LATEX_FRACTION = re.compile(r"\\[dt]?frac\{\s*([-\u2212]?)\s*(\d+)\s*\}\{\s*(\d+)\s*\}")  # \frac{-3}{4} -> -3/4
# LaTeX's thousands separators between digit groups: "1{,}000", "3\,000", "3\ 000" -> "1,000"
_LATEX_GROUP = re.compile(r"(?<=\d)(?:\{,\}|\\[,;:! ])(?=\d{3}(?!\d))")
# A power of ten written out: "1.5 \times 10^{3}", "2 \cdot 10^-4", "3×10^5" -> "1.5e3", "2e-4", "3e5"
_POWER_OF_TEN = re.compile(r"(?<=\d)\s*(?:\\times|\\cdot|\u00d7|\u22c5)\s*10\s*\^\s*\{?\s*([-+\u2212]?\d{1,3})\s*\}?")
# A power left: "10^{3}", "2^10" -> its value; an exponent past 60 leaves it alone (no number is read from it whole)
_POWER = re.compile(r"(?<![\d.])(\d{1,6})\s*\^\s*(?:\{\s*([-+\u2212]?\d{1,3})\s*\}|([-+\u2212]?\d{1,3})(?!\d))")
_OPERATOR = r"(?:[-+*/\u00d7\u00f7\u22c5\u2212]|\\(?:times|cdot|div))"
# A term of an equation after a stated number: "500", "(4", "$2", "-1)"
_TERM = r"[-+\u2212]?\$?(?:\([ \t]*[-+\u2212]?)?(?:\d[\d,]*(?:\.\d+)?|\.\d+)\)?"
# What turns a stated number into the left side of an equation: "1500 - 500 = ", "3 \times 4 = "; the answer is
# the number after the last "=" ("The answer is 1500 - 500 = 1000" is 1000). Each space is matched in one place
# only, so a long chain with no "=" fails in linear time.
_EQUATION = re.compile(rf"(?:[ \t]*{_OPERATOR}[ \t]*{_TERM})+(?:[ \t]*\))?[ \t]*=[ \t]*\$?")


_GROUPING = re.compile(r"[, \u00a0\u202f]")  # a thousands separator _NUMBER reads


def _canonical(number: re.Match[str]) -> str:
    """A matched number as a plain decimal string, without exponent, thousands separators or trailing zeros:
    "-0.50" -> "-0.5", "1e3" -> "1000", "3/4" -> "0.75", "-0" -> "0"."""
    sign = -1 if number["sign"] in ("-", "\u2212") else 1
    if number["numerator"] is not None:
        value = sign * (Decimal(number["whole"] or 0) + Decimal(number["numerator"]) / Decimal(number["denominator"]))
    else:
        exponent = (number["exponent"] or "0").replace("\u2212", "-")
        value = sign * Decimal(f"{_GROUPING.sub('', number['mantissa'])}e{exponent}")
    return _plain(value)


def _plain(value: Decimal) -> str:
    """``value`` as a plain decimal string: no exponent, no trailing zeros, "0" for zero."""
    if value == 0:
        return "0"
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _power(match: re.Match[str]) -> str:
    base, exponent = match[1], int((match[2] or match[3]).replace("\u2212", "-"))
    return _plain(Decimal(base) ** exponent) if -60 <= exponent <= 60 and int(base) > 0 else match[0]


def extract_number(text: str) -> str | None:
    """The final number of the text as a canonical decimal string (``decimal.Decimal``, without exponent or
    trailing zeros), or None.

    Which number: the one right after the LAST answer statement ("the answer is 42", "Answer: $42",
    "\\boxed{12}", GSM8K's "#### 42"), so a remark after the answer ("... in 3 steps") does not replace it,
    and when an equation follows it, the equation's result ("The answer is 1500 - 500 = 1000" -> "1000");
    else the last number in the text. Read: signs ("-.5" -> "-0.5", the Unicode minus "−3" -> "-3"), a bare
    fraction part (".5" -> "0.5"), exponents ("1.5e-3" -> "0.0015", "1e3" -> "1000"), a simple fraction ("3/4",
    LaTeX's "\\frac{3}{4}" -> "0.75"), thousands separators in groups of three ("1,000" -> "1000"; "(3,4)" is two
    numbers; also split by a no-break or narrow no-break space, and in the number an answer statement gives by a
    plain space: "The answer is 1 000 000"), a mixed number ("3 1/2" -> "3.5"), a power ("10^{3}" -> "1000",
    "2^10" -> "1024"), "-0" -> "0"; currency signs and percent signs are not part of the number ("$5" -> "5",
    "50%" -> "50"). LaTeX's forms are read too: "\\frac{-3}{4}" -> "-0.75",
    thousands written "1{,}000" or "3\\,000", and powers of ten written "1.5 \\times 10^{3}" -> "1500"."""
    text = _POWER_OF_TEN.sub(r"e\1", _LATEX_GROUP.sub(",", _LATEX_FRACTION.sub(r"\1\2/\3", text)))
    text = _POWER.sub(_power, text)
    stated = None
    for statement in _NUMBER_STATEMENT.finditer(text):
        number = _STATED_NUMBER.match(text, statement.end())
        while number is not None and (equation := _EQUATION.match(text, number.end())) is not None:
            result = _STATED_NUMBER.match(text, equation.end())
            if result is None:  # "= x": the equation says no number, and the stated one stands
                break
            number = result
        stated = number or stated
    if stated is not None:
        return _canonical(stated)
    found = list(_NUMBER.finditer(text))
    return _canonical(found[-1]) if found else None


_SHORT_PREFIX = re.compile(r"\A[\W_]*(?:the\s+)?(?:final\s+)?answer(?:\s+is\b|\s*:)")  # "the answer is", "answer:"
# "Paris, because it is the capital ...", "Paris,because ...", "Paris (since 1789)", "Paris—because ...": a reason
# after a word of the answer, set off by spaces or punctuation (hyphens and apostrophes are part of a word: "long-since
# abandoned"; an answer that starts with the word, "**Because of You**", is the answer). Tried where a run of spaces
# or of punctuation follows a word only (tried at each character of a run, it was quadratic in its length).
_REASON = re.compile(r"(?:(?<=\w)\s*[^\w\s'\u2019-]+\s*|(?<=[\w'\u2019-])\s+|(?<=[^\w\s])\s+)(?:because|since)\b.*\Z",
                     re.DOTALL)
# Punctuation, a space in the answer's place, but a minus sign before a number is kept: "-3" is not "3"
_PUNCTUATION = re.compile(r"(?P<minus>(?<![\w.])[-\u2212](?=\d))|[^\w\s]|_")


def extract_short(text: str) -> str | None:
    """A short free-text answer, folded: Unicode NFKC ("Ｐａｒｉｓ" -> "paris"), case-folded ("Straße" ->
    "strasse"), a leading "the answer is" / "answer:" / "final answer:" removed, LaTeX's ``\\boxed{}`` and
    ``\\text{}`` read through, a reason after the answer (", because ...", " since ...") left out, punctuation
    replaced by a space (so "3.5" and "35" differ, "New-York" and "New York" do not; a trailing period goes)
    but for a minus sign before a number ("-3" and "\u22123" are "-3", not "3"; "+3" is "3"),
    whitespace collapsed. A text of more than 8 words, or none, has no short answer."""
    unwrapped = _BOXED.sub(r"\1", _LATEX_WRAPPER.sub(r"\1", text))
    folded = _REASON.sub("", _SHORT_PREFIX.sub("", unicodedata.normalize("NFKC", unwrapped).casefold(), count=1))
    folded = " ".join(_PUNCTUATION.sub(lambda m: "-" if m["minus"] else " ", folded).split())
    return folded if folded and len(folded.split()) <= 8 else None


EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "choice": extract_choice,
    "number": extract_number,
    "short": extract_short,
}


def _extractor(name: str, whose: str) -> Callable[[str], str | None]:
    if name not in EXTRACTORS:
        raise ValueError(f"unknown extractor {name!r} for {whose}; known: {', '.join(sorted(EXTRACTORS))}")
    return EXTRACTORS[name]


class Extraction:
    """How a combiner reads final answers: with ``extractor`` (None: it reads none), or, for an expert named in
    ``per_expert``, with that expert's own extractor (one that answers in its own format).

    Where experts' answers are read by different extractors, each writes its answers in its own form (``choice``
    "B" where ``short`` reads "b"; ``number`` "1000" where ``short`` reads "1 000"), so the answers are put in one
    form before they are compared or counted: a number a text extractor read as its value (``extract_number`` on
    the answer, where it reads the same figure), then ``pooled``."""

    def __init__(self, extractor: str | None = None, per_expert: Mapping[str, str] | None = None) -> None:
        self.default = _extractor(extractor, "the combiner") if extractor else None
        self.per_expert = {e: _extractor(x, f"expert {e!r}") for e, x in (per_expert or {}).items()}
        self.mixed = any(x is not self.default for x in self.per_expert.values())

    def __call__(self, expert: str, text: str) -> str | None:
        """The final answer ``expert`` gave in ``text``, or None when none can be read."""
        extract = self.per_expert.get(expert, self.default)
        found = extract(text) if extract else None
        if not self.mixed or found is None:
            return found
        if _SPACED_DIGITS.fullmatch(found):
            # A number as a text extractor writes it, its point and separators lost ("1.250" reads "1 250", "-3.5"
            # "-3 5"): its value as ``number`` reads it from the answer, where that is the same figure (the same
            # sign and significant digits), else groups of thousands joined ("1 000" -> "1000", "-1 000" -> "-1000").
            number = extract_number(text)
            if (number is not None and _significant(number) == _significant(found)
                    and number.startswith("-") == found.startswith("-")):
                found = number
            elif _THOUSANDS.fullmatch(found):
                found = found.replace(" ", "")
        return pooled(found)


# What ``extract_short`` leaves of a number: its minus sign, and digits in groups where it had separators or a point.
_SPACED_DIGITS = re.compile(r"-?\d+( \d+)*")
_THOUSANDS = re.compile(r"-?\d{1,3}( \d{3})+")


def _significant(number: str) -> str:
    """``number``'s digits without its leading and trailing zeros: "1 250" and "1.25", "5" and "0.5" match."""
    return re.sub(r"\D", "", number).strip("0")


def pooled(answer: str) -> str:
    """``answer``, read by any extractor, in one form: a lone option letter as ``choice`` writes it ("b" -> "B"),
    anything else case folded."""
    if len(answer) == 1 and answer.upper() in _LETTERS:
        return answer.upper()
    return answer.casefold()


def _folded(text: str) -> str:
    return " ".join(text.split()).casefold()


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


_LETTERS = "ABCDEFGHIJ"


def choice_embedding(texts: Sequence[str]) -> np.ndarray:
    """``[n, 10]`` one-hot of each text's extracted choice letter (a zero row when none): consensus over
    these vectors is a weighted vote on the letter."""
    out = np.zeros((len(texts), len(_LETTERS)), dtype=np.float32)
    for row, text in enumerate(texts):
        letter = extract_choice(text)
        if letter is not None:
            out[row, _LETTERS.index(letter)] = 1.0
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


# Strategy name (``combiner.strategy`` in the config, the ``x-moe-combiner`` header) -> its class. Adding a strategy
# is a ``Combiner`` subclass and one line here; ``router.config.schema.STRATEGIES`` lists the same names (a test
# holds the two equal). An installed package adds one through an entry point (``experts.plugins.COMBINER_GROUP``).
COMBINERS: dict[str, type[Combiner]] = {"top1": TopOne, "vote": Vote, "consensus": Consensus, "fuse": Fuse,
                                        "escalate": Escalate}


def known_combiners() -> list[str]:
    """Every strategy a config or a request may name: ``COMBINERS``' and the installed packages' entry points'."""
    return sorted({*COMBINERS, *installed(COMBINER_GROUP)})


def combiner_class(strategy: str) -> type[Combiner]:
    """The class of ``strategy``: ``COMBINERS``', else the one an installed package's entry point names. Raises
    ``ValueError`` naming the known strategies for an unknown one, and saying why for an entry point that cannot be
    loaded (a request naming it is refused as a bad strategy, a config naming it as a bad value)."""
    if strategy in COMBINERS:
        return COMBINERS[strategy]
    if strategy not in installed(COMBINER_GROUP):
        raise ValueError(f"unknown combiner strategy {strategy!r}; known: {', '.join(known_combiners())}")
    try:
        found: type[Combiner] = load(COMBINER_GROUP, strategy, Combiner)
    except PluginError as exc:
        raise ValueError(f"combiner strategy {strategy!r}: {exc}") from exc
    return found


def build_combiner(strategy: str, extractor: str = "choice", *, per_expert: Mapping[str, str] | None = None,
                   embed: Embed | None = None, aggregator: str | None = None,
                   vote_weights: Mapping[str, float] | VoteWeights | None = None,
                   escalate_to: str | None = None, max_prompt_chars: int | None = None) -> Combiner:
    """``extractor`` reads final answers, ``per_expert`` maps an expert to its own extractor (every strategy but
    ``consensus``, which embeds). ``consensus`` needs ``embed`` (``choice_embedding`` when omitted and
    ``extractor`` is ``"choice"``);
    ``fuse`` needs the ``aggregator`` expert's name, and ``max_prompt_chars`` bounds its prompt; ``escalate``
    needs the ``escalate_to`` expert's; ``vote_weights`` gives ``vote`` learned weights."""
    cls = combiner_class(strategy)
    settings = CombinerSettings(extractor=extractor, per_expert=per_expert, embed=embed, aggregator=aggregator,
                                vote_weights=vote_weights, escalate_to=escalate_to,
                                max_prompt_chars=max_prompt_chars)
    return cls.from_settings(settings)
