"""OpenAICompatibleExpert against ScriptedOpenAIServer (a test double on 127.0.0.1, real HTTP)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any, cast

import httpx
import pytest

from experts.base import ExpertContext
from experts.errors import (
    ExpertAuthError,
    ExpertError,
    ExpertHTTPError,
    ExpertOverloaded,
    ExpertProtocolError,
    ExpertRateLimited,
    ExpertRejected,
    ExpertServerError,
    ExpertTimeout,
    ExpertUnavailable,
)
from experts.http_client import without_addresses
from experts.openai_compat import OpenAICompatibleExpert, parse_retry_after
from experts.types import ChatMessage, ChatRequest, StreamDelta
from router.config import ExpertConfig
from router.retry import RETRY_AFTER_SLACK_S, RetryPolicy, retry_delay
from tests.doubles import Behaviour, ScriptedOpenAIServer

MakeExpert = Callable[..., OpenAICompatibleExpert]
SECRET = "sk-unit-test-secret-7f3a9c"
TOOL_CALL = {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}


@pytest.fixture
def server() -> Iterator[ScriptedOpenAIServer]:
    with ScriptedOpenAIServer(name="unit") as srv:
        yield srv


@pytest.fixture
async def make_expert(server: ScriptedOpenAIServer) -> AsyncIterator[MakeExpert]:
    built: list[OpenAICompatibleExpert] = []

    def make(context: ExpertContext | None = None, **overrides: Any) -> OpenAICompatibleExpert:
        fields = {"name": "e1", "type": "vllm", "endpoint": server.url, "model": "served-model",
                  "timeout_s": 2.0, **overrides}
        expert = OpenAICompatibleExpert(ExpertConfig(**fields), context)
        built.append(expert)
        return expert

    yield make
    for expert in built:
        await expert.aclose()


def ask(text: str = "one two three", **extra: Any) -> ChatRequest:
    return ChatRequest(messages=[ChatMessage(role="user", content=text)], **extra)


async def collect(expert: OpenAICompatibleExpert, request: ChatRequest,
                  into: list[StreamDelta] | None = None) -> list[StreamDelta]:
    deltas = [] if into is None else into
    async for delta in expert.stream(request):
        deltas.append(delta)
    return deltas


# --- normal answers -----------------------------------------------------------------------------------


async def test_generate_parses_answer_usage_and_prices_cost(server: ScriptedOpenAIServer,
                                                            make_expert: MakeExpert) -> None:
    server.default = Behaviour.ok("alpha beta gamma delta")
    expert = make_expert(cost={"input_per_1k": 1.0, "output_per_1k": 2.0})

    reply = await expert.generate(ask("one two three", temperature=0.5))

    assert reply.expert == "e1"
    assert reply.content == "alpha beta gamma delta"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (3, 4, 7)
    assert reply.cost_usd == pytest.approx(3 / 1000 * 1.0 + 4 / 1000 * 2.0)
    assert reply.finish_reason == "stop"
    assert reply.tool_calls is None
    assert reply.model == "served-model"
    assert reply.latency_ms > 0
    sent = server.requests[-1]
    assert sent["model"] == "served-model" and sent["stream"] is False and sent["temperature"] == 0.5
    assert sent["messages"] == [{"role": "user", "content": "one two three"}]
    assert "stream_options" not in sent


async def test_latency_covers_the_upstream_delay(server: ScriptedOpenAIServer, make_expert: MakeExpert) -> None:
    server.push(Behaviour.slow("late", delay_s=0.25))
    reply = await make_expert().generate(ask())
    assert reply.content == "late"
    assert 250 <= reply.latency_ms < 2000


async def test_upstream_usage_cost_wins_over_config_prices(server: ScriptedOpenAIServer,
                                                           make_expert: MakeExpert) -> None:
    server.default = Behaviour.ok("priced", cost=0.0375)
    expert = make_expert(cost={"input_per_1k": 100.0, "output_per_1k": 100.0})

    reply = await expert.generate(ask())
    deltas = await collect(expert, ask())

    assert reply.cost_usd == pytest.approx(0.0375)
    assert deltas[-1].cost_usd == pytest.approx(0.0375)


async def test_an_upstream_cost_of_zero_leaves_a_priced_experts_config_prices(server: ScriptedOpenAIServer,
                                                                              make_expert: MakeExpert) -> None:
    """A proxy that writes ``usage.cost: 0`` made every call a priced expert passed it free: to the cost budget,
    the metrics and the outcome records. An unpriced expert still takes the upstream's 0."""
    server.default = Behaviour.ok("free?", cost=0.0)
    priced = make_expert(cost={"input_per_1k": 100.0, "output_per_1k": 100.0})
    reply = await priced.generate(ask())
    deltas = await collect(priced, ask())
    assert reply.cost_usd == pytest.approx(priced.cost(reply.usage)) and reply.cost_usd > 0
    last = deltas[-1]
    assert last.usage is not None and last.cost_usd == pytest.approx(priced.cost(last.usage)) and priced.cost(
        last.usage) > 0
    assert (await make_expert().generate(ask())).cost_usd == 0.0


async def test_stream_reassembles_content_and_ends_with_usage(server: ScriptedOpenAIServer,
                                                              make_expert: MakeExpert) -> None:
    server.default = Behaviour.ok("The answer is 42 .")
    expert = make_expert(cost={"input_per_1k": 10.0, "output_per_1k": 20.0})

    deltas = await collect(expert, ask("what is six times seven"))

    # The finish is passed on as it comes (with the usage estimated so far), then the usage chunk that follows
    # it: a caller whose time runs out in between still has a complete answer.
    assert [d.content for d in deltas[:-2]] == ["The ", "answer ", "is ", "42 ", "."]
    assert "".join(d.content for d in deltas) == "The answer is 42 ."
    assert all(d.finish_reason is None and d.usage is None for d in deltas[:-2])
    said, last = deltas[-2:]
    assert said.finish_reason == "stop" and said.usage_estimated and not last.usage_estimated
    assert last.finish_reason == "stop" and last.content == ""
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (5, 5, 10)
    assert last.cost_usd == pytest.approx(5 / 1000 * 10.0 + 5 / 1000 * 20.0)
    sent = server.requests[-1]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


def sse(*events: dict[str, Any] | str) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, str) else json.dumps(e)).encode() + b"\n\n" for e in events)


async def test_stream_takes_usage_from_the_finish_chunk_and_tolerates_a_missing_done(
        server: ScriptedOpenAIServer, make_expert: MakeExpert) -> None:
    body = (b": keep-alive comment\n\n"
            + sse({"choices": [{"index": 0, "delta": {"content": "hi"}}]},
                  {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}],
                   "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}}))
    server.push(Behaviour.raw(body, content_type="text/event-stream"))

    deltas = await collect(make_expert(), ask())

    assert [d.content for d in deltas] == ["hi", ""]
    assert deltas[-1].finish_reason == "length"
    assert deltas[-1].usage is not None and deltas[-1].usage.total_tokens == 3


async def test_a_finish_changed_by_its_caller_is_not_sent_again(server: ScriptedOpenAIServer,
                                                                 make_expert: MakeExpert) -> None:
    """The finish is passed on before what follows it is read, and passed again only if that brought usage or a
    trace. A caller that changed the delta it was given (a nested router prices it) got it twice, every time."""
    body = sse({"choices": [{"index": 0, "delta": {"content": "hi"}}]},
               {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}}, "[DONE]")
    server.push(Behaviour.raw(body, content_type="text/event-stream"))
    finishes = []
    async for delta in make_expert().stream(ask()):
        if delta.finish_reason:
            delta.cost_usd = 9.0  # as router.hierarchy._priced_delta sets the nested router's cost
            finishes.append(delta)
    assert len(finishes) == 1


# --- tool calls ---------------------------------------------------------------------------------------


async def test_tool_calls_pass_through_unchanged(server: ScriptedOpenAIServer, make_expert: MakeExpert) -> None:
    server.push(Behaviour.ok("", tool_calls=[TOOL_CALL]))
    reply = await make_expert().generate(ask("weather in Paris?", tools=[{"type": "function"}]))
    assert reply.tool_calls == [TOOL_CALL]
    assert reply.finish_reason == "tool_calls"
    assert reply.content == ""
    assert server.requests[-1]["tools"] == [{"type": "function"}]


async def test_streamed_tool_call_deltas_pass_through_unchanged(server: ScriptedOpenAIServer,
                                                                make_expert: MakeExpert) -> None:
    server.push(Behaviour.ok("", tool_calls=[TOOL_CALL]))

    deltas = await collect(make_expert(), ask("weather in Paris?"))

    assert [d.tool_calls for d in deltas if d.tool_calls] == [
        [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}],
        [{"index": 0, "function": {"arguments": '{"city": "Paris", "unit": "C"}'}}],
    ]
    assert deltas[-1].finish_reason == "tool_calls" and not any(d.tool_calls for d in deltas[-2:])


# --- failures -----------------------------------------------------------------------------------------

FAILURES = [
    pytest.param(Behaviour.reset(), ExpertUnavailable, True, id="reset"),
    pytest.param(Behaviour.hang(), ExpertTimeout, True, id="hang"),
    pytest.param(Behaviour.slow(delay_s=1.5), ExpertTimeout, True, id="slow-past-timeout"),
    pytest.param(Behaviour.error(500, "engine crashed"), ExpertServerError, True, id="500"),
    pytest.param(Behaviour.error(503, "loading model"), ExpertServerError, True, id="503"),
    pytest.param(Behaviour.error(429, "slow down", retry_after="7"), ExpertRateLimited, True, id="429"),
    pytest.param(Behaviour.error(401, "bad key"), ExpertAuthError, False, id="401"),
    pytest.param(Behaviour.error(403, "forbidden"), ExpertAuthError, False, id="403"),
    pytest.param(Behaviour.error(400, "max_tokens too large"), ExpertRejected, False, id="400"),
    pytest.param(Behaviour.error(404, "no such model"), ExpertRejected, False, id="404"),
    pytest.param(Behaviour.raw(b"", status=302), ExpertProtocolError, True, id="302"),
]


@pytest.mark.parametrize(("behaviour", "error", "transient"), FAILURES)
@pytest.mark.parametrize("streaming", [False, True], ids=["generate", "stream"])
async def test_failures_map_to_the_error_tree(server: ScriptedOpenAIServer, make_expert: MakeExpert,
                                              behaviour: Behaviour, error: type[ExpertError], transient: bool,
                                              streaming: bool) -> None:
    server.push(behaviour)
    expert = make_expert(timeout_s=0.4)

    with pytest.raises(error) as caught:
        await (collect(expert, ask()) if streaming else expert.generate(ask()))

    assert type(caught.value) is error
    assert caught.value.transient is transient
    assert caught.value.expert == "e1"
    if behaviour.mode == "error":
        assert getattr(caught.value, "status", None) == behaviour.status
        shown = "the expert refused the router's credentials" if error is ExpertAuthError else behaviour.message
        assert f"HTTP {behaviour.status}: {shown}" in str(caught.value)
    # The expert stays usable after any failure.
    assert (await expert.generate(ask())).content == "answer from unit"


async def test_connection_refused_is_unavailable(make_expert: MakeExpert) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    expert = make_expert(endpoint=f"http://127.0.0.1:{port}/v1")
    with pytest.raises(ExpertUnavailable) as caught:
        await expert.generate(ask())
    assert caught.value.transient


@pytest.mark.parametrize("streaming", [False, True], ids=["generate", "stream"])
async def test_a_transport_error_names_no_address_but_the_log_does(make_expert: MakeExpert, streaming: bool,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """The error's message reaches clients (the 503's causes, the trace); the expert's host and port stay in the
    operator's log, and a password in the endpoint in neither."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    expert = make_expert(endpoint=f"http://user:pw-SECRET@127.0.0.1:{port}/v1")
    with caplog.at_level(logging.WARNING, logger="experts.openai_compat"), pytest.raises(ExpertUnavailable) as caught:
        await (collect(expert, ask()) if streaming else expert.generate(ask()))
    assert str(port) not in caught.value.message and "127.0.0.1" not in caught.value.message
    assert "<address>" in caught.value.message
    logged = [r.getMessage() for r in caplog.records if r.name == "experts.openai_compat"]
    assert len(logged) == 1 and f"127.0.0.1:{port}" in logged[0] and "unavailable" in logged[0]
    assert "pw-SECRET" not in logged[0] and "user" not in logged[0].split("failed")[0]


async def test_an_error_status_has_its_log_line_too(server: ScriptedOpenAIServer, make_expert: MakeExpert,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A 5xx, 429, refused key or unserved model is a WARNING naming the expert's host; a request the expert found
    invalid is INFO."""
    caplog.set_level(logging.INFO, logger="experts.openai_compat")
    expert = make_expert()
    server.push(Behaviour.error(500, "boom"), Behaviour.error(429, "slow down", retry_after="7"),
                Behaviour.error(400, "bad field"), Behaviour.error(404, "no such model"),
                Behaviour.error(422, "too long"))
    for _ in range(5):
        with pytest.raises(ExpertError):
            await expert.generate(ask())
    logged = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "experts.openai_compat"]
    assert [level for level, _ in logged] == ["WARNING", "WARNING", "INFO", "WARNING", "INFO"]
    host = server.url.split("//")[1].split("/")[0]
    assert all(host in message for _, message in logged)
    assert "HTTP 500 failed (type scripted_error, code 500)" in logged[0][1] and "(Retry-After: 7s)" in logged[1][1]


@pytest.mark.parametrize("streaming", [False, True], ids=["generate", "stream"])
async def test_the_log_line_of_an_error_status_never_quotes_the_request(server: ScriptedOpenAIServer,
                                                                         make_expert: MakeExpert, streaming: bool,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """Upstream error text may quote the prompt (FastAPI's 422 ``detail[].input``, a 5xx naming it, vLLM's error
    event inside a stream): the log line names the status and the error's type and code, and only the client's
    error carries the text."""
    caplog.set_level(logging.DEBUG)
    prompt = "my SSN is 078-05-1120"
    detail = {"detail": [{"type": "extra_forbidden", "loc": ["body", "foo"], "msg": "Extra inputs are not permitted",
                          "input": {"messages": [{"role": "user", "content": prompt}]}}]}
    failure = {"error": {"message": f"engine died on: {prompt}", "type": "InternalServerError", "code": 500}}
    in_body = (Behaviour.raw(sse(failure), content_type="text/event-stream") if streaming
               else Behaviour.raw(json.dumps(failure).encode()))
    server.push(Behaviour.raw(json.dumps(detail).encode(), status=422),
                Behaviour.error(500, f"engine crashed while processing prompt: {prompt}"),
                Behaviour.raw(json.dumps({"error": {"message": prompt, "type": prompt, "code": None}}).encode(),
                              status=400),
                in_body)
    expert = make_expert()
    errors = []
    for _ in range(4):
        with pytest.raises(ExpertHTTPError) as caught:
            await (collect(expert, ask(prompt)) if streaming else expert.generate(ask(prompt)))
        errors.append(caught.value)
    logged = [r.getMessage() for r in caplog.records if r.name == "experts.openai_compat"]
    assert [m.split(": ", 1)[1] for m in logged] == [
        "HTTP 422 failed (type extra_forbidden)", "HTTP 500 failed (type scripted_error, code 500)",
        "HTTP 400 failed", "HTTP 500 failed (type InternalServerError, code 500)"]
    assert "078-05-1120" not in caplog.text
    assert all("078-05-1120" in e.message for e in errors)


async def test_the_log_line_quotes_the_upstreams_error_where_the_service_logs_content(
        server: ScriptedOpenAIServer, make_expert: MakeExpert, caplog: pytest.LogCaptureFixture) -> None:
    """With ``service.log_content: true`` (``build_experts`` puts it in every expert's context) the line carries
    the upstream's words too, as the operator asked for content in the log."""
    from router.build import build_experts
    from router.config import parse_config

    caplog.set_level(logging.INFO)
    server.push(Behaviour.error(400, "This model's maximum context length is 4096 tokens"))
    expert = make_expert(ExpertContext(log_content=True))
    with pytest.raises(ExpertHTTPError):
        await expert.generate(ask())
    (line,) = [r.getMessage() for r in caplog.records if r.name == "experts.openai_compat"]
    assert line.endswith(": This model's maximum context length is 4096 tokens"), line
    raw = {"version": 1, "experts": [{"name": "a", "type": "vllm", "endpoint": server.url, "model": "m"}]}
    for content in (True, False):
        built = build_experts(parse_config({**raw, "service": {"log_content": content}}, check_env=False))
        assert [e.context.log_content for e in built.values()] == [content]
        for e in built.values():
            await e.aclose()


@pytest.mark.parametrize(("raw", "shown"), [
    ("ClientConnectorError: Cannot connect to host 127.0.0.1:46403 ssl:default [Connect call failed "
     "('127.0.0.1', 46403)]",
     "ClientConnectorError: Cannot connect to host <address> ssl:default [Connect call failed <address>]"),
    ("ClientConnectorDNSError: Cannot connect to host vllm-math:8000 ssl:default [Name or service not known]",
     "ClientConnectorDNSError: Cannot connect to host <address> ssl:default [Name or service not known]"),
    ("ConnectError: [Errno 111] Connection refused to http://10.0.0.7:9000/v1/chat/completions",
     "ConnectError: [Errno 111] Connection refused to <address>"),
    ("connect to [::1]:8000 failed, ('::1', 8000, 0, 0)", "connect to <address> failed, <address>"),
    ("ServerTimeoutError: Timeout on reading data from socket", "ServerTimeoutError: Timeout on reading data from "
     "socket"),
])
def test_without_addresses(raw: str, shown: str) -> None:
    assert without_addresses(raw) == shown


@pytest.mark.parametrize(("body", "content_type"), [
    pytest.param(b'{"id": "broken", "choices": [', "application/json", id="truncated-json"),
    pytest.param(b"<html>gateway</html>", "text/html", id="html"),
    pytest.param(b'{"id": "x", "object": "chat.completion"}', "application/json", id="no-choices"),
    pytest.param(b'{"id": "x", "choices": []}', "application/json", id="empty-choices"),
    pytest.param(b'{"choices": [{"index": 0}]}', "application/json", id="no-message"),
    pytest.param(b"[1, 2, 3]", "application/json", id="not-an-object"),
    pytest.param(b'{"choices": [{"message": {"content": 42}}]}', "application/json", id="number-content"),
    pytest.param(b'{"choices": [{"message": {"content": {"text": "x"}}}]}', "application/json",
                 id="object-content"),
    pytest.param(b'{"choices": [{"message": {"content": [{"type": "image_url", "image_url": {}}]}}]}',
                 "application/json", id="non-text-part"),
    pytest.param(b'{"choices": [{"message": {"content": "x", "tool_calls": {"id": "c"}}}]}', "application/json",
                 id="tool-calls-object"),
    pytest.param(b'{"choices": [{"message": {"content": "x"}, "finish_reason": 1}]}', "application/json",
                 id="number-finish-reason"),
])
async def test_malformed_answers_are_protocol_errors(server: ScriptedOpenAIServer, make_expert: MakeExpert,
                                                     body: bytes, content_type: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="experts.openai_compat")
    server.push(Behaviour.raw(body, content_type=content_type))
    with pytest.raises(ExpertProtocolError) as caught:
        await make_expert().generate(ask())
    assert caught.value.transient
    # Every failed call has its line in the operator's log; a malformed answer had none.
    logged = [r for r in caplog.records if r.name == "experts.openai_compat"]
    assert len(logged) == 1 and logged[0].levelname == "WARNING" and "protocol failed" in logged[0].getMessage()


@pytest.mark.parametrize(("body", "error"), [
    pytest.param(b"data: {not json\n\n", ExpertProtocolError, id="bad-json-event"),
    pytest.param(sse({"id": "x"}), ExpertProtocolError, id="chunk-without-choices"),
    pytest.param(sse({"choices": [{"index": 0, "delta": {"content": "cut"}}]}), ExpertProtocolError,
                 id="ends-without-finish-or-done"),
    pytest.param(sse({"error": {"message": "CUDA out of memory", "code": 500}}), ExpertServerError,
                 id="vllm-error-event"),
    pytest.param(sse({"choices": [{"index": 0, "delta": "cut"}]}, "[DONE]"), ExpertProtocolError,
                 id="string-delta"),
    pytest.param(sse({"choices": [None]}, "[DONE]"), ExpertProtocolError, id="null-choice"),
    pytest.param(sse({"choices": [{"index": 0, "delta": {"content": 7}}]}, "[DONE]"), ExpertProtocolError,
                 id="number-delta-content"),
    pytest.param(sse({"choices": [{"index": 0, "delta": {"tool_calls": "call"}}]}, "[DONE]"), ExpertProtocolError,
                 id="string-tool-calls"),
    pytest.param(sse({"choices": [{"index": 0, "delta": {}, "finish_reason": ["stop"]}]}, "[DONE]"),
                 ExpertProtocolError, id="list-finish-reason"),
])
async def test_malformed_streams_raise(server: ScriptedOpenAIServer, make_expert: MakeExpert,
                                       body: bytes, error: type[ExpertError],
                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="experts.openai_compat")
    server.push(Behaviour.raw(body, content_type="text/event-stream"))
    with pytest.raises(error):
        await collect(make_expert(), ask())
    assert len([r for r in caplog.records if r.name == "experts.openai_compat"]) == 1  # one line, never two


async def test_a_malformed_answers_log_line_quotes_it_only_where_the_service_logs_content(
        server: ScriptedOpenAIServer, make_expert: MakeExpert, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="experts.openai_compat")
    server.push(Behaviour.raw(b'{"answer": "my SSN is 078-05-1120'), Behaviour.raw(b'{"answer": "078-05-1120'))
    for context in (None, ExpertContext(log_content=True)):
        with pytest.raises(ExpertProtocolError):
            await make_expert(context).generate(ask())
    quiet, loud = (r.getMessage() for r in caplog.records if r.name == "experts.openai_compat")
    assert quiet.endswith("protocol failed: invalid JSON") and "078-05-1120" in loud


async def test_usage_counts_sent_as_null_are_unknown_not_a_broken_answer(server: ScriptedOpenAIServer,
                                                                          make_expert: MakeExpert) -> None:
    server.push(Behaviour.raw(json.dumps({"choices": [{"message": {"content": "4"}, "finish_reason": "stop"}],
                                          "usage": {"prompt_tokens": 9, "completion_tokens": None,
                                                    "total_tokens": None}}).encode(),
                              content_type="application/json"))
    reply = await make_expert().generate(ask())
    # The count it sent stands; the one it did not is estimated (the answer is not free), and the total derived.
    assert reply.content == "4" and reply.usage.prompt_tokens == 9 and reply.usage.completion_tokens == 1
    assert reply.usage.total_tokens == 10 and reply.usage_estimated


@pytest.mark.parametrize(("usage", "expected", "estimated"), [
    ({}, None, True),  # an empty usage: estimated whole, as no usage is (it was 0 tokens, $0, not estimated)
    ({"prompt_tokens": None, "completion_tokens": None, "total_tokens": None}, None, True),
    ({"prompt_tokens": "many", "completion_tokens": 3}, None, True),  # not a count: unknown, not a broken answer
    ({"prompt_tokens": -100, "completion_tokens": 3}, None, True),  # negative broke the metrics and the log line
    ({"prompt_tokens": 100, "completion_tokens": 50}, (100, 50, 150), False),  # no total: the sum
    ({"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 7}, (100, 50, 150), False),
])
async def test_a_usage_that_counts_nothing_usable_is_estimated_never_free(
        server: ScriptedOpenAIServer, make_expert: MakeExpert, usage: dict[str, object],
        expected: tuple[int, int, int] | None, estimated: bool) -> None:
    answer = "a" * 400
    server.push(Behaviour.raw(json.dumps({"choices": [{"message": {"content": answer}, "finish_reason": "stop"}],
                                          "usage": usage}).encode(), content_type="application/json"))
    reply = await make_expert().generate(ask())
    got = (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens)
    assert reply.usage_estimated is estimated
    if expected is not None:
        assert got == expected
    else:
        assert got[1] == 100 or (usage.get("completion_tokens") == 3 and got[1] == 3)
        assert got[2] == got[0] + got[1] and reply.cost_usd >= 0
    assert all(n >= 0 for n in got)


async def test_content_as_text_parts_is_joined(server: ScriptedOpenAIServer, make_expert: MakeExpert) -> None:
    """Some providers answer with a list of parts: the text parts make the answer, a reasoning part is left out."""
    parts = [{"type": "reasoning", "text": "thinking..."}, {"type": "text", "text": "The answer "},
             {"type": "output_text", "text": "is 4."}]
    server.push(Behaviour.raw(json.dumps({"choices": [{"message": {"role": "assistant", "content": parts},
                                                       "finish_reason": "stop"}]}).encode(),
                              content_type="application/json"))
    server.push(Behaviour.raw(sse({"choices": [{"index": 0, "delta": {"content": [{"type": "text", "text": "4"}]}}]},
                                  {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}, "[DONE]"),
                              content_type="text/event-stream"))
    expert = make_expert()
    assert (await expert.generate(ask())).content == "The answer is 4."
    deltas = await collect(expert, ask())
    assert "".join(d.content for d in deltas) == "4" and deltas[-1].finish_reason == "stop"


async def test_retry_after_seconds_and_http_date(server: ScriptedOpenAIServer, make_expert: MakeExpert) -> None:
    when = datetime.now(UTC) + timedelta(seconds=30)
    server.push(Behaviour.error(429, retry_after="12"), Behaviour.error(429, retry_after=format_datetime(when, True)),
                Behaviour.error(429))
    expert = make_expert()
    waits = []
    for _ in range(3):
        with pytest.raises(ExpertRateLimited) as caught:
            await expert.generate(ask())
        waits.append(caught.value.retry_after_s)
    assert waits[0] == 12.0
    assert waits[1] is not None and 27.0 <= waits[1] <= 30.0
    assert waits[2] is None


@pytest.mark.parametrize("streaming", [False, True], ids=["generate", "stream"])
async def test_a_503_carries_its_retry_after_and_the_retry_waits_for_it(server: ScriptedOpenAIServer,
                                                                         make_expert: MakeExpert,
                                                                         streaming: bool) -> None:
    server.push(Behaviour.error(503, "loading model", retry_after="3"), Behaviour.error(503, "loading model"))
    expert = make_expert()
    waits = []
    for _ in range(2):
        with pytest.raises(ExpertServerError) as caught:
            await (collect(expert, ask()) if streaming else expert.generate(ask()))
        assert (caught.value.kind, caught.value.status, caught.value.transient) == ("server_error", 503, True)
        waits.append(retry_delay(RetryPolicy(retries=1, backoff_base_s=0.1, retry_after_max_s=5.0), caught.value,
                                 0, 60.0, lambda: 0.5))
    # the Retry-After (and RETRY_AFTER_SLACK_S), then the plain backoff of a 503 without one
    assert waits == pytest.approx([3.0 + RETRY_AFTER_SLACK_S, 0.075])
    capped = RetryPolicy(retries=1, retry_after_max_s=2.0)  # the same cap as a 429's: longer falls back
    server.push(Behaviour.error(503, "loading model", retry_after="3"))
    with pytest.raises(ExpertServerError) as caught:
        await expert.generate(ask())
    assert retry_delay(capped, caught.value, 0, 60.0, lambda: 0.5) is None


@pytest.mark.parametrize(("header", "seconds"), [
    ("120", 120.0), ("1.5", 1.5), ("-4", 0.0), ("Wed, 21 Oct 2015 07:28:30 GMT", 30.0),
    ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0), ("soon", None), ("", None), (None, None), ("nan", None), ("inf", None),
])
def test_parse_retry_after(header: str | None, seconds: float | None) -> None:
    now = datetime(2015, 10, 21, 7, 28, 0, tzinfo=UTC)
    assert parse_retry_after(header, now=now) == seconds


async def test_error_excerpt_is_short(server: ScriptedOpenAIServer, make_expert: MakeExpert) -> None:
    server.push(Behaviour.error(500, "boom " + "x" * 5000))
    with pytest.raises(ExpertServerError) as caught:
        await make_expert().generate(ask())
    assert caught.value.message.startswith("HTTP 500: boom xxx")
    assert len(caught.value.message) <= len("HTTP 500: ") + 200


# --- mid-stream faults --------------------------------------------------------------------------------


async def test_stall_mid_stream_times_out_after_the_yielded_deltas(server: ScriptedOpenAIServer,
                                                                   make_expert: MakeExpert) -> None:
    server.push(Behaviour.stall_mid_stream(after=2, text="one two three four"))
    deltas: list[StreamDelta] = []
    loop = asyncio.get_running_loop()
    started = loop.time()

    with pytest.raises(ExpertTimeout):
        await collect(make_expert(timeout_s=0.3), ask(), into=deltas)

    assert [d.content for d in deltas] == ["one ", "two "]
    assert 0.3 <= loop.time() - started < 2.0


async def test_a_body_held_open_after_done_does_not_hold_up_the_answer(server: ScriptedOpenAIServer,
                                                                        make_expert: MakeExpert) -> None:
    """[DONE] ends the answer: the stream ends at once (the connection is dropped rather than read to its end),
    not when the expert's timeout runs out on a body the server never finishes."""
    server.push(Behaviour.done_then_hold("alpha beta gamma"))
    started = time.monotonic()
    deltas = await collect(make_expert(timeout_s=5.0), ask())
    assert time.monotonic() - started < 2.0
    assert "".join(d.content for d in deltas) == "alpha beta gamma" and deltas[-1].finish_reason == "stop"


async def test_slow_tokens_within_the_timeout_do_not_time_out(server: ScriptedOpenAIServer,
                                                              make_expert: MakeExpert) -> None:
    # 5 tokens x 0.15 s = 0.75 s in all, longer than the 0.4 s timeout, but no single gap is.
    server.push(Behaviour.slow("a b c d e", token_delay_s=0.15))
    deltas = await collect(make_expert(timeout_s=0.4), ask())
    assert "".join(d.content for d in deltas) == "a b c d e"


async def test_die_mid_stream_raises_after_the_yielded_deltas(server: ScriptedOpenAIServer,
                                                              make_expert: MakeExpert) -> None:
    server.push(Behaviour.die_mid_stream(after=3, text="one two three four five"))
    deltas: list[StreamDelta] = []

    with pytest.raises(ExpertUnavailable) as caught:
        await collect(make_expert(), ask(), into=deltas)

    assert [d.content for d in deltas] == ["one ", "two ", "three "]
    assert caught.value.transient
    # The client's cause in plain words: aiohttp's own named a "400" of its own, read as the expert's refusal.
    assert caught.value.message == "the connection closed before the answer was complete"


@pytest.mark.parametrize(("behaviour", "error"), [
    pytest.param(Behaviour(stall_after=1, text="a b"), ExpertTimeout, id="stall"),
    pytest.param(Behaviour(die_after=1, text="a b"), ExpertUnavailable, id="die"),
])
async def test_faults_mid_body_without_streaming(server: ScriptedOpenAIServer, make_expert: MakeExpert,
                                                 behaviour: Behaviour, error: type[ExpertError]) -> None:
    server.push(behaviour)
    with pytest.raises(error):
        await make_expert(timeout_s=0.3).generate(ask())


# --- secrets ------------------------------------------------------------------------------------------


async def test_api_key_is_sent_as_bearer_and_never_shown(server: ScriptedOpenAIServer, make_expert: MakeExpert,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("UNIT_EXPERT_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    expert = make_expert(api_key_env="UNIT_EXPERT_KEY", timeout_s=0.3)
    # Upstreams do echo a rejected key back in the error body; it must not reach our message.
    server.push(Behaviour.ok("hi"), Behaviour.error(401, f"Incorrect API key provided: {SECRET}."),
                Behaviour.error(400, f"bad request from {SECRET}"), Behaviour.hang())

    assert (await expert.generate(ask())).content == "hi"
    errors = []
    for _ in range(3):
        with pytest.raises(ExpertError) as caught:
            await expert.generate(ask())
        errors.append(caught.value)

    assert server.headers[0]["authorization"] == f"Bearer {SECRET}"
    assert [type(e) for e in errors] == [ExpertAuthError, ExpertRejected, ExpertTimeout]
    # The client's cause says what happened in fixed words; the upstream's text, scrubbed, is in the log alone.
    assert "the expert refused the router's credentials" in str(errors[0])
    assert "Incorrect API key" not in str(errors[0]) and "Incorrect API key provided: ***." in caplog.text
    shown = [str(e) for e in errors] + [repr(e) for e in errors] + [json.dumps(e.to_dict()) for e in errors]
    shown += [repr(expert), caplog.text]
    assert all(SECRET not in text for text in shown)


@pytest.mark.parametrize("streaming", [False, True], ids=["generate", "stream"])
async def test_endpoint_credentials_echoed_upstream_are_never_shown(server: ScriptedOpenAIServer,
                                                                    make_expert: MakeExpert, streaming: bool,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """``http://user:password@host`` is sent as ``Authorization: Basic``; an upstream that echoes the header, the
    password (as written or percent-decoded) or the pair gets each scrubbed, as the bearer key is."""
    caplog.set_level(logging.DEBUG)
    password = "pw%40Url-SECRET-9"  # sent decoded: pw@Url-SECRET-9
    basic = base64.b64encode(b"bob:pw@Url-SECRET-9").decode()
    expert = make_expert(endpoint=server.url.replace("http://", f"http://bob:{password}@"))
    echo = (f"bad Authorization: Basic {basic} (unpadded {basic.rstrip('=')}), user bob:pw@Url-SECRET-9, "
            f"password {password} / pw@Url-SECRET-9")
    server.push(Behaviour.error(401, echo))
    with pytest.raises(ExpertAuthError) as caught:
        await (collect(expert, ask()) if streaming else expert.generate(ask()))
    assert server.headers[0]["authorization"] == f"Basic {basic}"
    assert caught.value.message.startswith("HTTP 401: the expert refused the router's credentials")
    assert "bad Authorization: Basic *** (unpadded ***), user ***" in caplog.text
    shown = [caught.value.message, json.dumps(caught.value.to_dict()), repr(expert), caplog.text]
    assert not [text for text in shown for secret in ("Url-SECRET", basic.rstrip("=")) if secret in text]


@pytest.mark.parametrize("padding", [" ", "\n", "\t \r\n"])
async def test_a_key_with_surrounding_whitespace_is_sent_and_scrubbed_stripped(
        server: ScriptedOpenAIServer, make_expert: MakeExpert, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, padding: str) -> None:
    """A key mounted from a file ends in a newline, which no header may carry; one pasted with a space is sent
    trimmed by some clients and echoed trimmed. Either way the stripped key is what is sent and scrubbed."""
    monkeypatch.setenv("UNIT_EXPERT_KEY", f"{padding}{SECRET}{padding}")
    caplog.set_level(logging.DEBUG)
    expert = make_expert(api_key_env="UNIT_EXPERT_KEY")
    server.push(Behaviour.ok("hi"), Behaviour.error(401, f"Incorrect API key provided: {SECRET}."))
    assert (await expert.generate(ask())).content == "hi"
    with pytest.raises(ExpertAuthError) as caught:
        await expert.generate(ask())
    assert server.headers[0]["authorization"] == f"Bearer {SECRET}"
    assert caught.value.message.startswith("HTTP 401: the expert refused the router's credentials")
    assert "Incorrect API key provided: ***." in caplog.text
    assert SECRET not in caplog.text


@pytest.mark.parametrize("streaming", [False, True], ids=["generate", "stream"])
async def test_a_key_echoed_in_an_errors_labels_or_headers_is_scrubbed_from_the_log(
        server: ScriptedOpenAIServer, make_expert: MakeExpert, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, streaming: bool) -> None:
    """The log line of an error status holds the error's type and code and its Retry-After: an upstream that
    echoes the key there (a key fits the label pattern) had it logged in the clear. Labels are scrubbed now, and
    Retry-After is logged as the wait read from it; a refused credential's text is logged (scrubbed) and the
    client's cause is fixed words, so part of a key echoed back reaches no client."""
    monkeypatch.setenv("UNIT_EXPERT_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    expert = make_expert(api_key_env="UNIT_EXPERT_KEY")
    labelled = {"error": {"message": "no", "type": SECRET, "code": SECRET}}
    server.push(Behaviour.raw(json.dumps(labelled).encode(), status=401),
                Behaviour.error(429, "slow down", retry_after=f"Bearer {SECRET}"),
                Behaviour.error(429, "slow down", retry_after="3"),
                Behaviour.raw(json.dumps({"detail": [{"type": SECRET, "msg": "x"}]}).encode(), status=422),
                Behaviour.error(403, f"key {SECRET[:-4]}... is not allowed"))
    errors = []
    for _ in range(5):
        with pytest.raises(ExpertError) as caught:
            await (collect(expert, ask()) if streaming else expert.generate(ask()))
        errors.append(caught.value)
    logged = [r.getMessage() for r in caplog.records if r.name == "experts.openai_compat"]
    assert SECRET not in caplog.text and len(logged) == 5
    assert "(type ***, code ***)" in logged[0] and "(Retry-After unreadable)" in logged[1]
    assert "(Retry-After: 3s)" in logged[2] and "(type ***)" in logged[3]
    assert f"key {SECRET[:-4]}..." in logged[4]  # the operator's log has the upstream's words
    assert all(SECRET[:-4] not in json.dumps(e.to_dict()) for e in errors)
    assert [type(errors[0]), type(errors[4])] == [ExpertAuthError, ExpertAuthError]


@pytest.mark.parametrize("streaming", [False, True], ids=["generate", "stream"])
@pytest.mark.parametrize("kind", ["vllm", "router"])
async def test_only_a_router_experts_moe_field_is_taken_as_its_trace(
        server: ScriptedOpenAIServer, make_expert: MakeExpert, monkeypatch: pytest.MonkeyPatch,
        kind: str, streaming: bool) -> None:
    """Any upstream's own top-level ``moe`` object reached clients as a nested routing trace, one that could hold
    the router's own key; only another moe-router's is taken (the class a ``type: router`` expert calls it over
    HTTP with, ``SENDS_TRACE``), with this expert's credentials scrubbed from it."""
    from router.hierarchy import _RouterEndpoint

    monkeypatch.setenv("UNIT_EXPERT_KEY", SECRET)
    expert = make_expert(type=kind, api_key_env="UNIT_EXPERT_KEY",
                         **({"model": "auto"} if kind == "router" else {}))
    if kind == "router":
        expert = _RouterEndpoint(expert.config)
    trace = {"echo": f"Bearer {SECRET}", "attempts": [{"expert": SECRET, "ok": True}], "cost_usd": 0.5}
    if streaming:
        chunk = {"id": "c", "object": "chat.completion.chunk", "model": "m",
                 "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}], "moe": trace}
        server.push(Behaviour.raw(sse(chunk) + b"data: [DONE]\n\n", content_type="text/event-stream"))
        nested = [d for d in await collect(expert, ask()) if d.finish_reason][-1].nested
    else:
        body = {"id": "c", "object": "chat.completion", "model": "m", "moe": trace,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]}
        server.push(Behaviour.raw(json.dumps(body).encode()))
        nested = (await expert.generate(ask())).nested
    if kind == "router":
        await expert.aclose()
        assert nested == {"echo": "Bearer ***", "attempts": [{"expert": "***", "ok": True}], "cost_usd": 0.5}
    else:
        assert nested is None


@pytest.mark.parametrize(("body", "param"), [
    ({"error": {"message": "top_logprobs too large", "type": "BadRequestError", "param": "logprobs", "code": 400}},
     "logprobs"),
    ({"object": "error", "message": "too long", "param": "messages[0].content", "code": 400}, "messages[0].content"),
    ({"error": {"message": "bad", "param": None}}, None),
    ({"error": {"message": "bad", "param": ["a"]}}, None),
    ({"detail": "bad"}, None),
])
async def test_a_refusal_keeps_the_field_the_expert_blamed(server: ScriptedOpenAIServer, make_expert: MakeExpert,
                                                           body: dict[str, Any], param: str | None) -> None:
    server.push(Behaviour.raw(json.dumps(body).encode(), status=400))
    with pytest.raises(ExpertRejected) as caught:
        await make_expert().generate(ask())
    assert caught.value.param == param


async def test_no_key_means_no_authorization_header(server: ScriptedOpenAIServer, make_expert: MakeExpert,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UNIT_MISSING_KEY", raising=False)
    await make_expert(api_key_env="UNIT_MISSING_KEY").generate(ask())
    await make_expert().generate(ask())
    assert [("authorization" in h) for h in server.headers] == [False, False]


# --- connections --------------------------------------------------------------------------------------


async def test_connections_are_pooled_and_released(server: ScriptedOpenAIServer, make_expert: MakeExpert) -> None:
    expert = make_expert()
    for _ in range(5):
        await expert.generate(ask())
    for _ in range(3):
        await collect(expert, ask())

    assert len(server.requests) == 8
    assert server.connections_total == 1
    await expert.aclose()
    assert server.wait_for(lambda s: s.open_connections == 0)


async def test_pool_is_sized_by_max_concurrency(server: ScriptedOpenAIServer, make_expert: MakeExpert) -> None:
    server.default = Behaviour.slow("x", delay_s=0.1)
    expert = make_expert(max_concurrency=2)
    replies = await asyncio.gather(*(expert.generate(ask()) for _ in range(6)))
    assert [r.content for r in replies] == ["x"] * 6
    assert server.connections_total == 2


async def test_a_full_pool_is_overloaded(server: ScriptedOpenAIServer, make_expert: MakeExpert) -> None:
    # The first call holds the only connection for ~1 s, with no gap as long as the 0.3 s timeout.
    server.push(Behaviour.slow("a b c d e f g h i j", token_delay_s=0.1))
    expert = make_expert(max_concurrency=1, timeout_s=0.3)
    holder = asyncio.create_task(collect(expert, ask()))
    await asyncio.sleep(0.05)
    with pytest.raises(ExpertOverloaded):
        await expert.generate(ask())
    assert "".join(d.content for d in await holder) == "a b c d e f g h i j"


async def test_abandoned_stream_frees_its_connection(server: ScriptedOpenAIServer, make_expert: MakeExpert) -> None:
    server.push(Behaviour.slow("a b c d e f", token_delay_s=0.05))
    expert = make_expert(max_concurrency=1)
    stream = cast(AsyncGenerator[StreamDelta, None], expert.stream(ask()))
    first = await anext(stream)
    await stream.aclose()
    assert first.content == "a "
    assert (await expert.generate(ask())).content == "answer from unit"


async def test_injected_transport_replaces_the_network(make_expert: MakeExpert) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"model": "m", "choices": [
            {"message": {"role": "assistant", "content": "mocked"}, "finish_reason": "stop"}]})

    expert = make_expert(ExpertContext(transport=httpx.MockTransport(handler)), endpoint="http://nowhere.test/v1/")
    reply = await expert.generate(ask())
    assert reply.content == "mocked" and reply.model == "m"
    # No usage in the answer: estimated ("one two three" is 13 characters, "mocked" 6), not counted as free.
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage_estimated) == (3, 2, True)
    assert [str(r.url) for r in seen] == ["http://nowhere.test/v1/chat/completions"]


async def test_a_negative_upstream_cost_is_no_price(server: ScriptedOpenAIServer, make_expert: MakeExpert) -> None:
    server.push(Behaviour.ok("fine", cost=-0.05), Behaviour.ok("fine", cost=0.05))
    expert = make_expert()
    negative, priced = await expert.generate(ask()), await expert.generate(ask())
    assert negative.cost_usd == pytest.approx(expert.cost(negative.usage)) and negative.cost_usd >= 0
    assert priced.cost_usd == pytest.approx(0.05)


@pytest.mark.parametrize(("code", "status"), [("all_experts_failed", 503), ("rejected_by_experts", 400),
                                              ("internal_error", 500), (503, 503), ("something_else", 500)])
def test_an_error_event_in_a_stream_stands_for_its_status(code: object, status: int, make_expert: MakeExpert) -> None:
    """Another moe-router's stream that fails mid-way sends its error code, not a status: all_experts_failed is
    its 503 (as its service would have answered before the stream began), not a 500."""
    event = json.dumps({"error": {"message": "every candidate expert failed", "type": "x", "code": code}})
    with pytest.raises(ExpertHTTPError) as failed:
        make_expert()._decode(event.encode())
    assert failed.value.status == status
