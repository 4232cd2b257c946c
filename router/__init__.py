"""Router: config, gate, top-k, dispatch, fallback, combine, service and SDK.

The names a user needs are exported here, imported on first use (PEP 562), so ``import router.config`` stays as
light as it was: the SDK's HTTP client, for one, loads only when ``router.Client`` is asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from router.config import ConfigError, RouterConfig, load_config
    from router.sdk import (
        AsyncClient,
        ChatResult,
        Client,
        FeedbackRecord,
        LocalRouter,
        RouterAPIError,
        RouterConnectionError,
        StreamChunk,
    )

# Exported name -> the module that defines it.
_EXPORTS = {
    "AsyncClient": "router.sdk",
    "ChatResult": "router.sdk",
    "Client": "router.sdk",
    "FeedbackRecord": "router.sdk",
    "ConfigError": "router.config",
    "LocalRouter": "router.sdk",
    "RouterAPIError": "router.sdk",
    "RouterConfig": "router.config",
    "RouterConnectionError": "router.sdk",
    "StreamChunk": "router.sdk",
    "load_config": "router.config",
}

__all__ = [
    "AsyncClient",
    "ChatResult",
    "Client",
    "ConfigError",
    "FeedbackRecord",
    "LocalRouter",
    "RouterAPIError",
    "RouterConfig",
    "RouterConnectionError",
    "StreamChunk",
    "load_config",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'router' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
