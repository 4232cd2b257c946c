"""An expert's HTTP connections: POST a JSON body, read the answer whole or line by line.

Two implementations behind one small interface (``HttpClient``), so ``experts.openai_compat`` parses answers
and translates errors once, whichever library carries the bytes:

- ``AiohttpClient``, for real sockets (the default). On the fast test upstream it spent 0.21 ms of CPU per
  request at 8 in flight against httpx's 0.95 ms, and 0.17 against 2.2 ms at 32, where httpcore's pool scans
  and polls every connection on each request (encode/httpcore#1035); ``python -m bench.http_pool``.
- ``HttpxClient``, when an ``httpx`` transport is injected (``ExpertContext.transport``): tests' in-process
  apps and mock transports, or a user's own transport.

Both hold at most ``max_connections`` requests (or streams) in flight; one that finds them all busy waits up
to ``timeout_s`` for a free one, then fails as ``overloaded``. Library exceptions leave this module as
``HttpFailure``, whose ``kind`` says what went wrong: ``overloaded``, ``timeout`` (connect, or no bytes for
``timeout_s``, also between stream lines), ``unavailable`` (refused, reset, closed mid-message, not HTTP) or
``decoding`` (a body that cannot be decoded, a line too long).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import ssl
import urllib.parse
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import httpx

__all__ = ["MAX_LINE_BYTES", "AiohttpClient", "HttpClient", "HttpFailure", "HttpReply", "HttpStream", "HttpxClient",
           "env_proxy", "tls_context"]

FailureKind = Literal["overloaded", "timeout", "unavailable", "decoding"]

# The longest line a streamed answer may send (one SSE event's data); aiohttp's default buffer allows 128 KiB.
MAX_LINE_BYTES = 2**21


class HttpFailure(Exception):
    """A request that got no HTTP answer, or whose body broke off or could not be read.

    ``detail`` says what went wrong without naming an address (it reaches clients, in error bodies and traces);
    ``raw`` is the transport's own text, with the host and port, for the operator's log."""

    def __init__(self, kind: FailureKind, detail: str, raw: str | None = None) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.raw = detail if raw is None else raw


# What names an address in a transport's error text: a URL, a host:port (names, IPv4, bracketed IPv6), and the
# ('host', port) tuples of OSError messages.
_ADDRESS = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+"
                      r"|\(\s*'[^']*'\s*,\s*\d+[^)]*\)"
                      r"|(?<![\w.:\[])(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?):\d{1,5}\b")


def without_addresses(text: str) -> str:
    """``text`` with each URL and host:port replaced by ``<address>``."""
    return _ADDRESS.sub("<address>", text)


# What a client is told of an answer whose connection closed before its end (the service log has the client
# library's own words).
CUT_OFF = "the connection closed before the answer was complete"


def _failure(kind: FailureKind, exc: BaseException) -> HttpFailure:
    raw = _what(exc)
    return HttpFailure(kind, without_addresses(raw), raw)


@dataclass(frozen=True)
class HttpReply:
    status: int
    headers: Mapping[str, str]  # case-insensitive
    content: bytes


class HttpStream(Protocol):
    """An answer being read: status and headers are in, the body is not."""

    status: int
    headers: Mapping[str, str]

    async def read(self) -> bytes: ...

    def lines(self) -> AsyncIterator[str]: ...


class HttpClient(Protocol):
    async def post(self, url: str, body: Mapping[str, Any],
                   headers: Mapping[str, str] | None = None) -> HttpReply: ...

    def stream(self, url: str, body: Mapping[str, Any],
               headers: Mapping[str, str] | None = None) -> AbstractAsyncContextManager[HttpStream]: ...

    async def aclose(self) -> None: ...


def _what(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _serving_loop(bound: asyncio.AbstractEventLoop | None, what: str) -> asyncio.AbstractEventLoop:
    """The running loop, which may take over ``what``, made in loop ``bound``, only once ``bound`` is closed.

    A router used through ``asyncio.run`` once per call meets a new loop each time, and the old one is closed
    by then: its connections went with it, so the caller opens new ones. Two loops open at once cannot share
    the connections, and that is a clear error rather than a future attached to the wrong loop.
    """
    loop = asyncio.get_running_loop()
    if bound is not None and bound is not loop and not bound.is_closed():
        raise RuntimeError(f"{what} is in use by another event loop that is still open; use one router per "
                           "event loop, or close the other loop first")
    return loop


class _Slots:
    """At most ``n`` requests in flight; a request that waits longer than ``timeout_s`` for one is overloaded."""

    def __init__(self, n: int, timeout_s: float) -> None:
        self.n, self.timeout_s = n, timeout_s
        self._free: asyncio.Semaphore | None = None  # made in the loop that uses it
        self._loop: asyncio.AbstractEventLoop | None = None

    @asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        loop = _serving_loop(self._loop, "an expert's connection limit")
        if self._free is None or loop is not self._loop:
            self._free, self._loop = asyncio.Semaphore(self.n), loop
        if self._free.locked():
            try:
                async with asyncio.timeout(self.timeout_s):
                    await self._free.acquire()
            except TimeoutError:
                raise HttpFailure("overloaded", f"all {self.n} connections busy for {self.timeout_s:g}s") from None
        else:
            await self._free.acquire()  # free now: returns at once
        try:
            yield
        finally:
            self._free.release()


# --- aiohttp ----------------------------------------------------------------------------------------------

class _AiohttpStream:
    def __init__(self, response: Any) -> None:
        self._response = response
        self.status: int = response.status
        self.headers: Mapping[str, str] = response.headers

    async def read(self) -> bytes:
        with _aiohttp_errors():
            data: bytes = await self._response.read()
        return data

    async def lines(self) -> AsyncIterator[str]:
        content = self._response.content
        while True:
            try:
                with _aiohttp_errors():
                    raw = await content.readline()
            except HttpFailure as failure:
                # Lines that arrived whole before the connection broke are still the expert's answer: pass them
                # on, so a mid-stream fallback continues after them, as it does over httpx. Not after a line too
                # long to read: what is buffered then comes after the lost line, and would pass for what followed it.
                if failure.kind != "decoding":
                    for line in _unread(content).split(b"\n")[:-1]:
                        yield _text(line)
                raise
            if not raw:
                return
            yield _text(raw)


def _text(line: bytes) -> str:
    return line.decode("utf-8", errors="replace").rstrip("\r\n")


def _unread(content: Any) -> bytes:
    """What a failed aiohttp ``StreamReader`` still buffers. Like asyncio's (python/cpython#75044), it raises
    the failure on the next read even while data that arrived before it is waiting; this reads that data from
    the reader's internals, and gives nothing where they differ (``tests/unit/test_http_client.py`` then fails)."""
    buffer, offset = getattr(content, "_buffer", None), getattr(content, "_buffer_offset", 0)
    if not buffer or not isinstance(offset, int):
        return b""
    return b"".join(bytes(chunk) for chunk in buffer)[offset:]


class _Client(ABC):
    """What both clients share: a whole answer is a stream read to its end."""

    @abstractmethod
    def stream(self, url: str, body: Mapping[str, Any],
               headers: Mapping[str, str] | None = None) -> AbstractAsyncContextManager[HttpStream]:
        """POST ``body`` as JSON; ``headers``: this request's own, beside the client's (the key's)."""

    async def post(self, url: str, body: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> HttpReply:
        async with self.stream(url, body, headers) as response:
            return HttpReply(response.status, response.headers, await response.read())


class AiohttpClient(_Client):
    """``max_connections`` keep-alive connections in one ``aiohttp.ClientSession``, opened on first use, each
    reused only while it has been idle for at most ``keepalive_s`` (0: never). A session belongs to the event
    loop it starts in: a call from a later loop, once that one is closed, opens a new session (``asyncio.run``
    once per call works)."""

    def __init__(self, *, headers: Mapping[str, str], timeout_s: float, max_connections: int,
                 keepalive_s: float) -> None:
        self._headers, self._timeout_s, self._max = dict(headers), timeout_s, max_connections
        self._keepalive_s = keepalive_s
        self._slots = _Slots(max_connections, timeout_s)
        self._session: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._proxies: dict[str, str | None] = {}

    async def _open(self) -> Any:
        loop = _serving_loop(self._loop, "an expert's HTTP session")
        if self._session is not None and loop is not self._loop:
            # The old loop is closed and its sockets with it: this only marks the session closed.
            await self.aclose()
        if self._session is None:
            import aiohttp  # a dependency, imported where first needed (178 ms: the CLI's other commands skip it)

            t = self._timeout_s
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                # No overall limit (a long answer may stream for minutes): connect, and each read, get timeout_s.
                timeout=aiohttp.ClientTimeout(total=None, connect=t, sock_connect=t, sock_read=t),
                connector=aiohttp.TCPConnector(limit=self._max, limit_per_host=0, ssl=tls_context(),
                                               **_keepalive(self._keepalive_s)),
                # trust_env would read the proxy settings and ~/.netrc again on every request (0.46 ms of CPU
                # each here); env_proxy reads the proxy settings once per URL instead.
                json_serialize=json.dumps, trust_env=False, read_bufsize=MAX_LINE_BYTES // 2,
            )
            self._loop = loop
        return self._session

    def _proxy(self, url: str) -> str | None:
        if url not in self._proxies:
            self._proxies[url] = env_proxy(url)
        return self._proxies[url]

    @asynccontextmanager
    async def stream(self, url: str, body: Mapping[str, Any],
                     headers: Mapping[str, str] | None = None) -> AsyncIterator[HttpStream]:
        session = await self._open()
        async with self._slots.held():
            with _aiohttp_errors():
                response = await session.post(url, json=body, proxy=self._proxy(url), headers=headers)
            try:
                yield _AiohttpStream(response)
            finally:
                # A body read to its end leaves the connection for the next request; one abandoned midway
                # (an error, a cancelled or dropped stream) is closed rather than reused half-read.
                if response.content.at_eof():
                    response.release()
                else:
                    response.close()

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


def _keepalive(seconds: float) -> dict[str, Any]:
    """aiohttp's connector settings for an idle limit. 0 is force_close (``Connection: close``): aiohttp refuses
    any keepalive_timeout beside it, and keepalive_timeout=0 alone would leave idle sockets open."""
    return {"force_close": True} if seconds == 0 else {"keepalive_timeout": seconds}


def tls_context() -> ssl.SSLContext:
    """How HTTPS endpoints are verified: httpx's default context (certifi's CAs, or ``SSL_CERT_FILE`` /
    ``SSL_CERT_DIR`` where set), so experts trust what they trusted over httpx. One per setting, shared."""
    return _tls_context(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))


@functools.cache
def _tls_context(cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    return httpx.create_ssl_context()  # reads the same two variables


def env_proxy(url: str) -> str | None:
    """The proxy the environment sets for ``url`` (``HTTPS_PROXY``, ``HTTP_PROXY``, ``ALL_PROXY``, less
    ``NO_PROXY``), as httpx reads them; ``None`` for a direct connection."""
    parts = urllib.parse.urlsplit(url)
    if parts.hostname and urllib.request.proxy_bypass(parts.hostname):
        return None
    proxies = urllib.request.getproxies()
    return proxies.get(parts.scheme) or proxies.get("all")


@contextmanager
def _aiohttp_errors() -> Iterator[None]:
    """Translate aiohttp's exceptions raised inside the block into ``HttpFailure``."""
    import aiohttp  # loaded by the session that made the request: a sys.modules lookup
    from aiohttp.http_exceptions import HttpProcessingError

    try:
        yield
    except (aiohttp.ServerTimeoutError, TimeoutError) as exc:
        raise _failure("timeout", exc) from exc
    except aiohttp.ClientPayloadError as exc:  # aiohttp's words name a "400" of its own, read as the expert's
        raise HttpFailure("unavailable", CUT_OFF, _what(exc)) from exc
    except UnicodeError as exc:  # a host name no resolver can take (a label over 63 characters, an empty one)
        raise HttpFailure("unavailable", f"the endpoint's host name cannot be looked up ({exc}); fix the "
                                         "expert's endpoint", _what(exc)) from exc
    # A streamed line past MAX_LINE_BYTES: a ValueError from the stream reader, or (aiohttp 3.10 on, its parser)
    # LineTooLong, an HttpProcessingError, which is neither a ValueError nor a ClientError.
    except (ValueError, HttpProcessingError) as exc:
        raise _failure("decoding", exc) from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise _failure("unavailable", exc) from exc


# --- httpx (an injected transport) ------------------------------------------------------------------------

class _HttpxStream:
    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code
        self.headers: Mapping[str, str] = response.headers

    async def read(self) -> bytes:
        with _httpx_errors():
            return await self._response.aread()

    async def lines(self) -> AsyncIterator[str]:
        iterator = self._response.aiter_lines()
        while True:
            with _httpx_errors():
                try:
                    line = await anext(iterator)
                except StopAsyncIteration:
                    return
            if len(line) > MAX_LINE_BYTES:  # characters: at least as many bytes; the limit aiohttp enforces
                raise HttpFailure("decoding", f"a streamed line of {len(line)} characters, over the "
                                              f"{MAX_LINE_BYTES}-byte limit")
            yield line


class HttpxClient(_Client):
    """One ``httpx.AsyncClient`` over ``transport``, which pools connections (or needs none) itself. A pooling
    transport's connections belong to the event loop that opened them, as anywhere in httpx: its owner keeps
    it to one loop."""

    def __init__(self, *, headers: Mapping[str, str], timeout_s: float, max_connections: int,
                 transport: httpx.AsyncBaseTransport) -> None:
        self._client = httpx.AsyncClient(transport=transport, headers=dict(headers), timeout=httpx.Timeout(timeout_s))
        self._slots = _Slots(max_connections, timeout_s)

    @asynccontextmanager
    async def stream(self, url: str, body: Mapping[str, Any],
                     headers: Mapping[str, str] | None = None) -> AsyncIterator[HttpStream]:
        async with self._slots.held():
            with _httpx_errors():
                request = self._client.build_request("POST", url, json=dict(body), headers=headers)
                response = await self._client.send(request, stream=True)
            try:
                yield _HttpxStream(response)
            finally:
                await response.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()


@contextmanager
def _httpx_errors() -> Iterator[None]:
    """Translate httpx's exceptions raised inside the block into ``HttpFailure``."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise _failure("timeout", exc) from exc
    except httpx.RemoteProtocolError as exc:
        raise HttpFailure("unavailable", CUT_OFF, _what(exc)) from exc
    except httpx.DecodingError as exc:
        raise _failure("decoding", exc) from exc
    except httpx.HTTPError as exc:
        raise _failure("unavailable", exc) from exc
