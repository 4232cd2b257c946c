"""What the service's handlers share: reading a JSON body within its limits, the combiner and limit headers,
cancelling the work for a client that left (``ClientLeft``, a 499 in the log), and turning the domain errors a
handler raises into OpenAI-style error responses (``problems``)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from router.edge import note_failure, request_record
from router.errors import retry_after_header
from router.fallback import LIMIT_HEADERS, AllExpertsFailed, CallScope, LimitError
from router.orchestrator import NoCapableExpert, Orchestrator, UnknownExpert
from router.requests import FEEDBACK_FAILURES, RequestProblem, check_combiner, feedback_problem, parse_json

__all__ = ["ClientLeft", "combiner_header", "limits_headers", "problem_response", "problems", "read_json",
           "unless_client_leaves"]


def problem_response(problem: RequestProblem) -> JSONResponse:
    return JSONResponse(problem.error_body(), status_code=problem.status)


def _json_media_type(content_type: str) -> bool:
    """Whether a request's ``Content-Type`` says JSON (``application/json``, ``…+json``)."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def read_json(request: Request, limit: int) -> Any:
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
    seconds = request.app.state.orchestrator.config.service.body_timeout_s
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


def combiner_header(request: Request, orchestrator: Orchestrator, *, stream: bool = False) -> str | None:
    """The combiner strategy the ``x-moe-combiner`` header picks (see ``check_combiner``)."""
    given = request.headers.getlist("x-moe-combiner")
    if len(given) > 1:  # which one to obey would be a guess (proxies may reorder or merge repeated headers)
        raise RequestProblem(400, f"x-moe-combiner: sent {len(given)} times ({', '.join(map(repr, given))}); send "
                           "it once, with one strategy", "invalid_request_error", "invalid_combiner",
                           param="x-moe-combiner")
    return check_combiner(given[0] if given else None, orchestrator, stream=stream)


def limits_headers(request: Request) -> CallScope | None:
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


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
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


def problems(handler: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
    """Turn the domain errors a handler raises into OpenAI-style error responses."""

    async def wrapped(request: Request) -> Response:
        record = request_record(request)
        try:
            return await handler(request)
        except RequestProblem as problem:
            record.error = problem.code
            return problem_response(problem)
        except ClientLeft:
            # Nobody reads this answer; 499 (nginx's "client closed request") is for the log and the metrics.
            record.error = "client_closed_request"
            return problem_response(RequestProblem(499, "the client closed the connection before the answer was "
                                                  "ready", "invalid_request_error", record.error))
        except (UnknownExpert, NoCapableExpert) as exc:
            record.error = exc.code
            return JSONResponse(exc.error_body(), status_code=exc.status)
        except AllExpertsFailed as exc:
            note_failure(record, exc)
            # When every candidate is waiting out a Retry-After or an open breaker, say when one may answer.
            return JSONResponse(exc.error_body(), status_code=exc.status, headers=retry_after_header(exc.retry_after_s))
        except FEEDBACK_FAILURES as exc:
            refused = feedback_problem(exc)
            record.error = refused.code
            return problem_response(refused)

    wrapped.__name__ = handler.__name__
    return wrapped
