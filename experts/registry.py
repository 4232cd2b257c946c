"""From a config ``type`` to the class that implements it.

Entries are import paths, resolved on first use, so listing a type costs no import of its dependencies.
Adding an expert type is one class and one line here. A package that defines further types (the router's
``router`` type, an expert that is another router) passes its own table, this one extended, as ``types``. An
installed package adds types through entry points (``experts.plugins``), found when a name is in no table.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING

from experts.errors import ExpertConfigError
from experts.plugins import EXPERT_GROUP, PluginError, installed, load

if TYPE_CHECKING:
    from experts.base import Expert, ExpertContext, ExpertSpec

__all__ = ["EXPERT_TYPES", "REQUIRES_ENDPOINT", "build_expert", "expert_class", "known_types"]

EXPERT_TYPES: dict[str, str] = {
    "openai": "experts.openai_compat:OpenAICompatibleExpert",
    "vllm": "experts.openai_compat:VllmExpert",
    "replay": "experts.replay:ReplayExpert",
}

# Types that talk to a URL and so need ``endpoint`` in their config.
REQUIRES_ENDPOINT = frozenset({"openai", "vllm"})


def known_types(types: Mapping[str, str] = EXPERT_TYPES) -> list[str]:
    """The names ``types`` and the installed packages' entry points (``experts.plugins.EXPERT_GROUP``) give."""
    return sorted({*types, *installed(EXPERT_GROUP)})


def expert_class(type_name: str, types: Mapping[str, str] = EXPERT_TYPES) -> type[Expert]:
    """The class ``types`` maps ``type_name`` to, else the one an installed package's entry point names."""
    from experts.base import Expert

    if type_name not in types:
        if type_name not in installed(EXPERT_GROUP):
            raise ExpertConfigError(type_name, f"unknown expert type; known: {', '.join(known_types(types))}")
        try:
            plugin: type[Expert] = load(EXPERT_GROUP, type_name, Expert)
        except PluginError as exc:
            raise ExpertConfigError(type_name, str(exc)) from exc
        return plugin
    module_name, _, class_name = types[type_name].partition(":")
    cls: type[Expert] = getattr(importlib.import_module(module_name), class_name)
    return cls


def build_expert(config: ExpertSpec, context: ExpertContext | None = None,
                 types: Mapping[str, str] = EXPERT_TYPES) -> Expert:
    """Build the expert a config entry describes, its class found in ``types``."""
    return expert_class(config.type, types)(config, context)
