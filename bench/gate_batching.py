"""``gate.max_batch``: how many concurrent queries one micro-batch (one encoder call) may hold.

``python -m bench.gate_batching`` runs one router per cap (the same gate, the same fast upstream) and measures
them in the same rounds: overhead p50 and p99 at concurrency 32 and 128, then top-1 requests/s and CPU per
request at 64 and 128 clients, one router after another, each client count starting from another router.
Prints the figures and writes ``bench/results/gate_batching.json``. Not part of ``make bench``.

A cap splits a queue that is already there into encoder calls run one after another: a lower cap answers the
first queries of the queue sooner, a higher one pays each call's fixed cost (the hand-off to the gate's thread,
the classifier and nearest-example search per call, the wake-up) over more queries.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import gate_bench, machine
from bench.data import snips

RESULTS = Path(__file__).resolve().parent / "results"
CAPS = (32, 64, 128)


def measure(caps: Sequence[int], seconds: float) -> dict[str, Any]:
    from bench.router_bench import RouterProcess, Target, compare, throughput
    from bench.upstream import UpstreamProcess
    from router.encoders import OnnxMiniLMEncoder

    data = snips(per_label=60, n_test=400)
    gate = gate_bench.train(OnnxMiniLMEncoder(), data)
    out: dict[str, Any] = {"overhead_ms": {}, "throughput": {}}
    with UpstreamProcess(latency_ms=5.0) as up, contextlib.ExitStack() as stack:
        direct = up.url + "/chat/completions"
        routers: dict[str, Target] = {}
        workdir: str | None = None
        for cap in caps:
            router = stack.enter_context(RouterProcess(gate, up.url, workdir=workdir,
                                                       gate_options={"max_batch": cap}))
            workdir = str(router.workdir)
            routers[str(cap)] = router
        for c in (32, 128):
            row = asyncio.run(compare(routers, direct, data.test_texts, concurrency=c, rounds=3))
            out["overhead_ms"][f"c{c}"] = {name: {"p50": row[name]["overhead_p50_ms"],
                                                  "p99": row[name]["overhead_p99_ms"]} for name in routers}
            print(f"  concurrency {c}: overhead p50 / p99 ms by max_batch "
                  + ", ".join(f"{name}: {v['p50']} / {v['p99']}" for name, v in out["overhead_ms"][f"c{c}"].items()),
                  flush=True)
        names = list(routers)
        for turn, clients in enumerate((64, 128)):
            rates: dict[str, Any] = {}
            # Each client count starts from another router, so none always runs first.
            for name in names[turn % len(names):] + names[:turn % len(names)]:
                result = asyncio.run(throughput(routers[name], direct, data.test_texts, seconds=seconds,
                                                concurrency=clients))
                rates[name] = {"rps": result["rps"], "cpu_ms_per_request": result["cpu_ms_per_request"],
                               "errors": result["errors"]}
            rates = {name: rates[name] for name in names}
            out["throughput"][f"clients{clients}"] = rates
            print(f"  {clients} clients: requests/s (CPU ms per request) by max_batch "
                  + ", ".join(f"{name}: {v['rps']} ({v['cpu_ms_per_request']})" for name, v in rates.items()),
                  flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--caps", type=int, nargs="+", default=list(CAPS), help="gate.max_batch values to compare")
    parser.add_argument("--seconds", type=float, default=8.0, help="each router's throughput run")
    parser.add_argument("--out", type=Path, default=RESULTS / "gate_batching.json")
    args = parser.parse_args(argv)
    print(f"routers at gate.max_batch {', '.join(map(str, args.caps))}, the same gate and upstream, same rounds",
          flush=True)
    started, host = datetime.now(UTC).isoformat(timespec="seconds"), machine()
    figures = measure(args.caps, args.seconds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": started, "machine": host, **figures}, indent=2) + "\n",
                        encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
