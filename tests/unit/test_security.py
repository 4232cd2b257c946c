"""Client keys, admin key, rate limits and redaction: pure decisions first, then through the service in-process."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Mapping

import httpx
import pytest
from fastapi import FastAPI
from pydantic import ValidationError

from experts.errors import ExpertUnavailable
from router.config import ConfigError, RateLimitConfig, SecurityConfig
from router.orchestrator import Orchestrator
from router.security import (
    Admitted,
    Denied,
    Guard,
    InMemoryRateStore,
    KeyRing,
    bearer_token,
    hash_key,
    redact,
    take_token,
)
from router.service import create_app
from tests.doubles.fakes import FakeClock, FakeExpert, FakeGate, fake_config

NAMES = ["math", "code"]
ALICE, BOB, ADMIN = "sk-alice-0123456789", "sk-bob-9876543210", "sk-admin-secret-42"
CHAT = {"model": "auto", "messages": [{"role": "user", "content": "an integral"}]}


def make_app(security: Mapping[str, object] | None = None, environ: dict[str, str] | None = None,
             store: InMemoryRateStore | None = None, **overrides: object) -> FastAPI:
    config = fake_config(NAMES, **({"security": security} if security else {}), **overrides)
    experts = {n: FakeExpert(config.expert(n), text=f"{n} says hi") for n in NAMES}
    gate = FakeGate(NAMES, {"integral": [0.9, 0.1]}, default=[0.2, 0.8])
    return create_app(Orchestrator(config, gate, experts), environ=environ or {}, rate_store=store)


def client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router")


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


KEYED: dict[str, object] = {"api_keys": [{"name": "alice", "sha256": hash_key(ALICE)}],
                            "admin_key_env": "MOE_ADMIN_KEY"}


# -- pure decisions ---------------------------------------------------------------------------------------
def test_token_bucket_spends_burst_then_refills_at_rate() -> None:
    limit = RateLimitConfig(rate_per_s=2.0, burst=3)
    bucket, waits = None, []
    for _ in range(4):
        bucket, wait = take_token(bucket, limit, now=10.0)
        waits.append(wait)
    assert waits[:3] == [0.0, 0.0, 0.0]
    assert waits[3] == pytest.approx(0.5)  # one token at 2/s
    assert bucket is not None
    bucket, wait = take_token(bucket, limit, now=10.5)
    assert wait == 0.0
    bucket, _ = take_token(bucket, limit, now=1000.0)
    assert bucket.tokens == pytest.approx(2.0)  # refill is capped at the burst


def test_bearer_token_parsing() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer   abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer ") is None
    assert bearer_token(None) is None


def test_key_ring_from_config_and_environment() -> None:
    config = SecurityConfig.model_validate({"api_keys": [{"name": "alice", "sha256": hash_key(ALICE).upper()}],
                                            "api_keys_env": "KEYS", "admin_key_env": "ADMIN"})
    ring = KeyRing.from_config(config, {"KEYS": f" {BOB} ,, {BOB}", "ADMIN": ADMIN})
    assert ring.required
    assert [k.name for k in ring.keys] == ["alice", "env-1"]
    assert all(BOB not in repr(k) for k in ring.keys)
    assert (ring.client(ALICE) or pytest.fail()).name == "alice"
    assert ring.client(BOB) is not None
    assert ring.client("sk-nobody") is None
    assert ring.is_admin(ADMIN) and not ring.is_admin(ALICE)


def test_keys_from_the_environment_are_named_by_place_never_by_their_digest() -> None:
    """The name is in every request line and 429 message: a prefix of the key's unsalted SHA-256 there let anyone
    who reads the logs test guesses offline. A key given twice keeps its first place."""
    config = SecurityConfig.model_validate({"api_keys_env": "KEYS"})
    ring = KeyRing.from_config(config, {"KEYS": f"{ALICE}, {BOB},{ALICE},sk-third"})
    assert [k.name for k in ring.keys] == ["env-1", "env-2", "env-3"]
    assert [(ring.client(key) or pytest.fail()).name for key in (ALICE, BOB, "sk-third")] == ["env-1", "env-2", "env-3"]


def test_a_config_key_may_not_take_a_name_the_environment_s_keys_get() -> None:
    keys = [{"name": "env-2", "sha256": hash_key(ALICE)}]
    SecurityConfig.model_validate({"api_keys": keys})  # no api_keys_env: no env-2 to clash with
    with pytest.raises(ValidationError, match="the name 'env-2' is the one the service gives a key of api_keys_env"):
        SecurityConfig.model_validate({"api_keys": keys, "api_keys_env": "KEYS"})


def test_an_empty_key_variable_fails_closed() -> None:
    ring = KeyRing.from_config(SecurityConfig(api_keys_env="KEYS"), {})
    assert ring.required and ring.keys == []


def test_security_config_is_strict() -> None:
    with pytest.raises(ConfigError) as info:
        fake_config(NAMES, security={"api_keys": [{"name": "a", "sha256": "not-a-hash"},
                                                  {"name": "b", "sha256": hash_key("x"), "key": "raw"}],
                                     "rate_limit": {"rate_per_s": 0}})
    paths = [p for p, _ in info.value.problems]
    assert "security.api_keys[0].sha256" in paths
    assert "security.api_keys[1].key" in paths
    assert "security.rate_limit.rate_per_s" in paths
    with pytest.raises(ConfigError, match="duplicate key name"):
        fake_config(NAMES, security={"api_keys": [{"name": "a", "sha256": hash_key("x")},
                                                  {"name": "a", "sha256": hash_key("y")}]})


async def test_guard_limits_per_key_with_a_per_key_override() -> None:
    clock = FakeClock()
    config = SecurityConfig.model_validate({
        "api_keys": [{"name": "alice", "sha256": hash_key(ALICE)},
                     {"name": "bob", "sha256": hash_key(BOB), "rate_limit": {"rate_per_s": 1, "burst": 3}}],
        "rate_limit": {"rate_per_s": 1, "burst": 1}})
    guard = Guard.from_config(config, {}, InMemoryRateStore(clock))
    assert await guard.admit_client(f"Bearer {ALICE}", "1.2.3.4") == Admitted("alice", hash_key(ALICE))
    denied = await guard.admit_client(f"Bearer {ALICE}", "1.2.3.4")
    assert isinstance(denied, Denied) and denied.status == 429 and denied.headers == {"retry-after": "1"}
    for _ in range(3):  # bob's own bucket, and a bigger one
        assert await guard.admit_client(f"Bearer {BOB}", "1.2.3.4") == Admitted("bob", hash_key(BOB))
    clock.now += 1.0
    assert await guard.admit_client(f"Bearer {ALICE}", "1.2.3.4") == Admitted("alice", hash_key(ALICE))


async def test_a_key_keeps_its_bucket_when_revoking_another_renames_it() -> None:
    """Keys of api_keys_env are named by place: revoking env-1 makes env-2 the new env-1. Its bucket is the key's
    own, not its name's, so it neither takes over the revoked key's bucket nor gets a full one."""
    store = InMemoryRateStore(FakeClock())
    config = SecurityConfig.model_validate({"api_keys_env": "KEYS", "rate_limit": {"rate_per_s": 1, "burst": 1}})
    before = Guard.from_config(config, {"KEYS": f"{ALICE},{BOB}"}, store)
    assert await before.admit_client(f"Bearer {BOB}", "1.2.3.4") == Admitted("env-2", hash_key(BOB))
    assert isinstance(await before.admit_client(f"Bearer {BOB}", "1.2.3.4"), Denied)
    after = Guard.from_config(config, {"KEYS": BOB}, store)  # alice revoked
    denied = await after.admit_client(f"Bearer {BOB}", "1.2.3.4")
    assert isinstance(denied, Denied) and denied.status == 429 and denied.key_name == "env-1"


async def test_wrong_keys_are_rate_limited_per_address_without_touching_the_keys_buckets() -> None:
    """Guessing keys costs a token of the address's bucket per guess, at the service's rate: past its burst the
    guesser gets 429s, while a real key from the same address keeps its own bucket."""
    clock = FakeClock()
    config = SecurityConfig.model_validate({"api_keys": [{"name": "alice", "sha256": hash_key(ALICE)}],
                                            "rate_limit": {"rate_per_s": 1, "burst": 3}})
    guard = Guard.from_config(config, {}, InMemoryRateStore(clock))
    verdicts = [await guard.admit_client(f"Bearer guess-{i}", "6.6.6.6") for i in range(5)]
    assert [v.status for v in verdicts] == [401, 401, 401, 429, 429]  # type: ignore[union-attr]
    assert verdicts[3].headers == {"retry-after": "1"} and "wrong keys" in verdicts[3].message  # type: ignore[union-attr]
    assert await guard.admit_client(f"Bearer {ALICE}", "6.6.6.6") == Admitted("alice", hash_key(ALICE))
    other = await guard.admit_client("Bearer guess-x", "7.7.7.7")  # another address has its own bucket
    assert isinstance(other, Denied) and other.status == 401
    clock.now += 1.0
    refilled = await guard.admit_client("Bearer guess-y", "6.6.6.6")
    assert isinstance(refilled, Denied) and refilled.status == 401
    # Without a service-wide rate limit there is no bucket to take from: every wrong key is a 401.
    unlimited = Guard.from_config(SecurityConfig.model_validate(
        {"api_keys": [{"name": "alice", "sha256": hash_key(ALICE)}]}), {}, InMemoryRateStore(clock))
    assert {(await unlimited.admit_client(f"Bearer g{i}", "6.6.6.6")).status for i in range(10)} == {401}  # type: ignore[union-attr]


async def test_wrong_admin_keys_are_rate_limited_per_address_too() -> None:
    """Guessing the admin key costs a token of the address's bucket per guess, as guessing a client key does (it
    was never limited); the admin key itself still passes from the same address."""
    clock = FakeClock()
    config = SecurityConfig.model_validate({"admin_key_env": "ADMIN", "rate_limit": {"rate_per_s": 1, "burst": 3}})
    guard = Guard.from_config(config, {"ADMIN": ADMIN}, InMemoryRateStore(clock))
    verdicts = [await guard.admit_admin(f"Bearer guess-{i}", "6.6.6.6") for i in range(5)]
    assert [v.status for v in verdicts] == [401, 401, 401, 429, 429]  # type: ignore[union-attr]
    assert await guard.admit_admin(f"Bearer {ADMIN}", "6.6.6.6") == Admitted("admin")
    other = await guard.admit_admin("Bearer guess-x", "7.7.7.7")
    assert isinstance(other, Denied) and other.status == 401


def test_in_memory_store_is_bounded() -> None:
    import asyncio

    store = InMemoryRateStore(max_keys=2)
    limit = RateLimitConfig(rate_per_s=1, burst=1)
    for key in ("a", "b", "c"):
        asyncio.run(store.take(key, limit))
    assert list(store._buckets) == ["b", "c"]


def test_redact_hides_secrets_but_not_variable_names() -> None:
    dump = {"security": {"api_keys": [{"name": "alice", "sha256": "ab" * 32}], "admin_key_env": "ADMIN"},
            "experts": [{"api_key_env": "OPENAI_KEY", "endpoint": "https://user:pw@host/v1", "max_tokens": 5}],
            "db_password": "hunter2", "token": None}
    out = redact(dump)
    assert out["security"]["api_keys"][0] == {"name": "alice", "sha256": "<redacted>"}
    assert out["security"]["admin_key_env"] == "ADMIN"
    assert out["experts"][0] == {"api_key_env": "OPENAI_KEY", "endpoint": "https://<redacted>@host/v1",
                                 "max_tokens": 5}
    assert out["db_password"] == "<redacted>" and out["token"] is None


def test_redact_hides_the_values_of_secret_flags_in_a_command_line() -> None:
    """``vllm.args: ["--api-key", "${KEY}"]`` (a composed vLLM demanding the key the router sends) showed the key in
    /admin/config once the variable was expanded."""
    args = ["--api-key", "sk-secret-1", "--max-model-len", "4096", "--hf-token=hf_secret", "--max-num-seqs", "8",
            "--api-key", "-tD8W_urlsafe_key"]
    assert redact({"vllm": {"args": args}})["vllm"]["args"] == [
        "--api-key", "<redacted>", "--max-model-len", "4096", "--hf-token=<redacted>", "--max-num-seqs", "8",
        "--api-key", "<redacted>"]  # a URL-safe key may start with "-"


@pytest.mark.parametrize(("text", "expected"), [
    ("redis://:pw@h:6379/0", "redis://<redacted>@h:6379/0"),
    # A password holding "@": everything up to the authority's last "@" goes.
    ("redis://default:p@ss-s3cret@h:6379/0", "redis://<redacted>@h:6379/0"),
    ("redis://h:6379/0?password=s3cret&db=1", "redis://h:6379/0?password=<redacted>&db=1"),
    ("http://h/v1?api_key=s3cret#x", "http://h/v1?api_key=<redacted>#x"),
    ("Error connecting to redis://u:s3cret@h:1/0. Connection refused.", "Error connecting to redis://<redacted>@h:1/0. "
                                                                        "Connection refused."),
    ("https://host/path@x?page=2", "https://host/path@x?page=2"),  # no userinfo, no secret: unchanged
    # A password holding an unencoded "/", "?" or "#" ends the authority early; it goes whole all the same.
    ("http://bob:s3cret/Zz8+Q==@h:9/v1", "http://<redacted>@h:9/v1"),
    ("redis://:s3cret/x@h:6379/0", "redis://<redacted>@h:6379/0"),
    ("https://alice:s3cret#Frag@api.example.com/v1", "https://<redacted>@api.example.com/v1"),
    ("https://alice:s3cret?x@api.example.com/v1?api_key=k", "https://<redacted>@api.example.com/v1?api_key=<redacted>"),
    ("http://bob:1234/s3cret@h/v1", "http://<redacted>@h/v1"),  # the start reads as a port, the rest as a path
    ("http://bob:p@s3cret/w@h/v1", "http://<redacted>@h/v1"),  # with a "@" before the "/" too
    ("http://u:s3cret@h:8000/a@b", "http://<redacted>@b"),  # a "@" past the host: hidden whole, too much
    # RFC 3986's sub-delimiters stand unencoded in a password; a "'" ended the URL, so none of it was redacted.
    *((f"redis://:s3cret{c}x@h:6379/0", "redis://<redacted>@h:6379/0") for c in "!$&'()*+,;="),
    ("store redis://:hunter'2s3cret@h:1/0 is unreachable", "store redis://<redacted>@h:1/0 is unreachable"),
    ("http://h/v1?password=ab's3cret&y=1", "http://h/v1?password=<redacted>&y=1"),
    # The quotes around a URL stay where they were.
    ("endpoint 'http://u:s3cret@h/v1' failed", "endpoint 'http://<redacted>@h/v1' failed"),
    ("{'url': 'http://h/v1?token=s3cret', 'n': 1}", "{'url': 'http://h/v1?token=<redacted>', 'n': 1}"),
    ("['http://u:s3cret@h/a', 'b']", "['http://<redacted>@h/a', 'b']"),
    # Two quoted URLs with nothing between: read as one through the "'", the second's password was left.
    ("['http://h1/v1','http://user:s3cret@h2/v1']", "['http://h1/v1','http://<redacted>@h2/v1']"),
    ("e='http://h1/v1','redis://:s3cret@h2:6379/0'", "e='http://h1/v1','redis://<redacted>@h2:6379/0'"),
    ("see 'http://h/x?token=s3cret'.", "see 'http://h/x?token=<redacted>'."),
    ("no url at all", "no url at all"),
])
def test_redact_finds_credentials_in_any_url_form(text: str, expected: str) -> None:
    assert redact(text) == expected and "s3cret" not in redact(text)


# -- through the service ----------------------------------------------------------------------------------
async def test_no_keys_configured_leaves_v1_open() -> None:
    async with client(make_app()) as http:
        r = await http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200


async def test_v1_needs_a_key_once_one_is_configured_and_health_stays_open() -> None:
    async with client(make_app(KEYED)) as http:
        missing = await http.post("/v1/chat/completions", json=CHAT)
        wrong = await http.get("/v1/models", headers=auth("sk-wrong-key"))
        basic = await http.get("/v1/models", headers={"authorization": f"Basic {ALICE}"})
        ok = await http.post("/v1/chat/completions", json=CHAT, headers=auth(ALICE))
        health = await http.get("/health")
    assert (missing.status_code, missing.json()["error"]["code"]) == (401, "missing_api_key")
    assert missing.headers["www-authenticate"] == "Bearer"
    assert (wrong.status_code, wrong.json()["error"]["code"]) == (401, "invalid_api_key")
    # OpenAI's own opening words, by which LiteLLM tells a refused key from a bad request.
    assert wrong.json()["error"]["message"].startswith("Incorrect API key provided")
    assert "sk-wrong-key" not in wrong.text
    assert basic.status_code == 401
    assert ok.status_code == 200 and ok.json()["model"] == "math"
    assert health.status_code == 200


async def test_keys_from_the_environment_are_accepted() -> None:
    app = make_app({"api_keys_env": "MOE_API_KEYS"}, environ={"MOE_API_KEYS": f"{ALICE},{BOB}"})
    async with client(app) as http:
        a = await http.get("/v1/models", headers=auth(ALICE))
        b = await http.get("/v1/models", headers=auth(BOB))
        c = await http.get("/v1/models")
    assert (a.status_code, b.status_code, c.status_code) == (200, 200, 401)


async def test_openai_sdk_sees_401_for_a_bad_key() -> None:
    from openai import AsyncOpenAI, AuthenticationError

    async with client(make_app(KEYED)) as http:
        good = AsyncOpenAI(base_url="http://router/v1", api_key=ALICE, http_client=http, max_retries=0)  # type: ignore[arg-type]
        assert (await good.chat.completions.create(**CHAT)).choices[0].message.content == "math says hi"  # type: ignore[call-overload]
        bad = AsyncOpenAI(base_url="http://router/v1", api_key="sk-nope", http_client=http, max_retries=0)  # type: ignore[arg-type]
        with pytest.raises(AuthenticationError):
            await bad.models.list()


async def test_rate_limit_is_429_with_retry_after() -> None:
    clock = FakeClock()
    security = {**KEYED, "rate_limit": {"rate_per_s": 0.5, "burst": 2}}
    async with client(make_app(security, store=InMemoryRateStore(clock))) as http:
        statuses = [(await http.get("/v1/models", headers=auth(ALICE))).status_code for _ in range(3)]
        limited = await http.get("/v1/models", headers=auth(ALICE))
        health = await http.get("/health")
        clock.now += 2.0
        again = await http.get("/v1/models", headers=auth(ALICE))
    assert statuses == [200, 200, 429]
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "2"
    error = limited.json()["error"]
    assert (error["code"], error["type"]) == ("rate_limit_exceeded", "rate_limit_error")
    assert health.status_code == 200
    assert again.status_code == 200


async def test_a_rate_limited_key_is_named_in_its_log_line(caplog: pytest.LogCaptureFixture) -> None:
    security = {**KEYED, "rate_limit": {"rate_per_s": 0.001, "burst": 1}}
    caplog.set_level(logging.INFO)
    async with client(make_app(security)) as http:
        statuses = [(await http.get("/v1/models", headers=auth(ALICE))).status_code for _ in range(2)]
        wrong = await http.get("/v1/models", headers=auth("sk-wrong-key-123"))
    assert statuses == [200, 429]
    assert wrong.status_code == 401  # a wrong key draws from its address's bucket, not alice's
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "router.requests"]
    assert [(line["status"], line.get("key"), line.get("error")) for line in lines] == [
        (200, "alice", None), (429, "alice", "rate_limit_exceeded"), (401, None, "invalid_api_key")]
    assert hash_key(ALICE) not in caplog.text


async def test_rate_limit_without_keys_is_per_client() -> None:
    async with client(make_app({"rate_limit": {"rate_per_s": 0.001, "burst": 1}})) as http:
        first = await http.get("/v1/models")
        second = await http.get("/v1/models")
    assert (first.status_code, second.status_code) == (200, 429)


async def test_request_size_limit_is_kept_behind_the_key_check() -> None:
    app = make_app(KEYED, service={"max_request_bytes": 2048})
    big = {"model": "auto", "messages": [{"role": "user", "content": "x" * 5000}]}
    async with client(app) as http:
        anonymous = await http.post("/v1/chat/completions", json=big)
        keyed = await http.post("/v1/chat/completions", json=big, headers=auth(ALICE))
    assert anonymous.status_code == 401  # no body is read for a caller without a key
    assert keyed.status_code == 413


async def test_admin_config_needs_the_admin_key_and_is_redacted() -> None:
    app = make_app(KEYED, environ={"MOE_ADMIN_KEY": ADMIN})
    async with client(app) as http:
        none = await http.get("/admin/config")
        client_key = await http.get("/admin/config", headers=auth(ALICE))
        wrong = await http.get("/admin/config", headers=auth("sk-guess"))
        admin = await http.get("/admin/config", headers=auth(ADMIN))
        admin_on_v1 = await http.get("/v1/models", headers=auth(ADMIN))
    assert none.status_code == 401
    assert (client_key.status_code, client_key.json()["error"]["code"]) == (403, "admin_key_required")
    assert wrong.status_code == 401
    assert admin.status_code == 200
    body = admin.json()
    assert [e["name"] for e in body["experts"]] == NAMES
    assert body["security"]["api_keys"] == [{"name": "alice", "sha256": "<redacted>", "rate_limit": None}]
    assert body["security"]["admin_key_env"] == "MOE_ADMIN_KEY"
    assert hash_key(ALICE) not in admin.text and ADMIN not in admin.text
    assert admin_on_v1.status_code == 401  # the admin key is not a client key


async def test_admin_endpoints_are_refused_when_no_admin_key_is_set() -> None:
    async with client(make_app()) as http:
        r = await http.get("/admin/config", headers=auth(ADMIN))
    assert (r.status_code, r.json()["error"]["code"]) == (403, "admin_disabled")


@pytest.mark.parametrize(("environ", "why"), [
    ({}, "the variable security.admin_key_env names (MOE_ADMIN_KEY) is not set"),
    ({"MOE_ADMIN_KEY": "  "}, "the variable security.admin_key_env names (MOE_ADMIN_KEY) is empty"),
])
async def test_admin_disabled_says_when_the_named_variable_is_unset(environ: dict[str, str], why: str) -> None:
    """``set security.admin_key_env`` would send someone who did set it hunting in the wrong place."""
    async with client(make_app(KEYED, environ=environ)) as http:
        named = await http.get("/admin/config", headers=auth(ADMIN))
    async with client(make_app()) as http:
        unnamed = await http.get("/admin/config", headers=auth(ADMIN))
    assert (named.status_code, named.json()["error"]["code"]) == (403, "admin_disabled")
    assert named.json()["error"]["message"] == f"admin endpoints are disabled: {why}"
    assert unnamed.json()["error"]["message"] == "admin endpoints are disabled: set security.admin_key_env"


async def test_keys_never_reach_logs_or_errors(caplog: pytest.LogCaptureFixture) -> None:
    config = fake_config(["math"], security=KEYED, service={"log_content": True})
    expert = FakeExpert(config.expert("math"), fail=lambda n: ExpertUnavailable(n, "connection refused"))
    app = create_app(Orchestrator(config, FakeGate(["math"], {}, default=[1.0]), {"math": expert}),
                     environ={"MOE_ADMIN_KEY": ADMIN})
    caplog.set_level(logging.DEBUG)
    async with client(app) as http:
        await http.post("/v1/chat/completions", json=CHAT, headers=auth(ALICE))
        await http.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth(ALICE))
        await http.get("/v1/models", headers=auth("sk-wrong-key-123"))
        await http.get("/admin/config", headers=auth(ADMIN))
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "router.requests"]
    assert len(lines) == 4
    assert {line.get("key") for line in lines} == {"alice", None, "admin"}
    text = caplog.text
    for secret in (ALICE, ADMIN, "sk-wrong-key-123", "Bearer", "authorization"):
        assert secret not in text


@pytest.mark.parametrize("open_endpoints", [None, ["docs"], ["metrics"], []])
async def test_metrics_and_docs_can_be_put_behind_the_client_keys(open_endpoints: list[str] | None) -> None:
    security = dict(KEYED) if open_endpoints is None else {**KEYED, "open_endpoints": open_endpoints}
    expected_open = {"metrics", "docs"} if open_endpoints is None else set(open_endpoints)
    paths = {"/metrics": "metrics", "/docs": "docs", "/redoc": "docs", "/openapi.json": "docs",
             "/docs/oauth2-redirect": "docs"}
    async with client(make_app(security)) as http:
        anonymous = {p: (await http.get(p)).status_code for p in paths}
        keyed = {p: (await http.get(p, headers=auth(ALICE))).status_code for p in paths}
        wrong = (await http.get("/metrics", headers=auth(BOB))).status_code
        health = (await http.get("/health")).status_code
    assert health == 200  # probes never need a key
    for path, group in paths.items():
        assert anonymous[path] == (200 if group in expected_open else 401), path
        assert keyed[path] == 200, path
    assert wrong == (200 if "metrics" in expected_open else 401)


def test_open_endpoints_names_only_what_it_knows() -> None:
    with pytest.raises(ValidationError, match="open_endpoints"):
        SecurityConfig.model_validate({"open_endpoints": ["health"]})


# -- the Host a request names (DNS rebinding) ---------------------------------------------------------------------
def local_client(app: FastAPI) -> httpx.AsyncClient:
    """A client reaching ``app`` on this machine's loopback address (the ASGI scope's ``server``), as a browser on
    it reaches a service bound to 127.0.0.1."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8000")


async def test_a_keyless_service_on_this_machine_answers_to_loopback_names_only() -> None:
    """A web page that points its own name at 127.0.0.1 reaches the service as a page of its own site: its JSON
    POST needs no preflight, so the 415 on other bodies does not stop it spending the experts or planting feedback.
    It sends its own name as the Host, which is refused now."""
    async with local_client(make_app()) as http:
        rebound = await http.post("/v1/chat/completions", json=CHAT, headers={"host": "attacker.example:8000"})
        assert rebound.status_code == 400 and rebound.json()["error"]["code"] == "invalid_host"
        assert rebound.json()["error"]["message"].startswith("Host 'attacker.example:8000' is not one this service "
                                                             "answers to: a service reached on this machine with no "
                                                             "client keys answers to localhost")
        # The wildcard a server started on every interface prints, and this machine's own name, are local too.
        for host in ("localhost:8000", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST", "app.localhost", "127.0.0.2",
                     "0.0.0.0:8000", "[::]:8000", f"{socket.gethostname()}:8000"):
            assert (await http.post("/v1/chat/completions", json=CHAT, headers={"host": host})).status_code == 200, host
        assert (await http.get("/health", headers={"host": "attacker.example"})).status_code == 200  # probes
    async with client(make_app()) as http:  # reached on another address: any Host, as before
        assert (await http.post("/v1/chat/completions", json=CHAT, headers={"host": "router.svc"})).status_code == 200


async def test_with_keys_or_allowed_hosts_the_host_check_follows_them() -> None:
    async with local_client(make_app(KEYED)) as http:  # a page has no key: the key decides, whatever the Host
        keyed = await http.post("/v1/chat/completions", json=CHAT, headers={"host": "api.example.com", **auth(ALICE)})
        assert keyed.status_code == 200
    app = make_app(KEYED, service={"allowed_hosts": ["api.example.com", "*.corp.example"]})
    async with client(app) as http:
        for host, status in (("api.example.com", 200), ("API.example.com:443", 200), ("x.corp.example", 200),
                             ("corp.example", 400), ("evil.example", 400)):
            r = await http.post("/v1/chat/completions", json=CHAT, headers={"host": host, **auth(ALICE)})
            assert r.status_code == status, (host, r.text)
        refused = await http.post("/v1/chat/completions", json=CHAT, headers={"host": "evil.example", **auth(ALICE)})
        assert "service.allowed_hosts lists api.example.com, *.corp.example" in refused.json()["error"]["message"]


@pytest.mark.parametrize("host", ["h:8000", "cafe:8080", "db:80", "*.*", "", "a b"])
def test_an_allowed_host_that_is_no_host_name_is_a_config_problem(host: str) -> None:
    with pytest.raises(ConfigError, match=r"service\.allowed_hosts: .*is not a host name"):
        fake_config(NAMES, service={"allowed_hosts": [host]})
