"""The orchestrator: gate -> dispatch -> fallback -> combine, with a trace of everything it did.

It holds small parts (a gate, the experts, a dispatcher, a combiner, the fallback settings) and wires them; the
decisions themselves live in ``topk``, ``fallback``, ``retry``, ``breaker``, ``assign`` and ``combine``, which
are pure. One call to one expert (breaker, in-flight limit, time limit, retries) is ``router.dispatch``.

Resilience, in the order a request meets it:
- the gate's panel leaves out experts whose breaker is open; the deadline starts before the gate decides;
- panel members are called concurrently, each retried on transient failures; a failed member's weight is
  renormalised over the members that answered. The top-weight member is always called (the request's first
  call, as a stream's); each other one only while its estimated cost fits in the cost budget next to the
  estimates of the members called with it. One left out has a ``budget_exhausted`` attempt in the trace;
- when the whole panel failed, fallback walks the gate's ranking one expert at a time, skipping open
  breakers and saturated experts (neither was called, so neither counts towards ``max_attempts``), until one
  answers, ``max_attempts`` experts were tried, the deadline passed or the cost budget is spent. A panel member
  left out for the budget was never called, so it stays a candidate: the failed calls cost nothing, and it
  may fit now;
- with fallback off and every candidate's breaker open (the gate's panel is empty), the panel the gate would
  have chosen is asked anyway, so each member's breaker refusal (``circuit_open``, with its next probe) is a
  cause, as a stream's first expert's is;
- when nothing answered, ``RouteFailed`` (an ``AllExpertsFailed``) lists each expert's cause
  (``circuit_open``, ``overloaded`` and ``budget_exhausted`` included, and ``not_tried`` for each candidate
  left when the deadline or ``max_attempts`` stopped fallback, its message saying which) and carries the
  trace; the service turns it into a 503.

Combining: the config's combiner, or the one a request names (``complete(strategy=...)``), merges the answers.
``consensus`` embeds them with the gate's encoder. ``fuse`` has its aggregator expert write the final answer,
called through the dispatcher like any expert (breaker, in-flight limit, time limit, retries, the request's
deadline and cost budget), its attempts marked ``role: aggregate``; when it fails, the top-weight answer is
returned and ``trace.combiner_fallback`` holds the aggregator's error. An aggregator (or ``escalate``'s expert)
that answers with no text counts as failed (``EmptyAnswer``), so an empty answer never replaces the panel's.
A panel member that answers with no text (nor a refusal or tool call) has no say either: the combiner merges
the others' answers, renormalised, and lists it with weight 0, not agreeing (unless every member answered blank).
``escalate`` does not ask its expert again when it already failed the client's request on the panel or in
fallback (a blank answer included), nor one that lacks a capability the request needs (``vision`` for an
image). A panel whose answers carry tool calls is not combined: the top-weight answer stands, calls and all,
since tool calls can be neither fused nor voted on; nor is the answer of an expert the request named directly,
which answers alone.

Deciding (``decide``, ``assign``) is ``router.decide``'s: the gate, the batcher that embeds concurrent queries
together, and the top-k choice that leaves out experts whose breaker is open.

Abstain: when the gate has an ``ood_threshold`` and the config names ``gate.default_expert``, a query scoring
below the threshold goes to the default expert alone (weight 1, ``abstained``); the ranking stays the gate's,
so fallback still walks it. Without a default expert (or when it cannot serve the request or its breaker is
open) the gate's own panel stands: abstaining needs somewhere to go.

Streaming: the top-weighted expert streams, and on failure the walk goes on down the ranking by the same rules
(``router.streaming``). The fallback walk itself, the same for a whole answer and a stream, is ``router.walk``; a
combiner's own model call (``fuse``'s aggregator, ``escalate``'s expert) is ``router.aggregation``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Collection, Iterator, Mapping, Sequence
from contextlib import aclosing, contextmanager
from dataclasses import replace
from typing import Any

import numpy as np

from experts.base import Expert
from experts.errors import ExpertError
from experts.types import ChatRequest, ExpertReply
from router.aggregation import Aggregation
from router.breaker import Breakers
from router.combine import (
    Combined,
    Combiner,
    EmptyAnswer,
    TopOne,
    WeightedAnswer,
    answer_embeddings,
    build_combiner,
)
from router.config import RouterConfig
from router.config.schema import ROUTED_MODEL
from router.decide import Decider, GateLike, NoCapableExpert, blocking_capabilities
from router.dispatch import Capacity, Dispatcher, StreamPiece, skipped
from router.errors import error_body
from router.fallback import AllExpertsFailed, BudgetSpent, CallScope, Deadline, next_candidate
from router.retry import RetryPolicy
from router.streaming import CONTINUE_PROMPT as CONTINUE_PROMPT  # where it was before router.streaming
from router.streaming import StreamEnd, stream_answer
from router.streaming import constrained as constrained
from router.topk import capped, choose
from router.trace import Attempt, Contribution, RoutedAnswer, RouteDecision, Trace, WeightedExpert
from router.vote_weights import VoteWeights
from router.walk import NotTried, Walk

__all__ = ["GateLike", "NoCapableExpert", "NotTried", "Orchestrator", "RouteFailed", "StreamEnd", "StreamPiece",
           "UnknownExpert"]

class UnknownExpert(KeyError):
    """A request names a model that is neither routed ("auto", the service's name) nor an expert."""

    status, code, param = 404, "model_not_found", "model"  # as the service (and LocalRouter) report it

    def __init__(self, name: str, known: Sequence[str]) -> None:
        super().__init__(name)
        self.name = name
        self.known = list(known)

    def __str__(self) -> str:
        return f"unknown model {self.name!r}; known: {', '.join(self.known)}"

    def error_body(self) -> dict[str, Any]:
        return error_body(str(self), "invalid_request_error", self.code, self.param)


class RouteFailed(AllExpertsFailed):
    """No expert answered the request; ``trace`` holds what was tried (attempts, retries, mid-stream switches),
    so the service logs and counts it as it does an answered request's."""

    def __init__(self, causes: list[ExpertError], trace: Trace, reason: str | None = None, *,
                 retry_cap_s: float | None = None) -> None:
        super().__init__(causes, reason, retry_cap_s=retry_cap_s)
        self.trace = trace

    def error_body(self) -> dict[str, Any]:
        """As ``AllExpertsFailed``'s, with the trace beside the error (``moe``, as an answer carries it): what was
        tried and what it cost, which an outer moe-router calling this one counts (``router.hierarchy``)."""
        return {**super().error_body(), "moe": self.trace.summary()}


class Orchestrator:
    """``breakers``, ``in_flight``, ``limits``, ``sleep`` and ``rand`` are injectable: a shared breaker store,
    in-flight counts and the latest config's limits shared with the orchestrators of earlier configs
    (``Capacity``), and a retry schedule that tests can run without waiting."""

    def __init__(self, config: RouterConfig, gate: GateLike, experts: Mapping[str, Expert],
                 combiner: Combiner | None = None, *, breakers: Breakers | None = None,
                 in_flight: dict[str, int] | None = None, limits: Mapping[str, int] | None = None,
                 vote_weights: Mapping[str, float] | VoteWeights | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 rand: Callable[[], float] = random.random) -> None:
        missing = [n for n in config.expert_names if n not in experts]
        if missing:
            raise ValueError(f"experts not built: {', '.join(missing)}")
        self.config = config
        self.gate = gate
        self.experts = dict(experts)
        if config.combiner.vote_weights == "learned" and vote_weights is None:
            raise ValueError("combiner.vote_weights is 'learned' but no learned vote weights were given; "
                             "train them with: moe train --config <this config>")
        self.vote_weights = vote_weights
        # Combiners hold no per-request state: one per strategy, built on first use.
        self._combiners: dict[str, Combiner] = {}
        self.combiner = combiner or self.combiner_for(config.combiner.strategy)
        if self.combiner.aggregator is not None and self.combiner.aggregator not in self.experts:
            raise ValueError(f"the combiner's aggregator {self.combiner.aggregator!r} is not a built expert")
        self.capacity = Capacity({e.name: e.max_concurrency for e in config.experts}, in_flight, limits)
        self.breakers = breakers or Breakers(config.fallback.breaker)
        self.dispatch = Dispatcher(self.experts, self.capacity, self.breakers,
                                   RetryPolicy.from_config(config.fallback),
                                   sleep=sleep, rand=rand)
        # Requests being answered; a hot reload closes this orchestrator only once they are done.
        self.active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.decider = Decider(config, gate, self.experts, self.breakers, self.capacity)

    # -- deciding (``router.decide``) -------------------------------------------------------------------------
    def _route_failed(self, causes: list[ExpertError], trace: Trace, reason: str | None = None) -> RouteFailed:
        # An expert's Retry-After of an hour (passed on as it was) kept clients that honour it (the Node openai
        # SDK) waiting that long, though the router calls the expert again after its breaker's longest hold.
        return RouteFailed(causes, trace, reason, retry_cap_s=self.config.fallback.breaker.cooldown_max_s)

    def decide_sync(self, text: str, exclude: Collection[str] = ()) -> RouteDecision:
        """The gate's decision, computed on the calling thread (no batching)."""
        return self.decider.decide_sync(text, exclude)

    async def decide(self, request: ChatRequest) -> RouteDecision:
        return await self.decider.decide(request)

    def assign_batch(self, queries: Sequence[str], capacity: Mapping[str, int] | None = None) -> list[str]:
        """Expert-choice routing for a batch (``Decider.assign_batch``)."""
        return self.decider.assign_batch(queries, capacity)

    async def assign(self, queries: Sequence[str], capacity: Mapping[str, int] | None = None) -> list[str]:
        return await self.decider.assign(queries, capacity)

    def is_routed(self, model: str) -> bool:
        return model in (ROUTED_MODEL, self.config.service.name)

    @property
    def model_names(self) -> list[str]:
        """What a request's ``model`` may name: the routed name, the service's own, then each expert."""
        return [ROUTED_MODEL, self.config.service.name, *self.config.expert_names]

    async def _plan(self, request: ChatRequest) -> tuple[RouteDecision | None, list[WeightedExpert], list[str]]:
        """The panel to ask first and the ranking fallback walks. An expert named directly gets no fallback."""
        unable = self.decider.unable(request)
        if self.is_routed(request.model):
            decision = await self.decide(request)  # refuses a request no expert can serve (NoCapableExpert)
            # Fallback walks only experts able to serve the request.
            return decision, decision.chosen, [n for n in decision.ranking if n not in unable]
        if request.model in unable:  # an expert named directly that lacks what the request needs
            raise NoCapableExpert(blocking_capabilities(request, [self.config.expert(request.model)]), request.model,
                                  [n for n in self.config.expert_names if n not in unable])
        if request.model not in self.experts:
            raise UnknownExpert(request.model, self.model_names)
        return None, [WeightedExpert(expert=request.model, weight=1.0)], [request.model]

    def expert_states(self) -> dict[str, dict[str, Any]]:
        """Per expert: in-flight calls, their limit, and the breaker's state (for ``GET /v1/experts``)."""
        return {n: {"in_flight": self.capacity.in_flight[n], "max_concurrency": self.capacity.limit(n),
                    "breaker": self.breakers.snapshot(n)} for n in self.config.expert_names}

    # -- answering ------------------------------------------------------------------------------------------
    @contextmanager
    def serving(self) -> Iterator[None]:
        """Count a request as being answered while inside: a hot reload closes this orchestrator only once none
        is (``drained``). The service holds it from the moment it picks the orchestrator for a request, so one
        whose body is still arriving is counted too."""
        self.active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.active -= 1
            if not self.active:
                self._idle.set()

    async def drained(self) -> None:
        """Return once no request is being answered (streams included)."""
        await self._idle.wait()

    def combiner_for(self, strategy: str | None) -> Combiner:
        """The combiner named ``strategy`` (None: the configured one), read without case or surrounding space, as a
        header or an SDK argument gives it. Raises ``ValueError`` naming the known strategies for an unknown one,
        and saying what is missing when the config cannot support it."""
        if strategy is None:
            return self.combiner
        strategy = strategy.strip().lower()
        if strategy not in self._combiners:
            cfg = self.config.combiner
            # An expert's own ``extractor`` overrides the combiner's for its answers, in every strategy that reads
            # a final answer (all but consensus).
            per_expert = {e.name: e.extractor for e in self.config.experts if e.extractor is not None}
            self._combiners[strategy] = build_combiner(strategy, cfg.extractor, per_expert=per_expert,
                                                       embed=self._embed, aggregator=cfg.aggregator,
                                                       vote_weights=self.vote_weights, escalate_to=cfg.escalate_to,
                                                       max_prompt_chars=self.config.service.max_prompt_chars)
        return self._combiners[strategy]

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        """``consensus``'s answer embeddings (``answer_embeddings``, with the gate's encoder)."""
        encoder = self.gate.encoder
        return answer_embeddings(encoder.encode, texts, getattr(encoder, "max_length", None))

    async def complete(self, request: ChatRequest, *, strategy: str | None = None,
                       on_trace: Callable[[Trace], None] | None = None,
                       caller: CallScope | None = None) -> RoutedAnswer:
        """Answer one request: ask the panel concurrently, fall back down the ranking, combine what came back.
        ``on_trace`` is given the request's trace as soon as it exists, so a caller that cancels the work (its
        client left) still has what was tried and what it cost. ``caller``: the limits of the call this request
        runs in, an outer router's (``router.hierarchy``) or a client's (the limit headers, the SDK's
        ``deadline_s=``); where tighter, its time and budget replace the config's."""
        with self.serving():
            return await self._complete(request, strategy, on_trace, caller)

    def _limits(self, caller: CallScope | None, *, stream: bool) -> Deadline:
        return Deadline.within(self.config.fallback.deadline_s, self.config.fallback.cost_budget_usd, caller,
                               stream=stream)

    async def _complete(self, request: ChatRequest, strategy: str | None,
                        on_trace: Callable[[Trace], None] | None, caller: CallScope | None) -> RoutedAnswer:
        start = time.perf_counter()
        deadline = self._limits(caller, stream=False)
        combiner = self.combiner_for(strategy)  # before the gate: a bad strategy costs no gate work
        decision, panel, ranking = await self._plan(request)
        trace = Trace(decision=decision, combiner=combiner.name)
        if on_trace is not None:
            on_trace(trace)
        if not panel and decision is not None and not self.config.fallback.enabled:
            # Every candidate's breaker is open, and no fallback will report them: ask the panel the gate would
            # have chosen, so each member's breaker refuses it with its next probe (or lets a probe through, if
            # its cooldown just ended), as a stream's first expert is asked.
            panel = self._panel_despite_breakers(decision, ranking)
        called, errors = self._within_budget(panel, request, trace, deadline)
        results = await asyncio.gather(*self._panel_calls(called, request, deadline, trace))
        replies = [(p, r) for p, r in zip(called, results, strict=True) if isinstance(r, ExpertReply)]
        failures = [r for r in results if isinstance(r, ExpertError)]
        errors += failures
        reason = None
        tried = sum(not skipped(e) for e in failures)
        # Fallback itself says whether it may go on (``Walk.stop``): with fallback off, a panel passed over whole
        # (full in-flight limits, open breakers) still hands the query to the next by weight, and one called stops.
        if not replies and decision is not None:
            replies, reason = await self._fall_back(request, ranking, called, tried, deadline, trace, errors)
        if not replies:
            raise self._route_failed(errors, trace, reason)
        combined, chosen = await self._combine(combiner, request, replies, deadline, trace, direct=decision is None,
                                               failed=_called_and_failed(errors))
        trace.latency_ms = (time.perf_counter() - start) * 1000.0
        own = combined.content == chosen.content  # the reply's text as it came: its log-probabilities hold
        return RoutedAnswer(content=combined.content, expert=combined.expert, finish_reason=chosen.finish_reason,
                            tool_calls=chosen.tool_calls, logprobs=chosen.logprobs if own else None,
                            refusal=chosen.refusal, reasoning_content=chosen.reasoning_content if own else None,
                            extra=chosen.extra if own else None, trace=trace)

    async def _combine(self, combiner: Combiner, request: ChatRequest,
                       replies: list[tuple[WeightedExpert, ExpertReply]], deadline: Deadline,
                       trace: Trace, *, direct: bool = False,
                       failed: Mapping[str, ExpertError] | None = None) -> tuple[Combined, ExpertReply]:
        """The combined answer and the reply it came from (the aggregator's, when fuse wrote it); the
        contributions and any combiner fallback go into ``trace``.

        ``direct``: the request named its expert, which answers alone: nothing is combined and nobody else is
        asked (``escalate`` would otherwise hand the lone answer to its expert). ``failed``: the experts whose call
        with this request failed, which ``escalate`` does not ask again (``Aggregation``)."""
        tools = any(r.tool_calls for _, r in replies)
        # A blank answer (no text, no refusal, no tool call) has no say, as a failed member has none: the rest's
        # weights are renormalised over them, and escalate does not ask its expert again. Only when every answer is
        # blank does one stand (the top-weight one), so the request is still answered.
        blank = [] if direct else [r for _, r in replies
                                   if not r.content.strip() and r.refusal is None and not r.tool_calls]
        if len(blank) == len(replies):
            blank = []
        heard = [(p, r) for p, r in replies if all(r is not b for b in blank)]
        total = sum(p.weight for p, _ in heard) or 1.0
        answers = [WeightedAnswer(r.expert, p.weight / total, r.content, r.refusal) for p, r in heard]
        if blank:
            failed = {**(failed or {}), **{r.expert: EmptyAnswer(r.expert, "answered with no text") for r in blank}}
        aggregation = Aggregation(self.dispatch, combiner.aggregator, request, deadline, trace,
                                   role=combiner.call_role, unable=self.decider.unable, failed=failed)
        if direct or tools:
            # The top-weight answer stands, its agreement read as ``top1`` reads it (the configured extractors).
            combined = self.combiner_for(TopOne.name).combine(answers)
        else:
            combined = await combiner.acombine(request.query_text(), answers, aggregation,
                                               history=request.history(), after=request.after_question())
        if blank:
            combined = replace(combined, contributions=[
                *combined.contributions, *(Contribution(expert=r.expert, weight=0.0, agreed=False) for r in blank)])
        trace.contributions = combined.contributions
        if combined.fallback is not None:
            trace.combiner_fallback = {"to": combiner.fallback_to, **combined.fallback.to_dict()}
        chosen = aggregation.reply or next(r for _, r in replies if r.expert == combined.expert)
        return combined, chosen

    def _panel_despite_breakers(self, decision: RouteDecision, ranking: list[str]) -> list[WeightedExpert]:
        """The panel the gate's top-k would choose from ``ranking`` (the experts able to serve the request) were
        no breaker open."""
        scores = {n: decision.scores[n] for n in ranking if n in decision.scores}
        if not scores:
            return []
        panel = capped(choose(scores, self.config.gate.top_k), self.config.fallback.max_attempts)
        return [WeightedExpert(expert=n, weight=w) for n, w in panel]

    def _panel_calls(self, called: list[WeightedExpert], request: ChatRequest, deadline: Deadline,
                     trace: Trace) -> list[Awaitable[ExpertReply | ExpertError]]:
        """The panel's concurrent calls. With a cost budget, each member's estimate stays reserved while it works
        (``running``), so a member that is itself a router gets what is left after its siblings still working;
        one done has its spend in the trace instead."""
        if deadline.budget_usd is None:
            return [self.dispatch.call(p.expert, p.weight, request, deadline, trace) for p in called]
        running = {p.expert: self.dispatch.estimate(p.expert, request) for p in called}

        async def member(p: WeightedExpert) -> ExpertReply | ExpertError:
            try:
                return await self.dispatch.call(p.expert, p.weight, request, deadline, trace, running=running)
            finally:
                running.pop(p.expert, None)

        return [member(p) for p in called]

    def _within_budget(self, panel: list[WeightedExpert], request: ChatRequest, trace: Trace,
                       deadline: Deadline) -> tuple[list[WeightedExpert], list[ExpertError]]:
        """The panel members to call, and the cause of each one left out for the cost budget.

        The top-weight member is always called: it is the request's first call, free as a stream's is. Members
        run concurrently, so none has reported its cost when the next is checked: each is checked against what
        the members before it are estimated to spend. A member left out gets a ``budget_exhausted`` attempt in
        the trace (as an open breaker's refusal does), so an answered request still says who was not asked.
        """
        if deadline.budget_usd is None:
            return panel, []
        called: list[WeightedExpert] = []
        left_out: list[ExpertError] = []
        reserved = 0.0
        for member in panel:
            spent = self.dispatch.over_budget(member.expert, trace, request, deadline, reserved) if called else None
            if spent is None:
                called.append(member)
                reserved += self.dispatch.estimate(member.expert, request)
            else:
                left_out.append(spent)
                trace.attempts.append(Attempt(expert=member.expert, weight=member.weight, ok=False,
                                              error=spent.to_dict()))
        return called, left_out

    async def _fall_back(self, request: ChatRequest, ranking: list[str], called: list[WeightedExpert], tried: int,
                         deadline: Deadline, trace: Trace, errors: list[ExpertError],
                         ) -> tuple[list[tuple[WeightedExpert, ExpertReply]], str | None]:
        """Walk the gate's ranking one expert at a time (``router.walk``) until one answers or a limit is reached;
        each failure goes into ``errors``. Returns the answer, if any, and why fallback stopped when a limit
        stopped it. ``called``: the panel members that were called; ``tried`` counts those not skipped.

        A panel member left out for the cost budget was never called, and the members that were called all
        failed, which costs nothing: it stays a candidate in its place in the ranking, weighed against the budget
        afresh, and its earlier ``budget_exhausted`` cause gives way to what happens to it now. One that fallback
        stops before reaching keeps that cause."""
        taken = {p.expert for p in called}
        left_out = {e.expert: e for e in errors if isinstance(e, BudgetSpent)}
        # Whom the next expert replaces (``fallback_for``): the first panel member whose call failed, else the
        # first passed over (an open breaker, a full in-flight limit), as a stream names its first in line.
        failed = next((e.expert for e in errors if e.expert in taken and not skipped(e)),
                      called[0].expert if called else None)
        walk = Walk(self.config.fallback, self.dispatch, deadline, trace, errors, tried=tried, replaces=failed)
        while (name := next_candidate(ranking, taken)) is not None:
            stop = walk.stop()
            if stop is not None:
                errors.extend(stop.untried(ranking, taken | left_out.keys()))
                return [], stop.reason
            taken.add(name)
            if name in left_out:
                errors.remove(left_out.pop(name))
            # When every member was passed over without a call (an open breaker, a full in-flight limit), the next
            # in line is the request's first call, free as in the panel and a stream.
            if not walk.affordable(name, request):
                continue
            result = await self.dispatch.call(name, 1.0, request, deadline, trace, replaces=walk.replaces)
            if isinstance(result, ExpertReply):
                return [(WeightedExpert(expert=name, weight=1.0), result)], None
            walk.failed(name, result)
        return [], None

    # -- streaming ------------------------------------------------------------------------------------------
    def _stream_order(self, decision: RouteDecision | None, panel: list[WeightedExpert],
                      ranking: list[str]) -> list[str]:
        first = [panel[0].expert] if panel else []
        if decision is None:
            return first or ranking[:1]
        return first + [n for n in ranking if n not in first]  # with fallback off, only one is called (Walk.stop)

    async def stream(self, request: ChatRequest, *, on_trace: Callable[[Trace], None] | None = None,
                     caller: CallScope | None = None) -> AsyncGenerator[StreamPiece | StreamEnd, None]:
        """Stream from the top-weighted expert, falling back or continuing elsewhere on failure
        (``router.streaming``). ``on_trace`` and ``caller``: as for ``complete``; a stream closed early keeps its
        last try in the trace, with what it streamed."""
        with self.serving():
            start = time.perf_counter()
            deadline = self._limits(caller, stream=True)
            decision, panel, ranking = await self._plan(request)
            trace = Trace(decision=decision, combiner="stream")
            if on_trace is not None:
                on_trace(trace)
            walk = Walk(self.config.fallback, self.dispatch, deadline, trace, [])
            order = self._stream_order(decision, panel, ranking)
            async with aclosing(stream_answer(walk, order, request, start, self._route_failed)) as events:
                async for event in events:
                    yield event

    async def aclose(self) -> None:
        await self.decider.aclose()
        await asyncio.gather(*(e.aclose() for e in self.experts.values()))


def _called_and_failed(errors: Sequence[ExpertError]) -> dict[str, ExpertError]:
    """The experts a call with the client's request reached and failed (not one skipped for its breaker, its
    in-flight limit or the cost budget, nor one fallback never reached), with the error each gave last."""
    return {e.expert: e for e in errors if not skipped(e) and not isinstance(e, BudgetSpent | NotTried)}
