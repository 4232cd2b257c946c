"""An expert's HTTP connections, split across small httpx clients.

httpcore's connection pool does work in proportion to its connections on every request: it scans them all and
polls each idle socket for readability (encode/httpcore#1035). With 64 requests in flight to a fast upstream,
one client spent about 1.8 ms of CPU per request and eight clients of eight connections 0.7 to 0.9 ms; at 8 in
flight the two cost the same (``python -m bench.http_pool``, 2 cores). An expert that a router sends tens of
concurrent requests, such as a vLLM server, pays that on every call.

``ClientPool.lease`` hands a request the client with the fewest requests in flight, and opens another client
(up to ``max_connections`` in all, ``per_client`` each) only when every open one is full. An expert that never
sees more than ``per_client`` concurrent requests keeps a single client, so keep-alive reuse is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx

__all__ = ["PER_CLIENT", "ClientPool"]

PER_CLIENT = 8  # connections per client: where one client stopped costing more per request than several


class ClientPool:
    """Up to ``max_connections`` connections in clients of at most ``per_client``; ``factory(limit)`` builds one
    client allowed ``limit`` connections. ``shard=False`` keeps one client of ``max_connections`` (for an
    injected transport, whose pooling is its own)."""

    def __init__(self, factory: Callable[[int], httpx.AsyncClient], max_connections: int, *,
                 per_client: int = PER_CLIENT, shard: bool = True) -> None:
        if max_connections < 1 or per_client < 1:
            raise ValueError("max_connections and per_client must be at least 1")
        self._factory = factory
        shards = math.ceil(max_connections / per_client) if shard else 1
        # Connections per client, as even as the total allows, never more than max_connections in all.
        self._limits = [max_connections // shards + (1 if i < max_connections % shards else 0)
                        for i in range(shards)]
        self._clients: list[httpx.AsyncClient] = []
        self._in_flight: list[int] = []

    @property
    def clients(self) -> int:
        """How many clients are open now."""
        return len(self._clients)

    @asynccontextmanager
    async def lease(self) -> AsyncIterator[httpx.AsyncClient]:
        """A client for one request (or one stream), held until the block exits."""
        i = self._pick()
        self._in_flight[i] += 1
        try:
            yield self._clients[i]
        finally:
            self._in_flight[i] -= 1

    def _pick(self) -> int:
        if self._clients:
            i = min(range(len(self._clients)), key=self._in_flight.__getitem__)
            if self._in_flight[i] < self._limits[i] or len(self._clients) == len(self._limits):
                return i  # room here, or every client is open and full: httpx queues it in the least busy one
        self._clients.append(self._factory(self._limits[len(self._clients)]))
        self._in_flight.append(0)
        return len(self._clients) - 1

    async def aclose(self) -> None:
        clients, self._clients, self._in_flight = self._clients, [], []
        for client in clients:
            await client.aclose()
