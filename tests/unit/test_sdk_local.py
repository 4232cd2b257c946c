"""router.sdk.LocalRouter, built from a config file, calling real OpenAI-compatible endpoints over HTTP
(ScriptedOpenAIServer, a test double on 127.0.0.1) with the real ONNX gate."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from router.config import load_config
from router.sdk import LocalRouter, RouterAPIError
from router.train import train_from_config
from tests.doubles import ScriptedOpenAIServer

EXAMPLES = {
    "maths": ["integrate x squared", "solve 2x + 3 = 7", "what is the derivative of sin x"],
    "cooking": ["how long to boil an egg", "a recipe for pancakes", "how do I roast vegetables"],
}


@pytest.fixture
def config(tmp_path: Path) -> Iterator[Path]:
    with ScriptedOpenAIServer(name="maths") as maths, ScriptedOpenAIServer(name="cooking") as cooking:
        urls = {"maths": maths.url, "cooking": cooking.url}
        path = tmp_path / "router.yaml"
        path.write_text(yaml.safe_dump({
            "version": 1,
            "gate": {"artifact": str(tmp_path / "gate"), "encoder": {"backend": "onnx"}},
            "experts": [{"name": name, "type": "vllm", "endpoint": urls[name], "model": "m", "examples": examples}
                        for name, examples in EXAMPLES.items()],
        }))
        train_from_config(load_config(path), progress=False)
        yield path


# A loop closed under open connections leaves their sockets to the garbage collector, which warns.
@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_local_router_serves_one_asyncio_run_per_call(config: Path) -> None:
    local = LocalRouter.from_config(config)
    answers = [asyncio.run(local.chat(q)) for q in ("the derivative of x cubed", "how to cook rice", "solve x^2 = 4")]
    decision = asyncio.run(local.route("pancakes for breakfast"))
    asyncio.run(local.aclose())
    gc.collect()
    assert [(a.expert, a.content) for a in answers] == [
        ("maths", "answer from maths"), ("cooking", "answer from cooking"), ("maths", "answer from maths")]
    assert max(decision.scores, key=decision.scores.__getitem__) == "cooking"


@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_two_threads_driving_one_local_router_at_once_never_hang_it(config: Path) -> None:
    """Each thread's ``asyncio.run`` answers, or gets the documented RuntimeError for two loops at once; none
    hangs, and the router serves the next call. (The gate's batcher once mixed both loops' queries in one
    batch, and a loop that had closed left it busy for good.)"""
    import threading

    local = LocalRouter.from_config(config)
    outcomes: dict[str, str] = {}

    def call(query: str) -> None:
        try:
            answer = asyncio.run(asyncio.wait_for(local.chat(query), timeout=30))
            outcomes[query] = answer.expert
        except RuntimeError as exc:
            outcomes[query] = f"refused: {exc}"

    for _ in range(3):
        threads = [threading.Thread(target=call, args=(q,)) for q in ("solve x + 1 = 2", "boil an egg")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "a call hung"
        assert set(outcomes) == {"solve x + 1 = 2", "boil an egg"}
        assert all(v in ("maths", "cooking") or "loop" in v for v in outcomes.values()), outcomes
        outcomes.clear()
    answer = asyncio.run(asyncio.wait_for(local.chat("how do I roast vegetables"), timeout=30))
    assert answer.expert == "cooking"
    asyncio.run(local.aclose())
    gc.collect()


@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_moe_ask_streams_in_process_too(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``moe ask --stream --config``: the pieces as they come and the expert that answered, as with ``--url``
    (it once printed the whole answer at the end, not streaming)."""
    from router.cli import main

    assert main(["ask", "how to cook rice", "--config", str(config), "--stream"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("answer from cooking")
    assert "[expert: cooking, switches: []]" in out


@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_lone_surrogate_in_the_query_is_refused_as_the_service_refuses_it_and_the_gate_reads_it(
        config: Path) -> None:
    """``"\\ud83d"`` (a JSON escape cut in half, or a byte of argv that is not UTF-8) once crashed the encoder with a
    TypeError; the gate reads it as U+FFFD, the replacement character. A request cannot carry it as JSON, so
    ``LocalRouter`` refuses it before the gate, with the service's 400 (``moe route`` sends argv's as U+FFFD)."""
    local = LocalRouter.from_config(config)
    half, replaced = (local.orchestrator.decide_sync(f"pancakes {c} for breakfast") for c in ("\ud83d", "\ufffd"))
    with pytest.raises(RouterAPIError) as refused:
        asyncio.run(local.route("pancakes \ud83d for breakfast"))
    asyncio.run(local.aclose())
    gc.collect()
    assert half.scores == pytest.approx(replaced.scores) and max(half.scores, key=half.scores.__getitem__) == "cooking"
    assert (refused.value.status, refused.value.code) == (400, "invalid_json")
