"""Small shared helpers for tests (not doubles: see ``tests/doubles`` for those)."""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import pytest

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


MetricsPage = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def snips_first(data_dir: Path, per_train: int, per_test: int) -> dict[str, list[tuple[str, str]]]:
    """The first ``per_train`` training and ``per_test`` test queries of each SNIPS intent, as (text, intent),
    under ``"train"`` and ``"test"``."""
    out: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    seen: dict[tuple[str, str], int] = {}
    limit = {"train": per_train, "test": per_test}
    with open(data_dir / "snips" / "snips_2017_custom_intents.csv", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            key = (row["split"], row["intent"])
            if seen.get(key, 0) < limit[row["split"]]:
                seen[key] = seen.get(key, 0) + 1
                out[row["split"]].append((row["text"], row["intent"]))
    return out


def samples(text: str) -> MetricsPage:
    """Every sample in a Prometheus text page, keyed by name and sorted labels."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(page: MetricsPage, name: str, **labels: str) -> float:
    """The sample of ``name`` with exactly ``labels`` (0 when the page has none)."""
    return page.get((name, tuple(sorted(labels.items()))), 0.0)


def is_png(path: Path) -> bool:
    """A non-trivial file that starts with the PNG signature."""
    data = path.read_bytes()
    return data.startswith(PNG_SIGNATURE) and len(data) > 1000


REPO_ROOT = Path(__file__).resolve().parents[1]


def assert_imports_nothing_of(code: str, modules: Sequence[str]) -> None:
    """Run ``code`` in a fresh interpreter from the repository root; it must succeed, and none of ``modules``
    may be imported by the end of it (the lazy-import promises of the encoder backends)."""
    check = f"{code}\nimport sys\nleaked = set({sorted(modules)!r}) & set(sys.modules)\nassert not leaked, leaked\n"
    result = subprocess.run([sys.executable, "-c", check], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr


def trained_config(folder: Path, text: str) -> Path:
    """``folder/router.yaml`` holding ``text``, its gate trained by ``moe train`` from the config (its examples,
    no feedback); the config's path."""
    from router.cli import main

    config = folder / "router.yaml"
    config.write_text(text)
    assert main(["train", "--config", str(config), "--no-feedback"]) == 0
    return config


@asynccontextmanager
async def serving(app: Any) -> AsyncIterator[str]:
    """The app on uvicorn on a free local port, as ``moe serve`` runs it (``router.serving.AbortStalled``), for what
    only a real socket shows (keep-alive, disconnects, a stream read while it is still being written)."""
    import asyncio

    import uvicorn

    from router.serving import AbortStalled

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(AbortStalled(app), port=port, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def moe_serve(config: Path, log: Path, *, env: Mapping[str, str] | None = None, cwd: Path | None = None,
              start_timeout_s: float = 120.0, extra: Sequence[str] = ()) -> Iterator[str]:
    """``moe serve --config CONFIG`` in its own process (and process group) on a free loopback port; yields its
    URL once ``/health`` answers, and stops it with SIGTERM on the way out. Fails the test with the end of the
    service's log when it does not come up."""
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "router.cli", "serve", "--config", str(config), "--host",
                                 "127.0.0.1", "--port", str(port), *extra], stdout=out, stderr=subprocess.STDOUT,
                                env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + start_timeout_s
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    out.flush()
                    pytest.fail(f"moe serve did not start:\n{log.read_text(errors='replace')[-3000:]}")
                time.sleep(0.25)
            yield url
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


@asynccontextmanager
async def service_over(experts: list[dict[str, Any]], scores: list[float],
                       **config: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The service in process, over real experts built from the config entries ``experts`` (their endpoints: the
    tests' scripted servers) and a fake gate giving them ``scores``; ``config`` adds top-level config sections.
    Yields an HTTP client to it, and closes the experts' connections after."""
    from router.build import build_experts
    from router.config import parse_config
    from router.orchestrator import Orchestrator
    from router.service import create_app
    from tests.doubles.fakes import FakeGate

    cfg = parse_config({"version": 1, "experts": experts, **config}, check_env=False)
    orchestrator = Orchestrator(cfg, FakeGate(cfg.expert_names, {}, default=scores), build_experts(cfg))
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(orchestrator)),
                                     base_url="http://router") as http:
            yield http
    finally:
        await orchestrator.aclose()


@contextmanager
def hung_redis() -> Iterator[tuple[str, list[socket.socket]]]:
    """A server that accepts connections and never replies: a hung Redis (stopped, or stuck on a slow command).
    Its URL, and the connections it accepted so far."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    accepted: list[socket.socket] = []

    def accept() -> None:
        with suppress(OSError):
            while True:
                accepted.append(listener.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0", accepted
    finally:
        listener.close()
        for conn in accepted:
            conn.close()
