"""How the SDK fails: one exception type, ``RouterAPIError``, whatever went wrong and wherever the router runs.
A service that cannot be reached or does not answer in time raises its subclass ``RouterConnectionError``; an
error answer keeps its status, code and headers; ``LocalRouter`` raises what ``Client`` would."""

from __future__ import annotations

import socket

import httpx
import pytest

from experts.errors import ExpertRateLimited, ExpertUnavailable
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
    assert await local.route_batch(["an integral"], {"math": 1}) == ["math"]


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
        with Client("http://router", transport=transport) as client, pytest.raises(RouterAPIError) as sync:
            list(client.stream("hi"))
        async with AsyncClient("http://router", transport=transport) as aclient:
            with pytest.raises(RouterAPIError) as asynced:
                [c async for c in aclient.stream("hi")]
        for info in (sync, asynced):
            code, says = expected[kind]
            assert info.value.code == code and says in info.value.message, (kind, info.value.message)


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
