"""``ScriptedOpenAIServer``: a TEST DOUBLE of an OpenAI-compatible (vLLM-like) server. Never use it in production.

It is a real HTTP/1.1 server on 127.0.0.1 (a random free port), written on raw asyncio streams so it can do
what a well-behaved framework would not: reset a connection, send broken JSON, stall or die half-way through a
stream. It runs its own event loop in a background thread, so sync and async tests use it alike::

    with ScriptedOpenAIServer(name="math") as srv:
        srv.default = Behaviour.ok("42")                         # every request without a scripted behaviour
        srv.push(Behaviour.error(429, retry_after="3"), Behaviour.reset())   # the next two chat requests
        ... call srv.url (http://127.0.0.1:PORT/v1) ...
        srv.requests        # JSON bodies of the chat requests received, in order
        srv.open_connections, srv.connections_total

Routes: ``POST /v1/chat/completions`` (plain and ``stream: true``), ``GET /v1/models``, ``GET /health``.
Behaviours apply to chat completions only. Streams look like vLLM's: a role chunk, one chunk per token, a
finish_reason chunk, a usage-only chunk with empty ``choices`` when ``stream_options.include_usage`` is set,
then ``data: [DONE]``. With ``stream_options.continuous_usage_stats`` (vLLM's), every chunk carries the usage so
far, and ``tokens_per_delta`` makes each token chunk stand for several tokens, as vLLM's deltas do where a token
completes no character.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["Behaviour", "ScriptedOpenAIServer"]

Mode = Literal["answer", "error", "hang", "reset", "raw"]


@dataclass(frozen=True)
class Behaviour:
    """What the server does with one chat request. Build it with the class methods."""

    mode: Mode = "answer"
    text: str = "ok"
    tool_calls: tuple[dict[str, Any], ...] = ()
    finish_reason: str | None = None  # default: "tool_calls" when there are tool calls, else "stop"
    # Usage defaults: prompt = words in the request's messages, completion = tokens sent (see ``tokens``).
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost: float | None = None  # sent as usage.cost (OpenRouter's convention) when set
    delay_s: float = 0.0  # before the status line
    token_delay_s: float = 0.0  # between stream chunks; a plain answer waits this per token in total
    tokens_per_delta: int = 1  # stream: the tokens each token chunk counts for in the usage (vLLM-like)
    status: int = 200
    message: str = ""  # the error body's ``error.message``
    retry_after: str | None = None
    body: bytes = b""  # "raw" mode: sent verbatim
    content_type: str = "application/json"
    # Stream: stop after this many token chunks. Plain answer: after half the body.
    stall_after: int | None = None  # then send nothing more, keeping the socket open
    die_after: int | None = None  # then close the socket without finishing the response
    hold_after_done: bool = False  # stream: send [DONE], then keep the body open (no final chunk)
    # Stream: once the finish_reason chunk (and the usage chunk, when asked for) is sent, "die" closes the socket
    # and "stall" sends nothing more, either way before [DONE]: a complete answer whose connection then fails.
    after_finish: str | None = None

    @classmethod
    def ok(cls, text: str = "ok", **fields: Any) -> Behaviour:
        """A normal answer; ``fields`` set usage, cost, delays, tool_calls ... (see the attributes)."""
        if "tool_calls" in fields:
            fields["tool_calls"] = tuple(fields["tool_calls"])
        return cls(mode="answer", text=text, **fields)

    @classmethod
    def slow(cls, text: str = "ok", *, delay_s: float = 0.0, token_delay_s: float = 0.0) -> Behaviour:
        return cls(mode="answer", text=text, delay_s=delay_s, token_delay_s=token_delay_s)

    @classmethod
    def error(cls, status: int, message: str = "scripted error", *, retry_after: str | None = None) -> Behaviour:
        """An OpenAI-style error body with ``status`` (and a Retry-After header when given)."""
        return cls(mode="error", status=status, message=message, retry_after=retry_after)

    @classmethod
    def hang(cls) -> Behaviour:
        """Read the request, then answer nothing until the client gives up or the server stops."""
        return cls(mode="hang")

    @classmethod
    def reset(cls) -> Behaviour:
        """Close the socket abruptly (TCP RST) without a byte of response."""
        return cls(mode="reset")

    @classmethod
    def malformed(cls, body: bytes = b'{"id": "broken", "choices": [') -> Behaviour:
        """Status 200 with a body that is not valid JSON."""
        return cls.raw(body)

    @classmethod
    def raw(cls, body: bytes, *, status: int = 200, content_type: str = "application/json") -> Behaviour:
        """Any body, verbatim (for SSE, pass ``content_type="text/event-stream"``)."""
        return cls(mode="raw", body=body, status=status, content_type=content_type)

    @classmethod
    def stall_mid_stream(cls, after: int, text: str = "one two three four five six") -> Behaviour:
        return cls(mode="answer", text=text, stall_after=after)

    @classmethod
    def die_mid_stream(cls, after: int, text: str = "one two three four five six") -> Behaviour:
        return cls(mode="answer", text=text, die_after=after)

    @classmethod
    def done_then_hold(cls, text: str = "one two three") -> Behaviour:
        """A whole stream and its [DONE], but the HTTP body is left open after it."""
        return cls(mode="answer", text=text, hold_after_done=True)

    def tokens(self) -> list[str]:
        """The text split the way the server streams it: one word with its trailing space per chunk."""
        return re.findall(r"\S+\s*|\s+", self.text)


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
            503: "Service Unavailable"}


class _Closed(Exception):
    """The peer went away, or the behaviour ended the connection."""


class ScriptedOpenAIServer:
    """A TEST DOUBLE: a scriptable OpenAI-compatible server on 127.0.0.1, in its own thread and loop."""

    def __init__(self, name: str = "scripted", *, model: str | None = None,
                 keep_alive_s: float | None = None) -> None:
        self.name = name
        # Close a connection that stays idle this long between requests, as uvicorn (vLLM's server) does after
        # 5 s; None keeps idle connections open until the client closes them.
        self.keep_alive_s = keep_alive_s
        self.model = model or name
        self.default = Behaviour.ok(f"answer from {name}")
        self.healthy = True  # GET /health answers 503 when False
        self.requests: list[dict[str, Any]] = []  # chat request bodies, in arrival order
        self.headers: list[dict[str, str]] = []  # their headers (lower-case names), same order
        self.connections_total = 0
        self.open_connections = 0
        # Chat requests being answered now (read and not yet fully answered, or held open: a hang, a stall), and
        # the most at once (``reset_peak``). An idle keep-alive connection is open but not in flight, so a
        # count left above 0 is a response the client never released.
        self.chats_in_flight = 0
        self.peak_chats_in_flight = 0
        self.port = 0
        self._queue: deque[Behaviour] = deque()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopping: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        """The OpenAI base URL, for an expert's ``endpoint``."""
        return f"http://127.0.0.1:{self.port}/v1"

    def push(self, *behaviours: Behaviour) -> None:
        """Queue behaviours for the next chat requests, in order; then ``default`` applies again."""
        with self._lock:
            self._queue.extend(behaviours)

    def reset_peak(self) -> None:
        """Start counting ``peak_chats_in_flight`` afresh from the requests in flight now."""
        self.peak_chats_in_flight = self.chats_in_flight

    def wait_for(self, predicate: Any, timeout: float = 2.0) -> bool:
        """Poll ``predicate(self)`` until true or ``timeout``; for counters the server thread updates."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    # --- lifecycle --------------------------------------------------------------------------------------

    def start(self) -> ScriptedOpenAIServer:
        self._thread = threading.Thread(target=self._run, name=f"scripted-{self.name}", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("scripted server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(10)
        self._thread = None

    def __enter__(self) -> ScriptedOpenAIServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(self._on_connection, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stopping.wait()
        server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await server.wait_closed()
        await asyncio.sleep(0)  # let the aborted transports run connection_lost before the loop closes

    # --- HTTP -------------------------------------------------------------------------------------------

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections_total += 1
        self.open_connections += 1
        try:
            while await self._one_request(reader, writer):
                pass
        except (_Closed, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open_connections -= 1
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.transport.abort()

    async def _one_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; ``False`` when the connection should close."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.keep_alive_s)
        except TimeoutError:
            raise _Closed from None
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, path, _ = request_line.split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        keep_alive = headers.get("connection", "").lower() != "close"
        if method == "GET" and path == "/health":
            await self._send(writer, 200 if self.healthy else 503, b"", "text/plain")
        elif method == "GET" and path == "/v1/models":
            models = {"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "scripted"}]}
            await self._send(writer, 200, json.dumps(models).encode())
        elif method == "POST" and path == "/v1/chat/completions":
            payload = json.loads(body or b"{}")
            self.requests.append(payload)
            self.headers.append(headers)
            self.chats_in_flight += 1
            self.peak_chats_in_flight = max(self.peak_chats_in_flight, self.chats_in_flight)
            try:
                await self._chat(self._next(), payload, reader, writer)
            finally:
                self.chats_in_flight -= 1
        else:
            await self._send(writer, 404, _error_body(f"no route {method} {path}", 404))
        return keep_alive

    def _next(self) -> Behaviour:
        with self._lock:
            return self._queue.popleft() if self._queue else self.default

    async def _chat(self, b: Behaviour, payload: dict[str, Any], reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        if b.mode == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raise _Closed
        if b.mode == "hang":
            await self._hold(reader)
        await asyncio.sleep(b.delay_s)
        if b.mode == "error":
            extra = {"Retry-After": b.retry_after} if b.retry_after is not None else {}
            await self._send(writer, b.status, _error_body(b.message, b.status), extra=extra)
        elif b.mode == "raw":
            await self._send(writer, b.status, b.body, b.content_type)
        elif payload.get("stream"):
            await self._stream(b, payload, reader, writer)
        else:
            await self._answer(b, payload, reader, writer)

    async def _answer(self, b: Behaviour, payload: dict[str, Any], reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        tokens = b.tokens()
        await asyncio.sleep(b.token_delay_s * len(tokens))
        message: dict[str, Any] = {"role": "assistant", "content": b.text or None}
        if b.tool_calls:
            message["tool_calls"] = list(b.tool_calls)
        completion = self._completion("chat.completion", payload)
        completion["choices"] = [{"index": 0, "message": message, "finish_reason": _finish(b)}]
        completion["usage"] = _usage(b, payload, len(tokens))
        body = json.dumps(completion).encode()
        if b.stall_after is None and b.die_after is None:
            await self._send(writer, 200, body)
            return
        writer.write(_head(200, "application/json", {"Content-Length": str(len(body))}) + body[: len(body) // 2])
        await writer.drain()
        if b.die_after is not None:
            raise _Closed
        await self._hold(reader)

    async def _stream(self, b: Behaviour, payload: dict[str, Any], reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        writer.write(_head(200, "text/event-stream", {"Transfer-Encoding": "chunked"}))
        chunk = self._completion("chat.completion.chunk", payload)

        options = payload.get("stream_options") or {}
        generated = 0  # tokens so far, for continuous_usage_stats

        async def event(choices: list[dict[str, Any]], **extra: Any) -> None:
            if options.get("continuous_usage_stats") and "usage" not in extra:
                extra["usage"] = _usage(b, payload, generated)
            data = json.dumps({**chunk, "choices": choices, **extra}).encode()
            await _write_chunk(writer, b"data: " + data + b"\n\n")

        await event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        tokens = b.tokens()
        for sent, token in enumerate(tokens):
            if sent in (b.stall_after, b.die_after):
                break
            await asyncio.sleep(b.token_delay_s)
            generated += b.tokens_per_delta
            await event([{"index": 0, "delta": {"content": token}, "finish_reason": None}])
        else:
            for i, call in enumerate(b.tool_calls):
                for delta in _tool_call_deltas(i, call):
                    await event([{"index": 0, "delta": {"tool_calls": [delta]}, "finish_reason": None}])
            await event([{"index": 0, "delta": {}, "finish_reason": _finish(b)}])
            if options.get("include_usage"):
                await event([], usage=_usage(b, payload, generated))
            if b.after_finish == "die":
                raise _Closed
            if b.after_finish == "stall":
                await self._hold(reader)
                return
            await _write_chunk(writer, b"data: [DONE]\n\n")
            if b.hold_after_done:
                await self._hold(reader)
            await _write_chunk(writer, b"")
            return
        if b.die_after is not None:
            raise _Closed
        await self._hold(reader)

    def _completion(self, obj: str, payload: dict[str, Any]) -> dict[str, Any]:
        return {"id": f"chatcmpl-{len(self.requests)}", "object": obj, "created": int(time.time()),
                "model": payload.get("model", self.model)}

    async def _hold(self, reader: asyncio.StreamReader) -> None:
        """Send nothing until the client closes its end (it gave up) or the server stops."""
        await reader.read()
        raise _Closed

    async def _send(self, writer: asyncio.StreamWriter, status: int, body: bytes,
                    content_type: str = "application/json", extra: dict[str, str] | None = None) -> None:
        writer.write(_head(status, content_type, {"Content-Length": str(len(body)), **(extra or {})}) + body)
        await writer.drain()


def _head(status: int, content_type: str, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}", f"Content-Type: {content_type}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _write_chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    """One HTTP chunk; empty ``data`` writes the terminating chunk."""
    writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    await writer.drain()


def _error_body(message: str, status: int) -> bytes:
    return json.dumps({"error": {"message": message, "type": "scripted_error", "code": status}}).encode()


def _finish(b: Behaviour) -> str:
    return b.finish_reason or ("tool_calls" if b.tool_calls else "stop")


def _usage(b: Behaviour, payload: dict[str, Any], tokens: int) -> dict[str, Any]:
    words = sum(len(str(m.get("content") or "").split()) for m in payload.get("messages", []))
    prompt = words if b.prompt_tokens is None else b.prompt_tokens
    completion = tokens if b.completion_tokens is None else b.completion_tokens
    usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": prompt + completion}
    if b.cost is not None:
        usage["cost"] = b.cost
    return usage


def _tool_call_deltas(index: int, call: dict[str, Any]) -> list[dict[str, Any]]:
    """vLLM's shape: the call's id and name first, then its arguments in a separate delta."""
    function = call.get("function", {})
    head = {"index": index, "id": call.get("id"), "type": call.get("type", "function"),
            "function": {"name": function.get("name"), "arguments": ""}}
    return [head, {"index": index, "function": {"arguments": function.get("arguments", "")}}]

