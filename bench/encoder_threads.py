"""``gate.encoder.threads``: onnxruntime's intra-op threads per run, 1 against 2, on the encoder alone and
through the router.

``python -m bench.encoder_threads`` times one short query at a time and batches of 64 on two encoders taking
turns, then runs two routers (the same gate, ``threads: 1`` and ``threads: 2``) against the fast upstream in the
same rounds: overhead at concurrency 1, 8 and 32, and top-1 throughput. Both sides run two model runs at once
(``parallel: 2``, the default on 2 cores), so only the threads inside one run differ. Prints the figures and
writes ``bench/results/encoder_threads.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench import gate_bench, machine
from bench.data import clinc150, snips

RESULTS = Path(__file__).resolve().parent / "results"
THREADS = (1, 2)


def encoder_figures(queries: Sequence[str], batch_texts: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per thread count: single-query p50/p99 (ms) and batched queries/s, the encoders taking turns."""
    from router.encoders import OnnxMiniLMEncoder

    encoders = {t: OnnxMiniLMEncoder(threads=t, parallel=2) for t in THREADS}
    for encoder in encoders.values():
        encoder.encode(list(queries[:20]))
        encoder.encode(list(batch_texts[:64]))
    times: dict[int, list[float]] = {t: [] for t in THREADS}
    for query in queries:
        for t, encoder in encoders.items():
            start = time.perf_counter()
            encoder.encode([query])
            times[t].append((time.perf_counter() - start) * 1000.0)
    spent = dict.fromkeys(THREADS, 0.0)
    for i in range(0, len(batch_texts) - 63, 64):
        for t, encoder in encoders.items():
            start = time.perf_counter()
            encoder.encode(list(batch_texts[i:i + 64]))
            spent[t] += time.perf_counter() - start
    n = (len(batch_texts) // 64) * 64
    return {str(t): {"p50_ms": round(float(np.percentile(times[t], 50)), 2),
                     "p99_ms": round(float(np.percentile(times[t], 99)), 2),
                     "batch_qps": round(n / spent[t], 1)} for t in THREADS}


def router_figures(seconds: float) -> dict[str, Any]:
    """Two routers on one gate, ``threads`` 1 and 2 (two runs at once each), in the same rounds: overhead p50 and
    top-1 throughput."""
    from bench.router_bench import RouterProcess, Target, compare, throughput
    from bench.upstream import UpstreamProcess
    from router.encoders import OnnxMiniLMEncoder

    data = snips(per_label=60, n_test=400)
    gate = gate_bench.train(OnnxMiniLMEncoder(), data)
    out: dict[str, Any] = {"overhead_p50_ms": {}, "throughput_rps": {}}
    with UpstreamProcess(latency_ms=5.0) as up:
        direct = up.url + "/chat/completions"
        with RouterProcess(gate, up.url, encoder_options={"threads": 1, "parallel": 2}) as one, \
                RouterProcess(gate, up.url, workdir=str(one.workdir),
                              encoder_options={"threads": 2, "parallel": 2}) as two:
            routers: dict[str, Target] = {"1": one, "2": two}
            for c in (1, 8, 32):
                row = asyncio.run(compare(routers, direct, data.test_texts, concurrency=c, rounds=3))
                out["overhead_p50_ms"][f"c{c}"] = {t: row[t]["overhead_p50_ms"] for t in routers}
                print(f"  concurrency {c}: overhead p50 ms {out['overhead_p50_ms'][f'c{c}']}", flush=True)
            for t, router in routers.items():
                result = asyncio.run(throughput(router, direct, data.test_texts, seconds=seconds))
                out["throughput_rps"][t] = result["rps"]
                print(f"  threads {t}: {result['rps']} requests/s", flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=8.0, help="each router's throughput run")
    parser.add_argument("--out", type=Path, default=RESULTS / "encoder_threads.json")
    args = parser.parse_args(argv)
    started, host = datetime.now(UTC).isoformat(timespec="seconds"), machine()
    print("encoder alone: 1 and 2 intra-op threads, taking turns", flush=True)
    encoder = encoder_figures(snips().test_texts[:300], clinc150(150, per_label=8).train_texts)
    for t, figures in encoder.items():
        print(f"  threads {t}: {figures}", flush=True)
    print("through the router (same gate, same rounds)", flush=True)
    router = router_figures(args.seconds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": started, "machine": host, "encoder": encoder, "router": router},
                                   indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
