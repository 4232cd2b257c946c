"""Fixtures for the integration tier: a tiny model built once, and real vLLM servers serving it.

Everything under tests/integration is marked ``integration``. A missing vLLM venv FAILS the tier rather than
skipping it: a skipped tier would read as a passing one.

Fixtures:
    tiny_model_dir       session   Path of the tiny random Llama (tokenizer + weights)
    vllm_experts         session   {served name: VLLMServer} for SESSION_SERVERS, started concurrently
    vllm_server_factory  function  start(spec: ServerSpec) -> VLLMServer, ready; stopped after the test
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.tiny_model import build_tiny_llama
from tests.integration.vllm_server import ServerSpec, VLLMServer, VLLMServerError, start_all, vllm_python

# The servers every test may share. Two experts are what routing needs; add tool calling to one of them with
# ServerSpec("tiny-b", extra_args=("--enable-auto-tool-choice", "--tool-call-parser", "<parser>")).
SESSION_SERVERS = (ServerSpec("tiny-a"), ServerSpec("tiny-b"))

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
