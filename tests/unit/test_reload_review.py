"""Hot reload, from a review of it: what a reload frees (the retired gate and encoder, by reference counting alone),
what it keeps for a router nested in-process (breakers, in-flight counts, encoders, as for the top level), what
it does with an error no config check names (refused, and the watch lives on), a SIGHUP while ``moe serve``
starts (not fatal), and every problem of a file reported at once."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import yaml

import router.build
import router.encoders
from experts.base import ExpertContext
from experts.types import ChatRequest
from router.build import build_orchestrator
from router.config import RouterConfig, load_config
from router.orchestrator import Orchestrator
from router.reload import Reloader, ReloadFailed
from router.service import create_app
from router.state_redis import SharedState
from tests.doubles.fakes import FakeEncoder, FakeExpert, FakeGate
from tests.doubles.scripted_server import Behaviour, ScriptedOpenAIServer
from tests.support import REPO_ROOT, free_port

ADMIN = "sk-admin-reload-review-0001"
REQUEST = ChatRequest(messages=[{"role": "user", "content": "a question"}])  # type: ignore[list-item]


@pytest.fixture(autouse=True)
def admin_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOE_ADMIN", ADMIN)


def dump(path: Path, config: dict[str, Any]) -> Path:
    """``config`` written to ``path``, its mtime a second on (coarse file-system clocks see the change)."""
    path.write_text(yaml.safe_dump({"version": 1, **config}, sort_keys=False))
    stamp = path.stat().st_mtime_ns + 1_000_000_000
    os.utime(path, ns=(stamp, stamp))
    return path


def leaf(name: str, url: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": "vllm", "endpoint": url, "model": name, **extra}


async def until(check: Callable[[], bool], tries: int = 500) -> bool:
    for _ in range(tries):
        if check():
            return True
        await asyncio.sleep(0.01)
    return check()


@pytest.fixture
def encoders(monkeypatch: pytest.MonkeyPatch) -> list[weakref.ref[FakeEncoder]]:
    """The real build (``build_orchestrator``, shared state, nested routers), over fake gates and fake encoders:
    every encoder built is listed (weakly). Each level's gate favours ``sci`` where it has it, else ``math``."""
    built: list[weakref.ref[FakeEncoder]] = []

    def build_encoder(config: object) -> FakeEncoder:
        encoder = FakeEncoder()
        built.append(weakref.ref(encoder))
        return encoder

    def load_gate(config: RouterConfig, kept: Any = None) -> FakeGate:
        loaded = router.build.gate_encoders(config, kept or {})
        names = config.expert_names
        favourite = "sci" if "sci" in names else "math"
        gate = FakeGate(names, {}, default=[0.9 if n == favourite else 0.1 / len(names) for n in names])
        gate.encoder = loaded[config.gate.encoder.model_dump_json()]  # type: ignore[assignment]
        return gate

    monkeypatch.setattr(router.encoders, "build_encoder", build_encoder)
    monkeypatch.setattr(router.build, "load_gate", load_gate)
    return built


@pytest.fixture
def servers() -> Iterator[dict[str, ScriptedOpenAIServer]]:
    started = {name: ScriptedOpenAIServer(name).start() for name in ("math", "code", "inner-math", "inner-code")}
    try:
        yield started
    finally:
        for server in started.values():
            server.stop()


def alive(refs: list[weakref.ref[FakeEncoder]]) -> int:
    return sum(r() is not None for r in refs)


class Served:
    """A reloader over ``path`` with the real build and one shared state, as ``moe serve`` makes them."""

    def __init__(self, path: Path) -> None:
        self.state = SharedState()
        context = ExpertContext(base_dir=path.parent)
        self.reloader = Reloader(path, build=lambda c: build_orchestrator(c, context=context, state=self.state))
        self.holder = SimpleNamespace(orchestrator=self.reloader.build(load_config(path)))
        self.reloader.bind(self.holder)

    @property
    def orchestrator(self) -> Orchestrator:
        return self.holder.orchestrator  # type: ignore[no-any-return]

    def inner(self, name: str = "sci") -> Orchestrator:
        inner = self.orchestrator.experts[name]._inner  # type: ignore[attr-defined]
        assert isinstance(inner, Orchestrator)
        return inner

    async def reload(self) -> Orchestrator:
        new = await self.reloader.reload()
        assert await until(lambda: not self.reloader._tasks)  # the old one drained and closed
        return new

    async def aclose(self) -> None:
        await self.reloader.stop()
        await self.orchestrator.aclose()


# -- 1. a retired orchestrator is freed by reference counting -------------------------------------------------
async def test_a_retired_gate_and_its_encoder_are_freed_without_the_cyclic_gc(
        tmp_path: Path, servers: dict[str, ScriptedOpenAIServer], encoders: list[weakref.ref[FakeEncoder]]) -> None:
    """onnxruntime's memory does not count towards the cyclic GC's thresholds: a retired gate held in a reference
    cycle (decider -> batcher -> bound method -> decider) kept each reload's encoder, ~60 MB, until a collection."""
    experts = [leaf("math", servers["math"].url), leaf("code", servers["code"].url)]
    path = dump(tmp_path / "router.yaml", {"gate": {"encoder": {"threads": 1}}, "experts": experts})
    served = Served(path)
    await served.orchestrator.decide(REQUEST)  # the gate's batcher has run
    gate, encoder = weakref.ref(served.orchestrator.gate), encoders[0]
    gc.collect()
    gc.disable()
    try:
        dump(path, {"gate": {"encoder": {"threads": 2}}, "experts": experts})  # a new encoder
        await served.reload()
        await served.orchestrator.decide(REQUEST)
        assert gate() is None and encoder() is None
        assert alive(encoders) == 1  # the serving one
    finally:
        gc.enable()
        await served.aclose()


async def test_a_closed_orchestrator_frees_its_decider_without_the_cyclic_gc() -> None:
    from tests.doubles.fakes import fake_config

    config = fake_config(["math", "code"])
    gc.disable()
    try:
        orch = Orchestrator(config, FakeGate(config.expert_names, {}, default=[0.5, 0.5]),
                            {n: FakeExpert(config.expert(n)) for n in config.expert_names})
        await orch.decide(REQUEST)
        decider, gate = weakref.ref(orch.decider), weakref.ref(orch.gate)
        await orch.aclose()
        del orch
        assert decider() is None and gate() is None
    finally:
        gc.enable()


# -- 2. a router nested in-process keeps its state across reloads ----------------------------------------------
def nested_files(tmp_path: Path, servers: dict[str, ScriptedOpenAIServer], *, math: dict[str, Any] | None = None,
                 outer: tuple[dict[str, Any], ...] = ()) -> Path:
    """``router.yaml`` (math, code and ``sci``: a router over ``inner/inner.yaml``), and the inner file (math,
    code). The inner breakers open at the first failure."""
    breaker = {"deadline_s": 5, "breaker": {"failure_threshold": 1, "failure_rate": None, "cooldown_s": 600,
                                          "cooldown_max_s": 600}}
    dump(tmp_path / "inner.yaml", {"fallback": breaker, "experts": [
        leaf("math", servers["inner-math"].url, **(math or {})), leaf("code", servers["inner-code"].url)]})
    sci = {"name": "sci", "type": "router", "model": "auto", "router_config": "inner.yaml"}
    return dump(tmp_path / "router.yaml", {"fallback": breaker, "experts": [
        leaf("math", servers["math"].url), leaf("code", servers["code"].url), sci, *outer]})


async def test_a_nested_router_keeps_its_encoder_across_reloads(
        tmp_path: Path, servers: dict[str, ScriptedOpenAIServer], encoders: list[weakref.ref[FakeEncoder]]) -> None:
    path = nested_files(tmp_path, servers)
    served = Served(path)
    assert len(encoders) == 2  # the outer gate's and the inner gate's
    inner_encoder = served.inner().gate.encoder
    gc.disable()
    try:
        for timeout in (11, 12, 13):
            nested_files(tmp_path, servers, outer=(leaf("poetry", servers["code"].url, timeout_s=timeout),))
            await served.reload()
            assert (await served.orchestrator.complete(REQUEST)).expert == "sci"
        assert len(encoders) == 2  # none built again: a new onnxruntime session per reload grew the process
        assert served.inner().gate.encoder is inner_encoder
        assert alive(encoders) == 2
    finally:
        gc.enable()
        await served.aclose()


async def test_a_nested_router_keeps_its_breakers_across_reloads_and_resets_a_changed_expert_s(
        tmp_path: Path, servers: dict[str, ScriptedOpenAIServer], encoders: list[weakref.ref[FakeEncoder]]) -> None:
    path = nested_files(tmp_path, servers)
    served = Served(path)
    try:
        servers["inner-math"].default = Behaviour.error(500)
        answer = await served.orchestrator.complete(REQUEST)  # inner math fails, its breaker opens; code answers
        assert answer.expert == "sci" and len(servers["inner-math"].requests) == 1
        assert served.inner().breakers.snapshot("math")["state"] == "open"
        nested_files(tmp_path, servers, outer=(leaf("poetry", servers["code"].url),))  # an unrelated change
        await served.reload()
        assert served.inner().breakers.snapshot("math")["state"] == "open"
        await served.orchestrator.complete(REQUEST)
        assert len(servers["inner-math"].requests) == 1  # still open: not called
        # inner math's own config changes (its timeout): what was learned of it no longer applies, as at the top
        servers["inner-math"].default = Behaviour.ok("recovered")
        nested_files(tmp_path, servers, math={"timeout_s": 7.0}, outer=(leaf("poetry", servers["code"].url),))
        await served.reload()
        assert served.inner().breakers.snapshot("math")["state"] == "closed"
        answer = await served.orchestrator.complete(REQUEST)
        assert answer.content == "recovered" and len(servers["inner-math"].requests) == 2
    finally:
        await served.aclose()


async def test_calls_in_flight_on_the_old_nested_router_count_against_the_new_one_s_limit(
        tmp_path: Path, servers: dict[str, ScriptedOpenAIServer], encoders: list[weakref.ref[FakeEncoder]]) -> None:
    path = nested_files(tmp_path, servers, math={"max_concurrency": 1})
    served = Served(path)
    math = servers["inner-math"]
    math.default = Behaviour.hang()
    first = asyncio.create_task(served.orchestrator.complete(REQUEST))
    try:
        assert await until(lambda: math.chats_in_flight == 1)
        nested_files(tmp_path, servers, math={"max_concurrency": 1}, outer=(leaf("poetry", servers["code"].url),))
        new = await served.reloader.reload()
        second = await new.complete(REQUEST)  # inner math is full: its one call is the old config's
        assert second.expert == "sci" and second.trace.attempts[0].nested is not None
        assert second.trace.attempts[0].nested["attempts"][-1]["expert"] == "code"
        assert len(math.requests) == 1 and math.peak_chats_in_flight == 1
    finally:
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await served.aclose()


async def test_two_nested_routers_over_one_file_keep_their_own_state(
        tmp_path: Path, servers: dict[str, ScriptedOpenAIServer], encoders: list[weakref.ref[FakeEncoder]]) -> None:
    twin = {"name": "lab", "type": "router", "model": "auto", "router_config": "inner.yaml"}
    path = nested_files(tmp_path, servers, outer=(twin,))
    served = Served(path)
    try:
        sci, lab = served.inner("sci"), served.inner("lab")
        assert sci.capacity.in_flight is not lab.capacity.in_flight
        assert sci.breakers.store is not lab.breakers.store
        nested_files(tmp_path, servers, outer=(twin, leaf("poetry", servers["code"].url)))
        await served.reload()
        assert served.inner("sci").capacity.in_flight is sci.capacity.in_flight
        assert served.inner("lab").capacity.in_flight is lab.capacity.in_flight
        assert served.inner("sci").breakers.store is sci.breakers.store
        # pointed at another file, it is another router: nothing carried over
        (tmp_path / "other.yaml").write_text((tmp_path / "inner.yaml").read_text())
        nested_files(tmp_path, servers, outer=({**twin, "router_config": "other.yaml"},))
        await served.reload()
        assert served.inner("lab").capacity.in_flight is not lab.capacity.in_flight
        assert served.inner("sci").capacity.in_flight is sci.capacity.in_flight
    finally:
        await served.aclose()


async def test_a_refused_reload_leaves_the_kept_encoders_and_nested_states_as_they_were(
        tmp_path: Path, servers: dict[str, ScriptedOpenAIServer], encoders: list[weakref.ref[FakeEncoder]]) -> None:
    """A file that builds but changes a restart-only setting is refused after its build: what that build would keep
    in the shared state (a new encoder, a new nested router's state) is not kept."""
    path = nested_files(tmp_path, servers)
    served = Served(path)
    try:
        kept = dict(served.state.encoders)
        inner_state = served.inner().capacity.in_flight
        text = yaml.safe_load(path.read_text())
        text["service"] = {"port": 8081}
        text["gate"] = {"encoder": {"threads": 3}}
        text["experts"][2]["name"] = "science"  # another nested router
        dump(path, {k: v for k, v in text.items() if k != "version"})
        with pytest.raises(ReloadFailed) as refused:
            await served.reloader.reload()
        assert [p for p, _ in refused.value.problems] == ["service.port"]
        assert served.state.encoders == kept
        gc.collect()  # what only an awaited future's result still held: the point is that nothing kept holds them
        assert len(encoders) == 4 and alive(encoders) == 2  # the refused build's two were let go
        # the next good file (back to the running encoder) finds the running state
        nested_files(tmp_path, servers, outer=(leaf("poetry", servers["code"].url),))
        await served.reload()
        assert len(encoders) == 4
        assert served.inner().capacity.in_flight is inner_state
    finally:
        await served.aclose()


def test_with_redis_a_nested_router_s_breakers_are_the_replicas_shared_ones_under_a_prefix_of_its_own(
        tmp_path: Path, servers: dict[str, ScriptedOpenAIServer], encoders: list[weakref.ref[FakeEncoder]]) -> None:
    """Shared as the top level's are (one client, a wall clock), apart from them: two levels may name an expert
    alike."""
    import time as clock

    from router.state_redis import RedisBreakerStore

    client = SimpleNamespace()  # no call reaches it while building
    state = SharedState(breaker_store=RedisBreakerStore(client, "moe:"))  # type: ignore[arg-type]
    orch = build_orchestrator(load_config(nested_files(tmp_path, servers)), state=state)
    inner = orch.experts["sci"]._inner  # type: ignore[attr-defined]
    store = inner.breakers.store
    assert isinstance(store, RedisBreakerStore) and store.client is client
    assert store.key_prefix == "moe:nested:sci:" and inner.breakers.clock is clock.time


# -- 3. an error no config check names is a refused reload ----------------------------------------------------
DEEP = "version: 1\nexperts: " + "[" * 3000 + "]" * 3000 + "\n"


def simple(path: Path, names: list[str]) -> Path:
    return dump(path, {"security": {"admin_key_env": "MOE_ADMIN"}, "experts": [
        {"name": n, "type": "replay", "model": n, "replay": {"source": "routerbench", "path": "unused"}}
        for n in names]})


def fake_build(config: RouterConfig) -> Orchestrator:
    n = len(config.experts)
    return Orchestrator(config, FakeGate(config.expert_names, {}, default=[1.0 / n] * n),
                        {name: FakeExpert(config.expert(name)) for name in config.expert_names})


async def test_a_file_too_deep_to_parse_is_a_refused_reload_and_the_watch_goes_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A file nested too deep for the parser is one config problem now (router.config); an error no check names,
    here a build that raises, is refused the same way, logged with its traceback, and the watch goes on."""
    caplog.set_level(logging.ERROR, logger="router.reload")
    path = simple(tmp_path / "router.yaml", ["math"])
    builds: list[str] = []

    def build(config: RouterConfig) -> Orchestrator:
        builds.append("build")
        if len(builds) == 2:
            raise RecursionError("maximum recursion depth exceeded (a bug of ours)")
        return fake_build(config)

    holder = SimpleNamespace(orchestrator=build(load_config(path)))
    reloader = Reloader(path, build=build, poll_s=0.02)
    reloader.bind(holder)
    reloader.start()
    try:
        path.write_text(DEEP)
        assert await until(lambda: reloader.refused == 1)
        simple(path, ["math", "code", "law"])
        assert await until(lambda: reloader.refused == 2)
        assert all(not t.done() for t in reloader._tasks)  # the watch is alive
        simple(path, ["math", "code"])
        assert await until(lambda: holder.orchestrator.config.expert_names == ["math", "code"])
    finally:
        await reloader.stop()
    deep, broken = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "nested too deeply for the parser" in deep.getMessage() and deep.exc_info is None
    assert "RecursionError" in broken.getMessage() and broken.exc_info is not None  # with its traceback, once
    assert (reloader.reloaded, reloader.refused, reloader.last_refused) == (1, 2, False)


async def test_admin_reload_answers_400_for_any_error_and_counts_it_refused(tmp_path: Path) -> None:
    path = simple(tmp_path / "router.yaml", ["math"])
    calls: list[str] = []

    def build(config: RouterConfig) -> Orchestrator:
        calls.append("build")
        if len(calls) > 1:
            raise RuntimeError("boom at https://user:hunter2@internal.example/v1")
        return fake_build(config)

    app = create_app(build(load_config(path)), reloader=Reloader(path, build=build), environ={"MOE_ADMIN": ADMIN})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router",
                                 headers={"authorization": f"Bearer {ADMIN}"}) as http:
        path.write_text(DEEP)
        deep = await http.post("/admin/reload")
        simple(path, ["math", "code"])
        broken = await http.post("/admin/reload")
        page = (await http.get("/metrics")).text
    assert deep.status_code == 400
    assert [p["path"] for p in deep.json()["error"]["problems"]] == ["<yaml>"]  # a config problem (router.config)
    assert "nested too deeply for the parser" in deep.json()["error"]["problems"][0]["message"]
    assert broken.status_code == 400
    (problem,) = broken.json()["error"]["problems"]
    assert problem["path"] == "<build>" and problem["message"].startswith("RuntimeError: boom")
    assert "hunter2" not in broken.text
    assert 'moe_config_reloads_total{result="refused"} 2.0' in page and "moe_config_reload_refused 1.0" in page


# -- 4. SIGHUP while moe serve starts -------------------------------------------------------------------------
async def test_a_sighup_before_the_reloader_starts_is_kept_and_reloaded_once_it_does(tmp_path: Path) -> None:
    path = simple(tmp_path / "router.yaml", ["math"])
    holder = SimpleNamespace(orchestrator=fake_build(load_config(path)))
    reloader = Reloader(path, build=fake_build, sighup=True)
    previous = signal.getsignal(signal.SIGHUP)
    try:
        reloader.catch_sighup()
        os.kill(os.getpid(), signal.SIGHUP)  # the default action would end this process
        simple(path, ["math", "code"])
        reloader.bind(holder)
        reloader.start()
        assert await until(lambda: holder.orchestrator.config.expert_names == ["math", "code"])
        await reloader.stop()
        os.kill(os.getpid(), signal.SIGHUP)  # while shutting down: still caught
        assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, None)
    finally:
        signal.signal(signal.SIGHUP, previous)


_SERVE = """
import sys
import router.build
from router.orchestrator import Orchestrator
from tests.doubles.fakes import FakeGate

def build(config, **kwargs):
    print("building", flush=True)
    sys.stdin.readline()  # the test sends SIGHUP now, then a line
    n = len(config.experts)
    return Orchestrator(config, FakeGate(config.expert_names, {}, default=[1.0 / n] * n),
                        router.build.build_experts(config))

router.build.build_orchestrator = build
from router.cli import main
sys.exit(main(["serve", "--config", sys.argv[1], "--host", "127.0.0.1", "--port", sys.argv[2]]))
"""


def test_moe_serve_survives_a_sighup_while_it_starts_and_reloads(tmp_path: Path) -> None:
    path = dump(tmp_path / "router.yaml", {"service": {"reload_poll_s": None}, "experts": [
        leaf("math", "http://127.0.0.1:9/v1"), leaf("code", "http://127.0.0.1:9/v1")]})
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", _SERVE, str(path), str(port)], cwd=REPO_ROOT,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    with proc:
        _serve_with_a_sighup(proc, port, log)


def _serve_with_a_sighup(proc: subprocess.Popen[str], port: int, log: Path) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline() == "building\n"  # inside moe serve, before the service runs
        proc.send_signal(signal.SIGHUP)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "building\n", log.read_text()  # the reload the SIGHUP asked for
        proc.stdin.write("go\n")
        proc.stdin.flush()
        for _ in range(600):
            if "config reloaded from" in log.read_text() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert proc.poll() is None, log.read_text()
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
        assert "reloading: SIGHUP came while the service started" in log.read_text()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- 5. every problem at once ---------------------------------------------------------------------------------
async def test_a_restart_only_change_and_a_build_problem_are_reported_together(tmp_path: Path) -> None:
    path = simple(tmp_path / "router.yaml", ["math"])
    holder = SimpleNamespace(orchestrator=fake_build(load_config(path)))
    reloader = Reloader(path)  # the real build: no trained gate at "nogate"
    reloader.bind(holder)
    dump(path, {"security": {"admin_key_env": "MOE_ADMIN"}, "service": {"port": 8081},
                "feedback": {"enabled": False}, "gate": {"artifact": "nogate"}, "experts": [
                    {"name": "math", "type": "replay", "model": "math",
                     "replay": {"source": "routerbench", "path": "unused"}}]})
    with pytest.raises(ReloadFailed) as refused:
        await reloader.reload()
    assert [p for p, _ in refused.value.problems] == ["service.port", "feedback", "gate.artifact"]
    # the schema's problems come first, alone: nothing is built from such a file
    dump(path, {"service": {"port": 8081}, "experts": [{"name": "math", "type": "telepathy", "model": "m"}]})
    with pytest.raises(ReloadFailed) as schema:
        await reloader.reload()
    assert [p for p, _ in schema.value.problems] == ["experts[0] (math).type"]
