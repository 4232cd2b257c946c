"""An expert behind any OpenAI-compatible chat-completions endpoint: vLLM, OpenRouter, OpenAI itself.

Its connections (``experts.http_client``: aiohttp on real sockets, httpx over an injected transport) are opened
on first use. Every transport failure and every error status is translated here into the tree in
``experts.errors``, so nothing above this module sees either library::

    every connection busy for timeout_s    -> ExpertOverloaded   (max_concurrency requests in flight)
    connect or read timeout                -> ExpertTimeout      (also between stream chunks)
    refused, reset, closed mid-message     -> ExpertUnavailable
    429, 5xx                               -> ExpertRateLimited (with Retry-After), ExpertServerError (a 503
                                              with Retry-After carries it too, as ``retry_after_s``)
    401, 403, other 4xx                    -> ExpertAuthError, ExpertRejected
    bad JSON, no ``choices``, bad SSE      -> ExpertProtocolError

The API key lives only in the client's default headers, and an endpoint's ``user:password@`` only in its URL
(sent as ``Authorization: Basic``). Every message built here is scrubbed of both anyway, because some upstreams
echo a rejected key or header back in their error body. The operator's log line for an error status names its
status and the error's type and code, never its text: that may quote the request (a 422's ``detail[].input``, a
5xx naming the prompt), and prompts stay out of the log. The text reaches the client's error and the trace.
Reading an error body (its message, labels, blamed field and Retry-After) is ``experts.error_body``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from typing import Any, ClassVar

from pydantic import ValidationError

from experts.base import Expert, ExpertContext, ExpertSpec
from experts.error_body import error_body, error_labels, error_param, json_object, parse_retry_after, url_credentials
from experts.errors import (
    INVALID_REQUEST_STATUSES,
    ROUTER_STATUS_BY_CODE,
    ExpertAuthError,
    ExpertConfigError,
    ExpertError,
    ExpertHTTPError,
    ExpertOverloaded,
    ExpertProtocolError,
    ExpertRateLimited,
    ExpertRejected,
    ExpertServerError,
    ExpertTimeout,
    ExpertUnavailable,
    NoRecording,
)
from experts.http_client import AiohttpClient, HttpClient, HttpFailure, HttpxClient
from experts.redact import redact, scrubbed
from experts.types import (
    DETAILS,
    ChatRequest,
    ExpertReply,
    StreamDelta,
    Usage,
    estimate_tokens,
    reasoning_of,
    usage_details,
)

__all__ = ["OpenAICompatibleExpert", "VllmExpert", "parse_retry_after"]

# Upstream error text kept in our messages: enough to diagnose, short enough for a trace.
_EXCERPT_CHARS = 200
# How long to read what follows a stream's [DONE] (normally nothing but the body's end) before closing instead.
_DRAIN_S = 0.25
# How long to wait, once a chunk carried the finish_reason, for the usage chunk and [DONE] (sent at once by
# vLLM and OpenAI), at most half the expert's timeout (the dispatcher's stall limit); a connection that stalls or
# breaks in that time still ends a complete answer.
_AFTER_FINISH_S = 1.0
# The fields of a chat completion ``_reply`` reads (or the router writes anew), by where they are: any other is
# the upstream's own, passed on (``ExpertReply.extra``).
_READ = {"response": frozenset({"id", "object", "created", "model", "choices", "usage", "moe"}),
         "choice": frozenset({"index", "message", "finish_reason", "logprobs"}),
         "message": frozenset({"role", "content", "tool_calls", "refusal", "reasoning_content", "reasoning",
                               "function_call"})}
log = logging.getLogger("experts.openai_compat")


class OpenAICompatibleExpert(Expert):
    """Talks to ``{endpoint}/chat/completions``, plain or streamed (SSE)."""

    # Added to a stream's ``stream_options`` (whose ``include_usage`` is always on): what this kind of server
    # offers beyond OpenAI's, which refuses keys it does not know.
    STREAM_OPTIONS: ClassVar[Mapping[str, Any]] = {}
    # Whether the upstream is another router that sends its routing trace in a reply's ``moe`` field (a subclass
    # says so): any other upstream's ``moe`` object would reach clients as a trace it made up.
    SENDS_TRACE: ClassVar[bool] = False

    def __init__(self, config: ExpertSpec, context: ExpertContext | None = None) -> None:
        super().__init__(config, context)
        if not config.endpoint:
            raise ExpertConfigError(config.name, "an OpenAI-compatible expert needs an endpoint")
        self._url = config.endpoint.rstrip("/") + "/chat/completions"
        self._http: HttpClient | None = None
        # What is scrubbed from every message, longest first: the endpoint's credentials, and the key once the
        # client has read it. Kept only for that, never shown.
        self._secrets = url_credentials(config.endpoint)

    def __repr__(self) -> str:
        cls = type(self).__name__
        return f"{cls}(name={self.name!r}, model={self.config.model!r}, endpoint={redact(self._url)!r})"

    async def generate(self, request: ChatRequest) -> ExpertReply:
        body = request.upstream_payload(self.config.model, stream=False)
        started = time.perf_counter()
        try:
            response = await self._client().post(self._url, body, self._request_headers())
        except HttpFailure as exc:
            raise self._transport_error(exc) from exc
        if not 200 <= response.status < 300:
            raise self._status_error(response.status, response.headers, response.content)
        data: dict[str, Any] | None = None
        try:
            data = self._decode(response.content)
            return self._reply(data, (time.perf_counter() - started) * 1000.0, request)
        except ExpertProtocolError as exc:
            self._log_protocol(exc)
            if exc.spent is None and data is not None:
                exc.spent = self._billed(data)
            raise

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamDelta]:
        body = request.upstream_payload(self.config.model, stream=True)
        if self.STREAM_OPTIONS:
            body["stream_options"] = {**body["stream_options"], **self.STREAM_OPTIONS}
        try:
            async with self._client().stream(self._url, body, self._request_headers()) as response:
                if not 200 <= response.status < 300:
                    raise self._status_error(response.status, response.headers, await response.read())
                async for delta in self._deltas(response.lines(), request.estimated_prompt_tokens()):
                    yield delta
        except HttpFailure as exc:
            raise self._transport_error(exc) from exc
        except ExpertProtocolError as exc:
            self._log_protocol(exc)
            raise

    def _request_headers(self) -> Mapping[str, str] | None:
        """Headers of this call's own, beside the client's (its key): none here."""
        return None

    def _log_protocol(self, exc: ExpertProtocolError) -> None:
        """A malformed answer's line in the operator's log, as every failed call has one: what was wrong, and the
        excerpt of the answer that shows it only where the service logs content (it may quote the answer)."""
        said = exc.message if self.context.log_content else exc.message.split(":", 1)[0]
        log.warning("expert %s (%s): protocol failed: %s", self.name, redact(self._url), said)

    async def aclose(self) -> None:
        if self._http is not None:
            http, self._http = self._http, None
            await http.aclose()

    # --- I/O --------------------------------------------------------------------------------------------

    def _client(self) -> HttpClient:
        """The expert's connections (``max_concurrency`` in all), built on first use; see ``experts.http_client``."""
        if self._http is None:
            key = self.config.api_key()
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            if key:
                self._secrets = sorted({*self._secrets, key}, key=len, reverse=True)
            timeout_s, most = self.config.timeout_s, self.config.max_concurrency
            transport = self.context.transport
            self._http = (AiohttpClient(headers=headers, timeout_s=timeout_s, max_connections=most,
                                        keepalive_s=self.config.keepalive_s)
                          if transport is None else
                          HttpxClient(headers=headers, timeout_s=timeout_s, max_connections=most, transport=transport))
        return self._http

    async def _deltas(self, lines: AsyncIterator[str], prompt_tokens: int) -> AsyncIterator[StreamDelta]:
        """Turn SSE lines into deltas; the last delta carries finish_reason, usage and cost (a complete answer's
        finish is also passed on as soon as it comes, with the usage so far, before what follows it is read).

        Once a chunk carries a ``finish_reason`` the answer is complete: what may follow (the usage chunk,
        ``[DONE]``, the body's end) is read for at most ``_DRAIN_S``, and a connection that breaks or stalls
        then ends the stream as finished, not as a failure another expert would have to continue.

        A delta is passed on when it carries text, tool calls, a refusal or reasoning (``reasoning_content``,
        or newer vLLM's ``reasoning``), with the usage so far where its chunk carried one (vLLM's
        ``continuous_usage_stats``): a stream that breaks off then has its tokens counted, not estimated. A stream
        that ends without usage gets an estimate on its last delta (``usage_estimated``): ``prompt_tokens``, and
        a token per delta passed on."""
        finish_reason: str | None = None
        sent = 0
        usage_chunk: dict[str, Any] = {}
        nested: dict[str, Any] | None = None
        done = False
        events = _sse_data(lines)
        async for data in events:
            if data.strip() == "[DONE]":
                done = True
                break
            chunk = self._decode(data.encode())
            usage_chunk, nested = _usage_and_trace(chunk, usage_chunk, nested)
            choices = chunk["choices"]
            if not choices:
                continue  # vLLM's usage-only chunk, sent after the finish_reason chunk
            choice = choices[0]
            if not isinstance(choice, dict):
                raise ExpertProtocolError(self.name, f"stream chunk's choice is a {type(choice).__name__}, not an "
                                                     "object")
            finish_reason = self._finish_reason(choice) or finish_reason
            delta = choice.get("delta") or {}
            if not isinstance(delta, dict):
                raise ExpertProtocolError(self.name, f"stream chunk's 'delta' is a {type(delta).__name__}, not an "
                                                     "object")
            content = self._text(delta.get("content"), "delta.content")
            tool_calls = self._tool_calls(delta.get("tool_calls"), "delta.tool_calls")
            refusal = delta["refusal"] if isinstance(delta.get("refusal"), str) else ""
            logprobs = choice.get("logprobs")
            piece = StreamDelta(content=content, tool_calls=tool_calls, refusal=refusal,
                                reasoning_content=reasoning_of(delta) or "",
                                logprobs=logprobs if isinstance(logprobs, dict) else None)
            if piece.has_output():
                sent += 1
                running = self._usage(chunk)[0] if isinstance(chunk.get("usage"), dict) else None
                # The running usage, with the upstream's own price of it when it gives one (as the last chunk's is
                # taken): a stream that breaks off is then counted at what the upstream charged.
                yield piece if running is None else replace(piece, usage=running, cost_usd=self._upstream_price(chunk))
            if finish_reason is not None:
                break
        else:  # the body ended without [DONE]: complete only if a finish_reason came
            if finish_reason is None:
                raise ExpertProtocolError(self.name, "stream ended before a finish_reason or [DONE]")
            yield self._last_delta(finish_reason, usage_chunk, nested, Usage.counted(prompt_tokens, sent))
            return
        # [DONE], or a finish_reason: the answer is complete, and is said to be at once, so that a caller's time
        # limit running out in what follows ends the answer rather than failing it (``router.dispatch``). Then
        # read what follows (the usage chunk, [DONE], the end of the body) so the connection goes back to the
        # pool, but never long, and never as a failure; the last delta carries the usage it brought.
        said = self._last_delta(finish_reason or "stop", usage_chunk, nested, Usage.counted(prompt_tokens, sent))
        yield replace(said)  # a copy: a caller may change what it is given (a nested router prices it)
        with contextlib.suppress(TimeoutError, HttpFailure, ExpertError):
            wait = _DRAIN_S if done else min(_AFTER_FINISH_S, self.config.timeout_s / 2)
            async with asyncio.timeout(wait) as window:
                async for data in events:
                    if data.strip() == "[DONE]":
                        window.reschedule(asyncio.get_running_loop().time() + _DRAIN_S)
                    else:
                        usage_chunk, nested = _usage_and_trace(self._decode(data.encode()), usage_chunk, nested)
        last = self._last_delta(finish_reason or "stop", usage_chunk, nested, Usage.counted(prompt_tokens, sent))
        if last != said:  # the usage (or a nested router's trace) came after the finish
            yield last

    def _last_delta(self, finish_reason: str, usage_chunk: dict[str, Any], nested: dict[str, Any] | None,
                    estimate: Usage) -> StreamDelta:
        """The stream's last delta; without the upstream's usage (or for the counts it leaves out), ``estimate``
        stands."""
        usage, estimated = self._usage(usage_chunk, estimate)
        assert usage is not None  # an estimate stands in for whatever is missing
        cost = self._upstream_price(usage_chunk)
        if cost is None:
            cost = self.cost(usage)
        return StreamDelta(finish_reason=finish_reason, usage=usage, cost_usd=cost, nested=self._nested(nested),
                           usage_estimated=estimated)

    def _nested(self, trace: Any) -> dict[str, Any] | None:
        """The routing trace another moe-router sends in its answer's ``moe`` field, where the upstream is one
        (``SENDS_TRACE``), with every string scrubbed of this expert's credentials as error text is."""
        if not self.SENDS_TRACE or not isinstance(trace, dict):
            return None
        return self._scrubbed(trace) if self._secrets else trace

    def _scrubbed(self, value: Any) -> Any:
        """``value`` (parsed JSON from the upstream, or text) scrubbed of this expert's credentials."""
        return scrubbed(value, self._secrets)

    # --- parsing (pure) ---------------------------------------------------------------------------------

    def _decode(self, raw: bytes) -> dict[str, Any]:
        """One completion object (or stream chunk); anything else is a protocol error."""
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ExpertProtocolError(self.name, f"invalid JSON: {self._excerpt(raw)!r}") from None
        if not isinstance(data, dict):
            raise ExpertProtocolError(self.name, f"expected a JSON object, got {type(data).__name__}")
        if "error" in data and "choices" not in data:
            # vLLM reports a failure inside an already-started stream as a data event.
            error = data["error"]
            message = error.get("message", error) if isinstance(error, dict) else error
            code = error.get("code") if isinstance(error, dict) else None
            # An HTTP status as the code (vLLM), or another moe-router's error code (its status stands for it).
            status = (code if isinstance(code, int) and 400 <= code <= 599
                      else ROUTER_STATUS_BY_CODE.get(code, 500) if isinstance(code, str) else 500)
            failure = self._http_error(status, self._excerpt(str(message)), error_labels(data), None,
                                       error_param(data))
            failure.nested = self._nested(data.get("moe"))  # another moe-router's trace, when it sent one
            raise failure
        if not isinstance(data.get("choices"), list):
            refused = ExpertProtocolError(self.name, "response has no 'choices' list")
            refused.spent = self._billed(data)  # what its usage says the upstream billed all the same
            raise refused
        return data

    def _billed(self, data: dict[str, Any]) -> dict[str, Any] | None:
        """What a reply the router refuses (no choices, a malformed message) still cost, where its ``usage`` counts
        both sides: the upstream bills the call all the same (``ExpertError.spent``)."""
        try:
            usage, _ = self._usage(data)
        except ExpertProtocolError:  # a malformed usage: nothing to count by
            return None
        if usage is None:
            return None
        cost = self._upstream_price(data)
        return {"usage": usage, "cost_usd": self.cost(usage) if cost is None else cost, "usage_estimated": False}

    def _upstream_price(self, data: dict[str, Any]) -> float | None:
        """The upstream's own price of the call (``usage.cost``: OpenRouter's convention, and ``moe serve-replay``'s
        recorded costs), which it charges, so it stands over the config's prices; None where it gives none, and
        where it says 0 for a call the config prices above 0 (a proxy that writes ``cost: 0`` would otherwise make
        every call it passes on free to the budget, the metrics and the outcome records)."""
        cost = _upstream_cost(data)
        if cost == 0 and (self.config.cost.input_per_1k or self.config.cost.output_per_1k):
            return None
        return cost

    def _usage(self, data: dict[str, Any], estimate: Usage | None = None) -> tuple[Usage | None, bool]:
        """The upstream's usage in ``data``, and whether any of it is ``estimate``'s: a count it left out, sent as
        null or as no count (negative, fractional: some servers send null, or -1, for what they do not count) is
        ``estimate``'s, so a call is never counted as free (``usage: {}`` was 0 tokens at $0). Without
        ``estimate``, a usage lacking either count is None. A missing total is the two counts' sum."""
        raw = data.get("usage")
        if not isinstance(raw, dict):
            return estimate, estimate is not None
        known: dict[str, int] = {k: v for k in ("prompt_tokens", "completion_tokens")
                                 if isinstance(v := raw.get(k), int) and not isinstance(v, bool) and v >= 0}
        if len(known) < 2 and estimate is None:
            return None, False
        prompt = known.get("prompt_tokens", estimate.prompt_tokens if estimate else 0)
        completion = known.get("completion_tokens", estimate.completion_tokens if estimate else 0)
        total = raw.get("total_tokens")
        if not (isinstance(total, int) and not isinstance(total, bool) and total >= prompt + completion) \
                or len(known) < 2:
            total = prompt + completion
        try:
            details = {k: usage_details(raw.get(k)) for k in DETAILS}
            usage = Usage.model_validate({"prompt_tokens": prompt, "completion_tokens": completion,
                                          "total_tokens": total, **details})
        except ValidationError:
            raise ExpertProtocolError(self.name, "malformed 'usage'") from None
        return usage, len(known) < 2

    def _reply(self, data: dict[str, Any], latency_ms: float, request: ChatRequest) -> ExpertReply:
        if not data["choices"] or not isinstance(data["choices"][0], dict):
            raise ExpertProtocolError(self.name, "response has an empty 'choices' list")
        choice = data["choices"][0]
        message = choice.get("message")
        if not isinstance(message, dict):
            raise ExpertProtocolError(self.name, "choice has no 'message' object")
        content = self._text(message.get("content"), "message.content")
        tool_calls = self._tool_calls(message.get("tool_calls"), "message.tool_calls")
        finish_reason = self._finish_reason(choice) or "stop"
        refusal = message["refusal"] if isinstance(message.get("refusal"), str) else None
        reasoning = reasoning_of(message)
        # What the upstream does not count is estimated as a stream's is, the prompt and the output at about 4
        # characters a token, so the cost budget and the metrics do not count the call as free.
        written = len(content) + len(reasoning or "") + len(refusal or "") + sum(
            len(json.dumps(call, default=str)) for call in tool_calls or [])
        usage, estimated = self._usage(data, Usage.counted(request.estimated_prompt_tokens(),
                                                           estimate_tokens(written)))
        assert usage is not None
        upstream_cost = self._upstream_price(data)
        return ExpertReply(
            expert=self.name,
            content=content,
            usage=usage,
            usage_estimated=estimated,
            cost_usd=self.cost(usage) if upstream_cost is None else upstream_cost,
            latency_ms=latency_ms,
            finish_reason=finish_reason,
            tool_calls=tool_calls,
            model=str(data.get("model") or self.config.model),
            logprobs=choice["logprobs"] if isinstance(choice.get("logprobs"), dict) else None,
            refusal=refusal,
            reasoning_content=reasoning,
            # When the upstream is another moe-router, its routing trace.
            nested=self._nested(data.get("moe")),
            extra=self._extra(data, choice, message),
        )

    def _extra(self, data: dict[str, Any], choice: dict[str, Any],
               message: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
        """What the answer holds beyond the fields read here (``ExpertReply.extra``), scrubbed of this expert's
        credentials as its error text is; None when nothing."""
        found = {where: {k: v for k, v in part.items() if k not in _READ[where]}
                 for where, part in (("response", data), ("choice", choice), ("message", message))}
        kept = {where: fields for where, fields in found.items() if fields}
        if not kept:
            return None
        return self._scrubbed(kept) if self._secrets else kept

    def _text(self, value: Any, where: str) -> str:
        """A message's (or delta's) ``content`` as text: a string, nothing, or a list of text parts (as some
        providers send an answer); anything else is a protocol error, so the next expert takes over."""
        if value is None or isinstance(value, str):
            return value or ""
        if isinstance(value, list):
            pieces = []
            for part in value:
                if isinstance(part, str):
                    pieces.append(part)
                elif isinstance(part, dict) and part.get("type") in ("text", "output_text") \
                        and isinstance(part.get("text"), str):
                    pieces.append(part["text"])
                elif not (isinstance(part, dict) and part.get("type") in ("reasoning", "thinking")):
                    raise ExpertProtocolError(self.name, f"{where} holds a part that is not text: "
                                                         f"{self._excerpt(json.dumps(part, default=str))}")
            return "".join(pieces)
        raise ExpertProtocolError(self.name, f"{where} is a {type(value).__name__}, not a string")

    def _tool_calls(self, value: Any, where: str) -> list[dict[str, Any]] | None:
        if value is None or value == []:
            return None
        if isinstance(value, list) and all(isinstance(call, dict) for call in value):
            return value
        raise ExpertProtocolError(self.name, f"{where} is not a list of objects")

    def _finish_reason(self, choice: dict[str, Any]) -> str | None:
        value = choice.get("finish_reason")
        if value is None or isinstance(value, str):
            return value or None
        raise ExpertProtocolError(self.name, f"finish_reason is a {type(value).__name__}, not a string")

    # --- error translation ------------------------------------------------------------------------------

    def _transport_error(self, exc: HttpFailure) -> ExpertError:
        what = self._excerpt(exc.detail) or "no detail"
        # The error's message reaches clients without addresses; the operator's log has them.
        log.warning("expert %s (%s): %s failed: %s", self.name, redact(self._url), exc.kind,
                    self._excerpt(exc.raw) or "no detail")
        if exc.kind == "overloaded":
            return ExpertOverloaded(self.name, what)
        if exc.kind == "timeout":
            return ExpertTimeout(self.name, f"no answer within {self.config.timeout_s:g}s ({what})")
        if exc.kind == "decoding":
            return ExpertProtocolError(self.name, what)
        return ExpertUnavailable(self.name, what)

    def _status_error(self, status: int, headers: Mapping[str, str], content: bytes) -> ExpertError:
        if status < 400:
            return ExpertProtocolError(self.name, f"unexpected HTTP {status}")
        raw = content.decode("utf-8", errors="replace")
        data = json_object(raw)
        text, labels, param = error_body(raw, data)
        if status == 404 and f"code {NoRecording.kind}" in labels:
            # A replay server's (experts.replay_server) missing recording: this prompt's alone, as it is in process.
            # Read as a 404 (a model the endpoint does not serve), it tripped the breaker, and a few unrecorded
            # prompts locked the recorded ones out.
            log.info("expert %s (%s): HTTP 404 failed (%s)", self.name, redact(self._url), NoRecording.kind)
            return NoRecording(self.name, self._excerpt(text))
        failure = self._http_error(status, self._excerpt(text), labels, headers.get("retry-after"), param)
        if data is not None:  # another moe-router's error carries its trace (read where SENDS_TRACE says so)
            failure.nested = self._nested(data.get("moe"))
        return failure

    def _http_error(self, status: int, detail: str, labels: list[str], retry_after: str | None,
                    param: str | None = None) -> ExpertHTTPError:
        # Every failed call has its line in the operator's log, an error status as much as a dropped connection:
        # INFO for a request the expert found invalid (the client's to mend), a WARNING for anything that says
        # the expert or its deployment is unwell (429, 5xx, a refused key, a model it does not serve). The line
        # holds the error's type and code (``labels``), and ``detail``, which may quote the prompt, only where the
        # service logs content (``service.log_content``).
        # The labels and Retry-After are the upstream's words as much as the body is: an upstream that echoes a
        # rejected key may put it there too, so they are scrubbed as ``detail`` was, and Retry-After is logged as
        # the wait read from it. A refused credential is the operator's to mend, never the client's: its text
        # (scrubbed, which an echo of part of a key survives) goes to the log alone, and the client's cause says
        # what happened in fixed words.
        level = logging.INFO if status in INVALID_REQUEST_STATUSES else logging.WARNING
        labels = [self._excerpt(label) for label in labels]
        wait = parse_retry_after(retry_after)
        waits = "" if not retry_after else f" (Retry-After: {wait:g}s)" if wait is not None else \
            " (Retry-After unreadable)"
        refused = status in (401, 403)
        log.log(level, "expert %s (%s): HTTP %d failed%s%s%s", self.name, redact(self._url), status,
                f" ({', '.join(labels)})" if labels else "", waits,
                f": {detail or 'no detail'}" if self.context.log_content or refused else "")
        if status == 429:
            return ExpertRateLimited(self.name, status, detail, wait)
        if status >= 500:
            return ExpertServerError(self.name, status, detail, wait if status == 503 else None)
        if refused:
            return ExpertAuthError(self.name, status, "the expert refused the router's credentials (its api_key_env "
                                                      "or endpoint; the service log has the expert's message)")
        # The request field the expert blamed (OpenAI's ``error.param``), which the router's 400 names in turn
        # when every expert called blamed the same one.
        return ExpertRejected(self.name, status, detail, None if param is None else self._excerpt(param))

    def _excerpt(self, text: str | bytes) -> str:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        text = " ".join(self._scrubbed(text).split())
        return text if len(text) <= _EXCERPT_CHARS else text[: _EXCERPT_CHARS - 3] + "..."


async def _sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The ``data`` payload of each SSE event; multi-line data joined with newlines, per the SSE spec."""
    buffer: list[str] = []
    async for line in lines:
        if not line:
            if buffer:
                yield "\n".join(buffer)
                buffer = []
        elif line.startswith("data:"):
            value = line[5:]
            buffer.append(value[1:] if value.startswith(" ") else value)
        # Comments (":"), "event:", "id:" and "retry:" carry nothing a completion needs.
    if buffer:
        yield "\n".join(buffer)


def _usage_and_trace(chunk: dict[str, Any], usage_chunk: dict[str, Any],
                     nested: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The stream's usage chunk and another moe-router's trace (on its final chunk), updated from ``chunk``."""
    usage = chunk if isinstance(chunk.get("usage"), dict) else usage_chunk
    return usage, chunk["moe"] if isinstance(chunk.get("moe"), dict) else nested


def _upstream_cost(data: dict[str, Any]) -> float | None:
    """``usage.cost`` in USD where the upstream prices the call itself (OpenRouter's convention)."""
    usage = data.get("usage")
    cost = usage.get("cost") if isinstance(usage, dict) else None
    # A negative cost is no price: the config's prices stand (it was traced and logged as spent, below zero).
    if isinstance(cost, int | float) and not isinstance(cost, bool) and math.isfinite(cost) and cost >= 0:
        return float(cost)
    return None


class VllmExpert(OpenAICompatibleExpert):
    """A vLLM server (``type: vllm``): OpenAI's API, and vLLM's running usage in every streamed chunk
    (``continuous_usage_stats``). vLLM sends no delta for a token that completes no character (part of a
    multi-byte one), so its deltas undercount its tokens (279 deltas for 400 tokens from a byte-level model):
    counted from the chunks, a stream that breaks off is priced as generated, and its continuation keeps the
    whole answer within the client's ``max_tokens``."""

    STREAM_OPTIONS: ClassVar[Mapping[str, Any]] = {"continuous_usage_stats": True}


