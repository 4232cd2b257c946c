"""The expert interface: one method that answers a chat request.

An expert knows how to talk to one model and nothing about routing. ``generate`` is the whole contract;
``stream`` has a default built on it, which endpoints with native streaming override.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from experts.types import ChatRequest, ExpertReply, StreamDelta, Usage

if TYPE_CHECKING:
    import httpx  # an annotation only: importing experts (a config, say) need not load the HTTP client

__all__ = ["CostSpec", "Expert", "ExpertContext", "ExpertSpec", "ReplaySpec", "cost_of"]


# What an expert reads of its config entry, as read-only protocols: ``router.config.ExpertConfig`` is one (the
# router's schema, validated at load), and experts never import the router to know it.
class CostSpec(Protocol):
    """USD per 1,000 tokens."""

    @property
    def input_per_1k(self) -> float: ...
    @property
    def output_per_1k(self) -> float: ...


class ReplaySpec(Protocol):
    """Where a replay expert finds its recordings (``source``, ``path``), the recorded model's column (None: the
    expert's ``model``) and the simulated service time per call."""

    @property
    def source(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def column(self) -> str | None: ...
    @property
    def latency_ms(self) -> float: ...


class ExpertSpec(Protocol):
    """One expert's settings: its name, type and model, where it answers (``endpoint``, the base URL that
    ``/chat/completions`` goes after), its limits and prices, and for a replay expert its recordings."""

    @property
    def name(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def endpoint(self) -> str | None: ...
    @property
    def model(self) -> str: ...
    @property
    def timeout_s(self) -> float: ...
    @property
    def max_concurrency(self) -> int: ...
    @property
    def keepalive_s(self) -> float: ...
    @property
    def cost(self) -> CostSpec: ...
    @property
    def replay(self) -> ReplaySpec | None: ...
    @property
    def recorded_model(self) -> str: ...
    @property
    def capabilities(self) -> Sequence[str]: ...

    def api_key(self) -> str | None:
        """The bearer key, read from the environment when a client is built; None: the endpoint needs none."""


def cost_of(usage: Usage, input_per_1k: float, output_per_1k: float) -> float:
    """USD cost of one call at per-1k-token prices."""
    return usage.prompt_tokens / 1000.0 * input_per_1k + usage.completion_tokens / 1000.0 * output_per_1k


@dataclass
class ExpertContext:
    """What the router shares with every expert it builds.

    ``base_dir`` resolves relative paths in an expert's config. ``transport`` injects the network: tests pass
    ``httpx.ASGITransport`` or a mock transport, production leaves it ``None`` for real sockets. ``log_content``
    comes from the router's config (``build_experts``).
    """

    base_dir: Path = field(default_factory=Path.cwd)
    transport: httpx.AsyncBaseTransport | None = None
    # ``service.log_content``: an expert's log lines may quote what an upstream's error says, which can hold the
    # prompt (a 422's ``detail[].input``); off, they name the error's type and code only.
    log_content: bool = False


class Expert(ABC):
    """One model behind one endpoint."""

    def __init__(self, config: ExpertSpec, context: ExpertContext | None = None) -> None:
        self.config = config
        self.name = config.name
        self.context = context or ExpertContext()

    @abstractmethod
    async def generate(self, request: ChatRequest) -> ExpertReply:
        """Answer ``request``; raise an ``ExpertError`` on any failure."""

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamDelta]:
        """Yield the answer in pieces. The default yields the whole answer as one piece."""
        reply = await self.generate(request)
        # A reply's tool calls are in a message's form; a stream's are deltas, each with its place in the message
        # (``index``), by which OpenAI's clients put the pieces of a call together.
        calls = [{"index": i, **call} for i, call in enumerate(reply.tool_calls)] if reply.tool_calls else None
        yield StreamDelta(content=reply.content, tool_calls=calls, logprobs=reply.logprobs,
                          refusal=reply.refusal or "", reasoning_content=reply.reasoning_content or "")
        yield StreamDelta(finish_reason=reply.finish_reason, usage=reply.usage, cost_usd=reply.cost_usd,
                          usage_estimated=reply.usage_estimated)

    def cost(self, usage: Usage) -> float:
        return cost_of(usage, self.config.cost.input_per_1k, self.config.cost.output_per_1k)

    async def aclose(self) -> None:
        """Release connections. Experts without any keep the default."""
