"""The CPU profile, docker-compose.cpu.yml, against configs/compose-cpu.yaml; and both profiles' shared rules."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from router.cli import main
from router.compose import (
    DATA_MOUNT,
    REDIS_SERVICE,
    ROUTER_SERVICE,
    container_config_path,
    dump_compose,
    service_name,
)
from router.config import load_config
from tests.unit.test_compose import COMPOSE_COMMAND

ROOT = Path(__file__).resolve().parents[2]
PROFILES = {"gpu": ("configs/compose.yaml", "docker-compose.yml"),
            "cpu": ("configs/compose-cpu.yaml", "docker-compose.cpu.yml")}


def _load(profile: str) -> tuple[Any, dict[str, Any]]:
    config_path, compose_path = PROFILES[profile]
    config = load_config(ROOT / config_path, check_env=False)
    return config, yaml.safe_load((ROOT / compose_path).read_text(encoding="utf-8"))


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_committed_file_is_what_moe_compose_prints(profile: str, capsys: pytest.CaptureFixture[str]) -> None:
    config_path, compose_path = PROFILES[profile]
    assert main(["compose", config_path]) == 0
    assert capsys.readouterr().out == (ROOT / compose_path).read_text(encoding="utf-8"), (
        f"{compose_path} is out of date; regenerate it: moe compose {config_path} > {compose_path}")


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_expert_that_needs_a_service_has_one_the_router_waits_for(profile: str) -> None:
    config, compose = _load(profile)
    services = compose["services"]
    router = services[ROUTER_SERVICE]
    needed = {service_name(e) for e in config.experts if e.type == "vllm"}
    if config.state.backend == "redis":
        needed.add(REDIS_SERVICE)
    assert set(services) == needed | {ROUTER_SERVICE}
    assert router["depends_on"] == {name: {"condition": "service_healthy"} for name in needed}
    for name, service in services.items():
        assert service["healthcheck"]["test"][0] == "CMD", name
    assert f"MOE_CONFIG={container_config_path(PROFILES[profile][0])}" in router["environment"]


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_router_is_given_its_request_deadline_to_drain_on_stop(profile: str) -> None:
    config, compose = _load(profile)
    grace = compose["services"][ROUTER_SERVICE].get("stop_grace_period")
    assert isinstance(grace, str) and grace.endswith("s") and grace[:-1].isdigit(), grace
    assert int(grace[:-1]) >= config.fallback.deadline_s + 10


def test_cpu_profile_runs_replay_experts_without_a_gpu() -> None:
    config, compose = _load("cpu")
    assert config.experts and all(e.type == "replay" for e in config.experts)
    assert "nvidia" not in yaml.safe_dump(compose) and "gpu" not in yaml.safe_dump(compose)
    router = compose["services"][ROUTER_SERVICE]
    assert DATA_MOUNT in router["volumes"] and "MOE_DATA_DIR=/data" in router["environment"]
    # The gate the config names is mounted where the config resolves it.
    assert "./artifacts/demo-gate:/app/artifacts/demo-gate:ro" in router["volumes"]
    assert f"{config.state.url_env}=${{{config.state.url_env}:-redis://redis:6379/0}}" in router["environment"]
    redis = compose["services"][REDIS_SERVICE]
    # Docker Hub's Redis unless MOE_REDIS_IMAGE names another; any plain redis-server needs protected mode off
    # to take the router's connections over the compose network.
    assert redis["image"] == "${MOE_REDIS_IMAGE:-redis:7.2-alpine}"
    assert redis["command"][-2:] == ["--protected-mode", "no"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    # Feedback is on and state.backend is redis, so the verdicts live in Redis (every replica's), which keeps an
    # append-only file in its own volume; the router keeps no SQLite store.
    assert config.feedback.enabled and config.state.backend == "redis"
    assert redis["command"][1:5] == ["--appendonly", "yes", "--dir", "/data"]
    assert redis["volumes"] == ["redis-data:/data"]
    assert not any(v.startswith("feedback:") for v in router["volumes"])
    assert compose["volumes"] == {"redis-data": {}}
    assert router["build"]["args"] == {"PYTHON_IMAGE": "${MOE_PYTHON_IMAGE:-python:3.11-slim}",
                                       "TORCH_INDEX_URL": "${MOE_TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}",
                                       "PIP_NO_INDEX": "${MOE_PIP_NO_INDEX:-0}"}


def test_cpu_config_serves_the_demo_experts() -> None:
    cpu = load_config(ROOT / "configs/compose-cpu.yaml", check_env=False)
    demo = load_config(ROOT / "configs/demo.yaml", check_env=False)
    assert cpu.experts == demo.experts and cpu.gate == demo.gate
    assert cpu.service.host == "0.0.0.0"


def test_dump_defaults_still_render_the_gpu_file() -> None:
    config, _ = _load("gpu")
    assert dump_compose(config) == (ROOT / "docker-compose.yml").read_text(encoding="utf-8")


@pytest.mark.skipif(COMPOSE_COMMAND is None, reason="neither the docker compose plugin nor docker-compose is here")
@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_docker_compose_accepts_both_profiles(profile: str) -> None:
    assert COMPOSE_COMMAND is not None
    result = subprocess.run([*COMPOSE_COMMAND, "-f", str(ROOT / PROFILES[profile][1]), "config", "--quiet"],
                            cwd=ROOT, capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stderr
