"""What an operator reads of a request through the service, with real experts over HTTP (``ScriptedOpenAIServer``
test doubles, one per expert, ranked "a", "b", "c" by a fake gate): its JSON log line's level and fields, and the
metrics beside it."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager
from typing import Any

import httpx
import pytest

from tests.doubles.scripted_server import Behaviour, ScriptedOpenAIServer
from tests.support import samples, service_over, value

CHAT = {"model": "auto", "messages": [{"role": "user", "content": "what is the capital of France?"}]}


@asynccontextmanager
async def rig(**config: Any) -> AsyncIterator[tuple[dict[str, ScriptedOpenAIServer], httpx.AsyncClient]]:
    names = ("a", "b", "c")
    with ExitStack() as stack:
        servers = {n: stack.enter_context(ScriptedOpenAIServer(name=n)) for n in names}
        raw = [{"name": n, "type": "vllm", "model": n, "endpoint": s.url, "timeout_s": 5.0,
                "capabilities": ["chat", "stream"]} for n, s in servers.items()]
        async with service_over(raw, [0.6, 0.3, 0.1], **config) as http:
            yield servers, http


def request_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, dict[str, Any]]]:
    return [(r.levelname, json.loads(r.getMessage())) for r in caplog.records if r.name == "router.requests"]


async def test_a_stream_every_expert_failed_mid_way_is_logged_at_warning(caplog: pytest.LogCaptureFixture) -> None:
    """The stream began (200 went out), then its expert broke off and nobody could continue it: the client gets an
    ``all_experts_failed`` error event. The service failed that request as surely as a 503, so its line is a
    WARNING, which ``--log-level warning`` and an alert on WARNING lines keep; a stream the client left is not."""
    caplog.set_level(logging.INFO, logger="router.requests")
    async with rig() as (servers, http):
        servers["a"].push(Behaviour.ok("one two three four five", die_after=2))
        servers["b"].push(Behaviour.error(500))
        servers["c"].push(Behaviour.error(500))
        async with http.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            body = (await r.aread()).decode()
        ok = await http.post("/v1/chat/completions", json=CHAT)
        page = samples((await http.get("/metrics")).text)
    assert r.status_code == 200 and '"code": "all_experts_failed"' in body
    assert ok.status_code == 200
    (failed_level, failed), (ok_level, answered), _metrics = request_lines(caplog)
    assert (failed["status"], failed["error"], failed["request_id"]) == (200, "all_experts_failed",
                                                                          r.headers["x-request-id"])
    assert failed_level == "WARNING"
    assert (ok_level, answered["status"]) == ("INFO", 200)
    # The metrics still count what was tried: a broke off, b and c refused the continuation.
    assert value(page, "moe_expert_failures_total", expert="a", kind="unavailable") == 1
    assert value(page, "moe_expert_failures_total", expert="b", kind="server_error") == 1
    assert value(page, "moe_expert_failures_total", expert="c", kind="server_error") == 1


@pytest.mark.parametrize(("status", "error", "level"), [
    (200, "internal_error", "WARNING"),  # a stream an internal error cut short after its 200
    (200, "client_closed_request", "INFO"),  # the client left: not the service's failure
    (499, "client_closed_request", "INFO"),
    (400, "rejected_by_experts", "INFO"),  # the request's own fault
    (503, "all_experts_failed", "WARNING"),
])
def test_the_level_says_whether_the_service_failed_the_request(caplog: pytest.LogCaptureFixture, status: int,
                                                               error: str, level: str) -> None:
    from router.logs import RequestRecord, log_request

    caplog.set_level(logging.INFO, logger="router.requests")
    log_request(RequestRecord(request_id="r1", method="POST", route="/v1/chat/completions", status=status,
                              error=error), content=False)
    [(logged, line)] = request_lines(caplog)
    assert (logged, line["status"], line["error"]) == (level, status, error)


async def test_candidates_fallback_never_reached_are_counted_as_not_tried() -> None:
    """max_attempts stopped fallback after a: the 503 lists b and c as not_tried, and so do the failure metrics
    (they are causes, not attempts, so nothing is counted twice)."""
    async with rig(fallback={"max_attempts": 1}) as (servers, http):
        servers["a"].push(Behaviour.error(500))
        r = await http.post("/v1/chat/completions", json=CHAT)
        page = samples((await http.get("/metrics")).text)
    assert r.status_code == 503
    assert [(c["expert"], c["kind"]) for c in r.json()["error"]["causes"]] == [
        ("a", "server_error"), ("b", "not_tried"), ("c", "not_tried")]
    assert value(page, "moe_expert_failures_total", expert="a", kind="server_error") == 1
    for name in ("b", "c"):
        assert value(page, "moe_expert_failures_total", expert=name, kind="not_tried") == 1
        assert not [key for key in page if key[0] == "moe_expert_latency_seconds_count" and ("expert", name) in key[1]]
