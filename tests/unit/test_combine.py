import pytest

from router.combine import TopOne, Vote, WeightedAnswer, build_combiner, extract_choice, extract_number, extract_short


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


def test_build_combiner_rejects_unknown_strategy() -> None:
    with pytest.raises(ValueError, match="unknown combiner strategy 'best'"):
        build_combiner("best")
