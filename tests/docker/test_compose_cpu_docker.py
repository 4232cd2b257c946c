"""docker-compose.cpu.yml on a real Docker engine: the router image is built from the repo's Dockerfile, the
profile's services start with no GPU, and the router answers through the official ``openai`` client.

Skipped unless a Docker engine answers. The base images are Docker Hub's unless ``MOE_PYTHON_IMAGE`` and
``MOE_REDIS_IMAGE`` name others (on a host without Docker Hub: ``deploy/docker/base-image.sh`` builds them from
a Debian mirror); ``MOE_PIP_NO_INDEX=1`` builds from ``./wheelhouse`` (``make wheelhouse``) with no package
index. Run it with ``make docker-test``.

The stack runs under its own compose project name and host port, and is removed at the end with its volumes and
the image it built.
A gate artifact is needed at artifacts/demo-gate (``make demo`` writes it): without one a small gate is
trained there for the test and removed after it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from eval.demo import held_out, write_training_file
from experts.recordings import load_routerbench
from router.compose import PYTHON_IMAGE, REDIS_IMAGE
from router.config import load_config
from tests.support import free_port

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.cpu.yml"
CONFIG = ROOT / "configs" / "compose-cpu.yaml"
GATE = ROOT / "artifacts" / "demo-gate"
BUILD_TIMEOUT_S = 1800
START_TIMEOUT_S = 240


def _compose_command() -> list[str] | None:
    """``docker compose`` (the plugin) where it exists, else the standalone ``docker-compose``."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True,
                                                 check=False).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def _engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30, check=False).returncode == 0


def _missing_base_images(env: dict[str, str]) -> list[str]:
    """The base images the build and the redis service need that are neither present nor pullable."""
    images = [env.get("MOE_PYTHON_IMAGE") or PYTHON_IMAGE, env.get("MOE_REDIS_IMAGE") or REDIS_IMAGE]
    missing = []
    for image in images:
        present = subprocess.run(["docker", "image", "inspect", image], capture_output=True, check=False)
        if present.returncode != 0 and subprocess.run(["docker", "pull", "-q", image], capture_output=True,
                                                      timeout=600, check=False).returncode != 0:
            missing.append(image)
    return missing


@dataclass
class Stack:
    compose: list[str]
    env: dict[str, str]
    url: str

    def run(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*self.compose, *args], env=self.env, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return done

    def container(self, service: str) -> str:
        return self.run("ps", "-q", service).stdout.strip()

    def health(self, service: str) -> str:
        cid = self.container(service)
        if not cid:
            return "absent"
        inspect = subprocess.run(["docker", "inspect", "--format", "{{json .State}}", cid], capture_output=True,
                                 text=True, timeout=30, check=True)
        state = json.loads(inspect.stdout)
        return str(state.get("Health", {}).get("Status") or state.get("Status"))

    def wait_healthy(self, *services: str) -> dict[str, float]:
        """Seconds until each service's healthcheck passes; fails with the logs if one does not in time."""
        start, took = time.monotonic(), {}
        while len(took) < len(services):
            for service in services:
                if service not in took and self.health(service) == "healthy":
                    took[service] = round(time.monotonic() - start, 1)
            if time.monotonic() - start > START_TIMEOUT_S:
                logs = self.run("logs", "--tail", "40", check=False).stdout
                raise AssertionError(f"not healthy after {START_TIMEOUT_S} s: "
                                     f"{ {s: self.health(s) for s in services} }\n{logs[-4000:]}")
            time.sleep(2)
        return took


def _train_small_gate(data_dir: Path) -> None:
    """A 40-question gate at artifacts/demo-gate, trained by ``moe train`` from the profile's own config."""
    env = {**os.environ, "MOE_DATA_DIR": str(data_dir)}
    config = load_config(CONFIG, check_env=False)
    outcomes = config.resolve(config.gate.train_data[0])
    assert not outcomes.exists(), f"{outcomes} exists without {GATE}; run `make demo` to write both"
    _, count = write_training_file(config, limit=40)
    assert count == 40
    try:
        trained = subprocess.run([sys.executable, "-m", "router.cli", "train", "--config", str(CONFIG),
                                  "--no-feedback"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
                                 check=False)
        assert trained.returncode == 0, trained.stderr[-2000:]
    finally:
        outcomes.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def stack(data_dir: Path) -> Iterator[Stack]:
    compose = _compose_command()
    if compose is None or not _engine_answers():
        pytest.skip("no Docker engine answers (docker info failed) or no compose command: nothing to start")
    env = {**os.environ, "MOE_DATA_DIR": str(data_dir), "MOE_ROUTER_PORT": str(free_port()),
           "COMPOSE_PROJECT_NAME": f"moe-docker-test-{os.getpid()}"}
    if missing := _missing_base_images(env):
        pytest.skip(f"base images neither present nor pullable: {', '.join(missing)}; without Docker Hub, build "
                    "stand-ins with deploy/docker/base-image.sh and name them in MOE_PYTHON_IMAGE and MOE_REDIS_IMAGE")
    trained_here = not (GATE / "gate.json").is_file()
    if trained_here:
        _train_small_gate(data_dir)
    s = Stack(compose=[*compose, "-f", str(COMPOSE_FILE)], env=env, url=f"http://127.0.0.1:{env['MOE_ROUTER_PORT']}")
    try:
        started = time.monotonic()
        s.run("build", timeout=BUILD_TIMEOUT_S)
        built_s = time.monotonic() - started
        s.run("up", "-d", timeout=300)
        took = s.wait_healthy("redis", "router")
        print(f"\ncompose cpu profile: built in {built_s:.0f} s; healthy after {took}")
        yield s
    finally:
        s.run("down", "--volumes", "--remove-orphans", "--rmi", "local", timeout=300, check=False)
        if trained_here:
            shutil.rmtree(GATE, ignore_errors=True)


def test_services_start_and_the_router_answers_as_the_recorded_expert(stack: Stack, data_dir: Path) -> None:
    recorded = {e["name"]: e["model"] for e in yaml.safe_load(CONFIG.read_text(encoding="utf-8"))["experts"]}
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=60)
    assert {m.id for m in client.models.list()} >= set(recorded)
    store = load_routerbench(data_dir / "routerdc" / "routerbench_zs")
    row = next(r for r in held_out(store) if r.task == "arc_challenge")
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": row.prompt}])
    expert = raw.headers["x-moe-expert"]
    answer = raw.parse()
    # A replay expert answers with the real model's recorded text for this very prompt.
    assert answer.choices[0].message.content == row.answers[recorded[expert]].response
    # state.backend is redis: the answering expert's breaker and the answer kept for feedback by id live in the
    # profile's Redis container, not in the router's.
    keys = set(stack.run("exec", "-T", "redis", "redis-cli", "--scan", "--pattern", "moe:*").stdout.split())
    assert f"moe:feedback:answer:{answer.id}" in keys, sorted(keys)
    # the breaker is kept under the expert's name and its service identity (router.breaker.Breakers)
    assert any(k.startswith(f"moe:breaker:{expert}@") for k in keys), sorted(keys)

    # state.backend is redis, so feedback goes to the redis service, which keeps it in its append-only file on the
    # redis-data volume: a verdict survives new containers, and the new router still finds the answer by its id.
    verdict = httpx.post(f"{stack.url}/v1/feedback", json={"request_id": answer.id, "good": True}, timeout=30)
    assert verdict.status_code == 200, verdict.text
    # `down` then `up`: new containers, and no anonymous volume carried over (Docker Hub's redis image declares
    # VOLUME /data, which `up --force-recreate` would keep): only the named volume can hold the verdict.
    before = {service: stack.container(service) for service in ("redis", "router")}
    stack.run("down", timeout=300)
    stack.run("up", "-d", timeout=300)
    stack.wait_healthy("redis", "router")
    assert all(stack.container(service) not in ("", cid) for service, cid in before.items())
    kept = stack.run("exec", "-T", "redis", "redis-cli", "--raw", "zrange", "moe:feedback:verdicts", "0", "-1")
    assert [(r["request_id"], r["expert"], r["score"]) for r in map(json.loads, kept.stdout.split("\n")[:-1])] == \
        [(answer.id, expert, 1.0)]
    again = httpx.post(f"{stack.url}/v1/feedback", json={"request_id": answer.id, "score": 0.5}, timeout=30)
    assert again.status_code == 200 and again.json()["expert"] == expert, again.text
