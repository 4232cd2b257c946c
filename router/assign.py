"""Expert-choice assignment for a batch of queries. Pure: no I/O.

In token-level expert-choice routing (Zhou et al., 2022) each expert picks the tokens it scores highest, up to
a fixed capacity, so no expert is overloaded and none sits idle. Here a query needs exactly one expert, so the
picks are made as one greedy matching: every (query, expert) score, highest first, assigns the query to the
expert when the query is still free and the expert still has room. Each expert thus ends up with the queries
it scores highest among those no stronger claim took, never more than its capacity.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["expert_choice"]


def expert_choice(scores: np.ndarray, experts: Sequence[str], capacity: Mapping[str, int]) -> list[str | None]:
    """The expert for each query (row of ``scores``, one column per name in ``experts``), or None for a query
    left over when the experts' capacity ran out. Ties go to the earlier query, then the earlier expert."""
    matrix = np.asarray(scores, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[1] != len(experts):
        raise ValueError(f"scores must be (queries, {len(experts)}), got {matrix.shape}")
    room = [max(0, int(capacity.get(name, 0))) for name in experts]
    assigned: list[str | None] = [None] * matrix.shape[0]
    left = sum(room)
    # Stable sort of the flattened scores, descending: row-major order breaks ties by query, then expert.
    for flat in np.argsort(-matrix, axis=None, kind="stable"):
        if left == 0:
            break
        query, column = divmod(int(flat), len(experts))
        if assigned[query] is None and room[column] > 0:
            assigned[query] = experts[column]
            room[column] -= 1
            left -= 1
    return assigned
