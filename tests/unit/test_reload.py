"""Hot reload: a new config is validated, then swapped in; a bad one leaves the old running; requests in flight
finish on the old orchestrator, which is closed only after they drain."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import yaml

from router.config import RouterConfig, load_config
from router.hierarchy import mark_nested_failure
from router.orchestrator import Orchestrator
from router.reload import Reloader, ReloadFailed, restart_only_changes
from router.service import create_app
from tests.doubles.fakes import FakeExpert, FakeGate

ADMIN = "sk-admin-reload-0001"


@pytest.fixture(autouse=True)
def admin_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """The variable the configs' security.admin_key_env names: load_config checks it is set."""
    monkeypatch.setenv("MOE_ADMIN", ADMIN)


def write(path: Path, names: list[str], **extra: Any) -> Path:
    experts = [{"name": n, "type": "replay", "model": n, "replay": {"source": "routerbench", "path": "unused"}}
               for n in names]
    path.write_text(yaml.safe_dump({"version": 1, "experts": experts,
                                    "security": {"admin_key_env": "MOE_ADMIN"}, **extra}))
    stamp = path.stat().st_mtime_ns + 1_000_000_000  # a whole second on: coarse file-system clocks see it
    os.utime(path, ns=(stamp, stamp))
    return path


class Builds:
    """Builds orchestrators over fake experts (answering with ``text``, after ``delay``), and remembers them."""

    def __init__(self, delay: float = 0.0, text: str = "") -> None:
        self.delay, self.text = delay, text
        self.built: list[Orchestrator] = []
        self.closed: list[Orchestrator] = []

    def __call__(self, config: RouterConfig) -> Orchestrator:
        n = len(config.experts)
        experts = {name: FakeExpert(config.expert(name), text=f"{self.text}{name}", delay=self.delay)
                   for name in config.expert_names}
        orch = Orchestrator(config, FakeGate(config.expert_names, {}, default=[1.0 / n] * n), experts)
        closing = orch.aclose

        async def aclose() -> None:
            self.closed.append(orch)
            await closing()

        orch.aclose = aclose  # type: ignore[method-assign]
        self.built.append(orch)
        return orch


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router",
                             headers={"authorization": f"Bearer {ADMIN}"})


def service(path: Path, builds: Builds) -> Any:
    reloader = Reloader(path, build=builds)
    return create_app(builds(load_config(path)), reloader=reloader, environ={"MOE_ADMIN": ADMIN})


def polling(path: Path, builds: Builds) -> tuple[SimpleNamespace, Reloader]:
    """A reloader polling every 20 ms (started: call inside a running loop), bound to a holder serving ``path``."""
    holder = SimpleNamespace(orchestrator=builds(load_config(path)))
    reloader = Reloader(path, build=builds, poll_s=0.02)
    reloader.bind(holder)
    reloader.start()
    return holder, reloader


async def models(http: httpx.AsyncClient) -> list[str]:
    return [m["id"] for m in (await http.get("/v1/models")).json()["data"]]


async def test_admin_reload_swaps_in_the_new_experts(tmp_path: Path) -> None:
    path = write(tmp_path / "router.yaml", ["math", "code"])
    builds = Builds()
    app = service(path, builds)
    async with client(app) as http:
        assert await models(http) == ["auto", "moe-router", "math", "code"]
        write(path, ["math", "code", "poetry"])
        anonymous = await http.post("/admin/reload", headers={"authorization": ""})
        reloaded = await http.post("/admin/reload")
        assert await models(http) == ["auto", "moe-router", "math", "code", "poetry"]
        answer = await http.post("/v1/chat/completions",
                                 json={"model": "poetry", "messages": [{"role": "user", "content": "a poem"}]})
    assert anonymous.status_code == 401
    assert reloaded.status_code == 200
    assert reloaded.json()["experts"] == ["math", "code", "poetry"]
    assert answer.json()["choices"][0]["message"]["content"] == "poetry"
    await asyncio.sleep(0.01)
    assert builds.closed == [builds.built[0]]  # nothing was in flight: the old one is closed at once


async def test_a_bad_file_keeps_the_old_config_and_names_every_problem(tmp_path: Path) -> None:
    path = write(tmp_path / "router.yaml", ["math", "code"])
    builds = Builds()
    app = service(path, builds)
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign,assignment]
    logging.getLogger("router.reload").addHandler(handler)
    try:
        path.write_text(yaml.safe_dump({"version": 1, "experts": [
            {"name": "math", "type": "telepathy", "model": "m"},
            {"name": "code", "type": "replay", "model": "c", "timeout_s": -1}]}))
        async with client(app) as http:
            r = await http.post("/admin/reload")
            assert await models(http) == ["auto", "moe-router", "math", "code"]
    finally:
        logging.getLogger("router.reload").removeHandler(handler)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "invalid_config"
    paths = {p["path"] for p in error["problems"]}
    assert {"experts[0] (math).type", "experts[1] (code).timeout_s", "experts[1] (code).replay"} <= paths
    errors = [rec for rec in seen if rec.levelno == logging.ERROR]
    assert len(errors) == 1  # one line, naming every problem
    line = errors[0].getMessage()
    assert "running config stays" in line and "telepathy" in line and "timeout_s" in line
    assert app.state.orchestrator is builds.built[0] and builds.closed == []


async def test_a_request_in_flight_finishes_on_the_old_config(tmp_path: Path) -> None:
    path = write(tmp_path / "router.yaml", ["math"])
    builds = Builds(delay=0.3, text="old ")
    app = service(path, builds)
    old = builds.built[0]
    async with client(app) as http:
        slow = asyncio.create_task(http.post(
            "/v1/chat/completions", json={"model": "math", "messages": [{"role": "user", "content": "slow"}]}))
        while old.active == 0:
            await asyncio.sleep(0.005)
        builds.delay, builds.text = 0.0, "new "
        write(path, ["math", "code"])
        assert (await http.post("/admin/reload")).status_code == 200
        fresh = await http.post("/v1/chat/completions",
                                json={"model": "math", "messages": [{"role": "user", "content": "fast"}]})
        assert builds.closed == []  # still draining
        done = await slow
    assert fresh.json()["choices"][0]["message"]["content"] == "new math"
    assert done.status_code == 200 and done.json()["choices"][0]["message"]["content"] == "old math"
    await asyncio.sleep(0.01)
    assert builds.closed == [old]


async def test_a_file_change_is_picked_up_by_polling_and_a_bad_one_only_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="router.reload")
    path = write(tmp_path / "router.yaml", ["math"])
    builds = Builds()
    holder, reloader = polling(path, builds)
    try:
        write(path, ["math", "code"])
        for _ in range(200):
            if holder.orchestrator.config.expert_names == ["math", "code"]:
                break
            await asyncio.sleep(0.01)
        assert holder.orchestrator.config.expert_names == ["math", "code"]
        path.write_text("version: 1\nexperts: [")
        for _ in range(200):
            if caplog.records:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # ten more polls of the unchanged broken file
        failures = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(failures) == 1, [r.getMessage() for r in failures]  # read once, not at every poll
        assert str(path) in failures[0].getMessage()
        assert len(builds.built) == 2
        assert holder.orchestrator.config.expert_names == ["math", "code"]
    finally:
        await reloader.stop()
    assert builds.built[0] in builds.closed


async def test_sighup_reloads(tmp_path: Path) -> None:
    path = write(tmp_path / "router.yaml", ["math"])
    builds = Builds()
    holder = SimpleNamespace(orchestrator=builds(load_config(path)))
    reloader = Reloader(path, build=builds, sighup=True)
    reloader.bind(holder)
    reloader.start()
    try:
        write(path, ["math", "code"])
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(200):
            if len(builds.built) == 2:
                break
            await asyncio.sleep(0.01)
        assert holder.orchestrator.config.expert_names == ["math", "code"]
    finally:
        await reloader.stop()


async def test_a_gate_that_cannot_be_loaded_is_a_reload_problem(tmp_path: Path) -> None:
    path = write(tmp_path / "router.yaml", ["math"])
    holder = SimpleNamespace(orchestrator=Builds()(load_config(path)))
    reloader = Reloader(path)  # the real build: no trained gate next to this config
    reloader.bind(holder)
    with pytest.raises(ReloadFailed) as info:
        await reloader.reload()
    assert info.value.problems[0][0] == "gate.artifact"
    assert "moe train" in info.value.problems[0][1]


async def test_learned_vote_weights_that_were_never_trained_are_a_reload_problem(tmp_path: Path) -> None:
    from router.build import load_vote_weights

    path = write(tmp_path / "router.yaml", ["math"])
    builds = Builds()

    def build(config: RouterConfig) -> Orchestrator:
        load_vote_weights(config)  # what build_orchestrator does after loading the gate
        return builds(config)

    reloader = Reloader(path, build=build)
    reloader.bind(SimpleNamespace(orchestrator=builds(load_config(path))))
    write(path, ["math"], combiner={"strategy": "vote", "vote_weights": "learned"})
    with pytest.raises(ReloadFailed) as info:
        await reloader.reload()
    assert info.value.problems[0][0] == "combiner.vote_weights"
    assert "vote_weights.json" in info.value.problems[0][1] and "moe train" in info.value.problems[0][1]


async def test_reload_without_a_reloader_is_refused(tmp_path: Path) -> None:
    config = load_config(write(tmp_path / "router.yaml", ["math"]))
    app = create_app(Builds()(config), environ={"MOE_ADMIN": ADMIN})
    async with client(app) as http:
        r = await http.post("/admin/reload")
    assert (r.status_code, r.json()["error"]["code"]) == (409, "reload_unavailable")


class StatefulBuilds(Builds):
    """``Builds``, with what ``moe serve`` keeps across reloads (``SharedState``): breakers and in-flight counts."""

    def __init__(self, fail: set[str] = frozenset(), delay: float = 0.0) -> None:
        from router.state_redis import SharedState

        super().__init__(delay=delay)
        self.state, self.fail = SharedState(), fail

    def __call__(self, config: RouterConfig) -> Orchestrator:
        from experts.errors import ExpertUnavailable
        from router.build import build_breakers

        experts = {name: FakeExpert(config.expert(name), delay=self.delay,
                                    fail=(lambda n: ExpertUnavailable(n, "refused")) if name in self.fail else None)
                   for name in config.expert_names}
        gate = FakeGate(config.expert_names, {}, default=[0.9, 0.1])
        orch = Orchestrator(config, gate, experts, breakers=build_breakers(config, self.state),
                            in_flight=self.state.in_flight)
        self.built.append(orch)
        return orch


async def test_a_reload_keeps_what_the_breakers_learned_unless_the_expert_changed(tmp_path: Path) -> None:
    breaker = {"fallback": {"breaker": {"failure_threshold": 1}}}
    path = write(tmp_path / "router.yaml", ["math", "code"], **breaker)
    builds = StatefulBuilds(fail={"math"})
    app = service(path, builds)
    chat = {"messages": [{"role": "user", "content": "an integral"}]}
    async with client(app) as http:
        await http.post("/v1/chat/completions", json=chat)  # math fails: its breaker opens
        write(path, ["math", "code"], fallback={"breaker": {"failure_threshold": 1}, "deadline_s": 30})
        assert (await http.post("/admin/reload")).status_code == 200
        kept = (await http.get("/v1/experts")).json()["data"][0]["breaker"]["state"]
        write(tmp_path / "router.yaml", ["math", "code"], **breaker)
        text = path.read_text().replace("name: math", "name: math\n  timeout_s: 7.0")
        path.write_text(text)
        assert (await http.post("/admin/reload")).status_code == 200
        changed = (await http.get("/v1/experts")).json()["data"][0]["breaker"]["state"]
    assert kept == "open"  # the reload touched only the deadline
    assert changed == "closed"  # math's own config changed: what was learned of it no longer applies


async def test_calls_in_flight_on_the_old_config_count_against_the_new_one_s_limit(tmp_path: Path) -> None:
    path = write(tmp_path / "router.yaml", ["math", "code"])
    builds = StatefulBuilds()
    old = builds(load_config(path))
    old.capacity.acquire("math")  # a call the old config is still making
    new = builds(load_config(write(path, ["math", "code"], fallback={"deadline_s": 30})))
    assert new.capacity.free("math") == new.capacity.limits["math"] - 1
    old.capacity.release("math")
    assert new.capacity.free("math") == new.capacity.limits["math"]


async def test_a_reloaded_limit_binds_the_calls_of_requests_already_under_way() -> None:
    """The counts were shared across a reload but each config kept its own limit: lowered from 4 to 1 (an upstream
    struggling), the old config's requests still took 4 slots for their fallbacks and retries; raised from 1 to 4,
    they were refused at 1 while /v1/experts showed room."""
    from experts.errors import ExpertOverloaded
    from router.build import build_orchestrator
    from router.config import parse_config
    from router.state_redis import SharedState

    def config(limit: int) -> RouterConfig:
        return parse_config({"version": 1, "experts": [
            {"name": n, "type": "openai", "endpoint": "http://127.0.0.1:9/v1", "model": n,
             "max_concurrency": limit if n == "math" else 8} for n in ("math", "code")]}, check_env=False)

    state = SharedState()
    gate = FakeGate(["math", "code"], {}, default=[0.9, 0.1])
    old = build_orchestrator(config(4), gate=gate, state=state)
    old.capacity.acquire("math")
    old.capacity.acquire("math")
    lowered = build_orchestrator(config(1), gate=gate, state=state)
    for orchestrator in (old, lowered):
        assert orchestrator.capacity.free("math") == 0 and orchestrator.expert_states()["math"]["max_concurrency"] == 1
        with pytest.raises(ExpertOverloaded, match="1 calls already in flight"):
            orchestrator.capacity.acquire("math")
    build_orchestrator(config(4), gate=gate, state=state)
    assert old.capacity.free("math") == 2 and lowered.capacity.free("math") == 2
    old.capacity.acquire("math")  # room the raised limit gives
    assert state.in_flight["math"] == 3
    await asyncio.gather(*(o.aclose() for o in (old, lowered)))


async def test_a_change_only_a_restart_applies_is_refused_naming_it(tmp_path: Path) -> None:
    """Moving the gate to a new folder would move the feedback store beside it (feedback.path unset): refused,
    like the listening port, so nothing the file says is shown by /admin/config but silently not applied."""
    path = write(tmp_path / "router.yaml", ["math"], gate={"artifact": "v1/gate"})
    builds = Builds()
    reloader = Reloader(path, build=builds)
    reloader.bind(SimpleNamespace(orchestrator=builds(load_config(path))))
    write(path, ["math", "code"], gate={"artifact": "v2/gate"}, service={"port": 8081})
    with pytest.raises(ReloadFailed) as refused:
        await reloader.reload()
    problems = dict(refused.value.problems)
    assert set(problems) == {"service.port", "gate.artifact"}
    assert problems["service.port"] == "changes only at a restart (running: 8000; the file: 8081)"
    # Built (so that what the build refuses is named with them), closed unserved.
    assert len(builds.built) == 2 and builds.closed == [builds.built[1]]
    # pinning the store where it is lets the new gate through
    write(path, ["math", "code"], gate={"artifact": "v2/gate"},
          feedback={"path": str(tmp_path / "v1" / "feedback.sqlite3")})
    assert (await reloader.reload()).config.expert_names == ["math", "code"]


def test_restart_only_changes_names_the_store_that_would_move(tmp_path: Path) -> None:
    running = load_config(write(tmp_path / "router.yaml", ["math"], gate={"artifact": "v1/gate"}))
    moved = load_config(write(tmp_path / "router.yaml", ["math"], gate={"artifact": "v2/gate"}))
    assert restart_only_changes(running, moved) == [("gate.artifact", (
        f"moves the feedback store from {tmp_path / 'v1' / 'feedback.sqlite3'} to "
        f"{tmp_path / 'v2' / 'feedback.sqlite3'} (it sits beside gate.artifact unless feedback.path is set), which "
        "only a restart does; to keep the running store, set feedback.path to it"))]
    off = load_config(write(tmp_path / "router.yaml", ["math"], gate={"artifact": "v1/gate"},
                            feedback={"enabled": False}))
    assert [p for p, _ in restart_only_changes(running, off)] == ["feedback"]
    shared = load_config(write(tmp_path / "router.yaml", ["math"], gate={"artifact": "v1/gate"},
                               state={"key_prefix": "other:"}))
    assert [p for p, _ in restart_only_changes(running, shared)] == ["state"]
    assert restart_only_changes(running, running) == []
    # The running store's file named through a symlinked folder, or with "..", is that store: no move.
    (tmp_path / "link").symlink_to(tmp_path / "v1", target_is_directory=True)
    for spelt in (tmp_path / "link" / "feedback.sqlite3", tmp_path / "v1" / "gate" / ".." / "feedback.sqlite3"):
        pinned = load_config(write(tmp_path / "router.yaml", ["math"], gate={"artifact": "v2/gate"},
                                   feedback={"path": str(spelt)}))
        assert restart_only_changes(running, pinned) == []


async def test_metrics_count_reloads_and_flag_a_refused_one_until_a_reload_succeeds(tmp_path: Path) -> None:
    path = write(tmp_path / "router.yaml", ["math", "code"])
    app = service(path, Builds())

    def reload_metrics(page: str) -> dict[str, float]:
        wanted = ('moe_config_reloads_total{result="reloaded"}', 'moe_config_reloads_total{result="refused"}',
                  "moe_config_reload_refused")
        return {name: float(line.rsplit(" ", 1)[1]) for line in page.splitlines() for name in wanted
                if line.startswith(name + " ")}

    async with client(app) as http:
        before = reload_metrics((await http.get("/metrics")).text)
        path.write_text("version: 1\nexperts: [")  # broken YAML
        assert (await http.post("/admin/reload")).status_code == 400
        refused = reload_metrics((await http.get("/metrics")).text)
        write(path, ["math", "code", "law"])
        assert (await http.post("/admin/reload")).status_code == 200
        after = reload_metrics((await http.get("/metrics")).text)
    keys = ['moe_config_reloads_total{result="reloaded"}', 'moe_config_reloads_total{result="refused"}',
            "moe_config_reload_refused"]
    assert [before[k] for k in keys] == [0.0, 0.0, 0.0]
    assert [refused[k] for k in keys] == [0.0, 1.0, 1.0]
    assert [after[k] for k in keys] == [1.0, 1.0, 0.0]


async def _until(check: Any, tries: int = 300) -> bool:
    for _ in range(tries):
        if check():
            return True
        await asyncio.sleep(0.01)
    return bool(check())


async def test_a_retrained_artifact_and_a_nested_router_config_are_picked_up_by_polling(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The watch covers what the build reads besides the config: the artifact's gate.json, once ``moe train``
    publishes it (absent at first: no change), and a nested router's config file."""
    from router.files import atomic_write_text

    inner = write(tmp_path / "inner.yaml", ["algebra"], gate={"artifact": "inner-gate"})
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump({
        "version": 1, "security": {"admin_key_env": "MOE_ADMIN"}, "gate": {"artifact": "gate"},
        "experts": [{"name": "math", "type": "router", "model": "math", "router_config": "inner.yaml"},
                    {"name": "code", "type": "replay", "model": "code",
                     "replay": {"source": "routerbench", "path": "unused"}}]}))
    builds = Builds()
    _, reloader = polling(path, builds)
    try:
        await asyncio.sleep(0.1)
        assert len(builds.built) == 1  # nothing changed: no gate.json yet is no change
        (tmp_path / "gate").mkdir()
        caplog.set_level(logging.INFO, logger="router.reload")
        atomic_write_text(tmp_path / "gate" / "gate.json", "{}\n")  # as moe train publishes it
        assert await _until(lambda: len(builds.built) == 2)
        assert f"reloading: {tmp_path / 'gate' / 'gate.json'} changed" in caplog.messages
        atomic_write_text(tmp_path / "gate" / "gate.json", '{"retrained": true}\n')
        assert await _until(lambda: len(builds.built) == 3)
        (tmp_path / "inner-gate").mkdir()
        atomic_write_text(tmp_path / "inner-gate" / "gate.json", "{}\n")  # the nested router's own artifact
        assert await _until(lambda: len(builds.built) == 4)
        write(inner, ["algebra", "geometry"], gate={"artifact": "inner-gate"})
        assert await _until(lambda: len(builds.built) == 5)
        await asyncio.sleep(0.1)
        assert len(builds.built) == 5  # each change read once
        assert reloader.reloaded == 4 and reloader.refused == 0
    finally:
        await reloader.stop()


def test_config_inputs_lists_what_the_build_reads(tmp_path: Path) -> None:
    from router.build import config_inputs

    write(tmp_path / "inner.yaml", ["algebra"], gate={"artifact": "/abs/inner-gate"})
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump({
        "version": 1, "security": {"admin_key_env": "MOE_ADMIN"},
        "gate": {"artifact": "gate", "cascade": {"encoder": {"backend": "static"}}},
        "combiner": {"strategy": "vote", "vote_weights": "learned"},
        "experts": [{"name": "math", "type": "router", "model": "math", "router_config": "inner.yaml"},
                    {"name": "back", "type": "router", "model": "back", "router_config": "router.yaml"}]}))
    # Made without the cross-checks, which refuse the cycle (as the build would): config_inputs must stop on it.
    raw = yaml.safe_load(path.read_text())
    listed = config_inputs(RouterConfig.model_validate({**raw, "base_dir": str(tmp_path)}))
    gate, arrays = tmp_path / "gate", ["weights.npz", "examples.npz", "gate.json"]
    assert listed[:8] == [*(gate / f for f in arrays), *(gate / "fast" / f for f in arrays), gate / "cascade.json",
                          gate / "vote_weights.json"]
    # The nested file and its artifact; a nested router naming this config again (a cycle the build refuses)
    # adds this config's file and stops there.
    assert listed[8:12] == [tmp_path / "inner.yaml", *(Path("/abs/inner-gate") / f for f in arrays)]
    assert listed[12] == path
    assert len(listed) == len(set(listed))


class ArtifactBuilds(Builds):
    """Builds as ``Builds``, but like ``load_gate`` refuses a config whose artifact has no gate.json
    (``GateNotTrained``), or whose weights.npz is not the one gate.json names (``GateArtifactMismatch``; here
    gate.json holds the weights' text)."""

    def __call__(self, config: RouterConfig) -> Orchestrator:
        from router.build import GateNotTrained
        from router.gate_artifact import GateArtifactMismatch

        artifact = config.resolve(config.gate.artifact)
        if not (artifact / "gate.json").exists():
            raise GateNotTrained(artifact)
        weights = artifact / "weights.npz"
        if not weights.exists() or weights.read_text() != (artifact / "gate.json").read_text():
            raise GateArtifactMismatch(f"{weights}: contents differ from the sha256 in gate.json")
        return super().__call__(config)


def _publish(folder: Path, version: str, *names: str) -> None:
    folder.mkdir(exist_ok=True)
    for name in names:
        (folder / name).write_text(version)
        stamp = (folder / name).stat().st_mtime_ns + 1_000_000_000
        os.utime(folder / name, ns=(stamp, stamp))


async def test_an_artifact_copied_gate_json_first_is_reloaded_once_its_arrays_land(tmp_path: Path) -> None:
    path = write(tmp_path / "router.yaml", ["math", "code"], gate={"artifact": "gate"})
    _publish(tmp_path / "gate", "v1", "weights.npz", "gate.json")
    builds = ArtifactBuilds()
    _, reloader = polling(path, builds)
    try:
        _publish(tmp_path / "gate", "v2", "gate.json")  # as cp -r copies it: gate.json before weights.npz
        assert await _until(lambda: reloader.refused == 1)
        assert reloader.last_refused and reloader.reloaded == 0
        _publish(tmp_path / "gate", "v2", "weights.npz")
        assert await _until(lambda: reloader.reloaded == 1)
        assert not reloader.last_refused
    finally:
        await reloader.stop()


async def test_training_the_gate_a_refused_config_names_reloads_it(tmp_path: Path) -> None:
    """A config edited to an untrained artifact is refused with "train one with: moe train"; doing so reloads."""
    path = write(tmp_path / "router.yaml", ["math", "code"], gate={"artifact": "g1"})
    _publish(tmp_path / "g1", "v1", "weights.npz", "gate.json")
    builds = ArtifactBuilds()
    holder, reloader = polling(path, builds)
    try:
        write(path, ["math", "code"], gate={"artifact": "g2"})
        assert await _until(lambda: reloader.refused == 1)
        _publish(tmp_path / "g2", "v1", "weights.npz", "gate.json")
        assert await _until(lambda: reloader.reloaded == 1)
        assert holder.orchestrator.config.gate.artifact == "g2"
        # The running config's inputs are now g2's alone: g1 changing reloads nothing.
        _publish(tmp_path / "g1", "v9", "weights.npz", "gate.json")
        await asyncio.sleep(0.15)
        assert (reloader.reloaded, reloader.refused) == (1, 1)
    finally:
        await reloader.stop()


async def test_a_reload_onto_another_service_starts_its_breaker_afresh_and_keeps_the_old_one_s(tmp_path: Path) -> None:
    """The breaker is kept under the expert's service identity: pointed at another model, math starts closed,
    while what was learned of the old one stays with it (a replica still on the old config shares it), and
    coming back to it finds it as it was."""
    breaker = {"fallback": {"breaker": {"failure_threshold": 1, "cooldown_s": 300, "cooldown_max_s": 300}}}
    path = write(tmp_path / "router.yaml", ["math", "code"], **breaker)
    app = service(path, StatefulBuilds(fail={"math"}))
    chat = {"messages": [{"role": "user", "content": "an integral"}]}

    async def math_state() -> str:
        state: str = (await http.get("/v1/experts")).json()["data"][0]["breaker"]["state"]
        return state

    async with client(app) as http:
        await http.post("/v1/chat/completions", json=chat)  # math fails: its breaker opens
        assert await math_state() == "open"
        path.write_text(path.read_text().replace("model: math", "model: math-v2"))
        assert (await http.post("/admin/reload")).status_code == 200
        assert await math_state() == "closed"
        path.write_text(path.read_text().replace("model: math-v2", "model: math"))
        os.utime(path, ns=(path.stat().st_mtime_ns + 2_000_000_000,) * 2)
        assert (await http.post("/admin/reload")).status_code == 200
        assert await math_state() == "open"


async def test_a_reload_that_changes_security_keeps_every_keys_rate_bucket(tmp_path: Path) -> None:
    """Adding a key (any change under security) built the guard on a new store: every key's bucket was full again,
    a limited key's next request answered 200."""
    import hashlib

    def keyed(*names: str) -> dict[str, Any]:
        keys = [{"name": n, "sha256": hashlib.sha256(f"sk-{n}".encode()).hexdigest()} for n in names]
        return {"security": {"admin_key_env": "MOE_ADMIN", "api_keys": keys,
                             "rate_limit": {"rate_per_s": 0.01, "burst": 2}}}

    path = write(tmp_path / "router.yaml", ["x", "y"], **keyed("a"))
    builds = Builds()
    app = create_app(builds(load_config(path)), reloader=Reloader(path, build=builds),
                     environ={"MOE_ADMIN": "sk-admin"})
    key = {"authorization": "Bearer sk-a"}
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                                                   base_url="http://router") as http:
        assert [(await http.get("/v1/models", headers=key)).status_code for _ in range(3)] == [200, 200, 429]
        write(path, ["x", "y"], **keyed("a", "b"))
        assert (await http.post("/admin/reload", headers={"authorization": "Bearer sk-admin"})).status_code == 200
        assert (await http.get("/v1/models", headers={"authorization": "Bearer sk-b"})).status_code == 200
        assert (await http.get("/v1/models", headers=key)).status_code == 429


async def test_a_refused_nested_gate_is_named_under_its_expert_with_its_file(tmp_path: Path) -> None:
    """A nested router's untrained (or mismatched) gate refused the reload as this config's ``gate.artifact``,
    naming neither the nesting expert nor the nested file; it is named as moe config check names it."""
    inner = write(tmp_path / "inner.yaml", ["algebra"], gate={"artifact": "inner-gate"})
    path = tmp_path / "router.yaml"
    outer = {"version": 1, "gate": {"artifact": "g1"},
             "experts": [{"name": "code", "type": "replay", "model": "code",
                          "replay": {"source": "routerbench", "path": "unused"}}]}
    path.write_text(yaml.safe_dump(outer))
    _publish(tmp_path / "g1", "v1", "weights.npz", "gate.json")

    class NestedBuilds(ArtifactBuilds):
        """The outer gate first, then each nested router's, marked as ``RouterExpert`` marks its build's failure."""

        def __call__(self, config: RouterConfig) -> Orchestrator:
            built = super().__call__(config)
            for expert in config.experts:
                if expert.router_config:
                    nested = Path(config.resolve(expert.router_config))
                    try:
                        super().__call__(load_config(nested))
                    except Exception as exc:
                        mark_nested_failure(exc, nested)
                        raise
            return built

    holder = SimpleNamespace(orchestrator=NestedBuilds()(load_config(path)))
    reloader = Reloader(path, build=NestedBuilds())
    reloader.bind(holder)
    path.write_text(yaml.safe_dump({**outer, "experts": [
        {"name": "math", "type": "router", "model": "math", "router_config": "inner.yaml"}, *outer["experts"]]}))
    with pytest.raises(ReloadFailed) as refused:
        await reloader.reload()
    [(key, message)] = refused.value.problems
    assert key == "experts[0] (math).router_config", refused.value.problems
    assert message.startswith(f"{inner}: ") and "moe train --config " + str(inner) in message
    # this config's own gate untrained too: the build stops at it, and it is named as this config's, not dropped
    outer["gate"] = {"artifact": "g2"}
    path.write_text(yaml.safe_dump({**outer, "experts": [
        {"name": "math", "type": "router", "model": "math", "router_config": "inner.yaml"}, *outer["experts"]]}))
    with pytest.raises(ReloadFailed) as refused:
        await reloader.reload()
    assert [key for key, _ in refused.value.problems] == ["gate.artifact"]
    assert str(tmp_path / "g2") in refused.value.problems[0][1]
