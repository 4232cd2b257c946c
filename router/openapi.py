"""The request bodies of the service's routes, for its OpenAPI schema.

The handlers read the raw request (so they can enforce the size limit before parsing and answer bad JSON with
an OpenAI-style error), which leaves FastAPI nothing to describe. These ``openapi_extra`` blocks describe the
bodies from the same pydantic models the handlers validate with, inlined because an operation's extra block
cannot add to ``components``. Clients' generators and schemathesis read them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from experts.types import ChatRequest

__all__ = ["CHAT_COMPLETIONS_BODY", "ROUTE_BODY", "describe_request_bodies", "request_body"]


class _RouteBody(BaseModel):
    """What ``POST /v1/route`` reads: a bare query, or OpenAI-style messages."""

    query: str | None = None
    messages: list[dict[str, Any]] | None = None


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline(defs[ref.removeprefix("#/$defs/")], defs)
        return {k: _inline(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """An ``openapi_extra`` value: ``model`` as the required JSON body, with no ``$ref`` left in it."""
    schema = model.model_json_schema()
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": _inline(schema, schema.get("$defs", {}))}}}}


CHAT_COMPLETIONS_BODY = request_body(ChatRequest)
ROUTE_BODY = request_body(_RouteBody)
_BODIES = {"/v1/chat/completions": CHAT_COMPLETIONS_BODY, "/v1/route": ROUTE_BODY}


def describe_request_bodies(app: Any) -> None:
    """Set the bodies on an app's routes that do not describe one yet; call before the schema is first built."""
    for route in app.router.routes:
        extra = _BODIES.get(getattr(route, "path", ""))
        if extra is not None and not getattr(route, "openapi_extra", None):
            route.openapi_extra = extra
    app.openapi_schema = None
