"""The Python SDK: ``Client`` and ``AsyncClient`` for a running service, ``LocalRouter`` in-process.

All three return the same typed results, trace included. Request building and response parsing live once in
``BaseClient``; the sync and async clients are thin I/O shells around it (httpx's own pattern), so the pairs
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

The parts: ``router.sdk_types`` (the results and errors), ``router.sdk_protocol`` (request building and response
parsing, ``BaseClient``), ``router.local`` (``LocalRouter``); all are imported from here.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import httpx

from router.feedback import (
    FeedbackRecord,
)
from router.trace import RouteDecision

if TYPE_CHECKING:
    from httpx._client import UseClientDefault
from router.local import LocalRouter
from router.sdk_protocol import LIMITS, BaseClient, Timeout
from router.sdk_types import ChatResult, Messages, RouterAPIError, RouterConnectionError, StreamChunk

__all__ = ["AsyncClient", "ChatResult", "Client", "FeedbackRecord", "LocalRouter", "RouterAPIError",
           "RouterConnectionError", "StreamChunk"]


class Client(BaseClient):
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

    @property
    def closed(self) -> bool:
        return self._http.is_closed

    def close(self) -> None:
        """Close the connections. A call another thread has in flight then fails with a ``RouterConnectionError``
        saying the client was closed, once the service answers or the call's timeout ends (closing a socket does
        not wake a thread reading it): close a client shared by threads once their calls are done."""
        self._closer()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(BaseClient):
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

    @property
    def closed(self) -> bool:
        return self._closed

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

