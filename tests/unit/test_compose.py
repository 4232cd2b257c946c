"""The committed docker-compose.yml against configs/compose.yaml, the config it is generated from."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from router.compose import (
    FEEDBACK_VOLUME,
    HF_CACHE_VOLUME,
    PYTHON_IMAGE,
    REDIS_VOLUME,
    ROUTER_SERVICE,
    TORCH_INDEX_URL,
    ComposeError,
    dump_compose,
    expected_endpoint,
    read_config,
    render_compose,
    service_name,
    vllm_args,
)
from router.config import ExpertConfig, RouterConfig, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]
CONFIG_PATH = ROOT / "configs" / "compose.yaml"
COMPOSE_PATH = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def config() -> RouterConfig:
    return load_config(CONFIG_PATH, check_env=False)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_PATH.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def vllm_experts(config: RouterConfig) -> list[ExpertConfig]:
    return [e for e in config.experts if e.type == "vllm"]


def flag_values(command: list[str], flag: str) -> list[str]:
    """The values after ``flag`` in an argv list, up to the next ``--option``."""
    start = command.index(flag) + 1
    values = []
    for arg in command[start:]:
        if arg.startswith("--"):
            break
        values.append(arg)
    return values


def config_with(*experts: dict[str, Any]) -> RouterConfig:
    # The gate artifact beside configs/, as in configs/compose.yaml: the default (artifacts/gate below the
    # config's folder) would put the feedback store in the read-only config mount, which rendering refuses.
    return parse_config({"version": 1, "gate": {"artifact": "../artifacts/gate"}, "experts": list(experts)},
                        check_env=False)


def vllm(name: str, endpoint: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": "vllm", "endpoint": endpoint, "model": f"org/{name}-7b", **extra}


# --- the committed file --------------------------------------------------------------------------------


def test_committed_file_is_exactly_what_the_config_renders(config: RouterConfig) -> None:
    committed = COMPOSE_PATH.read_text(encoding="utf-8")
    assert committed == dump_compose(config), (
        "docker-compose.yml is out of date with configs/compose.yaml; regenerate it with "
        "`moe compose configs/compose.yaml`"
    )


def test_committed_file_says_it_is_generated() -> None:
    first = COMPOSE_PATH.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("#") and "moe compose configs/compose.yaml" in first


def test_config_has_three_gpu_experts(config: RouterConfig) -> None:
    assert len(vllm_experts(config)) == 3
    assert config.gate.default_expert in config.expert_names
    for expert in config.experts:
        assert expert.description and len(expert.examples) >= 3
        assert expert.cost.output_per_1k > 0


def test_every_vllm_expert_has_its_own_service(config: RouterConfig, compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {service_name(e) for e in vllm_experts(config)} | {ROUTER_SERVICE}
    for expert in vllm_experts(config):
        # The router reaches the expert at its endpoint, so the host there must be the service.
        assert expert.endpoint == expected_endpoint(expert)
        assert re.fullmatch(r"http://([a-z0-9-]+):8000/v1", expert.endpoint or "")
        assert services[service_name(expert)]


def test_vllm_services_run_the_pinned_image_with_the_experts_model(
    config: RouterConfig, compose: dict[str, Any]
) -> None:
    for expert in vllm_experts(config):
        service = compose["services"][service_name(expert)]
        image, _, tag = service["image"].partition(":")
        assert image == "vllm/vllm-openai"
        assert re.fullmatch(r"v\d+\.\d+\.\d+(\.post\d+)?", tag), f"image must be pinned, got {tag!r}"
        command = service["command"]
        assert flag_values(command, "--model") == [expert.model]
        served = flag_values(command, "--served-model-name")
        # The first served name is the one vLLM reports; the model id is accepted too, because
        # the expert client sends ``model`` upstream.
        assert served[0] == expert.name
        assert expert.model in served
        assert flag_values(command, "--port") == ["8000"]


def test_vllm_services_reserve_a_gpu_and_share_the_model_cache(
    config: RouterConfig, compose: dict[str, Any]
) -> None:
    assert HF_CACHE_VOLUME in compose["volumes"]
    for expert in vllm_experts(config):
        service = compose["services"][service_name(expert)]
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
        assert f"{HF_CACHE_VOLUME}:/root/.cache/huggingface" in service["volumes"]
        assert "HF_TOKEN" in service["environment"]


def test_every_service_has_a_health_check(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD", name
        assert any("/health" in part for part in test), name


def test_router_waits_for_every_expert_to_be_healthy(config: RouterConfig, compose: dict[str, Any]) -> None:
    router = compose["services"][ROUTER_SERVICE]
    assert router["depends_on"] == {
        service_name(e): {"condition": "service_healthy"} for e in vllm_experts(config)
    }
    assert (ROOT / router["build"]["context"] / router["build"]["dockerfile"]).is_file()
    port = config.service.port
    # On the loopback address unless MOE_ROUTER_BIND says another: published ports pass host firewalls.
    assert router["ports"] == [f"${{MOE_ROUTER_BIND:-127.0.0.1}}:${{MOE_ROUTER_PORT:-{port}}}:{port}"]
    assert f"localhost:{port}/health" in " ".join(router["healthcheck"]["test"])


def test_router_reads_the_config_it_was_rendered_from(compose: dict[str, Any]) -> None:
    router = compose["services"][ROUTER_SERVICE]
    assert "MOE_CONFIG=/app/configs/compose.yaml" in router["environment"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in router["volumes"]}
    # /app mirrors the repo, so the mounted folder holds the very file the compose came from.
    assert (ROOT / mounts["/app/configs"] / "compose.yaml").samefile(CONFIG_PATH)
    assert mounts["/app/artifacts/gate"] == "./artifacts/gate"


def test_a_config_at_the_repository_root_is_mounted_with_its_gate_and_one_outside_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A config at the root got no mount at all (its folder is /app, which is not mounted over the image), so the
    container had no gate and would not start; a config outside the repository was refused for its feedback.path,
    which it never set."""
    from router.cli import main

    repo = tmp_path / "repo"
    (repo / "sub").mkdir(parents=True)
    config = repo / "router.yaml"
    config.write_text("version: 1\nexperts:\n  - {name: a, type: openai, endpoint: 'http://10.0.0.5:8000/v1', "
                      "model: m, examples: [hi]}\ngate: {artifact: artifacts/gate}\n", encoding="utf-8")
    monkeypatch.chdir(repo)
    assert main(["compose", "router.yaml"]) == 0
    router = yaml.safe_load(capsys.readouterr().out)["services"][ROUTER_SERVICE]
    assert "MOE_CONFIG=/app/router.yaml" in router["environment"]
    assert router["volumes"][:2] == ["./router.yaml:/app/router.yaml:ro", "./artifacts/gate:/app/artifacts/gate:ro"]
    monkeypatch.chdir(repo / "sub")
    assert main(["compose", "../router.yaml"]) == 2
    err = capsys.readouterr().err
    assert f"the config is outside {repo / 'sub'}, the repository the router image is built from" in err
    # Through a link to the repository ($PWD), an absolute path is inside it; a config linking out of it is not.
    (tmp_path / "link").symlink_to(repo)
    monkeypatch.chdir(tmp_path / "link")
    assert main(["compose", str(tmp_path / "link" / "router.yaml")]) == 0
    capsys.readouterr()
    (tmp_path / "elsewhere.yaml").write_text(config.read_text(encoding="utf-8"), encoding="utf-8")
    (repo / "sub" / "out.yaml").symlink_to(tmp_path / "elsewhere.yaml")
    assert main(["compose", "sub/out.yaml"]) == 2
    assert "the config is outside" in capsys.readouterr().err
    monkeypatch.chdir(repo)
    config.write_text(config.read_text(encoding="utf-8").replace("artifacts/gate", "../gate"), encoding="utf-8")
    assert main(["compose", "router.yaml"]) == 2
    assert "gate.artifact: is /gate in the router container, outside /app" in capsys.readouterr().err


def test_dockerfile_installs_cpu_torch_first_and_serves_the_config() -> None:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    # The base is an argument whose default is the one the compose files pass when MOE_PYTHON_IMAGE is unset.
    assert re.search(rf"^ARG PYTHON_IMAGE={re.escape(PYTHON_IMAGE)}$", text, re.M)
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\} AS base$", text, re.M)
    assert re.search(rf"^ARG TORCH_INDEX_URL={re.escape(TORCH_INDEX_URL)}$", text, re.M)
    torch = text.index('pip install --index-url "$TORCH_INDEX_URL" torch==2.13.0')
    assert torch < text.index("pip install .")
    # No BuildKit frontend image to pull (a `# syntax=` line) and no heredoc, which only that frontend parses:
    # an offline host's classic builder must build it.
    assert "# syntax=" not in text and "<<" not in text
    assert "RUN python3 deploy/docker/check_encoders.py" in text
    assert (ROOT / "deploy/docker/check_encoders.py").is_file()
    # The wheels stay in the build stage; the served image copies the installed environment.
    final = text[text.rindex("\nFROM "):]
    assert "wheelhouse" not in final and "COPY --from=build /opt/moe /opt/moe" in final
    assert "moe serve --config" in text and "--host 0.0.0.0" in text
    assert (ROOT / ".dockerignore").is_file() and (ROOT / "wheelhouse").is_dir()
    # A deployer's .env (compose's ${VAR} values: an HF token, API keys) never reaches the image nor a commit:
    # the build context is the repository, and COPY . . would take it.
    for ignore in (".dockerignore", ".gitignore"):
        assert {".env", ".env.*"} <= set((ROOT / ignore).read_text(encoding="utf-8").split()), ignore


# --- rendering ------------------------------------------------------------------------------------------


def test_endpoint_host_that_is_not_the_service_fails_clearly() -> None:
    config = config_with(vllm("coder", "http://localhost:8000/v1"))
    with pytest.raises(ComposeError) as info:
        render_compose(config)
    message = str(info.value)
    assert "experts[0] (coder).endpoint" in message
    assert "'localhost'" in message and "'coder'" in message
    assert "http://coder:8000/v1" in message


def test_an_endpoints_credentials_are_not_repeated_in_its_problem() -> None:
    """``moe config check`` never repeats a URL's user information; the compose check printed the endpoint whole,
    with a ``${VAR}`` password already expanded."""
    config = config_with(vllm("coder", "http://admin:TopSecretPW123@coder:9000/v1"))
    with pytest.raises(ComposeError) as info:
        render_compose(config)
    message = str(info.value)
    assert "TopSecretPW123" not in message and "admin" not in message
    assert "experts[0] (coder).endpoint" in message and "http://coder:8000/v1" in message


def test_an_in_process_nested_router_is_refused_with_the_way_to_deploy_one(tmp_path: Path) -> None:
    """Its config's experts, gate and variables would be missing from the router container: refused, pointing at
    the endpoint form. A nested router reached over HTTP is an endpoint like any other."""
    (tmp_path / "inner.yaml").write_text("version: 1\nexperts:\n  - {name: inner, type: vllm, "
                                         "endpoint: 'http://inner:8000/v1', model: m}\n")
    nested = {"name": "team", "type": "router", "model": "auto", "router_config": "inner.yaml"}
    config = parse_config({"version": 1, "gate": {"artifact": "../artifacts/gate"},
                           "experts": [vllm("coder", "http://coder:8000/v1"), nested]},
                          base_dir=tmp_path, check_env=False)
    with pytest.raises(ComposeError) as info:
        render_compose(config)
    assert [path for path, _ in info.value.problems] == ["experts[1] (team).router_config"]
    assert "run the inner router as a service of its own and give this expert its endpoint" in str(info.value)
    served = {"name": "team", "type": "router", "model": "auto", "endpoint": "http://team-router:8080/v1"}
    assert "team" not in render_compose(config_with(vllm("coder", "http://coder:8000/v1"), served))["services"]


def test_every_bad_endpoint_is_reported_at_once() -> None:
    config = config_with(
        vllm("coder", "http://vllm-coder:8000/v1"),
        vllm("math", "http://math:9000/v1"),
        vllm("chat", "http://chat:8000/v1"),
    )
    with pytest.raises(ComposeError) as info:
        render_compose(config)
    paths = [path for path, _ in info.value.problems]
    assert paths == ["experts[0] (coder).endpoint", "experts[1] (math).endpoint"]
    assert "port 8000" in info.value.problems[1][1]


def test_names_that_collide_as_services_are_refused() -> None:
    config = config_with(
        vllm("Coder", "http://coder:8000/v1"),
        vllm("coder", "http://coder:8000/v1"),
        vllm("router", "http://router:8000/v1"),
    )
    with pytest.raises(ComposeError) as info:
        render_compose(config)
    messages = " ".join(msg for _, msg in info.value.problems)
    assert "same compose service 'coder'" in messages and "'router'" in messages


def test_a_name_too_long_for_a_host_name_gets_a_short_service_of_its_own() -> None:
    """An expert name may hold 128 characters, a DNS label 63: compose made the whole name the service (so the host
    the endpoint must name), which no resolver can look up. It keeps the start and a digest of the whole name."""
    long, twin = "org/" + "a" * 80 + "-math", "org/" + "a" * 80 + "-code"
    first, second = (service_name(ExpertConfig(name=n, type="vllm", model="m", endpoint="http://x:8000/v1"))
                     for n in (long, twin))
    assert len(first) == len(second) == 63 and first != second and first.startswith("org-aaaa")
    config = config_with(vllm(long, f"http://{first}:8000/v1"), vllm(twin, f"http://{second}:8000/v1"))
    assert set(render_compose(config)["services"]) == {first, second, ROUTER_SERVICE}


def test_a_tool_expert_starts_vllm_with_its_tool_call_parser(config: RouterConfig, compose: dict[str, Any]) -> None:
    tool_experts = [e for e in vllm_experts(config) if "tools" in e.capabilities]
    assert tool_experts, "configs/compose.yaml should keep an expert that takes tool calls"
    for expert in vllm_experts(config):
        command = compose["services"][service_name(expert)]["command"]
        if expert in tool_experts:
            assert "--enable-auto-tool-choice" in command
            assert flag_values(command, "--tool-call-parser") == [expert.vllm.tool_call_parser]  # type: ignore[union-attr]
        else:
            assert "--enable-auto-tool-choice" not in command and "--tool-call-parser" not in command


def test_a_tool_expert_without_a_parser_is_refused_by_name() -> None:
    config = config_with(vllm("chat", "http://chat:8000/v1", capabilities=["chat", "tools"]),
                         vllm("coder", "http://coder:8000/v1"))
    with pytest.raises(ComposeError) as info:
        render_compose(config)
    assert [path for path, _ in info.value.problems] == ["experts[0] (chat).vllm.tool_call_parser"]
    assert "--enable-auto-tool-choice" in info.value.problems[0][1] and "hermes" in info.value.problems[0][1]


def test_further_vllm_flags_follow_the_generated_ones() -> None:
    config = config_with(vllm("chat", "http://chat:8000/v1", capabilities=["chat", "tools"],
                              vllm={"tool_call_parser": "hermes", "args": ["--max-model-len", "16384"]}))
    command = render_compose(config)["services"]["chat"]["command"]
    assert command[-5:] == ["--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--max-model-len", "16384"]
    assert vllm_args(config.experts[0], "0.5", config.fallback.deadline_s) == [
        *command[:-7], "--gpu-memory-utilization", "0.5", *command[-5:]]


def test_vllm_block_is_checked_when_the_config_loads() -> None:
    from router.config import ConfigError

    with pytest.raises(ConfigError, match=r"--tool-call-parser is set by the generator.*set vllm.tool_call_parser"):
        config_with(vllm("chat", "http://chat:8000/v1", vllm={"args": ["--tool-call-parser=hermes"]}))
    with pytest.raises(ConfigError, match=r"--port is set by the generator"):
        config_with(vllm("chat", "http://chat:8000/v1", vllm={"args": ["--port", "9000"]}))
    with pytest.raises(ConfigError, match=r"--enable-auto-tool-choice is set by the generator"):
        config_with(vllm("chat", "http://chat:8000/v1", vllm={"args": ["--enable_auto_tool_choice"]}))
    # Another name vLLM reads as a generated flag: an alias, a --no- form, an abbreviation (argparse takes any
    # unambiguous start of a flag).
    for arg, read in (("--device-memory-utilization", "--gpu-memory-utilization"),
                      ("--no-enable-auto-tool-choice", "--enable-auto-tool-choice"),
                      ("--served-model=other", "--served-model-name"), ("--shutdown-time", "--shutdown-timeout"),
                      ("--gpu_memory", "--gpu-memory-utilization")):
        written = arg.split("=")[0].replace("_", "-")
        with pytest.raises(ConfigError, match=rf"{written} \(vLLM reads it as {read}\) is set by the generator"):
            config_with(vllm("chat", "http://chat:8000/v1", vllm={"args": [arg, "1"]}))
    config_with(vllm("chat", "http://chat:8000/v1", vllm={"args": ["--max-model-len", "16384", "-tp", "2"]}))
    with pytest.raises(ConfigError, match=r"vllm: only a type: vllm expert.*'openai'"):
        config_with({"name": "gpt", "type": "openai", "endpoint": "https://api.openai.com/v1", "model": "gpt-4o",
                     "vllm": {"tool_call_parser": "hermes"}})
    with pytest.raises(ConfigError, match="tool_call_parser"):
        config_with(vllm("chat", "http://chat:8000/v1", vllm={"tool_call_parser": "hermes; rm -rf /"}))
    # A parser on an expert that does not declare tools is kept out of its command: the router never sends it any.
    quiet = config_with(vllm("chat", "http://chat:8000/v1", vllm={"tool_call_parser": "hermes"}))
    assert "--tool-call-parser" not in render_compose(quiet)["services"]["chat"]["command"]


def test_hosted_experts_get_no_service_but_their_key_reaches_the_router() -> None:
    config = config_with(
        vllm("Qwen2.5-Coder@7B", "http://qwen2-5-coder-7b:8000/v1", api_key_env="CODER_KEY"),
        {"name": "gpt", "type": "openai", "endpoint": "https://api.openai.com/v1", "model": "gpt-4o-mini",
         "api_key_env": "OPENAI_API_KEY"},
    )
    compose = render_compose(config)
    assert set(compose["services"]) == {"qwen2-5-coder-7b", ROUTER_SERVICE}
    router = compose["services"][ROUTER_SERVICE]
    assert {"CODER_KEY", "OPENAI_API_KEY"} <= set(router["environment"])
    assert "VLLM_API_KEY=${CODER_KEY:-}" in compose["services"]["qwen2-5-coder-7b"]["environment"]


def test_the_client_and_admin_key_variables_reach_the_router() -> None:
    """README says to give the config security.api_keys_env before publishing the port beyond the host; the
    generated file passed only the experts' keys, so the router refused to start ("MOE_API_KEYS is not set") and
    restarted for ever. Passed bare, as the experts' keys are: compose reads each from the shell or .env."""
    raw = {"version": 1, "gate": {"artifact": "../artifacts/gate"},
           "security": {"api_keys_env": "MOE_API_KEYS", "admin_key_env": "MOE_ADMIN_KEY"},
           "experts": [vllm("chat", "http://chat:8000/v1", api_key_env="CHAT_KEY")]}
    environment = render_compose(parse_config(raw, check_env=False))["services"][ROUTER_SERVICE]["environment"]
    assert {"MOE_API_KEYS", "MOE_ADMIN_KEY", "CHAT_KEY"} <= set(environment)
    assert not any(e.startswith(("MOE_API_KEYS=", "MOE_ADMIN_KEY=")) for e in environment)  # no value in the file


def test_experts_default_to_separate_gpus(config: RouterConfig) -> None:
    compose = render_compose(config)
    ids = [s["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"][0]
           for name, s in compose["services"].items() if name != ROUTER_SERVICE]
    assert [i.rsplit(":-", 1)[1].rstrip("}") for i in ids] == ["0", "1", "2"]


def stop_grace_s(service: dict[str, Any]) -> int:
    """A service's stop_grace_period in seconds (the generator writes whole seconds, ``<N>s``)."""
    grace = service.get("stop_grace_period")
    assert isinstance(grace, str) and re.fullmatch(r"\d+s", grace), f"stop_grace_period {grace!r}"
    return int(grace[:-1])


@pytest.mark.parametrize("deadline_s", [5.0, 45.5, 180, 900])
def test_router_stop_grace_period_follows_the_request_deadline(deadline_s: float) -> None:
    # Docker's default 10 s would SIGKILL the router while it drains requests that may each run to the deadline.
    config = parse_config({"version": 1, "gate": {"artifact": "../artifacts/gate"},
                           "fallback": {"deadline_s": deadline_s},
                           "experts": [vllm("coder", "http://coder:8000/v1")]}, check_env=False)
    grace = stop_grace_s(render_compose(config)["services"][ROUTER_SERVICE])
    # A request may still be sending its body (service.body_timeout_s, 30 s) when SIGTERM comes, then run to its
    # deadline, then write its last bytes to a slow client (a tenth of the deadline).
    longest = config.service.body_timeout_s + deadline_s + max(1.0, 0.1 * deadline_s)
    assert longest + 10 <= grace <= longest + 60


@pytest.mark.parametrize("timeout_s", [10.0, 120.0, 299.5])
def test_vllm_servers_drain_a_generation_as_long_as_the_router_waits_for_one(timeout_s: float) -> None:
    # vLLM aborts what is generating at SIGTERM unless --shutdown-timeout says how long to drain; Docker would
    # SIGKILL it after 10 s (its default stop_grace_period) anyway.
    # A stream only waits timeout_s between chunks, and runs to the request's deadline (120 s by default): the
    # drain covers whichever is longer.
    config = parse_config({"version": 1, "gate": {"artifact": "../artifacts/gate"},
                           "experts": [vllm("coder", "http://coder:8000/v1", timeout_s=timeout_s)]}, check_env=False)
    service = render_compose(config)["services"]["coder"]
    command = service["command"]
    drain = int(command[command.index("--shutdown-timeout") + 1])
    longest = max(timeout_s, config.fallback.deadline_s)
    assert longest <= drain < longest + 1
    assert drain + 10 <= stop_grace_s(service) <= drain + 60


# --- docker compose itself ------------------------------------------------------------------------------


def _compose_command() -> list[str] | None:
    """``docker compose`` (the v2 plugin), else the standalone ``docker-compose``, else None."""
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, check=False)
        if probe.returncode == 0:
            return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    return [standalone] if standalone is not None else None


COMPOSE_COMMAND = _compose_command()


@pytest.mark.skipif(COMPOSE_COMMAND is None, reason="neither the docker compose plugin nor docker-compose is here")
def test_docker_compose_accepts_the_file() -> None:
    assert COMPOSE_COMMAND is not None
    result = subprocess.run(
        [*COMPOSE_COMMAND, "-f", str(COMPOSE_PATH), "config", "--quiet"],
        cwd=ROOT, capture_output=True, text=True, check=False, timeout=60,
    )
    assert result.returncode == 0, result.stderr


# --- the feedback store ---------------------------------------------------------------------------------


def _with_feedback(feedback: dict[str, Any], artifact: str = "../artifacts/gate",
                   backend: str = "memory") -> RouterConfig:
    return parse_config({"version": 1, "gate": {"artifact": artifact}, "feedback": feedback,
                         "state": {"backend": backend}, "experts": [vllm("coder", "http://coder:8000/v1")]},
                        check_env=False)


def test_feedback_store_gets_a_named_volume_on_the_writable_folder() -> None:
    compose = render_compose(_with_feedback({"enabled": True}))
    assert f"{FEEDBACK_VOLUME}:/app/artifacts" in compose["services"][ROUTER_SERVICE]["volumes"]
    assert FEEDBACK_VOLUME in compose["volumes"]
    # feedback.path resolves against the config's folder, as the loader resolves it; any folder below
    # /app/artifacts is in the volume (the router creates it there, as the volume's owner).
    compose = render_compose(_with_feedback({"enabled": True, "path": "../artifacts/feedback/verdicts.sqlite3"}))
    assert f"{FEEDBACK_VOLUME}:/app/artifacts" in compose["services"][ROUTER_SERVICE]["volumes"]
    off = render_compose(_with_feedback({"enabled": False}))
    assert not any(v.startswith(f"{FEEDBACK_VOLUME}:") for v in off["services"][ROUTER_SERVICE]["volumes"])
    assert FEEDBACK_VOLUME not in off.get("volumes", {})


@pytest.mark.parametrize(("path", "says"), [
    ("feedback.sqlite3", "only below /app/artifacts"),  # the read-only config mount
    ("../feedback/feedback.sqlite3", "only below /app/artifacts"),  # a folder the image never made writable
    ("../feedback.sqlite3", "only below /app/artifacts"),  # /app itself
    ("../artifacts/gate/feedback.sqlite3", "inside gate.artifact"),  # the read-only gate mount
])
def test_feedback_store_where_the_router_cannot_write_is_refused(path: str, says: str) -> None:
    with pytest.raises(ComposeError) as info:
        render_compose(_with_feedback({"enabled": True, "path": path}))
    assert "feedback.path" in str(info.value) and says in str(info.value)
    render_compose(_with_feedback({"enabled": False, "path": path}))  # no store, nothing to refuse


def test_feedback_in_redis_makes_redis_durable_and_needs_no_sqlite_volume() -> None:
    compose = render_compose(_with_feedback({"enabled": True}, backend="redis"))
    redis = compose["services"]["redis"]
    assert redis["command"][1:5] == ["--appendonly", "yes", "--dir", "/data"]
    assert redis["volumes"] == [f"{REDIS_VOLUME}:/data"]
    assert compose["volumes"] == {HF_CACHE_VOLUME: {}, REDIS_VOLUME: {}}
    assert not any(v.startswith(f"{FEEDBACK_VOLUME}:") for v in compose["services"][ROUTER_SERVICE]["volumes"])
    # No SQLite store, so a feedback.path inside the read-only config mount is no problem here.
    render_compose(_with_feedback({"enabled": True, "path": "feedback.sqlite3"}, backend="redis"))
    # Without feedback, Redis holds only soft state and persists nothing.
    soft = render_compose(_with_feedback({"enabled": False}, backend="redis"))["services"]["redis"]
    assert soft["command"][1:5] == ["--save", "", "--appendonly", "no"] and "volumes" not in soft




# --- variables: kept as references, never this shell's values -----------------------------------------------

SECRET = "hf_SECRETTOKEN123"

# An expert whose vLLM flags carry a token, a hosted expert whose endpoint comes from the environment, and the
# places the loader never expands (free text, a *_env name, the $${...} escape), whose ${...} no one needs.
VARIABLES_CONFIG = """\
version: 1
service: {port: "${ROUTER_PORT:-8080}"}
feedback: {enabled: false}
gate: {artifact: ../artifacts/gate}
experts:
  - name: coder
    type: vllm
    endpoint: http://coder:8000/v1
    model: ${CODER_MODEL:-org/coder-7b}
    api_key_env: CODER_KEY
    vllm: {args: ["--hf-token", "${HF_TOKEN}", "--chat-template", "$${TEMPLATE} costs $5"]}
    description: shell variables like ${HOME}
    examples: ["expand ${PATH} for me"]
  - name: gpt
    type: openai
    endpoint: ${GPT_BASE_URL}
    model: gpt-4o-mini
    api_key_env: OPENAI_API_KEY
  - name: proxy
    type: openai
    endpoint: ${PROXY_URL:-https://proxy.example.com/v1}
    model: gpt-4o
"""


@pytest.fixture
def variables_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("ROUTER_PORT", "CODER_MODEL", "PROXY_URL", "HOME", "PATH", "TEMPLATE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GPT_BASE_URL", "https://api.openai.com/v1")
    path = tmp_path / "configs" / "c.yaml"
    path.parent.mkdir()
    path.write_text(VARIABLES_CONFIG, encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # the repository moe compose runs in
    return path


def moe_compose(path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    from router.cli import main

    assert main(["compose", str(path)]) == 0
    return capsys.readouterr().out


def test_a_secret_in_the_environment_never_reaches_the_file(
    variables_config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("CODER_KEY", "sk-coder-xyz")
    text = moe_compose(variables_config, capsys)
    assert SECRET not in text and "sk-coder-xyz" not in text and "api.openai.com" not in text
    command = yaml.safe_load(text)["services"]["coder"]["command"]
    assert flag_values(command, "--hf-token") == ["${HF_TOKEN}"]


def test_an_unset_variable_stays_a_reference_with_the_loaders_meaning(
    variables_config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    services = yaml.safe_load(moe_compose(variables_config, capsys))["services"]
    command = services["coder"]["command"]
    assert flag_values(command, "--hf-token") == ["${HF_TOKEN}"]  # not ''
    assert flag_values(command, "--model") == ["${CODER_MODEL:-org/coder-7b}"]
    assert flag_values(command, "--served-model-name") == ["coder", "${CODER_MODEL:-org/coder-7b}"]
    # Compose reads $$ as a literal $, as the loader reads $${...} as a literal ${...} and leaves a bare $ alone.
    assert flag_values(command, "--chat-template") == ["$${TEMPLATE} costs $$5"]
    router = services[ROUTER_SERVICE]
    assert router["ports"] == ["${MOE_ROUTER_BIND:-127.0.0.1}:${MOE_ROUTER_PORT:-8080}:${ROUTER_PORT:-8080}"]
    assert "localhost:${ROUTER_PORT:-8080}/health" in router["healthcheck"]["test"][-1]


def test_every_variable_the_routers_config_references_reaches_its_environment(
    variables_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    router = yaml.safe_load(moe_compose(variables_config, capsys))["services"][ROUTER_SERVICE]
    # A reference without a default is passed as one (compose warns while it is unset), one with a default
    # blank-if-unset (the config's default then holds); keys stay the plain names they were.
    assert router["environment"] == [
        "MOE_CONFIG=/app/configs/c.yaml", "CODER_KEY", "OPENAI_API_KEY",
        "CODER_MODEL=${CODER_MODEL:-}", "GPT_BASE_URL=${GPT_BASE_URL}", "HF_TOKEN=${HF_TOKEN}",
        "PROXY_URL=${PROXY_URL:-}", "ROUTER_PORT=${ROUTER_PORT:-}",
    ]


def test_a_variable_compose_sets_itself_is_not_passed_again() -> None:
    config, written = read_config(ROOT / "configs" / "compose-cpu.yaml")
    environment = render_compose(config, written=written)["services"][ROUTER_SERVICE]["environment"]
    # The replay paths read ${MOE_DATA_DIR:-...}: inside, that is the mount, not the host's folder.
    assert [e for e in environment if e.startswith("MOE_DATA_DIR")] == ["MOE_DATA_DIR=/data"]


def test_a_config_built_in_code_is_copied_literally() -> None:
    config = config_with(vllm("chat", "http://chat:8000/v1", vllm={"args": ["--chat-template", "$${X} $y"]}))
    assert flag_values(render_compose(config)["services"]["chat"]["command"], "--chat-template") == ["$${X} $$y"]
