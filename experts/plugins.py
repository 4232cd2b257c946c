"""Extensions that installed packages declare through entry points, found by name when a config or a request names
one that is not built in: the ``moe`` command, the service and the SDK see them with no import of the package.

A package adds an expert type in its ``pyproject.toml``::

    [project.entry-points."moe_router.experts"]
    pyfunc = "my_package.experts:PyFuncExpert"

and likewise a combiner strategy (``moe_router.combiners``, a ``router.combine.Combiner``) or a gate encoder backend
(``moe_router.encoders``, a ``router.encoders.Encoder``). A built-in name always means the built-in.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

__all__ = ["COMBINER_GROUP", "ENCODER_GROUP", "EXPERT_GROUP", "PluginError", "installed", "load"]

EXPERT_GROUP = "moe_router.experts"
COMBINER_GROUP = "moe_router.combiners"
ENCODER_GROUP = "moe_router.encoders"


class PluginError(ImportError):
    """An entry point names what cannot be imported, or what is not the kind of class its group holds."""


@functools.cache
def installed(group: str) -> Mapping[str, str]:
    """Each entry point of ``group`` in the installed packages: its name -> ``module:attribute``. Read once per
    process, and only when asked: the scan of every package's metadata takes tens of milliseconds."""
    from importlib.metadata import entry_points

    return MappingProxyType({ep.name: ep.value for ep in entry_points(group=group)})


def load(group: str, name: str, kind: type) -> Any:
    """The class entry point ``name`` of ``group`` names, which must be a subclass of ``kind``. Raises
    ``PluginError`` naming the entry point, its target and what went wrong."""
    target = installed(group)[name]
    where = f"entry point {name!r} of group {group!r} ({target})"
    module_name, _, attribute = target.partition(":")
    try:
        found: Any = importlib.import_module(module_name)
        for part in attribute.split(".") if attribute else ():
            found = getattr(found, part)
    except Exception as exc:  # whatever its import raised (ImportError, a SyntaxError, its own error)
        raise PluginError(f"{where} cannot be loaded: {type(exc).__name__}: {exc}") from exc
    if not (isinstance(found, type) and issubclass(found, kind)):
        raise PluginError(f"{where} is not a subclass of {kind.__module__}.{kind.__qualname__}")
    return found
