"""The router, not just the gate, as the experts (4, 16, 64) and k (1, 3, 5) grow.

``python -m bench.router_scaling`` trains one gate per expert count on nested sets of CLINC150 intents (as
``bench.gate_bench.scaling`` does), serves each as the router against the fast upstream with every expert on it,
and measures, for each (experts, k): the overhead p50 over direct calls at concurrency 1 and 8, and top-k
requests/s at 32 clients. The routers of one expert count run in the same rounds, so outside load falls on them
alike. Prints a table and writes ``bench/results/router_scaling.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import gate_bench

RESULTS = Path(__file__).resolve().parent / "results"
EXPERTS = (4, 16, 64)
KS = (1, 3, 5)


def measure(experts: Sequence[int], ks: Sequence[int], seconds: float) -> list[dict[str, Any]]:
    from bench.router_bench import RouterProcess, Target, compare, throughput
    from bench.upstream import UpstreamProcess
    from router.encoders import OnnxMiniLMEncoder

    trained, largest = gate_bench.nested_gates(OnnxMiniLMEncoder(), experts, 200)
    texts = largest.test_texts
    rows: list[dict[str, Any]] = []
    with UpstreamProcess(latency_ms=5.0) as up:
        direct = up.url + "/chat/completions"
        for n in experts:
            started = time.monotonic()
            print(f"{n} experts: starting routers at k {', '.join(map(str, ks))}", flush=True)
            procs = [RouterProcess(trained[n], up.url, k=min(k, n)) for k in ks]
            for proc in procs:
                proc.__enter__()
            try:
                routers: dict[str, Target] = {str(k): p for k, p in zip(ks, procs, strict=True)}
                overhead = {c: asyncio.run(compare(routers, direct, texts, concurrency=c, rounds=2))
                            for c in (1, 8)}
                for k, proc in zip(ks, procs, strict=True):
                    rps = asyncio.run(throughput(proc, direct, texts, seconds=seconds, concurrency=32))["rps"]
                    row = {"experts": n, "k": k, "overhead_p50_ms_c1": overhead[1][str(k)]["overhead_p50_ms"],
                           "overhead_p50_ms_c8": overhead[8][str(k)]["overhead_p50_ms"], "rps_c32": rps}
                    rows.append(row)
                    print(f"  k {k}: overhead p50 {row['overhead_p50_ms_c1']} ms at c1, "
                          f"{row['overhead_p50_ms_c8']} ms at c8; {rps} requests/s at 32 clients", flush=True)
            finally:
                for proc in procs:
                    proc.__exit__()
            print(f"{n} experts done in {time.monotonic() - started:.0f} s", flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=4.0, help="each router's throughput run")
    parser.add_argument("--out", type=Path, default=RESULTS / "router_scaling.json")
    args = parser.parse_args(argv)
    rows = measure(EXPERTS, KS, args.seconds)
    print(f"{'experts':>8} {'k':>3} {'overhead c1 ms':>15} {'overhead c8 ms':>15} {'req/s c32':>10}")
    for r in rows:
        print(f"{r['experts']:>8} {r['k']:>3} {r['overhead_p50_ms_c1']:>15} {r['overhead_p50_ms_c8']:>15} "
              f"{r['rps_c32']:>10}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                                   indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
