"""Exact inner-product search over the gate's examples (faiss ``IndexFlatIP``), set up for serving.

faiss parallelises a search with OpenMP over all cores by default. For the gate's searches (one query, or a
micro-batch, over a few thousand examples) that costs more than it saves: measured on these 2-core machines,
top-10 over 20k x 384 takes 1.2 ms with one OpenMP thread and 3.5 ms with two, and under load py-spy found 31%
of the router's samples in ``IndexFlat.search`` with two threads, most of it spinning. So every search runs with
``MOE_FAISS_THREADS`` OpenMP threads (default 1, read once per process). OpenMP keeps that count per thread
(libgomp), so each thread sets it before its first search: set once in the thread that built the first index, it
left every other thread that searched (a hot reload's new gate worker, the batch routing worker) on OpenMP's
default of one per core, which cost the static router two thirds more CPU per request after a reload.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

__all__ = ["THREADS_ENV", "FlatIndex", "flat_ip_index"]

THREADS_ENV = "MOE_FAISS_THREADS"
_threads: int | None = None  # MOE_FAISS_THREADS, read at the first index built
_pinned = threading.local()  # the count this thread has set


def _thread_count() -> int:
    global _threads
    if _threads is None:
        from router.settings import Settings

        _threads = Settings.load().faiss_threads  # MOE_FAISS_THREADS; a bad value is named
    return _threads


class FlatIndex:
    """An exact inner-product index (faiss ``IndexFlatIP``) whose every search runs with ``MOE_FAISS_THREADS``
    OpenMP threads, whichever thread makes it."""

    def __init__(self, index: Any, threads: int) -> None:
        self.index, self.threads = index, threads  # copied and pickled as faiss's index is

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The top ``k`` similarities and row ids of each of ``queries`` ([m, dim] float32, contiguous)."""
        if getattr(_pinned, "threads", None) != self.threads:
            import faiss

            faiss.omp_set_num_threads(self.threads)
            _pinned.threads = self.threads
        sims, ids = self.index.search(queries, k)
        return sims, ids


def flat_ip_index(vectors: np.ndarray) -> FlatIndex:
    """An exact inner-product index over ``vectors`` ([n, dim] rows; cosine when they are L2-normalised)."""
    import faiss

    data = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.IndexFlatIP(data.shape[1])
    index.add(data)
    return FlatIndex(index, _thread_count())
