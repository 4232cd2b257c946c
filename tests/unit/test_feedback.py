"""Feedback end to end: the store, the service's routes, the SDK, and folding verdicts into the next gate."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from experts.errors import ExpertUnavailable
from experts.types import StreamDelta
from router.cli import _parser, main
from router.config import load_config, parse_config
from router.feedback import (
    FeedbackBody,
    FeedbackStore,
    FeedbackUnavailable,
    SqliteFeedbackStore,
    UnknownFeedbackExpert,
    UnknownRequest,
    feedback_path,
    feedback_problems,
    load_feedback,
    open_feedback_store,
)
from router.orchestrator import Orchestrator
from router.outcome import OutcomeRecord
from router.requests import parse_chat
from router.sdk import AsyncClient, LocalRouter, RouterAPIError
from router.security import hash_key
from router.service import create_app
from router.train import TrainingData, collect_training_data, fold_feedback, train_from_config
from tests.doubles.fakes import FakeClock, FakeExpert, FakeGate, FakeHashingEncoder, fake_config
from tests.support import serving

NAMES = ["math", "code"]
ALICE, ADMIN = "sk-alice-feedback-01", "sk-admin-feedback-02"
SECURITY = {"api_keys": [{"name": "alice", "sha256": hash_key(ALICE)}], "admin_key_env": "MOE_ADMIN_KEY"}


def orchestrator(**overrides: object) -> Orchestrator:
    config = fake_config(NAMES, **overrides)
    experts = {n: FakeExpert(config.expert(n), pieces=[f"{n} ", "says hi"], text=f"{n} says hi") for n in NAMES}
    return Orchestrator(config, FakeGate(NAMES, {"integral": [0.9, 0.1]}, default=[0.2, 0.8]), experts)


def make_app(store: FeedbackStore | None) -> FastAPI:
    return create_app(orchestrator(security=SECURITY), environ={"MOE_ADMIN_KEY": ADMIN}, feedback=store)


def http(app: FastAPI, key: str | None = ALICE) -> httpx.AsyncClient:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router", headers=headers)


def sdk(app: FastAPI) -> AsyncClient:
    return AsyncClient("http://router", api_key=ALICE, transport=httpx.ASGITransport(app=app))




# -- the service and the SDK ------------------------------------------------------------------------------
async def test_chat_then_feedback_by_id_then_admin_export(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="router.requests")
    app = make_app(SqliteFeedbackStore(tmp_path / "fb.sqlite3"))
    async with sdk(app) as client:
        answer = await client.chat("an integral")
        assert answer.id.startswith("chatcmpl-") and answer.expert == "math"
        good = await client.feedback(request_id=answer.id, good=True, note="right")
        bad = await client.feedback(query="sort a list", expert="code", score=0.0)
    # the answer's log line and the verdict's name the same answer id, so one finds the other
    chat, rated, unrated = (json.loads(r.getMessage()) for r in caplog.records if r.name == "router.requests")
    assert (chat["completion_id"], rated["rated_id"], "rated_id" in unrated) == (answer.id, answer.id, False)
    assert (good.query, good.expert, good.score, good.request_id, good.note) == \
        ("an integral", "math", 1.0, answer.id, "right")
    assert (bad.query, bad.expert, bad.score, bad.request_id) == ("sort a list", "code", 0.0, None)

    async with http(app, None) as anonymous, http(app) as client_key, http(app, ADMIN) as admin:
        assert (await anonymous.get("/admin/feedback")).status_code == 401
        assert (await client_key.get("/admin/feedback")).status_code == 403
        listed = (await admin.get("/admin/feedback")).json()["data"]
        lines = await admin.get("/admin/feedback", params={"format": "jsonl"})
        later = (await admin.get("/admin/feedback", params={"since": good.created + 3600})).json()["data"]
        iso = (await admin.get("/admin/feedback", params={"since": "2000-01-01T00:00:00"})).json()["data"]
        bad_since = await admin.get("/admin/feedback", params={"since": "yesterday"})
        bad_format = await admin.get("/admin/feedback", params={"format": "xml"})
    assert [(r["query"], r["expert"], r["score"]) for r in listed] == [("an integral", "math", 1.0),
                                                                      ("sort a list", "code", 0.0)]
    assert lines.headers["content-type"].startswith("application/x-ndjson")
    assert [json.loads(line)["id"] for line in lines.text.splitlines()] == [good.id, bad.id]
    assert later == [] and len(iso) == 2
    assert bad_format.status_code == 400 and bad_format.json()["error"]["param"] == "format"
    assert "'xml' is not one of 'json' (the default) or 'jsonl'" in bad_format.json()["error"]["message"]
    assert (bad_since.status_code, bad_since.json()["error"]["param"]) == (400, "since")


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_only_the_key_that_was_given_an_answer_can_rate_it_by_its_id(tmp_path: Path, stream: bool) -> None:
    """Any key could rate another key's answer by its id, overwrite that client's verdict (the latest counts), and
    read its query back in the verdict. Another key's answer is now as unknown as an id never given."""
    bob = "sk-bob-feedback-03"
    security = {**SECURITY, "api_keys": [*SECURITY["api_keys"], {"name": "bob", "sha256": hash_key(bob)}]}
    app = create_app(orchestrator(security=security), environ={"MOE_ADMIN_KEY": ADMIN},
                     feedback=SqliteFeedbackStore(tmp_path / "fb.sqlite3"))
    async with http(app) as alice, http(app, bob) as bobs:
        asked = {"messages": [{"role": "user", "content": "an integral: my diagnosis is X"}], "stream": stream}
        answer = await alice.post("/v1/chat/completions", json=asked)
        answer_id = (answer.json()["id"] if not stream
                     else json.loads(answer.text.split("data: ", 2)[1].split("\n")[0])["id"])
        stolen = await bobs.post("/v1/feedback", json={"request_id": answer_id, "good": False, "note": "by bob"})
        unknown = await bobs.post("/v1/feedback", json={"request_id": "chatcmpl-never", "good": False})
        own = await alice.post("/v1/feedback", json={"request_id": answer_id, "good": True})
    assert stolen.status_code == 404 and "diagnosis" not in stolen.text
    # Told apart from an unknown id by nothing: the same status, code and wording.
    assert stolen.json()["error"]["code"] == unknown.json()["error"]["code"]
    assert stolen.json()["error"]["message"].replace(answer_id, "ID") == \
        unknown.json()["error"]["message"].replace("chatcmpl-never", "ID")
    assert own.status_code == 200 and own.json()["query"] == "an integral: my diagnosis is X"


async def test_a_revoked_keys_answers_do_not_pass_to_the_key_that_takes_its_name(tmp_path: Path) -> None:
    """api_keys_env names keys by place (env-1, env-2). Revoking the first renamed the second env-1, which then
    owned the revoked key's answers: it could rate them by id and read their queries back. An answer is now tied
    to the key's own digest (salted with the answer's id), not to its name."""
    first, second = "sk-first-tenant-0001", "sk-second-tenant-0002"
    store = SqliteFeedbackStore(tmp_path / "fb.sqlite3")
    security = {"api_keys_env": "MOE_TEST_KEYS", "admin_key_env": "MOE_ADMIN_KEY"}

    def app(keys: str) -> FastAPI:
        return create_app(orchestrator(security=security), environ={"MOE_ADMIN_KEY": ADMIN, "MOE_TEST_KEYS": keys},
                          feedback=store)

    async with http(app(f"{first},{second}"), first) as before:
        answered = (await before.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "an integral: first tenant's secret"}]})).json()["id"]
    rotated = app(second)  # the first key revoked: the second is env-1 now, as the first was
    async with http(rotated, second) as second_key:
        taken = await second_key.post("/v1/feedback", json={"request_id": answered, "good": False})
    assert taken.status_code == 404 and "secret" not in taken.text
    async with http(app(f"{first},{second}"), first) as again:  # the key itself still may
        assert (await again.post("/v1/feedback", json={"request_id": answered, "good": True})).status_code == 200
    raw = (tmp_path / "fb.sqlite3").read_bytes()
    assert hash_key(first).encode() not in raw and b"env-1" not in raw  # neither digest nor name is kept


def test_a_store_file_from_before_answers_kept_their_key_is_upgraded(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:  # the schema answers were remembered in before
        db.executescript("CREATE TABLE requests (id TEXT PRIMARY KEY, query TEXT NOT NULL, expert TEXT NOT NULL, "
                         "created REAL NOT NULL);")
        db.execute("INSERT INTO requests VALUES ('chatcmpl-old', 'an integral', 'math', ?)",
                   (datetime.now(UTC).timestamp(),))
    db.close()
    store = SqliteFeedbackStore(path)
    store.remember("chatcmpl-new", "sort a list", "code", "alice")
    assert store.answered("chatcmpl-old") is not None and store.answered("chatcmpl-old").key is None  # type: ignore[union-attr]
    assert store.answered("chatcmpl-new").key == "alice"  # type: ignore[union-attr]
    with pytest.raises(UnknownRequest):
        store.submit(FeedbackBody(request_id="chatcmpl-new", good=True), NAMES, "bob")
    assert store.submit(FeedbackBody(request_id="chatcmpl-new", good=True), NAMES, "alice").expert == "code"
    store.close()


async def test_a_streamed_answer_can_be_rated_by_its_id(tmp_path: Path) -> None:
    app = make_app(SqliteFeedbackStore(tmp_path / "fb.sqlite3"))
    async with sdk(app) as client:
        chunks = [c async for c in client.stream("an integral")]
        async with http(app) as raw, raw.stream("POST", "/v1/chat/completions", json={
                "model": "auto", "stream": True, "messages": [{"role": "user", "content": "an integral"}]}) as r:
            events = [line async for line in r.aiter_lines() if line.startswith("data: {")]
        first = json.loads(events[0][6:])
        saved = await client.feedback(request_id=first["id"], good=False)
    assert chunks[-1].trace is not None
    assert (saved.query, saved.expert, saved.score) == ("an integral", "math", 0.0)


@pytest.mark.parametrize(
    ("body", "status", "code", "says"),
    [
        ({"query": "q", "expert": "poetry", "good": True}, 400, "unknown_expert", "'poetry'"),
        ({"request_id": "chatcmpl-never", "good": True}, 404, "request_not_found", "chatcmpl-never"),
        ({"query": "q", "good": True}, 400, "invalid_request", "needs the expert"),
        ({"query": "q", "expert": "math"}, 400, "invalid_request", "good or score"),
        ({"query": "q", "expert": "math", "good": True, "score": 1.0}, 400, "invalid_request", "good or score"),
        ({"query": "q", "expert": "math", "score": 1.5}, 400, "invalid_request", "score"),
        ({"query": "q", "expert": "math", "good": "yes"}, 400, "invalid_request", "good"),
        ({"query": "q", "request_id": "x", "expert": "math", "good": True}, 400, "invalid_request", "exactly one"),
        ({"query": "q", "expert": "math", "good": True, "stars": 5}, 400, "invalid_request", "stars"),
        ([1, 2], 400, "invalid_request", "JSON object"),
        ({"query": "   ", "expert": "math", "good": True}, 400, "invalid_request", "query: must not be blank"),
        ({"query": "\n\t", "expert": "math", "score": 0.5}, 400, "invalid_request", "query: must not be blank"),
        ({"query": "\u200b\ufeff", "expert": "math", "good": True}, 400, "invalid_request", "query: must not be blank"),
        # longer than any prompt the service takes (service.max_prompt_chars, 100,000 by default)
        ({"query": "x" * 100_001, "expert": "math", "good": True}, 400, "context_length_exceeded",
         "query: 100001 characters, over the limit of 100000"),
    ],
)
async def test_bad_feedback_is_refused_clearly(tmp_path: Path, body: Any, status: int, code: str, says: str) -> None:
    async with http(make_app(SqliteFeedbackStore(tmp_path / "fb.sqlite3"))) as client:
        r = await client.post("/v1/feedback", json=body)
    assert r.status_code == status
    assert r.json()["error"]["code"] == code
    assert says in r.json()["error"]["message"]
    store = SqliteFeedbackStore(tmp_path / "fb.sqlite3")
    assert store.records() == []  # nothing refused was stored
    store.close()


async def test_without_a_store_feedback_is_409_and_the_sdk_raises(tmp_path: Path) -> None:
    async with sdk(make_app(None)) as client:
        with pytest.raises(RouterAPIError) as info:
            await client.feedback(query="q", expert="math", good=True)
    assert (info.value.status, info.value.code) == (409, "feedback_unavailable")


async def test_local_router_writes_to_the_store(tmp_path: Path) -> None:
    async with LocalRouter(orchestrator(), SqliteFeedbackStore(tmp_path / "fb.sqlite3")) as local:
        answer = await local.chat("an integral")
        saved = await local.feedback(request_id=answer.id, expert="code", score=0.25)
        refused = {}
        for name, fields in {"unknown answer": {"request_id": "chatcmpl-nope", "good": True},
                             "unknown expert": {"query": "q", "expert": "chef", "good": True},
                             "no verdict": {"request_id": answer.id},
                             "too long": {"query": "x" * 100_001, "expert": "math", "good": True}}.items():
            with pytest.raises(RouterAPIError) as info:
                await local.feedback(**fields)  # type: ignore[arg-type]
            refused[name] = (info.value.status, info.value.code, info.value.body["error"]["param"])
    assert (saved.query, saved.expert, saved.score) == ("an integral", "code", 0.25)
    # the errors Client raises from the service's answers
    assert refused == {"unknown answer": (404, "request_not_found", "request_id"),
                       "unknown expert": (400, "unknown_expert", "expert"),
                       "no verdict": (400, "invalid_request", None),
                       "too long": (400, "context_length_exceeded", "query")}
    async with LocalRouter(orchestrator()) as storeless:
        with pytest.raises(RouterAPIError) as off:
            await storeless.feedback(query="q", expert="math", good=True)
        with pytest.raises(RouterAPIError) as bad_first:  # the verdict is checked first, as the service does
            await storeless.feedback(query="q", expert="math")
    assert (off.value.status, off.value.code) == (409, "feedback_unavailable")
    assert bad_first.value.status == 400


# -- the store ----------------------------------------------------------------------------------------------
def test_a_new_store_on_the_same_path_sees_earlier_feedback(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "fb.sqlite3"
    first = SqliteFeedbackStore(path)
    first.remember("chatcmpl-1", "an integral", "math")
    first.submit(FeedbackBody(request_id="chatcmpl-1", good=True), NAMES)
    first.close()
    second = SqliteFeedbackStore(path)
    try:
        assert [(r.request_id, r.query, r.expert, r.score) for r in second.records()] == \
            [("chatcmpl-1", "an integral", "math", 1.0)]
        answered = second.answered("chatcmpl-1")
        assert answered is not None and answered.expert == "math"
        assert second._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        second.close()


def test_an_answer_older_than_the_retention_cannot_be_rated_by_id(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import router.feedback as feedback

    clock = [1_000_000.0]
    monkeypatch.setattr(feedback.time, "time", lambda: clock[0])
    store = SqliteFeedbackStore(tmp_path / "fb.sqlite3", retention_s=60)
    try:
        store.remember("chatcmpl-old", "an integral", "math")
        clock[0] += 60
        assert store.answered("chatcmpl-old") is not None  # at the retention: still known
        clock[0] += 1  # past it, though no pruning has run (it runs every thousand answers)
        assert store.answered("chatcmpl-old") is None
        with pytest.raises(UnknownRequest):
            store.submit(FeedbackBody(request_id="chatcmpl-old", good=True), NAMES)
    finally:
        store.close()


def test_the_default_path_is_next_to_the_gate_artifact(tmp_path: Path) -> None:
    config = parse_config({"version": 1, "experts": [{"name": "a", "type": "openai", "model": "m",
                                                      "endpoint": "http://127.0.0.1:9/v1"}],
                           "gate": {"artifact": "artifacts/gate"}}, base_dir=tmp_path, check_env=False)
    assert feedback_path(config) == tmp_path / "artifacts" / "feedback.sqlite3"
    assert load_feedback(config) == []  # no file yet, and none is created by reading
    assert not feedback_path(config).exists()


# -- folding feedback into training -------------------------------------------------------------------------
def _verdicts(tmp_path: Path, rows: list[tuple[str, str, float]]) -> list[Any]:
    store = SqliteFeedbackStore(tmp_path / "rules.sqlite3")
    out = [store.add(q, e, s) for q, e, s in rows]
    store.close()
    return out


def test_fold_rule_for_label_and_outcome_gates(tmp_path: Path) -> None:
    verdicts = _verdicts(tmp_path, [("q1", "math", 1.0), ("q1", "code", 0.0), ("q2", "code", 1.0),
                                    ("q2", "code", 0.0), ("q3", "gone", 1.0)])
    label = fold_feedback(TrainingData("label", texts=["ex"], labels=["math"]), verdicts, NAMES)
    assert list(zip(label.texts, label.labels, strict=True)) == [("ex", "math"), ("q1", "math"), ("q2", "code")]
    assert label.feedback == 4 and label.dropped == 0
    assert label.pinned == {"q1", "q2"}  # the gate never holds a user's good verdict out of training
    outcome = fold_feedback(TrainingData("outcome", records=[OutcomeRecord("r", {"math": 1.0}, {})]), verdicts,
                            NAMES)
    assert outcome.records[1:] == [OutcomeRecord("q1", {"math": 1.0, "code": 0.0}, {}),
                                   OutcomeRecord("q2", {"code": 0.5}, {})]
    assert outcome.feedback == 4
    # A verdict on a query the files name a task for carries the task, so it counts toward that task's rates.
    tasked = fold_feedback(TrainingData("outcome", records=[OutcomeRecord("q1", {"math": 1.0}, {}, task="algebra")]),
                           verdicts, NAMES)
    assert [r.task for r in tasked.records] == ["algebra", "algebra", None]
    # A verdict is priced as the records price its expert: on that query, else at the expert's mean cost. One
    # without a cost made the trained gate's routed cost unknown.
    priced = fold_feedback(TrainingData("outcome", records=[
        OutcomeRecord("q1", {"math": 1.0, "code": 0.0}, {"math": 0.2, "code": 0.01}),
        OutcomeRecord("r", {"math": 1.0, "code": 1.0}, {"math": 0.4, "code": 0.03})]), verdicts, NAMES)
    assert priced.records[2:] == [OutcomeRecord("q1", {"math": 1.0, "code": 0.0}, {"math": 0.2, "code": 0.01}),
                                  OutcomeRecord("q2", {"code": 0.5}, {"code": pytest.approx(0.02)})]


def test_verdicts_on_a_cold_start_expert_wait_until_they_cover_enough_queries(tmp_path: Path) -> None:
    """An expert the outcome records never score but the config gives examples is routed from them; a few good
    verdicts must not turn it into a trained expert that the pooled rate drags below the measured ones, so they
    wait (and are reported) until they cover COLD_START_RECORDS queries."""
    from router.train import COLD_START_RECORDS

    data = TrainingData("outcome", records=[OutcomeRecord("r", {"math": 1.0, "code": 0.0}, {})])
    few = _verdicts(tmp_path, [("q1", "newbie", 1.0), ("q2", "newbie", 1.0), ("q1", "math", 0.0)])
    experts = [*NAMES, "newbie"]
    folded = fold_feedback(data, few, experts, cold_start=["newbie"])
    assert folded.records[1:] == [OutcomeRecord("q1", {"math": 0.0}, {})]  # newbie's outcomes wait
    assert folded.waiting == {"newbie": 2} and folded.feedback == 3
    # Without examples there is no cold start to keep: the verdicts train it, as before.
    assert fold_feedback(data, few, experts).records[1:] == [OutcomeRecord("q1", {"newbie": 1.0, "math": 0.0}, {}),
                                                             OutcomeRecord("q2", {"newbie": 1.0}, {})]
    many = _verdicts(tmp_path / "many", [(f"q{i}", "newbie", 1.0) for i in range(COLD_START_RECORDS)])
    enough = fold_feedback(data, many, experts, cold_start=["newbie"])
    assert enough.waiting == {} and len(enough.records) == 1 + COLD_START_RECORDS
    # An expert the files already score is trained whatever its examples.
    scored = fold_feedback(data, few, experts, cold_start=["math", "newbie"])
    assert OutcomeRecord("q1", {"math": 0.0}, {}) in scored.records and scored.waiting == {"newbie": 2}


def test_bad_feedback_drops_that_pairing_from_the_training_files_but_not_from_the_config(tmp_path: Path) -> None:
    data = TrainingData("label", texts=["cfg q", "q1", "q1", "q4", "q5"], labels=["code", "code", "math", "math",
                                                                                   "code"], config_examples=1)
    verdicts = _verdicts(tmp_path, [("q1", "code", 0.0), ("cfg q", "code", 0.0), ("q5", "code", 0.0),
                                    ("q5", "code", 1.0), ("q4", "code", 0.0), ("q4", "math", 1.0)])
    folded = fold_feedback(data, verdicts, NAMES)
    # q1/code dropped (bad), q1/math kept (no verdict), the config's example kept, q5/code kept (0.5 on average),
    # q4/math kept and added once more (good), q5/code added (0.5 counts as good)
    assert list(zip(folded.texts, folded.labels, strict=True)) == [
        ("cfg q", "code"), ("q1", "math"), ("q4", "math"), ("q5", "code"), ("q5", "code"), ("q4", "math")]
    assert (folded.dropped, folded.feedback, folded.config_examples) == (1, 6, 1)


async def test_feedback_from_the_service_trains_the_next_gate(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    experts = [{"name": n, "type": "openai", "endpoint": "http://127.0.0.1:9/v1", "model": "m",
                "examples": [f"an example for {n}"]} for n in NAMES]
    config = parse_config({"version": 1, "experts": experts, "gate": {"artifact": "out/gate"}},
                          base_dir=tmp_path, check_env=False)
    app = create_app(orchestrator(), feedback=SqliteFeedbackStore(feedback_path(config)))
    async with AsyncClient("http://router", transport=httpx.ASGITransport(app=app)) as client:
        for query in ("solve this integral", "an integral of x squared", "what is the integral of sin"):
            answer = await client.chat(query)
            await client.feedback(request_id=answer.id, good=True)
        await client.feedback(query="write a python function", expert="code", good=True)
        await client.feedback(query="write a python loop", expert="math", good=False)
    await app.state.feedback.aclose()

    data = collect_training_data(config)
    assert data.feedback == 5
    assert ("an integral of x squared", "math") in zip(data.texts, data.labels, strict=True)
    assert "write a python loop" not in data.texts
    assert collect_training_data(config, feedback=False).texts == ["an example for math", "an example for code"]

    monkeypatch.setattr("router.train.build_encoder", lambda _: FakeHashingEncoder())
    gate = train_from_config(config, progress=False)
    assert gate.metadata.metrics.n_train + gate.metadata.metrics.n_val == 6
    # the artifact says which verdicts the gate has seen: how many, and the newest one's time
    store = SqliteFeedbackStore(feedback_path(config))
    newest = max(r.created for r in store.records())
    store.close()
    saved = json.loads((tmp_path / "out" / "gate" / "gate.json").read_text(encoding="utf-8"))
    assert (saved["feedback_verdicts"], saved["feedback_through"]) == \
        (5, datetime.fromtimestamp(newest, UTC).isoformat(timespec="seconds"))
    off = train_from_config(config, progress=False, feedback=False)
    assert off.metadata.metrics.n_train + off.metadata.metrics.n_val == 2
    assert (off.metadata.feedback_verdicts, off.metadata.feedback_through) == (0, None)


async def test_a_query_only_feedback_gave_is_never_shown_to_clients_as_a_nearest_example(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Feedback folds a client's query into the next gate's examples, and every decision shows its nearest
    examples to whichever client asked: one client's private question reached the others. The gate still trains
    on it, and the explanation keeps its label and similarity; the text of an example only feedback gave is
    withheld (the config's examples and training files, the operator's own, are shown as before)."""
    from router.gate import Gate

    experts = [{"name": n, "type": "openai", "endpoint": "http://127.0.0.1:9/v1", "model": "m",
                "examples": [f"an example for {n}"]} for n in NAMES]
    config = parse_config({"version": 1, "experts": experts, "gate": {"artifact": "out/gate"}},
                          base_dir=tmp_path, check_env=False)
    store = SqliteFeedbackStore(feedback_path(config))
    secret = "integral for Jane Roe, account 4111-1111-1111-1111"
    store.add(secret, "math", 1.0)
    store.add("an example for code", "code", 1.0)  # a config example rated: the operator's text, still shown
    store.close()
    assert collect_training_data(config).private == frozenset({secret})
    monkeypatch.setattr("router.train.build_encoder", lambda _: FakeHashingEncoder())
    train_from_config(config, progress=False)
    gate = Gate.load(tmp_path / "out" / "gate", FakeHashingEncoder())  # as served: read back from the artifact
    assert gate.private_texts == frozenset({secret})
    served = Orchestrator(config, gate, {n: FakeExpert(config.expert(n)) for n in NAMES})
    try:
        decision = await served.decide(parse_chat({"messages": [{"role": "user", "content": secret}]}, 10_000))
    finally:
        await served.aclose()
    nearest = decision.nearest
    assert "4111" not in json.dumps(decision.model_dump())
    assert nearest[0]["text"] is None and nearest[0]["source"] == "feedback" and nearest[0]["label"] == "math"
    assert nearest[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert {n["text"] for n in nearest[1:]} <= {"an example for math", "an example for code"}


def test_fold_marks_only_queries_no_operator_data_holds(tmp_path: Path) -> None:
    verdicts = _verdicts(tmp_path, [("recorded query", "math", 1.0), ("new query", "code", 0.0)])
    outcome = TrainingData("outcome", records=[OutcomeRecord("recorded query", {"math": 1.0, "code": 0.0}, {})])
    assert fold_feedback(outcome, verdicts, NAMES).private == frozenset({"new query"})
    label = TrainingData("label", texts=["recorded query"], labels=["math"], config_examples=1)
    assert fold_feedback(label, verdicts, NAMES).private == frozenset({"new query"})


def test_moe_train_takes_a_feedback_switch() -> None:
    assert _parser().parse_args(["train"]).feedback is True
    assert _parser().parse_args(["train", "--no-feedback"]).feedback is False


def test_a_store_that_cannot_be_opened_names_the_file_and_the_way_out(tmp_path: Path) -> None:
    folder = tmp_path / "feedback.sqlite3"
    folder.mkdir()  # a folder where the file goes: sqlite says only "unable to open database file"
    with pytest.raises(OSError, match=r"feedback store .*feedback\.sqlite3: cannot open it as SQLite .*unable to "
                                      r"open database file.*feedback\.enabled: false"):
        SqliteFeedbackStore(folder)
    garbage = tmp_path / "notes.sqlite3"
    garbage.write_bytes(b"not a database, but a file someone pointed feedback.path at" * 100)
    with pytest.raises(OSError, match=r"notes\.sqlite3: cannot open it as SQLite \(file is not a database\)"):
        SqliteFeedbackStore(garbage)



async def test_a_damaged_store_is_refused_by_the_service_and_config_check_and_named_to_its_readers(
        tmp_path: Path) -> None:
    """One damaged page: the service opened the file and took verdicts that neither the export (a 500) nor
    ``moe train`` (a bare sqlite3 traceback) could read back, and ``moe config check`` said OK."""
    config = parse_config({"version": 1, "experts": [{"name": n, "type": "openai", "endpoint": "http://127.0.0.1:9/v1",
                                                       "model": "m", "examples": [f"about {n}"]} for n in NAMES],
                           "feedback": {"path": "fb.sqlite3"}}, base_dir=tmp_path, check_env=False)
    path = feedback_path(config)
    store = SqliteFeedbackStore(path)
    for i in range(3000):
        store.add(f"question number {i} about some long topic", "math", 1.0, note="x" * 40)
    store.close()
    pages = path.stat().st_size // 4096
    assert pages > 20
    with path.open("r+b") as fh:  # a page in the middle of the verdicts' table
        fh.seek(pages // 2 * 4096)
        fh.write(bytes(range(256)) * 16)
    [(key, problem)] = feedback_problems(config)
    assert key == "feedback.path" and problem.startswith(f"{path}: cannot open it as SQLite (") and (
        "malformed" in problem or "damaged" in problem), problem
    with pytest.raises(OSError, match=r"feedback\.path \(.*fb\.sqlite3\): cannot open it as SQLite \(.*"
                                      r"(malformed|damaged)"):
        open_feedback_store(config)
    # moe train's reader: the file, sqlite's words and the way out
    with pytest.raises(FeedbackUnavailable, match=r"feedback\.path \(.*fb\.sqlite3\): cannot read the verdicts "
                                                  r"\(DatabaseError: .*malformed.*\); .*train with --no-feedback "
                                                  r"meanwhile"):
        load_feedback(config)
    reader = open_feedback_store(config, write=False)
    assert reader is not None
    async with http(make_app(reader), key=ADMIN) as admin:  # the export, damaged while serving: 503, not a 500
        exported = await admin.get("/admin/feedback")
    assert exported.status_code == 503, exported.text
    # clients (the export's admin, or a client rating by id) read no path: the log has it
    message = exported.json()["error"]["message"]
    assert message == ("the feedback store cannot be read while reading the verdicts (DatabaseError); the service "
                       "log has the details") and str(tmp_path) not in message
    reader.close()


def test_blank_queries_already_stored_are_not_trained_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Verdicts stored before blank queries were refused stay in the store, but training leaves them out."""
    experts = [{"name": n, "type": "openai", "endpoint": "http://127.0.0.1:9/v1", "model": "m",
                "examples": [f"an example for {n}"]} for n in NAMES]
    config = parse_config({"version": 1, "experts": experts, "feedback": {"path": "fb.sqlite3"}},
                          base_dir=tmp_path, check_env=False)
    store = SqliteFeedbackStore(feedback_path(config))
    for query in ("   ", "", "an integral"):
        store.add(query, "math", 1.0)
    store.close()

    assert [r.query for r in load_feedback(config)] == ["an integral"]
    assert "left 2 feedback verdict(s) with a blank query out of training" in caplog.text
    data = collect_training_data(config)
    assert data.texts == ["an example for math", "an example for code", "an integral"] and data.feedback == 1
    store = SqliteFeedbackStore(feedback_path(config))
    assert [r.query for r in store.records()] == ["   ", "", "an integral"]  # nothing is lost
    store.close()


def test_a_feedback_path_whose_folder_cannot_be_made_names_feedback_path(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "taken").write_text("a file where the folder would go")
    config = tmp_path / "router.yaml"
    config.write_text("version: 1\nfeedback:\n  path: taken/fb.sqlite3\ngate:\n  artifact: gate\nexperts:\n"
                      "  - {name: coder, type: vllm, endpoint: 'http://127.0.0.1:9/v1', model: m, "
                      "description: code, examples: ['write a python function']}\n"
                      "  - {name: lawyer, type: vllm, endpoint: 'http://127.0.0.1:9/v1', model: m, "
                      "description: legal questions, examples: ['can I break my lease']}\n")
    says = (f"feedback.path ({tmp_path / 'taken' / 'fb.sqlite3'}): cannot create the directory {tmp_path / 'taken'} "
            "for the feedback database (")
    with pytest.raises(OSError) as info:
        open_feedback_store(load_config(config, check_env=False))
    assert str(info.value).startswith(says) and "feedback.enabled: false" in str(info.value)

    assert main(["train", "--config", str(config), "--no-feedback"]) == 0
    capsys.readouterr()
    # `moe ask` in process answers as the service would, remembering answers for rating: the store opens as
    # `moe serve` opens it, before any expert is called. (`moe route` records nothing and opens none.)
    assert main(["ask", "hi", "--config", str(config)]) == 1
    assert capsys.readouterr().err.startswith(f"error: {says}")


def test_a_verdict_on_an_answer_whose_expert_was_removed_since_is_kept(tmp_path: Path) -> None:
    """A reload removed the expert that answered: rating that answer still works (nothing is lost), while naming
    an unknown expert outright is still refused."""
    store = SqliteFeedbackStore(tmp_path / "fb.sqlite3")
    try:
        store.remember("chatcmpl-1", "an old question", "retired")
        kept = store.submit(FeedbackBody(request_id="chatcmpl-1", good=False), NAMES)
        assert (kept.expert, kept.score) == ("retired", 0.0)
        with pytest.raises(UnknownFeedbackExpert):
            store.submit(FeedbackBody(request_id="chatcmpl-1", expert="poetry", good=True), NAMES)
        with pytest.raises(UnknownFeedbackExpert):
            store.submit(FeedbackBody(query="q", expert="retired", good=True), NAMES)
        # training leaves it out while the expert is not configured
        data = fold_feedback(TrainingData("label", texts=["x"], labels=["math"]), store.records(), NAMES)
        assert data.feedback == 0
    finally:
        store.close()


# -- a store that cannot be written, retention on disk, repeated verdicts ------------------------------------
def _read_only_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite connections opened read-only, as for a file another user owns or a read-only mount (the tests run
    as root, whom file modes do not stop)."""
    import sqlite3

    import router.feedback as feedback

    real = sqlite3.connect

    def read_only(path: object, **kwargs: Any) -> sqlite3.Connection:
        return real(f"file:{path}?mode=ro", uri=True, **kwargs)

    monkeypatch.setattr(feedback.sqlite3, "connect", read_only)


def test_a_store_file_the_router_cannot_write_is_refused_at_start_but_can_be_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "fb.sqlite3"
    store = SqliteFeedbackStore(path)
    store.add("an integral", "math", 1.0)
    store.close()
    _read_only_connections(monkeypatch)
    with pytest.raises(OSError, match=r"fb\.sqlite3: cannot open it as SQLite \(attempt to write a readonly "
                                      r"database\); its folder and the file must be writable"):
        SqliteFeedbackStore(path)
    reader = SqliteFeedbackStore(path, write=False)  # moe train only reads the verdicts
    assert [(r.query, r.expert) for r in reader.records()] == [("an integral", "math")]
    reader.close()


async def test_a_store_that_fails_while_serving_costs_only_rating_by_id(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The file turns read-only (or stays locked) after the start: answers are still served, plain and streamed,
    with one warning; a verdict is a 503 feedback_unavailable, not a 500; once writable again, all is as before."""
    import sqlite3

    path = tmp_path / "fb.sqlite3"
    clock = FakeClock()
    store = SqliteFeedbackStore(path, clock=clock)
    writable = store._db
    store._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False, isolation_level=None)
    app = make_app(store)
    chat = {"model": "auto", "messages": [{"role": "user", "content": "an integral"}]}
    async with http(app) as client:
        plain = await client.post("/v1/chat/completions", json=chat)
        streamed = await client.post("/v1/chat/completions", json={**chat, "stream": True})
        by_id = await client.post("/v1/feedback", json={"request_id": plain.json()["id"], "good": True})
        by_query = await client.post("/v1/feedback", json={"query": "q", "expert": "math", "good": True})
        store._db.close()
        store._db = writable
        clock.now += 5.0  # answers are not recorded for 5 s after a failed write, but one
        again = await client.post("/v1/chat/completions", json=chat)
        rated = await client.post("/v1/feedback", json={"request_id": again.json()["id"], "good": True})
    assert plain.status_code == 200 and plain.json()["choices"][0]["message"]["content"] == "math says hi"
    assert streamed.status_code == 200 and '"content": "says hi"' in streamed.text and "data: [DONE]" in streamed.text
    assert by_id.status_code == 404  # the answer could not be recorded, so its id is unknown
    assert (by_query.status_code, by_query.json()["error"]["code"]) == (503, "feedback_unavailable")
    assert "was not stored" in by_query.json()["error"]["message"]
    warnings = [r.getMessage() for r in caplog.records if r.name == "router.feedback"]
    assert sum("cannot record answers" in w for w in warnings) == 1  # once, not per answer
    assert any("recording answers again" in w for w in warnings)
    assert (again.status_code, rated.status_code) == (200, 200)
    store.close()


async def test_a_locked_store_holds_no_answer_up(tmp_path: Path) -> None:
    """Another writer holds the file's lock: each answer waited out the 5 s busy timeout, one after another on the
    store's lock (16 answers took 5 to 80 s). Now one answer tries, for a quarter of a second, and the rest of the
    next 5 s are not recorded at all; after that one tries again, and once the lock is gone, all is as before."""
    import sqlite3

    path = tmp_path / "fb.sqlite3"
    clock = FakeClock()
    store = SqliteFeedbackStore(path, clock=clock)
    writes: list[str] = []
    store._db.set_trace_callback(lambda sql: writes.append(sql) if sql.startswith("INSERT") else None)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    app = make_app(store)
    chat = {"model": "auto", "messages": [{"role": "user", "content": "an integral"}]}
    async with http(app) as client:
        answers = await asyncio.gather(*(client.post("/v1/chat/completions", json=chat) for _ in range(8)))
        assert [a.status_code for a in answers] == [200] * 8
        assert len(writes) == 1  # one try, at most 250 ms; the other seven answers were not held at all
        clock.now += 5.0
        await client.post("/v1/chat/completions", json=chat)
        assert len(writes) == 2  # tried again, and locked still
        holder.execute("ROLLBACK")
        clock.now += 5.0
        again = await client.post("/v1/chat/completions", json=chat)
        rated = await client.post("/v1/feedback", json={"request_id": again.json()["id"], "good": True})
    assert rated.status_code == 200
    holder.close()
    store.close()


async def test_an_answer_is_not_recorded_behind_a_verdict_waiting_on_a_busy_file(tmp_path: Path) -> None:
    """A verdict waits out the file's busy timeout (5 s) while another writer holds it; answers, recorded on a
    thread of their own, do not queue behind it (each waited for every verdict before it: 15 s behind three)."""
    import sqlite3

    path = tmp_path / "fb.sqlite3"
    store = SqliteFeedbackStore(path, clock=FakeClock())
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    verdict = asyncio.create_task(store.asubmit(FeedbackBody(query="q", expert="math", good=True), NAMES))
    await asyncio.sleep(0.2)  # the verdict holds the store's lock, waiting on the file
    await store.aremember("chatcmpl-1", "an integral", "math")
    assert not verdict.done()  # the answer was not held until the verdict gave up
    with pytest.raises(FeedbackUnavailable):
        await verdict
    holder.execute("ROLLBACK")
    holder.close()
    await store.aclose()


def test_answers_past_their_retention_are_deleted_from_the_file(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """remember_s bounds how long a query stays on disk, not only how long it can be rated: rows past it go when
    the store opens and closes, and while answers come in at least every tenth of the retention."""
    import sqlite3

    import router.feedback as feedback

    clock = [1_000_000.0]
    monkeypatch.setattr(feedback.time, "time", lambda: clock[0])
    path = tmp_path / "fb.sqlite3"

    def stored() -> list[str]:
        with sqlite3.connect(path) as db:
            return [row[0] for row in db.execute("SELECT id FROM requests ORDER BY created")]

    store = SqliteFeedbackStore(path, retention_s=100)
    store.remember("chatcmpl-1", "my private question", "math")
    clock[0] += 50
    store.remember("chatcmpl-2", "another", "math")
    clock[0] += 60  # chatcmpl-1 is 110 s old
    store.remember("chatcmpl-3", "a third", "code")
    assert stored() == ["chatcmpl-2", "chatcmpl-3"]  # a quiet service: 3 answers, not a thousand
    store.close()
    clock[0] += 95  # chatcmpl-2 is 155 s old; chatcmpl-3 95 s
    SqliteFeedbackStore(path, retention_s=100).close()
    assert stored() == ["chatcmpl-3"]
    clock[0] += 10
    store = SqliteFeedbackStore(path, retention_s=1000)
    store.close()
    assert stored() == ["chatcmpl-3"]  # a longer retention keeps it


def test_a_verdict_resent_or_changed_counts_once_the_latest(tmp_path: Path) -> None:
    from router.feedback import latest_verdicts

    store = SqliteFeedbackStore(tmp_path / "fb.sqlite3")
    store.remember("chatcmpl-1", "an integral", "math")
    for good in (False, False, False, True):  # a client's retries, then it changed its mind
        store.submit(FeedbackBody(request_id="chatcmpl-1", good=good), NAMES)
    store.submit(FeedbackBody(request_id="chatcmpl-1", expert="code", good=False), NAMES)  # another expert
    for _ in range(2):  # verdicts on a query without an answer id are each their own
        store.add("sort a list", "code", 1.0)
    records = store.records()
    store.close()
    kept = latest_verdicts(records)
    assert [(r.request_id, r.expert, r.score) for r in kept] == [
        ("chatcmpl-1", "math", 1.0), ("chatcmpl-1", "code", 0.0), (None, "code", 1.0), (None, "code", 1.0)]
    assert len(records) == 7
    config = parse_config({"version": 1, "experts": [{"name": n, "type": "openai", "model": "m",
                                                      "endpoint": "http://127.0.0.1:9/v1"} for n in NAMES],
                           "feedback": {"path": "fb.sqlite3"}}, base_dir=tmp_path, check_env=False)
    assert load_feedback(config) == kept  # what moe train folds in


class _FirstPieceThenHangs(FakeExpert):
    """A test double: streams its first piece, then sends nothing more for a minute."""

    async def stream(self, request: Any) -> Any:
        self.requests.append(request)
        yield StreamDelta(content="the start of a bad answer")
        await asyncio.sleep(60)


@pytest.mark.parametrize(("math_pieces", "credited"), [
    (["a long first part of the answer, ", "most of it; "], "math"),  # math wrote most before it broke off
    (["one"], "code"),  # math sent one word: code wrote most of the answer
])
async def test_after_a_switch_a_verdict_credits_who_wrote_most_of_the_stream(
        tmp_path: Path, math_pieces: list[str], credited: str) -> None:
    config = fake_config(NAMES)
    experts = {"math": FakeExpert(config.expert("math"), pieces=[*math_pieces, "never sent"],
                                  fail=lambda n: ExpertUnavailable(n, "reset"), fail_after=len(math_pieces)),
               "code": FakeExpert(config.expert("code"), pieces=["and code finished it."])}
    store = SqliteFeedbackStore(tmp_path / "fb.sqlite3")
    app = create_app(Orchestrator(config, FakeGate(NAMES, {}, default=[0.9, 0.1]), experts), feedback=store)
    body = {"model": "auto", "stream": True, "messages": [{"role": "user", "content": "an integral"}]}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as client:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = [line async for line in r.aiter_lines() if line.startswith("data: {")]
        rated = await client.post("/v1/feedback", json={"request_id": json.loads(lines[0][6:])["id"], "good": False})
    store.close()
    assert r.headers["x-moe-expert"] == "math"
    assert [s["from"] for s in json.loads(lines[-1][6:])["moe"]["switches"]] == ["math"]
    assert (rated.status_code, rated.json()["expert"]) == (200, credited)


async def test_a_stream_can_be_rated_while_it_is_still_being_written(tmp_path: Path) -> None:
    """Over a real socket: a user who stops a bad answer early rates it by the id of its first chunk."""
    config = fake_config(NAMES)
    experts = {n: _FirstPieceThenHangs(config.expert(n)) for n in NAMES}
    store = SqliteFeedbackStore(tmp_path / "fb.sqlite3")
    app = create_app(Orchestrator(config, FakeGate(NAMES, {}, default=[0.9, 0.1]), experts), feedback=store)
    body = {"model": "auto", "stream": True, "messages": [{"role": "user", "content": "an integral"}]}
    async with (serving(app) as url, httpx.AsyncClient(base_url=url) as client,
                client.stream("POST", "/v1/chat/completions", json=body) as r):
        lines = r.aiter_lines()
        first = json.loads((await anext(line async for line in lines if line.startswith("data: {")))[6:])
        rated = await client.post("/v1/feedback", json={"request_id": first["id"], "good": False})
    store.close()
    assert (rated.status_code, rated.json()["expert"], rated.json()["query"]) == (200, "math", "an integral")


async def test_local_router_credits_and_remembers_streams_as_the_service_does(tmp_path: Path) -> None:
    config = fake_config(NAMES)
    experts = {"math": FakeExpert(config.expert("math"), pieces=["one", "never sent"],
                                  fail=lambda n: ExpertUnavailable(n, "reset"), fail_after=1),
               "code": FakeExpert(config.expert("code"), pieces=["and code finished it."])}
    store = SqliteFeedbackStore(tmp_path / "fb.sqlite3")
    async with LocalRouter(Orchestrator(config, FakeGate(NAMES, {}, default=[0.9, 0.1]), experts), store) as local:
        chunks = local.stream("an integral")
        first = await anext(chunks)
        early = store.answered(first.id)  # ratable from the first chunk on
        rest = [c async for c in chunks]
        late = store.answered(first.id)
    assert early is not None and early.expert == "math"
    assert rest[-1].trace is not None and [s["from"] for s in rest[-1].trace.switches] == ["math"]
    assert late is not None and late.expert == "code"  # code wrote most of it


def test_a_query_sqlite_cannot_store_is_not_recorded_and_fails_nothing(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Recording an answer never fails it: a query SQLite cannot store as text (a lone surrogate, which only an
    in-process caller could still hand over) is named in the store's warning and left unrecorded."""
    store = SqliteFeedbackStore(tmp_path / "fb.sqlite3")
    with caplog.at_level(logging.WARNING, logger="router.feedback"):
        store.remember("chatcmpl-1", "boil an egg \ud800", "math")
    assert any("cannot record answers (UnicodeEncodeError" in r.getMessage() for r in caplog.records)
    store.close()
