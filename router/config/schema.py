"""The config's schema: typed, strict and bounded models, one per section of the YAML file (``RouterConfig`` is the
whole file). What one field cannot check alone, references between sections and the environment, is in
``router.config.checks``; reading a file, expanding its ``${VAR}`` references and reporting every problem at once,
in ``router.config.load``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from experts.plugins import COMBINER_GROUP, ENCODER_GROUP, PluginError, installed, load
from experts.types import is_blank
from router.encoder_types import ENCODER_BACKENDS, known_backends
from router.fallback import MAX_BUDGET_USD, MAX_DEADLINE_S

SCHEMA_VERSION = 1
# The model name that asks the gate to route (beside ``service.name``): no expert may take it.
ROUTED_MODEL = "auto"
# How a combiner reads a final answer out of free text (``router.combine.EXTRACTORS``).
Extractor = Literal["choice", "number", "short"]
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@/:+-]{0,127}$"
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
# An expert's endpoint: the scheme here, the rest (host, port, no query) in ``_endpoint_problems``.
HTTP_URL_PATTERN = r"^https?://\S+$"


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


def path_problem(value: str) -> str | None:
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
    problem = path_problem(value)
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
    # One of ``router.encoder_types.ENCODER_BACKENDS``, or an installed package's (``experts.plugins.ENCODER_GROUP``).
    backend: str = Field(default="onnx", min_length=1)
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

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, backend: str) -> str:
        if backend in ENCODER_BACKENDS:
            return backend
        if backend not in installed(ENCODER_GROUP):
            known = known_backends()
            raise ValueError(f"unknown encoder backend {backend!r}; known: {', '.join(known)} (an installed package "
                             f"adds one through an entry point of group {ENCODER_GROUP!r})")
        from router.encoders import Encoder  # numpy: imported only for a name that is not built in

        try:  # its class imported, so that one serve cannot load is refused here
            load(ENCODER_GROUP, backend, Encoder)
        except PluginError as exc:
            raise ValueError(f"encoder backend {backend!r}: {exc}") from None
        return backend

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


# The built-in combiner strategies (``router.combine.COMBINERS``; a test holds the two equal). Another name is looked
# up where strategies are registered: ``COMBINERS`` itself, and installed packages' entry points.
STRATEGIES = ("top1", "vote", "consensus", "fuse", "escalate")


class CombinerConfig(_Strict):
    """How a panel's answers become one (``router.combine``): ``top1`` | ``vote`` | ``consensus`` | ``fuse`` |
    ``escalate``.

    ``consensus`` embeds the answers with the gate's encoder. ``fuse`` asks ``aggregator``, a configured expert,
    to write the final answer from the panel's; naming an aggregator also lets a request pick ``fuse`` with the
    ``x-moe-combiner`` header while another strategy is the default. ``escalate`` keeps the panel's answer when
    all of it agrees and otherwise asks ``escalate_to``, a configured expert; naming one likewise lets a request
    pick ``escalate``."""

    strategy: str = Field(default="top1", min_length=1)
    # How ``vote`` and ``escalate`` read a final answer out of free text; ``top1`` and ``fuse`` use it to mark
    # which answers agree. An expert's own ``extractor`` overrides it for that expert's answers.
    extractor: Extractor = "choice"
    # The expert that writes ``fuse``'s answer; must be one of ``experts`` (cross-checked at load).
    aggregator: str | None = Field(default=None, pattern=NAME_PATTERN)
    # The expert that answers when ``escalate``'s panel disagrees (typically the strongest and dearest); must be
    # one of ``experts`` (cross-checked at load).
    escalate_to: str | None = Field(default=None, pattern=NAME_PATTERN)
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

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, strategy: str) -> str:
        if strategy in STRATEGIES:
            return strategy
        from router.combine import combiner_class  # numpy: imported only for a name that is not built in

        try:
            combiner_class(strategy)  # an entry point's class is imported, so that one serve cannot load is refused
        except ValueError as exc:
            plugins = f" (an installed package adds one through an entry point of group {COMBINER_GROUP!r})"
            raise ValueError(f"{exc}{plugins if str(exc).startswith('unknown') else ''}") from None
        return strategy


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
    name: str = Field(default="moe-router", pattern=NAME_PATTERN)
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

    name: str = Field(pattern=NAME_PATTERN)
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    # Overrides ``security.rate_limit`` for this key.
    rate_limit: RateLimitConfig | None = None


class SecurityConfig(_Strict):
    """Client keys, the admin key and rate limits (see ``router.security``). Nothing set: ``/v1`` stays open."""

    api_keys: list[ApiKeyConfig] = []
    # An environment variable holding comma-separated raw client keys, hashed at startup. Once named, ``/v1``
    # needs a key even while the variable is empty: a missing secret fails closed.
    api_keys_env: str | None = Field(default=None, pattern=ENV_NAME_PATTERN)
    # The environment variable holding the admin key; unset, the ``/admin`` endpoints refuse every call.
    admin_key_env: str | None = Field(default=None, pattern=ENV_NAME_PATTERN)
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
    url_env: str = Field(default="MOE_REDIS_URL", pattern=ENV_NAME_PATTERN)
    # Every key starts with this, so several routers (or other apps) can share one Redis.
    key_prefix: str = Field(default="moe:", max_length=64)

    def redis_url(self, environ: Mapping[str, str]) -> str:
        """The URL in ``url_env``, stripped; a ``ConfigError`` naming the variable, never its value, where it holds
        none redis-py can read."""
        url = environ.get(self.url_env, "").strip()
        from router.config.checks import redis_url_problem  # as in RouterConfig._cross_check

        problem = redis_url_problem(self.url_env, url, is_set=self.url_env in environ)
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


# The type of the error ``RouterConfig``'s cross-check raises, whose context holds its ``problems``.
CROSS_CHECK = "cross_check"


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

