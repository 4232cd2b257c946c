"""The HTTP service: OpenAI-compatible chat completions, plus the gate's decision and the expert list.

Handlers are thin: they validate, call the one ``Orchestrator`` held on ``app.state``, and map domain errors
to status codes with OpenAI-style error bodies ``{"error": {"message", "type", "param", "code"}}``
(``router.errors.error_body``, re-exported here). The checks themselves, and the ``RequestProblem`` a bad
request raises, live in ``router.requests``, which ``LocalRouter`` shares without importing FastAPI; the public
ones are re-exported here too.

Around them one ASGI layer, ``router.edge.Edge``, gives each request an id, checks client keys and rate limits on
``/v1`` and the admin key on ``/admin`` (``router.security``), then feeds ``/metrics`` (``router.metrics``)
and writes one JSON log line (``router.logs``) once the response, a stream included, has ended. What every
handler shares (the body's limits, the limit headers, a client that leaves, error responses) is
``router.handling``; the answer's body and a stream's events in OpenAI's format are ``router.completions``.

With a feedback store (``router.feedback``), each answer's query and expert are remembered under its response
id, ``POST /v1/feedback`` takes a verdict on an answer, and ``GET /admin/feedback`` exports the verdicts.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from router.completions import Chunks, FiniteJSONResponse, began_by, completion_body, include_usage, sse
from router.edge import STALLED as STALLED  # where they were before router.edge
from router.edge import ClientStalled as ClientStalled
from router.edge import (
    Edge,
    guard,
    reguard,
    request_record,
)
from router.errors import error_body
from router.feedback import FeedbackBody, FeedbackStore, answer_owner
from router.handling import (
    ClientLeft,
    combiner_header,
    limits_headers,
    problems,
    read_json,
    unless_client_leaves,
)
from router.logs import configure_json_logging
from router.metrics import CONTENT_TYPE, RouterMetrics
from router.openapi import CHAT_COMPLETIONS_BODY, ROUTE_BODY, request_body
from router.orchestrator import Orchestrator, UnknownExpert
from router.reload import Reloader, ReloadFailed
from router.requests import (
    RequestProblem,
    RouteBatch,
    RouteQuery,
    check_combiner,
    feedback_off,
    parse_chat,
    parse_feedback,
    parse_route,
    parse_route_batch,
    parse_since,
)
from router.security import InMemoryRateStore, RateStore, redact
from router.trace import Trace

__all__ = ["RequestProblem", "RouteBatch", "RouteQuery", "check_combiner", "create_app", "error_body", "parse_chat",
           "parse_route", "parse_route_batch"]

log = logging.getLogger("router.service")


class Closeable(Protocol):
    async def aclose(self) -> None: ...


def create_app(orchestrator: Orchestrator | None = None,
               factory: Callable[[], Awaitable[Orchestrator]] | None = None, *,
               rate_store: RateStore | None = None, environ: Mapping[str, str] | None = None,
               reloader: Reloader | None = None, feedback: FeedbackStore | None = None,
               closes: Sequence[Closeable] = ()) -> FastAPI:
    """The service around one orchestrator, given built or built at startup by ``factory``.

    ``rate_store`` holds the rate-limit buckets (in memory by default; a shared store for several replicas);
    ``environ`` is where keys named by ``security.*_env`` are read (``os.environ`` by default); ``reloader``
    swaps in a new orchestrator when the config changes (``POST /admin/reload``, and its own triggers, which
    run while the app's lifespan does); ``feedback`` stores verdicts on answers (without one, ``/v1/feedback``
    answers 409). The app owns both and closes them when its lifespan ends, and then each of ``closes`` (what
    ``moe serve`` built for every config: its shared state's Redis clients and their outage probes).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for logger in ("router", "experts"):  # the experts' own warnings (a failed call) too
            configure_json_logging(logger=logger)
        if getattr(app.state, "orchestrator", None) is None:
            if factory is None:
                raise RuntimeError("create_app needs an orchestrator or a factory")
            app.state.orchestrator = await factory()
        guard(app)
        if reloader is not None:
            reloader.start()
        try:
            yield
        finally:
            if reloader is not None:
                await reloader.stop()
            await app.state.orchestrator.aclose()
            if feedback is not None:
                await feedback.aclose()
            for resource in closes:
                await resource.aclose()

    app = FastAPI(title="moe-router", version="0.1.0", lifespan=lifespan)
    app.state.orchestrator = orchestrator
    app.state.metrics = RouterMetrics(lambda: app.state.orchestrator, reloads=reloader, stores=lambda: (
        app.state.rate_store, getattr(getattr(app.state.orchestrator, "breakers", None), "store", None),
        app.state.feedback))
    app.state.security = None
    # One store for the app's life: a reload that changes security builds a new guard on the same buckets.
    app.state.rate_store = rate_store if rate_store is not None else InMemoryRateStore()
    app.state.environ = os.environ if environ is None else environ
    if orchestrator is not None:
        guard(app)  # keys are hashed now, at startup, not at the first request
    app.state.reloader = reloader
    app.state.feedback = feedback
    if reloader is not None:
        reloader.bind(app.state, lambda old, new: reguard(app, old, new))
    app.add_middleware(Edge)
    app.add_exception_handler(StarletteHTTPException, _http_error)

    _add_routes(app)
    return app


# -- the handlers: each validates, calls the orchestrator on app.state, and answers ------------------------
def orch(request: Request) -> Orchestrator:
    """The serving object, swapped whole by a reload."""
    return request.app.state.orchestrator


@problems
async def chat_completions(request: Request) -> Response:
    o = orch(request)
    with o.serving():  # counted from now: a reload while the body arrives waits for this request
        return await _chat_completions(request, o)


async def _chat_completions(request: Request, o: Orchestrator) -> Response:
    limits = o.config.service
    chat = parse_chat(await read_json(request, limits.max_request_bytes), limits.max_prompt_chars)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    strategy = combiner_header(request, o, stream=chat.stream)
    caller = limits_headers(request)
    record = request_record(request)
    record.model, record.stream, record.completion_id = chat.model, chat.stream, request_id
    if limits.log_content:
        record.messages, record.answer = [m.model_dump(exclude_none=True) for m in chat.messages], []
    store: FeedbackStore | None = request.app.state.feedback

    def keep(trace: Trace) -> None:  # kept from the start: a client that leaves still has its calls counted
        record.trace = trace

    if not chat.stream:
        answer = await unless_client_leaves(request, o.complete(chat, strategy=strategy, on_trace=keep,
                                                                       caller=caller))
        record.trace, record.expert = answer.trace, answer.expert
        if store is not None:  # the expert a verdict on it rates (Trace.credited: not fuse's aggregator)
            await store.aremember(request_id, chat.query_text(), answer.trace.credited(answer.expert),
                                  answer_owner(request_id, record.key_sha256))
        if record.answer is not None:
            record.answer.append(answer.content)
        return FiniteJSONResponse(completion_body(answer, request_id), headers={"x-moe-expert": answer.expert})
    events = o.stream(chat, on_trace=keep, caller=caller)
    # Wait for the first event before answering 200, so a total failure is still a clean 503.
    try:
        first = await unless_client_leaves(request, anext(events))
    except ClientLeft:
        await events.aclose()
        raise
    # The expert that began the stream (the headers go before any switch; the final chunk's moe.switches says
    # who continued it).
    expert = began_by(first)
    began = {"x-moe-expert": expert} if expert else {}
    on_end = None
    if store is not None:
        query = chat.query_text()
        owner = answer_owner(request_id, record.key_sha256)
        if expert:  # remembered as it begins, so an answer the user stopped early can be rated too
            await store.aremember(request_id, query, expert, owner)

        async def on_end(credited: str) -> None:  # after a switch, the expert that wrote most of it
            if credited != expert:
                await store.aremember(request_id, query, credited, owner)
    body = sse(events, first, Chunks(request_id, include_usage(chat)), record, on_end)
    request.scope["state"]["moe_stream"] = body  # closed by the middleware if the client stops reading it
    return StreamingResponse(body, media_type="text/event-stream", headers={"cache-control": "no-cache", **began})


@problems
async def route(request: Request) -> Response:
    o = orch(request)
    with o.serving():
        body = await read_json(request, o.config.service.max_request_bytes)
        chat = parse_route(body, o.config.service.max_prompt_chars)
        # A client that leaves takes its query out of the gate's queue: no one waits behind work for nobody.
        decision = await unless_client_leaves(request, o.decide(chat))
    return JSONResponse(decision.model_dump())


@problems
async def route_batch(request: Request) -> Response:
    o = orch(request)
    with o.serving():
        return await _route_batch(request, o)


async def _route_batch(request: Request, o: Orchestrator) -> Response:
    body = await read_json(request, o.config.service.max_request_bytes)
    batch = parse_route_batch(body, o.config.service.max_prompt_chars, o.config.expert_names,
                              o.config.service.max_batch_queries)
    experts = await unless_client_leaves(request, o.assign(batch.queries, batch.capacity))
    return JSONResponse({"object": "route.batch", "mode": "expert_choice",
                         "assignments": [{"index": i, "expert": e} for i, e in enumerate(experts)]})


def model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "moe-router"}


async def models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [model_object(n) for n in orch(request).model_names]})


@problems
async def model(request: Request) -> Response:
    name, names = request.path_params["model"], orch(request).model_names
    if name not in names:
        raise UnknownExpert(name, names)  # the 404 model_not_found a chat request naming it gets
    return JSONResponse(model_object(name))


async def experts(request: Request) -> Response:
    o = orch(request)
    states = o.expert_states()  # one snapshot (with Redis, one read of each breaker), not one per expert
    return JSONResponse({"object": "list", "data": [
        {"name": e.name, "type": e.type, "model": e.model, "description": e.description,
         "capabilities": list(e.capabilities), "routed": e.routed, "cost": e.cost.model_dump(),
         "max_concurrency": e.max_concurrency, **states[e.name]}
        for e in o.config.experts]})


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok", "experts": len(orch(request).experts)})


async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)


async def admin_config(request: Request) -> Response:
    return JSONResponse(redact(orch(request).config.model_dump(mode="json")))


@problems
async def admin_reload(request: Request) -> Response:
    active: Reloader | None = request.app.state.reloader
    if active is None:
        raise RequestProblem(409, "hot reload is off: the service was not started from a config file",
                           "invalid_request_error", "reload_unavailable")
    try:
        new = await active.reload()
    except ReloadFailed as exc:
        raise RequestProblem(400, str(exc), "invalid_request_error", "invalid_config", extra={
            "problems": [{"path": p, "message": m} for p, m in exc.problems]}) from None
    return JSONResponse({"status": "reloaded", "source": str(active.path), "experts": new.config.expert_names})


@problems
async def feedback_post(request: Request) -> Response:
    o = orch(request)
    body = parse_feedback(await read_json(request, o.config.service.max_request_bytes),
                          o.config.service.max_prompt_chars)
    request_record(request).rated_id = body.request_id
    # Only the key that was given the answer may rate it by its id.
    owner = None if body.request_id is None else answer_owner(body.request_id, request_record(request).key_sha256)
    saved = await _feedback_store(request).asubmit(body, o.config.expert_names, owner)
    return JSONResponse({"object": "feedback", **saved.model_dump()})


@problems
async def admin_feedback(request: Request) -> Response:
    since = parse_since(request.query_params.get("since"))
    records = await _feedback_store(request).arecords(since)
    shape = request.query_params.get("format", "json")
    if shape not in ("json", "jsonl"):
        raise RequestProblem(400, f"format: {shape!r} is not one of 'json' (the default) or 'jsonl'",
                           "invalid_request_error", "invalid_request", param="format")
    if shape == "jsonl":
        lines = "".join(json.dumps(r.model_dump()) + "\n" for r in records)
        return Response(lines, media_type="application/x-ndjson")
    return JSONResponse({"object": "list", "data": [r.model_dump() for r in records]})


def _add_routes(app: FastAPI) -> None:
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"],
                      openapi_extra=CHAT_COMPLETIONS_BODY)
    app.add_api_route("/v1/route", route, methods=["POST"], openapi_extra=ROUTE_BODY)
    app.add_api_route("/v1/route/batch", route_batch, methods=["POST"], openapi_extra=request_body(RouteBatch))
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/v1/models/{model:path}", model, methods=["GET"])
    app.add_api_route("/v1/experts", experts, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)
    app.add_api_route("/v1/feedback", feedback_post, methods=["POST"], openapi_extra=_FEEDBACK_BODY)
    app.add_api_route("/admin/config", admin_config, methods=["GET"])
    app.add_api_route("/admin/feedback", admin_feedback, methods=["GET"])
    app.add_api_route("/admin/reload", admin_reload, methods=["POST"])


# -- feedback ----------------------------------------------------------------------------------------------
_FEEDBACK_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": FeedbackBody.model_json_schema()}}}}


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (an unknown path, a method a route does not take) in the OpenAI error format."""
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
    detail = str(exc.detail)
    if exc.status_code == 404:
        detail = f"no route {request.method} {request.url.path}; see /docs for the API"
    elif exc.status_code == 405:
        detail = f"{request.method} is not allowed on {request.url.path}; allowed: {exc.headers.get('Allow', '?')}" \
            if exc.headers else f"{request.method} is not allowed on {request.url.path}"
    return JSONResponse(error_body(detail, "invalid_request_error", code), status_code=exc.status_code,
                        headers=exc.headers)


def _feedback_store(request: Request) -> FeedbackStore:
    store: FeedbackStore | None = request.app.state.feedback
    if store is None:
        raise feedback_off()
    return store


