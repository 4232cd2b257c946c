"""Learned vote weights end to end, on MMLU-Pro's 31 recorded LLMs, through the serving path.

1. ``moe convert mmlu-pro-outcome`` writes the train and test splits as outcome records (each LLM's recorded
   correctness, and its recorded letter as its answer).
2. A config puts the 31 LLMs behind the router as replay experts, with an outcome gate choosing a top-5 panel
   and ``combiner: {strategy: vote, vote_weights: learned, vote_answer_bias: true}`` (the answer bias, which
   ``moe eval --suite mmlu-pro-combine``'s cross-validation chose on these recordings).
3. ``moe train`` trains the gate and the vote weights (with each model's answer biases) on the train split,
   choosing both L2 penalties by 5-fold cross-validation over its records (``vote_l2: cv`` and
   ``vote_answer_bias_l2: cv``, the defaults).
4. Every test question goes through the orchestrator (``LocalRouter``): the panel votes with the learned
   weights; the same question with ``top1`` shows routing alone; gpt-4o, the best single LLM, is the reference.

Run from the repository root, with ``../shared/data`` beside it (about 8 minutes on 2 cores, most of it
embedding the training questions)::

    .venv/bin/python examples/learned_vote_mmlu_pro.py --out out/learned-vote

It writes ``results.json`` into ``--out`` and prints the accuracies.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path

import yaml

from eval.convert import convert
from experts.recordings import load_mmlu_pro, mmlu_pro_prompt
from experts.types import ChatMessage, ChatRequest
from router.combine import extract_choice
from router.config import load_config
from router.sdk import LocalRouter
from router.train import train_from_config

BEST_SINGLE = "gpt-4o-2024-05-13@ff991b5"


def write_config(out: Path, data: Path, models: list[str]) -> Path:
    experts = [{"name": m, "type": "replay", "model": m, "replay": {"source": "mmlu_pro", "path": str(data)}}
               for m in models]
    config = {"version": 1,
              "gate": {"artifact": "gate", "train_data": ["train.jsonl"], "top_k": {"policy": "fixed", "k": 5}},
              "combiner": {"strategy": "vote", "extractor": "choice", "vote_weights": "learned",
                           "vote_answer_bias": True},
              # max_attempts counts the panel: five members, and one more expert if one of them fails.
              "fallback": {"max_attempts": 6}, "feedback": {"enabled": False}, "experts": experts}
    path = out / "router.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


async def score(config: Path, test: list[dict], gold: dict[str, str], concurrency: int = 8) -> dict[str, float]:
    right = {"learned vote (top-5 panel)": 0, "top-1 routing": 0, f"best single ({BEST_SINGLE})": 0}
    async with LocalRouter.from_config(config) as router:
        limit = asyncio.Semaphore(concurrency)

        async def one(record: dict) -> None:
            query = record["query"]
            request = ChatRequest(model="auto", messages=[ChatMessage(role="user", content=query)])
            async with limit:
                voted = await router.orchestrator.complete(request)
                routed = await router.orchestrator.complete(request, strategy="top1")
            right["learned vote (top-5 panel)"] += extract_choice(voted.content) == gold[query]
            right["top-1 routing"] += extract_choice(routed.content) == gold[query]
            right[f"best single ({BEST_SINGLE})"] += record["outcomes"].get(BEST_SINGLE) == 1.0

        await asyncio.gather(*(one(r) for r in test))
    return {name: count / len(test) for name, count in right.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/learned-vote"))
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("MOE_DATA_DIR", "../shared/data")))
    args = parser.parse_args()
    out, data = args.out.resolve(), (args.data / "mmlu_pro_outcomes").resolve()
    out.mkdir(parents=True, exist_ok=True)
    store = load_mmlu_pro(data)
    n_train = convert("mmlu-pro-outcome", args.data, "train", out / "train.jsonl")
    n_test = convert("mmlu-pro-outcome", args.data, "test", out / "test.jsonl", answers=False)
    print(f"converted {n_train} train and {n_test} test questions", flush=True)
    config = write_config(out, data, list(store.models))
    train_from_config(load_config(config), progress=True, feedback=False)
    test = [json.loads(line) for line in (out / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    gold = {mmlu_pro_prompt(q): q.answer for q in store.questions}
    accuracy = asyncio.run(score(config, test, gold))
    (out / "results.json").write_text(json.dumps({"test_questions": len(test), "accuracy": accuracy}, indent=1),
                                      encoding="utf-8")
    for name, value in accuracy.items():
        print(f"{name:45s} {value:.4f}")


if __name__ == "__main__":
    main()
