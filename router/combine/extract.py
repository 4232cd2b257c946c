"""Final-answer extractors (``EXTRACTORS``): a choice letter, a number or a short answer, read out of free text.

Each returns a canonical answer string, or None when the text holds none; an answer that cannot be extracted
loses its vote, never the request. ``Extraction`` applies the combiner's extractor, or an expert's own.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Mapping
from decimal import Decimal

__all__ = ["EXTRACTORS", "LETTERS", "Extraction", "extract_choice", "extract_number", "extract_short", "pooled"]

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


LETTERS = "ABCDEFGHIJ"  # the option letters a choice answer may give (MMLU-Pro has ten)


def pooled(answer: str) -> str:
    """``answer``, read by any extractor, in one form: a lone option letter as ``choice`` writes it ("b" -> "B"),
    anything else case folded."""
    if len(answer) == 1 and answer.upper() in LETTERS:
        return answer.upper()
    return answer.casefold()

