"""An installed package extends the router through entry points (``experts.plugins``): an expert type, a combiner
strategy and an encoder backend, named in a config and found by the ``moe`` command with no import by the user's
code. The package is a test double (``tests.doubles.plugin_package``), installed into a folder on the path."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import experts
from experts.errors import ExpertConfigError
from experts.plugins import PluginError, installed
from experts.registry import expert_class
from router.combine import build_combiner
from router.config import ConfigError, parse_config
from router.expert_types import EXPERT_TYPES
from tests.doubles.plugin_package import write_plugin_package

ROOT = Path(__file__).resolve().parents[2]
CONFIG = """version: 1
gate:
  encoder: {backend: hash}
  artifact: gate
  top_k: {policy: fixed, k: 2}
combiner: {strategy: longest}
experts:
  - name: maths
    type: echo
    model: maths-bot-whose-model-name-is-the-longest
    examples: ["what is 2 plus 2", "integrate x squared", "solve the equation for x"]
  - name: poet
    type: echo
    model: poet-bot
    examples: ["write a poem about the sea", "a haiku about autumn", "a sonnet on love"]
"""


@pytest.fixture
def plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The package on this process's path, the entry points read afresh."""
    folder = write_plugin_package(tmp_path / "site")
    monkeypatch.syspath_prepend(str(folder))
    installed.cache_clear()
    yield folder
    installed.cache_clear()
    sys.modules.pop("moe_plugin_double", None)


def moe(*args: str, cwd: Path, site: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(site)])}
    return subprocess.run([sys.executable, "-m", "router.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_moe_command_trains_and_answers_with_an_installed_package_s_extensions(tmp_path: Path) -> None:
    site = write_plugin_package(tmp_path / "site")
    (tmp_path / "router.yaml").write_text(CONFIG)
    checked = moe("config", "check", "router.yaml", cwd=tmp_path, site=site)
    assert checked.returncode == 0, checked.stderr
    trained = moe("train", "--config", "router.yaml", cwd=tmp_path, site=site)
    assert trained.returncode == 0, trained.stderr
    asked = moe("ask", "--config", "router.yaml", "write a poem about the autumn sea", cwd=tmp_path, site=site)
    assert asked.returncode == 0, asked.stderr
    # The gate (on the hash encoder) put the poet first; the longest answer, the maths bot's, stands.
    assert asked.stdout.startswith("maths-bot-whose-model-name-is-the-longest: write a poem about the autumn sea\n")
    without = subprocess.run([sys.executable, "-m", "router.cli", "config", "check", "router.yaml"], cwd=tmp_path,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert without.returncode == 2
    assert "experts[0] (maths).type: unknown expert type 'echo'; known: openai, replay, router, vllm" in without.stderr
    assert "gate.encoder.backend: unknown encoder backend 'hash'" in without.stderr
    assert "combiner.strategy: unknown combiner strategy 'longest'" in without.stderr


@pytest.mark.usefixtures("plugins")
def test_an_entry_point_that_cannot_be_loaded_is_named_with_its_cause() -> None:
    with pytest.raises(ExpertConfigError, match=r"entry point 'broken' of group 'moe_router.experts' "
                                                r"\(moe_plugin_double.missing:Thing\) cannot be loaded: "
                                                r"ModuleNotFoundError"):
        expert_class("broken", EXPERT_TYPES)
    with pytest.raises(ExpertConfigError, match=r"entry point 'misfiled' .* is not a subclass of experts.base.Expert"):
        expert_class("misfiled", EXPERT_TYPES)
    assert expert_class("echo", EXPERT_TYPES).__name__ == "EchoExpert"
    assert build_combiner("longest").name == "longest"


@pytest.mark.usefixtures("plugins")
def test_a_config_naming_a_combiner_or_encoder_that_cannot_be_loaded_is_refused_by_its_key() -> None:
    """moe config check said OK, and serve (or train) failed on the entry point's import."""
    raw = {"version": 1, "experts": [{"name": "a", "type": "echo", "model": "m"}],
           "combiner": {"strategy": "gone"}, "gate": {"encoder": {"backend": "gone"}}}
    with pytest.raises(ConfigError) as info:
        parse_config(raw, check_env=False)
    found = dict(info.value.problems)
    assert found["combiner.strategy"].startswith("combiner strategy 'gone': entry point 'gone' of group "
                                                 "'moe_router.combiners' (moe_plugin_double.missing:Combiner) cannot "
                                                 "be loaded: ModuleNotFoundError")
    assert found["gate.encoder.backend"].startswith("encoder backend 'gone': entry point 'gone' of group "
                                                    "'moe_router.encoders'")


async def test_a_request_naming_a_combiner_that_cannot_be_loaded_is_a_bad_request(plugins: Path) -> None:
    """The x-moe-combiner header naming it answered 500 (an ImportError), with a traceback logged each time."""
    import httpx

    from router.orchestrator import Orchestrator
    from router.service import create_app
    from tests.doubles.fakes import FakeExpert, FakeGate, fake_config

    config = fake_config(["a", "b"])
    app = create_app(Orchestrator(config, FakeGate(["a", "b"], {}, default=[0.6, 0.4]),
                                  {n: FakeExpert(config.expert(n)) for n in ["a", "b"]}))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as http:
        body = {"messages": [{"role": "user", "content": "hi"}]}
        refused = await http.post("/v1/chat/completions", json=body, headers={"x-moe-combiner": "gone"})
        taken = await http.post("/v1/chat/completions", json=body, headers={"x-moe-combiner": "longest"})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_combiner"
    assert "moe_plugin_double.missing:Combiner" in refused.json()["error"]["message"]
    assert taken.status_code == 200


@pytest.mark.usefixtures("plugins")
def test_an_unknown_type_is_refused_with_the_installed_ones_listed() -> None:
    raw = {"version": 1, "experts": [{"name": "a", "type": "echoo", "model": "m"}]}
    with pytest.raises(ConfigError, match=r"unknown expert type 'echoo'; known: broken, echo, misfiled, openai, "
                                          r"replay, router, vllm"):
        parse_config(raw, check_env=False)


def test_a_load_of_a_bad_plugin_names_the_group_and_target(plugins: Path) -> None:
    from experts.plugins import load

    with pytest.raises(PluginError, match=r"entry point 'misfiled' of group 'moe_router.experts' "
                                          r"\(moe_plugin_double:Misfiled\) is not a subclass"):
        load("moe_router.experts", "misfiled", experts.Expert)


def test_the_router_s_types_are_a_view_of_the_experts_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """A type added to ``experts.EXPERT_TYPES`` after ``router.expert_types`` was imported is a type the config
    takes (the router's table was a copy made at import, and missed it)."""
    monkeypatch.setitem(experts.EXPERT_TYPES, "later", "experts.replay:ReplayExpert")
    assert EXPERT_TYPES["later"] == "experts.replay:ReplayExpert"
    raw = {"version": 1, "experts": [{"name": "a", "type": "later", "model": "m", "endpoint": "http://h:1/v1"}]}
    assert parse_config(raw, check_env=False).experts[0].type == "later"
