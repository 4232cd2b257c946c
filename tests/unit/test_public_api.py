"""The public names of each package and of the modules users import from, pinned: a name added or dropped is a
change of the API, made here on purpose, not by accident. Every listed name resolves."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

PUBLIC = {
    "router": ["AsyncClient", "ChatResult", "Client", "ConfigError", "FeedbackRecord", "LocalRouter", "RouterAPIError",
               "RouterConfig", "RouterConnectionError", "StreamChunk", "load_config"],
    "router.sdk": ["AsyncClient", "ChatResult", "Client", "FeedbackRecord", "LocalRouter", "RouterAPIError",
                   "RouterConnectionError", "StreamChunk"],
    "router.config": ["ENV_REF", "ApiKeyConfig", "BreakerConfig", "CascadeConfig", "CombinerConfig", "ConfigError",
                      "CostConfig", "EncoderConfig", "ExpertConfig", "FallbackConfig", "FeedbackConfig", "GateConfig",
                      "RateLimitConfig", "ReplayConfig", "RouterConfig", "SecurityConfig", "ServiceConfig",
                      "StateConfig", "TopKConfig", "TracingConfig", "VllmServeConfig", "env_references",
                      "load_config", "parse_config"],
    "experts": ["EXPERT_TYPES", "ChatMessage", "ChatRequest", "CostSpec", "Expert", "ExpertAuthError",
                "ExpertConfigError", "ExpertContext", "ExpertError", "ExpertHTTPError", "ExpertOverloaded",
                "ExpertProtocolError", "ExpertRateLimited", "ExpertRejected", "ExpertReply", "ExpertServerError",
                "ExpertSpec", "ExpertTimeout", "ExpertUnavailable", "NoRecording", "ReplaySpec", "StreamDelta",
                "Usage", "build_expert", "cost_of", "expert_class"],
    "router.requests": ["FEEDBACK_FAILURES", "MAX_BATCH_QUERIES", "RequestProblem", "RouteBatch", "RouteQuery",
                        "check_combiner", "feedback_off", "feedback_problem", "json_body", "parse_chat",
                        "parse_feedback", "parse_json", "parse_route", "parse_route_batch", "parse_since"],
    "router.service": ["RequestProblem", "RouteBatch", "RouteQuery", "check_combiner", "create_app", "error_body",
                       "parse_chat", "parse_route", "parse_route_batch"],
    "eval.metrics": ["ConfidenceInterval", "OracleResult", "ReliabilityBins", "accuracy", "aiq", "aiq_routerbench",
                     "apgr", "auroc", "bootstrap_ci", "cheapest_correct_oracle", "confusion_matrix", "cpt",
                     "expected_calibration_error", "macro_f1", "oracle_accuracy", "per_class_precision_recall",
                     "per_expert_accuracy", "quality_cost_hull", "reliability_bins", "routed_accuracy",
                     "routed_cost", "strong_call_curve", "topk_recall"],
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_the_public_names_are_pinned_and_resolve(module: str) -> None:
    imported = importlib.import_module(module)
    assert sorted(imported.__all__) == sorted(PUBLIC[module])
    for name in imported.__all__:
        assert getattr(imported, name) is not None, name


def test_the_package_root_holds_every_name_of_the_sdk() -> None:
    """What a user of ``router.Client`` meets (``Client.feedback`` gives a ``FeedbackRecord``) is importable from
    where ``Client`` is."""
    import router
    import router.sdk

    assert set(router.sdk.__all__) <= set(router.__all__)


def test_the_package_root_is_the_sdk_s_own_names_and_loads_them_only_when_asked() -> None:
    import router
    import router.sdk

    assert router.Client is router.sdk.Client and router.LocalRouter is router.sdk.LocalRouter
    with pytest.raises(AttributeError, match="module 'router' has no attribute 'Nope'"):
        router.Nope  # noqa: B018
    # ``import router.config`` (what every command does first) does not pull in the SDK's HTTP client.
    probe = "import sys, router.config; print('router.sdk' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout == "False\n"


def _imported_packages(package: str) -> dict[str, set[str]]:
    """Per source file of ``package``: the top-level packages it imports (``import x``, ``from x import``),
    type-only imports included, read from the syntax tree."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / package
    found: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name.partition(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.partition(".")[0])
        found[str(path.relative_to(root.parent))] = names
    return found


# The one exception: ``moe`` is the product's command line, and its ``eval``, ``convert`` and ``demo`` commands
# hand over to ``eval`` by name (``router.cli._delegate``), imported only when one of them runs.
_EDGE = {"router/cli.py": {"eval"}}


@pytest.mark.parametrize(("package", "below"), [("experts", {"router", "eval", "bench"}),
                                               ("router", {"eval", "bench"})])
def test_dependencies_run_one_way(package: str, below: set[str]) -> None:
    """experts <- router <- eval: ``experts`` knows nothing of routing, and nothing in the product imports the
    evaluation or the benchmarks, nor names one of their modules in a string (a lazy import path)."""
    from pathlib import Path

    imports = _imported_packages(package)
    assert len(imports) > 5, imports  # the walk found the package's files
    root = Path(__file__).resolve().parents[2]
    upward = {}
    for file, names in imports.items():
        text = (root / file).read_text(encoding="utf-8")
        named = {b for b in below if f'"{b}.' in text}
        found = ((names & below) | named) - _EDGE.get(file, set())
        if found:
            upward[file] = sorted(found)
    assert upward == {}


def test_the_router_s_expert_types_extend_the_experts_own() -> None:
    import experts
    from router.expert_types import EXPERT_TYPES

    assert "router" not in experts.EXPERT_TYPES
    assert {k: v for k, v in EXPERT_TYPES.items() if k != "router"} == dict(experts.EXPERT_TYPES)
    assert EXPERT_TYPES["router"] == "router.hierarchy:RouterExpert"
    with pytest.raises(experts.ExpertConfigError, match="unknown expert type; known: openai, replay, vllm"):
        experts.expert_class("router")
    from router.hierarchy import RouterExpert

    assert experts.expert_class("router", EXPERT_TYPES) is RouterExpert
