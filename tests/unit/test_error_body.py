"""The OpenAI-format error object (``router.errors.error_body``): its keys, their order, ``param`` and the
router's own fields, and that the service, ``AllExpertsFailed`` and the SDK's ``LocalRouter`` all give the same
object. The expected bodies are written out here, not built with ``error_body``, so a change of shape fails."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from experts.errors import ExpertError, ExpertRejected, ExpertUnavailable
from router import service
from router.errors import error_body
from router.fallback import AllExpertsFailed
from router.orchestrator import Orchestrator
from router.sdk import LocalRouter, RouterAPIError
from router.service import create_app
from tests.doubles.fakes import FakeExpert, FakeGate, fake_config

NAMES = ["math", "code"]
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}]


def test_the_error_object_has_openais_four_keys_in_order_with_param_null_when_none_is_given() -> None:
    body = error_body("no route GET /x", "invalid_request_error", "not_found")
    assert json.dumps(body) == ('{"error": {"message": "no route GET /x", "type": "invalid_request_error", '
                                '"param": null, "code": "not_found"}}')


def test_a_param_takes_its_place_between_type_and_code() -> None:
    body = error_body("unknown model 'gpt-9'", "invalid_request_error", "model_not_found", "model")
    assert list(body) == ["error"]
    assert list(body["error"].items()) == [("message", "unknown model 'gpt-9'"), ("type", "invalid_request_error"),
                                           ("param", "model"), ("code", "model_not_found")]


def test_the_routers_own_fields_follow_the_four_in_the_order_given() -> None:
    body = error_body("bad config", "invalid_request_error", "invalid_config", param=None,
                      problems=[{"loc": "experts"}], source="/etc/moe.yaml")
    assert list(body["error"].items()) == [("message", "bad config"), ("type", "invalid_request_error"),
                                           ("param", None), ("code", "invalid_config"),
                                           ("problems", [{"loc": "experts"}]), ("source", "/etc/moe.yaml")]


def test_the_service_still_exports_the_one_builder() -> None:
    assert service.error_body is error_body
    assert "error_body" in service.__all__


@pytest.mark.parametrize(
    ("causes", "expected"),
    [
        ([ExpertUnavailable("math", "refused")],
         {"message": "every candidate expert failed: math (unavailable): refused", "type": "service_unavailable",
          "param": None, "code": "all_experts_failed",
          "causes": [{"expert": "math", "kind": "unavailable", "message": "refused"}]}),
        ([ExpertRejected("math", 400, "bad temperature")],
         {"message": "the request is invalid: every expert called refused it (every candidate expert failed: "
                     "math (rejected): HTTP 400: bad temperature)", "type": "invalid_request_error",
          "param": None, "code": "rejected_by_experts",
          "causes": [{"expert": "math", "kind": "rejected", "message": "HTTP 400: bad temperature"}]}),
    ],
    ids=["unavailable", "rejected"],
)
def test_all_experts_failed_carries_the_same_object_with_its_causes_last(causes: list[ExpertError],
                                                                        expected: dict[str, object]) -> None:
    body = AllExpertsFailed(causes).error_body()
    assert list(body) == ["error"]
    assert list(body["error"].items()) == list(expected.items())


def _router(fail: bool) -> Orchestrator:
    config = fake_config(NAMES)
    experts = {n: FakeExpert(config.expert(n), text=f"{n} says hi",
                             fail=(lambda x: ExpertUnavailable(x, "refused")) if fail else None) for n in NAMES}
    return Orchestrator(config, FakeGate(NAMES, {}, default=[0.6, 0.4]), experts)


@pytest.mark.parametrize(
    ("fail", "request_fields", "status", "code", "param"),
    [
        (True, {}, 503, "all_experts_failed", None),
        (False, {"model": "gpt-9"}, 404, "model_not_found", "model"),
        (False, {"tools": TOOLS}, 400, "tools_not_supported", "tools"),
    ],
    ids=["all-failed", "unknown-model", "no-capable-expert"],
)
async def test_local_router_raises_the_very_object_the_service_answers(
        fail: bool, request_fields: dict[str, object], status: int, code: str, param: str | None) -> None:
    orchestrator = _router(fail)
    fields = {"model": "auto", **request_fields}
    with pytest.raises(RouterAPIError) as local:
        await LocalRouter(orchestrator).chat("hi", **fields)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(orchestrator)),
                                 base_url="http://router") as http:
        served = await http.post("/v1/chat/completions",
                                 json={"messages": [{"role": "user", "content": "hi"}], **fields})
    assert (served.status_code, local.value.status) == (status, status)
    served_body = served.json()
    # A total failure carries its trace beside the error (``moe``), as an answer does; its timings differ.
    local_trace, served_trace = local.value.body.pop("moe", None), served_body.pop("moe", None)
    assert (local_trace is None, served_trace is None) == (not fail, not fail)
    if fail:
        assert [(a["expert"], a["error"]["kind"]) for a in served_trace["attempts"]] == \
            [(a["expert"], a["error"]["kind"]) for a in local_trace["attempts"]] == \
            [("math", "unavailable"), ("code", "unavailable")]
    assert local.value.body == served_body
    # Equal dicts may differ in order; the wire and the SDK's object keep the same order too.
    assert list(local.value.body["error"]) == list(served_body["error"])
    assert list(served_body["error"])[:4] == ["message", "type", "param", "code"]
    assert (served_body["error"]["code"], served_body["error"]["param"]) == (code, param)


async def test_a_stream_that_breaks_sends_the_object_a_request_would_have_got() -> None:
    config = fake_config(NAMES)
    experts = {n: FakeExpert(config.expert(n), pieces=["a", "b"], fail_after=1,
                             fail=lambda x: ExpertUnavailable(x, "gone")) for n in NAMES}
    app = create_app(Orchestrator(config, FakeGate(NAMES, {}, default=[0.6, 0.4]), experts))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as http:
        r = await http.post("/v1/chat/completions",
                            json={"model": "auto", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    events = [line.removeprefix("data: ") for line in r.text.splitlines() if line.startswith('data: {"error"')]
    assert len(events) == 1
    error, trace = events[0].split(', "moe": ', 1)  # the error as a request would get it, then the trace
    assert error == ('{"error": {"message": "every candidate expert failed: math (unavailable): gone; '
                     'code (unavailable): gone", "type": "service_unavailable", "param": null, '
                     '"code": "all_experts_failed", "causes": [{"expert": "math", "kind": "unavailable", '
                     '"message": "gone"}, {"expert": "code", "kind": "unavailable", "message": "gone"}]}')
    moe = json.loads(trace[:-1])
    assert [a["expert"] for a in moe["attempts"]] == ["math", "code"] and moe["switches"][0]["from"] == "math"


def test_the_sdk_and_the_error_object_import_without_fastapi() -> None:
    # A fresh interpreter: this one has imported the service already.
    code = ("import sys, router.errors, router.fallback, router.sdk; "
            "print(sorted(m for m in ('fastapi', 'starlette') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
