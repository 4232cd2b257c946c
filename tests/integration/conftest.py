"""Fixtures for the integration tier: a tiny model built once, and real vLLM servers serving it.

Everything under tests/integration is marked ``integration``. A missing vLLM venv FAILS the tier rather than
skipping it: a skipped tier would read as a passing one.

Fixtures:
    tiny_model_dir       session   Path of the tiny random Llama (tokenizer + weights)
    vllm_experts         session   {served name: VLLMServer} for SESSION_SERVERS, started concurrently
    vllm_server_factory  function  start(spec: ServerSpec) -> VLLMServer, ready; stopped after the test
    vllm_tools_expert    session   the session server that can call tools (TOOL_ARGS, TOOL_ENV): tiny-b
    moe_serve            session   serve(config) -> context manager: `moe serve` as a process, its base URL
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from tests.integration.tiny_model import build_tiny_llama
from tests.integration.vllm_server import (
    ServerSpec,
    VLLMServer,
    VLLMServerError,
    start_all,
    vllm_python,
)
from tests.support import moe_serve

# Tool calling, read by vLLM's hermes parser from the tiny template's <tool_call> turns. Random weights never
# call a tool on their own, so tests force one with tool_choice "required" or a named function, which vLLM
# turns into guided decoding (xgrammar, on this CPU build too). Two settings keep a random model's forced
# JSON finite:
# - VLLM_ENFORCE_STRICT_TOOL_CALLING=0 takes vLLM's JSON-schema path ([{"name", "parameters"}]) instead of
#   xgrammar's hermes structural tag. The tag's JSON allows any run of whitespace (vLLM sets no
#   max_whitespace_cnt), and greedy decoding of random weights wrote tabs inside "arguments" until max_tokens.
# - disable_any_whitespace: compact JSON only; vLLM allows it only with an explicit xgrammar or guidance backend.
# Requests without tools are served exactly as without these settings.
TOOL_ARGS = ("--enable-auto-tool-choice", "--tool-call-parser", "hermes",
             "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}')
TOOL_ENV = {"VLLM_ENFORCE_STRICT_TOOL_CALLING": "0"}
TOOLS_SERVER = "tiny-b"

# The servers every test may share. Two experts are what routing needs; one of them can call tools.
SESSION_SERVERS = (ServerSpec("tiny-a"), ServerSpec(TOOLS_SERVER, extra_args=TOOL_ARGS, env=TOOL_ENV))
# How long `moe serve` may take to answer /health: it loads the encoder and the gate first.
ROUTER_READY_TIMEOUT_S = 120.0

_HERE = Path(__file__).resolve().parent
_started: list[VLLMServer] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    # Start time and memory of each server, so a slow or bloated CI run shows where the time went.
    for server in _started:
        start = f"{server.start_seconds:.1f} s" if server.start_seconds is not None else "not ready"
        terminalreporter.write_line(f"vLLM {server.name}: start {start}, peak-seen rss {server.peak_rss_gib:.2f} GiB")


def _start_or_fail(model_dir: Path, specs: tuple[ServerSpec, ...], work_dir: Path) -> list[VLLMServer]:
    try:
        return start_all(model_dir, specs, work_dir)
    except VLLMServerError as exc:
        problem = str(exc)
    pytest.fail(problem, pytrace=False)  # outside the except: the log tail is the whole story


@pytest.fixture(scope="session")
def vllm_venv_python() -> Path:
    """The vLLM venv's interpreter; fails (never skips) the test when the venv is missing."""
    try:
        return vllm_python()
    except VLLMServerError as exc:
        problem = str(exc)
    pytest.fail(problem, pytrace=False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def vllm_experts(vllm_venv_python: Path, tiny_model_dir: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, VLLMServer]]:
    # vllm_venv_python comes first so a missing venv fails before the model is built.
    servers = _start_or_fail(tiny_model_dir, SESSION_SERVERS, tmp_path_factory.mktemp("vllm"))
    _started.extend(servers)
    try:
        yield {s.name: s for s in servers}
    finally:
        for server in servers:
            server.measure_rss()
            server.stop()


@pytest.fixture
def vllm_server_factory(vllm_venv_python: Path, tiny_model_dir: Path,
                        tmp_path: Path) -> Iterator[Callable[[ServerSpec], VLLMServer]]:
    """Extra servers a test owns, e.g. to kill one without breaking the shared ones. Each holds ~2.3 GB and
    takes 25-50 s to start, so use it only where a shared server cannot do."""
    owned: list[VLLMServer] = []

    def start(spec: ServerSpec) -> VLLMServer:
        [server] = _start_or_fail(tiny_model_dir, (spec,), tmp_path)
        owned.append(server)
        _started.append(server)
        return server

    try:
        yield start
    finally:
        for server in owned:
            server.stop()


@pytest.fixture(scope="session")
def vllm_tools_expert(vllm_experts: dict[str, VLLMServer]) -> VLLMServer:
    """The shared server that can call tools; a router gives it the ``tools`` capability in its config."""
    return vllm_experts[TOOLS_SERVER]


@pytest.fixture(scope="session", name="moe_serve")
def moe_serve_fixture() -> Callable[[Path], AbstractContextManager[str]]:
    """``with moe_serve(config) as url``: `moe serve --config config` in its own process group, ready (its
    /health answers 200) inside the block, stopped after it. Its log is ``serve.log`` beside the config."""
    return lambda config: moe_serve(config, config.parent / "serve.log", start_timeout_s=ROUTER_READY_TIMEOUT_S,
                                    extra=["--log-level", "warning"])
