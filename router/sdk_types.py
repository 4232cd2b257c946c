"""What the SDK returns and raises: ``ChatResult``, ``StreamChunk``, ``RouterAPIError`` and
``RouterConnectionError``, the same from ``Client``, ``AsyncClient`` and ``LocalRouter`` (all in ``router.sdk``)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from experts.types import Usage
from router.trace import Trace

if TYPE_CHECKING:
    pass

__all__ = ["ChatResult", "Messages", "RouterAPIError", "RouterConnectionError", "StreamChunk"]

# A chat's messages: a string (one user message), or OpenAI-format message objects.
Messages = str | Sequence[dict[str, Any]]


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

