"""CPU per request of one expert's HTTP connections: ``experts.http_client``'s two clients side by side.

``python -m bench.http_pool`` sends chat completions to the fast upstream (``bench.upstream``) at several
concurrencies through ``AiohttpClient`` (what an expert uses on real sockets) and through ``HttpxClient`` over
httpx's own socket transport (what an injected transport gets, and what every expert used before), and prints
this process's CPU milliseconds per request and requests/s for each. Writes ``bench/results/http_pool.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from bench.upstream import UpstreamProcess, chat_payload
from experts.http_client import AiohttpClient, HttpClient, HttpxClient
from router.config import ExpertConfig

RESULTS = Path(__file__).resolve().parent / "results"

__all__ = ["CLIENTS", "measure"]

CLIENTS: dict[str, Callable[[int], HttpClient]] = {
    "aiohttp": lambda n: AiohttpClient(headers={}, timeout_s=30.0, max_connections=n,
                                       keepalive_s=ExpertConfig.model_fields["keepalive_s"].default),
    "httpx": lambda n: HttpxClient(headers={}, timeout_s=30.0, max_connections=n, transport=httpx.AsyncHTTPTransport(
        limits=httpx.Limits(max_connections=n, max_keepalive_connections=n))),
}


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system


async def _drive(client: HttpClient, url: str, concurrency: int, requests: int) -> tuple[float, float]:
    body = chat_payload("what is the weather in paris tomorrow", model="m")

    async def worker() -> None:
        for _ in range(requests // concurrency):
            reply = await client.post(url, body)
            if reply.status != 200:
                raise RuntimeError(f"upstream answered HTTP {reply.status}")

    await asyncio.gather(*(worker() for _ in range(concurrency)))  # warm: connections open
    cpu, start = _cpu_s(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    done = requests // concurrency * concurrency
    return (_cpu_s() - cpu) * 1000.0 / done, done / (time.perf_counter() - start)


async def measure(url: str, concurrencies: Sequence[int], requests: int) -> list[dict[str, Any]]:
    """One row per concurrency and client; the clients take turns at each concurrency."""
    rows = []
    for concurrency in concurrencies:
        for name, make in CLIENTS.items():
            client = make(concurrency)
            try:
                ms, rps = await _drive(client, url, concurrency, requests)
            finally:
                await client.aclose()
            rows.append({"concurrency": concurrency, "client": name, "cpu_ms_per_request": round(ms, 3),
                         "rps": round(rps, 1)})
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.http_pool", description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--upstream-ms", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "http_pool.json")
    args = parser.parse_args(argv)
    with UpstreamProcess(latency_ms=args.upstream_ms) as up:
        rows = asyncio.run(measure(up.url + "/chat/completions", args.concurrency, args.requests))
    print(f"{'concurrency':>11} {'client':<8} {'CPU ms/req':>10} {'req/s':>7}")
    for r in rows:
        print(f"{r['concurrency']:>11} {r['client']:<8} {r['cpu_ms_per_request']:>10.3f} {r['rps']:>7.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"upstream_ms": args.upstream_ms, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
