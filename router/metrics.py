"""Prometheus metrics for one service, fed from each answer's trace.

Every ``RouterMetrics`` owns its registry, so two apps in one process (tests, a router inside a router) never
share counters, and importing this module registers nothing. Expert-level figures come from the trace's
attempts; the orchestrator is not instrumented. Breaker state and in-flight calls are read at scrape time
from ``orchestrator.expert_states()`` when the orchestrator has it.

Label values are bounded: routes are the service's own paths, models are names the service knows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from router.trace import Trace

__all__ = ["BREAKER_STATES", "CONTENT_TYPE", "RouterMetrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
BREAKER_STATES = ("closed", "half_open", "open", "disabled")
# LLM calls run from tens of milliseconds (replay, cache) to minutes (long generations).
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class RouterMetrics:
    """The service's metrics. ``states`` returns the orchestrator (or None) whose experts are read at scrape time."""

    def __init__(self, states: Callable[[], Any] | None = None, reloads: Any = None,
                 stores: Callable[[], Iterable[Any]] | None = None) -> None:
        """``reloads``: the service's ``Reloader`` (its ``reloaded``, ``refused`` and ``last_refused`` are read
        at scrape time), or None when hot reload is off. ``stores``: the service's state stores, read at scrape
        time; each with a ``redis_up()`` (``router.state_redis``) is a ``moe_redis_up`` series."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("moe_requests", "HTTP requests", ["route", "status", "model"], registry=r)
        self.request_latency = Histogram("moe_request_latency_seconds", "HTTP request latency, streams to their end",
                                         ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.expert_latency = Histogram("moe_expert_latency_seconds", "latency of one expert call",
                                        ["expert", "outcome"], buckets=_LATENCY_BUCKETS, registry=r)
        self.expert_failures = Counter("moe_expert_failures", "failed expert calls", ["expert", "kind"], registry=r)
        self.routed = Counter("moe_routed", "experts the gate chose (the routing distribution)", ["expert"],
                              registry=r)
        # "fast" / "full": the stage of a two-stage gate (gate.cascade) that decided; "single": a one-stage gate.
        self.gate_decisions = Counter("moe_gate_decisions", "routing decisions, by the gate stage that made them",
                                      ["stage"], registry=r)
        self.answered = Counter("moe_answered", "answers returned, by the expert whose text was sent", ["expert"],
                                registry=r)
        self.tokens = Counter("moe_tokens", "tokens used, by expert", ["expert", "kind"], registry=r)
        self.cost = Counter("moe_cost_usd", "cost in USD, by expert", ["expert"], registry=r)
        self.rejected = Counter("moe_rejected", "calls refused before routing", ["reason"], registry=r)
        if states is not None:
            r.register(_ExpertStates(states))
        if reloads is not None:
            r.register(_Reloads(reloads))
        if stores is not None:
            r.register(_RedisStores(stores))

    def observe_request(self, route: str, status: int, model: str, seconds: float) -> None:
        self.requests.labels(route, str(status), model).inc()
        self.request_latency.labels(route).observe(seconds)

    def observe_trace(self, trace: Trace, answered: str | None) -> None:
        if trace.decision is not None:
            self.gate_decisions.labels(trace.decision.stage or "single").inc()
            for chosen in trace.decision.chosen:
                self.routed.labels(chosen.expert).inc()
        for attempt in trace.attempts:
            kind = None if attempt.ok else (attempt.error or {}).get("kind", "error")
            cancelled = kind == "cancelled"  # the client left mid-call: not the expert's failure
            if kind not in NOT_CALLED:  # a skipped expert's 0 s would drag its latency quantiles down
                self.expert_latency.labels(attempt.expert, "ok" if attempt.ok else "cancelled" if cancelled else
                                           "error").observe(attempt.latency_ms / 1000.0)
            if kind is not None and not cancelled:
                self.expert_failures.labels(attempt.expert, kind).inc()
            self.tokens.labels(attempt.expert, "prompt").inc(attempt.usage.prompt_tokens)
            self.tokens.labels(attempt.expert, "completion").inc(attempt.usage.completion_tokens)
            self.cost.labels(attempt.expert).inc(max(0.0, attempt.cost_usd))
        if answered:
            self.answered.labels(answered).inc()

    def observe_failures(self, causes: Iterable[Mapping[str, str]]) -> None:
        """Failures known only from an ``AllExpertsFailed`` (no trace came back)."""
        for cause in causes:
            self.expert_failures.labels(cause.get("expert", "?"), cause.get("kind", "error")).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


# Failure kinds of an expert passed over without a call (its breaker open, its in-flight limit full, the cost
# budget spent, fallback stopped before it): counted in ``moe_expert_failures_total``, never as a call's latency.
NOT_CALLED = frozenset({"circuit_open", "overloaded", "budget_exhausted", "not_tried"})


class _ExpertStates(Collector):
    """Gauges read from the orchestrator at scrape time: breaker state (one series per state, 1 for the
    current one) and calls in flight. Absent when the orchestrator has no ``expert_states()``."""

    def __init__(self, source: Callable[[], Any]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        read = getattr(self.source(), "expert_states", None)
        if not callable(read):
            return
        states: Mapping[str, Any] = read()
        breaker = GaugeMetricFamily("moe_breaker_state", "circuit breaker state per expert (1: current)",
                                    labels=["expert", "state"])
        in_flight = GaugeMetricFamily("moe_expert_in_flight", "calls in flight per expert", labels=["expert"])
        for expert, info in states.items():
            current = _breaker_state(info)
            if current is not None:
                for state in BREAKER_STATES:
                    breaker.add_metric([expert, state], 1.0 if state == current else 0.0)
            if isinstance(info, Mapping) and isinstance(info.get("in_flight"), int | float):
                in_flight.add_metric([expert], float(info["in_flight"]))
        yield breaker
        yield in_flight


class _Reloads(Collector):
    """Hot reloads, read from the reloader at scrape time: how many were done and refused, and whether the latest
    was refused (1: the config file on disk is not the one serving, until a reload of it succeeds)."""

    def __init__(self, reloader: Any) -> None:
        self.reloader = reloader

    def collect(self) -> Iterator[Metric]:
        done = CounterMetricFamily("moe_config_reloads", "hot reloads of the config, by result", labels=["result"])
        done.add_metric(["reloaded"], float(self.reloader.reloaded))
        done.add_metric(["refused"], float(self.reloader.refused))
        yield done
        yield GaugeMetricFamily("moe_config_reload_refused",
                                "1 while the latest reload was refused: the file on disk is not what serves",
                                value=1.0 if self.reloader.last_refused else 0.0)


class _RedisStores(Collector):
    """Whether each Redis-backed store reaches Redis (1) or serves without it for an outage (0): rate limits and
    breakers then hold per replica, and answers are not remembered for feedback by id. No series without Redis."""

    def __init__(self, stores: Callable[[], Iterable[Any]]) -> None:
        self.stores = stores

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("moe_redis_up", "1 while the store reaches Redis; 0 while it serves this replica's "
                               "own state for an outage", labels=["store"])
        for store in self.stores():
            if callable(getattr(store, "redis_up", None)):
                up.add_metric([store.metric_name], 1.0 if store.redis_up() else 0.0)
        yield up


def _breaker_state(info: Any) -> str | None:
    """``{"breaker": {"state": "open"}}``, ``{"breaker": "open"}`` or ``"open"``; other shapes are skipped."""
    if isinstance(info, Mapping):
        info = info.get("breaker")
    if isinstance(info, Mapping):
        info = info.get("state")
    return info if isinstance(info, str) and info in BREAKER_STATES else None
