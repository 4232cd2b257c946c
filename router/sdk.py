"""The Python SDK: ``Client`` and ``AsyncClient`` for a running service, ``LocalRouter`` in-process.

All three return the same typed results, trace included. Request building and response parsing live once in
``_Protocol``; the sync and async clients are thin I/O shells around it (httpx's own pattern), so the pairs
cannot drift. The network is injected: pass ``transport=`` to test (``httpx.ASGITransport(app=app)`` for
``AsyncClient``; ``Client`` takes a sync one, e.g. ``httpx.MockTransport``, and refuses an async one).

Feedback names an answer by its ``ChatResult.id``: ``client.feedback(request_id=result.id, good=True)``.

``combiner=`` picks the combiner strategy for one request (``top1``, ``vote``, ``consensus``, ``fuse``,
``escalate``; None: the config's). The HTTP clients send it as the ``x-moe-combiner`` header, so the service
decides what its config supports: an unknown strategy is a ``RouterAPIError`` 400 ``invalid_combiner``, as is any
but ``top1`` on a stream (one expert serves a stream). ``LocalRouter`` checks it with the service's own check, so
it fails with the same ``RouterAPIError``.

``deadline_s=`` and ``budget_usd=`` on ``chat`` and ``stream`` (all three) narrow the config's ``fallback.deadline_s``
and ``cost_budget_usd`` for one request, never widen them: the router plans its fallback within the time and stops
calling experts once the budget is spent. The HTTP clients send them as the ``x-moe-deadline-s`` and
``x-moe-budget-usd`` headers; a value out of range (seconds above 0 up to 3600, USD from 0 up to 1000) is a
``ValueError`` naming it, before anything is sent.

``timeout=`` on a ``Client`` or ``AsyncClient`` method call (``chat``, ``stream``) sets that call's HTTP timeout, as
in the OpenAI SDK (seconds, an ``httpx.Timeout``, or None for none); it is never sent in the request's body.
``LocalRouter`` has no HTTP request to time and refuses it with a ``TypeError`` (``deadline_s=`` gives the call a
deadline the router plans its fallback within).

``LocalRouter`` checks a request with the service's own checks (``router.requests``), so a bad one fails the same
way in process, and the SDK never imports FastAPI.

``chat`` returns one complete answer and ``stream`` streams one, in all three: neither takes ``stream=`` among its
request parameters, and one given is a ``TypeError`` before anything is sent.

``api_key`` is taken without its surrounding whitespace (a key read from a secret file ends in a newline), as the
service takes its keys; one still holding a control character is a ``ValueError`` when the client is built, and no
error message ever shows a key or a header's value. ``headers=`` are sent with every request (the OpenAI SDK's
``default_headers``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import uuid
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import httpx
from pydantic import BaseModel

from experts.redact import scrubbed
from experts.types import Usage, reasoning_of
from router.errors import retry_after_header
from router.fallback import CallScope
from router.feedback import (
    FeedbackRecord,
    FeedbackStore,
)
from router.requests import (
    FEEDBACK_FAILURES,
    RequestProblem,
    check_combiner,
    feedback_off,
    feedback_problem,
    json_body,
    parse_chat,
    parse_feedback,
    parse_route,
    parse_route_batch,
)
from router.trace import RoutedAnswer, RouteDecision, Trace

if TYPE_CHECKING:
    from httpx._client import UseClientDefault

_T = TypeVar("_T")

# What reading a JSON answer of the wrong shape raises: a missing key, a list where an object belongs, a value of
# the wrong type (pydantic's ValidationError is a ValueError).
_SHAPE_ERRORS = (KeyError, IndexError, TypeError, AttributeError, ValueError)

__all__ = ["AsyncClient", "ChatResult", "Client", "FeedbackRecord", "LocalRouter", "RouterAPIError",
           "RouterConnectionError", "StreamChunk"]

Messages = str | Sequence[dict[str, Any]]
# The clients' connection pools (httpx's defaults, but for how long an idle connection is kept): below the
# service's keep-alive timeout (uvicorn's, 5 s), so a request keeps off a connection the service is closing (it
# would fail as "server disconnected", with nothing wrong). An injected transport pools by its own settings.
LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=4.0)
COMBINER_HEADER = "x-moe-combiner"  # the service reads a request's combiner strategy from it
# A client's timeout: seconds, an ``httpx.Timeout`` (per phase), or None (none). A call's ``timeout=`` defaults to
# ``httpx.USE_CLIENT_DEFAULT``: the client's.
Timeout = float | httpx.Timeout | None


class ChatResult(BaseModel):
    # The response id (``chatcmpl-...``); feedback on this answer names it as ``request_id``.
    id: str = ""
    content: str
    expert: str
    finish_reason: str = "stop"
    usage: Usage = Usage()
    cost_usd: float = 0.0
    tool_calls: list[dict[str, Any]] | None = None
    # The expert's refusal (``content`` is then empty), and the token log-probabilities when the request asked
    # for ``logprobs``; as OpenAI's message and choice carry them.
    refusal: str | None = None
    logprobs: dict[str, Any] | None = None
    # The answering expert's reasoning before its answer (vLLM's ``reasoning_content``), when it sent any: the
    # reasoning of the reply whose text ``content`` is, never a mix of the panel's.
    reasoning_content: str | None = None
    trace: Trace


class StreamChunk(BaseModel):
    """One piece of a streamed answer; the last one has ``finish_reason`` and the trace."""

    content: str = ""
    expert: str = ""
    finish_reason: str | None = None
    # OpenAI-format tool-call deltas, as the expert sent them (index, id, function name, argument pieces).
    tool_calls: list[dict[str, Any]] | None = None
    # A piece of a refusal, and this piece's token log-probabilities (when the request asked for ``logprobs``).
    refusal: str = ""
    logprobs: dict[str, Any] | None = None
    # A piece of the expert's reasoning (``delta.reasoning_content``); pieces come before the answer's text.
    reasoning_content: str = ""
    trace: Trace | None = None
    # The answer's id (``chatcmpl-…``), the same on every chunk: what ``feedback(request_id=...)`` takes.
    id: str = ""


class RouterAPIError(Exception):
    """The service answered with an error. ``body`` is its OpenAI-style error object."""

    def __init__(self, status: int, body: dict[str, Any], headers: Mapping[str, str] | None = None) -> None:
        error = body.get("error", {}) if isinstance(body, dict) else body
        if not isinstance(error, dict):  # a proxy's {"error": "text"}, or a body that is no object
            error = {"message": str(error)}
        self.status = status
        self.body = body
        # The response's headers (``retry-after`` on a 429 or a 503, ``x-request-id``); in process, only the
        # ``retry-after`` the service would have sent.
        self.headers: dict[str, str] = dict(headers or {})
        self.code = error.get("code")
        # As the openai SDK's APIError: the error's type (``invalid_request_error``) and the field at fault
        # (``messages[0].content``), None where the body gives none.
        self.type = error.get("type")
        self.param = error.get("param")
        self.message = error.get("message", str(body))
        super().__init__(f"HTTP {status}{f' ({self.code})' if self.code else ''}: {self.message}")

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled (and copied) as built: a process pool, multiprocessing or Ray hands a worker's error back so, and
        Exception's own way would call the class with its message alone."""
        return type(self), (self.status, self.body, self.headers), self.__dict__

    @property
    def retry_after_s(self) -> float | None:
        """The wait the service asked for, in seconds from now, if any: ``Retry-After`` in either of its forms
        (RFC 9110), seconds or an HTTP date (as proxies and gateways send it); never negative, a date already past
        being 0."""
        value = {k.lower(): v for k, v in self.headers.items()}.get("retry-after", "").strip()
        if not value:
            return None
        try:
            seconds = float(value)
        except ValueError:
            try:
                when = parsedate_to_datetime(value)
            except (TypeError, ValueError, IndexError):
                return None
            if when.tzinfo is None:  # "-0000": a date in UTC (RFC 5322)
                when = when.replace(tzinfo=UTC)
            seconds = (when - datetime.now(UTC)).total_seconds()
        return max(0.0, seconds) if math.isfinite(seconds) else None


class RouterConnectionError(RouterAPIError):
    """No (whole) answer came: the service could not be reached, the connection broke, the timeout ran out, or a
    stream ended before its ``[DONE]`` line. ``status`` is 0 (there is no HTTP status for the failure) and ``code``
    is ``connection_error``, ``timeout`` or ``incomplete_stream``."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(0, {"error": {"message": message, "type": "connection_error", "code": code}})

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.message, self.code), self.__dict__

    def __str__(self) -> str:
        return self.message


def _timeout_text(timeout: Timeout, exc: httpx.TimeoutException) -> str:
    """The timeout that ran out, as messages name it: "the 30 s timeout", or the phase's ("the 5 s read timeout")
    when an ``httpx.Timeout`` gives its phases different limits."""
    limits = httpx.Timeout(timeout)
    phases = {"connect": limits.connect, "read": limits.read, "write": limits.write, "pool": limits.pool}
    phase = {httpx.ConnectTimeout: "connect", httpx.ReadTimeout: "read", httpx.WriteTimeout: "write",
             httpx.PoolTimeout: "pool"}.get(type(exc))
    if len(set(phases.values())) == 1:
        seconds, label = limits.read, ""
    elif phase is not None:
        seconds, label = phases[phase], f"{phase} "
    else:
        return "the timeout"
    return f"the {seconds:g} s {label}timeout" if seconds is not None else f"the {label}timeout"


def _text(value: Any) -> str:
    """``value``, which an answer gives as a string; a ``TypeError`` (an answer of another shape) otherwise."""
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _first_line(exc: BaseException) -> str:
    """``exc``'s message, its first line only (pydantic's run to one line per field), at most 120 characters."""
    return str(exc).partition("\n")[0][:120]


def _shown(url: httpx.URL) -> str:
    """``url`` as messages show it: without a user and password or a query, where credentials go."""
    return str(url.copy_with(userinfo=b"", query=None, fragment=None))


# A header's name: an HTTP token (RFC 9110).
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _header_value(value: str, what: str) -> str:
    """``value`` as a header carries it: without surrounding whitespace (a key read from a secret file ends in a
    newline), as the service strips its keys. One still holding a control character, or a character that is not
    ASCII, is refused now: httpx would refuse it on every request with an error quoting the whole header, key and
    all. The error names ``what``, never the value (it may be a secret)."""
    value = value.strip()
    if not all(" " <= c <= "~" for c in value):
        raise ValueError(f"{what} holds a control character (a newline, a tab, ...) or a character that is not ASCII, "
                         "which no HTTP header may carry; check how it was read (the value is not shown, as it may "
                         "be a secret)")
    return value


def client_headers(api_key: str | None, headers: Mapping[str, str] | None = None) -> dict[str, str]:
    """The headers a client sends with every request: ``headers`` and the key's ``Authorization``, each checked
    (see ``_header_value``); a ``ValueError`` for a header no HTTP request may carry, or a key given twice. A key
    that is blank once stripped is no key."""
    sent = {}
    for name, value in (headers or {}).items():
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"header name {name!r} is not an HTTP header name (letters, digits and !#$%&'*+.^_`|~-)")
        if not isinstance(value, str):
            raise ValueError(f"header {name!r}: its value must be a str, not {type(value).__name__}")
        sent[name] = _header_value(value, f"header {name!r}")
    key = _header_value(api_key, "api_key") if api_key is not None else ""
    if key:
        if any(name.lower() == "authorization" for name in sent):
            raise ValueError("api_key and an Authorization header both given: give the key once")
        sent["authorization"] = f"Bearer {key}"
    return sent


# Headers whose values are credentials: the key's Authorization, a proxy's, cookies, and any named for an API key,
# a token, a secret or a password (not "X-Pass-Through").
_SECRET_HEADER = re.compile(r"authorization|cookie|api[-_]?key|token|secret|password|passwd", re.IGNORECASE)
# Shorter values are no secrets but placeholders ("unused", "none" for a keyless router), which scrubbed would
# mangle ordinary words in messages ("unknown model '***xistent'").
_SHORTEST_SECRET = 8


def _base_url(base_url: str) -> httpx.URL:
    """``base_url`` parsed; a ``ValueError`` that never repeats its user:password@ when it cannot be, or when a
    '/', '?' or '#' in the password ends the host early (httpx would read the password's start as the port, and
    quote it, or its end as the path, which messages show)."""
    from experts.redact import userinfo, userinfo_past_host

    if userinfo_past_host(base_url):
        raise ValueError("base_url has a '@' past its host: a '/', '?' or '#' in its user:password@ ends the host "
                         "early; percent-encode them (%2F, %3F, %23, and a '@' as %40), or give the key as api_key. "
                         "(A '@' in the path after a port reads so too: write it as %40.)")
    try:
        return httpx.URL(base_url)
    except httpx.InvalidURL as exc:
        why = "" if userinfo(base_url) else f": {exc}"  # httpx's words may quote the password
        raise ValueError(f"base_url is not a URL httpx can send to{why}") from None


def _secret_values(headers: Mapping[str, str]) -> list[str]:
    """What of ``headers`` an error the service sends back must not repeat: each credential header's value, and
    its credential alone ("Bearer sk-..." and "sk-..."); longest first, so a value is scrubbed before its part."""
    found = set()
    for name, value in headers.items():
        if _SECRET_HEADER.search(name):
            found.update({value, value.partition(" ")[2].strip()})
    return sorted((v for v in found if len(v) >= _SHORTEST_SECRET), key=len, reverse=True)


def _scrub_error(error: RouterAPIError, secrets: Sequence[str]) -> None:
    """``error`` without ``secrets``: a server (a proxy, a misconfigured gateway, an echoing test double) may quote
    the client's key back in its error, and the message, the body, a traceback and a log would repeat it."""
    # ``type`` is left as it came: a fixed word (invalid_request_error) a caller compares with, never a key.
    error.body = scrubbed(error.body, secrets)
    error.message, error.code, error.param = (scrubbed(v, secrets) for v in (error.message, error.code, error.param))
    if isinstance(error.body, dict) and isinstance(error.body.get("error"), dict) and "type" in error.body["error"]:
        error.body["error"]["type"] = error.type
    error.args = tuple(scrubbed(a, secrets) for a in error.args)
    cause = error.__cause__
    if cause is not None and scrubbed(str(cause), secrets) != str(cause):
        error.__cause__, error.__suppress_context__ = None, True  # its text quotes the body: not chained


class _Protocol:
    """What both clients share: how requests are built and responses read."""

    def __init__(self, base_url: str, api_key: str | None, timeout: Timeout,
                 headers: Mapping[str, str] | None = None) -> None:
        url = _base_url(base_url)
        if url.query or url.fragment:
            # httpx would append each path after it ("...?token=x/v1/route"), and messages would show it.
            raise ValueError(f"base_url {_shown(url)!r} carries a query or fragment; give the service's address "
                             "alone (a key goes in api_key)")
        # The service's root. An OpenAI client's base URL for it ends in /v1, and the SDK's paths start with /v1:
        # given the former, the SDK would ask /v1/v1/... (a 404), so it is taken as the same service.
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.headers = client_headers(api_key, headers)
        self.timeout = timeout
        self._secrets = _secret_values(self.headers)

    @contextlib.contextmanager
    def reaching(self, timeout: Timeout | UseClientDefault = httpx.USE_CLIENT_DEFAULT) -> Iterator[None]:
        """httpx's transport failures as ``RouterConnectionError``, naming the request and the timeout (the call's
        ``timeout``, by default the client's)."""
        limit = self.timeout if timeout is httpx.USE_CLIENT_DEFAULT else cast("Timeout", timeout)
        try:
            yield
        except RouterAPIError as exc:
            if self._secrets:
                _scrub_error(exc, self._secrets)
            raise
        except httpx.TransportError as exc:
            try:
                where = f" {exc.request.method} {_shown(exc.request.url)}"
            except RuntimeError:  # raised before a request existed
                where = f" {_shown(httpx.URL(self.base_url))}"
            if isinstance(exc, httpx.TimeoutException):
                raise RouterConnectionError(f"no answer from the service{where} within "
                                            f"{_timeout_text(limit, exc)} ({type(exc).__name__})", "timeout") from exc
            if isinstance(exc, httpx.LocalProtocolError):
                # Its text quotes the header at fault, which may be the key: neither shown nor chained (a traceback
                # would print it). The client's own headers are checked when it is built, so this is rare.
                raise RouterConnectionError(f"cannot send the request{where}: it is not valid HTTP, a header most "
                                            "likely (LocalProtocolError; its text is left out, as it may quote a "
                                            "key)", "connection_error") from None
            raise RouterConnectionError(f"cannot reach the service{where}: {exc or type(exc).__name__}",
                                        "connection_error") from exc

    @staticmethod
    def chat_body(messages: Messages, model: str, stream: bool, params: dict[str, Any],
                  owner: str) -> dict[str, Any]:
        """The chat request's body; ``stream`` among ``params`` is refused (see the module docstring), named as
        ``owner``'s method."""
        if "stream" in params:
            method, other = ("stream", "chat") if stream else ("chat", "stream")
            does = "always streams" if stream else "returns one complete answer"
            wants = "one complete answer" if stream else "a streamed answer"
            raise TypeError(f"{owner}.{method}() takes no stream= argument (got stream={params['stream']!r}): it "
                            f"{does}; call {owner}.{other}(...) for {wants}")
        msgs = [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)
        return {"model": model, "messages": msgs, "stream": stream, **params}

    @staticmethod
    def route_batch_body(queries: Sequence[str], capacity: Mapping[str, int] | None) -> dict[str, Any]:
        if isinstance(queries, str | bytes):  # a string is a sequence too: of one-character queries
            raise TypeError(f"route_batch takes a list of queries, not one {type(queries).__name__}; for one query "
                            "pass [query], or call route(query)")
        body: dict[str, Any] = {"queries": list(queries)}
        if capacity is not None:
            body["capacity"] = dict(capacity)
        return body

    @staticmethod
    def assignments(body: dict[str, Any]) -> list[str]:
        """Each query's expert, from a ``/v1/route/batch`` response."""
        return [_text(a["expert"]) for a in body["assignments"]]

    @staticmethod
    def expert_list(body: dict[str, Any]) -> list[dict[str, Any]]:
        """The experts, from a ``/v1/experts`` response: one object each."""
        experts = list(body["data"])
        if not all(isinstance(e, dict) for e in experts):
            raise TypeError("an entry of data is not an object")
        return experts

    @staticmethod
    def chat_headers(combiner: str | None, deadline_s: float | None = None,
                     budget_usd: float | None = None) -> dict[str, str]:
        """The headers that carry a call's combiner and limits; a limit out of range is a ``ValueError`` naming
        it, before anything is sent."""
        limits = CallScope.limiting(deadline_s, budget_usd)
        return {**({} if combiner is None else {COMBINER_HEADER: _header_value(combiner, "combiner")}),
                **({} if limits is None else limits.headers())}

    @staticmethod
    def answered_error(response: httpx.Response) -> RouterAPIError:
        """The service's error answer (read by then) as the ``RouterAPIError`` it stands for."""
        try:
            body = response.json()
        except ValueError:
            body = {"error": {"message": response.text[:500], "code": None}}
        return RouterAPIError(response.status_code, body, response.headers)

    @classmethod
    def read(cls, response: httpx.Response, parse: Callable[[Any], _T], what: str) -> _T:
        """``parse`` of the service's JSON answer (``what`` names it). A body that is no JSON, or JSON of another
        shape (a proxy's or another service's answer at a wrong ``base_url``), is a ``RouterAPIError``
        ``invalid_response`` quoting the body's start, as a stream's event of another shape is."""
        if response.is_error:
            raise cls.answered_error(response)
        try:
            body = response.json()
        except ValueError:
            raise RouterAPIError(response.status_code, {"error": {
                "message": f"the service answered {response.status_code} with a body that is not JSON: "
                           f"{response.text[:200]!r}", "code": "invalid_response"}}, response.headers) from None
        try:
            return parse(body)
        except _SHAPE_ERRORS as exc:
            raise RouterAPIError(response.status_code, {"error": {
                "message": f"the service answered {response.status_code} with JSON that is not {what} "
                           f"({type(exc).__name__}: {_first_line(exc)}): {response.text[:200]!r}",
                "code": "invalid_response"}}, response.headers) from exc

    @staticmethod
    def chat_result(body: dict[str, Any]) -> ChatResult:
        choice = body["choices"][0]
        trace = Trace.model_validate(body.get("moe") or {})
        message = choice["message"]
        return ChatResult(id=body.get("id", ""), content=message.get("content") or "",
                          expert=body.get("model", ""),
                          finish_reason=choice.get("finish_reason") or "stop", usage=Usage(**body.get("usage", {})),
                          cost_usd=(body.get("moe") or {}).get("cost_usd", 0.0),
                          tool_calls=message.get("tool_calls"), refusal=message.get("refusal"),
                          logprobs=choice.get("logprobs"), reasoning_content=reasoning_of(message), trace=trace)

    @staticmethod
    def feedback_body(request_id: str | None, query: str | None, expert: str | None, good: bool | None,
                      score: float | None, note: str | None) -> dict[str, Any]:
        given = {"request_id": request_id, "query": query, "expert": expert, "good": good, "score": score,
                 "note": note}
        return {k: v for k, v in given.items() if v is not None}

    @staticmethod
    def is_event_stream(response: httpx.Response) -> bool:
        return response.headers.get("content-type", "").startswith("text/event-stream")

    @classmethod
    def refused_stream(cls, response: httpx.Response) -> RouterAPIError:
        """Why a stream did not start (read by then): the service's error answer, or a success that is no event
        stream (a proxy's page, a JSON body), its text in the message."""
        if response.is_error:
            return cls.answered_error(response)
        kind = response.headers.get("content-type") or "no content type"
        return RouterAPIError(response.status_code, {"error": {
            "message": f"the service answered {response.status_code} with {kind}, not an event stream: "
                       f"{response.text[:200]!r}", "code": "invalid_response"}}, response.headers)

    @staticmethod
    def cut_short(headers: Mapping[str, str] | None = None) -> RouterConnectionError:
        """A stream that ended without its ``[DONE]`` line: the service (or a proxy before it) broke off part way,
        so the answer may be incomplete; a ``RouterConnectionError`` as a connection that breaks is, with the
        stream's response ``headers`` (its ``x-request-id``)."""
        error = RouterConnectionError("the service's stream ended before its [DONE] line: the answer may be cut "
                                      "short", "incomplete_stream")
        error.headers = dict(headers or {})
        return error

    @staticmethod
    def _chunk(body: dict[str, Any]) -> StreamChunk:
        choice = body["choices"][0]
        trace = Trace.model_validate(body["moe"]) if body.get("moe") else None
        delta = choice["delta"]
        return StreamChunk(id=body.get("id", ""), content=delta.get("content") or "",
                           expert=body.get("model", ""),
                           finish_reason=choice.get("finish_reason"), trace=trace,
                           tool_calls=delta.get("tool_calls") or None, refusal=delta.get("refusal") or "",
                           logprobs=choice.get("logprobs"), reasoning_content=reasoning_of(delta) or "")

    @staticmethod
    def stream_chunk(line: str, headers: Mapping[str, str] | None = None) -> StreamChunk | None:
        """The chunk a stream's ``line`` holds, None for a line that says nothing; the error it holds raised as a
        ``RouterAPIError`` with the stream's response ``headers`` (its ``x-request-id``, which the service's log
        line is under)."""
        if not line.startswith("data: ") or line == "data: [DONE]":
            return None
        try:
            body = json.loads(line[6:])
        except ValueError:
            raise RouterAPIError(200, {"error": {"message": f"the service's stream held an event that is not "
                                                            f"JSON: {line[:200]!r}", "code": "invalid_response"}},
                                 headers) from None
        if not isinstance(body, dict):
            raise RouterAPIError(200, {"error": {"message": f"the service's stream held an event that is not a "
                                                            f"JSON object: {line[:200]!r}",
                                                 "code": "invalid_response"}}, headers)
        if "error" in body:
            # The service's status, had the failure come before the stream began (see service._all_failed; an
            # internal error is its 500).
            from router.fallback import AllExpertsFailed

            error = body["error"]
            code = str(error.get("code") if isinstance(error, dict) else None)
            status = AllExpertsFailed.STATUS_BY_CODE.get(code, 503)
            raise RouterAPIError(status, body, headers)
        if body.get("choices") == []:
            return None  # the usage chunk (stream_options.include_usage): the trace has the usage already
        try:
            chunk = _Protocol._chunk(body)
        except _SHAPE_ERRORS as exc:
            raise RouterAPIError(200, {"error": {"message": f"the service's stream held an event that is not a "
                                                            f"chat completion chunk ({type(exc).__name__}: "
                                                            f"{_first_line(exc)}): {line[:200]!r}",
                                                 "code": "invalid_response"}}, headers) from exc
        # The opening chunk names only the role: nothing to hand on (LocalRouter's streams have none either).
        said = (chunk.content or chunk.tool_calls or chunk.refusal or chunk.reasoning_content or chunk.logprobs
                or chunk.finish_reason or chunk.trace)
        return chunk if said else None


class Client(_Protocol):
    """A blocking client for a running service."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, api_key: str | None = None,
                 timeout: Timeout = 120.0, transport: httpx.BaseTransport | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        if isinstance(transport, httpx.AsyncBaseTransport) and not isinstance(transport, httpx.BaseTransport):
            # httpx would fail on the first request, with an AttributeError.
            raise TypeError(f"Client takes a sync transport (httpx.BaseTransport, e.g. httpx.MockTransport or "
                            f"httpx.WSGITransport), not {type(transport).__name__}, which is async: use "
                            "AsyncClient with it")
        super().__init__(base_url, api_key, timeout, headers)
        self._http = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=timeout, transport=transport,
                                  limits=LIMITS)
        # One never closed closes its connections when collected, rather than leaving their sockets to the
        # collector (a ResourceWarning each).
        self._closer = weakref.finalize(self, self._http.close)

    def chat(self, messages: Messages, *, model: str = "auto", combiner: str | None = None,
             deadline_s: float | None = None, budget_usd: float | None = None,
             timeout: Timeout | UseClientDefault = httpx.USE_CLIENT_DEFAULT, **params: Any) -> ChatResult:
        """One complete answer; ``timeout`` is this call's HTTP timeout (by default the client's)."""
        body = self.chat_body(messages, model, False, params, "Client")
        headers = self.chat_headers(combiner, deadline_s, budget_usd)
        with self.reaching(timeout):
            response = self._http.post("/v1/chat/completions", json=body, headers=headers, timeout=timeout)
            return self.read(response, self.chat_result, "a chat completion")

    def stream(self, messages: Messages, *, model: str = "auto", combiner: str | None = None,
               deadline_s: float | None = None, budget_usd: float | None = None,
               timeout: Timeout | UseClientDefault = httpx.USE_CLIENT_DEFAULT, **params: Any) -> Iterator[StreamChunk]:
        """A streamed answer; ``timeout`` is this call's HTTP timeout (by default the client's)."""
        # The body is built (and a stream= among params refused) now, not when iteration begins.
        return self._stream(self.chat_body(messages, model, True, params, "Client"),
                            self.chat_headers(combiner, deadline_s, budget_usd), timeout)

    def _stream(self, body: dict[str, Any], headers: dict[str, str],
                timeout: Timeout | UseClientDefault) -> Iterator[StreamChunk]:
        with self.reaching(timeout), self._http.stream("POST", "/v1/chat/completions", json=body, headers=headers,
                                                       timeout=timeout) as response:
            if response.is_error or not self.is_event_stream(response):
                response.read()
                raise self.refused_stream(response)
            done = False
            for line in response.iter_lines():
                done = done or line == "data: [DONE]"
                chunk = self.stream_chunk(line, response.headers)
                if chunk is not None:
                    yield chunk
            if not done:
                raise self.cut_short(response.headers)

    def route(self, query: str) -> RouteDecision:
        with self.reaching():
            return self.read(self._http.post("/v1/route", json={"query": query}), RouteDecision.model_validate,
                             "a route decision")

    def route_batch(self, queries: Sequence[str], capacity: Mapping[str, int] | None = None) -> list[str]:
        """Expert-choice routing of a batch: each query's expert, each expert taking the queries it scores
        highest up to ``capacity`` (default: its free in-flight slots). Ask each expert by name to answer."""
        with self.reaching():
            return self.read(self._http.post("/v1/route/batch", json=self.route_batch_body(queries, capacity)),
                             self.assignments, "a batch's assignments")

    def experts(self) -> list[dict[str, Any]]:
        with self.reaching():
            return self.read(self._http.get("/v1/experts"), self.expert_list, "a list of experts")

    def feedback(self, *, request_id: str | None = None, query: str | None = None, expert: str | None = None,
                 good: bool | None = None, score: float | None = None, note: str | None = None) -> FeedbackRecord:
        with self.reaching():
            body = self.feedback_body(request_id, query, expert, good, score, note)
            return self.read(self._http.post("/v1/feedback", json=body), FeedbackRecord.model_validate,
                             "a feedback record")

    def close(self) -> None:
        self._closer()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Protocol):
    """An asyncio client for a running service.

    Its connections belong to the event loop that opened them, and close when that loop shuts down
    (``asyncio.run``'s end) if ``aclose`` has not closed them before: used on another loop (a second
    ``asyncio.run``), it opens new ones there."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, api_key: str | None = None,
                 timeout: Timeout = 120.0, transport: httpx.AsyncBaseTransport | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        if isinstance(transport, httpx.BaseTransport) and not isinstance(transport, httpx.AsyncBaseTransport):
            # As Client's check: httpx would fail on the first request, with an AttributeError.
            raise TypeError(f"AsyncClient takes an async transport (httpx.AsyncBaseTransport, e.g. "
                            f"httpx.MockTransport or httpx.ASGITransport), not {type(transport).__name__}, which is "
                            "sync: use Client with it")
        super().__init__(base_url, api_key, timeout, headers)

        def build() -> httpx.AsyncClient:
            return httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=timeout,
                                     transport=transport, limits=LIMITS)

        self._build = build
        self._pool = build()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._keeper: AsyncGenerator[None] | None = None
        self._closed = False

    async def _here(self) -> httpx.AsyncClient:
        """This event loop's connections (see the class's notes). A closed client stays closed on any loop; under
        another async library than asyncio (trio), one set of connections serves, as httpx's own client does."""
        if self._closed:
            raise RuntimeError("the client has been closed (aclose); build a new AsyncClient")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return self._pool
        if self._loop is not loop:
            if self._loop is not None:
                self._pool = self._build()
            self._loop, self._keeper = loop, _closed_with_loop(self._pool)
            await anext(self._keeper)
        return self._pool

    async def chat(self, messages: Messages, *, model: str = "auto", combiner: str | None = None,
                   deadline_s: float | None = None, budget_usd: float | None = None,
                   timeout: Timeout | UseClientDefault = httpx.USE_CLIENT_DEFAULT, **params: Any) -> ChatResult:
        """``Client.chat``."""
        body = self.chat_body(messages, model, False, params, "AsyncClient")
        headers = self.chat_headers(combiner, deadline_s, budget_usd)
        with self.reaching(timeout):
            http = await self._here()
            response = await http.post("/v1/chat/completions", json=body, headers=headers, timeout=timeout)
            return self.read(response, self.chat_result, "a chat completion")

    def stream(self, messages: Messages, *, model: str = "auto", combiner: str | None = None,
               deadline_s: float | None = None, budget_usd: float | None = None,
               timeout: Timeout | UseClientDefault = httpx.USE_CLIENT_DEFAULT,
               **params: Any) -> AsyncIterator[StreamChunk]:
        """Iterate with ``async for``; a stream= among ``params`` is refused here, before anything is sent.
        ``timeout`` is this call's HTTP timeout (by default the client's)."""
        return self._stream(self.chat_body(messages, model, True, params, "AsyncClient"),
                            self.chat_headers(combiner, deadline_s, budget_usd), timeout)

    async def _stream(self, body: dict[str, Any], headers: dict[str, str],
                      timeout: Timeout | UseClientDefault) -> AsyncIterator[StreamChunk]:
        with self.reaching(timeout):
            http = await self._here()
            async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers,
                                   timeout=timeout) as response:
                if response.is_error or not self.is_event_stream(response):
                    await response.aread()
                    raise self.refused_stream(response)
                done = False
                async for line in response.aiter_lines():
                    done = done or line == "data: [DONE]"
                    chunk = self.stream_chunk(line, response.headers)
                    if chunk is not None:
                        yield chunk
                if not done:
                    raise self.cut_short(response.headers)

    async def route(self, query: str) -> RouteDecision:
        with self.reaching():
            http = await self._here()
            return self.read(await http.post("/v1/route", json={"query": query}), RouteDecision.model_validate,
                             "a route decision")

    async def route_batch(self, queries: Sequence[str], capacity: Mapping[str, int] | None = None) -> list[str]:
        """``Client.route_batch``."""
        with self.reaching():
            http = await self._here()
            return self.read(await http.post("/v1/route/batch", json=self.route_batch_body(queries, capacity)),
                             self.assignments, "a batch's assignments")

    async def experts(self) -> list[dict[str, Any]]:
        with self.reaching():
            http = await self._here()
            return self.read(await http.get("/v1/experts"), self.expert_list, "a list of experts")

    async def feedback(self, *, request_id: str | None = None, query: str | None = None, expert: str | None = None,
                       good: bool | None = None, score: float | None = None,
                       note: str | None = None) -> FeedbackRecord:
        with self.reaching():
            body = self.feedback_body(request_id, query, expert, good, score, note)
            http = await self._here()
            return self.read(await http.post("/v1/feedback", json=body), FeedbackRecord.model_validate,
                             "a feedback record")

    async def aclose(self) -> None:
        self._closed = True
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:  # another async library (trio): its one set of connections
            here = None
        # Another loop's connections can be closed on that loop alone, which does so when it shuts down; no call
        # uses them meanwhile (``_here``).
        if self._loop is None or self._loop is here:
            await self._pool.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def _closed_with_loop(client: httpx.AsyncClient) -> AsyncGenerator[None]:
    """Parked at its yield, it closes ``client`` on its event loop (where alone it can be closed) when the loop shuts
    down (``asyncio.run``'s end) or once it is collected, by the loop's finalizer for async generators (PEP 525)."""
    try:
        yield
    finally:
        await client.aclose()


@contextlib.contextmanager
def _as_api_errors(*, retry_after: bool = True) -> Iterator[None]:
    """The orchestrator's failures as the ``RouterAPIError`` the service's answer would raise in ``Client``, so
    one ``except`` covers both: every expert failed (503, or 400 when each refused the request), an unknown
    model (404), a capability no expert declares (400)."""
    from router.fallback import AllExpertsFailed
    from router.orchestrator import NoCapableExpert, UnknownExpert

    try:
        yield
    except AllExpertsFailed as exc:
        # The Retry-After the service would send with it (``retry_after``: an answer, not a stream's error event),
        # so ``retry_after_s`` reads the same in process.
        raise RouterAPIError(exc.status, exc.error_body(),
                             retry_after_header(exc.retry_after_s if retry_after else None)) from exc
    except FEEDBACK_FAILURES as exc:  # a feedback store's refusal, as the service answers it
        problem = feedback_problem(exc)
        raise RouterAPIError(problem.status, problem.error_body()) from exc
    except (UnknownExpert, NoCapableExpert, RequestProblem) as exc:
        raise RouterAPIError(exc.status, exc.error_body()) from exc


class LocalRouter:
    """The router in-process, built from a config file: no service, same results.

    Every method fails as ``Client``'s would, with the ``RouterAPIError`` the service's answer would give (400
    for a bad request or an unknown combiner, 503 or 400 when every expert failed, 404 for an unknown model). With
    a feedback store, answers are remembered and ``feedback`` writes to the store directly, its errors the
    service's too (400 for a bad verdict or an unknown expert, 404 for an unknown answer id).

    ``aclose`` (or leaving ``async with``) closes it for good: any later call, or a second ``async with``, is a
    ``RuntimeError``; build a new one.
    """

    def __init__(self, orchestrator: Any, feedback: FeedbackStore | None = None) -> None:
        self.orchestrator = orchestrator
        self.store = feedback
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this LocalRouter is closed (aclose, or the end of its async with); create a new one, "
                               "e.g. LocalRouter.from_config(...)")

    def _chat_body(self, messages: Messages, model: str, stream: bool, params: dict[str, Any]) -> dict[str, Any]:
        """``_Protocol.chat_body``, refusing ``timeout=``: in process there is no HTTP request for it to time (each
        expert's calls are timed by its config's ``timeout_s``), and sent on it would reach the experts as a
        request field."""
        self._check_open()
        if "timeout" in params:
            method = "stream" if stream else "chat"
            raise TypeError(f"LocalRouter.{method}() takes no timeout= argument (got timeout={params['timeout']!r}):"
                            " there is no HTTP request to time out in process, and each expert's calls are timed by "
                            "its config's timeout_s; for a deadline on the whole call, pass deadline_s=")
        return _Protocol.chat_body(messages, model, stream, params, "LocalRouter")

    @classmethod
    def from_config(cls, path: str | Path) -> LocalRouter:
        from router.build import build_orchestrator
        from router.config import load_config
        from router.feedback import open_feedback_store

        config = load_config(path)
        return cls(build_orchestrator(config), open_feedback_store(config))

    async def chat(self, messages: Messages, *, model: str = "auto", combiner: str | None = None,
                   deadline_s: float | None = None, budget_usd: float | None = None, **params: Any) -> ChatResult:
        body = self._chat_body(messages, model, False, params)
        limits = CallScope.limiting(deadline_s, budget_usd)  # a ValueError naming it, as the clients raise
        # A bad request, and an unknown strategy (before the gate runs), fail as the service's answer would.
        with _as_api_errors():
            request = parse_chat(json_body(body), self.orchestrator.config.service.max_prompt_chars)
            strategy = check_combiner(combiner, self.orchestrator)
            answer: RoutedAnswer = await self.orchestrator.complete(request, strategy=strategy, caller=limits)
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        if self.store is not None:  # the expert a verdict on it rates, as the service remembers it
            await self.store.aremember(response_id, request.query_text(), answer.trace.credited(answer.expert))
        return ChatResult(id=response_id, content=answer.content, expert=answer.expert,
                          finish_reason=answer.finish_reason, usage=answer.trace.usage,
                          cost_usd=answer.trace.cost_usd, tool_calls=answer.tool_calls, refusal=answer.refusal,
                          logprobs=answer.logprobs, reasoning_content=answer.reasoning_content, trace=answer.trace)

    def stream(self, messages: Messages, *, model: str = "auto", combiner: str | None = None,
               deadline_s: float | None = None, budget_usd: float | None = None,
               **params: Any) -> AsyncIterator[StreamChunk]:
        """``AsyncClient.stream``, in process: the same chunks (the last with ``finish_reason`` and the trace),
        the same fallback and mid-stream continuation, and the same ``RouterAPIError``s, whether the stream fails
        before its first chunk or after. A stream= among ``params`` is refused here, before anything runs."""
        body = self._chat_body(messages, model, True, params)
        CallScope.limiting(deadline_s, budget_usd)  # a limit out of range is refused now, not once iterated
        return self._stream(body, combiner, (deadline_s, budget_usd))

    async def _stream(self, body: dict[str, Any], combiner: str | None,
                      given: tuple[float | None, float | None]) -> AsyncIterator[StreamChunk]:
        from router.orchestrator import StreamEnd

        self._check_open()
        with _as_api_errors():
            request = parse_chat(json_body(body), self.orchestrator.config.service.max_prompt_chars)
            check_combiner(combiner, self.orchestrator, stream=True)
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        limits = CallScope.limiting(*given)  # counted from when the stream starts, as the service counts them
        async with contextlib.aclosing(self.orchestrator.stream(request, caller=limits)) as events:
            # A failure before the first chunk is the service's error answer, its Retry-After included; one after
            # it is the service's error event, which carries no headers.
            with _as_api_errors():
                event = await anext(events, None)
            began = None if event is None else (
                event.expert if not isinstance(event, StreamEnd) else event.trace.answered_by)
            if self.store is not None and began:  # ratable from its first chunk on, as the service's streams
                await self.store.aremember(response_id, request.query_text(), began)
            with _as_api_errors(retry_after=False):
                while event is not None:
                    if isinstance(event, StreamEnd):
                        expert = event.trace.answered_by or ""
                        credited = event.trace.credited(expert)
                        if self.store is not None and credited and credited != began:
                            await self.store.aremember(response_id, request.query_text(), credited)
                        yield StreamChunk(id=response_id, expert=expert, finish_reason=event.finish_reason,
                                          trace=event.trace)
                    else:
                        delta = event.delta
                        yield StreamChunk(id=response_id, content=delta.content, expert=event.expert,
                                          tool_calls=delta.tool_calls, refusal=delta.refusal,
                                          reasoning_content=delta.reasoning_content, logprobs=delta.logprobs)
                    event = await anext(events, None)

    async def route(self, query: str) -> RouteDecision:
        """``Client.route``, in process: the same checks (a blank or oversized query is a 400)."""
        self._check_open()
        with _as_api_errors():
            request = parse_route(json_body({"query": query}), self.orchestrator.config.service.max_prompt_chars)
        decision: RouteDecision = await self.orchestrator.decide(request)
        return decision

    async def route_batch(self, queries: Sequence[str], capacity: Mapping[str, int] | None = None) -> list[str]:
        """``Client.route_batch``, in process: the same checks (unknown experts in ``capacity``, negative room,
        blank or oversized queries are 400s)."""
        self._check_open()
        config = self.orchestrator.config
        with _as_api_errors():
            batch = parse_route_batch(json_body(_Protocol.route_batch_body(queries, capacity)),
                                      config.service.max_prompt_chars,
                                      config.expert_names, config.service.max_batch_queries)
        return await self.orchestrator.assign(batch.queries, batch.capacity)

    async def feedback(self, *, request_id: str | None = None, query: str | None = None, expert: str | None = None,
                       good: bool | None = None, score: float | None = None,
                       note: str | None = None) -> FeedbackRecord:
        self._check_open()
        with _as_api_errors():
            # In the service's order: the verdict checked first, then whether a store takes it.
            body = parse_feedback(json_body(_Protocol.feedback_body(request_id, query, expert, good, score, note)),
                                  self.orchestrator.config.service.max_prompt_chars)
            if self.store is None:
                raise feedback_off()
            return await self.store.asubmit(body, self.orchestrator.config.expert_names)

    async def aclose(self) -> None:
        """Close the experts' connections and the feedback store; a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        await self.orchestrator.aclose()
        if self.store is not None:
            await self.store.aclose()

    async def __aenter__(self) -> LocalRouter:
        self._check_open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

