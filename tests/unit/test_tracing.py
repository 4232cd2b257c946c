"""OpenTelemetry spans, one per expert call, with an in-memory exporter."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from experts.errors import ExpertUnavailable
from experts.types import ChatRequest, StreamDelta, Usage
from router.config import TracingConfig
from router.orchestrator import Orchestrator, StreamEnd
from router.tracing import TracedExpert, traced
from tests.doubles.fakes import FakeExpert, FakeGate, fake_config

NAMES = ["math", "code"]


def request(text: str, stream: bool = False) -> ChatRequest:
    return ChatRequest.model_validate({"messages": [{"role": "user", "content": text}], "stream": stream})


async def test_one_span_per_expert_call_with_failures_marked() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    config = fake_config(NAMES)
    on = TracingConfig(enabled=True)
    experts = {"math": traced(FakeExpert(config.expert("math"), fail=lambda n: ExpertUnavailable(n, "down")), on,
                              tracer),
               "code": traced(FakeExpert(config.expert("code"), pieces=["a", "b"]), on, tracer)}
    orchestrator = Orchestrator(config, FakeGate(NAMES, {"integral": [0.9, 0.1]}, default=[0.2, 0.8]), experts)
    answer = await orchestrator.complete(request("an integral"))
    assert answer.expert == "code"
    _ = [e async for e in orchestrator.stream(request("hello", stream=True))]
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == ["moe.expert math", "moe.expert code", "moe.expert code"]
    failed, ok, streamed = spans
    assert failed.attributes is not None and failed.attributes["moe.error.kind"] == "unavailable"
    assert not failed.status.is_ok
    assert ok.attributes is not None and ok.attributes["gen_ai.usage.output_tokens"] == 5
    assert streamed.attributes is not None and streamed.attributes["moe.stream"] is True
    assert all("an integral" not in str(dict(s.attributes or {})) for s in spans)


def test_off_means_no_wrapper() -> None:
    expert = FakeExpert(fake_config(NAMES).expert("math"))
    assert traced(expert, TracingConfig()) is expert
    assert isinstance(traced(expert, TracingConfig(enabled=True)), TracedExpert)


def _tracing() -> tuple[InMemorySpanExporter, Any]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter, provider.get_tracer("test")


@pytest.mark.parametrize("stream", [False, True])
async def test_a_call_the_timeout_cut_off_is_a_timeout_span(stream: bool) -> None:
    """The wrapper sees only a cancellation; at the dispatcher's limit it is the timeout the trace, the log and
    the metrics name (it was CancelledError), and an error."""
    exporter, tracer = _tracing()
    on = TracingConfig(enabled=True)
    config = fake_config(NAMES, experts=[
        {"name": n, "type": "replay", "model": n, "timeout_s": 0.2, "replay": {"source": "routerbench",
                                                                               "path": "unused"}} for n in NAMES])
    experts = {"math": traced(FakeExpert(config.expert("math"), delay=5.0), on, tracer),
               "code": traced(FakeExpert(config.expert("code")), on, tracer)}
    orchestrator = Orchestrator(config, FakeGate(NAMES, {"integral": [0.9, 0.1]}, default=[0.9, 0.1]), experts)
    if stream:
        events = [e async for e in orchestrator.stream(request("an integral", stream=True))]
        end = events[-1]
        assert isinstance(end, StreamEnd) and (end.trace.attempts[0].error or {}).get("kind") == "timeout"
    else:
        answer = await orchestrator.complete(request("an integral"))
        error = answer.trace.attempts[0].error
        assert error is not None and error["kind"] == "timeout"
    cut, answered = exporter.get_finished_spans()
    assert (cut.name, answered.name) == ("moe.expert math", "moe.expert code")
    assert cut.attributes is not None and cut.attributes["moe.error.kind"] == "timeout"
    assert cut.status.status_code == StatusCode.ERROR
    assert answered.status.status_code == StatusCode.UNSET


@pytest.mark.parametrize("stream", [False, True])
async def test_a_call_the_client_abandoned_is_cancelled_not_an_error(stream: bool) -> None:
    exporter, tracer = _tracing()
    config = fake_config(NAMES)
    experts = {n: traced(FakeExpert(config.expert(n), delay=5.0), TracingConfig(enabled=True), tracer)
               for n in NAMES}
    orchestrator = Orchestrator(config, FakeGate(NAMES, {"integral": [0.9, 0.1]}, default=[0.9, 0.1]), experts)

    async def ask() -> None:
        if stream:
            _ = [e async for e in orchestrator.stream(request("an integral", stream=True))]
        else:
            await orchestrator.complete(request("an integral"))

    task = asyncio.ensure_future(ask())
    await asyncio.sleep(0.2)  # the call is under way, well before its 1 s timeout
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    [span] = exporter.get_finished_spans()
    assert span.attributes is not None and span.attributes["moe.error.kind"] == "cancelled"
    assert span.status.status_code == StatusCode.UNSET


class _ThenDies(FakeExpert):
    """A test double streaming three deltas, then breaking off: with ``running`` usage, as vLLM does with continuous
    usage stats (the usage so far on every delta, 3 prompt tokens); without, as an upstream that sends none."""

    def __init__(self, *args: object, running: bool, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.running = running

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamDelta]:
        for done, piece in enumerate(["one ", "two ", "three "], start=1):
            yield StreamDelta(content=piece, usage=Usage.counted(3, done) if self.running else None)
        raise ExpertUnavailable(self.name, "connection reset")


@pytest.mark.parametrize("running", [True, False], ids=["running-usage", "no-usage"])
async def test_a_stream_that_broke_off_keeps_on_its_span_what_the_trace_counts(running: bool) -> None:
    """The span of a stream that broke off has the usage and cost its trace attempt has: the usage so far when the
    upstream sent it on every delta, else the trace's estimate (a token per delta), marked moe.usage_estimated."""
    exporter, tracer = _tracing()
    on = TracingConfig(enabled=True)
    config = fake_config(NAMES)
    experts = {"math": traced(_ThenDies(config.expert("math"), running=running), on, tracer),
               "code": traced(FakeExpert(config.expert("code"), pieces=["four"]), on, tracer)}
    orchestrator = Orchestrator(config, FakeGate(NAMES, {}, default=[0.9, 0.1]), experts)
    events = [e async for e in orchestrator.stream(request("an integral", stream=True))]
    end = events[-1]
    assert isinstance(end, StreamEnd)
    broken = end.trace.attempts[0]
    assert broken.usage.completion_tokens == 3 and broken.usage_estimated is not running
    if running:
        assert broken.usage.prompt_tokens == 3
    broke, finished = exporter.get_finished_spans()
    assert broke.attributes is not None and broke.attributes["moe.error.kind"] == "unavailable"
    assert (broke.attributes["gen_ai.usage.input_tokens"], broke.attributes["gen_ai.usage.output_tokens"]) == (
        broken.usage.prompt_tokens, 3)
    assert broke.attributes["moe.cost_usd"] == pytest.approx(broken.cost_usd)
    assert broke.attributes.get("moe.usage_estimated", False) is not running
    assert finished.attributes is not None and finished.attributes["gen_ai.usage.output_tokens"] == 1
    assert "moe.usage_estimated" not in finished.attributes
