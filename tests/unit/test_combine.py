import asyncio
import re
from collections.abc import Sequence
from typing import get_args

import numpy as np
import pytest
from pydantic import ValidationError

from experts.errors import ExpertUnavailable
from experts.types import ChatMessage
from router.combine import (
    COMBINERS,
    EXTRACTORS,
    FUSE_SYSTEM,
    Combined,
    Combiner,
    CombinerSettings,
    Consensus,
    Escalate,
    Fuse,
    FusePromptTooLong,
    TopOne,
    Vote,
    WeightedAnswer,
    build_combiner,
    choice_embedding,
    extract_choice,
    extract_number,
    extract_short,
    pooled,
)
from router.config import CombinerConfig
from router.config.schema import STRATEGIES, Extractor


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("The answer is (C).", "C"),
        ("after some thinking, the answer is B", "B"),
        ("Answer: d", "D"),
        ("['A']", "A"),
        ("E", "E"),
        ("(J) because of the tariff", "J"),
        ("I am not sure about this one.", None),
        ("", None),
    ],
)
def test_extract_choice(text: str, letter: str | None) -> None:
    assert extract_choice(text) == letter


def test_extract_number_and_short() -> None:
    assert extract_number("so 3 + 4 = 7, total 1,250.50") == "1250.5"
    assert extract_number("no digits") is None
    assert extract_short("Paris.") == "paris"
    assert extract_short("this answer has far too many words to count as a short one") is None


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        # The last answer statement wins: a revised answer, or an explicit final answer after a remark.
        ("At first glance the answer is A, but checking again, the answer is D.", "D"),
        ("The answer is (A)... no, wait. Answer: D", "D"),
        ("Let me reconsider.\nOption A fails for small n, so the answer is not A.\n\nFinal answer: B", "B"),
        ("**Step 1.** Eliminate (A) and (C).\n**Step 2.** The correct answer is (D).", "D"),
        # A lowercase article or pronoun is no letter; the statement after it is read.
        ("The answer is a bit subtle. Comparing the options, the final answer: C", "C"),
        ("The answer is a matter of definitions, so it depends.", None),
        ("The answer is I'm afraid not among the options.", None),
        ("The answer is I.", "I"),  # MMLU-Pro's ninth option
        ("Answer: I", "I"),
        # "I" before a lower-case word is the pronoun, not option I (it voted I and outweighed a unanimous C)
        ("Answer: I believe it's C.", None),
        ("The answer is I think (B). Final answer: B", "B"),
        ("The answer is I would say D.", None),
        ("Answer: I suppose it is B.", None),
        ("The answer is I honestly think B", None),
        ("Answer: I understand why, but B", None),
        # ... and option I before any other word stays option I (MMLU-Pro's answer is I about one time in ten)
        ("The answer is I because the other options ignore friction.", "I"),
        ("Final answer: \\boxed{I} since the rest fail.", "I"),
        ("The correct answer is option I because it conserves energy.", "I"),
        ("The answer is **I** which matches the data.", "I"),
        ("The answer is I and J is close.", "I"),
        ("At first the answer is B seemed right, but on reflection the answer is I because B ignores friction", "I"),
        ("The answer is b.", "B"),
        ("the correct answer is (c) because the membrane is permeable", "C"),
        ("answer: e\nexplanation: the others contradict the premise", "E"),
        # Formats LLMs write: markdown, "option"/"choice", quotes, brackets, LaTeX.
        ("The correct answer is **B**.", "B"),
        ("**Answer:** C", "C"),
        ("Answer: **B**", "B"),
        ("The answer is **(C)**", "C"),
        ("The correct answer is option (B).", "B"),
        ("Answer: Option C", "C"),
        ("The answer is choice [D].", "D"),
        ('The answer is "B".', "B"),
        ("The answer is `A`", "A"),
        ("The answer is __J__", "J"),
        ("Therefore the answer is $\\boxed{B}$.", "B"),
        ("so we get \\(\\boxed{\\text{C}}\\)", "C"),
        ("The final answer is: \\text{(A)}", "A"),
        # No statement: the whole text one letter, in any case, or a leading letter.
        ("b", "B"),
        ("(b)", "B"),
        ("**B**", "B"),
        ("Option C", "C"),
        (".......(C)", "C"),
        ("c) the mitochondria", "C"),
        ("B) because it conserves momentum", "B"),
        ("C. Paris", "C"),
        ("D.", "D"),
        ("E.g., consider the limiting case; I'd pick B.", None),
        # Going through the options, with no answer stated: the first option named is no answer.
        ("A) too small for the load\nB) too large\nC) just right", None),
        ("(A) fails at 0.\n(B) fails at 1.\nSo the answer is (C).", "C"),
        ("I.e. the second option.", None),
        ("A questioning attitude", None),
        ("K", None),
        ("The answer is K.", None),
    ],
)
def test_extract_choice_reads_the_final_stated_letter(text: str, letter: str | None) -> None:
    assert extract_choice(text) == letter


@pytest.mark.parametrize(
    ("text", "number"),
    [
        # Signs, bare fractions, exponents, fractions, separators, currency and percent.
        ("-.5", "-0.5"),
        (".5", "0.5"),
        ("The temperature drops to \u22123 degrees.", "-3"),
        ("The rate is 1.5e-3 per second.", "0.0015"),
        ("roughly 1e3", "1000"),
        ("1.5E+2", "150"),
        ("She ate 3/4 of the pie.", "0.75"),
        ("-3/4", "-0.75"),
        ("The answer is \\frac{1}{4}", "0.25"),
        ("She earned 1,000 dollars.", "1000"),
        ("The population is 12,345,678.", "12345678"),
        ("The point is (3,4).", "4"),
        ("-0", "0"),
        ("The answer is -0.00", "0"),
        ("It costs $5.", "5"),
        ("The discount is 50%.", "50"),
        ("so 3 + 4 = 7, total 1,250.50", "1250.5"),
        ("It went from 10-5 to 5-3", "3"),
        ("COVID-19", "19"),
        # The last answer statement's number, not a remark after it.
        ("The answer is 42. I hope this helps! Let me know if you need step 2.", "42"),
        ("Final answer: 5\n\n(Computed in 3 steps)", "5"),
        ("\\boxed{12} (checked with 2 methods)", "12"),
        ("She sells 9 eggs for 9 * $2 = $<<9*2=18>>18.\n#### 18", "18"),
        ("First I thought the answer is 12, then I found an error.\nThe answer is: $1,080.00 in total, over 3 days",
         "1080"),
        ("The answer is -7, since 3 - 10 = -7 after 2 rounds.", "-7"),
        # LaTeX's forms: a signed fraction, thousands separators, a power of ten.
        ("Answer: \\frac{-3}{4}", "-0.75"),
        ("The answer is 1{,}000.", "1000"),
        ("The answer is $\\boxed{1{,}234}$", "1234"),
        ("The answer is 3\\,000", "3000"),
        ("the answer is \\(1.5 \\times 10^{3}\\)", "1500"),
        ("so x = 2.5 \\times 10^{-2}", "0.025"),
        ("light covers 3\u00d710^5 km each second", "300000"),
        ("The point is (3\\, 4).", "4"),
        # An equation after the statement: its result, not its first term (which outvoted a right "1000").
        ("The answer is 1500 - 500 = 1000.", "1000"),
        ("Answer: 2 + 2 = 4", "4"),
        ("The final answer is 12 \u2212 4 = 8 apples", "8"),
        ("The answer is 3 \\times (4 + 1) = 15", "15"),
        ("The answer is 7 = 7", "7"),
        # Thousands in groups split by a space, a no-break or narrow no-break space (SI style); powers; mixed numbers.
        ("The answer is 1 000 000", "1000000"),
        ("Total: 1\u00a0000", "1000"),
        ("It weighs 2\u202f500.5 kg", "2500.5"),
        ("The answer is 12 3456", "12"),
        ("\\boxed{10^{3}}", "1000"),
        ("The answer is 2^10", "1024"),
        ("so x = 2^{-2}", "0.25"),
        ("The answer is 3 1/2 cups", "3.5"),
        ("Answer: -3 1/2", "-3.5"),
        # ... but a plain space splits numbers outside a statement, a group before "-" is a word's, and a year is
        # no mixed number's whole part
        ("The scores were 120 135 150", "150"),
        ("The answer is 5 100-dollar bills.", "5"),
        ("So in 2023 1/4 of the staff left", "0.25"),
        # No statement: the last number.
        ("She has 16 - 3 - 4 = 9 eggs left, which she sells for $18 in total.", "18"),
        ("no digits", None),
        ("", None),
    ],
)
def test_extract_number_reads_the_stated_number_canonically(text: str, number: str | None) -> None:
    assert extract_number(text) == number


@pytest.mark.parametrize(
    ("text", "short"),
    [
        ("Paris.", "paris"),
        ("The answer is Paris.", "paris"),
        ("Answer: Paris", "paris"),
        ("**Final answer:** Paris", "paris"),
        ("New-York", "new york"),
        ("  New   York ", "new york"),
        ("3.5", "3 5"),
        # A minus sign before a number stays: "-3" and "3" are different answers ("+3" is "3").
        ("-3", "-3"),
        ("The answer is \u22123.", "-3"),
        ("+3", "3"),
        ("5-3", "5 3"),
        ("35", "35"),
        ("\uff30\uff41\uff52\uff49\uff53", "paris"),  # fullwidth
        ("nai\u0308ve", "na\u00efve"),  # NFD -> NFC
        ("Stra\u00dfe", "strasse"),
        ("The answer is George Washington, the first president.", "george washington the first president"),
        # LaTeX wrappers read through, a reason after the answer left out.
        ("\\boxed{Paris}", "paris"),
        ("Answer: \\boxed{\\text{Paris}}", "paris"),
        ("Paris, because it is the capital of France.", "paris"),
        ("Paris since the Middle Ages", "paris"),
        ("Since 1990", "since 1990"),
        # However the reason is set off: no space after the comma, or in parentheses.
        ("Paris,because it is the capital", "paris"),
        ("Paris (since 1789)", "paris"),
        ("Paris; since the Middle Ages", "paris"),
        ("Paris\u2014because it is the capital", "paris"),
        ("Paris [since 1789]", "paris"),
        ("Paris:because", "paris"),
        ("Paris...because it is", "paris"),
        # An answer that starts with the word is the answer.
        ('"Because of You"', "because of you"),
        ("**Since U Been Gone**", "since u been gone"),
        ("this answer has far too many words to count as a short one", None),
        ("...", None),
    ],
)
def test_extract_short_folds_unicode_case_punctuation_and_the_answer_prefix(text: str, short: str | None) -> None:
    assert extract_short(text) == short
    assert short is None or extract_short(short) == short  # what it gives, read again, is itself


def test_a_hyphen_joins_since_to_the_word_before_it() -> None:
    # Not read again as itself: the hyphen is folded into a space, and "long since ..." reads as a reason.
    assert extract_short("long-since abandoned") == "long since abandoned"


def test_top1_takes_the_heaviest_answer() -> None:
    result = TopOne().combine([WeightedAnswer("a", 0.3, "x"), WeightedAnswer("b", 0.7, "y")])
    assert (result.content, result.expert) == ("y", "b")
    assert {c.expert: c.agreed for c in result.contributions} == {"a": False, "b": True}


def test_vote_lets_two_lighter_experts_outvote_the_heaviest() -> None:
    answers = [
        WeightedAnswer("big", 0.4, "The answer is (A)."),
        WeightedAnswer("m1", 0.35, "The answer is (B)."),
        WeightedAnswer("m2", 0.25, "Answer: B"),
    ]
    result = Vote("choice").combine(answers)
    assert result.expert == "m1"
    assert result.content == "The answer is (B)."
    assert {c.expert: c.agreed for c in result.contributions} == {"big": False, "m1": True, "m2": True}


def test_vote_unextractable_answer_loses_its_vote_not_the_request() -> None:
    answers = [WeightedAnswer("a", 0.6, "no idea"), WeightedAnswer("b", 0.4, "The answer is (D).")]
    result = Vote("choice").combine(answers)
    assert result.expert == "b"
    assert [c.agreed for c in result.contributions] == [False, True]


def test_vote_with_nothing_extractable_falls_back_to_top1() -> None:
    result = Vote("choice").combine([WeightedAnswer("a", 0.6, "hmm"), WeightedAnswer("b", 0.4, "well")])
    assert result.expert == "a"


def test_vote_tie_goes_to_the_single_heaviest_expert() -> None:
    answers = [WeightedAnswer("a", 0.5, "A"), WeightedAnswer("b", 0.3, "B"), WeightedAnswer("c", 0.2, "B")]
    assert Vote().combine(answers).content == "A"


def _panel(*answers: tuple[str, float, str]) -> list[WeightedAnswer]:
    return [WeightedAnswer(e, w, t) for e, w, t in answers]


@pytest.mark.parametrize(
    ("answers", "content"),
    [
        # 0.05 + 0.1 + 0.15 and 0.1 + 0.2 are 0.3 only up to float rounding: a tie, to B's heavier single vote.
        (_panel(("x", 0.3, "Answer: B"), ("a", 0.05, "Answer: A"), ("b", 0.1, "Answer: A"), ("c", 0.15, "Answer: A")),
         "Answer: B"),
        (_panel(("x", 0.3, "Answer: B"), ("c", 0.15, "Answer: A"), ("b", 0.1, "Answer: A"), ("a", 0.05, "Answer: A")),
         "Answer: B"),
        (_panel(("x", 0.3, "Answer: B"), ("a", 0.1, "Answer: A"), ("b", 0.2, "Answer: A")), "Answer: B"),
        # Equal in tally and in single weight: the first in the panel (the gate's ranking).
        (_panel(("a", 0.5, "Answer: A"), ("b", 0.5, "Answer: B")), "Answer: A"),
        (_panel(("b", 0.5, "Answer: B"), ("a", 0.5, "Answer: A")), "Answer: B"),
        (_panel(("a", 0.25, "Answer: A"), ("b", 0.25, "Answer: B"), ("c", 0.25, "Answer: A"), ("d", 0.25, "Answer: B")),
         "Answer: A"),
        (_panel(("d", 0.4, "I am not sure."), ("b", 0.3, "Answer: D"), ("a", 0.3, "Answer: C")), "Answer: D"),
        # A readable letter whose tally rounds to 0 still beats an answer with none (a panel member's weight may be
        # 0: the gate's probability for it was).
        (_panel(("big", 1.0, "I am not sure which option is right."), ("tiny", 1e-10, "The answer is (B).")),
         "The answer is (B)."),
        (_panel(("big", 1.0, "I am not sure which option is right."), ("zero", 0.0, "The answer is (B).")),
         "The answer is (B)."),
    ],
)
def test_vote_ties_ignore_float_rounding_and_go_as_consensus_over_letters(answers: list[WeightedAnswer],
                                                                          content: str) -> None:
    assert Vote("choice").combine(answers).content == content
    assert Consensus(choice_embedding).combine(answers).content == content


def test_vote_and_consensus_over_letters_give_the_same_answers() -> None:
    rng = np.random.default_rng(0)
    for _ in range(500):
        n = int(rng.integers(2, 7))
        # Few distinct weights and letters, so ties of every kind are frequent.
        weights = rng.choice([0.1, 0.2, 0.25, 0.3, 0.05, 0.15], size=n)
        texts = [f"The answer is ({letter})." if letter != "-" else "I cannot tell."
                 for letter in rng.choice(list("ABC-"), size=n)]
        answers = [WeightedAnswer(f"e{i}", float(w), t) for i, (w, t) in enumerate(zip(weights, texts, strict=True))]
        vote, consensus = Vote("choice").combine(answers), Consensus(choice_embedding).combine(answers)
        assert (vote.expert, vote.content) == (consensus.expert, consensus.content), answers


def test_vote_keeps_each_answer_of_one_expert_apart() -> None:
    answers = _panel(("a", 0.4, "Answer: A"), ("a", 0.3, "Answer: B"), ("b", 0.3, "Answer: B"))
    result = Vote().combine(answers)
    assert (result.content, result.expert) == ("Answer: B", "a")
    assert [(c.expert, c.weight, c.agreed) for c in result.contributions] == [
        ("a", 0.4, False), ("a", 0.3, True), ("b", 0.3, True)]


def test_build_combiner_rejects_unknown_strategy() -> None:
    with pytest.raises(ValueError, match="unknown combiner strategy 'best'"):
        build_combiner("best")


def test_vote_per_expert_extractor_override() -> None:
    answers = [WeightedAnswer("letters", 0.4, "The answer is (B)."), WeightedAnswer("numbers", 0.6, "It is 42")]
    result = Vote("choice", per_expert={"numbers": "number"}).combine(answers)
    assert result.expert == "numbers"  # its "42" is a vote, not an unextractable answer


def test_consensus_on_letters_is_weighted_agreement() -> None:
    answers = [WeightedAnswer("big", 0.4, "The answer is (A)."), WeightedAnswer("m1", 0.35, "Answer: B"),
               WeightedAnswer("m2", 0.25, "(B) because"), WeightedAnswer("mute", 0.5, "no idea")]
    result = Consensus(choice_embedding).combine(answers)
    assert result.expert == "m1" and result == Vote("choice").combine(answers)
    assert {c.expert: c.agreed for c in result.contributions} == {"big": False, "m1": True, "m2": True,
                                                                  "mute": False}


def test_consensus_picks_the_answer_nearest_the_weighted_centroid() -> None:
    vectors = {"north": [1.0, 0.0], "north-east": [0.8, 0.6], "east": [0.0, 1.0]}

    def embed(texts: Sequence[str]) -> np.ndarray:
        return np.array([vectors[t] for t in texts])

    answers = [WeightedAnswer("a", 0.45, "north"), WeightedAnswer("b", 0.1, "north-east"),
               WeightedAnswer("c", 0.45, "east")]
    result = build_combiner("consensus", embed=embed).combine(answers)
    assert result.content == "north-east"  # the middle answer, though the lightest
    assert [c.agreed for c in result.contributions] == [True, True, False]  # cos 0.8 vs 0.6 to the choice


def test_fuse_builds_the_prompt_and_reads_the_aggregators_reply() -> None:
    fuse = Fuse("agg", extractor="choice")
    answers = [WeightedAnswer("a", 0.3, "The answer is (A)."), WeightedAnswer("b", 0.7, "The answer is (C).")]
    messages = fuse.messages("Which one?", answers)
    assert [m.role for m in messages] == ["system", "user"]
    user = str(messages[1].content)
    assert "Which one?" in user and user.index("weight 0.70") < user.index("weight 0.30")
    seen: list[list[ChatMessage]] = []

    async def fake_aggregator(msgs: list[ChatMessage]) -> str:
        seen.append(msgs)
        return "Weighing both, the answer is (A)."

    result = asyncio.run(fuse.fuse("Which one?", answers, fake_aggregator))
    assert seen == [messages]
    assert (result.expert, result.content) == ("agg", "Weighing both, the answer is (A).")
    assert {c.expert: c.agreed for c in result.contributions} == {"a": True, "b": False}


def test_fuse_keeps_the_end_of_a_long_answer_and_says_what_it_left_out() -> None:
    """Each answer was cut to its first 4,000 characters, silently: a chain of thought's final statement, at its
    end, never reached the aggregator."""
    long = "Step. " * 1000 + "So the answer is (D)."
    messages = Fuse("agg").messages("Which one?", [WeightedAnswer("a", 0.6, long), WeightedAnswer("b", 0.4, "(B)")])
    user = str(messages[1].content)
    assert "So the answer is (D)." in user and f"[... {len(long) - 4000:,} characters left out ...]" in user
    assert len(user) < 4300


def test_fuse_fits_its_prompt_to_max_prompt_chars_or_is_not_asked() -> None:
    """64 answers and a long question made a prompt 3.5 times service.max_prompt_chars, which the aggregator then
    refused: the answers are cut to fit, and a question that leaves them too little room is a clear fallback."""
    answers = [WeightedAnswer(f"e{i}", 1 / 64, f"answer {i}: " + "x" * 5000 + " so it is (A)") for i in range(64)]
    fuse = Fuse("agg", max_prompt_chars=100_000)
    messages = fuse.messages("Which one?", answers)
    assert sum(len(str(m.content)) for m in messages) <= 100_000
    assert str(messages[1].content).count("so it is (A)") == 64

    async def aggregator(msgs: list[ChatMessage]) -> str:
        raise AssertionError("not asked")

    result = asyncio.run(fuse.acombine("q" * 99_000, answers, aggregator))
    assert result.expert == "e0" and isinstance(result.fallback, FusePromptTooLong)
    assert result.fallback.kind == "prompt_too_long" and "service.max_prompt_chars (100,000)" in str(result.fallback)


def test_fuse_gives_short_answers_unused_room_to_the_long_one() -> None:
    """Every answer was cut to an equal share of the room: three one-line answers left most of theirs unused while
    the long one, whose end states its result, was cut to a quarter of the room."""
    long = "Step. " * 2000 + "So the answer is (D)."
    answers = [WeightedAnswer("a", 0.4, long), *(WeightedAnswer(e, 0.2, f"It is ({e.upper()}).") for e in "bcd")]
    system, user = Fuse("agg", max_prompt_chars=3000).messages("Which one?", answers)
    assert len(str(system.content)) + len(str(user.content)) <= 3000
    assert all(f"It is ({e.upper()})." in str(user.content) for e in "bcd")
    left_out = int(re.search(r"\[\.\.\. ([\d,]+) characters left out", str(user.content))[1].replace(",", ""))
    kept = len(long) - left_out
    # The whole room less the instructions, the question, the short answers and the headings: over 1,500 here,
    # where an equal quarter share kept under 600.
    assert kept > 3000 - len(str(system.content)) - 400, kept
    assert "So the answer is (D)." in str(user.content)


def test_fuse_gives_the_aggregator_the_conversation_and_its_instructions() -> None:
    """The aggregator saw the last user message alone: not the system prompt's format, not the earlier turns."""
    history = [ChatMessage(role="system", content="Answer in French, in one word."),
               ChatMessage(role="user", content="What is the capital of Italy?"),
               ChatMessage(role="assistant", content="Rome.")]
    system, user = Fuse("agg").messages("And of Spain?", [WeightedAnswer("a", 0.5, "Madrid"),
                                                          WeightedAnswer("b", 0.5, "Madrid.")], history)
    assert str(system.content).startswith(FUSE_SYSTEM) and "Answer in French, in one word." in str(system.content)
    text = str(user.content)
    assert "user: What is the capital of Italy?\nassistant: Rome." in text
    assert text.index("Rome.") < text.index("Question:\nAnd of Spain?")
    assert "Answer in French" not in text  # once, with the instructions


def test_fuse_shows_earlier_tool_calls_by_name_and_arguments() -> None:
    """An assistant turn that only called a tool read "[no text]" to the aggregator."""
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
    history = [ChatMessage(role="user", content="Weather in Oslo?"),
               ChatMessage(role="assistant", content=None, tool_calls=[call]),
               ChatMessage(role="tool", content="-3 C, snow", tool_call_id="c1"),
               ChatMessage(role="assistant", content="It is -3 C and snowing.")]
    _, user = Fuse("agg").messages("And tomorrow?", [WeightedAnswer("a", 0.5, "x"), WeightedAnswer("b", 0.5, "y")],
                                   history)
    assert ('user: Weather in Oslo?\nassistant: [tool call: weather({"city": "Oslo"})]\ntool: -3 C, snow\n'
            "assistant: It is -3 C and snowing.\n\nQuestion:\nAnd tomorrow?\n\nAnswer 1") in str(user.content)


def test_fuse_falls_back_to_top1_when_the_aggregator_fails() -> None:
    async def failing_aggregator(msgs: list[ChatMessage]) -> str:
        raise ExpertUnavailable("agg", "down")

    answers = [WeightedAnswer("a", 0.3, "x"), WeightedAnswer("b", 0.7, "y")]
    result = asyncio.run(Fuse("agg").fuse("q", answers, failing_aggregator))
    assert (result.expert, result.content) == ("b", "y")


def test_build_combiner_knows_every_strategy_and_what_each_needs() -> None:
    assert set(COMBINERS) == {"top1", "vote", "consensus", "fuse", "escalate"}
    assert isinstance(build_combiner("consensus"), Consensus)  # letters need no model
    with pytest.raises(ValueError, match="embedding"):
        build_combiner("consensus", "short")
    with pytest.raises(ValueError, match="aggregator"):
        build_combiner("fuse")
    assert isinstance(build_combiner("fuse", aggregator="agg"), Fuse)
    with pytest.raises(ValueError, match=r"escalate_to"):
        build_combiner("escalate")
    escalate = build_combiner("escalate", "number", escalate_to="big", per_expert={"odd": "choice"})
    assert isinstance(escalate, Escalate) and escalate.aggregator == "big"
    # Extraction per expert, as vote does it: "(C)" from "odd" and "3" from "plain" are two different answers.
    assert escalate.agreed([WeightedAnswer("odd", 0.5, "(C)"), WeightedAnswer("plain", 0.5, "it is 3")]) is None
    assert escalate.agreed([WeightedAnswer("a", 0.5, "42"), WeightedAnswer("b", 0.5, "about 42")]) == "42"
    assert escalate.combine([WeightedAnswer("a", 0.7, "42"), WeightedAnswer("b", 0.3, "7")]).expert == "a"


def test_fuse_keeps_the_aggregators_error_and_skips_a_single_answer() -> None:
    error = ExpertUnavailable("agg", "down")
    calls: list[list[ChatMessage]] = []

    async def failing_aggregator(msgs: list[ChatMessage]) -> str:
        calls.append(msgs)
        raise error

    answers = [WeightedAnswer("a", 0.3, "x"), WeightedAnswer("b", 0.7, "y")]
    result = asyncio.run(Fuse("agg").acombine("q", answers, failing_aggregator))
    assert (result.expert, result.fallback) == ("b", error)
    alone = asyncio.run(Fuse("agg").acombine("q", answers[:1], failing_aggregator))
    assert (alone.expert, alone.content, alone.fallback, len(calls)) == ("a", "x", None, 1)


def test_acombine_is_combine_for_strategies_that_only_choose() -> None:
    async def no_model(msgs: list[ChatMessage]) -> str:
        raise AssertionError("no model call expected")

    answers = [WeightedAnswer("a", 0.4, "The answer is (B)."), WeightedAnswer("b", 0.35, "Answer: C"),
               WeightedAnswer("c", 0.25, "(C)")]
    for combiner in (TopOne(), Vote("choice"), Consensus(choice_embedding)):
        assert asyncio.run(combiner.acombine("q", answers, no_model)) == combiner.combine(answers)
    assert Consensus(choice_embedding).combine(answers).expert == "b"
    assert Consensus(lambda texts: 1 / 0).combine(answers[:1]).expert == "a"  # one answer: nothing embedded


def test_top1_marks_every_answer_with_the_chosen_final_answer_as_agreed() -> None:
    answers = [WeightedAnswer("a", 0.5, "The answer is (B)."), WeightedAnswer("b", 0.3, "Answer: B"),
               WeightedAnswer("c", 0.2, "(C)")]
    result = TopOne("choice").combine(answers)
    assert (result.expert, result.content) == ("a", "The answer is (B).")
    assert {c.expert: c.agreed for c in result.contributions} == {"a": True, "b": True, "c": False}
    # Without an extractor, the same text up to case and whitespace is the same answer.
    texts = [WeightedAnswer("a", 0.5, "Paris"), WeightedAnswer("b", 0.3, "  paris "), WeightedAnswer("c", 0.2, "Lyon")]
    assert [c.agreed for c in TopOne().combine(texts).contributions] == [True, True, False]
    # An empty answer (tool calls alone) has no final answer to share.
    empty = [WeightedAnswer("a", 0.6, ""), WeightedAnswer("b", 0.4, "")]
    assert [c.agreed for c in TopOne().combine(empty).contributions] == [True, False]


def test_fuse_and_escalate_read_each_experts_answer_with_its_own_extractor() -> None:
    # Short answers, but "verbose" writes a sentence: only a number extractor reads its answer.
    answers = [WeightedAnswer("terse", 0.6, "42"),
               WeightedAnswer("verbose", 0.4, "After a long and careful derivation the total comes to 42")]
    fuse = Fuse("writer", "short", per_expert={"verbose": "number"})
    assert [c.agreed for c in fuse.result(answers, "42").contributions] == [True, True]
    # The aggregator's (and the escalation expert's) reply is read with that expert's own extractor too.
    reply = "I make it 42 after checking twice"
    fuse = Fuse("writer", "short", per_expert={"verbose": "number", "writer": "number"})
    assert [c.agreed for c in fuse.result(answers, reply).contributions] == [True, True]
    escalate = Escalate("big", "short", per_expert={"verbose": "number", "big": "number"})
    assert [c.agreed for c in escalate.result(answers, reply).contributions] == [True, True]
    assert escalate.agreed(answers) == "42"  # the panel agrees: no escalation
    assert Escalate("big", "short").agreed(answers) is None


def test_an_unknown_extractor_is_refused_naming_whose_it_is() -> None:
    with pytest.raises(ValueError, match=r"unknown extractor 'letter' for expert 'odd'; known: choice, number, "
                                         r"short"):
        Vote("choice", per_expert={"odd": "letter"})
    with pytest.raises(ValueError, match=r"unknown extractor 'words' for the combiner"):
        build_combiner("top1", "words")


def test_the_config_offers_exactly_the_extractors_there_are() -> None:
    assert set(get_args(Extractor)) == set(EXTRACTORS)


def test_the_config_offers_exactly_the_combiners_there_are() -> None:
    assert set(STRATEGIES) == set(COMBINERS)
    with pytest.raises(ValidationError, match=r"unknown combiner strategy 'best'; known: consensus, escalate, fuse, "
                                              r"top1, vote \(an installed package adds one"):
        CombinerConfig(strategy="best")


@pytest.mark.parametrize("strategy", sorted(COMBINERS))
def test_every_registered_combiner_builds_itself_from_the_settings(strategy: str) -> None:
    # Everything any strategy needs; each takes its part.
    combiner = build_combiner(strategy, "number", per_expert={"odd": "choice"}, embed=choice_embedding,
                              aggregator="agg", vote_weights={"odd": 1.0}, escalate_to="big")
    assert type(combiner) is COMBINERS[strategy] and combiner.name == strategy


class LastAnswer(Combiner):
    """A strategy added in a test: one class and one registry line."""

    name = "last"

    def __init__(self, extractor: str) -> None:
        self.extractor = extractor

    @classmethod
    def from_settings(cls, settings: CombinerSettings) -> "LastAnswer":
        return cls(settings.extractor)

    def combine(self, answers: list[WeightedAnswer]) -> Combined:
        return TopOne().combine(answers[-1:])


def test_a_registered_combiner_needs_no_other_edit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(COMBINERS, "last", LastAnswer)
    combiner = build_combiner("last", "short")
    assert isinstance(combiner, LastAnswer) and combiner.extractor == "short"
    with pytest.raises(ValueError, match=r"known: consensus, escalate, fuse, last, top1, vote"):
        build_combiner("best")
    assert CombinerConfig(strategy="last").strategy == "last"  # the config takes it too


def test_a_failed_escalation_falls_back_to_the_vote_with_its_learned_weights() -> None:
    """With learned vote weights, escalate's fallback is the panel's vote as ``vote`` counts it: b's learned weight
    outvotes a's heavier panel weight, as it does in ``vote``."""
    async def failing(msgs: list[ChatMessage] | None) -> str:
        raise ExpertUnavailable("big", "down")

    learned = {"a": 0.1, "b": 2.0}
    answers = [WeightedAnswer("a", 0.6, "The answer is (B)."), WeightedAnswer("b", 0.4, "The answer is (C).")]
    vote = build_combiner("vote", vote_weights=learned)
    escalate = build_combiner("escalate", vote_weights=learned, escalate_to="big")
    assert vote.combine(answers).expert == "b"
    result = asyncio.run(escalate.acombine("q", answers, failing))
    assert (result.expert, result.content) == ("b", "The answer is (C).")
    assert result.fallback is not None and result.fallback.kind == "unavailable"
    assert result.contributions == vote.combine(answers).contributions


def test_answers_read_by_different_extractors_are_pooled_before_they_are_counted() -> None:
    """choice writes "B" where short reads "b", number "1000" where short reads "1 000": such votes never met,
    and a lighter third answer won over two that agreed."""
    letters = Vote("choice", per_expert={"e2": "short"})
    panel = [WeightedAnswer("e1", 0.3, "Answer: B"), WeightedAnswer("e2", 0.3, "b"), WeightedAnswer("e3", 0.4, "(C)")]
    result = letters.combine(panel)
    assert result.expert == "e1" and [c.agreed for c in result.contributions] == [True, True, False]
    numbers = Vote("number", per_expert={"e2": "short"})
    result = numbers.combine([WeightedAnswer("e1", 0.3, "Answer: 1,000"), WeightedAnswer("e2", 0.3, "1 000"),
                              WeightedAnswer("e3", 0.4, "999")])
    assert result.expert == "e1" and [c.agreed for c in result.contributions] == [True, True, False]
    # a sign read by short is kept: "-3" is -3, not 3
    result = numbers.combine([WeightedAnswer("e2", 0.3, "-3"), WeightedAnswer("n1", 0.3, "3"),
                              WeightedAnswer("n2", 0.4, "-3")])
    assert result.expert == "n2" and [c.agreed for c in result.contributions] == [True, False, True]
    # a decimal read by short is its value, not a thousands number: "1.250" is 1.25, not 1250
    result = numbers.combine([WeightedAnswer("n1", 0.3, "1250"), WeightedAnswer("e2", 0.3, "1.250"),
                              WeightedAnswer("n2", 0.4, "1.25")])
    assert result.expert == "n2" and [c.agreed for c in result.contributions] == [False, True, True]
    # a negative decimal or thousands number read by short (which keeps the sign) pools with number's reading
    for short, other in (("-3.5", "-3.5"), ("-1 000", "-1,000"), ("-2.25", "The answer is -2.25")):
        result = numbers.combine([WeightedAnswer("e2", 0.3, short), WeightedAnswer("n1", 0.3, other),
                                  WeightedAnswer("n2", 0.4, "4")])
        assert result.expert == "e2" and [c.agreed for c in result.contributions] == [True, True, False], short
    # one extractor for all: its own forms, unchanged ("3 5" is not "35")
    assert Vote("short").key(WeightedAnswer("e", 1.0, "3.5")) == "3 5"
    assert pooled("b") == "B" and pooled("Paris") == "paris"


def test_an_answer_stating_nothing_does_not_agree_with_a_reply_stating_nothing() -> None:
    """The aggregator's (or the escalation's) reply states no letter, nor does b's answer: that is no agreement.
    Counted as one, b would be credited with the verdict on the answer (``Trace.credited``), and moe train would
    learn to send queries to the expert that answered nothing."""
    fused = Fuse("agg", "choice").result(
        [WeightedAnswer("a", 0.6, "The answer is (B)."), WeightedAnswer("b", 0.4, "I am not sure.")],
        "It depends on the reading of the question.")
    assert [c.agreed for c in fused.contributions] == [False, False]
    escalated = build_combiner("escalate", "choice", escalate_to="judge").result(
        [WeightedAnswer("a", 0.5, "(A)"), WeightedAnswer("b", 0.5, "no idea")], "cannot say")
    assert [c.agreed for c in escalated.contributions] == [False, False]


def test_fuse_is_not_asked_when_each_answer_would_keep_under_200_characters() -> None:
    """A question that leaves each answer about 100 characters of the aggregator's prompt (more than none, less
    than 200) is not sent: fuse falls back, naming the prompt as too long, without paying for the call."""
    answers = [WeightedAnswer(f"e{i}", 0.25, "x" * 5000 + " so it is (A)") for i in range(4)]

    async def aggregator(messages: list[ChatMessage]) -> str:
        raise AssertionError("the aggregator was asked with answers cut to about 100 characters")

    result = asyncio.run(Fuse("agg", max_prompt_chars=3000).acombine("q" * 2000, answers, aggregator))
    assert isinstance(result.fallback, FusePromptTooLong) and result.expert == "e0"
