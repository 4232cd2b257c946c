"""/metrics and the per-request JSON log lines, through the service in-process with fakes."""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from experts.errors import ExpertTimeout, ExpertUnavailable
from router.logs import JsonFormatter, RequestRecord, configure_json_logging
from router.metrics import RouterMetrics
from router.orchestrator import Orchestrator
from router.service import create_app
from tests.doubles.fakes import FakeExpert, FakeGate, fake_config
from tests.support import samples, value

NAMES = ["math", "code"]
CHAT = {"model": "auto", "messages": [{"role": "user", "content": "an integral"}]}


def make_app(fail: dict[str, Any] | None = None, **overrides: object) -> FastAPI:
    fail = fail or {}
    config = fake_config(NAMES, **overrides)
    experts = {n: FakeExpert(config.expert(n), pieces=[f"{n} ", "says ", "hi"], text=f"{n} says hi",
                             fail=fail.get(n), cost=0.002) for n in NAMES}
    gate = FakeGate(NAMES, {"integral": [0.9, 0.1]}, default=[0.2, 0.8])
    return create_app(Orchestrator(config, gate, experts), environ={})


def client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router")


def unavailable(name: str) -> ExpertUnavailable:
    return ExpertUnavailable(name, "connection refused")


async def test_metrics_count_requests_routing_tokens_cost_and_failures() -> None:
    app = make_app(fail={"code": unavailable})
    async with client(app) as http:
        await http.post("/v1/chat/completions", json=CHAT)  # math answers
        await http.post("/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": "hi"}]})
        await http.post("/v1/chat/completions", json={**CHAT, "model": "gpt-9"})  # unknown: 404
        await http.get("/no/such/path")
        await http.get("/v1/models/math")
        await http.get("/v1/models/gpt-9")
        r = await http.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    page = samples(r.text)
    assert value(page, "moe_requests_total", route="/v1/chat/completions", status="200", model="auto") == 2
    assert value(page, "moe_requests_total", route="/v1/chat/completions", status="404", model="other") == 1
    assert value(page, "moe_requests_total", route="other", status="404", model="") == 1
    # A route with a path parameter counts under its template, whatever name the path held.
    assert value(page, "moe_requests_total", route="/v1/models/{model}", status="200", model="") == 1
    assert value(page, "moe_requests_total", route="/v1/models/{model}", status="404", model="") == 1
    # The gate chose math once and code once; code failed and math answered both times after fallback.
    assert value(page, "moe_routed_total", expert="math") == 1
    assert value(page, "moe_routed_total", expert="code") == 1
    assert value(page, "moe_gate_decisions_total", stage="single") == 2  # a one-stage gate decided both
    assert value(page, "moe_answered_total", expert="math") == 2
    assert value(page, "moe_expert_failures_total", expert="code", kind="unavailable") == 1
    assert value(page, "moe_expert_latency_seconds_count", expert="math", outcome="ok") == 2
    assert value(page, "moe_expert_latency_seconds_count", expert="code", outcome="error") == 1
    assert value(page, "moe_tokens_total", expert="math", kind="prompt") == 6
    assert value(page, "moe_tokens_total", expert="math", kind="completion") == 10
    assert value(page, "moe_cost_usd_total", expert="math") == pytest.approx(0.004)
    assert value(page, "moe_request_latency_seconds_count", route="/v1/chat/completions") == 3


async def test_metrics_from_streams_and_total_failures() -> None:
    app = make_app(fail={"math": lambda n: ExpertTimeout(n, "slow"), "code": unavailable})
    async with client(app) as http:
        failed = await http.post("/v1/chat/completions", json=CHAT)
        page = samples((await http.get("/metrics")).text)
    assert failed.status_code == 503
    assert value(page, "moe_expert_failures_total", expert="math", kind="timeout") == 1
    assert value(page, "moe_expert_failures_total", expert="code", kind="unavailable") == 1

    app = make_app()
    async with client(app) as http:
        async with http.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            _ = [line async for line in r.aiter_lines()]
        page = samples((await http.get("/metrics")).text)
    assert value(page, "moe_answered_total", expert="math") == 1
    assert value(page, "moe_tokens_total", expert="math", kind="completion") == 3
    assert value(page, "moe_cost_usd_total", expert="math") == pytest.approx(0.002)


async def test_breaker_and_in_flight_gauges_when_the_orchestrator_has_expert_states() -> None:
    async with client(make_app()) as http:
        page = samples((await http.get("/metrics")).text)
    assert value(page, "moe_expert_in_flight", expert="math") == 0
    assert value(page, "moe_breaker_state", expert="math", state="closed") == 1
    assert value(page, "moe_breaker_state", expert="math", state="open") == 0


def test_breaker_gauge_reads_the_states_it_is_given() -> None:
    class Source:
        def expert_states(self) -> dict[str, Any]:
            return {"a": {"in_flight": 2, "breaker": {"state": "open"}}, "b": {"breaker": "half_open"},
                    "c": {"breaker": {"state": "weird"}}}

    page = samples(RouterMetrics(Source).render().decode())
    assert value(page, "moe_breaker_state", expert="a", state="open") == 1
    assert value(page, "moe_breaker_state", expert="a", state="closed") == 0
    assert value(page, "moe_breaker_state", expert="b", state="half_open") == 1
    assert value(page, "moe_expert_in_flight", expert="a") == 2
    assert not any(k[1] and ("expert", "c") in k[1] for k in page if k[0] == "moe_breaker_state")
    # Without expert_states() the gauges are simply absent.
    assert "moe_breaker_state" not in RouterMetrics(lambda: object()).render().decode()


async def test_each_app_has_its_own_registry() -> None:
    one, two = make_app(), make_app()
    async with client(one) as http:
        await http.post("/v1/chat/completions", json=CHAT)
    async with client(two) as http:
        page = samples((await http.get("/metrics")).text)
    assert value(page, "moe_answered_total", expert="math") == 0
    assert one.state.metrics.registry is not two.state.metrics.registry


# -- logs -------------------------------------------------------------------------------------------------
def request_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "router.requests"]


async def test_one_json_log_line_per_request_without_content(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="router.requests")
    app = make_app(fail={"code": unavailable})
    async with client(app) as http:
        r = await http.post("/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": "hi"}]},
                            headers={"x-request-id": "trace-123"})
        await http.get("/health")
    assert r.headers["x-request-id"] == "trace-123"
    chat, health = request_lines(caplog)
    assert chat["request_id"] == "trace-123"
    assert chat["completion_id"] == r.json()["id"]  # the id clients and feedback know the answer by
    assert (chat["route"], chat["status"], chat["model"], chat["expert"]) == ("/v1/chat/completions", 200, "auto",
                                                                              "math")
    assert (chat["prompt_tokens"], chat["completion_tokens"]) == (3, 5)
    assert chat["cost_usd"] == pytest.approx(0.002)
    assert chat["chosen"] == ["code"]
    assert [(a["expert"], a["ok"], a.get("kind")) for a in chat["attempts"]] == [("code", False, "unavailable"),
                                                                                  ("math", True, None)]
    assert chat["latency_ms"] >= 0
    assert "messages" not in chat and "answer" not in chat
    assert health["route"] == "/health" and health["status"] == 200


async def test_log_content_setting_adds_prompts_and_answers(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="router.requests")
    app = make_app(service={"log_content": True})
    async with client(app) as http:
        await http.post("/v1/chat/completions", json=CHAT)
        async with http.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            _ = [line async for line in r.aiter_lines()]
    plain, streamed = request_lines(caplog)
    assert plain["messages"] == [{"role": "user", "content": "an integral"}]
    assert plain["answer"] == "math says hi"
    # The stream's line is written when the stream has ended, with the whole answer and the trace.
    assert streamed["stream"] is True
    assert streamed["answer"] == "math says hi"
    assert streamed["expert"] == "math" and streamed["completion_tokens"] == 3


async def test_failed_requests_log_their_error(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="router.requests")
    app = make_app(fail={"math": unavailable, "code": unavailable})
    async with client(app) as http:
        await http.post("/v1/chat/completions", json=CHAT)
        await http.post("/v1/chat/completions", content=b"{bad", headers={"content-type": "application/json"})
    failed, bad = request_lines(caplog)
    assert (failed["status"], failed["error"]) == (503, "all_experts_failed")
    levels = [r.levelname for r in caplog.records if r.name == "router.requests"]
    assert levels == ["WARNING", "INFO"]  # a failure the service could not serve is what an alert watches for
    assert [a["expert"] for a in failed["attempts"]] == ["math", "code"]
    assert (bad["status"], bad["error"]) == (400, "invalid_json")


def test_a_request_line_reads_the_same_written_by_the_formatter_or_read_as_its_message() -> None:
    """The formatter writes a request line's fields once, as they are (it read the line's JSON back and wrote it
    again); another handler (a host application's, pytest's caplog) still reads the message as the JSON line."""
    from datetime import UTC, datetime
    from pathlib import Path

    from router.logs import REQUEST_LOGGER, log_request

    record = RequestRecord(request_id="r1", method="POST", route="/v1/chat/completions", model="auto")
    record.status, record.latency_ms, record.error = 503, 1.5, "all_experts_failed"
    record.failures = [{"expert": "math", "kind": "timeout", "message": str(Path("/x"))}]
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, r: logging.LogRecord) -> None:
            seen.append(r)

    logger = logging.getLogger(REQUEST_LOGGER)
    keep = Keep()
    logger.addHandler(keep)
    try:
        log_request(record, content=False)
    finally:
        logger.removeHandler(keep)
    written = json.loads(JsonFormatter().format(seen[0]))
    message = json.loads(seen[0].getMessage())
    assert seen[0].levelno == logging.WARNING and message["status"] == 503 and message["request_id"] == "r1"
    assert {k: v for k, v in written.items() if k not in ("ts", "level", "logger")} == message
    assert written["ts"].startswith(datetime.now(UTC).strftime("%Y-%m-%d"))


def test_a_host_filter_that_rewrites_a_request_line_is_written_as_it_left_it() -> None:
    """A host's filter works on the message as text (a redaction, a health-check drop): the line is written as the
    filter left it, and the record's message is always a string."""
    from router.logs import REQUEST_LOGGER, log_request

    record = RequestRecord(request_id="r1", method="POST", route="/v1/chat/completions", model="auto")
    record.status = 503  # logged at WARNING, which the logger passes whatever its level
    seen: list[logging.LogRecord] = []

    class Redact(logging.Filter):
        def filter(self, r: logging.LogRecord) -> bool:
            assert isinstance(r.msg, str)
            r.msg = r.msg.replace('"model":"auto"', '"model":"***"')
            return True

    class Keep(logging.Handler):
        def emit(self, r: logging.LogRecord) -> None:
            seen.append(r)

    logger = logging.getLogger(REQUEST_LOGGER)
    redact, keep = Redact(), Keep()
    logger.addFilter(redact)
    logger.addHandler(keep)
    try:
        log_request(record, content=False)
    finally:
        logger.removeFilter(redact)
        logger.removeHandler(keep)
    assert json.loads(JsonFormatter().format(seen[0]))["model"] == "***"


def test_warnings_once_holds_with_thread_ids_off_in_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``logging.logThreads`` off every record's thread is None: the filter took each for another thread's
    and dropped and noted nothing."""
    from router.logs import warnings_once

    monkeypatch.setattr(logging, "logThreads", False)
    logger = logging.getLogger("router.test_once_nothreads")
    notes: list[str] = []
    with warnings_once(("router.test_once_nothreads",), into=notes):
        assert logger.filters[0].filter(logger.makeRecord(logger.name, logging.WARNING, __file__, 1, "w", (), None))
        assert not logger.filters[0].filter(logger.makeRecord(logger.name, logging.WARNING, __file__, 1, "w", (), None))
    assert notes == ["w"]


def test_json_formatter_merges_json_messages_and_configure_is_idempotent() -> None:
    formatter = JsonFormatter()
    record = logging.LogRecord("router.requests", logging.INFO, __file__, 1, '{"event": "request", "status": 200}',
                               None, None)
    out = json.loads(formatter.format(record))
    assert (out["event"], out["status"], out["level"], out["logger"]) == ("request", 200, "INFO", "router.requests")
    plain = logging.LogRecord("router", logging.WARNING, __file__, 1, "reload failed: %s", ("bad yaml",), None)
    assert json.loads(formatter.format(plain))["message"] == "reload failed: bad yaml"

    name = "router.test_configure"
    logger = logging.getLogger(name)
    try:
        configure_json_logging(logger=name)
        configure_json_logging(logger=name)
        assert len(logger.handlers) == 1 and isinstance(logger.handlers[0].formatter, JsonFormatter)
        assert logger.propagate is False
    finally:
        logger.handlers.clear()
        logger.propagate = True


def test_record_line_leaves_content_out_unless_asked() -> None:
    record = RequestRecord(request_id="r1", method="POST", route="/v1/chat/completions",
                           messages=[{"role": "user", "content": "secret plan"}], answer=["ok"])
    assert "messages" not in record.line(content=False)
    assert record.line(content=True)["messages"][0]["content"] == "secret plan"


@pytest.mark.parametrize("kind", ["circuit_open", "overloaded", "budget_exhausted", "not_tried"])
def test_an_expert_passed_over_without_a_call_is_a_failure_but_no_latency(kind: str) -> None:
    """Its 0 s would drag the expert's latency quantiles down (a panel member left out for the budget, a breaker
    holding it): counted by kind, not observed as a call. A real call that failed is observed as one."""
    from router.trace import Attempt, Trace

    metrics = RouterMetrics()
    trace = Trace(attempts=[Attempt(expert="code", ok=False, error={"kind": kind, "message": "passed over"}),
                            Attempt(expert="code", ok=False, latency_ms=1500.0,
                                    error={"kind": "timeout", "message": "read timeout"}),
                            Attempt(expert="math", ok=True, latency_ms=250.0)])
    metrics.observe_trace(trace, "math")
    page = samples(metrics.render().decode())
    assert value(page, "moe_expert_failures_total", expert="code", kind=kind) == 1
    assert value(page, "moe_expert_failures_total", expert="code", kind="timeout") == 1
    assert value(page, "moe_expert_latency_seconds_count", expert="code", outcome="error") == 1
    assert value(page, "moe_expert_latency_seconds_sum", expert="code", outcome="error") == pytest.approx(1.5)
    assert value(page, "moe_expert_latency_seconds_count", expert="math", outcome="ok") == 1


def test_warnings_once_keeps_to_its_own_thread_and_notes_a_warning_s_note() -> None:
    """Two runs in threads (two trainings, say) each note and drop only their own warnings; a warning that gives a
    ``note`` (one that quotes training texts) is noted in those words."""
    import threading

    from router.logs import warnings_once

    logger = logging.getLogger("router.test_once")
    notes: dict[str, list[str]] = {"a": [], "b": []}
    shown: list[str] = []

    class Keep(logging.Handler):
        def emit(self, r: logging.LogRecord) -> None:
            shown.append(r.getMessage())

    keep = Keep()
    logger.addHandler(keep)
    ready = threading.Barrier(2)

    def run(name: str) -> None:
        with warnings_once(("router.test_once",), into=notes[name]):
            ready.wait()
            logger.warning("shared warning")
            logger.warning("shared warning")
            logger.warning("texts 'secret query' given two labels", extra={"note": f"{name}: 1 text, two labels"})
            ready.wait()

    try:
        threads = [threading.Thread(target=run, args=(n,)) for n in notes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        logger.removeHandler(keep)
    assert notes == {"a": ["shared warning", "a: 1 text, two labels"], "b": ["shared warning", "b: 1 text, two labels"]}
    assert shown.count("shared warning") == 2 and not logger.filters
