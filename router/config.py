"""The YAML config: a strict, versioned schema, cross-checked, with every problem reported at once.

Paths in the file are relative to the file's own folder. ``${VAR}`` and ``${VAR:-default}`` in string values
are expanded from the environment, so one file serves a laptop, CI and a compose deployment. Secrets are never
written in the file: an expert names the environment variable that holds its key (``api_key_env``).
"""

from __future__ import annotations

import contextvars
import hashlib
import io
import json
import os
import re
import sys
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin
from urllib.parse import parse_qs, urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from experts.types import is_blank
from router.fallback import MAX_BUDGET_USD, MAX_DEADLINE_S

__all__ = [
    "ENV_REF",
    "ApiKeyConfig",
    "BreakerConfig",
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
    "env_references",
    "load_config",
    "parse_config",
]

SCHEMA_VERSION = 1
# The model name that asks the gate to route (beside ``service.name``): no expert may take it.
ROUTED_MODEL = "auto"
# How a combiner reads a final answer out of free text (``router.combine.EXTRACTORS``).
Extractor = Literal["choice", "number", "short"]
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._@/:+-]{0,127}$"
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
# An expert's endpoint: the scheme here, the rest (host, port, no query) in ``_endpoint_problems``.
_HTTP_URL = r"^https?://\S+$"
# What an OpenAI-compatible client appends to its endpoint (``experts.openai_compat``), the longest first.
_CLIENT_PATHS = ("/chat/completions", "/completions")
# What redis-py's ``Redis.from_url`` takes.
_REDIS_SCHEMES = ("redis", "rediss", "unix")
# ``${VAR}`` or ``${VAR:-default}``; ``$${VAR}`` is the escape for a literal ``${VAR}``.
ENV_REF = re.compile(r"(\$?)\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# Free text, read by the gate and shown by the API: never expanded, so a ``${...}`` there stays as written (an
# example about shell variables keeps them, and no variable's value, a secret perhaps, is trained on or shown).
_VERBATIM_KEYS = frozenset({"description", "examples"})


class ConfigError(ValueError):
    """A config failed validation. ``problems`` holds every ``(path, message)`` found, not just the first."""

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {path}: {msg}" for path, msg in problems)
        super().__init__(f"{source}: {len(problems)} problem(s) in the config:\n{lines}")


def _numeric(annotation: Any) -> bool:
    """Whether a field of this type takes a number (``int``, ``float``, a ``Literal`` of numbers, or a union or
    ``Annotated`` holding one): the fields a boolean must not fill."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _numeric(get_args(annotation)[0])
    if origin is Literal:
        return any(type(arg) in (int, float) for arg in get_args(annotation))
    if origin in (Union, types.UnionType):
        return any(_numeric(arg) for arg in get_args(annotation))
    return annotation in (int, float)


# Linux's limits on a path (PATH_MAX) and on each of its names (NAME_MAX), in bytes.
_PATH_MAX, _NAME_MAX = 4096, 255


def _path_problem(value: str) -> str | None:
    """What keeps ``value`` from being a file's path, said so that the key can be named: the OS refuses a NUL
    character ("embedded null byte") and an over-long path or name ("File name too long") in words that name no
    key. None for a path a file can have."""
    if "\0" in value:
        return "holds a NUL character, which no file's path can"
    size = len(os.fsencode(value))
    if size > _PATH_MAX:
        return f"is {size} bytes long; a path has at most {_PATH_MAX}"
    longest = max(len(os.fsencode(name)) for name in value.split("/"))
    if longest > _NAME_MAX:
        return f"holds a name {longest} bytes long; a file or folder name has at most {_NAME_MAX}"
    return None


def _file_path(value: str) -> str:
    problem = _path_problem(value)
    if problem is not None:
        raise PydanticCustomError("file_path", "the path {problem}", {"problem": problem})
    return value


# A config key naming a file or folder, relative to the config file's folder or absolute.
FilePath = Annotated[str, Field(min_length=1), AfterValidator(_file_path)]


def _example_text(value: str) -> str:
    if is_blank(value):  # spaces, or only characters the encoder drops (zero-width, control): both embed as nothing
        raise PydanticCustomError("blank_example", "an example is blank: give a query this expert should answer, "
                                                   "or leave the entry out (the service refuses blank queries too)")
    return value


# An expert's example query: text to embed, so neither empty nor blank (its embedding is of nothing, and would
# claim a share of every query).
ExampleText = Annotated[str, AfterValidator(_example_text)]


class _Strict(BaseModel):
    # No NaN or infinity (YAML's .nan, .inf): a NaN timeout was reported as "less than or equal to 3600".
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic's lax mode reads ``True`` as 1, and YAML reads ``yes``, ``on`` and ``true`` as ``True``, so
        ``port: yes`` or ``max_attempts: on`` would load as 1: a number field refuses a boolean. (Strict mode
        would also refuse the strings a ``${VAR}`` expands to, "8000" for a port.)"""
        if isinstance(value, bool) and info.field_name is not None and _numeric(
                cls.model_fields[info.field_name].annotation):
            raise PydanticCustomError(
                "bool_for_number", "{value} is a boolean, not a number (YAML reads yes/no, on/off and true/false "
                "as booleans); write a number", {"value": str(value).lower()})
        return value


class CostConfig(_Strict):
    """USD per 1,000 tokens."""

    input_per_1k: float = Field(default=0.0, ge=0.0, le=1000.0)
    output_per_1k: float = Field(default=0.0, ge=0.0, le=1000.0)


class ReplayConfig(_Strict):
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


class VllmServeConfig(_Strict):
    """How ``moe compose`` (and the Kubernetes manifests that mirror it) start a ``vllm`` expert's server.

    The router cannot see an upstream's flags, so this only shapes the servers the repo deploys."""

    # vLLM's --tool-call-parser for this model (hermes for Qwen2.5, llama3_json for Llama 3.1, mistral, ...).
    # An expert whose capabilities include ``tools`` needs one: without --enable-auto-tool-choice vLLM refuses
    # ``tool_choice: auto``, so the router would route tool calls to a server that turns them down.
    tool_call_parser: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    # Further vLLM flags, appended as given (e.g. ["--max-model-len", "16384"]). The flags the generator sets
    # itself are refused here, so a deployment never carries two values for one flag.
    args: list[str] = []

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


class ExpertConfig(_Strict):
    name: str = Field(pattern=_NAME)
    type: str = Field(min_length=1)
    # The base URL the client appends ``/chat/completions`` to (``http://host:8000/v1``); cross-checked at load.
    endpoint: str | None = Field(default=None, pattern=_HTTP_URL)
    model: str = Field(min_length=1)
    api_key_env: str | None = Field(default=None, pattern=_ENV_NAME)
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
    capabilities: list[Literal["chat", "stream", "tools", "vision"]] = ["chat", "stream"]
    examples: list[ExampleText] = []
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


class EncoderConfig(_Strict):
    backend: Literal["onnx", "openvino", "sentence-transformers", "static"] = "onnx"
    max_length: int = Field(default=256, ge=8, le=512)
    # Texts per model call (for onnx and openvino: per run, after sorting a call's texts by length); None: the
    # backend's own (8 for onnx, 64 for openvino and sentence-transformers; router.encoders,
    # router.openvino_encoder). Refused for static, which runs no model.
    batch_size: int | None = Field(default=None, ge=1, le=4096)
    # onnx and openvino: model runs at once when one call holds several batches (a micro-batch, expert-choice
    # ``assign_batch``, training, evaluation); one query, or one batch, is always a single run.
    # None for onnx: as many as the cores this process may use hold at ``threads`` each, and at least two wherever
    # there are two or more (runs share the session's threads: router.encoders.onnx_threads). None for openvino:
    # as many streams as the cores hold at ``threads`` each (streams do not share threads:
    # router.openvino_encoder.openvino_threads), one on 2 cores.
    parallel: int | None = Field(default=None, ge=1, le=256)
    # onnx and openvino: threads for one run; None: half the cores this process may use, and two on 2 or 3 cores.
    # More threads shorten one query's run where cores are free.
    threads: int | None = Field(default=None, ge=1, le=256)
    # onnx and openvino: the most padded tokens (texts x the longest) one model run holds, so that a few long
    # prompts run at once on several cores instead of as one wide run; None: the backend's own (256 for onnx,
    # 2048 for openvino, which then pads a run's width to a multiple of 8 and its rows to one of a few counts).
    batch_tokens: int | None = Field(default=None, ge=16, le=1_000_000)
    # sentence-transformers: the torch device the model runs on: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``. The
    # weights and the encoder's identity are the same on every device, so a gate trained on one serves on another
    # (``python -m bench.gpu_gate`` measures the agreement). onnx, openvino and static run on the CPU only.
    device: str = Field(default="cpu", pattern=r"^(cpu|cuda(:[0-9]+)?|mps)$")
    # openvino: the matrix products' precision: bf16 (bfloat16, on CPUs with AMX or AVX-512 BF16), f32, or auto
    # (OpenVINO's own default for this CPU: bf16 on AMX); None: auto. Part of the encoder's identity
    # (router.openvino_encoder).
    precision: Literal["auto", "bf16", "f32"] | None = None

    @model_validator(mode="after")
    def _device_needs_torch_backend(self) -> EncoderConfig:
        if self.device != "cpu" and self.backend != "sentence-transformers":
            raise ValueError(f"device {self.device!r}: only the sentence-transformers backend runs off the CPU; "
                             f"the {self.backend!r} backend runs on the CPU (leave device at 'cpu')")
        onnx_only = [key for key in ("threads", "parallel", "batch_tokens") if getattr(self, key) is not None]
        if onnx_only and self.backend not in ("onnx", "openvino"):
            raise ValueError(f"{', '.join(onnx_only)}: model-run settings, read by the onnx and openvino backends "
                             f"only; the {self.backend!r} backend would ignore them (remove them, or set backend: "
                             "onnx or openvino)")
        if self.batch_size is not None and self.backend == "static":
            raise ValueError("batch_size: texts per model call, read by the onnx, openvino and sentence-transformers "
                             "backends; the 'static' backend runs no model (it sums a table's rows for a whole "
                             "call at once) and would ignore it (remove it, or set another backend)")
        if self.precision is not None and self.backend != "openvino":
            raise ValueError(f"precision: read by the openvino backend only; the {self.backend!r} backend would "
                             "ignore it (remove it, or set backend: openvino)")
        return self


class TopKConfig(_Strict):
    """How many experts answer, and with what weights (see ``router.topk``).

    ``k`` caps the panel. Unset, it is 1 for ``fixed`` and no cap for the other policies, which size the panel
    themselves; read the cap through ``cap``."""

    policy: Literal["fixed", "mass", "min_weight", "adaptive"] = "fixed"
    k: int | None = Field(default=None, ge=1, le=64)
    mass: float = Field(default=0.9, gt=0.0, le=1.0)
    min_weight: float = Field(default=0.05, ge=0.0, lt=1.0)
    confident: float = Field(default=0.8, gt=0.0, le=1.0)

    @property
    def cap(self) -> int | None:
        """The most experts on a panel; None: every expert the policy keeps."""
        if self.k is None and self.policy == "fixed":
            return 1
        return self.k

    @model_validator(mode="after")
    def _k_leaves_room(self) -> TopKConfig:
        # A cap of 1 turns every sizing policy into top-1, silently: refuse it rather than serve it.
        if self.k == 1 and self.policy != "fixed":
            raise ValueError(f"k: 1 caps the panel at one expert, so policy {self.policy!r} could only ever pick "
                             "one expert; remove k (no cap) or set k >= 2, or use policy: fixed")
        return self


class CascadeConfig(_Strict):
    """A fast first stage for a label gate (``router.cascade``): a gate on ``encoder`` decides the queries it is
    sure of, the gate on ``gate.encoder`` the rest. ``moe train`` trains both and fits the confidence at which
    the fast one decides, so that the cascade picks the full gate's top expert for ``agreement`` of the
    validation queries. The fast one decides only queries at least as familiar to it as ``familiar`` of the
    validation queries are; the rest, out-of-scope queries among them, go to the full gate, whose abstain
    threshold is the better judge (a lower share abstains more like the full gate, a higher one spares it
    more). Both targets are read at load time: an artifact fitted for others is fitted again then, without
    retraining (``CascadeGate.with_targets``)."""

    encoder: EncoderConfig = EncoderConfig(backend="static")
    agreement: float = Field(default=0.995, ge=0.5, le=1.0)
    familiar: float = Field(default=0.9, gt=0.0, le=1.0)


class GateConfig(_Strict):
    encoder: EncoderConfig = EncoderConfig()
    # A fast first stage; None: one gate decides every query.
    cascade: CascadeConfig | None = None
    # The trained classifier; ``moe train`` writes it. Relative to the config file.
    artifact: FilePath = "artifacts/gate"
    # JSONL files ``moe train`` learns from, each detected by its first record: labelled ({"query", "label"}),
    # trained with the experts' examples into a label gate, or outcome records ({"query", "outcomes": {expert:
    # score in [0, 1]}, "cost": {expert: cost}}), trained into an outcome gate. All files must be one kind.
    train_data: list[FilePath] = []
    # Outcome gates: lambda, the quality-cost knob. Routing utility = p_success - cost_weight * cost / the
    # priciest expert's cost; 0 routes on quality alone. Read at load time: changing it needs no retraining.
    cost_weight: float = Field(default=0.0, ge=0.0, le=100.0)
    # Outcome gates: the success model (router.outcome.SUCCESS_MODELS).
    success_model: Literal["knn", "logistic"] = "knn"
    # Label gates: the classifier ``moe train`` fits (router.classifiers). ``ensemble`` averages logistic
    # regression and kNN on the embeddings with logistic regression on TF-IDF words; each alone is faster to
    # train and a few points less accurate.
    classifier: Literal["ensemble", "logistic", "knn", "lexical"] = "ensemble"
    # Label gates: how an expert with few training examples is treated (router.classifiers.BALANCE). "prior":
    # its share of the examples is divided out, so an expert added with five examples next to experts with
    # thousands is not outvoted for that alone; "none": the share acts as a prior (data whose mix is the traffic's).
    balance: Literal["prior", "none"] = "prior"
    top_k: TopKConfig = TopKConfig()
    # Abstain: a query less similar to every training example than the artifact's ``ood_threshold`` goes to
    # this expert alone (weight 1). None: never abstain, whatever the artifact holds.
    default_expert: str | None = None
    # Micro-batching (router.batching): concurrent queries are embedded together in one worker thread. The
    # first query to find the worker idle waits up to ``batch_window_ms`` for company; ``max_batch`` caps a batch.
    # 0 ms sends a lone query at once (queries still batch while the worker is busy). A lower cap answers the
    # front of a queue sooner; a higher one spreads each call's fixed cost: 64 against 32 served 497 against 462
    # requests/s at 128 clients, with overhead p50 195 against 218 ms at concurrency 128 (2 cores, 2026-12-06,
    # ``python -m bench.gate_batching``; two runs before gave the same picture).
    batch_window_ms: float = Field(default=0.0, ge=0.0, le=100.0)
    max_batch: int = Field(default=64, ge=1, le=1024)

    @model_validator(mode="after")
    def _two_encoders(self) -> GateConfig:
        if self.cascade is not None and self.cascade.encoder.backend == self.encoder.backend:
            raise ValueError(f"gate.cascade.encoder uses the {self.encoder.backend!r} backend, as gate.encoder "
                             "does: the fast stage needs a faster encoder (e.g. backend: static)")
        return self


class CombinerConfig(_Strict):
    """How a panel's answers become one (``router.combine``): ``top1`` | ``vote`` | ``consensus`` | ``fuse`` |
    ``escalate``.

    ``consensus`` embeds the answers with the gate's encoder. ``fuse`` asks ``aggregator``, a configured expert,
    to write the final answer from the panel's; naming an aggregator also lets a request pick ``fuse`` with the
    ``x-moe-combiner`` header while another strategy is the default. ``escalate`` keeps the panel's answer when
    all of it agrees and otherwise asks ``escalate_to``, a configured expert; naming one likewise lets a request
    pick ``escalate``."""

    strategy: Literal["top1", "vote", "consensus", "fuse", "escalate"] = "top1"
    # How ``vote`` and ``escalate`` read a final answer out of free text; ``top1`` and ``fuse`` use it to mark
    # which answers agree. An expert's own ``extractor`` overrides it for that expert's answers.
    extractor: Extractor = "choice"
    # The expert that writes ``fuse``'s answer; must be one of ``experts`` (cross-checked at load).
    aggregator: str | None = Field(default=None, pattern=_NAME)
    # The expert that answers when ``escalate``'s panel disagrees (typically the strongest and dearest); must be
    # one of ``experts`` (cross-checked at load).
    escalate_to: str | None = Field(default=None, pattern=_NAME)
    # What an answer counts for in ``vote``: ``gate``, the panel weight the gate gave its expert; ``learned``,
    # per-expert weights fitted jointly on outcome records that carry ``answers`` (``router.vote_weights``),
    # written by ``moe train`` beside the gate artifact. Learned weights discount experts that err together.
    vote_weights: Literal["gate", "learned"] = "gate"
    # With learned vote weights: also learn how an answer's length against its expert's median answer moves
    # what it counts for (one fitted coefficient, ``router.vote_weights``); false: the weights alone.
    vote_length: bool = True
    # With learned vote weights: also learn, for each answer an expert gives often (a favourite letter), how much
    # more or less it counts when the expert gives that answer (``router.vote_weights``'s answer bias). Off by
    # default: on few records, or records whose right answers lean to some letters by accident, the bias can
    # outvote a clear majority. With ``vote_answer_bias_l2: cv`` cross-validation on your records decides whether
    # it is kept.
    vote_answer_bias: bool = False
    # With learned vote weights: the weights' L2 penalty, or ``cv``: chosen by ``moe train`` by 5-fold
    # cross-validation over the training records (``router.vote_weights.cross_validate``: the held-out records'
    # vote accuracy, among 1, 10, 30, 100 and 300; with fewer than 50 records that can teach, 10).
    vote_l2: Annotated[float, Field(gt=0, allow_inf_nan=False)] | Literal["cv"] = "cv"
    # With the answer bias: its L2 penalty, or ``cv``: chosen the same way among 30, 100 and 300, where no bias at
    # all can win too (then the weights are fitted without one); with too few records, 100.
    vote_answer_bias_l2: Annotated[float, Field(gt=0, allow_inf_nan=False)] | Literal["cv"] = "cv"


def _at_least(value: float, info: ValidationInfo, lower: str) -> float:
    """A ``..._max_s`` field's check that it is at least ``lower``, a field declared before it. Skipped when ``lower``
    was itself refused: its own error says why."""
    if lower in info.data and value < info.data[lower]:
        raise ValueError(f"must be at least {lower} ({info.data[lower]:g})")
    return value


class BreakerConfig(_Strict):
    """A circuit breaker per expert (see ``router.breaker``): closed -> open -> half-open -> closed."""

    enabled: bool = True
    # Consecutive counted failures that open the breaker.
    failure_threshold: int = Field(default=5, ge=1, le=1000)
    # Also open when this share of the calls in the last ``window_s`` failed, once ``min_calls`` were made;
    # None leaves only the consecutive count.
    failure_rate: float | None = Field(default=0.5, gt=0.0, le=1.0)
    window_s: float = Field(default=30.0, gt=0.0, le=3600.0)
    min_calls: int = Field(default=20, ge=1, le=100_000)
    # First cooldown; each re-trip from half-open multiplies it by ``cooldown_growth``, up to ``cooldown_max_s``.
    cooldown_s: float = Field(default=5.0, gt=0.0, le=3600.0)
    cooldown_growth: float = Field(default=2.0, ge=1.0, le=10.0)
    # validate_default: a cooldown_s raised past the default cap is refused, not capped below itself at run time.
    cooldown_max_s: float = Field(default=60.0, gt=0.0, le=86_400.0, validate_default=True)
    # Calls let through at once while half-open; the first success closes the breaker.
    half_open_probes: int = Field(default=1, ge=1, le=100)
    # A 429's or 503's Retry-After opens the breaker for that long (capped at cooldown_max_s), so no request
    # calls the expert before the time it gave; false: such answers count as failures like any other.
    honour_retry_after: bool = True

    # A field validator, not a model one: it runs beside the other fields' checks (a model validator would wait
    # for every field to be valid, hiding this error behind any other), and it names the field it refuses.
    @field_validator("cooldown_max_s")
    @classmethod
    def _cooldown_ordered(cls, value: float, info: ValidationInfo) -> float:
        return _at_least(value, info, "cooldown_s")


class FallbackConfig(_Strict):
    enabled: bool = True
    # Experts tried in all, the first choice (or the whole top-k panel, which is always called in full)
    # included; retries of one expert, skipped open breakers and saturated experts do not count.
    max_attempts: int = Field(default=3, ge=1, le=64)
    # Overall deadline for one request, across every attempt, retry wait and fallback.
    deadline_s: float = Field(default=120.0, gt=0.0, le=MAX_DEADLINE_S)
    # Retries of the same expert after a transient failure (connect error, timeout, 429, 5xx, bad JSON)
    # before falling back. 0 by default: the next-ranked expert is usually a quicker answer than a sick one.
    retries: int = Field(default=0, ge=0, le=10)
    # Jittered exponential backoff between retries: base * 2**n, capped at backoff_max_s, then jittered.
    backoff_base_s: float = Field(default=0.1, gt=0.0, le=60.0)
    backoff_max_s: float = Field(default=5.0, gt=0.0, le=600.0, validate_default=True)  # as cooldown_max_s
    # A 429's or 503's Retry-After is honoured up to this (and never past the deadline); a longer one falls back.
    retry_after_max_s: float = Field(default=5.0, ge=0.0, le=600.0)
    # USD a request may spend across all its attempts; once spent no further expert is tried. None: no limit.
    cost_budget_usd: float | None = Field(default=None, gt=0.0, le=MAX_BUDGET_USD)
    breaker: BreakerConfig = BreakerConfig()

    @field_validator("backoff_max_s")
    @classmethod
    def _backoff_ordered(cls, value: float, info: ValidationInfo) -> float:
        return _at_least(value, info, "backoff_base_s")  # as BreakerConfig's cooldown_max_s


class ServiceConfig(_Strict):
    # The model name that routes, next to "auto"; expert names call that expert directly.
    name: str = Field(default="moe-router", pattern=_NAME)
    # The address ``moe serve`` binds; never empty: "" binds every interface, as 0.0.0.0 and :: do, so a
    # ``${VAR:-127.0.0.1}`` whose variable was blank would silently expose the service.
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    max_request_bytes: int = Field(default=1_000_000, ge=1024, le=100_000_000)
    # Seconds a request's whole body may take to arrive (408 after): a client that sends part of it and then
    # nothing would otherwise hold its connection, and a graceful shutdown, for ever.
    body_timeout_s: float = Field(default=30.0, gt=0.0, le=3600.0)
    max_prompt_chars: int = Field(default=100_000, ge=16, le=10_000_000)
    # Queries one ``/v1/route/batch`` request may carry; it is one request to the rate limit, however many.
    max_batch_queries: int = Field(default=1024, ge=1, le=100_000)
    # Put prompts and answers in the per-request log lines. Off by default: they may hold personal data.
    log_content: bool = False
    # The names the service answers to, as a request's Host header gives them (its port aside): exact names,
    # ``*.example.com`` for any under a domain, ``*`` for any. None: any, except that with no client keys a service
    # reached on a loopback address answers to loopback names only (``router.security.host_refused``: DNS
    # rebinding). /health answers whatever the Host.
    allowed_hosts: list[str] | None = None
    # ``moe serve``: seconds between checks for hot reload of the config file and of what its build reads that may
    # change (``router.build.config_inputs``: the gate artifact, nested routers' configs); None turns polling off
    # (SIGHUP and ``POST /admin/reload`` still reload).
    reload_poll_s: float | None = Field(default=2.0, gt=0.0, le=3600.0)

    @field_validator("allowed_hosts")
    @classmethod
    def _host_patterns(cls, hosts: list[str] | None) -> list[str] | None:
        if hosts is None:
            return None
        for host in hosts:
            name = host[2:] if host.startswith("*.") else host
            # A name, or an IPv6 address: in brackets, or bare with two colons at least (so "db:80" is no address).
            if host != "*" and not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*|\[[0-9A-Fa-f:.]*\]"
                                                r"|[0-9A-Fa-f.]*:[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*", name):
                raise ValueError(f"{host!r} is not a host name, '*.' and a domain, or '*' (no port: any port "
                                 "matches)")
        return [h.lower().strip("[]").rstrip(".") for h in hosts]

    @field_validator("host")
    @classmethod
    def _host_given(cls, host: str, info: ValidationInfo) -> str:
        # A ``${VAR}`` left blank is reported as unset (or passed on by ``moe compose``), not again here.
        if not host.strip() and "service.host" not in (info.context or {}).get("blanked", frozenset()):
            raise PydanticCustomError(
                "empty_host", "must not be empty: an empty host binds every interface; give an address "
                "(127.0.0.1 for this machine only, 0.0.0.0 for every interface)")
        return host


class RateLimitConfig(_Strict):
    """A token bucket per client key: ``burst`` requests at once, refilled at ``rate_per_s``."""

    rate_per_s: float = Field(gt=0.0, le=1_000_000.0)
    burst: int = Field(default=10, ge=1, le=1_000_000)


class ApiKeyConfig(_Strict):
    """A client key, held only as its SHA-256 (``printf %s "$KEY" | sha256sum``); the key is never in the file."""

    name: str = Field(pattern=_NAME)
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    # Overrides ``security.rate_limit`` for this key.
    rate_limit: RateLimitConfig | None = None


class SecurityConfig(_Strict):
    """Client keys, the admin key and rate limits (see ``router.security``). Nothing set: ``/v1`` stays open."""

    api_keys: list[ApiKeyConfig] = []
    # An environment variable holding comma-separated raw client keys, hashed at startup. Once named, ``/v1``
    # needs a key even while the variable is empty: a missing secret fails closed.
    api_keys_env: str | None = Field(default=None, pattern=_ENV_NAME)
    # The environment variable holding the admin key; unset, the ``/admin`` endpoints refuse every call.
    admin_key_env: str | None = Field(default=None, pattern=_ENV_NAME)
    # Per key; with no keys configured, per client address. None: no limit.
    rate_limit: RateLimitConfig | None = None
    # The endpoints outside /v1 and /admin that answer without a key: "metrics" (/metrics) and "docs" (/docs,
    # /redoc, /openapi.json). One left out needs a client key, as /v1 does. /health always answers, for probes.
    open_endpoints: list[Literal["metrics", "docs"]] = ["metrics", "docs"]

    @model_validator(mode="after")
    def _distinct(self) -> SecurityConfig:
        names = [k.name for k in self.api_keys]
        hashes = [k.sha256.lower() for k in self.api_keys]
        if len(set(names)) != len(names):
            raise ValueError("api_keys: duplicate key name")
        if len(set(hashes)) != len(hashes):
            raise ValueError("api_keys: the same key hash is listed twice")
        taken = [name for name in names if re.fullmatch(r"env-[0-9]+", name)] if self.api_keys_env else []
        if taken:
            raise ValueError(f"api_keys: the name {taken[0]!r} is the one the service gives a key of api_keys_env "
                             "(env-1, env-2, ... by its place in the variable); rename it")
        return self


class StateConfig(_Strict):
    """Where state shared by replicas lives (breakers, rate limits): this process, or Redis (``router.state_redis``)."""

    backend: Literal["memory", "redis"] = "memory"
    # The environment variable holding the Redis URL (``redis://:password@host:6379/0``), never the URL itself.
    url_env: str = Field(default="MOE_REDIS_URL", pattern=_ENV_NAME)
    # Every key starts with this, so several routers (or other apps) can share one Redis.
    key_prefix: str = Field(default="moe:", max_length=64)

    def redis_url(self, environ: Mapping[str, str]) -> str:
        """The URL in ``url_env``, stripped; a ``ConfigError`` naming the variable, never its value, where it holds
        none redis-py can read."""
        url = environ.get(self.url_env, "").strip()
        problem = _redis_url_problem(self.url_env, url, is_set=self.url_env in environ)
        if problem:
            raise ConfigError("<environment>", [("state.url_env", problem)])
        return url


class TracingConfig(_Strict):
    """OpenTelemetry spans, one per expert call (``router.tracing``); off: no-op, and the SDK is never imported."""

    enabled: bool = False
    service_name: str = Field(default="moe-router", min_length=1)


class FeedbackConfig(_Strict):
    """Feedback on answers (``router.feedback``): stored in SQLite, folded into the next gate by ``moe train``."""

    # Off: ``POST /v1/feedback`` answers 409, answers are not remembered, and ``moe train`` ignores the store.
    enabled: bool = True
    # The SQLite file, relative to the config file; None: ``feedback.sqlite3`` next to ``gate.artifact``.
    path: FilePath | None = None
    # How long an answer can be rated by its id alone (its query and expert are kept that long). None: 30 days in
    # SQLite, one day in Redis, where every remembered answer holds memory (about 1 KB each).
    remember_s: float | None = Field(default=None, gt=0, le=365 * 86400)


class RouterConfig(_Strict):
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
        problems = list(_cross_problems(self.model_dump(exclude={"base_dir"}), check_env=False, blanked=blanked))
        if problems:
            raise ValueError("; ".join(f"{p}: {m}" for p, m in problems))
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


def name_list(names: Sequence[str], limit: int = 20) -> str:
    """``names`` comma-separated, the first ``limit`` of them and how many more: a config may hold hundreds of
    experts, and a message that lists them all buries its point."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def _expert_label(raw: Any, index: int) -> str:
    name = raw.get("name") if isinstance(raw, dict) else None
    return f"experts[{index}]" + (f" ({name})" if isinstance(name, str) and name else "")


def _routed(value: Any) -> bool:
    """An expert's ``routed`` as the schema reads it (``"false"``, ``"no"`` and ``0`` are false, as a ``${VAR}``
    gives them); a value it refuses counts as routed here, and pydantic names it."""
    try:
        return bool(TypeAdapter(bool).validate_python(value))
    except ValidationError:
        return True


def _labelled(path: str, raw: Mapping[str, Any]) -> str:
    """``path`` (``experts[0].model``) as problems name it, its expert labelled (``experts[0] (alpha).model``)."""
    match = re.match(r"experts\[(\d+)\]", path)
    experts = raw.get("experts")
    if match is None or not isinstance(experts, list) or int(match.group(1)) >= len(experts):
        return path
    index = int(match.group(1))
    return _expert_label(experts[index], index) + path[match.end():]


def _cross_problems(raw: Any, *, check_env: bool, base_dir: str | Path | None = None,
                    blanked: frozenset[str] = frozenset(),
                    quiet: frozenset[str] = frozenset()) -> Iterable[tuple[str, str]]:
    """Problems pydantic's per-field checks cannot see: references between parts, types, environment.

    ``blanked``: the paths where an unset ``${VAR}`` was left "" (reported as unset, or passed on by ``moe
    compose``), whose emptiness is not a problem of its own. ``quiet``: the paths where a ``${VAR}`` gave part
    of the value, which no message rebuilds from it (an endpoint's base URL, say, may hold a token)."""
    from experts.redact import userinfo
    from router.expert_types import EXPERT_TYPES, REQUIRES_ENDPOINT

    if not isinstance(raw, dict):
        return
    experts: list[Any] = raw["experts"] if isinstance(raw.get("experts"), list) else []
    names: list[str] = []
    named: dict[str, str] = {}  # an expert's name -> its place, for the first expert of each name
    for i, e in enumerate(experts):
        if not isinstance(e, dict):
            continue
        where = _expert_label(e, i)
        name = e.get("name")
        if isinstance(name, str):
            if name in names:
                yield f"{where}.name", f"duplicate expert name {name!r}"
            if name == ROUTED_MODEL:
                yield f"{where}.name", (f"{name!r} is reserved: a request for model {name!r} is routed by the gate, "
                                        "so no request could call this expert by name; rename it")
            names.append(name)
            named.setdefault(name, where)
        kind = e.get("type")
        if not isinstance(kind, str):  # pydantic names a type that is no string; nothing below can read it
            kind = None
        if isinstance(kind, str) and kind not in EXPERT_TYPES:
            yield f"{where}.type", f"unknown expert type {kind!r}; known: {', '.join(sorted(EXPERT_TYPES))}"
        if kind in REQUIRES_ENDPOINT and not e.get("endpoint"):
            yield f"{where}.endpoint", f"type {kind!r} needs an endpoint"
        if kind == "replay" and not e.get("replay"):
            yield f"{where}.replay", "type 'replay' needs a replay block (source, path)"
        elif isinstance(kind, str) and kind != "replay" and e.get("replay"):
            yield f"{where}.replay", f"only a type: replay expert plays recordings; this one is type {kind!r}"
        if kind == "replay" and e.get("endpoint"):
            yield f"{where}.endpoint", ("a type: replay expert answers from its recordings and calls no endpoint; "
                                        "remove it (to call recordings served by moe serve-replay, use type: openai)")
        if kind == "router" and bool(e.get("endpoint")) == bool(e.get("router_config")):
            yield f"{where}.router_config", "type 'router' needs exactly one of endpoint (over HTTP) or router_config"
        elif kind != "router" and e.get("router_config"):
            yield f"{where}.router_config", "only type 'router' takes a router_config"
        key_env = e.get("api_key_env")
        if _is_reference(key_env):
            yield f"{where}.api_key_env", _reference_problem("api_key_env", "OPENAI_API_KEY")
        elif isinstance(key_env, str) and not re.match(_ENV_NAME, key_env):
            yield f"{where}.api_key_env", _not_a_name_problem("api_key_env", "OPENAI_API_KEY")
        elif check_env and isinstance(key_env, str) and not os.environ.get(key_env, "").strip():
            yield f"{where}.api_key_env", variable_state(key_env, is_set=key_env in os.environ)
        elif check_env and isinstance(key_env, str) and _not_header_text(os.environ[key_env].strip()):
            yield f"{where}.api_key_env", (f"environment variable {key_env} holds a control character (a line "
                                           "break?) or a character that is not ASCII inside the key, which no HTTP "
                                           "header carries as written")
        endpoint = e.get("endpoint")
        if isinstance(endpoint, str) and key_env and userinfo(endpoint):
            yield f"{where}.endpoint", ("holds credentials (user:password@) and api_key_env sets a bearer key too; "
                                        "an HTTP request carries only one Authorization: keep one of them")
        if isinstance(endpoint, str) and re.match(_HTTP_URL, endpoint):
            wrong = _endpoint_problems(endpoint, need_host=f"experts[{i}].endpoint" not in blanked,
                                       echo=f"experts[{i}].endpoint" not in quiet)
            if wrong:
                yield f"{where}.endpoint", "; ".join(wrong)
        elif isinstance(endpoint, str) and endpoint and f"experts[{i}].endpoint" not in blanked:
            # In words, rather than pydantic's pattern (which this replaces): the usual slip is a missing scheme.
            # The value is not shown: it may hold credentials (user:password@host).
            yield f"{where}.endpoint", ("is not an http:// or https:// URL (with no spaces): write the base URL the "
                                        "client appends /chat/completions to, e.g. http://host:8000/v1")
        if (kind == "router" and isinstance(e.get("router_config"), str) and not e.get("endpoint")
                and base_dir is not None and _path_problem(e["router_config"]) is None):
            # Checked with or without the environment: a file is no variable. (A path no file can have is the
            # field's own problem.)
            inner = Path(e["router_config"])
            inner = inner if inner.is_absolute() else Path(base_dir) / inner
            if not inner.is_file():
                yield f"{where}.router_config", f"no config file at {inner}"
            else:
                # The inner router is built from it at serve time: what would refuse it there is said here,
                # a routing cycle (a file reached again from within itself) included.
                chain = _LOADING.get()
                if inner.resolve() in chain:
                    loop = [*chain[chain.index(inner.resolve()):], inner.resolve()]
                    yield f"{where}.router_config", ("a routing cycle: " + " -> ".join(str(f) for f in loop)
                                                     + "; a router cannot contain itself")
                else:
                    try:
                        load_config(inner, check_env=check_env)
                    except ConfigError as exc:
                        yield f"{where}.router_config", f"{inner}: " + "; ".join(f"{k}: {m}" for k, m in exc.problems)
    gate: dict[str, Any] = raw["gate"] if isinstance(raw.get("gate"), dict) else {}
    default = gate.get("default_expert")
    if isinstance(default, str) and names and default not in names:
        yield "gate.default_expert", f"references expert {default!r}, which is not defined"
    yield from _combiner_problems(raw.get("combiner"), names)
    top_k: dict[str, Any] = gate["top_k"] if isinstance(gate.get("top_k"), dict) else {}
    fallback: dict[str, Any] = raw["fallback"] if isinstance(raw.get("fallback"), dict) else {}
    k, attempts = top_k.get("k"), fallback.get("max_attempts", FallbackConfig.model_fields["max_attempts"].default)
    # A fixed panel of k is filled from the config's experts alone (a nested router is one expert, and cold
    # start scores only configured experts), so more than there are would silently serve a smaller panel. The
    # other policies size the panel themselves, and k only caps it.
    routed = [e for e in experts if not isinstance(e, dict) or _routed(e.get("routed", True))]
    if experts and not routed:
        yield "experts", ("every expert has routed: false, so the gate has none to route to; leave routed at its "
                          "default (true) for the experts it should choose among")
    if isinstance(k, int) and top_k.get("policy", "fixed") == "fixed" and routed and k > len(routed):
        which = ("expert(s) defined" if len(routed) == len(experts)
                 else "routed expert(s) defined (routed: false ones are never on a panel)")
        yield "gate.top_k.k", (f"{k} is more than the {len(routed)} {which}: a fixed panel of {k} can never be "
                               f"filled; lower k to at most {len(routed)}")
    if isinstance(k, int) and isinstance(attempts, int) and k > attempts:
        yield "fallback.max_attempts", (f"{attempts} is below gate.top_k.k ({k}): the panel alone calls {k} "
                                        "experts, and max_attempts counts every expert tried, the panel included; "
                                        f"raise max_attempts to at least {k} or lower k")
    service: dict[str, Any] = raw["service"] if isinstance(raw.get("service"), dict) else {}
    service_name = service.get("name", ServiceConfig.model_fields["name"].default)
    if service_name in names and "name" in service:
        yield "service.name", f"{service_name!r} is also an expert's name"
    elif service_name in names:  # the default name: the expert is what the file says, so it is the one named
        yield f"{named[service_name]}.name", (f"{service_name!r} is the service's own model name (service.name, "
                                              "which routes like 'auto', is that by default), so no request could "
                                              "call this expert by name; rename the expert or set service.name")
    state: dict[str, Any] = raw["state"] if isinstance(raw.get("state"), dict) else {}
    security: dict[str, Any] = raw["security"] if isinstance(raw.get("security"), dict) else {}
    for section, block, key, example in (("state", state, "url_env", "MOE_REDIS_URL"),
                                         ("security", security, "api_keys_env", "MOE_API_KEYS"),
                                         ("security", security, "admin_key_env", "MOE_ADMIN_KEY")):
        if _is_reference(block.get(key)):
            yield f"{section}.{key}", _reference_problem(key, example)
        elif isinstance(block.get(key), str) and not re.match(_ENV_NAME, block[key]):
            yield f"{section}.{key}", _not_a_name_problem(key, example)
    url_env = state.get("url_env", "MOE_REDIS_URL")
    if check_env and state.get("backend") == "redis" and isinstance(url_env, str) and re.match(_ENV_NAME, url_env):
        problem = _redis_url_problem(url_env, os.environ.get(url_env, "").strip(), is_set=url_env in os.environ)
        if problem:
            yield "state.url_env", problem
    if check_env:
        yield from _security_env_problems(security)


def _redis_url_problem(name: str, url: str, *, is_set: bool) -> str | None:
    """What keeps redis-py from reading ``url``, the value of variable ``name``. The value may hold a password, so
    only its scheme is ever shown: redis-py's own error quoted the password's start as the port when a '/' in it
    ended the host early."""
    if not url:
        return f"{variable_state(name, is_set=is_set)}; it must hold the Redis URL (redis://host:6379/0)"
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme not in _REDIS_SCHEMES:
        return (f"environment variable {name} does not hold a Redis URL (its scheme is {scheme or 'none'!r}; "
                "expected redis://, rediss:// or unix://)")
    from experts.redact import userinfo_past_host  # here, not at the top: as in _endpoint_problems

    if userinfo_past_host(url):
        return (f"environment variable {name} holds a Redis URL with a '@' past its host: a '/', '?' or '#' in its "
                "password ends the host early; percent-encode them (%2F, %3F, %23, and a '@' as %40)")
    try:
        _ = urlsplit(url).port  # read for its ValueError, as redis-py reads it
    except ValueError:
        return (f"environment variable {name} holds a Redis URL whose host or port cannot be read (a port is a "
                "number from 0 to 65535, an IPv6 host is written in [...]); percent-encode a password's '/', '?', "
                "'#' and '@'")
    tls = sorted(k for k in parse_qs(urlsplit(url).query) if k.startswith("ssl")) if scheme != "rediss" else []
    if tls:  # redis-py hands them to a connection that takes none: every command would raise TypeError
        return (f"environment variable {name} holds a {scheme}:// URL with the TLS option(s) "
                f"{', '.join(map(repr, tls))}, which only a rediss:// URL takes: use rediss:// for TLS, or leave "
                "them out")
    return None


def _is_reference(value: Any) -> bool:
    """A ``*_env`` key written as ``${VAR}``: never expanded (its value would be the secret), so never valid."""
    return isinstance(value, str) and "${" in value


def _reference_problem(key: str, example: str) -> str:
    return f"names an environment variable: write the variable's name itself ({key}: {example}), not a ${{...}} " \
           "reference to it"


def looks_like_secret(name: str) -> bool:
    """Whether a valid variable name reads like a secret pasted in its place (Hugging Face's ``hf_...``, Groq's
    ``gsk_...``, a hex or base62 token): a run of 20 or more letters and digits that mixes cases, or of 32 or more
    that mixes letters and digits. Variable names are words joined by ``_``, so their runs are short."""
    for run in re.findall(r"[A-Za-z0-9]{20,}", name):
        mixed_case = any(c.islower() for c in run) and any(c.isupper() for c in run)
        if mixed_case or (len(run) >= 32 and any(c.isdigit() for c in run) and any(c.isalpha() for c in run)):
            return True
    return False


def variable_state(name: str, *, is_set: bool) -> str:
    """"environment variable NAME is not set" (or empty), unless NAME is unset and looks like a secret pasted in
    place of a variable's name: then it is not repeated (a log or a CI page would keep it)."""
    if not is_set and looks_like_secret(name):
        return (f"the environment variable it names is not set, and the name looks like a secret pasted in place of "
                f"a variable's name ({len(name)} characters of mixed letters and digits, not repeated here): write "
                "the name of the variable that holds the secret, never the secret itself")
    return f"environment variable {name} is {'empty' if is_set else 'not set'}"


def _not_a_name_problem(key: str, example: str) -> str:
    """A ``*_env`` value that is no variable's name, often the secret itself pasted in: never repeated."""
    return (f"is not an environment variable's name (letters, digits and _, not starting with a digit): write the "
            f"name of the variable that holds the secret ({key}: {example}), never the secret itself")


def _endpoint_problems(url: str, *, need_host: bool = True, echo: bool = True) -> list[str]:
    """What keeps ``url`` from being an OpenAI-compatible base URL. The client appends ``/chat/completions`` to
    it, so a query string or fragment would swallow that path and an endpoint already ending in it would double
    it. Nothing is said of ``/v1``: some servers mount the API elsewhere. The userinfo (a password, perhaps) is
    never repeated, nor any part of it: the checks read the URL without it (``experts.redact.userinfo``).
    ``echo`` false: the base URL is not suggested (a variable gave the URL, whose path may hold a token)."""
    from experts.redact import userinfo, userinfo_past_host  # here, not at the top: `import router.config` stays
    # light (no httpx)

    scheme, _, rest = url.partition("://")
    credentials = userinfo(url)
    bare = f"{scheme}://{rest[len(credentials) + 1:]}" if credentials else url
    found = []
    if userinfo_past_host(url):
        found.append("has a '@' past its host: a '/', '?' or '#' in its user:password@ ends the host early; "
                     "percent-encode them (%2F, %3F, %23, and a '@' as %40)")
    try:
        parts = urlsplit(bare)
    except ValueError as exc:  # an unclosed IPv6 "[", say
        return [*found, f"is not a valid URL: {exc}"]
    host_port = parts.netloc.rpartition("@")[2]
    port = host_port.rpartition("]")[2].partition(":")[2]  # after an IPv6 literal's "]"
    if need_host and not parts.hostname:
        found.append("has no host (write http://host:port/...)")
    elif parts.hostname and (bad := _host_name_problem(parts.hostname)):
        found.append(f"host {parts.hostname + ' ' if echo else ''}is not a host name a resolver can look up: {bad}")
    if port and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        found.append(f"port {port} is not a port number from 1 to 65535")
    before_fragment, fragment_mark, _ = bare.partition("#")
    extras = ["a query string (?...)"] * ("?" in before_fragment) + ["a fragment (#...)"] * bool(fragment_mark)
    if extras:
        found.append(f"has {' and '.join(extras)}: the client appends /chat/completions to the endpoint, so give "
                     "the base URL alone (e.g. http://host:8000/v1)")
    path = parts.path.rstrip("/")
    suffix = next((s for s in _CLIENT_PATHS if path.endswith(s)), None)
    if suffix:
        base = f"{scheme}://{host_port}{path[:-len(suffix)]}"
        # A "@" left in the path may be a user name's token cut short by a "/": the URL is not repeated then.
        found.append(f"ends in {suffix}, which the client appends itself: give the base URL"
                     + (f" ({base})" if "@" not in path and echo else f" without {suffix}"))
    return found


def _host_name_problem(host: str) -> str | None:
    """Why ``host`` (a URL's host, lowercased, without brackets) cannot be looked up, as the HTTP client would
    find at the first call: an empty label ("a..b", ".a"), one over 63 characters, or the whole over 253 (IDNA's
    codec, which encodes it for the resolver). None for an IP address or a good name."""
    import ipaddress

    try:
        ipaddress.ip_address(host.partition("%")[0])  # an IPv6 literal may carry a zone ("fe80::1%eth0")
        return None
    except ValueError:
        pass
    try:
        encoded = host.encode("idna")
    except UnicodeError:
        labels = host.rstrip(".").split(".")
        if any(not label for label in labels):
            return "it has an empty label (two dots together, or a leading dot)"
        return "a label (the part between dots) is over 63 characters"
    if len(encoded.rstrip(b".")) > 253:
        return f"it is {len(encoded)} characters long, over 253"
    return None


# The security keys that name a variable, and what that variable holds.
_SECURITY_ENV = (("api_keys_env", "the client keys, comma-separated (until it does, every /v1 call is refused)"),
                 ("admin_key_env", "the admin key (until it does, every /admin call is refused)"))


def _security_env_problems(security: dict[str, Any]) -> Iterable[tuple[str, str]]:
    """An unset key variable fails closed at serve time, every call refused; say so before then. Only the
    variable's name is ever shown, never its value."""
    for key, holds in _SECURITY_ENV:
        name = security.get(key)
        if not isinstance(name, str) or not re.match(_ENV_NAME, name):
            continue  # pydantic names the key
        value = os.environ.get(name)
        if value is None:
            yield f"security.{key}", f"{variable_state(name, is_set=False)}; it must hold {holds}"
        elif not (value.replace(",", " ") if key == "api_keys_env" else value).strip():  # as KeyRing reads it
            yield f"security.{key}", f"environment variable {name} is empty; it must hold {holds}"
        elif any(_not_header_text(k.strip()) for k in (value.split(",") if key == "api_keys_env" else [value])):
            yield f"security.{key}", (f"environment variable {name} holds a control character (a line break?) or a "
                                      "character that is not ASCII inside a key, which no client could send in an "
                                      "HTTP header as written")


def _not_header_text(value: str) -> bool:
    """Whether ``value`` holds what an HTTP header does not carry as written: an ASCII control character other than
    a tab (header values allow tabs), or a character that is not ASCII (the service reads header bytes as Latin-1,
    so a UTF-8 key never matches, and the SDK refuses one)."""
    return any((ord(c) < 32 and c != "\t") or ord(c) >= 127 for c in value)


def _combiner_problems(combiner: Any, names: list[str]) -> Iterable[tuple[str, str]]:
    """``fuse`` needs an aggregator and ``escalate`` an expert to escalate to, and each must be a configured
    expert: it is called like one, through the dispatcher."""
    if not isinstance(combiner, dict):
        return
    for key, strategy, role in _COMBINER_EXPERTS:
        name = combiner.get(key)
        if combiner.get("strategy") == strategy and name is None:
            yield f"combiner.{key}", f"strategy {strategy!r} needs {key}: the name of the expert that {role}"
        if isinstance(name, str) and names and name not in names:
            yield f"combiner.{key}", f"references expert {name!r}, which is not defined; experts: {', '.join(names)}"


# The combiner keys that name an expert: (key, the strategy that needs it, what that expert does).
_COMBINER_EXPERTS = (("aggregator", "fuse", "writes the final answer"),
                     ("escalate_to", "escalate", "answers when the panel disagrees"))


def _expand_env(value: Any, unset: list[tuple[str, str]], where: str = "",
                malformed: list[str] | None = None, found: dict[str, str] | None = None,
                given: set[str] | None = None) -> Any:
    """``value`` with each ``${VAR}`` and ``${VAR:-default}`` replaced from the environment; a variable that is
    unset and has no default becomes "" and is noted in ``unset`` as ``(path, name)``. An empty variable counts as
    unset, as with the shell's and compose's ``:-`` (and ``router.settings``): ``${VAR:-default}`` gives the
    default, and ``${VAR}`` is noted in ``unset``. ``$${VAR}`` stands for a literal ``${VAR}``. A ``${`` that
    starts no reference (``${HOME`` unterminated, ``${1X}``) is left as written and its path noted in
    ``malformed``. Each variable that gave a value goes into ``found`` (name: value), and the path of its value
    into ``given``.

    A ``*_env`` key's value is left alone: it names a variable. Expanded, a mistaken ``api_key_env: ${KEY}``
    would put the key itself where a variable's name goes, and into every message that names that variable.
    ``description`` and ``examples`` are left alone too (``_VERBATIM_KEYS``)."""
    def expand(text: str, path: str) -> str:
        def substitute(match: re.Match[str]) -> str:
            escape, name, default = match.group(1), match.group(2), match.group(3)
            if escape:
                return match.group(0)[1:]
            value = os.environ.get(name)
            if value:  # "" counts as unset
                if found is not None:
                    found[name] = value
                if given is not None:
                    given.add(path or "<root>")
                return value
            if default is None:
                unset.append((path or "<root>", name))
            return default or ""

        # A '${' left once the references are taken out starts none; one inside a default (``${A:-${B}}``) would
        # be kept as text, since defaults are not expanded.
        if malformed is not None and ("${" in ENV_REF.sub("", text) or any(
                "${" in (m.group(3) or "") for m in ENV_REF.finditer(text) if not m.group(1))):
            malformed.append(path or "<root>")
        return ENV_REF.sub(substitute, text)

    return _map_expandable(value, expand, where)


def _map_expandable(value: Any, fn: Callable[[str, str], str], where: str = "") -> Any:
    """``value`` with ``fn(text, path)`` applied to every string the loader expands: all but a ``*_env`` key's
    value and what ``_VERBATIM_KEYS`` hold."""
    if isinstance(value, str):
        return value if where.endswith("_env") else fn(value, where)
    if isinstance(value, list):
        return [_map_expandable(v, fn, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: v if k in _VERBATIM_KEYS else _map_expandable(v, fn, f"{where}.{k}" if where else str(k))
                for k, v in value.items()}
    return value


def env_references(value: Any) -> list[tuple[str, str | None]]:
    """``(variable, default or None)`` for each ``${VAR}`` and ``${VAR:-default}`` the loader would expand in
    ``value`` (a config as read from YAML, unexpanded), in order: what a deployment must provide."""
    found: list[tuple[str, str | None]] = []

    def note(text: str, _: str) -> str:
        found.extend((m.group(2), m.group(3)) for m in ENV_REF.finditer(text) if not m.group(1))
        return text

    _map_expandable(value, note)
    return found


def _string_keys(value: Any, problems: list[tuple[str, str]], where: str = "") -> Any:
    """``value`` without the mapping keys that are not strings, each noted in ``problems`` with the mapping's path.
    Every key of the schema is a name; YAML reads an unquoted ``8000:`` as a number and ``on:``, ``yes:`` as
    booleans."""
    if isinstance(value, list):
        return [_string_keys(v, problems, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        kept = {}
        for k, v in value.items():
            if isinstance(k, str):
                kept[k] = _string_keys(v, problems, f"{where}.{k}" if where else k)
            else:
                problems.append((where or "<root>", f"mapping keys must be strings: {k!r} is {type(k).__name__} "
                                                    "(quote it, or check the indentation)"))
        return kept
    return value


def _pydantic_problems(exc: ValidationError, raw: Any) -> list[tuple[str, str]]:
    problems = []
    for err in exc.errors():
        loc = list(err["loc"])
        parts: list[str] = []
        for i, part in enumerate(loc):
            if isinstance(part, int) and i > 0 and loc[i - 1] == "experts":
                experts = raw.get("experts") if isinstance(raw, dict) else None
                item = experts[part] if isinstance(experts, list) and part < len(experts) else None
                parts[-1] = _expert_label(item, part)
            elif isinstance(part, int) and parts:
                parts[-1] = f"{parts[-1]}[{part}]"
            else:
                parts.append(str(part))
        msg = "unknown key (not in the schema)" if err["type"] == "extra_forbidden" else err["msg"]
        if err["type"] == "value_error":  # a validator's own words, without pydantic's "Value error, " before them
            msg = msg.removeprefix("Value error, ")
        if loc == ["version"] and err["type"] == "literal_error":
            msg = f"must be 1, the schema version this release reads, not {err['input']!r}"
        if err["type"] == "string_type":
            msg = _not_text(err["input"]) or msg
        if err["type"] == "string_pattern_mismatch" and (err.get("ctx") or {}).get("pattern") == _NAME:
            msg = _name_problem(str(err["input"]))
        if err["type"] == "value_error" and not parts:
            continue  # the cross-check validator; its problems are reported one by one below
        problems.append((".".join(parts) or "<root>", msg))
    return problems


def _name_problem(name: str) -> str:
    """Why ``name`` is no name (``_NAME``), in words: the pattern alone says nothing to most readers."""
    rule = ("a name is 1 to 128 of the characters A-Z a-z 0-9 . _ @ / : + -, starting with a letter or digit "
            "(names appear in URLs, metric labels and logs)")
    if not name:
        return f"is empty: {rule}"
    if len(name) > 128:
        return f"is {len(name)} characters long: {rule}"
    bad = next((c for c in name if not re.fullmatch(r"[A-Za-z0-9._@/:+-]", c)), None)
    if bad is not None:
        return f"holds {bad!r}: {rule}"
    return f"starts with {name[0]!r}: {rule}"


def _not_text(value: Any) -> str | None:
    """Why a value YAML read as other than text is no string, with the remedy (quotes); None for values that were
    never text (a list, a mapping, null), which pydantic's own words fit."""
    import datetime

    if isinstance(value, bool):
        read = f"{str(value).lower()}, a boolean (unquoted, yes/no, on/off and true/false are booleans)"
    elif isinstance(value, int | float):
        read = f"{value}, a number (unquoted, digits are a number, and 1:30 is read as 90)"
    elif isinstance(value, datetime.date):
        read = f"{value.isoformat()}, a date (unquoted, 2024-05-01 is a date)"
    else:
        return None
    return f"should be text, but YAML read it as {read}: put the value in quotes"


# A config's size and depth, bounded before anything walks it: YAML's aliases let a few lines stand for billions
# of values (a "billion laughs" file), or for a value that contains itself.
MAX_CONFIG_VALUES, MAX_CONFIG_DEPTH = 1_000_000, 100


def _shape_problem(raw: Any) -> str | None:
    """Why ``raw`` (a parsed file) is no config to walk: it holds itself (an alias inside its own anchor), nests
    deeper than ``MAX_CONFIG_DEPTH``, or expands to more than ``MAX_CONFIG_VALUES`` values; None when it is fine.
    Iterative, and stops at the first limit passed, so the check itself is bounded."""
    count = 0
    stack: list[tuple[Any, int, frozenset[int]]] = [(raw, 0, frozenset())]
    while stack:
        value, depth, inside = stack.pop()
        count += 1
        if count > MAX_CONFIG_VALUES:
            return (f"the file expands to more than {MAX_CONFIG_VALUES:,} values (YAML aliases repeating aliases?); "
                    "a config is far smaller")
        if depth > MAX_CONFIG_DEPTH:
            return f"values nested more than {MAX_CONFIG_DEPTH} levels deep; a config nests a few"
        if isinstance(value, dict | list):
            if id(value) in inside:
                return "a value contains itself (a YAML alias inside its own anchor, such as x: &a [*a])"
            children = value.values() if isinstance(value, dict) else value
            below = inside | {id(value)}
            stack.extend((child, depth + 1, below) for child in children)
    return None


def parse_config(raw: Any, *, source: str = "<config>", base_dir: str | Path = ".",
                 check_env: bool = True, require_vars: bool = True) -> RouterConfig:
    """Validate a config mapping. Raises ``ConfigError`` listing every problem with its path.

    ``check_env``: the variables the ``*_env`` keys name (API keys, the Redis URL) must be set. ``require_vars``:
    every ``${VAR}`` without a default must be set; off only where the config is not used here but passed on
    to where its variables will be set (``moe compose``, whose containers get them)."""
    shape = _shape_problem(raw)
    if shape is not None:
        raise ConfigError(source, [("<root>", shape)])
    unset: list[tuple[str, str]] = []
    malformed: list[str] = []
    problems: list[tuple[str, str]] = []
    found: dict[str, str] = {}
    given: set[str] = set()
    raw = _expand_env(_string_keys(raw, problems), unset, malformed=malformed, found=found, given=given)
    if not isinstance(raw, dict):
        raise ConfigError(source, [("<root>", "the config must be a mapping")])
    problems += [
        (path, "a '${' that starts no variable reference (unclosed, or not a variable's name): write ${NAME} or "
               "${NAME:-default}, NAME of letters, digits and _ and not starting with a digit") for path in malformed]
    if "base_dir" in raw:  # set from the file's folder; a key of that name would be silently overwritten
        problems.append(("base_dir", "unknown key (not in the schema; paths resolve against the config's folder)"))
    if require_vars:
        problems += [(_labelled(path, raw), f"environment variable {name} is "
                                            f"{'empty (which counts as unset)' if name in os.environ else 'not set'}"
                                            f" and ${{{name}}} has no default (write ${{{name}:-default}} to give "
                                            "one)")
                     for path, name in unset]
    blanked = frozenset(path for path, _ in unset)
    # Where an unset variable left the whole value "" and is reported, what that "" then fails (too short, no
    # number, no endpoint) says nothing more. A value it left partly written is still checked as written.
    emptied: set[str] = set()

    def note_empty(text: str, path: str) -> str:
        if not text:
            emptied.add(path or "<root>")
        return text

    _map_expandable(raw, note_empty)
    reported = frozenset(_labelled(path, raw) for path in blanked & emptied) if require_vars else frozenset()
    config: RouterConfig | None = None
    try:
        config = RouterConfig.model_validate({**raw, "base_dir": str(base_dir)}, context={"blanked": blanked})
    except ValidationError as exc:
        problems.extend(_pydantic_problems(exc, raw))
    cross = list(_cross_problems(raw, check_env=check_env, base_dir=base_dir, blanked=blanked,
                                 quiet=frozenset(given)))
    # pydantic's "should match pattern" says less than a cross-check of the same field (a ${...} reference where
    # a variable's name belongs): keep the one that says why.
    explained = {path for path, _ in cross}
    problems = [(path, m) for path, m in problems
                if not (path in explained and m.startswith("String should match pattern"))]
    problems.extend(p for p in cross if p not in problems)
    problems = [(path, m) for path, m in problems if path not in reported or m.startswith("environment variable ")]
    if problems or config is None:
        raise ConfigError(source, [(_unechoed(path, found), _unechoed(m, found)) for path, m in problems] or
                          [("<root>", "invalid config")])
    return config


# A variable's value this long is never repeated in a problem's message: it may be a secret put in the wrong key
# (``type: ${OPENAI_API_KEY}``). Shorter ones (a port, a model's name) are shown, as they help more than they risk.
_ECHO_MAX = 8


def _unechoed(message: str, found: Mapping[str, str]) -> str:
    """``message`` with each long value a ``${VAR}`` gave (``found``) replaced by the reference it came from, as
    given and as Python or JSON quote it (``'a\\\\b'`` for a backslash). No message rebuilds a part of such a
    value (``_cross_problems``' ``quiet``)."""
    for name, value in sorted(found.items(), key=lambda item: -len(item[1])):
        if len(value) > _ECHO_MAX:
            for form in dict.fromkeys((value, repr(value)[1:-1], json.dumps(value)[1:-1])):
                message = message.replace(form, f"${{{name}}}")
    return message


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last, silently).

    Merge keys (``<<: *anchor``, ``<<: [*a, *b]``) work as in YAML's safe loader: a key a merge supplies may be
    given again explicitly, which overrides it; only a key written twice in the mapping itself is refused."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[tuple[type, Any], yaml.Node] = {}  # by type too: 1 and true are distinct keys
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # flatten_mapping below folds the merged keys in, ahead of the explicit ones
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.get((type(key), key))
                except TypeError:  # a list or mapping as a key ([x, y]: 1): no dict can hold it
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark,
                        f"found a {type(key).__name__} as a key: mapping keys must be strings",
                        key_node.start_mark) from None
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark,
                        f"found the key {key!r} twice (first on line {first.start_mark.line + 1})",
                        key_node.start_mark)
                seen[(type(key), key)] = key_node
            self.flatten_mapping(node)  # as SafeConstructor.construct_mapping does; merged keys come first
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        """An integer, or, for one longer than Python converts (4,300 digits by default), an error that says where
        it is, where Python's names no key."""
        try:
            return int(super().construct_yaml_int(node))
        except ValueError:
            digits = sum(c.isdigit() for c in str(node.value))
            raise yaml.constructor.ConstructorError(
                None, None, f"found a number of {digits} digits; a config's numbers have at most "
                f"{sys.get_int_max_str_digits()}", node.start_mark) from None

    yaml_constructors: ClassVar[dict[Any, Any]] = {**yaml.SafeLoader.yaml_constructors,
                                                   "tag:yaml.org,2002:int": construct_yaml_int}


def _named(text: str, path: Path) -> io.StringIO:
    """``text`` as a stream named ``path``, so YAML's error marks name the file."""
    stream = io.StringIO(text)
    stream.name = str(path)
    return stream


# The most a config file may hold; reading stops there (a device such as /dev/zero never ends).
MAX_CONFIG_BYTES = 16 * 2**20


def load_config(path: str | Path, *, check_env: bool = True, require_vars: bool = True) -> RouterConfig:
    """Read and validate a YAML config file (``parse_config`` says what the two checks are)."""
    path = Path(path)
    try:
        with path.open("rb") as file:  # at most one byte more than a config may hold: /dev/zero ends too
            data = file.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError(str(path), [("<file>", f"larger than {MAX_CONFIG_BYTES // 2**20} MiB: a config is a few "
                                                     "KB (training data goes in the files gate.train_data names)")])
        text = data.decode("utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [("<file>", f"cannot read: {exc.strerror}")]) from exc
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1
        raise ConfigError(str(path), [("<file>", f"not UTF-8 text: byte 0x{exc.object[exc.start]:02x} on line {line} "
                                                 "cannot be decoded; save the file as UTF-8")]) from exc
    try:
        raw = yaml.load(_named(text, path), Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [("<yaml>", str(exc).replace("\n", " "))]) from exc
    except RecursionError:  # the parser recurses per level: a file nested hundreds deep
        raise ConfigError(str(path), [("<yaml>", "nested too deeply for the parser; a config nests a few levels")]) \
            from None
    token = _LOADING.set((*_LOADING.get(), path.resolve()))
    try:
        # The folder the path names, symlinks not followed: Kubernetes mounts a ConfigMap's file as a link into
        # a timestamped folder, where "../artifacts" would miss the volume mounted beside the config's folder.
        return parse_config(raw, source=str(path), base_dir=Path(os.path.abspath(path)).parent, check_env=check_env,
                            require_vars=require_vars)
    finally:
        _LOADING.reset(token)


# The config files being loaded, outermost first: a nested router's ``router_config`` that is one of them closes a
# routing cycle, refused by name instead of loaded again without end.
_LOADING: contextvars.ContextVar[tuple[Path, ...]] = contextvars.ContextVar("moe_config_loading", default=())
