"""Feedback in a real Redis (``state.backend: redis``): every replica records into one store, a verdict can name
an answer another replica gave, ``moe train`` reads the same verdicts, and an outage loses nothing silently."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis

from router.config import FeedbackConfig, StateConfig
from router.feedback import (
    FeedbackBody,
    FeedbackUnavailable,
    SqliteFeedbackStore,
    UnknownRequest,
    latest_verdicts,
    load_feedback,
    open_feedback_store,
)
from router.service import create_app
from router.state_redis import RedisFeedbackStore
from tests.support import free_port, hung_redis
from tests.unit.test_feedback import ADMIN, ALICE, NAMES, SECURITY, orchestrator, sdk


def _prefix() -> str:
    return f"moe-test-{uuid.uuid4().hex[:8]}:"  # each test its own keys in the session's Redis


def _store(redis_url: str, prefix: str, **kw: float) -> RedisFeedbackStore:
    return RedisFeedbackStore.from_config(StateConfig(backend="redis", key_prefix=prefix), {"MOE_REDIS_URL": redis_url},
                                          **kw)


def test_replicas_share_answers_and_verdicts(redis_url: str) -> None:
    prefix = _prefix()
    a, b = _store(redis_url, prefix), _store(redis_url, prefix)
    a.remember("chatcmpl-1", "an integral", "math")
    # Replica b never saw the answer, yet a verdict on its id is stored with a's query and expert.
    first = b.submit(FeedbackBody(request_id="chatcmpl-1", good=True, note="right"), NAMES)
    time.sleep(0.01)  # times are the server's, in milliseconds: the two must differ for the `since` checks
    second = a.submit(FeedbackBody(query="sort a list", expert="code", score=0.25), NAMES)
    assert (first.query, first.expert, first.score, first.request_id, first.note) == \
        ("an integral", "math", 1.0, "chatcmpl-1", "right")
    assert second.id == first.id + 1
    for store in (a, b):
        assert store.records() == [first, second]
    assert a.records(since=second.created) == [second]
    assert a.records(since=second.created + 1) == []
    assert first.created < second.created  # the Redis server's clock, taken with the id
    # A verdict on an answer id sent again (a client retrying after a timeout) is kept once; one by query is not
    # an answer's, and two users may well give the same one.
    assert b.submit(FeedbackBody(request_id="chatcmpl-1", good=True, note="right"), NAMES) == first
    third = b.submit(FeedbackBody(query="sort a list", expert="code", score=0.25), NAMES)
    assert third.id == second.id + 1
    # Non-ASCII text survives the round trip through the server-side script.
    fourth = a.submit(FeedbackBody(query="¿Qué es π? 数学 / \"quoted\"", expert="math", good=False), NAMES)
    assert a.records()[-1] == fourth and fourth.query == "¿Qué es π? 数学 / \"quoted\""
    # The answer lookup expires with its retention; the verdicts stay.
    short = _store(redis_url, prefix, retention_s=1.0)
    short.remember("chatcmpl-2", "a haiku", "code")
    assert short.answered("chatcmpl-2") is not None
    time.sleep(2.2)
    assert short.answered("chatcmpl-2") is None and len(short.records()) == 4
    keys = sorted(k.decode() for k in redis.Redis.from_url(redis_url).keys(f"{prefix}*"))
    # The one answer id rated holds one latest-verdict key; the expired answer's hash is gone.
    assert [k for k in keys if ":feedback:last:" not in k] == [
        f"{prefix}feedback:answer:chatcmpl-1", f"{prefix}feedback:next_id", f"{prefix}feedback:verdicts"]
    assert sum(":feedback:last:" in k for k in keys) == 1
    for store in (a, b, short):
        store.close()


def test_a_client_changing_its_mind_back_ends_on_its_last_verdict(redis_url: str) -> None:
    """good, bad, then good again on one answer: the third was taken for a resend of the first (any earlier
    verdict's copy was dropped) and the gate trained on "bad"; only a resend of the latest is kept once now."""
    store = _store(redis_url, _prefix())
    store.remember("chatcmpl-m", "an integral", "math")
    verdicts = [store.submit(FeedbackBody(request_id="chatcmpl-m", good=good), NAMES) for good in (True, False, True)]
    assert [v.score for v in verdicts] == [1.0, 0.0, 1.0] and len({v.id for v in verdicts}) == 3
    assert store.submit(FeedbackBody(request_id="chatcmpl-m", good=True), NAMES) == verdicts[-1]  # a resend
    assert [v.score for v in latest_verdicts(store.records())] == [1.0]
    store.close()


def test_an_answer_remembered_for_one_key_is_unknown_to_another(redis_url: str) -> None:
    store = _store(redis_url, _prefix())
    store.remember("chatcmpl-k", "an integral", "math", "alice")
    store.remember("chatcmpl-open", "a haiku", "code")
    assert store.answered("chatcmpl-k").key == "alice"  # type: ignore[union-attr]
    for key in ("bob", None):
        with pytest.raises(UnknownRequest):
            store.submit(FeedbackBody(request_id="chatcmpl-k", good=False), NAMES, key)
    with pytest.raises(UnknownRequest):  # an answer given without a key is not a keyed client's either
        store.submit(FeedbackBody(request_id="chatcmpl-open", good=False), NAMES, "alice")
    assert store.submit(FeedbackBody(request_id="chatcmpl-k", good=True), NAMES, "alice").query == "an integral"
    assert store.submit(FeedbackBody(request_id="chatcmpl-open", good=True), NAMES).expert == "code"
    store.close()


async def test_two_services_one_feedback_store_and_training_reads_it(redis_url: str) -> None:
    prefix = _prefix()
    environ = {"MOE_REDIS_URL": redis_url, "MOE_ADMIN_KEY": ADMIN}
    config = orchestrator(security=SECURITY).config.model_copy(
        update={"state": StateConfig(backend="redis", key_prefix=prefix)})
    stores = [open_feedback_store(config, environ) for _ in range(2)]
    assert all(isinstance(s, RedisFeedbackStore) for s in stores)
    one, two = (create_app(orchestrator(security=SECURITY), environ=environ, feedback=s) for s in stores)
    async with sdk(one) as first, sdk(two) as second:
        answer = await first.chat("an integral")
        verdict = await second.feedback(request_id=answer.id, good=False)
    assert (verdict.query, verdict.expert, verdict.score) == ("an integral", answer.expert, 0.0)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=one), base_url="http://router",
                                 headers={"authorization": f"Bearer {ADMIN}"}) as admin:
        exported = (await admin.get("/admin/feedback")).json()["data"]
    assert [r["id"] for r in exported] == [verdict.id]
    # What `moe train` folds into the next gate comes from the same store.
    assert load_feedback(config, environ=environ) == [verdict]
    for store in stores:
        assert store is not None
        store.close()


@pytest.mark.parametrize("url", ["redis://:s3cret-pw@127.0.0.1:{port}/0",
                                 "redis://default:p@ss-s3cret-pw@127.0.0.1:{port}/0",
                                 "redis://127.0.0.1:{port}/0?password=s3cret-pw"])
async def test_an_unreachable_store_refuses_the_verdict_with_503_and_no_secret(
        url: str, caplog: pytest.LogCaptureFixture) -> None:
    url = url.format(port=free_port())  # nothing listens there
    config = orchestrator(security=SECURITY).config.model_copy(
        update={"state": StateConfig(backend="redis", key_prefix=_prefix())})
    store = open_feedback_store(config, {"MOE_REDIS_URL": url})
    assert isinstance(store, RedisFeedbackStore)
    app = create_app(orchestrator(security=SECURITY), environ={"MOE_ADMIN_KEY": ADMIN}, feedback=store)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router",
                                 headers={"authorization": f"Bearer {ALICE}"}) as client:
        # The answer itself is not held up by the store: remembering it only logs the outage.
        chat = await client.post("/v1/chat/completions",
                                 json={"model": "auto", "messages": [{"role": "user", "content": "an integral"}]})
        assert chat.status_code == 200
        refused = await client.post("/v1/feedback", json={"query": "an integral", "expert": "math", "good": True})
    assert refused.status_code == 503
    error = refused.json()["error"]
    assert error["code"] == "feedback_unavailable" and error["type"] == "service_unavailable"
    assert "storing a verdict" in error["message"] and "send it again" in error["message"]
    # Clients learn neither the secret nor where Redis is; the log has the place, with the credentials redacted.
    assert "s3cret" not in refused.text and "127.0.0.1" not in refused.text
    assert "s3cret" not in caplog.text and "<redacted>" in caplog.text and "storing a verdict" in caplog.text
    with pytest.raises(FeedbackUnavailable, match=r"reading the verdicts.*--no-feedback"):
        load_feedback(config, environ={"MOE_REDIS_URL": url})
    store.close()


def test_a_hung_redis_is_waited_for_once_per_outage_not_on_every_answer() -> None:
    """A server that accepts connections and never replies: remembering answers gives up after the short timeout,
    then skips Redis for the outage window instead of making every answer wait."""
    with hung_redis() as (url, accepted):
        store = RedisFeedbackStore.from_config(StateConfig(backend="redis"), {"MOE_REDIS_URL": url})
        try:
            for i in range(20):
                store.remember(f"chatcmpl-{i}", "an integral", "math")
            assert len(accepted) == 1  # one attempt timed out; the other 19 answers did not touch Redis
        finally:
            store.close()


def test_remembering_lasts_a_day_in_redis_unless_the_config_says(redis_url: str, tmp_path: Path) -> None:
    environ = {"MOE_REDIS_URL": redis_url}
    base = orchestrator().config
    stores = [open_feedback_store(base.model_copy(update={"state": StateConfig(backend="redis"), "feedback": fb}),
                                  environ) for fb in (FeedbackConfig(), FeedbackConfig(remember_s=600))]
    assert [s.retention_s for s in stores if isinstance(s, RedisFeedbackStore)] == [86400.0, 600.0]
    sqlite = open_feedback_store(base.model_copy(update={"feedback": FeedbackConfig(path=str(tmp_path / "f.db"))}))
    assert isinstance(sqlite, SqliteFeedbackStore) and sqlite.retention_s == 30 * 86400.0
    for store in [*stores, sqlite]:
        assert store is not None
        store.close()


def test_a_refusing_redis_is_told_apart_from_an_unreachable_one(redis_url: str,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    prefix = _prefix()
    redis.Redis.from_url(redis_url).set(f"{prefix}feedback:verdicts", "not a sorted set")  # WRONGTYPE on ZADD
    store = _store(redis_url, prefix)
    with pytest.raises(FeedbackUnavailable, match="the feedback store refused the command while storing a verdict"):
        store.add("an integral", "math", 1.0)
    assert "WRONGTYPE" in caplog.text or "ResponseError" in caplog.text
    store.close()


async def test_verdicts_sent_while_redis_hangs_do_not_hold_up_answers() -> None:
    """Each verdict call on a hung Redis waits out the client's timeout on a thread. Those must not be the event
    loop's default threads, which every answer needs (remembering it, combining): verdicts sent during the hang
    held every answer on the replica up by seconds. And once one call found Redis unreachable, the rest are
    refused at once instead of queueing for a timeout each."""
    loop = asyncio.get_running_loop()
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=2))
    with hung_redis() as (url, _):
        store = RedisFeedbackStore.from_config(StateConfig(backend="redis"), {"MOE_REDIS_URL": url}, timeout_s=1.0)
        try:
            started = time.monotonic()
            verdicts = [asyncio.ensure_future(store.asubmit(
                FeedbackBody(query="an integral", expert="math", good=True), NAMES)) for _ in range(8)]
            await asyncio.sleep(0.2)  # the verdicts are waiting on Redis now
            hop = time.monotonic()
            await asyncio.to_thread(lambda: None)  # what an answer needs from the default threads
            assert time.monotonic() - hop < 0.5
            results = await asyncio.gather(*verdicts, return_exceptions=True)
            assert all(isinstance(r, FeedbackUnavailable) for r in results)
            assert time.monotonic() - started < 1.9  # one timeout, not one per verdict
            assert all("send it again" in str(r) for r in results)
        finally:
            store.close()


def test_an_outage_of_remembering_ends_when_redis_answers_not_with_the_next_answer() -> None:
    """The outage a failed ``remember`` began ended only when a later answer was remembered: a replica taking only
    verdicts (or no traffic) read ``moe_redis_up{store="feedback"}`` 0 after Redis was back."""
    import shutil
    import subprocess

    port = free_port()
    store = RedisFeedbackStore.from_config(StateConfig(backend="redis"), {"MOE_REDIS_URL": f"redis://127.0.0.1:{port}/0"})
    started = None
    try:
        store.remember("chatcmpl-1", "an integral", "math")
        assert not store.redis_up()
        binary = shutil.which("redis-server")
        assert binary is not None
        started = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                                    "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20.0
        while not store.redis_up():  # no answer remembered meanwhile
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        store.close()
        if started is not None:
            started.terminate()
            started.wait(10)
