"""The public names of each package and of the modules users import from, pinned: a name added or dropped is a
change of the API, made here on purpose, not by accident. Every listed name resolves."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

PUBLIC = {
    "router": ["AsyncClient", "ChatResult", "Client", "ConfigError", "LocalRouter", "RouterAPIError", "RouterConfig",
               "RouterConnectionError", "StreamChunk", "load_config"],
    "router.sdk": ["AsyncClient", "ChatResult", "Client", "FeedbackRecord", "LocalRouter", "RouterAPIError",
                   "RouterConnectionError", "StreamChunk"],
    "router.config": ["ApiKeyConfig", "BreakerConfig", "CombinerConfig", "ConfigError", "CostConfig", "EncoderConfig",
                      "ExpertConfig", "FallbackConfig", "FeedbackConfig", "GateConfig", "RateLimitConfig",
                      "ReplayConfig", "RouterConfig", "SecurityConfig", "ServiceConfig", "StateConfig", "TopKConfig",
                      "TracingConfig", "load_config", "parse_config"],
    "experts": ["EXPERT_TYPES", "ChatMessage", "ChatRequest", "Expert", "ExpertAuthError", "ExpertConfigError",
                "ExpertContext", "ExpertError", "ExpertHTTPError", "ExpertOverloaded", "ExpertProtocolError",
                "ExpertRateLimited", "ExpertRejected", "ExpertReply", "ExpertServerError", "ExpertTimeout",
                "ExpertUnavailable", "NoRecording", "StreamDelta", "Usage", "build_expert", "cost_of",
                "expert_class"],
    "router.requests": ["MAX_BATCH_QUERIES", "RequestProblem", "RouteBatch", "RouteQuery", "check_combiner",
                        "parse_chat", "parse_feedback", "parse_json", "parse_route", "parse_route_batch",
                        "parse_since"],
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


def test_the_package_root_is_the_sdk_s_own_names_and_loads_them_only_when_asked() -> None:
    import router
    import router.sdk

    assert router.Client is router.sdk.Client and router.LocalRouter is router.sdk.LocalRouter
    with pytest.raises(AttributeError, match="module 'router' has no attribute 'Nope'"):
        router.Nope  # noqa: B018
    # ``import router.config`` (what every command does first) does not pull in the SDK's HTTP client.
    probe = "import sys, router.config; print('router.sdk' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout == "False\n"
