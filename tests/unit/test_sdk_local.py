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
from router.sdk import LocalRouter
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
