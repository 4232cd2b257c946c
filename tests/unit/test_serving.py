"""``router.serving``: moe serve's uvicorn server bounds its graceful shutdown (the reset of a stalled client's
connection is tested with the stall itself, in test_service)."""

from __future__ import annotations

import asyncio

import uvicorn
from starlette.types import Message, Receive, Scope, Send

from router.compose import router_drain_s
from router.serving import SHUTDOWN_MARGIN_S, RouterServer, transport_of
from tests.doubles.fakes import fake_config
from tests.support import free_port


async def test_a_graceful_shutdown_ends_once_the_drain_and_its_margin_are_over() -> None:
    """A request that would never end (none of the router's can, short of a bug) held uvicorn's shutdown for ever:
    SIGTERM waited until the orchestrator's grace period ran out and it was killed."""
    started = asyncio.Event()

    async def hanging(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            started.set()
            await asyncio.sleep(3600)

    port = free_port()
    config = uvicorn.Config(hanging, port=port, log_level="critical", lifespan="off")
    server = RouterServer(config, drain_s=lambda: 0.4, margin_s=0.5)
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    await writer.drain()
    await asyncio.wait_for(started.wait(), 10)
    server.should_exit = True
    await asyncio.wait_for(task, 30)  # the default: no end
    assert server.config.timeout_graceful_shutdown == 1  # 0.4 + 0.5, in whole seconds up
    # The request was cancelled: uvicorn answers it 500 and closes the connection.
    assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.1 500 ")
    writer.close()


def test_the_bound_is_the_served_config_s_drain_within_the_deployments_grace() -> None:
    config = fake_config(["a"], fallback={"deadline_s": 20}, service={"body_timeout_s": 10})
    assert router_drain_s(config) == 32  # the body, the deadline, a tenth of it for the last writes
    assert SHUTDOWN_MARGIN_S < 15  # compose and Kubernetes give the router its drain and 15 s


async def test_the_transport_is_found_behind_uvicorn_s_message_logger() -> None:
    """At ``moe serve --log-level trace`` uvicorn hands the app its message logger's ``send``, a function whose
    closure holds the request cycle's: a stalled client's connection was then closed, not reset, and held."""
    from uvicorn.middleware.message_logger import MessageLoggerMiddleware

    class Cycle:  # as uvicorn's request cycle: its send is a method, and it holds the connection's transport
        transport = object()

        async def send(self, message: Message) -> None:
            pass

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    cycle, given = Cycle(), []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        given.append(send)

    await MessageLoggerMiddleware(app)({"type": "http", "method": "GET", "path": "/"}, receive, cycle.send)
    assert given[0] is not cycle.send and transport_of(given[0]) is cycle.transport
    assert transport_of(cycle.send) is cycle.transport
    assert transport_of(receive) is None
