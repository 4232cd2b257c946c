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

Streaming: the top-weighted expert streams. A failure before its first token is retried or falls back
invisibly. A failure mid-stream continues from the next expert, which is shown the partial answer and asked to
go on, within what is left of the client's token limit (the cost budget prices that continuation, as sent); the
switch is recorded in ``trace.switches`` and so in
the stream's final chunk (``moe.switches``), its ``to`` naming the expert that did continue (the next one in
line may be skipped or fail first). A stream that
fails once a tool-call delta has reached the client is not continued: see ``_stream``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Collection, Iterator, Mapping, Sequence
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from experts.base import Expert
from experts.errors import ExpertConfigError, ExpertError
from experts.types import ChatMessage, ChatRequest, ExpertReply
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
from router.decide import Decider, GateLike, NoCapableExpert, blocking_capabilities, needed_capabilities
from router.dispatch import Capacity, Dispatcher, StreamOutcome, StreamPiece, skipped
from router.errors import error_body
from router.fallback import AllExpertsFailed, BudgetSpent, CallScope, Deadline, next_candidate
from router.retry import RetryPolicy
from router.topk import capped, choose
from router.trace import Attempt, AttemptRole, Contribution, RoutedAnswer, RouteDecision, Trace, WeightedExpert
from router.vote_weights import VoteWeights

__all__ = ["GateLike", "NoCapableExpert", "NotTried", "Orchestrator", "RouteFailed", "StreamEnd", "StreamPiece",
           "UnknownExpert"]

CONTINUE_PROMPT = "Continue your previous answer exactly where it stopped, without repeating any of it."


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


class NotTried(ExpertError):
    """A candidate expert fallback never reached: the deadline passed, or ``max_attempts`` experts were tried."""

    kind = "not_tried"


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


@dataclass
class StreamEnd:
    trace: Trace
    finish_reason: str


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
        # With fallback off, a panel passed over whole (full in-flight limits, open breakers) still hands the
        # query to the next by weight: only one expert is called, as fallback off means (``_may_call``).
        if not replies and decision is not None and (self.config.fallback.enabled or not tried):
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
        with this request failed, which ``escalate`` does not ask again (``_Aggregation``)."""
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
        aggregation = _Aggregation(self.dispatch, combiner.aggregator, request, deadline, trace,
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
        """Walk the gate's ranking one expert at a time until one answers or a limit is reached; each failure
        goes into ``errors``. Returns the answer, if any, and why fallback stopped when a limit stopped it.
        ``called``: the panel members that were called; ``tried`` counts those not skipped.

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
        while (name := next_candidate(ranking, taken)) is not None:
            if not self._may_call(tried):
                return [], None
            stop = self._stop(tried, deadline)
            if stop is not None:
                errors.extend(_untried(ranking, taken | left_out.keys(), stop))
                return [], stop.reason
            taken.add(name)
            if name in left_out:
                errors.remove(left_out.pop(name))
            # The request's first call is free, as in the panel and a stream: when every member was passed over
            # without a call (an open breaker, a full in-flight limit), the next in line is that first call.
            spent = self.dispatch.over_budget(name, trace, request, deadline) if tried else None
            if spent is not None:  # this one would not fit; a cheaper one further down the ranking may
                _passed_over(spent, errors, trace, failed)
                continue
            result = await self.dispatch.call(name, 1.0, request, deadline, trace, replaces=failed)
            if isinstance(result, ExpertReply):
                return [(WeightedExpert(expert=name, weight=1.0), result)], None
            errors.append(result)
            if not skipped(result):
                tried += 1
                failed = name
            else:
                failed = failed or name
        return [], None

    def _may_call(self, tried: int) -> bool:
        """Whether another expert may be called after ``tried`` calls failed: with fallback off, only the first
        call is made (experts passed over without a call hand the query on, as with fallback on)."""
        return self.config.fallback.enabled or not tried

    def _stop(self, tried: int, deadline: Deadline) -> _Stop | None:
        """Why fallback may try no further expert (the deadline passed, ``max_attempts`` were tried); None
        while it may."""
        if deadline.remaining <= 0:
            at = "when the caller's time for the stream's first output ran out," if deadline.first_output_due else \
                f"at the request's deadline of {deadline.seconds:g}s"
            return _Stop("deadline reached", f"fallback stopped {at} with no complete answer")
        limit = self.config.fallback.max_attempts
        if tried >= limit:
            return _Stop(f"max_attempts {limit} used", f"fallback stopped after max_attempts ({limit}) experts "
                                                        "failed")
        return None

    # -- streaming ------------------------------------------------------------------------------------------
    def _stream_order(self, decision: RouteDecision | None, panel: list[WeightedExpert],
                      ranking: list[str]) -> list[str]:
        first = [panel[0].expert] if panel else []
        if decision is None:
            return first or ranking[:1]
        return first + [n for n in ranking if n not in first]  # with fallback off, only one is called (_may_call)

    async def stream(self, request: ChatRequest, *, on_trace: Callable[[Trace], None] | None = None,
                     caller: CallScope | None = None) -> AsyncGenerator[StreamPiece | StreamEnd, None]:
        """Stream from the top-weighted expert, falling back or continuing elsewhere on failure. ``on_trace`` and
        ``caller``: as for ``complete``; a stream closed early keeps its last try in the trace, with what it
        streamed."""
        with self.serving():
            async with aclosing(self._stream(request, on_trace, caller)) as events:
                async for event in events:
                    yield event

    async def _stream(self, request: ChatRequest, on_trace: Callable[[Trace], None] | None,
                      caller: CallScope | None) -> AsyncGenerator[StreamPiece | StreamEnd, None]:
        start = time.perf_counter()
        deadline = self._limits(caller, stream=True)
        decision, panel, ranking = await self._plan(request)
        trace = Trace(decision=decision, combiner="stream")
        if on_trace is not None:
            on_trace(trace)
        sent: list[str] = []
        used = 0  # tokens of the client's limit the tries that broke off used (``_tokens_used``)
        chars: dict[str, int] = {}  # characters each expert streamed to the client, in the order they streamed
        errors: list[ExpertError] = []
        previous: str | None = None
        tried = 0
        order = self._stream_order(decision, panel, ranking)
        attempt_request = request  # after a mid-stream failure: the continuation of what was sent
        for i, name in enumerate(order):
            if not self._may_call(tried):
                break
            # The first in line is called even when the deadline is already spent, as a request's panel is: its
            # call fails as a timeout, so a nested router out of time reads as one either way (``timed_out``).
            stop = self._stop(tried, deadline) if i else None
            if stop is not None:
                errors.extend(_untried(order[i:], (), stop))
                raise self._route_failed(errors, trace, stop.reason)
            # The first try is free. Later ones are priced as sent: after a mid-stream failure, the continuation,
            # whose prompt holds the partial answer and whose token limit is only what is left of the client's.
            spent = self.dispatch.over_budget(name, trace, attempt_request, deadline) if tried else None
            if spent is not None:  # this one would not fit; a cheaper one further down the ranking may
                _passed_over(spent, errors, trace, previous)
                continue
            outcome = StreamOutcome()
            async with aclosing(self.dispatch.stream(name, attempt_request, deadline, trace, previous)) as events:
                async for event in events:
                    if isinstance(event, StreamOutcome):
                        outcome = event
                    else:
                        if event.delta.reasoning_content and any(sent):
                            # Continuing an answer whose text the client already has: reasoning comes before the
                            # text, so the continuing expert's own is left out rather than sent after it.
                            event = StreamPiece(event.expert, replace(event.delta, reasoning_content=""))
                            if not event.delta.has_output():
                                continue
                        _continued_by(trace, name)
                        sent.append(event.delta.content)
                        chars[name] = chars.get(name, 0) + len(event.delta.content)
                        deadline.output_sent()  # a caller's limit for the first output is met
                        yield event
            if outcome.error is None:
                _continued_by(trace, name)
                yield _stream_end(trace, chars, name, start, outcome.finish_reason)
                return
            errors.append(outcome.error)
            if skipped(outcome.error):
                # Not called, so not tried; the expert first in line still names whom the next one replaces
                # (``fallback_for``), as in ``_fall_back``, where the panel's first member does.
                previous = previous or name
                continue
            tried += 1
            structured = constrained(request) and any(sent)
            if outcome.tool_deltas or outcome.refusal_deltas or structured:
                # Part of a tool call (its id, name, argument fragments) reached the client. Another expert cannot
                # finish it: it would start a call of its own, whose deltas the client would merge into the
                # half-sent one, corrupting it. Nor a refusal: another expert would answer after it, or refuse in
                # its own words. Nor an answer held to a format (response_format's JSON, vLLM's guided decoding):
                # the next expert, held to it too, writes a whole object of its own after the half-sent one. The
                # stream ends here instead, with an error event that names the expert and the cause; the client
                # still has what was sent, and knows it is incomplete. (An earlier expert's would have ended it.)
                what = ("a tool call" if outcome.tool_deltas else "a refusal" if outcome.refusal_deltas
                        else "an answer held to a format (response_format)")
                raise self._route_failed(errors, trace, f"the stream from expert {name!r} broke off after part of "
                                                        f"{what} reached the client; another expert cannot continue "
                                                        f"{what}, so the stream ends here")
            if outcome.sent:
                # Its text reached the client: the next expert continues it rather than starting over.
                used += _tokens_used(outcome)
                continued = _continuation(request, sent, used)
                if continued is None:
                    # It broke off after sending the whole token limit the client asked for: the answer is as
                    # long as it may be, so it ends here, as a stream cut off by max_tokens would.
                    yield _stream_end(trace, chars, name, start, "length")
                    return
                attempt_request = continued
                trace.switches.append({"from": name, "after_chars": len("".join(sent)), "cause": outcome.error.kind})
            previous = name
        raise self._route_failed(errors, trace)

    async def aclose(self) -> None:
        await self.decider.aclose()
        await asyncio.gather(*(e.aclose() for e in self.experts.values()))


class _Aggregation:
    """A combiner's one model call (``fuse``'s aggregator, ``escalate``'s expert): that expert asked through the
    dispatcher, so its breaker, in-flight limit, time limit and retries apply, within the request's deadline and
    cost budget. ``reply`` is its reply once it answered."""

    def __init__(self, dispatch: Dispatcher, expert: str | None, request: ChatRequest, deadline: Deadline,
                 trace: Trace, role: AttemptRole = "aggregate", *,
                 unable: Callable[[ChatRequest], Collection[str]] = lambda _: (),
                 failed: Mapping[str, ExpertError] | None = None) -> None:
        """``unable``: the experts that cannot serve a request (``Decider.unable``); ``failed``: the experts whose
        call with the client's request already failed, and the error each gave."""
        self.dispatch, self.expert, self.request = dispatch, expert, request
        self.deadline, self.trace, self.role = deadline, trace, role
        self.unable, self.failed = unable, dict(failed or {})
        self.reply: ExpertReply | None = None

    async def __call__(self, messages: list[ChatMessage] | None) -> str:
        """Ask with ``messages``, or with the client's own messages when None. Raises the ``ExpertError`` that
        stands in for the answer when there is none to use: the call failed, would not fit the cost budget, the
        expert lacks a capability the request needs (an image, and it does not declare ``vision``), it already
        failed the client's own request (asking again would be a retry ``fallback.retries`` did not allow), or it
        answered with no text."""
        if self.expert is None:
            raise ExpertConfigError("combiner", "no aggregator expert is configured")
        # Asked with the client's own request (escalate), it is that request whole, tools included: the expert
        # answers as the panel was asked to, a tool call being one answer; so the capabilities it needs are the
        # request's. Fuse's aggregator gets its prompt, without the tools (it writes an answer from the panel's).
        request = (self.request.model_copy(update={"stream": False}) if messages is None
                   else _aggregation_request(self.request, messages))
        if messages is None and self.expert in self.failed:
            raise self.failed[self.expert]
        if self.expert in self.unable(request):
            needs = " and ".join(repr(n) for n in needed_capabilities(request))
            raise ExpertConfigError(self.expert, f"not asked: the request needs the {needs} capability, which this "
                                                 "expert does not declare")
        spent = self.dispatch.over_budget(self.expert, self.trace, request, self.deadline)
        if spent is not None:
            raise spent
        result = await self.dispatch.call(self.expert, 0.0, request, self.deadline, self.trace, role=self.role)
        if isinstance(result, ExpertError):
            raise result
        if not result.content.strip() and result.refusal is None and not result.tool_calls:
            raise EmptyAnswer(self.expert, "answered with no text")
        self.reply = result
        return result.content


def _called_and_failed(errors: Sequence[ExpertError]) -> dict[str, ExpertError]:
    """The experts a call with the client's request reached and failed (not one skipped for its breaker, its
    in-flight limit or the cost budget, nor one fallback never reached), with the error each gave last."""
    return {e.expert: e for e in errors if not skipped(e) and not isinstance(e, BudgetSpent | NotTried)}


# vLLM's request fields that hold an answer to a grammar, besides OpenAI's response_format.
_GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs")


def constrained(request: ChatRequest) -> bool:
    """Whether ``request`` holds its answer to a format: ``response_format`` a JSON object or schema, or one of
    vLLM's guided-decoding fields. Such an answer cannot be spliced from two experts' halves."""
    extra = request.model_extra or {}
    fmt = extra.get("response_format")
    json_format = isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema")
    return json_format or any(extra.get(key) is not None for key in _GUIDED)


def _aggregation_request(request: ChatRequest, messages: list[ChatMessage]) -> ChatRequest:
    """The aggregator's request: the fuse prompt, with the client's sampling settings and without its tools (the
    aggregator writes an answer; None drops a field from the upstream body)."""
    return request.model_copy(update={"messages": messages, "stream": False, "tools": None, "tool_choice": None,
                                      "parallel_tool_calls": None})


@dataclass(frozen=True)
class _Stop:
    """Why fallback stopped before trying every candidate: the cause each untried one is listed with, and the
    reason the 503 gives."""

    cause: str
    reason: str


def _passed_over(spent: BudgetSpent, errors: list[ExpertError], trace: Trace, replaces: str | None) -> None:
    """Fallback passes over a candidate the cost budget cannot fit: its cause joins the request's causes, and the
    trace lists it, so an answered request still says who was not asked."""
    errors.append(spent)
    trace.attempts.append(Attempt(expert=spent.expert, ok=False, error=spent.to_dict(), fallback_for=replaces))



def _untried(candidates: Sequence[str], taken: Collection[str], stop: _Stop) -> list[ExpertError]:
    return [NotTried(n, f"not tried: {stop.cause}") for n in candidates if n not in taken]


def _streamed(chars: Mapping[str, int], last: str) -> list[Contribution]:
    """A streamed answer's contributions: each expert whose text reached the client, weighted by its share of
    the characters, in the order they streamed (the expert that finished it alone when nothing else was sent).
    Each agreed with the answer, since its text is part of it."""
    total = sum(chars.values())
    if total == 0:
        return [Contribution(expert=last, weight=1.0, agreed=True)]
    return [Contribution(expert=e, weight=n / total, agreed=True) for e, n in chars.items() if n]


def _continued_by(trace: Trace, name: str) -> None:
    """Name ``name`` as the expert that took over after the last mid-stream switch, once it has sent something
    or finished: the next expert in line may have been skipped or failed before it."""
    if trace.switches and "to" not in trace.switches[-1]:
        trace.switches[-1]["to"] = name


def _stream_end(trace: Trace, chars: dict[str, int], last: str, start: float, finish_reason: str) -> StreamEnd:
    """The end of a stream whose last piece came from ``last``: each expert's share of the text, and the time."""
    trace.contributions = _streamed(chars, last)
    trace.latency_ms = (time.perf_counter() - start) * 1000.0
    return StreamEnd(trace=trace, finish_reason=finish_reason)


def _tokens_used(outcome: StreamOutcome) -> int:
    """The tokens a try that broke off generated: its usage so far where the expert counted it (vLLM's running
    usage), else a token per delta it sent, an undercount where a server sends no delta for a token that
    completes no character."""
    if outcome.usage is not None and not outcome.usage_estimated:
        return max(outcome.usage.completion_tokens, outcome.deltas)
    return outcome.deltas


def _continuation(request: ChatRequest, sent: Sequence[str], used: int) -> ChatRequest | None:
    """The request the next expert gets after a mid-stream failure: the partial answer (the content deltas
    ``sent``), then a request to go on. The client's token limit (``max_tokens``, ``max_completion_tokens``)
    covers the whole answer, so the continuation may write only what is left of it after the ``used`` tokens
    the broken tries generated (``_tokens_used``). None when nothing is left.

    A reasoning delta counts as a token (it is one, within the limit) but is no part of the answer: an expert
    that broke off while still reasoning sent no text, so the next one answers the request afresh, reasoning of
    its own included, rather than continuing an empty answer."""
    text = "".join(sent)
    messages = [*request.messages, ChatMessage(role="assistant", content=text),
                ChatMessage(role="user", content=CONTINUE_PROMPT)] if text else request.messages
    update: dict[str, Any] = {"messages": messages}
    for field in ("max_tokens", "max_completion_tokens"):
        limit = getattr(request, field)
        if limit is not None:
            if limit - used < 1:
                return None
            update[field] = limit - used
    # vLLM's min_tokens is a floor on the whole answer too: left as it was, it would exceed the smaller limit
    # (vLLM refuses that with a 400) and ask for more than the answer still needs.
    floor = (request.model_extra or {}).get("min_tokens")
    if isinstance(floor, int) and not isinstance(floor, bool):
        limits = [update[f] for f in ("max_tokens", "max_completion_tokens") if f in update]
        update["min_tokens"] = max(0, min([floor - used, *limits]))
    return request.model_copy(update=update)
