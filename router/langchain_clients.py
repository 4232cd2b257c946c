"""The clients a ``ChatMoERouter`` keeps between calls (one for blocking calls, one per event loop for async calls),
and when a failed call is retried (``max_retries``): never one the service was working on."""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator
from typing import Any, TypeVar

import httpx

from router import sdk

_T = TypeVar("_T")



__all__ = ["NEVER_SENT", "Clients", "aopened", "opened", "retry_wait"]


class Clients:
    """The SDK clients one ``ChatMoERouter`` reuses: one for its blocking calls (an httpx.Client serves any number
    of threads), one per event loop for its async calls (an httpx.AsyncClient's connections belong to the loop
    that opened them), each built on first use from the model's settings then. An async one is built off the loop:
    building one loads the CA bundle (tens of milliseconds), which would stall every task on the loop.

    No part of the model's value: a deep copy or a pickle of the model gets an empty one (the model's own
    ``__copy__`` sees to ``model_copy``), and any two compare equal, so the model's ``==`` compares its fields."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sync: tuple[tuple[Any, ...], sdk.Client] | None = None
        # Per event loop, per settings the model had: the task building the client (its result, the client and the
        # generator that keeps it, see ``_kept``). One built from settings since changed is kept for the calls
        # still using it, and closes with its loop.
        self._async: dict[asyncio.AbstractEventLoop, list[tuple[tuple[Any, ...], asyncio.Task[_Kept]]]] = {}

    def __reduce__(self) -> tuple[Any, ...]:
        return Clients, ()

    def __deepcopy__(self, memo: dict[int, Any]) -> Clients:
        return Clients()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Clients)

    def client(self, settings: tuple[Any, ...], build: Callable[[], sdk.Client]) -> sdk.Client:
        with self._lock:
            if self._sync is None or self._sync[0] != settings:
                # One built from older settings is left to the calls still using it, and closes when collected.
                self._sync = settings, build()
            return self._sync[1]

    async def aclient(self, settings: tuple[Any, ...], build: Callable[[], sdk.AsyncClient]) -> sdk.AsyncClient:
        loop = asyncio.get_running_loop()
        with self._lock:
            for gone in [other for other in self._async if other.is_closed()]:
                del self._async[gone]  # closed with its loop (see ``_kept``)
            held = self._async.setdefault(loop, [])
            building = next((task for made, task in held if made == settings), None)
            if building is None:
                building = loop.create_task(_built(build))
                held.append((settings, building))
        try:
            # Shielded: a caller cancelled while it is built leaves it to the others waiting for it.
            client, _ = await asyncio.shield(building)
        except Exception:
            with self._lock:  # the next call tries afresh
                if (settings, building) in held:
                    held.remove((settings, building))
            raise
        return client

    def close(self) -> None:
        with self._lock:
            held, self._sync = self._sync, None
        if held is not None:
            held[1].close()

    async def aclose(self) -> None:
        with self._lock:
            held = self._async.pop(asyncio.get_running_loop(), [])
        for _, building in held:
            with contextlib.suppress(Exception):  # one that was never built has nothing to close
                _, keeper = await asyncio.shield(building)
                await keeper.aclose()


_Kept = tuple[sdk.AsyncClient, AsyncGenerator[None]]


async def _built(build: Callable[[], sdk.AsyncClient]) -> _Kept:
    """A client built off the loop, and the generator that closes it (``_kept``), started on the loop."""
    client = await asyncio.get_running_loop().run_in_executor(None, build)
    keeper = _kept(client)
    await anext(keeper)
    return client, keeper


async def _kept(client: sdk.AsyncClient) -> AsyncGenerator[None]:
    """Waits, parked at its yield, to close ``client`` on its event loop (where alone it can be closed): the loop
    closes it, and so the client, when it shuts down (``asyncio.run``'s end), or once it is collected (its model
    was), by the loop's finalizer for async generators (PEP 525)."""
    try:
        yield
    finally:
        await client.aclose()


# The failures ``max_retries`` retries (see ChatMoERouter.max_retries): the service unreachable, the request never
# sent, and the answers that say "later": too many requests, a gateway's 502 or 504, every expert failed (503).
NEVER_SENT = (httpx.ConnectError, httpx.ConnectTimeout)


_RETRIED_STATUSES = frozenset({429, 502, 503, 504})


def retry_wait(error: sdk.RouterAPIError, retry: int, max_retries: int) -> float | None:
    """Seconds to wait before retry number ``retry`` of a call that failed with ``error``; None: not retried."""
    if retry > max_retries:
        return None
    if isinstance(error, sdk.RouterConnectionError):
        # The SDK chains httpx's failure: only one before the request was sent is retried.
        if not isinstance(error.__cause__, NEVER_SENT):
            return None
    elif error.status not in _RETRIED_STATUSES:
        return None
    asked = error.retry_after_s
    if asked is not None and asked <= 60:
        return asked
    # As the OpenAI SDK backs off: 0.5 s doubling, up to 8 s, less up to a quarter so that clients spread out.
    return min(0.5 * 2 ** (retry - 1), 8.0) * (1 - 0.25 * random.random())


def opened(stream: Iterator[_T]) -> Generator[_T]:
    """``stream`` with its first item fetched now, so that a failure to open it raises here (where it is retried)
    rather than part way through the caller's loop."""
    return _prefixed(next(stream, _END), stream)


def _prefixed(first: Any, stream: Iterator[_T]) -> Generator[_T]:
    try:
        if first is not _END:
            yield first
            yield from stream
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()


async def aopened(stream: AsyncIterator[_T]) -> AsyncGenerator[_T]:
    """``opened`` for an async stream."""
    return _aprefixed(await anext(stream, _END), stream)


async def _aprefixed(first: Any, stream: AsyncIterator[_T]) -> AsyncGenerator[_T]:
    try:
        if first is not _END:
            yield first
            async for item in stream:
                yield item
    finally:
        close = getattr(stream, "aclose", None)
        if close is not None:
            await close()


_END = object()
