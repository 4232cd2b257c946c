"""The OpenAI-format error object, defined once: ``{"error": {"message", "type", "param", "code", ...}}``.

The service answers with it, ``AllExpertsFailed`` carries it, and the SDK raises it in ``RouterAPIError`` for
failures in process (``LocalRouter``), so what a client reads is the same wherever the router runs. It imports
nothing: ``router.fallback`` and the SDK (a client, without FastAPI) use it as the service does.

The exceptions the object describes stay with the code that raises them: ``AllExpertsFailed`` in
``router.fallback``, ``UnknownExpert`` and ``NoCapableExpert`` in ``router.orchestrator``; ``experts.errors``
is the experts' own error tree.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["error_body", "naming_config", "retry_after_header"]


def error_body(message: str, type_: str, code: str, param: str | None = None, **extra: Any) -> dict[str, Any]:
    """OpenAI's error object: its four keys in OpenAI's order, ``param`` always present (null when no single
    request field is at fault), then any fields of the router's own after them (``causes``: each expert's)."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code, **extra}}


def retry_after_header(seconds: float | None) -> dict[str, str]:
    """``Retry-After`` in whole seconds (rounded up, at least 1, as RFC 9110's delay-seconds), or no header."""
    return {} if seconds is None else {"retry-after": str(max(1, math.ceil(seconds)))}


def naming_config(message: object, config: str | None) -> str:
    """An error's message with the config file named where the library could not know it: its messages say
    ``moe train --config <this config>``, and the CLI and the reloader, which know the file, fill it in so the
    command can be copied as it stands."""
    return str(message) if config is None else str(message).replace("<this config>", config)
