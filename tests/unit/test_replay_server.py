"""The replay server, in process through httpx.ASGITransport, with httpx and with the official openai client."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI

from experts.base import ExpertContext
from experts.recordings import RouterBenchRow, load_mmlu_pro, load_routerbench, mmlu_pro_prompt
from experts.registry import build_expert
from experts.replay_server import create_app
from router.cli import main
from router.config import ExpertConfig

RB_MODEL = "gpt-4-1106-preview"


def _config(name: str, source: str, model: str) -> ExpertConfig:
    path = "routerdc/routerbench_zs" if source == "routerbench" else "mmlu_pro_outcomes"
    return ExpertConfig.model_validate({
        "name": name, "type": "replay", "model": model, "replay": {"source": source, "path": path},
        "cost": {"input_per_1k": 0.001, "output_per_1k": 0.002},
    })


@pytest.fixture
def app(data_dir: Path) -> FastAPI:
    context = ExpertContext(base_dir=data_dir)
    return create_app([
        build_expert(_config("gpt4", "routerbench", RB_MODEL), context),
        build_expert(_config("gemma", "mmlu_pro", "gemma-7b"), context),
    ])


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://replay") as c:
        yield c


@pytest.fixture
def mbpp_row(data_dir: Path) -> RouterBenchRow:
    store = load_routerbench(data_dir / "routerdc" / "routerbench_zs")
    return next(r for r in store.rows if r.sample_id == "mbpp.dev.1")


def chat(model: str, text: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def sse_payloads(body: str) -> list[Any]:
    datas = [line.removeprefix("data: ") for line in body.splitlines() if line.startswith("data: ")]
    assert datas[-1] == "[DONE]"
    return [json.loads(d) for d in datas[:-1]]


async def test_health_and_models(client: httpx.AsyncClient) -> None:
    health = (await client.get("/health")).json()
    assert health == {"status": "ok", "experts": ["gpt4", "gemma"]}
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list"
    assert [(m["id"], m["owned_by"]) for m in models["data"]] == [("gpt4", RB_MODEL), ("gemma", "gemma-7b")]


async def test_one_model_and_the_server_s_own_errors_are_openai_s(client: httpx.AsyncClient) -> None:
    """GET /v1/models/{id} was a bare 404 for a model /v1/models lists, and an unknown path or method got
    FastAPI's {"detail": ...}: an OpenAI client read no code from either."""
    card = (await client.get("/v1/models/gemma")).json()
    assert card == {"id": "gemma", "object": "model", "created": 0, "owned_by": "gemma-7b"}
    unknown = await client.get("/v1/models/nobody")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    for method, path, status, code in (("POST", "/v1/completions", 404, "not_found"),
                                       ("GET", "/v1/chat/completions", 405, "method_not_allowed")):
        response = await client.request(method, path, json={})
        error = response.json()["error"]
        assert (response.status_code, error["code"], error["type"]) == (status, code, "invalid_request_error")
        assert path in error["message"] and error["param"] is None
    assert "POST" in (await client.get("/v1/chat/completions")).headers["allow"]


async def test_completion_carries_the_recorded_text_and_cost(
    client: httpx.AsyncClient, mbpp_row: RouterBenchRow
) -> None:
    response = await client.post("/v1/chat/completions", json=chat("gpt4", mbpp_row.prompt))
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == "gpt4"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": mbpp_row.answers[RB_MODEL].response}
    assert choice["finish_reason"] == "stop"
    assert body["usage"]["cost"] == mbpp_row.answers[RB_MODEL].cost_usd == 0.010910000000000001
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]


async def test_mmlu_pro_completion(client: httpx.AsyncClient, data_dir: Path) -> None:
    prompt = mmlu_pro_prompt(load_mmlu_pro(data_dir / "mmlu_pro_outcomes").question(70))
    body = (await client.post("/v1/chat/completions", json=chat("gemma", prompt))).json()
    assert body["choices"][0]["message"]["content"] == "The answer is (I)."
    usage = body["usage"]
    assert usage["cost"] == pytest.approx(usage["prompt_tokens"] * 1e-6 + usage["completion_tokens"] * 2e-6)


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        (chat("nobody", "hi"), 404, "model_not_found"),
        (chat("gpt4", "a prompt nobody recorded"), 404, "no_recording"),
        ({"model": "gpt4", "messages": []}, 400, "invalid_request"),
        ({"model": "gpt4"}, 400, "invalid_request"),
        ({"model": "gpt4", "messages": [{"role": "wizard", "content": "x"}]}, 400, "invalid_request"),
    ],
)
async def test_errors_have_openai_bodies(
    client: httpx.AsyncClient, payload: dict[str, Any], status: int, code: str
) -> None:
    response = await client.post("/v1/chat/completions", json=payload)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]


async def test_malformed_json_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", content=b"{not json",
                                 headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


async def test_a_body_nested_too_deeply_or_too_large_is_refused_in_the_openai_format(client: httpx.AsyncClient) -> None:
    """A deeply nested body was a plain-text 500 (a RecursionError), and any size was read whole."""
    from experts.replay_server import MAX_BODY_BYTES

    nested = await client.post("/v1/chat/completions", content=b"[" * 100_000,
                               headers={"content-type": "application/json"})
    assert nested.status_code == 400 and nested.json()["error"]["code"] == "invalid_json"
    large = await client.post("/v1/chat/completions", content=b" " * (MAX_BODY_BYTES + 1),
                              headers={"content-type": "application/json"})
    assert large.status_code == 413 and large.json()["error"]["code"] == "request_too_large"


async def test_no_recording_stream_is_a_plain_404(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json=chat("gpt4", "unrecorded", stream=True))
    assert response.status_code == 404
    assert "no recording" in response.json()["error"]["message"]


async def test_stream_over_sse_with_usage(client: httpx.AsyncClient, mbpp_row: RouterBenchRow) -> None:
    payload = chat("gpt4", mbpp_row.prompt, stream=True, stream_options={"include_usage": True})
    response = await client.post("/v1/chat/completions", json=payload)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = sse_payloads(response.text)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == mbpp_row.answers[RB_MODEL].response
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["cost"] == mbpp_row.answers[RB_MODEL].cost_usd


async def test_stream_without_include_usage_has_no_usage_chunk(
    client: httpx.AsyncClient, mbpp_row: RouterBenchRow
) -> None:
    response = await client.post("/v1/chat/completions", json=chat("gpt4", mbpp_row.prompt, stream=True))
    assert all("usage" not in c for c in sse_payloads(response.text))


async def test_openai_client_plain_and_streamed(app: FastAPI, mbpp_row: RouterBenchRow) -> None:
    recorded = mbpp_row.answers[RB_MODEL]
    transport = httpx.ASGITransport(app=app)
    async with (
        httpx.AsyncClient(transport=transport) as http,
        # openai types http_client as httpx2's client but accepts an httpx one at run time, as used here.
        openai.AsyncOpenAI(base_url="http://replay/v1", api_key="unused", http_client=cast(Any, http)) as client,
    ):
        models = await client.models.list()
        assert [m.id for m in models.data] == ["gpt4", "gemma"]

        completion = await client.chat.completions.create(
            model="gpt4", messages=[{"role": "user", "content": mbpp_row.prompt}]
        )
        assert completion.choices[0].message.content == recorded.response
        assert completion.usage is not None
        assert (completion.usage.model_extra or {})["cost"] == recorded.cost_usd

        stream = await client.chat.completions.create(
            model="gpt4", messages=[{"role": "user", "content": mbpp_row.prompt}],
            stream=True, stream_options={"include_usage": True},
        )
        pieces: list[str] = []
        usage = None
        async for chunk in stream:
            pieces.extend(c.delta.content or "" for c in chunk.choices)
            usage = chunk.usage or usage
        assert "".join(pieces) == recorded.response
        assert usage is not None and usage.total_tokens == completion.usage.total_tokens

        with pytest.raises(openai.NotFoundError, match="no recording"):
            await client.chat.completions.create(model="gpt4", messages=[{"role": "user", "content": "??"}])


async def test_a_missing_recording_over_http_is_this_prompt_s_not_the_expert_s(app: FastAPI) -> None:
    """Behind moe serve-replay, a missing recording came back as a 404, which a router reads as a model the endpoint
    does not serve: a breaker failure, so a few unrecorded prompts locked every expert out, recorded prompts too.
    It is the NoRecording it is in process, which the breaker does not count."""
    from experts.errors import NoRecording
    from experts.types import ChatMessage, ChatRequest
    from router.breaker import classify

    context = ExpertContext(transport=httpx.ASGITransport(app=app))
    expert = build_expert(ExpertConfig.model_validate({
        "name": "remote", "type": "openai", "endpoint": "http://replay/v1", "model": "gpt4"}), context)
    with pytest.raises(NoRecording) as info:
        await expert.generate(ChatRequest(messages=[ChatMessage(role="user", content="a prompt nobody recorded")]))
    assert "no recording" in str(info.value) and classify(info.value) == "success"
    unknown = build_expert(ExpertConfig.model_validate({
        "name": "other", "type": "openai", "endpoint": "http://replay/v1", "model": "nobody"}), context)
    with pytest.raises(Exception) as missing:  # a model the endpoint does not serve stays the expert's failure
        await unknown.generate(ChatRequest(messages=[ChatMessage(role="user", content="hi")]))
    assert classify(missing.value) == "failure"  # type: ignore[arg-type]


def test_duplicate_expert_names_are_refused(data_dir: Path) -> None:
    expert = build_expert(_config("same", "routerbench", RB_MODEL), ExpertContext(base_dir=data_dir))
    with pytest.raises(ValueError, match="unique"):
        create_app([expert, expert])


def _write_config(tmp_path: Path, experts: list[dict[str, Any]]) -> Path:
    import yaml

    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump({"version": 1, "experts": experts}))
    return config


def test_main_serves_the_configs_replay_experts(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A path relative to the config file's folder, as configs are written.
    (tmp_path / "data").symlink_to(data_dir)
    config = _write_config(tmp_path, [
        {"name": "claude", "type": "replay", "model": "claude-v1",
         "replay": {"source": "routerbench", "path": "data/routerdc/routerbench_zs"}},
        {"name": "remote", "type": "openai", "model": "m", "endpoint": "http://localhost:9/v1",
         "api_key_env": "SURELY_UNSET_KEY_FOR_TEST"},
    ])
    served: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    assert main(["serve-replay", "--config", str(config), "--port", "9123"]) == 0
    assert served["port"] == 9123 and served["host"] == "127.0.0.1"
    assert list(served["app"].state.experts) == ["claude"]


def test_main_without_replay_experts_exits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _write_config(tmp_path, [
        {"name": "remote", "type": "openai", "model": "m", "endpoint": "http://localhost:9/v1"},
    ])
    assert main(["serve-replay", "--config", str(config)]) == 2
    assert capsys.readouterr().err == f"error: {config}: no experts of type 'replay' to serve\n"
