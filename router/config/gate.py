"""The gate's section: the encoder, the classifier, top-k, the two-stage cascade and the training data."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from experts.plugins import ENCODER_GROUP, PluginError, installed, load
from router.config.fields import (
    FilePath,
    Strict,
)
from router.encoder_types import ENCODER_BACKENDS, known_backends


class EncoderConfig(Strict):
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


class TopKConfig(Strict):
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


class CascadeConfig(Strict):
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


class GateConfig(Strict):
    encoder: EncoderConfig = EncoderConfig()
    # A fast first stage; None: one gate decides every query.
    cascade: CascadeConfig | None = None
    # The trained classifier; ``moe train`` writes it. Relative to the config file.
    artifact: FilePath = "artifacts/gate"
    # JSONL files ``moe train`` learns from, each detected by its first record: labelled ({"query", "label"}),
    # trained with the experts' examples into a label gate, or outcome records ({"query", "outcomes": {expert:
    # score in [0, 1]}, "cost": {expert: cost}}), trained into an outcome gate. All files must be one kind.
    train_data: list[FilePath] = Field(default=[])
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
