"""Exact inner-product search over the gate's examples (faiss ``IndexFlatIP``), set up for serving.

faiss parallelises a search with OpenMP over all cores by default. For the gate's searches (one query, or a
micro-batch, over a few thousand examples) that costs more than it saves: measured on these 2-core machines,
top-10 over 20k x 384 takes 1.2 ms with one OpenMP thread and 3.5 ms with two, and under load py-spy found 31%
of the router's samples in ``IndexFlat.search`` with two threads, most of it spinning. So the first index built
sets faiss's thread count, once per process, to ``MOE_FAISS_THREADS`` (default 1).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["THREADS_ENV", "flat_ip_index"]

THREADS_ENV = "MOE_FAISS_THREADS"
_configured = False


def _configure(faiss: Any) -> None:
    global _configured
    if not _configured:
        from router.settings import Settings

        faiss.omp_set_num_threads(Settings.load().faiss_threads)  # MOE_FAISS_THREADS; a bad value is named
        _configured = True


def flat_ip_index(vectors: np.ndarray) -> Any:
    """An exact inner-product index over ``vectors`` ([n, dim] rows; cosine when they are L2-normalised)."""
    import faiss

    _configure(faiss)
    data = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.IndexFlatIP(data.shape[1])
    index.add(data)
    return index
