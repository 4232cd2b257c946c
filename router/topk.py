"""Top-k policies: from the gate's probabilities to a weighted panel of experts. Pure functions.

Every policy returns at least one expert, ordered by weight, with weights renormalised to sum to 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from router.config import TopKConfig

__all__ = ["POLICIES", "capped", "choose", "rank"]

Ranked = list[tuple[str, float]]
_ROUNDING = 1e-9  # how far under ``mass`` a panel's summed probability may fall and still reach it


def rank(scores: Mapping[str, float]) -> Ranked:
    """Experts by score, highest first; ties broken by name so the order is deterministic. A score that is not a
    positive finite number counts as 0, as ``choose`` counts it, so the ranking and the panel agree."""
    return _ranked(_usable(scores))


def _ranked(scores: Mapping[str, float]) -> Ranked:
    return sorted(scores.items(), key=lambda item: (-item[1], item[0]))


def _usable(scores: Mapping[str, float]) -> dict[str, float]:
    return {n: float(p) if math.isfinite(p) and p > 0 else 0.0 for n, p in scores.items()}


def _fixed(ranked: Ranked, cfg: TopKConfig) -> Ranked:
    return ranked[: cfg.cap]


def _mass(ranked: Ranked, cfg: TopKConfig) -> Ranked:
    # The smallest prefix whose probability reaches ``mass``, never more than ``cap`` experts.
    # A rounding error's worth short of ``mass`` reaches it (1.0 is allowed, and a sum of floats may fall a hair
    # under it), and an expert with no probability never joins: it would add nothing but a call.
    out: Ranked = []
    total = 0.0
    for name, p in ranked[: cfg.cap]:
        if out and p <= 0.0:
            break
        out.append((name, p))
        total += p
        if total >= cfg.mass - _ROUNDING:
            break
    return out


def _min_weight(ranked: Ranked, cfg: TopKConfig) -> Ranked:
    panel = ranked[: cfg.cap]
    total = sum(p for _, p in panel) or 1.0
    return [ranked[0]] + [(n, p) for n, p in panel[1:] if p / total >= cfg.min_weight]


def _adaptive(ranked: Ranked, cfg: TopKConfig) -> Ranked:
    # One expert when the gate is confident; otherwise widen the panel until it holds ``mass``.
    if ranked[0][1] >= cfg.confident:
        return ranked[:1]
    return _mass(ranked, cfg)


POLICIES: dict[str, Callable[[Ranked, TopKConfig], Ranked]] = {
    "fixed": _fixed,
    "mass": _mass,
    "min_weight": _min_weight,
    "adaptive": _adaptive,
}


def choose(scores: Mapping[str, float], cfg: TopKConfig, *, exclude: frozenset[str] = frozenset()) -> Ranked:
    """The weighted panel for one query. ``exclude`` removes experts that cannot serve it (e.g. open breakers).

    The policy judges the experts left, their scores renormalised over them: an excluded expert's share is
    spread over the rest, so ``mass`` and ``adaptive`` mean what they mean with every expert in (without it, an
    open breaker on a confident top expert would leave the rest unable to reach ``mass``, and the panel would
    take every expert left). A score that is not a positive finite number counts as 0."""
    live = {n: p for n, p in _usable(scores).items() if n not in exclude}
    if not live:
        raise ValueError("no expert left to choose from")
    total = sum(live.values())
    # Ranked by the scores themselves: renormalised, two close ones may round to a tie the names would break.
    ranked = [(n, p / total if total > 0 else p) for n, p in _ranked(live)]
    panel = POLICIES[cfg.policy](ranked, cfg)
    total = sum(p for _, p in panel)
    if total <= 0.0:
        return [(n, 1.0 / len(panel)) for n, _ in panel]
    return [(n, p / total) for n, p in panel]


def capped(panel: Ranked, most: int) -> Ranked:
    """``panel`` with at most ``most`` members, the heaviest, renormalised: ``fallback.max_attempts`` counts every
    expert tried, the panel included, and a policy with no ``k`` (mass, min_weight, adaptive) may name more."""
    if len(panel) <= most:
        return panel
    kept = sorted(panel, key=lambda member: -member[1])[:most]
    total = sum(w for _, w in kept)
    return [(n, w / total) for n, w in kept]
