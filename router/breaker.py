"""A circuit breaker per expert: stop calling an expert that keeps failing, and probe it back in.

    closed ──(failure_threshold consecutive failures, or failure_rate over window_s)──> open
    open ──(cooldown passed; the next call is a probe)──> half_open
    half_open ──(a probe succeeds)──> closed            (the trip count and the window are cleared)
    half_open ──(a probe fails)──> open, cooldown * cooldown_growth, capped at cooldown_max_s
    any state ──(a 429 or 503 with Retry-After, when ``honour_retry_after``)──> open for that wait (capped at
                cooldown_max_s; an open breaker's wait is only ever lengthened), without counting a trip: the
                expert said when to come back. Whichever call brings it: a probe, or a late answer to a call
                admitted earlier.

A Retry-After held this way applies to every request, not only to a retry of the one that got it: with the
default of no retries, the next request would otherwise call the same rate-limited expert at once, and only
``failure_threshold`` such refusals later would the breaker step in (with its own cooldown, not the expert's).

Invariants that keep the cooldown right when it is re-triggered:
- A re-trip restarts the cooldown from the moment of the failed probe, never from the first trip, so the
  breaker cannot flap straight back to half-open.
- Results of calls admitted while closed that land after the breaker opened are stale evidence: they neither
  extend the cooldown nor count as a trip (otherwise a burst of in-flight failures would multiply it).
- Only probes decide half-open; at most ``half_open_probes`` are in flight at once.
- A Retry-After may lengthen an open breaker's wait but never shorten it: a late 429 that asks for less than is
  left changes nothing, and a late one that asks for more holds the expert that much longer (an explicit time,
  so a burst of them cannot multiply it as counted failures would). One that lands while half-open (the
  cooldown is over, a probe may be in flight) opens the breaker again for its wait, ending that half-open round:
  the probe in flight cannot close it early, and the expert is called again only once the time it gave is over.
- Only probes of the current half-open round decide it. Each entry into half-open starts a new round
  (``probe_round``), and a permit carries the round it was admitted in: a probe still in flight from an
  earlier round (another probe of it already re-opened or closed the breaker) is stale evidence, and is ignored.
- A half-open round whose probes have all been out for ``probe_lease_s`` (no call outlives its request's
  deadline) is presumed lost, and the next call starts a new round. In one process a probe always reports back,
  but a shared store (Redis) can lose its end: the replica that sent it was killed, or the store did not answer
  when it ended (the end was then recorded in that replica's memory only). Without the lease every replica would
  refuse the expert, "a probe call is already in flight", until the store's key expired a day later.

The transitions (``admit``, ``record``) are pure functions of a frozen ``BreakerState`` and a clock reading.
``Breakers`` applies them through a ``BreakerStore``; the in-memory store is the default, and a shared store
(Redis, so replicas agree) implements the same two methods.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

from experts.errors import (
    INVALID_REQUEST_STATUSES,
    ExpertAuthError,
    ExpertConfigError,
    ExpertError,
    ExpertOverloaded,
    ExpertRejected,
)
from router.config import BreakerConfig

__all__ = ["BreakerState", "BreakerStore", "Breakers", "CircuitOpen", "MemoryBreakerStore", "Outcome", "Permit",
           "admit", "classify", "record"]

State = Literal["closed", "open", "half_open"]
# "neutral": says nothing about the expert's health (its in-flight limit was full, our deadline cut it short,
# the caller went away).
Outcome = Literal["success", "failure", "neutral"]
_BUCKETS = 10  # the failure-rate window is kept as this many counters, so its size is fixed under any load
# How long a half-open round's probes may be out before the round is presumed lost (see the module's notes): the
# default ``fallback.deadline_s``, since no call outlives its request's deadline. ``Breakers(probe_lease_s=...)``
# takes the config's own.
PROBE_LEASE_S = 120.0


class CircuitOpen(ExpertError):
    """The expert's breaker refused the call; it was not made. ``retry_after_s``: when it will let a probe through
    (None while a probe is already in flight)."""

    kind = "circuit_open"

    def __init__(self, expert: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(expert, message)
        self.retry_after_s = retry_after_s


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
    held: bool = False  # open because the expert asked for a wait (Retry-After), not because failures tripped it
    epoch: int = 0  # bumped by ``Breakers.reset``: a call admitted before it reports on another service
    # The expert's config the last reset started afresh for (``ExpertConfig.config_digest``; "" for none): a
    # replica reloading the same change later finds it so, and keeps what was learned since.
    config: str = ""
    probe_at: float = 0.0  # when the current half-open round last let a probe through (its lease runs from here)


@dataclass(frozen=True)
class Permit:
    expert: str
    probe: bool
    probe_round: int = 0  # a probe's half-open round (``BreakerState.probe_round``)
    epoch: int = 0  # the breaker's ``BreakerState.epoch`` when the call was let through


def classify(error: ExpertError | None) -> Outcome:
    """What a call's result says about the expert's health.

    Transient failures (connect, timeout, 429, 5xx, malformed replies) are failures, and so are the errors
    that say the deployment is wrong rather than the request: a refused key (401, 403), an expert that cannot be
    built, and any other 4xx but the invalid-request ones, such as a 404 for a model the server does not serve
    (as ``AllExpertsFailed.invalid_request`` and the experts' log levels judge them). A request the expert
    refused as invalid (400, 413, 422: a bad parameter, too long a prompt) or a missing recording says the
    expert is up and answered: the request was at fault."""
    if error is None:
        return "success"
    if isinstance(error, ExpertOverloaded | CircuitOpen):
        return "neutral"
    if error.transient or isinstance(error, ExpertAuthError | ExpertConfigError):
        return "failure"
    if isinstance(error, ExpertRejected) and error.status not in INVALID_REQUEST_STATUSES:
        return "failure"
    return "success"


def admit(s: BreakerState, cfg: BreakerConfig, now: float,
          probe_lease_s: float | None = PROBE_LEASE_S) -> tuple[bool, BreakerState]:
    """Whether a call may go now, and the state after letting it (a half-open probe takes a slot).
    ``probe_lease_s``: after this long with every probe slot taken, the round is presumed lost and a new one
    begins (None: never)."""
    if s.state == "open":
        if now < s.opened_at + s.cooldown_s:
            return False, s
        s = replace(s, state="half_open", probes=0, probe_round=s.probe_round + 1)
    if s.state == "half_open":
        if s.probes >= cfg.half_open_probes:
            if probe_lease_s is None or now < s.probe_at + probe_lease_s:
                return False, s
            # Its probes' ends were lost: their round is over (a late end is stale), and this call probes anew.
            s = replace(s, probes=0, probe_round=s.probe_round + 1)
        return True, replace(s, probes=s.probes + 1, probe_at=now)
    return True, s


def record(s: BreakerState, cfg: BreakerConfig, now: float, outcome: Outcome, *, probe: bool,
           error_kind: str | None = None, probe_round: int | None = None,
           retry_after_s: float | None = None, epoch: int | None = None) -> BreakerState:
    """The state after a call admitted with ``probe`` (in half-open round ``probe_round``; None: the current one)
    ended with ``outcome``. ``retry_after_s``: the wait a failed call's expert asked for (its Retry-After).
    ``epoch``: the state's epoch when the call was admitted (None: the current one); a call admitted before a
    reset went to the expert's old endpoint or model, so it says nothing about this breaker, Retry-After
    included."""
    if epoch is not None and epoch != s.epoch:
        return s
    hold = retry_after_s if outcome == "failure" and cfg.honour_retry_after and retry_after_s else None
    if probe and s.state == "half_open" and probe_round in (None, s.probe_round):
        s = replace(s, probes=max(0, s.probes - 1))
        if outcome == "success":
            return BreakerState(probe_round=s.probe_round, epoch=s.epoch, config=s.config)
        if hold is not None:
            return _hold(s, cfg, now, hold, error_kind)
        return _trip(s, cfg, now, error_kind) if outcome == "failure" else s
    if probe or s.state != "closed":
        # Stale evidence: a probe whose round is over, or a call admitted while closed that landed after the
        # breaker opened. It decides nothing, but a Retry-After it brings is the expert's word all the same: it
        # lengthens an open breaker's wait if it asks for more, and opens a half-open (or closed) one for that
        # long, ending the round, so no probe of it closes the breaker before then.
        return _hold(s, cfg, now, hold, error_kind) if hold is not None else s
    if outcome == "neutral":
        return s
    failed = outcome == "failure"
    s = replace(s, consecutive=s.consecutive + 1 if failed else 0, buckets=_count(s.buckets, cfg, now, failed),
                last_error=error_kind if failed else s.last_error)
    if hold is not None:
        return _hold(s, cfg, now, hold, error_kind)
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
                        consecutive=s.consecutive, last_error=error_kind or s.last_error, probe_round=s.probe_round,
                        epoch=s.epoch, config=s.config)


def _hold(s: BreakerState, cfg: BreakerConfig, now: float, wait_s: float, error_kind: str | None) -> BreakerState:
    """Open for the wait the expert asked for (capped at ``cooldown_max_s``), keeping the trip count: an open
    breaker whose wait ends later already is left as it is."""
    wait = min(cfg.cooldown_max_s, wait_s)
    if s.state == "open" and s.opened_at + s.cooldown_s >= now + wait:
        return s
    return BreakerState(state="open", trips=s.trips, opened_at=now, cooldown_s=wait, consecutive=s.consecutive,
                        last_error=error_kind or s.last_error, probe_round=s.probe_round, held=True, epoch=s.epoch,
                        config=s.config)


class BreakerStore(Protocol):
    """Where breaker states live: in memory for one process, or shared (Redis) across replicas."""

    def load(self, expert: str) -> BreakerState: ...

    def load_many(self, experts: Sequence[str]) -> list[BreakerState]:
        """``load`` of each, at once (a shared store reads them in one round trip)."""
        ...

    def save(self, expert: str, state: BreakerState) -> None: ...


# The state of a breaker nothing was recorded for (frozen, so one serves them all).
_FRESH = BreakerState()


class MemoryBreakerStore:
    def __init__(self) -> None:
        self._states: dict[str, BreakerState] = {}

    def load(self, expert: str) -> BreakerState:
        return self._states.get(expert, _FRESH)

    def load_many(self, experts: Sequence[str]) -> list[BreakerState]:
        return [self.load(expert) for expert in experts]

    def save(self, expert: str, state: BreakerState) -> None:
        self._states[expert] = state


class Breakers:
    """The breakers of every expert, through one store and one clock (both injectable for tests)."""

    def __init__(self, cfg: BreakerConfig, store: BreakerStore | None = None,
                 clock: Callable[[], float] = time.monotonic, *, probe_lease_s: float | None = PROBE_LEASE_S,
                 services: Mapping[str, str] | None = None) -> None:
        """``services``: each expert's service identity (``ExpertConfig.service_identity``), which keys its
        breaker in the store beside the name, so replicas sharing a store while their configs point one expert at
        different endpoints (a rolling change, a reload on one of them) learn of each service apart."""
        self.cfg = cfg
        self.store = store or MemoryBreakerStore()
        self.clock = clock
        self.probe_lease_s = probe_lease_s
        self.services = dict(services or {})

    def _key(self, expert: str) -> str:
        """The store's key for ``expert``'s breaker: its name, with its service identity when known."""
        service = self.services.get(expert)
        return expert if service is None else f"{expert}@{service}"

    def admit(self, expert: str) -> Permit:
        """A permit for one call; raises ``CircuitOpen`` when the breaker refuses it."""
        if not self.cfg.enabled:
            return Permit(expert, probe=False)
        before = self.store.load(self._key(expert))
        allowed, after = admit(before, self.cfg, self.clock(), self.probe_lease_s)
        if not allowed:
            raise self._refusal(expert, after)
        if after != before:
            self.store.save(self._key(expert), after)
        probe = after.state == "half_open"
        return Permit(expert, probe=probe, probe_round=after.probe_round if probe else 0, epoch=after.epoch)

    def finish(self, permit: Permit, error: ExpertError | None, outcome: Outcome | None = None) -> None:
        """Record how a permitted call ended; ``outcome`` overrides what ``error`` alone would say."""
        if not self.cfg.enabled:
            return
        outcome = outcome or classify(error)
        key = self._key(permit.expert)
        state = record(self.store.load(key), self.cfg, self.clock(), outcome, probe=permit.probe,
                       error_kind=error.kind if error else None, probe_round=permit.probe_round,
                       retry_after_s=error.retry_after_s if error else None, epoch=permit.epoch)
        self.store.save(key, state)

    def refuses(self, expert: str, after_s: float = 0.0) -> bool:
        """Whether the breaker would refuse a call ``after_s`` seconds from now (0: now)."""
        return self.cfg.enabled and not admit(self.store.load(self._key(expert)), self.cfg, self.clock() + after_s,
                                              self.probe_lease_s)[0]

    def refusing(self, experts: Iterable[str]) -> frozenset[str]:
        """The experts whose breaker would refuse a call now: left out of the gate's panel and of fallback. Every
        state is read at once: one round trip to a shared store, however many experts (one each, 1,050 a request)."""
        if not self.cfg.enabled:
            return frozenset()
        names = list(experts)
        now = self.clock()
        states = self.store.load_many([self._key(e) for e in names])
        # A closed breaker admits every call: only the others are asked (a request reads every expert's breaker,
        # and most are closed).
        return frozenset(e for e, s in zip(names, states, strict=True)
                         if s.state != "closed" and not admit(s, self.cfg, now, self.probe_lease_s)[0])

    def reset(self, expert: str, config: str = "") -> None:
        """Forget what the breaker learned of ``expert`` (a reload changed its config: another endpoint or model
        is another service), in a new epoch: calls let through before, still in flight to the old service,
        are not counted when they end. ``config``: the digest of the config it starts afresh for; a breaker
        another replica already reset for it (a shared store, each replica reloading the same change in turn)
        is left as it is, with what was learned under that config since."""
        key = self._key(expert)
        state = self.store.load(key)
        if config and state.config == config:
            return
        self.store.save(key, BreakerState(epoch=state.epoch + 1, config=config))

    def snapshot(self, expert: str) -> dict[str, Any]:
        s = self.store.load(self._key(expert))
        now = self.clock()
        state = "half_open" if s.state == "open" and now >= s.opened_at + s.cooldown_s else s.state
        return {"state": state if self.cfg.enabled else "disabled", "consecutive_failures": s.consecutive,
                "trips": s.trips, "cooldown_s": s.cooldown_s,
                "retry_in_s": max(0.0, s.opened_at + s.cooldown_s - now) if s.state == "open" else 0.0,
                "held_by_retry_after": s.held and state == "open",
                "window_calls": sum(b[1] for b in s.buckets), "window_failures": sum(b[2] for b in s.buckets),
                "last_error": s.last_error}

    def _refusal(self, expert: str, s: BreakerState) -> CircuitOpen:
        if s.state == "half_open":
            return CircuitOpen(expert, "circuit half-open: a probe call is already in flight")
        wait = max(0.0, s.opened_at + s.cooldown_s - self.clock())
        cause = (f"the expert asked to wait (Retry-After; last: {s.last_error or 'unknown'})" if s.held else
                 f"after repeated failures (last: {s.last_error or 'unknown'})")
        return CircuitOpen(expert, f"circuit open {cause}; next probe in {wait:.1f}s", retry_after_s=wait)
