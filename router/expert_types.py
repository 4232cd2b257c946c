"""The expert types a router config may name: the ``experts`` package's own, and ``router``.

``router`` is an expert that is another router, in-process or over HTTP. It needs the orchestrator, so it lives
in this package, and ``experts`` (which knows nothing of routing) does not list it: the router hands this table
to ``experts.registry.build_expert``, and the config is checked against it.
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Mapping

from experts.registry import EXPERT_TYPES as _EXPERTS_OWN
from experts.registry import REQUIRES_ENDPOINT

__all__ = ["EXPERT_TYPES", "REQUIRES_ENDPOINT"]

# A view, not a copy: a type added to ``experts.EXPERT_TYPES`` after this module was imported is in it too.
EXPERT_TYPES: Mapping[str, str] = ChainMap({"router": "router.hierarchy:RouterExpert"}, _EXPERTS_OWN)
