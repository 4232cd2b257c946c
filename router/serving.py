"""``moe serve``'s server: the service's app on uvicorn, with two things uvicorn leaves to the app.

- A connection whose client stopped reading its answer (``router.edge.ClientStalled``, cut off at the
  request's deadline) is reset when its request ends. uvicorn closes it, and a close first sends what the socket
  still buffers, which that client never reads: the connection, megabytes of buffers, and a graceful shutdown
  waiting on it, were held for as long as the client kept its socket open.
- A graceful shutdown is bounded. On SIGTERM the requests in flight get the longest any of them may still run
  under the config served at that moment (``router.compose.router_drain_s``: a body arriving, the deadline, the
  last writes) and ``SHUTDOWN_MARGIN_S``; what is left then is cancelled and the service stops. uvicorn's own
  default waits without end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import struct
import sys
from collections.abc import Callable
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from router.compose import router_drain_s
from router.edge import STALLED, transport_of

__all__ = ["SHUTDOWN_MARGIN_S", "AbortStalled", "RouterServer", "serve", "transport_of"]

log = logging.getLogger("router.serving")

# Seconds a graceful shutdown waits past the drain: less than the deployments' own margin over it (compose and
# Kubernetes give the router its drain and 15 s), so the service stops by itself before it is killed.
SHUTDOWN_MARGIN_S = 5.0


class AbortStalled:
    """``app``, with the connection of a request whose client stopped reading aborted when the request ends."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)
        if scope["type"] == "http" and scope.get("state", {}).get(STALLED):
            transport = transport_of(send)
            if transport is None:
                log.warning("a stalled client's connection could not be reset (no transport behind the server's "
                            "send); it is closed instead, and lasts while the client keeps it open")
            elif hasattr(transport, "abort") and not transport.is_closing():
                # Linger 0: the socket is reset, and the kernel drops what it still holds for the client at once,
                # rather than keep it for minutes past the process, trying to send it.
                sock = transport.get_extra_info("socket")
                with contextlib.suppress(AttributeError, OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                transport.abort()
                # The transport tells its protocol the connection is lost on the next turn of the loop, and
                # uvicorn, knowing the client gone, does not log the unfinished response as an error of its own.
                await asyncio.sleep(0)


class RouterServer(uvicorn.Server):
    """uvicorn's server, whose graceful shutdown waits ``drain_s()`` (read when the shutdown begins, so a reload's
    deadline counts) and ``margin_s`` at most."""

    def __init__(self, config: uvicorn.Config, drain_s: Callable[[], float],
                 margin_s: float = SHUTDOWN_MARGIN_S) -> None:
        super().__init__(config)
        self.drain_s, self.margin_s = drain_s, margin_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.config.timeout_graceful_shutdown = math.ceil(self.drain_s() + self.margin_s)
        await super().shutdown(sockets)


def serve(app: Any, *, host: str, port: int, log_level: str, log_config: dict[str, Any]) -> None:
    """Run the service's ``app`` (``router.service.create_app``) until SIGTERM or SIGINT, as ``uvicorn.run`` would
    (its exit status 3 when the server could not start)."""
    config = uvicorn.Config(AbortStalled(app), host=host, port=port, log_level=log_level, log_config=log_config,
                            access_log=False)
    server = RouterServer(config, lambda: float(router_drain_s(app.state.orchestrator.config)))
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn handles the signal itself; as uvicorn.run does
        server.run()
    if not server.started:
        sys.exit(3)  # uvicorn's STARTUP_FAILURE
