"""Hierarchical experts: an expert of ``type: router`` is another router, so a mixture can hold mixtures.

Two ways to reach the inner router, exactly one per expert (the config's cross-check enforces it):

- ``router_config: other.yaml`` builds the inner router in-process (``router.build.build_nested``); the outer
  context's transport is handed down, so tests inject the network for every level at once, and a hot reload of
  the outer config keeps the inner router's breakers, in-flight counts and loaded encoder, as it keeps the outer's;
- ``endpoint: http://host:port/v1`` calls another moe-router service like any OpenAI-compatible endpoint
  (set ``model: auto`` so it routes), and reads its trace from the response's ``moe`` field.

Either way the reply carries the inner trace in ``ExpertReply.nested``, which the outer trace keeps on the
attempt (``Attempt.nested``), and the inner router's own failures arrive as the errors an HTTP router would
send: all experts failed -> 503 (``ExpertServerError``, with the soonest Retry-After its causes gave), every
expert it called refused the request as invalid, or none can serve it -> 400 (``ExpertRejected``), so the outer
level too answers 400 rather than blaming the inner router as an outage. A stream the inner router fails after
it began still reports what the inner router spent, and its trace, on the outer attempt.

An inner router works within the outer call (``router.fallback.CallScope``, which the dispatcher sets as it
makes the call; over HTTP, its ``headers``): its deadline ends a little before the outer router would cut the call
off (a stream's first output, before the outer level's first-step limit), and its cost budget is what the outer
request has left, less what the outer panel's other members still working are estimated to spend; its own
config's limits apply when they are tighter. One that ran out of time fails as a timeout. In process, its trace is
handed to the outer call as soon as it exists, so what its experts spent counts on the outer attempt however the
call ends: answered, failed, timed out, or cancelled because the client left; over HTTP, its error carries it.

For the cost budget's estimate (``Dispatcher.estimate``), an in-process router with no prices of its own is
priced as its dearest expert: its config's zero prices would count it as free, so it would pass any budget.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from experts.base import Expert, ExpertContext
from experts.errors import (
    ExpertConfigError,
    ExpertError,
    ExpertOverloaded,
    ExpertRejected,
    ExpertServerError,
    ExpertTimeout,
)
from experts.openai_compat import OpenAICompatibleExpert
from experts.types import ChatRequest, ExpertReply, StreamDelta, Usage
from router.fallback import CALL_SCOPE, NOT_CALLED, AllExpertsFailed, CallScope

if TYPE_CHECKING:
    from router.config import ExpertConfig
    from router.orchestrator import Orchestrator

__all__ = ["RouterExpert"]


class RouterExpert(Expert):
    """Another router as one expert. ``orchestrator`` injects an already built inner router (tests)."""

    config: ExpertConfig  # the router's own schema: a nested router reads ``router_config`` too

    def __init__(self, config: ExpertConfig, context: ExpertContext | None = None, *,
                 orchestrator: Orchestrator | None = None) -> None:
        super().__init__(config, context)
        self._http: OpenAICompatibleExpert | None = None
        self._inner: Orchestrator | None = orchestrator
        if orchestrator is None and config.router_config:
            self._inner = self._build_inner(config.router_config)
        elif orchestrator is None and config.endpoint:
            self._http = _RouterEndpoint(config, context)
        elif orchestrator is None:
            raise ExpertConfigError(config.name, "type 'router' needs an endpoint or a router_config")

    def _build_inner(self, router_config: str) -> Orchestrator:
        from router.build import build_nested
        from router.config import load_config

        path = Path(router_config)
        path = path if path.is_absolute() else self.context.base_dir / path
        # Loaded as the loader loads any config (a routing cycle among the files is refused there, naming the
        # chain), and built in the folder the loader resolved its relative paths against; with the state the
        # outer router keeps for it across reloads (its breakers, in-flight counts and encoders), when it keeps one.
        inner = load_config(path)
        context = ExpertContext(base_dir=Path(inner.base_dir), transport=self.context.transport)
        try:
            return build_nested(inner, self.config, path, context=context)
        except Exception as exc:
            # A remedy ("moe train --config <this config>") is the nested file's to run, not the outer one's,
            # which the CLI would fill in.
            if len(exc.args) == 1 and "<this config>" in str(exc.args[0]):
                exc.args = (str(exc.args[0]).replace("<this config>", str(path)),)
            mark_nested_failure(exc, path)
            raise

    def __repr__(self) -> str:
        where = self.config.endpoint or self.config.router_config or "in-process"
        return f"RouterExpert(name={self.name!r}, inner={where!r})"

    def cost(self, usage: Usage) -> float:
        """At the prices the config gives this expert; an in-process router given none is priced as its dearest
        expert, so the cost budget does not count a call to it as free (its actual cost is the inner trace's)."""
        own = super().cost(usage)
        priced = self.config.cost.input_per_1k or self.config.cost.output_per_1k
        if self._inner is None or priced:
            return own
        return max((e.cost(usage) for e in self._inner.experts.values()), default=own)

    def _failure(self, exc: AllExpertsFailed) -> ExpertError:
        """The inner router's total failure, as its service would have answered: 400 when every expert it called
        refused the request as invalid, else 503 with the soonest Retry-After its causes gave; but a timeout when
        it ran out of time (every expert it called timed out): then the outer level judges it as any expert cut
        off, which blames no one for a deadline the outer request itself set; and overloaded when it had no room
        (it called no expert, one at least being at its in-flight limit): then the outer level hands the query
        on at once, as from any saturated expert, without counting a failure, a retry or an attempt."""
        if exc.invalid_request:
            return ExpertRejected(self.name, 400, f"inner router: {exc}")
        if exc.timed_out:
            return ExpertTimeout(self.name, f"inner router: {exc}")
        if exc.saturated:
            return ExpertOverloaded(self.name, f"inner router: {exc}")
        return ExpertServerError(self.name, 503, f"inner router: {exc}", exc.retry_after_s)

    async def generate(self, request: ChatRequest) -> ExpertReply:
        if self._http is not None:
            caller = _caller()
            try:
                return _priced_by_inner(await self._http.generate(request))
            except ExpertError as exc:
                caller.remote = _remote_spend(exc.nested)
                raise _over_http(exc) from exc
        from router.orchestrator import NoCapableExpert

        assert self._inner is not None
        started = time.perf_counter()
        caller = _caller()
        try:
            answer = await self._inner.complete(_routed(request), on_trace=caller.keep, caller=caller)
        except AllExpertsFailed as exc:
            raise self._failure(exc) from None
        except NoCapableExpert as exc:
            raise ExpertRejected(self.name, 400, f"inner router: {exc}") from None
        trace = answer.trace
        return ExpertReply(expert=self.name, content=answer.content, usage=trace.usage, cost_usd=trace.cost_usd,
                           usage_estimated=trace.usage_estimated,
                           latency_ms=(time.perf_counter() - started) * 1000.0,
                           finish_reason=answer.finish_reason, tool_calls=answer.tool_calls, model=answer.expert,
                           logprobs=answer.logprobs, refusal=answer.refusal,
                           reasoning_content=answer.reasoning_content, nested=trace.summary(),
                           extra=answer.extra)

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamDelta]:
        if self._http is not None:
            caller = _caller()
            try:
                async with aclosing(self._http.stream(request)) as deltas:  # type: ignore[type-var]
                    async for delta in deltas:
                        yield _priced_delta(delta)
            except ExpertError as exc:
                caller.remote = _remote_spend(exc.nested)
                raise _over_http(exc) from exc
            return
        from router.orchestrator import NoCapableExpert, StreamEnd

        assert self._inner is not None
        caller = _caller()
        try:
            async with aclosing(self._inner.stream(_routed(request), on_trace=caller.keep, caller=caller)) as events:
                async for event in events:
                    if isinstance(event, StreamEnd):
                        trace = event.trace
                        yield StreamDelta(finish_reason=event.finish_reason, usage=trace.usage,
                                          cost_usd=trace.cost_usd, usage_estimated=trace.usage_estimated,
                                          nested=trace.summary())
                    else:
                        yield event.delta
        except AllExpertsFailed as exc:
            # What the inner router spent (a try that broke off mid-stream is paid for) and its trace reach the
            # outer attempt through ``caller``, rather than an estimate at our own prices.
            raise self._failure(exc) from None
        except NoCapableExpert as exc:
            raise ExpertRejected(self.name, 400, f"inner router: {exc}") from None

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
        if self._inner is not None:
            await self._inner.aclose()


class _RouterEndpoint(OpenAICompatibleExpert):
    """Another moe-router's service: each call tells it the outer call's limits (``CallScope.headers``), which
    it applies where they are tighter than its own config's, and its replies carry its routing trace."""

    SENDS_TRACE = True

    def _request_headers(self) -> dict[str, str] | None:
        return _caller().headers() or None


_NESTED_NOTE = "in the router nested from "


def mark_nested_failure(exc: BaseException, path: Path) -> None:
    """Note on ``exc`` that building the router nested from ``path`` raised it (``nested_failure``)."""
    exc.add_note(f"{_NESTED_NOTE}{path}")


def nested_failure(exc: BaseException) -> bool:
    """Whether ``exc`` was raised building a nested router, not by the config whose build it stopped (a reload
    names such a failure under the nesting expert's key)."""
    return any(note.startswith(_NESTED_NOTE) for note in getattr(exc, "__notes__", ()))


def _over_http(exc: ExpertError) -> ExpertError:
    """Another moe-router's failure over HTTP as the in-process one's is judged (``RouterExpert._failure``): its
    503 when every expert it called timed out (the deadline this router passed down ran out there) is a timeout,
    which the breaker does not count against it when that deadline was the client's; its 503 when it called none,
    one at least being at its in-flight limit, is overloaded; any other error as it came."""
    kinds = _inner_kinds(exc.nested) if isinstance(exc, ExpertServerError) else None
    if kinds is None:
        return exc
    called = [kind for kind in kinds if kind not in NOT_CALLED]
    judged: ExpertError
    if called and all(kind == ExpertTimeout.kind for kind in called):
        judged = ExpertTimeout(exc.expert, f"inner router: {exc.message}")
    elif not called and ExpertOverloaded.kind in kinds:
        judged = ExpertOverloaded(exc.expert, f"inner router: {exc.message}")
    else:
        return exc
    judged.nested = exc.nested
    return judged


def _inner_kinds(nested: dict[str, Any] | None) -> list[Any] | None:
    """The error kind of each expert in the trace another moe-router's error carried, by its last attempt (as
    the in-process causes hold each expert's last error: a 503 retried into a timeout ran out of time); None
    when the trace has no attempts, or an attempt that answered."""
    attempts = nested.get("attempts") if isinstance(nested, dict) else None
    if not isinstance(attempts, list) or any(isinstance(a, dict) and a.get("ok") for a in attempts):
        return None
    last = {a.get("expert"): (a.get("error") or {}).get("kind") for a in attempts if isinstance(a, dict)}
    return list(last.values())


def _remote_spend(nested: dict[str, Any] | None) -> dict[str, Any] | None:
    """The ``Attempt`` fields for what another moe-router's failed call spent, from the trace its error carried;
    None when it carried none, or one without its usage and cost."""
    cost = _inner_cost(nested)
    try:
        usage = Usage.model_validate(nested["usage"]) if nested is not None and cost is not None else None
    except (KeyError, ValueError):
        usage = None
    if nested is None or cost is None or usage is None:
        return None
    return {"usage": usage, "cost_usd": cost, "usage_estimated": _inner_estimated(nested), "nested": nested}


def _caller() -> CallScope:
    """The outer call this one runs in (``CALL_SCOPE``); a scope of no limits when called directly, not through a
    dispatcher."""
    return CALL_SCOPE.get() or CallScope()


def _routed(request: ChatRequest) -> ChatRequest:
    """The inner router routes: the outer model name (ours, "auto", the outer service's) means nothing there."""
    return request.model_copy(update={"model": "auto"})


def _inner_cost(nested: dict[str, Any] | None) -> float | None:
    """The cost another router's trace reports: a finite number, not below zero; None otherwise."""
    cost = nested.get("cost_usd") if nested else None
    if isinstance(cost, int | float) and not isinstance(cost, bool) and math.isfinite(cost) and cost >= 0:
        return float(cost)
    return None


def _inner_estimated(nested: dict[str, Any] | None) -> bool:
    """Whether the inner trace's usage is in part an estimate (an attempt of its experts sent none)."""
    attempts = nested.get("attempts") if nested else None
    return isinstance(attempts, list) and any(isinstance(a, dict) and a.get("usage_estimated") for a in attempts)


def _priced_by_inner(reply: ExpertReply) -> ExpertReply:
    """The inner router knows what its experts cost, and which of its counts are estimates; our config's prices
    for it are only a fallback."""
    cost = _inner_cost(reply.nested)
    if cost is not None:
        reply.cost_usd = cost
    reply.usage_estimated = reply.usage_estimated or _inner_estimated(reply.nested)
    return reply


def _priced_delta(delta: StreamDelta) -> StreamDelta:
    cost = _inner_cost(delta.nested)
    if cost is not None:
        delta.cost_usd = cost
    delta.usage_estimated = delta.usage_estimated or _inner_estimated(delta.nested)
    return delta
