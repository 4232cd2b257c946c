"""The CPU profile's services as processes: what docker-compose.cpu.yml runs in containers, run without Docker so that
CI needs no engine (``tests/docker`` runs the same profile in containers, ``make docker-test``). A real
redis-server, then the router's own entrypoint command (``moe serve --config configs/compose-cpu.yaml``, as the
image runs it) over the demo's replay experts, with the environment the compose file gives it; a gate trained by
``moe train`` from that same config."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from eval.demo import held_out, write_training_file
from experts.recordings import load_routerbench
from router.config import load_config
from tests.support import moe_serve

ROOT = Path(__file__).resolve().parents[2]
MOE = [sys.executable, "-m", "router.cli"]


@pytest.fixture
def profile(tmp_path: Path, data_dir: Path, redis_url: str,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path, dict[str, str]]]:
    """The CPU profile's config in a folder laid out as in the repo, its gate trained, the router serving."""
    (tmp_path / "configs").mkdir()
    config_path = tmp_path / "configs" / "compose-cpu.yaml"
    shutil.copy(ROOT / "configs" / "compose-cpu.yaml", config_path)
    compose = yaml.safe_load((ROOT / "docker-compose.cpu.yml").read_text(encoding="utf-8"))
    router = compose["services"]["router"]
    assert "MOE_DATA_DIR=/data" in router["environment"]  # the container sees the data where this test says
    env = {**os.environ, "MOE_DATA_DIR": str(data_dir), "MOE_REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1"}
    monkeypatch.setenv("MOE_DATA_DIR", str(data_dir))  # this process reads the config too
    config = load_config(config_path, check_env=False)
    _, count = write_training_file(config, limit=40)  # a small gate: serving, not accuracy, is tested
    assert count == 40
    trained = subprocess.run([*MOE, "train", "--config", str(config_path), "--no-feedback"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=300, check=False)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert (tmp_path / "artifacts" / "demo-gate" / "gate.json").is_file()
    with moe_serve(config_path, tmp_path / "router.log", env=env, cwd=tmp_path, start_timeout_s=90) as url:
        yield url, tmp_path, env


def test_cpu_profile_serves_replay_experts_with_state_in_redis(profile: tuple[str, Path, dict[str, str]],
                                                               data_dir: Path, redis_url: str) -> None:
    url, _, _ = profile
    store = load_routerbench(data_dir / "routerdc" / "routerbench_zs")
    row = next(r for r in held_out(store) if r.task == "arc_challenge")
    reply = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": "auto", "messages": [{"role": "user", "content": row.prompt}]})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    expert = reply.headers["x-moe-expert"]
    config = yaml.safe_load((ROOT / "configs" / "compose-cpu.yaml").read_text(encoding="utf-8"))
    recorded = {e["name"]: e["model"] for e in config["experts"]}
    # A replay expert answers with the real model's recorded text for this very prompt.
    assert body["choices"][0]["message"]["content"] == row.answers[recorded[expert]].response
    assert body["moe"]["decision"]["chosen"][0]["expert"] == expert
    # state.backend is redis: the answering expert's breaker and the answer kept for feedback by id live in the
    # profile's Redis, not in this replica.
    keys = set(subprocess.run(["redis-cli", "-u", redis_url, "--scan", "--pattern", "moe:*"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.split())
    assert f"moe:feedback:answer:{body['id']}" in keys, sorted(keys)
    # the breaker is kept under the expert's name and its service identity (router.breaker.Breakers)
    assert [k for k in keys if k.startswith(f"moe:breaker:{expert}@")], sorted(keys)
    models = httpx.get(f"{url}/v1/models", timeout=10).json()
    assert {m["id"] for m in models["data"]} >= set(recorded)
