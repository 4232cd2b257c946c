"""Experts: how to talk to one model. Nothing here knows about routing."""

from experts.base import CostSpec, Expert, ExpertContext, ExpertSpec, ReplaySpec, cost_of
from experts.errors import (
    ExpertAuthError,
    ExpertConfigError,
    ExpertError,
    ExpertHTTPError,
    ExpertOverloaded,
    ExpertProtocolError,
    ExpertRateLimited,
    ExpertRejected,
    ExpertServerError,
    ExpertTimeout,
    ExpertUnavailable,
    NoRecording,
)
from experts.registry import EXPERT_TYPES, build_expert, expert_class
from experts.types import ChatMessage, ChatRequest, ExpertReply, StreamDelta, Usage

__all__ = [
    "EXPERT_TYPES",
    "ChatMessage",
    "ChatRequest",
    "CostSpec",
    "Expert",
    "ExpertAuthError",
    "ExpertConfigError",
    "ExpertContext",
    "ExpertError",
    "ExpertHTTPError",
    "ExpertOverloaded",
    "ExpertProtocolError",
    "ExpertRateLimited",
    "ExpertRejected",
    "ExpertReply",
    "ExpertServerError",
    "ExpertSpec",
    "ExpertTimeout",
    "ExpertUnavailable",
    "NoRecording",
    "ReplaySpec",
    "StreamDelta",
    "Usage",
    "build_expert",
    "cost_of",
    "expert_class",
]
