"""The SDK's request building and response parsing, once, without I/O: ``BaseClient``, which ``Client`` and
``AsyncClient`` (``router.sdk``) wrap as thin sync and async shells (httpx's own pattern), so the pairs cannot
drift; ``LocalRouter`` builds its bodies with it too. Error messages never show a key or a header's value."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

import httpx

from experts.redact import scrubbed
from experts.types import Usage, reasoning_of
from router.fallback import CallScope
from router.trace import Trace

if TYPE_CHECKING:
    from httpx._client import UseClientDefault
from router.sdk_types import ChatResult, Messages, RouterAPIError, RouterConnectionError, StreamChunk

__all__ = ["COMBINER_HEADER", "LIMITS", "BaseClient", "Timeout", "client_headers"]

_T = TypeVar("_T")

# What reading a JSON answer of the wrong shape raises: a missing key, a list where an object belongs, a value of
# the wrong type (pydantic's ValidationError is a ValueError).
_SHAPE_ERRORS = (KeyError, IndexError, TypeError, AttributeError, ValueError)

# The clients' connection pools (httpx's defaults, but for how long an idle connection is kept): below the
# service's keep-alive timeout (uvicorn's, 5 s), so a request keeps off a connection the service is closing (it
# would fail as "server disconnected", with nothing wrong). An injected transport pools by its own settings.
LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=4.0)
COMBINER_HEADER = "x-moe-combiner"  # the service reads a request's combiner strategy from it
# A client's timeout: seconds, an ``httpx.Timeout`` (per phase), or None (none). A call's ``timeout=`` defaults to
# ``httpx.USE_CLIENT_DEFAULT``: the client's.
Timeout = float | httpx.Timeout | None


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


class BaseClient:
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
            if self.closed:
                # Another thread closed the client while this call waited for its answer: the answer is lost, and
                # the socket's error ("Bad file descriptor") would blame the service.
                raise RouterConnectionError(f"the client was closed (close()) while the call{where} was in flight; "
                                            "its answer, if the service sent one, is lost", "connection_error") \
                    from exc
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

    @property
    def closed(self) -> bool:
        """Whether the client was closed (``Client.close``): a call fails once it is."""
        return False

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
            chunk = BaseClient._chunk(body)
        except _SHAPE_ERRORS as exc:
            raise RouterAPIError(200, {"error": {"message": f"the service's stream held an event that is not a "
                                                            f"chat completion chunk ({type(exc).__name__}: "
                                                            f"{_first_line(exc)}): {line[:200]!r}",
                                                 "code": "invalid_response"}}, headers) from exc
        # The opening chunk names only the role: nothing to hand on (LocalRouter's streams have none either).
        said = (chunk.content or chunk.tool_calls or chunk.refusal or chunk.reasoning_content or chunk.logprobs
                or chunk.finish_reason or chunk.trace)
        return chunk if said else None

