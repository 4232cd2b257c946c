"""Predicting each expert's chance of success (and cost) for a query from its nearest labelled neighbours.

The estimate for expert ``m`` on a query is the success rate of ``m`` on the query's ``k`` nearest training
queries (cosine over the gate's embeddings), shrunk toward ``m``'s overall training accuracy::

    p_m(x) = (sum_j o_jm + alpha * acc_m) / (n_m(x) + alpha)

where the sum runs over the neighbours that have a record for ``m`` (missing outcomes are left out, not
counted as wrong) and ``n_m(x)`` is how many do. Shrinkage matters: with 31 experts and a few dozen
neighbours, the raw argmax mostly chases noise, which is why naive per-expert success regression loses to
always sending every query to the best single expert.

Routing then keeps the best single expert unless another expert's predicted success beats the best single
expert's own prediction by more than ``margin`` (``route_with_margin``). ``margin = inf`` is exactly the best
single expert, so a margin tuned on validation data never does worse than it there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from router.outcome import shrunk_success, success_prior
from router.search import flat_ip_index

__all__ = ["NeighbourOutcomes", "route_with_cost", "route_with_margin"]

FloatArray = NDArray[np.float64]


@dataclass
class NeighbourOutcomes:
    """Training embeddings ``[n, d]`` (L2-normalised) and their outcomes ``[n, m]`` (NaN = no record)."""

    embeddings: np.ndarray
    outcomes: FloatArray
    costs: FloatArray | None = None  # [n, m] per-query cost, NaN = unknown

    def __post_init__(self) -> None:
        # The serving gate's index (router.search): faiss on MOE_FAISS_THREADS (default 1) OpenMP threads. The
        # thread count changes the order of the similarity sums, and RouterBench prompts that share their
        # few-shot examples tie to the last bits, so a search on two threads picked other neighbours and moved
        # published figures (AIQ 0.833 against 0.840) with the machine's cores.
        self._index = flat_ip_index(self.embeddings)
        self.prior = success_prior(self.outcomes)

    def neighbours(self, x: np.ndarray, k: int, *, exclude_self: bool = False) -> np.ndarray:
        """``[q, k]`` indices of the nearest training queries, most similar first."""
        extra = 1 if exclude_self else 0
        k = min(k, self._index.ntotal - extra)  # faiss pads with -1 past the last vector
        _, ids = self._index.search(np.ascontiguousarray(x, dtype=np.float32), k + extra)
        return ids[:, extra:]

    def success(self, ids: np.ndarray, alpha: float) -> FloatArray:
        """``[q, m]`` shrunk success estimates from neighbour indices ``ids`` (``[q, k]``): the serving gate's
        formula (``router.outcome.shrunk_success``), with neighbours found once for a sweep over ``alpha``."""
        return shrunk_success(self.outcomes[ids], self.prior, alpha)

    def cost(self, ids: np.ndarray) -> FloatArray:
        """``[q, m]`` mean cost of each expert on the neighbours (its overall mean where none has a cost)."""
        if self.costs is None:
            raise ValueError("no costs were given")
        c = self.costs[ids]
        known = ~np.isnan(c)
        overall = np.nanmean(self.costs, axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(known, c, 0.0).sum(axis=1) / known.sum(axis=1)
        return np.where(np.isnan(mean), overall[None, :], mean)


def route_with_margin(success: FloatArray, best: int, margin: float) -> NDArray[np.int64]:
    """Argmax of predicted success, unless it beats expert ``best``'s prediction by ``margin`` or less."""
    top = success.argmax(axis=1)
    gain = success[np.arange(len(top)), top] - success[:, best]
    return np.where(gain > margin, top, best).astype(np.int64)


def route_with_cost(success: FloatArray, cost: FloatArray, weight: float) -> NDArray[np.int64]:
    """Argmax of ``success - weight * cost``: the gate's one knob along the quality–cost curve."""
    return np.asarray((success - weight * cost).argmax(axis=1), dtype=np.int64)
