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
import contextlib
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["BatcherClosed", "GateBatcher"]

T = TypeVar("T")


class BatcherClosed(RuntimeError):
    """Kept for callers that catch it; ``submit`` after ``aclose`` now starts a fresh worker instead."""


class _Queue(Generic[T]):
    """One event loop's share of the batcher: its waiting queries, its window timer, whether its batch is out.
    Futures, timers and events belong to one loop, so each loop that submits gets its own."""

    def __init__(self) -> None:
        self.pending: list[tuple[str, asyncio.Future[T]]] = []
        self.timer: asyncio.TimerHandle | None = None
        self.busy = False
        self.idle = asyncio.Event()
        self.idle.set()


class GateBatcher(Generic[T]):
    """Runs ``work(texts) -> [result per text]`` for concurrent callers in batches, in one worker thread.

    Callers on several event loops at once (``asyncio.run`` in two threads, say) are batched per loop, each
    loop's futures resolved on that loop; the one worker thread serves them all in turn. A loop that closed
    before its batch came back is simply forgotten."""

    def __init__(self, work: Callable[[list[str]], Sequence[T]], *, window_ms: float = 0.0,
                 max_batch: int = 64) -> None:
        if max_batch < 1 or window_ms < 0:
            raise ValueError("max_batch must be >= 1 and window_ms >= 0")
        self.work, self.window_s, self.max_batch = work, window_ms / 1000.0, max_batch
        # The thread starts on the first batch, so an orchestrator that never decides holds none.
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="moe-gate")
        self._queues: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Queue[T]] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()  # guards _queues and the executor's reopening across loops' threads
        self._closed = False
        self.batches = 0  # batches run so far; for tests and metrics

    def _reopen(self) -> concurrent.futures.ThreadPoolExecutor:
        """The worker, reopened if the batcher was closed (``_lock`` held). Like the experts' connection pools, a
        closed batcher reopens on next use: an app whose lifespan ends and starts again (tests, embedding servers)
        keeps working on the same orchestrator, and so does another event loop's queue, which a close from one
        loop must not leave stranded."""
        if self._closed:
            self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="moe-gate")
            self._closed = False
        return self._executor

    def _queue(self, loop: asyncio.AbstractEventLoop) -> _Queue[T]:
        with self._lock:
            self._reopen()
            queue = self._queues.get(loop)
            if queue is None:
                queue = self._queues[loop] = _Queue()
            return queue

    async def submit(self, text: str) -> T:
        """The result of ``work`` for ``text``, computed in a batch with whatever else arrives meanwhile."""
        loop = asyncio.get_running_loop()
        queue = self._queue(loop)
        future: asyncio.Future[T] = loop.create_future()
        queue.pending.append((text, future))
        if not queue.busy:
            if len(queue.pending) >= self.max_batch or self.window_s == 0:
                self._flush(queue)
            elif queue.timer is None:
                queue.timer = loop.call_later(self.window_s, self._flush, queue)
        return await future

    def _flush(self, queue: _Queue[T]) -> None:
        if queue.timer is not None:
            queue.timer.cancel()
            queue.timer = None
        queue.pending = [(t, f) for t, f in queue.pending if not f.done()]
        if queue.busy or not queue.pending:
            return
        batch, queue.pending = queue.pending[:self.max_batch], queue.pending[self.max_batch:]
        queue.busy = True
        queue.idle.clear()
        self.batches += 1
        loop = asyncio.get_running_loop()

        def back(done: concurrent.futures.Future[Sequence[T]]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody is left to answer
                loop.call_soon_threadsafe(self._resolve, queue, batch, done)

        texts = [t for t, _ in batch]
        with self._lock:
            executor = self._reopen()
            try:
                submitted = executor.submit(self.work, texts)
            except RuntimeError:  # shut down by a close from another loop's thread: a fresh worker takes it
                self._closed = True
                submitted = self._reopen().submit(self.work, texts)
        submitted.add_done_callback(back)

    def _resolve(self, queue: _Queue[T], batch: list[tuple[str, asyncio.Future[T]]],
                 done: concurrent.futures.Future[Sequence[T]]) -> None:
        queue.busy = False
        error = done.exception()
        results: Sequence[T | None] = [None] * len(batch) if error is not None else done.result()
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue  # the caller gave up
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)  # type: ignore[arg-type]  # not None when there is no error
        self._flush(queue)  # what queued behind this batch has waited long enough
        if not queue.busy:
            queue.idle.set()

    async def aclose(self) -> None:
        """Answer what this loop has queued, then stop the worker thread."""
        queue = self._queue(asyncio.get_running_loop())
        if queue.pending and not queue.busy:
            self._flush(queue)
        await queue.idle.wait()
        with self._lock:
            self._closed = True
            executor = self._executor  # a submit after this point reopens a new one; this one is ours to stop
        # Idle by now for this loop; a batch another loop still has out finishes first (``wait``), and one it
        # submits once this worker is shut down goes to a fresh one (``_flush``).
        await asyncio.to_thread(executor.shutdown, wait=True)
