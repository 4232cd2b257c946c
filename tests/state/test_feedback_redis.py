"""Feedback in a real Redis (``state.backend: redis``): every replica records into one store, a verdict can name
an answer another replica gave, ``moe train`` reads the same verdicts, and an outage loses nothing silently."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest
import redis

from router.config import StateConfig
from router.feedback import FeedbackBody, FeedbackUnavailable, load_feedback, open_feedback_store
from router.service import create_app
from router.state_redis import RedisFeedbackStore
from tests.support import free_port
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
    second = a.submit(FeedbackBody(query="sort a list", expert="code", score=0.25), NAMES)
    assert (first.query, first.expert, first.score, first.request_id, first.note) == \
        ("an integral", "math", 1.0, "chatcmpl-1", "right")
    assert second.id == first.id + 1
    for store in (a, b):
        assert store.records() == [first, second]
    assert a.records(since=second.created) == [second]
    assert a.records(since=second.created + 1) == []
    # The answer lookup expires with its retention; the verdicts stay.
    short = _store(redis_url, prefix, retention_s=1.0)
    short.remember("chatcmpl-2", "a haiku", "code")
    assert short.answered("chatcmpl-2") is not None
    time.sleep(2.2)
    assert short.answered("chatcmpl-2") is None and len(short.records()) == 2
    keys = redis.Redis.from_url(redis_url).keys(f"{prefix}*")
    assert sorted(k.decode() for k in keys) == [f"{prefix}feedback:answer:chatcmpl-1", f"{prefix}feedback:next_id",
                                                f"{prefix}feedback:verdicts"]
    for store in (a, b, short):
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


async def test_an_unreachable_store_refuses_the_verdict_with_503_and_no_secret(
        caplog: pytest.LogCaptureFixture) -> None:
    url = f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0"  # nothing listens there
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
    assert "storing a verdict" in error["message"] and "send the verdict again" in error["message"]
    assert "s3cret-pw" not in refused.text and "<redacted>" in error["message"]
    assert "s3cret-pw" not in caplog.text and "feedback" in caplog.text
    with pytest.raises(FeedbackUnavailable, match=r"reading the verdicts .*--no-feedback"):
        load_feedback(config, environ={"MOE_REDIS_URL": url})
    store.close()
