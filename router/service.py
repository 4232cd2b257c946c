"""The HTTP service: OpenAI-compatible chat completions, plus the gate's decision and the expert list.

Handlers are thin: they validate, call the one ``Orchestrator`` held on ``app.state``, and map domain errors
to status codes with OpenAI-style error bodies ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from experts.types import ChatRequest
from router.fallback import AllExpertsFailed
from router.orchestrator import Orchestrator, StreamEnd, StreamPiece, UnknownExpert

__all__ = ["RouteQuery", "create_app", "error_body"]


class RouteQuery(BaseModel):
    query: str | None = None
    messages: list[dict[str, Any]] | None = None


class _HTTPProblem(Exception):
    def __init__(self, status: int, message: str, type_: str, code: str, param: str | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.extra = extra or {}


def error_body(message: str, type_: str, code: str, param: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code, **extra}}


def _problem_response(problem: _HTTPProblem) -> JSONResponse:
    body = error_body(problem.message, problem.type, problem.code, problem.param, **problem.extra)
    return JSONResponse(body, status_code=problem.status)


def _all_failed(exc: AllExpertsFailed) -> _HTTPProblem:
    return _HTTPProblem(503, str(exc), "service_unavailable", "all_experts_failed", extra={"causes": exc.to_list()})


async def _read_json(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _HTTPProblem(413, f"request body of {declared} bytes exceeds the {limit}-byte limit",
                           "invalid_request_error", "request_too_large")
    raw = await request.body()
    if len(raw) > limit:
        raise _HTTPProblem(413, f"request body of {len(raw)} bytes exceeds the {limit}-byte limit",
                           "invalid_request_error", "request_too_large")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _HTTPProblem(400, f"request body is not valid JSON: {exc}", "invalid_request_error",
                           "invalid_json") from None


def _parse_chat(body: Any, max_chars: int) -> ChatRequest:
    if not isinstance(body, dict):
        raise _HTTPProblem(400, "request body must be a JSON object", "invalid_request_error", "invalid_request")
    try:
        chat = ChatRequest.model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<body>'}: {e['msg']}" for e in exc.errors())
        first = ".".join(str(p) for p in exc.errors()[0]["loc"]) or None
        raise _HTTPProblem(400, f"invalid request: {problems}", "invalid_request_error", "invalid_request",
                           param=first) from None
    chars = sum(len(m.text()) for m in chat.messages)
    if chars > max_chars:
        raise _HTTPProblem(400, f"the messages hold {chars} characters, over the limit of {max_chars}",
                           "invalid_request_error", "context_length_exceeded", param="messages")
    return chat


def _completion_body(answer: Any, request_id: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": answer.content}
    if answer.tool_calls:
        message["tool_calls"] = answer.tool_calls
    trace = answer.trace.summary()
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": answer.expert,
        "choices": [{"index": 0, "message": message, "finish_reason": answer.finish_reason, "logprobs": None}],
        "usage": trace["usage"],
        "moe": trace,
    }


def _chunk(request_id: str, model: str, delta: dict[str, Any], finish: str | None = None,
           **extra: Any) -> bytes:
    body = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
    return f"data: {json.dumps(body)}\n\n".encode()


async def _sse(events: AsyncIterator[StreamPiece | StreamEnd], first: StreamPiece | StreamEnd,
               request_id: str) -> AsyncIterator[bytes]:
    model = first.expert if isinstance(first, StreamPiece) else "moe-router"
    yield _chunk(request_id, model, {"role": "assistant", "content": ""})
    event: StreamPiece | StreamEnd | None = first
    try:
        while event is not None:
            if isinstance(event, StreamPiece):
                delta: dict[str, Any] = {"content": event.delta.content} if event.delta.content else {}
                if event.delta.tool_calls:
                    delta["tool_calls"] = event.delta.tool_calls
                yield _chunk(request_id, event.expert, delta)
            else:
                # The final chunk carries the finish reason, usage and the trace, switches included.
                trace = event.trace.summary()
                yield _chunk(request_id, model, {}, event.finish_reason, usage=trace["usage"], moe=trace)
            event = await anext(events, None)
    except AllExpertsFailed as exc:
        p = _all_failed(exc)
        yield f"data: {json.dumps(error_body(p.message, p.type, p.code, **p.extra))}\n\n".encode()
    yield b"data: [DONE]\n\n"


def _problems(handler: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
    """Turn the domain errors a handler raises into OpenAI-style error responses."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except _HTTPProblem as problem:
            return _problem_response(problem)
        except UnknownExpert as exc:
            return _problem_response(_HTTPProblem(404, str(exc), "invalid_request_error", "model_not_found",
                                                  param="model"))
        except AllExpertsFailed as exc:
            return _problem_response(_all_failed(exc))

    wrapped.__name__ = handler.__name__
    return wrapped


def create_app(orchestrator: Orchestrator | None = None,
               factory: Callable[[], Awaitable[Orchestrator]] | None = None) -> FastAPI:
    """The service around one orchestrator, given built or built at startup by ``factory``."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if getattr(app.state, "orchestrator", None) is None:
            if factory is None:
                raise RuntimeError("create_app needs an orchestrator or a factory")
            app.state.orchestrator = await factory()
        try:
            yield
        finally:
            await app.state.orchestrator.aclose()

    app = FastAPI(title="moe-router", version="0.1.0", lifespan=lifespan)
    app.state.orchestrator = orchestrator

    def orch(request: Request) -> Orchestrator:
        return request.app.state.orchestrator

    @_problems
    async def chat_completions(request: Request) -> Response:
        o = orch(request)
        limits = o.config.service
        chat = _parse_chat(await _read_json(request, limits.max_request_bytes), limits.max_prompt_chars)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        strategy = request.headers.get("x-moe-combiner")
        if not chat.stream:
            answer = await o.complete(chat, strategy=strategy)
            return JSONResponse(_completion_body(answer, request_id), headers={"x-moe-expert": answer.expert})
        events = o.stream(chat).__aiter__()
        # Wait for the first event before answering 200, so a total failure is still a clean 503.
        first = await anext(events)
        return StreamingResponse(_sse(events, first, request_id), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache"})

    @_problems
    async def route(request: Request) -> Response:
        o = orch(request)
        body = await _read_json(request, o.config.service.max_request_bytes)
        try:
            query = RouteQuery.model_validate(body)
        except ValidationError as exc:
            raise _HTTPProblem(400, f"invalid request: {exc.errors()[0]['msg']}", "invalid_request_error",
                               "invalid_request") from None
        if query.query is not None:
            body = {"messages": [{"role": "user", "content": query.query}]}
        chat = _parse_chat(body, o.config.service.max_prompt_chars)
        decision = await o.decide(chat)
        return JSONResponse(decision.model_dump())

    async def models(request: Request) -> Response:
        o = orch(request)
        names = ["auto", o.config.service.name, *o.config.expert_names]
        return JSONResponse({"object": "list", "data": [
            {"id": n, "object": "model", "created": 0, "owned_by": "moe-router"} for n in names]})

    async def experts(request: Request) -> Response:
        o = orch(request)
        return JSONResponse({"object": "list", "data": [
            {"name": e.name, "type": e.type, "model": e.model, "description": e.description,
             "capabilities": list(e.capabilities), "cost": e.cost.model_dump(),
             "max_concurrency": e.max_concurrency, "in_flight": o.capacity.in_flight[e.name]}
            for e in o.config.experts]})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "experts": len(orch(request).experts)})

    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/route", route, methods=["POST"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/v1/experts", experts, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    return app
