"""The gate's exact search: right neighbours, and faiss's thread count set once from MOE_FAISS_THREADS."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from router import search


def test_flat_index_finds_exact_inner_product_neighbours(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(search.THREADS_ENV, raising=False)
    monkeypatch.setattr(search, "_configured", False)
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
    monkeypatch.setattr(search, "_configured", False)
    with pytest.raises(ValueError, match=rf"MOE_FAISS_THREADS='{raw}'"):
        search.flat_ip_index(np.eye(4, dtype=np.float32))
