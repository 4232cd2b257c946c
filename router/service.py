"""The HTTP service: OpenAI-compatible chat completions, plus the gate's decision and the expert list.

Handlers are thin: they validate, call the one ``Orchestrator`` held on ``app.state``, and map domain errors
to status codes with OpenAI-style error bodies ``{"error": {"message", "type", "param", "code"}}``
(``router.errors.error_body``, re-exported here). The checks themselves, and the ``RequestProblem`` a bad
request raises, live in ``router.requests``, which ``LocalRouter`` shares without importing FastAPI; the public
ones are re-exported here too.

Around them one ASGI layer, ``_Edge``, gives each request an id, checks client keys and rate limits on
``/v1`` and the admin key on ``/admin`` (``router.security``), then feeds ``/metrics`` (``router.metrics``)
and writes one JSON log line (``router.logs``) once the response, a stream included, has ended.

With a feedback store (``router.feedback``), each answer's query and expert are remembered under its response
id, ``POST /v1/feedback`` takes a verdict on an answer, and ``GET /admin/feedback`` exports the verdicts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from experts.types import ChatRequest
from router.errors import error_body, retry_after_header
from router.fallback import (
    DEADLINE_HEADER,
    LIMIT_HEADERS,
    AllExpertsFailed,
    CallScope,
    LimitError,
    asked_deadline_s,
)
from router.feedback import FeedbackBody, FeedbackStore, answer_owner
from router.logs import RequestRecord, configure_json_logging, log_request
from router.metrics import CONTENT_TYPE, RouterMetrics
from router.openapi import CHAT_COMPLETIONS_BODY, ROUTE_BODY, request_body
from router.orchestrator import NoCapableExpert, Orchestrator, RouteFailed, StreamEnd, StreamPiece, UnknownExpert
from router.reload import Reloader, ReloadFailed
from router.requests import (
    FEEDBACK_FAILURES,
    RequestProblem,
    RouteBatch,
    RouteQuery,
    check_combiner,
    feedback_off,
    feedback_problem,
    parse_chat,
    parse_feedback,
    parse_json,
    parse_route,
    parse_route_batch,
    parse_since,
)
from router.security import Admitted, Denied, Guard, InMemoryRateStore, RateStore, host_refused, redact
from router.trace import Trace

__all__ = ["RequestProblem", "RouteBatch", "RouteQuery", "check_combiner", "create_app", "error_body", "parse_chat",
           "parse_route", "parse_route_batch"]

log = logging.getLogger("router.service")


def _problem_response(problem: RequestProblem) -> JSONResponse:
    return JSONResponse(problem.error_body(), status_code=problem.status)


def _failed(record: RequestRecord, exc: AllExpertsFailed) -> None:
    """Note a total failure on the request's record: the causes, and the orchestrator's trace when it kept one
    (attempts, retries, a stream's switches), so the log line and the metrics show what was tried."""
    record.failures, record.error = exc.to_list(), exc.code
    if isinstance(exc, RouteFailed):
        record.trace = exc.trace


def _json_media_type(content_type: str) -> bool:
    """Whether a request's ``Content-Type`` says JSON (``application/json``, ``…+json``)."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def _read_json(request: Request, limit: int) -> Any:
    """The body, read off the wire within ``limit`` bytes (else a 413) and ``service.body_timeout_s`` seconds
    (else a 408), as JSON (``router.requests.parse_json``). A client that leaves while sending it is
    ``ClientLeft`` (499), not an error of the service's.

    A body labelled another media type, or none, is a 415 before it is read: the requests a browser sends across
    sites without asking first (``text/plain``, forms, and a body with no type at all, as ``fetch`` sends a Blob or
    byte array) would otherwise let any web page its user opens spend a keyless router's experts, or plant
    feedback the next ``moe train`` folds in. OpenAI's clients, the SDK and ``curl --json`` all say JSON."""
    content_type = request.headers.get("content-type")
    if content_type is None or not content_type.strip():
        raise RequestProblem(415, "the request has no Content-Type: send the body as JSON with Content-Type: "
                                  "application/json", "invalid_request_error", "unsupported_media_type",
                             param="Content-Type")
    if not _json_media_type(content_type):
        raise RequestProblem(415, f"Content-Type {content_type[:100]!r} is not JSON: send the body as JSON with "
                                  "Content-Type: application/json", "invalid_request_error",
                             "unsupported_media_type", param="Content-Type")
    declared = request.headers.get("content-length")
    if declared and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise RequestProblem(413, f"request body of {declared} bytes exceeds the {limit}-byte limit",
                           "invalid_request_error", "request_too_large")
    # Read as it arrives and stop at the limit: a body without Content-Length (chunked) is never held whole.
    parts: list[bytes] = []
    size = 0
    seconds = orch(request).config.service.body_timeout_s
    try:
        async with asyncio.timeout(seconds):
            async for part in request.stream():
                size += len(part)
                if size > limit:
                    raise RequestProblem(413, f"request body exceeds the {limit}-byte limit (over {size} bytes "
                                              "sent)", "invalid_request_error", "request_too_large")
                parts.append(part)
    except TimeoutError:
        raise RequestProblem(408, f"the request body did not arrive within {seconds:g}s ({size} bytes came); "
                                  "send it whole (service.body_timeout_s)", "invalid_request_error",
                             "request_timeout") from None
    except ClientDisconnect:
        raise ClientLeft from None
    return parse_json(b"".join(parts))


T = TypeVar("T")


# An infinite float (a log-probability of -inf: a token the model ruled out) is sent as this, with its sign: the
# floor vLLM puts on a log-probability, as JSON has no infinity.
_FLOOR = 9999.0


def _finite(value: Any) -> Any:
    """``value`` with every float JSON cannot hold (``-Infinity`` or ``NaN``, as an upstream's Python json writes
    them, and the router's json reads) made one it can: +-infinity as +-9999.0 (vLLM's floor for a log-probability),
    NaN as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else math.copysign(_FLOOR, value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _json_text(body: Any) -> str:
    """``body`` as JSON that any client parses: an upstream's ``-Infinity`` would be no JSON (and Starlette's
    renderer refuses it, a 500 after the expert was paid). Checked as it is written, so only a body that holds
    such a float is walked."""
    try:
        return json.dumps(body, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(body), allow_nan=False)


class _FiniteJSONResponse(JSONResponse):
    """A ``JSONResponse`` whose non-finite floats (an upstream's) are sent as JSON can hold them (``_finite``), and
    whose lone surrogates (an upstream's ``"\\ud83d"`` without its pair: valid JSON, but no UTF-8) are sent
    escaped, as a stream's chunks send them (``_json_text``)."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except ValueError:  # UnicodeEncodeError is one
            return _json_text(content).encode("ascii")


def _completion_body(answer: Any, request_id: str) -> dict[str, Any]:
    # As OpenAI's: content is null beside tool calls or a refusal that came without text.
    textless = not answer.content and (answer.tool_calls or answer.refusal is not None)
    message: dict[str, Any] = {"role": "assistant", "content": None if textless else answer.content}
    if answer.reasoning_content is not None:  # the returned reply's own reasoning, as vLLM's parsers send it
        message["reasoning_content"] = answer.reasoning_content
    if answer.tool_calls:
        message["tool_calls"] = answer.tool_calls
    if answer.refusal is not None:
        message["refusal"] = answer.refusal
    trace = answer.trace.summary()
    # The returned reply's own fields (``RoutedAnswer.extra``: system_fingerprint, vLLM's token ids, ...) after
    # the router's, never in their place.
    extra = answer.extra or {}
    choice = _beside({"index": 0, "message": _beside(message, extra.get("message")),
                      "finish_reason": answer.finish_reason, "logprobs": answer.logprobs}, extra.get("choice"))
    return _beside({
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": answer.expert,
        "choices": [choice],
        "usage": trace["usage"],
        "moe": trace,
    }, extra.get("response"))


def _beside(ours: dict[str, Any], theirs: dict[str, Any] | None) -> dict[str, Any]:
    return ours if not theirs else {**ours, **{k: v for k, v in theirs.items() if k not in ours}}


class _Chunks:
    """A stream's chunks, as OpenAI's: one ``id`` and one ``created`` for all of them, and usage only when the
    request's ``stream_options.include_usage`` asks for it: then ``usage`` is null on every chunk and the last
    chunk before ``[DONE]`` has no choices and the stream's usage. Each content chunk's ``model`` names the
    expert that streamed it, so a mid-stream switch shows there too; the final chunk names the one that finished."""

    def __init__(self, request_id: str, include_usage: bool) -> None:
        self.request_id, self.include_usage, self.created = request_id, include_usage, int(time.time())

    def chunk(self, model: str, delta: dict[str, Any], finish: str | None = None,
              logprobs: dict[str, Any] | None = None, **extra: Any) -> bytes:
        return self._data(model, [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}],
                          **extra)

    def usage(self, model: str, usage: dict[str, Any]) -> bytes:
        return self._data(model, [], usage=usage)

    def _data(self, model: str, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        body = {"id": self.request_id, "object": "chat.completion.chunk", "created": self.created, "model": model,
                "choices": choices, **({"usage": None} if self.include_usage else {}), **extra}
        return f"data: {_json_text(body)}\n\n".encode()


def _include_usage(chat: ChatRequest) -> bool:
    options = (chat.model_extra or {}).get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


async def _sse(events: AsyncIterator[StreamPiece | StreamEnd], first: StreamPiece | StreamEnd,
               chunks: _Chunks, record: RequestRecord | None = None,
               on_end: Callable[[str], Awaitable[None]] | None = None) -> AsyncIterator[bytes]:
    model = _began_by(first) or "moe-router"
    record = record or _detached_record()
    yield chunks.chunk(model, {"role": "assistant", "content": ""})
    event: StreamPiece | StreamEnd | None = first
    try:
        while event is not None:
            if isinstance(event, StreamPiece):
                # A token that completed no text still has its log-probabilities, under an empty content as the
                # upstream sent it.
                delta: dict[str, Any] = ({"content": event.delta.content}
                                         if event.delta.content or event.delta.logprobs else {})
                if event.delta.tool_calls:
                    delta["tool_calls"] = event.delta.tool_calls
                if event.delta.refusal:
                    delta["refusal"] = event.delta.refusal
                if event.delta.reasoning_content:
                    delta["reasoning_content"] = event.delta.reasoning_content
                if record.answer is not None:
                    record.answer.append(event.delta.content)
                record.expert = event.expert  # the log line's, should the client leave before the end
                yield chunks.chunk(event.expert, delta, logprobs=event.delta.logprobs)
            else:
                record.trace, record.expert = event.trace, event.trace.answered_by or model
                if on_end is not None:
                    await on_end(event.trace.credited(record.expert))
                # The final chunk carries the finish reason and the trace, switches included.
                trace = event.trace.summary()
                yield chunks.chunk(record.expert, {}, event.finish_reason, moe=trace)
                if chunks.include_usage:
                    yield chunks.usage(record.expert, trace["usage"])
            event = await anext(events, None)
    except AllExpertsFailed as exc:
        _failed(record, exc)
        yield f"data: {json.dumps(exc.error_body())}\n\n".encode()
    except Exception as exc:
        # A defect of ours after the 200 went out: logged here, once, with its traceback, and told to the client
        # as an error event (the OpenAI SDK raises it) before the stream ends as any other does. Raised on, it
        # would be logged again by the server, which would also drop the keep-alive connection.
        record.error = "internal_error"
        log.exception("internal error while streaming (request %s)", record.request_id)
        yield f"data: {json.dumps(_internal_error_body('a stream', exc))}\n\n".encode()
    except (GeneratorExit, asyncio.CancelledError):
        # The client left mid-stream: the status went out as 200, so the log line says it here.
        if not isinstance(event, StreamEnd):
            record.error = "client_closed_request"
        raise
    finally:
        # A client that left mid-stream ends the orchestrator's stream now, so its request stops counting as
        # in flight (a hot reload waits for those) and the expert's connection is released.
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()
    yield b"data: [DONE]\n\n"


def _began_by(first: StreamPiece | StreamEnd) -> str | None:
    """The expert that began a stream: its first piece's, or, for an answer without a piece (an empty one: the
    expert sent only its finish), the expert that gave it."""
    return first.expert if isinstance(first, StreamPiece) else first.trace.answered_by


def _combiner_header(request: Request, orchestrator: Orchestrator, *, stream: bool = False) -> str | None:
    """The combiner strategy the ``x-moe-combiner`` header picks (see ``check_combiner``)."""
    given = request.headers.getlist("x-moe-combiner")
    if len(given) > 1:  # which one to obey would be a guess (proxies may reorder or merge repeated headers)
        raise RequestProblem(400, f"x-moe-combiner: sent {len(given)} times ({', '.join(map(repr, given))}); send "
                           "it once, with one strategy", "invalid_request_error", "invalid_combiner",
                           param="x-moe-combiner")
    return check_combiner(given[0] if given else None, orchestrator, stream=stream)


def _limits_headers(request: Request) -> CallScope | None:
    """The limits the caller's ``x-moe-deadline-s``, ``x-moe-budget-usd`` and ``x-moe-first-output-s`` headers set
    (``CallScope.from_headers``: they narrow the config's, never widen them); None when it sent none. An outer
    moe-router sends them for a nested one (``router.hierarchy``); any client may."""
    given = {name: request.headers.getlist(name) for name in LIMIT_HEADERS}
    for name, values in given.items():
        if len(values) > 1:
            raise RequestProblem(400, f"{name}: sent {len(values)} times; send it once", "invalid_request_error",
                                 "invalid_limit", param=name)
    try:
        return CallScope.from_headers(*(values[0] if values else None for values in given.values()))
    except LimitError as exc:
        raise RequestProblem(400, str(exc), "invalid_request_error", "invalid_limit", param=exc.name) from None


class ClientLeft(Exception):
    """The client closed its connection before the answer was ready; the work for it was cancelled."""


# How long a request's work runs before the service starts watching for its client's disconnect: a quicker
# answer is done before it would matter, and costs no watcher task.
_WATCH_AFTER_S = 0.05


async def _unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result, unless the client disconnects first: then ``work`` is cancelled, so no expert keeps
    working (or is called next, by fallback) for nobody, and ``ClientLeft`` is raised. The request body must have
    been read: what the client sends next can only be its disconnect.

    ``work`` runs in the handler's own task; after ``_WATCH_AFTER_S`` a watcher task waits for the disconnect and
    cancels the handler when it comes. (Two tasks and an ``asyncio.wait`` per request cost the static router a
    tenth of a millisecond of CPU each.)"""
    handler = asyncio.current_task()
    if handler is None:  # not in a task: nothing to cancel, so no watching
        return await work
    watcher: asyncio.Task[None] | None = None
    gone = done = False

    def on_disconnect(task: asyncio.Task[None]) -> None:
        nonlocal gone
        if not done and not task.cancelled() and task.exception() is None:
            gone = True
            handler.cancel()

    def watch() -> None:
        nonlocal watcher
        watcher = asyncio.ensure_future(_disconnected(request))
        watcher.add_done_callback(on_disconnect)

    timer = asyncio.get_running_loop().call_later(_WATCH_AFTER_S, watch)
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise
        handler.uncancel()  # the cancellation was ours, and is answered here
        raise ClientLeft from None
    finally:
        done = True
        timer.cancel()
        if watcher is not None:
            watcher.cancel()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _problems(handler: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
    """Turn the domain errors a handler raises into OpenAI-style error responses."""

    async def wrapped(request: Request) -> Response:
        record = _record(request)
        try:
            return await handler(request)
        except RequestProblem as problem:
            record.error = problem.code
            return _problem_response(problem)
        except ClientLeft:
            # Nobody reads this answer; 499 (nginx's "client closed request") is for the log and the metrics.
            record.error = "client_closed_request"
            return _problem_response(RequestProblem(499, "the client closed the connection before the answer was "
                                                  "ready", "invalid_request_error", record.error))
        except (UnknownExpert, NoCapableExpert) as exc:
            record.error = exc.code
            return JSONResponse(exc.error_body(), status_code=exc.status)
        except AllExpertsFailed as exc:
            _failed(record, exc)
            # When every candidate is waiting out a Retry-After or an open breaker, say when one may answer.
            return JSONResponse(exc.error_body(), status_code=exc.status, headers=retry_after_header(exc.retry_after_s))
        except FEEDBACK_FAILURES as exc:
            refused = feedback_problem(exc)
            record.error = refused.code
            return _problem_response(refused)

    wrapped.__name__ = handler.__name__
    return wrapped


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
        _guard(app)
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
        _guard(app)  # keys are hashed now, at startup, not at the first request
    app.state.reloader = reloader
    app.state.feedback = feedback
    if reloader is not None:
        reloader.bind(app.state, lambda old, new: _reguard(app, old, new))
    app.add_middleware(_Edge)
    app.add_exception_handler(StarletteHTTPException, _http_error)

    _add_routes(app)
    return app


# -- the handlers: each validates, calls the orchestrator on app.state, and answers ------------------------
def orch(request: Request) -> Orchestrator:
    """The serving object, swapped whole by a reload."""
    return request.app.state.orchestrator


@_problems
async def chat_completions(request: Request) -> Response:
    o = orch(request)
    with o.serving():  # counted from now: a reload while the body arrives waits for this request
        return await _chat_completions(request, o)


async def _chat_completions(request: Request, o: Orchestrator) -> Response:
    limits = o.config.service
    chat = parse_chat(await _read_json(request, limits.max_request_bytes), limits.max_prompt_chars)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    strategy = _combiner_header(request, o, stream=chat.stream)
    caller = _limits_headers(request)
    record = _record(request)
    record.model, record.stream, record.completion_id = chat.model, chat.stream, request_id
    if limits.log_content:
        record.messages, record.answer = [m.model_dump(exclude_none=True) for m in chat.messages], []
    store: FeedbackStore | None = request.app.state.feedback

    def keep(trace: Trace) -> None:  # kept from the start: a client that leaves still has its calls counted
        record.trace = trace

    if not chat.stream:
        answer = await _unless_client_leaves(request, o.complete(chat, strategy=strategy, on_trace=keep,
                                                                       caller=caller))
        record.trace, record.expert = answer.trace, answer.expert
        if store is not None:  # the expert a verdict on it rates (Trace.credited: not fuse's aggregator)
            await store.aremember(request_id, chat.query_text(), answer.trace.credited(answer.expert),
                                  answer_owner(request_id, record.key_sha256))
        if record.answer is not None:
            record.answer.append(answer.content)
        return _FiniteJSONResponse(_completion_body(answer, request_id), headers={"x-moe-expert": answer.expert})
    events = o.stream(chat, on_trace=keep, caller=caller)
    # Wait for the first event before answering 200, so a total failure is still a clean 503.
    try:
        first = await _unless_client_leaves(request, anext(events))
    except ClientLeft:
        await events.aclose()
        raise
    # The expert that began the stream (the headers go before any switch; the final chunk's moe.switches says
    # who continued it).
    expert = _began_by(first)
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
    body = _sse(events, first, _Chunks(request_id, _include_usage(chat)), record, on_end)
    request.scope["state"]["moe_stream"] = body  # closed by the middleware if the client stops reading it
    return StreamingResponse(body, media_type="text/event-stream", headers={"cache-control": "no-cache", **began})


@_problems
async def route(request: Request) -> Response:
    o = orch(request)
    with o.serving():
        body = await _read_json(request, o.config.service.max_request_bytes)
        chat = parse_route(body, o.config.service.max_prompt_chars)
        # A client that leaves takes its query out of the gate's queue: no one waits behind work for nobody.
        decision = await _unless_client_leaves(request, o.decide(chat))
    return JSONResponse(decision.model_dump())


@_problems
async def route_batch(request: Request) -> Response:
    o = orch(request)
    with o.serving():
        return await _route_batch(request, o)


async def _route_batch(request: Request, o: Orchestrator) -> Response:
    body = await _read_json(request, o.config.service.max_request_bytes)
    batch = parse_route_batch(body, o.config.service.max_prompt_chars, o.config.expert_names,
                              o.config.service.max_batch_queries)
    experts = await _unless_client_leaves(request, o.assign(batch.queries, batch.capacity))
    return JSONResponse({"object": "route.batch", "mode": "expert_choice",
                         "assignments": [{"index": i, "expert": e} for i, e in enumerate(experts)]})


def model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "moe-router"}


async def models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [model_object(n) for n in orch(request).model_names]})


@_problems
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


@_problems
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


@_problems
async def feedback_post(request: Request) -> Response:
    o = orch(request)
    body = parse_feedback(await _read_json(request, o.config.service.max_request_bytes),
                          o.config.service.max_prompt_chars)
    _record(request).rated_id = body.request_id
    # Only the key that was given the answer may rate it by its id.
    owner = None if body.request_id is None else answer_owner(body.request_id, _record(request).key_sha256)
    saved = await _feedback_store(request).asubmit(body, o.config.expert_names, owner)
    return JSONResponse({"object": "feedback", **saved.model_dump()})


@_problems
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


def _internal_error_body(what: str, exc: BaseException) -> dict[str, Any]:
    """The OpenAI error body for an error no handler expected, naming only the error's type (its text could hold
    request content); the service log has the traceback."""
    return error_body(f"internal error ({type(exc).__name__}) while handling {what}; the service log has the "
                      "details", "server_error", "internal_error")


def _internal_error_response(path: str, exc: BaseException) -> JSONResponse:
    """Any error no handler expected: a 500 in the OpenAI error format (``_internal_error_body``)."""
    return JSONResponse(_internal_error_body(path, exc), status_code=500)


def _feedback_store(request: Request) -> FeedbackStore:
    store: FeedbackStore | None = request.app.state.feedback
    if store is None:
        raise feedback_off()
    return store


# -- the edge: request ids, keys and limits, metrics and logs -------------------------------------------------
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _detached_record() -> RequestRecord:
    return RequestRecord(request_id="", method="", route="")


def _record(request: Request) -> RequestRecord:
    """The record ``_Edge`` opened for this request; a detached one when the app runs without the edge."""
    record = getattr(request.state, "moe_record", None)
    return record if isinstance(record, RequestRecord) else _detached_record()


def _guard(app: FastAPI) -> Guard:
    if app.state.security is None:
        config = app.state.orchestrator.config.security
        app.state.security = Guard.from_config(config, app.state.environ, app.state.rate_store)
    guard: Guard = app.state.security
    return guard


def _reguard(app: FastAPI, old: Orchestrator, new: Orchestrator) -> None:
    """After a reload: new keys and limits take effect; unchanged ones keep their rate buckets."""
    if new.config.security != old.config.security:
        app.state.security = None
        _guard(app)


def _route_label(app: FastAPI, path: str) -> str:
    """The route a path takes, as its template (``/v1/models/{model}``), else ``other``: neither model names nor
    scanners may grow the metrics."""
    for route in app.router.routes:
        pattern = getattr(route, "path_regex", None)
        if pattern is not None and pattern.match(path):
            return str(getattr(route, "path_format", route.path))  # type: ignore[attr-defined]
    return "other"


def _model_label(app: FastAPI, model: str | None) -> str:
    if model is None or app.state.orchestrator is None:
        return ""
    return model if model in app.state.orchestrator.model_names else "other"


class _Edge:
    """Pure ASGI, so a stream is observed to its last byte: ``BaseHTTPMiddleware`` would buffer or detach it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        app: FastAPI = scope["app"]
        start = time.perf_counter()
        headers = Headers(scope=scope)
        asked = asked_deadline_s(headers.get(DEADLINE_HEADER))  # the request's own deadline, if it narrows one
        given = headers.get("x-request-id", "")
        record = RequestRecord(request_id=given if _REQUEST_ID.match(given) else uuid.uuid4().hex,
                               method=scope["method"], route=_route_label(app, scope["path"]))
        scope.setdefault("state", {})["moe_record"] = record
        status = 500
        started = False
        left = False

        async def heard() -> Message:
            # Starlette's streaming response listens for the client leaving while it streams, but its cancellation
            # reaches the stream only while that waits on the network: one relaying an expert that answers faster
            # than the client reads never waits, and relayed the whole answer into the closed connection (whose
            # writes the server drops in silence). The next write after the leaving raises instead (``observed``).
            nonlocal left
            message = await receive()
            left = left or message["type"] == "http.disconnect"
            return message

        async def observed(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", record.request_id.encode())]}
                await send(message)
                return
            if left:
                raise ClientGone
            # A client that stops reading blocks the send (the socket's buffers are full), and with it the stream
            # and its expert's slot, past any deadline: past the request's own, with a margin, it is cut off.
            try:
                async with asyncio.timeout(_send_limit(app, start, asked)):
                    await send(message)
            except TimeoutError:
                raise ClientStalled from None

        try:
            verdict = await _admit(app, scope, headers)
            if isinstance(verdict, Denied):
                record.error = verdict.code
                record.key_name, record.key_sha256 = verdict.key_name, verdict.key_sha256
                app.state.metrics.rejected.labels(verdict.code).inc()
                body = error_body(verdict.message, verdict.type, verdict.code)
                await JSONResponse(body, status_code=verdict.status, headers=verdict.headers)(scope, heard, observed)
            else:
                record.key_name, record.key_sha256 = verdict.key_name, verdict.key_sha256
                await self.app(scope, heard, observed)
        except (ClientGone, ClientDisconnect):
            # The client left while its answer was being sent (ClientDisconnect: as Starlette reports a write that
            # failed for it). A stream ends now, through the close below, which logs it as the client's leaving.
            if scope["state"].get("moe_stream") is None:
                record.error = record.error or "client_closed_request"
        except ClientStalled:
            # Nothing more can reach the client, and nothing is wrong with the service: one log line says so, the
            # connection is dropped (``STALLED`` tells ``router.serving`` to abort it), and the stream, closed here
            # (Starlette leaves it suspended), releases its expert's call and slot.
            scope["state"][STALLED] = True
            stream = scope["state"].pop("moe_stream", None)
            if stream is not None:
                await stream.aclose()
            record.error = "client_stalled"
            log.warning("request %s: the client stopped reading the answer; cut off at the request's deadline",
                        record.request_id)
        except Exception as exc:
            # Answered here rather than by Starlette's outermost handler, which sends the 500 and then raises
            # again, so that the server drops the client's keep-alive connection and its next request fails too.
            record.error = "internal_error"
            log.exception("internal error while handling %s %s (request %s)", scope["method"], scope["path"],
                          record.request_id)
            if started:  # part of a response went out: only closing the connection can tell the client
                raise
            await _internal_error_response(scope["path"], exc)(scope, receive, observed)
        finally:
            # A stream its response left unfinished (the client left, and the stream was cancelled while it was
            # being written) is closed here: Starlette leaves it suspended, holding its expert's call and slot.
            stream = scope["state"].pop("moe_stream", None)
            if stream is not None:
                await stream.aclose()
            record.status, record.latency_ms = status, (time.perf_counter() - start) * 1000.0
            _observe(app, record)


class ClientStalled(Exception):
    """The client stopped reading its answer (``_send_limit``)."""


class ClientGone(Exception):
    """The client left while its answer was being sent (``_Edge``)."""


# Set in a request's ``scope["state"]`` when its client stopped reading: its connection is to be aborted, not closed
# (``router.serving.AbortStalled``).
STALLED = "moe_client_stalled"


def _send_limit(app: FastAPI, start: float, asked_s: float | None = None) -> float:
    """Seconds a write to the client may still wait: until the request's deadline from its start (``asked_s``,
    its ``x-moe-deadline-s``, where that is sooner than ``fallback.deadline_s``), plus a tenth of it (at least a
    second) for the last bytes."""
    orchestrator = app.state.orchestrator
    deadline = orchestrator.config.fallback.deadline_s if orchestrator is not None else 120.0
    if asked_s is not None:
        deadline = min(deadline, asked_s)
    return max(start + deadline + max(1.0, 0.1 * deadline) - time.perf_counter(), 0.0)


# The endpoints ``security.open_endpoints`` may leave open, by path.
_OPTIONAL_OPEN = {"/metrics": "metrics", "/docs": "docs", "/redoc": "docs", "/openapi.json": "docs"}


def _keyed(app: FastAPI, path: str) -> bool:
    """Whether ``path`` needs a client key: /v1, and what ``security.open_endpoints`` leaves out."""
    if path == "/v1" or path.startswith("/v1/"):
        return True
    group = _OPTIONAL_OPEN.get(path) or ("docs" if path.startswith("/docs/") else None)
    return group is not None and group not in app.state.orchestrator.config.security.open_endpoints


async def _admit(app: FastAPI, scope: Scope, headers: Headers) -> Admitted | Denied:
    path: str = scope["path"]
    client = scope["client"][0] if scope.get("client") else "unknown"
    if path != "/health" and app.state.orchestrator is not None:
        server = scope.get("server")
        refused = host_refused(headers.get("host"), app.state.orchestrator.config.service.allowed_hosts,
                               local=server[0] if server else None, keyless=not _guard(app).keys.required)
        if refused is not None:
            return refused
    if _keyed(app, path):
        return await _guard(app).admit_client(headers.get("authorization"), client)
    if path == "/admin" or path.startswith("/admin/"):
        return await _guard(app).admit_admin(headers.get("authorization"), client)
    return Admitted(None)


def _observe(app: FastAPI, record: RequestRecord) -> None:
    metrics: RouterMetrics = app.state.metrics
    orchestrator = app.state.orchestrator
    metrics.observe_request(record.route, record.status, _model_label(app, record.model), record.latency_ms / 1000)
    if record.trace is not None:
        metrics.observe_trace(record.trace, record.expert)
        # Candidates fallback never reached (max_attempts, the deadline) are causes but no attempt of the trace.
        metrics.observe_failures(c for c in record.failures if c.get("kind") == "not_tried")
    elif record.failures:
        metrics.observe_failures(record.failures)
    content = bool(orchestrator is not None and orchestrator.config.service.log_content)
    log_request(record, content=content)
