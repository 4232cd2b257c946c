"""The orchestrator: gate -> dispatch -> fallback -> combine, with a trace of everything it did.

It holds small parts (a gate, the experts, a combiner, the fallback settings) and wires them; the decisions
themselves live in ``topk``, ``fallback`` and ``combine``, which are pure.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from experts.base import Expert
from experts.errors import ExpertError, ExpertOverloaded, ExpertTimeout
from experts.types import ChatMessage, ChatRequest, ExpertReply, StreamDelta, Usage
from router.combine import Combiner, WeightedAnswer, build_combiner
from router.config import RouterConfig
from router.fallback import AllExpertsFailed, Deadline, next_candidate
from router.topk import choose, rank
from router.trace import Attempt, RoutedAnswer, RouteDecision, Trace, WeightedExpert

__all__ = ["GateLike", "Orchestrator", "StreamEnd", "StreamPiece", "UnknownExpert"]

CONTINUE_PROMPT = "Continue your previous answer exactly where it stopped, without repeating any of it."


class EncoderLike(Protocol):
    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


class GateLike(Protocol):
    """What the orchestrator needs of a gate: a probability per expert, and the examples behind it."""

    experts: list[str]

    @property
    def encoder(self) -> EncoderLike: ...

    def predict_proba(self, embeddings: np.ndarray) -> np.ndarray: ...

    def nearest(self, embedding: np.ndarray, k: int = 3) -> Sequence[Any]: ...


class UnknownExpert(KeyError):
    def __init__(self, name: str, known: Sequence[str]) -> None:
        super().__init__(name)
        self.name = name
        self.known = list(known)

    def __str__(self) -> str:
        return f"unknown model {self.name!r}; known: {', '.join(self.known)}"


@dataclass
class StreamPiece:
    expert: str
    delta: StreamDelta


@dataclass
class StreamEnd:
    trace: Trace
    finish_reason: str


class _Capacity:
    """In-flight calls per expert. A saturated expert is skipped, so its queries go to the next by weight."""

    def __init__(self, limits: Mapping[str, int]) -> None:
        self.limits = dict(limits)
        self.in_flight = dict.fromkeys(limits, 0)

    def acquire(self, name: str) -> None:
        if self.in_flight[name] >= self.limits[name]:
            raise ExpertOverloaded(name, f"{self.limits[name]} calls already in flight")
        self.in_flight[name] += 1

    def release(self, name: str) -> None:
        self.in_flight[name] -= 1


class Orchestrator:
    def __init__(self, config: RouterConfig, gate: GateLike, experts: Mapping[str, Expert],
                 combiner: Combiner | None = None) -> None:
        missing = [n for n in config.expert_names if n not in experts]
        if missing:
            raise ValueError(f"experts not built: {', '.join(missing)}")
        self.config = config
        self.gate = gate
        self.experts = dict(experts)
        self.combiner = combiner or build_combiner(config.combiner.strategy, config.combiner.extractor)
        self.capacity = _Capacity({e.name: e.max_concurrency for e in config.experts})

    # -- deciding -------------------------------------------------------------------------------------------
    def decide_sync(self, text: str) -> RouteDecision:
        start = time.perf_counter()
        # One embedding serves both the scores and the explanation.
        embedding = self.gate.encoder.encode([text])
        probs = self.gate.predict_proba(embedding)[0]
        scores = {name: float(p) for name, p in zip(self.gate.experts, probs, strict=True) if name in self.experts}
        panel = choose(scores, self.config.gate.top_k)
        decision = RouteDecision(
            scores=scores,
            ranking=[n for n, _ in rank(scores)],
            chosen=[WeightedExpert(expert=n, weight=w) for n, w in panel],
            policy=self.config.gate.top_k.policy,
            nearest=[_as_dict(n) for n in self.gate.nearest(embedding[0], 3)],
            gate_ms=(time.perf_counter() - start) * 1000.0,
        )
        return decision

    async def decide(self, request: ChatRequest) -> RouteDecision:
        # The encoder is CPU work; keep it off the event loop.
        return await asyncio.to_thread(self.decide_sync, request.query_text())

    def is_routed(self, model: str) -> bool:
        return model in ("auto", self.config.service.name)

    async def _plan(self, request: ChatRequest) -> tuple[RouteDecision | None, list[WeightedExpert], list[str]]:
        """The panel to ask first and the ranking fallback walks. An expert named directly gets no fallback."""
        if self.is_routed(request.model):
            decision = await self.decide(request)
            return decision, decision.chosen, decision.ranking
        if request.model not in self.experts:
            raise UnknownExpert(request.model, ["auto", self.config.service.name, *self.experts])
        return None, [WeightedExpert(expert=request.model, weight=1.0)], [request.model]

    # -- calling --------------------------------------------------------------------------------------------
    async def _call(self, name: str, request: ChatRequest, deadline: Deadline) -> ExpertReply:
        expert = self.experts[name]
        timeout = deadline.attempt_timeout(expert.config.timeout_s)
        if timeout <= 0:
            raise ExpertTimeout(name, "the request's deadline has passed")
        self.capacity.acquire(name)
        try:
            return await asyncio.wait_for(expert.generate(request), timeout)
        except TimeoutError:
            raise ExpertTimeout(name, f"no answer within {timeout:.1f}s") from None
        finally:
            self.capacity.release(name)

    async def _attempt(self, name: str, weight: float, request: ChatRequest, deadline: Deadline,
                       trace: Trace, replaces: str | None = None) -> ExpertReply | ExpertError:
        start = time.perf_counter()
        try:
            reply = await self._call(name, request, deadline)
        except ExpertError as exc:
            trace.attempts.append(Attempt(expert=name, weight=weight, ok=False, error=exc.to_dict(),
                                          latency_ms=(time.perf_counter() - start) * 1000.0, fallback_for=replaces))
            return exc
        trace.attempts.append(Attempt(expert=name, weight=weight, ok=True, usage=reply.usage,
                                      cost_usd=reply.cost_usd, latency_ms=(time.perf_counter() - start) * 1000.0,
                                      fallback_for=replaces))
        return reply

    async def complete(self, request: ChatRequest, *, strategy: str | None = None) -> RoutedAnswer:
        """Answer one request: ask the panel concurrently, fall back down the ranking, combine what came back."""
        start = time.perf_counter()
        decision, panel, ranking = await self._plan(request)
        trace = Trace(decision=decision)
        deadline = Deadline(self.config.fallback.deadline_s)
        combiner = build_combiner(strategy, self.config.combiner.extractor) if strategy else self.combiner
        trace.combiner = combiner.name
        results = await asyncio.gather(*(self._attempt(p.expert, p.weight, request, deadline, trace) for p in panel))
        replies = [(p, r) for p, r in zip(panel, results, strict=True) if isinstance(r, ExpertReply)]
        errors = [r for r in results if isinstance(r, ExpertError)]
        if not replies and decision is not None and self.config.fallback.enabled:
            replies, errors = await self._fall_back(request, ranking, panel, deadline, trace, errors)
        if not replies:
            raise AllExpertsFailed(errors)
        total = sum(p.weight for p, _ in replies) or 1.0
        answers = [WeightedAnswer(r.expert, p.weight / total, r.content) for p, r in replies]
        combined = combiner.combine(answers)
        trace.contributions = combined.contributions
        trace.latency_ms = (time.perf_counter() - start) * 1000.0
        chosen = next(r for _, r in replies if r.expert == combined.expert)
        return RoutedAnswer(content=combined.content, expert=combined.expert, finish_reason=chosen.finish_reason,
                            tool_calls=chosen.tool_calls, trace=trace)

    async def _fall_back(self, request: ChatRequest, ranking: list[str], panel: list[WeightedExpert],
                         deadline: Deadline, trace: Trace, errors: list[ExpertError],
                         ) -> tuple[list[tuple[WeightedExpert, ExpertReply]], list[ExpertError]]:
        """Walk the gate's ranking one expert at a time until one answers or the budget is spent."""
        taken = {p.expert for p in panel}
        failed = panel[0].expert
        while len(taken) < self.config.fallback.max_attempts and deadline.remaining > 0:
            name = next_candidate(ranking, taken)
            if name is None:
                break
            taken.add(name)
            result = await self._attempt(name, 1.0, request, deadline, trace, replaces=failed)
            if isinstance(result, ExpertReply):
                return [(WeightedExpert(expert=name, weight=1.0), result)], errors
            errors.append(result)
            failed = name
        return [], errors

    # -- streaming ------------------------------------------------------------------------------------------
    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamPiece | StreamEnd]:
        """Stream from the top-weighted expert. A failure before the first token falls back invisibly; a
        failure mid-stream continues from the next expert, and the switch is recorded in the trace."""
        start = time.perf_counter()
        decision, panel, ranking = await self._plan(request)
        trace = Trace(decision=decision, combiner="stream")
        deadline = Deadline(self.config.fallback.deadline_s)
        order = [panel[0].expert] + [n for n in ranking if n != panel[0].expert]
        if decision is None or not self.config.fallback.enabled:
            order = order[:1]
        order = order[: self.config.fallback.max_attempts]
        sent: list[str] = []
        errors: list[ExpertError] = []
        previous: str | None = None
        for name in order:
            if deadline.remaining <= 0:
                break
            if trace.switches and "to" not in trace.switches[-1]:
                trace.switches[-1]["to"] = name
            attempt_request = _continuation(request, "".join(sent)) if sent else request
            outcome = _StreamOutcome()
            async for piece in self._stream_one(name, attempt_request, deadline, outcome):
                sent.append(piece.delta.content)
                yield piece
            trace.attempts.append(outcome.attempt(name, replaces=previous))
            if outcome.error is None:
                trace.latency_ms = (time.perf_counter() - start) * 1000.0
                yield StreamEnd(trace=trace, finish_reason=outcome.finish_reason)
                return
            errors.append(outcome.error)
            if sent:
                # Text already reached the client: the next expert continues it rather than starting over.
                trace.switches.append({"from": name, "after_chars": len("".join(sent)), "cause": outcome.error.kind})
            previous = name
        raise AllExpertsFailed(errors)

    async def _stream_one(self, name: str, request: ChatRequest, deadline: Deadline,
                          outcome: _StreamOutcome) -> AsyncIterator[StreamPiece]:
        expert = self.experts[name]
        started = time.perf_counter()
        try:
            self.capacity.acquire(name)
        except ExpertError as exc:
            outcome.error = exc
            return
        try:
            iterator = expert.stream(request).__aiter__()
            while True:
                timeout = deadline.attempt_timeout(expert.config.timeout_s)
                try:
                    delta = await asyncio.wait_for(iterator.__anext__(), timeout) if timeout > 0 else None
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    delta = None
                if delta is None:
                    raise ExpertTimeout(name, f"stream stalled for {timeout:.1f}s")
                if delta.usage is not None:
                    outcome.usage = delta.usage
                    outcome.cost = delta.cost_usd if delta.cost_usd is not None else expert.cost(delta.usage)
                if delta.finish_reason:
                    outcome.finish_reason = delta.finish_reason
                if delta.content or delta.tool_calls:
                    outcome.chars += len(delta.content)
                    yield StreamPiece(expert=name, delta=StreamDelta(content=delta.content,
                                                                    tool_calls=delta.tool_calls))
        except ExpertError as exc:
            outcome.error = exc
        finally:
            self.capacity.release(name)
            outcome.latency_ms = (time.perf_counter() - started) * 1000.0

    async def aclose(self) -> None:
        await asyncio.gather(*(e.aclose() for e in self.experts.values()))


@dataclass
class _StreamOutcome:
    """What one streaming attempt did, filled in as its deltas arrive."""

    error: ExpertError | None = None
    chars: int = 0
    finish_reason: str = "stop"
    usage: Usage | None = None
    cost: float = 0.0
    latency_ms: float = 0.0

    def attempt(self, name: str, replaces: str | None) -> Attempt:
        return Attempt(expert=name, weight=1.0, ok=self.error is None, latency_ms=self.latency_ms,
                       usage=self.usage or Usage(), cost_usd=self.cost,
                       error=self.error.to_dict() if self.error else None, fallback_for=replaces)


def _as_dict(neighbour: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(neighbour) and not isinstance(neighbour, type):
        return dataclasses.asdict(neighbour)
    return dict(neighbour)


def _continuation(request: ChatRequest, partial: str) -> ChatRequest:
    """The request the next expert gets after a mid-stream failure: the partial answer, then a request to go on."""
    messages = [*request.messages, ChatMessage(role="assistant", content=partial),
                ChatMessage(role="user", content=CONTINUE_PROMPT)]
    return request.model_copy(update={"messages": messages})
