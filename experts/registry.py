"""From a config ``type`` to the class that implements it.

Entries are import paths, resolved on first use, so listing a type costs no import of its dependencies.
Adding an expert type is one class and one line here. A package that defines further types (the router's
``router`` type, an expert that is another router) passes its own table, this one extended, as ``types``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING

from experts.errors import ExpertConfigError

if TYPE_CHECKING:
    from experts.base import Expert, ExpertContext, ExpertSpec

__all__ = ["EXPERT_TYPES", "REQUIRES_ENDPOINT", "build_expert", "expert_class"]

EXPERT_TYPES: Mapping[str, str] = {
    "openai": "experts.openai_compat:OpenAICompatibleExpert",
    "vllm": "experts.openai_compat:VllmExpert",
    "replay": "experts.replay:ReplayExpert",
}

# Types that talk to a URL and so need ``endpoint`` in their config.
REQUIRES_ENDPOINT = frozenset({"openai", "vllm"})


def expert_class(type_name: str, types: Mapping[str, str] = EXPERT_TYPES) -> type[Expert]:
    """The class ``types`` maps ``type_name`` to."""
    try:
        target = types[type_name]
    except KeyError:
        raise ExpertConfigError(type_name, f"unknown expert type; known: {', '.join(sorted(types))}") from None
    module_name, _, class_name = target.partition(":")
    cls: type[Expert] = getattr(importlib.import_module(module_name), class_name)
    return cls


def build_expert(config: ExpertSpec, context: ExpertContext | None = None,
                 types: Mapping[str, str] = EXPERT_TYPES) -> Expert:
    """Build the expert a config entry describes, its class found in ``types``."""
    return expert_class(config.type, types)(config, context)
