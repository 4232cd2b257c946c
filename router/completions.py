"""What the service sends for a chat completion, in OpenAI's format: the answer's body, and a stream's
server-sent events (``sse``), its chunks built by ``Chunks``. JSON has no infinity, so a log-probability of -inf
is sent as vLLM's floor (``_finite``)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi.responses import JSONResponse

from experts.types import ChatRequest
from router.edge import detached_record, internal_error_body, note_failure
from router.fallback import AllExpertsFailed
from router.logs import RequestRecord
from router.orchestrator import StreamEnd, StreamPiece

__all__ = ["Chunks", "FiniteJSONResponse", "began_by", "completion_body", "include_usage", "sse"]

log = logging.getLogger("router.service")


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


class FiniteJSONResponse(JSONResponse):
    """A ``JSONResponse`` whose non-finite floats (an upstream's) are sent as JSON can hold them (``_finite``), and
    whose lone surrogates (an upstream's ``"\\ud83d"`` without its pair: valid JSON, but no UTF-8) are sent
    escaped, as a stream's chunks send them (``_json_text``)."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except ValueError:  # UnicodeEncodeError is one
            return _json_text(content).encode("ascii")


def completion_body(answer: Any, request_id: str) -> dict[str, Any]:
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


class Chunks:
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


def include_usage(chat: ChatRequest) -> bool:
    options = (chat.model_extra or {}).get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


async def sse(events: AsyncIterator[StreamPiece | StreamEnd], first: StreamPiece | StreamEnd,
               chunks: Chunks, record: RequestRecord | None = None,
               on_end: Callable[[str], Awaitable[None]] | None = None) -> AsyncIterator[bytes]:
    model = began_by(first) or "moe-router"
    record = record or detached_record()
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
        note_failure(record, exc)
        yield f"data: {json.dumps(exc.error_body())}\n\n".encode()
    except Exception as exc:
        # A defect of ours after the 200 went out: logged here, once, with its traceback, and told to the client
        # as an error event (the OpenAI SDK raises it) before the stream ends as any other does. Raised on, it
        # would be logged again by the server, which would also drop the keep-alive connection.
        record.error = "internal_error"
        log.exception("internal error while streaming (request %s)", record.request_id)
        yield f"data: {json.dumps(internal_error_body('a stream', exc))}\n\n".encode()
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


def began_by(first: StreamPiece | StreamEnd) -> str | None:
    """The expert that began a stream: its first piece's, or, for an answer without a piece (an empty one: the
    expert sent only its finish), the expert that gave it."""
    return first.expert if isinstance(first, StreamPiece) else first.trace.answered_by
