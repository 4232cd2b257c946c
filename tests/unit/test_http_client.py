"""experts.http_client: an expert's connections, over real HTTP against ScriptedOpenAIServer (a test double on
127.0.0.1), through aiohttp (real sockets) and httpx (an injected transport) alike."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Iterator
from contextlib import aclosing
from pathlib import Path

import httpx
import pytest

from experts.base import ExpertContext
from experts.errors import ExpertError, ExpertOverloaded, ExpertProtocolError, ExpertUnavailable
from experts.http_client import (
    MAX_LINE_BYTES,
    AiohttpClient,
    HttpClient,
    HttpFailure,
    HttpxClient,
    env_proxy,
    tls_context,
)
from experts.openai_compat import OpenAICompatibleExpert
from experts.types import ChatMessage, ChatRequest
from router.config import ExpertConfig
from tests.doubles import Behaviour, ScriptedOpenAIServer

KEEPALIVE_S = ExpertConfig.model_fields["keepalive_s"].default

# Which client an expert builds: aiohttp on real sockets, httpx over an injected (here: socket) transport.
TRANSPORTS = {"aiohttp": None, "httpx": httpx.AsyncHTTPTransport}


@pytest.fixture
def server() -> Iterator[ScriptedOpenAIServer]:
    with ScriptedOpenAIServer(name="pool") as srv:
        yield srv


@pytest.fixture(params=sorted(TRANSPORTS))
def client_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def expert_for(server: ScriptedOpenAIServer, max_concurrency: int, kind: str = "aiohttp",
               timeout_s: float = 5.0, keepalive_s: float = KEEPALIVE_S) -> OpenAICompatibleExpert:
    make = TRANSPORTS[kind]
    return OpenAICompatibleExpert(ExpertConfig(name="e", type="vllm", endpoint=server.url, model="m",
                                               timeout_s=timeout_s, max_concurrency=max_concurrency,
                                               keepalive_s=keepalive_s),
                                  ExpertContext(transport=make() if make else None))


def ask(text: str) -> ChatRequest:
    return ChatRequest(messages=[ChatMessage(role="user", content=text)])


def test_real_sockets_get_aiohttp_and_an_injected_transport_httpx(server: ScriptedOpenAIServer) -> None:
    assert isinstance(expert_for(server, 4)._client(), AiohttpClient)
    assert isinstance(expert_for(server, 4, "httpx")._client(), HttpxClient)


async def test_sequential_calls_reuse_one_connection(server: ScriptedOpenAIServer, client_kind: str) -> None:
    expert = expert_for(server, max_concurrency=64, kind=client_kind)
    try:
        for i in range(10):
            reply = await expert.generate(ask(f"question {i}"))
            assert reply.content == "answer from pool"
        assert server.connections_total == 1
    finally:
        await expert.aclose()
    assert server.wait_for(lambda s: s.open_connections == 0)


async def test_no_request_goes_out_on_a_connection_the_server_closed_for_idling() -> None:
    # The server closes a connection idle for 0.5 s, as vLLM's uvicorn does after 5 s. While this event loop is
    # busy (time.sleep) it cannot read the server's close, so a pool that still counts the connection as alive
    # sends the next request on it: the request fails as unavailable with nothing wrong at the expert. Kept
    # below the server's timeout, keepalive_s retires the connection first and the request takes a new one.
    with ScriptedOpenAIServer(name="idle", keep_alive_s=0.5) as server:
        outcomes = {}
        for keepalive_s in (15.0, 0.3):
            expert = expert_for(server, max_concurrency=4, keepalive_s=keepalive_s)
            try:
                assert (await expert.generate(ask("first"))).content == "answer from idle"
                time.sleep(0.8)
                try:
                    outcomes[keepalive_s] = (await expert.generate(ask("after idling"))).content
                except ExpertUnavailable as exc:
                    outcomes[keepalive_s] = type(exc).__name__
            finally:
                await expert.aclose()
        assert outcomes == {15.0: "ExpertUnavailable", 0.3: "answer from idle"}


async def test_keepalive_s_bounds_how_long_an_idle_connection_is_reused(server: ScriptedOpenAIServer) -> None:
    opened = []
    for keepalive_s, idle_s in ((KEEPALIVE_S, 0.3), (0.2, 0.3), (0.0, 0.0)):
        before = server.connections_total
        expert = expert_for(server, max_concurrency=4, keepalive_s=keepalive_s)
        try:
            for i in range(3):
                await expert.generate(ask(f"question {i}"))
                await asyncio.sleep(idle_s)
        finally:
            await expert.aclose()
        opened.append(server.connections_total - before)
    assert opened == [1, 3, 3]  # reused while idle below keepalive_s; a new one each time past it, or at 0


async def test_concurrent_calls_open_at_most_max_concurrency_and_all_close(server: ScriptedOpenAIServer,
                                                                          client_kind: str) -> None:
    server.default = Behaviour.slow("slow answer", delay_s=0.3)
    expert = expert_for(server, max_concurrency=8, kind=client_kind)
    try:
        replies = await asyncio.gather(*(expert.generate(ask(f"q{i}")) for i in range(24)))
        assert [r.content for r in replies] == ["slow answer"] * 24
        assert server.connections_total == 8  # 24 calls, 8 at a time, on 8 kept-alive connections
        # Streams hold a connection until they end, and take part in the same accounting.
        server.default = Behaviour.slow("one two three", token_delay_s=0.05)
        texts = await asyncio.gather(*(_streamed(expert, f"s{i}") for i in range(16)))
        assert texts == ["one two three"] * 16
        assert server.connections_total == 8
    finally:
        await expert.aclose()
    assert server.wait_for(lambda s: s.open_connections == 0)


async def test_a_call_that_waits_past_the_timeout_for_a_connection_is_overloaded(
        server: ScriptedOpenAIServer, client_kind: str) -> None:
    # The holder streams for ~1 s, never silent as long as the 0.3 s timeout, on the only connection.
    server.push(Behaviour.slow("a b c d e f g h i j", token_delay_s=0.1))
    expert = expert_for(server, max_concurrency=1, kind=client_kind, timeout_s=0.3)
    try:
        holder = asyncio.create_task(_streamed(expert, "holds the only connection"))
        await asyncio.sleep(0.05)
        with pytest.raises(ExpertOverloaded, match=r"all 1 connections busy for 0\.3s"):
            await expert.generate(ask("waits"))
        assert await holder == "a b c d e f g h i j"
    finally:
        await expert.aclose()


async def test_connections_come_back_after_errors_cancellation_and_an_abandoned_stream(
        server: ScriptedOpenAIServer, client_kind: str) -> None:
    expert = expert_for(server, max_concurrency=2, kind=client_kind)
    try:
        server.push(Behaviour.error(500), Behaviour.reset())
        for _ in range(2):
            with pytest.raises(ExpertError):
                await expert.generate(ask("fails"))
        server.default = Behaviour.hang()
        hung = asyncio.create_task(expert.generate(ask("hangs")))
        assert await asyncio.to_thread(server.wait_for, lambda s: s.open_connections >= 1)
        hung.cancel()
        with pytest.raises(asyncio.CancelledError):
            await hung
        server.default = Behaviour.slow("one two three four", token_delay_s=0.05)
        async with aclosing(expert.stream(ask("stream"))) as deltas:
            async for delta in deltas:
                if delta.content:
                    break  # the caller walks away after the first token
        # Both slots are free again: two slow calls at once run side by side, not one after the other.
        assert await asyncio.to_thread(server.wait_for, lambda s: s.chats_in_flight == 0)
        server.reset_peak()
        server.default = Behaviour.slow("ok", delay_s=0.2)
        replies = await asyncio.wait_for(asyncio.gather(expert.generate(ask("a")), expert.generate(ask("b"))), 10)
        assert [r.content for r in replies] == ["ok", "ok"]
        assert server.peak_chats_in_flight == 2
    finally:
        await expert.aclose()
    assert server.wait_for(lambda s: s.open_connections == 0)


async def test_a_reset_mid_body_is_unavailable_not_a_hang(server: ScriptedOpenAIServer, client_kind: str) -> None:
    server.push(Behaviour.reset())
    expert = expert_for(server, max_concurrency=4, kind=client_kind)
    try:
        with pytest.raises(ExpertUnavailable):
            await asyncio.wait_for(expert.generate(ask("x")), 3.0)
        assert (await expert.generate(ask("y"))).content == "answer from pool"  # the next call is served
    finally:
        await expert.aclose()


async def test_every_token_sent_before_a_mid_stream_death_is_delivered(server: ScriptedOpenAIServer,
                                                                       client_kind: str) -> None:
    """The double writes two events and aborts the connection at once; the caller here is slow to ask for more,
    so the abort lands while the second event is still buffered, where aiohttp's reader would raise before
    handing it over (see ``experts.http_client._unread``)."""
    expert = expert_for(server, max_concurrency=2, kind=client_kind)
    try:
        for _ in range(5):
            server.push(Behaviour.die_mid_stream(2))
            got: list[str] = []
            with pytest.raises(ExpertUnavailable):
                async for delta in expert.stream(ask("x")):
                    got.append(delta.content)
                    await asyncio.sleep(0.02)  # e.g. forwarding the token to a slow client
            assert "".join(got) == "one two "
    finally:
        await expert.aclose()


async def test_both_clients_report_the_same_failure_kinds(server: ScriptedOpenAIServer) -> None:
    clients: list[HttpClient] = [AiohttpClient(headers={}, timeout_s=0.3, max_connections=2, keepalive_s=KEEPALIVE_S),
                                 HttpxClient(headers={}, timeout_s=0.3, max_connections=2,
                                             transport=httpx.AsyncHTTPTransport())]
    url = server.url + "/chat/completions"
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    try:
        for client in clients:
            server.push(Behaviour.hang())
            with pytest.raises(HttpFailure) as hung:
                await client.post(url, body)
            assert hung.value.kind == "timeout", (type(client).__name__, hung.value.detail)
            with pytest.raises(HttpFailure) as refused:
                await client.post("http://127.0.0.1:9/v1/chat/completions", body)  # nothing listens on port 9
            assert refused.value.kind == "unavailable", (type(client).__name__, refused.value.detail)
            # A host name no resolver takes (a label over 63 characters): aiohttp's UnicodeError read as a garbled
            # reply ("decoding", a protocol error); it is the endpoint's fault, before any connection.
            with pytest.raises(HttpFailure) as unresolvable:
                await client.post(f"http://{'a' * 64}.example:8000/v1/chat/completions", body)
            assert unresolvable.value.kind == "unavailable", (type(client).__name__, unresolvable.value.detail)
            reply = await client.post(url, body)
            assert reply.status == 200 and b"answer from pool" in reply.content
            assert reply.headers["content-type"] == reply.headers["Content-Type"]  # names are case-insensitive
    finally:
        for client in clients:
            await client.aclose()


def test_the_environment_s_proxy_is_read_like_httpx_reads_it(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                 "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert env_proxy("http://gpu-box:8000/v1/chat/completions") is None
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
    monkeypatch.setenv("NO_PROXY", "gpu-box,localhost")
    assert env_proxy("https://api.openai.com/v1/chat/completions") == "http://proxy.corp:3128"
    assert env_proxy("http://api.openai.com/v1/chat/completions") is None  # no HTTP_PROXY
    assert env_proxy("https://gpu-box:8000/v1/chat/completions") is None  # NO_PROXY
    monkeypatch.setenv("ALL_PROXY", "http://all.corp:3128")
    assert env_proxy("http://api.openai.com/v1") == "http://all.corp:3128"


async def _streamed(expert: OpenAICompatibleExpert, text: str) -> str:
    parts = [d.content async for d in expert.stream(ask(text)) if d.content]
    return "".join(parts)


def test_https_endpoints_are_verified_as_httpx_verifies_them(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import ssl

    import certifi

    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    default = tls_context()
    assert default.verify_mode == ssl.CERT_REQUIRED and default.check_hostname
    assert len(default.get_ca_certs()) == len(httpx.create_ssl_context().get_ca_certs()) > 50  # certifi's CAs
    assert tls_context() is default  # built once, shared by every expert
    # A private CA (a company's, or a self-signed vLLM's) named by SSL_CERT_FILE is what is trusted then.
    bundle = certifi.contents()
    one_ca = bundle[bundle.index("-----BEGIN CERTIFICATE-----"):bundle.index("-----END CERTIFICATE-----") + 25]
    (tmp_path / "ca.pem").write_text(one_ca + "\n")
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    assert len(tls_context().get_ca_certs()) == 1


# A loop closed under open connections leaves their sockets to the garbage collector, which warns (asyncio's
# own behaviour, for any client): here that is the point, and the server sees them closed.
@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_calls_from_successive_event_loops_are_served(server: ScriptedOpenAIServer) -> None:
    # asyncio.run once per call (a script, a notebook cell) meets a new loop each time, the last one closed.
    # (An injected httpx transport's connections belong to their loop, as in httpx: the user's to manage.)
    expert = expert_for(server, max_concurrency=4)
    answers = [asyncio.run(expert.generate(ask(f"question {i}"))).content for i in range(3)]
    streamed = asyncio.run(_streamed(expert, "streamed"))
    asyncio.run(expert.aclose())
    assert answers == ["answer from pool"] * 3 and streamed == "answer from pool"
    assert server.connections_total == 4  # one per loop: a closed loop's connections are not reused
    gc.collect()
    assert server.wait_for(lambda s: s.open_connections == 0)


def test_a_call_from_a_second_loop_while_the_first_is_open_is_a_clear_error(server: ScriptedOpenAIServer,
                                                                              client_kind: str) -> None:
    expert = expert_for(server, max_concurrency=4, kind=client_kind)
    first = asyncio.new_event_loop()
    try:
        assert first.run_until_complete(expert.generate(ask("first"))).content == "answer from pool"
        with pytest.raises(RuntimeError, match="another event loop that is still open"):
            asyncio.run(expert.generate(ask("second")))
        assert first.run_until_complete(expert.generate(ask("first again"))).content == "answer from pool"
    finally:
        first.run_until_complete(expert.aclose())
        first.close()


async def test_a_streamed_line_over_the_limit_is_a_protocol_error_not_a_crash(
        server: ScriptedOpenAIServer, client_kind: str) -> None:
    """One SSE event longer than MAX_LINE_BYTES: a decoding failure the orchestrator falls back on, whichever
    transport read it (aiohttp's parser raises LineTooLong, which is neither a ValueError nor a ClientError)."""
    expert = expert_for(server, max_concurrency=2, kind=client_kind)
    try:
        server.push(Behaviour.ok("x" * (MAX_LINE_BYTES + 1000)))
        with pytest.raises(ExpertProtocolError):
            async for _ in expert.stream(ask("a very long answer")):
                pass
        server.push(Behaviour.ok("x" * (MAX_LINE_BYTES // 2)))  # under the limit: streamed whole
        pieces = [d.content async for d in expert.stream(ask("a long answer")) if d.content]
        assert "".join(pieces) == "x" * (MAX_LINE_BYTES // 2)
    finally:
        await expert.aclose()
