"""The YAML config: a strict, versioned schema, cross-checked, with every problem reported at once.

Paths in the file are relative to the file's own folder. ``${VAR}`` and ``${VAR:-default}`` in string values
are expanded from the environment, so one file serves a laptop, CI and a compose deployment. Secrets are never
written in the file: an expert names the environment variable that holds its key (``api_key_env``).

Three layers, each depending only on those before it: ``schema`` (the models, one per section of the file, in
``fields``, ``expert``, ``gate``, ``policy`` and ``service``; ``schema`` holds the whole file's and imports the rest),
``checks`` (what the models cannot check field by field: references between sections, expert types, endpoints,
the environment) and ``load`` (the file read, its variables expanded, every problem gathered).
"""

from __future__ import annotations

from router.config.load import ENV_REF, env_references, load_config, parse_config
from router.config.schema import (
    ApiKeyConfig,
    BreakerConfig,
    CascadeConfig,
    CombinerConfig,
    ConfigError,
    CostConfig,
    EncoderConfig,
    ExpertConfig,
    FallbackConfig,
    FeedbackConfig,
    GateConfig,
    RateLimitConfig,
    ReplayConfig,
    RouterConfig,
    SecurityConfig,
    ServiceConfig,
    StateConfig,
    TopKConfig,
    TracingConfig,
    VllmServeConfig,
)

__all__ = [
    "ENV_REF",
    "ApiKeyConfig",
    "BreakerConfig",
    "CascadeConfig",
    "CombinerConfig",
    "ConfigError",
    "CostConfig",
    "EncoderConfig",
    "ExpertConfig",
    "FallbackConfig",
    "FeedbackConfig",
    "GateConfig",
    "RateLimitConfig",
    "ReplayConfig",
    "RouterConfig",
    "SecurityConfig",
    "ServiceConfig",
    "StateConfig",
    "TopKConfig",
    "TracingConfig",
    "VllmServeConfig",
    "env_references",
    "load_config",
    "parse_config",
]
