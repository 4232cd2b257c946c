"""``router.requests``, the one place a request is checked: it and the SDK's ``LocalRouter`` run without FastAPI,
the service re-exports the same objects, and the checks name the field at fault (``param``) and the ``code``.
What a bad request looks like over HTTP is ``test_service.py``'s; these call the checks directly."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from router import requests, service
from router.requests import (
    MAX_BATCH_QUERIES,
    MAX_JSON_DEPTH,
    MAX_MODEL_CHARS,
    RequestProblem,
    json_depth,
    parse_chat,
    parse_json,
    parse_route,
    parse_route_batch,
    parse_since,
)

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 100  # max_chars for these tests

# A fresh interpreter (this one has imported the service already) that checks requests directly and through a
# LocalRouter over fakes, good requests and bad, then lists the web framework's modules it loaded.
_PROBE = textwrap.dedent("""
    import asyncio, sys
    from router.orchestrator import Orchestrator
    from router.requests import RequestProblem, parse_chat, parse_json, parse_route_batch
    from router.sdk import LocalRouter, RouterAPIError
    from tests.doubles.fakes import FakeExpert, FakeGate, fake_config

    parse_chat(parse_json(b'{"messages": [{"role": "user", "content": "hi"}]}'), 100)
    parse_route_batch({"queries": ["hi"], "capacity": {"math": 1}}, 100, ["math"])
    try:
        parse_chat({"messages": []}, 100)
    except RequestProblem:
        pass

    async def main():
        names = ["math", "code"]
        config = fake_config(names)
        gate = FakeGate(names, {}, default=[0.6, 0.4])
        local = LocalRouter(Orchestrator(config, gate, {n: FakeExpert(config.expert(n)) for n in names}))
        await local.chat("hi")
        [chunk async for chunk in local.stream("hi")]
        await local.route("hi")
        await local.route_batch(["hi", "there"])
        for bad in (local.chat([{"role": "wizard", "content": "x"}]), local.route(" ")):
            try:
                await bad
            except RouterAPIError:
                pass
        await local.aclose()

    asyncio.run(main())
    print(sorted({m.partition(".")[0] for m in sys.modules} & {"fastapi", "starlette"}))
""")


def test_the_sdk_checks_requests_without_importing_fastapi_or_starlette() -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_service_re_exports_the_same_checks() -> None:
    names = ["RequestProblem", "RouteBatch", "RouteQuery", "check_combiner", "parse_chat", "parse_route",
             "parse_route_batch"]
    for name in names:
        assert name in service.__all__ and name in requests.__all__
        assert getattr(service, name) is getattr(requests, name), name


def problem(call: Any, *args: Any) -> RequestProblem:
    with pytest.raises(RequestProblem) as info:
        call(*args)
    assert info.value.status == 400
    return info.value


def test_a_chat_request_names_every_wrong_field_and_its_param_is_the_first() -> None:
    body = {"messages": [{"role": "user", "content": 5}], "max_tokens": "5", "stream": "yes"}
    refused = problem(parse_chat, body, LIMIT)
    assert (refused.param, refused.code) == ("messages[0].content", "invalid_request")
    assert refused.message.startswith("invalid request: messages[0].content: ")
    assert "; max_tokens: " in refused.message and "; stream: " in refused.message
    not_an_object = problem(parse_chat, [body], LIMIT)
    assert (not_an_object.param, not_an_object.message) == (None, "request body must be a JSON object")


def test_a_route_takes_a_query_or_messages_and_names_a_misspelt_field() -> None:
    both = problem(parse_route, {"query": "hi", "messages": [{"role": "user", "content": "hi"}]}, LIMIT)
    assert (both.param, both.code) == (None, "invalid_request") and "not both" in both.message
    misspelt = problem(parse_route, {"querry": "hi"}, LIMIT)
    assert misspelt.param == "querry" and "the fields are 'query', 'messages'" in misspelt.message
    assert parse_route({"query": "hi"}, LIMIT).query_text() == "hi"


def test_a_model_name_is_bounded_and_the_refusal_does_not_echo_it() -> None:
    ok = {"model": "m" * MAX_MODEL_CHARS, "messages": [{"role": "user", "content": "hi"}]}
    assert parse_chat(ok, LIMIT).model == "m" * MAX_MODEL_CHARS
    refused = problem(parse_chat, {**ok, "model": "m" * 900_000}, LIMIT)
    assert (refused.status, refused.param, refused.code) == (400, "model", "invalid_request")
    assert "900000 characters, over the limit of 256" in refused.message and len(refused.message) < 200


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"queries": []}, "queries", "invalid_request"),
    ({"queries": ["q"] * (MAX_BATCH_QUERIES + 1)}, "queries", "invalid_request"),
    ({"queries": ["q"], "capacity": {"math": -1}}, "capacity.math", "invalid_request"),
    ({"queries": ["q"], "capacity": {"math": True}}, "capacity.math", "invalid_request"),
    ({"queries": ["q"], "capacity": {"math": "1"}}, "capacity.math", "invalid_request"),
    ({"queries": ["q"], "capacity": {"math": 1.0}}, "capacity.math", "invalid_request"),
    ({"queries": ["q"], "capacity": {"physics": 1}}, "capacity", "invalid_request"),
    ({"queries": ["q", "x" * (LIMIT + 1)]}, "queries[1]", "context_length_exceeded"),
])
def test_a_route_batch_names_what_is_wrong(body: dict[str, Any], param: str, code: str) -> None:
    refused = problem(parse_route_batch, body, LIMIT, ["math", "code"])
    assert (refused.param, refused.code) == (param, code)


@pytest.mark.parametrize(("raw", "says"), [
    (b"[NaN]", "JSON has no NaN"),
    (b'{"seed": 1e400}', "1e400 is beyond a 64-bit float's range"),  # reads as inf, would be sent as Infinity
    (b'[{"x": -2.5E+999}]', "-2.5E+999 is beyond"),
    (b'"\\ud800"', "surrogates not allowed"),
    (b"[" * 100_000, "nested too deeply"),
    # A surrogate as raw bytes, which json.loads of bytes let through (UTF-8 with "surrogatepass"): it failed
    # later, a 500 after the expert was paid. UTF-16 likewise (json.loads guessed the encoding).
    (b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}', "not UTF-8 text (byte 43"),
    ('{"messages": [{"role": "user", "content": "\ud800"}]}'.encode("utf-16-le", "surrogatepass"),
     "not UTF-8 text"),
    ("\ufeff[1]".encode("utf-16"), "not UTF-8 text"),
])
def test_json_that_python_reads_but_an_expert_could_not_is_invalid_json(raw: bytes, says: str) -> None:
    refused = problem(parse_json, raw)
    assert (refused.param, refused.code) == (None, "invalid_json") and says in refused.message


@pytest.mark.parametrize(("raw", "key"), [
    (b'{"model": "coder", "model": "mathy", "messages": []}', "model"),
    (b'{"messages": [{"role": "user", "role": "system", "content": "hi"}]}', "role"),
    (b'{"' + b"k" * 60 + b'": 1, "' + b"k" * 60 + b'": 2}', "k" * 37 + "..."),
])
def test_a_key_given_twice_in_one_object_is_refused_naming_it(raw: bytes, key: str) -> None:
    """json.loads kept the last: "model" twice was answered by the second, where a proxy enforcing an allow-list on
    the first would have let it through."""
    refused = problem(parse_json, raw)
    assert (refused.status, refused.code) == (400, "invalid_json")
    assert refused.message.startswith(f"request body gives the key {key!r} twice in one object; give each key once")
    assert parse_json(b'{"a": {"x": 1}, "b": {"x": 2}}') == {"a": {"x": 1}, "b": {"x": 2}}  # one key per object


def test_a_utf8_bom_is_let_through() -> None:
    assert parse_json(b"\xef\xbb\xbf" + b'{"a": "caf\xc3\xa9"}') == {"a": "caf\u00e9"}


def test_since_is_unix_seconds_or_an_iso_time_taken_as_utc() -> None:
    assert parse_since("1700000000") == 1_700_000_000.0
    assert parse_since("2024-01-01T00:00:00") == 1_704_067_200.0
    assert parse_since("") is None
    assert problem(parse_since, "nan").param == "since"


def test_a_problem_is_the_openai_error_object_with_the_routers_own_fields_after() -> None:
    refused = RequestProblem(400, "bad config", "invalid_request_error", "invalid_config", extra={"problems": []})
    assert refused.error_body() == {"error": {"message": "bad config", "type": "invalid_request_error",
                                              "param": None, "code": "invalid_config", "problems": []}}


@pytest.mark.parametrize("depth", [128, 129, 950])
def test_a_body_nested_past_the_depth_bar_is_invalid_json_before_anything_writes_it(depth: int) -> None:
    """A body nested ~950 levels parsed, then failed deeper in the stack when it was written to the expert of a
    stream (a RecursionError, a 500); the bar refuses it up front, and lets a body at the bar through."""
    deep = b'{"metadata": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"
    assert json_depth(json.loads(deep)) == depth
    if depth <= MAX_JSON_DEPTH:
        assert parse_json(deep)["metadata"]
    else:
        refused = problem(parse_json, deep)
        assert refused.code == "invalid_json" and f"more than {MAX_JSON_DEPTH} levels" in refused.message


def test_json_depth_counts_arrays_and_objects_only() -> None:
    assert [json_depth(v) for v in (1, "x", [], {}, [[1], {"a": [2]}], {"a": {"b": {"c": None}}})] == [0, 0, 1, 1, 3, 3]
