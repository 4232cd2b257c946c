"""The gate's exact search: right neighbours, and faiss's thread count from MOE_FAISS_THREADS in every thread that
searches."""

from __future__ import annotations

import threading

import faiss
import numpy as np
import pytest

from router import search


def test_flat_index_finds_exact_inner_product_neighbours(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(search.THREADS_ENV, raising=False)
    monkeypatch.setattr(search, "_threads", None)
    x = np.random.default_rng(0).normal(size=(200, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = search.flat_ip_index(x)
    sims, ids = index.search(x[:5], 3)
    np.testing.assert_array_equal(ids, np.argsort(-(x[:5] @ x.T), axis=1)[:, :3])
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=1e-5)
    assert faiss.omp_get_max_threads() == 1


@pytest.mark.parametrize("raw", ["two", "0"])
def test_a_bad_thread_count_is_named(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv(search.THREADS_ENV, raw)
    monkeypatch.setattr(search, "_threads", None)
    with pytest.raises(ValueError, match=rf"MOE_FAISS_THREADS='{raw}'"):
        search.flat_ip_index(np.eye(4, dtype=np.float32))


def test_every_thread_that_searches_runs_with_the_configured_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenMP keeps its thread count per thread: set once in the thread that built the first index, it left every
    other thread that searched (a hot reload's new gate worker, the batch routing worker) on one per core."""
    monkeypatch.delenv(search.THREADS_ENV, raising=False)
    monkeypatch.setattr(search, "_threads", None)
    index = search.flat_ip_index(np.eye(8, dtype=np.float32))
    index.search(np.eye(8, dtype=np.float32)[:2], 1)
    seen: list[int] = []

    def other() -> None:
        before = faiss.omp_get_max_threads()
        index.search(np.eye(8, dtype=np.float32)[:2], 1)
        seen.extend([before, faiss.omp_get_max_threads()])

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert seen[1] == 1 and index.ntotal == 8
    if seen[0] == 1:  # a one-core machine: OpenMP's default is 1 already, so nothing here tells the two apart
        pytest.skip("OpenMP's default is one thread on this machine")


def test_an_index_that_searched_copies_and_pickles_as_faiss_s_does() -> None:
    """A gate or classifier holding an index is deep-copied (cross-validation copies a used classifier) and
    pickled: the first FlatIndex kept the faiss module on itself, which neither takes."""
    import copy
    import pickle

    x = np.random.default_rng(1).normal(size=(40, 8)).astype(np.float32)
    index = search.flat_ip_index(x)
    want = index.search(x[:3], 2)[1]
    for twin in (copy.deepcopy(index), pickle.loads(pickle.dumps(index))):
        np.testing.assert_array_equal(twin.search(x[:3], 2)[1], want)
