"""Fuzz the HTTP API from its OpenAPI schema with schemathesis, in-process (ASGI), fake experts behind it.

Malformed input must get a 4xx, never a 5xx or a hang. Each operation gets ``EXAMPLES`` schema-valid cases and
``EXAMPLES`` schema-violating ones, derandomized (the same cases every run), plus hand-made malformed bodies
schemathesis cannot produce (bytes that are not JSON, not UTF-8, nested past the parser's depth).
The figures are printed and written to ``out/fuzz/schemathesis.json``.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

from router.openapi import describe_request_bodies
from router.orchestrator import Orchestrator
from router.service import create_app
from tests.doubles.fakes import FakeExpert, FakeGate, fake_config

EXAMPLES = 100
HANG_S = 5.0  # one in-process call to fakes takes milliseconds; this long is a hang
NAMES = ["math", "code"]
OUT = Path(__file__).resolve().parents[2] / "out" / "fuzz" / "schemathesis.json"


def make_app() -> FastAPI:
    config = fake_config(NAMES, service={"max_request_bytes": 65_536, "max_prompt_chars": 2_000})
    experts = {n: FakeExpert(config.expert(n), pieces=[f"{n} ", "says ", "hi"], text=f"{n} says hi")
               for n in NAMES}
    app = create_app(Orchestrator(config, FakeGate(NAMES, {"integral": [0.9, 0.1]}, default=[0.2, 0.8]), experts),
                     environ={})
    describe_request_bodies(app)
    return app


# Figures across the whole module: cases tried per operation and mode, statuses, failures.
FIGURES: dict[str, Any] = {"cases": 0, "by_operation": Counter(), "statuses": Counter(), "failures": []}


def _call(case: Any) -> Any:
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(case.call)
        try:
            return future.result(timeout=HANG_S)
        except FutureTimeout:
            pytest.fail(f"{case.operation.label}: no answer within {HANG_S}s (a hang) for {case.body!r:.300}")


SCHEMA = schemathesis.openapi.from_asgi("/openapi.json", make_app())
OPERATIONS = sorted((op.ok() for op in SCHEMA.get_all_operations()), key=lambda op: op.label)  # type: ignore[union-attr]


def test_the_schema_describes_the_request_bodies() -> None:
    body = SCHEMA.raw_schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    chat = body["content"]["application/json"]["schema"]
    assert chat["properties"]["messages"]["minItems"] == 1
    assert "$ref" not in json.dumps(chat)
    assert "requestBody" in SCHEMA.raw_schema["paths"]["/v1/route"]["post"]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda op: op.label)
def test_no_input_gets_a_server_error_or_hangs(operation: Any, mode: GenerationMode) -> None:
    raw = operation.definition.raw
    if mode is GenerationMode.NEGATIVE and "requestBody" not in raw and not raw.get("parameters"):
        pytest.skip("nothing in this operation can be made invalid")
    strategy = operation.as_strategy(generation_mode=mode)

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None, print_blob=False,
              phases=[Phase.explicit, Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case: Any) -> None:
        response = _call(case)
        FIGURES["cases"] += 1
        FIGURES["by_operation"][f"{operation.label} [{mode}]"] += 1
        FIGURES["statuses"][str(response.status_code)] += 1
        if response.status_code >= 500:
            failure = {"operation": operation.label, "status": response.status_code,
                       "body": repr(case.body)[:500], "response": response.text[:300]}
            FIGURES["failures"].append(failure)
            raise AssertionError(f"server error: {failure}")

    run()


# Bodies schemathesis cannot send: not JSON, not UTF-8, or JSON the service cannot echo back.
_DEEP = b"[" * 20_000 + b"]" * 20_000  # under the size limit, past the parser's recursion limit
MALFORMED = [
    pytest.param(b"{not json", id="not-json"),
    pytest.param(b"", id="empty"),
    pytest.param(b"\xff\xfe\x00", id="not-utf8"),
    pytest.param(b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', id="nan"),
    pytest.param(b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e400}', id="overflow"),
    pytest.param(b'{"messages": [{"role": "user", "content": {"a": 1}}]}', id="content-object"),
    pytest.param(b"x" * 70_000, id="over-size-limit"),
    # Once 500s: RecursionError from json.loads, and a lone surrogate that failed when the trace echoed it.
    pytest.param(_DEEP, id="nested-too-deep"),
    pytest.param(b'{"messages": [{"role": "user", "content": "\\ud800"}]}', id="lone-surrogate"),
]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/route", "/v1/route/batch"])
@pytest.mark.parametrize("body", MALFORMED)
async def test_malformed_bodies_get_a_4xx(path: str, body: bytes) -> None:
    transport = httpx.ASGITransport(app=make_app(), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://router", timeout=HANG_S) as http:
        r = await http.post(path, content=body, headers={"content-type": "application/json"})
    FIGURES["cases"] += 1
    FIGURES["by_operation"][f"POST {path} [malformed]"] += 1
    FIGURES["statuses"][str(r.status_code)] += 1
    if r.status_code >= 500:
        FIGURES["failures"].append({"operation": f"POST {path}", "status": r.status_code,
                                    "body": repr(body)[:120], "response": r.text[:300]})
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["code"]


@pytest.fixture(scope="module", autouse=True)
def figures(pytestconfig: pytest.Config) -> Iterator[None]:
    """After this module's cases: prints the figures and keeps them under out/fuzz (a report, not a test)."""
    yield
    if not FIGURES["cases"]:
        return  # none of the cases ran (deselected): nothing to report
    figures = {**FIGURES, "by_operation": dict(FIGURES["by_operation"]), "statuses": dict(FIGURES["statuses"]),
               "examples_per_operation_and_mode": EXAMPLES, "seeded": "derandomize=True",
               "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\nschemathesis: {figures['cases']} cases, {len(figures['failures'])} server errors, "
              f"statuses {figures['statuses']} -> {OUT}")


