"""Micro-batching of the gate's work across concurrent requests.

The encoder dominates a routing decision's CPU, and one encoder call on 32 queries costs far less than 32 calls
on one query each (one ONNX run, one tokenizer pass, no per-call thread hop). So ``GateBatcher.submit`` parks
each query on the event loop, and one dedicated worker thread runs ``work`` on the whole batch:

- when the worker is idle, the first query opens a window of ``window_ms``; the batch goes when the window
  closes or ``max_batch`` queries are waiting, whichever comes first;
- while the worker is busy, queries keep arriving; the moment it finishes, they go as the next batch (up to
  ``max_batch``) with no further window, since they have already waited.

The event loop never blocks: it only appends to a list, arms a timer, and resolves futures when the worker's
batch is done (one ``call_soon_threadsafe`` per batch, not per query). ``work`` must return one result per
text, in order. A query whose caller went away (its future cancelled) before its batch left is dropped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["BatcherClosed", "GateBatcher"]

T = TypeVar("T")


class BatcherClosed(RuntimeError):
    """Kept for callers that catch it; ``submit`` after ``aclose`` now starts a fresh worker instead."""


class GateBatcher(Generic[T]):
    """Runs ``work(texts) -> [result per text]`` for concurrent callers in batches, in one worker thread."""

    def __init__(self, work: Callable[[list[str]], Sequence[T]], *, window_ms: float = 2.0,
                 max_batch: int = 32) -> None:
        if max_batch < 1 or window_ms < 0:
            raise ValueError("max_batch must be >= 1 and window_ms >= 0")
        self.work, self.window_s, self.max_batch = work, window_ms / 1000.0, max_batch
        # The thread starts on the first batch, so an orchestrator that never decides holds none.
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="moe-gate")
        self._pending: list[tuple[str, asyncio.Future[T]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._busy = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self.batches = 0  # batches run so far; for tests and metrics

    async def submit(self, text: str) -> T:
        """The result of ``work`` for ``text``, computed in a batch with whatever else arrives meanwhile."""
        if self._closed:
            # Like the experts' connection pools, a closed batcher reopens on next use: an app whose lifespan
            # ends and starts again (tests, embedding servers) keeps working on the same orchestrator.
            self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="moe-gate")
            self._closed = False
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._pending.append((text, future))
        if not self._busy:
            if len(self._pending) >= self.max_batch or self.window_s == 0:
                self._flush()
            elif self._timer is None:
                self._timer = loop.call_later(self.window_s, self._flush)
        return await future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pending = [(t, f) for t, f in self._pending if not f.done()]
        if self._busy or not self._pending:
            return
        batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
        self._busy = True
        self._idle.clear()
        self.batches += 1
        loop = asyncio.get_running_loop()
        done = self._executor.submit(self.work, [t for t, _ in batch])
        done.add_done_callback(lambda d: loop.call_soon_threadsafe(self._resolve, batch, d))

    def _resolve(self, batch: list[tuple[str, asyncio.Future[T]]], done: concurrent.futures.Future[Sequence[T]],
                 ) -> None:
        self._busy = False
        error = done.exception()
        results: Sequence[T | None] = [None] * len(batch) if error is not None else done.result()
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue  # the caller gave up
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)  # type: ignore[arg-type]  # not None when there is no error
        self._flush()  # what queued behind this batch has waited long enough
        if not self._busy:
            self._idle.set()

    async def aclose(self) -> None:
        """Answer what is queued, then stop the worker thread."""
        self._closed = True
        if self._pending and not self._busy:
            self._flush()
        await self._idle.wait()
        self._executor.shutdown(wait=True)  # idle by now: returns at once
