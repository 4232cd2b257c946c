"""The router service in its own process, for benchmarks: ``python -m bench.router_server --config X --port P``.

It serves exactly what ``moe serve`` would: ``load_config`` -> ``build_orchestrator`` (the trained gate named by
the config) -> ``create_app`` -> uvicorn, with access logs off as in a deployment. uvicorn picks uvloop and
httptools when they are installed (``--loop``/``--http`` override, to compare).
"""

from __future__ import annotations

import argparse

import uvicorn

from router.build import build_orchestrator
from router.config import load_config
from router.service import create_app


def main() -> None:
    parser = argparse.ArgumentParser(description="run the router for a benchmark")
    parser.add_argument("--config", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--loop", default="auto", choices=["auto", "asyncio", "uvloop"])
    parser.add_argument("--http", default="auto", choices=["auto", "h11", "httptools"])
    args = parser.parse_args()
    app = create_app(build_orchestrator(load_config(args.config, check_env=False)))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False,
                loop=args.loop, http=args.http, backlog=4096)


if __name__ == "__main__":
    main()
