"""A fast OpenAI-compatible upstream for benchmarks, and the load generator that drives it (and the router).

The upstream is a bare HTTP/1.1 server on asyncio protocols, not a framework: it must cost far less than the
router it stands in front of, or the benchmark would measure the upstream. It answers every chat completion
after a fixed delay (``--latency-ms``), plain or streamed (a role chunk, ``--tokens`` content chunks
``--token-ms`` apart, a finish chunk, a usage chunk, ``[DONE]``). It runs in its own process
(``python -m bench.upstream``), so it does not take the router's or the client's time slices in-process.

The load generator runs ``concurrency`` workers on one ``httpx.AsyncClient`` until ``requests`` calls are done
or ``max_seconds`` pass, whichever comes first, so every run is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

__all__ = ["LoadResult", "UpstreamProcess", "chat_payload", "run_load", "serve"]

_ANSWER = "The quick brown fox jumps over the lazy dog."


def _completion(model: str) -> bytes:
    return json.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": _ANSWER}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21},
    }, separators=(",", ":")).encode()


def _sse(body: dict[str, Any]) -> bytes:
    data = b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)  # one HTTP chunk per SSE event


def _stream_events(model: str, tokens: int) -> list[bytes]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return _sse({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": model,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    words = (_ANSWER.split() * tokens)[:tokens]
    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": w + " "}) for w in words]
    events.append(chunk({}, "stop"))
    events.append(_sse({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": model,
                        "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": tokens,
                                                 "total_tokens": 12 + tokens}}))
    done = b"data: [DONE]\n\n"
    events.append(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
    return events


class _Upstream(asyncio.Protocol):
    """One keep-alive connection. Requests on it are answered in order (no pipelining needed by httpx)."""

    def __init__(self, latency_s: float, token_s: float, tokens: int) -> None:
        self.latency_s, self.token_s, self.tokens = latency_s, token_s, tokens
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buffer[:head_end].decode("latin-1")
            lines = head.split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
            length = int(headers.get("content-length", "0"))
            if len(self.buffer) < head_end + 4 + length:
                return
            body = self.buffer[head_end + 4:head_end + 4 + length]
            self.buffer = self.buffer[head_end + 4 + length:]
            self._handle(lines[0].split(" ")[1] if " " in lines[0] else "/", body)

    def _handle(self, path: str, body: bytes) -> None:
        if not path.endswith("/chat/completions"):
            self.loop.call_soon(self._send, b"200 OK", b'{"status":"ok"}')
            return
        request = json.loads(body) if body else {}
        model = str(request.get("model", "upstream"))
        if request.get("stream"):
            self.loop.call_later(self.latency_s, self._stream, _stream_events(model, self.tokens))
        else:
            self.loop.call_later(self.latency_s, self._send, b"200 OK", _completion(model))

    def _send(self, status: bytes, payload: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: keep-alive\r\n\r\n%s" % (status, len(payload), payload))

    def _stream(self, events: list[bytes]) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\nconnection: keep-alive\r\n\r\n" + events[0])
        self._rest(events, 1)

    def _rest(self, events: list[bytes], i: int) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self.token_s <= 0:
            self.transport.write(b"".join(events[i:]))
            return
        self.transport.write(events[i])
        if i + 1 < len(events):
            self.loop.call_later(self.token_s, self._rest, events, i + 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(port: int, latency_ms: float, token_ms: float, tokens: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Upstream(latency_ms / 1000.0, token_ms / 1000.0, tokens),
                                      "127.0.0.1", port, backlog=2048)
    bound = server.sockets[0].getsockname()[1]
    print(f"READY {bound}", flush=True)
    async with server:
        await server.serve_forever()


class UpstreamProcess:
    """``python -m bench.upstream`` in a child process; ``url`` is its ``/v1`` base once started."""

    def __init__(self, latency_ms: float = 5.0, token_ms: float = 0.5, tokens: int = 8) -> None:
        self.args = ["--latency-ms", str(latency_ms), "--token-ms", str(token_ms), "--tokens", str(tokens)]
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> UpstreamProcess:
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.upstream", "--port", "0", *self.args],
                                     stdout=subprocess.PIPE, text=True, cwd=_repo_root())
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            self.proc.kill()
            raise RuntimeError(f"upstream did not start: {line!r}")
        self.port = int(line.split()[1])
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            if self.proc.poll() is None:
                self.proc.kill()


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- load generator ---------------------------------------------------------------------------------------

def chat_payload(text: str, *, model: str = "auto", stream: bool = False) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 16, "stream": stream}


@dataclass
class LoadResult:
    concurrency: int
    latencies_ms: list[float] = field(default_factory=list)  # whole request (non-streaming) or TTFT (streaming)
    errors: int = 0
    elapsed_s: float = 0.0
    first_error: str | None = None

    @property
    def ok(self) -> int:
        return len(self.latencies_ms)

    @property
    def rps(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def pct(self, q: float) -> float | None:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else None

    def summary(self) -> dict[str, Any]:
        return {"concurrency": self.concurrency, "ok": self.ok, "errors": self.errors,
                "p50_ms": _round(self.pct(50)), "p99_ms": _round(self.pct(99)),
                "rps": round(self.rps, 1), "elapsed_s": round(self.elapsed_s, 2), "first_error": self.first_error}


def _round(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


async def run_load(url: str, payloads: list[dict[str, Any]], *, concurrency: int, requests: int,
                   max_seconds: float, warmup: bool = False, stream: bool = False) -> LoadResult:
    """Send ``requests`` chat completions (cycling through ``payloads``) from ``concurrency`` workers.

    Each worker owns one client holding one keep-alive connection, as wrk's connections do. One shared client
    with ``concurrency`` connections would measure httpcore instead: its pool scans and polls every connection
    on each request (encode/httpcore#1035), which held this client to about 150 routed requests/s at 64 workers
    while it burned a whole core. ``warmup``: each worker first sends one unmeasured request (it opens the
    connection and warms caches).

    Non-streaming: latency is the whole call. Streaming: latency is time to the first chunk with content
    (the router sends a role-only chunk first; a client sees no token until content arrives).
    """
    result = LoadResult(concurrency)
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    clients = [httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(30.0)) for _ in range(concurrency)]
    try:
        if warmup:
            await asyncio.gather(*(_one(c, url, payloads[i % len(payloads)], stream, LoadResult(1))
                                   for i, c in enumerate(clients)))
        counter = iter(range(requests))
        deadline = time.perf_counter() + max_seconds
        start = time.perf_counter()

        async def worker(client: httpx.AsyncClient) -> None:
            for i in counter:
                if time.perf_counter() > deadline:
                    return
                await _one(client, url, payloads[i % len(payloads)], stream, result)

        await asyncio.gather(*(worker(c) for c in clients))
        result.elapsed_s = time.perf_counter() - start
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    return result


async def _one(client: httpx.AsyncClient, url: str, body: dict[str, Any], stream: bool, result: LoadResult) -> None:
    started = time.perf_counter()
    try:
        if stream:
            ttft = await _ttft(client, url, body, started)
            result.latencies_ms.append(ttft)
        else:
            response = await client.post(url, json=body)
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
            result.latencies_ms.append((time.perf_counter() - started) * 1000.0)
    except (httpx.HTTPError, RuntimeError) as exc:
        result.errors += 1
        result.first_error = result.first_error or f"{type(exc).__name__}: {exc}"


async def _ttft(client: httpx.AsyncClient, url: str, body: dict[str, Any], started: float) -> float:
    ttft: float | None = None
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
        async for line in response.aiter_lines():
            if ttft is None and line.startswith("data: {") and _has_content(line[6:]):
                ttft = (time.perf_counter() - started) * 1000.0
    if ttft is None:
        raise RuntimeError("stream ended without content")
    return ttft


def _has_content(data: str) -> bool:
    choices = json.loads(data).get("choices") or []
    return bool(choices and (choices[0].get("delta") or {}).get("content"))


def main() -> None:
    parser = argparse.ArgumentParser(description="fast OpenAI-compatible upstream for benchmarks")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=5.0, help="delay before every answer")
    parser.add_argument("--token-ms", type=float, default=0.5, help="delay between streamed chunks")
    parser.add_argument("--tokens", type=int, default=8, help="content chunks per streamed answer")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.port, args.latency_ms, args.token_ms, args.tokens))


if __name__ == "__main__":
    main()
