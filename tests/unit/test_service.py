"""The HTTP service in-process through httpx.ASGITransport, with fake experts and a fake gate."""

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import httpx
import pytest
from openai import APIStatusError, AsyncOpenAI

from experts.errors import ExpertAuthError, ExpertError, ExpertRateLimited, ExpertRejected, ExpertUnavailable
from experts.types import ChatRequest, StreamDelta, Usage
from router.orchestrator import Orchestrator
from router.sdk import AsyncClient, RouterAPIError
from router.service import create_app
from tests.doubles.fakes import FakeExpert, FakeGate, fake_config
from tests.support import samples, serving, value

NAMES = ["math", "code"]


def make_app(fail: set[str] = frozenset(), **overrides: object):  # type: ignore[no-untyped-def]
    config = fake_config(NAMES, **overrides)
    experts = {
        n: FakeExpert(config.expert(n), pieces=[f"{n} ", "says ", "hi"], text=f"{n} says hi",
                      fail=(lambda x: ExpertUnavailable(x, "connection refused")) if n in fail else None)
        for n in NAMES
    }
    gate = FakeGate(NAMES, {"integral": [0.9, 0.1]}, default=[0.2, 0.8])
    return create_app(Orchestrator(config, gate, experts))


def client(app) -> httpx.AsyncClient:  # type: ignore[no-untyped-def]
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router")


async def test_chat_completion_is_openai_shaped_with_a_trace() -> None:
    async with client(make_app()) as http:
        r = await http.post("/v1/chat/completions",
                            json={"model": "auto", "messages": [{"role": "user", "content": "an integral"}]})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "math says hi"}
    assert body["model"] == "math"
    assert body["usage"]["total_tokens"] == 8
    assert body["moe"]["decision"]["chosen"] == [{"expert": "math", "weight": 1.0}]
    assert body["moe"]["cost_usd"] == pytest.approx(0.001)
    assert r.headers["x-moe-expert"] == "math"


async def test_openai_client_streaming_and_not() -> None:
    app = make_app()
    async with client(app) as http:
        oai = AsyncOpenAI(base_url="http://router/v1", api_key="unused", http_client=http)
        completion = await oai.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hey"}])
        assert completion.choices[0].message.content == "code says hi"
        stream = await oai.chat.completions.create(model="moe-router", stream=True,
                                                   messages=[{"role": "user", "content": "an integral"}])
        text = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        assert "".join(text) == "math says hi"
        models = await oai.models.list()
        assert [m.id for m in models.data] == ["auto", "moe-router", "math", "code"]


async def test_stream_final_chunk_carries_trace_and_finish_reason() -> None:
    async with client(make_app(fail={"code"})) as http, http.stream(
        "POST", "/v1/chat/completions",
        json={"model": "auto", "stream": True, "messages": [{"role": "user", "content": "hello"}]},
    ) as r:
        lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    assert r.headers["x-moe-expert"] == "math"  # code failed before its first token: math began the stream
    assert lines[-1] == "data: [DONE]"
    final = json.loads(lines[-2][6:])
    assert final["choices"][0]["finish_reason"] == "stop"
    assert [(a["expert"], a["ok"]) for a in final["moe"]["attempts"]] == [("code", False), ("math", True)]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_request"),
        (json.dumps({"model": "auto", "messages": []}).encode(), 400, "invalid_request"),
        (json.dumps({"model": "auto", "messages": [{"role": "wizard", "content": "x"}]}).encode(), 400,
         "invalid_request"),
        (json.dumps({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}).encode(), 404,
         "model_not_found"),
        (json.dumps({"model": "auto", "messages": [{"role": "user", "content": "x" * 200_000}]}).encode(), 400,
         "context_length_exceeded"),
    ],
)
async def test_bad_requests_get_clear_openai_errors(body: bytes, status: int, code: str) -> None:
    async with client(make_app()) as http:
        r = await http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    error = r.json()["error"]
    assert error["code"] == code
    assert error["message"]


async def test_oversized_body_is_413() -> None:
    app = make_app(service={"max_request_bytes": 2048})
    async with client(app) as http:
        r = await http.post("/v1/chat/completions",
                            json={"model": "auto", "messages": [{"role": "user", "content": "x" * 5000}]})
    assert r.status_code == 413
    assert "exceeds the 2048-byte limit" in r.json()["error"]["message"]


async def test_all_experts_down_is_503_listing_each_cause() -> None:
    async with client(make_app(fail={"math", "code"})) as http:
        r = await http.post("/v1/chat/completions",
                            json={"model": "auto", "messages": [{"role": "user", "content": "hello"}]})
        s = await http.post("/v1/chat/completions",
                            json={"model": "auto", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    for response in (r, s):
        assert response.status_code == 503
        error = response.json()["error"]
        assert error["code"] == "all_experts_failed"
        assert [c["expert"] for c in error["causes"]] == ["code", "math"]
        assert all(c["kind"] == "unavailable" for c in error["causes"])


async def test_all_experts_waiting_out_a_retry_after_is_503_saying_when_to_come_back() -> None:
    """Both experts answer 429 with a Retry-After; the 503 carries the soonest (rounded up), the outage plain."""
    app = _refusing({"math": ExpertRateLimited("math", 429, "slow down", retry_after_s=2.2),
                     "code": ExpertRateLimited("code", 429, "slow down", retry_after_s=7.0)})
    async with client(app) as http:
        first = await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        again = await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    async with client(make_app(fail={"math", "code"})) as http:
        down = await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert (first.status_code, first.headers["retry-after"]) == (503, "3")
    assert [c["kind"] for c in first.json()["error"]["causes"]] == ["rate_limited", "rate_limited"]
    # neither is called again before its wait is over: both breakers hold them
    assert (again.status_code, [c["kind"] for c in again.json()["error"]["causes"]]) == (503, ["circuit_open"] * 2)
    assert again.headers["retry-after"] in {"2", "3"}
    assert down.status_code == 503 and "retry-after" not in down.headers  # nobody said when


def _refusing(errors: dict[str, ExpertError]):  # type: ignore[no-untyped-def]
    config = fake_config(NAMES)
    experts = {n: FakeExpert(config.expert(n), text="hi", fail=lambda _, e=errors[n]: e) for n in NAMES}
    return create_app(Orchestrator(config, FakeGate(NAMES, {}, default=[0.6, 0.4]), experts))


@pytest.mark.parametrize(
    ("errors", "status", "code"),
    [
        # every expert called refused the request itself: the request is at fault
        ({"math": ExpertRejected("math", 400, "top_logprobs must be <= 20"),
          "code": ExpertRejected("code", 422, "top_logprobs: too large")}, 400, "rejected_by_experts"),
        ({"math": ExpertRejected("math", 400, "prompt too long"),
          "code": ExpertRejected("code", 413, "prompt too long")}, 400, "rejected_by_experts"),
        # one of them is down: maybe the request is fine there, so it is an outage
        ({"math": ExpertRejected("math", 400, "bad"), "code": ExpertUnavailable("code", "refused")}, 503,
         "all_experts_failed"),
        # an auth error, or a model unknown upstream, is the deployment's fault, not the request's
        ({"math": ExpertAuthError("math", 401, "bad key"), "code": ExpertRejected("code", 400, "bad")}, 503,
         "all_experts_failed"),
        ({"math": ExpertRejected("math", 404, "no such model"), "code": ExpertRejected("code", 404, "no such model")},
         503, "all_experts_failed"),
    ],
)
async def test_a_request_every_expert_refuses_as_invalid_is_a_400_not_an_outage(
        errors: dict[str, ExpertError], status: int, code: str) -> None:
    async with client(_refusing(errors)) as http:
        plain = await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        streamed = await http.post("/v1/chat/completions",
                                   json={"stream": True, "messages": [{"role": "user", "content": "hi"}]})
    for r in (plain, streamed):
        assert r.status_code == status
        error = r.json()["error"]
        assert error["code"] == code
        assert [c["expert"] for c in error["causes"]] == ["math", "code"]
        for name, e in errors.items():
            assert e.message in error["message"], name  # each expert's own words reach the client


@pytest.mark.parametrize(("params", "named"), [(("logprobs", "logprobs"), "logprobs"),
                                                (("logprobs", "max_tokens"), None), (("logprobs", None), None)])
async def test_a_400_names_the_field_every_expert_called_blamed(params: tuple[str | None, str | None],
                                                                 named: str | None) -> None:
    """vLLM names the field at fault (``param: "logprobs"``); the router's 400 had ``param: null`` whatever the
    experts said, so OpenAI clients could not act on ``error.param``. Where all experts called agree, it is theirs."""
    errors: dict[str, ExpertError] = {n: ExpertRejected(n, 400, "bad value", param=p)
                                      for n, p in zip(NAMES, params, strict=True)}
    async with client(_refusing(errors)) as http:
        r = await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert (r.status_code, r.json()["error"]["param"]) == (400, named)


async def test_route_experts_and_health() -> None:
    app = make_app()
    orchestrator = app.state.orchestrator
    snapshots = []
    states = orchestrator.expert_states

    def counted() -> dict[str, dict[str, object]]:
        snapshots.append(1)
        return states()

    orchestrator.expert_states = counted
    async with client(app) as http:
        route = (await http.post("/v1/route", json={"query": "an integral"})).json()
        experts = (await http.get("/v1/experts")).json()["data"]
        health = (await http.get("/health")).json()
    assert route["ranking"] == ["math", "code"]
    assert route["scores"] == {"math": pytest.approx(0.9), "code": pytest.approx(0.1)}
    assert [e["name"] for e in experts] == NAMES
    assert len(snapshots) == 1  # one snapshot of every breaker (Redis reads), not one per expert
    assert health == {"status": "ok", "experts": 2}


async def test_sdk_async_client_returns_typed_results() -> None:
    app = make_app()
    async with AsyncClient("http://router", transport=httpx.ASGITransport(app=app)) as sdk:
        result = await sdk.chat("an integral")
        assert (result.content, result.expert) == ("math says hi", "math")
        assert result.trace.decision is not None and result.trace.decision.ranking[0] == "math"
        assert result.cost_usd == pytest.approx(0.001)
        chunks = [c async for c in sdk.stream("an integral")]
        assert "".join(c.content for c in chunks) == "math says hi"
        assert chunks[-1].trace is not None and chunks[-1].finish_reason == "stop"
        decision = await sdk.route("an integral")
        assert decision.chosen[0].expert == "math"
        with pytest.raises(RouterAPIError) as info:
            await sdk.chat("x", model="nope")
        assert info.value.status == 404 and info.value.code == "model_not_found"


async def test_openai_client_sees_status_errors() -> None:
    async with client(make_app(fail={"math", "code"})) as http:
        oai = AsyncOpenAI(base_url="http://router/v1", api_key="unused", http_client=http, max_retries=0)
        with pytest.raises(APIStatusError) as info:
            await oai.chat.completions.create(model="auto", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 503


@pytest.mark.parametrize("strategy", ["vote", "Consensus "])
async def test_a_stream_refuses_a_combiner_it_cannot_apply(strategy: str) -> None:
    body = {"model": "auto", "stream": True, "messages": [{"role": "user", "content": "an integral"}]}
    async with client(make_app(gate={"top_k": {"policy": "fixed", "k": 2}})) as http:
        r = await http.post("/v1/chat/completions", json=body, headers={"x-moe-combiner": strategy})
        top1 = await http.post("/v1/chat/completions", json=body, headers={"x-moe-combiner": "top1"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "invalid_combiner",
                                                              "x-moe-combiner")
    name = strategy.strip().lower()
    assert error["message"].startswith(f"x-moe-combiner: '{name}' cannot combine a streamed answer: a stream is "
                                       "served by one expert")
    assert top1.status_code == 200 and "math says hi" in "".join(
        json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        for line in top1.text.splitlines() if line.startswith("data: {"))


@pytest.mark.parametrize("sent", [["vote", "top1"], ["vote", "bogus"], ["top1", "top1"]])
async def test_a_combiner_header_sent_twice_is_refused_whatever_the_order(sent: list[str]) -> None:
    body = {"model": "auto", "messages": [{"role": "user", "content": "an integral"}]}
    async with client(make_app(gate={"top_k": {"policy": "fixed", "k": 2}})) as http:
        r = await http.post("/v1/chat/completions", json=body,
                            headers=httpx.Headers([("x-moe-combiner", v) for v in sent]))
    assert r.status_code == 400
    error = r.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_combiner", "x-moe-combiner")
    assert error["message"].startswith("x-moe-combiner: sent 2 times")
    assert all(repr(v) in error["message"] for v in sent)


async def test_expert_choice_batch_routing_over_http_and_the_sdk() -> None:
    """Each expert takes the queries it scores highest, up to its room; the rest go to the next with room."""
    app = make_app()
    queries = ["an integral", "another integral", "a third integral", "a loop"]
    async with client(app) as http:
        shared = (await http.post("/v1/route/batch", json={"queries": queries,
                                                           "capacity": {"math": 2, "code": 2}})).json()
        assert shared["mode"] == "expert_choice"
        assert [a["expert"] for a in shared["assignments"]] == ["math", "math", "code", "code"]
        assert [a["index"] for a in shared["assignments"]] == [0, 1, 2, 3]
        unknown = await http.post("/v1/route/batch", json={"queries": queries, "capacity": {"law": 1}})
        assert unknown.status_code == 400 and "capacity: unknown expert(s) 'law'; known: math, code" in \
            unknown.json()["error"]["message"]
        negative = await http.post("/v1/route/batch", json={"queries": queries, "capacity": {"math": -1}})
        assert negative.status_code == 400 and negative.json()["error"]["param"] == "capacity.math"
        assert "greater than or equal to 0" in negative.json()["error"]["message"]
        empty = await http.post("/v1/route/batch", json={"queries": []})
        assert empty.status_code == 400 and "queries" in empty.json()["error"]["message"]
        long = await http.post("/v1/route/batch", json={"queries": ["x" * 200_000]})
        assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded"
        assert "queries[0] holds 200000 characters" in long.json()["error"]["message"]
    async with AsyncClient("http://router", transport=httpx.ASGITransport(app=app)) as sdk:
        assert await sdk.route_batch(queries, {"math": 1, "code": 3}) == ["math", "code", "code", "code"]
        assert (await sdk.route_batch(queries)).count("math") >= 1  # default room: free in-flight slots


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"n": 2}, "n", "one choice per request"),
        ({"max_tokens": "5"}, "max_tokens", "valid integer"),
        ({"max_tokens": 5.0}, "max_tokens", "valid integer"),
        ({"max_tokens": 10**400}, "max_tokens", "less than or equal to 2147483647"),
        ({"temperature": "0.5"}, "temperature", "valid number"),
        ({"stream": "yes"}, "stream", "valid boolean"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "content must be a string"),
        ({"messages": [{"role": "user", "content": [{"text": "hi"}]}]}, "messages[0].content", "needs a 'type'"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "x"}]}, "messages[1].role",
         "'wizard' is not one of system, user, assistant, tool, developer, function"),
        ({"messages": [{"role": 5, "content": "x"}]}, "messages[0].role", "valid string"),
        ({"messages": [{"role": "user"}]}, "messages[0]", "a user message needs content"),
        ({"messages": [{"role": "user", "content": "weather?"}, {"role": "tool", "content": "sunny"},
                       {"role": "user", "content": "and tomorrow?"}]}, "messages[1]",
         "a tool message needs a tool_call_id"),
    ],
)
async def test_wrong_types_are_refused_naming_the_field_as_openai_writes_it(body: dict[str, object], param: str,
                                                                           words: str) -> None:
    request = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], **body}
    async with client(make_app()) as http:
        r = await http.post("/v1/chat/completions", json=request)
    assert r.status_code == 400
    error = r.json()["error"]
    assert (error["param"], error["code"]) == (param, "invalid_request")
    assert words in error["message"] and "Value error" not in error["message"]


async def test_null_stream_and_n_1_are_accepted() -> None:
    async with client(make_app()) as http:
        r = await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                          "stream": None, "n": 1})
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
async def test_nan_and_infinity_are_not_json(constant: str) -> None:
    body = f'{{"messages": [{{"role": "user", "content": "hi"}}], "seed": {constant}}}'.encode()
    async with client(make_app()) as http:
        r = await http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_json" and constant.lstrip("-") in r.json()["error"]["message"]


async def test_a_chunked_body_over_the_limit_is_refused_without_being_read_whole() -> None:
    sent = 0

    async def body():  # type: ignore[no-untyped-def]
        nonlocal sent
        for _ in range(100):
            sent += 1
            yield b"x" * 1024

    async with client(make_app(service={"max_request_bytes": 4096})) as http:
        r = await http.post("/v1/chat/completions", content=body(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert sent < 100  # reading stopped at the limit


async def test_unknown_paths_and_methods_get_openai_errors_and_models_can_be_retrieved() -> None:
    async with client(make_app()) as http:
        missing = await http.get("/v1/nope")
        wrong_method = await http.get("/v1/chat/completions")
        oai = AsyncOpenAI(base_url="http://router/v1", api_key="unused", http_client=http, max_retries=0)
        found = await oai.models.retrieve("math")
        with pytest.raises(APIStatusError) as unknown:
            await oai.models.retrieve("gpt-9")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert "/v1/nope" in missing.json()["error"]["message"]
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"
    assert "POST" in wrong_method.json()["error"]["message"] and wrong_method.headers["allow"] == "POST"
    assert (found.id, found.object) == ("math", "model")
    assert unknown.value.status_code == 404 and unknown.value.body["code"] == "model_not_found"  # type: ignore[index]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream-before-its-first-token"])
async def test_a_client_that_leaves_before_the_answer_stops_the_work_for_it(stream: bool) -> None:
    """The client gives up while its expert is still working: the call is cancelled, and no other expert is
    called for nobody (here ``math`` would fail after 0.6 s and fallback would then ask ``code``)."""
    app = make_app()
    orchestrator = app.state.orchestrator
    math, code = orchestrator.experts["math"], orchestrator.experts["code"]
    math.delay, math.fail = 0.6, (lambda name: ExpertUnavailable(name, "connection refused"))
    body = {"messages": [{"role": "user", "content": "an integral"}], "stream": stream}
    async with serving(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=0.2) as http:
            with pytest.raises(httpx.ReadTimeout):
                await http.post("/v1/chat/completions", json=body)
        await asyncio.sleep(1.0)
        async with httpx.AsyncClient(base_url=url) as http:  # the service goes on serving others
            after = await http.post("/v1/chat/completions", json={**body, "stream": False})
    assert len(math.requests) == 2 and len(code.requests) == 1  # code only for the second client, after fallback
    assert after.status_code == 200 and after.json()["model"] == "code"
    assert orchestrator.expert_states()["math"]["in_flight"] == 0


class _SlowPieces(FakeExpert):
    """A test double streaming its pieces one every 20 ms, its usage only in the last chunk."""

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamDelta]:
        self.requests.append(request)
        for piece in self.pieces:
            await asyncio.sleep(0.02)
            yield StreamDelta(content=piece)
        yield StreamDelta(finish_reason="stop", usage=Usage.counted(3, len(self.pieces)))


def _request_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "router.requests"]


@pytest.mark.parametrize("where", ["mid-stream", "mid-panel"])
async def test_a_client_that_leaves_still_has_its_calls_counted(where: str, caplog: pytest.LogCaptureFixture) -> None:
    """What the experts did for a client that left is counted in the metrics and on its log line: a stream's
    tokens so far (estimated, as for a stream that broke off: its usage chunk never came), and a panel member's
    reported usage when another member was still working (that one is counted as cancelled, not failed)."""
    caplog.set_level("INFO", logger="router.requests")
    if where == "mid-stream":
        app = make_app()
        math = app.state.orchestrator.experts["math"]
        slow = _SlowPieces(math.config, pieces=[f"tok{i} " for i in range(100)])
        app.state.orchestrator.experts["math"] = app.state.orchestrator.dispatch.experts["math"] = slow
        body: dict[str, object] = {"messages": [{"role": "user", "content": "an integral"}], "stream": True}
    else:
        app = make_app(gate={"top_k": {"policy": "fixed", "k": 2}})
        app.state.orchestrator.experts["code"].delay = 5.0  # still working when the client leaves
        body = {"messages": [{"role": "user", "content": "an integral"}]}
    async with serving(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=0.4) as http:
            if where == "mid-stream":
                async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                    seen = 0
                    async for line in r.aiter_lines():
                        seen += '"content": "tok' in line
                        if seen == 10:
                            break
            else:
                with pytest.raises(httpx.ReadTimeout):
                    await http.post("/v1/chat/completions", json=body)
        await asyncio.sleep(0.5)
        async with httpx.AsyncClient(base_url=url) as http:
            page = samples((await http.get("/metrics")).text)
    (line,) = [x for x in _request_lines(caplog) if x["route"] == "/v1/chat/completions"]
    assert line["error"] == "client_closed_request"
    completion = value(page, "moe_tokens_total", expert="math", kind="completion")
    if where == "mid-stream":
        assert line["status"] == 200  # the stream had begun
        assert line["expert"] == "math"  # the expert that was streaming when the client left
        assert 10 <= completion < 100 and line["completion_tokens"] == completion
        assert value(page, "moe_tokens_total", expert="math", kind="prompt") > 0  # estimated
        assert line["attempts"] == [{"expert": "math", "ok": False, "latency_ms": line["attempts"][0]["latency_ms"],
                                     "kind": "cancelled"}]
    else:
        assert line["status"] == 499
        assert completion == 5 and line["completion_tokens"] == 5  # math's reported usage
        assert {a["expert"]: a.get("kind") for a in line["attempts"]} == {"math": None, "code": "cancelled"}
        assert value(page, "moe_expert_latency_seconds_count", expert="code", outcome="cancelled") == 1
    assert not [key for key in page if key[0] == "moe_expert_failures_total"]  # leaving is nobody's failure
    assert app.state.orchestrator.expert_states()["math"]["in_flight"] == 0


async def test_an_unexpected_error_is_a_500_in_openai_format_without_its_text() -> None:
    app = make_app()

    async def broken(*_: object, **__: object) -> None:
        raise RuntimeError("secret details of the request")

    app.state.orchestrator.complete = broken
    # The app answers the error itself: nothing is raised on to the server, which would drop the connection.
    async with client(app) as http:
        r = await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 500
    error = r.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "internal_error")
    assert "RuntimeError" in error["message"] and "secret" not in error["message"]
    assert r.headers["x-request-id"]


async def test_after_a_500_the_same_keep_alive_connection_serves_the_next_request(
        caplog: pytest.LogCaptureFixture) -> None:
    """Over a real socket (uvicorn): the 500 is the only failure, and the traceback is in the service's log."""
    app = make_app()
    real = app.state.orchestrator.complete
    calls = 0

    async def broken_once(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        return await real(*args, **kwargs)

    app.state.orchestrator.complete = broken_once
    body = {"messages": [{"role": "user", "content": "an integral"}]}
    sockets: list[object] = []
    async with serving(app) as url, httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=1)) as http:
        first = await http.post("/v1/chat/completions", json=body)
        sockets.append(first.extensions["network_stream"])
        second = await http.post("/v1/chat/completions", json=body)
        sockets.append(second.extensions["network_stream"])
    assert first.status_code == 500 and second.status_code == 200
    assert second.json()["choices"][0]["message"]["content"] == "math says hi"
    assert sockets[0] is sockets[1]  # one keep-alive connection served both
    failures = [r for r in caplog.records if r.name == "router.service" and r.exc_info]
    assert len(failures) == 1 and "boom" in str(failures[0].exc_info[1])  # type: ignore[index]


async def test_an_unexpected_error_mid_stream_is_an_error_event_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    """Over a real socket (uvicorn): a defect of ours after the stream's 200 reaches the client as an OpenAI error
    event without the error's text, the stream still ends with [DONE], the traceback is logged once (not again by
    the server), and the keep-alive connection serves the next request."""
    from router.dispatch import StreamPiece

    app = make_app()
    real = app.state.orchestrator.stream
    calls = 0

    async def broken_once(*args: object, **kwargs: object) -> AsyncIterator[object]:
        nonlocal calls
        calls += 1
        if calls > 1:
            async for event in real(*args, **kwargs):
                yield event
            return
        yield StreamPiece("math", StreamDelta(content="half an answer"))
        raise RuntimeError("secret details of the request")

    app.state.orchestrator.stream = broken_once
    body = {"stream": True, "messages": [{"role": "user", "content": "an integral"}]}
    sockets: list[object] = []
    async with serving(app) as url, httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=1)) as http:
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
            sockets.append(r.extensions["network_stream"])
        second = await http.post("/v1/chat/completions", json={**body, "stream": False})
        sockets.append(second.extensions["network_stream"])
    assert r.status_code == 200 and lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert events[1]["choices"][0]["delta"]["content"] == "half an answer"
    error = events[-1]["error"]
    assert (error["type"], error["code"]) == ("server_error", "internal_error")
    assert "RuntimeError" in error["message"] and "secret" not in error["message"]
    assert second.status_code == 200 and sockets[0] is sockets[1]
    tracebacks = [rec for rec in caplog.records if rec.exc_info]
    assert len(tracebacks) == 1 and tracebacks[0].name == "router.service"
    assert r.headers["x-request-id"] in tracebacks[0].getMessage()


async def _stream_lines(app, body: dict[str, object]) -> list[dict[str, object]]:  # type: ignore[no-untyped-def]
    async with client(app) as http, http.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


@pytest.mark.parametrize("include_usage", [True, False, None])
async def test_stream_usage_follows_stream_options_include_usage(include_usage: bool | None) -> None:
    body: dict[str, object] = {"stream": True, "messages": [{"role": "user", "content": "an integral"}]}
    if include_usage is not None:
        body["stream_options"] = {"include_usage": include_usage}
    chunks = await _stream_lines(make_app(), body)
    assert len({c["created"] for c in chunks}) == 1 and len({c["id"] for c in chunks}) == 1
    final = next(c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])  # type: ignore[index]
    assert final["moe"]["usage"]["total_tokens"] > 0  # type: ignore[index]
    if include_usage:
        *content, usage = chunks
        assert usage["choices"] == [] and usage["usage"] == final["moe"]["usage"]  # type: ignore[index]
        assert all(c["usage"] is None for c in content)
    else:
        assert all("usage" not in c for c in chunks) and all(c["choices"] for c in chunks)


async def test_the_openai_client_reads_the_usage_chunk() -> None:
    async with client(make_app()) as http:
        oai = AsyncOpenAI(base_url="http://router/v1", api_key="unused", http_client=http)
        stream = await oai.chat.completions.create(model="auto", stream=True, stream_options={"include_usage": True},
                                                   messages=[{"role": "user", "content": "an integral"}])
        chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "math says hi"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 6


async def test_after_a_mid_stream_switch_the_final_chunk_names_the_expert_that_finished() -> None:
    config = fake_config(NAMES)
    experts = {"math": FakeExpert(config.expert("math"), pieces=["one ", "two ", "three"], fail_after=2,
                                  fail=lambda n: ExpertUnavailable(n, "peer closed")),
               "code": FakeExpert(config.expert("code"), pieces=["three"])}
    app = create_app(Orchestrator(config, FakeGate(NAMES, {}, default=[0.9, 0.1]), experts))
    chunks = await _stream_lines(app, {"stream": True, "messages": [{"role": "user", "content": "hi"}]})
    models = [c["model"] for c in chunks]
    assert models == ["math", "math", "math", "code", "code"]  # role chunk, two pieces, the rest, the final chunk
    assert chunks[-1]["moe"]["switches"][0]["to"] == "code"  # type: ignore[index]


@pytest.mark.parametrize(("body", "says"), [
    ({}, "give 'query' (a string) or 'messages' (chat messages), not neither"),
    ({"querry": "an integral"}, "querry: unknown field; the fields are 'query', 'messages'"),
    ({"query": "an integral", "model": "math"}, "model: unknown field"),
    ({"query": "an integral", "messages": [{"role": "user", "content": "x"}]}, "not both"),
])
async def test_route_names_query_when_it_is_missing_or_doubled(body: dict[str, object], says: str) -> None:
    async with client(make_app()) as http:
        r = await http.post("/v1/route", json=body)
    assert r.status_code == 400 and says in r.json()["error"]["message"]


@pytest.mark.parametrize("options", [{"include_usage": "yes"}, {"include_usage": 1}, "usage", [True]])
async def test_stream_options_of_the_wrong_type_are_refused(options: object) -> None:
    async with client(make_app()) as http:
        r = await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                          "stream": True, "stream_options": options})
    assert r.status_code == 400 and "stream_options" in r.json()["error"]["message"]


async def test_a_request_whose_body_is_still_arriving_holds_its_orchestrator_through_a_reload() -> None:
    """The handler counts the request from the moment it picks the orchestrator, before the body is in: a reload
    then waits for it (``drained``) instead of closing the orchestrator under it."""
    app = make_app()
    old = app.state.orchestrator
    release = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b'{"messages": [{"role": "user", '
        await release.wait()
        yield b'"content": "an integral"}]}'

    async with client(app) as http:
        sent = asyncio.create_task(http.post("/v1/chat/completions", content=body(),
                                             headers={"content-type": "application/json"}))
        for _ in range(100):  # the handler has the first piece of the body by now
            if old.active:
                break
            await asyncio.sleep(0.01)
        assert old.active == 1
        app.state.orchestrator = make_app().state.orchestrator  # a reload swaps the orchestrator in
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(old.drained(), 0.2)  # the old one is still answering this request
        release.set()
        r = await sent
        await asyncio.wait_for(old.drained(), 1.0)
    assert r.status_code == 200 and r.json()["model"] == "math"


@pytest.mark.parametrize(("messages", "where"), [
    ([{"role": "user", "content": ""}], "the last user message (messages[0])"),
    ([{"role": "user", "content": "  \n\t"}], "the last user message (messages[0])"),
    ([{"role": "user", "content": []}], "the last user message (messages[0])"),
    ([{"role": "user", "content": [{"type": "text", "text": " "}]}], "the last user message (messages[0])"),
    ([{"role": "user", "content": "an integral"}, {"role": "assistant", "content": "x"},
      {"role": "user", "content": ""}], "the last user message (messages[2])"),
    ([{"role": "system", "content": " "}], "the last message (messages[0])"),
    # What the encoder drops (zero-width spaces, NUL, a BOM, soft hyphens, direction marks, accents alone) is no
    # text either: such a message was routed, confidently, on nothing.
    ([{"role": "user", "content": "\u200b\u200b\u200b"}], "the last user message (messages[0])"),
    ([{"role": "user", "content": "\x00\x01\x1b \ufeff\u00ad\u202e\u0301"}], "the last user message (messages[0])"),
])
async def test_a_conversation_with_nothing_to_route_on_is_refused(messages: list[dict[str, object]],
                                                                   where: str) -> None:
    """The gate routes on the last user message: an empty one would pick an expert on nothing, and the expert
    would be called anyway. A 400 names the message, on both routes that take messages."""
    app = make_app()
    async with client(app) as http:
        chat = await http.post("/v1/chat/completions", json={"messages": messages})
        route = await http.post("/v1/route", json={"messages": messages})
    for r in (chat, route):
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        index = where.split("[")[1].split("]")[0]
        assert error["param"] == f"messages[{index}].content"  # the field at fault, as OpenAI names parameters
        assert where in error["message"] and "holds no text" in error["message"]


async def test_what_the_gate_routes_on_may_be_an_image_alone_or_follow_a_tool_result() -> None:
    image = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]
    async with client(make_app()) as http:
        alone = await http.post("/v1/route", json={"messages": [{"role": "user", "content": image}]})
        after_tool = await http.post("/v1/route", json={"messages": [
            {"role": "user", "content": "an integral"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": ""}]})
    # An image alone is something to route (not an empty message); these experts declare no vision, so the
    # decision is the chat request's 400 (test_tools routes one to an expert that does).
    assert alone.status_code == 400 and alone.json()["error"]["code"] == "vision_not_supported", alone.text
    assert after_tool.status_code == 200 and after_tool.json()["chosen"][0]["expert"] == "math"


async def test_audio_and_file_parts_are_media_not_text() -> None:
    """An input_audio or file part counted its base64 as prompt text: a few seconds of audio (150,000 characters)
    was a 400 context_length_exceeded, and a message of one such part alone was refused as holding no text."""
    audio = {"type": "input_audio", "input_audio": {"data": "UklGR" + "A" * 150_000, "format": "wav"}}
    pdf = {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64," + "B" * 150_000}}
    app = make_app()
    async with client(app) as http:
        answers = [await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}]})
                   for content in ([{"type": "text", "text": "transcribe this"}, audio], [audio], [pdf],
                                   [{"type": "text", "text": "summarise"}, pdf])]
        top_p = await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                              "top_p": 0})
    assert [r.status_code for r in answers] == [200, 200, 200, 200], [r.text for r in answers]
    # top_p 0 is OpenAI's lowest (vLLM, which wants more than 0, would refuse it itself)
    assert top_p.status_code == 200, top_p.text
    spoken = ChatRequest.model_validate({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "transcribe this"}, audio, pdf]}]})
    assert spoken.text_chars() == len("transcribe this")


@pytest.mark.parametrize(("path", "body", "param", "code"), [
    ("/v1/route", {"query": ""}, "query", "invalid_request"),
    ("/v1/route", {"query": " \n "}, "query", "invalid_request"),
    ("/v1/route", {"query": "x" * 100_001}, "query", "context_length_exceeded"),
    ("/v1/route/batch", {"queries": ["an integral", "  "]}, "queries[1]", "invalid_request"),
    ("/v1/route/batch", {"queries": ["x" * 100_001]}, "queries[0]", "context_length_exceeded"),
])
async def test_route_queries_blank_or_too_long_are_named(path: str, body: dict[str, object], param: str,
                                                          code: str) -> None:
    async with client(make_app()) as http:
        r = await http.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"]) == (param, code)
    assert error["message"].startswith(param) or error["message"].startswith(f"invalid request: {param}:")


@pytest.mark.parametrize(("content_type", "status"), [
    ("text/plain;charset=UTF-8", 415),  # what a cross-site form or fetch sends without asking first
    ("application/x-www-form-urlencoded", 415),  # curl -d without -H
    ("multipart/form-data; boundary=x", 415),
    ("application/xml", 415),
    ("application/json", 200),
    ("Application/JSON; charset=utf-8", 200),
    ("application/vnd.api+json", 200),
    (None, 415),  # fetch's Blob or byte-array body: no type, and no preflight either
    ("  ", 415),
])
async def test_a_body_labelled_anything_but_json_is_refused_before_an_expert_is_called(
        content_type: str | None, status: int) -> None:
    app = make_app()
    body = json.dumps({"messages": [{"role": "user", "content": "an integral"}]}).encode()
    async with client(app) as http:
        r = await http.post("/v1/chat/completions", content=body,
                            headers={"content-type": content_type} if content_type else {})
        feedback = await http.post("/v1/feedback", content=b'{"query": "q", "expert": "math", "good": true}',
                                   headers={"content-type": content_type} if content_type else {})
    assert r.status_code == status
    calls = sum(len(e.requests) for e in app.state.orchestrator.experts.values())
    if status == 415:
        error = r.json()["error"]
        assert (error["code"], error["param"]) == ("unsupported_media_type", "Content-Type")
        assert "Content-Type: application/json" in error["message"] and calls == 0
        assert ("no Content-Type" in error["message"]) == (not (content_type or "").strip())
        assert feedback.status_code == 415
    else:
        assert calls == 1


async def test_a_client_that_leaves_a_route_decision_takes_its_query_out_of_the_gate_queue(
        caplog: pytest.LogCaptureFixture) -> None:
    """Over a real socket: the gate is busy with another query when a /v1/route client gives up; its query is
    dropped from the queue (never embedded) and its line says client_closed_request, not 200."""
    import threading

    caplog.set_level("INFO", logger="router.requests")
    app = make_app()
    gate = app.state.orchestrator.gate
    release, seen = threading.Event(), []
    real = gate.predict_proba

    def slow(embeddings: object, texts: object = None) -> object:
        seen.append(list(embeddings))  # type: ignore[call-overload]
        if "first" in str(embeddings):
            release.wait(5)
        return real(embeddings, texts)

    gate.predict_proba = slow
    async with serving(app) as url, httpx.AsyncClient(base_url=url) as http:
        first = asyncio.ensure_future(http.post("/v1/route", json={"query": "the first query"}))
        await asyncio.sleep(0.3)  # the first is in the gate's worker, holding it
        async with httpx.AsyncClient(base_url=url, timeout=0.3) as impatient:
            with pytest.raises(httpx.ReadTimeout):
                await impatient.post("/v1/route", json={"query": "the second query"})
        await asyncio.sleep(0.5)  # the service sees the disconnect
        release.set()
        assert (await first).status_code == 200
        await asyncio.sleep(0.2)
    assert not any("second" in str(batch) for batch in seen)  # never embedded
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "router.requests"]
    assert sorted((line["status"], line.get("error")) for line in lines) == [
        (200, None), (499, "client_closed_request")]


def test_a_query_of_characters_the_encoder_drops_is_blank_but_any_letter_is_text() -> None:
    from experts.types import is_blank

    assert is_blank("\u200b\ufeff\u00ad\x00 \u0301")
    assert not is_blank("\u200ba") and not is_blank("\u6570") and not is_blank("\U0001F600") and not is_blank("?")
    # Private-use characters too (the tokenizer drops them: [CLS] [SEP]); an unassigned one reads as [UNK].
    assert is_blank("\ue000\uf8ff \U000F0000") and not is_blank("\u0378")


class _Firehose(FakeExpert):
    """A test double streaming 20 MB at once: more than a client's socket buffers hold unread."""

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamDelta]:
        self.requests.append(request)
        for _ in range(20_000):
            yield StreamDelta(content="x" * 1000)
        yield StreamDelta(finish_reason="stop", usage=Usage.counted(3, 20_000))


@pytest.mark.parametrize(("config_deadline_s", "header"), [(1.0, b""), (60.0, b"x-moe-deadline-s: 1\r\n")])
async def test_a_client_that_stops_reading_a_stream_is_cut_off_at_the_deadline(
        caplog: pytest.LogCaptureFixture, config_deadline_s: float, header: bytes) -> None:
    """Over a real socket: a client opens a stream and never reads it. The blocked writes held the expert's slot
    (max_concurrency) for as long as the socket stayed open; past the request's deadline and its margin the
    stream is cut off, the slot released, and one line says why. The request's deadline is its x-moe-deadline-s
    where it sets one (the config's was used, 60 s here)."""
    import socket

    app = make_app(fallback={"deadline_s": config_deadline_s})
    orchestrator = app.state.orchestrator
    orchestrator.experts["math"] = _Firehose(orchestrator.config.expert("math"))
    body = json.dumps({"stream": True, "messages": [{"role": "user", "content": "an integral"}]}).encode()
    async with serving(app) as url:
        host, port = url.removeprefix("http://").split(":")
        sock = socket.create_connection((host, int(port)))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
                     b"%scontent-length: %d\r\n\r\n%s" % (header, len(body), body))
        await asyncio.sleep(0.5)
        during = orchestrator.expert_states()["math"]["in_flight"]
        for _ in range(40):  # the deadline (1 s) and its margin (1 s)
            await asyncio.sleep(0.1)
            if orchestrator.expert_states()["math"]["in_flight"] == 0:
                break
        after = orchestrator.expert_states()["math"]["in_flight"]
        # The connection is reset, not closed: a close waits to send the megabytes the socket still buffers,
        # which this client never reads, and held the connection (and a graceful shutdown) as long as it lived.
        await asyncio.sleep(0.3)
        sock.settimeout(5)
        with pytest.raises(ConnectionResetError):
            while sock.recv(1 << 20):
                pass
        sock.close()
    assert (during, after) == (1, 0)
    assert any("the client stopped reading the answer" in r.getMessage() for r in caplog.records)
    assert not any("without completing response" in r.getMessage() for r in caplog.records)  # uvicorn's own


class _Torrent(FakeExpert):
    """A test double streaming 100,000 small pieces with no pause: an expert (or a cache, or a nested router) that
    answers faster than the router relays it. ``sent`` counts the pieces it gave."""

    sent = 0

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamDelta]:
        self.requests.append(request)
        for i in range(100_000):
            self.sent += 1
            yield StreamDelta(content=f"w{i:05d} ")
        yield StreamDelta(finish_reason="stop", usage=Usage.counted(3, 100_000))


async def test_a_client_that_leaves_a_fast_stream_ends_it_and_is_logged_as_leaving(
        caplog: pytest.LogCaptureFixture) -> None:
    """Over a real socket: a client reads part of a stream whose expert answers faster than it is relayed, then
    resets the connection. Starlette's cancellation never reached the stream, which never waited on the network:
    the whole answer was relayed into the closed connection, its expert's slot held to the end, and the request
    logged as a complete 200 with every token counted."""
    import socket
    import struct
    import threading

    app = make_app()
    orchestrator = app.state.orchestrator
    torrent = _Torrent(orchestrator.config.expert("math"))
    orchestrator.experts["math"] = torrent
    body = json.dumps({"stream": True, "messages": [{"role": "user", "content": "an integral"}]}).encode()
    with caplog.at_level(logging.INFO, logger="router.requests"):
        async with serving(app) as url:
            host, port = url.removeprefix("http://").split(":")

            def reader() -> None:  # reads as fast as it can, on a thread of its own, then resets
                sock = socket.create_connection((host, int(port)))
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: "
                             b"application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                got = 0
                while got < 20_000:
                    got += len(sock.recv(65536))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()  # a reset: the tab was closed

            client = threading.Thread(target=reader)
            client.start()
            while client.is_alive():
                await asyncio.sleep(0.01)
            for _ in range(100):
                await asyncio.sleep(0.05)
                if orchestrator.expert_states()["math"]["in_flight"] == 0 and orchestrator.active == 0:
                    break
            await asyncio.sleep(0.2)
    assert torrent.sent < 100_000  # the expert's stream was closed part way
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "router.requests"]
    assert [(line["status"], line.get("error")) for line in lines] == [(200, "client_closed_request")]
    assert lines[0]["completion_tokens"] < 100_000 and lines[0]["attempts"][-1]["kind"] == "cancelled"


async def _asgi(app, messages: list[dict[str, object]], *, path: str = "/v1/chat/completions"):  # type: ignore[no-untyped-def]
    """Drive ``app`` as a server would, with ``messages`` as what ``receive`` returns in turn (then nothing,
    ever), and collect what it sends."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"router"), (b"content-type", b"application/json"), (b"content-length", b"80")],
             "client": ("127.0.0.1", 5000), "server": ("router", 80), "state": {}}
    pending = list(messages)
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        if pending:
            return pending.pop(0)
        await asyncio.Event().wait()  # the client sends nothing more
        raise AssertionError

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/route", "/v1/feedback"])
async def test_a_body_that_stops_arriving_is_408_within_the_body_timeout(path: str) -> None:
    """A client that sent part of its body and then nothing held its connection (and a graceful shutdown, and a
    retired config's orchestrator) for ever; the read is bounded by service.body_timeout_s."""
    app = make_app(service={"body_timeout_s": 0.2})
    sent = await asyncio.wait_for(_asgi(app, [{"type": "http.request", "body": b'{"messages": [', "more_body": True}],
                                        path=path), 5)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))  # type: ignore[arg-type]
    assert start["status"] == 408
    assert body["error"]["code"] == "request_timeout" and "within 0.2s (14 bytes came)" in body["error"]["message"]
    assert sum(len(e.requests) for e in app.state.orchestrator.experts.values()) == 0


async def test_a_client_that_leaves_while_sending_its_body_is_499_not_a_500(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    app = make_app()
    await _asgi(app, [{"type": "http.request", "body": b'{"messages": [', "more_body": True},
                      {"type": "http.disconnect"}])
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "router.requests"]
    assert [(line["status"], line.get("error")) for line in lines] == [(499, "client_closed_request")]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_an_experts_long_retry_after_is_capped_at_the_breakers_longest_hold() -> None:
    """An expert's Retry-After of an hour was passed on as it was: the Node openai SDK honours any Retry-After and
    slept an hour per retry, though the router calls the expert again after breaker.cooldown_max_s at most."""
    errors: dict[str, ExpertError] = {n: ExpertRateLimited(n, 429, "slow down", retry_after_s=3600.0) for n in NAMES}
    async with client(_refusing(errors)) as http:
        r = await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert (r.status_code, r.headers["retry-after"]) == (503, "60")  # cooldown_max_s' default
    causes = r.json()["error"]["causes"]
    assert [c["kind"] for c in causes] == ["rate_limited", "rate_limited"]
