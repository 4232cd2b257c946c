"""How the SDK fails: one exception type, ``RouterAPIError``, whatever went wrong and wherever the router runs.
A service that cannot be reached or does not answer in time raises its subclass ``RouterConnectionError``; an
error answer keeps its status, code and headers; ``LocalRouter`` raises what ``Client`` would."""

from __future__ import annotations

import asyncio
import email.utils
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from experts.errors import ExpertRateLimited, ExpertUnavailable
from router.feedback import SqliteFeedbackStore
from router.orchestrator import Orchestrator
from router.sdk import AsyncClient, Client, LocalRouter, RouterAPIError, RouterConnectionError
from router.service import create_app
from tests.doubles.fakes import FakeExpert, FakeGate, fake_config
from tests.doubles.scripted_server import Behaviour, ScriptedOpenAIServer

NAMES = ["math", "code"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_service_that_cannot_be_reached_is_a_router_connection_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with Client(url) as client, pytest.raises(RouterConnectionError) as sync:
        client.chat("hi")
    async with AsyncClient(url) as aclient:
        with pytest.raises(RouterConnectionError) as asynced:
            await aclient.route("hi")
        with pytest.raises(RouterConnectionError):
            [c async for c in aclient.stream("hi")]
    for info in (sync, asynced):
        assert isinstance(info.value, RouterAPIError)  # one except clause covers every failure
        assert (info.value.status, info.value.code) == (0, "connection_error")
        assert str(info.value).startswith(f"cannot reach the service POST {url}/v1/")


async def test_a_call_in_flight_when_another_thread_closes_the_client_says_so() -> None:
    """A thread's call failed with "cannot reach the service ...: [Errno 9] Bad file descriptor" (or a timeout)
    once another thread closed the shared client: the service was reached, the client was closed."""
    with ScriptedOpenAIServer(name="slow") as server:
        server.default = Behaviour.hang()
        client = Client(server.url.removesuffix("/v1"), timeout=1.0)
        failed: list[BaseException] = []

        def call() -> None:
            try:
                client.chat("hi")
            except RouterConnectionError as exc:
                failed.append(exc)

        thread = threading.Thread(target=call)
        thread.start()
        await asyncio.sleep(0.3)
        client.close()
        await asyncio.to_thread(thread.join, 10)
    assert len(failed) == 1 and client.closed
    assert str(failed[0]).startswith("the client was closed (close()) while the call POST ")
    assert getattr(failed[0], "code", None) == "connection_error"


async def test_a_service_that_does_not_answer_in_time_is_a_timeout_naming_it() -> None:
    with ScriptedOpenAIServer(name="slow") as server:
        server.default = Behaviour.hang()
        async with AsyncClient(server.url.removesuffix("/v1"), timeout=0.3) as client:
            with pytest.raises(RouterConnectionError) as info:
                await client.chat("hi")
    assert info.value.code == "timeout" and "within the 0.3 s timeout" in str(info.value)


async def test_error_answers_keep_their_headers_and_odd_bodies_do_not_crash() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/route":
            return httpx.Response(429, json={"error": "slow down"}, headers={"retry-after": "7"})
        return httpx.Response(200, text="<html>not json</html>")

    async with AsyncClient("http://router", transport=httpx.MockTransport(answer)) as client:
        with pytest.raises(RouterAPIError) as limited:
            await client.route("hi")
        with pytest.raises(RouterAPIError) as garbled:
            await client.experts()
    assert (limited.value.status, limited.value.message, limited.value.retry_after_s) == (429, "slow down", 7.0)
    assert garbled.value.code == "invalid_response" and "not JSON" in garbled.value.message


WRONG_SHAPES = {"object": {"status": "ok"}, "array": [1, 2], "nested": {"choices": [{"message": "hi"}],
                                                                   "assignments": [{"expert": 3}], "data": [7]}}


@pytest.mark.parametrize("shape", WRONG_SHAPES)
async def test_json_of_another_shape_is_an_invalid_response_naming_what_was_expected(shape: str) -> None:
    """A 200 whose JSON is not the answer asked for (a wrong base_url reaching another service, a proxy's status
    page) raises ``RouterAPIError`` ``invalid_response`` from every method of both clients, quoting the body; it
    raised KeyError or pydantic's ValidationError."""
    body = WRONG_SHAPES[shape]
    event = httpx.Response(200, text=f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n",
                           headers={"content-type": "text/event-stream"})

    def answer(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content or b"{}").get("stream"):
            return httpx.Response(200, content=event.content, headers=event.headers)
        return httpx.Response(200, json=body)

    expected = {"chat": "a chat completion", "route": "a route decision", "route_batch": "a batch's assignments",
                "experts": "a list of experts", "feedback": "a feedback record"}
    calls = {"chat": (("hi",), {}), "route": (("hi",), {}), "route_batch": ((["hi"],), {}), "experts": ((), {}),
             "feedback": ((), {"request_id": "chatcmpl-1", "good": True})}
    with Client("http://router", transport=httpx.MockTransport(answer)) as client:
        for method, (args, kwargs) in calls.items():
            with pytest.raises(RouterAPIError) as info:
                getattr(client, method)(*args, **kwargs)
            error = info.value
            assert (error.status, error.code) == (200, "invalid_response"), (method, error)
            assert f"with JSON that is not {expected[method]}" in error.message, error.message
            assert json.dumps(body, separators=(",", ":"))[:20] in error.message
        with pytest.raises(RouterAPIError) as streamed:  # an event of another shape; it was taken as no chunk
            list(client.stream("hi"))
        assert streamed.value.code == "invalid_response"
        assert ("not a JSON object" if shape == "array" else "not a chat completion chunk") in streamed.value.message
    async with AsyncClient("http://router", transport=httpx.MockTransport(answer)) as aclient:
        for method, (args, kwargs) in calls.items():
            with pytest.raises(RouterAPIError) as ainfo:
                await getattr(aclient, method)(*args, **kwargs)
            assert ainfo.value.code == "invalid_response" and expected[method] in ainfo.value.message


async def test_local_router_raises_what_the_client_would() -> None:
    config = fake_config(NAMES)
    down = {n: FakeExpert(config.expert(n), fail=lambda x: ExpertUnavailable(x, "refused")) for n in NAMES}
    orchestrator = Orchestrator(config, FakeGate(NAMES, {}, default=[0.6, 0.4]), down)
    local = LocalRouter(orchestrator)
    with pytest.raises(RouterAPIError) as local_failed:
        await local.chat("hi")
    with pytest.raises(RouterAPIError) as local_unknown:
        await local.chat("hi", model="gpt-9")
    async with AsyncClient("http://router", transport=httpx.ASGITransport(app=create_app(orchestrator))) as client:
        with pytest.raises(RouterAPIError) as served_failed:
            await client.chat("hi")
        with pytest.raises(RouterAPIError) as served_unknown:
            await client.chat("hi", model="gpt-9")
    for local_error, served_error in ((local_failed, served_failed), (local_unknown, served_unknown)):
        assert (local_error.value.status, local_error.value.code) == (served_error.value.status,
                                                                    served_error.value.code)
    assert local_failed.value.code == "all_experts_failed" and local_unknown.value.status == 404
    # type and param as the openai SDK's APIError has them, in process and served alike
    for error in (local_unknown, served_unknown):
        assert (error.value.type, error.value.param) == ("invalid_request_error", "model"), error.value.body
    assert [c["expert"] for c in local_failed.value.body["error"]["causes"]] == ["math", "code"]


async def test_local_router_refuses_a_bad_request_as_the_service_does() -> None:
    config = fake_config(NAMES)
    orchestrator = Orchestrator(config, FakeGate(NAMES, {}, default=[0.6, 0.4]),
                                {n: FakeExpert(config.expert(n)) for n in NAMES})
    local = LocalRouter(orchestrator)
    async with AsyncClient("http://router", transport=httpx.ASGITransport(app=create_app(orchestrator))) as client:
        for bad in ({"messages": []}, {"n": 2}, {"messages": "x" * (config.service.max_prompt_chars + 1)}):
            messages = bad.pop("messages", "hi")
            with pytest.raises(RouterAPIError) as local_error:
                await local.chat(messages, **bad)  # type: ignore[arg-type]
            with pytest.raises(RouterAPIError) as served_error:
                await client.chat(messages, **bad)  # type: ignore[arg-type]
            assert local_error.value.status == served_error.value.status == 400
            assert local_error.value.body == served_error.value.body



async def test_local_router_refuses_what_json_cannot_carry_before_any_expert_is_called(tmp_path: Path) -> None:
    """A lone surrogate (a string decoded with surrogateescape, an emoji cut in half) or NaN cannot come to the
    service as JSON: its 400 invalid_json. In process they used to reach the expert, and a lone surrogate then
    failed the feedback store's write: a raw UnicodeEncodeError after the expert was paid."""
    config = fake_config(NAMES)
    experts = {n: FakeExpert(config.expert(n)) for n in NAMES}
    orchestrator = Orchestrator(config, FakeGate(NAMES, {}, default=[0.6, 0.4]), experts)
    local = LocalRouter(orchestrator, SqliteFeedbackStore(tmp_path / "fb.sqlite3"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(orchestrator)),
                                 base_url="http://router") as raw:
        served = await raw.post("/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": '
                                                                 b'"boil an egg \\ud800"}]}',
                                headers={"content-type": "application/json"})
    assert served.status_code == 400 and served.json()["error"]["code"] == "invalid_json"
    cut = "boil an egg \ud800"
    calls: list[tuple[str, object]] = [
        ("chat", local.chat(cut)), ("stream", _drain(local.stream(cut))), ("route", local.route(cut)),
        ("route_batch", local.route_batch(["fine", cut])), ("feedback", local.feedback(query=cut, good=True)),
        ("NaN", local.chat("hi", temperature=float("nan"))), ("datetime", local.chat("hi", user=time))]
    for what, call in calls:
        with pytest.raises(RouterAPIError) as refused:
            await call  # type: ignore[misc]
        assert (refused.value.status, refused.value.code) == (400, "invalid_json"), what
        assert "not valid JSON" in str(refused.value), what
    assert not any(e.requests for e in experts.values())
    await local.aclose()



async def test_local_router_reads_its_arguments_as_the_service_reads_json(tmp_path: Path) -> None:
    """What a Python caller hands over beside plain values is taken in its JSON form, as before the check:
    pydantic messages, numpy numbers, any mapping. Nesting past the service's limit is its 400, not a
    RecursionError."""
    from types import MappingProxyType

    import numpy as np

    from experts.types import ChatMessage

    config = fake_config(NAMES)
    experts = {n: FakeExpert(config.expert(n)) for n in NAMES}
    local = LocalRouter(Orchestrator(config, FakeGate(NAMES, {}, default=[0.6, 0.4]), experts),
                        SqliteFeedbackStore(tmp_path / "fb.sqlite3"))
    answer = await local.chat([ChatMessage(role="user", content="hi")], temperature=np.float32(0.5))
    assert answer.expert == "math" and experts["math"].requests[-1].temperature == 0.5
    await local.chat([MappingProxyType({"role": "user", "content": "hi"})])  # type: ignore[list-item]
    # A model is taken in its wire form, by its aliases, as the openai SDK sends it: a JSON schema's "schema".
    from openai.types.shared.response_format_json_schema import JSONSchema, ResponseFormatJSONSchema

    shaped = ResponseFormatJSONSchema(type="json_schema",
                                      json_schema=JSONSchema(name="answer", schema={"type": "object"}))
    await local.chat("hi", response_format=shaped)
    sent = experts["math"].requests[-1].model_dump(exclude_none=True)["response_format"]["json_schema"]
    assert sent == {"name": "answer", "schema": {"type": "object"}}
    saved = await local.feedback(request_id=answer.id, score=np.float32(0.5))
    assert saved.score == 0.5
    for depth in (129, 5000):
        deep: object = "x"
        for _ in range(depth):
            deep = [deep]
        with pytest.raises(RouterAPIError) as refused:
            await local.chat("hi", metadata={"deep": deep})
        assert (refused.value.status, refused.value.code) == (400, "invalid_json")
        assert "nested" in str(refused.value)
    await local.aclose()

async def _drain(stream: object) -> list[object]:
    return [c async for c in stream]  # type: ignore[attr-defined]

async def test_local_router_streams_as_the_client_does() -> None:
    """Chunks, fallback before the first token, continuation mid-stream, and the errors, in process."""
    config = fake_config(NAMES)
    math = FakeExpert(config.expert("math"), pieces=["one ", "two ", "three"], fail_after=2,
                      fail=lambda n: ExpertUnavailable(n, "peer closed"))
    code = FakeExpert(config.expert("code"), pieces=["three"])
    orchestrator = Orchestrator(config, FakeGate(NAMES, {}, default=[0.6, 0.4]), {"math": math, "code": code})
    local = LocalRouter(orchestrator)
    chunks = [c async for c in local.stream("hi")]
    assert "".join(c.content for c in chunks) == "one two three"
    assert [c.expert for c in chunks[:-1]] == ["math", "math", "code"] and len({c.id for c in chunks}) == 1
    last = chunks[-1]
    assert last.finish_reason == "stop" and last.expert == "code" and last.trace is not None
    assert last.trace.switches[0]["from"] == "math"
    with pytest.raises(RouterAPIError) as mixed:
        [c async for c in local.stream("hi", combiner="vote")]
    assert mixed.value.status == 400 and mixed.value.code == "invalid_combiner"
    with pytest.raises(RouterAPIError) as unknown:
        [c async for c in local.stream("hi", model="gpt-9")]
    assert unknown.value.status == 404

    down = {n: FakeExpert(config.expert(n), fail=lambda x: ExpertUnavailable(x, "refused")) for n in NAMES}
    with pytest.raises(RouterAPIError) as failed:
        [c async for c in LocalRouter(Orchestrator(config, FakeGate(NAMES, {}, default=[0.6, 0.4]), down))
         .stream("hi")]
    assert (failed.value.status, failed.value.code) == (503, "all_experts_failed")


def test_an_error_without_a_code_reads_without_one() -> None:
    assert str(RouterAPIError(401, {"error": {"message": "bad key"}})) == "HTTP 401: bad key"
    assert str(RouterAPIError(429, {"error": {"message": "slow down", "code": "rate_limited"}})) == \
        "HTTP 429 (rate_limited): slow down"


async def test_local_router_routes_with_the_service_s_checks() -> None:
    """``LocalRouter.route`` and ``route_batch`` refuse what ``/v1/route`` and ``/v1/route/batch`` refuse, with
    the same status and body: blank and oversized queries, unknown experts and negative room in ``capacity``."""
    config = fake_config(NAMES)
    orchestrator = Orchestrator(config, FakeGate(NAMES, {}, default=[0.6, 0.4]),
                                {n: FakeExpert(config.expert(n)) for n in NAMES})
    local = LocalRouter(orchestrator)
    too_long = "x" * (config.service.max_prompt_chars + 1)
    async with AsyncClient("http://router", transport=httpx.ASGITransport(app=create_app(orchestrator))) as client:
        for query, param in (("   ", "query"), (too_long, "query")):
            with pytest.raises(RouterAPIError) as local_error:
                await local.route(query)
            with pytest.raises(RouterAPIError) as served_error:
                await client.route(query)
            assert local_error.value.status == served_error.value.status == 400
            assert local_error.value.body == served_error.value.body
            assert local_error.value.body["error"]["param"] == param
        batches: list[tuple[list[str], dict[str, int] | None, str]] = [
            (["an integral", ""], None, "queries[1]"), (["an integral"], {"ghost": 5}, "capacity"),
            (["an integral"], {"math": -3}, "capacity.math")]
        for queries, capacity, param in batches:
            with pytest.raises(RouterAPIError) as local_error:
                await local.route_batch(queries, capacity)
            with pytest.raises(RouterAPIError) as served_error:
                await client.route_batch(queries, capacity)
            assert local_error.value.status == served_error.value.status == 400
            assert local_error.value.body == served_error.value.body
            assert local_error.value.body["error"]["param"] == param, local_error.value.body
        with pytest.raises(TypeError, match=r"not one str; for one query pass \[query\]"):
            await local.route_batch("an integral")  # would be eleven one-letter queries
        with pytest.raises(TypeError, match="not one str"):
            await client.route_batch("an integral")
    assert await local.route_batch(["an integral"], {"math": 1}) == ["math"]


async def test_a_batch_is_held_to_the_configured_size() -> None:
    config = fake_config(NAMES, service={"max_batch_queries": 3})
    orchestrator = Orchestrator(config, FakeGate(NAMES, {}, default=[0.6, 0.4]),
                                {n: FakeExpert(config.expert(n)) for n in NAMES})
    local = LocalRouter(orchestrator)
    async with AsyncClient("http://router", transport=httpx.ASGITransport(app=create_app(orchestrator))) as client:
        assert await client.route_batch(["q"] * 3) == ["math"] * 3
        with pytest.raises(RouterAPIError) as served:
            await client.route_batch(["q"] * 4)
        with pytest.raises(RouterAPIError) as in_process:
            await local.route_batch(["q"] * 4)
    assert served.value.status == in_process.value.status == 400
    assert served.value.body == in_process.value.body
    error = served.value.body["error"]
    assert error["param"] == "queries"
    assert "4 queries, over the limit of 3 a batch may carry (service.max_batch_queries)" in error["message"]


async def _stream_errors(transport: httpx.MockTransport) -> list[pytest.ExceptionInfo[RouterAPIError]]:
    """What a stream over ``transport`` raises, from ``Client`` and from ``AsyncClient``."""
    with Client("http://router", transport=transport) as client, pytest.raises(RouterAPIError) as sync:
        list(client.stream("hi"))
    async with AsyncClient("http://router", transport=transport) as aclient:
        with pytest.raises(RouterAPIError) as asynced:
            [c async for c in aclient.stream("hi")]
    return [sync, asynced]


async def test_a_stream_that_is_not_one_or_ends_early_is_an_error_not_silence() -> None:
    """A 200 that is no event stream (a proxy's page), an event that is not JSON, and a stream cut before its
    ``[DONE]`` each raise ``RouterAPIError`` naming what came back, in both clients."""
    final = ('data: {"id": "c1", "model": "math", "choices": [{"index": 0, "delta": {"content": "par"}, '
             '"finish_reason": null}]}\n\n')
    bodies = {
        "page": httpx.Response(200, text='{"oops": true}', headers={"content-type": "application/json"}),
        "garbled": httpx.Response(200, text="data: {not json\n\ndata: [DONE]\n\n",
                                  headers={"content-type": "text/event-stream"}),
        "cut": httpx.Response(200, text=final, headers={"content-type": "text/event-stream"}),
    }
    expected = {"page": ("invalid_response", "with application/json, not an event stream"),
                "garbled": ("invalid_response", "an event that is not JSON"),
                "cut": ("incomplete_stream", "ended before its [DONE] line")}
    for kind, response in bodies.items():
        transport = httpx.MockTransport(lambda request, r=response: httpx.Response(  # type: ignore[misc]
            r.status_code, content=r.content, headers=r.headers))
        for info in await _stream_errors(transport):
            code, says = expected[kind]
            assert info.value.code == code and says in info.value.message, (kind, info.value.message)
            # A stream broken off is a RouterConnectionError (status 0), as a connection that breaks is; what the
            # service did answer keeps its status.
            broken = kind == "cut"
            assert isinstance(info.value, RouterConnectionError) == broken, kind
            assert info.value.status == (0 if broken else 200), kind


async def test_an_error_mid_stream_keeps_the_stream_s_headers_and_the_status_the_service_would_have_sent() -> None:
    """An error event mid-stream lost the response's headers (its x-request-id, which the service's log line is
    under), and an internal error (the service's 500 before a stream begins) was reported as 503, which a caller
    retries as an outage."""
    started = ('data: {"id": "c1", "model": "math", "choices": [{"index": 0, "delta": {"content": "par"}, '
               '"finish_reason": null}]}\n\n')
    events = {
        500: {"error": {"message": "internal error (KeyError) while handling a stream; the service log has the "
                                   "details", "type": "server_error", "param": None, "code": "internal_error"}},
        503: {"error": {"message": "every expert failed", "type": "server_error", "param": None,
                        "code": "all_experts_failed"}},
    }
    for status, event in events.items():
        text = f"{started}data: {json.dumps(event)}\n\ndata: [DONE]\n\n"
        transport = httpx.MockTransport(lambda request, t=text: httpx.Response(  # type: ignore[misc]
            200, text=t, headers={"content-type": "text/event-stream", "x-request-id": "req-7"}))
        for info in await _stream_errors(transport):
            assert (info.value.status, info.value.code) == (status, event["error"]["code"])
            assert info.value.headers.get("x-request-id") == "req-7"
    transport = httpx.MockTransport(lambda request: httpx.Response(
        200, text=started, headers={"content-type": "text/event-stream", "x-request-id": "req-8"}))
    with Client("http://router", transport=transport) as client, pytest.raises(RouterConnectionError) as cut:
        list(client.stream("hi"))
    assert cut.value.code == "incomplete_stream" and cut.value.headers.get("x-request-id") == "req-8"


def test_an_async_client_serves_one_event_loop_after_another() -> None:
    """An AsyncClient used in a second asyncio.run raised a bare RuntimeError ("Event loop is closed"): its
    connections were the first loop's. Each loop now gets connections of its own."""
    event = (b'data: {"id": "x", "model": "m", "choices": [{"index": 0, "delta": {"content": "ok"}, '
             b'"finish_reason": "stop"}]}\n\ndata: [DONE]\n\n')
    with ScriptedOpenAIServer(name="svc") as server:
        server.default = Behaviour.raw(event, content_type="text/event-stream")
        client = AsyncClient(server.url.removesuffix("/v1"))

        async def ask() -> list[str]:
            return [c.content async for c in client.stream("hi")]

        assert asyncio.run(ask()) == ["ok"]
        assert asyncio.run(ask()) == ["ok"]  # the first loop is closed now
        asyncio.run(client.aclose())
        with pytest.raises(RuntimeError, match="closed"):  # closed stays closed, on any loop
            asyncio.run(ask())
        # Closed from another loop than the one still running and using it: that one's calls are refused too.
        other = AsyncClient(server.url.removesuffix("/v1"))
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        try:
            assert asyncio.run_coroutine_threadsafe(_ask(other), loop).result(10) == ["ok"]
            asyncio.run(other.aclose())
            with pytest.raises(RuntimeError, match="closed"):
                asyncio.run_coroutine_threadsafe(_ask(other), loop).result(10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)
            loop.run_until_complete(loop.shutdown_asyncgens())  # its connections close with it
            loop.close()


async def _ask(client: AsyncClient) -> list[str]:
    return [c.content async for c in client.stream("hi")]


def test_a_stream_the_service_ends_before_its_done_line_is_a_router_connection_error() -> None:
    """Over real HTTP: the service (or a proxy) ends the response cleanly, but before ``data: [DONE]``."""
    cut = (b'data: {"id": "x", "model": "m", "choices": [{"index": 0, "delta": {"content": "half an ans"}, '
           b'"finish_reason": null}]}\n\n')
    with ScriptedOpenAIServer(name="svc") as server:
        server.push(Behaviour.raw(cut, content_type="text/event-stream"))
        pieces: list[str] = []
        with Client(server.url.removesuffix("/v1")) as client, pytest.raises(RouterConnectionError) as info:
            for chunk in client.stream("hi"):
                pieces.append(chunk.content)
    assert pieces == ["half an ans"]
    assert (info.value.status, info.value.code) == (0, "incomplete_stream")
    assert "ended before its [DONE] line" in str(info.value)


async def test_an_httpx_timeout_is_taken_and_named_when_it_runs_out() -> None:
    with ScriptedOpenAIServer(name="slow") as server:
        server.default = Behaviour.hang()
        url = server.url.removesuffix("/v1")
        with Client(url, timeout=httpx.Timeout(0.3)) as client, pytest.raises(RouterConnectionError) as same:
            client.chat("hi")
        async with AsyncClient(url, timeout=httpx.Timeout(5.0, read=0.3)) as aclient:
            with pytest.raises(RouterConnectionError) as phased:
                await aclient.chat("hi")
    assert same.value.code == phased.value.code == "timeout"
    assert "within the 0.3 s timeout (ReadTimeout)" in str(same.value)
    assert "within the 0.3 s read timeout (ReadTimeout)" in str(phased.value)


async def test_a_call_s_timeout_is_its_http_timeout_and_never_sent() -> None:
    """As in the OpenAI SDK: ``chat(..., timeout=)`` and ``stream(..., timeout=)`` time that call (over the
    client's 120 s), and are not request fields for the expert."""
    with ScriptedOpenAIServer(name="svc") as server:
        url = server.url.removesuffix("/v1")
        server.default = Behaviour.ok("in time")
        server.push(Behaviour.slow("late", delay_s=3), Behaviour.slow("late", delay_s=3))
        with Client(url) as client, pytest.raises(RouterConnectionError) as sync:
            client.chat("hi", timeout=0.3)
        async with AsyncClient(url) as aclient:
            with pytest.raises(RouterConnectionError) as streamed:
                [c async for c in aclient.stream("hi", timeout=httpx.Timeout(0.3))]
            assert (await aclient.chat("hi", timeout=30)).content == "in time"
        with Client(url) as client:
            assert "".join(c.content for c in client.stream("hi", timeout=None)) == "in time"
        assert server.wait_for(lambda s: len(s.requests) == 4)
        assert all("timeout" not in body for body in server.requests)
    for info in (sync, streamed):
        assert info.value.code == "timeout" and "within the 0.3 s timeout" in str(info.value)


async def test_the_local_router_refuses_a_call_s_timeout() -> None:
    """In process there is no HTTP request to time: ``timeout=`` is refused before anything runs, rather than
    sent to the experts as a request field."""
    config = fake_config(NAMES)
    math = FakeExpert(config.expert("math"))
    orchestrator = Orchestrator(config, FakeGate(NAMES, {}, default=[0.6, 0.4]),
                                {"math": math, "code": FakeExpert(config.expert("code"))})
    local = LocalRouter(orchestrator)
    with pytest.raises(TypeError, match=r"LocalRouter.chat\(\) takes no timeout= argument .*pass deadline_s="):
        await local.chat("hi", timeout=1.0)
    with pytest.raises(TypeError, match=r"LocalRouter.stream\(\) takes no timeout= argument"):
        local.stream("hi", timeout=1.0)
    assert math.requests == []


@pytest.mark.parametrize(("header", "wait"), [("7", 7.0), ("0.5", 0.5), ("-3", 0.0), ("soon", None), ("", None)])
def test_retry_after_in_seconds(header: str, wait: float | None) -> None:
    assert RouterAPIError(503, {"error": {"message": "down"}}, {"retry-after": header}).retry_after_s == wait


def test_retry_after_as_an_http_date_is_the_seconds_until_it() -> None:
    """RFC 9110 allows Retry-After as an HTTP date (proxies and gateways send it): read as seconds from now,
    never negative. Over real HTTP, as the service's (or a proxy's) answer."""
    with ScriptedOpenAIServer(name="svc") as server:
        server.push(Behaviour.error(503, "down", retry_after=email.utils.formatdate(time.time() + 60, usegmt=True)))
        with Client(server.url.removesuffix("/v1")) as client, pytest.raises(RouterAPIError) as info:
            client.chat("hi")
    wait = info.value.retry_after_s
    assert wait is not None and 30 < wait <= 60
    past = email.utils.formatdate(time.time() - 60, usegmt=True)
    assert RouterAPIError(503, {}, {"Retry-After": past}).retry_after_s == 0.0


def test_a_sync_client_refuses_an_async_transport_at_once() -> None:
    """``httpx.ASGITransport`` serves ``AsyncClient`` only: ``Client`` says so, rather than failing on its first
    request with an AttributeError."""
    config = fake_config(NAMES)
    app = create_app(Orchestrator(config, FakeGate(NAMES, {}, default=[0.6, 0.4]),
                                  {n: FakeExpert(config.expert(n)) for n in NAMES}))
    with pytest.raises(TypeError, match=r"Client takes a sync transport .* not ASGITransport, which is async"):
        Client("http://router", transport=httpx.ASGITransport(app=app))  # type: ignore[arg-type]


@pytest.mark.parametrize("transport", [httpx.HTTPTransport(), httpx.WSGITransport(app=lambda env, start: [])])
def test_an_async_client_refuses_a_sync_transport(transport: httpx.BaseTransport) -> None:
    """The mirror of ``Client``'s check: a sync transport failed ``AsyncClient``'s first call with an
    AttributeError (``handle_async_request``), and its close with another."""
    with pytest.raises(TypeError, match=rf"AsyncClient takes an async transport .* not {type(transport).__name__}, "
                                        "which is sync: use Client with it"):
        AsyncClient("http://router", transport=transport)  # type: ignore[arg-type]
    transport.close()


async def test_a_closed_local_router_says_so(tmp_path: Path) -> None:
    """After ``aclose`` (or its ``async with``), every call and a second ``async with`` raise a RuntimeError
    saying it is closed, not the feedback store's sqlite3 error."""
    config = fake_config(NAMES)
    orchestrator = Orchestrator(config, FakeGate(NAMES, {}, default=[0.6, 0.4]),
                                {n: FakeExpert(config.expert(n)) for n in NAMES})
    local = LocalRouter(orchestrator, SqliteFeedbackStore(tmp_path / "fb.sqlite3"))
    async with local:
        answer = await local.chat("hi")
    closed = "this LocalRouter is closed"
    with pytest.raises(RuntimeError, match=closed):
        async with local:
            pass
    with pytest.raises(RuntimeError, match=closed):
        await local.chat("hi")
    with pytest.raises(RuntimeError, match=closed):
        [c async for c in local.stream("hi")]
    with pytest.raises(RuntimeError, match=closed):
        await local.route("hi")
    with pytest.raises(RuntimeError, match=closed):
        await local.route_batch(["hi"])
    with pytest.raises(RuntimeError, match=closed):
        await local.feedback(request_id=answer.id, good=True)
    await local.aclose()  # a second close does nothing


async def test_every_expert_rate_limited_reads_the_same_retry_after_in_process_and_over_http() -> None:
    config = fake_config(NAMES)

    def limited(wait: float):  # type: ignore[no-untyped-def]
        return lambda name: ExpertRateLimited(name, 429, "slow down", retry_after_s=wait)

    def router() -> Orchestrator:
        experts = {"math": FakeExpert(config.expert("math"), fail=limited(4.5)),
                   "code": FakeExpert(config.expert("code"), fail=limited(1.2))}
        return Orchestrator(config, FakeGate(NAMES, {}, default=[0.6, 0.4]), experts)

    with pytest.raises(RouterAPIError) as local:
        await LocalRouter(router()).chat("hi")
    with pytest.raises(RouterAPIError) as local_stream:  # failing before its first chunk: the same answer
        [c async for c in LocalRouter(router()).stream("hi")]
    assert local_stream.value.retry_after_s == 2.0
    async with AsyncClient("http://router", transport=httpx.ASGITransport(app=create_app(router()))) as client:
        with pytest.raises(RouterAPIError) as served:
            await client.chat("hi")
    assert local.value.status == served.value.status == 503
    assert local.value.retry_after_s == served.value.retry_after_s == 2.0  # the soonest, 1.2 s, in whole seconds


async def test_the_client_and_the_local_router_stream_the_same_chunks() -> None:
    config = fake_config(NAMES)

    def router() -> Orchestrator:
        experts = {n: FakeExpert(config.expert(n), pieces=[f"{n} ", "says ", "hi"]) for n in NAMES}
        return Orchestrator(config, FakeGate(NAMES, {}, default=[0.6, 0.4]), experts)

    local = [(c.content, c.expert, c.finish_reason) async for c in LocalRouter(router()).stream("hi")]
    async with AsyncClient("http://router", transport=httpx.ASGITransport(app=create_app(router()))) as client:
        served = [(c.content, c.expert, c.finish_reason) async for c in client.stream("hi")]
    assert local == served == [("math ", "math", None), ("says ", "math", None), ("hi", "math", None),
                               ("", "math", "stop")]


@pytest.mark.parametrize("base_url", ["http://router", "http://router/", "http://router/v1", "http://router/v1/"])
async def test_an_openai_style_base_url_ending_in_v1_reaches_the_same_service(base_url: str) -> None:
    """The URL an OpenAI client is given (…/v1) is the URL users have at hand; the SDK's own paths start at /v1,
    so the suffix is taken off rather than asking /v1/v1/… for a 404."""
    config = fake_config(["math", "code"])
    experts = {n: FakeExpert(config.expert(n), text=f"{n} says hi") for n in ("math", "code")}
    app = create_app(Orchestrator(config, FakeGate(["math", "code"], {}, default=[0.8, 0.2]), experts), environ={})
    async with AsyncClient(base_url, transport=httpx.ASGITransport(app=app)) as client:
        assert (await client.chat("hi")).content == "math says hi"
    asked: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        return httpx.Response(200, json={"data": []})

    with Client(base_url, transport=httpx.MockTransport(answer)) as client:
        assert client.experts() == []
    assert asked == ["/v1/experts"]


async def test_a_local_stream_closed_by_aclosing_frees_its_expert_at_once() -> None:
    """As README's SDK section says: a stream left with ``break`` inside ``contextlib.aclosing`` gives its expert's
    ``max_concurrency`` slot back before the next call, which would otherwise find it taken (503 overloaded)."""
    import contextlib

    config = fake_config(NAMES, experts=[
        {"name": n, "type": "replay", "model": n, "timeout_s": 1.0, "max_concurrency": 1,
         "replay": {"source": "routerbench", "path": "unused"}} for n in NAMES])
    experts = {n: FakeExpert(config.expert(n), pieces=["one ", "two ", "three"]) for n in NAMES}
    async with LocalRouter(Orchestrator(config, FakeGate(NAMES, {}, default=[0.6, 0.4]), experts)) as local:
        async with contextlib.aclosing(local.stream("an integral", model="math")) as chunks:
            async for _ in chunks:
                break
        assert local.orchestrator.expert_states()["math"]["in_flight"] == 0
        assert (await local.chat("an integral", model="math")).expert == "math"


async def test_a_server_echoing_the_clients_key_does_not_get_it_into_the_sdks_errors() -> None:
    """A gateway that quotes the key it refused ("Incorrect API key provided: ...", as OpenAI's does), an HTML page
    echoing the request, an error event naming the key: the SDK's message, body and code repeated it (and so did
    `moe ask`, LangChain and any log of the exception). The router's own expert client already scrubbed this."""
    key, token = "client-key-SDKSECRET-42", "tok-HEADERSECRET-7"

    def answer(request: httpx.Request) -> httpx.Response:
        echoed = f"{request.headers['authorization']} / {request.headers['x-team-token']}"
        if request.url.path == "/v1/route":
            return httpx.Response(502, text=f"<html>bad gateway for {echoed}</html>")
        if json.loads(request.content).get("stream"):
            event = {"error": {"message": f"refused {echoed}", "code": f"bad_{key}"}}
            return httpx.Response(200, text=f"data: {json.dumps(event)}\n\n",
                                  headers={"content-type": "text/event-stream"})
        return httpx.Response(401, json={"error": {"message": f"Incorrect API key provided: {key}", "code": key,
                                                   "param": token, "type": "invalid_request_error"}})

    transport = httpx.MockTransport(answer)
    caught: list[RouterAPIError] = []
    with Client("http://router", api_key=key, headers={"X-Team-Token": token}, transport=transport) as client:
        for call in (lambda: client.chat("hi"), lambda: client.route("hi"), lambda: list(client.stream("hi"))):
            with pytest.raises(RouterAPIError) as info:
                call()
            caught.append(info.value)
    async with AsyncClient("http://router", api_key=key, headers={"X-Team-Token": token},
                           transport=transport) as aclient:
        with pytest.raises(RouterAPIError) as ainfo:
            await aclient.chat("hi")
        caught.append(ainfo.value)
        with pytest.raises(RouterAPIError) as astream:
            [c async for c in aclient.stream("hi")]
        caught.append(astream.value)
    for error in caught:
        shown = f"{error} {error.message} {error.code} {error.param} {json.dumps(error.body)} {error.args}"
        assert key not in shown and token not in shown and "SECRET" not in shown, shown
    assert str(caught[0]) == "HTTP 401 (***): Incorrect API key provided: ***" and caught[0].status == 401
    assert caught[0].type == "invalid_request_error" and "bad gateway for *** / ***" in caught[1].message
    # A placeholder key for a keyless router ("none", "unused") is no secret: scrubbed, it mangled the router's own
    # words ("unknown model '***xistent'"), and a header merely named like one (X-Pass-Through) is none either.
    refusal = {"error": {"message": "unknown model 'nonexistent'; models: auto, math", "type": "invalid_request_error",
                         "param": "model", "code": "model_not_found"}}
    plain = httpx.MockTransport(lambda request: httpx.Response(404, json=refusal))
    with Client("http://router", api_key="none", headers={"X-Pass-Through": "true"}, transport=plain) as client, \
            pytest.raises(RouterAPIError) as placeholder:
        client.chat("hi", model="nonexistent")
    assert (placeholder.value.message, placeholder.value.code, placeholder.value.param) == (
        "unknown model 'nonexistent'; models: auto, math", "model_not_found", "model")


@pytest.mark.parametrize("base_url", ["http://svc:PWSTART/rest@127.0.0.1:8000", "http://svc:1234/pwREST@127.0.0.1:8000",
                                      "http://svc:PW?START@127.0.0.1:8000"])
def test_a_base_url_whose_password_ends_its_host_early_is_refused_without_repeating_it(
        base_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """httpx read the password's start as the port and quoted it ("Invalid port: 'PWSTART'"), or its end as the
    path, which RouterConnectionError then showed; `moe ask --url` printed a traceback ending in it."""
    from router.cli import main

    for build in (lambda: Client(base_url), lambda: AsyncClient(base_url)):
        with pytest.raises(ValueError, match="base_url has a '@' past its host") as info:
            build()
        assert "PW" not in str(info.value) and "pw" not in str(info.value) and info.value.__cause__ is None
    assert main(["ask", "hi", "--url", base_url]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error: base_url has a '@' past its host") and "PW" not in err and "pw" not in err
