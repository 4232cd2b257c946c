"""Explanations at the API: ``/v1/route`` and a chat completion's trace carry every expert's score and the training
examples nearest to the query, from a real gate trained on real SNIPS queries through ``moe train``'s path.

The experts are ``ScriptedOpenAIServer`` test doubles on loopback, one per intent, so a chat completion runs
the whole service: gate, dispatch over HTTP, combiner and trace."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from eval.datasets import load_snips
from router.build import build_orchestrator
from router.config import parse_config
from router.service import create_app
from router.train import train_from_config
from tests.doubles import ScriptedOpenAIServer

INTENTS = ["BookRestaurant", "GetWeather", "PlayMusic"]
PER_INTENT = 40


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, ScriptedOpenAIServer]]:
    """One scripted expert server per intent; each answers "answer from <intent>"."""
    with ExitStack() as stack:
        yield {name: stack.enter_context(ScriptedOpenAIServer(name=name)) for name in INTENTS}


@pytest.fixture(scope="module")
def training(data_dir: Path) -> dict[str, str]:
    """The training queries (text -> intent): the first ``PER_INTENT`` SNIPS training queries of each intent."""
    train = load_snips(data_dir, "train")
    return {q.text: q.label for intent in INTENTS for q in [q for q in train if q.label == intent][:PER_INTENT]}


@pytest.fixture(scope="module")
def config_path(tmp_path_factory: pytest.TempPathFactory, training: dict[str, str],
                servers: dict[str, ScriptedOpenAIServer]) -> Path:
    """A config over the scripted experts, with its gate trained (``moe train``) and saved."""
    folder = tmp_path_factory.mktemp("explain")
    (folder / "train.jsonl").write_text("".join(json.dumps({"query": t, "label": lab}) + "\n"
                                                for t, lab in training.items()), encoding="utf-8")
    experts = [{"name": n, "type": "vllm", "endpoint": servers[n].url, "model": n, "timeout_s": 10.0}
               for n in INTENTS]
    raw = {"version": 1, "experts": experts,
           "gate": {"artifact": "gate", "train_data": ["train.jsonl"], "top_k": {"policy": "fixed", "k": 1}}}
    (folder / "router.yaml").write_text(json.dumps(raw), encoding="utf-8")
    train_from_config(parse_config(raw, base_dir=folder, check_env=False), progress=False)
    return folder / "router.yaml"


@pytest.fixture
async def http(config_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    raw = json.loads(config_path.read_text(encoding="utf-8"))
    orchestrator = build_orchestrator(parse_config(raw, base_dir=config_path.parent, check_env=False))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(orchestrator)),
                                 base_url="http://router") as client:
        yield client
    await orchestrator.aclose()


@pytest.fixture(scope="module")
def held_out(data_dir: Path, training: dict[str, str]) -> list[tuple[str, str]]:
    """Two SNIPS test queries of each intent (never trained on), as (text, intent)."""
    test = [q for q in load_snips(data_dir, "test") if q.label in INTENTS and q.text not in training]
    return [(q.text, q.label) for intent in INTENTS for q in [q for q in test if q.label == intent][:2]]


def assert_same_decision(got: dict[str, Any], want: dict[str, Any]) -> None:
    """The same routing decision: the same panel and explanation, scores equal up to float noise (the time the
    gate took aside)."""
    plain = ("ranking", "chosen", "policy", "abstained", "stage")
    assert {k: got[k] for k in plain} == {k: want[k] for k in plain}
    assert got["scores"] == pytest.approx(want["scores"]) and got["ood_score"] == pytest.approx(want["ood_score"])
    assert [(n["text"], n["label"]) for n in got["nearest"]] == [(n["text"], n["label"]) for n in want["nearest"]]
    assert [n["similarity"] for n in got["nearest"]] == pytest.approx([n["similarity"] for n in want["nearest"]])


async def test_route_explains_with_every_score_and_the_nearest_training_examples(
        http: httpx.AsyncClient, training: dict[str, str], held_out: list[tuple[str, str]]) -> None:
    for text, intent in held_out:
        r = await http.post("/v1/route", json={"query": text})
        assert r.status_code == 200, r.text
        d = r.json()
        assert set(d["scores"]) == set(INTENTS)
        assert sum(d["scores"].values()) == pytest.approx(1.0)
        assert d["ranking"] == sorted(INTENTS, key=lambda n: -d["scores"][n])
        assert [c["expert"] for c in d["chosen"]] == [d["ranking"][0]] == [intent], text
        assert not d["abstained"] and d["ood_score"] is not None
        near = d["nearest"]
        assert len(near) == 3
        for n in near:
            # Each explanation is a training example, under the label it was trained with.
            assert n["text"] in training and n["label"] == training[n["text"]], n
            assert -1.0 <= n["similarity"] < 0.999  # a held-out query: never the example itself
        assert [n["similarity"] for n in near] == sorted((n["similarity"] for n in near), reverse=True)
        assert near[0]["label"] == intent, (text, near)


async def test_a_chat_completion_carries_the_same_decision_in_its_trace(
        http: httpx.AsyncClient, servers: dict[str, ScriptedOpenAIServer],
        held_out: list[tuple[str, str]]) -> None:
    text, intent = held_out[2]  # a GetWeather query
    route = (await http.post("/v1/route", json={"query": text})).json()
    served = len(servers[intent].requests)
    r = await http.post("/v1/chat/completions",
                        json={"model": "auto", "messages": [{"role": "user", "content": text}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model"], body["choices"][0]["message"]["content"]) == (intent, f"answer from {intent}")
    assert len(servers[intent].requests) == served + 1
    assert route["nearest"] and set(route) <= set(body["moe"]["decision"])
    assert_same_decision(body["moe"]["decision"], route)
    assert [a["expert"] for a in body["moe"]["attempts"]] == [intent]
    # A stream's final chunk carries the same trace.
    async with http.stream("POST", "/v1/chat/completions", json={
            "model": "auto", "stream": True, "messages": [{"role": "user", "content": text}]}) as s:
        lines = [line async for line in s.aiter_lines() if line.startswith("data: ")]
    final = json.loads(lines[-2][len("data: "):])
    assert_same_decision(final["moe"]["decision"], route)
