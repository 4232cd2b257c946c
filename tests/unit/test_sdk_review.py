"""The SDK and ``ChatMoERouter`` as a review found them wanting: a key read with its newline, connections made anew
for every call, ``with_structured_output``'s methods, usage breakdowns, errors that did not pickle, tool-call
arguments sent as an object, ``ChatOpenAI``'s argument names, and timeouts as ``ChatOpenAI`` takes them.

The service is played by ``ScriptedOpenAIServer`` (a test double): it answers ``/v1/chat/completions`` as the service
does, without the trace, and counts the connections made to it."""

from __future__ import annotations

import asyncio
import copy
import gc
import json
import pickle
import threading
import traceback
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from langchain_core.exceptions import ModelRefusalError
from langchain_core.messages import AIMessageChunk, HumanMessage
from langchain_core.tools import tool
from pydantic import BaseModel

from router import langchain as lc
from router import sdk
from router.langchain import ChatMoERouter
from router.sdk import AsyncClient, Client, RouterAPIError, RouterConnectionError
from tests.doubles.scripted_server import Behaviour, ScriptedOpenAIServer

KEY = "sk-review-secret-4242"


@pytest.fixture
def service() -> Iterator[ScriptedOpenAIServer]:
    with ScriptedOpenAIServer(name="svc") as server:
        yield server


def root(server: ScriptedOpenAIServer) -> str:
    return server.url.removesuffix("/v1")


def completion(message: dict[str, Any], usage: dict[str, Any] | None = None, finish: str = "stop") -> bytes:
    """A chat completion, as the service answers one."""
    return json.dumps({"id": "chatcmpl-r", "object": "chat.completion", "created": 1, "model": "math",
                       "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}],
                       "usage": usage or {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}).encode()


def calling(arguments: Any) -> bytes:
    return completion({"content": None, "tool_calls": [{"id": "call_1", "type": "function",
                                                        "function": {"name": "add", "arguments": arguments}}]},
                      finish="tool_calls")


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


class Answer(BaseModel):
    """An answer."""

    value: int
    unit: str


# -- 1. a key with a trailing newline; never a key in a message ---------------------------------------------------

async def test_a_key_read_with_its_newline_is_sent_without_it(service: ScriptedOpenAIServer) -> None:
    """As read from a mounted secret file: the key is sent stripped (as the service strips its own keys), rather
    than failing every request with an error quoting it."""
    with Client(root(service), api_key=KEY + "\n") as client:
        assert client.chat("hi").content == "answer from svc"
    async with AsyncClient(root(service), api_key=f"  {KEY}\r\n") as aclient:
        assert (await aclient.chat("hi")).content == "answer from svc"
    model = ChatMoERouter(base_url=root(service), api_key=KEY + "\n")
    assert model.invoke("hi").content == "answer from svc"
    model.close()
    assert [h["authorization"] for h in service.headers] == [f"Bearer {KEY}"] * 3


@pytest.mark.parametrize("bad", [f"{KEY[:6]}\n{KEY[6:]}", f"{KEY}\x00", f"{KEY[:3]}\t{KEY[3:]}", f"{KEY}é"])
def test_a_key_holding_a_control_character_is_refused_when_built_and_never_shown(bad: str) -> None:
    for build in (lambda: Client(api_key=bad), lambda: AsyncClient(api_key=bad),
                  lambda: ChatMoERouter(api_key=bad)):
        with pytest.raises(ValueError, match="api_key holds a control character") as info:
            build()
        assert KEY[:6] not in str(info.value) and KEY[-4:] not in str(info.value)
    with pytest.raises(ValueError, match="header 'X-Token' holds a control character") as info:
        ChatMoERouter(default_headers={"X-Token": bad})
    assert KEY[:6] not in str(info.value)


def test_an_invalid_header_s_text_is_never_in_the_error_nor_its_traceback() -> None:
    """httpx's LocalProtocolError quotes the header at fault (``Illegal header value b'Bearer sk-...'``): its text
    is left out of the message, and it is not chained, so a printed traceback does not show it either."""
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.LocalProtocolError(f"Illegal header value b'Bearer {KEY}\\n'")

    with Client("http://router", transport=httpx.MockTransport(refuse)) as client, \
            pytest.raises(RouterConnectionError) as info:
        client.chat("hi")
    assert info.value.code == "connection_error" and "LocalProtocolError" in str(info.value)
    printed = "".join(traceback.format_exception(info.value))
    assert KEY not in printed and KEY not in repr(info.value.body)
    with pytest.raises(ValueError, match="combiner holds a control character"):
        Client("http://router", transport=httpx.MockTransport(refuse)).chat("hi", combiner="vote\nx")


# -- 2. one client per model, reused -------------------------------------------------------------------------------

def test_a_model_reuses_one_connection_for_its_blocking_calls(service: ScriptedOpenAIServer) -> None:
    model = ChatMoERouter(base_url=root(service))
    for _ in range(4):
        assert model.invoke("hi").content == "answer from svc"
    for _ in range(3):
        assert "".join(str(c.content) for c in model.stream("hi")) == "answer from svc"
    assert model.batch(["one", "two"], config={"max_concurrency": 1})[1].content == "answer from svc"
    assert service.connections_total == 1
    model.close()
    assert service.wait_for(lambda s: s.open_connections == 0)
    assert model.invoke("again").content == "answer from svc"  # closed, a later call opens anew
    del model
    gc.collect()  # a model collected closes its connections
    assert service.wait_for(lambda s: s.open_connections == 0)


async def test_a_model_reuses_one_connection_per_event_loop(service: ScriptedOpenAIServer) -> None:
    model = ChatMoERouter(base_url=root(service))
    for _ in range(4):
        assert (await model.ainvoke("hi")).content == "answer from svc"
    for _ in range(2):
        assert "".join([str(c.content) async for c in model.astream("hi")]) == "answer from svc"
    assert service.connections_total == 1
    await model.aclose()
    assert service.wait_for(lambda s: s.open_connections == 0)


def test_the_client_is_built_once_however_many_calls_start_at_once(monkeypatch: pytest.MonkeyPatch,
                                                                   service: ScriptedOpenAIServer) -> None:
    built: list[str] = []

    class Counted(sdk.Client):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            built.append("sync")
            super().__init__(*args, **kwargs)

    class ACounted(sdk.AsyncClient):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            built.append("async")
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(sdk, "Client", Counted)
    monkeypatch.setattr(sdk, "AsyncClient", ACounted)
    model = ChatMoERouter(base_url=root(service))
    threads = [threading.Thread(target=model.invoke, args=("hi",)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    async def together() -> None:
        answers = await model.abatch(["hi"] * 6)
        assert {a.content for a in answers} == {"answer from svc"}
        await model.aclose()

    asyncio.run(together())
    assert built == ["sync", "async"]
    assert len(service.requests) == 12


def test_each_event_loop_gets_its_own_client_closed_when_the_loop_ends(service: ScriptedOpenAIServer) -> None:
    """``asyncio.run`` per call, as in a script: each loop's calls go over that loop's client (an httpx.AsyncClient
    used on a second loop fails), closed as its loop shuts down (no socket is left to the collector: warnings
    are errors here), and a closed loop's client is let go."""
    model = ChatMoERouter(base_url=root(service))
    for n in range(1, 4):
        assert asyncio.run(model.ainvoke("hi")).content == "answer from svc"
        assert service.wait_for(lambda s: s.open_connections == 0)
        assert service.connections_total == n
    assert len(model._clients._async) == 1  # the last loop's; the closed ones' are let go
    asyncio.run(model.ainvoke("hi"))
    assert len(model._clients._async) == 1


async def test_a_model_collected_closes_its_async_connections_on_its_loop(service: ScriptedOpenAIServer) -> None:
    model = ChatMoERouter(base_url=root(service))
    assert (await model.ainvoke("hi")).content == "answer from svc"
    assert service.open_connections == 1
    del model
    gc.collect()
    for _ in range(50):  # the loop runs the closing it was handed
        await asyncio.sleep(0.01)
        if service.open_connections == 0:
            break
    assert service.open_connections == 0


def test_copies_and_pickles_open_their_own_connections(service: ScriptedOpenAIServer) -> None:
    with ScriptedOpenAIServer(name="other") as other:
        model = ChatMoERouter(base_url=root(service), api_key=KEY, temperature=0.1)
        assert model.invoke("hi").content == "answer from svc"
        moved = model.model_copy(update={"base_url": root(other)})
        assert moved.invoke("hi").content == "answer from other"
        for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)), model.model_copy()):
            assert twin == model and twin._clients is not model._clients
            assert twin.invoke("hi").content == "answer from svc"
            twin.close()
        model.base_url = root(other)  # a field changed after use: the next call follows it
        assert model.invoke("hi").content == "answer from other"
        for m in (model, moved):
            m.close()
    assert service.headers[-1]["authorization"] == f"Bearer {KEY}"


# -- 3. with_structured_output's methods ---------------------------------------------------------------------------

def test_structured_output_defaults_to_json_schema_as_chatopenai_does(service: ScriptedOpenAIServer) -> None:
    service.default = Behaviour.ok('{"value": 5, "unit": "kg"}')
    model = ChatMoERouter(base_url=root(service))
    assert model.with_structured_output(Answer).invoke("weigh it") == Answer(value=5, unit="kg")
    sent = service.requests[-1]
    assert "tools" not in sent and "tool_choice" not in sent
    assert sent["response_format"]["type"] == "json_schema"
    schema = sent["response_format"]["json_schema"]
    assert schema["name"] == "Answer" and schema["strict"] is True
    assert schema["schema"]["properties"].keys() == {"value", "unit"}
    assert "ls_structured_output_format" not in sent
    as_dict = {"title": "Answer", "type": "object", "properties": {"value": {"type": "integer"}}}
    assert model.with_structured_output(as_dict).invoke("weigh it") == {"value": 5, "unit": "kg"}
    assert service.requests[-1]["response_format"]["json_schema"]["strict"] is False
    model.close()


def test_json_mode_asks_for_a_json_object(service: ScriptedOpenAIServer) -> None:
    service.default = Behaviour.ok('{"value": 5, "unit": "kg"}')
    model = ChatMoERouter(base_url=root(service))
    assert model.with_structured_output(Answer, method="json_mode").invoke("weigh it") == Answer(value=5, unit="kg")
    assert service.requests[-1]["response_format"] == {"type": "json_object"}
    assert model.with_structured_output(None, method="json_mode").invoke("weigh it") == {"value": 5, "unit": "kg"}
    streamed = list(model.with_structured_output(None, method="json_mode").stream("weigh it"))
    assert streamed[-1] == {"value": 5, "unit": "kg"}
    with pytest.raises(ValueError, match="strict= is not taken with method='json_mode'"):
        model.with_structured_output(Answer, method="json_mode", strict=True)
    model.close()


def test_function_calling_forces_the_schema_s_tool(service: ScriptedOpenAIServer) -> None:
    call = {"id": "call_s", "type": "function",
            "function": {"name": "Answer", "arguments": '{"value": 5, "unit": "kg"}'}}
    service.default = Behaviour.ok("", tool_calls=[call])
    model = ChatMoERouter(base_url=root(service))
    assert model.with_structured_output(Answer, method="function_calling").invoke("x") == Answer(value=5, unit="kg")
    sent = service.requests[-1]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "Answer"}}
    assert sent["parallel_tool_calls"] is False and "response_format" not in sent
    model.close()


async def test_include_raw_gives_the_message_and_the_parsing_error(service: ScriptedOpenAIServer) -> None:
    service.push(Behaviour.ok('{"value": 5, "unit": "kg"}'), Behaviour.ok("not json at all"))
    model = ChatMoERouter(base_url=root(service))
    structured = model.with_structured_output(Answer, include_raw=True)
    good = await structured.ainvoke("weigh it")
    assert good["parsed"] == Answer(value=5, unit="kg") and good["parsing_error"] is None
    assert good["raw"].content == '{"value": 5, "unit": "kg"}'
    bad = await structured.ainvoke("weigh it")
    assert bad["parsed"] is None and bad["parsing_error"] is not None and bad["raw"].content == "not json at all"
    await model.aclose()


def test_a_refusal_is_a_model_refusal_error(service: ScriptedOpenAIServer) -> None:
    service.push(Behaviour.raw(completion({"content": None, "refusal": "I will not weigh that"})))
    model = ChatMoERouter(base_url=root(service))
    with pytest.raises(ModelRefusalError, match="I will not weigh that"):
        model.with_structured_output(Answer).invoke("weigh it")
    model.close()


def _refusal_stream(*pieces: str) -> bytes:
    """A stream whose answer is a refusal, sent in ``pieces``, as the service streams one."""
    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        return "data: " + json.dumps({"id": "chatcmpl-r", "object": "chat.completion.chunk", "created": 1,
                                      "model": "math", "choices": [{"index": 0, "delta": delta,
                                                                    "finish_reason": finish}]}) + "\n\n"
    lines = [chunk({"role": "assistant", "content": ""})] + [chunk({"refusal": p}) for p in pieces]
    return "".join([*lines, chunk({}, "stop"), "data: [DONE]\n\n"]).encode()


async def test_a_streamed_refusal_is_raised_whole(service: ScriptedOpenAIServer) -> None:
    """A refusal streamed in pieces was raised on its first piece: "I can't " instead of "I can't help"."""
    model = ChatMoERouter(base_url=root(service))
    structured = model.with_structured_output(Answer)
    service.push(Behaviour.raw(_refusal_stream("I can't ", "help"), content_type="text/event-stream"))
    with pytest.raises(ModelRefusalError) as info:
        list(structured.stream("weigh it"))
    assert str(info.value) == "I can't help"
    assert info.value.raw_message.additional_kwargs["refusal"] == "I can't help"  # type: ignore[attr-defined]
    service.push(Behaviour.raw(_refusal_stream("I will", " not"), content_type="text/event-stream"))
    with pytest.raises(ModelRefusalError, match=r"^I will not$"):
        [c async for c in structured.astream("weigh it")]
    model.close()
    await model.aclose()


def test_a_pydantic_class_as_response_format_is_sent_as_its_schema_and_parsed(service: ScriptedOpenAIServer) -> None:
    """ChatOpenAI's idiom, invoke(..., response_format=Answer): the class went into the request body as it was, a
    TypeError before anything was sent."""
    service.default = Behaviour.ok('{"value": 5, "unit": "kg"}')
    model = ChatMoERouter(base_url=root(service))
    message = model.invoke("weigh it", response_format=Answer)
    assert message.additional_kwargs["parsed"] == Answer(value=5, unit="kg")
    sent = service.requests[-1]["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["name"] == "Answer"
    assert model.bind(response_format=Answer).invoke("weigh it").additional_kwargs["parsed"].value == 5
    streamed = list(model.stream("weigh it", response_format=Answer))
    assert "".join(str(c.content) for c in streamed) == '{"value": 5, "unit": "kg"}'
    assert service.requests[-1]["response_format"]["type"] == "json_schema"
    model.close()


def test_generate_s_llm_output_adds_up_the_calls_usage_as_chatopenai_s(service: ScriptedOpenAIServer) -> None:
    """generate() gave llm_output {}: the per-call outputs were merged by BaseChatModel's default."""
    model = ChatMoERouter(base_url=root(service))
    result = model.generate([[HumanMessage("hi")], [HumanMessage("hello")]])
    assert result.llm_output is not None
    calls = [g[0].message.usage_metadata for g in result.generations]  # type: ignore[attr-defined]
    assert result.llm_output["token_usage"] == {
        "prompt_tokens": sum(u["input_tokens"] for u in calls),
        "completion_tokens": sum(u["output_tokens"] for u in calls),
        "total_tokens": sum(u["total_tokens"] for u in calls)}
    assert calls[0]["total_tokens"] > 0 and calls[1]["total_tokens"] > 0
    assert result.llm_output["model_name"] == result.generations[0][0].message.response_metadata["model_name"]
    model.close()


# -- 4. usage breakdowns -------------------------------------------------------------------------------------------

def test_usage_metadata_keeps_cached_and_reasoning_tokens(service: ScriptedOpenAIServer) -> None:
    usage = {"prompt_tokens": 100, "completion_tokens": 40, "total_tokens": 140,
             "prompt_tokens_details": {"cached_tokens": 64, "audio_tokens": 2},
             "completion_tokens_details": {"reasoning_tokens": 30}}
    service.push(Behaviour.raw(completion({"content": "hello"}, usage)), Behaviour.raw(completion({"content": "hi"})))
    model = ChatMoERouter(base_url=root(service))
    assert model.invoke("hi").usage_metadata == {
        "input_tokens": 100, "output_tokens": 40, "total_tokens": 140,
        "input_token_details": {"cache_read": 64, "audio": 2}, "output_token_details": {"reasoning": 30}}
    assert model.invoke("hi").usage_metadata == {"input_tokens": 5, "output_tokens": 1, "total_tokens": 6}
    model.close()


# -- 5. errors that pickle -----------------------------------------------------------------------------------------

def test_errors_pickle_and_copy_as_they_were() -> None:
    answered = RouterAPIError(503, {"error": {"message": "every expert failed", "code": "all_experts_failed"}},
                              {"retry-after": "3"})
    answered.add_note("while asking math")
    broken = RouterConnectionError("cannot reach the service", "connection_error")
    for error in (answered, broken):
        for back in (pickle.loads(pickle.dumps(error)), copy.copy(error), copy.deepcopy(error)):
            assert type(back) is type(error) and str(back) == str(error)
            assert (back.status, back.code, back.body, back.headers) == (error.status, error.code, error.body,
                                                                         error.headers)
    assert pickle.loads(pickle.dumps(answered)).retry_after_s == 3.0
    assert pickle.loads(pickle.dumps(answered)).__notes__ == ["while asking math"]


# -- 6. tool-call arguments as an object ---------------------------------------------------------------------------

@pytest.mark.parametrize(("arguments", "args", "invalid"), [
    ({"a": 1, "b": 2}, {"a": 1, "b": 2}, None),
    ('{"a": 1, "b": 2}', {"a": 1, "b": 2}, None),
    ("", {}, None),
    ("{a:", None, "{a:"),
    ("[1, 2]", None, "[1, 2]"),
    ([1, 2], None, "[1, 2]"),
])
def test_tool_call_arguments_sent_as_an_object_are_taken(service: ScriptedOpenAIServer, arguments: Any,
                                                         args: dict[str, int] | None, invalid: str | None) -> None:
    service.push(Behaviour.raw(calling(arguments)), Behaviour.raw(calling(arguments)))
    model = ChatMoERouter(base_url=root(service)).bind_tools([add])
    message = model.invoke("add")
    assert [c["args"] for c in message.tool_calls] == ([args] if args is not None else [])
    assert [(c["args"], c["error"]) for c in message.invalid_tool_calls] == (
        [(invalid, "arguments are not a JSON object")] if invalid is not None else [])
    # A combined answer streamed as one chunk carries them as text, as streamed ones come (LangChain reads a
    # chunk's text as partial JSON, so broken text is not an invalid call there).
    combined = ChatMoERouter(base_url=root(service), combiner="vote")
    streamed = list(combined.bind_tools([add]).stream("add"))
    assert len(streamed) == 1 and isinstance(streamed[0], AIMessageChunk)
    as_text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    assert streamed[0].tool_call_chunks[0]["args"] == as_text
    if args is not None:
        assert [c["args"] for c in streamed[0].tool_calls] == [args]
    combined.close()


# -- 7. ChatOpenAI's argument names ----------------------------------------------------------------------------------

def test_chatopenai_s_base_url_headers_and_streaming_names_are_taken(service: ScriptedOpenAIServer) -> None:
    model = ChatMoERouter(openai_api_base=service.url, default_headers={"X-Team": "a"}, max_retries=2)
    assert (model.base_url, model.model_kwargs) == (service.url, {})  # no warning: warnings are errors here
    assert model.invoke("hi").content == "answer from svc"
    assert service.headers[-1]["x-team"] == "a"
    assert not {"max_retries", "default_headers", "openai_api_base"} & service.requests[-1].keys()
    streaming = ChatMoERouter(base_url=root(service), streaming=True)
    assert streaming.invoke("hi").content == "answer from svc" and service.requests[-1]["stream"] is True
    with pytest.raises(ValueError, match="api_key and an Authorization header both given"):
        ChatMoERouter(api_key=KEY, default_headers={"Authorization": "Bearer other"})
    for m in (model, streaming):
        m.close()


async def test_max_retries_retries_what_the_service_says_to_retry(service: ScriptedOpenAIServer) -> None:
    service.push(Behaviour.error(503, "every expert failed", retry_after="0"), Behaviour.error(429, retry_after="0"))
    model = ChatMoERouter(base_url=root(service), max_retries=2)
    assert model.invoke("hi").content == "answer from svc"
    assert len(service.requests) == 3
    service.push(Behaviour.error(502, retry_after="0"))  # a stream is retried until it begins
    assert "".join(str(c.content) for c in model.stream("hi")) == "answer from svc"
    service.push(Behaviour.error(503, retry_after="0"))
    assert (await model.ainvoke("hi")).content == "answer from svc"
    service.push(Behaviour.error(504, retry_after="0"))
    assert "".join([str(c.content) async for c in model.astream("hi")]) == "answer from svc"
    assert len(service.requests) == 9
    service.push(*[Behaviour.error(503, retry_after="0")] * 3)  # spent
    with pytest.raises(RouterAPIError) as info:
        model.invoke("hi")
    assert info.value.status == 503 and len(service.requests) == 12
    service.push(Behaviour.error(500), Behaviour.error(503, retry_after="0"))  # a 500 is not retried
    with pytest.raises(RouterAPIError, match="HTTP 500"):
        model.invoke("hi")
    unset = ChatMoERouter(base_url=root(service))  # none by default
    with pytest.raises(RouterAPIError, match="HTTP 503"):
        unset.invoke("hi")
    for m in (model, unset):
        m.close()
    await model.aclose()


def test_max_retries_retries_a_service_not_reached_but_never_one_that_did_not_answer_in_time() -> None:
    asked: list[str] = []
    body = json.loads(completion({"content": "reached"}))

    def flaky(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        if len(asked) == 1:
            raise httpx.ConnectError("connection refused")
        if len(asked) == 3:
            raise httpx.ReadTimeout("no answer")
        return httpx.Response(200, json=body)

    model = ChatMoERouter(base_url="http://router", transport=httpx.MockTransport(flaky), max_retries=3)
    assert model.invoke("hi").content == "reached" and len(asked) == 2
    with pytest.raises(RouterConnectionError) as info:
        model.invoke("hi")
    assert info.value.code == "timeout" and len(asked) == 3  # the service may have been working on it
    model.close()


# -- 8. timeouts as ChatOpenAI and the SDK take them --------------------------------------------------------------

async def test_an_httpx_timeout_and_a_connect_read_tuple_are_taken(service: ScriptedOpenAIServer) -> None:
    service.default = Behaviour.hang()
    for model, says in ((ChatMoERouter(base_url=root(service), timeout=httpx.Timeout(0.3)), "the 0.3 s timeout"),
                        (ChatMoERouter(base_url=root(service), request_timeout=(5, 0.3)), "the 0.3 s read timeout")):
        with pytest.raises(RouterConnectionError, match=says):
            model.invoke("hi")
        with pytest.raises(RouterConnectionError, match=says):
            await model.ainvoke("hi")
        assert pickle.loads(pickle.dumps(model)).timeout == model.timeout
        model.close()
        await model.aclose()


def test_a_model_builds_no_client_before_its_first_call() -> None:
    model = ChatMoERouter()
    assert model._clients._sync is None and not model._clients._async
    assert lc.Clients() == model._clients  # no part of the model's value
