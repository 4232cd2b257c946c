"""Optional OpenTelemetry traces: one span per expert call, ``moe.expert <name>``.

Enabled by ``tracing.enabled``; off, experts are not wrapped and OpenTelemetry is never imported. Only the
``opentelemetry-api`` package is needed here: the spans go to whatever tracer provider the process has, so the
exporter is the deployment's choice (``opentelemetry-instrument -- moe serve ...`` configures one from the
standard ``OTEL_*`` variables; without ``--`` it takes ``--config`` for its own ``--configurator``). Without a
provider the API's default is a no-op.

A span carries the expert, the model, whether it streamed, tokens and cost, and on failure the error's kind;
never the prompt or the answer. A call the dispatcher's timeout cut off is kind ``timeout`` (an error), one cut
short from outside (the client left) kind ``cancelled`` with its status unset, as the trace and metrics say. A
generate call's span is current while it runs, so a nested router (an expert
of type ``router`` in-process) opens its expert spans beneath it.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from contextlib import aclosing
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from experts.base import Expert
from experts.errors import ExpertError
from experts.types import ChatRequest, ExpertReply, StreamDelta, Usage
from router.config import TracingConfig

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

__all__ = ["CALL_LIMIT", "CallLimit", "TracedExpert", "traced"]


def _tracer(config: TracingConfig) -> Tracer:
    try:
        from opentelemetry import trace
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("tracing.enabled needs OpenTelemetry: pip install opentelemetry-api") from exc
    return trace.get_tracer(config.service_name)


@dataclass
class CallLimit:
    """When the dispatcher cuts the current expert call off (the event loop's time; ``Dispatcher`` sets it in
    ``CALL_LIMIT`` before each wait). The wrapper only sees a call end in a cancellation, which is the dispatcher's
    timeout if it comes at the limit, and otherwise the client leaving (or a panel's call no longer needed)."""

    at: float = math.inf


CALL_LIMIT: ContextVar[CallLimit | None] = ContextVar("moe_call_limit", default=None)


def _cut_at_limit() -> bool:
    limit = CALL_LIMIT.get()
    if limit is None:
        return False
    try:
        now = asyncio.get_running_loop().time()
    except RuntimeError:
        return False
    return now >= limit.at - 0.005  # the loop's timer fires at the limit, give or take its resolution


def _record_failure(span: Span, exc: BaseException) -> None:
    from opentelemetry.trace import Status, StatusCode

    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        if not _cut_at_limit():
            # Cut short from outside (the client left, or the call was no longer needed): as the trace and the
            # metrics have it, ``cancelled`` and not a failure of the expert's, so the status stays unset.
            span.set_attribute("moe.error.kind", "cancelled")
            return
        kind = "timeout"  # the dispatcher's timeout (the expert's timeout_s or the request's deadline)
    else:
        kind = exc.kind if isinstance(exc, ExpertError) else type(exc).__name__
    span.set_attribute("moe.error.kind", kind)
    span.set_status(Status(StatusCode.ERROR, kind))


def _record_usage(span: Span, usage: Usage | None, cost_usd: float | None) -> None:
    if usage is not None:
        span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens)
    if cost_usd is not None:
        span.set_attribute("moe.cost_usd", cost_usd)


class TracedExpert(Expert):
    """``inner``, with a span around each call. Everything else (config, name, cost) is the inner expert's."""

    def __init__(self, inner: Expert, tracer: Tracer) -> None:
        super().__init__(inner.config, inner.context)
        self.inner = inner
        self.tracer = tracer

    def _attributes(self, stream: bool) -> dict[str, Any]:
        return {"moe.expert": self.name, "moe.expert.type": self.config.type,
                "gen_ai.request.model": self.config.model, "moe.stream": stream}

    async def generate(self, request: ChatRequest) -> ExpertReply:
        from opentelemetry.trace import SpanKind

        with self.tracer.start_as_current_span(f"moe.expert {self.name}", kind=SpanKind.CLIENT,
                                               attributes=self._attributes(False), record_exception=False,
                                               set_status_on_exception=False) as span:
            try:
                reply = await self.inner.generate(request)
            except BaseException as exc:
                _record_failure(span, exc)
                raise
            _record_usage(span, reply.usage, reply.cost_usd)
            return reply

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamDelta]:
        from opentelemetry.trace import SpanKind

        # Not made current: a generator may be resumed and closed from another context, where detaching
        # a context token it attached would fail. The span is still a child of the caller's span.
        span = self.tracer.start_span(f"moe.expert {self.name}", kind=SpanKind.CLIENT,
                                      attributes=self._attributes(True))
        counted, outputs = False, 0
        try:
            # Closed here when the caller closes this one (the client left), not when the collector finds it: a
            # nested router's stream then ends at once, its last try in its trace and its in-flight slot freed.
            async with aclosing(self.inner.stream(request)) as deltas:  # type: ignore[type-var]
                async for delta in deltas:
                    if delta.usage is not None:
                        # The usage so far (vLLM sends it on every delta, the last one the whole stream's): a
                        # stream that breaks off keeps what it had counted on its span, as the trace does.
                        cost = delta.cost_usd if delta.cost_usd is not None else self.inner.cost(delta.usage)
                        _record_usage(span, delta.usage, cost)
                        counted = True
                    outputs += delta.has_output()
                    yield delta
        except BaseException as exc:
            if not counted and outputs:
                # It broke off before any usage came: estimated as the trace estimates it (the dispatcher's
                # StreamOutcome.estimate_usage), a token per delta, so the span is not left with none.
                usage = Usage.counted(request.estimated_prompt_tokens(), outputs)
                _record_usage(span, usage, self.inner.cost(usage))
                span.set_attribute("moe.usage_estimated", True)
            _record_failure(span, exc)
            raise
        finally:
            span.end()

    def cost(self, usage: Usage) -> float:
        return self.inner.cost(usage)

    async def aclose(self) -> None:
        await self.inner.aclose()


def traced(expert: Expert, config: TracingConfig, tracer: Tracer | None = None) -> Expert:
    """``expert`` wrapped in spans when tracing is on; ``expert`` itself when it is off."""
    if not config.enabled:
        return expert
    return TracedExpert(expert, tracer or _tracer(config))
