"""A circuit breaker per expert: stop calling an expert that keeps failing, and probe it back in.

    closed ──(failure_threshold consecutive failures, or failure_rate over window_s)──> open
    open ──(cooldown passed; the next call is a probe)──> half_open
    half_open ──(a probe succeeds)──> closed            (the trip count and the window are cleared)
    half_open ──(a probe fails)──> open, cooldown * cooldown_growth, capped at cooldown_max_s

Invariants that keep the cooldown right when it is re-triggered:
- A re-trip restarts the cooldown from the moment of the failed probe, never from the first trip, so the
  breaker cannot flap straight back to half-open.
- Results of calls admitted while closed that land after the breaker opened are stale evidence: they neither
  extend the cooldown nor count as a trip (otherwise a burst of in-flight failures would multiply it).
- Only probes decide half-open; at most ``half_open_probes`` are in flight at once.
- Only probes of the current half-open round decide it. Each entry into half-open starts a new round
  (``probe_round``), and a permit carries the round it was admitted in: a probe still in flight from an
  earlier round (another probe of it already re-opened or closed the breaker) is stale evidence, and is ignored.

The transitions (``admit``, ``record``) are pure functions of a frozen ``BreakerState`` and a clock reading.
``Breakers`` applies them through a ``BreakerStore``; the in-memory store is the default, and a shared store
(Redis, so replicas agree) implements the same two methods.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

from experts.errors import ExpertAuthError, ExpertConfigError, ExpertError, ExpertOverloaded
from router.config import BreakerConfig

__all__ = ["BreakerState", "BreakerStore", "Breakers", "CircuitOpen", "MemoryBreakerStore", "Outcome", "Permit",
           "admit", "classify", "record"]

State = Literal["closed", "open", "half_open"]
# "neutral": says nothing about the expert's health (its in-flight limit was full, our deadline cut it short,
# the caller went away).
Outcome = Literal["success", "failure", "neutral"]
_BUCKETS = 10  # the failure-rate window is kept as this many counters, so its size is fixed under any load


class CircuitOpen(ExpertError):
    """The expert's breaker refused the call; it was not made."""

    kind = "circuit_open"


@dataclass(frozen=True)
class BreakerState:
    state: State = "closed"
    consecutive: int = 0
    trips: int = 0  # opens since the last close; drives the cooldown growth
    opened_at: float = 0.0
    cooldown_s: float = 0.0
    probes: int = 0  # half-open calls in flight
    probe_round: int = 0  # half-open rounds begun; never reset, so a stale probe can never match a later round
    buckets: tuple[tuple[int, int, int], ...] = ()  # (bucket index, calls, failures) inside the window
    last_error: str | None = None


@dataclass(frozen=True)
class Permit:
    expert: str
    probe: bool
    probe_round: int = 0  # a probe's half-open round (``BreakerState.probe_round``)


def classify(error: ExpertError | None) -> Outcome:
    """What a call's result says about the expert's health."""
    if error is None:
        return "success"
    if isinstance(error, ExpertOverloaded | CircuitOpen):
        return "neutral"
    if error.transient or isinstance(error, ExpertAuthError | ExpertConfigError):
        return "failure"
    # A 4xx or a missing recording: the expert is up and answered; the request was at fault.
    return "success"


def admit(s: BreakerState, cfg: BreakerConfig, now: float) -> tuple[bool, BreakerState]:
    """Whether a call may go now, and the state after letting it (a half-open probe takes a slot)."""
    if s.state == "open":
        if now < s.opened_at + s.cooldown_s:
            return False, s
        s = replace(s, state="half_open", probes=0, probe_round=s.probe_round + 1)
    if s.state == "half_open":
        if s.probes >= cfg.half_open_probes:
            return False, s
        return True, replace(s, probes=s.probes + 1)
    return True, s


def record(s: BreakerState, cfg: BreakerConfig, now: float, outcome: Outcome, *, probe: bool,
           error_kind: str | None = None, probe_round: int | None = None) -> BreakerState:
    """The state after a call admitted with ``probe`` (in half-open round ``probe_round``; None: the current one)
    ended with ``outcome``."""
    if probe:
        if s.state != "half_open" or (probe_round is not None and probe_round != s.probe_round):
            return s  # stale: its round is over
        s = replace(s, probes=max(0, s.probes - 1))
        if outcome == "success":
            return BreakerState(probe_round=s.probe_round)
        return _trip(s, cfg, now, error_kind) if outcome == "failure" else s
    if s.state != "closed" or outcome == "neutral":
        return s  # stale: admitted before the breaker opened
    failed = outcome == "failure"
    s = replace(s, consecutive=s.consecutive + 1 if failed else 0, buckets=_count(s.buckets, cfg, now, failed),
                last_error=error_kind if failed else s.last_error)
    return _trip(s, cfg, now, error_kind) if failed and _tripped(s, cfg) else s


def _count(buckets: tuple[tuple[int, int, int], ...], cfg: BreakerConfig, now: float,
           failed: bool) -> tuple[tuple[int, int, int], ...]:
    index = math.floor(now / (cfg.window_s / _BUCKETS))
    kept = [b for b in buckets if b[0] > index - _BUCKETS]
    if kept and kept[-1][0] == index:
        _, calls, failures = kept.pop()
    else:
        calls, failures = 0, 0
    return (*kept, (index, calls + 1, failures + int(failed)))


def _tripped(s: BreakerState, cfg: BreakerConfig) -> bool:
    if s.consecutive >= cfg.failure_threshold:
        return True
    calls = sum(b[1] for b in s.buckets)
    failures = sum(b[2] for b in s.buckets)
    return cfg.failure_rate is not None and calls >= cfg.min_calls and failures / calls >= cfg.failure_rate


def _trip(s: BreakerState, cfg: BreakerConfig, now: float, error_kind: str | None) -> BreakerState:
    cooldown = min(cfg.cooldown_max_s, cfg.cooldown_s * cfg.cooldown_growth ** min(s.trips, 64))
    return BreakerState(state="open", trips=s.trips + 1, opened_at=now, cooldown_s=cooldown,
                        consecutive=s.consecutive, last_error=error_kind or s.last_error, probe_round=s.probe_round)


class BreakerStore(Protocol):
    """Where breaker states live: in memory for one process, or shared (Redis) across replicas."""

    def load(self, expert: str) -> BreakerState: ...

    def save(self, expert: str, state: BreakerState) -> None: ...


class MemoryBreakerStore:
    def __init__(self) -> None:
        self._states: dict[str, BreakerState] = {}

    def load(self, expert: str) -> BreakerState:
        return self._states.get(expert, BreakerState())

    def save(self, expert: str, state: BreakerState) -> None:
        self._states[expert] = state


class Breakers:
    """The breakers of every expert, through one store and one clock (both injectable for tests)."""

    def __init__(self, cfg: BreakerConfig, store: BreakerStore | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.store = store or MemoryBreakerStore()
        self.clock = clock

    def admit(self, expert: str) -> Permit:
        """A permit for one call; raises ``CircuitOpen`` when the breaker refuses it."""
        if not self.cfg.enabled:
            return Permit(expert, probe=False)
        before = self.store.load(expert)
        allowed, after = admit(before, self.cfg, self.clock())
        if not allowed:
            raise CircuitOpen(expert, self._why(after))
        if after != before:
            self.store.save(expert, after)
        probe = after.state == "half_open"
        return Permit(expert, probe=probe, probe_round=after.probe_round if probe else 0)

    def finish(self, permit: Permit, error: ExpertError | None, outcome: Outcome | None = None) -> None:
        """Record how a permitted call ended; ``outcome`` overrides what ``error`` alone would say."""
        if not self.cfg.enabled:
            return
        outcome = outcome or classify(error)
        state = record(self.store.load(permit.expert), self.cfg, self.clock(), outcome, probe=permit.probe,
                       error_kind=error.kind if error else None, probe_round=permit.probe_round)
        self.store.save(permit.expert, state)

    def refuses(self, expert: str) -> bool:
        return self.cfg.enabled and not admit(self.store.load(expert), self.cfg, self.clock())[0]

    def refusing(self, experts: Iterable[str]) -> frozenset[str]:
        """The experts whose breaker would refuse a call now: left out of the gate's panel and of fallback."""
        return frozenset(e for e in experts if self.refuses(e))

    def reset(self, expert: str) -> None:
        """Forget what the breaker learned of ``expert`` (a reload changed its config: another endpoint or model
        is another service)."""
        self.store.save(expert, BreakerState())

    def snapshot(self, expert: str) -> dict[str, Any]:
        s = self.store.load(expert)
        now = self.clock()
        state = "half_open" if s.state == "open" and now >= s.opened_at + s.cooldown_s else s.state
        return {"state": state if self.cfg.enabled else "disabled", "consecutive_failures": s.consecutive,
                "trips": s.trips, "cooldown_s": s.cooldown_s,
                "retry_in_s": max(0.0, s.opened_at + s.cooldown_s - now) if s.state == "open" else 0.0,
                "window_calls": sum(b[1] for b in s.buckets), "window_failures": sum(b[2] for b in s.buckets),
                "last_error": s.last_error}

    def _why(self, s: BreakerState) -> str:
        if s.state == "half_open":
            return "circuit half-open: a probe call is already in flight"
        wait = max(0.0, s.opened_at + s.cooldown_s - self.clock())
        return (f"circuit open after repeated failures (last: {s.last_error or 'unknown'}); "
                f"next probe in {wait:.1f}s")
