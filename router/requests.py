"""What a request may hold: its models, and the checks that turn a body into one or a ``RequestProblem``.

One place checks a request, and both front doors use it: the HTTP service (``router.service``) and the in-process
``LocalRouter`` (``router.sdk``), so a bad request fails with the same status, code, ``param`` and message either
way. That is why it lives apart from the service: it imports neither FastAPI nor Starlette, and ``LocalRouter``
must not pull in the web framework to check a request. Reading the body off the wire (its size limit, the client's
disconnect) stays in the service; what is read is decided here.

A ``RequestProblem`` carries its HTTP status and OpenAI-style error (``router.errors.error_body``); the service
answers with it, and ``LocalRouter`` raises it as the ``RouterAPIError`` a ``Client`` would get.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, model_validator

from experts.types import TOOLLESS_CHOICES, ChatRequest, is_blank
from router.errors import error_body
from router.feedback import FeedbackBody, FeedbackUnavailable, UnknownFeedbackExpert, UnknownRequest

if TYPE_CHECKING:
    from router.orchestrator import Orchestrator

__all__ = [
    "FEEDBACK_FAILURES",
    "MAX_BATCH_QUERIES",
    "RequestProblem",
    "RouteBatch",
    "RouteQuery",
    "check_combiner",
    "feedback_off",
    "feedback_problem",
    "json_body",
    "parse_chat",
    "parse_feedback",
    "parse_json",
    "parse_route",
    "parse_route_batch",
    "parse_since",
]


class RequestProblem(Exception):
    """A request the service refuses: its HTTP status and OpenAI-style error (``error_body``)."""

    def __init__(self, status: int, message: str, type_: str, code: str, param: str | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.extra = extra or {}

    def error_body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code, self.param, **self.extra)


class RouteQuery(BaseModel):
    """``POST /v1/route``: the query as a string, or the conversation as chat messages (one of the two)."""

    model_config = ConfigDict(extra="forbid")

    query: str | None = None
    messages: list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _one_of(self) -> RouteQuery:
        if (self.query is None) == (self.messages is None):
            given = "both" if self.query is not None else "neither"
            raise ValueError(f"give 'query' (a string) or 'messages' (chat messages), not {given}")
        return self


# ``service.max_batch_queries``' default; its ceiling is the schema's.
MAX_BATCH_QUERIES = 1024
# The longest model name a request may give (Hugging Face ids are at most 96 characters of org and name).
MAX_MODEL_CHARS = 256


class RouteBatch(BaseModel):
    """``POST /v1/route/batch``: queries to share out by expert choice, and optionally each expert's room."""

    model_config = ConfigDict(extra="forbid")

    queries: list[str] = Field(min_length=1)  # at most service.max_batch_queries (``parse_route_batch``)
    # Room per expert (experts checked by the handler); strict, as chat fields are: true or "2" is no count.
    capacity: dict[str, Annotated[StrictInt, Field(ge=0)]] | None = None


# -- the body as JSON -----------------------------------------------------------------------------------------
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
# How deep a body's arrays and objects may nest. The parser itself stops near the interpreter's recursion limit,
# but a body nested a little less deep parses and then fails later, deeper in the stack (writing it to an expert
# or into the trace): a 500. Tool schemas, the deepest thing a client sends, nest a dozen levels or so.
MAX_JSON_DEPTH = 128


def _not_json(constant: str) -> Any:
    # Python's json reads NaN and Infinity, which JSON has not; forwarded, they would reach an expert as invalid
    # JSON (or as a number no parameter takes).
    raise ValueError(f"{constant} is not a JSON value (JSON has no NaN or Infinity)")


def _finite(literal: str) -> float:
    # A number too large for a float (1e400) reads as infinity, which would be forwarded as Infinity, too.
    value = float(literal)
    if not math.isfinite(value):
        raise ValueError(f"the number {literal[:40]} is beyond a 64-bit float's range (it would read as infinity)")
    return value


# What a body nested past MAX_JSON_DEPTH is told: by the JSON reader's recursion limit, or by the walk after it.
_TOO_DEEP = f"request body is nested too deeply (arrays and objects may nest at most {MAX_JSON_DEPTH} levels)"
_DEEPER = f"request body is nested more than {MAX_JSON_DEPTH} levels deep (arrays and objects)"


def _invalid_json(message: str) -> RequestProblem:
    return RequestProblem(400, message, "invalid_request_error", "invalid_json")


def json_body(value: Any) -> Any:
    """``value``, a request body built in process (``LocalRouter``), as the service would read it from JSON: what
    JSON carries as it is, a pydantic model (a ``ChatMessage``) as the fields it was given, a numpy number as its
    value, any mapping as an object. Else the ``RequestProblem`` (400 ``invalid_json``) ``parse_json`` raises for
    such bytes: a lone surrogate ("\\ud800", a string decoded with surrogateescape, an emoji cut in half), NaN or
    Infinity, nesting past ``MAX_JSON_DEPTH``, or a value JSON has no form for (a datetime), which would otherwise
    reach the expert, or fail when the answer, trace or feedback store writes it."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, default=_as_json)
        text.encode("utf-8")
        read = json.loads(text)
    except RecursionError:
        raise _invalid_json(_TOO_DEEP) from None
    except (ValueError, TypeError) as exc:  # UnicodeEncodeError is a ValueError
        raise _invalid_json(f"request body is not valid JSON: {exc}") from None
    if json_depth(read) > MAX_JSON_DEPTH:
        raise _invalid_json(_DEEPER)
    return read


def _as_json(value: Any) -> Any:
    """``json.dumps``' ``default``: the JSON form of what in-process callers hand over beside plain values."""
    from collections.abc import Mapping

    from pydantic import BaseModel

    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True, exclude_unset=True)  # its wire form, as openai's
    if isinstance(value, Mapping):
        return dict(value)
    item = getattr(value, "item", None)  # a numpy scalar: its Python number, bool or string
    if callable(item) and getattr(value, "shape", None) == ():
        return item()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def parse_json(raw: bytes) -> Any:
    """A request body's bytes as JSON, or the ``RequestProblem`` (400 ``invalid_json``) saying why not."""
    try:
        # UTF-8, as RFC 8259 has JSON on the wire (a BOM is let through): decoded strictly here, so no surrogate
        # comes in as bytes. json.loads of bytes would let one through (it decodes UTF-8 with "surrogatepass", and
        # guesses UTF-16 and UTF-32 too), and it would fail later, when the answer, the trace or the feedback
        # store wrote it: a 500 after the expert was paid.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RequestProblem(400, f"request body is not UTF-8 text (byte {exc.start}: {exc.reason}); send JSON "
                           "encoded as UTF-8", "invalid_request_error", "invalid_json") from None
    try:
        value = json.loads(text, parse_constant=_not_json, parse_float=_finite, object_pairs_hook=_unique_keys)
        # "\ud800" is valid JSON but not encodable UTF-8: it would fail later, when the answer or trace echoes
        # it. Only a \uD800-\uDFFF escape can produce one now, so the re-encoding check runs only on bodies
        # holding such an escape, not on every request.
        if _SURROGATE_ESCAPE.search(raw):
            json.dumps(value, ensure_ascii=False).encode("utf-8")
    except _DuplicateKey as exc:
        raise RequestProblem(400, f"request body gives the key {exc.key!r} twice in one object; give each key once "
                                  "(readers differ on which one counts: a proxy checking the first would pass what "
                                  "the router reads from the last)", "invalid_request_error", "invalid_json") from None
    except RecursionError:
        raise _invalid_json(_TOO_DEEP) from None
    except (ValueError, UnicodeDecodeError) as exc:  # UnicodeEncodeError is a ValueError
        raise _invalid_json(f"request body is not valid JSON: {exc}") from None
    # Only a body with more brackets than the bar can nest past it, so most bodies skip the walk.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and json_depth(value) > MAX_JSON_DEPTH:
        raise _invalid_json(_DEEPER)
    return value


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key if len(key) <= 40 else key[:37] + "..."


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's pairs as a dict; a key given twice is refused (``_DuplicateKey``), where json.loads keeps
    the last silently."""
    value = dict(pairs)
    if len(value) < len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return value


def json_depth(value: Any) -> int:
    """How many arrays and objects ``value`` nests at its deepest (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return deepest


# -- the body as a request ------------------------------------------------------------------------------------
_Body = TypeVar("_Body", bound=BaseModel)


def _where(error: Any) -> str:
    """A validation error's field as OpenAI writes a parameter: its own place, or the one a validator of a whole
    list named (``where`` in its context: the message at fault in ``messages``)."""
    return _field_path((error.get("ctx") or {}).get("where") or error["loc"])


def _field_path(loc: tuple[int | str, ...]) -> str:
    """A validation error's location as OpenAI writes a parameter: ``messages[0].content``."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path


def _message(error: Any) -> str:
    return str(error["msg"]).removeprefix("Value error, ")


def _validated(model: type[_Body], body: Any) -> _Body:
    """``body`` as a ``model``, or a 400 naming the first field that is wrong and why."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        e = exc.errors()[0]
        where = _where(e) or "<body>"
        why = _message(e)
        if e["type"] == "extra_forbidden" and len(e["loc"]) == 1:  # a misspelt or unknown top-level field
            why = f"unknown field; the fields are {', '.join(map(repr, model.model_fields))}"
        raise RequestProblem(400, f"invalid request: {where}: {why}", "invalid_request_error",
                           "invalid_request", param=None if where == "<body>" else where) from None


def _all_validated(model: type[_Body], body: Any, what: str) -> _Body:
    """``body`` (a JSON object) as a ``model``, or a 400 naming every field that is wrong, ``param`` the first;
    ``what`` begins the message (``invalid request``, ``invalid feedback``)."""
    if not isinstance(body, dict):
        raise RequestProblem(400, "request body must be a JSON object", "invalid_request_error", "invalid_request")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(f"{_where(e) or '<body>'}: {_message(e)}" for e in exc.errors())
        first = _where(exc.errors()[0]) or None
        raise RequestProblem(400, f"{what}: {problems}", "invalid_request_error", "invalid_request",
                           param=first) from None


def parse_chat(body: Any, max_chars: int) -> ChatRequest:
    """A chat request's body as a ``ChatRequest``, or the ``RequestProblem`` (400) naming every field that is
    wrong, the deprecated ``functions``/``function_call``, a ``tool_choice`` that demands a tool call with no tools
    to call, or the messages' length over
    ``max_chars``."""
    chat = _all_validated(ChatRequest, body, "invalid request")
    if len(chat.model) > MAX_MODEL_CHARS:  # a name, echoed in errors and logged with the request: bounded
        raise RequestProblem(400, f"invalid request: model: {len(chat.model)} characters, over the limit of "
                           f"{MAX_MODEL_CHARS} for a model's name ('auto', the service's name or an expert's)",
                           "invalid_request_error", "invalid_request", param="model")
    # Sent as null (the Python openai client's None) they ask for nothing, as any other field's null.
    legacy = next((k for k in ("functions", "function_call") if (chat.model_extra or {}).get(k) is not None), None)
    if legacy is not None:
        # An expert would answer with message.function_call, which the router's answer (tool_calls) does not carry:
        # the call would be lost, so the request is refused before any expert is paid for it.
        raise RequestProblem(400, f"invalid request: {legacy}: the deprecated function-calling fields are not "
                           "supported; send tools (and tool_choice) instead", "invalid_request_error",
                           "invalid_request", param=legacy)
    choice = (chat.model_extra or {}).get("tool_choice")
    if not chat.tools and choice is not None and choice not in TOOLLESS_CHOICES:
        # As OpenAI refuses it, and before any expert is paid to refuse it. "none" and "auto" without tools are
        # left out of the upstream body instead (ChatRequest.upstream_payload).
        tools = "an empty tools list" if chat.tools == [] else "no tools"
        raise RequestProblem(400, f"invalid request: tool_choice: {json.dumps(choice)} asks for a tool call, but the "
                           f"request has {tools}; send the tools, or leave tool_choice out (or send \"auto\" or "
                           "\"none\")", "invalid_request_error", "invalid_request", param="tool_choice")
    chars = chat.text_chars()
    if chars > max_chars:
        what = "the messages" if chars == sum(len(m.text()) for m in chat.messages) else \
            "the messages, with their tool calls and the tools' definitions,"
        raise RequestProblem(400, f"{what} hold {chars} characters, over the limit of {max_chars}",
                           "invalid_request_error", "context_length_exceeded", param="messages")
    return chat


def _check_query(query: str, where: str, max_chars: int) -> None:
    """One routed query's text: not blank, and within ``max_chars``; ``where`` names it (``query``,
    ``queries[3]``)."""
    if is_blank(query):
        raise RequestProblem(400, f"invalid request: {where}: holds no text (empty, or only whitespace, control or "
                                  "zero-width characters)",
                           "invalid_request_error", "invalid_request", param=where)
    if len(query) > max_chars:
        raise RequestProblem(400, f"{where} holds {len(query)} characters, over the limit of {max_chars}",
                           "invalid_request_error", "context_length_exceeded", param=where)


def parse_route(body: Any, max_chars: int) -> ChatRequest:
    """``POST /v1/route``'s body (``query`` or ``messages``) as the ``ChatRequest`` the gate decides on, or the
    ``RequestProblem`` (400) naming what is wrong."""
    query = _validated(RouteQuery, body)
    if query.query is None:
        return parse_chat(body, max_chars)
    _check_query(query.query, "query", max_chars)
    return parse_chat({"messages": [{"role": "user", "content": query.query}]}, max_chars)


def parse_route_batch(body: Any, max_chars: int, experts: Sequence[str],
                      max_queries: int = MAX_BATCH_QUERIES) -> RouteBatch:
    """``POST /v1/route/batch``'s body, its queries and capacity checked against ``experts``, or the
    ``RequestProblem`` (400) naming what is wrong."""
    batch = _validated(RouteBatch, body)
    if len(batch.queries) > max_queries:
        raise RequestProblem(400, f"queries: {len(batch.queries)} queries, over the limit of {max_queries} a batch "
                           "may carry (service.max_batch_queries); send them in several batches",
                           "invalid_request_error", "invalid_request", param="queries")
    for i, query in enumerate(batch.queries):
        _check_query(query, f"queries[{i}]", max_chars)
    if batch.capacity is not None:
        unknown = sorted(set(batch.capacity) - set(experts))
        if unknown:
            raise RequestProblem(400, f"capacity: unknown expert(s) {', '.join(map(repr, unknown))}; known: "
                               f"{', '.join(experts)}", "invalid_request_error", "invalid_request",
                               param="capacity")
    return batch


def check_combiner(raw: str | None, orchestrator: Orchestrator, *, stream: bool = False) -> str | None:
    """The combiner strategy a request asks for (None: the configured one); an unknown strategy, or one the
    config cannot support (``fuse`` without ``combiner.aggregator``), is a 400 ``RequestProblem`` naming what is
    valid.

    A stream is served by one expert, so there is nothing to combine: asking a stream for any strategy but
    ``top1`` is a 400 too, rather than a choice that is read and then ignored."""
    if raw is None:
        return None
    try:
        strategy = orchestrator.combiner_for(raw).name
    except ValueError as exc:
        raise RequestProblem(400, f"x-moe-combiner: {exc}", "invalid_request_error", "invalid_combiner",
                           param="x-moe-combiner") from None
    if stream and strategy != "top1":
        raise RequestProblem(400, f"x-moe-combiner: {strategy!r} cannot combine a streamed answer: a stream is served "
                           "by one expert (the top-weighted), so there are no answers to combine; send the request "
                           "with stream: false to combine, or drop the header (or send 'top1') to stream",
                           "invalid_request_error", "invalid_combiner", param="x-moe-combiner")
    return strategy


# -- feedback -------------------------------------------------------------------------------------------------
def parse_feedback(body: Any, max_chars: int | None = None) -> FeedbackBody:
    """``POST /v1/feedback``'s body, or the ``RequestProblem`` (400) naming every field that is wrong. A
    ``query`` over ``max_chars`` (the service's prompt limit) is refused as a prompt would be: it becomes a
    training example, and the gate never sees a longer query."""
    verdict = _all_validated(FeedbackBody, body, "invalid feedback")
    if max_chars is not None and verdict.query is not None and len(verdict.query) > max_chars:
        raise RequestProblem(400, f"invalid feedback: query: {len(verdict.query)} characters, over the limit of "
                           f"{max_chars} (service.max_prompt_chars)", "invalid_request_error",
                           "context_length_exceeded", param="query")
    return verdict


# How each failure of the store to take a verdict is answered: (status, type, code, the request field at fault).
_FEEDBACK_PROBLEMS: dict[type[Exception], tuple[int, str, str, str | None]] = {
    UnknownRequest: (404, "invalid_request_error", "request_not_found", "request_id"),
    UnknownFeedbackExpert: (400, "invalid_request_error", "unknown_expert", "expert"),
    FeedbackUnavailable: (503, "service_unavailable", "feedback_unavailable", None),
}


# What a feedback store raises for a verdict it cannot take, each answered by ``feedback_problem``.
FEEDBACK_FAILURES = (UnknownRequest, UnknownFeedbackExpert, FeedbackUnavailable)


def feedback_problem(exc: UnknownRequest | UnknownFeedbackExpert | FeedbackUnavailable) -> RequestProblem:
    """How a verdict the store could not take is answered, by the service and by ``LocalRouter`` alike: an
    unknown answer id is a 404, an expert the config does not have a 400, a store that cannot be reached a 503."""
    status, type_, code, param = _FEEDBACK_PROBLEMS[type(exc)]
    return RequestProblem(status, str(exc), type_, code, param=param)


def feedback_off() -> RequestProblem:
    """The answer to a verdict where no feedback store runs (``feedback.enabled`` is false): a 409."""
    return RequestProblem(409, "feedback is off: this router runs without a feedback store (feedback.enabled is "
                               "false)", "invalid_request_error", "feedback_unavailable")


def parse_since(raw: str | None) -> float | None:
    """``GET /admin/feedback``'s ``since`` as Unix seconds or an ISO 8601 time (UTC when it names no zone)."""
    if raw is None or raw == "":
        return None
    try:
        seconds = float(raw)
    except ValueError:
        pass
    else:
        if math.isfinite(seconds):
            return seconds
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        raise RequestProblem(400, f"since={raw!r} is neither Unix seconds nor an ISO 8601 time",
                           "invalid_request_error", "invalid_request", param="since") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
