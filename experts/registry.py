"""From a config ``type`` to the class that implements it.

Entries are import paths, resolved on first use, so listing a type costs no import of its dependencies.
Adding an expert type is one class and one line here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from experts.errors import ExpertConfigError

if TYPE_CHECKING:
    from experts.base import Expert, ExpertContext
    from router.config import ExpertConfig

__all__ = ["EXPERT_TYPES", "REQUIRES_ENDPOINT", "build_expert", "expert_class"]

EXPERT_TYPES: dict[str, str] = {
    "openai": "experts.openai_compat:OpenAICompatibleExpert",
    "vllm": "experts.openai_compat:OpenAICompatibleExpert",
    "replay": "experts.replay:ReplayExpert",
    # Another router, in-process or over HTTP; it lives in ``router`` because it needs the orchestrator.
    "router": "router.hierarchy:RouterExpert",
}

# Types that talk to a URL and so need ``endpoint`` in their config.
REQUIRES_ENDPOINT = frozenset({"openai", "vllm"})


def expert_class(type_name: str) -> type[Expert]:
    try:
        target = EXPERT_TYPES[type_name]
    except KeyError:
        raise ExpertConfigError(type_name, f"unknown expert type; known: {', '.join(sorted(EXPERT_TYPES))}") from None
    module_name, _, class_name = target.partition(":")
    cls: type[Expert] = getattr(importlib.import_module(module_name), class_name)
    return cls


def build_expert(config: ExpertConfig, context: ExpertContext | None = None) -> Expert:
    """Build the expert a config entry describes."""
    return expert_class(config.type)(config, context)
