"""``routerbench-combine``: combiners on hand-built recordings, a hand-built RouterBench folder, and real data."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from eval.combine_suite import weights_of
from eval.harness import run_suite
from eval.routerbench_combine import Recorded, combine_panels, combiners_for, key_embedding, rank_panels
from router.combine import Consensus, TopOne, Vote, choice_embedding, extract_number
from router.vote_weights import VoteWeights
from tests.doubles.fakes import FakeHashingEncoder
from tests.support import PNG_SIGNATURE

nan = float("nan")
CODE = ["def f(x):\n    return x + 1  # the odd one out, and the top-weight answer",
        "def f(x):\n    return x + 2", "def f(x):\n    return x + 2  # same as the second"]


def _code_embedding(texts: Sequence[str]) -> np.ndarray:
    # Two directions: the first program, and the other two (which agree).
    return np.array([[1.0, 0.0] if t == CODE[0] else [0.0, 1.0] for t in texts])


def _recorded() -> Recorded:
    """Five queries, three experts; comments give what each combiner must return."""
    return Recorded(
        experts=["a", "b", "c"],
        tasks=["arc_challenge", "winograde", "mbpp", "gsm8k", "arc_challenge"],
        texts=[["The answer is B.", "B", "C"],  # B 0.5+0.4 beats C's 0.8: a (heaviest B voter), right
               ["A", "", "B"],  # b has no record, so A 0.6 beats B 0.5: a, wrong
               CODE,  # vote keeps the top weight (a, wrong); consensus the two that agree (b, right)
               ["so 42", "It is 41", "#### 42.0"],  # 42 (0.3+0.25) beats 41 (0.45): a, right
               ["", "", ""]],  # nobody has a record: wrong, and every call is still paid
        outcomes=np.array([[1, 1, 0], [0, nan, 1], [0, 1, 1], [1, 0, 1], [nan, nan, nan]], dtype=float),
        costs=np.array([[0.01, 0.02, 0.04]] * 5),
    )


PANELS = np.array([[2, 0, 1], [0, 1, 2], [0, 1, 2], [0, 1, 2], [0, 1, 2]])
WEIGHTS = np.array([[0.8, 0.5, 0.4], [0.6, 0.9, 0.5], [0.4, 0.35, 0.25], [0.3, 0.45, 0.25], [0.5, 0.3, 0.2]])


def test_combiners_on_hand_built_panels() -> None:
    rec = _recorded()
    vote = combiners_for("vote", rec.tasks)
    assert isinstance(vote["mbpp"], TopOne) and isinstance(vote["gsm8k"], Vote)
    correct, cost = combine_panels(rec, PANELS, WEIGHTS, vote)
    assert correct.tolist() == [1, 0, 0, 1, 0]
    assert cost == pytest.approx([0.07] * 5)  # a panel pays every member, answered or not
    consensus = combiners_for("consensus", rec.tasks, _code_embedding)
    assert isinstance(consensus["mbpp"], Consensus)
    assert combine_panels(rec, PANELS, WEIGHTS, consensus)[0].tolist() == [1, 0, 1, 1, 0]
    top1 = combine_panels(rec, PANELS, WEIGHTS, combiners_for("top1", rec.tasks))[0]
    assert top1.tolist() == [0, 0, 0, 0, 0]  # c; a (b failed); a; b; nobody
    single = combine_panels(rec, np.array([[1]] * 5), np.ones((5, 1)), combiners_for("top1", rec.tasks))
    assert single[0].tolist() == [1, 0, 1, 0, 0] and single[1] == pytest.approx([0.02] * 5)
    with pytest.raises(ValueError, match="embedding"):
        combiners_for("consensus", ["mbpp"])


def test_each_task_gets_the_services_combiner_in_its_answer_format() -> None:
    tasks = ["arc_challenge", "gsm8k", "mbpp"]
    learned = VoteWeights(experts=("a", "b"), weights=np.array([0.3, 0.7]))
    top1 = combiners_for("top1", tasks)
    assert all(type(c) is TopOne and c.extraction.default is None for c in top1.values())  # reads no answer
    vote = combiners_for("vote", tasks, learned=learned)
    assert type(vote["mbpp"]) is TopOne and vote["mbpp"].extraction.default is None  # Vote's fallback, no extraction
    gsm8k = vote["gsm8k"]
    assert isinstance(gsm8k, Vote) and gsm8k.extraction.default is extract_number and gsm8k.learned is learned
    consensus = combiners_for("consensus", tasks, _code_embedding)
    assert all(isinstance(c, Consensus) and c.agree_at == 0.8 for c in consensus.values())
    assert {t: c.embed for t, c in consensus.items() if t != "gsm8k"} == {"arc_challenge": choice_embedding,
                                                                          "mbpp": _code_embedding}
    assert consensus["gsm8k"].embed(["7", "x = 7.0", "8"]).tolist() == [[1, 0], [1, 0], [0, 1]]  # number one-hot
    with pytest.raises(ValueError, match=r"unknown strategy 'fuse'; known: top1, vote, consensus"):
        combiners_for("fuse", tasks)


def test_panels_weights_and_key_embedding() -> None:
    success = np.array([[0.2, 0.9, 0.5], [0.7, 0.7, 0.1]])
    assert rank_panels(success, 2).tolist() == [[1, 2], [0, 1]]  # ties keep the lower index first
    w = weights_of(np.array([[0.75, 0.5], [0.75, 0.5]]), "logodds", np.array([[2.0], [4.0]]))
    assert w[0] == pytest.approx([np.log(3), 0.0], abs=1e-5)  # two options: a coin flip weighs nothing
    assert w[1] == pytest.approx([np.log(9), np.log(3)], abs=1e-5)  # four: log(3 p / (1 - p))
    from router.combine import extract_number

    vectors = key_embedding(extract_number)(["7", "no number", "x = 7.0", "8"])
    assert vectors.tolist() == [[1, 0], [0, 0], [1, 0], [0, 1]]


# ---------------------------------------------------------------- a hand-built RouterBench folder

MODELS = {"lab/model-a": 0.004, "lab/model-b": 0.001, "lab/model-c": 0.002}  # USD per call


def _wrong(model: str, i: int) -> bool:
    """a is wrong on 1 query in 6, b and c on 2 in 6 each, never two on the same query."""
    return {"lab/model-a": i % 6 == 0, "lab/model-b": i % 6 in (1, 2), "lab/model-c": i % 6 in (3, 4)}[model]


def _write(folder: Path, task: str, split: str, n: int, letters: str, start: int) -> None:
    header = ["", "sample_id", "prompt", "eval_name", *MODELS, *(f"{m}|model_response" for m in MODELS),
              *(f"{m}|total_cost" for m in MODELS), "oracle_model_to_route_to"]
    with (folder / f"{task}_{split}.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, header)
        writer.writeheader()
        for i in range(n):
            gold = letters[i % len(letters)]
            row = {"": start + i, "sample_id": f"{task}.{split}.{i}", "eval_name": task,
                   "prompt": repr([f"Question {task} {split} {i}: pick one of {', '.join(letters)}."]),
                   "oracle_model_to_route_to": "lab/model-b"}
            for k, (m, cost) in enumerate(MODELS.items()):
                wrong = _wrong(m, i)
                answer = letters[(letters.index(gold) + 1 + k) % len(letters)] if wrong else gold
                row |= {m: "0.0" if wrong else "1.0", f"{m}|model_response": repr([answer]),
                        f"{m}|total_cost": str(cost)}
            if split == "test" and task == "winograde" and i == 5:  # c failed here: no grade, no cost
                row |= {"lab/model-c": "", "lab/model-c|model_response": "", "lab/model-c|total_cost": ""}
            writer.writerow(row)


@pytest.fixture
def bench(tmp_path: Path) -> Path:
    folder = tmp_path / "routerdc" / "routerbench_zs"
    folder.mkdir(parents=True)
    for t, (task, letters) in enumerate((("arc_challenge", "ABCD"), ("winograde", "AB"))):
        _write(folder, task, "train", 120, letters, start=1000 * t)
        _write(folder, task, "test", 6, letters, start=1000 * t + 500)
    return tmp_path


def test_hand_built_folder(bench: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    results = run_suite("routerbench-combine", bench, out, encoder=FakeHashingEncoder(), progress=False,
                        cache_dir=tmp_path / "cache", plots=False)
    m = results["metrics"]
    # Test: 6 queries per task, a wrong on i = 0 of each: the best single (a, best on train) is right on
    # 10 of 12 at $0.004 a call.
    assert results["setup"]["test"] == 12 and results["setup"]["best_single"] == "lab/model-a"
    assert m["best_single_accuracy"] == pytest.approx(10 / 12) and m["best_single_cost"] == pytest.approx(0.004)
    # At most one expert is wrong per query and a wrong answer stands alone: any three-member vote is right.
    # The tuning split sees that (a single pick misses a's wrong queries), so the panel is all three; each
    # query pays 0.004 + 0.001 + 0.002 (c's missing cost is its train mean, 0.002).
    assert m["k"] == 3
    for name in ("vote", "consensus", "fixed_top3_vote"):
        assert m[f"{name}_accuracy"] == 1.0
        assert m[f"{name}_cost"] == pytest.approx(0.007) and m[f"{name}_total_cost"] == pytest.approx(0.084)
    # Oracle: the cheapest right expert per i % 6 = 0..5 is b, c, c, b, b, b: $0.008 per six queries.
    assert m["oracle_accuracy"] == 1.0 and m["oracle_cost"] == pytest.approx(0.008 / 6)
    assert m["oracle_total_cost"] == pytest.approx(0.016)
    assert 0.5 <= m["top1_accuracy"] <= 1.0 and 0.001 <= m["top1_cost"] <= 0.004 + 1e-12
    assert m["vote_minus_best_single"] == pytest.approx(2 / 12)
    # Learned weights see the same: no expert outweighs the other two, so a full panel is right everywhere.
    # Every response is "['X']", one length, so the length term learns nothing.
    for name in ("learned_vote", "learned_length_vote"):
        assert m[f"{name}_accuracy"] == 1.0 and results["setup"]["chosen_learned"][name]["k"] == 3
    # The answer bias's penalty, or none, is tuned on top of each learned vote's L2, as in mmlu-pro-combine.
    biases = {(g["strategy"], g["answer_bias_l2"]) for g in results["learned_tuning_grid"]}
    assert biases == {(n, b) for n in ("learned_vote", "learned_length_vote") for b in (None, 30.0, 100.0, 300.0)}
    assert all(results["setup"]["chosen_learned"][n]["answer_bias_l2"] in (None, 30.0, 100.0, 300.0)
               for n in ("learned_vote", "learned_length_vote"))
    assert results["setup"]["length_coef"] == pytest.approx(0.0, abs=1e-9)
    assert results["tasks"]["winograde"]["queries"] == 6 and results["tasks"]["winograde"]["answers"] == "choice"
    assert not list(out.glob("*.png")) and "figures" not in results  # plots=False, as --no-plots gives


def test_real_run_matches_the_routerbench_gate(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "combine"
    results = run_suite("routerbench-combine", data_dir, out, encoder=FakeHashingEncoder(), limit=60, progress=False,
                        cache_dir=tmp_path / "cache")
    m = results["metrics"]
    strategies = ("best_single", "top1", "vote", "consensus", "learned_vote", "learned_length_vote",
                  "fixed_top3_vote")
    assert set(m) >= {"oracle_accuracy", "oracle_cost", "k", *(f"{s}_{x}" for s in strategies
                                                              for x in ("accuracy", "cost", "total_cost"))}
    assert results["setup"]["test"] == 60 and results["setup"]["experts"] == 11
    for s in strategies:
        assert 0.0 <= m[f"{s}_accuracy"] <= m["oracle_accuracy"] <= 1.0
        assert m[f"{s}_total_cost"] == pytest.approx(60 * m[f"{s}_cost"]) and m[f"{s}_cost"] > 0
    assert m["oracle_cost"] <= m["best_single_cost"]
    assert set(results["tasks"]) == {"arc_challenge", "mbpp", "winograde"}
    assert results["tasks"]["mbpp"]["answers"] == "text (no extractor)"
    for task in ("arc_challenge", "winograde"):  # consensus over letters is the vote
        assert results["tasks"][task]["consensus"] == results["tasks"][task]["vote"]
    ci = results["confidence_intervals"]["vote_accuracy"]
    assert ci["low"] <= m["vote_accuracy"] <= ci["high"]
    assert any(note.startswith("learned votes: weights fitted as moe train fits them") for note in results["notes"])
    # top-1 is the routerbench suite's gate: same split, same tuning, same picks.
    gate = run_suite("routerbench", data_dir, tmp_path / "gate", encoder=FakeHashingEncoder(), limit=60,
                     progress=False, cache_dir=tmp_path / "cache", plots=False)
    assert m["top1_accuracy"] == pytest.approx(gate["metrics"]["routed_accuracy"])
    assert m["top1_cost"] == pytest.approx(gate["metrics"]["routed_cost"])
    assert m["best_single_accuracy"] == pytest.approx(gate["metrics"]["best_single_accuracy"])
    assert all(results["setup"][k] == gate["setup"][k] for k in ("train", "val", "test"))
    # The ARC reference: every pair of the ten models other than GPT-4, escalating to it when they disagree.
    pair = gate["arc_challenge"]["pair_escalate"]
    assert pair["pairs"] == 45 and pair["budget_share"] == 0.3
    assert gate["metrics"]["arc_pair_escalate_accuracy_within_30pct"] == pair["within_budget"]["accuracy"]
    hindsight = pair["best_on_test"]
    assert hindsight["accuracy"] is None or hindsight["cost_share"] <= 0.3
    assert any(note.startswith("ARC reference, fixed pairs") for note in gate["notes"])
    assert results["figures"] == ["accuracy.png", "accuracy_cost.png"]
    for name in results["figures"]:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 10_000
    saved = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert saved["metrics"] == pytest.approx(m) and "fuse" in (out / "report.md").read_text(encoding="utf-8")
