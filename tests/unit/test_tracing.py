"""OpenTelemetry spans, one per expert call, with an in-memory exporter."""

from __future__ import annotations

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from experts.errors import ExpertUnavailable
from experts.types import ChatRequest
from router.config import TracingConfig
from router.orchestrator import Orchestrator
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
