"""Dispatch: one call to one expert, plain or streamed, with everything that guards it.

Around every try sit the expert's circuit breaker, its in-flight limit (a saturated expert raises
``ExpertOverloaded`` at once, so the query moves to the next by weight) and the attempt's time limit (the
expert's ``timeout_s``, cut short by the request's deadline). A transient failure is retried on the same expert
after a jittered backoff (``router.retry``), while the breaker, the deadline and the cost budget allow it. Every
try is one ``Attempt`` in the trace, numbered by its ``retry``; every retry is also one ``Retry`` in
``trace.retries``, with its cause and the wait before it. Which expert is asked, and what happens when it fails
for good, is the orchestrator's business.

``sleep`` and ``rand`` are injectable, so tests run the retry schedule without waiting.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Mapping
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from experts.base import Expert
from experts.errors import ExpertError, ExpertOverloaded, ExpertTimeout
from experts.types import ChatRequest, ExpertReply, StreamDelta, Usage
from router.breaker import Breakers, CircuitOpen, Outcome, classify
from router.fallback import CALL_SCOPE, BudgetSpent, CallScope, Deadline, budget_spent
from router.retry import RetryPolicy, retry_delay
from router.trace import Attempt, AttemptRole, Retry, Trace
from router.tracing import CALL_LIMIT, CallLimit

log = logging.getLogger("router.dispatch")

__all__ = ["CallCancelled", "Capacity", "Dispatcher", "StreamOutcome", "StreamPiece"]

# The answer length a cost estimate assumes for an expert that has not answered yet, when the request sets no
# max_tokens; its own answers then take over, as a moving mean (each new answer weighs COMPLETION_EWMA).
PRIOR_COMPLETION_TOKENS = 256
COMPLETION_EWMA = 0.2


_T = TypeVar("_T")


class Capacity:
    """In-flight calls per expert. A saturated expert is skipped, so its queries go to the next by weight."""

    def __init__(self, limits: Mapping[str, int], in_flight: dict[str, int] | None = None,
                 current: Mapping[str, int] | None = None) -> None:
        """``in_flight``: the counts to share, with the orchestrators of earlier configs (a hot reload's old one
        releases its calls into them); a fresh count by default. ``current``: the latest config's limits, shared
        likewise, which bind this config's calls too (a reload that lowers a limit holds at once for the calls of
        requests already under way); an expert the latest config does not have keeps ``limits``'."""
        self.limits = dict(limits)
        self.in_flight = {} if in_flight is None else in_flight
        self.current = current
        for name in limits:
            self.in_flight.setdefault(name, 0)

    def limit(self, name: str) -> int:
        """``name``'s limit now: the latest config's, else this one's."""
        if self.current is not None and name in self.current:
            return self.current[name]
        return self.limits[name]

    def acquire(self, name: str) -> None:
        limit = self.limit(name)
        if self.in_flight[name] >= limit:
            raise ExpertOverloaded(name, f"{limit} calls already in flight")
        self.in_flight[name] += 1

    def release(self, name: str) -> None:
        self.in_flight[name] -= 1

    def free(self, name: str) -> int:
        return max(0, self.limit(name) - self.in_flight[name])


async def _within(awaitable: Awaitable[_T], timeout: float) -> _T:
    """``awaitable``'s result, or ``TimeoutError`` after ``timeout`` seconds. Not ``asyncio.wait_for``: on Python
    3.11 it swallows a cancellation that arrives when the awaited step is already done (a stream whose next delta
    was buffered), so a client that left a fast stream had the router read the whole answer, paid and logged as
    a success; ``asyncio.timeout`` runs the step in this task and lets the cancellation through."""
    async with asyncio.timeout(timeout):
        return await awaitable


def skipped(error: ExpertError) -> bool:
    """Whether the expert was passed over without a call (its breaker is open, or its in-flight limit full), so
    the try does not count towards ``max_attempts``."""
    return isinstance(error, CircuitOpen | ExpertOverloaded)


@dataclass
class StreamPiece:
    expert: str
    delta: StreamDelta


class CallCancelled(ExpertError):
    """The call was cancelled before it ended: the client closed its connection (or the service stopped). Not
    the expert's failure: its breaker is not told (``_slot`` counts it as neutral), nor is it counted a failure
    in the metrics, but the trace keeps the attempt, with what the expert streamed counted as used."""

    kind = "cancelled"


@dataclass
class StreamOutcome:
    """What one streaming try did, filled in as its deltas arrive."""

    error: ExpertError | None = None
    chars: int = 0
    deltas: int = 0  # deltas passed on (text, tool calls, refusal, reasoning): a token each, as upstreams stream
    tool_deltas: int = 0  # deltas carrying tool calls: output the client has, though not text
    refusal_deltas: int = 0  # deltas carrying a refusal's text (OpenAI's ``delta.refusal``), likewise
    finish_reason: str = "stop"
    finished: bool = False  # the expert passed a finish_reason on: its answer is complete
    usage: Usage | None = None
    usage_estimated: bool = False
    cost: float = 0.0
    latency_ms: float = 0.0
    nested: dict[str, Any] | None = None
    # The call's scope: an expert that is itself a router leaves its trace there (``CallScope.inner``).
    scope: CallScope = field(default_factory=CallScope)

    @property
    def sent(self) -> bool:
        """Whether any output (text, a tool-call, refusal or reasoning delta) reached the client."""
        return bool(self.deltas)

    def estimate_usage(self, request: ChatRequest, expert: Expert) -> None:
        """A try that broke off (failed, or was cancelled) after sending output but before its usage chunk was
        still paid for what it generated and its prompt: without an estimate, the answer's usage and cost, and
        the metrics, would leave that out. A token per delta, and the prompt at about 4 characters a token. An
        expert that is itself a router knows what its own experts spent (its trace): that counts instead."""
        spent = self.scope.spent()
        # The inner trace, unless it holds less than reached the client (an inner stream not closed yet).
        if spent and spent["usage"].completion_tokens >= self.deltas:
            self.usage, self.cost, self.usage_estimated = spent["usage"], spent["cost_usd"], spent["usage_estimated"]
            self.nested = spent["nested"]
        elif self.usage is None and self.deltas:
            self.usage = Usage.counted(request.estimated_prompt_tokens(), self.deltas)
            self.cost, self.usage_estimated = expert.cost(self.usage), True

    def attempt(self, name: str, replaces: str | None, retry: int = 0) -> Attempt:
        return Attempt(expert=name, weight=1.0, ok=self.error is None, latency_ms=self.latency_ms,
                       usage=self.usage or Usage(), cost_usd=self.cost, usage_estimated=self.usage_estimated,
                       error=self.error.to_dict() if self.error else None, fallback_for=replaces, retry=retry,
                       nested=self.nested)


@dataclass(frozen=True)
class _Tried:
    """What the trace says of one plain try besides its outcome: the panel weight, the expert it replaced, its
    retry number and its role."""

    weight: float
    replaces: str | None
    retry: int
    role: AttemptRole

    def fields(self) -> dict[str, Any]:
        return {"weight": self.weight, "fallback_for": self.replaces, "retry": self.retry, "role": self.role}


@dataclass
class _Slot:
    # Half of what the expert would have had on its own (its timeout_s, or the whole deadline if shorter).
    fair_s: float
    started: float = field(default_factory=time.monotonic)
    # Set while the try runs: whether its time limit was the request's deadline rather than the expert's own.
    cut_by_deadline: bool = False
    sent: bool = False  # a stream passed output on

    def blames_expert(self) -> bool:
        """Whether a timeout the deadline cut short still counts against the expert: it had a fair chance (ran
        at least ``fair_s``) and, streaming, sent nothing. An expert that hangs through whole deadlines then
        opens its breaker, and fallback reaches the others; one asked with little time left, or cut off while
        it was writing, is not blamed."""
        return not self.sent and time.monotonic() - self.started >= self.fair_s


class Dispatcher:
    def __init__(self, experts: Mapping[str, Expert], capacity: Capacity, breakers: Breakers, retry: RetryPolicy,
                 *, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 rand: Callable[[], float] = random.random) -> None:
        self.experts = experts
        self.capacity = capacity
        self.breakers = breakers
        self.retry = retry
        self.sleep = sleep
        self.rand = rand
        self._completion: dict[str, float] = {}  # per expert: mean completion tokens of its answers (EWMA)

    def estimate(self, name: str, request: ChatRequest) -> float:
        """A call's cost before it is made: the prompt (about 4 characters a token) at the expert's input price,
        plus the answer at its output price: ``max_tokens`` when the request sets it, else the expert's typical
        answer length (``typical_completion``)."""
        completion = request.max_completion_tokens or request.max_tokens or self.typical_completion(name)
        return self.experts[name].cost(Usage(prompt_tokens=request.estimated_prompt_tokens(),
                                             completion_tokens=completion))

    def typical_completion(self, name: str) -> int:
        """Tokens the expert's answers run to: a running mean of its answers so far, ``PRIOR_COMPLETION_TOKENS``
        before the first. Without it, a request that sets no ``max_tokens`` would price each answer at nothing,
        and the cost budget would let through panels costing several times it."""
        return round(self._completion.get(name, PRIOR_COMPLETION_TOKENS))

    def _learn(self, name: str, usage: Usage | None) -> None:
        if usage is not None and usage.completion_tokens > 0:
            mean = self._completion.get(name)
            tokens = float(usage.completion_tokens)
            self._completion[name] = tokens if mean is None else mean + COMPLETION_EWMA * (tokens - mean)

    def over_budget(self, name: str, trace: Trace, request: ChatRequest, deadline: Deadline,
                    reserved_usd: float = 0.0) -> BudgetSpent | None:
        """The cause to report when a further call to ``name`` would not fit in the request's cost budget.

        A failed call costs nothing by our count unless it said what it was billed (``ExpertError.spent``, a
        nested router's spend), so what is spent is what answers and such failures reported, plus
        ``reserved_usd``: the estimates of calls made alongside this one whose cost is not known yet (a panel's
        other members). The budget is ``deadline.budget_usd``: the config's, or less for a nested router.
        """
        if deadline.budget_usd is None:
            return None
        estimate = self.estimate(name, request)
        if not budget_spent(deadline.budget_usd, trace.cost_usd + reserved_usd, estimate):
            return None
        reserved = f", ${reserved_usd:.6f} reserved for the panel's other members" if reserved_usd else ""
        # "is spent" only when it is: a call estimated past what is left "would exceed" it.
        state = "is spent" if trace.cost_usd + reserved_usd >= deadline.budget_usd else "would be exceeded"
        return BudgetSpent(name, f"not tried: the request's cost budget of ${deadline.budget_usd:g} {state} "
                                 f"(${trace.cost_usd:.6f} spent so far{reserved}, next call estimated at "
                                 f"${estimate:.6f})")

    async def call(self, name: str, weight: float, request: ChatRequest, deadline: Deadline, trace: Trace,
                   replaces: str | None = None, role: AttemptRole = "answer",
                   running: Mapping[str, float] | None = None) -> ExpertReply | ExpertError:
        """One expert's answer, or the error of its last call. ``role`` labels its attempts in the trace;
        ``running`` holds the estimated cost of each panel member called alongside and still working (an expert
        that is itself a router may spend only what is left of the budget after them: ``CallScope``; a member
        that is done has left it, its spend in the trace).

        A retry that finds the expert's breaker open or its in-flight limit full makes no call: the error is the
        failed call's before it, so the expert counts as tried (``max_attempts``) and its cause is what it did."""
        retry = 0
        failed: ExpertError | None = None
        while True:
            tried = _Tried(weight, replaces, retry, role)
            reserved = sum(cost for member, cost in (running or {}).items() if member != name)
            result = await self._try(name, request, deadline, trace, tried, reserved)
            if failed is not None and isinstance(result, ExpertError) and skipped(result):
                return failed
            if isinstance(result, ExpertReply) or not await self._backoff(name, result, retry, request, deadline,
                                                                          trace):
                return result
            failed = result
            retry += 1

    async def stream(self, name: str, request: ChatRequest, deadline: Deadline, trace: Trace,
                     replaces: str | None = None) -> AsyncGenerator[StreamPiece | StreamOutcome, None]:
        """The expert's pieces, then the outcome of its last try. Only a try that sent nothing is retried:
        once output (text or a tool-call delta) reached the client, what happens next is the orchestrator's. A
        retry that makes no call (``skipped``) ends it with the failed call's error, as in ``call``."""
        retry = 0
        failed: ExpertError | None = None
        while True:
            outcome = StreamOutcome(scope=CallScope(until=time.monotonic() + deadline.remaining,
                                                    budget_usd=deadline.budget_left(trace.cost_usd),
                                                    fair_s=self._fair_limit(name, deadline)))
            try:
                async with aclosing(self._stream_try(name, request, deadline, outcome)) as pieces:
                    async for piece in pieces:
                        yield piece
            except (GeneratorExit, asyncio.CancelledError):
                # The stream was closed while this try ran (the client left): the try goes into the trace, with
                # what it streamed so far, so the request's log line and the metrics count it.
                outcome.error = CallCancelled(name, "the stream was closed before the expert finished")
                outcome.estimate_usage(request, self.experts[name])
                trace.attempts.append(outcome.attempt(name, replaces, retry))
                raise
            trace.attempts.append(outcome.attempt(name, replaces, retry))
            if outcome.error is None:
                self._learn(name, outcome.usage)
            error = outcome.error
            if failed is not None and error is not None and skipped(error):
                outcome.error = failed  # a retry with no room made no call: the failed call's error stands
                yield outcome
                return
            if error is None or outcome.sent or not await self._backoff(name, error, retry, request, deadline,
                                                                         trace):
                yield outcome
                return
            failed = error
            retry += 1

    async def _backoff(self, name: str, error: ExpertError, retry: int, request: ChatRequest, deadline: Deadline,
                       trace: Trace) -> bool:
        """Wait before retrying ``name`` when the policy, its breaker and the budget allow; else False."""
        delay = retry_delay(self.retry, error, retry, deadline.remaining, self.rand,
                            timeout_s=self.experts[name].config.timeout_s)
        # The breaker is asked about the moment of the retry: a Retry-After it now holds ends by then.
        if delay is None or self.breakers.refuses(name, after_s=delay) or self.over_budget(name, trace, request,
                                                                                           deadline):
            return False
        trace.retries.append(Retry(expert=name, number=retry + 1, cause=error.kind, backoff_s=delay))
        await self.sleep(delay)
        return True

    @contextmanager
    def _slot(self, name: str, deadline: Deadline) -> Iterator[_Slot]:
        """Breaker permit and in-flight slot for one try; the breaker learns how it ended."""
        if deadline.remaining <= 0:
            raise ExpertTimeout(name, "the request's deadline has passed")
        permit = self.breakers.admit(name)
        slot = _Slot(fair_s=0.5 * self._fair_limit(name, deadline))
        error: ExpertError | None = None
        outcome: Outcome = "neutral"  # cancelled (the caller went away) unless set below
        try:
            self.capacity.acquire(name)
            try:
                yield slot
            finally:
                self.capacity.release(name)
            outcome = "success"
        except ExpertError as exc:
            error = exc
            # A timeout imposed by our own deadline says nothing about the expert, unless it had a fair chance.
            cut = slot.cut_by_deadline and isinstance(exc, ExpertTimeout) and not slot.blames_expert()
            outcome = "neutral" if cut else classify(exc)
            raise
        finally:
            self.breakers.finish(permit, error, outcome)

    def _fair_limit(self, name: str, deadline: Deadline) -> float:
        """What the expert would have had on its own: its timeout_s, or the whole deadline if shorter."""
        return min(self.experts[name].config.timeout_s, deadline.fair_seconds)

    def _timeout(self, expert: Expert, deadline: Deadline, slot: _Slot) -> float:
        timeout = deadline.attempt_timeout(expert.config.timeout_s)
        slot.cut_by_deadline = timeout < expert.config.timeout_s
        return timeout

    async def _try(self, name: str, request: ChatRequest, deadline: Deadline, trace: Trace,
                   tried: _Tried, reserved_usd: float = 0.0) -> ExpertReply | ExpertError:
        start = time.perf_counter()
        expert = self.experts[name]
        scope = CallScope(budget_usd=deadline.budget_left(trace.cost_usd + reserved_usd),
                          fair_s=self._fair_limit(name, deadline))
        try:
            with self._slot(name, deadline) as slot:
                timeout = self._timeout(expert, deadline, slot)
                limit = CALL_LIMIT.set(CallLimit(asyncio.get_running_loop().time() + timeout))
                scope.until = time.monotonic() + timeout
                scoped = CALL_SCOPE.set(scope)
                try:
                    reply = await _within(expert.generate(_served(expert, request)), timeout)
                except TimeoutError:
                    raise _timed_out(name, f"no answer within {timeout:.1f}s", slot, deadline) from None
                finally:
                    CALL_SCOPE.reset(scoped)
                    CALL_LIMIT.reset(limit)
        except ExpertError as exc:
            # A failed call costs nothing by our count, but a nested router's experts may have been paid before
            # it failed or was cut off (``CallScope.spent``), and an upstream whose reply was refused may have said
            # what it billed (``ExpertError.spent``).
            trace.attempts.append(Attempt(expert=name, ok=False, error=exc.to_dict(),
                                          latency_ms=(time.perf_counter() - start) * 1000.0, **tried.fields(),
                                          **(exc.spent or scope.spent())))
            return exc
        except asyncio.CancelledError:
            # Cancelled mid-call (the client left): no reply, so no usage, as for a failed call, but the attempt
            # is kept, so the trace says which experts were still working.
            cancelled = CallCancelled(name, "the call was cancelled before the expert answered")
            trace.attempts.append(Attempt(expert=name, ok=False, error=cancelled.to_dict(),
                                          latency_ms=(time.perf_counter() - start) * 1000.0, **tried.fields(),
                                          **scope.spent()))
            raise
        self._learn(name, reply.usage)
        trace.attempts.append(Attempt(expert=name, ok=True, usage=reply.usage, cost_usd=reply.cost_usd,
                                      usage_estimated=reply.usage_estimated,
                                      latency_ms=(time.perf_counter() - start) * 1000.0, nested=reply.nested,
                                      **tried.fields()))
        return reply

    async def _stream_try(self, name: str, request: ChatRequest, deadline: Deadline,
                          outcome: StreamOutcome) -> AsyncGenerator[StreamPiece, None]:
        expert = self.experts[name]
        started = time.perf_counter()
        try:
            with self._slot(name, deadline) as slot:
                deltas = expert.stream(_served(expert, request))
                iterator = deltas.__aiter__()
                # Each wait's cut-off, for a traced expert's span (``router.tracing.CallLimit``); the stream's own
                # steps run in this task (``_within``), so they see the object the waits update. Never reset: a
                # generator may be closed from another context, where resetting would fail; the limit is made
                # endless instead once the waits are over.
                limit = CallLimit()
                CALL_LIMIT.set(limit)
                first = True
                try:
                    while True:
                        timeout = self._timeout(expert, deadline, slot)
                        limit.at = asyncio.get_running_loop().time() + timeout
                        # The stream's body starts at its first step: a nested router reads its scope there, with
                        # this wait's limit as the time its first output must come by.
                        scoped = None
                        if first:
                            outcome.scope.first_output_by = time.monotonic() + timeout
                            scoped = CALL_SCOPE.set(outcome.scope)
                        try:
                            delta = await _within(iterator.__anext__(), timeout) if timeout > 0 else None
                        except StopAsyncIteration:
                            break
                        except TimeoutError:
                            delta = None
                        finally:
                            if scoped is not None:  # reset in the step that set it: the same task's context
                                CALL_SCOPE.reset(scoped)
                            first = False
                        if delta is None:
                            if outcome.finished:
                                # The answer was complete (the expert passed its finish on): a stall in what
                                # follows (the usage chunk, [DONE]) as the time runs out ends it, never fails it.
                                break
                            raise _timed_out(name, f"stream stalled for {timeout:.1f}s", slot, deadline)
                        piece = _take(delta, outcome, expert)
                        if piece is not None:
                            slot.sent = True
                            yield StreamPiece(expert=name, delta=piece)
                finally:
                    # Close the expert's stream now, not when the garbage collector finds it: its connection
                    # is released before the next try starts, and no finalizer task is left behind.
                    limit.at = math.inf  # a close from here on is no timeout
                    aclose = getattr(deltas, "aclose", None)
                    if aclose is not None:
                        await aclose()
        except ExpertError as exc:
            outcome.error = exc
            outcome.estimate_usage(request, expert)
        finally:
            outcome.latency_ms = (time.perf_counter() - started) * 1000.0


def _timed_out(name: str, message: str, slot: _Slot, deadline: Deadline) -> ExpertTimeout:
    """A try's timeout: ``message`` when the expert's own ``timeout_s`` ran out; when the request's deadline cut
    the try short, that is what the error names, since the expert was not at fault. Either way the call has its
    line in the log, as a call that failed on its own does (a WARNING for the expert's own limit)."""
    error = ExpertTimeout(name, deadline.reached() if slot.cut_by_deadline else message)
    log.log(logging.INFO if slot.cut_by_deadline else logging.WARNING, "expert %s: timeout failed: %s", name,
            error.message)
    return error


def _take(delta: StreamDelta, outcome: StreamOutcome, expert: Expert) -> StreamDelta | None:
    """Note a delta's usage and finish reason; the text, tool calls, refusal or reasoning to pass on, if any."""
    if delta.usage is not None:
        outcome.usage, outcome.usage_estimated = delta.usage, delta.usage_estimated
        outcome.cost = delta.cost_usd if delta.cost_usd is not None else expert.cost(delta.usage)
    if delta.finish_reason:
        outcome.finish_reason, outcome.finished = delta.finish_reason, True
    if delta.nested is not None:
        outcome.nested = delta.nested
    if not delta.has_output():
        return None
    outcome.chars += len(delta.content)
    outcome.deltas += 1
    outcome.tool_deltas += bool(delta.tool_calls)
    outcome.refusal_deltas += bool(delta.refusal)
    return StreamDelta(content=delta.content, tool_calls=delta.tool_calls, logprobs=delta.logprobs,
                       refusal=delta.refusal, reasoning_content=delta.reasoning_content)


def _served(expert: Expert, request: ChatRequest) -> ChatRequest:
    """``request`` as ``expert`` is sent it: to one that does not declare the ``tools`` capability, without its
    tools (one with tools reaches it only with tool_choice "none", which calls none: ``needed_capabilities``),
    as a server without tool calling may refuse the field."""
    if request.tools and "tools" not in expert.config.capabilities:
        return request.model_copy(update={"tools": None})
    return request
