"""The config's schema: typed, strict and bounded models, one per section of the YAML file (``RouterConfig`` is the
whole file). What one field cannot check alone, references between sections and the environment, is in
``router.config.checks``; reading a file, expanding its ``${VAR}`` references and reporting every problem at once,
in ``router.config.load``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from router.config.expert import (
    GENERATED_VLLM_FLAGS,
    CostConfig,
    ExpertConfig,
    ReplayConfig,
    VllmServeConfig,
    generated_vllm_flag,
)
from router.config.fields import (
    ENV_NAME_PATTERN,
    HTTP_URL_PATTERN,
    NAME_PATTERN,
    ROUTED_MODEL,
    ConfigError,
    ExampleText,
    Extractor,
    FilePath,
    Strict,
    path_problem,
)
from router.config.gate import CascadeConfig, EncoderConfig, GateConfig, TopKConfig
from router.config.policy import STRATEGIES, BreakerConfig, CombinerConfig, FallbackConfig
from router.config.service import (
    ApiKeyConfig,
    FeedbackConfig,
    RateLimitConfig,
    SecurityConfig,
    ServiceConfig,
    StateConfig,
    TracingConfig,
)

# The sections are in modules of their own (``fields``, ``expert``, ``gate``, ``policy``, ``service``); every name
# is imported from here.
__all__ = [
    "CROSS_CHECK",
    "ENV_NAME_PATTERN",
    "GENERATED_VLLM_FLAGS",
    "HTTP_URL_PATTERN",
    "NAME_PATTERN",
    "ROUTED_MODEL",
    "SCHEMA_VERSION",
    "STRATEGIES",
    "ApiKeyConfig",
    "BreakerConfig",
    "CascadeConfig",
    "CombinerConfig",
    "ConfigError",
    "CostConfig",
    "EncoderConfig",
    "ExampleText",
    "ExpertConfig",
    "Extractor",
    "FallbackConfig",
    "FeedbackConfig",
    "FilePath",
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
    "generated_vllm_flag",
    "path_problem",
]

SCHEMA_VERSION = 1


# The type of the error ``RouterConfig``'s cross-check raises, whose context holds its ``problems``.
CROSS_CHECK = "cross_check"


class RouterConfig(Strict):
    version: Literal[1]
    service: ServiceConfig = ServiceConfig()
    experts: list[ExpertConfig] = Field(min_length=1)
    gate: GateConfig = GateConfig()
    combiner: CombinerConfig = CombinerConfig()
    fallback: FallbackConfig = FallbackConfig()
    security: SecurityConfig = SecurityConfig()
    state: StateConfig = StateConfig()
    tracing: TracingConfig = TracingConfig()
    feedback: FeedbackConfig = FeedbackConfig()
    # The folder relative paths are resolved against; set by the loader, not by the file.
    base_dir: str = Field(default=".", exclude=True)

    @field_validator("version", mode="before")
    @classmethod
    def _version_as_written(cls, value: Any) -> Any:
        # "1" (quoted, or a ${VAR}, which expands to a string) is the number, as numbers elsewhere in the schema are.
        return 1 if isinstance(value, str) and value.strip() == "1" else value

    @model_validator(mode="after")
    def _cross_check(self, info: ValidationInfo) -> RouterConfig:
        blanked = (info.context or {}).get("blanked", frozenset())
        from router.config.checks import cross_problems  # here: the checks module imports this one

        quiet = (info.context or {}).get("quiet", frozenset())
        problems = list(cross_problems(self.model_dump(exclude={"base_dir"}), check_env=False, blanked=blanked,
                                       quiet=quiet))
        if problems:
            # The problems travel in the error's context too: the loader reports them one by one, each under its
            # path, beside those its own cross-check of the file as written found (``router.config.load``).
            raise PydanticCustomError(CROSS_CHECK, "{summary}", {
                "summary": "; ".join(f"{p}: {m}" for p, m in problems), "problems": problems})
        return self

    def expert(self, name: str) -> ExpertConfig:
        for expert in self.experts:
            if expert.name == name:
                return expert
        raise KeyError(name)

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.experts]

    @property
    def routed_experts(self) -> list[ExpertConfig]:
        """The experts the gate routes to (``routed``, the default), in config order."""
        return [e for e in self.experts if e.routed]

    def routed_examples(self) -> dict[str, list[str]]:
        """Each routed expert's examples: the experts a gate for this config scores (``Gate.for_experts``)."""
        return {e.name: list(e.examples) for e in self.routed_experts}

    def resolve(self, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() else (Path(self.base_dir) / p).resolve()

