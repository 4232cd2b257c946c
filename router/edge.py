"""The service's edge: one pure ASGI layer (``Edge``) around every request.

It gives each request an id, checks the ``Host`` header, client keys and rate limits on ``/v1`` and the admin key
on ``/admin`` (``router.security``), then feeds ``/metrics`` (``router.metrics``) and writes one JSON log line
(``router.logs``) once the response, a stream included, has ended. It also ends a stream whose client stopped
reading it (``ClientStalled``, past the request's deadline) or left while it was being written (``ClientGone``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from router.errors import error_body
from router.fallback import DEADLINE_HEADER, AllExpertsFailed, asked_deadline_s
from router.logs import RequestRecord, log_request
from router.metrics import RouterMetrics
from router.orchestrator import Orchestrator, RouteFailed
from router.security import Admitted, Denied, Guard, host_refused

__all__ = ["STALLED", "ClientGone", "ClientStalled", "Edge", "detached_record", "guard", "internal_error_body",
           "internal_error_response", "note_failure", "reguard", "request_record"]

log = logging.getLogger("router.service")


def note_failure(record: RequestRecord, exc: AllExpertsFailed) -> None:
    """Note a total failure on the request's record: the causes, and the orchestrator's trace when it kept one
    (attempts, retries, a stream's switches), so the log line and the metrics show what was tried."""
    record.failures, record.error = exc.to_list(), exc.code
    if isinstance(exc, RouteFailed):
        record.trace = exc.trace


def internal_error_body(what: str, exc: BaseException) -> dict[str, Any]:
    """The OpenAI error body for an error no handler expected, naming only the error's type (its text could hold
    request content); the service log has the traceback."""
    return error_body(f"internal error ({type(exc).__name__}) while handling {what}; the service log has the "
                      "details", "server_error", "internal_error")


def internal_error_response(path: str, exc: BaseException) -> JSONResponse:
    """Any error no handler expected: a 500 in the OpenAI error format (``internal_error_body``)."""
    return JSONResponse(internal_error_body(path, exc), status_code=500)


# -- the edge: request ids, keys and limits, metrics and logs -------------------------------------------------
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def detached_record() -> RequestRecord:
    return RequestRecord(request_id="", method="", route="")


def request_record(request: Request) -> RequestRecord:
    """The record ``Edge`` opened for this request; a detached one when the app runs without the edge."""
    record = getattr(request.state, "moe_record", None)
    return record if isinstance(record, RequestRecord) else detached_record()


def guard(app: FastAPI) -> Guard:
    if app.state.security is None:
        config = app.state.orchestrator.config.security
        app.state.security = Guard.from_config(config, app.state.environ, app.state.rate_store)
    guard: Guard = app.state.security
    return guard


def reguard(app: FastAPI, old: Orchestrator, new: Orchestrator) -> None:
    """After a reload: new keys and limits take effect; unchanged ones keep their rate buckets."""
    if new.config.security != old.config.security:
        app.state.security = None
        guard(app)


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


class Edge:
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
        transport = transport_of(send)

        async def heard() -> Message:
            # Starlette's streaming response listens for the client leaving while it streams, but its cancellation
            # reaches the stream only while that waits on the network: one relaying an expert that answers faster
            # than the client reads never waits, and relayed the whole answer into the closed connection (whose
            # writes the server drops in silence). The next write after the leaving raises instead (``observed``):
            # once the server has heard it (``http.disconnect``), or once the connection is closing, which a stream
            # that never yields to the event loop learns before the server can say so.
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
            if left or (transport is not None and transport.is_closing()):
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
            await _close_stream(scope)  # before the error is set: closing a stream notes the client's leaving
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
            await internal_error_response(scope["path"], exc)(scope, receive, observed)
        finally:
            # A stream its response left unfinished (the client left, and the stream was cancelled while it was
            # being written) is closed here: Starlette leaves it suspended, holding its expert's call and slot.
            await _close_stream(scope)
            record.status, record.latency_ms = status, (time.perf_counter() - start) * 1000.0
            _observe(app, record)


async def _close_stream(scope: Scope) -> None:
    """Close the request's stream (``moe_stream``, which the chat handler sets), if it has one not closed yet."""
    stream = scope["state"].pop("moe_stream", None)
    if stream is not None:
        await stream.aclose()


class ClientStalled(Exception):
    """The client stopped reading its answer (``_send_limit``)."""


class ClientGone(Exception):
    """The client left while its answer was being sent (``Edge``)."""


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
                               local=server[0] if server else None, keyless=not guard(app).keys.required)
        if refused is not None:
            return refused
    if _keyed(app, path):
        return await guard(app).admit_client(headers.get("authorization"), client)
    if path == "/admin" or path.startswith("/admin/"):
        return await guard(app).admit_admin(headers.get("authorization"), client)
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



def transport_of(send: Any, depth: int = 3) -> Any:
    """The transport of the connection ``send`` writes to, or None: uvicorn's ``send`` is a method of its request
    cycle, which holds it; at ``--log-level trace`` uvicorn wraps that method in a function of its own (its message
    logger), whose closure holds it in turn, and so may other wrappers, ``depth`` deep."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is not None or depth == 0:
        return transport
    for cell in getattr(send, "__closure__", None) or ():
        try:
            inner = cell.cell_contents
        except ValueError:  # a cell not filled yet
            continue
        if callable(inner) and (found := transport_of(inner, depth - 1)) is not None:
            return found
    return None
