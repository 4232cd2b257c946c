"""An expert's section (``experts[]``): its endpoint, model, cost, replay source and the vLLM it may be served by."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Literal

from pydantic import (
    Field,
    model_validator,
)

from router.config.fields import (
    ENV_NAME_PATTERN,
    HTTP_URL_PATTERN,
    NAME_PATTERN,
    ExampleText,
    Extractor,
    FilePath,
    Strict,
)


class CostConfig(Strict):
    """USD per 1,000 tokens."""

    input_per_1k: float = Field(default=0.0, ge=0.0, le=1000.0)
    output_per_1k: float = Field(default=0.0, ge=0.0, le=1000.0)


class ReplayConfig(Strict):
    """Where a replay expert finds its recordings, and which recorded model it plays."""

    source: Literal["routerbench", "mmlu_pro"]
    path: FilePath
    # The recorded model's column in the source; defaults to the expert's ``model``.
    column: str | None = None
    # Simulated service time per call, so replayed latencies look like a model's, not a dict lookup.
    latency_ms: float = Field(default=0.0, ge=0.0, le=60_000.0)


# The vLLM flags ``router.compose`` derives from an expert's config.
GENERATED_VLLM_FLAGS = frozenset({"--model", "--served-model-name", "--port", "--gpu-memory-utilization",
                                  "--enable-auto-tool-choice", "--tool-call-parser", "--shutdown-timeout"})


# Other names vLLM 0.32's parser reads as one of them (its option strings for those destinations).
_VLLM_FLAG_ALIASES = {"--device-memory-utilization": "--gpu-memory-utilization",
                      "--no-enable-auto-tool-choice": "--enable-auto-tool-choice"}


# Every name of a generated flag -> that flag, in name order (the first a flag abbreviates wins).
_VLLM_FLAG_NAMES = dict(sorted({**{g: g for g in GENERATED_VLLM_FLAGS}, **_VLLM_FLAG_ALIASES}.items()))


def generated_vllm_flag(arg: str) -> str | None:
    """The generated flag (``GENERATED_VLLM_FLAGS``) vLLM would read ``arg`` as: the flag itself, spelt with
    underscores, an alias, or an abbreviation (vLLM's parser, as argparse's, takes any unambiguous start of a
    flag); None for any other argument."""
    flag = arg.split("=", 1)[0].replace("_", "-")  # vLLM reads --tool_call_parser as --tool-call-parser
    if not flag.startswith("--") or len(flag) < 3:
        return None
    if flag in _VLLM_FLAG_NAMES:
        return _VLLM_FLAG_NAMES[flag]
    return next((generated for name, generated in _VLLM_FLAG_NAMES.items() if name.startswith(flag)), None)


class VllmServeConfig(Strict):
    """How ``moe compose`` (and the Kubernetes manifests that mirror it) start a ``vllm`` expert's server.

    The router cannot see an upstream's flags, so this only shapes the servers the repo deploys."""

    # vLLM's --tool-call-parser for this model (hermes for Qwen2.5, llama3_json for Llama 3.1, mistral, ...).
    # An expert whose capabilities include ``tools`` needs one: without --enable-auto-tool-choice vLLM refuses
    # ``tool_choice: auto``, so the router would route tool calls to a server that turns them down.
    tool_call_parser: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    # Further vLLM flags, appended as given (e.g. ["--max-model-len", "16384"]). The flags the generator sets
    # itself are refused here, so a deployment never carries two values for one flag.
    args: list[str] = Field(default=[])

    @model_validator(mode="after")
    def _no_generated_flags(self) -> VllmServeConfig:
        for arg in self.args:
            generated = generated_vllm_flag(arg)
            if generated is not None:
                flag = arg.split("=", 1)[0].replace("_", "-")
                read = "" if flag == generated else f" (vLLM reads it as {generated})"
                raise ValueError(f"args: {flag}{read} is set by the generator from the expert's config; remove it"
                                 + (" and set vllm.tool_call_parser" if "tool" in generated else ""))
        return self


Capability = Literal["chat", "stream", "tools", "vision"]


class ExpertConfig(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    type: str = Field(min_length=1)
    # The base URL the client appends ``/chat/completions`` to (``http://host:8000/v1``); cross-checked at load.
    endpoint: str | None = Field(default=None, pattern=HTTP_URL_PATTERN)
    model: str = Field(min_length=1)
    api_key_env: str | None = Field(default=None, pattern=ENV_NAME_PATTERN)
    timeout_s: float = Field(default=30.0, gt=0.0, le=3600.0)
    max_concurrency: int = Field(default=16, ge=1, le=100_000)
    # How long an idle connection to the expert is kept for the next request (the router's own aiohttp client;
    # an injected httpx transport pools by its own settings). Below the server's keep-alive timeout (vLLM's and
    # uvicorn's: 5 s), so requests keep off connections the server is closing (one would fail as unavailable,
    # and fall back, with nothing wrong). 0 closes each connection after its request. Hosted APIs keep idle
    # connections longer (often 60 s or more): raising it there saves a TLS handshake after each pause.
    keepalive_s: float = Field(default=4.0, ge=0.0, le=3600.0)
    cost: CostConfig = CostConfig()
    description: str = ""
    capabilities: list[Capability] = Field(default=["chat", "stream"])
    examples: list[ExampleText] = Field(default=[])
    # False: the gate never routes to it. An expert only the combiner calls (``combiner.aggregator``,
    # ``escalate_to``: a strong, dear judge asked where the panel disagrees), only clients call by name
    # (``model: <name>``), or only ``gate.default_expert`` takes (out-of-scope queries); it needs no examples or
    # training data, and the gate is trained and scored without it.
    routed: bool = True
    replay: ReplayConfig | None = None
    # ``type: router``: another router's config file, served in-process (relative to this file). Over HTTP,
    # set ``endpoint`` to the other service's ``/v1`` instead: exactly one of the two.
    router_config: FilePath | None = None
    # ``type: vllm``: how ``moe compose`` starts its server (tool-call parser, further flags).
    vllm: VllmServeConfig | None = None
    # How the combiner reads this expert's final answers, in place of ``combiner.extractor`` (an expert that
    # answers in its own format: a number where the others give a letter, a sentence where they give a word).
    # None: ``combiner.extractor``.
    extractor: Extractor | None = None

    @model_validator(mode="after")
    def _vllm_block_for_vllm_experts(self) -> ExpertConfig:
        if self.vllm is not None and self.type != "vllm":
            raise ValueError(f"vllm: only a type: vllm expert has a vLLM server to configure; this one is type "
                             f"{self.type!r}")
        return self

    def service_identity(self) -> str:
        """A short digest of what decides which service this expert's calls reach (its type, endpoint, model,
        nested router config and replay source): the key its circuit breaker is kept under beside its name, so
        what was learned of one service never holds another (``router.breaker.Breakers``)."""
        reached = self.model_dump(include={"type", "endpoint", "model", "router_config", "replay"}, mode="json")
        return hashlib.sha256(json.dumps(reached, sort_keys=True).encode()).hexdigest()[:12]

    def config_digest(self) -> str:
        """A short digest of the whole expert config: which config a shared breaker was last reset for
        (``Breakers.reset``)."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]

    def api_key(self) -> str | None:
        """The key from the environment, read when a client is built, never stored in the config. Stripped, as the
        client keys are (a key mounted from a file ends in a newline, which no HTTP header may carry); None when
        unset or blank."""
        if not self.api_key_env:
            return None
        return os.environ.get(self.api_key_env, "").strip() or None

    @property
    def recorded_model(self) -> str:
        """The model whose recordings a replay expert plays: ``replay.column``, else ``model``."""
        return (self.replay.column if self.replay else None) or self.model
