"""The expert interface: one method that answers a chat request.

An expert knows how to talk to one model and nothing about routing. ``generate`` is the whole contract;
``stream`` has a default built on it, which endpoints with native streaming override.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from experts.types import ChatRequest, ExpertReply, StreamDelta, Usage

if TYPE_CHECKING:
    from router.config import ExpertConfig

__all__ = ["Expert", "ExpertContext", "cost_of"]


def cost_of(usage: Usage, input_per_1k: float, output_per_1k: float) -> float:
    """USD cost of one call at per-1k-token prices."""
    return usage.prompt_tokens / 1000.0 * input_per_1k + usage.completion_tokens / 1000.0 * output_per_1k


@dataclass
class ExpertContext:
    """What the router shares with every expert it builds.

    ``base_dir`` resolves relative paths in an expert's config. ``transport`` injects the network: tests pass
    ``httpx.ASGITransport`` or a mock transport, production leaves it ``None`` for real sockets.
    """

    base_dir: Path = field(default_factory=Path.cwd)
    transport: httpx.AsyncBaseTransport | None = None


class Expert(ABC):
    """One model behind one endpoint."""

    def __init__(self, config: ExpertConfig, context: ExpertContext | None = None) -> None:
        self.config = config
        self.name = config.name
        self.context = context or ExpertContext()

    @abstractmethod
    async def generate(self, request: ChatRequest) -> ExpertReply:
        """Answer ``request``; raise an ``ExpertError`` on any failure."""

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamDelta]:
        """Yield the answer in pieces. The default yields the whole answer as one piece."""
        reply = await self.generate(request)
        yield StreamDelta(content=reply.content, tool_calls=reply.tool_calls, logprobs=reply.logprobs,
                          refusal=reply.refusal or "")
        yield StreamDelta(finish_reason=reply.finish_reason, usage=reply.usage, cost_usd=reply.cost_usd)

    def cost(self, usage: Usage) -> float:
        return cost_of(usage, self.config.cost.input_per_1k, self.config.cost.output_per_1k)

    async def aclose(self) -> None:
        """Release connections. Experts without any keep the default."""
