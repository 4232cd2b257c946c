"""``extract_choice`` on real answers: RouterBench's recorded responses to ARC-Challenge and Winogrande.

The recordings carry each response's grade but not the gold letter; the gold letter of a question is the one
read from the responses graded right. An extraction agrees with a grade when it reads the gold letter exactly
where the response was graded right, so any misreading (of a right answer or of a wrong one) shows here.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from experts.recordings import load_routerbench
from router.combine import extract_choice


@pytest.mark.parametrize(("file", "floor"), [("arc_challenge_test.csv", 0.999), ("winograde_test.csv", 0.999)])
def test_extracted_letters_agree_with_the_recorded_grades(data_dir: Path, file: str, floor: float) -> None:
    store = load_routerbench(data_dir / "routerdc" / "routerbench_zs" / file)
    agree = total = unread = 0
    for row in store.rows:
        recorded = {m: a for m, a in row.answers.items() if a.recorded}
        letters = {m: extract_choice(a.response) for m, a in recorded.items()}
        right = [letters[m] for m, a in recorded.items() if a.correct == 1.0 and letters[m]]
        if not right:
            continue
        gold = Counter(right).most_common(1)[0][0]
        for m, a in recorded.items():
            total += 1
            unread += letters[m] is None
            agree += (letters[m] == gold) == (a.correct == 1.0)
    assert total > 4000
    assert agree / total >= floor, f"{agree}/{total} agree"
    assert unread / total < 0.05  # a response no letter is read from loses its vote
