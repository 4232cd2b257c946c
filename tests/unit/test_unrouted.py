"""``routed: false``: an expert the gate never routes to (a dedicated ``escalate_to`` or ``aggregator``, or one
clients call by name) needs no examples or training data, is trained and scored without, and is still called by
the combiner and by name. Before, such an expert had to be given examples, and then took routed traffic."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest

from experts.types import ChatMessage, ChatRequest
from router.build import load_gate
from router.config import ConfigError, RouterConfig, parse_config
from router.orchestrator import Orchestrator
from router.service import create_app
from router.train import train_from_config
from tests.doubles.fakes import FakeExpert
from tests.support import snips_first

INTENTS = ["GetWeather", "PlayMusic", "BookRestaurant"]
QUERIES = ["what's the weather in Paris tomorrow", "play the new album by Adele", "book a table for two tonight"]


def expert(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "type": "openai", "endpoint": "http://127.0.0.1:9/v1", "model": name, **fields}


def config_of(tmp_path: Path, **overrides: Any) -> RouterConfig:
    raw = {"version": 1, "experts": [*(expert(n) for n in INTENTS), expert("judge", routed=False)],
           "gate": {"train_data": ["data.jsonl"], "artifact": "gate", "top_k": {"policy": "fixed", "k": 2}},
           "combiner": {"strategy": "escalate", "extractor": "choice", "escalate_to": "judge"}, **overrides}
    return parse_config(raw, base_dir=tmp_path, check_env=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> tuple[Path, list[str]]:
    """A gate trained from 20 SNIPS queries per intent and 5 lines labelled for the unrouted judge; the warnings
    training logged."""
    folder = tmp_path_factory.mktemp("unrouted")
    rows = [{"query": text, "label": label} for text, label in snips_first(data_dir, 20, 0)["train"]
            if label in INTENTS]
    rows += [{"query": f"do these answers agree, case {i}?", "label": "judge"} for i in range(5)]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    logged: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("router.train").addHandler(handler)
    try:
        train_from_config(config_of(folder), progress=False, feedback=False)
    finally:
        logging.getLogger("router.train").removeHandler(handler)
    return folder, logged


def test_the_gate_trains_and_loads_without_the_unrouted_expert(trained: tuple[Path, list[str]]) -> None:
    folder, logged = trained
    config = config_of(folder)
    gate = load_gate(config)  # no examples and no training data for judge: no mismatch
    assert list(gate.experts) == INTENTS
    assert json.loads((folder / "gate" / "gate.json").read_text(encoding="utf-8"))["experts"] == INTENTS
    assert any("the gate does not route to 'judge' (routed: false), so it trains without the 5 labelled "
               "example(s) naming it" in m
               for m in logged), logged


async def test_the_combiner_and_clients_still_call_it_and_the_gate_never_does(
        trained: tuple[Path, list[str]]) -> None:
    folder, _ = trained
    config = config_of(folder)
    texts = {"GetWeather": "The answer is (A).", "PlayMusic": "The answer is (B).",
             "BookRestaurant": "The answer is (C).", "judge": "The answer is (B)."}
    experts = {n: FakeExpert(config.expert(n), texts[n]) for n in config.expert_names}
    orch = Orchestrator(config, load_gate(config), experts)
    try:
        for query in QUERIES:
            answer = await orch.complete(ChatRequest(messages=[ChatMessage(role="user", content=query)]))
            assert "judge" not in answer.trace.decision.scores
            assert [w.expert for w in answer.trace.decision.chosen] != [] and \
                "judge" not in [w.expert for w in answer.trace.decision.chosen]
            # the panel of two disagrees, so the judge is asked, as escalate_to
            assert (answer.expert, answer.trace.attempts[-1].role) == ("judge", "escalate")
        named = await orch.complete(ChatRequest(model="judge", messages=[ChatMessage(role="user", content="hi")]))
        assert named.expert == "judge"
        app = create_app(orch)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r") as http:
            listed = (await http.get("/v1/experts")).json()["data"]
            routed = (await http.post("/v1/route", json={"query": QUERIES[0]})).json()
        assert {e["name"]: e["routed"] for e in listed} == {**dict.fromkeys(INTENTS, True), "judge": False}
        assert set(routed["scores"]) == set(INTENTS)
    finally:
        await orch.aclose()


def test_a_config_routing_to_no_expert_or_too_few_for_its_panel_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as none:
        parse_config({"version": 1, "experts": [expert("a", routed=False), expert("b", routed=False)]},
                     check_env=False)
    assert dict(none.value.problems)["experts"].startswith("every expert has routed: false")
    for spelled in ("false", "no", 0):  # as pydantic reads them, and as a ${VAR} gives them: the same message
        with pytest.raises(ConfigError) as strings:
            parse_config({"version": 1, "experts": [expert("a", routed=spelled), expert("b", routed=False)]},
                         check_env=False)
        assert dict(strings.value.problems)["experts"].startswith("every expert has routed: false"), spelled
    with pytest.raises(ConfigError) as small:
        config_of(tmp_path, gate={"top_k": {"policy": "fixed", "k": 4}})
    assert dict(small.value.problems)["gate.top_k.k"] == (
        "4 is more than the 3 routed expert(s) defined (routed: false ones are never on a panel): a fixed panel "
        "of 4 can never be filled; lower k to at most 3")
