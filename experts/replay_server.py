"""Serve any list of experts as one OpenAI-compatible endpoint; the request's ``model`` picks the expert.

Built for replay experts, so a router (or any OpenAI client) can call recorded models over real HTTP::

    GET  /v1/models             the experts' names
    POST /v1/chat/completions   plain JSON, or SSE with ``data: [DONE]`` when ``stream`` is true
    GET  /health

The USD cost goes in ``usage.cost``, OpenRouter's convention, which ``OpenAICompatibleExpert`` reads back.
Errors use OpenAI's body, ``{"error": {"message", "type", "code"}}``: unknown model and ``NoRecording`` are
404, a malformed body 400, other expert errors 502 (503 for transient ones). ``OpenAICompatibleExpert`` reads a
404 with code ``no_recording`` back as ``NoRecording`` (the prompt's, which no breaker counts), not as a model the
endpoint lacks.

``moe serve-replay --config configs/demo.yaml --port 8001`` serves a router config's replay experts with it (the
command lives in ``router.cli``: reading a router config is the router's business, not the experts').
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from experts.base import Expert
from experts.errors import ExpertError, NoRecording
from experts.types import ChatRequest, ExpertReply, StreamDelta, Usage

__all__ = ["create_app"]


def _error(status: int, message: str, type_: str, code: str,
           headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": None, "code": code}},
                        status_code=status, headers=headers)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own errors (an unknown path, a method a route does not take) in OpenAI's error body, as the
    rest: an OpenAI client reads its code."""
    assert isinstance(exc, StarletteHTTPException)
    message = {404: f"no route {request.method} {request.url.path}",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
    return _error(exc.status_code, message, "invalid_request_error", code, exc.headers)


def _expert_error(exc: ExpertError) -> JSONResponse:
    if isinstance(exc, NoRecording):
        return _error(404, str(exc), "not_found_error", exc.kind)
    return _error(503 if exc.transient else 502, str(exc), "upstream_error", exc.kind)


def _usage_body(usage: Usage | None, cost_usd: float | None) -> dict[str, Any]:
    body = (usage or Usage()).model_dump()
    if cost_usd is not None:
        body["cost"] = cost_usd
    return body


def _completion(reply: ExpertReply, model: str, completion_id: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if reply.tool_calls:
        message["tool_calls"] = reply.tool_calls
    if reply.reasoning_content is not None:  # as vLLM's reasoning parsers send it
        message["reasoning_content"] = reply.reasoning_content
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": reply.finish_reason}],
        "usage": _usage_body(reply.usage, reply.cost_usd),
    }


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def _sse_events(
    first: StreamDelta | None, rest: AsyncIterator[StreamDelta], model: str, include_usage: bool
) -> AsyncIterator[str]:
    """OpenAI's chunk sequence: role, content pieces, finish_reason, then (if asked) a usage-only chunk."""
    base = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
    }

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> str:
        return _sse({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]})

    yield chunk({"role": "assistant", "content": ""})
    usage: Usage | None = None
    cost: float | None = None
    delta: StreamDelta | None = first
    try:
        while delta is not None:
            body: dict[str, Any] = {}
            if delta.content:
                body["content"] = delta.content
            if delta.tool_calls:
                body["tool_calls"] = delta.tool_calls
            if delta.reasoning_content:
                body["reasoning_content"] = delta.reasoning_content
            if body or delta.finish_reason:
                yield chunk(body, delta.finish_reason)
            usage, cost = delta.usage or usage, delta.cost_usd if delta.cost_usd is not None else cost
            delta = await anext(rest, None)
    except ExpertError as exc:
        # Headers are sent: the failure can only travel as an error event, as OpenAI's API does mid-stream.
        yield _sse({"error": {"message": str(exc), "type": "upstream_error", "code": exc.kind}})
    else:
        if include_usage:
            yield _sse({**base, "choices": [], "usage": _usage_body(usage, cost)})
    yield "data: [DONE]\n\n"


# No recorded prompt comes near this: a larger body is refused as it arrives, never held whole.
MAX_BODY_BYTES = 4_000_000


async def _parse(request: Request) -> ChatRequest | JSONResponse:
    too_large = _error(413, f"request body exceeds the {MAX_BODY_BYTES}-byte limit", "invalid_request_error",
                       "request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return too_large
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > MAX_BODY_BYTES:
            return too_large
        parts.append(part)
    try:
        raw = json.loads(b"".join(parts))
    except RecursionError:
        return _error(400, "the body is nested too deeply to be a chat request", "invalid_request_error",
                      "invalid_json")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _error(400, "the body is not valid JSON", "invalid_request_error", "invalid_json")
    try:
        return ChatRequest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        return _error(400, f"invalid request: {problems}", "invalid_request_error", "invalid_request")


def create_app(experts: Sequence[Expert]) -> FastAPI:
    """An app serving ``experts`` by name. The caller owns them (and closes them)."""
    by_name = {e.name: e for e in experts}
    if len(by_name) != len(experts):
        raise ValueError("expert names must be unique")
    app = FastAPI(title="replay experts", docs_url=None, redoc_url=None)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.state.experts = by_name

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": by_name[name].config.model}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "experts": list(by_name)}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(n) for n in by_name]}

    @app.get("/v1/models/{model:path}", response_model=None)
    async def model(model: str) -> dict[str, Any] | JSONResponse:
        if model not in by_name:
            known = ", ".join(by_name) or "none"
            return _error(404, f"unknown model {model!r}; known: {known}", "not_found_error", "model_not_found")
        return model_card(model)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> JSONResponse | StreamingResponse:
        parsed = await _parse(request)
        if isinstance(parsed, JSONResponse):
            return parsed
        expert = by_name.get(parsed.model)
        if expert is None:
            known = ", ".join(by_name) or "none"
            return _error(404, f"unknown model {parsed.model!r}; known: {known}", "not_found_error", "model_not_found")
        try:
            if not parsed.stream:
                reply = await expert.generate(parsed)
                return JSONResponse(_completion(reply, parsed.model, f"chatcmpl-{uuid.uuid4().hex}"))
            # Pull the first piece before answering, so a missing recording is still a plain 404.
            pieces = expert.stream(parsed)
            first = await anext(pieces, None)
        except ExpertError as exc:
            return _expert_error(exc)
        options = (parsed.model_extra or {}).get("stream_options") or {}
        include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
        return StreamingResponse(
            _sse_events(first, pieces, parsed.model, include_usage), media_type="text/event-stream"
        )

    return app
